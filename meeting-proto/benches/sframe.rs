//! SFrame protect+unprotect throughput against the raw AEAD it uses (ring
//! AES-128-GCM seal+open of the same payload and AAD size), measured in the
//! same run. Prints `BENCH` lines.
//!
//! Both sides do the same work a client does per frame: copy the payload into
//! the send buffer and seal it in place, then open the received datagram in
//! place. `sframe_open_copy_vs_aead_ratio` is the same with
//! [`Receiver::open`], which also allocates and copies the plaintext out.
//!
//! The machine is shared (other builds, other benchmarks), so the sides run
//! in rounds of one [`BATCH`] each, in an order that alternates from round to
//! round (so neither side always runs first after a reschedule). Each side's
//! throughput is its 10th-percentile batch: the batches nothing else
//! interrupted. The ratios are medians of per-round ratios: batches run tens
//! of microseconds apart see the same machine, so a busy phase of the
//! neighbours slows both sides of a round rather than one side's figure.

use std::time::{Duration, Instant};

use meeting_proto::ids::MeetingId;
use meeting_proto::media_crypto::{Receiver, Sender};
use meeting_proto::media_keys::EpochKey;
use meeting_proto::wire::{ROUTING_HEADER_LEN, RoutingHeader, StreamKind, flags};
use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

const PAYLOAD: usize = 1000;
const BATCH: usize = 64;
const RUN: Duration = Duration::from_secs(6);
/// The AAD of the MEDIA datagrams measured: routing header and a 7-byte
/// SFrame header (config byte, 3-byte key id of epoch 1, and the counter,
/// 3 bytes for most of the run).
const AAD_LEN: usize = ROUTING_HEADER_LEN + 7;

fn bench(name: &str, value: f64, unit: &str, baseline: Option<f64>) {
    let b = baseline.map_or("null".to_string(), |b| format!("{b}"));
    println!(
        "BENCH {{\"name\": \"{name}\", \"value\": {value}, \"unit\": \"{unit}\", \"baseline\": {b}}}"
    );
}

/// Runs `step` BATCH times; returns the elapsed seconds.
fn batch(mut step: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..BATCH {
        step();
    }
    start.elapsed().as_secs_f64()
}

struct Sframe {
    tx: Sender,
    rx: Receiver,
    t0: Instant,
    seq: u32,
    payload: Vec<u8>,
    out: Vec<u8>,
}

impl Sframe {
    fn new() -> Self {
        let meeting = MeetingId::new("bench").unwrap();
        let key = EpochKey::new(meeting.clone(), 1, &[3u8; 32]).unwrap();
        let tx = Sender::new(&key, 1);
        let mut rx = Receiver::new(meeting, Duration::from_secs(5));
        let t0 = Instant::now();
        rx.set_epoch(key, t0);
        Self {
            tx,
            rx,
            t0,
            seq: 0,
            payload: vec![0x5au8; PAYLOAD],
            out: Vec::with_capacity(PAYLOAD + 64),
        }
    }

    fn protect(&mut self) {
        self.seq = self.seq.wrapping_add(1);
        let h = RoutingHeader {
            slot: 1,
            sender: 1,
            kind: StreamKind::Video,
            flags: flags::FRAME_START | flags::FRAME_END,
            seq: self.seq,
            timestamp: self.seq,
        };
        self.tx.protect(&h, &self.payload, &mut self.out).unwrap();
    }

    fn in_place(&mut self) {
        self.protect();
        let opened = self.rx.open_in_place(&mut self.out, self.t0).unwrap();
        assert_eq!(opened.payload.len(), PAYLOAD);
    }

    fn copy(&mut self) {
        self.protect();
        let opened = self.rx.open(&self.out, self.t0).unwrap();
        assert_eq!(opened.payload.len(), PAYLOAD);
    }
}

struct RawAead {
    key: LessSafeKey,
    n: u64,
    payload: Vec<u8>,
    buf: Vec<u8>,
}

impl RawAead {
    fn new() -> Self {
        Self {
            key: LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[3u8; 16]).unwrap()),
            n: 0,
            payload: vec![0x5au8; PAYLOAD],
            buf: Vec::with_capacity(PAYLOAD + 16),
        }
    }

    fn step(&mut self) {
        let aad = [7u8; AAD_LEN];
        self.n += 1;
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&self.n.to_be_bytes());
        self.buf.clear();
        self.buf.extend_from_slice(&self.payload);
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &mut self.buf,
            )
            .unwrap();
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &mut self.buf,
            )
            .unwrap();
        assert_eq!(plain.len(), PAYLOAD);
    }
}

/// Operations per second of the 10th-percentile (fast, undisturbed) batch.
fn ops_per_sec(times: &[f64]) -> f64 {
    let mut times = times.to_vec();
    times.sort_by(f64::total_cmp);
    BATCH as f64 / times[times.len() / 10]
}

/// Median over rounds of `base[i] / other[i]` (a throughput ratio of other
/// over base, from batch times).
fn median_ratio(base: &[f64], other: &[f64]) -> f64 {
    let mut r: Vec<f64> = base.iter().zip(other).map(|(b, o)| b / o).collect();
    r.sort_by(f64::total_cmp);
    r[r.len() / 2]
}

fn main() {
    let mut raw = RawAead::new();
    let mut sf = Sframe::new();
    // Warm-up: caches, CPU frequency, the receiver's per-sender key.
    for _ in 0..200 {
        batch(|| raw.step());
        batch(|| sf.in_place());
    }
    let mut times = [Vec::new(), Vec::new(), Vec::new()];
    let start = Instant::now();
    let mut round = 0usize;
    while start.elapsed() < RUN {
        for k in 0..3 {
            // 0,1,2 then 2,1,0: each side runs first, middle and last alike.
            let side = if round.is_multiple_of(2) { k } else { 2 - k };
            let t = match side {
                0 => batch(|| raw.step()),
                1 => batch(|| sf.in_place()),
                _ => batch(|| sf.copy()),
            };
            times[side].push(t);
        }
        round += 1;
    }
    let [aead_t, in_place_t, copy_t] = &times;
    let (aead, sframe) = (ops_per_sec(aead_t), ops_per_sec(in_place_t));
    let mb = |ops: f64| ops * PAYLOAD as f64 / 1e6;
    bench("sframe_protect_unprotect_ops", sframe, "ops/s", Some(aead));
    bench(
        "sframe_protect_unprotect_throughput",
        mb(sframe),
        "MB/s",
        Some(mb(aead)),
    );
    bench(
        "sframe_vs_aead_ratio",
        median_ratio(aead_t, in_place_t),
        "ratio",
        None,
    );
    bench(
        "sframe_open_copy_vs_aead_ratio",
        median_ratio(aead_t, copy_t),
        "ratio",
        None,
    );
    eprintln!(
        "sframe bench: {round} rounds; 10th-percentile ratios: in place {:.3}, copy {:.3}",
        sframe / aead,
        ops_per_sec(copy_t) / aead
    );
}
