//! Recording end to end with real tools: espeak-ng speech is recorded by the
//! connector-node binary into encrypted files, decrypted by its CLI, and
//! checked with ffprobe/ffmpeg (valid Ogg Opus, right duration, audio that
//! correlates with the source). A kill -9 mid-recording leaves files that
//! still decrypt up to the last complete chunk.

mod common;

use common::{TempDir, require};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_connector-node");

fn speech(dir: &Path, text: &str) -> (PathBuf, Vec<i16>) {
    require("espeak-ng");
    require("sox");
    let raw = dir.join("speech-raw.wav");
    let out = dir.join("speech.wav");
    assert!(
        Command::new("espeak-ng")
            .arg("-w")
            .arg(&raw)
            .arg(text)
            .status()
            .unwrap()
            .success()
    );
    assert!(
        Command::new("sox")
            .arg(&raw)
            .args(["-r", "48000", "-c", "1", "-b", "16"])
            .arg(&out)
            .status()
            .unwrap()
            .success()
    );
    let (rate, samples) = common::read_wav(&out);
    assert_eq!(rate, 48000);
    (out, samples)
}

fn kek(dir: &Path) -> PathBuf {
    let p = dir.join("kek.hex");
    std::fs::write(&p, hex::encode([0x42u8; 32])).unwrap();
    p
}

fn decrypt(rec: &Path, out: &Path, kek: &Path) -> Vec<serde_json::Value> {
    let o = Command::new(BIN)
        .args(["recording", "decrypt", "--dir"])
        .arg(rec)
        .arg("--out")
        .arg(out)
        .arg("--local-kek")
        .arg(kek)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "decrypt failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn decode(file: &Path, dir: &Path) -> Vec<i16> {
    let wav = dir.join("decoded.wav");
    let _ = std::fs::remove_file(&wav);
    let ok = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(file)
        .args(["-ar", "48000", "-ac", "1", "-c:a", "pcm_s16le"])
        .arg(&wav)
        .status()
        .unwrap()
        .success();
    assert!(ok, "ffmpeg could not decode {}", file.display());
    common::read_wav(&wav).1
}

#[test]
fn recorded_speech_decrypts_to_valid_ogg_opus_matching_the_source() {
    let dir = TempDir::new("rec");
    let (wav, source) = speech(
        &dir.0,
        "Conclave records this meeting, and only invited people can read it.",
    );
    let kek = kek(&dir.0);
    let rec = dir.0.join("recording");
    let o = Command::new(BIN)
        .args(["recording", "record-wav", "--dir"])
        .arg(&rec)
        .arg("--wav")
        .arg(&wav)
        .arg("--local-kek")
        .arg(&kek)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "record-wav failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // At rest, nothing is readable: every file is a container.
    for e in std::fs::read_dir(&rec).unwrap().flatten() {
        let head = std::fs::read(e.path()).unwrap();
        assert!(
            head.starts_with(b"CNCLREC1"),
            "{} is not encrypted",
            e.path().display()
        );
        assert!(!head.windows(4).any(|w| w == b"OggS"));
    }
    let out = dir.0.join("plain");
    let reports = decrypt(&rec, &out, &kek);
    assert_eq!(reports.len(), 4, "{reports:?}");
    assert!(reports.iter().all(|r| r["complete"] == true), "{reports:?}");

    let src_secs = source.len() as f64 / 48000.0;
    for f in ["participant-1.opus", "mixed.opus"] {
        let common::Probe {
            format,
            codec,
            secs,
            ..
        } = common::ffprobe(&out.join(f));
        assert_eq!((format.as_str(), codec.as_str()), ("ogg", "opus"), "{f}");
        // Whole 20 ms frames: up to one frame longer than the source.
        assert!(
            (secs - src_secs).abs() < 0.05,
            "{f}: {secs} s vs source {src_secs} s"
        );
    }
    let decoded = decode(&out.join("participant-1.opus"), &dir.0);
    let c = common::correlation(&source, &decoded);
    assert!(
        c > 0.8,
        "decoded speech does not match the source (correlation {c:.2})"
    );
    let mixed = decode(&out.join("mixed.opus"), &dir.0);
    let c = common::correlation(&source, &mixed);
    assert!(
        c > 0.7,
        "mixed track does not match the source (correlation {c:.2})"
    );

    let chat = std::fs::read_to_string(out.join("chat.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = chat
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), source.len().div_ceil(960).div_ceil(50));
    assert!(
        lines
            .iter()
            .all(|l| l["name"] == "wav" && l["participant"] == 1)
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["participants"][0]["file"], "participant-1.opus");
    assert!(manifest["endedAtMs"].as_u64().is_some());

    // A different KEK is refused with a clear message.
    let wrong = dir.0.join("wrong.hex");
    std::fs::write(&wrong, hex::encode([7u8; 32])).unwrap();
    let o = Command::new(BIN)
        .args(["recording", "decrypt", "--dir"])
        .arg(&rec)
        .arg("--out")
        .arg(dir.0.join("nope"))
        .arg("--local-kek")
        .arg(&wrong)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("data key was refused"));
}

#[test]
fn kill_9_mid_recording_leaves_a_decryptable_partial_recording() {
    let dir = TempDir::new("rec-kill");
    let (_, one) = speech(
        &dir.0,
        "This sentence repeats while the recorder is killed.",
    );
    let long: Vec<i16> = one.iter().copied().cycle().take(48000 * 20).collect();
    let wav = dir.0.join("long.wav");
    common::write_wav(&wav, 48000, &long);
    let kek = kek(&dir.0);
    let rec = dir.0.join("recording");
    let mut child = Command::new(BIN)
        .args(["recording", "record-wav", "--dir"])
        .arg(&rec)
        .arg("--wav")
        .arg(&wav)
        .arg("--local-kek")
        .arg(&kek)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait (bounded) until three one-second flushes happened, then SIGKILL.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if line == "flushed 3" {
                let _ = tx.send(());
            }
        }
    });
    let flushed = rx.recv_timeout(Duration::from_secs(30));
    child.kill().unwrap();
    child.wait().unwrap();
    flushed.expect("recorder did not reach 3 s");

    let out = dir.0.join("plain");
    let reports = decrypt(&rec, &out, &kek);
    let part = reports
        .iter()
        .find(|r| r["file"] == "participant-1.opus")
        .unwrap();
    assert_eq!(
        part["complete"], false,
        "killed file must be reported partial: {reports:?}"
    );
    let manifest = reports
        .iter()
        .find(|r| r["file"] == "manifest.json")
        .unwrap();
    assert_eq!(
        manifest["complete"], true,
        "manifest is replaced atomically"
    );
    let common::Probe {
        format,
        codec,
        secs,
        ..
    } = common::ffprobe(&out.join("participant-1.opus"));
    assert_eq!((format.as_str(), codec.as_str()), ("ogg", "opus"));
    assert!((3.0..20.0).contains(&secs), "partial duration {secs}");
    let decoded = decode(&out.join("participant-1.opus"), &dir.0);
    assert!(decoded.len() >= 48000 * 3);
    let c = common::correlation(&long[..48000 * 2], &decoded[..48000 * 2]);
    assert!(
        c > 0.8,
        "partial recording does not match the source (correlation {c:.2})"
    );
}
