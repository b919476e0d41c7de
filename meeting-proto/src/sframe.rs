//! SFrame (RFC 9605) for the AES-GCM cipher suites, directly on ring.
//!
//! Written here rather than through the `sframe` crate because its framing
//! costs as much as the AEAD itself on a 1000-byte frame: a zero-filled
//! buffer per frame, AAD assembled in the output and then reordered, variable
//! length fields built through iterators. Here a frame is one header write,
//! one copy of the payload and an in-place seal; opening is an in-place open
//! with no allocation at all. The RFC's Appendix C vectors (header encodings
//! and both GCM suites) and a cross-check against the `sframe` crate run in
//! `tests/rfc9605_vectors.rs`.
//!
//! ```text
//! frame = header | AEAD.Encrypt(sframe_key, salt ^ ctr, header | metadata, payload)
//! ```

use ring::{aead, hkdf};
use zeroize::Zeroize;

/// Longest SFrame header: config byte, 8-byte KID, 8-byte CTR.
pub const MAX_HEADER_LEN: usize = 17;
/// AES-GCM tag length of both supported suites.
pub const TAG_LEN: usize = 16;

/// The RFC 9605 cipher suites this module implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum CipherSuite {
    /// 0x0004, the one Conclave uses.
    AesGcm128Sha256 = 4,
    AesGcm256Sha512 = 5,
}

impl CipherSuite {
    pub fn from_id(id: u16) -> Option<Self> {
        match id {
            4 => Some(Self::AesGcm128Sha256),
            5 => Some(Self::AesGcm256Sha512),
            _ => None,
        }
    }

    fn algorithms(self) -> (hkdf::Algorithm, &'static aead::Algorithm) {
        match self {
            Self::AesGcm128Sha256 => (hkdf::HKDF_SHA256, &aead::AES_128_GCM),
            Self::AesGcm256Sha512 => (hkdf::HKDF_SHA512, &aead::AES_256_GCM),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum SframeError {
    #[error("SFrame header truncated")]
    Truncated,
    #[error("frame failed authentication")]
    Authentication,
    #[error("key derivation failed")]
    KeyDerivation,
    #[error("frame counter exhausted for this key")]
    CounterExhausted,
}

/// A decoded SFrame header: key id and counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kid: u64,
    pub ctr: u64,
}

/// Bytes needed for `v` as a big-endian field (at least 1).
fn field_len(v: u64) -> usize {
    (8 - v.leading_zeros() as usize / 8).max(1)
}

impl Header {
    /// Writes the header (RFC 9605 section 4.3) and returns its length.
    /// Bytes of `out` past that length are scratch.
    pub fn encode(&self, out: &mut [u8; MAX_HEADER_LEN]) -> usize {
        let mut len = 1;
        let mut config = 0u8;
        for (value, shift) in [(self.kid, 4), (self.ctr, 0)] {
            if value < 8 {
                config |= (value as u8) << shift;
            } else {
                let n = field_len(value);
                config |= (0b1000 | (n as u8 - 1)) << shift;
                // One fixed 8-byte store, value's n bytes first: a field of
                // variable length would be a memcpy call. It ends within
                // `out` (1 + 8 + 8 bytes) and a later field overwrites its tail.
                let field = (value << (8 * (8 - n))).to_be_bytes();
                out[len..len + 8].copy_from_slice(&field);
                len += n;
            }
        }
        out[0] = config;
        len
    }

    /// Reads a header from the start of `bytes`; returns it and its length.
    pub fn decode(bytes: &[u8]) -> Result<(Self, usize), SframeError> {
        let (&config, _) = bytes.split_first().ok_or(SframeError::Truncated)?;
        let mut len = 1;
        let mut values = [0u64; 2];
        for (value, nibble) in values.iter_mut().zip([config >> 4, config & 0x0f]) {
            if nibble & 0b1000 == 0 {
                *value = u64::from(nibble);
            } else {
                let n = usize::from(nibble & 0b0111) + 1;
                *value = match bytes.get(len..len + 8) {
                    // A frame goes on past its header (at least the tag):
                    // one 8-byte load, shifted down to the field's n bytes.
                    Some(word) => {
                        let word = u64::from_be_bytes(word.try_into().expect("8 bytes"));
                        word >> (8 * (8 - n))
                    }
                    _ => {
                        let field = bytes.get(len..len + n).ok_or(SframeError::Truncated)?;
                        field.iter().fold(0, |acc, &b| (acc << 8) | u64::from(b))
                    }
                };
                len += n;
            }
        }
        Ok((
            Self {
                kid: values[0],
                ctr: values[1],
            },
            len,
        ))
    }
}

struct Len(usize);
impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// A derived `sframe_key` (expanded once, key schedule kept) and `sframe_salt`.
pub struct Key {
    kid: u64,
    aead: aead::LessSafeKey,
    salt: [u8; aead::NONCE_LEN],
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        // ring keeps its key schedule private and does not clear it; the salt is ours.
        self.salt.zeroize();
    }
}

impl Key {
    /// RFC 9605 section 4.4.2: HKDF-Extract of the base key, then the
    /// "SFrame 1.0 Secret key/salt" expansions bound to KID and suite.
    pub fn derive(suite: CipherSuite, kid: u64, base_key: &[u8]) -> Result<Self, SframeError> {
        let (kdf, alg) = suite.algorithms();
        let prk = hkdf::Salt::new(kdf, &[]).extract(base_key);
        let kid_bytes = kid.to_be_bytes();
        let suite_bytes = (suite as u16).to_be_bytes();
        let expand = |label: &[u8], out: &mut [u8]| {
            prk.expand(
                &[b"SFrame 1.0 ", label, &kid_bytes, &suite_bytes],
                Len(out.len()),
            )
            .and_then(|okm| okm.fill(out))
            .map_err(|_| SframeError::KeyDerivation)
        };
        let mut key = zeroize::Zeroizing::new([0u8; 32]);
        let key = &mut key[..alg.key_len()];
        expand(b"Secret key ", key)?;
        let mut salt = [0u8; aead::NONCE_LEN];
        expand(b"Secret salt ", &mut salt)?;
        let unbound = aead::UnboundKey::new(alg, key).map_err(|_| SframeError::KeyDerivation)?;
        Ok(Self {
            kid,
            aead: aead::LessSafeKey::new(unbound),
            salt,
        })
    }

