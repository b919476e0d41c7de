//! Datagram formats spoken between clients and relays on the media port.
//!
//! Every datagram starts with `u8 version | u8 type`; all integers are
//! big-endian. A relay and a client that disagree on the version get
//! [`WireError::UnsupportedVersion`] instead of a misparse.
//!
//! ```text
//! HELLO      v|1| u64 nonce | u16 ticket len | ticket
//! WELCOME    v|2| u64 nonce | u32 slot | u16 sender | u16 keep-alive seconds
//! REJECT     v|3| u64 nonce | u8 reason
//! MEDIA      v|4| u32 slot | u16 sender | u8 kind | u8 flags | u32 seq | u32 timestamp | SFrame
//! KEEPALIVE  v|5| u32 slot | u16 sender | u64 echo
//! BYE        v|6| u32 slot | u16 sender
//! KEYFRAME   v|7| u32 slot | u16 sender | u16 target | u8 kind
//! NACK       v|8| u32 slot | u16 sender | u16 target | u8 kind | u8 n | n x u32 seq
//! MOVE       v|9| u8 reason | u32 forwarding continues for (ms)
//! ```
//!
//! The first [`ROUTING_HEADER_LEN`] bytes of a MEDIA datagram are the routing
//! header the relay reads; senders feed exactly those bytes to SFrame as
//! metadata, so a relay that rewrites any of them makes the frame fail to
//! authenticate at every receiver.

use std::fmt;

/// The only version this build speaks.
pub const VERSION: u8 = 1;
/// Largest datagram either side sends or accepts: fits an IPv6 path with a
/// 1280-byte minimum MTU plus room for common tunnels is not guaranteed, so
/// senders fragment media frames to [`MAX_MEDIA_PAYLOAD`].
pub const MAX_DATAGRAM: usize = 1472;
/// Bytes of the plaintext routing header at the start of a MEDIA datagram.
pub const ROUTING_HEADER_LEN: usize = 18;
/// Largest SFrame ciphertext (header + ciphertext + tag) in one MEDIA datagram.
pub const MAX_MEDIA_PAYLOAD: usize = MAX_DATAGRAM - ROUTING_HEADER_LEN;
/// Most sequence numbers one NACK may carry.
pub const MAX_NACK_SEQS: usize = 32;

/// What a MEDIA datagram carries. The relay counts by kind; receivers pick
/// the decoder by kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum StreamKind {
    Audio = 1,
    Video = 2,
    Screen = 3,
    Chat = 4,
}

impl StreamKind {
    pub const ALL: [StreamKind; 4] = [Self::Audio, Self::Video, Self::Screen, Self::Chat];

    pub fn from_u8(v: u8) -> Result<Self, WireError> {
        Ok(match v {
            1 => Self::Audio,
            2 => Self::Video,
            3 => Self::Screen,
            4 => Self::Chat,
            other => return Err(WireError::UnknownStreamKind(other)),
        })
    }

    /// Lower-case name used in metric labels and CLI output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Audio => "audio",
            Self::Video => "video",
            Self::Screen => "screen",
            Self::Chat => "chat",
        }
    }
}

impl fmt::Display for StreamKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// MEDIA flag bits.
pub mod flags {
    /// The frame can be decoded without earlier frames.
    pub const KEYFRAME: u8 = 0x01;
    /// First fragment of a media frame.
    pub const FRAME_START: u8 = 0x02;
    /// Last fragment of a media frame.
    pub const FRAME_END: u8 = 0x04;
    /// A resend answering a NACK (chat); receivers deduplicate by sequence.
    pub const RETRANSMIT: u8 = 0x08;
    /// Bits this version defines; others must be zero.
    pub const KNOWN: u8 = KEYFRAME | FRAME_START | FRAME_END | RETRANSMIT;
}

/// Why a relay refused a HELLO. Sent back so a client can tell a stale ticket
/// from a full relay; carries nothing the sender did not already know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RejectReason {
    BadTicket = 1,
    Expired = 2,
    WrongRelay = 3,
    MeetingFull = 4,
    RelayFull = 5,
    Draining = 6,
}

impl RejectReason {
    fn from_u8(v: u8) -> Result<Self, WireError> {
        Ok(match v {
            1 => Self::BadTicket,
            2 => Self::Expired,
            3 => Self::WrongRelay,
            4 => Self::MeetingFull,
            5 => Self::RelayFull,
            6 => Self::Draining,
            other => return Err(WireError::UnknownReason(other)),
        })
    }
}

