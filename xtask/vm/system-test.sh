#!/bin/sh
# The packaging test, inside the system VM (Debian 12, systemd as PID 1; see
# xtask/src/vm/image.rs): what an operator does in their first hour, and what must hold.
#
#   system-test.sh <package> <newer package>
#
# It reboots the guest once; rampart-vm.service then runs it again, and it carries on
# from the phase it wrote to the disk. Test tokens never appear in its output.
set -eu

deb1=$1
deb2=$2
state=/var/lib/rampart-vm
phase_file=$state/phase
# The test's token must outlive the reboot: it is kept on this run's throwaway disk
# overlay, readable by root only, and deleted at the end.
token_file=$state/test-token
mkdir -p $state

say() { echo "system-test: $*"; }
fail() {
    say "FAILED: $*"
    say "--- journal of rampart.service"
    journalctl -u rampart.service --no-pager -n 40 2>&1 | sed 's/^/  /' || true
    exit 1
}
phase() { echo "$1" > $phase_file; }

CLIENT="ip netns exec client"
URL=http://10.77.0.1:8080
# Status of one request from the client namespace: the HTTP code, or 000 when the
# connection was reset or timed out (curl prints 000 then).
status() {
    # $1: token or "", $2: path
    if [ -n "$1" ]; then
        $CLIENT curl -s -o /dev/null -m 5 -w '%{http_code}' -H "X-Test: auth" \
            -H "Authorization: Bearer $1" "$URL$2" || true
    else
        $CLIENT curl -s -o /dev/null -m 2 -w '%{http_code}' -H "X-Test: noauth" \
            "$URL$2" || true
    fi
}
# Requests nginx parsed without a token: each is a request Rampart should have denied.
unjudged() { grep -c ' noauth$' /var/log/nginx/rampart-test.log || true; }
# A request without a token gets no answer (the listener drops it: a veth delivers the
# reset action's XDP_TX reply only to a peer running XDP, which the attach and scenario
# tests set up; here the point is the package under systemd). curl's 28 is "timed out".
expect_dropped() {
    rc=0
    $CLIENT curl -s -o /dev/null -m 3 -H "X-Test: noauth" "$URL$1" || rc=$?
    [ $rc = 28 ] || fail "$2: expected no answer (curl exit 28), curl exited $rc"
}
expect_status() {
    # $1 expected, $2 token, $3 path, $4 what
    got=$(status "$2" "$3")
    [ "$got" = "$1" ] || fail "$4: expected $1, got $got"
}
wait_for() {
    # $1 seconds, then a command that must come true
    n=$1; shift
    while ! "$@"; do
        n=$((n - 1))
        [ $n -gt 0 ] || return 1
        sleep 1
    done
}
served() { [ "$(status "$1" "$2")" = 200 ]; }
# A loop of requests without a token for $1 seconds while something else happens;
# prints how many it sent. None may reach nginx.
noauth_loop() {
    end=$(($(date +%s) + $1))
    sent=0
    while [ "$(date +%s)" -lt $end ]; do
        status "" /loop >/dev/null
        sent=$((sent + 1))
    done
    echo $sent
}

