//! Audio: Opus (libopus) at 48 kHz mono in 20 ms frames, WAV in and out,
//! a tone generator and a tone detector (Goertzel) used to check that what
//! arrives is what was sent.

use std::path::Path;

/// Samples per second everywhere in Conclave audio.
pub const SAMPLE_RATE: u32 = 48_000;
/// Samples in one 20 ms frame: 50 frames (packets) per second.
pub const FRAME_SAMPLES: usize = 960;
/// Largest Opus packet we produce.
pub const MAX_OPUS_PACKET: usize = 400;

#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    #[error("opus: {0}")]
    Opus(#[from] opus::Error),
    #[error("wav: {0}")]
    Wav(#[from] hound::Error),
    #[error("{path}: WAV must be {SAMPLE_RATE} Hz 16-bit PCM (got {rate} Hz, {bits}-bit)")]
    WavFormat { path: String, rate: u32, bits: u16 },
}

/// Encodes 20 ms mono frames.
pub struct Encoder(opus::Encoder);

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Encoder(opus 48k mono)")
    }
}

impl Encoder {
    pub fn new() -> Result<Self, AudioError> {
        let mut e = opus::Encoder::new(SAMPLE_RATE, opus::Channels::Mono, opus::Application::Voip)?;
        e.set_bitrate(opus::Bitrate::Bits(32_000))?;
        Ok(Self(e))
    }

    /// `pcm` must hold exactly [`FRAME_SAMPLES`] samples.
    pub fn encode(&mut self, pcm: &[i16]) -> Result<Vec<u8>, AudioError> {
        Ok(self.0.encode_vec(pcm, MAX_OPUS_PACKET)?)
    }
}

/// Decodes one sender's Opus stream.
pub struct Decoder(opus::Decoder);

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decoder(opus 48k mono)")
    }
}

impl Decoder {
    pub fn new() -> Result<Self, AudioError> {
        Ok(Self(opus::Decoder::new(SAMPLE_RATE, opus::Channels::Mono)?))
    }

    pub fn decode(&mut self, packet: &[u8]) -> Result<Vec<i16>, AudioError> {
        let mut out = vec![0i16; FRAME_SAMPLES * 6];
        let n = self.0.decode(packet, &mut out, false)?;
        out.truncate(n);
        Ok(out)
    }
}

/// A sine tone of `freq` Hz, `seconds` long, at 30% of full scale.
pub fn tone(freq: f64, seconds: f64) -> Vec<i16> {
    let n = (seconds * SAMPLE_RATE as f64) as usize;
    (0..n)
        .map(|i| {
            let t = i as f64 / SAMPLE_RATE as f64;
            ((2.0 * std::f64::consts::PI * freq * t).sin() * 0.3 * i16::MAX as f64) as i16
        })
        .collect()
}

/// Reads a mono (or first channel of a multi-channel) 48 kHz 16-bit WAV.
pub fn read_wav(path: &Path) -> Result<Vec<i16>, AudioError> {
    let mut r = hound::WavReader::open(path)?;
    let spec = r.spec();
    if spec.sample_rate != SAMPLE_RATE
        || spec.bits_per_sample != 16
        || spec.sample_format != hound::SampleFormat::Int
    {
        return Err(AudioError::WavFormat {
            path: path.display().to_string(),
            rate: spec.sample_rate,
            bits: spec.bits_per_sample,
        });
    }
    let ch = spec.channels.max(1) as usize;
    let all: Result<Vec<i16>, _> = r.samples::<i16>().collect();
    Ok(all?.into_iter().step_by(ch).collect())
}

/// Writes mono 48 kHz 16-bit PCM.
pub fn write_wav(path: &Path, samples: &[i16]) -> Result<(), AudioError> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: SAMPLE_RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec)?;
    for s in samples {
        w.write_sample(*s)?;
    }
    w.finalize()?;
    Ok(())
}

/// Power of `freq` in `samples` (Goertzel), normalised by length.
pub fn tone_power(samples: &[i16], freq: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let w = 2.0 * std::f64::consts::PI * freq / SAMPLE_RATE as f64;
    let coeff = 2.0 * w.cos();
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for &x in samples {
        let s0 = x as f64 + coeff * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    (s1 * s1 + s2 * s2 - coeff * s1 * s2) / (samples.len() as f64).powi(2)
}

/// The strongest frequency between 100 Hz and 4 kHz in 10 Hz steps.
pub fn dominant_frequency(samples: &[i16]) -> f64 {
    (10..=400)
        .map(|k| k as f64 * 10.0)
        .map(|f| (f, tone_power(samples, f)))
        .fold((0.0, -1.0), |best, x| if x.1 > best.1 { x } else { best })
        .0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opus_round_trip_keeps_the_tone() {
        let pcm = tone(660.0, 1.0);
        let mut enc = Encoder::new().unwrap();
        let mut dec = Decoder::new().unwrap();
        let mut out = Vec::new();
        for frame in pcm.chunks_exact(FRAME_SAMPLES) {
            let packet = enc.encode(frame).unwrap();
            assert!(packet.len() < 200, "32 kb/s gives ~80-byte packets");
            out.extend(dec.decode(&packet).unwrap());
        }
        assert_eq!(out.len(), pcm.len());
        let f = dominant_frequency(&out[FRAME_SAMPLES * 5..]);
        assert!((f - 660.0).abs() <= 10.0, "dominant {f} Hz");
        assert!(tone_power(&out, 660.0) > 100.0 * tone_power(&out, 440.0));
    }

    #[test]
    fn wav_round_trip_and_format_check() {
        let dir = std::env::temp_dir().join(format!("cc-wav-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t.wav");
        let pcm = tone(440.0, 0.1);
        write_wav(&p, &pcm).unwrap();
        assert_eq!(read_wav(&p).unwrap(), pcm);
        let bad = dir.join("bad.wav");
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 8000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        hound::WavWriter::create(&bad, spec)
            .unwrap()
            .finalize()
            .unwrap();
        assert!(matches!(
            read_wav(&bad),
            Err(AudioError::WavFormat { rate: 8000, .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
