//! `dfdaemon`: the host agent. Runs the peer engine (piece store, upload server, host-wide limits),
//! the local API on `agent.sock`, metrics, and store GC; seeds what it downloaded until shutdown.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use clap::Parser;
use serde::Deserialize;

use super::{load_toml, parse_duration, split_list};
use crate::error::{Error, Result};
use crate::metrics::PeerMetrics;
use crate::peer::{Peer, PeerConfig};
use crate::rate::{parse_rate, parse_size};
use crate::shutdown::Shutdown;
use crate::{agent, upload};

/// The Damselfly host agent: peer engine, piece upload server and local download API.
#[derive(Debug, Parser)]
#[command(
    name = "dfdaemon",
    version,
    after_help = "Every flag also has a key in the TOML config file (--config); flags win.\nSee packaging/dfdaemon.toml for all keys and their defaults."
)]
pub struct Args {
    /// Config file (TOML).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Supernode scheduler addresses, comma-separated.
    #[arg(long, value_name = "H:P,H:P")]
    pub supernode: Option<String>,
    /// Registry proxy (mirror) address [default: 127.0.0.1:65001].
    #[arg(long, value_name = "IP:PORT")]
    pub proxy_addr: Option<SocketAddr>,
    /// Registry mirrored when a client does not name one with ?ns= (e.g. https://harbor.example.com).
    #[arg(long, value_name = "URL")]
    pub registry_mirror: Option<url::Url>,
    /// Proxy mode: intercept `CONNECT` to these hosts (comma-separated `host`, `host:port`,
    /// `*.domain`, `*`) with a certificate from the proxy CA and serve their blobs via P2P; other
    /// hosts are tunneled untouched [default: none].
    #[arg(long, value_name = "HOSTS")]
    pub hijack: Option<String>,
    /// Proxy CA certificate (PEM) for --hijack [default: <data-dir>/proxy-ca/ca.crt, created if absent].
    #[arg(long, value_name = "FILE", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// Proxy CA private key (PEM) [default: <data-dir>/proxy-ca/ca.key].
    #[arg(long, value_name = "FILE", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Do not verify registry certificates. Dangerous: for test registries only.
    #[arg(long)]
    pub insecure_upstream: bool,
    /// Piece upload server address [default: 0.0.0.0:65002].
    #[arg(long, value_name = "IP:PORT")]
    pub upload_addr: Option<SocketAddr>,
    /// Prometheus metrics address [default: 127.0.0.1:65003].
    #[arg(long, value_name = "IP:PORT")]
    pub metrics_addr: Option<SocketAddr>,
    /// Data directory (piece store) [default: /var/lib/damselfly].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Local API socket [default: /run/damselfly/agent.sock].
    #[arg(long, value_name = "PATH")]
    pub agent_socket: Option<PathBuf>,
    /// IP advertised to other peers [default: the IP that reaches the first supernode].
    #[arg(long)]
    pub advertise_ip: Option<IpAddr>,
    /// Host-wide upload cap (e.g. 40MiB, 100Mbit) [default: none].
    #[arg(long, value_name = "RATE")]
    pub upload_rate: Option<String>,
    /// Where this host sits, outermost first (e.g. zone-a/rack-3): the supernode prefers parents in
    /// the same location [default: unknown].
    #[arg(long, value_name = "PATH")]
    pub location: Option<crate::location::Location>,
    /// Host-wide download cap shared by all downloads [default: none].
    #[arg(long, value_name = "RATE")]
    pub download_rate: Option<String>,
    /// Extra CA certificates (PEM) for HTTPS origins.
    #[arg(long, value_name = "FILE")]
    pub upstream_ca: Option<PathBuf>,
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    #[command(flatten)]
    pub policy: crate::source::policy::PolicyArgs,
    /// Log lines as JSON.
    #[arg(long)]
    pub log_json: bool,
}

/// `dfdaemon.toml`: every key optional, unknown keys rejected.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    pub supernodes: Vec<String>,
    pub upload_addr: SocketAddr,
    pub proxy_addr: SocketAddr,
    pub registry_mirror: Option<url::Url>,
    pub hijack: Vec<String>,
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    pub insecure_upstream: bool,
    pub metrics_addr: SocketAddr,
    pub data_dir: PathBuf,
    pub agent_socket: PathBuf,
    pub advertise_ip: Option<IpAddr>,
    pub location: crate::location::Location,
    pub upload_rate: String,
    pub download_rate: String,
    pub max_upload_concurrency: usize,
    pub upstream_ca: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub plaintext: bool,
    /// Which registries the proxy fetches from for this host's clients.
    pub origin_policy: crate::source::policy::PolicyConfig,
    pub gc: GcConfig,
}

