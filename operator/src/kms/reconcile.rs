//! Reconcile and cleanup of a KeyManagementServer.

use super::*;
use crate::apply::{apply, apply_over, delete_if_exists};
use crate::certs::{self, CertRequest};
use crate::conditions::{Assessment, Verdict, conditions, reason};
use crate::context::Context;
use crate::pod::{child_meta, config_hash};
use crate::pool::ConnectorPool;
use crate::zone::MeetingZone;
use crate::{Error, Result, status};
use conclave_pki::{Identity, Kind};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolumeClaim, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event, finalizer};
use kube::{Resource, ResourceExt};
use std::sync::Arc;

/// Finalizer that holds deletion while MeetingZones reference the KMS.
pub const FINALIZER: &str = "conclave.dev/kms-protection";
pub const KIND: &str = "KeyManagementServer";

pub async fn reconcile(kms: Arc<KeyManagementServer>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile(KIND);
    let ns = kms.namespace().ok_or(Error::MissingField("namespace"))?;
    let api: Api<KeyManagementServer> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, kms, |event| async {
        match event {
            Event::Apply(k) => k.reconcile(&ctx).await,
            Event::Cleanup(k) => k.cleanup(&ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// Checks the CRD schema makes where the server enforces it (and CEL cannot on old servers).
/// The message names the field.
pub fn validate(kms: &KeyManagementServer) -> std::result::Result<(), String> {
    let s = &kms.spec;
    let name = kms.name_any();
    if name.len() > 40 || Identity::new("x", Kind::Kms, name.as_str()).is_err() {
        return Err(
            "metadata.name: must be a DNS label of at most 40 characters (children add suffixes)"
                .into(),
        );
    }
    if let Some((i, r)) = s
        .recording_readers
        .iter()
        .enumerate()
        .find(|(_, r)| !meeting_proto::config::kms::is_recording_reader(r))
    {
        return Err(format!(
            "spec.recordingReaders[{i}]: {r:?} is neither conclave://<namespace>/<kind>/<name> nor token:<issuer>:<subject>"
        ));
    }
    if s.replicas != 1 {
        return Err(format!(
            "spec.replicas: must be 1 until the KMS replicates its store (got {})",
            s.replicas
        ));
    }
    let e = &s.exposure;
    if !(1..=65535).contains(&e.port) || e.port == crate::pod::HTTP_PORT {
        return Err(format!(
            "spec.exposure.port: {} is not a usable port (1-65535, not {})",
            e.port,
            crate::pod::HTTP_PORT
        ));
    }
    if e.node_port.is_some() && e.service_type != ServiceType::NodePort {
        return Err("spec.exposure.nodePort: needs spec.exposure.serviceType NodePort".into());
    }
    if e.node_port.is_some_and(|p| !(30000..=32767).contains(&p)) {
        return Err("spec.exposure.nodePort: must be within 30000-32767".into());
    }
    if e.advertised_url
        .as_deref()
        .is_some_and(|u| !u.starts_with("https://") || u.len() <= 8)
    {
        return Err("spec.exposure.advertisedUrl: must be an https:// URL".into());
    }
    if crate::shared::parse_quantity(&s.storage.size).is_none_or(|q| q <= 0.0) {
        return Err(format!(
            "spec.storage.size: {:?} is not a positive quantity such as 1Gi",
            s.storage.size
        ));
    }
    if !s.key_rotation.meeting_key_on_leave {
        return Err("spec.keyRotation.meetingKeyOnLeave: false is not supported; a leave always rotates the meeting key".into());
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, iss) in s.participant_auth.issuers.iter().enumerate() {
        if iss.name.is_empty() || !seen.insert(iss.name.as_str()) {
            return Err(format!(
                "spec.participantAuth.issuers[{i}].name: must be set and unique"
            ));
        }
        if iss.audience.is_empty() {
            return Err(format!(
                "spec.participantAuth.issuers[{i}].audience: must be set"
            ));
        }
        if iss.jwks_secret_ref.name.is_empty() {
            return Err(format!(
                "spec.participantAuth.issuers[{i}].jwksSecretRef.name: must be set"
            ));
        }
    }
    if s.root_key
        .as_ref()
        .is_some_and(|r| r.secret_ref.name.is_empty())
    {
        return Err("spec.rootKey.secretRef.name: must be set".into());
    }
    crate::certs::lifetime(s.certificate_lifetime.as_deref(), std::time::Duration::ZERO)?;
    let mut names = std::collections::BTreeSet::new();
    let mut identities = std::collections::BTreeSet::new();
    for (i, rc) in s.remote_clients.iter().enumerate() {
        let field = format!("spec.remoteClients[{i}]");
        if Identity::new("x", Kind::Relay, rc.name.as_str()).is_err() {
            return Err(format!(
                "{field}.name: {:?} is not a DNS label (lowercase letters, digits and '-')",
                rc.name
            ));
        }
        if !names.insert(rc.name.as_str()) {
            return Err(format!("{field}.name: {:?} is used twice", rc.name));
        }
        match (rc.kind, rc.connector_type) {
            (RemoteClientKind::Connector, None) => {
                return Err(format!(
                    "{field}.connectorType: required for kind connector (recording, liveStreaming, telephony or roomSystem)"
                ));
            }
            (RemoteClientKind::Relay, Some(_)) => {
                return Err(format!("{field}.connectorType: only for kind connector"));
            }
            _ => {}
        }
        let id = remote_identity(rc)
            .map_err(|e| format!("{field}: namespace and resourceName must be DNS labels: {e}"))?;
        if !identities.insert(id.to_uri()) {
            return Err(format!("{field}: {} is listed twice", id.to_uri()));
        }
    }
    // Durations and everything the kms-node validates itself.
    config(kms, &[]).map(|_| ())
}

/// ConnectorPools that reach this KMS through a MeetingZone, as the grants its config lists.
pub async fn pool_grants(
    ctx: &Context,
    ns: &str,
    kms_name: &str,
) -> Result<(Vec<String>, Vec<PoolGrant>)> {
    let zones: Api<MeetingZone> = Api::namespaced(ctx.client.clone(), ns);
    let zone_names: Vec<String> = zones
        .list(&ListParams::default())
        .await?
        .into_iter()
        .filter(|z| z.spec.kms_ref.as_ref().is_some_and(|r| r.name == kms_name))
        .map(|z| z.name_any())
        .collect();
    let pools: Api<ConnectorPool> = Api::namespaced(ctx.client.clone(), ns);
    let mut grants: Vec<PoolGrant> = pools
        .list(&ListParams::default())
        .await?
        .into_iter()
        .filter(|p| {
            p.spec
                .zone_ref
                .as_ref()
                .is_some_and(|r| zone_names.contains(&r.name))
        })
        .filter_map(|p| {
            let id = Identity::new(ns, Kind::Connector, p.name_any()).ok()?;
            Some((id.to_uri(), crate::pool::kind_of(p.spec.connector_type)))
        })
        .collect();
    grants.sort();
    Ok((zone_names, grants))
}

/// What the operator reads from the KMS's `/v1/info`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KmsInfo {
    /// Hex Ed25519 ticket-signing public key.
    pub ticket_key: String,
    /// Current KEK version, when the KMS reports it.
    pub kek_version: Option<i64>,
}

/// Parses a `/v1/info` body.
pub fn parse_info(body: &serde_json::Value) -> std::result::Result<KmsInfo, String> {
    let info: meeting_proto::kms_api::InfoResponse =
        serde_json::from_value(body.clone()).map_err(|e| format!("KMS info: {e}"))?;
    if info.signing_public_key.0.len() != 32 {
        return Err("KMS reported a signing key that is not 32 bytes".into());
    }
    Ok(KmsInfo {
        ticket_key: hex::encode(&info.signing_public_key.0),
        kek_version: info.current_kek_version.map(i64::from),
    })
}

/// Reads the KMS's `/v1/info` (unauthenticated) through the API server's service proxy: the
/// operator's NetworkPolicy lets it reach the API server only.
async fn kms_info(
    ctx: &Context,
    kms: &KeyManagementServer,
    ns: &str,
) -> std::result::Result<KmsInfo, String> {
    let path = format!(
        "/api/v1/namespaces/{ns}/services/https:{}:{}/proxy{}",
        workload_name(&kms.name_any()),
        kms.spec.exposure.port,
        meeting_proto::kms_api::paths::INFO
    );
    let text = ctx.proxy_get(path).await?;
    let body: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("/v1/info is not JSON: {e}"))?;
    parse_info(&body)
}

fn fingerprint(hex_key: &str) -> String {
    use sha2::Digest;
    hex::decode(hex_key)
        .map(|b| hex::encode(sha2::Sha256::digest(&b)))
        .unwrap_or_default()
}

impl KeyManagementServer {
    fn old_status(&self) -> KeyManagementServerStatus {
        self.status.clone().unwrap_or_default()
    }

    async fn finish(&self, ctx: &Context, new: KeyManagementServerStatus) -> Result<()> {
        let old = self.status.as_ref();
        status::write(ctx, self, old, &new).await?;
        status::announce(
            ctx,
            self,
            old.map(|s| s.conditions.as_slice()).unwrap_or(&[]),
            &new.conditions,
        )
        .await;
        Ok(())
    }

    fn status_with(
        &self,
        a: &Assessment,
        base: KeyManagementServerStatus,
    ) -> KeyManagementServerStatus {
        let old = self.old_status();
        KeyManagementServerStatus {
            conditions: conditions(&old.conditions, a, self.meta().generation, status::now()),
            observed_generation: self.meta().generation,
            ..base
        }
    }

    pub async fn reconcile(&self, ctx: &Context) -> Result<Action> {
        let ns = self.namespace().ok_or(Error::MissingField("namespace"))?;
        let name = self.name_any();
        if let Err(msg) = validate(self) {
            let new = self.status_with(&Assessment::invalid(&msg), self.old_status());
            self.finish(ctx, new).await?;
            return Ok(Action::await_change());
        }
        // References the spec makes: report a missing one instead of failing pods later.
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
        let mut missing = Vec::new();
        if let Some(r) = &self.spec.root_key {
            let key = r.secret_ref.key_or("root.key");
            let ok = secrets
                .get_opt(&r.secret_ref.name)
                .await?
                .is_some_and(|s| s.data.is_some_and(|d| d.contains_key(key)));
            if !ok {
                missing.push(format!(
                    "spec.rootKey.secretRef: Secret {:?} with key {key:?} not found",
                    r.secret_ref.name
                ));
            }
        }
        for (i, iss) in self.spec.participant_auth.issuers.iter().enumerate() {
            let key = iss.jwks_secret_ref.key_or("jwks.json");
            let ok = secrets
                .get_opt(&iss.jwks_secret_ref.name)
                .await?
                .is_some_and(|s| s.data.is_some_and(|d| d.contains_key(key)));
            if !ok {
                missing.push(format!(
                    "spec.participantAuth.issuers[{i}].jwksSecretRef: Secret {:?} with key {key:?} not found",
                    iss.jwks_secret_ref.name
                ));
            }
        }
        if !missing.is_empty() {
            let msg = missing.join("; ");
            let a = Assessment {
                ready: Verdict::new(false, reason::DEPENDENCY_MISSING, &msg),
                progressing: Verdict::new(false, reason::DEPENDENCY_MISSING, &msg),
                degraded: Verdict::new(true, reason::DEPENDENCY_MISSING, &msg),
            };
            let new = self.status_with(&a, self.old_status());
            self.finish(ctx, new).await?;
            // Secrets are not watched: look again soon.
            return Ok(Action::requeue(std::time::Duration::from_secs(30)));
        }

        let (_zones, mut grants) = pool_grants(ctx, &ns, &name).await?;
        grants.extend(remote_grants(self));
        grants.sort();
        grants.dedup();
        let cfg = config(self, &grants).map_err(Error::Config)?;
        let rendered = serde_yaml_ng::to_string(&cfg).map_err(|e| Error::Config(e.to_string()))?;
        let hash = config_hash(&rendered);
        let mut changed: Vec<String> = Vec::new();
        let mut note = |applied: bool, what: String| {
            if applied {
                changed.push(what);
            }
        };

        let sa_api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &ns);
        note(
            apply(&sa_api, &service_account(self)).await?.changed(),
            "ServiceAccount".into(),
        );
        let cm_api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
        note(
            apply(&cm_api, &config_map(self, &rendered))
                .await?
                .changed(),
            "ConfigMap".into(),
        );

        let root_key_state = if self.spec.root_key.is_none() {
            let live = secrets.get_opt(&root_key_name(&name)).await?;
            let existing = live
                .as_ref()
                .and_then(|s| {
                    s.data
                        .as_ref()?
                        .get(GENERATED_ROOT_KEY)
                        .map(|b| b.0.clone())
                })
                .filter(|k| k.len() == 32);
            let key = match existing {
                Some(k) => k,
                None => {
                    let mut k = vec![0u8; 32];
                    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut k);
                    k
                }
            };
            note(
                apply_over(&secrets, &root_key_secret(self, key), live)
                    .await?
                    .changed(),
                "root key Secret".into(),
            );
            "generated (development-grade)"
        } else {
            delete_if_exists(&secrets, &root_key_name(&name)).await?;
            "secret"
        };

        let ca = certs::ensure_ca(ctx, &ns).await?;
        let lifetime = certs::lifetime(
            self.spec.certificate_lifetime.as_deref(),
            ctx.settings.cert_lifetime,
        )
        .map_err(Error::Config)?;
        let identity =
            Identity::new(&ns, Kind::Kms, &name).map_err(|e| Error::Certificate(e.to_string()))?;
        let cert = certs::ensure_cert(
            ctx,
            &ca,
            child_meta(self, &tls_name(&name), COMPONENT),
            &CertRequest {
                identity,
                server_names: Some(server_dns_names(self, &ctx.settings.cluster_domain)),
                lifetime,
            },
        )
        .await?;
        note(cert.renewed, "TLS certificate".into());
        let admin = certs::ensure_cert(
            ctx,
            &ca,
            child_meta(self, &admin_tls_name(&name), COMPONENT),
            &CertRequest {
                identity: admin_identity(self).map_err(Error::Certificate)?,
                server_names: None,
                lifetime,
            },
        )
        .await?;
        note(admin.renewed, "admin certificate".into());
        let mut renew_after = cert.renew_after.min(admin.renew_after);
        let mut wanted = std::collections::BTreeSet::new();
        for rc in &self.spec.remote_clients {
            let secret = remote_tls_name(&name, &rc.name);
            let issued = certs::ensure_cert(
                ctx,
                &ca,
                child_meta(self, &secret, COMPONENT),
                &CertRequest {
                    identity: remote_identity(rc).map_err(Error::Certificate)?,
                    server_names: None,
                    lifetime,
                },
            )
            .await?;
            note(
                issued.renewed,
                format!("remote client certificate {secret}"),
            );
            renew_after = renew_after.min(issued.renew_after);
            wanted.insert(secret);
        }
        // Entries removed from spec.remoteClients: their certificates go with them.
        let lp = ListParams::default().labels(&crate::pod::selector_string(COMPONENT, &name));
        for s in secrets.list(&lp).await? {
            let secret = s.name_any();
            if secret.starts_with(&remote_tls_prefix(&name)) && !wanted.contains(&secret) {
                let deleted = delete_if_exists(&secrets, &secret).await?;
                note(
                    deleted,
                    format!("deleted remote client certificate {secret}"),
                );
            }
        }

        let svc_api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
        note(
            apply(&svc_api, &service(self)?).await?.changed(),
            "Service".into(),
        );
        note(
            apply(&svc_api, &headless_service(self)?).await?.changed(),
            "headless Service".into(),
        );

        let sts_api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
        let mut sts = stateful_set(self, &ctx.settings, &hash)?;
        let live_sts = sts_api.get_opt(&workload_name(&name)).await?;
        let mut notes = Vec::new();
        if let Some(live) = &live_sts {
            // Claim templates are immutable: keep the live ones and say so if the spec moved on.
            let live_claims = live
                .spec
                .as_ref()
                .and_then(|s| s.volume_claim_templates.clone());
            if let (Some(spec), Some(claims)) = (sts.spec.as_mut(), live_claims) {
                let want = spec.volume_claim_templates.clone();
                let differs = want
                    .as_ref()
                    .and_then(|w| w.first())
                    .and_then(|c| c.spec.as_ref())
                    .map(|s| (&s.resources, &s.storage_class_name))
                    != claims
                        .first()
                        .and_then(|c| c.spec.as_ref())
                        .map(|s| (&s.resources, &s.storage_class_name));
                if differs {
                    notes.push(
                        "spec.storage changes apply to new volumes only (existing claims are kept)"
                            .to_string(),
                    );
                }
                spec.volume_claim_templates = Some(claims);
            }
        }
        let sts = apply_over(&sts_api, &sts, live_sts).await?;
        note(sts.changed(), "StatefulSet".into());

        if ctx.caps.pdb_v1 {
            let pdb_api: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), &ns);
            note(
                apply(&pdb_api, &pdb(self)?).await?.changed(),
                "PodDisruptionBudget".into(),
            );
        } else {
            notes.push("no PodDisruptionBudget: the API server does not serve policy/v1".into());
        }
        let np_api: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), &ns);
        note(
            apply(&np_api, &network_policy(self)?).await?.changed(),
            "NetworkPolicy".into(),
        );

        if !changed.is_empty() {
            ctx.event(
                self,
                false,
                "ChildrenApplied",
                "Apply",
                format!("created or updated: {}", changed.join(", ")),
            )
            .await;
        }

        let sts_status = sts.object().status.clone().unwrap_or_default();
        let ready = sts_status.ready_replicas.unwrap_or(0);
        let old = self.old_status();
        let (mut ticket, mut ticket_err) = (old.ticket_public_key.clone(), None);
        let mut kek_version = old.current_kek_version;
        if ready > 0 {
            match kms_info(ctx, self, &ns).await {
                Ok(info) => {
                    ticket = Some(info.ticket_key);
                    kek_version = info.kek_version.or(kek_version);
                }
                Err(e) => ticket_err = Some(e),
            }
        }
        if ticket.is_none() && ready > 0 {
            notes.push(format!(
                "ticket key not read from the KMS yet{}",
                ticket_err.map(|e| format!(": {e}")).unwrap_or_default()
            ));
        }
        let updated = sts_status.updated_replicas.unwrap_or(0) >= self.spec.replicas
            && sts_status.observed_generation >= sts.object().metadata.generation;
        let mut a = Assessment::from_counts("replicas", ready, self.spec.replicas, &notes);
        if ready >= self.spec.replicas && !updated {
            a.progressing = Verdict::new(true, reason::ROLLING_OUT, "pods are being updated");
        }
        if root_key_state.starts_with("generated") {
            a.degraded = Verdict::new(
                false,
                reason::AS_EXPECTED,
                "root key generated by the operator: development-grade, set spec.rootKey for production",
            );
        }
        let endpoint = self
            .spec
            .exposure
            .advertised_url
            .clone()
            .unwrap_or_else(|| internal_url(&name, &ns, self.spec.exposure.port));
        let new = self.status_with(
            &a,
            KeyManagementServerStatus {
                ready_replicas: ready,
                endpoint: Some(endpoint),
                ticket_signing_key_fingerprint: ticket.as_deref().map(fingerprint),
                ticket_public_key: ticket,
                current_kek_version: kek_version,
                root_key: Some(root_key_state.into()),
                ..Default::default()
            },
        );
        let unread = new.ticket_public_key.is_none() || new.current_kek_version.is_none();
        self.finish(ctx, new).await?;
        let next = certs::until(renew_after).min(ctx.settings.resync);
        // Until pods are ready the StatefulSet's status changes wake us; what the KMS itself
        // reports (ticket key, KEK version) needs a poll until read, or the next resync would
        // fill it in long after the KMS became ready.
        let next = if ready > 0 && unread {
            next.min(crate::controller::UNREAD_STATUS_POLL)
        } else {
            next
        };
        Ok(Action::requeue(next))
    }

    pub async fn cleanup(&self, ctx: &Context) -> Result<Action> {
        let ns = self.namespace().ok_or(Error::MissingField("namespace"))?;
        let name = self.name_any();
        let (zones, _) = pool_grants(ctx, &ns, &name).await?;
        if !zones.is_empty() {
            let msg = format!(
                "deletion waits until these MeetingZones stop referencing it: {}",
                zones.join(", ")
            );
            let mut a = Assessment::invalid(&msg);
            a.ready = Verdict::new(false, reason::DELETION_BLOCKED, &msg);
            a.progressing = Verdict::new(false, reason::DELETION_BLOCKED, &msg);
            a.degraded = Verdict::new(true, reason::DELETION_BLOCKED, &msg);
            let new = self.status_with(&a, self.old_status());
            self.finish(ctx, new).await?;
            return Err(Error::DeletionBlocked(msg));
        }
        if !self.spec.storage.retain_on_delete {
            let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
            let lp = ListParams::default().labels(&crate::pod::selector_string(COMPONENT, &name));
            for pvc in pvcs.list(&lp).await? {
                pvcs.delete(&pvc.name_any(), &DeleteParams::background())
                    .await?;
            }
            ctx.event(
                self,
                false,
                "VolumesDeleted",
                "Delete",
                "deleted the KMS volumes (spec.storage.retainOnDelete is false)".into(),
            )
            .await;
        } else {
            ctx.event(
                self,
                false,
                "VolumesRetained",
                "Delete",
                format!(
                    "kept the KMS volumes (PersistentVolumeClaims labelled {})",
                    crate::pod::selector_string(COMPONENT, &name)
                ),
            )
            .await;
        }
        Ok(Action::await_change())
    }
}