    pub fn kid(&self) -> u64 {
        self.kid
    }

    fn nonce(&self, ctr: u64) -> aead::Nonce {
        // salt XOR ctr as a 96-bit big-endian integer (ctr fills the low 64 bits).
        let mut n = self.salt;
        let (_, low) = n.split_at_mut(aead::NONCE_LEN - 8);
        let mixed = u64::from_be_bytes(low.try_into().expect("8 bytes")) ^ ctr;
        low.copy_from_slice(&mixed.to_be_bytes());
        aead::Nonce::assume_unique_for_key(n)
    }

    /// Appends `header | ciphertext | tag` of `payload` under counter `ctr`
    /// to `out`, authenticating `metadata` too (it is not written).
    pub fn seal_append(
        &self,
        ctr: u64,
        metadata: &[u8],
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), SframeError> {
        let header = Header { kid: self.kid, ctr };
        let mut aad = Aad::new();
        let (first, _) = aad.buf.split_first_chunk_mut().expect("AAD_STACK > header");
        aad.len = header.encode(first);
        let hlen = aad.len;
        aad.push(metadata);
        let start = out.len();
        out.reserve(MAX_HEADER_LEN + payload.len() + TAG_LEN);
        // Encoded a second time, straight into `out`: copying it from the
        // AAD would load bytes the encoder has only just stored, which the
        // CPU cannot forward from several narrow stores to one wide load.
        out.extend_from_slice(&[0; MAX_HEADER_LEN]);
        let (dst, _) = out[start..].split_first_chunk_mut().expect("just extended");
        header.encode(dst);
        out.truncate(start + hlen);
        out.extend_from_slice(payload);
        // Matched rather than `?`: re-wrapping the error makes the compiler
        // move the tag through an odd-offset stack copy.
        match self.aead.seal_in_place_separate_tag(
            self.nonce(ctr),
            aad.get(),
            &mut out[start + hlen..],
        ) {
            Ok(tag) => {
                out.extend_from_slice(tag.as_ref());
                Ok(())
            }
            Err(_) => Err(SframeError::Authentication),
        }
    }

