//! Registry credentials for lazy layers, per image scope (registry + repository). The process
//! that serves an image's lazy layers holds what `dfsnapshotter pull` (or, for Kubernetes, the
//! CRI image-service proxy) handed it for that scope, in memory only, and uses it for that
//! scope's blobs and nothing else: one image's credentials never read another repository's
//! layers, and the host's own docker config is never consulted on a workload's behalf.
//!
//! A secret is either a user and password, or the name of a docker credential helper, which is
//! asked again when its answer is older than [`HELPER_FRESH`] or a registry refused it.

pub mod docker_config;
pub mod helper;

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Scopes remembered at most (least recently used go first).
const MAX_SCOPES: usize = 4096;
/// How long a credential helper's answer is used before the helper is asked again.
pub const HELPER_FRESH: Duration = Duration::from_secs(300);

/// Whose credentials: an image's registry (`host[:port]` as references name it) and repository.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Scope {
    pub registry: String,
    pub repository: String,
}

impl Scope {
    pub fn new(registry: &str, repository: &str) -> Self {
        Self {
            registry: registry.to_owned(),
            repository: repository.to_owned(),
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)
    }
}

/// Credentials as handed over.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    Basic {
        user: String,
        password: String,
    },
    /// `docker-credential-<helper> get` for `server` (asked again on refresh).
    Helper {
        helper: String,
        server: String,
    },
}

/// Never prints a password.
impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Basic { user, .. } => write!(f, "Basic({user}:***)"),
            Self::Helper { helper, server } => write!(f, "Helper({helper} for {server})"),
        }
    }
}

impl Secret {
    /// What kind of secret (for logs: never the secret).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Basic { .. } => "basic",
            Self::Helper { .. } => "helper",
        }
    }

    /// `user:password` (as given to `--user`), checked for a user name.
    pub fn from_user_password(s: &str) -> Result<Self> {
        match s.split_once(':') {
            Some((user, password)) if !user.is_empty() => Ok(Self::Basic {
                user: user.to_owned(),
                password: password.to_owned(),
            }),
            _ => Err(Error::Credentials(
                "credentials must be USER:PASSWORD with a user name".into(),
            )),
        }
    }
}

#[derive(Clone)]
struct Entry {
    secret: Secret,
    /// A helper's last answer (`user`, `password`) and when it came.
    answered: Option<(Instant, String, String)>,
}

/// A scope's credentials: the latest handover (and its number), and the one it replaced, kept
/// until the pull the latest was made for has settled.
struct Slot {
    generation: u64,
    current: Entry,
    previous: Option<(u64, Entry)>,
}

/// What settling a handover did ([`Keyring::settle`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settled {
    /// The pull succeeded and mounted layers read with them.
    Kept,
    /// Nothing reads with them: forgotten.
    Forgotten,
    /// The pull failed: the credentials it replaced are back.
    Restored,
    /// A later handover replaced them already.
    Superseded,
}

impl Settled {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kept => "kept",
            Self::Forgotten => "forgotten",
            Self::Restored => "restored",
            Self::Superseded => "superseded",
        }
    }
}

/// The credentials handed to this process, by scope.
pub struct Keyring {
    entries: Mutex<lru::LruCache<Scope, Slot>>,
    handovers: std::sync::atomic::AtomicU64,
}

