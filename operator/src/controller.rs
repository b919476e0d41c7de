//! The three controllers, their cross-resource watches and the per-object error backoff.

use crate::context::Context;
use crate::kms::KeyManagementServer;
use crate::pool::ConnectorPool;
use crate::zone::MeetingZone;
use crate::{Error, Result};
use futures::{Future, StreamExt};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How soon a ready object is looked at again while a status field its pods report is unread.
pub const UNREAD_STATUS_POLL: Duration = Duration::from_secs(10);

/// Consecutive failures per object, for exponential backoff.
#[derive(Debug, Default)]
pub struct Backoff(Mutex<HashMap<String, u32>>);

impl Backoff {
    /// Delay after one more failure of `key`: 5 s doubling up to 5 minutes.
    pub fn fail(&self, key: &str) -> Duration {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        let secs = 5u64.saturating_mul(1u64 << (*n - 1).min(16));
        Duration::from_secs(secs.min(300))
    }

    pub fn succeed(&self, key: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }
}

fn key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.namespace().unwrap_or_default(),
        obj.name_any()
    )
}

/// Shared state of the three controllers.
#[derive(Debug)]
pub struct Shared {
    pub ctx: Arc<Context>,
    pub backoff: Backoff,
}

fn error_policy<K: Resource<DynamicType = ()>>(
    obj: Arc<K>,
    error: &Error,
    shared: Arc<Shared>,
) -> Action {
    let delay = shared.backoff.fail(&key(obj.as_ref()));
    shared.ctx.metrics.error(&K::kind(&()), error);
    tracing::warn!(kind = %K::kind(&()), name = %obj.name_any(), namespace = ?obj.namespace(), error = %error, retry_in_s = delay.as_secs(), "reconcile failed");
    Action::requeue(delay)
}

async fn wrap<K, F, Fut>(obj: Arc<K>, shared: Arc<Shared>, f: F) -> Result<Action>
where
    K: Resource<DynamicType = ()>,
    F: FnOnce(Arc<K>, Arc<Context>) -> Fut,
    Fut: Future<Output = Result<Action>>,
{
    let k = key(obj.as_ref());
    let out = f(obj, shared.ctx.clone()).await;
    if out.is_ok() {
        shared.backoff.succeed(&k);
    }
    out
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + DeserializeOwned + Debug,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Children carry this label; watching only them keeps the caches small.
fn children() -> watcher::Config {
    watcher::Config::default().labels(&format!(
        "{}={}",
        crate::pod::LABEL_MANAGED_BY,
        crate::pod::MANAGED_BY
    ))
}

fn same_ns_refs<K: Resource<DynamicType = ()> + Clone>(
    store: &kube::runtime::reflector::Store<K>,
    ns: Option<String>,
    pick: impl Fn(&K) -> bool,
) -> Vec<ObjectRef<K>> {
    store
        .state()
        .iter()
        .filter(|o| o.namespace() == ns && pick(o))
        .map(|o| ObjectRef::from_obj(o.as_ref()))
        .collect()
}

/// Whether an object still waits for a reconcile: its spec generation is not yet the one its
/// status describes. Deleted objects with finalizers wait too.
pub fn awaits_reconcile(generation: Option<i64>, observed: Option<i64>, deleting: bool) -> bool {
    deleting || observed.is_none() || generation > observed
}

/// Makes `conclave_operator_queue_depth{kind}` count the cached objects that await a reconcile.
fn backlog_probe<K>(
    ctx: &Context,
    store: kube::runtime::reflector::Store<K>,
    generations: impl Fn(&K) -> (Option<i64>, Option<i64>) + Send + Sync + 'static,
) where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    ctx.metrics.set_backlog_probe(
        &K::kind(&()),
        Box::new(move || {
            store
                .state()
                .iter()
                .filter(|o| {
                    let (g, seen) = generations(o);
                    awaits_reconcile(g, seen, o.meta().deletion_timestamp.is_some())
                })
                .count() as i64
        }),
    );
}

