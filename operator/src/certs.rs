//! The per-namespace internal CA and the certificate Secrets issued from it.
//!
//! The CA lives in the Secret `conclave-ca` (`ca.crt`, `ca.key`) of each namespace that has
//! Conclave resources. A user may create that Secret beforehand to bring their own CA; the
//! operator never overwrites it. Issued certificates live in `kubernetes.io/tls` Secrets
//! (`tls.crt`, `tls.key`, `ca.crt`) owned by the resource they serve; nodes re-read the mounted
//! files when they change, so renewal at two thirds of the lifetime needs no restart.

use crate::apply::{Applied, apply_over};
use crate::context::Context;
use crate::metrics::CertLabels;
use crate::{Error, Result};
use conclave_pki::{CertificateAuthority, Identity, ServerNames, Validity};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Name of the namespace CA Secret.
pub const CA_SECRET: &str = "conclave-ca";

fn pki_err(e: conclave_pki::PkiError) -> Error {
    Error::Certificate(e.to_string())
}

fn data_str<'a>(s: &'a Secret, key: &str) -> Option<&'a str> {
    s.data
        .as_ref()?
        .get(key)
        .and_then(|b| std::str::from_utf8(&b.0).ok())
}

/// Name of the Secret in the operator's namespace that holds namespace `ns`'s CA key.
pub fn ca_key_secret_name(ns: &str) -> String {
    format!("{CA_SECRET}-{ns}")
}

fn ca_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        (crate::pod::LABEL_NAME.into(), "conclave".into()),
        (crate::pod::LABEL_COMPONENT.into(), "ca".into()),
        (
            crate::pod::LABEL_MANAGED_BY.into(),
            crate::pod::MANAGED_BY.into(),
        ),
    ])
}

fn ca_secret(ns: &str, name: &str, ca: &CertificateAuthority, with_key: bool) -> Secret {
    let mut data = BTreeMap::from([(
        "ca.crt".to_string(),
        ByteString(ca.cert_pem().as_bytes().to_vec()),
    )]);
    if with_key {
        data.insert(
            "ca.key".into(),
            ByteString(ca.key_pem().as_bytes().to_vec()),
        );
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            labels: Some(ca_labels()),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    }
}

fn ca_from(s: &Secret, where_: &str) -> Result<CertificateAuthority> {
    let (Some(cert), Some(key)) = (data_str(s, "ca.crt"), data_str(s, "ca.key")) else {
        return Err(Error::Certificate(format!(
            "Secret {where_} must hold ca.crt and ca.key (PEM)"
        )));
    };
    CertificateAuthority::from_pem(cert, key).map_err(pki_err)
}

fn made_by_operator(s: &Secret) -> bool {
    s.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(crate::pod::LABEL_MANAGED_BY))
        .is_some_and(|v| v == crate::pod::MANAGED_BY)
}

/// Creates `secret`; when another replica won the race, returns theirs.
async fn create_or_get(api: &Api<Secret>, secret: &Secret) -> Result<Option<Secret>> {
    match api.create(&PostParams::default(), secret).await {
        Ok(_) => Ok(None),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(Some(
            api.get(secret.metadata.name.as_deref().unwrap_or(CA_SECRET))
                .await?,
        )),
        Err(e) => Err(e.into()),
    }
}

