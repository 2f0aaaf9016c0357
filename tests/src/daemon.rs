//! One `rampart run` as a child process, with its configuration file (one template for
//! every test), its log and its CLI: what the gateway topology ([`crate::gateway`]) and the
//! daemon tests (tests/tests/daemon.rs) start, signal, stop and ask.
//!
//! The daemon runs in a network namespace (the one whose interfaces it attaches to); the
//! CLI can run in it too (`rampart detach` finds netlink filters only there) or outside
//! (control socket and pins are files). Tokens never reach a message unredacted: whatever
//! shows a log takes the tokens to hide.

use std::{
    fs, io,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{client::BearerToken, netns::Netns};

/// How long a daemon may take to verify, load and attach (the verifier is slow on a
/// loaded 2-core machine and slower in the VM).
pub const READY_TIMEOUT: Duration = Duration::from_secs(240);
/// How long a signalled daemon may take to exit.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{daemon} exited during start-up ({status}); its log:\n{log}")]
    Exited {
        daemon: &'static str,
        status: ExitStatus,
        log: String,
    },
    #[error("{daemon} did not answer within {waited:?}; its log:\n{log}")]
    NotReady {
        daemon: &'static str,
        waited: Duration,
        log: String,
    },
    #[error("{daemon} did not exit within {waited:?}; its log:\n{log}")]
    NoExit {
        daemon: &'static str,
        waited: Duration,
        log: String,
    },
    #[error("{daemon} is not running")]
    NotRunning { daemon: &'static str },
}

type Result<T, E = DaemonError> = std::result::Result<T, E>;

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

/// What differs between the daemons the tests start; the rest of the file is the same for
/// all of them.
#[derive(Debug, Clone, Copy)]
pub struct ConfigTemplate<'a> {
    /// Holds `state/`, `policy.toml` and `events.jsonl`.
    pub dir: &'a Path,
    pub bpffs_dir: &'a Path,
    pub control_socket: &'a Path,
    pub metrics_port: u16,
    /// More top-level settings, one per line (e.g. `expiry_warning = "1h"`).
    pub extra: &'a str,
    /// The body of the one `[[listener]]` table, one setting per line.
    pub listener: &'a str,
}

impl ConfigTemplate<'_> {
    pub fn text(&self) -> String {
        format!(
            r#"state_dir = "{dir}/state"
bpffs_dir = "{bpffs}"
control_socket = "{socket}"
metrics_addr = "127.0.0.1:{port}"
policy = ["policy.toml"]
{extra}
[maps]
max_tokens = 4096
max_revoked = 4096
token_stats = 4096
ring_bytes = 65536

[events]
export_file = "{dir}/events.jsonl"

[[listener]]
{listener}"#,
            dir = self.dir.display(),
            bpffs = self.bpffs_dir.display(),
            socket = self.control_socket.display(),
            port = self.metrics_port,
            extra = self.extra,
            listener = self.listener,
        )
    }
}

/// Replaces every token in `text` with `<token>` before it can reach a message.
pub fn redact(text: &str, tokens: &[BearerToken]) -> String {
    tokens
        .iter()
        .fold(text.to_owned(), |t, tok| t.replace(tok.expose(), "<token>"))
}

/// One daemon: its files and, while it runs, its process. Dropping it kills the process
/// (pins stay: their owner detaches or unmounts).
#[derive(Debug)]
pub struct DaemonProcess {
    pub name: &'static str,
    rampart: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl DaemonProcess {
    /// A daemon of `rampart` with the configuration file `config`, logging to `log`.
    pub fn new(name: &'static str, rampart: PathBuf, config: PathBuf, log: PathBuf) -> Self {
        DaemonProcess {
            name,
            rampart,
            config,
            log,
            child: None,
        }
    }

    /// Starts `rampart run` in `ns` and waits until it answers `status`.
    pub fn start(&mut self, ns: &Netns, tokens: &[BearerToken]) -> Result<u32> {
        let pid = self.spawn(ns)?;
        self.wait_ready(tokens)?;
        Ok(pid)
    }

    /// Starts `rampart run` in `ns` without waiting; its pid.
    pub fn spawn(&mut self, ns: &Netns) -> Result<u32> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.log)
            .map_err(io_err("opening the daemon log"))?;
        let child = ns
            .command(&self.rampart)
            .arg("--config")
            .arg(&self.config)
            .arg("run")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io_err("daemon log"))?)
            .stderr(log)
            .spawn()
            .map_err(io_err("starting rampart run"))?;
        let pid = child.id();
        self.child = Some(child);
        Ok(pid)
    }

    /// Waits until the daemon answers `status`, or fails with its log if it exits first.
    pub fn wait_ready(&mut self, tokens: &[BearerToken]) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(DaemonError::Exited {
                    daemon: self.name,
                    status,
                    log: self.log_text(tokens),
                });
            }
            if self.cli(None, &["status"])?.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(DaemonError::NotReady {
                    daemon: self.name,
                    waited: READY_TIMEOUT,
                    log: self.log_text(tokens),
                });
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// `rampart --config <config> <args>`, in `ns` if given; exit status not checked.
    pub fn cli(&self, ns: Option<&Netns>, args: &[&str]) -> Result<Output> {
        self.cli_command(ns)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(io_err(format!("running rampart {}", args.join(" "))))
    }

    /// The command `cli` runs, for callers that need its pipes (a token on stdin, a
    /// stream on stdout).
    pub fn cli_command(&self, ns: Option<&Netns>) -> Command {
        let mut cmd = match ns {
            Some(ns) => ns.command(&self.rampart),
            None => Command::new(&self.rampart),
        };
        cmd.arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info");
        cmd
    }

    /// The daemon's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `sig` to the running daemon.
    pub fn signal(&self, sig: libc::c_int) -> Result<()> {
        let pid = self
            .pid()
            .ok_or(DaemonError::NotRunning { daemon: self.name })?;
        // SAFETY: kill(2) on our own child; no memory is involved.
        if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0 {
            return Err(DaemonError::Io {
                what: format!("kill({pid}, {sig})"),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Waits for the signalled daemon to exit (at most [`EXIT_TIMEOUT`]) and reaps it.
    pub fn wait_exit(&mut self, tokens: &[BearerToken]) -> Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .ok_or(DaemonError::NotRunning { daemon: self.name })?;
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(st) = child.try_wait().map_err(io_err("waiting for the daemon"))? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                self.child = Some(child);
                return Err(DaemonError::NoExit {
                    daemon: self.name,
                    waited: EXIT_TIMEOUT,
                    log: self.log_text(tokens),
                });
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM and the exit it leads to.
    pub fn stop(&mut self, tokens: &[BearerToken]) -> Result<ExitStatus> {
        self.signal(libc::SIGTERM)?;
        self.wait_exit(tokens)
    }

    /// Kills and reaps the process if it runs; its pid if it did.
    pub fn kill(&mut self) -> Option<u32> {
        let mut c = self.child.take()?;
        let _ = c.kill();
        let _ = c.wait();
        Some(c.id())
    }

    /// The log so far, redacted.
    pub fn log_text(&self, tokens: &[BearerToken]) -> String {
        redact(
            &String::from_utf8_lossy(&fs::read(&self.log).unwrap_or_default()),
            tokens,
        )
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
