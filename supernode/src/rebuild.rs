//! Taking over a version another supernode seeded (it failed, so its peers came here): from the
//! metadata it replicated (`crate::replica`) this seed knows every piece the failed one had cut,
//! so peers keep trading what they hold from the first moment, and the seed gets the bytes back
//! from them, each piece checked against its sha256, instead of from the origin. The origin is
//! asked once with the registering peer's credentials (access and version: a ranged request for
//! the rest nobody had cut yet, or a single byte); it also supplies, by range, any known piece
//! that no peer has announced after `cluster.rebuild_wait`. The version completes, with the
//! whole digest computed over the rebuilt content, as a seed from the origin would.
//!
//! A takeover fetches a piece from a peer with a ticket of its own, not bound to an address (the
//! supernode's source address towards each peer is not known in advance); it is only ever shown
//! to peers that hold the version.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fetcher::piece::PieceMeta;
use fetcher::piece_store::{TaskMeta, TaskStore};
use fetcher::source::OriginResponse;
use futures::StreamExt;
use tokio::task::JoinSet;

use crate::replica::Record;
use crate::seed::{SeedContext, announce, stream_body};
use crate::task::{Info, Parent, PeerKey, State, Status, Version};

/// Pieces fetched at once (each fetch from a peer takes one of its upload slots: the hosts still
/// downloading need them more than the seed's copy does).
const PULLS: usize = 2;
/// How often the takeover looks again for holders while nothing is in flight.
const LOOK_AGAIN: Duration = Duration::from_millis(100);
/// Longest one piece may take from one peer.
const PIECE_TIMEOUT: Duration = Duration::from_secs(60);

/// How a takeover went.
pub enum Outcome {
    /// The version is complete.
    Rebuilt,
    /// The origin serves another version (or ignored the range): seed afresh, from this whole
    /// body if the origin sent one.
    Unusable(Option<Box<OriginResponse>>),
}

/// Where a piece comes from.
enum Source {
    Peer {
        key: PeerKey,
        id: String,
        base_url: String,
    },
    Origin,
}

/// Takes `v` over from `rec` (see the module doc).
pub async fn rebuild(ctx: &SeedContext, v: &Arc<Version>, rec: Record) -> fetcher::Result<Outcome> {
    let known = rec.pieces.len() as u32;
    let len = rec.content_length;
    if len > ctx.cache_size {
        return Err(crate::seed::cache_full(ctx, format!("{len} bytes")));
    }
    let tail_at = u64::from(known) * u64::from(rec.piece_size);
    let range = if tail_at < len {
        (tail_at, len - 1)
    } else {
        (0, 0)
    };
    let kind = if tail_at < len { "fetch" } else { "probe" };
    ctx.metrics.source_requests.with_label_values(&[kind]).inc();
    let resp = ctx.source.get(&v.url, &v.headers, Some(range)).await?;
    let p = resp.probe.clone();
    let origin_len = p.content_length.map_or(-1, |l| l as i64);
    let version_id =
        fetcher::task_id::version_id(&v.task_id, origin_len, &p.etag, &p.last_modified);
    if !resp.partial() || version_id != rec.version_id {
        tracing::info!(task_id = %&v.task_id[..16], "the origin serves another version than the one replicated: seeding afresh");
        return Ok(Outcome::Unusable((!resp.partial()).then(|| Box::new(resp))));
    }
    let info = Info {
        version_id,
        content_length: len as i64,
        piece_size: rec.piece_size,
        etag: p.etag,
        last_modified: p.last_modified,
    };
    let store = ctx
        .store
        .open_task(&TaskMeta {
            version_id: info.version_id.clone(),
            task_id: v.task_id.clone(),
            url: v.url.clone(),
            content_length: info.content_length,
            piece_size: info.piece_size,
            etag: info.etag.clone(),
            last_modified: info.last_modified.clone(),
            digest: None,
        })
        .await?;
    let _ = v.store.set(store.clone());
    let cached = {
        let mut st = v.lock();
        st.info = Some(info.clone());
        st.pieces = rec.pieces.clone();
        st.seed_lacks = rec
            .pieces
            .iter()
            .filter(|m| store.piece(m.num).as_ref() != Some(*m))
            .map(|m| m.num)
            .collect();
        known as usize - st.seed_lacks.len()
    };
    ctx.metrics
        .rebuilt_pieces
        .with_label_values(&["cache"])
        .inc_by(cached as u64);
    announce(ctx, v, &info);
    tracing::info!(version = %&info.version_id[..16], known, cached, length = len, "taking the version over from another supernode");

    let tail = async {
        if tail_at < len {
            stream_body(ctx, v, &store, resp, (len as i64, rec.piece_size), known).await?;
        }
        Ok::<_, fetcher::Error>(())
    };
    let (tail, pulled) = tokio::join!(tail, pull(ctx, v, &store, &info));
    tail?;
    pulled?;
    finish(v, &store, &rec).await?;
    Ok(Outcome::Rebuilt)
}

