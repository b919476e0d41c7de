//! Relay tickets: the KMS's signed permission for one participant to send and
//! receive one meeting's media through one relay, until a deadline.
//!
//! A relay holds only the KMS's ticket-verification public key. It never asks
//! the KMS anything while forwarding media: the ticket carries all it needs.
//!
//! Encoding (all integers big-endian), then a 64-byte Ed25519 signature over
//! `DOMAIN || body`:
//!
//! ```text
//! u8 version (1) | u8 len | meeting id | u64 participant | u16 sender index
//! | u8 len | relay id | u64 not-after (unix seconds)
//! ```

use crate::ids::{IdError, MeetingId, ParticipantId};
use ed25519_dalek::{Signature, Signer, Verifier, VerifyingKey};

const VERSION: u8 = 1;
const DOMAIN: &[u8] = b"conclave relay ticket v1\0";
const SIGNATURE_LEN: usize = 64;
/// Longest relay identity accepted (bytes).
pub const MAX_RELAY_ID_LEN: usize = 128;
/// Longest encoded ticket: fits comfortably in one HELLO datagram.
pub const MAX_TICKET_LEN: usize =
    1 + 1 + crate::ids::MAX_MEETING_ID_LEN + 8 + 2 + 1 + MAX_RELAY_ID_LEN + 8 + SIGNATURE_LEN;

