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
    pub fn encode(&self, out: &mut [u8; MAX_HEADER_LEN]) -> usize {
        let mut len = 1;
        let mut config = 0u8;
        for (value, shift) in [(self.kid, 4), (self.ctr, 0)] {
            if value < 8 {
                config |= (value as u8) << shift;
            } else {
                let n = field_len(value);
                config |= (0b1000 | (n as u8 - 1)) << shift;
                out[len..len + n].copy_from_slice(&value.to_be_bytes()[8 - n..]);
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
                let field = bytes.get(len..len + n).ok_or(SframeError::Truncated)?;
                *value = field.iter().fold(0, |acc, &b| (acc << 8) | u64::from(b));
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
        let mut header = [0u8; MAX_HEADER_LEN];
        let hlen = Header { kid: self.kid, ctr }.encode(&mut header);
        out.reserve(hlen + payload.len() + TAG_LEN);
        out.extend_from_slice(&header[..hlen]);
        let start = out.len();
        out.extend_from_slice(payload);
        let tag = with_aad(&header[..hlen], metadata, |aad| {
            self.aead
                .seal_in_place_separate_tag(self.nonce(ctr), aad, &mut out[start..])
                .map_err(|_| SframeError::Authentication)
        })?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
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
        with_aad(header, metadata, |aad| {
            self.aead
                .open_in_place(self.nonce(ctr), aad, buf)
                .map(|plain| plain.len())
                .map_err(|_| SframeError::Authentication)
        })
    }
}

/// AADs up to this size (SFrame header and Conclave's 18-byte routing
/// header fit) are assembled on the stack.
const AAD_STACK: usize = MAX_HEADER_LEN + 32;

/// Runs `f` with `header | metadata` as the AAD.
fn with_aad<T>(
    header: &[u8],
    metadata: &[u8],
    f: impl FnOnce(aead::Aad<&[u8]>) -> Result<T, SframeError>,
) -> Result<T, SframeError> {
    let mut stack = [0u8; AAD_STACK];
    let len = header.len() + metadata.len();
    if len <= stack.len() {
        stack[..header.len()].copy_from_slice(header);
        stack[header.len()..len].copy_from_slice(metadata);
        f(aead::Aad::from(&stack[..len]))
    } else {
        f(aead::Aad::from(&[header, metadata].concat()[..]))
    }
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
