//! The table of contents of a layer's tar stream: every entry with its metadata and where its data
//! starts in the *uncompressed* stream, so a file read becomes an uncompressed range. Long names
//! (GNU and PAX), PAX xattrs (`SCHILY.xattr.*`) and all entry types are kept. Paths are
//! normalized (no leading `/` or `./`); an entry whose path climbs out of the layer (`..`) is left
//! out and counted, never followed.

use std::collections::BTreeMap;
use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// A hard link to the earlier entry named by `link`.
    Hardlink,
    Char,
    Block,
    Fifo,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: String,
    pub kind: Kind,
    /// Symlink target (as written) or hard-link target path (normalized).
    pub link: Option<String>,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    /// File data length.
    pub size: u64,
    /// Where the data starts in the uncompressed tar stream.
    pub offset: u64,
    pub devmajor: u32,
    pub devminor: u32,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Toc {
    pub entries: Vec<Entry>,
    /// Entries left out because their path or link target escapes the layer.
    pub unsafe_entries: u64,
}

/// `a/./b/` → `a/b`; `None` for a path with a `..` component or nothing left.
pub fn normalize(path: &str) -> Option<String> {
    let mut parts = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => parts.push(c),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Bytes of names, link targets and xattrs one TOC may hold (the index is built in memory).
pub const MAX_NAME_BYTES: u64 = 256 << 20;

/// Reads a whole tar stream from `r` and lists its entries, within [`crate::tar_guard::Limits`]
/// and [`MAX_NAME_BYTES`] (a layer over them gets no index; it is still pulled normally).
pub fn build(r: impl Read) -> Result<Toc> {
    let guarded = crate::tar_guard::TarGuard::new(r, crate::tar_guard::Limits::default());
    let mut archive = tar::Archive::new(guarded);
    let mut toc = Toc::default();
    let mut name_bytes: u64 = 0;
    let entries = archive.entries().map_err(tar_error)?;
    for entry in entries {
        let mut entry = entry.map_err(tar_error)?;
        let h = entry.header();
        let kind = match h.entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => Kind::File,
            tar::EntryType::Directory => Kind::Dir,
            tar::EntryType::Symlink => Kind::Symlink,
            tar::EntryType::Link => Kind::Hardlink,
            tar::EntryType::Char => Kind::Char,
            tar::EntryType::Block => Kind::Block,
            tar::EntryType::Fifo => Kind::Fifo,
            // Metadata entries (PAX, GNU long names) are folded into the next entry by `tar`;
            // anything else (sparse, volume labels) is not part of an OCI layer.
            _ => continue,
        };
        let mode = h.mode().map_err(tar_error)?;
        let uid = h.uid().map_err(tar_error)?;
        let gid = h.gid().map_err(tar_error)?;
        let mtime = h.mtime().map_err(tar_error)?;
        let devmajor = h.device_major().ok().flatten().unwrap_or(0);
        let devminor = h.device_minor().ok().flatten().unwrap_or(0);
        let raw_path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let link_raw = entry
            .link_name_bytes()
            .map(|l| String::from_utf8_lossy(&l).into_owned());
        let Some(path) = normalize(&raw_path) else {
            if raw_path.trim_matches(['/', '.']).is_empty() && kind == Kind::Dir {
                continue; // the root itself ("./")
            }
            toc.unsafe_entries += 1;
            continue;
        };
        let link = match kind {
            Kind::Hardlink => match link_raw.as_deref().and_then(normalize) {
                Some(l) => Some(l),
                None => {
                    toc.unsafe_entries += 1;
                    continue;
                }
            },
            // Symlink targets are kept as written; the filesystem resolves them inside the
            // container's root, never on the host.
            Kind::Symlink => link_raw,
            _ => None,
        };
        let mut xattrs = BTreeMap::new();
        if let Some(pax) = entry.pax_extensions().map_err(tar_error)? {
            for ext in pax {
                let ext = ext.map_err(tar_error)?;
                if let Ok(key) = ext.key()
                    && let Some(name) = key.strip_prefix("SCHILY.xattr.")
                {
                    xattrs.insert(name.to_owned(), ext.value_bytes().to_vec());
                }
            }
        }
        let size = if kind == Kind::File { entry.size() } else { 0 };
        name_bytes += (path.len() + link.as_ref().map_or(0, String::len)) as u64
            + xattrs
                .iter()
                .map(|(k, v)| (k.len() + v.len()) as u64)
                .sum::<u64>();
        if name_bytes > MAX_NAME_BYTES {
            return Err(Error::Corrupt {
                offset: 0,
                detail: format!(
                    "layer over the index limits: names, links and xattrs past {MAX_NAME_BYTES} bytes"
                ),
            });
        }
        toc.entries.push(Entry {
            path,
            kind,
            link,
            mode,
            uid,
            gid,
            mtime,
            size,
            offset: entry.raw_file_position(),
            devmajor,
            devminor,
            xattrs,
        });
    }
    Ok(toc)
}

fn tar_error(e: std::io::Error) -> Error {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) {
        Some(Error::Corrupt { offset, detail }) => Error::Corrupt {
            offset: *offset,
            detail: detail.clone(),
        },
        _ if e.kind() == std::io::ErrorKind::InvalidData
            || e.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            Error::Corrupt {
                offset: 0,
                detail: format!("bad tar stream: {e}"),
            }
        }
        _ => Error::Io(e),
    }
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn normalizes_and_refuses_escapes() {
        assert_eq!(normalize("./a/b/").as_deref(), Some("a/b"));
        assert_eq!(normalize("/etc//passwd").as_deref(), Some("etc/passwd"));
        assert_eq!(normalize("a/../../x"), None);
        assert_eq!(normalize(".."), None);
        assert_eq!(normalize("./"), None);
    }
}
