//! One participant's media session with one relay, sans-IO.
//!
//! Feed it received datagrams ([`Session::handle_datagram`]) and time
//! ([`Session::handle_timeout`]); drain [`Session::poll_transmit`] (datagrams
//! for the relay) and [`Session::poll_event`] after each call. It joins with
//! HELLO (resent until WELCOME), keeps the binding alive, protects outgoing
//! media with this participant's SFrame key, opens others' media, and makes
//! chat reliable with NACK + retransmission.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use meeting_proto::ids::MeetingId;
use meeting_proto::media_crypto::{self, Opened, ProtectError, Receiver, Sender};
use meeting_proto::media_keys::EpochKey;
use meeting_proto::wire::{
    MAX_NACK_SEQS, MoveReason, Packet, RejectReason, ReplayWindow, RoutingHeader, StreamKind, flags,
};

/// HELLO is resent this often until WELCOME arrives.
pub const HELLO_RETRY: Duration = Duration::from_millis(250);
/// Chat messages kept for retransmission.
pub const CHAT_HISTORY: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Joined {
        slot: u32,
    },
    Rejected(RejectReason),
    /// Audio, video or screen frame fragment from another participant.
    Media(Opened),
    Chat {
        sender: u16,
        seq: u32,
        text: String,
    },
    /// The relay drains: re-join through the KMS within `forward_for`.
    Move {
        reason: MoveReason,
        forward_for: Duration,
    },
    KeyframeRequested {
        by: u16,
        kind: StreamKind,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Joining,
    Joined { slot: u32 },
    Left,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("not joined yet")]
    NotJoined,
    #[error(transparent)]
    Protect(#[from] ProtectError),
}

/// Counters a caller reports.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct SessionStats {
    pub sent: BTreeMap<String, u64>,
    pub opened: BTreeMap<String, u64>,
    /// Frames that failed to open, by reason (authentication, unknown_epoch, ...).
    pub open_failures: BTreeMap<String, u64>,
    pub chat_retransmits: u64,
    pub nacks_sent: u64,
}

#[derive(Debug, Default)]
struct ChatRx {
    highest: Option<u32>,
    window: ReplayWindow,
}

pub struct Session {
    meeting: MeetingId,
    sender_index: u16,
    ticket: Vec<u8>,
    nonce: u64,
    state: State,
    tx: Sender,
    rx: Receiver,
    seq: [u32; 4],
    next_hello: Instant,
    next_keepalive: Instant,
    keepalive: Duration,
    chat_history: VecDeque<(u32, u32, Vec<u8>)>,
    chat_rx: HashMap<u16, ChatRx>,
    out: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
    stats: SessionStats,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("meeting", &self.meeting)
            .field("sender", &self.sender_index)
            .field("state", &self.state)
            .field("epoch", &self.tx.epoch())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Starts joining: the first HELLO is ready in [`Session::poll_transmit`].
    pub fn new(
        meeting: MeetingId,
        sender_index: u16,
        ticket: Vec<u8>,
        key: EpochKey,
        nonce: u64,
        now: Instant,
    ) -> Self {
        let mut rx = Receiver::new(meeting.clone(), media_crypto::DEFAULT_GRACE);
        let tx = Sender::new(&key, sender_index);
        rx.set_epoch(key, now);
        let mut s = Self {
            meeting,
            sender_index,
            ticket,
            nonce,
            state: State::Joining,
            tx,
            rx,
            seq: [0; 4],
            next_hello: now,
            next_keepalive: now,
            keepalive: Duration::from_secs(5),
            chat_history: VecDeque::new(),
            chat_rx: HashMap::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            stats: SessionStats::default(),
        };
        s.handle_timeout(now);
        s
    }

    pub fn sender_index(&self) -> u16 {
        self.sender_index
    }

    pub fn is_joined(&self) -> bool {
        matches!(self.state, State::Joined { .. })
    }

    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    pub fn epoch(&self) -> u64 {
        self.tx.epoch()
    }

    /// Installs a newer epoch key (from the KMS): sending switches at once,
    /// receiving keeps the previous epoch for the grace window.
    pub fn set_epoch(&mut self, key: EpochKey, now: Instant) {
        if key.meeting() != &self.meeting || key.epoch() <= self.tx.epoch() {
            return;
        }
        self.tx.rekey(&key);
        self.rx.set_epoch(key, now);
    }

