//! SFrame (RFC 9605) protection of MEDIA datagrams, sans-IO.
//!
//! Cipher suite AES_128_GCM_SHA256_128 (0x0004), implemented in
//! [`crate::sframe`] on ring (checked against the RFC's test vectors in
//! `tests/rfc9605_vectors.rs`). Each datagram is its own SFrame; the routing
//! header (the first [`ROUTING_HEADER_LEN`] bytes) is the SFrame metadata, so
//! it is authenticated but stays readable for the relay:
//!
//! ```text
//! | routing header (AAD metadata) | SFrame header | ciphertext | tag |
//! ```
//!
//! A [`Sender`] protects with its own per-epoch key; a [`Receiver`] holds the
//! current epoch and, for a grace window, the previous one, derives each
//! sender's key once (on its first authentic frame) and refuses replays per
//! key. Time is an input.

use crate::ids::MeetingId;
use crate::media_keys::{EpochKey, kid, split_kid};
use crate::sframe::{self, CipherSuite, Key, SframeError};
use crate::wire::{
    MAX_DATAGRAM, Packet, ROUTING_HEADER_LEN, ReplayWindow, RoutingHeader, WireError,
};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The suite every Conclave client uses.
pub const CIPHER_SUITE: CipherSuite = CipherSuite::AesGcm128Sha256;
/// Bytes SFrame adds to a payload at most: header (1 + 8 + 8) and 16-byte tag.
pub const MAX_OVERHEAD: usize = sframe::MAX_HEADER_LEN + sframe::TAG_LEN;
/// Default time a receiver still accepts the previous epoch after a new one.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ProtectError {
    #[error("routing header names sender {got}, this context sends as {want}")]
    WrongSender { got: u16, want: u16 },
    #[error("protected datagram would be {0} bytes, over the {MAX_DATAGRAM}-byte limit")]
    TooLarge(usize),
    #[error("SFrame encryption failed: {0}")]
    Sframe(#[from] SframeError),
}

/// Why a received MEDIA datagram was not opened. Receivers count these.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum OpenError {
    #[error("not a valid MEDIA datagram: {0}")]
    Malformed(String),
    #[error("SFrame key id names sender {kid_sender}, routing header names {header_sender}")]
    SenderMismatch { kid_sender: u16, header_sender: u16 },
    #[error("no key for epoch {0} (not current, or its grace window is over)")]
    UnknownEpoch(u64),
    #[error("replayed or too old frame")]
    Replay,
    #[error("frame failed authentication")]
    Authentication,
}

impl OpenError {
    /// Short label for counters.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::SenderMismatch { .. } => "sender_mismatch",
            Self::UnknownEpoch(_) => "unknown_epoch",
            Self::Replay => "replay",
            Self::Authentication => "authentication",
        }
    }
}

/// `sender`'s SFrame key in `epoch_key`'s epoch.
fn sender_key(epoch_key: &EpochKey, sender: u16) -> Key {
    let base = epoch_key.sender_base_key(sender);
    Key::derive(CIPHER_SUITE, base.kid(), base.as_bytes())
        .expect("AES-128-GCM key derivation from a 32-byte base key cannot fail")
}

/// Protects one participant's outgoing media.
pub struct Sender {
    sender: u16,
    epoch: u64,
    key: Key,
    /// Next SFrame counter; a fresh key starts at 0, so (key, counter) never repeats.
    counter: u64,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("sender", &self.sender)
            .field("epoch", &self.epoch)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Sender {
    /// `sender` is the index from this participant's ticket.
    pub fn new(epoch_key: &EpochKey, sender: u16) -> Self {
        Self {
            sender,
            epoch: epoch_key.epoch(),
            key: sender_key(epoch_key, sender),
            counter: 0,
        }
    }

    /// Switches to a new epoch's key (a fresh key, so the counter restarts).
    pub fn rekey(&mut self, epoch_key: &EpochKey) {
        *self = Self::new(epoch_key, self.sender);
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn sender(&self) -> u16 {
        self.sender
    }

    /// Writes the whole MEDIA datagram (routing header + SFrame) into `out`,
    /// replacing its contents.
    pub fn protect(
        &mut self,
        header: &RoutingHeader,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), ProtectError> {
        if header.sender != self.sender {
            return Err(ProtectError::WrongSender {
                got: header.sender,
                want: self.sender,
            });
        }
        let len = ROUTING_HEADER_LEN + payload.len() + MAX_OVERHEAD;
        if len > MAX_DATAGRAM {
            return Err(ProtectError::TooLarge(len));
        }
        let ctr = self.counter;
        self.counter = ctr.checked_add(1).ok_or(SframeError::CounterExhausted)?;
        let meta = header.encode();
        out.clear();
        out.reserve(len);
        out.extend_from_slice(&meta);
        self.key.seal_append(ctr, &meta, payload, out)?;
        Ok(())
    }
}

/// An opened MEDIA datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub header: RoutingHeader,
    pub epoch: u64,
    pub payload: Vec<u8>,
}

/// A MEDIA datagram opened in place ([`Receiver::open_in_place`]).
#[derive(Debug, PartialEq, Eq)]
pub struct OpenedRef<'a> {
    pub header: RoutingHeader,
    pub epoch: u64,
    pub payload: &'a [u8],
}

