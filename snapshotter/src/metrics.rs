//! Prometheus metrics of dfsnapshotter (`damselfly_snapshotter_*`), served on `--metrics-addr`.

use prometheus::{
    GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

#[derive(Clone, Debug)]
pub struct Metrics {
    pub registry: Registry,
    /// `damselfly_snapshotter_fuse_read_bytes_total`: bytes returned to FUSE reads.
    pub fuse_read_bytes: IntCounter,
    /// `damselfly_snapshotter_remote_fetched_bytes_total`: compressed blob bytes fetched for them.
    pub fetched_bytes: IntCounter,
    /// `damselfly_snapshotter_fuse_read_errors_total`: reads answered EIO.
    pub read_errors: IntCounter,
    /// `damselfly_snapshotter_fuse_read_seconds`: latency of FUSE reads.
    pub read_seconds: Histogram,
    /// `damselfly_snapshotter_chunk_reads_total{from="memory|disk|inflate"}`: where the
    /// uncompressed chunks FUSE reads touched came from.
    pub chunk_reads: IntCounterVec,
    /// `damselfly_snapshotter_passthrough_opens_total`: file opens handed to the kernel (FUSE
    /// passthrough: their reads never reach the snapshotter).
    pub passthrough_opens: IntCounter,
    /// `damselfly_snapshotter_credential_scopes`: image scopes whose registry credentials the
    /// FUSE manager holds.
    pub credential_scopes: IntGauge,
    /// `damselfly_snapshotter_read_credentials_total{headers="made|reused"}`: registry
    /// credentials lazy reads went out with, made afresh or reused while fresh.
    pub read_credentials: IntCounterVec,
    /// `damselfly_snapshotter_start_sets_total{outcome="kept|not_kept|failed"}`: first starts
    /// of layers recorded at the supernode.
    pub start_sets: IntCounterVec,
    /// `damselfly_snapshotter_prefetched_layers_total`: layers whose start set was fetched at
    /// mount.
    pub prefetched_layers: IntCounter,
    /// `damselfly_snapshotter_prefetch_bytes_total`: compressed blob bytes fetched for them.
    pub prefetch_bytes: IntCounter,
    /// `damselfly_snapshotter_starts_pending{work="record|prefetch"}`: layer starts being
    /// recorded (waiting for their window to pass) and prefetches running.
    pub starts_pending: IntGaugeVec,
    /// `damselfly_snapshotter_layer_fetched_ratio{layer="sha256:…"}`: the share of each mounted
    /// lazy layer's blob that the host's agent holds (1: the whole layer is on this host).
    pub layer_fetched: GaugeVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("static metric definition");
            let _ = registry.register(Box::new(c.clone()));
            c
        };
        let fuse_read_bytes = counter(
            "damselfly_snapshotter_fuse_read_bytes_total",
            "Bytes returned to FUSE reads of lazy layers",
        );
        let fetched_bytes = counter(
            "damselfly_snapshotter_remote_fetched_bytes_total",
            "Compressed blob bytes fetched to serve FUSE reads",
        );
        let read_errors = counter(
            "damselfly_snapshotter_fuse_read_errors_total",
            "FUSE reads answered EIO (missing or damaged layer data)",
        );
        let passthrough_opens = counter(
            "damselfly_snapshotter_passthrough_opens_total",
            "Opens of lazy-layer files whose bytes are all local, handed to the kernel (FUSE passthrough)",
        );
        let read_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "damselfly_snapshotter_fuse_read_seconds",
                "Latency of FUSE reads of lazy layers",
            )
            .buckets(vec![
                0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
            ]),
        )
        .expect("static metric definition");
        let _ = registry.register(Box::new(read_seconds.clone()));
        let chunk_reads = IntCounterVec::new(
            Opts::new(
                "damselfly_snapshotter_chunk_reads_total",
                "Uncompressed chunks used by FUSE reads, by where they came from",
            ),
            &["from"],
        )
        .expect("static metric definition");
        let _ = registry.register(Box::new(chunk_reads.clone()));
        let credential_scopes = IntGauge::new(
            "damselfly_snapshotter_credential_scopes",
            "Image scopes (registry and repository) whose credentials the FUSE manager holds",
        )
        .expect("static metric definition");
        let _ = registry.register(Box::new(credential_scopes.clone()));
        let read_credentials = IntCounterVec::new(
            Opts::new(
                "damselfly_snapshotter_read_credentials_total",
                "Registry credentials lazy reads went out with, by whether they were made or reused",
            ),
            &["headers"],
        )
        .expect("static metric definition");
        let _ = registry.register(Box::new(read_credentials.clone()));
        let start_sets = IntCounterVec::new(
            Opts::new(
                "damselfly_snapshotter_start_sets_total",
                "First starts of lazy layers recorded at the supernode, by outcome",
            ),
            &["outcome"],
        )
        .expect("static metric definition");
        let _ = registry.register(Box::new(start_sets.clone()));
        let prefetched_layers = counter(
            "damselfly_snapshotter_prefetched_layers_total",
            "Lazy layers whose recorded start was fetched at mount",
        );
        let prefetch_bytes = counter(
            "damselfly_snapshotter_prefetch_bytes_total",
            "Compressed blob bytes fetched at mount for recorded starts",
        );
        let starts_pending = IntGaugeVec::new(
            Opts::new(
                "damselfly_snapshotter_starts_pending",
                "Lazy layer starts being recorded, and prefetches of recorded ones running",
            ),
            &["work"],
        )
        .expect("static metric definition");
        let _ = registry.register(Box::new(starts_pending.clone()));
        let layer_fetched = GaugeVec::new(
            Opts::new(
                "damselfly_snapshotter_layer_fetched_ratio",
                "Share of each mounted lazy layer's blob held by the host's agent",
            ),
            &["layer"],
        )
        .expect("static metric definition");
        let _ = registry.register(Box::new(layer_fetched.clone()));
        Self {
            layer_fetched,
            starts_pending,
            start_sets,
            prefetched_layers,
            prefetch_bytes,
            read_credentials,
            credential_scopes,
            chunk_reads,
            registry,
            fuse_read_bytes,
            fetched_bytes,
            read_errors,
            read_seconds,
            passthrough_opens,
        }
    }

    pub fn render(&self) -> String {
        fetcher::metrics::render(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