/// `[gc]` section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcConfig {
    /// Remove tasks unused this long.
    pub max_age: String,
    /// Keep the store under this size.
    pub max_size: String,
    /// How often GC runs.
    pub interval: String,
}

impl Default for GcConfig {
    fn default() -> Self {
        Self {
            max_age: "24h".into(),
            max_size: "50GiB".into(),
            interval: "10m".into(),
        }
    }
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            supernodes: Vec::new(),
            upload_addr: ([0, 0, 0, 0], 65002).into(),
            proxy_addr: ([127, 0, 0, 1], 65001).into(),
            registry_mirror: None,
            hijack: Vec::new(),
            ca_cert: None,
            ca_key: None,
            insecure_upstream: false,
            metrics_addr: ([127, 0, 0, 1], 65003).into(),
            data_dir: PathBuf::from("/var/lib/damselfly"),
            agent_socket: PathBuf::from(super::dfget::DEFAULT_AGENT_SOCKET),
            advertise_ip: None,
            location: Default::default(),
            upload_rate: "0".into(),
            download_rate: "0".into(),
            max_upload_concurrency: 16,
            upstream_ca: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            plaintext: false,
            origin_policy: Default::default(),
            gc: GcConfig::default(),
        }
    }
}

fn merge(args: &Args) -> Result<DaemonConfig> {
    let mut c: DaemonConfig = load_toml(args.config.as_deref())?;
    if let Some(s) = &args.supernode {
        c.supernodes = split_list(s);
    }
    macro_rules! take {
        ($($f:ident),*) => { $( if let Some(v) = &args.$f { c.$f = v.clone(); } )* };
    }
    take!(
        upload_addr,
        proxy_addr,
        metrics_addr,
        data_dir,
        agent_socket,
        upload_rate,
        download_rate,
        location
    );
    if args.advertise_ip.is_some() {
        c.advertise_ip = args.advertise_ip;
    }
    if args.registry_mirror.is_some() {
        c.registry_mirror = args.registry_mirror.clone();
    }
    if args.upstream_ca.is_some() {
        c.upstream_ca = args.upstream_ca.clone();
    }
    args.tls.over(
        &mut c.tls_ca,
        &mut c.tls_cert,
        &mut c.tls_key,
        &mut c.plaintext,
    );
    args.policy.over(&mut c.origin_policy);
    if let Some(h) = &args.hijack {
        c.hijack = split_list(h);
    }
    if args.ca_cert.is_some() {
        c.ca_cert = args.ca_cert.clone();
        c.ca_key = args.ca_key.clone();
    }
    c.insecure_upstream |= args.insecure_upstream;
    Ok(c)
}

/// Runs dfdaemon until SIGINT/SIGTERM; returns the exit code.
pub async fn run(args: Args) -> i32 {
    super::init_daemon_allocator();
    super::init_logging("info", args.log_json);
    match run_inner(args).await {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %e, "dfdaemon failed");
            eprintln!("dfdaemon: error: {e}");
            e.exit_code()
        }
    }
}

