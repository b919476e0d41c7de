//! Failover: two participants in a meeting on a relay registered with a
//! real kms-node; once audio flows, the relay is SIGKILLed (or drains) and clients learn
//! the new placement from the KMS and re-join. Figures: the longest silence
//! in the received audio (ms), which spans detection, re-placement and
//! re-join, when the meeting moves to the other of two relays
//! (`rejoin_gap_ms`: bounded below by the KMS's heartbeat timeout, 3 s in
//! this setup) and when the only relay restarts under its id at once
//! (`rejoin_gap_restart_ms`: its new registration instance moves it), and
//! when it is told to stop and drains (`rejoin_gap_drain_ms`: the KMS moves
//! the meeting while the draining relay still forwards).
//! Needs the workspace binaries (`cargo build --workspace --bins`).

#[path = "../tests/common/mod.rs"]
mod common;

use common::kms::{RelayFault, fault_the_meetings_relay, start_kms};

fn worst_gap(meeting: &str, pods: &[&str], fault: RelayFault) -> f64 {
    let kms = start_kms();
    let (reports, _relays) = fault_the_meetings_relay(&kms, meeting, pods, fault);
    reports
        .iter()
        .map(|r| r["max_audio_gap_ms"].as_f64().unwrap())
        .fold(0.0, f64::max)
}

fn main() {
    // Baseline: one 20 ms audio frame interval, the gap of an undisturbed stream.
    for (name, meeting, pods, fault) in [
        (
            "rejoin_gap_ms",
            "bench-failover",
            &["relay-0", "relay-1"][..],
            RelayFault::Kill,
        ),
        (
            "rejoin_gap_restart_ms",
            "bench-restart",
            &["relay-0"][..],
            RelayFault::KillAndRestart,
        ),
        (
            "rejoin_gap_drain_ms",
            "bench-drain",
            &["relay-0", "relay-1"][..],
            RelayFault::Drain,
        ),
    ] {
        let worst = worst_gap(meeting, pods, fault);
        println!(
            "BENCH {{\"name\": \"{name}\", \"value\": {worst}, \"unit\": \"ms\", \"baseline\": 20.0}}"
        );
    }
}
