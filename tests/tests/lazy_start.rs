//! Lazy container starts end to end: `dfsnapshotter pull` makes an image runnable on a real
//! containerd without downloading its layers; `ctr run --snapshotter damselfly` starts at once and
//! every byte read comes through the host's agent (pieces from the supernode or the other host),
//! exactly the layer's bytes. Two hosts, each with its own agent, dfsnapshotter and containerd;
//! the registry serves each layer once (to the supernode). After kill -9, dfsnapshotter remounts
//! its layers and new containers start.

use std::path::Path;
use std::time::{Duration, Instant};

use damselfly_tests::containerd::{
    Containerd, containerd_missing, rootfs_listing, start_containerd_named, start_snapshotter,
};
use damselfly_tests::harness::{Daemon, Env, Proc, bin, free_port, is_root};
use damselfly_tests::host::{assert_private, files_under};
use damselfly_tests::registry::{
    big_file_sha256, count_blob_gets, push_test_image, skopeo, start_registry, tools_missing,
};

struct Host {
    daemon: Daemon,
    _agent: Proc,
    snapshotter: Proc,
    containerd: Containerd,
    root: std::path::PathBuf,
    sock: std::path::PathBuf,
    metrics: String,
}

async fn snapshotter(
    env: &Env,
    name: &str,
    h: (&Path, &Path, &str),
    agent: &Path,
    registry: &str,
    background_fetch: bool,
    extra: &[&str],
) -> Proc {
    let mut args = vec![
        "--agent-socket".into(),
        agent.to_string_lossy().into_owned(),
        "--plain-http".into(),
        registry.to_owned(),
        "--background-fetch".into(),
        background_fetch.to_string(),
    ];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    start_snapshotter(env, name, h.0, h.1, h.2, &args).await
}

async fn host(
    env: &Env,
    name: &str,
    supernode: &str,
    registry: &str,
    background_fetch: bool,
    extra: &[&str],
) -> Host {
    let (agent, daemon) = env.dfdaemon(&format!("{name}-agent"), supernode, &[]).await;
    let root = env.path(&format!("{name}-snapshots"));
    let sock = env.path(&format!("{name}-snapshotter.sock"));
    let metrics = format!("127.0.0.1:{}", free_port());
    let snap = snapshotter(
        env,
        &format!("{name}-dfsnapshotter"),
        (&root, &sock, &metrics),
        &daemon.socket,
        registry,
        background_fetch,
        extra,
    )
    .await;
    let containerd = start_containerd_named(env, &format!("{name}-containerd"), Some(&sock)).await;
    Host {
        daemon,
        _agent: agent,
        snapshotter: snap,
        containerd,
        root,
        sock,
        metrics,
    }
}

/// `dfsnapshotter pull IMAGE` into the host's containerd.
async fn pull(h: &Host, image: &str, registry: &str) -> String {
    let out = tokio::process::Command::new(bin("dfsnapshotter"))
        .arg("pull")
        .arg("--containerd")
        .arg(&h.containerd.sock)
        .args(["-n", "damselfly-test", "--plain-http", registry, image])
        .output()
        .await
        .expect("run dfsnapshotter pull");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "dfsnapshotter pull: {text}");
    text
}

async fn run(h: &Host, image: &str, id: &str, cmd: &[&str]) -> String {
    let mut args = vec!["run", "--rm", "--snapshotter", "damselfly", image, id];
    args.extend_from_slice(cmd);
    let (code, out) = h.containerd.ctr(&args).await;
    assert_eq!(code, 0, "ctr run {cmd:?}: {out}");
    out
}

