//! The scheduler at scale, CI's small version of `tests/bench/scale.sh`: 200 simulated peers
//! (real gRPC sessions over cluster TLS, each host from its own loopback address, no piece
//! bytes; see `damselfly_tests::loadgen`) download one 64-piece task from a real supernode.
//! Every peer gets every piece, and the pieces come from peers: the supernode sends each once,
//! plus a second copy of some when it is idle after seeding (measured: 88–94 of 64 pieces).

use std::sync::Arc;
use std::time::Duration;

use damselfly_tests::cluster;
use damselfly_tests::harness::{Env, metric, random_file};
use damselfly_tests::loadgen::{LoadConfig, run};

const PEERS: usize = 200;
const PIECES: usize = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_simulated_peers_finish_from_each_other() {
    let env = Env::new("scale");
    std::fs::create_dir_all(env.path("www")).expect("www");
    random_file(&env.path("www/task"), PIECES * (64 << 10));
    let (_origin, base) = env.origin(&[]).await;
    let config = env.path("supernode.toml");
    std::fs::write(&config, "piece_size = \"64KiB\"\n").expect("config");
    let (_sn, grpc, http) = env
        .supernode("sn", &["--config", &config.to_string_lossy()])
        .await;
    let (cert, key) = cluster::issue("loadgen");
    let tls = fetcher::tls::ClusterTls::from_config(
        Some(&cluster::ca()),
        Some(cert.as_path()),
        Some(key.as_path()),
    )
    .expect("cluster TLS")
    .map(Arc::new);

    let report = run(
        LoadConfig {
            supernode: grpc,
            tls,
            urls: vec![format!("{base}/files/task")],
            peers: PEERS,
            sessions_per_host: 4,
            piece_delay: Duration::from_millis(5),
            deadline: Duration::from_secs(60),
        },
        Arc::new(|_| {}),
    )
    .await;
    assert_eq!(
        (report.completed, report.failed),
        (PEERS, 0),
        "{:?}",
        report.first_error
    );
    assert_eq!(report.results, (PEERS * PIECES) as u64);

    let text = cluster::http_client()
        .get(format!("{http}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let name = "damselfly_supernode_assignments_total";
    let (from_sn, from_peers) = (
        metric(&text, name, "parent=\"supernode\""),
        metric(&text, name, "parent=\"peer\""),
    );
    assert_eq!(from_sn + from_peers, (PEERS * PIECES) as f64);
    assert!(
        from_sn <= 2.0 * PIECES as f64,
        "the supernode sent {from_sn} pieces for {PIECES} (peers: {from_peers})"
    );
    println!(
        "scale smoke: {PEERS} peers, {} results/s, p99 {:?}, supernode sent {from_sn} of {} pieces",
        report.results_per_sec() as u64,
        report.p99,
        PEERS * PIECES
    );
}
