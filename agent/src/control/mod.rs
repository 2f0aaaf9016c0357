//! The root-only control socket: line-delimited JSON requests from the CLI to the daemon.
//!
//! - `protocol`: requests, every reply body, and the event stream's items (shared by both
//!   ends). What answers the requests is the daemon's (`daemon::ops`).
//! - `server`: the transport; the daemon plugs in a `Handler`.
//! - `client`: what the CLI uses.

pub mod client;
pub mod protocol;
pub mod server;

pub use client::{Client, ClientError, Subscription};
pub use protocol::{EventFilter, EventKind, Fp, Request, Response, StreamItem};
pub use server::{bind, serve, ControlError, Handler, Peer, ServerOptions};

#[cfg(test)]
mod tests {
    use std::{
        os::unix::fs::PermissionsExt,
        path::{Path, PathBuf},
        sync::Arc,
        time::Duration,
    };

    use agent_common::{Fingerprint, Verdict};
    use tokio::{
        io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
        net::UnixStream,
        sync::broadcast,
        task::JoinHandle,
    };

    use super::*;
    use crate::telemetry::{EventContext, EventRecord, Record};

    struct TestHandler {
        events: broadcast::Sender<Record>,
    }

    impl Handler for TestHandler {
        async fn handle(&self, peer: Peer, req: Request) -> Response {
            if let Request::TokenShow { fingerprint } = &req {
                return Response::error(format!("no token {fingerprint}"));
            }
            Response::ok(&serde_json::json!({ "op": req.op(), "uid": peer.uid }))
        }

        fn subscribe(&self, _peer: Peer) -> Result<broadcast::Receiver<Record>, String> {
            Ok(self.events.subscribe())
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        path: PathBuf,
        events: broadcast::Sender<Record>,
        task: JoinHandle<()>,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    fn my_uid() -> u32 {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() }
    }

    fn start(opts: ServerOptions) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run").join("control.sock");
        let listener = bind(&path).unwrap();
        let (events, _) = broadcast::channel(16);
        let handler = Arc::new(TestHandler {
            events: events.clone(),
        });
        let task = tokio::spawn(serve(listener, handler, opts));
        Fixture {
            _dir: dir,
            path,
            events,
            task,
        }
    }

    fn opts() -> ServerOptions {
        ServerOptions {
            read_timeout: Duration::from_millis(300),
            allowed_uid: my_uid(),
            ..Default::default()
        }
    }

    /// Sends raw bytes and reads one response line (None on EOF).
    async fn raw(stream: &mut BufReader<UnixStream>, bytes: &[u8]) -> Option<serde_json::Value> {
        stream.get_mut().write_all(bytes).await.unwrap();
        read_json(stream).await
    }

