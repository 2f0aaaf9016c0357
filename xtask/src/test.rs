//! `cargo xtask test`: the whole check, as CI runs it. Build, host tests, clippy,
//! rustfmt, then the kernel-facing tests again inside a 6.1 VM (the oldest kernel the
//! datapath supports). Every step runs even after one fails, so one run shows all
//! failures; the last line is `N passed, N failed` over the steps.

use std::{
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    package::{self, PackageArgs},
    setup::{cargo, exec},
    vm,
};

/// `rampart-tests` targets run in the VM, in this order, after agent-common's unit
/// tests: the netns topology (nginx, curl, wrk, veth), the eBPF programs through
/// BPF_PROG_TEST_RUN and attached to veth (native XDP) and lo (TC, through netlink), then
/// the scenarios: two `rampart run` daemons (native XDP on the upstream veth, TC on the
/// gateway's lo — a cls_bpf filter there, 6.1 having no TCX) behind a TLS nginx.
const VM_TEST_TARGETS: &[&str] = &["topology", "datapath", "attach", "scenarios"];
/// The daemon's own tests (restarts, reloads, pins, logs): host only by default, as the
/// VM step should use at most half of its limit and these would add about four minutes;
/// the scenarios already run the daemon on 6.1. `--vm-daemon` runs them too.
const VM_DAEMON_TARGETS: &[&str] = &["daemon"];

/// The whole VM run, boot included: generous for a slow day (a typical run takes well
/// under half of it); the report names what did not run.
const VM_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// One command in the VM: a hung test gets killed and named, and the others still run.
const VM_TEST_TIMEOUT: Duration = Duration::from_secs(6 * 60);
/// Targets whose tests run in one guest process, so the programs are verified once for
/// all of them (their fixtures reset the maps between tests): the per-test load was
/// most of the VM step's time (10–20 s to verify a program under TCG on 6.1).
const VM_SHARED_TARGETS: &[&str] = &["datapath"];
/// Time allowed per test of a shared target's process.
const VM_SHARED_PER_TEST: Duration = Duration::from_secs(60);
/// Targets run in the guest's second lane, beside the rest (see `vm::VmOptions::lanes`):
/// the guest has two vCPUs and the host two cores, and most of a test's time under TCG
/// is one CPU verifying programs. They share no kernel state with the first lane's
/// tests (each test makes its own namespaces; pins and temp dirs are named by pid).
/// Balanced by measured time: topology + scenarios ≈ 480 s, datapath + attach ≈ 370 s.
const VM_SECOND_LANE: &[&str] = &["topology", "scenarios"];
/// The system VM's run (two boots) and each run of its test script.
const SYSTEM_TIMEOUT: Duration = Duration::from_secs(20 * 60);
const SYSTEM_COMMAND_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// Label of agent-common's unit tests, which run as one command.
const UNIT_TESTS: &str = "agent-common";

/// Arguments of `cargo xtask test`.
#[derive(clap::Args)]
pub struct TestArgs {
    /// Skip the 6.1 VM run.
    #[arg(long, conflicts_with = "only_vm")]
    no_vm: bool,
    /// Only the 6.1 VM run.
    #[arg(long, conflicts_with = "only_system")]
    only_vm: bool,
    /// Only the packaging test in the Debian system VM.
    #[arg(long, conflicts_with = "no_vm")]
    only_system: bool,
    /// Also run the daemon's own tests in the 6.1 VM (see VM_DAEMON_TARGETS).
    #[arg(long)]
    vm_daemon: bool,
    /// Test name filter, passed to every test binary (host and VM).
    #[arg(long)]
    filter: Option<String>,
}

impl TestArgs {
    /// `cargo xtask vm-test` without a command: the build and the VM step only.
    pub fn vm_only(vm_daemon: bool, filter: Option<String>) -> Self {
        TestArgs {
            no_vm: false,
            only_vm: true,
            only_system: false,
            vm_daemon,
            filter,
        }
    }
}

/// One step's outcome.
struct Outcome {
    name: String,
    took: Duration,
    error: Option<String>,
}

