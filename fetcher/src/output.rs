//! The destination file: disk-space preflight before anything is downloaded, and atomic delivery
//! (hash while pieces land, verify, fsync, rename) so the path holds the whole verified content or
//! nothing.
//!
//! Where the destination's directory can hold a hard link to the piece store's data file (same
//! filesystem, links allowed), each byte is written once, into the store, and the destination
//! becomes a second name of that file at commit; elsewhere pieces are written to both.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::piece_store::TaskStore;

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
    let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
    let to_fetch = content_length.saturating_sub(held);
    if dev(&out_dir).is_some() && dev(&out_dir) == dev(store_root) {
        return check_space(&out_dir, content_length + to_fetch);
    }
    check_space(&out_dir, content_length)?;
    check_space(store_root, to_fetch)
}

/// Checks that `dir`'s filesystem has `bytes` plus [`DISK_RESERVE`] free.
pub fn check_space(dir: &Path, bytes: u64) -> Result<()> {
    let available =
        fs4::available_space(dir).map_err(|e| Error::io("cannot stat filesystem of", dir, e))?;
    let needed = bytes + DISK_RESERVE;
    if available < needed {
        return Err(Error::NoSpace {
            path: dir.to_path_buf(),
            needed,
            available,
        });
    }
    Ok(())
}

/// The destination being written, piece by piece as pieces land, while the downloader hashes its
/// contiguous prefix. It is an unnamed file in the destination's directory (`O_TMPFILE`: a crash
/// leaves nothing behind) linked into place by [`Output::commit`] only once whole, verified and
/// synced; on filesystems without `O_TMPFILE`, a hidden temporary name removed on failure.
pub struct Output {
    dest: PathBuf,
    dir: PathBuf,
    file: Arc<File>,
    named: Option<PathBuf>,
    /// `file` is the store's data file, linked into place at commit.
    shared: bool,
    hasher: Sha256,
    hashed: u64,
    committed: bool,
}

/// A cloneable handle for writing pieces into an [`Output`] from other tasks.
#[derive(Clone, Debug)]
pub struct OutputWriter(Arc<File>);

impl OutputWriter {
    /// Writes `data` at `offset`.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.write_all_at(data, offset)
    }
}

fn temp_name(dir: &Path, dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    dir.join(format!(
        ".{name}.damselfly-{}-{:08x}.tmp",
        std::process::id(),
        rand::random::<u32>()
    ))
}