/// Why a relay tells its clients to move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MoveReason {
    /// The relay is shutting down; re-join through the KMS to be placed elsewhere.
    Draining = 1,
}

impl MoveReason {
    fn from_u8(v: u8) -> Result<Self, WireError> {
        match v {
            1 => Ok(Self::Draining),
            other => Err(WireError::UnknownReason(other)),
        }
    }
}

/// The plaintext part of a MEDIA datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoutingHeader {
    /// The relay's number for the meeting (from WELCOME).
    pub slot: u32,
    /// The sender's index (from its ticket).
    pub sender: u16,
    pub kind: StreamKind,
    pub flags: u8,
    /// Per (sender, kind) packet sequence number.
    pub seq: u32,
    /// Media clock (48 kHz for audio, 90 kHz for video) or milliseconds for chat.
    pub timestamp: u32,
}

impl RoutingHeader {
    /// Encodes the header, including version and type, as the AAD prefix.
    pub fn encode(&self) -> [u8; ROUTING_HEADER_LEN] {
        let mut out = [0u8; ROUTING_HEADER_LEN];
        out[0] = VERSION;
        out[1] = PacketType::Media as u8;
        out[2..6].copy_from_slice(&self.slot.to_be_bytes());
        out[6..8].copy_from_slice(&self.sender.to_be_bytes());
        out[8] = self.kind as u8;
        out[9] = self.flags;
        out[10..14].copy_from_slice(&self.seq.to_be_bytes());
        out[14..18].copy_from_slice(&self.timestamp.to_be_bytes());
        out
    }
}

