//! `CONNECT host:port` (clients with `HTTPS_PROXY`): a host in `--hijack` is answered with a TLS
//! certificate signed by our CA and its registry traffic handled like mirror mode; any other host
//! is tunneled untouched.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::Response;
use hyper_util::rt::TokioIo;

use super::{Listener, Proxy, text};

pub(crate) async fn connect(p: Arc<Proxy>, req: Request<Body>) -> Response {
    let Some(authority) = req.uri().authority().cloned() else {
        return text(
            StatusCode::BAD_REQUEST,
            "dfdaemon proxy: CONNECT needs host:port",
        );
    };
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let Some(port) = authority.port_u16() else {
        return text(
            StatusCode::BAD_REQUEST,
            format!("dfdaemon proxy: CONNECT needs host:port, got {authority}"),
        );
    };
    if p.hijacks(&host, port) {
        let cfg = match p.ca.server_config(&host) {
            Ok(c) => c,
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("dfdaemon proxy: {e}")),
        };
        let base = match url::Url::parse(&format!("https://{authority}/")) {
            Ok(u) => u,
            Err(e) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("dfdaemon proxy: bad CONNECT target {authority}: {e}"),
                );
            }
        };
        p.count("hijack");
        tokio::spawn(async move {
            let upgraded = match hyper::upgrade::on(req).await {
                Ok(u) => u,
                Err(e) => return tracing::debug!(error = %e, "CONNECT upgrade failed"),
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
            match acceptor.accept(TokioIo::new(upgraded)).await {
                Ok(tls) => super::server::serve_connection(tls, p, Listener::Hijacked(base)).await,
                Err(e) => tracing::warn!(
                    %host, error = %e,
                    "TLS handshake with a client failed: does it trust the proxy CA (GET /ca.crt)?"
                ),
            }
        });
        return ok();
    }
    let dial = tokio::net::TcpStream::connect((host.as_str(), port));
    let mut upstream = match tokio::time::timeout(Duration::from_secs(10), dial).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return text(
                StatusCode::BAD_GATEWAY,
                format!("dfdaemon proxy: cannot reach {authority}: {e}"),
            );
        }
        Err(_) => {
            return text(
                StatusCode::GATEWAY_TIMEOUT,
                format!("dfdaemon proxy: {authority} did not answer in 10 s"),
            );
        }
    };
    tracing::debug!(%authority, "tunneling");
    p.count("tunnel");
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(u) => {
                let mut client = TokioIo::new(u);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
            Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
        }
    });
    ok()
}

fn ok() -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .body(Body::empty())
        .unwrap_or_default()
}
