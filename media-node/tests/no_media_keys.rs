//! The relay must not be able to derive or use media keys. meeting-proto keeps
//! key derivation and SFrame behind its `keys` feature; this test resolves
//! media-node's own dependency graph (as `cargo build -p media-node` would)
//! and shows that the feature, and the crates only it pulls in, are absent.

use std::process::Command;

fn cargo_tree(args: &[&str]) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let out = Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "--manifest-path",
            manifest,
            "-p",
            "media-node",
        ])
        .args(args)
        .output()
        .expect("running cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn meeting_proto_keys_feature_is_not_enabled_for_the_relay() {
    let tree = cargo_tree(&[
        "-e",
        "normal,features",
        "--prefix",
        "none",
        "-f",
        "{p} [{f}]",
    ]);
    let proto: Vec<&str> = tree
        .lines()
        .filter(|l| l.starts_with("meeting-proto "))
        .collect();
    assert!(
        !proto.is_empty(),
        "meeting-proto missing from the relay's graph:\n{tree}"
    );
    for line in &proto {
        let features = line.split('[').nth(1).unwrap_or("");
        assert!(
            !features.split([',', ']']).any(|f| f.trim() == "keys"),
            "the relay enables meeting-proto/keys: {line}"
        );
    }
    // The feature-level view also lists `meeting-proto feature "keys"` nodes when enabled.
    assert!(
        !tree.contains("feature \"keys\""),
        "a `keys` feature node is in the relay's graph:\n{tree}"
    );
}

#[test]
fn no_sframe_or_hpke_code_is_linked_into_the_relay() {
    let tree = cargo_tree(&["-e", "normal", "--prefix", "none", "-f", "{p}"]);
    for forbidden in ["sframe ", "hpke ", "x25519-dalek "] {
        assert!(
            !tree.lines().any(|l| l.starts_with(forbidden)),
            "{forbidden}is in the relay's dependency graph:\n{tree}"
        );
    }
    // Sanity: the graph is real (the relay does depend on meeting-proto).
    assert!(tree.lines().any(|l| l.starts_with("meeting-proto ")));
}
