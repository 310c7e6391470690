//! Pieces streamed into and out of a task's data file a chunk at a time, hashed on the way, so
//! that neither a download nor an upload holds a whole piece in memory.
//!
//! Writing: a [`PieceWriter`] claims the piece (one writer per piece, never one for a piece
//! already held), writes each chunk at its place as it arrives and records the piece only once
//! the whole hashed to its digest. Until then nobody reads that range: readers (uploads, lazy
//! reads, the output) only ever read held pieces. The one exception is a data file that is also
//! a delivered output (see `crate::output`): there nothing unverified may land, so the writer
//! keeps the piece in memory and writes it once verified.
//!
//! Reading: a [`PieceReader`] reads a held piece back and hashes it as it goes, handing out the
//! last chunk only once the whole matched (a store on a bad disk never serves a whole wrong
//! piece; the piece is dropped instead).

use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::TaskStore;
use crate::error::{Error, Result};
use crate::output::OutputWriter;
use crate::piece::PieceMeta;

/// Bytes moved per read or write of a streamed piece.
pub const CHUNK: usize = 256 * 1024;

/// What [`TaskStore::begin_piece`] found.
#[derive(Debug)]
pub enum Begin {
    /// The piece is held already: nothing to write.
    Held,
    /// The piece is claimed for this writer.
    Writing(Box<PieceWriter>),
}

/// A piece being streamed into the store (and into a destination of its own, if any).
#[derive(Debug)]
pub struct PieceWriter {
    store: Arc<TaskStore>,
    meta: PieceMeta,
    generation: u64,
    written: u64,
    hasher: Sha256,
    output: Option<OutputWriter>,
    /// The data file is shared with a delivered output: the bytes wait here until verified.
    staged: Option<Vec<u8>>,
}

impl TaskStore {
    /// Claims piece `meta` for writing, with `output` (a destination file of its own) receiving
    /// the same bytes at the same offsets.
    pub fn begin_piece(
        self: &Arc<Self>,
        meta: &PieceMeta,
        output: Option<OutputWriter>,
    ) -> Result<Begin> {
        {
            let pieces = self
                .pieces
                .lock()
                .map_err(|_| Error::Download("piece map lock poisoned".into()))?;
            if pieces.contains_key(&meta.num) {
                return Ok(Begin::Held);
            }
            let mut writing = self
                .writing
                .lock()
                .map_err(|_| Error::Download("writer set lock poisoned".into()))?;
            if !writing.insert(meta.num) {
                return Err(Error::PieceBusy { piece: meta.num });
            }
        }
        let shared = self.data().metadata().map_or(true, |m| m.nlink() > 1);
        Ok(Begin::Writing(Box::new(PieceWriter {
            store: self.clone(),
            meta: meta.clone(),
            generation: self.generation.load(Ordering::SeqCst),
            written: 0,
            hasher: Sha256::new(),
            output,
            staged: shared.then(Vec::new),
        })))
    }

    /// A reader of held piece `num`; `None` when the piece is not held.
    pub fn piece_reader(self: &Arc<Self>, num: u32) -> Option<PieceReader> {
        let meta = self.piece(num)?;
        Some(PieceReader {
            store: self.clone(),
            meta,
            read: 0,
            hasher: Sha256::new(),
        })
    }
}

impl PieceWriter {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Writes the next bytes of the piece (blocking file I/O). More bytes than the piece has are
    /// refused, and nothing of them is written.
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        let got = self.written + data.len() as u64;
        if got > u64::from(self.meta.size) {
            return Err(Error::PieceSize {
                piece: self.meta.num,
                got,
                size: self.meta.size,
            });
        }
        self.hasher.update(data);
        match &mut self.staged {
            Some(buf) => buf.extend_from_slice(data),
            None => put(
                &self.store,
                self.output.as_ref(),
                self.meta.offset + self.written,
                data,
            )?,
        }
        self.written = got;
        Ok(())
    }

    /// Ends the piece: `true` when every byte arrived and the whole matched its digest, and the
    /// piece is now held; `false` when it did not (nothing is recorded, and the range is written
    /// again by the piece's next writer).
    pub fn finish(mut self) -> Result<bool> {
        if self.written != u64::from(self.meta.size) {
            return Ok(false);
        }
        let digest = hex::encode(std::mem::take(&mut self.hasher).finalize());
        if digest != self.meta.sha256 {
            return Ok(false);
        }
        if let Some(buf) = self.staged.take() {
            put(&self.store, self.output.as_ref(), self.meta.offset, &buf)?;
        }
        if self.store.generation.load(Ordering::SeqCst) != self.generation {
            return Err(Error::PieceStale {
                piece: self.meta.num,
            });
        }
        self.store.record(&self.meta)?;
        Ok(true)
    }
}

