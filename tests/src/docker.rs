//! A private `dockerd` (Debian's docker.io, 20.10) for end-to-end tests: own data root, exec
//! root, socket and client config, no iptables or bridge (containers run with `--network none`),
//! `vfs` storage (works on any filesystem the test directory is on).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::harness::{Env, Proc};

/// Why dockerd cannot run here, if it cannot.
pub fn dockerd_missing() -> Option<String> {
    if !crate::harness::is_root() {
        return Some("dockerd needs root".into());
    }
    for bin in ["/usr/sbin/dockerd", "/usr/bin/docker"] {
        if !Path::new(bin).exists() {
            return Some(format!("{bin} not installed (Debian package docker.io)"));
        }
    }
    None
}

pub struct Dockerd {
    pub proc: Proc,
    sock: PathBuf,
    config: PathBuf,
}

/// Starts dockerd under `<env>/<name>` with `envs` (e.g. `HTTPS_PROXY`) and `daemon_json`.
pub async fn start_dockerd(
    env: &Env,
    name: &str,
    envs: &[(&str, &str)],
    daemon_json: &serde_json::Value,
) -> Dockerd {
    let dir = env.path(name);
    let config = dir.join("client");
    std::fs::create_dir_all(&config).expect("mkdir dockerd dirs");
    let daemon_file = dir.join("daemon.json");
    std::fs::write(&daemon_file, daemon_json.to_string()).expect("write daemon.json");
    let sock = dir.join("docker.sock");
    let p = |rel: &str| dir.join(rel).to_string_lossy().into_owned();
    let log = env.path(&format!("{name}.log"));
    let f = std::fs::File::create(&log).expect("dockerd log");
    let f2 = f.try_clone().expect("dup");
    let child = Command::new("/usr/sbin/dockerd")
        .args([
            "--data-root",
            &p("root"),
            "--exec-root",
            &p("exec"),
            "--pidfile",
            &p("docker.pid"),
            "-H",
            &format!("unix://{}", sock.display()),
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            "--storage-driver=vfs",
            "--config-file",
            &daemon_file.to_string_lossy(),
        ])
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(f)
        .stderr(f2)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn dockerd");
    let mut d = Dockerd {
        proc: Proc {
            name: name.to_owned(),
            child,
            log,
        },
        sock,
        config,
    };
    let start = std::time::Instant::now();
    loop {
        if d.docker(&["version"], None).await.0 == 0 {
            return d;
        }
        if let Ok(Some(status)) = d.proc.child.try_wait() {
            panic!("dockerd exited ({status}):\n{}", d.proc.output());
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "dockerd did not come up:\n{}",
            d.proc.output()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

impl Dockerd {
    /// Runs the docker CLI against this daemon; returns the exit code and stdout + stderr.
    pub async fn docker(&self, args: &[&str], stdin: Option<&str>) -> (i32, String) {
        let mut cmd = Command::new("/usr/bin/docker");
        cmd.args(args)
            .env("DOCKER_HOST", format!("unix://{}", self.sock.display()))
            .env("DOCKER_CONFIG", &self.config)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn docker");
        if let (Some(text), Some(mut w)) = (stdin, child.stdin.take()) {
            use tokio::io::AsyncWriteExt;
            let _ = w.write_all(text.as_bytes()).await;
        }
        let out = child.wait_with_output().await.expect("docker output");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.code().unwrap_or(-1), text)
    }

    /// The client config directory (`config.json` with credentials goes here).
    pub fn client_config(&self) -> &Path {
        &self.config
    }
}

/// Trusts `ca_pem` for `host_port` in dockerd's global `/etc/docker/certs.d`; removed on drop.
pub struct CertsD(PathBuf);

impl CertsD {
    pub fn install(host_port: &str, ca_pem: &str) -> Self {
        let dir = PathBuf::from("/etc/docker/certs.d").join(host_port);
        std::fs::create_dir_all(&dir).expect("mkdir certs.d");
        std::fs::write(dir.join("ca.crt"), ca_pem).expect("write certs.d ca");
        Self(dir)
    }
}

impl Drop for CertsD {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
