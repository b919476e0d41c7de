//! Process helpers: the real `media-node` and `conclave-client` binaries on
//! 127.0.0.1, stopped by PID when a test ends (pass or fail).

#![allow(dead_code)] // each test file uses a different subset

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use meeting_client::dev::DevIssuer;

pub mod kms;

pub const RELAY_ID: &str = "test-zone/relay-0";
pub const SEED_HEX: &str = "0707070707070707070707070707070707070707070707070707070707070707";
pub const KEY_HEX: &str = "1111111111111111111111111111111111111111111111111111111111111111";

pub fn bin(name: &str) -> PathBuf {
    let mut dir = std::env::current_exe().expect("test binary path");
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let mut p = dir.join(name);
    // Benchmarks run from target/release, where other packages' binaries may
    // be stale or absent; `make bench` builds the debug ones first.
    if dir.ends_with("release") && dir.with_file_name("debug").join(name).exists() {
        p = dir.with_file_name("debug").join(name);
    }
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

pub fn issuer() -> DevIssuer {
    DevIssuer::new([7u8; 32], RELAY_ID)
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "conclave-{tag}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A running relay process; killed on drop.
pub struct RelayProc {
    pub child: Child,
    pub media: SocketAddr,
    pub http: SocketAddr,
    pub dir: PathBuf,
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn start_relay(extra_yaml: &str) -> RelayProc {
    let dir = temp_dir("relay");
    let cfg = dir.join("relay.yaml");
    std::fs::write(
        &cfg,
        format!(
            "relayId: {RELAY_ID}\nzone: zone-a\nlisten: 127.0.0.1:0\nadvertise: 127.0.0.1:0\nhttpListen: 127.0.0.1:0\nticketPublicKey: {}\n{extra_yaml}",
            issuer().public_key_hex()
        ),
    )
    .unwrap();
    let mut child = Command::new(bin("media-node"))
        .arg("--config")
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting media-node");
    // Bounded: a relay that cannot start (or register) must fail the test, not hang it.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(l) => l,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("media-node did not print its addresses within 30 s");
        }
    };
    let v: serde_json::Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("media-node did not print its addresses ({e}): {line:?}"));
    RelayProc {
        child,
        media: v["media"].as_str().unwrap().parse().unwrap(),
        http: v["http"].as_str().unwrap().parse().unwrap(),
        dir,
    }
}

/// Plain HTTP/1.1 GET; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_owned();
    (status, body)
}

/// The value of one sample line in Prometheus text (0 when absent).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// A `conclave-client join` process with dev credentials.
pub fn join_cmd(relay: SocketAddr, meeting: &str, sender: u16, tone: f64, secs: f64) -> Command {
    let mut c = Command::new(bin("conclave-client"));
    c.args([
        "join",
        "--relay",
        &relay.to_string(),
        "--relay-id",
        RELAY_ID,
    ])
    .args(["--dev-ticket-seed", SEED_HEX, "--meeting-key", KEY_HEX])
    .args(["--meeting", meeting, "--sender", &sender.to_string()])
    .args(["--tone", &tone.to_string(), "--duration", &secs.to_string()])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    c
}

/// Waits for a join process (bounded) and returns its report.
pub fn report(child: Child) -> serde_json::Value {
    let out = wait_bounded(child, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("{\"report\""))
        .unwrap_or_else(|| {
            panic!(
                "no report; stdout: {stdout}\nstderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    serde_json::from_str::<serde_json::Value>(line).unwrap()["report"].clone()
}

pub fn wait_bounded(child: Child, limit: Duration) -> std::process::Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            signal(pid, "KILL");
            let out = rx.recv().unwrap().unwrap();
            panic!(
                "process did not finish within {limit:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Sends a signal to one process we started, by its PID.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill -{sig} {pid} failed");
}
