//! Requests judged while the daemon reloads. Inside the bench's own network namespace
//! (its loopback carries the daemon's TC listener), one client sends requests with a
//! valid token back to back, each answered by a small upstream, and another sends
//! requests with an unknown token, which the listener drops. The longest wait between two
//! answered requests while reloads run shows whether judging paused; an answered unknown
//! token would show a request that was not judged.
//!
//! The token lives in this process's memory only: it is never printed or written.

use std::{
    fs::File,
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Result<Netns> {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs `f` on a thread that has entered the namespace (setns applies to the calling
    /// thread only).
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<JoinHandle<Result<T>>> {
        let path = format!("/run/netns/{}", self.name);
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        Ok(thread::spawn(move || {
            // SAFETY: a valid namespace fd; CLONE_NEWNET moves only this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns: {}", std::io::Error::last_os_error());
            }
            Ok(f())
        }))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A private BPF filesystem for the daemon's pins (`ip netns exec` remounts /sys, so
/// /sys/fs/bpf is not one inside the namespace), unmounted on drop.
pub struct Bpffs {
    pub dir: std::path::PathBuf,
}

impl Bpffs {
    pub fn mount(dir: std::path::PathBuf) -> Result<Bpffs> {
        let _ = Command::new("umount").arg("-l").arg(&dir).output();
        std::fs::create_dir_all(&dir)?;
        let out = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&dir)
            .output()?;
        if !out.status.success() {
            bail!("mount bpffs: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(Bpffs { dir })
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).output();
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        bail!("ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// What the clients saw while `work` ran.
#[derive(Debug, Default)]
pub struct Judged {
    pub valid_sent: u64,
    pub valid_answered: u64,
    pub unknown_sent: u64,
    pub unknown_answered: u64,
    /// The longest time without an answered valid request while `work` ran.
    pub longest_gap: Duration,
}

/// One request on a fresh connection; whether a response came back within `wait`.
fn request(addr: SocketAddr, token: &str, wait: Duration) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(wait));
    let req = format!(
        "GET /v1/items HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let answered = matches!(s.read(&mut buf), Ok(n) if n >= 12 && buf.starts_with(b"HTTP/1.1 200"));
    let _ = s.shutdown(Shutdown::Both);
    answered
}

/// Serves `200 ok` to every request on `listener` until `stop`, a thread per connection
/// (the connections whose request the listener dropped wait for a request that never
/// comes).
fn upstream(listener: TcpListener, stop: Arc<AtomicBool>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(mut c) = conn else { continue };
        thread::spawn(move || {
            let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ =
                c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        });
    }
}

/// Runs `work` while the clients send requests to `port` inside `ns`, once a valid request
/// has been answered (the listener is judging).
pub fn during(
    ns: &Netns,
    port: u16,
    token: String,
    work: impl FnOnce() -> Result<()>,
) -> Result<Judged> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let server = {
        let stop = stop.clone();
        ns.spawn(move || -> Result<()> {
            let listener = TcpListener::bind(addr)?;
            let _ = tx.send(());
            upstream(listener, stop);
            Ok(())
        })?
    };
    rx.recv_timeout(Duration::from_secs(10))
        .context("the bench upstream did not start")?;
    // Answer times of valid requests, from `t0`.
    let t0 = Instant::now();
    let answers = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
    let valid = {
        let (stop, answers, counts, token) =
            (stop.clone(), answers.clone(), counts.clone(), token.clone());
        ns.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                counts[0].fetch_add(1, Ordering::Relaxed);
                if request(addr, &token, Duration::from_secs(1)) {
                    counts[1].fetch_add(1, Ordering::Relaxed);
                    answers.lock().unwrap().push(t0.elapsed());
                }
            }
        })?
    };
    let unknown = {
        let (stop, counts) = (stop.clone(), counts.clone());
        // Same length and alphabet as the valid one, not known to the daemon.
        let bogus: String = token.chars().rev().collect();
        ns.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                counts[2].fetch_add(1, Ordering::Relaxed);
                if request(addr, &bogus, Duration::from_millis(100)) {
                    counts[3].fetch_add(1, Ordering::Relaxed);
                }
            }
        })?
    };
    drop(token);
    let ready = Instant::now();
    while answers.lock().unwrap().is_empty() {
        if ready.elapsed() > Duration::from_secs(10) {
            stop.store(true, Ordering::Relaxed);
            bail!("no request with the valid token was answered within 10 s");
        }
        thread::sleep(Duration::from_millis(10));
    }
    let before = counts.each_ref().map(|c| c.load(Ordering::Relaxed));
    let start = t0.elapsed();
    let worked = work();
    let end = t0.elapsed();
    let after = counts.each_ref().map(|c| c.load(Ordering::Relaxed));
    stop.store(true, Ordering::Relaxed);
    // Wakes the upstream's accept.
    let _ = ns.spawn(move || TcpStream::connect(addr)).map(|h| h.join());
    let _ = valid.join();
    let _ = unknown.join();
    let _ = server.join();
    worked?;
    let answers = answers.lock().unwrap();
    let mut last = start;
    let mut longest = Duration::ZERO;
    for &t in answers.iter().filter(|&&t| t > start && t <= end) {
        longest = longest.max(t - last);
        last = t;
    }
    longest = longest.max(end.saturating_sub(last));
    Ok(Judged {
        valid_sent: after[0] - before[0],
        valid_answered: after[1] - before[1],
        unknown_sent: after[2] - before[2],
        unknown_answered: after[3] - before[3],
        longest_gap: longest,
    })
}
