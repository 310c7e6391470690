//! `dfget`: download a URL through the P2P network to a file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Deserialize;
use tokio::sync::watch;

use super::{human_bytes, load_toml, parse_duration, parse_header, split_list};
use crate::download::{BackSource, Destination, DownloadRequest, Progress, Summary};
use crate::error::{Error, Result};
use crate::metrics::PeerMetrics;
use crate::peer::{Peer, PeerConfig};
use crate::rate::{parse_rate, parse_size};
use crate::shutdown::Shutdown;
use crate::{agent, task_id};

/// Default agent socket.
pub const DEFAULT_AGENT_SOCKET: &str = "/run/damselfly/agent.sock";
/// Default system config file.
pub const DEFAULT_CONFIG: &str = "/etc/damselfly/dfget.toml";
/// Config file of the original Dragonfly dfget (`[node] address=host:port,...`).
pub const DRAGONFLY_CONFIG: &str = "/etc/dragonfly.conf";

const AFTER_HELP: &str = "\
Supernodes come from --supernode, else `supernodes` in the config file (--config, default
/etc/damselfly/dfget.toml), else `[node] address=` in /etc/dragonfly.conf.

When a host agent (dfdaemon) listens on /run/damselfly/agent.sock (or --agent), dfget asks it to
download, sharing its piece store and limits; otherwise dfget runs an embedded peer with its own
store (--data-dir) and upload server (--upload-addr) for the duration of the download.

Output: a progress bar on a terminal, then one summary line on stdout:
  dfget: done <path> size=<bytes> time_s=.. rate=.. peers=<bytes> supernode=<bytes> origin=<bytes> reused=<bytes> digest=sha256:..
The output path appears only when its whole content is verified.

Exit codes: 0 ok; 1 other failure; 2 invalid input; 3 no supernode reachable with --back-source
never; 4 origin or supernode refused the content (HTTP status, unreachable, broken body); 5 not
enough disk space (checked before downloading); 6 digest mismatch; 7 timed out.";

/// Download a file peer to peer through Damselfly supernodes.
#[derive(Debug, Parser)]
#[command(name = "dfget", version, after_help = AFTER_HELP)]
pub struct Args {
    /// URL of the content (http:// or https://).
    pub url: String,
    /// Where to write the content (it appears whole and verified, or not at all). `-` streams it to
    /// stdout in order as it arrives, holding the last byte back until the whole is verified.
    #[arg(short = 'O', long = "output", value_name = "PATH")]
    pub output: PathBuf,
    /// Supernode scheduler addresses, comma-separated (host:port of their gRPC port, default 8002).
    #[arg(long, value_name = "H:P,H:P")]
    pub supernode: Option<String>,
    /// Extra request header for the origin, repeatable ('Authorization: Bearer ...', 'Cookie: ...').
    #[arg(short = 'H', long = "header", value_name = "NAME: VALUE")]
    pub headers: Vec<String>,
    /// Expected digest of the whole content (sha256:<hex>); the download fails if it differs.
    #[arg(long)]
    pub digest: Option<String>,
    /// Rate limit for this download (e.g. 20MiB, 100Mbit; bytes per second).
    #[arg(long, value_name = "RATE")]
    pub limit_rate: Option<String>,
    /// Tag that distinguishes tasks with the same URL.
    #[arg(long, default_value = "")]
    pub tag: String,
    /// Query parameters to ignore when identifying the task, '&'-separated (e.g. 'Expires&Signature').
    #[arg(long, value_name = "P&P")]
    pub filter: Option<String>,
    /// Whether to download from the origin directly when no supernode is reachable.
    #[arg(long, value_enum)]
    pub back_source: Option<BackSource>,
    /// Give up after this long (e.g. 90s, 10m).
    #[arg(long)]
    pub timeout: Option<String>,
    /// Use the host agent at this socket (fail if it is unreachable).
    #[arg(long, value_name = "SOCK", conflicts_with = "no_agent")]
    pub agent: Option<PathBuf>,
    /// Never use a host agent; run an embedded peer.
    #[arg(long)]
    pub no_agent: bool,
    /// Piece store of the embedded peer (default: ~/.cache/damselfly). Several dfget may share one.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address of the embedded peer's upload server (default: ephemeral port on the IP that reaches the supernode).
    #[arg(long, value_name = "IP:PORT")]
    pub upload_addr: Option<SocketAddr>,
    /// Upload cap of the embedded peer (e.g. 40MiB).
    #[arg(long, value_name = "RATE")]
    pub upload_rate: Option<String>,
    /// Where the embedded peer's host sits, outermost first (e.g. zone-a/rack-3): the supernode
    /// prefers parents in the same location.
    #[arg(long, value_name = "PATH")]
    pub location: Option<crate::location::Location>,
    /// Config file (TOML).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// Log level for stderr (error, warn, info, debug); RUST_LOG overrides.
    #[arg(long, default_value = "warn")]
    pub log_level: String,
    /// Cluster TLS of the embedded peer (towards supernodes and other peers).
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
}