impl Output {
    /// Starts writing `dest` (whose directory must exist).
    pub fn create(dest: &Path) -> Result<Self> {
        let dir = output_dir(dest)?;
        let unnamed = OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o644)
            .custom_flags(libc::O_TMPFILE)
            .open(&dir);
        let (file, named) = match unnamed {
            Ok(f) => (f, None),
            Err(_) => {
                let tmp = temp_name(&dir, dest);
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .open(&tmp)
                    .map_err(|e| Error::io("cannot create", &tmp, e))?;
                (f, Some(tmp))
            }
        };
        Ok(Self {
            dest: dest.to_path_buf(),
            dir,
            file: Arc::new(file),
            named,
            shared: false,
            hasher: Sha256::new(),
            hashed: 0,
            committed: false,
        })
    }

    /// Starts writing `dest` for the content `store` receives: as a second name of the store's
    /// data file when `dest`'s directory can link to it (nothing to write but the store), else as
    /// a file of its own ([`Output::create`]).
    pub fn create_for(dest: &Path, store: &TaskStore) -> Result<Self> {
        let dir = output_dir(dest)?;
        let Ok(data) = store.data_file() else {
            return Self::create(dest);
        };
        let probe = temp_name(&dir, dest);
        if link_fd(&data, &probe).is_err() {
            return Self::create(dest);
        }
        let _ = std::fs::remove_file(&probe);
        Ok(Self {
            dest: dest.to_path_buf(),
            dir,
            file: Arc::new(data),
            named: None,
            shared: true,
            hasher: Sha256::new(),
            hashed: 0,
            committed: false,
        })
    }

    /// A handle for writing pieces; none when the destination is the store's own file.
    pub fn writer(&self) -> Option<OutputWriter> {
        (!self.shared).then(|| OutputWriter(self.file.clone()))
    }

    /// Hashes the bytes from where hashing stopped up to `upto`, which must be fully written.
    pub fn hash_upto(&mut self, upto: u64) -> Result<()> {
        let mut buf = vec![0u8; 1 << 20];
        while self.hashed < upto {
            let n = ((upto - self.hashed) as usize).min(buf.len());
            self.file
                .read_exact_at(&mut buf[..n], self.hashed)
                .map_err(|e| Error::io("cannot read back", &self.dest, e))?;
            self.hasher.update(&buf[..n]);
            self.hashed += n as u64;
        }
        Ok(())
    }

    /// Finishes: checks the length, verifies the whole against `expected_hex` when given, syncs, and
    /// puts the file at its destination. Returns the content's `sha256:<hex>`: without an
    /// expected digest, `vouched_hex` when given (the seed's digest of content whose every piece
    /// was verified on arrival) instead of hashing the whole again.
    pub fn commit(
        mut self,
        len: u64,
        expected_hex: Option<&str>,
        vouched_hex: Option<&str>,
    ) -> Result<String> {
        let size = self
            .file
            .metadata()
            .map_err(|e| Error::io("cannot stat", &self.dest, e))?
            .len();
        if size != len {
            return Err(Error::Download(format!(
                "output holds {size} of {len} bytes"
            )));
        }
        let actual = match (expected_hex, vouched_hex) {
            (None, Some(v)) => v.to_ascii_lowercase(),
            _ => {
                self.hash_upto(len)?;
                hex::encode(std::mem::take(&mut self.hasher).finalize())
            }
        };
        if let Some(exp) = expected_hex.filter(|e| *e != actual) {
            return Err(Error::DigestMismatch {
                expected: format!("sha256:{exp}"),
                actual: format!("sha256:{actual}"),
            });
        }
        self.file
            .sync_all()
            .map_err(|e| Error::io("cannot sync", &self.dest, e))?;
        if self.shared {
            // The store made the file private; the destination gets what a new file would.
            let mode = 0o644 & !umask();
            rustix::fs::fchmod(&*self.file, rustix::fs::Mode::from_raw_mode(mode))
                .map_err(|e| Error::io("cannot set the mode of", &self.dest, e.into()))?;
            if same_file(&self.file, &self.dest) {
                // Already delivered here (rename would keep both names).
                self.committed = true;
                return Ok(format!("sha256:{actual}"));
            }
        }
        let named = match self.named.take() {
            Some(n) => n,
            None => {
                // Give the file a temporary name, then move it over the destination.
                let tmp = temp_name(&self.dir, &self.dest);
                link_fd(&self.file, &tmp)
                    .map_err(|e| Error::io("cannot link output as", &tmp, e.into()))?;
                tmp
            }
        };
        if let Err(e) = std::fs::rename(&named, &self.dest) {
            let _ = std::fs::remove_file(&named);
            return Err(Error::io("cannot rename into", &self.dest, e));
        }
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        self.committed = true;
        Ok(format!("sha256:{actual}"))
    }
}

/// Gives the open `file` the name `to` (in the same filesystem).
fn link_fd(file: &File, to: &Path) -> rustix::io::Result<()> {
    let fd_path = format!("/proc/self/fd/{}", file.as_raw_fd());
    rustix::fs::linkat(
        rustix::fs::CWD,
        fd_path.as_str(),
        rustix::fs::CWD,
        to,
        rustix::fs::AtFlags::SYMLINK_FOLLOW,
    )
}

/// True when `path` names the open `file`.
fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// The process's umask (Linux reports it in `/proc/self/status`); 022 when it cannot be read.
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

