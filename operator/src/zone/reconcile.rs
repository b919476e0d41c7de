//! Reconcile of a MeetingZone.

use super::*;
use crate::apply::{apply, delete_if_exists};
use crate::certs;
use crate::conditions::{self as cond, Assessment, Verdict, conditions, reason};
use crate::context::Context;
use crate::kms::{self, KeyManagementServer};
use crate::pod::{child_meta, config_hash, selector_string};
use crate::shared::{ExternalKms, is_hex_key};
use crate::{Error, Result, status};
use conclave_pki::{Identity, Kind};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ListParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use std::sync::Arc;
use std::time::Duration;

pub const KIND: &str = "MeetingZone";

pub async fn reconcile(zone: Arc<MeetingZone>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile(KIND);
    zone.reconcile(&ctx).await
}

/// The checks the CRD schema and CEL rules make, for servers that do not enforce them.
pub fn validate(zone: &MeetingZone) -> std::result::Result<(), String> {
    let s = &zone.spec;
    crate::certs::lifetime(s.certificate_lifetime.as_deref(), std::time::Duration::ZERO)?;
    let name = zone.name_any();
    if name.len() > 40 || Identity::new("x", Kind::Relay, name.as_str()).is_err() {
        return Err(
            "metadata.name: must be a DNS label of at most 40 characters (children add suffixes)"
                .into(),
        );
    }
    match (&s.kms_ref, &s.external_kms) {
        (Some(_), Some(_)) | (None, None) => {
            return Err("spec: set exactly one of kmsRef and externalKms".into());
        }
        (Some(r), None) if r.name.is_empty() => return Err("spec.kmsRef.name: must be set".into()),
        (None, Some(e)) => {
            validate_external(e, "spec.externalKms")?;
            if !e.ticket_public_key.as_deref().is_some_and(is_hex_key) {
                return Err("spec.externalKms.ticketPublicKey: required, 64 hex characters (the KMS's Ed25519 ticket key)".into());
            }
        }
        _ => {}
    }
    if !(0..=1000).contains(&s.relays.replicas) {
        return Err(format!(
            "spec.relays.replicas: must be between 0 and 1000 (got {})",
            s.relays.replicas
        ));
    }
    let m = &s.media;
    if !(1024..=65535).contains(&m.udp_port) || m.udp_port == crate::pod::HTTP_PORT {
        return Err(format!(
            "spec.media.udpPort: {} must be within 1024-65535 and not {}",
            m.udp_port,
            crate::pod::HTTP_PORT
        ));
    }
    match (m.mode, m.service_type) {
        (MediaMode::Service, ServiceType::ClusterIP) => {
            return Err(
                "spec.media.serviceType: mode service needs NodePort or LoadBalancer".into(),
            );
        }
        (
            MediaMode::PodIp | MediaMode::HostNetwork,
            ServiceType::NodePort | ServiceType::LoadBalancer,
        ) => {
            return Err("spec.media.serviceType: applies only to mode service".into());
        }
        _ => {}
    }
    if m.advertised_address
        .as_deref()
        .is_some_and(|a| a.is_empty() || a.contains(':') && !a.starts_with('[') || a.contains('/'))
    {
        return Err(
            "spec.media.advertisedAddress: must be a host name or IP address without port".into(),
        );
    }
    if s.encryption.mode != EncryptionMode::Enhanced {
        return Err(
            "spec.encryption.mode: endToEnd is reserved and not implemented yet; use enhanced"
                .into(),
        );
    }
    if !(2..=10000).contains(&s.limits.participants_per_meeting) {
        return Err("spec.limits.participantsPerMeeting: must be between 2 and 10000".into());
    }
    if !(1..=100000).contains(&s.limits.meetings_per_relay) {
        return Err("spec.limits.meetingsPerRelay: must be between 1 and 100000".into());
    }
    Ok(())
}

pub fn validate_external(e: &ExternalKms, field: &str) -> std::result::Result<(), String> {
    let host = e.url.strip_prefix("https://").unwrap_or("");
    if host.is_empty() || host.starts_with(['/', ':']) {
        return Err(format!(
            "{field}.url: must be an https:// URL with a host (got {:?})",
            e.url
        ));
    }
    if e.ca_secret.name.is_empty() {
        return Err(format!("{field}.caSecret.name: must be set"));
    }
    if e.client_certificate_secret.name.is_empty() {
        return Err(format!("{field}.clientCertificateSecret.name: must be set"));
    }
    Ok(())
}

/// `host:port` of an https URL (port 443 when absent).
pub fn host_port(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("https://")?;
    let authority = rest.split('/').next()?;
    if authority.is_empty() {
        return None;
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => p
            .parse()
            .ok()
            .map(|p| (h.trim_matches(['[', ']']).to_string(), p)),
        _ => Some((authority.trim_matches(['[', ']']).to_string(), 443)),
    }
}

