//! The layer index that makes unmodified OCI layers readable at random: built once while a layer
//! streams (by the supernode), then used by dfsnapshotter to turn a file read into the compressed
//! byte range to fetch (as pieces) and the inflate work to do.
//!
//! - [`toc`]: the tar table of contents (entries, metadata, uncompressed data offsets).
//! - [`gzip`]: inflate checkpoints (bit offset + 32 KiB window every `span` bytes) and resuming
//!   from one.
//! - [`zstd`]: zstd layers, indexed (TOC) but read whole.

pub mod error;
pub mod gzip;
pub mod tar_guard;
pub mod toc;
pub mod zstd;

use std::io::Read;

use serde::{Deserialize, Serialize};

pub use error::{Error, Result};
pub use gzip::Checkpoint;
pub use toc::{Entry, Kind, Toc};

/// How the layer blob is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    /// A plain tar: uncompressed offsets are blob offsets.
    None,
    Gzip,
    /// zstd: TOC only; readers decompress the whole blob ([`LayerIndex::decompress_all`]).
    Zstd,
}

/// Default distance between gzip checkpoints: a read inflates at most this much extra.
pub const DEFAULT_SPAN: u64 = 2 << 20;
/// Compressed bytes fetched past a range's last deflate block (the inflater's bit lookahead).
const LOOKAHEAD: u64 = 64;

/// Chunk size of uncompressed (tar) layers for [`LayerIndex::chunk_of`].
pub const RAW_CHUNK: u64 = 1 << 20;

/// What a lazy reader needs of a layer blob: its table of contents and, for gzip, the inflate
/// checkpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerIndex {
    pub compression: Compression,
    pub toc: Toc,
    /// Gzip only: sorted by `out`, the first at offset 0.
    pub checkpoints: Vec<Checkpoint>,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
}

/// What to fetch and inflate for an uncompressed range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadPlan {
    /// Checkpoint to resume from (gzip), by index.
    pub checkpoint: Option<usize>,
    /// Compressed bytes `[start, end)` of the blob that hold the range.
    pub compressed: std::ops::Range<u64>,
}

/// Serialized indexes start with this, then a format version byte.
const MAGIC: &[u8; 4] = b"DFIX";
const FORMAT: u8 = 1;