/// `dfget.toml`. Every key is optional; flags win.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DfgetConfig {
    /// Supernode scheduler addresses.
    pub supernodes: Vec<String>,
    /// Piece store of the embedded peer.
    pub data_dir: Option<PathBuf>,
    /// Upload cap of the embedded peer.
    pub upload_rate: Option<String>,
    /// Where the embedded peer's host sits (e.g. "zone-a/rack-3").
    pub location: Option<crate::location::Location>,
    /// `auto` (default) or `never`.
    pub back_source: Option<BackSource>,
    /// Default timeout.
    pub timeout: Option<String>,
    /// Agent socket.
    pub agent_socket: Option<PathBuf>,
    /// Default `--filter`.
    pub filter: Option<String>,
    /// Embedded store GC: remove tasks unused this long (default 24h).
    pub gc_max_age: Option<String>,
    /// Embedded store GC: keep the store under this size (default 20GiB).
    pub gc_max_size: Option<String>,
    /// Cluster CA, certificate and key of the embedded peer (PEM files).
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Run the embedded peer without cluster TLS.
    pub plaintext: bool,
}

/// The embedded peer's cluster TLS: flags over `dfget.toml`; required once there are
/// supernodes to talk to (unless plaintext).
fn embedded_tls(
    args: &Args,
    cfg: &DfgetConfig,
    supernodes: &[String],
) -> Result<Option<crate::tls::ClusterTls>> {
    let (mut ca, mut cert, mut key, mut plaintext) = (
        cfg.tls_ca.clone(),
        cfg.tls_cert.clone(),
        cfg.tls_key.clone(),
        cfg.plaintext,
    );
    args.tls.over(&mut ca, &mut cert, &mut key, &mut plaintext);
    let tls = crate::tls::ClusterTls::from_config(ca.as_deref(), cert.as_deref(), key.as_deref())?;
    if !supernodes.is_empty() {
        crate::tls::require(&tls, plaintext)?;
    }
    Ok(tls)
}

/// Reads `[node] address=` from a Dragonfly 1.x config.
fn dragonfly_supernodes(path: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let mut in_node = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_node = line == "[node]";
        } else if in_node
            && let Some((k, v)) = line.split_once('=')
            && k.trim() == "address"
        {
            return split_list(v)
                .into_iter()
                .map(|a| {
                    if a.contains(':') {
                        a
                    } else {
                        format!("{a}:8002")
                    }
                })
                .collect();
        }
    }
    Vec::new()
}

fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("damselfly")
}

/// Runs dfget; returns the process exit code.
pub async fn run(args: Args) -> i32 {
    super::init_logging(&args.log_level, false);
    match run_inner(args).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("dfget: error: {e}");
            e.exit_code()
        }
    }
}

