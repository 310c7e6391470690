//! Test certificates (made with rcgen): a CA, a server certificate for the test registry's
//! hostname, and a token-signing certificate, written as PEM files; and the `/etc/hosts` entry that
//! gives the registry a name (Go clients never send `127.0.0.1` or `localhost` through a proxy).

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use crate::harness::Env;

/// The test registry's hostname (mapped to 127.0.0.1 in `/etc/hosts`).
pub const REGISTRY_HOST: &str = "registry.damselfly.test";

/// PEM files of the test PKI.
pub struct Pki {
    /// The CA certificate.
    pub ca_crt: PathBuf,
    /// A directory holding only `ca.crt` (skopeo's `--*-cert-dir` wants no keys beside it).
    pub ca_dir: PathBuf,
    /// Server certificate for [`REGISTRY_HOST`] and 127.0.0.1, signed by the CA, and its key.
    pub server_crt: PathBuf,
    pub server_key: PathBuf,
    /// Self-signed token-signing certificate (the registry's `rootcertbundle`) and its key.
    pub signing_crt: PathBuf,
    pub signing_key: PathBuf,
}

/// Makes the PKI under `<env>/pki`.
pub fn make_pki(env: &Env) -> Pki {
    let dir = env.path("pki");
    let ca_dir = dir.join("ca");
    std::fs::create_dir_all(&ca_dir).expect("mkdir pki");
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write pki file");
        p
    };
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Damselfly test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().expect("ca key");
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let ca_crt = write("ca.crt", ca_cert.pem());
    std::fs::write(ca_dir.join("ca.crt"), ca_cert.pem()).expect("write ca dir");
    let issuer = Issuer::new(ca_params, ca_key);

    let mut params = CertificateParams::new(vec![REGISTRY_HOST.to_owned(), "127.0.0.1".to_owned()])
        .expect("server params");
    params
        .distinguished_name
        .push(DnType::CommonName, REGISTRY_HOST);
    let key = KeyPair::generate().expect("server key");
    let cert = params.signed_by(&key, &issuer).expect("server cert");
    let server_crt = write("server.crt", cert.pem());
    let server_key = write("server.key", key.serialize_pem());

    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "damselfly test token signer");
    let key = KeyPair::generate().expect("signing key");
    let cert = params.self_signed(&key).expect("signing cert");
    let signing_crt = write("signing.crt", cert.pem());
    let signing_key = write("signing.key", key.serialize_pem());
    Pki {
        ca_crt,
        ca_dir,
        server_crt,
        server_key,
        signing_crt,
        signing_key,
    }
}

/// Maps [`REGISTRY_HOST`] to 127.0.0.1 in `/etc/hosts` (once). `Err` says why it cannot (not root).
pub fn ensure_hosts_entry() -> Result<(), String> {
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let present = hosts.lines().any(|l| {
        let mut f = l.split_whitespace();
        f.next() == Some("127.0.0.1") && f.any(|h| h == REGISTRY_HOST)
    });
    if present {
        return Ok(());
    }
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open("/etc/hosts")
        .map_err(|e| format!("cannot add {REGISTRY_HOST} to /etc/hosts ({e}); run as root"))?;
    writeln!(f, "127.0.0.1 {REGISTRY_HOST}").map_err(|e| format!("cannot write /etc/hosts: {e}"))
}
