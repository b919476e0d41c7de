//! Any counter sequence: the window accepts each counter at most once.
#![no_main]
use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use meeting_proto::wire::ReplayWindow;

fuzz_target!(|data: &[u8]| {
    let mut w = ReplayWindow::default();
    let mut accepted = HashSet::new();
    for chunk in data.chunks_exact(8) {
        let ctr = u64::from_be_bytes(chunk.try_into().unwrap());
        if w.accept(ctr).is_ok() {
            assert!(accepted.insert(ctr), "counter {ctr} accepted twice");
        }
    }
});
