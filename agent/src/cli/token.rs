//! `rampart token issue|rotate|revoke|list|show`: the token lifecycle, through the daemon.
//!
//! A new token is printed exactly once, alone on stdout (so `T=$(rampart token issue ...)`
//! captures just it); its fingerprint and details go to stderr.

use std::{
    io::{self, Write},
    path::Path,
    time::{Duration, UNIX_EPOCH},
};

use anyhow::{bail, Context as _};
use rampart::control::{
    protocol::{IssuedBody, ListBody, RevokeBody, ShowBody, TokenView},
    Client, Fp, Request, Response,
};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Mint a token; it is printed once on stdout and never stored.
    Issue {
        /// Ramp contract name from the policy.
        #[arg(long)]
        contract: String,
        /// Scope name from the policy (repeatable; "*" for every scope).
        #[arg(long = "scope", value_name = "SCOPE")]
        scopes: Vec<String>,
        /// Lifetime, e.g. 30d, 12h (default: never expires).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Free-form note, e.g. the client it was issued to.
        #[arg(long)]
        label: Option<String>,
    },
    /// Issue a successor with the same contract and scopes; the old token stays valid for
    /// the grace period.
    Rotate {
        #[arg(value_name = "FINGERPRINT", value_parser = parse_fp)]
        fingerprint: Fp,
        /// How long the old token keeps working, e.g. 1h (default: it stops now).
        #[arg(long, value_parser = humantime::parse_duration)]
        grace: Option<Duration>,
        /// Lifetime of the new token (default: that of the old one).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// Revoke a token; enforced by the kernel before this returns.
    Revoke {
        #[arg(value_name = "FINGERPRINT", value_parser = parse_fp)]
        fingerprint: Fp,
        /// Why, for the audit log.
        #[arg(long)]
        reason: Option<String>,
    },
    /// List active tokens.
    List {
        /// Only tokens expiring within this long, e.g. 24h.
        #[arg(long, value_parser = humantime::parse_duration)]
        expiring: Option<Duration>,
        /// Only tokens unused for this long, e.g. 30d.
        #[arg(long, value_parser = humantime::parse_duration)]
        idle: Option<Duration>,
        /// Include revoked and expired tokens.
        #[arg(long)]
        all: bool,
        /// Only tokens on this contract.
        #[arg(long, value_name = "CONTRACT")]
        contract: Option<String>,
        /// Print at most this many tokens (then say how to go on).
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// Start after this token (tokens are listed in the order they were recorded).
        #[arg(long, value_name = "FINGERPRINT", value_parser = parse_fp)]
        after: Option<Fp>,
        /// A JSON array of the tokens, one per line.
        #[arg(long)]
        json: bool,
    },
    /// Import tokens by fingerprint from a JSON-lines file, all or none (see `export`).
    Import {
        #[arg(value_name = "FILE")]
        file: std::path::PathBuf,
    },
    /// Print the active tokens as JSON lines: fingerprint, contract, scopes, not_before,
    /// expires, label (never a token).
    Export,
    /// A token's contract, ramp stage, rate, requests by verdict and validity.
    Show {
        #[arg(value_name = "FINGERPRINT", value_parser = parse_fp)]
        fingerprint: Fp,
        #[arg(long)]
        json: bool,
    },
}

fn parse_fp(s: &str) -> Result<Fp, String> {
    super::parse_fingerprint(s).map(Fp)
}

pub async fn run(config: &Path, args: Args) -> anyhow::Result<()> {
    let socket = super::load_config(config)?.control_socket;
    let mut client = Client::connect(&socket).await?;
    exec(
        &mut client,
        args.command,
        &mut io::stdout().lock(),
        &mut io::stderr().lock(),
    )
    .await
}

fn secs(d: Duration) -> u64 {
    d.as_secs()
}

