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
        damselfly_tests::harness::skip(
            "seeded_layers_are_indexed_and_files_read_from_blob_ranges",
            &why,
        );
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

/// A .tgz whose first header (`kind`, `name`) announces 256 MiB of metadata ('a's), then one
/// empty file; returns the blob's hex digest, written as the test origin's registry blob.
fn metadata_bomb(env: &Env, kind: tar::EntryType, name: &str) -> String {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_path(name).expect("path");
    h.set_size(256 << 20);
    h.set_cksum();
    gz.write_all(h.as_bytes()).expect("header");
    let chunk = vec![b'a'; 1 << 20];
    for _ in 0..256 {
        gz.write_all(&chunk).expect("metadata");
    }
    let mut f = tar::Header::new_gnu();
    f.set_path("x").expect("path");
    f.set_size(0);
    f.set_mode(0o644);
    f.set_uid(0);
    f.set_gid(0);
    f.set_mtime(0);
    f.set_cksum();
    gz.write_all(f.as_bytes()).expect("entry");
    gz.write_all(&[0; 1024]).expect("end");
    let blob = gz.finish().expect("gzip");
    assert!(blob.len() < 2 << 20, "the bomb is {} bytes", blob.len());
    let hex = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&blob))
    };
    std::fs::create_dir_all(env.path("www")).expect("www");
    std::fs::write(env.path(&format!("www/blob-{hex}")), &blob).expect("blob");
    hex
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_name_and_pax_bombs_are_refused_in_bounded_memory() {
    // Review finding 8: a 0.5 MB .tgz whose GNU long name is 512 MiB took the supernode past
    // 1.5 GB. Bound asserted here: the supernode's VmHWM stays under 200 MiB after both bombs.
    const BOUND: u64 = 200 << 20;
    let env = Env::new("index-bomb");
    let bombs = [
        (
            metadata_bomb(&env, tar::EntryType::GNULongName, "././@LongLink"),
            "long name",
        ),
        (
            metadata_bomb(&env, tar::EntryType::XHeader, "PaxHeaders/x"),
            "PAX header",
        ),
    ];
    let (_origin, origin) = env.origin(&[]).await;
    std::fs::write(env.path("admin-token"), "bomb-test-admin-token-0123456789").expect("token");
    let token_file = env.path("admin-token").to_string_lossy().into_owned();
    let (sn, _grpc, http) = env
        .supernode("sn", &["--admin-token-file", &token_file])
        .await;
    let client = damselfly_tests::cluster::http_client();
    for (hex, what) in &bombs {
        let body = serde_json::json!({
            "url": format!("{origin}/v2/bomb/blobs/sha256:{hex}"),
            "digest": format!("sha256:{hex}"),
            "headers": {},
        });
        let r = client
            .post(format!("{http}/api/v1/index"))
            .bearer_auth("bomb-test-admin-token-0123456789")
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("index request");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        assert!(
            !(200..300).contains(&status) && text.contains(what),
            "the {what} bomb was indexed or refused for another reason: {status} {text}"
        );
    }
    let peak = damselfly_tests::host::vm_hwm(sn.pid());
    assert!(peak < BOUND, "supernode VmHWM {peak} bytes");
    eprintln!(
        "supernode VmHWM after the bombs: {:.1} MiB",
        peak as f64 / f64::from(1 << 20)
    );
    let ok = client
        .get(format!("{http}/healthz"))
        .send()
        .await
        .expect("healthz");
    assert!(ok.status().is_success(), "the supernode stopped serving");
    // The tasks API (admin token): the bombs' seeds, each held whole.
    let tasks = format!("{http}/api/v1/tasks");
    let r = client.get(&tasks).send().await.expect("tasks");
    assert_eq!(
        r.status().as_u16(),
        401,
        "the tasks list without the admin token"
    );
    let r = client
        .get(&tasks)
        .bearer_auth("bomb-test-admin-token-0123456789")
        .send()
        .await
        .expect("tasks");
    let text = r.text().await.expect("tasks");
    let list: Vec<serde_json::Value> = serde_json::from_str(&text).expect("tasks JSON");
    let complete: Vec<_> = list.iter().filter(|t| t["status"] == "complete").collect();
    assert_eq!(complete.len(), bombs.len(), "{list:?}");
    for t in complete {
        assert_eq!(t["pieces_held"], t["piece_count"], "{t}");
        assert!(
            t["url"]
                .as_str()
                .is_some_and(|u| u.contains("/v2/bomb/blobs/")),
            "{t}"
        );
    }
    assert!(
        !std::fs::read_dir(env.path("sn"))
            .expect("store")
            .flatten()
            .any(|e| e.file_name() == "indexes"
                && std::fs::read_dir(e.path()).is_ok_and(|mut d| d.next().is_some())),
        "an index of a bomb was kept"
    );
}
