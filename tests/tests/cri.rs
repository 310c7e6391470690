//! Kubernetes lazy starts from a private registry, kubelet emulated: a CRI client (the test)
//! calls dfsnapshotter's image-service proxy the way kubelet does with
//! `--image-service-endpoint`, and the proxy forwards to a real containerd with its CRI plugin
//! (snapshotter `damselfly`, snapshot annotations on). The registry's private CA is given only
//! in containerd's `hosts.toml`, which containerd's CRI, dfsnapshotter and the supernode all
//! read. Containers run with `ctr` on the CRI-pulled image in CRI's namespace: these machines
//! have no CNI plugins or pause image for `RunPodSandbox`.
//!
//! `PullImage` with the pod's pull secret mounts every layer lazily. A running container reads
//! a layer nobody fetched before after dfsnapshotter is killed -9 and restarted, and a new
//! container starts. The registry rotates the password, kubelet pulls again with the new
//! secret, and the running container reads the big file (its layer first read then) byte-exact.
//! A pull of another repository without a secret is refused; `RemoveImage` unmounts the layers
//! and forgets the secret; neither password is in a label, log or argv.

use std::path::Path;
use std::time::{Duration, Instant};

use damselfly_tests::containerd::{
    containerd_missing, containerd_socket, start_containerd_cri, start_snapshotter,
};
use damselfly_tests::harness::{Env, free_port, get_text, is_root, metric};
use damselfly_tests::pki::ensure_hosts_entry;
use damselfly_tests::registry::{
    CREDS, PrivateRegistry, big_file_sha256, copy_image, private_registry, set_htpasswd,
    tools_missing,
};
use fetcher::uds::lazy_channel;
use proto::cri::image_service_client::ImageServiceClient;
use proto::cri::{
    AuthConfig, ImageSpec, ImageStatusRequest, PullImageRequest, PullImageResponse,
    RemoveImageRequest,
};

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

/// Whether the registry refused the pull's credentials.
fn unauthorized(s: &tonic::Status) -> bool {
    s.message().contains("401") || s.message().contains("nauthorized")
}

