//! containerd pulls through dfdaemon with a `hosts.toml` mirror (`?ns=` routing), then runs the image.

use std::time::Duration;

use damselfly_tests::containerd::{containerd_missing, start_containerd};
use damselfly_tests::harness::Env;
use damselfly_tests::registry::{count_blob_gets, push_test_image, start_registry, tools_missing};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctr_pulls_through_the_mirror_and_runs_the_image() {
    if let Some(why) = tools_missing().or_else(containerd_missing) {
        damselfly_tests::harness::skip("ctr_pulls_through_the_mirror_and_runs_the_image", &why);
        return;
    }
    let env = Env::new("containerd");
    let (registry_proc, registry) = start_registry(&env).await;
    let layers = push_test_image(&env, &registry, "project/app:v1", 8 << 20).await;
    let (_sn, grpc, _) = env.supernode("sn", &[]).await;

    let (_agent, daemon) = env
        .dfdaemon(
            "dfdaemon",
            &grpc,
            &["--registry-mirror", &format!("http://{registry}")],
        )
        .await;
    let proxy = daemon.proxy;

    let containerd = start_containerd(&env, None).await;

    // hosts.toml: the registry's pulls and resolves go to dfdaemon (containerd adds ?ns=<registry>).
    let hosts = env.path("hosts");
    let host_dir = hosts.join(&registry);
    std::fs::create_dir_all(&host_dir).expect("mkdir");
    std::fs::write(
        host_dir.join("hosts.toml"),
        format!("server = \"http://{registry}\"\n\n[host.\"http://{proxy}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"),
    )
    .expect("hosts.toml");
    let image = format!("{registry}/project/app:v1");
    let (code, out) = containerd
        .ctr(&[
            "images",
            "pull",
            "--hosts-dir",
            &hosts.to_string_lossy(),
            &image,
        ])
        .await;
    if code != 0 {
        env.dump_logs();
    }
    assert_eq!(code, 0, "ctr images pull through the mirror failed: {out}");
    let (code, out) = containerd
        .ctr(&[
            "run",
            "--rm",
            &image,
            "damselfly-c1",
            "/bin/cat",
            "/small-file",
        ])
        .await;
    assert_eq!(code, 0, "ctr run failed: {out}");
    assert!(
        out.contains("hello from damselfly"),
        "unexpected output: {out}"
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    let reg_log = registry_proc.output();
    for layer in &layers {
        assert_eq!(
            count_blob_gets(&reg_log, layer),
            1,
            "layer {layer}: the registry must serve it once, to the supernode"
        );
    }
    let agent_log = std::fs::read_to_string(env.path("dfdaemon.log")).unwrap_or_default();
    assert!(
        agent_log.contains("blob served"),
        "blobs did not go through the P2P path: {agent_log}"
    );
}
