//! HTTP(S) origins through `reqwest` (rustls; system roots plus optional extra CA files, and per
//! registry host the CA, client certificate and `skip_verify` of containerd's `hosts.toml`
//! files, [`super::hosts`], when a hosts directory is given).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http::header;

use super::{HeaderPair, error_chain};
use crate::error::{Error, Result};

/// A client for HTTP(S) origins. Cheap to clone.
#[derive(Clone, Debug)]
pub struct HttpSource {
    client: reqwest::Client,
    /// Checked before every request and redirect (supernodes); `None`: a peer's own fetches.
    policy: Option<super::OriginPolicy>,
    /// Per-host TLS from containerd's host configs, if a directory was given.
    hosts: Option<Arc<HostClients>>,
}

/// Clients for origins whose `hosts.toml` sets TLS, built on first use.
#[derive(Debug)]
struct HostClients {
    dir: PathBuf,
    extra_ca: Vec<PathBuf>,
    /// By `scheme://host:port`; `None`: the host has no TLS settings of its own.
    built: Mutex<HashMap<String, Option<reqwest::Client>>>,
}

/// Host configs remembered at most (a supernode talks to a handful of registries).
const MAX_HOST_CLIENTS: usize = 256;

/// Request headers a caller may not set: the connection's framing and target are ours.
const NOT_FORWARDED: [&str; 6] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "te",
    "upgrade",
];

/// What the origin says about the content, from a response's headers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Probe {
    /// Total length of the content, when the origin tells it.
    pub content_length: Option<u64>,
    pub etag: String,
    pub last_modified: String,
}

/// A successful origin response whose body is yet to be read.
pub struct OriginResponse {
    pub url: String,
    pub probe: Probe,
    response: reqwest::Response,
}

impl HttpSource {
    /// The underlying HTTP client (for other requests to origins, e.g. registry tokens).
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// A client trusting the system roots and the PEM CA certificates in the `extra_ca` files.
    pub fn new(extra_ca: &[&Path]) -> Result<Self> {
        Self::build(extra_ca, None)
    }

    /// Like [`HttpSource::new`], with every request, redirect hop and resolved address checked
    /// against `policy` (what a supernode fetches on others' behalf).
    pub fn with_policy(extra_ca: &[&Path], policy: super::OriginPolicy) -> Result<Self> {
        Self::build(extra_ca, Some(policy))
    }

    /// The origin policy, if this source has one.
    pub fn policy(&self) -> Option<&super::OriginPolicy> {
        self.policy.as_ref()
    }

    /// Takes each registry host's TLS settings (CA, client certificate, `skip_verify`) from the
    /// containerd host configs under `dir` (`<dir>/<host[:port]>/hosts.toml`).
    pub fn with_hosts_dir(mut self, dir: &Path, extra_ca: &[&Path]) -> Self {
        self.hosts = Some(Arc::new(HostClients {
            dir: dir.to_path_buf(),
            extra_ca: extra_ca.iter().map(|p| p.to_path_buf()).collect(),
            built: Mutex::new(HashMap::new()),
        }));
        self
    }

    /// The client for requests to `url`: its host's own when its hosts.toml sets TLS for it.
    pub fn client_for(&self, url: &url::Url) -> Result<reqwest::Client> {
        let Some(h) = &self.hosts else {
            return Ok(self.client.clone());
        };
        let origin = format!(
            "{}://{}:{}",
            url.scheme(),
            url.host_str().unwrap_or(""),
            url.port_or_known_default().unwrap_or(0)
        );
        if let Some(c) = h.built.lock().ok().and_then(|m| m.get(&origin).cloned()) {
            return Ok(c.unwrap_or_else(|| self.client.clone()));
        }
        let tls = host_tls(&h.dir, url)?;
        let client = match tls {
            Some(tls) => {
                let cas: Vec<&Path> = h.extra_ca.iter().map(PathBuf::as_path).collect();
                Some(builder(self.policy.clone(), &cas, Some(&tls))?)
            }
            None => None,
        };
        if let Ok(mut m) = h.built.lock() {
            if m.len() >= MAX_HOST_CLIENTS {
                m.clear();
            }
            m.insert(origin, client.clone());
        }
        Ok(client.unwrap_or_else(|| self.client.clone()))
    }

