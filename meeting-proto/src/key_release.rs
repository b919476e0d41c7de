//! Opening the keys the KMS sealed to one participant (HPKE, RFC 9180).
//!
//! Only builds with the `keys` feature: clients and connectors open keys, the
//! relay never can. The KMS side (sealing) lives in kms-node.
//!
//! Suite: base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305.
//! `info` binds each sealed key to (meeting, epoch, participant) or
//! (meeting, recording) — see [`crate::kms_api::meeting_key_info`] — so a
//! sealed key replayed into another context does not open.

use crate::ids::{MeetingId, ParticipantId};
use crate::kms_api::{Hex, SealedDataKey, SealedKey, meeting_key_info, recording_key_info};
use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem, OpModeR, Serializable};
use std::fmt;
use zeroize::Zeroizing;

type KemPrivateKey = <X25519HkdfSha256 as Kem>::PrivateKey;
type KemEncapped = <X25519HkdfSha256 as Kem>::EncappedKey;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    #[error("sealed key is for meeting/participant {got}, expected {expected}")]
    WrongRecipient { got: String, expected: String },
    #[error("sealed key encapsulation is malformed")]
    BadEncapsulation,
    #[error("sealed key does not open with this key (tampered or not ours)")]
    OpenFailed,
    #[error("opened key has the wrong length")]
    BadLength,
}

/// A participant's ephemeral X25519 key pair: a fresh one per join, so old
/// sealed keys cannot be opened with a key stolen later.
pub struct EphemeralKey {
    secret: KemPrivateKey,
    public: [u8; 32],
}

impl fmt::Debug for EphemeralKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EphemeralKey")
            .field("public", &Hex::encode(&self.public))
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl EphemeralKey {
    pub fn generate() -> Self {
        let (secret, public) = X25519HkdfSha256::gen_keypair(&mut rand_core::OsRng);
        Self::from_parts(secret, public)
    }

    /// Rebuilds a key pair from its 32 secret bytes (e.g. a connector that
    /// keeps its key across a restart in a Secret).
    pub fn from_secret_bytes(bytes: &[u8; 32]) -> Result<Self, OpenError> {
        let secret = KemPrivateKey::from_bytes(bytes).map_err(|_| OpenError::BadEncapsulation)?;
        let public = X25519HkdfSha256::sk_to_pk(&secret);
        Ok(Self::from_parts(secret, public))
    }

    fn from_parts(secret: KemPrivateKey, public: <X25519HkdfSha256 as Kem>::PublicKey) -> Self {
        let mut pk = [0u8; 32];
        pk.copy_from_slice(&public.to_bytes());
        Self { secret, public: pk }
    }

    /// The public half, sent to the KMS in `JoinRequest::public_key`.
    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }

    /// Opens a meeting key sealed to this key, checking it is for `meeting`
    /// and `participant` (the KMS cannot make us use another meeting's key).
    pub fn open_meeting_key(
        &self,
        sealed: &SealedKey,
        meeting: &MeetingId,
        participant: ParticipantId,
    ) -> Result<MeetingKey, OpenError> {
        if &sealed.meeting != meeting || sealed.participant != participant {
            return Err(OpenError::WrongRecipient {
                got: format!("{}/{}", sealed.meeting, sealed.participant),
                expected: format!("{meeting}/{participant}"),
            });
        }
        let info = meeting_key_info(&sealed.meeting, sealed.epoch, sealed.participant);
        let key = self.open(&sealed.enc, &sealed.ciphertext, &info)?;
        Ok(MeetingKey {
            meeting: sealed.meeting.clone(),
            epoch: sealed.epoch,
            key,
        })
    }

    /// Opens a recording data key sealed to this key.
    pub fn open_data_key(&self, sealed: &SealedDataKey) -> Result<DataKey, OpenError> {
        let info = recording_key_info(&sealed.meeting, &sealed.recording);
        let key = self.open(&sealed.enc, &sealed.ciphertext, &info)?;
        Ok(DataKey {
            recording: sealed.recording.clone(),
            key,
        })
    }

    fn open(
        &self,
        enc: &Hex,
        ciphertext: &Hex,
        info: &[u8],
    ) -> Result<Zeroizing<[u8; 32]>, OpenError> {
        let encapped = KemEncapped::from_bytes(&enc.0).map_err(|_| OpenError::BadEncapsulation)?;
        let plain = Zeroizing::new(
            hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256>(
                &OpModeR::Base,
                &self.secret,
                &encapped,
                info,
                &ciphertext.0,
                &[],
            )
            .map_err(|_| OpenError::OpenFailed)?,
        );
        let mut key = Zeroizing::new([0u8; 32]);
        if plain.len() != 32 {
            return Err(OpenError::BadLength);
        }
        key.copy_from_slice(&plain);
        Ok(key)
    }
}

/// One epoch's meeting key. Zeroized on drop; Debug never shows it.
pub struct MeetingKey {
    pub meeting: MeetingId,
    pub epoch: u64,
    key: Zeroizing<[u8; 32]>,
}

