//! Appends event records to a JSON-lines file, rotating by size: `file` is current,
//! `file.1` the one before, up to `file.<keep>`; older files are deleted.
//!
//! Events are already rate-capped in the kernel, so one `write` per line (no buffering)
//! costs little and leaves no half-written line behind a crash.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use serde::Serialize;

use super::TelemetryError;

/// Event files hold fingerprints and client addresses: owner and group only.
const FILE_MODE: u32 = 0o640;

#[derive(Debug)]
pub struct EventExporter {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    file: File,
    size: u64,
}

impl EventExporter {
    /// Opens (appending to) `path`. A file reaching `max_bytes` is rotated; `keep` rotated
    /// files are kept (0: the current file is simply started afresh).
    pub fn new(
        path: impl Into<PathBuf>,
        max_bytes: u64,
        keep: usize,
    ) -> Result<Self, TelemetryError> {
        let path = path.into();
        let file = open(&path)?;
        let size = file
            .metadata()
            .map_err(|source| TelemetryError::ExportOpen {
                path: path.clone(),
                source,
            })?
            .len();
        Ok(EventExporter {
            path,
            max_bytes,
            keep,
            file,
            size,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record as a JSON line, rotating first if the line would push the file
    /// past `max_bytes` (a file always takes at least one line, however long).
    pub fn write(&mut self, record: &impl Serialize) -> Result<(), TelemetryError> {
        let mut line = serde_json::to_string(record).map_err(TelemetryError::EventSerialize)?;
        line.push('\n');
        let len = line.len() as u64;
        if self.size > 0 && self.size + len > self.max_bytes {
            self.rotate()?;
        }
        self.file
            .write_all(line.as_bytes())
            .map_err(|source| TelemetryError::ExportWrite {
                path: self.path.clone(),
                source,
            })?;
        self.size += len;
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), TelemetryError> {
        if self.keep == 0 {
            remove_if_exists(&self.path)?;
        } else {
            remove_if_exists(&numbered(&self.path, self.keep))?;
            for i in (1..self.keep).rev() {
                rename_if_exists(&numbered(&self.path, i), &numbered(&self.path, i + 1))?;
            }
            rename_if_exists(&self.path, &numbered(&self.path, 1))?;
        }
        self.file = open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

/// `path.n`
pub fn numbered(path: &Path, n: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

fn open(path: &Path) -> Result<File, TelemetryError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .open(path)
        .map_err(|source| TelemetryError::ExportOpen {
            path: path.to_owned(),
            source,
        })
}

fn remove_if_exists(path: &Path) -> Result<(), TelemetryError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(TelemetryError::ExportRemove {
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

fn rename_if_exists(from: &Path, to: &Path) -> Result<(), TelemetryError> {
    match std::fs::rename(from, to) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(TelemetryError::ExportRotate {
            from: from.to_owned(),
            to: to.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::telemetry::EventRecord;

    fn record(n: usize) -> EventRecord {
        EventRecord {
            time: format!("2024-05-01T12:00:{:02}.000000000Z", n % 60),
            fingerprint: Some(crate::control::Fp(agent_common::Fingerprint([0, n as u64]))),
            verdict: "throttled".into(),
            action: "dropped".into(),
            listener: "api".into(),
            src: "192.0.2.7:40000".into(),
            dst: "10.1.2.3:8080".into(),
            method: "GET".into(),
            path_hash: format!("{n:016x}"),
        }
    }

    fn read(path: &Path) -> Vec<EventRecord> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn line_len() -> u64 {
        record(0).to_json_line().unwrap().len() as u64 + 1
    }

    #[test]
    fn rotates_at_max_bytes_and_keeps_n() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        // Three lines fit in one file.
        let max = 3 * line_len() + 5;
        let mut x = EventExporter::new(&path, max, 2).unwrap();
        for n in 0..3 {
            x.write(&record(n)).unwrap();
        }
        assert!(
            !numbered(&path, 1).exists(),
            "rotated before reaching max_bytes"
        );
        x.write(&record(3)).unwrap();
        assert!(numbered(&path, 1).exists(), "no rotation past max_bytes");
        assert_eq!(
            read(&numbered(&path, 1)),
            (0..3).map(record).collect::<Vec<_>>()
        );
        assert_eq!(read(&path), vec![record(3)]);

        for n in 4..14 {
            x.write(&record(n)).unwrap();
        }
        // 14 records: files of 3 → current holds 12..14, .1 9..12, .2 6..9; older deleted.
        assert_eq!(read(&path), (12..14).map(record).collect::<Vec<_>>());
        assert_eq!(
            read(&numbered(&path, 1)),
            (9..12).map(record).collect::<Vec<_>>()
        );
        assert_eq!(
            read(&numbered(&path, 2)),
            (6..9).map(record).collect::<Vec<_>>()
        );
        assert!(!numbered(&path, 3).exists());
        for p in [path.clone(), numbered(&path, 1), numbered(&path, 2)] {
            let meta = std::fs::metadata(&p).unwrap();
            assert!(meta.len() <= max);
            assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        }
    }

    #[test]
    fn reopening_appends_and_counts_existing_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let max = 2 * line_len();
        EventExporter::new(&path, max, 1)
            .unwrap()
            .write(&record(0))
            .unwrap();
        let mut x = EventExporter::new(&path, max, 1).unwrap();
        x.write(&record(1)).unwrap();
        assert_eq!(read(&path), vec![record(0), record(1)]);
        x.write(&record(2)).unwrap();
        assert_eq!(read(&numbered(&path, 1)), vec![record(0), record(1)]);
        assert_eq!(read(&path), vec![record(2)]);
    }

    #[test]
    fn keep_zero_starts_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let mut x = EventExporter::new(&path, line_len(), 0).unwrap();
        x.write(&record(0)).unwrap();
        x.write(&record(1)).unwrap();
        assert_eq!(read(&path), vec![record(1)]);
        assert!(!numbered(&path, 1).exists());
    }

    #[test]
    fn oversized_line_still_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let mut x = EventExporter::new(&path, 10, 1).unwrap();
        x.write(&record(0)).unwrap();
        x.write(&record(1)).unwrap();
        assert_eq!(read(&path), vec![record(1)]);
        assert_eq!(read(&numbered(&path, 1)), vec![record(0)]);
    }

    #[test]
    fn unwritable_directory_is_reported_with_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("events.jsonl");
        let err = EventExporter::new(&path, 100, 1).unwrap_err();
        assert!(matches!(&err, TelemetryError::ExportOpen { path: p, .. } if *p == path));
        assert!(err.to_string().contains("events.jsonl"));
    }
}
