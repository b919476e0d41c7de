//! Server-side apply that only writes when the live object differs from what we want.
//!
//! Steady state must cost no writes: before applying, the live object is read and compared
//! with the desired one. The comparison is "desired is contained in live": fields the server
//! or other controllers add (defaults, status, annotations) do not count as differences, while
//! an edit or deletion of a field we own does, and is reverted by a forced apply.

use crate::{FIELD_MANAGER, Result};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::fmt::Debug;

/// What [`apply`] did.
#[derive(Debug)]
pub enum Applied<K> {
    /// Live object already matched; nothing was sent.
    Unchanged(K),
    /// The object was created or updated.
    Changed(K),
}

impl<K> Applied<K> {
    pub fn object(&self) -> &K {
        match self {
            Applied::Unchanged(k) | Applied::Changed(k) => k,
        }
    }
    pub fn changed(&self) -> bool {
        matches!(self, Applied::Changed(_))
    }
}

pub fn params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// Applies `desired` unless `live` (if known) already contains it.
pub async fn apply_over<K>(api: &Api<K>, desired: &K, live: Option<K>) -> Result<Applied<K>>
where
    K: Resource + Serialize + DeserializeOwned + Clone + Debug,
    K::DynamicType: Default,
{
    let want = serde_json::to_value(desired)?;
    if let Some(live) = live
        && contains(&serde_json::to_value(&live)?, &want)
    {
        return Ok(Applied::Unchanged(live));
    }
    let name = desired.name_any();
    let obj = api.patch(&name, &params(), &Patch::Apply(desired)).await?;
    tracing::info!(name, "applied child");
    Ok(Applied::Changed(obj))
}

/// Reads the live object, then applies `desired` if it differs.
pub async fn apply<K>(api: &Api<K>, desired: &K) -> Result<Applied<K>>
where
    K: Resource + Serialize + DeserializeOwned + Clone + Debug,
    K::DynamicType: Default,
{
    let live = api.get_opt(&desired.name_any()).await?;
    apply_over(api, desired, live).await
}

/// Deletes `name` if it exists (a read first, so absent objects cost no write).
pub async fn delete_if_exists<K>(api: &Api<K>, name: &str) -> Result<bool>
where
    K: Resource + DeserializeOwned + Clone + Debug,
{
    if api.get_opt(name).await?.is_none() {
        return Ok(false);
    }
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Whether every field of `want` is present with an equal value in `live`.
///
/// Arrays must have the same length and match element by element. Empty arrays, empty maps
/// and nulls in `want` match an absent field (the server drops them). Strings that both parse
/// as Kubernetes quantities compare by value (`500m` == `0.5`), as the server canonicalises them.
pub fn contains(live: &Value, want: &Value) -> bool {
    match (live, want) {
        (_, Value::Null) => true,
        (Value::Object(l), Value::Object(w)) => w.iter().all(|(k, wv)| match l.get(k) {
            Some(lv) => contains(lv, wv),
            None => is_empty(wv),
        }),
        (Value::Array(l), Value::Array(w)) => {
            l.len() == w.len() && l.iter().zip(w).all(|(lv, wv)| contains(lv, wv))
        }
        (Value::String(l), Value::String(w)) => {
            l == w
                || matches!(
                    (crate::shared::parse_quantity(l), crate::shared::parse_quantity(w)),
                    (Some(a), Some(b)) if (a - b).abs() <= f64::EPSILON * a.abs().max(1.0)
                )
        }
        (Value::Null, w) => is_empty(w),
        (l, w) => l == w,
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::contains;
    use serde_json::json;

    #[test]
    fn server_defaults_do_not_count_as_drift() {
        let want = json!({"spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "a", "image": "x"}]}}}});
        let live = json!({"spec": {"replicas": 1, "revisionHistoryLimit": 10,
            "template": {"spec": {"containers": [{"name": "a", "image": "x", "imagePullPolicy": "IfNotPresent"}], "dnsPolicy": "ClusterFirst"}}},
            "status": {"readyReplicas": 1}});
        assert!(contains(&live, &want));
    }

    #[test]
    fn edits_and_removals_of_our_fields_count() {
        let want = json!({"spec": {"replicas": 2, "ports": [{"port": 1}, {"port": 2}]}});
        assert!(!contains(
            &json!({"spec": {"replicas": 3, "ports": [{"port": 1}, {"port": 2}]}}),
            &want
        ));
        assert!(!contains(
            &json!({"spec": {"replicas": 2, "ports": [{"port": 1}]}}),
            &want
        ));
        assert!(!contains(
            &json!({"spec": {"ports": [{"port": 1}, {"port": 2}]}}),
            &want
        ));
        assert!(!contains(
            &json!({"metadata": {"labels": {}}}),
            &json!({"metadata": {"labels": {"a": "b"}}})
        ));
    }

    #[test]
    fn empty_values_match_absent_fields_and_quantities_compare_by_value() {
        assert!(contains(
            &json!({}),
            &json!({"tolerations": [], "nodeSelector": {}, "x": null})
        ));
        assert!(contains(
            &json!({"cpu": "500m", "memory": "1Gi"}),
            &json!({"cpu": "0.5", "memory": "1024Mi"})
        ));
        assert!(!contains(&json!({"cpu": "600m"}), &json!({"cpu": "0.5"})));
        assert!(!contains(
            &json!({"image": "a:1"}),
            &json!({"image": "a:2"})
        ));
    }
}
