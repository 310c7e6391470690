//! The registry proxy on dfdaemon's proxy port (65001).
//!
//! - Mirror mode: docker `registry-mirrors`, containerd `hosts.toml` (which adds `?ns=<registry>`),
//!   podman/skopeo `registries.conf` mirrors send `/v2/...` here.
//! - Proxy mode: clients with `HTTPS_PROXY` send `CONNECT host:port`; a host in `--hijack` gets a
//!   certificate from our CA ([`ca`]) and its traffic is handled like mirror mode, any other host is
//!   tunneled untouched. `GET /ca.crt` serves the CA certificate.
//!
//! Either way, blob downloads by digest become P2P tasks keyed by the digest ([`blob`]); everything
//! else (ping, manifests, tags, tokens, pushes) is passed through unchanged, streamed ([`passthrough`]).

mod blob;
pub mod ca;
mod connect;
mod passthrough;
mod server;
mod token;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

pub use ca::CaFiles;

use crate::error::{Error, Result};
use crate::peer::Peer;
use crate::shutdown::Shutdown;

/// Proxy settings.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub addr: SocketAddr,
    /// The registry to mirror when the client does not name one (`?ns=`), e.g. `https://harbor.example.com`.
    pub registry_mirror: Option<url::Url>,
    /// Extra CA certificates (PEM) for HTTPS registries.
    pub upstream_ca: Option<PathBuf>,
    /// Skip certificate verification of upstream registries (never by default; logged loudly).
    pub insecure_upstream: bool,
    /// Hosts whose `CONNECT` is intercepted: `host`, `host:port`, `*.domain` or `*`.
    pub hijack: Vec<String>,
    /// The interception CA (created on first start when absent).
    pub ca: CaFiles,
    /// Which registries the proxy fetches from (every request, after DNS resolution); the
    /// mirror and the hijacked hosts count as named (see [`named_origins`]).
    pub policy: crate::source::OriginPolicy,
}

/// The URL prefixes an agent's config names as registries: the mirror, and each hijacked host
/// (`*` names nothing: then every host is the client's choice).
pub fn named_origins(mirror: Option<&url::Url>, hijack: &[String]) -> Vec<String> {
    let mut named: Vec<String> = mirror.map(|m| m.to_string()).into_iter().collect();
    for h in hijack.iter().filter(|h| h.as_str() != "*") {
        let (host, port) = match h.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') => (host, port),
            _ => (h.as_str(), "*"),
        };
        for scheme in ["https", "http"] {
            named.push(format!("{scheme}://{host}:{port}/"));
        }
    }
    named
}

/// Which connection a request arrived on.
#[derive(Clone, Debug)]
pub(crate) enum Listener {
    /// The proxy port itself: mirror requests, `CONNECT`, absolute-form proxy requests, `/ca.crt`.
    Entry,
    /// A hijacked TLS stream to this origin (`https://host:port/`): every path goes there.
    Hijacked(url::Url),
}

pub(crate) struct Proxy {
    peer: Peer,
    mirror: Option<url::Url>,
    policy: crate::source::OriginPolicy,
    client: reqwest::Client,
    hijack: Vec<String>,
    ca: ca::CertAuthority,
    tokens: token::Tokens,
    shutdown: Shutdown,
}

/// Starts the proxy; it stops with `shutdown`. Returns the bound address.
pub async fn serve(cfg: ProxyConfig, peer: Peer, shutdown: Shutdown) -> Result<SocketAddr> {
    let mut b = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .dns_resolver(Arc::new(crate::source::policy::PolicyResolver(
            cfg.policy.clone(),
        )))
        .no_proxy();
    if let Some(path) = &cfg.upstream_ca {
        let pem = std::fs::read(path).map_err(|e| Error::io("cannot read CA file", path, e))?;
        for c in reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| Error::invalid("CA file", format!("{}: {e}", path.display())))?
        {
            b = b.add_root_certificate(c);
        }
    }
    if cfg.insecure_upstream {
        tracing::warn!(
            "--insecure-upstream: registry certificates are NOT verified; anyone on the path can read and alter pulls"
        );
        b = b.danger_accept_invalid_certs(true);
    }
    let client = b.build().map_err(|e| Error::invalid("HTTP client", e))?;
    let ca = ca::CertAuthority::load_or_create(&cfg.ca)?;
    let hijack = cfg.hijack.iter().map(|h| h.to_ascii_lowercase()).collect();
    let proxy = Arc::new(Proxy {
        peer,
        mirror: cfg.registry_mirror,
        policy: cfg.policy,
        tokens: token::Tokens::new(client.clone()),
        client,
        hijack,
        ca,
        shutdown,
    });
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .map_err(|e| Error::io("cannot bind proxy on", cfg.addr.to_string(), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("cannot bind proxy on", cfg.addr.to_string(), e))?;
    tokio::spawn(server::accept_loop(listener, proxy));
    Ok(addr)
}

