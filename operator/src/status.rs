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