/// `PullImage` of `image` with a pull secret `auth` (user, password), as kubelet sends it, on a
/// new connection to the proxy at `sock` (kubelet reconnects too). A refused dial (containerd
/// reaching a snapshotter that is still starting, or the proxy itself) is tried again for a
/// while; any other answer is returned.
async fn pull_image(
    sock: &Path,
    image: &str,
    auth: Option<(&str, &str)>,
) -> Result<PullImageResponse, tonic::Status> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = ImageServiceClient::new(lazy_channel(sock))
            .pull_image(PullImageRequest {
                image: spec(image),
                auth: auth.map(|(username, password)| AuthConfig {
                    username: username.into(),
                    password: password.into(),
                    ..Default::default()
                }),
            })
            .await;
        match r {
            Ok(r) => return Ok(r.into_inner()),
            Err(s)
                if Instant::now() < deadline
                    && (s.message().contains("dial") || s.code() == tonic::Code::Unavailable) =>
            {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(s) => return Err(s),
        }
    }
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
    let mut snap = start_snapshotter(&env, "dfsnapshotter", &root, &sock, &metrics, &flags).await;
    let containerd = start_containerd_cri(&env, "containerd", &sock, &hosts).await;
    let (user, password) = CREDS.split_once(':').expect("creds");
    let image = format!("{addr}/project/app:v1");

    // PullImage with the pod's pull secret, as kubelet sends it.
    let pulled = pull_image(&images, &image, Some((user, password)))
        .await
        .unwrap_or_else(|s| {
            panic!(
                "PullImage: {s:?}\n{}\n{}",
                snap.output(),
                containerd.proc.output()
            )
        });
    assert!(pulled.image_ref.starts_with("sha256:"), "{pulled:?}");
    // Other calls pass through unchanged.
    let status = ImageServiceClient::new(lazy_channel(&images))
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

    // A pod's container runs (ctr on the CRI-pulled image); nothing has read /etc/release or
    // /big.bin yet, so their layers have not been fetched by anyone.
    let k8s = |args: &[&str]| -> Vec<String> {
        ["-n", "k8s.io"]
            .iter()
            .chain(args)
            .map(|s| (*s).to_owned())
            .collect()
    };
    let ctr = |args: Vec<String>| {
        let containerd = &containerd;
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            containerd.ctr(&args).await
        }
    };
    let (code, out) = ctr(k8s(&[
        "run",
        "-d",
        "--snapshotter",
        "damselfly",
        &image,
        "pod",
        "/bin/busybox",
        "sleep",
        "600",
    ]))
    .await;
    assert_eq!(code, 0, "ctr run -d: {out}\n{}", snap.output());

    // kill -9 of dfsnapshotter, proxy and all: the FUSE manager keeps serving and keeps the
    // secret, so the running container reads a file of a layer nobody fetched before.
    snap.kill9().await;
    let snap = start_snapshotter(&env, "dfsnapshotter-2", &root, &sock, &metrics, &flags).await;
    let (code, out) = ctr(k8s(&[
        "tasks",
        "exec",
        "--exec-id",
        "e1",
        "pod",
        "/bin/cat",
        "/etc/release",
    ]))
    .await;
    assert_eq!(code, 0, "exec after kill -9: {out}\n{}", snap.output());
    assert!(out.contains("damselfly test image"), "{out}");
    // A new container of the image starts (containerd redials the new snapshotter).
    let args = k8s(&[
        "run",
        "--rm",
        "--snapshotter",
        "damselfly",
        &image,
        "c1",
        "/bin/cat",
        "/small-file",
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = containerd
        .ctr_until_ok(&args, Duration::from_secs(30))
        .await;
    assert!(out.contains("hello from damselfly"), "{out}");

    // The registry rotates alice's password; the old one stops working there...
    let rotated = "through-the-looking-glass";
    set_htpasswd(&env, &[(user.to_owned(), rotated.to_owned())]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match pull_image(&images, &image, Some((user, password))).await {
            Err(s) if unauthorized(&s) => break,
            r => assert!(
                Instant::now() < deadline,
                "the registry still takes the old password: {r:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // ...and kubelet pulls again with the new secret: the running container reads the big
    // file (a layer first read now, so the supernode asks the registry with what the FUSE
    // manager holds) byte-exact.
    pull_image(&images, &image, Some((user, rotated)))
        .await
        .expect("PullImage with the rotated password");
    let (code, out) = ctr(k8s(&[
        "tasks",
        "exec",
        "--exec-id",
        "e2",
        "pod",
        "/bin/busybox",
        "sha256sum",
        "/big.bin",
    ]))
    .await;
    assert_eq!(
        code,
        0,
        "exec after rotation: {out}\n{}",
        std::fs::read_to_string(root.join("fusemanager.log")).unwrap_or_default()
    );
    assert!(out.contains(&big_sha), "big.bin differs: {out}");
    let (code, out) = ctr(k8s(&["tasks", "rm", "-f", "pod"])).await;
    assert_eq!(code, 0, "{out}");
    let (code, out) = ctr(k8s(&["containers", "rm", "pod"])).await;
    assert_eq!(code, 0, "{out}");

    // Another private repository without a secret is refused, whatever the first pull left.
    let refused = pull_image(&images, &format!("{addr}/project/other:v1"), None)
        .await
        .expect_err("project/other pulled without a secret");
    assert!(unauthorized(&refused), "{refused:?}");

    // Neither secret is in a snapshot label, containerd's metadata, a log, a store or an argv.
    let basic = |creds: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(creds)
    };
    let secrets = [
        password.to_owned(),
        rotated.to_owned(),
        basic(CREDS),
        basic(&format!("{user}:{rotated}")),
    ];
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    env.assert_no_secret(&secrets);
    for p in std::fs::read_dir("/proc").expect("proc").flatten() {
        if let Ok(argv) = std::fs::read(p.path().join("cmdline")) {
            for s in &secrets {
                assert!(
                    !argv.windows(s.len()).any(|w| w == s.as_bytes()),
                    "a secret is in the argv of {}",
                    String::from_utf8_lossy(&argv)
                );
            }
        }
    }

    // RemoveImage (kubelet's image GC): the layers go, and with them the secret.
    ImageServiceClient::new(lazy_channel(&images))
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
