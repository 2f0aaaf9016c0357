//! `rampart top`: the busiest tokens, redrawn in place every interval.
//!
//! Polls the daemon's `top` op (rates are measured daemon-side, between its map readings)
//! and renders with `telemetry::top::render_frame`. On a terminal each frame replaces the
//! last (ANSI home + clear); otherwise, or with `--once`, frames are printed plainly.

use std::{
    io::{self, IsTerminal, Write},
    path::Path,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use rampart::{
    config::Config,
    control::{protocol::TopSnapshot, Client, Request},
    telemetry::render_frame,
};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Time between refreshes (e.g. 500ms, 2s).
    #[arg(long, default_value = "1s", value_parser = parse_interval)]
    interval: Duration,
    /// Print one frame and exit (for scripts and non-terminals).
    #[arg(long)]
    once: bool,
}

/// Cursor home, then clear the screen.
const REDRAW: &str = "\x1b[H\x1b[2J";

pub async fn run(config: &Path, args: Args) -> anyhow::Result<()> {
    let config = super::load_config(config)?;
    let tty = io::stdout().is_terminal();
    show(&config, &args, tty, &mut io::stdout()).await
}

async fn show(config: &Config, args: &Args, tty: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let mut client = Client::connect(&config.control_socket).await?;
    loop {
        let snapshot: TopSnapshot = client
            .request(&Request::Top { limit: None })
            .await?
            .into_result()
            .context("reading the daemon's top snapshot")?;
        let now = SystemTime::now();
        let (width, height) = if tty {
            terminal_size().unwrap_or((80, 24))
        } else {
            // Nothing to fit: print every row with every column.
            (usize::MAX, usize::MAX)
        };
        let title = format!(
            "rampart top — {} tokens — {} — every {}",
            snapshot.rows.len(),
            humantime::format_rfc3339_seconds(now),
            humantime::format_duration(args.interval),
        );
        // The last line of a full-height frame must not scroll the screen.
        let height = if tty && !args.once {
            height.saturating_sub(1)
        } else {
            height
        };
        let frame = render_frame(&title, &snapshot.rows, width, height, now);
        let redraw = if tty && !args.once { REDRAW } else { "" };
        match write!(out, "{redraw}{frame}").and_then(|()| out.flush()) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e).context("writing to stdout"),
        }
        if args.once {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(args.interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    // Each poll is a map walk in the daemon: keep it from being hammered.
    if d < Duration::from_millis(100) {
        return Err("the interval must be at least 100ms".into());
    }
    Ok(d)
}

/// Columns and rows of the terminal on stdout.
fn terminal_size() -> Option<(usize, usize)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize into the struct we own.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col as usize, ws.ws_row as usize))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rampart::control::{self, protocol::TopRow, Handler, Peer, Response, ServerOptions};
    use tokio::sync::broadcast;

    use super::*;

    struct Daemon(Vec<TopRow>);

    impl Handler for Daemon {
        async fn handle(&self, _peer: Peer, req: Request) -> Response {
            match req {
                Request::Top { .. } => Response::ok(&TopSnapshot {
                    rows: self.0.clone(),
                }),
                _ => Response::error("not in this test"),
            }
        }

        fn subscribe(
            &self,
            _peer: Peer,
        ) -> Result<broadcast::Receiver<rampart::telemetry::Record>, String> {
            Err("not in this test".into())
        }
    }

    fn row(n: u64, rate: f64) -> TopRow {
        TopRow {
            fingerprint: rampart::control::Fp(agent_common::Fingerprint([0, n])),
            label: None,
            contract: "standard".into(),
            stage: 1,
            stage_rate: 10.0,
            current_rate: rate,
            throttles: 0,
            breaches: 0,
            last_seen: None,
        }
    }

    #[tokio::test]
    async fn once_prints_one_plain_frame_from_the_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("control.sock");
        let text = format!("control_socket = \"{}\"\n", sock.display());
        let config = Config::from_str(&text, &dir.path().join("rampart.toml")).unwrap();
        let listener = control::bind(&sock).unwrap();
        let opts = ServerOptions {
            // SAFETY: geteuid has no preconditions.
            allowed_uid: unsafe { libc::geteuid() },
            ..ServerOptions::default()
        };
        let rows = vec![row(1, 2.0), row(2, 7.5), row(3, 0.0)];
        tokio::spawn(control::serve(listener, Arc::new(Daemon(rows)), opts));

        let args = Args {
            interval: Duration::from_secs(1),
            once: true,
        };
        let mut out = Vec::new();
        show(&config, &args, false, &mut out).await.unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(
            !out.contains('\x1b'),
            "no terminal control codes when not a tty"
        );
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("rampart top — 3 tokens — "), "{out}");
        assert!(lines[1].starts_with("FINGERPRINT"));
        let order: Vec<&str> = lines[2..].iter().map(|l| &l[..32]).collect();
        assert_eq!(
            order,
            [
                format!("{:032x}", 2),
                format!("{:032x}", 1),
                format!("{:032x}", 3)
            ]
        );
    }

    #[tokio::test]
    async fn no_daemon_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("control.sock");
        let text = format!("control_socket = \"{}\"\n", sock.display());
        let config = Config::from_str(&text, &dir.path().join("rampart.toml")).unwrap();
        let args = Args {
            interval: Duration::from_secs(1),
            once: true,
        };
        let err = show(&config, &args, false, &mut Vec::new())
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("is it running"), "{err:#}");
    }

    #[test]
    fn interval_parsing() {
        assert_eq!(parse_interval("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_interval("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_interval("10ms").is_err());
        assert!(parse_interval("soon").is_err());
    }
}
