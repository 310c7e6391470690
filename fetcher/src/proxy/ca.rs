//! The proxy's certificate authority for HTTPS interception (`--hijack`): created on first start
//! (or loaded from the operator's own CA files), it signs one certificate per hijacked host, cached.
//! Clients trust it once (`GET /ca.crt` on the proxy port serves it).

use std::io::Write;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::error::{Error, Result};

/// Where the CA lives: its certificate and private key (PEM).
#[derive(Clone, Debug)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CaFiles {
    /// The default location under the data directory.
    pub fn under(data_dir: &Path) -> Self {
        let dir = data_dir.join("proxy-ca");
        Self {
            cert: dir.join("ca.crt"),
            key: dir.join("ca.key"),
        }
    }
}

/// Per-host server configurations kept (a cluster talks to a handful of registries).
const CACHED_HOSTS: usize = 256;

pub(crate) struct CertAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
    hosts: Mutex<lru::LruCache<String, Arc<ServerConfig>>>,
}

impl CertAuthority {
    /// Loads the CA from `files`, or creates one there when neither file exists.
    pub fn load_or_create(files: &CaFiles) -> Result<Self> {
        let (cert_pem, key_pem) = match (files.cert.exists(), files.key.exists()) {
            (true, true) => (read(&files.cert)?, read(&files.key)?),
            (false, false) => create(files)?,
            _ => {
                return Err(Error::invalid(
                    "proxy CA",
                    format!(
                        "{} and {} must both exist or both be absent",
                        files.cert.display(),
                        files.key.display()
                    ),
                ));
            }
        };
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| Error::invalid("proxy CA key", format!("{}: {e}", files.key.display())))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| {
            Error::invalid(
                "proxy CA certificate",
                format!("{}: {e}", files.cert.display()),
            )
        })?;
        let cap = NonZeroUsize::new(CACHED_HOSTS).unwrap_or(NonZeroUsize::MIN);
        Ok(Self {
            issuer,
            cert_pem,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            hosts: Mutex::new(lru::LruCache::new(cap)),
        })
    }

    /// The CA certificate, PEM, as clients should trust it.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A TLS server configuration presenting a certificate for `host` (a DNS name or an IP).
    pub fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>> {
        let host = host.to_ascii_lowercase();
        if let Ok(mut hosts) = self.hosts.lock()
            && let Some(cfg) = hosts.get(&host)
        {
            return Ok(cfg.clone());
        }
        let bad =
            |e: &dyn std::fmt::Display| Error::invalid("hijacked host", format!("{host}: {e}"));
        let mut params = CertificateParams::new(vec![host.clone()]).map_err(|e| bad(&e))?;
        params
            .distinguished_name
            .push(DnType::CommonName, host.as_str());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(|e| bad(&e))?;
        let cert = params.signed_by(&key, &self.issuer).map_err(|e| bad(&e))?;
        let chain = vec![cert.der().clone()];
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut cfg = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(&e))?
            .with_no_client_auth()
            .with_single_cert(chain, key_der)
            .map_err(|e| bad(&e))?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let cfg = Arc::new(cfg);
        if let Ok(mut hosts) = self.hosts.lock() {
            hosts.put(host, cfg.clone());
        }
        Ok(cfg)
    }

    /// The CA certificate in DER.
    #[cfg(test)]
    pub fn cert_der(&self) -> Result<rustls::pki_types::CertificateDer<'static>> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|e| Error::invalid("proxy CA certificate", e.to_string()))
    }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io("cannot read", path, e))
}

/// Creates a new CA (ECDSA P-256) and writes it to `files`; the key is readable by its owner only.
fn create(files: &CaFiles) -> Result<(String, String)> {
    let fail = |e: rcgen::Error| Error::invalid("proxy CA", e.to_string());
    let mut params = CertificateParams::default();
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("Damselfly dfdaemon CA ({host})"),
    );
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Damselfly");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().map_err(fail)?;
    let cert = params.self_signed(&key).map_err(fail)?;
    let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
    write_new(&files.key, &key_pem, 0o600)?;
    write_new(&files.cert, &cert_pem, 0o644)?;
    tracing::info!(cert = %files.cert.display(), "created the proxy CA: clients must trust it to use --hijack");
    Ok((cert_pem, key_pem))
}

/// Writes `text` to `path` through a temporary file, so a crash never leaves half a key.
fn write_new(path: &Path, text: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create", dir, e))?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| Error::io("cannot create", &tmp, e))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io("cannot write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io("cannot rename to", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_then_reloads_the_same_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = CaFiles::under(dir.path());
        let a = CertAuthority::load_or_create(&files).expect("create");
        let b = CertAuthority::load_or_create(&files).expect("reload");
        assert_eq!(a.cert_pem(), b.cert_pem());
        let mode = std::fs::metadata(&files.key).expect("key").permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        std::fs::remove_file(&files.key).expect("rm");
        assert!(CertAuthority::load_or_create(&files).is_err());
    }

    #[tokio::test]
    async fn a_client_trusting_the_ca_accepts_the_host_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CertAuthority::load_or_create(&CaFiles::under(dir.path())).expect("ca");
        let server = ca.server_config("registry.example.test").expect("leaf");
        assert!(Arc::ptr_eq(
            &server,
            &ca.server_config("REGISTRY.example.test").expect("cached")
        ));
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().expect("der")).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let handshake = |name: &'static str| {
            let (c, s) = tokio::io::duplex(64 * 1024);
            let acceptor = tokio_rustls::TlsAcceptor::from(server.clone());
            let connector = tokio_rustls::TlsConnector::from(Arc::new(client.clone()));
            async move {
                let srv = tokio::spawn(async move { acceptor.accept(s).await.is_ok() });
                let name = rustls::pki_types::ServerName::try_from(name).expect("name");
                let ok = connector.connect(name, c).await.is_ok();
                let _ = srv.await;
                ok
            }
        };
        assert!(handshake("registry.example.test").await);
        assert!(
            !handshake("other.example.test").await,
            "wrong name must fail"
        );
    }
}
