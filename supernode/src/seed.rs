//! Back-to-source: the seed streams a task's content from the origin once, cuts it into pieces,
//! hashes and stores each, and publishes each piece the moment it is on disk.

use std::sync::Arc;

use fetcher::piece::{PieceCutter, PieceMeta};
use fetcher::piece_store::{Store, TaskMeta};
use fetcher::source::HttpSource;
use fetcher::task_id;
use futures::StreamExt;
use proto::scheduler::{ErrorKind, TaskError};

use crate::metrics::Metrics;
use crate::task::{Info, Status, Tasks, Version};

/// What seeding needs.
pub struct SeedContext {
    pub source: HttpSource,
    pub store: Store,
    pub tasks: Arc<Tasks>,
    pub metrics: Metrics,
    /// Base piece size (grown for huge content, see `fetcher::task_id::piece_size_for`).
    pub piece_size: u32,
    /// The seed cache's size (`cache_size`): seeds count against it while they stream.
    pub cache_size: u64,
    /// The other supernodes: metadata of what this one seeds goes to them, and versions they
    /// seeded are taken over from their metadata (`crate::rebuild`).
    pub cluster: Option<Arc<crate::replica::Cluster>>,
    /// Piece tickets, for the pieces a takeover fetches from peers.
    pub tickets: Arc<crate::tickets::Tickets>,
    /// The client for peers' piece servers (cluster TLS).
    pub peer_http: reqwest::Client,
    /// Concurrent uploads the scheduler gives one peer (a takeover's fetches count in them).
    pub peer_cap: usize,
    pub shutdown: fetcher::Shutdown,
}

/// How often (in pieces) a seed checks the whole cache's usage against `cache_size`.
const USAGE_CHECK_PIECES: u64 = 8;

/// Converts a fetcher error met while talking to the origin into the error peers receive.
pub fn task_error(e: &fetcher::Error) -> TaskError {
    let (kind, status) = match e {
        fetcher::Error::OriginStatus { status, .. } => {
            (ErrorKind::OriginStatus, u32::from(*status))
        }
        fetcher::Error::OriginUnreachable { .. } => (ErrorKind::OriginUnreachable, 0),
        fetcher::Error::OriginBody { .. } => (ErrorKind::OriginBody, 0),
        fetcher::Error::Invalid { .. } | fetcher::Error::Refused { .. } => (ErrorKind::Invalid, 0),
        fetcher::Error::DigestMismatch { .. } => (ErrorKind::DigestMismatch, 0),
        _ => (ErrorKind::Internal, 0),
    };
    let message = match e {
        fetcher::Error::OriginUnreachable { detail, .. }
        | fetcher::Error::OriginBody { detail, .. } => detail.clone(),
        other => other.to_string(),
    };
    TaskError {
        kind: kind as i32,
        http_status: status,
        message,
    }
}

fn fail(ctx: &SeedContext, v: &Version, e: &fetcher::Error) {
    tracing::warn!(task_id = %&v.task_id[..16], url = %fetcher::source::redact(&v.url), error = %e, "seed failed");
    let version_id = {
        let mut st = v.lock();
        st.status = Status::Failed(task_error(e));
        st.info.as_ref().map(|i| i.version_id.clone())
    };
    if let Some(id) = version_id {
        ctx.tasks.forget(&id, &v.task_id);
    }
    v.notify();
}

/// Seeds `v` from the origin; on failure the version is marked failed (its peers get the error, the
/// next registration starts a fresh version).
#[tracing::instrument(skip_all, fields(task_id = %&v.task_id[..16]))]
pub async fn seed(ctx: Arc<SeedContext>, v: Arc<Version>) {
    if let Err(e) = seed_inner(&ctx, &v).await {
        fail(&ctx, &v, &e);
    }
}

async fn seed_inner(ctx: &SeedContext, v: &Arc<Version>) -> fetcher::Result<()> {
    let taken_over = ctx.cluster.as_ref().and_then(|c| c.take(&v.task_id));
    let resp = match taken_over {
        Some(rec) => match crate::rebuild::rebuild(ctx, v, rec).await? {
            crate::rebuild::Outcome::Rebuilt => return Ok(()),
            crate::rebuild::Outcome::Unusable(Some(whole)) => *whole,
            crate::rebuild::Outcome::Unusable(None) => fetch(ctx, v).await?,
        },
        None => fetch(ctx, v).await?,
    };
    seed_from(ctx, v, resp).await
}

