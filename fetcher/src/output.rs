//! The destination file: disk-space preflight before anything is downloaded, and atomic delivery
//! (copy from the store while hashing, verify, fsync, rename) so the path holds the whole verified
//! content or nothing.

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Bytes kept free beyond the content, so a download never fills a disk to the last block.
pub const DISK_RESERVE: u64 = 1024 * 1024;

/// The directory the output goes into; it must exist.
pub fn output_dir(output: &Path) -> Result<PathBuf> {
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(Error::invalid(
            "output",
            format!("directory {} does not exist", dir.display()),
        ));
    }
    if output.is_dir() {
        return Err(Error::invalid(
            "output",
            format!("{} is a directory", output.display()),
        ));
    }
    Ok(dir)
}

/// Checks there is room for `content_length` bytes at the destination and for the bytes still to
/// download in the store (both on one filesystem: both counted there).
pub fn preflight(output: &Path, store_root: &Path, content_length: u64, held: u64) -> Result<()> {
    let out_dir = output_dir(output)?;
    let avail = |p: &Path| {
        fs4::available_space(p).map_err(|e| Error::io("cannot stat filesystem of", p, e))
    };
    let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
    let to_fetch = content_length.saturating_sub(held);
    let out_avail = avail(&out_dir)?;
    let same_fs = dev(&out_dir).is_some() && dev(&out_dir) == dev(store_root);
    let out_need = content_length + DISK_RESERVE + if same_fs { to_fetch } else { 0 };
    if out_avail < out_need {
        return Err(Error::NoSpace {
            path: out_dir,
            needed: out_need,
            available: out_avail,
        });
    }
    if !same_fs {
        let store_avail = avail(store_root)?;
        let need = to_fetch + DISK_RESERVE;
        if store_avail < need {
            return Err(Error::NoSpace {
                path: store_root.to_path_buf(),
                needed: need,
                available: store_avail,
            });
        }
    }
    Ok(())
}

/// Copies `len` bytes of `data_path` to `output` atomically, verifying the whole against
/// `expected_hex` when given. Returns the content's `sha256:<hex>`.
pub fn deliver(
    data_path: &Path,
    len: u64,
    output: &Path,
    expected_hex: Option<&str>,
) -> Result<String> {
    let dir = output_dir(output)?;
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = dir.join(format!(
        ".{name}.damselfly-{}-{:08x}.tmp",
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = copy_verify(data_path, len, &tmp, expected_hex).and_then(|digest| {
        std::fs::rename(&tmp, output).map_err(|e| Error::io("cannot rename into", output, e))?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(digest)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn copy_verify(src: &Path, len: u64, tmp: &Path, expected_hex: Option<&str>) -> Result<String> {
    let mut input = std::fs::File::open(src)
        .map_err(|e| Error::io("cannot open", src, e))?
        .take(len);
    let mut out = std::fs::File::create(tmp).map_err(|e| Error::io("cannot create", tmp, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0u64;
    loop {
        let n = input
            .read(&mut buf)
            .map_err(|e| Error::io("cannot read", src, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| Error::io("cannot write", tmp, e))?;
        copied += n as u64;
    }
    if copied != len {
        return Err(Error::Download(format!(
            "store holds {copied} of {len} bytes"
        )));
    }
    let actual = hex::encode(hasher.finalize());
    if let Some(exp) = expected_hex.filter(|e| *e != actual) {
        return Err(Error::DigestMismatch {
            expected: format!("sha256:{exp}"),
            actual: format!("sha256:{actual}"),
        });
    }
    out.sync_all()
        .map_err(|e| Error::io("cannot sync", tmp, e))?;
    Ok(format!("sha256:{actual}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivers_whole_or_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("data");
        std::fs::write(&src, b"hello world").expect("write");
        let out = dir.path().join("out");
        let good = crate::piece::sha256_hex(b"hello world");
        assert!(deliver(&src, 11, &out, Some(&"0".repeat(64))).is_err());
        assert!(!out.exists());
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("ls").count(),
            1,
            "no temp file left"
        );
        assert_eq!(
            deliver(&src, 11, &out, Some(&good)).expect("ok"),
            format!("sha256:{good}")
        );
        assert_eq!(std::fs::read(&out).expect("read"), b"hello world");
    }

    #[test]
    fn preflight_refuses_what_cannot_fit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out");
        assert!(preflight(&out, dir.path(), 1024, 0).is_ok());
        let err = preflight(&out, dir.path(), u64::MAX / 4, 0).expect_err("too big");
        assert!(matches!(err, Error::NoSpace { .. }), "{err}");
    }
}
