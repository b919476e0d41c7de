//! Retention: recordings older than the pool's `retentionDays` are deleted
//! from the pool's volume. A recording's age is the last change of its
//! directory (the manifest is replaced on every roster change and at the end).
//!
//! The storage gauge is filled by one scan at start ([`used_bytes`]); after
//! that the recorder reports what it writes and [`sweep`] what it deletes.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// A recording deleted by retention and the bytes that freed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deleted {
    pub dir: PathBuf,
    pub bytes: u64,
}

/// Bytes of the regular files under `dir`, links not followed (they point
/// off the volume or back into it). Unreadable parts (a volume's
/// `lost+found`) count as empty.
pub fn used_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => used_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// Delete recording directories under `base` unchanged for `days` days
/// (0 keeps everything). Returns what was deleted.
pub fn sweep(base: &Path, days: u32, now: SystemTime) -> std::io::Result<Vec<Deleted>> {
    if days == 0 {
        return Ok(Vec::new());
    }
    let max_age = Duration::from_secs(u64::from(days) * 86_400);
    let mut deleted = Vec::new();
    let entries = match std::fs::read_dir(base) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(deleted),
        Err(e) => return Err(e),
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        // Only real recording directories (never follow links off the volume).
        if !meta.is_dir() || !path.join("manifest.json.enc").exists() {
            continue;
        }
        let age = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok());
        if age.is_some_and(|a| a > max_age) {
            let bytes = used_bytes(&path);
            std::fs::remove_dir_all(&path)?;
            deleted.push(Deleted { dir: path, bytes });
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deletes_only_old_recordings() {
        let base = std::env::temp_dir().join(format!(
            "retention-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        for name in ["old", "new", "not-a-recording"] {
            std::fs::create_dir_all(base.join(name)).unwrap();
        }
        std::fs::write(base.join("old/manifest.json.enc"), b"x").unwrap();
        std::fs::write(base.join("old/mixed.opus.enc"), [0u8; 1000]).unwrap();
        std::fs::write(base.join("new/manifest.json.enc"), b"xy").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", base.join("new/link")).unwrap();
        assert_eq!(used_bytes(&base), 1003, "links are not followed");
        let now = SystemTime::now();
        let long_ago = now - Duration::from_secs(40 * 86_400);
        std::fs::File::open(base.join("old"))
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
        std::fs::File::open(base.join("not-a-recording"))
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
        assert!(sweep(&base, 0, now).unwrap().is_empty(), "0 keeps forever");
        let deleted = sweep(&base, 30, now).unwrap();
        assert_eq!(
            deleted,
            vec![Deleted {
                dir: base.join("old"),
                bytes: 1001
            }]
        );
        assert_eq!(used_bytes(&base), 2);
        assert!(base.join("new").exists() && base.join("not-a-recording").exists());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
