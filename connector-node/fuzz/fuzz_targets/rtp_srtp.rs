#![no_main]
//! Any bytes as RTP and as SRTP: parse and unprotect must not panic.

use connector_node::media::{rtp, srtp::SrtpContext};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = rtp::parse(data);
    let mut ctx = SrtpContext::new(&[3u8; 30]);
    let mut pkt = data.to_vec();
    let _ = ctx.unprotect(&mut pkt);
});
