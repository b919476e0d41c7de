//! Development credentials for running without a KMS: a local ticket signer
//! standing in for the KMS's, and meeting keys given on the command line.
//! Never used when joining through a KMS.

use std::time::{SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use meeting_proto::ids::{MeetingId, ParticipantId};
use meeting_proto::ticket::{Ticket, TicketError};

/// Signs relay tickets with a dev key (the relay must be configured with its
/// public key as `ticketPublicKey`).
#[derive(Clone)]
pub struct DevIssuer {
    key: SigningKey,
    relay_id: String,
}

impl std::fmt::Debug for DevIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevIssuer")
            .field("relay_id", &self.relay_id)
            .field("key", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("{0}: expected {1} hex characters")]
    Hex(&'static str, usize),
}

/// Decodes exactly `N` bytes of hex.
pub fn hex_array<const N: usize>(what: &'static str, s: &str) -> Result<[u8; N], DevError> {
    let s = s.trim();
    if s.len() != 2 * N {
        return Err(DevError::Hex(what, 2 * N));
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b =
            u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| DevError::Hex(what, 2 * N))?;
    }
    Ok(out)
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl DevIssuer {
    pub fn new(seed: [u8; 32], relay_id: impl Into<String>) -> Self {
        Self {
            key: SigningKey::from_bytes(&seed),
            relay_id: relay_id.into(),
        }
    }

    /// Hex of the public key to put in the relay's `ticketPublicKey`.
    pub fn public_key_hex(&self) -> String {
        meeting_proto::config::relay::encode_ticket_key(&self.key.verifying_key())
    }

    /// A ticket for participant `sender` (participant id = sender index).
    pub fn ticket(
        &self,
        meeting: &MeetingId,
        sender: u16,
        ttl_secs: u64,
    ) -> Result<Vec<u8>, TicketError> {
        self.ticket_until(meeting, sender, unix_now() + ttl_secs)
    }

    pub fn ticket_until(
        &self,
        meeting: &MeetingId,
        sender: u16,
        not_after: u64,
    ) -> Result<Vec<u8>, TicketError> {
        Ticket {
            meeting: meeting.clone(),
            participant: ParticipantId(sender as u64),
            sender_index: sender,
            relay: self.relay_id.clone(),
            not_after,
        }
        .sign(&self.key)
    }
}
