//! The supernode's HTTP server: pieces for peers (with a ticket), layer indexes (with an index
//! ticket), health, metrics, and the admin API (preheat, index builds, the tasks list
//! [`crate::tasks_api`]: with the admin token).

use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use fetcher::rate::RateLimiter;
use fetcher::upload::{self, UploadConfig};
use serde::{Deserialize, Serialize};

use crate::scheduler::{Scheduling, register_for_preheat};
use crate::task::Tasks;

/// The seed cache as the piece server sees it: pieces of versions this supernode seeds, opened by
/// tickets it signed.
struct SeedPieces {
    tasks: Arc<Tasks>,
    key: fetcher::ticket::PublicKey,
}

impl upload::PieceSource for SeedPieces {
    fn open_piece(&self, version_id: &str, num: u32) -> fetcher::Result<Option<upload::PieceBody>> {
        let Some(v) = self.tasks.by_version(version_id) else {
            return Ok(None);
        };
        v.lock().last_access = std::time::Instant::now();
        Ok(v.store
            .get()
            .and_then(|s| s.piece_reader(num))
            .map(upload::PieceBody::from_store))
    }

    fn ticket_keys(&self, _version_id: &str) -> Vec<fetcher::ticket::PublicKey> {
        vec![self.key.clone()]
    }
}

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
        Arc::new(SeedPieces {
            tasks: s.tasks.clone(),
            key: s.tickets.public(),
        }),
        UploadConfig {
            limiter: RateLimiter::new(upload_rate),
            max_concurrent: max_uploads,
            upload_bytes: s.metrics.upload_bytes.clone(),
            refused: s.metrics.refused.with_label_values(&["pieces"]),
        },
    );
    let api = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/api/v1/preheat", post(preheat))
        .route("/api/v1/index/{digest}", get(layer_index))
        .route("/api/v1/index", post(build_index))
        .route("/api/v1/tasks", get(crate::tasks_api::tasks))
        .merge(crate::jobs::router())
        .with_state(s);
    pieces.merge(api)
}

/// `GET /api/v1/index/sha256:<hex>`: the layer index of a seeded registry blob, for a request
/// with an index ticket for the blob's version (`Scheduler.LayerIndex` hands them out after the
/// registry accepted the peer's credentials).
async fn layer_index(
    State(s): State<Arc<Scheduling>>,
    ConnectInfo(from): ConnectInfo<std::net::SocketAddr>,
    headers: axum::http::HeaderMap,
    axum::extract::Path(digest): axum::extract::Path<String>,
) -> axum::response::Response {
    if let Err(e) = index_ticket(&s, &headers, &digest, from) {
        s.metrics.refused.with_label_values(&["index"]).inc();
        return upload::refusal(&e);
    }
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

/// Checks the index ticket of a request for the index of `digest`: signed here, scope index, for
/// a version of that blob's task.
fn index_ticket(
    s: &Scheduling,
    headers: &axum::http::HeaderMap,
    digest: &str,
    from: std::net::SocketAddr,
) -> Result<(), fetcher::ticket::TicketError> {
    use fetcher::ticket::{self, Scope, TicketError};
    let key = s.tickets.public();
    // The ticket names the version; it must be one of this blob's.
    let version = ticket::from_header(headers.get(ticket::HEADER))
        .and_then(|t| ticket::decode(&key, t).ok())
        .map(|c| c.version_id);
    let Some(version) = version else {
        return upload::authorize(&[key], headers, Scope::Index, "", from);
    };
    let task_id =
        fetcher::task_id::content_task_id(digest).map_err(|_| TicketError::WrongVersion)?;
    match s.tasks.by_version(&version) {
        Some(v) if v.task_id == task_id => {}
        _ => return Err(TicketError::WrongVersion),
    }
    upload::authorize(&[key], headers, Scope::Index, &version, from)
}

/// Why an admin API request was refused.
pub(crate) enum AdminRefusal {
    Disabled,
    Missing,
    Wrong,
}

impl IntoResponse for AdminRefusal {
    fn into_response(self) -> axum::response::Response {
        match self {
            AdminRefusal::Disabled => (
                StatusCode::FORBIDDEN,
                "the admin API is disabled: configure admin_token_file on the supernode\n",
            )
                .into_response(),
            AdminRefusal::Missing => (
                StatusCode::UNAUTHORIZED,
                [(
                    axum::http::header::WWW_AUTHENTICATE,
                    "Bearer realm=\"damselfly-admin\"",
                )],
                "the admin API needs Authorization: Bearer <admin token>\n",
            )
                .into_response(),
            AdminRefusal::Wrong => (StatusCode::FORBIDDEN, "wrong admin token\n").into_response(),
        }
    }
}

/// An admin API request whose `Authorization: Bearer <admin token>` checked out (an extractor:
/// a refused request is answered before its body is read).
pub(crate) struct Admin;

impl axum::extract::FromRequestParts<Arc<Scheduling>> for Admin {
    type Rejection = AdminRefusal;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        s: &Arc<Scheduling>,
    ) -> Result<Self, AdminRefusal> {
        admin(s, &parts.headers).map(|()| Admin)
    }
}

/// Checks `Authorization: Bearer <admin token>` on an admin API request.
fn admin(s: &Scheduling, headers: &axum::http::HeaderMap) -> Result<(), AdminRefusal> {
    use sha2::{Digest, Sha256};
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compared as digests: equal-length, no early exit on the secret's bytes.
    let r = match (&s.cfg.admin_token, given) {
        (None, _) => Err(AdminRefusal::Disabled),
        (Some(_), None) => Err(AdminRefusal::Missing),
        (Some(want), Some(g)) if Sha256::digest(g.trim()) == Sha256::digest(want) => Ok(()),
        (Some(_), Some(_)) => Err(AdminRefusal::Wrong),
    };
    if r.is_err() {
        s.metrics.refused.with_label_values(&["admin"]).inc();
    }
    r
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
    _admin: Admin,
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
    _admin: Admin,
    Json(req): Json<PreheatRequest>,
) -> axum::response::Response {
    match register_for_preheat(&s, req).await {
        Ok((task_id, _)) => {
            (StatusCode::ACCEPTED, Json(PreheatResponse { task_id })).into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, e.message).into_response(),
    }
}
