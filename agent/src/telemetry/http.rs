//! A minimal HTTP/1.1 endpoint for Prometheus scrapes: `GET /metrics` and nothing else.
//!
//! Hand-rolled because a scrape target needs one route and no keep-alive; every response
//! closes the connection. Scrapers on the network can be anything, so the reader is bounded
//! in bytes, time and concurrency, and a malformed request gets a 400, never a panic.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    time::timeout,
};

use super::{
    metrics::{Metrics, CONTENT_TYPE},
    TelemetryError,
};

/// Largest request head read; a scrape's is a few hundred bytes.
const MAX_HEAD: usize = 8192;
/// Time a client gets to send its request head and to take the response.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the accept backlog.
const MAX_CONNECTIONS: usize = 32;

/// A bound metrics endpoint, not yet serving (bind first so the caller learns bind errors
/// and the actual port before spawning).
#[derive(Debug)]
pub struct MetricsServer {
    listener: TcpListener,
    addr: SocketAddr,
}

impl MetricsServer {
    pub async fn bind(addr: SocketAddr) -> Result<Self, TelemetryError> {
        let bind_err = |source| TelemetryError::MetricsBind { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        Ok(MetricsServer { listener, addr })
    }

    /// The address actually bound (resolves port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves scrapes until the task is dropped or aborted.
    pub async fn serve(self, metrics: Arc<Metrics>) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let permit = match slots.clone().acquire_owned().await {
                Ok(p) => p,
                // The semaphore is never closed.
                Err(_) => return,
            };
            let (stream, peer) = match self.listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning, keep serving.
                    tracing::warn!(addr = %self.addr, error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                if let Err(e) = handle(stream, &metrics).await {
                    tracing::debug!(%peer, error = %e, "metrics connection ended with an error");
                }
                drop(permit);
            });
        }
    }
}

/// Binds `addr` and serves `GET /metrics` from `metrics` forever.
pub async fn serve_metrics(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<(), TelemetryError> {
    let server = MetricsServer::bind(addr).await?;
    tracing::info!(addr = %server.local_addr(), "serving metrics");
    server.serve(metrics).await;
    Ok(())
}

async fn handle(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let head = match timeout(IO_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(head))) => head,
        Ok(Ok(None)) => return respond(&mut stream, Response::bad_request()).await,
        Ok(Err(e)) => return Err(e),
        Err(_) => return Ok(()), // slow client: just close
    };
    let response = route(&head, metrics);
    timeout(IO_TIMEOUT, respond(&mut stream, response))
        .await
        .unwrap_or(Ok(()))
}

/// Reads and discards what the client still sends after our response, briefly: closing
/// with unread input makes the kernel send RST, which can destroy the response in flight.
async fn linger(stream: &mut TcpStream) {
    let mut sink = [0u8; 4096];
    let drain = async {
        let mut left = 64 * 1024usize;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = timeout(Duration::from_secs(1), drain).await;
}

/// Reads up to the blank line ending the head. `None` if the client sent more than
/// [`MAX_HEAD`] bytes or closed before finishing the head.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find_head_end(&buf) {
            buf.truncate(end);
            return Ok(Some(buf));
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    // Accept bare LF line ends too (tolerant reader, as RFC 9112 §2.2 allows).
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = buf.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

struct Response {
    status: &'static str,
    content_type: &'static str,
    body: String,
    /// HEAD: headers as for GET, no body.
    head_only: bool,
}

impl Response {
    fn text(status: &'static str, body: &str) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{body}\n"),
            head_only: false,
        }
    }

    fn bad_request() -> Self {
        Response::text("400 Bad Request", "bad request")
    }
}

