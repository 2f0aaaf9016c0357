//! What the host learns from the guest's console: which command of which lane runs,
//! how each ended, and libtest's report of each failing test.

use std::{
    fmt::Write as _,
    io::{BufRead, BufReader, Read},
    path::Path,
    sync::Mutex,
    time::{Duration, Instant},
};

use super::{libtest, LANE_MARK, MARK};

/// What the host learned from the guest console.
#[derive(Debug, Default, Clone)]
pub(super) struct Progress {
    pub(super) booted: Option<Duration>,
    /// Per lane: the command it runs now and that command's libtest output.
    lanes: Vec<Lane>,
    finished: Vec<Finished>,
}

/// One lane's command in progress.
#[derive(Debug, Default, Clone)]
struct Lane {
    running: Option<usize>,
    started: Option<Instant>,
    tests: libtest::Tracker,
}

/// A command that ran to its end (or its timeout).
#[derive(Debug, Clone)]
pub(super) struct Finished {
    index: usize,
    status: i32,
    took: Duration,
    tests: libtest::Tracker,
}

/// Exit statuses of coreutils `timeout`: after TERM, and after the KILL that follows.
const TIMED_OUT: [i32; 2] = [124, 137];

impl Progress {
    fn lane(&mut self, lane: usize) -> &mut Lane {
        if self.lanes.len() <= lane {
            self.lanes.resize_with(lane + 1, Lane::default);
        }
        &mut self.lanes[lane]
    }

    /// One paragraph per failed command (how it ended, each failing test with its
    /// panic), then the commands still running when the run ended and those that never
    /// started. `limits` are the per-command timeouts.
    pub(super) fn describe(&self, labels: &[String], limits: &[Option<Duration>]) -> String {
        let mut out = Vec::new();
        for f in self.finished.iter().filter(|f| f.status != 0) {
            let name = &labels[f.index];
            let limit = limits.get(f.index).copied().flatten();
            let mut text = match (TIMED_OUT.contains(&f.status), limit) {
                (true, Some(limit)) => format!("{name} timed out after {}s", limit.as_secs()),
                _ => format!("{name} exited with {}", f.status),
            };
            if let Some(test) = f.tests.running() {
                let _ = write!(text, " while running test {test}");
            }
            let failures = f.tests.failures();
            if !failures.is_empty() {
                let _ = write!(text, "; {} test(s) failed:", failures.len());
            }
            for failure in failures {
                let _ = write!(text, "\n    {failure}");
            }
            out.push(text);
        }
        if self.booted.is_none() {
            out.push("stopped before the guest finished booting".to_owned());
        }
        for lane in &self.lanes {
            let Some(i) = lane.running else { continue };
            let mut text = format!("stopped while running {}", labels[i]);
            if let Some(test) = lane.tests.running() {
                let _ = write!(text, " (test {test})");
            }
            out.push(text);
        }
        let not_run: Vec<&str> = (0..labels.len())
            .filter(|i| {
                !self.finished.iter().any(|f| f.index == *i)
                    && !self.lanes.iter().any(|l| l.running == Some(*i))
            })
            .map(|i| labels[i].as_str())
            .collect();
        if !not_run.is_empty() {
            out.push(format!(
                "{} of {} command(s) did not run: {}",
                not_run.len(),
                labels.len(),
                not_run.join(", ")
            ));
        }
        out.join("\n  ")
    }

    /// Per finished command `status  seconds  label`, then `groups`.
    pub(super) fn table(&self, labels: &[String]) -> String {
        let mut out = String::new();
        for f in &self.finished {
            let verdict = if f.status == 0 { "passed" } else { "FAILED" };
            let _ = writeln!(
                out,
                "[vm]   {verdict:6}  {:6.1}s  {}",
                f.took.as_secs_f64(),
                labels[f.index]
            );
        }
        for line in self.groups(labels) {
            let _ = writeln!(out, "[vm] {line}");
        }
        out
    }

    /// Per group of commands (the label up to `::`, e.g. a test target), its command
    /// count, failures and summed time.
    pub(super) fn groups(&self, labels: &[String]) -> Vec<String> {
        let mut groups: Vec<(&str, Duration, usize, usize)> = Vec::new();
        for f in &self.finished {
            let label = labels[f.index].as_str();
            let group = label.split_once("::").map_or(label, |(g, _)| g);
            let at = match groups.iter().position(|g| g.0 == group) {
                Some(at) => at,
                None => {
                    groups.push((group, Duration::ZERO, 0, 0));
                    groups.len() - 1
                }
            };
            groups[at].1 += f.took;
            groups[at].2 += 1;
            groups[at].3 += usize::from(f.status != 0);
        }
        groups
            .into_iter()
            .map(|(group, took, count, failed)| {
                format!(
                    "{group}: {count} command(s), {failed} failed, {:.1}s",
                    took.as_secs_f64()
                )
            })
            .collect()
    }
}

