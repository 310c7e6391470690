//! Start sets on request ([`crate::start_sets`]): asked for and recorded with the blob's URL and
//! credentials, proven as for its index (a start set tells which parts of a layer a start reads).
//! A record keeps only offsets where a chunk of the layer's index begins.

use proto::scheduler::{RecordStartReply, StartSet};
use tonic::Status;

use super::Scheduling;
use super::index::{self, IndexRequest};
use crate::start_sets::{MAX_OFFSETS, StartSetError};

/// The start set of the blob (empty when none is recorded).
#[tracing::instrument(skip_all, fields(digest = %req.digest))]
pub async fn start_set(s: &Scheduling, req: &IndexRequest) -> Result<StartSet, Status> {
    index::seed(s, req).await.map_err(|e| index::status(&e))?;
    let offsets = s
        .start_sets
        .get(&req.digest)
        .await
        .map_err(|e| status(&e))?;
    Ok(StartSet {
        offsets: offsets.to_vec(),
    })
}

/// Keeps `offsets` as the blob's start set, unless it has one.
#[tracing::instrument(skip_all, fields(digest = %req.digest))]
pub async fn record(
    s: &Scheduling,
    req: &IndexRequest,
    offsets: Vec<u64>,
) -> Result<RecordStartReply, Status> {
    if offsets.len() > MAX_OFFSETS {
        return Err(status(&StartSetError::TooLarge(offsets.len())));
    }
    let bytes = index::seeded_index(s, req)
        .await
        .map_err(|e| index::status(&e))?;
    let layer = layerindex::LayerIndex::from_bytes(&bytes)
        .map_err(|e| Status::internal(format!("layer index of {}: {e}", req.digest)))?;
    let sent = offsets.len();
    let offsets: Vec<u64> = offsets
        .into_iter()
        .filter(|&o| o < layer.uncompressed_size && layer.chunk_of(o).start == o)
        .collect();
    let kept = s
        .start_sets
        .record(&req.digest, offsets.clone())
        .await
        .map_err(|e| status(&e))?;
    tracing::info!(sent, offsets = offsets.len(), kept, "start set recorded");
    Ok(RecordStartReply { kept })
}

fn status(e: &StartSetError) -> Status {
    match e {
        StartSetError::BadDigest(_) | StartSetError::TooLarge(_) => {
            Status::invalid_argument(e.to_string())
        }
        StartSetError::Io(_) => Status::internal(e.to_string()),
    }
}
