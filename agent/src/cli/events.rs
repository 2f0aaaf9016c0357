//! `rampart events`: datapath decisions other than allow, and the daemon's expiry warnings
//! (verdict column `expiring`).
//!
//! With `--follow`, streams live events from the daemon's control socket. Without it, prints
//! the most recent recorded events from the configured export file (and its rotations), so
//! a plain `rampart events` answers "what just happened" like `journalctl` does.

use std::{
    io::{self, Write},
    path::Path,
};

use agent_common::Fingerprint;
use anyhow::{bail, Context as _};
use rampart::{
    config::Config,
    control::{Client, EventFilter, EventKind, Fp, StreamItem},
    telemetry::{export::numbered, Record},
};

use super::parse_fingerprint;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Stream live events from the daemon until interrupted.
    #[arg(long, short = 'f')]
    follow: bool,
    /// Only events of this token fingerprint (32 hex digits).
    #[arg(long, value_name = "FP", value_parser = parse_fingerprint)]
    token: Option<Fingerprint>,
    /// Only events with this verdict (missing, malformed, incomplete, unknown, revoked,
    /// not_yet_valid, expired, out_of_scope, throttled), or `expiring` for only the
    /// warnings of tokens about to expire (which any other verdict leaves out).
    #[arg(long, value_name = "V", value_parser = parse_verdict)]
    verdict: Option<EventKind>,
    /// Print JSON lines instead of one-liners.
    #[arg(long)]
    json: bool,
    /// Without --follow: print at most this many recorded events (the most recent).
    #[arg(long, short = 'n', default_value_t = 100)]
    lines: usize,
}

pub async fn run(config: &Path, args: Args) -> anyhow::Result<()> {
    let config = super::load_config(config)?;
    let mut out = io::stdout();
    if args.follow {
        follow(&config, &args, &mut out).await
    } else {
        recorded(&config, &args, &mut out)
    }
}

impl Args {
    fn filter(&self) -> EventFilter {
        EventFilter {
            fingerprint: self.token.map(Fp),
            verdict: self.verdict,
        }
    }
}

/// Live events, as the daemon records them; it applies the filter before sending.
async fn follow(config: &Config, args: &Args, out: &mut impl Write) -> anyhow::Result<()> {
    let client = Client::connect(&config.control_socket).await?;
    let mut events = client.subscribe(args.filter()).await?;
    loop {
        let item = tokio::select! {
            item = events.next() => item?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        match item {
            None => bail!("the daemon closed the event stream"),
            Some(StreamItem::Lagged { lagged }) => {
                eprintln!("rampart: {lagged} events skipped: this reader fell behind");
            }
            Some(StreamItem::Event(ev)) => {
                if !print(out, &ev, args.json)? {
                    return Ok(());
                }
            }
        }
    }
}

fn recorded(config: &Config, args: &Args, out: &mut impl Write) -> anyhow::Result<()> {
    let Some(path) = &config.events.export_file else {
        bail!(
            "no event export file is configured (events.export_file); \
             use --follow to stream live events"
        );
    };
    let filter = args.filter();
    // Newest file first, until enough records are gathered.
    let mut chunks: Vec<Vec<Record>> = Vec::new();
    let mut have = 0;
    let mut skipped = 0usize;
    let files = std::iter::once(path.clone())
        .chain((1..=config.events.export_keep as usize).map(|n| numbered(path, n)));
    for file in files {
        if have >= args.lines {
            break;
        }
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => break,
            Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
        };
        let mut records = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<Record>(line) {
                Ok(r) if filter.matches(&r) => records.push(r),
                Ok(_) => {}
                // A line cut short by a crash, or written by another version.
                Err(_) => skipped += 1,
            }
        }
        have += records.len();
        chunks.push(records);
    }
    if skipped > 0 {
        eprintln!(
            "rampart: skipped {skipped} unreadable lines in {}",
            path.display()
        );
    }
    let all: Vec<Record> = chunks.into_iter().rev().flatten().collect();
    for r in &all[all.len().saturating_sub(args.lines)..] {
        if !print(out, r, args.json)? {
            break;
        }
    }
    Ok(())
}

/// Writes one record; `false` when stdout is gone (`rampart events | head`).
fn print(out: &mut impl Write, r: &Record, json: bool) -> anyhow::Result<bool> {
    let line = if json {
        r.to_json_line()?
    } else {
        r.to_string()
    };
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e).context("writing to stdout"),
    }
}

