//! The peer engine: one per process (dfget's embedded peer) or per host (dfdaemon). It owns the piece
//! store, the upload server, the host-wide rate limits and the HTTP clients, and runs downloads.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::metrics::PeerMetrics;
use crate::piece_store::{Store, TaskStore};
use crate::rate::RateLimiter;
use crate::shutdown::Shutdown;
use crate::source::HttpSource;
use crate::ticket::PublicKey;
use crate::upload::{self, PieceBody, PieceSource};

/// How a peer runs. Every field has a documented default in the config files of dfget/dfdaemon.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// Supernode scheduler addresses (`host:port`).
    pub supernodes: Vec<String>,
    /// Piece store directory.
    pub data_dir: PathBuf,
    /// Where the upload server listens; `None`: an ephemeral port on the address reaching the supernode.
    pub upload_addr: Option<SocketAddr>,
    /// The IP other peers use to reach the upload server (default: the one reaching the supernode).
    pub advertise_ip: Option<IpAddr>,
    /// Host-wide upload cap, bytes/s (0: none).
    pub upload_rate: u64,
    /// Host-wide download cap, bytes/s (0: none).
    pub download_rate: u64,
    /// Concurrent piece uploads before answering 503.
    pub max_upload_concurrency: usize,
    /// Extra CA certificates for HTTPS origins (back-to-source).
    pub upstream_ca: Option<PathBuf>,
    /// Keep serving a task's pieces after it finished (agents), until shutdown.
    pub keep_seeding: bool,
    /// Cluster TLS towards the supernodes (`None`: plaintext gRPC).
    pub tls: Option<crate::tls::ClusterTls>,
    /// Where this host sits (sent when registering; the supernode prefers parents nearby).
    pub location: crate::location::Location,
}

impl Default for PeerConfig {
    fn default() -> Self {
        Self {
            supernodes: Vec::new(),
            data_dir: PathBuf::from("/var/lib/damselfly"),
            upload_addr: None,
            advertise_ip: None,
            upload_rate: 0,
            download_rate: 0,
            max_upload_concurrency: 16,
            upstream_ca: None,
            keep_seeding: false,
            tls: None,
            location: Default::default(),
        }
    }
}

/// Tasks open in this process, by version id: what the upload server serves, and the ticket keys
/// of the supernodes that scheduled each (only their tickets open its pieces).
#[derive(Default)]
pub(crate) struct OpenTasks {
    tasks: Mutex<HashMap<String, Arc<TaskStore>>>,
    busy: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    keys: Mutex<HashMap<String, Vec<PublicKey>>>,
}

impl OpenTasks {
    pub(crate) fn get(&self, version: &str) -> Option<Arc<TaskStore>> {
        self.tasks.lock().ok().and_then(|t| t.get(version).cloned())
    }
    pub(crate) fn all(&self) -> Vec<Arc<TaskStore>> {
        self.tasks
            .lock()
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default()
    }
    pub(crate) fn insert(&self, store: Arc<TaskStore>) {
        if let Ok(mut t) = self.tasks.lock() {
            t.insert(store.meta().version_id, store);
        }
    }
    pub(crate) fn remove(&self, version: &str) {
        if let Ok(mut t) = self.tasks.lock() {
            t.remove(version);
        }
        if let Ok(mut k) = self.keys.lock() {
            k.remove(version);
        }
    }
    /// Accepts tickets signed by `key` for `version` (the supernode scheduling it told us its key).
    pub(crate) fn trust(&self, version: &str, key: PublicKey) {
        if let Ok(mut k) = self.keys.lock() {
            let keys = k.entry(version.to_owned()).or_default();
            if !keys.contains(&key) {
                // A handful of supernodes at most (failover); never grows without bound.
                if keys.len() >= 8 {
                    keys.remove(0);
                }
                keys.push(key);
            }
        }
    }
    /// The in-process lock of a version: one download of a version at a time per process.
    pub(crate) fn busy_lock(&self, version: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut b = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        b.entry(version.to_owned()).or_default().clone()
    }
}

impl PieceSource for OpenTasks {
    fn open_piece(&self, version_id: &str, num: u32) -> Result<Option<PieceBody>> {
        Ok(self
            .get(version_id)
            .and_then(|t| t.piece_reader(num))
            .map(PieceBody::from_store))
    }

    fn ticket_keys(&self, version_id: &str) -> Vec<PublicKey> {
        self.keys
            .lock()
            .ok()
            .and_then(|k| k.get(version_id).cloned())
            .unwrap_or_default()
    }
}

/// The peer engine. Cheap to clone.
#[derive(Clone)]
pub struct Peer {
    pub(crate) inner: Arc<PeerInner>,
}

