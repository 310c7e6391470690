//! A load generator for the supernode's scheduler: simulated peers as real gRPC sessions (one
//! `Download` stream each, over cluster TLS when given) on M tasks. A simulated peer moves no
//! piece bytes: it reports each assigned piece done after a modelled delay, and stays connected
//! as a parent until every peer is done, as agents keep seeding. Each simulated host connects
//! from its own loopback address (127.1.x.y), so the supernode sees as many hosts as there are;
//! a host's sessions share its one connection, as an agent's do.
//!
//! What it measures: piece results per second, the time from a peer's piece result to its
//! next assignment (p50/p99), and, given the supernode's pid, its CPU seconds and its RSS: the
//! hosts connect first (RSS per connection), then their sessions run (RSS per idle session).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use proto::scheduler::scheduler_client::SchedulerClient;
use proto::scheduler::{Have, PeerMessage, PieceResult, Register, peer_message, scheduler_message};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// What to simulate.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// The supernode's gRPC address (`host:port`).
    pub supernode: String,
    /// Cluster TLS (the supernode's CA and a client certificate), or plaintext.
    pub tls: Option<Arc<fetcher::tls::ClusterTls>>,
    /// The content URLs, one task each; peers are spread over them evenly.
    pub urls: Vec<String>,
    pub peers: usize,
    /// Sessions (peers) per simulated host, all on the host's one connection.
    pub sessions_per_host: usize,
    /// How long a simulated piece download takes.
    pub piece_delay: Duration,
    /// How long the whole run may take.
    pub deadline: Duration,
}

/// Where a run is when it calls its probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Every host is connected; no session has started.
    Connected,
    /// Every peer is done and all sessions are still open (idle).
    Idle,
}

/// Called once at each [`Stage`].
pub type Probe = Arc<dyn Fn(Stage) + Send + Sync>;

/// What one run measured.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    pub peers: usize,
    pub hosts: usize,
    pub completed: usize,
    pub results: u64,
    /// Connections tried again (refused or reset at first).
    pub reconnects: u64,
    pub elapsed: Duration,
    /// From the first assignment to the last result.
    pub busy: Duration,
    pub p50: Duration,
    pub p99: Duration,
    /// Peers whose session failed, with the first error.
    pub failed: usize,
    pub first_error: Option<String>,
}

impl LoadReport {
    pub fn results_per_sec(&self) -> f64 {
        self.results as f64 / self.busy.as_secs_f64().max(1e-3)
    }
}

/// Loopback address of simulated host `i` (127.1.0.1, 127.1.0.2, ...).
fn host_ip(i: usize) -> IpAddr {
    let n = u32::try_from(i + 1).unwrap_or(u32::MAX) & 0x00ff_ffff;
    IpAddr::V4(Ipv4Addr::from(0x7f01_0000 | n))
}

/// A scheduler client for host `i`, connecting from its own loopback address.
async fn client(
    cfg: &LoadConfig,
    i: usize,
) -> Result<SchedulerClient<tonic::transport::Channel>, String> {
    let scheme = if cfg.tls.is_some() { "https" } else { "http" };
    let mut endpoint =
        tonic::transport::Endpoint::from_shared(format!("{scheme}://{}", cfg.supernode))
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(10));
    if let Some(t) = &cfg.tls {
        endpoint = endpoint
            .tls_config(t.client(&cfg.supernode))
            .map_err(|e| e.to_string())?;
    }
    let target: SocketAddr = tokio::net::lookup_host(&cfg.supernode)
        .await
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("the supernode address resolves to nothing")?;
    let source = host_ip(i);
    let connector = tower::service_fn(move |_: http::Uri| async move {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        let stream = socket.connect(target).await?;
        stream.set_nodelay(true)?;
        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
    });
    let channel = endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| fetcher::source::error_chain(&e))?;
    Ok(SchedulerClient::new(channel))
}

/// Connection attempts per simulated peer.
const CONNECT_ATTEMPTS: u32 = 5;

/// Waits before connection attempt `attempt` (200 ms, 400 ms, ...).
async fn backoff(attempt: u32) {
    tokio::time::sleep(Duration::from_millis(200 << attempt.min(5))).await;
}

/// Shared counters of a run.
struct Shared {
    results: AtomicU64,
    reconnects: AtomicU64,
    first_assign: std::sync::Mutex<Option<Instant>>,
    last_result: std::sync::Mutex<Option<Instant>>,
    latencies: std::sync::Mutex<Vec<u32>>,
    /// Sessions of peers that are done, kept open.
    idle: std::sync::Mutex<Vec<Idle>>,
}

