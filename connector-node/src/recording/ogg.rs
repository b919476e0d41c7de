//! Ogg Opus writer (RFC 7845 on RFC 3533 pages): OpusHead, OpusTags, audio
//! pages with granule positions counted in 48 kHz samples including pre-skip.
//!
//! Output goes to any `Write`; the recorder gives it an encrypting writer.
//! Lost packets are written as zero-length Opus frames (TOC byte only), which
//! decoders conceal (RFC 6716 §3.2.1), so gaps never break the timeline.

use std::io::{self, Write};

/// libopus' usual encoder lookahead at 48 kHz.
pub const DEFAULT_PRE_SKIP: u16 = 312;
/// Flush a page at least this often (packets), so a crash loses little.
const PACKETS_PER_PAGE: usize = 50;

fn crc_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    for (i, e) in t.iter_mut().enumerate() {
        let mut r = (i as u32) << 24;
        for _ in 0..8 {
            r = if r & 0x8000_0000 != 0 {
                (r << 1) ^ 0x04c1_1db7
            } else {
                r << 1
            };
        }
        *e = r;
    }
    t
}

fn ogg_crc(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(crc_table);
    data.iter().fold(0u32, |crc, &b| {
        (crc << 8) ^ t[((crc >> 24) as u8 ^ b) as usize]
    })
}

/// Samples (at 48 kHz) in one Opus packet, from its TOC (RFC 6716 §3.1).
pub fn opus_packet_samples(packet: &[u8]) -> Option<u32> {
    let toc = *packet.first()?;
    let config = toc >> 3;
    let frame = match config {
        0..=11 => [480, 960, 1920, 2880][(config % 4) as usize],
        12..=15 => [480, 960][(config % 2) as usize],
        _ => [120, 240, 480, 960][(config % 4) as usize],
    };
    let frames = match toc & 3 {
        0 => 1,
        1 | 2 => 2,
        _ => u32::from(packet.get(1)? & 0x3f),
    };
    let total = frame * frames;
    // At most 120 ms per packet.
    (frames > 0 && total <= 5760).then_some(total)
}

pub struct OggOpusWriter<W: Write> {
    out: W,
    serial: u32,
    page_seq: u32,
    granule: u64,
    pre_skip: u16,
    segments: Vec<u8>,
    body: Vec<u8>,
    packets_in_page: usize,
    last_toc: Option<u8>,
}

impl<W: Write> std::fmt::Debug for OggOpusWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OggOpusWriter")
            .field("serial", &self.serial)
            .field("granule", &self.granule)
            .finish_non_exhaustive()
    }
}

impl<W: Write> OggOpusWriter<W> {
    /// Writes the two header pages at once.
    pub fn new(
        out: W,
        channels: u8,
        input_rate: u32,
        pre_skip: u16,
        vendor: &str,
    ) -> io::Result<Self> {
        let mut w = Self {
            out,
            serial: rand::random(),
            page_seq: 0,
            granule: 0,
            pre_skip,
            segments: Vec::new(),
            body: Vec::new(),
            packets_in_page: 0,
            last_toc: None,
        };
        let mut head = b"OpusHead".to_vec();
        head.push(1);
        head.push(channels);
        head.extend_from_slice(&pre_skip.to_le_bytes());
        head.extend_from_slice(&input_rate.to_le_bytes());
        head.extend_from_slice(&0i16.to_le_bytes());
        head.push(0);
        w.add_segments(&head);
        w.write_page(0x02, 0)?;
        let mut tags = b"OpusTags".to_vec();
        tags.extend_from_slice(&(vendor.len() as u32).to_le_bytes());
        tags.extend_from_slice(vendor.as_bytes());
        tags.extend_from_slice(&0u32.to_le_bytes());
        w.add_segments(&tags);
        w.write_page(0, 0)?;
        w.granule = u64::from(pre_skip);
        Ok(w)
    }

    fn add_segments(&mut self, packet: &[u8]) {
        let mut n = packet.len();
        while n >= 255 {
            self.segments.push(255);
            n -= 255;
        }
        self.segments.push(n as u8);
        self.body.extend_from_slice(packet);
    }

