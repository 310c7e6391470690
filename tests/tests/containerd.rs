//! containerd pulls through dfdaemon with a `hosts.toml` mirror (`?ns=` routing), then runs the image.

use std::process::Stdio;
use std::time::{Duration, Instant};

use damselfly_tests::harness::{Env, Proc, is_root};
use damselfly_tests::registry::{count_blob_gets, push_test_image, start_registry, tools_missing};

fn on_path(tool: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

async fn ctr(sock: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new("ctr")
        .arg("-a")
        .arg(sock)
        .args(["-n", "damselfly-test"])
        .args(args)
        .output()
        .await
        .expect("run ctr");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctr_pulls_through_the_mirror_and_runs_the_image() {
    let missing = tools_missing().or_else(|| {
        ["containerd", "ctr", "runc"]
            .iter()
            .find(|t| !on_path(t))
            .map(|t| format!("{t} not installed"))
    });
    if let Some(why) = missing {
        eprintln!("SKIP ctr_pulls_through_the_mirror_and_runs_the_image: {why}");
        return;
    }
    if !is_root() {
        eprintln!("SKIP ctr_pulls_through_the_mirror_and_runs_the_image: containerd needs root");
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

    // containerd of our own: own root, state and socket; no CRI.
    let dir = env.path("containerd");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let sock = dir.join("containerd.sock");
    let config = format!(
        "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{s}\"\n",
        d = dir.display(),
        s = sock.display()
    );
    std::fs::write(dir.join("config.toml"), config).expect("config");
    let log = env.path("containerd.log");
    let log_file = std::fs::File::create(&log).expect("log");
    let child = tokio::process::Command::new("containerd")
        .arg("--config")
        .arg(dir.join("config.toml"))
        .stdout(log_file.try_clone().expect("log"))
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn containerd");
    let _containerd = Proc {
        name: "containerd".into(),
        child,
        log,
    };
    let start = Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "containerd did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

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
    let (code, out) = ctr(
        &sock,
        &[
            "images",
            "pull",
            "--hosts-dir",
            &hosts.to_string_lossy(),
            &image,
        ],
    )
    .await;
    if code != 0 {
        env.dump_logs();
    }
    assert_eq!(code, 0, "ctr images pull through the mirror failed: {out}");
    let (code, out) = ctr(
        &sock,
        &[
            "run",
            "--rm",
            &image,
            "damselfly-c1",
            "/bin/cat",
            "/small-file",
        ],
    )
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
