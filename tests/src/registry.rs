//! Helpers for end-to-end tests against a real local OCI registry (distribution 2.8,
//! `docker-registry`): start it on loopback over plain HTTP, build and push a small test image
//! without a daemon (umoci + skopeo), pull with skopeo, and count the blob downloads the registry
//! served from its access log.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::harness::{Env, Proc, free_port, missing_tools, random_file, which};
use crate::pki::{Pki, REGISTRY_HOST};

/// The external tools these helpers need.
const TOOLS: [&str; 5] = ["docker-registry", "skopeo", "umoci", "busybox", "htpasswd"];

/// `None` when docker-registry, skopeo, umoci, busybox and htpasswd are all on `PATH`; otherwise the reason
/// to skip, e.g. `"docker-registry, skopeo not installed"`.
pub fn tools_missing() -> Option<String> {
    missing_tools(&TOOLS)
}

/// Writes the `htpasswd` file of the registry of `env` (bcrypt, `htpasswd -Bbn`) for `users`
/// `(user, password)`; returns its path. A running docker-registry reads a rewritten file on
/// its next request: this is how tests rotate a password.
pub async fn set_htpasswd(env: &Env, users: &[(String, String)]) -> PathBuf {
    let mut lines = String::new();
    for (u, p) in users {
        lines.push_str(run_ok("htpasswd", &["-Bbn", u, p]).await.trim());
        lines.push('\n');
    }
    let file = env.path("registry").join("htpasswd");
    let tmp = file.with_extension("new");
    std::fs::write(&tmp, lines).expect("write htpasswd");
    std::fs::rename(&tmp, &file).expect("replace htpasswd");
    file
}

/// Runs a command to completion; panics with its output unless it exits 0. Returns stdout.
async fn run_ok(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}):\nstderr:\n{}\nstdout:\n{stdout}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr),
    );
    stdout
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// How the test registry authenticates clients.
pub enum RegistryAuth {
    None,
    /// `htpasswd` file of `(user, password)` (bcrypt, made with `htpasswd -Bbn`).
    Htpasswd(Vec<(String, String)>),
    /// Token auth, as Harbor's registry: tokens from `realm` (a [`start_token_server`]).
    Token {
        realm: String,
    },
}

/// Issuer and service names shared by the registry config and the token server.
const TOKEN_ISSUER: &str = "damselfly-token-issuer";
const TOKEN_SERVICE: &str = "damselfly-registry";

/// Starts `docker-registry serve` on a free loopback port, plain HTTP, filesystem storage under
/// `<dir>/registry/data`, access log on, output to `<dir>/registry.log`. Waits for `GET /v2/` to
/// answer 200. Returns the process and its address `"127.0.0.1:<port>"`.
pub async fn start_registry(env: &Env) -> (Proc, String) {
    start_registry_with(env, None, RegistryAuth::None).await
}

/// [`start_registry`] with TLS (a server certificate of `pki` for [`REGISTRY_HOST`]) and auth.
/// With TLS the returned address is `"registry.damselfly.test:<port>"`.
pub async fn start_registry_with(
    env: &Env,
    tls: Option<&Pki>,
    auth: RegistryAuth,
) -> (Proc, String) {
    let dir = env.path("registry");
    let data = env.path("registry/data");
    std::fs::create_dir_all(&data).expect("create registry data dir");
    let port = free_port();
    let mut yaml = format!(
        "version: 0.1\n\
         log:\n  accesslog:\n    disabled: false\n  level: info\n\
         storage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\n\
         http:\n  addr: 127.0.0.1:{port}\n",
        data = data.display(),
    );
    if let Some(pki) = tls {
        yaml.push_str(&format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            pki.server_crt.display(),
            pki.server_key.display()
        ));
    }
    match auth {
        RegistryAuth::None => {}
        RegistryAuth::Htpasswd(users) => {
            let file = set_htpasswd(env, &users).await;
            yaml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: damselfly-registry\n    path: {}\n",
                file.display()
            ));
        }
        RegistryAuth::Token { realm } => {
            let pki = tls.expect("token auth needs the test PKI");
            yaml.push_str(&format!(
                "auth:\n  token:\n    realm: {realm}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                pki.signing_crt.display()
            ));
        }
    }
    let config = dir.join("config.yml");
    std::fs::write(&config, yaml).expect("write registry config.yml");

    let log = env.path("registry.log");
    let f = std::fs::File::create(&log).expect("create registry.log");
    let f2 = f.try_clone().expect("clone registry.log handle");
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(f)
        .stderr(f2)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn docker-registry: {e}"));
    let mut proc = Proc {
        name: "registry".to_owned(),
        child,
        log,
    };
    let (addr, url) = match tls {
        Some(_) => {
            let a = format!("{REGISTRY_HOST}:{port}");
            let u = format!("https://{a}/v2/");
            (a, u)
        }
        None => {
            let a = format!("127.0.0.1:{port}");
            let u = format!("http://{a}/v2/");
            (a, u)
        }
    };
    tokio::select! {
        () = wait_answer(&url, tls.map(|p| p.ca_crt.as_path()), Duration::from_secs(20)) => {}
        status = proc.child.wait() => {
            panic!("docker-registry exited early ({status:?}):\n{}", proc.output());
        }
    }
    (proc, addr)
}

