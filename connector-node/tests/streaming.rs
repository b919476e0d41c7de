//! Live streaming into nginx with Debian's RTMP module on 127.0.0.1:
//! ffmpeg is supervised (restart after a kill, errors surfaced), the stream
//! nginx recorded has audio of the expected duration, and targets outside
//! the allow-list are refused with a clear error. RTMPS goes through nginx's
//! stream module as a TLS front: the target's certificate is verified
//! against the pool's CA, and a wrong CA is an error in status and metrics.

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
const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

struct Nginx {
    child: Child,
}

/// A TLS listener in front of the RTMP port (nginx's stream module).
struct TlsFront<'a> {
    port: u16,
    cert: &'a Path,
    key: &'a Path,
}

impl Nginx {
    fn start(dir: &Path, port: u16, tls: Option<TlsFront<'_>>) -> Self {
        require("nginx");
        assert!(
            Path::new(RTMP_MODULE).exists(),
            "libnginx-mod-rtmp is required"
        );
        std::fs::create_dir_all(dir.join("rec")).unwrap();
        let mut conf = format!(
            "load_module {RTMP_MODULE};\n\
             daemon off;\nmaster_process off;\n\
             pid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 64; }}\n\
             rtmp {{ server {{ listen 127.0.0.1:{port}; chunk_size 4096;\n\
               application live {{ live on; record audio; record_path {d}/rec; record_unique off; }} }} }}\n",
            d = dir.display()
        );
        if let Some(t) = &tls {
            assert!(
                Path::new(STREAM_MODULE).exists(),
                "libnginx-mod-stream is required"
            );
            conf = format!(
                "load_module {STREAM_MODULE};\n{conf}\
                 stream {{ server {{ listen 127.0.0.1:{tp} ssl;\n\
                   ssl_certificate {c}; ssl_certificate_key {k};\n\
                   proxy_pass 127.0.0.1:{port}; }} }}\n",
                tp = t.port,
                c = t.cert.display(),
                k = t.key.display()
            );
        }
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
        let ports = [Some(port), tls.map(|t| t.port)];
        for _ in 0..100 {
            if ports
                .iter()
                .flatten()
                .all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok())
            {
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
        let _nginx = Nginx::start(&dir.0, port, None);
        let metrics = Arc::new(Metrics::new());
        let settings = StreamingSettings {
            allowed_targets: vec![format!("rtmp://127.0.0.1:{port}/live")],
            credentials_file: Some(dir.0.join("key")),
            ffmpeg: "ffmpeg".into(),
            tls_ca_file: None,
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
        let second = s.pid.unwrap();
        sup.stop().await;
        // Stopped means reaped: the second ffmpeg's PID is gone, not a zombie.
        let stat = std::fs::read_to_string(format!("/proc/{second}/stat")).unwrap_or_default();
        assert!(
            !stat.contains("(ffmpeg)"),
            "ffmpeg {second} left behind: {stat}"
        );

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
        let secs = probe_aac(&dir.0.join("rec/meeting1.flv"));
        assert!(
            (3.0..5.5).contains(&secs),
            "recorded {secs} s, expected about 4"
        );
    })
    .await
    .expect("test timed out");
}

/// ffprobe the FLV nginx recorded: one AAC audio stream; its duration in s.
fn probe_aac(flv: &Path) -> f64 {
    let p = common::ffprobe(flv);
    assert_eq!(
        (p.kind.as_str(), p.codec.as_str()),
        ("audio", "aac"),
        "{p:?}"
    );
    p.secs
}

/// A CA and a server certificate for 127.0.0.1 it signs, as PEM files.
struct TestCa {
    ca: std::path::PathBuf,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

fn test_ca(dir: &Path, name: &str) -> TestCa {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, &ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let out = TestCa {
        ca: dir.join(format!("{name}-ca.pem")),
        cert: dir.join(format!("{name}-server.pem")),
        key: dir.join(format!("{name}-server.key")),
    };
    std::fs::write(&out.ca, ca_cert.pem()).unwrap();
    std::fs::write(&out.cert, cert.pem()).unwrap();
    std::fs::write(&out.key, key.serialize_pem()).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_rtmps_through_a_tls_front_verified_against_the_pool_ca() {
    require("ffmpeg");
    require("ffprobe");
    tokio::time::timeout(Duration::from_secs(90), async {
        let dir = TempDir::new("rtmps");
        let (port, tls_port) = (free_tcp_port(), free_tcp_port());
        let good = test_ca(&dir.0, "pool");
        let other = test_ca(&dir.0, "other");
        let _nginx = Nginx::start(
            &dir.0,
            port,
            Some(TlsFront {
                port: tls_port,
                cert: &good.cert,
                key: &good.key,
            }),
        );
        let target = format!("rtmps://127.0.0.1:{tls_port}/live");
        std::fs::write(dir.0.join("key"), "tlsmeeting\n").unwrap();
        let settings = |ca: &Path| StreamingSettings {
            allowed_targets: vec![target.clone()],
            credentials_file: Some(dir.0.join("key")),
            ffmpeg: "ffmpeg".into(),
            tls_ca_file: Some(ca.to_path_buf()),
        };
        let metrics = Arc::new(Metrics::new());

        // The allow-list matches the scheme: rtmps:// listed does not allow
        // the same host in clear, and a missing CA file is one clear error.
        assert!(matches!(
            streaming::resolve_target(
                &settings(&good.ca),
                &format!("rtmp://127.0.0.1:{tls_port}/live"),
                &metrics
            ),
            Err(StreamError::NotAllowed(_))
        ));
        let missing =
            streaming::resolve_target(&settings(&dir.0.join("absent.pem")), &target, &metrics)
                .unwrap_err();
        assert!(
            matches!(&missing, StreamError::TlsCa(m) if m.contains("absent.pem")),
            "{missing}"
        );

        // A CA that did not sign the front's certificate: ffmpeg fails the
        // handshake, and status and metrics say why (the stream key stays out).
        let url = streaming::resolve_target(&settings(&other.ca), &target, &metrics).unwrap();
        let (tx, rx) = mpsc::channel(100);
        let sup = streaming::start("ffmpeg".into(), url, rx, metrics.clone());
        let mut status = sup.status.clone();
        let feeding = tokio::spawn(async move {
            feed(&tx, 30, 0).await;
        });
        let failed = status
            .wait_for(|s| s.last_error.is_some())
            .await
            .unwrap()
            .clone();
        feeding.abort();
        sup.stop().await;
        assert!(
            failed.tls_verify_failed,
            "a stream_assignment gives this target up at once: {failed:?}"
        );
        let why = failed.last_error.unwrap();
        assert!(
            why.contains("certificate failed verification against streaming.tlsCaFile")
                && why.contains("other-ca.pem")
                && !why.contains("tlsmeeting"),
            "{why}"
        );
        let m = metrics.render();
        let tls_failures = sample(&m, "conclave_connector_stream_tls_verify_failures_total");
        assert!(tls_failures >= 1.0, "{m}");
        assert!(m.contains("conclave_connector_ffmpeg_running 0"), "{m}");
        assert!(
            !dir.0.join("rec/tlsmeeting.flv").exists(),
            "nothing may reach nginx through an unverified connection"
        );

        // The pool's CA: the push goes through the TLS front into nginx-rtmp.
        let url = streaming::resolve_target(&settings(&good.ca), &target, &metrics).unwrap();
        let (tx, rx) = mpsc::channel(100);
        let sup = streaming::start("ffmpeg".into(), url, rx, metrics.clone());
        let mut status = sup.status.clone();
        status.wait_for(|s| s.pid.is_some()).await.unwrap();
        feed(&tx, 3, 0).await;
        let s = sup.status.borrow().clone();
        sup.stop().await;
        assert_eq!(
            (s.restarts, s.last_error),
            (0, None),
            "the verified push never failed"
        );
        let m = metrics.render();
        assert_eq!(
            sample(&m, "conclave_connector_stream_tls_verify_failures_total"),
            tls_failures,
            "{m}"
        );

        let secs = probe_aac(&dir.0.join("rec/tlsmeeting.flv"));
        assert!(
            (2.0..4.5).contains(&secs),
            "recorded {secs} s, expected about 3"
        );
    })
    .await
    .expect("test timed out");
}

/// The value of an unlabelled sample in a metrics exposition.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
}

/// ffmpeg that cannot start is retried with exponential backoff up to the
/// cap, each failure in the status and counted; on virtual time, so the
/// delays are exact and the test takes no real time.
#[tokio::test(start_paused = true)]
async fn an_ffmpeg_that_cannot_start_is_retried_with_capped_exponential_backoff() {
    let metrics = Arc::new(Metrics::new());
    let (_tx, rx) = mpsc::channel(1);
    let sup = streaming::start(
        "/nonexistent/ffmpeg".into(),
        streaming::PushUrl::plain("rtmp://127.0.0.1:1/live"),
        rx,
        metrics.clone(),
    );
    let mut status = sup.status.clone();
    let mut gaps = Vec::new();
    status.changed().await.unwrap();
    let mut last = tokio::time::Instant::now();
    let err = status.borrow().last_error.clone().unwrap_or_default();
    assert!(err.starts_with("cannot start ffmpeg: "), "{err}");
    for _ in 0..8 {
        status.changed().await.unwrap();
        let now = tokio::time::Instant::now();
        gaps.push((now - last).as_millis());
        last = now;
    }
    let in_a_row = status.borrow().failures_in_a_row;
    sup.stop().await;
    assert_eq!(in_a_row, 9, "every failed start counts towards giving up");
    assert_eq!(
        gaps,
        [250, 500, 1000, 2000, 4000, 8000, 10_000, 10_000],
        "backoff doubles from 250 ms up to 10 s"
    );
    let m = metrics.render();
    assert!(
        m.contains("conclave_connector_ffmpeg_exits_total{kind=\"spawnError\"} 9"),
        "{m}"
    );
    assert!(m.contains("conclave_connector_ffmpeg_running 0"), "{m}");
    assert!(
        m.contains("conclave_connector_ffmpeg_restarts_total 8"),
        "{m}"
    );
}
