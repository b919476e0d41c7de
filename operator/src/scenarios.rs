//! Reconciles against the in-memory API server: what each scenario writes, and that a second
//! reconcile of an unchanged world writes nothing.

use crate::context::Capabilities;
use crate::fixtures::*;
use crate::kms::KeyManagementServer;
use crate::pool::ConnectorPool;
use crate::zone::MeetingZone;
use http::Method;
use serde_json::{Value, json};
use std::sync::Arc;

const CAPS: Capabilities = Capabilities { pdb_v1: true };

fn kms_path(name: &str) -> String {
    path("conclave.dev/v1alpha1", "keymanagementservers", name)
}
fn zone_path(name: &str) -> String {
    path("conclave.dev/v1alpha1", "meetingzones", name)
}
fn pool_path(name: &str) -> String {
    path("conclave.dev/v1alpha1", "connectorpools", name)
}

fn stored<K: serde::de::DeserializeOwned>(fake: &FakeApi, p: &str) -> K {
    serde_json::from_value(fake.get(p).unwrap_or_else(|| panic!("{p} not stored"))).unwrap()
}

fn ready(status: &Value) -> (String, String, String) {
    let c = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap()
        .clone();
    (
        c["status"].as_str().unwrap().into(),
        c["reason"].as_str().unwrap().into(),
        c["message"].as_str().unwrap().into(),
    )
}

fn non_event_writes(fake: &FakeApi) -> Vec<Call> {
    fake.writes()
        .into_iter()
        .filter(|c| !c.path.contains("/events"))
        .collect()
}

#[tokio::test]
async fn kms_creates_owned_children_and_then_makes_no_writes() {
    bounded(async {
        let (ctx, fake) = context(CAPS);
        let kms = kms("main");
        fake.put(&kms_path("main"), serde_json::to_value(&kms).unwrap());
        crate::kms::reconcile(Arc::new(kms), ctx.clone())
            .await
            .unwrap();

        for (gv, plural, name) in [
            ("apps/v1", "statefulsets", "main-kms"),
            ("v1", "services", "main-kms"),
            ("v1", "services", "main-kms-headless"),
            ("v1", "configmaps", "main-kms-config"),
            ("v1", "secrets", "main-kms-tls"),
            ("v1", "secrets", "main-kms-root-key"),
            ("v1", "serviceaccounts", "main-kms"),
            ("networking.k8s.io/v1", "networkpolicies", "main-kms"),
            ("policy/v1", "poddisruptionbudgets", "main-kms"),
        ] {
            let obj = fake
                .get(&path(gv, plural, name))
                .unwrap_or_else(|| panic!("{plural}/{name} missing"));
            let owner = &obj["metadata"]["ownerReferences"][0];
            assert_eq!(owner["uid"], "uid-main", "{plural}/{name} owner");
            assert_eq!(owner["controller"], true);
            assert_eq!(
                obj["metadata"]["labels"]["app.kubernetes.io/managed-by"],
                "conclave-operator"
            );
        }
        assert!(
            fake.get(&path("v1", "secrets", "conclave-ca")).is_some(),
            "namespace CA created"
        );
        let cm = fake
            .get(&path("v1", "configmaps", "main-kms-config"))
            .unwrap();
        let cfg = meeting_proto::config::kms::KmsConfig::from_yaml(
            cm["data"]["config.yaml"].as_str().unwrap(),
        )
        .unwrap();
        assert_eq!(
            cfg.root_key.file.to_str(),
            Some("/etc/conclave/root-key/root.key")
        );

        let status = fake.get(&kms_path("main")).unwrap()["status"].clone();
        assert_eq!(ready(&status).0, "False");
        assert_eq!(status["rootKey"], "generated (development-grade)");
        assert_eq!(status["observedGeneration"], 1);
        assert!(
            fake.calls()
                .iter()
                .any(|c| c.method == Method::POST && c.path.ends_with("/events")),
            "an event was published"
        );

        // Steady state: same world, no writes at all.
        fake.clear_calls();
        let again: KeyManagementServer = stored(&fake, &kms_path("main"));
        crate::kms::reconcile(Arc::new(again), ctx.clone())
            .await
            .unwrap();
        assert_eq!(fake.writes(), vec![], "second reconcile must not write");

        // An edited child is restored with one apply.
        let sts_path = path("apps/v1", "statefulsets", "main-kms");
        let mut sts = fake.get(&sts_path).unwrap();
        sts["spec"]["replicas"] = json!(5);
        fake.put(&sts_path, sts);
        fake.clear_calls();
        let again: KeyManagementServer = stored(&fake, &kms_path("main"));
        crate::kms::reconcile(Arc::new(again), ctx).await.unwrap();
        let writes = non_event_writes(&fake);
        assert_eq!(writes.len(), 1, "{writes:?}");
        assert_eq!(writes[0].path, sts_path);
        assert_eq!(fake.get(&sts_path).unwrap()["spec"]["replicas"], 1);
    })
    .await
}

