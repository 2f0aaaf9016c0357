//! `cargo xtask vm-test`: run commands (test binaries) inside a qemu VM booted on
//! Debian 12's 6.1 cloud kernel, the oldest kernel the datapath supports.
//!
//! The guest sees the host's whole root filesystem (virtiofs, read-only, under a
//! tmpfs overlay so it is writable), so host-built binaries, their libraries, `ip`,
//! `nginx` and the repo all sit at the same paths as on the host. Always TCG: the
//! nested KVM on our CI machines runs guests far slower than plain emulation.

mod console;
mod debug_exit;
pub mod image;
mod initramfs;
mod kernel;
mod libtest;
mod script;

use std::{
    fs,
    io::{BufRead, BufReader, Read},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure, Context, Result};
use console::{follow_console, label, Progress};
pub use kernel::{ensure_kernel, KernelFiles};
use script::{command_limit, run_script};

/// Debian packages the host needs: qemu, virtiofsd (shipped in qemu-system-common
/// on Debian 12) and a static busybox for the initramfs. The kernel itself is fetched
/// by [`ensure_kernel`] with `apt-get download`, not installed.
pub const HOST_PACKAGES: &[&str] = &["qemu-system-x86", "qemu-system-common", "busybox-static"];

/// Modules the guest loads (with their dependencies): virtio-pci and virtiofs for the
/// host root, overlay to make it writable, and what the datapath and its tests use.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtiofs",
    "overlay",
    "veth",
    "sch_ingress",
    "cls_bpf",
    "act_bpf",
    // For the loss-and-reordering test, which the host kernel cannot run.
    "sch_netem",
];

/// Second bpffs inside the guest, exported as `RAMPART_BPFFS`: `ip netns exec`
/// remounts /sys and so hides /sys/fs/bpf.
pub const GUEST_BPFFS: &str = "/run/rampart-bpffs";

/// virtiofs tag of the host root; must match init.sh.
const FS_TAG: &str = "hostroot";

/// virtiofsd as shipped in Debian 12's qemu-system-common (the C implementation;
/// later Debian releases ship the Rust one, with other flags, in its own package).
const VIRTIOFSD: &str = "/usr/lib/qemu/virtiofsd";

/// Guest status written to isa-debug-exit; qemu then exits with `(v << 1) | 1`.
/// Zero is not used: its exit code 1 is also what qemu returns on its own errors.
/// Keep in sync with init.sh.
const PASSED: i32 = 1;
const COMMAND_FAILED: i32 = 2;
const SETUP_FAILED: i32 = 3;

/// Prefix of the lines run.sh/init.sh print for the host to follow progress.
const MARK: &str = "@@rampart-vm: ";
/// Prefix, followed by the lane number and a space, of every console line a lane prints
/// when several run side by side.
const LANE_MARK: &str = "@@lane";
/// Where init.sh puts run.sh in the guest (a tmpfs): the lanes' results go there too.
const GUEST_RUN_DIR: &str = "/run/rampart-vm";

/// What to run in the VM.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Commands run in order, each as argv (no shell), stopping at the first failure
    /// unless `keep_going`.
    pub commands: Vec<Vec<String>>,
    /// Extra environment for every command (after the defaults: host PATH and HOME,
    /// `RAMPART_BPFFS`, `RAMPART_IN_VM=1`).
    pub env: Vec<(String, String)>,
    /// Whole run, boot included; qemu is killed when it expires.
    pub timeout: Duration,
    /// Where the unpacked kernel is cached.
    pub cache_dir: PathBuf,
    /// Working directory of the commands; the same path as on the host.
    pub workdir: PathBuf,
    /// Run the remaining commands after one fails (the run still fails).
    pub keep_going: bool,
    /// Each command is killed after this long, so one hung test leaves time for the
    /// others (and the report names it); `None` leaves only `timeout`.
    pub command_timeout: Option<Duration>,
    /// Per-command timeouts by index, overriding `command_timeout` where `Some`.
    pub command_timeouts: Vec<Option<Duration>>,
    /// Names for the commands in progress lines and the report, by index; commands
    /// without one are named after their program and arguments.
    pub labels: Vec<String>,
    /// Lane of each command, by index (missing: lane 0). Lanes run side by side (the
    /// guest has two vCPUs and qemu runs them on two host threads), each its commands
    /// in order; their console lines carry the lane so progress is followed per lane.
    pub lanes: Vec<usize>,
    /// Boot this Debian system image (see `image`) with systemd instead of the host's
    /// root: the commands run from its `rampart-vm.service`, on a per-run overlay that
    /// survives the guest's reboots.
    pub system_image: Option<PathBuf>,
}

