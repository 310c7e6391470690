//! Running one download: supernodes in rendezvous order, each a scheduled P2P session; back-to-source
//! when none is reachable (unless disabled); then whole-content verification and atomic delivery.

mod back_source;
pub(crate) mod channels;
mod piece_fetch;
pub(crate) mod scheduled;
mod stream;

/// A scheduler client to a supernode (over cluster TLS when given one).
pub use scheduled::{channel as supernode_channel, connect as connect_scheduler};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use self::stream::StreamTail;
use crate::error::{Error, Result};
use crate::output::{self, Output};
use crate::peer::Peer;
use crate::piece::PieceMeta;
use crate::piece_store::{TaskMeta, TaskStore};
use crate::rate::RateLimiter;
use crate::source::HeaderPair;
use crate::{rendezvous, task_id};

/// Whether a peer may go to the origin itself when no supernode is reachable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackSource {
    /// Go to the origin when every supernode failed.
    #[default]
    Auto,
    /// Never: fail instead.
    Never,
}

/// Where the content goes.
#[derive(Clone, Debug)]
pub enum Destination {
    /// A file, which appears whole and verified or not at all.
    File(PathBuf),
    /// A channel receiving the content in order as it arrives; the final byte is sent only after the
    /// whole content is verified (an `Err` ends the stream otherwise).
    Stream(mpsc::Sender<Result<Bytes>>),
    /// Only the piece store: the store is announced on `store` as soon as it is open, so readers
    /// can use verified pieces while the rest arrives (see `Peer::read_range`); `wants` says which
    /// pieces they wait on (fetched first) and whether to fetch anything else. The whole is
    /// verified against the digest once every piece is there.
    Store {
        store: watch::Sender<Option<Arc<TaskStore>>>,
        wants: watch::Receiver<Wants>,
    },
}

/// What lazy readers want of a download into the store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wants {
    /// Pieces reads are waiting on.
    pub pieces: std::collections::BTreeSet<u32>,
    /// Fetch nothing but `pieces` (no background fetching of the rest).
    pub only: bool,
}

/// One download as the user asked for it.
#[derive(Clone, Debug)]
pub struct DownloadRequest {
    pub url: String,
    pub output: Destination,
    pub headers: Vec<HeaderPair>,
    /// Expected sha256 of the whole content, lowercase hex.
    pub digest: Option<String>,
    pub tag: String,
    pub filter: Vec<String>,
    /// Per-task cap in bytes/s (0: none).
    pub limit_rate: u64,
    pub back_source: BackSource,
    pub timeout: Option<Duration>,
    /// Key the task by this content digest (`sha256:<hex>`) instead of the URL (registry blobs).
    pub content_key: Option<String>,
    /// Register only to serve a version held whole (see `Register.seed_only`).
    pub seed_only: bool,
}

/// Where the bytes are coming from, updated as pieces land.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// -1 while unknown.
    pub content_length: i64,
    pub completed: u64,
    pub from_peers: u64,
    pub from_supernode: u64,
    pub from_origin: u64,
    /// Bytes already in the store from an earlier run.
    pub reused: u64,
}

/// What a finished download did.
#[derive(Clone, Debug)]
pub struct Summary {
    pub progress: Progress,
    pub elapsed: Duration,
    /// `sha256:<hex>` of the delivered content.
    pub digest: String,
    pub verify_failures: u64,
}

/// State of one download, kept across supernode attempts so verified pieces are never refetched.
pub(crate) struct Download<'a> {
    pub(crate) peer: &'a Peer,
    pub(crate) req: &'a DownloadRequest,
    pub(crate) task_id: String,
    pub(crate) store: Option<Arc<TaskStore>>,
    pub(crate) known: HashMap<u32, PieceMeta>,
    pub(crate) piece_count: Option<u32>,
    pub(crate) whole_digest: Option<String>,
    pub(crate) progress: Progress,
    pub(crate) progress_tx: &'a watch::Sender<Progress>,
    pub(crate) task_limit: RateLimiter,
    pub(crate) verify_failures: u64,
    /// The destination file, written as pieces land.
    pub(crate) output: Option<Output>,
    /// The destination stream, fed as the contiguous prefix grows.
    pub(crate) stream: Option<StreamTail>,
    _busy: Option<tokio::sync::OwnedMutexGuard<()>>,
}

/// How a session with one supernode ended without completing.
pub(crate) enum SessionError {
    /// Try the next supernode (unreachable, stream broken, internal error).
    Retry(String),
    /// Give up: the same would happen anywhere (origin refused, no disk space, ...).
    Fatal(Error),
}

