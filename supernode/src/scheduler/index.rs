//! Layer indexes on request: seed the blob from the registry if this supernode has not (the one
//! pull for the cluster), wait for the seed, then build (or load) its index.

use std::sync::Arc;

use proto::scheduler::{Header, Register};
use tonic::Status;

use super::{Scheduling, register};
use crate::layer_index::IndexError;
use crate::task::Status as TaskStatus;

/// What to index: a registry blob, where it is served and with which credentials.
#[derive(Clone, Debug)]
pub struct IndexRequest {
    pub url: String,
    pub headers: Vec<(String, String)>,
    /// `sha256:<hex>`.
    pub digest: String,
}

/// Request headers `(name, value)` as the scheduler protocol carries them.
pub fn proto_headers<'a>(pairs: impl IntoIterator<Item = (&'a String, &'a String)>) -> Vec<Header> {
    pairs
        .into_iter()
        .map(|(name, value)| Header {
            name: name.clone(),
            value: value.clone(),
        })
        .collect()
}

impl From<IndexRequest> for proto::scheduler::LayerIndexRequest {
    fn from(r: IndexRequest) -> Self {
        Self {
            url: r.url,
            headers: proto_headers(r.headers.iter().map(|(n, v)| (n, v))),
            digest: r.digest,
        }
    }
}

impl From<proto::scheduler::LayerIndexRequest> for IndexRequest {
    fn from(r: proto::scheduler::LayerIndexRequest) -> Self {
        Self {
            url: r.url,
            headers: r.headers.into_iter().map(|h| (h.name, h.value)).collect(),
            digest: r.digest,
        }
    }
}

/// The serialized index of the blob, seeding it first when needed. The request's URL and
/// credentials are checked like a registration's (a proof of the bytes for a URL or credentials
/// the task has not seen), even when the index exists already: it reveals the layer's files.
#[tracing::instrument(skip_all, fields(digest = %req.digest))]
pub async fn seeded_index(s: &Scheduling, req: &IndexRequest) -> Result<Arc<Vec<u8>>, IndexError> {
    seed(s, req).await?;
    s.indexes.get(&req.digest).await
}

/// Joins (or starts) the content-keyed task of the blob and waits until its seed completes (the
/// request's URL and credentials proven as a registration's).
pub(crate) async fn seed(s: &Scheduling, req: &IndexRequest) -> Result<(), IndexError> {
    let failed = |detail: String| IndexError::Seed {
        digest: req.digest.clone(),
        detail,
    };
    let url = url::Url::parse(&req.url)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .ok_or_else(|| failed(format!("bad blob URL {:?}", req.url)))?;
    let task_id = fetcher::task_id::content_task_id(&req.digest)
        .map_err(|_| IndexError::BadDigest(req.digest.clone()))?;
    let reg = Register {
        url: url.to_string(),
        task_id,
        headers: proto_headers(req.headers.iter().map(|(n, v)| (n, v))),
        digest: req.digest.clone(),
        content_key: req.digest.clone(),
        ..Default::default()
    };
    let version = register::join(s, &reg)
        .await
        .map_err(|e| failed(e.message))?;
    wait_seeded(s, &version).await.map_err(failed)
}

/// Waits until `version`'s seed completes; the seed's failure otherwise.
pub async fn wait_seeded(s: &Scheduling, version: &crate::task::Version) -> Result<(), String> {
    let mut changed = version.subscribe();
    loop {
        match &version.lock().status {
            TaskStatus::Complete { .. } => return Ok(()),
            TaskStatus::Failed(e) => return Err(e.message.clone()),
            TaskStatus::Seeding => {}
        }
        tokio::select! {
            r = changed.changed() => {
                if r.is_err() {
                    return Err("the seed went away".into());
                }
            }
            _ = s.shutdown.wait() => return Err("the supernode is shutting down".into()),
        }
    }
}

/// The gRPC status for an index failure.
pub fn status(e: &IndexError) -> Status {
    match e {
        IndexError::BadDigest(_) => Status::invalid_argument(e.to_string()),
        IndexError::NotSeeded(_) | IndexError::Seed { .. } | IndexError::Unindexable { .. } => {
            Status::failed_precondition(e.to_string())
        }
        IndexError::Io(_) => Status::internal(e.to_string()),
    }
}
