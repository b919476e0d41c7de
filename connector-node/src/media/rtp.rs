//! RTP packets (RFC 3550 §5.1): parse and build, bounded.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RtpError {
    #[error("packet shorter than its header")]
    Short,
    #[error("RTP version is not 2")]
    Version,
    #[error("bad padding")]
    Padding,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtpHeader {
    pub marker: bool,
    pub pt: u8,
    pub seq: u16,
    pub ts: u32,
    pub ssrc: u32,
    /// Length of the header including CSRCs and extension.
    pub len: usize,
}

/// Parse the header; the payload is `pkt[h.len..pkt.len() - padding]`.
pub fn parse(pkt: &[u8]) -> Result<(RtpHeader, &[u8]), RtpError> {
    if pkt.len() < 12 {
        return Err(RtpError::Short);
    }
    if pkt[0] >> 6 != 2 {
        return Err(RtpError::Version);
    }
    let cc = (pkt[0] & 0x0f) as usize;
    let mut len = 12 + 4 * cc;
    if pkt.len() < len {
        return Err(RtpError::Short);
    }
    if pkt[0] & 0x10 != 0 {
        if pkt.len() < len + 4 {
            return Err(RtpError::Short);
        }
        let words = u16::from_be_bytes([pkt[len + 2], pkt[len + 3]]) as usize;
        len += 4 + 4 * words;
        if pkt.len() < len {
            return Err(RtpError::Short);
        }
    }
    let mut end = pkt.len();
    if pkt[0] & 0x20 != 0 {
        let pad = pkt[end - 1] as usize;
        if pad == 0 || len + pad > end {
            return Err(RtpError::Padding);
        }
        end -= pad;
    }
    let h = RtpHeader {
        marker: pkt[1] & 0x80 != 0,
        pt: pkt[1] & 0x7f,
        seq: u16::from_be_bytes([pkt[2], pkt[3]]),
        ts: u32::from_be_bytes([pkt[4], pkt[5], pkt[6], pkt[7]]),
        ssrc: u32::from_be_bytes([pkt[8], pkt[9], pkt[10], pkt[11]]),
        len,
    };
    Ok((h, &pkt[len..end]))
}

/// Whether a datagram on the RTP port is RTCP (RFC 5761 §4): PT 64-95 after masking M.
pub fn is_rtcp(pkt: &[u8]) -> bool {
    pkt.len() >= 2 && (192..=223).contains(&pkt[1])
}

pub fn build(marker: bool, pt: u8, seq: u16, ts: u32, ssrc: u32, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(12 + payload.len() + 10);
    p.push(0x80);
    p.push((u8::from(marker) << 7) | (pt & 0x7f));
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&ts.to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_bounds() {
        let p = build(true, 0, 65535, 160, 0xdeadbeef, &[1, 2, 3]);
        let (h, pl) = parse(&p).unwrap();
        assert!(h.marker);
        assert_eq!(
            (h.pt, h.seq, h.ts, h.ssrc, h.len),
            (0, 65535, 160, 0xdeadbeef, 12)
        );
        assert_eq!(pl, &[1, 2, 3]);
        assert_eq!(parse(&p[..11]), Err(RtpError::Short));
        let mut ext = p.clone();
        ext[0] |= 0x10;
        assert_eq!(parse(&ext), Err(RtpError::Short));
        let mut pad = p.clone();
        pad[0] |= 0x20;
        *pad.last_mut().unwrap() = 200;
        assert_eq!(parse(&pad), Err(RtpError::Padding));
        let mut v1 = p;
        v1[0] = 0x40;
        assert_eq!(parse(&v1), Err(RtpError::Version));
        assert!(is_rtcp(&[0x80, 200, 0, 1]));
        assert!(!is_rtcp(&[0x80, 0, 0, 1]));
    }
}
