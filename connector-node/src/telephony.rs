//! Telephony and room-system connectors: turns SIP calls into phone legs.
//!
//! Each answered or placed call becomes a [`PhoneLeg`]: 8 kHz, 20 ms PCM
//! frames to and from the phone, the meeting it belongs to, and a signal
//! when it ends. The meeting side (join with role `connector:telephony`,
//! mix minus the caller, Opus + SFrame) consumes legs; this module owns the
//! SIP signalling and the RTP/SRTP media of the phone side.

use crate::media::dtmf::DtmfReceiver;
use crate::media::jitter::JitterBuffer;
use crate::media::peer::RtpPeer;
use crate::media::srtp::SrtpContext;
use crate::media::{g711, rtp};
use crate::metrics::Metrics;
use crate::sip::sdp::{self, Codec, Local, Negotiated, SrtpKey};
use crate::sip::transport::{Command, SipHandle};
use crate::sip::ua::{CallRef, EndReason, Event, UaStats};
use meeting_proto::config::connector::SrtpPolicy;
use meeting_proto::ids::MeetingId;
use meeting_proto::kms_api::{InvitationOutcome, OutcomeState};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};

/// Samples per 20 ms frame at 8 kHz.
pub const FRAME: usize = 160;
/// How long a caller has to enter a meeting number by DTMF.
const DTMF_ENTRY_TIMEOUT: Duration = Duration::from_secs(30);
/// No RTP from the phone for this long: the leg is dead, hang up.
pub const DEFAULT_MEDIA_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    DialIn,
    DialOut,
}

/// What was negotiated for the phone leg (for status and logs; no keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegInfo {
    pub codec: Codec,
    pub srtp: Option<&'static str>,
    pub remote: SocketAddr,
}

/// One phone call, connected to one meeting.
#[derive(Debug)]
pub struct PhoneLeg {
    pub call: CallRef,
    pub direction: Direction,
    /// Roster name: "Phone <caller>" or the room system's display name.
    pub display_name: String,
    pub meeting: MeetingId,
    pub info: LegInfo,
    /// Audio for the phone (8 kHz mono, 160-sample frames).
    pub to_phone: mpsc::Sender<Vec<i16>>,
    /// Audio from the phone, after jitter buffering and concealment.
    pub from_phone: mpsc::Receiver<Vec<i16>>,
    /// Becomes true when the call has ended (either side).
    pub ended: watch::Receiver<bool>,
}

#[derive(Debug, Clone)]
pub struct TelephonySettings {
    /// Address RTP sockets bind to and SDP advertises.
    pub media_ip: IpAddr,
    pub srtp: SrtpPolicy,
    pub dial_in: BTreeMap<String, MeetingId>,
    /// Prefix of roster names ("Phone" for telephony; room systems use their SIP display name).
    pub name_prefix: Option<String>,
    /// A leg without RTP from the phone for this long is hung up (the phone
    /// died without a BYE), which also takes it out of the meeting.
    pub media_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("SIP endpoint is gone")]
    Gone,
    #[error("could not place the call: {0}")]
    Local(String),
    #[error("the callee is busy ({0})")]
    Busy(u16),
    #[error("no answer ({0})")]
    NoAnswer(u16),
    #[error("call failed: {code} {reason}")]
    Failed { code: u16, reason: String },
    #[error("the callee's answer is unusable: {0}")]
    Sdp(#[from] sdp::SdpError),
}

impl DialError {
    /// What the host is told: the SIP final response picks the code (a ring
    /// timeout or a transaction timeout is no answer); the text never names
    /// the callee.
    pub fn outcome(&self) -> InvitationOutcome {
        let failed = |code: &str, status: Option<u16>, message: &str| {
            InvitationOutcome::new(OutcomeState::Failed, code, status, message)
        };
        match self {
            Self::Busy(c) => failed("busy", Some(*c), "the callee is busy"),
            Self::NoAnswer(c) => failed("no_answer", Some(*c), "nobody answered"),
            Self::Failed { code, reason } => {
                let kind = match code {
                    401 | 403 | 407 | 603 | 606 => "rejected",
                    404 | 410 | 484 | 604 => "not_found",
                    _ => "call_failed",
                };
                failed(kind, Some(*code), reason)
            }
            Self::Sdp(sdp::SdpError::BadLine(_)) => failed(
                "media_refused",
                None,
                "the callee's SDP answer is malformed",
            ),
            Self::Sdp(e) => failed("media_refused", None, &e.to_string()),
            Self::Local(_) | Self::Gone => failed(
                "unreachable",
                None,
                "the call could not be placed (SIP transport failed)",
            ),
        }
    }
}

