//! Network namespaces for tests: RAII creation and deletion, commands and in-process
//! threads inside them, veth pairs between them, and clean-up of what aborted runs left.
//!
//! Names are `rmp-<pid>-<seq>-<role>` so parallel runs never clash and `cleanup_stale`
//! can tell which leftovers belong to a dead process.

use std::{
    collections::BTreeSet,
    ffi::{CString, OsStr},
    fs::{self, File},
    io,
    net::{Ipv4Addr, Ipv6Addr},
    os::{
        fd::{AsRawFd, RawFd},
        unix::{fs::MetadataExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Mutex, OnceLock,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

/// Prefix of every namespace (and temp dir) this crate creates.
pub const PREFIX: &str = "rmp-";
const NETNS_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error(
        "network-namespace tests need root (running with euid {euid}); run them as root, e.g. `sudo -E cargo test -p rampart-tests`"
    )]
    NotRoot { euid: u32 },
    #[error("cannot run `{command}` (is iproute2 installed?): {source}")]
    Spawn { command: String, source: io::Error },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("cannot open namespace file {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("setns into namespace {name}: {source}")]
    Setns { name: String, source: io::Error },
    #[error("cannot start a thread for namespace {name}: {source}")]
    Thread { name: String, source: io::Error },
    #[error("thread inside namespace {name} panicked")]
    ThreadPanicked { name: String },
    #[error("interface {ifname} not found in namespace {ns}")]
    NoSuchInterface { ns: String, ifname: String },
    #[error("invalid interface name {ifname:?}")]
    BadInterfaceName { ifname: String },
}

/// Fails with a clear message instead of letting `ip` print a cryptic one.
pub fn require_root() -> Result<(), NetnsError> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(NetnsError::NotRoot { euid });
    }
    Ok(())
}

/// Names of namespaces alive in this process, for the SIGINT handler, which cannot run
/// destructors.
fn registry() -> &'static Mutex<BTreeSet<String>> {
    static REGISTRY: OnceLock<Mutex<BTreeSet<String>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// Temp dirs (nginx prefixes) to remove on SIGINT.
fn dir_registry() -> &'static Mutex<BTreeSet<PathBuf>> {
    static REGISTRY: OnceLock<Mutex<BTreeSet<PathBuf>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

pub(crate) fn register_dir(path: &Path) {
    dir_registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(path.to_owned());
}

pub(crate) fn unregister_dir(path: &Path) {
    dir_registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(path);
}

/// Runs a command to completion and turns a non-zero exit into an error with its stderr.
pub(crate) fn run_checked(cmd: &mut Command) -> Result<Output, NetnsError> {
    let command = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetnsError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetnsError::Command {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}

/// Program and arguments as one string for error messages. Callers never put secrets on
/// a command line (tokens travel in files), so this is safe to show.
pub(crate) fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

fn ip(args: &[&str]) -> Result<Output, NetnsError> {
    run_checked(Command::new("ip").args(args))
}

/// A named network namespace (`/run/netns/<name>`), deleted with everything running in it
/// on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// Held open so `command`/`run` can setns without reopening, and so the namespace
    /// identity is fixed even if someone else recreates the name.
    file: File,
}

impl Netns {
    /// Creates `rmp-<pid>-<seq>-<role>` with `lo` up.
    pub fn new(role: &str) -> Result<Self, NetnsError> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        require_root()?;
        let name = format!(
            "{PREFIX}{}-{}-{role}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        registry()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.clone());
        let path = Path::new(NETNS_DIR).join(&name);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(source) => {
                delete_namespace(&name);
                return Err(NetnsError::Open { path, source });
            }
        };
        let ns = Self { name, file };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, for tools that take a namespace path.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// `ip -n <name> <args…>`, checked.
    pub fn ip(&self, args: &[&str]) -> Result<Output, NetnsError> {
        run_checked(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A `Command` whose child enters this namespace before exec (what `ip netns exec`
    /// does, minus its private mount namespace, which none of our tools need).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        let fd = self.file.as_raw_fd();
        // SAFETY: the closure only calls setns, which is async-signal-safe; `fd` stays open
        // in the child because it is inherited until exec (CLOEXEC closes it only then).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Runs `args[0] args[1..]` inside the namespace to completion; non-zero exit is an error.
    pub fn exec(&self, args: &[&str]) -> Result<Output, NetnsError> {
        let (program, rest) = args.split_first().expect("exec needs a program");
        run_checked(self.command(program).args(rest))
    }

    /// Starts a thread that enters this namespace before running `f`: sockets it creates
    /// (and threads it spawns) live in the namespace. Join it before the namespace is
    /// dropped, or the kernel keeps the namespace alive until the thread ends.
    pub fn spawn_thread<R, F>(&self, thread_name: &str, f: F) -> Result<NsThread<R>, NetnsError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let fd = dup_fd(&self.file, &self.name)?;
        let name = self.name.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = thread::Builder::new()
            .name(thread_name.to_owned())
            .spawn(move || {
                let entered = enter(fd.as_raw_fd(), &name);
                drop(fd);
                let ok = entered.is_ok();
                let _ = tx.send(entered);
                // Never run `f` in the wrong namespace; the caller already got the error.
                ok.then(f)
            })
            .map_err(|source| NetnsError::Thread {
                name: self.name.clone(),
                source,
            })?;
        match rx.recv() {
            Ok(Ok(())) => Ok(NsThread { handle }),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(e)
            }
            Err(_) => Err(NetnsError::ThreadPanicked {
                name: self.name.clone(),
            }),
        }
    }

    /// Runs `f` on a short-lived thread inside the namespace and returns its result, e.g.
    /// to attach an XDP program by interface name or to open a socket there.
    pub fn run<R, F>(&self, f: F) -> Result<R, NetnsError>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        thread::scope(|s| {
            let handle = s.spawn(|| -> Result<R, NetnsError> {
                enter(self.file.as_raw_fd(), &self.name)?;
                Ok(f())
            });
            handle.join().map_err(|_| NetnsError::ThreadPanicked {
                name: self.name.clone(),
            })?
        })
    }

