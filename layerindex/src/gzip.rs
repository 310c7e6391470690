//! Random access into gzip streams (RFC 1952 members holding raw deflate, RFC 1951).
//!
//! [`CheckpointingReader`] inflates a gzip stream once, as a plain `Read` of the uncompressed
//! bytes, and records a [`Checkpoint`] at the first deflate block boundary after every `span`
//! output bytes: the compressed *bit* offset of the next block, the uncompressed offset, and the
//! 32 KiB of output before it (the back-reference window). [`inflate_range`] later resumes at a
//! checkpoint, with those bits primed and that window as history, so a read of any uncompressed
//! range inflates at most `span` bytes plus the range. Built on miniz_oxide's block-boundary
//! state, in safe Rust.

use std::io::Read;

use miniz_oxide::inflate::TINFLStatus;
use miniz_oxide::inflate::core::inflate_flags::{
    TINFL_FLAG_HAS_MORE_INPUT, TINFL_FLAG_STOP_ON_BLOCK_BOUNDARY,
    TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
};
use miniz_oxide::inflate::core::{BlockBoundaryState, DecompressorOxide, decompress};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Deflate's back-reference distance.
pub const WINDOW: usize = 32 << 10;
/// Output buffer beyond the window.
const OUT_CHUNK: usize = 256 << 10;
const IN_CHUNK: usize = 256 << 10;

/// Where inflating can resume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Bit offset, in the compressed stream, of the next deflate block.
    pub in_bit: u64,
    /// Uncompressed offset at that point.
    pub out: u64,
    /// The uncompressed bytes just before `out` (up to 32 KiB; fewer at a member's start).
    pub window: Vec<u8>,
}

impl Checkpoint {
    /// The first compressed byte needed to resume here (the one holding leftover bits, if any).
    pub fn first_byte(&self) -> u64 {
        self.in_bit / 8
    }
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Header,
    Deflate,
    Trailer,
    Done,
}

/// Inflates a gzip stream as a `Read`, recording checkpoints.
pub struct CheckpointingReader<R> {
    src: R,
    src_eof: bool,
    inbuf: Vec<u8>,
    in_start: usize,
    in_end: usize,
    /// Compressed bytes consumed so far (absolute offset of `inbuf[in_start]`).
    consumed: u64,
    dec: Box<DecompressorOxide>,
    out: Vec<u8>,
    out_pos: usize,
    out_read: usize,
    /// Uncompressed bytes produced so far.
    produced: u64,
    /// Output of the current member, for the trailer's ISIZE check.
    member_out: u64,
    span: u64,
    last_cp: u64,
    checkpoints: Vec<Checkpoint>,
    /// Bound on `checkpoints` (see [`MAX_CHECKPOINTS`]).
    max_checkpoints: usize,
    state: State,
}

/// Checkpoints one layer keeps at most (each holds up to a 32 KiB window: ≤ 128 MiB). Past it,
/// every other block checkpoint is dropped and the span doubles, so a huge layer gets longer
/// chunks instead of an unbounded index; more gzip members than this is refused.
pub const MAX_CHECKPOINTS: usize = 4096;

impl<R: Read> CheckpointingReader<R> {
    /// `span`: minimum uncompressed distance between checkpoints (1–4 MiB is typical).
    pub fn new(src: R, span: u64) -> Self {
        Self {
            src,
            src_eof: false,
            inbuf: vec![0; IN_CHUNK],
            in_start: 0,
            in_end: 0,
            consumed: 0,
            dec: Box::default(),
            out: vec![0; WINDOW + OUT_CHUNK],
            out_pos: 0,
            out_read: 0,
            produced: 0,
            member_out: 0,
            span: span.max(1),
            last_cp: 0,
            checkpoints: Vec::new(),
            max_checkpoints: MAX_CHECKPOINTS,
            state: State::Header,
        }
    }

    /// The same reader with another checkpoint bound (tests).
    pub fn with_max_checkpoints(mut self, max: usize) -> Self {
        self.max_checkpoints = max.max(2);
        self
    }

    /// Keeps the checkpoints within the bound: member starts (empty window) stay, every other
    /// block checkpoint goes, and later ones come twice as far apart.
    fn thin(&mut self) {
        if self.checkpoints.len() <= self.max_checkpoints {
            return;
        }
        let mut keep = false;
        self.checkpoints.retain(|c| {
            if c.window.is_empty() {
                return true;
            }
            keep = !keep;
            keep
        });
        self.span = self.span.saturating_mul(2);
    }

