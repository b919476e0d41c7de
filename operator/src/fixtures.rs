//! Test helpers: resources built fluently, and an in-memory API server behind a tower-test
//! mock that records every call a reconcile makes.

use crate::context::{Capabilities, Context, Settings};
use crate::kms::{KeyManagementServer, KeyManagementServerSpec};
use crate::metrics::Metrics;
use crate::pool::{ConnectorPool, ConnectorPoolSpec, RecordingSettings};
use crate::shared::{ConnectorType, LocalRef};
use crate::zone::{MeetingZone, MeetingZoneSpec};
use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::{Client, Resource};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

pub const NS: &str = "team";
/// The operator's own namespace, where CA keys are kept.
pub const OPERATOR_NS: &str = "conclave-system";

fn with_meta<K: Resource>(mut k: K, name: &str) -> K {
    let m = k.meta_mut();
    m.namespace = Some(NS.into());
    m.uid = Some(format!("uid-{name}"));
    m.generation = Some(1);
    k
}

pub fn kms(name: &str) -> KeyManagementServer {
    let spec: KeyManagementServerSpec = serde_json::from_value(json!({})).unwrap();
    let mut k = with_meta(KeyManagementServer::new(name, spec), name);
    k.meta_mut().finalizers = Some(vec![crate::kms::FINALIZER.into()]);
    k
}

pub fn zone(name: &str, kms: &str) -> MeetingZone {
    let spec: MeetingZoneSpec = serde_json::from_value(json!({"kmsRef": {"name": kms}, "relays": {"replicas": 2}, "encryption": {"allowedConnectors": ["recording"]}})).unwrap();
    with_meta(MeetingZone::new(name, spec), name)
}

pub fn pool(name: &str, zone: &str) -> ConnectorPool {
    let spec = ConnectorPoolSpec {
        zone_ref: Some(LocalRef { name: zone.into() }),
        external_kms: None,
        connector_type: ConnectorType::Recording,
        replicas: 1,
        recording: Some(RecordingSettings {
            storage_size: "1Gi".into(),
            storage_class_name: None,
            retention: "720h".into(),
        }),
        live_streaming: None,
        telephony: None,
        room_system: None,
        image: None,
        resources: None,
        placement: Default::default(),
        certificate_lifetime: None,
    };
    with_meta(ConnectorPool::new(name, spec), name)
}

/// One request the fake API server saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    pub method: Method,
    pub path: String,
}

impl Call {
    pub fn is_write(&self) -> bool {
        self.method != Method::GET
    }
}

/// An API server keeping objects by path, good enough for reconciles: GET, LIST (with
/// label selectors), POST, server-side-apply PATCH (stores the applied object), status PATCH
/// (merges status), JSON PATCH (answers with the stored object), DELETE.
///
/// [`FakeApi::serve`] also serves it over HTTP with cluster-wide lists and watches, so the real
/// operator binary can run against it (the benchmark does).
#[derive(Debug, Default)]
pub struct FakeApi {
    pub objects: Mutex<BTreeMap<String, Value>>,
    pub calls: Mutex<Vec<Call>>,
    /// Last resourceVersion handed out.
    version: std::sync::atomic::AtomicU64,
    /// Open watches: every change is sent to each as (event type, path, object).
    watchers: Mutex<Vec<tokio::sync::mpsc::UnboundedSender<(String, String, Value)>>>,
    /// Paths whose requests are never answered (through [`context`]'s client).
    stalled: Mutex<BTreeSet<String>>,
}

/// A namespaced collection path without its `/namespaces/<ns>`: the cluster-wide collection.
fn without_namespace(path: &str) -> String {
    let segs: Vec<&str> = path.split('/').collect();
    match segs.iter().position(|s| *s == "namespaces") {
        Some(i) if segs.len() > i + 2 => {
            let mut v = segs[..i].to_vec();
            v.extend_from_slice(&segs[i + 2..]);
            v.join("/")
        }
        _ => path.to_string(),
    }
}

fn collection_and_name(path: &str) -> (String, String) {
    match path.rsplit_once('/') {
        Some((c, n)) => (c.to_string(), n.to_string()),
        None => (String::new(), path.to_string()),
    }
}

fn not_found() -> Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"});
    Response::builder()
        .status(StatusCode::NOT_FOUND)
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

