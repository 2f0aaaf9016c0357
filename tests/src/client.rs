//! Clients that run inside the client namespace: one-shot curl, a keep-alive curl that
//! sends many requests over one TLS connection, and a wrk load generator.
//!
//! Tokens never appear on a command line, in an error or in `Debug` output: curl reads
//! headers from a 0600 temp file (`-H @file`), wrk from a Lua script file.

use std::{
    collections::BTreeMap,
    fmt::{self, Write as _},
    fs, io,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use crate::netns::{describe, Netns};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot prepare client files: {source}")]
    TempFile { source: io::Error },
    #[error("cannot run {program} (is the Debian package installed?): {source}")]
    Spawn { program: String, source: io::Error },
    #[error("`{command}` exited with {status}: {stderr}")]
    Exited {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("cannot parse {program} output line {line:?}")]
    Parse { program: String, line: String },
    #[error("{program} reported {got} transfers, expected {want}")]
    MissingTransfers {
        program: String,
        got: usize,
        want: usize,
    },
}

/// A bearer token. `Debug` never shows it, so it can sit in structs that end up in
/// assertion messages.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(String);

impl BearerToken {
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The plaintext, for writing into a header file only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// One HTTP request to send through the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// Path and query, starting with `/`.
    pub path: String,
    pub token: Option<BearerToken>,
    /// Sent as `X-Test-Id`, recorded by the upstream.
    pub test_id: Option<String>,
    pub body: Option<Vec<u8>>,
}

impl Request {
    pub fn get(path: &str) -> Self {
        Self {
            method: "GET".into(),
            path: path.into(),
            token: None,
            test_id: None,
            body: None,
        }
    }

    pub fn method(mut self, method: &str) -> Self {
        self.method = method.into();
        self
    }

    pub fn token(mut self, token: &BearerToken) -> Self {
        self.token = Some(token.clone());
        self
    }

    pub fn test_id(mut self, id: &str) -> Self {
        self.test_id = Some(id.into());
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = Some(body.into());
        self
    }
}

/// What curl saw for one transfer.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// HTTP status, 0 when no response arrived (connection failed, timed out, reset).
    pub status: u16,
    /// curl's exit code for this transfer (0 ok, 28 timeout, 52 empty reply, 56 recv
    /// error e.g. reset, 7 connect refused, 35 TLS failure).
    pub curl_exit: i32,
    /// curl's error text for this transfer, empty on success. Never contains headers.
    pub error: String,
    pub body: String,
    /// New connections this transfer opened: 1 for a fresh connection, 0 when reused.
    pub new_connections: u32,
    /// Client-side port: equal across transfers means the same TCP connection.
    pub local_port: u16,
    pub time_total: Duration,
}

/// curl in a namespace with a per-transfer deadline.
#[derive(Debug, Clone)]
pub struct Curl<'a> {
    ns: &'a Netns,
    base_url: String,
    timeout: Duration,
}

const WRITE_OUT: &str =
    "%{http_code}\\t%{num_connects}\\t%{local_port}\\t%{time_total}\\t%{exitcode}\\t%{errormsg}\\n";

impl<'a> Curl<'a> {
    /// `base_url` like `https://10.203.1.2:8443`; request paths are appended.
    pub fn new(ns: &'a Netns, base_url: &str) -> Self {
        Self {
            ns,
            base_url: base_url.trim_end_matches('/').to_owned(),
            timeout: Duration::from_secs(5),
        }
    }

    /// Per-transfer deadline (`--max-time`), 5 s by default.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// One request on a fresh connection.
    pub fn send(&self, req: &Request) -> Result<Response, ClientError> {
        let mut all = self.send_keepalive(std::slice::from_ref(req))?;
        Ok(all.remove(0))
    }

