//! `conclave-client token` mints join tokens the KMS's verifier accepts.

mod common;

use std::process::Command;

use meeting_proto::token::{Jwks, Role, TokenVerifier, TrustedIssuer};

const SEED: &str = "2222222222222222222222222222222222222222222222222222222222222222";

fn run(args: &[&str]) -> String {
    let out = Command::new(common::bin("conclave-client"))
        .arg("token")
        .args(["--issuer-seed", SEED, "--kid", "dev-1"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn minted_tokens_verify_against_the_printed_jwks() {
    let jwks = Jwks::from_json(run(&["--jwks"]).as_bytes()).unwrap();
    let token = run(&[
        "--meeting",
        "weekly",
        "--sub",
        "alice",
        "--role",
        "host",
        "--ttl",
        "600",
    ]);
    let verifier = TokenVerifier::new(vec![TrustedIssuer {
        name: "dev".into(),
        audience: "conclave".into(),
        jwks,
    }]);
    let now = meeting_client::dev::unix_now();
    let ok = verifier.verify(&token, now).unwrap();
    assert_eq!(ok.kid, "dev-1");
    assert_eq!(ok.claims.sub, "alice");
    assert_eq!(ok.claims.mid.as_str(), "weekly");
    assert_eq!(ok.claims.role, Role::Host);
    assert!(
        verifier.verify(&token, now + 601 + 3600).is_err(),
        "expiry is enforced"
    );

    let other = Command::new(common::bin("conclave-client"))
        .args([
            "token",
            "--issuer-seed",
            SEED,
            "--meeting",
            "m",
            "--role",
            "admin",
        ])
        .output()
        .unwrap();
    assert!(!other.status.success());
    assert!(String::from_utf8_lossy(&other.stderr).contains("--role must be host or participant"));
}
