//! Supernode configuration: command-line flags over a TOML file over documented defaults.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::Parser;
use serde::Deserialize;

use crate::error::{Error, Result};

/// The Damselfly supernode: scheduler (gRPC), seed cache and piece server (HTTP), back-to-source.
#[derive(Debug, Parser)]
#[command(
    name = "supernode",
    version,
    args_conflicts_with_subcommands = true,
    after_help = "Every flag also has a key in the TOML config file (--config); flags win.\nSee packaging/supernode.toml for all keys and their defaults.\nHTTPS endpoints: /healthz, /metrics, /pieces/<version>/<n> and /api/v1/index/<digest> (with a ticket),\nPOST /api/v1/preheat, POST /api/v1/index and GET /api/v1/tasks (with the admin token, --admin-token-file).\nOrigins: public addresses only unless allowed (--allow-origin, --allow-address, [origin_policy]).\nCluster TLS is required (--tls-ca/--tls-cert/--tls-key; `supernode certs` makes them) unless --plaintext."
)]
pub struct Args {
    /// Config file (TOML).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Scheduler gRPC address [default: 0.0.0.0:8002].
    #[arg(long, value_name = "IP:PORT")]
    pub grpc_addr: Option<SocketAddr>,
    /// Piece server, index and preheat APIs and metrics address (HTTPS with cluster TLS)
    /// [default: 0.0.0.0:8001].
    #[arg(long, value_name = "IP:PORT")]
    pub http_addr: Option<SocketAddr>,
    /// Seed cache directory [default: /var/lib/damselfly/supernode].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// IP peers use to reach the piece server [default: the address each peer connected to].
    #[arg(long)]
    pub advertise_ip: Option<IpAddr>,
    /// Disk cache size; least recently used tasks are evicted beyond it [default: 100GiB].
    #[arg(long, value_name = "SIZE")]
    pub cache_size: Option<String>,
    /// Extra CA certificates (PEM) for HTTPS origins; system roots are always trusted.
    #[arg(long, value_name = "FILE")]
    pub upstream_ca: Option<PathBuf>,
    /// containerd's registry host configs (`<DIR>/<host[:port]>/hosts.toml`): each registry's
    /// `ca`, `client` certificate and `skip_verify`, for seeds and token requests
    /// [default: none].
    #[arg(long, value_name = "DIR")]
    pub hosts_dir: Option<PathBuf>,
    /// Cap on all piece uploads of this supernode (e.g. 40MiB) [default: none].
    #[arg(long, value_name = "RATE")]
    pub upload_rate: Option<String>,
    #[command(flatten)]
    pub tls: fetcher::tls::TlsArgs,
    #[command(flatten)]
    pub policy: fetcher::source::policy::PolicyArgs,
    /// File holding the bearer token the admin API (preheat, index builds) requires; without
    /// one the admin API is disabled [default: none].
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// This supernode's scheduler address exactly as agents list it in --supernode (its entry
    /// in --cluster-supernode) [default: none].
    #[arg(long, value_name = "HOST:PORT")]
    pub cluster_address: Option<String>,
    /// Every supernode of the cluster (this one included), as agents list them: the task
    /// metadata of each task goes to the ones after this in its rendezvous order (repeatable or
    /// comma-separated) [default: none].
    #[arg(long, value_name = "HOST:PORT", value_delimiter = ',')]
    pub cluster_supernode: Vec<String>,
    /// Log lines as JSON.
    #[arg(long)]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What else the binary does (without one it runs the supernode).
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create the cluster CA (once) and a host certificate signed by it, for --tls-*.
    Certs(crate::certs::CertsArgs),
}

/// `supernode.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub data_dir: PathBuf,
    pub advertise_ip: Option<IpAddr>,
    pub cache_size: String,
    pub upstream_ca: Option<PathBuf>,
    /// containerd's registry host configs, for per-registry TLS.
    pub hosts_dir: Option<PathBuf>,
    pub upload_rate: String,
    /// Base piece size (grown for content over 4096 pieces).
    pub piece_size: String,
    /// Assignments a peer may have outstanding at once.
    pub peer_window: usize,
    /// Concurrent uploads the scheduler assigns to one peer.
    pub peer_upload_slots: usize,
    /// Concurrent uploads the scheduler assigns to this supernode, per task.
    pub supernode_upload_slots: usize,
    /// Faults (bad data, unreachable) within `fault_window` that isolate a host.
    pub fault_threshold: usize,
    pub fault_window: String,
    /// How long an isolated host stays out of scheduling.
    pub isolation_cooldown: String,
    /// Bearer token file for the admin API (preheat, index builds); none: the API is disabled.
    pub admin_token_file: Option<PathBuf>,
    /// Lifetime of the tickets peers show to read pieces and indexes (renewed while connected).
    pub ticket_ttl: String,
    /// Bind piece tickets to the address a peer connected from (turn off only behind NAT).
    pub ticket_bind_ip: bool,
    /// Which origins the supernode fetches from on a peer's behalf.
    pub origin_policy: fetcher::source::policy::PolicyConfig,
    /// Cluster TLS for the scheduler and the piece server (all three, or `plaintext`).
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// With TLS: refuse peers without a certificate from the cluster CA.
    pub tls_require_client_cert: bool,
    /// Run without cluster TLS (only on a network you trust).
    pub plaintext: bool,
    /// The other supernodes, for taking over each other's tasks.
    pub cluster: ClusterConfig,
}

