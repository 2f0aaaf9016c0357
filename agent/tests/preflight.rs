//! `rampart run` on a host that cannot run it says what is missing and why, before it
//! loads anything. Needs root (to drop capabilities from a full set).

use std::{path::Path, process::Command};

fn config(dir: &Path, bpffs: &Path) -> std::path::PathBuf {
    let path = dir.join("rampart.toml");
    std::fs::write(
        &path,
        format!(
            "state_dir = \"{0}/state\"\nbpffs_dir = \"{1}\"\ncontrol_socket = \"{0}/control.sock\"\npolicy = []\n",
            dir.display(),
            bpffs.display()
        ),
    )
    .unwrap();
    path
}

/// Runs `rampart run` (through `prefix`, e.g. setpriv) and returns its stderr; it must fail.
fn run_fails(prefix: &[&str], config: &Path) -> String {
    let rampart = env!("CARGO_BIN_EXE_rampart");
    let mut cmd = match prefix.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(rampart);
            c
        }
        None => Command::new(rampart),
    };
    let out = cmd.arg("run").arg("--config").arg(config).output().unwrap();
    assert!(!out.status.success(), "rampart run started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn require_root() {
    // SAFETY: plain getter.
    assert_eq!(unsafe { libc::geteuid() }, 0, "these tests need root");
}

#[test]
fn missing_capabilities_are_named_with_their_reason() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), Path::new("/sys/fs/bpf/rampart-preflight-test"));
    let err = run_fails(
        &[
            "setpriv",
            "--bounding-set",
            "-bpf,-perfmon",
            "--inh-caps=-all",
        ],
        &cfg,
    );
    assert!(
        err.contains("missing capabilities CAP_BPF (load programs")
            && err.contains("CAP_PERFMON (the verifier's trusted mode"),
        "{err}"
    );
    assert!(!err.contains("CAP_NET_ADMIN ("), "{err}");
    assert!(
        !dir.path().join("state").exists(),
        "it went on after the check"
    );
}

#[test]
fn a_pin_directory_off_bpffs_is_refused() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let pins = dir.path().join("pins");
    let err = run_fails(&[], &config(dir.path(), &pins));
    assert!(
        err.contains(&format!("{} is not on a BPF filesystem", pins.display())),
        "{err}"
    );
    assert!(!pins.exists());
}
