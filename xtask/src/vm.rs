//! `cargo xtask vm-test`: run commands (test binaries) inside a qemu VM booted on
//! Debian 12's 6.1 cloud kernel, the oldest kernel the datapath supports.
//!
//! The guest sees the host's whole root filesystem (virtiofs, read-only, under a
//! tmpfs overlay so it is writable), so host-built binaries, their libraries, `ip`,
//! `nginx` and the repo all sit at the same paths as on the host. Always TCG: the
//! nested KVM on our CI machines runs guests far slower than plain emulation.

mod debug_exit;
pub mod image;
mod initramfs;
mod kernel;
mod libtest;

use std::{
    fmt::Write as _,
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
pub use kernel::{ensure_kernel, KernelFiles};

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

/// The script init.sh runs chrooted into the host root.
fn run_script(opts: &VmOptions) -> Result<String> {
    let mut env = vec![
        (
            "PATH".to_owned(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".to_owned()),
        ),
        (
            "HOME".to_owned(),
            std::env::var("HOME").unwrap_or_else(|_| "/root".to_owned()),
        ),
        ("TERM".to_owned(), "dumb".to_owned()),
        ("RAMPART_BPFFS".to_owned(), GUEST_BPFFS.to_owned()),
        ("RAMPART_IN_VM".to_owned(), "1".to_owned()),
    ];
    env.extend(opts.env.iter().cloned());

    let mut s = String::from("# Generated by xtask vm for one run.\n");
    for (key, value) in &env {
        let valid = key
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        ensure!(valid, "invalid environment variable name {key:?}");
        writeln!(s, "export {key}={}", quote(value))?;
    }
    writeln!(s, "cd {} || exit 1", quote(&opts.workdir.to_string_lossy()))?;
    writeln!(s, "mkdir -p {}", quote(GUEST_RUN_DIR))?;
    let lanes = opts.lanes.iter().copied().max().unwrap_or(0) + 1;
    for lane in 0..lanes {
        // Each lane is a function that leaves its result in a file: with several lanes
        // it runs in a pipeline (for the lane prefix), whose status dash cannot pass on.
        let status = quote(&format!("{GUEST_RUN_DIR}/lane{lane}.rc"));
        writeln!(s, "lane{lane}() {{")?;
        writeln!(s, "failed=0")?;
        for (i, argv) in opts.commands.iter().enumerate() {
            if opts.lanes.get(i).copied().unwrap_or(0) != lane {
                continue;
            }
            ensure!(!argv.is_empty(), "command {} is empty", i + 1);
            let mut line: Vec<String> = argv.iter().map(|a| quote(a)).collect();
            if let Some(limit) = command_limit(opts, i) {
                // coreutils timeout from the host root; KILL follows TERM for a test that
                // ignores it. Exit 124 (or 137) tells the host it was a timeout.
                let wrap = format!("timeout -k 10 {}", limit.as_secs().max(1));
                line.insert(0, wrap);
            }
            let line = line.join(" ");
            writeln!(s, "echo {}", quote(&format!("{MARK}start {i}")))?;
            writeln!(s, "{line}")?;
            writeln!(s, "rc=$?")?;
            writeln!(s, "echo \"{MARK}exit {i} $rc\"")?;
            if opts.keep_going {
                writeln!(s, "[ $rc -eq 0 ] || failed=1")?;
            } else {
                writeln!(s, "[ $rc -eq 0 ] || {{ echo 1 > {status}; return 1; }}")?;
            }
        }
        writeln!(s, "echo $failed > {status}")?;
        writeln!(s, "}}")?;
    }
    if lanes == 1 {
        writeln!(s, "lane0")?;
    } else {
        for lane in 0..lanes {
            // sed -u: a line as soon as it is complete, so the lanes interleave by line.
            writeln!(s, "lane{lane} 2>&1 | sed -u 's/^/{LANE_MARK}{lane} /' &")?;
        }
        // Not `wait`: a process a test leaves behind (killed at its timeout, its
        // daemon not) would hold a lane's pipe open, and sed with it, until the VM's
        // own limit. A lane is done when its result file is there.
        for lane in 0..lanes {
            let status = quote(&format!("{GUEST_RUN_DIR}/lane{lane}.rc"));
            writeln!(s, "until [ -f {status} ]; do sleep 1; done")?;
        }
        // Time for sed to pass on the lanes' last lines.
        writeln!(s, "sleep 1")?;
    }
    writeln!(s, "failed=0")?;
    for lane in 0..lanes {
        let status = quote(&format!("{GUEST_RUN_DIR}/lane{lane}.rc"));
        writeln!(s, "[ \"$(cat {status} 2>/dev/null)\" = 0 ] || failed=1")?;
    }
    writeln!(s, "exit $failed")?;
    Ok(s)
}

/// The timeout of command `i`: its own, else the common one.
fn command_limit(opts: &VmOptions, i: usize) -> Option<Duration> {
    opts.command_timeouts
        .get(i)
        .copied()
        .flatten()
        .or(opts.command_timeout)
}

/// Single-quotes `s` for sh.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// What the host learned from the guest console.
#[derive(Debug, Default, Clone)]
struct Progress {
    booted: Option<Duration>,
    /// Per lane: the command it runs now and that command's libtest output.
    lanes: Vec<Lane>,
    finished: Vec<Finished>,
}

/// One lane's command in progress.
#[derive(Debug, Default, Clone)]
struct Lane {
    running: Option<usize>,
    started: Option<Instant>,
    tests: libtest::Tracker,
}

/// A command that ran to its end (or its timeout).
#[derive(Debug, Clone)]
struct Finished {
    index: usize,
    status: i32,
    took: Duration,
    tests: libtest::Tracker,
}

/// Exit statuses of coreutils `timeout`: after TERM, and after the KILL that follows.
const TIMED_OUT: [i32; 2] = [124, 137];

impl Progress {
    fn lane(&mut self, lane: usize) -> &mut Lane {
        if self.lanes.len() <= lane {
            self.lanes.resize_with(lane + 1, Lane::default);
        }
        &mut self.lanes[lane]
    }

    /// One paragraph per failed command (how it ended, each failing test with its
    /// panic), then the commands still running when the run ended and those that never
    /// started. `limits` are the per-command timeouts.
    fn describe(&self, labels: &[String], limits: &[Option<Duration>]) -> String {
        let mut out = Vec::new();
        for f in self.finished.iter().filter(|f| f.status != 0) {
            let name = &labels[f.index];
            let limit = limits.get(f.index).copied().flatten();
            let mut text = match (TIMED_OUT.contains(&f.status), limit) {
                (true, Some(limit)) => format!("{name} timed out after {}s", limit.as_secs()),
                _ => format!("{name} exited with {}", f.status),
            };
            if let Some(test) = f.tests.running() {
                let _ = write!(text, " while running test {test}");
            }
            let failures = f.tests.failures();
            if !failures.is_empty() {
                let _ = write!(text, "; {} test(s) failed:", failures.len());
            }
            for failure in failures {
                let _ = write!(text, "\n    {failure}");
            }
            out.push(text);
        }
        if self.booted.is_none() {
            out.push("stopped before the guest finished booting".to_owned());
        }
        for lane in &self.lanes {
            let Some(i) = lane.running else { continue };
            let mut text = format!("stopped while running {}", labels[i]);
            if let Some(test) = lane.tests.running() {
                let _ = write!(text, " (test {test})");
            }
            out.push(text);
        }
        let not_run: Vec<&str> = (0..labels.len())
            .filter(|i| {
                !self.finished.iter().any(|f| f.index == *i)
                    && !self.lanes.iter().any(|l| l.running == Some(*i))
            })
            .map(|i| labels[i].as_str())
            .collect();
        if !not_run.is_empty() {
            out.push(format!(
                "{} of {} command(s) did not run: {}",
                not_run.len(),
                labels.len(),
                not_run.join(", ")
            ));
        }
        out.join("\n  ")
    }

    /// Per finished command `status  seconds  label`, then `groups`.
    fn table(&self, labels: &[String]) -> String {
        let mut out = String::new();
        for f in &self.finished {
            let verdict = if f.status == 0 { "passed" } else { "FAILED" };
            let _ = writeln!(
                out,
                "[vm]   {verdict:6}  {:6.1}s  {}",
                f.took.as_secs_f64(),
                labels[f.index]
            );
        }
        for line in self.groups(labels) {
            let _ = writeln!(out, "[vm] {line}");
        }
        out
    }

    /// Per group of commands (the label up to `::`, e.g. a test target), its command
    /// count, failures and summed time.
    fn groups(&self, labels: &[String]) -> Vec<String> {
        let mut groups: Vec<(&str, Duration, usize, usize)> = Vec::new();
        for f in &self.finished {
            let label = labels[f.index].as_str();
            let group = label.split_once("::").map_or(label, |(g, _)| g);
            let at = match groups.iter().position(|g| g.0 == group) {
                Some(at) => at,
                None => {
                    groups.push((group, Duration::ZERO, 0, 0));
                    groups.len() - 1
                }
            };
            groups[at].1 += f.took;
            groups[at].2 += 1;
            groups[at].3 += usize::from(f.status != 0);
        }
        groups
            .into_iter()
            .map(|(group, took, count, failed)| {
                format!(
                    "{group}: {count} command(s), {failed} failed, {:.1}s",
                    took.as_secs_f64()
                )
            })
            .collect()
    }
}

/// A short name for a command: the program's file name without cargo's `-<hash>`
/// suffix (so `target/debug/deps/attach-0123456789abcdef` reads `attach`), then the
/// arguments.
fn label(argv: &[String]) -> String {
    let Some((program, args)) = argv.split_first() else {
        return String::new();
    };
    let name = Path::new(program)
        .file_name()
        .map_or_else(|| program.clone(), |n| n.to_string_lossy().into_owned());
    let name = match name.rsplit_once('-') {
        Some((stem, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            stem.to_owned()
        }
        _ => name,
    };
    std::iter::once(name)
        .chain(args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn follow_console(out: impl Read, started: Instant, labels: &[String], progress: &Mutex<Progress>) {
    let mut out = BufReader::new(out);
    let mut line = Vec::new();
    loop {
        line.clear();
        match out.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        let (lane, text) = split_lane(text.trim_end_matches(['\r', '\n']));
        // A mark may follow output that did not end its line (a test killed by its
        // timeout after `test x ... `).
        let (before, mark) = match text.find(MARK) {
            Some(at) => (&text[..at], Some(&text[at + MARK.len()..])),
            None => (text, None),
        };
        let mut p = progress.lock().expect("lock");
        if mark.is_none() || !before.is_empty() {
            // Blank lines (libtest puts several around each binary's run) only
            // stretch the log; the tracker still needs them to end a message.
            if !before.trim().is_empty() {
                match lane {
                    Some(lane) => println!("[vm {lane}] {before}"),
                    None => println!("[vm] {before}"),
                }
            }
            let l = p.lane(lane.unwrap_or(0));
            if l.running.is_some() {
                l.tests.line(before);
            }
        }
        let Some(mark) = mark else { continue };
        let mut words = mark.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("ready"), _, _) => {
                let boot = started.elapsed();
                p.booted = Some(boot);
                println!("[vm] guest ready after {:.1}s", boot.as_secs_f64());
            }
            (Some("start"), Some(i), _) => {
                let index = i.parse().ok();
                if let Some(label) = index.and_then(|i: usize| labels.get(i)) {
                    println!("[vm] running {label}");
                }
                *p.lane(lane.unwrap_or(0)) = Lane {
                    running: index,
                    started: Some(Instant::now()),
                    tests: libtest::Tracker::default(),
                };
            }
            (Some("exit"), Some(i), Some(rc)) => {
                if let (Ok(index), Ok(status)) = (i.parse::<usize>(), rc.parse()) {
                    let l = std::mem::take(p.lane(lane.unwrap_or(0)));
                    let finished = Finished {
                        index,
                        status,
                        took: l.started.map_or(Duration::ZERO, |s| s.elapsed()),
                        tests: l.tests,
                    };
                    let verdict = if status == 0 {
                        "passed".to_owned()
                    } else {
                        format!("FAILED ({status})")
                    };
                    println!(
                        "[vm] {} {verdict} in {:.1}s",
                        labels.get(index).map_or("?", String::as_str),
                        finished.took.as_secs_f64()
                    );
                    p.finished.push(finished);
                }
            }
            _ => println!("[vm] {mark}"),
        }
    }
}

/// The lane a console line came from (see `LANE_MARK`) and the line without the
/// prefix; `None` for lines of init, the kernel or a single-lane run.
fn split_lane(text: &str) -> (Option<usize>, &str) {
    text.strip_prefix(LANE_MARK)
        .and_then(|rest| rest.split_once(' '))
        .and_then(|(n, rest)| Some((Some(n.parse().ok()?), rest)))
        .unwrap_or((None, text))
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
    fn quote_survives_single_quotes() {
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote(""), "''");
    }

    #[test]
    fn script_stops_at_first_failure_unless_keep_going() {
        let mut opts = VmOptions::new(
            Path::new("/repo"),
            vec![
                vec!["true".into()],
                vec!["sh".into(), "-c".into(), "exit 3".into()],
            ],
        );
        opts.env.push(("RUST_LOG".into(), "debug".into()));
        let script = run_script(&opts).unwrap();
        assert!(script.contains("export RUST_LOG='debug'\n"));
        assert!(script.contains("cd '/repo' || exit 1\n"));
        assert!(script.contains("'sh' '-c' 'exit 3'\n"));
        assert_eq!(script.matches("; return 1; }\n").count(), 2);
        assert!(script.contains("\nlane0\n"), "{script}");

        opts.keep_going = true;
        let script = run_script(&opts).unwrap();
        assert_eq!(script.matches("[ $rc -eq 0 ] || failed=1\n").count(), 2);

        opts.env.push(("BAD NAME".into(), String::new()));
        assert!(run_script(&opts).is_err());
    }

    #[test]
    fn script_wraps_commands_in_their_timeout() {
        let mut opts = VmOptions::new(Path::new("/repo"), vec![vec!["t".into(), "x".into()]]);
        opts.command_timeout = Some(Duration::from_secs(90));
        let script = run_script(&opts).unwrap();
        assert!(script.contains("\ntimeout -k 10 90 't' 'x'\n"), "{script}");
    }

    #[test]
    fn labels_drop_cargo_hashes() {
        let argv = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            label(&argv(&[
                "/t/debug/deps/attach-0123456789abcdef",
                "--exact",
                "x"
            ])),
            "attach --exact x"
        );
        assert_eq!(label(&argv(&["/usr/bin/run-parts"])), "run-parts");
    }

    #[test]
    fn report_names_failed_tests_and_the_hung_one() {
        let labels = vec!["datapath::a".to_owned(), "datapath::b".to_owned()];
        let mut progress = Progress::default();
        let mut tests = libtest::Tracker::default();
        for line in [
            "test a ... FAILED",
            "---- a stdout ----",
            "thread 'a' panicked at tests/tests/datapath.rs:1:2:",
            "wrong verdict",
            "",
        ] {
            tests.line(line);
        }
        progress.finished.push(Finished {
            index: 0,
            status: 101,
            took: Duration::from_secs(3),
            tests,
        });
        let mut tests = libtest::Tracker::default();
        tests.line("test b ... ");
        progress.finished.push(Finished {
            index: 1,
            status: 124,
            took: Duration::from_secs(60),
            tests,
        });
        progress.booted = Some(Duration::from_secs(5));
        let text = progress.describe(&labels, &[None, Some(Duration::from_secs(60))]);
        assert!(text.contains("datapath::a exited with 101"), "{text}");
        assert!(
            text.contains("a panicked at tests/tests/datapath.rs:1:2\n      wrong verdict"),
            "{text}"
        );
        assert!(
            text.contains("datapath::b timed out after 60s while running test b"),
            "{text}"
        );
        let table = progress.table(&labels);
        assert!(
            table.contains("datapath: 2 command(s), 2 failed, 63.0s"),
            "{table}"
        );
    }

    #[test]
    fn lanes_run_side_by_side_and_report_through_files() {
        let mut opts = VmOptions::new(
            Path::new("/repo"),
            vec![vec!["a".into()], vec!["b".into()], vec!["c".into()]],
        );
        opts.lanes = vec![0, 1, 0];
        opts.keep_going = true;
        let script = run_script(&opts).unwrap();
        let lane1 = &script[script.find("lane1() {").unwrap()..];
        let lane1 = &lane1[..lane1.find("\n}\n").unwrap()];
        assert!(
            lane1.contains("\n'b'\n") && !lane1.contains("'a'"),
            "{script}"
        );
        assert!(
            script.contains("lane0 2>&1 | sed -u 's/^/@@lane0 /' &\n")
                && script.contains("lane1 2>&1 | sed -u 's/^/@@lane1 /' &\nuntil [ -f '/run/rampart-vm/lane0.rc' ]"),
            "{script}"
        );
        assert!(script
            .contains("[ \"$(cat '/run/rampart-vm/lane1.rc' 2>/dev/null)\" = 0 ] || failed=1\n"));
        assert!(script.ends_with("exit $failed\n"));
    }

    #[test]
    fn console_lines_are_followed_per_lane() {
        let labels: Vec<String> = ["t::a", "t::b", "t::c"].map(String::from).to_vec();
        let progress = Mutex::new(Progress::default());
        let console = [
            "@@rampart-vm: ready",
            "@@lane0 @@rampart-vm: start 0",
            "@@lane1 @@rampart-vm: start 1",
            "@@lane1 test b ... ",
            "@@lane0 test a ... ok",
            "@@lane0 @@rampart-vm: exit 0 0",
        ]
        .join("\n");
        follow_console(console.as_bytes(), Instant::now(), &labels, &progress);
        let p = progress.into_inner().unwrap();
        assert_eq!(p.finished.len(), 1);
        assert_eq!(p.finished[0].index, 0);
        assert_eq!(p.lanes[1].running, Some(1));
        let text = p.describe(&labels, &[None; 3]);
        assert!(
            text.contains("stopped while running t::b (test b)"),
            "{text}"
        );
        assert!(
            text.contains("1 of 3 command(s) did not run: t::c"),
            "{text}"
        );
        assert_eq!(split_lane("@@lane12 x y"), (Some(12), "x y"));
        assert_eq!(split_lane("@@lanex y"), (None, "@@lanex y"));
    }

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