    /// Checkpoints so far; complete once the reader returned EOF.
    pub fn checkpoints(&self) -> &[Checkpoint] {
        &self.checkpoints
    }

    pub fn into_checkpoints(self) -> Vec<Checkpoint> {
        self.checkpoints
    }

    /// Compressed bytes consumed (the whole stream's length once EOF was returned).
    pub fn compressed_len(&self) -> u64 {
        self.consumed
    }

    /// Uncompressed bytes produced.
    pub fn uncompressed_len(&self) -> u64 {
        self.produced
    }

    /// Makes sure at least `n` input bytes are buffered, unless the source ends first.
    fn fill(&mut self, n: usize) -> std::io::Result<()> {
        if self.in_end - self.in_start >= n || self.src_eof {
            return Ok(());
        }
        self.inbuf.copy_within(self.in_start..self.in_end, 0);
        self.in_end -= self.in_start;
        self.in_start = 0;
        if self.inbuf.len() < n {
            self.inbuf.resize(n, 0);
        }
        while self.in_end < n.max(1) || self.in_end < self.inbuf.len() / 2 {
            let got = self.src.read(&mut self.inbuf[self.in_end..])?;
            if got == 0 {
                self.src_eof = true;
                break;
            }
            self.in_end += got;
            if self.in_end >= n {
                break;
            }
        }
        Ok(())
    }

    fn take(&mut self, n: usize) {
        self.in_start += n;
        self.consumed += n as u64;
    }

