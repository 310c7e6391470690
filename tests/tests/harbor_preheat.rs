//! Harbor's P2P preheat against a supernode of two: the requests Harbor's Dragonfly driver makes
//! (`damselfly_tests::harbor`), against a Harbor-like registry (TLS, token auth from a token
//! server that signs JWTs, a private repository). The job for the image's manifest URL, with the
//! repository's pull token in its headers as Harbor sends it, ends `SUCCESS` listing every layer;
//! the registry served each layer once. A second job, of scope `all_peers`, has an agent subscribed
//! to the supernode fetch every layer from the seed (the registry serves nothing more); that
//! agent's later pull then downloads nothing at all, and the layer indexes lazy starts read come
//! from the supernode.
//! The personal access token (the admin token) is required; a job for a missing tag ends
//! `FAILURE` naming the registry's answer.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use damselfly_tests::harbor::{Driver, Status};
use damselfly_tests::harness::{Env, agent_layer_index, get_text, metric};
use damselfly_tests::pki::{REGISTRY_HOST, ensure_hosts_entry, make_pki};
use damselfly_tests::registry::{
    CREDS, RegistryAuth, count_blob_gets, oci_blobs, push_test_image_as, skopeo,
    start_registry_with, start_token_server, test_client, tools_missing,
};

const ADMIN_TOKEN: &str = "harbor-preheat-personal-access-token";

/// A pull token for `repo` from the token server, as Harbor mints one for its preheat requests.
async fn pull_token(realm: &str, ca: &std::path::Path, repo: &str) -> String {
    let (user, pass) = CREDS.split_once(':').unwrap_or_default();
    let r = test_client(Some(ca))
        .get(realm)
        .query(&[
            ("service", "damselfly-registry"),
            ("scope", &format!("repository:{repo}:pull")),
        ])
        .basic_auth(user, Some(pass))
        .send()
        .await
        .expect("token request");
    assert_eq!(r.status().as_u16(), 200, "pull token");
    let v: serde_json::Value = serde_json::from_str(&r.text().await.expect("body")).expect("json");
    v["token"].as_str().expect("token field").to_owned()
}

/// A supernode's metrics (over cluster TLS).
async fn client_metrics(http: &str) -> String {
    let r = damselfly_tests::cluster::http_client()
        .get(format!("{http}/metrics"))
        .send()
        .await
        .expect("metrics");
    r.text().await.unwrap_or_default()
}

