//! Garbage collection of the piece store: by age, then by total size, least recently used first.

use std::fs::OpenOptions;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use fs4::fs_std::FileExt as _;

/// One task directory as GC sees it.
pub(crate) struct Entry {
    pub dir: PathBuf,
    pub bytes: u64,
    pub last_used: SystemTime,
}

/// What a GC run removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GcReport {
    pub removed_tasks: usize,
    pub freed_bytes: u64,
}

pub(crate) fn list(tasks: &Path) -> Vec<Entry> {
    let Ok(rd) = std::fs::read_dir(tasks) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| {
            let dir = e.path();
            let bytes = std::fs::metadata(dir.join("data"))
                .map(|m| m.blocks() * 512)
                .unwrap_or(0);
            let last_used = std::fs::metadata(dir.join("lock"))
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            Entry {
                dir,
                bytes,
                last_used,
            }
        })
        .collect()
}

/// Removes `dir` unless some process holds its lock. True when removed.
pub(crate) fn remove_if_unlocked(dir: &Path) -> bool {
    let lock_path = dir.join("lock");
    let Ok(lock) = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
    else {
        return false;
    };
    if !matches!(lock.try_lock_exclusive(), Ok(true)) {
        return false;
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "GC could not remove task");
            false
        }
    }
}

pub(crate) fn run(tasks: &Path, max_age: Duration, max_bytes: u64) -> GcReport {
    let mut entries = list(tasks);
    entries.sort_by_key(|e| e.last_used);
    let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
    let now = SystemTime::now();
    let mut report = GcReport::default();
    for e in entries {
        let too_old = now
            .duration_since(e.last_used)
            .map(|a| a > max_age)
            .unwrap_or(false);
        if (too_old || total > max_bytes) && remove_if_unlocked(&e.dir) {
            total = total.saturating_sub(e.bytes);
            report.removed_tasks += 1;
            report.freed_bytes += e.bytes;
            tracing::info!(dir = %e.dir.display(), bytes = e.bytes, too_old, "GC removed task");
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::piece_store::{Store, TaskMeta};

    #[tokio::test]
    async fn gc_evicts_lru_until_under_budget_and_spares_open_tasks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let mk = |c: char| TaskMeta {
            version_id: c.to_string().repeat(64),
            task_id: "f".repeat(64),
            url: "http://h/x".into(),
            content_length: -1,
            piece_size: 1024,
            etag: String::new(),
            last_modified: String::new(),
            digest: None,
        };
        for c in ['a', 'b', 'c'] {
            let t = store.open_task(&mk(c)).await.expect("open");
            std::fs::write(t.data_path(), vec![7u8; 64 * 1024]).expect("fill");
            std::thread::sleep(Duration::from_millis(20));
            t.touch();
        }
        let held = store.open_task(&mk('a')).await.expect("open");
        let report = store.gc(Duration::from_secs(3600), 64 * 1024);
        // 'a' is the least recently used but open, so it stays; 'b' and 'c' go to reach the budget.
        assert_eq!(report.removed_tasks, 2, "{report:?}");
        assert!(dir.path().join("tasks").join("a".repeat(64)).exists());
        drop(held);
        let report = store.gc(Duration::ZERO, u64::MAX);
        assert_eq!(report.removed_tasks, 1);
    }
}
