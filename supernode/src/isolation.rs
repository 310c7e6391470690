//! Host-wide isolation of misbehaving parents: hosts that fault repeatedly (bad data, unreachable)
//! are taken out of scheduling for every task for a cool-down.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Fault bookkeeping per host id.
#[derive(Debug)]
pub struct Isolation {
    threshold: usize,
    window: Duration,
    cooldown: Duration,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    faults: HashMap<String, VecDeque<Instant>>,
    until: HashMap<String, Instant>,
}

impl Isolation {
    /// `threshold` faults within `window` isolate a host for `cooldown`.
    pub fn new(threshold: usize, window: Duration, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            window,
            cooldown,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Records a fault; true when this fault isolated the host.
    pub fn fault(&self, host_id: &str) -> bool {
        let now = Instant::now();
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let q = g.faults.entry(host_id.to_owned()).or_default();
        q.push_back(now);
        while q
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.window)
        {
            q.pop_front();
        }
        if q.len() >= self.threshold {
            q.clear();
            g.until.insert(host_id.to_owned(), now + self.cooldown);
            tracing::warn!(host_id, cooldown = ?self.cooldown, "host isolated after repeated faults");
            return true;
        }
        false
    }

    /// True while the host is isolated.
    pub fn is_isolated(&self, host_id: &str) -> bool {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.until.get(host_id).is_some_and(|t| Instant::now() < *t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolates_after_threshold_and_recovers_after_cooldown() {
        let iso = Isolation::new(3, Duration::from_secs(60), Duration::from_millis(50));
        assert!(!iso.fault("h"));
        assert!(!iso.fault("h"));
        assert!(!iso.is_isolated("h"));
        assert!(iso.fault("h"));
        assert!(iso.is_isolated("h"));
        assert!(!iso.is_isolated("other"));
        std::thread::sleep(Duration::from_millis(60));
        assert!(!iso.is_isolated("h"));
    }
}
