//! Failover: two participants in a meeting on a relay registered with a
//! real kms-node; once audio flows, the relay is SIGKILLed and clients learn
//! the new placement from the KMS and re-join. Figures: the longest silence
//! in the received audio (ms), which spans detection, re-placement and
//! re-join, when the meeting moves to the other of two relays
//! (`rejoin_gap_ms`: bounded below by the KMS's heartbeat timeout, 3 s in
//! this setup) and when the only relay restarts under its id at once
//! (`rejoin_gap_restart_ms`: its new registration instance moves it).
//! Needs the workspace binaries (`cargo build --workspace --bins`).

#[path = "../tests/common/mod.rs"]
mod common;

use common::kms::{kill_the_meetings_relay, start_kms};

fn worst_gap(meeting: &str, pods: &[&str], restart: bool) -> f64 {
    let kms = start_kms();
    let (reports, _relays) = kill_the_meetings_relay(&kms, meeting, pods, restart);
    reports
        .iter()
        .map(|r| r["max_audio_gap_ms"].as_f64().unwrap())
        .fold(0.0, f64::max)
}

fn main() {
    // Baseline: one 20 ms audio frame interval, the gap of an undisturbed stream.
    for (name, meeting, pods, restart) in [
        (
            "rejoin_gap_ms",
            "bench-failover",
            &["relay-0", "relay-1"][..],
            false,
        ),
        (
            "rejoin_gap_restart_ms",
            "bench-restart",
            &["relay-0"][..],
            true,
        ),
    ] {
        let worst = worst_gap(meeting, pods, restart);
        println!(
            "BENCH {{\"name\": \"{name}\", \"value\": {worst}, \"unit\": \"ms\", \"baseline\": 20.0}}"
        );
    }
}
