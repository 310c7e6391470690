//! The supernode indexes a registry layer it seeded (tar TOC + gzip checkpoints) and serves the
//! index to agents that may read the layer (never to anonymous requests); with it, a file inside
//! the layer is read from a byte range of the blob alone.

use damselfly_tests::harness::Env;
use damselfly_tests::registry::{
    push_test_image, skopeo_copy_to_oci, start_registry, tools_missing,
};
use layerindex::{Kind, LayerIndex};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_layers_are_indexed_and_files_read_from_blob_ranges() {
    if let Some(why) = tools_missing() {
        eprintln!("SKIP seeded_layers_are_indexed_and_files_read_from_blob_ranges: {why}");
        return;
    }
    let env = Env::new("layer-index");
    let (_registry, registry) = start_registry(&env).await;
    let layers = push_test_image(&env, &registry, "project/app:v1", 6 << 20).await;
    let (_sn, grpc, http) = env.supernode("sn", &[]).await;
    let client = damselfly_tests::cluster::http_client();
    let index_url = |d: &str| format!("{http}/api/v1/index/{d}");

    // Without an index ticket: 401, whatever the digest.
    for d in [layers[0].as_str(), "sha256:xyz"] {
        let r = client.get(index_url(d)).send().await.expect("get");
        assert_eq!(r.status().as_u16(), 401, "anonymous index read of {d}");
    }

    // A pull through an agent seeds every layer at the supernode.
    let (_agent, d) = env
        .dfdaemon(
            "agent",
            &grpc,
            &["--registry-mirror", &format!("http://{registry}")],
        )
        .await;
    let (code, out) =
        skopeo_copy_to_oci(&format!("{}/project/app:v1", d.proxy), &env.path("pulled")).await;
    assert_eq!(code, 0, "{out}");

    // Still 401 once seeded; the agent gets it (with the ticket the supernode issues it).
    let r = client.get(index_url(&layers[0])).send().await.expect("get");
    assert_eq!(r.status().as_u16(), 401);
    let fetch_index = |digest: String| {
        let socket = d.socket.clone();
        let url = format!("http://{registry}/v2/project/app/blobs/{digest}");
        async move {
            let bytes = damselfly_tests::harness::agent_layer_index(&socket, &url, &[], &digest)
                .await
                .unwrap_or_else(|e| panic!("index of {digest}: {e}"));
            LayerIndex::from_bytes(&bytes).expect("parse index")
        }
    };
    // Two requests at once share one build.
    let (a, b) = tokio::join!(
        fetch_index(layers[0].clone()),
        fetch_index(layers[0].clone())
    );
    assert_eq!(a, b);
    let entry = a
        .toc
        .entries
        .iter()
        .find(|e| e.path == "small-file")
        .expect("small-file in the first layer's TOC");
    assert_eq!((entry.kind, entry.size), (Kind::File, 21));
    assert!(
        a.toc
            .entries
            .iter()
            .any(|e| e.path == "bin/sh" && e.kind == Kind::Symlink)
    );

    // Read /small-file with only the blob bytes the plan names (a Range request to the registry).
    let plan = a.plan(entry.offset, entry.size).expect("plan");
    let blob_url = format!("http://{registry}/v2/project/app/blobs/{}", layers[0]);
    let range = format!(
        "bytes={}-{}",
        plan.compressed.start,
        plan.compressed.end - 1
    );
    let r = client
        .get(&blob_url)
        .header("range", range)
        .send()
        .await
        .expect("range");
    assert_eq!(r.status().as_u16(), 206);
    let compressed = r.bytes().await.expect("bytes");
    let text = a
        .read(&plan, &compressed, entry.offset, entry.size as usize)
        .expect("read through the index");
    assert_eq!(text, b"hello from damselfly\n");

    let big = fetch_index(layers[1].clone()).await;
    let e = big
        .toc
        .entries
        .iter()
        .find(|e| e.path == "big.bin")
        .expect("big.bin");
    assert_eq!(e.size, 6 << 20);
    assert!(
        big.checkpoints.len() >= 3,
        "{} checkpoints for 6 MiB",
        big.checkpoints.len()
    );
    // Kept on disk: a restarted supernode would not rebuild it.
    assert!(
        env.path("sn/indexes")
            .read_dir()
            .expect("indexes dir")
            .count()
            >= 2
    );
}