/// Hashes the rebuilt content, checks it against what the failed supernode and the task say it
/// is, and completes the version.
async fn finish(v: &Arc<Version>, store: &Arc<TaskStore>, rec: &Record) -> fetcher::Result<()> {
    let s = store.clone();
    let len = rec.content_length;
    let digest = tokio::task::spawn_blocking(move || whole_digest(&s, len))
        .await
        .map_err(|e| fetcher::Error::Download(format!("digest task failed: {e}")))??;
    for expected in rec.digest.iter().chain(v.expected_digest.iter()) {
        if !expected.eq_ignore_ascii_case(&digest) {
            let _ = store.discard();
            return Err(fetcher::Error::DigestMismatch {
                expected: expected.clone(),
                actual: digest,
            });
        }
    }
    store.set_complete(len, Some(digest.clone()))?;
    let piece_count = rec.piece_count();
    v.lock().status = Status::Complete {
        content_length: len,
        piece_count,
        digest,
    };
    v.notify();
    tracing::info!(task_id = %&v.task_id[..16], bytes = len, pieces = piece_count, "version taken over: complete");
    Ok(())
}

/// `sha256:<hex>` of the store's first `len` bytes.
fn whole_digest(store: &TaskStore, len: u64) -> fetcher::Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut at = 0;
    while at < len {
        let n = (len - at).min(4 << 20);
        h.update(store.read_range(at, n)?);
        at += n;
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// What one fetch brought: the piece, where from, and its bytes or why not.
type Fetched = (PieceMeta, Source, Result<Bytes, String>);

/// Gets every piece in `seed_lacks` from the peers holding it, or from the origin when none has
/// announced it within `rebuild_wait`.
async fn pull(
    ctx: &SeedContext,
    v: &Arc<Version>,
    store: &Arc<TaskStore>,
    info: &Info,
) -> fetcher::Result<()> {
    let started = Instant::now();
    let wait = ctx
        .cluster
        .as_ref()
        .map_or(Duration::ZERO, |c| c.rebuild_wait);
    let mut inflight: JoinSet<Fetched> = JoinSet::new();
    let mut busy: HashSet<u32> = HashSet::new();
    // Peers that failed a piece: not asked for it again.
    let mut failed: HashMap<u32, HashSet<PeerKey>> = HashMap::new();
    loop {
        let picks = {
            let mut st = v.lock();
            if st.seed_lacks.is_empty() && inflight.is_empty() {
                return Ok(());
            }
            let origin_ok = started.elapsed() >= wait;
            choose(
                &mut st,
                &busy,
                &failed,
                PULLS - inflight.len(),
                origin_ok,
                ctx.peer_cap,
            )
        };
        for (meta, from) in picks {
            busy.insert(meta.num);
            inflight.spawn(fetch(ctx_parts(ctx, v, info), meta, from));
        }
        let joined = tokio::select! {
            j = inflight.join_next(), if !inflight.is_empty() => j,
            _ = tokio::time::sleep(LOOK_AGAIN), if inflight.is_empty() => None,
            _ = ctx.shutdown.wait() => return Err(fetcher::Error::Download("shutting down".into())),
        };
        let Some(joined) = joined else { continue };
        let (meta, from, got) =
            joined.map_err(|e| fetcher::Error::Download(format!("piece task failed: {e}")))?;
        busy.remove(&meta.num);
        if let Source::Peer { key, .. } = &from {
            v.lock().end_upload(Parent::Peer(*key), ctx.peer_cap);
        }
        match (got, from) {
            (Ok(data), from) => {
                let s = store.clone();
                let m = meta.clone();
                tokio::task::spawn_blocking(move || s.write_piece(&m, &data))
                    .await
                    .map_err(|e| fetcher::Error::Download(format!("store task failed: {e}")))??;
                let label = match from {
                    Source::Peer { .. } => "peer",
                    Source::Origin => "origin",
                };
                ctx.metrics.rebuilt_pieces.with_label_values(&[label]).inc();
                let first = {
                    let mut st = v.lock();
                    st.seed_lacks.remove(&meta.num);
                    // The seed can serve it now: to the peers waiting for it.
                    st.wake_starved_if(ctx.peer_cap, |_, c| State::lacks(c, meta.num));
                    st.pieces.len() - st.seed_lacks.len() == 1
                };
                if first {
                    // The seed's first piece: proofs of access wait for one.
                    v.notify();
                }
            }
            (Err(e), Source::Origin) => {
                return Err(fetcher::Error::OriginBody {
                    url: v.url.clone(),
                    detail: format!("piece {}: {e}", meta.num),
                });
            }
            (Err(e), Source::Peer { key, id, .. }) => {
                tracing::warn!(piece = meta.num, parent = %id, error = %e, "takeover: a peer failed a piece");
                if e.starts_with(MISMATCH) && v.lock().isolate(key) {
                    ctx.metrics.isolations.with_label_values(&["task"]).inc();
                    tracing::warn!(parent = %id, "parent isolated for this task");
                }
                failed.entry(meta.num).or_default().insert(key);
            }
        }
    }
}

/// Pure: up to `room` pieces the seed lacks and is not fetching, rarest first (the ones a
/// departing peer would take out of the cluster), each with a source: the least loaded usable
/// holder with a free slot (booked in its load), or the origin once `origin_ok` and no usable
/// holder is left at all.
fn choose(
    st: &mut State,
    busy: &HashSet<u32>,
    failed: &HashMap<u32, HashSet<PeerKey>>,
    room: usize,
    origin_ok: bool,
    peer_cap: usize,
) -> Vec<(PieceMeta, Source)> {
    let mut lacking: Vec<(usize, u32)> = st
        .seed_lacks
        .iter()
        .filter(|n| !busy.contains(n))
        .map(|n| (st.holders.get(n).map_or(0, |h| h.len()), *n))
        .collect();
    lacking.sort_unstable();
    let mut out = Vec::new();
    for (_, n) in lacking {
        if out.len() >= room {
            break;
        }
        let Some(meta) = st.pieces.get(n as usize).cloned() else {
            continue;
        };
        let no_go = failed.get(&n);
        // Usable holders of piece n: (load, key).
        let usable: Vec<(usize, PeerKey)> = st
            .holders
            .get(&n)
            .into_iter()
            .flat_map(|h| h.iter(&st.peers))
            .filter(|(k, p)| !p.isolated && no_go.is_none_or(|f| !f.contains(k)))
            .map(|(k, p)| (p.load, k))
            .collect();
        match usable.iter().filter(|(l, _)| *l < peer_cap).min() {
            Some(&(_, key)) => {
                let Some((id, base_url)) = st
                    .peers
                    .get(&key)
                    .map(|p| (p.id.clone(), p.base_url.clone()))
                else {
                    continue;
                };
                st.start_upload(Parent::Peer(key), peer_cap);
                out.push((meta, Source::Peer { key, id, base_url }));
            }
            None if origin_ok && usable.is_empty() => out.push((meta, Source::Origin)),
            None => {}
        }
    }
    out
}

/// Detail prefix of a piece whose bytes do not match its digest.
const MISMATCH: &str = "digest mismatch";

/// What a fetch needs, owned (fetches run as tasks).
struct Parts {
    http: reqwest::Client,
    source: fetcher::source::HttpSource,
    url: String,
    headers: Vec<fetcher::source::HeaderPair>,
    version_id: String,
    ticket: String,
    metrics: crate::metrics::Metrics,
}

fn ctx_parts(ctx: &SeedContext, v: &Version, info: &Info) -> Parts {
    Parts {
        http: ctx.peer_http.clone(),
        source: ctx.source.clone(),
        url: v.url.clone(),
        headers: v.headers.clone(),
        version_id: info.version_id.clone(),
        ticket: ctx.tickets.pieces(&info.version_id, None).0,
        metrics: ctx.metrics.clone(),
    }
}

async fn fetch(p: Parts, meta: PieceMeta, from: Source) -> Fetched {
    let got = match &from {
        Source::Peer { base_url, .. } => {
            let url = format!(
                "{}/pieces/{}/{}",
                base_url.trim_end_matches('/'),
                p.version_id,
                meta.num
            );
            tokio::time::timeout(PIECE_TIMEOUT, from_peer(&p, &url, &meta))
                .await
                .unwrap_or_else(|_| Err(format!("timed out after {PIECE_TIMEOUT:?}")))
        }
        Source::Origin => from_origin(&p, &meta).await,
    };
    let got = got.and_then(|data| {
        if meta.verify(&data) {
            Ok(data)
        } else {
            Err(format!("{MISMATCH}: {} bytes", data.len()))
        }
    });
    (meta, from, got)
}

async fn from_peer(p: &Parts, url: &str, meta: &PieceMeta) -> Result<Bytes, String> {
    let resp = p
        .http
        .get(url)
        .bearer_auth(&p.ticket)
        .send()
        .await
        .map_err(|e| fetcher::source::error_chain(&e))?;
    if !resp.status().is_success() {
        return Err(format!("parent answered HTTP {}", resp.status().as_u16()));
    }
    fetcher::source::read_bounded(resp, meta.size as usize)
        .await
        .map_err(|e| e.to_string())
}

async fn from_origin(p: &Parts, meta: &PieceMeta) -> Result<Bytes, String> {
    p.metrics
        .source_requests
        .with_label_values(&["fetch"])
        .inc();
    let end = meta.offset + u64::from(meta.size) - 1;
    let resp = p
        .source
        .get(&p.url, &p.headers, Some((meta.offset, end)))
        .await
        .map_err(|e| e.to_string())?;
    if !resp.partial() {
        return Err("the origin ignored the range".into());
    }
    let mut body = std::pin::pin!(resp.into_stream());
    let mut data = bytes::BytesMut::with_capacity(meta.size as usize);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        p.metrics.source_bytes.inc_by(chunk.len() as u64);
        if data.len() + chunk.len() > meta.size as usize {
            return Err("more bytes than the range".into());
        }
        data.extend_from_slice(&chunk);
    }
    Ok(data.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::PeerState;

    fn version(pieces: u32) -> Arc<Version> {
        let v = Version::with_pieces(pieces);
        v.lock().seed_lacks = (0..pieces).collect();
        v
    }

    fn holder(st: &mut State, id: &str, have: &[u32]) {
        let p = PeerState::new(
            id.into(),
            id.into(),
            format!("https://{id}"),
            have.iter().copied().collect(),
        );
        st.add_peer(p);
    }

    fn sources(picks: &[(PieceMeta, Source)]) -> Vec<(u32, String)> {
        picks
            .iter()
            .map(|(m, f)| {
                let s = match f {
                    Source::Peer { id, .. } => id.clone(),
                    Source::Origin => "origin".into(),
                };
                (m.num, s)
            })
            .collect()
    }

    #[test]
    fn pieces_come_from_holders_within_their_slots_and_the_origin_only_for_orphans() {
        let v = version(4);
        let mut st = v.lock();
        holder(&mut st, "a", &[0, 1, 2]);
        holder(&mut st, "b", &[1]);
        let none = HashMap::new();
        // Before the wait is over, a piece nobody holds (3) waits.
        let got = sources(&choose(&mut st, &HashSet::new(), &none, 8, false, 2));
        assert_eq!(got, vec![(0, "a".into()), (2, "a".into()), (1, "b".into())]);
        let a = st.key("a");
        assert_eq!(st.load(Parent::Peer(a)), 2);
        assert!(!st.sites[0].free.contains(&a), "a's slots are taken");
        // After it, the orphan comes from the origin; busy pieces are not picked twice.
        let busy: HashSet<u32> = [0, 1, 2].into();
        let got = sources(&choose(&mut st, &busy, &none, 8, true, 2));
        assert_eq!(got, vec![(3, "origin".into())]);
    }

    #[test]
    fn failed_or_isolated_holders_are_not_asked_and_busy_ones_are_waited_for() {
        let v = version(2);
        let mut st = v.lock();
        holder(&mut st, "a", &[0, 1]);
        holder(&mut st, "evil", &[0, 1]);
        let evil = st.key("evil");
        st.isolate(evil);
        let failed: HashMap<u32, HashSet<PeerKey>> = [(0, [st.key("a")].into())].into();
        let got = sources(&choose(&mut st, &HashSet::new(), &failed, 8, true, 1));
        // Piece 0: a failed it and evil is isolated: the origin. Piece 1: a.
        assert_eq!(got, vec![(0, "origin".into()), (1, "a".into())]);
        // a is at its cap now: piece 1 again (say it failed elsewhere) waits rather than going to
        // the origin while a usable holder exists.
        let busy: HashSet<u32> = [0].into();
        st.seed_lacks.insert(1);
        let got = choose(&mut st, &busy, &HashMap::new(), 8, true, 1);
        assert!(got.is_empty());
    }
}
