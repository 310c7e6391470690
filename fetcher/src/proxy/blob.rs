//! Blob downloads by digest through P2P. The registry first answers a `HEAD` with the client's own
//! credentials, so a client the registry would refuse gets the registry's 401/403 even when peers
//! hold the blob; then the bytes come from the P2P task keyed by the digest, verified piece by
//! piece and as a whole before the last byte is sent.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use futures::StreamExt;
use tokio::sync::{mpsc, watch};

use super::Proxy;
use super::passthrough::copy_headers;
use crate::download::{BackSource, Destination, DownloadRequest, Progress};

/// Request headers that carry the client's identity to the registry (and, through the supernode,
/// to the origin fetch).
const CREDENTIAL_HEADERS: [header::HeaderName; 2] = [header::AUTHORIZATION, header::COOKIE];

pub(crate) async fn serve(
    p: &Proxy,
    headers: &HeaderMap,
    target: url::Url,
    digest: String,
) -> Response {
    let mut fwd = HeaderMap::new();
    copy_headers(headers, &mut fwd);
    let head = match p.client.head(target.clone()).headers(fwd).send().await {
        Ok(r) => r,
        Err(e) => {
            let host = target.host_str().unwrap_or("upstream").to_owned();
            return super::text(
                StatusCode::BAD_GATEWAY,
                format!(
                    "dfdaemon proxy: registry {host} unreachable: {}",
                    crate::source::error_chain(&e)
                ),
            );
        }
    };
    let status = head.status();
    if !(status.is_success() || status.is_redirection()) {
        // The registry's refusal (401 with its WWW-Authenticate, 403, 404...) goes back as it is.
        if status == reqwest::StatusCode::UNAUTHORIZED {
            p.tokens.learn(&target, head.headers());
        }
        let mut out = Response::builder().status(status.as_u16());
        if let Some(h) = out.headers_mut() {
            copy_headers(head.headers(), h);
            h.remove(header::CONTENT_LENGTH);
        }
        return out
            .body(Body::empty())
            .unwrap_or_else(|_| super::text(StatusCode::BAD_GATEWAY, "bad upstream answer"));
    }
    // (reqwest's `content_length()` is the HEAD response's own empty body: read the header.)
    let length: Option<u64> = status
        .is_success()
        .then(|| {
            head.headers()
                .get(header::CONTENT_LENGTH)?
                .to_str()
                .ok()?
                .parse()
                .ok()
        })
        .flatten();
    let credentials: Vec<(String, String)> = CREDENTIAL_HEADERS
        .iter()
        .filter_map(|n| {
            headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(|v| (n.as_str().to_owned(), v.to_owned()))
        })
        .collect();
    let (tx, rx) = mpsc::channel(8);
    let req = DownloadRequest {
        url: target.to_string(),
        output: Destination::Stream(tx),
        headers: credentials,
        digest: fetcher_digest(&digest),
        tag: String::new(),
        filter: Vec::new(),
        limit_rate: 0,
        back_source: BackSource::Auto,
        timeout: None,
        content_key: Some(digest.clone()),
        seed_only: false,
    };
    let peer = p.peer.clone();
    tokio::spawn(async move {
        let (ptx, _prx) = watch::channel(Progress::default());
        match peer.download(&req, &ptx).await {
            Ok(s) => {
                tracing::info!(digest = %req.content_key.as_deref().unwrap_or(""), from_peers = s.progress.from_peers, from_supernode = s.progress.from_supernode, from_origin = s.progress.from_origin, "blob served")
            }
            Err(e) => {
                tracing::warn!(url = %crate::source::redact(&req.url), error = %e, "blob download failed")
            }
        }
    });
    let body =
        tokio_stream::wrappers::ReceiverStream::new(rx).map(|r| r.map_err(std::io::Error::other));
    let mut out = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header("docker-content-digest", digest.as_str());
    if let Some(len) = length {
        out = out.header(header::CONTENT_LENGTH, len);
    }
    out.body(Body::from_stream(body))
        .unwrap_or_else(|_| super::text(StatusCode::BAD_GATEWAY, "bad response"))
}

fn fetcher_digest(digest: &str) -> Option<String> {
    crate::task_id::parse_digest(digest).ok()
}