async fn exec(
    client: &mut Client,
    command: Command,
    out: &mut impl Write,
    err: &mut impl Write,
) -> anyhow::Result<()> {
    match command {
        Command::Issue {
            contract,
            scopes,
            ttl,
            label,
        } => {
            let req = Request::TokenIssue {
                contract,
                scopes,
                ttl_secs: ttl.map(secs),
                label,
            };
            let body: IssuedBody = call(client, &req).await?;
            print_issued(&body, out, err)
        }
        Command::Rotate {
            fingerprint,
            grace,
            ttl,
        } => {
            let req = Request::TokenRotate {
                fingerprint,
                grace_secs: grace.map(secs),
                ttl_secs: ttl.map(secs),
            };
            let body: IssuedBody = call(client, &req).await?;
            print_issued(&body, out, err)
        }
        Command::Revoke {
            fingerprint,
            reason,
        } => {
            let body: RevokeBody = call(
                client,
                &Request::TokenRevoke {
                    fingerprint,
                    reason,
                },
            )
            .await?;
            let what = if body.already {
                "was already revoked"
            } else {
                "revoked"
            };
            writeln!(
                out,
                "{} {what} at {} ({})",
                body.fingerprint,
                time(body.revoked_at),
                body.reason
            )?;
            Ok(())
        }
        Command::List {
            expiring,
            idle,
            all,
            contract,
            limit,
            after,
            json,
        } => {
            let query = ListQuery {
                expiring_within_secs: expiring.map(secs),
                idle_secs: idle.map(secs),
                all,
                contract,
                limit,
                after,
                json,
            };
            list(client, query, LIST_PAGE, out, err).await
        }
        Command::Import { file } => super::token_io::import(client, file, out, err).await,
        Command::Export => super::token_io::export(client, out).await,
        Command::Show { fingerprint, json } => {
            let body: ShowBody = call(client, &Request::TokenShow { fingerprint }).await?;
            if json {
                serde_json::to_writer_pretty(&mut *out, &body.record)?;
                writeln!(out)?;
            } else {
                print_show(&body.record, out)?;
            }
            Ok(())
        }
    }
}

pub(super) async fn call<T: serde::de::DeserializeOwned>(
    client: &mut Client,
    req: &Request,
) -> anyhow::Result<T> {
    let resp: Response = client.request(req).await?;
    if !resp.ok {
        bail!(
            "{} failed: {}",
            req.op(),
            resp.error.as_deref().unwrap_or("unspecified error")
        );
    }
    resp.into_result()
        .with_context(|| format!("reading the daemon's {} response", req.op()))
}

fn print_issued(
    body: &IssuedBody,
    out: &mut impl Write,
    err: &mut impl Write,
) -> anyhow::Result<()> {
    let r = &body.record;
    writeln!(out, "{}", body.token)?;
    out.flush()?;
    writeln!(err, "fingerprint: {}", r.fingerprint)?;
    writeln!(err, "contract:    {}", r.contract)?;
    writeln!(err, "scopes:      {}", r.scopes.join(", "))?;
    writeln!(err, "expires:     {}", opt_time(r.expires_at))?;
    if let Some(old) = &body.old {
        writeln!(
            err,
            "replaces:    {} (valid until {})",
            old.fingerprint,
            opt_time(old.expires_at)
        )?;
    }
    writeln!(
        err,
        "The token above is shown only this once; rampart keeps just its fingerprint."
    )?;
    Ok(())
}

/// Tokens per `token.list` request: the daemon answers each in a few milliseconds,
/// and nothing holds more than a page in memory.
const LIST_PAGE: usize = 2048;

/// What `token list` was asked for.
struct ListQuery {
    expiring_within_secs: Option<u64>,
    idle_secs: Option<u64>,
    all: bool,
    contract: Option<String>,
    limit: Option<usize>,
    after: Option<Fp>,
    json: bool,
}

/// `token list`: `page` tokens per request to the daemon, each page printed as it comes.
async fn list(
    client: &mut Client,
    query: ListQuery,
    page: usize,
    out: &mut impl Write,
    err: &mut impl Write,
) -> anyhow::Result<()> {
    let (limit, mut after, json) = (query.limit, query.after, query.json);
    let mut printed = 0usize;
    if json {
        write!(out, "[")?;
    } else {
        print_header(out)?;
    }
    loop {
        let want = page.min(limit.map_or(usize::MAX, |l| l - printed));
        if want == 0 {
            break;
        }
        let req = Request::TokenList {
            expiring_within_secs: query.expiring_within_secs,
            idle_secs: query.idle_secs,
            all: query.all,
            contract: query.contract.clone(),
            after,
            limit: Some(u32::try_from(want).unwrap_or(u32::MAX)),
        };
        let body: ListBody = call(client, &req).await?;
        for t in &body.tokens {
            if json {
                writeln!(out, "{}", if printed == 0 { "" } else { "," })?;
                serde_json::to_writer(&mut *out, t)?;
            } else {
                print_row(t, out)?;
            }
            printed += 1;
        }
        out.flush()?;
        after = body.next;
        if after.is_none() {
            break;
        }
    }
    if json {
        writeln!(out, "\n]")?;
    }
    if let (Some(next), Some(_)) = (after, limit) {
        writeln!(
            err,
            "{printed} tokens shown; more may follow: --after {}",
            next.0
        )?;
    }
    Ok(())
}