/// The value of the snapshotter metric `name{labels}` at `addr` once it is above zero and no
/// start `work` (record, prefetch) is pending (within 30 s).
async fn settled(addr: &str, name: &str, labels: &str, work: &str) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let pending = format!("work=\"{work}\"");
    loop {
        let text = damselfly_tests::harness::get_text(&format!("http://{addr}/metrics")).await;
        let v = damselfly_tests::harness::metric(&text, name, labels);
        let busy = damselfly_tests::harness::metric(
            &text,
            "damselfly_snapshotter_starts_pending",
            &pending,
        );
        if v > 0.0 && busy == 0.0 {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{{{labels}}} stayed 0:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `damselfly_snapshotter_layer_fetched_ratio` of `layer` in metrics `text` (panics if absent).
fn layer_fetched(text: &str, layer: &str) -> f64 {
    let label = format!("layer=\"{layer}\"");
    assert!(
        text.contains(&format!(
            "damselfly_snapshotter_layer_fetched_ratio{{{label}}}"
        )),
        "no fetched share for mounted layer {layer}:\n{text}"
    );
    damselfly_tests::harness::metric(text, "damselfly_snapshotter_layer_fetched_ratio", &label)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dfsnapshotter_pull_starts_containers_lazily_on_two_hosts() {
    let skip = tools_missing()
        .or_else(containerd_missing)
        .or_else(|| (!is_root()).then(|| "FUSE mounts need root".to_owned()))
        .or_else(|| (!Path::new("/dev/fuse").exists()).then(|| "no /dev/fuse".to_owned()));
    if let Some(why) = skip {
        damselfly_tests::harness::skip(
            "dfsnapshotter_pull_starts_containers_lazily_on_two_hosts",
            &why,
        );
        return;
    }
    let env = Env::new("lazy-start");
    let (registry_proc, registry) = start_registry(&env).await;
    let layers = push_test_image(&env, &registry, "project/app:v1", 200 << 20).await;
    let big_sha = big_file_sha256(&env);
    let (_sn, grpc, _http) = env.supernode("sn", &[]).await;
    let image = format!("{registry}/project/app:v1");

    // Host A: pull (manifest and config only), then run.
    // Its start is what its layers' reads touch within a second of the first.
    let mut a = host(&env, "a", &grpc, &registry, true, &["--start-window", "1s"]).await;
    let out = pull(&a, &image, &registry).await;
    assert!(out.contains("4 of 4 layers"), "{out}");
    let (code, out) = a.containerd.ctr(&["images", "ls"]).await;
    assert!(
        code == 0 && out.contains(&image),
        "image not in containerd: {out}"
    );
    let out = run(&a, &image, "a1", &["/bin/cat", "/small-file"]).await;
    assert!(out.contains("hello from damselfly"), "{out}");
    // Host A started the image first: what the start read is recorded at the supernode.
    let recorded = settled(
        &a.metrics,
        "damselfly_snapshotter_start_sets_total",
        "outcome=\"kept\"",
        "record",
    )
    .await;
    let out = run(&a, &image, "a2", &["/bin/busybox", "sha256sum", "/big.bin"]).await;
    assert!(
        out.contains(&big_sha),
        "big.bin read through FUSE differs: {out}"
    );
    // Host hardening (review finding 6): nobody but root reads the agent's pieces, the
    // supernode's cache, the snapshots or a lazy mount's files.
    let (agent_store, sn_store) = (env.path("a-agent"), env.path("sn"));
    let any = |_: &Path| true;
    let mut files = files_under(&agent_store.join("tasks"), 2, &any);
    files.extend(files_under(&sn_store.join("tasks"), 2, &any));
    files.extend(files_under(&a.root, 1, &|p: &Path| {
        p.ends_with("small-file")
    }));
    files.extend(files_under(&a.root, 1, &|p: &Path| p.ends_with("big.bin")));
    assert_eq!(files.len(), 6, "expected files to check, found {files:?}");
    assert_private(&env, &[agent_store, sn_store, a.root.clone()], &files);
    // Host A fetches its layers whole in the background: each layer's share reaches 1.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = damselfly_tests::harness::get_text(&format!("http://{}/metrics", a.metrics)).await;
        let shares: Vec<f64> = layers.iter().map(|l| layer_fetched(&m, l)).collect();
        if shares.iter().all(|s| *s == 1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "host A's layers fetched: {shares:?}\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Host B: the same, with the layers already in the cluster.
    // Host B: the same, with the layers already in the cluster and background fetching off, so
    // the agent fetches only what the container reads.
    let b = host(&env, "b", &grpc, &registry, false, &[]).await;
    let started = Instant::now();
    pull(&b, &image, &registry).await;
    // Its mounts fetched what A's start read, before the container asks: the same start then
    // takes nothing more over the network.
    let prefetched = settled(
        &b.metrics,
        "damselfly_snapshotter_prefetched_layers_total",
        "",
        "prefetch",
    )
    .await;
    assert_eq!(prefetched, recorded, "layers prefetched vs recorded");
    let before = b
        .daemon
        .metric("damselfly_peer_download_bytes_total", "")
        .await;
    let out = run(&b, &image, "b0", &["/bin/cat", "/small-file"]).await;
    assert!(out.contains("hello from damselfly"), "{out}");
    let lazy = started.elapsed();
    let fetched = b
        .daemon
        .metric("damselfly_peer_download_bytes_total", "")
        .await;
    assert!(before > 0.0, "nothing prefetched");
    assert_eq!(
        fetched,
        before,
        "the start fetched {} bytes its prefetch had not",
        fetched - before
    );
    let image_bytes = f64::from(200u32 << 20);
    assert!(
        fetched < 0.1 * image_bytes,
        "starting a container fetched {fetched} bytes of a >200 MiB image"
    );
    eprintln!("start fetched {:.2} MiB", fetched / f64::from(1u32 << 20));
    // Host B fetches only what is read: little of the big layer so far.
    let m = damselfly_tests::harness::get_text(&format!("http://{}/metrics", b.metrics)).await;
    let big = layer_fetched(&m, &layers[1]);
    assert!(
        big < 0.5,
        "host B holds {big} of the big layer before reading it:\n{m}"
    );
    let out = run(&b, &image, "b1", &["/bin/busybox", "sha256sum", "/big.bin"]).await;
    assert!(out.contains(&big_sha), "big.bin on host B differs: {out}");
    let fetched = b
        .daemon
        .metric("damselfly_peer_download_bytes_total", "")
        .await;
    assert!(
        fetched >= image_bytes,
        "reading big.bin fetched only {fetched} bytes"
    );
    let peers = b
        .daemon
        .metric("damselfly_peer_download_bytes_total", "from=\"peer\"")
        .await;
    let origin = b
        .daemon
        .metric("damselfly_peer_download_bytes_total", "from=\"origin\"")
        .await;
    assert_eq!(origin, 0.0, "host B went to the registry");
    assert!(peers > 0.0, "host B took nothing from host A");
    // The registry served each layer once: to the supernode.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = registry_proc.output();
    for d in &layers {
        assert_eq!(
            count_blob_gets(&log, d),
            1,
            "layer {d} fetched more than once"
        );
    }
    // Conformance: the lazily mounted rootfs equals what containerd's overlayfs snapshotter
    // unpacks from the same image (this pull downloads the layers from the registry).
    let started = Instant::now();
    let (code, out) = b
        .containerd
        .ctr(&["images", "pull", "--plain-http", &image])
        .await;
    assert_eq!(code, 0, "ctr images pull (overlayfs): {out}");
    // Informational only (timings belong to tests/bench): the lazy start vs a full pull.
    eprintln!(
        "lazy pull+start {:.2}s, ctr images pull {:.2}s",
        lazy.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    let ours = rootfs_listing(&b.containerd, &image, "damselfly", "b2").await;
    let theirs = rootfs_listing(&b.containerd, &image, "overlayfs", "b3").await;
    for gone in ["old-config", " a\n", " b\n", "sub"] {
        assert!(!ours.contains(gone), "{gone:?} should be deleted:\n{ours}");
    }
    assert!(
        ours.lines()
            .any(|l| l.contains("release-hardlink") && l.split_whitespace().nth(1) == Some("2")),
        "the hard link shows two links:\n{ours}"
    );
    assert_eq!(ours, theirs, "the lazy rootfs differs from overlayfs's");

    // The same image with its small layers as zstd (no checkpoints: such a layer is fetched and
    // decompressed whole on its first read, then served locally).
    let zstd_image = format!("{registry}/project/app-zstd:v1");
    let layout = env.path("image").join("oci");
    damselfly_tests::registry::zstd_layers(&layout, 16 << 20);
    let (code, out) = skopeo(
        &[
            "--insecure-policy",
            "copy",
            "--dest-tls-verify=false",
            &format!("oci:{}:app", layout.display()),
            &format!("docker://{zstd_image}"),
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "push zstd: {out}");
    let (code, raw) = skopeo(
        &[
            "inspect",
            "--tls-verify=false",
            "--raw",
            &format!("docker://{zstd_image}"),
        ],
        &[],
    )
    .await;
    assert!(
        code == 0 && raw.contains("tar+zstd"),
        "not zstd layers: {raw}"
    );
    pull(&b, &zstd_image, &registry).await;
    let out = run(&b, &zstd_image, "z1", &["/bin/cat", "/small-file"]).await;
    assert!(out.contains("hello from damselfly"), "zstd image: {out}");

    let m = damselfly_tests::harness::get_text(&format!("http://{}/metrics", a.metrics)).await;
    let fuse =
        damselfly_tests::harness::metric(&m, "damselfly_snapshotter_fuse_read_bytes_total", "");
    assert!(
        fuse >= f64::from(200u32 << 20),
        "FUSE reads not counted: {fuse}\n{m}"
    );

    // kill -9 of dfsnapshotter while a container runs: its layers stay mounted and served (by the
    // FUSE manager), so the running container reads a file it never read before; after the
    // restart, new containers start and read them too.
    let (code, out) = a
        .containerd
        .ctr(&[
            "run",
            "-d",
            "--snapshotter",
            "damselfly",
            &image,
            "long",
            "/bin/busybox",
            "sleep",
            "600",
        ])
        .await;
    assert_eq!(code, 0, "ctr run -d: {out}");
    a.snapshotter.kill9().await;
    let (code, out) = a
        .containerd
        .ctr(&[
            "tasks",
            "exec",
            "--exec-id",
            "e1",
            "long",
            "/bin/cat",
            "/opt/data/new",
        ])
        .await;
    let _ = a
        .containerd
        .ctr(&["tasks", "kill", "-s", "SIGKILL", "long"])
        .await;
    assert_eq!(
        code, 0,
        "a running container could not read after kill -9: {out}"
    );
    assert!(out.contains("replaced"), "{out}");
    a.snapshotter = snapshotter(
        &env,
        "a-dfsnapshotter-2",
        (&a.root, &a.sock, &a.metrics),
        &a.daemon.socket,
        &registry,
        true,
        &[],
    )
    .await;
    let out = a
        .containerd
        .ctr_until_ok(
            &[
                "run",
                "--rm",
                "--snapshotter",
                "damselfly",
                &image,
                "a3",
                "/bin/cat",
                "/etc/release",
            ],
            Duration::from_secs(30),
        )
        .await;
    assert!(out.contains("damselfly test image"), "{out}");
    let _ = a.containerd.ctr(&["tasks", "rm", "-f", "long"]).await;
    let _ = a.containerd.ctr(&["containers", "rm", "long"]).await;
}
