//! The connector-node binary as a process: config validation errors, a
//! telephony pool answering SIP, /metrics and /healthz, a recording pool's
//! storage gauge.

mod common;

use common::TempDir;
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_connector-node");

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn invalid_config_is_refused_with_the_key_named() {
    let dir = TempDir::new("run-bad");
    let cfg = dir.0.join("c.yaml");
    std::fs::write(
        &cfg,
        "type: liveStreaming\npool: p\nkms: {url: 'https://k', caFile: /a, certFile: /b, keyFile: /c}\n\
         streaming: {allowedTargets: ['ftp://x']}\n",
    )
    .unwrap();
    let o = Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("streaming.allowedTargets"), "{err}");
}

/// `connector-node run` for a pool of `kind` named `pool`, with `section`
/// (the kind's config section) and real certificate files, but no KMS at
/// its URL: a pool keeps retrying assignments and serves meanwhile. Returns
/// the process, its metrics port and its log file.
fn start_pool(
    dir: &TempDir,
    kind: &str,
    pool: &str,
    section: (&str, serde_json::Value),
) -> (Proc, u16, std::path::PathBuf) {
    let metrics_port = common::free_port();
    let pki = conclave_pki::DevPki::create(dir.0.join("pki"), "ns").unwrap();
    let files = pki
        .client(
            pool,
            &conclave_pki::Identity::new("ns", conclave_pki::Kind::Connector, pool).unwrap(),
        )
        .unwrap();
    let mut cfg = serde_json::json!({
        "type": kind, "pool": pool,
        "kms": {"url": "https://127.0.0.1:1", "caFile": files.ca, "certFile": files.cert, "keyFile": files.key},
        "metricsListen": format!("127.0.0.1:{metrics_port}"),
    });
    cfg[section.0] = section.1;
    let path = dir.0.join("c.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let log = dir.0.join("connector.log");
    let p = Proc(
        Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    (p, metrics_port, log)
}

#[test]
fn telephony_pool_serves_sip_metrics_and_health() {
    let dir = TempDir::new("run-tel");
    let sip_port = common::free_port();
    let (mut pool, metrics_port, log) = start_pool(
        &dir,
        "telephony",
        "phones",
        (
            "sip",
            serde_json::json!({"listen": format!("127.0.0.1:{sip_port}"), "dialIn": {"+15550100": "weekly-sync"}}),
        ),
    );
    let mut health = None;
    for _ in 0..100 {
        health = http_get(metrics_port, "/healthz");
        if health.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        health
            .expect("healthz answered")
            .starts_with("HTTP/1.1 200 OK")
    );
    // SIP answers OPTIONS on the configured port.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let p = sock.local_addr().unwrap().port();
    let options = format!(
        "OPTIONS sip:phones@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{p};branch=z9hG4bKrun\r\n\
         From: <sip:t@127.0.0.1>;tag=1\r\nTo: <sip:phones@127.0.0.1>\r\nCall-ID: run1\r\nCSeq: 1 OPTIONS\r\n\
         Content-Length: 0\r\n\r\n"
    );
    sock.send_to(options.as_bytes(), ("127.0.0.1", sip_port))
        .unwrap();
    let mut buf = [0u8; 2048];
    let (n, _) = sock.recv_from(&mut buf).expect("SIP answer");
    assert!(buf[..n].starts_with(b"SIP/2.0 200 OK"));
    // Garbage is counted in the metrics.
    sock.send_to(b"garbage\r\n\r\n", ("127.0.0.1", sip_port))
        .unwrap();
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = http_get(metrics_port, "/metrics").unwrap_or_default();
        if metrics
            .contains("conclave_connector_sip_messages_rejected_total{reason=\"malformed\"} 1")
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        metrics.contains("conclave_connector_sip_messages_rejected_total{reason=\"malformed\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("# TYPE conclave_connector_phone_legs_active gauge"));
    // SIGTERM (pod deletion) ends it cleanly: exit 0, not death by the
    // signal (which PID 1 in a container would ignore until SIGKILL).
    let status = terminate(&mut pool);
    let log = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}\n{log}");
    assert!(log.contains("connector stopped"), "{log}");
}

/// SIGTERM, then waits (at most 30 s) for the process to exit.
fn terminate(p: &mut Proc) -> std::process::ExitStatus {
    let sent = Command::new("kill")
        .args(["-TERM", &p.0.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success(), "kill -TERM failed");
    for _ in 0..300 {
        if let Some(status) = p.0.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("connector-node did not exit within 30 s of SIGTERM");
}

/// A recording pool process finds what earlier pods left on its volume (one
/// scan at start), and retention's deletions come off the storage gauge.
#[test]
fn recording_pool_reports_storage_used_after_retention() {
    let dir = TempDir::new("rec-storage");
    let base = dir.0.join("recordings");
    for (name, files) in [
        (
            "old-1",
            &[("manifest.json.enc", 10), ("mixed.opus.enc", 1000)][..],
        ),
        (
            "kept-2",
            &[("manifest.json.enc", 20), ("mixed.opus.enc", 3000)][..],
        ),
    ] {
        std::fs::create_dir_all(base.join(name)).unwrap();
        for (f, len) in files {
            std::fs::write(base.join(name).join(f), vec![0u8; *len]).unwrap();
        }
    }
    let long_ago = std::time::SystemTime::now() - Duration::from_secs(40 * 86_400);
    std::fs::File::open(base.join("old-1"))
        .unwrap()
        .set_modified(long_ago)
        .unwrap();

    let (mut pool, port, log) = start_pool(
        &dir,
        "recording",
        "rec",
        (
            "recording",
            serde_json::json!({"dir": base, "retentionDays": 30}),
        ),
    );
    let want = "conclave_connector_recording_storage_used_bytes 3020";
    let mut text = String::new();
    for _ in 0..200 {
        text = http_get(port, "/metrics").unwrap_or_default();
        if text.contains(want) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        text.contains(want),
        "{text}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        text.contains("# HELP conclave_connector_recording_storage_used_bytes ")
            && text.contains("# TYPE conclave_connector_recording_storage_used_bytes gauge"),
        "{text}"
    );
    assert!(!base.join("old-1").exists() && base.join("kept-2").exists());
    // The sweep subtracted what it deleted from the start scan's total
    // (4030 - 1010), rather than the scan running after the deletion.
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged
            .lines()
            .any(|l| l.contains("retention sweep") && l.contains("\"bytes\":1010")),
        "{logged}"
    );
    // Waiting for assignments, it stops on SIGTERM like the other kinds.
    let status = terminate(&mut pool);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}\n{logged}");
    assert!(logged.contains("connector stopped"), "{logged}");
}
