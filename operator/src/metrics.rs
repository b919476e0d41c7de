//! Prometheus metrics, all prefixed `conclave_operator_`, and the client layer that counts
//! every write the operator sends to the API server.

use http::{Method, Request};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Instant;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: String,
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    pub verb: String,
    pub resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabels {
    pub namespace: String,
    pub secret: String,
}

/// Counts objects of one kind waiting to be reconciled (called at every scrape).
pub type BacklogProbe = Box<dyn Fn() -> i64 + Send + Sync>;

/// Every metric the operator exports.
pub struct Metrics {
    pub registry: Registry,
    /// Unprefixed standard process metrics (`process_*`), read from /proc at every scrape.
    process: Registry,
    pub queue_depth: Family<KindLabels, Gauge>,
    backlog: Mutex<Vec<(String, BacklogProbe)>>,
    pub reconciles: Family<KindLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub duration: Family<KindLabels, Histogram>,
    pub in_flight: Family<KindLabels, Gauge>,
    pub api_writes: Family<WriteLabels, Counter>,
    pub cert_expiry: Family<CertLabels, Gauge<f64, AtomicU64>>,
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("conclave_operator");
        let reconciles = Family::<KindLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 14))
        });
        let in_flight = Family::<KindLabels, Gauge>::default();
        let api_writes = Family::<WriteLabels, Counter>::default();
        let cert_expiry = Family::<CertLabels, Gauge<f64, AtomicU64>>::default();
        let leader = Gauge::default();
        let queue_depth = Family::<KindLabels, Gauge>::default();
        registry.register(
            "queue_depth",
            "Objects waiting to be reconciled: metadata.generation not yet reflected in status.observedGeneration (from the controller's cache)",
            queue_depth.clone(),
        );
        let mut process = Registry::default();
        process.register_collector(Box::new(process_metrics::ProcessCollector));
        registry.register(
            "reconciles",
            "Reconciles started, by resource kind",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by kind and error",
            errors.clone(),
        );
        registry.register_with_unit(
            "reconcile_duration",
            "Time one reconcile took",
            prometheus_client::registry::Unit::Seconds,
            duration.clone(),
        );
        registry.register(
            "reconciles_in_flight",
            "Reconciles running now (the work the controller queue hands out)",
            in_flight.clone(),
        );
        registry.register(
            "api_writes",
            "Requests that change state (POST/PUT/PATCH/DELETE) sent to the API server, by verb and resource",
            api_writes.clone(),
        );
        registry.register_with_unit(
            "certificate_expiry_timestamp",
            "Unix time at which each certificate the operator issued expires",
            prometheus_client::registry::Unit::Seconds,
            cert_expiry.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            leader.clone(),
        );
        for kind in [crate::kms::KIND, crate::zone::KIND, crate::pool::KIND] {
            drop(reconciles.get_or_create(&KindLabels { kind: kind.into() }));
            for error in crate::Error::METRIC_LABELS {
                drop(errors.get_or_create(&ErrorLabels {
                    kind: kind.into(),
                    error: error.into(),
                }));
            }
        }
        Self {
            registry,
            process,
            queue_depth,
            backlog: Mutex::new(Vec::new()),
            reconciles,
            errors,
            duration,
            in_flight,
            api_writes,
            cert_expiry,
            leader,
        }
    }
}

