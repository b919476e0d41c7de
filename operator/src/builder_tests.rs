//! Children builders without an API server: security settings, ownership, rendered configs,
//! and the generated CRDs against the committed files.

use crate::context::Settings;
use crate::fixtures::{kms, pool, zone};
use crate::zone::KmsLink;
use k8s_openapi::api::core::v1::PodSpec;
use serde_json::json;

fn link() -> KmsLink {
    KmsLink {
        url: "https://main-kms.team.svc:8443".into(),
        ticket_public_key: "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29"
            .into(),
        client_secret: "zone-a-relay-tls".into(),
        ca_secret: "zone-a-relay-tls".into(),
        ca_key: "ca.crt".into(),
        port: 8443,
        kms_pod_selector: Some(crate::pod::selector_labels("kms", "main")),
        per_pod_certs: true,
    }
}

fn assert_restricted(spec: &PodSpec) {
    let psc = spec.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(
        psc.seccomp_profile.as_ref().unwrap().type_,
        "RuntimeDefault"
    );
    assert_eq!(spec.automount_service_account_token, Some(false));
    for c in &spec.containers {
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop,
            Some(vec!["ALL".to_string()])
        );
        let req = c.resources.as_ref().unwrap().requests.as_ref().unwrap();
        assert!(
            req.contains_key("cpu") && req.contains_key("memory"),
            "{} has requests",
            c.name
        );
        assert!(c.readiness_probe.is_some() && c.liveness_probe.is_some());
    }
}

#[test]
fn every_workload_runs_restricted_and_is_owned() {
    let s = Settings::default();
    let k = kms("main");
    let sts = crate::kms::stateful_set(&k, &s, "h").unwrap();
    assert_restricted(sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap());
    assert_eq!(
        sts.metadata.owner_references.as_ref().unwrap()[0].uid,
        "uid-main"
    );

    let z = zone("zone-a", "main");
    let sts = crate::zone::stateful_set(&z, &link(), &s, "h").unwrap();
    assert_restricted(sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap());
    assert_eq!(
        sts.metadata.owner_references.as_ref().unwrap()[0].kind,
        "MeetingZone"
    );

    let p = pool("rec", "zone-a");
    let d = crate::pool::deployment(&p, &link(), &s, "h").unwrap();
    assert_restricted(d.spec.as_ref().unwrap().template.spec.as_ref().unwrap());
    assert_eq!(
        d.metadata.owner_references.as_ref().unwrap()[0].controller,
        Some(true)
    );
}

#[test]
fn containers_start_the_node_binaries_with_their_config() {
    let s = Settings::default();
    let args = |spec: &PodSpec| spec.containers[0].args.clone().unwrap();
    let k = crate::kms::stateful_set(&kms("main"), &s, "h").unwrap();
    assert_eq!(
        args(k.spec.as_ref().unwrap().template.spec.as_ref().unwrap()),
        ["serve", "--config", "/etc/conclave/config.yaml"]
    );
    let z = crate::zone::stateful_set(&zone("zone-a", "main"), &link(), &s, "h").unwrap();
    assert_eq!(
        args(z.spec.as_ref().unwrap().template.spec.as_ref().unwrap()),
        ["--config", "/etc/conclave/$(POD_NAME).yaml"]
    );
    let d = crate::pool::deployment(&pool("rec", "zone-a"), &link(), &s, "h").unwrap();
    assert_eq!(
        args(d.spec.as_ref().unwrap().template.spec.as_ref().unwrap()),
        ["run", "--config", "/etc/conclave/config.yaml"]
    );
}

#[test]
fn connector_pods_carry_the_zone_they_serve() {
    let d = crate::pool::deployment(&pool("rec", "zone-a"), &link(), &Settings::default(), "h")
        .unwrap();
    let labels = d.spec.unwrap().template.metadata.unwrap().labels.unwrap();
    assert_eq!(
        labels.get("conclave.dev/zone").map(String::as_str),
        Some("zone-a")
    );
    // The selector stays as it was: Deployment selectors are immutable.
    let d = crate::pool::deployment(&pool("rec", "zone-a"), &link(), &Settings::default(), "h")
        .unwrap();
    let selector = d.spec.unwrap().selector.match_labels.unwrap();
    assert!(!selector.contains_key("conclave.dev/zone"));
}

