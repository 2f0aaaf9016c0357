//! A recording HTTP/1.1 upstream: keep-alive capable, answers `200 ok from <name>`,
//! remembers every request it saw (with credentials redacted) and how many connections
//! are open, so tests can see exactly what got past the gateway and Rampart.

use std::{
    collections::HashMap,
    io::{self, BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering},
        mpsc, Arc, Mutex, MutexGuard,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::netns::{Netns, NetnsError, NsThread};

/// Replaces credential header values in recordings: the token must never be stored.
pub const REDACTED: &str = "<redacted>";
/// Header a test may set to find its own requests in the recording.
pub const TEST_ID_HEADER: &str = "x-test-id";
/// Upper bound on a request head, so a broken client cannot make us buffer forever.
const MAX_HEAD_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {name}: {source}")]
    Netns { name: String, source: NetnsError },
    #[error("upstream {name}: cannot bind {addr}: {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("upstream {name}: server thread ended before reporting its address")]
    ThreadDied { name: String },
}

/// What the server does with a request after recording it. Lets tests show what a client
/// of the gateway sees when the hop after nginx stalls or resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Behavior {
    /// 200 with a short body (the default).
    Respond = 0,
    /// Never answer; keep the connection open (looks like a dropped request to nginx).
    Stall = 1,
    /// Close with RST (SO_LINGER 0) without answering.
    Reset = 2,
}

impl Behavior {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Stall,
            2 => Self::Reset,
            _ => Self::Respond,
        }
    }
}

/// One request as the upstream received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// Order of arrival over the server's life, from 0.
    pub seq: u64,
    /// Which accepted connection carried it (from 0): equal ids = same keep-alive connection.
    pub conn_id: u64,
    pub peer: SocketAddr,
    pub method: String,
    pub path: String,
    pub version: String,
    /// Header names lower-cased; `authorization`/`proxy-authorization` values are
    /// [`REDACTED`].
    pub headers: Vec<(String, String)>,
    pub had_authorization: bool,
    /// Value of `X-Test-Id`, if sent.
    pub test_id: Option<String>,
    pub body_len: usize,
    /// When the server finished reading it (for per-interval counts, e.g. ramp stages).
    pub received: Instant,
}

