//! `conclave-client join`: one participant over UDP, driven by tokio.
//!
//! Sends Opus audio (20 ms frames at 50 packets/s) and chat, receives and
//! decodes every other participant, and returns a report (and WAV files).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use kms_client::KmsClient;
use meeting_proto::ids::MeetingId;
use meeting_proto::ids::ParticipantId;
use meeting_proto::key_release::EphemeralKey;
use meeting_proto::kms_api::{
    ConnectorKind, Hex, Invitation, InvitationOutcome, JoinRequest, OutcomeState, Role, Roster,
    SealedKey, SignedRoster,
};
use meeting_proto::media_keys::EpochKey;
use meeting_proto::wire::{StreamKind, flags};
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::audio::{self, Decoder, Encoder, FRAME_SAMPLES};
use crate::session::{Event, Session, SessionStats};

/// What a join needs once the KMS (or a dev setup) has answered.
#[derive(Debug)]
pub struct Credentials {
    pub meeting: MeetingId,
    pub sender_index: u16,
    pub relay: SocketAddr,
    pub ticket: Vec<u8>,
    pub key: EpochKey,
}

/// A change the KMS announced while in the meeting.
#[derive(Debug)]
pub enum Update {
    /// A new epoch's key (someone joined or left).
    Key(EpochKey),
    /// The meeting moved to another relay (or the ticket was renewed).
    Relay { addr: SocketAddr, ticket: Vec<u8> },
    /// A new roster version, its KMS signature checked.
    Roster(Vec<RosterEntry>),
    /// That roster's invitations, when a connector reported what became of
    /// one (a dial-out that was busy, a refused stream target).
    Invitations(Vec<Invitation>),
}

/// One roster member as this participant saw it (KMS signature checked).
#[derive(Debug, Serialize, Clone, PartialEq, Eq)]
pub struct RosterEntry {
    pub participant: u64,
    pub sender_index: u16,
    /// Display name: the token's `name`, or what the connector joined as.
    pub name: String,
    /// `participant` for people (hosts included), else the connector kind
    /// (`recording`, `liveStreaming`, `telephony`, `roomSystem`).
    pub kind: String,
    /// `host`, `participant` or `connector:<kind>`.
    pub role: String,
}

impl RosterEntry {
    pub fn from_roster(r: &Roster) -> Vec<Self> {
        r.members
            .iter()
            .map(|m| Self {
                participant: m.participant.0,
                sender_index: m.sender_index,
                name: m.name.clone(),
                kind: match &m.role {
                    Role::Host | Role::Participant => "participant".to_string(),
                    Role::Connector(k) => k.to_string(),
                },
                role: m.role.to_string(),
            })
            .collect()
    }
}

/// A connector the host asks the KMS to bring in: `KIND` or `KIND=TARGET`
/// (a stream URL for liveStreaming, a number or SIP URI for telephony).
#[derive(Clone, PartialEq, Eq)]
pub struct InviteSpec {
    pub kind: ConnectorKind,
    pub target: Option<String>,
}

impl std::fmt::Debug for InviteSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A stream URL carries its stream key: never print the target.
        f.debug_struct("InviteSpec")
            .field("kind", &self.kind)
            .field("target", &self.target.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl std::str::FromStr for InviteSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, target) = match s.split_once('=') {
            Some((k, t)) => (k, Some(t)),
            None => (s, None),
        };
        let kind: ConnectorKind = kind.parse().map_err(|_| {
            format!(
                "unknown connector kind {:?}: expected recording, liveStreaming, telephony or roomSystem",
                kind.chars().take(40).collect::<String>()
            )
        })?;
        match target {
            Some("") => Err(format!("--invite {kind}=: the target is empty")),
            Some(_) if matches!(kind, ConnectorKind::Recording | ConnectorKind::RoomSystem) => {
                Err(format!("--invite {kind} takes no target"))
            }
            t => Ok(Self {
                kind,
                target: t.map(str::to_owned),
            }),
        }
    }
}

/// What an invitation became: the KMS put it in the roster at once.
#[derive(Debug, Serialize, Clone)]
pub struct Invited {
    pub kind: String,
    pub invitation: u64,
    /// What its connector reported, once the roster shows it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<InvitationOutcome>,
}