async fn run_inner(args: Args) -> Result<()> {
    let cfg_path = args.config.clone().or_else(|| {
        Path::new(DEFAULT_CONFIG)
            .exists()
            .then(|| DEFAULT_CONFIG.into())
    });
    let cfg: DfgetConfig = load_toml(cfg_path.as_deref())?;
    let supernodes = match &args.supernode {
        Some(s) => split_list(s),
        None if !cfg.supernodes.is_empty() => cfg.supernodes.clone(),
        None => dragonfly_supernodes(Path::new(DRAGONFLY_CONFIG)),
    };
    // `-O -` streams to stdout (in order, as pieces arrive; the summary then goes to stderr).
    let to_stdout = args.output == Path::new("-");
    let output = std::path::absolute(&args.output)
        .map_err(|e| Error::io("bad output path", &args.output, e))?;
    let (destination, writer) = if to_stdout {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        (
            Destination::Stream(tx),
            Some(tokio::spawn(write_stdout(rx))),
        )
    } else {
        (Destination::File(output.clone()), None)
    };
    let timeout = args
        .timeout
        .as_deref()
        .or(cfg.timeout.as_deref())
        .map(parse_duration)
        .transpose()?;
    let req = DownloadRequest {
        url: args.url.clone(),
        output: destination,
        headers: args
            .headers
            .iter()
            .map(|h| parse_header(h))
            .collect::<Result<_>>()?,
        digest: args
            .digest
            .as_deref()
            .map(task_id::parse_digest)
            .transpose()?,
        tag: args.tag.clone(),
        filter: args
            .filter
            .as_deref()
            .or(cfg.filter.as_deref())
            .map(task_id::parse_filter)
            .unwrap_or_default(),
        limit_rate: args
            .limit_rate
            .as_deref()
            .map(parse_rate)
            .transpose()?
            .unwrap_or(0),
        back_source: args.back_source.or(cfg.back_source).unwrap_or_default(),
        timeout,
        content_key: None,
        seed_only: false,
    };
    task_id::task_id(&req.url, &req.tag, &req.filter)?;
    let bar = progress_bar(args.quiet);
    let started = Instant::now();
    // An agent named with --agent must work; the default/configured one is used when it exists and
    // answers (a non-root user without access to it gets an embedded peer instead).
    let explicit_agent = args.agent.clone();
    if to_stdout && explicit_agent.is_some() {
        return Err(Error::invalid(
            "output",
            "-O - (stdout) needs an embedded peer, not --agent",
        ));
    }
    let default_agent = if args.no_agent || explicit_agent.is_some() || to_stdout {
        None
    } else {
        cfg.agent_socket
            .clone()
            .or_else(|| Some(PathBuf::from(DEFAULT_AGENT_SOCKET)))
            .filter(|p| p.exists())
    };
    let via = match (&explicit_agent, &default_agent) {
        (Some(sock), _) => Some(via_agent(sock, &req, &output, &bar).await?),
        (None, Some(sock)) => match agent::connect(sock).await {
            Ok(_) => Some(via_agent(sock, &req, &output, &bar).await?),
            Err(e) => {
                tracing::warn!(error = %e, "host agent not usable; running an embedded peer");
                None
            }
        },
        (None, None) => None,
    };
    let summary = match via {
        Some(s) => s,
        None => {
            let tls = embedded_tls(&args, &cfg, &supernodes)?;
            let peer_cfg = PeerConfig {
                tls,
                supernodes,
                data_dir: args
                    .data_dir
                    .clone()
                    .or(cfg.data_dir.clone())
                    .unwrap_or_else(default_data_dir),
                upload_addr: args.upload_addr,
                upload_rate: args
                    .upload_rate
                    .as_deref()
                    .or(cfg.upload_rate.as_deref())
                    .map(parse_rate)
                    .transpose()?
                    .unwrap_or(0),
                keep_seeding: false,
                location: args
                    .location
                    .clone()
                    .or(cfg.location.clone())
                    .unwrap_or_default(),
                ..PeerConfig::default()
            };
            let max_age = parse_duration(cfg.gc_max_age.as_deref().unwrap_or("24h"))?;
            let max_size = parse_size(cfg.gc_max_size.as_deref().unwrap_or("20GiB"))?;
            embedded(peer_cfg, &req, &bar, max_age, max_size).await?
        }
    };
    bar.finish_and_clear();
    drop(req);
    if let Some(w) = writer {
        w.await
            .map_err(|e| Error::Download(format!("stdout writer failed: {e}")))??;
    }
    let elapsed = started.elapsed().as_secs_f64().max(1e-6);
    let p = &summary.progress;
    let size = p.content_length.max(0) as u64;
    let line = format!(
        "dfget: done {} size={} ({}) time_s={:.3} rate={}/s peers={} supernode={} origin={} reused={} verify_failures={} digest={}",
        if to_stdout {
            "-".into()
        } else {
            output.display().to_string()
        },
        size,
        human_bytes(size),
        elapsed,
        human_bytes((size as f64 / elapsed) as u64),
        p.from_peers,
        p.from_supernode,
        p.from_origin,
        p.reused,
        summary.verify_failures,
        summary.digest,
    );
    if to_stdout {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
    Ok(())
}

/// Copies a download stream to stdout; stops at the first error (the download reports it).
async fn write_stdout(mut rx: tokio::sync::mpsc::Receiver<Result<bytes::Bytes>>) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut out = tokio::io::stdout();
    while let Some(item) = rx.recv().await {
        let Ok(chunk) = item else { break };
        out.write_all(&chunk)
            .await
            .map_err(|e| Error::io("cannot write", "stdout", e))?;
    }
    out.flush()
        .await
        .map_err(|e| Error::io("cannot write", "stdout", e))
}

