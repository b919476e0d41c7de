//! Restore a recording directory to plain files, for an identity the key
//! source (KMS unwrap, or a local KEK) accepts.

use crate::recording::container::{self, ContainerError, DataKey};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DecryptError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Container {
        path: PathBuf,
        source: ContainerError,
    },
    #[error("the data key was refused: {0}")]
    KeyRefused(String),
    #[error("{0}: unsafe file name in recording header")]
    BadName(PathBuf),
    #[error("{0}: no recording files found")]
    Empty(PathBuf),
}

/// What happened to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileReport {
    pub name: String,
    pub bytes: usize,
    pub chunks: u64,
    /// False: the writer was killed before closing the file; the data up to
    /// its last complete chunk was restored.
    pub complete: bool,
}

/// Decrypt every `*.enc` in `dir` into `out`. `unwrap` turns a wrapped data
/// key into the key (the KMS refuses identities that are not authorized).
pub fn decrypt_dir(
    dir: &Path,
    out: &Path,
    mut unwrap: impl FnMut(&[u8]) -> Result<DataKey, String>,
) -> Result<Vec<FileReport>, DecryptError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DecryptError::Io { path, source }
    };
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "enc"))
        .collect();
    entries.sort();
    if entries.is_empty() {
        return Err(DecryptError::Empty(dir.to_path_buf()));
    }
    std::fs::create_dir_all(out).map_err(io(out))?;
    let mut keys: HashMap<Vec<u8>, DataKey> = HashMap::new();
    let mut reports = Vec::new();
    for path in entries {
        let data = std::fs::read(&path).map_err(io(&path))?;
        let header = container::read_header(&data).map_err(|source| DecryptError::Container {
            path: path.clone(),
            source,
        })?;
        let safe = !header.name.is_empty()
            && header
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && !header.name.starts_with('.');
        if !safe {
            return Err(DecryptError::BadName(path));
        }
        let key = match keys.get(&header.wrapped_key) {
            Some(k) => k.clone(),
            None => {
                let k = unwrap(&header.wrapped_key).map_err(DecryptError::KeyRefused)?;
                keys.insert(header.wrapped_key.clone(), k.clone());
                k
            }
        };
        let d = container::decrypt(&data, &key).map_err(|source| DecryptError::Container {
            path: path.clone(),
            source,
        })?;
        let target = out.join(&header.name);
        std::fs::write(&target, &d.data[..]).map_err(io(&target))?;
        reports.push(FileReport {
            name: header.name,
            bytes: d.data.len(),
            chunks: d.chunks,
            complete: d.complete,
        });
    }
    Ok(reports)
}