impl Drop for Output {
    fn drop(&mut self) {
        if !self.committed
            && let Some(n) = &self.named
        {
            let _ = std::fs::remove_file(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_appears_whole_and_verified_or_not_at_all() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("out");
        let good = crate::piece::sha256_hex(b"hello world");
        // Pieces land out of order; hashing follows the contiguous prefix.
        let mut out = Output::create(&dest).expect("create");
        out.writer()
            .expect("own file")
            .write_at(6, b"world")
            .expect("write");
        out.writer()
            .expect("own file")
            .write_at(0, b"hello ")
            .expect("write");
        out.hash_upto(6).expect("hash");
        assert!(!dest.exists(), "nothing at the destination before commit");
        assert_eq!(
            out.commit(11, Some(&good), None).expect("commit"),
            format!("sha256:{good}")
        );
        assert_eq!(std::fs::read(&dest).expect("read"), b"hello world");

        let bad = dir.path().join("bad");
        let out = Output::create(&bad).expect("create");
        out.writer()
            .expect("own file")
            .write_at(0, b"hello world")
            .expect("write");
        let err = out
            .commit(11, Some(&"0".repeat(64)), None)
            .expect_err("mismatch");
        assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
        let vouched = Output::create(&bad).expect("create");
        vouched
            .writer()
            .expect("own file")
            .write_at(0, b"hello world")
            .expect("write");
        assert_eq!(
            vouched.commit(11, None, Some(&good)).expect("commit"),
            format!("sha256:{good}"),
            "pieces verified on arrival: the seed's digest stands for the whole"
        );
        std::fs::remove_file(&bad).expect("rm");
        let short = Output::create(&bad).expect("create");
        short
            .writer()
            .expect("own file")
            .write_at(0, b"hello")
            .expect("write");
        assert!(short.commit(11, None, None).is_err());
        assert!(!bad.exists());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("out")],
            "no temporary file left"
        );
    }

    #[tokio::test]
    async fn on_one_filesystem_the_output_is_the_stores_file_and_survives_it() {
        use crate::piece::PieceCutter;
        use crate::piece_store::{Store, TaskMeta};
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path().join("store")).expect("store");
        let content: Vec<u8> = (0..3000u32).map(|i| (i * 13) as u8).collect();
        let meta = TaskMeta {
            version_id: "a".repeat(64),
            task_id: "b".repeat(64),
            url: "http://h/x".into(),
            content_length: 3000,
            piece_size: 1024,
            etag: String::new(),
            last_modified: String::new(),
            digest: None,
        };
        let task = store.open_task(&meta).await.expect("open");
        let dest = dir.path().join("out");
        let mut out = Output::create_for(&dest, &task).expect("create");
        assert!(out.writer().is_none(), "nothing to write but the store");
        let mut cutter = PieceCutter::new(1024);
        let mut pieces = cutter.push(&content);
        pieces.extend(cutter.finish().0);
        for (m, b) in &pieces {
            task.write_piece(m, b).expect("write");
        }
        out.hash_upto(2048).expect("hash");
        let want = crate::piece::sha256_hex(&content);
        out.commit(3000, Some(&want), None).expect("commit");
        let (a, b) = (
            std::fs::metadata(&dest).expect("stat"),
            std::fs::metadata(task.data_path()).expect("stat"),
        );
        assert_eq!(
            (a.dev(), a.ino()),
            (b.dev(), b.ino()),
            "one file, two names"
        );
        assert_eq!(a.mode() & 0o777, 0o644 & !umask());
        // Delivering again to the same place leaves one name there and no temporary file.
        Output::create_for(&dest, &task)
            .expect("create")
            .commit(3000, Some(&want), None)
            .expect("again");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 2, "store and out only: {names:?}");
        // Content the store discards is not taken from the delivered file.
        task.discard().expect("discard");
        assert_eq!(std::fs::read(&dest).expect("read"), content);
        drop(task);
        // A reopened store whose shared file was changed starts over without writing into it.
        let task = store.open_task(&meta).await.expect("reopen");
        task.write_piece(&pieces[0].0, &pieces[0].1).expect("write");
        let out = Output::create_for(&dest, &task).expect("create");
        for (m, b) in &pieces[1..] {
            task.write_piece(m, b).expect("write");
        }
        out.commit(3000, Some(&want), None).expect("commit");
        drop(task);
        let mut changed = std::fs::OpenOptions::new()
            .append(true)
            .open(&dest)
            .expect("open");
        std::io::Write::write_all(&mut changed, b"mine").expect("append");
        let task = store.open_task(&meta).await.expect("reopen");
        assert!(
            task.have().is_empty(),
            "a changed copy is not the task's content"
        );
        task.write_piece(&pieces[0].0, &pieces[0].1).expect("write");
        let mut mine = content.clone();
        mine.extend_from_slice(b"mine");
        assert_eq!(
            std::fs::read(&dest).expect("read"),
            mine,
            "the user's file untouched"
        );
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
