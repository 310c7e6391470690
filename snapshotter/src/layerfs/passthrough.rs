//! FUSE passthrough for lazy-layer files whose bytes are all local: the open hands the kernel a
//! backing file (`FUSE_DEV_IOC_BACKING_OPEN`, Linux ≥ 6.9, through fuser's `open_backing`) and
//! the kernel reads it itself, at native speed, with no FUSE round trip per read.
//!
//! The kernel reads a backing file at the offsets of the file it stands for, while the chunk file
//! keeps the layer's tar stream (a file's bytes sit at its tar offset). So the first passthrough
//! open of a file copies its bytes out of the chunk file (`copy_file_range`, in the kernel) into an
//! unnamed file (`O_TMPFILE`) next to it: nothing is left on disk if the process dies, and the
//! copy is freed with the mount. The bytes are the ones plain reads would return (verified blob
//! bytes, inflated through the index).
//!
//! The kernel refuses (EIO to the caller's `open`) an inode open in both modes at once, so an inode
//! is opened one way while any handle of it is open: passthrough only when no cached handle is
//! open, and then every open until the last handle is released.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use fuser::{BackingId, FileHandle, FopenFlags, ReplyOpen};

/// Smaller files gain little (one read round trip) and would cost a copy each.
pub const MIN_BYTES: u64 = 64 << 10;

/// What one open costs a mount that needs opens (a FUSE round trip; a mount without passthrough
/// needs none, see `LayerFs::no_open`), and what each MiB read passed through saves against
/// FUSE reads, in µs, as measured here (`tests/bench/lazy.sh`: 1,000 4 KiB files read warm
/// take 67 µs each with opens, 20 µs without; 200 MiB read through FUSE 0.124 s, passed through
/// 0.083 s).
const OPEN_COST_US: u64 = 45;
const SAVED_PER_MIB_US: u64 = 200;

/// Whether a layer is better mounted with passthrough (every open a round trip; big files read
/// at native speed) than without opens at all (small files read warm at native speed, big ones
/// through FUSE): when, each file read once, the MiB in files worth passing through save more
/// than the opens of the others cost.
pub fn worth_it(toc: &layerindex::Toc) -> bool {
    let (mut big_mib, mut small) = (0u64, 0u64);
    for e in toc
        .entries
        .iter()
        .filter(|e| e.kind == layerindex::Kind::File)
    {
        if e.size >= MIN_BYTES {
            big_mib += e.size >> 20;
        } else {
            small += 1;
        }
    }
    big_mib.saturating_mul(SAVED_PER_MIB_US) >= small.saturating_mul(OPEN_COST_US)
}

/// The file handle of a passthrough open (a cached open is `0`).
pub const PASSTHROUGH_FH: FileHandle = FileHandle(1);

/// Per-inode open state of one mount.
#[derive(Default)]
struct InodeIo {
    /// Open handles served by FUSE reads.
    cached: u32,
    /// Open passthrough handles, and the backing they share.
    passthrough: u32,
    backing: Option<BackingId>,
    /// The file's bytes, copied out of the chunk file (kept for the mount's lifetime, so that a
    /// file opened again is not copied again).
    copy: Option<File>,
}

/// Passthrough state of one mount.
pub struct Passthrough {
    /// Asked for (configuration), and then granted by the kernel at init.
    enabled: AtomicBool,
    inodes: Mutex<HashMap<u64, InodeIo>>,
}

/// What [`Passthrough::open`] did with the reply.
pub enum Opened {
    Passthrough,
    /// Not passed through: answer it as a cached open (its handle is already counted).
    Cached(ReplyOpen),
}

impl Passthrough {
    pub fn new(wanted: bool) -> Self {
        Self {
            enabled: AtomicBool::new(wanted),
            inodes: Mutex::new(HashMap::new()),
        }
    }

    pub fn wanted(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Asks the kernel for passthrough at init; turned off where it is refused.
    pub fn negotiate(&self, config: &mut fuser::KernelConfig, layer: &str) {
        if !self.wanted() {
            return;
        }
        let granted = config
            .add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH)
            .is_ok()
            // 1: backing files on a plain filesystem, and this mount usable as an overlayfs lower.
            && config.set_max_stack_depth(1).is_ok();
        if !granted {
            tracing::info!(
                layer,
                "the kernel offers no FUSE passthrough: every read goes through FUSE"
            );
            self.enabled.store(false, Ordering::Relaxed);
        }
    }