/// A parsed datagram borrowing from the received bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    Hello {
        nonce: u64,
        ticket: &'a [u8],
    },
    Welcome {
        nonce: u64,
        slot: u32,
        sender: u16,
        keepalive_secs: u16,
    },
    Reject {
        nonce: u64,
        reason: RejectReason,
    },
    Media {
        header: RoutingHeader,
        /// The routing header bytes exactly as received (the SFrame metadata).
        header_bytes: &'a [u8],
        /// SFrame header + ciphertext + tag.
        payload: &'a [u8],
    },
    KeepAlive {
        slot: u32,
        sender: u16,
        echo: u64,
    },
    Bye {
        slot: u32,
        sender: u16,
    },
    KeyframeRequest {
        slot: u32,
        sender: u16,
        target: u16,
        kind: StreamKind,
    },
    Nack {
        slot: u32,
        sender: u16,
        target: u16,
        kind: StreamKind,
        seqs: Vec<u32>,
    },
    Move {
        reason: MoveReason,
        forward_for_ms: u32,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PacketType {
    Hello = 1,
    Welcome = 2,
    Reject = 3,
    Media = 4,
    KeepAlive = 5,
    Bye = 6,
    KeyframeRequest = 7,
    Nack = 8,
    Move = 9,
}

impl PacketType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hello => "hello",
            Self::Welcome => "welcome",
            Self::Reject => "reject",
            Self::Media => "media",
            Self::KeepAlive => "keepalive",
            Self::Bye => "bye",
            Self::KeyframeRequest => "keyframe_request",
            Self::Nack => "nack",
            Self::Move => "move",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum WireError {
    #[error("datagram is empty")]
    Empty,
    #[error("wire version {0} is not supported (this build speaks version {VERSION})")]
    UnsupportedVersion(u8),
    #[error("unknown packet type {0}")]
    UnknownType(u8),
    #[error("{0} packet is truncated")]
    Truncated(&'static str),
    #[error("{0} packet has trailing bytes")]
    TrailingBytes(&'static str),
    #[error("datagram of {0} bytes exceeds the {MAX_DATAGRAM}-byte limit")]
    TooLarge(usize),
    #[error("unknown stream kind {0}")]
    UnknownStreamKind(u8),
    #[error("unknown flag bits {0:#04x}")]
    UnknownFlags(u8),
    #[error("unknown reason code {0}")]
    UnknownReason(u8),
    #[error("NACK carries {0} sequence numbers; between 1 and {MAX_NACK_SEQS} are allowed")]
    BadNackCount(usize),
    #[error("MEDIA packet has no SFrame payload")]
    EmptyMedia,
    #[error("ticket of {0} bytes is too long")]
    TicketTooLong(usize),
}

impl<'a> Packet<'a> {
    /// The packet's type, for counters.
    pub fn packet_type(&self) -> PacketType {
        match self {
            Self::Hello { .. } => PacketType::Hello,
            Self::Welcome { .. } => PacketType::Welcome,
            Self::Reject { .. } => PacketType::Reject,
            Self::Media { .. } => PacketType::Media,
            Self::KeepAlive { .. } => PacketType::KeepAlive,
            Self::Bye { .. } => PacketType::Bye,
            Self::KeyframeRequest { .. } => PacketType::KeyframeRequest,
            Self::Nack { .. } => PacketType::Nack,
            Self::Move { .. } => PacketType::Move,
        }
    }

    /// The routing header and SFrame bytes of a MEDIA datagram, with the
    /// checks of [`Packet::parse`]; `None` for any other packet type (parse
    /// those with [`Packet::parse`]). The receive path's shortcut.
    pub fn parse_media(bytes: &'a [u8]) -> Result<Option<(RoutingHeader, &'a [u8])>, WireError> {
        if bytes.len() > MAX_DATAGRAM {
            return Err(WireError::TooLarge(bytes.len()));
        }
        match bytes {
            [] => Err(WireError::Empty),
            [v, ..] if *v != VERSION => Err(WireError::UnsupportedVersion(*v)),
            [_, ty, body @ ..] if *ty == PacketType::Media as u8 => media_body(body).map(Some),
            _ => Ok(None),
        }
    }

    /// Parses one datagram. Never panics, whatever the bytes.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, WireError> {
        if bytes.len() > MAX_DATAGRAM {
            return Err(WireError::TooLarge(bytes.len()));
        }
        let (&version, rest) = bytes.split_first().ok_or(WireError::Empty)?;
        if version != VERSION {
            return Err(WireError::UnsupportedVersion(version));
        }
        let (&ty, body) = rest.split_first().ok_or(WireError::Truncated("datagram"))?;
        match ty {
            1 => {
                let mut r = Reader::new(body, "HELLO");
                let nonce = r.u64()?;
                let len = r.u16()? as usize;
                if len > crate::ticket::MAX_TICKET_LEN {
                    return Err(WireError::TicketTooLong(len));
                }
                let ticket = r.take(len)?;
                r.finish()?;
                Ok(Self::Hello { nonce, ticket })
            }
            2 => {
                let mut r = Reader::new(body, "WELCOME");
                let p = Self::Welcome {
                    nonce: r.u64()?,
                    slot: r.u32()?,
                    sender: r.u16()?,
                    keepalive_secs: r.u16()?,
                };
                r.finish()?;
                Ok(p)
            }
            3 => {
                let mut r = Reader::new(body, "REJECT");
                let nonce = r.u64()?;
                let reason = RejectReason::from_u8(r.u8()?)?;
                r.finish()?;
                Ok(Self::Reject { nonce, reason })
            }
            4 => {
                let (header, payload) = media_body(body)?;
                Ok(Self::Media {
                    header,
                    header_bytes: &bytes[..ROUTING_HEADER_LEN],
                    payload,
                })
            }
            5 => {
                let mut r = Reader::new(body, "KEEPALIVE");
                let p = Self::KeepAlive {
                    slot: r.u32()?,
                    sender: r.u16()?,
                    echo: r.u64()?,
                };
                r.finish()?;
                Ok(p)
            }
            6 => {
                let mut r = Reader::new(body, "BYE");
                let p = Self::Bye {
                    slot: r.u32()?,
                    sender: r.u16()?,
                };
                r.finish()?;
                Ok(p)
            }
            7 => {
                let mut r = Reader::new(body, "KEYFRAME");
                let p = Self::KeyframeRequest {
                    slot: r.u32()?,
                    sender: r.u16()?,
                    target: r.u16()?,
                    kind: StreamKind::from_u8(r.u8()?)?,
                };
                r.finish()?;
                Ok(p)
            }
            8 => {
                let mut r = Reader::new(body, "NACK");
                let slot = r.u32()?;
                let sender = r.u16()?;
                let target = r.u16()?;
                let kind = StreamKind::from_u8(r.u8()?)?;
                let n = r.u8()? as usize;
                if n == 0 || n > MAX_NACK_SEQS {
                    return Err(WireError::BadNackCount(n));
                }
                let mut seqs = Vec::with_capacity(n);
                for _ in 0..n {
                    seqs.push(r.u32()?);
                }
                r.finish()?;
                Ok(Self::Nack {
                    slot,
                    sender,
                    target,
                    kind,
                    seqs,
                })
            }
            9 => {
                let mut r = Reader::new(body, "MOVE");
                let reason = MoveReason::from_u8(r.u8()?)?;
                let forward_for_ms = r.u32()?;
                r.finish()?;
                Ok(Self::Move {
                    reason,
                    forward_for_ms,
                })
            }
            other => Err(WireError::UnknownType(other)),
        }
    }

    /// Appends the encoded datagram to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        let start = out.len();
        out.push(VERSION);
        out.push(self.packet_type() as u8);
        match self {
            Self::Hello { nonce, ticket } => {
                if ticket.len() > crate::ticket::MAX_TICKET_LEN {
                    return Err(WireError::TicketTooLong(ticket.len()));
                }
                out.extend_from_slice(&nonce.to_be_bytes());
                out.extend_from_slice(&(ticket.len() as u16).to_be_bytes());
                out.extend_from_slice(ticket);
            }
            Self::Welcome {
                nonce,
                slot,
                sender,
                keepalive_secs,
            } => {
                out.extend_from_slice(&nonce.to_be_bytes());
                out.extend_from_slice(&slot.to_be_bytes());
                out.extend_from_slice(&sender.to_be_bytes());
                out.extend_from_slice(&keepalive_secs.to_be_bytes());
            }
            Self::Reject { nonce, reason } => {
                out.extend_from_slice(&nonce.to_be_bytes());
                out.push(*reason as u8);
            }
            Self::Media {
                header, payload, ..
            } => {
                if payload.is_empty() {
                    return Err(WireError::EmptyMedia);
                }
                if header.flags & !flags::KNOWN != 0 {
                    return Err(WireError::UnknownFlags(header.flags & !flags::KNOWN));
                }
                out.truncate(start);
                out.extend_from_slice(&header.encode());
                out.extend_from_slice(payload);
            }
            Self::KeepAlive { slot, sender, echo } => {
                out.extend_from_slice(&slot.to_be_bytes());
                out.extend_from_slice(&sender.to_be_bytes());
                out.extend_from_slice(&echo.to_be_bytes());
            }
            Self::Bye { slot, sender } => {
                out.extend_from_slice(&slot.to_be_bytes());
                out.extend_from_slice(&sender.to_be_bytes());
            }
            Self::KeyframeRequest {
                slot,
                sender,
                target,
                kind,
            } => {
                out.extend_from_slice(&slot.to_be_bytes());
                out.extend_from_slice(&sender.to_be_bytes());
                out.extend_from_slice(&target.to_be_bytes());
                out.push(*kind as u8);
            }
            Self::Nack {
                slot,
                sender,
                target,
                kind,
                seqs,
            } => {
                if seqs.is_empty() || seqs.len() > MAX_NACK_SEQS {
                    return Err(WireError::BadNackCount(seqs.len()));
                }
                out.extend_from_slice(&slot.to_be_bytes());
                out.extend_from_slice(&sender.to_be_bytes());
                out.extend_from_slice(&target.to_be_bytes());
                out.push(*kind as u8);
                out.push(seqs.len() as u8);
                for s in seqs {
                    out.extend_from_slice(&s.to_be_bytes());
                }
            }
            Self::Move {
                reason,
                forward_for_ms,
            } => {
                out.push(*reason as u8);
                out.extend_from_slice(&forward_for_ms.to_be_bytes());
            }
        }
        let len = out.len() - start;
        if len > MAX_DATAGRAM {
            out.truncate(start);
            return Err(WireError::TooLarge(len));
        }
        Ok(())
    }

    /// Encodes into a fresh buffer.
    pub fn to_vec(&self) -> Result<Vec<u8>, WireError> {
        let mut out = Vec::with_capacity(64);
        self.encode_into(&mut out)?;
        Ok(out)
    }
}

/// A MEDIA datagram after version and type: routing header fields, then
/// the (non-empty) SFrame.
fn media_body(body: &[u8]) -> Result<(RoutingHeader, &[u8]), WireError> {
    let mut r = Reader::new(body, "MEDIA");
    let slot = r.u32()?;
    let sender = r.u16()?;
    let kind = StreamKind::from_u8(r.u8()?)?;
    let flags = r.u8()?;
    if flags & !flags::KNOWN != 0 {
        return Err(WireError::UnknownFlags(flags & !flags::KNOWN));
    }
    let seq = r.u32()?;
    let timestamp = r.u32()?;
    let payload = r.rest();
    if payload.is_empty() {
        return Err(WireError::EmptyMedia);
    }
    let header = RoutingHeader {
        slot,
        sender,
        kind,
        flags,
        seq,
        timestamp,
    };
    Ok((header, payload))
}

struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated(self.what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    fn finish(&self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::TrailingBytes(self.what))
        }
    }
}

