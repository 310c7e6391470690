//! `dfsnapshotter`: flags, and running the service until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

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
#[command(name = "dfsnapshotter", version)]
pub struct Args {
    /// Where snapshots and their metadata live.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/damselfly/snapshotter"
    )]
    pub root: PathBuf,
    /// The gRPC socket containerd connects to.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Prometheus metrics (`/metrics`) and health (`/healthz`).
    #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:65004")]
    pub metrics_addr: std::net::SocketAddr,
    /// Log lines as JSON.
    #[arg(long)]
    pub log_json: bool,
}

/// Runs until SIGINT/SIGTERM; returns the exit code.
pub async fn run(args: Args) -> i32 {
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

async fn run_inner(args: &Args) -> crate::Result<()> {
    let snapshots = Arc::new(Snapshots::open(&args.root)?);
    let shutdown = fetcher::Shutdown::new();
    shutdown.on_signals();
    let server = crate::service::serve(&args.socket, snapshots, shutdown.clone()).await?;
    let metrics = crate::metrics::Metrics::new();
    let router = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || std::future::ready(metrics.render())),
        )
        .route("/healthz", axum::routing::get(|| std::future::ready("ok")));
    fetcher::upload::serve(args.metrics_addr, router, shutdown.clone())
        .await
        .map_err(|e| {
            crate::Error::io("cannot bind metrics on", args.metrics_addr.to_string(), e)
        })?;
    tracing::info!(socket = %args.socket.display(), root = %args.root.display(), "dfsnapshotter ready");
    shutdown.wait().await;
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    tracing::info!("dfsnapshotter stopped");
    Ok(())
}
