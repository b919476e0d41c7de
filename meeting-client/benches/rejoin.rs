//! Failover: two participants in a meeting on one of two relays registered
//! with a real kms-node; the relay is SIGKILLed; clients learn the new
//! placement from the KMS and re-join. Figure: the longest silence in the
//! received audio (ms), which spans detection, re-placement and re-join.
//! Needs the workspace binaries (`cargo build --workspace --bins`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Child;
use std::time::Duration;

use common::kms::start_kms;
use common::*;

fn main() {
    let kms = start_kms();
    let mut relays = vec![
        start_relay(&kms.relay_yaml("relay-0")),
        start_relay(&kms.relay_yaml("relay-1")),
    ];
    let clients: Vec<Child> = [("alice", 440.0), ("bob", 660.0)]
        .iter()
        .map(|(who, f)| {
            kms.join_cmd("bench-failover", who, *f, 12.0)
                .spawn()
                .unwrap()
        })
        .collect();
    let mut placed = None;
    for _ in 0..200 {
        placed = relays.iter().position(|r| {
            metric(
                &http_get(r.http, "/metrics").1,
                "conclave_relay_participants",
            ) == 2.0
        });
        if placed.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut dead = relays.remove(placed.expect("the meeting never reached a relay"));
    dead.child.kill().unwrap();
    let gaps: Vec<f64> = clients
        .into_iter()
        .map(report)
        .map(|r| r["max_audio_gap_ms"].as_f64().unwrap())
        .collect();
    let worst = gaps.iter().copied().fold(0.0, f64::max);
    // Baseline: one 20 ms audio frame interval, the gap of an undisturbed stream.
    println!(
        "BENCH {{\"name\": \"rejoin_gap_ms\", \"value\": {worst}, \"unit\": \"ms\", \"baseline\": 20.0}}"
    );
}