    /// All requests in one curl process, separated by `--next`: curl keeps its connection
    /// cache across them, so they share one TLS connection unless the server closes it.
    /// Check `new_connections`/`local_port` to see reuse.
    pub fn send_keepalive(&self, reqs: &[Request]) -> Result<Vec<Response>, ClientError> {
        let dir = private_tempdir()?;
        let mut cmd = self.ns.command("curl");
        for (i, req) in reqs.iter().enumerate() {
            if i > 0 {
                cmd.arg("--next");
            }
            let headers = dir.path().join(format!("h{i}"));
            write_private(&headers, header_file(req).as_bytes())?;
            cmd.args(["-sS", "-k", "--http1.1", "--max-time"])
                .arg(format!("{:.3}", self.timeout.as_secs_f64()))
                .arg("-o")
                .arg(dir.path().join(format!("b{i}")))
                .args(["-w", WRITE_OUT, "-X", &req.method])
                .arg("-H")
                .arg(format!("@{}", headers.display()));
            if let Some(body) = &req.body {
                let path = dir.path().join(format!("d{i}"));
                write_private(&path, body)?;
                cmd.arg("--data-binary").arg(format!("@{}", path.display()));
            }
            cmd.arg(format!("{}{}", self.base_url, req.path));
        }
        let command = describe(&cmd);
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .map_err(|source| ClientError::Spawn {
                program: "curl".into(),
                source,
            })?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut responses = Vec::with_capacity(reqs.len());
        for (i, line) in stdout.lines().enumerate() {
            let mut resp = parse_write_out(line)?;
            resp.body = fs::read_to_string(dir.path().join(format!("b{i}"))).unwrap_or_default();
            responses.push(resp);
        }
        if responses.len() != reqs.len() {
            // curl itself failed before transferring (bad option, missing file).
            if !out.status.success() && responses.is_empty() {
                return Err(ClientError::Exited {
                    command,
                    status: out.status,
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                });
            }
            return Err(ClientError::MissingTransfers {
                program: "curl".into(),
                got: responses.len(),
                want: reqs.len(),
            });
        }
        Ok(responses)
    }
}

fn header_file(req: &Request) -> String {
    let mut h = String::new();
    if let Some(token) = &req.token {
        let _ = writeln!(h, "Authorization: Bearer {}", token.expose());
    }
    if let Some(id) = &req.test_id {
        let _ = writeln!(h, "X-Test-Id: {id}");
    }
    h
}

fn parse_write_out(line: &str) -> Result<Response, ClientError> {
    let bad = || ClientError::Parse {
        program: "curl".into(),
        line: line.to_owned(),
    };
    let mut f = line.splitn(6, '\t');
    let mut next = || f.next().ok_or_else(bad);
    let status = next()?.parse().map_err(|_| bad())?;
    let new_connections = next()?.parse().map_err(|_| bad())?;
    let local_port = next()?.parse().map_err(|_| bad())?;
    let time_total = Duration::from_secs_f64(next()?.parse().map_err(|_| bad())?);
    let curl_exit = next()?.parse().map_err(|_| bad())?;
    let error = next()?.to_owned();
    Ok(Response {
        status,
        curl_exit,
        error,
        body: String::new(),
        new_connections,
        local_port,
        time_total,
    })
}

fn private_tempdir() -> Result<tempfile::TempDir, ClientError> {
    // TempDir is created 0700, so the token files inside are private to root.
    tempfile::Builder::new()
        .prefix(&format!(
            "{}{}-client-",
            crate::netns::PREFIX,
            std::process::id()
        ))
        .tempdir()
        .map_err(|source| ClientError::TempFile { source })
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), ClientError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| ClientError::TempFile { source })?;
    io::Write::write_all(&mut f, data).map_err(|source| ClientError::TempFile { source })
}

/// A wrk run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadConfig {
    /// Full URL including path, e.g. `https://10.203.1.2:8443/v1/items`.
    pub url: String,
    pub method: String,
    /// Used round-robin per request; empty sends no Authorization header.
    pub tokens: Vec<BearerToken>,
    pub test_id: Option<String>,
    pub threads: u32,
    pub connections: u32,
    /// Rounded up to whole seconds (wrk's resolution).
    pub duration: Duration,
    /// Per-request timeout, whole seconds; slower requests count as timeouts.
    pub timeout: Duration,
}

impl LoadConfig {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.into(),
            method: "GET".into(),
            tokens: Vec::new(),
            test_id: None,
            threads: 1,
            connections: 4,
            duration: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
        }
    }
}

/// Totals from a wrk run.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LoadReport {
    /// Completed responses (any status).
    pub requests: u64,
    pub duration: Duration,
    /// Count per HTTP status.
    pub statuses: BTreeMap<u16, u64>,
    pub connect_errors: u64,
    pub read_errors: u64,
    pub write_errors: u64,
    pub timeouts: u64,
}

impl LoadReport {
    pub fn status(&self, code: u16) -> u64 {
        self.statuses.get(&code).copied().unwrap_or(0)
    }

    pub fn requests_per_sec(&self) -> f64 {
        self.requests as f64 / self.duration.as_secs_f64().max(1e-9)
    }
}

