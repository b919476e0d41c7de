//! Any MEDIA datagram at a receiver: opening never panics and never succeeds
//! (nothing was sealed with this meeting's key), copying or in place.
#![no_main]
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use meeting_proto::ids::MeetingId;
use meeting_proto::media_crypto::Receiver;
use meeting_proto::media_keys::EpochKey;

fuzz_target!(|data: &[u8]| {
    let meeting = MeetingId::new("fuzz").unwrap();
    let mut rx = Receiver::new(meeting.clone(), Duration::from_secs(5));
    let now = Instant::now();
    rx.set_epoch(EpochKey::new(meeting, 0, &[1u8; 32]).unwrap(), now);
    let copied = rx.open(data, now);
    assert!(copied.is_err());
    let mut buf = data.to_vec();
    assert_eq!(rx.open_in_place(&mut buf, now).err(), copied.err());
});
