//! dfsnapshotter as containerd's `damselfly` proxy snapshotter: a real containerd unpacks an image
//! into it and runs containers on it; the rootfs equals what containerd's own overlayfs
//! snapshotter gives; snapshots survive kill -9 and a restart.

use std::path::Path;
use std::time::Duration;

use damselfly_tests::containerd::{containerd_missing, rootfs_listing, start_containerd};
use damselfly_tests::harness::{Env, Proc, free_port, get_text};
use damselfly_tests::registry::{push_test_image, start_registry, tools_missing};

async fn start_snapshotter(env: &Env, root: &Path, sock: &Path, metrics: &str) -> Proc {
    damselfly_tests::containerd::start_snapshotter(env, "dfsnapshotter", root, sock, metrics, &[])
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_unpacks_and_runs_images_on_dfsnapshotter_across_restarts() {
    if let Some(why) = tools_missing().or_else(containerd_missing) {
        damselfly_tests::harness::skip(
            "containerd_unpacks_and_runs_images_on_dfsnapshotter_across_restarts",
            &why,
        );
        return;
    }
    let env = Env::new("snapshotter");
    let (_registry, registry) = start_registry(&env).await;
    let layers = push_test_image(&env, &registry, "project/app:v1", 4 << 20).await;
    let root = env.path("snapshotter-root");
    let sock = env.path("snapshotter.sock");
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut snap = start_snapshotter(&env, &root, &sock, &metrics).await;
    let m = get_text(&format!("http://{metrics}/metrics")).await;
    assert!(
        m.contains("damselfly_snapshotter_fuse_read_bytes_total"),
        "{m}"
    );
    let c = start_containerd(&env, Some(&sock)).await;
    let image = format!("{registry}/project/app:v1");

    let (code, out) = c
        .ctr(&[
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            "damselfly",
            &image,
        ])
        .await;
    if code != 0 {
        env.dump_logs();
    }
    assert_eq!(code, 0, "ctr images pull --snapshotter damselfly: {out}");
    let (code, out) = c
        .ctr(&["snapshots", "--snapshotter", "damselfly", "ls"])
        .await;
    assert_eq!(code, 0, "{out}");
    let committed = out.lines().filter(|l| l.contains("Committed")).count();
    assert_eq!(
        committed,
        layers.len(),
        "one committed snapshot per layer:\n{out}"
    );

    let (code, out) = c
        .ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "damselfly",
            &image,
            "c1",
            "/bin/cat",
            "/small-file",
        ])
        .await;
    assert_eq!(code, 0, "ctr run on dfsnapshotter: {out}");
    assert!(out.contains("hello from damselfly"), "{out}");

    // The same image unpacked by containerd's own overlayfs snapshotter looks the same.
    let (code, out) = c.ctr(&["images", "pull", "--plain-http", &image]).await;
    assert_eq!(code, 0, "ctr images pull (overlayfs): {out}");
    let ours = rootfs_listing(&c, &image, "damselfly", "c2").await;
    let theirs = rootfs_listing(&c, &image, "overlayfs", "c3").await;
    assert!(ours.contains("big.bin") && ours.contains("new"), "{ours}");
    // The last layer's deletions hold: its whiteouts hide what layer 3 added.
    for gone in ["old-config", " a\n", " b\n", "sub"] {
        assert!(!ours.contains(gone), "{gone:?} should be deleted:\n{ours}");
    }
    assert_eq!(ours, theirs, "the rootfs differs from overlayfs's");

    // kill -9: the snapshots are still there after a restart, and containers run on them.
    snap.kill9().await;
    let _snap = start_snapshotter(&env, &root, &sock, &metrics).await;
    let out = c
        .ctr_until_ok(
            &[
                "run",
                "--rm",
                "--snapshotter",
                "damselfly",
                &image,
                "c4",
                "/bin/cat",
                "/etc/release",
            ],
            Duration::from_secs(20),
        )
        .await;
    assert!(out.contains("damselfly test image"), "{out}");
}