/// A sender whose frames have authenticated in an epoch.
struct Peer {
    key: Key,
    window: ReplayWindow,
}

struct EpochState {
    key: EpochKey,
    /// Only senders with at least one authentic frame, so forged key ids
    /// cannot grow this.
    peers: PeerMap,
    /// When a superseded epoch stops being accepted.
    expires: Option<Instant>,
}

impl EpochState {
    fn new(key: EpochKey) -> Self {
        Self {
            key,
            peers: PeerMap::default(),
            expires: None,
        }
    }
}

/// Opens other participants' media.
pub struct Receiver {
    meeting: MeetingId,
    grace: Duration,
    current: Option<EpochState>,
    previous: Option<EpochState>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("meeting", &self.meeting)
            .field(
                "current_epoch",
                &self.current.as_ref().map(|e| e.key.epoch()),
            )
            .field(
                "previous_epoch",
                &self.previous.as_ref().map(|e| e.key.epoch()),
            )
            .finish_non_exhaustive()
    }
}

impl Receiver {
    pub fn new(meeting: MeetingId, grace: Duration) -> Self {
        Self {
            meeting,
            grace,
            current: None,
            previous: None,
        }
    }

    pub fn current_epoch(&self) -> Option<u64> {
        self.current.as_ref().map(|e| e.key.epoch())
    }

    /// Installs a newer epoch's key; the one it replaces is accepted until
    /// `now + grace`. Keys for an older or equal epoch, or another meeting,
    /// are ignored (returns false).
    pub fn set_epoch(&mut self, key: EpochKey, now: Instant) -> bool {
        if key.meeting() != &self.meeting {
            return false;
        }
        if let Some(cur) = &self.current
            && key.epoch() <= cur.key.epoch()
        {
            return false;
        }
        self.previous = self.current.take().map(|mut old| {
            old.expires = Some(now + self.grace);
            old
        });
        self.current = Some(EpochState::new(key));
        true
    }

    /// Verifies and decrypts one MEDIA datagram.
    pub fn open(&mut self, datagram: &[u8], now: Instant) -> Result<Opened, OpenError> {
        let (header, sf, hlen) = parse_media(datagram)?;
        let (prefix, body) = datagram.split_at(ROUTING_HEADER_LEN + hlen);
        let (routing, sframe_header) = prefix.split_at(ROUTING_HEADER_LEN);
        let mut payload = body.to_vec();
        let (epoch, n) = self.decrypt(&header, sf, sframe_header, routing, &mut payload, now)?;
        payload.truncate(n);
        Ok(Opened {
            header,
            epoch,
            payload,
        })
    }

    /// [`Receiver::open`] without a copy: decrypts inside the received
    /// datagram (which is garbage afterwards if opening fails) and returns
    /// the plaintext as a slice of it.
    pub fn open_in_place<'a>(
        &mut self,
        datagram: &'a mut [u8],
        now: Instant,
    ) -> Result<OpenedRef<'a>, OpenError> {
        let (header, sf, hlen) = parse_media(datagram)?;
        let (prefix, body) = datagram.split_at_mut(ROUTING_HEADER_LEN + hlen);
        let (routing, sframe_header) = prefix.split_at(ROUTING_HEADER_LEN);
        let (epoch, n) = self.decrypt(&header, sf, sframe_header, routing, body, now)?;
        Ok(OpenedRef {
            header,
            epoch,
            payload: &body[..n],
        })
    }

    /// Checks key id, epoch and replay window, then opens `body` (SFrame
    /// ciphertext and tag) in place. Returns the epoch and plaintext length.
    fn decrypt(
        &mut self,
        header: &RoutingHeader,
        sf: sframe::Header,
        sframe_header: &[u8],
        routing: &[u8],
        body: &mut [u8],
        now: Instant,
    ) -> Result<(u64, usize), OpenError> {
        let (epoch, kid_sender) = split_kid(sf.kid);
        if kid_sender != header.sender {
            return Err(OpenError::SenderMismatch {
                kid_sender,
                header_sender: header.sender,
            });
        }
        if let Some(prev) = &self.previous
            && prev.expires.is_some_and(|t| now >= t)
        {
            self.previous = None;
        }
        let state = match (&mut self.current, &mut self.previous) {
            (Some(cur), _) if cur.key.epoch() == epoch => cur,
            (_, Some(prev)) if prev.key.epoch() == epoch => prev,
            _ => return Err(OpenError::UnknownEpoch(epoch)),
        };
        let open = |key: &Key, body: &mut [u8]| {
            key.open_in_place(sf.ctr, sframe_header, routing, body)
                .map_err(|_| OpenError::Authentication)
        };
        let n = match state.peers.get_mut(&kid_sender) {
            Some(peer) => {
                peer.window.check(sf.ctr).map_err(|_| OpenError::Replay)?;
                let n = open(&peer.key, body)?;
                peer.window.accept(sf.ctr).map_err(|_| OpenError::Replay)?;
                n
            }
            None => {
                let key = sender_key(&state.key, kid_sender);
                debug_assert_eq!(key.kid(), kid(epoch, kid_sender));
                let n = open(&key, body)?;
                let mut window = ReplayWindow::default();
                window.accept(sf.ctr).map_err(|_| OpenError::Replay)?;
                state.peers.insert(kid_sender, Peer { key, window });
                n
            }
        };
        Ok((epoch, n))
    }
}

