//! Fetching one piece from one parent: HTTP GET, throttled, size-capped, sha256-verified, stored.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::StreamExt;
use proto::scheduler::{FailureReason, Parent};

use crate::output::OutputWriter;
use crate::piece::PieceMeta;
use crate::piece_store::TaskStore;
use crate::rate::{RateLimiter, acquire_all};

pub(crate) struct Job {
    pub version: String,
    /// This peer's ticket for the version (`Authorization: Bearer`), from the supernode.
    pub ticket: String,
    pub meta: PieceMeta,
    pub parent: Parent,
    pub http: reqwest::Client,
    pub store: Arc<TaskStore>,
    pub host_limit: RateLimiter,
    pub task_limit: RateLimiter,
    pub output: Option<OutputWriter>,
}

pub(crate) struct PieceOutcome {
    pub piece: u32,
    pub parent_id: String,
    pub from_supernode: bool,
    pub cost: Duration,
    /// Bytes stored, or why not.
    pub result: Result<u64, (FailureReason, String)>,
}

/// Longest a single piece may take from one parent before we give up on that parent.
const PIECE_TIMEOUT: Duration = Duration::from_secs(300);

pub(crate) async fn fetch(job: Job) -> PieceOutcome {
    let started = Instant::now();
    let result = match tokio::time::timeout(PIECE_TIMEOUT, fetch_inner(&job)).await {
        Ok(r) => r,
        Err(_) => Err((
            FailureReason::ParentUnreachable,
            format!("timed out after {PIECE_TIMEOUT:?}"),
        )),
    };
    PieceOutcome {
        piece: job.meta.num,
        parent_id: job.parent.id.clone(),
        from_supernode: job.parent.is_supernode,
        cost: started.elapsed(),
        result,
    }
}

async fn fetch_inner(job: &Job) -> Result<u64, (FailureReason, String)> {
    let url = format!(
        "{}/pieces/{}/{}",
        job.parent.base_url.trim_end_matches('/'),
        job.version,
        job.meta.num
    );
    let resp = job
        .http
        .get(&url)
        .bearer_auth(&job.ticket)
        .send()
        .await
        .map_err(|e| {
            (
                FailureReason::ParentUnreachable,
                crate::source::error_chain(&e),
            )
        })?;
    if !resp.status().is_success() {
        return Err((
            FailureReason::ParentError,
            format!("parent answered HTTP {}", resp.status().as_u16()),
        ));
    }
    let size = job.meta.size as usize;
    let mut buf = BytesMut::with_capacity(size);
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            (
                FailureReason::ParentUnreachable,
                crate::source::error_chain(&e),
            )
        })?;
        if buf.len() + chunk.len() > size {
            return Err((
                FailureReason::DigestMismatch,
                format!("parent sent more than the piece's {size} bytes"),
            ));
        }
        acquire_all(&[&job.host_limit, &job.task_limit], chunk.len()).await;
        buf.extend_from_slice(&chunk);
    }
    if !job.meta.verify(&buf) {
        return Err((
            FailureReason::DigestMismatch,
            format!("{} bytes failed sha256 verification", buf.len()),
        ));
    }
    let (store, meta, out) = (job.store.clone(), job.meta.clone(), job.output.clone());
    let data = buf.freeze();
    // The destination first: once the store records the piece, it counts as written everywhere.
    tokio::task::spawn_blocking(move || {
        if let Some(out) = &out {
            out.write_at(meta.offset, &data)
                .map_err(|e| format!("cannot write output: {e}"))?;
        }
        store.write_piece(&meta, &data).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| (FailureReason::Local, e.to_string()))?
    .map_err(|e| (FailureReason::Local, e))?;
    Ok(job.meta.size.into())
}