setup_units() {
    # The test network as a NIC would be: the device exists before rampart starts (it
    # attaches to it), and is configured only after network-pre.target, which rampart
    # orders itself before.
    cat > /etc/systemd/system/rampart-testnet.service <<'EOF'
[Unit]
Description=Test network device (veth into the client namespace)
Before=rampart.service network-pre.target
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'ip netns add client; ip link add rv-srv type veth peer name rv-cli; ip link set rv-cli netns client'
[Install]
WantedBy=multi-user.target
EOF
    cat > /etc/systemd/system/rampart-testnet-up.service <<'EOF'
[Unit]
Description=Test network configuration
After=network-pre.target rampart-testnet.service
Requires=rampart-testnet.service
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'ip addr add 10.77.0.1/24 dev rv-srv; ip link set rv-srv up; ip netns exec client ip addr add 10.77.0.2/24 dev rv-cli; ip netns exec client ip link set rv-cli up; ip netns exec client ip link set lo up'
[Install]
WantedBy=multi-user.target
EOF
    # The first request the network can carry after a boot, recorded for the test.
    cat > /etc/systemd/system/rampart-probe.service <<'EOF'
[Unit]
Description=First request after boot, with the revoked token
After=rampart-testnet-up.service nginx.service
Requires=rampart-testnet-up.service
ConditionPathExists=/var/lib/rampart-vm/test-token
[Service]
Type=oneshot
ExecStart=/bin/sh -c 'T=$(cat /var/lib/rampart-vm/test-token); ip netns exec client curl -s -o /dev/null -m 5 -w "%%{http_code}" -H "X-Test: probe" -H "Authorization: Bearer $T" http://10.77.0.1:8080/probe > /var/lib/rampart-vm/probe || true'
[Install]
WantedBy=multi-user.target
EOF
    systemctl daemon-reload
    systemctl enable --quiet rampart-testnet.service rampart-testnet-up.service rampart-probe.service
    systemctl start rampart-testnet.service rampart-testnet-up.service
    cat > /etc/nginx/conf.d/rampart-test.conf <<'EOF'
log_format rampart_test '$request_method $uri $status $http_x_test';
server {
    listen 8080;
    access_log /var/log/nginx/rampart-test.log rampart_test;
    location / { return 200 "ok\n"; }
}
EOF
    systemctl restart nginx
}

write_config() {
    cat > /etc/rampart/rampart.toml <<'EOF'
# The packaging test's configuration: one listener on the test network device.
state_dir = "/var/lib/rampart"
bpffs_dir = "/sys/fs/bpf/rampart"
control_socket = "/run/rampart/control.sock"
policy = ["policy.toml"]

[[listener]]
name = "test"
interface = "rv-srv"
hook = "xdp"
xdp_mode = "native"
ports = [8080]
mode = "enforce"
action = "drop"
on_missing = "deny"
on_unknown = "deny"
on_incomplete = "deny"
EOF
    cat > /etc/rampart/policy.toml <<'EOF'
[[contract]]
name = "standard"
stages = [{ after = "0s", rate = 1000, burst = 1000 }]

[[scope]]
name = "all"
methods = ["*"]
prefix = "/"
EOF
}