/// Runs wrk inside `ns` and parses the totals our Lua `done` hook prints.
pub fn wrk(ns: &Netns, cfg: &LoadConfig) -> Result<LoadReport, ClientError> {
    let dir = private_tempdir()?;
    let script: PathBuf = dir.path().join("load.lua");
    write_private(&script, wrk_script(cfg).as_bytes())?;
    let mut cmd = ns.command("wrk");
    cmd.arg("-t")
        .arg(cfg.threads.max(1).to_string())
        .arg("-c")
        .arg(cfg.connections.max(cfg.threads).max(1).to_string())
        .arg("-d")
        .arg(format!("{}s", whole_secs(cfg.duration)))
        .arg("--timeout")
        .arg(format!("{}s", whole_secs(cfg.timeout)))
        .arg("-s")
        .arg(&script)
        .arg(&cfg.url)
        .stdin(Stdio::null());
    let command = describe(&cmd);
    let out = cmd.output().map_err(|source| ClientError::Spawn {
        program: "wrk".into(),
        source,
    })?;
    if !out.status.success() {
        // wrk prints usage and Lua errors on stdout.
        return Err(ClientError::Exited {
            command,
            status: out.status,
            stderr: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            ),
        });
    }
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

/// wrk only understands whole seconds; round up so a short run still runs.
fn whole_secs(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000_000))
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Lua string literal made only of `\ddd` escapes: safe for any token bytes.
fn lua_str(s: &str) -> String {
    let mut out = String::from("\"");
    for b in s.bytes() {
        let _ = write!(out, "\\{b}");
    }
    out.push('"');
    out
}

fn wrk_script(cfg: &LoadConfig) -> String {
    let tokens = cfg
        .tokens
        .iter()
        .map(|t| lua_str(t.expose()))
        .collect::<Vec<_>>()
        .join(", ");
    let test_id = cfg.test_id.as_deref().map_or("nil".into(), lua_str);
    format!(
        r#"-- Generated by rampart-tests.
local tokens = {{ {tokens} }}
local test_id = {test_id}
local method = {method}
local i = 0
local threads = {{}}
counts = {{}}

function setup(thread)
  table.insert(threads, thread)
end

function request()
  local headers = {{}}
  if #tokens > 0 then
    i = i + 1
    headers["Authorization"] = "Bearer " .. tokens[(i % #tokens) + 1]
  end
  if test_id then headers["X-Test-Id"] = test_id end
  return wrk.format(method, nil, headers, nil)
end

function response(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RMP totals %d %d %d %d %d %d\n", summary.requests, summary.duration,
    e.connect, e.read, e.write, e.timeout))
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("counts")) do
      io.write(string.format("RMP status %d %d\n", code, n))
    end
  end
end
"#,
        method = lua_str(&cfg.method),
    )
}

fn parse_wrk(stdout: &str) -> Result<LoadReport, ClientError> {
    let bad = |line: &str| ClientError::Parse {
        program: "wrk".into(),
        line: line.to_owned(),
    };
    let mut report = None;
    let mut statuses = BTreeMap::new();
    for line in stdout.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["RMP", "totals", rest @ ..] => {
                let n: Vec<u64> = rest
                    .iter()
                    .map(|f| f.parse().map_err(|_| bad(line)))
                    .collect::<Result<_, _>>()?;
                let [requests, duration_us, connect, read, write, timeout] = n[..] else {
                    return Err(bad(line));
                };
                report = Some(LoadReport {
                    requests,
                    duration: Duration::from_micros(duration_us),
                    connect_errors: connect,
                    read_errors: read,
                    write_errors: write,
                    timeouts: timeout,
                    ..Default::default()
                });
            }
            ["RMP", "status", code, n] => {
                let code: u16 = code.parse().map_err(|_| bad(line))?;
                let n: u64 = n.parse().map_err(|_| bad(line))?;
                *statuses.entry(code).or_insert(0) += n;
            }
            _ => {}
        }
    }
    let mut report = report.ok_or_else(|| bad("<no RMP totals line>"))?;
    report.statuses = statuses;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_never_in_debug() {
        let t = BearerToken::new("super-secret");
        let req = Request::get("/").token(&t);
        assert!(!format!("{req:?}").contains("super-secret"));
    }

    #[test]
    fn lua_strings_escape_every_byte() {
        assert_eq!(lua_str("a\""), "\"\\97\\34\"");
    }

    #[test]
    fn parses_wrk_totals_and_statuses() {
        let out = "Running 1s test\nRMP totals 10 1000000 0 1 0 2\nRMP status 200 7\nRMP status 200 1\nRMP status 504 2\n";
        let r = parse_wrk(out).unwrap();
        assert_eq!(r.requests, 10);
        assert_eq!(r.read_errors, 1);
        assert_eq!(r.timeouts, 2);
        assert_eq!(r.status(200), 8);
        assert_eq!(r.status(504), 2);
    }
}
