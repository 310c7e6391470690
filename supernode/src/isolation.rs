//! Host-wide isolation of misbehaving parents: hosts that fault repeatedly (bad data, unreachable)
//! are taken out of scheduling for every task for a cool-down. Faults count only when reported by
//! at least [`MIN_REPORTERS`] different hosts within the window: one reporter's word (a hostile
//! peer framing an honest one) isolates nobody.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Fault bookkeeping per host id.
#[derive(Debug)]
pub struct Isolation {
    threshold: usize,
    window: Duration,
    cooldown: Duration,
    inner: Mutex<Inner>,
    /// Some host may be isolated: asked of every parent candidate, so the common answer (none)
    /// takes no lock.
    any: AtomicBool,
}

/// Distinct reporting hosts needed before a host is isolated (or a parent dropped from a task).
pub const MIN_REPORTERS: usize = 2;

#[derive(Debug, Default)]
struct Inner {
    /// host → (when, reporting host) of its recent faults.
    faults: HashMap<String, VecDeque<(Instant, String)>>,
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
            any: AtomicBool::new(false),
        }
    }

    /// Records a fault of `host_id` reported by `reporter`; true when this fault isolated the host.
    pub fn fault(&self, host_id: &str, reporter: &str) -> bool {
        let now = Instant::now();
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let q = g.faults.entry(host_id.to_owned()).or_default();
        q.push_back((now, reporter.to_owned()));
        while q
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > self.window)
        {
            q.pop_front();
        }
        // Bounded: a flood of reports from one reporter keeps only the last `threshold` of them.
        while q.len() > self.threshold.max(MIN_REPORTERS) * 4 {
            q.pop_front();
        }
        let reporters: HashSet<&str> = q.iter().map(|(_, r)| r.as_str()).collect();
        if q.len() >= self.threshold && reporters.len() >= MIN_REPORTERS {
            q.clear();
            g.until.insert(host_id.to_owned(), now + self.cooldown);
            self.any.store(true, Ordering::Release);
            tracing::warn!(host_id, cooldown = ?self.cooldown, "host isolated after repeated faults");
            return true;
        }
        false
    }

    /// True while the host is isolated.
    pub fn is_isolated(&self, host_id: &str) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match g.until.get(host_id) {
            Some(t) if now < *t => true,
            Some(_) => {
                // A cool-down is over: forget every one that is.
                g.until.retain(|_, t| now < *t);
                self.any.store(!g.until.is_empty(), Ordering::Release);
                false
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolates_after_threshold_and_recovers_after_cooldown() {
        let iso = Isolation::new(3, Duration::from_secs(60), Duration::from_millis(50));
        assert!(!iso.fault("h", "a"));
        assert!(!iso.fault("h", "b"));
        assert!(!iso.is_isolated("h"));
        assert!(iso.fault("h", "a"));
        assert!(iso.is_isolated("h"));
        assert!(!iso.is_isolated("other"));
        std::thread::sleep(Duration::from_millis(60));
        assert!(!iso.is_isolated("h"));
        assert!(
            !iso.any.load(Ordering::Acquire),
            "with every cool-down over, candidates are checked without the lock"
        );
    }

    #[test]
    fn one_reporter_alone_isolates_nobody() {
        let iso = Isolation::new(3, Duration::from_secs(60), Duration::from_secs(60));
        for _ in 0..100 {
            assert!(!iso.fault("honest", "framer"));
        }
        assert!(!iso.is_isolated("honest"));
        assert!(iso.fault("honest", "second-witness"));
    }
}
