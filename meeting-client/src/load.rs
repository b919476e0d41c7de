//! `conclave-client load`: N participants in each of M meetings at
//! realistic rates, reporting delivery, decrypt failures and one-way latency.
//!
//! Two ways in: dev mode (tickets from a dev ticket signer, one random
//! meeting key per meeting, one relay) or through a real KMS, where each
//! participant gets its own minted join token, joins through the KMS (which
//! places the meeting on a relay and releases sealed epoch keys) and follows
//! the KMS's key rotations like any client.
//!
//! Every participant joins first; sending starts only once all of them are
//! bound to their relay and hold the meeting's latest epoch key, so the
//! figures measure the media path, not the join race. Everyone stops sending
//! at the same moment, and only then leaves the KMS (a leave rotates keys).
//!
//! Rates: audio 50 packets/s of 80-byte Opus-sized frames; video 30 frames/s
//! of 4 kB with a 24 kB key frame every 2 s (about 1.2 Mb/s); screen share
//! 5 frames/s of 10 kB. Frames are split into datagrams of at most
//! [`FRAGMENT`] bytes, each its own SFrame. Every payload starts with the
//! send time, so receivers in this process measure one-way latency on one
//! clock.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use kms_client::KmsClient;
use meeting_proto::ids::MeetingId;
use meeting_proto::media_keys::EpochKey;
use meeting_proto::token::{Claims, DevIssuerKey, Role};
use meeting_proto::wire::{StreamKind, flags};
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::dev::DevIssuer;
use crate::join::{self, Credentials, KmsLink, Update, flush, relay_socket};
use crate::session::{Event, Session};

/// Largest plaintext per datagram (leaves room for headers and the SFrame tag).
pub const FRAGMENT: usize = 1100;
/// How long everyone may take to join and converge on one key.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Quiet time after sending stops, for in-flight datagrams.
const TAIL: Duration = Duration::from_millis(300);

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Meeting ids are `<prefix>-<m>`.
    pub meeting_prefix: String,
    pub meetings: usize,
    pub participants: usize,
    pub duration: Duration,
    pub video: bool,
    pub screen: bool,
}

/// Mints one join token per participant from a development issuer key.
pub struct TokenMinter {
    pub key: DevIssuerKey,
    /// `aud` the KMS expects.
    pub audience: String,
    /// `iss`, if the KMS checks it.
    pub issuer: Option<String>,
}

impl std::fmt::Debug for TokenMinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenMinter")
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl TokenMinter {
    /// The first participant of a meeting is its host.
    fn token(&self, meeting: &MeetingId, participant: usize) -> String {
        let now = crate::dev::unix_now();
        let sub = format!("{meeting}-p{participant}");
        self.key.mint(&Claims {
            name: format!("Load {participant}"),
            sub,
            mid: meeting.clone(),
            role: if participant == 0 {
                Role::Host
            } else {
                Role::Participant
            },
            aud: vec![self.audience.clone()],
            exp: now + 3600,
            nbf: None,
            iat: Some(now),
            iss: self.issuer.clone(),
        })
    }
}

/// Where credentials come from.
#[derive(Debug)]
pub enum Source {
    /// Dev tickets for one relay and random meeting keys.
    Dev {
        relay: SocketAddr,
        issuer: DevIssuer,
    },
    /// Join tokens, joins and keys through a KMS.
    Kms {
        client: KmsClient,
        tokens: TokenMinter,
    },
}

#[derive(Debug, Default, Serialize, Clone)]
pub struct LoadReport {
    pub participants: usize,
    pub joined: usize,
    /// Participants that were bound and held the meeting's latest key when
    /// sending started.
    pub ready: usize,
    pub packets_sent: u64,
    pub packets_expected: u64,
    pub packets_delivered: u64,
    pub delivered_ratio: f64,
    pub decrypt_failures: u64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
}

#[derive(Default)]
struct Totals {
    joined: usize,
    sent_per_meeting: Vec<u64>,
    delivered: u64,
    failures: u64,
    latencies_us: Vec<u32>,
}