#[test]
fn config_change_changes_the_pod_template_hash() {
    let k = kms("main");
    let a =
        crate::kms::stateful_set(&k, &Settings::default(), &crate::pod::config_hash("a")).unwrap();
    let b =
        crate::kms::stateful_set(&k, &Settings::default(), &crate::pod::config_hash("b")).unwrap();
    let ann = |s: &k8s_openapi::api::apps::v1::StatefulSet| {
        s.spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .clone()
    };
    assert_ne!(ann(&a), ann(&b));
}

#[test]
fn kms_config_renders_issuers_rotation_and_pools() {
    let mut k = kms("main");
    k.spec = serde_json::from_value(json!({
        "participantAuth": {"issuers": [{"name": "https://portal", "jwksSecretRef": {"name": "jwks"}, "audience": "conclave"}]},
        "keyRotation": {"kekInterval": "48h", "meetingKeyInterval": "15m"},
        "audit": {"retention": "36h"},
        "rootKey": {"secretRef": {"name": "rk", "key": "k"}},
        "recordingReaders": ["token:https://portal:legal", "conclave://main/admin/main"],
    }))
    .unwrap();
    let grants = vec![(
        "conclave://team/connector/rec".to_string(),
        meeting_proto::kms_api::ConnectorKind::Recording,
    )];
    let c = crate::kms::config(&k, &grants).unwrap();
    assert_eq!(c.rotation.kek_interval_s, 48 * 3600);
    assert_eq!(c.rotation.meeting_key_interval_s, 900);
    assert_eq!(c.audit.retention_days, 2, "rounded up");
    assert_eq!(c.root_key.file.to_str(), Some("/etc/conclave/root-key/k"));
    assert_eq!(
        c.issuers[0].jwks_file.to_str(),
        Some("/etc/conclave/issuers/0/jwks.json")
    );
    assert_eq!(c.connector_pools.len(), 1);
    assert_eq!(
        c.recording_key_readers,
        ["token:https://portal:legal", "conclave://main/admin/main"]
    );
    // What the operator writes, kms-node parses.
    let yaml = serde_yaml_ng::to_string(&c).unwrap();
    assert_eq!(
        meeting_proto::config::kms::KmsConfig::from_yaml(&yaml).unwrap(),
        c
    );
}

#[test]
fn kms_limits_and_group_commits_pass_through_and_default_to_the_kms_own() {
    let defaults = crate::kms::config(&kms("main"), &[]).unwrap();
    use meeting_proto::config::kms::{AuditConfig, LimitsConfig};
    assert_eq!(defaults.limits, LimitsConfig::default());
    assert_eq!(
        defaults.audit.group_commit_linger_micros,
        AuditConfig::default().group_commit_linger_micros
    );

    let mut k = kms("main");
    k.spec.audit =
        serde_json::from_value(json!({"groupCommitMax": 64, "groupCommitLingerMicros": 0}))
            .unwrap();
    k.spec.limits =
        serde_json::from_value(json!({"perMeetingRps": 500, "maxMembers": 5000})).unwrap();
    let c = crate::kms::config(&k, &[]).unwrap();
    assert_eq!(
        (c.audit.group_commit_max, c.audit.group_commit_linger_micros),
        (64, 0)
    );
    assert_eq!(
        (c.limits.per_meeting_rps, c.limits.max_members),
        (500, 5000)
    );
    assert_eq!(
        c.limits.per_identity_rps,
        LimitsConfig::default().per_identity_rps
    );

    // Out of range, on a server that skipped the schema: the KMS's own check names the field.
    k.spec.limits.max_members = Some(1);
    let err = crate::kms::validate(&k).unwrap_err();
    assert!(err.contains("limits.maxMembers"), "{err}");
}

fn sts_args(z: &crate::zone::MeetingZone) -> Vec<String> {
    let sts = crate::zone::stateful_set(z, &link(), &Settings::default(), "h").unwrap();
    sts.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap()
}

