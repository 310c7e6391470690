//! The `Authorization` headers lazy reads of an image's layers go out with, made once per scope
//! and reused while fresh: a FUSE read that misses the local chunks asks for them on every call,
//! and making them means the keyring (a credential helper, maybe), the challenge and the token
//! cache. Fresh for [`READ_HEADERS_FRESH`], well inside the lifetime registries give tokens
//! (distribution: 5 min, Harbor: 30 min); a registry that refuses them earlier has them dropped
//! ([`HeaderCache::forget`]) and made again.

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::credentials::Scope;

/// How long made headers are reused.
pub const READ_HEADERS_FRESH: Duration = Duration::from_secs(20);
/// Scopes remembered at most (least recently used go first).
const MAX_SCOPES: usize = 1024;

type Headers = Vec<(String, String)>;

/// Made headers by scope, with when they were made.
pub struct HeaderCache {
    entries: Mutex<lru::LruCache<Scope, (Instant, Headers)>>,
    fresh: Duration,
}

impl Default for HeaderCache {
    fn default() -> Self {
        Self::new(READ_HEADERS_FRESH)
    }
}

impl HeaderCache {
    pub fn new(fresh: Duration) -> Self {
        let cap = NonZeroUsize::new(MAX_SCOPES).unwrap_or(NonZeroUsize::MIN);
        Self {
            entries: Mutex::new(lru::LruCache::new(cap)),
            fresh,
        }
    }

    /// The headers made for `scope` within the freshness window.
    pub fn get(&self, scope: &Scope) -> Option<Headers> {
        let mut m = self.entries.lock().ok()?;
        match m.get(scope) {
            Some((at, h)) if at.elapsed() < self.fresh => Some(h.clone()),
            Some(_) => {
                m.pop(scope);
                None
            }
            None => None,
        }
    }

    /// Remembers what was just made for `scope`.
    pub fn put(&self, scope: Scope, headers: Headers) {
        if let Ok(mut m) = self.entries.lock() {
            m.put(scope, (Instant::now(), headers));
        }
    }

    /// Drops what was made for `scope` (the registry refused it).
    pub fn forget(&self, scope: &Scope) {
        if let Ok(mut m) = self.entries.lock() {
            m.pop(scope);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(v: &str) -> Headers {
        vec![("Authorization".into(), v.into())]
    }

    #[test]
    fn reused_while_fresh_per_scope_and_dropped_on_forget() {
        let c = HeaderCache::new(Duration::from_secs(60));
        let a = Scope::new("r.example", "team/a");
        let b = Scope::new("r.example", "team/b");
        assert_eq!(c.get(&a), None);
        c.put(a.clone(), h("Bearer 1"));
        assert_eq!(c.get(&a), Some(h("Bearer 1")));
        assert_eq!(c.get(&b), None, "another repository never gets a's headers");
        c.forget(&a);
        assert_eq!(c.get(&a), None);
    }

    #[test]
    fn stale_headers_are_made_again() {
        let c = HeaderCache::new(Duration::ZERO);
        let a = Scope::new("r.example", "team/a");
        c.put(a.clone(), h("Bearer 1"));
        assert_eq!(c.get(&a), None);
    }
}
