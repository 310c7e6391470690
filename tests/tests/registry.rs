//! dfdaemon as a registry mirror, against a real `docker-registry` and real `skopeo`.

use std::time::Duration;

use damselfly_tests::harness::{Env, Proc, free_port};
use damselfly_tests::registry::{
    count_blob_gets, oci_blobs, push_test_image, skopeo_copy_to_oci, start_registry, tools_missing,
};

/// Starts a dfdaemon mirroring `registry`; returns it and its proxy address.
async fn agent(env: &Env, name: &str, supernode: &str, registry: &str) -> (Proc, String) {
    let (p, d) = env
        .dfdaemon(
            name,
            supernode,
            &["--registry-mirror", &format!("http://{registry}")],
        )
        .await;
    (p, d.proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pulls_through_mirrors_with_one_registry_fetch_per_layer() {
    if let Some(why) = tools_missing() {
        damselfly_tests::harness::skip(
            "skopeo_pulls_through_mirrors_with_one_registry_fetch_per_layer",
            &why,
        );
        return;
    }
    let env = Env::new("registry-mirror");
    let (registry_proc, registry) = start_registry(&env).await;
    let layers = push_test_image(&env, &registry, "project/app:v1", 24 << 20).await;
    assert_eq!(layers.len(), 4);
    let (_sn, grpc, _) = env.supernode("sn", &[]).await;
    let mut agents = Vec::new();
    for i in 0..3 {
        agents.push(agent(&env, &format!("agent{i}"), &grpc, &registry).await);
    }
    // Three hosts pull at once through their own agent.
    let pulls = agents.iter().enumerate().map(|(i, (_, proxy))| {
        let dest = env.path(&format!("pulled{i}"));
        let src = format!("{proxy}/project/app:v1");
        async move { (skopeo_copy_to_oci(&src, &dest).await, dest) }
    });
    let results = futures::future::join_all(pulls).await;
    for ((code, output), _) in &results {
        if *code != 0 {
            env.dump_logs();
        }
        assert_eq!(*code, 0, "skopeo through the mirror failed: {output}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = registry_proc.output();
    for layer in &layers {
        let gets = count_blob_gets(&log, layer);
        // Exactly one: the supernode's seed fetch; the three clients got it P2P.
        assert_eq!(
            gets, 1,
            "the registry served layer {layer} {gets} times to 3 mirrored pulls"
        );
    }
    // The same image pulled directly is identical, blob for blob.
    let direct = env.path("direct");
    let (code, output) = skopeo_copy_to_oci(&format!("{registry}/project/app:v1"), &direct).await;
    assert_eq!(code, 0, "{output}");
    for (_, dest) in &results {
        assert_eq!(
            oci_blobs(dest),
            oci_blobs(&direct),
            "{} differs from the direct pull",
            dest.display()
        );
        assert_eq!(
            std::fs::read(dest.join("index.json")).expect("index"),
            std::fs::read(direct.join("index.json")).expect("index"),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_and_unreachable_registries_get_clear_errors() {
    // Needs no registry tools: the upstream is a closed port.
    let env = Env::new("registry-errors");
    let (_sn, grpc, _) = env.supernode("sn", &[]).await;
    let dead = format!("127.0.0.1:{}", free_port());
    let (_agent, proxy) = agent(&env, "agent", &grpc, &dead).await;
    let client = reqwest::Client::new();
    let r = client
        .get(format!("http://{proxy}/v2/"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 502);
    assert!(r.text().await.expect("body").contains("unreachable"));
    let blob = format!(
        "http://{proxy}/v2/project/app/blobs/sha256:{}",
        "a".repeat(64)
    );
    let r = client.get(blob).send().await.expect("request");
    assert_eq!(r.status().as_u16(), 502);
    let r = client
        .get(format!("http://{proxy}/elsewhere"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 404);
    // The proxy keeps serving after bad requests.
    let r = client
        .get(format!("http://{proxy}/v2/"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_that_does_not_match_its_digest_is_refused_and_not_shared() {
    let env = Env::new("registry-lying");
    // The test origin plays a registry whose storage returns wrong bytes for one digest.
    let (_origin, origin_url) = env.origin(&[]).await;
    let good = env.origin_blob(6 << 20);
    let claimed = "b".repeat(64);
    damselfly_tests::harness::random_file(&env.path(&format!("www/blob-{claimed}")), 6 << 20);
    let (_sn, grpc, _) = env.supernode("sn", &[]).await;
    let registry = origin_url.trim_start_matches("http://").to_owned();
    let (_a, proxy_a) = agent(&env, "agent-a", &grpc, &registry).await;
    let (_b, proxy_b) = agent(&env, "agent-b", &grpc, &registry).await;
    let client = reqwest::Client::new();

    let ok = client
        .get(format!(
            "http://{proxy_a}/v2/project/app/blobs/sha256:{good}"
        ))
        .send()
        .await
        .expect("get");
    assert_eq!(ok.status().as_u16(), 200);
    let body = ok.bytes().await.expect("body");
    assert_eq!(fetcher::piece::sha256_hex(&body), good);

    for proxy in [&proxy_a, &proxy_b] {
        let url = format!("http://{proxy}/v2/project/app/blobs/sha256:{claimed}");
        let got = match client.get(url).send().await {
            Ok(r) => r.bytes().await.map(|b| b.to_vec()),
            Err(e) => Err(e),
        };
        if let Ok(bytes) = got {
            assert_ne!(
                fetcher::piece::sha256_hex(&bytes),
                claimed,
                "impossible: wrong bytes hashed right"
            );
            assert!(
                bytes.len() < 6 << 20,
                "a client received the whole unverified blob from {proxy}"
            );
        }
    }
    // The supernode keeps the good blob and discarded the lying one.
    let cached = damselfly_tests::harness::disk_usage(&env.path("sn"));
    assert!(
        cached < (6 << 20) + (1 << 20),
        "the supernode cache holds {cached} bytes: the bad blob was kept"
    );
}

/// Sends raw bytes to `addr` and returns the status code of the first answer.
async fn raw_status(addr: &str, request: &[u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // The server may answer (and close) before reading everything: ignore write errors.
    let _ = s.write_all(request).await;
    let mut buf = vec![0u8; 1024];
    let mut got = 0;
    while got < 12 {
        match s.read(&mut buf[got..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    let line = String::from_utf8_lossy(&buf[..got]).into_owned();
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_gets_4xx_and_malformed_manifests_pass_through_untouched() {
    let env = Env::new("registry-bad-input");
    let (_origin, origin_url) = env.origin(&[]).await;
    // Not JSON at all, with bytes that are not UTF-8: the proxy must not parse or alter it.
    let mut manifest = br#"{"schemaVersion": 2, "layers": [ {"digest": "sha256:nothex""#.to_vec();
    manifest.extend_from_slice(&[0xff, 0x00, 0xfe, b'\n']);
    std::fs::write(env.path("www/manifest-v1"), &manifest).expect("write manifest");
    let (_sn, grpc, _) = env.supernode("sn", &[]).await;
    let registry = origin_url.trim_start_matches("http://").to_owned();
    let (_a, proxy) = agent(&env, "agent", &grpc, &registry).await;

    let r = reqwest::get(format!("http://{proxy}/v2/project/app/manifests/v1"))
        .await
        .expect("manifest");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/vnd.oci.image.manifest.v1+json")
    );
    assert_eq!(r.bytes().await.expect("body").to_vec(), manifest);

    let huge = format!(
        "GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Filler: {}\r\n\r\n",
        "a".repeat(200 * 1024)
    );
    let s = raw_status(&proxy, huge.as_bytes()).await;
    assert!(s == 431 || s == 400, "oversized header block got {s}");
    let s = raw_status(&proxy, b"GET /v2/ HTTP/1.1\r\nHost x\r\nBad Header\r\n\r\n").await;
    assert_eq!(s, 400, "malformed header");
    let s = raw_status(&proxy, b"\x16\x03\x01garbage that is not HTTP\r\n\r\n").await;
    assert_eq!(s, 400, "not HTTP");
    let s = raw_status(&proxy, b"CONNECT nowhere HTTP/1.1\r\nHost: nowhere\r\n\r\n").await;
    assert!((400..500).contains(&s), "CONNECT without a port got {s}");
    // Still serving.
    let r = reqwest::get(format!("http://{proxy}/v2/project/app/manifests/v1"))
        .await
        .expect("manifest again");
    assert_eq!(r.status().as_u16(), 200);
    let ca = reqwest::get(format!("http://{proxy}/ca.crt"))
        .await
        .expect("ca");
    assert_eq!(ca.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_blobs_redirected_to_object_storage_are_one_task_per_digest() {
    let env = Env::new("registry-redirect");
    // A registry that wants a bearer token and keeps blobs in an object store (307 to a URL with
    // a fresh signature on every request).
    let (_origin, origin_url) = env.origin(&["--bearer", "s3cret"]).await;
    let size = 6 << 20;
    let hex = env.origin_blob(size);
    std::fs::write(env.path(&format!("www/redirect-blob-{hex}")), "").expect("marker");
    let (_sn, grpc, _) = env.supernode("sn", &[]).await;
    let registry = origin_url.trim_start_matches("http://").to_owned();
    let (_a, proxy_a) = agent(&env, "agent-a", &grpc, &registry).await;
    let (_b, proxy_b) = agent(&env, "agent-b", &grpc, &registry).await;
    let client = reqwest::Client::new();

    let r = client
        .get(format!(
            "http://{proxy_a}/v2/project/app/blobs/sha256:{hex}"
        ))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 401, "no token");
    let challenge = r
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        challenge.contains(&format!("realm=\"http://{proxy_a}/_damselfly/token?realm=")),
        "mirror mode must point the token realm at the agent: {challenge}"
    );
    for (proxy, repo) in [(&proxy_a, "project/app"), (&proxy_b, "other/name")] {
        let r = client
            .get(format!("http://{proxy}/v2/{repo}/blobs/sha256:{hex}"))
            .bearer_auth("s3cret")
            .send()
            .await
            .expect("get");
        assert_eq!(r.status().as_u16(), 200);
        let body = r.bytes().await.expect("body");
        assert_eq!(fetcher::piece::sha256_hex(&body), hex);
    }
    // One origin fetch (the supernode's, through the redirect): the signed URLs never entered the
    // task key, and the second agent's pull of the same digest under another name was P2P.
    let served = damselfly_tests::harness::origin_bytes(&origin_url).await;
    assert!(
        served >= size as u64 && served < size as u64 + (64 << 10),
        "the origin served {served} bytes for one {size}-byte blob pulled twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_reaches_only_registries_its_origin_policy_allows() {
    use futures::FutureExt;
    // Needs no registry tools: the configured mirror is the test origin, and an internal service
    // on loopback is a bare listener that must never see a connection.
    let env = Env::new("registry-policy");
    let (_origin, origin) = env.origin(&[]).await;
    let (_sn, grpc, _) = env.supernode("sn", &[]).await;
    let (_agent, d) = env
        .strict_dfdaemon("agent", &grpc, &["--registry-mirror", &origin])
        .await;
    let internal = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = internal.local_addr().expect("addr").port();
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let get = |url: String| {
        let client = client.clone();
        async move {
            let r = client.get(url).send().await.expect("request");
            (r.status().as_u16(), r.text().await.expect("body"))
        }
    };

    // The mirror the operator configured is reached although it is on loopback.
    let (status, body) = get(format!("http://{}/v2/", d.proxy)).await;
    assert!(
        status != 403 && !body.contains("origin policy"),
        "the configured mirror was refused: {status} {body}"
    );
    // Registries a client names on loopback, by address or by a name resolving there: refused.
    for ns in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
        let (status, body) = get(format!("http://{}/v2/?ns={ns}", d.proxy)).await;
        assert!(
            matches!(status, 403 | 502) && body.contains("origin policy"),
            "?ns={ns}: {status} {body}"
        );
    }
    // A plain-HTTP proxy request to the internal service: refused too.
    let via = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{}", d.proxy)).expect("proxy"))
        .build()
        .expect("client");
    let r = via
        .get(format!("http://127.0.0.1:{port}/latest/meta-data"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 403);
    // Each refusal came before any connection (the answers are in): nothing reached it.
    assert!(
        internal.accept().now_or_never().is_none(),
        "the internal service was contacted"
    );
    assert!(
        d.metric("damselfly_proxy_requests_total", "kind=\"refused\"")
            .await
            >= 2.0
    );
}