/// A stored string is served as plain text (a proxied /metrics), anything else as JSON.
fn ok(v: &Value) -> Response<Body> {
    let body = match v {
        Value::String(text) => text.clone().into_bytes(),
        _ => serde_json::to_vec(v).unwrap(),
    };
    Response::builder().body(Body::from(body)).unwrap()
}

fn labels_match(obj: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        obj["metadata"]["labels"][k].as_str() == Some(v)
    })
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k == key).then(|| {
            v.replace("%3D", "=")
                .replace("%2C", ",")
                .replace("%2F", "/")
        })
    })
}

impl FakeApi {
    /// Requests for `path` get no answer from now on, as from a peer that went silent.
    pub fn stall(&self, path: &str) {
        self.stalled.lock().unwrap().insert(path.into());
    }

    pub fn put(&self, path: &str, obj: Value) {
        self.objects.lock().unwrap().insert(path.into(), obj);
    }

    /// Stores `obj` as a client would create it: with a resourceVersion, announced to watches.
    pub fn create(&self, path: &str, mut obj: Value) {
        self.stamp(&mut obj);
        self.objects
            .lock()
            .unwrap()
            .insert(path.into(), obj.clone());
        self.notify("ADDED", path, &obj);
    }

    fn stamp(&self, obj: &mut Value) -> u64 {
        let rv = self
            .version
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if obj["metadata"].is_object() {
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        }
        rv
    }

    /// Every later change as (event type, path, object).
    pub fn subscribe(&self) -> tokio::sync::mpsc::UnboundedReceiver<(String, String, Value)> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.watchers.lock().unwrap().push(tx);
        rx
    }

    fn notify(&self, kind: &str, path: &str, obj: &Value) {
        self.watchers
            .lock()
            .unwrap()
            .retain(|w| w.send((kind.into(), path.into(), obj.clone())).is_ok());
    }

    /// Serves the API over plain HTTP on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let api = self.clone();
            async move { api.http(req).await }
        });
        axum::serve(listener, app).await
    }

    async fn http(self: Arc<Self>, req: axum::extract::Request) -> axum::response::Response {
        use futures::StreamExt;
        let (parts, body) = req.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX)
            .await
            .unwrap_or_default();
        let query = parts.uri.query().unwrap_or("").to_string();
        let path = parts.uri.path().to_string();
        let watching = query_param(&query, "watch").is_some_and(|w| w == "true" || w == "1");
        if parts.method == Method::GET && watching {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            self.watchers.lock().unwrap().push(tx);
            let selector = query_param(&query, "labelSelector").unwrap_or_default();
            let stream = futures::stream::unfold(rx, |mut rx| async move {
                let ev = rx.recv().await?;
                Some((ev, rx))
            })
            .filter_map(move |(kind, p, obj)| {
                let (coll, _) = collection_and_name(&p);
                let hit = (coll == path || without_namespace(&coll) == path)
                    && labels_match(&obj, &selector);
                futures::future::ready(hit.then(|| {
                    let mut line = serde_json::to_vec(&json!({"type": kind, "object": obj}))
                        .unwrap_or_default();
                    line.push(b'\n');
                    Ok::<_, std::convert::Infallible>(line)
                }))
            });
            return axum::response::Response::new(axum::body::Body::from_stream(stream));
        }
        let (status, body) = self.respond(parts.method, path, query, &bytes).await;
        let mut resp = axum::response::Response::new(axum::body::Body::from(body));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        resp
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.objects.lock().unwrap().get(path).cloned()
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    pub fn writes(&self) -> Vec<Call> {
        self.calls().into_iter().filter(Call::is_write).collect()
    }

    pub fn clear_calls(&self) {
        self.calls.lock().unwrap().clear();
    }

    async fn handle(&self, req: Request<Body>) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let body = req.into_body().collect_bytes().await.unwrap();
        let (status, body) = self.respond(method, path, query, &body).await;
        Response::builder()
            .status(status)
            .body(Body::from(body))
            .unwrap()
    }

    async fn respond(
        &self,
        method: Method,
        path: String,
        query: String,
        body: &[u8],
    ) -> (StatusCode, Vec<u8>) {
        let r = self.respond_inner(method, path, query, body);
        (
            r.status(),
            r.into_body().collect_bytes().await.unwrap().to_vec(),
        )
    }

    fn respond_inner(
        &self,
        method: Method,
        path: String,
        query: String,
        body: &[u8],
    ) -> Response<Body> {
        self.calls.lock().unwrap().push(Call {
            method: method.clone(),
            path: path.clone(),
        });
        let mut objects = self.objects.lock().unwrap();
        match method {
            Method::GET => {
                if let Some(o) = objects.get(&path) {
                    return ok(o);
                }
                if path.contains("/proxy/") {
                    return not_found();
                }
                // A collection: list what lies directly under it.
                let selector = query_param(&query, "labelSelector").unwrap_or_default();
                let items: Vec<Value> = objects
                    .iter()
                    .filter(|(p, o)| {
                        let coll = collection_and_name(p).0;
                        (coll == path || without_namespace(&coll) == path)
                            && labels_match(o, &selector)
                    })
                    .map(|(_, o)| o.clone())
                    .collect();
                let segs = path.trim_start_matches('/').split('/').count();
                let collection = match (path.starts_with("/api/"), path.contains("/namespaces/")) {
                    (true, true) => segs == 5,
                    (true, false) => segs == 3,
                    (false, true) => segs == 6,
                    (false, false) => segs == 4,
                };
                if collection {
                    let rv = self
                        .version
                        .load(std::sync::atomic::Ordering::Relaxed)
                        .max(1);
                    ok(
                        &json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
                    )
                } else {
                    not_found()
                }
            }
            Method::POST => {
                let mut obj: Value = serde_json::from_slice(body).unwrap();
                let name = obj["metadata"]["name"]
                    .as_str()
                    .unwrap_or("event")
                    .to_string();
                if !path.ends_with("/events") {
                    self.stamp(&mut obj);
                    let at = format!("{path}/{name}");
                    objects.insert(at.clone(), obj.clone());
                    self.notify("ADDED", &at, &obj);
                }
                ok(&obj)
            }
            Method::PATCH => {
                let patch: Value = serde_json::from_slice(body).unwrap();
                if let Some(parent) = path.strip_suffix("/status") {
                    let Some(o) = objects.get_mut(parent) else {
                        return not_found();
                    };
                    o["status"] = patch["status"].clone();
                    let mut o = o.clone();
                    self.stamp(&mut o);
                    objects.insert(parent.to_string(), o.clone());
                    self.notify("MODIFIED", parent, &o);
                    return ok(&o);
                }
                if patch.is_array() {
                    // JSON patch (finalizers): answer with the stored object.
                    return objects.get(&path).map(ok).unwrap_or_else(not_found);
                }
                let mut obj = patch;
                if let Some(st) = objects.get(&path).and_then(|old| old.get("status")) {
                    obj["status"] = st.clone();
                }
                obj["metadata"]["generation"] = json!(1);
                let kind = if objects.contains_key(&path) {
                    "MODIFIED"
                } else {
                    "ADDED"
                };
                self.stamp(&mut obj);
                objects.insert(path.clone(), obj.clone());
                self.notify(kind, &path, &obj);
                ok(&obj)
            }
            Method::DELETE => match objects.remove(&path) {
                Some(o) => {
                    self.notify("DELETED", &path, &o);
                    ok(&o)
                }
                None => not_found(),
            },
            _ => not_found(),
        }
    }
}

