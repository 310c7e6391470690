//! Start sets: what a layer's first start read, recorded on the host that started it first and
//! fetched at mount on later hosts, before their containers ask (the supernode keeps them next
//! to the layer's index). A start is what a layer's reads touch within a window of its first
//! read: [`StartRecord`] keeps the uncompressed offsets of the chunks read; a later host turns
//! them into the blob's compressed ranges ([`plan`]) and has its agent fetch those the way reads
//! do, so that they wait in the agent's store, verified, when the container reads them. The
//! window opens with the first read of any layer of the image ([`StartClock`]).

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use layerindex::LayerIndex;
use proto::agent::agent_client::AgentClient;
use tokio::task::AbortHandle;
use tonic::transport::Channel;

use crate::metrics::Metrics;
use crate::registry::{Reference, Registry};

/// Offsets a start records at most (the supernode keeps no more).
pub const MAX_OFFSETS: usize = 16_384;

/// Whether to record and prefetch starts, and how long after a layer's first read its reads
/// count as its start.
#[derive(Clone, Copy, Debug)]
pub struct StartOptions {
    pub prefetch: bool,
    pub window: Duration,
}

impl Default for StartOptions {
    fn default() -> Self {
        Self {
            prefetch: true,
            window: Duration::from_secs(10),
        }
    }
}

/// When an image's start began on this host: the first read of any of its layers that record
/// their start (shared by them, so that a layer first read late in a container's life is not
/// taken for part of its start).
#[derive(Default)]
pub struct StartClock {
    first: OnceLock<Instant>,
    began: tokio::sync::watch::Sender<bool>,
}

impl StartClock {
    /// The first read's time; this one's, if it is the first.
    fn started(&self) -> Instant {
        if let Some(t) = self.first.get() {
            return *t;
        }
        let t = *self.first.get_or_init(Instant::now);
        self.began.send_replace(true);
        t
    }

    /// Waits for the first read.
    async fn wait(&self) -> Instant {
        let mut rx = self.began.subscribe();
        let _ = rx.wait_for(|b| *b).await;
        self.first.get().copied().unwrap_or_else(Instant::now)
    }
}

/// The chunks a layer's reads touch within `window` of its image's first read.
pub struct StartRecord {
    clock: Arc<StartClock>,
    window: Duration,
    offsets: Mutex<BTreeSet<u64>>,
}

impl StartRecord {
    pub fn new(clock: Arc<StartClock>, window: Duration) -> Self {
        Self {
            clock,
            window,
            offsets: Mutex::new(BTreeSet::new()),
        }
    }

    /// A read touched the chunk that starts at uncompressed `offset`.
    pub fn note(&self, offset: u64) {
        if self.clock.started().elapsed() > self.window {
            return;
        }
        if let Ok(mut s) = self.offsets.lock()
            && s.len() < MAX_OFFSETS
        {
            s.insert(offset);
        }
    }

    /// Once the window after the image's first read has passed, the offsets this layer's reads
    /// touched in it, in order (waits for a first read as long as it takes: the layer's unmount
    /// ends the wait).
    pub async fn finished(&self) -> Vec<u64> {
        let first = self.clock.wait().await;
        tokio::time::sleep_until((first + self.window).into()).await;
        self.offsets
            .lock()
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }
}

/// The compressed ranges of the blob that hold the chunks starting at `offsets`, merged where
/// they overlap or touch, cut into parts of at most `max` bytes. Offsets that do not start a
/// chunk of this index (a start set is a hint from another host) are skipped.
pub fn plan(index: &LayerIndex, offsets: &[u64], max: u64) -> Vec<Range<u64>> {
    let mut ranges: Vec<Range<u64>> = offsets
        .iter()
        .filter_map(|&o| {
            let c = index.chunk_of(o);
            (c.start == o && c.end > c.start).then_some(c)
        })
        .filter_map(|c| index.plan(c.start, c.end - c.start).ok())
        .map(|p| p.compressed)
        .filter(|r| r.end > r.start)
        .collect();
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::new();
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    let max = max.max(1);
    merged
        .into_iter()
        .flat_map(|r| {
            (r.start..r.end)
                .step_by(usize::try_from(max).unwrap_or(usize::MAX))
                .map(move |s| s..s.saturating_add(max).min(r.end))
        })
        .collect()
}

