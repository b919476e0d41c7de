//! One meeting's recording on disk: an Ogg Opus file per participant, a
//! mixed track, a chat transcript (JSON lines) and a manifest, each an
//! encrypted container under one data key.
//!
//! The meeting side feeds decrypted Opus packets, chat and roster changes;
//! `tick` (every 20 ms) mixes and `flush` (every second) seals chunks, so a
//! killed pod leaves files that decrypt up to the last second.

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
        let r = Self {
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
        };
        r.write_manifest()?;
        Ok(r)
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn write_manifest(&self) -> io::Result<()> {
        write_manifest(&self.dir, &self.key, &self.wrapped, &self.manifest)
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
            t.writer.finish()?.finish()?.sync_data()?;
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
        let mut mix = vec![0i32; FRAME];
        for t in self.tracks.values_mut() {
            if let Some(f) = t.pcm.pop_front() {
                for (m, s) in mix.iter_mut().zip(f) {
                    *m += i32::from(s);
                }
            }
        }
        let pcm: Vec<i16> = mix
            .into_iter()
            .map(|s| s.clamp(-32768, 32767) as i16)
            .collect();
        let mut out = vec![0u8; 4000];
        let n = self.encoder.encode(&pcm, &mut out).map_err(opus_err)?;
        self.mixed.write_packet(&out[..n])
    }

    pub fn chat(&mut self, line: &ChatLine) -> io::Result<()> {
        let mut s = serde_json::to_vec(line).map_err(io::Error::other)?;
        s.push(b'\n');
        self.chat.write_all(&s)
    }

    /// Seal what is buffered in every file and push it to disk. Returns the
    /// ciphertext bytes written so far (all files).
    pub fn flush(&mut self) -> io::Result<u64> {
        let mut bytes = 0;
        for t in self.tracks.values_mut() {
            t.writer.flush_page()?;
            t.writer.get_mut().get_mut().sync_data()?;
            bytes += t.writer.get_mut().bytes_written();
        }
        self.mixed.flush_page()?;
        self.mixed.get_mut().get_mut().sync_data()?;
        self.chat.flush()?;
        self.chat.get_mut().sync_data()?;
        Ok(bytes + self.mixed.get_mut().bytes_written() + self.chat.bytes_written())
    }

    /// Stop: close every file with its final chunk and complete the manifest.
    pub fn finish(self, now_ms: u64) -> io::Result<Manifest> {
        let Self {
            dir,
            key,
            wrapped,
            tracks,
            mixed,
            chat,
            mut manifest,
            ..
        } = self;
        for (id, t) in tracks {
            t.writer.finish()?.finish()?.sync_data()?;
            for p in manifest.participants.iter_mut().filter(|p| p.id == id) {
                p.left_at_ms.get_or_insert(now_ms);
            }
        }
        mixed.finish()?.finish()?.sync_data()?;
        chat.finish()?.sync_data()?;
        manifest.ended_at_ms = Some(now_ms);
        write_manifest(&dir, &key, &wrapped, &manifest)?;
        Ok(manifest)
    }
}

/// Replaced atomically, so a crash leaves the previous complete manifest.
fn write_manifest(
    dir: &Path,
    key: &DataKey,
    wrapped: &[u8],
    manifest: &Manifest,
) -> io::Result<()> {
    let tmp = dir.join("manifest.json.enc.tmp");
    let _ = std::fs::remove_file(&tmp);
    let f = File::options().write(true).create_new(true).open(&tmp)?;
    let mut w = ChunkWriter::new(f, key, wrapped, "manifest.json")?;
    serde_json::to_writer_pretty(&mut w, manifest).map_err(io::Error::other)?;
    let f = w.finish()?;
    f.sync_data()?;
    std::fs::rename(tmp, dir.join("manifest.json.enc"))
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
}