#[test]
fn relay_pods_get_their_identity_and_address_from_the_environment() {
    let mut z = zone("zone-a", "main");
    let sts = crate::zone::stateful_set(&z, &link(), &Settings::default(), "h").unwrap();
    let env =
        serde_json::to_value(&sts.spec.unwrap().template.spec.unwrap().containers[0].env).unwrap();
    let get = |n: &str| {
        env.as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == n)
            .unwrap()["value"]
            .clone()
    };
    assert_eq!(get("CONCLAVE_RELAY_ADVERTISE"), "$(POD_IP):40000");
    let args = sts_args(&z);
    assert_eq!(
        args,
        ["--config", "/etc/conclave/$(POD_NAME).yaml"],
        "each relay reads its own file"
    );
    z.spec.media.mode = crate::zone::MediaMode::HostNetwork;
    let sts = crate::zone::stateful_set(&z, &link(), &Settings::default(), "h").unwrap();
    let spec = sts.spec.unwrap().template.spec.unwrap();
    assert_eq!(spec.host_network, Some(true));
    assert!(
        spec.affinity.unwrap().pod_anti_affinity.is_some(),
        "one hostNetwork relay per node"
    );
}

#[test]
fn per_relay_services_only_in_service_mode_one_per_ordinal() {
    let mut z = zone("zone-a", "main");
    assert!(crate::zone::relay_services(&z).unwrap().is_empty());
    z.spec.media.mode = crate::zone::MediaMode::Service;
    z.spec.media.service_type = crate::kms::ServiceType::NodePort;
    let svcs = crate::zone::relay_services(&z).unwrap();
    assert_eq!(svcs.len(), 2);
    let spec = svcs[1].spec.as_ref().unwrap();
    assert_eq!(spec.type_.as_deref(), Some("NodePort"));
    assert_eq!(
        spec.selector.as_ref().unwrap()["statefulset.kubernetes.io/pod-name"],
        "zone-a-relay-1"
    );
}

#[test]
fn network_policies_limit_relays_to_media_ops_kms_and_dns() {
    let z = zone("zone-a", "main");
    let np = serde_json::to_value(crate::zone::network_policy(&z, &link()).unwrap()).unwrap();
    assert_eq!(np["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    assert_eq!(
        np["spec"]["ingress"][0]["ports"][0],
        json!({"protocol": "UDP", "port": 40000})
    );
    assert_eq!(
        np["spec"]["egress"][0]["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"],
        "kms"
    );
    let k = kms("main");
    let np = serde_json::to_value(crate::kms::network_policy(&k).unwrap()).unwrap();
    assert_eq!(
        np["spec"]["egress"].as_array().unwrap().len(),
        1,
        "the KMS may only resolve names"
    );
}

#[test]
fn telephony_pool_renders_sip_over_tls_with_dial_in() {
    let mut p = pool("phones", "zone-a");
    p.spec = serde_json::from_value(json!({
        "zoneRef": {"name": "zone-a"}, "type": "telephony",
        "telephony": {"trunkAddress": "sip.example.net:5061", "credentialsSecretRef": {"name": "sip"}, "trunkCaSecretRef": {"name": "trunk-ca"},
                      "dialIn": [{"number": "+15550100", "meetingId": "weekly-sync"}]},
    }))
    .unwrap();
    crate::pool::validate(&p).unwrap();
    let c = crate::pool::config(&p, &link()).unwrap();
    let sip = c.sip.unwrap();
    assert_eq!(sip.listen.port(), 5061);
    assert_eq!(
        sip.srtp,
        meeting_proto::config::connector::SrtpPolicy::Required
    );
    assert_eq!(sip.dial_in.len(), 1);
    assert!(sip.tls_cert_file.is_some() && sip.credentials_file.is_some());
    assert_eq!(
        sip.tls_ca_file.unwrap().to_str(),
        Some("/etc/conclave/peer-ca/ca.crt")
    );
    assert!(crate::pool::sip_service(&p).is_some());
}

#[test]
fn streaming_pool_verifies_rtmps_targets_with_the_mounted_ca() {
    let mut p = pool("live", "zone-a");
    p.spec = serde_json::from_value(json!({
        "zoneRef": {"name": "zone-a"}, "type": "liveStreaming",
        "liveStreaming": {"allowedTargets": ["rtmps://live.example.com/app/"], "credentialsSecretRef": {"name": "keys"},
                          "targetCaSecretRef": {"name": "live-ca", "key": "bundle.pem"}},
    }))
    .unwrap();
    crate::pool::validate(&p).unwrap();
    let st = crate::pool::config(&p, &link()).unwrap().streaming.unwrap();
    assert_eq!(
        st.tls_ca_file.unwrap().to_str(),
        Some("/etc/conclave/peer-ca/bundle.pem")
    );
    let dep = crate::pool::deployment(&p, &link(), &Settings::default(), "h").unwrap();
    let spec = dep.spec.unwrap().template.spec.unwrap();
    let ca = spec
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "peer-ca")
        .unwrap();
    assert_eq!(ca.secret.unwrap().secret_name.as_deref(), Some("live-ca"));
    let mounts = spec.containers[0].volume_mounts.clone().unwrap();
    assert!(
        mounts
            .iter()
            .any(|m| m.mount_path == "/etc/conclave/peer-ca" && m.read_only == Some(true))
    );
}

