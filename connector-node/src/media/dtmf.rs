//! RFC 4733 telephone-events: DTMF digits from RTP, each reported once
//! although the sender repeats packets (and the end packet three times).

#[derive(Debug, Default)]
pub struct DtmfReceiver {
    /// RTP timestamp of the event already reported.
    last_event_ts: Option<u32>,
}

fn digit(event: u8) -> Option<char> {
    Some(match event {
        0..=9 => (b'0' + event) as char,
        10 => '*',
        11 => '#',
        12..=15 => (b'A' + event - 12) as char,
        _ => return None,
    })
}

impl DtmfReceiver {
    /// Feed a telephone-event payload with its RTP timestamp; returns a digit
    /// the first time an event is seen. Unknown events and short payloads are ignored.
    pub fn on_payload(&mut self, ts: u32, payload: &[u8]) -> Option<char> {
        if payload.len() < 4 || self.last_event_ts == Some(ts) {
            return None;
        }
        let d = digit(payload[0])?;
        self.last_event_ts = Some(ts);
        Some(d)
    }
}

/// The payloads (event, end flag, duration) a sender emits for one digit,
/// 20 ms apart; the end packet is sent three times (RFC 4733 §2.5.1.4).
pub fn event_payloads(d: char, packets: u16) -> Vec<[u8; 4]> {
    let event = match d {
        '0'..='9' => d as u8 - b'0',
        '*' => 10,
        '#' => 11,
        'A'..='D' => d as u8 - b'A' + 12,
        _ => return Vec::new(),
    };
    let mut out = Vec::new();
    for i in 1..=packets {
        let dur = (i * 160).to_be_bytes();
        let end = i == packets;
        let p = [event, if end { 0x80 | 10 } else { 10 }, dur[0], dur[1]];
        out.push(p);
        if end {
            out.push(p);
            out.push(p);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_digit_once() {
        let mut r = DtmfReceiver::default();
        let mut got = String::new();
        for (i, d) in "12#".chars().enumerate() {
            for p in event_payloads(d, 5) {
                if let Some(c) = r.on_payload(1000 + i as u32 * 800, &p) {
                    got.push(c);
                }
            }
        }
        assert_eq!(got, "12#");
        assert_eq!(r.on_payload(5, &[99, 0, 0, 0]), None);
        assert_eq!(r.on_payload(6, &[1, 0]), None);
        assert!(event_payloads('x', 3).is_empty());
    }
}