    fn build(extra_ca: &[&Path], policy: Option<super::OriginPolicy>) -> Result<Self> {
        let client = builder(policy.clone(), extra_ca, None)?;
        Ok(Self {
            client,
            policy,
            hosts: None,
        })
    }

    /// GETs `url` with `headers`, optionally a byte range (inclusive end). Fails on non-2xx.
    pub async fn get(
        &self,
        url: &str,
        headers: &[HeaderPair],
        range: Option<(u64, u64)>,
    ) -> Result<OriginResponse> {
        let parsed = url::Url::parse(url)
            .map_err(|e| Error::invalid("URL", format!("{}: {e}", super::redact(url))))?;
        if let Some(p) = &self.policy {
            p.check(&parsed)?;
        }
        let mut req = self.client_for(&parsed)?.get(url);
        for (k, v) in headers {
            if NOT_FORWARDED.iter().any(|n| k.eq_ignore_ascii_case(n)) {
                continue;
            }
            let name = header::HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| Error::invalid("header", format!("bad header name {k:?}")))?;
            let value = header::HeaderValue::from_str(v)
                .map_err(|_| Error::invalid("header", format!("bad value for header {k}")))?;
            req = req.header(name, value);
        }
        if let Some((start, end)) = range {
            req = req.header(header::RANGE, format!("bytes={start}-{end}"));
        }
        let response = req.send().await.map_err(|e| Error::OriginUnreachable {
            url: url.to_owned(),
            detail: error_chain(&e),
        })?;
        let status = response.status();
        if !status.is_success() {
            return Err(Error::OriginStatus {
                url: url.to_owned(),
                status: status.as_u16(),
            });
        }
        let h = response.headers();
        let text = |n: header::HeaderName| {
            h.get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        let content_length = if status == reqwest::StatusCode::PARTIAL_CONTENT {
            let bad = |detail: String| Error::OriginBody {
                url: url.to_owned(),
                detail,
            };
            let Some((start, _)) = range else {
                return Err(bad("206 Partial Content to a request without Range".into()));
            };
            let cr = text(header::CONTENT_RANGE);
            let (first, last, total) = parse_content_range(&cr)
                .ok_or_else(|| bad(format!("bad Content-Range {cr:?} in a 206")))?;
            if first != start {
                return Err(bad(format!(
                    "asked from byte {start}, got Content-Range {cr:?}"
                )));
            }
            if let Some(n) = response.content_length()
                && n != last - first + 1
            {
                return Err(bad(format!(
                    "Content-Length {n} disagrees with Content-Range {cr:?}"
                )));
            }
            total
        } else {
            response.content_length()
        };
        let probe = Probe {
            content_length,
            etag: text(header::ETAG),
            last_modified: text(header::LAST_MODIFIED),
        };
        Ok(OriginResponse {
            url: url.to_owned(),
            probe,
            response,
        })
    }

    /// Asks the origin about the content without downloading it (`Range: bytes=0-0`, which works for
    /// signed URLs that a HEAD would break). Fails with the origin's status if it refuses `headers`.
    pub async fn probe(&self, url: &str, headers: &[HeaderPair]) -> Result<Probe> {
        let r = self.get(url, headers, Some((0, 0))).await?;
        Ok(r.probe)
    }
}

