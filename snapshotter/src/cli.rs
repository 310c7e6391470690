//! `dfsnapshotter`: flags, and running the service until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use crate::credentials::{Keyring, Scope, Secret};
use crate::snapshots::Snapshots;

/// Default socket, the one `packaging/containerd/config.toml` names.
pub const DEFAULT_SOCKET: &str = "/run/damselfly/snapshotter.sock";

/// Damselfly's containerd snapshotter (a containerd `proxy_plugins` snapshotter).
///
/// Register it in containerd's config.toml:
///   [proxy_plugins.damselfly]
///     type = "snapshot"
///     address = "/run/damselfly/snapshotter.sock"
/// then use it with `ctr --snapshotter damselfly` (or CRI's `snapshotter = "damselfly"`).
#[derive(Debug, Parser)]
#[command(
    name = "dfsnapshotter",
    version,
    after_help = "Every flag of the service also has a key in the TOML config file (--config); flags win.\nSee packaging/dfsnapshotter.toml for all keys and their defaults."
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// TOML config file (see packaging/dfsnapshotter.toml); flags given here win over it.
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// Where snapshots and their metadata live.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/damselfly/snapshotter",
        global = true
    )]
    pub root: PathBuf,
    /// The gRPC socket containerd connects to (`--address` as containerd and stargz name it).
    #[arg(long, visible_alias = "address", value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Prometheus metrics (`/metrics`) and health (`/healthz`).
    #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:65004")]
    pub metrics_addr: std::net::SocketAddr,
    /// Log lines as JSON.
    #[arg(long, global = true)]
    pub log_json: bool,
    /// Mount layers lazily (FUSE, read through the agent) when containerd's labels name the
    /// registry blob (CRI, `dfsnapshotter pull`); `false`: let containerd unpack every layer.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub lazy: bool,
    /// After mounting a layer lazily, fetch the rest of it in the background (reads go first);
    /// `false`: fetch only what reads ask for.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set, global = true)]
    pub background_fetch: bool,
    /// Memory for inflated chunks of lazy layers, shared by all of them (MiB); every chunk is also
    /// kept on disk next to its layer.
    #[arg(long, value_name = "MIB", default_value_t = 256, global = true)]
    pub cache_mib: usize,
    /// Hand files of lazy layers whose bytes are all local to the kernel (FUSE passthrough,
    /// Linux ≥ 6.9, root): their reads run at native speed. Each such file is copied once out of
    /// its layer's chunk file into an unnamed file, freed with the mount. Used only where the
    /// kernel allows it; `false`: every read goes through FUSE.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set, global = true)]
    pub fuse_passthrough: bool,
    /// Record what the first start of each lazy layer in the cluster reads (its reads within
    /// `--start-window` of its first read) at the supernode, and on later hosts fetch that at
    /// mount, before containers ask; `false`: neither.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set, global = true)]
    pub prefetch: bool,
    /// How long after a lazy layer's first read its reads count as its start (e.g. 10s, 500ms).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration, global = true)]
    pub start_window: std::time::Duration,
    /// The host agent's (dfdaemon's) socket, through which lazy layers are read.
    #[arg(long, value_name = "PATH", default_value = fetcher::cli::dfget::DEFAULT_AGENT_SOCKET, global = true)]
    pub agent_socket: PathBuf,
    /// Serve the CRI image service (`runtime.v1.ImageService`) here for kubelet's
    /// `--image-service-endpoint`: every call is forwarded to containerd's CRI, and each
    /// `PullImage`'s pull secret is kept for that image's lazy layers. Off unless given.
    #[arg(long, value_name = "PATH")]
    pub image_service_socket: Option<PathBuf>,
    /// containerd's socket, where the CRI image-service proxy forwards to.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub containerd_socket: PathBuf,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// How to reach registries (for indexes, manifests and tokens).
#[derive(Debug, clap::Args)]
pub struct RegistryArgs {
    /// A registry (`host:port` as image references name it) spoken to over plain HTTP; repeatable.
    #[arg(long, value_name = "HOST[:PORT]", global = true)]
    pub plain_http: Vec<String>,
    /// containerd's registry host configs, read as containerd reads them
    /// (`<DIR>/<host[:port]>/hosts.toml`: `server`, mirrors, `ca`, `client`, `skip_verify`), so a
    /// registry with a private CA is configured once for ctr, CRI and dfsnapshotter.
    #[arg(long, value_name = "DIR", default_value = fetcher::source::hosts::DEFAULT_DIR, global = true)]
    pub hosts_dir: PathBuf,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Make an image runnable with `ctr run --snapshotter damselfly` without downloading its
    /// layers: fetch manifest and config, store them in containerd, and have containerd prepare
    /// every layer through this snapshotter (which must be running), which mounts it lazily.
    Pull(PullArgs),
    /// Serve the lazy layers' FUSE mounts of `--root` (dfsnapshotter starts this process when
    /// none runs, so that its own restarts leave running containers' layers served; a systemd
    /// unit can run it instead).
    FuseManager,
}