fn print_header(out: &mut impl Write) -> io::Result<()> {
    writeln!(
        out,
        "{:<32}  {:<7}  {:<16}  {:<20}  {:<20}  LABEL",
        "FINGERPRINT", "STATUS", "CONTRACT", "EXPIRES", "LAST SEEN"
    )
}

fn print_row(t: &TokenView, out: &mut impl Write) -> io::Result<()> {
    let last = t
        .runtime
        .as_ref()
        .and_then(|r| r.last_seen)
        .map_or_else(|| "never".to_owned(), time);
    writeln!(
        out,
        "{:<32}  {:<7}  {:<16}  {:<20}  {:<20}  {}",
        t.fingerprint,
        t.status.as_str(),
        t.contract,
        opt_time(t.expires_at),
        last,
        t.label.as_deref().unwrap_or("")
    )
}

fn print_show(t: &TokenView, out: &mut impl Write) -> io::Result<()> {
    writeln!(out, "fingerprint:  {}", t.fingerprint)?;
    writeln!(out, "status:       {}", t.status.as_str())?;
    writeln!(out, "contract:     {}", t.contract)?;
    writeln!(out, "scopes:       {}", t.scopes.join(", "))?;
    if let Some(label) = &t.label {
        writeln!(out, "label:        {label}")?;
    }
    writeln!(out, "issued:       {}", time(t.issued_at))?;
    if let Some(nb) = t.not_before {
        writeln!(out, "not before:   {}", time(nb))?;
    }
    writeln!(out, "expires:      {}", opt_time(t.expires_at))?;
    if let Some(prev) = &t.rotated_from {
        writeln!(out, "rotated from: {prev}")?;
    }
    let Some(rt) = &t.runtime else {
        writeln!(out, "datapath:     no state (not seen, or not loaded)")?;
        return Ok(());
    };
    writeln!(out, "ramp stage:   {}", rt.stage)?;
    match rt.rate_per_sec {
        Some(r) => writeln!(out, "rate:         {r} req/s")?,
        None => writeln!(out, "rate:         unknown")?,
    }
    writeln!(out, "first seen:   {}", opt_time(rt.first_seen))?;
    writeln!(out, "last seen:    {}", opt_time(rt.last_seen))?;
    if rt.breaches > 0 {
        writeln!(out, "breaches:     {}", rt.breaches)?;
    }
    if let Some(p) = rt.penalty_until {
        writeln!(out, "penalty until {}", time(p))?;
    }
    if rt.requests.is_empty() {
        writeln!(out, "requests:     none")?;
    } else {
        writeln!(out, "requests:")?;
        for (verdict, n) in &rt.requests {
            writeln!(out, "  {verdict:<14} {n}")?;
        }
    }
    Ok(())
}