/// One participant, before its media session starts.
struct Member {
    meeting_index: usize,
    creds: Credentials,
    /// Epoch every member of the meeting must hold before sending.
    final_epoch: u64,
    updates: Option<mpsc::Receiver<Update>>,
}

/// Runs the load and returns the report.
pub async fn run(opts: LoadOptions, source: Source) -> anyhow::Result<LoadReport> {
    let clock = Instant::now();
    let (members, followers) = match source {
        Source::Dev { relay, issuer } => (dev_members(&opts, relay, &issuer)?, Vec::new()),
        Source::Kms { client, tokens } => kms_members(&opts, &client, &tokens).await?,
    };
    let totals = Arc::new(Mutex::new(Totals {
        sent_per_meeting: vec![0; opts.meetings],
        ..Totals::default()
    }));
    let (ready_tx, mut ready_rx) = mpsc::channel::<()>(members.len().max(1));
    let (start_tx, start_rx) = watch::channel::<Option<tokio::time::Instant>>(None);
    let total = members.len();
    let mut tasks = Vec::new();
    for m in members {
        let (opts, totals) = (opts.clone(), totals.clone());
        let (ready_tx, start_rx) = (ready_tx.clone(), start_rx.clone());
        tasks.push(tokio::spawn(async move {
            participant(opts, m, clock, totals, ready_tx, start_rx).await
        }));
    }
    drop(ready_tx);
    // Start when everyone is ready, or at the timeout with whoever is.
    let mut ready = 0;
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    while ready < total {
        match tokio::time::timeout_at(deadline, ready_rx.recv()).await {
            Ok(Some(())) => ready += 1,
            Ok(None) | Err(_) => break,
        }
    }
    if ready < total {
        tracing::warn!(
            ready,
            total,
            "not every participant was ready; starting anyway"
        );
    }
    start_tx.send_replace(Some(
        tokio::time::Instant::now() + Duration::from_millis(200),
    ));
    let mut first_error = None;
    for t in tasks {
        if let Err(e) = t.await.context("participant task")? {
            first_error.get_or_insert(e);
        }
    }
    leave_all(followers).await;
    if let Some(e) = first_error {
        return Err(e);
    }
    let t = totals.lock().expect("no task panicked holding the lock");
    let n = opts.participants as u64;
    let expected: u64 = t
        .sent_per_meeting
        .iter()
        .map(|s| s * (n.saturating_sub(1)))
        .sum();
    let mut lat = t.latencies_us.clone();
    lat.sort_unstable();
    let pct = |q: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((lat.len() - 1) as f64 * q).round() as usize;
        lat[i] as f64 / 1000.0
    };
    Ok(LoadReport {
        participants: opts.meetings * opts.participants,
        joined: t.joined,
        ready,
        packets_sent: t.sent_per_meeting.iter().sum(),
        packets_expected: expected,
        packets_delivered: t.delivered,
        delivered_ratio: if expected == 0 {
            0.0
        } else {
            t.delivered as f64 / expected as f64
        },
        decrypt_failures: t.failures,
        latency_p50_ms: pct(0.50),
        latency_p99_ms: pct(0.99),
    })
}

fn meeting_id(opts: &LoadOptions, m: usize) -> anyhow::Result<MeetingId> {
    MeetingId::new(format!("{}-{m}", opts.meeting_prefix)).context("--meeting-prefix")
}

fn dev_members(
    opts: &LoadOptions,
    relay: SocketAddr,
    issuer: &DevIssuer,
) -> anyhow::Result<Vec<Member>> {
    let mut members = Vec::new();
    for m in 0..opts.meetings {
        let meeting = meeting_id(opts, m)?;
        let secret: [u8; 32] = rand::random();
        for p in 0..opts.participants {
            members.push(Member {
                meeting_index: m,
                creds: Credentials {
                    meeting: meeting.clone(),
                    sender_index: p as u16,
                    relay,
                    ticket: issuer.ticket(&meeting, p as u16, 3600)?,
                    key: EpochKey::new(meeting.clone(), 1, &secret)?,
                },
                final_epoch: 1,
                updates: None,
            });
        }
    }
    Ok(members)
}

