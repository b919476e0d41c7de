//! Reconcile of a ConnectorPool.

use super::*;
use crate::apply::apply;
use crate::certs::{self, CertRequest};
use crate::conditions::{Assessment, Verdict, conditions, reason};
use crate::context::Context;
use crate::pod::{child_meta, config_hash, selector_string};
use crate::zone::{MeetingZone, Resolved, resolve_external, resolve_local, validate_external};
use crate::{Error, Result, status};
use conclave_pki::{Identity, Kind};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use std::sync::Arc;
use std::time::Duration;

pub const KIND: &str = "ConnectorPool";
pub const NOT_ALLOWED: &str = "ConnectorNotAllowed";

/// Gauges of connector-node's /metrics that count sessions in progress, one per pool type.
pub const SESSION_GAUGES: [&str; 3] = [
    "conclave_connector_phone_legs_active",
    "conclave_connector_recordings_active",
    "conclave_connector_ffmpeg_running",
];

/// Sessions in progress in one connector's /metrics exposition, or `None` when it exports
/// none of [`SESSION_GAUGES`] (not a connector-node, or not started).
pub fn sessions_in_exposition(text: &str) -> Option<i64> {
    let mut found = None;
    for line in text.lines() {
        let Some((name, value)) = line.split_once(' ') else {
            continue;
        };
        // Unlabelled gauges: the name is the whole first token.
        if SESSION_GAUGES.contains(&name)
            && let Ok(v) = value.trim().parse::<f64>()
        {
            *found.get_or_insert(0) += v as i64;
        }
    }
    found
}

/// Sessions in progress across the pool's ready pods, read from each pod's /metrics through the
/// API server's pod proxy (the operator's NetworkPolicy lets it reach the API server only).
/// `None` when no pod answered.
async fn active_sessions(ctx: &Context, pool: &ConnectorPool, ns: &str) -> Result<Option<i64>> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let lp = ListParams::default().labels(&selector_string(COMPONENT, &pool.name_any()));
    let mut total = None;
    for p in pods.list(&lp).await? {
        let ready = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if !ready {
            continue;
        }
        let path = format!(
            "/api/v1/namespaces/{ns}/pods/{}:{}/proxy/metrics",
            p.name_any(),
            crate::pod::HTTP_PORT
        );
        match ctx.proxy_get(path).await {
            Ok(text) => {
                if let Some(n) = sessions_in_exposition(&text) {
                    *total.get_or_insert(0) += n;
                }
            }
            Err(e) => {
                tracing::debug!(pod = %p.name_any(), error = %e, "connector metrics not read")
            }
        }
    }
    Ok(total)
}

pub async fn reconcile(pool: Arc<ConnectorPool>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile(KIND);
    pool.reconcile(&ctx).await
}