impl MeetingKey {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.key
    }
}

impl fmt::Debug for MeetingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeetingKey")
            .field("meeting", &self.meeting)
            .field("epoch", &self.epoch)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// A recording's data key. Zeroized on drop; Debug never shows it.
pub struct DataKey {
    pub recording: String,
    key: Zeroizing<[u8; 32]>,
}

impl DataKey {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.key
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKey")
            .field("recording", &self.recording)
            .field("key", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hpke::OpModeS;

    fn seal_to(public: &[u8; 32], info: &[u8], key: &[u8; 32]) -> (Hex, Hex) {
        let pk = <X25519HkdfSha256 as Kem>::PublicKey::from_bytes(public).unwrap();
        let (enc, ct) =
            hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256, _>(
                &OpModeS::Base,
                &pk,
                info,
                key,
                &[],
                &mut rand_core::OsRng,
            )
            .unwrap();
        (Hex(enc.to_bytes().to_vec()), Hex(ct))
    }

    fn sealed(me: &EphemeralKey, epoch: u64) -> SealedKey {
        let meeting = MeetingId::new("m1").unwrap();
        let (enc, ciphertext) = seal_to(
            &me.public_key(),
            &meeting_key_info(&meeting, epoch, ParticipantId(4)),
            &[7; 32],
        );
        SealedKey {
            meeting,
            epoch,
            participant: ParticipantId(4),
            enc,
            ciphertext,
        }
    }

    #[test]
    fn opens_what_was_sealed_to_it() {
        let me = EphemeralKey::generate();
        let key = me
            .open_meeting_key(
                &sealed(&me, 2),
                &MeetingId::new("m1").unwrap(),
                ParticipantId(4),
            )
            .unwrap();
        assert_eq!(key.as_bytes(), &[7; 32]);
        assert_eq!(key.epoch, 2);
        assert!(!format!("{key:?}").contains("7, 7"));
    }

    #[test]
    fn refuses_other_recipients_contexts_and_tampering() {
        let me = EphemeralKey::generate();
        let m1 = MeetingId::new("m1").unwrap();
        let s = sealed(&me, 2);
        // Another participant's key pair cannot open it.
        assert_eq!(
            EphemeralKey::generate()
                .open_meeting_key(&s, &m1, ParticipantId(4))
                .unwrap_err(),
            OpenError::OpenFailed
        );
        // Relabelled epoch: info no longer matches.
        let mut relabelled = s.clone();
        relabelled.epoch = 3;
        assert_eq!(
            me.open_meeting_key(&relabelled, &m1, ParticipantId(4))
                .unwrap_err(),
            OpenError::OpenFailed
        );
        // Addressed to someone else.
        assert!(matches!(
            me.open_meeting_key(&s, &m1, ParticipantId(5)),
            Err(OpenError::WrongRecipient { .. })
        ));
        let mut flipped = s.clone();
        flipped.ciphertext.0[0] ^= 1;
        assert_eq!(
            me.open_meeting_key(&flipped, &m1, ParticipantId(4))
                .unwrap_err(),
            OpenError::OpenFailed
        );
        let mut short = s;
        short.enc.0.truncate(10);
        assert_eq!(
            me.open_meeting_key(&short, &m1, ParticipantId(4))
                .unwrap_err(),
            OpenError::BadEncapsulation
        );
    }

    /// RFC 9180 appendix A.2.1 (base mode, X25519/HKDF-SHA256/ChaCha20-Poly1305),
    /// sequence number 0: the suite we use opens the RFC's ciphertext.
    #[test]
    fn rfc9180_a2_base_vector_opens() {
        let h = |s: &str| Hex::decode(s).unwrap();
        let sk = h("8057991eef8f1f1af18f4a9491d16a1ce333f695d4db8e38da75975c4478e0fb");
        let me = EphemeralKey::from_secret_bytes(&sk.try_into().unwrap()).unwrap();
        assert_eq!(
            Hex::encode(&me.public_key()),
            "4310ee97d88cc1f088a5576c77ab0cf5c3ac797f3d95139c6c84b5429c59662a"
        );
        let enc = KemEncapped::from_bytes(&h(
            "1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a",
        ))
        .unwrap();
        let pt = hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256>(
            &OpModeR::Base,
            &me.secret,
            &enc,
            &h("4f6465206f6e2061204772656369616e2055726e"),
            &h("1c5250d8034ec2b784ba2cfd69dbdb8af406cfe3ff938e131f0def8c8b60b4db21993c62ce81883d2dd1b51a28"),
            &h("436f756e742d30"),
        )
        .unwrap();
        assert_eq!(
            pt,
            h("4265617574792069732074727574682c20747275746820626561757479")
        );
    }

    #[test]
    fn secret_bytes_rebuild_the_same_key_pair() {
        let bytes = [9u8; 32];
        let a = EphemeralKey::from_secret_bytes(&bytes).unwrap();
        let b = EphemeralKey::from_secret_bytes(&bytes).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        assert!(!format!("{a:?}").contains("0909"));
    }
}