    async fn read_json(stream: &mut BufReader<UnixStream>) -> Option<serde_json::Value> {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read_line(&mut line))
            .await
            .expect("server answered within 5 s")
            .unwrap();
        (n != 0).then(|| serde_json::from_str(&line).expect("response is JSON"))
    }

    async fn connect(path: &Path) -> BufReader<UnixStream> {
        BufReader::new(UnixStream::connect(path).await.unwrap())
    }

    async fn assert_status_works(path: &Path) {
        let mut c = Client::connect(path).await.unwrap();
        let resp = c.request(&Request::Status).await.unwrap();
        assert!(resp.ok, "{resp:?}");
        assert_eq!(resp.body["op"], "status");
        assert_eq!(resp.body["uid"], my_uid());
    }

    fn error_of(v: &serde_json::Value) -> &str {
        assert_eq!(v["ok"], false, "{v}");
        v["error"].as_str().unwrap()
    }

    #[tokio::test]
    async fn socket_is_private_and_stale_sockets_are_replaced() {
        let fx = start(opts());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&fx.path), 0o600);
        assert_eq!(mode(fx.path.parent().unwrap()), 0o700);
        // A second daemon must not steal a live socket.
        assert!(matches!(bind(&fx.path), Err(ControlError::InUse { .. })));
        assert_status_works(&fx.path).await;

        // A socket file nobody listens on is replaced.
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join("control.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        let _l = bind(&stale).unwrap();
        // A regular file is not ours to delete.
        let file = dir.path().join("not-a-socket");
        std::fs::write(&file, "x").unwrap();
        assert!(matches!(bind(&file), Err(ControlError::NotASocket { .. })));
    }

    #[tokio::test]
    async fn valid_and_invalid_requests_on_one_connection() {
        let fx = start(opts());
        let mut s = connect(&fx.path).await;
        let ok = raw(&mut s, b"{\"op\":\"status\"}\n").await.unwrap();
        assert_eq!(ok["ok"], true);
        assert_eq!(ok["uid"], my_uid());

        let bad = raw(&mut s, b"{\"op\": \"status\"\n").await.unwrap();
        assert!(error_of(&bad).contains("not valid JSON"));
        let bad = raw(&mut s, b"{\"op\":\"status\xff\xfe\"}\n").await.unwrap();
        assert!(error_of(&bad).contains("UTF-8"));
        let bad = raw(&mut s, b"{\"op\":\"self.destruct\"}\n").await.unwrap();
        assert!(error_of(&bad).contains("unknown op"));
        let bad = raw(&mut s, b"{\"op\":\"token.revoke\"}\n").await.unwrap();
        assert!(error_of(&bad).contains("missing field `fingerprint`"));
        let bad = raw(&mut s, b"{\"contract\":\"x\"}\n").await.unwrap();
        assert!(error_of(&bad).contains("no \"op\""));
        let handler_err = raw(
            &mut s,
            b"{\"op\":\"token.show\",\"fingerprint\":\"0123456789abcdef0123456789abcdef\"}\n",
        )
        .await
        .unwrap();
        assert_eq!(
            error_of(&handler_err),
            "no token 0123456789abcdef0123456789abcdef"
        );

        // The same connection still works after all that.
        let ok = raw(&mut s, b"{\"op\":\"reload\"}\n").await.unwrap();
        assert_eq!(ok["op"], "reload");
    }

    #[tokio::test]
    async fn oversized_line_gets_an_error_then_close() {
        let fx = start(opts());
        let s = UnixStream::connect(&fx.path).await.unwrap();
        let (rd, mut wr) = s.into_split();
        let writer = tokio::spawn(async move {
            let mut big = vec![b'{'; 1024 * 1024];
            big.push(b'\n');
            // The server stops reading after 64 KiB, so this write fails part-way.
            let _ = wr.write_all(&big).await;
        });
        let mut rd = BufReader::new(rd);
        let mut line = String::new();
        rd.read_line(&mut line).await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert!(error_of(&v).contains("longer than 65536"));
        let mut rest = Vec::new();
        let n = rd.read_to_end(&mut rest).await.unwrap_or(0);
        assert_eq!(n, 0, "connection closed after the error");
        writer.await.unwrap();
        assert_status_works(&fx.path).await;
    }

    #[tokio::test]
    async fn half_written_request_times_out() {
        let fx = start(opts());
        let mut s = connect(&fx.path).await;
        let started = std::time::Instant::now();
        let v = raw(&mut s, b"{\"op\":\"sta").await.unwrap();
        assert!(error_of(&v).contains("timed out"));
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(read_json(&mut s).await.is_none(), "closed after timeout");

        // A client that connects and says nothing is simply hung up on.
        let mut idle = connect(&fx.path).await;
        assert!(read_json(&mut idle).await.is_none());
        assert_status_works(&fx.path).await;
    }

    #[tokio::test]
    async fn non_root_callers_are_refused() {
        let fx = start(ServerOptions {
            allowed_uid: my_uid().wrapping_add(1),
            ..opts()
        });
        let mut c = Client::connect(&fx.path).await.unwrap();
        let resp = c.request(&Request::Status).await.unwrap();
        assert!(!resp.ok);
        assert!(resp.error.unwrap().contains("permission denied"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_clients_and_misbehaving_ones() {
        let fx = start(ServerOptions {
            max_connections: 32,
            ..opts()
        });
        // Squatters that open a request and never finish it.
        let mut squatters = Vec::new();
        for _ in 0..10 {
            let mut s = UnixStream::connect(&fx.path).await.unwrap();
            s.write_all(b"{\"op\":").await.unwrap();
            squatters.push(s);
        }
        let mut tasks = Vec::new();
        for i in 0..200u32 {
            let path = fx.path.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = Client::connect(&path).await.unwrap();
                for _ in 0..5 {
                    let req = if i % 2 == 0 {
                        Request::Status
                    } else {
                        Request::Top { limit: Some(3) }
                    };
                    let resp = c.request(&req).await.unwrap();
                    assert!(resp.ok);
                    assert_eq!(resp.body["op"], req.op());
                }
            }));
        }
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("clients served")
                .unwrap();
        }
        drop(squatters);
        assert_status_works(&fx.path).await;
    }

    fn event(fp: u64, verdict: Verdict) -> Record {
        let ev = agent_common::Event {
            time_ns: fp,
            fingerprint: Fingerprint([fp, fp]),
            verdict: verdict as u32,
            action: agent_common::action::DROPPED,
            ..Default::default()
        };
        Record::Decision(EventRecord::from_event(&ev, &EventContext::default()))
    }

    #[tokio::test]
    async fn event_subscription_filters_and_ends_on_disconnect() {
        let fx = start(opts());
        let c = Client::connect(&fx.path).await.unwrap();
        let mut sub = c
            .subscribe(EventFilter {
                fingerprint: None,
                verdict: Some(EventKind::Verdict(Verdict::Revoked)),
            })
            .await
            .unwrap();
        assert_eq!(fx.events.receiver_count(), 1);
        fx.events.send(event(1, Verdict::Throttled)).unwrap();
        fx.events.send(event(2, Verdict::Revoked)).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            got,
            Some(StreamItem::Event(Box::new(event(2, Verdict::Revoked))))
        );

        // Requests on other connections are unaffected while a stream is open.
        assert_status_works(&fx.path).await;

        drop(sub);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while fx.events.receiver_count() != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "subscriber not released"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
