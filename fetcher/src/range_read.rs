//! Byte ranges of content-keyed blobs (registry layers), for lazy readers such as dfsnapshotter:
//! the first read of a blob starts one P2P download of it into the piece store (shared by all
//! readers, kept seeding afterwards), and each read returns as soon as the verified pieces
//! covering its range are in the store. The whole blob is verified against its digest when it
//! completes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use crate::download::{BackSource, Destination, DownloadRequest, Progress, Wants};
use crate::error::{Error, Result};
use crate::peer::Peer;
use crate::piece_store::TaskStore;
use crate::task_id;

/// A range of a registry blob.
#[derive(Clone, Debug)]
pub struct RangeRequest {
    /// Where the registry serves the blob (`https://<registry>/v2/<name>/blobs/<digest>`).
    pub url: String,
    /// The client's credentials for it (Authorization...).
    pub headers: Vec<(String, String)>,
    /// `sha256:<hex>`: the task key and the whole blob's expected digest.
    pub digest: String,
    pub offset: u64,
    pub length: u64,
    /// Fetch only the pieces reads ask for (else the rest follows in the background).
    pub only_range: bool,
}

/// One blob being (or done being) fetched.
struct Fetch {
    store: watch::Receiver<Option<Arc<TaskStore>>>,
    /// The pieces reads wait on (fetched before any other), and whether to fetch the rest.
    wants: watch::Sender<Wants>,
    /// `None` while running; the outcome once done.
    result: watch::Receiver<Option<Result<(), String>>>,
}

/// The blobs fetched for range reads, by task id.
#[derive(Default)]
pub(crate) struct BlobFetches {
    map: Mutex<HashMap<String, Arc<Fetch>>>,
}

/// Longest a waiting read goes without looking at the store again, should a wake-up be missed
/// (reads wake when a piece lands or the fetch ends).
const BACKSTOP: Duration = Duration::from_secs(1);

/// Waits until `a` or `b` changes (a closed channel no longer counts), or [`BACKSTOP`] passes.
async fn either_changed<A, B>(a: &mut watch::Receiver<A>, b: &mut watch::Receiver<B>) {
    let wait = async {
        tokio::select! {
            Ok(()) = a.changed() => {}
            Ok(()) = b.changed() => {}
            else => std::future::pending::<()>().await,
        }
    };
    let _ = tokio::time::timeout(BACKSTOP, wait).await;
}

impl BlobFetches {
    /// A whole download of `task_id` is starting in this process: a range fetch of it that
    /// fetches only what reads want now fetches everything, so it completes and hands the
    /// version over (one download of a version at a time runs per process).
    pub(crate) fn want_whole(&self, task_id: &str) {
        let fetch = self.map.lock().ok().and_then(|m| m.get(task_id).cloned());
        if let Some(f) = fetch {
            f.wants
                .send_if_modified(|w| std::mem::replace(&mut w.only, false));
        }
    }
}

impl Peer {
    /// The bytes `[offset, offset + length)` of the blob, verified piece by piece.
    pub async fn read_range(&self, r: &RangeRequest) -> Result<Bytes> {
        let hex = task_id::parse_digest(&r.digest)?;
        let task_id = task_id::content_task_id(&r.digest)?;
        let fetch = self.fetch_for(&task_id, r, &hex)?;
        let mut result = fetch.result.clone();
        let store = {
            let mut store = fetch.store.clone();
            loop {
                if let Some(s) = store.borrow_and_update().clone() {
                    break s;
                }
                if let Some(Err(e)) = result.borrow_and_update().clone() {
                    return Err(Error::Download(e));
                }
                either_changed(&mut store, &mut result).await;
            }
        };
        let meta = store.meta();
        let len = u64::try_from(meta.content_length)
            .map_err(|_| Error::Download("blob length unknown".into()))?;
        let end = r
            .offset
            .checked_add(r.length)
            .filter(|e| *e <= len)
            .ok_or_else(|| {
                Error::invalid(
                    "range",
                    format!("{}+{} outside the blob's {len} bytes", r.offset, r.length),
                )
            })?;
        if r.length == 0 {
            return Ok(Bytes::new());
        }
        let ps = u64::from(meta.piece_size);
        let pieces = u32::try_from(r.offset / ps).unwrap_or(u32::MAX)
            ..=u32::try_from((end - 1) / ps).unwrap_or(u32::MAX);
        fetch.wants.send_if_modified(|w| {
            let mut changed = false;
            for n in pieces.clone() {
                if store.piece(n).is_none() {
                    changed |= w.pieces.insert(n);
                }
            }
            // One reader that wants the whole blob fetched is enough.
            if w.only && !r.only_range {
                w.only = false;
                changed = true;
            }
            changed
        });
        let mut landed = store.changes();
        loop {
            landed.borrow_and_update();
            if pieces.clone().all(|n| store.piece(n).is_some()) {
                break;
            }
            let done = result.borrow_and_update().clone();
            match done {
                Some(Err(e)) => return Err(Error::Download(e)),
                Some(Ok(())) => {
                    return Err(Error::Download(
                        "blob fetched but pieces of the range are missing".into(),
                    ));
                }
                None => either_changed(&mut landed, &mut result).await,
            }
        }
        let (offset, length) = (r.offset, r.length);
        tokio::task::spawn_blocking(move || store.read_range(offset, length))
            .await
            .map_err(|e| Error::Download(format!("read task failed: {e}")))?
    }

