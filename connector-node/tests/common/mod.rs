//! Real peers for process-level tests: baresip as a phone, WAV helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The rendered metrics once they contain `needle`. Counters fed from a
/// stats watch are updated by their own task, so they may trail the event a
/// test awaited by a scheduling round; ten seconds is far beyond that.
pub async fn metrics_containing(
    metrics: &connector_node::metrics::Metrics,
    needle: &str,
) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = metrics.render();
        if text.contains(needle) || tokio::time::Instant::now() >= deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "conclave-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn require(bin: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {bin}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{bin} is required for this test (see e2e/deps/apt-packages.txt)"
    );
}

/// Write a mono 16-bit WAV.
pub fn write_wav(path: &Path, rate: u32, samples: &[i16]) {
    let mut b = Vec::new();
    let data_len = (samples.len() * 2) as u32;
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + data_len).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&rate.to_le_bytes());
    b.extend_from_slice(&(rate * 2).to_le_bytes());
    b.extend_from_slice(&2u16.to_le_bytes());
    b.extend_from_slice(&16u16.to_le_bytes());
    b.extend_from_slice(b"data");
    b.extend_from_slice(&data_len.to_le_bytes());
    for s in samples {
        b.extend_from_slice(&s.to_le_bytes());
    }
    std::fs::write(path, b).unwrap();
}

/// Samples of a 16-bit PCM WAV (first channel) and its rate.
pub fn read_wav(path: &Path) -> (u32, Vec<i16>) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..4], b"RIFF", "{} is not a WAV", path.display());
    let mut i = 12;
    let (mut rate, mut channels) = (0u32, 1usize);
    while i + 8 <= b.len() {
        let id = &b[i..i + 4];
        let len = u32::from_le_bytes(b[i + 4..i + 8].try_into().unwrap()) as usize;
        let body = &b[i + 8..(i + 8 + len).min(b.len())];
        if id == b"fmt " {
            channels = u16::from_le_bytes([body[2], body[3]]) as usize;
            rate = u32::from_le_bytes(body[4..8].try_into().unwrap());
        } else if id == b"data" {
            // A writer killed before closing leaves the length 0: take the rest.
            let body = if len == 0 { &b[i + 8..] } else { body };
            let samples = body
                .chunks_exact(2 * channels)
                .map(|c| i16::from_le_bytes([c[0], c[1]]))
                .collect();
            return (rate, samples);
        }
        i += 8 + len + (len & 1);
    }
    panic!("no data chunk in {}", path.display());
}

/// Best normalised cross-correlation within ±50 ms, at 8 kHz.
pub fn correlation(a: &[i16], b: &[i16]) -> f64 {
    let down = |x: &[i16]| {
        x.iter()
            .step_by(6)
            .map(|&s| f64::from(s))
            .collect::<Vec<_>>()
    };
    let (a, b) = (down(a), down(b));
    let n = a.len().min(b.len());
    let mut best = 0f64;
    for lag in -400i64..=400 {
        let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
        for (i, &x) in a.iter().enumerate().take(n) {
            let j = i as i64 + lag;
            if j < 0 || j as usize >= b.len() {
                continue;
            }
            let y = b[j as usize];
            ab += x * y;
            aa += x * x;
            bb += y * y;
        }
        if aa > 0.0 && bb > 0.0 {
            best = best.max(ab / (aa * bb).sqrt());
        }
    }
    best
}