/// `[cluster]`: the supernodes that share tasks by rendezvous hashing (see `replica`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// This supernode's entry in `supernodes`.
    pub address: Option<String>,
    /// Every supernode's scheduler address, exactly as agents list them.
    pub supernodes: Vec<String>,
    /// Successors in a task's rendezvous order that receive its metadata.
    pub replicas: usize,
    /// How long a takeover waits for peers to announce a piece before it fetches the piece from
    /// the origin.
    pub rebuild_wait: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            address: None,
            supernodes: Vec::new(),
            replicas: 1,
            rebuild_wait: "3s".into(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            grpc_addr: ([0, 0, 0, 0], 8002).into(),
            http_addr: ([0, 0, 0, 0], 8001).into(),
            data_dir: PathBuf::from("/var/lib/damselfly/supernode"),
            advertise_ip: None,
            cache_size: "100GiB".into(),
            upstream_ca: None,
            hosts_dir: None,
            upload_rate: "0".into(),
            piece_size: "1MiB".into(),
            peer_window: 16,
            peer_upload_slots: 8,
            supernode_upload_slots: 8,
            fault_threshold: 3,
            fault_window: "60s".into(),
            isolation_cooldown: "120s".into(),
            admin_token_file: None,
            ticket_ttl: "10m".into(),
            ticket_bind_ip: true,
            origin_policy: Default::default(),
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_require_client_cert: true,
            plaintext: false,
            cluster: ClusterConfig::default(),
        }
    }
}

/// Loads the file (if any) and applies the flags.
pub fn load(args: &Args) -> Result<Config> {
    let mut c = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
                path: path.clone(),
                source,
            })?;
            toml::from_str(&text).map_err(|e| Error::Config {
                key: "file",
                detail: format!("{}: {e}", path.display()),
            })?
        }
        None => Config::default(),
    };
    if let Some(v) = args.grpc_addr {
        c.grpc_addr = v;
    }
    if let Some(v) = args.http_addr {
        c.http_addr = v;
    }
    if let Some(v) = &args.data_dir {
        c.data_dir = v.clone();
    }
    if args.advertise_ip.is_some() {
        c.advertise_ip = args.advertise_ip;
    }
    if let Some(v) = &args.cache_size {
        c.cache_size = v.clone();
    }
    if args.upstream_ca.is_some() {
        c.upstream_ca = args.upstream_ca.clone();
    }
    if args.hosts_dir.is_some() {
        c.hosts_dir = args.hosts_dir.clone();
    }
    if let Some(v) = &args.upload_rate {
        c.upload_rate = v.clone();
    }
    args.tls.over(
        &mut c.tls_ca,
        &mut c.tls_cert,
        &mut c.tls_key,
        &mut c.plaintext,
    );
    args.policy.over(&mut c.origin_policy);
    if args.admin_token_file.is_some() {
        c.admin_token_file = args.admin_token_file.clone();
    }
    if args.cluster_address.is_some() {
        c.cluster.address = args.cluster_address.clone();
    }
    if !args.cluster_supernode.is_empty() {
        c.cluster.supernodes = args.cluster_supernode.clone();
    }
    Ok(c)
}

/// The admin token kept in `path` (trimmed; an empty file is an error, not "no token").
pub fn read_admin_token(path: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    let token = text.trim().to_owned();
    if token.len() < 16 {
        return Err(Error::Config {
            key: "admin_token_file",
            detail: format!(
                "{}: the token must have at least 16 characters",
                path.display()
            ),
        });
    }
    Ok(token)
}

/// Parses a config value with `f`, naming the key on failure.
pub fn parse<T>(
    key: &'static str,
    value: &str,
    f: impl FnOnce(&str) -> fetcher::Result<T>,
) -> Result<T> {
    f(value).map_err(|e| Error::Config {
        key,
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_config_parses_and_typos_fail_with_the_key_name() {
        let c: Config =
            toml::from_str(include_str!("../../packaging/supernode.toml")).expect("supernode.toml");
        let d = Config::default();
        assert_eq!(c.grpc_addr, d.grpc_addr);
        assert_eq!(
            (c.peer_window, c.peer_upload_slots, c.supernode_upload_slots),
            (d.peer_window, d.peer_upload_slots, d.supernode_upload_slots),
            "the sample must show the defaults"
        );
        assert_eq!(
            (
                c.ticket_ttl.as_str(),
                c.ticket_bind_ip,
                c.admin_token_file.is_none()
            ),
            (d.ticket_ttl.as_str(), d.ticket_bind_ip, true),
            "the sample must show the security defaults"
        );
        assert_eq!(
            (
                c.cluster.replicas,
                c.cluster.rebuild_wait.as_str(),
                c.cluster.supernodes.len()
            ),
            (d.cluster.replicas, d.cluster.rebuild_wait.as_str(), 0),
            "the sample must show the cluster defaults"
        );
        let err = toml::from_str::<Config>("[cluster]\nreplica = 2").expect_err("typo");
        assert!(err.to_string().contains("replica"), "{err}");
        let err = toml::from_str::<Config>("cache_sise = \"1GiB\"").expect_err("typo");
        assert!(err.to_string().contains("cache_sise"), "{err}");
    }
}