/// Outcome of resolving what a zone or pool needs from its KMS.
#[derive(Debug)]
pub enum Resolved {
    Link(KmsLink, KmsReachability),
    /// Not usable yet: reason, message, and the reachability to report.
    Blocked(&'static str, String, KmsReachability),
}

async fn secret_has(ctx: &Context, ns: &str, name: &str, keys: &[&str]) -> Result<bool> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    Ok(api
        .get_opt(name)
        .await?
        .and_then(|s| s.data)
        .is_some_and(|d| keys.iter().all(|k| d.contains_key(*k))))
}

/// Where the CNI enforces NetworkPolicies the operator's own policy decides
/// whether the probe can get out at all, so an unreachable KMS may be that.
const EGRESS_HINT: &str = " (where NetworkPolicies are enforced, the operator's chart value \
     networkPolicy.extraEgress must allow this address)";

/// Resolves an external KMS: both Secrets must exist; reachability is a TCP connect.
pub async fn resolve_external(
    ctx: &Context,
    ns: &str,
    e: &ExternalKms,
    field: &str,
    ticket_key: String,
) -> Result<Resolved> {
    let ca_key = e.ca_secret.key_or("ca.crt").to_string();
    let mut missing = Vec::new();
    if !secret_has(ctx, ns, &e.ca_secret.name, &[&ca_key]).await? {
        missing.push(format!(
            "{field}.caSecret: Secret {:?} with key {ca_key:?} not found",
            e.ca_secret.name
        ));
    }
    if !secret_has(
        ctx,
        ns,
        &e.client_certificate_secret.name,
        &["tls.crt", "tls.key"],
    )
    .await?
    {
        missing.push(format!(
            "{field}.clientCertificateSecret: Secret {:?} with tls.crt and tls.key not found",
            e.client_certificate_secret.name
        ));
    }
    let (host, port) = host_port(&e.url).unwrap_or_default();
    if !missing.is_empty() {
        let msg = missing.join("; ");
        let r = KmsReachability {
            url: Some(e.url.clone()),
            reachable: false,
            message: Some(msg.clone()),
        };
        return Ok(Resolved::Blocked(reason::DEPENDENCY_MISSING, msg, r));
    }
    let reach = match tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    {
        Ok(Ok(_)) => KmsReachability {
            url: Some(e.url.clone()),
            reachable: true,
            message: None,
        },
        Ok(Err(err)) => KmsReachability {
            url: Some(e.url.clone()),
            reachable: false,
            message: Some(format!(
                "TCP connect from the operator failed: {err}{EGRESS_HINT}"
            )),
        },
        Err(_) => KmsReachability {
            url: Some(e.url.clone()),
            reachable: false,
            message: Some(format!(
                "TCP connect from the operator timed out{EGRESS_HINT}"
            )),
        },
    };
    Ok(Resolved::Link(
        KmsLink {
            url: e.url.clone(),
            ticket_public_key: ticket_key,
            client_secret: e.client_certificate_secret.name.clone(),
            ca_secret: e.ca_secret.name.clone(),
            ca_key,
            port: port.into(),
            kms_pod_selector: None,
            per_pod_certs: false,
        },
        reach,
    ))
}

/// Resolves a KeyManagementServer in the namespace; `client_secret` is the Secret the
/// operator issues for the caller's identity. Its `ca.crt` (the namespace CA, which signs the
/// KMS certificate too) is what the caller trusts.
pub async fn resolve_local(
    ctx: &Context,
    ns: &str,
    kms_name: &str,
    field: &str,
    client_secret: String,
) -> Result<Resolved> {
    let api: Api<KeyManagementServer> = Api::namespaced(ctx.client.clone(), ns);
    let Some(k) = api.get_opt(kms_name).await? else {
        let msg = format!("{field}: KeyManagementServer {kms_name:?} not found in namespace {ns}");
        let r = KmsReachability {
            url: None,
            reachable: false,
            message: Some(msg.clone()),
        };
        return Ok(Resolved::Blocked(reason::DEPENDENCY_MISSING, msg, r));
    };
    let url = kms::internal_url(kms_name, ns, k.spec.exposure.port);
    let st = k.status.clone().unwrap_or_default();
    let ready = cond::is_ready(&st.conditions);
    let reach = KmsReachability {
        url: Some(url.clone()),
        reachable: ready,
        message: (!ready).then(|| format!("KeyManagementServer {kms_name:?} is not Ready")),
    };
    let Some(ticket) = st.ticket_public_key.filter(|t| is_hex_key(t)) else {
        let msg = format!("waiting for KeyManagementServer {kms_name:?} to report its ticket key");
        return Ok(Resolved::Blocked(reason::DEPENDENCY_NOT_READY, msg, reach));
    };
    Ok(Resolved::Link(
        KmsLink {
            url,
            ticket_public_key: ticket,
            ca_secret: client_secret.clone(),
            client_secret,
            ca_key: "ca.crt".into(),
            port: k.spec.exposure.port,
            kms_pod_selector: Some(crate::pod::selector_labels(kms::COMPONENT, kms_name)),
            per_pod_certs: true,
        },
        reach,
    ))
}

