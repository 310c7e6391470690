//! `supernode certs`: the cluster CA and host certificates for cluster TLS, so a cluster needs
//! nothing but this binary to run encrypted and authenticated. The first call creates the CA
//! (`ca.crt`, `ca.key`) in the directory (or issues from an existing one, `--ca`, such as a
//! Kubernetes Secret mounted into an init container); each call issues one host certificate
//! (`<name>.crt`, `<name>.key`) whose subject alternative names are the name and every `--san`
//! (IPs become IP SANs: peers dial each other by IP). Keys are written 0600, each file appears
//! whole or not at all, and nothing existing is overwritten.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::error::{Error, Result};

/// Create the cluster CA (once) and a host certificate signed by it.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example (a supernode and one agent):\n  supernode certs --dir pki --name supernode --san 10.0.0.5 --san supernode.example\n  supernode certs --dir pki --name node1 --san 10.0.0.21\nThen: --tls-ca pki/ca.crt --tls-cert pki/node1.crt --tls-key pki/node1.key.\nKeep pki/ca.key off the hosts: it issues cluster membership."
)]
pub struct CertsArgs {
    /// Directory of the new certificate, and of the CA (created when missing) unless --ca.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Directory holding an existing CA (`ca.crt`, `ca.key`; may be read-only, as a mounted
    /// Secret): issue from it, never create one.
    #[arg(long, value_name = "DIR")]
    pub ca: Option<PathBuf>,
    /// Host name: the certificate's common name, first SAN and file name (`<name>.crt`).
    #[arg(long)]
    pub name: String,
    /// Another name or IP the host is reached at (repeatable).
    #[arg(long, value_name = "NAME|IP")]
    pub san: Vec<String>,
    /// Validity of the host certificate in days.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
}

const CA_DAYS: i64 = 3650;

fn failed(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Config {
        key: "certs",
        detail: format!("{what}: {e}"),
    }
}

/// Runs `supernode certs`; returns the files written.
pub fn run(a: &CertsArgs) -> Result<Vec<PathBuf>> {
    check_name(&a.name)?;
    std::fs::create_dir_all(&a.dir)
        .map_err(|e| failed(&format!("cannot create {}", a.dir.display()), e))?;
    let crt = a.dir.join(format!("{}.crt", a.name));
    if crt.exists() {
        return Err(failed(
            &crt.display().to_string(),
            "exists (remove it to issue a new one)",
        ));
    }
    let mut written = Vec::new();
    let ca_dir = a.ca.as_deref().unwrap_or(&a.dir);
    let (ca_crt, ca_key) = (ca_dir.join("ca.crt"), ca_dir.join("ca.key"));
    if a.ca.is_none() && !ca_crt.exists() {
        let (cert, key) = new_ca()?;
        write_new(&ca_key, key.as_bytes(), 0o600)?;
        write_new(&ca_crt, cert.as_bytes(), 0o644)?;
        written.extend([ca_crt.clone(), ca_key.clone()]);
    }
    let issuer = load_ca(&ca_crt, &ca_key)?;
    let (cert, key) = issue(&issuer, &a.name, &a.san, a.days)?;
    let key_path = a.dir.join(format!("{}.key", a.name));
    write_new(&key_path, key.as_bytes(), 0o600)?;
    write_new(&crt, cert.as_bytes(), 0o644)?;
    written.extend([crt, key_path]);
    Ok(written)
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name != "ca"
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(failed(
            &format!("--name {name:?}"),
            "letters, digits, '.', '_' and '-' only, not \"ca\"",
        ))
    }
}

fn validity(p: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    // An hour back: hosts whose clocks lag a little accept a certificate issued just now.
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(days);
}

fn new_ca() -> Result<(String, String)> {
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::CommonName, "Damselfly cluster CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut p, CA_DAYS);
    let key = KeyPair::generate().map_err(|e| failed("CA key", e))?;
    let cert = p
        .self_signed(&key)
        .map_err(|e| failed("CA certificate", e))?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn load_ca(crt: &Path, key: &Path) -> Result<Issuer<'static, KeyPair>> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| failed(&format!("cannot read {}", p.display()), e))
    };
    let key = KeyPair::from_pem(&read(key)?)
        .map_err(|e| failed(&format!("{}: not a PEM private key", key.display()), e))?;
    Issuer::from_ca_cert_pem(&read(crt)?, key)
        .map_err(|e| failed(&format!("{}: not a PEM CA certificate", crt.display()), e))
}

