//! A real dockerd pulling and pushing through dfdaemon: HTTPS proxy mode (`HTTPS_PROXY` +
//! `--hijack`, dfdaemon's CA in `/etc/docker/certs.d`) and `registry-mirrors` (Docker Hub names
//! mapped by `--registry-mirror` to the test registry), against a TLS + htpasswd registry.

use std::time::Duration;

use base64::Engine;
use damselfly_tests::docker::{CertsD, dockerd_missing, start_dockerd};
use damselfly_tests::harness::{Env, get_text};
use damselfly_tests::pki::{REGISTRY_HOST, ensure_hosts_entry};
use damselfly_tests::registry::{
    CREDS, PrivateRegistry, count_blob_gets, layer_digests, private_registry, skopeo, tools_missing,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerd_pulls_runs_and_pushes_through_the_proxy_and_the_mirror() {
    let skip = dockerd_missing()
        .or_else(tools_missing)
        .or_else(|| ensure_hosts_entry().err());
    if let Some(why) = skip {
        damselfly_tests::harness::skip(
            "dockerd_pulls_runs_and_pushes_through_the_proxy_and_the_mirror",
            &why,
        );
        return;
    }
    let env = Env::new("docker");
    let PrivateRegistry {
        pki,
        proc: registry_proc,
        addr: registry,
        layers,
        ca,
        grpc,
        supernode: _sn,
        ..
    } = private_registry(&env, 6 << 20).await;
    // One agent does both: HTTPS proxy for the registry's name, mirror for Docker Hub names.
    let (_agent, d) = env
        .dfdaemon(
            "agent",
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
    let proxy_ca = get_text(&format!("http://{}/ca.crt", d.proxy)).await;
    let _trust = CertsD::install(&registry, &proxy_ca);
    let proxy_url = format!("http://{}", d.proxy);
    let dockerd = start_dockerd(
        &env,
        "dockerd",
        &[("HTTPS_PROXY", proxy_url.as_str()), ("NO_PROXY", "")],
        &serde_json::json!({ "registry-mirrors": [format!("http://{}", d.proxy)] }),
    )
    .await;
    let docker = |args: &'static [&'static str]| dockerd.docker(args, None);
    let must = |what: &str, (code, out): (i32, String)| {
        if code != 0 {
            env.dump_logs();
        }
        assert_eq!(code, 0, "{what}:\n{out}");
        out
    };

    // HTTPS proxy mode: login, pull, run.
    let image = format!("{registry}/project/app:v1");
    must(
        "docker login through the proxy",
        dockerd
            .docker(
                &["login", "-u", "alice", "--password-stdin", &registry],
                Some("wonderland\n"),
            )
            .await,
    );
    must(
        "docker pull through the proxy",
        dockerd.docker(&["pull", &image], None).await,
    );
    let out = must(
        "docker run",
        dockerd
            .docker(
                &[
                    "run",
                    "--rm",
                    "--network",
                    "none",
                    &image,
                    "cat",
                    "/small-file",
                ],
                None,
            )
            .await,
    );
    assert!(out.contains("hello from damselfly"), "{out}");
    let blobs_after_proxy = d.proxy_requests("blob").await;
    assert!(
        blobs_after_proxy >= 3.0,
        "docker's layers did not go P2P: {blobs_after_proxy}"
    );
    assert!(d.proxy_requests("hijack").await >= 1.0);

    // Push through the proxy: a committed container adds a real new layer.
    must(
        "docker run (to commit)",
        dockerd
            .docker(
                &[
                    "run",
                    "--name",
                    "c1",
                    "--network",
                    "none",
                    &image,
                    "sh",
                    "-c",
                    "echo pushed-by-docker > /pushed",
                ],
                None,
            )
            .await,
    );
    let pushed = format!("{registry}/project/docker-pushed:v1");
    must(
        "docker commit",
        dockerd.docker(&["commit", "c1", &pushed], None).await,
    );
    must(
        "docker push through the proxy",
        dockerd.docker(&["push", &pushed], None).await,
    );
    let (code, raw) = skopeo(
        &[
            "inspect",
            "--raw",
            "--cert-dir",
            &pki.ca_dir.to_string_lossy(),
            "--creds",
            CREDS,
            &format!("docker://{pushed}"),
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "the pushed image is not in the registry: {raw}");
    assert_eq!(layer_digests(&raw).len(), layers.len() + 1, "{raw}");

    // registry-mirrors: Docker Hub names go to the mirror, which maps them to the registry.
    must("docker rm", docker(&["rm", "c1"]).await);
    must(
        "docker rmi",
        dockerd.docker(&["rmi", &image, &pushed], None).await,
    );
    let auth = base64::engine::general_purpose::STANDARD.encode(CREDS);
    std::fs::write(
        dockerd.client_config().join("config.json"),
        serde_json::json!({"auths": {"https://index.docker.io/v1/": {"auth": auth}}}).to_string(),
    )
    .expect("write docker config");
    must(
        "docker pull through registry-mirrors",
        docker(&["pull", "project/app:v1"]).await,
    );
    let out = must(
        "docker run (mirrored image)",
        docker(&[
            "run",
            "--rm",
            "--network",
            "none",
            "project/app:v1",
            "cat",
            "/small-file",
        ])
        .await,
    );
    assert!(out.contains("hello from damselfly"), "{out}");
    let blobs_after_mirror = d.proxy_requests("blob").await;
    assert!(
        blobs_after_mirror >= blobs_after_proxy + 3.0,
        "the mirrored pull did not go through dfdaemon: {blobs_after_proxy} -> {blobs_after_mirror}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = registry_proc.output();
    for layer in &layers {
        let gets = count_blob_gets(&log, layer);
        assert_eq!(
            gets, 1,
            "layer {layer} left the registry {gets} times for two docker pulls"
        );
    }
}
