//! dfget through the host agent: downloads share the agent's host-wide download limit, and the
//! agent's sessions share one connection to the supernode.

use std::time::Instant;

use damselfly_tests::harness::{Env, accepted_on, get_text, metric, random_file, run, sha256_file};

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
    // Both tasks' sessions (still open: the agent seeds) ride on one connection.
    let port: u16 = grpc
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("gRPC port");
    assert_eq!(
        accepted_on(port),
        1,
        "connections from the agent to the supernode"
    );
}

/// Bytes held and share complete of the blob `hex`'s task, as the tasks API of the agent whose
/// metrics address is `metrics` shows it.
async fn blob_task(metrics: &str, hex: &str) -> (f64, f64) {
    let text = damselfly_tests::harness::get_text(&format!("http://{metrics}/api/v1/tasks")).await;
    let all: Vec<serde_json::Value> = serde_json::from_str(&text).expect("tasks JSON");
    let blob = all
        .into_iter()
        .find(|t| t["url"].as_str().is_some_and(|u| u.ends_with(hex)))
        .unwrap_or_else(|| panic!("no task for the blob: {text}"));
    (
        blob["bytes_held"].as_f64().unwrap_or(-1.0),
        blob["complete"].as_f64().unwrap_or(-1.0),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_serve_blob_ranges_from_one_p2p_fetch() {
    let env = Env::new("agent-ranges");
    let (_origin, origin_url) = env.origin(&[]).await;
    let size = 10usize << 20;
    let hex = env.origin_blob(size);
    let bytes = std::fs::read(env.path(&format!("www/blob-{hex}"))).expect("read");
    let (_sn, grpc, _) = env.supernode("sn", &[]).await;
    let url = format!("{origin_url}/v2/project/app/blobs/sha256:{hex}");
    let read_as = |socket: std::path::PathBuf, offset: u64, length: u64, only_range: bool| {
        let url = url.clone();
        let digest = format!("sha256:{hex}");
        async move {
            let mut c = fetcher::agent::connect(&socket).await.expect("agent");
            c.read_range(proto::agent::ReadRangeRequest {
                url,
                headers: Vec::new(),
                digest,
                offset,
                length,
                only_range,
            })
            .await
            .map(|r| r.into_inner().data)
        }
    };
    let read = |socket, offset, length| read_as(socket, offset, length, false);
    let mut sockets = Vec::new();
    let mut agents = Vec::new();
    let mut daemons = Vec::new();
    for name in ["a", "b", "c"] {
        let (p, d) = env
            .dfdaemon(name, &grpc, &["--registry-mirror", &origin_url])
            .await;
        sockets.push(d.socket.clone());
        agents.push(p);
        daemons.push(d);
    }
    // Concurrent reads on one agent: one fetch, every range exact (across piece boundaries).
    let ranges = [
        (0u64, 100u64),
        ((4 << 20) - 10, 20),
        (7_000_000, 1_000_000),
        (size as u64 - 1, 1),
        (5, 0),
    ];
    let got =
        futures::future::join_all(ranges.iter().map(|(o, l)| read(sockets[0].clone(), *o, *l)))
            .await;
    for ((o, l), g) in ranges.iter().zip(got) {
        let g = g.unwrap_or_else(|e| panic!("range {o}+{l}: {e}"));
        assert!(
            g == bytes[*o as usize..(*o + *l) as usize],
            "range {o}+{l} differs"
        );
    }
    let err = read(sockets[0].clone(), size as u64, 1)
        .await
        .expect_err("past the end");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    // The other agent reads from the first, not the registry.
    let g = read(sockets[1].clone(), 3 << 20, 2 << 20)
        .await
        .expect("agent b");
    assert!(g == bytes[3 << 20..5 << 20]);
    // Only-range mode: agent c fetches the one piece a read needs, and nothing more.
    let g = read_as(sockets[2].clone(), 5 << 20, 100, true)
        .await
        .expect("agent c");
    assert!(g == bytes[5 << 20..(5 << 20) + 100]);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let m =
        damselfly_tests::harness::get_text(&format!("http://{}/metrics", daemons[2].metrics)).await;
    let fetched = damselfly_tests::harness::metric(&m, "damselfly_peer_download_bytes_total", "");
    assert_eq!(
        fetched,
        f64::from(fetcher::task_id::piece_size_for(
            size as i64,
            fetcher::task_id::DEFAULT_PIECE_SIZE
        )),
        "agent c fetched more than the read's piece"
    );
    // Their tasks APIs say how much of the blob each agent holds.
    assert_eq!(
        blob_task(&daemons[0].metrics, &hex).await,
        (size as f64, 1.0)
    );
    let (held, complete) = blob_task(&daemons[2].metrics, &hex).await;
    assert_eq!(held, fetched, "agent c's task");
    assert!(
        complete > 0.0 && complete < 1.0,
        "agent c holds {complete} of it"
    );
    let served = damselfly_tests::harness::origin_bytes(&origin_url).await;
    assert!(
        served < size as u64 + (64 << 10),
        "the origin served {served} bytes for a {size}-byte blob read by two agents"
    );
    // A whole pull of the blob through agent c's registry mirror, while its only-range fetch
    // still holds the version: both complete (the range fetch then fetches the rest).
    let pull = async {
        let r = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client")
            .get(format!(
                "http://{}/v2/project/app/blobs/sha256:{hex}",
                daemons[2].proxy
            ))
            .send()
            .await
            .expect("pull");
        assert_eq!(r.status().as_u16(), 200);
        r.bytes().await.expect("body")
    };
    let body = tokio::time::timeout(std::time::Duration::from_secs(60), pull)
        .await
        .expect("the whole pull waited on the only-range fetch");
    assert!(body == bytes[..], "the pulled blob differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_and_signed_queries_stay_out_of_logs_stores_and_metrics() {
    let env = Env::new("agent-secrets");
    let (_origin, origin_url) = env.origin(&[]).await;
    let want = random_file(&env.path("www/f"), 3 << 20);
    let (_sn, grpc, sn_http) = env.supernode("sn", &[]).await;
    let (_agent, daemon) = env.dfdaemon("agent", &grpc, &[]).await;
    let secrets = ["hunter2", "s1gn4tur3", "t0k3n-s3cr3t"];
    let host = origin_url.trim_start_matches("http://");
    let url = format!("http://deploy:hunter2@{host}/files/f?X-Amz-Signature=s1gn4tur3&Expires=9");
    let dead = format!(
        "http://deploy:hunter2@127.0.0.1:{}/files/f?X-Amz-Signature=s1gn4tur3",
        damselfly_tests::harness::free_port()
    );
    let header = [
        "-H".to_owned(),
        "Authorization: Bearer t0k3n-s3cr3t".to_owned(),
    ];
    let sock = daemon.socket.to_string_lossy().into_owned();
    for (name, url, via_agent, ok) in [
        ("via-agent", &url, true, true),
        ("embedded", &url, false, true),
        ("dead-via-agent", &dead, true, false),
        ("dead-embedded", &dead, false, false),
    ] {
        let out = env.path(&format!("{name}.out"));
        let mut args = if via_agent {
            vec![
                url.clone(),
                "-O".into(),
                out.to_string_lossy().into_owned(),
                "--agent".into(),
                sock.clone(),
                "--log-level".into(),
                "debug".into(),
            ]
        } else {
            // (dfget_args logs at info level.)
            env.dfget_args(name, url, &out, &grpc, &[])
        };
        args.extend(header.iter().cloned());
        let (code, output) = run(&mut env.spawn(name, "dfget", &args)).await;
        assert_eq!(code == 0, ok, "{name}: {output}");
        if ok {
            assert_eq!(sha256_file(&out), want, "{name}");
        }
    }
    for m in [
        get_text(&format!("http://{}/metrics", daemon.metrics)).await,
        get_text(&format!("{sn_http}/metrics")).await,
    ] {
        for s in secrets {
            assert!(!m.contains(s), "{s:?} in metrics");
        }
    }
    env.assert_no_secret(&secrets);
}
