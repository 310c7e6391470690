//! The Damselfly supernode: the only component that talks to origins. It seeds each task once
//! (passive CDN: pieces are served as soon as they are on disk), schedules which parent each peer
//! takes each piece from, isolates faulty parents, and bounds its disk cache.

pub mod cache;
pub mod certs;
pub mod config;
pub mod error;
pub mod http;
pub mod isolation;
pub mod jobs;
pub mod layer_index;
pub mod metrics;
pub mod peers;
pub mod rebuild;
pub mod replica;
pub mod scheduler;
pub mod seed;
pub mod start_sets;
pub mod subscribers;
pub mod task;
pub mod tasks_api;
pub mod tickets;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fetcher::piece_store::Store;
use fetcher::rate::{parse_rate, parse_size};
use fetcher::source::HttpSource;
use proto::scheduler::cluster_server::ClusterServer;
use proto::scheduler::scheduler_server::SchedulerServer;

pub use error::{Error, Result};

use crate::config::{Config, parse};
use crate::isolation::Isolation;
use crate::metrics::Metrics;
use crate::scheduler::{SchedulerConfig, SchedulerService, Scheduling, assign};
use crate::seed::SeedContext;
use crate::task::Tasks;

/// A running supernode.
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub scheduling: Arc<Scheduling>,
    server: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Waits for the gRPC server to stop (after shutdown).
    pub async fn join(self) {
        let _ = self.server.await;
    }
}

/// Binds a listener; returns it with the address it got (port 0 picks a free port).
/// Connections waiting to be accepted, per listener.
const LISTEN_BACKLOG: u32 = 8192;

async fn bind(addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr)> {
    let err = |source| Error::Bind {
        addr: addr.to_string(),
        source,
    };
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    // Thousands of peers connect at once after a supernode (re)starts: a deep accept queue
    // (the kernel caps it at net.core.somaxconn) instead of resets.
    let listener = socket.listen(LISTEN_BACKLOG).map_err(err)?;
    let local = listener.local_addr().map_err(err)?;
    Ok((listener, local))
}

