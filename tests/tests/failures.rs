//! What goes wrong at the origin reaches the user as one clear line, a non-zero exit, and no file.

use damselfly_tests::harness::{Env, free_port, random_file, run, sha256_file};

fn error_line(output: &str) -> String {
    output
        .lines()
        .find(|l| l.starts_with("dfget: error:"))
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_failures_give_clear_errors_and_no_file() {
    let env = Env::new("origin-errors");
    let (_origin, origin_url) = env.origin(&[]).await;
    random_file(&env.path("www/f"), 3 << 20);
    let (_sn, grpc, _) = env.supernode("sn", &[]).await;
    let refused = format!("http://127.0.0.1:{}/files/f", free_port());
    let cases: Vec<(String, &str)> = vec![
        (format!("{origin_url}/status/401/f"), "HTTP 401"),
        (format!("{origin_url}/status/403/f"), "HTTP 403"),
        (format!("{origin_url}/status/404/f"), "HTTP 404"),
        (format!("{origin_url}/status/500/f"), "HTTP 500"),
        (refused, "unreachable"),
        (format!("{origin_url}/short/f"), "broken body"),
    ];
    for (i, (url, cause)) in cases.iter().enumerate() {
        let out = env.path(&format!("out{i}"));
        let args = env.dfget_args("peer", url, &out, &grpc, &["--back-source", "never"]);
        let mut p = env.spawn(&format!("dfget{i}"), "dfget", &args);
        let (code, output) = run(&mut p).await;
        let line = error_line(&output);
        assert_eq!(code, 4, "{url}: expected exit 4, got {code}: {output}");
        assert!(
            line.contains(cause),
            "{url}: error line {line:?} does not name {cause:?}"
        );
        assert!(
            line.contains(url.as_str()),
            "{url}: error line {line:?} does not name the URL"
        );
        assert!(
            !out.exists(),
            "{url}: {} exists after a failure",
            out.display()
        );
        let leftovers: Vec<_> = std::fs::read_dir(env.dir.path())
            .expect("ls")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_header_reaches_the_origin_and_is_checked_per_peer() {
    let env = Env::new("auth");
    let (_origin, origin_url) = env.origin(&["--bearer", "s3cret"]).await;
    let want = random_file(&env.path("www/private"), 5 << 20);
    let (_sn, grpc, _) = env.supernode("sn", &[]).await;
    let url = format!("{origin_url}/auth/private");

    let out = env.path("with-token");
    let args = env.dfget_args(
        "p1",
        &url,
        &out,
        &grpc,
        &["-H", "Authorization: Bearer s3cret"],
    );
    let (code, output) = run(&mut env.spawn("dfget-ok", "dfget", &args)).await;
    assert_eq!(code, 0, "{output}");
    assert_eq!(sha256_file(&out), want);

    // The supernode now holds the content; a peer without the token must still be refused.
    let out = env.path("without-token");
    let args = env.dfget_args("p2", &url, &out, &grpc, &[]);
    let (code, output) = run(&mut env.spawn("dfget-denied", "dfget", &args)).await;
    assert_eq!(code, 4, "{output}");
    assert!(error_line(&output).contains("HTTP 401"), "{output}");
    assert!(!out.exists());

    let out = env.path("wrong-token");
    let args = env.dfget_args(
        "p3",
        &url,
        &out,
        &grpc,
        &["-H", "Authorization: Bearer guess"],
    );
    let (code, output) = run(&mut env.spawn("dfget-wrong", "dfget", &args)).await;
    assert_eq!(code, 4, "{output}");
    assert!(!out.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_origin_content_is_a_new_version_never_a_mix() {
    let env = Env::new("change");
    let (_origin, origin_url) = env.origin(&[]).await;
    let first = random_file(&env.path("www/f"), 9 << 20);
    let (_sn, grpc, _) = env.supernode("sn", &[]).await;
    let url = format!("{origin_url}/files/f");
    let out1 = env.path("out1");
    let args = env.dfget_args("peer", &url, &out1, &grpc, &[]);
    let (code, output) = run(&mut env.spawn("dfget1", "dfget", &args)).await;
    assert_eq!(code, 0, "{output}");
    assert_eq!(sha256_file(&out1), first);

    std::thread::sleep(std::time::Duration::from_millis(20));
    let second = random_file(&env.path("www/f"), 9 << 20);
    assert_ne!(first, second);
    let out2 = env.path("out2");
    // Same peer store and same supernode: both hold pieces of the old version.
    let args = env.dfget_args("peer", &url, &out2, &grpc, &[]);
    let (code, output) = run(&mut env.spawn("dfget2", "dfget", &args)).await;
    assert_eq!(code, 0, "{output}");
    assert_eq!(
        sha256_file(&out2),
        second,
        "second download must be the new content"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_space_is_refused_before_downloading() {
    let env = Env::new("nospace");
    if !damselfly_tests::harness::is_root() {
        damselfly_tests::harness::skip(
            "no_space_is_refused_before_downloading",
            "mounting a tmpfs needs root",
        );
        return;
    }
    let small = env.path("small");
    std::fs::create_dir_all(&small).expect("mkdir");
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=10m", "tmpfs"])
        .arg(&small)
        .status()
        .expect("mount");
    assert!(st.success(), "mount tmpfs failed");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(small.clone());
    let (_origin, origin_url) = env.origin(&[]).await;
    random_file(&env.path("www/f"), 50 << 20);
    let (_sn, grpc, _) = env.supernode("sn", &[]).await;
    let out = small.join("out");
    let args = env.dfget_args("peer", &format!("{origin_url}/files/f"), &out, &grpc, &[]);
    let (code, output) = run(&mut env.spawn("dfget", "dfget", &args)).await;
    assert_eq!(code, 5, "{output}");
    assert!(
        error_line(&output).contains("not enough disk space"),
        "{output}"
    );
    assert_eq!(
        std::fs::read_dir(&small).expect("ls").count(),
        0,
        "nothing may be left on the small disk"
    );
    let peer_bytes: u64 = damselfly_tests::harness::disk_usage(&env.path("peer"));
    assert!(
        peer_bytes < 1 << 20,
        "{peer_bytes} bytes downloaded into the store despite the refusal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_followed_and_wrong_digests_refused() {
    let env = Env::new("redirect-digest");
    let (_origin, origin_url) = env.origin(&[]).await;
    let want = random_file(&env.path("www/f"), 5 << 20);
    let (_sn, grpc, _) = env.supernode("sn", &[]).await;

    let out = env.path("redirected");
    let url = format!("{origin_url}/redirect/f");
    let args = env.dfget_args(
        "p1",
        &url,
        &out,
        &grpc,
        &["--digest", &format!("sha256:{want}")],
    );
    let (code, output) = run(&mut env.spawn("dfget-redirect", "dfget", &args)).await;
    assert_eq!(code, 0, "{output}");
    assert_eq!(sha256_file(&out), want);

    let out = env.path("wrong-digest");
    let wrong = format!("sha256:{}", "0".repeat(64));
    let args = env.dfget_args(
        "p2",
        &format!("{origin_url}/files/f"),
        &out,
        &grpc,
        &["--digest", &wrong],
    );
    let (code, output) = run(&mut env.spawn("dfget-digest", "dfget", &args)).await;
    assert_eq!(code, 6, "{output}");
    assert!(error_line(&output).contains("digest mismatch"), "{output}");
    assert!(!out.exists());

    let args = env.dfget_args(
        "p3",
        &format!("{origin_url}/files/f"),
        &out,
        &grpc,
        &["--digest", "md5:abc"],
    );
    let (code, output) = run(&mut env.spawn("dfget-bad-digest", "dfget", &args)).await;
    assert_eq!(code, 2, "{output}");
    assert!(error_line(&output).contains("invalid digest"), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supernode_cache_is_bounded_by_lru_eviction() {
    let env = Env::new("cache");
    let (_origin, origin_url) = env.origin(&[]).await;
    for name in ["a", "b", "c"] {
        random_file(&env.path(&format!("www/{name}")), 6 << 20);
    }
    let (_sn, grpc, http) = env.supernode("sn", &["--cache-size", "10MiB"]).await;
    for name in ["a", "b", "c"] {
        let out = env.path(&format!("{name}.out"));
        let args = env.dfget_args(
            &format!("p-{name}"),
            &format!("{origin_url}/files/{name}"),
            &out,
            &grpc,
            &[],
        );
        let (code, output) = run(&mut env.spawn(&format!("dfget-{name}"), "dfget", &args)).await;
        assert_eq!(code, 0, "{output}");
    }
    // Eviction runs every few seconds.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let m = damselfly_tests::harness::get_text(&format!("{http}/metrics")).await;
        let evicted =
            damselfly_tests::harness::metric(&m, "damselfly_supernode_evictions_total", "");
        let usage = damselfly_tests::harness::disk_usage(&env.path("sn"));
        if evicted >= 1.0 && usage <= 10 << 20 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "cache not bounded: {usage} bytes on disk, {evicted} evictions"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_never_grows_the_cache_past_cache_size() {
    // Review finding 11: one request for a never-ending origin filled a 20 MiB cache to 301 MB.
    let env = Env::new("cache-bound");
    let (_origin, origin) = env.origin(&[]).await;
    let (sn, grpc, _) = env.supernode("sn", &["--cache-size", "20MiB"]).await;
    let out = env.path("endless.out");
    let url = format!("{origin}/endless");
    let args = env.dfget_args("p", &url, &out, &grpc, &["--back-source", "never"]);
    let (code, output) = run(&mut env.spawn("dfget", "dfget", &args)).await;
    assert_ne!(code, 0, "an endless download succeeded: {output}");
    assert!(
        sn.output().contains("larger than the seed cache"),
        "{}",
        sn.output()
    );
    let served = damselfly_tests::harness::origin_bytes(&origin).await;
    assert!(
        served <= (20 << 20) + (16 << 20),
        "the origin streamed {served} bytes into a 20 MiB cache"
    );
    let used = damselfly_tests::harness::disk_usage(&env.path("sn"));
    assert!(used <= 20 << 20, "the cache holds {used} bytes");
    // The supernode goes on serving what fits.
    let want = random_file(&env.path("www/small"), 1 << 20);
    let small = env.path("small.out");
    let args = env.dfget_args("q", &format!("{origin}/files/small"), &small, &grpc, &[]);
    let (code, output) = run(&mut env.spawn("dfget-small", "dfget", &args)).await;
    assert_eq!(code, 0, "{output}");
    assert_eq!(sha256_file(&small), want);
}

/// A registry whose token server answers every scope with a 1 MiB token that claims to live for
/// 30 years: its base URL.
async fn hostile_token_server() -> String {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let challenge = format!("Bearer realm=\"http://{addr}/token\",service=\"flood\"");
    let app = axum::Router::new()
        .route(
            "/v2/",
            axum::routing::get(move || async move {
                (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, challenge)],
                )
                    .into_response()
            }),
        )
        .route(
            "/token",
            axum::routing::get(|| async {
                let token = "t".repeat((1 << 20) - 64);
                format!(r#"{{"token":"{token}","expires_in":1000000000}}"#)
            }),
        );
    tokio::spawn(async move { axum::serve(l, app).await });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_flood_leaves_the_supernode_within_its_bounds() {
    // Review finding 8: 400 Token calls answered with 1 MiB long-lived tokens took the
    // supernode from 16 MB to 433 MB, never freed. Its token cache keeps at most 32 MiB of
    // answers: VmHWM must grow by less than 96 MiB (cache + answers in flight), and it serves on.
    use futures::StreamExt;
    let env = Env::new("token-flood");
    let (sn, grpc, http) = env.supernode("sn", &[]).await;
    let registry = hostile_token_server().await;
    let client = damselfly_tests::cluster::scheduler(&grpc).await;
    let ask = |i: u32| {
        let mut client = client.clone();
        let registry = registry.clone();
        async move {
            client
                .token(proto::scheduler::TokenRequest {
                    url: format!("{registry}/token?service=flood&scope=repository:r{i}:pull"),
                    authorization: None,
                    registry,
                })
                .await
                .map(|r| r.into_inner())
        }
    };
    let first = ask(0).await.expect("a token through the supernode");
    assert_eq!(first.status, 200);
    let before = damselfly_tests::host::vm_hwm(sn.pid());
    let answers: Vec<_> = futures::stream::iter(1..400)
        .map(ask)
        .buffer_unordered(8)
        .collect()
        .await;
    for a in &answers {
        let a = a.as_ref().expect("token answer");
        assert_eq!(a.status, 200);
        assert!(a.body.len() > 1 << 19);
    }
    let grew = damselfly_tests::host::vm_hwm(sn.pid()).saturating_sub(before);
    eprintln!(
        "token flood: supernode VmHWM +{:.1} MiB",
        grew as f64 / 1048576.0
    );
    assert!(
        grew < 96 << 20,
        "400 token answers raised the supernode's VmHWM by {grew} bytes"
    );
    let again = ask(400).await.expect("the supernode still answers");
    assert_eq!(again.status, 200);
    assert!(
        damselfly_tests::harness::get_text(&format!("{http}/healthz"))
            .await
            .contains("ok")
    );
}