impl Peer {
    /// Downloads `req` to `req.output`, reporting progress on `progress`.
    pub async fn download(
        &self,
        req: &DownloadRequest,
        progress: &watch::Sender<Progress>,
    ) -> Result<Summary> {
        let task_id =
            task_id::task_id_of(&req.url, &req.tag, &req.filter, req.content_key.as_deref())?;
        if let Destination::File(path) = &req.output {
            output::output_dir(path)?;
        }
        let span = tracing::info_span!("download", task_id = %&task_id[..16], url = %crate::source::redact(&req.url));
        let fut = self.download_inner(req, task_id, progress).instrument(span);
        let res = match req.timeout {
            Some(t) => tokio::time::timeout(t, fut)
                .await
                .unwrap_or(Err(Error::Timeout(t))),
            None => fut.await,
        };
        let label = if res.is_ok() { "ok" } else { "error" };
        self.inner
            .metrics
            .downloads
            .with_label_values(&[label])
            .inc();
        res
    }

    async fn download_inner(
        &self,
        req: &DownloadRequest,
        task_id: String,
        progress_tx: &watch::Sender<Progress>,
    ) -> Result<Summary> {
        let started = Instant::now();
        let mut d = Download {
            peer: self,
            req,
            task_id,
            store: None,
            known: HashMap::new(),
            piece_count: None,
            whole_digest: None,
            progress: Progress {
                content_length: -1,
                ..Default::default()
            },
            progress_tx,
            task_limit: RateLimiter::new(req.limit_rate),
            verify_failures: 0,
            output: None,
            stream: None,
            _busy: None,
        };
        let order: Vec<String> = rendezvous::order(&d.task_id, &self.inner.cfg.supernodes)
            .into_iter()
            .map(str::to_owned)
            .collect();
        let mut tried = Vec::new();
        let mut seeding = None;
        for sn in &order {
            match d.with_supernode(sn).await {
                Ok(session) => {
                    seeding = Some(session);
                    break;
                }
                Err(SessionError::Fatal(e)) => return Err(e),
                Err(SessionError::Retry(why)) => {
                    tracing::warn!(supernode = %sn, reason = %why, "supernode failed; trying the next");
                    tried.push(format!("{sn}: {why}"));
                }
            }
        }
        if seeding.is_none() {
            let tried = if tried.is_empty() {
                "none configured".to_owned()
            } else {
                tried.join("; ")
            };
            if req.back_source == BackSource::Never {
                return Err(Error::NoSupernode { tried });
            }
            tracing::warn!(tried = %tried, "no supernode reachable; downloading from the origin");
            d.back_source().await?;
        }
        let store = d
            .store
            .clone()
            .ok_or_else(|| Error::Download("no content".into()))?;
        let len = u64::try_from(store.meta().content_length)
            .map_err(|_| Error::Download("content length unknown".into()))?;
        // The seed's digest of the whole, whose pieces were each verified on arrival.
        let vouched = d
            .whole_digest
            .as_deref()
            .and_then(|seed| task_id::parse_digest(seed).ok());
        let expected = req.digest.clone().or_else(|| vouched.clone());
        let digest = match (d.output.take(), d.stream.take()) {
            (Some(out), _) => {
                let (user, vouched) = (req.digest.clone(), vouched);
                tokio::task::spawn_blocking(move || {
                    out.commit(len, user.as_deref(), vouched.as_deref())
                })
                .await
                .map_err(|e| Error::Download(format!("delivery task failed: {e}")))??
            }
            (None, Some(stream)) => stream.finish(len, expected).await?,
            (None, None) if matches!(req.output, Destination::Store { .. }) => {
                let s = store.clone();
                tokio::task::spawn_blocking(move || verify_store(&s, len, expected.as_deref()))
                    .await
                    .map_err(|e| Error::Download(format!("verify task failed: {e}")))??
            }
            (None, None) => return Err(Error::Download("no destination".into())),
        };
        store.touch();
        let summary = Summary {
            progress: d.progress.clone(),
            elapsed: started.elapsed(),
            digest,
            verify_failures: d.verify_failures,
        };
        let version = store.meta().version_id;
        match seeding {
            Some(session) if self.inner.cfg.keep_seeding => {
                self.keep_seeding(session, store, req.clone())
            }
            _ => self.inner.open.remove(&version),
        }
        Ok(summary)
    }
}

/// Hashes a whole store; with `expected` (hex), a mismatch discards the store and is an error.
fn verify_store(store: &TaskStore, len: u64, expected: Option<&str>) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut at = 0;
    while at < len {
        let n = (len - at).min(4 << 20);
        h.update(store.read_range(at, n)?);
        at += n;
    }
    let got = hex::encode(h.finalize());
    if let Some(want) = expected
        && !want.eq_ignore_ascii_case(&got)
    {
        let _ = store.discard();
        return Err(Error::DigestMismatch {
            expected: want.to_owned(),
            actual: got,
        });
    }
    Ok(format!("sha256:{got}"))
}

