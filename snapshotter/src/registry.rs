//! What dfsnapshotter needs of a registry itself: image references, blob URLs, and credentials
//! (`--user`, or docker's `config.json`) turned into the `Authorization` a registry accepts
//! (Basic, or a Bearer token from the realm its challenge names, fetched once and reused while
//! fresh). Blob bytes never come from here: they come through the agent, piece by piece.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use base64::Engine;
use fetcher::source::token::TokenCache;

use crate::error::{Error, Result};

/// `docker.io` images live here.
const DOCKER_HUB: &str = "registry-1.docker.io";

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
    /// Docker's `config.json` to take credentials from (`None`: `$DOCKER_CONFIG/config.json`,
    /// else `~/.docker/config.json`, if present).
    pub docker_config: Option<PathBuf>,
    /// `user:password` for every registry (overrides the docker config).
    pub user: Option<String>,
}

/// What a registry's `/v2/` answered.
#[derive(Clone, Debug)]
enum Challenge {
    None,
    Basic,
    Bearer { realm: String, service: String },
}

pub struct Registry {
    cfg: RegistryConfig,
    client: reqwest::Client,
    tokens: TokenCache,
    challenges: Mutex<HashMap<String, Challenge>>,
}

impl Registry {
    pub fn new(cfg: RegistryConfig) -> Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .timeout(std::time::Duration::from_secs(120))
            .build()
            .map_err(|e| Error::Registry(format!("HTTP client: {e}")))?;
        Ok(Self {
            cfg,
            tokens: TokenCache::new(client.clone()),
            client,
            challenges: Mutex::new(HashMap::new()),
        })
    }

    /// `scheme://host[:port]` of a registry as references name it.
    pub fn base_url(&self, registry: &str) -> String {
        let host = if registry == "docker.io" {
            DOCKER_HUB
        } else {
            registry
        };
        let scheme = if self.cfg.plain_http.iter().any(|h| h == registry) {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{host}")
    }

    pub fn blob_url(&self, r: &Reference, digest: &str) -> String {
        format!(
            "{}/v2/{}/blobs/{digest}",
            self.base_url(&r.registry),
            r.repository
        )
    }

    /// `user:password` for `registry`, from `--user` or the docker config.
    fn credentials(&self, registry: &str) -> Result<Option<String>> {
        if let Some(u) = &self.cfg.user {
            return Ok(Some(u.clone()));
        }
        let path = match &self.cfg.docker_config {
            Some(p) => p.clone(),
            None => match std::env::var_os("DOCKER_CONFIG") {
                Some(d) => PathBuf::from(d).join("config.json"),
                None => match std::env::var_os("HOME") {
                    Some(h) => PathBuf::from(h).join(".docker/config.json"),
                    None => return Ok(None),
                },
            },
        };
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("cannot read docker config", path, e)),
        };
        docker_config_auth(&bytes, registry).map_err(|detail| {
            Error::Registry(format!("docker config {}: {detail}", path.display()))
        })
    }

    async fn challenge(&self, registry: &str) -> Result<Challenge> {
        if let Some(c) = self
            .challenges
            .lock()
            .ok()
            .and_then(|m| m.get(registry).cloned())
        {
            return Ok(c);
        }
        let url = format!("{}/v2/", self.base_url(registry));
        let r =
            self.client.get(&url).send().await.map_err(|e| {
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
            m.insert(registry.to_owned(), c.clone());
        }
        Ok(c)
    }

    /// Headers that authorize pulls of `repository` on `registry` (empty when it needs none).
    pub async fn auth_headers(
        &self,
        registry: &str,
        repository: &str,
    ) -> Result<Vec<(String, String)>> {
        let creds = self.credentials(registry)?;
        let basic = creds.as_ref().map(|c| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(c)
            )
        });
        match self.challenge(registry).await? {
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
                let answer = self
                    .tokens
                    .get(&url, basic.as_deref())
                    .await
                    .map_err(|e| Error::Registry(format!("token from {realm}: {e}")))?;
                if answer.status != 200 {
                    return Err(Error::Registry(format!(
                        "token server {realm} refused {registry}/{repository}: HTTP {}",
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

    /// GET `path` (after `/v2/<repository>/`) of the image's repository; body and content type.
    pub async fn get(
        &self,
        r: &Reference,
        path: &str,
        accept: &[&str],
        max: usize,
    ) -> Result<(Vec<u8>, String)> {
        let url = format!("{}/v2/{}/{path}", self.base_url(&r.registry), r.repository);
        let mut req = self.client.get(&url);
        for (n, v) in self.auth_headers(&r.registry, &r.repository).await? {
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

/// `user:password` for `registry` in a docker `config.json`.
fn docker_config_auth(bytes: &[u8], registry: &str) -> Result<Option<String>, String> {
    #[derive(serde::Deserialize)]
    struct Entry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Config {
        #[serde(default)]
        auths: HashMap<String, Entry>,
    }
    let cfg: Config = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let wanted: Vec<&str> = if registry == "docker.io" {
        vec![
            "https://index.docker.io/v1/",
            "docker.io",
            "index.docker.io",
        ]
    } else {
        vec![registry]
    };
    let entry = cfg.auths.iter().find(|(k, _)| {
        let host = k
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/');
        wanted.iter().any(|w| *w == k.as_str() || *w == host)
    });
    let Some((key, e)) = entry else {
        return Ok(None);
    };
    if let Some(auth) = &e.auth {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| format!("auths.{key:?}.auth is not base64"))?;
        let s = String::from_utf8(raw).map_err(|_| format!("auths.{key:?}.auth is not UTF-8"))?;
        if !s.contains(':') {
            return Err(format!("auths.{key:?}.auth is not user:password"));
        }
        return Ok(Some(s));
    }
    match (&e.username, &e.password) {
        (Some(u), Some(p)) => Ok(Some(format!("{u}:{p}"))),
        _ => Ok(None),
    }
}

/// `Basic ...` or `Bearer realm="..",service=".."`.
fn parse_challenge(h: &str) -> Option<Challenge> {
    let (scheme, params) = h.trim().split_once(' ').unwrap_or((h.trim(), ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut realm = None;
    let mut service = String::new();
    for part in split_params(params) {
        let Some((k, v)) = part.split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"').to_owned();
        match k.trim().to_ascii_lowercase().as_str() {
            "realm" => realm = Some(v),
            "service" => service = v,
            _ => {}
        }
    }
    Some(Challenge::Bearer {
        realm: realm?,
        service,
    })
}

/// Splits `a="x,y",b=z` at the commas outside quotes.
fn split_params(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

/// The `token` (or `access_token`) of a token server's JSON answer.
fn token_of(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("token")
        .or_else(|| v.get("access_token"))
        .and_then(|t| t.as_str())
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
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

    #[test]
    fn challenges_and_docker_config() {
        match parse_challenge(r#"Bearer realm="https://t.example/token?x=1,2",service="reg""#) {
            Some(Challenge::Bearer { realm, service }) => {
                assert_eq!(realm, "https://t.example/token?x=1,2");
                assert_eq!(service, "reg");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_challenge("Basic realm=x"),
            Some(Challenge::Basic)
        ));
        assert!(parse_challenge("Negotiate").is_none());

        let auth = base64::engine::general_purpose::STANDARD.encode("alice:wonderland");
        let cfg = format!(r#"{{"auths":{{"https://reg.example:5000":{{"auth":"{auth}"}}}}}}"#);
        assert_eq!(
            docker_config_auth(cfg.as_bytes(), "reg.example:5000").expect("parse"),
            Some("alice:wonderland".to_owned())
        );
        assert_eq!(
            docker_config_auth(cfg.as_bytes(), "other").expect("parse"),
            None
        );
        let bad = r#"{"auths":{"reg":{"auth":"!!"}}}"#;
        assert!(docker_config_auth(bad.as_bytes(), "reg").is_err());
        assert_eq!(token_of(br#"{"access_token":"t1"}"#), Some("t1".into()));
    }
}
