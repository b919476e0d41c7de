//! The relay's routing table, sans-IO: datagrams and time in, decisions out.
//!
//! A HELLO whose ticket verifies binds its source address to
//! (meeting, participant, sender index). After that, MEDIA from that address
//! is fanned out to the other members of the same meeting if its routing
//! header names the bound meeting slot and sender index; anything else is
//! dropped and counted by reason. The relay never parses past the routing
//! header: the SFrame payload is opaque bytes to it.
//!
//! Contract: call [`Relay::handle`] for each datagram and act on the returned
//! [`Action`] before the next call (it borrows the relay's scratch list of
//! destinations); call [`Relay::expire`] about once a second.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use ed25519_dalek::VerifyingKey;
use meeting_proto::config::relay::{MEETING_STATE_BYTES, PARTICIPANT_STATE_BYTES, RelayLimits};
use meeting_proto::ids::{MeetingId, ParticipantId};
use meeting_proto::ticket::{Ticket, TicketError};
use meeting_proto::wire::{MoveReason, Packet, RejectReason};

use crate::metrics::{Kind, RelayMetrics};

/// Seconds without any datagram after which a binding is forgotten.
pub const IDLE_SECS: u64 = 30;
/// Keep-alive interval the relay asks clients for (WELCOME).
pub const KEEPALIVE_SECS: u16 = 5;

/// Why a datagram was dropped (the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum DropReason {
    /// Not a datagram this protocol version understands.
    Malformed,
    /// From an address no valid HELLO bound.
    Unbound,
    /// HELLO whose ticket does not verify (signature, encoding) or names another relay.
    BadTicket,
    /// HELLO with an expired ticket, or traffic from a binding whose ticket expired.
    ExpiredTicket,
    /// Routing header names a meeting slot other than the sender's.
    OtherMeeting,
    /// Routing header names a sender index other than the bound one.
    SpoofedSender,
    /// Meeting, relay or memory limit reached.
    OverLimit,
    /// HELLO while draining.
    Draining,
    /// A packet type only relays send (WELCOME, REJECT, MOVE).
    Unexpected,
    /// KEYFRAME/NACK for a member that is not in the meeting.
    UnknownTarget,
}

impl DropReason {
    pub const ALL: [DropReason; 10] = [
        Self::Malformed,
        Self::Unbound,
        Self::BadTicket,
        Self::ExpiredTicket,
        Self::OtherMeeting,
        Self::SpoofedSender,
        Self::OverLimit,
        Self::Draining,
        Self::Unexpected,
        Self::UnknownTarget,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Unbound => "unbound",
            Self::BadTicket => "bad_ticket",
            Self::ExpiredTicket => "expired_ticket",
            Self::OtherMeeting => "other_meeting",
            Self::SpoofedSender => "spoofed_sender",
            Self::OverLimit => "over_limit",
            Self::Draining => "draining",
            Self::Unexpected => "unexpected",
            Self::UnknownTarget => "unknown_target",
        }
    }
}

/// What the caller must do with a datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Action<'a> {
    /// Nothing to send (dropped and counted, or consumed).
    None,
    /// Send these bytes back to the source address.
    Reply(Vec<u8>),
    /// Send the received datagram unchanged to each address.
    Forward { kind: Kind, to: &'a [SocketAddr] },
}

#[derive(Debug, Clone)]
struct Binding {
    slot: u32,
    sender: u16,
    participant: ParticipantId,
    not_after: u64,
    last_seen: u64,
}

#[derive(Debug)]
struct Member {
    sender: u16,
    addr: SocketAddr,
}

#[derive(Debug)]
struct Meeting {
    id: MeetingId,
    members: Vec<Member>,
}

/// The routing state of one relay.
#[derive(Debug)]
pub struct Relay {
    relay_id: String,
    ticket_key: VerifyingKey,
    limits: RelayLimits,
    metrics: Arc<RelayMetrics>,
    slots_by_meeting: HashMap<MeetingId, u32>,
    meetings: HashMap<u32, Meeting>,
    bindings: HashMap<SocketAddr, Binding>,
    next_slot: u32,
    draining: bool,
    scratch: Vec<SocketAddr>,
}

