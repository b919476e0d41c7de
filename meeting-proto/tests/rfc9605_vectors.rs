//! RFC 9605 Appendix C test vectors against the SFrame implementation the
//! clients use ([`meeting_proto::sframe`], on ring), and a cross-check of that
//! implementation against an independent one (the `sframe` crate).
//!
//! The vectors are in `tests/data/rfc9605-test-vectors.json` (the RFC's JSON
//! form). The AES-GCM suites (0x0004, 0x0005) are implemented; Conclave uses
//! 0x0004. The AES-CTR+HMAC suites (0x0001-0x0003) are not used, so their
//! vectors are not run here.
#![cfg(feature = "keys")]

use meeting_proto::ids::MeetingId;
use meeting_proto::media_crypto::{Receiver, Sender};
use meeting_proto::media_keys::EpochKey;
use meeting_proto::sframe::{CipherSuite, Header, Key, MAX_HEADER_LEN};
use meeting_proto::wire::{ROUTING_HEADER_LEN, RoutingHeader, StreamKind, flags};
use serde_json::Value;
use std::time::{Duration, Instant};

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
        let mut buf = [0u8; MAX_HEADER_LEN];
        let n = Header { kid, ctr }.encode(&mut buf);
        assert_eq!(&buf[..n], &encoded[..], "kid {kid} ctr {ctr}");
        assert_eq!(
            Header::decode(&encoded).unwrap(),
            (Header { kid, ctr }, encoded.len())
        );
    }
}

#[test]
fn gcm_suite_vectors_encrypt_and_decrypt() {
    let v = vectors();
    let mut ran = Vec::new();
    for c in v["sframe"].as_array().unwrap() {
        let id = c["cipher_suite"].as_u64().unwrap() as u16;
        let Some(suite) = CipherSuite::from_id(id) else {
            continue;
        };
        let kid = c["kid"].as_u64().unwrap();
        let ctr = c["ctr"].as_u64().unwrap();
        let base_key = unhex(&c["base_key"]);
        let metadata = unhex(&c["metadata"]);
        let pt = unhex(&c["pt"]);
        let ct = unhex(&c["ct"]);

        let key = Key::derive(suite, kid, &base_key).unwrap();
        let mut out = Vec::new();
        key.seal_append(ctr, &metadata, &pt, &mut out).unwrap();
        // The RFC's `ct` is the whole frame: SFrame header | ciphertext | tag.
        assert_eq!(out, ct, "suite {suite:?}");

        let (header, hlen) = Header::decode(&ct).unwrap();
        assert_eq!(header, Header { kid, ctr });
        let mut buf = ct[hlen..].to_vec();
        let n = key
            .open_in_place(ctr, &ct[..hlen], &metadata, &mut buf)
            .unwrap();
        assert_eq!(&buf[..n], &pt[..]);

        let mut tampered = ct[hlen..].to_vec();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(
            key.open_in_place(ctr, &ct[..hlen], &metadata, &mut tampered)
                .is_err()
        );
        ran.push(id);
    }
    assert_eq!(ran, vec![4, 5]);
}

fn routing(sender: u16, seq: u32) -> RoutingHeader {
    RoutingHeader {
        slot: 9,
        sender,
        kind: StreamKind::Video,
        flags: flags::FRAME_START,
        seq,
        timestamp: seq * 3000,
    }
}

/// The `sframe` crate (its own ring backend) opens what a [`Sender`] sends,
/// and a [`Receiver`] opens what the crate seals, over many counters (so
/// headers of every length) and payload sizes.
#[test]
fn interoperates_with_the_sframe_crate() {
    use sframe::frame::{EncryptedFrameView, MediaFrameView, SingleUseCounter};
    use sframe::key::{DecryptionKey, EncryptionKey};

    let meeting = MeetingId::new("interop").unwrap();
    let epoch = EpochKey::new(meeting.clone(), 70_000, &[0x42; 32]).unwrap();
    let sender = 513u16;
    let base = epoch.sender_base_key(sender);
    let crate_dec = DecryptionKey::derive_from(
        sframe::CipherSuite::AesGcm128Sha256,
        base.kid(),
        base.as_bytes(),
    )
    .unwrap();
    let crate_enc = EncryptionKey::derive_from(
        sframe::CipherSuite::AesGcm128Sha256,
        base.kid(),
        base.as_bytes(),
    )
    .unwrap();

    let mut tx = Sender::new(&epoch, sender);
    let mut rx = Receiver::new(meeting, Duration::from_secs(5));
    let now = Instant::now();
    rx.set_epoch(epoch, now);
    let mut dgram = Vec::new();
    for seq in 0..300u32 {
        let payload: Vec<u8> = (0..(seq as usize * 7) % 1200).map(|i| i as u8).collect();
        tx.protect(&routing(sender, seq), &payload, &mut dgram)
            .unwrap();
        let (meta, frame) = dgram.split_at(ROUTING_HEADER_LEN);
        let view = EncryptedFrameView::try_with_meta_data(frame, meta).unwrap();
        assert_eq!(view.header().counter(), u64::from(seq));
        let mut plain = Vec::new();
        let opened = view.decrypt_into(&crate_dec, &mut plain).unwrap();
        assert_eq!(opened.payload(), &payload[..], "seq {seq}");

        // The other direction, at counters far from the sender's.
        let ctr = u64::from(seq) << 24;
        let meta = routing(sender, seq).encode();
        let mut counter = SingleUseCounter::new(ctr);
        let frame = MediaFrameView::try_with_meta_data(&mut counter, &payload, &meta).unwrap();
        let mut sealed = Vec::new();
        frame.encrypt_into(&crate_enc, &mut sealed).unwrap();
        let got = rx.open(&sealed, now).unwrap();
        assert_eq!(got.payload, payload, "ctr {ctr}");
    }
}