pub fn run(args: &TestArgs) -> Result<ExitCode> {
    let root = crate::workspace_root();
    let ebpf = root.join("agent-ebpf");
    let mut outcomes = Vec::new();
    let mut vm_times: Vec<String> = Vec::new();
    let mut step = |name: &str, f: &mut dyn FnMut() -> Result<()>| {
        println!("\n==> {name}");
        let started = Instant::now();
        let error = f().err().map(|e| format!("{e:#}"));
        let took = started.elapsed();
        match &error {
            None => println!("==> {name}: passed in {:.1}s", took.as_secs_f64()),
            Some(e) => eprintln!("==> {name}: FAILED in {:.1}s: {e}", took.as_secs_f64()),
        }
        outcomes.push(Outcome {
            name: name.to_owned(),
            took,
            error,
        });
    };

    // Later steps link against the agent's build (and its eBPF object).
    step("build (cargo build -p rampart)", &mut || {
        exec(cargo(&root).args(["build", "-p", "rampart"]))
    });

    if !args.only_vm && !args.only_system {
        step("host tests (cargo test --workspace)", &mut || {
            let mut cmd = cargo(&root);
            cmd.args(["test", "--workspace", "--no-fail-fast"]);
            // Tests attach programs and create namespaces: kernel state they share.
            cmd.args(["--", "--test-threads=1"]);
            cmd.args(args.filter.as_deref());
            exec(&mut cmd)
        });
        step("clippy (host crates)", &mut || {
            exec(cargo(&root).args([
                "clippy",
                "--workspace",
                "--all-targets",
                // Lint every crate even when one fails, so one run lists everything.
                "--keep-going",
                "--",
                "-D",
                "warnings",
            ]))
        });
        step("clippy (agent-ebpf)", &mut || {
            exec(ebpf_cargo(&ebpf).args([
                "+nightly",
                "clippy",
                "--release",
                "--",
                "-D",
                "warnings",
            ]))
        });
        // Nightly rustfmt: rustfmt.toml uses unstable import options.
        step("rustfmt (host crates)", &mut || {
            exec(cargo(&root).args(["+nightly", "fmt", "--all", "--check"]))
        });
        step("rustfmt (agent-ebpf)", &mut || {
            // No --all here: through its path dependencies it would reach the host
            // workspace and check those files twice.
            exec(ebpf_cargo(&ebpf).args(["+nightly", "fmt", "--check"]))
        });
    }

    if !args.no_vm && !args.only_system {
        let name = if args.vm_daemon {
            "VM tests (Linux 6.1)"
        } else {
            "VM tests (Linux 6.1; the daemon target runs on the host only)"
        };
        step(name, &mut || {
            let report = vm_tests(&root, args)?;
            vm_times = report.groups;
            if let Some(boot) = report.booted {
                vm_times.insert(0, format!("boot: {:.1}s", boot.as_secs_f64()));
            }
            Ok(())
        });
    }

    // A filter names tests of the test binaries, none of which is the system VM's.
    if !args.no_vm && !args.only_vm && args.filter.is_none() {
        step(
            "system VM (the .deb in Debian 12 under systemd, Linux 6.1)",
            &mut || system_test(&root).map(|_| ()),
        );
    }

    println!("\n==> summary");
    for o in &outcomes {
        let verdict = if o.error.is_some() {
            "FAILED"
        } else {
            "passed"
        };
        println!("  {verdict:6}  {:7.1}s  {}", o.took.as_secs_f64(), o.name);
    }
    // Per target in the VM (a failed run's error lists them instead): where its time went.
    for line in &vm_times {
        println!("            {line}");
    }
    for o in outcomes.iter().filter(|o| o.error.is_some()) {
        eprintln!("FAILED: {}: {}", o.name, o.error.as_deref().unwrap_or(""));
    }
    let failed = outcomes.iter().filter(|o| o.error.is_some()).count();
    println!("{} passed, {failed} failed", outcomes.len() - failed);
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The whole packaging test (xtask/vm/system-test.sh): the release build packaged
/// twice (a second, newer revision for the upgrade), booted into the Debian system VM.
fn system_test(root: &Path) -> Result<vm::Report> {
    let deb = package::run(&PackageArgs {
        revision: "1".into(),
        no_build: false,
    })?;
    let newer = package::run(&PackageArgs {
        revision: "2".into(),
        no_build: true,
    })?;
    let command = vec![
        "sh".to_owned(),
        "xtask/vm/system-test.sh".to_owned(),
        deb.to_string_lossy().into_owned(),
        newer.to_string_lossy().into_owned(),
    ];
    let mut opts = vm::VmOptions::new(root, vec![command]);
    let kernel = vm::ensure_kernel(&opts.cache_dir)?;
    opts.system_image = Some(vm::image::ensure_image(&opts.cache_dir, &kernel)?);
    // Two boots of a whole system under TCG, each run of the script within its limit.
    opts.timeout = SYSTEM_TIMEOUT;
    opts.command_timeout = Some(SYSTEM_COMMAND_TIMEOUT);
    opts.labels = vec!["system::packaging".to_owned()];
    vm::run(opts)
}

/// Builds the test binaries and runs the kernel-facing ones in the VM.
fn vm_tests(root: &Path, args: &TestArgs) -> Result<vm::Report> {
    let mut targets = VM_TEST_TARGETS.to_vec();
    if args.vm_daemon {
        targets.extend(VM_DAEMON_TARGETS);
    } else {
        println!(
            "\nNot run in the 6.1 VM: rampart-tests {VM_DAEMON_TARGETS:?} (host only, for \
             the VM step's time; the scenarios run the daemon there). \
             `cargo xtask test --only-vm --vm-daemon` runs them too.\n"
        );
    }
    let binaries = test_binaries(root, &targets)?;
    let mut commands = Vec::new();
    let mut labels = Vec::new();
    // Per-command timeouts where they differ from VM_TEST_TIMEOUT.
    let mut limits = Vec::new();
    let mut lanes = Vec::new();
    for (target, exe) in binaries {
        let lane = usize::from(VM_SECOND_LANE.contains(&target.as_str()));
        let exe = exe.to_string_lossy().into_owned();
        if target == UNIT_TESTS {
            let mut argv = vec![exe, "--test-threads=1".into()];
            argv.extend(args.filter.clone());
            commands.push(argv);
            labels.push(target);
            limits.push(None);
            lanes.push(lane);
            continue;
        }
        let tests = list_tests(&exe, args.filter.as_deref())?;
        if VM_SHARED_TARGETS.contains(&target.as_str()) {
            let mut argv = vec![exe.clone(), "--test-threads=1".into()];
            argv.extend(args.filter.clone());
            commands.push(argv);
            labels.push(format!("{target} ({} tests, one process)", tests.len()));
            limits.push(Some(
                (VM_SHARED_PER_TEST * tests.len() as u32).max(VM_TEST_TIMEOUT),
            ));
            lanes.push(lane);
            continue;
        }
        // One process per test: each gets its own timeout, a hung test costs only
        // itself, and a failure's output is printed as soon as it happens.
        for test in tests {
            // `--include-ignored`: tests the host kernel cannot run (they say why in
            // their `#[ignore]`) run here.
            let mut argv = vec![
                exe.clone(),
                "--exact".into(),
                test.clone(),
                "--test-threads=1".into(),
                "--include-ignored".into(),
            ];
            if target == "scenarios" {
                // Their figures (revocation latency, ramp accuracy on 6.1) go to the
                // console: the guest's target/bench is in its throwaway overlay.
                argv.push("--nocapture".into());
            }
            commands.push(argv);
            labels.push(format!("{target}::{test}"));
            limits.push(None);
            lanes.push(lane);
        }
    }
    let mut opts = vm::VmOptions::new(root, commands);
    opts.timeout = VM_TIMEOUT;
    opts.command_timeout = Some(VM_TEST_TIMEOUT);
    opts.labels = labels;
    opts.command_timeouts = limits;
    opts.lanes = lanes;
    // One run reports every failing test, like the host step does.
    opts.keep_going = true;
    opts.env.push(("RUST_BACKTRACE".into(), "1".into()));
    vm::run(opts)
}

/// (label, executable) of agent-common's unit tests, then of the `rampart-tests`
/// `targets` in their order.
fn test_binaries(root: &Path, targets: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    let out = cargo(root)
        .args(["test", "--workspace", "--no-run", "--message-format=json"])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("cargo test --workspace --no-run failed ({})", out.status);
    }
    // Packages are told apart by manifest path: the package id spec omits the name
    // when it equals the directory name, so it is not a reliable key.
    let tests_manifest = root.join("tests/Cargo.toml");
    let common_manifest = root.join("agent-common/Cargo.toml");
    let mut common = None;
    let mut by_target = std::collections::HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let manifest = Path::new(msg["manifest_path"].as_str().unwrap_or_default());
        let kinds: Vec<&str> = msg["target"]["kind"]
            .as_array()
            .map(|k| k.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        let name = msg["target"]["name"].as_str().unwrap_or_default();
        if manifest == tests_manifest && kinds.contains(&"test") {
            by_target.insert(name.to_owned(), PathBuf::from(exe));
        } else if manifest == common_manifest && kinds.contains(&"lib") {
            common = Some(PathBuf::from(exe));
        }
    }
    // A listed target that no longer builds must fail the step, not vanish from it.
    let common = common.context("no agent-common unit test binary")?;
    let mut found = vec![(UNIT_TESTS.to_owned(), common)];
    for target in targets {
        let exe = by_target
            .remove(*target)
            .with_context(|| format!("rampart-tests has no test target {target:?}"))?;
        found.push(((*target).to_owned(), exe));
    }
    for (target, exe) in &found {
        println!("VM will run {target}: {}", exe.display());
    }
    Ok(found)
}

/// Names of the tests in a libtest binary matching `filter`, as the binary lists them
/// (on the host: listing runs no test).
fn list_tests(exe: &str, filter: Option<&str>) -> Result<Vec<String>> {
    let out = std::process::Command::new(exe)
        .args(["--list", "--format=terse"])
        .args(filter)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {exe} --list"))?;
    if !out.status.success() {
        bail!("{exe} --list failed ({})", out.status);
    }
    Ok(parse_test_list(&String::from_utf8_lossy(&out.stdout)))
}

/// `name: test` lines of `--list --format=terse` (benchmarks are `name: bench`).
fn parse_test_list(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| line.strip_suffix(": test"))
        .map(str::to_owned)
        .collect()
}

/// `cargo` for the eBPF crate: host RUSTFLAGS do not apply to the BPF target.
fn ebpf_cargo(dir: &Path) -> std::process::Command {
    let mut cmd = cargo(dir);
    cmd.env_remove("RUSTFLAGS");
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_list_keeps_tests_only() {
        let text = "a::b: test\nslow: bench\nc: test\n\n2 tests, 1 benchmark\n";
        assert_eq!(parse_test_list(text), ["a::b", "c"]);
    }
}
