//! RFC 9605 Appendix C test vectors against the SFrame implementation the
//! clients use (the `sframe` crate's framing with meeting-proto's ring
//! backend). The vectors are in `tests/data/rfc9605-test-vectors.json` (the
//! RFC's JSON form).
//!
//! The backend implements the AES-GCM suites (0x0004, 0x0005); Conclave uses
//! 0x0004. The AES-CTR+HMAC suites (0x0001-0x0003) are not used, so their
//! vectors are not run here.
#![cfg(feature = "keys")]

use meeting_proto::media_crypto::{DecryptionKey, EncryptionKey};
use serde_json::Value;
use sframe::CipherSuite;
use sframe::frame::{EncryptedFrameView, MediaFrameView, SingleUseCounter};
use sframe::header::SframeHeader;

fn vectors() -> Value {
    serde_json::from_str(include_str!("data/rfc9605-test-vectors.json")).unwrap()
}

fn unhex(v: &Value) -> Vec<u8> {
    let s = v.as_str().unwrap();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn header_vectors_encode_and_decode() {
    let v = vectors();
    let cases = v["header"].as_array().unwrap();
    assert_eq!(cases.len(), 289, "the RFC lists 289 header vectors");
    for c in cases {
        let kid = c["kid"].as_u64().unwrap();
        let ctr = c["ctr"].as_u64().unwrap();
        let encoded = unhex(&c["encoded"]);
        let header = SframeHeader::new(kid, ctr);
        let mut buf = vec![0u8; header.len()];
        header.serialize(&mut buf).unwrap();
        assert_eq!(buf, encoded, "kid {kid} ctr {ctr}");
        let back = SframeHeader::deserialize(&encoded).unwrap();
        assert_eq!((back.key_id(), back.counter()), (kid, ctr));
    }
}

#[test]
fn gcm_suite_vectors_encrypt_and_decrypt() {
    let v = vectors();
    let mut ran = Vec::new();
    for c in v["sframe"].as_array().unwrap() {
        let suite = match c["cipher_suite"].as_u64().unwrap() {
            4 => CipherSuite::AesGcm128Sha256,
            5 => CipherSuite::AesGcm256Sha512,
            _ => continue,
        };
        let kid = c["kid"].as_u64().unwrap();
        let ctr = c["ctr"].as_u64().unwrap();
        let base_key = unhex(&c["base_key"]);
        let metadata = unhex(&c["metadata"]);
        let pt = unhex(&c["pt"]);
        let ct = unhex(&c["ct"]);

        let key = EncryptionKey::derive_from(suite, kid, &base_key).unwrap();
        let mut counter = SingleUseCounter::new(ctr);
        let frame = MediaFrameView::try_with_meta_data(&mut counter, &pt, &metadata).unwrap();
        let mut out = Vec::new();
        frame.encrypt_into(&key, &mut out).unwrap();
        // The buffer is `metadata | SFrame header | ciphertext | tag`; the
        // RFC's `ct` is everything after the metadata.
        assert_eq!(&out[..metadata.len()], &metadata[..]);
        assert_eq!(&out[metadata.len()..], &ct[..], "suite {suite:?}");

        let dec = DecryptionKey::derive_from(suite, kid, &base_key).unwrap();
        let view = EncryptedFrameView::try_with_meta_data(&ct, &metadata).unwrap();
        let mut plain = Vec::new();
        let opened = view.decrypt_into(&dec, &mut plain).unwrap();
        assert_eq!(opened.payload(), &pt[..]);

        let mut tampered = ct.clone();
        *tampered.last_mut().unwrap() ^= 1;
        let view = EncryptedFrameView::try_with_meta_data(&tampered, &metadata).unwrap();
        assert!(view.decrypt_into(&dec, &mut Vec::new()).is_err());
        ran.push(c["cipher_suite"].as_u64().unwrap());
    }
    assert_eq!(ran, vec![4, 5]);
}