#[test]
fn invalid_specs_name_the_field() {
    let mut k = kms("main");
    k.spec.replicas = 2;
    assert!(
        crate::kms::validate(&k)
            .unwrap_err()
            .contains("spec.replicas")
    );
    let mut k = kms("main");
    k.spec.recording_readers = vec!["conclave://ok/admin/main".into(), "legal-team".into()];
    assert!(
        crate::kms::validate(&k)
            .unwrap_err()
            .contains("spec.recordingReaders[1]")
    );
    let mut k = kms("main");
    k.spec.key_rotation.kek_interval = "soon".into();
    assert!(
        crate::kms::validate(&k)
            .unwrap_err()
            .contains("kekInterval")
    );

    let cases: Vec<(serde_json::Value, &str)> = vec![
        (json!({}), "exactly one of kmsRef and externalKms"),
        (
            json!({"kmsRef": {"name": "a"}, "relays": {"replicas": -1}}),
            "spec.relays.replicas",
        ),
        (
            json!({"kmsRef": {"name": "a"}, "encryption": {"mode": "endToEnd"}}),
            "spec.encryption.mode",
        ),
        (
            json!({"kmsRef": {"name": "a"}, "media": {"mode": "service"}}),
            "spec.media.serviceType",
        ),
        (
            json!({"kmsRef": {"name": "a"}, "media": {"udpPort": 9090}}),
            "spec.media.udpPort",
        ),
        (
            json!({"externalKms": {"url": "http://x", "caSecret": {"name": "c"}, "clientCertificateSecret": {"name": "d"}, "ticketPublicKey": "00"}}),
            "spec.externalKms.url",
        ),
        (
            json!({"externalKms": {"url": "https://x", "caSecret": {"name": "c"}, "clientCertificateSecret": {"name": "d"}}}),
            "ticketPublicKey",
        ),
    ];
    for (spec, want) in cases {
        let mut z = zone("zone-a", "main");
        z.spec = serde_json::from_value(spec.clone()).unwrap();
        let err = crate::zone::validate(&z).unwrap_err();
        assert!(err.contains(want), "{spec}: {err}");
    }

    let pool_cases: Vec<(serde_json::Value, &str)> = vec![
        (
            json!({"type": "recording", "recording": {}}),
            "exactly one of zoneRef and externalKms",
        ),
        (
            json!({"zoneRef": {"name": "z"}, "type": "recording"}),
            "spec.recording",
        ),
        (
            json!({"zoneRef": {"name": "z"}, "type": "telephony", "telephony": {"trunkAddress": "t:5060", "transport": "udp"}}),
            "spec.telephony.srtp",
        ),
        (
            json!({"zoneRef": {"name": "z"}, "type": "liveStreaming", "liveStreaming": {"allowedTargets": []}}),
            "allowedTargets",
        ),
        (
            json!({"zoneRef": {"name": "z"}, "type": "recording", "recording": {}, "replicas": -2}),
            "spec.replicas",
        ),
        (
            json!({"zoneRef": {"name": "z"}, "type": "telephony", "telephony": {"trunkAddress": "t:5061"}}),
            "spec.telephony.trunkCaSecretRef",
        ),
        (
            json!({"zoneRef": {"name": "z"}, "type": "recording", "recording": {}, "telephony": {"trunkAddress": "t"}}),
            "spec.telephony: does not apply",
        ),
    ];
    for (spec, want) in pool_cases {
        let mut p = pool("rec", "zone-a");
        p.spec = serde_json::from_value(spec.clone()).unwrap();
        let err = crate::pool::validate(&p).unwrap_err();
        assert!(err.contains(want), "{spec}: {err}");
    }
    // An unknown connector type never reaches the reconciler: the object does not deserialize.
    assert!(
        serde_json::from_value::<crate::pool::ConnectorPoolSpec>(
            json!({"zoneRef": {"name": "z"}, "type": "fax"})
        )
        .is_err()
    );
}