type Follower = tokio::task::JoinHandle<KmsLink>;

/// Joins everyone through the KMS, one meeting after another (each join
/// rotates the meeting's key; the last join's epoch is the one to reach).
async fn kms_members(
    opts: &LoadOptions,
    client: &KmsClient,
    tokens: &TokenMinter,
) -> anyhow::Result<(Vec<Member>, Vec<Follower>)> {
    let mut members = Vec::new();
    let mut followers = Vec::new();
    for m in 0..opts.meetings {
        let meeting = meeting_id(opts, m)?;
        let mut joined = Vec::new();
        for p in 0..opts.participants {
            let token = tokens.token(&meeting, p);
            let r = join::kms_join(client.clone(), meeting.clone(), &token)
                .await
                .with_context(|| format!("participant {p} of {meeting} joining through the KMS"));
            match r {
                Ok(j) => joined.push(j),
                Err(e) => {
                    // Leave the ones already in, so a failed run leaves no roster behind.
                    for (_, link) in joined {
                        leave(link).await;
                    }
                    drop(members);
                    leave_all(followers).await;
                    return Err(e);
                }
            }
        }
        let final_epoch = joined.iter().map(|(c, _)| c.key.epoch()).max().unwrap_or(0);
        for (creds, link) in joined {
            let (rx, task) = join::follow_events(link);
            followers.push(task);
            members.push(Member {
                meeting_index: m,
                creds,
                final_epoch,
                updates: Some(rx),
            });
        }
    }
    Ok((members, followers))
}

async fn leave(link: KmsLink) {
    if let Err(e) = link.client.leave(&link.meeting, &link.session).await {
        tracing::warn!(error = %e, "KMS leave failed");
    }
}

/// Once their update receivers are gone, followers hand back their links.
async fn leave_all(followers: Vec<Follower>) {
    for f in followers {
        if let Ok(Ok(link)) = tokio::time::timeout(Duration::from_secs(10), f).await {
            leave(link).await;
        }
    }
}

fn stamp(clock: Instant, len: usize, seed: u32) -> Vec<u8> {
    let mut p = vec![(seed & 0xff) as u8; len.max(8)];
    p[..8].copy_from_slice(&(clock.elapsed().as_nanos() as u64).to_be_bytes());
    p
}