impl Default for Keyring {
    fn default() -> Self {
        Self {
            entries: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(MAX_SCOPES).unwrap_or(NonZeroUsize::MIN),
            )),
            handovers: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl Keyring {
    /// Keeps `secret` for `scope`, replacing what was kept (a new pull brings fresh ones) but
    /// remembering it until [`Keyring::settle`]; returns the handover's number.
    pub fn put(&self, scope: Scope, secret: Secret) -> u64 {
        let generation = 1 + self
            .handovers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let current = Entry {
            secret,
            answered: None,
        };
        if let Ok(mut m) = self.entries.lock() {
            let previous = m.pop(&scope).map(|s| (s.generation, s.current));
            m.put(
                scope,
                Slot {
                    generation,
                    current,
                    previous,
                },
            );
        }
        generation
    }

    /// Settles handover `generation` of `scope` once its pull has ended (`pulled`: it
    /// succeeded), `in_use` telling whether a mounted layer reads with the scope's credentials.
    pub fn settle(&self, scope: &Scope, generation: u64, pulled: bool, in_use: bool) -> Settled {
        let Ok(mut m) = self.entries.lock() else {
            return Settled::Superseded;
        };
        let Some(slot) = m.get_mut(scope) else {
            return Settled::Superseded;
        };
        if slot.generation != generation {
            // A later handover replaced this one; a failed one is no good to fall back on.
            if !pulled
                && slot
                    .previous
                    .as_ref()
                    .is_some_and(|(g, _)| *g == generation)
            {
                slot.previous = None;
            }
            return Settled::Superseded;
        }
        match (pulled, slot.previous.take()) {
            (false, Some((g, e))) => {
                slot.generation = g;
                slot.current = e;
                Settled::Restored
            }
            _ if in_use => Settled::Kept,
            _ => {
                m.pop(scope);
                Settled::Forgotten
            }
        }
    }

    /// Forgets `scope` (its image was removed).
    pub fn forget(&self, scope: &Scope) -> bool {
        self.entries
            .lock()
            .is_ok_and(|mut m| m.pop(scope).is_some())
    }

    /// Scopes held.
    pub fn len(&self) -> usize {
        self.entries.lock().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops what a helper answered for `scope`, so the next use asks it again (a registry
    /// refused the credentials: they may have rotated).
    pub fn refresh(&self, scope: &Scope) {
        if let Ok(mut m) = self.entries.lock()
            && let Some(e) = m.get_mut(scope)
        {
            e.current.answered = None;
        }
    }

    /// `(user, password)` for exactly `scope`, if anything was handed over for it.
    pub async fn basic(&self, scope: &Scope) -> Result<Option<(String, String)>> {
        let secret = {
            let Ok(mut m) = self.entries.lock() else {
                return Ok(None);
            };
            let Some(Slot { current: e, .. }) = m.get(scope) else {
                return Ok(None);
            };
            match (&e.secret, &e.answered) {
                (Secret::Basic { user, password }, _) => {
                    return Ok(Some((user.clone(), password.clone())));
                }
                (Secret::Helper { .. }, Some((at, u, p))) if at.elapsed() < HELPER_FRESH => {
                    return Ok(Some((u.clone(), p.clone())));
                }
                (s, _) => s.clone(),
            }
        };
        let Secret::Helper { helper, server } = &secret else {
            return Ok(None);
        };
        let (user, password) = helper::get(helper, server).await?;
        if let Ok(mut m) = self.entries.lock()
            && let Some(Slot { current: e, .. }) = m.get_mut(scope)
            && e.secret == secret
        {
            e.answered = Some((Instant::now(), user.clone(), password.clone()));
        }
        Ok(Some((user, password)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(u: &str, p: &str) -> Secret {
        Secret::Basic {
            user: u.into(),
            password: p.into(),
        }
    }

    #[tokio::test]
    async fn credentials_serve_exactly_their_scope() {
        let k = Keyring::default();
        let a = Scope::new("reg.example:5000", "team/app");
        k.put(a.clone(), basic("alice", "s3cret"));
        assert_eq!(
            k.basic(&a).await.expect("a"),
            Some(("alice".into(), "s3cret".into()))
        );
        // Not another repository of the same registry, not the same repository elsewhere.
        for other in [
            Scope::new("reg.example:5000", "team/other"),
            Scope::new("reg.example:5000", "team"),
            Scope::new("reg.example", "team/app"),
        ] {
            assert_eq!(k.basic(&other).await.expect("other"), None, "{other}");
        }
        // A new pull replaces them; removal forgets them.
        k.put(a.clone(), basic("alice", "rotated"));
        assert_eq!(
            k.basic(&a).await.expect("a").map(|(_, p)| p),
            Some("rotated".into())
        );
        assert!(k.forget(&a));
        assert_eq!(k.basic(&a).await.expect("gone"), None);
        assert!(k.is_empty());
    }

    async fn password(k: &Keyring, scope: &Scope) -> Option<String> {
        k.basic(scope).await.expect("basic").map(|(_, p)| p)
    }

    #[tokio::test]
    async fn a_failed_pull_gives_the_working_credentials_back() {
        let k = Keyring::default();
        let a = Scope::new("reg.example", "team/app");
        let good = k.put(a.clone(), basic("alice", "good"));
        assert_eq!(k.settle(&a, good, true, true), Settled::Kept);
        // A pull with a stale secret fails: the one its layers read with comes back.
        let stale = k.put(a.clone(), basic("alice", "stale"));
        assert_eq!(password(&k, &a).await.as_deref(), Some("stale"));
        assert_eq!(k.settle(&a, stale, false, true), Settled::Restored);
        assert_eq!(password(&k, &a).await.as_deref(), Some("good"));
        // Rotated: the new secret's pull succeeds and stays; settling twice changes nothing.
        let rotated = k.put(a.clone(), basic("alice", "rotated"));
        assert_eq!(k.settle(&a, rotated, true, true), Settled::Kept);
        assert_eq!(k.settle(&a, rotated, false, true), Settled::Kept);
        assert_eq!(password(&k, &a).await.as_deref(), Some("rotated"));
        // Two pulls at once: the first fails after the second handed over; the second fails
        // too and the failed first is not what comes back.
        let first = k.put(a.clone(), basic("alice", "first"));
        let second = k.put(a.clone(), basic("alice", "second"));
        assert_eq!(k.settle(&a, first, false, true), Settled::Superseded);
        assert_eq!(password(&k, &a).await.as_deref(), Some("second"));
        assert_eq!(k.settle(&a, second, false, true), Settled::Kept);
        assert_eq!(password(&k, &a).await.as_deref(), Some("second"));
    }

    #[test]
    fn credentials_no_layer_reads_with_are_forgotten() {
        let k = Keyring::default();
        let a = Scope::new("reg.example", "team/pause");
        // Its layers were all present already (mounted for another scope): nothing to keep.
        let g = k.put(a.clone(), basic("alice", "pw"));
        assert_eq!(k.settle(&a, g, true, false), Settled::Forgotten);
        assert!(k.is_empty());
        // A failed first pull leaves nothing behind either.
        let g = k.put(a.clone(), basic("alice", "wrong"));
        assert_eq!(k.settle(&a, g, false, false), Settled::Forgotten);
        assert!(k.is_empty());
        assert_eq!(k.settle(&a, g, true, true), Settled::Superseded);
    }

    #[test]
    fn secrets_never_print_their_password() {
        let s = basic("alice", "s3cret");
        assert!(!format!("{s:?}").contains("s3cret"));
        assert_eq!(
            Secret::from_user_password("bob:a:b").expect("colon in password"),
            basic("bob", "a:b")
        );
        assert!(Secret::from_user_password(":pw").is_err());
        assert!(Secret::from_user_password("nopassword").is_err());
    }

    #[test]
    fn the_keyring_is_bounded() {
        let k = Keyring::default();
        for i in 0..MAX_SCOPES + 10 {
            k.put(Scope::new("r", &format!("repo{i}")), basic("u", "p"));
        }
        assert_eq!(k.len(), MAX_SCOPES);
    }
}
