//! The piece store: one directory per task version holding a sparse data file, the task's metadata,
//! and an append-only log of verified pieces.
//!
//! Crash safety: a piece's bytes are written at their offset *before* its line is appended to the
//! log, and on reopening every logged piece is hashed again, so a `kill -9` (or a power loss that
//! kept the log line but not the data) at any moment keeps exactly the pieces that are really on
//! disk; no per-piece fsync is needed for that. Delivered output files are fsynced. A per-task `flock` lets several processes (several
//! `dfget`s sharing a store) take turns safely; GC skips locked tasks.
//!
//! A delivered output may be a second name of a task's data file (see `crate::output`), so the
//! store never rewrites a shared file in place: discarding replaces the file, and reopening a
//! shared file that no longer holds every piece (someone changed the output) starts a new one.

mod gc;
mod piece_io;

pub use gc::GcReport;
pub use piece_io::{Begin, CHUNK, PieceReader, PieceWriter};

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use bytes::Bytes;
use fs4::fs_std::FileExt as _;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::piece::PieceMeta;

/// What the store records about a task version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskMeta {
    pub version_id: String,
    pub task_id: String,
    /// The origin URL (`meta.json` keeps it without userinfo and query).
    pub url: String,
    /// -1 until known.
    pub content_length: i64,
    pub piece_size: u32,
    #[serde(default)]
    pub etag: String,
    #[serde(default)]
    pub last_modified: String,
    /// `sha256:<hex>` of the whole content once known.
    #[serde(default)]
    pub digest: Option<String>,
}

/// A directory of task versions.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens (creating) the store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        crate::private::dir(&root).map_err(|e| Error::io("cannot create piece store", &root, e))?;
        let tasks = root.join("tasks");
        std::fs::create_dir_all(&tasks)
            .map_err(|e| Error::io("cannot create piece store", &tasks, e))?;
        Ok(Self { root })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn task_dir(&self, version_id: &str) -> PathBuf {
        self.root.join("tasks").join(version_id)
    }

    /// Opens the task version described by `meta`, creating it or resuming what is on disk. Waits
    /// (polling) while another process holds the task's lock.
    pub async fn open_task(&self, meta: &TaskMeta) -> Result<Arc<TaskStore>> {
        if meta.version_id.len() != 64 || !meta.version_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::invalid("version id", &meta.version_id));
        }
        let dir = self.task_dir(&meta.version_id);
        let meta = meta.clone();
        let mut warned = false;
        loop {
            let (d, m) = (dir.clone(), meta.clone());
            match tokio::task::spawn_blocking(move || TaskStore::try_open(d, m)).await {
                Ok(Ok(Some(t))) => return Ok(Arc::new(t)),
                Ok(Ok(None)) => {
                    if !warned {
                        tracing::info!(version = %meta.version_id, "another process holds this task; waiting");
                        warned = true;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(Error::Download(format!("store task panicked: {e}"))),
            }
        }
    }

    /// Total bytes allocated by task data files.
    pub fn usage(&self) -> u64 {
        gc::list(&self.root.join("tasks"))
            .iter()
            .map(|t| t.bytes)
            .sum()
    }

    /// Removes tasks unused for longer than `max_age`, then the least recently used ones until the
    /// store holds at most `max_bytes`. Tasks open anywhere (locked) are never removed.
    pub fn gc(&self, max_age: std::time::Duration, max_bytes: u64) -> GcReport {
        gc::run(&self.root.join("tasks"), max_age, max_bytes)
    }

    /// Removes one task version if no process holds it.
    pub fn remove(&self, version_id: &str) -> bool {
        gc::remove_if_unlocked(&self.task_dir(version_id))
    }
}

/// One open task version. Cheap to share (`Arc`); all methods are blocking file I/O.
#[derive(Debug)]
pub struct TaskStore {
    dir: PathBuf,
    data: RwLock<File>,
    _lock: File,
    log: Mutex<File>,
    meta: Mutex<TaskMeta>,
    pieces: Mutex<BTreeMap<u32, PieceMeta>>,
    /// Pieces a [`PieceWriter`] is streaming in (one writer per piece).
    writing: Mutex<HashSet<u32>>,
    /// Bumped by [`TaskStore::discard`]: a writer that began before does not record its piece.
    generation: AtomicU64,
    /// Counts changes of the held pieces, for readers waiting on some ([`TaskStore::changes`]).
    changes: tokio::sync::watch::Sender<u64>,
}