    /// Fetches the whole blob into the store (shared with range reads of it, seeded afterwards)
    /// and returns once every piece is there and the whole is verified.
    pub async fn fetch_blob(
        &self,
        url: &str,
        headers: &[(String, String)],
        digest: &str,
    ) -> Result<()> {
        let hex = task_id::parse_digest(digest)?;
        let task_id = task_id::content_task_id(digest)?;
        let r = RangeRequest {
            url: url.to_owned(),
            headers: headers.to_vec(),
            digest: digest.to_owned(),
            offset: 0,
            length: 0,
            only_range: false,
        };
        let fetch = self.fetch_for(&task_id, &r, &hex)?;
        fetch
            .wants
            .send_if_modified(|w| std::mem::replace(&mut w.only, false));
        let mut result = fetch.result.clone();
        loop {
            if let Some(outcome) = result.borrow_and_update().clone() {
                return outcome.map_err(Error::Download);
            }
            if result.changed().await.is_err() {
                return Err(Error::Download("the blob fetch went away".into()));
            }
        }
    }

    /// The running (or finished) fetch of `task_id`, started if there is none.
    fn fetch_for(&self, task_id: &str, r: &RangeRequest, hex: &str) -> Result<Arc<Fetch>> {
        let mut map = self
            .inner
            .ranges
            .map
            .lock()
            .map_err(|_| Error::Download("range table poisoned".into()))?;
        if let Some(f) = map.get(task_id) {
            return Ok(f.clone());
        }
        let (store_tx, store_rx) = watch::channel(None);
        let (result_tx, result_rx) = watch::channel(None);
        let (wants_tx, wants_rx) = watch::channel(Wants {
            pieces: Default::default(),
            only: r.only_range,
        });
        let fetch = Arc::new(Fetch {
            store: store_rx,
            wants: wants_tx,
            result: result_rx,
        });
        map.insert(task_id.to_owned(), fetch.clone());
        let req = DownloadRequest {
            url: r.url.clone(),
            output: Destination::Store {
                store: store_tx,
                wants: wants_rx,
            },
            headers: r.headers.clone(),
            digest: Some(hex.to_owned()),
            tag: String::new(),
            filter: Vec::new(),
            limit_rate: 0,
            back_source: BackSource::Auto,
            timeout: None,
            content_key: Some(r.digest.clone()),
            seed_only: false,
        };
        let (peer, task_id) = (self.clone(), task_id.to_owned());
        tokio::spawn(async move {
            let (ptx, _prx) = watch::channel(Progress::default());
            let outcome = peer.download(&req, &ptx).await;
            if let Err(e) = &outcome {
                tracing::warn!(digest = %req.content_key.as_deref().unwrap_or(""), error = %e, "blob fetch for range reads failed");
                // Later reads start afresh.
                if let Ok(mut m) = peer.inner.ranges.map.lock() {
                    m.remove(&task_id);
                }
            }
            result_tx.send_replace(Some(outcome.map(|_| ()).map_err(|e| e.to_string())));
        });
        Ok(fetch)
    }
}