fn parse_verdict(s: &str) -> Result<EventKind, String> {
    EventKind::parse(s)
        .ok_or_else(|| format!("unknown verdict; one of: {}", EventKind::names().join(", ")))
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        sync::{Arc, Mutex},
    };

    use agent_common::{action, http::method, Event, Verdict};
    use rampart::{
        control::{self, Handler, Peer, Request, Response, ServerOptions},
        telemetry::{EventContext, EventExporter, EventRecord, ExpiryRecord},
    };
    use tokio::sync::{broadcast, Notify};

    use super::*;

    const FP_A: Fingerprint = Fingerprint([0xa, 0xa]);
    const FP_B: Fingerprint = Fingerprint([0xb, 0xb]);

    fn args(follow: bool, token: Option<Fingerprint>, verdict: Option<Verdict>) -> Args {
        Args {
            follow,
            token,
            verdict: verdict.map(EventKind::Verdict),
            json: false,
            lines: 3,
        }
    }

    fn config(dir: &Path, extra: &str) -> Config {
        let text = format!(
            "control_socket = \"{}\"\n{extra}",
            dir.join("control.sock").display()
        );
        Config::from_str(&text, &dir.join("rampart.toml")).unwrap()
    }

    const OFFSET: i64 = 37_000_000_000;

    fn ctx() -> EventContext {
        EventContext {
            tai_offset_ns: OFFSET,
            listeners: HashMap::from([(0, "api".to_owned())]),
        }
    }

    /// The kernel's event; `sport` tells events apart.
    fn kernel_event(fp: Fingerprint, verdict: Verdict, sport: u16) -> Event {
        Event {
            time_ns: 1_714_564_800_000_000_000 + OFFSET as u64,
            fingerprint: fp,
            verdict: verdict as u32,
            action: action::DROPPED,
            method: method::GET,
            listener: 0,
            saddr: "192.0.2.1"
                .parse::<std::net::Ipv4Addr>()
                .unwrap()
                .to_ipv6_mapped()
                .octets(),
            sport,
            daddr: "10.0.0.1"
                .parse::<std::net::Ipv4Addr>()
                .unwrap()
                .to_ipv6_mapped()
                .octets(),
            dport: 80,
            path_hash: 0xff,
            ..Default::default()
        }
    }

    /// An event as the daemon streams and exports it.
    fn record(fp: Fingerprint, verdict: Verdict, sport: u16) -> Record {
        Record::Decision(EventRecord::from_event(
            &kernel_event(fp, verdict, sport),
            &ctx(),
        ))
    }

    /// An expiry warning as the daemon streams and exports it.
    fn notice(fp: Fingerprint) -> Record {
        Record::Expiry(ExpiryRecord::new(
            1_714_564_800_000_000_000 + OFFSET as u64,
            &fp,
            1_714_568_400,
            None,
            OFFSET,
        ))
    }

    fn sports(out: &str) -> Vec<&str> {
        out.lines()
            .map(|l| l.split(" -> ").next().unwrap().rsplit(':').next().unwrap())
            .collect()
    }

    struct Daemon {
        events: Mutex<Option<broadcast::Sender<Record>>>,
        subscribed: Notify,
    }

    impl Handler for Daemon {
        async fn handle(&self, _peer: Peer, _req: Request) -> Response {
            Response::error("not in this test")
        }

        fn subscribe(&self, _peer: Peer) -> Result<broadcast::Receiver<Record>, String> {
            let rx = self.events.lock().unwrap().as_ref().unwrap().subscribe();
            self.subscribed.notify_one();
            Ok(rx)
        }
    }

    /// Runs `follow` with `args` against a daemon that streams `feed` and then closes.
    async fn follow_output(args: &Args, feed: Vec<Record>) -> String {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), "");
        let (tx, _) = broadcast::channel(16);
        let daemon = Arc::new(Daemon {
            events: Mutex::new(Some(tx)),
            subscribed: Notify::new(),
        });
        let listener = control::bind(&config.control_socket).unwrap();
        let opts = ServerOptions {
            // SAFETY: geteuid has no preconditions.
            allowed_uid: unsafe { libc::geteuid() },
            ..ServerOptions::default()
        };
        tokio::spawn(control::serve(listener, daemon.clone(), opts));

        let feed = async {
            daemon.subscribed.notified().await;
            let tx = daemon.events.lock().unwrap().take().unwrap();
            for ev in feed {
                tx.send(ev).unwrap();
            }
            // Dropping the last sender ends the stream.
        };
        let mut out = Vec::new();
        let (res, ()) = tokio::join!(follow(&config, args, &mut out), feed);
        assert!(res
            .unwrap_err()
            .to_string()
            .contains("closed the event stream"));
        String::from_utf8(out).unwrap()
    }

    fn mixed_feed() -> Vec<Record> {
        vec![
            record(FP_A, Verdict::Throttled, 1),
            notice(FP_B),
            record(FP_B, Verdict::Throttled, 2),
            notice(FP_A),
            record(FP_A, Verdict::Revoked, 3),
            record(FP_A, Verdict::Throttled, 4),
        ]
    }

    #[tokio::test]
    async fn follow_prints_the_filtered_live_stream() {
        let out = follow_output(
            &args(true, Some(FP_A), Some(Verdict::Throttled)),
            mixed_feed(),
        )
        .await;
        // A verdict filter leaves expiry warnings out.
        assert_eq!(sports(&out), ["1", "4"], "{out}");
        assert!(out.lines().all(|l| l.contains(&FP_A.to_string())));
    }

    #[tokio::test]
    async fn follow_shows_expiry_warnings_by_token_or_as_their_own_verdict() {
        let a = FP_A.to_string();
        let out = follow_output(&args(true, Some(FP_A), None), mixed_feed()).await;
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{out}");
        assert_eq!(
            lines[1],
            format!("2024-05-01T12:00:00.000000000Z expiring      token={a} expires=2024-05-01T13:00:00Z"),
        );

        let mut only = args(true, None, None);
        only.verdict = Some(EventKind::Expiring);
        only.json = true;
        let out = follow_output(&only, mixed_feed()).await;
        let got: Vec<Record> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let want: Vec<Record> = vec![notice(FP_B), notice(FP_A)];
        assert_eq!(got, want, "{out}");
        assert!(
            matches!(&got[1], Record::Expiry(e) if e.fingerprint.to_string() == a && e.kind == "expiring")
        );
    }

    #[test]
    fn streamed_events_are_the_exported_records() {
        let mut ev = kernel_event(FP_A, Verdict::Revoked, 5000);
        ev.saddr = "2001:db8::5"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        ev.listener = 4;
        let r = EventRecord::from_event(&ev, &ctx());
        assert_eq!(r.time, "2024-05-01T12:00:00.000000000Z");
        assert_eq!(r.fingerprint, Some(Fp(FP_A)));
        assert_eq!(r.verdict, "revoked");
        assert_eq!(r.listener, "listener_4");
        assert_eq!(r.src, "[2001:db8::5]:5000");
        assert_eq!(r.dst, "10.0.0.1:80");
    }

    #[test]
    fn recorded_prints_the_latest_matching_events_across_rotations() {
        let dir = tempfile::tempdir().unwrap();
        let export = dir.path().join("events.jsonl");
        let config = config(
            dir.path(),
            &format!(
                "[events]\nexport_file = \"{}\"\nexport_keep = 3\n",
                export.display()
            ),
        );
        let line_len = record(FP_A, Verdict::Throttled, 1)
            .to_json_line()
            .unwrap()
            .len() as u64
            + 1;
        // Two events per file: .2 holds 1-2, .1 holds 3-4, the current file 5-6.
        let mut x = EventExporter::new(&export, 2 * line_len, 3).unwrap();
        for port in 1..=6 {
            let fp = if port == 5 { FP_B } else { FP_A };
            x.write(&record(fp, Verdict::Throttled, port)).unwrap();
        }
        assert!(numbered(&export, 2).exists());

        let mut out = Vec::new();
        recorded(&config, &args(false, Some(FP_A), None), &mut out).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert_eq!(sports(&out), ["3", "4", "6"], "{out}");

        let mut out = Vec::new();
        let mut a = args(false, None, None);
        a.json = true;
        a.lines = 100;
        recorded(&config, &a, &mut out).unwrap();
        let parsed: Vec<Record> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let want: Vec<Record> = (1..=6)
            .map(|p| record(if p == 5 { FP_B } else { FP_A }, Verdict::Throttled, p))
            .collect();
        assert_eq!(parsed, want);

        // An expiry warning in the file: `--verdict expiring` finds only it, `--token` too.
        let warning = notice(FP_A);
        x.write(&warning).unwrap();
        let mut a = args(false, None, None);
        a.verdict = Some(EventKind::Expiring);
        let mut out = Vec::new();
        recorded(&config, &a, &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), format!("{warning}\n"));
        let mut out = Vec::new();
        recorded(&config, &args(false, Some(FP_A), None), &mut out).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert_eq!(
            out.lines().last(),
            Some(warning.to_string().as_str()),
            "{out}"
        );
        let mut out = Vec::new();
        recorded(
            &config,
            &args(false, None, Some(Verdict::Throttled)),
            &mut out,
        )
        .unwrap();
        assert!(!String::from_utf8(out).unwrap().contains("expiring"));
    }

    #[test]
    fn recorded_without_export_file_points_to_follow() {
        let dir = tempfile::tempdir().unwrap();
        let err = recorded(
            &config(dir.path(), ""),
            &args(false, None, None),
            &mut Vec::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("--follow"), "{err}");
    }

    #[test]
    fn argument_parsers_reject_nonsense() {
        assert_eq!(
            parse_fingerprint("0123456789abcdefFEDCBA9876543210").unwrap(),
            Fingerprint([0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210])
        );
        assert!(parse_fingerprint("0123").is_err());
        assert!(parse_fingerprint("+123456789abcdef0123456789abcdef").is_err());
        assert_eq!(
            parse_verdict("out_of_scope").unwrap(),
            EventKind::Verdict(Verdict::OutOfScope)
        );
        assert_eq!(parse_verdict("expiring").unwrap(), EventKind::Expiring);
        let err = parse_verdict("denied").unwrap_err();
        assert!(
            err.contains("throttled") && err.contains("expiring"),
            "{err}"
        );
    }
}
