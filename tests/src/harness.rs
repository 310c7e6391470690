//! Helpers for end-to-end tests: start the real binaries as separate processes on loopback, make
//! content, read metrics. Processes are killed when their handle drops; their output goes to log
//! files in the test's directory, printed when a test fails.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Directory holding the workspace's binaries (`target/debug` or `target/release`).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("DAMSELFLY_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// Path of a workspace binary; panics with instructions if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (tests/run.sh does)",
        p.display()
    );
    p
}

/// A child process killed on drop, with its log file.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Sends SIGKILL and reaps the process.
    pub async fn kill9(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// The process's output so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The pid.
    pub fn pid(&self) -> i32 {
        self.child.id().map(|p| p as i32).unwrap_or(-1)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// A test's working directory and its processes.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Drop for Env {
    /// Detaches what is still mounted below the directory (FUSE layers of a killed dfsnapshotter,
    /// overlays) so that the directory can be removed.
    fn drop(&mut self) {
        let root = self.dir.path().to_string_lossy().into_owned();
        let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
            return;
        };
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|p| p.starts_with(root.as_str()))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = std::process::Command::new("umount")
                .args(["-l", p])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Env {
    /// A fresh directory (under `$DAMSELFLY_TEST_TMP` or the system temp dir).
    pub fn new(name: &str) -> Self {
        let base = std::env::var_os("DAMSELFLY_TEST_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = tempfile::Builder::new()
            .prefix(&format!("damselfly-{name}-"))
            .tempdir_in(base)
            .expect("tempdir");
        Self { dir }
    }

    /// A path inside the test directory.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes `size` random bytes as the test origin's registry blob (`www/blob-<hex>`, served at
    /// `/v2/<name>/blobs/sha256:<hex>`); returns the hex digest.
    pub fn origin_blob(&self, size: usize) -> String {
        let tmp = self.path("www/blob.tmp");
        let hex = random_file(&tmp, size);
        std::fs::rename(&tmp, self.path(&format!("www/blob-{hex}"))).expect("rename blob");
        hex
    }

    /// Spawns a workspace binary with output to `<dir>/<name>.log`.
    pub fn spawn(&self, name: &str, bin_name: &str, args: &[String]) -> Proc {
        self.spawn_with(name, bin_name, args, &[])
    }

    /// [`Env::spawn`] with extra environment variables.
    pub fn spawn_with(
        &self,
        name: &str,
        bin_name: &str,
        args: &[String],
        envs: &[(&str, &str)],
    ) -> Proc {
        self.spawn_program(name, &bin(bin_name), args, envs)
    }

    /// Spawns `program` with output to `<dir>/<name>.log`.
    pub fn spawn_program(
        &self,
        name: &str,
        program: &Path,
        args: &[String],
        envs: &[(&str, &str)],
    ) -> Proc {
        let log = self.path(&format!("{name}.log"));
        let f = std::fs::File::create(&log).expect("log file");
        let f2 = f.try_clone().expect("log file");
        let child = Command::new(program)
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        Proc {
            name: name.to_owned(),
            child,
            log,
        }
    }

    /// Starts the test origin serving `<dir>/www`; returns it and its base URL.
    pub async fn origin(&self, extra: &[&str]) -> (Proc, String) {
        let www = self.path("www");
        std::fs::create_dir_all(&www).expect("www");
        let log = self.path("origin.log");
        let mut args = vec!["--dir".to_owned(), www.to_string_lossy().into_owned()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut child = Command::new(bin("damselfly-origin"))
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log"))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn origin");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("origin start timeout")
            .expect("origin stdout")
            .expect("origin line");
        let addr = line
            .strip_prefix("listening on ")
            .expect("listening line")
            .to_owned();
        (
            Proc {
                name: "origin".into(),
                child,
                log,
            },
            format!("http://{addr}"),
        )
    }

    /// Starts a supernode on free ports with its cache in `<dir>/<name>`, allowed to fetch from
    /// loopback origins (every test origin and registry is on loopback) and with a cluster
    /// certificate (unless `extra` says `--plaintext`); returns it, its gRPC address and its
    /// HTTP base URL (`https://…`).
    pub async fn supernode(&self, name: &str, extra: &[&str]) -> (Proc, String, String) {
        let mut args = vec!["--allow-address", "127.0.0.0/8"];
        args.extend_from_slice(extra);
        self.strict_supernode(name, &args).await
    }

    /// A supernode with the default origin policy (public origins only: every loopback origin is
    /// refused) and `extra` flags.
    pub async fn strict_supernode(&self, name: &str, extra: &[&str]) -> (Proc, String, String) {
        // A free port can be taken by another process before the daemon binds it: try again.
        let fixed = extra
            .iter()
            .position(|a| *a == "--grpc-addr")
            .and_then(|i| extra.get(i + 1));
        for attempt in 1.. {
            let grpc = match fixed {
                Some(g) => g.to_string(),
                None => format!("127.0.0.1:{}", free_port()),
            };
            let http = format!("127.0.0.1:{}", free_port());
            let mut args: Vec<String> = Vec::new();
            if fixed.is_none() {
                args.extend(["--grpc-addr".into(), grpc.clone()]);
            }
            args.extend([
                "--http-addr".into(),
                http.clone(),
                "--data-dir".into(),
                self.path(name).to_string_lossy().into_owned(),
            ]);
            args.extend(extra.iter().map(|s| s.to_string()));
            if !extra.contains(&"--plaintext") {
                args.extend(crate::cluster::flags(name));
            }
            let mut p = self.spawn(name, "supernode", &args);
            let scheme = if extra.contains(&"--plaintext") {
                "http"
            } else {
                "https"
            };
            let http_url = format!("{scheme}://{http}");
            if wait_up(&mut p, &format!("{http_url}/healthz"), attempt).await {
                return (p, grpc, http_url);
            }
        }
        unreachable!("wait_up panics on the last attempt")
    }

    /// Starts supernodes `names` as one cluster on loopback: each names all of them
    /// (`--cluster-supernode`, in this order) and itself (`--cluster-address`), so that each
    /// replicates its tasks' metadata to the next in their rendezvous order. Returns them as
    /// [`Env::supernode`] does.
    pub async fn supernode_cluster(
        &self,
        names: &[&str],
        extra: &[&str],
    ) -> Vec<(Proc, String, String)> {
        let grpcs: Vec<String> = names
            .iter()
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        let all = grpcs.join(",");
        let mut out = Vec::new();
        for (name, grpc) in names.iter().zip(&grpcs) {
            let mut args = vec![
                "--grpc-addr",
                grpc,
                "--cluster-address",
                grpc,
                "--cluster-supernode",
                &all,
            ];
            args.extend_from_slice(extra);
            out.push(self.supernode(name, &args).await);
        }
        out
    }

    /// Starts a dfdaemon (store `<dir>/<name>`, socket `<dir>/<name>.sock`, every port free on
    /// loopback) with `extra` flags, its proxy allowed to reach registries on loopback (every
    /// test registry is); waits for its metrics endpoint.
    pub async fn dfdaemon(&self, name: &str, supernode: &str, extra: &[&str]) -> (Proc, Daemon) {
        let mut args = vec!["--allow-address", "127.0.0.0/8"];
        args.extend_from_slice(extra);
        self.strict_dfdaemon(name, supernode, &args).await
    }

    /// A dfdaemon with the default origin policy (its proxy reaches public registries and the
    /// configured mirror only) and `extra` flags.
    pub async fn strict_dfdaemon(
        &self,
        name: &str,
        supernode: &str,
        extra: &[&str],
    ) -> (Proc, Daemon) {
        for attempt in 1.. {
            let d = Daemon {
                proxy: format!("127.0.0.1:{}", free_port()),
                metrics: format!("127.0.0.1:{}", free_port()),
                socket: self.path(&format!("{name}.sock")),
            };
            let mut args: Vec<String> = vec![
                "--supernode".into(),
                supernode.into(),
                "--data-dir".into(),
                self.path(name).to_string_lossy().into_owned(),
                "--agent-socket".into(),
                d.socket.to_string_lossy().into_owned(),
                "--upload-addr".into(),
                "127.0.0.1:0".into(),
                "--metrics-addr".into(),
                d.metrics.clone(),
                "--proxy-addr".into(),
                d.proxy.clone(),
            ];
            args.extend(extra.iter().map(|s| s.to_string()));
            if !extra.contains(&"--plaintext") {
                args.extend(crate::cluster::flags(name));
            }
            let mut p = self.spawn(name, "dfdaemon", &args);
            // The metrics port answers first; the proxy binds just after it.
            if wait_up(&mut p, &format!("http://{}/healthz", d.metrics), attempt).await
                && wait_tcp(&mut p, &d.proxy, attempt).await
            {
                return (p, d);
            }
        }
        unreachable!("wait_up panics on the last attempt")
    }

    /// A `dfget` command line (embedded peer with its own store `<dir>/<peer>`).
    pub fn dfget_args(
        &self,
        peer: &str,
        url: &str,
        out: &Path,
        supernodes: &str,
        extra: &[&str],
    ) -> Vec<String> {
        let mut a = vec![
            url.to_owned(),
            "-O".into(),
            out.to_string_lossy().into_owned(),
            "--no-agent".into(),
            "--data-dir".into(),
            self.path(peer).to_string_lossy().into_owned(),
            "--log-level".into(),
            "info".into(),
        ];
        if !supernodes.is_empty() {
            a.push("--supernode".into());
            a.push(supernodes.to_owned());
            if !extra.contains(&"--plaintext") {
                a.extend(crate::cluster::flags(peer));
            }
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    /// Prints every log file of the test (call on failure paths; cheap to call always).
    pub fn dump_logs(&self) {
        if let Ok(rd) = std::fs::read_dir(self.dir.path()) {
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "log") {
                    let text = std::fs::read_to_string(&p).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(40).collect();
                    eprintln!("==== {} (last {} lines)", p.display(), tail.len());
                    for l in tail.iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        }
    }
}

/// Addresses of a dfdaemon started by [`Env::dfdaemon`].
pub struct Daemon {
    pub proxy: String,
    pub metrics: String,
    pub socket: PathBuf,
}

impl Daemon {
    /// The sum of the daemon's `name` samples whose labels contain `labels`.
    pub async fn metric(&self, name: &str, labels: &str) -> f64 {
        metric(
            &get_text(&format!("http://{}/metrics", self.metrics)).await,
            name,
            labels,
        )
    }

    /// Saves the daemon's proxy CA (`GET /ca.crt`) as `<env>/<name>/ca.crt`, a directory of its
    /// own as skopeo's `--*-cert-dir` wants; returns the directory.
    pub async fn save_ca(&self, env: &Env, name: &str) -> PathBuf {
        let pem = get_text(&format!("http://{}/ca.crt", self.proxy)).await;
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
        let dir = env.path(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("ca.crt"), pem).expect("write ca");
        dir
    }

    /// `damselfly_proxy_requests_total{kind="<kind>"}`.
    pub async fn proxy_requests(&self, kind: &str) -> f64 {
        self.metric(
            "damselfly_proxy_requests_total",
            &format!("kind=\"{kind}\""),
        )
        .await
    }
}

/// Runs a process to completion; returns (exit code, combined output).
pub async fn run(p: &mut Proc) -> (i32, String) {
    let status = p.child.wait().await.expect("wait");
    (status.code().unwrap_or(-1), p.output())
}

/// A free TCP port on loopback (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Waits for a daemon's health URL. `false` when the process exited first because a port it was
/// given was taken meanwhile (the caller retries with other ports, up to 3 attempts); panics
/// with the daemon's log otherwise.
async fn wait_up(p: &mut Proc, url: &str, attempt: u32) -> bool {
    let timeout = Duration::from_secs(30);
    let start = Instant::now();
    let client = crate::cluster::http_client();
    while start.elapsed() < timeout {
        if let Ok(r) = client.get(url).send().await
            && r.status().is_success()
        {
            return true;
        }
        if let Ok(Some(status)) = p.child.try_wait() {
            let log = p.output();
            let port_taken = log.contains("Address already in use") || log.contains("cannot bind");
            if port_taken && attempt < 3 {
                return false;
            }
            panic!("{} exited ({status}) before {url} came up:\n{log}", p.name);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{url} of {} did not come up within {timeout:?}:\n{}",
        p.name,
        p.output()
    );
}

/// Waits until `addr` accepts TCP connections; `false` when the process exited first (a port it
/// was given was taken: the caller retries), panics with its log otherwise.
async fn wait_tcp(p: &mut Proc, addr: &str, attempt: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        if let Ok(Some(status)) = p.child.try_wait() {
            if attempt < 3 {
                return false;
            }
            panic!(
                "{} exited ({status}) before {addr} came up:\n{}",
                p.name,
                p.output()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{addr} of {} did not come up:\n{}", p.name, p.output());
}

/// Polls `url` until it answers 200.
pub async fn wait_http(url: &str, timeout: Duration) {
    let start = Instant::now();
    let client = crate::cluster::http_client();
    while start.elapsed() < timeout {
        if let Ok(r) = client.get(url).send().await
            && r.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{url} did not come up within {timeout:?}");
}

/// Writes `size` pseudo-random bytes to `path`; returns their sha256 hex.
pub fn random_file(path: &Path, size: usize) -> String {
    use rand::RngCore;
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut h = Sha256::new();
    let mut rng = rand::rng();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len());
        rng.fill_bytes(&mut buf[..n]);
        h.update(&buf[..n]);
        f.write_all(&buf[..n]).expect("write");
        left -= n;
    }
    f.flush().expect("flush");
    hex::encode(h.finalize())
}

/// sha256 hex of a file.
pub fn sha256_file(path: &Path) -> String {
    let mut f =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).expect("hash");
    hex::encode(h.finalize())
}

/// GETs a URL's body as text.
pub async fn get_text(url: &str) -> String {
    crate::cluster::http_client()
        .get(url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .expect("GET")
        .text()
        .await
        .expect("body")
}

/// Bytes the test origin has served (`/_stats`).
pub async fn origin_bytes(origin: &str) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&get_text(&format!("{origin}/_stats")).await).expect("json");
    v["bytes"].as_u64().expect("bytes")
}

/// Sum of a Prometheus metric's samples whose label set contains `labels` (e.g. `from="peer"`).
pub fn metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name)
                && (l[name.len()..].starts_with(' ') || l[name.len()..].starts_with('{'))
        })
        .filter(|l| labels.is_empty() || l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Parses `key=value` fields of dfget's summary line.
pub fn summary_field(output: &str, key: &str) -> Option<u64> {
    let line = output.lines().find(|l| l.starts_with("dfget: done"))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}="))?.parse().ok())
}

/// True when running as root (tmpfs mounts, CI).
/// Established TCP connections accepted on local port `port` (from `/proc/net/tcp{,6}`).
pub fn accepted_on(port: u16) -> usize {
    let want = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|t| t.lines().skip(1).map(str::to_owned).collect::<Vec<_>>())
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Fields: sl, local address, remote address, state (01: established), ...
            f.get(1).is_some_and(|a| a.ends_with(&want)) && f.get(3) == Some(&"01")
        })
        .count()
}

