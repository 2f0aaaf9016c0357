//! What `rampart run` needs from the host, checked before anything is loaded, so a
//! missing privilege reads as one clear sentence instead of an `EPERM` from deep inside
//! the loader (or, worse, a verifier rejection: without CAP_PERFMON the verifier
//! sanitises the parser past its complexity budget).

use std::{
    fs,
    path::{Path, PathBuf},
};

/// The capabilities the daemon uses, each with why (packaging/rampart.service grants
/// exactly these).
pub const REQUIRED_CAPABILITIES: &[(u32, &str, &str)] = &[
    (39, "CAP_BPF", "load programs, create maps, pin into bpffs"),
    (12, "CAP_NET_ADMIN", "attach to interfaces (XDP, TC)"),
    (
        38,
        "CAP_PERFMON",
        "the verifier's trusted mode, without which the parser does not verify",
    ),
    (
        21,
        "CAP_SYS_ADMIN",
        "look up pinned programs, maps and links by id when adopting them",
    ),
];

/// linux/magic.h
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "missing capabilit{} {}: run as root, or grant {} as packaging/rampart.service does",
        if missing.len() == 1 { "y" } else { "ies" },
        describe(missing),
        names(REQUIRED_CAPABILITIES)
    )]
    Capabilities {
        missing: Vec<(&'static str, &'static str)>,
    },
    #[error("cannot read this process's capabilities from /proc/self/status")]
    Status(#[source] std::io::Error),
    #[error(
        "{} is not on a BPF filesystem ({found}): the pins that keep enforcement across \
         restarts live there; mount one with `mount -t bpf bpf /sys/fs/bpf` (systemd: \
         sys-fs-bpf.mount) or set `bpffs_dir` to a directory on one",
        dir.display()
    )]
    NoBpffs { dir: PathBuf, found: String },
    #[error("cannot stat {} to find its filesystem", dir.display())]
    Statfs {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn describe(missing: &[(&str, &str)]) -> String {
    missing
        .iter()
        .map(|(name, why)| format!("{name} ({why})"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn names(caps: &[(u32, &str, &str)]) -> String {
    caps.iter().map(|c| c.1).collect::<Vec<_>>().join(" ")
}

/// Fails with what is missing: capabilities first, then the BPF filesystem under
/// `bpffs_dir` (its nearest existing ancestor when it does not exist yet).
pub fn check(bpffs_dir: &Path) -> Result<(), PreflightError> {
    let status = fs::read_to_string("/proc/self/status").map_err(PreflightError::Status)?;
    let effective = effective_capabilities(&status).ok_or_else(|| {
        PreflightError::Status(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no CapEff line",
        ))
    })?;
    let missing = missing_capabilities(effective);
    if !missing.is_empty() {
        return Err(PreflightError::Capabilities { missing });
    }
    check_bpffs(bpffs_dir)
}

/// The `CapEff:` mask of a /proc/<pid>/status text.
fn effective_capabilities(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

fn missing_capabilities(effective: u64) -> Vec<(&'static str, &'static str)> {
    REQUIRED_CAPABILITIES
        .iter()
        .filter(|(bit, _, _)| effective & (1 << bit) == 0)
        .map(|(_, name, why)| (*name, *why))
        .collect()
}

fn check_bpffs(bpffs_dir: &Path) -> Result<(), PreflightError> {
    let existing = bpffs_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let magic = fs_magic(existing).map_err(|source| PreflightError::Statfs {
        dir: existing.to_owned(),
        source,
    })?;
    if magic == BPF_FS_MAGIC {
        return Ok(());
    }
    Err(PreflightError::NoBpffs {
        dir: bpffs_dir.to_owned(),
        found: format!(
            "{} is on a filesystem of type {magic:#x}",
            existing.display()
        ),
    })
}

fn fs_magic(path: &Path) -> std::io::Result<i64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a zeroed statfs is a valid out-parameter; `c` is a NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_come_from_capeff() {
        let status = "Name:\trampart\nCapInh:\t0000000000000000\nCapEff:\t000000c000001000\n";
        let eff = effective_capabilities(status).unwrap();
        // CAP_NET_ADMIN (12), CAP_PERFMON (38) and CAP_BPF (39); not CAP_SYS_ADMIN.
        let missing = missing_capabilities(eff);
        assert_eq!(missing.len(), 1);
        assert_eq!(missing[0].0, "CAP_SYS_ADMIN");
        let all = missing_capabilities(0);
        assert_eq!(all.len(), REQUIRED_CAPABILITIES.len());
        let text = PreflightError::Capabilities { missing: all }.to_string();
        assert!(
            text.starts_with("missing capabilities CAP_BPF (load programs"),
            "{text}"
        );
        assert!(missing_capabilities(u64::MAX).is_empty());
    }

    #[test]
    fn a_directory_off_bpffs_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = check_bpffs(&dir.path().join("not/yet")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("is not on a BPF filesystem"), "{text}");
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
    }
}
