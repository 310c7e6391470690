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
        .route("/api/v1/index", post(build_index))
        .with_state(s);
    pieces.merge(api)
}

/// `GET /api/v1/index/sha256:<hex>`: the layer index of a seeded registry blob.
async fn layer_index(
    State(s): State<Arc<Scheduling>>,
    axum::extract::Path(digest): axum::extract::Path<String>,
) -> axum::response::Response {
    match s.indexes.get(&digest).await {
        Ok(bytes) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "application/vnd.damselfly.layer-index.v1",
            )],
            bytes.as_ref().clone(),
        )
            .into_response(),
        Err(e) => (index_status(&e), format!("{e}\n")).into_response(),
    }
}

/// `POST /api/v1/index` body: seed a registry blob (if not yet) and build its layer index ahead
/// of the first lazy start that needs it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildIndexRequest {
    /// Where the registry serves the blob (`https://<registry>/v2/<name>/blobs/sha256:<hex>`).
    pub url: String,
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// `sha256:<hex>` of the blob.
    pub digest: String,
}

#[derive(Debug, Serialize)]
pub struct BuildIndexResponse {
    pub digest: String,
    pub index_bytes: usize,
}

/// `POST /api/v1/index`: answers once the index exists, with its size.
async fn build_index(
    State(s): State<Arc<Scheduling>>,
    Json(req): Json<BuildIndexRequest>,
) -> axum::response::Response {
    let req = crate::scheduler::index::IndexRequest {
        url: req.url,
        headers: req.headers.into_iter().collect(),
        digest: req.digest,
    };
    match crate::scheduler::index::seeded_index(&s, &req).await {
        Ok(bytes) => Json(BuildIndexResponse {
            digest: req.digest,
            index_bytes: bytes.len(),
        })
        .into_response(),
        Err(e) => (index_status(&e), format!("{e}\n")).into_response(),
    }
}

fn index_status(e: &crate::layer_index::IndexError) -> StatusCode {
    use crate::layer_index::IndexError;
    match e {
        IndexError::BadDigest(_) => StatusCode::BAD_REQUEST,
        IndexError::NotSeeded(_) => StatusCode::NOT_FOUND,
        IndexError::Seed { .. } => StatusCode::BAD_GATEWAY,
        IndexError::Unindexable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        IndexError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
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