    fn write_page(&mut self, flags: u8, granule: u64) -> io::Result<()> {
        let mut page = Vec::with_capacity(27 + self.segments.len() + self.body.len());
        page.extend_from_slice(b"OggS");
        page.push(0);
        page.push(flags);
        page.extend_from_slice(&granule.to_le_bytes());
        page.extend_from_slice(&self.serial.to_le_bytes());
        page.extend_from_slice(&self.page_seq.to_le_bytes());
        page.extend_from_slice(&[0; 4]);
        page.push(self.segments.len() as u8);
        page.extend_from_slice(&self.segments);
        page.extend_from_slice(&self.body);
        let crc = ogg_crc(&page);
        page[22..26].copy_from_slice(&crc.to_le_bytes());
        self.out.write_all(&page)?;
        self.page_seq += 1;
        self.segments.clear();
        self.body.clear();
        self.packets_in_page = 0;
        Ok(())
    }

    /// Append one Opus packet. Invalid packets are refused, not written.
    pub fn write_packet(&mut self, packet: &[u8]) -> io::Result<()> {
        let samples = opus_packet_samples(packet)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an Opus packet"))?;
        // A packet needs len/255+1 lacing values; a page holds 255.
        if self.segments.len() + packet.len() / 255 + 1 > 255 {
            self.write_page(0, self.granule)?;
        }
        self.add_segments(packet);
        self.granule += u64::from(samples);
        self.last_toc = Some(packet[0] & 0xfc);
        self.packets_in_page += 1;
        if self.packets_in_page >= PACKETS_PER_PAGE {
            self.write_page(0, self.granule)?;
        }
        Ok(())
    }

    /// Conceal `count` lost packets with zero-length frames of the last packet's mode.
    pub fn write_lost(&mut self, count: u32) -> io::Result<()> {
        let Some(toc) = self.last_toc else {
            return Ok(());
        };
        for _ in 0..count.min(500) {
            self.write_packet(&[toc])?;
        }
        Ok(())
    }

    /// Flush buffered packets as a page (e.g. once a second).
    pub fn flush_page(&mut self) -> io::Result<()> {
        if !self.segments.is_empty() {
            self.write_page(0, self.granule)?;
        }
        self.out.flush()
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }

    pub fn get_ref(&self) -> &W {
        &self.out
    }

    /// Playable duration so far, in 48 kHz samples.
    pub fn duration_samples(&self) -> u64 {
        self.granule - u64::from(self.pre_skip)
    }

    /// Write the end-of-stream page and return the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.write_page(0x04, self.granule)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_durations_from_toc() {
        assert_eq!(opus_packet_samples(&[0xf8, 0]), Some(960)); // CELT FB 20 ms
        assert_eq!(opus_packet_samples(&[0x78]), Some(960)); // hybrid FB 20 ms
        assert_eq!(opus_packet_samples(&[0x0b << 3 | 1]), Some(5760)); // 60 ms x2
        assert_eq!(opus_packet_samples(&[0x03, 0x02]), Some(960)); // code 3, 2 frames of 10 ms
        assert_eq!(opus_packet_samples(&[0x03, 0x00]), None);
        assert_eq!(opus_packet_samples(&[]), None);
    }

    #[test]
    fn pages_and_granules() {
        let mut w = OggOpusWriter::new(Vec::new(), 1, 48000, DEFAULT_PRE_SKIP, "conclave").unwrap();
        for _ in 0..120 {
            w.write_packet(&[0xf8, 1, 2, 3]).unwrap();
        }
        w.write_lost(5).unwrap();
        assert_eq!(w.duration_samples(), 125 * 960);
        assert!(w.write_packet(&[]).is_err());
        let bytes = w.finish().unwrap();
        let pages: Vec<usize> = bytes
            .windows(4)
            .enumerate()
            .filter(|(_, w)| w == b"OggS")
            .map(|(i, _)| i)
            .collect();
        // 2 header pages + 2 full pages of 50 + the EOS page with the last 25.
        assert_eq!(pages.len(), 2 + 2 + 1);
        let last = *pages.last().unwrap();
        assert_eq!(bytes[last + 5], 0x04, "EOS flag");
        let granule = u64::from_le_bytes(bytes[last + 6..last + 14].try_into().unwrap());
        assert_eq!(granule, u64::from(DEFAULT_PRE_SKIP) + 125 * 960);
        // Every page's CRC verifies.
        for (n, &p) in pages.iter().enumerate() {
            let end = pages.get(n + 1).copied().unwrap_or(bytes.len());
            let mut page = bytes[p..end].to_vec();
            let crc = u32::from_le_bytes(page[22..26].try_into().unwrap());
            page[22..26].fill(0);
            assert_eq!(ogg_crc(&page), crc);
        }
    }
}
