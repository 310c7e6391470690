//! dfget through the host agent: downloads share the agent's host-wide download limit.

use std::time::Instant;

use damselfly_tests::harness::{Env, get_text, metric, random_file, run, sha256_file};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_agent_downloads_share_the_host_download_limit() {
    let env = Env::new("agent");
    let (_origin, origin_url) = env.origin(&[]).await;
    let size = 12usize << 20;
    let a = random_file(&env.path("www/a"), size);
    let b = random_file(&env.path("www/b"), size);
    let (_sn, grpc, _) = env.supernode("sn", &[]).await;
    let (_agent, daemon) = env
        .dfdaemon("agent", &grpc, &["--download-rate", "8MiB"])
        .await;
    let (sock, metrics_addr) = (daemon.socket, daemon.metrics);
    let limit = 8u64 << 20;

    let started = Instant::now();
    let mut procs: Vec<_> = [("a", &a), ("b", &b)]
        .into_iter()
        .map(|(name, want)| {
            let out = env.path(&format!("{name}.out"));
            let args: Vec<String> = vec![
                format!("{origin_url}/files/{name}"),
                "-O".into(),
                out.to_string_lossy().into_owned(),
                "--agent".into(),
                sock.to_string_lossy().into_owned(),
            ];
            (
                out,
                want.clone(),
                env.spawn(&format!("dfget-{name}"), "dfget", &args),
            )
        })
        .collect();
    for (out, want, p) in &mut procs {
        let (code, output) = run(p).await;
        assert_eq!(code, 0, "{output}");
        assert_eq!(&sha256_file(out), want);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rate = (2 * size) as f64 / elapsed;
    eprintln!(
        "two downloads through the agent: {:.1} MiB/s combined, limit 8 MiB/s",
        rate / (1 << 20) as f64
    );
    assert!(
        rate <= 1.3 * limit as f64,
        "combined rate {rate:.0} B/s exceeds the host limit {limit} B/s"
    );
    let m = get_text(&format!("http://{metrics_addr}/metrics")).await;
    let downloaded = metric(&m, "damselfly_peer_download_bytes_total", "");
    assert_eq!(downloaded as usize, 2 * size, "agent metrics: {m}");
}