    /// Opens `ino` in passthrough mode if it can be (`local`: the chunk file, the directory for
    /// the copy, and the file's `range` in the chunk file, given only when all of it is there),
    /// else counts a cached open and hands the reply back.
    pub fn open(
        &self,
        ino: u64,
        local: Option<(&File, &Path, Range<u64>)>,
        reply: ReplyOpen,
        layer: &str,
    ) -> Opened {
        let Ok(mut inodes) = self.inodes.lock() else {
            return Opened::Cached(reply);
        };
        let io = inodes.entry(ino).or_default();
        let Some((chunks, dir, range)) = local.filter(|_| io.copy.is_none() && io.cached == 0)
        else {
            return self.attach(io, reply, layer);
        };
        drop(inodes);
        // The copy runs without the lock (at disk speed); a cached open meanwhile wins.
        let copied = copy_out(chunks, dir, range);
        let Ok(mut inodes) = self.inodes.lock() else {
            return Opened::Cached(reply);
        };
        let io = inodes.entry(ino).or_default();
        match copied {
            Ok(f) if io.copy.is_none() => io.copy = Some(f),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(layer, ino, error = %e, "cannot copy a local file out for passthrough; it is read through FUSE")
            }
        }
        self.attach(io, reply, layer)
    }

    /// Answers an open of `io` with its backing if it has (or can register) one and no cached
    /// handle is open.
    fn attach(&self, io: &mut InodeIo, reply: ReplyOpen, layer: &str) -> Opened {
        // An inode with passthrough handles open stays passed through, even if passthrough was
        // turned off meanwhile (a cached open now would be EIO).
        if let (true, Some(id)) = (io.passthrough > 0, &io.backing) {
            io.passthrough += 1;
            reply.opened_passthrough(PASSTHROUGH_FH, FopenFlags::empty(), id);
            return Opened::Passthrough;
        }
        if !self.wanted() || io.cached > 0 {
            io.cached += 1;
            return Opened::Cached(reply);
        }
        if io.backing.is_none() {
            let Some(copy) = &io.copy else {
                io.cached += 1;
                return Opened::Cached(reply);
            };
            match reply.open_backing(copy) {
                Ok(id) => io.backing = Some(id),
                Err(e) => {
                    // EPERM (no CAP_SYS_ADMIN), ELOOP (backing on a stacked filesystem): no file
                    // of this mount will do better.
                    tracing::warn!(layer, error = %e, "the kernel refused a passthrough backing file; this layer is read through FUSE");
                    self.enabled.store(false, Ordering::Relaxed);
                    io.copy = None;
                    io.cached += 1;
                    return Opened::Cached(reply);
                }
            }
        }
        let Some(id) = &io.backing else {
            io.cached += 1;
            return Opened::Cached(reply);
        };
        io.passthrough += 1;
        reply.opened_passthrough(PASSTHROUGH_FH, FopenFlags::empty(), id);
        Opened::Passthrough
    }

    /// A handle `fh` of `ino` was released.
    pub fn release(&self, ino: u64, fh: FileHandle) {
        let Ok(mut inodes) = self.inodes.lock() else {
            return;
        };
        let Some(io) = inodes.get_mut(&ino) else {
            return;
        };
        if fh == PASSTHROUGH_FH {
            io.passthrough = io.passthrough.saturating_sub(1);
            if io.passthrough == 0 {
                io.backing = None;
            }
        } else {
            io.cached = io.cached.saturating_sub(1);
        }
        if io.cached == 0 && io.passthrough == 0 && io.copy.is_none() {
            inodes.remove(&ino);
        }
    }
}

/// Copies `range` of `chunks` into a new unnamed file in `dir`.
fn copy_out(chunks: &File, dir: &Path, range: Range<u64>) -> std::io::Result<File> {
    let out = tempfile::tempfile_in(dir)?;
    let (mut from, mut to) = (range.start, 0u64);
    while from < range.end {
        let want = usize::try_from(range.end - from)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        let n = rustix::fs::copy_file_range(chunks, Some(&mut from), &out, Some(&mut to), want)?;
        if n == 0 {
            return Err(std::io::Error::other(format!(
                "the chunk file ends at {from}, before {}",
                range.end
            )));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toc(sizes: &[u64]) -> layerindex::Toc {
        let entries = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| layerindex::Entry {
                path: format!("f{i}"),
                kind: layerindex::Kind::File,
                link: None,
                mode: 0o644,
                uid: 0,
                gid: 0,
                mtime: 0,
                size,
                offset: 0,
                devmajor: 0,
                devminor: 0,
                xattrs: Default::default(),
            })
            .collect();
        layerindex::Toc {
            entries,
            unsafe_entries: 0,
        }
    }

    #[test]
    fn big_files_get_passthrough_small_ones_no_opens() {
        assert!(worth_it(&toc(&[200 << 20])), "one big file");
        assert!(!worth_it(&toc(&[4096; 1000])), "only small files");
        // busybox (1.1 MiB) and a small file: passthrough.
        assert!(worth_it(&toc(&[1_150_000, 21])));
        // 10,000 small files beside 500 MiB: their opens cost more than passthrough saves.
        let mut mixed = vec![4096; 10_000];
        mixed.push(500 << 20);
        assert!(!worth_it(&toc(&mixed)));
        assert!(worth_it(&toc(&[])), "an empty layer: either way");
    }
}
