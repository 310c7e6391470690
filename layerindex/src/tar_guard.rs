//! Bounds on what a layer's tar stream may make the TOC builder hold in memory. The `tar` crate
//! reads GNU long names and links and PAX headers whole (their size is whatever the header says)
//! before it hands out the entry they describe, so this reader sits in front of it: it follows
//! the stream block by block, as the crate does (a local PAX `size` record moves the next
//! boundary, as in the crate), and fails the read that completes a header announcing more than
//! [`Limits`] allow, before the crate could ask for those bytes. GNU sparse entries, which
//! change the layout in ways OCI layers never use, are refused.

use std::io::{self, Read};

use crate::error::Error;

const BLOCK: u64 = 512;

/// What one layer may hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Bytes of one GNU long name or long link (`L`, `K`).
    pub long_name: u64,
    /// Bytes of one PAX header (`x`, `g`).
    pub pax: u64,
    /// Headers (entries, long names and PAX headers together).
    pub headers: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            long_name: 64 << 10,
            pax: 1 << 20,
            headers: 4 << 20,
        }
    }
}

/// The guarding reader.
pub struct TarGuard<R> {
    inner: R,
    limits: Limits,
    /// Stream offset of the next byte read.
    pos: u64,
    /// Where the next header block starts.
    next_header: u64,
    header: [u8; BLOCK as usize],
    filled: usize,
    headers: u64,
    /// Data of the PAX header being passed through (to learn its `size` record).
    pax: Option<(Vec<u8>, u64)>,
    /// The `size` a local PAX header set for the next entry.
    pax_size: Option<u64>,
    failed: Option<String>,
}

impl<R: Read> TarGuard<R> {
    pub fn new(inner: R, limits: Limits) -> Self {
        Self {
            inner,
            limits,
            pos: 0,
            next_header: 0,
            header: [0; BLOCK as usize],
            filled: 0,
            headers: 0,
            pax: None,
            pax_size: None,
            failed: None,
        }
    }

    /// Looks at `bytes`, which sit at stream offset `self.pos`; `Err` when they complete a header
    /// over the limits.
    fn observe(&mut self, mut bytes: &[u8]) -> Result<(), String> {
        while !bytes.is_empty() {
            if self.pos < self.next_header {
                // Entry data: passed through, a PAX header's data kept to read its records.
                let n = (self.next_header - self.pos).min(bytes.len() as u64) as usize;
                if let Some((data, want)) = &mut self.pax {
                    let take = n.min((*want as usize).saturating_sub(data.len()));
                    data.extend_from_slice(&bytes[..take]);
                    if data.len() as u64 == *want {
                        self.pax_size = pax_size(data).or(self.pax_size);
                        self.pax = None;
                    }
                }
                self.pos += n as u64;
                bytes = &bytes[n..];
                continue;
            }
            let n = (BLOCK as usize - self.filled).min(bytes.len());
            self.header[self.filled..self.filled + n].copy_from_slice(&bytes[..n]);
            self.filled += n;
            self.pos += n as u64;
            bytes = &bytes[n..];
            if self.filled == BLOCK as usize {
                self.filled = 0;
                self.header_done()?;
            }
        }
        Ok(())
    }

    fn header_done(&mut self) -> Result<(), String> {
        let at = self.pos - BLOCK;
        let h = self.header;
        self.next_header = self.pos;
        if h.iter().all(|b| *b == 0) {
            return Ok(()); // end-of-archive blocks
        }
        self.headers += 1;
        if self.headers > self.limits.headers {
            return Err(format!("more than {} tar headers", self.limits.headers));
        }
        let size = parse_size(&h[124..136])
            .ok_or_else(|| format!("tar header at {at}: unreadable size field"))?;
        let kind = h[156];
        let (what, cap) = match kind {
            b'L' => ("GNU long name", Some(self.limits.long_name)),
            b'K' => ("GNU long link", Some(self.limits.long_name)),
            b'x' | b'g' => ("PAX header", Some(self.limits.pax)),
            b'S' => {
                return Err(format!(
                    "tar header at {at}: GNU sparse entries are not indexed"
                ));
            }
            _ => ("entry", None),
        };
        if let Some(cap) = cap
            && size > cap
        {
            return Err(format!(
                "tar header at {at}: {what} of {size} bytes, over the {cap}-byte limit"
            ));
        }
        let data = match kind {
            b'L' | b'K' | b'g' => size,
            b'x' => {
                self.pax = (size > 0).then(|| (Vec::with_capacity(size as usize), size));
                size
            }
            // A local PAX `size` applies to the next real entry, as the `tar` crate reads it.
            _ => self.pax_size.take().unwrap_or(size),
        };
        self.next_header = data
            .checked_next_multiple_of(BLOCK)
            .and_then(|d| self.pos.checked_add(d))
            .ok_or_else(|| format!("tar header at {at}: size {data} overflows"))?;
        Ok(())
    }
}

