//! Any datagram: parse never panics, and whatever parses re-encodes to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meeting_proto::wire::Packet;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = Packet::parse(data) {
        let again = p.to_vec().expect("a parsed packet encodes");
        assert_eq!(again, data, "parse/encode is not a bijection for {p:?}");
    }
});