#[tokio::test]
async fn invalid_kms_spec_is_reported_and_creates_nothing() {
    bounded(async {
        let (ctx, fake) = context(CAPS);
        let mut kms = kms("main");
        kms.spec.replicas = 3;
        fake.put(&kms_path("main"), serde_json::to_value(&kms).unwrap());
        crate::kms::reconcile(Arc::new(kms), ctx).await.unwrap();
        let writes = non_event_writes(&fake);
        assert_eq!(writes.len(), 1, "only the status: {writes:?}");
        assert!(writes[0].path.ends_with("/status"));
        let (st, reason, msg) = ready(&fake.get(&kms_path("main")).unwrap()["status"]);
        assert_eq!((st.as_str(), reason.as_str()), ("False", "InvalidSpec"));
        assert!(msg.contains("spec.replicas"), "{msg}");
        assert!(
            fake.calls().iter().any(|c| c.path.ends_with("/events")),
            "warning event"
        );
    })
    .await
}

#[tokio::test]
async fn no_pdb_where_policy_v1_is_not_served_and_status_says_so() {
    bounded(async {
        let (ctx, fake) = context(Capabilities { pdb_v1: false });
        let kms = kms("main");
        fake.put(&kms_path("main"), serde_json::to_value(&kms).unwrap());
        crate::kms::reconcile(Arc::new(kms), ctx).await.unwrap();
        assert!(
            fake.get(&path("policy/v1", "poddisruptionbudgets", "main-kms"))
                .is_none()
        );
        assert!(
            !fake
                .calls()
                .iter()
                .any(|c| c.path.contains("poddisruptionbudgets"))
        );
        let (_, _, msg) = ready(&fake.get(&kms_path("main")).unwrap()["status"]);
        assert!(msg.contains("policy/v1"), "{msg}");
    })
    .await
}

#[tokio::test]
async fn zone_with_missing_kms_reports_dependency_missing() {
    bounded(async {
        let (ctx, fake) = context(CAPS);
        let zone = zone("zone-a", "nope");
        fake.put(&zone_path("zone-a"), serde_json::to_value(&zone).unwrap());
        crate::zone::reconcile(Arc::new(zone), ctx).await.unwrap();
        let (st, reason, msg) = ready(&fake.get(&zone_path("zone-a")).unwrap()["status"]);
        assert_eq!(
            (st.as_str(), reason.as_str()),
            ("False", "DependencyMissing")
        );
        assert!(msg.contains("spec.kmsRef") && msg.contains("nope"), "{msg}");
        assert!(
            fake.get(&path("apps/v1", "statefulsets", "zone-a-relay"))
                .is_none()
        );
    })
    .await
}

