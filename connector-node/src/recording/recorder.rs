//! One meeting's recording on disk: an Ogg Opus file per participant, a
//! mixed track, a chat transcript (JSON lines) and a manifest, each an
//! encrypted container under one data key.
//!
//! The meeting side feeds decrypted Opus packets, chat and roster changes;
//! `tick` (every 20 ms) mixes and `flush` (every second) seals chunks, so a
//! killed pod leaves files that decrypt up to the last second.

use crate::media::mix::mix;
use crate::recording::container::{ChunkWriter, DataKey};
use crate::recording::ogg::{DEFAULT_PRE_SKIP, OggOpusWriter};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const RATE: u32 = 48_000;
const FRAME: usize = 960;
/// Frames of decoded audio queued per participant for the mixer.
const MIX_QUEUE: usize = 10;

type OpusFile = OggOpusWriter<ChunkWriter<File>>;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ParticipantEntry {
    pub id: u64,
    pub name: String,
    pub file: String,
    pub joined_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left_at_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub meeting: String,
    pub started_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at_ms: Option<u64>,
    pub participants: Vec<ParticipantEntry>,
    pub mixed: String,
    pub chat: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChatLine {
    pub at_ms: u64,
    pub participant: u64,
    pub name: String,
    pub text: String,
}

struct Track {
    writer: OpusFile,
    next_seq: Option<u16>,
    decoder: opus::Decoder,
    pcm: VecDeque<Vec<i16>>,
}

pub struct Recorder {
    dir: PathBuf,
    key: DataKey,
    wrapped: Vec<u8>,
    tracks: BTreeMap<u64, Track>,
    mixed: OpusFile,
    encoder: opus::Encoder,
    chat: ChunkWriter<File>,
    manifest: Manifest,
    /// Files of participants who left, as closed.
    closed_bytes: u64,
    /// Every manifest written so far, and the ones since replaced.
    manifest_written: u64,
    manifest_replaced: u64,
    manifest_len: u64,
}

/// A recording's size, kept in memory rather than asked of the file system.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecordingSize {
    /// Ciphertext bytes ever written (monotonic: replaced manifests count).
    pub written: u64,
    /// Bytes its files take now (replaced manifests do not count).
    pub on_disk: u64,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("dir", &self.dir)
            .field("tracks", &self.tracks.len())
            .finish_non_exhaustive()
    }
}

fn opus_err(e: opus::Error) -> io::Error {
    io::Error::other(format!("opus: {e}"))
}

fn create(dir: &Path, key: &DataKey, wrapped: &[u8], name: &str) -> io::Result<ChunkWriter<File>> {
    let f = File::options()
        .write(true)
        .create_new(true)
        .open(dir.join(format!("{name}.enc")))?;
    ChunkWriter::new(f, key, wrapped, name)
}

