//! Jitter buffer with packet-loss concealment for 20 ms PCM frames.
//!
//! Sans-IO: the shell pushes decoded frames as packets arrive and pops one
//! frame per 20 ms tick. A missing frame is concealed by repeating the last
//! good one with decaying gain (a short gap sounds like a held sound rather
//! than a click), and becomes silence after a few frames. Late and duplicate
//! packets are dropped and counted.

use std::collections::BTreeMap;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct JitterStats {
    pub played: u64,
    pub concealed: u64,
    pub late: u64,
    pub overflow: u64,
}

#[derive(Debug)]
pub struct JitterBuffer {
    frame_len: usize,
    prefetch: usize,
    max_frames: usize,
    frames: BTreeMap<u64, Vec<i16>>,
    /// Next extended sequence number to play; None until prefetch is reached.
    next: Option<u64>,
    highest: Option<u64>,
    last: Vec<i16>,
    lost_run: u32,
    pub stats: JitterStats,
}

/// Frames of concealment before output becomes silence.
const MAX_CONCEAL: u32 = 5;

impl JitterBuffer {
    /// `prefetch` frames are buffered before playout starts; at most `max_frames` are held.
    pub fn new(frame_len: usize, prefetch: usize, max_frames: usize) -> Self {
        Self {
            frame_len,
            prefetch: prefetch.max(1),
            max_frames: max_frames.max(prefetch + 1),
            frames: BTreeMap::new(),
            next: None,
            highest: None,
            last: vec![0; frame_len],
            lost_run: 0,
            stats: JitterStats::default(),
        }
    }

    fn extend(&self, seq: u16) -> u64 {
        let Some(h) = self.highest else {
            return u64::from(seq) + (1 << 16);
        };
        let cycle = h & !0xffff;
        let candidates = [
            cycle.wrapping_sub(1 << 16) | u64::from(seq),
            cycle | u64::from(seq),
            (cycle + (1 << 16)) | u64::from(seq),
        ];
        candidates
            .into_iter()
            .min_by_key(|c| c.abs_diff(h))
            .unwrap_or(cycle | u64::from(seq))
    }

    pub fn push(&mut self, seq: u16, mut samples: Vec<i16>) {
        let ext = self.extend(seq);
        if self.next.is_some_and(|n| ext < n) || self.frames.contains_key(&ext) {
            self.stats.late += 1;
            return;
        }
        samples.resize(self.frame_len, 0);
        self.highest = Some(self.highest.map_or(ext, |h| h.max(ext)));
        self.frames.insert(ext, samples);
        while self.frames.len() > self.max_frames {
            if let Some((k, _)) = self.frames.pop_first() {
                self.stats.overflow += 1;
                self.next = Some(k + 1);
            }
        }
        if self.next.is_none() && self.frames.len() >= self.prefetch {
            self.next = self.frames.keys().next().copied();
        }
    }

    /// One frame of output for this tick.
    pub fn pop(&mut self) -> Vec<i16> {
        let Some(n) = self.next else {
            return vec![0; self.frame_len];
        };
        if let Some(f) = self.frames.remove(&n) {
            self.next = Some(n + 1);
            self.stats.played += 1;
            self.lost_run = 0;
            self.last.clone_from(&f);
            return f;
        }
        self.stats.concealed += 1;
        self.lost_run += 1;
        if self.frames.is_empty() {
            if self.lost_run > MAX_CONCEAL {
                // The sender paused: wait for prefetch again rather than
                // spending the buffer on every frame that arrives.
                self.next = None;
            } else {
                self.next = Some(n + 1);
            }
        } else {
            self.next = Some(n + 1);
        }
        if self.lost_run > MAX_CONCEAL {
            return vec![0; self.frame_len];
        }
        let gain = 0.6f32.powi(self.lost_run as i32);
        self.last
            .iter()
            .map(|&s| (f32::from(s) * gain) as i16)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(v: i16) -> Vec<i16> {
        vec![v; 4]
    }

    #[test]
    fn reorders_conceals_and_drops_late() {
        let mut j = JitterBuffer::new(4, 2, 8);
        j.push(65534, frame(100));
        assert_eq!(j.pop(), frame(0), "still prefetching");
        j.push(0, frame(300)); // 65535 lost, sequence wraps
        j.push(65535u16.wrapping_add(2), frame(400));
        assert_eq!(j.pop(), frame(100));
        let c = j.pop();
        assert!(c[0] > 0 && c[0] < 100, "concealed frame decays: {c:?}");
        j.push(65535, frame(200)); // arrives after its slot: late
        assert_eq!(j.stats.late, 1);
        assert_eq!(j.pop(), frame(300));
        assert_eq!(j.pop(), frame(400));
        assert_eq!(
            j.stats,
            JitterStats {
                played: 3,
                concealed: 1,
                late: 1,
                overflow: 0
            }
        );
    }

    #[test]
    fn concealment_fades_to_silence_and_rebuffers() {
        let mut j = JitterBuffer::new(4, 1, 8);
        j.push(10, frame(1000));
        assert_eq!(j.pop(), frame(1000));
        let mut last = 1000;
        for _ in 0..MAX_CONCEAL {
            let c = j.pop()[0];
            assert!(c < last);
            last = c;
        }
        assert_eq!(j.pop(), frame(0));
        j.push(50, frame(7));
        assert_eq!(j.pop(), frame(7), "resynchronised after a pause");
    }

    #[test]
    fn overflow_drops_oldest() {
        let mut j = JitterBuffer::new(4, 1, 3);
        for s in 0..6u16 {
            j.push(s, frame(s as i16));
        }
        assert_eq!(j.stats.overflow, 3);
        assert_eq!(
            j.pop(),
            frame(3),
            "playout skipped to the oldest frame kept"
        );
    }
}
