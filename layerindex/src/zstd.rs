//! zstd layers. A zstd frame cannot be entered in the middle without seek tables, so a zstd
//! layer's index is its TOC only, and a reader decompresses the whole blob once (to a local file)
//! before serving it. The next step is per-frame checkpoints (seekable zstd, or the frames
//! `zstd --long`-free encoders emit) to read such layers lazily too.

use std::io::{BufRead, BufReader, Read};

use ruzstd::decoding::{FrameDecoder, StreamingDecoder};

/// The zstd frame magic number, as the blob's first bytes.
pub const MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Decompresses a stream of one or more zstd frames.
pub struct Decoder<R: Read> {
    src: Option<BufReader<R>>,
    frame: Option<StreamingDecoder<BufReader<R>, FrameDecoder>>,
}

impl<R: Read> Decoder<R> {
    pub fn new(src: R) -> Self {
        Self {
            src: Some(BufReader::with_capacity(1 << 20, src)),
            frame: None,
        }
    }
}

impl<R: Read> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if let Some(f) = &mut self.frame {
                let n = f.read(buf)?;
                if n > 0 || buf.is_empty() {
                    return Ok(n);
                }
                // The frame is done: the next one, if any.
                if let Some(f) = self.frame.take() {
                    self.src = Some(f.into_inner());
                }
                continue;
            }
            let Some(mut src) = self.src.take() else {
                return Ok(0);
            };
            if src.fill_buf()?.is_empty() {
                self.src = Some(src);
                return Ok(0);
            }
            let frame = StreamingDecoder::new(src)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
            self.frame = Some(frame);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concatenated_frames_decode_in_order() {
        let a = vec![7u8; 300_000];
        let b: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let level = ruzstd::encoding::CompressionLevel::Fastest;
        let mut blob = ruzstd::encoding::compress_to_vec(a.as_slice(), level);
        assert_eq!(blob[..4], MAGIC);
        blob.extend(ruzstd::encoding::compress_to_vec(b.as_slice(), level));
        let mut out = Vec::new();
        Decoder::new(blob.as_slice())
            .read_to_end(&mut out)
            .expect("decode");
        assert_eq!(out.len(), a.len() + b.len());
        assert!(out[..a.len()] == a[..] && out[a.len()..] == b[..]);
        let mut short = Vec::new();
        let cut = &blob[..blob.len() / 3];
        assert!(
            Decoder::new(cut).read_to_end(&mut short).is_err(),
            "truncated is an error"
        );
    }
}