/// Agent calls (of at most `AGENT_READ_MAX` bytes each) a prefetch makes at once.
const PREFETCH_PARALLEL: usize = 4;

/// A freshly mounted layer, as its start needs it.
pub(crate) struct Layer {
    pub client: AgentClient<Channel>,
    pub registry: Arc<Registry>,
    pub image: Reference,
    pub url: String,
    pub digest: String,
    pub index: Arc<LayerIndex>,
    pub metrics: Metrics,
    pub options: StartOptions,
    /// The start clock of the layer's image on this host.
    pub clock: Arc<StartClock>,
    /// As the layer's reads ask the agent (no background fetch of the rest).
    pub only_range: bool,
}

impl Layer {
    /// The agent's request about the layer, with the image's registry credentials.
    async fn request(&self) -> proto::agent::LayerIndexRequest {
        let headers = match self
            .registry
            .read_headers(&self.image.registry, &self.image.repository)
            .await
        {
            Ok((h, reused)) => {
                let how = if reused { "reused" } else { "made" };
                self.metrics
                    .read_credentials
                    .with_label_values(&[how])
                    .inc();
                h
            }
            Err(e) => {
                tracing::warn!(layer = %self.digest, error = %e, "no registry credentials for the layer's start");
                Vec::new()
            }
        };
        proto::agent::LayerIndexRequest {
            url: self.url.clone(),
            headers: headers
                .into_iter()
                .map(|(name, value)| proto::agent::Header { name, value })
                .collect(),
            digest: self.digest.clone(),
        }
    }
}

/// What a fresh mount does about the layer's start: fetch the recorded start set in the
/// background, or, when none is recorded, record this host's (the returned record, for the
/// layer's reads to note, and the task that sends it once its window has passed). The task is
/// aborted when the layer is unmounted.
pub(crate) async fn begin(l: Layer) -> (Option<Arc<StartRecord>>, Option<AbortHandle>) {
    if !l.options.prefetch {
        return (None, None);
    }
    let req = l.request().await;
    let offsets = match l.client.clone().start_set(req).await {
        Ok(r) => r.into_inner().offsets,
        Err(s) => {
            tracing::warn!(layer = %l.digest, error = %s.message(), "no start set: neither prefetching nor recording the layer's start");
            return (None, None);
        }
    };
    if offsets.is_empty() {
        let record = Arc::new(StartRecord::new(l.clock.clone(), l.options.window));
        let task = tokio::spawn(send_when_done(l, record.clone()));
        return (Some(record), Some(task.abort_handle()));
    }
    let task = tokio::spawn(prefetch(l, offsets));
    (None, Some(task.abort_handle()))
}

/// Counts in `damselfly_snapshotter_starts_pending{work}` while it lives (an aborted task
/// drops it too).
struct Pending(prometheus::IntGauge);

