//! Lazy starts from a private registry (issue: Kubernetes lazy starts from private registries):
//! a TLS registry with a test CA and htpasswd, its CA given to dfsnapshotter only through
//! containerd's `hosts.toml`, no docker config anywhere. `dfsnapshotter pull --user alice
//! --password-stdin` hands alice's credentials to the FUSE manager for `project/app` alone; the
//! container starts lazily, reads the big file byte-exact, and goes on reading files it never
//! read after dfsnapshotter is killed -9 and restarted (the manager kept the credentials). A
//! pull of another repository gets none of them. A third image's credentials come from a docker
//! credential helper (`credHelpers` in `config.json`, a test `docker-credential-test`), which the
//! FUSE manager asks itself. The password is in no log, store, label or argv. Removing the
//! images unmounts their layers and forgets their credentials.

use std::path::Path;

use base64::Engine;
use damselfly_tests::containerd::{
    containerd_missing, start_containerd_named, start_snapshotter_with,
};
use damselfly_tests::harness::{Env, bin, free_port, get_text, is_root, metric};
use damselfly_tests::pki::ensure_hosts_entry;
use damselfly_tests::registry::{
    CREDS, PrivateRegistry, big_file_sha256, build_test_image, copy_image, private_registry,
    tools_missing,
};

fn skip_reason() -> Option<String> {
    tools_missing()
        .or_else(containerd_missing)
        .or_else(|| (!is_root()).then(|| "FUSE mounts need root".to_owned()))
        .or_else(|| (!Path::new("/dev/fuse").exists()).then(|| "no /dev/fuse".to_owned()))
        .or_else(|| ensure_hosts_entry().err())
}

/// `dfsnapshotter pull` with `flags` and `stdin`, `$HOME` in the test's dir (no docker config
/// there but what the test writes) and `path` as `$PATH`; exit status and output.
async fn pull(env: &Env, path: &str, flags: &[&str], stdin: &str) -> (bool, String) {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(bin("dfsnapshotter"))
        .arg("pull")
        .args(flags)
        .env("HOME", env.path("home"))
        .env("PATH", path)
        .env_remove("DOCKER_CONFIG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run dfsnapshotter pull");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin.as_bytes()).await.expect("stdin");
    drop(input);
    let out = child.wait_with_output().await.expect("pull");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Whether any process's argv holds `secret`.