/// The routing header, SFrame header and SFrame header length of a MEDIA
/// datagram.
fn parse_media(datagram: &[u8]) -> Result<(RoutingHeader, sframe::Header, usize), OpenError> {
    let malformed = |e: WireError| OpenError::Malformed(e.to_string());
    let Some((header, frame)) = Packet::parse_media(datagram).map_err(malformed)? else {
        // Another packet type: report why it is malformed, if it is.
        Packet::parse(datagram).map_err(malformed)?;
        return Err(OpenError::Malformed("not a MEDIA packet".into()));
    };
    let (sf, hlen) =
        sframe::Header::decode(frame).map_err(|e| OpenError::Malformed(e.to_string()))?;
    if frame.len() - hlen < sframe::TAG_LEN {
        return Err(OpenError::Malformed("SFrame shorter than its tag".into()));
    }
    Ok((header, sf, hlen))
}

/// Sender indexes are small integers the relay assigns; hashing them with
/// SipHash costs more than the lookup. A multiplicative hash spreads them.
#[derive(Default)]
struct SenderHasher(u64);

impl std::hash::Hasher for SenderHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u16(&mut self, v: u16) {
        self.0 = u64::from(v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type PeerMap = HashMap<u16, Peer, std::hash::BuildHasherDefault<SenderHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{StreamKind, flags};

    fn meeting() -> MeetingId {
        MeetingId::new("weekly").unwrap()
    }

    fn epoch_key(epoch: u64, byte: u8) -> EpochKey {
        EpochKey::new(meeting(), epoch, &[byte; 32]).unwrap()
    }

    fn header(sender: u16, seq: u32) -> RoutingHeader {
        RoutingHeader {
            slot: 1,
            sender,
            kind: StreamKind::Audio,
            flags: flags::FRAME_START | flags::FRAME_END,
            seq,
            timestamp: seq * 960,
        }
    }

    fn protect(s: &mut Sender, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        s.protect(&header(s.sender(), seq), payload, &mut out)
            .unwrap();
        out
    }

    #[test]
    fn round_trip_and_payload_is_not_in_clear() {
        let now = Instant::now();
        let mut tx = Sender::new(&epoch_key(1, 7), 3);
        let mut rx = Receiver::new(meeting(), DEFAULT_GRACE);
        rx.set_epoch(epoch_key(1, 7), now);
        let secret = b"an opus frame with content";
        let dgram = protect(&mut tx, 1, secret);
        assert!(!dgram.windows(secret.len()).any(|w| w == secret));
        assert_eq!(&dgram[..ROUTING_HEADER_LEN], &header(3, 1).encode());
        let got = rx.open(&dgram, now).unwrap();
        assert_eq!(got.payload, secret);
        assert_eq!(got.header, header(3, 1));
        assert_eq!(got.epoch, 1);
        assert_eq!(rx.open(&dgram, now), Err(OpenError::Replay));
    }

    #[test]
    fn open_in_place_matches_open_and_refuses_replays_and_tampering() {
        let now = Instant::now();
        let mut tx = Sender::new(&epoch_key(1, 7), 3);
        let mut rx = Receiver::new(meeting(), DEFAULT_GRACE);
        rx.set_epoch(epoch_key(1, 7), now);
        let dgram = protect(&mut tx, 1, b"in place");
        let mut buf = dgram.clone();
        let got = rx.open_in_place(&mut buf, now).unwrap();
        assert_eq!(
            (got.header, got.epoch, got.payload),
            (header(3, 1), 1, &b"in place"[..])
        );
        let mut again = dgram.clone();
        assert_eq!(rx.open_in_place(&mut again, now), Err(OpenError::Replay));
        let mut bad = protect(&mut tx, 2, b"in place");
        *bad.last_mut().unwrap() ^= 0x80;
        assert_eq!(
            rx.open_in_place(&mut bad, now),
            Err(OpenError::Authentication)
        );
        // The forged frame did not advance the window: the real one still opens.
        let good = protect(&mut tx, 3, b"in place");
        assert!(rx.open(&good, now).is_ok());
    }

    #[test]
    fn every_flipped_bit_is_rejected() {
        let now = Instant::now();
        let mut tx = Sender::new(&epoch_key(1, 7), 3);
        let dgram = protect(&mut tx, 1, b"payload");
        for i in 0..dgram.len() * 8 {
            let mut rx = Receiver::new(meeting(), DEFAULT_GRACE);
            rx.set_epoch(epoch_key(1, 7), now);
            let mut bad = dgram.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(rx.open(&bad, now).is_err(), "bit {i} flipped and it opened");
        }
    }

    #[test]
    fn a_sender_cannot_claim_another_index() {
        let mut tx = Sender::new(&epoch_key(1, 7), 3);
        let mut out = Vec::new();
        assert!(matches!(
            tx.protect(&header(4, 1), b"x", &mut out),
            Err(ProtectError::WrongSender { got: 4, want: 3 })
        ));
        // A relay rewriting the routing header's sender is caught even before AEAD.
        let now = Instant::now();
        let mut rx = Receiver::new(meeting(), DEFAULT_GRACE);
        rx.set_epoch(epoch_key(1, 7), now);
        let mut dgram = protect(&mut tx, 1, b"x");
        dgram[7] = 4;
        assert_eq!(
            rx.open(&dgram, now),
            Err(OpenError::SenderMismatch {
                kid_sender: 3,
                header_sender: 4
            })
        );
    }

    #[test]
    fn previous_epoch_is_accepted_only_within_grace_and_leavers_are_locked_out() {
        let t0 = Instant::now();
        let mut old_tx = Sender::new(&epoch_key(1, 7), 3);
        let mut new_tx = Sender::new(&epoch_key(2, 8), 3);
        let mut rx = Receiver::new(meeting(), Duration::from_secs(5));
        rx.set_epoch(epoch_key(1, 7), t0);
        assert!(rx.set_epoch(epoch_key(2, 8), t0));
        assert!(
            !rx.set_epoch(epoch_key(1, 7), t0),
            "older epoch must not replace"
        );
        assert!(
            rx.open(
                &protect(&mut old_tx, 1, b"late"),
                t0 + Duration::from_secs(4)
            )
            .is_ok()
        );
        assert_eq!(
            rx.open(
                &protect(&mut old_tx, 2, b"later"),
                t0 + Duration::from_secs(5)
            ),
            Err(OpenError::UnknownEpoch(1))
        );
        assert!(rx.open(&protect(&mut new_tx, 3, b"new"), t0).is_ok());

        // A leaver who only has epoch 1 cannot open epoch-2 traffic.
        let mut leaver = Receiver::new(meeting(), DEFAULT_GRACE);
        leaver.set_epoch(epoch_key(1, 7), t0);
        assert_eq!(
            leaver.open(&protect(&mut new_tx, 4, b"after"), t0),
            Err(OpenError::UnknownEpoch(2))
        );
        // Even claiming the epoch with a guessed key fails authentication.
        let mut forger = Receiver::new(meeting(), DEFAULT_GRACE);
        forger.set_epoch(epoch_key(2, 9), t0);
        assert_eq!(
            forger.open(&protect(&mut new_tx, 5, b"after"), t0),
            Err(OpenError::Authentication)
        );
    }

    #[test]
    fn oversized_payloads_and_garbage_are_refused() {
        let mut tx = Sender::new(&epoch_key(1, 7), 3);
        let mut out = Vec::new();
        assert!(matches!(
            tx.protect(&header(3, 1), &[0; MAX_DATAGRAM], &mut out),
            Err(ProtectError::TooLarge(_))
        ));
        let mut rx = Receiver::new(meeting(), DEFAULT_GRACE);
        rx.set_epoch(epoch_key(1, 7), Instant::now());
        assert!(matches!(
            rx.open(&[1, 4, 0], Instant::now()),
            Err(OpenError::Malformed(_))
        ));
        let mut dgram = header(3, 1).encode().to_vec();
        dgram.push(0xff);
        assert!(matches!(
            rx.open(&dgram, Instant::now()),
            Err(OpenError::Malformed(_))
        ));
    }
}