impl LayerIndex {
    /// The index as bytes (magic, format version, postcard).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = MAGIC.to_vec();
        out.push(FORMAT);
        postcard::to_io(self, &mut out)
            .map_err(|e| Error::Invalid(format!("cannot serialize the index: {e}")))?;
        Ok(out)
    }

    /// Parses [`LayerIndex::to_bytes`] output; anything else is an error naming what is wrong.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let body = bytes
            .strip_prefix(MAGIC.as_slice())
            .ok_or_else(|| Error::Invalid("not a layer index (bad magic)".into()))?;
        match body.split_first() {
            Some((&FORMAT, rest)) => {
                let index: Self = postcard::from_bytes(rest)
                    .map_err(|e| Error::Invalid(format!("corrupt layer index: {e}")))?;
                index.check()?;
                Ok(index)
            }
            Some((v, _)) => Err(Error::Invalid(format!("layer index format {v} unknown"))),
            None => Err(Error::Invalid("empty layer index".into())),
        }
    }

    /// Internal consistency: checkpoints sorted and inside the layer, windows at most 32 KiB,
    /// entries inside the uncompressed stream. A corrupt index fails here, not in a read.
    fn check(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Invalid(format!("corrupt layer index: {what}")));
        if self.compression == Compression::Gzip
            && self.checkpoints.first().is_none_or(|c| c.out != 0)
        {
            return bad("no checkpoint at offset 0".into());
        }
        for w in self.checkpoints.windows(2) {
            if w[1].out < w[0].out || w[1].in_bit < w[0].in_bit {
                return bad("checkpoints out of order".into());
            }
        }
        for c in &self.checkpoints {
            if c.window.len() > gzip::WINDOW
                || c.first_byte() > self.compressed_size
                || c.out > self.uncompressed_size
            {
                return bad(format!("checkpoint at {} out of bounds", c.out));
            }
        }
        for e in &self.toc.entries {
            if e.offset
                .checked_add(e.size)
                .is_none_or(|end| end > self.uncompressed_size)
            {
                return bad(format!("entry {} outside the layer", e.path));
            }
        }
        Ok(())
    }

    /// Indexes a gzip-compressed tar stream (the whole blob, read once).
    pub fn build_gzip(blob: impl Read, span: u64) -> Result<Self> {
        let mut reader = gzip::CheckpointingReader::new(blob, span);
        let toc = toc::build(&mut reader)?;
        // Past the tar end-of-archive blocks: the rest, the gzip trailer and any further members
        // are read too, so the whole stream is checked.
        std::io::copy(&mut reader, &mut std::io::sink()).map_err(gzip_error)?;
        Ok(Self {
            compression: Compression::Gzip,
            toc,
            compressed_size: reader.compressed_len(),
            uncompressed_size: reader.uncompressed_len(),
            checkpoints: reader.into_checkpoints(),
        })
    }

    /// Indexes a zstd-compressed tar stream (TOC only, see [`zstd`]).
    pub fn build_zstd(mut blob: impl Read) -> Result<Self> {
        let mut compressed = Counted {
            inner: &mut blob,
            n: 0,
        };
        let mut decoder = zstd::Decoder::new(&mut compressed);
        let mut uncompressed = Counted {
            inner: &mut decoder,
            n: 0,
        };
        let toc = toc::build(&mut uncompressed)?;
        std::io::copy(&mut uncompressed, &mut std::io::sink()).map_err(|e| Error::Corrupt {
            offset: 0,
            detail: format!("zstd: {e}"),
        })?;
        let uncompressed_size = uncompressed.n;
        drop(decoder);
        Ok(Self {
            compression: Compression::Zstd,
            toc,
            checkpoints: Vec::new(),
            compressed_size: compressed.n,
            uncompressed_size,
        })
    }

    /// The whole uncompressed tar stream of a blob read from `blob` (any compression), written to
    /// `out`; returns its length, which must be the index's.
    pub fn decompress_all(&self, blob: impl Read, out: &mut impl std::io::Write) -> Result<u64> {
        let n = match self.compression {
            Compression::None => std::io::copy(&mut blob.take(self.compressed_size), out)?,
            Compression::Gzip => {
                std::io::copy(&mut gzip::CheckpointingReader::new(blob, u64::MAX), out)
                    .map_err(gzip_error)?
            }
            Compression::Zstd => {
                std::io::copy(&mut zstd::Decoder::new(blob), out).map_err(|e| Error::Corrupt {
                    offset: 0,
                    detail: format!("zstd: {e}"),
                })?
            }
        };
        if n != self.uncompressed_size {
            return Err(Error::Corrupt {
                offset: self.compressed_size,
                detail: format!(
                    "{n} bytes decompressed, the index says {}",
                    self.uncompressed_size
                ),
            });
        }
        Ok(n)
    }

    /// Indexes an uncompressed tar stream.
    pub fn build_tar(mut blob: impl Read) -> Result<Self> {
        let mut counted = Counted {
            inner: &mut blob,
            n: 0,
        };
        let toc = toc::build(&mut counted)?;
        std::io::copy(&mut counted, &mut std::io::sink())?;
        Ok(Self {
            compression: Compression::None,
            toc,
            checkpoints: Vec::new(),
            compressed_size: counted.n,
            uncompressed_size: counted.n,
        })
    }

    /// The uncompressed range of the chunk holding `offset`: from the checkpoint at or before it
    /// to the next one (gzip), the aligned [`RAW_CHUNK`] (uncompressed tar), or the whole layer
    /// (zstd). A reader that inflates and keeps whole chunks never inflates the same bytes twice.
    pub fn chunk_of(&self, offset: u64) -> std::ops::Range<u64> {
        let size = self.uncompressed_size;
        match self.compression {
            Compression::Zstd => 0..size,
            Compression::Gzip if !self.checkpoints.is_empty() => {
                let i = self
                    .checkpoints
                    .partition_point(|c| c.out <= offset)
                    .saturating_sub(1);
                let start = self.checkpoints[i].out;
                let end = self.checkpoints.get(i + 1).map_or(size, |c| c.out);
                start..end.max(start)
            }
            _ => {
                let start = offset - offset % RAW_CHUNK;
                start..(start + RAW_CHUNK).min(size)
            }
        }
    }

    /// Which compressed bytes hold uncompressed `[start, start + len)`.
    pub fn plan(&self, start: u64, len: u64) -> Result<ReadPlan> {
        let end = start
            .checked_add(len)
            .filter(|e| *e <= self.uncompressed_size)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "range {start}+{len} outside the layer's {} bytes",
                    self.uncompressed_size
                ))
            })?;
        match self.compression {
            Compression::None => Ok(ReadPlan {
                checkpoint: None,
                compressed: start..end,
            }),
            // No way into the middle of a frame: the whole blob.
            Compression::Zstd => Ok(ReadPlan {
                checkpoint: None,
                compressed: 0..self.compressed_size,
            }),
            Compression::Gzip => {
                let i = self
                    .checkpoints
                    .partition_point(|c| c.out <= start)
                    .checked_sub(1)
                    .ok_or_else(|| Error::Invalid("index has no checkpoint at 0".into()))?;
                let first = self.checkpoints[i].first_byte();
                // Up to the first checkpoint at or after the range's end, plus a little: the
                // inflater reads a few bytes past the last block it decodes.
                let last = self.checkpoints[i + 1..]
                    .iter()
                    .find(|c| c.out >= end)
                    .map_or(self.compressed_size, |c| {
                        (c.first_byte() + LOOKAHEAD).min(self.compressed_size)
                    });
                Ok(ReadPlan {
                    checkpoint: Some(i),
                    compressed: first..last,
                })
            }
        }
    }

    /// Uncompressed `[start, start + len)` from the compressed bytes of `plan` (fetched by the
    /// caller, `compressed` = blob bytes `plan.compressed`).
    pub fn read(
        &self,
        plan: &ReadPlan,
        compressed: &[u8],
        start: u64,
        len: usize,
    ) -> Result<Vec<u8>> {
        if compressed.len() as u64 != plan.compressed.end - plan.compressed.start {
            return Err(Error::Invalid(format!(
                "{} compressed bytes given for a plan of {:?}",
                compressed.len(),
                plan.compressed
            )));
        }
        match (self.compression, plan.checkpoint) {
            (Compression::None, _) => {
                let from = usize::try_from(start - plan.compressed.start)
                    .map_err(|_| Error::Invalid("range too large".into()))?;
                compressed
                    .get(from..from + len)
                    .map(<[u8]>::to_vec)
                    .ok_or_else(|| Error::Invalid("range outside the given bytes".into()))
            }
            (Compression::Gzip, Some(i)) => {
                let mut out = Vec::with_capacity(len);
                let mut cp = self
                    .checkpoints
                    .get(i)
                    .ok_or_else(|| Error::Invalid(format!("no checkpoint {i}")))?;
                loop {
                    let at = start + out.len() as u64;
                    let from = cp
                        .first_byte()
                        .checked_sub(plan.compressed.start)
                        .and_then(|o| usize::try_from(o).ok())
                        .filter(|o| *o <= compressed.len())
                        .ok_or_else(|| {
                            Error::Invalid("checkpoint outside the given bytes".into())
                        })?;
                    let part = gzip::inflate_range(cp, &compressed[from..], at, len - out.len())?;
                    out.extend_from_slice(&part);
                    if out.len() == len {
                        return Ok(out);
                    }
                    // The member ended inside the range: the next member starts at a checkpoint
                    // of its own, with an empty window, exactly where this one stopped.
                    let next = start + out.len() as u64;
                    cp = self
                        .checkpoints
                        .iter()
                        .find(|c| {
                            c.out == next && c.window.is_empty() && c.first_byte() > cp.first_byte()
                        })
                        .ok_or_else(|| Error::Corrupt {
                            offset: cp.first_byte(),
                            detail: format!(
                                "the stream ends at {next}, inside the range {start}+{len}"
                            ),
                        })?;
                }
            }
            (Compression::Gzip, None) => Err(Error::Invalid("gzip plan without checkpoint".into())),
            (Compression::Zstd, _) => {
                let mut all = Vec::new();
                self.decompress_all(compressed, &mut all)?;
                let from =
                    usize::try_from(start).map_err(|_| Error::Invalid("range too large".into()))?;
                all.get(from..from + len)
                    .map(<[u8]>::to_vec)
                    .ok_or_else(|| Error::Invalid("range outside the layer".into()))
            }
        }
    }
}

/// Unwraps the [`Error`] the gzip reader put inside an `io::Error`; other I/O errors stay I/O.
fn gzip_error(e: std::io::Error) -> Error {
    if !e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
        return Error::Io(e);
    }
    match e.into_inner().map(|inner| inner.downcast::<Error>()) {
        Some(Ok(err)) => *err,
        Some(Err(other)) => Error::Io(std::io::Error::other(other)),
        None => Error::Invalid("gzip reader failed without detail".into()),
    }
}

/// Counts the bytes read through it.
struct Counted<'a, R> {
    inner: &'a mut R,
    n: u64,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}