/// What a ticket grants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ticket {
    pub meeting: MeetingId,
    pub participant: ParticipantId,
    /// The index this participant uses as SFrame sender and in routing headers.
    pub sender_index: u16,
    /// The relay this ticket is valid on (its identity, e.g. `zone/relay-0`).
    pub relay: String,
    /// Unix time (seconds) after which the ticket is refused.
    pub not_after: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TicketError {
    #[error("ticket is truncated")]
    Truncated,
    #[error("ticket has trailing bytes")]
    TrailingBytes,
    #[error("ticket version {0} is not supported (this build understands version {VERSION})")]
    UnsupportedVersion(u8),
    #[error("ticket meeting id is invalid: {0}")]
    BadMeeting(#[from] IdError),
    #[error("ticket relay id is invalid")]
    BadRelay,
    #[error("ticket signature does not verify")]
    BadSignature,
    #[error("ticket expired")]
    Expired,
    #[error("ticket is for another relay")]
    WrongRelay,
}

impl Ticket {
    fn encode_body(&self) -> Result<Vec<u8>, TicketError> {
        if self.relay.is_empty() || self.relay.len() > MAX_RELAY_ID_LEN {
            return Err(TicketError::BadRelay);
        }
        let meeting = self.meeting.as_str().as_bytes();
        let mut out = Vec::with_capacity(MAX_TICKET_LEN);
        out.push(VERSION);
        out.push(meeting.len() as u8);
        out.extend_from_slice(meeting);
        out.extend_from_slice(&self.participant.0.to_be_bytes());
        out.extend_from_slice(&self.sender_index.to_be_bytes());
        out.push(self.relay.len() as u8);
        out.extend_from_slice(self.relay.as_bytes());
        out.extend_from_slice(&self.not_after.to_be_bytes());
        Ok(out)
    }

    /// Signs the ticket with the KMS's ticket-signing key (any Ed25519
    /// signer).
    pub fn sign(&self, key: &impl Signer<Signature>) -> Result<Vec<u8>, TicketError> {
        let mut body = self.encode_body()?;
        let signature = key.sign(&signed_message(&body));
        body.extend_from_slice(&signature.to_bytes());
        Ok(body)
    }

    /// Parses and verifies a ticket for `relay` at unix time `now`.
    ///
    /// The signature is checked before any field is trusted; expiry and relay
    /// binding after, so each failure has its own reason for the drop counters.
    pub fn verify(
        bytes: &[u8],
        key: &VerifyingKey,
        relay: &str,
        now: u64,
    ) -> Result<Ticket, TicketError> {
        if bytes.len() < SIGNATURE_LEN {
            return Err(TicketError::Truncated);
        }
        let (body, signature) = bytes.split_at(bytes.len() - SIGNATURE_LEN);
        let ticket = Self::parse_body(body)?;
        let signature = Signature::from_slice(signature).map_err(|_| TicketError::BadSignature)?;
        key.verify(&signed_message(body), &signature)
            .map_err(|_| TicketError::BadSignature)?;
        if now > ticket.not_after {
            return Err(TicketError::Expired);
        }
        if ticket.relay != relay {
            return Err(TicketError::WrongRelay);
        }
        Ok(ticket)
    }

    fn parse_body(body: &[u8]) -> Result<Ticket, TicketError> {
        let mut r = Reader(body);
        let version = r.u8()?;
        if version != VERSION {
            return Err(TicketError::UnsupportedVersion(version));
        }
        let meeting_len = r.u8()? as usize;
        let meeting = std::str::from_utf8(r.take(meeting_len)?)
            .map_err(|_| TicketError::BadMeeting(IdError::BadCharacter))?;
        let meeting = MeetingId::new(meeting)?;
        let participant = ParticipantId(u64::from_be_bytes(r.array()?));
        let sender_index = u16::from_be_bytes(r.array()?);
        let relay_len = r.u8()? as usize;
        let relay = std::str::from_utf8(r.take(relay_len)?)
            .map_err(|_| TicketError::BadRelay)?
            .to_owned();
        let not_after = u64::from_be_bytes(r.array()?);
        if !r.0.is_empty() {
            return Err(TicketError::TrailingBytes);
        }
        Ok(Ticket {
            meeting,
            participant,
            sender_index,
            relay,
            not_after,
        })
    }
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    [DOMAIN, body].concat()
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TicketError> {
        if self.0.len() < n {
            return Err(TicketError::Truncated);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, TicketError> {
        Ok(self.take(1)?[0])
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], TicketError> {
        Ok(self.take(N)?.try_into().expect("length checked by take"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    fn key() -> SigningKey {
        SigningKey::generate(&mut rand_core::OsRng)
    }

    fn ticket() -> Ticket {
        Ticket {
            meeting: MeetingId::new("m1").unwrap(),
            participant: ParticipantId(7),
            sender_index: 3,
            relay: "zone-a/relay-0".into(),
            not_after: 1_000,
        }
    }

    #[test]
    fn round_trip() {
        let key = key();
        let bytes = ticket().sign(&key).unwrap();
        assert!(bytes.len() <= MAX_TICKET_LEN);
        let got = Ticket::verify(&bytes, &key.verifying_key(), "zone-a/relay-0", 999).unwrap();
        assert_eq!(got, ticket());
    }

    #[test]
    fn refuses_expired_wrong_relay_and_foreign_key() {
        let key = key();
        let bytes = ticket().sign(&key).unwrap();
        let vk = key.verifying_key();
        assert_eq!(
            Ticket::verify(&bytes, &vk, "zone-a/relay-0", 1_001),
            Err(TicketError::Expired)
        );
        assert_eq!(
            Ticket::verify(&bytes, &vk, "zone-a/relay-1", 0),
            Err(TicketError::WrongRelay)
        );
        assert_eq!(
            Ticket::verify(&bytes, &self::key().verifying_key(), "zone-a/relay-0", 0),
            Err(TicketError::BadSignature)
        );
    }

    #[test]
    fn any_flipped_bit_is_refused() {
        let key = key();
        let bytes = ticket().sign(&key).unwrap();
        for i in 0..bytes.len() * 8 {
            let mut tampered = bytes.clone();
            tampered[i / 8] ^= 1 << (i % 8);
            assert!(
                Ticket::verify(&tampered, &key.verifying_key(), "zone-a/relay-0", 0).is_err(),
                "bit {i} flipped and the ticket still verified"
            );
        }
    }

    #[test]
    fn every_truncation_is_refused() {
        let key = key();
        let bytes = ticket().sign(&key).unwrap();
        for len in 0..bytes.len() {
            assert!(
                Ticket::verify(&bytes[..len], &key.verifying_key(), "zone-a/relay-0", 0).is_err()
            );
        }
    }
}