/// Writes `data` at `offset` of the destination (when it has a file of its own), then the store.
fn put(store: &TaskStore, output: Option<&OutputWriter>, offset: u64, data: &[u8]) -> Result<()> {
    if let Some(out) = output {
        out.write_at(offset, data)
            .map_err(|e| Error::io("cannot write output for", store.data_path(), e))?;
    }
    store
        .data()
        .write_all_at(data, offset)
        .map_err(|e| Error::io("cannot write piece to", store.data_path(), e))
}

impl Drop for PieceWriter {
    fn drop(&mut self) {
        if let Ok(mut w) = self.store.writing.lock() {
            w.remove(&self.meta.num);
        }
    }
}

/// A held piece being read back, chunk by chunk.
#[derive(Debug)]
pub struct PieceReader {
    store: Arc<TaskStore>,
    meta: PieceMeta,
    read: u64,
    hasher: Sha256,
}

impl PieceReader {
    /// The piece's length in bytes.
    pub fn len(&self) -> u64 {
        u64::from(self.meta.size)
    }

    /// Whether the piece is empty (never: pieces have bytes).
    pub fn is_empty(&self) -> bool {
        self.meta.size == 0
    }

    /// The next chunk of at most [`CHUNK`] bytes, `None` after the last (blocking file I/O). The
    /// last chunk comes only once the whole piece matched its digest; when it does not, the store
    /// forgets the piece and this is [`Error::CorruptPiece`].
    pub fn next_chunk(&mut self) -> Result<Option<Bytes>> {
        let size = u64::from(self.meta.size);
        if self.read >= size {
            return Ok(None);
        }
        let n = (size - self.read).min(CHUNK as u64) as usize;
        let mut buf = vec![0u8; n];
        let path = self.store.data_path();
        self.store
            .data()
            .read_exact_at(&mut buf, self.meta.offset + self.read)
            .map_err(|e| Error::io("cannot read piece from", &path, e))?;
        self.hasher.update(&buf);
        self.read += n as u64;
        if self.read == size {
            let digest = hex::encode(std::mem::take(&mut self.hasher).finalize());
            if digest != self.meta.sha256 {
                tracing::error!(piece = self.meta.num, path = %path.display(), "stored piece fails its digest; dropping it");
                self.store.forget(self.meta.num);
                return Err(Error::CorruptPiece {
                    piece: self.meta.num,
                    path,
                });
            }
        }
        Ok(Some(Bytes::from(buf)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::piece::PieceCutter;
    use crate::piece_store::{Store, TaskMeta};

    /// Two pieces of 600 KiB (each more than two chunks), and a store holding none of them.
    async fn setup(dir: &std::path::Path) -> (Arc<TaskStore>, Vec<(PieceMeta, Bytes)>) {
        let size = 600 * 1024;
        let data: Vec<u8> = (0..2 * size).map(|i| (i * 13 % 251) as u8).collect();
        let mut cutter = PieceCutter::new(size as u32);
        let pieces = cutter.push(&data);
        let meta = TaskMeta {
            version_id: "c".repeat(64),
            task_id: "d".repeat(64),
            url: "http://h/x".into(),
            content_length: data.len() as i64,
            piece_size: size as u32,
            etag: String::new(),
            last_modified: String::new(),
            digest: None,
        };
        let store = Store::open(dir).expect("store");
        (store.open_task(&meta).await.expect("open"), pieces)
    }

    fn writer(t: &Arc<TaskStore>, m: &PieceMeta) -> PieceWriter {
        match t.begin_piece(m, None).expect("begin") {
            Begin::Writing(w) => *w,
            Begin::Held => panic!("piece {} is held", m.num),
        }
    }

    /// Streams `bytes` into a new writer of `m` in uneven chunks; the writer's verdict.
    fn stream(t: &Arc<TaskStore>, m: &PieceMeta, bytes: &[u8]) -> bool {
        let mut w = writer(t, m);
        for c in bytes.chunks(100_000) {
            w.write(c).expect("write");
        }
        w.finish().expect("finish")
    }

    fn read_all(t: &Arc<TaskStore>, num: u32) -> (Vec<Bytes>, Option<Error>) {
        let mut r = t.piece_reader(num).expect("held");
        let mut chunks = Vec::new();
        loop {
            match r.next_chunk() {
                Ok(Some(c)) => chunks.push(c),
                Ok(None) => return (chunks, None),
                Err(e) => return (chunks, Some(e)),
            }
        }
    }

    #[tokio::test]
    async fn a_streamed_piece_is_held_only_once_it_verified() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (t, pieces) = setup(dir.path()).await;
        let (m, good) = &pieces[0];
        let mut bad = good.to_vec();
        bad[300_000] ^= 1;
        assert!(!stream(&t, m, &bad), "a wrong byte fails the piece");
        assert!(t.piece(0).is_none(), "a failed piece is not held");
        assert!(
            !stream(&t, m, &good[..good.len() - 1]),
            "a short piece fails"
        );
        assert!(t.piece(0).is_none());
        // The claim went with the failed writers: the next one writes over their bytes.
        assert!(stream(&t, m, good));
        assert_eq!(t.have(), vec![0]);
        assert_eq!(t.read_piece(0).expect("read").as_deref(), Some(&good[..]));
        assert!(matches!(t.begin_piece(m, None), Ok(Begin::Held)));
    }

    #[tokio::test]
    async fn one_writer_per_piece_and_never_more_bytes_than_it_has() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (t, pieces) = setup(dir.path()).await;
        let (m, good) = &pieces[1];
        let mut w = writer(&t, m);
        assert!(matches!(
            t.begin_piece(m, None),
            Err(Error::PieceBusy { piece: 1 })
        ));
        assert!(matches!(
            t.write_piece(m, good),
            Err(Error::PieceBusy { piece: 1 })
        ));
        w.write(good).expect("whole piece");
        let over = w.write(b"x");
        assert!(
            matches!(over, Err(Error::PieceSize { piece: 1, got, .. }) if got == good.len() as u64 + 1)
        );
        assert_eq!(
            w.written(),
            good.len() as u64,
            "the extra byte was not taken"
        );
        assert!(w.finish().expect("finish"));
        assert_eq!(t.have(), vec![1]);
    }

    #[tokio::test]
    async fn a_writer_that_began_before_a_discard_records_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (t, pieces) = setup(dir.path()).await;
        let (m, good) = &pieces[0];
        let mut w = writer(&t, m);
        w.write(good).expect("write");
        t.discard().expect("discard");
        assert!(matches!(w.finish(), Err(Error::PieceStale { piece: 0 })));
        assert!(t.have().is_empty());
    }