/// Polls the job until Harbor would stop polling it (success or failure), or panics.
async fn wait_job(driver: &Driver, id: &str) -> Status {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match driver.check_progress(id).await {
            Ok(Status::Running) => {}
            Ok(done) => return done,
            Err(e) => panic!("job {id}: Harbor's driver would fail the task: {e}"),
        }
        assert!(Instant::now() < deadline, "job {id} still running");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harbor_preheat_seeds_each_layer_once_and_later_pulls_take_nothing_from_the_registry() {
    let name =
        "harbor_preheat_seeds_each_layer_once_and_later_pulls_take_nothing_from_the_registry";
    if let Some(why) = tools_missing().or_else(|| ensure_hosts_entry().err()) {
        damselfly_tests::harness::skip(name, &why);
        return;
    }
    let env = Env::new("harbor-preheat");
    let pki = make_pki(&env);
    let (_ts, realm) = start_token_server(&env, &pki, &[CREDS], &["project/app=alice"]).await;
    let auth = RegistryAuth::Token {
        realm: realm.clone(),
    };
    let (registry_proc, registry) = start_registry_with(&env, Some(&pki), auth).await;
    let layers = push_test_image_as(&env, &registry, "project/app:v1", 1 << 20, Some(CREDS)).await;
    let setup_log = registry_proc.output();
    let served = |layer: &str| {
        count_blob_gets(&registry_proc.output(), layer) - count_blob_gets(&setup_log, layer)
    };

    let ca = pki.ca_crt.to_string_lossy().into_owned();
    std::fs::write(env.path("admin-token"), ADMIN_TOKEN).expect("admin token");
    let token_file = env.path("admin-token").to_string_lossy().into_owned();
    // Two supernodes sharing tasks by rendezvous hashing; Harbor calls the first, which hands
    // the layers the second owns (the one agents ask for them) to it.
    let sns = env
        .supernode_cluster(
            &["sn1", "sn2"],
            &["--upstream-ca", &ca, "--admin-token-file", &token_file],
        )
        .await;
    let http = sns[0].2.clone();
    let grpc = format!("{},{}", sns[0].1, sns[1].1);
    let driver = |token: Option<&str>| Driver {
        endpoint: format!("{http}/"),
        token: token.map(str::to_owned),
        client: damselfly_tests::cluster::http_client(),
    };
    let harbor = driver(Some(ADMIN_TOKEN));
    harbor
        .health()
        .await
        .expect("the provider instance is healthy");

    let manifest = format!("https://{registry}/v2/project/app/manifests/v1");
    let jwt = pull_token(&realm, &pki.ca_crt, "project/app").await;
    let headers = BTreeMap::from([("Authorization".to_owned(), format!("Bearer {jwt}"))]);
    for (token, want) in [(None, "401"), (Some("not-the-token"), "403")] {
        let err = driver(token)
            .preheat(&manifest, &headers, "single_seed_peer")
            .await
            .expect_err("a job without the personal access token");
        assert!(err.contains(want), "{token:?}: {err}");
    }

    let id = harbor
        .preheat(&manifest, &headers, "single_seed_peer")
        .await
        .expect("preheat job");
    let Status::Success(rows) = wait_job(&harbor, &id).await else {
        env.dump_logs();
        panic!("the preheat job did not succeed");
    };
    for layer in &layers {
        let url = format!("https://{registry}/v2/project/app/blobs/{layer}");
        assert!(
            rows.iter().any(|(u, s, _)| *u == url && s == "SUCCESS"),
            "{layer} not among the job's seeded blobs: {rows:?}"
        );
    }
    // And the image's config, which every pull asks for.
    assert_eq!(rows.len(), layers.len() + 1, "{rows:?}");
    // The registry writes its access-log line just after the last byte.
    let deadline = Instant::now() + Duration::from_secs(10);
    while layers.iter().any(|l| served(l) == 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for layer in &layers {
        assert_eq!(served(layer), 1, "preheat: {layer} left the registry");
    }
    // The job handed the layers the second supernode owns to it: it fetched them itself.
    let members = [sns[0].1.clone(), sns[1].1.clone()];
    let second_owns = layers.iter().any(|l| {
        let task = fetcher::task_id::content_task_id(l).expect("task id");
        fetcher::rendezvous::order(&task, &members)[0] == members[1]
    });
    let m = client_metrics(&sns[1].2).await;
    let fetched = metric(&m, "damselfly_supernode_source_bytes_total", "");
    assert_eq!(fetched > 0.0, second_owns, "sn2 fetched {fetched} bytes");
    // Scope all_peers: an agent subscribed to the supernode fetches every layer too (from the
    // seed: the registry serves nothing more).
    let (_agent, d) = env
        .dfdaemon(
            "agent",
            &grpc,
            &["--hijack", REGISTRY_HOST, "--upstream-ca", &ca],
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = client_metrics(&http).await;
        if metric(&m, "damselfly_supernode_subscribed_agents", "") >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never subscribed:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = harbor
        .preheat(&manifest, &headers, "all_peers")
        .await
        .expect("second job");
    let Status::Success(rows) = wait_job(&harbor, &again).await else {
        env.dump_logs();
        panic!("the all_peers job did not succeed");
    };
    for layer in &layers {
        let url = format!("https://{registry}/v2/project/app/blobs/{layer}");
        let done = rows
            .iter()
            .filter(|(u, s, _)| *u == url && s == "SUCCESS")
            .count();
        assert_eq!(done, 2, "{layer}: the seed and the agent: {rows:?}");
    }
    let tasks = get_text(&format!("http://{}/api/v1/tasks", d.metrics)).await;
    let tasks: Vec<serde_json::Value> = serde_json::from_str(&tasks).expect("tasks JSON");
    for layer in &layers {
        let held = tasks.iter().any(|t| {
            t["url"]
                .as_str()
                .is_some_and(|u| u.ends_with(layer.as_str()))
                && t["complete"] == 1.0
        });
        assert!(held, "the agent does not hold {layer} whole: {tasks:?}");
    }

    let missing = format!("https://{registry}/v2/project/app/manifests/nope");
    let id = harbor.preheat(&missing, &headers, "").await.expect("job");
    match wait_job(&harbor, &id).await {
        Status::Fail(e) => assert!(e.contains("404"), "{e}"),
        other => panic!("a job for a missing tag: {other:?}"),
    }

    // A later pull through that agent takes nothing over the network at all, and the indexes
    // lazy starts read come from the seed.
    let fetched = d.metric("damselfly_peer_download_bytes_total", "").await;
    let ca_dir = d.save_ca(&env, "agent-ca").await;
    let dest = env.path("pulled");
    let (src, oci) = (
        format!("docker://{registry}/project/app:v1"),
        format!("oci:{}:app", dest.display()),
    );
    let ca_dir = ca_dir.to_string_lossy().into_owned();
    let args = [
        "--insecure-policy",
        "copy",
        "--src-cert-dir",
        &ca_dir,
        "--src-creds",
        CREDS,
        &src,
        &oci,
    ];
    let proxy = format!("http://{}", d.proxy);
    let (code, out) = skopeo(&args, &[("HTTPS_PROXY", &proxy), ("NO_PROXY", "")]).await;
    assert_eq!(code, 0, "skopeo through the agent: {out}");
    let pulled = oci_blobs(&dest);
    assert!(
        layers
            .iter()
            .all(|l| pulled.iter().any(|p| l.strip_prefix("sha256:") == Some(p))),
        "{pulled:?}"
    );
    let after = d.metric("damselfly_peer_download_bytes_total", "").await;
    assert_eq!(after, fetched, "the pull downloaded layers the agent held");
    let bearer = format!("Bearer {jwt}");
    for layer in &layers[..2] {
        let url = format!("https://{registry}/v2/project/app/blobs/{layer}");
        let index = agent_layer_index(&d.socket, &url, &[("Authorization", &bearer)], layer)
            .await
            .unwrap_or_else(|e| panic!("index of {layer}: {e}"));
        assert!(!index.is_empty(), "{layer}: empty index");
    }
    for layer in &layers {
        assert_eq!(
            served(layer),
            1,
            "after the pull: {layer} left the registry again"
        );
    }
}
