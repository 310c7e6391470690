//! The inode tree of one layer, built from its index's table of contents, in the form overlayfs
//! expects of a lower directory: `.wh.<name>` entries become whiteouts (character devices 0/0
//! named `<name>`), `.wh..wh..opq` marks its directory opaque (`trusted.overlay.opaque=y`), hard
//! links share an inode, later entries replace earlier ones, and missing parent directories are
//! implied (0755, root).

use std::collections::BTreeMap;

use layerindex::{Kind, Toc};

/// Inode numbers are indexes into the node table plus one; the root is 1.
pub const ROOT: u64 = 1;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    pub size: u64,
    /// Where a file's data starts in the uncompressed tar stream.
    pub offset: u64,
    pub link: Option<String>,
    pub rdev: u32,
    pub nlink: u32,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    pub children: BTreeMap<String, u64>,
    pub parent: u64,
}

impl Node {
    fn dir(parent: u64) -> Self {
        Self {
            kind: Kind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            size: 0,
            offset: 0,
            link: None,
            rdev: 0,
            nlink: 2,
            xattrs: BTreeMap::new(),
            children: BTreeMap::new(),
            parent,
        }
    }
}

#[derive(Debug, Default)]
pub struct Tree {
    nodes: Vec<Node>,
    /// Entries that could not be placed (a hard link to nothing, a child of a non-directory).
    pub skipped: u64,
}

/// `makedev` as Linux encodes it in `st_rdev` (32-bit form used by FUSE).
fn rdev(major: u32, minor: u32) -> u32 {
    ((major & 0xfff) << 8) | (minor & 0xff) | ((minor & !0xff) << 12)
}

