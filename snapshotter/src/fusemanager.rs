//! The FUSE manager: a process of its own (`dfsnapshotter fuse-manager`, started by dfsnapshotter
//! when none runs) that mounts and serves the lazy layers, so that restarting, upgrading or a
//! kill -9 of dfsnapshotter leaves running containers' layers mounted and served. dfsnapshotter
//! asks it over `<root>/fusemanager.sock` ([`ManagerClient`], a [`Mounter`]); a restarted
//! dfsnapshotter finds the layers still mounted. It also holds the registry credentials handed
//! over per image scope (`dfsnapshotter pull`, the CRI proxy), in memory only, so they outlive
//! dfsnapshotter's restarts too; the socket is root's alone. The manager stops on
//! SIGTERM/SIGINT (unmounting its layers) or when the snapshotter's root is gone.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use proto::fusemanager::fuse_manager_client::FuseManagerClient;
use proto::fusemanager::fuse_manager_server::{FuseManager, FuseManagerServer};
use proto::fusemanager::{
    BasicAuth, CredentialHelper, MetricsReply, MetricsRequest, MountReply, MountRequest,
    PutCredentialsReply, PutCredentialsRequest, SettleCredentialsReply, SettleCredentialsRequest,
    UnmountReply, UnmountRequest, put_credentials_request,
};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::credentials::{Keyring, Scope, Secret, Settled};
use crate::error::{Error, Result};
use crate::metastore::RemoteRef;
use crate::registry::{Registry, RegistryConfig};
use crate::remote::{Mounter, RemoteLayers};

/// The manager's socket under the snapshotter's root.
pub fn socket_path(root: &Path) -> PathBuf {
    root.join("fusemanager.sock")
}

/// How the manager serves layers (dfsnapshotter passes its own settings).
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    pub root: PathBuf,
    pub agent_socket: PathBuf,
    pub background_fetch: bool,
    pub cache_mib: usize,
    /// FUSE passthrough for files whose bytes are all local.
    pub passthrough: bool,
    /// Start sets: recorded on the first start, prefetched at later mounts.
    pub start: crate::start::StartOptions,
    pub registry: RegistryConfig,
}

struct Service {
    layers: Arc<RemoteLayers>,
    keyring: Arc<Keyring>,
}

#[tonic::async_trait]
impl FuseManager for Service {
    #[tracing::instrument(skip_all, fields(id = request.get_ref().id, layer = %request.get_ref().digest))]
    async fn mount(&self, request: Request<MountRequest>) -> Result<Response<MountReply>, Status> {
        let r = request.into_inner();
        let layer = RemoteRef {
            digest: r.digest,
            image: r.image,
        };
        let size = self
            .layers
            .mount(r.id, Path::new(&r.dir), &layer)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(MountReply { size }))
    }

    async fn unmount(
        &self,
        request: Request<UnmountRequest>,
    ) -> Result<Response<UnmountReply>, Status> {
        let r = request.into_inner();
        let layers = self.layers.clone();
        tokio::task::spawn_blocking(move || layers.unmount(r.id, Path::new(&r.dir)))
            .await
            .map_err(|e| Status::internal(format!("unmount task failed: {e}")))?;
        Ok(Response::new(UnmountReply {}))
    }

    async fn put_credentials(
        &self,
        request: Request<PutCredentialsRequest>,
    ) -> Result<Response<PutCredentialsReply>, Status> {
        let r = request.into_inner();
        let secret = match r.secret {
            Some(put_credentials_request::Secret::Basic(b)) if !b.user.is_empty() => {
                Secret::Basic {
                    user: b.user,
                    password: b.password,
                }
            }
            Some(put_credentials_request::Secret::Helper(h))
                if crate::credentials::helper::valid_name(&h.name) =>
            {
                Secret::Helper {
                    helper: h.name,
                    server: h.server,
                }
            }
            _ => {
                return Err(Status::invalid_argument(
                    "credentials need a user, or a valid credential helper name",
                ));
            }
        };
        if r.registry.is_empty() || r.repository.is_empty() {
            return Err(Status::invalid_argument(
                "credentials need a registry and a repository",
            ));
        }
        let scope = Scope::new(&r.registry, &r.repository);
        tracing::info!(%scope, kind = secret.kind(), "credentials kept for a scope");
        let generation = self.keyring.put(scope, secret);
        Ok(Response::new(PutCredentialsReply { generation }))
    }

    async fn settle_credentials(
        &self,
        request: Request<SettleCredentialsRequest>,
    ) -> Result<Response<SettleCredentialsReply>, Status> {
        let r = request.into_inner();
        let scope = Scope::new(&r.registry, &r.repository);
        let in_use = self.layers.scope_in_use(&scope);
        let outcome = self.keyring.settle(&scope, r.generation, r.pulled, in_use);
        if outcome != Settled::Kept {
            tracing::info!(%scope, pulled = r.pulled, outcome = outcome.as_str(), "credentials settled");
        }
        Ok(Response::new(SettleCredentialsReply {
            outcome: outcome.as_str().to_owned(),
        }))
    }

    async fn metrics(
        &self,
        _request: Request<MetricsRequest>,
    ) -> Result<Response<MetricsReply>, Status> {
        self.layers.update_fetched().await;
        let m = self.layers.metrics();
        m.credential_scopes
            .set(i64::try_from(self.keyring.len()).unwrap_or(i64::MAX));
        Ok(Response::new(MetricsReply { text: m.render() }))
    }
}