    fn corrupt(&self, what: impl Into<String>) -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            Error::Corrupt {
                offset: self.consumed,
                detail: what.into(),
            },
        )
    }

    /// Parses a member header (RFC 1952 §2.3); false at a clean end of stream.
    fn header(&mut self) -> std::io::Result<bool> {
        self.fill(10)?;
        let avail = self.in_end - self.in_start;
        if avail == 0 && self.produced > 0 {
            return Ok(false);
        }
        // Zero padding after the last member is tolerated (tar tools write it).
        if self.produced > 0
            && self.inbuf[self.in_start..self.in_end]
                .iter()
                .all(|b| *b == 0)
        {
            let n = avail;
            self.take(n);
            self.fill(10)?;
            if self.in_end == self.in_start {
                return Ok(false);
            }
        }
        if self.in_end - self.in_start < 10 {
            return Err(self.corrupt("truncated gzip header"));
        }
        let h = &self.inbuf[self.in_start..self.in_start + 10];
        if h[0] != 0x1f || h[1] != 0x8b {
            return Err(self.corrupt("not gzip (bad magic)"));
        }
        if h[2] != 8 {
            return Err(self.corrupt(format!("unknown gzip method {}", h[2])));
        }
        let flags = h[3];
        self.take(10);
        if flags & 4 != 0 {
            self.fill(2)?;
            if self.in_end - self.in_start < 2 {
                return Err(self.corrupt("truncated gzip extra field"));
            }
            let xlen = usize::from(u16::from_le_bytes([
                self.inbuf[self.in_start],
                self.inbuf[self.in_start + 1],
            ]));
            self.take(2);
            self.fill(xlen)?;
            if self.in_end - self.in_start < xlen {
                return Err(self.corrupt("truncated gzip extra field"));
            }
            self.take(xlen);
        }
        for bit in [8u8, 16] {
            if flags & bit != 0 {
                // Zero-terminated name or comment.
                loop {
                    self.fill(1)?;
                    if self.in_end == self.in_start {
                        return Err(self.corrupt("truncated gzip header string"));
                    }
                    let b = self.inbuf[self.in_start];
                    self.take(1);
                    if b == 0 {
                        break;
                    }
                }
            }
        }
        if flags & 2 != 0 {
            self.fill(2)?;
            if self.in_end - self.in_start < 2 {
                return Err(self.corrupt("truncated gzip header CRC"));
            }
            self.take(2);
        }
        // A member starts with an empty window.
        *self.dec = DecompressorOxide::default();
        self.member_out = 0;
        self.out_pos = 0;
        self.out_read = 0;
        let members = self
            .checkpoints
            .iter()
            .filter(|c| c.window.is_empty())
            .count();
        if members >= self.max_checkpoints {
            return Err(self.corrupt(format!("more than {} gzip members", self.max_checkpoints)));
        }
        self.checkpoints.push(Checkpoint {
            in_bit: self.consumed * 8,
            out: self.produced,
            window: Vec::new(),
        });
        self.last_cp = self.produced;
        self.thin();
        Ok(true)
    }

    fn trailer(&mut self) -> std::io::Result<()> {
        self.fill(8)?;
        if self.in_end - self.in_start < 8 {
            return Err(self.corrupt("truncated gzip trailer"));
        }
        let t = &self.inbuf[self.in_start + 4..self.in_start + 8];
        let isize = u32::from_le_bytes([t[0], t[1], t[2], t[3]]);
        if u64::from(isize) != self.member_out & 0xffff_ffff {
            return Err(self.corrupt("gzip length (ISIZE) does not match the data"));
        }
        self.take(8);
        Ok(())
    }

    /// Inflates more output into `out[out_pos..]`; false when the stream is done.
    fn produce(&mut self) -> std::io::Result<bool> {
        loop {
            match self.state {
                State::Done => return Ok(false),
                State::Header => {
                    if self.header()? {
                        self.state = State::Deflate;
                    } else {
                        self.state = State::Done;
                    }
                }
                State::Trailer => {
                    self.trailer()?;
                    self.state = State::Header;
                }
                State::Deflate => {
                    if self.out_pos == self.out.len() {
                        let keep = self.out_pos - WINDOW;
                        self.out.copy_within(keep..self.out_pos, 0);
                        self.out_pos = WINDOW;
                        self.out_read = WINDOW;
                    }
                    self.fill(IN_CHUNK / 2)?;
                    let more = if self.src_eof {
                        0
                    } else {
                        TINFL_FLAG_HAS_MORE_INPUT
                    };
                    let flags = TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF
                        | TINFL_FLAG_STOP_ON_BLOCK_BOUNDARY
                        | more;
                    let (status, nin, nout) = decompress(
                        &mut self.dec,
                        &self.inbuf[self.in_start..self.in_end],
                        &mut self.out,
                        self.out_pos,
                        flags,
                    );
                    self.take(nin);
                    self.out_pos += nout;
                    self.produced += nout as u64;
                    self.member_out += nout as u64;
                    match status {
                        TINFLStatus::BlockBoundary => {
                            if self.produced - self.last_cp >= self.span
                                && let Some(s) = self.dec.block_boundary_state()
                            {
                                let start = self.out_pos.saturating_sub(WINDOW);
                                self.checkpoints.push(Checkpoint {
                                    in_bit: self.consumed * 8 - u64::from(s.num_bits),
                                    out: self.produced,
                                    window: self.out[start..self.out_pos].to_vec(),
                                });
                                self.last_cp = self.produced;
                                self.thin();
                            }
                        }
                        TINFLStatus::Done => self.state = State::Trailer,
                        TINFLStatus::HasMoreOutput => {}
                        TINFLStatus::NeedsMoreInput => {
                            if self.src_eof {
                                return Err(self.corrupt("truncated deflate data"));
                            }
                        }
                        other => return Err(self.corrupt(format!("bad deflate data ({other:?})"))),
                    }
                    if nout > 0 {
                        return Ok(true);
                    }
                }
            }
        }
    }
}

impl<R: Read> Read for CheckpointingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.out_read == self.out_pos {
            if !self.produce()? {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.out_pos - self.out_read);
        buf[..n].copy_from_slice(&self.out[self.out_read..self.out_read + n]);
        self.out_read += n;
        Ok(n)
    }
}

