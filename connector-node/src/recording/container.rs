//! Encrypted, authenticated, chunked recording files.
//!
//! ```text
//! header:  "CNCLREC1" | u8 version (1) | 16-byte file id
//!          | u16 len | wrapped data key (opaque: KMS or local KEK envelope)
//!          | u16 len | file name (UTF-8)
//! chunk*:  u32 ciphertext len | u8 flags (bit 0: final) | AES-256-GCM ciphertext+tag
//! ```
//! The chunk key is HKDF-SHA256(data key, salt = file id), so nonces (the
//! chunk index) never repeat under one key. Each chunk's AAD is
//! SHA-256(header) || u64 index || flags: a changed header, a reordered or
//! dropped chunk, or a forged final flag fails authentication. A file cut
//! short by a crash decrypts up to its last complete chunk and is reported
//! as truncated (no final chunk), never silently as complete.

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use std::fmt;
use std::io::{self, Write};
use zeroize::Zeroizing;

pub const MAGIC: &[u8; 8] = b"CNCLREC1";
const VERSION: u8 = 1;
/// Plaintext bytes per chunk (a chunk is also sealed on every flush).
pub const CHUNK_LEN: usize = 64 * 1024;
const TAG_LEN: usize = 16;
const MAX_WRAPPED_LEN: usize = 4096;

/// A recording data key (AES-256). Debug never shows it.
#[derive(Clone)]
pub struct DataKey(Zeroizing<[u8; 32]>);

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

impl DataKey {
    pub fn generate() -> Self {
        let mut k = Zeroizing::new([0u8; 32]);
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut k[..]);
        Self(k)
    }
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let arr: [u8; 32] = b.try_into().ok()?;
        Some(Self(Zeroizing::new(arr)))
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ContainerError {
    #[error("not a Conclave recording file")]
    Magic,
    #[error("unsupported recording format version {0}")]
    Version(u8),
    #[error("recording header is truncated or malformed")]
    Header,
    #[error("chunk {0} failed authentication (tampered, reordered or wrong key)")]
    Auth(u64),
    #[error("data after the final chunk")]
    TrailingData,
    #[error("chunk {0} is larger than allowed")]
    ChunkTooLarge(u64),
}

fn chunk_key(key: &DataKey, file_id: &[u8; 16]) -> LessSafeKey {
    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, file_id).extract(&key.0[..]);
    let mut k = Zeroizing::new([0u8; 32]);
    prk.expand(&[b"conclave recording chunk v1"], Len(32))
        .and_then(|okm| okm.fill(&mut k[..]))
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    LessSafeKey::new(UnboundKey::new(&aead::AES_256_GCM, &k[..]).expect("32-byte AES key"))
}

fn nonce(index: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&index.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

fn aad(header_hash: &[u8; 32], index: u64, flags: u8) -> [u8; 41] {
    let mut a = [0u8; 41];
    a[..32].copy_from_slice(header_hash);
    a[32..40].copy_from_slice(&index.to_be_bytes());
    a[40] = flags;
    a
}

fn header_bytes(file_id: &[u8; 16], wrapped: &[u8], name: &str) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.push(VERSION);
    h.extend_from_slice(file_id);
    h.extend_from_slice(&(wrapped.len() as u16).to_be_bytes());
    h.extend_from_slice(wrapped);
    h.extend_from_slice(&(name.len() as u16).to_be_bytes());
    h.extend_from_slice(name.as_bytes());
    h
}

fn sha256(b: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, b);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Encrypting writer. `flush` seals what is buffered as a chunk, so callers
/// decide how much a crash can lose (the recorder flushes every second).
pub struct ChunkWriter<W: Write> {
    out: W,
    key: LessSafeKey,
    header_hash: [u8; 32],
    index: u64,
    buf: Zeroizing<Vec<u8>>,
    written: u64,
}

impl<W: Write> fmt::Debug for ChunkWriter<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkWriter")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl<W: Write> ChunkWriter<W> {
    pub fn new(mut out: W, key: &DataKey, wrapped: &[u8], name: &str) -> io::Result<Self> {
        if wrapped.len() > MAX_WRAPPED_LEN || name.len() > 1024 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "wrapped key or name too long",
            ));
        }
        let mut file_id = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut file_id);
        let header = header_bytes(&file_id, wrapped, name);
        out.write_all(&header)?;
        Ok(Self {
            out,
            key: chunk_key(key, &file_id),
            header_hash: sha256(&header),
            index: 0,
            buf: Zeroizing::new(Vec::with_capacity(CHUNK_LEN)),
            written: header.len() as u64,
        })
    }

    fn seal(&mut self, final_chunk: bool) -> io::Result<()> {
        let flags = u8::from(final_chunk);
        let mut data = std::mem::replace(&mut *self.buf, Vec::with_capacity(CHUNK_LEN));
        self.key
            .seal_in_place_append_tag(
                nonce(self.index),
                Aad::from(aad(&self.header_hash, self.index, flags)),
                &mut data,
            )
            .map_err(|_| io::Error::other("chunk encryption failed"))?;
        let mut rec = Vec::with_capacity(5 + data.len());
        rec.extend_from_slice(&(data.len() as u32).to_be_bytes());
        rec.push(flags);
        rec.extend_from_slice(&data);
        // One write per record keeps a crash from leaving a half record
        // in most cases; the reader handles it when it happens anyway.
        self.out.write_all(&rec)?;
        self.out.flush()?;
        self.written += rec.len() as u64;
        self.index += 1;
        Ok(())
    }

    /// Bytes of ciphertext file written so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }

    /// Seal the last (final) chunk and return the inner writer.
    pub fn finish(self) -> io::Result<W> {
        self.finish_len().map(|(w, _)| w)
    }

    /// `finish`, also returning the file's final length.
    pub fn finish_len(mut self) -> io::Result<(W, u64)> {
        self.seal(true)?;
        Ok((self.out, self.written))
    }
}

