//! One live TLS keep-alive connection from the client namespace that sends a request
//! whenever the test says so (`openssl s_client`, fed raw HTTP/1.1 on stdin), so a test can
//! act between two requests of the same connection, e.g. revoke a token.
//!
//! The token travels on s_client's stdin only, never on a command line.

use std::{
    fmt::Write as _,
    io::{self, BufRead, BufReader, Write},
    process::{Child, ChildStdin, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use crate::{client::Request, netns::Netns};

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot start openssl s_client (is openssl installed?): {0}")]
    Spawn(#[source] io::Error),
    #[error("writing to the connection: {0}")]
    Write(#[source] io::Error),
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("the connection closed (s_client exited)")]
    Closed,
    #[error("unparsable response head {0:?}")]
    Parse(String),
}

/// One response as the client read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionResponse {
    pub status: u16,
    /// From the last request byte written to the end of the response body.
    pub elapsed: Duration,
}

/// A persistent TLS connection; killed on drop.
#[derive(Debug)]
pub struct Session {
    child: Child,
    stdin: ChildStdin,
    /// Parsed responses (status) from the reader thread.
    rx: mpsc::Receiver<Result<u16, SessionError>>,
    host: String,
}

impl Session {
    /// Connects from `ns` to `host:port` (TLS, certificate not verified: it is the test's
    /// own self-signed one).
    pub fn connect(ns: &Netns, host: &str, port: u16) -> Result<Session, SessionError> {
        let mut child = ns
            .command("openssl")
            .args(["s_client", "-quiet", "-connect"])
            .arg(format!("{host}:{port}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(SessionError::Spawn)?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            loop {
                let res = read_response(&mut r);
                let stop = res.is_err();
                if tx.send(res).is_err() || stop {
                    return;
                }
            }
        });
        Ok(Session {
            child,
            stdin,
            rx,
            host: host.to_owned(),
        })
    }

    /// Sends `req` on the connection and waits for its response.
    pub fn send(
        &mut self,
        req: &Request,
        timeout: Duration,
    ) -> Result<SessionResponse, SessionError> {
        let mut head = format!(
            "{} {} HTTP/1.1\r\nHost: {}\r\n",
            req.method, req.path, self.host
        );
        if let Some(t) = &req.token {
            let _ = write!(head, "Authorization: Bearer {}\r\n", t.expose());
        }
        if let Some(id) = &req.test_id {
            let _ = write!(head, "X-Test-Id: {id}\r\n");
        }
        let body = req.body.clone().unwrap_or_default();
        let _ = write!(head, "Content-Length: {}\r\n\r\n", body.len());
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&body);
        self.stdin.write_all(&bytes).map_err(SessionError::Write)?;
        self.stdin.flush().map_err(SessionError::Write)?;
        let start = Instant::now();
        match self.rx.recv_timeout(timeout) {
            Ok(Ok(status)) => Ok(SessionResponse {
                status,
                elapsed: start.elapsed(),
            }),
            Ok(Err(e)) => Err(e),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(SessionError::Timeout(timeout)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(SessionError::Closed),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads one HTTP/1.1 response (Content-Length or chunked body) and returns its status.
fn read_response(r: &mut impl BufRead) -> Result<u16, SessionError> {
    let mut line = String::new();
    // Skip anything before the status line (nothing, with -quiet).
    let status = loop {
        line.clear();
        if r.read_line(&mut line).map_err(|_| SessionError::Closed)? == 0 {
            return Err(SessionError::Closed);
        }
        if let Some(rest) = line.strip_prefix("HTTP/1.") {
            break rest
                .get(2..5)
                .and_then(|s| s.parse::<u16>().ok())
                .ok_or_else(|| SessionError::Parse(line.trim().to_owned()))?;
        }
    };
    let mut length = 0usize;
    let mut chunked = false;
    loop {
        line.clear();
        if r.read_line(&mut line).map_err(|_| SessionError::Closed)? == 0 {
            return Err(SessionError::Closed);
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((name, value)) = l.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("transfer-encoding")
                && value.eq_ignore_ascii_case("chunked")
            {
                chunked = true;
            }
        }
    }
    if chunked {
        loop {
            line.clear();
            if r.read_line(&mut line).map_err(|_| SessionError::Closed)? == 0 {
                return Err(SessionError::Closed);
            }
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16)
                .map_err(|_| SessionError::Parse(line.trim().to_owned()))?;
            // The chunk and its CRLF (the last chunk: just the final CRLF, no trailers).
            skip(r, size + 2)?;
            if size == 0 {
                break;
            }
        }
    } else {
        skip(r, length)?;
    }
    Ok(status)
}

fn skip(r: &mut impl BufRead, n: usize) -> Result<(), SessionError> {
    let mut buf = vec![0u8; n];
    r.read_exact(&mut buf).map_err(|_| SessionError::Closed)
}