#[derive(Debug, clap::Args)]
pub struct PullArgs {
    /// The image, e.g. registry.example.com:5000/team/app:v1.
    pub image: String,
    /// containerd's socket.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub containerd: PathBuf,
    /// containerd namespace (`default` for ctr, `k8s.io` for Kubernetes).
    #[arg(long, short = 'n', default_value = "default")]
    pub namespace: String,
    /// This snapshotter's name in containerd's config (`proxy_plugins.<name>`).
    #[arg(long, default_value = "damselfly")]
    pub snapshotter: String,
    /// Registry user, with the password from --password-stdin (else docker's config.json).
    /// `USER:PASSWORD` works too, but every local user sees argv: prefer --password-stdin.
    #[arg(long, short = 'u', value_name = "USER")]
    pub user: Option<String>,
    /// Read the password of --user from standard input (one line).
    #[arg(long, requires = "user")]
    pub password_stdin: bool,
    /// Without --user: docker's config.json to take the image's credentials from (`auths`,
    /// `credHelpers`, `credsStore`; helpers are run as `docker-credential-<name> get`)
    /// [default: $DOCKER_CONFIG/config.json, else ~/.docker/config.json].
    #[arg(long, value_name = "FILE")]
    pub docker_config: Option<PathBuf>,
    /// Platform to pick from a multi-platform image [default: this machine's, e.g. linux/amd64].
    #[arg(long, value_name = "OS/ARCH")]
    pub platform: Option<String>,
}

/// The image's credentials: --user (with --password-stdin, the password is the first line of
/// stdin, at most 4 KiB, never echoed, never in argv), else docker's config.json.
fn credentials(p: &PullArgs, registry: &str) -> crate::Result<Option<Secret>> {
    let Some(user) = &p.user else {
        let path = p
            .docker_config
            .clone()
            .or_else(crate::credentials::docker_config::default_path);
        return match path {
            Some(path) => crate::credentials::docker_config::read(&path, registry),
            None => Ok(None),
        };
    };
    if !p.password_stdin {
        if user.contains(':') {
            tracing::warn!(
                "--user USER:PASSWORD puts the password in argv, readable by every local user; use --password-stdin"
            );
        }
        return Secret::from_user_password(user).map(Some).map_err(|_| {
            crate::Error::Invalid(
                "--user: give USER:PASSWORD, or USER with --password-stdin".into(),
            )
        });
    }
    if user.contains(':') {
        return Err(crate::Error::Invalid(
            "--user: with --password-stdin give the user name only".into(),
        ));
    }
    use std::io::{BufRead, Read};
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .take(4096)
        .read_line(&mut line)
        .map_err(|e| crate::Error::Invalid(format!("--password-stdin: cannot read stdin: {e}")))?;
    let password = line.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        return Err(crate::Error::Invalid(
            "--password-stdin: no password on standard input".into(),
        ));
    }
    Ok(Some(Secret::Basic {
        user: user.clone(),
        password: password.to_owned(),
    }))
}

impl RegistryArgs {
    fn config(&self) -> crate::registry::RegistryConfig {
        crate::registry::RegistryConfig {
            plain_http: self.plain_http.clone(),
            hosts_dir: Some(self.hosts_dir.clone()),
        }
    }
}

/// Runs until SIGINT/SIGTERM; returns the exit code.
pub async fn run(args: Args) -> i32 {
    if !matches!(args.command, Some(Command::Pull(_))) {
        fetcher::cli::init_daemon_allocator();
    }
    if let Some(Command::Pull(p)) = &args.command {
        fetcher::cli::init_logging("warn", args.log_json);
        return pull(&args.registry, &args.root, p).await;
    }
    if let Some(Command::FuseManager) = &args.command {
        fetcher::cli::init_logging("info", args.log_json);
        return match crate::fusemanager::serve(manager_config(&args)).await {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!(error = %e, "fuse manager failed");
                eprintln!("dfsnapshotter fuse-manager: error: {e}");
                1
            }
        };
    }
    fetcher::cli::init_logging("info", args.log_json);
    match run_inner(&args).await {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %e, "dfsnapshotter failed");
            eprintln!("dfsnapshotter: error: {e}");
            1
        }
    }
}