enum Control {
    Dial {
        peer: SocketAddr,
        uri: String,
        meeting: MeetingId,
        reply: oneshot::Sender<Result<PhoneLeg, DialError>>,
    },
    Hangup(CallRef),
    /// The connector is stopping: end every call, answered or still ringing.
    HangupAll,
}

/// Handle for dial-out requests (from the host, through the KMS).
#[derive(Debug, Clone)]
pub struct Telephony {
    control: mpsc::Sender<Control>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Control::Dial { uri, .. } => write!(f, "Dial({uri})"),
            Control::Hangup(c) => write!(f, "Hangup({c:?})"),
            Control::HangupAll => f.write_str("HangupAll"),
        }
    }
}

impl Telephony {
    /// Call `uri` through `peer` (the trunk or the device itself) and, once
    /// answered, return the leg for `meeting`.
    pub async fn dial(
        &self,
        peer: SocketAddr,
        uri: &str,
        meeting: MeetingId,
    ) -> Result<PhoneLeg, DialError> {
        let (reply, rx) = oneshot::channel();
        self.control
            .send(Control::Dial {
                peer,
                uri: uri.to_string(),
                meeting,
                reply,
            })
            .await
            .map_err(|_| DialError::Gone)?;
        rx.await.map_err(|_| DialError::Gone)?
    }

    /// End a call (the host removed the phone, or the meeting ended).
    pub async fn hangup(&self, call: CallRef) {
        let _ = self.control.send(Control::Hangup(call)).await;
    }

    /// End every call (BYE, or CANCEL while ringing): the connector is stopping.
    pub async fn hangup_all(&self) {
        let _ = self.control.send(Control::HangupAll).await;
    }
}

struct Pending {
    meeting: MeetingId,
    local: Local,
    socket: UdpSocket,
    uri: String,
    reply: oneshot::Sender<Result<PhoneLeg, DialError>>,
}

