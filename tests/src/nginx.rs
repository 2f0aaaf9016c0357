//! The TLS-terminating gateway: a private nginx (Debian's binary) in a namespace, with its
//! own prefix, logs, pid file and a self-signed certificate made at start-up, proxying
//! plaintext HTTP/1.1 with upstream keep-alive. Each route is one TLS listen port.
//!
//! What a client of the gateway sees when the hop after nginx fails (proven by the
//! topology test with the upstream's `Behavior`):
//! - request dropped (no answer ever): `504 Gateway Time-out` after `read_timeout`;
//! - connection reset by the upstream side: `502 Bad Gateway` at once;
//! - upstream port closed (connect refused): `502 Bad Gateway` at once.
//!
//! `proxy_next_upstream off` makes each client request exactly one upstream attempt, so a
//! refused request is never silently retried on a fresh connection and counts stay exact.
//! `max_fails=0` keeps nginx from marking the only server down for 10 s after a failure.

use std::{
    fmt::Write as _,
    fs, io,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::netns::{self, Netns, NetnsError};

#[derive(Debug, thiserror::Error)]
pub enum NginxError {
    #[error("cannot create nginx temp dir: {source}")]
    TempDir { source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("certificate generation failed (is openssl installed?): {source}")]
    Cert { source: NetnsError },
    #[error("cannot start nginx (is the Debian package nginx-light installed?): {source}")]
    Spawn { source: io::Error },
    #[error("nginx exited during start-up ({status}); error log:\n{log}")]
    Exited {
        status: std::process::ExitStatus,
        log: String,
    },
    #[error("nginx did not listen on port {port} within {waited:?}; error log:\n{log}")]
    NotListening {
        port: u16,
        waited: Duration,
        log: String,
    },
    #[error("nginx started {got} of {want} worker processes; error log:\n{log}")]
    NoWorkers {
        want: usize,
        got: usize,
        log: String,
    },
    #[error("probing nginx: {source}")]
    Probe { source: NetnsError },
}

/// One TLS listener and where it proxies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Used as the nginx `upstream` block name and in the access log.
    pub name: String,
    /// TLS port nginx listens on (all addresses, IPv4 and IPv6).
    pub listen_port: u16,
    /// Plaintext HTTP/1.1 upstream, as reachable from the gateway namespace.
    pub upstream: SocketAddr,
}

/// A plaintext origin port: nginx answers every request itself (`200 ok`), so its access
/// log is the ground truth of which requests a server parsed from the byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub listen_port: u16,
    /// HTTP/2 with prior knowledge (h2c) instead of HTTP/1.x.
    pub http2: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NginxConfig {
    pub routes: Vec<Route>,
    pub origins: Vec<Origin>,
    /// Extra subjectAltName IPs for the certificate (clients use `-k`, this is cosmetic).
    pub cert_ips: Vec<IpAddr>,
    pub worker_processes: u32,
    /// Time to wait for the upstream's response; a dropped request surfaces as 504 after it.
    pub read_timeout: Duration,
    pub connect_timeout: Duration,
    /// Idle upstream connections nginx keeps per worker.
    pub upstream_keepalive: u32,
}

impl Default for NginxConfig {
    fn default() -> Self {
        Self {
            routes: Vec::new(),
            origins: Vec::new(),
            cert_ips: Vec::new(),
            // One worker: all client connections share one upstream keep-alive pool, so
            // tests can reason about upstream connection counts.
            worker_processes: 1,
            // Short, so a request Rampart drops fails the client in ~2 s, not 60 s.
            read_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            upstream_keepalive: 32,
        }
    }
}

/// A running nginx; stopped (TERM, then KILL) and its files removed on drop.
#[derive(Debug)]
pub struct Nginx {
    dir: Option<tempfile::TempDir>,
    child: Option<Child>,
    config: NginxConfig,
}