    /// Interface index of `ifname` inside this namespace.
    pub fn ifindex(&self, ifname: &str) -> Result<u32, NetnsError> {
        let c = CString::new(ifname).map_err(|_| NetnsError::BadInterfaceName {
            ifname: ifname.to_owned(),
        })?;
        // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
        let idx = self.run(|| unsafe { libc::if_nametoindex(c.as_ptr()) })?;
        if idx == 0 {
            return Err(NetnsError::NoSuchInterface {
                ns: self.name.clone(),
                ifname: ifname.to_owned(),
            });
        }
        Ok(idx)
    }

    /// Pids of processes whose network namespace is this one (what `ip netns pids` shows).
    pub fn pids(&self) -> Vec<i32> {
        match self.file.metadata() {
            Ok(meta) => pids_in_netns(meta.ino()),
            Err(_) => Vec::new(),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        kill_pids(&self.pids());
        delete_namespace(&self.name);
    }
}

/// A thread running inside a namespace (see [`Netns::spawn_thread`]).
#[derive(Debug)]
pub struct NsThread<R> {
    handle: JoinHandle<Option<R>>,
}

impl<R> NsThread<R> {
    /// Waits for the thread; `Err` carries its panic payload like `JoinHandle::join`.
    pub fn join(self) -> thread::Result<R> {
        self.handle
            .join()
            .map(|r| r.expect("spawn_thread only returns threads that entered the namespace"))
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

fn dup_fd(file: &File, name: &str) -> Result<File, NetnsError> {
    file.try_clone().map_err(|source| NetnsError::Open {
        path: Path::new(NETNS_DIR).join(name),
        source,
    })
}

fn enter(fd: RawFd, name: &str) -> Result<(), NetnsError> {
    // SAFETY: fd is an open nsfs file; setns(CLONE_NEWNET) only affects this thread.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
        return Err(NetnsError::Setns {
            name: name.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Scans /proc for processes in the namespace with inode `ino`, never including ourselves
/// (our threads may be inside, the process must survive).
fn pids_in_netns(ino: u64) -> Vec<i32> {
    let me = std::process::id() as i32;
    let want = format!("net:[{ino}]");
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            fs::read_link(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|l| l.as_os_str() == OsStr::new(&want))
        })
        .collect()
}

/// SIGTERM, a short grace period, then SIGKILL: nginx exits quickly on TERM, stragglers
/// (curl, wrk) do not get to delay the test.
fn kill_pids(pids: &[i32]) {
    if pids.is_empty() {
        return;
    }
    for &pid in pids {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline && pids.iter().any(|&pid| alive(pid)) {
        thread::sleep(Duration::from_millis(10));
    }
    for &pid in pids {
        if alive(pid) {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Alive and not a zombie (a zombie child of ours still answers kill(pid, 0)).
fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn delete_namespace(name: &str) {
    // Errors are ignored: this runs in Drop and in clean-up paths where the namespace
    // may already be gone; the test asserting clean-up checks /run/netns itself.
    let _ = Command::new("ip")
        .args(["netns", "delete", name])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(name);
}

/// `rmp-*` namespaces currently present (from any process).
pub fn list_ours() -> Vec<String> {
    let Ok(entries) = fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(PREFIX))
        .collect();
    names.sort();
    names
}

/// Owner pid encoded in an `rmp-<pid>-…` name.
fn owner_pid(name: &str) -> Option<i32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Removes `rmp-*` namespaces (killing what runs in them) and `rmp-*` temp dirs whose
/// creating process is dead. Returns the namespaces removed.
pub fn cleanup_stale() -> Vec<String> {
    let mut removed = Vec::new();
    for name in list_ours() {
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if alive(pid) {
            continue;
        }
        if let Ok(meta) = fs::metadata(Path::new(NETNS_DIR).join(&name)) {
            kill_pids(&pids_in_netns(meta.ino()));
        }
        delete_namespace(&name);
        removed.push(name);
    }
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(owner_pid) else {
                continue;
            };
            if !alive(pid) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    removed
}

/// Deletes every namespace and temp dir this process still has (no destructors run on
/// SIGINT, so the handler calls this).
pub fn cleanup_registered() {
    let names: Vec<String> = registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .cloned()
        .collect();
    for name in names {
        if let Ok(meta) = fs::metadata(Path::new(NETNS_DIR).join(&name)) {
            kill_pids(&pids_in_netns(meta.ino()));
        }
        delete_namespace(&name);
    }
    let dirs: Vec<PathBuf> = dir_registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .cloned()
        .collect();
    for dir in dirs {
        let _ = fs::remove_dir_all(dir);
    }
}

static SIGINT_PIPE_WRITE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_sigint(_: libc::c_int) {
    let fd = SIGINT_PIPE_WRITE.load(Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: write is async-signal-safe; the buffer is a valid 1-byte static.
        unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) };
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot install the SIGINT clean-up handler: {source}")]
pub struct SigintError {
    source: io::Error,
}

/// Installs a SIGINT/SIGTERM handler that deletes this process's namespaces, kills what
/// runs in them, removes its temp dirs and exits with 130. Idempotent. For demos and
/// manual runs; the test harness itself relies on Drop.
pub fn install_sigint_cleanup() -> Result<(), SigintError> {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    if INSTALLED.get().is_some() {
        return Ok(());
    }
    let mut fds = [0; 2];
    // SAFETY: fds is a valid 2-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(SigintError {
            source: io::Error::last_os_error(),
        });
    }
    let (read_fd, write_fd) = (fds[0], fds[1]);
    SIGINT_PIPE_WRITE.store(write_fd, Ordering::Relaxed);
    // The handler only pokes a pipe; the real work happens on a normal thread where
    // locks and process spawning are allowed.
    thread::Builder::new()
        .name("rmp-sigint".into())
        .spawn(move || {
            let mut b = [0u8; 1];
            // SAFETY: read into a valid 1-byte buffer from our own pipe.
            while unsafe { libc::read(read_fd, b.as_mut_ptr().cast(), 1) } != 1 {}
            eprintln!("rampart-tests: interrupted, cleaning up namespaces");
            cleanup_registered();
            std::process::exit(130);
        })
        .map_err(|source| SigintError { source })?;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction with a valid handler pointer is a valid argument.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigint as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(SigintError {
                source: io::Error::last_os_error(),
            });
        }
    }
    let _ = INSTALLED.set(());
    Ok(())
}

/// Addresses for one veth end. Prefixes are /24 and /64: each pair is its own link.
#[derive(Debug, Clone)]
pub struct VethConfig<'a> {
    pub name: &'a str,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

/// A network interface as seen from inside its namespace (a veth end, or `lo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Namespace name (`/run/netns/<ns>`).
    pub ns: String,
    pub name: String,
    pub ifindex: u32,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

/// A veth pair whose ends live in two namespaces, addressed and up.
#[derive(Debug)]
pub struct VethPair {
    pub a: Interface,
    pub b: Interface,
}

impl VethPair {
    /// Creates the pair directly inside `a_ns` (its peer moved to `b_ns` at creation), so
    /// the interface names never exist in the host namespace and cannot clash with other
    /// runs.
    pub fn create(
        a_ns: &Netns,
        a: VethConfig<'_>,
        b_ns: &Netns,
        b: VethConfig<'_>,
    ) -> Result<Self, NetnsError> {
        a_ns.ip(&[
            "link",
            "add",
            // Explicit `name`: a bare name that abbreviates a keyword ("a" = address)
            // would be misparsed.
            "name",
            a.name,
            "type",
            "veth",
            "peer",
            "name",
            b.name,
            "netns",
            b_ns.name(),
        ])?;
        let a_end = configure_end(a_ns, &a)?;
        let b_end = configure_end(b_ns, &b)?;
        Ok(Self { a: a_end, b: b_end })
    }
}

fn configure_end(ns: &Netns, cfg: &VethConfig<'_>) -> Result<Interface, NetnsError> {
    ns.ip(&["addr", "add", &format!("{}/24", cfg.ipv4), "dev", cfg.name])?;
    // nodad: the address is usable at once instead of after ~1 s of duplicate detection.
    ns.ip(&[
        "addr",
        "add",
        &format!("{}/64", cfg.ipv6),
        "dev",
        cfg.name,
        "nodad",
    ])?;
    ns.ip(&["link", "set", cfg.name, "up"])?;
    Ok(Interface {
        ns: ns.name().to_owned(),
        name: cfg.name.to_owned(),
        ifindex: ns.ifindex(cfg.name)?,
        ipv4: cfg.ipv4,
        ipv6: cfg.ipv6,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_our_names_only() {
        assert_eq!(owner_pid("rmp-1234-0-gw"), Some(1234));
        assert_eq!(owner_pid("rmp-nginx-12"), None);
        assert_eq!(owner_pid("other-1234"), None);
    }
}
