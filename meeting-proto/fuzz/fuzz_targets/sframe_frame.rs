//! SFrame headers and frames from the network: decoding never panics, a
//! decoded header re-encodes to a prefix that decodes the same, and a frame
//! sealed from fuzzer-chosen inputs opens back to the same payload while any
//! change to it is refused.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meeting_proto::sframe::{CipherSuite, Header, Key, MAX_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok((h, len)) = Header::decode(data) {
        assert!(len <= data.len() && len <= MAX_HEADER_LEN);
        let mut buf = [0u8; MAX_HEADER_LEN];
        let n = Header { kid: h.kid, ctr: h.ctr }.encode(&mut buf);
        assert!(n <= len, "minimal encoding is never longer");
        assert_eq!(Header::decode(&buf[..n]), Ok((h, n)));
    }
    // Seal what the fuzzer gives, then open it and a tampered copy.
    let (meta, payload) = data.split_at(data.len().min(18));
    let ctr = data.len() as u64 * 0x0101;
    let key = Key::derive(CipherSuite::AesGcm128Sha256, 7, &[9; 32]).unwrap();
    let mut frame = Vec::new();
    key.seal_append(ctr, meta, payload, &mut frame).unwrap();
    let (h, hlen) = Header::decode(&frame).unwrap();
    assert_eq!((h.kid, h.ctr), (7, ctr));
    let (hdr, body) = frame.split_at(hlen);
    let mut buf = body.to_vec();
    let n = key.open_in_place(ctr, hdr, meta, &mut buf).unwrap();
    assert_eq!(&buf[..n], payload);
    let mut bad = body.to_vec();
    let i = data.first().map_or(0, |&b| b as usize) % bad.len();
    bad[i] ^= 1;
    assert!(key.open_in_place(ctr, hdr, meta, &mut bad).is_err());
});