impl<R: Read> Read for TarGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(why) = &self.failed {
            return Err(limit_error(why));
        }
        let n = self.inner.read(buf)?;
        if let Err(why) = self.observe(&buf[..n]) {
            self.failed = Some(why.clone());
            return Err(limit_error(&why));
        }
        Ok(n)
    }
}

fn limit_error(why: &str) -> io::Error {
    io::Error::other(Error::Corrupt {
        offset: 0,
        detail: format!("layer over the index limits: {why}"),
    })
}

/// A tar numeric field: octal (NUL/space padded) or GNU base-256.
fn parse_size(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        // Base-256: big-endian, the first byte's high bit is the marker.
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(*b))?;
        }
        return Some(v);
    }
    let digits: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|b| *b == b' ')
        .take_while(|b| (b'0'..=b'7').contains(b))
        .collect();
    if digits.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(std::str::from_utf8(&digits).ok()?, 8).ok()
}

/// The `size` record of PAX data (`<len> size=<n>\n` records).
fn pax_size(data: &[u8]) -> Option<u64> {
    let mut rest = data;
    let mut size = None;
    while !rest.is_empty() {
        let sp = rest.iter().position(|b| *b == b' ')?;
        let len: usize = std::str::from_utf8(&rest[..sp]).ok()?.parse().ok()?;
        if len <= sp || len > rest.len() {
            return size;
        }
        let record = &rest[sp + 1..len];
        if let Some(v) = record.strip_prefix(b"size=") {
            let v = v.strip_suffix(b"\n").unwrap_or(v);
            size = std::str::from_utf8(v).ok()?.parse().ok();
        }
        rest = &rest[len..];
    }
    size
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: u8, size: u64, name: &str) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_size(size);
        h.set_path(name).expect("path");
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    fn read_all(bytes: &[u8], limits: Limits) -> io::Result<()> {
        let mut g = TarGuard::new(bytes, limits);
        // Odd-sized reads: headers arrive in pieces.
        let mut buf = [0u8; 100];
        while g.read(&mut buf)? > 0 {}
        Ok(())
    }

    #[test]
    fn a_long_name_over_the_limit_fails_before_its_data() {
        let mut t = header(b'L', 10 << 20, "././@LongLink");
        t.extend(vec![b'a'; 1024]); // (the rest would follow)
        let e = read_all(&t, Limits::default()).expect_err("refused");
        assert!(
            e.to_string().contains("GNU long name of 10485760 bytes"),
            "{e}"
        );
    }

    #[test]
    fn ordinary_archives_pass_untouched() {
        let mut b = tar::Builder::new(Vec::new());
        let long = "d/".repeat(200) + "file";
        let meta = |h: &mut tar::Header| {
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
        };
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        meta(&mut h);
        b.append_data(&mut h, &long, &b"hello"[..]).expect("append");
        let mut h = tar::Header::new_ustar();
        h.set_size(3);
        meta(&mut h);
        b.append_pax_extensions([("SCHILY.xattr.user.a", &b"1"[..])])
            .expect("pax");
        b.append_data(&mut h, "x", &b"abc"[..]).expect("append");
        let bytes = b.into_inner().expect("tar");
        read_all(&bytes, Limits::default()).expect("passes");
        let toc = crate::toc::build(&bytes[..]).expect("toc");
        assert_eq!(toc.entries.len(), 2);
        assert_eq!(toc.entries[0].path, long);
    }

    #[test]
    fn pax_size_moves_the_next_boundary_and_header_count_is_bounded() {
        assert_eq!(pax_size(b"12 size=700\n19 path=abcdefghij\n"), Some(700));
        assert_eq!(parse_size(b"00000001000\0"), Some(512));
        assert_eq!(
            parse_size(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]),
            Some(256)
        );
        let mut t = Vec::new();
        for i in 0..5 {
            t.extend(header(b'0', 0, &format!("f{i}")));
        }
        let few = Limits {
            headers: 4,
            ..Limits::default()
        };
        let e = read_all(&t, few).expect_err("too many");
        assert!(e.to_string().contains("more than 4 tar headers"), "{e}");
        let e = read_all(&header(b'S', 0, "sparse"), Limits::default()).expect_err("sparse");
        assert!(e.to_string().contains("sparse"), "{e}");
    }
}
