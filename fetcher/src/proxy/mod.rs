//! The registry proxy on dfdaemon's proxy port (65001), mirror mode: docker `registry-mirrors`,
//! containerd `hosts.toml` (which adds `?ns=<registry host>`), podman/skopeo `registries.conf`
//! mirrors. Blob downloads by digest become P2P tasks keyed by the digest; everything else
//! (ping, manifests, tags, tokens, pushes) is passed through unchanged, streamed.

mod blob;
mod passthrough;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::error::{Error, Result};
use crate::peer::Peer;
use crate::shutdown::Shutdown;
use crate::upload;

/// Proxy settings.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub addr: SocketAddr,
    /// The registry to mirror when the client does not name one (`?ns=`), e.g. `https://harbor.example.com`.
    pub registry_mirror: Option<url::Url>,
    /// Extra CA certificates (PEM) for HTTPS registries.
    pub upstream_ca: Option<PathBuf>,
}

pub(crate) struct Proxy {
    peer: Peer,
    mirror: Option<url::Url>,
    client: reqwest::Client,
}

/// Starts the proxy; it stops with `shutdown`. Returns the bound address.
pub async fn serve(cfg: ProxyConfig, peer: Peer, shutdown: Shutdown) -> Result<SocketAddr> {
    let mut b = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy();
    if let Some(path) = &cfg.upstream_ca {
        let pem = std::fs::read(path).map_err(|e| Error::io("cannot read CA file", path, e))?;
        for c in reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| Error::invalid("CA file", format!("{}: {e}", path.display())))?
        {
            b = b.add_root_certificate(c);
        }
    }
    let client = b.build().map_err(|e| Error::invalid("HTTP client", e))?;
    let proxy = Arc::new(Proxy {
        peer,
        mirror: cfg.registry_mirror,
        client,
    });
    let router = Router::new().fallback(handle).with_state(proxy);
    let (addr, _) = upload::serve(cfg.addr, router, shutdown)
        .await
        .map_err(|e| Error::io("cannot bind proxy on", cfg.addr.to_string(), e))?;
    Ok(addr)
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, format!("{}\n", msg.into())).into_response()
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
    /// The upstream URL for a request: the registry named by `?ns=` or the configured mirror, with
    /// the same path and the query minus `ns`.
    fn target(&self, uri: &http::Uri) -> Result<url::Url, String> {
        let pairs: Vec<(String, String)> = uri
            .query()
            .map(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .into_owned()
                    .collect()
            })
            .unwrap_or_default();
        let ns = pairs
            .iter()
            .find(|(k, _)| k == "ns")
            .map(|(_, v)| v.clone());
        let base = match (ns, &self.mirror) {
            (Some(ns), Some(m))
                if m.host_str().map(|h| match m.port() {
                    Some(p) => format!("{h}:{p}"),
                    None => h.to_owned(),
                }) == Some(ns.clone()) =>
            {
                m.clone()
            }
            (Some(ns), _) => url::Url::parse(&format!("https://{ns}"))
                .map_err(|e| format!("bad ns {ns:?}: {e}"))?,
            (None, Some(m)) => m.clone(),
            (None, None) => {
                return Err("no upstream registry: run dfdaemon with --registry-mirror URL, or use a client that adds ?ns=<registry>".into());
            }
        };
        let mut target = base
            .join(uri.path())
            .map_err(|e| format!("bad path: {e}"))?;
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
}

#[tracing::instrument(skip_all, fields(method = %req.method(), path = %req.uri().path()))]
async fn handle(State(p): State<Arc<Proxy>>, req: Request<Body>) -> Response {
    let path = req.uri().path().to_owned();
    if path != "/v2" && !path.starts_with("/v2/") {
        return text(
            StatusCode::NOT_FOUND,
            "dfdaemon proxy: only the registry API (/v2/...) is served here",
        );
    }
    let target = match p.target(req.uri()) {
        Ok(t) => t,
        Err(msg) => return text(StatusCode::BAD_GATEWAY, msg),
    };
    if req.method() == http::Method::GET
        && let Some(digest) = blob_digest(&path)
    {
        return blob::serve(&p, req.headers(), target, digest.to_owned()).await;
    }
    passthrough::forward(&p.client, req, target).await
}

#[cfg(test)]
mod tests {
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
}
