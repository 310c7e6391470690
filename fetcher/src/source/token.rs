//! Registry token fetches (`GET <realm>?service=..&scope=..`), shared: concurrent identical
//! requests (same URL, same credentials) become one upstream request whose answer all of them
//! get, and a granted token is handed out again until half its lifetime has passed, so every
//! client still holds it for at least half of `expires_in`. Refusals are shared by the requests
//! in flight but never kept. Used by the supernode (cluster-wide) and by dfdaemon when no
//! supernode answers.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

/// The registry's token answer, as the client should see it.
#[derive(Clone, Debug)]
pub struct TokenAnswer {
    pub status: u16,
    pub content_type: Option<String>,
    pub www_authenticate: Option<String>,
    pub body: Bytes,
    fetched: Instant,
    reuse_for: Duration,
}

impl TokenAnswer {
    /// Builds an answer received some other way (e.g. over gRPC from a supernode).
    pub fn new(
        status: u16,
        content_type: Option<String>,
        www_authenticate: Option<String>,
        body: Bytes,
    ) -> Self {
        let reuse_for = reuse_for(status, &body);
        Self {
            status,
            content_type,
            www_authenticate,
            body,
            fetched: Instant::now(),
            reuse_for,
        }
    }

    fn fresh(&self) -> bool {
        self.fetched.elapsed() < self.reuse_for
    }
}

/// `scheme://host:port/path` of a URL: what identifies a token realm.
pub fn realm_key(u: &url::Url) -> String {
    format!(
        "{}://{}:{}{}",
        u.scheme(),
        u.host_str().unwrap_or(""),
        u.port_or_known_default().unwrap_or(0),
        u.path()
    )
}

/// The `realm` of a `Bearer` challenge, if `value` is one.
pub fn bearer_realm(value: &str) -> Option<url::Url> {
    let rest = value.trim_start();
    let params = rest
        .get(..7)
        .filter(|s| s.eq_ignore_ascii_case("bearer "))
        .map(|_| &rest[7..])?;
    let start = params.find("realm=\"")? + 7;
    let len = params[start..].find('"')?;
    url::Url::parse(&params[start..start + len])
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https"))
}

/// `scheme://host:port` of a registry URL.
pub fn registry_base(u: &url::Url) -> String {
    format!(
        "{}://{}:{}",
        u.scheme(),
        u.host_str().unwrap_or(""),
        u.port_or_known_default().unwrap_or(0)
    )
}

/// Token lifetime when the answer does not say (distribution's token spec: 60 s).
const DEFAULT_EXPIRES_IN: u64 = 60;
/// Answers too large for a token response are refused.
const MAX_BODY: usize = 1 << 20;
/// Answers kept at most (least recently used go first).
const MAX_ENTRIES: usize = 1024;
/// Bytes of kept answer bodies at most (least recently used go first).
const MAX_BYTES: usize = 32 << 20;
/// An answer is reused for at most this long, whatever its `expires_in` says.
const MAX_REUSE: Duration = Duration::from_secs(300);

/// How long a 200 answer may be handed out again: half of `expires_in`.
fn reuse_for(status: u16, body: &[u8]) -> Duration {
    if status != 200 {
        return Duration::ZERO;
    }
    let expires_in = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("expires_in").and_then(serde_json::Value::as_u64))
        .unwrap_or(DEFAULT_EXPIRES_IN);
    Duration::from_secs(expires_in / 2).min(MAX_REUSE)
}

/// Which HTTP client reaches a token server.
enum Clients {
    One(reqwest::Client),
    PerHost(super::HttpSource),
}

/// Coalescing, reusing token fetcher. Cheap to share behind an `Arc`.
pub struct TokenCache {
    clients: Clients,
    /// Bounded by count ([`MAX_ENTRIES`]) and by body bytes ([`MAX_BYTES`]).
    entries: Mutex<lru::LruCache<[u8; 32], Arc<OnceCell<TokenAnswer>>>>,
    upstream: std::sync::atomic::AtomicU64,
}

impl TokenCache {
    pub fn new(client: reqwest::Client) -> Self {
        Self::with(Clients::One(client))
    }

    /// Fetches with `source`'s client for each token server (its host's TLS settings).
    pub fn for_source(source: super::HttpSource) -> Self {
        Self::with(Clients::PerHost(source))
    }

