//! rustls configurations for the piece plane (`GET /pieces/…` and the layer-index API on agents
//! and supernodes): servers present their cluster certificate, clients trust only the cluster CA
//! and check that the certificate names the address they dialled (peers are reached by IP, so a
//! host's certificate carries its IPs as subject alternative names). Readers are authorized by
//! tickets, not client certificates, so the piece servers ask for none.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::error::{Error, Result};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn bad(what: &'static str, e: impl std::fmt::Display) -> Error {
    Error::invalid("TLS file", format!("{what}: {e}"))
}

/// The certificates of a PEM bundle (`what` names the file in errors).
pub(super) fn certs(pem: &[u8], what: &'static str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(what, e))?;
    if certs.is_empty() {
        return Err(bad(what, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// The piece server's side: this host's chain and key, HTTP/1.1.
pub(super) fn server(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<ServerConfig>> {
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| bad("tls_key", e))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("protocol versions", e))?
        .with_no_client_auth()
        .with_single_cert(certs(cert_pem, "tls_cert")?, key)
        .map_err(|e| bad("tls_cert/tls_key", e))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A piece client's side: the cluster CA as the only root (not the system's: a public
/// certificate for a peer's IP proves nothing about cluster membership).
pub(super) fn client(ca_pem: &[u8]) -> Result<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca_pem, "tls_ca")? {
        roots.add(c).map_err(|e| bad("tls_ca", e))?;
    }
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("protocol versions", e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}
