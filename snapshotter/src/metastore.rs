//! Snapshot metadata, embedded and persistent: one JSON document (`metadata.json` under the root),
//! replaced atomically (temporary file, fsync, rename, fsync of the directory) on every change,
//! so a crash leaves either the old or the new state, never half of one. A host holds hundreds to
//! a few thousand snapshots, so rewriting the whole document is cheap next to the layer I/O that
//! each change stands for; no database server, nothing to run beside the snapshotter.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What containerd calls the snapshot's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    View,
    Active,
    Committed,
}

/// One snapshot.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// Directory name under `snapshots/` (keys are arbitrary strings; ids are safe paths).
    pub id: u64,
    pub kind: Kind,
    /// The parent's key ("" = none).
    pub parent: String,
    pub labels: BTreeMap<String, String>,
    pub created: SystemTime,
    pub updated: SystemTime,
    /// Disk usage, computed at commit (committed snapshots do not change).
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub inodes: u64,
    /// Set for a layer mounted lazily from its index (FUSE) instead of unpacked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteRef>,
}

/// Which registry blob a remote layer is, and the image it was pulled for (its registry and
/// repository serve the blob).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteRef {
    /// `sha256:<hex>` of the compressed layer blob.
    pub digest: String,
    /// The image reference (`host/repository:tag`).
    pub image: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Document {
    next_id: u64,
    snapshots: BTreeMap<String, Record>,
}

/// The metadata, in memory and on disk.
#[derive(Debug)]
pub struct MetaStore {
    path: PathBuf,
    doc: Document,
}

impl MetaStore {
    /// Opens (or creates) `<root>/metadata.json`. A document that does not parse is an error
    /// naming the file, never silently replaced.
    pub fn open(root: &Path) -> Result<Self> {
        let path = root.join("metadata.json");
        let doc = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Metadata {
                path: path.clone(),
                detail: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Document {
                next_id: 1,
                ..Document::default()
            },
            Err(e) => return Err(Error::io("cannot read", &path, e)),
        };
        Ok(Self { path, doc })
    }

    pub fn get(&self, key: &str) -> Option<&Record> {
        self.doc.snapshots.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Record)> {
        self.doc.snapshots.iter()
    }

    /// A new id for a snapshot directory.
    pub fn allocate_id(&mut self) -> u64 {
        let id = self.doc.next_id.max(1);
        self.doc.next_id = id + 1;
        id
    }

    /// Inserts or replaces `key` and saves.
    pub fn put(&mut self, key: &str, rec: Record) -> Result<()> {
        let old = self.doc.snapshots.insert(key.to_owned(), rec);
        self.save().inspect_err(|_| {
            // Keep memory equal to disk.
            match old {
                Some(o) => {
                    self.doc.snapshots.insert(key.to_owned(), o);
                }
                None => {
                    self.doc.snapshots.remove(key);
                }
            }
        })
    }

    /// Renames `from` to `to` with `rec` and saves.
    pub fn rename(&mut self, from: &str, to: &str, rec: Record) -> Result<()> {
        let old = self.doc.snapshots.remove(from);
        self.doc.snapshots.insert(to.to_owned(), rec);
        self.save().inspect_err(|_| {
            self.doc.snapshots.remove(to);
            if let Some(o) = old {
                self.doc.snapshots.insert(from.to_owned(), o);
            }
        })
    }

    /// Removes `key` and saves; returns its record.
    pub fn remove(&mut self, key: &str) -> Result<Record> {
        let rec = self
            .doc
            .snapshots
            .remove(key)
            .ok_or_else(|| Error::NotFound(key.to_owned()))?;
        if let Err(e) = self.save() {
            self.doc.snapshots.insert(key.to_owned(), rec);
            return Err(e);
        }
        Ok(rec)
    }

    fn save(&self) -> Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec(&self.doc).map_err(|e| Error::Metadata {
            path: self.path.clone(),
            detail: e.to_string(),
        })?;
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io("cannot create", &tmp, e))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io("cannot write", &tmp, e))?;
        std::fs::rename(&tmp, &self.path)
            .map_err(|e| Error::io("cannot replace", &self.path, e))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io("cannot sync", dir, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64, kind: Kind, parent: &str) -> Record {
        Record {
            id,
            kind,
            parent: parent.into(),
            labels: BTreeMap::new(),
            created: SystemTime::now(),
            updated: SystemTime::now(),
            size: 0,
            inodes: 0,
            remote: None,
        }
    }

    #[test]
    fn survives_reopen_and_rejects_a_corrupt_document() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut m = MetaStore::open(dir.path()).expect("open");
        let a = m.allocate_id();
        m.put("a", rec(a, Kind::Active, "")).expect("put");
        let b = m.allocate_id();
        m.put("b", rec(b, Kind::Active, "")).expect("put");
        m.rename("a", "layer-1", rec(a, Kind::Committed, ""))
            .expect("rename");
        m.remove("b").expect("remove");
        assert!(matches!(m.remove("b"), Err(Error::NotFound(_))));

        let mut m = MetaStore::open(dir.path()).expect("reopen");
        assert_eq!(m.get("layer-1").map(|r| r.kind), Some(Kind::Committed));
        assert!(m.get("a").is_none() && m.get("b").is_none());
        assert!(m.allocate_id() > b, "ids are never reused");

        std::fs::write(dir.path().join("metadata.json"), b"{\"next_id\": 3, \"snap").expect("w");
        let err = MetaStore::open(dir.path()).expect_err("corrupt");
        assert!(err.to_string().contains("metadata.json"), "{err}");
    }
}