#[test]
fn crds_have_short_names_categories_columns_and_descriptions() {
    for crd in crate::crds() {
        let v = serde_json::to_value(&crd).unwrap();
        assert_eq!(v["spec"]["names"]["categories"], json!(["conclave"]));
        assert_eq!(
            v["spec"]["names"]["shortNames"].as_array().unwrap().len(),
            1
        );
        let version = &v["spec"]["versions"][0];
        let cols: Vec<_> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect();
        assert!(
            cols.contains(&"Ready".to_string()) && cols.contains(&"Age".to_string()),
            "{cols:?}"
        );
        assert!(version["subresources"]["status"].is_object());
        // Every property of the spec documents itself for kubectl explain.
        fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
            if let Some(props) = schema["properties"].as_object() {
                for (k, s) in props {
                    let p = format!("{path}.{k}");
                    if s["description"].as_str().is_none_or(str::is_empty) {
                        missing.push(p.clone());
                    }
                    walk(&p, s, missing);
                }
            }
            if schema["items"].is_object() {
                walk(&format!("{path}[]"), &schema["items"], missing);
            }
        }
        let mut missing = Vec::new();
        walk(
            "spec",
            &version["schema"]["openAPIV3Schema"]["properties"]["spec"],
            &mut missing,
        );
        assert!(
            missing.is_empty(),
            "{}: undocumented {missing:?}",
            crd.metadata.name.unwrap()
        );
    }
}

#[test]
fn committed_crds_match_the_code() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for dir in ["crds", "charts/conclave/files/crds"] {
        for crd in crate::crds() {
            for (with_cel, sub) in [(true, ""), (false, crate::PRE_CEL_DIR)] {
                let file = root.join(dir).join(sub).join(crate::crd_file_name(&crd));
                let committed = std::fs::read_to_string(&file).unwrap_or_default();
                assert!(
                    committed == crate::crd_yaml(&crd, with_cel).unwrap(),
                    "{} differs from the code: run `cargo run -p operator --bin crdgen -- crds charts/conclave/files/crds`",
                    file.display()
                );
            }
        }
    }
}

#[test]
fn pre_cel_crds_have_no_cel_rules_and_the_others_do() {
    for crd in crate::crds() {
        assert!(
            crate::crd_yaml(&crd, true)
                .unwrap()
                .contains("x-kubernetes-validations")
        );
        assert!(
            !crate::crd_yaml(&crd, false)
                .unwrap()
                .contains("x-kubernetes-validations")
        );
        assert!(
            crate::crd_yaml(&crd, false)
                .unwrap()
                .contains("helm.sh/resource-policy: keep")
        );
    }
}

/// Every Conclave resource in examples/ parses into the types and passes the reconciler's
/// checks: the manifests users copy cannot drift from the schema.
#[test]
fn examples_parse_and_validate() {
    use serde::Deserialize;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut dirs = vec![root];
    let mut checked = 0;
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for doc in serde_yaml_ng::Deserializer::from_str(&text) {
                let mut v = serde_json::Value::deserialize(doc).unwrap();
                // As `kubectl apply -n` would: the examples leave the namespace to the user.
                if v["metadata"].get("namespace").is_none() {
                    v["metadata"]["namespace"] = "examples".into();
                }
                let at = format!("{} ({})", path.display(), v["metadata"]["name"]);
                let checked_here = match v["kind"].as_str() {
                    Some("KeyManagementServer") => crate::kms::validate(
                        &serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{at}: {e}")),
                    ),
                    Some("MeetingZone") => crate::zone::validate(
                        &serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{at}: {e}")),
                    ),
                    Some("ConnectorPool") => crate::pool::validate(
                        &serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{at}: {e}")),
                    ),
                    _ => continue,
                };
                checked_here.unwrap_or_else(|e| panic!("{at}: {e}"));
                checked += 1;
            }
        }
    }
    assert!(checked >= 10, "only {checked} resources found in examples/");
}
