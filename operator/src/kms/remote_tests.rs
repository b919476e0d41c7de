//! `spec.remoteClients`: certificates for relays and pools elsewhere, their grants in the
//! kms-node config, and the checks on the list.

use super::*;
use crate::fixtures::*;
use conclave_pki::{Identity, Kind};
use meeting_proto::config::kms::KmsConfig;
use meeting_proto::kms_api::ConnectorKind;
use serde_json::{Value, json};
use std::sync::Arc;

const CAPS: crate::context::Capabilities = crate::context::Capabilities { pdb_v1: true };

fn with_remotes(clients: Value) -> KeyManagementServer {
    let mut k = kms("main");
    k.spec.remote_clients = serde_json::from_value(clients).unwrap();
    k
}

fn zone_b_and_recorder() -> Value {
    json!([
        {"name": "zone-b", "kind": "relay", "namespace": "site-b", "resourceName": "zone-b"},
        {"name": "rec-c", "kind": "connector", "namespace": "site-c", "resourceName": "recorder-c",
         "connectorType": "recording"},
    ])
}

fn secret_path(name: &str) -> String {
    path("v1", "secrets", name)
}

fn identity_in(secret: &Value) -> Identity {
    use base64::Engine;
    let pem = base64::engine::general_purpose::STANDARD
        .decode(secret["data"]["tls.crt"].as_str().unwrap())
        .unwrap();
    let der = conclave_pki::pem::certs_from_pem(&pem, "tls.crt")
        .unwrap()
        .remove(0);
    conclave_pki::inspect(&der).unwrap().identity.unwrap()
}

#[test]
fn connector_entries_become_grants_and_relays_do_not() {
    let k = with_remotes(zone_b_and_recorder());
    assert_eq!(validate(&k), Ok(()));
    let grants = remote_grants(&k);
    assert_eq!(
        grants,
        vec![(
            "conclave://site-c/connector/recorder-c".to_string(),
            ConnectorKind::Recording
        )]
    );
    let cfg = config(&k, &grants).unwrap();
    assert_eq!(cfg.connector_pools.len(), 1);
    assert_eq!(
        cfg.connector_pools[0].identity,
        "conclave://site-c/connector/recorder-c"
    );
    assert_eq!(cfg.connector_pools[0].kind, ConnectorKind::Recording);
}

#[test]
fn invalid_remote_clients_name_the_field() {
    let cases = [
        (
            json!([{"name": "rec", "kind": "connector", "namespace": "b", "resourceName": "r"}]),
            "spec.remoteClients[0].connectorType: required",
        ),
        (
            json!([{"name": "z", "kind": "relay", "namespace": "b", "resourceName": "z", "connectorType": "recording"}]),
            "spec.remoteClients[0].connectorType: only for kind connector",
        ),
        (
            json!([
                {"name": "z", "kind": "relay", "namespace": "b", "resourceName": "z"},
                {"name": "z", "kind": "relay", "namespace": "c", "resourceName": "z"},
            ]),
            "spec.remoteClients[1].name: \"z\" is used twice",
        ),
        (
            json!([
                {"name": "z", "kind": "relay", "namespace": "b", "resourceName": "z"},
                {"name": "y", "kind": "relay", "namespace": "b", "resourceName": "z"},
            ]),
            "conclave://b/relay/z is listed twice",
        ),
        (
            json!([{"name": "Zone_B", "kind": "relay", "namespace": "b", "resourceName": "z"}]),
            "spec.remoteClients[0].name",
        ),
        (
            json!([{"name": "z", "kind": "relay", "namespace": "Site B", "resourceName": "z"}]),
            "spec.remoteClients[0]: namespace and resourceName",
        ),
    ];
    for (clients, want) in cases {
        let err = validate(&with_remotes(clients.clone())).unwrap_err();
        assert!(err.contains(want), "{clients}: {err}");
    }
    // An unknown kind never reaches the reconciler: the schema's enum refuses it.
    let bad: Result<Vec<RemoteClient>, _> = serde_json::from_value(
        json!([{"name": "z", "kind": "gateway", "namespace": "b", "resourceName": "z"}]),
    );
    assert!(bad.is_err());
}

