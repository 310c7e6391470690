//! The seed cache's size bound: least recently used finished versions are evicted from disk (and
//! memory) when the store grows past `--cache-size`. Versions with connected peers or still seeding
//! are kept.

use std::sync::Arc;
use std::time::Duration;

use fetcher::piece_store::Store;

use crate::metrics::Metrics;
use crate::task::{Status, Tasks};

/// Evicts until the store is under `max_bytes`; returns the store's usage afterwards.
pub fn evict(store: &Store, tasks: &Tasks, max_bytes: u64, metrics: &Metrics) -> u64 {
    let mut usage = store.usage();
    if usage <= max_bytes {
        return usage;
    }
    let mut candidates: Vec<_> = tasks
        .versions()
        .into_iter()
        .filter_map(|(id, v)| {
            let st = v.lock();
            let idle = st.peers.is_empty() && !matches!(st.status, Status::Seeding);
            idle.then(|| (st.last_access, id, v.clone()))
        })
        .collect();
    candidates.sort_by_key(|(t, _, _)| *t);
    for (_, id, v) in candidates {
        if usage <= max_bytes {
            break;
        }
        let bytes = v.store.get().map(|s| s.allocated()).unwrap_or(0);
        tasks.forget(&id, &v.task_id);
        // Dropping the last handle releases the store's lock so the directory can go.
        drop(v);
        if store.remove(&id) {
            usage = usage.saturating_sub(bytes);
            metrics.evictions.inc();
            tracing::info!(version = %&id[..16], bytes, "evicted from the seed cache");
        }
    }
    metrics.tasks.set(tasks.len() as i64);
    usage
}

/// Runs [`evict`] every `every` until shutdown.
pub async fn run(
    store: Store,
    tasks: Arc<Tasks>,
    max_bytes: u64,
    metrics: Metrics,
    every: Duration,
    shutdown: fetcher::Shutdown,
) {
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let (s, t, m) = (store.clone(), tasks.clone(), metrics.clone());
        let _ = tokio::task::spawn_blocking(move || evict(&s, &t, max_bytes, &m)).await;
    }
}
