//! The control-socket transport: accept, frame, bound, authenticate, dispatch.
//!
//! One task per connection, so a slow or hostile client can stall only itself. Every limit a
//! client could abuse is bounded: line length, time to finish a request, time to take a
//! response, number of simultaneous connections.

use std::{
    fs,
    future::Future,
    io,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{
        AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt,
        BufReader,
    },
    net::{UnixListener, UnixStream},
    sync::{broadcast, Semaphore},
    time::timeout,
};

use super::protocol::{EventFilter, Request, Response, StreamItem};
use crate::{paths, telemetry::event::Record};

/// Who is on the other end, from SO_PEERCRED.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// What the daemon implements; the transport never needs to change when an op is added.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request. `EventsSubscribe` never reaches here (see `subscribe`).
    fn handle(&self, peer: Peer, req: Request) -> impl Future<Output = Response> + Send;

    /// A receiver of all datapath events for `events.subscribe`; the server applies the
    /// client's filter. `Err` is sent to the client as the error response.
    fn subscribe(&self, peer: Peer) -> Result<broadcast::Receiver<Record>, String>;
}

/// Transport limits.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Longest request line; longer gets an error response and the connection is closed.
    pub max_line: usize,
    /// Time a client has to complete a request line (and idle time between requests).
    pub read_timeout: Duration,
    /// Time a client has to take a response off the socket.
    pub write_timeout: Duration,
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// The only uid allowed to issue requests (root).
    pub allowed_uid: u32,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            // A token.issue request is a few hundred bytes; 64 KiB is generous.
            max_line: 64 * 1024,
            // Humans type at the CLI, not into the socket: requests arrive whole.
            read_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            max_connections: 64,
            allowed_uid: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot create control socket directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("another daemon is already listening on {path}")]
    InUse { path: PathBuf },
    #[error("cannot remove stale control socket {path}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind control socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot restrict control socket {path} to mode 0600")]
    Chmod {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Binds the control socket: parent directory created 0700 if missing, a stale socket file
/// (nobody listening) replaced, the socket made 0600.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    if let Some(parent) = path.parent() {
        paths::create_private_dir(parent).map_err(|source| ControlError::CreateDir {
            path: parent.to_owned(),
            source,
        })?;
    }
    if let Ok(meta) = fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ControlError::NotASocket {
                path: path.to_owned(),
            });
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse {
                path: path.to_owned(),
            });
        }
        fs::remove_file(path).map_err(|source| ControlError::RemoveStale {
            path: path.to_owned(),
            source,
        })?;
    }
    let listener = UnixListener::bind(path).map_err(|source| ControlError::Bind {
        path: path.to_owned(),
        source,
    })?;
    // The parent is 0700, so nobody else can reach the socket between bind and chmod.
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|source| {
        ControlError::Chmod {
            path: path.to_owned(),
            source,
        }
    })?;
    Ok(listener)
}

