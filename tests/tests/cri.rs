//! Kubernetes lazy starts from a private registry, kubelet emulated ([`Kubelet`]): image calls
//! go to dfsnapshotter's image-service proxy (kubelet's `--image-service-endpoint`), which
//! forwards them to a real containerd with its CRI plugin (snapshotter `damselfly`, snapshot
//! annotations on); runtime calls go to containerd's CRI directly, and run a pod with host
//! networking whose sandbox image is pushed by the test. The registry's private CA is given only
//! in containerd's `hosts.toml`, which containerd's CRI, dfsnapshotter and the supernode all read.
//!
//! `PullImage` with the pod's pull secret mounts every layer lazily. The pod's container reads a
//! layer nobody fetched before after dfsnapshotter is killed -9 and restarted, and a new
//! container starts. The registry rotates the password, kubelet pulls again with the new secret,
//! a pull with the stale one is refused (and does not replace the new one), and the running
//! container reads the big file (its layer first read then) byte-exact. A pull
//! of another repository without a secret is refused; after the pod is deleted, `RemoveImage`
//! unmounts the layers and forgets the secret; neither password is in a label, log or argv.

use std::path::Path;
use std::time::{Duration, Instant};

use damselfly_tests::containerd::{
    Cri, containerd_missing, containerd_socket, start_containerd_cri, start_snapshotter,
};
use damselfly_tests::harness::{Env, free_port, get_text, is_root, metric};
use damselfly_tests::kubelet::{Kubelet, unauthorized};
use damselfly_tests::pki::ensure_hosts_entry;
use damselfly_tests::registry::{
    CREDS, PrivateRegistry, big_file_sha256, copy_image, private_registry, push_pause_image,
    set_htpasswd, tools_missing,
};

fn skip_reason() -> Option<String> {
    tools_missing()
        .or_else(containerd_missing)
        .or_else(|| (!is_root()).then(|| "FUSE mounts need root".to_owned()))
        .or_else(|| (!Path::new("/dev/fuse").exists()).then(|| "no /dev/fuse".to_owned()))
        .or_else(|| ensure_hosts_entry().err())
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
    let (image, pause) = (
        format!("{addr}/project/app:v1"),
        format!("{addr}/project/pause:v1"),
    );
    push_pause_image(&env, &addr, "project/pause:v1", Some(CREDS)).await;
    let cri = Cri {
        hosts_dir: &hosts,
        sandbox_image: &pause,
    };
    let containerd = start_containerd_cri(&env, "containerd", &sock, &cri).await;
    let kubelet = Kubelet {
        image_service: images,
        runtime: containerd.sock.clone(),
        log_dir: env.path("pods"),
    };
    let (user, password) = CREDS.split_once(':').expect("creds");

    // PullImage with the pod's pull secret, as kubelet sends it.
    let pulled = kubelet
        .pull_image(&image, Some((user, password)))
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
    let status = kubelet.image_status(&image).await.expect("ImageStatus");
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

    // A pod runs (its sandbox image pulled like any other); nothing has read /etc/release or
    // /big.bin yet, so their layers have not been fetched by anyone.
    kubelet
        .pull_image(&pause, Some((user, password)))
        .await
        .expect("PullImage of the sandbox image");
    let pod = kubelet
        .run_pod("web")
        .await
        .unwrap_or_else(|s| panic!("RunPodSandbox: {s:?}\n{}", containerd.proc.output()));
    let app = kubelet
        .start_container(&pod, "app", &image, &["/bin/busybox", "sleep", "600"])
        .await
        .unwrap_or_else(|s| panic!("app container: {s:?}\n{}", containerd.proc.output()));

    // kill -9 of dfsnapshotter, proxy and all: the FUSE manager keeps serving and keeps the
    // secret, so the running container reads a file of a layer nobody fetched before.
    snap.kill9().await;
    let snap = start_snapshotter(&env, "dfsnapshotter-2", &root, &sock, &metrics, &flags).await;
    let (code, out) = kubelet
        .exec(&app, &["/bin/cat", "/etc/release"])
        .await
        .expect("ExecSync");
    assert_eq!(code, 0, "exec after kill -9: {out}\n{}", snap.output());
    assert!(out.contains("damselfly test image"), "{out}");
    // A new container of the image starts (containerd redials the new snapshotter).
    let c1 = kubelet
        .start_container(&pod, "c1", &image, &["/bin/cat", "/small-file"])
        .await
        .unwrap_or_else(|s| panic!("c1 after the restart: {s:?}\n{}", snap.output()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !kubelet
        .container_log(&pod, "c1")
        .contains("hello from damselfly")
    {
        assert!(
            Instant::now() < deadline,
            "c1 wrote: {:?}",
            kubelet.container_log(&pod, "c1")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The registry rotates alice's password, and kubelet pulls again with the new secret (the
    // registry takes it once it has read the new htpasswd)...
    let rotated = "through-the-looking-glass";
    set_htpasswd(&env, &[(user.to_owned(), rotated.to_owned())]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match kubelet.pull_image(&image, Some((user, rotated))).await {
            Ok(_) => break,
            Err(s) => assert!(
                unauthorized(&s) && Instant::now() < deadline,
                "PullImage with the rotated password: {s:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // ...while another pod still has the old secret: its pull is refused, and must not leave
    // the stale secret in place of the working one.
    let stale = kubelet
        .pull_image(&image, Some((user, password)))
        .await
        .expect_err("the registry still takes the old password");
    assert!(unauthorized(&stale), "{stale:?}");
    // The running container reads the big file (a layer first read now, so the supernode asks
    // the registry with what the FUSE manager holds) byte-exact.
    let (code, out) = kubelet
        .exec(&app, &["/bin/busybox", "sha256sum", "/big.bin"])
        .await
        .expect("ExecSync");
    assert_eq!(
        code,
        0,
        "exec after rotation: {out}\n{}",
        std::fs::read_to_string(root.join("fusemanager.log")).unwrap_or_default()
    );
    assert!(out.contains(&big_sha), "big.bin differs: {out}");
    kubelet
        .delete_pod(pod, &[app, c1])
        .await
        .expect("delete the pod");

    // Another private repository without a secret is refused, whatever the first pull left.
    let refused = kubelet
        .pull_image(&format!("{addr}/project/other:v1"), None)
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

    // RemoveImage (kubelet's image GC) of both images: the layers go, and with them the secret.
    for i in [&image, &pause] {
        kubelet.remove_image(i).await.expect("RemoveImage");
    }
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
