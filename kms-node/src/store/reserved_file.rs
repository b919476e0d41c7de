//! The store's file, with its space reserved as it grows.
//!
//! redb grows its file with `set_len`, which leaves a hole. A hole's blocks are
//! allocated when they are first written, so every commit that writes into one
//! also makes its fdatasync commit the filesystem's journal: on ext4 here, a
//! commit's sync took 5–14 ms for a while after each growth instead of well under
//! a millisecond, and every key release waiting on it waited that long too.
//! Reserving the growth with `fallocate` allocates the blocks once, when the file
//! grows, and a full disk fails that growth, before anything is written into it.

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, fallocate};
use redb::StorageBackend;
use redb::backends::FileBackend;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

#[derive(Debug)]
pub struct ReservedFile {
    /// redb's own backend: reads, writes, syncs and the file lock.
    inner: FileBackend,
    /// The same open file, to reserve space in.
    file: File,
}

impl ReservedFile {
    /// Opens (creating if missing) the file at `path`, locked as redb locks it.
    pub fn open(path: &Path) -> Result<Self, redb::DatabaseError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        Ok(Self {
            file: file.try_clone()?,
            inner: FileBackend::new(file)?,
        })
    }
}

impl StorageBackend for ReservedFile {
    fn len(&self) -> Result<u64, io::Error> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let old = self.inner.len()?;
        if len > old {
            let (offset, grow) = (to_off(old)?, to_off(len - old)?);
            // Reserved blocks read as zeros, as redb requires of new space.
            match fallocate(&self.file, FallocateFlags::empty(), offset, grow) {
                Ok(()) => return Ok(()),
                // A filesystem without fallocate gets the hole, as before.
                Err(Errno::EOPNOTSUPP) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.inner.write(offset, data)
    }

    fn close(&self) -> Result<(), io::Error> {
        self.inner.close()
    }
}

fn to_off(n: u64) -> Result<i64, io::Error> {
    i64::try_from(n).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn growth_is_reserved_and_reads_as_zeros() {
        let dir = std::env::temp_dir().join(format!("kms-reserved-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("file");
        let _ = std::fs::remove_file(&path);
        let file = ReservedFile::open(&path).unwrap();
        file.write(0, b"head").unwrap();
        file.set_len(1 << 20).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 1 << 20);
        // A hole would have no blocks; reserved space has them all.
        assert!(meta.blocks() * 512 >= 1 << 20, "{} blocks", meta.blocks());
        let mut tail = vec![1u8; 4096];
        file.read((1 << 20) - 4096, &mut tail).unwrap();
        assert!(tail.iter().all(|b| *b == 0));
        let mut head = [0u8; 4];
        file.read(0, &mut head).unwrap();
        assert_eq!(&head, b"head");
        // Shrinking is redb's to ask for, and it gets it.
        file.set_len(8192).unwrap();
        assert_eq!(file.len().unwrap(), 8192);
        drop(file);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_second_open_is_refused_while_the_first_holds_the_lock() {
        let dir = std::env::temp_dir().join(format!("kms-reserved-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("file");
        let first = ReservedFile::open(&path).unwrap();
        assert!(matches!(
            ReservedFile::open(&path),
            Err(redb::DatabaseError::DatabaseAlreadyOpen)
        ));
        drop(first);
        ReservedFile::open(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