impl TaskStore {
    fn try_open(dir: PathBuf, meta: TaskMeta) -> Result<Option<TaskStore>> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io("cannot create task directory", &dir, e))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(crate::private::FILE_MODE)
            .open(&lock_path)
            .map_err(|e| Error::io("cannot open lock", &lock_path, e))?;
        match lock.try_lock_exclusive() {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            Err(e) => return Err(Error::io("cannot lock", &lock_path, e)),
        }
        let meta_path = dir.join("meta.json");
        let stored: Option<TaskMeta> = std::fs::read(&meta_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let fresh = match &stored {
            Some(s) => s.version_id != meta.version_id || s.piece_size != meta.piece_size,
            None => true,
        };
        let data_path = dir.join("data");
        let log_path = dir.join("pieces.log");
        if fresh {
            for p in [&data_path, &log_path] {
                remove_if_present(p)?;
            }
        }
        let mut meta = meta;
        if let Some(s) = stored.filter(|_| !fresh) {
            if meta.content_length < 0 {
                meta.content_length = s.content_length;
            }
            if meta.digest.is_none() {
                meta.digest = s.digest;
            }
        }
        let mut data = open_data(&data_path, -1)?;
        let mut pieces = if fresh {
            BTreeMap::new()
        } else {
            Self::replay(&data, &log_path)
        };
        match data.metadata() {
            Ok(m) if m.nlink() > 1 => {
                let intact = covers(&pieces, meta.content_length)
                    && i64::try_from(m.len()).is_ok_and(|l| l == meta.content_length);
                if !intact {
                    // A delivered output shares this file and was changed since: never write
                    // into it.
                    tracing::warn!(path = %data_path.display(), "a delivered copy of this task was modified; starting the task over");
                    remove_if_present(&data_path)?;
                    data = open_data(&data_path, meta.content_length)?;
                    pieces.clear();
                }
            }
            _ => size_data(&data, &data_path, meta.content_length)?,
        }
        // Rewrite the log with just the pieces that survived verification.
        let mut log = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(crate::private::FILE_MODE)
            .open(&log_path)
            .map_err(|e| Error::io("cannot open piece log", &log_path, e))?;
        for p in pieces.values() {
            let line = serde_json::to_string(p).map_err(|e| Error::Download(e.to_string()))?;
            writeln!(log, "{line}")
                .map_err(|e| Error::io("cannot write piece log", &log_path, e))?;
        }
        log.sync_data()
            .map_err(|e| Error::io("cannot sync piece log", &log_path, e))?;
        let t = TaskStore {
            dir,
            data: RwLock::new(data),
            _lock: lock,
            log: Mutex::new(log),
            meta: Mutex::new(meta),
            pieces: Mutex::new(pieces),
            writing: Mutex::new(HashSet::new()),
            generation: AtomicU64::new(0),
            changes: tokio::sync::watch::Sender::new(0),
        };
        t.save_meta()?;
        Ok(Some(t))
    }

    /// Reads the piece log, keeping the pieces whose bytes on disk still hash right.
    fn replay(data: &File, log_path: &Path) -> BTreeMap<u32, PieceMeta> {
        let mut pieces = BTreeMap::new();
        let Ok(f) = File::open(log_path) else {
            return pieces;
        };
        for line in BufReader::new(f).lines() {
            let Ok(line) = line else { break };
            let Ok(p) = serde_json::from_str::<PieceMeta>(&line) else {
                continue;
            };
            let mut buf = vec![0u8; p.size as usize];
            if data.read_exact_at(&mut buf, p.offset).is_ok() && p.verify(&buf) {
                pieces.insert(p.num, p);
            }
        }
        pieces
    }

    fn save_meta(&self) -> Result<()> {
        let meta = self
            .meta
            .lock()
            .map_err(|_| Error::Download("meta lock poisoned".into()))?
            .clone();
        // On disk the URL goes without userinfo and query (passwords, signed-URL signatures).
        let mut meta = meta;
        meta.url = crate::source::redact(&meta.url);
        let tmp = self.dir.join("meta.json.tmp");
        let body = serde_json::to_vec_pretty(&meta).map_err(|e| Error::Download(e.to_string()))?;
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .mode(crate::private::FILE_MODE)
                .open(&tmp)?;
            f.write_all(&body)
        };
        write().map_err(|e| Error::io("cannot write", &tmp, e))?;
        let dst = self.dir.join("meta.json");
        std::fs::rename(&tmp, &dst).map_err(|e| Error::io("cannot rename", &dst, e))
    }

    /// The task's metadata.
    pub fn meta(&self) -> TaskMeta {
        self.meta
            .lock()
            .map(|m| m.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Records the final length and digest (content whose length was unknown at the start).
    pub fn set_complete(&self, content_length: u64, digest: Option<String>) -> Result<()> {
        {
            let mut m = self
                .meta
                .lock()
                .map_err(|_| Error::Download("meta lock poisoned".into()))?;
            m.content_length = content_length as i64;
            if digest.is_some() {
                m.digest = digest;
            }
        }
        self.data()
            .set_len(content_length)
            .map_err(|e| Error::io("cannot size data file", self.data_path(), e))?;
        self.save_meta()
    }

    fn data(&self) -> RwLockReadGuard<'_, File> {
        self.data.read().unwrap_or_else(|p| p.into_inner())
    }

    /// A handle of the data file (for delivering it as a second name of the same file).
    pub fn data_file(&self) -> std::io::Result<File> {
        self.data().try_clone()
    }

    /// Path of the sparse data file.
    pub fn data_path(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Numbers of the verified pieces held.
    pub fn have(&self) -> Vec<u32> {
        self.pieces
            .lock()
            .map(|p| p.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Metadata of a held piece.
    pub fn piece(&self, num: u32) -> Option<PieceMeta> {
        self.pieces.lock().ok().and_then(|p| p.get(&num).cloned())
    }

    /// Number of verified pieces held and their total size.
    pub fn held(&self) -> (usize, u64) {
        self.pieces
            .lock()
            .map(|p| (p.len(), p.values().map(|m| u64::from(m.size)).sum()))
            .unwrap_or((0, 0))
    }

    /// Drops every piece and truncates the data: content that turned out wrong is not kept.
    pub fn discard(&self) -> Result<()> {
        if let Ok(mut p) = self.pieces.lock() {
            p.clear();
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
        self.changes.send_modify(|n| *n += 1);
        // A new file, not a truncated one: a delivered output may share the old one.
        let path = self.data_path();
        remove_if_present(&path)?;
        let fresh = open_data(&path, -1)?;
        *self.data.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        let log = self
            .log
            .lock()
            .map_err(|_| Error::Download("log lock poisoned".into()))?;
        log.set_len(0)
            .map_err(|e| Error::io("cannot truncate piece log in", &self.dir, e))
    }

    /// Length of the prefix of the content covered by held pieces.
    pub fn contiguous_bytes(&self) -> u64 {
        let Ok(p) = self.pieces.lock() else { return 0 };
        let mut end = 0u64;
        for (i, (num, m)) in p.iter().enumerate() {
            if *num as usize != i || m.offset != end {
                break;
            }
            end += u64::from(m.size);
        }
        end
    }

    /// Forgets a held piece (its metadata disagrees with the supernode's).
    pub fn forget(&self, num: u32) {
        if let Ok(mut p) = self.pieces.lock() {
            p.remove(&num);
        }
    }

    /// Writes a piece whose bytes the caller has verified against `meta` (downloads check the digest
    /// they were given; seeds compute it from these very bytes), then records it. Not synced: the
    /// log is replayed with verification on reopening.
    pub fn write_piece(&self, meta: &PieceMeta, data: &[u8]) -> Result<()> {
        if data.len() != meta.size as usize {
            return Err(Error::PieceSize {
                piece: meta.num,
                got: data.len() as u64,
                size: meta.size,
            });
        }
        if self.is_writing(meta.num) {
            return Err(Error::PieceBusy { piece: meta.num });
        }
        let path = self.data_path();
        self.data()
            .write_all_at(data, meta.offset)
            .map_err(|e| Error::io("cannot write piece to", &path, e))?;
        self.record(meta)
    }

    fn is_writing(&self, num: u32) -> bool {
        self.writing
            .lock()
            .map(|w| w.contains(&num))
            .unwrap_or(true)
    }

    /// Records a piece whose bytes are on disk: its log line, then the piece as held.
    fn record(&self, meta: &PieceMeta) -> Result<()> {
        let line = serde_json::to_string(meta).map_err(|e| Error::Download(e.to_string()))?;
        {
            let mut log = self
                .log
                .lock()
                .map_err(|_| Error::Download("log lock poisoned".into()))?;
            writeln!(log, "{line}")
                .map_err(|e| Error::io("cannot append to piece log in", &self.dir, e))?;
        }
        if let Ok(mut p) = self.pieces.lock() {
            p.insert(meta.num, meta.clone());
        }
        self.changes.send_modify(|n| *n += 1);
        Ok(())
    }

    /// A receiver that sees a change whenever a piece lands or the held pieces are dropped: a
    /// reader subscribes, checks what it needs, and waits for the next change.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Reads a held piece, re-verifying it (a store on a bad disk never serves wrong bytes).
    pub fn read_piece(&self, num: u32) -> Result<Option<Bytes>> {
        let Some(meta) = self.piece(num) else {
            return Ok(None);
        };
        let mut buf = vec![0u8; meta.size as usize];
        let path = self.data_path();
        self.data()
            .read_exact_at(&mut buf, meta.offset)
            .map_err(|e| Error::io("cannot read piece from", &path, e))?;
        if !meta.verify(&buf) {
            tracing::error!(piece = num, path = %path.display(), "stored piece fails its digest; dropping it");
            self.forget(num);
            return Ok(None);
        }
        Ok(Some(Bytes::from(buf)))
    }

    /// Reads `len` bytes at `offset` of the data file (callers read only verified ranges).
    pub fn read_range(&self, offset: u64, len: u64) -> Result<Bytes> {
        let mut buf = vec![0u8; len as usize];
        self.data()
            .read_exact_at(&mut buf, offset)
            .map_err(|e| Error::io("cannot read", self.data_path(), e))?;
        Ok(Bytes::from(buf))
    }

    /// Bytes of disk the data file occupies.
    pub fn allocated(&self) -> u64 {
        self.data()
            .metadata()
            .map(|m| m.blocks() * 512)
            .unwrap_or(0)
    }

    /// Marks the task as used now (GC orders by last use).
    pub fn touch(&self) {
        let _ = File::options()
            .write(true)
            .open(self.dir.join("lock"))
            .and_then(|f| f.set_modified(std::time::SystemTime::now()));
    }
}

/// Opens (creating) a data file, sized to `len` when known.
fn open_data(path: &Path, len: i64) -> Result<File> {
    let data = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(crate::private::FILE_MODE)
        .open(path)
        .map_err(|e| Error::io("cannot open data file", path, e))?;
    size_data(&data, path, len)?;
    Ok(data)
}

/// Sizes a data file to `len` when known.
fn size_data(data: &File, path: &Path, len: i64) -> Result<()> {
    match u64::try_from(len) {
        Ok(len) => data
            .set_len(len)
            .map_err(|e| Error::io("cannot size data file", path, e)),
        Err(_) => Ok(()),
    }
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("cannot remove", path, e)),
    }
}

/// True when `pieces` cover `len` bytes from offset 0 without a gap.
fn covers(pieces: &BTreeMap<u32, PieceMeta>, len: i64) -> bool {
    let mut end = 0u64;
    for m in pieces.values() {
        if m.offset != end {
            return false;
        }
        end += u64::from(m.size);
    }
    u64::try_from(len).is_ok_and(|len| end == len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::piece::PieceCutter;

    fn meta(len: i64) -> TaskMeta {
        TaskMeta {
            version_id: "a".repeat(64),
            task_id: "b".repeat(64),
            url: "http://h/x".into(),
            content_length: len,
            piece_size: 1024,
            etag: String::new(),
            last_modified: String::new(),
            digest: None,
        }
    }

    #[tokio::test]
    async fn resumes_verified_pieces_and_drops_corrupted_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let data: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        let mut cutter = PieceCutter::new(1024);
        let mut pieces = cutter.push(&data);
        pieces.extend(cutter.finish().0);
        {
            let t = store.open_task(&meta(3000)).await.expect("open");
            for (m, b) in &pieces {
                t.write_piece(m, b).expect("write");
            }
            assert_eq!(t.have(), vec![0, 1, 2]);
            // A second opener waits while the first holds the lock.
            let pending = tokio::time::timeout(
                std::time::Duration::from_millis(300),
                store.open_task(&meta(3000)),
            )
            .await;
            assert!(pending.is_err(), "second open must wait for the lock");
        }
        // Corrupt piece 1 on disk behind the store's back.
        let path = dir.path().join("tasks").join("a".repeat(64)).join("data");
        let f = OpenOptions::new().write(true).open(&path).expect("data");
        f.write_all_at(b"XXXX", 1500).expect("corrupt");
        let t = store.open_task(&meta(3000)).await.expect("reopen");
        assert_eq!(t.have(), vec![0, 2]);
        assert_eq!(
            t.read_piece(0).expect("read").as_deref(),
            Some(&data[..1024])
        );
        assert!(t.read_piece(1).expect("read").is_none());
    }

    #[tokio::test]
    async fn a_new_version_starts_from_scratch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let data = vec![1u8; 1024];
        let mut cutter = PieceCutter::new(1024);
        let (m, b) = cutter.push(&data).remove(0);
        {
            let t = store.open_task(&meta(1024)).await.expect("open");
            t.write_piece(&m, &b).expect("write");
        }
        let mut other = meta(1024);
        other.piece_size = 512;
        let t = store.open_task(&other).await.expect("open");
        assert!(t.have().is_empty());
    }
}