    #[tokio::test]
    async fn a_shared_data_file_gets_only_verified_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (t, pieces) = setup(dir.path()).await;
        // A delivered output as a second name of the data file.
        let delivered = dir.path().join("delivered");
        std::fs::hard_link(t.data_path(), &delivered).expect("link");
        let (m, good) = &pieces[0];
        let mut bad = good.to_vec();
        bad[10] ^= 1;
        let mut w = writer(&t, m);
        w.write(&bad).expect("write");
        let on_disk = std::fs::read(&delivered).expect("read");
        assert!(
            on_disk[..good.len()].iter().all(|b| *b == 0),
            "nothing reaches a shared file before verification"
        );
        assert!(!w.finish().expect("finish"));
        assert!(
            std::fs::read(&delivered).expect("read")[..good.len()]
                .iter()
                .all(|b| *b == 0)
        );
        assert!(stream(&t, m, good));
        assert_eq!(
            &std::fs::read(&delivered).expect("read")[..good.len()],
            &good[..]
        );
    }

    #[tokio::test]
    async fn a_reader_holds_back_the_last_chunk_of_a_corrupt_piece() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (t, pieces) = setup(dir.path()).await;
        for (m, b) in &pieces {
            t.write_piece(m, b).expect("write");
        }
        let (chunks, err) = read_all(&t, 0);
        assert!(err.is_none());
        assert_eq!(chunks.len(), 3, "600 KiB in chunks of 256 KiB");
        assert_eq!(chunks.concat(), pieces[0].1.to_vec());
        // Corrupt piece 1 on disk behind the store's back.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(t.data_path())
            .expect("data");
        f.write_all_at(b"X", pieces[1].0.offset + 5)
            .expect("corrupt");
        let (chunks, err) = read_all(&t, 1);
        assert!(matches!(err, Some(Error::CorruptPiece { piece: 1, .. })));
        assert_eq!(chunks.len(), 2, "the last chunk never went out");
        assert!(t.piece(1).is_none(), "the store dropped the corrupt piece");
    }
}
