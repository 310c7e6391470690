//! Uncompressed chunks of lazy layers (see `LayerIndex::chunk_of`), so that a chunk is fetched and
//! inflated once, not once per FUSE read: an in-memory LRU shared by every layer of the process
//! (bounded in bytes), in front of a per-layer file on disk that keeps every chunk inflated so
//! far at its offset in the uncompressed stream (sparse; dropped with the snapshot).

use std::collections::HashSet;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use lru::LruCache;

/// Key: (layer, chunk start in the uncompressed stream).
type Key = (Arc<str>, u64);

struct Lru {
    map: LruCache<Key, Arc<Vec<u8>>>,
    bytes: usize,
}

/// Recently inflated chunks of all layers, at most `budget` bytes.
pub struct ChunkCache {
    budget: usize,
    inner: Mutex<Lru>,
}

impl ChunkCache {
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            inner: Mutex::new(Lru {
                map: LruCache::unbounded(),
                bytes: 0,
            }),
        }
    }

    pub fn get(&self, layer: &Arc<str>, start: u64) -> Option<Arc<Vec<u8>>> {
        let mut l = self.inner.lock().ok()?;
        l.map.get(&(layer.clone(), start)).cloned()
    }

    pub fn put(&self, layer: &Arc<str>, start: u64, data: Arc<Vec<u8>>) {
        if data.len() > self.budget {
            return;
        }
        let Ok(mut l) = self.inner.lock() else {
            return;
        };
        l.bytes += data.len();
        if let Some(old) = l.map.put((layer.clone(), start), data) {
            l.bytes -= old.len();
        }
        while l.bytes > self.budget {
            match l.map.pop_lru() {
                Some((_, evicted)) => l.bytes -= evicted.len(),
                None => break,
            }
        }
    }
}

/// A layer's inflated chunks on disk, at their offsets in the uncompressed stream.
pub struct DiskChunks {
    file: std::fs::File,
    /// Where the file is (its filesystem's free space is checked before a whole layer).
    path: std::path::PathBuf,
    present: Mutex<HashSet<u64>>,
    /// The whole uncompressed layer is in the file.
    whole: std::sync::atomic::AtomicBool,
}

impl DiskChunks {
    /// Starts an empty chunk file at `path` (what an earlier run left is not trusted).
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(fetcher::private::FILE_MODE)
            .open(path)?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            present: Mutex::new(HashSet::new()),
            whole: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn has(&self, start: u64) -> bool {
        self.has_whole() || self.present.lock().is_ok_and(|p| p.contains(&start))
    }

    /// Whether the whole layer has been written ([`mark_whole`](Self::mark_whole)).
    pub fn has_whole(&self) -> bool {
        self.whole.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Records that the whole uncompressed layer is in the file.
    pub fn mark_whole(&self) {
        self.whole.store(true, std::sync::atomic::Ordering::Release);
    }

    /// The chunk file (for reads at explicit offsets only: its file position is the writer's).
    pub fn file(&self) -> &std::fs::File {
        &self.file
    }

    /// The directory of the chunk file.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// Bytes `[at, at + len)` of a chunk that [`has`](Self::has) been written.
    pub fn read(&self, at: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, at)?;
        Ok(buf)
    }

    /// A handle to write a chunk through (then [`mark`](Self::mark) it).
    pub fn writer(&self) -> std::io::Result<std::fs::File> {
        self.file.try_clone()
    }

    /// Records that the chunk at `start` is on disk.
    pub fn mark(&self, start: u64) {
        if let Ok(mut p) = self.present.lock() {
            p.insert(start);
        }
    }

    /// Keeps the chunk that starts at `start`; a failure only costs a later inflate.
    pub fn write(&self, start: u64, data: &[u8]) {
        match self.file.write_all_at(data, start) {
            Ok(()) => {
                if let Ok(mut p) = self.present.lock() {
                    p.insert(start);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot keep an inflated chunk on disk"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lru_stays_within_its_budget() {
        let c = ChunkCache::new(10);
        let l: Arc<str> = Arc::from("layer");
        c.put(&l, 0, Arc::new(vec![0; 4]));
        c.put(&l, 4, Arc::new(vec![1; 4]));
        assert!(c.get(&l, 0).is_some(), "touch 0: 4 is now the oldest");
        c.put(&l, 8, Arc::new(vec![2; 4]));
        assert!(c.get(&l, 4).is_none(), "evicted");
        assert!(c.get(&l, 0).is_some() && c.get(&l, 8).is_some());
        c.put(&l, 12, Arc::new(vec![3; 11]));
        assert!(c.get(&l, 12).is_none(), "larger than the budget: not kept");
    }

    #[test]
    fn disk_chunks_read_back_what_was_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = DiskChunks::create(&dir.path().join("chunks")).expect("create");
        assert!(!d.has(1 << 20));
        d.write(1 << 20, b"hello");
        assert!(d.has(1 << 20));
        assert_eq!(d.read((1 << 20) + 1, 3).expect("read"), b"ell");
    }
}
