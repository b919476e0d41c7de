//! What every reconcile needs: the client, an event recorder, metrics, settings and what the
//! API server serves.

use crate::metrics::Metrics;
use kube::Client;
use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use std::sync::Arc;
use std::time::Duration;

/// Operator-wide settings (from flags, see `operator run --help`).
#[derive(Clone, Debug)]
pub struct Settings {
    pub kms_image: String,
    pub relay_image: String,
    pub connector_image: String,
    pub image_pull_policy: String,
    /// Lifetime of issued certificates; renewed at two thirds of it.
    pub cert_lifetime: Duration,
    /// Lifetime of a namespace CA the operator generates.
    pub ca_lifetime: Duration,
    /// Re-check interval of a healthy resource (reads only, no writes when nothing changed).
    pub resync: Duration,
    /// Cluster DNS suffix used in certificate names and URLs.
    pub cluster_domain: String,
    /// Namespace holding the namespace CAs' keys (the operator's own). `None`: each CA's key
    /// stays in the namespace it serves.
    pub ca_namespace: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            kms_image: "conclave/kms-node:latest".into(),
            relay_image: "conclave/media-node:latest".into(),
            connector_image: "conclave/connector-node:latest".into(),
            image_pull_policy: "IfNotPresent".into(),
            cert_lifetime: Duration::from_secs(24 * 3600),
            ca_lifetime: Duration::from_secs(10 * 365 * 86_400),
            resync: Duration::from_secs(300),
            cluster_domain: "cluster.local".into(),
            ca_namespace: None,
        }
    }
}

/// Optional APIs, discovered at start-up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// policy/v1 PodDisruptionBudget (Kubernetes 1.21+).
    pub pdb_v1: bool,
}

impl Capabilities {
    pub async fn discover(client: &Client) -> Self {
        let pdb_v1 = match client.list_api_group_resources("policy/v1").await {
            Ok(list) => list
                .resources
                .iter()
                .any(|r| r.name == "poddisruptionbudgets"),
            Err(e) => {
                tracing::info!(error = %e, "policy/v1 not served: no PodDisruptionBudgets");
                false
            }
        };
        Self { pdb_v1 }
    }
}

pub struct Context {
    pub client: Client,
    /// Who publishes events (controller name and this replica).
    pub reporter: Reporter,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    pub caps: Capabilities,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .field("caps", &self.caps)
            .finish_non_exhaustive()
    }
}

/// How long a reconcile waits for a component's answer through the API server's proxy. A
/// proxied call to an endpoint that has just gone away can be held for the proxy's whole dial
/// timeout; waiting that long would hold every later reconcile of the object behind it.
pub const PROXY_TIMEOUT: Duration = Duration::from_secs(5);

impl Context {
    /// GETs `path`, a path of the API server's service or pod proxy, within [`PROXY_TIMEOUT`].
    /// The error says why there is no answer.
    pub async fn proxy_get(&self, path: String) -> Result<String, String> {
        let req = http::Request::get(path)
            .body(Vec::new())
            .map_err(|e| e.to_string())?;
        tokio::time::timeout(PROXY_TIMEOUT, self.client.request_text(req))
            .await
            .map_err(|_| format!("no answer in {} s", PROXY_TIMEOUT.as_secs()))?
            .map_err(|e| e.to_string())
    }

    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        settings: Settings,
        caps: Capabilities,
    ) -> Self {
        let reporter = Reporter {
            controller: "conclave-operator".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            reporter,
            client,
            metrics,
            settings,
            caps,
        }
    }

    /// Publishes an event on `obj`. Failures are logged, not returned: an event is a
    /// courtesy and must not fail a reconcile that did its work.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        // A fresh Recorder per event: a shared one folds events with the same reason into a
        // series and keeps the first note, which would misreport what changed. Events are
        // only sent on changes, so there is no flood to fold.
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        if let Err(e) = recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "could not publish event");
        }
    }
}