/// The origin's whole body of `v`.
async fn fetch(ctx: &SeedContext, v: &Version) -> fetcher::Result<fetcher::source::OriginResponse> {
    ctx.metrics
        .source_requests
        .with_label_values(&["fetch"])
        .inc();
    ctx.source.get(&v.url, &v.headers, None).await
}

/// Makes `v`'s version known: indexed for piece serving, every waiting session told, and its
/// metadata on its way to the task's successors.
pub(crate) fn announce(ctx: &SeedContext, v: &Arc<Version>, info: &Info) {
    ctx.tasks.index(info.version_id.clone(), v.clone());
    ctx.metrics.tasks.set(ctx.tasks.len() as i64);
    v.notify();
    if let Some(c) = &ctx.cluster {
        tokio::spawn(crate::replica::push(
            c.clone(),
            v.clone(),
            ctx.shutdown.clone(),
        ));
    }
}

async fn seed_from(
    ctx: &SeedContext,
    v: &Arc<Version>,
    resp: fetcher::source::OriginResponse,
) -> fetcher::Result<()> {
    let probe = resp.probe.clone();
    let len = probe.content_length.map(|l| l as i64).unwrap_or(-1);
    let piece_size = task_id::piece_size_for(len, ctx.piece_size);
    let info = Info {
        version_id: task_id::version_id(&v.task_id, len, &probe.etag, &probe.last_modified),
        content_length: len,
        piece_size,
        etag: probe.etag.clone(),
        last_modified: probe.last_modified.clone(),
    };
    let meta = TaskMeta {
        version_id: info.version_id.clone(),
        task_id: v.task_id.clone(),
        url: v.url.clone(),
        content_length: len,
        piece_size,
        etag: probe.etag,
        last_modified: probe.last_modified,
        digest: None,
    };
    // Another version object for the same content may still hold the store (a revalidation raced):
    // reuse the indexed one's store if so.
    let (store, shared) = match ctx
        .tasks
        .by_version(&info.version_id)
        .and_then(|o| o.store.get().cloned())
    {
        Some(s) => (s, true),
        None => (ctx.store.open_task(&meta).await?, false),
    };
    let _ = v.store.set(store.clone());
    let cached = store.have();
    {
        let mut st = v.lock();
        st.info = Some(info.clone());
    }
    announce(ctx, v, &info);
    tracing::info!(version = %&info.version_id[..16], length = len, piece_size, cached = cached.len(), "seeding");

    let whole = len >= 0 && cached.len() as u64 == (len as u64).div_ceil(u64::from(piece_size));
    if whole && let Some(digest) = verified_digest(&store, v.expected_digest.as_deref()) {
        // The disk cache holds the whole version, verified by the seed that filled it.
        drop(resp);
        let metas: Vec<PieceMeta> = cached.iter().filter_map(|n| store.piece(*n)).collect();
        let mut st = v.lock();
        st.pieces = metas;
        st.status = Status::Complete {
            content_length: len as u64,
            piece_count: cached.len() as u32,
            digest,
        };
        drop(st);
        v.notify();
        tracing::info!(version = %&info.version_id[..16], "served from the disk cache");
        return Ok(());
    }
    let result = stream_body(ctx, v, &store, resp, (len, piece_size), 0).await;
    if result.is_err() && !shared {
        // Nothing of a failed, short or mismatching seed stays behind for a later one to trust.
        if let Err(e) = store.discard() {
            tracing::warn!(error = %e, "cannot discard the failed seed's pieces");
        }
    }
    let (total, digest) = result?;
    store.set_complete(total, Some(digest.clone()))?;
    let piece_count = total.div_ceil(u64::from(piece_size)) as u32;
    v.lock().status = Status::Complete {
        content_length: total,
        piece_count,
        digest,
    };
    v.notify();
    tracing::info!(version = %&info.version_id[..16], bytes = total, pieces = piece_count, "seed complete");
    Ok(())
}

/// The digest a finished seed recorded for `store`, if it matches the digest the task is keyed
/// by (pieces held without one were never verified as a whole).
fn verified_digest(
    store: &fetcher::piece_store::TaskStore,
    expected: Option<&str>,
) -> Option<String> {
    let recorded = store.meta().digest?;
    match expected {
        Some(e) if !e.eq_ignore_ascii_case(&recorded) => None,
        _ => Some(recorded),
    }
}