type Idle = (
    mpsc::Sender<PeerMessage>,
    tonic::Streaming<proto::scheduler::SchedulerMessage>,
);

/// Host `h`'s connection. As agents do, a refused or reset connection is tried again after a
/// moment.
async fn host(cfg: &LoadConfig, h: usize, shared: &Shared) -> Result<Client, String> {
    let mut attempt = 0;
    loop {
        match client(cfg, h).await {
            Ok(c) => return Ok(c),
            Err(_) if attempt < CONNECT_ATTEMPTS => {
                attempt += 1;
                shared.reconnects.fetch_add(1, Ordering::Relaxed);
                backoff(attempt).await;
            }
            Err(e) => return Err(e),
        }
    }
}

type Client = SchedulerClient<tonic::transport::Channel>;

/// One simulated peer on host `h`: register, take assignments, report them after the delay;
/// then wait, still connected, until the run ends.
async fn peer(
    cfg: Arc<LoadConfig>,
    i: usize,
    h: usize,
    mut client: Client,
    shared: Arc<Shared>,
) -> Result<(), String> {
    let url = &cfg.urls[i % cfg.urls.len()];
    let (tx, rx) = mpsc::channel::<PeerMessage>(64);
    let send = |m: peer_message::Msg| PeerMessage { msg: Some(m) };
    let task_id = fetcher::task_id::task_id(url, "", &[]).map_err(|e| e.to_string())?;
    tx.send(send(peer_message::Msg::Register(Register {
        url: url.clone(),
        task_id,
        peer_id: format!("sim-{i}"),
        host_id: format!("sim-host-{h}"),
        upload_addr: format!("{}:1", host_ip(h)),
        ..Default::default()
    })))
    .await
    .map_err(|_| "stream closed")?;
    let mut inbound = client
        .download(ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("Download: {}", s.message()))?
        .into_inner();
    // Results come back through a channel so the delay never blocks the stream.
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(u32, String)>();
    let (mut total, mut reported) = (None::<u32>, 0u32);
    let mut waiting_since: Option<Instant> = None;
    let mut latencies = Vec::new();
    let finished = loop {
        if total.is_some_and(|t| reported >= t) {
            break true;
        }
        tokio::select! {
            m = inbound.message() => match m {
                Ok(Some(m)) => match m.msg {
                    Some(scheduler_message::Msg::TaskInfo(_)) => {
                        tx.send(send(peer_message::Msg::Have(Have { pieces: vec![] })))
                            .await
                            .map_err(|_| "stream closed")?;
                    }
                    Some(scheduler_message::Msg::Assign(a)) => {
                        let now = Instant::now();
                        shared.first_assign.lock().map_err(|_| "poisoned")?.get_or_insert(now);
                        if let Some(t) = waiting_since.take() {
                            latencies.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                        }
                        let (done, delay) = (done_tx.clone(), cfg.piece_delay);
                        let parent = a.parent.map(|p| p.id).unwrap_or_default();
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            let _ = done.send((a.piece, parent));
                        });
                    }
                    Some(scheduler_message::Msg::Done(d)) => total = Some(d.piece_count),
                    Some(scheduler_message::Msg::Error(e)) => return Err(format!("task error: {}", e.message)),
                    _ => {}
                },
                Ok(None) => break false,
                Err(s) => return Err(format!("stream: {}", s.message())),
            },
            Some((piece, parent_id)) = done_rx.recv() => {
                tx.send(send(peer_message::Msg::PieceResult(PieceResult {
                    piece,
                    parent_id,
                    success: true,
                    ..Default::default()
                })))
                .await
                .map_err(|_| "stream closed")?;
                reported += 1;
                shared.results.fetch_add(1, Ordering::Relaxed);
                *shared.last_result.lock().map_err(|_| "poisoned")? = Some(Instant::now());
                waiting_since = Some(Instant::now());
            }
        }
    };
    if let Ok(mut l) = shared.latencies.lock() {
        l.extend(latencies);
    }
    if !finished {
        return Err("the supernode ended the session before the task was done".into());
    }
    // Stay a parent until everyone is done: the caller holds the stream until then.
    shared
        .idle
        .lock()
        .map_err(|_| "poisoned")?
        .push((tx, inbound));
    Ok(())
}