case $(cat $phase_file 2>/dev/null || echo install) in
install)
    say "1. dpkg -i $(basename "$deb1")"
    dpkg -i "$deb1" || fail "dpkg -i"
    [ -x /usr/bin/rampart ] || fail "no /usr/bin/rampart"
    [ "$(stat -c %a /var/lib/rampart/fingerprint.key)" = 600 ] || fail "postinst made no 0600 key"
    [ "$(systemctl is-enabled rampart.service)" = enabled ] || fail "rampart.service not enabled"
    [ -s /usr/share/man/man1/rampart.1.gz ] || fail "no man page"
    [ -s /usr/share/bash-completion/completions/rampart ] || fail "no bash completion"
    grep -qx /etc/rampart/rampart.toml /var/lib/dpkg/info/rampart.conffiles || fail "config not a conffile"

    setup_units
    write_config
    say "1. systemctl start rampart"
    systemctl start rampart.service || fail "systemctl start"
    [ "$(systemctl is-active rampart.service)" = active ] || fail "not active after start"
    systemctl show -p Type --value rampart.service | grep -qx notify || fail "unit is not Type=notify"

    say "2. a valid token is served, a request without one is not"
    T=$(rampart token issue --contract standard --scope all --label system-test 2>/dev/null) \
        || fail "token issue"
    expect_status 200 "$T" /hello "valid token"
    expect_dropped /hello "no token"
    [ "$(unjudged)" = 0 ] || fail "nginx parsed a request without a token"

    say "3. systemctl reload applies a policy change"
    S=$(head -c 24 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')
    FP=$(printf %s "$S" | rampart fingerprint)
    expect_status 000 "$S" /static "a token not yet in the policy"
    cat >> /etc/rampart/policy.toml <<EOF

[[token]]
fingerprint = "$FP"
contract = "standard"
scopes = ["all"]
label = "added by reload"
EOF
    systemctl reload rampart.service
    wait_for 20 served "$S" /static || fail "the reloaded policy's token is not served"

    say "3. systemctl restart keeps enforcing with no gap"
    pid_before=$(systemctl show -p MainPID --value rampart.service)
    noauth_loop 25 > $state/loop-count &
    loop=$!
    sleep 3
    systemctl restart rampart.service || fail "systemctl restart"
    wait $loop
    pid_after=$(systemctl show -p MainPID --value rampart.service)
    [ "$pid_before" != "$pid_after" ] || fail "the daemon did not restart"
    say "   $(cat $state/loop-count) requests without a token across the restart"
    [ "$(unjudged)" = 0 ] || fail "a request without a token reached nginx during the restart"
    expect_status 200 "$T" /after-restart "valid token after the restart"

    say "4. a token revoked before a reboot stays denied after it"
    FPT=$(printf %s "$T" | rampart fingerprint)
    rampart token revoke "$FPT" --reason system-test >/dev/null || fail "revoke"
    expect_status 000 "$T" /revoked "revoked token"
    (umask 077; printf %s "$T" > $token_file)
    phase rebooted
    say "   rebooting"
    touch /run/rampart-vm-rebooting
    systemctl reboot
    # This run ends here; the next boot runs the script again.
    sleep 600
    fail "no reboot"
    ;;
rebooted)
    say "4. after the reboot"
    T=$(cat $token_file)
    [ "$(systemctl is-active rampart.service)" = active ] || fail "rampart not active after boot"
    [ -f $state/probe ] || fail "the first request after boot was not sent"
    [ "$(cat $state/probe)" != 200 ] || fail "the first request after boot was served a revoked token"
    say "   first request after boot: $(cat $state/probe) (not served)"
    grep -q ' probe$' /var/log/nginx/rampart-test.log && fail "nginx parsed the first request after boot"
    expect_status 000 "$T" /revoked "revoked token after the reboot"
    expect_dropped /hello "no token after the reboot"
    [ "$(unjudged)" = 0 ] || fail "nginx parsed a request without a token"

    say "5. dpkg -i of a newer build upgrades in place"
    T2=$(rampart token issue --contract standard --scope all --label upgrade 2>/dev/null) \
        || fail "token issue"
    pid_before=$(systemctl show -p MainPID --value rampart.service)
    noauth_loop 25 > $state/loop-count &
    loop=$!
    sleep 3
    dpkg -i "$deb2" || fail "dpkg -i of the newer package"
    wait $loop
    [ "$(dpkg-query -W -f '${Version}' rampart)" = "$(dpkg-deb -f "$deb2" Version)" ] \
        || fail "not upgraded"
    [ "$(systemctl show -p MainPID --value rampart.service)" != "$pid_before" ] \
        || fail "the upgrade did not restart the daemon"
    say "   $(cat $state/loop-count) requests without a token across the upgrade"
    [ "$(unjudged)" = 0 ] || fail "a request without a token reached nginx during the upgrade"
    expect_status 200 "$T2" /after-upgrade "valid token after the upgrade"
    expect_status 000 "$T" /revoked "revoked token after the upgrade"

    say "5. apt-get purge removes everything"
    apt-get purge -y -q rampart >/dev/null 2>&1 || fail "apt-get purge"
    ip link show rv-srv | grep -q xdp && fail "an XDP program is still attached"
    [ ! -e /sys/fs/bpf/rampart ] || fail "pins left in /sys/fs/bpf/rampart"
    for p in /etc/rampart /var/lib/rampart /usr/bin/rampart /lib/systemd/system/rampart.service; do
        [ ! -e $p ] || fail "$p left behind"
    done
    # Nothing judges any more: the upstream sees requests without a token again.
    expect_status 200 "" /after-purge "no token once rampart is gone"
    rm -f $token_file
    phase done
    say "passed"
    ;;
*)
    fail "unknown phase $(cat $phase_file)"
    ;;
esac