    /// Opens `ciphertext | tag` in place; `header` is the frame's SFrame
    /// header bytes as received (they are part of the AAD). Returns the
    /// plaintext length (the plaintext is at the start of `buf`).
    pub fn open_in_place(
        &self,
        ctr: u64,
        header: &[u8],
        metadata: &[u8],
        buf: &mut [u8],
    ) -> Result<usize, SframeError> {
        let mut aad = Aad::new();
        aad.push(header);
        aad.push(metadata);
        self.aead
            .open_in_place(self.nonce(ctr), aad.get(), buf)
            .map(|plain| plain.len())
            .map_err(|_| SframeError::Authentication)
    }
}

/// AADs up to this size (an SFrame header and metadata of up to 32 bytes,
/// such as Conclave's 18-byte routing header) are assembled on the stack.
const AAD_STACK: usize = MAX_HEADER_LEN + 32 + 32;

/// `header | metadata`, the AEAD's associated data (RFC 9605 section 4.4.3).
///
/// At a thousand bytes per frame the AEAD takes a few hundred nanoseconds,
/// so a libc memcpy call per AAD piece (a few bytes of unknown length each)
/// shows in the throughput: short pieces are copied with fixed-size moves
/// instead ([`copy_short`]).
struct Aad {
    buf: [u8; AAD_STACK],
    len: usize,
    /// Set once a piece did not fit `buf`; then holds the whole AAD.
    heap: Vec<u8>,
}

impl Aad {
    fn new() -> Self {
        Self {
            buf: [0; AAD_STACK],
            len: 0,
            heap: Vec::new(),
        }
    }

    #[inline]
    fn push(&mut self, piece: &[u8]) {
        // copy_short writes up to 32 bytes from `len`, so `len` stays below
        // AAD_STACK - 32 on this path (17 + 32 at most after two pieces).
        if piece.len() <= 32 && self.len <= MAX_HEADER_LEN + 32 && self.heap.is_empty() {
            copy_short(&mut self.buf[self.len..], piece);
            self.len += piece.len();
        } else {
            self.spill(piece);
        }
    }

    #[cold]
    fn spill(&mut self, piece: &[u8]) {
        if self.heap.is_empty() {
            self.heap.extend_from_slice(&self.buf[..self.len]);
        }
        self.heap.extend_from_slice(piece);
    }