/// The checks the CRD schema and CEL rules make, for servers that do not enforce them.
pub fn validate(pool: &ConnectorPool) -> std::result::Result<(), String> {
    let s = &pool.spec;
    crate::certs::lifetime(s.certificate_lifetime.as_deref(), std::time::Duration::ZERO)?;
    let name = pool.name_any();
    if name.len() > 40 || Identity::new("x", Kind::Connector, name.as_str()).is_err() {
        return Err(
            "metadata.name: must be a DNS label of at most 40 characters (children add suffixes)"
                .into(),
        );
    }
    match (&s.zone_ref, &s.external_kms) {
        (Some(_), Some(_)) | (None, None) => {
            return Err("spec: set exactly one of zoneRef and externalKms".into());
        }
        (Some(r), None) if r.name.is_empty() => return Err("spec.zoneRef.name: must be set".into()),
        (None, Some(e)) => validate_external(e, "spec.externalKms")?,
        _ => {}
    }
    if !(0..=1000).contains(&s.replicas) {
        return Err(format!(
            "spec.replicas: must be between 0 and 1000 (got {})",
            s.replicas
        ));
    }
    match s.connector_type {
        ConnectorType::Recording => {
            let r = s
                .recording
                .as_ref()
                .ok_or("spec.recording: required for type recording")?;
            if crate::shared::parse_quantity(&r.storage_size).is_none_or(|q| q <= 0.0) {
                return Err(format!(
                    "spec.recording.storageSize: {:?} is not a positive quantity such as 10Gi",
                    r.storage_size
                ));
            }
        }
        ConnectorType::LiveStreaming => {
            let l = s
                .live_streaming
                .as_ref()
                .ok_or("spec.liveStreaming: required for type liveStreaming")?;
            if l.allowed_targets.is_empty() {
                return Err("spec.liveStreaming.allowedTargets: list at least one rtmp:// or rtmps:// target".into());
            }
        }
        ConnectorType::Telephony => {
            let t = s
                .telephony
                .as_ref()
                .ok_or("spec.telephony: required for type telephony")?;
            if t.trunk_address.is_empty() {
                return Err("spec.telephony.trunkAddress: must be host:port".into());
            }
            if t.srtp != SrtpPolicy::Off && t.transport != SipTransport::Tls {
                return Err("spec.telephony.srtp: SRTP keys travel in SIP signalling, so it needs transport tls (or srtp off)".into());
            }
            if t.transport == SipTransport::Tls && t.trunk_ca_secret_ref.is_none() {
                return Err("spec.telephony.trunkCaSecretRef: required with transport tls (the CA that verifies the trunk)".into());
            }
        }
        ConnectorType::RoomSystem => {
            let r = s.room_system.clone().unwrap_or_default();
            if r.srtp != SrtpPolicy::Off && r.transport != SipTransport::Tls {
                return Err("spec.roomSystem.srtp: needs transport tls (or srtp off)".into());
            }
        }
    }
    let present = [
        (s.recording.is_some(), ConnectorType::Recording, "recording"),
        (
            s.live_streaming.is_some(),
            ConnectorType::LiveStreaming,
            "liveStreaming",
        ),
        (s.telephony.is_some(), ConnectorType::Telephony, "telephony"),
        (
            s.room_system.is_some(),
            ConnectorType::RoomSystem,
            "roomSystem",
        ),
    ];
    if let Some((_, _, field)) = present
        .iter()
        .find(|(set, t, _)| *set && *t != s.connector_type)
    {
        return Err(format!(
            "spec.{field}: does not apply to type {}",
            s.connector_type.as_str()
        ));
    }
    // Everything connector-node validates itself (paths, targets, dial-in numbers).
    let probe = crate::zone::KmsLink {
        url: "https://kms.invalid:8443".into(),
        ticket_public_key: String::new(),
        client_secret: String::new(),
        ca_secret: String::new(),
        ca_key: "ca.crt".into(),
        port: 8443,
        kms_pod_selector: None,
        per_pod_certs: false,
    };
    config(pool, &probe).map(|_| ())
}