impl Nginx {
    /// Writes config and certificate, starts nginx in `ns` and waits until every route's
    /// port accepts connections.
    pub fn start(ns: &Netns, config: NginxConfig) -> Result<Self, NginxError> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}{}-nginx-", netns::PREFIX, std::process::id()))
            .tempdir()
            .map_err(|source| NginxError::TempDir { source })?;
        netns::register_dir(dir.path());
        // From here on Drop removes the dir, also on the error paths below.
        let mut nginx = Self {
            dir: Some(dir),
            child: None,
            config,
        };
        let dir = nginx.dir().to_owned();
        make_cert(&dir, &nginx.config.cert_ips)?;
        let conf = dir.join("nginx.conf");
        write(&conf, &render_config(&dir, &nginx.config))?;

        let mut cmd = ns.command("nginx");
        cmd.arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            // Start-up errors go here instead of the system log location.
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        nginx.child = Some(cmd.spawn().map_err(|source| NginxError::Spawn { source })?);
        nginx.wait_listening(ns, Duration::from_secs(5))?;
        Ok(nginx)
    }

    fn wait_listening(&mut self, ns: &Netns, timeout: Duration) -> Result<(), NginxError> {
        let start = Instant::now();
        let ports = self.config.routes.iter().map(|r| r.listen_port);
        let ports: Vec<u16> = ports
            .chain(self.config.origins.iter().map(|o| o.listen_port))
            .collect();
        for port in ports {
            let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
            loop {
                if let Some(child) = self.child.as_mut() {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(NginxError::Exited {
                            status,
                            log: self.error_log(),
                        });
                    }
                }
                let up = ns
                    .run(|| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
                    .map_err(|source| NginxError::Probe { source })?;
                if up {
                    break;
                }
                if start.elapsed() > timeout {
                    return Err(NginxError::NotListening {
                        port,
                        waited: timeout,
                        log: self.error_log(),
                    });
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
        // The master listens before it forks workers; wait for them so callers (and the
        // process accounting in tests) see the finished instance.
        let master = self.pid().unwrap_or_default();
        let want = self.config.worker_processes.max(1) as usize;
        let children = format!("/proc/{master}/task/{master}/children");
        loop {
            let n = fs::read_to_string(&children)
                .map(|s| s.split_whitespace().count())
                .unwrap_or(0);
            if n >= want {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(NginxError::NoWorkers {
                    want,
                    got: n,
                    log: self.error_log(),
                });
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().expect("dir lives until drop").path()
    }

    pub fn config(&self) -> &NginxConfig {
        &self.config
    }

    /// Master process id (workers are its children).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// PEM certificate the gateway presents.
    pub fn cert_path(&self) -> PathBuf {
        self.dir().join("cert.pem")
    }

    pub fn error_log(&self) -> String {
        fs::read_to_string(self.dir().join("error.log")).unwrap_or_default()
    }

    /// One line per request: client, port, request line, status, upstream address and
    /// status, client connection number and its request count, timings. Never headers.
    pub fn access_log(&self) -> String {
        fs::read_to_string(self.dir().join("access.log")).unwrap_or_default()
    }

    /// Fast shutdown (SIGTERM closes client connections at once), SIGKILL after 2 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = self.dir.take() {
            netns::unregister_dir(dir.path());
        }
    }
}

fn write(path: &Path, text: &str) -> Result<(), NginxError> {
    fs::write(path, text).map_err(|source| NginxError::Write {
        path: path.to_owned(),
        source,
    })
}

/// P-256 self-signed certificate: EC keygen is milliseconds, RSA would dominate start-up.
fn make_cert(dir: &Path, ips: &[IpAddr]) -> Result<(), NginxError> {
    let mut san = String::from("subjectAltName=DNS:gateway.rampart.test,IP:127.0.0.1");
    for ip in ips {
        let _ = write!(san, ",IP:{ip}");
    }
    let mut cmd = Command::new("openssl");
    cmd.args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .arg("ec_paramgen_curve:prime256v1")
        .args(["-nodes", "-days", "2", "-subj", "/CN=gateway.rampart.test"])
        .arg("-addext")
        .arg(san)
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"));
    netns::run_checked(&mut cmd).map_err(|source| NginxError::Cert { source })?;
    Ok(())
}

fn render_config(dir: &Path, cfg: &NginxConfig) -> String {
    let d = dir.display();
    let read = cfg.read_timeout.as_millis();
    let connect = cfg.connect_timeout.as_millis();
    let mut upstreams = String::new();
    let mut servers = String::new();
    for r in &cfg.routes {
        let _ = write!(
            upstreams,
            r#"
    upstream {name} {{
        # max_fails=0: never mark the only server down after a refused/dropped request.
        server {addr} max_fails=0;
        keepalive {ka};
        keepalive_timeout 60s;
        keepalive_requests 100000;
    }}
"#,
            name = r.name,
            addr = r.upstream,
            ka = cfg.upstream_keepalive,
        );
        let _ = write!(
            servers,
            r#"
    server {{
        listen {port} ssl;
        listen [::]:{port} ssl;
        ssl_certificate {d}/cert.pem;
        ssl_certificate_key {d}/key.pem;
        location / {{
            proxy_pass http://{name};
            proxy_http_version 1.1;
            # Empty Connection header keeps upstream connections alive across requests.
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header Authorization $http_authorization;
            proxy_connect_timeout {connect}ms;
            proxy_send_timeout {read}ms;
            proxy_read_timeout {read}ms;
            proxy_next_upstream off;
            # Stream responses; never spill anything to disk.
            proxy_buffering off;
            proxy_max_temp_file_size 0;
        }}
    }}
"#,
            port = r.listen_port,
            name = r.name,
        );
    }
    for o in &cfg.origins {
        let _ = write!(
            servers,
            r#"
    server {{
        listen {port}{h2};
        listen [::]:{port}{h2};
        location / {{
            return 200 "ok\n";
        }}
    }}
"#,
            port = o.listen_port,
            h2 = if o.http2 { " http2" } else { "" },
        );
    }
    format!(
        r#"# Generated by rampart-tests; one private instance per topology.
daemon off;
master_process on;
user root root;
worker_processes {workers};
pid {d}/nginx.pid;
lock_file {d}/nginx.lock;
error_log {d}/error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    default_type text/plain;
    log_format rmp '$remote_addr:$remote_port port=$server_port "$request" $status '
                   'up=$upstream_addr upstatus=$upstream_status '
                   'conn=$connection reqs=$connection_requests '
                   'rt=$request_time urt=$upstream_response_time';
    access_log {d}/access.log rmp;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    # Bodies up to 1 MiB stay in memory and are forwarded whole.
    client_max_body_size 1m;
    client_body_buffer_size 1m;
    keepalive_timeout 60s;
    keepalive_requests 100000;
    ssl_protocols TLSv1.2 TLSv1.3;
{upstreams}{servers}}}
"#,
        workers = cfg.worker_processes,
    )
}