/// Polls `url` until it answers at all (401 counts: the server is up), trusting `ca`.
async fn wait_answer(url: &str, ca: Option<&Path>, timeout: Duration) {
    let client = test_client(ca);
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if client.get(url).send().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{url} did not come up within {timeout:?}");
}

/// A reqwest client that trusts `ca` (if any) besides the system roots, and no proxy.
pub fn test_client(ca: Option<&Path>) -> reqwest::Client {
    let mut b = reqwest::Client::builder().no_proxy();
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).expect("read CA");
        b = b.add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("CA pem"));
    }
    b.build().expect("client")
}

/// Starts `damselfly-token-server` over TLS on `REGISTRY_HOST:<free port>` with `users`
/// (`"name:password"`) and `private` repositories (`"repo=user,user"`). Returns it and its realm
/// URL (`https://registry.damselfly.test:<port>/token`).
pub async fn start_token_server(
    env: &Env,
    pki: &Pki,
    users: &[&str],
    private: &[&str],
) -> (Proc, String) {
    let port = free_port();
    let mut args: Vec<String> = vec![
        "--addr".into(),
        format!("127.0.0.1:{port}"),
        "--tls-cert".into(),
        path_str(&pki.server_crt),
        "--tls-key".into(),
        path_str(&pki.server_key),
        "--signing-cert".into(),
        path_str(&pki.signing_crt),
        "--signing-key".into(),
        path_str(&pki.signing_key),
        "--issuer".into(),
        TOKEN_ISSUER.into(),
        "--service".into(),
        TOKEN_SERVICE.into(),
    ];
    for u in users {
        args.extend(["--user".into(), (*u).to_owned()]);
    }
    for p in private {
        args.extend(["--private".into(), (*p).to_owned()]);
    }
    let proc = env.spawn("token-server", "damselfly-token-server", &args);
    let base = format!("https://{REGISTRY_HOST}:{port}");
    wait_answer(
        &format!("{base}/_stats"),
        Some(&pki.ca_crt),
        Duration::from_secs(20),
    )
    .await;
    (proc, format!("{base}/token"))
}

/// Tokens issued so far, per `"user|scope"` (anonymous: `"<anonymous>|scope"`).
pub async fn tokens_issued(realm: &str, pki: &Pki) -> std::collections::BTreeMap<String, u64> {
    let url = realm.replace("/token", "/_stats");
    let text = test_client(Some(&pki.ca_crt))
        .get(&url)
        .send()
        .await
        .expect("token stats")
        .text()
        .await
        .expect("token stats body");
    let v: serde_json::Value = serde_json::from_str(&text).expect("token stats json");
    serde_json::from_value(v["issued"].clone()).expect("issued map")
}