fn ready_kms_with_key(fake: &FakeApi) {
    let mut kms = serde_json::to_value(kms("main")).unwrap();
    kms["status"] = json!({
        "conditions": [{"type": "Ready", "status": "True", "reason": "PodsReady", "message": "1/1", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
        "ticketPublicKey": "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29",
    });
    fake.put(&kms_path("main"), kms);
}

#[tokio::test]
async fn zone_renders_relays_from_its_kms_and_then_makes_no_writes() {
    bounded(async {
        let (ctx, fake) = context(CAPS);
        ready_kms_with_key(&fake);
        let zone = zone("zone-a", "main");
        fake.put(&zone_path("zone-a"), serde_json::to_value(&zone).unwrap());
        crate::zone::reconcile(Arc::new(zone), ctx.clone())
            .await
            .unwrap();
        let sts = fake
            .get(&path("apps/v1", "statefulsets", "zone-a-relay"))
            .unwrap();
        assert_eq!(sts["spec"]["replicas"], 2);
        let cm = fake
            .get(&path("v1", "configmaps", "zone-a-relay-config"))
            .unwrap();
        let cfg: meeting_proto::config::relay::RelayConfig =
            serde_yaml_ng::from_str(cm["data"]["zone-a-relay-1.yaml"].as_str().unwrap()).unwrap();
        cfg.validate().unwrap();
        assert_eq!(
            cfg.relay_id, "zone-a/zone-a-relay-1",
            "the KMS names relays after their certificates"
        );
        assert_eq!(
            cfg.advertise, "zone-a-relay-1.zone-a-relay.team.svc:40000",
            "no pod seen yet"
        );
        assert_eq!(
            cfg.kms.as_ref().unwrap().cert_file.to_str(),
            Some("/etc/conclave/tls/zone-a-relay-1.crt")
        );
        assert!(cm["data"]["zone-a-relay-0.yaml"].is_string());
        assert_eq!(
            cfg.ticket_public_key,
            "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29"
        );
        assert_eq!(
            cfg.kms.as_ref().unwrap().url,
            "https://main-kms.team.svc:8443"
        );
        // One client certificate per relay pod, each with its pod in the identity.
        let tls = fake
            .get(&path("v1", "secrets", "zone-a-relay-tls"))
            .unwrap();
        for pod in ["zone-a-relay-0", "zone-a-relay-1"] {
            let b64 = tls["data"][format!("{pod}.crt")].as_str().unwrap();
            let pem =
                base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).unwrap();
            let der = conclave_pki::pem::certs_from_pem(&pem, "cert")
                .unwrap()
                .remove(0);
            let id = conclave_pki::inspect(&der).unwrap().identity.unwrap();
            assert_eq!(id.to_uri(), format!("conclave://team/relay/zone-a/{pod}"));
            assert!(tls["data"][format!("{pod}.key")].is_string());
        }
        let status = fake.get(&zone_path("zone-a")).unwrap()["status"].clone();
        assert_eq!(status["kms"]["reachable"], true);
        assert_eq!(ready(&status).1, "PodsNotReady");

        fake.clear_calls();
        let again: MeetingZone = stored(&fake, &zone_path("zone-a"));
        crate::zone::reconcile(Arc::new(again), ctx).await.unwrap();
        assert_eq!(fake.writes(), vec![], "second reconcile must not write");
    })
    .await
}

#[tokio::test]
async fn kms_deletion_waits_for_referencing_zones() {
    bounded(async {
        let (ctx, fake) = context(CAPS);
        let mut kms = kms("main");
        kms.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-01-01T00:00:00Z".parse().unwrap(),
            ));
        fake.put(&kms_path("main"), serde_json::to_value(&kms).unwrap());
        fake.put(
            &zone_path("zone-a"),
            serde_json::to_value(zone("zone-a", "main")).unwrap(),
        );
        let err = crate::kms::reconcile(Arc::new(kms.clone()), ctx.clone())
            .await
            .unwrap_err();
        assert_eq!(err.metric_label(), "deletion_blocked");
        let (st, reason, msg) = ready(&fake.get(&kms_path("main")).unwrap()["status"]);
        assert_eq!((st.as_str(), reason.as_str()), ("False", "DeletionBlocked"));
        assert!(msg.contains("zone-a"), "{msg}");
        assert!(
            !fake
                .writes()
                .iter()
                .any(|c| c.method == Method::PATCH && c.path == kms_path("main")),
            "finalizer kept"
        );

        // Zone gone: the finalizer is removed.
        fake.objects.lock().unwrap().remove(&zone_path("zone-a"));
        fake.clear_calls();
        crate::kms::reconcile(Arc::new(kms), ctx).await.unwrap();
        assert!(
            fake.writes()
                .iter()
                .any(|c| c.method == Method::PATCH && c.path == kms_path("main")),
            "finalizer removed"
        );
    })
    .await
}

