//! dfdaemon in front of a private HTTPS registry (TLS with the test's own CA, htpasswd auth):
//! mirror mode and proxy mode (`HTTPS_PROXY` + `--hijack`), pulls and pushes with real skopeo.

use std::path::Path;
use std::time::Duration;

use damselfly_tests::harness::Env;
use damselfly_tests::pki::{REGISTRY_HOST, ensure_hosts_entry};
use damselfly_tests::registry::{
    CREDS, PrivateRegistry, build_test_image, count_blob_gets, layer_digests, oci_blobs,
    private_registry, skopeo, tools_missing,
};

/// Why this machine cannot run these tests, if it cannot.
fn skip_reason() -> Option<String> {
    tools_missing().or_else(|| ensure_hosts_entry().err())
}

fn ok(env: &Env, what: &str, (code, out): (i32, String)) {
    if code != 0 {
        env.dump_logs();
    }
    assert_eq!(code, 0, "{what} failed:\n{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_through_mirror_and_https_proxy_pulls_the_same_image_and_pushes() {
    if let Some(why) = skip_reason() {
        damselfly_tests::harness::skip(
            "skopeo_through_mirror_and_https_proxy_pulls_the_same_image_and_pushes",
            &why,
        );
        return;
    }
    let env = Env::new("https-registry");
    let PrivateRegistry {
        pki,
        proc: registry_proc,
        addr: registry,
        layers,
        ca,
        grpc,
        supernode: _sn,
        ..
    } = private_registry(&env, 12 << 20).await;
    let mirror_url = format!("https://{registry}");
    let (_m, mirror) = env
        .dfdaemon(
            "mirror",
            &grpc,
            &["--registry-mirror", &mirror_url, "--upstream-ca", &ca],
        )
        .await;
    let (_p, proxy) = env
        .dfdaemon(
            "proxy",
            &grpc,
            &["--hijack", REGISTRY_HOST, "--upstream-ca", &ca],
        )
        .await;
    let proxy_ca = proxy.save_ca(&env, "proxy-ca").await;
    let proxy_env = format!("http://{}", proxy.proxy);
    let https_proxy = [("HTTPS_PROXY", proxy_env.as_str()), ("NO_PROXY", "")];
    let src = format!("docker://{registry}/project/app:v1");
    let (via_mirror, via_proxy, direct) = (
        env.path("via-mirror"),
        env.path("via-proxy"),
        env.path("direct"),
    );
    let oci = |p: &Path| format!("oci:{}:app", p.display());
    let mirror_src = format!("docker://{}/project/app:v1", mirror.proxy);
    let proxy_ca_s = proxy_ca.to_string_lossy().into_owned();
    let (mirror_dest, proxy_dest, direct_dest) = (oci(&via_mirror), oci(&via_proxy), oci(&direct));
    let args_mirror = [
        "--insecure-policy",
        "copy",
        "--src-tls-verify=false",
        "--src-creds",
        CREDS,
        &mirror_src,
        &mirror_dest,
    ];
    let args_proxy = [
        "--insecure-policy",
        "copy",
        "--src-cert-dir",
        &proxy_ca_s,
        "--src-creds",
        CREDS,
        &src,
        &proxy_dest,
    ];
    let (a, b) = tokio::join!(skopeo(&args_mirror, &[]), skopeo(&args_proxy, &https_proxy));
    ok(&env, "skopeo through the mirror", a);
    ok(&env, "skopeo through the HTTPS proxy", b);
    let ca_dir = pki.ca_dir.to_string_lossy().into_owned();
    let direct_pull = skopeo(
        &[
            "--insecure-policy",
            "copy",
            "--src-cert-dir",
            &ca_dir,
            "--src-creds",
            CREDS,
            &src,
            &direct_dest,
        ],
        &[],
    )
    .await;
    ok(&env, "direct skopeo", direct_pull);
    for dest in [&via_mirror, &via_proxy] {
        assert_eq!(
            oci_blobs(dest),
            oci_blobs(&direct),
            "{} differs",
            dest.display()
        );
        assert_eq!(
            std::fs::read(dest.join("index.json")).expect("index"),
            std::fs::read(direct.join("index.json")).expect("index"),
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = registry_proc.output();
    for layer in &layers {
        // The supernode's seed fetch, plus the direct pull: both agents were served P2P.
        let gets = count_blob_gets(&log, layer);
        assert_eq!(gets, 2, "layer {layer} left the registry {gets} times");
    }
    for d in [&mirror, &proxy] {
        // The layers and the image config (a blob too).
        assert_eq!(
            d.proxy_requests("blob").await,
            layers.len() as f64 + 1.0,
            "P2P blob requests"
        );
    }
    assert!(proxy.proxy_requests("hijack").await >= 1.0);

    // Credentials stay checked by the registry: no or wrong credentials get its 401 for a blob
    // both agents hold.
    let pem = std::fs::read(proxy_ca.join("ca.crt")).expect("ca");
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::https(&proxy_env).expect("proxy"))
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("pem"))
        .build()
        .expect("client");
    let blob_url = format!("https://{registry}/v2/project/app/blobs/{}", layers[1]);
    let r = client.get(&blob_url).send().await.expect("get");
    assert_eq!(r.status().as_u16(), 401, "no credentials");
    let r = client
        .get(&blob_url)
        .basic_auth("alice", Some("guess"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 401, "wrong password");
    let r = client
        .get(&blob_url)
        .basic_auth("alice", Some("wonderland"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 200);
    let body = r.bytes().await.expect("body");
    assert_eq!(
        format!("sha256:{}", fetcher::piece::sha256_hex(&body)),
        layers[1]
    );

    // CONNECT to a host that is not hijacked is tunneled: the mirror agent has no --hijack, and
    // skopeo, trusting the registry's own CA, talks TLS end to end through it.
    let mirror_proxy = format!("http://{}", mirror.proxy);
    let inspect = skopeo(
        &["inspect", "--cert-dir", &ca_dir, "--creds", CREDS, &src],
        &[("HTTPS_PROXY", mirror_proxy.as_str()), ("NO_PROXY", "")],
    )
    .await;
    ok(&env, "skopeo inspect through a tunnel", inspect);
    assert!(mirror.proxy_requests("tunnel").await >= 1.0);

    // Push through the HTTPS proxy: a new image (new layers: real uploads) lands intact.
    let before = proxy.proxy_requests("passthrough").await;
    let image = build_test_image(&env, "image2", 3 << 20).await;
    let pushed = format!("docker://{registry}/project/pushed:v1");
    let push = skopeo(
        &[
            "--insecure-policy",
            "copy",
            "--dest-cert-dir",
            &proxy_ca_s,
            "--dest-creds",
            CREDS,
            &format!("oci:{image}"),
            &pushed,
        ],
        &https_proxy,
    )
    .await;
    ok(&env, "skopeo push through the HTTPS proxy", push);
    assert!(
        proxy.proxy_requests("passthrough").await >= before + 6.0,
        "the push did not go through the proxy"
    );
    let (code, raw) = skopeo(
        &[
            "inspect",
            "--raw",
            "--cert-dir",
            &ca_dir,
            "--creds",
            CREDS,
            &pushed,
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{raw}");
    let layout = Path::new(image.trim_end_matches(":app"));
    for layer in layer_digests(&raw) {
        let hex = layer.trim_start_matches("sha256:");
        assert!(
            layout.join("blobs/sha256").join(hex).exists(),
            "pushed layer {layer} is not one of the image's"
        );
    }
    let back = env.path("pushed-back");
    let pull_back = skopeo(
        &[
            "--insecure-policy",
            "copy",
            "--src-cert-dir",
            &ca_dir,
            "--src-creds",
            CREDS,
            &pushed,
            &oci(&back),
        ],
        &[],
    )
    .await;
    ok(
        &env,
        "pulling the pushed image back (skopeo verifies digests)",
        pull_back,
    );
}