/// `host:port` per relay ordinal, from pods and per-relay Services.
pub fn relay_endpoints(
    zone: &MeetingZone,
    pods: &[Pod],
    services: &[Service],
) -> Vec<(i32, String)> {
    let m = &zone.spec.media;
    let prefix = format!("{}-", workload_name(&zone.name_any()));
    let mut out: Vec<(i32, String)> = pods
        .iter()
        .filter_map(|p| {
            let ordinal: i32 = p.name_any().strip_prefix(&prefix)?.parse().ok()?;
            let st = p.status.as_ref()?;
            let ep = if let Some(a) = &m.advertised_address {
                format!(
                    "{}:{}",
                    a.replace("{ordinal}", &ordinal.to_string()),
                    m.udp_port
                )
            } else {
                match m.mode {
                    MediaMode::PodIp => format!("{}:{}", st.pod_ip.as_ref()?, m.udp_port),
                    MediaMode::HostNetwork => format!("{}:{}", st.host_ip.as_ref()?, m.udp_port),
                    MediaMode::Service => {
                        let svc = services.iter().find(|s| s.name_any() == p.name_any())?;
                        let port = svc.spec.as_ref()?.ports.as_ref()?.first()?;
                        let lb = svc.status.as_ref().and_then(|s| {
                            s.load_balancer.as_ref()?.ingress.as_ref()?.first().cloned()
                        });
                        match (m.service_type, lb) {
                            (ServiceType::LoadBalancer, Some(i)) => {
                                format!("{}:{}", i.ip.or(i.hostname)?, port.port)
                            }
                            (ServiceType::NodePort, _) => {
                                format!("{}:{}", st.host_ip.as_ref()?, port.node_port?)
                            }
                            _ => return None,
                        }
                    }
                }
            };
            Some((ordinal, ep))
        })
        .collect();
    out.sort();
    out
}