fn issue(
    ca: &Issuer<'_, KeyPair>,
    name: &str,
    sans: &[String],
    days: u32,
) -> Result<(String, String)> {
    let mut names = vec![name.to_owned()];
    names.extend(sans.iter().filter(|s| *s != name).cloned());
    let mut p = CertificateParams::new(names).map_err(|e| failed("--san", e))?;
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    // One certificate per host, for both ends: it serves pieces and gRPC, and dials supernodes.
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    validity(&mut p, i64::from(days.max(1)));
    let key = KeyPair::generate().map_err(|e| failed("host key", e))?;
    let cert = p
        .signed_by(&key, ca)
        .map_err(|e| failed("host certificate", e))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes `path` whole (temporary file + rename) with `mode`; fails if it exists.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let err = |e: std::io::Error| failed(&format!("cannot write {}", path.display()), e);
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".certs-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
        .tempfile_in(dir)
        .map_err(err)?;
    tmp.write_all(bytes).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist_noclobber(path).map_err(|e| err(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &Path, name: &str, san: &[&str]) -> CertsArgs {
        CertsArgs {
            dir: dir.to_owned(),
            name: name.into(),
            san: san.iter().map(|s| s.to_string()).collect(),
            days: 30,
            ca: None,
        }
    }

    #[test]
    fn a_host_certificate_names_its_hosts_and_no_other() {
        use rustls::pki_types::pem::PemObject;
        let d = tempfile::tempdir().expect("tmp");
        run(&args(d.path(), "sn", &["10.0.0.5", "sn.example"])).expect("issue");
        let pem = std::fs::read(d.path().join("sn.crt")).expect("crt");
        let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem).expect("pem");
        for host in ["10.0.0.5", "sn.example", "sn"] {
            assert!(fetcher::tls::names_host(&der, host), "{host}");
        }
        for host in ["10.0.0.6", "other.example", "", "not a name"] {
            assert!(!fetcher::tls::names_host(&der, host), "{host}");
        }
        assert!(!fetcher::tls::names_host(b"not a certificate", "10.0.0.5"));
    }

    #[test]
    fn issues_hosts_under_one_ca_and_overwrites_nothing() {
        let d = tempfile::tempdir().expect("tmp");
        let first = run(&args(d.path(), "sn", &["127.0.0.1", "sn.example"])).expect("first");
        assert_eq!(first.len(), 4, "{first:?}");
        let ca = std::fs::read(d.path().join("ca.crt")).expect("ca");
        let second = run(&args(d.path(), "node1", &["10.0.0.2"])).expect("second");
        assert_eq!(second.len(), 2, "the CA is made once: {second:?}");
        assert_eq!(std::fs::read(d.path().join("ca.crt")).expect("ca"), ca);
        let again = run(&args(d.path(), "node1", &[])).expect_err("exists");
        assert!(again.to_string().contains("node1.crt"), "{again}");
        use std::os::unix::fs::PermissionsExt;
        for key in ["ca.key", "sn.key", "node1.key"] {
            let mode = std::fs::metadata(d.path().join(key))
                .expect("key")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        // What the daemons load.
        fetcher::tls::ClusterTls::load(&fetcher::tls::TlsFiles {
            ca: d.path().join("ca.crt"),
            cert: d.path().join("node1.crt"),
            key: d.path().join("node1.key"),
        })
        .expect("loads");
    }

    #[test]
    fn an_existing_ca_elsewhere_issues_and_a_missing_one_is_named() {
        let ca = tempfile::tempdir().expect("tmp");
        run(&args(ca.path(), "first", &[])).expect("ca");
        let out = tempfile::tempdir().expect("tmp");
        let mut a = args(out.path(), "node", &["10.1.2.3"]);
        a.ca = Some(ca.path().to_owned());
        let files = run(&a).expect("issue from --ca");
        assert_eq!(files.len(), 2, "{files:?}");
        assert!(!out.path().join("ca.key").exists(), "the CA key was copied");
        let empty = tempfile::tempdir().expect("tmp");
        a.ca = Some(empty.path().to_owned());
        a.name = "other".into();
        let e = run(&a).expect_err("no CA there");
        assert!(e.to_string().contains("ca.key"), "{e}");
    }

    #[test]
    fn bad_names_are_refused_by_name() {
        let d = tempfile::tempdir().expect("tmp");
        for bad in ["", "ca", "../x", "a/b", ".hidden"] {
            let e = run(&args(d.path(), bad, &[])).expect_err(bad);
            assert!(e.to_string().contains("--name"), "{e}");
        }
    }
}
