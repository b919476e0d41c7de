//! Leader election on a coordination.k8s.io/v1 Lease.
//!
//! Only the holder reconciles. The holder renews every `renew_every`; another replica takes
//! the Lease once `renewTime + leaseDurationSeconds` has passed. Updates use the Lease's
//! resourceVersion, so two replicas can never both win. The holder that shuts down releases
//! the Lease so a successor starts at once.

use crate::Result;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub lease_duration: Duration,
}

/// What one attempt concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Leader,
    Follower,
}

/// Whether `lease` may be taken by `me` at `now`.
pub fn takeable(lease: &LeaseSpec, me: &str, now: Timestamp) -> bool {
    match lease.holder_identity.as_deref() {
        None | Some("") => true,
        Some(h) if h == me => true,
        Some(_) => {
            let duration =
                SignedDuration::from_secs(lease.lease_duration_seconds.unwrap_or(15).into());
            match &lease.renew_time {
                Some(MicroTime(t)) => *t + duration < now,
                None => true,
            }
        }
    }
}

/// The spec `me` writes to hold the Lease.
pub fn holding(previous: Option<&LeaseSpec>, cfg: &LeaseConfig, now: Timestamp) -> LeaseSpec {
    let was_mine =
        previous.and_then(|p| p.holder_identity.as_deref()) == Some(cfg.identity.as_str());
    let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(cfg.lease_duration.as_secs().try_into().unwrap_or(15)),
        acquire_time: if was_mine {
            previous.and_then(|p| p.acquire_time.clone())
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if was_mine || previous.is_none() {
            transitions
        } else {
            transitions + 1
        }),
        ..Default::default()
    }
}

/// One acquire-or-renew attempt.
pub async fn try_acquire(client: &Client, cfg: &LeaseConfig) -> Result<Outcome> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let now = Timestamp::now();
    match api.get_opt(&cfg.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(holding(None, cfg, now)),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Outcome::Leader),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Outcome::Follower),
                Err(e) => Err(e.into()),
            }
        }
        Some(mut lease) => {
            let spec = lease.spec.clone().unwrap_or_default();
            if !takeable(&spec, &cfg.identity, now) {
                return Ok(Outcome::Follower);
            }
            lease.spec = Some(holding(Some(&spec), cfg, now));
            // The resourceVersion read above makes this a compare-and-swap.
            match api.replace(&cfg.name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(Outcome::Leader),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Outcome::Follower),
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// Gives the Lease up if we hold it, so a successor need not wait for it to expire.
pub async fn release(client: &Client, cfg: &LeaseConfig) -> Result<()> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    if let Some(mut lease) = api.get_opt(&cfg.name).await? {
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() == Some(cfg.identity.as_str()) {
            spec.holder_identity = None;
            spec.acquire_time = None;
            spec.renew_time = None;
            lease.spec = Some(spec);
            api.replace(&cfg.name, &PostParams::default(), &lease)
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(id: &str) -> LeaseConfig {
        LeaseConfig {
            name: "l".into(),
            namespace: "n".into(),
            identity: id.into(),
            lease_duration: Duration::from_secs(15),
        }
    }

    #[test]
    fn a_held_lease_is_takeable_only_by_its_holder_until_it_expires() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let spec = holding(None, &cfg("a"), t0);
        assert!(takeable(&spec, "a", t0 + SignedDuration::from_secs(1)));
        assert!(!takeable(&spec, "b", t0 + SignedDuration::from_secs(14)));
        assert!(takeable(&spec, "b", t0 + SignedDuration::from_secs(16)));
        assert!(takeable(&LeaseSpec::default(), "b", t0));
    }

    #[test]
    fn transitions_count_holder_changes_and_acquire_time_is_kept_on_renewal() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let a = holding(None, &cfg("a"), t0);
        let renewed = holding(Some(&a), &cfg("a"), t0 + SignedDuration::from_secs(5));
        assert_eq!(renewed.acquire_time, a.acquire_time);
        assert_eq!(renewed.lease_transitions, Some(0));
        let b = holding(
            Some(&renewed),
            &cfg("b"),
            t0 + SignedDuration::from_secs(30),
        );
        assert_eq!(b.lease_transitions, Some(1));
        assert_eq!(b.holder_identity.as_deref(), Some("b"));
        assert_eq!(
            b.acquire_time,
            Some(MicroTime(t0 + SignedDuration::from_secs(30)))
        );
    }
}