#[tokio::test]
async fn remote_clients_get_owned_certificates_that_go_when_the_entry_goes() {
    bounded(async {
        let (ctx, fake) = context(CAPS);
        let k = with_remotes(zone_b_and_recorder());
        let kms_path = path("conclave.dev/v1alpha1", "keymanagementservers", "main");
        fake.put(&kms_path, serde_json::to_value(&k).unwrap());
        reconcile(Arc::new(k), ctx.clone()).await.unwrap();

        let ca = fake.get(&secret_path("conclave-ca")).unwrap()["data"]["ca.crt"].clone();
        for (secret, ns, kind, name) in [
            (
                "main-kms-remote-zone-b-tls",
                "site-b",
                Kind::Relay,
                "zone-b",
            ),
            (
                "main-kms-remote-rec-c-tls",
                "site-c",
                Kind::Connector,
                "recorder-c",
            ),
        ] {
            let s = fake
                .get(&secret_path(secret))
                .unwrap_or_else(|| panic!("{secret} missing"));
            assert_eq!(s["type"], "kubernetes.io/tls");
            assert_eq!(s["metadata"]["ownerReferences"][0]["uid"], "uid-main");
            assert!(s["data"]["tls.key"].is_string());
            assert_eq!(s["data"]["ca.crt"], ca, "{secret} carries the CA to trust");
            assert_eq!(identity_in(&s), Identity::new(ns, kind, name).unwrap());
        }
        let cm = fake
            .get(&path("v1", "configmaps", "main-kms-config"))
            .unwrap();
        let cfg = KmsConfig::from_yaml(cm["data"]["config.yaml"].as_str().unwrap()).unwrap();
        let granted: Vec<_> = cfg
            .connector_pools
            .iter()
            .map(|p| (p.identity.as_str(), p.kind))
            .collect();
        assert_eq!(
            granted,
            vec![(
                "conclave://site-c/connector/recorder-c",
                ConnectorKind::Recording
            )]
        );

        // Unchanged: the certificates are kept, nothing is written.
        fake.clear_calls();
        let again: KeyManagementServer =
            serde_json::from_value(fake.get(&kms_path).unwrap()).unwrap();
        reconcile(Arc::new(again), ctx.clone()).await.unwrap();
        assert_eq!(fake.writes(), vec![], "second reconcile must not write");

        // The recorder leaves the list: its Secret and its grant go, the zone's stay.
        let mut edited: KeyManagementServer =
            serde_json::from_value(fake.get(&kms_path).unwrap()).unwrap();
        edited.spec.remote_clients.retain(|rc| rc.name == "zone-b");
        fake.put(&kms_path, serde_json::to_value(&edited).unwrap());
        reconcile(Arc::new(edited), ctx).await.unwrap();
        assert!(
            fake.get(&secret_path("main-kms-remote-rec-c-tls"))
                .is_none()
        );
        assert!(
            fake.get(&secret_path("main-kms-remote-zone-b-tls"))
                .is_some()
        );
        assert!(fake.get(&secret_path("main-kms-tls")).is_some());
        let cm = fake
            .get(&path("v1", "configmaps", "main-kms-config"))
            .unwrap();
        let cfg = KmsConfig::from_yaml(cm["data"]["config.yaml"].as_str().unwrap()).unwrap();
        assert!(cfg.connector_pools.is_empty());
    })
    .await
}

#[tokio::test]
async fn invalid_remote_clients_are_reported_and_issue_nothing() {
    bounded(async {
        let (ctx, fake) = context(CAPS);
        let k = with_remotes(
            json!([{"name": "rec", "kind": "connector", "namespace": "b", "resourceName": "r"}]),
        );
        let kms_path = path("conclave.dev/v1alpha1", "keymanagementservers", "main");
        fake.put(&kms_path, serde_json::to_value(&k).unwrap());
        reconcile(Arc::new(k), ctx).await.unwrap();
        let status = fake.get(&kms_path).unwrap()["status"].clone();
        let ready = status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap()
            .clone();
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "InvalidSpec");
        assert!(
            ready["message"]
                .as_str()
                .unwrap()
                .contains("spec.remoteClients[0].connectorType"),
            "{ready}"
        );
        assert!(fake.get(&secret_path("main-kms-remote-rec-tls")).is_none());
    })
    .await
}
