//! HTTP/1.1 serving for the proxy: the plain listener on the proxy port and every hijacked TLS
//! stream use the same connection loop (header limits, read timeout, upgrades for `CONNECT`,
//! graceful shutdown).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

use super::{Listener, Proxy};

/// A request head larger than this gets 431 (malformed ones get 400); the connection's other
/// requests and the proxy go on.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// A client that does not finish sending a request head in this time is dropped.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts connections until shutdown.
pub(crate) async fn accept_loop(listener: TcpListener, p: Arc<Proxy>) {
    let shutdown = p.shutdown.clone();
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.wait() => return,
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_connection(stream, p.clone(), Listener::Entry));
    }
}

/// Serves HTTP/1.1 requests on one client connection.
pub(crate) async fn serve_connection<I>(io: I, p: Arc<Proxy>, listener: Listener)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shutdown = p.shutdown.clone();
    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let p = p.clone();
        let listener = listener.clone();
        async move { Ok::<_, Infallible>(super::dispatch(p, req.map(Body::new), listener).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES);
    let conn = builder
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "proxy connection ended");
            }
        }
        () = shutdown.wait() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}