/// A port free for both UDP and TCP right now (baresip binds both).
pub fn free_port() -> u16 {
    loop {
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = u.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// baresip 1.0 as a phone: its own config dir, auto-answer, plays `wav`,
/// records what it hears (sndfile module) into `dir/rec`.
pub struct Baresip {
    child: Child,
    pub dir: PathBuf,
    pub port: u16,
}

pub struct BaresipOpts<'a> {
    pub transport: &'a str,
    /// `mediaenc` account value: "srtp-mand", "srtp" or None.
    pub mediaenc: Option<&'a str>,
    /// (certificate+key PEM, CA PEM) for TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub dial: Option<String>,
    /// `audio_codecs` account value; default "PCMU,PCMA".
    pub codecs: Option<&'a str>,
    /// `call_max_calls`: past this many calls baresip answers a new INVITE
    /// with 486 Busy Here (a phone already on a call). None: baresip's default.
    pub max_calls: Option<u32>,
}

impl Baresip {
    /// Starts baresip; another process may take the chosen port between our
    /// check and baresip's bind, so a failed bind is retried on a new port.
    pub fn start(dir: &Path, wav: &Path, opts: BaresipOpts<'_>) -> Self {
        Self::start_as(dir, wav, opts, "127.0.0.1", "phone", None)
    }

    /// Like [`Baresip::start`], as SIP user `user` (a caller's number, say)
    /// with SIP display name `display`, with SIP and SDP naming `address`. Another loopback address than
    /// 127.0.0.1 gives the shape of a phone on a cluster node: baresip's RTP
    /// socket is bound to the wildcard address, so its RTP to 127.0.0.1
    /// leaves from 127.0.0.1, not from the address its SDP names (on a node,
    /// packets to a pod leave from the pod bridge's address).
    pub fn start_as(
        dir: &Path,
        wav: &Path,
        opts: BaresipOpts<'_>,
        address: &str,
        user: &str,
        display: Option<&str>,
    ) -> Self {
        require("baresip");
        let from = match display {
            Some(d) => format!("\"{d}\" <sip:{user}@{address}"),
            None => format!("<sip:{user}@{address}"),
        };
        for _ in 0..5 {
            let mut me = Self::start_on(dir, wav, &opts, free_port(), address, &from);
            if me.wait_for_log("baresip is ready", Duration::from_secs(10)) {
                return me;
            }
            me.stop();
        }
        panic!(
            "baresip did not start:\n{}",
            std::fs::read_to_string(dir.join("baresip.log")).unwrap_or_default()
        );
    }

    /// `from` is the account's name-addr without its closing `>`.
    fn start_on(
        dir: &Path,
        wav: &Path,
        opts: &BaresipOpts<'_>,
        port: u16,
        address: &str,
        from: &str,
    ) -> Self {
        let rec = dir.join("rec");
        std::fs::create_dir_all(&rec).unwrap();
        // RTP ports clear of the e2e phone's 31000-31199: `make test` runs
        // these tests while the e2e scenarios run.
        let mut cfg = format!(
            "poll_method epoll\n\
             net_interface {address}\n\
             sip_listen {address}:{port}\n\
             call_local_timeout 30\n\
             audio_player aubridge,nil\n\
             audio_source aufile,{wav}\n\
             audio_alert aubridge,nil\n\
             ausrc_srate 8000\n\
             auplay_srate 8000\n\
             ausrc_channels 1\n\
             auplay_channels 1\n\
             rtp_ports 32000-39999\n\
             rtcp_mux no\n\
             jitter_buffer_delay 2-6\n\
             snd_path {rec}\n\
             module_path /usr/lib/baresip/modules\n\
             module g711.so\n\
             module opus.so\n\
             module aufile.so\n\
             module aubridge.so\n\
             module sndfile.so\n\
             module srtp.so\n\
             module_tmp account.so\n\
             module_app menu.so\n",
            wav = wav.display(),
            rec = rec.display(),
        );
        if let Some((cert, ca)) = &opts.tls {
            cfg.push_str(&format!(
                "sip_certificate {}\nsip_cafile {}\n",
                cert.display(),
                ca.display()
            ));
        }
        if let Some(n) = opts.max_calls {
            cfg.push_str(&format!("call_max_calls {n}\n"));
        }
        std::fs::write(dir.join("config"), cfg).unwrap();
        let mut account = format!(
            "{from};transport={}>;regint=0;answermode=auto;audio_codecs={}",
            opts.transport,
            opts.codecs.unwrap_or("PCMU,PCMA")
        );
        if let Some(m) = opts.mediaenc {
            account.push_str(&format!(";mediaenc={m}"));
        }
        std::fs::write(dir.join("accounts"), format!("{account}\n")).unwrap();
        std::fs::write(dir.join("contacts"), "").unwrap();
        let log = std::fs::File::create(dir.join("baresip.log")).unwrap();
        let mut cmd = Command::new("baresip");
        cmd.arg("-f").arg(dir).arg("-v");
        if let Some(d) = &opts.dial {
            cmd.arg("-e").arg(format!("/dial {d}"));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("baresip starts");
        Self {
            child,
            dir: dir.to_path_buf(),
            port,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("baresip.log")).unwrap_or_default()
    }

    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return self.log().contains(needle);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// WAV files baresip recorded of decoded (heard) audio.
    pub fn heard(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.dir.join("rec"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.to_string_lossy().ends_with("-dec.wav"))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Baresip {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What ffprobe reads in a media file.
#[derive(Debug)]
pub struct Probe {
    pub format: String,
    /// First stream's codec_type (audio, video) and codec_name.
    pub kind: String,
    pub codec: String,
    pub secs: f64,
}

/// ffprobe a file; fails the test with ffprobe's message if it refuses it.
pub fn ffprobe(file: &Path) -> Probe {
    require("ffprobe");
    let o = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "format=format_name,duration:stream=codec_type,codec_name",
            "-of",
            "json",
        ])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "ffprobe rejected {}: {}",
        file.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    Probe {
        format: s(&v["format"]["format_name"]),
        kind: s(&v["streams"][0]["codec_type"]),
        codec: s(&v["streams"][0]["codec_name"]),
        secs: v["format"]["duration"]
            .as_str()
            .unwrap_or("0")
            .parse()
            .unwrap(),
    }
}