impl VmOptions {
    /// Defaults for a workspace at `workspace_root`: cache in `target/vm-cache`, run
    /// from the workspace root, 10 minute timeout, stop at the first failure.
    pub fn new(workspace_root: &Path, commands: Vec<Vec<String>>) -> Self {
        Self {
            commands,
            env: Vec::new(),
            timeout: Duration::from_secs(600),
            cache_dir: workspace_root.join("target/vm-cache"),
            workdir: workspace_root.to_path_buf(),
            keep_going: false,
            command_timeout: None,
            command_timeouts: Vec::new(),
            labels: Vec::new(),
            lanes: Vec::new(),
            system_image: None,
        }
    }
}

/// A VM run that passed.
#[derive(Debug)]
pub struct Report {
    /// Boot time, until the guest's init was ready.
    pub booted: Option<Duration>,
    /// Per group of commands (a test target): commands, failures, summed time.
    pub groups: Vec<String>,
}

/// Boots the VM, runs `opts.commands` in it while streaming the guest console to
/// stdout, and fails if any command failed, the guest could not set up, or the run
/// timed out; the error then names what failed, what was running and what never ran.
pub fn run(opts: VmOptions) -> Result<Report> {
    let started = Instant::now();
    ensure!(!opts.commands.is_empty(), "no commands to run in the VM");
    ensure!(
        opts.workdir.is_absolute(),
        "workdir {} must be absolute: the guest resolves it against the host root",
        opts.workdir.display()
    );
    // virtiofsd must read the whole host root as any user, and the guest runs the
    // commands as root anyway.
    let uid = fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX);
    ensure!(
        uid == 0,
        "vm-test must run as root (virtiofsd shares the host's /)"
    );
    let qemu = which("qemu-system-x86_64")
        .context("qemu-system-x86_64 not found; install vm::HOST_PACKAGES")?;
    ensure!(
        Path::new(VIRTIOFSD).exists(),
        "{VIRTIOFSD} not found; install vm::HOST_PACKAGES"
    );

    let kernel = ensure_kernel(&opts.cache_dir)?;
    println!("[vm] booting Linux {} (TCG)", kernel.release);
    let modules = kernel::modules_in_load_order(&kernel, GUEST_MODULES)?;
    let initramfs = initramfs::build(&modules, &run_script(&opts)?)?;

    let dir = RunDir::create()?;
    let initrd = dir.0.join("initramfs.cpio");
    fs::write(&initrd, initramfs).with_context(|| format!("writing {}", initrd.display()))?;
    let socket = dir.0.join("virtiofs.sock");
    let disk = match &opts.system_image {
        Some(base) => Some(image::overlay(base, &dir.0)?),
        None => None,
    };
    let fsd_log = dir.0.join("virtiofsd.log");

    // cache=always: each run is a fresh VM and the host tree does not change under a
    // test run, so the guest may cache everything; exec-heavy commands (ip, tc,
    // dynamic linking through FUSE) run about four times faster than with `auto`.
    let fsd = Command::new(VIRTIOFSD)
        .arg(format!("--socket-path={}", socket.display()))
        .args([
            "-o",
            "source=/",
            "-o",
            "cache=always",
            "-o",
            "log_level=warn",
            // The namespace sandbox's pivot_root fails when the shared dir is the
            // host's own root; we share everything anyway, so chroot loses nothing.
            "-o",
            "sandbox=chroot",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&fsd_log)?)
        .spawn()
        .with_context(|| format!("starting {VIRTIOFSD}"))?;
    let mut fsd = Reaped(fsd);
    wait_for_socket(&socket, &mut fsd.0, &fsd_log)?;

    let mut qemu = Reaped(
        Command::new(qemu)
            .args(qemu_args(
                &kernel,
                &initrd,
                &socket,
                disk.as_deref(),
                &opts.workdir,
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting qemu")?,
    );
    let labels: Vec<String> = (0..opts.commands.len())
        .map(|i| {
            opts.labels
                .get(i)
                .cloned()
                .unwrap_or_else(|| label(&opts.commands[i]))
        })
        .collect();
    let progress = Arc::new(Mutex::new(Progress::default()));
    let console = {
        let out = qemu.0.stdout.take().expect("piped");
        let progress = Arc::clone(&progress);
        let labels = labels.clone();
        thread::spawn(move || follow_console(out, started, &labels, &progress))
    };
    let stderr = {
        let err = qemu.0.stderr.take().expect("piped");
        thread::spawn(move || prefix_lines(err, "[qemu] "))
    };

    let status = wait_with_deadline(&mut qemu.0, started + opts.timeout)?;
    let _ = console.join();
    let _ = stderr.join();
    let progress = progress.lock().expect("console thread panicked").clone();
    let limits: Vec<Option<Duration>> =
        (0..labels.len()).map(|i| command_limit(&opts, i)).collect();
    let groups = progress.groups(&labels);
    // Failures carry the per-group times too: a caller's summary shows them either way.
    let describe = || {
        format!(
            "{}\n  times: {}",
            progress.describe(&labels, &limits),
            groups.join("; ")
        )
    };
    print!("{}", progress.table(&labels));
    let Some(status) = status else {
        bail!(
            "VM timed out after {:?}; qemu killed\n  {}",
            opts.timeout,
            describe()
        );
    };
    println!("[vm] finished in {:.1}s", started.elapsed().as_secs_f64());
    match guest_status(status) {
        Some(PASSED) => Ok(Report {
            booted: progress.booted,
            groups,
        }),
        Some(COMMAND_FAILED) => bail!("in the VM:\n  {}", describe()),
        Some(SETUP_FAILED) => bail!("VM guest setup failed (see the init: line above)"),
        _ => {
            let log = fs::read_to_string(&fsd_log).unwrap_or_default();
            bail!(
                "VM ended without reporting a result ({status}; kernel panic or qemu error?)\n  \
                 {}{}",
                describe(),
                if log.is_empty() {
                    String::new()
                } else {
                    format!("\nvirtiofsd log:\n{log}")
                }
            )
        }
    }
}

fn qemu_args(
    kernel: &KernelFiles,
    initrd: &Path,
    socket: &Path,
    disk: Option<&Path>,
    workdir: &Path,
) -> Vec<String> {
    const MEM: &str = "4G";
    let mut append = vec![
        "console=ttyS0".to_owned(),
        "quiet".to_owned(),
        // Guest page-table isolation and friends cost a lot under TCG and do not change
        // what a root BPF loader sees.
        "mitigations=off".to_owned(),
        "random.trust_cpu=on".to_owned(),
    ];
    match disk {
        // The system reboots for real (the test of what survives a reboot): a panic
        // must not look like one, so it stops the guest until the run's timeout.
        Some(_) => append.extend([
            "panic=0".to_owned(),
            "rampart.root=disk".to_owned(),
            format!("rampart.workdir={}", workdir.display()),
            "systemd.show_status=error".to_owned(),
        ]),
        None => append.push("panic=-1".to_owned()),
    }
    let append = append.join(" ");
    let mut args: Vec<String> = [
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-smp",
        "2",
        "-m",
        MEM,
        // vhost-user needs guest RAM the daemon can map.
        "-object",
        &format!("memory-backend-memfd,id=mem,size={MEM},share=on"),
        "-numa",
        "node,memdev=mem",
        "-chardev",
        &format!("socket,id=fs0,path={}", socket.display()),
        "-device",
        &format!("vhost-user-fs-pci,chardev=fs0,tag={FS_TAG}"),
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-chardev",
        "stdio,id=console,signal=off",
        "-serial",
        "chardev:console",
        "-kernel",
        &kernel.vmlinuz.to_string_lossy(),
        "-initrd",
        &initrd.to_string_lossy(),
        "-append",
        &append,
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    match disk {
        Some(disk) => args.extend([
            "-drive".to_owned(),
            format!("file={},if=virtio,format=qcow2", disk.display()),
        ]),
        // A guest reboot (a panic included) ends qemu.
        None => args.push("-no-reboot".to_owned()),
    }
    args
}

fn prefix_lines(input: impl Read, prefix: &str) {
    for line in BufReader::new(input).lines() {
        let Ok(line) = line else { return };
        eprintln!("{prefix}{line}");
    }
}

/// Waits for qemu; `None` if the deadline passed (qemu is then killed).
fn wait_with_deadline(child: &mut Child, deadline: Instant) -> Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Decodes isa-debug-exit's `(v << 1) | 1`; other exits (0 after a panic reboot,
/// signals) carry no guest status.
fn guest_status(status: ExitStatus) -> Option<i32> {
    let code = status.code()?;
    (code & 1 == 1 && code > 1).then_some(code >> 1)
}

fn wait_for_socket(socket: &Path, fsd: &mut Child, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if let Some(status) = fsd.try_wait()? {
            let log = fs::read_to_string(log).unwrap_or_default();
            bail!("virtiofsd exited ({status}) before listening:\n{log}");
        }
        ensure!(
            Instant::now() < deadline,
            "virtiofsd did not create {}",
            socket.display()
        );
        thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}

/// A child that is killed when dropped, so an early `?` never leaves qemu or
/// virtiofsd running.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Per-run scratch directory (initramfs, vhost-user socket, logs), removed on drop.
struct RunDir(PathBuf);

impl RunDir {
    fn create() -> Result<Self> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let dir = std::env::temp_dir().join(format!("rampart-vm-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_exit_codes_decode() {
        use std::os::unix::process::ExitStatusExt;
        let exit = |code: i32| ExitStatus::from_raw(code << 8);
        assert_eq!(guest_status(exit(3)), Some(PASSED));
        assert_eq!(guest_status(exit(5)), Some(COMMAND_FAILED));
        assert_eq!(guest_status(exit(7)), Some(SETUP_FAILED));
        // A panic reboot (0) and qemu's own errors (1) are not guest results.
        assert_eq!(guest_status(exit(0)), None);
        assert_eq!(guest_status(exit(1)), None);
    }
}
