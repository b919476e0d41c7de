//! The sans-IO SIP user agent: INVITE/ACK/BYE/CANCEL/OPTIONS transactions
//! and dialogs (RFC 3261 §12-§17), for one connector pod.
//!
//! Contract (as in str0m): the shell feeds `handle_message` (one framed
//! message and its source) or `handle_timeout(now)`, issues commands
//! (`invite`, `answer`, `reject`, `hangup`), and after every one of those
//! drains `poll_transmit` and `poll_event` before the next; `poll_timeout`
//! says when to call `handle_timeout` next. Time is only ever an input.
//!
//! Scope, stated plainly: requests go to the address the shell names (no
//! DNS/NAPTR, no Record-Route route sets), and re-INVITEs are answered with
//! the current session unchanged (no hold or codec change mid-call).

use crate::sip::auth::{Challenge, Credentials};
use crate::sip::message::{self, Message, ParseError};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

const T1: Duration = Duration::from_millis(500);
const T2: Duration = Duration::from_secs(4);
const TIMEOUT_64T1: Duration = Duration::from_secs(32);
/// How long an outgoing call may ring before we cancel it as "no answer".
pub const RING_TIMEOUT: Duration = Duration::from_secs(45);

/// Opaque handle of one call leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallRef(pub u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

impl Transport {
    fn via(self) -> &'static str {
        match self {
            Self::Udp => "UDP",
            Self::Tcp => "TCP",
            Self::Tls => "TLS",
        }
    }
    fn reliable(self) -> bool {
        self != Self::Udp
    }
}

#[derive(Debug, Clone)]
pub struct UaConfig {
    /// Address put in Via and Contact (what peers can reach).
    pub local: SocketAddr,
    pub transport: Transport,
    /// User part of our Contact and From.
    pub user: String,
    /// Display name in From on dial-out.
    pub display_name: String,
    pub credentials: Option<Credentials>,
    pub max_calls: usize,
    /// New INVITEs accepted per source address per second; more are dropped.
    pub invites_per_second: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A new call: answer or reject it.
    Incoming {
        call: CallRef,
        from: SocketAddr,
        /// The caller's URI (From header).
        caller: String,
        /// The caller's display name (From header), if it sent one.
        caller_name: Option<String>,
        /// User part of the Request-URI (the dialled number).
        dialled: Option<String>,
        offer: Vec<u8>,
    },
    /// Dial-out: the callee is ringing.
    Ringing { call: CallRef },
    /// Dial-out answered with this SDP.
    Answered { call: CallRef, answer: Vec<u8> },
    /// Dial-out failed (busy 486/600, no answer 408/487, other final codes).
    Failed {
        call: CallRef,
        code: u16,
        reason: String,
    },
    /// An established (or answered-but-unacknowledged) call ended.
    Ended { call: CallRef, why: EndReason },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    RemoteBye,
    LocalBye,
    Cancelled,
    /// No ACK for our 200, or no answer to our BYE.
    Timeout,
}

/// Counters exported as metrics by the shell.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UaStats {
    pub parse_errors: u64,
    pub rate_limited: u64,
    pub over_capacity: u64,
    pub unmatched: u64,
    pub retransmissions: u64,
}

#[derive(Debug, Clone)]
pub struct Transmit {
    pub to: SocketAddr,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// UAS: INVITE received, app deciding.
    Offered,
    /// UAS: final response sent, waiting for ACK (2xx or error).
    AwaitAck {
        ok: bool,
    },
    /// UAC: INVITE sent, no final response yet.
    Calling {
        ringing: bool,
    },
    /// UAC: CANCEL sent.
    Cancelling,
    Confirmed,
    /// BYE sent, waiting for its response.
    ByeSent,
}

#[derive(Debug)]
struct Retransmit {
    data: Vec<u8>,
    next: Instant,
    interval: Duration,
    cap: Duration,
    deadline: Instant,
}

#[derive(Debug)]
struct Call {
    call_id: String,
    local_tag: String,
    remote_tag: Option<String>,
    /// Our From/To header value (name-addr) without tag.
    local_party: String,
    remote_party: String,
    /// Request-URI for in-dialog requests (peer's Contact).
    remote_target: String,
    peer: SocketAddr,
    state: State,
    local_cseq: u32,
    /// UAS: the INVITE we answer. UAC: the INVITE we sent.
    invite: Message,
    last_response: Option<Vec<u8>>,
    retransmit: Option<Retransmit>,
    ring_deadline: Option<Instant>,
    auth_tried: bool,
    /// UAC: our SDP offer, replayed after an auth challenge.
    offer: Vec<u8>,
    /// SDP of our answer (UAS), replayed on re-INVITE.
    local_sdp: Vec<u8>,
}

#[derive(Debug)]
pub struct UserAgent {
    cfg: UaConfig,
    next_ref: u64,
    calls: HashMap<CallRef, Call>,
    by_call_id: HashMap<String, CallRef>,
    out: VecDeque<Transmit>,
    events: VecDeque<Event>,
    rate: HashMap<IpAddr, (Instant, u32)>,
    pub stats: UaStats,
}