/// Loads the CA of namespace `ns`, creating it when the namespace has none.
///
/// The CA's key stays out of the namespaces it serves: it lives in the Secret
/// [`ca_key_secret_name`] of the operator's namespace (`Settings::ca_namespace`), and `ns` gets
/// `conclave-ca` with `ca.crt` only, for whoever must trust the KMS. A key an older operator left
/// in `ns` is moved there. A `conclave-ca` the user created with `ca.key` (bring your own CA) is
/// used as it is. Without a CA namespace (running outside a pod without `--ca-namespace`) the
/// key is kept in `ns`, as before.
pub async fn ensure_ca(ctx: &Context, ns: &str) -> Result<CertificateAuthority> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let public = api.get_opt(CA_SECRET).await?;
    let has_key = |s: &Secret| data_str(s, "ca.key").is_some();
    let Some(key_ns) = ctx.settings.ca_namespace.as_deref() else {
        if let Some(s) = &public {
            return ca_from(s, &format!("{ns}/{CA_SECRET}"));
        }
        let ca =
            CertificateAuthority::generate(ns, Validity::starting_now(ctx.settings.ca_lifetime))
                .map_err(pki_err)?;
        return match create_or_get(&api, &ca_secret(ns, CA_SECRET, &ca, true)).await? {
            None => {
                tracing::info!(namespace = ns, "generated namespace CA");
                Ok(ca)
            }
            Some(theirs) => ca_from(&theirs, &format!("{ns}/{CA_SECRET}")),
        };
    };
    if let Some(s) = public
        .as_ref()
        .filter(|s| has_key(s) && !made_by_operator(s))
    {
        return ca_from(s, &format!("{ns}/{CA_SECRET}"));
    }
    let keys: Api<Secret> = Api::namespaced(ctx.client.clone(), key_ns);
    let key_name = ca_key_secret_name(ns);
    let where_ = format!("{key_ns}/{key_name}");
    let ca = match keys.get_opt(&key_name).await? {
        Some(s) => ca_from(&s, &where_)?,
        None => {
            let (ca, moved) = match public.as_ref().filter(|s| has_key(s)) {
                Some(s) => (ca_from(s, &format!("{ns}/{CA_SECRET}"))?, true),
                None => (
                    CertificateAuthority::generate(
                        ns,
                        Validity::starting_now(ctx.settings.ca_lifetime),
                    )
                    .map_err(pki_err)?,
                    false,
                ),
            };
            match create_or_get(&keys, &ca_secret(key_ns, &key_name, &ca, true)).await? {
                // Another replica won the race: theirs is the CA.
                Some(theirs) => ca_from(&theirs, &where_)?,
                None => {
                    let what = if moved {
                        "moved namespace CA key"
                    } else {
                        "generated namespace CA"
                    };
                    tracing::info!(namespace = ns, key_namespace = key_ns, "{what}");
                    ca
                }
            }
        }
    };
    // The served namespace keeps the certificate only. Dropping a key the operator once put
    // there takes a delete and a create: a server-side apply cannot remove a field another
    // field manager (the original create) owns, and the role has no `update` on Secrets.
    let cert_pem = ca.cert_pem();
    match &public {
        Some(s) if !has_key(s) && data_str(s, "ca.crt") == Some(cert_pem) => {}
        Some(_) => {
            api.delete(CA_SECRET, &Default::default()).await?;
            create_or_get(&api, &ca_secret(ns, CA_SECRET, &ca, false)).await?;
        }
        None => {
            create_or_get(&api, &ca_secret(ns, CA_SECRET, &ca, false)).await?;
        }
    }
    Ok(ca)
}

/// A certificate to keep issued in a Secret.
#[derive(Clone, Debug)]
pub struct CertRequest {
    pub identity: Identity,
    /// DNS names for a server certificate; `None` issues a client certificate.
    pub server_names: Option<Vec<String>>,
    /// Lifetime of a newly issued certificate. A live one issued for longer is replaced, so
    /// shortening the lifetime takes effect at once.
    pub lifetime: Duration,
}

/// Shortest certificate lifetime a resource may ask for: renewal at two thirds of it must leave
/// the kubelet time (up to its sync period, about a minute) to update mounted Secrets.
pub const MIN_LIFETIME: Duration = Duration::from_secs(60);

/// The lifetime of certificates issued for a resource: its `spec.certificateLifetime`, else
/// `default` (the operator's `--cert-lifetime`). The error names the field.
pub fn lifetime(spec: Option<&str>, default: Duration) -> std::result::Result<Duration, String> {
    let Some(s) = spec else {
        return Ok(default);
    };
    match crate::shared::parse_duration(s) {
        Some(d) if d >= MIN_LIFETIME => Ok(d),
        Some(_) => Err(format!(
            "spec.certificateLifetime: {s:?} is shorter than the minimum of {}s",
            MIN_LIFETIME.as_secs()
        )),
        None => Err(format!(
            "spec.certificateLifetime: {s:?} is not a duration such as 90s, 15m or 24h"
        )),
    }
}

/// Result of [`ensure_cert`].
#[derive(Clone, Debug)]
pub struct CertState {
    pub not_after: SystemTime,
    pub renew_after: SystemTime,
    /// A new certificate was written.
    pub renewed: bool,
}

/// Whether `live` still holds a certificate for `req` from `ca` that needs no renewal at `now`.
/// Returns its validity when it can be kept.
pub fn reusable(
    live: &Secret,
    req: &CertRequest,
    ca: &CertificateAuthority,
    now: SystemTime,
) -> Option<Validity> {
    reusable_at(live, req, ca, now, "tls.crt", "tls.key")
}