impl OriginResponse {
    /// The response's `Content-Type` (empty when it has none or it is not text).
    pub fn content_type(&self) -> &str {
        self.response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The whole body, refused past `max` bytes (a document, never a blob).
    pub async fn bytes_bounded(self, max: usize) -> Result<Bytes> {
        let url = self.url;
        super::read_bounded(self.response, max)
            .await
            .map_err(|e| Error::OriginBody {
                url,
                detail: e.to_string(),
            })
    }

    /// True for a 206 (the body is the range asked for, checked against Content-Range).
    pub fn partial(&self) -> bool {
        self.response.status() == reqwest::StatusCode::PARTIAL_CONTENT
    }

    /// Bytes announced by this response (its own Content-Length).
    pub fn body_length(&self) -> Option<u64> {
        self.response.content_length()
    }

    /// The body as a stream of chunks; a body shorter than announced ends with [`Error::OriginBody`].
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes>> + Send + 'static {
        let expected = self.response.content_length();
        let url = self.url;
        let mut got: u64 = 0;
        let mut inner = self.response.bytes_stream();
        async_stream(move |tx| async move {
            while let Some(item) = inner.next().await {
                match item {
                    Ok(b) => {
                        got += b.len() as u64;
                        if tx.send(Ok(b)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let detail = format!("after {got} bytes: {}", error_chain(&e));
                        let _ = tx
                            .send(Err(Error::OriginBody {
                                url: url.clone(),
                                detail,
                            }))
                            .await;
                        return;
                    }
                }
            }
            if let Some(exp) = expected.filter(|&e| e != got) {
                let detail = format!("got {got} of {exp} bytes announced by Content-Length");
                let _ = tx.send(Err(Error::OriginBody { url, detail })).await;
            }
        })
    }
}

/// Parses `bytes <first>-<last>/<total|*>` strictly: `first <= last`, and `last < total` when the
/// total is known. Returns the total as `None` for `*`.
pub fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    fn digits(s: &str) -> Option<&str> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit())).then_some(s)
    }
    let first: u64 = digits(a)?.parse().ok()?;
    let last: u64 = digits(b)?.parse().ok()?;
    let total = match total {
        "*" => None,
        t => Some(digits(t)?.parse::<u64>().ok()?),
    };
    if first > last || total.is_some_and(|t| last >= t) {
        return None;
    }
    Some((first, last, total))
}

/// A tiny channel-backed stream generator (avoids a macro crate for one use).
fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<Bytes>> + Send + 'static
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Bytes>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A client trusting the system roots and `extra_ca`, with `policy` on every request, redirect and
/// resolved address, and a host's own TLS settings when given.
fn builder(
    policy: Option<super::OriginPolicy>,
    extra_ca: &[&Path],
    host: Option<&super::hosts::TlsSettings>,
) -> Result<reqwest::Client> {
    let redirect = match policy.clone() {
        None => reqwest::redirect::Policy::limited(10),
        Some(p) => reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= 10 {
                return attempt.error("more than 10 redirects");
            }
            match p.check(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(e) => attempt.error(e.to_string()),
            }
        }),
    };
    let mut b = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .redirect(redirect)
        .user_agent(concat!("damselfly/", env!("CARGO_PKG_VERSION")));
    if let Some(p) = &policy {
        b = b.dns_resolver(std::sync::Arc::new(super::policy::PolicyResolver(
            p.clone(),
        )));
    }
    for path in extra_ca {
        b = super::hosts::add_ca(b, path)?;
    }
    if let Some(tls) = host {
        b = super::hosts::apply_tls(b, tls)?;
    }
    b.build()
        .map_err(|e| Error::invalid("HTTP client", error_chain(&e)))
}

