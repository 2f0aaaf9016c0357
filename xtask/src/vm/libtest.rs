//! Follows libtest's console output as it streams from the guest, so the host's summary
//! can name each failing test with its panic location and message. The console itself
//! scrolls by with kernel messages and verifier dumps; the summary is what people read.

/// Longest message line kept per failure; verifier logs and `{:?}` of load errors run
/// to kilobytes on one line.
const MAX_LINE: usize = 240;
/// Message lines kept per failure (an `assert_eq!` needs three: message, left, right).
const MAX_LINES: usize = 4;

/// One failed test as libtest reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub test: String,
    /// `file:line:col` of the panic, if the test's output block showed one.
    pub location: Option<String>,
    /// The first lines of the panic message, shortened.
    pub message: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.test)?;
        if let Some(location) = &self.location {
            write!(f, " panicked at {location}")?;
        }
        for line in &self.message {
            write!(f, "\n      {line}")?;
        }
        Ok(())
    }
}

/// Where the tracker is within libtest's output.
#[derive(Debug, Clone, Default)]
enum Block {
    /// Test progress lines (`test x ... ok`).
    #[default]
    Progress,
    /// In `---- x stdout ----`, before its panic line.
    Output(String),
    /// After the panic line of test x: collecting the message.
    Message(String),
}

/// State of one test binary's output.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    failures: Vec<Failure>,
    /// The test whose `test x ... ` line has no result yet.
    running: Option<String>,
    block: Block,
}

impl Tracker {
    /// Feeds one console line (without its newline).
    pub fn line(&mut self, line: &str) {
        if let Some(name) = line
            .strip_prefix("---- ")
            .and_then(|rest| rest.strip_suffix(" stdout ----"))
        {
            self.block = Block::Output(name.to_owned());
            self.failure(name);
            return;
        }
        if line.starts_with("test result: ") || line == "failures:" {
            self.block = Block::Progress;
            return;
        }
        match std::mem::take(&mut self.block) {
            Block::Progress => self.progress(line),
            Block::Output(test) => match line.split_once("panicked at ") {
                Some((_, at)) => {
                    let failure = self.failure(&test);
                    // Rust prints `panicked at file:line:col:` and the message below it.
                    let at = at.trim_end();
                    failure.location = Some(at.strip_suffix(':').unwrap_or(at).to_owned());
                    self.block = Block::Message(test);
                }
                None => self.block = Block::Output(test),
            },
            Block::Message(test) => {
                let end = line.is_empty()
                    || line.starts_with("note: ")
                    || line.starts_with("stack backtrace:");
                if end {
                    return;
                }
                let failure = self.failure(&test);
                if failure.message.len() < MAX_LINES {
                    failure.message.push(shorten(line));
                }
                self.block = Block::Message(test);
            }
        }
    }

    /// Tests reported failed, in the order libtest named them.
    pub fn failures(&self) -> &[Failure] {
        &self.failures
    }

    /// The test started last and not finished (the one running when a command hangs).
    pub fn running(&self) -> Option<&str> {
        self.running.as_deref()
    }

    fn progress(&mut self, line: &str) {
        let Some((name, result)) = line
            .strip_prefix("test ")
            .and_then(|rest| rest.split_once(" ... "))
        else {
            return;
        };
        // With output not captured, the result comes after the test's own lines; a
        // hung test never gets one.
        self.running = Some(name.to_owned());
        match result.trim_end() {
            "ok" | "ignored" => self.running = None,
            "FAILED" => {
                self.running = None;
                self.failure(name);
            }
            _ => {}
        }
    }

    fn failure(&mut self, test: &str) -> &mut Failure {
        let at = match self.failures.iter().position(|f| f.test == test) {
            Some(at) => at,
            None => {
                self.failures.push(Failure {
                    test: test.to_owned(),
                    location: None,
                    message: Vec::new(),
                });
                self.failures.len() - 1
            }
        };
        &mut self.failures[at]
    }
}

fn shorten(line: &str) -> String {
    let line = line.trim_end();
    match line.char_indices().nth(MAX_LINE) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(text: &str) -> Tracker {
        let mut t = Tracker::default();
        for line in text.lines() {
            t.line(line);
        }
        t
    }

    #[test]
    fn failing_tests_get_location_and_message() {
        let long = "x".repeat(1000);
        let t = feed(&format!(
            "\nrunning 3 tests\ntest a ... ok\ntest b ... FAILED\ntest c ... FAILED\n\n\
             failures:\n\n---- b stdout ----\nsome output\n\
             thread 'b' panicked at tests/tests/x.rs:10:5:\nassertion `left == right` failed: code\n  \
             left: 1\n right: 2\nnote: run with `RUST_BACKTRACE=1`\n\n\
             ---- c stdout ----\nthread '<unnamed>' panicked at src/lib.rs:1:2:\n{long}\n\n\n\
             failures:\n    b\n    c\n\ntest result: FAILED. 1 passed; 2 failed\n"
        ));
        let f = t.failures();
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].test, "b");
        assert_eq!(f[0].location.as_deref(), Some("tests/tests/x.rs:10:5"));
        assert_eq!(
            f[0].message,
            [
                "assertion `left == right` failed: code",
                "  left: 1",
                " right: 2"
            ]
        );
        assert_eq!(f[1].location.as_deref(), Some("src/lib.rs:1:2"));
        assert_eq!(f[1].message.len(), 1);
        assert_eq!(f[1].message[0].chars().count(), MAX_LINE + 1);
        assert!(t.running().is_none());
        assert!(f[0]
            .to_string()
            .starts_with("b panicked at tests/tests/x.rs:10:5\n"));
    }

    #[test]
    fn a_test_without_result_is_the_running_one() {
        let t = feed("running 2 tests\ntest a ... ok\ntest slow ... ");
        assert_eq!(t.running(), Some("slow"));
        assert!(t.failures().is_empty());
        // Uncaptured output: the result arrives on a later line.
        let t = feed("test a ... some output\nok\ntest b ... ok\n");
        assert!(t.running().is_none());
    }
}
