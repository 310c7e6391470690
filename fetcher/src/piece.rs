//! Pieces: fixed ranges of a task, each with a sha256, and the cutter that makes them from a stream.

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Metadata of one piece: where it sits in the content and what its bytes hash to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceMeta {
    pub num: u32,
    pub offset: u64,
    pub size: u32,
    /// Lowercase hex sha256 of the piece's bytes.
    pub sha256: String,
}

impl PieceMeta {
    /// Converts from the wire form.
    pub fn from_proto(p: &proto::scheduler::PieceInfo) -> Self {
        Self {
            num: p.piece,
            offset: p.offset,
            size: p.size,
            sha256: p.sha256.clone(),
        }
    }

    /// Converts to the wire form.
    pub fn to_proto(&self) -> proto::scheduler::PieceInfo {
        proto::scheduler::PieceInfo {
            piece: self.num,
            offset: self.offset,
            size: self.size,
            sha256: self.sha256.clone(),
        }
    }

    /// True when `data` is exactly this piece's bytes.
    pub fn verify(&self, data: &[u8]) -> bool {
        data.len() == self.size as usize && sha256_hex(data) == self.sha256
    }
}

/// Lowercase hex sha256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Cuts a byte stream into pieces of `piece_size`, hashing each piece and the whole content.
pub struct PieceCutter {
    piece_size: usize,
    buf: BytesMut,
    next_num: u32,
    next_offset: u64,
    whole: Sha256,
}

impl PieceCutter {
    /// A cutter that starts at piece 0, offset 0.
    pub fn new(piece_size: u32) -> Self {
        Self {
            piece_size: piece_size as usize,
            buf: BytesMut::with_capacity(piece_size as usize),
            next_num: 0,
            next_offset: 0,
            whole: Sha256::new(),
        }
    }

    /// A cutter for the rest of a content from piece `first` on (offset `first * piece_size`),
    /// e.g. a ranged origin body; its digest covers only the bytes fed to it.
    pub fn starting_at(piece_size: u32, first: u32) -> Self {
        let mut c = Self::new(piece_size);
        c.next_num = first;
        c.next_offset = u64::from(first) * u64::from(piece_size);
        c
    }

    /// Feeds bytes; returns the pieces completed by them.
    pub fn push(&mut self, mut data: &[u8]) -> Vec<(PieceMeta, Bytes)> {
        let mut out = Vec::new();
        self.whole.update(data);
        while !data.is_empty() {
            let room = self.piece_size - self.buf.len();
            let take = room.min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == self.piece_size {
                out.push(self.cut());
            }
        }
        out
    }

    /// Bytes fed so far.
    pub fn total(&self) -> u64 {
        self.next_offset + self.buf.len() as u64
    }

    /// Ends the stream: returns the last (short) piece if any, the total length, and the whole
    /// content's digest as `sha256:<hex>`.
    pub fn finish(mut self) -> (Option<(PieceMeta, Bytes)>, u64, String) {
        let last = (!self.buf.is_empty()).then(|| self.cut());
        let digest = format!("sha256:{}", hex::encode(self.whole.finalize()));
        (last, self.next_offset, digest)
    }

    fn cut(&mut self) -> (PieceMeta, Bytes) {
        let data = self.buf.split().freeze();
        self.buf.reserve(self.piece_size);
        let meta = PieceMeta {
            num: self.next_num,
            offset: self.next_offset,
            size: data.len() as u32,
            sha256: sha256_hex(&data),
        };
        self.next_num += 1;
        self.next_offset += data.len() as u64;
        (meta, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cutter_can_start_mid_content() {
        let mut c = PieceCutter::starting_at(4096, 2);
        let pieces = c.push(&[7u8; 5000]);
        assert_eq!((pieces[0].0.num, pieces[0].0.offset), (2, 8192));
        let (last, total, _) = c.finish();
        let last = last.expect("short last piece");
        assert_eq!((last.0.num, last.0.offset, last.0.size), (3, 12288, 904));
        assert_eq!(total, 8192 + 5000);
    }

    #[test]
    fn cuts_at_piece_boundaries_whatever_the_chunking() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut c = PieceCutter::new(4096);
        let mut pieces = Vec::new();
        for chunk in data.chunks(777) {
            pieces.extend(c.push(chunk));
        }
        let (last, total, digest) = c.finish();
        pieces.extend(last);
        assert_eq!(total, 10_000);
        assert_eq!(pieces.len(), 3);
        assert_eq!(pieces[2].0.size, 10_000 - 8192);
        for (m, b) in &pieces {
            assert!(m.verify(b));
            assert_eq!(
                &data[m.offset as usize..m.offset as usize + m.size as usize],
                &b[..]
            );
        }
        assert_eq!(digest, format!("sha256:{}", sha256_hex(&data)));
    }
}
