//! Every default filesystem path and address, in one place, so the daemon, the CLI and
//! the packaging agree without each spelling them out.

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