/// Starts the supernode's servers; they stop when `shutdown` triggers.
pub async fn start(c: Config, shutdown: fetcher::Shutdown) -> Result<Running> {
    let cache_size = parse("cache_size", &c.cache_size, parse_size)?;
    let upload_rate = parse("upload_rate", &c.upload_rate, parse_rate)?;
    let piece_size = parse("piece_size", &c.piece_size, parse_size)?;
    let fault_window = parse(
        "fault_window",
        &c.fault_window,
        fetcher::cli::parse_duration,
    )?;
    let cooldown = parse(
        "isolation_cooldown",
        &c.isolation_cooldown,
        fetcher::cli::parse_duration,
    )?;
    let piece_size = u32::try_from(piece_size)
        .ok()
        .filter(|p| *p >= 64 * 1024)
        .ok_or(Error::Config {
            key: "piece_size",
            detail: "must be between 64KiB and 4GiB".into(),
        })?;
    let ticket_ttl = parse("ticket_ttl", &c.ticket_ttl, fetcher::cli::parse_duration)?;
    let admin_token = c
        .admin_token_file
        .as_deref()
        .map(config::read_admin_token)
        .transpose()?;
    let tls = fetcher::tls::ClusterTls::from_config(
        c.tls_ca.as_deref(),
        c.tls_cert.as_deref(),
        c.tls_key.as_deref(),
    )?;
    fetcher::tls::require(&tls, c.plaintext)?;
    let store = Store::open(&c.data_dir)?;
    let issuer =
        fetcher::ticket::Issuer::load_or_create(&c.data_dir.join("ticket.key")).map_err(|e| {
            Error::Config {
                key: "data_dir",
                detail: e.to_string(),
            }
        })?;
    let policy = c.origin_policy.build().map_err(|e| Error::Config {
        key: "origin_policy",
        detail: e.to_string(),
    })?;
    // Its own index API is an origin too (seeded like any blob), reached over cluster TLS.
    let cas: Vec<&std::path::Path> = c
        .upstream_ca
        .iter()
        .map(|p| p.as_path())
        .chain(tls.as_ref().map(|t| t.ca_path()))
        .collect();
    let mut source = HttpSource::with_policy(&cas, policy)?;
    if let Some(dir) = &c.hosts_dir {
        source = source.with_hosts_dir(dir, &cas);
    }
    let metrics = Metrics::new();
    let tasks = Arc::new(Tasks::default());
    let cluster = replica::Cluster::new(&c.cluster, tls.clone(), metrics.clone())?;
    let tickets = Arc::new(tickets::Tickets::new(issuer, ticket_ttl, c.ticket_bind_ip));
    let mut peer_http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .read_timeout(Duration::from_secs(30))
        .no_proxy();
    if let Some(t) = &tls {
        peer_http = peer_http.use_preconfigured_tls(t.piece_client());
    }
    let peer_http = peer_http.build().map_err(|e| Error::Config {
        key: "tls_ca",
        detail: format!("piece client: {e}"),
    })?;

    let (http_listener, http_addr) = bind(c.http_addr).await?;
    let (grpc_listener, grpc_addr) = bind(c.grpc_addr).await?;

    let scheduling = Arc::new(Scheduling {
        cfg: SchedulerConfig {
            limits: assign::Limits {
                window: c.peer_window.max(1),
                peer_cap: c.peer_upload_slots.max(1),
                supernode_cap: c.supernode_upload_slots.max(1),
            },
            advertise_ip: c.advertise_ip,
            http_port: http_addr.port(),
            http_scheme: if tls.is_some() { "https" } else { "http" },
            admin_token,
        },
        tickets: tickets.clone(),
        jobs: Default::default(),
        subscribers: Arc::new(subscribers::Subscribers::new(
            metrics.subscribed_agents.clone(),
        )),
        per_host: Default::default(),
        realms: Default::default(),
        tasks: tasks.clone(),
        tokens: fetcher::source::token::TokenCache::for_source(source.clone()),
        indexes: layer_index::Indexes::new(&c.data_dir, tasks.clone()),
        start_sets: start_sets::StartSets::new(&c.data_dir),
        seed: Arc::new(SeedContext {
            source,
            store: store.clone(),
            tasks: tasks.clone(),
            metrics: metrics.clone(),
            piece_size,
            cache_size,
            cluster: cluster.clone(),
            tickets,
            peer_http,
            peer_cap: c.peer_upload_slots.max(1),
            shutdown: shutdown.clone(),
        }),
        isolation: Isolation::new(c.fault_threshold, fault_window, cooldown),
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
    });

    let router = http::router(scheduling.clone(), upload_rate, 64);
    fetcher::upload::serve_on(
        http_listener,
        router,
        tls.as_ref().map(|t| t.piece_server()),
        shutdown.clone(),
    )
    .map_err(|e| Error::Bind {
        addr: http_addr.to_string(),
        source: e,
    })?;
    tokio::spawn(cache::run(
        store,
        tasks,
        cache_size,
        metrics,
        Duration::from_secs(5),
        shutdown.clone(),
    ));

    let svc = SchedulerServer::new(SchedulerService::new(scheduling.clone()));
    let cluster_svc = ClusterServer::new(replica::ClusterService { cluster });
    let sd = shutdown.clone();
    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = &tls {
        builder = builder.tls_config(t.server(c.tls_require_client_cert))?;
    }
    let server = tokio::spawn(async move {
        let r = builder
            .http2_keepalive_interval(Some(Duration::from_secs(15)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(svc)
            .add_service(cluster_svc)
            // Scheduling is many small round trips: no Nagle delay against delayed ACKs.
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
                async move { sd.wait().await },
            )
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "scheduler server failed");
        }
    });
    tracing::info!(%grpc_addr, %http_addr, data_dir = %c.data_dir.display(), cache_size, tls = tls.is_some(), "supernode ready");
    Ok(Running {
        grpc_addr,
        http_addr,
        scheduling,
        server,
    })
}