impl Download<'_> {
    /// Opens (or keeps) the store for the version the supernode/origin described, after checking
    /// that the destination and the store have room for it.
    pub(crate) async fn open_version(&mut self, meta: TaskMeta) -> Result<Arc<TaskStore>> {
        if let Some(s) = &self.store {
            if s.meta().version_id == meta.version_id {
                return Ok(s.clone());
            }
            tracing::warn!(old = %s.meta().version_id, new = %meta.version_id, "origin content changed; starting over");
            self.peer.inner.open.remove(&s.meta().version_id);
            self.store = None;
            self.output = None;
            self.stream = None;
            self._busy = None;
            self.known.clear();
            self.progress = Progress {
                content_length: meta.content_length,
                ..Default::default()
            };
        }
        if meta.content_length >= 0 {
            let len = meta.content_length as u64;
            match &self.req.output {
                Destination::File(path) => {
                    output::preflight(path, self.peer.inner.store.root(), len, 0)?
                }
                Destination::Stream(_) | Destination::Store { .. } => {
                    output::check_space(self.peer.inner.store.root(), len)?
                }
            }
        }
        if !matches!(self.req.output, Destination::Store { .. }) {
            // A lazy reader's fetch of only what it reads would hold the version forever.
            self.peer.inner.ranges.want_whole(&self.task_id);
        }
        let busy = self
            .peer
            .inner
            .open
            .busy_lock(&meta.version_id)
            .lock_owned()
            .await;
        let store = match self.peer.inner.open.get(&meta.version_id) {
            Some(s) => s,
            None => {
                let s = self.peer.inner.store.open_task(&meta).await?;
                self.peer.inner.open.insert(s.clone());
                s
            }
        };
        store.touch();
        // Start the destination with what the store already holds (a resumed download).
        match &self.req.output {
            Destination::File(path) => {
                let out = Output::create_for(path, &store)?;
                if let Some(w) = out.writer() {
                    let (s, dest) = (store.clone(), path.clone());
                    tokio::task::spawn_blocking(move || {
                        for n in s.have() {
                            if let (Some(m), Some(data)) = (s.piece(n), s.read_piece(n)?) {
                                w.write_at(m.offset, &data)
                                    .map_err(|e| Error::io("cannot write output", &dest, e))?;
                            }
                        }
                        Ok::<_, Error>(())
                    })
                    .await
                    .map_err(|e| Error::Download(format!("output task failed: {e}")))??;
                }
                self.output = Some(out);
            }
            Destination::Stream(tx) => {
                let tail = StreamTail::start(store.clone(), tx.clone());
                tail.advance(store.contiguous_bytes());
                self.stream = Some(tail);
            }
            Destination::Store { store: tx, .. } => {
                tx.send_replace(Some(store.clone()));
            }
        }
        let (_, held) = store.held();
        self.progress.content_length = meta.content_length;
        self.progress.reused = held;
        self.progress.completed = held;
        self.progress_tx.send_replace(self.progress.clone());
        self._busy = Some(busy);
        self.store = Some(store.clone());
        Ok(store)
    }

    /// Moves the destination along the store's contiguous prefix: hashes the file's new prefix (so
    /// little is left to hash at the end), or lets the stream send it.
    pub(crate) fn advance(&mut self) {
        let Some(store) = &self.store else {
            return;
        };
        let upto = store.contiguous_bytes();
        if let Some(stream) = &self.stream {
            stream.advance(upto);
        }
        // Hashing a few MiB blocks briefly; on a multi-threaded runtime let other tasks move meanwhile.
        let multi = matches!(
            tokio::runtime::Handle::current().runtime_flavor(),
            tokio::runtime::RuntimeFlavor::MultiThread
        );
        // Only a digest the user gave needs the whole hashed again: every piece was verified.
        if self.req.digest.is_some()
            && let Some(out) = &mut self.output
            && let Err(e) = if multi {
                tokio::task::block_in_place(|| out.hash_upto(upto))
            } else {
                out.hash_upto(upto)
            }
        {
            tracing::warn!(error = %e, "cannot hash the output yet; will retry at the end");
        }
    }

    /// True once every piece of the version is held.
    pub(crate) fn is_complete(&self) -> bool {
        let Some(store) = &self.store else {
            return false;
        };
        let meta = store.meta();
        let count = self.piece_count.or_else(|| {
            (meta.content_length >= 0)
                .then(|| (meta.content_length as u64).div_ceil(u64::from(meta.piece_size)) as u32)
        });
        matches!(count, Some(c) if store.held().0 as u32 >= c)
    }
}
