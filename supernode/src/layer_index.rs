//! Layer indexes (tar TOC + gzip checkpoints, see the `layerindex` crate) for registry blobs the
//! supernode seeded: built once per digest from the seed on disk, kept next to the cache
//! (`<data_dir>/indexes/<hex>.idx`), served at `GET /api/v1/index/sha256:<hex>`. Concurrent
//! requests for the same digest share one build.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use fetcher::piece_store::TaskStore;
use layerindex::LayerIndex;
use tokio::sync::OnceCell;

use crate::task::{Status, Tasks};

/// Why there is no index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("bad digest {0:?}")]
    BadDigest(String),
    #[error("blob {0} has not been seeded here (pull it through a dfdaemon first)")]
    NotSeeded(String),
    #[error("blob {digest} cannot be indexed: {detail}")]
    Unindexable { digest: String, detail: String },
    #[error("seeding blob {digest} failed: {detail}")]
    Seed { digest: String, detail: String },
    #[error("index storage: {0}")]
    Io(String),
}

/// One build in progress, shared by the requests for the same digest.
type Build = Arc<OnceCell<Arc<Vec<u8>>>>;

pub struct Indexes {
    dir: PathBuf,
    tasks: Arc<Tasks>,
    building: Mutex<HashMap<String, Build>>,
}

/// Distance between gzip checkpoints: a FUSE read inflates at most this much extra.
const SPAN: u64 = layerindex::DEFAULT_SPAN;

/// Reads a task's content from its store, in order.
struct StoreReader {
    store: Arc<TaskStore>,
    pos: u64,
    len: u64,
}

impl Read for StoreReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.len - self.pos).min(1 << 20);
        if n == 0 {
            return Ok(0);
        }
        let bytes = self
            .store
            .read_range(self.pos, n)
            .map_err(std::io::Error::other)?;
        let got = bytes.len();
        buf[..got].copy_from_slice(&bytes);
        self.pos += got as u64;
        Ok(got)
    }
}

impl Indexes {
    pub fn new(data_dir: &std::path::Path, tasks: Arc<Tasks>) -> Self {
        Self {
            dir: data_dir.join("indexes"),
            tasks,
            building: Mutex::new(HashMap::new()),
        }
    }

    /// The serialized index of blob `digest` (`sha256:<hex>`).
    pub async fn get(&self, digest: &str) -> Result<Arc<Vec<u8>>, IndexError> {
        let hex = fetcher::task_id::parse_digest(digest)
            .map_err(|_| IndexError::BadDigest(digest.to_owned()))?;
        let cell = {
            let mut m = self
                .building
                .lock()
                .map_err(|_| IndexError::Io("index table poisoned".into()))?;
            m.entry(hex.clone()).or_default().clone()
        };
        let result = cell
            .get_or_try_init(|| self.load_or_build(&hex))
            .await
            .cloned();
        // Built (and kept on disk) or failed: later requests start afresh.
        if let Ok(mut m) = self.building.lock() {
            m.remove(&hex);
        }
        result
    }

    async fn load_or_build(&self, hex: &str) -> Result<Arc<Vec<u8>>, IndexError> {
        let path = self.dir.join(format!("{hex}.idx"));
        if let Ok(bytes) = tokio::fs::read(&path).await
            && LayerIndex::from_bytes(&bytes).is_ok()
        {
            return Ok(Arc::new(bytes));
        }
        let digest = format!("sha256:{hex}");
        let store = self.complete_store(&digest)?;
        let len = store.meta().content_length;
        let len = u64::try_from(len).map_err(|_| IndexError::NotSeeded(digest.clone()))?;
        let started = std::time::Instant::now();
        let d = digest.clone();
        let bytes = tokio::task::spawn_blocking(move || build(store, len, &d))
            .await
            .map_err(|e| IndexError::Io(format!("index task failed: {e}")))??;
        tracing::info!(%digest, bytes = bytes.len(), ms = started.elapsed().as_millis() as u64, "layer index built");
        let tmp = path.with_extension("tmp");
        let write = async {
            tokio::fs::create_dir_all(&self.dir).await?;
            tokio::fs::write(&tmp, &bytes).await?;
            tokio::fs::rename(&tmp, &path).await
        };
        if let Err(e) = write.await {
            // Served anyway; built again next time.
            tracing::warn!(path = %path.display(), error = %e, "cannot keep the layer index");
        }
        Ok(Arc::new(bytes))
    }

    /// The store of the finished seed of `digest`.
    fn complete_store(&self, digest: &str) -> Result<Arc<TaskStore>, IndexError> {
        let task_id = fetcher::task_id::content_task_id(digest)
            .map_err(|_| IndexError::BadDigest(digest.to_owned()))?;
        let v = self
            .tasks
            .current(&task_id)
            .ok_or_else(|| IndexError::NotSeeded(digest.to_owned()))?;
        // Only a seed whose bytes matched the blob's digest is indexed.
        let verified = matches!(&v.lock().status,
            Status::Complete { digest: d, .. } if d.eq_ignore_ascii_case(digest));
        if !verified {
            return Err(IndexError::NotSeeded(digest.to_owned()));
        }
        v.store
            .get()
            .cloned()
            .ok_or_else(|| IndexError::NotSeeded(digest.to_owned()))
    }
}

/// Builds and serializes the index of a whole blob (blocking).
fn build(store: Arc<TaskStore>, len: u64, digest: &str) -> Result<Vec<u8>, IndexError> {
    let unindexable = |detail: String| IndexError::Unindexable {
        digest: digest.to_owned(),
        detail,
    };
    let head = store
        .read_range(0, len.min(4))
        .map_err(|e| IndexError::Io(e.to_string()))?;
    let reader = StoreReader { store, pos: 0, len };
    let index = match head.as_ref() {
        [0x1f, 0x8b, ..] => LayerIndex::build_gzip(reader, SPAN),
        [0x28, 0xb5, 0x2f, 0xfd] => LayerIndex::build_zstd(reader),
        _ => LayerIndex::build_tar(reader),
    }
    .map_err(|e| unindexable(e.to_string()))?;
    let bytes = index.to_bytes().map_err(|e| unindexable(e.to_string()))?;
    // What agents accept (they refuse larger ones): nothing bigger is kept or served.
    if bytes.len() > fetcher::layer_index::MAX_INDEX {
        return Err(unindexable(format!(
            "index of {} bytes, over {}",
            bytes.len(),
            fetcher::layer_index::MAX_INDEX
        )));
    }
    Ok(bytes)
}
