//! Join tokens as the KMS verifies them (untrusted, pre-authentication).
#![no_main]
use libfuzzer_sys::fuzz_target;
use meeting_proto::token::{DevIssuerKey, TokenVerifier, TrustedIssuer};

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let key = DevIssuerKey::from_seed("k1", &[7; 32]).expect("valid seed");
    let jwks = meeting_proto::token::Jwks::new(vec![key.jwk()]).expect("one key");
    let verifier = TokenVerifier::new(vec![TrustedIssuer {
        name: "portal".into(),
        audience: "conclave".into(),
        jwks,
    }]);
    let _ = verifier.verify(token, 1_700_000_000);
});