fn time(unix: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn opt_time(unix: Option<i64>) -> String {
    unix.map_or_else(|| "never".to_owned(), time)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use agent_common::{
        siphash::fingerprint, Fingerprint, FingerprintKey, TokenInfo, TokenState, Verdict,
        VERDICT_COUNT,
    };
    use rampart::{
        control::{self, Handler, Peer, ServerOptions},
        daemon::ops::{answer, DaemonOps},
        policy::CompiledPolicy,
        store::Store,
        token::{EnforceError, Enforcer, Lifecycle, TokenRuntime},
    };
    use tokio::sync::broadcast;

    use super::*;

    const POLICY: &str = r#"
[[contract]]
name = "standard"
stages = [{ after = "0s", rate = 10, burst = 5 }]

[[scope]]
name = "read"
methods = ["GET"]
prefix = "/v1/"
"#;

    #[derive(Default)]
    struct Kernel {
        revoked: Mutex<Vec<Fingerprint>>,
        installed: Mutex<Vec<Fingerprint>>,
    }

    impl Enforcer for Kernel {
        fn install(&self, fp: Fingerprint, _info: TokenInfo) -> Result<(), EnforceError> {
            self.installed.lock().unwrap().push(fp);
            Ok(())
        }
        fn revoke(&self, fp: Fingerprint) -> Result<(), EnforceError> {
            self.revoked.lock().unwrap().push(fp);
            Ok(())
        }
        fn runtime(&self, fp: Fingerprint) -> Option<TokenRuntime> {
            if !self.installed.lock().unwrap().contains(&fp) {
                return None;
            }
            let mut by_verdict = [0; VERDICT_COUNT];
            by_verdict[Verdict::Allow as usize] = 42;
            by_verdict[Verdict::Throttled as usize] = 3;
            Some(TokenRuntime {
                state: TokenState {
                    stage: 2,
                    ..Default::default()
                },
                by_verdict,
                rate_per_sec: Some(10.0),
            })
        }
    }

    struct Daemon {
        lc: Lifecycle,
        policy: CompiledPolicy,
    }

    /// Only the token ops are in these tests.
    struct NoDaemon;

    impl DaemonOps for NoDaemon {
        fn status(&self) -> Response {
            Response::error("not in this test")
        }
        fn reload(&self) -> Response {
            Response::error("not in this test")
        }
        fn top(&self, _limit: Option<usize>) -> Response {
            Response::error("not in this test")
        }
    }

    impl Handler for Daemon {
        async fn handle(&self, peer: Peer, req: Request) -> Response {
            answer(&self.lc, &self.policy, &NoDaemon, peer.uid, &req)
        }
        fn subscribe(
            &self,
            _peer: Peer,
        ) -> Result<broadcast::Receiver<rampart::telemetry::Record>, String> {
            Err("no events here".into())
        }
    }

    const KEY: FingerprintKey = FingerprintKey([7, 8]);

    async fn start(dir: &Path) -> (Arc<Kernel>, tokio::task::JoinHandle<()>, std::path::PathBuf) {
        let store = Arc::new(Store::open(dir).unwrap());
        let kernel = Arc::new(Kernel::default());
        let policy = CompiledPolicy::from_str(POLICY, Path::new("test.toml")).unwrap();
        let daemon = Arc::new(Daemon {
            lc: Lifecycle::new(store, kernel.clone(), KEY),
            policy,
        });
        let sock = dir.join("control.sock");
        let listener = control::bind(&sock).unwrap();
        let opts = ServerOptions {
            // SAFETY: geteuid has no preconditions.
            allowed_uid: unsafe { libc::geteuid() },
            ..Default::default()
        };
        let task = tokio::spawn(control::serve(listener, daemon, opts));
        (kernel, task, sock)
    }

    async fn cli(sock: &Path, command: Command) -> anyhow::Result<(String, String)> {
        let mut client = Client::connect(sock).await?;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        exec(&mut client, command, &mut out, &mut err).await?;
        Ok((String::from_utf8(out)?, String::from_utf8(err)?))
    }

    /// Issues `n` tokens; their fingerprints in issue order (the tokens are dropped).
    async fn issue_many(sock: &Path, n: usize) -> Vec<Fingerprint> {
        let mut fps = Vec::new();
        for _ in 0..n {
            let (out, _) = cli(
                sock,
                Command::Issue {
                    contract: "standard".into(),
                    scopes: vec!["read".into()],
                    ttl: None,
                    label: None,
                },
            )
            .await
            .unwrap();
            fps.push(fingerprint(&KEY, out.trim_end().as_bytes()));
        }
        fps
    }

    fn listed(out: &str) -> Vec<Fingerprint> {
        let views: Vec<TokenView> = serde_json::from_str(out).expect("a JSON array");
        views.iter().map(|v| v.fingerprint.0).collect()
    }

    /// `token list` pages through the daemon's tokens in issue order, each once, however
    /// many a request carries; `--limit` stops and says where to go on, `--after` goes on.
    #[tokio::test]
    async fn list_pages_through_every_token_in_issue_order() {
        let dir = tempfile::tempdir().unwrap();
        let (_kernel, task, sock) = start(dir.path()).await;
        let fps = issue_many(&sock, 7).await;
        let query = |limit: Option<usize>, after: Option<Fingerprint>| ListQuery {
            expiring_within_secs: None,
            idle_secs: None,
            all: false,
            contract: None,
            limit,
            after: after.map(Fp),
            json: true,
        };
        for page in [1, 2, 3, 7, 100] {
            let mut client = Client::connect(&sock).await.unwrap();
            let (mut out, mut err) = (Vec::new(), Vec::new());
            list(&mut client, query(None, None), page, &mut out, &mut err)
                .await
                .unwrap();
            assert_eq!(
                listed(&String::from_utf8(out).unwrap()),
                fps,
                "pages of {page}"
            );
            assert!(err.is_empty());
        }

        let list_cmd = |limit: Option<usize>, after: Option<Fingerprint>| Command::List {
            expiring: None,
            idle: None,
            all: false,
            contract: None,
            limit,
            after: after.map(Fp),
            json: true,
        };
        let (out, err) = cli(&sock, list_cmd(Some(3), None)).await.unwrap();
        assert_eq!(listed(&out), fps[..3]);
        assert!(err.contains(&format!("--after {}", fps[2])), "{err}");
        let (out, err) = cli(&sock, list_cmd(None, Some(fps[2]))).await.unwrap();
        assert_eq!(listed(&out), fps[3..]);
        assert!(err.is_empty(), "{err}");
        let (out, _) = cli(
            &sock,
            Command::List {
                expiring: None,
                idle: None,
                all: false,
                contract: None,
                limit: None,
                after: None,
                json: false,
            },
        )
        .await
        .unwrap();
        assert_eq!(
            out.lines().count(),
            1 + fps.len(),
            "a header and a row each"
        );
        task.abort();
    }

    #[tokio::test]
    async fn issue_prints_token_once_then_list_show_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let (kernel, task, sock) = start(dir.path()).await;

        let (out, err) = cli(
            &sock,
            Command::Issue {
                contract: "standard".into(),
                scopes: vec!["read".into()],
                ttl: Some(Duration::from_secs(86_400)),
                label: Some("billing".into()),
            },
        )
        .await
        .unwrap();
        // stdout is exactly the token and a newline.
        let token = out.strip_suffix('\n').expect("newline-terminated");
        assert!(token.starts_with("rmp_") && !token.contains('\n'));
        let fp = fingerprint(&KEY, token.as_bytes());
        let hex = fp.to_string();
        assert!(
            err.contains(&format!("fingerprint: {hex}")),
            "stderr: {err}"
        );
        assert!(
            !err.contains(token),
            "fingerprint {hex}: token leaked to stderr"
        );
        assert_eq!(*kernel.installed.lock().unwrap(), vec![fp]);

        let (out, _) = cli(
            &sock,
            Command::List {
                expiring: Some(Duration::from_secs(2 * 86_400)),
                idle: None,
                all: false,
                contract: None,
                limit: None,
                after: None,
                json: true,
            },
        )
        .await
        .unwrap();
        let listed: Vec<TokenView> = serde_json::from_str(&out).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].fingerprint, Fp(fp));
        assert_eq!(listed[0].label.as_deref(), Some("billing"));
        assert!(
            !out.contains(token),
            "fingerprint {hex}: token in list output"
        );

        let (out, _) = cli(
            &sock,
            Command::Show {
                fingerprint: Fp(fp),
                json: false,
            },
        )
        .await
        .unwrap();
        assert!(out.contains("contract:     standard"), "{out}");
        assert!(out.contains("ramp stage:   2"), "{out}");
        assert!(out.contains("rate:         10 req/s"), "{out}");
        assert!(out.contains("allow          42"), "{out}");
        assert!(out.contains("throttled      3"), "{out}");

        let (out, _) = cli(
            &sock,
            Command::Revoke {
                fingerprint: Fp(fp),
                reason: Some("test".into()),
            },
        )
        .await
        .unwrap();
        assert!(out.starts_with(&format!("{hex} revoked at ")), "{out}");
        assert_eq!(*kernel.revoked.lock().unwrap(), vec![fp]);

        // Revoked tokens drop out of the default listing and cannot be rotated.
        let (out, _) = cli(
            &sock,
            Command::List {
                expiring: None,
                idle: None,
                all: false,
                contract: None,
                limit: None,
                after: None,
                json: false,
            },
        )
        .await
        .unwrap();
        assert_eq!(out.lines().count(), 1, "header only: {out}");
        let e = cli(
            &sock,
            Command::Rotate {
                fingerprint: Fp(fp),
                grace: None,
                ttl: None,
            },
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("not active"), "{e}");

        let e = cli(
            &sock,
            Command::Issue {
                contract: "gold".into(),
                scopes: vec!["read".into()],
                ttl: None,
                label: None,
            },
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("unknown contract `gold`"), "{e}");
        task.abort();
    }
}
