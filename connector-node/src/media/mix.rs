//! One track from several participants' PCM frames (the phone's ear, the
//! live stream, the recording's mixed track).
//!
//! A plain sum overflows when several people are loud at once, and a hard
//! clamp turns every overflow into a flat-topped, buzzing wave. Levels up to
//! three quarters of full scale pass untouched; above that a soft knee bends
//! the sum towards full scale, so loud moments get quieter instead of harsh.

/// Where the soft knee starts: 3/4 of full scale.
const KNEE: f32 = 24_576.0;
const FULL: f32 = 32_767.0;

/// Sums `frames` sample by sample into `samples` samples (shorter frames
/// count as silence after their end) and limits the result to 16 bits.
pub fn mix<F: AsRef<[i16]>>(frames: impl IntoIterator<Item = F>, samples: usize) -> Vec<i16> {
    let mut sum = vec![0i32; samples];
    for f in frames {
        for (m, &s) in sum.iter_mut().zip(f.as_ref()) {
            *m += i32::from(s);
        }
    }
    sum.into_iter().map(limit).collect()
}

/// Identity up to the knee; above it `KNEE + (FULL - KNEE) * tanh(excess)`,
/// continuous and with slope 1 at the knee, approaching full scale.
fn limit(sum: i32) -> i16 {
    let magnitude = sum.unsigned_abs() as f32;
    if magnitude <= KNEE {
        return sum as i16;
    }
    let room = FULL - KNEE;
    let bent = KNEE + room * ((magnitude - KNEE) / room).tanh();
    (bent.round().min(FULL) as i16) * sum.signum() as i16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_levels_pass_untouched_and_shorter_frames_are_silence_after_their_end() {
        let a = [1000i16, -2000, 24_576, -24_576];
        let b = [500i16, 500];
        assert_eq!(mix([&a[..], &b[..]], 4), vec![1500, -1500, 24_576, -24_576]);
        assert_eq!(mix(Vec::<Vec<i16>>::new(), 3), vec![0, 0, 0]);
    }

    #[test]
    fn loud_sums_bend_smoothly_and_stay_in_range() {
        let mut last = limit(0);
        for sum in (0..=400_000).step_by(97) {
            let y = limit(sum);
            assert!(y >= last, "not monotonic at {sum}");
            assert_eq!(limit(-sum), -y, "not symmetric at {sum}");
            last = y;
        }
        assert_eq!(limit(i32::MAX), 32_767);
        assert_eq!(limit(i32::MIN + 1), -32_767);
        // Just above the knee the slope is still about 1: no audible corner.
        assert!((limit(24_676) - limit(24_576) - 100).abs() <= 1);
        // What the old clamp flattened to full scale is still shaped.
        assert!(limit(32_767) < limit(40_000) && limit(40_000) < 32_767);
    }
}
