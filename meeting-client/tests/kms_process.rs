//! With a real kms-node: the relay registers over mTLS, participants join
//! with tokens, keys come sealed from the KMS, a leaver is locked out.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use conclave_pki::{DevPki, Identity, Kind};
use meeting_client::join;
use meeting_client::session::{Event, Session};
use meeting_proto::ids::MeetingId;
use meeting_proto::token::{Claims, DevIssuerKey, Role};

const NS: &str = "ns";
const AUDIENCE: &str = "conclave-kms";

struct Kms {
    child: Child,
    dir: PathBuf,
    url: String,
    issuer: DevIssuerKey,
}

impl Drop for Kms {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_kms() -> Kms {
    let dir = temp_dir("kms");
    let pki = DevPki::create(dir.join("pki"), NS).unwrap();
    pki.server("kms", &Identity::new(NS, Kind::Kms, "kms").unwrap())
        .unwrap();
    pki.client(
        "relay",
        &Identity::new(NS, Kind::Relay, "zone-a")
            .unwrap()
            .with_pod("relay-0")
            .unwrap(),
    )
    .unwrap();
    let issuer = DevIssuerKey::from_seed("k1", &[3; 32]).unwrap();
    std::fs::write(dir.join("jwks.json"), issuer.jwks_json()).unwrap();
    let port = free_port();
    std::fs::write(
        dir.join("kms.yaml"),
        format!(
            "listen: 127.0.0.1:{port}
opsListen: null
dataDir: {d}/data
tls: {{certFile: {d}/pki/kms.crt, keyFile: {d}/pki/kms.key, clientCaFile: {d}/pki/ca.crt}}
rootKey: {{file: {d}/root.key, generateIfMissing: true}}
issuers:
  - {{issuer: portal, jwksFile: {d}/jwks.json, audience: {AUDIENCE}}}
limits: {{perIdentityRps: 1000, perIdentityBurst: 2000, perMeetingRps: 5000, perMeetingBurst: 10000}}
relays: {{heartbeatIntervalMs: 1000, heartbeatTimeoutMs: 3000}}
",
            d = dir.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(bin("kms-node"))
        .arg("serve")
        .arg("--config")
        .arg(dir.join("kms.yaml"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent && line.contains("kms listening (https)") {
                let _ = tx.send(());
                sent = true;
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("kms-node did not start listening within 60 s");
    Kms {
        child,
        url: format!("https://127.0.0.1:{port}"),
        dir,
        issuer,
    }
}

impl Kms {
    fn ca(&self) -> PathBuf {
        self.dir.join("pki/ca.crt")
    }
    fn relay_yaml(&self) -> String {
        let d = self.dir.join("pki");
        format!(
            "kms: {{url: \"{}\", caFile: {c}/ca.crt, certFile: {c}/relay.crt, keyFile: {c}/relay.key, heartbeatSeconds: 1}}\n",
            self.url,
            c = d.display()
        )
    }
    fn token(&self, sub: &str, meeting: &str) -> String {
        let now = meeting_client::dev::unix_now();
        self.issuer.mint(&Claims {
            sub: sub.into(),
            name: sub.to_uppercase(),
            mid: MeetingId::new(meeting).unwrap(),
            role: Role::Participant,
            aud: vec![AUDIENCE.into()],
            exp: now + 600,
            nbf: None,
            iat: Some(now),
            iss: Some("portal".into()),
        })
    }
    fn join_cmd(&self, meeting: &str, sub: &str, tone: f64, secs: f64) -> Command {
        let mut c = Command::new(bin("conclave-client"));
        c.args(["join", "--kms", &self.url, "--kms-ca"])
            .arg(self.ca())
            .args(["--token", &self.token(sub, meeting), "--meeting", meeting])
            .args(["--tone", &tone.to_string(), "--duration", &secs.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }
}

#[test]
fn three_participants_join_through_the_kms_and_hear_each_other() {
    let kms = start_kms();
    let relay = start_relay(&kms.relay_yaml());
    let tones = [440.0, 660.0, 880.0];
    let children: Vec<Child> = ["alice", "bob", "carol"]
        .iter()
        .zip(tones)
        .map(|(who, f)| {
            kms.join_cmd("kms-standup", who, f, 3.0)
                .args(["--chat", &format!("hi from {who}")])
                .spawn()
                .unwrap()
        })
        .collect();
    let reports: Vec<serde_json::Value> = children.into_iter().map(report).collect();
    let senders: Vec<u64> = reports
        .iter()
        .map(|r| r["sender_index"].as_u64().unwrap())
        .collect();
    for (i, r) in reports.iter().enumerate() {
        assert_eq!(r["joined"], true, "{r}");
        let auth = r["stats"]["open_failures"]["authentication"]
            .as_u64()
            .unwrap_or(0);
        assert_eq!(auth, 0, "no frame may fail authentication: {r}");
        for (j, other) in senders.iter().enumerate().filter(|(j, _)| *j != i) {
            let frames = r["audio_frames"][other.to_string()].as_u64().unwrap_or(0);
            assert!(
                frames >= 75,
                "participant {i} decoded {frames} frames of {j}: {r}"
            );
            let hz = r["dominant_hz"][other.to_string()].as_f64().unwrap();
            assert!(
                (hz - tones[j]).abs() <= 10.0,
                "{i} hears {hz} Hz from {j}: {r}"
            );
        }
        assert_eq!(r["chats"].as_array().unwrap().len(), 2, "{r}");
    }
    let (_, text) = http_get(relay.http, "/metrics");
    assert!(metric(&text, r#"conclave_relay_packets_sent_total{kind="audio"}"#) > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaver_that_keeps_capturing_cannot_decrypt_after_the_rotation() {
    let kms = start_kms();
    let relay = start_relay(&kms.relay_yaml());
    let stay: Vec<Child> = [("alice", 440.0), ("bob", 660.0)]
        .iter()
        .map(|(who, f)| kms.join_cmd("rotation", who, *f, 8.0).spawn().unwrap())
        .collect();

    // The leaver runs in this test so it can keep listening after leaving.
    let tls = conclave_pki::tls::anonymous_client_config(&kms.ca()).unwrap();
    let client = kms_client::KmsClient::new(&kms.url, tls).unwrap();
    let meeting = MeetingId::new("rotation").unwrap();
    let (creds, link) = join::kms_join(client, meeting.clone(), &kms.token("mallory", "rotation"))
        .await
        .unwrap();
    let socket = join::relay_socket(creds.relay).await.unwrap();
    let mut s = Session::new(
        meeting.clone(),
        creds.sender_index,
        creds.ticket,
        creds.key,
        1,
        Instant::now(),
    );
    let (mut updates, follower) = join::follow_events(link);
    let mut buf = vec![0u8; 2048];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);

    // Phase 1: a member like any other, installing new keys as they come.
    let mut opened_as_member = 0u64;
    join::flush(&mut s, &socket).await.unwrap();
    while opened_as_member < 50 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never heard the meeting"
        );
        tokio::select! {
            r = socket.recv(&mut buf) => if let Ok(n) = r { s.handle_datagram(&buf[..n], Instant::now()) },
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(s.poll_timeout())) => s.handle_timeout(Instant::now()),
            Some(u) = updates.recv() => if let join::Update::Key(k) = u { s.set_epoch(k, Instant::now()) },
        }
        while let Some(ev) = s.poll_event() {
            opened_as_member += matches!(ev, Event::Media(_)) as u64;
        }
        join::flush(&mut s, &socket).await.unwrap();
    }

    // Phase 2: leave through the KMS, but keep the relay binding (keep-alives)
    // and every key held so far, and keep capturing.
    drop(updates);
    let link = follower.await.unwrap();
    link.client
        .leave(&link.meeting, &link.session)
        .await
        .unwrap();
    let last_epoch = s.epoch();
    let failures = |s: &Session| {
        s.stats()
            .open_failures
            .get("unknown_epoch")
            .copied()
            .unwrap_or(0)
    };
    let failures_at_leave = failures(&s);
    let capture_end = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut opened_newer = 0u64;
    let mut opened_last_second = 0u64;
    while tokio::time::Instant::now() < capture_end {
        tokio::select! {
            r = socket.recv(&mut buf) => if let Ok(n) = r { s.handle_datagram(&buf[..n], Instant::now()) },
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(s.poll_timeout())) => s.handle_timeout(Instant::now()),
            _ = tokio::time::sleep_until(capture_end) => {}
        }
        while let Some(ev) = s.poll_event() {
            if let Event::Media(o) = ev {
                opened_newer += (o.epoch > last_epoch) as u64;
                opened_last_second +=
                    (capture_end - tokio::time::Instant::now() < Duration::from_secs(1)) as u64;
            }
        }
        join::flush(&mut s, &socket).await.unwrap();
    }
    let refused = failures(&s) - failures_at_leave;
    assert_eq!(
        opened_newer, 0,
        "a frame of an epoch after the leave opened"
    );
    assert_eq!(
        opened_last_second, 0,
        "the leaver still decrypts the meeting after rotation"
    );
    assert!(
        refused >= 50,
        "the relay kept forwarding ({refused} frames captured) and none opened"
    );
    for c in stay {
        let r = report(c);
        assert!(
            r["epochs"].as_array().unwrap().len() >= 2,
            "the others moved to a new epoch: {r}"
        );
    }
    drop(relay);
}