impl ConnectorPool {
    async fn finish(&self, ctx: &Context, new: ConnectorPoolStatus) -> Result<()> {
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

    fn status_with(&self, a: &Assessment, base: ConnectorPoolStatus) -> ConnectorPoolStatus {
        let old = self.status.clone().unwrap_or_default();
        ConnectorPoolStatus {
            conditions: conditions(&old.conditions, a, self.meta().generation, status::now()),
            observed_generation: self.meta().generation,
            ..base
        }
    }

    async fn blocked(
        &self,
        ctx: &Context,
        why: &str,
        msg: String,
        base: ConnectorPoolStatus,
    ) -> Result<Action> {
        let a = Assessment {
            ready: Verdict::new(false, why, &msg),
            progressing: Verdict::new(why == reason::DEPENDENCY_NOT_READY, why, &msg),
            degraded: Verdict::new(why != reason::DEPENDENCY_NOT_READY, why, &msg),
        };
        let new = self.status_with(&a, base);
        self.finish(ctx, new).await?;
        Ok(Action::requeue(Duration::from_secs(30)))
    }

    pub async fn reconcile(&self, ctx: &Context) -> Result<Action> {
        let ns = self.namespace().ok_or(Error::MissingField("namespace"))?;
        let name = self.name_any();
        let old = self.status.clone().unwrap_or_default();
        if let Err(msg) = validate(self) {
            let new = self.status_with(&Assessment::invalid(&msg), old);
            self.finish(ctx, new).await?;
            return Ok(Action::await_change());
        }
        let issued = tls_name(&name);
        let resolved = match (&self.spec.zone_ref, &self.spec.external_kms) {
            (None, Some(e)) => {
                resolve_external(ctx, &ns, e, "spec.externalKms", String::new()).await?
            }
            (Some(r), _) => {
                let zones: Api<MeetingZone> = Api::namespaced(ctx.client.clone(), &ns);
                let Some(zone) = zones.get_opt(&r.name).await? else {
                    let msg = format!(
                        "spec.zoneRef: MeetingZone {:?} not found in namespace {ns}",
                        r.name
                    );
                    return self
                        .blocked(ctx, reason::DEPENDENCY_MISSING, msg, old)
                        .await;
                };
                if !zone
                    .spec
                    .encryption
                    .allowed_connectors
                    .contains(&self.spec.connector_type)
                {
                    let msg = format!(
                        "spec.type: MeetingZone {:?} does not allow {} connectors (spec.encryption.allowedConnectors)",
                        r.name,
                        self.spec.connector_type.as_str()
                    );
                    return self.blocked(ctx, NOT_ALLOWED, msg, old).await;
                }
                match (&zone.spec.kms_ref, &zone.spec.external_kms) {
                    (Some(k), _) => {
                        resolve_local(
                            ctx,
                            &ns,
                            &k.name,
                            &format!("MeetingZone {:?} spec.kmsRef", r.name),
                            issued.clone(),
                        )
                        .await?
                    }
                    (None, Some(e)) => {
                        resolve_external(
                            ctx,
                            &ns,
                            e,
                            &format!("MeetingZone {:?} spec.externalKms", r.name),
                            String::new(),
                        )
                        .await?
                    }
                    (None, None) => {
                        let msg = format!("spec.zoneRef: MeetingZone {:?} names no KMS", r.name);
                        return self
                            .blocked(ctx, reason::DEPENDENCY_MISSING, msg, old)
                            .await;
                    }
                }
            }
            (None, None) => return Err(Error::MissingField("spec.zoneRef")),
        };
        let (link, reach) = match resolved {
            Resolved::Link(l, r) => (l, r),
            // Connectors never verify tickets, so a KMS that has not reported its key is fine.
            Resolved::Blocked(why, msg, reach) if why == reason::DEPENDENCY_MISSING => {
                return self
                    .blocked(
                        ctx,
                        why,
                        msg,
                        ConnectorPoolStatus {
                            kms: Some(reach),
                            ..old
                        },
                    )
                    .await;
            }
            Resolved::Blocked(_, _, reach) => {
                let url = reach.url.clone().unwrap_or_default();
                (
                    crate::zone::KmsLink {
                        url,
                        ticket_public_key: String::new(),
                        client_secret: issued.clone(),
                        ca_secret: issued.clone(),
                        ca_key: "ca.crt".into(),
                        port: 0,
                        kms_pod_selector: None,
                        per_pod_certs: false,
                    },
                    reach,
                )
            }
        };
        let cfg = config(self, &link).map_err(Error::Config)?;
        let rendered = serde_yaml_ng::to_string(&cfg).map_err(|e| Error::Config(e.to_string()))?;
        let hash = config_hash(&rendered);
        let mut changed = Vec::new();

        let sa_api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &ns);
        if apply(&sa_api, &service_account(self)).await?.changed() {
            changed.push("ServiceAccount");
        }
        let cm_api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
        if apply(&cm_api, &config_map(self, &rendered))
            .await?
            .changed()
        {
            changed.push("ConfigMap");
        }
        let mut renew_at = None;
        if link.client_secret == issued {
            let ca = certs::ensure_ca(ctx, &ns).await?;
            let identity = Identity::new(&ns, Kind::Connector, &name)
                .map_err(|e| Error::Certificate(e.to_string()))?;
            let server_names = sip_port(self)
                .filter(|(_, t)| *t == SipTransport::Tls)
                .map(|_| sip_dns_names(self, &ctx.settings.cluster_domain));
            let cert = certs::ensure_cert(
                ctx,
                &ca,
                child_meta(self, &issued, COMPONENT),
                &CertRequest {
                    identity,
                    server_names,
                    lifetime: certs::lifetime(
                        self.spec.certificate_lifetime.as_deref(),
                        ctx.settings.cert_lifetime,
                    )
                    .map_err(Error::Config)?,
                },
            )
            .await?;
            if cert.renewed {
                changed.push("TLS certificate");
            }
            renew_at = Some(cert.renew_after);
        }
        if let Some(claim) = recordings_claim(self) {
            let claim = claim?;
            let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
            // Claims are immutable once bound: create when missing, never update.
            if pvcs.get_opt(&claim.name_any()).await?.is_none() {
                pvcs.create(
                    &PostParams {
                        field_manager: Some(crate::FIELD_MANAGER.into()),
                        ..Default::default()
                    },
                    &claim,
                )
                .await?;
                changed.push("recordings PersistentVolumeClaim");
            }
        }
        if let Some(svc) = sip_service(self) {
            let svc_api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
            if apply(&svc_api, &svc?).await?.changed() {
                changed.push("SIP Service");
            }
        }
        let dep_api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
        let dep = apply(&dep_api, &deployment(self, &link, &ctx.settings, &hash)?).await?;
        if dep.changed() {
            changed.push("Deployment");
        }
        let np_api: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), &ns);
        if apply(&np_api, &network_policy(self)?).await?.changed() {
            changed.push("NetworkPolicy");
        }
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

        let st = dep.object().status.clone().unwrap_or_default();
        let ready = st.ready_replicas.unwrap_or(0);
        let want = self.spec.replicas;
        let mut notes = Vec::new();
        if !reach.reachable {
            notes.push(
                reach
                    .message
                    .clone()
                    .unwrap_or_else(|| "KMS not reachable".into()),
            );
        }
        let mut a = Assessment::from_counts("connectors", ready, want, &notes);
        let updated = st.updated_replicas.unwrap_or(0) >= want
            && st.observed_generation >= dep.object().metadata.generation;
        if ready >= want && !updated {
            a.progressing = Verdict::new(true, reason::ROLLING_OUT, "connectors are being updated");
        }
        if !reach.reachable {
            a.degraded = Verdict::new(
                true,
                reason::DEPENDENCY_NOT_READY,
                reach.message.clone().unwrap_or_default(),
            );
        }
        let sessions = if ready > 0 {
            active_sessions(ctx, self, &ns)
                .await?
                .or(old.active_sessions)
        } else if want == 0 {
            Some(0)
        } else {
            old.active_sessions
        };
        let new = self.status_with(
            &a,
            ConnectorPoolStatus {
                ready_replicas: ready,
                active_sessions: sessions,
                kms: Some(reach),
                ..Default::default()
            },
        );
        self.finish(ctx, new).await?;
        let mut next = ctx.settings.resync;
        if let Some(at) = renew_at {
            next = next.min(certs::until(at));
        }
        // Pod readiness wakes us, but a connector that is ready before it answers on /metrics
        // does not: poll until the count is read rather than filling it in at the next resync.
        if ready > 0 && sessions.is_none() {
            next = next.min(crate::controller::UNREAD_STATUS_POLL);
        }
        Ok(Action::requeue(next))
    }
}
