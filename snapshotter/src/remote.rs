//! Remote layers: a layer containerd asks to unpack is instead mounted read-only over FUSE from
//! its index (tar TOC + gzip checkpoints), and its bytes are read lazily through the local agent,
//! piece by piece from peers and supernodes. containerd learns the layer "already exists" and
//! downloads nothing.
//!
//! containerd marks such a prepare with labels (CRI sets them on every layer; `dfsnapshotter pull`
//! does the same): the chain id the snapshot will be named (`containerd.io/snapshot.ref`), the
//! layer blob's digest and the image reference it came from.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use layerindex::LayerIndex;
use proto::agent::agent_client::AgentClient;
use tonic::transport::Channel;

use crate::credentials::Scope;
use crate::error::{Error, Result};
use crate::layerfs::cache::ChunkCache;
use crate::layerfs::{AgentBlob, Credentials, LayerFs};
use crate::metastore::RemoteRef;
use crate::metrics::Metrics;
use crate::registry::{Reference, Registry};
use crate::start::{StartClock, StartOptions};

/// The chain id containerd will know the committed layer by.
pub const LABEL_TARGET: &str = "containerd.io/snapshot.ref";
/// The layer blob's digest (CRI's label name, which `dfsnapshotter pull` also uses).
pub const LABEL_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// The image reference the layer was pulled for.
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";

/// The index kept next to a remote layer's mount point, so a restart remounts without a network.
const INDEX_FILE: &str = "layer.idx";

/// The remote layer a prepare asks for, if its labels say so.
pub fn wanted(labels: &BTreeMap<String, String>) -> Option<RemoteRef> {
    labels.get(LABEL_TARGET)?;
    let digest = labels.get(LABEL_LAYER_DIGEST)?;
    let image = labels.get(LABEL_IMAGE_REF)?;
    fetcher::task_id::parse_digest(digest).ok()?;
    Some(RemoteRef {
        digest: digest.clone(),
        image: image.clone(),
    })
}

/// Registry credentials for a blob, asked for on each agent call: made once per image scope and
/// reused while fresh ([`Registry::read_headers`]), made again when the registry refuses them.
struct RegistryCredentials {
    handle: tokio::runtime::Handle,
    registry: Arc<Registry>,
    image: Reference,
    /// `damselfly_snapshotter_read_credentials_total{headers}`.
    made: prometheus::IntCounterVec,
}

impl Credentials for RegistryCredentials {
    fn refresh(&self) {
        let r = &self.image;
        self.registry
            .refresh(&Scope::new(&r.registry, &r.repository));
    }

    fn headers(&self) -> Vec<(String, String)> {
        let r = &self.image;
        match self
            .handle
            .block_on(self.registry.read_headers(&r.registry, &r.repository))
        {
            Ok((h, reused)) => {
                let how = if reused { "reused" } else { "made" };
                self.made.with_label_values(&[how]).inc();
                h
            }
            Err(e) => {
                tracing::warn!(image = %r.name(), error = %e, "no registry credentials for a layer read");
                Vec::new()
            }
        }
    }
}

/// The remote layers mounted by this process, by snapshot id.
pub struct RemoteLayers {
    agent_socket: PathBuf,
    /// Fetch the rest of each layer in the background once it is mounted (reads still go first).
    background_fetch: bool,
    /// FUSE passthrough for files whose bytes are all local.
    passthrough: bool,
    /// Recording first starts, prefetching recorded ones.
    start: StartOptions,
    /// Start clocks by image reference, while a layer of the image records its start.
    clocks: Mutex<HashMap<String, std::sync::Weak<StartClock>>>,
    agent: tokio::sync::OnceCell<AgentClient<Channel>>,
    registry: Arc<Registry>,
    metrics: Metrics,
    /// Inflated chunks of every mounted layer, in memory.
    chunks: Arc<ChunkCache>,
    /// Mounted layers by snapshot id.
    sessions: Mutex<HashMap<u64, Mounted>>,
}

struct Mounted {
    session: fuser::BackgroundSession,
    mountpoint: PathBuf,
    size: u64,
    /// The layer blob's `sha256:<hex>`.
    digest: String,
    /// Whose credentials its reads use.
    scope: Scope,
    /// Prefetching or recording its start (`crate::start`).
    start: Option<tokio::task::AbortHandle>,
}

/// Mounts and unmounts lazy layers: [`RemoteLayers`] in this process, or the FUSE manager
/// process that serves them (`crate::fusemanager`).
#[tonic::async_trait]
pub trait Mounter: Send + Sync {
    /// Mounts `layer` at `<dir>/fs` (at once if it is already mounted under `id`); its size.
    async fn mount(&self, id: u64, dir: &Path, layer: &RemoteRef) -> Result<u64>;
    async fn unmount(&self, id: u64, dir: &Path);
}

