//! What dfsnapshotter needs of a registry itself: image references, blob URLs, and the
//! credentials handed over for an image's scope ([`crate::credentials::Keyring`]) turned into
//! the `Authorization` a registry accepts (Basic, or a Bearer token from the realm its challenge
//! names, fetched once and reused while fresh). Blob bytes never come from here: they come
//! through the agent, piece by piece. Which endpoint (and which CA) a registry is reached at
//! comes from containerd's `hosts.toml` ([`route`]).

mod auth;
mod read_headers;
mod route;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use base64::Engine;

use crate::credentials::{Keyring, Scope};
use crate::error::{Error, Result};
use auth::{Challenge, parse_challenge, token_of};
use read_headers::HeaderCache;
use route::{Hop, Route};

/// An image reference: `[registry/]repository[:tag][@digest]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// As named (`host[:port]`); `docker.io` when the reference names none.
    pub registry: String,
    pub repository: String,
    /// A tag, or `sha256:<hex>` when the reference pins a digest.
    pub reference: String,
}

impl Reference {
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::Invalid(format!("image reference {s:?}: {why}"));
        if s.is_empty() || s.chars().any(char::is_whitespace) {
            return Err(bad("empty or has spaces"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                fetcher::task_id::parse_digest(d).map_err(|_| bad("bad digest"))?;
                (r, Some(d.to_owned()))
            }
            None => (s, None),
        };
        let (registry, path) = match rest.split_once('/') {
            Some((first, tail))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), tail.to_owned())
            }
            _ => ("docker.io".to_owned(), rest.to_owned()),
        };
        let (repository, tag) = match path.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo.to_owned(), Some(tag.to_owned())),
            _ => (path, None),
        };
        // Distribution's grammar: a tag is `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`, a repository
        // non-empty components.
        let tag_ok = |t: &str| {
            t.len() <= 128
                && t.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        };
        if tag.as_deref().is_some_and(|t| !tag_ok(t)) {
            return Err(bad("bad tag"));
        }
        if repository.split('/').any(str::is_empty) {
            return Err(bad("bad repository name"));
        }
        let repository = if registry == "docker.io" && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/".contains(c);
        if repository.is_empty() || !repository.chars().all(valid) {
            return Err(bad("bad repository name"));
        }
        let reference = digest.or(tag).unwrap_or_else(|| "latest".to_owned());
        Ok(Self {
            registry,
            repository,
            reference,
        })
    }

    /// The name containerd shows (`host/repo:tag`).
    pub fn name(&self) -> String {
        let sep = if self.reference.starts_with("sha256:") {
            '@'
        } else {
            ':'
        };
        format!(
            "{}/{}{sep}{}",
            self.registry, self.repository, self.reference
        )
    }
}

/// How to reach registries.
#[derive(Clone, Debug, Default)]
pub struct RegistryConfig {
    /// `host[:port]` of registries spoken to over plain HTTP (all others: HTTPS).
    pub plain_http: Vec<String>,
    /// containerd's registry host configs (`<dir>/<host[:port]>/hosts.toml`); `None`: none.
    pub hosts_dir: Option<PathBuf>,
}

pub struct Registry {
    cfg: RegistryConfig,
    keyring: Arc<Keyring>,
    /// Routes by registry, built on first use.
    routes: Mutex<HashMap<String, Arc<Route>>>,
    /// Challenges by hop base URL.
    challenges: Mutex<HashMap<String, Challenge>>,
    /// Headers lazy reads go out with, by scope.
    read_headers: HeaderCache,
}

impl Registry {
    /// Speaks to registries as `cfg` says, with the credentials `keyring` holds per scope.
    pub fn new(cfg: RegistryConfig, keyring: Arc<Keyring>) -> Result<Self> {
        Ok(Self {
            cfg,
            keyring,
            routes: Mutex::new(HashMap::new()),
            challenges: Mutex::new(HashMap::new()),
            read_headers: HeaderCache::default(),
        })
    }

    /// The credentials this process holds for its scopes.
    pub fn keyring(&self) -> &Arc<Keyring> {
        &self.keyring
    }

    fn route(&self, registry: &str) -> Result<Arc<Route>> {
        if let Some(r) = self
            .routes
            .lock()
            .ok()
            .and_then(|m| m.get(registry).cloned())
        {
            return Ok(r);
        }
        let r = Arc::new(Route::build(registry, &self.cfg)?);
        if let Ok(mut m) = self.routes.lock() {
            m.insert(registry.to_owned(), r.clone());
        }
        Ok(r)
    }

