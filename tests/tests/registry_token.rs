//! Ten agents in front of a Harbor-like registry: HTTPS, token auth from a token server that
//! signs JWTs (as Harbor's core does), a private repository. Clients use `HTTPS_PROXY` with
//! `--hijack`, so their registry and token traffic goes through their agent.

use std::path::Path;
use std::time::Duration;

use damselfly_tests::harness::{Daemon, Env};
use damselfly_tests::pki::{REGISTRY_HOST, ensure_hosts_entry, make_pki};
use damselfly_tests::registry::{
    CREDS, RegistryAuth, copy_image, count_blob_gets, oci_blobs, push_test_image_as, skopeo,
    start_registry_with, start_token_server, tokens_issued, tools_missing,
};

const AGENTS: usize = 10;

/// A client that reaches the registry through `d` (HTTPS_PROXY), trusting `d`'s CA.
fn via(d: &Daemon, ca_dir: &Path) -> reqwest::Client {
    let pem = std::fs::read(ca_dir.join("ca.crt")).expect("ca");
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::https(format!("http://{}", d.proxy)).expect("proxy"))
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("pem"))
        .build()
        .expect("client")
}

/// Fetches a pull token for `repo` from `realm` as `user` (None: anonymous), through the client.
async fn token(c: &reqwest::Client, realm: &str, repo: &str, user: Option<(&str, &str)>) -> String {
    let mut rb = c.get(realm).query(&[
        ("service", "damselfly-registry"),
        ("scope", &format!("repository:{repo}:pull")),
    ]);
    if let Some((u, p)) = user {
        rb = rb.basic_auth(u, Some(p));
    }
    let r = rb.send().await.expect("token request");
    assert_eq!(r.status().as_u16(), 200, "token for {user:?}");
    let v: serde_json::Value =
        serde_json::from_str(&r.text().await.expect("body")).expect("token json");
    v["token"].as_str().expect("token field").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_agents_pull_once_per_layer_and_token_and_private_stays_private() {
    let skip = tools_missing().or_else(|| ensure_hosts_entry().err());
    if let Some(why) = skip {
        damselfly_tests::harness::skip(
            "ten_agents_pull_once_per_layer_and_token_and_private_stays_private",
            &why,
        );
        return;
    }
    let env = Env::new("registry-token");
    let pki = make_pki(&env);
    let (_ts, realm) = start_token_server(
        &env,
        &pki,
        &[CREDS, "bob:builder"],
        &["project/private=alice"],
    )
    .await;
    let (registry_proc, registry) = start_registry_with(
        &env,
        Some(&pki),
        RegistryAuth::Token {
            realm: realm.clone(),
        },
    )
    .await;
    let layers = push_test_image_as(&env, &registry, "project/app:v1", 8 << 20, Some(CREDS)).await;
    copy_image(
        &format!("docker://{registry}/project/app:v1"),
        &format!("docker://{registry}/project/private:v1"),
        Some(CREDS),
    )
    .await;
    let before = tokens_issued(&realm, &pki).await;
    // (Copying into project/private read the blobs once: count from here.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    let setup_log = registry_proc.output();
    let served =
        |log: &str, layer: &str| count_blob_gets(log, layer) - count_blob_gets(&setup_log, layer);

    let ca = pki.ca_crt.to_string_lossy().into_owned();
    let (_sn, grpc, _) = env.supernode("sn", &["--upstream-ca", &ca]).await;
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        let name = format!("agent{i}");
        let (p, d) = env
            .dfdaemon(
                &name,
                &grpc,
                &[
                    "--hijack",
                    REGISTRY_HOST,
                    "--registry-mirror",
                    &format!("https://{registry}"),
                    "--upstream-ca",
                    &ca,
                ],
            )
            .await;
        let ca_dir = d.save_ca(&env, &format!("{name}-ca")).await;
        agents.push((p, d, ca_dir));
    }
    let src = format!("docker://{registry}/project/app:v1");
    let pulls = agents.iter().enumerate().map(|(i, (_, d, ca_dir))| {
        let dest = env.path(&format!("pulled{i}"));
        let (src, proxy) = (src.clone(), format!("http://{}", d.proxy));
        let (ca_dir, oci) = (
            ca_dir.to_string_lossy().into_owned(),
            format!("oci:{}:app", dest.display()),
        );
        async move {
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
            let envs = [("HTTPS_PROXY", proxy.as_str()), ("NO_PROXY", "")];
            (skopeo(&args, &envs).await, dest)
        }
    });
    let results = futures::future::join_all(pulls).await;
    for ((code, out), _) in &results {
        if *code != 0 {
            env.dump_logs();
        }
        assert_eq!(*code, 0, "skopeo through its agent failed: {out}");
    }
    for (_, dest) in &results[1..] {
        assert_eq!(
            oci_blobs(dest),
            oci_blobs(&results[0].1),
            "{}",
            dest.display()
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = registry_proc.output();
    for layer in &layers {
        let gets = served(&log, layer);
        assert_eq!(
            gets, 1,
            "{AGENTS} agents: layer {layer} left the registry {gets} times"
        );
    }
    let after = tokens_issued(&realm, &pki).await;
    let mut asked = 0;
    for (key, n) in &after {
        let new = n - before.get(key).copied().unwrap_or(0);
        asked += new;
        assert!(
            new <= 1,
            "{new} tokens issued for {key} to {AGENTS} agents: {after:?}"
        );
    }
    assert!(asked >= 1, "no token was requested at all: {after:?}");
    for (_, d, _) in &agents {
        assert!(
            d.proxy_requests("token").await >= 1.0,
            "agent {} served no token request",
            d.proxy
        );
    }

    // Mirror mode: the registry's token realm is pointed at the agent, so these token requests
    // are shared through the supernode too.
    let mut tokens_before = Vec::new();
    for (_, d, _) in &agents[..3] {
        tokens_before.push(d.proxy_requests("token").await);
    }
    let mirror_pulls = agents[..3].iter().enumerate().map(|(i, (_, d, _))| {
        let dest = env.path(&format!("mirrored{i}"));
        let (src, oci) = (
            format!("docker://{}/project/app:v1", d.proxy),
            format!("oci:{}:app", dest.display()),
        );
        async move {
            let args = [
                "--insecure-policy",
                "copy",
                "--src-tls-verify=false",
                "--src-creds",
                CREDS,
                &src,
                &oci,
            ];
            (skopeo(&args, &[]).await, dest)
        }
    });
    for ((code, out), dest) in futures::future::join_all(mirror_pulls).await {
        assert_eq!(code, 0, "skopeo through the mirror failed: {out}");
        assert_eq!(oci_blobs(&dest), oci_blobs(&results[0].1));
    }
    for (i, (_, d, _)) in agents[..3].iter().enumerate() {
        let now = d.proxy_requests("token").await;
        assert!(
            now > tokens_before[i],
            "mirror-mode token requests did not come to agent {i}"
        );
    }
    let after_mirror = tokens_issued(&realm, &pki).await;
    for (key, n) in &after_mirror {
        let new = n - before.get(key).copied().unwrap_or(0);
        assert!(new <= 1, "{new} tokens issued for {key}: {after_mirror:?}");
    }

    // Private stays private: the layers are on every agent, but project/private is alice's only.
    let (_, d, ca_dir) = &agents[3];
    let c = via(d, ca_dir);
    let blob = format!("https://{registry}/v2/project/private/blobs/{}", layers[1]);
    let r = c.get(&blob).send().await.expect("anonymous get");
    assert_eq!(r.status().as_u16(), 401, "anonymous");
    let bob = token(&c, &realm, "project/private", Some(("bob", "builder"))).await;
    let r = c
        .get(&blob)
        .bearer_auth(&bob)
        .send()
        .await
        .expect("bob get");
    let s = r.status().as_u16();
    assert!(s == 401 || s == 403, "bob got {s} for alice's private blob");
    let anon = token(&c, &realm, "project/private", None).await;
    let r = c
        .get(&blob)
        .bearer_auth(&anon)
        .send()
        .await
        .expect("anon get");
    let s = r.status().as_u16();
    assert!(s == 401 || s == 403, "an anonymous token got {s}");
    let alice = token(&c, &realm, "project/private", Some(("alice", "wonderland"))).await;
    let r = c
        .get(&blob)
        .bearer_auth(&alice)
        .send()
        .await
        .expect("alice get");
    assert_eq!(r.status().as_u16(), 200);
    let body = r.bytes().await.expect("body");
    assert_eq!(
        format!("sha256:{}", fetcher::piece::sha256_hex(&body)),
        layers[1]
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        served(&registry_proc.output(), &layers[1]),
        1,
        "alice's private read was not served from the cluster"
    );
}