/// Run the telephony service over a SIP endpoint. New legs go to `legs`.
pub fn start(
    sip: SipHandle,
    mut events: mpsc::Receiver<Event>,
    settings: TelephonySettings,
    metrics: Arc<Metrics>,
    legs: mpsc::Sender<PhoneLeg>,
) -> Telephony {
    let (control_tx, mut control_rx) = mpsc::channel::<Control>(16);
    let mut stats = sip.stats.clone();
    let m = metrics.clone();
    tokio::spawn(async move {
        let mut seen = UaStats::default();
        while stats.changed().await.is_ok() {
            let now = *stats.borrow_and_update();
            m.sip_rejected("malformed", now.parse_errors - seen.parse_errors);
            m.sip_rejected("rateLimited", now.rate_limited - seen.rate_limited);
            m.sip_rejected("overCapacity", now.over_capacity - seen.over_capacity);
            m.sip_rejected("unmatched", now.unmatched - seen.unmatched);
            seen = now;
        }
    });
    tokio::spawn(async move {
        let mut live: HashMap<CallRef, watch::Sender<bool>> = HashMap::new();
        let mut pending: HashMap<CallRef, Pending> = HashMap::new();
        let mut control_open = true;
        loop {
            tokio::select! {
                c = control_rx.recv(), if control_open => {
                    let (peer, uri, meeting, reply) = match c {
                        Some(Control::Dial { peer, uri, meeting, reply }) => (peer, uri, meeting, reply),
                        Some(Control::Hangup(call)) => {
                            let _ = sip.commands.send(Command::Hangup(call)).await;
                            continue;
                        }
                        Some(Control::HangupAll) => {
                            for call in live.keys().chain(pending.keys()).copied().collect::<Vec<_>>() {
                                let _ = sip.commands.send(Command::Hangup(call)).await;
                            }
                            continue;
                        }
                        None => {
                            control_open = false;
                            continue;
                        }
                    };
                    let socket = match UdpSocket::bind((settings.media_ip, 0)).await {
                        Ok(s) => s,
                        Err(e) => { let _ = reply.send(Err(DialError::Local(e.to_string()))); continue; }
                    };
                    let Ok(port) = socket.local_addr().map(|a| a.port()) else { continue };
                    let local = local_for(&settings, port);
                    let (tx, rx) = oneshot::channel();
                    let cmd = Command::Invite { peer, uri: uri.clone(), offer: local.offer(), reply: tx };
                    if sip.commands.send(cmd).await.is_err() {
                        let _ = reply.send(Err(DialError::Gone));
                        continue;
                    }
                    match rx.await {
                        Ok(Ok(call)) => {
                            metrics.calls_started("dialOut");
                            pending.insert(call, Pending { meeting, local, socket, uri, reply });
                        }
                        Ok(Err(e)) => { let _ = reply.send(Err(DialError::Local(e.to_string()))); }
                        Err(_) => { let _ = reply.send(Err(DialError::Gone)); }
                    }
                }
                e = events.recv() => {
                    let Some(e) = e else { break };
                    match e {
                        Event::Incoming { call, caller, caller_name, dialled, offer, .. } => {
                            metrics.calls_started("dialIn");
                            let name = leg_name(settings.name_prefix.as_deref(), &caller, caller_name.as_deref());
                            incoming(&sip, &settings, &metrics, &legs, &mut live, call, name, dialled, &offer).await;
                        }
                        Event::Ringing { .. } => {}
                        Event::Answered { call, answer } => {
                            let Some(p) = pending.remove(&call) else { continue };
                            let neg = sdp::parse(&answer).and_then(|a| p.local.accept_answer(&a));
                            match neg {
                                Ok(neg) => {
                                    let name = leg_name(settings.name_prefix.as_deref(), &p.uri, None);
                                    let (leg, end_tx) = start_media(call, Direction::DialOut, name, p.meeting, p.socket, neg, &sip, &metrics, None, settings.media_timeout);
                                    live.insert(call, end_tx);
                                    if let Some(leg) = leg {
                                        let _ = p.reply.send(Ok(leg));
                                    }
                                }
                                Err(err) => {
                                    metrics.call_refused(refusal_label(&err));
                                    let _ = sip.commands.send(Command::Hangup(call)).await;
                                    let _ = p.reply.send(Err(err.into()));
                                }
                            }
                        }
                        Event::Failed { call, code, reason } => {
                            let Some(p) = pending.remove(&call) else { continue };
                            metrics.call_failed(code);
                            let err = match code {
                                486 | 600 => DialError::Busy(code),
                                408 | 480 | 487 => DialError::NoAnswer(code),
                                _ => DialError::Failed { code, reason },
                            };
                            let _ = p.reply.send(Err(err));
                        }
                        Event::Ended { call, why } => {
                            if let Some(tx) = live.remove(&call) {
                                let _ = tx.send(true);
                            }
                            metrics.call_ended(match why {
                                EndReason::RemoteBye => "remoteBye",
                                EndReason::LocalBye => "localBye",
                                EndReason::Cancelled => "cancelled",
                                EndReason::Timeout => "timeout",
                            });
                        }
                    }
                }
            }
            live.retain(|_, tx| !tx.is_closed());
        }
    });
    Telephony {
        control: control_tx,
    }
}

/// The roster name of a leg with `caller` (a SIP URI, the far end's):
/// "Phone …4567" for telephony (`prefix` "Phone"; only the number's last
/// digits, or the URI's user part when it is not a number), a room system
/// by its SIP display name, else its URI's user part (else host). Always in
/// the KMS's canonical display-name form; never the URI's password or
/// parameters.
pub fn leg_name(prefix: Option<&str>, caller: &str, caller_name: Option<&str>) -> String {
    let uri = crate::sip::message::SipUri::parse(caller);
    let user = uri
        .as_ref()
        .map(|u| u.user.clone().unwrap_or_else(|| u.host.clone()))
        // A user part may carry a password (user:password): never show it.
        .map(|u| u.split(':').next().unwrap_or_default().to_string())
        .unwrap_or_else(|| "unknown".to_string());
    let raw = match prefix {
        Some(p) => format!("{p} {}", masked_number(&user)),
        None => caller_name
            .and_then(meeting_proto::kms_api::display_name)
            .unwrap_or(user),
    };
    meeting_proto::kms_api::display_name(&raw)
        .unwrap_or_else(|| prefix.unwrap_or("Room system").to_string())
}

