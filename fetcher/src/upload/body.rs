//! A piece on its way out: read from the piece store a chunk at a time and re-verified as it goes
//! ([`crate::piece_store::PieceReader`]), or bytes already in memory (tests, a misbehaving peer).

use bytes::Bytes;

use crate::error::Result;
use crate::piece_store::{CHUNK, PieceReader};

/// The bytes of one piece for the upload server.
pub struct PieceBody {
    len: u64,
    src: Src,
}

enum Src {
    Store(PieceReader),
    Memory(Bytes),
}

impl PieceBody {
    /// A held piece read from the store.
    pub fn from_store(reader: PieceReader) -> Self {
        Self {
            len: reader.len(),
            src: Src::Store(reader),
        }
    }

    /// Bytes in memory, served as they are.
    pub fn from_bytes(bytes: Bytes) -> Self {
        Self {
            len: bytes.len() as u64,
            src: Src::Memory(bytes),
        }
    }

    /// The piece's length (the response's `Content-Length`).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the piece has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The next chunk, `None` after the last (blocking: it may read the disk). An error ends the
    /// piece (for a stored piece that failed its digest, before its last chunk went out).
    pub fn next_chunk(&mut self) -> Result<Option<Bytes>> {
        match &mut self.src {
            Src::Store(r) => r.next_chunk(),
            Src::Memory(b) if b.is_empty() => Ok(None),
            Src::Memory(b) => Ok(Some(b.split_to(CHUNK.min(b.len())))),
        }
    }

    /// All of the remaining bytes (blocking), for callers that change them.
    pub fn into_bytes(mut self) -> Result<Bytes> {
        let mut all = Vec::with_capacity(usize::try_from(self.len).unwrap_or(0));
        while let Some(c) = self.next_chunk()? {
            all.extend_from_slice(&c);
        }
        Ok(Bytes::from(all))
    }
}
