//! Throughput of the per-packet and per-byte hot paths, each with a
//! baseline measured in the same run (a plain copy of the same bytes).

use connector_node::media::{g711, rtp, srtp::SrtpContext};
use connector_node::recording::container::{ChunkWriter, DataKey};
use connector_node::sip::message;
use std::hint::black_box;
use std::io::Write;
use std::time::Instant;

fn bench(name: &str, unit: &str, n: u64, baseline: Option<f64>, f: impl FnMut()) -> f64 {
    let mut f = f;
    let start = Instant::now();
    for _ in 0..n {
        f();
    }
    let per_sec = n as f64 / start.elapsed().as_secs_f64();
    println!(
        "BENCH {{\"name\": \"{name}\", \"value\": {per_sec:.1}, \"unit\": \"{unit}\", \"baseline\": {}}}",
        baseline.map_or("null".to_string(), |b| format!("{b:.1}"))
    );
    per_sec
}

fn main() {
    let pkt = rtp::build(false, 0, 1, 160, 7, &[0x55u8; 160]);
    let copy = bench("rtp_packet_copy", "packets/s", 2_000_000, None, || {
        black_box(black_box(&pkt).clone());
    });
    let mut tx = SrtpContext::new(&[9u8; 30]);
    let mut rx = SrtpContext::new(&[9u8; 30]);
    let mut seq = 0u16;
    bench(
        "srtp_protect_unprotect_g711_20ms",
        "packets/s",
        300_000,
        Some(copy),
        || {
            seq = seq.wrapping_add(1);
            let mut p = rtp::build(false, 0, seq, 160, 7, &[0x55u8; 160]);
            tx.protect(&mut p).unwrap();
            rx.unprotect(&mut p).unwrap();
            black_box(p);
        },
    );
    let pcm: Vec<i16> = (0..160).map(|i| (i * 200) as i16).collect();
    bench(
        "g711_ulaw_encode_decode_20ms",
        "frames/s",
        300_000,
        Some(copy),
        || {
            let enc: Vec<u8> = pcm.iter().map(|&s| g711::linear_to_ulaw(s)).collect();
            let dec: Vec<i16> = enc.iter().map(|&b| g711::ulaw_to_linear(b)).collect();
            black_box(dec);
        },
    );
    let invite = b"INVITE sip:+15550100@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\r\n\
From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:b@127.0.0.1>\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\n\
Contact: <sip:a@127.0.0.1:5070>\r\nContent-Length: 0\r\n\r\n";
    let copy_msg = bench("sip_message_copy", "messages/s", 2_000_000, None, || {
        black_box(black_box(&invite[..]).to_vec());
    });
    bench(
        "sip_parse_invite",
        "messages/s",
        200_000,
        Some(copy_msg),
        || {
            black_box(message::parse(black_box(invite)).unwrap());
        },
    );
    let block = vec![7u8; 1 << 20];
    let key = DataKey::generate();
    let mb_copy = bench("memcpy_1MiB", "MiB/s", 2_000, None, || {
        let mut v = Vec::with_capacity(block.len());
        v.extend_from_slice(&block);
        black_box(v);
    });
    bench(
        "recording_container_encrypt_1MiB",
        "MiB/s",
        200,
        Some(mb_copy),
        || {
            let mut w = ChunkWriter::new(Vec::with_capacity(1 << 21), &key, b"k", "f").unwrap();
            w.write_all(&block).unwrap();
            black_box(w.finish().unwrap());
        },
    );
}
