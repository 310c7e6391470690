//! `damselfly-loadgen`: simulated peers against a running supernode (see
//! `damselfly_tests::loadgen`); prints one summary line.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use damselfly_tests::loadgen::{LoadConfig, process_usage, run};

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
    let idle = Arc::new(Mutex::new(None));
    let (pid, at_idle) = (a.supernode_pid, idle.clone());
    let probe = Arc::new(move || {
        if let (Some(p), Ok(mut slot)) = (pid, at_idle.lock()) {
            *slot = process_usage(p);
        }
    });
    let tasks = a.urls.len();
    let report = run(
        LoadConfig {
            supernode: a.supernode,
            tls,
            urls: a.urls,
            peers: a.peers,
            piece_delay: a.piece_delay,
            deadline: a.deadline,
        },
        probe,
    )
    .await;
    let mut line = format!(
        "loadgen peers={} tasks={tasks} completed={} failed={} reconnects={} results={} results_per_s={:.0} p50_ms={:.2} p99_ms={:.2} elapsed_s={:.2}",
        report.peers,
        report.completed,
        report.failed,
        report.reconnects,
        report.results,
        report.results_per_sec(),
        report.p50.as_secs_f64() * 1e3,
        report.p99.as_secs_f64() * 1e3,
        report.elapsed.as_secs_f64(),
    );
    let idle = idle.lock().ok().and_then(|v| *v);
    if let (Some((cpu0, rss0)), Some((cpu1, rss1))) = (before, idle) {
        let per_peer = rss1.saturating_sub(rss0) as f64 / report.peers.max(1) as f64;
        let cpu = cpu1 - cpu0;
        // Per core: results over the supernode's CPU seconds (the load generator shares the
        // machine, so results per second alone understate what one core does).
        line.push_str(&format!(
            " sn_cpu_s={cpu:.2} results_per_cpu_s={:.0} sn_rss_mib={:.1} rss_kib_per_peer={per_peer:.1}",
            report.results as f64 / cpu.max(1e-3),
            rss1 as f64 / 1024.0
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