/// A Context whose client talks to a [`FakeApi`], served until the test ends.
pub fn context(caps: Capabilities) -> (Arc<Context>, Arc<FakeApi>) {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let fake = Arc::new(FakeApi::default());
    let server = fake.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            if server.stalled.lock().unwrap().contains(req.uri().path()) {
                // Keeping the responder open (not dropping it) is what leaves the caller waiting.
                tokio::spawn(async move {
                    let _responder = send;
                    std::future::pending::<()>().await
                });
                continue;
            }
            send.send_response(server.handle(req).await);
        }
    });
    let client = Client::new(svc, NS);
    let settings = Settings {
        ca_namespace: Some(OPERATOR_NS.into()),
        ..Settings::default()
    };
    (
        Arc::new(Context::new(
            client,
            Arc::new(Metrics::default()),
            settings,
            caps,
        )),
        fake,
    )
}

/// API path of a namespaced object.
pub fn path(group_version: &str, plural: &str, name: &str) -> String {
    let base = if group_version == "v1" {
        "/api/v1".to_string()
    } else {
        format!("/apis/{group_version}")
    };
    format!("{base}/namespaces/{NS}/{plural}/{name}")
}

/// Bounds a test future.
pub async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(std::time::Duration::from_secs(20), f)
        .await
        .expect("test timed out")
}
