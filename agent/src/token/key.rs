//! The fingerprint key file: created private and never overwritten by accident, loaded with
//! checks that say what is wrong with it.

use std::{
    fs::{self, OpenOptions},
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use agent_common::FingerprintKey;
use rand::{rngs::OsRng, RngCore};

use crate::paths;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path} already exists (use --force to replace it; tokens issued under the old key stop matching)")]
    Exists { path: PathBuf },
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} has mode {mode:04o}; it must not be accessible to group or others (chmod 600)"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{path} must hold exactly 32 hex characters (128 bits), found {len} characters")]
    Length { path: PathBuf, len: usize },
    #[error("{path} holds non-hex characters")]
    NotHex { path: PathBuf },
}

/// Writes a fresh random 128-bit key to `path` (32 hex chars + newline, mode 0600). Refuses to
/// replace an existing key unless `force`. The parent directory is created 0700 if missing.
pub fn write_key(path: &Path, force: bool) -> Result<(), KeyError> {
    let create_err = |source| KeyError::Create {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        paths::create_private_dir(parent).map_err(create_err)?;
    }
    if force {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(create_err(e)),
        }
    }
    let mut file = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(KeyError::Exists {
                path: path.to_owned(),
            })
        }
        Err(e) => return Err(create_err(e)),
    };
    let mut raw = [0u8; 16];
    OsRng.fill_bytes(&mut raw);
    let mut text = hex::encode(raw).into_bytes();
    raw.fill(0);
    text.push(b'\n');
    let write_err = |source| KeyError::Write {
        path: path.to_owned(),
        source,
    };
    // The umask may have narrowed the mode further; it can never have widened it, but make the
    // final mode explicit anyway.
    let res = file
        .set_permissions(fs::Permissions::from_mode(0o600))
        .and_then(|()| file.write_all(&text))
        .and_then(|()| file.sync_all());
    text.fill(0);
    res.map_err(write_err)
}

/// Loads the fingerprint key. The 16 key bytes are the SipHash key `k0 || k1`, each little-endian.
pub fn load_key(path: &Path) -> Result<FingerprintKey, KeyError> {
    let read_err = |source| KeyError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = fs::metadata(path).map_err(read_err)?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    let mut text = fs::read(path).map_err(read_err)?;
    let key = parse_key(&text, path);
    text.fill(0);
    key
}

fn parse_key(text: &[u8], path: &Path) -> Result<FingerprintKey, KeyError> {
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let body = body.strip_suffix(b"\r").unwrap_or(body);
    if body.len() != 32 {
        return Err(KeyError::Length {
            path: path.to_owned(),
            len: body.len(),
        });
    }
    let mut raw = [0u8; 16];
    hex::decode_to_slice(body, &mut raw).map_err(|_| KeyError::NotHex {
        path: path.to_owned(),
    })?;
    let mut k0 = [0u8; 8];
    let mut k1 = [0u8; 8];
    k0.copy_from_slice(&raw[..8]);
    k1.copy_from_slice(&raw[8..]);
    raw.fill(0);
    Ok(FingerprintKey([
        u64::from_le_bytes(k0),
        u64::from_le_bytes(k1),
    ]))
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn key_file_is_private_and_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join(paths::KEY_FILE);
        write_key(&path, false).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), 33);
        assert!(text.ends_with('\n'));
        let key = load_key(&path).unwrap();

        assert!(matches!(
            write_key(&path, false),
            Err(KeyError::Exists { .. })
        ));
        assert_eq!(
            load_key(&path).unwrap(),
            key,
            "refused write left key intact"
        );

        write_key(&path, true).unwrap();
        assert_ne!(load_key(&path).unwrap(), key, "--force writes a new key");
    }

    #[test]
    fn key_loading_rejects_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(paths::KEY_FILE);
        let put = |text: &str, mode: u32| {
            fs::write(&path, text).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        };
        put("00112233445566778899aabbccddeeff\n", 0o600);
        let key = load_key(&path).unwrap();
        // Bytes are k0 || k1, little-endian each (the SipHash reference key layout).
        assert_eq!(key.0, [0x7766_5544_3322_1100, 0xffee_ddcc_bbaa_9988]);

        put("00112233445566778899aabbccddeeff\n", 0o640);
        assert!(matches!(
            load_key(&path),
            Err(KeyError::Permissions { mode: 0o640, .. })
        ));
        put("00112233445566778899aabbccddeeff\n", 0o604);
        assert!(matches!(load_key(&path), Err(KeyError::Permissions { .. })));
        put("00112233445566778899aabbccddee\n", 0o600);
        assert!(matches!(
            load_key(&path),
            Err(KeyError::Length { len: 30, .. })
        ));
        put("00112233445566778899aabbccddeeff00\n", 0o600);
        assert!(matches!(load_key(&path), Err(KeyError::Length { .. })));
        put("0011223344556677889zaabbccddeeff\n", 0o600);
        assert!(matches!(load_key(&path), Err(KeyError::NotHex { .. })));
    }
}
