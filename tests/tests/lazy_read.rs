//! The lazy read path end to end, without containerd: a layer seeded by the supernode is mounted
//! over FUSE on another host from its index, and its files are read through that host's agent
//! (pieces from peers), byte for byte what the layer holds; reads made while that agent crashed
//! (kill -9) wait for it to come back instead of failing.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use damselfly_tests::harness::{Env, is_root};
use damselfly_tests::registry::{
    push_test_image, skopeo_copy_to_oci, start_registry, tools_missing,
};
use layerindex::LayerIndex;
use snapshotter::layerfs::{AgentBlob, LayerFs, mount};

/// Regular files of a gzip layer and their bytes, as `tar` reads them.
fn layer_files(blob: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut a = tar::Archive::new(flate2::read::GzDecoder::new(blob));
    for e in a.entries().expect("entries") {
        let mut e = e.expect("entry");
        if e.header().entry_type() == tar::EntryType::Regular {
            let path = e
                .path()
                .expect("path")
                .to_string_lossy()
                .trim_start_matches("./")
                .to_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).expect("data");
            out.push((path, data));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_mounted_from_its_index_reads_through_the_agent() {
    let skip = tools_missing()
        .or_else(|| (!is_root()).then(|| "FUSE mounts need root".to_owned()))
        .or_else(|| (!Path::new("/dev/fuse").exists()).then(|| "no /dev/fuse".to_owned()));
    if let Some(why) = skip {
        damselfly_tests::harness::skip(
            "a_layer_mounted_from_its_index_reads_through_the_agent",
            &why,
        );
        return;
    }
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let env = Env::new("lazy-read");
    let (_registry, registry) = start_registry(&env).await;
    let layers = push_test_image(&env, &registry, "project/app:v1", 12 << 20).await;
    let (_sn, grpc, _http) = env.supernode("sn", &[]).await;
    let mirror = format!("http://{registry}");
    let (_a, a) = env
        .dfdaemon("host-a", &grpc, &["--registry-mirror", &mirror])
        .await;
    let (mut b_proc, mut b) = env
        .dfdaemon("host-b", &grpc, &["--registry-mirror", &mirror])
        .await;
    // Host A pulls the image: the supernode seeds (and can index) every layer.
    let (code, out) =
        skopeo_copy_to_oci(&format!("{}/project/app:v1", a.proxy), &env.path("a-pull")).await;
    assert_eq!(code, 0, "{out}");

    let client = reqwest::Client::new();
    let agent = fetcher::agent::connect(&b.socket).await.expect("agent b");
    for (i, digest) in layers.iter().enumerate().take(2) {
        let url = format!("{mirror}/v2/project/app/blobs/{digest}");
        let bytes = damselfly_tests::harness::agent_layer_index(&b.socket, &url, &[], digest)
            .await
            .expect("index through host B's agent");
        let index = LayerIndex::from_bytes(&bytes).expect("parse");
        let blob = client
            .get(&url)
            .send()
            .await
            .expect("blob")
            .bytes()
            .await
            .expect("bytes");
        let want = layer_files(&blob);
        assert!(!want.is_empty());
        let fs = LayerFs::new(
            digest.clone(),
            Arc::new(index),
            Arc::new(AgentBlob {
                handle: tokio::runtime::Handle::current(),
                client: agent.clone(),
                url,
                headers: Arc::new(Vec::new()),
                digest: digest.clone(),
                only_range: false,
            }),
            snapshotter::metrics::Metrics::new(),
        );
        let mnt = env.path(&format!("mnt{i}"));
        std::fs::create_dir_all(&mnt).expect("mkdir");
        let session = mount(fs, &mnt).expect("mount");
        // The second layer is read while host B's agent crashes and comes back: reads wait for it.
        if i == 1 {
            b_proc.kill9().await;
        }
        let reading = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let started = reading.clone();
        let reads = tokio::task::spawn_blocking(move || {
            started.store(true, std::sync::atomic::Ordering::SeqCst);
            want.iter()
                .map(|(path, data)| {
                    (
                        path.clone(),
                        std::fs::read(mnt.join(path)).map(|got| got == *data),
                    )
                })
                .collect::<Vec<_>>()
        });
        if i == 1 {
            while !reading.load(std::sync::atomic::Ordering::SeqCst) {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            (b_proc, b) = env
                .dfdaemon("host-b", &grpc, &["--registry-mirror", &mirror])
                .await;
        }
        let reads = reads.await.expect("reads");
        snapshotter::layerfs::unmount(session).expect("unmount");
        for (path, ok) in reads {
            assert!(
                matches!(ok, Ok(true)),
                "layer {i} /{path} through FUSE: {ok:?}"
            );
        }
    }
    // Host B got the layers from the cluster, not the registry.
    let m = damselfly_tests::harness::get_text(&format!("http://{}/metrics", b.metrics)).await;
    let from_origin = damselfly_tests::harness::metric(
        &m,
        "damselfly_peer_download_bytes_total",
        "from=\"origin\"",
    );
    assert_eq!(from_origin, 0.0, "host B went to the registry:\n{m}");
}
