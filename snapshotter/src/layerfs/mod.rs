//! A layer as a read-only FUSE filesystem (`fuser`): the tree comes from the layer's index, and a
//! file read becomes a range of the uncompressed tar stream, a compressed range of the blob
//! ([`BlobReader`]), and an inflate from the nearest checkpoint. A read that cannot be served
//! (missing or damaged data) is `EIO`, never wrong bytes; the error is logged with the layer.
//! A file whose bytes are all local can be opened in FUSE passthrough mode ([`passthrough`]): the
//! kernel then reads a local copy itself.

mod blob;
pub mod cache;
pub mod passthrough;
pub mod tree;

use std::ffi::OsStr;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, LockOwner,
    MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyXattr, Request, SessionACL,
};
use layerindex::{Kind, LayerIndex};

pub(crate) use blob::AGENT_READ_MAX;
use blob::BlobStream;
pub use blob::{AgentBlob, BlobReader, Credentials, FileBlob};
use cache::{ChunkCache, DiskChunks};
use passthrough::{Opened, Passthrough};
use tree::{Node, Tree};

/// The layer is immutable: the kernel may cache attributes and entries for long.
const TTL: Duration = Duration::from_secs(3600);

pub struct LayerFs {
    name: Arc<str>,
    tree: Tree,
    index: Arc<LayerIndex>,
    blob: Arc<dyn BlobReader>,
    metrics: crate::metrics::Metrics,
    chunks: Arc<ChunkCache>,
    disk: Option<DiskChunks>,
    /// Held while a zstd layer is decompressed whole (one at a time).
    whole: std::sync::Mutex<()>,
    /// Opens of files whose bytes are all local, handed to the kernel (off unless asked for).
    passthrough: Passthrough,
    /// Where the chunks reads touch are noted, while the layer's start is recorded.
    start: Option<Arc<crate::start::StartRecord>>,
    /// Opens are answered ENOSYS, so that the kernel stops sending them (and their releases):
    /// without passthrough an open carries nothing, and a small file read warm then costs no
    /// round trip at all. Set at init.
    no_open: bool,
}

/// Memory for inflated chunks of a layer that was given no shared cache.
const OWN_CACHE_BYTES: usize = 32 << 20;
/// A chunk longer than this is never inflated into memory: the layer is decompressed whole into
/// its chunk file instead, in bounded memory, after a free-space check (a gzip layer of one
/// deflate block is one chunk: the whole layer).
pub const MAX_MEMORY_CHUNK: u64 = 16 << 20;

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File | Kind::Hardlink => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Char => FileType::CharDevice,
        Kind::Block => FileType::BlockDevice,
        Kind::Fifo => FileType::NamedPipe,
    }
}

impl LayerFs {
    /// `name` identifies the layer in logs (its digest).
    pub fn new(
        name: impl Into<String>,
        index: Arc<LayerIndex>,
        blob: Arc<dyn BlobReader>,
        metrics: crate::metrics::Metrics,
    ) -> Self {
        let tree = Tree::from_toc(&index.toc);
        let name: String = name.into();
        Self {
            name: Arc::from(name),
            tree,
            index,
            blob,
            metrics,
            chunks: Arc::new(ChunkCache::new(OWN_CACHE_BYTES)),
            disk: None,
            whole: std::sync::Mutex::new(()),
            passthrough: Passthrough::new(false),
            start: None,
            no_open: false,
        }
    }

    /// Notes the chunks reads touch in `record` (this host records the layer's start).
    pub fn with_start_record(mut self, record: Option<Arc<crate::start::StartRecord>>) -> Self {
        self.start = record;
        self
    }

    /// Opens files whose bytes are all in the chunk file in FUSE passthrough mode, where the
    /// kernel allows it ([`passthrough`]).
    pub fn with_passthrough(mut self, on: bool) -> Self {
        self.passthrough = Passthrough::new(on);
        self
    }