pub(crate) struct PeerInner {
    pub(crate) cfg: PeerConfig,
    pub(crate) host_id: String,
    pub(crate) store: Store,
    pub(crate) open: Arc<OpenTasks>,
    pub(crate) download_limit: RateLimiter,
    pub(crate) http: reqwest::Client,
    pub(crate) source: HttpSource,
    pub(crate) metrics: PeerMetrics,
    pub(crate) upload_addr: SocketAddr,
    pub(crate) shutdown: Shutdown,
    /// Blobs fetched for range reads (`Peer::read_range`).
    pub(crate) ranges: crate::range_read::BlobFetches,
    /// The connections to supernodes, shared by all sessions.
    pub(crate) channels: crate::download::channels::Channels,
    upload_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Peer {
    /// Opens the store and starts the upload server.
    pub async fn start(cfg: PeerConfig, metrics: PeerMetrics, shutdown: Shutdown) -> Result<Peer> {
        Self::start_with(cfg, metrics, shutdown, |s| s).await
    }

    /// Like [`Peer::start`], with the upload server's piece source wrapped by `wrap` (fault injection
    /// in tests).
    pub async fn start_with(
        cfg: PeerConfig,
        metrics: PeerMetrics,
        shutdown: Shutdown,
        wrap: impl FnOnce(Arc<dyn PieceSource>) -> Arc<dyn PieceSource>,
    ) -> Result<Peer> {
        let store = Store::open(&cfg.data_dir)?;
        let open = Arc::new(OpenTasks::default());
        let reach_ip = cfg
            .advertise_ip
            .or_else(|| cfg.supernodes.first().and_then(|s| local_ip_towards(s)));
        let bind = cfg
            .upload_addr
            .unwrap_or_else(|| SocketAddr::new(reach_ip.unwrap_or(Ipv4Addr::LOCALHOST.into()), 0));
        let upload_cfg = upload::upload_config(
            RateLimiter::new(cfg.upload_rate),
            cfg.max_upload_concurrency,
            &metrics,
        );
        let router = upload::router(wrap(open.clone()), upload_cfg);
        let piece_tls = cfg.tls.as_ref().map(|t| t.piece_server());
        let (bound, upload_task) = upload::serve(bind, router, piece_tls, shutdown.clone())
            .await
            .map_err(|e| Error::io("cannot bind upload server on", bind.to_string(), e))?;
        let advertised_ip = if bound.ip().is_unspecified() {
            reach_ip.unwrap_or(Ipv4Addr::LOCALHOST.into())
        } else {
            bound.ip()
        };
        let upload_addr = SocketAddr::new(advertised_ip, bound.port());
        let host_id = {
            let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
            let h = Sha256::new()
                .chain_update(host.trim())
                .chain_update(store.root().to_string_lossy().as_bytes())
                .finalize();
            hex::encode(&h[..8])
        };
        let mut http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(Duration::from_secs(30))
            .no_proxy();
        if let Some(t) = &cfg.tls {
            http = http.use_preconfigured_tls(t.piece_client());
        }
        let http = http.build().map_err(|e| Error::invalid("HTTP client", e))?;
        // Origins may be cluster members (a supernode's index API): its CA is trusted beside the
        // system's and `upstream_ca`.
        let cas: Vec<&Path> = cfg
            .upstream_ca
            .iter()
            .map(|p| p.as_path())
            .chain(cfg.tls.as_ref().map(|t| t.ca_path()))
            .collect();
        let source = HttpSource::new(&cas)?;
        tracing::info!(%upload_addr, host_id, store = %store.root().display(), "peer started");
        Ok(Peer {
            inner: Arc::new(PeerInner {
                download_limit: RateLimiter::new(cfg.download_rate),
                cfg,
                host_id,
                store,
                open,
                http,
                source,
                metrics,
                upload_addr,
                shutdown,
                ranges: Default::default(),
                channels: Default::default(),
                upload_task: Mutex::new(Some(upload_task)),
            }),
        })
    }

    /// Stops the peer: no new uploads are accepted, and uploads in flight get up to `grace` to finish
    /// (parents that vanish mid-piece cost their children a retry).
    pub async fn close(&self, grace: Duration) {
        self.inner.shutdown.trigger();
        let task = self
            .inner
            .upload_task
            .lock()
            .ok()
            .and_then(|mut t| t.take());
        if let Some(t) = task {
            let _ = tokio::time::timeout(grace, t).await;
        }
    }

    /// Cluster TLS towards the supernodes, if configured.
    pub fn tls(&self) -> Option<&crate::tls::ClusterTls> {
        self.inner.cfg.tls.as_ref()
    }

    /// The supernode scheduler addresses this peer was configured with.
    pub fn supernodes(&self) -> &[String] {
        &self.inner.cfg.supernodes
    }

    /// The advertised address of the upload server.
    pub fn upload_addr(&self) -> SocketAddr {
        self.inner.upload_addr
    }

    /// The peer's metrics.
    pub fn metrics(&self) -> &PeerMetrics {
        &self.inner.metrics
    }

    /// The piece store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The host id (per store): the unit the supernode isolates on faults.
    pub fn host_id(&self) -> &str {
        &self.inner.host_id
    }
}

/// The local IP the kernel would use to reach `addr` (`host:port`); no packet is sent.
fn local_ip_towards(addr: &str) -> Option<IpAddr> {
    use std::net::ToSocketAddrs;
    let target = addr.to_socket_addrs().ok()?.next()?;
    let bind: SocketAddr = if target.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        "[::]:0".parse().ok()?
    };
    let sock = std::net::UdpSocket::bind(bind).ok()?;
    sock.connect(target).ok()?;
    sock.local_addr().ok().map(|a| a.ip())
}
