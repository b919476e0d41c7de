//! The recording connector with the real KMS and relay (processes on
//! 127.0.0.1): the host invites it, it picks the assignment up with its
//! client certificate, joins with the invitation (visible in the roster as
//! `connector:recording`), records under a KMS data key; an authorized reader
//! decrypts, anyone else is refused by the KMS; an uninvited connector gets
//! no key and the audit log shows the denial.

mod common;

use common::{TempDir, require};
use conclave_pki::{DevPki, Identity, Kind};
use connector_node::metrics::Metrics;
use connector_node::recording::{decrypt, live};
use connector_node::{kms, meeting};
use kms_client::KmsClient;
use meeting_client::audio::Encoder;
use meeting_client::join::Credentials;
use meeting_proto::ids::MeetingId;
use meeting_proto::key_release::EphemeralKey;
use meeting_proto::kms_api::{self as api, AuditKind, ConnectorKind, Hex};
use meeting_proto::media_keys::EpochKey;
use meeting_proto::token::{Claims, DevIssuerKey, Role};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

const NS: &str = "ns";
const AUD: &str = "conclave-kms";

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

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct World {
    _dir: TempDir,
    _kms: Proc,
    url: String,
    pki: DevPki,
    issuer: DevIssuerKey,
}

impl World {
    fn start(dir: TempDir) -> Self {
        let d = dir.0.clone();
        let pki = DevPki::create(d.join("pki"), NS).unwrap();
        pki.server("kms", &Identity::new(NS, Kind::Kms, "kms").unwrap())
            .unwrap();
        let issuer = DevIssuerKey::from_seed("k1", &[7; 32]).unwrap();
        std::fs::write(d.join("jwks.json"), issuer.jwks_json()).unwrap();
        let port = free_port();
        std::fs::write(
            d.join("kms.yaml"),
            format!(
                "listen: 127.0.0.1:{port}\nopsListen: null\ndataDir: {d}/data\n\
                 tls: {{certFile: {d}/pki/kms.crt, keyFile: {d}/pki/kms.key, clientCaFile: {d}/pki/ca.crt}}\n\
                 rootKey: {{file: {d}/root.key, generateIfMissing: true}}\n\
                 issuers:\n  - {{issuer: portal, jwksFile: {d}/jwks.json, audience: {AUD}}}\n\
                 admins: [\"conclave://{NS}/admin/auditor\"]\n\
                 connectorPools:\n  - {{identity: \"conclave://{NS}/connector/rec\", kind: recording}}\n  - {{identity: \"conclave://{NS}/connector/live\", kind: liveStreaming}}\n  - {{identity: \"conclave://{NS}/connector/phones\", kind: telephony}}\n  - {{identity: \"conclave://{NS}/connector/rooms\", kind: roomSystem}}\n\
                 recordingKeyReaders: [\"token:portal:auditor\"]\n",
                d = d.display()
            ),
        )
        .unwrap();
        let mut child = Command::new(bin("kms-node"))
            .arg("serve")
            .arg("--config")
            .arg(d.join("kms.yaml"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let kms = Proc(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("kms listening (https)") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("kms-node listening");
        World {
            _dir: dir,
            _kms: kms,
            url: format!("https://127.0.0.1:{port}"),
            pki,
            issuer,
        }
    }

    fn client(&self, file: &str, id: Option<Identity>) -> KmsClient {
        let tls = match id {
            Some(id) => {
                conclave_pki::tls::client_config(&self.pki.client(file, &id).unwrap()).unwrap()
            }
            None => conclave_pki::tls::anonymous_client_config(&self.pki.ca_path()).unwrap(),
        };
        KmsClient::new(&self.url, tls).unwrap()
    }

    /// Pod `<pool>-0` of connector pool `pool`, with its client certificate.
    fn connector(&self, pool: &str) -> KmsClient {
        let id = Identity::new(NS, Kind::Connector, pool)
            .unwrap()
            .with_pod(format!("{pool}-0"))
            .unwrap();
        self.client(&format!("{pool}0"), Some(id))
    }

    fn token(&self, sub: &str, meeting: &str, role: Role) -> String {
        self.issuer.mint(&Claims {
            sub: sub.into(),
            name: sub.to_uppercase(),
            mid: MeetingId::new(meeting).unwrap(),
            role,
            aud: vec![AUD.into()],
            exp: now_s() + 600,
            nbf: None,
            iat: Some(now_s()),
            iss: Some("portal".into()),
        })
    }
}

/// ffprobe a decrypted track: Opus; its duration in seconds.
fn probe_opus(file: &std::path::Path) -> f64 {
    let p = common::ffprobe(file);
    assert_eq!(p.codec, "opus", "{p:?}");
    p.secs
}

/// A relay registered with the KMS (heartbeating), verifying the KMS's tickets.
async fn start_relay(w: &World) -> (Proc, tokio::task::JoinHandle<()>) {
    let relay_port = common::free_port();
    let relay_client = w.client(
        "relay",
        Some(
            Identity::new(NS, Kind::Relay, "zone-a")
                .unwrap()
                .with_pod("relay-0")
                .unwrap(),
        ),
    );
    let reg = relay_client
        .register_relay(&api::RelayRegisterRequest {
            zone: "zone-a".into(),
            address: format!("127.0.0.1:{relay_port}"),
            capacity: 1000,
            instance: None,
        })
        .await
        .unwrap();
    let relay_cfg = w._dir.0.join("relay.yaml");
    std::fs::write(
            &relay_cfg,
            format!(
                "relayId: {}\nzone: zone-a\nlisten: 127.0.0.1:{relay_port}\nadvertise: 127.0.0.1:{relay_port}\nhttpListen: 127.0.0.1:0\nticketPublicKey: {}\n",
                reg.relay,
                hex::encode(&reg.ticket_public_key.0)
            ),
        )
        .unwrap();
    let mut relay = Command::new(bin("media-node"))
        .arg("--config")
        .arg(&relay_cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(relay.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let relay = Proc(relay);
    let hb = tokio::spawn(async move {
        loop {
            let _ = relay_client
                .heartbeat(&api::RelayHeartbeatRequest {
                    load: 0,
                    ready: true,
                })
                .await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });

    (relay, hb)
}

/// The host's credentials to join the relay (E2EE with the KMS's epoch key).
/// The meeting's host, joined through the KMS with `key`.
async fn join_host(
    w: &World,
    people: &KmsClient,
    meeting: &MeetingId,
    key: &EphemeralKey,
) -> api::JoinResponse {
    people
        .join(
            meeting,
            &api::JoinRequest {
                token: Some(w.token("ada", meeting.as_str(), Role::Host)),
                invitation: None,
                public_key: Hex(key.public_key().to_vec()),
                display_name: None,
            },
        )
        .await
        .unwrap()
}

/// What a SIP peer (baresip) plays, a 30 s 1000 Hz tone at 8 kHz in `wav_name`, and the
/// directory for its configuration and recordings.
fn sip_peer_files(w: &World, wav_name: &str) -> (PathBuf, PathBuf) {
    let wav = w._dir.0.join(wav_name);
    common::write_wav(
        &wav,
        8000,
        &connector_node::media::tone::sine(1000.0, 8000, 8000.0, 0, 8000 * 30),
    );
    let dir = w._dir.0.join("baresip");
    std::fs::create_dir_all(&dir).unwrap();
    (wav, dir)
}

fn host_creds(host: &api::JoinResponse, key: &EphemeralKey, meeting: &MeetingId) -> Credentials {
    let opened = key
        .open_meeting_key(&host.key, meeting, host.participant)
        .unwrap();
    Credentials {
        meeting: meeting.clone(),
        sender_index: host.sender_index,
        relay: host.relay.address.parse().unwrap(),
        ticket: host.relay.ticket.0.clone(),
        key: EpochKey::new(meeting.clone(), opened.epoch, opened.as_bytes()).unwrap(),
    }
}

/// The meeting's current epoch key, as the host gets it from the KMS (a
/// resync: since = 0). Every join, a connector's too, starts a new epoch
/// whose key the members get only through their events, so the host
/// switches to it once a connector is in.
async fn host_key_now(
    people: &KmsClient,
    meeting: &MeetingId,
    host: &api::JoinResponse,
    key: &EphemeralKey,
) -> EpochKey {
    let session = kms_client::Session(host.session.clone());
    let ev = people.events(meeting, &session, 0, 0).await.unwrap();
    let sealed = ev.key.expect("a resync releases the current key");
    let opened = key
        .open_meeting_key(&sealed, meeting, host.participant)
        .unwrap();
    EpochKey::new(meeting.clone(), opened.epoch, opened.as_bytes()).unwrap()
}

/// Join and send a 440 Hz tone for `secs`, paced in real time.
async fn speak(creds: Credentials, secs: f64) -> meeting::MeetingLink {
    let mut link = meeting::join(creds, Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        link.events.recv().await,
        Some(meeting::MeetingEvent::Joined)
    );
    send_tone(&link, secs).await;
    link
}

async fn send_tone(link: &meeting::MeetingLink, secs: f64) {
    let mut enc = Encoder::new().unwrap();
    let pcm = meeting_client::audio::tone(440.0, secs);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for f in pcm.chunks(960) {
        tick.tick().await;
        link.audio.send(enc.encode(f).unwrap()).await.unwrap();
    }
}

/// A SIP connector pool (`telephony` or `roomSystem`) on 127.0.0.1 that
/// serves the KMS's assignments with the certificate of pool `pool` (pod
/// `<pool>-0`), mapping dialled numbers or users to meetings. Returns its
/// SIP (UDP) port, its stop switch (what SIGTERM sets in the binary) and
/// the task serving it, which ends once it has stopped.
async fn sip_pool(
    w: &World,
    pool: &str,
    kind: ConnectorKind,
    dial_in: &[(&str, &MeetingId)],
    media_timeout: Duration,
) -> (u16, watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    use connector_node::sip::{transport, ua};
    let client = w.connector(pool);
    let agent = ua::UserAgent::new(ua::UaConfig {
        local: "127.0.0.1:0".parse().unwrap(),
        transport: ua::Transport::Udp,
        user: pool.into(),
        display_name: "Conclave".into(),
        credentials: None,
        max_calls: 4,
        invites_per_second: 10,
    });
    let (ev_tx, ev_rx) = tokio::sync::mpsc::channel(64);
    let sip = transport::spawn(
        agent,
        "127.0.0.1:0".parse().unwrap(),
        ua::Transport::Udp,
        None,
        ev_tx,
    )
    .await
    .unwrap();
    let port = sip.local.port();
    let (legs_tx, legs_rx) = tokio::sync::mpsc::channel(4);
    let tel = connector_node::telephony::start(
        sip,
        ev_rx,
        connector_node::telephony::TelephonySettings {
            media_ip: "127.0.0.1".parse().unwrap(),
            srtp: meeting_proto::config::connector::SrtpPolicy::Preferred,
            dial_in: dial_in
                .iter()
                .map(|(n, m)| (n.to_string(), (*m).clone()))
                .collect(),
            // As the service sets it: room systems go by their own names.
            name_prefix: (kind == ConnectorKind::Telephony).then(|| "Phone".into()),
            media_timeout,
        },
        std::sync::Arc::new(Metrics::new()),
        legs_tx,
    );
    let (stop_tx, stop) = watch::channel(false);
    let serving = tokio::spawn(connector_node::bridge::serve_legs(
        client,
        legs_rx,
        tel,
        Default::default(),
        stop,
    ));
    (port, stop_tx, serving)
}

/// Follows the meeting's signed roster from version `since` until a member
/// with `role` is in it.
async fn member_with_role(
    people: &KmsClient,
    meeting: &MeetingId,
    session: &kms_client::Session,
    vk: &ed25519_dalek::VerifyingKey,
    since: &mut u64,
    role: &str,
) -> api::RosterMember {
    loop {
        let ev = people.events(meeting, session, *since, 5000).await.unwrap();
        *since = ev.version;
        if let Some(r) = ev.roster
            && let Some(m) = r
                .verify(vk)
                .unwrap()
                .members
                .into_iter()
                .find(|m| m.role.to_string() == role)
        {
            return m;
        }
    }
}

/// The KMS's roster signing key, as members verify rosters with it.
async fn roster_key(people: &KmsClient) -> ed25519_dalek::VerifyingKey {
    let info = people.info().await.unwrap();
    ed25519_dalek::VerifyingKey::from_bytes(&info.signing_public_key.array().unwrap()).unwrap()
}

/// The meeting's roster now, signature checked.
async fn roster_now(
    people: &KmsClient,
    meeting: &MeetingId,
    session: &kms_client::Session,
    vk: &ed25519_dalek::VerifyingKey,
) -> api::Roster {
    people
        .events(meeting, session, 0, 0)
        .await
        .unwrap()
        .roster
        .unwrap()
        .verify(vk)
        .unwrap()
}

/// Follows the meeting's signed roster from version `since` until
/// invitation `id` shows an outcome, and returns it.
async fn invitation_outcome(
    people: &KmsClient,
    meeting: &MeetingId,
    session: &kms_client::Session,
    vk: &ed25519_dalek::VerifyingKey,
    since: &mut u64,
    id: u64,
) -> api::InvitationOutcome {
    loop {
        let ev = people.events(meeting, session, *since, 5000).await.unwrap();
        *since = ev.version;
        if let Some(r) = ev.roster
            && let Some(o) = r
                .verify(vk)
                .unwrap()
                .invitations
                .into_iter()
                .find(|i| i.id == id)
                .and_then(|i| i.outcome)
        {
            return o;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invited_recorder_records_under_a_kms_key_only_readers_decrypt() {
    require("ffprobe");
    tokio::time::timeout(Duration::from_secs(120), async {
        let w = World::start(TempDir::new("kms-rec"));
        let (_relay, hb) = start_relay(&w).await;

        // The host joins with a token and invites the recording connector.
        let people = w.client("anon", None);
        let host_key = EphemeralKey::generate();
        let meeting = MeetingId::new("board").unwrap();
        let host = join_host(&w, &people, &meeting, &host_key).await;
        let session = kms_client::Session(host.session.clone());
        let recorder = w.connector("rec");
        let inv = people
            .invite(&meeting, &session, ConnectorKind::Recording, None)
            .await
            .unwrap();
        let got = recorder.assignments(5000).await.unwrap();
        assert_eq!(got.assignments.len(), 1);
        assert_eq!(got.assignments[0].invitation, inv.invitation.id);

        let base = w._dir.0.join("recordings");
        let (stop_tx, stop_rx) = watch::channel(false);
        let assignment = got.assignments[0].clone();
        let metrics = std::sync::Arc::new(Metrics::new());
        let rec_task = tokio::spawn({
            let recorder = recorder.clone();
            let base = base.clone();
            let metrics = metrics.clone();
            async move {
                live::record_assignment(recorder, assignment, &base, stop_rx, &metrics).await
            }
        });

        // The connector is in the roster, visibly, once it has joined.
        let vk = roster_key(&people).await;
        let mut since = host.roster.verify(&vk).unwrap().version;
        let connector = loop {
            let ev = people
                .events(&meeting, &session, since, 5000)
                .await
                .unwrap();
            since = ev.version;
            if let Some(r) = ev.roster
                && let Some(m) = r
                    .verify(&vk)
                    .unwrap()
                    .members
                    .iter()
                    .find(|m| m.role.to_string() == "connector:recording")
            {
                break m.participant;
            }
        };

        // The host speaks a 440 Hz tone for 3 s through the relay (E2EE).
        let creds = Credentials {
            key: host_key_now(&people, &meeting, &host, &host_key).await,
            ..host_creds(&host, &host_key, &meeting)
        };
        let link = speak(creds, 3.0).await;

        // Key rotation: bob joins and leaves, the meeting moves to a new epoch;
        // the host switches keys and goes on speaking for 2 s. The recorder
        // follows the epoch through the KMS, or those 2 s would be missing.
        let bob_key = EphemeralKey::generate();
        let bob = people
            .join(
                &meeting,
                &api::JoinRequest {
                    token: Some(w.token("bob", "board", Role::Participant)),
                    invitation: None,
                    public_key: Hex(bob_key.public_key().to_vec()),
                    display_name: None,
                },
            )
            .await
            .unwrap();
        let left = people
            .leave(&meeting, &kms_client::Session(bob.session.clone()))
            .await
            .unwrap();
        let sealed = loop {
            let ev = people
                .events(&meeting, &session, since, 5000)
                .await
                .unwrap();
            since = ev.version;
            if let Some(k) = ev.key.filter(|k| k.epoch == left.epoch) {
                break k;
            }
        };
        let opened = host_key
            .open_meeting_key(&sealed, &meeting, host.participant)
            .unwrap();
        link.keys
            .send(EpochKey::new(meeting.clone(), opened.epoch, opened.as_bytes()).unwrap())
            .await
            .unwrap();
        send_tone(&link, 2.0).await;
        // Let the last packets arrive, then the host stops the recording by
        // removing the connector: it notices through the KMS and closes the files.
        tokio::time::sleep(Duration::from_millis(300)).await;
        people.remove(&meeting, &session, connector).await.unwrap();
        let dir = rec_task.await.unwrap().unwrap();
        drop(stop_tx);
        hb.abort();
        // The storage gauge followed the recording without scanning it.
        let text = metrics.render();
        let gauge = text
            .lines()
            .find_map(|l| l.strip_prefix("conclave_connector_recording_storage_used_bytes "))
            .unwrap_or_else(|| panic!("no storage gauge in:\n{text}"));
        assert_eq!(
            gauge.parse::<u64>().unwrap(),
            connector_node::recording::retention::used_bytes(&base),
            "{text}"
        );

        // The auditor (a configured reader) decrypts through the KMS.
        let out = w._dir.0.join("plain");
        let handle = tokio::runtime::Handle::current();
        let reader_token = w.token("auditor", "board", Role::Participant);
        let reports = tokio::task::block_in_place(|| {
            decrypt::decrypt_dir(&dir, &out, |blob| {
                handle
                    .block_on(kms::fetch_recording_key(
                        &people,
                        blob,
                        Some(reader_token.clone()),
                    ))
                    .map_err(|e| e.to_string())
            })
        })
        .unwrap();
        assert!(reports.iter().all(|r| r.complete), "{reports:?}");
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(
            manifest["participants"][0]["name"], "ADA",
            "roster names in the manifest: {manifest}"
        );
        let dur = probe_opus(&out.join(format!("participant-{}.opus", host.sender_index)));
        assert!(
            (4.6..5.4).contains(&dur),
            "recorded {dur} s of 3 s + 2 s after the key rotation"
        );

        // Anyone else is refused by the KMS.
        let mallory = w.token("mallory", "board", Role::Participant);
        let err = tokio::task::block_in_place(|| {
            decrypt::decrypt_dir(&dir, &w._dir.0.join("nope"), |blob| {
                handle
                    .block_on(kms::fetch_recording_key(
                        &people,
                        blob,
                        Some(mallory.clone()),
                    ))
                    .map_err(|e| e.to_string())
            })
        })
        .unwrap_err();
        assert!(err.to_string().contains("not_a_reader"), "{err}");

        // An uninvited connector (right certificate, used invitation) gets no key; the audit shows it.
        let e = kms::join_assignment(&recorder, &got.assignments[0])
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not_invited"), "{e}");
        let admin = w.client(
            "admin",
            Some(Identity::new(NS, Kind::Admin, "auditor").unwrap()),
        );
        let page = admin.audit(0, 1000).await.unwrap();
        assert!(
            page.entries
                .iter()
                .any(|e| e.kind == AuditKind::Denial && e.detail.starts_with("not_invited"))
        );
        assert!(
            page.entries
                .iter()
                .any(|e| e.kind == AuditKind::RecordingKey)
        );
    })
    .await
    .expect("test timed out");
}

/// A recorder that cannot write (here its storage is a file, not a
/// directory) leaves the meeting at once, so nobody believes they are being
/// recorded, and the host's roster says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorder_that_cannot_write_leaves_and_tells_the_host() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let w = World::start(TempDir::new("kms-rec-fail"));
        let (_relay, hb) = start_relay(&w).await;
        let people = w.client("anon", None);
        let host_key = EphemeralKey::generate();
        let meeting = MeetingId::new("board").unwrap();
        let host = join_host(&w, &people, &meeting, &host_key).await;
        let session = kms_client::Session(host.session.clone());
        let recorder = w.connector("rec");
        let inv = people
            .invite(&meeting, &session, ConnectorKind::Recording, None)
            .await
            .unwrap();
        let assignment = recorder
            .assignments(5000)
            .await
            .unwrap()
            .assignments
            .remove(0);
        let storage = w._dir.0.join("not-a-directory");
        std::fs::write(&storage, b"").unwrap();
        let err = live::record_assignment(
            recorder,
            assignment,
            &storage,
            watch::channel(false).1,
            &Metrics::new(),
        )
        .await
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("creating the recording files"),
            "{err:#}"
        );

        let vk = roster_key(&people).await;
        let mut since = 0;
        let outcome = invitation_outcome(
            &people,
            &meeting,
            &session,
            &vk,
            &mut since,
            inv.invitation.id,
        )
        .await;
        assert_eq!(
            (
                outcome.state,
                outcome.code.as_str(),
                outcome.message.as_str()
            ),
            (
                api::OutcomeState::Failed,
                "recording_failed",
                "the recording failed while creating the recording files"
            )
        );
        let roster = roster_now(&people, &meeting, &session, &vk).await;
        assert!(
            roster
                .members
                .iter()
                .all(|m| m.role.to_string() != "connector:recording"),
            "the recorder left: {:?}",
            roster.members
        );
        hb.abort();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invited_streamer_pushes_the_meeting_to_nginx_rtmp() {
    require("ffmpeg");
    require("ffprobe");
    require("nginx");
    tokio::time::timeout(Duration::from_secs(120), async {
        let w = World::start(TempDir::new("kms-live"));
        let (_relay, hb) = start_relay(&w).await;
        // nginx with the RTMP module records what it receives.
        let ndir = w._dir.0.join("nginx");
        std::fs::create_dir_all(ndir.join("rec")).unwrap();
        let rtmp_port = free_port();
        std::fs::write(
            ndir.join("nginx.conf"),
            format!(
                "load_module /usr/lib/nginx/modules/ngx_rtmp_module.so;\ndaemon off;\nmaster_process off;\n\
                 pid {d}/nginx.pid;\nerror_log {d}/error.log info;\nevents {{ worker_connections 64; }}\n\
                 rtmp {{ server {{ listen 127.0.0.1:{rtmp_port};\n\
                   application live {{ live on; record audio; record_path {d}/rec; record_unique off; }} }} }}\n",
                d = ndir.display()
            ),
        )
        .unwrap();
        let _nginx = Proc(
            Command::new("nginx")
                .arg("-p").arg(&ndir).arg("-e").arg(ndir.join("error.log")).arg("-c").arg(ndir.join("nginx.conf"))
                .stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap(),
        );
        let mut up = false;
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", rtmp_port)).is_ok() {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(up, "nginx did not listen");

        let people = w.client("anon", None);
        let host_key = EphemeralKey::generate();
        let meeting = MeetingId::new("townhall").unwrap();
        let host = people
            .join(&meeting, &api::JoinRequest {
                token: Some(w.token("ada", "townhall", Role::Host)),
                invitation: None,
                public_key: Hex(host_key.public_key().to_vec()),
                display_name: None,
            })
            .await
            .unwrap();
        let session = kms_client::Session(host.session.clone());
        // The host picks where the stream goes (a path of the pool's allowed ingest).
        let target = format!("rtmp://127.0.0.1:{rtmp_port}/live/host-chosen");
        people.invite(&meeting, &session, ConnectorKind::LiveStreaming, Some(&target)).await.unwrap();
        let streamer = w.connector("live");
        let a = streamer.assignments(5000).await.unwrap().assignments.remove(0);
        assert_eq!(a.kind, ConnectorKind::LiveStreaming);
        assert_eq!(a.target.as_deref(), Some(target.as_str()), "the assignment carries the host's target");
        let settings = meeting_proto::config::connector::StreamingSettings {
            allowed_targets: vec![format!("rtmp://127.0.0.1:{rtmp_port}/live")],
            credentials_file: None,
            ffmpeg: "ffmpeg".into(),
            tls_ca_file: None,
        };
        let metrics = std::sync::Arc::new(Metrics::new());
        // A target outside the pool's allow-list (a valid stream URL, so the
        // KMS takes the invitation) is refused before anything starts, and
        // the host is told so in the roster, without the target.
        let off_list = people
            .invite(&meeting, &session, ConnectorKind::LiveStreaming, Some("rtmp://203.0.113.9/live/SK-OFFLIST"))
            .await
            .unwrap();
        let elsewhere = streamer.assignments(0).await.unwrap().assignments.into_iter()
            .find(|x| x.invitation == off_list.invitation.id)
            .expect("the off-list invitation is assigned");
        let refused = connector_node::streaming::stream_assignment(
            streamer.clone(), elsewhere, &settings, &format!("rtmp://127.0.0.1:{rtmp_port}/live/default"),
            watch::channel(false).1, metrics.clone(),
        )
        .await
        .unwrap_err();
        assert!(refused.to_string().contains("not in this pool's allow-list"), "{refused}");
        let vk = roster_key(&people).await;
        let mut since = host.roster.verify(&vk).unwrap().version;
        let outcome = invitation_outcome(&people, &meeting, &session, &vk, &mut since, off_list.invitation.id).await;
        assert_eq!((outcome.state, outcome.code.as_str()), (api::OutcomeState::Failed, "target_not_allowed"), "{outcome}");
        assert!(!outcome.message.contains("203.0.113.9") && !outcome.message.contains("SK-OFFLIST"), "{outcome}");
        let open: Vec<u64> = streamer.assignments(0).await.unwrap().assignments.iter().map(|x| x.invitation).collect();
        assert_eq!(open, vec![a.invitation], "the refused invitation is no longer offered");

        let (stop_tx, stop_rx) = watch::channel(false);
        // The pool's default (its first allowed target + meeting) applies only without a host target.
        let default = format!("rtmp://127.0.0.1:{rtmp_port}/live/townhall");
        let task = tokio::spawn({
            let (streamer, settings, metrics) = (streamer.clone(), settings.clone(), metrics.clone());
            async move {
                connector_node::streaming::stream_assignment(streamer, a, &settings, &default, stop_rx, metrics).await
            }
        });
        // Wait until the streamer is in the roster, then speak for 4 s.
        loop {
            let ev = people.events(&meeting, &session, since, 5000).await.unwrap();
            since = ev.version;
            if let Some(r) = ev.roster
                && r.verify(&vk).unwrap().members.iter().any(|m| m.role.to_string() == "connector:liveStreaming")
            {
                break;
            }
        }
        let creds = Credentials {
            key: host_key_now(&people, &meeting, &host, &host_key).await,
            ..host_creds(&host, &host_key, &meeting)
        };
        let _link = speak(creds, 4.0).await;
        stop_tx.send(true).unwrap();
        let status = task.await.unwrap().unwrap();
        assert_eq!(status.restarts, 0, "{status:?}");
        // A stream that ran and stopped ends its invitation as "ended".
        let ended = invitation_outcome(&people, &meeting, &session, &vk, &mut since, open[0]).await;
        assert_eq!((ended.state, ended.code.as_str()), (api::OutcomeState::Ended, "stopped"), "{ended}");
        hb.abort();

        assert!(!ndir.join("rec/townhall.flv").exists(), "nothing went to the pool's default target");
        let flv = ndir.join("rec/host-chosen.flv");
        let o = Command::new("ffprobe")
            .args(["-v", "error", "-show_entries", "format=duration:stream=codec_type", "-of", "json"])
            .arg(&flv)
            .output()
            .unwrap();
        assert!(o.status.success(), "ffprobe: {}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["streams"][0]["codec_type"], "audio");
        let secs: f64 = v["format"]["duration"].as_str().unwrap().parse().unwrap();
        assert!(secs >= 3.5, "streamed {secs} s, expected at least the 4 s spoken");
        // The stream carries the host's tone.
        let wav = w._dir.0.join("stream.wav");
        assert!(Command::new("ffmpeg").args(["-v", "error", "-i"]).arg(&flv)
            .args(["-ar", "48000", "-ac", "1", "-c:a", "pcm_s16le"]).arg(&wav).status().unwrap().success());
        let (_, pcm) = common::read_wav(&wav);
        let best = pcm.chunks(48000).map(|c| connector_node::media::tone::tone_ratio(c, 440.0, 48000)).fold(0f32, f32::max);
        assert!(best > 0.7, "no 440 Hz in the stream (ratio {best:.2})");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invited_phone_bridges_a_baresip_caller_into_the_meeting() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    tokio::time::timeout(Duration::from_secs(60), async {
        let w = World::start(TempDir::new("kms-phone"));
        let (_relay, hb) = start_relay(&w).await;
        let people = w.client("anon", None);
        let host_key = EphemeralKey::generate();
        let meeting = MeetingId::new("standup").unwrap();
        let host = join_host(&w, &people, &meeting, &host_key).await;
        let session = kms_client::Session(host.session.clone());
        // The telephony connector: SIP on 127.0.0.1, +15550100 -> standup;
        // short media timeout, so a killed phone leaves the meeting quickly.
        let (sip_port, _stop, _) = sip_pool(
            &w,
            "phones",
            ConnectorKind::Telephony,
            &[("+15550100", &meeting)],
            Duration::from_secs(2),
        )
        .await;

        // The host invites a phone; the host's own link listens and speaks.
        people
            .invite(&meeting, &session, ConnectorKind::Telephony, None)
            .await
            .unwrap();
        let mut link = meeting::join(
            host_creds(&host, &host_key, &meeting),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(
            link.events.recv().await,
            Some(meeting::MeetingEvent::Joined)
        );

        let (wav, phone_dir) = sip_peer_files(&w, "phone.wav");
        let mut phone = common::Baresip::start_as(
            &phone_dir,
            &wav,
            common::BaresipOpts {
                transport: "udp",
                mediaenc: None,
                tls: None,
                dial: Some(format!("sip:+15550100@127.0.0.1:{sip_port}")),
                codecs: None,
                max_calls: None,
            },
            "127.0.0.1",
            "+15551234567",
            None,
        );

        // The phone shows up in the roster as a telephony connector named
        // by the caller's last digits.
        let vk = roster_key(&people).await;
        let mut since = host.roster.verify(&vk).unwrap().version;
        let member = member_with_role(
            &people,
            &meeting,
            &session,
            &vk,
            &mut since,
            "connector:telephony",
        )
        .await;
        let key = host_key_now(&people, &meeting, &host, &host_key).await;
        link.keys.send(key).await.unwrap();
        assert_eq!(member.name, "Phone …4567");
        let phone_sender = member.sender_index;

        // 4 s: the host says 440 Hz and hears the phone's 1000 Hz.
        let mut enc = Encoder::new().unwrap();
        let mut dec = meeting_client::audio::Decoder::new().unwrap();
        let pcm = meeting_client::audio::tone(440.0, 4.0);
        let mut heard = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for f in pcm.chunks(960) {
            tick.tick().await;
            link.audio.send(enc.encode(f).unwrap()).await.unwrap();
            while let Ok(ev) = link.events.try_recv() {
                if let meeting::MeetingEvent::Audio { sender, packet, .. } = ev
                    && sender == phone_sender
                {
                    heard.extend(dec.decode(&packet).unwrap());
                }
            }
        }
        let best = heard
            .chunks(48000)
            .map(|c| connector_node::media::tone::tone_ratio(c, 1000.0, 48000))
            .fold(0f32, f32::max);
        assert!(
            best > 0.7,
            "the meeting does not hear the phone (ratio {best:.2}, {} samples)",
            heard.len()
        );

        // kill -9 of the phone: no BYE. The dead leg is detected by its
        // silence, hung up, and leaves the meeting's roster.
        phone.stop();
        loop {
            let ev = people
                .events(&meeting, &session, since, 5000)
                .await
                .unwrap();
            since = ev.version;
            if let Some(r) = ev.roster
                && !r
                    .verify(&vk)
                    .unwrap()
                    .members
                    .iter()
                    .any(|m| m.role.to_string() == "connector:telephony")
            {
                break;
            }
        }
        link.leave();
        // What the phone recorded before it died holds the host's 440 Hz.
        let files = phone.heard();
        assert!(
            !files.is_empty(),
            "baresip recorded nothing:\n{}",
            phone.log()
        );
        let (_, got) = common::read_wav(&files[0]);
        let best = got
            .chunks(8000)
            .map(|c| connector_node::media::tone::tone_ratio(c, 440.0, 8000))
            .fold(0f32, f32::max);
        assert!(
            best > 0.7,
            "the phone does not hear the meeting (ratio {best:.2})"
        );
        hb.abort();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_invites_a_phone_by_sip_uri_and_the_connector_dials_out() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    tokio::time::timeout(Duration::from_secs(60), async {
        let w = World::start(TempDir::new("kms-dialout"));
        let (_relay, hb) = start_relay(&w).await;
        let people = w.client("anon", None);
        let host_key = EphemeralKey::generate();
        let meeting = MeetingId::new("callout").unwrap();
        let host = join_host(&w, &people, &meeting, &host_key).await;
        let session = kms_client::Session(host.session.clone());
        let (_, stop, serving) = sip_pool(
            &w,
            "phones",
            ConnectorKind::Telephony,
            &[],
            Duration::from_secs(5),
        )
        .await;

        // The callee: baresip answering automatically, saying 1000 Hz.
        let (wav, phone_dir) = sip_peer_files(&w, "phone.wav");
        let mut phone = common::Baresip::start(
            &phone_dir,
            &wav,
            common::BaresipOpts {
                transport: "udp",
                mediaenc: None,
                tls: None,
                dial: None,
                codecs: None,
                max_calls: Some(1),
            },
        );

        // The host chooses whom to call; the connector dials and joins on answer.
        let target = format!("sip:phone@127.0.0.1:{}", phone.port);
        people
            .invite(&meeting, &session, ConnectorKind::Telephony, Some(&target))
            .await
            .unwrap();
        let mut link = meeting::join(
            host_creds(&host, &host_key, &meeting),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(
            link.events.recv().await,
            Some(meeting::MeetingEvent::Joined)
        );
        let vk = roster_key(&people).await;
        let mut since = host.roster.verify(&vk).unwrap().version;
        let member = member_with_role(
            &people,
            &meeting,
            &session,
            &vk,
            &mut since,
            "connector:telephony",
        )
        .await;
        let key = host_key_now(&people, &meeting, &host, &host_key).await;
        link.keys.send(key).await.unwrap();
        assert_eq!(member.name, "Phone phone", "the callee's SIP user");
        let phone_sender = member.sender_index;

        // 4 s: the host says 440 Hz and hears the callee's 1000 Hz.
        let mut enc = Encoder::new().unwrap();
        let mut dec = meeting_client::audio::Decoder::new().unwrap();
        let mut heard = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for f in meeting_client::audio::tone(440.0, 4.0).chunks(960) {
            tick.tick().await;
            link.audio.send(enc.encode(f).unwrap()).await.unwrap();
            while let Ok(ev) = link.events.try_recv() {
                if let meeting::MeetingEvent::Audio { sender, packet, .. } = ev
                    && sender == phone_sender
                {
                    heard.extend(dec.decode(&packet).unwrap());
                }
            }
        }
        let best = heard
            .chunks(48000)
            .map(|c| connector_node::media::tone::tone_ratio(c, 1000.0, 48000))
            .fold(0f32, f32::max);
        assert!(
            best > 0.7,
            "the meeting does not hear the callee ({best:.2})"
        );
        // The callee is on this call (one call at most): a second dial-out
        // gets 486 Busy Here, and the host sees it in the roster.
        let second = people
            .invite(&meeting, &session, ConnectorKind::Telephony, Some(&target))
            .await
            .unwrap();
        let busy = invitation_outcome(
            &people,
            &meeting,
            &session,
            &vk,
            &mut since,
            second.invitation.id,
        )
        .await;
        assert_eq!(
            (busy.state, busy.code.as_str(), busy.status),
            (api::OutcomeState::Failed, "busy", Some(486)),
            "{busy}"
        );
        assert!(
            !busy.message.contains("127.0.0.1") && !busy.message.contains("sip:"),
            "{busy}"
        );
        // Not offered again, so nobody calls twice.
        let phones = w.client(
            "phones-check",
            Some(
                Identity::new(NS, Kind::Connector, "phones")
                    .unwrap()
                    .with_pod("phones-1")
                    .unwrap(),
            ),
        );
        assert!(phones.assignments(0).await.unwrap().assignments.is_empty());
        let audit = w
            .client(
                "auditor",
                Some(Identity::new(NS, Kind::Admin, "auditor").unwrap()),
            )
            .audit(0, 1000)
            .await
            .unwrap();
        let entry = audit
            .entries
            .iter()
            .find(|e| e.kind == AuditKind::Invitation && e.detail.contains(" failed: busy"))
            .expect("the outcome is audited");
        assert!(
            entry
                .actor
                .starts_with(&format!("conclave://{NS}/connector/phones"))
                && !entry.detail.contains(&target),
            "{entry:?}"
        );
        // The pool stops (its pod is deleted) while the dial-out is on the
        // call: by the time it has stopped, the call is hung up and the
        // host sees that it ended.
        stop.send(true).unwrap();
        serving.await.unwrap();
        let roster = roster_now(&people, &meeting, &session, &vk).await;
        let first = roster
            .invitations
            .iter()
            .find(|i| i.id != second.invitation.id)
            .and_then(|i| i.outcome.clone());
        assert_eq!(
            first.as_ref().map(|o| (o.state, o.code.as_str())),
            Some((api::OutcomeState::Ended, "call_ended")),
            "{:?}",
            roster.invitations
        );
        link.leave();
        phone.stop();
        let files = phone.heard();
        assert!(
            !files.is_empty(),
            "baresip recorded nothing:\n{}",
            phone.log()
        );
        let (_, got) = common::read_wav(&files[0]);
        let best = got
            .chunks(8000)
            .map(|c| connector_node::media::tone::tone_ratio(c, 440.0, 8000))
            .fold(0f32, f32::max);
        assert!(
            best > 0.7,
            "the callee does not hear the meeting ({best:.2})"
        );
        hb.abort();
    })
    .await
    .expect("test timed out");
}

/// The room-system profile: the same SIP stack as telephony, in a pool of
/// type roomSystem. A room system (baresip with a SIP display name) dials
/// the meeting's SIP user; it joins as `connector:roomSystem` under its own
/// display name, and the meeting hears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_system_joins_under_its_sip_display_name() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    tokio::time::timeout(Duration::from_secs(60), async {
        let w = World::start(TempDir::new("kms-room"));
        let (_relay, hb) = start_relay(&w).await;
        let people = w.client("anon", None);
        let host_key = EphemeralKey::generate();
        let meeting = MeetingId::new("huddle").unwrap();
        let host = join_host(&w, &people, &meeting, &host_key).await;
        let session = kms_client::Session(host.session.clone());
        let (sip_port, stop, _) = sip_pool(
            &w,
            "rooms",
            ConnectorKind::RoomSystem,
            &[("huddle", &meeting)],
            Duration::from_secs(5),
        )
        .await;
        people
            .invite(&meeting, &session, ConnectorKind::RoomSystem, None)
            .await
            .unwrap();
        let mut link = meeting::join(
            host_creds(&host, &host_key, &meeting),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(
            link.events.recv().await,
            Some(meeting::MeetingEvent::Joined)
        );
        let (wav, room_dir) = sip_peer_files(&w, "room.wav");
        let mut room_system = common::Baresip::start_as(
            &room_dir,
            &wav,
            common::BaresipOpts {
                transport: "udp",
                mediaenc: None,
                tls: None,
                dial: Some(format!("sip:huddle@127.0.0.1:{sip_port}")),
                codecs: None,
                max_calls: None,
            },
            "127.0.0.1",
            "room-4a",
            Some("Boardroom East"),
        );
        let vk = roster_key(&people).await;
        let mut since = host.roster.verify(&vk).unwrap().version;
        let room = member_with_role(
            &people,
            &meeting,
            &session,
            &vk,
            &mut since,
            "connector:roomSystem",
        )
        .await;
        let key = host_key_now(&people, &meeting, &host, &host_key).await;
        link.keys.send(key).await.unwrap();
        assert_eq!(room.name, "Boardroom East");
        // 3 s of the room's 1000 Hz reach the host.
        let mut dec = meeting_client::audio::Decoder::new().unwrap();
        let mut heard = Vec::new();
        let until = tokio::time::Instant::now() + Duration::from_secs(3);
        while let Ok(Some(ev)) = tokio::time::timeout_at(until, link.events.recv()).await {
            if let meeting::MeetingEvent::Audio { sender, packet, .. } = ev
                && sender == room.sender_index
            {
                heard.extend(dec.decode(&packet).unwrap());
            }
        }
        let best = heard
            .chunks(48000)
            .map(|c| connector_node::media::tone::tone_ratio(c, 1000.0, 48000))
            .fold(0f32, f32::max);
        assert!(
            best > 0.7,
            "the meeting does not hear the room system (ratio {best:.2}, {} samples)",
            heard.len()
        );
        // The pool stops (its pod is deleted): the call is hung up with a
        // BYE, and the room leaves the roster with the call's outcome.
        stop.send(true).unwrap();
        let outcome = invitation_outcome(&people, &meeting, &session, &vk, &mut since, 1).await;
        assert_eq!(
            (outcome.state, outcome.code.as_str()),
            (api::OutcomeState::Ended, "call_ended"),
            "{outcome}"
        );
        let roster = roster_now(&people, &meeting, &session, &vk).await;
        assert!(
            roster
                .members
                .iter()
                .all(|m| m.participant != room.participant),
            "the room left: {:?}",
            roster.members
        );
        assert!(
            room_system.wait_for_log("terminated", Duration::from_secs(10)),
            "the room system got no BYE:\n{}",
            room_system.log()
        );
        link.leave();
        hb.abort();
    })
    .await
    .expect("test timed out");
}

/// kill -9 of a recording pool process (`connector-node run`) while the host
/// is speaking: what it wrote stays valid and decrypts through the KMS for a
/// reader, the tracks reported partial, the manifest complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorder_process_killed_mid_meeting_leaves_a_decryptable_partial_recording() {
    require("ffprobe");
    tokio::time::timeout(Duration::from_secs(120), async {
        let w = World::start(TempDir::new("kms-rec-kill"));
        let (_relay, hb) = start_relay(&w).await;
        let files = w
            .pki
            .client(
                "rec-proc",
                &Identity::new(NS, Kind::Connector, "rec")
                    .unwrap()
                    .with_pod("rec-1")
                    .unwrap(),
            )
            .unwrap();
        let base = w._dir.0.join("recordings");
        let cfg = w._dir.0.join("recorder.json");
        std::fs::write(
            &cfg,
            serde_json::json!({
                "type": "recording", "pool": "rec",
                "kms": {"url": w.url, "caFile": files.ca, "certFile": files.cert, "keyFile": files.key},
                "metricsListen": format!("127.0.0.1:{}", free_port()),
                "recording": {"dir": base}
            })
            .to_string(),
        )
        .unwrap();
        let mut recorder = Proc(
            Command::new(bin("connector-node"))
                .arg("run")
                .arg("--config")
                .arg(&cfg)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );

        let people = w.client("anon", None);
        let host_key = EphemeralKey::generate();
        let meeting = MeetingId::new("standup").unwrap();
        let host = join_host(&w, &people, &meeting, &host_key).await;
        people
            .invite(
                &meeting,
                &kms_client::Session(host.session.clone()),
                ConnectorKind::Recording,
                None,
            )
            .await
            .unwrap();
        // The host speaks once the recorder is in, in the epoch its join started.
        let vk = roster_key(&people).await;
        let mut since = host.roster.verify(&vk).unwrap().version;
        let session = kms_client::Session(host.session.clone());
        member_with_role(&people, &meeting, &session, &vk, &mut since, "connector:recording").await;
        let creds = Credentials {
            key: host_key_now(&people, &meeting, &host, &host_key).await,
            ..host_creds(&host, &host_key, &meeting)
        };
        let speaking = tokio::spawn(speak(creds, 20.0));

        // Kill once the host's track holds sealed audio (bounded wait), the
        // meeting still going.
        let track = format!("participant-{}.opus.enc", host.sender_index);
        let mut dir = None;
        for _ in 0..300 {
            dir = std::fs::read_dir(&base).ok().and_then(|mut d| {
                d.find_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.join(&track).metadata().is_ok_and(|m| m.len() > 6000))
            });
            if dir.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let dir = dir.expect("the recorder wrote the host's audio");
        recorder.0.kill().unwrap();
        recorder.0.wait().unwrap();
        speaking.abort();
        hb.abort();

        let out = w._dir.0.join("plain");
        let handle = tokio::runtime::Handle::current();
        let reader_token = w.token("auditor", "standup", Role::Participant);
        let reports = tokio::task::block_in_place(|| {
            decrypt::decrypt_dir(&dir, &out, |blob| {
                handle
                    .block_on(kms::fetch_recording_key(
                        &people,
                        blob,
                        Some(reader_token.clone()),
                    ))
                    .map_err(|e| e.to_string())
            })
        })
        .unwrap();
        let complete = |f: &str| {
            reports
                .iter()
                .find(|r| r.name == f)
                .unwrap_or_else(|| panic!("{f} missing: {reports:?}"))
                .complete
        };
        let participant = format!("participant-{}.opus", host.sender_index);
        assert!(!complete(&participant), "killed track must be partial: {reports:?}");
        assert!(!complete("mixed.opus"), "{reports:?}");
        assert!(complete("manifest.json"), "the manifest is replaced atomically");
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest["participants"][0]["name"], "ADA", "{manifest}");
        assert!(manifest.get("endedAtMs").is_none(), "{manifest}");
        let dur = probe_opus(&out.join(&participant));
        assert!((0.5..20.0).contains(&dur), "partial track of {dur} s");
        assert!(probe_opus(&out.join("mixed.opus")) >= 0.5);
    })
    .await
    .expect("test timed out");
}

/// The host at the terminal: `conclave-client join --invite
/// liveStreaming=<off-list target>` hears back that the pool refused it,
/// as a log line and in its JSON report, without the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_cli_is_told_that_its_stream_target_was_refused() {
    tokio::time::timeout(Duration::from_secs(90), async {
        let w = World::start(TempDir::new("kms-cli-outcome"));
        let (_relay, hb) = start_relay(&w).await;
        let streamer = w.connector("live");
        // The pool's connector serves the first assignment it gets.
        let pool = tokio::spawn(async move {
            let settings = meeting_proto::config::connector::StreamingSettings {
                allowed_targets: vec!["rtmp://127.0.0.1:1/live".into()],
                credentials_file: None,
                ffmpeg: "ffmpeg".into(),
                tls_ca_file: None,
            };
            let a = loop {
                let r = streamer.assignments(25_000).await.unwrap();
                if let Some(a) = r.assignments.into_iter().next() {
                    break a;
                }
            };
            connector_node::streaming::stream_assignment(
                streamer,
                a,
                &settings,
                "rtmp://127.0.0.1:1/live/default",
                watch::channel(false).1,
                std::sync::Arc::new(Metrics::new()),
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
        });
        let out = tokio::process::Command::new(bin("conclave-client"))
            .args(["join", "--kms", &w.url, "--kms-ca"])
            .arg(w.pki.ca_path())
            .args(["--token", &w.token("ada", "showcase", Role::Host)])
            .args(["--meeting", "showcase", "--tone", "440", "--duration", "4"])
            .args(["--invite", "liveStreaming=rtmp://203.0.113.9/live/SK-CLI"])
            .output()
            .await
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{stderr}");
        let refused = pool.await.unwrap().unwrap_err();
        assert!(refused.contains("allow-list"), "{refused}");
        assert!(
            stderr.contains(
                "invitation 1 (liveStreaming): failed: target_not_allowed: \
                 the stream target is not in this pool's allowedTargets"
            ),
            "{stderr}"
        );
        let line = stdout
            .lines()
            .find(|l| l.starts_with("{\"report\""))
            .unwrap_or_else(|| panic!("no report line: {stdout}"));
        let report: serde_json::Value = serde_json::from_str(line).unwrap();
        let invited = &report["report"]["invited"][0];
        assert_eq!(invited["invitation"], 1);
        assert_eq!(invited["outcome"]["state"], "failed");
        assert_eq!(invited["outcome"]["code"], "target_not_allowed");
        assert!(
            !stdout.contains("SK-CLI") && !stderr.contains("SK-CLI"),
            "the target stays out of what the host prints"
        );
        hb.abort();
    })
    .await
    .expect("test timed out");
}

/// An rtmps target whose certificate does not verify against the pool's CA
/// (here: the KMS's own TLS port, signed by another CA) is not retried
/// forever: the connector gives it up at the first verification failure,
/// leaves the meeting, and the host's roster says `tls_verify_failed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rtmps_target_failing_verification_is_given_up_and_reported() {
    require("ffmpeg");
    tokio::time::timeout(Duration::from_secs(90), async {
        let w = World::start(TempDir::new("kms-tls-outcome"));
        let (_relay, hb) = start_relay(&w).await;
        let other = DevPki::create(w._dir.0.join("other-pki"), NS).unwrap();
        let people = w.client("anon", None);
        let host_key = EphemeralKey::generate();
        let meeting = MeetingId::new("tlsfail").unwrap();
        let host = join_host(&w, &people, &meeting, &host_key).await;
        let session = kms_client::Session(host.session.clone());
        let port = w.url.rsplit(':').next().unwrap().to_string();
        let target = format!("rtmps://127.0.0.1:{port}/live");
        let inv = people
            .invite(
                &meeting,
                &session,
                ConnectorKind::LiveStreaming,
                Some(&format!("{target}/SK-TLS")),
            )
            .await
            .unwrap();
        let streamer = w.connector("live");
        let a = streamer
            .assignments(5000)
            .await
            .unwrap()
            .assignments
            .remove(0);
        let settings = meeting_proto::config::connector::StreamingSettings {
            allowed_targets: vec![target.clone()],
            credentials_file: None,
            ffmpeg: "ffmpeg".into(),
            tls_ca_file: Some(other.ca_path()),
        };
        let metrics = std::sync::Arc::new(Metrics::new());
        // Returns by itself: nobody stops it.
        let status = connector_node::streaming::stream_assignment(
            streamer.clone(),
            a,
            &settings,
            &target,
            watch::channel(false).1,
            metrics.clone(),
        )
        .await
        .unwrap();
        assert!(status.tls_verify_failed, "{status:?}");
        assert_eq!(
            status.restarts, 0,
            "given up at the first failure: {status:?}"
        );
        let vk = roster_key(&people).await;
        let mut since = host.roster.verify(&vk).unwrap().version;
        let outcome = invitation_outcome(
            &people,
            &meeting,
            &session,
            &vk,
            &mut since,
            inv.invitation.id,
        )
        .await;
        assert_eq!(
            (outcome.state, outcome.code.as_str()),
            (api::OutcomeState::Failed, "tls_verify_failed"),
            "{outcome}"
        );
        assert!(!outcome.message.contains("SK-TLS"), "{outcome}");
        // The streamer left the meeting: only the host is in the roster.
        let roster = roster_now(&people, &meeting, &session, &vk).await;
        assert_eq!(roster.members.len(), 1, "{:?}", roster.members);
        assert!(
            metrics
                .render()
                .contains("conclave_connector_stream_tls_verify_failures_total 1"),
            "{}",
            metrics.render()
        );
        hb.abort();
    })
    .await
    .expect("test timed out");
}