/// Inflates uncompressed bytes `[start, start + len)` from checkpoint `cp`. `compressed` holds the
/// compressed stream from byte `cp.first_byte()` on, at least up to the end of the deflate data
/// covering the range (e.g. up to the next checkpoint after it). Fewer than `len` bytes come back
/// when the gzip member ends inside the range (the next member resumes at its own checkpoint).
/// An error means the data cannot be inflated: it is never replaced by guessed bytes.
pub fn inflate_range(
    cp: &Checkpoint,
    compressed: &[u8],
    start: u64,
    len: usize,
) -> Result<Vec<u8>> {
    if start < cp.out {
        return Err(Error::Invalid(format!(
            "range starts at {start}, before its checkpoint at {}",
            cp.out
        )));
    }
    let bad = |detail: String| Error::Corrupt {
        offset: cp.first_byte(),
        detail,
    };
    // The checkpoint may fall inside a byte: its first `used` bits end the previous block, the
    // high `8 - used` bits start the next one and go to the inflater as pending bits.
    let used = u8::try_from(cp.in_bit % 8).unwrap_or(0);
    let (input, state) = if used > 0 {
        let first = *compressed
            .first()
            .ok_or_else(|| bad("no compressed bytes".into()))?;
        let state = BlockBoundaryState {
            num_bits: 8 - used,
            bit_buf: first >> used,
            ..BlockBoundaryState::default()
        };
        (&compressed[1..], state)
    } else {
        (compressed, BlockBoundaryState::default())
    };
    let mut input = input;
    if cp.window.len() > WINDOW {
        return Err(bad(format!(
            "checkpoint window of {} bytes",
            cp.window.len()
        )));
    }
    let mut dec = Box::new(DecompressorOxide::from_block_boundary_state(&state));
    let mut out = vec![0u8; WINDOW + OUT_CHUNK];
    out[..cp.window.len()].copy_from_slice(&cp.window);
    let mut pos = cp.window.len();
    let mut at = cp.out;
    let end = start + len as u64;
    let mut result = Vec::with_capacity(len);
    while at < end {
        if pos == out.len() {
            out.copy_within(pos - WINDOW..pos, 0);
            pos = WINDOW;
        }
        let (status, nin, nout) = decompress(
            &mut dec,
            input,
            &mut out,
            pos,
            TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
        );
        let (lo, hi) = (start.max(at), end.min(at + nout as u64));
        if lo < hi {
            // `out[pos..pos + nout]` holds uncompressed `[at, at + nout)`.
            let a = pos + usize::try_from(lo - at).unwrap_or(0);
            let b = pos + usize::try_from(hi - at).unwrap_or(0);
            result.extend_from_slice(&out[a..b]);
        }
        input = &input[nin..];
        pos += nout;
        at += nout as u64;
        if at >= end {
            // The range is out; whatever stopped the inflater lies past it.
            break;
        }
        match status {
            TINFLStatus::HasMoreOutput => {}
            TINFLStatus::Done => break,
            TINFLStatus::NeedsMoreInput | TINFLStatus::FailedCannotMakeProgress => {
                return Err(bad(format!(
                    "compressed data ends before the range ({status:?} at {at}, {} input bytes left)",
                    input.len()
                )));
            }
            other => return Err(bad(format!("bad deflate data ({other:?})"))),
        }
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).expect("gzip");
        e.finish().expect("gzip")
    }

    #[test]
    fn checkpoints_are_thinned_to_the_bound_and_stay_exact() {
        use rand::{RngCore, SeedableRng};
        let mut data = vec![0u8; 6 << 20];
        rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut data[..3 << 20]);
        data.copy_within(0..3 << 20, 3 << 20);
        let gz = gzip(&data);
        let mut r = CheckpointingReader::new(&gz[..], 1).with_max_checkpoints(8);
        let mut out = Vec::new();
        r.read_to_end(&mut out).expect("inflate");
        assert!(out == data);
        let cps = r.into_checkpoints();
        assert!((4..=8).contains(&cps.len()), "{} checkpoints", cps.len());
        for cp in &cps {
            let len = (data.len() as u64 - cp.out).min(4096) as usize;
            let got =
                inflate_range(cp, &gz[cp.first_byte() as usize..], cp.out, len).expect("resume");
            assert!(got[..] == data[cp.out as usize..cp.out as usize + len]);
        }
    }

    #[test]
    fn gzip_member_spam_is_refused() {
        let spam: Vec<u8> = (0..20).flat_map(|i| gzip(&[i])).collect();
        let mut r = CheckpointingReader::new(&spam[..], 1 << 20).with_max_checkpoints(8);
        let e = r.read_to_end(&mut Vec::new()).expect_err("refused");
        assert!(e.to_string().contains("more than 8 gzip members"), "{e}");
    }
}