    /// The chunk file, its directory and the range of `n`'s bytes in it, when all of them are
    /// there and `n` is worth passing through.
    fn local_bytes(&self, n: &Node) -> Option<(&std::fs::File, &Path, Range<u64>)> {
        if !self.passthrough.wanted() || n.kind != Kind::File || n.size < passthrough::MIN_BYTES {
            return None;
        }
        let d = self.disk.as_ref()?;
        let range = n.offset..n.offset + n.size;
        if !d.has_whole() {
            if self.index.compression == layerindex::Compression::Zstd {
                return None;
            }
            let mut at = range.start;
            while at < range.end {
                let c = self.index.chunk_of(at);
                if c.end <= at || !d.has(c.start) {
                    return None;
                }
                at = c.end;
            }
        }
        Some((d.file(), d.dir(), range))
    }

    /// A zstd layer cannot be entered mid-frame, and a gzip chunk past [`MAX_MEMORY_CHUNK`] is
    /// not held in memory: the whole blob is streamed and decompressed into the chunk file once
    /// (if the filesystem has room for it), then served from there.
    fn ensure_whole(&self) -> Result<(), String> {
        let Some(d) = &self.disk else {
            return Err(
                "this layer is served from a local decompressed copy, and this mount keeps none"
                    .into(),
            );
        };
        if d.has_whole() {
            return Ok(());
        }
        let _one = self
            .whole
            .lock()
            .map_err(|_| "decompression lock poisoned")?;
        if d.has_whole() {
            return Ok(());
        }
        fetcher::output::check_space(d.dir(), self.index.uncompressed_size)
            .map_err(|e| format!("decompressing the layer whole: {e}"))?;
        let started = std::time::Instant::now();
        let mut out = d.writer().map_err(|e| format!("chunk file: {e}"))?;
        let stream = BlobStream {
            blob: self.blob.as_ref(),
            pos: 0,
            len: self.index.compressed_size,
        };
        let n = self
            .index
            .decompress_all(stream, &mut out)
            .map_err(|e| format!("decompressing the layer whole: {e}"))?;
        d.mark_whole();
        self.metrics
            .fetched_bytes
            .inc_by(self.index.compressed_size);
        self.metrics
            .chunk_reads
            .with_label_values(&["inflate"])
            .inc();
        tracing::info!(layer = %self.name, bytes = n, ms = started.elapsed().as_millis() as u64, "layer decompressed whole into its chunk file");
        Ok(())
    }

    /// Shares `chunks` with other layers, and keeps inflated chunks in the file `disk`.
    pub fn with_cache(
        mut self,
        chunks: Arc<ChunkCache>,
        disk: Option<&Path>,
    ) -> std::io::Result<Self> {
        self.chunks = chunks;
        self.disk = disk.map(DiskChunks::create).transpose()?;
        Ok(self)
    }

    /// The uncompressed chunk `c` of the layer: from memory, else fetched and inflated (and kept).
    fn chunk(&self, c: &Range<u64>) -> Result<Arc<Vec<u8>>, String> {
        if let Some(data) = self.chunks.get(&self.name, c.start) {
            self.metrics
                .chunk_reads
                .with_label_values(&["memory"])
                .inc();
            return Ok(data);
        }
        let plan = self
            .index
            .plan(c.start, c.end - c.start)
            .map_err(|e| e.to_string())?;
        let compressed = self
            .blob
            .read_at(plan.compressed.clone())
            .map_err(|e| format!("fetching blob bytes {:?}: {e}", plan.compressed))?;
        self.metrics.fetched_bytes.inc_by(compressed.len() as u64);
        let len = usize::try_from(c.end - c.start).map_err(|e| e.to_string())?;
        let data = Arc::new(
            self.index
                .read(&plan, &compressed, c.start, len)
                .map_err(|e| e.to_string())?,
        );
        self.metrics
            .chunk_reads
            .with_label_values(&["inflate"])
            .inc();
        if let Some(d) = &self.disk {
            d.write(c.start, &data);
        }
        self.chunks.put(&self.name, c.start, data.clone());
        Ok(data)
    }