impl<W: Write> Write for ChunkWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK_LEN - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK_LEN {
            self.seal(false)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.seal(false)?;
        }
        Ok(())
    }
}

/// The parsed header of a recording file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub file_id: [u8; 16],
    pub wrapped_key: Vec<u8>,
    pub name: String,
    len: usize,
}

pub fn read_header(data: &[u8]) -> Result<Header, ContainerError> {
    if data.len() < 8 || &data[..8] != MAGIC {
        return Err(ContainerError::Magic);
    }
    let v = *data.get(8).ok_or(ContainerError::Header)?;
    if v != VERSION {
        return Err(ContainerError::Version(v));
    }
    let file_id: [u8; 16] = data
        .get(9..25)
        .ok_or(ContainerError::Header)?
        .try_into()
        .map_err(|_| ContainerError::Header)?;
    let take_len = |at: usize| -> Result<usize, ContainerError> {
        let b = data.get(at..at + 2).ok_or(ContainerError::Header)?;
        Ok(u16::from_be_bytes([b[0], b[1]]) as usize)
    };
    let wl = take_len(25)?;
    let wrapped_key = data
        .get(27..27 + wl)
        .ok_or(ContainerError::Header)?
        .to_vec();
    let nl = take_len(27 + wl)?;
    let name_at = 29 + wl;
    let name = std::str::from_utf8(
        data.get(name_at..name_at + nl)
            .ok_or(ContainerError::Header)?,
    )
    .map_err(|_| ContainerError::Header)?
    .to_string();
    Ok(Header {
        file_id,
        wrapped_key,
        name,
        len: name_at + nl,
    })
}

/// The plaintext of a recording file.
#[derive(Debug, PartialEq, Eq)]
pub struct Decrypted {
    pub data: Zeroizing<Vec<u8>>,
    pub chunks: u64,
    /// False when the file ends without its final chunk (writer crashed).
    pub complete: bool,
}

/// Decrypt a whole file with its data key.
pub fn decrypt(data: &[u8], key: &DataKey) -> Result<Decrypted, ContainerError> {
    let header = read_header(data)?;
    let header_hash = sha256(&data[..header.len]);
    let key = chunk_key(key, &header.file_id);
    let mut out = Zeroizing::new(Vec::new());
    let mut at = header.len;
    let mut index = 0u64;
    loop {
        let Some(rec) = data.get(at..at + 5) else {
            // Cut inside (or right before) a record header: truncated.
            return Ok(Decrypted {
                data: out,
                chunks: index,
                complete: false,
            });
        };
        let len = u32::from_be_bytes([rec[0], rec[1], rec[2], rec[3]]) as usize;
        let flags = rec[4];
        if !(TAG_LEN..=CHUNK_LEN + TAG_LEN).contains(&len) || flags > 1 {
            return Err(ContainerError::ChunkTooLarge(index));
        }
        let Some(ct) = data.get(at + 5..at + 5 + len) else {
            return Ok(Decrypted {
                data: out,
                chunks: index,
                complete: false,
            });
        };
        let mut buf = Zeroizing::new(ct.to_vec());
        let plain = key
            .open_in_place(
                nonce(index),
                Aad::from(aad(&header_hash, index, flags)),
                &mut buf,
            )
            .map_err(|_| ContainerError::Auth(index))?;
        out.extend_from_slice(plain);
        at += 5 + len;
        index += 1;
        if flags & 1 == 1 {
            if at != data.len() {
                return Err(ContainerError::TrailingData);
            }
            return Ok(Decrypted {
                data: out,
                chunks: index,
                complete: true,
            });
        }
    }
}

/// Envelope encryption of data keys under a local key-encryption key, for
/// pools without a KMS data-key API and for tests. Blob: "LK1" | nonce | ct.
pub struct LocalKek(LessSafeKey);

impl fmt::Debug for LocalKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LocalKek(<redacted>)")
    }
}

const KEK_AAD: &[u8] = b"conclave recording data key v1";

impl LocalKek {
    pub fn new(key: &DataKey) -> Self {
        Self(LessSafeKey::new(
            UnboundKey::new(&aead::AES_256_GCM, &key.0[..]).expect("32-byte AES key"),
        ))
    }