fn local_for(settings: &TelephonySettings, port: u16) -> Local {
    Local {
        addr: settings.media_ip,
        port,
        session_id: u64::from(rand::random::<u32>()),
        policy: settings.srtp,
        key: SrtpKey::random(),
    }
}

fn refusal_label(e: &sdp::SdpError) -> &'static str {
    match e {
        sdp::SdpError::SrtpRequired => "srtpRequired",
        sdp::SdpError::SrtpOff => "srtpOff",
        sdp::SdpError::NoCryptoSuite => "noCryptoSuite",
        sdp::SdpError::NoCodec => "noCodec",
        _ => "badSdp",
    }
}

/// A caller's number shown by its last four digits ("…4567"): a phone
/// number identifies a person, and names and logs only need to tell callers
/// apart. Anything that is not a number (a room system's name) is unchanged.
pub fn masked_number(caller: &str) -> String {
    let digits: String = caller.chars().filter(char::is_ascii_digit).collect();
    let numberish = caller
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '+' | ' ' | '-' | '(' | ')' | '.'));
    if numberish && digits.len() >= 7 {
        format!("…{}", &digits[digits.len() - 4..])
    } else {
        caller.to_string()
    }
}

#[allow(clippy::too_many_arguments)]
async fn incoming(
    sip: &SipHandle,
    settings: &TelephonySettings,
    metrics: &Arc<Metrics>,
    legs: &mpsc::Sender<PhoneLeg>,
    live: &mut HashMap<CallRef, watch::Sender<bool>>,
    call: CallRef,
    display_name: String,
    dialled: Option<String>,
    offer: &[u8],
) {
    let reject = |code: u16, reason: &str, warning: Option<String>| Command::Reject {
        call,
        code,
        reason: reason.to_string(),
        warning,
    };
    let offer = match sdp::parse(offer) {
        Ok(o) => o,
        Err(e) => {
            metrics.call_refused("badSdp");
            let _ = sip
                .commands
                .send(reject(488, "Not Acceptable Here", Some(e.to_string())))
                .await;
            return;
        }
    };
    let socket = match UdpSocket::bind((settings.media_ip, 0)).await {
        Ok(s) => s,
        Err(_) => {
            let _ = sip
                .commands
                .send(reject(503, "Service Unavailable", None))
                .await;
            return;
        }
    };
    let Ok(port) = socket.local_addr().map(|a| a.port()) else {
        return;
    };
    let local = local_for(settings, port);
    let (answer, neg) = match local.answer(&offer) {
        Ok(x) => x,
        Err(e) => {
            tracing::info!(caller = %display_name, reason = %e, "refused call");
            metrics.call_refused(refusal_label(&e));
            let _ = sip
                .commands
                .send(reject(488, "Not Acceptable Here", Some(e.to_string())))
                .await;
            return;
        }
    };
    let _ = sip.commands.send(Command::Answer(call, answer)).await;
    let meeting = dialled
        .as_deref()
        .and_then(|d| settings.dial_in.get(d))
        .cloned();
    let (leg_tx, leg_rx) = oneshot::channel();
    let (leg, end_tx) = match meeting {
        Some(m) => start_media(
            call,
            Direction::DialIn,
            display_name,
            m,
            socket,
            neg,
            sip,
            metrics,
            None,
            settings.media_timeout,
        ),
        None => {
            // Unknown number: ask for the meeting number by DTMF (ended by '#').
            let placeholder = MeetingId::new("pending").expect("constant id is valid");
            start_media(
                call,
                Direction::DialIn,
                display_name,
                placeholder,
                socket,
                neg,
                sip,
                metrics,
                Some(leg_tx),
                settings.media_timeout,
            )
        }
    };
    live.insert(call, end_tx);
    match leg {
        Some(l) => {
            let _ = legs.send(l).await;
        }
        None => {
            let legs = legs.clone();
            tokio::spawn(async move {
                if let Ok(l) = leg_rx.await {
                    let _ = legs.send(l).await;
                }
            });
        }
    }
}

