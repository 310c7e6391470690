//! A private containerd (Debian's 1.6) for end-to-end tests: own root, state and socket, no CRI,
//! optionally with dfsnapshotter registered as the `damselfly` proxy snapshotter.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::harness::{Env, Proc, is_root};

fn on_path(tool: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Why containerd cannot run here, if it cannot.
pub fn containerd_missing() -> Option<String> {
    if let Some(t) = ["containerd", "ctr", "runc"].iter().find(|t| !on_path(t)) {
        return Some(format!("{t} not installed"));
    }
    (!is_root()).then(|| "containerd needs root".to_owned())
}

pub struct Containerd {
    pub proc: Proc,
    pub sock: PathBuf,
}

/// Starts containerd under `<env>/containerd`; with `snapshotter`, registers that socket as the
/// `damselfly` proxy snapshotter.
pub async fn start_containerd(env: &Env, snapshotter: Option<&Path>) -> Containerd {
    start_containerd_named(env, "containerd", snapshotter).await
}

/// [`start_containerd`] under `<env>/<name>` (one per emulated host).
pub async fn start_containerd_named(
    env: &Env,
    name: &str,
    snapshotter: Option<&Path>,
) -> Containerd {
    start_containerd_with(env, name, snapshotter, None).await
}

/// The socket [`start_containerd_named`] gives the containerd `name` (known before it starts).
pub fn containerd_socket(env: &Env, name: &str) -> PathBuf {
    env.path(name).join("containerd.sock")
}

/// How containerd's CRI plugin is set up.
pub struct Cri<'a> {
    /// containerd's registry host configs (`registry.config_path`).
    pub hosts_dir: &'a Path,
    /// The pod sandbox ("pause") image, present before any pod runs (no CNI: pods run with
    /// host networking).
    pub sandbox_image: &'a str,
}

/// [`start_containerd_named`] with its CRI plugin on, as kubelet's containerd runs: snapshotter
/// `damselfly` with the snapshot annotations, registry host configs and the sandbox image of
/// `cri`, and no CNI.
pub async fn start_containerd_cri(
    env: &Env,
    name: &str,
    snapshotter: &Path,
    cri: &Cri<'_>,
) -> Containerd {
    start_containerd_with(env, name, Some(snapshotter), Some(cri)).await
}

async fn start_containerd_with(
    env: &Env,
    name: &str,
    snapshotter: Option<&Path>,
    cri: Option<&Cri<'_>>,
) -> Containerd {
    let dir = env.path(name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let sock = containerd_socket(env, name);
    let mut config = format!(
        "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n",
        d = dir.display(),
    );
    match cri {
        None => config.push_str("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n"),
        Some(cri) => config.push_str(&format!(
            "[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"{s}\"\n  restrict_oom_score_adj = true\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"damselfly\"\n  disable_snapshot_annotations = false\n\
             [plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{h}\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = \"{d}/cni/bin\"\n  conf_dir = \"{d}/cni/conf\"\n",
            h = cri.hosts_dir.display(),
            s = cri.sandbox_image,
            d = dir.display(),
        )),
    }
    config.push_str(&format!("[grpc]\n  address = \"{}\"\n", sock.display()));
    if let Some(s) = snapshotter {
        config.push_str(&format!(
            "[proxy_plugins]\n  [proxy_plugins.damselfly]\n    type = \"snapshot\"\n    address = \"{}\"\n",
            s.display()
        ));
    }
    std::fs::write(dir.join("config.toml"), config).expect("config");
    let log = env.path(&format!("{name}.log"));
    let log_file = std::fs::File::create(&log).expect("log");
    let child = tokio::process::Command::new("containerd")
        .arg("--config")
        .arg(dir.join("config.toml"))
        .stdout(log_file.try_clone().expect("log"))
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn containerd");
    let proc = Proc {
        name: name.into(),
        child,
        log,
    };
    let start = Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "containerd did not start:\n{}",
            proc.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Containerd { proc, sock }
}

/// Starts dfsnapshotter (`--root`, `--socket`, `--metrics-addr` and `extra` flags) as process
/// `name`, and waits for its socket.
pub async fn start_snapshotter(
    env: &Env,
    name: &str,
    root: &Path,
    sock: &Path,
    metrics: &str,
    extra: &[String],
) -> Proc {
    start_snapshotter_with(env, name, (root, sock, metrics), extra, &[]).await
}

/// [`start_snapshotter`] with extra environment variables (`PATH` for credential helpers).
pub async fn start_snapshotter_with(
    env: &Env,
    name: &str,
    (root, sock, metrics): (&Path, &Path, &str),
    extra: &[String],
    envs: &[(&str, &str)],
) -> Proc {
    let _ = std::fs::remove_file(sock);
    let mut args = vec![
        "--root".into(),
        root.to_string_lossy().into_owned(),
        "--socket".into(),
        sock.to_string_lossy().into_owned(),
        "--metrics-addr".into(),
        metrics.to_owned(),
    ];
    args.extend_from_slice(extra);
    let p = env.spawn_with(name, "dfsnapshotter", &args, envs);
    let start = Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "dfsnapshotter did not start:\n{}",
            p.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p
}

impl Containerd {
    /// `ctr ARGS` again every half second until it succeeds (containerd reconnects to a restarted
    /// proxy snapshotter on its own, after a moment); its output. Panics after `timeout`.
    pub async fn ctr_until_ok(&self, args: &[&str], timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            let (code, out) = self.ctr(args).await;
            if code == 0 {
                return out;
            }
            assert!(
                start.elapsed() < timeout,
                "ctr {args:?} still failing after {timeout:?}: {out}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// `ctr -a <sock> -n damselfly-test ARGS`; returns the exit code and stdout + stderr.
    pub async fn ctr(&self, args: &[&str]) -> (i32, String) {
        let out = tokio::process::Command::new("ctr")
            .arg("-a")
            .arg(&self.sock)
            .args(["-n", "damselfly-test"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run ctr");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.code().unwrap_or(-1), text)
    }
}

/// What a container sees of the test image (see `registry::push_test_image`): a listing of its
/// files (type, mode, links, owner, size, link target) and the hashes of its regular files, from
/// inside a container `id` on `snapshotter`. Two snapshotters that give the same rootfs give the
/// same text. Directory sizes and block totals belong to the filesystem, not the image: left out.
pub async fn rootfs_listing(c: &Containerd, image: &str, snapshotter: &str, id: &str) -> String {
    let script = "cd / && /bin/busybox ls -lanR bin etc opt small-file big.bin | /bin/busybox sed -e 's/ [A-Z][a-z][a-z] [ 0-9][0-9] [0-9:]\\{4,5\\} / /' -e '/^total /d' -e '/^d/s/^\\(d[^ ]*  *[0-9]*  *[0-9]*  *[0-9]*\\)  *[0-9]* /\\1 - /' && /bin/busybox sha256sum bin/busybox small-file big.bin etc/release opt/data/new";
    let (code, out) = c
        .ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            snapshotter,
            image,
            id,
            "/bin/sh",
            "-c",
            script,
        ])
        .await;
    assert_eq!(code, 0, "listing on {snapshotter} failed: {out}");
    out
}