    pub fn wrap(&self, key: &DataKey) -> Vec<u8> {
        let mut n = [0u8; 12];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut n);
        let mut ct = key.0.to_vec();
        self.0
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(n), Aad::from(KEK_AAD), &mut ct)
            .expect("sealing 32 bytes cannot fail");
        let mut blob = b"LK1".to_vec();
        blob.extend_from_slice(&n);
        blob.extend_from_slice(&ct);
        blob
    }

    pub fn unwrap_key(&self, blob: &[u8]) -> Option<DataKey> {
        let rest = blob.strip_prefix(b"LK1")?;
        let n: [u8; 12] = rest.get(..12)?.try_into().ok()?;
        let mut ct = Zeroizing::new(rest.get(12..)?.to_vec());
        let plain = self
            .0
            .open_in_place(Nonce::assume_unique_for_key(n), Aad::from(KEK_AAD), &mut ct)
            .ok()?;
        DataKey::from_bytes(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(key: &DataKey, parts: &[&[u8]], finish: bool) -> Vec<u8> {
        let mut w = ChunkWriter::new(Vec::new(), key, b"wrapped", "a.opus").unwrap();
        for p in parts {
            w.write_all(p).unwrap();
            w.flush().unwrap();
        }
        if finish {
            w.finish().unwrap()
        } else {
            std::mem::take(w.get_mut())
        }
    }

    #[test]
    fn roundtrip_and_large_writes() {
        let key = DataKey::generate();
        let big = vec![7u8; CHUNK_LEN * 2 + 10];
        let f = file(&key, &[b"hello ", &big, b"world"], true);
        let d = decrypt(&f, &key).unwrap();
        assert!(d.complete);
        assert_eq!(d.data.len(), 6 + big.len() + 5);
        assert!(d.data.starts_with(b"hello ") && d.data.ends_with(b"world"));
        let h = read_header(&f).unwrap();
        assert_eq!(
            (h.name.as_str(), h.wrapped_key.as_slice()),
            ("a.opus", &b"wrapped"[..])
        );
        assert!(
            !f.windows(5).any(|w| w == b"hello"),
            "plaintext not visible"
        );
    }

    #[test]
    fn truncation_keeps_complete_chunks_and_is_reported() {
        let key = DataKey::generate();
        let f = file(&key, &[b"one", b"two", b"three"], false);
        for cut in [f.len(), f.len() - 1, f.len() - 20] {
            let d = decrypt(&f[..cut], &key).unwrap();
            assert!(!d.complete);
            let want: &[u8] = if cut == f.len() {
                b"onetwothree"
            } else {
                b"onetwo"
            };
            assert_eq!(&d.data[..], want);
        }
        let full = file(&key, &[b"one", b"two"], true);
        // Cutting off the final chunk is detected as truncation, not completeness.
        let d = decrypt(&full[..full.len() - 21], &key).unwrap();
        assert!(!d.complete);
    }

    #[test]
    fn tampering_reordering_and_wrong_keys_fail() {
        let key = DataKey::generate();
        let f = file(&key, &[b"aaaa", b"bbbb"], true);
        let h = read_header(&f).unwrap().len;
        let rec = 5 + 4 + TAG_LEN;
        // Swap the first two chunks.
        let mut swapped = f[..h].to_vec();
        swapped.extend_from_slice(&f[h + rec..h + 2 * rec]);
        swapped.extend_from_slice(&f[h..h + rec]);
        swapped.extend_from_slice(&f[h + 2 * rec..]);
        assert_eq!(decrypt(&swapped, &key), Err(ContainerError::Auth(0)));
        // Drop the middle chunk.
        let mut dropped = f[..h + rec].to_vec();
        dropped.extend_from_slice(&f[h + 2 * rec..]);
        assert_eq!(decrypt(&dropped, &key), Err(ContainerError::Auth(1)));
        // Forge "final" on the first chunk.
        let mut forged = f.clone();
        forged[h + 4] = 1;
        assert_eq!(decrypt(&forged, &key), Err(ContainerError::Auth(0)));
        // Change the file name in the header.
        let mut renamed = f.clone();
        renamed[h - 1] ^= 1;
        assert_eq!(decrypt(&renamed, &key), Err(ContainerError::Auth(0)));
        assert_eq!(
            decrypt(&f, &DataKey::generate()),
            Err(ContainerError::Auth(0))
        );
        assert_eq!(decrypt(b"garbage", &key), Err(ContainerError::Magic));
        let mut trailing = f.clone();
        trailing.push(0);
        assert_eq!(decrypt(&trailing, &key), Err(ContainerError::TrailingData));
    }

    #[test]
    fn local_kek_envelope() {
        let kek = LocalKek::new(&DataKey::generate());
        let dk = DataKey::generate();
        let blob = kek.wrap(&dk);
        assert_eq!(kek.unwrap_key(&blob).unwrap().as_bytes(), dk.as_bytes());
        assert!(
            LocalKek::new(&DataKey::generate())
                .unwrap_key(&blob)
                .is_none()
        );
        assert!(!format!("{dk:?}{kek:?}").contains(&hex::encode(dk.as_bytes())));
    }
}
