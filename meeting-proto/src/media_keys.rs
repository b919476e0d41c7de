//! Per-sender media keys derived from an epoch's meeting key.
//!
//! The KMS releases one secret per meeting epoch. Every member derives from it,
//! for each sender index, that sender's SFrame base key:
//!
//! ```text
//! prk      = HKDF-Extract(salt = "conclave media v1", ikm = meeting key)
//! base key = HKDF-Expand(prk, "sender base key" | u8 len | meeting id | u64 epoch | u16 sender, 32)
//! ```
//!
//! and the SFrame KID of that key is `epoch << 16 | sender`, so a receiver
//! finds the key from the frame alone and a sender can only ever produce
//! frames under its own index. Only built with the `keys` feature: the relay
//! does not enable it and so cannot derive any of this.

use crate::ids::MeetingId;
use ring::hkdf;
use zeroize::Zeroizing;

/// Length of the epoch meeting key the KMS releases.
pub const MEETING_KEY_LEN: usize = 32;
/// Length of a derived SFrame base key.
pub const BASE_KEY_LEN: usize = 32;
/// Epochs must fit the 48 bits the KID leaves them.
pub const MAX_EPOCH: u64 = (1 << 48) - 1;

const EXTRACT_SALT: &[u8] = b"conclave media v1";
const BASE_KEY_LABEL: &[u8] = b"sender base key";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("epoch {0} does not fit in 48 bits")]
    EpochTooLarge(u64),
    #[error("meeting key must be {MEETING_KEY_LEN} bytes, got {0}")]
    BadKeyLength(usize),
}

/// The meeting key of one epoch, as released by the KMS. Zeroized on drop.
#[derive(Clone)]
pub struct EpochKey {
    meeting: MeetingId,
    epoch: u64,
    secret: Zeroizing<[u8; MEETING_KEY_LEN]>,
}

impl std::fmt::Debug for EpochKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpochKey")
            .field("meeting", &self.meeting)
            .field("epoch", &self.epoch)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl EpochKey {
    /// Takes the released key bytes; the caller's copy should be zeroized.
    pub fn new(meeting: MeetingId, epoch: u64, secret: &[u8]) -> Result<Self, KeyError> {
        if epoch > MAX_EPOCH {
            return Err(KeyError::EpochTooLarge(epoch));
        }
        let bytes: [u8; MEETING_KEY_LEN] = secret
            .try_into()
            .map_err(|_| KeyError::BadKeyLength(secret.len()))?;
        Ok(Self {
            meeting,
            epoch,
            secret: Zeroizing::new(bytes),
        })
    }

    pub fn meeting(&self) -> &MeetingId {
        &self.meeting
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The SFrame base key of `sender` in this epoch.
    pub fn sender_base_key(&self, sender: u16) -> SenderBaseKey {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, EXTRACT_SALT).extract(&self.secret[..]);
        let meeting = self.meeting.as_str().as_bytes();
        let len = [meeting.len() as u8];
        let epoch = self.epoch.to_be_bytes();
        let sender_bytes = sender.to_be_bytes();
        let info: [&[u8]; 5] = [BASE_KEY_LABEL, &len, meeting, &epoch, &sender_bytes];
        let mut out = Zeroizing::new([0u8; BASE_KEY_LEN]);
        prk.expand(&info, BaseKeyLen)
            .and_then(|okm| okm.fill(&mut out[..]))
            .expect("HKDF-SHA256 can always expand 32 bytes");
        SenderBaseKey {
            kid: kid(self.epoch, sender),
            key: out,
        }
    }
}

struct BaseKeyLen;
impl hkdf::KeyType for BaseKeyLen {
    fn len(&self) -> usize {
        BASE_KEY_LEN
    }
}

/// One sender's SFrame base key for one epoch, with its KID.
pub struct SenderBaseKey {
    kid: u64,
    key: Zeroizing<[u8; BASE_KEY_LEN]>,
}

impl std::fmt::Debug for SenderBaseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (epoch, sender) = split_kid(self.kid);
        f.debug_struct("SenderBaseKey")
            .field("epoch", &epoch)
            .field("sender", &sender)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl SenderBaseKey {
    pub fn kid(&self) -> u64 {
        self.kid
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.key[..]
    }
}

/// The SFrame KID of `sender`'s key in `epoch` (epoch must be <= [`MAX_EPOCH`]).
pub fn kid(epoch: u64, sender: u16) -> u64 {
    (epoch << 16) | sender as u64
}

/// Splits a KID into (epoch, sender).
pub fn split_kid(kid: u64) -> (u64, u16) {
    (kid >> 16, kid as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(epoch: u64, byte: u8) -> EpochKey {
        EpochKey::new(MeetingId::new("m1").unwrap(), epoch, &[byte; 32]).unwrap()
    }

    #[test]
    fn kid_round_trips_and_separates_epochs_and_senders() {
        assert_eq!(split_kid(kid(MAX_EPOCH, u16::MAX)), (MAX_EPOCH, u16::MAX));
        assert_eq!(split_kid(kid(3, 7)), (3, 7));
        assert_ne!(kid(1, 0), kid(0, 1));
    }

    #[test]
    fn base_keys_differ_by_sender_epoch_meeting_and_secret() {
        let a = key(1, 9).sender_base_key(1);
        let same = key(1, 9).sender_base_key(1);
        assert_eq!(a.as_bytes(), same.as_bytes());
        let others = [
            key(1, 9).sender_base_key(2),
            key(2, 9).sender_base_key(1),
            key(1, 8).sender_base_key(1),
            EpochKey::new(MeetingId::new("m2").unwrap(), 1, &[9; 32])
                .unwrap()
                .sender_base_key(1),
        ];
        for o in &others {
            assert_ne!(a.as_bytes(), o.as_bytes());
        }
        assert_eq!(a.kid(), kid(1, 1));
    }

    #[test]
    fn bad_inputs_and_debug_redaction() {
        let m = MeetingId::new("m1").unwrap();
        assert_eq!(
            EpochKey::new(m.clone(), MAX_EPOCH + 1, &[0; 32]).unwrap_err(),
            KeyError::EpochTooLarge(MAX_EPOCH + 1)
        );
        assert_eq!(
            EpochKey::new(m, 1, &[0; 16]).unwrap_err(),
            KeyError::BadKeyLength(16)
        );
        let k = key(1, 0xab);
        let dbg = format!("{k:?} {:?}", k.sender_base_key(1));
        assert!(dbg.contains("redacted"));
        assert!(!dbg.contains("171"), "secret byte leaked into Debug: {dbg}");
    }
}