/// Serves connections until the task is dropped or aborted.
pub async fn serve<H: Handler>(listener: UnixListener, handler: Arc<H>, opts: ServerOptions) {
    let opts = Arc::new(opts);
    let slots = Arc::new(Semaphore::new(opts.max_connections.max(1)));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return; // the semaphore is never closed
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let handler = handler.clone();
                let opts = opts.clone();
                tokio::spawn(async move {
                    connection(stream, handler, &opts).await;
                    drop(permit);
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Outcome of reading one line.
enum Line {
    Complete,
    Eof,
    TooLong,
}

/// Reads up to and excluding `\n` into `buf`, never holding more than `max` bytes.
async fn read_line<R: AsyncBufRead + Unpin>(
    rd: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<Line> {
    loop {
        let avail = rd.fill_buf().await?;
        if avail.is_empty() {
            return Ok(Line::Eof);
        }
        let (take, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (avail.len(), false),
        };
        if buf.len() + take > max {
            return Ok(Line::TooLong);
        }
        buf.extend_from_slice(&avail[..take]);
        rd.consume(take + usize::from(done));
        if done {
            return Ok(Line::Complete);
        }
    }
}

async fn send<W: AsyncWrite + Unpin>(wr: &mut W, line: &[u8], limit: Duration) -> bool {
    matches!(timeout(limit, wr.write_all(line)).await, Ok(Ok(())))
}

async fn connection<H: Handler>(stream: UnixStream, handler: Arc<H>, opts: &ServerOptions) {
    let peer = match stream.peer_cred() {
        Ok(c) => Peer {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
        },
        Err(e) => {
            tracing::warn!(error = %e, "control socket: cannot read peer credentials");
            return;
        }
    };
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    if peer.uid != opts.allowed_uid {
        tracing::warn!(uid = peer.uid, pid = ?peer.pid, "control socket: refused non-root caller");
        let resp = Response::error(format!(
            "permission denied: the control socket is for uid {} only (caller uid {})",
            opts.allowed_uid, peer.uid
        ));
        send(&mut wr, &resp.to_line(), opts.write_timeout).await;
        return;
    }
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let read = timeout(
            opts.read_timeout,
            read_line(&mut rd, &mut buf, opts.max_line),
        )
        .await;
        // Framing is intact after a bad-but-complete line; after a timeout or an overlong line
        // it is not, so those close the connection once answered.
        let framing_ok = matches!(read, Ok(Ok(Line::Complete)));
        let req = match read {
            Err(_) if buf.is_empty() => return, // idle client: just hang up
            Err(_) => Err("request timed out before its end of line".to_owned()),
            Ok(Err(_)) => return,
            Ok(Ok(Line::Eof)) if buf.is_empty() => return,
            // A last line without its newline still gets an answer.
            Ok(Ok(Line::Eof)) | Ok(Ok(Line::Complete)) => {
                let line = buf.strip_suffix(b"\r").unwrap_or(&buf);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                Request::parse(line)
            }
            Ok(Ok(Line::TooLong)) => {
                Err(format!("request line longer than {} bytes", opts.max_line))
            }
        };
        match req {
            Err(msg) => {
                if !send(&mut wr, &Response::error(msg).to_line(), opts.write_timeout).await
                    || !framing_ok
                {
                    return;
                }
            }
            Ok(Request::EventsSubscribe { filter }) => {
                stream_events(&mut rd, &mut wr, &*handler, peer, filter, opts).await;
                return;
            }
            Ok(req) => {
                let resp = handler.handle(peer, req).await;
                if !send(&mut wr, &resp.to_line(), opts.write_timeout).await || !framing_ok {
                    return;
                }
            }
        }
    }
}

async fn stream_events<H: Handler, R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    rd: &mut R,
    wr: &mut W,
    handler: &H,
    peer: Peer,
    filter: EventFilter,
    opts: &ServerOptions,
) {
    let mut rx = match handler.subscribe(peer) {
        Ok(rx) => rx,
        Err(msg) => {
            send(wr, &Response::error(msg).to_line(), opts.write_timeout).await;
            return;
        }
    };
    let ack = Response::ok(&serde_json::json!({ "subscribed": true }));
    if !send(wr, &ack.to_line(), opts.write_timeout).await {
        return;
    }
    let mut scratch = [0u8; 512];
    loop {
        let item = tokio::select! {
            ev = rx.recv() => match ev {
                Ok(ev) if filter.matches(&ev) => StreamItem::Event(Box::new(ev)),
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(n)) => StreamItem::Lagged { lagged: n },
                Err(broadcast::error::RecvError::Closed) => return,
            },
            // Anything the client sends now is ignored; EOF or error means it went away.
            r = rd.read(&mut scratch) => match r {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            },
        };
        let mut line = match serde_json::to_vec(&item) {
            Ok(l) => l,
            Err(_) => continue,
        };
        line.push(b'\n');
        if !send(wr, &line, opts.write_timeout).await {
            return;
        }
    }
}
