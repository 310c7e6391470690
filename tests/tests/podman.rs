//! A real podman pulling through dfdaemon as a `registries.conf` mirror of a TLS + htpasswd
//! registry, then running the image.

use std::path::Path;

use base64::Engine;
use std::process::Stdio;

use damselfly_tests::harness::{Env, is_root};
use damselfly_tests::pki::ensure_hosts_entry;
use damselfly_tests::registry::{
    PrivateRegistry, count_blob_gets, private_registry, tools_missing,
};

fn podman_missing() -> Option<String> {
    if !is_root() {
        return Some("podman with its own storage root needs root".into());
    }
    (!Path::new("/usr/bin/podman").exists())
        .then(|| "/usr/bin/podman not installed (Debian package podman)".to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_pulls_through_a_registries_conf_mirror() {
    let skip = podman_missing()
        .or_else(tools_missing)
        .or_else(|| ensure_hosts_entry().err());
    if let Some(why) = skip {
        damselfly_tests::harness::skip("podman_pulls_through_a_registries_conf_mirror", &why);
        return;
    }
    let env = Env::new("podman");
    let PrivateRegistry {
        proc: registry_proc,
        addr: registry,
        layers,
        ca,
        grpc,
        supernode: _sn,
        ..
    } = private_registry(&env, 6 << 20).await;
    let (_agent, d) = env
        .dfdaemon(
            "agent",
            &grpc,
            &[
                "--registry-mirror",
                &format!("https://{registry}"),
                "--upstream-ca",
                &ca,
            ],
        )
        .await;
    // The registries.conf a host would have (packaging/clients/registries.conf).
    let conf = env.path("registries.conf");
    std::fs::write(
        &conf,
        format!(
            "[[registry]]\nlocation = \"{registry}\"\n\n[[registry.mirror]]\nlocation = \"{}\"\ninsecure = true\n",
            d.proxy
        ),
    )
    .expect("write registries.conf");
    let podman = |args: Vec<String>| {
        let conf = conf.clone();
        let (root, run) = (env.path("podman/root"), env.path("podman/run"));
        async move {
            let out = tokio::process::Command::new("/usr/bin/podman")
                .arg("--root")
                .arg(&root)
                .arg("--runroot")
                .arg(&run)
                .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"])
                .args(&args)
                .env("CONTAINERS_REGISTRIES_CONF", &conf)
                .stdin(Stdio::null())
                .output()
                .await
                .expect("spawn podman");
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            (out.status.code().unwrap_or(-1), text)
        }
    };
    // podman looks credentials up by the mirror's address, not the registry's (`podman login
    // 127.0.0.1:65001` on a host): dfdaemon passes them on to the registry.
    let auth_file = env.path("auth.json");
    let auth = base64::engine::general_purpose::STANDARD.encode(damselfly_tests::registry::CREDS);
    std::fs::write(
        &auth_file,
        serde_json::json!({"auths": {d.proxy.clone(): {"auth": auth}}}).to_string(),
    )
    .expect("write auth.json");
    let image = format!("{registry}/project/app:v1");
    let (code, out) = podman(vec![
        "pull".into(),
        "--authfile".into(),
        auth_file.to_string_lossy().into_owned(),
        image.clone(),
    ])
    .await;
    if code != 0 {
        env.dump_logs();
    }
    assert_eq!(code, 0, "podman pull through the mirror: {out}");
    let blobs = d.proxy_requests("blob").await;
    assert!(
        blobs >= 3.0,
        "podman's layers did not go through dfdaemon ({blobs}):\n{out}"
    );
    let (code, out) = podman(vec![
        "run".into(),
        "--rm".into(),
        // podman raises RLIMIT_NOFILE and RLIMIT_NPROC past what a sandboxed CI machine allows.
        "--ulimit".into(),
        "nofile=1024:1024".into(),
        "--ulimit".into(),
        "nproc=1024:1024".into(),
        "--network".into(),
        "none".into(),
        image,
        "cat".into(),
        "/small-file".into(),
    ])
    .await;
    assert_eq!(code, 0, "podman run: {out}");
    assert!(out.contains("hello from damselfly"), "{out}");
    let log = registry_proc.output();
    for layer in &layers {
        assert_eq!(count_blob_gets(&log, layer), 1, "layer {layer}");
    }
}