impl Pending {
    fn new(m: &Metrics, work: &str) -> Self {
        let g = m.starts_pending.with_label_values(&[work]);
        g.inc();
        Self(g)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Records the layer's start at the supernode once its window has passed.
async fn send_when_done(l: Layer, record: Arc<StartRecord>) {
    let _pending = Pending::new(&l.metrics, "record");
    let offsets = record.finished().await;
    if offsets.is_empty() {
        return;
    }
    let chunks = offsets.len();
    let req = proto::agent::RecordStartRequest {
        layer: Some(l.request().await),
        offsets,
    };
    let outcome = match l.client.clone().record_start(req).await {
        Ok(r) if r.get_ref().kept => "kept",
        Ok(_) => "not_kept",
        Err(s) => {
            tracing::warn!(layer = %l.digest, error = %s.message(), "the layer's start was not recorded");
            "failed"
        }
    };
    l.metrics.start_sets.with_label_values(&[outcome]).inc();
    tracing::info!(layer = %l.digest, chunks, outcome, "layer start recorded");
}

/// Has the agent fetch the blob ranges of the layer's start set, a few at a time.
async fn prefetch(l: Layer, offsets: Vec<u64>) {
    let _pending = Pending::new(&l.metrics, "prefetch");
    let started = std::time::Instant::now();
    let ranges = plan(&l.index, &offsets, crate::layerfs::AGENT_READ_MAX);
    let headers = l.request().await.headers;
    let calls = ranges.into_iter().map(|r| {
        let mut client = l.client.clone();
        let req = proto::agent::ReadRangeRequest {
            url: l.url.clone(),
            headers: headers.clone(),
            digest: l.digest.clone(),
            offset: r.start,
            length: r.end - r.start,
            only_range: l.only_range,
        };
        async move { client.read_range(req).await.map(|_| r.end - r.start) }
    });
    let results: Vec<_> = futures::stream::iter(calls)
        .buffer_unordered(PREFETCH_PARALLEL)
        .collect()
        .await;
    let (mut bytes, mut failed) = (0u64, 0usize);
    for r in results {
        match r {
            Ok(n) => bytes += n,
            Err(s) => {
                failed += 1;
                tracing::debug!(layer = %l.digest, error = %s.message(), "prefetch read failed");
            }
        }
    }
    l.metrics.prefetch_bytes.inc_by(bytes);
    if failed == 0 {
        l.metrics.prefetched_layers.inc();
    }
    let ms = started.elapsed().as_millis() as u64;
    tracing::info!(layer = %l.digest, chunks = offsets.len(), bytes, failed, ms, "layer start prefetched");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gzip layer of `files` random files of `size` bytes, and its index (checkpoints every
    /// 256 KiB).
    fn layer(files: usize, size: usize) -> LayerIndex {
        let mut tar = tar::Builder::new(Vec::new());
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..files {
            // Incompressible bytes (xorshift), so that chunks take room in the blob.
            let data: Vec<u8> = (0..size)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let mut h = tar::Header::new_gnu();
            h.set_size(size as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_cksum();
            tar.append_data(&mut h, format!("f{i}"), data.as_slice())
                .expect("append");
        }
        let raw = tar.into_inner().expect("tar");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &raw).expect("gzip");
        let blob = gz.finish().expect("gzip");
        LayerIndex::build_gzip(blob.as_slice(), 256 << 10).expect("index")
    }

    #[test]
    fn plans_cover_the_chunks_merged_and_cut() {
        let index = layer(4, 1 << 20);
        let mut chunks: Vec<Range<u64>> = (0..index.uncompressed_size)
            .step_by(64 << 10)
            .map(|o| index.chunk_of(o))
            .collect();
        chunks.dedup();
        assert!(chunks.len() >= 8, "{chunks:?}");
        // Two neighbouring chunks and a far one: two ranges (neighbours merged).
        let (a, b, far) = (&chunks[1], &chunks[2], &chunks[6]);
        let p = plan(&index, &[far.start, a.start, b.start], u64::MAX);
        assert_eq!(p.len(), 2, "{p:?}");
        let want = |c: &Range<u64>| {
            index
                .plan(c.start, c.end - c.start)
                .expect("plan")
                .compressed
        };
        assert!(p[0].start <= want(a).start && p[0].end >= want(b).end);
        assert_eq!(p[1], want(far));
        // Cut to small parts, the same bytes.
        let cut = plan(&index, &[a.start, b.start], 1000);
        assert!(cut.iter().all(|r| r.end - r.start <= 1000));
        assert_eq!(cut.first().map(|r| r.start), Some(p[0].start));
        assert_eq!(cut.last().map(|r| r.end), Some(p[0].end));
        // Offsets inside a chunk or past the layer are not chunks of it.
        assert!(plan(&index, &[a.start + 1, u64::MAX], u64::MAX).is_empty());
    }

    #[tokio::test]
    async fn a_start_is_what_its_window_read() {
        let clock = Arc::new(StartClock::default());
        let r = StartRecord::new(clock.clone(), Duration::from_millis(200));
        let other = StartRecord::new(clock, Duration::from_millis(200));
        let nothing = tokio::time::timeout(Duration::from_millis(20), r.finished()).await;
        assert!(nothing.is_err(), "nothing read: no start yet");
        r.note(4096);
        r.note(0);
        r.note(4096);
        let (done, ()) = tokio::join!(r.finished(), async {
            r.note(8192);
        });
        assert_eq!(done, vec![0, 4096, 8192]);
        r.note(1 << 20);
        other.note(0);
        assert_eq!(
            r.finished().await,
            vec![0, 4096, 8192],
            "reads after the window are not the start"
        );
        assert_eq!(
            other.finished().await,
            Vec::<u64>::new(),
            "another layer's window began with the image's first read"
        );
    }
}
