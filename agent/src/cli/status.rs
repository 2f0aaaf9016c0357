//! `rampart status`: what the running daemon enforces, from the control socket.

use std::{fmt::Write as _, path::Path};

use anyhow::Context as _;
use rampart::control::{protocol::StatusBody, Client, Request};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print the daemon's answer as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(config: &Path, args: Args) -> anyhow::Result<()> {
    let socket = super::load_config(config)?.control_socket;
    let mut client = Client::connect(&socket).await?;
    let resp = client.request(&Request::Status).await?;
    if !resp.ok {
        anyhow::bail!("{}", resp.error.unwrap_or_default());
    }
    let body: StatusBody = resp.into_result().context("decoding the status answer")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        print!("{}", render(&body));
    }
    Ok(())
}

/// The human summary.
pub fn render(s: &StatusBody) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "rampart {} (pid {}), config {}",
        s.version, s.pid, s.config
    );
    let _ = writeln!(
        out,
        "policy generation {} ({} reloads ok, {} failed): {} contracts, {} scopes, {} static tokens",
        s.policy_generation, s.reloads_ok, s.reloads_failed, s.contracts, s.scopes, s.static_tokens
    );
    let t = &s.tokens;
    let _ = writeln!(
        out,
        "tokens: {} active, {} not yet valid, {} revoked, {} expired; {} in the kernel map",
        t.active, t.not_yet_valid, t.revoked, t.expired, t.in_kernel
    );
    let _ = writeln!(out, "events dropped: {}", s.events_dropped);
    if s.listeners.is_empty() {
        let _ = writeln!(out, "no listeners configured");
    }
    for l in &s.listeners {
        let ports: Vec<String> = l.ports.iter().map(u16::to_string).collect();
        let _ = writeln!(
            out,
            "listener {} on {} port {}: {}, {}, program {}{}",
            l.name,
            l.interface,
            ports.join(","),
            l.hook,
            l.mode,
            l.program_id,
            if l.adopted { " (link adopted)" } else { "" }
        );
        let counts: Vec<String> = l
            .requests
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(v, n)| format!("{v}={n}"))
            .collect();
        let _ = writeln!(
            out,
            "  requests: {}",
            if counts.is_empty() {
                "none".to_owned()
            } else {
                counts.join(" ")
            }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rampart::control::protocol::ListenerStatus;

    use super::*;

    #[test]
    fn render_shows_listeners_and_nonzero_counts() {
        let body = StatusBody {
            version: "0.1.0".into(),
            pid: 42,
            config: "/etc/rampart/rampart.toml".into(),
            policy_generation: 3,
            reloads_ok: 2,
            listeners: vec![ListenerStatus {
                name: "api".into(),
                interface: "eth0".into(),
                hook: "tc".into(),
                ports: vec![80, 8080],
                mode: "enforce".into(),
                program_id: 77,
                adopted: true,
                requests: BTreeMap::from([("allow".into(), 5), ("revoked".into(), 0)]),
                ..ListenerStatus::default()
            }],
            ..StatusBody::default()
        };
        let text = render(&body);
        assert!(
            text.contains("policy generation 3 (2 reloads ok, 0 failed)"),
            "{text}"
        );
        assert!(
            text.contains(
                "listener api on eth0 port 80,8080: tc, enforce, program 77 (link adopted)"
            ),
            "{text}"
        );
        assert!(text.contains("requests: allow=5\n"), "{text}");
    }
}