fn reusable_at(
    live: &Secret,
    req: &CertRequest,
    ca: &CertificateAuthority,
    now: SystemTime,
    cert_key: &str,
    key_key: &str,
) -> Option<Validity> {
    let (cert, _key, ca_pem) = (
        data_str(live, cert_key)?,
        data_str(live, key_key)?,
        data_str(live, "ca.crt")?,
    );
    if ca_pem != ca.cert_pem() {
        return None;
    }
    let der = conclave_pki::pem::certs_from_pem(cert.as_bytes(), "tls.crt")
        .ok()?
        .into_iter()
        .next()?;
    let info = conclave_pki::inspect(&der).ok()?;
    if info.identity.as_ref() != Some(&req.identity) {
        return None;
    }
    // Issued for longer than now asked (whole seconds, as X.509 stores them).
    if info.validity.lifetime() > req.lifetime + Duration::from_secs(1) {
        return None;
    }
    if let Some(names) = &req.server_names {
        let mut want = names.clone();
        let mut have = info.dns_names.clone();
        want.sort();
        have.sort();
        if want != have {
            return None;
        }
    }
    (now < info.validity.renew_after()).then_some(info.validity)
}

/// Keeps `secret` (owned via `meta`) holding a valid certificate for `req`.
pub async fn ensure_cert(
    ctx: &Context,
    ca: &CertificateAuthority,
    meta: ObjectMeta,
    req: &CertRequest,
) -> Result<CertState> {
    let ns = meta
        .namespace
        .clone()
        .ok_or(Error::MissingField("namespace"))?;
    let name = meta.name.clone().ok_or(Error::MissingField("name"))?;
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let live = api.get_opt(&name).await?;
    let now = SystemTime::now();
    let kept = live
        .as_ref()
        .and_then(|l| reusable(l, req, ca, now).map(|v| (l.data.clone(), v)));
    let (data, validity, renewed) = match kept {
        Some((data, v)) => (data.unwrap_or_default(), v, false),
        None => {
            let validity = Validity::starting_now(req.lifetime);
            let issued = match &req.server_names {
                Some(dns) => ca.issue_server(
                    &req.identity,
                    &ServerNames {
                        dns: dns.clone(),
                        ips: vec![],
                    },
                    validity,
                ),
                None => ca.issue_client(&req.identity, validity),
            }
            .map_err(pki_err)?;
            let data = BTreeMap::from([
                (
                    "tls.crt".to_string(),
                    ByteString(issued.cert_pem.as_bytes().to_vec()),
                ),
                (
                    "tls.key".to_string(),
                    ByteString(issued.key_pem.as_bytes().to_vec()),
                ),
                (
                    "ca.crt".to_string(),
                    ByteString(ca.cert_pem().as_bytes().to_vec()),
                ),
            ]);
            (data, issued.validity, true)
        }
    };
    let secret = Secret {
        metadata: meta,
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Default::default()
    };
    let applied = apply_over(&api, &secret, live).await?;
    if renewed && matches!(applied, Applied::Changed(_)) {
        tracing::info!(namespace = ns, secret = name, identity = %req.identity.to_uri(), "issued certificate");
    }
    let expiry = validity
        .not_after
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    ctx.metrics
        .cert_expiry
        .get_or_create(&CertLabels {
            namespace: ns,
            secret: name,
        })
        .set(expiry.as_secs_f64());
    Ok(CertState {
        not_after: validity.not_after,
        renew_after: validity.renew_after(),
        renewed,
    })
}

/// Keeps one Secret holding a client certificate per pod: `<pod>.crt` and `<pod>.key` for each
/// `(pod, identity)`, plus `ca.crt`. Pods find theirs by name, so a StatefulSet needs one Secret.
/// Returns the earliest expiry and renewal time.
pub async fn ensure_pod_certs(
    ctx: &Context,
    ca: &CertificateAuthority,
    meta: ObjectMeta,
    pods: &[(String, Identity)],
    lifetime: Duration,
) -> Result<CertState> {
    let ns = meta
        .namespace
        .clone()
        .ok_or(Error::MissingField("namespace"))?;
    let name = meta.name.clone().ok_or(Error::MissingField("name"))?;
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let live = api.get_opt(&name).await?;
    let now = SystemTime::now();
    let mut data = BTreeMap::from([(
        "ca.crt".to_string(),
        ByteString(ca.cert_pem().as_bytes().to_vec()),
    )]);
    let mut renewed = false;
    let far = now + lifetime;
    let (mut renew_after, mut not_after) = (far, far);
    for (pod, identity) in pods {
        let (ck, kk) = (format!("{pod}.crt"), format!("{pod}.key"));
        let req = CertRequest {
            identity: identity.clone(),
            server_names: None,
            lifetime,
        };
        let kept = live
            .as_ref()
            .and_then(|l| Some((l.data.as_ref()?, reusable_at(l, &req, ca, now, &ck, &kk)?)));
        let validity = match kept {
            Some((d, v)) if d.contains_key(&ck) && d.contains_key(&kk) => {
                data.insert(ck.clone(), d[&ck].clone());
                data.insert(kk.clone(), d[&kk].clone());
                v
            }
            _ => {
                let issued = ca
                    .issue_client(identity, Validity::starting_now(lifetime))
                    .map_err(pki_err)?;
                data.insert(ck, ByteString(issued.cert_pem.as_bytes().to_vec()));
                data.insert(kk, ByteString(issued.key_pem.as_bytes().to_vec()));
                renewed = true;
                issued.validity
            }
        };
        renew_after = renew_after.min(validity.renew_after());
        not_after = not_after.min(validity.not_after);
    }
    let secret = Secret {
        metadata: meta,
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    };
    apply_over(&api, &secret, live).await?;
    let expiry = not_after
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    ctx.metrics
        .cert_expiry
        .get_or_create(&CertLabels {
            namespace: ns,
            secret: name,
        })
        .set(expiry.as_secs_f64());
    Ok(CertState {
        not_after,
        renew_after,
        renewed,
    })
}

