//! Connectors in a real meeting: a `media-node` relay and `conclave-client`
//! participants as processes on 127.0.0.1, with dev credentials (dev ticket
//! seed + shared epoch key) standing in for the KMS assignment.
//!
//! - The recording connector records espeak-ng speech and chat; after
//!   decryption ffprobe reads valid Ogg Opus and the audio matches the source.
//! - A baresip phone dialled in is bridged: the meeting hears the phone and
//!   the phone hears the meeting (tone detection on both ends).

mod common;

use common::{Baresip, BaresipOpts, TempDir, require};
use connector_node::media::tone;
use connector_node::metrics::Metrics;
use connector_node::recording::container::{DataKey, LocalKek};
use connector_node::recording::{decrypt, live, recorder::Recorder};
use connector_node::sip::transport;
use connector_node::sip::ua::{Transport, UaConfig, UserAgent};
use connector_node::{bridge, meeting, telephony};
use meeting_client::dev::DevIssuer;
use meeting_client::join::Credentials;
use meeting_proto::config::connector::SrtpPolicy;
use meeting_proto::ids::MeetingId;
use meeting_proto::media_keys::EpochKey;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

const RELAY_ID: &str = "test-zone/relay-0";
const SEED: [u8; 32] = [7u8; 32];
const KEY: [u8; 32] = [0x11u8; 32];