#[tokio::test]
async fn pool_of_a_type_the_zone_does_not_allow_is_refused() {
    bounded(async {
        let (ctx, fake) = context(CAPS);
        ready_kms_with_key(&fake);
        let mut z = zone("zone-a", "main");
        z.spec.encryption.allowed_connectors.clear();
        fake.put(&zone_path("zone-a"), serde_json::to_value(&z).unwrap());
        let p = pool("rec", "zone-a");
        fake.put(&pool_path("rec"), serde_json::to_value(&p).unwrap());
        crate::pool::reconcile(Arc::new(p), ctx).await.unwrap();
        let (st, reason, msg) = ready(&fake.get(&pool_path("rec")).unwrap()["status"]);
        assert_eq!(
            (st.as_str(), reason.as_str()),
            ("False", "ConnectorNotAllowed")
        );
        assert!(msg.contains("allowedConnectors"), "{msg}");
        assert!(
            fake.get(&path("apps/v1", "deployments", "rec-connector"))
                .is_none()
        );
    })
    .await
}

#[tokio::test]
async fn recording_pool_gets_deployment_volume_and_client_certificate() {
    bounded(async {
        let (ctx, fake) = context(CAPS);
        ready_kms_with_key(&fake);
        fake.put(
            &zone_path("zone-a"),
            serde_json::to_value(zone("zone-a", "main")).unwrap(),
        );
        let p = pool("rec", "zone-a");
        fake.put(&pool_path("rec"), serde_json::to_value(&p).unwrap());
        crate::pool::reconcile(Arc::new(p), ctx.clone())
            .await
            .unwrap();
        let dep = fake
            .get(&path("apps/v1", "deployments", "rec-connector"))
            .unwrap();
        assert_eq!(dep["spec"]["strategy"]["type"], "Recreate");
        let pvc = fake
            .get(&path("v1", "persistentvolumeclaims", "rec-recordings"))
            .unwrap();
        assert!(
            pvc["metadata"]["ownerReferences"].is_null(),
            "recordings outlive the pool"
        );
        let cm = fake
            .get(&path("v1", "configmaps", "rec-connector-config"))
            .unwrap();
        let cfg: meeting_proto::config::connector::ConnectorConfig =
            serde_yaml_ng::from_str(cm["data"]["config.yaml"].as_str().unwrap()).unwrap();
        assert_eq!(cfg.recording.unwrap().retention_days, 30);
        assert!(
            fake.get(&path("v1", "secrets", "rec-connector-tls"))
                .is_some()
        );

        fake.clear_calls();
        let again: ConnectorPool = stored(&fake, &pool_path("rec"));
        crate::pool::reconcile(Arc::new(again), ctx).await.unwrap();
        assert_eq!(fake.writes(), vec![], "second reconcile must not write");
    })
    .await
}

#[tokio::test]
async fn kms_with_a_missing_root_key_secret_names_the_reference() {
    bounded(async {
        let (ctx, fake) = context(CAPS);
        let mut kms = kms("main");
        kms.spec.root_key = Some(crate::kms::RootKeySource {
            secret_ref: crate::shared::SecretKeyRef {
                name: "absent".into(),
                key: None,
            },
        });
        fake.put(&kms_path("main"), serde_json::to_value(&kms).unwrap());
        crate::kms::reconcile(Arc::new(kms), ctx).await.unwrap();
        let (st, reason, msg) = ready(&fake.get(&kms_path("main")).unwrap()["status"]);
        assert_eq!(
            (st.as_str(), reason.as_str()),
            ("False", "DependencyMissing")
        );
        assert!(
            msg.contains("spec.rootKey.secretRef") && msg.contains("absent"),
            "{msg}"
        );
        assert!(
            fake.get(&path("apps/v1", "statefulsets", "main-kms"))
                .is_none()
        );
    })
    .await
}