/// This participant's standing with the KMS after joining.
pub struct KmsLink {
    pub client: KmsClient,
    pub meeting: MeetingId,
    pub session: kms_client::Session,
    pub participant: ParticipantId,
    /// The roster as of the join (KMS signature checked).
    pub roster: Vec<RosterEntry>,
    /// This participant's role in that roster.
    pub role: Role,
    verifier: ed25519_dalek::VerifyingKey,
    ephemeral: EphemeralKey,
    version: u64,
}

impl std::fmt::Debug for KmsLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmsLink")
            .field("meeting", &self.meeting)
            .field("participant", &self.participant)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

async fn resolve(address: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(address)
        .await
        .with_context(|| format!("resolving relay address {address:?}"))?
        .next()
        .with_context(|| format!("relay address {address:?} resolves to nothing"))
}

fn open_key(link: &KmsLink, sealed: &SealedKey) -> anyhow::Result<EpochKey> {
    let key = link
        .ephemeral
        .open_meeting_key(sealed, &link.meeting, link.participant)
        .context("opening the meeting key the KMS sealed to us")?;
    Ok(EpochKey::new(
        link.meeting.clone(),
        sealed.epoch,
        key.as_bytes(),
    )?)
}

fn verify_roster(
    verifier: &ed25519_dalek::VerifyingKey,
    signed: &SignedRoster,
) -> anyhow::Result<Roster> {
    signed
        .verify(verifier)
        .context("the roster's KMS signature does not verify")
}

/// Joins through the KMS with a join token: a fresh X25519 key per join,
/// the meeting key opened with HPKE, the relay and ticket from placement,
/// the roster checked against the KMS's signing key.
pub async fn kms_join(
    client: KmsClient,
    meeting: MeetingId,
    token: &str,
) -> anyhow::Result<(Credentials, KmsLink)> {
    let info = client.info().await.context("KMS info")?;
    let verifier = info
        .signing_public_key
        .array()
        .and_then(|b| ed25519_dalek::VerifyingKey::from_bytes(&b).ok())
        .context("the KMS's roster signing key is malformed")?;
    let ephemeral = EphemeralKey::generate();
    let req = JoinRequest {
        token: Some(token.to_owned()),
        invitation: None,
        public_key: Hex(ephemeral.public_key().to_vec()),
        display_name: None,
    };
    let resp = client.join(&meeting, &req).await.context("KMS join")?;
    let roster = verify_roster(&verifier, &resp.roster)?;
    let role = roster
        .members
        .iter()
        .find(|m| m.participant == resp.participant)
        .map(|m| m.role.clone())
        .context("the KMS's roster does not list this participant")?;
    let link = KmsLink {
        client,
        meeting: meeting.clone(),
        session: kms_client::Session(resp.session.clone()),
        participant: resp.participant,
        roster: RosterEntry::from_roster(&roster),
        role,
        verifier,
        ephemeral,
        version: 0,
    };
    let key = open_key(&link, &resp.key)?;
    let creds = Credentials {
        meeting,
        sender_index: resp.sender_index,
        relay: resolve(&resp.relay.address).await?,
        ticket: resp.relay.ticket.0.clone(),
        key,
    };
    Ok((creds, link))
}

