//! The key hierarchy: root key -> versioned KEKs -> meeting keys (one per
//! epoch) and recording data keys, plus the KMS's Ed25519 signing key.
//!
//! Only wrapped keys leave this module towards the store. Every wrap is
//! AES-256-GCM with a random nonce and associated data naming exactly what
//! the key is for ([`Purpose`]) and the KEK version, so a wrapped key copied
//! to another meeting, epoch or KEK slot fails to unwrap.

use ed25519_dalek::SigningKey;
use meeting_proto::ids::MeetingId;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use zeroize::Zeroizing;

pub const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;
/// Version (u32) | nonce | ciphertext+tag of a 32-byte key.
pub const WRAPPED_LEN: usize = 4 + NONCE_LEN + KEY_LEN + TAG_LEN;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("root key file {0} is missing (set rootKey.generateIfMissing for dev)")]
    RootMissing(String),
    #[error("root key file must hold 32 raw bytes or 64 hex characters")]
    RootMalformed,
    #[error("root key file {path}: {error}")]
    RootIo { path: String, error: String },
    #[error("wrapped key is malformed")]
    Malformed,
    #[error("KEK version {0} is unknown or retired")]
    UnknownKek(u32),
    #[error("unwrap failed: wrong key or associated data (tampered, moved, or wrong root key)")]
    Unwrap,
    #[error("random number generator failed")]
    Rng,
    #[error("HPKE seal failed: recipient public key is invalid")]
    BadRecipient,
    #[error("the signing key was refused by the signing library")]
    BadSigningKey,
}

/// What a wrapped key is for. Its encoding is the AEAD associated data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Purpose<'a> {
    Kek {
        version: u32,
    },
    SigningKey,
    RootCheck,
    MeetingKey {
        meeting: &'a MeetingId,
        epoch: u64,
    },
    RecordingKey {
        meeting: &'a MeetingId,
        recording: &'a str,
    },
}

impl Purpose<'_> {
    fn aad(&self, kek_version: u32) -> Vec<u8> {
        let mut out = b"conclave wrap v1\0".to_vec();
        out.extend_from_slice(&kek_version.to_be_bytes());
        match self {
            Purpose::Kek { version } => {
                out.push(1);
                out.extend_from_slice(&version.to_be_bytes());
            }
            Purpose::SigningKey => out.push(2),
            Purpose::RootCheck => out.push(3),
            Purpose::MeetingKey { meeting, epoch } => {
                out.push(4);
                push_str(&mut out, meeting.as_str());
                out.extend_from_slice(&epoch.to_be_bytes());
            }
            Purpose::RecordingKey { meeting, recording } => {
                out.push(5);
                push_str(&mut out, meeting.as_str());
                push_str(&mut out, recording);
            }
        }
        out
    }
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// 32 secret bytes. Zeroized on drop; Debug never shows them.
#[derive(Clone)]
pub struct SecretKey(Zeroizing<[u8; KEY_LEN]>);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

impl SecretKey {
    pub fn random(rng: &SystemRandom) -> Result<Self, KeyError> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        rng.fill(key.as_mut()).map_err(|_| KeyError::Rng)?;
        Ok(Self(key))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        if bytes.len() != KEY_LEN {
            return Err(KeyError::Malformed);
        }
        key.copy_from_slice(bytes);
        Ok(Self(key))
    }

    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    // ring's key schedule does not zeroize; it lives only for one call.
    fn aead(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, self.0.as_ref()).expect("32-byte key"))
    }

    /// Wraps `plain` under this key for `purpose`, recording `version` (the
    /// version of this key) in front so unwrapping finds the right key.
    fn wrap(
        &self,
        version: u32,
        purpose: &Purpose<'_>,
        plain: &[u8],
        rng: &SystemRandom,
    ) -> Result<Vec<u8>, KeyError> {
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill(&mut nonce).map_err(|_| KeyError::Rng)?;
        let mut buf = plain.to_vec();
        self.aead()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(purpose.aad(version)),
                &mut buf,
            )
            .map_err(|_| KeyError::Rng)?;
        let mut out = Vec::with_capacity(4 + NONCE_LEN + buf.len());
        out.extend_from_slice(&version.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        Ok(out)
    }

    fn unwrap(&self, wrapped: &[u8], purpose: &Purpose<'_>) -> Result<SecretKey, KeyError> {
        let (version, nonce, ct) = split_wrapped(wrapped)?;
        let mut buf = Zeroizing::new(ct.to_vec());
        let plain = self
            .aead()
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(purpose.aad(version)),
                &mut buf,
            )
            .map_err(|_| KeyError::Unwrap)?;
        SecretKey::from_bytes(plain)
    }
}

