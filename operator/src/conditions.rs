//! Status conditions Ready, Progressing and Degraded.
//!
//! A condition's lastTransitionTime changes only when its status changes; everything else
//! (reason, message, observedGeneration) is updated in place. Equal inputs give an equal
//! status, so an unchanged world produces no status write.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

/// Reasons shared by all resources.
pub mod reason {
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const RECONCILED: &str = "Reconciled";
    pub const ROLLING_OUT: &str = "RollingOut";
    pub const PODS_READY: &str = "PodsReady";
    pub const PODS_NOT_READY: &str = "PodsNotReady";
    pub const DEPENDENCY_MISSING: &str = "DependencyMissing";
    pub const DEPENDENCY_NOT_READY: &str = "DependencyNotReady";
    pub const DELETION_BLOCKED: &str = "DeletionBlocked";
    pub const AS_EXPECTED: &str = "AsExpected";
    pub const SCALED_TO_ZERO: &str = "ScaledToZero";
}

/// What one reconcile concluded, before it is turned into conditions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assessment {
    pub ready: Verdict,
    pub progressing: Verdict,
    pub degraded: Verdict,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl Verdict {
    pub fn new(status: bool, reason: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

impl Assessment {
    /// The spec is refused: not ready, not progressing, degraded, all saying why.
    pub fn invalid(message: &str) -> Self {
        Self {
            ready: Verdict::new(false, reason::INVALID_SPEC, message),
            progressing: Verdict::new(false, reason::INVALID_SPEC, message),
            degraded: Verdict::new(true, reason::INVALID_SPEC, message),
        }
    }

    /// Ready when `ready >= want`; progressing while they differ.
    pub fn from_counts(kind: &str, ready: i32, want: i32, notes: &[String]) -> Self {
        let note = if notes.is_empty() {
            String::new()
        } else {
            format!("; {}", notes.join("; "))
        };
        if want == 0 {
            return Self {
                ready: Verdict::new(
                    true,
                    reason::SCALED_TO_ZERO,
                    format!("0 {kind} requested{note}"),
                ),
                progressing: Verdict::new(false, reason::RECONCILED, "nothing to roll out"),
                degraded: Verdict::new(false, reason::AS_EXPECTED, "no problem found"),
            };
        }
        let counts = format!("{ready}/{want} {kind} ready{note}");
        if ready >= want {
            Self {
                ready: Verdict::new(true, reason::PODS_READY, counts),
                progressing: Verdict::new(false, reason::RECONCILED, "all children up to date"),
                degraded: Verdict::new(false, reason::AS_EXPECTED, "no problem found"),
            }
        } else {
            Self {
                ready: Verdict::new(false, reason::PODS_NOT_READY, counts.clone()),
                progressing: Verdict::new(true, reason::ROLLING_OUT, counts),
                degraded: Verdict::new(false, reason::AS_EXPECTED, "no problem found"),
            }
        }
    }
}

/// Builds the condition list from an assessment, keeping transition times of conditions whose
/// status did not change. `now` is passed in so tests are deterministic.
pub fn conditions(
    previous: &[Condition],
    a: &Assessment,
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    [
        (READY, &a.ready),
        (PROGRESSING, &a.progressing),
        (DEGRADED, &a.degraded),
    ]
    .into_iter()
    .map(|(type_, v)| {
        let status = if v.status { "True" } else { "False" }.to_string();
        let last_transition_time = previous
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or(Time(now));
        Condition {
            type_: type_.into(),
            status,
            reason: v.reason.clone(),
            message: v.message.clone(),
            observed_generation: generation,
            last_transition_time,
        }
    })
    .collect()
}

/// The Ready condition, if any.
pub fn ready(conditions: &[Condition]) -> Option<&Condition> {
    conditions.iter().find(|c| c.type_ == READY)
}

/// Whether a resource reports Ready=True.
pub fn is_ready(conditions: &[Condition]) -> bool {
    ready(conditions).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn transition_time_changes_only_when_status_changes() {
        let a = Assessment::from_counts("relays", 0, 2, &[]);
        let first = conditions(&[], &a, Some(1), t("2026-01-01T00:00:00Z"));
        assert_eq!(first.len(), 3);
        assert_eq!(ready(&first).unwrap().status, "False");

        // same status, new message: time kept
        let a2 = Assessment::from_counts("relays", 1, 2, &[]);
        let second = conditions(&first, &a2, Some(1), t("2026-01-01T00:01:00Z"));
        assert_eq!(
            ready(&second).unwrap().last_transition_time.0,
            t("2026-01-01T00:00:00Z")
        );
        assert_eq!(ready(&second).unwrap().message, "1/2 relays ready");

        // Ready flips: its time moves, Degraded's does not
        let a3 = Assessment::from_counts("relays", 2, 2, &[]);
        let third = conditions(&second, &a3, Some(2), t("2026-01-01T00:02:00Z"));
        assert_eq!(
            ready(&third).unwrap().last_transition_time.0,
            t("2026-01-01T00:02:00Z")
        );
        let deg = third.iter().find(|c| c.type_ == DEGRADED).unwrap();
        assert_eq!(deg.last_transition_time.0, t("2026-01-01T00:00:00Z"));
        assert!(third.iter().all(|c| c.observed_generation == Some(2)));
        assert!(is_ready(&third));
    }

    #[test]
    fn same_inputs_give_identical_conditions() {
        let a = Assessment::invalid("spec.replicas: must be 1");
        let first = conditions(&[], &a, Some(3), t("2026-01-01T00:00:00Z"));
        let again = conditions(&first, &a, Some(3), t("2026-01-02T00:00:00Z"));
        assert_eq!(first, again);
        assert_eq!(ready(&first).unwrap().reason, "InvalidSpec");
    }
}