    /// Where the agent reads a layer blob of `r` from.
    pub fn blob_url(&self, r: &Reference, digest: &str) -> Result<String> {
        let route = self.route(&r.registry)?;
        let hop = route.blobs()?;
        Ok(route.url(hop, &r.repository, &format!("blobs/{digest}")))
    }

    /// The layer blob `digest` of `r` from the endpoint blobs are read from, to stream (for a
    /// layer pulled normally; lazy layers are read through the agent).
    pub async fn open_blob(&self, r: &Reference, digest: &str) -> Result<reqwest::Response> {
        let route = self.route(&r.registry)?;
        let hop = route.blobs()?;
        let url = route.url(hop, &r.repository, &format!("blobs/{digest}"));
        let mut req = hop
            .client
            .get(&url)
            .timeout(std::time::Duration::from_secs(3600));
        for (n, v) in self.auth_at(hop, &r.registry, &r.repository).await? {
            req = req.header(n, v);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Error::Registry(format!("{url}: {}", fetcher::source::error_chain(&e))))?;
        match resp.status() {
            s if s.is_success() => Ok(resp),
            s @ (reqwest::StatusCode::UNAUTHORIZED | reqwest::StatusCode::FORBIDDEN) => {
                Err(Error::Credentials(format!("{url}: HTTP {s}")))
            }
            s => Err(Error::Registry(format!("{url}: HTTP {s}"))),
        }
    }

    async fn challenge(&self, hop: &Hop) -> Result<Challenge> {
        if let Some(c) = self
            .challenges
            .lock()
            .ok()
            .and_then(|m| m.get(&hop.base).cloned())
        {
            return Ok(c);
        }
        let url = format!("{}/v2/", hop.base);
        let r =
            hop.client.get(&url).send().await.map_err(|e| {
                Error::Registry(format!("{url}: {}", fetcher::source::error_chain(&e)))
            })?;
        let c = match r.status().as_u16() {
            401 => {
                let h = r
                    .headers()
                    .get(reqwest::header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                parse_challenge(h)
                    .ok_or_else(|| Error::Registry(format!("{url}: unusable challenge {h:?}")))?
            }
            _ => Challenge::None,
        };
        if let Ok(mut m) = self.challenges.lock() {
            m.insert(hop.base.clone(), c.clone());
        }
        Ok(c)
    }

    /// Headers that authorize blob reads of `repository` on `registry` (empty when it needs
    /// none). Credentials the token server refuses are refreshed (a helper asked again) and
    /// tried once more: they may have rotated.
    pub async fn auth_headers(
        &self,
        registry: &str,
        repository: &str,
    ) -> Result<Vec<(String, String)>> {
        let route = self.route(registry)?;
        self.auth_at(route.blobs()?, registry, repository).await
    }

    /// [`Registry::auth_headers`] for lazy reads: made once per scope and reused while fresh
    /// (`read_headers`); whether they were reused.
    pub async fn read_headers(
        &self,
        registry: &str,
        repository: &str,
    ) -> Result<(Vec<(String, String)>, bool)> {
        let scope = Scope::new(registry, repository);
        if let Some(h) = self.read_headers.get(&scope) {
            return Ok((h, true));
        }
        let h = self.auth_headers(registry, repository).await?;
        self.read_headers.put(scope, h.clone());
        Ok((h, false))
    }

    /// Forgets what `scope`'s reads went out with and the credentials handed over for it (no
    /// layer of it is mounted any more); whether there were any.
    pub fn forget(&self, scope: &Scope) -> bool {
        self.read_headers.forget(scope);
        self.keyring.forget(scope)
    }

    /// The registry refused what `scope`'s reads went out with: drop the headers made for it
    /// and what a helper answered, so the next read makes them afresh.
    pub fn refresh(&self, scope: &Scope) {
        self.read_headers.forget(scope);
        self.keyring.refresh(scope);
    }

    async fn auth_at(
        &self,
        hop: &Hop,
        registry: &str,
        repository: &str,
    ) -> Result<Vec<(String, String)>> {
        match self.auth_once(hop, registry, repository).await {
            Err(Error::Credentials(why)) => {
                let scope = Scope::new(registry, repository);
                tracing::info!(%scope, %why, "credentials refused: refreshing them");
                self.refresh(&scope);
                self.auth_once(hop, registry, repository).await
            }
            other => other,
        }
    }

    async fn auth_once(
        &self,
        hop: &Hop,
        registry: &str,
        repository: &str,
    ) -> Result<Vec<(String, String)>> {
        let scope = Scope::new(registry, repository);
        let basic = self.keyring.basic(&scope).await?.map(|(u, p)| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        });
        match self.challenge(hop).await? {
            Challenge::None => Ok(Vec::new()),
            Challenge::Basic => Ok(basic
                .map(|b| vec![("Authorization".to_owned(), b)])
                .unwrap_or_default()),
            Challenge::Bearer { realm, service } => {
                let mut url = url::Url::parse(&realm)
                    .map_err(|e| Error::Registry(format!("token realm {realm:?}: {e}")))?;
                url.query_pairs_mut()
                    .append_pair("service", &service)
                    .append_pair("scope", &format!("repository:{repository}:pull"));
                let answer = hop
                    .tokens
                    .get(&url, basic.as_deref())
                    .await
                    .map_err(|e| Error::Registry(format!("token from {realm}: {e}")))?;
                if answer.status != 200 {
                    return Err(Error::Credentials(format!(
                        "token server {realm} refused {scope}: HTTP {}",
                        answer.status
                    )));
                }
                let token = token_of(&answer.body).ok_or_else(|| {
                    Error::Registry(format!("token server {realm} sent no token"))
                })?;
                Ok(vec![(
                    "Authorization".to_owned(),
                    format!("Bearer {token}"),
                )])
            }
        }
    }