/// Start the RTP task. Returns the leg at once, or (when the meeting is still
/// to be entered by DTMF) hands it to `deferred` once the caller pressed '#'.
#[allow(clippy::too_many_arguments)]
fn start_media(
    call: CallRef,
    direction: Direction,
    display_name: String,
    meeting: MeetingId,
    socket: UdpSocket,
    neg: Negotiated,
    sip: &SipHandle,
    metrics: &Arc<Metrics>,
    deferred: Option<oneshot::Sender<PhoneLeg>>,
    media_timeout: Duration,
) -> (Option<PhoneLeg>, watch::Sender<bool>) {
    let (to_phone_tx, to_phone_rx) = mpsc::channel::<Vec<i16>>(50);
    let (from_phone_tx, from_phone_rx) = mpsc::channel::<Vec<i16>>(50);
    let (end_tx, end_rx) = watch::channel(false);
    let info = LegInfo {
        codec: neg.codec,
        srtp: neg.srtp.as_ref().map(|_| sdp::SRTP_SUITE),
        remote: neg.remote,
    };
    metrics.leg_started(info.srtp.is_some());
    let leg = PhoneLeg {
        call,
        direction,
        display_name,
        meeting,
        info,
        to_phone: to_phone_tx,
        from_phone: from_phone_rx,
        ended: end_rx.clone(),
    };
    let (leg_now, leg_later) = match deferred {
        None => (Some(leg), None),
        Some(tx) => (None, Some((leg, tx))),
    };
    let commands = sip.commands.clone();
    let metrics = metrics.clone();
    tokio::spawn(async move {
        let why = media_loop(
            socket,
            neg,
            to_phone_rx,
            from_phone_tx,
            end_rx,
            leg_later,
            &metrics,
            media_timeout,
        )
        .await;
        tracing::info!(?call, why, "phone leg media ended");
        let _ = commands.send(Command::Hangup(call)).await;
        metrics.leg_ended();
    });
    (leg_now, end_tx)
}

