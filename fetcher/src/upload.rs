//! The piece upload server: `GET /pieces/{version_id}/{piece}` serves a verified piece to other peers,
//! throttled by the process-wide upload bucket and capped in concurrency (busy → 503, so the
//! downloader reports it and the scheduler picks another parent).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use tokio::sync::Semaphore;

use crate::error::Result;
use crate::metrics::PeerMetrics;
use crate::rate::RateLimiter;
use crate::shutdown::Shutdown;

/// Where the upload server reads pieces from. The peer's open tasks implement it; tests wrap it
/// to misbehave.
pub trait PieceSource: Send + Sync + 'static {
    /// The verified bytes of piece `num` of `version_id`, or `None` when not held.
    fn read_piece(&self, version_id: &str, num: u32) -> Result<Option<Bytes>>;
}

/// How the upload server behaves.
#[derive(Clone)]
pub struct UploadConfig {
    pub limiter: RateLimiter,
    pub max_concurrent: usize,
    pub upload_bytes: prometheus::IntCounter,
}

struct AppState {
    source: Arc<dyn PieceSource>,
    limiter: RateLimiter,
    slots: Arc<Semaphore>,
    upload_bytes: prometheus::IntCounter,
}

/// The upload routes, for embedding into another router (the supernode's HTTP server).
pub fn router(source: Arc<dyn PieceSource>, cfg: UploadConfig) -> Router {
    let state = Arc::new(AppState {
        source,
        limiter: cfg.limiter,
        slots: Arc::new(Semaphore::new(cfg.max_concurrent.max(1))),
        upload_bytes: cfg.upload_bytes,
    });
    Router::new()
        .route("/pieces/{version}/{num}", get(serve_piece))
        .with_state(state)
}

/// Binds `addr` and serves `router` until `shutdown`; in-flight responses then finish. Returns the
/// bound address and the server task (which ends once the last response is sent).
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    shutdown: Shutdown,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let r = axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    Ok((local, task))
}

/// Metrics snapshot helper for a `PeerMetrics`.
pub fn upload_config(
    limiter: RateLimiter,
    max_concurrent: usize,
    metrics: &PeerMetrics,
) -> UploadConfig {
    UploadConfig {
        limiter,
        max_concurrent,
        upload_bytes: metrics.upload_bytes.clone(),
    }
}

async fn serve_piece(
    State(st): State<Arc<AppState>>,
    Path((version, num)): Path<(String, u32)>,
) -> Response {
    let Ok(permit) = st.slots.clone().try_acquire_owned() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "upload slots busy").into_response();
    };
    let src = st.source.clone();
    let v = version.clone();
    let data = match tokio::task::spawn_blocking(move || src.read_piece(&v, num)).await {
        Ok(Ok(Some(d))) => d,
        Ok(Ok(None)) => return (StatusCode::NOT_FOUND, "piece not held").into_response(),
        Ok(Err(e)) => {
            tracing::warn!(version, num, error = %e, "cannot read piece for upload");
            return (StatusCode::INTERNAL_SERVER_ERROR, "cannot read piece").into_response();
        }
        Err(_) => return (StatusCode::INTERNAL_SERVER_ERROR, "read task failed").into_response(),
    };
    let limiter = st.limiter.clone();
    let counter = st.upload_bytes.clone();
    let len = data.len();
    const CHUNK: usize = 64 * 1024;
    let stream = futures::stream::unfold((data, permit), move |(mut rest, permit)| {
        let limiter = limiter.clone();
        let counter = counter.clone();
        async move {
            if rest.is_empty() {
                return None;
            }
            let chunk = rest.split_to(CHUNK.min(rest.len()));
            limiter.acquire(chunk.len()).await;
            counter.inc_by(chunk.len() as u64);
            Some((Ok::<_, std::io::Error>(chunk), (rest, permit)))
        }
    });
    Response::builder()
        .header(axum::http::header::CONTENT_LENGTH, len)
        .header(axum::http::header::CONTENT_TYPE, "application/octet-stream")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
