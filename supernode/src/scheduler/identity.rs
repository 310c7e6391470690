//! Who is calling, from the connection rather than from what the peer says: the address it
//! connected from, and — with mutual TLS — the certificate it proved it holds. The host identity
//! built from them is what fault reports and host-wide isolation count, so one host cannot speak
//! as several by claiming host ids, nor escape isolation by claiming a new one.

use std::net::{IpAddr, SocketAddr};

use sha2::{Digest, Sha256};

/// The caller of one gRPC request.
#[derive(Clone, Debug, Default)]
pub struct Caller {
    /// The supernode's address the peer connected to.
    pub local_ip: Option<IpAddr>,
    /// The peer's address.
    pub remote: Option<SocketAddr>,
    /// The peer's leaf certificate (DER), when it presented one the cluster CA signed.
    pub cert: Option<Vec<u8>>,
}

impl Caller {
    /// The caller of `request`.
    pub fn of<T>(request: &tonic::Request<T>) -> Self {
        Self {
            local_ip: request.local_addr().map(|a| a.ip()),
            remote: request.remote_addr(),
            cert: request
                .peer_certs()
                .and_then(|c| c.first().map(|c| c.as_ref().to_vec())),
        }
    }

    /// The host identity: certificate and address with mutual TLS, else the address; a
    /// connection without either (in-process) falls back to `claimed`.
    pub fn host(&self, claimed: &str) -> String {
        match (&self.cert, self.remote) {
            (Some(cert), Some(r)) => {
                let h = Sha256::digest(cert);
                format!("cert:{}@{}", hex::encode(&h[..8]), r.ip())
            }
            (None, Some(r)) => format!("ip:{}", r.ip()),
            (Some(cert), None) => format!("cert:{}", hex::encode(&Sha256::digest(cert)[..8])),
            (None, None) => format!("claimed:{claimed}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(cert: Option<&[u8]>, ip: Option<&str>) -> Caller {
        Caller {
            local_ip: None,
            remote: ip.map(|i| SocketAddr::new(i.parse().expect("ip"), 4000)),
            cert: cert.map(|c| c.to_vec()),
        }
    }

    #[test]
    fn claims_do_not_make_another_host() {
        let a = caller(Some(b"cert-a"), Some("10.0.0.1"));
        assert_eq!(a.host("one"), a.host("two"));
        let plain = caller(None, Some("10.0.0.1"));
        assert_eq!(plain.host("one"), plain.host("two"));
        assert_eq!(plain.host("x"), "ip:10.0.0.1");
    }

    #[test]
    fn certificate_and_address_both_tell_hosts_apart() {
        let a = caller(Some(b"cert-a"), Some("10.0.0.1")).host("h");
        let b = caller(Some(b"cert-b"), Some("10.0.0.1")).host("h");
        let a_elsewhere = caller(Some(b"cert-a"), Some("10.0.0.2")).host("h");
        assert_ne!(a, b);
        assert_ne!(a, a_elsewhere);
        assert!(a.starts_with("cert:") && a.ends_with("@10.0.0.1"), "{a}");
    }

    #[test]
    fn only_an_in_process_call_is_taken_at_its_word() {
        assert_eq!(caller(None, None).host("h1"), "claimed:h1");
    }
}
