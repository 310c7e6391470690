//! Fetching one piece from one parent: HTTP GET, throttled, size-capped, streamed into the store a
//! chunk at a time while hashed, and recorded only once sha256-verified.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::StreamExt;
use proto::scheduler::{FailureReason, Parent};

use crate::output::OutputWriter;
use crate::piece::PieceMeta;
use crate::piece_store::{Begin, PieceWriter, TaskStore};
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

/// Bytes of a piece gathered in memory before they go to disk: a download window of 16 pieces
/// holds 1 MiB, whatever the piece size.
const STAGE: usize = 64 * 1024;

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
    let local = |e: crate::Error| (FailureReason::Local, e.to_string());
    let mut piece = match job.store.begin_piece(&job.meta, job.output.clone()) {
        Ok(Begin::Held) => return Ok(0),
        Ok(Begin::Writing(w)) => *w,
        Err(e) => return Err(local(e)),
    };
    let url = format!(
        "{}/pieces/{}/{}",
        job.parent.base_url.trim_end_matches('/'),
        job.version,
        job.meta.num
    );
    let unreachable = |e: reqwest::Error| {
        (
            FailureReason::ParentUnreachable,
            crate::source::error_chain(&e),
        )
    };
    let resp = job
        .http
        .get(&url)
        .bearer_auth(&job.ticket)
        .send()
        .await
        .map_err(unreachable)?;
    if !resp.status().is_success() {
        return Err((
            FailureReason::ParentError,
            format!("parent answered HTTP {}", resp.status().as_u16()),
        ));
    }
    let size = job.meta.size as usize;
    // One chunk in memory at a time: each goes to disk as it fills (hashed on the way).
    let mut buf = BytesMut::with_capacity(size.min(STAGE));
    let mut received = 0usize;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(unreachable)?;
        received += chunk.len();
        if received > size {
            return Err((
                FailureReason::DigestMismatch,
                format!("parent sent more than the piece's {size} bytes"),
            ));
        }
        acquire_all(&[&job.host_limit, &job.task_limit], chunk.len()).await;
        buf.extend_from_slice(&chunk);
        if buf.len() >= STAGE {
            (piece, buf) = flush(piece, buf).await?;
        }
    }
    if !buf.is_empty() {
        (piece, _) = flush(piece, buf).await?;
    }
    let verified = tokio::task::spawn_blocking(move || piece.finish())
        .await
        .map_err(|e| (FailureReason::Local, e.to_string()))?
        .map_err(local)?;
    if !verified {
        return Err((
            FailureReason::DigestMismatch,
            format!("{received} bytes failed sha256 verification"),
        ));
    }
    Ok(job.meta.size.into())
}

/// Writes `buf` into the piece off the async threads; hands both back, `buf` empty.
async fn flush(
    mut piece: PieceWriter,
    mut buf: BytesMut,
) -> Result<(PieceWriter, BytesMut), (FailureReason, String)> {
    tokio::task::spawn_blocking(move || {
        let r = piece.write(&buf);
        buf.clear();
        r.map(|()| (piece, buf))
    })
    .await
    .map_err(|e| (FailureReason::Local, e.to_string()))?
    .map_err(|e| (FailureReason::Local, e.to_string()))
}