/// Time until `at`, at least one second (a requeue of zero would spin).
pub fn until(at: SystemTime) -> Duration {
    at.duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
        .max(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use conclave_pki::Kind;

    fn secret_with(issued: &conclave_pki::IssuedCert, ca: &CertificateAuthority) -> Secret {
        Secret {
            data: Some(BTreeMap::from([
                (
                    "tls.crt".to_string(),
                    ByteString(issued.cert_pem.as_bytes().to_vec()),
                ),
                (
                    "tls.key".to_string(),
                    ByteString(issued.key_pem.as_bytes().to_vec()),
                ),
                (
                    "ca.crt".to_string(),
                    ByteString(ca.cert_pem().as_bytes().to_vec()),
                ),
            ])),
            ..Default::default()
        }
    }

    #[test]
    fn a_certificate_is_kept_until_two_thirds_of_its_life_and_only_for_its_identity() {
        let ca =
            CertificateAuthority::generate("ns", Validity::starting_now(Duration::from_secs(3600)))
                .unwrap();
        let id = Identity::new("ns", Kind::Kms, "main").unwrap();
        let req = CertRequest {
            identity: id.clone(),
            server_names: Some(vec!["main-kms.ns.svc".into()]),
            lifetime: Duration::from_secs(300),
        };
        let validity = Validity::starting_now(Duration::from_secs(300));
        let issued = ca
            .issue_server(
                &id,
                &ServerNames {
                    dns: vec!["main-kms.ns.svc".into()],
                    ips: vec![],
                },
                validity,
            )
            .unwrap();
        let s = secret_with(&issued, &ca);
        let now = validity.not_before;
        assert_eq!(reusable(&s, &req, &ca, now), Some(validity));
        // 2/3 of 300 s = 200 s
        assert!(reusable(&s, &req, &ca, now + Duration::from_secs(199)).is_some());
        assert!(reusable(&s, &req, &ca, now + Duration::from_secs(201)).is_none());
        // asked for a shorter lifetime now: reissue at once
        let shorter = CertRequest {
            lifetime: Duration::from_secs(120),
            ..req.clone()
        };
        assert!(reusable(&s, &shorter, &ca, now).is_none());
        // other names, other identity, other CA: reissue
        let other_names = CertRequest {
            identity: id.clone(),
            server_names: Some(vec!["x".into()]),
            lifetime: req.lifetime,
        };
        assert!(reusable(&s, &other_names, &ca, now).is_none());
        let other_id = CertRequest {
            identity: Identity::new("ns", Kind::Kms, "other").unwrap(),
            ..req.clone()
        };
        assert!(reusable(&s, &other_id, &ca, now).is_none());
        let ca2 =
            CertificateAuthority::generate("ns", Validity::starting_now(Duration::from_secs(3600)))
                .unwrap();
        assert!(reusable(&s, &req, &ca2, now).is_none());
        assert!(reusable(&Secret::default(), &req, &ca, now).is_none());
    }

    #[test]
    fn lifetime_knob_has_a_minimum_and_names_the_field() {
        let day = Duration::from_secs(86_400);
        assert_eq!(lifetime(None, day), Ok(day));
        assert_eq!(lifetime(Some("90s"), day), Ok(Duration::from_secs(90)));
        assert!(
            lifetime(Some("30s"), day)
                .unwrap_err()
                .contains("minimum of 60s")
        );
        assert!(
            lifetime(Some("soon"), day)
                .unwrap_err()
                .starts_with("spec.certificateLifetime")
        );
    }
}