/// A short name for a command: the program's file name without cargo's `-<hash>`
/// suffix (so `target/debug/deps/attach-0123456789abcdef` reads `attach`), then the
/// arguments.
pub(super) fn label(argv: &[String]) -> String {
    let Some((program, args)) = argv.split_first() else {
        return String::new();
    };
    let name = Path::new(program)
        .file_name()
        .map_or_else(|| program.clone(), |n| n.to_string_lossy().into_owned());
    let name = match name.rsplit_once('-') {
        Some((stem, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            stem.to_owned()
        }
        _ => name,
    };
    std::iter::once(name)
        .chain(args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ")
}

pub(super) fn follow_console(
    out: impl Read,
    started: Instant,
    labels: &[String],
    progress: &Mutex<Progress>,
) {
    let mut out = BufReader::new(out);
    let mut line = Vec::new();
    loop {
        line.clear();
        match out.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        let (lane, text) = split_lane(text.trim_end_matches(['\r', '\n']));
        // A mark may follow output that did not end its line (a test killed by its
        // timeout after `test x ... `).
        let (before, mark) = match text.find(MARK) {
            Some(at) => (&text[..at], Some(&text[at + MARK.len()..])),
            None => (text, None),
        };
        let mut p = progress.lock().expect("lock");
        if mark.is_none() || !before.is_empty() {
            // Blank lines (libtest puts several around each binary's run) only
            // stretch the log; the tracker still needs them to end a message.
            if !before.trim().is_empty() {
                match lane {
                    Some(lane) => println!("[vm {lane}] {before}"),
                    None => println!("[vm] {before}"),
                }
            }
            let l = p.lane(lane.unwrap_or(0));
            if l.running.is_some() {
                l.tests.line(before);
            }
        }
        let Some(mark) = mark else { continue };
        let mut words = mark.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("ready"), _, _) => {
                let boot = started.elapsed();
                p.booted = Some(boot);
                println!("[vm] guest ready after {:.1}s", boot.as_secs_f64());
            }
            (Some("start"), Some(i), _) => {
                let index = i.parse().ok();
                if let Some(label) = index.and_then(|i: usize| labels.get(i)) {
                    println!("[vm] running {label}");
                }
                *p.lane(lane.unwrap_or(0)) = Lane {
                    running: index,
                    started: Some(Instant::now()),
                    tests: libtest::Tracker::default(),
                };
            }
            (Some("exit"), Some(i), Some(rc)) => {
                if let (Ok(index), Ok(status)) = (i.parse::<usize>(), rc.parse()) {
                    let l = std::mem::take(p.lane(lane.unwrap_or(0)));
                    let finished = Finished {
                        index,
                        status,
                        took: l.started.map_or(Duration::ZERO, |s| s.elapsed()),
                        tests: l.tests,
                    };
                    let verdict = if status == 0 {
                        "passed".to_owned()
                    } else {
                        format!("FAILED ({status})")
                    };
                    println!(
                        "[vm] {} {verdict} in {:.1}s",
                        labels.get(index).map_or("?", String::as_str),
                        finished.took.as_secs_f64()
                    );
                    p.finished.push(finished);
                }
            }
            _ => println!("[vm] {mark}"),
        }
    }
}

/// The lane a console line came from (see `LANE_MARK`) and the line without the
/// prefix; `None` for lines of init, the kernel or a single-lane run.
fn split_lane(text: &str) -> (Option<usize>, &str) {
    text.strip_prefix(LANE_MARK)
        .and_then(|rest| rest.split_once(' '))
        .and_then(|(n, rest)| Some((Some(n.parse().ok()?), rest)))
        .unwrap_or((None, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_drop_cargo_hashes() {
        let argv = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            label(&argv(&[
                "/t/debug/deps/attach-0123456789abcdef",
                "--exact",
                "x"
            ])),
            "attach --exact x"
        );
        assert_eq!(label(&argv(&["/usr/bin/run-parts"])), "run-parts");
    }

    #[test]
    fn report_names_failed_tests_and_the_hung_one() {
        let labels = vec!["datapath::a".to_owned(), "datapath::b".to_owned()];
        let mut progress = Progress::default();
        let mut tests = libtest::Tracker::default();
        for line in [
            "test a ... FAILED",
            "---- a stdout ----",
            "thread 'a' panicked at tests/tests/datapath.rs:1:2:",
            "wrong verdict",
            "",
        ] {
            tests.line(line);
        }
        progress.finished.push(Finished {
            index: 0,
            status: 101,
            took: Duration::from_secs(3),
            tests,
        });
        let mut tests = libtest::Tracker::default();
        tests.line("test b ... ");
        progress.finished.push(Finished {
            index: 1,
            status: 124,
            took: Duration::from_secs(60),
            tests,
        });
        progress.booted = Some(Duration::from_secs(5));
        let text = progress.describe(&labels, &[None, Some(Duration::from_secs(60))]);
        assert!(text.contains("datapath::a exited with 101"), "{text}");
        assert!(
            text.contains("a panicked at tests/tests/datapath.rs:1:2\n      wrong verdict"),
            "{text}"
        );
        assert!(
            text.contains("datapath::b timed out after 60s while running test b"),
            "{text}"
        );
        let table = progress.table(&labels);
        assert!(
            table.contains("datapath: 2 command(s), 2 failed, 63.0s"),
            "{table}"
        );
    }

    #[test]
    fn console_lines_are_followed_per_lane() {
        let labels: Vec<String> = ["t::a", "t::b", "t::c"].map(String::from).to_vec();
        let progress = Mutex::new(Progress::default());
        let console = [
            "@@rampart-vm: ready",
            "@@lane0 @@rampart-vm: start 0",
            "@@lane1 @@rampart-vm: start 1",
            "@@lane1 test b ... ",
            "@@lane0 test a ... ok",
            "@@lane0 @@rampart-vm: exit 0 0",
        ]
        .join("\n");
        follow_console(console.as_bytes(), Instant::now(), &labels, &progress);
        let p = progress.into_inner().unwrap();
        assert_eq!(p.finished.len(), 1);
        assert_eq!(p.finished[0].index, 0);
        assert_eq!(p.lanes[1].running, Some(1));
        let text = p.describe(&labels, &[None; 3]);
        assert!(
            text.contains("stopped while running t::b (test b)"),
            "{text}"
        );
        assert!(
            text.contains("1 of 3 command(s) did not run: t::c"),
            "{text}"
        );
        assert_eq!(split_lane("@@lane12 x y"), (Some(12), "x y"));
        assert_eq!(split_lane("@@lanex y"), (None, "@@lanex y"));
    }
}