impl RecordedRequest {
    /// First value of a (case-insensitive) header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Default)]
struct Shared {
    name: String,
    requests: Mutex<Vec<RecordedRequest>>,
    open: AtomicUsize,
    accepted: AtomicU64,
    behavior: AtomicU8,
    stopping: AtomicBool,
    /// Clones of live connections so `stop` can shut them down and unblock their readers.
    conns: Mutex<HashMap<u64, TcpStream>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking connection thread must not take the recording down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The running server; stopped (threads joined, sockets closed) on drop.
#[derive(Debug)]
pub struct UpstreamServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    listener: Option<TcpListener>,
    acceptor: Option<NsThread<()>>,
}

impl UpstreamServer {
    /// Binds `addr` (port 0 picks one) inside `ns` and starts serving.
    pub fn start(ns: &Netns, name: &str, addr: SocketAddr) -> Result<Self, UpstreamError> {
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            ..Default::default()
        });
        let (tx, rx) = mpsc::channel();
        let acceptor_shared = Arc::clone(&shared);
        let acceptor = ns
            .spawn_thread(&format!("up-{name}"), move || {
                let listener = match TcpListener::bind(addr) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let report = listener
                    .local_addr()
                    .and_then(|a| Ok((a, listener.try_clone()?)));
                let ok = report.is_ok();
                let _ = tx.send(report);
                if ok {
                    accept_loop(&listener, &acceptor_shared);
                }
            })
            .map_err(|source| UpstreamError::Netns {
                name: name.to_owned(),
                source,
            })?;
        match rx.recv() {
            Ok(Ok((addr, listener))) => Ok(Self {
                addr,
                shared,
                listener: Some(listener),
                acceptor: Some(acceptor),
            }),
            Ok(Err(source)) => {
                let _ = acceptor.join();
                Err(UpstreamError::Bind {
                    name: name.to_owned(),
                    addr,
                    source,
                })
            }
            Err(_) => Err(UpstreamError::ThreadDied {
                name: name.to_owned(),
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Bound address (inside the server's namespace).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).clone()
    }

    /// Requests that carried `X-Test-Id: <id>`.
    pub fn requests_with_test_id(&self, id: &str) -> Vec<RecordedRequest> {
        lock(&self.shared.requests)
            .iter()
            .filter(|r| r.test_id.as_deref() == Some(id))
            .cloned()
            .collect()
    }

    pub fn count(&self) -> usize {
        lock(&self.shared.requests).len()
    }

    /// Forgets recorded requests (connection counters are kept).
    pub fn clear(&self) {
        lock(&self.shared.requests).clear();
    }

    /// Connections currently open from the server's point of view.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Connections accepted over the server's life.
    pub fn accepted_connections(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Polls until `open_connections() == n` or `timeout`; returns the last value seen.
    /// Closing is asynchronous (FIN, then our reader sees EOF), hence the wait.
    pub fn wait_open_connections(&self, n: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let open = self.open_connections();
            if open == n || Instant::now() >= deadline {
                return open;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Polls until at least `n` requests are recorded or `timeout`; returns the count.
    pub fn wait_count(&self, n: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let count = self.count();
            if count >= n || Instant::now() >= deadline {
                return count;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn set_behavior(&self, behavior: Behavior) {
        self.shared.behavior.store(behavior as u8, Ordering::SeqCst);
    }

    pub fn behavior(&self) -> Behavior {
        Behavior::from_u8(self.shared.behavior.load(Ordering::SeqCst))
    }

    /// Stops accepting, closes every connection and joins all threads. Idempotent.
    pub fn stop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Some(listener) = self.listener.take() {
            // shutdown() on a listening socket makes a blocked accept() return on Linux.
            // SAFETY: the fd is owned by `listener`, alive for this call.
            unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
            if let Some(acceptor) = self.acceptor.take() {
                let _ = acceptor.join();
            }
        }
        for (_, conn) in lock(&self.shared.conns).drain() {
            let _ = conn.shutdown(Shutdown::Both);
        }
        let workers: Vec<_> = lock(&self.shared.workers).drain(..).collect();
        for w in workers {
            let _ = w.join();
        }
    }
}

impl Drop for UpstreamServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok((stream, peer)) = accepted else {
            // EMFILE and friends: back off rather than spin.
            thread::sleep(Duration::from_millis(10));
            continue;
        };
        let conn_id = shared.accepted.fetch_add(1, Ordering::SeqCst);
        shared.open.fetch_add(1, Ordering::SeqCst);
        if let Ok(clone) = stream.try_clone() {
            lock(&shared.conns).insert(conn_id, clone);
        }
        let conn_shared = Arc::clone(shared);
        let spawned = thread::Builder::new()
            .name(format!("up-conn-{conn_id}"))
            .spawn(move || {
                let _ = serve(stream, peer, conn_id, &conn_shared);
                lock(&conn_shared.conns).remove(&conn_id);
                conn_shared.open.fetch_sub(1, Ordering::SeqCst);
            });
        match spawned {
            Ok(handle) => {
                let mut workers = lock(&shared.workers);
                workers.retain(|w| !w.is_finished());
                workers.push(handle);
            }
            Err(_) => {
                lock(&shared.conns).remove(&conn_id);
                shared.open.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

/// Serves one connection until the peer closes, asks to close, or the behavior ends it.
fn serve(stream: TcpStream, peer: SocketAddr, conn_id: u64, shared: &Shared) -> io::Result<()> {
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let Some(head) = read_head(&mut reader)? else {
            return Ok(());
        };
        let body_len = read_body(&mut reader, &head.headers)?;
        let keep_alive = wants_keep_alive(&head);
        {
            let mut requests = lock(&shared.requests);
            let seq = requests.last().map_or(0, |r| r.seq + 1);
            requests.push(head.into_recorded(seq, conn_id, peer, body_len));
        }
        match Behavior::from_u8(shared.behavior.load(Ordering::SeqCst)) {
            Behavior::Respond => {
                let body = format!("ok from {}\n", shared.name);
                let conn = if keep_alive { "keep-alive" } else { "close" };
                write!(
                    writer,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {conn}\r\nX-Upstream: {}\r\n\r\n{body}",
                    body.len(),
                    shared.name,
                )?;
                writer.flush()?;
                if !keep_alive {
                    return Ok(());
                }
            }
            Behavior::Stall => {
                // Hold the connection until the peer gives up (EOF) or we are stopped.
                let mut sink = [0u8; 4096];
                while reader.read(&mut sink)? > 0 {}
                return Ok(());
            }
            Behavior::Reset => {
                set_linger_zero(&writer);
                return Ok(());
            }
        }
    }
}

fn set_linger_zero(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd and a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

struct Head {
    method: String,
    path: String,
    version: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn into_recorded(
        self,
        seq: u64,
        conn_id: u64,
        peer: SocketAddr,
        body_len: usize,
    ) -> RecordedRequest {
        let mut had_authorization = false;
        let mut test_id = None;
        let headers = self
            .headers
            .into_iter()
            .map(|(name, value)| match name.as_str() {
                "authorization" | "proxy-authorization" => {
                    had_authorization |= name == "authorization";
                    (name, REDACTED.to_owned())
                }
                TEST_ID_HEADER => {
                    test_id.get_or_insert_with(|| value.clone());
                    (name, value)
                }
                _ => (name, value),
            })
            .collect();
        RecordedRequest {
            seq,
            conn_id,
            peer,
            method: self.method,
            path: self.path,
            version: self.version,
            headers,
            had_authorization,
            test_id,
            body_len,
            received: Instant::now(),
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn bad(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Reads a request line and headers; `None` on a clean EOF between requests.
fn read_head(reader: &mut impl BufRead) -> io::Result<Option<Head>> {
    let mut total = 0;
    let mut line = String::new();
    // Tolerate blank lines before a request line (RFC 9112 §2.2).
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        if n == 0 {
            return Ok(None);
        }
        total += n;
        if !line.trim().is_empty() {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("malformed request line"));
    };
    let mut head = Head {
        method: method.to_owned(),
        path: path.to_owned(),
        version: version.to_owned(),
        headers: Vec::new(),
    };
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        total += n;
        if n == 0 {
            return Err(bad("EOF inside request head"));
        }
        if total > MAX_HEAD_BYTES {
            return Err(bad("request head too large"));
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            return Ok(Some(head));
        }
        let (name, value) = l.split_once(':').ok_or_else(|| bad("malformed header"))?;
        head.headers
            .push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
}

/// Consumes the body (Content-Length or chunked) and returns its length.
fn read_body(reader: &mut impl BufRead, headers: &[(String, String)]) -> io::Result<usize> {
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    };
    if get("transfer-encoding").is_some_and(|te| te.to_ascii_lowercase().contains("chunked")) {
        let mut total = 0;
        let mut line = String::new();
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let size_hex = line.trim().split(';').next().unwrap_or("");
            let size = usize::from_str_radix(size_hex, 16).map_err(|_| bad("bad chunk size"))?;
            if size == 0 {
                // Trailers until the empty line.
                loop {
                    line.clear();
                    if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                        return Ok(total);
                    }
                }
            }
            io::copy(&mut reader.take(size as u64 + 2), &mut io::sink())?;
            total += size;
        }
    }
    let len: usize = match get("content-length") {
        Some(v) => v.parse().map_err(|_| bad("bad content-length"))?,
        None => 0,
    };
    let copied = io::copy(&mut reader.take(len as u64), &mut io::sink())?;
    if copied != len as u64 {
        return Err(bad("EOF inside body"));
    }
    Ok(len)
}

fn wants_keep_alive(head: &Head) -> bool {
    let conn = head.header("connection").map(str::to_ascii_lowercase);
    match head.version.as_str() {
        "HTTP/1.0" => conn.is_some_and(|c| c.contains("keep-alive")),
        _ => !conn.is_some_and(|c| c.contains("close")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_parsing_redacts_authorization_and_reads_chunked_body() {
        let raw = b"POST /v1/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer secret-value\r\nX-Test-Id: t1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let mut r = BufReader::new(&raw[..]);
        let head = read_head(&mut r).unwrap().unwrap();
        let body_len = read_body(&mut r, &head.headers).unwrap();
        let rec = head.into_recorded(0, 0, "127.0.0.1:1".parse().unwrap(), body_len);
        assert_eq!(body_len, 5);
        assert!(rec.had_authorization);
        assert_eq!(rec.header("Authorization"), Some(REDACTED));
        assert_eq!(rec.test_id.as_deref(), Some("t1"));
        assert!(!format!("{rec:?}").contains("secret-value"));
        assert!(read_head(&mut r).unwrap().is_none());
    }
}