    fn with(clients: Clients) -> Self {
        Self {
            clients,
            entries: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(MAX_ENTRIES).unwrap_or(std::num::NonZeroUsize::MIN),
            )),
            upstream: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Requests sent to token servers so far.
    pub fn upstream_requests(&self) -> u64 {
        self.upstream.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The token server's answer to `GET url` with `authorization` (the client's header, if any).
    /// `Err` when the token server cannot be reached (a message naming it).
    pub async fn get(
        &self,
        url: &url::Url,
        authorization: Option<&str>,
    ) -> Result<TokenAnswer, String> {
        let key = key(url, authorization);
        let cell = {
            let mut m = self.entries.lock().map_err(|_| "token cache poisoned")?;
            let reusable = m
                .get(&key)
                .filter(|c| c.get().is_none_or(TokenAnswer::fresh))
                .cloned();
            match reusable {
                Some(c) => c,
                None => {
                    let c = Arc::new(OnceCell::new());
                    m.put(key, c.clone());
                    c
                }
            }
        };
        let answer = cell
            .get_or_try_init(|| self.fetch(url, authorization))
            .await
            .cloned();
        self.trim();
        answer
    }

    /// Drops least recently used answers until the kept bodies fit [`MAX_BYTES`].
    fn trim(&self) {
        let Ok(mut m) = self.entries.lock() else {
            return;
        };
        let bytes = |m: &lru::LruCache<[u8; 32], Arc<OnceCell<TokenAnswer>>>| -> usize {
            m.iter()
                .filter_map(|(_, c)| c.get().map(|a| a.body.len()))
                .sum()
        };
        let mut total = bytes(&m);
        while total > MAX_BYTES {
            match m.pop_lru() {
                Some((_, c)) => total -= c.get().map_or(0, |a| a.body.len()),
                None => break,
            }
        }
    }

    /// Answers kept and the bytes of their bodies (for tests and metrics).
    pub fn usage(&self) -> (usize, usize) {
        self.entries.lock().map_or((0, 0), |m| {
            let bytes = m
                .iter()
                .filter_map(|(_, c)| c.get().map(|a| a.body.len()))
                .sum();
            (m.len(), bytes)
        })
    }

    async fn fetch(
        &self,
        url: &url::Url,
        authorization: Option<&str>,
    ) -> Result<TokenAnswer, String> {
        self.upstream
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let client = match &self.clients {
            Clients::One(c) => c.clone(),
            Clients::PerHost(s) => s.client_for(url).map_err(|e| e.to_string())?,
        };
        let mut req = client.get(url.clone());
        if let Some(a) = authorization {
            req = req.header(http::header::AUTHORIZATION, a);
        }
        let host = url.host_str().unwrap_or("token server").to_owned();
        let resp = req
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| {
                format!(
                    "token server {host} unreachable: {}",
                    super::error_chain(&e)
                )
            })?;
        let header = |name: http::header::HeaderName| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let status = resp.status().as_u16();
        let content_type = header(http::header::CONTENT_TYPE);
        let www_authenticate = header(http::header::WWW_AUTHENTICATE);
        let body = super::read_bounded(resp, MAX_BODY)
            .await
            .map_err(|e| format!("token server {host}: {e}"))?;
        Ok(TokenAnswer::new(
            status,
            content_type,
            www_authenticate,
            body,
        ))
    }
}