/// Builds a four-layer OCI image under `<dir>/image` with umoci and pushes it with skopeo to
/// `<registry>/<reference>` (e.g. `reference = "project/app:v1"`):
/// 1. static busybox at `/bin/busybox`, symlinks `/bin/sh` and `/bin/cat`, and `/small-file`
///    (`"hello from damselfly\n"`);
/// 2. `/big.bin`, `big_layer_bytes` random bytes;
/// 3. `/etc/release` (and its hard link `/etc/release-hardlink`), `/etc/old-config`, `/opt/data/{a,b,sub/c}`;
/// 4. deletes `/etc/old-config` and all of `/opt/data`, then adds `/opt/data/new` and rewrites
///    `/small-file` (same content): whiteouts and replaced files.
///
/// The config's cmd is `/bin/sh`. Returns the layer digests (`"sha256:..."`) in manifest order,
/// read back from the pushed manifest. Panics with the failing command's output.
pub async fn push_test_image(
    env: &Env,
    registry: &str,
    reference: &str,
    big_layer_bytes: usize,
) -> Vec<String> {
    push_test_image_as(env, registry, reference, big_layer_bytes, None).await
}

/// [`push_test_image`] with registry credentials (`"user:password"`).
pub async fn push_test_image_as(
    env: &Env,
    registry: &str,
    reference: &str,
    big_layer_bytes: usize,
    creds: Option<&str>,
) -> Vec<String> {
    let image = build_test_image(env, "image", big_layer_bytes).await;
    let dest = format!("docker://{registry}/{reference}");
    let src = format!("oci:{image}");
    let mut copy = vec!["--insecure-policy", "copy", "--dest-tls-verify=false"];
    let mut inspect = vec!["inspect", "--tls-verify=false", "--raw"];
    if let Some(c) = creds {
        copy.extend(["--dest-creds", c]);
        inspect.extend(["--creds", c]);
    }
    copy.extend([src.as_str(), dest.as_str()]);
    inspect.push(&dest);
    run_ok("skopeo", &copy).await;
    let raw = run_ok("skopeo", &inspect).await;
    layer_digests(&raw)
}

/// Pushes a pod sandbox ("pause") image to `<registry>/<reference>`: the test image that
/// [`push_test_image`] built in `env` (same layers), whose command sleeps for good.
pub async fn push_pause_image(env: &Env, registry: &str, reference: &str, creds: Option<&str>) {
    let layout = env.path("image").join("oci");
    let (app, pause) = (
        format!("{}:app", layout.display()),
        format!("{}:pause", layout.display()),
    );
    run_ok(
        "umoci",
        &[
            "config",
            "--image",
            &app,
            "--tag",
            "pause",
            "--config.cmd",
            "/bin/busybox",
            "--config.cmd",
            "sleep",
            "--config.cmd",
            "2147483647",
        ],
    )
    .await;
    let dest = format!("docker://{registry}/{reference}");
    copy_image(&format!("oci:{pause}"), &dest, creds).await;
}

/// The layer digests of an image manifest (JSON text).
pub fn layer_digests(raw: &str) -> Vec<String> {
    let manifest: serde_json::Value =
        serde_json::from_str(raw).unwrap_or_else(|e| panic!("manifest is not JSON ({e}): {raw}"));
    manifest["layers"]
        .as_array()
        .unwrap_or_else(|| panic!("manifest has no layers: {raw}"))
        .iter()
        .map(|l| {
            l["digest"]
                .as_str()
                .unwrap_or_else(|| panic!("layer without digest in {raw}"))
                .to_owned()
        })
        .collect()
}