/// Runs the manager until SIGTERM/SIGINT or until `cfg.root` is removed.
pub async fn serve(cfg: ManagerConfig) -> Result<()> {
    let keyring = Arc::new(Keyring::default());
    let registry = Arc::new(Registry::new(cfg.registry.clone(), keyring.clone())?);
    let layers = Arc::new(RemoteLayers::new(
        cfg.agent_socket.clone(),
        cfg.background_fetch,
        cfg.cache_mib << 20,
        cfg.passthrough,
        cfg.start,
        registry,
        crate::metrics::Metrics::new(),
    ));
    fetcher::private::dir(&cfg.root).map_err(|e| Error::io("cannot create", &cfg.root, e))?;
    let path = socket_path(&cfg.root);
    let shutdown = fetcher::Shutdown::new();
    shutdown.on_signals();
    let (watch, root) = (shutdown.clone(), cfg.root.clone());
    tokio::spawn(async move {
        while !watch.is_triggered() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if !root.exists() {
                tracing::info!(root = %root.display(), "snapshotter root is gone: stopping");
                watch.trigger();
            }
        }
    });
    let router = tonic::transport::Server::builder().add_service(FuseManagerServer::new(Service {
        layers: layers.clone(),
        keyring,
    }));
    let served = fetcher::uds::serve(&path, router, shutdown, "fuse manager")
        .map_err(|(what, e)| Error::io(what, &path, e))?;
    tracing::info!(socket = %path.display(), "fuse manager ready");
    let r = served.await;
    tokio::task::spawn_blocking(move || layers.unmount_all())
        .await
        .map_err(|e| Error::FailedPrecondition(format!("unmount task failed: {e}")))?;
    tracing::info!("fuse manager stopped");
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::FailedPrecondition(format!("fuse manager API: {e}"))),
        Err(e) => Err(Error::FailedPrecondition(format!(
            "fuse manager API task: {e}"
        ))),
    }
}

/// dfsnapshotter's side: mounts through the manager.
pub struct ManagerClient {
    client: FuseManagerClient<Channel>,
}