#[allow(clippy::too_many_arguments)]
async fn media_loop(
    socket: UdpSocket,
    neg: Negotiated,
    mut to_phone: mpsc::Receiver<Vec<i16>>,
    from_phone: mpsc::Sender<Vec<i16>>,
    mut ended: watch::Receiver<bool>,
    mut deferred: Option<(PhoneLeg, oneshot::Sender<PhoneLeg>)>,
    metrics: &Metrics,
    media_timeout: Duration,
) -> &'static str {
    let (mut tx_srtp, mut rx_srtp) = match &neg.srtp {
        Some((ours, theirs)) => (
            Some(SrtpContext::new(&ours.0)),
            Some(SrtpContext::new(&theirs.0)),
        ),
        None => (None, None),
    };
    // Opus runs at 8 kHz here: the leg's PCM is telephone band either way,
    // and libopus resamples internally. The RTP clock stays 48 kHz (RFC 7587).
    let mut opus = match neg.codec {
        Codec::Opus => {
            let enc = opus::Encoder::new(8000, opus::Channels::Mono, opus::Application::Voip);
            let dec = opus::Decoder::new(8000, opus::Channels::Mono);
            match (enc, dec) {
                (Ok(e), Ok(d)) => Some((e, d)),
                _ => return "opus codec unavailable",
            }
        }
        _ => None,
    };
    let ts_step = FRAME as u32 * neg.codec.clock_rate() / 8000;
    let ssrc: u32 = rand::random();
    let mut seq: u16 = rand::random();
    let mut ts: u32 = rand::random();
    let mut jitter = JitterBuffer::new(FRAME, 3, 25);
    let mut dtmf = DtmfReceiver::default();
    let mut digits = String::new();
    let dtmf_deadline = tokio::time::Instant::now() + DTMF_ENTRY_TIMEOUT;
    let mut last_rx = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut buf = vec![0u8; 2048];
    let mut first = true;
    let mut peer = RtpPeer::new(neg.remote, neg.srtp.is_some());
    loop {
        tokio::select! {
            _ = ended.changed() => return "call ended",
            _ = tick.tick() => {
                let now = tokio::time::Instant::now();
                if now.duration_since(last_rx) > media_timeout {
                    return "no media from the phone";
                }
                if deferred.is_some() && now > dtmf_deadline {
                    return "no meeting number entered";
                }
                // Phone -> meeting.
                let frame = jitter.pop();
                if deferred.is_none() && from_phone.try_send(frame).is_err() && from_phone.is_closed() {
                    return "meeting side closed";
                }
                // Meeting -> phone.
                let pcm = to_phone.try_recv().unwrap_or_else(|_| vec![0; FRAME]);
                let payload: Vec<u8> = match neg.codec {
                    Codec::Pcmu => pcm.iter().map(|&s| g711::linear_to_ulaw(s)).collect(),
                    Codec::Pcma => pcm.iter().map(|&s| g711::linear_to_alaw(s)).collect(),
                    Codec::Opus => match opus.as_mut().map(|(e, _)| e.encode_vec(&pcm, 400)) {
                        Some(Ok(p)) => p,
                        _ => continue,
                    },
                };
                let mut pkt = rtp::build(first, neg.pt, seq, ts, ssrc, &payload);
                first = false;
                seq = seq.wrapping_add(1);
                ts = ts.wrapping_add(ts_step);
                if let Some(s) = tx_srtp.as_mut() && s.protect(&mut pkt).is_err() {
                    continue;
                }
                if socket.send_to(&pkt, peer.send_to()).await.is_ok() {
                    metrics.rtp_sent();
                }
            }
            r = socket.recv_from(&mut buf) => {
                let Ok((n, from)) = r else {
                    // ICMP errors from the peer's closed ports surface here on Linux.
                    metrics.rtp_dropped("recvError");
                    continue;
                };
                if !peer.admits(from) || rtp::is_rtcp(&buf[..n]) {
                    metrics.rtp_dropped("source");
                    continue;
                }
                let mut pkt = buf[..n].to_vec();
                if let Some(s) = rx_srtp.as_mut() && let Err(e) = s.unprotect(&mut pkt) {
                    metrics.rtp_dropped(match e {
                        crate::media::srtp::SrtpError::Auth => "srtpAuth",
                        crate::media::srtp::SrtpError::Replay => "srtpReplay",
                        _ => "malformed",
                    });
                    continue;
                }
                let Ok((h, payload)) = rtp::parse(&pkt) else {
                    metrics.rtp_dropped("malformed");
                    continue;
                };
                if (neg.srtp.is_some() || h.pt == neg.pt || Some(h.pt) == neg.dtmf_pt)
                    && peer.accepted(from).is_some()
                {
                    tracing::info!("the phone's RTP comes from another address than its SDP names: answering there");
                }
                last_rx = tokio::time::Instant::now();
                metrics.rtp_received();
                if Some(h.pt) == neg.dtmf_pt {
                    if let Some(d) = dtmf.on_payload(h.ts, payload) {
                        metrics.dtmf_digit();
                        if let Some((leg, tx)) = deferred.take() {
                            if d == '#' {
                                match MeetingId::new(std::mem::take(&mut digits)) {
                                    Ok(m) => { let _ = tx.send(PhoneLeg { meeting: m, ..leg }); }
                                    Err(_) => return "invalid meeting number",
                                }
                            } else {
                                if digits.len() < 32 {
                                    digits.push(d);
                                }
                                deferred = Some((leg, tx));
                            }
                        }
                    }
                } else if h.pt == neg.pt {
                    let pcm: Vec<i16> = match neg.codec {
                        Codec::Pcmu => payload.iter().map(|&b| g711::ulaw_to_linear(b)).collect(),
                        Codec::Pcma => payload.iter().map(|&b| g711::alaw_to_linear(b)).collect(),
                        Codec::Opus => {
                            let mut out = vec![0i16; FRAME * 6];
                            match opus.as_mut().map(|(_, d)| d.decode(payload, &mut out, false)) {
                                Some(Ok(n)) => {
                                    out.truncate(n);
                                    out
                                }
                                _ => {
                                    metrics.rtp_dropped("undecodable");
                                    continue;
                                }
                            }
                        }
                    };
                    // We answer with ptime 20; other packet sizes are padded or cut to 20 ms.
                    jitter.push(h.seq, pcm);
                } else {
                    metrics.rtp_dropped("payloadType");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{DialError, OutcomeState, leg_name, masked_number, sdp};

    #[test]
    fn dial_failures_become_outcomes_by_sip_status() {
        let failed = |code: u16, reason: &str| DialError::Failed {
            code,
            reason: reason.into(),
        };
        let cases = [
            (DialError::Busy(486), "busy", Some(486)),
            (DialError::Busy(600), "busy", Some(600)),
            (DialError::NoAnswer(408), "no_answer", Some(408)),
            (DialError::NoAnswer(487), "no_answer", Some(487)),
            (failed(603, "Decline"), "rejected", Some(603)),
            (failed(404, "Not Found"), "not_found", Some(404)),
            (failed(503, "Service Unavailable"), "call_failed", Some(503)),
            (
                DialError::Sdp(sdp::SdpError::SrtpRequired),
                "media_refused",
                None,
            ),
            (
                DialError::Local("connection refused".into()),
                "unreachable",
                None,
            ),
            (DialError::Gone, "unreachable", None),
        ];
        for (e, code, status) in cases {
            let o = e.outcome();
            assert_eq!(
                (o.state, o.code.as_str(), o.status),
                (OutcomeState::Failed, code, status),
                "{e}"
            );
            assert_eq!(o.check(), Ok(()), "what the KMS accepts: {o}");
        }
        // The reason phrase is the peer's: it cannot add lines to the roster.
        let o = failed(503, "Service\r\nX-Injected: 1").outcome();
        assert_eq!(o.message, "Service X-Injected: 1");
        assert_eq!(
            DialError::Sdp(sdp::SdpError::BadLine("c=IN IP4 x".into()))
                .outcome()
                .message,
            "the callee's SDP answer is malformed"
        );
    }

    #[test]
    fn legs_are_named_by_masked_number_or_room_system_name() {
        let phone = Some("Phone");
        assert_eq!(
            leg_name(phone, "sip:+15551234567@198.18.255.1", None),
            "Phone …4567"
        );
        assert_eq!(
            leg_name(
                phone,
                "sips:+15551234567@trunk;user=phone",
                Some("Ada Lovelace")
            ),
            "Phone …4567",
            "a phone is its number, whatever name the trunk sends"
        );
        assert_eq!(
            leg_name(phone, "sip:phone@127.0.0.1:5090", None),
            "Phone phone"
        );
        assert_eq!(
            leg_name(phone, "sip:alice:hunter2@pbx", None),
            "Phone alice"
        );
        assert_eq!(
            leg_name(None, "sip:room1@pbx", Some("  Boardroom\r\n\u{202e}East ")),
            "Boardroom East"
        );
        assert_eq!(leg_name(None, "sip:room1@pbx", None), "room1");
        assert_eq!(leg_name(None, "sip:10.0.0.5", None), "10.0.0.5");
        assert_eq!(leg_name(None, "sip:room1@pbx", Some("\u{7}")), "room1");
        let long = leg_name(None, "sip:r@pbx", Some(&"x".repeat(500)));
        assert_eq!(
            long.chars().count(),
            meeting_proto::kms_api::MAX_DISPLAY_NAME_CHARS
        );
    }

    #[test]
    fn numbers_show_only_their_last_four_digits() {
        assert_eq!(masked_number("+15551234567"), "…4567");
        assert_eq!(masked_number("+1 (555) 123-4567"), "…4567");
        assert_eq!(masked_number("Boardroom"), "Boardroom");
        assert_eq!(masked_number("phone"), "phone");
        // Short extensions are not personal numbers.
        assert_eq!(masked_number("1234"), "1234");
    }
}