    /// GET `path` (after `/v2/<repository>/`) of the image's repository, from the first of the
    /// registry's endpoints that serves it (mirrors first); body and content type.
    pub async fn get(
        &self,
        r: &Reference,
        path: &str,
        accept: &[&str],
        max: usize,
    ) -> Result<(Vec<u8>, String)> {
        let route = self.route(&r.registry)?;
        let mut last = None;
        for hop in route.hops_for(path) {
            match self.get_at(&route, hop, r, path, accept, max).await {
                Ok(found) => return Ok(found),
                Err(e) => {
                    tracing::debug!(endpoint = %hop.base, error = %e, "registry endpoint failed");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            Error::Registry(format!(
                "registry host config for {} names no endpoint for {path}",
                r.registry
            ))
        }))
    }

    async fn get_at(
        &self,
        route: &Route,
        hop: &Hop,
        r: &Reference,
        path: &str,
        accept: &[&str],
        max: usize,
    ) -> Result<(Vec<u8>, String)> {
        let url = route.url(hop, &r.repository, path);
        let mut req = hop.client.get(&url);
        for (n, v) in self.auth_at(hop, &r.registry, &r.repository).await? {
            req = req.header(n, v);
        }
        for a in accept {
            req = req.header(reqwest::header::ACCEPT, *a);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Error::Registry(format!("{url}: {}", fetcher::source::error_chain(&e))))?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(Error::Credentials(format!(
                "{url}: HTTP {status} for {}",
                Scope::new(&r.registry, &r.repository)
            )));
        }
        if !status.is_success() {
            return Err(Error::Registry(format!("{url}: HTTP {status}")));
        }
        let ct = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = fetcher::source::read_bounded(resp, max)
            .await
            .map_err(|e| Error::Registry(format!("{url}: {e}")))?;
        Ok((body.to_vec(), ct))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        // A registry's challenge and a user's image reference: parsed or refused, no panic.
        #[test]
        fn challenges_and_references_are_total(c in "\\PC{0,120}", r in "\\PC{0,120}") {
            let _ = parse_challenge(&c);
            let _ = parse_challenge(&format!("Bearer {c}"));
            if let Ok(parsed) = Reference::parse(&r) {
                prop_assert!(!parsed.reference.is_empty());
            }
        }
    }

    use super::*;

    #[test]
    fn references_parse_like_docker() {
        let r = Reference::parse("busybox").expect("short");
        assert_eq!(
            (
                r.registry.as_str(),
                r.repository.as_str(),
                r.reference.as_str()
            ),
            ("docker.io", "library/busybox", "latest")
        );
        let r = Reference::parse("127.0.0.1:5000/project/app:v1").expect("host:port");
        assert_eq!(
            (
                r.registry.as_str(),
                r.repository.as_str(),
                r.reference.as_str()
            ),
            ("127.0.0.1:5000", "project/app", "v1")
        );
        assert_eq!(r.name(), "127.0.0.1:5000/project/app:v1");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("localhost/app@{d}")).expect("digest");
        assert_eq!(r.reference, d);
        for bad in [
            "",
            "a b",
            "Host.io/UPPER:v1",
            "x@sha256:zz",
            ":",
            "app:",
            "a//b",
            "app:.v1",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
