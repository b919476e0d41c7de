//! SFrame protect+unprotect throughput against the raw AEAD it uses
//! (ring AES-128-GCM seal+open of the same payload and AAD size), measured in
//! the same run. Prints `BENCH` lines.

use std::time::{Duration, Instant};

use meeting_proto::ids::MeetingId;
use meeting_proto::media_crypto::{Receiver, Sender};
use meeting_proto::media_keys::EpochKey;
use meeting_proto::wire::{ROUTING_HEADER_LEN, RoutingHeader, StreamKind, flags};
use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

const PAYLOAD: usize = 1000;
const RUN: Duration = Duration::from_secs(3);

fn bench(name: &str, value: f64, unit: &str, baseline: Option<f64>) {
    let b = baseline.map_or("null".to_string(), |b| format!("{b}"));
    println!(
        "BENCH {{\"name\": \"{name}\", \"value\": {value}, \"unit\": \"{unit}\", \"baseline\": {b}}}"
    );
}

fn sframe_ops() -> f64 {
    let meeting = MeetingId::new("bench").unwrap();
    let key = EpochKey::new(meeting.clone(), 1, &[3u8; 32]).unwrap();
    let mut tx = Sender::new(&key, 1);
    let mut rx = Receiver::new(meeting, Duration::from_secs(5));
    let t0 = Instant::now();
    rx.set_epoch(key, t0);
    let payload = vec![0x5au8; PAYLOAD];
    let mut out = Vec::with_capacity(PAYLOAD + 64);
    let mut n = 0u64;
    let start = Instant::now();
    while start.elapsed() < RUN {
        for seq in 0..256u32 {
            let h = RoutingHeader {
                slot: 1,
                sender: 1,
                kind: StreamKind::Video,
                flags: flags::FRAME_START | flags::FRAME_END,
                seq,
                timestamp: seq,
            };
            out.clear();
            tx.protect(&h, &payload, &mut out).unwrap();
            let opened = rx.open(&out, t0).unwrap();
            assert_eq!(opened.payload.len(), PAYLOAD);
        }
        n += 256;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn raw_aead_ops() -> f64 {
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[3u8; 16]).unwrap());
    // Same AAD length as a MEDIA datagram: routing header + a 3-byte SFrame header.
    let aad = [7u8; ROUTING_HEADER_LEN + 3];
    let payload = vec![0x5au8; PAYLOAD];
    let mut buf = Vec::with_capacity(PAYLOAD + 16);
    let mut n = 0u64;
    let start = Instant::now();
    while start.elapsed() < RUN {
        for i in 0..256u64 {
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&(n + i).to_be_bytes());
            buf.clear();
            buf.extend_from_slice(&payload);
            key.seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &mut buf,
            )
            .unwrap();
            let plain = key
                .open_in_place(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(&aad),
                    &mut buf,
                )
                .unwrap();
            assert_eq!(plain.len(), PAYLOAD);
        }
        n += 256;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let aead = raw_aead_ops();
    let sframe = sframe_ops();
    let mb = |ops: f64| ops * PAYLOAD as f64 / 1e6;
    bench("sframe_protect_unprotect_ops", sframe, "ops/s", Some(aead));
    bench(
        "sframe_protect_unprotect_throughput",
        mb(sframe),
        "MB/s",
        Some(mb(aead)),
    );
    bench("sframe_vs_aead_ratio", sframe / aead, "ratio", None);
}
