//! `cargo xtask bench scale [--tokens N]`: the control plane at N tokens (default 100 000),
//! as static policy and as imported tokens, with the release `rampart` binary: `check`,
//! daemon start until its control socket answers, reload with no change and with one
//! change (static: a token moves to another contract; imported: a scope no token uses is
//! added), `token list` and `token show`, a metrics scrape, the daemon's RSS and the
//! kernel memory of its maps (the `memlock` of each map fd it holds), and requests judged
//! while the daemon reloads (`load`). Prints a table and writes
//! target/bench/scale-<N>.json.
//!
//! The daemon runs in a network namespace of its own, with one TC listener on its
//! loopback: nothing attaches to a shared interface.

mod load;

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

use crate::setup::{cargo, exec};

const METRICS: &str = "127.0.0.1:19464";
/// The listener's port inside the namespace.
const PORT: u16 = 18080;
/// Reloads while requests are sent.
const RELOADS_UNDER_LOAD: usize = 4;

/// Runs the scale benchmark for `tokens` tokens.
pub fn run(root: &Path, tokens: usize) -> Result<()> {
    exec(cargo(root).args(["build", "--release", "-p", "rampart"]))?;
    let bin = root.join("target/release/rampart");
    let mut rows = Vec::new();
    for imported in [false, true] {
        rows.push(one(root, &bin, tokens, imported)?);
    }
    println!("\n{tokens} tokens            static policy   imported");
    for (i, (name, _)) in rows[0].iter().enumerate() {
        println!("{name:<26} {:>12}   {:>10}", rows[0][i].1, rows[1][i].1);
    }
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out)?;
    let json = serde_json::json!({
        "tokens": tokens,
        "static": rows[0].iter().map(|(k, v)| (k.clone(), serde_json::Value::from(v.clone()))).collect::<serde_json::Map<_, _>>(),
        "imported": rows[1].iter().map(|(k, v)| (k.clone(), serde_json::Value::from(v.clone()))).collect::<serde_json::Map<_, _>>(),
    });
    let path = out.join(format!("scale-{tokens}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
    println!("wrote {}", path.display());
    Ok(())
}

fn fp(i: usize) -> String {
    format!("{:032x}", (i as u128 + 1) * 0x9e37_79b9_7f4a_7c15)
}

const HEAD: &str = "[[contract]]\nname = \"c\"\nstages = [{ after = \"0s\", rate = 5, burst = 10 }]\n\n\
                    [[contract]]\nname = \"d\"\nstages = [{ after = \"0s\", rate = 50, burst = 10 }]\n\n\
                    [[contract]]\nname = \"load\"\nstages = [{ after = \"0s\", rate = 1000000, burst = 1000000 }]\n\n\
                    [[scope]]\nname = \"s\"\nmethods = [\"GET\"]\nprefix = \"/\"\n";

/// The policy: `HEAD`, and `tokens` static tokens or none. `changed`: one token moves to
/// contract `d`, or without tokens, one more scope.
fn policy(tokens: usize, static_tokens: bool, changed: bool) -> String {
    let mut p = String::from(HEAD);
    if changed && !static_tokens {
        p.push_str("\n[[scope]]\nname = \"t\"\nmethods = [\"POST\"]\nprefix = \"/\"\n");
    }
    if static_tokens {
        for i in 0..tokens {
            let c = if changed && i == tokens / 2 { "d" } else { "c" };
            p.push_str(&format!(
                "\n[[token]]\nfingerprint = \"{}\"\ncontract = \"{c}\"\nscopes = [\"s\"]\n",
                fp(i)
            ));
        }
    }
    p
}

/// A string value for the table (seconds with ms, or a size).
fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

fn timed(cmd: &mut Command) -> Result<Duration> {
    let t = Instant::now();
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(t.elapsed())
}

fn control(sock: &Path, req: &str) -> Result<String> {
    let mut s = UnixStream::connect(sock)?;
    s.write_all(req.as_bytes())?;
    s.write_all(b"\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    if !line.contains("\"ok\":true") {
        bail!("{req}: {}", line.chars().take(300).collect::<String>());
    }
    Ok(line)
}

/// Reloads the daemon has done, successful or not.
fn reloads(sock: &Path) -> Result<u64> {
    let status: serde_json::Value = serde_json::from_str(&control(sock, "{\"op\":\"status\"}")?)?;
    let n = |k: &str| status["body"][k].as_u64().or_else(|| status[k].as_u64());
    match (n("reloads_ok"), n("reloads_failed")) {
        (Some(ok), Some(failed)) => Ok(ok + failed),
        _ => bail!("no reload counts in {status}"),
    }
}

/// Waits until the daemon has done `want` reloads: the file watcher reloads too, 300 ms
/// after a policy file changes, and a reload measured meanwhile would wait for it.
fn settle(sock: &Path, want: u64) -> Result<()> {
    let t = Instant::now();
    while reloads(sock)? < want {
        if t.elapsed() > Duration::from_secs(60) {
            bail!("the daemon did not reload {want} times within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Replaces the policy file in one step (written aside, renamed over it), so the file
/// watcher never reads half of it.
fn write_policy(dir: &Path, text: &str) -> Result<()> {
    let aside = dir.join("staging");
    std::fs::create_dir_all(&aside)?;
    std::fs::write(aside.join("policy.toml"), text)?;
    std::fs::rename(aside.join("policy.toml"), dir.join("policy.toml"))?;
    Ok(())
}

/// A reload through the control socket after `change` (none: a reload without change),
/// timed; returns once the file watcher's own reload of the change is done too.
fn timed_reload(sock: &Path, dir: &Path, change: Option<&str>) -> Result<Duration> {
    let before = reloads(sock)?;
    if let Some(text) = change {
        write_policy(dir, text)?;
    }
    let t = Instant::now();
    control(sock, "{\"op\":\"reload\"}")?;
    let took = t.elapsed();
    settle(sock, before + if change.is_some() { 2 } else { 1 })?;
    Ok(took)
}

/// The daemon's RSS and the summed `memlock` of the BPF maps it holds, in MB.
fn memory(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    let mut memlock = 0u64;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(info) = std::fs::read_to_string(fd?.path()) else {
            continue;
        };
        if info.contains("map_type:") {
            memlock += info
                .lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok((rss_kb / 1024.0, memlock as f64 / 1e6))
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn one(root: &Path, bin: &Path, tokens: usize, imported: bool) -> Result<Vec<(String, String)>> {
    let dir = root.join(format!("target/bench/scale-work-{tokens}-{imported}"));
    let _ = Command::new("umount")
        .arg("-l")
        .arg(dir.join("bpffs"))
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mount = load::Bpffs::mount(dir.join("bpffs"))?;
    let bpffs = mount.dir.join("rampart");
    let ns = load::Netns::new(format!("rampart-bench-scale-{}", std::process::id()))?;
    let sock = dir.join("control.sock");
    let config = dir.join("rampart.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{d}/state\"\nbpffs_dir = \"{b}\"\ncontrol_socket = \"{s}\"\n\
             metrics_addr = \"{METRICS}\"\npolicy = [\"policy.toml\"]\n\n\
             [[listener]]\nname = \"bench\"\ninterface = \"lo\"\nhook = \"tc\"\nports = [{PORT}]\n\
             mode = \"enforce\"\naction = \"drop\"\n",
            d = dir.display(),
            b = bpffs.display(),
            s = sock.display()
        ),
    )?;
    let (unchanged, changed) = (
        policy(tokens, !imported, false),
        policy(tokens, !imported, true),
    );

    std::fs::write(dir.join("policy.toml"), &unchanged)?;
    let rampart = |args: &[&str]| {
        let mut c = Command::new(bin);
        c.arg("--config").arg(&config).args(args);
        c
    };
    let mut rows = Vec::new();
    let check = timed(&mut rampart(&["check"]))?;
    rows.push(("check".to_owned(), secs(check)));
    timed(&mut rampart(&["keygen"]))?;
    let start = || -> Result<(Daemon, Duration)> {
        let t = Instant::now();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(bin)
            .arg("--config")
            .arg(&config)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("daemon.log"))?)
            .spawn()?;
        let daemon = Daemon(child);
        while control(&sock, "{\"op\":\"status\"}").is_err() {
            if t.elapsed() > Duration::from_secs(600) {
                bail!("the daemon did not answer within 10 minutes");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok((daemon, t.elapsed()))
    };
    if imported {
        // Imported into a running daemon; the restart below installs them all.
        let lines: String = (0..tokens)
            .map(|i| {
                format!(
                    "{{\"fingerprint\":\"{}\",\"contract\":\"c\",\"scopes\":[\"s\"]}}\n",
                    fp(i)
                )
            })
            .collect();
        let file = dir.join("tokens.jsonl");
        std::fs::write(&file, lines)?;
        let (first, _) = start()?;
        let t = Instant::now();
        timed(rampart(&["token", "import"]).arg(&file))?;
        rows.push(("token import".to_owned(), secs(t.elapsed())));
        drop(first);
    } else {
        rows.push(("token import".to_owned(), "-".to_owned()));
    }
    let (daemon, took) = start()?;
    rows.push(("start to serving".to_owned(), secs(took)));
    rows.push((
        "reload, no change".to_owned(),
        secs(timed_reload(&sock, &dir, None)?),
    ));
    // Static: a token moves to another contract. Imported: a scope is added, which no
    // token uses.
    rows.push((
        "reload, one change".to_owned(),
        secs(timed_reload(&sock, &dir, Some(&changed))?),
    ));
    // Requests through reloads, each one change as above (and back).
    let issued = rampart(&["token", "issue", "--contract", "load", "--scope", "s"]).output()?;
    if !issued.status.success() {
        bail!("token issue: {}", String::from_utf8_lossy(&issued.stderr));
    }
    let token = String::from_utf8(issued.stdout)?
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    let mut slowest = Duration::ZERO;
    let judged = load::during(&ns, PORT, token, || {
        for i in 0..RELOADS_UNDER_LOAD {
            let text = if i % 2 == 0 { &unchanged } else { &changed };
            slowest = slowest.max(timed_reload(&sock, &dir, Some(text))?);
        }
        Ok(())
    })?;
    rows.push((
        format!("{RELOADS_UNDER_LOAD} reloads under load"),
        format!("slowest {}", secs(slowest)),
    ));
    rows.push((
        "  valid token answered".to_owned(),
        format!("{}/{}", judged.valid_answered, judged.valid_sent),
    ));
    rows.push((
        "  longest wait for one".to_owned(),
        format!("{:.1} ms", judged.longest_gap.as_secs_f64() * 1e3),
    ));
    rows.push((
        "  unknown token answered".to_owned(),
        format!("{}/{}", judged.unknown_answered, judged.unknown_sent),
    ));
    rows.push((
        "token list".to_owned(),
        secs(timed(&mut rampart(&["token", "list", "--json"]))?),
    ));
    rows.push((
        "token list --limit 100".to_owned(),
        secs(timed(&mut rampart(&["token", "list", "--limit", "100"]))?),
    ));
    let show = if imported { fp(tokens / 2) } else { fp(0) };
    let d = if imported {
        timed(&mut rampart(&["token", "show", &show]))?
    } else {
        Duration::ZERO
    };
    rows.push(("token show".to_owned(), secs(d)));
    let scrape = ns
        .spawn(|| -> Result<Duration> {
            let t = Instant::now();
            let mut s = std::net::TcpStream::connect(METRICS)?;
            s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
            let mut body = Vec::new();
            s.read_to_end(&mut body)?;
            Ok(t.elapsed())
        })?
        .join()
        .map_err(|_| anyhow::anyhow!("the scrape thread panicked"))???;
    rows.push(("metrics scrape".to_owned(), secs(scrape)));
    let (rss, maps) = memory(daemon.0.id())?;
    rows.push(("daemon RSS".to_owned(), format!("{rss:.0} MB")));
    rows.push(("kernel map memory".to_owned(), format!("{maps:.0} MB")));
    drop(daemon);
    let _ = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(bin)
        .arg("--config")
        .arg(&config)
        .arg("detach")
        .output();
    Ok(rows)
}
