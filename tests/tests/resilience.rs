//! Peers and supernodes that die or lie: kill -9 and resume, a corrupting parent, no supernode
//! at all (a supernode that dies: `takeover.rs`).

use std::time::Duration;

use damselfly_tests::harness::{
    Env, free_port, get_text, metric, random_file, run, sha256_file, summary_field,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_peer_resumes_and_others_finish() {
    let env = Env::new("resume");
    let (_origin, origin_url) = env.origin(&[]).await;
    let size = 64usize << 20;
    let want = random_file(&env.path("www/f"), size);
    let (_sn, grpc, _) = env.supernode("sn", &[]).await;
    let url = format!("{origin_url}/files/f");
    // Slow every peer down so the kill lands mid-download.
    let slow = ["--limit-rate", "16MiB"];
    let mut victims = env.spawn(
        "victim",
        "dfget",
        &env.dfget_args("victim", &url, &env.path("victim.out"), &grpc, &slow),
    );
    let mut others: Vec<_> = (0..2)
        .map(|i| {
            let out = env.path(&format!("other{i}.out"));
            (
                out.clone(),
                env.spawn(
                    &format!("other{i}"),
                    "dfget",
                    &env.dfget_args(&format!("other{i}"), &url, &out, &grpc, &slow),
                ),
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1800)).await;
    victims.kill9().await;
    assert!(
        !env.path("victim.out").exists(),
        "a killed download must leave no output"
    );
    let leftovers: Vec<_> = std::fs::read_dir(env.dir.path())
        .expect("ls")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".victim.out"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "a killed download left temporary files: {leftovers:?}"
    );
    for (out, p) in &mut others {
        let (code, output) = run(p).await;
        assert_eq!(code, 0, "survivor failed: {output}");
        assert_eq!(sha256_file(out), want);
    }
    // Rerun the victim with the same store: it keeps its verified pieces.
    let args = env.dfget_args("victim", &url, &env.path("victim.out"), &grpc, &[]);
    let (code, output) = run(&mut env.spawn("victim-again", "dfget", &args)).await;
    assert_eq!(code, 0, "{output}");
    assert_eq!(sha256_file(&env.path("victim.out")), want);
    let reused = summary_field(&output, "reused").expect("reused");
    let fetched = summary_field(&output, "peers").unwrap_or(0)
        + summary_field(&output, "supernode").unwrap_or(0);
    assert!(reused > 0, "the rerun reused nothing: {output}");
    assert!(
        fetched < size as u64,
        "the rerun fetched {fetched} bytes, the whole file is {size}"
    );
    assert_eq!(reused + fetched, size as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupting_parent_is_detected_and_isolated() {
    let env = Env::new("corrupt");
    let (_origin, origin_url) = env.origin(&[]).await;
    let size = 40usize << 20;
    let want = random_file(&env.path("www/f"), size);
    let (_sn, grpc, http) = env.supernode("sn", &[]).await;
    let url = format!("{origin_url}/files/f");
    let mut evil_args: Vec<String> = vec![
        url.clone(),
        "--supernode".into(),
        grpc.clone(),
        "--data-dir".into(),
        env.path("evil").to_string_lossy().into_owned(),
        "-O".into(),
        env.path("evil.out").to_string_lossy().into_owned(),
    ];
    evil_args.extend(damselfly_tests::cluster::flags("evil"));
    let evil = env.spawn("evil", "damselfly-evil-peer", &evil_args);
    let start = std::time::Instant::now();
    while !evil.output().contains("seeding") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "evil peer never got ready: {}",
            evil.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut procs: Vec<_> = (0..3)
        .map(|i| {
            let out = env.path(&format!("out{i}"));
            (
                out.clone(),
                env.spawn(
                    &format!("dfget{i}"),
                    "dfget",
                    &env.dfget_args(&format!("p{i}"), &url, &out, &grpc, &[]),
                ),
            )
        })
        .collect();
    let mut failures = 0;
    for (out, p) in &mut procs {
        let (code, output) = run(p).await;
        assert_eq!(code, 0, "{output}");
        assert_eq!(
            sha256_file(out),
            want,
            "a corrupted byte reached the output"
        );
        failures += summary_field(&output, "verify_failures").expect("verify_failures");
    }
    let m = get_text(&format!("{http}/metrics")).await;
    assert!(
        failures >= 1,
        "the corrupting parent was never used, so nothing was tested"
    );
    // Until two hosts have reported it, the bad parent serves what its 8 upload slots hold (the
    // default), again as slots free up: a few rounds of them at most (measured 15 with 256 KiB pieces).
    assert!(
        failures <= 3 * 8,
        "{failures} bad pieces: the bad parent was not isolated quickly"
    );
    assert!(
        metric(&m, "damselfly_supernode_isolations_total", "scope=\"task\"") >= 1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "damselfly_supernode_piece_failures_total",
            "DIGEST_MISMATCH"
        ) >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_supernodes_back_to_source_or_a_clear_refusal() {
    let env = Env::new("nosupernode");
    let (_origin, origin_url) = env.origin(&[]).await;
    let want = random_file(&env.path("www/f"), 6 << 20);
    let url = format!("{origin_url}/files/f");
    let dead = format!("127.0.0.1:{}", free_port());

    let out = env.path("auto.out");
    let (code, output) = run(&mut env.spawn(
        "auto",
        "dfget",
        &env.dfget_args("p", &url, &out, &dead, &[]),
    ))
    .await;
    assert_eq!(code, 0, "{output}");
    assert_eq!(sha256_file(&out), want);
    assert_eq!(summary_field(&output, "origin"), Some(6 << 20));

    let out = env.path("never.out");
    let args = env.dfget_args("q", &url, &out, &dead, &["--back-source", "never"]);
    let (code, output) = run(&mut env.spawn("never", "dfget", &args)).await;
    assert_eq!(code, 3, "{output}");
    assert!(
        output.contains("dfget: error: no supernode reachable"),
        "{output}"
    );
    assert!(!out.exists());
}
