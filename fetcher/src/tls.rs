//! Cluster TLS for the scheduler's gRPC (agents and dfget ↔ supernodes): a cluster CA, and for
//! each host a certificate signed by it whose subject alternative names carry the names and IPs
//! others reach it by. Supernodes present theirs and, by default, require one from every peer
//! (mutual TLS); peers verify the supernode's against the cluster CA and the address they dialled.
//! Registry credentials and tickets travel on this link, so with TLS configured nothing of them
//! crosses the network in clear, and a plaintext client gets no answer.

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
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

/// `--tls-ca`, `--tls-cert`, `--tls-key`: the same three flags on every daemon.
#[derive(Debug, Default, clap::Args)]
pub struct TlsArgs {
    /// Cluster CA (PEM): the scheduler link runs over TLS, peers verified against it (with
    /// --tls-cert and --tls-key) [default: plaintext].
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This host's certificate (PEM, signed by the cluster CA; SANs: the names and IPs it is
    /// reached at).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
}

impl TlsArgs {
    /// Applies the flags given over the config file's `tls_ca`, `tls_cert`, `tls_key`.
    pub fn over(
        &self,
        ca: &mut Option<PathBuf>,
        cert: &mut Option<PathBuf>,
        key: &mut Option<PathBuf>,
    ) {
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
    identity: Identity,
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
        let count = |pem: &[u8]| {
            CertificateDer::pem_slice_iter(pem)
                .filter(|c| c.is_ok())
                .count()
        };
        if count(&ca) == 0 {
            return Err(bad(&files.ca, "no PEM certificate in it"));
        }
        if count(&cert) == 0 {
            return Err(bad(&files.cert, "no PEM certificate in it"));
        }
        if PrivateKeyDer::from_pem_slice(&key).is_err() {
            return Err(bad(&files.key, "no PEM private key in it"));
        }
        Ok(Self {
            ca: Certificate::from_pem(ca),
            identity: Identity::from_pem(cert, key),
        })
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
        let host = addr
            .rsplit_once(':')
            .map_or(addr, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']');
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .domain_name(host)
    }
}
