//! Supernodes that fail: three supernodes in one cluster, the owner of a task killed while hosts
//! download it. Peers move to the next supernode, which rebuilds the task from what peers hold
//! (checked against the metadata the owner replicated to it) instead of fetching it from the
//! origin again; and only the cluster's supernodes may send such metadata.

use std::time::{Duration, Instant};

use damselfly_tests::harness::{
    Env, get_text, metric, origin_bytes, random_file, run, sha256_file,
};
use proto::scheduler::cluster_client::ClusterClient;
use proto::scheduler::{PieceInfo, Replica};

/// Polls `what` on `url`'s metrics until `ok` holds, for at most `secs`.
async fn until_metric(url: &str, what: &str, labels: &str, secs: u64, ok: impl Fn(f64) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let v = metric(&get_text(url).await, what, labels);
        if ok(v) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}{{{labels}}} stayed at {v} on {url}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_supernode_rebuilds_a_task_from_peers_when_its_owner_dies() {
    let env = Env::new("takeover");
    let (_origin, origin_url) = env.origin(&[]).await;
    let size = 32usize << 20;
    let piece = fetcher::task_id::piece_size_for(size as i64, fetcher::task_id::DEFAULT_PIECE_SIZE);
    let pieces = size.div_ceil(piece as usize) as f64;
    let want = random_file(&env.path("www/f"), size);
    let url = format!("{origin_url}/files/f");
    let mut sns = env.supernode_cluster(&["sn-a", "sn-b", "sn-c"], &[]).await;
    let list: Vec<String> = sns.iter().map(|(_, g, _)| g.clone()).collect();
    let all = list.join(",");
    let task = fetcher::task_id::task_id(&url, "", &[]).expect("task id");
    let order = fetcher::rendezvous::order(&task, &list);
    let at = |g: &str| list.iter().position(|x| x == g).expect("member");
    let (owner, next) = (at(order[0]), at(order[1]));
    let owner_metrics = format!("{}/metrics", sns[owner].2);
    let next_metrics = format!("{}/metrics", sns[next].2);

    // An agent that has the whole file and keeps seeding it, then hosts that download slowly.
    let (agent, daemon) = env.dfdaemon("agent", &all, &[]).await;
    let out = env.path("agent.out");
    let args: Vec<String> = vec![
        url.clone(),
        "-O".into(),
        out.to_string_lossy().into_owned(),
        "--agent".into(),
        daemon.socket.to_string_lossy().into_owned(),
    ];
    let (code, output) = run(&mut env.spawn("dfget-agent", "dfget", &args)).await;
    assert_eq!(code, 0, "{output}");
    let mut hosts: Vec<_> = (0..3)
        .map(|i| {
            let out = env.path(&format!("out{i}"));
            let args = env.dfget_args(
                &format!("p{i}"),
                &url,
                &out,
                &all,
                &["--limit-rate", "8MiB"],
            );
            (out, env.spawn(&format!("dfget{i}"), "dfget", &args))
        })
        .collect();

    // The owner replicated the whole version to its successor, and the hosts are under way
    // with it (the agent's download took `pieces` assignments).
    until_metric(
        &next_metrics,
        "damselfly_supernode_replica_pieces",
        "",
        30,
        |v| v >= pieces,
    )
    .await;
    until_metric(&owner_metrics, "damselfly_supernode_peers", "", 30, |v| {
        v >= 4.0
    })
    .await;
    until_metric(
        &owner_metrics,
        "damselfly_supernode_assignments_total",
        "",
        30,
        |v| v >= pieces + 6.0,
    )
    .await;
    sns[owner].0.kill9().await;
    let killed = Instant::now();

    for (out, p) in &mut hosts {
        let (code, output) = run(p).await;
        if code != 0 {
            env.dump_logs();
        }
        assert_eq!(code, 0, "{output}");
        assert_eq!(sha256_file(out), want);
        assert!(output.contains("trying the next"), "no failover: {output}");
    }
    let waited = killed.elapsed();
    // At 8 MiB/s each host needs 4 s for the whole file: the takeover costs it seconds, not a
    // restart from scratch behind a re-seed.
    assert!(
        waited < Duration::from_secs(20),
        "hosts finished {waited:?} after the kill"
    );

    let origin = origin_bytes(&origin_url).await as f64;
    let m = get_text(&next_metrics).await;
    eprintln!(
        "takeover: origin bytes {:.2} x size, rebuilt pieces from peers {}, from the origin {}, hosts done {:.1} s after the kill",
        origin / size as f64,
        metric(
            &m,
            "damselfly_supernode_rebuilt_pieces_total",
            "from=\"peer\""
        ),
        metric(
            &m,
            "damselfly_supernode_rebuilt_pieces_total",
            "from=\"origin\""
        ) + 0.0,
        waited.as_secs_f64()
    );
    if origin > 1.1 * size as f64 {
        env.dump_logs();
    }
    assert!(
        origin <= 1.1 * size as f64,
        "the origin served {origin} bytes for a {size}-byte task: the new owner re-seeded\n{m}"
    );
    assert!(
        metric(
            &m,
            "damselfly_supernode_rebuilt_pieces_total",
            "from=\"peer\""
        ) >= pieces * 0.9,
        "{m}"
    );
    // The agent went on seeding through the new owner.
    until_metric(&next_metrics, "damselfly_supernode_peers", "", 10, |v| {
        v >= 1.0
    })
    .await;
    let agent_log = agent.output();
    assert!(
        agent_log.contains("registering with the next one"),
        "{agent_log}"
    );
}

