//! Audio measurements: tone synthesis and Goertzel power, used to prove
//! that audio crossed a leg (tests) and by the phone-leg health probe.

/// `n` samples of a sine at `freq` Hz, amplitude `amp`, starting at sample `start`.
pub fn sine(freq: f32, rate: u32, amp: f32, start: usize, n: usize) -> Vec<i16> {
    (start..start + n)
        .map(|i| (amp * (2.0 * std::f32::consts::PI * freq * i as f32 / rate as f32).sin()) as i16)
        .collect()
}

/// Fraction of the signal's energy at `freq` (0..1), by the Goertzel filter.
pub fn tone_ratio(samples: &[i16], freq: f32, rate: u32) -> f32 {
    if samples.is_empty() {
        return 0.0;
    }
    let w = 2.0 * std::f32::consts::PI * freq / rate as f32;
    let coeff = 2.0 * w.cos();
    let (mut s1, mut s2) = (0f32, 0f32);
    let mut energy = 0f32;
    for &x in samples {
        let x = f32::from(x);
        energy += x * x;
        let s = x + coeff * s1 - s2;
        s2 = s1;
        s1 = s;
    }
    let power = s1 * s1 + s2 * s2 - coeff * s1 * s2;
    if energy == 0.0 {
        return 0.0;
    }
    (2.0 * power / (samples.len() as f32 * energy)).min(1.0)
}

/// Root-mean-square level.
pub fn rms(samples: &[i16]) -> f32 {
    if samples.is_empty() {
        return 0.0;
    }
    let sum: f64 = samples.iter().map(|&s| f64::from(s) * f64::from(s)).sum();
    (sum / samples.len() as f64).sqrt() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_the_right_tone() {
        let s = sine(440.0, 8000, 8000.0, 0, 1600);
        assert!(tone_ratio(&s, 440.0, 8000) > 0.9);
        assert!(tone_ratio(&s, 1000.0, 8000) < 0.05);
        assert!((rms(&s) - 8000.0 / 2f32.sqrt()).abs() < 100.0);
        assert_eq!(tone_ratio(&[0; 100], 440.0, 8000), 0.0);
    }
}
