//! Live streaming into nginx with Debian's RTMP module on 127.0.0.1:
//! ffmpeg is supervised (restart after a kill, errors surfaced), the stream
//! nginx recorded has audio of the expected duration, and targets outside
//! the allow-list are refused with a clear error.

mod common;

use common::{TempDir, require};
use connector_node::media::tone;
use connector_node::metrics::Metrics;
use connector_node::streaming::{self, StreamError};
use meeting_proto::config::connector::StreamingSettings;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

const RTMP_MODULE: &str = "/usr/lib/nginx/modules/ngx_rtmp_module.so";

struct Nginx {
    child: Child,
}

impl Nginx {
    fn start(dir: &Path, port: u16) -> Self {
        require("nginx");
        assert!(
            Path::new(RTMP_MODULE).exists(),
            "libnginx-mod-rtmp is required"
        );
        std::fs::create_dir_all(dir.join("rec")).unwrap();
        let conf = format!(
            "load_module {RTMP_MODULE};\n\
             daemon off;\nmaster_process off;\n\
             pid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 64; }}\n\
             rtmp {{ server {{ listen 127.0.0.1:{port}; chunk_size 4096;\n\
               application live {{ live on; record audio; record_path {d}/rec; record_unique off; }} }} }}\n",
            d = dir.display()
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let me = Self {
            child: Command::new("nginx")
                .arg("-p")
                .arg(dir)
                .arg("-e")
                .arg(dir.join("error.log"))
                .arg("-c")
                .arg(dir.join("nginx.conf"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        };
        // Ready when the port accepts connections (bounded). On failure the
        // panic drops `me`, which kills and reaps nginx.
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return me;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "nginx did not listen: {}",
            std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
        );
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn feed(tx: &mpsc::Sender<Vec<i16>>, secs: usize, from: usize) {
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for i in 0..secs * 50 {
        tick.tick().await;
        let _ = tx
            .send(tone::sine(440.0, 48000, 8000.0, (from + i) * 960, 960))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_to_nginx_rtmp_restarts_ffmpeg_and_refuses_other_targets() {
    require("ffmpeg");
    require("ffprobe");
    tokio::time::timeout(Duration::from_secs(90), async {
        let dir = TempDir::new("rtmp");
        let port = free_tcp_port();
        let _nginx = Nginx::start(&dir.0, port);
        let metrics = Arc::new(Metrics::new());
        let settings = StreamingSettings {
            allowed_targets: vec![format!("rtmp://127.0.0.1:{port}/live")],
            credentials_file: Some(dir.0.join("key")),
            ffmpeg: "ffmpeg".into(),
        };
        std::fs::write(dir.0.join("key"), "meeting1\n").unwrap();

        // A host-chosen target may carry a stream key in its path: the error names the host only.
        let refused =
            streaming::resolve_target(&settings, "rtmp://evil.example/live/s3cret", &metrics)
                .unwrap_err();
        assert!(matches!(refused, StreamError::NotAllowed(_)));
        let shown = refused.to_string();
        assert!(
            shown.starts_with("stream target rtmp://evil.example")
                && shown.ends_with("is not in this pool's allow-list")
                && !shown.contains("s3cret"),
            "{shown}"
        );
        let url = streaming::resolve_target(
            &settings,
            &format!("rtmp://127.0.0.1:{port}/live"),
            &metrics,
        )
        .unwrap();
        assert!(
            !format!("{url:?}").contains("meeting1"),
            "stream key must not be shown"
        );

        let (tx, rx) = mpsc::channel(100);
        let sup = streaming::start("ffmpeg".into(), url, rx, metrics.clone());
        let mut status = sup.status.clone();
        let first = status
            .wait_for(|s| s.pid.is_some())
            .await
            .unwrap()
            .pid
            .unwrap();
        feed(&tx, 2, 0).await;
        // Kill ffmpeg behind the supervisor's back: it must be restarted.
        assert!(
            Command::new("kill")
                .args(["-9", &first.to_string()])
                .status()
                .unwrap()
                .success()
        );
        let s = status
            .wait_for(|s| s.restarts == 1 && s.pid.is_some_and(|p| p != first))
            .await
            .unwrap()
            .clone();
        assert!(
            s.last_error
                .as_deref()
                .unwrap_or("")
                .contains("ffmpeg exited"),
            "{s:?}"
        );
        // The killed child was reaped: no zombie left with its PID.
        let stat = std::fs::read_to_string(format!("/proc/{first}/stat")).unwrap_or_default();
        assert!(!stat.contains(") Z "), "zombie ffmpeg: {stat}");
        feed(&tx, 4, 100).await;
        sup.stop().await;

        let m = metrics.render();
        assert!(
            m.contains("conclave_connector_ffmpeg_restarts_total 1"),
            "{m}"
        );
        assert!(
            m.contains("conclave_connector_stream_targets_refused_total 1"),
            "{m}"
        );
        assert!(m.contains("conclave_connector_ffmpeg_running 0"), "{m}");

        // nginx recorded what the second ffmpeg pushed: audio, about 4 s.
        let flv = dir.0.join("rec/meeting1.flv");
        let o = Command::new("ffprobe")
            .args([
                "-v",
                "error",
                "-show_entries",
                "format=duration:stream=codec_type,codec_name",
                "-of",
                "json",
            ])
            .arg(&flv)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "ffprobe: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["streams"][0]["codec_type"], "audio", "{v}");
        assert_eq!(v["streams"][0]["codec_name"], "aac", "{v}");
        let secs: f64 = v["format"]["duration"].as_str().unwrap().parse().unwrap();
        assert!(
            (3.0..5.5).contains(&secs),
            "recorded {secs} s, expected about 4"
        );
    })
    .await
    .expect("test timed out");
}