fn replica(task: char, pieces: u32) -> Replica {
    let hex = |c: char| -> String { std::iter::repeat_n(c, 64).collect() };
    let ps = 64 * 1024;
    Replica {
        task_id: hex(task),
        version_id: hex('b'),
        content_length: i64::from(pieces) * i64::from(ps),
        piece_size: ps,
        first_piece: 0,
        pieces: (0..pieces)
            .map(|n| PieceInfo {
                piece: n,
                offset: u64::from(n) * u64::from(ps),
                size: ps,
                sha256: hex('a'),
            })
            .collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_clusters_supernodes_may_replicate_task_metadata() {
    let env = Env::new("replica-trust");
    // A cluster of this supernode and another one at 127.0.0.1 (not running).
    let me = format!("127.0.0.1:{}", damselfly_tests::harness::free_port());
    let other = format!("127.0.0.1:{}", damselfly_tests::harness::free_port());
    let members = format!("{me},{other}");
    let args = [
        "--grpc-addr",
        me.as_str(),
        "--cluster-address",
        me.as_str(),
        "--cluster-supernode",
        members.as_str(),
    ];
    let (_sn, grpc, http) = env.supernode("sn", &args).await;
    let client = |sans: &'static [&'static str]| {
        let grpc = grpc.clone();
        async move {
            let tls = damselfly_tests::cluster::host_tls_for("caller", sans);
            let ch = fetcher::download::supernode_channel(&grpc, Some(&tls))
                .await
                .expect("connect");
            ClusterClient::new(ch)
        }
    };

    // A cluster host whose certificate names another address than the supernodes': refused.
    let mut outsider = client(&["127.0.0.9"]).await;
    let e = outsider
        .replicate(replica('1', 2))
        .await
        .expect_err("outsider");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");

    // The other supernode's certificate (it names 127.0.0.1): heard, and checked.
    let mut member = client(&["127.0.0.1"]).await;
    let ack = member.replicate(replica('1', 2)).await.expect("member");
    assert_eq!(ack.into_inner().pieces, 2);
    let mut bad = replica('2', 2);
    bad.pieces[1].offset = 7;
    let e = member.replicate(bad).await.expect_err("malformed");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("out of place"), "{e:?}");

    let m = get_text(&format!("{http}/metrics")).await;
    assert_eq!(
        metric(&m, "damselfly_supernode_replica_pieces", ""),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "damselfly_supernode_replica_messages_total",
            "dir=\"refused\""
        ),
        2.0,
        "{m}"
    );
}