impl Metrics {
    /// Counts a reconcile and measures it until the guard drops.
    pub fn reconcile(&self, kind: &str) -> ReconcileTimer<'_> {
        let labels = KindLabels { kind: kind.into() };
        self.reconciles.get_or_create(&labels).inc();
        self.in_flight.get_or_create(&labels).inc();
        ReconcileTimer {
            metrics: self,
            labels,
            start: Instant::now(),
        }
    }

    pub fn error(&self, kind: &str, error: &crate::Error) {
        self.errors
            .get_or_create(&ErrorLabels {
                kind: kind.into(),
                error: error.metric_label().into(),
            })
            .inc();
    }

    /// Registers what [`Self::queue_depth`] reports for `kind`.
    pub fn set_backlog_probe(&self, kind: &str, probe: BacklogProbe) {
        let mut b = self.backlog.lock().unwrap_or_else(|e| e.into_inner());
        b.retain(|(k, _)| k != kind);
        b.push((kind.to_string(), probe));
    }

    /// Text exposition of every metric.
    pub fn encode(&self) -> String {
        for (kind, probe) in self
            .backlog
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            self.queue_depth
                .get_or_create(&KindLabels { kind: kind.clone() })
                .set(probe());
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &self.registry);
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &self.process);
        let _ = prometheus_client::encoding::text::encode_eof(&mut out);
        out
    }

    /// Total writes so far, optionally leaving Lease renewals out (they are the leader's
    /// heartbeat, not reconcile work).
    pub fn writes(&self, include_leases: bool) -> u64 {
        // Family has no iterator; the exposition is the public view anyway.
        self.encode()
            .lines()
            .filter(|l| l.starts_with("conclave_operator_api_writes_total{"))
            .filter(|l| include_leases || !l.contains("resource=\"leases\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    labels: KindLabels,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .duration
            .get_or_create(&self.labels)
            .observe(self.start.elapsed().as_secs_f64());
        self.metrics.in_flight.get_or_create(&self.labels).dec();
    }
}

/// Resource name of an API path: `/api/v1/namespaces/ns/secrets/x` -> `secrets`,
/// `/apis/conclave.dev/v1alpha1/namespaces/ns/meetingzones/z/status` -> `meetingzones/status`.
pub fn resource_of(path: &str) -> String {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let rest = match segs.first() {
        Some(&"api") => segs.get(2..),
        Some(&"apis") => segs.get(3..),
        _ => None,
    }
    .unwrap_or(&[]);
    let rest = if rest.first() == Some(&"namespaces") && rest.len() > 2 {
        &rest[2..]
    } else {
        rest
    };
    match rest {
        [res] | [res, _] => (*res).to_string(),
        [res, _, sub, ..] => format!("{res}/{sub}"),
        [] => "unknown".into(),
    }
}

/// tower layer that counts write requests into [`Metrics::api_writes`].
#[derive(Clone, Debug)]
pub struct CountWrites(pub Arc<Metrics>);

impl<S> tower::Layer<S> for CountWrites {
    type Service = CountWritesService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CountWritesService {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct CountWritesService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B> tower::Service<Request<B>> for CountWritesService<S>
where
    S: tower::Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let m = req.method();
        if m == Method::POST || m == Method::PUT || m == Method::PATCH || m == Method::DELETE {
            self.metrics
                .api_writes
                .get_or_create(&WriteLabels {
                    verb: m.as_str().to_ascii_lowercase(),
                    resource: resource_of(req.uri().path()),
                })
                .inc();
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_are_named_from_paths() {
        assert_eq!(resource_of("/api/v1/namespaces/a/secrets/x"), "secrets");
        assert_eq!(resource_of("/api/v1/namespaces/a/secrets"), "secrets");
        assert_eq!(
            resource_of("/apis/conclave.dev/v1alpha1/namespaces/a/meetingzones/z/status"),
            "meetingzones/status"
        );
        assert_eq!(
            resource_of("/apis/coordination.k8s.io/v1/namespaces/a/leases/l"),
            "leases"
        );
        assert_eq!(
            resource_of("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/x"),
            "customresourcedefinitions"
        );
        assert_eq!(resource_of("/healthz"), "unknown");
    }

    #[test]
    fn exposition_has_prefixed_names_and_counts_writes() {
        let m = Metrics::default();
        drop(m.reconcile("MeetingZone"));
        m.api_writes
            .get_or_create(&WriteLabels {
                verb: "patch".into(),
                resource: "secrets".into(),
            })
            .inc();
        m.api_writes
            .get_or_create(&WriteLabels {
                verb: "put".into(),
                resource: "leases".into(),
            })
            .inc_by(3);
        let text = m.encode();
        assert!(
            text.contains("conclave_operator_reconciles_total{kind=\"MeetingZone\"} 1"),
            "{text}"
        );
        // Error series exist at 0 before any error, for every kind and error label.
        assert!(text.contains(
            "conclave_operator_reconcile_errors_total{kind=\"ConnectorPool\",error=\"kube\"} 0"
        ));
        assert_eq!(
            text.matches("conclave_operator_reconcile_errors_total{")
                .count(),
            3 * crate::Error::METRIC_LABELS.len()
        );
        assert!(text.contains(
            "conclave_operator_reconcile_duration_seconds_count{kind=\"MeetingZone\"} 1"
        ));
        assert_eq!(m.writes(false), 1);
        assert_eq!(m.writes(true), 4);
    }

    #[test]
    fn dashboard_metric_names_are_exported() {
        let m = Metrics::default();
        m.set_backlog_probe("MeetingZone", Box::new(|| 7));
        drop(m.reconcile("MeetingZone"));
        m.error("MeetingZone", &crate::Error::MissingField("x"));
        m.cert_expiry
            .get_or_create(&CertLabels {
                namespace: "ns".into(),
                secret: "s".into(),
            })
            .set(1.0e9);
        let text = m.encode();
        for name in [
            "conclave_operator_queue_depth{kind=\"MeetingZone\"} 7",
            "conclave_operator_reconciles_in_flight{kind=\"MeetingZone\"} 0",
            "conclave_operator_leader 0",
            "conclave_operator_certificate_expiry_timestamp_seconds{namespace=\"ns\",secret=\"s\"}",
            "conclave_operator_reconcile_duration_seconds_bucket{",
            "conclave_operator_reconcile_errors_total{kind=\"MeetingZone\",error=\"missing_field\"} 1",
            "\nprocess_cpu_seconds_total ",
            "\nprocess_resident_memory_bytes ",
            "\nprocess_start_time_seconds ",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        assert_eq!(text.matches("# EOF").count(), 1);
        assert!(text.trim_end().ends_with("# EOF"));
    }
}