/// Sliding-window replay protection over 64-bit counters (SFrame CTR, or
/// sequence numbers widened by the caller).
///
/// Use in two steps: [`ReplayWindow::check`] before authenticating a packet
/// and [`ReplayWindow::accept`] after it authenticated, so a forged packet
/// with a huge counter cannot slide the window and lock out real traffic.
#[derive(Clone, Debug, Default)]
pub struct ReplayWindow {
    /// Highest counter accepted so far, if any.
    top: Option<u64>,
    /// Bit i set = counter `top - i` was seen.
    seen: u128,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum ReplayError {
    #[error("counter {0} was already received")]
    Duplicate(u64),
    #[error("counter {0} is older than the replay window")]
    TooOld(u64),
}

impl ReplayWindow {
    /// Counters this far behind the newest one are still accepted once.
    pub const WIDTH: u64 = 128;

    pub fn check(&self, ctr: u64) -> Result<(), ReplayError> {
        let Some(top) = self.top else { return Ok(()) };
        if ctr > top {
            return Ok(());
        }
        let behind = top - ctr;
        if behind >= Self::WIDTH {
            return Err(ReplayError::TooOld(ctr));
        }
        if self.seen & (1u128 << behind) != 0 {
            return Err(ReplayError::Duplicate(ctr));
        }
        Ok(())
    }

