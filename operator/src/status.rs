//! Writing status (server-side apply, only when it changed) and announcing transitions.

use crate::apply::params;
use crate::conditions::{self, reason};
use crate::context::Context;
use crate::{Error, Result};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, Patch};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;

/// Applies `new` as the status of `obj` unless it equals `old`. Returns whether it wrote.
pub async fn write<K, S>(ctx: &Context, obj: &K, old: Option<&S>, new: &S) -> Result<bool>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + DeserializeOwned
        + Clone
        + Debug,
    S: Serialize + PartialEq,
{
    if old == Some(new) {
        return Ok(false);
    }
    let ns = obj.namespace().ok_or(Error::MissingField("namespace"))?;
    // Which fields changed is what an operator's user (and the idle-writes test) asks first
    // when a status write surprises them; the values themselves may be long, so only names.
    tracing::info!(
        kind = %K::kind(&()),
        namespace = %ns,
        name = %obj.name_any(),
        fields = %changed_fields(old, new).join(","),
        "status updated"
    );
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": new,
    });
    api.patch_status(&obj.name_any(), &params(), &Patch::Apply(&patch))
        .await?;
    Ok(true)
}

/// Top-level status fields that differ between `old` and `new` (all of `new`'s when there was
/// none). Changed conditions are named with what moved, since a condition flipping without an
/// apparent cause is the usual surprise: `conditions(Ready: True/PodsReady -> False/PodsNotReady)`.
fn changed_fields<S: Serialize>(old: Option<&S>, new: &S) -> Vec<String> {
    let to_map = |s: &S| match serde_json::to_value(s) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    let new = to_map(new);
    let old = old.map(to_map).unwrap_or_default();
    let mut keys: Vec<String> = new
        .keys()
        .chain(old.keys())
        .filter(|k| new.get(*k) != old.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .map(|k| match (k.as_str(), old.get(&k), new.get(&k)) {
            ("conditions", Some(o), Some(n)) => format!("conditions({})", condition_changes(o, n)),
            _ => k,
        })
        .collect()
}

/// `Type: status/reason -> status/reason` for each condition that changed; `Type: message` or
/// `Type: other fields` when only those did.
fn condition_changes(old: &serde_json::Value, new: &serde_json::Value) -> String {
    let by_type = |v: &serde_json::Value| -> std::collections::BTreeMap<String, serde_json::Value> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| Some((c.get("type")?.as_str()?.to_owned(), c.clone())))
            .collect()
    };
    let (old, new) = (by_type(old), by_type(new));
    let field = |c: Option<&serde_json::Value>, f: &str| {
        c.and_then(|c| c.get(f))
            .and_then(|v| v.as_str())
            .unwrap_or("-")
            .to_owned()
    };
    let types: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    types
        .into_iter()
        .filter(|t| old.get(*t) != new.get(*t))
        .map(|t| {
            let (o, n) = (old.get(t), new.get(t));
            let state = |c| format!("{}/{}", field(c, "status"), field(c, "reason"));
            if state(o) != state(n) {
                format!("{t}: {} -> {}", state(o), state(n))
            } else if field(o, "message") != field(n, "message") {
                format!("{t}: message")
            } else {
                format!("{t}: other fields")
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Publishes an event when the Ready condition changed status or reason.
pub async fn announce<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    obj: &K,
    old: &[Condition],
    new: &[Condition],
) {
    let (Some(n), o) = (conditions::ready(new), conditions::ready(old)) else {
        return;
    };
    if o.is_some_and(|o| o.status == n.status && o.reason == n.reason && o.message == n.message) {
        return;
    }
    let warning = n.status != "True"
        && matches!(
            n.reason.as_str(),
            reason::INVALID_SPEC | reason::DEPENDENCY_MISSING | reason::DELETION_BLOCKED
        );
    let action = if n.status == "True" {
        "Ready"
    } else {
        "NotReady"
    };
    ctx.event(obj, warning, &n.reason, action, n.message.clone())
        .await;
}

/// Now, truncated to whole seconds as the API stores condition times.
pub fn now() -> k8s_openapi::jiff::Timestamp {
    let s = k8s_openapi::jiff::Timestamp::now().as_second();
    k8s_openapi::jiff::Timestamp::from_second(s)
        .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now())
}

#[cfg(test)]
mod tests {
    use super::changed_fields;
    use serde::Serialize;

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct S {
        ready_replicas: i32,
        #[serde(skip_serializing_if = "Option::is_none")]
        active_sessions: Option<i64>,
    }

    #[test]
    fn names_only_the_fields_that_differ() {
        let old = S {
            ready_replicas: 1,
            active_sessions: None,
        };
        let new = S {
            ready_replicas: 1,
            active_sessions: Some(0),
        };
        assert_eq!(changed_fields(Some(&old), &new), ["activeSessions"]);
        assert_eq!(changed_fields(Some(&new), &old), ["activeSessions"]);
        assert_eq!(
            changed_fields(None, &new),
            ["activeSessions", "readyReplicas"]
        );
        assert!(changed_fields(Some(&new), &new).is_empty());
    }

    #[derive(Clone, Serialize)]
    struct WithConditions {
        conditions: Vec<serde_json::Value>,
    }

    fn condition(type_: &str, status: &str, reason: &str, message: &str) -> serde_json::Value {
        serde_json::json!({"type": type_, "status": status, "reason": reason, "message": message})
    }

    #[test]
    fn names_the_conditions_that_changed_and_how() {
        let old = WithConditions {
            conditions: vec![
                condition("Ready", "True", "PodsReady", "1/1 replicas ready"),
                condition("Degraded", "False", "AsExpected", "no problem found"),
                condition(
                    "Progressing",
                    "False",
                    "Reconciled",
                    "all children up to date",
                ),
            ],
        };
        let mut new = old.clone();
        new.conditions[0] = condition("Ready", "False", "PodsNotReady", "0/1 replicas ready");
        new.conditions[1] = condition("Degraded", "False", "AsExpected", "root key generated");
        assert_eq!(
            changed_fields(Some(&old), &new),
            ["conditions(Degraded: message; Ready: True/PodsReady -> False/PodsNotReady)"]
        );
        let fewer = WithConditions {
            conditions: new.conditions[..2].to_vec(),
        };
        assert_eq!(
            changed_fields(Some(&fewer), &new),
            ["conditions(Progressing: -/- -> False/Reconciled)"]
        );
        assert_eq!(changed_fields(None, &new), ["conditions"]);
    }
}