    fn attr(&self, ino: u64, n: &Node) -> FileAttr {
        let t = UNIX_EPOCH + Duration::from_secs(n.mtime);
        let size = match n.kind {
            Kind::Symlink => n.link.as_ref().map_or(0, |l| l.len() as u64),
            _ => n.size,
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind: file_type(n.kind),
            perm: u16::try_from(n.mode & 0o7777).unwrap_or(0o755),
            nlink: n.nlink,
            uid: n.uid,
            gid: n.gid,
            rdev: n.rdev,
            blksize: 4096,
            flags: 0,
        }
    }

    /// File bytes `[offset, offset + size)` (clamped to the file), chunk by chunk.
    fn read_file(&self, n: &Node, offset: u64, size: u32) -> Result<Vec<u8>, String> {
        if offset >= n.size {
            return Ok(Vec::new());
        }
        let len = u64::from(size).min(n.size - offset);
        let (start, end) = (n.offset + offset, n.offset + offset + len);
        if self.index.compression == layerindex::Compression::Zstd {
            self.ensure_whole()?;
        }
        let mut out = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        let mut at = start;
        while at < end {
            let c = self.index.chunk_of(at);
            if c.end <= at {
                return Err(format!("index has no chunk at {at}"));
            }
            if let Some(r) = &self.start {
                r.note(c.start);
            }
            let upto = end.min(c.end);
            let want = usize::try_from(upto - at).map_err(|e| e.to_string())?;
            if c.end - c.start > MAX_MEMORY_CHUNK {
                self.ensure_whole()?;
            }
            match &self.disk {
                Some(d) if d.has(c.start) => {
                    let data = d
                        .read(at, want)
                        .map_err(|e| format!("reading the chunk cache: {e}"))?;
                    self.metrics.chunk_reads.with_label_values(&["disk"]).inc();
                    out.extend_from_slice(&data);
                }
                _ => {
                    let data = self.chunk(&c)?;
                    let from = usize::try_from(at - c.start).map_err(|e| e.to_string())?;
                    let part = data
                        .get(from..from + want)
                        .ok_or_else(|| format!("chunk {c:?} is short"))?;
                    out.extend_from_slice(part);
                }
            }
            at = upto;
        }
        Ok(out)
    }
}

