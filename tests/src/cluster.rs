//! Cluster TLS for every daemon a test starts, as deployments run it (TLS is the default): one
//! cluster CA per test process and a certificate per daemon (SANs 127.0.0.1, 127.0.0.2 and
//! localhost),
//! both made by `supernode certs`, the tool operators use. Test clients that talk to supernode
//! HTTP (metrics, index, admin APIs) trust the CA through [`http_client`].

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::harness::bin;

fn dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = std::env::var_os("DAMSELFLY_TEST_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        tempfile::Builder::new()
            .prefix("damselfly-cluster-")
            .tempdir_in(base)
            .expect("cluster pki dir")
    })
    .path()
}

/// Serializes `supernode certs` runs (the first one creates the CA).
static ISSUE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The cluster CA certificate.
pub fn ca() -> PathBuf {
    let ca = dir().join("ca.crt");
    if !ca.exists() {
        issue("ca-init");
    }
    ca
}

/// Issues a host certificate for a new daemon named like `name`; returns (cert, key).
pub fn issue(name: &str) -> (PathBuf, PathBuf) {
    issue_for(name, &["127.0.0.1", "127.0.0.2", "localhost"])
}

/// Issues a certificate from the cluster CA for a host named like `name`, valid for `sans` only.
pub fn issue_for(name: &str, sans: &[&str]) -> (PathBuf, PathBuf) {
    static N: AtomicU32 = AtomicU32::new(0);
    let safe: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let host = format!("{safe}-{}", N.fetch_add(1, Ordering::Relaxed));
    let _one = ISSUE.lock().unwrap_or_else(|p| p.into_inner());
    let out = std::process::Command::new(bin("supernode"))
        .args(["certs", "--dir"])
        .arg(dir())
        .args(["--name", &host])
        .args(sans.iter().flat_map(|s| ["--san", s]))
        .output()
        .expect("run supernode certs");
    assert!(
        out.status.success(),
        "supernode certs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        dir().join(format!("{host}.crt")),
        dir().join(format!("{host}.key")),
    )
}

/// `--tls-ca`, `--tls-cert`, `--tls-key` for a new daemon named like `name`.
pub fn flags(name: &str) -> Vec<String> {
    let ca = ca();
    let (cert, key) = issue(name);
    [("--tls-ca", ca), ("--tls-cert", cert), ("--tls-key", key)]
        .into_iter()
        .flat_map(|(f, p)| [f.to_owned(), p.to_string_lossy().into_owned()])
        .collect()
}

/// The cluster CA for a reqwest client.
pub fn ca_certificate() -> reqwest::Certificate {
    let pem = std::fs::read(ca()).expect("read cluster ca");
    reqwest::Certificate::from_pem(&pem).expect("cluster ca pem")
}

/// A client trusting the cluster CA (and the system roots), without proxies.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(ca_certificate())
        .build()
        .expect("client")
}

/// Cluster TLS material of a new host named like `name`, as daemons load it.
pub fn host_tls(name: &str) -> fetcher::tls::ClusterTls {
    let (cert, key) = issue(name);
    load(cert, key)
}

/// Cluster TLS material of a new host named like `name` whose certificate is valid for `sans`.
pub fn host_tls_for(name: &str, sans: &[&str]) -> fetcher::tls::ClusterTls {
    let (cert, key) = issue_for(name, sans);
    load(cert, key)
}

fn load(cert: PathBuf, key: PathBuf) -> fetcher::tls::ClusterTls {
    fetcher::tls::ClusterTls::load(&fetcher::tls::TlsFiles {
        ca: ca(),
        cert,
        key,
    })
    .expect("load cluster tls")
}

/// A scheduler client to the supernode at `grpc`, as a cluster member: the test process is one
/// host, with one certificate, however many sessions it opens.
pub async fn scheduler(
    grpc: &str,
) -> proto::scheduler::scheduler_client::SchedulerClient<tonic::transport::Channel> {
    static ME: OnceLock<fetcher::tls::ClusterTls> = OnceLock::new();
    let me = ME.get_or_init(|| host_tls("client"));
    fetcher::download::connect_scheduler(grpc, Some(me))
        .await
        .unwrap_or_else(|e| panic!("connect to {grpc}: {e}"))
}