/// The TLS settings `hosts.toml` gives the endpoint `url` is on (its server or a mirror).
fn host_tls(dir: &Path, url: &url::Url) -> Result<Option<super::hosts::TlsSettings>> {
    let host = url.host_str().unwrap_or("");
    let origin = |u: &url::Url| {
        (
            u.scheme().to_owned(),
            u.host_str().map(str::to_owned),
            u.port_or_known_default(),
        )
    };
    // containerd names a registry's directory as image references name it: with the port when
    // it is not the scheme's default, and sometimes with it anyway.
    let mut names = vec![host.to_owned()];
    if let Some(port) = url.port_or_known_default() {
        names.insert(0, format!("{host}:{port}"));
    }
    for name in names {
        let Ok(server) = url::Url::parse(&format!("{}://{name}", url.scheme())) else {
            continue;
        };
        let hosts = super::hosts::load(dir, &name, &server)
            .map_err(|e| Error::invalid("registry host config", e))?;
        if let Some(h) = hosts
            && let Some(e) = h.endpoints.iter().find(|e| origin(&e.url) == origin(url))
        {
            let t = &e.tls;
            return Ok(
                (t.skip_verify || !t.ca.is_empty() || !t.client.is_empty()).then(|| t.clone())
            );
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        // Fuzz-style: any header value parses or is refused, never panics; real ones round-trip.
        #[test]
        fn content_range_parsing_is_total(v in "\\PC{0,60}") {
            let _ = parse_content_range(&v);
        }

        #[test]
        fn content_ranges_round_trip(start in 0u64..1 << 50, span in 0u64..1 << 40, extra in 0u64..1 << 40) {
            let end = start + span;
            let total = end + 1 + extra;
            prop_assert_eq!(
                parse_content_range(&format!("bytes {start}-{end}/{total}")),
                Some((start, end, Some(total)))
            );
            prop_assert_eq!(
                parse_content_range(&format!("bytes {start}-{end}/*")),
                Some((start, end, None))
            );
        }
    }

    use super::{HttpSource, parse_content_range};
    use crate::error::Error;

    /// A loopback origin answering every GET with 206, `Content-Range: <range>` and `body`.
    async fn partial_origin(range: &'static str, body: &'static str) -> String {
        let app = axum::Router::new().route(
            "/x",
            axum::routing::get(move || async move {
                (
                    axum::http::StatusCode::PARTIAL_CONTENT,
                    [(axum::http::header::CONTENT_RANGE, range)],
                    body,
                )
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(l, app).await });
        format!("http://{addr}/x")
    }

    #[tokio::test]
    async fn inconsistent_partial_answers_are_origin_errors() {
        let src = HttpSource::new(&[]).expect("client");
        let url = partial_origin("bytes 0-9/100", "0123456789").await;
        // 206 to a request without Range.
        let e = src.get(&url, &[], None).await.err().expect("refused");
        assert!(matches!(e, Error::OriginBody { .. }), "{e}");
        assert!(src.get(&url, &[], Some((0, 9))).await.is_ok());
        // Not where asked.
        assert!(src.get(&url, &[], Some((5, 9))).await.is_err());
        // Content-Length disagrees with the range.
        let short = partial_origin("bytes 0-9/100", "01234").await;
        assert!(src.get(&short, &[], Some((0, 9))).await.is_err());
    }

    #[tokio::test]
    async fn a_policy_source_refuses_loopback_before_sending() {
        let url = partial_origin("bytes 0-0/1", "0").await;
        let src =
            HttpSource::with_policy(&[], crate::source::OriginPolicy::default()).expect("client");
        let e = src
            .get(&url, &[], Some((0, 0)))
            .await
            .err()
            .expect("refused");
        assert!(matches!(e, Error::Refused { .. }), "{e}");
    }

    #[test]
    fn content_range_is_parsed_strictly() {
        assert_eq!(
            parse_content_range("bytes 0-0/12345"),
            Some((0, 0, Some(12345)))
        );
        assert_eq!(parse_content_range("bytes 10-19/*"), Some((10, 19, None)));
        for bad in [
            "",
            "bytes 0-0",
            "bytes 5-4/10",
            "bytes 0-10/10",
            "bytes -1-2/3",
            "bytes 0-1/+3",
            "items 0-0/1",
            "bytes 0-99999999999999999999999/1",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad:?}");
        }
    }
}