    /// Records an authenticated counter. Checks again, so a caller that skips
    /// `check` still cannot accept a replay.
    pub fn accept(&mut self, ctr: u64) -> Result<(), ReplayError> {
        self.check(ctr)?;
        match self.top {
            None => {
                self.top = Some(ctr);
                self.seen = 1;
            }
            Some(top) if ctr > top => {
                let shift = ctr - top;
                self.seen = if shift >= Self::WIDTH {
                    0
                } else {
                    self.seen << shift
                };
                self.seen |= 1;
                self.top = Some(ctr);
            }
            Some(top) => self.seen |= 1u128 << (top - ctr),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Packet<'static>> {
        static HDR: [u8; ROUTING_HEADER_LEN] = [0; ROUTING_HEADER_LEN];
        vec![
            Packet::Hello {
                nonce: 9,
                ticket: b"ticket-bytes",
            },
            Packet::Welcome {
                nonce: 9,
                slot: 4,
                sender: 2,
                keepalive_secs: 5,
            },
            Packet::Reject {
                nonce: 9,
                reason: RejectReason::Expired,
            },
            Packet::Media {
                header: RoutingHeader {
                    slot: 4,
                    sender: 2,
                    kind: StreamKind::Video,
                    flags: flags::KEYFRAME | flags::FRAME_START,
                    seq: 77,
                    timestamp: 90_000,
                },
                header_bytes: &HDR,
                payload: b"sframe",
            },
            Packet::KeepAlive {
                slot: 4,
                sender: 2,
                echo: 123,
            },
            Packet::Bye { slot: 4, sender: 2 },
            Packet::KeyframeRequest {
                slot: 4,
                sender: 2,
                target: 3,
                kind: StreamKind::Screen,
            },
            Packet::Nack {
                slot: 4,
                sender: 2,
                target: 3,
                kind: StreamKind::Chat,
                seqs: vec![1, 5, 9],
            },
            Packet::Move {
                reason: MoveReason::Draining,
                forward_for_ms: 5000,
            },
        ]
    }

    #[test]
    fn every_packet_round_trips() {
        for p in samples() {
            let bytes = p.to_vec().unwrap();
            let back = Packet::parse(&bytes).unwrap();
            match (&p, &back) {
                (
                    Packet::Media {
                        header, payload, ..
                    },
                    Packet::Media {
                        header: h2,
                        header_bytes,
                        payload: p2,
                    },
                ) => {
                    assert_eq!(header, h2);
                    assert_eq!(payload, p2);
                    assert_eq!(*header_bytes, &header.encode()[..]);
                }
                _ => assert_eq!(p, back),
            }
        }
    }

    #[test]
    fn every_truncation_and_extension_is_refused() {
        for p in samples() {
            let bytes = p.to_vec().unwrap();
            let min = if p.packet_type() == PacketType::Media {
                ROUTING_HEADER_LEN + 1
            } else {
                bytes.len()
            };
            for len in 0..min {
                assert!(Packet::parse(&bytes[..len]).is_err(), "{p:?} cut at {len}");
            }
            if p.packet_type() != PacketType::Media {
                let mut longer = bytes.clone();
                longer.push(0);
                assert!(matches!(
                    Packet::parse(&longer),
                    Err(WireError::TrailingBytes(_))
                ));
            }
        }
    }

    #[test]
    fn parse_media_agrees_with_parse_on_every_prefix_and_bit_flip() {
        for p in samples() {
            let bytes = p.to_vec().unwrap();
            let mut inputs: Vec<Vec<u8>> = (0..=bytes.len()).map(|n| bytes[..n].to_vec()).collect();
            for i in 0..bytes.len() * 8 {
                let mut b = bytes.clone();
                b[i / 8] ^= 1 << (i % 8);
                inputs.push(b);
            }
            for b in inputs {
                let full = Packet::parse(&b);
                match Packet::parse_media(&b) {
                    Ok(Some((header, payload))) => {
                        let Ok(Packet::Media {
                            header: h,
                            payload: pl,
                            ..
                        }) = full
                        else {
                            panic!("parse_media accepted what parse refuses: {b:?}");
                        };
                        assert_eq!((header, payload), (h, pl));
                    }
                    Ok(None) => assert!(!matches!(full, Ok(Packet::Media { .. })), "{b:?}"),
                    Err(e) => assert_eq!(full.err(), Some(e), "{b:?}"),
                }
            }
        }
    }

    #[test]
    fn unknown_versions_types_kinds_and_flags_have_clear_errors() {
        assert_eq!(
            Packet::parse(&[2, 4]),
            Err(WireError::UnsupportedVersion(2))
        );
        assert!(
            WireError::UnsupportedVersion(2)
                .to_string()
                .contains("this build speaks version 1")
        );
        assert_eq!(Packet::parse(&[1, 200]), Err(WireError::UnknownType(200)));
        let mut media = samples()[3].to_vec().unwrap();
        media[8] = 9;
        assert_eq!(Packet::parse(&media), Err(WireError::UnknownStreamKind(9)));
        media[8] = 1;
        media[9] = 0x80;
        assert_eq!(Packet::parse(&media), Err(WireError::UnknownFlags(0x80)));
        assert_eq!(
            Packet::parse(&vec![1u8; MAX_DATAGRAM + 1]),
            Err(WireError::TooLarge(MAX_DATAGRAM + 1))
        );
        let nack = Packet::Nack {
            slot: 1,
            sender: 1,
            target: 2,
            kind: StreamKind::Chat,
            seqs: vec![0; MAX_NACK_SEQS + 1],
        };
        assert_eq!(
            nack.to_vec(),
            Err(WireError::BadNackCount(MAX_NACK_SEQS + 1))
        );
    }

    #[test]
    fn replay_window_accepts_each_counter_once() {
        let mut w = ReplayWindow::default();
        for c in [5u64, 3, 7, 6, 4] {
            w.accept(c).unwrap();
        }
        for c in [3u64, 4, 5, 6, 7] {
            assert_eq!(w.check(c), Err(ReplayError::Duplicate(c)));
        }
        w.accept(7 + 200).unwrap();
        assert_eq!(w.check(7 + 200 - 128), Err(ReplayError::TooOld(79)));
        assert!(w.check(7 + 200 - 127).is_ok());
        assert!(w.check(8).is_err());
        assert!(w.accept(207).is_err());
    }

    #[test]
    fn replay_window_matches_a_set_model() {
        // A deterministic pseudo-random walk compared against an exact model.
        let mut w = ReplayWindow::default();
        let mut seen = std::collections::BTreeSet::new();
        let mut top: Option<u64> = None;
        let mut x = 0x9e37_79b9_u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let base = top.unwrap_or(1000);
            let ctr = (base + 20).saturating_sub(x % 200);
            let expect_ok = match top {
                None => true,
                Some(t) => ctr > t || (t - ctr < ReplayWindow::WIDTH && !seen.contains(&ctr)),
            };
            assert_eq!(w.accept(ctr).is_ok(), expect_ok, "ctr {ctr} top {top:?}");
            if expect_ok {
                seen.insert(ctr);
                top = Some(top.map_or(ctr, |t| t.max(ctr)));
            }
        }
    }
}