impl Relay {
    pub fn new(
        relay_id: String,
        ticket_key: VerifyingKey,
        limits: RelayLimits,
        metrics: Arc<RelayMetrics>,
    ) -> Self {
        Self {
            relay_id,
            ticket_key,
            limits,
            metrics,
            slots_by_meeting: HashMap::new(),
            meetings: HashMap::new(),
            bindings: HashMap::new(),
            next_slot: 1,
            draining: false,
            scratch: Vec::new(),
        }
    }

    pub fn meetings(&self) -> usize {
        self.meetings.len()
    }

    pub fn participants(&self) -> usize {
        self.bindings.len()
    }

    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// Estimated routing-state bytes, the figure `limits.memoryBytes` bounds.
    pub fn state_bytes(&self) -> u64 {
        self.meetings.len() as u64 * MEETING_STATE_BYTES
            + self.bindings.len() as u64 * PARTICIPANT_STATE_BYTES
    }

    fn drop(&self, reason: DropReason) -> Action<'static> {
        self.metrics.dropped(reason);
        Action::None
    }

    /// Handles one datagram from `from` at unix time `now` (seconds).
    pub fn handle(&mut self, from: SocketAddr, data: &[u8], now: u64) -> Action<'_> {
        let packet = match Packet::parse(data) {
            Ok(p) => p,
            Err(_) => {
                self.metrics.received(Kind::Unparsed, data.len());
                return self.drop(DropReason::Malformed);
            }
        };
        let kind = match &packet {
            Packet::Media { header, .. } => Kind::Media(header.kind),
            _ => Kind::Control,
        };
        self.metrics.received(kind, data.len());
        match packet {
            Packet::Hello { nonce, ticket } => self.hello(from, nonce, ticket, now),
            Packet::Welcome { .. } | Packet::Reject { .. } | Packet::Move { .. } => {
                self.drop(DropReason::Unexpected)
            }
            Packet::Media { header, .. } => {
                let b = match self.check_bound(from, header.slot, header.sender, now) {
                    Ok(b) => b,
                    Err(r) => return self.drop(r),
                };
                self.fan_out(b.slot, b.sender, kind)
            }
            Packet::KeepAlive { slot, sender, echo } => {
                if let Err(r) = self.check_bound(from, slot, sender, now) {
                    return self.drop(r);
                }
                // Echoed so the client can measure the round trip and see the relay is alive.
                Action::Reply(
                    Packet::KeepAlive { slot, sender, echo }
                        .to_vec()
                        .expect("keep-alive always encodes"),
                )
            }
            Packet::Bye { slot, sender } => {
                if let Err(r) = self.check_bound(from, slot, sender, now) {
                    return self.drop(r);
                }
                self.unbind(from);
                Action::None
            }
            Packet::KeyframeRequest {
                slot,
                sender,
                target,
                ..
            }
            | Packet::Nack {
                slot,
                sender,
                target,
                ..
            } => {
                if let Err(r) = self.check_bound(from, slot, sender, now) {
                    return self.drop(r);
                }
                let addr = self
                    .meetings
                    .get(&slot)
                    .and_then(|m| m.members.iter().find(|m| m.sender == target))
                    .map(|m| m.addr);
                match addr {
                    Some(a) => {
                        self.scratch.clear();
                        self.scratch.push(a);
                        Action::Forward {
                            kind: Kind::Control,
                            to: &self.scratch,
                        }
                    }
                    None => self.drop(DropReason::UnknownTarget),
                }
            }
        }
    }

    fn check_bound(
        &mut self,
        from: SocketAddr,
        slot: u32,
        sender: u16,
        now: u64,
    ) -> Result<Binding, DropReason> {
        let b = self.bindings.get_mut(&from).ok_or(DropReason::Unbound)?;
        if now > b.not_after {
            return Err(DropReason::ExpiredTicket);
        }
        if b.slot != slot {
            return Err(DropReason::OtherMeeting);
        }
        if b.sender != sender {
            return Err(DropReason::SpoofedSender);
        }
        b.last_seen = now;
        Ok(b.clone())
    }

    fn fan_out(&mut self, slot: u32, sender: u16, kind: Kind) -> Action<'_> {
        self.scratch.clear();
        if let Some(m) = self.meetings.get(&slot) {
            self.scratch.extend(
                m.members
                    .iter()
                    .filter(|m| m.sender != sender)
                    .map(|m| m.addr),
            );
        }
        self.metrics.fanout.observe(self.scratch.len() as f64);
        Action::Forward {
            kind,
            to: &self.scratch,
        }
    }

    fn reject(&self, nonce: u64, reason: RejectReason, drop: DropReason) -> Action<'static> {
        self.metrics.dropped(drop);
        Action::Reply(
            Packet::Reject { nonce, reason }
                .to_vec()
                .expect("reject always encodes"),
        )
    }

    fn hello(&mut self, from: SocketAddr, nonce: u64, ticket: &[u8], now: u64) -> Action<'_> {
        if self.draining {
            return self.reject(nonce, RejectReason::Draining, DropReason::Draining);
        }
        let t = match Ticket::verify(ticket, &self.ticket_key, &self.relay_id, now) {
            Ok(t) => t,
            Err(TicketError::Expired) => {
                return self.reject(nonce, RejectReason::Expired, DropReason::ExpiredTicket);
            }
            Err(TicketError::WrongRelay) => {
                return self.reject(nonce, RejectReason::WrongRelay, DropReason::BadTicket);
            }
            Err(_) => return self.reject(nonce, RejectReason::BadTicket, DropReason::BadTicket),
        };
        // A re-HELLO from the same address (lost WELCOME, new ticket) replaces its binding.
        self.unbind(from);
        let existing = self.slots_by_meeting.get(&t.meeting).copied();
        let new_meeting = existing.is_none();
        if new_meeting && self.meetings.len() >= self.limits.meetings as usize {
            return self.reject(nonce, RejectReason::RelayFull, DropReason::OverLimit);
        }
        let extra = PARTICIPANT_STATE_BYTES + if new_meeting { MEETING_STATE_BYTES } else { 0 };
        if self.state_bytes() + extra > self.limits.memory_bytes {
            return self.reject(nonce, RejectReason::RelayFull, DropReason::OverLimit);
        }
        let slot = match existing {
            Some(s) => s,
            None => {
                let s = self.allocate_slot();
                self.slots_by_meeting.insert(t.meeting.clone(), s);
                self.meetings.insert(
                    s,
                    Meeting {
                        id: t.meeting.clone(),
                        members: Vec::new(),
                    },
                );
                s
            }
        };
        let meeting = self.meetings.get_mut(&slot).expect("slot just looked up");
        // The same sender index from a new address (client moved or restarted)
        // takes over: the old address stops receiving.
        if let Some(pos) = meeting
            .members
            .iter()
            .position(|m| m.sender == t.sender_index)
        {
            let old = meeting.members.swap_remove(pos);
            self.bindings.remove(&old.addr);
        } else if meeting.members.len() >= self.limits.participants_per_meeting as usize {
            return self.reject(nonce, RejectReason::MeetingFull, DropReason::OverLimit);
        }
        meeting.members.push(Member {
            sender: t.sender_index,
            addr: from,
        });
        self.bindings.insert(
            from,
            Binding {
                slot,
                sender: t.sender_index,
                participant: t.participant,
                not_after: t.not_after,
                last_seen: now,
            },
        );
        self.update_gauges();
        Action::Reply(
            Packet::Welcome {
                nonce,
                slot,
                sender: t.sender_index,
                keepalive_secs: KEEPALIVE_SECS,
            }
            .to_vec()
            .expect("welcome always encodes"),
        )
    }

    fn allocate_slot(&mut self) -> u32 {
        loop {
            let s = self.next_slot;
            self.next_slot = self.next_slot.wrapping_add(1).max(1);
            if !self.meetings.contains_key(&s) {
                return s;
            }
        }
    }

    fn unbind(&mut self, addr: SocketAddr) {
        let Some(b) = self.bindings.remove(&addr) else {
            return;
        };
        if let Some(m) = self.meetings.get_mut(&b.slot) {
            m.members.retain(|m| m.addr != addr);
            if m.members.is_empty() {
                self.remove_meeting(b.slot);
            }
        }
        self.update_gauges();
    }

    fn remove_meeting(&mut self, slot: u32) {
        if let Some(m) = self.meetings.remove(&slot) {
            self.slots_by_meeting.remove(&m.id);
        }
    }

    fn update_gauges(&self) {
        self.metrics.meetings.set(self.meetings.len() as i64);
        self.metrics.participants.set(self.bindings.len() as i64);
    }

    /// Forgets idle bindings and those whose ticket expired. Returns how many.
    pub fn expire(&mut self, now: u64) -> usize {
        let stale: Vec<SocketAddr> = self
            .bindings
            .iter()
            .filter(|(_, b)| now > b.not_after || now.saturating_sub(b.last_seen) > IDLE_SECS)
            .map(|(a, _)| *a)
            .collect();
        for a in &stale {
            self.unbind(*a);
        }
        stale.len()
    }

    /// Stops taking joins and returns the MOVE datagram to send to every
    /// bound address: clients re-join through the KMS, which places them on
    /// another relay, while this one keeps forwarding for `forward_for_ms`.
    pub fn start_drain(&mut self, forward_for_ms: u32) -> (Vec<u8>, Vec<SocketAddr>) {
        self.draining = true;
        self.metrics.draining.set(1);
        let msg = Packet::Move {
            reason: MoveReason::Draining,
            forward_for_ms,
        }
        .to_vec()
        .expect("move always encodes");
        (msg, self.bindings.keys().copied().collect())
    }

    /// The participant bound to an address, for logs and tests.
    pub fn binding(&self, addr: &SocketAddr) -> Option<(MeetingId, ParticipantId, u16)> {
        let b = self.bindings.get(addr)?;
        let m = self.meetings.get(&b.slot)?;
        Some((m.id.clone(), b.participant, b.sender))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use meeting_proto::wire::{RoutingHeader, StreamKind, flags};

    const RELAY: &str = "zone-a/relay-0";

    struct Fixture {
        key: SigningKey,
        relay: Relay,
        metrics: Arc<RelayMetrics>,
    }

    fn fixture(limits: RelayLimits) -> Fixture {
        let key = SigningKey::from_bytes(&[5u8; 32]);
        let metrics = Arc::new(RelayMetrics::new());
        let relay = Relay::new(RELAY.into(), key.verifying_key(), limits, metrics.clone());
        Fixture {
            key,
            relay,
            metrics,
        }
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    impl Fixture {
        fn ticket(&self, meeting: &str, sender: u16, not_after: u64) -> Vec<u8> {
            Ticket {
                meeting: MeetingId::new(meeting).unwrap(),
                participant: ParticipantId(sender as u64 + 100),
                sender_index: sender,
                relay: RELAY.into(),
                not_after,
            }
            .sign(&self.key)
            .unwrap()
        }

        fn join(&mut self, from: SocketAddr, meeting: &str, sender: u16) -> u32 {
            let ticket = self.ticket(meeting, sender, 1_000);
            let hello = Packet::Hello {
                nonce: 1,
                ticket: &ticket,
            }
            .to_vec()
            .unwrap();
            match self.relay.handle(from, &hello, 10) {
                Action::Reply(r) => match Packet::parse(&r).unwrap() {
                    Packet::Welcome {
                        slot, sender: s, ..
                    } => {
                        assert_eq!(s, sender);
                        slot
                    }
                    other => panic!("expected WELCOME, got {other:?}"),
                },
                other => panic!("expected a reply, got {other:?}"),
            }
        }
    }

    fn media(slot: u32, sender: u16) -> Vec<u8> {
        Packet::Media {
            header: RoutingHeader {
                slot,
                sender,
                kind: StreamKind::Audio,
                flags: flags::FRAME_START | flags::FRAME_END,
                seq: 1,
                timestamp: 0,
            },
            header_bytes: &[],
            payload: b"opaque sframe bytes",
        }
        .to_vec()
        .unwrap()
    }

    fn forwarded(a: Action<'_>) -> Vec<SocketAddr> {
        match a {
            Action::Forward { to, .. } => {
                let mut v = to.to_vec();
                v.sort();
                v
            }
            other => panic!("expected forward, got {other:?}"),
        }
    }

    #[test]
    fn media_fans_out_to_the_other_members_of_the_same_meeting_only() {
        let mut f = fixture(RelayLimits::default());
        let s = f.join(addr(1), "m1", 1);
        assert_eq!(f.join(addr(2), "m1", 2), s);
        assert_eq!(f.join(addr(3), "m1", 3), s);
        let other = f.join(addr(4), "m2", 1);
        assert_ne!(other, s);
        assert_eq!(
            forwarded(f.relay.handle(addr(1), &media(s, 1), 11)),
            vec![addr(2), addr(3)]
        );
        assert_eq!(
            forwarded(f.relay.handle(addr(4), &media(other, 1), 11)),
            vec![]
        );
        assert_eq!(f.relay.meetings(), 2);
        assert_eq!(f.relay.participants(), 4);
        assert_eq!(
            f.relay.binding(&addr(2)),
            Some((MeetingId::new("m1").unwrap(), ParticipantId(102), 2))
        );
    }

    #[test]
    fn unbound_spoofed_foreign_and_expired_traffic_is_dropped_and_counted() {
        let mut f = fixture(RelayLimits::default());
        let s = f.join(addr(1), "m1", 1);
        f.join(addr(2), "m1", 2);
        let other = f.join(addr(3), "m2", 1);

        assert_eq!(f.relay.handle(addr(9), &media(s, 1), 11), Action::None);
        assert_eq!(f.metrics.drops(DropReason::Unbound), 1);

        assert_eq!(f.relay.handle(addr(1), &media(s, 2), 11), Action::None);
        assert_eq!(f.metrics.drops(DropReason::SpoofedSender), 1);

        assert_eq!(f.relay.handle(addr(1), &media(other, 1), 11), Action::None);
        assert_eq!(f.metrics.drops(DropReason::OtherMeeting), 1);

        assert_eq!(f.relay.handle(addr(1), &media(s, 1), 1_001), Action::None);
        assert_eq!(f.metrics.drops(DropReason::ExpiredTicket), 1);

        assert_eq!(f.relay.handle(addr(1), b"\x07garbage", 11), Action::None);
        assert_eq!(f.metrics.drops(DropReason::Malformed), 1);

        let welcome = Packet::Move {
            reason: MoveReason::Draining,
            forward_for_ms: 1,
        }
        .to_vec()
        .unwrap();
        assert_eq!(f.relay.handle(addr(1), &welcome, 11), Action::None);
        assert_eq!(f.metrics.drops(DropReason::Unexpected), 1);
        let text = f.metrics.encode();
        assert!(
            text.contains(r#"conclave_relay_dropped_packets_total{reason="spoofed_sender"} 1"#)
        );
    }

    #[test]
    fn bad_tickets_get_a_reject_and_bind_nothing() {
        let mut f = fixture(RelayLimits::default());
        let expired = f.ticket("m1", 1, 5);
        let hello = Packet::Hello {
            nonce: 7,
            ticket: &expired,
        }
        .to_vec()
        .unwrap();
        let reply = |a: Action<'_>| match a {
            Action::Reply(r) => Packet::parse(&r).unwrap().packet_type(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            reply(f.relay.handle(addr(1), &hello, 10)),
            meeting_proto::wire::PacketType::Reject
        );
        assert_eq!(f.metrics.drops(DropReason::ExpiredTicket), 1);

        let foreign = SigningKey::from_bytes(&[6u8; 32]);
        let forged = Ticket {
            meeting: MeetingId::new("m1").unwrap(),
            participant: ParticipantId(1),
            sender_index: 1,
            relay: RELAY.into(),
            not_after: 1_000,
        }
        .sign(&foreign)
        .unwrap();
        let hello = Packet::Hello {
            nonce: 7,
            ticket: &forged,
        }
        .to_vec()
        .unwrap();
        reply(f.relay.handle(addr(1), &hello, 10));
        assert_eq!(f.metrics.drops(DropReason::BadTicket), 1);
        assert_eq!(f.relay.participants(), 0);
        assert_eq!(f.relay.meetings(), 0);
    }

    #[test]
    fn limits_bound_meetings_members_and_memory() {
        let mut f = fixture(RelayLimits {
            participants_per_meeting: 2,
            meetings: 2,
            memory_bytes: 10 * 1024,
        });
        f.join(addr(1), "m1", 1);
        f.join(addr(2), "m1", 2);
        let t = f.ticket("m1", 3, 1_000);
        let hello = Packet::Hello {
            nonce: 1,
            ticket: &t,
        }
        .to_vec()
        .unwrap();
        assert!(matches!(
            f.relay.handle(addr(3), &hello, 10),
            Action::Reply(_)
        ));
        assert_eq!(f.metrics.drops(DropReason::OverLimit), 1);
        f.join(addr(4), "m2", 1);
        let t = f.ticket("m3", 1, 1_000);
        let hello = Packet::Hello {
            nonce: 1,
            ticket: &t,
        }
        .to_vec()
        .unwrap();
        f.relay.handle(addr(5), &hello, 10);
        assert_eq!(f.metrics.drops(DropReason::OverLimit), 2);
        assert_eq!(f.relay.meetings(), 2);
        assert!(f.relay.state_bytes() <= 10 * 1024);
    }

    #[test]
    fn memory_bound_holds_under_a_flood_of_valid_joins() {
        let memory = MEETING_STATE_BYTES * 3 + PARTICIPANT_STATE_BYTES * 20;
        let mut f = fixture(RelayLimits {
            participants_per_meeting: 100,
            meetings: 1000,
            memory_bytes: memory,
        });
        for i in 0..500u16 {
            let t = f.ticket(&format!("m{}", i % 50), i, 1_000);
            let hello = Packet::Hello {
                nonce: 1,
                ticket: &t,
            }
            .to_vec()
            .unwrap();
            f.relay.handle(addr(1000 + i), &hello, 10);
            assert!(f.relay.state_bytes() <= memory);
        }
        assert!(f.metrics.drops(DropReason::OverLimit) > 0);
    }

    #[test]
    fn rebinding_bye_idle_expiry_and_drain() {
        let mut f = fixture(RelayLimits::default());
        let s = f.join(addr(1), "m1", 1);
        f.join(addr(2), "m1", 2);
        // Sender 2 comes back from a new address: the old one is forgotten.
        f.join(addr(3), "m1", 2);
        assert_eq!(
            forwarded(f.relay.handle(addr(1), &media(s, 1), 11)),
            vec![addr(3)]
        );
        assert_eq!(f.relay.handle(addr(2), &media(s, 2), 11), Action::None);

        let bye = Packet::Bye { slot: s, sender: 2 }.to_vec().unwrap();
        f.relay.handle(addr(3), &bye, 12);
        assert_eq!(f.relay.participants(), 1);

        assert_eq!(f.relay.expire(11 + IDLE_SECS), 0);
        assert_eq!(f.relay.expire(12 + IDLE_SECS), 1);
        assert_eq!(f.relay.meetings(), 0);

        let s = f.join(addr(1), "m1", 1);
        let (msg, to) = f.relay.start_drain(5000);
        assert_eq!(to, vec![addr(1)]);
        assert!(matches!(Packet::parse(&msg).unwrap(), Packet::Move { .. }));
        let t = f.ticket("m1", 2, 1_000);
        let hello = Packet::Hello {
            nonce: 1,
            ticket: &t,
        }
        .to_vec()
        .unwrap();
        f.relay.handle(addr(2), &hello, 10);
        assert_eq!(f.metrics.drops(DropReason::Draining), 1);
        // Existing members keep being served while draining.
        assert_eq!(forwarded(f.relay.handle(addr(1), &media(s, 1), 11)), vec![]);
    }

    #[test]
    fn nack_and_keyframe_requests_go_to_the_target_only() {
        let mut f = fixture(RelayLimits::default());
        let s = f.join(addr(1), "m1", 1);
        f.join(addr(2), "m1", 2);
        f.join(addr(3), "m1", 3);
        let nack = Packet::Nack {
            slot: s,
            sender: 1,
            target: 3,
            kind: StreamKind::Chat,
            seqs: vec![4],
        }
        .to_vec()
        .unwrap();
        assert_eq!(forwarded(f.relay.handle(addr(1), &nack, 11)), vec![addr(3)]);
        let kf = Packet::KeyframeRequest {
            slot: s,
            sender: 1,
            target: 9,
            kind: StreamKind::Video,
        }
        .to_vec()
        .unwrap();
        assert_eq!(f.relay.handle(addr(1), &kf, 11), Action::None);
        assert_eq!(f.metrics.drops(DropReason::UnknownTarget), 1);
    }

    #[test]
    fn random_datagrams_never_panic_or_bind() {
        let mut f = fixture(RelayLimits::default());
        let mut x = 0x1234_5678_9abc_def0u64;
        for i in 0..20_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 80) as usize;
            let mut d: Vec<u8> = (0..len).map(|j| (x >> (j % 56)) as u8).collect();
            if len > 1 {
                d[0] = 1;
                d[1] = (i % 10) as u8;
            }
            let _ = f.relay.handle(addr(7), &d, 10);
        }
        assert_eq!(f.relay.participants(), 0);
    }
}
