//! Kubernetes lazy starts from a private registry, kubelet emulated: a CRI client (the test)
//! calls dfsnapshotter's image-service proxy the way kubelet does with
//! `--image-service-endpoint`, and the proxy forwards to a real containerd with its CRI plugin
//! (snapshotter `damselfly`, snapshot annotations on). The registry's private CA is given only
//! in containerd's `hosts.toml`, which containerd's CRI, dfsnapshotter and the supernode all read. `PullImage` with the pod's pull secret mounts every layer
//! lazily and the container (run with `ctr` on the CRI-pulled image: no CNI or pause image here)
//! reads the big file byte-exact; a pull of another repository without a secret is refused;
//! `RemoveImage` unmounts the layers and forgets the secret; it is in no label, log or argv.

use std::path::Path;
use std::time::{Duration, Instant};

use damselfly_tests::containerd::{
    containerd_missing, containerd_socket, start_containerd_cri, start_snapshotter,
};
use damselfly_tests::harness::{Env, free_port, get_text, is_root, metric};
use damselfly_tests::pki::ensure_hosts_entry;
use damselfly_tests::registry::{
    CREDS, PrivateRegistry, big_file_sha256, copy_image, private_registry, tools_missing,
};
use proto::cri::image_service_client::ImageServiceClient;
use proto::cri::{AuthConfig, ImageSpec, ImageStatusRequest, PullImageRequest, RemoveImageRequest};

fn skip_reason() -> Option<String> {
    tools_missing()
        .or_else(containerd_missing)
        .or_else(|| (!is_root()).then(|| "FUSE mounts need root".to_owned()))
        .or_else(|| (!Path::new("/dev/fuse").exists()).then(|| "no /dev/fuse".to_owned()))
        .or_else(|| ensure_hosts_entry().err())
}

