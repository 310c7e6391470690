//! Per-host request limits: one host (as the connection identifies it, see [`super::identity`])
//! may hold so many scheduler sessions at once and call the one-shot RPCs (`Token`,
//! `LayerIndex`) so often, whatever it claims to be, so that no single peer can take the
//! supernode's memory, its origin fetches or its token server's attention from the others.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Concurrent scheduler sessions one host may hold (an agent pulling many images at once opens
/// one per blob).
pub const MAX_SESSIONS: usize = 1024;
/// `Token` and `LayerIndex` calls per second one host may make, and the burst above it.
const RPC_PER_SECOND: u32 = 50;
const RPC_BURST: u32 = 500;

/// The limits' state (cheap to share).
pub struct PerHost {
    sessions: Arc<Mutex<HashMap<String, usize>>>,
    max_sessions: usize,
    rpc: DefaultKeyedRateLimiter<String>,
}

/// A session slot; freed when dropped.
pub struct Slot {
    sessions: Arc<Mutex<HashMap<String, usize>>>,
    host: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut m) = self.sessions.lock()
            && let Some(n) = m.get_mut(&self.host)
        {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.host);
            }
        }
    }
}

impl Default for PerHost {
    fn default() -> Self {
        Self::new(MAX_SESSIONS, RPC_PER_SECOND, RPC_BURST)
    }
}

impl PerHost {
    pub fn new(max_sessions: usize, per_second: u32, burst: u32) -> Self {
        let one = NonZeroU32::MIN;
        let quota = Quota::per_second(NonZeroU32::new(per_second).unwrap_or(one))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(one));
        Self {
            sessions: Default::default(),
            max_sessions,
            rpc: RateLimiter::keyed(quota),
        }
    }

    /// A session slot for `host`, or `None` when it holds [`MAX_SESSIONS`] already.
    pub fn session(&self, host: &str) -> Option<Slot> {
        let mut m = self.sessions.lock().ok()?;
        let n = m.entry(host.to_owned()).or_default();
        if *n >= self.max_sessions {
            return None;
        }
        *n += 1;
        Some(Slot {
            sessions: self.sessions.clone(),
            host: host.to_owned(),
        })
    }

    /// Whether `host` may make one more one-shot RPC now.
    pub fn rpc(&self, host: &str) -> bool {
        let ok = self.rpc.check_key(&host.to_owned()).is_ok();
        // Keys of hosts that went quiet are dropped once the table grows.
        if self.rpc.len() > 65_536 {
            self.rpc.retain_recent();
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_counted_per_host_and_freed() {
        let p = PerHost::new(2, 1, 1);
        let a1 = p.session("a").expect("1");
        let _a2 = p.session("a").expect("2");
        assert!(p.session("a").is_none(), "a third session of host a");
        assert!(p.session("b").is_some(), "another host is not affected");
        drop(a1);
        assert!(p.session("a").is_some(), "a freed slot is reusable");
    }

    #[test]
    fn rpcs_are_rate_limited_per_host() {
        let p = PerHost::new(1, 1, 3);
        assert!((0..3).all(|_| p.rpc("a")), "the burst");
        assert!(!p.rpc("a"), "past the burst");
        assert!(p.rpc("b"), "another host has its own budget");
    }
}