fn id(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

impl Tree {
    pub fn from_toc(toc: &Toc) -> Self {
        let mut t = Tree {
            nodes: vec![Node::dir(ROOT)],
            skipped: 0,
        };
        for e in &toc.entries {
            let (dir_path, name) = match e.path.rsplit_once('/') {
                Some((d, n)) => (Some(d), n),
                None => (None, e.path.as_str()),
            };
            let Some(parent) = t.ensure_dir(dir_path) else {
                t.skipped += 1;
                continue;
            };
            if name == OPAQUE_MARKER {
                t.node_mut(parent)
                    .xattrs
                    .insert(OPAQUE_XATTR.into(), b"y".to_vec());
                continue;
            }
            if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
                let mut n = Node::dir(parent);
                n.kind = Kind::Char;
                n.mode = 0;
                n.nlink = 1;
                n.uid = id(e.uid);
                n.gid = id(e.gid);
                n.mtime = e.mtime;
                t.put(parent, hidden, n);
                continue;
            }
            if e.kind == Kind::Hardlink {
                match e.link.as_deref().and_then(|l| t.find(l)) {
                    Some(target) if t.node(target).kind != Kind::Dir => {
                        t.node_mut(target).nlink += 1;
                        t.node_mut(parent).children.insert(name.to_owned(), target);
                    }
                    _ => t.skipped += 1,
                }
                continue;
            }
            let existing_dir = t
                .node(parent)
                .children
                .get(name)
                .copied()
                .filter(|i| t.node(*i).kind == Kind::Dir);
            let mut n = Node::dir(parent);
            n.kind = e.kind;
            n.mode = e.mode & 0o7777;
            n.uid = id(e.uid);
            n.gid = id(e.gid);
            n.mtime = e.mtime;
            n.size = e.size;
            n.offset = e.offset;
            n.link = e.link.clone();
            n.rdev = rdev(e.devmajor, e.devminor);
            n.nlink = if e.kind == Kind::Dir { 2 } else { 1 };
            n.xattrs = e.xattrs.clone();
            match (e.kind, existing_dir) {
                // A directory entry for a directory that exists: new metadata, same children.
                (Kind::Dir, Some(ino)) => {
                    let old = t.node_mut(ino);
                    n.children = std::mem::take(&mut old.children);
                    *old = n;
                }
                _ => t.put(parent, name, n),
            }
        }
        // A directory's link count is 2 + its subdirectories, as on disk filesystems.
        let links: Vec<u32> = t
            .nodes
            .iter()
            .map(|n| {
                let subdirs = n
                    .children
                    .values()
                    .filter(|c| t.node(**c).kind == Kind::Dir)
                    .count();
                u32::try_from(subdirs).unwrap_or(u32::MAX).saturating_add(2)
            })
            .collect();
        for (n, l) in t.nodes.iter_mut().zip(links) {
            if n.kind == Kind::Dir {
                n.nlink = l;
            }
        }
        t
    }

    pub fn node(&self, ino: u64) -> &Node {
        &self.nodes[usize::try_from(ino - 1).unwrap_or(0)]
    }

    fn node_mut(&mut self, ino: u64) -> &mut Node {
        &mut self.nodes[usize::try_from(ino - 1).unwrap_or(0)]
    }

    pub fn get(&self, ino: u64) -> Option<&Node> {
        ino.checked_sub(1)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| self.nodes.get(i))
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    fn put(&mut self, parent: u64, name: &str, n: Node) {
        self.nodes.push(n);
        let ino = self.nodes.len() as u64;
        self.node_mut(parent).children.insert(name.to_owned(), ino);
    }

    /// The inode at `path` (relative, normalized), if any.
    pub fn find(&self, path: &str) -> Option<u64> {
        let mut ino = ROOT;
        for c in path.split('/').filter(|c| !c.is_empty()) {
            ino = *self.node(ino).children.get(c)?;
        }
        Some(ino)
    }

    /// The directory at `path`, created (with implied parents) if missing; `None` when a
    /// non-directory is in the way.
    fn ensure_dir(&mut self, path: Option<&str>) -> Option<u64> {
        let mut ino = ROOT;
        for c in path.unwrap_or("").split('/').filter(|c| !c.is_empty()) {
            ino = match self.node(ino).children.get(c).copied() {
                Some(child) if self.node(child).kind == Kind::Dir => child,
                Some(_) => return None,
                None => {
                    self.put(ino, c, Node::dir(ino));
                    self.nodes.len() as u64
                }
            };
        }
        Some(ino)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use layerindex::Entry;

    fn e(path: &str, kind: Kind) -> Entry {
        Entry {
            path: path.into(),
            kind,
            link: None,
            mode: 0o640,
            uid: 1,
            gid: 2,
            mtime: 3,
            size: 0,
            offset: 0,
            devmajor: 0,
            devminor: 0,
            xattrs: BTreeMap::new(),
        }
    }

    #[test]
    fn whiteouts_opaque_dirs_hardlinks_and_implied_parents() {
        let mut hard = e("b/hard", Kind::Hardlink);
        hard.link = Some("a/file".into());
        let mut file2 = e("a/file", Kind::File);
        file2.size = 5;
        let toc = Toc {
            entries: vec![
                e("a/file", Kind::File),
                file2,
                hard,
                e("a/.wh.gone", Kind::File),
                e("c/.wh..wh..opq", Kind::File),
                e("a", Kind::Dir),
                e("a/file/inside", Kind::File),
            ],
            unsafe_entries: 0,
        };
        let t = Tree::from_toc(&toc);
        let a = t.find("a").expect("a");
        assert_eq!(t.node(a).mode, 0o640, "the later dir entry's metadata");
        let f = t.find("a/file").expect("file");
        assert_eq!(t.node(f).size, 5, "the later entry wins");
        assert_eq!(t.find("b/hard"), Some(f));
        assert_eq!(t.node(f).nlink, 2);
        let w = t.find("a/gone").expect("whiteout");
        assert_eq!((t.node(w).kind, t.node(w).rdev), (Kind::Char, 0));
        assert!(t.find("a/.wh.gone").is_none());
        let c = t.find("c").expect("c");
        assert_eq!(
            t.node(c).xattrs.get(OPAQUE_XATTR).map(Vec::as_slice),
            Some(b"y".as_slice())
        );
        assert!(t.node(c).children.is_empty());
        assert_eq!(t.skipped, 1, "a child of a file is skipped");
        assert_eq!(t.node(t.find("b").expect("b")).mode, 0o755);
    }
}