fn route(head: &[u8], metrics: &Metrics) -> Response {
    let Some(line) = head.split(|&b| b == b'\n').next() else {
        return Response::bad_request();
    };
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Ok(line) = std::str::from_utf8(line) else {
        return Response::bad_request();
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Response::bad_request();
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || !target.starts_with('/') {
        return Response::bad_request();
    }
    let path = target.split('?').next().unwrap_or(target);
    if path != "/metrics" {
        return Response::text("404 Not Found", "not found; metrics are at /metrics");
    }
    match method {
        "GET" | "HEAD" => Response {
            status: "200 OK",
            content_type: CONTENT_TYPE,
            body: metrics.encode(),
            head_only: method == "HEAD",
        },
        _ => Response::text("405 Method Not Allowed", "method not allowed"),
    }
}

async fn respond(stream: &mut TcpStream, r: Response) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        r.status,
        r.content_type,
        r.body.len()
    );
    if r.status.starts_with("405") {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    if !r.head_only {
        out.push_str(&r.body);
    }
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await?;
    linger(stream).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{BuildInfo, DatapathSnapshot, TokenCounts};

    async fn server() -> SocketAddr {
        let metrics = Arc::new(Metrics::new(BuildInfo {
            version: "1.2.3".into(),
            commit: None,
        }));
        metrics.update(DatapathSnapshot {
            tokens: TokenCounts {
                active: 17,
                ..TokenCounts::default()
            },
            ..DatapathSnapshot::default()
        });
        let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = server.local_addr();
        tokio::spawn(server.serve(metrics));
        addr
    }

    /// Sends raw bytes, returns everything the server sent before closing.
    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .expect("server closes the connection")
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    fn split(resp: &str) -> (&str, &str) {
        resp.split_once("\r\n\r\n").expect("a complete response")
    }

    #[tokio::test]
    async fn get_metrics_serves_exposition() {
        let addr = server().await;
        let resp = exchange(
            addr,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
        )
        .await;
        let (head, body) = split(&resp);
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains(&format!("Content-Type: {CONTENT_TYPE}")));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(body
            .lines()
            .any(|l| l == r#"rampart_tokens{state="active"} 17"#));
        assert!(body.ends_with("# EOF\n"));

        // A query string (some scrapers add one) still names /metrics.
        let resp = exchange(addr, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n").await;
        assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"));

        let resp = exchange(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
        let (head, body) = split(&resp);
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n") && body.is_empty());
    }

    #[tokio::test]
    async fn other_paths_and_methods_are_refused() {
        let addr = server().await;
        let resp = exchange(addr, b"GET / HTTP/1.1\r\n\r\n").await;
        assert!(resp.starts_with("HTTP/1.1 404 Not Found\r\n"), "{resp}");
        let resp = exchange(addr, b"GET /metricsx HTTP/1.1\r\n\r\n").await;
        assert!(resp.starts_with("HTTP/1.1 404 Not Found\r\n"), "{resp}");
        let resp = exchange(addr, b"POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(
            resp.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{resp}"
        );
        assert!(resp.contains("Allow: GET, HEAD\r\n"));
    }

    #[tokio::test]
    async fn garbage_gets_400_and_server_survives() {
        let addr = server().await;
        for garbage in [
            &b"\x00\x01\x02garbage\xff\r\n\r\n"[..],
            b"GET\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET /metrics HTTP/1.1 extra\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics SPDY/3\r\n\r\n",
            b"\r\n\r\n",
        ] {
            let resp = exchange(addr, garbage).await;
            assert!(
                resp.starts_with("HTTP/1.1 400 Bad Request\r\n"),
                "{garbage:?} -> {resp:?}"
            );
        }
        // A head that never ends is cut off at the size bound.
        let resp = exchange(addr, &[b'A'; 3 * MAX_HEAD]).await;
        assert!(resp.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{resp:?}");
        // A client that hangs up mid-request.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /met").await.unwrap();
        drop(s);

        let resp = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"));
    }

    #[tokio::test]
    async fn bind_conflict_is_reported() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = serve_metrics(addr, Arc::new(Metrics::default()))
            .await
            .unwrap_err();
        assert!(matches!(err, TelemetryError::MetricsBind { addr: a, .. } if a == addr));
    }
}
