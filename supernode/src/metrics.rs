//! Prometheus metrics of a supernode (`GET /metrics` on the HTTP port).

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Supernode counters; names are part of the contract (DESIGN.md).
#[derive(Clone, Debug)]
pub struct Metrics {
    pub registry: Registry,
    /// `damselfly_supernode_source_bytes_total`: body bytes read from origins.
    pub source_bytes: IntCounter,
    /// `damselfly_supernode_source_requests_total{kind="fetch|probe"}`
    pub source_requests: IntCounterVec,
    /// `damselfly_supernode_upload_bytes_total`: piece bytes served to peers.
    pub upload_bytes: IntCounter,
    /// `damselfly_supernode_assignments_total{parent="peer|supernode"}`
    pub assignments: IntCounterVec,
    /// `damselfly_supernode_cross_location_assignments_total`: assignments of a peer with a known
    /// location to a parent outside it (the supernode included): pieces crossing into a location.
    pub cross_location: IntCounter,
    /// `damselfly_supernode_piece_failures_total{reason}` as reported by peers.
    pub piece_failures: IntCounterVec,
    /// `damselfly_supernode_isolations_total{scope="task|host"}`
    pub isolations: IntCounterVec,
    /// `damselfly_supernode_tasks`: task versions in memory.
    pub tasks: IntGauge,
    /// `damselfly_supernode_peers`: connected peer sessions.
    pub peers: IntGauge,
    /// `damselfly_supernode_subscribed_agents`: host agents subscribed for work (preheats of
    /// scope all_peers).
    pub subscribed_agents: IntGauge,
    /// `damselfly_supernode_evictions_total`: task versions evicted from the cache.
    pub evictions: IntCounter,
    /// `damselfly_supernode_requests_refused_total{api="pieces|index|admin|register|origin|token|sessions|rate|subscribe|subscribers"}`: requests
    /// without a valid ticket, admin token or origin proof.
    pub refused: IntCounterVec,
    /// `damselfly_supernode_replica_messages_total{dir="sent|received|refused|failed"}`: task
    /// metadata sent to successors and taken from other supernodes.
    pub replica_messages: IntCounterVec,
    /// `damselfly_supernode_rebuilt_pieces_total{from="peer|origin|cache"}`: pieces of versions
    /// taken over from a failed supernode, by where the seed got them.
    pub rebuilt_pieces: IntCounterVec,
    /// `damselfly_supernode_replica_pieces`: pieces described by the metadata other supernodes
    /// replicated here (bounded, see `replica::records`).
    pub replica_pieces: IntGauge,
    /// `damselfly_supernode_decision_seconds`: one scheduling step of a session, from taking
    /// the version's lock (waiting included) to the messages it decided: the results that
    /// arrived booked, the next assignments chosen.
    pub decision_seconds: Histogram,
}

impl Metrics {
    /// Creates all metrics in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let c = |n: &str, h: &str| IntCounter::new(n, h).expect("static metric definition");
        let v = |n: &str, h: &str, l: &[&str]| {
            IntCounterVec::new(Opts::new(n, h), l).expect("static metric definition")
        };
        let g = |n: &str, h: &str| IntGauge::new(n, h).expect("static metric definition");
        let m = Self {
            source_bytes: c(
                "damselfly_supernode_source_bytes_total",
                "Body bytes read from origins",
            ),
            source_requests: v(
                "damselfly_supernode_source_requests_total",
                "Requests sent to origins",
                &["kind"],
            ),
            upload_bytes: c(
                "damselfly_supernode_upload_bytes_total",
                "Piece bytes served to peers",
            ),
            assignments: v(
                "damselfly_supernode_assignments_total",
                "Piece assignments, by parent kind",
                &["parent"],
            ),
            cross_location: c(
                "damselfly_supernode_cross_location_assignments_total",
                "Piece assignments to a parent outside the peer's location",
            ),
            piece_failures: v(
                "damselfly_supernode_piece_failures_total",
                "Failed piece downloads reported by peers",
                &["reason"],
            ),
            isolations: v(
                "damselfly_supernode_isolations_total",
                "Parents taken out of scheduling",
                &["scope"],
            ),
            tasks: g("damselfly_supernode_tasks", "Task versions in memory"),
            subscribed_agents: g(
                "damselfly_supernode_subscribed_agents",
                "Host agents subscribed for work (preheats of scope all_peers)",
            ),
            peers: g("damselfly_supernode_peers", "Connected peer sessions"),
            evictions: c(
                "damselfly_supernode_evictions_total",
                "Task versions evicted from the disk cache",
            ),
            refused: v(
                "damselfly_supernode_requests_refused_total",
                "Requests refused for a missing or invalid ticket, admin token or origin proof, or over a per-host limit",
                &["api"],
            ),
            replica_messages: v(
                "damselfly_supernode_replica_messages_total",
                "Task metadata messages between supernodes",
                &["dir"],
            ),
            rebuilt_pieces: v(
                "damselfly_supernode_rebuilt_pieces_total",
                "Pieces of versions taken over from another supernode, by source",
                &["from"],
            ),
            replica_pieces: g(
                "damselfly_supernode_replica_pieces",
                "Pieces described by task metadata other supernodes replicated here",
            ),
            decision_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "damselfly_supernode_decision_seconds",
                    "Time of one scheduling step, waiting for the version's lock included",
                )
                .buckets(vec![
                    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1,
                    0.25, 1.0,
                ]),
            )
            .expect("static metric definition"),
            registry,
        };
        let _ = m.registry.register(Box::new(m.decision_seconds.clone()));
        for x in [
            &m.source_bytes,
            &m.upload_bytes,
            &m.evictions,
            &m.cross_location,
        ] {
            let _ = m.registry.register(Box::new(x.clone()));
        }
        for x in [
            &m.source_requests,
            &m.assignments,
            &m.piece_failures,
            &m.isolations,
            &m.refused,
            &m.replica_messages,
            &m.rebuilt_pieces,
        ] {
            let _ = m.registry.register(Box::new(x.clone()));
        }
        for x in [&m.tasks, &m.peers, &m.subscribed_agents, &m.replica_pieces] {
            let _ = m.registry.register(Box::new(x.clone()));
        }
        m
    }

    /// Prometheus text format.
    pub fn render(&self) -> String {
        fetcher::metrics::render(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