async fn run_inner(args: Args) -> Result<()> {
    let c = merge(&args)?;
    let field = |name: &'static str, e: Error| Error::invalid("config", format!("{name}: {e}"));
    let tls = crate::tls::ClusterTls::from_config(
        c.tls_ca.as_deref(),
        c.tls_cert.as_deref(),
        c.tls_key.as_deref(),
    )?;
    crate::tls::require(&tls, c.plaintext)?;
    let peer_cfg = PeerConfig {
        supernodes: c.supernodes.clone(),
        data_dir: c.data_dir.clone(),
        upload_addr: Some(c.upload_addr),
        advertise_ip: c.advertise_ip,
        upload_rate: parse_rate(&c.upload_rate).map_err(|e| field("upload_rate", e))?,
        download_rate: parse_rate(&c.download_rate).map_err(|e| field("download_rate", e))?,
        max_upload_concurrency: c.max_upload_concurrency,
        upstream_ca: c.upstream_ca.clone(),
        keep_seeding: true,
        tls,
        location: c.location.clone(),
    };
    let gc_age = parse_duration(&c.gc.max_age).map_err(|e| field("gc.max_age", e))?;
    let gc_size = parse_size(&c.gc.max_size).map_err(|e| field("gc.max_size", e))?;
    let gc_every = parse_duration(&c.gc.interval).map_err(|e| field("gc.interval", e))?;
    if c.supernodes.is_empty() {
        tracing::warn!("no supernode configured: every download goes to the origin");
    }
    let shutdown = Shutdown::new();
    shutdown.on_signals();
    let metrics = PeerMetrics::new();
    let peer = Peer::start(peer_cfg, metrics.clone(), shutdown.clone()).await?;
    let api = agent::serve(&c.agent_socket, peer.clone(), shutdown.clone())?;
    // Work the supernodes give of their own accord (preheats of scope all_peers).
    crate::subscription::start(peer.clone(), shutdown.clone());
    let (m, p) = (metrics.clone(), peer.clone());
    let router = Router::new()
        .route("/metrics", get(move || std::future::ready(m.render())))
        .route(
            "/api/v1/tasks",
            get(move || std::future::ready(axum::Json(p.tasks()))),
        )
        .route("/healthz", get(|| std::future::ready("ok")));
    let (maddr, _) = upload::serve(c.metrics_addr, router, None, shutdown.clone())
        .await
        .map_err(|e| Error::io("cannot bind metrics on", c.metrics_addr.to_string(), e))?;
    let proxy_cfg = crate::proxy::ProxyConfig {
        addr: c.proxy_addr,
        registry_mirror: c.registry_mirror.clone(),
        upstream_ca: c.upstream_ca.clone(),
        insecure_upstream: c.insecure_upstream,
        hijack: c.hijack.clone(),
        policy: c
            .origin_policy
            .build()
            .and_then(|p| {
                p.with_named(&crate::proxy::named_origins(
                    c.registry_mirror.as_ref(),
                    &c.hijack,
                ))
            })
            .map_err(|e| field("origin_policy", e))?,
        ca: match (&c.ca_cert, &c.ca_key) {
            (Some(cert), Some(key)) => crate::proxy::CaFiles {
                cert: cert.clone(),
                key: key.clone(),
            },
            (None, None) => crate::proxy::CaFiles::under(&c.data_dir),
            _ => {
                return Err(Error::invalid(
                    "config",
                    "ca_cert and ca_key: set both or neither",
                ));
            }
        },
    };
    let paddr = crate::proxy::serve(proxy_cfg, peer.clone(), shutdown.clone()).await?;
    tracing::info!(proxy = %paddr, upload = %peer.upload_addr(), metrics = %maddr, socket = %c.agent_socket.display(), "dfdaemon ready");
    let store = peer.store().clone();
    let gc_shutdown = shutdown.clone();
    tokio::spawn(async move {
        loop {
            let s = store.clone();
            let _ = tokio::task::spawn_blocking(move || s.gc(gc_age, gc_size)).await;
            tokio::select! {
                _ = gc_shutdown.wait() => break,
                _ = tokio::time::sleep(gc_every.max(Duration::from_secs(1))) => {}
            }
        }
    });
    shutdown.wait().await;
    let _ = tokio::time::timeout(Duration::from_secs(10), api).await;
    peer.close(Duration::from_secs(10)).await;
    tracing::info!("dfdaemon stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_configs_parse_and_typos_fail_with_the_key_name() {
        let d: DaemonConfig = toml::from_str(include_str!("../../../packaging/dfdaemon.toml"))
            .expect("dfdaemon.toml");
        assert_eq!(d.upload_addr, DaemonConfig::default().upload_addr);
        let g: super::super::dfget::DfgetConfig =
            toml::from_str(include_str!("../../../packaging/dfget.toml")).expect("dfget.toml");
        assert_eq!(g.back_source, Some(crate::download::BackSource::Auto));
        let err = toml::from_str::<DaemonConfig>("uplod_rate = \"1MiB\"").expect_err("typo");
        assert!(err.to_string().contains("uplod_rate"), "{err}");
        let err =
            toml::from_str::<DaemonConfig>("upload_addr = \"nowhere\"").expect_err("bad value");
        assert!(err.to_string().contains("upload_addr"), "{err}");
    }
}