/// The cache key: the whole token URL (realm, service, scopes, in the client's order) and the
/// credentials, hashed so no credential is kept in clear.
fn key(url: &url::Url, authorization: Option<&str>) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(url.as_str().as_bytes());
    h.update([0]);
    h.update(authorization.unwrap_or("").as_bytes());
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::routing::get;
    use std::sync::atomic::{AtomicU64, Ordering};

    async fn token_server(expires_in: u64) -> (String, Arc<AtomicU64>) {
        let hits = Arc::new(AtomicU64::new(0));
        let h = hits.clone();
        let app = Router::new().route(
            "/token",
            get(move |headers: http::HeaderMap| {
                let h = h.clone();
                async move {
                    let n = h.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if headers.get("authorization").is_none() {
                        return (http::StatusCode::UNAUTHORIZED, "no".to_owned());
                    }
                    (
                        http::StatusCode::OK,
                        format!(r#"{{"token":"t{n}","expires_in":{expires_in}}}"#),
                    )
                }
            }),
        );
        let addr = serve(app).await;
        (format!("http://{addr}/token"), hits)
    }

    /// Serves `app` on a loopback port; its address.
    async fn serve(app: Router) -> std::net::SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(l, app).await });
        addr
    }

    #[tokio::test]
    async fn concurrent_identical_requests_share_one_fetch_and_reuse_it() {
        let (base, hits) = token_server(300).await;
        let cache = TokenCache::new(reqwest::Client::new());
        let url =
            url::Url::parse(&format!("{base}?service=r&scope=repository:a:pull")).expect("url");
        let answers =
            futures::future::join_all((0..10).map(|_| cache.get(&url, Some("Basic YTpi")))).await;
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        for a in &answers {
            let a = a.as_ref().expect("answer");
            assert_eq!(a.status, 200);
            assert_eq!(&a.body[..], br#"{"token":"t0","expires_in":300}"#);
        }
        // Reused while fresh; other credentials and other scopes are other entries.
        cache.get(&url, Some("Basic YTpi")).await.expect("again");
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        cache
            .get(&url, Some("Basic Yzpk"))
            .await
            .expect("other user");
        let other =
            url::Url::parse(&format!("{base}?service=r&scope=repository:b:pull")).expect("url");
        cache
            .get(&other, Some("Basic YTpi"))
            .await
            .expect("other scope");
        assert_eq!(hits.load(Ordering::SeqCst), 3);
        assert_eq!(cache.upstream_requests(), 3);
    }

    #[tokio::test]
    async fn a_token_flood_stays_within_the_cache_bounds() {
        // 1 MiB answers that claim to live for 30 years, each for another scope.
        let app = Router::new().route(
            "/token",
            get(|| async {
                let token = "t".repeat(MAX_BODY - 64);
                format!(r#"{{"token":"{token}","expires_in":1000000000}}"#)
            }),
        );
        let addr = serve(app).await;
        let cache = TokenCache::new(reqwest::Client::new());
        for i in 0..48 {
            let url = url::Url::parse(&format!("http://{addr}/token?scope=repository:r{i}:pull"))
                .expect("url");
            let a = cache.get(&url, None).await.expect("answer");
            assert_eq!(a.status, 200);
            assert!(a.reuse_for <= MAX_REUSE);
        }
        let (entries, bytes) = cache.usage();
        assert!(bytes <= MAX_BYTES, "{bytes} bytes kept");
        assert!(entries < 48, "{entries} entries kept");
    }

    #[tokio::test]
    async fn an_answer_without_a_length_stops_at_the_bound() {
        // A chunked body that never ends: refused once past MAX_BODY, not read to the end.
        let app = Router::new().route(
            "/token",
            get(|| async {
                let chunks = futures::stream::repeat_with(|| {
                    Ok::<_, std::io::Error>(bytes::Bytes::from_static(&[b't'; 64 * 1024]))
                });
                axum::body::Body::from_stream(chunks)
            }),
        );
        let addr = serve(app).await;
        let cache = TokenCache::new(reqwest::Client::new());
        let url = url::Url::parse(&format!("http://{addr}/token")).expect("url");
        let err = tokio::time::timeout(Duration::from_secs(20), cache.get(&url, None))
            .await
            .expect("the fetch stops")
            .expect_err("endless answer");
        assert!(err.contains("larger than"), "{err}");
        assert_eq!(cache.usage().1, 0);
    }

    #[tokio::test]
    async fn refusals_and_short_lived_tokens_are_not_kept() {
        let (base, hits) = token_server(0).await;
        let cache = TokenCache::new(reqwest::Client::new());
        let url = url::Url::parse(&base).expect("url");
        assert_eq!(cache.get(&url, None).await.expect("401").status, 401);
        assert_eq!(cache.get(&url, None).await.expect("401").status, 401);
        cache.get(&url, Some("Basic YTpi")).await.expect("ok");
        cache.get(&url, Some("Basic YTpi")).await.expect("ok");
        assert_eq!(hits.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn an_unreachable_token_server_is_named() {
        let cache = TokenCache::new(reqwest::Client::new());
        let url = url::Url::parse("http://127.0.0.1:1/token").expect("url");
        let err = cache.get(&url, None).await.expect_err("down");
        assert!(err.contains("127.0.0.1"), "{err}");
    }
}