/// Long-polls the KMS for new keys and relay assignments until the receiver
/// is dropped. Returns the link (for `leave`) through the join handle.
pub fn follow_events(
    mut link: KmsLink,
) -> (mpsc::Receiver<Update>, tokio::task::JoinHandle<KmsLink>) {
    let (tx, rx) = mpsc::channel(16);
    let task = tokio::spawn(async move {
        loop {
            let polled = tokio::select! {
                // Short polls: a dead relay is only noticed (and the meeting re-placed)
                // when a member polls after the relay's heartbeat timeout.
                r = link.client.events(&link.meeting, &link.session, link.version, 2_000) => r,
                _ = tx.closed() => return link,
            };
            let ev = match polled {
                Ok(ev) => ev,
                Err(e) if e.code() == Some("gone") => {
                    tracing::warn!(
                        "the KMS says this session left or was removed: no more key updates"
                    );
                    return link;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "KMS events poll failed; retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
            };
            link.version = link.version.max(ev.version);
            if let Some(signed) = &ev.roster {
                match verify_roster(&link.verifier, signed) {
                    Ok(r) => {
                        if tx
                            .send(Update::Roster(RosterEntry::from_roster(&r)))
                            .await
                            .is_err()
                        {
                            return link;
                        }
                        if r.invitations.iter().any(|i| i.outcome.is_some())
                            && tx.send(Update::Invitations(r.invitations)).await.is_err()
                        {
                            return link;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "roster ignored"),
                }
            }
            if let Some(sealed) = &ev.key {
                match open_key(&link, sealed) {
                    Ok(k) => {
                        if tx.send(Update::Key(k)).await.is_err() {
                            return link;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "new epoch key did not open"),
                }
            }
            if let Some(r) = &ev.relay {
                match resolve(&r.address).await {
                    Ok(addr) => {
                        let u = Update::Relay {
                            addr,
                            ticket: r.ticket.0.clone(),
                        };
                        if tx.send(u).await.is_err() {
                            return link;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "relay assignment unusable"),
                }
            }
        }
    });
    (rx, task)
}

#[derive(Debug)]
pub struct JoinOptions {
    /// Audio to send, looped; 48 kHz mono.
    pub audio: Vec<i16>,
    pub duration: Duration,
    /// Chat messages sent `chat_delay` after joining.
    pub chat: Vec<String>,
    /// Lets the others bind first: the relay only forwards to bound members.
    pub chat_delay: Duration,
    /// Where `sender-<index>.wav` files of decoded audio are written.
    pub out_dir: Option<PathBuf>,
    /// Give up if no WELCOME arrives within this time.
    pub join_timeout: Duration,
}

#[derive(Debug, Serialize)]
pub struct JoinReport {
    pub sender_index: u16,
    pub joined: bool,
    pub moved: bool,
    pub stats: SessionStats,
    /// Decoded audio frames per sender.
    pub audio_frames: BTreeMap<u16, u64>,
    /// Of those, the frames decoded since the last re-join (all of them
    /// without one): media resumed on the new relay.
    pub audio_frames_since_rejoin: BTreeMap<u16, u64>,
    /// Strongest frequency in each sender's decoded audio (Hz).
    pub dominant_hz: BTreeMap<u16, f64>,
    pub chats: Vec<ChatLine>,
    /// Epochs this participant held keys for, in order.
    pub epochs: Vec<u64>,
    /// Times the session re-joined (new relay from the KMS).
    pub rejoins: u32,
    /// Longest silence between two received audio frames (ms): covers a
    /// relay failure and the re-join.
    pub max_audio_gap_ms: u64,
    /// Everyone this participant saw in the (signed) roster during the
    /// meeting, in order of first appearance; empty without a KMS.
    pub roster: Vec<RosterEntry>,
    /// Connectors this participant (a host) invited.
    pub invited: Vec<Invited>,
    /// What still reached this participant after it left through the KMS
    /// (`--listen-after-leave`); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after_leave: Option<AfterLeave>,
}

/// A leaver that keeps its relay binding and every key it held, and keeps
/// capturing: what it received after leaving the KMS and what of it opened.
/// The meeting's rotation on leave must leave it nothing newer than
/// `last_epoch` to read.
#[derive(Debug, Serialize, Default, Clone, PartialEq, Eq)]
pub struct AfterLeave {
    /// How long it listened after the KMS acknowledged the leave (ms).
    pub listened_ms: u64,
    /// The newest epoch it holds a key for.
    pub last_epoch: u64,
    /// Media and chat frames received from the relay while listening.
    pub frames_received: u64,
    /// Of those, media frames that opened, by epoch (keys as strings in JSON).
    pub opened_by_epoch: BTreeMap<u64, u64>,
    /// Chat frames that opened.
    pub chat_opened: u64,
    /// When the last frame opened, in ms after the leave: in-flight frames of
    /// the old epoch may still open until the others install the new key.
    pub last_opened_ms: Option<u64>,
    /// Frames that did not open, by reason (`unknown_epoch`: a newer key).
    pub open_failures: BTreeMap<String, u64>,
}

/// Leave through the KMS (the future resolves once it has), then listen for
/// this long with the old keys before saying BYE to the relay.
pub struct LeaveThenListen {
    pub leave: std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>,
    pub listen: Duration,
}

impl std::fmt::Debug for LeaveThenListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaveThenListen")
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

impl JoinReport {
    /// Adds members of a roster version not seen before.
    pub fn saw_roster(&mut self, members: Vec<RosterEntry>) {
        for m in members {
            if !self.roster.iter().any(|r| r.participant == m.participant) {
                self.roster.push(m);
            }
        }
    }
}

impl JoinReport {
    /// Records (and logs, for the host at the terminal) the outcomes of
    /// this participant's invitations the roster newly shows, e.g.
    /// `invitation 3 (telephony): failed: busy (486): the callee is busy`.
    pub fn saw_outcomes(&mut self, invitations: &[Invitation]) {
        for i in invitations {
            if let Some(o) = &i.outcome
                && let Some(mine) = self
                    .invited
                    .iter_mut()
                    .find(|x| x.invitation == i.id && x.outcome.is_none())
            {
                // At warn for a failure, so the CLI's default filter shows it.
                match o.state {
                    OutcomeState::Failed => {
                        tracing::warn!("invitation {} ({}): {o}", i.id, mine.kind)
                    }
                    OutcomeState::Ended => {
                        tracing::info!("invitation {} ({}): {o}", i.id, mine.kind)
                    }
                }
                mine.outcome = Some(o.clone());
            }
        }
    }
}

/// Asks the KMS to invite each connector. Only a host may: anyone else gets
/// a clear error before the KMS is asked.
pub async fn invite(link: &KmsLink, specs: &[InviteSpec]) -> anyhow::Result<Vec<Invited>> {
    if !specs.is_empty() && !link.role.is_host() {
        anyhow::bail!(
            "--invite is for the meeting's host: this join token's role is {}",
            link.role
        );
    }
    let mut out = Vec::new();
    for s in specs {
        let r = link
            .client
            .invite(&link.meeting, &link.session, s.kind, s.target.as_deref())
            .await
            .with_context(|| format!("inviting a {} connector", s.kind))?;
        out.push(Invited {
            kind: s.kind.to_string(),
            invitation: r.invitation.id,
            outcome: None,
        });
    }
    Ok(out)
}

#[derive(Debug, Serialize, Clone)]
pub struct ChatLine {
    pub from: u16,
    pub text: String,
}

/// A UDP socket "connected" to the relay, so datagrams from anyone else are
/// never even delivered to the session.
pub async fn relay_socket(relay: SocketAddr) -> std::io::Result<UdpSocket> {
    let bind: SocketAddr = if relay.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let s = UdpSocket::bind(bind).await?;
    s.connect(relay).await?;
    Ok(s)
}

async fn next_update(updates: &mut Option<mpsc::Receiver<Update>>) -> Option<Update> {
    match updates {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Sends everything the session queued. A relay that went away shows up as
/// refused sends (ICMP); those datagrams are lost, as on any network, and
/// the session recovers by re-joining.
pub async fn flush(session: &mut Session, socket: &UdpSocket) -> std::io::Result<()> {
    while let Some(d) = session.poll_transmit() {
        match socket.send(&d).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                tracing::debug!("relay unreachable");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub async fn run(
    creds: Credentials,
    opts: JoinOptions,
    updates: Option<mpsc::Receiver<Update>>,
) -> anyhow::Result<JoinReport> {
    run_with(creds, opts, updates, Vec::new(), Vec::new(), None).await
}

/// [`run`], with the roster seen at join and the invitations made; with
/// `linger`, the media phase ends with a KMS leave and a listening phase
/// (the report's `after_leave`).
pub async fn run_with(
    creds: Credentials,
    opts: JoinOptions,
    mut updates: Option<mpsc::Receiver<Update>>,
    roster: Vec<RosterEntry>,
    invited: Vec<Invited>,
    linger: Option<LeaveThenListen>,
) -> anyhow::Result<JoinReport> {
    let mut socket = relay_socket(creds.relay)
        .await
        .with_context(|| format!("opening a UDP socket towards {}", creds.relay))?;
    let start = Instant::now();
    let nonce = rand::random::<u64>();
    let first_epoch = creds.key.epoch();
    let mut session = Session::new(
        creds.meeting.clone(),
        creds.sender_index,
        creds.ticket,
        creds.key,
        nonce,
        start,
    );
    let mut encoder = Encoder::new()?;
    let mut decoders: BTreeMap<u16, Decoder> = BTreeMap::new();
    let mut pcm_in: BTreeMap<u16, Vec<i16>> = BTreeMap::new();
    let mut report = JoinReport {
        sender_index: creds.sender_index,
        joined: false,
        moved: false,
        stats: SessionStats::default(),
        audio_frames: BTreeMap::new(),
        audio_frames_since_rejoin: BTreeMap::new(),
        dominant_hz: BTreeMap::new(),
        chats: Vec::new(),
        epochs: vec![first_epoch],
        rejoins: 0,
        max_audio_gap_ms: 0,
        roster: Vec::new(),
        invited,
        after_leave: None,
    };
    report.saw_roster(roster);
    let mut last_audio: Option<Instant> = None;
    let mut audio_pos = 0usize;
    let mut ts: u32 = 0;
    let mut frame_tick = tokio::time::interval(Duration::from_millis(20));
    frame_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut buf = vec![0u8; 2048];
    let end = tokio::time::Instant::now() + opts.join_timeout + opts.duration;
    let mut media_end: Option<tokio::time::Instant> = None;
    let mut chat_at: Option<tokio::time::Instant> = None;
    flush(&mut session, &socket).await?;
    loop {
        let deadline = media_end.unwrap_or(end).min(end);
        let wake = tokio::time::Instant::from_std(session.poll_timeout());
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            _ = tokio::time::sleep_until(wake) => session.handle_timeout(Instant::now()),
            u = next_update(&mut updates) => match u {
                Some(Update::Key(k)) => {
                    report.epochs.push(k.epoch());
                    session.set_epoch(k, Instant::now());
                }
                Some(Update::Relay { addr, ticket }) => {
                    tracing::info!(%addr, "KMS placed the meeting on another relay: re-joining");
                    socket = relay_socket(addr).await?;
                    session.rejoin(ticket, rand::random(), Instant::now());
                    report.rejoins += 1;
                    report.audio_frames_since_rejoin.clear();
                }
                Some(Update::Roster(members)) => report.saw_roster(members),
                Some(Update::Invitations(invitations)) => report.saw_outcomes(&invitations),
                None => updates = None,
            },
            _ = tokio::time::sleep_until(chat_at.unwrap_or(end)), if chat_at.is_some() => {
                chat_at = None;
                for text in &opts.chat {
                    let ms = start.elapsed().as_millis() as u32;
                    session.send_chat(text, ms)?;
                }
            }
            r = socket.recv(&mut buf) => match r {
                Ok(n) => session.handle_datagram(&buf[..n], Instant::now()),
                // ICMP port unreachable from a dead relay surfaces here; keep going
                // so the report says what happened.
                Err(e) => tracing::debug!(error = %e, "receive failed"),
            },
            _ = frame_tick.tick(), if session.is_joined() && !opts.audio.is_empty() => {
                let mut frame = [0i16; FRAME_SAMPLES];
                for s in frame.iter_mut() {
                    *s = opts.audio[audio_pos % opts.audio.len()];
                    audio_pos += 1;
                }
                let packet = encoder.encode(&frame)?;
                session.send_media(StreamKind::Audio, flags::FRAME_START | flags::FRAME_END, ts, &packet)?;
                ts = ts.wrapping_add(FRAME_SAMPLES as u32);
            }
        }
        while let Some(ev) = session.poll_event() {
            match ev {
                Event::Joined { slot } => {
                    tracing::info!(slot, sender = creds.sender_index, "joined");
                    report.joined = true;
                    // A re-join (new relay) keeps the original schedule.
                    if media_end.is_none() {
                        media_end = Some(tokio::time::Instant::now() + opts.duration);
                        if !opts.chat.is_empty() {
                            chat_at = Some(tokio::time::Instant::now() + opts.chat_delay);
                        }
                    }
                }
                Event::Rejected(r) => anyhow::bail!("relay refused the join: {r:?}"),
                Event::Media(o) if o.header.kind == StreamKind::Audio => {
                    let sender = o.header.sender;
                    let dec = match decoders.entry(sender) {
                        std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::btree_map::Entry::Vacant(v) => v.insert(Decoder::new()?),
                    };
                    match dec.decode(&o.payload) {
                        Ok(pcm) => {
                            let now = Instant::now();
                            if let Some(t) = last_audio {
                                let gap = now.duration_since(t).as_millis() as u64;
                                report.max_audio_gap_ms = report.max_audio_gap_ms.max(gap);
                            }
                            last_audio = Some(now);
                            pcm_in.entry(sender).or_default().extend(pcm);
                            *report.audio_frames.entry(sender).or_default() += 1;
                            *report.audio_frames_since_rejoin.entry(sender).or_default() += 1;
                        }
                        Err(e) => tracing::warn!(sender, error = %e, "undecodable audio frame"),
                    }
                }
                Event::Media(_) => {}
                Event::Chat { sender, text, .. } => {
                    println!(
                        "{}",
                        serde_json::json!({"chat": {"from": sender, "text": text}})
                    );
                    report.chats.push(ChatLine { from: sender, text });
                }
                Event::Move { forward_for, .. } => {
                    tracing::info!(?forward_for, "relay is draining; asked to move");
                    report.moved = true;
                }
                Event::KeyframeRequested { .. } => {}
            }
        }
        flush(&mut session, &socket).await?;
    }
    if let Some(l) = linger {
        // The event follower returns the KMS link once nobody receives updates.
        drop(updates);
        l.leave.await.context("leaving through the KMS")?;
        report.after_leave = Some(listen_after_leave(&mut session, &socket, l.listen).await?);
    }
    session.leave();
    flush(&mut session, &socket).await.ok();
    report.stats = session.stats().clone();
    for (sender, pcm) in &pcm_in {
        // Skip the codec's start-up frames when naming the tone.
        let settled = pcm.get(FRAME_SAMPLES * 5..).unwrap_or(pcm);
        report
            .dominant_hz
            .insert(*sender, audio::dominant_frequency(settled));
        if let Some(dir) = &opts.out_dir {
            std::fs::create_dir_all(dir)?;
            audio::write_wav(&dir.join(format!("sender-{sender}.wav")), pcm)?;
        }
    }
    Ok(report)
}

/// Keeps the relay binding alive (keep-alives), sends no media, and tries
/// every frame that arrives with the keys held at the leave.
async fn listen_after_leave(
    session: &mut Session,
    socket: &UdpSocket,
    listen: Duration,
) -> anyhow::Result<AfterLeave> {
    let start = Instant::now();
    let before = session.stats().clone();
    let end = tokio::time::Instant::now() + listen;
    let mut out = AfterLeave {
        last_epoch: session.epoch(),
        ..AfterLeave::default()
    };
    let mut buf = vec![0u8; 2048];
    loop {
        let wake = tokio::time::Instant::from_std(session.poll_timeout());
        tokio::select! {
            _ = tokio::time::sleep_until(end) => break,
            _ = tokio::time::sleep_until(wake) => session.handle_timeout(Instant::now()),
            r = socket.recv(&mut buf) => match r {
                Ok(n) => session.handle_datagram(&buf[..n], Instant::now()),
                Err(e) => tracing::debug!(error = %e, "receive failed"),
            },
        }
        while let Some(ev) = session.poll_event() {
            let opened = match ev {
                Event::Media(o) => {
                    *out.opened_by_epoch.entry(o.epoch).or_default() += 1;
                    true
                }
                Event::Chat { .. } => {
                    out.chat_opened += 1;
                    true
                }
                _ => false,
            };
            if opened {
                out.last_opened_ms = Some(start.elapsed().as_millis() as u64);
            }
        }
        flush(session, socket).await?;
    }
    out.listened_ms = start.elapsed().as_millis() as u64;
    let delta = |now: &BTreeMap<String, u64>, then: &BTreeMap<String, u64>| {
        now.iter()
            .map(|(k, v)| (k.clone(), v - then.get(k).copied().unwrap_or(0)))
            .filter(|(_, d)| *d > 0)
            .collect::<BTreeMap<String, u64>>()
    };
    let stats = session.stats();
    out.open_failures = delta(&stats.open_failures, &before.open_failures);
    out.frames_received = delta(&stats.opened, &before.opened).values().sum::<u64>()
        + out.open_failures.values().sum::<u64>();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invite_specs_parse_kinds_and_targets() {
        let r: InviteSpec = "recording".parse().unwrap();
        assert_eq!((r.kind, r.target), (ConnectorKind::Recording, None));
        let s: InviteSpec = "liveStreaming=rtmp://127.0.0.1/live/x".parse().unwrap();
        assert_eq!(s.kind, ConnectorKind::LiveStreaming);
        assert_eq!(s.target.as_deref(), Some("rtmp://127.0.0.1/live/x"));
        assert!(
            !format!("{s:?}").contains("rtmp"),
            "Debug hides the stream URL"
        );
        let t: InviteSpec = "telephony=+15550123".parse().unwrap();
        assert_eq!(t.target.as_deref(), Some("+15550123"));
        let e = "recorder".parse::<InviteSpec>().unwrap_err();
        assert!(e.contains("unknown connector kind \"recorder\""), "{e}");
        let e = "recording=somewhere".parse::<InviteSpec>().unwrap_err();
        assert!(e.contains("takes no target"), "{e}");
        let e = "telephony=".parse::<InviteSpec>().unwrap_err();
        assert!(e.contains("target is empty"), "{e}");
    }

    #[test]
    fn report_keeps_everyone_seen_once() {
        let entry = |p: u64, kind: &str| RosterEntry {
            participant: p,
            sender_index: p as u16,
            name: format!("m{p}"),
            kind: kind.into(),
            role: "participant".into(),
        };
        let mut report = JoinReport {
            sender_index: 1,
            joined: true,
            moved: false,
            stats: SessionStats::default(),
            audio_frames: BTreeMap::new(),
            audio_frames_since_rejoin: BTreeMap::new(),
            dominant_hz: BTreeMap::new(),
            chats: Vec::new(),
            epochs: vec![1],
            rejoins: 0,
            max_audio_gap_ms: 0,
            roster: Vec::new(),
            invited: Vec::new(),
            after_leave: None,
        };
        report.saw_roster(vec![entry(1, "participant")]);
        report.saw_roster(vec![entry(1, "participant"), entry(2, "recording")]);
        // Someone who left stays in what this participant saw.
        report.saw_roster(vec![entry(2, "recording")]);
        let seen: Vec<u64> = report.roster.iter().map(|m| m.participant).collect();
        assert_eq!(seen, vec![1, 2]);

        // The outcomes of this participant's invitations go into the report, once.
        report.invited = vec![Invited {
            kind: "telephony".into(),
            invitation: 3,
            outcome: None,
        }];
        let busy = InvitationOutcome::new(OutcomeState::Failed, "busy", Some(486), "busy");
        let inv = |id: u64, outcome: Option<InvitationOutcome>| Invitation {
            id,
            kind: ConnectorKind::Telephony,
            invited_by: ParticipantId(1),
            claimed_by: None,
            participant: None,
            outcome,
        };
        report.saw_outcomes(&[inv(3, None), inv(4, Some(busy.clone()))]);
        assert_eq!(report.invited[0].outcome, None, "not ours, or none yet");
        report.saw_outcomes(&[inv(3, Some(busy.clone()))]);
        let later = InvitationOutcome::new(OutcomeState::Ended, "call_ended", None, "");
        report.saw_outcomes(&[inv(3, Some(later))]);
        assert_eq!(report.invited[0].outcome.as_ref(), Some(&busy));
        let json = serde_json::to_value(&report.invited).unwrap();
        assert_eq!(json[0]["outcome"]["code"], "busy");
        assert_eq!(json[0]["outcome"]["status"], 486);
    }
}