fn progress_bar(quiet: bool) -> ProgressBar {
    let target = if quiet {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    };
    let bar = ProgressBar::with_draw_target(None, target);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn show(bar: &ProgressBar, p: &Progress) {
    if p.content_length >= 0 {
        bar.set_length(p.content_length as u64);
    }
    bar.set_position(p.completed);
    bar.set_message(format!(
        "peers {} supernode {} origin {}",
        human_bytes(p.from_peers),
        human_bytes(p.from_supernode),
        human_bytes(p.from_origin)
    ));
}

async fn embedded(
    cfg: PeerConfig,
    req: &DownloadRequest,
    bar: &ProgressBar,
    max_age: Duration,
    max_size: u64,
) -> Result<Summary> {
    let shutdown = Shutdown::new();
    let peer = Peer::start(cfg, PeerMetrics::new(), shutdown.clone()).await?;
    let store = peer.store().clone();
    tokio::task::spawn_blocking(move || store.gc(max_age, max_size));
    let (tx, mut rx) = watch::channel(Progress::default());
    let dl = peer.download(req, &tx);
    tokio::pin!(dl);
    let result = loop {
        tokio::select! {
            r = &mut dl => break r,
            Ok(()) = rx.changed() => show(bar, &rx.borrow_and_update()),
        }
    };
    // The scheduler stream is closed by now (no new children); let uploads in flight finish.
    peer.close(Duration::from_secs(5)).await;
    result
}

async fn via_agent(
    sock: &Path,
    req: &DownloadRequest,
    output: &Path,
    bar: &ProgressBar,
) -> Result<Summary> {
    let err = |detail: String| Error::Agent {
        socket: sock.to_path_buf(),
        detail,
    };
    let mut client = agent::connect(sock).await?;
    let started = Instant::now();
    let mut stream = client
        .download(agent::to_proto(req, output))
        .await
        .map_err(|s| err(s.message().to_owned()))?
        .into_inner();
    while let Some(msg) = stream
        .message()
        .await
        .map_err(|s| err(s.message().to_owned()))?
    {
        let p = agent::progress_from(&msg);
        show(bar, &p);
        if !msg.error.is_empty() {
            return Err(Error::Remote {
                message: msg.error,
                code: msg.exit_code,
            });
        }
        if msg.done {
            return Ok(Summary {
                progress: p,
                elapsed: started.elapsed(),
                digest: msg.digest,
                verify_failures: msg.verify_failures,
            });
        }
    }
    Err(err(
        "agent closed the stream before the download finished".into()
    ))
}
