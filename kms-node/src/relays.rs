//! Relay registry and meeting placement (pure; time is an input).
//!
//! A relay is *live* while its heartbeats keep coming; only live, ready
//! relays with spare capacity get new meetings, least loaded first.

use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relay {
    pub id: String,
    pub zone: String,
    pub address: String,
    pub capacity: u32,
    /// Participants the relay reported at its last heartbeat.
    pub load: u32,
    /// Participants placed on it since that heartbeat (not yet in `load`).
    pub pending: u32,
    pub ready: bool,
    pub last_seen_ms: u64,
    /// The relay process that registered last (random per process start;
    /// None from relays too old to send one).
    pub instance: Option<String>,
}

#[derive(Debug, Default)]
pub struct Relays {
    relays: BTreeMap<String, Relay>,
    timeout_ms: u64,
}

impl Relays {
    pub fn new(timeout_ms: u64) -> Self {
        Self {
            relays: BTreeMap::new(),
            timeout_ms,
        }
    }

    pub fn register(
        &mut self,
        id: String,
        zone: String,
        address: String,
        capacity: u32,
        instance: Option<String>,
        now_ms: u64,
    ) {
        self.relays.insert(
            id.clone(),
            Relay {
                id,
                zone,
                address,
                capacity,
                load: 0,
                pending: 0,
                ready: true,
                last_seen_ms: now_ms,
                instance,
            },
        );
    }

    /// Records a heartbeat; false if the relay is unknown (it must register).
    pub fn heartbeat(&mut self, id: &str, load: u32, ready: bool, now_ms: u64) -> bool {
        match self.relays.get_mut(id) {
            Some(r) => {
                r.load = load;
                r.pending = 0;
                r.ready = ready;
                r.last_seen_ms = now_ms;
                true
            }
            None => false,
        }
    }

    pub fn get(&self, id: &str) -> Option<&Relay> {
        self.relays.get(id)
    }

    /// Whether a meeting placed on relay `id` when it was process
    /// `instance` may stay there: the relay is live and is still that
    /// process. A process that restarted under the same id lost its
    /// bindings, so its members must be placed again. An unknown `instance`
    /// (a record from before relays sent one) is taken on trust.
    pub fn still_serves(&self, id: &str, instance: Option<&str>, now_ms: u64) -> bool {
        self.relays.get(id).is_some_and(|r| {
            now_ms.saturating_sub(r.last_seen_ms) <= self.timeout_ms
                && instance.is_none_or(|i| r.instance.as_deref() == Some(i))
        })
    }

    /// Whether [`Self::place`] would find a relay (without counting anyone).
    pub fn can_place(&self, zone: Option<&str>, now_ms: u64) -> bool {
        self.relays.values().any(|r| self.accepts(r, zone, now_ms))
    }

    fn accepts(&self, r: &Relay, zone: Option<&str>, now_ms: u64) -> bool {
        r.ready
            && now_ms.saturating_sub(r.last_seen_ms) <= self.timeout_ms
            && zone.is_none_or(|z| r.zone == z)
            && r.load + r.pending < r.capacity
    }

    /// Chooses the least-loaded live, ready relay (of `zone` if given) with
    /// room for one more participant, and counts that participant.
    pub fn place(&mut self, zone: Option<&str>, now_ms: u64) -> Option<&Relay> {
        let best = self
            .relays
            .values()
            .filter(|r| self.accepts(r, zone, now_ms))
            .min_by(|a, b| {
                // Compare fill ratios without floats: a/ca < b/cb.
                let fa = u64::from(a.load + a.pending) * u64::from(b.capacity);
                let fb = u64::from(b.load + b.pending) * u64::from(a.capacity);
                fa.cmp(&fb).then_with(|| a.id.cmp(&b.id))
            })?
            .id
            .clone();
        let relay = self.relays.get_mut(&best)?;
        relay.pending += 1;
        Some(relay)
    }