#[tokio::test]
async fn per_relay_services_follow_the_replica_count() {
    bounded(async {
        let (ctx, fake) = context(CAPS);
        ready_kms_with_key(&fake);
        let mut z = zone("zone-a", "main");
        z.spec.relays.replicas = 3;
        z.spec.media.mode = crate::zone::MediaMode::Service;
        z.spec.media.service_type = crate::kms::ServiceType::NodePort;
        fake.put(&zone_path("zone-a"), serde_json::to_value(&z).unwrap());
        crate::zone::reconcile(Arc::new(z.clone()), ctx.clone()).await.unwrap();
        for i in 0..3 {
            assert!(fake.get(&path("v1", "services", &format!("zone-a-relay-{i}"))).is_some(), "relay {i}");
        }
        // Scale down: the Service of the relay that went away is deleted, the others stay.
        let mut smaller: MeetingZone = stored(&fake, &zone_path("zone-a"));
        smaller.spec.relays.replicas = 2;
        fake.put(&zone_path("zone-a"), serde_json::to_value(&smaller).unwrap());
        fake.clear_calls();
        crate::zone::reconcile(Arc::new(smaller), ctx).await.unwrap();
        assert!(fake.get(&path("v1", "services", "zone-a-relay-2")).is_none());
        assert!(fake.get(&path("v1", "services", "zone-a-relay-1")).is_some());
        assert!(
            fake.writes().iter().any(|c| c.method == Method::DELETE && c.path.ends_with("/services/zone-a-relay-2")),
            "{:?}",
            fake.writes()
        );
        let sts = fake.get(&path("apps/v1", "statefulsets", "zone-a-relay")).unwrap();
        assert_eq!(sts["spec"]["replicas"], 2);
    })
    .await
}

#[tokio::test]
async fn kms_status_reports_the_kek_version_and_writes_only_when_it_changes() {
    bounded(async {
        let (ctx, fake) = context(CAPS);
        // The pod is ready and its /v1/info answers through the service proxy.
        let info_path = main_kms_with_a_ready_pod(&ctx, &fake).await;
        let key = "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29";
        fake.put(
            &info_path,
            json!({"signing_public_key": key, "api_version": "v1", "current_kek_version": 3}),
        );
        let again: KeyManagementServer = stored(&fake, &kms_path("main"));
        crate::kms::reconcile(Arc::new(again), ctx.clone())
            .await
            .unwrap();
        let status = fake.get(&kms_path("main")).unwrap()["status"].clone();
        assert_eq!(status["currentKekVersion"], 3, "{status}");
        assert_eq!(status["ticketPublicKey"], key);
        assert_eq!(status["readyReplicas"], 1);

        // Nothing changed: reading /v1/info again writes nothing.
        fake.clear_calls();
        let again: KeyManagementServer = stored(&fake, &kms_path("main"));
        crate::kms::reconcile(Arc::new(again), ctx.clone())
            .await
            .unwrap();
        assert!(
            fake.calls().iter().any(|c| c.path == info_path),
            "the KMS was asked"
        );
        assert_eq!(
            fake.writes(),
            vec![],
            "unchanged KEK version must not write"
        );

        // A rotation shows up with exactly one status write.
        fake.put(
            &info_path,
            json!({"signing_public_key": key, "api_version": "v1", "current_kek_version": 4}),
        );
        fake.clear_calls();
        let again: KeyManagementServer = stored(&fake, &kms_path("main"));
        crate::kms::reconcile(Arc::new(again), ctx).await.unwrap();
        let writes = non_event_writes(&fake);
        assert_eq!(writes.len(), 1, "{writes:?}");
        assert!(writes[0].path.ends_with("/status"));
        assert_eq!(
            fake.get(&kms_path("main")).unwrap()["status"]["currentKekVersion"],
            4
        );
    })
    .await
}