pub(crate) fn text(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, format!("{}\n", msg.into())).into_response()
}

/// 403 for an upstream the origin policy refuses (counted as `refused`).
fn refused(p: &Proxy, e: Error) -> Response {
    p.count("refused");
    tracing::warn!(error = %e, "proxy request refused by the origin policy");
    text(StatusCode::FORBIDDEN, format!("dfdaemon proxy: {e}"))
}

/// Does `pattern` (`host`, `host:port`, `*.domain`, `*`) name `host:port`?
fn host_matches(pattern: &str, host: &str, port: u16) -> bool {
    let host = host.to_ascii_lowercase();
    if pattern == "*" {
        return true;
    }
    let (pat_host, pat_port) = match pattern.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, p.parse::<u16>().ok()),
        _ => (pattern, None),
    };
    if pat_port.is_some_and(|p| p != port) {
        return false;
    }
    match pat_host.strip_prefix("*.") {
        Some(domain) => host
            .strip_suffix(domain)
            .is_some_and(|rest| rest.ends_with('.')),
        None => pat_host == host,
    }
}

/// Routes one request by the connection it came on. (Boxed: a hijacked connection is served from
/// inside a request, and the boxed type breaks that cycle for the compiler.)
pub(crate) fn dispatch(
    p: Arc<Proxy>,
    req: Request<Body>,
    listener: Listener,
) -> futures::future::BoxFuture<'static, Response> {
    Box::pin(dispatch_inner(p, req, listener))
}

async fn dispatch_inner(p: Arc<Proxy>, req: Request<Body>, listener: Listener) -> Response {
    if let Listener::Hijacked(base) = listener {
        return registry(&p, req, Some(base)).await;
    }
    if req.method() == http::Method::CONNECT {
        return connect::connect(p, req).await;
    }
    // Absolute-form (`GET http://host/...`): a plain-HTTP proxy request.
    if let (Some(scheme), Some(authority)) = (req.uri().scheme_str(), req.uri().authority()) {
        let origin = match url::Url::parse(&format!("{scheme}://{authority}/")) {
            Ok(u) => u,
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("dfdaemon proxy: {e}")),
        };
        let port = origin.port_or_known_default().unwrap_or(80);
        if p.hijacks(origin.host_str().unwrap_or(""), port) {
            return registry(&p, req, Some(origin)).await;
        }
        let target = upstream_url(&origin, req.uri());
        if let Err(e) = p.policy.check(&target) {
            return refused(&p, e);
        }
        p.count("passthrough");
        return passthrough::forward(&p, req, target).await;
    }
    let path = req.uri().path();
    if path == "/ca.crt" && req.method() == http::Method::GET {
        return (
            [(header::CONTENT_TYPE, "application/x-x509-ca-cert")],
            p.ca.cert_pem().to_owned(),
        )
            .into_response();
    }
    if path == token::MIRROR_TOKEN_PATH {
        return token::mirror_token(&p, req).await;
    }
    if path != "/v2" && !path.starts_with("/v2/") {
        return text(
            StatusCode::NOT_FOUND,
            "dfdaemon proxy: only the registry API (/v2/...) and /ca.crt are served here",
        );
    }
    registry(&p, req, None).await
}

/// `origin` with the request's path and query.
fn upstream_url(origin: &url::Url, uri: &http::Uri) -> url::Url {
    let mut t = origin.clone();
    t.set_path(uri.path());
    t.set_query(uri.query());
    t
}

