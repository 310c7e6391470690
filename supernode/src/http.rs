//! The supernode's HTTP server: pieces for peers, health, metrics, and the preheat API.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use fetcher::rate::RateLimiter;
use fetcher::upload::{self, UploadConfig};
use serde::{Deserialize, Serialize};

use crate::scheduler::{Scheduling, register_for_preheat};

/// `POST /api/v1/preheat` body: seed a URL before any peer asks for it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreheatRequest {
    pub url: String,
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub tag: String,
    /// `&`-separated query parameters to ignore (as dfget's --filter).
    #[serde(default)]
    pub filter: String,
}

/// Preheat answer.
#[derive(Debug, Serialize)]
pub struct PreheatResponse {
    pub task_id: String,
}

/// Builds the router.
pub fn router(s: Arc<Scheduling>, upload_rate: u64, max_uploads: usize) -> Router {
    let pieces = upload::router(
        s.tasks.clone(),
        UploadConfig {
            limiter: RateLimiter::new(upload_rate),
            max_concurrent: max_uploads,
            upload_bytes: s.metrics.upload_bytes.clone(),
        },
    );
    let api = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/api/v1/preheat", post(preheat))
        .route("/api/v1/index/{digest}", get(layer_index))
        .with_state(s);
    pieces.merge(api)
}

/// `GET /api/v1/index/sha256:<hex>`: the layer index of a seeded registry blob.
async fn layer_index(
    State(s): State<Arc<Scheduling>>,
    axum::extract::Path(digest): axum::extract::Path<String>,
) -> axum::response::Response {
    use crate::layer_index::IndexError;
    match s.indexes.get(&digest).await {
        Ok(bytes) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "application/vnd.damselfly.layer-index.v1",
            )],
            bytes.as_ref().clone(),
        )
            .into_response(),
        Err(e) => {
            let status = match e {
                IndexError::BadDigest(_) => StatusCode::BAD_REQUEST,
                IndexError::NotSeeded(_) => StatusCode::NOT_FOUND,
                IndexError::Unindexable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
                IndexError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            (status, format!("{e}\n")).into_response()
        }
    }
}

async fn metrics(State(s): State<Arc<Scheduling>>) -> String {
    s.metrics.render()
}

async fn preheat(
    State(s): State<Arc<Scheduling>>,
    Json(req): Json<PreheatRequest>,
) -> impl IntoResponse {
    match register_for_preheat(&s, req).await {
        Ok(task_id) => (StatusCode::ACCEPTED, Json(PreheatResponse { task_id })).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, e.message).into_response(),
    }
}