/// Builds the four-layer test image (see [`push_test_image`]) in an OCI layout under
/// `<env>/<name>`; returns its umoci/skopeo reference `<layout>:app` (without the `oci:`).
pub async fn build_test_image(env: &Env, name: &str, big_layer_bytes: usize) -> String {
    let root = env.path(name);
    std::fs::create_dir_all(&root).expect("create image dir");
    let layout = root.join("oci");
    let image = format!("{}:app", layout.display());
    run_ok("umoci", &["init", "--layout", &path_str(&layout)]).await;
    run_ok("umoci", &["new", "--image", &image]).await;

    let busybox = which("busybox").expect("busybox not on PATH");
    for layer in 1..=4 {
        // Each unpack/repack cycle adds one layer holding what changed in the bundle.
        let bundle = root.join(format!("bundle{layer}"));
        let bundle_s = path_str(&bundle);
        run_ok(
            "umoci",
            &["unpack", "--rootless", "--image", &image, &bundle_s],
        )
        .await;
        let rootfs = bundle.join("rootfs");
        match layer {
            1 => {
                let bin = rootfs.join("bin");
                std::fs::create_dir_all(&bin).expect("mkdir rootfs/bin");
                std::fs::copy(&busybox, bin.join("busybox")).expect("copy busybox");
                for link in ["sh", "cat"] {
                    std::os::unix::fs::symlink("busybox", bin.join(link))
                        .unwrap_or_else(|e| panic!("symlink /bin/{link}: {e}"));
                }
                std::fs::write(rootfs.join("small-file"), "hello from damselfly\n")
                    .expect("write /small-file");
            }
            2 => {
                let sum = random_file(&rootfs.join("big.bin"), big_layer_bytes);
                std::fs::write(root.join("big.bin.sha256"), sum).expect("write big.bin's hash");
            }
            3 => {
                let etc = rootfs.join("etc");
                std::fs::create_dir_all(&etc).expect("mkdir rootfs/etc");
                std::fs::write(etc.join("release"), "damselfly test image\n")
                    .expect("write /etc/release");
                std::fs::hard_link(etc.join("release"), etc.join("release-hardlink"))
                    .expect("hard link /etc/release-hardlink");
                std::fs::write(etc.join("old-config"), "to be deleted\n").expect("old-config");
                let data = rootfs.join("opt/data");
                std::fs::create_dir_all(data.join("sub")).expect("mkdir /opt/data");
                for f in ["a", "b", "sub/c"] {
                    std::fs::write(data.join(f), format!("old {f}\n")).expect("opt file");
                }
            }
            _ => {
                // Deletes and replaces what layer 3 added: whiteouts (and possibly an opaque
                // directory) in the layer, as overlayfs must honour them.
                std::fs::remove_file(rootfs.join("etc/old-config")).expect("rm old-config");
                let data = rootfs.join("opt/data");
                std::fs::remove_dir_all(&data).expect("rm /opt/data");
                std::fs::create_dir_all(&data).expect("mkdir /opt/data");
                std::fs::write(data.join("new"), "replaced\n").expect("new");
                std::fs::write(rootfs.join("small-file"), "hello from damselfly\n")
                    .expect("rewrite /small-file");
            }
        }
        run_ok("umoci", &["repack", "--image", &image, &bundle_s]).await;
        std::fs::remove_dir_all(&bundle).expect("remove bundle");
    }
    run_ok(
        "umoci",
        &["config", "--image", &image, "--config.cmd", "/bin/sh"],
    )
    .await;
    image
}

/// sha256 (hex) of `/big.bin` of the test image built by [`push_test_image`] in `env`.
pub fn big_file_sha256(env: &Env) -> String {
    std::fs::read_to_string(env.path("image").join("big.bin.sha256")).expect("big.bin's hash")
}