/// Streams the origin's body into pieces from piece `first` on (0: the whole content, else a
/// ranged body). The length is checked before the last piece is published, and for the whole
/// content the expected digest too; returns the length and the digest of the bytes streamed.
pub(crate) async fn stream_body(
    ctx: &SeedContext,
    v: &Arc<Version>,
    store: &Arc<fetcher::piece_store::TaskStore>,
    resp: fetcher::source::OriginResponse,
    (len, piece_size): (i64, u32),
    first: u32,
) -> fetcher::Result<(u64, String)> {
    let mut cutter = PieceCutter::starting_at(piece_size, first);
    let mut body = std::pin::pin!(resp.into_stream());
    let mut checked_at = 0u64;
    let check_every = u64::from(piece_size) * USAGE_CHECK_PIECES;
    if len >= 0 && len as u64 > ctx.cache_size {
        return Err(cache_full(ctx, format!("{len} bytes")));
    }
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        ctx.metrics.source_bytes.inc_by(chunk.len() as u64);
        if len >= 0 && cutter.total() + chunk.len() as u64 > len as u64 {
            return Err(fetcher::Error::OriginBody {
                url: v.url.clone(),
                detail: format!("more than the {len} bytes announced"),
            });
        }
        let pieces = cutter.push(&chunk);
        publish(v, store, pieces).await?;
        if cutter.total() > ctx.cache_size {
            return Err(cache_full(ctx, format!("over {} bytes", cutter.total())));
        }
        if cutter.total() - checked_at >= check_every {
            checked_at = cutter.total();
            make_room(ctx).await?;
        }
    }
    let (last, total, digest) = cutter.finish();
    if len >= 0 && total != len as u64 {
        return Err(fetcher::Error::OriginBody {
            url: v.url.clone(),
            detail: format!("got {total} of {len} bytes"),
        });
    }
    if first == 0
        && let Some(expected) = v.expected_digest.as_deref()
        && !expected.eq_ignore_ascii_case(&digest)
    {
        // The origin served other bytes than the digest the task is keyed by.
        return Err(fetcher::Error::DigestMismatch {
            expected: expected.to_owned(),
            actual: digest,
        });
    }
    publish(v, store, last.into_iter().collect()).await?;
    Ok((total, digest))
}

/// A seed the cache cannot hold: an internal error, so peers try the next supernode and then
/// the origin themselves.
pub(crate) fn cache_full(ctx: &SeedContext, what: String) -> fetcher::Error {
    fetcher::Error::io(
        "seed cache full",
        ctx.store.root(),
        std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            format!(
                "{what}: larger than the seed cache ({} bytes, cache_size)",
                ctx.cache_size
            ),
        ),
    )
}

/// Keeps the whole cache within `cache_size` while a seed grows it: evicts idle versions, and
/// fails the seed when that is not enough (other seeds and connected versions fill it).
async fn make_room(ctx: &SeedContext) -> fetcher::Result<()> {
    let (store, tasks, metrics, max) = (
        ctx.store.clone(),
        ctx.tasks.clone(),
        ctx.metrics.clone(),
        ctx.cache_size,
    );
    let usage =
        tokio::task::spawn_blocking(move || crate::cache::evict(&store, &tasks, max, &metrics))
            .await
            .unwrap_or(u64::MAX);
    if usage > ctx.cache_size {
        return Err(cache_full(
            ctx,
            format!("{usage} bytes in use by seeds and connected versions"),
        ));
    }
    Ok(())
}

/// Stores pieces (unless already cached from an earlier run) and makes them available.
pub(crate) async fn publish(
    v: &Version,
    store: &Arc<fetcher::piece_store::TaskStore>,
    pieces: Vec<(PieceMeta, bytes::Bytes)>,
) -> fetcher::Result<()> {
    if pieces.is_empty() {
        return Ok(());
    }
    let s = store.clone();
    let metas: Vec<PieceMeta> = pieces.iter().map(|(m, _)| m.clone()).collect();
    tokio::task::spawn_blocking(move || {
        for (m, data) in &pieces {
            if s.piece(m.num).as_ref() != Some(m) {
                s.write_piece(m, data)?;
            }
        }
        Ok::<_, fetcher::Error>(())
    })
    .await
    .map_err(|e| fetcher::Error::Download(format!("store task failed: {e}")))??;
    let first = {
        let mut st = v.lock();
        let (first, n) = (st.pieces.is_empty(), metas.len());
        st.pieces.extend(metas);
        // Each new piece goes to about one peer from the supernode: wake a few who wait.
        st.wake_starved(n.saturating_mul(2).min(64));
        first
    };
    if first {
        // The first piece is news for everyone (proofs of access wait on it).
        v.notify();
    }
    Ok(())
}
