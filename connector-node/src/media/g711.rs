//! G.711 µ-law and A-law (ITU-T G.711), 16-bit linear PCM in and out.

const BIAS: i32 = 0x84;
const CLIP: i32 = 32635;

pub fn linear_to_ulaw(sample: i16) -> u8 {
    let mut s = i32::from(sample);
    let sign = if s < 0 {
        s = -s;
        0x80
    } else {
        0
    };
    s = s.min(CLIP) + BIAS;
    let exponent = (7 - (s.leading_zeros() as i32 - 17)).clamp(0, 7);
    let mantissa = (s >> (exponent + 3)) & 0x0f;
    !(sign | (exponent << 4) as u8 | mantissa as u8)
}

pub fn ulaw_to_linear(u: u8) -> i16 {
    let u = !u;
    let exponent = i32::from((u >> 4) & 0x07);
    let mantissa = i32::from(u & 0x0f);
    let s = (((mantissa << 3) + BIAS) << exponent) - BIAS;
    (if u & 0x80 != 0 { -s } else { s }) as i16
}

pub fn linear_to_alaw(sample: i16) -> u8 {
    let mut s = i32::from(sample) >> 3;
    let sign = if s >= 0 {
        0x80
    } else {
        s = -s - 1;
        0
    };
    let a = if s < 32 {
        (s >> 1) as u8
    } else {
        let exponent = (31 - (s as u32).leading_zeros() as i32 - 4).clamp(1, 7);
        let mantissa = (s >> exponent) & 0x0f;
        ((exponent << 4) as u8) | mantissa as u8
    };
    (a.min(0x7f) | sign) ^ 0x55
}

pub fn alaw_to_linear(a: u8) -> i16 {
    let a = a ^ 0x55;
    let exponent = i32::from((a >> 4) & 0x07);
    let mantissa = i32::from(a & 0x0f);
    let s = if exponent == 0 {
        (mantissa << 4) + 8
    } else {
        ((mantissa << 4) + 0x108) << (exponent - 1)
    };
    (if a & 0x80 != 0 { s } else { -s }) as i16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_codes() {
        assert_eq!(linear_to_ulaw(0), 0xff);
        assert_eq!(linear_to_ulaw(-1), 0x7f);
        assert_eq!(linear_to_ulaw(i16::MAX), 0x80);
        assert_eq!(linear_to_ulaw(i16::MIN), 0x00);
        assert_eq!(ulaw_to_linear(0xff), 0);
        assert_eq!(ulaw_to_linear(0x80), 32124);
        assert_eq!(linear_to_alaw(0), 0xd5);
        assert_eq!(alaw_to_linear(0xd5), 8);
        assert_eq!(alaw_to_linear(0xaa), 32256);
        assert_eq!(alaw_to_linear(0x2a), -32256);
    }

    #[test]
    fn decode_encode_is_identity_on_codes() {
        for c in 0..=255u8 {
            assert_eq!(
                linear_to_ulaw(ulaw_to_linear(c)),
                if c == 0x7f { 0xff } else { c }
            );
            assert_eq!(linear_to_alaw(alaw_to_linear(c)), c, "alaw {c:#x}");
        }
    }

    #[test]
    fn quantisation_error_is_bounded() {
        for s in (i16::MIN..=i16::MAX).step_by(7) {
            let e = (i32::from(ulaw_to_linear(linear_to_ulaw(s))) - i32::from(s)).abs();
            let ea = (i32::from(alaw_to_linear(linear_to_alaw(s))) - i32::from(s)).abs();
            let bound = (i32::from(s).abs() / 16).max(16) + 8;
            assert!(e <= bound, "ulaw {s}: {e}");
            assert!(ea <= bound + 16, "alaw {s}: {ea}");
        }
    }
}