/// The blob files of an OCI layout (`<layout>/blobs/sha256/*`), sorted: two pulls of the same
/// image have the same list.
pub fn oci_blobs(layout: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(layout.join("blobs/sha256"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Credentials of the private test registry's user.
pub const CREDS: &str = "alice:wonderland";

/// A private HTTPS registry (test CA, htpasswd user [`CREDS`]) holding the test image as
/// `project/app:v1`, and a supernode that trusts the CA.
pub struct PrivateRegistry {
    pub pki: Pki,
    pub proc: Proc,
    /// `registry.damselfly.test:<port>`
    pub addr: String,
    pub layers: Vec<String>,
    /// The CA file, as a flag value.
    pub ca: String,
    pub supernode: Proc,
    pub grpc: String,
    /// `http://127.0.0.1:<port>` of the supernode's piece server and APIs.
    pub http: String,
}

/// Starts a [`PrivateRegistry`] with a test image whose big layer has `big_layer_bytes`.
pub async fn private_registry(env: &Env, big_layer_bytes: usize) -> PrivateRegistry {
    let pki = crate::pki::make_pki(env);
    let (user, pass) = CREDS.split_once(':').unwrap_or(("alice", "wonderland"));
    let users = vec![(user.to_owned(), pass.to_owned())];
    let (proc, addr) = start_registry_with(env, Some(&pki), RegistryAuth::Htpasswd(users)).await;
    let layers =
        push_test_image_as(env, &addr, "project/app:v1", big_layer_bytes, Some(CREDS)).await;
    let ca = pki.ca_crt.to_string_lossy().into_owned();
    let (supernode, grpc, http) = env.supernode("sn", &["--upstream-ca", &ca]).await;
    PrivateRegistry {
        pki,
        proc,
        addr,
        layers,
        ca,
        supernode,
        grpc,
        http,
    }
}

/// Number of successful (2xx) `GET /v2/<name>/blobs/<digest>` requests in the registry's access
/// log. `registry_log` is the log's text (e.g. `registry.output()`). distribution 2.8 writes
/// combined-format lines such as
/// `127.0.0.1 - - [26/Nov/2026:17:43:49 +0000] "GET /v2/project/app/blobs/sha256:0d91... HTTP/1.1" 200 5244088 "" "skopeo/1.9.3"`;
/// its logrus `msg="response completed"` lines for the same request, HEAD requests and
/// redirects (307) and ranged GETs answered 206 (the supernode's 1-byte probes) are not counted.
///
/// The access-log line is written once the handler has returned, which can be a moment after
/// the client saw the last byte.
pub fn count_blob_gets(registry_log: &str, digest: &str) -> usize {
    registry_log
        .lines()
        .filter(|line| is_blob_get(line, digest))
        .count()
}

fn is_blob_get(line: &str, digest: &str) -> bool {
    // `... [date] "GET <target> HTTP/1.1" <status> <bytes> "<referer>" "<agent>"`
    let Some((_, rest)) = line.split_once("] \"GET ") else {
        return false;
    };
    let Some((request, after)) = rest.split_once('"') else {
        return false;
    };
    let Some((target, _proto)) = request.rsplit_once(' ') else {
        return false;
    };
    let path = target.split('?').next().unwrap_or(target);
    let Some(name) = path
        .strip_prefix("/v2/")
        .and_then(|p| p.strip_suffix(digest))
        .and_then(|p| p.strip_suffix("/blobs/"))
    else {
        return false;
    };
    if name.is_empty() {
        return false;
    }
    after
        .split_whitespace()
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .is_some_and(|status| status == 200)
}

/// `skopeo copy --src-tls-verify=false docker://<src> oci:<dest_dir>:app`; returns the exit code
/// (-1 if killed by a signal) and stdout followed by stderr.
pub async fn skopeo_copy_to_oci(src: &str, dest_dir: &Path) -> (i32, String) {
    let src = format!("docker://{src}");
    let dest = format!("oci:{}:app", dest_dir.display());
    skopeo(
        &[
            "--insecure-policy",
            "copy",
            "--src-tls-verify=false",
            &src,
            &dest,
        ],
        &[],
    )
    .await
}

/// Runs `skopeo ARGS` with extra environment variables (e.g. `HTTPS_PROXY`); returns the exit
/// code (-1 if killed by a signal) and stdout followed by stderr.
pub async fn skopeo(args: &[&str], envs: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new("skopeo")
        .args(args)
        .envs(envs.iter().copied())
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("spawn skopeo: {e}"));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// `skopeo copy SRC DEST` into (and from) the test's registries, their certificates unverified,
/// with `creds` (`user:password`) on each `docker://` side; panics with skopeo's output.
pub async fn copy_image(src: &str, dest: &str, creds: Option<&str>) {
    let mut args = vec!["--insecure-policy", "copy", "--dest-tls-verify=false"];
    if src.starts_with("docker://") {
        args.push("--src-tls-verify=false");
        if let Some(c) = creds {
            args.extend(["--src-creds", c]);
        }
    }
    if let Some(c) = creds {
        args.extend(["--dest-creds", c]);
    }
    args.extend([src, dest]);
    let (code, out) = skopeo(&args, &[]).await;
    assert_eq!(code, 0, "skopeo copy {src} {dest}: {out}");
}

/// Recompresses the layers of at most `max_size` bytes of the OCI layout's only image as zstd
/// (`application/vnd.oci.image.layer.v1.tar+zstd`), rewriting manifest and index; larger layers
/// stay gzip (a mixed image).
pub fn zstd_layers(layout: &Path, max_size: u64) {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let blob = |d: &str| {
        layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let put = |bytes: &[u8]| -> (String, u64) {
        let hex = hex::encode(Sha256::digest(bytes));
        std::fs::write(layout.join("blobs/sha256").join(&hex), bytes).expect("write blob");
        (format!("sha256:{hex}"), bytes.len() as u64)
    };
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).expect("index.json")).expect("index");
    let mdigest = index["manifests"][0]["digest"]
        .as_str()
        .expect("manifest digest")
        .to_owned();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(&mdigest)).expect("manifest")).expect("json");
    let layers = manifest["layers"].as_array_mut().expect("layers");
    for l in layers.iter_mut() {
        if l["size"].as_u64().unwrap_or(u64::MAX) > max_size {
            continue;
        }
        let gz = std::fs::read(blob(l["digest"].as_str().expect("digest"))).expect("layer");
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(gz.as_slice())
            .read_to_end(&mut tar)
            .expect("gunzip");
        let zst = ruzstd::encoding::compress_to_vec(
            tar.as_slice(),
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        let (digest, size) = put(&zst);
        l["digest"] = digest.into();
        l["size"] = size.into();
        l["mediaType"] = "application/vnd.oci.image.layer.v1.tar+zstd".into();
    }
    let (digest, size) = put(&serde_json::to_vec(&manifest).expect("manifest"));
    index["manifests"][0]["digest"] = digest.into();
    index["manifests"][0]["size"] = size.into();
    std::fs::write(&index_path, serde_json::to_vec(&index).expect("index")).expect("index.json");
}

#[cfg(test)]
mod tests {
    use super::count_blob_gets;

    #[test]
    fn counts_only_successful_blob_gets() {
        let d = "sha256:0d916836a23c62d86568965a1f39f1448e6c1084ff177475bd945729c900bc1b";
        let log = format!(
            "127.0.0.1 - - [26/Nov/2026:17:43:49 +0000] \"HEAD /v2/project/app/blobs/{d} HTTP/1.1\" 404 157 \"\" \"skopeo/1.9.3\"\n\
             time=\"2026-11-26T17:43:49Z\" level=info msg=\"response completed\" http.request.method=GET http.request.uri=\"/v2/project/app/blobs/{d}\" http.response.status=200\n\
             127.0.0.1 - - [26/Nov/2026:17:43:49 +0000] \"GET /v2/project/app/blobs/{d} HTTP/1.1\" 200 5244088 \"\" \"skopeo/1.9.3\"\n\
             127.0.0.1 - - [26/Nov/2026:17:43:49 +0000] \"GET /v2/other/blobs/{d} HTTP/1.1\" 307 0 \"\" \"skopeo/1.9.3\"\n\
             127.0.0.1 - - [26/Nov/2026:17:43:49 +0000] \"GET /v2/a/b/blobs/{d}?x=1 HTTP/1.1\" 206 100 \"\" \"curl\"\n\
             127.0.0.1 - - [26/Nov/2026:17:43:49 +0000] \"GET /v2/project/app/manifests/{d} HTTP/1.1\" 200 661 \"\" \"skopeo/1.9.3\"\n\
             127.0.0.1 - - [26/Nov/2026:17:43:49 +0000] \"GET /v2/project/app/blobs/{d}0 HTTP/1.1\" 200 1 \"\" \"skopeo/1.9.3\"\n"
        );
        // Only the full 200 GET: HEADs, redirects, 206 range probes and manifests do not count.
        assert_eq!(count_blob_gets(&log, d), 1);
        assert_eq!(count_blob_gets(&log, "sha256:00"), 0);
    }
}