/// A registry request for `origin` (hijacked) or, in mirror mode, for the registry the request names.
#[tracing::instrument(skip_all, fields(method = %req.method(), path = %req.uri().path()))]
async fn registry(p: &Proxy, req: Request<Body>, origin: Option<url::Url>) -> Response {
    // Mirror mode: the registry's token realms are pointed back at us, so token requests come here.
    let via = origin
        .is_none()
        .then(|| token::proxy_base(req.headers()))
        .flatten();
    let mut resp = registry_inner(p, req, origin).await;
    if let Some(via) = via {
        token::point_realms_at(resp.headers_mut(), &via);
    }
    resp
}

async fn registry_inner(p: &Proxy, req: Request<Body>, origin: Option<url::Url>) -> Response {
    let target = match &origin {
        Some(o) => upstream_url(o, req.uri()),
        None => match mirror_target(p.mirror.as_ref(), req.uri()) {
            Ok(t) => t,
            Err(msg) => return text(StatusCode::BAD_GATEWAY, msg),
        },
    };
    if let Err(e) = p.policy.check(&target) {
        return refused(p, e);
    }
    if req.method() == http::Method::GET
        && let Some(digest) = blob_digest(req.uri().path())
    {
        let digest = digest.to_owned();
        p.count("blob");
        return blob::serve(p, req.headers(), target, digest).await;
    }
    if req.method() == http::Method::GET && p.tokens.is_token_request(&target) {
        p.count("token");
        return token::serve(p, req.headers(), target).await;
    }
    p.count("passthrough");
    passthrough::forward(p, req, target).await
}

