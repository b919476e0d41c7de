//! Starts the real kms-node binary on 127.0.0.1 with DevPki certificates
//! and a dev token issuer, and builds kms-client clients for each role.
#![allow(dead_code)]

use conclave_pki::{DevPki, Identity, Kind};
use kms_client::{KmsClient, Session};
use meeting_proto::ids::MeetingId;
use meeting_proto::key_release::EphemeralKey;
use meeting_proto::kms_api::{self as api, Hex};
use meeting_proto::token::{Claims, DevIssuerKey, Role};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const AUDIENCE: &str = "conclave-kms";
pub const NS: &str = "ns";

pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kms-node"))
}

pub struct Kms {
    pub dir: PathBuf,
    pub pki: DevPki,
    pub issuer: DevIssuerKey,
    pub port: u16,
    child: Option<Child>,
    /// Every line the server wrote to stderr (its log), across restarts.
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Kms {
    fn drop(&mut self) {
        self.kill9();
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

impl Kms {
    /// Where most tests start: a KMS (`name`, extra config lines) with one
    /// relay registered and ada hosting meeting m1 through a token client.
    pub async fn with_host(name: &str, config: &str) -> (Kms, KmsClient, Member) {
        let kms = Kms::start(name, config);
        kms.register_relay().await;
        let c = kms.anonymous();
        let host = join_with_token(&c, "m1", kms.token("ada", "m1", Role::Host))
            .await
            .unwrap();
        (kms, c, host)
    }

    /// A fresh KMS in a new temp dir; `extra` is appended to the YAML config.
    pub fn start(name: &str, extra: &str) -> Kms {
        let dir = std::env::temp_dir().join(format!("kms-it-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pki = DevPki::create(dir.join("pki"), NS).unwrap();
        pki.server("kms", &Identity::new(NS, Kind::Kms, "kms").unwrap())
            .unwrap();
        let issuer = DevIssuerKey::from_seed("k1", &[7; 32]).unwrap();
        std::fs::write(dir.join("jwks.json"), issuer.jwks_json()).unwrap();
        let port = free_port();
        let config = format!(
            "listen: 127.0.0.1:{port}
opsListen: null
dataDir: {d}/data
tls: {{certFile: {d}/pki/kms.crt, keyFile: {d}/pki/kms.key, clientCaFile: {d}/pki/ca.crt}}
rootKey: {{file: {d}/root.key, generateIfMissing: true}}
issuers:
  - {{issuer: portal, jwksFile: {d}/jwks.json, audience: {AUDIENCE}}}
admins: [\"conclave://{NS}/admin/auditor\"]
connectorPools:
  - {{identity: \"conclave://{NS}/connector/rec\", kind: recording}}
  - {{identity: \"conclave://{NS}/connector/live\", kind: liveStreaming}}
recordingKeyReaders: [\"token:portal:auditor\"]
{limits}{extra}",
            d = dir.display(),
            limits = if extra.contains("limits:") {
                ""
            } else {
                "limits: {perIdentityRps: 1000, perIdentityBurst: 2000, perMeetingRps: 5000, perMeetingBurst: 10000}\n"
            },
        );
        std::fs::write(dir.join("kms.yaml"), config).unwrap();
        let mut kms = Kms {
            dir,
            pki,
            issuer,
            port,
            child: None,
            log: Arc::default(),
        };
        kms.restart();
        kms
    }

    /// Starts the binary and waits for its "listening" log line.
    pub fn restart(&mut self) {
        self.kill9();
        let mut child = Command::new(bin())
            .arg("serve")
            .arg("--config")
            .arg(self.dir.join("kms.yaml"))
            .env("RUST_LOG", "info,kms_node=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kms-node binary (cargo builds it for these tests)");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let log = self.log.clone();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("kms listening (https)") {
                    let _ = tx.send(Ok(()));
                }
                log.lock().unwrap().push(line.clone());
                seen.push(line);
                if seen.len() > 50 {
                    seen.remove(0);
                }
            }
            let _ = tx.send(Err(seen.join("\n")));
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(())) => {}
            Ok(Err(log)) => panic!("kms-node exited before listening:\n{log}"),
            Err(_) => panic!("kms-node did not start listening within 60 s"),
        }
        self.child = Some(child);
    }

    /// SIGTERM, then waits (at most 30 s) for the process to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("kms-node is running");
        let sent = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -TERM failed");
        for _ in 0..300 {
            if let Some(status) = c.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = c.kill();
        let _ = c.wait();
        panic!("kms-node did not exit within 30 s of SIGTERM");
    }

    /// Bytes the server process has caused to be written to storage (counted by the kernel
    /// when it dirties page-cache pages: what its fsyncs will write), from /proc.
    pub fn disk_write_bytes(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
        io.lines()
            .find_map(|l| l.strip_prefix("write_bytes:"))?
            .trim()
            .parse()
            .ok()
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn anonymous(&self) -> KmsClient {
        let tls = conclave_pki::tls::anonymous_client_config(&self.pki.ca_path()).unwrap();
        KmsClient::new(&self.url(), tls).unwrap()
    }

    pub fn as_identity(&self, file: &str, id: Identity) -> KmsClient {
        let files = self.pki.client(file, &id).unwrap();
        KmsClient::new(
            &self.url(),
            conclave_pki::tls::client_config(&files).unwrap(),
        )
        .unwrap()
    }

    pub fn admin(&self) -> KmsClient {
        self.as_identity("admin", Identity::new(NS, Kind::Admin, "auditor").unwrap())
    }

    pub fn relay(&self) -> KmsClient {
        self.as_identity(
            "relay",
            Identity::new(NS, Kind::Relay, "zone-a")
                .unwrap()
                .with_pod("relay-0")
                .unwrap(),
        )
    }

    /// The server's log so far (stderr lines).
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn streamer(&self) -> KmsClient {
        self.as_identity(
            "live0",
            Identity::new(NS, Kind::Connector, "live")
                .unwrap()
                .with_pod("live-0")
                .unwrap(),
        )
    }

    pub fn recorder(&self) -> KmsClient {
        self.as_identity(
            "rec0",
            Identity::new(NS, Kind::Connector, "rec")
                .unwrap()
                .with_pod("rec-0")
                .unwrap(),
        )
    }

    pub fn claims(&self, sub: &str, meeting: &str, role: Role) -> Claims {
        Claims {
            sub: sub.into(),
            name: sub.to_uppercase(),
            mid: MeetingId::new(meeting).unwrap(),
            role,
            aud: vec![AUDIENCE.into()],
            exp: now_s() + 600,
            nbf: None,
            iat: Some(now_s()),
            iss: Some("portal".into()),
        }
    }

    pub fn token(&self, sub: &str, meeting: &str, role: Role) -> String {
        self.issuer.mint(&self.claims(sub, meeting, role))
    }

    pub async fn register_relay(&self) -> api::RelayRegisterResponse {
        self.relay()
            .register_relay(&api::RelayRegisterRequest {
                zone: "zone-a".into(),
                address: "127.0.0.1:40000".into(),
                capacity: 100_000,
                instance: None,
            })
            .await
            .unwrap()
    }

    pub fn stop_and_open_store(&mut self) -> kms_node::store::Store {
        self.kill9();
        kms_node::store::Store::open(&self.data_dir()).unwrap()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("kms.yaml")
    }
}

/// A participant: its ephemeral key and what join returned.
#[derive(Debug)]
pub struct Member {
    pub key: EphemeralKey,
    pub joined: api::JoinResponse,
    pub meeting: MeetingId,
}

impl Member {
    pub fn session(&self) -> Session {
        Session(self.joined.session.clone())
    }
    pub fn open(&self, sealed: &api::SealedKey) -> [u8; 32] {
        *self
            .key
            .open_meeting_key(sealed, &self.meeting, self.joined.participant)
            .unwrap()
            .as_bytes()
    }
}

pub async fn join_with_token(
    c: &KmsClient,
    meeting: &str,
    token: String,
) -> Result<Member, kms_client::Error> {
    join_with_key(c, meeting, token, EphemeralKey::generate()).await
}

/// Joins with a key pair made beforehand (the benchmark makes them before
/// timing, as a participant's device would).
pub async fn join_with_key(
    c: &KmsClient,
    meeting: &str,
    token: String,
    key: EphemeralKey,
) -> Result<Member, kms_client::Error> {
    let meeting = MeetingId::new(meeting).unwrap();
    let joined = c
        .join(
            &meeting,
            &api::JoinRequest {
                token: Some(token),
                invitation: None,
                public_key: Hex(key.public_key().to_vec()),
                display_name: None,
            },
        )
        .await?;
    Ok(Member {
        key,
        joined,
        meeting,
    })
}

pub async fn audit_has(admin: &KmsClient, pred: impl Fn(&api::AuditEntry) -> bool) -> bool {
    let mut from = 0;
    loop {
        let page = admin.audit(from, 1000).await.unwrap();
        if page.entries.iter().any(&pred) {
            return true;
        }
        match page.entries.last() {
            Some(last) => from = last.seq + 1,
            None => return false,
        }
    }
}

pub fn run_cli(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(bin()).args(args).output().unwrap()
}
