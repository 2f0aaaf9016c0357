#!/bin/busybox sh
# PID 1 of the `cargo xtask vm-test` guest (busybox, inside the initramfs).
#
# Builds a root that *is* the host's root filesystem (virtiofs, read-only) under a
# tmpfs overlay, so host binaries, libraries and the repo are at the same paths as on
# the host and the tests can still write anywhere. Then runs /rampart/run.sh (written
# by the host for this run) chrooted into it and reports the result to qemu through
# isa-debug-exit. Everything printed goes to ttyS0, which the host streams.

/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

# Status values shared with xtask/src/vm.rs: qemu exits with (v << 1) | 1.
PASSED=1
COMMAND_FAILED=2
SETUP_FAILED=3

report() {
    # debug-exit writes $1 to I/O port 0xf4 (isa-debug-exit), ending qemu with our
    # status. Should it fail, poweroff leaves the host with "no result".
    /bin/debug-exit "$1"
    poweroff -f
}

fail() {
    echo "rampart-vm: init: $*"
    report $SETUP_FAILED
}

mount -t proc proc /proc || fail "mount /proc"
mount -t sysfs sysfs /sys || fail "mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "mount /dev"

# Modules were resolved and ordered (dependencies first) on the host.
while read -r module; do
    insmod "/modules/$module" || fail "insmod $module"
done < /modules/order

mkdir -p /host /rw /newroot

# A Debian system on the disk (`cargo xtask test`'s system step): boot it with systemd
# as PID 1. Its rampart-vm.service runs this run's run.sh, copied onto the disk on every
# boot, and reports through isa-debug-exit itself (see xtask/src/vm/image.rs).
if grep -q 'rampart.root=disk' /proc/cmdline; then
    mount -t ext4 /dev/vda /newroot || fail "mount the system disk"
    mkdir -p /newroot/var/lib/rampart-vm
    cp /rampart/run.sh /newroot/var/lib/rampart-vm/run.sh || fail "copy run.sh to the disk"
    umount /proc /sys
    mount --move /dev /newroot/dev || umount /dev
    echo "@@rampart-vm: ready"
    exec switch_root /newroot /lib/systemd/systemd
fi
mount -t virtiofs -o ro hostroot /host || fail "mount virtiofs hostroot"
mount -t tmpfs -o mode=0755 rw /rw || fail "mount tmpfs for overlay"
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || fail "mount overlay root"

R=/newroot
mount -t proc proc $R/proc || fail "mount guest /proc"
mount -t sysfs sysfs $R/sys || fail "mount guest /sys"
mount -t devtmpfs devtmpfs $R/dev || fail "mount guest /dev"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
# Host /run holds host sockets and pid files that mean nothing here; /tmp stays the
# overlay so host paths under /tmp (e.g. a scratch target dir) remain visible.
mount -t tmpfs -o mode=0755 tmpfs $R/run || fail "mount guest /run"
mount -t bpf bpf $R/sys/fs/bpf || fail "mount bpffs"
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup
mount -t tracefs tracefs $R/sys/kernel/tracing
mount -t debugfs debugfs $R/sys/kernel/debug
# `ip netns exec` remounts /sys, hiding /sys/fs/bpf: tests pin into this one instead.
mkdir -p $R/run/rampart-bpffs
mount -t bpf bpf $R/run/rampart-bpffs || fail "mount second bpffs"

ip link set lo up || fail "bring up lo"
hostname rampart-vm

mkdir -p $R/run/rampart-vm
cp /rampart/run.sh $R/run/rampart-vm/run.sh || fail "copy run.sh"
echo "@@rampart-vm: ready"
chroot $R /bin/sh /run/rampart-vm/run.sh
case $? in
    0) report $PASSED ;;
    *) report $COMMAND_FAILED ;;
esac
