//! Prometheus metrics of a peer (dfget's embedded peer or dfdaemon).

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

/// Counters every peer keeps. Names are part of the contract (DESIGN.md).
#[derive(Clone, Debug)]
pub struct PeerMetrics {
    pub registry: Registry,
    /// `damselfly_peer_download_bytes_total{from="peer|supernode|origin"}`
    pub download_bytes: IntCounterVec,
    /// `damselfly_peer_upload_bytes_total`
    pub upload_bytes: IntCounter,
    /// `damselfly_piece_verify_failures_total`
    pub verify_failures: IntCounter,
    /// `damselfly_peer_downloads_total{result="ok|error"}`
    pub downloads: IntCounterVec,
    /// `damselfly_proxy_requests_total{kind="blob|token|passthrough|tunnel|hijack|refused"}`
    pub proxy_requests: IntCounterVec,
    /// `damselfly_peer_tickets_refused_total`: piece requests without a valid ticket.
    pub tickets_refused: IntCounter,
}

impl PeerMetrics {
    /// Creates the counters in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let download_bytes = IntCounterVec::new(
            Opts::new(
                "damselfly_peer_download_bytes_total",
                "Piece bytes downloaded, by where they came from",
            ),
            &["from"],
        )
        .expect("static metric definition");
        let upload_bytes = IntCounter::new(
            "damselfly_peer_upload_bytes_total",
            "Piece bytes uploaded to other peers",
        )
        .expect("static metric definition");
        let verify_failures = IntCounter::new(
            "damselfly_piece_verify_failures_total",
            "Pieces received whose bytes did not match their sha256",
        )
        .expect("static metric definition");
        let downloads = IntCounterVec::new(
            Opts::new(
                "damselfly_peer_downloads_total",
                "Downloads finished, by result",
            ),
            &["result"],
        )
        .expect("static metric definition");
        let proxy_requests = IntCounterVec::new(
            Opts::new(
                "damselfly_proxy_requests_total",
                "Registry proxy requests, by how they were handled (blob: P2P; token: shared token \
                 fetch; passthrough: to the registry; tunnel/hijack: CONNECT; refused: origin policy)",
            ),
            &["kind"],
        )
        .expect("static metric definition");
        for c in [&download_bytes, &downloads, &proxy_requests] {
            let _ = registry.register(Box::new(c.clone()));
        }
        let tickets_refused = IntCounter::new(
            "damselfly_peer_tickets_refused_total",
            "Piece requests refused for a missing or invalid ticket",
        )
        .expect("static metric definition");
        for c in [&upload_bytes, &verify_failures, &tickets_refused] {
            let _ = registry.register(Box::new(c.clone()));
        }
        Self {
            registry,
            download_bytes,
            upload_bytes,
            verify_failures,
            downloads,
            proxy_requests,
            tickets_refused,
        }
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        render(&self.registry)
    }
}

impl Default for PeerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Any registry in Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut buf = String::new();
    let _ = prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut buf);
    buf
}