fn spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_pulls_with_a_pull_secret_start_lazily() {
    if let Some(why) = skip_reason() {
        damselfly_tests::harness::skip("kubelet_pulls_with_a_pull_secret_start_lazily", &why);
        return;
    }
    let env = Env::new("cri");
    let PrivateRegistry {
        addr,
        ca,
        proc: _registry,
        supernode: _sn,
        ..
    } = private_registry(&env, 8 << 20).await;
    let big_sha = big_file_sha256(&env);
    copy_image(
        &format!("docker://{addr}/project/app:v1"),
        &format!("docker://{addr}/project/other:v1"),
        Some(CREDS),
    )
    .await;
    // One host config for containerd's CRI and dfsnapshotter.
    let hosts = env.path("certs.d");
    std::fs::create_dir_all(hosts.join(&addr)).expect("mkdir certs.d");
    std::fs::write(
        hosts.join(&addr).join("hosts.toml"),
        format!("server = \"https://{addr}\"\n[host.\"https://{addr}\"]\n  ca = \"{ca}\"\n"),
    )
    .expect("hosts.toml");

    // This host's supernode knows the registry's CA from the same host config only.
    let (_sn_hosts, grpc, _) = env
        .supernode("sn-hosts", &["--hosts-dir", &hosts.to_string_lossy()])
        .await;
    let (_agent, daemon) = env.dfdaemon("agent", &grpc, &[]).await;
    let root = env.path("snapshots");
    let sock = env.path("snapshotter.sock");
    let images = env.path("image-service.sock");
    let metrics = format!("127.0.0.1:{}", free_port());
    let flags: Vec<String> = [
        "--agent-socket",
        &daemon.socket.to_string_lossy(),
        "--hosts-dir",
        &hosts.to_string_lossy(),
        "--background-fetch",
        "false",
        "--image-service-socket",
        &images.to_string_lossy(),
        "--containerd-socket",
        &containerd_socket(&env, "containerd").to_string_lossy(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let snap = start_snapshotter(&env, "dfsnapshotter", &root, &sock, &metrics, &flags).await;
    let containerd = start_containerd_cri(&env, "containerd", &sock, &hosts).await;
    let channel = fetcher::uds::channel(&images).await.expect("image service");
    let mut kubelet = ImageServiceClient::new(channel);
    let (user, password) = CREDS.split_once(':').expect("creds");
    let image = format!("{addr}/project/app:v1");

    // PullImage with the pod's pull secret, as kubelet sends it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let pulled = loop {
        // containerd dials the proxy snapshotter lazily: retry a refused dial for a moment.
        let r = kubelet
            .pull_image(PullImageRequest {
                image: spec(&image),
                auth: Some(AuthConfig {
                    username: user.into(),
                    password: password.into(),
                    ..Default::default()
                }),
            })
            .await;
        match r {
            Ok(r) => break r.into_inner(),
            Err(s) if Instant::now() < deadline && s.message().contains("dial") => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(s) => panic!(
                "PullImage: {s:?}\n{}\n{}",
                snap.output(),
                containerd.proc.output()
            ),
        }
    };
    assert!(pulled.image_ref.starts_with("sha256:"), "{pulled:?}");
    // Other calls pass through unchanged.
    let status = kubelet
        .image_status(ImageStatusRequest {
            image: spec(&image),
            verbose: false,
        })
        .await
        .expect("ImageStatus")
        .into_inner();
    assert_eq!(
        status.image.as_ref().map(|i| i.id.as_str()),
        Some(pulled.image_ref.as_str())
    );
    // Every layer was mounted lazily: the pull downloaded none of them.
    let fetched = daemon
        .metric("damselfly_peer_download_bytes_total", "")
        .await;
    assert!(
        fetched < f64::from(4u32 << 20),
        "the CRI pull fetched {fetched} bytes of the layers"
    );
    let log = snap.output();
    assert!(
        log.contains("pull secret kept") && !log.contains("containerd will download and unpack"),
        "{log}"
    );
    let run = |id: &'static str, cmd: &'static [&'static str]| {
        let (containerd, image) = (&containerd, image.clone());
        async move {
            let mut args = vec!["-n", "k8s.io", "run", "--rm", "--snapshotter", "damselfly"];
            args.push(&image);
            args.push(id);
            args.extend_from_slice(cmd);
            containerd.ctr(&args).await
        }
    };
    let (code, out) = run("c1", &["/bin/busybox", "sha256sum", "/big.bin"]).await;
    assert_eq!(code, 0, "ctr run: {out}\n{}", snap.output());
    assert!(out.contains(&big_sha), "big.bin differs: {out}");

    // Another private repository without a secret is refused, whatever the first pull left.
    let refused = kubelet
        .pull_image(PullImageRequest {
            image: spec(&format!("{addr}/project/other:v1")),
            auth: None,
        })
        .await
        .expect_err("project/other pulled without a secret");
    assert!(
        refused.message().contains("401") || refused.message().contains("nauthorized"),
        "{refused:?}"
    );

    // The secret is in no snapshot label, log, store or argv.
    let basic = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(CREDS)
    };
    env.assert_no_secret(&[password, &basic]);
    for p in std::fs::read_dir("/proc").expect("proc").flatten() {
        if let Ok(argv) = std::fs::read(p.path().join("cmdline")) {
            assert!(
                !argv
                    .windows(password.len())
                    .any(|w| w == password.as_bytes()),
                "the password is in the argv of {}",
                String::from_utf8_lossy(&argv)
            );
        }
    }

    // RemoveImage (kubelet's image GC): the layers go, and with them the secret.
    kubelet
        .remove_image(RemoveImageRequest {
            image: spec(&image),
        })
        .await
        .expect("RemoveImage");
    let scopes = || async {
        let text = get_text(&format!("http://{metrics}/metrics")).await;
        metric(&text, "damselfly_snapshotter_credential_scopes", "")
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while scopes().await > 0.0 {
        assert!(
            Instant::now() < deadline,
            "the pull secret is still held after RemoveImage:\n{}",
            std::fs::read_to_string(root.join("fusemanager.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