async fn pull(registry: &RegistryArgs, root: &std::path::Path, p: &PullArgs) -> i32 {
    let started = std::time::Instant::now();
    let opts = crate::pull::PullOptions {
        image: p.image.clone(),
        containerd: p.containerd.clone(),
        namespace: p.namespace.clone(),
        snapshotter: p.snapshotter.clone(),
        platform: p
            .platform
            .clone()
            .unwrap_or_else(crate::pull::host_platform),
    };
    let result = async {
        let image = crate::registry::Reference::parse(&p.image)?;
        let scope = Scope::new(&image.registry, &image.repository);
        let keyring = Arc::new(Keyring::default());
        let mut handover = None;
        if let Some(secret) = credentials(p, &image.registry)? {
            // The lazy layers are read by the FUSE manager: it gets them for this scope only.
            // Without it the layers cannot be mounted lazily and are pulled normally.
            let handed = async {
                let manager = crate::fusemanager::ManagerClient::connect(root).await?;
                let generation = manager.put_credentials(&scope, &secret).await?;
                Ok::<_, crate::Error>((manager, generation))
            };
            match handed.await {
                Ok(h) => handover = Some(h),
                Err(e) => {
                    tracing::warn!(error = %e, "credentials not handed to the fuse manager: layers will be pulled normally");
                }
            }
            keyring.put(scope.clone(), secret);
        }
        let registry = crate::registry::Registry::new(registry.config(), keyring)?;
        let pulled = crate::pull::pull(&registry, &opts).await;
        if let Some((manager, generation)) = handover
            && let Err(e) = manager
                .settle_credentials(&scope, generation, pulled.is_ok())
                .await
        {
            tracing::warn!(error = %e, "cannot settle the credentials with the fuse manager");
        }
        pulled
    }
    .await;
    match result {
        Ok(s) => {
            let lazy = s.layers - s.unpacked.len();
            println!(
                "{}: {lazy} of {} layers ({:.1} MiB) mounted lazily, manifest {} ({:.2}s)",
                s.name,
                s.layers,
                s.layer_bytes as f64 / f64::from(1u32 << 20),
                s.manifest,
                started.elapsed().as_secs_f64()
            );
            if !s.unpacked.is_empty() {
                println!(
                    "{} layers could not be mounted lazily (see dfsnapshotter's log) and were pulled normally: {}",
                    s.unpacked.len(),
                    s.unpacked.join(", ")
                );
            }
            0
        }
        Err(e) => {
            eprintln!("dfsnapshotter pull {}: error: {e}", p.image);
            1
        }
    }
}

fn duration(s: &str) -> std::result::Result<std::time::Duration, String> {
    fetcher::cli::parse_duration(s).map_err(|e| e.to_string())
}

fn manager_config(args: &Args) -> crate::fusemanager::ManagerConfig {
    crate::fusemanager::ManagerConfig {
        root: args.root.clone(),
        agent_socket: args.agent_socket.clone(),
        background_fetch: args.background_fetch,
        cache_mib: args.cache_mib,
        passthrough: args.fuse_passthrough,
        start: crate::start::StartOptions {
            prefetch: args.prefetch,
            window: args.start_window,
        },
        registry: args.registry.config(),
    }
}

async fn run_inner(args: &Args) -> crate::Result<()> {
    let mut snapshots = Snapshots::open(&args.root)?;
    // Lazy layers are mounted and served by the FUSE manager; its metrics are the FUSE ones.
    let manager = if args.lazy {
        let m = Arc::new(
            crate::fusemanager::ManagerClient::connect_or_start(&manager_config(args)).await?,
        );
        snapshots = snapshots.with_remote(m.clone());
        Some(m)
    } else {
        None
    };
    let own_metrics = crate::metrics::Metrics::new();
    let snapshots = Arc::new(snapshots);
    let remounted = snapshots.remount().await;
    if remounted > 0 {
        tracing::info!(layers = remounted, "remote layers mounted again");
    }
    let shutdown = fetcher::Shutdown::new();
    shutdown.on_signals();
    let server = crate::service::serve(&args.socket, snapshots, shutdown.clone())?;
    let cri = match (&args.image_service_socket, &manager) {
        (Some(path), Some(m)) => {
            let proxy = crate::cri::ImageServiceProxy::new(&args.containerd_socket, m.clone());
            let task = crate::cri::serve(path, proxy, shutdown.clone())?;
            tracing::info!(socket = %path.display(), containerd = %args.containerd_socket.display(), "CRI image-service proxy ready");
            Some(task)
        }
        (Some(_), None) => {
            return Err(crate::Error::Invalid(
                "--image-service-socket needs lazy layers (--lazy true)".into(),
            ));
        }
        _ => None,
    };
    let router = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let (manager, own) = (manager.clone(), own_metrics.clone());
                async move {
                    match manager {
                        Some(m) => m.metrics().await,
                        None => own.render(),
                    }
                }
            }),
        )
        .route("/healthz", axum::routing::get(|| std::future::ready("ok")));
    fetcher::upload::serve(args.metrics_addr, router, None, shutdown.clone())
        .await
        .map_err(|e| {
            crate::Error::io("cannot bind metrics on", args.metrics_addr.to_string(), e)
        })?;
    tracing::info!(socket = %args.socket.display(), root = %args.root.display(), "dfsnapshotter ready");
    shutdown.wait().await;
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    if let Some(task) = cri {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    tracing::info!("dfsnapshotter stopped");
    Ok(())
}
