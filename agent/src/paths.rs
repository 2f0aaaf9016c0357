//! Every default filesystem path and address, in one place, so the daemon, the CLI and
//! the packaging agree without each spelling them out; and the one way a directory of
//! ours is created (`create_private_dir`).

use std::{fs, io, os::unix::fs::DirBuilderExt, path::Path};

/// The configuration file `rampart` reads unless `--config` says otherwise.
pub const CONFIG_FILE: &str = "/etc/rampart/rampart.toml";
/// Daemon state: the fingerprint key and the SQLite database.
pub const STATE_DIR: &str = "/var/lib/rampart";
/// Where maps and links are pinned, so enforcement survives a daemon restart.
pub const BPFFS_DIR: &str = "/sys/fs/bpf/rampart";
/// The root-only control socket the CLI talks to the daemon through.
pub const CONTROL_SOCKET: &str = "/run/rampart/control.sock";
/// Prometheus exposition; loopback only unless the operator opens it up.
pub const METRICS_ADDR: &str = "127.0.0.1:9464";
/// The fingerprint key, inside the state directory.
pub const KEY_FILE: &str = "fingerprint.key";
/// The SQLite database, inside the state directory.
pub const DB_FILE: &str = "rampart.db";

/// Creates `dir`, and any missing parent, with mode 0700 when it is missing (an existing
/// directory keeps its mode). An empty path, the parent of a bare file name, is the
/// working directory: nothing to create.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    if dir.as_os_str().is_empty() || dir.exists() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}