impl MeetingZone {
    async fn finish(&self, ctx: &Context, new: MeetingZoneStatus) -> Result<()> {
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

    fn status_with(&self, a: &Assessment, base: MeetingZoneStatus) -> MeetingZoneStatus {
        let old = self.status.clone().unwrap_or_default();
        MeetingZoneStatus {
            conditions: conditions(&old.conditions, a, self.meta().generation, status::now()),
            observed_generation: self.meta().generation,
            ..base
        }
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
        let resolved = match (&self.spec.kms_ref, &self.spec.external_kms) {
            (Some(r), _) => {
                resolve_local(ctx, &ns, &r.name, "spec.kmsRef", tls_name(&name)).await?
            }
            (None, Some(e)) => {
                let key = e.ticket_public_key.clone().unwrap_or_default();
                resolve_external(ctx, &ns, e, "spec.externalKms", key).await?
            }
            (None, None) => return Err(Error::MissingField("spec.kmsRef")),
        };
        let (link, reach) = match resolved {
            Resolved::Link(l, r) => (l, r),
            Resolved::Blocked(why, msg, reach) => {
                let a = Assessment {
                    ready: Verdict::new(false, why, &msg),
                    progressing: Verdict::new(why == reason::DEPENDENCY_NOT_READY, why, &msg),
                    degraded: Verdict::new(why == reason::DEPENDENCY_MISSING, why, &msg),
                };
                let new = self.status_with(
                    &a,
                    MeetingZoneStatus {
                        kms: Some(reach),
                        ..old
                    },
                );
                self.finish(ctx, new).await?;
                // The KMS is watched; Secrets of an external KMS are not.
                return Ok(Action::requeue(Duration::from_secs(30)));
            }
        };

        let mut changed = Vec::new();
        let mut notes = Vec::new();
        let want = self.spec.relays.replicas;

        let sa_api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &ns);
        if apply(&sa_api, &service_account(self)).await?.changed() {
            changed.push("ServiceAccount");
        }
        let mut renew_at = None;
        if link.per_pod_certs {
            let ca = certs::ensure_ca(ctx, &ns).await?;
            let mut pods = Vec::new();
            for i in 0..want {
                let pod = pod_name(&name, i);
                let identity = Identity::new(&ns, Kind::Relay, &name)
                    .and_then(|id| id.with_pod(pod.as_str()))
                    .map_err(|e| Error::Certificate(e.to_string()))?;
                pods.push((pod, identity));
            }
            let meta = child_meta(self, &tls_name(&name), COMPONENT);
            let lifetime = certs::lifetime(
                self.spec.certificate_lifetime.as_deref(),
                ctx.settings.cert_lifetime,
            )
            .map_err(Error::Config)?;
            let cert = certs::ensure_pod_certs(ctx, &ca, meta, &pods, lifetime).await?;
            if cert.renewed {
                changed.push("TLS certificates");
            }
            renew_at = Some(cert.renew_after);
        }
        let svc_api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
        if apply(&svc_api, &headless_service(self)?).await?.changed() {
            changed.push("headless Service");
        }
        let wanted = relay_services(self)?;
        let mut relay_svcs = Vec::new();
        for svc in &wanted {
            let a = apply(&svc_api, svc).await?;
            if a.changed() {
                changed.push("relay Service");
            }
            relay_svcs.push(a.object().clone());
        }
        let lp = ListParams::default().labels(&selector_string(MEDIA_COMPONENT, &name));
        for stale in svc_api.list(&lp).await? {
            if !wanted.iter().any(|w| w.name_any() == stale.name_any())
                && delete_if_exists(&svc_api, &stale.name_any()).await?
            {
                changed.push("removed relay Service");
            }
        }

        // One config per relay: identity and certificate paths are per pod, and so is the
        // address once the operator has seen it.
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
        let pod_list = pods
            .list(&ListParams::default().labels(&selector_string(COMPONENT, &name)))
            .await?
            .items;
        let endpoints = relay_endpoints(self, &pod_list, &relay_svcs);
        let mut rendered = Vec::new();
        for i in 0..want {
            let known = endpoints
                .iter()
                .find(|(o, _)| *o == i)
                .map(|(_, e)| e.as_str());
            let cfg =
                config(self, &link, i, &advertise_for(self, i, known)).map_err(Error::Config)?;
            let text = serde_yaml_ng::to_string(&cfg).map_err(|e| Error::Config(e.to_string()))?;
            rendered.push((pod_name(&name, i), text));
        }
        // Pods restart when what they share changes, not when one relay's address is learnt
        // or the zone scales.
        let shared =
            config(self, &link, 0, &advertise_for(self, 0, None)).map_err(Error::Config)?;
        let hash = config_hash(
            &serde_yaml_ng::to_string(&shared).map_err(|e| Error::Config(e.to_string()))?,
        );
        let cm_api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
        if apply(&cm_api, &config_map(self, &rendered))
            .await?
            .changed()
        {
            changed.push("ConfigMap");
        }
        let sts_api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
        let sts = apply(&sts_api, &stateful_set(self, &link, &ctx.settings, &hash)?).await?;
        if sts.changed() {
            changed.push("StatefulSet");
        }
        if ctx.caps.pdb_v1 {
            let pdb_api: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), &ns);
            if apply(&pdb_api, &pdb(self)?).await?.changed() {
                changed.push("PodDisruptionBudget");
            }
        } else {
            notes.push(
                "no PodDisruptionBudget: the API server does not serve policy/v1".to_string(),
            );
        }
        let np_api: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), &ns);
        if apply(&np_api, &network_policy(self, &link)?)
            .await?
            .changed()
        {
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

        let sts_status = sts.object().status.clone().unwrap_or_default();
        let ready = sts_status.ready_replicas.unwrap_or(0);
        if !reach.reachable {
            notes.push(
                reach
                    .message
                    .clone()
                    .unwrap_or_else(|| "KMS not reachable".into()),
            );
        }
        let mut a = Assessment::from_counts("relays", ready, want, &notes);
        let updated = sts_status.updated_replicas.unwrap_or(0) >= want
            && sts_status.observed_generation >= sts.object().metadata.generation;
        if ready >= want && !updated {
            a.progressing = Verdict::new(true, reason::ROLLING_OUT, "relays are being updated");
        }
        if !reach.reachable {
            a.degraded = Verdict::new(
                true,
                reason::DEPENDENCY_NOT_READY,
                reach.message.clone().unwrap_or_default(),
            );
        }
        let new = self.status_with(
            &a,
            MeetingZoneStatus {
                ready_relays: ready,
                relay_endpoints: endpoints.into_iter().map(|(_, e)| e).collect(),
                kms: Some(reach),
                ..Default::default()
            },
        );
        self.finish(ctx, new).await?;
        let mut next = ctx.settings.resync;
        if let Some(at) = renew_at {
            next = next.min(certs::until(at));
        }
        Ok(Action::requeue(next))
    }
}