fn random_token() -> String {
    let mut b = [0u8; 8];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    hex::encode(b)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UaError {
    #[error("no such call")]
    NoCall,
    #[error("call is not in a state that allows this")]
    WrongState,
    #[error("too many calls")]
    Capacity,
}

impl UserAgent {
    pub fn new(cfg: UaConfig) -> Self {
        Self {
            cfg,
            next_ref: 1,
            calls: HashMap::new(),
            by_call_id: HashMap::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            rate: HashMap::new(),
            stats: UaStats::default(),
        }
    }

    pub fn local(&self) -> SocketAddr {
        self.cfg.local
    }

    /// The address peers should use (Via, Contact), once the shell has bound.
    pub fn set_local(&mut self, local: SocketAddr) {
        self.cfg.local = local;
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    pub fn active_calls(&self) -> usize {
        self.calls.len()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.calls
            .values()
            .flat_map(|c| {
                let r = c.retransmit.as_ref().map(|r| r.next.min(r.deadline));
                [r, c.ring_deadline]
            })
            .flatten()
            .min()
    }

    fn contact(&self) -> String {
        // `sip:` with transport=tls rather than `sips:`: baresip/libre refuse
        // to route an ACK to a sips Contact (ENOSYS), and TLS is what matters.
        let t = match self.cfg.transport {
            Transport::Udp => "",
            Transport::Tcp => ";transport=tcp",
            Transport::Tls => ";transport=tls",
        };
        format!("<sip:{}@{}{t}>", self.cfg.user, self.cfg.local)
    }

    fn via(&self, branch: &str) -> String {
        format!(
            "SIP/2.0/{} {};branch={branch};rport",
            self.cfg.transport.via(),
            self.cfg.local
        )
    }

    fn send(&mut self, to: SocketAddr, data: Vec<u8>) {
        self.out.push_back(Transmit { to, data });
    }

    fn arm(&self, data: Vec<u8>, now: Instant, cap: Duration) -> Option<Retransmit> {
        // Reliable transports never retransmit; the deadline still applies
        // to the wait for ACK / response.
        let interval = if self.cfg.transport.reliable() {
            TIMEOUT_64T1
        } else {
            T1
        };
        Some(Retransmit {
            data,
            next: now + interval,
            interval,
            cap,
            deadline: now + TIMEOUT_64T1,
        })
    }

    fn new_ref(&mut self) -> CallRef {
        let r = CallRef(self.next_ref);
        self.next_ref += 1;
        r
    }

    /// Feed one framed message from `from`. Bad input is counted, never fatal.
    pub fn handle_message(&mut self, from: SocketAddr, data: &[u8], now: Instant) {
        let msg = match message::parse_datagram(data) {
            Ok(m) => m,
            Err(e) => {
                self.stats.parse_errors += 1;
                tracing::debug!(%from, error = %e, "dropped malformed SIP message");
                return;
            }
        };
        if msg.method().is_some() {
            self.on_request(from, msg, now);
        } else {
            self.on_response(msg, now);
        }
    }

    /// Count a framing error the shell met on a stream transport.
    pub fn note_parse_error(&mut self, _e: &ParseError) {
        self.stats.parse_errors += 1;
    }

    fn respond(&mut self, to: SocketAddr, req: &Message, code: u16, reason: &str) -> Vec<u8> {
        let mut r = Message::response_to(req, code, reason);
        if code > 100 && req.to_tag().is_none() {
            // Tag the To of responses that create or refuse a dialog.
            let tag = self
                .by_call_id
                .get(req.call_id())
                .and_then(|c| self.calls.get(c))
                .map(|c| c.local_tag.clone())
                .unwrap_or_else(random_token);
            for h in r.headers.iter_mut() {
                if h.0 == "To" {
                    h.1 = format!("{};tag={tag}", h.1);
                }
            }
        }
        let bytes = r.to_bytes();
        self.send(to, bytes.clone());
        bytes
    }

    fn rate_ok(&mut self, from: SocketAddr, now: Instant) -> bool {
        if self.rate.len() > 4096 {
            self.rate
                .retain(|_, (start, _)| now.duration_since(*start) < Duration::from_secs(1));
        }
        let e = self.rate.entry(from.ip()).or_insert((now, 0));
        if now.duration_since(e.0) >= Duration::from_secs(1) {
            *e = (now, 0);
        }
        e.1 += 1;
        e.1 <= self.cfg.invites_per_second
    }

    fn on_request(&mut self, from: SocketAddr, req: Message, now: Instant) {
        let method = req.method().unwrap_or_default().to_string();
        let existing = self.by_call_id.get(req.call_id()).copied();
        match (method.as_str(), existing) {
            ("INVITE", Some(r)) => self.on_invite_again(r, from, req, now),
            ("INVITE", None) => self.on_new_invite(from, req, now),
            ("ACK", Some(r)) => {
                if let Some(c) = self.calls.get_mut(&r)
                    && let State::AwaitAck { ok } = c.state
                {
                    c.retransmit = None;
                    if ok {
                        c.state = State::Confirmed;
                    } else {
                        self.remove(r);
                    }
                }
            }
            ("ACK", None) => self.stats.unmatched += 1,
            ("BYE", Some(r)) => {
                self.respond(from, &req, 200, "OK");
                let ended = self.calls.get(&r).is_some_and(|c| {
                    matches!(
                        c.state,
                        State::Confirmed | State::AwaitAck { ok: true } | State::ByeSent
                    )
                });
                self.remove(r);
                if ended {
                    self.events.push_back(Event::Ended {
                        call: r,
                        why: EndReason::RemoteBye,
                    });
                }
            }
            ("CANCEL", Some(r)) => {
                self.respond(from, &req, 200, "OK");
                if let Some(c) = self.calls.get(&r)
                    && c.state == State::Offered
                {
                    let invite = c.invite.clone();
                    let bytes = self.respond(from, &invite, 487, "Request Terminated");
                    let rt = self.arm(bytes.clone(), now, T2);
                    if let Some(c) = self.calls.get_mut(&r) {
                        c.state = State::AwaitAck { ok: false };
                        c.last_response = Some(bytes);
                        c.retransmit = rt;
                    }
                    self.events.push_back(Event::Ended {
                        call: r,
                        why: EndReason::Cancelled,
                    });
                }
            }
            ("BYE" | "CANCEL", None) => {
                self.stats.unmatched += 1;
                self.respond(from, &req, 481, "Call/Transaction Does Not Exist");
            }
            ("OPTIONS", _) => {
                let mut r = Message::response_to(&req, 200, "OK");
                r.push("Allow", "INVITE, ACK, BYE, CANCEL, OPTIONS");
                r.push("Accept", "application/sdp");
                self.send(from, r.to_bytes());
            }
            _ => {
                let mut r = Message::response_to(&req, 405, "Method Not Allowed");
                r.push("Allow", "INVITE, ACK, BYE, CANCEL, OPTIONS");
                self.send(from, r.to_bytes());
            }
        }
    }

    fn on_new_invite(&mut self, from: SocketAddr, req: Message, now: Instant) {
        if !self.rate_ok(from, now) {
            // Silently dropped: answering a flood would amplify it.
            self.stats.rate_limited += 1;
            return;
        }
        if req.to_tag().is_some() {
            self.stats.unmatched += 1;
            self.respond(from, &req, 481, "Call/Transaction Does Not Exist");
            return;
        }
        // Refused calls wait up to 32 s for an ACK that a flooder never sends:
        // they must not use up capacity for real calls, but are bounded too.
        let live = self
            .calls
            .values()
            .filter(|c| c.state != State::AwaitAck { ok: false })
            .count();
        if live >= self.cfg.max_calls || self.calls.len() >= 4 * self.cfg.max_calls + 64 {
            self.stats.over_capacity += 1;
            let mut r = Message::response_to(&req, 503, "Service Unavailable");
            r.push("Retry-After", "30");
            self.send(from, r.to_bytes());
            return;
        }
        let Some(remote_target) = req
            .header("Contact")
            .map(|c| message::header_uri(c).to_string())
        else {
            self.respond(from, &req, 400, "Missing Contact");
            return;
        };
        if !req
            .header("Content-Type")
            .is_some_and(|t| t.eq_ignore_ascii_case("application/sdp"))
            || req.body.is_empty()
        {
            // Offer-less INVITEs (offer in ACK) are not supported.
            self.respond(from, &req, 488, "Not Acceptable Here");
            return;
        }
        let r = self.new_ref();
        let from_hdr = req.header("From").unwrap_or_default();
        let caller = message::header_uri(from_hdr).to_string();
        let caller_name = message::display_name(from_hdr).map(str::to_string);
        let dialled = req
            .uri()
            .and_then(message::SipUri::parse)
            .and_then(|u| u.user);
        let call = Call {
            call_id: req.call_id().to_string(),
            local_tag: random_token(),
            remote_tag: req.from_tag().map(str::to_string),
            local_party: req.header("To").unwrap_or_default().to_string(),
            remote_party: strip_tag(from_hdr),
            remote_target,
            peer: from,
            state: State::Offered,
            local_cseq: rand::random::<u16>().into(),
            invite: req.clone(),
            last_response: None,
            retransmit: None,
            ring_deadline: None,
            auth_tried: false,
            offer: Vec::new(),
            local_sdp: Vec::new(),
        };
        self.by_call_id.insert(call.call_id.clone(), r);
        self.calls.insert(r, call);
        let trying = self.respond(from, &req, 100, "Trying");
        if let Some(c) = self.calls.get_mut(&r) {
            c.last_response = Some(trying);
        }
        self.events.push_back(Event::Incoming {
            call: r,
            from,
            caller,
            caller_name,
            dialled,
            offer: req.body,
        });
    }

    fn on_invite_again(&mut self, r: CallRef, from: SocketAddr, req: Message, now: Instant) {
        let Some(c) = self.calls.get(&r) else { return };
        if req.branch() == c.invite.branch() {
            // Retransmission: replay our last response.
            if let Some(last) = c.last_response.clone() {
                self.stats.retransmissions += 1;
                self.send(from, last);
            }
            return;
        }
        if c.state != State::Confirmed {
            self.respond(from, &req, 491, "Request Pending");
            return;
        }
        // re-INVITE: keep the session as it is.
        let sdp = c.local_sdp.clone();
        let contact = self.contact();
        let mut ok = Message::response_to(&req, 200, "OK");
        ok.push("Contact", contact);
        ok.push("Content-Type", "application/sdp");
        ok.body = sdp;
        let bytes = ok.to_bytes();
        self.send(from, bytes.clone());
        let rt = self.arm(bytes.clone(), now, T2);
        if let Some(c) = self.calls.get_mut(&r) {
            c.invite = req;
            c.last_response = Some(bytes);
            c.retransmit = rt;
            c.state = State::AwaitAck { ok: true };
        }
    }

    /// Answer an incoming call with our SDP.
    pub fn answer(&mut self, r: CallRef, sdp: Vec<u8>, now: Instant) -> Result<(), UaError> {
        let c = self.calls.get(&r).ok_or(UaError::NoCall)?;
        if c.state != State::Offered {
            return Err(UaError::WrongState);
        }
        let invite = c.invite.clone();
        let peer = c.peer;
        let contact = self.contact();
        let mut ok = Message::response_to(&invite, 200, "OK");
        let tag = c.local_tag.clone();
        for h in ok.headers.iter_mut() {
            if h.0 == "To" {
                h.1 = format!("{};tag={tag}", h.1);
            }
        }
        ok.push("Contact", contact);
        ok.push("Allow", "INVITE, ACK, BYE, CANCEL, OPTIONS");
        ok.push("Content-Type", "application/sdp");
        ok.body = sdp.clone();
        let bytes = ok.to_bytes();
        self.send(peer, bytes.clone());
        let rt = self.arm(bytes.clone(), now, T2);
        let c = self.calls.get_mut(&r).ok_or(UaError::NoCall)?;
        c.state = State::AwaitAck { ok: true };
        c.last_response = Some(bytes);
        c.retransmit = rt;
        c.local_sdp = sdp;
        Ok(())
    }

    /// Refuse an incoming call. `warning` (e.g. "SRTP required") travels in a
    /// Warning header so the caller's logs say why.
    pub fn reject(
        &mut self,
        r: CallRef,
        code: u16,
        reason: &str,
        warning: Option<&str>,
        now: Instant,
    ) -> Result<(), UaError> {
        let c = self.calls.get(&r).ok_or(UaError::NoCall)?;
        if c.state != State::Offered {
            return Err(UaError::WrongState);
        }
        let (invite, peer, tag) = (c.invite.clone(), c.peer, c.local_tag.clone());
        let mut resp = Message::response_to(&invite, code, reason);
        for h in resp.headers.iter_mut() {
            if h.0 == "To" {
                h.1 = format!("{};tag={tag}", h.1);
            }
        }
        if let Some(w) = warning {
            let w: String = w.chars().filter(|c| *c != '"' && !c.is_control()).collect();
            resp.push("Warning", format!("399 conclave \"{w}\""));
        }
        let bytes = resp.to_bytes();
        self.send(peer, bytes.clone());
        let rt = self.arm(bytes.clone(), now, T2);
        let c = self.calls.get_mut(&r).ok_or(UaError::NoCall)?;
        c.state = State::AwaitAck { ok: false };
        c.last_response = Some(bytes);
        c.retransmit = rt;
        Ok(())
    }

    /// Dial out: INVITE `target_uri` via `peer`.
    pub fn invite(
        &mut self,
        peer: SocketAddr,
        target_uri: &str,
        offer: Vec<u8>,
        now: Instant,
    ) -> Result<CallRef, UaError> {
        if self.calls.len() >= self.cfg.max_calls {
            return Err(UaError::Capacity);
        }
        let r = self.new_ref();
        let name = self.cfg.display_name.replace('"', "");
        let call = Call {
            call_id: format!("{}@conclave", random_token()),
            local_tag: random_token(),
            remote_tag: None,
            local_party: format!("\"{name}\" <sip:{}@{}>", self.cfg.user, self.cfg.local),
            remote_party: format!("<{target_uri}>"),
            remote_target: target_uri.to_string(),
            peer,
            state: State::Calling { ringing: false },
            local_cseq: 1,
            invite: Message::request("INVITE", target_uri),
            last_response: None,
            retransmit: None,
            ring_deadline: Some(now + RING_TIMEOUT),
            auth_tried: false,
            offer,
            local_sdp: Vec::new(),
        };
        self.by_call_id.insert(call.call_id.clone(), r);
        self.calls.insert(r, call);
        self.send_invite(r, None, now);
        Ok(r)
    }

    fn build_request(&self, c: &Call, method: &str, cseq: u32, branch: &str) -> Message {
        let mut m = Message::request(method, &c.remote_target);
        m.push("Via", self.via(branch));
        m.push("Max-Forwards", "70");
        m.push("From", format!("{};tag={}", c.local_party, c.local_tag));
        m.push(
            "To",
            match &c.remote_tag {
                Some(t) => format!("{};tag={t}", c.remote_party),
                None => c.remote_party.clone(),
            },
        );
        m.push("Call-ID", c.call_id.clone());
        m.push("CSeq", format!("{cseq} {method}"));
        m.push("User-Agent", "conclave-connector");
        m
    }

    fn send_invite(&mut self, r: CallRef, authorization: Option<(&str, String)>, now: Instant) {
        let Some(c) = self.calls.get(&r) else { return };
        let mut m = self.build_request(
            c,
            "INVITE",
            c.local_cseq,
            &format!("z9hG4bK{}", random_token()),
        );
        m.push("Contact", self.contact());
        m.push("Allow", "INVITE, ACK, BYE, CANCEL, OPTIONS");
        if let Some((h, v)) = authorization {
            m.push(h, v);
        }
        m.push("Content-Type", "application/sdp");
        m.body = c.offer.clone();
        let bytes = m.to_bytes();
        let peer = c.peer;
        self.send(peer, bytes.clone());
        let rt = self.arm(bytes, now, T2);
        if let Some(c) = self.calls.get_mut(&r) {
            c.invite = m;
            c.retransmit = rt;
        }
    }

    /// Hang up: BYE an established call, CANCEL a ringing one.
    pub fn hangup(&mut self, r: CallRef, now: Instant) -> Result<(), UaError> {
        let c = self.calls.get(&r).ok_or(UaError::NoCall)?;
        match c.state {
            State::Confirmed | State::AwaitAck { ok: true } => {
                let cseq = c.local_cseq + 1;
                let m = self.build_request(c, "BYE", cseq, &format!("z9hG4bK{}", random_token()));
                let bytes = m.to_bytes();
                let peer = c.peer;
                self.send(peer, bytes.clone());
                let rt = self.arm(bytes, now, T2);
                let c = self.calls.get_mut(&r).ok_or(UaError::NoCall)?;
                c.local_cseq = cseq;
                c.state = State::ByeSent;
                c.retransmit = rt;
                Ok(())
            }
            State::Calling { .. } => {
                self.send_cancel(r, now);
                Ok(())
            }
            State::Offered => self.reject(r, 603, "Decline", None, now),
            _ => Err(UaError::WrongState),
        }
    }

    fn send_cancel(&mut self, r: CallRef, now: Instant) {
        let Some(c) = self.calls.get(&r) else { return };
        let mut m = Message::request("CANCEL", c.invite.uri().unwrap_or_default());
        for h in ["Via", "From", "To", "Call-ID"] {
            if let Some(v) = c.invite.header(h) {
                m.push(h, v);
            }
        }
        m.push("CSeq", format!("{} CANCEL", c.local_cseq));
        m.push("Max-Forwards", "70");
        let bytes = m.to_bytes();
        let peer = c.peer;
        self.send(peer, bytes.clone());
        let rt = self.arm(bytes, now, T2);
        if let Some(c) = self.calls.get_mut(&r) {
            c.state = State::Cancelling;
            c.retransmit = rt;
            c.ring_deadline = None;
        }
    }

    fn ack(&mut self, r: CallRef, resp: &Message, ok: bool) {
        let Some(c) = self.calls.get(&r) else { return };
        let mut m = if ok {
            // 2xx ACK is its own transaction, sent to the dialog's target.
            let target = resp
                .header("Contact")
                .map(|h| message::header_uri(h).to_string())
                .unwrap_or_else(|| c.remote_target.clone());
            let mut m = Message::request("ACK", &target);
            m.push("Via", self.via(&format!("z9hG4bK{}", random_token())));
            m
        } else {
            let mut m = Message::request("ACK", c.invite.uri().unwrap_or_default());
            m.push("Via", c.invite.header("Via").unwrap_or_default());
            m
        };
        m.push("Max-Forwards", "70");
        m.push("From", format!("{};tag={}", c.local_party, c.local_tag));
        m.push("To", resp.header("To").unwrap_or_default());
        m.push("Call-ID", c.call_id.clone());
        m.push("CSeq", format!("{} ACK", c.local_cseq));
        let peer = c.peer;
        let bytes = m.to_bytes();
        self.send(peer, bytes.clone());
        if ok && let Some(c) = self.calls.get_mut(&r) {
            // Replayed when the 2xx is retransmitted.
            c.last_response = Some(bytes);
        }
    }

    fn on_response(&mut self, resp: Message, now: Instant) {
        let Some(&r) = self.by_call_id.get(resp.call_id()) else {
            self.stats.unmatched += 1;
            return;
        };
        let Some(code) = resp.code() else { return };
        let Some((cseq, method)) = resp.cseq() else {
            return;
        };
        let Some(c) = self.calls.get_mut(&r) else {
            return;
        };
        let method = method.to_string();
        match (method.as_str(), c.state) {
            ("INVITE", State::Calling { .. } | State::Cancelling) if cseq == c.local_cseq => {
                if code < 200 {
                    // Proceeding: the callee has it; only the ring timeout applies now.
                    if c.state != State::Cancelling {
                        c.retransmit = None;
                    }
                    if (code == 180 || code == 183)
                        && c.state == (State::Calling { ringing: false })
                    {
                        c.state = State::Calling { ringing: true };
                        self.events.push_back(Event::Ringing { call: r });
                    }
                    return;
                }
                if (200..300).contains(&code) {
                    c.remote_tag = resp.to_tag().map(str::to_string);
                    if let Some(ct) = resp.header("Contact") {
                        c.remote_target = message::header_uri(ct).to_string();
                    }
                    c.retransmit = None;
                    c.ring_deadline = None;
                    let was_cancelling = c.state == State::Cancelling;
                    c.state = State::Confirmed;
                    self.ack(r, &resp, true);
                    if was_cancelling {
                        // 200 raced our CANCEL: the call exists, end it properly.
                        let _ = self.hangup(r, now);
                    } else {
                        self.events.push_back(Event::Answered {
                            call: r,
                            answer: resp.body,
                        });
                    }
                    return;
                }
                self.ack(r, &resp, false);
                if (code == 401 || code == 407)
                    && !c_auth_tried(&self.calls, r)
                    && let Some(creds) = self.cfg.credentials.clone()
                {
                    let (challenge_h, answer_h) = if code == 401 {
                        ("WWW-Authenticate", "Authorization")
                    } else {
                        ("Proxy-Authenticate", "Proxy-Authorization")
                    };
                    if let Some(ch) = resp
                        .headers_named(challenge_h)
                        .filter_map(|v| Challenge::parse(v).ok())
                        .max_by_key(|c| c.algorithm == crate::sip::auth::Algorithm::Sha256)
                    {
                        let Some(c) = self.calls.get_mut(&r) else {
                            return;
                        };
                        c.auth_tried = true;
                        c.local_cseq += 1;
                        let uri = c.remote_target.clone();
                        let value = ch.answer(&creds, "INVITE", &uri, 1, &random_token());
                        self.send_invite(r, Some((answer_h, value)), now);
                        return;
                    }
                }
                let reason = match &resp.start {
                    message::StartLine::Response { reason, .. } => reason.clone(),
                    _ => String::new(),
                };
                self.remove(r);
                self.events.push_back(Event::Failed {
                    call: r,
                    code,
                    reason,
                });
            }
            ("INVITE", State::Confirmed | State::ByeSent) if (200..300).contains(&code) => {
                // Retransmitted 2xx: our ACK was lost.
                if let Some(ack) = c.last_response.clone() {
                    let peer = c.peer;
                    self.stats.retransmissions += 1;
                    self.send(peer, ack);
                }
            }
            ("BYE", State::ByeSent) if code >= 200 => {
                self.remove(r);
                self.events.push_back(Event::Ended {
                    call: r,
                    why: EndReason::LocalBye,
                });
            }
            ("CANCEL", State::Cancelling) if code >= 200 => {
                // Stop resending CANCEL; keep the deadline for the INVITE's 487.
                if let Some(rt) = c.retransmit.as_mut() {
                    rt.next = rt.deadline;
                }
            }
            ("CANCEL", _) => {}
            _ => self.stats.unmatched += 1,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<CallRef> = self
            .calls
            .iter()
            .filter(|(_, c)| {
                c.retransmit
                    .as_ref()
                    .is_some_and(|r| r.next <= now || r.deadline <= now)
                    || c.ring_deadline.is_some_and(|d| d <= now)
            })
            .map(|(r, _)| *r)
            .collect();
        for r in due {
            let Some(c) = self.calls.get_mut(&r) else {
                continue;
            };
            if c.ring_deadline.is_some_and(|d| d <= now) {
                c.ring_deadline = None;
                self.send_cancel(r, now);
                continue;
            }
            let Some(rt) = c.retransmit.as_mut() else {
                continue;
            };
            if rt.deadline <= now {
                let state = c.state;
                self.remove(r);
                let ev = match state {
                    State::Calling { .. } | State::Cancelling => Event::Failed {
                        call: r,
                        code: 408,
                        reason: "Request Timeout".into(),
                    },
                    State::AwaitAck { ok: false } | State::Offered => continue,
                    _ => Event::Ended {
                        call: r,
                        why: EndReason::Timeout,
                    },
                };
                self.events.push_back(ev);
                continue;
            }
            let data = rt.data.clone();
            rt.interval = (rt.interval * 2).min(rt.cap);
            rt.next = now + rt.interval;
            let peer = c.peer;
            self.stats.retransmissions += 1;
            self.send(peer, data);
        }
    }

    fn remove(&mut self, r: CallRef) {
        if let Some(c) = self.calls.remove(&r) {
            self.by_call_id.remove(&c.call_id);
        }
    }
}

fn c_auth_tried(calls: &HashMap<CallRef, Call>, r: CallRef) -> bool {
    calls.get(&r).is_none_or(|c| c.auth_tried)
}

fn strip_tag(v: &str) -> String {
    match v.find(";tag=") {
        Some(i) if v[..i].contains('>') || !v.contains('<') => v[..i].to_string(),
        _ => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ua(port: u16, creds: Option<Credentials>) -> UserAgent {
        UserAgent::new(UaConfig {
            local: SocketAddr::from(([127, 0, 0, 1], port)),
            transport: Transport::Udp,
            user: format!("u{port}"),
            display_name: "Conclave".into(),
            credentials: creds,
            max_calls: 4,
            invites_per_second: 5,
        })
    }

    /// Deliver everything both sides want to send; `drop_first` loses that
    /// many datagrams first (to exercise retransmission).
    fn pump(a: &mut UserAgent, b: &mut UserAgent, now: Instant, mut drop_first: usize) -> usize {
        let mut delivered = 0;
        loop {
            let mut moved = false;
            for dir in 0..2 {
                let (src, dst) = if dir == 0 {
                    (&mut *a, &mut *b)
                } else {
                    (&mut *b, &mut *a)
                };
                while let Some(t) = src.poll_transmit() {
                    moved = true;
                    if drop_first > 0 {
                        drop_first -= 1;
                        continue;
                    }
                    assert_eq!(t.to, dst.cfg.local);
                    delivered += 1;
                    dst.handle_message(src.cfg.local, &t.data, now);
                }
            }
            if !moved {
                return delivered;
            }
        }
    }

    fn events(u: &mut UserAgent) -> Vec<Event> {
        std::iter::from_fn(|| u.poll_event()).collect()
    }

    #[test]
    fn call_answer_and_bye_with_lost_invite_and_lost_ok() {
        let (mut a, mut b) = (ua(5060, None), ua(5070, None));
        let mut now = Instant::now();
        let call = a
            .invite(
                b.cfg.local,
                "sip:+1555@127.0.0.1:5070",
                b"v=0 offer".to_vec(),
                now,
            )
            .unwrap();
        pump(&mut a, &mut b, now, 1); // INVITE lost
        assert!(events(&mut b).is_empty());
        now = a.poll_timeout().unwrap();
        a.handle_timeout(now);
        pump(&mut a, &mut b, now, 0);
        let Event::Incoming {
            call: inc,
            caller,
            caller_name,
            dialled,
            offer,
            ..
        } = events(&mut b).remove(0)
        else {
            panic!("no incoming call")
        };
        assert_eq!(
            (caller_name.as_deref(), dialled.as_deref(), offer.as_slice()),
            (Some("Conclave"), Some("+1555"), &b"v=0 offer"[..])
        );
        assert!(caller.starts_with("sip:u"), "the From URI: {caller}");
        b.answer(inc, b"v=0 answer".to_vec(), now).unwrap();
        pump(&mut a, &mut b, now, 1); // 200 OK lost
        assert!(events(&mut a).is_empty());
        now = b.poll_timeout().unwrap();
        b.handle_timeout(now);
        pump(&mut a, &mut b, now, 0);
        assert_eq!(
            events(&mut a),
            vec![Event::Answered {
                call,
                answer: b"v=0 answer".to_vec()
            }]
        );
        assert!(
            b.poll_timeout().is_none(),
            "ACK stopped the 200 retransmissions"
        );
        assert!(b.stats.retransmissions >= 1);
        b.hangup(inc, now).unwrap();
        pump(&mut a, &mut b, now, 0);
        assert_eq!(
            events(&mut a),
            vec![Event::Ended {
                call,
                why: EndReason::RemoteBye
            }]
        );
        assert_eq!(
            events(&mut b),
            vec![Event::Ended {
                call: inc,
                why: EndReason::LocalBye
            }]
        );
        assert_eq!((a.active_calls(), b.active_calls()), (0, 0));
    }

    #[test]
    fn digest_challenge_is_answered_once() {
        let (mut a, mut trunk) = (
            ua(5060, Some(Credentials::new("alice", "pw"))),
            ua(5080, None),
        );
        let now = Instant::now();
        let call = a
            .invite(
                trunk.cfg.local,
                "sip:+1555@127.0.0.1:5080",
                b"v=0".to_vec(),
                now,
            )
            .unwrap();
        // The "trunk" challenges by hand.
        let t = a.poll_transmit().unwrap();
        let inv = message::parse_datagram(&t.data).unwrap();
        assert!(inv.header("Authorization").is_none());
        let mut chal = Message::response_to(&inv, 407, "Proxy Authentication Required");
        chal.push(
            "Proxy-Authenticate",
            "Digest realm=\"pbx\", nonce=\"abc\", algorithm=SHA-256, qop=\"auth\"",
        );
        a.handle_message(trunk.cfg.local, &chal.to_bytes(), now);
        let ack = message::parse_datagram(&a.poll_transmit().unwrap().data).unwrap();
        assert_eq!(ack.method(), Some("ACK"));
        let inv2 = message::parse_datagram(&a.poll_transmit().unwrap().data).unwrap();
        let auth = inv2.header("Proxy-Authorization").unwrap();
        assert!(
            auth.contains("username=\"alice\"") && auth.contains("algorithm=SHA-256"),
            "{auth}"
        );
        assert_eq!(inv2.cseq().unwrap().0, inv.cseq().unwrap().0 + 1);
        // A second challenge fails the call instead of looping.
        let chal2 = {
            let mut m = Message::response_to(&inv2, 407, "Proxy Authentication Required");
            m.push("Proxy-Authenticate", "Digest realm=\"pbx\", nonce=\"def\"");
            m
        };
        a.handle_message(trunk.cfg.local, &chal2.to_bytes(), now);
        assert_eq!(
            events(&mut a),
            vec![Event::Failed {
                call,
                code: 407,
                reason: "Proxy Authentication Required".into()
            }]
        );
        let _ = trunk.poll_event();
    }

    #[test]
    fn busy_no_answer_and_cancel() {
        let (mut a, mut b) = (ua(5060, None), ua(5070, None));
        let now = Instant::now();
        let busy = a
            .invite(b.cfg.local, "sip:x@127.0.0.1:5070", b"v=0".to_vec(), now)
            .unwrap();
        pump(&mut a, &mut b, now, 0);
        let Event::Incoming { call, .. } = events(&mut b).remove(0) else {
            panic!()
        };
        b.reject(call, 486, "Busy Here", None, now).unwrap();
        pump(&mut a, &mut b, now, 0);
        assert_eq!(
            events(&mut a),
            vec![Event::Failed {
                call: busy,
                code: 486,
                reason: "Busy Here".into()
            }]
        );
        assert_eq!(b.active_calls(), 0, "ACK closed the server transaction");

        // Nobody answers: the ring timeout cancels.
        let ring = a
            .invite(b.cfg.local, "sip:x@127.0.0.1:5070", b"v=0".to_vec(), now)
            .unwrap();
        pump(&mut a, &mut b, now, 0);
        let Event::Incoming { call: inc, .. } = events(&mut b).remove(0) else {
            panic!()
        };
        let later = now + RING_TIMEOUT;
        a.handle_timeout(later);
        pump(&mut a, &mut b, later, 0);
        assert_eq!(
            events(&mut b),
            vec![Event::Ended {
                call: inc,
                why: EndReason::Cancelled
            }]
        );
        assert_eq!(
            events(&mut a),
            vec![Event::Failed {
                call: ring,
                code: 487,
                reason: "Request Terminated".into()
            }]
        );
        assert_eq!((a.active_calls(), b.active_calls()), (0, 0));
    }

    #[test]
    fn unanswered_invite_times_out() {
        let mut a = ua(5060, None);
        let mut now = Instant::now();
        let call = a
            .invite(
                SocketAddr::from(([127, 0, 0, 1], 9)),
                "sip:x@127.0.0.1:9",
                b"v=0".to_vec(),
                now,
            )
            .unwrap();
        let mut sent = 0;
        while let Some(t) = a.poll_timeout() {
            while a.poll_transmit().is_some() {
                sent += 1;
            }
            now = t;
            a.handle_timeout(now);
        }
        assert!(sent >= 6, "Timer A retransmissions: {sent}");
        assert_eq!(
            events(&mut a),
            vec![Event::Failed {
                call,
                code: 408,
                reason: "Request Timeout".into()
            }]
        );
    }

    #[test]
    fn refused_calls_awaiting_ack_do_not_hold_capacity() {
        let (mut a, mut b) = (ua(5060, None), ua(5070, None));
        let now = Instant::now();
        for _ in 0..4 {
            a.invite(b.cfg.local, "sip:x@127.0.0.1:5070", b"v=0".to_vec(), now)
                .unwrap();
        }
        // Deliver only the INVITEs; b refuses each and never hears an ACK.
        while let Some(t) = a.poll_transmit() {
            b.handle_message(a.cfg.local, &t.data, now);
        }
        for e in events(&mut b) {
            let Event::Incoming { call, .. } = e else {
                panic!()
            };
            b.reject(call, 488, "Not Acceptable Here", Some("bad"), now)
                .unwrap();
        }
        let fresh = ua(5080, None);
        let mut c = fresh;
        c.invite(b.cfg.local, "sip:x@127.0.0.1:5070", b"v=0".to_vec(), now)
            .unwrap();
        let t = c.poll_transmit().unwrap();
        b.handle_message(c.cfg.local, &t.data, now);
        assert_eq!(b.stats.over_capacity, 0);
        assert!(matches!(
            events(&mut b).as_slice(),
            [Event::Incoming { .. }]
        ));
    }

    #[test]
    fn floods_and_garbage_are_counted_not_fatal() {
        let mut b = ua(5070, None);
        let now = Instant::now();
        let src = SocketAddr::from(([127, 0, 0, 1], 6000));
        for i in 0..50 {
            let mut m = Message::request("INVITE", "sip:x@127.0.0.1");
            m.push(
                "Via",
                format!("SIP/2.0/UDP 127.0.0.1:6000;branch=z9hG4bK{i}"),
            );
            m.push("From", format!("<sip:f@127.0.0.1>;tag={i}"));
            m.push("To", "<sip:x@127.0.0.1>");
            m.push("Call-ID", format!("flood{i}"));
            m.push("CSeq", "1 INVITE");
            m.push("Contact", "<sip:f@127.0.0.1:6000>");
            m.push("Content-Type", "application/sdp");
            m.body = b"v=0".to_vec();
            b.handle_message(src, &m.to_bytes(), now);
        }
        b.handle_message(src, b"\x00\x01garbage", now);
        b.handle_message(src, &[b'X'; 70000], now);
        assert_eq!(b.active_calls(), 4, "max_calls");
        assert_eq!(
            b.stats.over_capacity, 1,
            "5 per second, the 5th refused for capacity"
        );
        assert_eq!(b.stats.rate_limited, 45);
        assert_eq!(b.stats.parse_errors, 2);
        let refused: Vec<_> = std::iter::from_fn(|| b.poll_transmit())
            .filter_map(|t| message::parse_datagram(&t.data).ok()?.code())
            .collect();
        assert_eq!(refused.iter().filter(|c| **c == 503).count(), 1);
        assert_eq!(refused.iter().filter(|c| **c == 100).count(), 4);
    }
}
