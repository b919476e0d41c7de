//! Token-bucket rate limits per key (identity or meeting). Time is an input.

use std::collections::HashMap;

/// Keys tracked at most; beyond this, buckets that have refilled (carry no
/// information) are dropped first, so memory stays bounded under key floods.
const MAX_KEYS: usize = 100_000;

#[derive(Debug)]
pub struct RateLimiter {
    rate_per_s: f64,
    burst: f64,
    buckets: HashMap<String, (f64, u64)>,
}

impl RateLimiter {
    pub fn new(rate_per_s: u32, burst: u32) -> Self {
        Self {
            rate_per_s: f64::from(rate_per_s.max(1)),
            burst: f64::from(burst.max(1)),
            buckets: HashMap::new(),
        }
    }

    /// Takes one token for `key`, or returns how long to wait (ms).
    pub fn check(&mut self, key: &str, now_ms: u64) -> Result<(), u64> {
        if self.buckets.len() >= MAX_KEYS && !self.buckets.contains_key(key) {
            self.evict(now_ms);
        }
        let (rate, burst) = (self.rate_per_s, self.burst);
        let (tokens, last) = self
            .buckets
            .entry(key.to_owned())
            .or_insert((burst, now_ms));
        let elapsed = now_ms.saturating_sub(*last) as f64 / 1000.0;
        *tokens = (*tokens + elapsed * rate).min(burst);
        *last = now_ms;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err((((1.0 - *tokens) / rate) * 1000.0).ceil() as u64)
        }
    }

    /// Whether `key` has a token left, without taking it.
    pub fn has_budget(&mut self, key: &str, now_ms: u64) -> Result<(), u64> {
        match self.buckets.get(key) {
            None => Ok(()),
            Some((tokens, last)) => {
                let elapsed = now_ms.saturating_sub(*last) as f64 / 1000.0;
                let tokens = (tokens + elapsed * self.rate_per_s).min(self.burst);
                if tokens >= 1.0 {
                    Ok(())
                } else {
                    Err((((1.0 - tokens) / self.rate_per_s) * 1000.0).ceil() as u64)
                }
            }
        }
    }

    fn evict(&mut self, now_ms: u64) {
        let (rate, burst) = (self.rate_per_s, self.burst);
        self.buckets.retain(|_, (tokens, last)| {
            *tokens + now_ms.saturating_sub(*last) as f64 / 1000.0 * rate < burst
        });
        if self.buckets.len() >= MAX_KEYS {
            // Everyone is active: forgetting someone only makes them luckier.
            self.buckets.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate_per_key() {
        let mut r = RateLimiter::new(2, 3);
        for _ in 0..3 {
            assert!(r.check("a", 0).is_ok());
        }
        let wait = r.check("a", 0).unwrap_err();
        assert_eq!(wait, 500);
        assert!(r.check("b", 0).is_ok(), "other keys are independent");
        assert!(r.check("a", 499).is_err());
        assert!(r.check("a", 1000).is_ok());
        assert!(r.check("a", 1000).is_ok());
        assert!(r.has_budget("a", 1000).is_err());
        assert!(r.has_budget("a", 1500).is_ok());
        assert!(r.has_budget("never-seen", 0).is_ok());
    }

    #[test]
    fn memory_stays_bounded() {
        let mut r = RateLimiter::new(1, 1);
        for i in 0..(MAX_KEYS + 10) {
            let _ = r.check(&i.to_string(), 0);
        }
        assert!(r.buckets.len() <= MAX_KEYS);
    }
}
