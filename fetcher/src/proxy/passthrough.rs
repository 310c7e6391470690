//! Requests that are not P2P blob downloads go to the registry unchanged, streamed both ways.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, StatusCode};
use axum::response::Response;

/// Hop-by-hop headers (RFC 9110 §7.6.1) and Host, which never cross a proxy.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
    )
}

/// Copies end-to-end headers: not the hop-by-hop ones, nor those `Connection` names as such.
pub(crate) fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    let named: Vec<String> = from
        .get_all(axum::http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    for (k, v) in from {
        if !hop_by_hop(k) && !named.iter().any(|n| n == k.as_str()) {
            to.append(k.clone(), v.clone());
        }
    }
}

/// Forwards `req` to `target` and streams the answer back.
pub(crate) async fn forward(p: &super::Proxy, req: Request<Body>, target: url::Url) -> Response {
    let (parts, body) = req.into_parts();
    let mut headers = HeaderMap::new();
    copy_headers(&parts.headers, &mut headers);
    let has_body = !matches!(parts.method, http::Method::GET | http::Method::HEAD)
        || parts.headers.contains_key(http::header::CONTENT_LENGTH);
    let mut rb = p
        .client
        .request(parts.method.clone(), target.clone())
        .headers(headers);
    if has_body {
        rb = rb.body(reqwest::Body::wrap_stream(body.into_data_stream()));
    }
    let resp = match rb.send().await {
        Ok(r) => r,
        Err(e) => {
            let host = target.host_str().unwrap_or("upstream").to_owned();
            tracing::warn!(target = %crate::source::redact(target.as_str()), error = %crate::source::error_chain(&e), "upstream unreachable");
            return super::text(
                StatusCode::BAD_GATEWAY,
                format!(
                    "dfdaemon proxy: registry {host} unreachable: {}",
                    crate::source::error_chain(&e)
                ),
            );
        }
    };
    let status = resp.status();
    if status == reqwest::StatusCode::UNAUTHORIZED {
        p.tokens.learn(&target, resp.headers());
    }
    let mut out = Response::builder().status(status.as_u16());
    if let Some(h) = out.headers_mut() {
        copy_headers(resp.headers(), h);
    }
    out.body(Body::from_stream(resp.bytes_stream()))
        .unwrap_or_else(|_| {
            super::text(
                StatusCode::BAD_GATEWAY,
                "dfdaemon proxy: bad upstream response",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_stay_behind() {
        let mut from = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, X-Hop ,x-other"),
            ("x-hop", "1"),
            ("x-other", "2"),
            ("keep-alive", "timeout=5"),
            ("host", "evil.example"),
            ("accept", "application/json"),
            ("authorization", "Bearer t"),
        ] {
            from.append(
                HeaderName::from_static(k),
                axum::http::HeaderValue::from_static(v),
            );
        }
        let mut to = HeaderMap::new();
        copy_headers(&from, &mut to);
        let mut kept: Vec<&str> = to.keys().map(HeaderName::as_str).collect();
        kept.sort_unstable();
        assert_eq!(kept, ["accept", "authorization"]);
    }
}