fn percentile(sorted_us: &[u32], p: f64) -> Duration {
    if sorted_us.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted_us.len() as f64 - 1.0) * p).round() as usize;
    Duration::from_micros(u64::from(sorted_us[rank.min(sorted_us.len() - 1)]))
}

/// Runs `cfg.peers` simulated peers to completion (or the deadline); `probe` runs once every
/// peer is done, while all their sessions are still open.
pub async fn run(cfg: LoadConfig, probe: Probe) -> LoadReport {
    let cfg = Arc::new(cfg);
    let shared = Arc::new(Shared {
        results: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
        first_assign: Default::default(),
        last_result: Default::default(),
        latencies: Default::default(),
        idle: Default::default(),
    });
    let start = Instant::now();
    let hosts = cfg.peers.div_ceil(cfg.sessions_per_host.max(1));
    let mut report = LoadReport {
        peers: cfg.peers,
        hosts,
        ..Default::default()
    };
    let deadline = tokio::time::sleep(cfg.deadline);
    tokio::pin!(deadline);
    let mut dialling = tokio::task::JoinSet::new();
    for h in 0..hosts {
        let (cfg, shared) = (cfg.clone(), shared.clone());
        dialling.spawn(async move { (h, host(&cfg, h, &shared).await) });
    }
    let mut clients: Vec<Option<Result<Client, String>>> = vec![None; hosts];
    loop {
        tokio::select! {
            r = dialling.join_next() => match r {
                None => break,
                Some(Ok((h, c))) => clients[h] = Some(c),
                Some(Err(e)) => { report.first_error.get_or_insert(e.to_string()); }
            },
            _ = &mut deadline => {
                report.first_error.get_or_insert(format!("deadline of {:?} passed while connecting", cfg.deadline));
                dialling.abort_all();
                break;
            }
        }
    }
    probe(Stage::Connected);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..cfg.peers {
        let h = i / cfg.sessions_per_host.max(1);
        match &clients[h] {
            Some(Ok(c)) => {
                let (cfg, shared, c) = (cfg.clone(), shared.clone(), c.clone());
                tasks.spawn(peer(cfg, i, h, c, shared));
            }
            Some(Err(e)) => {
                report.failed += 1;
                report.first_error.get_or_insert(e.clone());
            }
            None => report.failed += 1,
        }
    }
    loop {
        tokio::select! {
            r = tasks.join_next() => match r {
                None => break,
                Some(Ok(Ok(()))) => report.completed += 1,
                Some(Ok(Err(e))) => {
                    report.failed += 1;
                    report.first_error.get_or_insert(e);
                }
                Some(Err(e)) => {
                    report.failed += 1;
                    report.first_error.get_or_insert(e.to_string());
                }
            },
            _ = &mut deadline => {
                report.first_error.get_or_insert(format!("deadline of {:?} passed", cfg.deadline));
                tasks.abort_all();
                break;
            }
        }
    }
    report.elapsed = start.elapsed();
    probe(Stage::Idle);
    drop(shared.idle.lock().map(|mut v| std::mem::take(&mut *v)));
    report.results = shared.results.load(Ordering::Relaxed);
    report.reconnects = shared.reconnects.load(Ordering::Relaxed);
    let first = shared.first_assign.lock().ok().and_then(|t| *t);
    let last = shared.last_result.lock().ok().and_then(|t| *t);
    if let (Some(f), Some(l)) = (first, last) {
        report.busy = l.saturating_duration_since(f);
    }
    let mut lat = shared
        .latencies
        .lock()
        .map(|l| l.clone())
        .unwrap_or_default();
    lat.sort_unstable();
    report.p50 = percentile(&lat, 0.50);
    report.p99 = percentile(&lat, 0.99);
    report
}

/// CPU seconds (user + system) and RSS (KiB) of process `pid`, from `/proc`.
pub fn process_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    // USER_HZ is 100 on Linux.
    Some((ticks as f64 / 100.0, rss))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_get_their_own_loopback_address() {
        assert_eq!(host_ip(0).to_string(), "127.1.0.1");
        assert_eq!(host_ip(9_999).to_string(), "127.1.39.16");
        let p: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&p, 0.5), Duration::from_micros(51));
        assert_eq!(percentile(&p, 0.99), Duration::from_micros(99));
        assert_eq!(percentile(&[], 0.99), Duration::ZERO);
        let me = process_usage(std::process::id()).expect("own usage");
        assert!(me.1 > 0);
    }
}