/// `/v2/<name>/blobs/sha256:<hex>` → the digest.
fn blob_digest(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v2/")?;
    let (name, digest) = rest.rsplit_once("/blobs/")?;
    let hex_part = digest.strip_prefix("sha256:")?;
    (!name.is_empty() && hex_part.len() == 64 && hex_part.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some(digest)
}

impl Proxy {
    fn count(&self, kind: &str) {
        self.peer
            .metrics()
            .proxy_requests
            .with_label_values(&[kind])
            .inc();
    }

    fn hijacks(&self, host: &str, port: u16) -> bool {
        self.hijack.iter().any(|pat| host_matches(pat, host, port))
    }
}

/// The decoded query parameters of `uri`, in order.
pub(crate) fn query_pairs(uri: &http::Uri) -> Vec<(String, String)> {
    uri.query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default()
}

/// The upstream URL of a mirror-mode request: the registry named by `?ns=` (containerd) or the
/// configured mirror (whose path prefix, if any, is kept), with the request's path and its query
/// minus `ns`.
fn mirror_target(mirror: Option<&url::Url>, uri: &http::Uri) -> Result<url::Url, String> {
    let pairs = query_pairs(uri);
    let ns = pairs
        .iter()
        .find(|(k, _)| k == "ns")
        .map(|(_, v)| v.as_str());
    let authority = |m: &url::Url| {
        m.host_str().map(|h| match m.port() {
            Some(p) => format!("{h}:{p}"),
            None => h.to_owned(),
        })
    };
    let base = match (ns, mirror) {
        (Some(ns), Some(m)) if authority(m).as_deref() == Some(ns) => m.clone(),
        // containerd names Docker Hub "docker.io"; its registry API is registry-1.docker.io.
        (Some("docker.io"), _) => {
            url::Url::parse("https://registry-1.docker.io/").map_err(|e| format!("bad ns: {e}"))?
        }
        (Some(ns), _) => url::Url::parse(&format!("https://{ns}/"))
            .ok()
            .filter(|u| u.path() == "/" && u.query().is_none())
            .ok_or_else(|| format!("bad ns {ns:?}: not a registry host"))?,
        (None, Some(m)) => m.clone(),
        (None, None) => {
            return Err("no upstream registry: run dfdaemon with --registry-mirror URL, or use a client that adds ?ns=<registry>".into());
        }
    };
    let mut target = base.clone();
    target.set_path(&format!(
        "{}{}",
        base.path().trim_end_matches('/'),
        uri.path()
    ));
    let rest: Vec<&(String, String)> = pairs.iter().filter(|(k, _)| k != "ns").collect();
    if rest.is_empty() {
        target.set_query(None);
    } else {
        target
            .query_pairs_mut()
            .clear()
            .extend_pairs(rest.iter().map(|(k, v)| (k, v)));
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        // Request targets and patterns a client or a config may send: parsed or refused.
        #[test]
        fn mirror_targets_and_paths_are_total(
            path in "/v2/[a-zA-Z0-9/._:-]{0,80}",
            query in "[a-zA-Z0-9=&%._:/@-]{0,80}",
            pattern in "\\PC{0,30}",
            host in "[a-zA-Z0-9.-]{0,30}",
            port in any::<u16>(),
        ) {
            if let Ok(uri) = format!("{path}?{query}").parse::<http::Uri>()
                && let Ok(t) = mirror_target(None, &uri)
            {
                prop_assert_eq!(t.scheme(), "https");
                prop_assert!(t.path().starts_with("/v2"));
            }
            let _ = blob_digest(&path);
            let _ = host_matches(&pattern, &host, port);
            let _ = named_origins(None, std::slice::from_ref(&pattern));
        }
    }

    use super::*;

    #[test]
    fn recognises_blob_paths_only() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            blob_digest(&format!("/v2/project/app/blobs/{d}")),
            Some(d.as_str())
        );
        assert_eq!(
            blob_digest(&format!("/v2/library/a/b/blobs/{d}")),
            Some(d.as_str())
        );
        assert_eq!(blob_digest(&format!("/v2/app/manifests/{d}")), None);
        assert_eq!(blob_digest("/v2/app/blobs/uploads/"), None);
        assert_eq!(blob_digest("/v2/app/blobs/sha256:xyz"), None);
    }

    #[test]
    fn the_mirror_and_hijacked_hosts_are_named_origins() {
        let m = url::Url::parse("http://10.0.0.5:5000/prefix/").expect("url");
        let named = named_origins(
            Some(&m),
            &[
                "harbor.corp:8443".into(),
                "*.corp.example".into(),
                "*".into(),
            ],
        );
        assert_eq!(
            named,
            [
                "http://10.0.0.5:5000/prefix/",
                "https://harbor.corp:8443/",
                "http://harbor.corp:8443/",
                "https://*.corp.example:*/",
                "http://*.corp.example:*/",
            ]
        );
        crate::source::OriginPolicy::default()
            .with_named(&named)
            .expect("every named origin parses");
    }

    #[test]
    fn mirror_targets() {
        let t = |mirror: Option<&str>, uri: &str| {
            let m = mirror.map(|m| url::Url::parse(m).expect("mirror"));
            let uri: http::Uri = uri.parse().expect("uri");
            mirror_target(m.as_ref(), &uri).map(|u| u.to_string())
        };
        assert_eq!(
            t(Some("https://harbor.example.com"), "/v2/p/a/manifests/v1").as_deref(),
            Ok("https://harbor.example.com/v2/p/a/manifests/v1")
        );
        assert_eq!(
            t(Some("https://mirror.example.com/prefix/"), "/v2/").as_deref(),
            Ok("https://mirror.example.com/prefix/v2/")
        );
        assert_eq!(
            t(
                Some("http://127.0.0.1:5000"),
                "/v2/a/tags/list?ns=127.0.0.1:5000&n=10"
            )
            .as_deref(),
            Ok("http://127.0.0.1:5000/v2/a/tags/list?n=10")
        );
        assert_eq!(
            t(None, "/v2/a/blobs/x?ns=quay.io").as_deref(),
            Ok("https://quay.io/v2/a/blobs/x")
        );
        assert_eq!(
            t(None, "/v2/?ns=docker.io").as_deref(),
            Ok("https://registry-1.docker.io/v2/")
        );
        assert!(t(None, "/v2/?ns=evil.com/path").is_err());
        assert!(t(None, "/v2/").is_err());
    }

    #[test]
    fn hijack_patterns() {
        assert!(host_matches("*", "any.host", 443));
        assert!(host_matches(
            "harbor.example.com",
            "Harbor.Example.com",
            443
        ));
        assert!(host_matches(
            "harbor.example.com",
            "harbor.example.com",
            5000
        ));
        assert!(host_matches(
            "harbor.example.com:5000",
            "harbor.example.com",
            5000
        ));
        assert!(!host_matches(
            "harbor.example.com:5000",
            "harbor.example.com",
            443
        ));
        assert!(host_matches("*.example.com", "a.b.example.com", 443));
        assert!(!host_matches("*.example.com", "example.com", 443));
        assert!(!host_matches("*.example.com", "badexample.com", 443));
        assert!(!host_matches(
            "harbor.example.com",
            "harbor.example.com.evil",
            443
        ));
    }
}