async fn next_update(updates: &mut Option<mpsc::Receiver<Update>>) -> Option<Update> {
    match updates {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn participant(
    opts: LoadOptions,
    member: Member,
    clock: Instant,
    totals: Arc<Mutex<Totals>>,
    ready_tx: mpsc::Sender<()>,
    mut start_rx: watch::Receiver<Option<tokio::time::Instant>>,
) -> anyhow::Result<()> {
    let Member {
        meeting_index,
        creds,
        final_epoch,
        mut updates,
    } = member;
    let sender = creds.sender_index;
    let mut socket = relay_socket(creds.relay).await?;
    let mut s = Session::new(
        creds.meeting,
        sender,
        creds.ticket,
        creds.key,
        rand::random(),
        Instant::now(),
    );
    let mut sent = 0u64;
    let mut delivered = 0u64;
    let mut lat: Vec<u32> = Vec::new();
    let mut joined = false;
    let mut said_ready = false;
    let mut audio = tokio::time::interval(Duration::from_millis(20));
    let mut video = tokio::time::interval(Duration::from_micros(33_333));
    let mut screen = tokio::time::interval(Duration::from_millis(200));
    let mut frame_no = 0u32;
    let mut buf = vec![0u8; 2048];
    // Bounded even if the start never comes (the run gave up waiting).
    let give_up = tokio::time::Instant::now() + READY_TIMEOUT + Duration::from_secs(5);
    let mut start: Option<tokio::time::Instant> = None;
    flush(&mut s, &socket).await?;
    loop {
        let now = tokio::time::Instant::now();
        let stop = start.map_or(give_up, |t| t + opts.duration + TAIL);
        let sending = start.is_some_and(|t| now >= t && now < t + opts.duration);
        tokio::select! {
            _ = tokio::time::sleep_until(stop) => break,
            // Wakes the loop when sending starts.
            _ = tokio::time::sleep_until(start.unwrap_or(stop)), if start.is_some_and(|t| now < t) => {}
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(s.poll_timeout())) => s.handle_timeout(Instant::now()),
            r = socket.recv(&mut buf) => if let Ok(n) = r { s.handle_datagram(&buf[..n], Instant::now()) },
            Some(u) = next_update(&mut updates) => match u {
                Update::Key(k) => s.set_epoch(k, Instant::now()),
                Update::Relay { addr, ticket } => {
                    socket = relay_socket(addr).await?;
                    s.rejoin(ticket, rand::random(), Instant::now());
                }
                #[allow(unreachable_patterns)]
                _ => {}
            },
            r = start_rx.changed(), if start.is_none() => {
                if r.is_ok() && let Some(t) = *start_rx.borrow() {
                    start = Some(t);
                    for i in [&mut audio, &mut video, &mut screen] {
                        i.reset_at(t);
                    }
                }
            }
            _ = audio.tick(), if sending => {
                let p = stamp(clock, 80, sender as u32);
                s.send_media(StreamKind::Audio, flags::FRAME_START | flags::FRAME_END, frame_no, &p)?;
                sent += 1;
            }
            _ = video.tick(), if sending && opts.video => {
                frame_no += 1;
                let key_frame = frame_no % 60 == 1;
                let size = if key_frame { 24_000 } else { 4_000 };
                sent += send_frame(&mut s, StreamKind::Video, key_frame, frame_no, size, clock)?;
            }
            _ = screen.tick(), if sending && opts.screen => {
                sent += send_frame(&mut s, StreamKind::Screen, false, frame_no, 10_000, clock)?;
            }
        }
        while let Some(ev) = s.poll_event() {
            match ev {
                Event::Joined { .. } => joined = true,
                Event::Media(o) => {
                    delivered += 1;
                    if o.payload.len() >= 8 {
                        let t = u64::from_be_bytes(o.payload[..8].try_into().expect("8 bytes"));
                        let now = clock.elapsed().as_nanos() as u64;
                        lat.push((now.saturating_sub(t) / 1000).min(u32::MAX as u64) as u32);
                    }
                }
                Event::Rejected(r) => anyhow::bail!("participant {sender} refused: {r:?}"),
                _ => {}
            }
        }
        if !said_ready && s.is_joined() && s.epoch() >= final_epoch {
            said_ready = true;
            let _ = ready_tx.try_send(());
        }
        flush(&mut s, &socket).await?;
    }
    s.leave();
    flush(&mut s, &socket).await.ok();
    let failures: u64 = s.stats().open_failures.values().sum();
    let mut t = totals.lock().expect("no task panicked holding the lock");
    t.joined += joined as usize;
    t.sent_per_meeting[meeting_index] += sent;
    t.delivered += delivered;
    t.failures += failures;
    t.latencies_us.extend(lat);
    Ok(())
}

fn send_frame(
    s: &mut Session,
    kind: StreamKind,
    key_frame: bool,
    ts: u32,
    size: usize,
    clock: Instant,
) -> anyhow::Result<u64> {
    let n = size.div_ceil(FRAGMENT);
    for i in 0..n {
        let len = if i + 1 == n {
            size - i * FRAGMENT
        } else {
            FRAGMENT
        };
        let mut f = 0;
        if i == 0 {
            f |= flags::FRAME_START;
        }
        if i + 1 == n {
            f |= flags::FRAME_END;
        }
        if key_frame {
            f |= flags::KEYFRAME;
        }
        s.send_media(kind, f, ts, &stamp(clock, len, ts))?;
    }
    Ok(n as u64)
}
