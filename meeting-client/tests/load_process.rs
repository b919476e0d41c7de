//! `conclave-client load` against a real kms-node and media-node: every
//! participant mints its own join token, joins through the KMS, and the
//! report shows what was delivered and that nothing failed to decrypt.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::kms::start_kms;
use common::*;

/// The dev issuer `start_kms` configures (seed [3; 32], kid k1).
const ISSUER_SEED_HEX: &str = "0303030303030303030303030303030303030303030303030303030303030303";

#[test]
fn load_through_the_kms_delivers_everything_and_decrypts_everything() {
    let kms = start_kms();
    let relay = start_relay(&kms.relay_yaml("relay-0"));
    let child = Command::new(bin("conclave-client"))
        .args(["load", "--kms", &kms.url, "--kms-ca"])
        .arg(kms.ca())
        .args(["--kid", "k1", "--aud", "conclave-kms", "--iss", "portal"])
        .args(["--meetings", "2", "--participants", "3", "--duration", "2"])
        .args(["--video", "--meeting-prefix", "load-test"])
        .env("CONCLAVE_DEV_ISSUER_SEED", ISSUER_SEED_HEX)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_bounded(child, Duration::from_secs(90));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "load failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let r = &r["report"];
    eprintln!("load report: {r}");
    assert_eq!(r["participants"], 6, "{r}");
    assert_eq!(r["joined"], 6, "{r}");
    assert_eq!(
        r["ready"], 6,
        "everyone held the latest key before sending: {r}"
    );
    assert_eq!(r["decrypt_failures"], 0, "{r}");
    let expected = r["packets_expected"].as_u64().unwrap();
    // 2 s of audio (50/s) and video (~30 datagrams/s) per sender, to 2 others.
    assert!(expected > 6 * 2 * 100, "{r}");
    let ratio = r["delivered_ratio"].as_f64().unwrap();
    assert!(ratio >= 0.98, "delivered ratio {ratio}: {r}");
    assert!(r["latency_p99_ms"].as_f64().unwrap() > 0.0, "{r}");

    // The media really went through the relay process.
    let (_, text) = http_get(relay.http, "/metrics");
    let video = metric(&text, r#"conclave_relay_packets_sent_total{kind="video"}"#);
    assert!(video > 0.0, "relay forwarded no video:\n{text}");
}

#[test]
fn load_without_a_kms_or_relay_says_what_to_give() {
    let out = Command::new(bin("conclave-client"))
        .args(["load", "--duration", "1"])
        .env_remove("CONCLAVE_DEV_ISSUER_SEED")
        .env_remove("CONCLAVE_DEV_TICKET_SEED")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--kms") && err.contains("--relay"), "{err}");
}

#[test]
fn load_with_a_kms_needs_an_issuer_seed() {
    let out = Command::new(bin("conclave-client"))
        .args([
            "load",
            "--kms",
            "https://127.0.0.1:1",
            "--kms-ca",
            "/nonexistent",
        ])
        .env_remove("CONCLAVE_DEV_ISSUER_SEED")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent") || err.contains("issuer-seed"),
        "{err}"
    );
}
