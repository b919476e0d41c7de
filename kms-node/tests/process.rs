//! Process-level tests: the real kms-node binary on 127.0.0.1, real TLS
//! (DevPki), real join tokens, driven through kms-client.

mod support;

use conclave_pki::{DevPki, Identity, Kind};
use ed25519_dalek::VerifyingKey;
use meeting_proto::ids::MeetingId;
use meeting_proto::key_release::EphemeralKey;
use meeting_proto::kms_api::{self as api, AuditKind, ConnectorKind, Hex};
use meeting_proto::ticket::Ticket;
use meeting_proto::token::{DevIssuerKey, Role};
use std::ffi::OsStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;

const LIMIT: Duration = Duration::from_secs(120);

/// `promtool check metrics` (Debian package prometheus) finds no problem.
/// promtool reads the classic text format, where a counter's HELP/TYPE name
/// carries `_total`; the server speaks OpenMetrics, so convert like
/// observability/check_metrics.py does.
fn promtool_accepts(openmetrics: &str) {
    use std::io::Write;
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut text = String::new();
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        text.push_str(renamed.as_deref().unwrap_or(line));
        text.push('\n');
    }
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) must be installed");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of one sample line (`name{labels}`) in a metrics text.
fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

async fn vk(kms: &Kms) -> VerifyingKey {
    let info = kms.anonymous().info().await.unwrap();
    VerifyingKey::from_bytes(&info.signing_public_key.array().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_join_open_keys_and_leave_rotates() {
    tokio::time::timeout(LIMIT, async {
        let kms = Kms::start("join", "");
        let relay = kms.register_relay().await;
        assert_eq!(relay.relay, "zone-a/relay-0");
        let vk = vk(&kms).await;
        assert_eq!(relay.ticket_public_key.0, vk.to_bytes());
        let c = kms.anonymous();
        let ada = join_with_token(&c, "m1", kms.token("ada", "m1", Role::Host))
            .await
            .unwrap();
        let bob = join_with_token(&c, "m1", kms.token("bob", "m1", Role::Participant))
            .await
            .unwrap();
        let cat = join_with_token(&c, "m1", kms.token("cat", "m1", Role::Participant))
            .await
            .unwrap();
        // Each join starts a new epoch (a newcomer cannot open what was
        // sent before it joined): ada 1, bob 2, cat 3. The earlier members
        // get epoch 3 through their events; everyone opens the same key
        // with their own ephemeral key.
        let epochs = [&ada, &bob, &cat].map(|m| m.joined.key.epoch);
        assert_eq!(epochs, [1, 2, 3]);
        let k3 = cat.open(&cat.joined.key);
        for m in [&ada, &bob] {
            assert_ne!(m.open(&m.joined.key), k3);
            let since = m.joined.roster.verify(&vk).unwrap().version;
            let ev = c
                .events(&m.meeting, &m.session(), since, 5000)
                .await
                .unwrap();
            let sealed = ev.key.expect("the newest epoch's key");
            assert_eq!(sealed.epoch, 3);
            assert_eq!(m.open(&sealed), k3);
        }
        // Someone else's sealed key does not open with my key.
        assert!(
            ada.key
                .open_meeting_key(&bob.joined.key, &bob.meeting, bob.joined.participant)
                .is_err()
        );
        // The signed roster lists all three; the ticket is for our relay.
        let roster = cat.joined.roster.verify(&vk).unwrap();
        assert_eq!(roster.members.len(), 3);
        let t = Ticket::verify(&cat.joined.relay.ticket.0, &vk, &relay.relay, now_s()).unwrap();
        assert_eq!(
            (t.participant, t.sender_index),
            (cat.joined.participant, cat.joined.sender_index)
        );
        assert_eq!(cat.joined.relay.address, "127.0.0.1:40000");

        // bob leaves: a new epoch for ada and cat, nothing for bob.
        let since = roster.version;
        let left = c.leave(&bob.meeting, &bob.session()).await.unwrap();
        assert_eq!(left.epoch, 4);
        let ev = c
            .events(&ada.meeting, &ada.session(), since, 5000)
            .await
            .unwrap();
        let sealed = ev.key.expect("new epoch key for ada");
        assert_eq!(sealed.epoch, 4);
        let k4 = ada.open(&sealed);
        assert_ne!(k4, k3);
        let ev_cat = c
            .events(&cat.meeting, &cat.session(), since, 5000)
            .await
            .unwrap();
        assert_eq!(cat.open(&ev_cat.key.unwrap()), k4);
        let roster = ev.roster.unwrap().verify(&vk).unwrap();
        assert!(
            roster
                .members
                .iter()
                .all(|m| m.participant != bob.joined.participant)
        );
        // bob's own poll after his leave: gone, not a denial; a session
        // the meeting never had is refused and audited.
        let err = c
            .events(&bob.meeting, &bob.session(), 0, 0)
            .await
            .unwrap_err();
        assert_eq!((err.status(), err.code()), (Some(410), Some("gone")));
        let stranger = kms_client::Session("ab".repeat(32));
        let err = c.events(&bob.meeting, &stranger, 0, 0).await.unwrap_err();
        assert_eq!((err.status(), err.code()), (Some(403), Some("not_member")));
        // Every release and the refusal are in a chain that verifies.
        let admin = kms.admin();
        assert!(
            audit_has(&admin, |e| e.kind == AuditKind::KeyRelease
                && e.epoch == Some(4)
                && e.participant == Some(cat.joined.participant))
            .await
        );
        // Releases went only to members of each epoch: bob never got the
        // epoch his leave started, ada got the one cat's join started.
        assert!(
            !audit_has(&admin, |e| e.kind == AuditKind::KeyRelease
                && e.epoch == Some(4)
                && e.participant == Some(bob.joined.participant))
            .await
        );
        assert!(
            audit_has(&admin, |e| e.kind == AuditKind::EpochChange
                && e.epoch == Some(3)
                && e.detail == "member joined: new epoch for the newcomer")
            .await
        );
        assert!(
            audit_has(&admin, |e| e.kind == AuditKind::Denial
                && e.detail.starts_with("not_member"))
            .await
        );
        assert!(
            !audit_has(&admin, |e| e.kind == AuditKind::Denial
                && e.participant == Some(bob.joined.participant))
            .await,
            "bob's poll after his leave is not a denial"
        );
        assert!(admin.verify_audit().await.unwrap().ok);
        // A long poll with nothing new returns the same version, no key.
        let idle = c
            .events(
                &ada.meeting,
                &ada.session(),
                ev.version.max(ev_cat.version),
                200,
            )
            .await
            .unwrap();
        assert!(idle.key.is_none() && idle.roster.is_none());
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_matrix_refuses_and_audits() {
    tokio::time::timeout(LIMIT, async {
        let kms = Kms::start("access", "");
        kms.register_relay().await;
        let c = kms.anonymous();
        let admin = kms.admin();
        let host = join_with_token(&c, "m1", kms.token("ada", "m1", Role::Host))
            .await
            .unwrap();
        let bob = join_with_token(&c, "m1", kms.token("bob", "m1", Role::Participant))
            .await
            .unwrap();

        let mut expired = kms.claims("eve", "m1", Role::Participant);
        expired.exp = now_s() - 3600;
        let mut wrong_aud = kms.claims("eve", "m1", Role::Participant);
        wrong_aud.aud = vec!["someone-else".into()];
        let foreign = DevIssuerKey::from_seed("k1", &[9; 32]).unwrap();
        let replay = kms.token("dan", "m1", Role::Participant);
        join_with_token(&c, "m1", replay.clone()).await.unwrap();
        let cases: Vec<(&str, Option<String>, u16, &str)> = vec![
            ("no token", None, 401, "no_credentials"),
            (
                "expired",
                Some(kms.issuer.mint(&expired)),
                401,
                "token_expired",
            ),
            (
                "wrong audience",
                Some(kms.issuer.mint(&wrong_aud)),
                401,
                "wrong_audience",
            ),
            (
                "wrong issuer key",
                Some(foreign.mint(&kms.claims("eve", "m1", Role::Host))),
                401,
                "bad_signature",
            ),
            (
                "another meeting",
                Some(kms.token("eve", "m2", Role::Host)),
                403,
                "wrong_meeting",
            ),
            ("replayed join", Some(replay), 401, "token_replayed"),
        ];
        for (what, token, status, code) in cases {
            let err = c
                .join(
                    &MeetingId::new("m1").unwrap(),
                    &api::JoinRequest {
                        token,
                        invitation: None,
                        public_key: Hex(vec![1; 32]),
                        display_name: None,
                    },
                )
                .await
                .unwrap_err();
            assert_eq!(
                (err.status(), err.code()),
                (Some(status), Some(code)),
                "{what}: {err}"
            );
            assert!(
                audit_has(&admin, |e| e.kind == AuditKind::Denial
                    && e.detail.starts_with(code))
                .await,
                "{what}: no audit entry"
            );
        }
        // Participant acting as host.
        let err = c
            .invite(&bob.meeting, &bob.session(), ConnectorKind::Recording, None)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("not_host"));
        let err = c
            .remove(&bob.meeting, &bob.session(), host.joined.participant)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("not_host"));
        // Uninvited connector (right certificate, no invitation).
        let join_as_connector = |client: kms_client::KmsClient| async move {
            client
                .join(
                    &MeetingId::new("m1").unwrap(),
                    &api::JoinRequest {
                        token: None,
                        invitation: Some(1),
                        public_key: Hex(vec![2; 32]),
                        display_name: None,
                    },
                )
                .await
                .unwrap_err()
        };
        let err = join_as_connector(kms.recorder()).await;
        assert_eq!((err.status(), err.code()), (Some(403), Some("not_invited")));
        assert!(
            audit_has(&admin, |e| e.kind == AuditKind::Denial
                && e.detail.starts_with("not_invited"))
            .await
        );
        // A relay certificate used as a connector.
        let err = join_as_connector(kms.relay()).await;
        assert_eq!(err.code(), Some("not_a_connector"));
        let err = kms.relay().assignments(0).await.unwrap_err();
        assert_eq!(err.code(), Some("not_a_connector"));
        // A participant (no certificate) or a relay reading the audit log.
        assert_eq!(
            kms.relay().audit(0, 10).await.unwrap_err().code(),
            Some("not_admin")
        );
        assert_eq!(
            c.verify_audit().await.unwrap_err().code(),
            Some("not_admin")
        );
        // A certificate from another CA never gets past TLS, but the refusal
        // is audited and counted.
        let foreign_before = metric_value(
            &c.metrics_text().await.unwrap(),
            "conclave_kms_denials_total{reason=\"foreign_ca\"}",
        );
        assert_eq!(foreign_before, Some(0.0), "pre-created at 0");
        let other = DevPki::create(kms.dir.join("other-pki"), NS).unwrap();
        let files = other
            .client("admin", &Identity::new(NS, Kind::Admin, "auditor").unwrap())
            .unwrap();
        let mut tls_files = files.clone();
        tls_files.ca = kms.pki.ca_path();
        let rogue = kms_client::KmsClient::new(
            &kms.url(),
            conclave_pki::tls::client_config(&tls_files).unwrap(),
        )
        .unwrap();
        let err = rogue.audit(0, 10).await.unwrap_err();
        assert!(matches!(err, kms_client::Error::Transport(_)), "{err}");
        // The server records the refusal right after the handshake fails;
        // poll (bounded) until it is there.
        let mut audited = false;
        for _ in 0..100 {
            if audit_has(&admin, |e| {
                e.kind == AuditKind::Denial
                    && e.detail.starts_with("foreign_ca:")
                    && e.actor == "tls:127.0.0.1"
            })
            .await
            {
                audited = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(audited, "foreign-CA handshake refusal was not audited");
        let foreign = metric_value(
            &c.metrics_text().await.unwrap(),
            "conclave_kms_denials_total{reason=\"foreign_ca\"}",
        );
        assert_eq!(foreign, Some(1.0));
        // None of the refusals changed the roster: still ada, bob, dan.
        let roster = admin
            .export_roster(&MeetingId::new("m1").unwrap())
            .await
            .unwrap();
        let roster = roster.verify(&vk(&kms).await).unwrap();
        assert_eq!(roster.members.len(), 3);
        assert!(roster.invitations.is_empty());
        assert!(admin.verify_audit().await.unwrap().ok);
    })
    .await
    .unwrap();
}

/// SIGTERM (a pod deletion) stops the KMS cleanly and at once: a long
/// poll in flight is answered with what there is (nothing new) rather than
/// held or cut, so its client polls again at once; the KMS exits 0 rather
/// than by the signal (as PID 1 in a container it would otherwise wait for
/// the SIGKILL), and what it acknowledged is there after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_kms_cleanly() {
    tokio::time::timeout(LIMIT, async {
        let (mut kms, c, ada) = Kms::with_host("sigterm", "").await;
        let poll = tokio::spawn({
            let (c, meeting, session) = (c.clone(), ada.meeting.clone(), ada.session());
            async move {
                let now = c.events(&meeting, &session, 0, 0).await?.version;
                c.events(&meeting, &session, now, 25_000)
                    .await
                    .map(|answer| (now, answer))
            }
        });
        // The poll reaches the server well within this (a request over
        // loopback, on a busy machine too).
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let status = tokio::task::block_in_place(|| kms.terminate());
        assert_eq!(status.code(), Some(0), "{status:?}\n{}", kms.log());
        let log = kms.log();
        assert!(log.contains("shutdown requested"), "{log}");
        assert!(log.contains("kms stopped"), "{log}");
        let (since, answer) = poll.await.unwrap().expect("the long poll was answered");
        assert_eq!(answer.version, since, "nothing new");
        assert!(answer.roster.is_none() && answer.key.is_none());
        kms.restart();
        c.events(&ada.meeting, &ada.session(), 0, 0)
            .await
            .expect("ada's join survived the shutdown");
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invited_connector_joins_and_records() {
    tokio::time::timeout(LIMIT, async {
        let (kms, c, host) = Kms::with_host("connector", "").await;
        let rec = kms.recorder();
        assert!(rec.assignments(0).await.unwrap().assignments.is_empty());
        // Long-poll for an assignment while the host invites.
        let waiting = tokio::spawn({
            let rec = rec.clone();
            async move { rec.assignments(10_000).await }
        });
        let inv = c
            .invite(
                &host.meeting,
                &host.session(),
                ConnectorKind::Recording,
                None,
            )
            .await
            .unwrap();
        let vk = vk(&kms).await;
        assert_eq!(
            inv.roster.verify(&vk).unwrap().invitations,
            vec![inv.invitation.clone()]
        );
        let got = waiting.await.unwrap().unwrap();
        assert_eq!(got.assignments[0].invitation, inv.invitation.id);
        // The host sees the invitation in events at once.
        let ev = c
            .events(
                &host.meeting,
                &host.session(),
                host.joined.roster.verify(&vk).unwrap().version,
                1000,
            )
            .await
            .unwrap();
        assert_eq!(ev.roster.unwrap().verify(&vk).unwrap().invitations.len(), 1);
        // The connector joins with the invitation: a new epoch, whose key
        // the host gets through its events and both open alike.
        let since = ev.version;
        let key = EphemeralKey::generate();
        let joined = rec
            .join(
                &host.meeting,
                &api::JoinRequest {
                    token: None,
                    invitation: Some(inv.invitation.id),
                    public_key: Hex(key.public_key().to_vec()),
                    display_name: None,
                },
            )
            .await
            .unwrap();
        let opened = key
            .open_meeting_key(&joined.key, &host.meeting, joined.participant)
            .unwrap();
        assert_eq!(opened.epoch, host.joined.key.epoch + 1);
        assert_ne!(*opened.as_bytes(), host.open(&host.joined.key));
        let ev = c
            .events(&host.meeting, &host.session(), since, 5000)
            .await
            .unwrap();
        let sealed = ev.key.expect("the connector's epoch for the host");
        assert_eq!(sealed.epoch, opened.epoch);
        assert_eq!(*opened.as_bytes(), host.open(&sealed));
        let roster = joined.roster.verify(&vk).unwrap();
        assert!(
            roster
                .members
                .iter()
                .any(|m| m.role.to_string() == "connector:recording")
        );
        // Recording data key: created by the recorder, readable by the configured reader.
        let dk_key = EphemeralKey::generate();
        let created = rec
            .create_recording_key(&api::CreateRecordingKeyRequest {
                meeting: host.meeting.clone(),
                public_key: Hex(dk_key.public_key().to_vec()),
            })
            .await
            .unwrap();
        let dk = dk_key.open_data_key(&created.key).unwrap();
        let reader_key = EphemeralKey::generate();
        let again = c
            .recording_key(
                &created.key.recording,
                &api::RecordingKeyRequest {
                    public_key: Hex(reader_key.public_key().to_vec()),
                    token: Some(kms.token("auditor", "m1", Role::Participant)),
                },
            )
            .await
            .unwrap();
        assert_eq!(
            reader_key.open_data_key(&again.key).unwrap().as_bytes(),
            dk.as_bytes()
        );
        let refused = c
            .recording_key(
                &created.key.recording,
                &api::RecordingKeyRequest {
                    public_key: Hex(reader_key.public_key().to_vec()),
                    token: Some(kms.token("mallory", "m1", Role::Participant)),
                },
            )
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Some("not_a_reader"));
        // The invitation is used up.
        let err = rec
            .join(
                &host.meeting,
                &api::JoinRequest {
                    token: None,
                    invitation: Some(inv.invitation.id),
                    public_key: Hex(key.public_key().to_vec()),
                    display_name: None,
                },
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("not_invited"));
        // KEK rotation keeps old recordings readable.
        assert_eq!(kms.admin().rotate_kek().await.unwrap().version, 2);
        let again = c
            .recording_key(
                &created.key.recording,
                &api::RecordingKeyRequest {
                    public_key: Hex(reader_key.public_key().to_vec()),
                    token: Some(kms.token("auditor", "m1", Role::Participant)),
                },
            )
            .await
            .unwrap();
        assert_eq!(
            reader_key.open_data_key(&again.key).unwrap().as_bytes(),
            dk.as_bytes()
        );
    })
    .await
    .unwrap();
}

/// kill -9 while 1,000 joins run concurrently, three times: every acknowledged
/// join survives (its session still works) and its key release is in an
/// audit chain that verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invitation_target_reaches_the_connector_and_never_the_audit_or_log() {
    tokio::time::timeout(LIMIT, async {
        let (kms, c, host) = Kms::with_host("target", "").await;
        let admin = kms.admin();
        let audit_len = |admin: kms_client::KmsClient| async move {
            admin.audit(0, 1000).await.unwrap().entries.len()
        };
        let before = audit_len(admin.clone()).await;
        let vk = vk(&kms).await;
        let version = |roster: &api::SignedRoster| roster.verify(&vk).unwrap().version;
        let start_version = version(&host.joined.roster);
        // Each bad target: 400 with a clear code, one denial entry, nothing else.
        let long = format!("rtmps://live.example.com/app/{}", "k".repeat(3000));
        let bad = [
            (
                ConnectorKind::Recording,
                "rtmps://live.example.com/app/SK-SECRET",
                "target_not_allowed",
            ),
            (
                ConnectorKind::LiveStreaming,
                "https://live.example.com/app/SK-SECRET",
                "bad_target",
            ),
            (
                ConnectorKind::LiveStreaming,
                "rtmp://user:SK-SECRET@live.example.com/app",
                "bad_target",
            ),
            (
                ConnectorKind::LiveStreaming,
                "rtmp://live.example.com/app/SK-SECRET\n",
                "bad_target",
            ),
            (ConnectorKind::Telephony, "call SK-SECRET", "bad_target"),
            (ConnectorKind::LiveStreaming, long.as_str(), "bad_target"),
        ];
        for (i, (kind, target, code)) in bad.into_iter().enumerate() {
            let err = c
                .invite(&host.meeting, &host.session(), kind, Some(target))
                .await
                .unwrap_err();
            assert_eq!(
                (err.status(), err.code()),
                (Some(400), Some(code)),
                "{target}"
            );
            assert!(!err.to_string().contains("SK-SECRET"), "{err}");
            let page = admin.audit(0, 1000).await.unwrap();
            assert_eq!(page.entries.len(), before + i + 1, "{target}");
            let last = page.entries.last().unwrap();
            assert_eq!(last.kind, AuditKind::Denial);
            assert!(last.detail.starts_with(code), "{}", last.detail);
        }
        // The refusals changed nothing: no invitation, same roster version.
        let ev = c
            .events(&host.meeting, &host.session(), 0, 0)
            .await
            .unwrap();
        let roster = ev.roster.unwrap();
        assert_eq!(version(&roster), start_version);
        assert!(roster.verify(&vk).unwrap().invitations.is_empty());
        assert!(
            kms.streamer()
                .assignments(0)
                .await
                .unwrap()
                .assignments
                .is_empty()
        );

        // A good target reaches the connector's assignment, and only it.
        let stream = "rtmps://live.example.com:443/app/SK-SECRET-0123";
        let inv = c
            .invite(
                &host.meeting,
                &host.session(),
                ConnectorKind::LiveStreaming,
                Some(stream),
            )
            .await
            .unwrap();
        assert!(!inv.roster.roster_json.contains("SK-SECRET"));
        let got = kms.streamer().assignments(0).await.unwrap().assignments;
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].invitation, got[0].kind, got[0].target.as_deref()),
            (
                inv.invitation.id,
                ConnectorKind::LiveStreaming,
                Some(stream)
            )
        );
        // An old-style invitation (no target) still works; its assignment has none.
        let plain = c
            .invite(
                &host.meeting,
                &host.session(),
                ConnectorKind::Recording,
                None,
            )
            .await
            .unwrap();
        let rec = kms.recorder().assignments(0).await.unwrap().assignments;
        assert_eq!(
            (rec[0].invitation, rec[0].target.clone()),
            (plain.invitation.id, None)
        );
        assert!(
            audit_has(&admin, |e| e.kind == AuditKind::Invitation
                && e.detail
                    == "invited connector:liveStreaming to rtmps://live.example.com")
            .await
        );
        // Nowhere in the audit chain or the server log is the stream key.
        let page = admin.audit(0, 1000).await.unwrap();
        let audit = serde_json::to_string(&page.entries).unwrap();
        assert!(
            !audit.contains("SK-SECRET") && !audit.contains("/app/"),
            "{audit}"
        );
        let log = kms.log();
        assert!(log.contains("kms listening"), "log is captured");
        assert!(
            !log.contains("SK-SECRET") && !log.contains("/app/"),
            "{log}"
        );
        assert!(admin.verify_audit().await.unwrap().ok);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_joins_survive_kill_9() {
    tokio::time::timeout(Duration::from_secs(300), async {
        let mut kms = Kms::start("kill9", "");
        let acked: Arc<Mutex<Vec<(MeetingId, api::JoinResponse)>>> = Arc::default();
        for round in 0..3u32 {
            kms.register_relay().await;
            let c = kms.anonymous();
            let before = acked.lock().unwrap().len();
            let (enough_tx, mut enough_rx) = tokio::sync::mpsc::channel::<()>(1);
            let mut tasks = Vec::new();
            for i in 0..1000u32 {
                let (c, acked, enough_tx) = (c.clone(), acked.clone(), enough_tx.clone());
                let meeting = format!("r{round}-m{}", i % 50);
                let token = kms.token(&format!("u{round}-{i}"), &meeting, Role::Participant);
                tasks.push(tokio::spawn(async move {
                    if let Ok(m) = join_with_token(&c, &meeting, token).await {
                        let mut a = acked.lock().unwrap();
                        a.push((m.meeting, m.joined));
                        if a.len() >= before + 300 {
                            let _ = enough_tx.try_send(());
                        }
                    }
                }));
            }
            drop(enough_tx);
            // Kill while joins are still in flight.
            let _ = enough_rx.recv().await;
            kms.kill9();
            for t in tasks {
                t.await.unwrap();
            }
            kms.restart();
            let acked_now = acked.lock().unwrap().clone();
            assert!(
                acked_now.len() >= before + 300,
                "round {round}: too few joins acknowledged"
            );
            assert!(
                acked_now.len() < before + 1000,
                "round {round}: the kill should interrupt joins in flight"
            );
            let admin = kms.admin();
            let mut releases = std::collections::HashSet::new();
            let mut from = 0;
            loop {
                let page = admin.audit(from, 1000).await.unwrap();
                for e in &page.entries {
                    if e.kind == AuditKind::KeyRelease {
                        releases.insert((e.meeting.clone().unwrap(), e.participant.unwrap()));
                    }
                }
                match page.entries.last() {
                    Some(l) => from = l.seq + 1,
                    None => break,
                }
            }
            let c = kms.anonymous();
            for (meeting, joined) in &acked_now {
                assert!(
                    releases.contains(&(meeting.clone(), joined.participant)),
                    "round {round}: acknowledged release of {meeting}/{} missing from audit",
                    joined.participant
                );
            }
            // Sessions of acknowledged joins still work after the crash.
            for (meeting, joined) in acked_now.iter().rev().take(20) {
                c.events(meeting, &kms_client::Session(joined.session.clone()), 0, 0)
                    .await
                    .unwrap();
            }
            // Each meeting's state came back as its last acknowledged join left it: a
            // newcomer gets a participant id, a sender index and an epoch after all of
            // theirs (a reused sender index would reuse SFrame nonces).
            let mut last: std::collections::BTreeMap<String, (u64, u16, u64)> = Default::default();
            for (meeting, joined) in &acked_now {
                let l = last.entry(meeting.to_string()).or_default();
                l.0 = l.0.max(joined.participant.0);
                l.1 = l.1.max(joined.sender_index);
                l.2 = l.2.max(joined.key.epoch);
            }
            kms.register_relay().await;
            for (meeting, (participant, sender, epoch)) in last
                .iter()
                .filter(|(m, _)| m.starts_with(&format!("r{round}-")))
            {
                let token = kms.token(&format!("after-{meeting}"), meeting, Role::Participant);
                let newcomer = join_with_token(&c, meeting, token).await.unwrap().joined;
                assert!(
                    newcomer.participant.0 > *participant,
                    "{meeting}: {newcomer:?}"
                );
                assert!(newcomer.sender_index > *sender, "{meeting}: {newcomer:?}");
                assert!(newcomer.key.epoch > *epoch, "{meeting}: {newcomer:?}");
            }
            let v = admin.verify_audit().await.unwrap();
            assert!(v.ok, "round {round}: {v:?}");
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_tampering_is_detected_offline_and_online() {
    tokio::time::timeout(LIMIT, async {
        let mut kms = Kms::start("tamper", "");
        kms.register_relay().await;
        let c = kms.anonymous();
        for who in ["ada", "bob", "cat"] {
            join_with_token(&c, "m1", kms.token(who, "m1", Role::Participant))
                .await
                .unwrap();
        }
        let page = kms.admin().audit(0, 100).await.unwrap();
        assert!(page.entries.len() >= 4);
        let data = kms.data_dir();
        let verify = |data: &std::path::Path| {
            run_cli(&[
                OsStr::new("audit-verify"),
                OsStr::new("--data-dir"),
                data.as_os_str(),
            ])
        };
        let store = kms.stop_and_open_store();
        drop(store);
        let ok = verify(&data);
        assert!(
            ok.status.success(),
            "{}",
            String::from_utf8_lossy(&ok.stdout)
        );
        // Backup, then flip one field of entry 2 in the live store.
        let backup = kms.dir.join("backup.redb");
        let out = run_cli(&[
            OsStr::new("backup"),
            OsStr::new("--data-dir"),
            data.as_os_str(),
            OsStr::new("--out"),
            backup.as_os_str(),
        ]);
        assert!(out.status.success());
        let store = kms_node::store::Store::open(&data).unwrap();
        let mut e = page.entries[2].clone();
        e.detail.push('!');
        store
            .overwrite_audit_raw(2, &serde_json::to_vec(&e).unwrap())
            .unwrap();
        drop(store);
        let bad = verify(&data);
        assert_eq!(bad.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&bad.stdout).contains("entry 2"));
        kms.restart();
        let online = kms.admin().verify_audit().await.unwrap();
        assert!(!online.ok);
        let text = c.metrics_text().await.unwrap();
        assert_eq!(
            metric_value(&text, "conclave_kms_audit_verifications_total"),
            Some(1.0)
        );
        assert_eq!(
            metric_value(&text, "conclave_kms_audit_verify_failures_total"),
            Some(1.0)
        );
        // Restore fails closed without the right root key.
        kms.kill9();
        let cfg = std::fs::read_to_string(kms.config_path()).unwrap();
        let restore_dir = kms.dir.join("restored");
        let wrong = cfg
            .replace(
                &format!("{}/data", kms.dir.display()),
                &restore_dir.display().to_string(),
            )
            .replace(
                &format!("{}/root.key", kms.dir.display()),
                &kms.dir.join("other.key").display().to_string(),
            );
        std::fs::write(kms.dir.join("other.key"), "11".repeat(32)).unwrap();
        std::fs::write(kms.dir.join("restore.yaml"), &wrong).unwrap();
        let restore = |cfg: &std::path::Path| {
            run_cli(&[
                OsStr::new("restore"),
                OsStr::new("--config"),
                cfg.as_os_str(),
                OsStr::new("--from"),
                backup.as_os_str(),
            ])
        };
        let refused = restore(&kms.dir.join("restore.yaml"));
        assert!(!refused.status.success());
        assert!(!restore_dir.join(kms_node::store::FILE_NAME).exists());
        let right = cfg.replace(
            &format!("{}/data", kms.dir.display()),
            &restore_dir.display().to_string(),
        );
        std::fs::write(kms.dir.join("restore.yaml"), &right).unwrap();
        let restored = restore(&kms.dir.join("restore.yaml"));
        assert!(
            restored.status.success(),
            "{}",
            String::from_utf8_lossy(&restored.stderr)
        );
        assert!(verify(&restore_dir).status.success());
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_and_bad_input_get_clear_errors_and_metrics_count_them() {
    tokio::time::timeout(LIMIT, async {
        let (kms, c, ada) = Kms::with_host("limits",
            "limits: {perIdentityRps: 1, perIdentityBurst: 3, perMeetingRps: 1000, perMeetingBurst: 1000}\n").await;
        let mut limited = None;
        for _ in 0..6 {
            // Polling at the current version: nothing new, so no key release.
            if let Err(e) = c.events(&ada.meeting, &ada.session(), 1, 0).await {
                limited = Some(e);
                break;
            }
        }
        match limited {
            Some(kms_client::Error::Api { status: 429, retry_after: Some(s), .. }) => assert!(s >= 1),
            other => panic!("expected 429 with Retry-After, got {other:?}"),
        }
        // Oversized body: refused before parsing.
        let err = c
            .join(&MeetingId::new("m1").unwrap(), &api::JoinRequest {
                token: Some("x".repeat(64 * 1024)),
                invitation: None,
                public_key: Hex(vec![1; 32]),
                display_name: None,
            })
            .await
            .unwrap_err();
        assert_eq!(err.status(), Some(413));
        // Malformed key and meeting id: 400 with a reason.
        let err = c
            .join(&MeetingId::new("m1").unwrap(), &api::JoinRequest {
                token: Some(kms.token("bob", "m1", Role::Participant)),
                invitation: None,
                public_key: Hex(vec![1; 5]),
                display_name: None,
            })
            .await
            .unwrap_err();
        assert_eq!(
            (err.status(), err.code()),
            (Some(400), Some("bad_public_key")),
            "{err}"
        );
        // The server is still up, and its metrics saw all of it.
        let text = c.metrics_text().await.unwrap();
        for needle in [
            "conclave_kms_requests_total{route=\"/v1/meetings/{meeting}/events\",status=\"429\"}",
            "conclave_kms_key_releases_total 1",
            "conclave_kms_audit_commit_seconds_bucket",
            "conclave_kms_store_size_bytes",
            "conclave_kms_active_meetings 1",
            "conclave_kms_ready 1",
            "conclave_kms_request_duration_seconds_count{route=\"/v1/meetings/{meeting}/join\"}",
            "conclave_kms_denials_total{reason=\"not_member\"}",
            "\nprocess_cpu_seconds_total ",
            "\nprocess_resident_memory_bytes ",
        ] {
            assert!(text.contains(needle), "{needle} missing from metrics:\n{text}");
        }
        // 429s never reach the audit log but are counted as denials.
        assert!(
            metric_value(&text, "conclave_kms_denials_total{reason=\"rate_limited\"}")
                .is_some_and(|v| v >= 1.0),
            "{text}"
        );
        promtool_accepts(&text);
        // A flood of bad credentials from one address: the first few are
        // refused and audited, then refused with 429 before reaching the core.
        let mut codes = Vec::new();
        for _ in 0..5 {
            let err = c
                .join(&MeetingId::new("m1").unwrap(), &api::JoinRequest {
                    token: Some("e30.e30.AAAA".into()),
                    invitation: None,
                    public_key: Hex(vec![1; 32]),
                    display_name: None,
                })
                .await
                .unwrap_err();
            codes.push(err.code().unwrap_or_default().to_owned());
        }
        assert_eq!(codes[0], "bad_token");
        assert_eq!(codes.last().unwrap(), "too_many_failures", "{codes:?}");
    })
    .await
    .unwrap();
}

/// Unmounts the small tmpfs when the test ends, however it ends.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(path: &std::path::Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(path).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "this test needs root to mount a small tmpfs at {}",
            path.display()
        );
        SmallDisk(path.to_owned())
    }
    fn grow(&self, size: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "remount failed");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A full disk returns errors to callers and corrupts nothing: after the
/// disk grows and the KMS restarts, every acknowledged join is there and
/// the audit chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_returns_errors_and_corrupts_nothing() {
    tokio::time::timeout(Duration::from_secs(240), async {
        let dir = std::env::temp_dir().join(format!("kms-full-disk-{}", std::process::id()));
        let disk = SmallDisk::mount(&dir, "3m");
        let mut kms = Kms::start("fulldisk", "");
        // Point the store at the small disk (the config's dataDir is replaced).
        let cfg = std::fs::read_to_string(kms.config_path()).unwrap();
        let cfg = cfg.replace(
            &format!("dataDir: {}/data", kms.dir.display()),
            &format!("dataDir: {}", dir.display()),
        );
        std::fs::write(kms.config_path(), cfg).unwrap();
        kms.restart();
        kms.register_relay().await;
        let c = kms.anonymous();
        let mut acked = Vec::new();
        let mut refused = None;
        for i in 0..20_000u32 {
            let meeting = format!("m{}", i % 50);
            match join_with_token(
                &c,
                &meeting,
                kms.token(&format!("u{i}"), &meeting, Role::Participant),
            )
            .await
            {
                Ok(m) => acked.push((m.meeting, m.joined.participant)),
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        let refused = refused.expect("the 3 MiB disk filled up");
        assert_eq!(refused.status(), Some(503), "{refused}");
        assert!(acked.len() > 10);
        // Later requests are refused too (no half-applied state), and the
        // process is still alive to say so.
        let err = join_with_token(&c, "m0", kms.token("late", "m0", Role::Participant))
            .await
            .unwrap_err();
        assert_eq!(err.status(), Some(503));
        // Not ready any more, and the metrics say so (alert ConclaveKmsNotReady).
        let text = c.metrics_text().await.unwrap();
        assert_eq!(
            metric_value(&text, "conclave_kms_ready"),
            Some(0.0),
            "{text}"
        );
        disk.grow("64m");
        kms.restart();
        let text = c.metrics_text().await.unwrap();
        assert_eq!(metric_value(&text, "conclave_kms_ready"), Some(1.0));
        let admin = kms.admin();
        let v = admin.verify_audit().await.unwrap();
        assert!(v.ok, "{v:?}");
        let mut releases = std::collections::HashSet::new();
        let mut from = 0;
        loop {
            let page = admin.audit(from, 1000).await.unwrap();
            for e in &page.entries {
                if e.kind == AuditKind::KeyRelease {
                    releases.insert((e.meeting.clone().unwrap(), e.participant.unwrap()));
                }
            }
            match page.entries.last() {
                Some(l) => from = l.seq + 1,
                None => break,
            }
        }
        for a in &acked {
            assert!(releases.contains(a), "acknowledged release {a:?} lost");
        }
        kms.kill9();
        drop(disk);
    })
    .await
    .unwrap();
}

/// Meetings go to the least-loaded live relay; a relay that stops
/// heartbeating gets no new meetings and its meetings move on the next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_follows_heartbeats() {
    tokio::time::timeout(LIMIT, async {
        let kms = Kms::start(
            "placement",
            "relays: {heartbeatIntervalMs: 100, heartbeatTimeoutMs: 1500}\n",
        );
        let relay = |pod: &str| {
            kms.as_identity(
                pod,
                Identity::new(NS, Kind::Relay, "zone-a")
                    .unwrap()
                    .with_pod(pod)
                    .unwrap(),
            )
        };
        let (r0, r1) = (relay("relay-0"), relay("relay-1"));
        for (r, port) in [(&r0, 40000), (&r1, 40001)] {
            r.register_relay(&api::RelayRegisterRequest {
                zone: "zone-a".into(),
                address: format!("127.0.0.1:{port}"),
                capacity: 10,
                instance: None,
            })
            .await
            .unwrap();
        }
        // A relay may only register in the zone its certificate names.
        let err = r0
            .register_relay(&api::RelayRegisterRequest {
                zone: "zone-b".into(),
                address: "127.0.0.1:1".into(),
                capacity: 10,
                instance: None,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("wrong_zone"));
        let c = kms.anonymous();
        let a = join_with_token(&c, "m1", kms.token("ada", "m1", Role::Host))
            .await
            .unwrap();
        let b = join_with_token(&c, "m2", kms.token("bob", "m2", Role::Host))
            .await
            .unwrap();
        assert_eq!(a.joined.relay.relay, "zone-a/relay-0");
        assert_eq!(
            b.joined.relay.relay, "zone-a/relay-1",
            "least loaded gets the next meeting"
        );
        // relay-0 goes silent; relay-1 keeps heartbeating past relay-0's timeout.
        let hb = api::RelayHeartbeatRequest {
            load: 1,
            ready: true,
        };
        let until = tokio::time::Instant::now() + Duration::from_millis(2000);
        while tokio::time::Instant::now() < until {
            r1.heartbeat(&hb).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let moved = c.events(&a.meeting, &a.session(), 0, 0).await.unwrap();
        let relay = moved.relay.expect("a new relay assignment");
        assert_eq!(relay.relay, "zone-a/relay-1");
        assert_eq!(relay.address, "127.0.0.1:40001");
        let d = join_with_token(&c, "m3", kms.token("dan", "m3", Role::Host))
            .await
            .unwrap();
        assert_eq!(d.joined.relay.relay, "zone-a/relay-1");
        assert_eq!(r1.heartbeat(&hb).await.unwrap().meetings, 3);
    })
    .await
    .unwrap();
}

/// A relay process that restarts under the same id (a StatefulSet pod, a
/// SIGKILLed container) registers again long before its heartbeat times out,
/// with no bindings: its meetings are placed again at once and the members'
/// long polls wake with a new ticket. The same process registering again
/// after a KMS restart moves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_restarted_under_its_id_gets_its_meetings_placed_again() {
    tokio::time::timeout(LIMIT, async {
        // A timeout far beyond the test: liveness never moves anything here.
        let mut kms = Kms::start(
            "relay-restart",
            "relays: {heartbeatIntervalMs: 100, heartbeatTimeoutMs: 600000}\n",
        );
        let register = |kms: &Kms, instance: &str| {
            let r = kms.relay();
            let req = api::RelayRegisterRequest {
                zone: "zone-a".into(),
                address: "127.0.0.1:40000".into(),
                capacity: 100,
                instance: Some(instance.into()),
            };
            async move { r.register_relay(&req).await }
        };
        register(&kms, "first").await.unwrap();
        let c = kms.anonymous();
        let ada = join_with_token(&c, "m1", kms.token("ada", "m1", Role::Host))
            .await
            .unwrap();
        let vk = vk(&kms).await;
        let joined_version = ada.joined.roster.verify(&vk).unwrap().version;
        let quiet = |kms: &Kms| {
            let c = kms.anonymous();
            let (meeting, session) = (ada.meeting.clone(), ada.session());
            async move {
                c.events(&meeting, &session, joined_version, 0)
                    .await
                    .unwrap()
            }
        };

        // The KMS restarts and forgets its relays; the same relay process
        // registers again: the meeting stays, no new version, no ticket.
        kms.restart();
        register(&kms, "first").await.unwrap();
        let ev = quiet(&kms).await;
        assert_eq!(ev.version, joined_version);
        assert!(ev.relay.is_none() && ev.roster.is_none(), "{ev:?}");

        // A member waits for news; the relay restarts as a new process.
        let c = kms.anonymous();
        let (meeting, session) = (ada.meeting.clone(), ada.session());
        let waiting = tokio::spawn(async move {
            c.events(&meeting, &session, joined_version, api::MAX_WAIT_MS)
                .await
                .unwrap()
        });
        // Waiting (woken by the registration) or arriving after it (answered
        // at once), the poll gets the new placement; a poll that missed it
        // would return empty after MAX_WAIT_MS.
        let bad = register(&kms, "not hex!").await.unwrap_err();
        assert_eq!(bad.code(), Some("bad_instance"));
        register(&kms, "second").await.unwrap();
        let ev = waiting.await.unwrap();
        assert!(ev.version > joined_version, "{ev:?}");
        let relay = ev.relay.expect("a new placement for the restarted relay");
        assert_eq!(
            (relay.relay.as_str(), relay.address.as_str()),
            ("zone-a/relay-0", "127.0.0.1:40000")
        );
        assert!(!relay.ticket.0.is_empty());
        // Settled: the next poll from the new version has nothing more.
        let c = kms.anonymous();
        let later = c
            .events(&ada.meeting, &ada.session(), ev.version, 0)
            .await
            .unwrap();
        assert!(later.relay.is_none(), "{later:?}");
        let admin = kms.admin();
        assert!(
            audit_has(&admin, |e| e.kind == AuditKind::Relay
                && e.meeting.as_ref() == Some(&ada.meeting)
                && e.detail
                    == "relay zone-a/relay-0 restarted as instance second: \
                        meeting placed again on relay zone-a/relay-0")
            .await
        );
        assert!(admin.verify_audit().await.unwrap().ok);
    })
    .await
    .unwrap();
}

/// A new issuer key in the JWKS file is picked up without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_keys_reload_without_restart() {
    tokio::time::timeout(LIMIT, async {
        let kms = Kms::start("jwks", "");
        kms.register_relay().await;
        let c = kms.anonymous();
        let rotated = DevIssuerKey::from_seed("k2", &[8; 32]).unwrap();
        let token = |n: u32| rotated.mint(&kms.claims(&format!("new{n}"), "m1", Role::Host));
        let err = join_with_token(&c, "m1", token(0)).await.unwrap_err();
        assert_eq!(err.code(), Some("unknown_issuer"));
        std::fs::write(kms.dir.join("jwks.json"), rotated.jwks_json()).unwrap();
        // The KMS checks the file every second; give it a bounded number of tries.
        let mut joined = false;
        for n in 1..=50 {
            match join_with_token(&c, "m1", token(n)).await {
                Ok(_) => {
                    joined = true;
                    break;
                }
                Err(e) => assert_eq!(e.code(), Some("unknown_issuer")),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(joined, "rotated issuer key was never accepted");
        // The old key is gone from the file, so its tokens are refused now.
        let err = join_with_token(&c, "m1", kms.token("old", "m1", Role::Host))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("unknown_issuer"));
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_rotation_reaches_joined_members() {
    tokio::time::timeout(LIMIT, async {
        // 10 s is the shortest interval the config accepts.
        let (kms, c, ada) =
            Kms::with_host("interval", "rotation: {meetingKeyIntervalS: 10}\n").await;
        let bob = join_with_token(&c, "m1", kms.token("bob", "m1", Role::Participant))
            .await
            .unwrap();
        let vk = vk(&kms).await;
        let since = bob.joined.roster.verify(&vk).unwrap().version;
        assert_eq!((ada.joined.key.epoch, bob.joined.key.epoch), (1, 2));
        // Long-poll (bounded by LIMIT) until a newer epoch's key arrives.
        let next_key = |m: &Member, since: u64| {
            let c = c.clone();
            let (meeting, session) = (m.meeting.clone(), m.session());
            async move {
                loop {
                    let ev = c
                        .events(&meeting, &session, since, api::MAX_WAIT_MS)
                        .await
                        .unwrap();
                    if let Some(key) = ev.key {
                        return (key, ev.roster);
                    }
                }
            }
        };
        // bob's join started epoch 2: ada gets it at once.
        let (k, _) = next_key(&ada, since).await;
        assert_eq!(k.epoch, 2);
        let k2 = ada.open(&k);
        assert_eq!(bob.open(&bob.joined.key), k2);
        // Nobody joins or leaves; the KMS rotates on its own.
        let (ka, roster) = next_key(&ada, since).await;
        let (kb, _) = next_key(&bob, since).await;
        assert_eq!((ka.epoch, kb.epoch), (3, 3));
        let k3 = ada.open(&ka);
        assert_eq!(bob.open(&kb), k3);
        assert_ne!(k3, k2);
        let roster = roster
            .expect("roster with the new epoch")
            .verify(&vk)
            .unwrap();
        assert_eq!((roster.epoch, roster.members.len()), (3, 2));
        let admin = kms.admin();
        assert!(
            audit_has(&admin, |e| e.kind == AuditKind::EpochChange
                && e.epoch == Some(3)
                && e.actor == "kms"
                && e.detail == "interval rotation")
            .await
        );
        let text = c.metrics_text().await.unwrap();
        assert!(
            metric_value(&text, "conclave_kms_rotations_total{kind=\"epoch\"}")
                .is_some_and(|v| v >= 1.0),
            "{text}"
        );
        assert!(admin.verify_audit().await.unwrap().ok);
    })
    .await
    .unwrap();
}

/// A raw HTTP/1.1 POST over mTLS as `client` (what kms-client cannot send:
/// a body that is not JSON). Returns the status line and body.
async fn raw_post(kms: &Kms, client: &str, id: Identity, path: &str, body: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let files = kms.pki.client(client, &id).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(
        conclave_pki::tls::client_config(&files).unwrap(),
    ));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", kms.port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let mut s = tls.connect(name, tcp).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connectors_report_invitation_outcomes_and_only_the_invited_kind_may() {
    use api::{InvitationOutcome, OutcomeState};
    tokio::time::timeout(LIMIT, async {
        let (kms, c, host) = Kms::with_host("outcomes", "").await;
        let vk = vk(&kms).await;
        let inv = c
            .invite(
                &host.meeting,
                &host.session(),
                ConnectorKind::LiveStreaming,
                Some("rtmps://live.example.com/app/SK-SECRET"),
            )
            .await
            .unwrap();
        let since = inv.roster.verify(&vk).unwrap().version;
        let id = inv.invitation.id;
        let refused = InvitationOutcome::new(
            OutcomeState::Failed,
            "target_not_allowed",
            None,
            "the stream target is not in this pool's allowedTargets",
        );
        let report = |client: kms_client::KmsClient, outcome: InvitationOutcome| {
            let meeting = host.meeting.clone();
            async move { client.report_outcome(&meeting, id, outcome).await }
        };
        // Not a connector, the wrong kind, an oversize report: 4xx, nothing recorded.
        let err = report(kms.relay(), refused.clone()).await.unwrap_err();
        assert_eq!(
            (err.status(), err.code()),
            (Some(403), Some("not_a_connector"))
        );
        let err = report(kms.recorder(), refused.clone()).await.unwrap_err();
        assert_eq!((err.status(), err.code()), (Some(403), Some("wrong_kind")));
        let huge = InvitationOutcome {
            message: "x".repeat(4000),
            ..refused.clone()
        };
        let err = report(kms.streamer(), huge).await.unwrap_err();
        assert_eq!((err.status(), err.code()), (Some(413), Some("too_large")));
        let live = Identity::new(NS, Kind::Connector, "live")
            .unwrap()
            .with_pod("live-0")
            .unwrap();
        let garbage = raw_post(
            &kms,
            "live-raw",
            live,
            api::paths::INVITATION_OUTCOME,
            b"{\"meeting\":\"m1\",\"invitation\":\"SK-SECRET\"",
        )
        .await;
        assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
        assert!(
            garbage.contains("\"code\":\"bad_request\"") && !garbage.contains("SK-SECRET"),
            "{garbage}"
        );
        assert_eq!(
            kms.streamer()
                .assignments(0)
                .await
                .unwrap()
                .assignments
                .len(),
            1,
            "still offered"
        );

        // The streamer's report: in the host's roster at once, no longer offered.
        let got = report(kms.streamer(), refused.clone()).await.unwrap();
        assert_eq!(got.invitation.outcome.as_ref(), Some(&refused));
        let ev = c
            .events(&host.meeting, &host.session(), since, 5000)
            .await
            .unwrap();
        let signed = ev
            .roster
            .expect("the host's poll wakes with the new roster");
        assert!(!signed.roster_json.contains("SK-SECRET"));
        let roster = signed.verify(&vk).unwrap();
        assert_eq!(roster.invitations[0].outcome.as_ref(), Some(&refused));
        assert!(
            kms.streamer()
                .assignments(0)
                .await
                .unwrap()
                .assignments
                .is_empty()
        );
        let err = report(kms.streamer(), refused.clone()).await.unwrap_err();
        assert_eq!(
            (err.status(), err.code()),
            (Some(409), Some("outcome_reported"))
        );

        // Every refusal and the outcome are audited, without the target.
        let admin = kms.admin();
        let page = admin.audit(0, 1000).await.unwrap();
        for code in [
            "not_a_connector",
            "wrong_kind",
            "too_large",
            "bad_request",
            "outcome_reported",
        ] {
            assert!(
                page.entries
                    .iter()
                    .any(|e| e.kind == AuditKind::Denial && e.detail.starts_with(code)),
                "{code} is audited"
            );
        }
        assert!(page.entries.iter().any(|e| e.kind == AuditKind::Invitation
            && e.actor == format!("conclave://{NS}/connector/live/live-0")
            && e.detail
                == "connector:liveStreaming invitation 1 failed: target_not_allowed: \
                    the stream target is not in this pool's allowedTargets"));
        let audit = serde_json::to_string(&page.entries).unwrap();
        assert!(!audit.contains("SK-SECRET"), "{audit}");
        assert!(admin.verify_audit().await.unwrap().ok);
    })
    .await
    .unwrap();
}
