//! Cluster TLS: a cluster CA, and for each host a certificate signed by it whose subject
//! alternative names carry the names and IPs others reach it by (`supernode certs` makes both).
//! It covers the scheduler's gRPC (agents and dfget ↔ supernodes: supernodes present theirs and,
//! by default, require one from every peer) and the piece plane (every peer's and supernode's
//! piece server presents its certificate; see `http.rs`). Peers verify against the cluster CA and
//! the address they dialled. Registry credentials, tickets and private pieces travel on these
//! links, so nothing of them crosses the network in clear, and a plaintext client gets no answer.
//! It is the default: a daemon without TLS material runs only when told `plaintext`.

mod http;
mod listener;

pub use listener::TlsListener;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::error::{Error, Result};

/// Where a host's TLS material is (`tls_ca`, `tls_cert`, `tls_key` in the config files).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster CA certificate (PEM).
    pub ca: PathBuf,
    /// This host's certificate chain (PEM), signed by the cluster CA.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files from three optional config values: all three or none.
    pub fn from_parts(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Option<Self>> {
        match (ca, cert, key) {
            (None, None, None) => Ok(None),
            (Some(ca), Some(cert), Some(key)) => Ok(Some(Self {
                ca: ca.to_owned(),
                cert: cert.to_owned(),
                key: key.to_owned(),
            })),
            _ => Err(Error::invalid(
                "config",
                "tls_ca, tls_cert and tls_key: set all three or none",
            )),
        }
    }
}

/// `--tls-ca`, `--tls-cert`, `--tls-key`, `--plaintext`: the same flags on every daemon.
#[derive(Debug, Default, clap::Args)]
pub struct TlsArgs {
    /// Cluster CA (PEM): the scheduler link and the piece plane run over TLS, peers verified
    /// against it (with --tls-cert and --tls-key; `supernode certs` makes all three).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This host's certificate (PEM, signed by the cluster CA; SANs: the names and IPs it is
    /// reached at).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Run without cluster TLS: credentials, tickets and pieces cross the network in clear
    /// (only on a network you trust).
    #[arg(long, conflicts_with_all = ["tls_ca", "tls_cert", "tls_key"])]
    pub plaintext: bool,
}

impl TlsArgs {
    /// Applies the flags given over the config file's `tls_ca`, `tls_cert`, `tls_key`,
    /// `plaintext`.
    pub fn over(
        &self,
        ca: &mut Option<PathBuf>,
        cert: &mut Option<PathBuf>,
        key: &mut Option<PathBuf>,
        plaintext: &mut bool,
    ) {
        *plaintext |= self.plaintext;
        for (flag, value) in [
            (&self.tls_ca, ca),
            (&self.tls_cert, cert),
            (&self.tls_key, key),
        ] {
            if flag.is_some() {
                *value = flag.clone();
            }
        }
    }
}

/// Loaded, checked TLS material (cheap to clone).
#[derive(Clone, Debug)]
pub struct ClusterTls {
    ca: Certificate,
    ca_path: PathBuf,
    identity: Identity,
    piece_server: Arc<rustls::ServerConfig>,
    piece_client: Arc<rustls::ClientConfig>,
}

/// What a daemon runs with when it has no TLS material: an error unless `plaintext` was asked
/// for, since credentials, tickets and private pieces would cross the network in clear.
pub fn require(tls: &Option<ClusterTls>, plaintext: bool) -> Result<()> {
    match (tls, plaintext) {
        (Some(_), true) => Err(Error::invalid(
            "config",
            "plaintext together with tls_ca/tls_cert/tls_key: choose one",
        )),
        (None, false) => Err(Error::invalid(
            "config",
            "no cluster TLS: set tls_ca, tls_cert and tls_key (`supernode certs` makes them), \
             or plaintext = true (--plaintext) on a network you trust",
        )),
        _ => Ok(()),
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io("cannot read TLS file", path, e))
}

impl ClusterTls {
    /// The material named by the config values `tls_ca`, `tls_cert`, `tls_key` (all or none).
    pub fn from_config(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Option<Self>> {
        TlsFiles::from_parts(ca, cert, key)?
            .map(|f| Self::load(&f))
            .transpose()
    }

    /// Reads and checks the files (each must hold what its name says).
    pub fn load(files: &TlsFiles) -> Result<Self> {
        let bad = |path: &Path, what: &str| {
            Error::invalid("TLS file", format!("{}: {what}", path.display()))
        };
        let ca = read(&files.ca)?;
        let cert = read(&files.cert)?;
        let key = read(&files.key)?;
        http::certs(&ca, "tls_ca").map_err(|_| bad(&files.ca, "no PEM certificate in it"))?;
        http::certs(&cert, "tls_cert").map_err(|_| bad(&files.cert, "no PEM certificate in it"))?;
        if PrivateKeyDer::from_pem_slice(&key).is_err() {
            return Err(bad(&files.key, "no PEM private key in it"));
        }
        let piece_server = http::server(&cert, &key)?;
        let piece_client = Arc::new(http::client(&ca)?);
        Ok(Self {
            ca: Certificate::from_pem(ca),
            ca_path: files.ca.clone(),
            identity: Identity::from_pem(cert, key),
            piece_server,
            piece_client,
        })
    }

    /// The cluster CA file (origins that are cluster members, such as a supernode's own index
    /// API, are trusted through it).
    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }

    /// The piece server's rustls side (this host's certificate, no client certificate asked).
    pub fn piece_server(&self) -> Arc<rustls::ServerConfig> {
        self.piece_server.clone()
    }

    /// A piece client's rustls side, for `reqwest::ClientBuilder::use_preconfigured_tls`.
    pub fn piece_client(&self) -> rustls::ClientConfig {
        (*self.piece_client).clone()
    }

    /// The supernode's gRPC server side; `require_client_cert`: refuse peers without a
    /// certificate from the cluster CA.
    pub fn server(&self, require_client_cert: bool) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
            .client_auth_optional(!require_client_cert)
    }

    /// A peer's side towards the supernode at `addr` (`host:port`): the certificate must be the
    /// cluster CA's and name `host`.
    pub fn client(&self, addr: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .domain_name(host_of(addr))
    }
}

/// The host part of `host:port` (`[v6]:port` without its brackets).
pub fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']')
}

/// Whether the certificate `der` (already verified against the cluster CA by the TLS layer) is
/// valid for `host`, a DNS name or an IP: how a supernode recognises another one it was told of
/// by address (host certificates carry no role, only the names and IPs of the host).
pub fn names_host(der: &[u8], host: &str) -> bool {
    let Ok(name) = rustls::pki_types::ServerName::try_from(host) else {
        return false;
    };
    let der = rustls::pki_types::CertificateDer::from(der);
    webpki::EndEntityCert::try_from(&der)
        .is_ok_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok())
}