pub fn is_root() -> bool {
    // SAFETY-free: read the effective uid from /proc.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// Bytes allocated on disk by the files under `p` (sparse files count what they really use).
pub fn disk_usage(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_usage(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// Asks the agent at `socket` for the layer index of blob `digest` served at `url` with
/// `headers` (what dfsnapshotter does); the index bytes or the agent's refusal.
pub async fn agent_layer_index(
    socket: &Path,
    url: &str,
    headers: &[(&str, &str)],
    digest: &str,
) -> Result<Vec<u8>, String> {
    let mut client = fetcher::agent::connect(socket)
        .await
        .map_err(|e| e.to_string())?;
    let req = proto::agent::LayerIndexRequest {
        url: url.to_owned(),
        headers: headers
            .iter()
            .map(|(n, v)| proto::agent::Header {
                name: (*n).to_owned(),
                value: (*v).to_owned(),
            })
            .collect(),
        digest: digest.to_owned(),
    };
    let mut stream = client
        .layer_index(req)
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(c) = stream.message().await.map_err(|s| s.message().to_owned())? {
        bytes.extend_from_slice(&c.data);
    }
    Ok(bytes)
}

/// Where `name` is found on `PATH` (an executable regular file), if anywhere.
pub fn which(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// `None` when every one of `tools` is on `PATH`; otherwise the reason to skip, e.g.
/// `"skopeo, umoci not installed"`.
pub fn missing_tools(tools: &[&str]) -> Option<String> {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| which(t).is_none())
        .collect();
    if missing.is_empty() {
        None
    } else {
        Some(format!("{} not installed", missing.join(", ")))
    }
}

/// Reports a test that cannot run on this machine (a missing tool or capability): under
/// `CI=true` that is a failure, elsewhere a printed SKIP.
pub fn skip(test: &str, why: &str) {
    assert!(
        std::env::var_os("CI").is_none_or(|v| v != "true"),
        "{test} cannot run under CI=true: {why}"
    );
    eprintln!("SKIP {test}: {why}");
}