/// Creates the KMS "main", reconciles it once and marks its pod ready; answers the path of
/// its /v1/info.
async fn main_kms_with_a_ready_pod(ctx: &Arc<crate::context::Context>, fake: &FakeApi) -> String {
    let k = kms("main");
    let port = k.spec.exposure.port;
    fake.put(&kms_path("main"), serde_json::to_value(&k).unwrap());
    crate::kms::reconcile(Arc::new(k), ctx.clone())
        .await
        .unwrap();
    let sts_path = path("apps/v1", "statefulsets", "main-kms");
    let mut sts = fake.get(&sts_path).unwrap();
    sts["status"] =
        json!({"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1, "observedGeneration": 1});
    fake.put(&sts_path, sts);
    format!("/api/v1/namespaces/{NS}/services/https:main-kms:{port}/proxy/v1/info")
}

// Paused time: the runtime skips ahead whenever every task waits, so the timeout passes at once.
#[tokio::test(start_paused = true)]
async fn a_kms_that_does_not_answer_holds_its_reconcile_for_a_bounded_time() {
    bounded(async {
        let (ctx, fake) = context(CAPS);
        let info_path = main_kms_with_a_ready_pod(&ctx, &fake).await;
        fake.stall(&info_path);
        let again: KeyManagementServer = stored(&fake, &kms_path("main"));
        let started = tokio::time::Instant::now();
        crate::kms::reconcile(Arc::new(again), ctx).await.unwrap();
        assert!(
            started.elapsed() <= crate::context::PROXY_TIMEOUT * 2,
            "{:?}",
            started.elapsed()
        );
        let status = fake.get(&kms_path("main")).unwrap()["status"].to_string();
        assert!(
            status.contains("ticket key not read from the KMS yet: no answer in 5 s"),
            "{status}"
        );
    })
    .await
}

#[test]
fn kms_info_without_a_kek_version_still_gives_the_ticket_key() {
    let key = "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29";
    let info =
        crate::kms::parse_info(&json!({"signing_public_key": key, "api_version": "v1"})).unwrap();
    assert_eq!(info.ticket_key, key);
    assert_eq!(info.kek_version, None);
    let short = crate::kms::parse_info(&json!({"signing_public_key": "abcd", "api_version": "v1"}));
    assert!(short.unwrap_err().contains("32 bytes"));
}

#[tokio::test]
async fn pool_status_counts_active_sessions_from_ready_connectors() {
    bounded(async {
        let (ctx, fake) = context(CAPS);
        ready_kms_with_key(&fake);
        fake.put(
            &zone_path("zone-a"),
            serde_json::to_value(zone("zone-a", "main")).unwrap(),
        );
        let p = pool("rec", "zone-a");
        fake.put(&pool_path("rec"), serde_json::to_value(&p).unwrap());
        crate::pool::reconcile(Arc::new(p), ctx.clone())
            .await
            .unwrap();
        let dep_path = path("apps/v1", "deployments", "rec-connector");
        let mut dep = fake.get(&dep_path).unwrap();
        dep["status"] = json!({"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1, "observedGeneration": 1});
        fake.put(&dep_path, dep);
        let labels = crate::pod::labels("connector", "rec");
        for (pod, ready, active) in [("rec-a", "True", 2), ("rec-b", "False", 5)] {
            fake.put(
                &path("v1", "pods", pod),
                json!({"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": pod, "namespace": NS, "labels": labels},
                       "status": {"conditions": [{"type": "Ready", "status": ready}]}}),
            );
            fake.put(
                &format!("/api/v1/namespaces/{NS}/pods/{pod}:{}/proxy/metrics", crate::pod::HTTP_PORT),
                json!(format!("# TYPE conclave_connector_recordings_active gauge\nconclave_connector_recordings_active {active}\nconclave_connector_recording_bytes_total 100\n# EOF\n")),
            );
        }
        let again: ConnectorPool = stored(&fake, &pool_path("rec"));
        crate::pool::reconcile(Arc::new(again), ctx.clone())
            .await
            .unwrap();
        let status = fake.get(&pool_path("rec")).unwrap()["status"].clone();
        assert_eq!(status["activeSessions"], 2, "only the ready pod counts: {status}");

        fake.clear_calls();
        let again: ConnectorPool = stored(&fake, &pool_path("rec"));
        crate::pool::reconcile(Arc::new(again), ctx).await.unwrap();
        assert_eq!(fake.writes(), vec![], "unchanged sessions must not write");
    })
    .await
}

#[test]
fn sessions_are_summed_from_the_connector_gauges_only() {
    let text = "conclave_connector_phone_legs_active 3\nconclave_connector_ffmpeg_running 1\nconclave_connector_sip_calls_total{direction=\"in\"} 9\n";
    assert_eq!(crate::pool::sessions_in_exposition(text), Some(4));
    assert_eq!(crate::pool::sessions_in_exposition("up 1\n"), None);
}

#[tokio::test]
async fn the_ca_key_lives_in_the_operator_namespace_and_an_old_one_is_moved() {
    bounded(async {
        let key_path = format!(
            "/api/v1/namespaces/{OPERATOR_NS}/secrets/{}",
            crate::certs::ca_key_secret_name(NS)
        );
        let public_path = path("v1", "secrets", "conclave-ca");

        // A fresh namespace: the key goes to the operator's namespace only.
        let (ctx, fake) = context(CAPS);
        let ca = crate::certs::ensure_ca(&ctx, NS).await.unwrap();
        let public = fake
            .get(&public_path)
            .expect("conclave-ca in the namespace");
        assert!(public["data"].get("ca.key").is_none(), "{public}");
        assert!(public["data"]["ca.crt"].is_string());
        let private = fake.get(&key_path).expect("the key Secret");
        assert!(private["data"]["ca.key"].is_string());
        // Steady state: reads only, same CA.
        fake.clear_calls();
        let again = crate::certs::ensure_ca(&ctx, NS).await.unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());
        assert_eq!(fake.writes(), vec![]);

        // A key an older operator left in the namespace is moved, keeping the same CA.
        let (ctx, fake) = context(CAPS);
        let old = conclave_pki::CertificateAuthority::generate(
            NS,
            conclave_pki::Validity::starting_now(std::time::Duration::from_secs(3600)),
        )
        .unwrap();
        let b64 = |s: &str| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(s)
        };
        fake.put(
            &public_path,
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": "conclave-ca", "namespace": NS,
                                "labels": {"app.kubernetes.io/managed-by": "conclave-operator"}},
                   "data": {"ca.crt": b64(old.cert_pem()), "ca.key": b64(&old.key_pem())}}),
        );
        let moved = crate::certs::ensure_ca(&ctx, NS).await.unwrap();
        assert_eq!(moved.cert_pem(), old.cert_pem());
        let public = fake.get(&public_path).unwrap();
        assert!(public["data"].get("ca.key").is_none(), "{public}");
        assert!(fake.get(&key_path).unwrap()["data"]["ca.key"].is_string());

        // A CA the user brought (not labelled as ours) stays where they put it.
        let (ctx, fake) = context(CAPS);
        fake.put(
            &public_path,
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": "conclave-ca", "namespace": NS},
                   "data": {"ca.crt": b64(old.cert_pem()), "ca.key": b64(&old.key_pem())}}),
        );
        let theirs = crate::certs::ensure_ca(&ctx, NS).await.unwrap();
        assert_eq!(theirs.cert_pem(), old.cert_pem());
        assert_eq!(fake.writes(), vec![]);
        assert!(fake.get(&key_path).is_none());
    })
    .await
}