impl Recorder {
    /// Start a recording in `dir` (created; must not exist yet).
    pub fn create(
        dir: &Path,
        meeting: &str,
        key: DataKey,
        wrapped: Vec<u8>,
        now_ms: u64,
    ) -> io::Result<Self> {
        std::fs::create_dir_all(dir.parent().unwrap_or(Path::new(".")))?;
        std::fs::create_dir(dir)?;
        let mut encoder = opus::Encoder::new(RATE, opus::Channels::Mono, opus::Application::Audio)
            .map_err(opus_err)?;
        let pre_skip = encoder
            .get_lookahead()
            .ok()
            .and_then(|l| u16::try_from(l).ok())
            .unwrap_or(DEFAULT_PRE_SKIP);
        let mixed = OggOpusWriter::new(
            create(dir, &key, &wrapped, "mixed.opus")?,
            1,
            RATE,
            pre_skip,
            "conclave",
        )?;
        let chat = create(dir, &key, &wrapped, "chat.jsonl")?;
        let mut r = Self {
            dir: dir.to_path_buf(),
            key,
            wrapped,
            tracks: BTreeMap::new(),
            mixed,
            encoder,
            chat,
            manifest: Manifest {
                meeting: meeting.to_string(),
                started_at_ms: now_ms,
                ended_at_ms: None,
                participants: Vec::new(),
                mixed: "mixed.opus".into(),
                chat: "chat.jsonl".into(),
            },
            closed_bytes: 0,
            manifest_written: 0,
            manifest_replaced: 0,
            manifest_len: 0,
        };
        r.write_manifest()?;
        Ok(r)
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn write_manifest(&mut self) -> io::Result<()> {
        let len = write_manifest(&self.dir, &self.key, &self.wrapped, &self.manifest)?;
        self.manifest_account(len);
        Ok(())
    }

    fn manifest_account(&mut self, len: u64) {
        self.manifest_written += len;
        self.manifest_replaced += self.manifest_len;
        self.manifest_len = len;
    }

    /// The recording's size now, from the writers' own counts (no stat calls).
    pub fn size(&self) -> RecordingSize {
        let open: u64 = self
            .tracks
            .values()
            .map(|t| t.writer.get_ref().bytes_written())
            .sum::<u64>()
            + self.mixed.get_ref().bytes_written()
            + self.chat.bytes_written();
        let written = self.closed_bytes + open + self.manifest_written;
        RecordingSize {
            written,
            on_disk: written - self.manifest_replaced,
        }
    }

    pub fn participant_joined(&mut self, id: u64, name: &str, now_ms: u64) -> io::Result<()> {
        if self.tracks.contains_key(&id) {
            return Ok(());
        }
        let file = format!("participant-{id}.opus");
        let writer = OggOpusWriter::new(
            create(&self.dir, &self.key, &self.wrapped, &file)?,
            1,
            RATE,
            DEFAULT_PRE_SKIP,
            "conclave",
        )?;
        let decoder = opus::Decoder::new(RATE, opus::Channels::Mono).map_err(opus_err)?;
        self.tracks.insert(
            id,
            Track {
                writer,
                next_seq: None,
                decoder,
                pcm: VecDeque::new(),
            },
        );
        self.manifest.participants.push(ParticipantEntry {
            id,
            name: name.to_string(),
            file,
            joined_at_ms: now_ms,
            left_at_ms: None,
        });
        self.write_manifest()
    }

    /// Names participant `id` (the roster named it after its audio arrived).
    /// Returns whether the manifest changed.
    pub fn rename(&mut self, id: u64, name: &str) -> io::Result<bool> {
        let mut changed = false;
        for p in self.manifest.participants.iter_mut().filter(|p| p.id == id) {
            if p.name != name {
                p.name = name.to_string();
                changed = true;
            }
        }
        if changed {
            self.write_manifest()?;
        }
        Ok(changed)
    }

    pub fn participant_left(&mut self, id: u64, now_ms: u64) -> io::Result<()> {
        if let Some(t) = self.tracks.remove(&id) {
            let (f, len) = t.writer.finish()?.finish_len()?;
            f.sync_data()?;
            self.closed_bytes += len;
        }
        for p in self.manifest.participants.iter_mut().filter(|p| p.id == id) {
            p.left_at_ms.get_or_insert(now_ms);
        }
        self.write_manifest()
    }

    /// A decrypted Opus packet from participant `id` with its sequence number.
    /// Gaps are concealed (the decoder's PLC for the mix, empty frames in the file).
    pub fn audio(&mut self, id: u64, seq: u16, packet: &[u8]) -> io::Result<()> {
        let Some(t) = self.tracks.get_mut(&id) else {
            return Ok(());
        };
        if let Some(next) = t.next_seq {
            let gap = seq.wrapping_sub(next);
            if gap >= 0x8000 {
                return Ok(()); // late or duplicate: already concealed
            }
            if gap > 0 {
                let lost = u32::from(gap).min(50);
                t.writer.write_lost(lost)?;
                for _ in 0..lost {
                    let mut pcm = vec![0i16; FRAME];
                    if t.decoder.decode(&[], &mut pcm, false).is_ok() {
                        push_pcm(&mut t.pcm, pcm);
                    }
                }
            }
        }
        t.next_seq = Some(seq.wrapping_add(1));
        t.writer.write_packet(packet)?;
        let mut pcm = vec![0i16; 5760];
        if let Ok(n) = t.decoder.decode(packet, &mut pcm, false) {
            for f in pcm[..n].chunks(FRAME) {
                push_pcm(&mut t.pcm, f.to_vec());
            }
        }
        Ok(())
    }

    /// Every 20 ms: mix one frame of everyone into the mixed track.
    pub fn tick(&mut self) -> io::Result<()> {
        let pcm = mix(
            self.tracks.values_mut().filter_map(|t| t.pcm.pop_front()),
            FRAME,
        );
        let mut out = vec![0u8; 4000];
        let n = self.encoder.encode(&pcm, &mut out).map_err(opus_err)?;
        self.mixed.write_packet(&out[..n])
    }

    pub fn chat(&mut self, line: &ChatLine) -> io::Result<()> {
        let mut s = serde_json::to_vec(line).map_err(io::Error::other)?;
        s.push(b'\n');
        self.chat.write_all(&s)
    }

    /// Seal what is buffered in every file and push it to disk.
    pub fn flush(&mut self) -> io::Result<RecordingSize> {
        for t in self.tracks.values_mut() {
            t.writer.flush_page()?;
            t.writer.get_mut().get_mut().sync_data()?;
        }
        self.mixed.flush_page()?;
        self.mixed.get_mut().get_mut().sync_data()?;
        self.chat.flush()?;
        self.chat.get_mut().sync_data()?;
        Ok(self.size())
    }

    /// Stop: close every file with its final chunk and complete the manifest.
    /// Returns the manifest and the recording's final size.
    pub fn finish(mut self, now_ms: u64) -> io::Result<(Manifest, RecordingSize)> {
        for (id, t) in std::mem::take(&mut self.tracks) {
            let (f, len) = t.writer.finish()?.finish_len()?;
            f.sync_data()?;
            self.closed_bytes += len;
            for p in self.manifest.participants.iter_mut().filter(|p| p.id == id) {
                p.left_at_ms.get_or_insert(now_ms);
            }
        }
        let Self {
            dir,
            key,
            wrapped,
            mixed,
            chat,
            mut manifest,
            mut closed_bytes,
            manifest_written,
            manifest_replaced,
            manifest_len,
            ..
        } = self;
        for (f, len) in [mixed.finish()?.finish_len()?, chat.finish_len()?] {
            f.sync_data()?;
            closed_bytes += len;
        }
        manifest.ended_at_ms = Some(now_ms);
        let len = write_manifest(&dir, &key, &wrapped, &manifest)?;
        let written = closed_bytes + manifest_written + len;
        let on_disk = written - manifest_replaced - manifest_len;
        Ok((manifest, RecordingSize { written, on_disk }))
    }
}

/// Replaced atomically, so a crash leaves the previous complete manifest.
/// Returns its length.
fn write_manifest(
    dir: &Path,
    key: &DataKey,
    wrapped: &[u8],
    manifest: &Manifest,
) -> io::Result<u64> {
    let tmp = dir.join("manifest.json.enc.tmp");
    let _ = std::fs::remove_file(&tmp);
    let f = File::options().write(true).create_new(true).open(&tmp)?;
    let mut w = ChunkWriter::new(f, key, wrapped, "manifest.json")?;
    serde_json::to_writer_pretty(&mut w, manifest).map_err(io::Error::other)?;
    let (f, len) = w.finish_len()?;
    f.sync_data()?;
    std::fs::rename(tmp, dir.join("manifest.json.enc"))?;
    Ok(len)
}

fn push_pcm(q: &mut VecDeque<Vec<i16>>, f: Vec<i16>) {
    if q.len() >= MIX_QUEUE {
        q.pop_front();
    }
    q.push_back(f);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recording::container::LocalKek;

    #[test]
    fn a_participant_named_late_is_renamed_in_the_manifest() {
        let dir = std::env::temp_dir().join(format!("conclave-rename-{}", std::process::id()));
        let kek = LocalKek::new(&DataKey::generate());
        let key = DataKey::generate();
        let wrapped = kek.wrap(&key);
        let mut rec = Recorder::create(&dir, "m", key, wrapped, 1).unwrap();
        rec.participant_joined(2, "participant 2", 2).unwrap();
        assert!(rec.rename(2, "User 2").unwrap());
        assert!(
            !rec.rename(2, "User 2").unwrap(),
            "no write when nothing changed"
        );
        assert_eq!(rec.manifest().participants[0].name, "User 2");
        rec.finish(3).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tracked_size_matches_the_files_on_disk() {
        let dir = std::env::temp_dir().join(format!(
            "conclave-size-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let kek = LocalKek::new(&DataKey::generate());
        let key = DataKey::generate();
        let wrapped = kek.wrap(&key);
        let mut rec = Recorder::create(&dir, "m", key, wrapped, 1).unwrap();
        assert_eq!(
            rec.size().on_disk,
            crate::recording::retention::used_bytes(&dir)
        );
        let mut enc =
            opus::Encoder::new(RATE, opus::Channels::Mono, opus::Application::Voip).unwrap();
        let mut out = vec![0u8; 4000];
        let tone = crate::media::tone::sine(440.0, RATE, 8000.0, 0, FRAME * 100);
        let mut last = RecordingSize::default();
        for (i, f) in tone.chunks(FRAME).enumerate() {
            if i == 0 || i == 60 {
                rec.participant_joined(i as u64, "p", 2).unwrap();
            }
            if i == 80 {
                // Closing a track and replacing the manifest keep the count exact.
                rec.participant_left(0, 3).unwrap();
            }
            let n = enc.encode(f, &mut out).unwrap();
            for id in [0u64, 60] {
                rec.audio(id, i as u16, &out[..n]).unwrap();
            }
            rec.tick().unwrap();
            if i % 25 == 24 {
                let s = rec.flush().unwrap();
                assert_eq!(
                    s.on_disk,
                    crate::recording::retention::used_bytes(&dir),
                    "after frame {i}"
                );
                assert!(s.written >= last.written && s.written >= s.on_disk);
                last = s;
            }
        }
        let (_, s) = rec.finish(4).unwrap();
        assert_eq!(s.on_disk, crate::recording::retention::used_bytes(&dir));
        assert!(s.written > s.on_disk, "replaced manifests were written too");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
