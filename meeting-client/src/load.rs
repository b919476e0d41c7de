//! `conclave-client load`: N participants in each of M meetings through one
//! relay, at realistic rates, reporting delivery, decrypt failures and
//! one-way latency.
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

use meeting_proto::ids::MeetingId;
use meeting_proto::media_keys::EpochKey;
use meeting_proto::wire::{StreamKind, flags};
use serde::Serialize;

use crate::dev::DevIssuer;
use crate::join::{flush, relay_socket};
use crate::session::{Event, Session};

/// Largest plaintext per datagram (leaves room for headers and the SFrame tag).
pub const FRAGMENT: usize = 1100;

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub relay: SocketAddr,
    pub meetings: usize,
    pub participants: usize,
    pub duration: Duration,
    pub video: bool,
    pub screen: bool,
}

#[derive(Debug, Default, Serialize, Clone)]
pub struct LoadReport {
    pub participants: usize,
    pub joined: usize,
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

/// Runs the load and returns the report. Keys and tickets come from `issuer`
/// (a dev ticket signer), one random meeting key per meeting.
pub async fn run(opts: LoadOptions, issuer: DevIssuer) -> anyhow::Result<LoadReport> {
    let clock = Instant::now();
    let totals = Arc::new(Mutex::new(Totals {
        sent_per_meeting: vec![0; opts.meetings],
        ..Totals::default()
    }));
    let mut tasks = Vec::new();
    for m in 0..opts.meetings {
        let meeting = MeetingId::new(format!("load-{m}"))?;
        let secret: [u8; 32] = rand::random();
        for p in 0..opts.participants {
            let key = EpochKey::new(meeting.clone(), 1, &secret)?;
            let ticket = issuer.ticket(&meeting, p as u16, 3600)?;
            let opts = opts.clone();
            let totals = totals.clone();
            let meeting = meeting.clone();
            tasks.push(tokio::spawn(async move {
                participant(opts, meeting, m, p as u16, ticket, key, clock, totals).await
            }));
        }
    }
    for t in tasks {
        t.await??;
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

fn stamp(clock: Instant, len: usize, seed: u32) -> Vec<u8> {
    let mut p = vec![(seed & 0xff) as u8; len.max(8)];
    p[..8].copy_from_slice(&(clock.elapsed().as_nanos() as u64).to_be_bytes());
    p
}

#[allow(clippy::too_many_arguments)]
async fn participant(
    opts: LoadOptions,
    meeting: MeetingId,
    meeting_index: usize,
    sender: u16,
    ticket: Vec<u8>,
    key: EpochKey,
    clock: Instant,
    totals: Arc<Mutex<Totals>>,
) -> anyhow::Result<()> {
    let socket = relay_socket(opts.relay).await?;
    let mut s = Session::new(meeting, sender, ticket, key, rand::random(), Instant::now());
    let mut sent = 0u64;
    let mut delivered = 0u64;
    let mut lat: Vec<u32> = Vec::new();
    let mut joined = false;
    let mut audio = tokio::time::interval(Duration::from_millis(20));
    let mut video = tokio::time::interval(Duration::from_micros(33_333));
    let mut screen = tokio::time::interval(Duration::from_millis(200));
    let mut frame_no = 0u32;
    let mut buf = vec![0u8; 2048];
    // Everyone joins first; traffic runs for `duration`; then a quiet tail
    // lets in-flight datagrams arrive before counting.
    let join_deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut send_until: Option<tokio::time::Instant> = None;
    let tail = Duration::from_millis(300);
    flush(&mut s, &socket).await?;
    loop {
        let stop = match send_until {
            Some(t) => t + tail,
            None => join_deadline,
        };
        let sending = send_until.is_some_and(|t| tokio::time::Instant::now() < t);
        tokio::select! {
            _ = tokio::time::sleep_until(stop) => break,
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(s.poll_timeout())) => s.handle_timeout(Instant::now()),
            r = socket.recv(&mut buf) => if let Ok(n) = r { s.handle_datagram(&buf[..n], Instant::now()) },
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
                Event::Joined { .. } => {
                    joined = true;
                    // Give the others a moment to bind too, then send.
                    send_until = Some(
                        tokio::time::Instant::now() + Duration::from_millis(500) + opts.duration,
                    );
                    audio.reset_at(tokio::time::Instant::now() + Duration::from_millis(500));
                    video.reset_at(tokio::time::Instant::now() + Duration::from_millis(500));
                    screen.reset_at(tokio::time::Instant::now() + Duration::from_millis(500));
                }
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