    /// Counts one more participant on an existing placement.
    pub fn add_pending(&mut self, id: &str) {
        if let Some(r) = self.relays.get_mut(id) {
            r.pending += 1;
        }
    }

    pub fn live_count(&self, now_ms: u64) -> usize {
        self.relays
            .values()
            .filter(|r| now_ms.saturating_sub(r.last_seen_ms) <= self.timeout_ms)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_least_loaded_live_ready_relay_of_the_zone() {
        let mut r = Relays::new(1000);
        r.register("a/0".into(), "a".into(), "10.0.0.1:1".into(), 10, None, 0);
        r.register("a/1".into(), "a".into(), "10.0.0.2:1".into(), 10, None, 0);
        r.register("b/0".into(), "b".into(), "10.0.0.3:1".into(), 10, None, 0);
        r.heartbeat("a/0", 5, true, 0);
        assert_eq!(r.place(Some("a"), 10).unwrap().id, "a/1");
        assert_eq!(r.place(Some("b"), 10).unwrap().id, "b/0");
        assert!(r.place(Some("c"), 10).is_none());
        assert!(!r.can_place(Some("c"), 10));
        assert!(r.can_place(Some("a"), 10));
        // a/1 fills up with pending placements until a/0 is the emptier one.
        for _ in 0..4 {
            assert_eq!(r.place(Some("a"), 10).unwrap().id, "a/1");
        }
        assert_eq!(r.place(Some("a"), 10).unwrap().id, "a/0");
    }

    #[test]
    fn silent_or_draining_relays_get_nothing() {
        let mut r = Relays::new(1000);
        r.register("a/0".into(), "a".into(), "x:1".into(), 10, None, 0);
        assert!(r.still_serves("a/0", None, 1000));
        assert!(r.place(None, 1001).is_none(), "heartbeat timed out");
        assert!(!r.still_serves("a/0", None, 1001));
        assert!(r.heartbeat("a/0", 0, false, 1001));
        assert!(r.place(None, 1002).is_none(), "draining");
        assert!(r.heartbeat("a/0", 0, true, 1003));
        assert!(r.place(None, 1004).is_some());
        assert!(!r.heartbeat("zz", 0, true, 0));
    }

    #[test]
    fn full_relays_are_skipped() {
        let mut r = Relays::new(1000);
        r.register("a/0".into(), "a".into(), "x:1".into(), 1, None, 0);
        assert!(r.place(None, 0).is_some());
        assert!(r.place(None, 0).is_none());
        r.heartbeat("a/0", 0, true, 1);
        assert!(r.place(None, 1).is_some());
    }

    #[test]
    fn a_restarted_process_no_longer_serves_what_its_predecessor_held() {
        let mut r = Relays::new(1000);
        let first = Some("aa".to_owned());
        r.register("a/0".into(), "a".into(), "x:1".into(), 10, first.clone(), 0);
        assert!(r.still_serves("a/0", Some("aa"), 10));
        // The same process registering again (the KMS restarted) still serves.
        r.register("a/0".into(), "a".into(), "x:1".into(), 10, first, 20);
        assert!(r.still_serves("a/0", Some("aa"), 30));
        // A new process under the same id, within the heartbeat timeout: live,
        // but not the process that holds the bindings.
        r.register(
            "a/0".into(),
            "a".into(),
            "x:1".into(),
            10,
            Some("bb".into()),
            40,
        );
        assert!(!r.still_serves("a/0", Some("aa"), 50));
        assert!(r.still_serves("a/0", Some("bb"), 50));
        // A record from before relays sent an instance is taken on trust;
        // a relay that sends none cannot be the process a record names.
        assert!(r.still_serves("a/0", None, 50));
        r.register("a/0".into(), "a".into(), "x:1".into(), 10, None, 60);
        assert!(!r.still_serves("a/0", Some("bb"), 70));
        assert!(!r.still_serves("a/0", None, 2000), "heartbeat timed out");
        assert!(!r.still_serves("zz", None, 70));
    }
}