impl fuser::Filesystem for LayerFs {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        self.passthrough.negotiate(config, &self.name);
        // Without passthrough, files need no handle: where the kernel can do without opens it
        // keeps their pages as FOPEN_KEEP_CACHE would (and a write open never gets past the
        // read-only mount).
        self.no_open = !self.passthrough.wanted()
            && config
                .capabilities()
                .contains(fuser::InitFlags::FUSE_NO_OPEN_SUPPORT);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let child = self
            .tree
            .get(parent.0)
            .and_then(|p| name.to_str().and_then(|n| p.children.get(n)))
            .copied();
        match child.and_then(|c| self.tree.get(c).map(|n| (c, n))) {
            Some((ino, n)) => reply.entry(&TTL, &self.attr(ino, n), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.tree.get(ino.0) {
            Some(n) => reply.attr(&TTL, &self.attr(ino.0, n)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.tree.get(ino.0).and_then(|n| n.link.as_ref()) {
            Some(l)
                if self
                    .tree
                    .get(ino.0)
                    .is_some_and(|n| n.kind == Kind::Symlink) =>
            {
                reply.data(l.as_bytes());
            }
            _ => reply.error(Errno::EINVAL),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc_write_mask() != 0 {
            return reply.error(Errno::EROFS);
        }
        match self.tree.get(ino.0) {
            Some(n) if self.no_open && n.kind != Kind::Dir => reply.error(Errno::ENOSYS),
            Some(n) if n.kind != Kind::Dir => {
                match self
                    .passthrough
                    .open(ino.0, self.local_bytes(n), reply, &self.name)
                {
                    Opened::Passthrough => self.metrics.passthrough_opens.inc(),
                    Opened::Cached(reply) => {
                        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
                    }
                }
            }
            Some(_) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(n) = self.tree.get(ino.0).filter(|n| n.kind == Kind::File) else {
            return reply.error(Errno::EINVAL);
        };
        let timer = self.metrics.read_seconds.start_timer();
        match self.read_file(n, offset, size) {
            Ok(data) => {
                self.metrics.fuse_read_bytes.inc_by(data.len() as u64);
                reply.data(&data);
            }
            Err(e) => {
                self.metrics.read_errors.inc();
                tracing::error!(layer = %self.name, ino = ino.0, offset, size, error = %e, "layer read failed");
                reply.error(Errno::EIO);
            }
        }
        timer.observe_duration();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: fuser::ReplyEmpty,
    ) {
        self.passthrough.release(ino.0, fh);
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: fuser::ReplyEmpty,
    ) {
        // Nothing to flush on a read-only layer: ENOSYS makes the kernel stop sending flushes,
        // a round trip less per close.
        reply.error(Errno::ENOSYS);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(dir) = self.tree.get(ino.0).filter(|n| n.kind == Kind::Dir) else {
            return reply.error(Errno::ENOTDIR);
        };
        let dots = [
            (ino.0, FileType::Directory, "."),
            (dir.parent, FileType::Directory, ".."),
        ];
        let children = dir.children.iter().filter_map(|(name, c)| {
            self.tree
                .get(*c)
                .map(|n| (*c, file_type(n.kind), name.as_str()))
        });
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (child, kind, name)) in dots.into_iter().chain(children).enumerate().skip(skip) {
            if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let value = self
            .tree
            .get(ino.0)
            .and_then(|n| name.to_str().and_then(|k| n.xattrs.get(k)));
        match value {
            None => reply.error(Errno::NO_XATTR),
            Some(v) if size == 0 => reply.size(u32::try_from(v.len()).unwrap_or(u32::MAX)),
            Some(v) if v.len() <= size as usize => reply.data(v),
            Some(_) => reply.error(Errno::ERANGE),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let Some(n) = self.tree.get(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let mut names = Vec::new();
        for k in n.xattrs.keys() {
            names.extend_from_slice(k.as_bytes());
            names.push(0);
        }
        if size == 0 {
            reply.size(u32::try_from(names.len()).unwrap_or(u32::MAX));
        } else if names.len() <= size as usize {
            reply.data(&names);
        } else {
            reply.error(Errno::ERANGE);
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.index.uncompressed_size.div_ceil(4096);
        reply.statfs(blocks, 0, 0, self.tree.len() as u64, 0, 4096, 255, 4096);
    }
}

/// Open flags that ask for writing (`O_WRONLY | O_RDWR | O_TRUNC | O_APPEND | O_CREAT`).
fn libc_write_mask() -> i32 {
    0o1 | 0o2 | 0o1000 | 0o2000 | 0o100
}

/// Mounts `fs` read-only at `mountpoint`; unmounted when the returned session is dropped.
pub fn mount(fs: LayerFs, mountpoint: &Path) -> std::io::Result<fuser::BackgroundSession> {
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::RO,
        MountOption::FSName(format!("damselfly:{}", fs.name)),
        MountOption::Subtype("damselfly".into()),
        MountOption::DefaultPermissions,
    ];
    cfg.acl = SessionACL::All;
    cfg.n_threads = Some(4);
    fuser::spawn_mount(fs, mountpoint, &cfg)
}

/// Unmounts a layer mounted by [`mount`] and waits for its FUSE threads. When the kernel tears
/// the connection down on unmount, the threads may see ECONNABORTED instead of ENODEV: that is a
/// clean end too, not a failure to unmount.
pub fn unmount(session: fuser::BackgroundSession) -> std::io::Result<()> {
    match session.umount_and_join() {
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::CONNABORTED.raw_os_error()) => Ok(()),
        r => r,
    }
}