fn bin(name: &str) -> PathBuf {
    let mut p = std::env::current_exe().unwrap();
    p.pop();
    if p.ends_with("deps") {
        p.pop();
    }
    let p = p.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_relay(dir: &TempDir) -> (Proc, SocketAddr) {
    let cfg = dir.0.join("relay.yaml");
    std::fs::write(
        &cfg,
        format!(
            "relayId: {RELAY_ID}\nzone: test-zone\nlisten: 127.0.0.1:0\nadvertise: 127.0.0.1:1\nhttpListen: 127.0.0.1:0\nticketPublicKey: {}\n",
            DevIssuer::new(SEED, RELAY_ID).public_key_hex()
        ),
    )
    .unwrap();
    let mut child = Command::new(bin("media-node"))
        .arg("--config")
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let proc = Proc(child);
    let v: serde_json::Value =
        serde_json::from_str(&line).expect("media-node prints its addresses");
    (proc, v["media"].as_str().unwrap().parse().unwrap())
}

fn creds(relay: SocketAddr, meeting: &str, sender: u16) -> Credentials {
    let m = MeetingId::new(meeting).unwrap();
    Credentials {
        ticket: DevIssuer::new(SEED, RELAY_ID)
            .ticket(&m, sender, 600)
            .unwrap(),
        key: EpochKey::new(m.clone(), 1, &KEY).unwrap(),
        meeting: m,
        sender_index: sender,
        relay,
    }
}

fn client(
    relay: SocketAddr,
    meeting: &str,
    sender: u16,
    audio: &[&str],
    secs: f64,
    extra: &[&str],
) -> Child {
    Command::new(bin("conclave-client"))
        .args([
            "join",
            "--relay",
            &relay.to_string(),
            "--relay-id",
            RELAY_ID,
        ])
        .args([
            "--dev-ticket-seed",
            &hex::encode(SEED),
            "--meeting-key",
            &hex::encode(KEY),
        ])
        .args(["--meeting", meeting, "--sender", &sender.to_string()])
        .args(audio)
        .args(["--duration", &secs.to_string()])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

async fn wait_child(child: Child) -> std::process::Output {
    let out = tokio::task::spawn_blocking(move || {
        let o = child.wait_with_output();
        o.unwrap()
    });
    tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("client finished")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_connector_records_speech_and_chat_from_a_meeting() {
    require("espeak-ng");
    require("sox");
    require("ffprobe");
    tokio::time::timeout(Duration::from_secs(90), async {
        let dir = TempDir::new("meet-rec");
        let (_relay, relay) = start_relay(&dir);
        // Speech at 48 kHz, padded to whole 20 ms frames.
        let raw = dir.0.join("raw.wav");
        let wav = dir.0.join("speech.wav");
        assert!(
            Command::new("espeak-ng")
                .arg("-w")
                .arg(&raw)
                .arg("The recorder hears every word of this meeting.")
                .status()
                .unwrap()
                .success()
        );
        assert!(
            Command::new("sox")
                .arg(&raw)
                .args(["-r", "48000", "-c", "1", "-b", "16"])
                .arg(&wav)
                .status()
                .unwrap()
                .success()
        );
        let (_, source) = common::read_wav(&wav);
        let secs = source.len().div_ceil(960) as f64 * 0.02;

        // The connector joins first so the relay forwards everything to it.
        let link = meeting::join(creds(relay, "rec-meeting", 9), Duration::from_secs(5))
            .await
            .unwrap();
        let kek = LocalKek::new(&DataKey::from_bytes(&[0x42; 32]).unwrap());
        let key = DataKey::generate();
        let rec_dir = dir.0.join("recording");
        let rec =
            Recorder::create(&rec_dir, "rec-meeting", key.clone(), kek.wrap(&key), 0).unwrap();
        let (stop_tx, stop_rx) = watch::channel(false);
        let metrics = Arc::new(Metrics::new());
        let m2 = metrics.clone();
        let recording =
            tokio::spawn(async move { live::record(link, rec, stop_rx, None, &m2).await });

        let speaker = client(
            relay,
            "rec-meeting",
            1,
            &["--wav", wav.to_str().unwrap()],
            secs,
            &["--chat", "hello from the speaker", "--chat-delay", "0.5"],
        );
        let out = wait_child(speaker).await;
        assert!(
            out.status.success(),
            "client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .filter(|v| v.get("report").is_some())
            })
            .expect("client report");
        assert_eq!(report["report"]["joined"], true);
        stop_tx.send(true).unwrap();
        let manifest = recording.await.unwrap().unwrap();
        assert_eq!(manifest.participants.len(), 1, "{manifest:?}");
        assert_eq!(manifest.participants[0].id, 1);

        let plain = dir.0.join("plain");
        let reports = decrypt::decrypt_dir(&rec_dir, &plain, |w| {
            kek.unwrap_key(w).ok_or_else(|| "refused".into())
        })
        .unwrap();
        assert!(reports.iter().all(|r| r.complete), "{reports:?}");
        let probe = common::ffprobe(&plain.join("participant-1.opus"));
        assert_eq!(probe.codec, "opus");
        let dur = probe.secs;
        assert!((dur - secs).abs() < 0.3, "recorded {dur} s of {secs} s");
        let decoded = dir.0.join("decoded.wav");
        assert!(
            Command::new("ffmpeg")
                .args(["-v", "error", "-i"])
                .arg(plain.join("participant-1.opus"))
                .args(["-ar", "48000", "-ac", "1", "-c:a", "pcm_s16le"])
                .arg(&decoded)
                .status()
                .unwrap()
                .success()
        );
        let (_, got) = common::read_wav(&decoded);
        let c = common::correlation(&source, &got);
        assert!(
            c > 0.7,
            "recorded speech does not match the source (correlation {c:.2})"
        );
        let chat = std::fs::read_to_string(plain.join("chat.jsonl")).unwrap();
        let line: serde_json::Value =
            serde_json::from_str(chat.lines().next().expect("a chat line")).unwrap();
        assert_eq!(line["text"], "hello from the speaker");
        assert_eq!(line["participant"], 1);
        assert!(
            metrics
                .render()
                .contains("conclave_connector_recording_chunks_total")
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phone_dialled_in_is_bridged_into_the_meeting_both_ways() {
    tokio::time::timeout(Duration::from_secs(90), async {
        let dir = TempDir::new("meet-phone");
        let (_relay, relay) = start_relay(&dir);
        // Telephony connector.
        let ua = UserAgent::new(UaConfig {
            local: "127.0.0.1:0".parse().unwrap(),
            transport: Transport::Udp,
            user: "conclave".into(),
            display_name: "Conclave".into(),
            credentials: None,
            max_calls: 4,
            invites_per_second: 10,
        });
        let (ev_tx, ev_rx) = mpsc::channel(64);
        let sip = transport::spawn(
            ua,
            "127.0.0.1:0".parse().unwrap(),
            Transport::Udp,
            None,
            ev_tx,
        )
        .await
        .unwrap();
        let local = sip.local;
        let (legs_tx, mut legs) = mpsc::channel(4);
        let _tel = telephony::start(
            sip,
            ev_rx,
            telephony::TelephonySettings {
                media_ip: "127.0.0.1".parse().unwrap(),
                srtp: SrtpPolicy::Preferred,
                dial_in: [(
                    "+15550100".to_string(),
                    MeetingId::new("phone-meeting").unwrap(),
                )]
                .into_iter()
                .collect(),
                name_prefix: Some("Phone".into()),
                media_timeout: connector_node::telephony::DEFAULT_MEDIA_TIMEOUT,
            },
            Arc::new(Metrics::new()),
            legs_tx,
        );
        let wav = dir.0.join("phone.wav");
        common::write_wav(&wav, 8000, &tone::sine(1000.0, 8000, 8000.0, 0, 8000 * 30));
        let mut phone = Baresip::start(
            &dir.0,
            &wav,
            BaresipOpts {
                transport: "udp",
                mediaenc: None,
                tls: None,
                dial: Some(format!("sip:+15550100@127.0.0.1:{}", local.port())),
                codecs: None,
                max_calls: None,
            },
        );
        let leg = legs.recv().await.expect("phone leg");
        assert_eq!(leg.meeting.as_str(), "phone-meeting");
        let link = meeting::join(
            creds(relay, leg.meeting.as_str(), 9),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        let call = leg.call;
        let bridged = tokio::spawn(bridge::run(leg, link));

        // A meeting participant speaks 440 Hz and records what it hears.
        let heard_dir = dir.0.join("heard");
        let p = client(
            relay,
            "phone-meeting",
            1,
            &["--tone", "440"],
            4.0,
            &["--out-dir", heard_dir.to_str().unwrap()],
        );
        let out = wait_child(p).await;
        assert!(
            out.status.success(),
            "client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (_, from_phone) = common::read_wav(&heard_dir.join("sender-9.wav"));
        let best = from_phone
            .chunks(48000)
            .map(|c| tone::tone_ratio(c, 1000.0, 48000))
            .fold(0f32, f32::max);
        assert!(
            best > 0.7,
            "the meeting does not hear the phone's 1000 Hz (ratio {best:.2})"
        );

        _tel.hangup(call).await;
        let why = tokio::time::timeout(Duration::from_secs(10), bridged)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(why, "call ended");
        assert!(
            phone.wait_for_log("terminated", Duration::from_secs(10)),
            "{}",
            phone.log()
        );
        phone.stop();
        let files = phone.heard();
        assert!(!files.is_empty(), "baresip recorded nothing");
        let (_, heard) = common::read_wav(&files[0]);
        let best = heard
            .chunks(8000)
            .map(|c| tone::tone_ratio(c, 440.0, 8000))
            .fold(0f32, f32::max);
        assert!(
            best > 0.7,
            "the phone does not hear the meeting's 440 Hz (ratio {best:.2})"
        );
    })
    .await
    .expect("test timed out");
}
