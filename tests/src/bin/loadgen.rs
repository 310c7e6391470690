//! `damselfly-loadgen`: simulated peers against a running supernode (see
//! `damselfly_tests::loadgen`); prints one summary line.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use damselfly_tests::loadgen::{LoadConfig, Stage, process_usage, run};

/// Simulated peers (real gRPC sessions, no piece bytes) against a supernode's scheduler.
#[derive(Parser)]
struct Args {
    /// The supernode's gRPC address.
    #[arg(long)]
    supernode: String,
    /// Content URLs, one task each (repeat the flag); peers are spread over them.
    #[arg(long = "url", required = true)]
    urls: Vec<String>,
    /// Simulated peers, each its own host (loopback address 127.1.x.y).
    #[arg(long, default_value_t = 1000)]
    peers: usize,
    /// Sessions per simulated host, sharing its one connection (an agent pulling an image has
    /// one per layer).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    sessions_per_host: u32,
    /// Modelled duration of one piece download (e.g. 20ms).
    #[arg(long, default_value = "20ms", value_parser = duration)]
    piece_delay: Duration,
    /// Give up after this long.
    #[arg(long, default_value = "120s", value_parser = duration)]
    deadline: Duration,
    /// The supernode's pid: report its CPU seconds and RSS growth per peer.
    #[arg(long)]
    supernode_pid: Option<u32>,
    /// Cluster CA, client certificate and key (else plaintext).
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<std::path::PathBuf>,
    #[arg(long)]
    tls_cert: Option<std::path::PathBuf>,
    #[arg(long)]
    tls_key: Option<std::path::PathBuf>,
    /// Without cluster TLS (the supernode runs `--plaintext`): the security-off baseline.
    #[arg(long, conflicts_with_all = ["tls_ca", "tls_cert", "tls_key"])]
    plaintext: bool,
}

fn duration(s: &str) -> Result<Duration, String> {
    fetcher::cli::parse_duration(s).map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if !a.plaintext && a.tls_ca.is_none() {
        anyhow::bail!(
            "give the cluster TLS files (--tls-ca, --tls-cert, --tls-key) or --plaintext"
        );
    }
    let tls = fetcher::tls::ClusterTls::from_config(
        a.tls_ca.as_deref(),
        a.tls_cert.as_deref(),
        a.tls_key.as_deref(),
    )?
    .map(Arc::new);
    let before = a.supernode_pid.and_then(process_usage);
    // Usage once every host is connected, and again once every session is idle.
    let usage = Arc::new(Mutex::new([None, None]));
    let (pid, at) = (a.supernode_pid, usage.clone());
    let probe = Arc::new(move |stage: Stage| {
        if let (Some(p), Ok(mut slots)) = (pid, at.lock()) {
            slots[usize::from(stage == Stage::Idle)] = process_usage(p);
        }
    });
    let tasks = a.urls.len();
    let report = run(
        LoadConfig {
            supernode: a.supernode,
            tls,
            urls: a.urls,
            peers: a.peers,
            sessions_per_host: a.sessions_per_host as usize,
            piece_delay: a.piece_delay,
            deadline: a.deadline,
        },
        probe,
    )
    .await;
    let mut line = format!(
        "loadgen peers={} hosts={} tasks={tasks} completed={} failed={} reconnects={} results={} results_per_s={:.0} p50_ms={:.2} p99_ms={:.2} elapsed_s={:.2}",
        report.peers,
        report.hosts,
        report.completed,
        report.failed,
        report.reconnects,
        report.results,
        report.results_per_sec(),
        report.p50.as_secs_f64() * 1e3,
        report.p99.as_secs_f64() * 1e3,
        report.elapsed.as_secs_f64(),
    );
    let [connected, idle] = usage.lock().map(|u| *u).unwrap_or_default();
    if let (Some((cpu0, rss0)), Some((_, rss1)), Some((cpu2, rss2))) = (before, connected, idle) {
        let per = |kib: u64, n: usize| kib as f64 / n.max(1) as f64;
        let cpu = cpu2 - cpu0;
        // Per core: results over the supernode's CPU seconds (the load generator shares the
        // machine, so results per second alone understate what one core does).
        line.push_str(&format!(
            " sn_cpu_s={cpu:.2} results_per_cpu_s={:.0} sn_rss_mib={:.1} rss_kib_per_connection={:.1} rss_kib_per_session={:.1}",
            report.results as f64 / cpu.max(1e-3),
            rss2 as f64 / 1024.0,
            per(rss1.saturating_sub(rss0), report.hosts),
            per(rss2.saturating_sub(rss1), report.peers),
        ));
    }
    println!("{line}");
    if let Some(e) = report.first_error {
        eprintln!("first error: {e}");
    }
    if report.completed < report.peers {
        std::process::exit(1);
    }
    Ok(())
}
