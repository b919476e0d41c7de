//! A real kms-node for process tests: DevPki certificates, a dev token
//! issuer, relay client certificates for `relay-0` and `relay-1`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use conclave_pki::{DevPki, Identity, Kind};
use meeting_proto::ids::MeetingId;
use meeting_proto::token::{Claims, DevIssuerKey, Role};

use super::{RelayProc, bin, http_get, metric, report, start_relay, temp_dir};

const NS: &str = "ns";
const AUDIENCE: &str = "conclave-kms";

pub struct Kms {
    child: Child,
    pub dir: PathBuf,
    pub url: String,
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

pub fn start_kms() -> Kms {
    let dir = temp_dir("kms");
    let pki = DevPki::create(dir.join("pki"), NS).unwrap();
    pki.server("kms", &Identity::new(NS, Kind::Kms, "kms").unwrap())
        .unwrap();
    for pod in ["relay-0", "relay-1"] {
        pki.client(
            pod,
            &Identity::new(NS, Kind::Relay, "zone-a")
                .unwrap()
                .with_pod(pod)
                .unwrap(),
        )
        .unwrap();
    }
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
    pub fn ca(&self) -> PathBuf {
        self.dir.join("pki/ca.crt")
    }
    /// Relay config lines for relay pod `pod` (`relay-0` or `relay-1`).
    pub fn relay_yaml(&self, pod: &str) -> String {
        let d = self.dir.join("pki");
        format!(
            "kms: {{url: \"{}\", caFile: {c}/ca.crt, certFile: {c}/{pod}.crt, keyFile: {c}/{pod}.key, heartbeatSeconds: 1}}\n",
            self.url,
            c = d.display()
        )
    }
    pub fn token(&self, sub: &str, meeting: &str) -> String {
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
    pub fn join_cmd(&self, meeting: &str, sub: &str, tone: f64, secs: f64) -> Command {
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

/// What happens to the relay carrying the meeting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayFault {
    /// SIGKILL, as a crash or a node loss.
    Kill,
    /// SIGKILL, then started again under the same identity at once (a pod
    /// or container restart).
    KillAndRestart,
    /// SIGTERM with a drain longer than the meeting (a rolling update): it
    /// keeps forwarding while it drains, and is still up at the end.
    Drain,
}

/// Two participants (440 and 660 Hz, 12 s) meet through relays `pods` of
/// this KMS; once audio flows through the relay carrying the meeting (so a
/// gap spans the fault), that relay suffers `fault`. Returns the
/// participants' reports and the relays, the one that carried the meeting
/// last if it is still running (drained).
pub fn fault_the_meetings_relay(
    kms: &Kms,
    meeting: &str,
    pods: &[&str],
    fault: RelayFault,
) -> (Vec<serde_json::Value>, Vec<RelayProc>) {
    let drain = if fault == RelayFault::Drain {
        "drainSeconds: 60\n"
    } else {
        ""
    };
    let mut relays: Vec<RelayProc> = pods
        .iter()
        .map(|pod| start_relay(&format!("{}{drain}", kms.relay_yaml(pod))))
        .collect();
    let clients: Vec<Child> = [("alice", 440.0), ("bob", 660.0)]
        .iter()
        .map(|(who, f)| kms.join_cmd(meeting, who, *f, 12.0).spawn().unwrap())
        .collect();
    let mut placed = None;
    for _ in 0..200 {
        placed = relays.iter().position(|r| {
            let text = http_get(r.http, "/metrics").1;
            metric(&text, "conclave_relay_participants") == 2.0
                && metric(&text, r#"conclave_relay_packets_sent_total{kind="audio"}"#) >= 50.0
        });
        if placed.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let placed = placed.expect("the meeting never reached a relay");
    let mut faulted = relays.remove(placed);
    match fault {
        RelayFault::Kill | RelayFault::KillAndRestart => {
            faulted.child.kill().unwrap();
            faulted.child.wait().unwrap();
        }
        RelayFault::Drain => super::signal(faulted.child.id(), "TERM"),
    }
    if fault == RelayFault::KillAndRestart {
        relays.push(start_relay(&kms.relay_yaml(pods[placed])));
    }
    let reports = clients.into_iter().map(report).collect();
    if fault == RelayFault::Drain {
        relays.push(faulted);
    }
    (reports, relays)
}