#[tonic::async_trait]
impl Mounter for RemoteLayers {
    async fn mount(&self, id: u64, dir: &Path, layer: &RemoteRef) -> Result<u64> {
        RemoteLayers::mount(self, id, dir, layer).await
    }

    async fn unmount(&self, id: u64, dir: &Path) {
        let (this_id, dir) = (id, dir.to_path_buf());
        // Unmounting waits for the FUSE threads: not on the runtime's.
        tokio::task::block_in_place(|| RemoteLayers::unmount(self, this_id, &dir));
    }
}

/// Where a remote layer keeps its inflated chunks, next to its mount point.
const CHUNKS_FILE: &str = "chunks";

impl RemoteLayers {
    /// Metrics of the FUSE reads it serves.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn new(
        agent_socket: PathBuf,
        background_fetch: bool,
        cache_bytes: usize,
        passthrough: bool,
        start: StartOptions,
        registry: Arc<Registry>,
        metrics: Metrics,
    ) -> Self {
        Self {
            agent_socket,
            background_fetch,
            passthrough,
            start,
            clocks: Mutex::new(HashMap::new()),
            chunks: Arc::new(ChunkCache::new(cache_bytes)),
            agent: tokio::sync::OnceCell::new(),
            registry,
            metrics,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Sets `damselfly_snapshotter_layer_fetched_ratio` of every mounted layer from what the
    /// agent holds of its blob (a layer the agent has not opened yet: 0); unmounted layers drop out.
    pub async fn update_fetched(&self) {
        let digests: std::collections::BTreeSet<String> = self
            .sessions
            .lock()
            .map(|m| m.values().map(|l| l.digest.clone()).collect())
            .unwrap_or_default();
        let held = match self.agent().await {
            Ok(mut c) => match c.tasks(proto::agent::TasksRequest {}).await {
                Ok(r) => r.into_inner().tasks,
                Err(s) => {
                    tracing::debug!(error = %s.message(), "agent tasks unavailable");
                    return;
                }
            },
            Err(_) => return,
        };
        let gauge = &self.metrics.layer_fetched;
        gauge.reset();
        for d in digests {
            let task = fetcher::task_id::content_task_id(&d).ok();
            let share = held
                .iter()
                .filter(|t| Some(&t.task_id) == task.as_ref() && t.content_length > 0)
                .map(|t| t.bytes_held as f64 / t.content_length as f64)
                .fold(0.0, f64::max);
            gauge.with_label_values(&[&d]).set(share.min(1.0));
        }
    }

    async fn agent(&self) -> Result<AgentClient<Channel>> {
        self.agent
            .get_or_try_init(|| async {
                fetcher::agent::connect(&self.agent_socket)
                    .await
                    .map_err(|e| Error::Agent(e.to_string()))
            })
            .await
            .cloned()
    }

    /// Mounts the layer at `<dir>/fs`, fetching its index first unless `<dir>` keeps one.
    /// Returns the layer's uncompressed size.
    #[tracing::instrument(skip_all, fields(layer = %layer.digest, id))]
    pub async fn mount(&self, id: u64, dir: &Path, layer: &RemoteRef) -> Result<u64> {
        if let Some(size) = self
            .sessions
            .lock()
            .ok()
            .and_then(|m| m.get(&id).map(|s| s.size))
        {
            return Ok(size);
        }
        let image = Reference::parse(&layer.image)?;
        let url = self.registry.blob_url(&image, &layer.digest)?;
        let index_path = dir.join(INDEX_FILE);
        let fresh = !index_path.exists();
        let index = match read_index(&index_path) {
            Some(i) => Arc::new(i),
            None => {
                let started = std::time::Instant::now();
                let headers = self
                    .registry
                    .auth_headers(&image.registry, &image.repository)
                    .await?;
                let bytes = self.fetch_index(&url, headers, &layer.digest).await?;
                let index = LayerIndex::from_bytes(&bytes).map_err(|e| {
                    Error::Agent(format!("layer index of {} is corrupt: {e}", layer.digest))
                })?;
                write_atomic(&index_path, &bytes)?;
                tracing::info!(
                    bytes = bytes.len(),
                    entries = index.toc.entries.len(),
                    ms = started.elapsed().as_millis() as u64,
                    "layer index fetched"
                );
                Arc::new(index)
            }
        };
        let size = index.toc.entries.iter().map(|e| e.size).sum();
        let client = self.agent().await?;
        if self.background_fetch {
            self.start_background_fetch(client.clone(), &url, &image, &layer.digest);
        }
        let blob = AgentBlob {
            handle: tokio::runtime::Handle::current(),
            client: client.clone(),
            url: url.clone(),
            headers: Arc::new(RegistryCredentials {
                handle: tokio::runtime::Handle::current(),
                registry: self.registry.clone(),
                image: image.clone(),
                made: self.metrics.read_credentials.clone(),
            }),
            digest: layer.digest.clone(),
            only_range: !self.background_fetch,
        };
        // A remount (after a restart) is no start: only fresh mounts record or prefetch one.
        let (record, start) = if fresh {
            crate::start::begin(crate::start::Layer {
                client: client.clone(),
                registry: self.registry.clone(),
                image: image.clone(),
                url: url.clone(),
                digest: layer.digest.clone(),
                index: index.clone(),
                metrics: self.metrics.clone(),
                options: self.start,
                clock: self.clock(&layer.image),
                only_range: !self.background_fetch,
            })
            .await
        } else {
            (None, None)
        };
        // Per layer: big files read at native speed, or small ones opened without round trips.
        let passthrough = self.passthrough && crate::layerfs::passthrough::worth_it(&index.toc);
        let fs = LayerFs::new(
            layer.digest.clone(),
            index,
            Arc::new(blob),
            self.metrics.clone(),
        )
        .with_passthrough(passthrough)
        .with_start_record(record)
        .with_cache(self.chunks.clone(), Some(&dir.join(CHUNKS_FILE)))
        .map_err(|e| Error::io("cannot create the chunk cache in", dir, e))?;
        let mountpoint = dir.join("fs");
        let session = tokio::task::spawn_blocking(move || {
            detach_stale(&mountpoint);
            std::fs::create_dir_all(&mountpoint)?;
            crate::layerfs::mount(fs, &mountpoint)
        })
        .await
        .map_err(|e| Error::FailedPrecondition(format!("mount task failed: {e}")))?
        .map_err(|e| Error::io("cannot mount FUSE layer at", dir.join("fs"), e))?;
        if let Ok(mut m) = self.sessions.lock() {
            m.insert(
                id,
                Mounted {
                    session,
                    mountpoint: dir.join("fs"),
                    size,
                    digest: layer.digest.clone(),
                    scope: Scope::new(&image.registry, &image.repository),
                    start,
                },
            );
        }
        tracing::info!("remote layer mounted");
        Ok(size)
    }

    /// Has the agent start fetching the whole layer now (a one-byte read in background mode); FUSE
    /// reads that come meanwhile are served first.
    fn start_background_fetch(
        &self,
        mut client: AgentClient<Channel>,
        url: &str,
        image: &Reference,
        digest: &str,
    ) {
        let (registry, image, url, digest) = (
            self.registry.clone(),
            image.clone(),
            url.to_owned(),
            digest.to_owned(),
        );
        tokio::spawn(async move {
            let headers = registry
                .auth_headers(&image.registry, &image.repository)
                .await
                .unwrap_or_default();
            let req = proto::agent::ReadRangeRequest {
                url,
                headers: headers
                    .into_iter()
                    .map(|(name, value)| proto::agent::Header { name, value })
                    .collect(),
                digest: digest.clone(),
                offset: 0,
                length: 1,
                only_range: false,
            };
            if let Err(s) = client.read_range(req).await {
                tracing::warn!(layer = %digest, error = %s.message(), "background fetch did not start");
            }
        });
    }

    async fn fetch_index(
        &self,
        url: &str,
        headers: Vec<(String, String)>,
        digest: &str,
    ) -> Result<Vec<u8>> {
        let mut client = self.agent().await?;
        let req = proto::agent::LayerIndexRequest {
            url: url.to_owned(),
            headers: headers
                .into_iter()
                .map(|(name, value)| proto::agent::Header { name, value })
                .collect(),
            digest: digest.to_owned(),
        };
        let err =
            |s: tonic::Status| Error::Agent(format!("layer index of {digest}: {}", s.message()));
        let mut stream = client.layer_index(req).await.map_err(err)?.into_inner();
        let mut bytes = Vec::new();
        while let Some(c) = stream.message().await.map_err(err)? {
            if bytes.len() + c.data.len() > fetcher::layer_index::MAX_INDEX {
                return Err(Error::Agent(format!(
                    "layer index of {digest} is too large"
                )));
            }
            bytes.extend_from_slice(&c.data);
        }
        Ok(bytes)
    }

    /// The start clock of `image` on this host (one while any of its layers records its start).
    fn clock(&self, image: &str) -> Arc<StartClock> {
        let Ok(mut m) = self.clocks.lock() else {
            return Arc::default();
        };
        if let Some(c) = m.get(image).and_then(std::sync::Weak::upgrade) {
            return c;
        }
        m.retain(|_, w| w.strong_count() > 0);
        let c = Arc::new(StartClock::default());
        m.insert(image.to_owned(), Arc::downgrade(&c));
        c
    }

    /// Whether a mounted layer reads with `scope`'s credentials.
    pub fn scope_in_use(&self, scope: &Scope) -> bool {
        self.sessions
            .lock()
            .is_ok_and(|all| all.values().any(|m| &m.scope == scope))
    }

    /// Unmounts the layer of snapshot `id` (before its directory is removed); once no mounted layer reads with its scope's credentials (the image
    /// was removed), they are forgotten.
    pub fn unmount(&self, id: u64, dir: &Path) {
        let Some((m, last)) = self.sessions.lock().ok().and_then(|mut all| {
            let m = all.remove(&id)?;
            let last = !all.values().any(|o| o.scope == m.scope);
            Some((m, last))
        }) else {
            detach_stale(&dir.join("fs"));
            return;
        };
        if last && self.registry.forget(&m.scope) {
            tracing::info!(scope = %m.scope, "no layer of the scope is mounted: credentials forgotten");
        }
        unmount_session(m);
    }

    /// Unmounts everything (shutdown): a FUSE mount whose daemon is gone only answers ENOTCONN.
    pub fn unmount_all(&self) {
        let all: Vec<_> = self
            .sessions
            .lock()
            .map(|mut m| m.drain().map(|(_, s)| s).collect::<Vec<_>>())
            .unwrap_or_default();
        for m in all {
            unmount_session(m);
        }
    }
}

/// Unmounts a layer and waits for its FUSE threads; still busy (an overlay on it): detached.
/// Its start is no longer recorded or prefetched.
fn unmount_session(m: Mounted) {
    if let Some(t) = m.start {
        t.abort();
    }
    if let Err(e) = crate::layerfs::unmount(m.session) {
        tracing::warn!(path = %m.mountpoint.display(), error = %e, "cannot unmount: detaching");
        detach_stale(&m.mountpoint);
    }
}

/// A kept index, if it is there and sound.
fn read_index(path: &Path) -> Option<LayerIndex> {
    let bytes = std::fs::read(path).ok()?;
    match LayerIndex::from_bytes(&bytes) {
        Ok(i) => Some(i),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "kept layer index is corrupt: fetching it again");
            None
        }
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| Error::io("cannot write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io("cannot replace", path, e))
}

/// Lazily unmounts whatever is mounted at `path` (a FUSE mount left by a killed process answers
/// every access with ENOTCONN). Nothing mounted: nothing to do.
fn detach_stale(path: &Path) {
    match rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH) {
        Ok(()) => tracing::info!(path = %path.display(), "detached a stale mount"),
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOENT) => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot detach"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_corrupt_kept_index_is_not_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(INDEX_FILE);
        assert!(read_index(&path).is_none(), "absent");
        let tar = {
            let mut b = tar::Builder::new(Vec::new());
            let mut h = tar::Header::new_gnu();
            h.set_size(3);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            b.append_data(&mut h, "f", b"abc".as_slice())
                .expect("append");
            b.into_inner().expect("tar")
        };
        let bytes = LayerIndex::build_tar(tar.as_slice())
            .and_then(|i| i.to_bytes())
            .expect("index");
        write_atomic(&path, &bytes).expect("write");
        assert!(read_index(&path).is_some(), "sound");
        let mut bad = bytes.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0xff;
        bad.truncate(bad.len() - 3);
        write_atomic(&path, &bad).expect("write");
        assert!(
            read_index(&path).is_none(),
            "corrupt: fetched again instead"
        );
    }

    #[test]
    fn remote_layers_need_all_three_labels() {
        let d = format!("sha256:{}", "a".repeat(64));
        let full = BTreeMap::from([
            (LABEL_TARGET.to_owned(), "sha256:chain".to_owned()),
            (LABEL_LAYER_DIGEST.to_owned(), d.clone()),
            (LABEL_IMAGE_REF.to_owned(), "reg:5000/app:v1".to_owned()),
        ]);
        assert_eq!(
            wanted(&full),
            Some(RemoteRef {
                digest: d,
                image: "reg:5000/app:v1".into()
            })
        );
        for missing in [LABEL_TARGET, LABEL_LAYER_DIGEST, LABEL_IMAGE_REF] {
            let mut l = full.clone();
            l.remove(missing);
            assert_eq!(wanted(&l), None, "without {missing}");
        }
        let mut l = full;
        l.insert(LABEL_LAYER_DIGEST.to_owned(), "md5:x".into());
        assert_eq!(wanted(&l), None, "bad digest");
    }
}