    fn get(&self) -> aead::Aad<&[u8]> {
        aead::Aad::from(if self.heap.is_empty() {
            &self.buf[..self.len]
        } else {
            &self.heap[..]
        })
    }
}

/// Copies `src` (at most 32 bytes) to the start of `dst` with two
/// overlapping fixed-size moves, as libc does inside memcpy, without the
/// call. `dst` must hold 32 bytes.
fn copy_short(dst: &mut [u8], src: &[u8]) {
    debug_assert!(src.len() <= 32 && dst.len() >= 32);
    match src.len() {
        16.. => copy_ends::<16>(dst, src),
        8..=15 => copy_ends::<8>(dst, src),
        4..=7 => copy_ends::<4>(dst, src),
        2..=3 => copy_ends::<2>(dst, src),
        1 => dst[0] = src[0],
        0 => {}
    }
}

/// The first and the last `W` bytes of `src` (`W <= src.len() <= 2 * W`):
/// constant-size moves the compiler inlines.
fn copy_ends<const W: usize>(dst: &mut [u8], src: &[u8]) {
    let n = src.len();
    dst[..W].copy_from_slice(&src[..W]);
    dst[n - W..n].copy_from_slice(&src[n - W..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_live_in_the_config_byte_and_long_ones_are_minimal() {
        let mut buf = [0u8; MAX_HEADER_LEN];
        for (kid, ctr, want) in [
            (0, 0, vec![0x00]),
            (7, 7, vec![0x77]),
            (8, 0, vec![0x80, 8]),
            (0x123, 0x4567, vec![0x99, 0x01, 0x23, 0x45, 0x67]),
            (
                u64::MAX,
                u64::MAX,
                [[0xff].as_slice(), &[0xff; 16]].concat(),
            ),
        ] {
            let n = Header { kid, ctr }.encode(&mut buf);
            assert_eq!(&buf[..n], &want[..], "kid {kid} ctr {ctr}");
            assert_eq!(Header::decode(&want), Ok((Header { kid, ctr }, n)));
        }
    }

    #[test]
    fn truncated_headers_are_refused() {
        assert_eq!(Header::decode(&[]), Err(SframeError::Truncated));
        assert_eq!(
            Header::decode(&[0x99, 1, 2, 3]),
            Err(SframeError::Truncated)
        );
        assert_eq!(Header::decode(&[0x0f, 1]), Err(SframeError::Truncated));
    }

    #[test]
    fn decoding_with_or_without_trailing_bytes_agrees() {
        let mut buf = [0u8; MAX_HEADER_LEN];
        for kid in [0, 7, 8, 0xff, 0x100, 0x1_0001, 1 << 40, u64::MAX] {
            for ctr in [0, 9, 0xffff, 0x12_3456, (1 << 56) + 3, u64::MAX] {
                let n = Header { kid, ctr }.encode(&mut buf);
                let mut long = buf[..n].to_vec();
                long.extend_from_slice(&[0xa5; 20]);
                for bytes in [&buf[..n], &long[..]] {
                    assert_eq!(Header::decode(bytes), Ok((Header { kid, ctr }, n)));
                }
            }
        }
    }

    #[test]
    fn aad_is_header_then_metadata_for_every_length() {
        let bytes: Vec<u8> = (0..100u8).map(|i| i.wrapping_mul(37)).collect();
        for h in 0..=40 {
            for m in 0..=90 {
                let (header, metadata) = (&bytes[..h], &bytes[100 - m..]);
                let mut aad = Aad::new();
                aad.push(header);
                aad.push(metadata);
                assert_eq!(aad.get().as_ref(), [header, metadata].concat(), "{h} + {m}");
            }
        }
    }

    #[test]
    fn long_metadata_still_seals_and_opens() {
        let key = Key::derive(CipherSuite::AesGcm128Sha256, u64::MAX - 1, &[2; 32]).unwrap();
        let meta = [0x33; 200];
        let mut frame = Vec::new();
        key.seal_append(u64::MAX, &meta, b"x", &mut frame).unwrap();
        let (h, hlen) = Header::decode(&frame).unwrap();
        assert_eq!(
            (h.kid, h.ctr, hlen),
            (u64::MAX - 1, u64::MAX, MAX_HEADER_LEN)
        );
        let (hdr, body) = frame.split_at(hlen);
        let mut buf = body.to_vec();
        assert_eq!(key.open_in_place(h.ctr, hdr, &meta, &mut buf), Ok(1));
        let mut buf = body.to_vec();
        assert!(key.open_in_place(h.ctr, hdr, &meta[1..], &mut buf).is_err());
    }

    #[test]
    fn seal_then_open_and_any_change_fails() {
        let key = Key::derive(CipherSuite::AesGcm128Sha256, 9, &[1; 32]).unwrap();
        let mut frame = Vec::new();
        key.seal_append(5, b"meta", b"hello", &mut frame).unwrap();
        let (h, hlen) = Header::decode(&frame).unwrap();
        assert_eq!(h, Header { kid: 9, ctr: 5 });
        let (hdr, body) = frame.split_at(hlen);
        let mut buf = body.to_vec();
        let n = key.open_in_place(5, hdr, b"meta", &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        let mut buf = body.to_vec();
        assert_eq!(
            key.open_in_place(5, hdr, b"Meta", &mut buf),
            Err(SframeError::Authentication)
        );
        let mut buf = body.to_vec();
        assert_eq!(
            key.open_in_place(6, hdr, b"meta", &mut buf),
            Err(SframeError::Authentication)
        );
        assert!(format!("{key:?}").contains("redacted"));
    }
}