    /// Re-joins (e.g. the same relay after a restart, or a new one with a new
    /// ticket after MOVE): the caller points its socket at the new relay.
    pub fn rejoin(&mut self, ticket: Vec<u8>, nonce: u64, now: Instant) {
        self.ticket = ticket;
        self.nonce = nonce;
        self.state = State::Joining;
        self.next_hello = now;
        self.handle_timeout(now);
    }

    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Session::handle_timeout`] next needs calling.
    pub fn poll_timeout(&self) -> Instant {
        match self.state {
            State::Joining => self.next_hello,
            State::Joined { .. } => self.next_keepalive,
            State::Left => self.next_keepalive + Duration::from_secs(3600),
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Joining if now >= self.next_hello => {
                let hello = Packet::Hello {
                    nonce: self.nonce,
                    ticket: &self.ticket,
                };
                if let Ok(d) = hello.to_vec() {
                    self.out.push_back(d);
                }
                self.next_hello = now + HELLO_RETRY;
            }
            State::Joined { slot } if now >= self.next_keepalive => {
                let ka = Packet::KeepAlive {
                    slot,
                    sender: self.sender_index,
                    echo: 0,
                };
                self.out.push_back(ka.to_vec().expect("keep-alive encodes"));
                self.next_keepalive = now + self.keepalive;
            }
            _ => {}
        }
    }

    /// Sends one media datagram (an SFrame per datagram; callers fragment
    /// frames larger than [`meeting_proto::wire::MAX_MEDIA_PAYLOAD`] minus overhead).
    pub fn send_media(
        &mut self,
        kind: StreamKind,
        frame_flags: u8,
        timestamp: u32,
        payload: &[u8],
    ) -> Result<u32, SendError> {
        let State::Joined { slot } = self.state else {
            return Err(SendError::NotJoined);
        };
        let i = kind as usize - 1;
        let seq = self.seq[i];
        self.seq[i] = seq.wrapping_add(1);
        self.protect_and_queue(slot, kind, frame_flags, seq, timestamp, payload)?;
        Ok(seq)
    }

    fn protect_and_queue(
        &mut self,
        slot: u32,
        kind: StreamKind,
        frame_flags: u8,
        seq: u32,
        timestamp: u32,
        payload: &[u8],
    ) -> Result<(), SendError> {
        let header = RoutingHeader {
            slot,
            sender: self.sender_index,
            kind,
            flags: frame_flags,
            seq,
            timestamp,
        };
        let mut d = Vec::with_capacity(payload.len() + 64);
        self.tx.protect(&header, payload, &mut d)?;
        self.out.push_back(d);
        *self.stats.sent.entry(kind.as_str().into()).or_default() += 1;
        Ok(())
    }

    /// Sends a chat message, kept for retransmission on NACK.
    pub fn send_chat(&mut self, text: &str, timestamp_ms: u32) -> Result<u32, SendError> {
        let seq = self.send_media(
            StreamKind::Chat,
            flags::FRAME_START | flags::FRAME_END,
            timestamp_ms,
            text.as_bytes(),
        )?;
        if self.chat_history.len() == CHAT_HISTORY {
            self.chat_history.pop_front();
        }
        self.chat_history
            .push_back((seq, timestamp_ms, text.as_bytes().to_vec()));
        Ok(seq)
    }

    /// Says BYE; the session sends nothing after this.
    pub fn leave(&mut self) {
        if let State::Joined { slot } = self.state {
            let bye = Packet::Bye {
                slot,
                sender: self.sender_index,
            };
            self.out.push_back(bye.to_vec().expect("bye encodes"));
        }
        self.state = State::Left;
    }

    pub fn handle_datagram(&mut self, data: &[u8], now: Instant) {
        let Ok(packet) = Packet::parse(data) else {
            *self
                .stats
                .open_failures
                .entry("malformed".into())
                .or_default() += 1;
            return;
        };
        match packet {
            Packet::Welcome {
                nonce,
                slot,
                keepalive_secs,
                ..
            } if nonce == self.nonce && self.state == State::Joining => {
                self.state = State::Joined { slot };
                self.keepalive = Duration::from_secs(keepalive_secs.max(1) as u64);
                self.next_keepalive = now + self.keepalive;
                self.events.push_back(Event::Joined { slot });
            }
            Packet::Reject { nonce, reason } if nonce == self.nonce => {
                self.events.push_back(Event::Rejected(reason));
            }
            Packet::Move {
                reason,
                forward_for_ms,
            } => self.events.push_back(Event::Move {
                reason,
                forward_for: Duration::from_millis(forward_for_ms as u64),
            }),
            Packet::KeyframeRequest {
                sender,
                target,
                kind,
                ..
            } if target == self.sender_index => {
                self.events
                    .push_back(Event::KeyframeRequested { by: sender, kind });
            }
            Packet::Nack {
                target,
                kind: StreamKind::Chat,
                seqs,
                ..
            } if target == self.sender_index => self.retransmit(&seqs),
            Packet::Media { .. } => self.open(data, now),
            _ => {}
        }
    }

    fn retransmit(&mut self, seqs: &[u32]) {
        let State::Joined { slot } = self.state else {
            return;
        };
        let found: Vec<(u32, u32, Vec<u8>)> = self
            .chat_history
            .iter()
            .filter(|(s, _, _)| seqs.contains(s))
            .cloned()
            .collect();
        for (seq, ts, text) in found {
            let f = flags::FRAME_START | flags::FRAME_END | flags::RETRANSMIT;
            if self
                .protect_and_queue(slot, StreamKind::Chat, f, seq, ts, &text)
                .is_ok()
            {
                self.stats.chat_retransmits += 1;
            }
        }
    }

    fn open(&mut self, data: &[u8], now: Instant) {
        let opened = match self.rx.open(data, now) {
            Ok(o) => o,
            Err(e) => {
                *self
                    .stats
                    .open_failures
                    .entry(e.label().into())
                    .or_default() += 1;
                return;
            }
        };
        let h = opened.header;
        *self.stats.opened.entry(h.kind.as_str().into()).or_default() += 1;
        if h.kind != StreamKind::Chat {
            self.events.push_back(Event::Media(opened));
            return;
        }
        let rx = self.chat_rx.entry(h.sender).or_default();
        if rx.window.accept(h.seq as u64).is_err() {
            return; // a retransmission of something already delivered
        }
        let gap: Vec<u32> = match rx.highest {
            Some(hi) if h.seq > hi.wrapping_add(1) => (hi + 1..h.seq).take(MAX_NACK_SEQS).collect(),
            None if h.seq > 0 => (0..h.seq).take(MAX_NACK_SEQS).collect(),
            _ => Vec::new(),
        };
        rx.highest = Some(rx.highest.map_or(h.seq, |hi| hi.max(h.seq)));
        let gap: Vec<u32> = gap
            .into_iter()
            .filter(|s| rx.window.check(*s as u64).is_ok())
            .collect();
        if let (false, State::Joined { slot }) = (gap.is_empty(), self.state) {
            let nack = Packet::Nack {
                slot,
                sender: self.sender_index,
                target: h.sender,
                kind: StreamKind::Chat,
                seqs: gap,
            };
            if let Ok(d) = nack.to_vec() {
                self.out.push_back(d);
                self.stats.nacks_sent += 1;
            }
        }
        self.events.push_back(Event::Chat {
            sender: h.sender,
            seq: h.seq,
            text: String::from_utf8_lossy(&opened.payload).into_owned(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(epoch: u64) -> EpochKey {
        EpochKey::new(MeetingId::new("m").unwrap(), epoch, &[epoch as u8; 32]).unwrap()
    }

    fn joined(sender: u16, now: Instant) -> Session {
        joined_with(sender, key(1), now)
    }

    fn joined_with(sender: u16, key: EpochKey, now: Instant) -> Session {
        let mut s = Session::new(
            MeetingId::new("m").unwrap(),
            sender,
            b"ticket".to_vec(),
            key,
            sender as u64,
            now,
        );
        let hello = s.poll_transmit().unwrap();
        assert!(matches!(
            Packet::parse(&hello).unwrap(),
            Packet::Hello { .. }
        ));
        let welcome = Packet::Welcome {
            nonce: sender as u64,
            slot: 9,
            sender,
            keepalive_secs: 5,
        };
        s.handle_datagram(&welcome.to_vec().unwrap(), now);
        assert_eq!(s.poll_event(), Some(Event::Joined { slot: 9 }));
        s
    }

    /// Moves every queued datagram from `a` to `b` except MEDIA whose
    /// sequence is in `lose`, as a relay with loss would.
    fn deliver(a: &mut Session, b: &mut Session, lose: &[u32], now: Instant) {
        while let Some(d) = a.poll_transmit() {
            if let Ok(Packet::Media { header, .. }) = Packet::parse(&d)
                && lose.contains(&header.seq)
                && header.flags & flags::RETRANSMIT == 0
            {
                continue;
            }
            b.handle_datagram(&d, now);
        }
    }

    #[test]
    fn hello_is_retried_until_welcome_then_keepalives_follow() {
        let t = Instant::now();
        let mut s = Session::new(MeetingId::new("m").unwrap(), 1, vec![1], key(1), 5, t);
        assert!(s.poll_transmit().is_some());
        assert_eq!(s.poll_timeout(), t + HELLO_RETRY);
        s.handle_timeout(t + HELLO_RETRY);
        assert!(s.poll_transmit().is_some(), "HELLO resent");
        assert!(matches!(
            s.send_media(StreamKind::Audio, 0, 0, b"x"),
            Err(SendError::NotJoined)
        ));
        // A WELCOME for another nonce is ignored.
        let w = Packet::Welcome {
            nonce: 6,
            slot: 1,
            sender: 1,
            keepalive_secs: 5,
        };
        s.handle_datagram(&w.to_vec().unwrap(), t);
        assert!(!s.is_joined());
        let s2 = joined(2, t);
        assert_eq!(s2.poll_timeout(), t + Duration::from_secs(5));
    }

    #[test]
    fn chat_gaps_are_nacked_and_retransmitted_exactly_once() {
        let t = Instant::now();
        let mut a = joined(1, t);
        let mut b = joined(2, t);
        for i in 0..5 {
            a.send_chat(&format!("msg {i}"), i).unwrap();
        }
        deliver(&mut a, &mut b, &[1, 2], t);
        let mut got: Vec<u32> = Vec::new();
        while let Some(e) = b.poll_event() {
            if let Event::Chat { seq, .. } = e {
                got.push(seq);
            }
        }
        assert_eq!(got, vec![0, 3, 4]);
        assert_eq!(b.stats().nacks_sent, 1);
        deliver(&mut b, &mut a, &[], t); // NACK reaches the sender
        assert_eq!(a.stats().chat_retransmits, 2);
        deliver(&mut a, &mut b, &[], t);
        let mut texts = Vec::new();
        while let Some(e) = b.poll_event() {
            if let Event::Chat { text, .. } = e {
                texts.push(text);
            }
        }
        assert_eq!(texts, vec!["msg 1", "msg 2"]);
    }

    #[test]
    fn media_opens_across_an_epoch_change_and_failures_are_counted() {
        let t = Instant::now();
        let mut a = joined(1, t);
        let mut b = joined(2, t);
        a.send_media(StreamKind::Audio, 0, 960, b"opus").unwrap();
        a.set_epoch(key(2), t);
        a.send_media(StreamKind::Audio, 0, 1920, b"opus2").unwrap();
        let first = a.poll_transmit().unwrap();
        let second = a.poll_transmit().unwrap();
        b.handle_datagram(&first, t);
        b.handle_datagram(&second, t);
        assert!(matches!(b.poll_event(), Some(Event::Media(o)) if o.payload == b"opus"));
        assert_eq!(b.poll_event(), None);
        assert_eq!(b.stats().open_failures.get("unknown_epoch"), Some(&1));
        b.set_epoch(key(2), t);
        a.send_media(StreamKind::Audio, 0, 2880, b"opus3").unwrap();
        let third = a.poll_transmit().unwrap();
        b.handle_datagram(&third, t);
        assert!(matches!(b.poll_event(), Some(Event::Media(o)) if o.epoch == 2));
        a.send_media(StreamKind::Audio, 0, 3840, b"opus4").unwrap();
        let mut fourth = a.poll_transmit().unwrap();
        fourth[14] ^= 1; // a relay alters the routing header's timestamp
        b.handle_datagram(&fourth, t);
        assert_eq!(b.poll_event(), None);
        assert_eq!(b.stats().open_failures.get("authentication"), Some(&1));
    }

    #[test]
    fn a_newcomer_cannot_open_what_was_sent_before_it_joined() {
        let t = Instant::now();
        let mut a = joined(1, t);
        a.send_media(StreamKind::Audio, 0, 960, b"before").unwrap();
        let captured = a.poll_transmit().unwrap();
        // The KMS starts epoch 2 for the newcomer, who gets only that key.
        a.set_epoch(key(2), t);
        let mut c = joined_with(3, key(2), t);
        c.handle_datagram(&captured, t);
        assert_eq!(c.poll_event(), None);
        assert_eq!(c.stats().open_failures.get("unknown_epoch"), Some(&1));
        // Its key bytes presented as epoch 1's do not authenticate it either.
        let mut claims_old = joined_with(
            4,
            EpochKey::new(MeetingId::new("m").unwrap(), 1, &[2; 32]).unwrap(),
            t,
        );
        claims_old.handle_datagram(&captured, t);
        assert_eq!(claims_old.poll_event(), None);
        assert_eq!(
            claims_old.stats().open_failures.get("authentication"),
            Some(&1)
        );
        // What a member sends from the newcomer's epoch on opens for it.
        a.send_media(StreamKind::Audio, 0, 1920, b"after").unwrap();
        let after = a.poll_transmit().unwrap();
        c.handle_datagram(&after, t);
        assert!(
            matches!(c.poll_event(), Some(Event::Media(o)) if o.payload == b"after" && o.epoch == 2)
        );
    }
}
