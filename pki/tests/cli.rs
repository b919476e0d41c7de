//! The `conclave-pki` tool end to end: init, issue, inspect, and refusals.

use conclave_pki::{Identity, Kind, identity_of, pem};
use std::process::Command;

fn tool(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_conclave-pki"))
        .args(args)
        .output()
        .expect("conclave-pki runs")
}

#[test]
fn init_issue_and_inspect() {
    let dir = std::env::temp_dir().join(format!("conclave-pki-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();

    assert!(tool(&["init", d, "edge"]).status.success());
    let ca_before = std::fs::read(dir.join("ca.crt")).unwrap();
    // A second init keeps the existing CA.
    assert!(tool(&["init", d, "edge"]).status.success());
    assert_eq!(std::fs::read(dir.join("ca.crt")).unwrap(), ca_before);

    let out = tool(&[
        "server",
        d,
        "kms",
        "conclave://edge/kms/kms",
        "--dns",
        "kms.edge.example",
        "--ip",
        "192.0.2.7",
        "--lifetime",
        "300",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cert = pem::certs_from_pem(&std::fs::read(dir.join("kms.crt")).unwrap(), "kms").unwrap();
    assert_eq!(
        identity_of(&cert[0]).unwrap(),
        Identity::new("edge", Kind::Kms, "kms").unwrap()
    );

    let out = tool(&["inspect", dir.join("kms.crt").to_str().unwrap()]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("identity: conclave://edge/kms/kms"), "{text}");
    assert!(text.contains("dns: kms.edge.example"), "{text}");
    assert!(text.contains("ip: 192.0.2.7"), "{text}");
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    assert_eq!(field("not_after:") - field("not_before:"), 300);
    assert_eq!(field("renew_after:") - field("not_before:"), 200);

    let out = tool(&["client", d, "relay", "conclave://edge/relay/zone/zone-0"]);
    assert!(out.status.success());
    assert!(dir.join("relay.key").is_file());

    // Refusals: bad identity, client with SANs, unknown command.
    for args in [
        vec!["client", d, "x", "conclave://edge/wizard/x"],
        vec!["client", d, "x", "conclave://edge/admin/x", "--dns", "a"],
        vec!["frobnicate"],
    ] {
        let out = tool(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