fn in_some_argv(secret: &str) -> Option<String> {
    let procs = std::fs::read_dir("/proc").ok()?;
    for p in procs.flatten() {
        if let Ok(argv) = std::fs::read(p.path().join("cmdline"))
            && argv.windows(secret.len()).any(|w| w == secret.as_bytes())
        {
            return Some(String::from_utf8_lossy(&argv).replace('\0', " "));
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_images_start_lazily_with_credentials_handed_to_their_scope() {
    if let Some(why) = skip_reason() {
        damselfly_tests::harness::skip(
            "private_images_start_lazily_with_credentials_handed_to_their_scope",
            &why,
        );
        return;
    }
    let env = Env::new("lazy-private");
    let PrivateRegistry {
        addr,
        ca,
        grpc,
        proc: _registry,
        supernode: _sn,
        ..
    } = private_registry(&env, 8 << 20).await;
    let big_sha = big_file_sha256(&env);
    // The same image under another repository (the same blobs).
    copy_image(
        &format!("docker://{addr}/project/app:v1"),
        &format!("docker://{addr}/project/other:v1"),
        Some(CREDS),
    )
    .await;

    // The registry's CA reaches dfsnapshotter only through containerd's host config.
    let hosts = env.path("certs.d");
    std::fs::create_dir_all(hosts.join(&addr)).expect("mkdir certs.d");
    std::fs::write(
        hosts.join(&addr).join("hosts.toml"),
        format!("server = \"https://{addr}\"\n[host.\"https://{addr}\"]\n  ca = \"{ca}\"\n"),
    )
    .expect("hosts.toml");
    let hosts_dir = hosts.to_string_lossy().into_owned();

    // A credential helper, kept outside the test's dir (it knows the password), on the PATH of
    // the pull and of dfsnapshotter (whose FUSE manager asks it too).
    let helpers = tempfile::tempdir().expect("helper dir");
    let helper = helpers.path().join("docker-credential-test");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\nread server\necho \"$server\" >> {log}\n\
             printf '{{\"ServerURL\":\"%s\",\"Username\":\"{user}\",\"Secret\":\"{pass}\"}}' \"$server\"\n",
            log = env.path("helper-calls").display(),
            user = CREDS.split_once(':').expect("creds").0,
            pass = CREDS.split_once(':').expect("creds").1,
        ),
    )
    .expect("helper");
    std::fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod helper");
    let path = format!(
        "{}:{}",
        helpers.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let (_agent, daemon) = env.dfdaemon("agent", &grpc, &[]).await;
    let root = env.path("snapshots");
    let sock = env.path("snapshotter.sock");
    let metrics = format!("127.0.0.1:{}", free_port());
    let flags = vec![
        "--agent-socket".to_owned(),
        daemon.socket.to_string_lossy().into_owned(),
        "--hosts-dir".to_owned(),
        hosts_dir.clone(),
        "--background-fetch".to_owned(),
        "false".to_owned(),
    ];
    let envs = [("PATH", path.as_str())];
    let at = (root.as_path(), sock.as_path(), metrics.as_str());
    let mut snap = start_snapshotter_with(&env, "dfsnapshotter", at, &flags, &envs).await;
    let containerd = start_containerd_named(&env, "containerd", Some(&sock)).await;
    let root_s = root.to_string_lossy().into_owned();
    let ctd = containerd.sock.to_string_lossy().into_owned();
    let (user, password) = CREDS.split_once(':').expect("creds");
    let image = format!("{addr}/project/app:v1");
    let base = [
        "--root",
        &root_s,
        "--containerd",
        &ctd,
        "-n",
        "private",
        "--hosts-dir",
        &hosts_dir,
    ];

    // Without credentials the registry refuses, and the pull says so.
    let (ok, out) = pull(&env, &path, &[&base[..], &[image.as_str()]].concat(), "").await;
    assert!(!ok, "an anonymous pull of a private image worked: {out}");
    assert!(out.contains("401"), "{out}");

    // With alice's: every layer mounts lazily.
    let (ok, out) = pull(
        &env,
        &path,
        &[&base[..], &["--user", user, "--password-stdin", &image]].concat(),
        &format!("{password}\n"),
    )
    .await;
    assert!(ok, "dfsnapshotter pull: {out}\n{}", snap.output());
    assert!(
        out.contains("4 of 4 layers") && out.contains("mounted lazily"),
        "{out}"
    );
    let run = |id: &'static str, cmd: &'static [&'static str]| {
        let (containerd, image) = (&containerd, image.clone());
        async move {
            let mut args = vec!["-n", "private", "run", "--rm", "--snapshotter", "damselfly"];
            args.push(&image);
            args.push(id);
            args.extend_from_slice(cmd);
            containerd.ctr(&args).await
        }
    };
    let (code, out) = run("c1", &["/bin/cat", "/small-file"]).await;
    assert_eq!(code, 0, "ctr run: {out}\n{}", snap.output());
    assert!(out.contains("hello from damselfly"), "{out}");
    let fetched = daemon
        .metric("damselfly_peer_download_bytes_total", "")
        .await;
    assert!(
        fetched < f64::from(8u32 << 20) * 0.5,
        "starting fetched {fetched} bytes of an 8 MiB layer"
    );

    // kill -9 of dfsnapshotter: the FUSE manager keeps alice's credentials, so a file never read
    // before (the big one, with background fetch off) reads byte-exact after the restart.
    snap.kill9().await;
    let _snap = start_snapshotter_with(&env, "dfsnapshotter-2", at, &flags, &envs).await;
    let out = containerd
        .ctr_until_ok(
            &[
                "-n",
                "private",
                "run",
                "--rm",
                "--snapshotter",
                "damselfly",
                &image,
                "c2",
                "/bin/busybox",
                "sha256sum",
                "/big.bin",
            ],
            std::time::Duration::from_secs(30),
        )
        .await;
    assert!(out.contains(&big_sha), "big.bin differs: {out}");
    // Credentials are made once per image and reused by the reads that follow, not per read.
    let text = get_text(&format!("http://{metrics}/metrics")).await;
    let made = metric(
        &text,
        "damselfly_snapshotter_read_credentials_total",
        "made",
    );
    let reused = metric(
        &text,
        "damselfly_snapshotter_read_credentials_total",
        "reused",
    );
    eprintln!("read credentials: made={made} reused={reused}");
    assert!(
        (1.0..=3.0).contains(&made) && reused >= 2.0,
        "read credentials made {made} times, reused {reused} times"
    );

    // Alice's credentials were handed over for project/app only: another repository of the
    // same registry gets none of them.
    let other = format!("{addr}/project/other:v1");
    let (ok, out) = pull(&env, &path, &[&base[..], &[other.as_str()]].concat(), "").await;
    assert!(
        !ok,
        "project/other was pulled with project/app's credentials: {out}"
    );
    assert!(out.contains("401"), "{out}");

    // A third image, with credentials from the helper that docker's config names for the
    // registry: the pull and the FUSE manager ask it; its big file reads byte-exact.
    let layout = build_test_image(&env, "image2", 2 << 20).await;
    let helped = format!("{addr}/project/helped:v1");
    copy_image(
        &format!("oci:{layout}"),
        &format!("docker://{helped}"),
        Some(CREDS),
    )
    .await;
    let docker = env.path("home/.docker");
    std::fs::create_dir_all(&docker).expect("mkdir .docker");
    std::fs::write(
        docker.join("config.json"),
        format!(r#"{{"credHelpers":{{"{addr}":"test"}}}}"#),
    )
    .expect("config.json");
    let (ok, out) = pull(&env, &path, &[&base[..], &[helped.as_str()]].concat(), "").await;
    assert!(ok, "pull with a credential helper: {out}");
    let helped_sha =
        std::fs::read_to_string(env.path("image2").join("big.bin.sha256")).expect("image2's hash");
    let out = containerd
        .ctr_until_ok(
            &[
                "-n",
                "private",
                "run",
                "--rm",
                "--snapshotter",
                "damselfly",
                &helped,
                "c3",
                "/bin/busybox",
                "sha256sum",
                "/big.bin",
            ],
            std::time::Duration::from_secs(30),
        )
        .await;
    assert!(
        out.contains(&helped_sha),
        "big.bin of the helped image: {out}"
    );
    let calls = std::fs::read_to_string(env.path("helper-calls")).expect("helper calls");
    assert!(
        calls.lines().count() >= 2 && calls.lines().all(|l| l == addr),
        "the helper was asked {calls:?} (by the pull and by the FUSE manager, for {addr})"
    );

    // The password is in no log, store, index, containerd metadata or label, and in no argv.
    let snapshots = ["-n", "private", "snapshots", "--snapshotter", "damselfly"];
    let (code, list) = containerd.ctr(&[&snapshots[..], &["ls"]].concat()).await;
    assert_eq!(code, 0, "{list}");
    let mut labels = String::new();
    for key in list
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
    {
        let (code, info) = containerd
            .ctr(&[&snapshots[..], &["info", key]].concat())
            .await;
        assert_eq!(code, 0, "{info}");
        labels.push_str(&info);
    }
    assert!(
        labels.contains("containerd.io/snapshot/cri.image-ref"),
        "no labels seen: {labels}"
    );
    let basic = base64::engine::general_purpose::STANDARD.encode(CREDS);
    for secret in [password, basic.as_str()] {
        assert!(!labels.contains(secret), "{secret:?} in a snapshot label");
        assert_eq!(in_some_argv(secret), None, "{secret:?} in argv");
    }
    env.assert_no_secret(&[password, &basic]);

    // Image removal: containerd's garbage collector removes the snapshots, the layers are
    // unmounted, and with the last layer of a scope its credentials are forgotten.
    let scopes = || async {
        let text = get_text(&format!("http://{metrics}/metrics")).await;
        metric(&text, "damselfly_snapshotter_credential_scopes", "")
    };
    assert_eq!(
        scopes().await,
        2.0,
        "app's and helped's credentials are held"
    );
    for name in [&image, &helped] {
        let (code, out) = containerd
            .ctr(&["-n", "private", "images", "rm", "--sync", name])
            .await;
        assert_eq!(code, 0, "ctr images rm: {out}");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while scopes().await > 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "credentials still held after the images were removed:\n{}",
            std::fs::read_to_string(root.join("fusemanager.log")).unwrap_or_default()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_that_cannot_be_mounted_lazily_are_pulled_normally() {
    if let Some(why) = skip_reason() {
        damselfly_tests::harness::skip(
            "layers_that_cannot_be_mounted_lazily_are_pulled_normally",
            &why,
        );
        return;
    }
    let env = Env::new("lazy-fallback");
    let PrivateRegistry {
        addr,
        ca,
        proc: registry,
        layers,
        ..
    } = private_registry(&env, 4 << 20).await;
    let big_sha = big_file_sha256(&env);
    // This host's supernode was not given the registry's CA: it can seed nothing, so no layer
    // index can be built and no layer mounts lazily.
    let (_sn, grpc, _) = env.supernode("sn-without-ca", &[]).await;
    let hosts = env.path("certs.d");
    std::fs::create_dir_all(hosts.join(&addr)).expect("mkdir certs.d");
    std::fs::write(
        hosts.join(&addr).join("hosts.toml"),
        format!("server = \"https://{addr}\"\nca = \"{ca}\"\n"),
    )
    .expect("hosts.toml");
    let hosts_dir = hosts.to_string_lossy().into_owned();
    let (_agent, daemon) = env.dfdaemon("agent", &grpc, &[]).await;
    let root = env.path("snapshots");
    let sock = env.path("snapshotter.sock");
    let metrics = format!("127.0.0.1:{}", free_port());
    let flags = vec![
        "--agent-socket".to_owned(),
        daemon.socket.to_string_lossy().into_owned(),
        "--hosts-dir".to_owned(),
        hosts_dir.clone(),
    ];
    let at = (root.as_path(), sock.as_path(), metrics.as_str());
    let snap = start_snapshotter_with(&env, "dfsnapshotter", at, &flags, &[]).await;
    let containerd = start_containerd_named(&env, "containerd", Some(&sock)).await;
    let (root_s, ctd) = (
        root.to_string_lossy().into_owned(),
        containerd.sock.to_string_lossy().into_owned(),
    );
    let image = format!("{addr}/project/app:v1");
    let (user, password) = CREDS.split_once(':').expect("creds");
    let path = std::env::var("PATH").unwrap_or_default();
    let (ok, out) = pull(
        &env,
        &path,
        &[
            "--root",
            &root_s,
            "--containerd",
            &ctd,
            "-n",
            "fallback",
            "--hosts-dir",
            &hosts_dir,
            "--user",
            user,
            "--password-stdin",
            &image,
        ],
        &format!("{password}\n"),
    )
    .await;
    assert!(
        ok,
        "the pull failed instead of falling back: {out}\n{}",
        snap.output()
    );
    assert!(
        out.contains("0 of 4 layers") && out.contains("4 layers could not be mounted lazily"),
        "{out}"
    );
    assert_eq!(
        out.matches("could not be mounted lazily").count(),
        1,
        "said more than once: {out}"
    );
    let out = containerd
        .ctr_until_ok(
            &[
                "-n",
                "fallback",
                "run",
                "--rm",
                "--snapshotter",
                "damselfly",
                &image,
                "c1",
                "/bin/busybox",
                "sha256sum",
                "/big.bin",
            ],
            std::time::Duration::from_secs(30),
        )
        .await;
    assert!(out.contains(&big_sha), "big.bin differs: {out}");
    // The pull itself read every layer from the registry.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !layers
        .iter()
        .all(|d| damselfly_tests::registry::count_blob_gets(&registry.output(), d) >= 1)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "not every layer was read from the registry:\n{}",
            registry.output()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