/// Runs the three controllers until `shutdown` resolves (then they finish in-flight work).
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + Clone + 'static,
) {
    let client = ctx.client.clone();
    let ns = namespace.as_deref();
    let shared = Arc::new(Shared {
        ctx: ctx.clone(),
        backoff: Backoff::default(),
    });
    let pdb = ctx.caps.pdb_v1;

    // KeyManagementServer: owns its children; re-reconciles when zones or pools change, since
    // they decide its config (connector pools) and whether deletion may proceed.
    let kms_ctrl = Controller::new(
        api::<KeyManagementServer>(&client, ns),
        watcher::Config::default().any_semantic(),
    );
    let kms_store = kms_ctrl.store();
    let kms_ctrl_store = kms_ctrl.store();
    let kms_store2 = kms_ctrl.store();
    let mut kms_ctrl = kms_ctrl
        .owns(api::<StatefulSet>(&client, ns), children())
        .owns(api::<Service>(&client, ns), children())
        .owns(api::<ConfigMap>(&client, ns), children())
        .owns(api::<Secret>(&client, ns), children())
        .owns(api::<ServiceAccount>(&client, ns), children())
        .owns(api::<NetworkPolicy>(&client, ns), children())
        .watches(
            api::<MeetingZone>(&client, ns),
            watcher::Config::default(),
            move |z| {
                // Any zone change may add or drop a reference (also on deletion of the zone).
                same_ns_refs(&kms_store, z.namespace(), |_| true)
                    .into_iter()
                    .filter(|r| z.spec.kms_ref.as_ref().is_none_or(|k| k.name == r.name))
                    .collect::<Vec<_>>()
            },
        )
        .watches(
            api::<ConnectorPool>(&client, ns),
            watcher::Config::default(),
            move |p| same_ns_refs(&kms_store2, p.namespace(), |_| true),
        );
    if pdb {
        kms_ctrl = kms_ctrl.owns(api::<PodDisruptionBudget>(&client, ns), children());
    }

    let zone_ctrl = Controller::new(
        api::<MeetingZone>(&client, ns),
        watcher::Config::default().any_semantic(),
    );
    let zone_store = zone_ctrl.store();
    let zone_ctrl_store = zone_ctrl.store();
    let mut zone_ctrl = zone_ctrl
        .owns(api::<StatefulSet>(&client, ns), children())
        .owns(api::<Service>(&client, ns), children())
        .owns(api::<ConfigMap>(&client, ns), children())
        .owns(api::<Secret>(&client, ns), children())
        .owns(api::<ServiceAccount>(&client, ns), children())
        .owns(api::<NetworkPolicy>(&client, ns), children())
        .watches(
            api::<KeyManagementServer>(&client, ns),
            watcher::Config::default(),
            move |k| {
                let name = k.name_any();
                same_ns_refs(&zone_store, k.namespace(), |z| {
                    z.spec.kms_ref.as_ref().is_some_and(|r| r.name == name)
                })
            },
        );
    if pdb {
        zone_ctrl = zone_ctrl.owns(api::<PodDisruptionBudget>(&client, ns), children());
    }

    let pool_ctrl = Controller::new(
        api::<ConnectorPool>(&client, ns),
        watcher::Config::default().any_semantic(),
    );
    let pool_store = pool_ctrl.store();
    let pool_ctrl_store = pool_ctrl.store();
    let pool_ctrl = pool_ctrl
        .owns(api::<Deployment>(&client, ns), children())
        .owns(api::<Service>(&client, ns), children())
        .owns(api::<ConfigMap>(&client, ns), children())
        .owns(api::<Secret>(&client, ns), children())
        .owns(api::<ServiceAccount>(&client, ns), children())
        .owns(api::<NetworkPolicy>(&client, ns), children())
        .watches(
            api::<MeetingZone>(&client, ns),
            watcher::Config::default(),
            move |z| {
                let name = z.name_any();
                same_ns_refs(&pool_store, z.namespace(), |p| {
                    p.spec.zone_ref.as_ref().is_some_and(|r| r.name == name)
                })
            },
        );

    backlog_probe(&ctx, kms_ctrl_store, |k: &KeyManagementServer| {
        (
            k.meta().generation,
            k.status.as_ref().and_then(|s| s.observed_generation),
        )
    });
    backlog_probe(&ctx, zone_ctrl_store, |z: &MeetingZone| {
        (
            z.meta().generation,
            z.status.as_ref().and_then(|s| s.observed_generation),
        )
    });
    backlog_probe(&ctx, pool_ctrl_store, |p: &ConnectorPool| {
        (
            p.meta().generation,
            p.status.as_ref().and_then(|s| s.observed_generation),
        )
    });

    let s1 = shared.clone();
    let s2 = shared.clone();
    let s3 = shared.clone();
    let kms = kms_ctrl
        .graceful_shutdown_on(shutdown.clone())
        .run(|o, s| wrap(o, s, crate::kms::reconcile), error_policy, s1)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(controller = "kms", error = %e, "controller event");
            }
        });
    let zone = zone_ctrl
        .graceful_shutdown_on(shutdown.clone())
        .run(|o, s| wrap(o, s, crate::zone::reconcile), error_policy, s2)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(controller = "zone", error = %e, "controller event");
            }
        });
    let pool = pool_ctrl
        .graceful_shutdown_on(shutdown)
        .run(|o, s| wrap(o, s, crate::pool::reconcile), error_policy, s3)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(controller = "pool", error = %e, "controller event");
            }
        });
    futures::join!(kms, zone, pool);
}

#[cfg(test)]
mod tests {
    use super::{Backoff, awaits_reconcile};
    use std::time::Duration;

    #[test]
    fn backoff_doubles_per_object_caps_and_resets() {
        let b = Backoff::default();
        let got: Vec<_> = (0..8).map(|_| b.fail("a")).collect();
        assert_eq!(got[..4], [5, 10, 20, 40].map(Duration::from_secs));
        assert_eq!(got[7], Duration::from_secs(300));
        assert_eq!(
            b.fail("b"),
            Duration::from_secs(5),
            "objects back off independently"
        );
        b.succeed("a");
        assert_eq!(b.fail("a"), Duration::from_secs(5));
    }

    #[test]
    fn backlog_counts_unobserved_generations_and_deletions() {
        assert!(awaits_reconcile(Some(1), None, false), "never reconciled");
        assert!(awaits_reconcile(Some(3), Some(2), false), "spec changed");
        assert!(!awaits_reconcile(Some(2), Some(2), false), "up to date");
        assert!(awaits_reconcile(Some(2), Some(2), true), "deletion pending");
    }
}