fn split_wrapped(wrapped: &[u8]) -> Result<(u32, [u8; NONCE_LEN], &[u8]), KeyError> {
    if wrapped.len() != WRAPPED_LEN {
        return Err(KeyError::Malformed);
    }
    let version = u32::from_be_bytes(wrapped[..4].try_into().expect("4 bytes"));
    let nonce = wrapped[4..4 + NONCE_LEN].try_into().expect("12 bytes");
    Ok((version, nonce, &wrapped[4 + NONCE_LEN..]))
}

/// The KEK version a wrapped key was made with.
pub fn wrapped_version(wrapped: &[u8]) -> Result<u32, KeyError> {
    split_wrapped(wrapped).map(|(v, _, _)| v)
}

/// The root key: the one secret from outside (a Kubernetes Secret). It only
/// wraps KEKs and the signing key.
pub struct RootKey(SecretKey);

impl fmt::Debug for RootKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RootKey(<redacted>)")
    }
}

impl RootKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        SecretKey::from_bytes(bytes).map(Self)
    }

    /// Reads the root key file (32 raw bytes, or 64 hex characters with
    /// optional surrounding whitespace). With `generate`, a missing file is
    /// created with a fresh random key (mode 0600).
    pub fn load(path: &Path, generate: bool) -> Result<Self, KeyError> {
        let io = |e: std::io::Error| KeyError::RootIo {
            path: path.display().to_string(),
            error: e.kind().to_string(),
        };
        match std::fs::read(path) {
            Ok(bytes) => {
                let bytes = Zeroizing::new(bytes);
                if bytes.len() == KEY_LEN {
                    return Self::from_bytes(&bytes);
                }
                let text = std::str::from_utf8(&bytes).map_err(|_| KeyError::RootMalformed)?;
                let decoded = Zeroizing::new(
                    meeting_proto::kms_api::Hex::decode(text.trim())
                        .map_err(|_| KeyError::RootMalformed)?,
                );
                Self::from_bytes(&decoded).map_err(|_| KeyError::RootMalformed)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && generate => {
                let key = SecretKey::random(&SystemRandom::new())?;
                let hex = Zeroizing::new(meeting_proto::kms_api::Hex::encode(key.expose()));
                write_private(path, hex.as_bytes()).map_err(io)?;
                Ok(Self(key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(KeyError::RootMissing(path.display().to_string()))
            }
            Err(e) => Err(io(e)),
        }
    }
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

/// A KEK as stored: wrapped by the root key, with its life times.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredKek {
    pub version: u32,
    pub wrapped: meeting_proto::kms_api::Hex,
    pub created_ms: u64,
    /// When it stopped being current (None while current).
    #[serde(default)]
    pub superseded_ms: Option<u64>,
}

/// All usable KEKs, unwrapped in memory, and the signing key.
pub struct KeyRing {
    root: RootKey,
    keks: BTreeMap<u32, (SecretKey, StoredKek)>,
    current: u32,
    rng: SystemRandom,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("kek_versions", &self.keks.keys().collect::<Vec<_>>())
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl KeyRing {
    /// Opens the ring from stored KEKs, checking the root key against the
    /// stored root check first so a wrong root key fails closed with a clear
    /// error instead of failing later on some meeting.
    pub fn open(
        root: RootKey,
        root_check: Option<&[u8]>,
        stored: Vec<StoredKek>,
    ) -> Result<(Self, Option<Vec<u8>>), KeyError> {
        let rng = SystemRandom::new();
        let new_check = match root_check {
            Some(check) => {
                root.0.unwrap(check, &Purpose::RootCheck)?;
                None
            }
            None => Some(root.0.wrap(0, &Purpose::RootCheck, &[0u8; KEY_LEN], &rng)?),
        };
        let mut keks = BTreeMap::new();
        for kek in stored {
            let key = root.0.unwrap(
                &kek.wrapped.0,
                &Purpose::Kek {
                    version: kek.version,
                },
            )?;
            keks.insert(kek.version, (key, kek));
        }
        let current = keks
            .values()
            .filter(|(_, k)| k.superseded_ms.is_none())
            .map(|(_, k)| k.version)
            .max()
            .or_else(|| keks.keys().max().copied())
            .unwrap_or(0);
        Ok((
            Self {
                root,
                keks,
                current,
                rng,
            },
            new_check,
        ))
    }

    pub fn current_version(&self) -> Option<u32> {
        self.keks
            .contains_key(&self.current)
            .then_some(self.current)
    }

    pub fn kek(&self, version: u32) -> Option<&StoredKek> {
        self.keks.get(&version).map(|(_, s)| s)
    }

    pub fn keks(&self) -> impl Iterator<Item = &StoredKek> {
        self.keks.values().map(|(_, s)| s)
    }

    /// Makes a new current KEK. Returns the records to store (the new KEK
    /// and the superseded one with its end time).
    pub fn rotate(&mut self, now_ms: u64) -> Result<Vec<StoredKek>, KeyError> {
        let version = self.keks.keys().max().map_or(1, |v| v + 1);
        let key = SecretKey::random(&self.rng)?;
        let wrapped = self
            .root
            .0
            .wrap(0, &Purpose::Kek { version }, key.expose(), &self.rng)?;
        let stored = StoredKek {
            version,
            wrapped: meeting_proto::kms_api::Hex(wrapped),
            created_ms: now_ms,
            superseded_ms: None,
        };
        let mut changed = Vec::new();
        if let Some((_, old)) = self.keks.get_mut(&self.current) {
            old.superseded_ms = Some(now_ms);
            changed.push(old.clone());
        }
        self.keks.insert(version, (key, stored.clone()));
        self.current = version;
        changed.push(stored);
        Ok(changed)
    }

    /// Forgets KEKs superseded before `before_ms`. Keys still wrapped under
    /// them become unreadable: callers re-wrap what they need first.
    pub fn retire(&mut self, before_ms: u64) -> Vec<u32> {
        let gone: Vec<u32> = self
            .keks
            .values()
            .filter(|(_, k)| k.superseded_ms.is_some_and(|t| t < before_ms))
            .map(|(_, k)| k.version)
            .collect();
        for v in &gone {
            self.keks.remove(v);
        }
        gone
    }

    pub fn wrap(&self, purpose: &Purpose<'_>, key: &SecretKey) -> Result<Vec<u8>, KeyError> {
        let (kek, _) = self
            .keks
            .get(&self.current)
            .ok_or(KeyError::UnknownKek(self.current))?;
        kek.wrap(self.current, purpose, key.expose(), &self.rng)
    }

    pub fn unwrap(&self, purpose: &Purpose<'_>, wrapped: &[u8]) -> Result<SecretKey, KeyError> {
        let version = wrapped_version(wrapped)?;
        let (kek, _) = self
            .keks
            .get(&version)
            .ok_or(KeyError::UnknownKek(version))?;
        kek.unwrap(wrapped, purpose)
    }

    pub fn random_key(&self) -> Result<SecretKey, KeyError> {
        SecretKey::random(&self.rng)
    }

    pub fn random_bytes<const N: usize>(&self) -> Result<[u8; N], KeyError> {
        let mut out = [0u8; N];
        self.rng.fill(&mut out).map_err(|_| KeyError::Rng)?;
        Ok(out)
    }

    /// The signing key, wrapped by the root key (it outlives KEK versions).
    pub fn wrap_signing_key(&self, key: &SigningKey) -> Result<Vec<u8>, KeyError> {
        let bytes = Zeroizing::new(key.to_bytes());
        self.root
            .0
            .wrap(0, &Purpose::SigningKey, bytes.as_ref(), &self.rng)
    }

    pub fn unwrap_signing_key(&self, wrapped: &[u8]) -> Result<SigningKey, KeyError> {
        let secret = self.root.0.unwrap(wrapped, &Purpose::SigningKey)?;
        Ok(SigningKey::from_bytes(secret.expose()))
    }
}

/// The KMS's Ed25519 key as the server signs with it (every release signs
/// a roster and a relay ticket). aws-lc-rs signs in about half of
/// ed25519-dalek's time on the x86-64 machine measured
/// (`kms_ed25519_sign_us` in `make bench`); the key is stored, wrapped and
/// published as ed25519-dalek's [`SigningKey`], and verifiers use
/// ed25519-dalek.
pub struct Ed25519Signer {
    pair: aws_lc_rs::signature::Ed25519KeyPair,
    public: ed25519_dalek::VerifyingKey,
}

impl Ed25519Signer {
    pub fn new(key: &SigningKey) -> Result<Self, KeyError> {
        let seed = Zeroizing::new(key.to_bytes());
        let pair = aws_lc_rs::signature::Ed25519KeyPair::from_seed_unchecked(seed.as_ref())
            .map_err(|_| KeyError::BadSigningKey)?;
        Ok(Self {
            pair,
            public: key.verifying_key(),
        })
    }

    pub fn verifying_key(&self) -> ed25519_dalek::VerifyingKey {
        self.public
    }
}

impl ed25519_dalek::Signer<ed25519_dalek::Signature> for Ed25519Signer {
    fn try_sign(
        &self,
        message: &[u8],
    ) -> Result<ed25519_dalek::Signature, ed25519_dalek::SignatureError> {
        ed25519_dalek::Signature::from_slice(self.pair.sign(message).as_ref())
    }
}

/// Only the public half: the secret must never reach a log.
impl fmt::Debug for Ed25519Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ed25519Signer")
            .field("public", &hex::encode(self.public.as_bytes()))
            .finish_non_exhaustive()
    }
}

/// Seals `key` to an X25519 public key with HPKE (the suite in
/// [`meeting_proto::kms_api::SealedKey`]). Returns (enc, ciphertext).
///
/// Implemented here rather than with the `hpke` crate: sealing is on the
/// path of every key release, and its X25519 operations (one key pair, one
/// agreement) are most of its time. aws-lc-rs (s2n-bignum's assembly)
/// does them in about 60% of ring's time, and ring in less than
/// curve25519-dalek's (`kms_hpke_seal_us` in `make bench` compares with
/// the `hpke` crate); the key schedule and AEAD stay on ring.
/// Recipients open with the `hpke` crate (`meeting_proto::key_release`);
/// the tests below hold this to RFC 9180's vector and to that crate.
pub fn seal(
    recipient: &[u8; 32],
    info: &[u8],
    key: &SecretKey,
) -> Result<(Vec<u8>, Vec<u8>), KeyError> {
    use aws_lc_rs::agreement::{EphemeralPrivateKey, UnparsedPublicKey, X25519, agree_ephemeral};
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let ephemeral = EphemeralPrivateKey::generate(&X25519, &rng).map_err(|_| KeyError::Rng)?;
    let enc: [u8; 32] = ephemeral
        .compute_public_key()
        .map_err(|_| KeyError::Rng)?
        .as_ref()
        .try_into()
        .map_err(|_| KeyError::Rng)?;
    // aws-lc refuses an all-zero shared secret (a small-order recipient
    // key), as RFC 9180 requires.
    let dh = agree_ephemeral(
        ephemeral,
        UnparsedPublicKey::new(&X25519, recipient),
        KeyError::BadRecipient,
        |dh| {
            <[u8; 32]>::try_from(dh)
                .map(Zeroizing::new)
                .map_err(|_| KeyError::BadRecipient)
        },
    )?;
    let ct = hpke::seal_with_dh(&dh, &enc, recipient, info, &[], key.expose())?;
    Ok((enc.to_vec(), ct))
}

/// RFC 9180 base mode for DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
/// ChaCha20-Poly1305, single shot (sequence number 0), given the X25519
/// shared secret.
mod hpke {
    use super::KeyError;
    use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
    use ring::hmac::{HMAC_SHA256, Key, sign};
    use zeroize::Zeroizing;

    /// "KEM" || kem_id 0x0020.
    const KEM_SUITE: &[u8] = b"KEM\x00\x20";
    /// "HPKE" || kem_id 0x0020 || kdf_id 0x0001 || aead_id 0x0003.
    const HPKE_SUITE: &[u8] = b"HPKE\x00\x20\x00\x01\x00\x03";

    /// HKDF-Extract(salt, "HPKE-v1" || suite || label || ikm).
    fn labeled_extract(salt: &[u8], suite: &[u8], label: &[u8], ikm: &[u8]) -> Zeroizing<[u8; 32]> {
        let input = Zeroizing::new([b"HPKE-v1", suite, label, ikm].concat());
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(sign(&Key::new(HMAC_SHA256, salt), &input).as_ref());
        out
    }

    /// HKDF-Expand(prk, I2OSP(L, 2) || "HPKE-v1" || suite || label || info, L)
    /// for L <= 32: one HMAC block, T(1) = HMAC(prk, info' || 0x01).
    fn labeled_expand<const L: usize>(
        prk: &[u8; 32],
        suite: &[u8],
        label: &[u8],
        info: &[u8],
    ) -> Zeroizing<[u8; L]> {
        const { assert!(L <= 32) };
        let len = (L as u16).to_be_bytes();
        let input = [&len[..], b"HPKE-v1", suite, label, info, &[1]].concat();
        let mut out = Zeroizing::new([0u8; L]);
        out.copy_from_slice(&sign(&Key::new(HMAC_SHA256, prk), &input).as_ref()[..L]);
        out
    }

    pub(super) fn seal_with_dh(
        dh: &[u8; 32],
        enc: &[u8; 32],
        recipient: &[u8; 32],
        info: &[u8],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, KeyError> {
        // DHKEM ExtractAndExpand.
        let eae_prk = labeled_extract(b"", KEM_SUITE, b"eae_prk", dh);
        let kem_context = [&enc[..], &recipient[..]].concat();
        let shared_secret =
            labeled_expand::<32>(&eae_prk, KEM_SUITE, b"shared_secret", &kem_context);
        // KeySchedule, mode base (0x00), no PSK.
        let psk_id_hash = labeled_extract(b"", HPKE_SUITE, b"psk_id_hash", b"");
        let info_hash = labeled_extract(b"", HPKE_SUITE, b"info_hash", info);
        let context = [&[0u8][..], &psk_id_hash[..], &info_hash[..]].concat();
        let secret = labeled_extract(&shared_secret[..], HPKE_SUITE, b"secret", b"");
        let key = labeled_expand::<32>(&secret, HPKE_SUITE, b"key", &context);
        let nonce = labeled_expand::<12>(&secret, HPKE_SUITE, b"base_nonce", &context);
        let key = LessSafeKey::new(
            UnboundKey::new(&CHACHA20_POLY1305, &key[..]).map_err(|_| KeyError::Rng)?,
        );
        let mut out = plaintext.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(*nonce),
            Aad::from(aad),
            &mut out,
        )
        .map_err(|_| KeyError::Rng)?;
        Ok(out)
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use meeting_proto::kms_api::Hex;

        /// RFC 9180 appendix A.2.1 (this suite, base mode), sequence 0:
        /// the same key schedule and AEAD give the RFC's ciphertext.
        #[test]
        fn rfc9180_a2_base_vector() {
            let h = |s: &str| Hex::decode(s).unwrap();
            let sk_r: [u8; 32] =
                h("8057991eef8f1f1af18f4a9491d16a1ce333f695d4db8e38da75975c4478e0fb")
                    .try_into()
                    .unwrap();
            let pk_r: [u8; 32] =
                h("4310ee97d88cc1f088a5576c77ab0cf5c3ac797f3d95139c6c84b5429c59662a")
                    .try_into()
                    .unwrap();
            let enc: [u8; 32] =
                h("1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a")
                    .try_into()
                    .unwrap();
            let dh = x25519_dalek::StaticSecret::from(sk_r)
                .diffie_hellman(&x25519_dalek::PublicKey::from(enc))
                .to_bytes();
            let ct = seal_with_dh(
                &dh,
                &enc,
                &pk_r,
                &h("4f6465206f6e2061204772656369616e2055726e"),
                &h("436f756e742d30"),
                &h("4265617574792069732074727574682c20747275746820626561757479"),
            )
            .unwrap();
            assert_eq!(
                Hex::encode(&ct),
                "1c5250d8034ec2b784ba2cfd69dbdb8af406cfe3ff938e131f0def8c8b60b4db21993c62ce81883d2dd1b51a28"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> KeyRing {
        let root = RootKey::from_bytes(&[1; 32]).unwrap();
        let (mut ring, check) = KeyRing::open(root, None, vec![]).unwrap();
        assert!(check.is_some());
        ring.rotate(0).unwrap();
        ring
    }

    fn m(s: &str) -> MeetingId {
        MeetingId::new(s).unwrap()
    }

    #[test]
    fn sealed_keys_open_with_the_hpke_crate_and_only_for_their_context() {
        use meeting_proto::ids::ParticipantId;
        use meeting_proto::key_release::EphemeralKey;
        use meeting_proto::kms_api::{Hex, SealedKey, meeting_key_info};
        let ring = ring();
        let key = ring.random_key().unwrap();
        let me = EphemeralKey::generate();
        let (p, meeting) = (ParticipantId(3), m("m1"));
        let (enc, ct) = seal(&me.public_key(), &meeting_key_info(&meeting, 7, p), &key).unwrap();
        let sealed = SealedKey {
            meeting: meeting.clone(),
            epoch: 7,
            participant: p,
            enc: Hex(enc),
            ciphertext: Hex(ct),
        };
        let opened = me.open_meeting_key(&sealed, &meeting, p).unwrap();
        assert_eq!(opened.as_bytes(), key.expose());
        // Another epoch in the info (moved key) or another recipient fails.
        let moved = SealedKey {
            epoch: 8,
            ..sealed.clone()
        };
        assert!(me.open_meeting_key(&moved, &meeting, p).is_err());
        let other = EphemeralKey::generate();
        assert!(other.open_meeting_key(&sealed, &meeting, p).is_err());
        // Every seal uses a fresh ephemeral key.
        let (enc2, _) = seal(&me.public_key(), b"i", &key).unwrap();
        assert_ne!(enc2, sealed.enc.0);
        // A small-order recipient key (all-zero shared secret) is refused.
        assert_eq!(seal(&[0; 32], b"i", &key), Err(KeyError::BadRecipient));
    }

    #[test]
    fn wrap_unwrap_round_trip_across_kek_rotation() {
        let mut ring = ring();
        let key = ring.random_key().unwrap();
        let meeting = m("m1");
        let purpose = Purpose::MeetingKey {
            meeting: &meeting,
            epoch: 3,
        };
        let wrapped = ring.wrap(&purpose, &key).unwrap();
        assert_eq!(wrapped.len(), WRAPPED_LEN);
        ring.rotate(10).unwrap();
        assert_eq!(ring.current_version(), Some(2));
        // Old versions stay readable until retired.
        assert_eq!(
            ring.unwrap(&purpose, &wrapped).unwrap().expose(),
            key.expose()
        );
        let rewrapped = ring.wrap(&purpose, &key).unwrap();
        assert_eq!(wrapped_version(&rewrapped).unwrap(), 2);
        assert_eq!(ring.retire(11), vec![1]);
        assert_eq!(
            ring.unwrap(&purpose, &wrapped).unwrap_err(),
            KeyError::UnknownKek(1)
        );
        assert!(ring.unwrap(&purpose, &rewrapped).is_ok());
    }

    #[test]
    fn changing_any_aad_field_fails_to_unwrap() {
        let ring = ring();
        let key = ring.random_key().unwrap();
        let (m1, m2) = (m("m1"), m("m2"));
        let wrapped = ring
            .wrap(
                &Purpose::MeetingKey {
                    meeting: &m1,
                    epoch: 1,
                },
                &key,
            )
            .unwrap();
        for other in [
            Purpose::MeetingKey {
                meeting: &m2,
                epoch: 1,
            },
            Purpose::MeetingKey {
                meeting: &m1,
                epoch: 2,
            },
            Purpose::RecordingKey {
                meeting: &m1,
                recording: "r",
            },
            Purpose::SigningKey,
        ] {
            assert_eq!(ring.unwrap(&other, &wrapped).unwrap_err(), KeyError::Unwrap);
        }
        // The KEK version is bound too: relabelling the version byte fails
        // even when that version exists.
        let mut ring2 = ring;
        ring2.rotate(5).unwrap();
        let mut relabelled = wrapped.clone();
        relabelled[3] = 2;
        assert_eq!(
            ring2
                .unwrap(
                    &Purpose::MeetingKey {
                        meeting: &m1,
                        epoch: 1
                    },
                    &relabelled
                )
                .unwrap_err(),
            KeyError::Unwrap
        );
        // Every flipped bit is refused.
        for i in 4 * 8..wrapped.len() * 8 {
            let mut t = wrapped.clone();
            t[i / 8] ^= 1 << (i % 8);
            assert!(
                ring2
                    .unwrap(
                        &Purpose::MeetingKey {
                            meeting: &m1,
                            epoch: 1
                        },
                        &t
                    )
                    .is_err()
            );
        }
        assert_eq!(
            ring2
                .unwrap(
                    &Purpose::MeetingKey {
                        meeting: &m1,
                        epoch: 1
                    },
                    &wrapped[..10]
                )
                .unwrap_err(),
            KeyError::Malformed
        );
    }

    /// Property: for random purposes, wrap then unwrap returns the key, and
    /// any change of meeting, epoch or recording id makes unwrap fail.
    #[test]
    fn random_purposes_round_trip_and_any_other_purpose_fails() {
        let ring = ring();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..300 {
            let a = m(&format!("m{}", next() % 1000));
            let b = m(&format!("m{}", 1000 + next() % 1000));
            let epoch = next();
            let other_epoch = epoch ^ (1 << (next() % 64));
            let rec = format!("{:x}", next());
            let key = ring.random_key().unwrap();
            let p = Purpose::MeetingKey { meeting: &a, epoch };
            let w = ring.wrap(&p, &key).unwrap();
            assert_eq!(ring.unwrap(&p, &w).unwrap().expose(), key.expose());
            assert!(
                ring.unwrap(&Purpose::MeetingKey { meeting: &b, epoch }, &w)
                    .is_err()
            );
            assert!(
                ring.unwrap(
                    &Purpose::MeetingKey {
                        meeting: &a,
                        epoch: other_epoch
                    },
                    &w
                )
                .is_err()
            );
            let r = Purpose::RecordingKey {
                meeting: &a,
                recording: &rec,
            };
            let w = ring.wrap(&r, &key).unwrap();
            assert_eq!(ring.unwrap(&r, &w).unwrap().expose(), key.expose());
            let rec2 = format!("{rec}0");
            assert!(
                ring.unwrap(
                    &Purpose::RecordingKey {
                        meeting: &a,
                        recording: &rec2
                    },
                    &w
                )
                .is_err()
            );
            assert!(
                ring.unwrap(
                    &Purpose::RecordingKey {
                        meeting: &b,
                        recording: &rec
                    },
                    &w
                )
                .is_err()
            );
        }
    }

    #[test]
    fn wrong_root_key_fails_closed() {
        let (mut ring, check) =
            KeyRing::open(RootKey::from_bytes(&[1; 32]).unwrap(), None, vec![]).unwrap();
        let stored = ring.rotate(0).unwrap();
        let check = check.unwrap();
        assert!(
            KeyRing::open(
                RootKey::from_bytes(&[1; 32]).unwrap(),
                Some(&check),
                stored.clone()
            )
            .is_ok()
        );
        assert_eq!(
            KeyRing::open(RootKey::from_bytes(&[2; 32]).unwrap(), Some(&check), stored)
                .unwrap_err(),
            KeyError::Unwrap
        );
    }

    #[test]
    fn root_key_file_formats_and_generation() {
        let dir = std::env::temp_dir().join(format!("kms-root-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("root.key");
        assert!(matches!(
            RootKey::load(&path, false),
            Err(KeyError::RootMissing(_))
        ));
        RootKey::load(&path, true).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), 64);
        RootKey::load(&path, false).unwrap();
        std::fs::write(&path, b"short").unwrap();
        assert_eq!(
            RootKey::load(&path, false).unwrap_err(),
            KeyError::RootMalformed
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn signing_key_round_trips_and_nothing_secret_in_debug() {
        let ring = ring();
        let sk = SigningKey::from_bytes(&[9; 32]);
        let wrapped = ring.wrap_signing_key(&sk).unwrap();
        assert_eq!(
            ring.unwrap_signing_key(&wrapped).unwrap().to_bytes(),
            [9; 32]
        );
        let key = SecretKey::from_bytes(&[0xab; 32]).unwrap();
        assert!(!format!("{key:?}{ring:?}").contains("171"));
        assert!(!format!("{key:?}").to_lowercase().contains("abab"));
    }

    #[test]
    fn the_servers_signer_signs_as_ed25519_dalek_does() {
        use ed25519_dalek::{Signer, Verifier};
        let dalek = SigningKey::from_bytes(&[0xcd; 32]);
        let signer = Ed25519Signer::new(&dalek).unwrap();
        assert_eq!(signer.verifying_key(), dalek.verifying_key());
        for message in [&b""[..], b"roster", &[7u8; 5000]] {
            // Ed25519 is deterministic: the same key signs the same bytes.
            let signature = signer.sign(message);
            assert_eq!(signature, dalek.sign(message));
            dalek.verifying_key().verify(message, &signature).unwrap();
        }
        let shown = format!("{signer:?}").to_lowercase();
        assert!(!shown.contains("cdcd"), "{shown}");
        assert!(shown.contains(&hex::encode(dalek.verifying_key().as_bytes())));
    }
}