impl ManagerClient {
    /// Connects to the manager of `cfg.root`, starting one (`<this executable> fuse-manager`, in
    /// its own process group, logging to `<root>/fusemanager.log`) when none answers.
    pub async fn connect_or_start(cfg: &ManagerConfig) -> Result<Self> {
        let path = socket_path(&cfg.root);
        if let Ok(c) = fetcher::uds::channel(&path).await {
            tracing::info!(socket = %path.display(), "using the running fuse manager");
            return Ok(Self::new(c));
        }
        start(cfg)?;
        let started = std::time::Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if let Ok(c) = fetcher::uds::channel(&path).await {
                tracing::info!(socket = %path.display(), "fuse manager started");
                return Ok(Self::new(c));
            }
            if started.elapsed() > Duration::from_secs(15) {
                return Err(Error::FailedPrecondition(format!(
                    "the fuse manager did not start (see {})",
                    cfg.root.join("fusemanager.log").display()
                )));
            }
        }
    }

    fn new(channel: Channel) -> Self {
        Self {
            client: FuseManagerClient::new(channel),
        }
    }

    /// Connects to the running manager of `root` (no start: a pull needs the dfsnapshotter that
    /// containerd will ask to prepare the layers, which starts it).
    pub async fn connect(root: &Path) -> Result<Self> {
        let path = socket_path(root);
        fetcher::uds::channel(&path)
            .await
            .map(Self::new)
            .map_err(|e| {
                Error::FailedPrecondition(format!(
                    "no fuse manager answers at {} (is dfsnapshotter running with --root {}?): {}",
                    path.display(),
                    root.display(),
                    fetcher::source::error_chain(&e)
                ))
            })
    }

    /// Hands `secret` for `scope` to the manager, for that scope's lazy layers only; the
    /// handover's number, to [`ManagerClient::settle_credentials`] once the pull has ended.
    pub async fn put_credentials(&self, scope: &Scope, secret: &Secret) -> Result<u64> {
        let secret = match secret {
            Secret::Basic { user, password } => put_credentials_request::Secret::Basic(BasicAuth {
                user: user.clone(),
                password: password.clone(),
            }),
            Secret::Helper { helper, server } => {
                put_credentials_request::Secret::Helper(CredentialHelper {
                    name: helper.clone(),
                    server: server.clone(),
                })
            }
        };
        let mut c = self.client.clone();
        let r = c
            .put_credentials(PutCredentialsRequest {
                registry: scope.registry.clone(),
                repository: scope.repository.clone(),
                secret: Some(secret),
            })
            .await
            .map_err(|s| Error::FailedPrecondition(format!("fuse manager: {}", s.message())))?;
        Ok(r.into_inner().generation)
    }

    /// Settles handover `generation` of `scope` now that its pull has ended (`pulled`: it
    /// succeeded); what became of it ([`Settled`]'s words).
    pub async fn settle_credentials(
        &self,
        scope: &Scope,
        generation: u64,
        pulled: bool,
    ) -> Result<String> {
        let mut c = self.client.clone();
        let r = c
            .settle_credentials(SettleCredentialsRequest {
                registry: scope.registry.clone(),
                repository: scope.repository.clone(),
                generation,
                pulled,
            })
            .await
            .map_err(|s| Error::FailedPrecondition(format!("fuse manager: {}", s.message())))?;
        Ok(r.into_inner().outcome)
    }

    /// The manager's metrics text (empty if it does not answer).
    pub async fn metrics(&self) -> String {
        let mut c = self.client.clone();
        match c.metrics(MetricsRequest {}).await {
            Ok(r) => r.into_inner().text,
            Err(_) => String::new(),
        }
    }
}

/// Starts `dfsnapshotter fuse-manager` for `cfg`, detached from this process's group (so that a
/// signal to dfsnapshotter's group does not reach it).
fn start(cfg: &ManagerConfig) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(|e| Error::io("cannot find", "/proc/self/exe", e))?;
    let log_path = cfg.root.join("fusemanager.log");
    fetcher::private::dir(&cfg.root).map_err(|e| Error::io("cannot create", &cfg.root, e))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| Error::io("cannot open", &log_path, e))?;
    let log2 = log
        .try_clone()
        .map_err(|e| Error::io("cannot open", &log_path, e))?;
    let mut cmd = std::process::Command::new(exe);
    // Sockets dfsnapshotter inherited (socket activation) are its own, not the manager's.
    for var in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
        cmd.env_remove(var);
    }
    cmd.arg("fuse-manager")
        .arg("--root")
        .arg(&cfg.root)
        .arg("--agent-socket")
        .arg(&cfg.agent_socket)
        .arg("--background-fetch")
        .arg(cfg.background_fetch.to_string())
        .arg("--cache-mib")
        .arg(cfg.cache_mib.to_string())
        .arg("--fuse-passthrough")
        .arg(cfg.passthrough.to_string())
        .arg("--prefetch")
        .arg(cfg.start.prefetch.to_string())
        .arg("--start-window")
        .arg(format!("{}ms", cfg.start.window.as_millis()));
    for h in &cfg.registry.plain_http {
        cmd.arg("--plain-http").arg(h);
    }
    if let Some(d) = &cfg.registry.hosts_dir {
        cmd.arg("--hosts-dir").arg(d);
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0);
    let child = cmd
        .spawn()
        .map_err(|e| Error::io("cannot start the fuse manager", &log_path, e))?;
    tracing::info!(pid = child.id(), "fuse manager starting");
    Ok(())
}

#[tonic::async_trait]
impl Mounter for ManagerClient {
    async fn mount(&self, id: u64, dir: &Path, layer: &RemoteRef) -> Result<u64> {
        let mut c = self.client.clone();
        let r = c
            .mount(MountRequest {
                id,
                dir: dir.to_string_lossy().into_owned(),
                digest: layer.digest.clone(),
                image: layer.image.clone(),
            })
            .await
            .map_err(|s| Error::FailedPrecondition(format!("fuse manager: {}", s.message())))?;
        Ok(r.into_inner().size)
    }

    async fn unmount(&self, id: u64, dir: &Path) {
        let mut c = self.client.clone();
        if let Err(s) = c
            .unmount(UnmountRequest {
                id,
                dir: dir.to_string_lossy().into_owned(),
            })
            .await
        {
            tracing::warn!(id, error = %s.message(), "fuse manager did not unmount");
        }
    }
}
