//! The snapshot tree: containerd's snapshot model (active, view, committed; parent chains; labels)
//! over directories `<root>/snapshots/<id>/{fs,work}` and overlayfs mounts, as containerd's own
//! overlayfs snapshotter lays them out. containerd unpacks each layer into an active snapshot's
//! mounts and commits it; a container's rootfs is an active snapshot over the image's chain.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use proto::containerd::types::Mount;
use tokio::sync::Mutex;

use crate::error::{Error, Result};
use crate::metastore::{Kind, MetaStore, Record, RemoteRef};
use crate::remote::Mounter;

/// Parent chains deeper than this are refused (overlayfs stacks at most ~500 lowers, and the
/// mount options must fit in a page).
const MAX_DEPTH: usize = 128;

/// Snapshot information as containerd sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Info {
    pub name: String,
    pub parent: String,
    pub kind: Kind,
    pub labels: BTreeMap<String, String>,
    pub created: SystemTime,
    pub updated: SystemTime,
}

/// Bytes and inodes a snapshot uses on its own (without its parents).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub size: u64,
    pub inodes: u64,
}

pub struct Snapshots {
    root: PathBuf,
    meta: Mutex<MetaStore>,
    /// Lazy layers (FUSE over the index, bytes through the agent); `None`: unpack everything.
    remote: Option<Arc<dyn Mounter>>,
}

fn info(name: &str, r: &Record) -> Info {
    Info {
        name: name.to_owned(),
        parent: r.parent.clone(),
        kind: r.kind,
        labels: r.labels.clone(),
        created: r.created,
        updated: r.updated,
    }
}

impl Snapshots {
    /// Opens the tree under `root` (created if absent).
    pub fn open(root: &Path) -> Result<Self> {
        // 0700 like containerd's: snapshots hold unpacked layers (setuid binaries among them)
        // and lazy mounts of private images; nobody but root may reach into them.
        fetcher::private::dir(root).map_err(|e| Error::io("cannot create", root, e))?;
        let dir = root.join("snapshots");
        fetcher::private::dir(&dir).map_err(|e| Error::io("cannot create", &dir, e))?;
        Ok(Self {
            root: root.to_path_buf(),
            meta: Mutex::new(MetaStore::open(root)?),
            remote: None,
        })
    }

    /// Mounts layers lazily when containerd's labels name a registry blob.
    pub fn with_remote(mut self, remote: Arc<dyn Mounter>) -> Self {
        self.remote = Some(remote);
        self
    }

    /// Mounts again every remote layer the metadata holds (after a restart). A layer that cannot
    /// be mounted is logged and left for a later restart; the others are served.
    pub async fn remount(&self) -> usize {
        let Some(remote) = &self.remote else {
            return 0;
        };
        let layers: Vec<(String, u64, RemoteRef)> = {
            let m = self.meta.lock().await;
            m.iter()
                .filter_map(|(k, r)| r.remote.clone().map(|l| (k.clone(), r.id, l)))
                .collect()
        };
        let mut mounted = 0;
        for (key, id, layer) in layers {
            match remote.mount(id, &self.dir(id), &layer).await {
                Ok(_) => mounted += 1,
                Err(e) => {
                    tracing::error!(snapshot = %key, layer = %layer.digest, error = %e, "cannot remount remote layer")
                }
            }
        }
        mounted
    }

    /// Commits the layer `layer` under `key` as a remote (FUSE) snapshot on `parent`; the caller
    /// reports "already exists" so containerd skips the download.
    async fn create_remote(
        &self,
        remote: &dyn Mounter,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        layer: RemoteRef,
    ) -> Result<()> {
        let id = {
            let mut m = self.meta.lock().await;
            if m.get(key).is_some() {
                return Err(Error::AlreadyExists(key.to_owned()));
            }
            self.check_parent(&m, parent)?;
            m.allocate_id()
        };
        let dir = self.dir(id);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("cannot create", &dir, e))?;
        let size = match remote.mount(id, &dir, &layer).await {
            Ok(size) => size,
            Err(e) => {
                remote.unmount(id, &dir).await;
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let now = SystemTime::now();
        let rec = Record {
            id,
            kind: Kind::Committed,
            parent: parent.to_owned(),
            labels,
            created: now,
            updated: now,
            size,
            inodes: 0,
            remote: Some(layer),
        };
        let mut m = self.meta.lock().await;
        let put = if m.get(key).is_some() {
            Err(Error::AlreadyExists(key.to_owned()))
        } else {
            self.check_parent(&m, parent).and_then(|()| m.put(key, rec))
        };
        drop(m);
        if put.is_err() {
            remote.unmount(id, &dir).await;
            let _ = std::fs::remove_dir_all(&dir);
        }
        put
    }

    /// `parent` is "" or a committed snapshot.
    fn check_parent(&self, m: &MetaStore, parent: &str) -> Result<()> {
        if parent.is_empty() {
            return Ok(());
        }
        match m.get(parent) {
            None => Err(Error::NotFound(parent.to_owned())),
            Some(p) if p.kind != Kind::Committed => Err(Error::FailedPrecondition(format!(
                "parent {parent:?} is not committed"
            ))),
            Some(_) => Ok(()),
        }
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    pub async fn stat(&self, key: &str) -> Result<Info> {
        let m = self.meta.lock().await;
        m.get(key)
            .map(|r| info(key, r))
            .ok_or_else(|| Error::NotFound(key.to_owned()))
    }

    pub async fn list(&self) -> Vec<Info> {
        let m = self.meta.lock().await;
        m.iter().map(|(k, r)| info(k, r)).collect()
    }

    /// A new active (`Kind::Active`) or view (`Kind::View`) snapshot on `parent`; its mounts.
    pub async fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        if key.is_empty() {
            return Err(Error::Invalid("empty snapshot key".into()));
        }
        if kind == Kind::Active
            && let Some(remote) = &self.remote
            && let Some(layer) = crate::remote::wanted(&labels)
        {
            let target = labels
                .get(crate::remote::LABEL_TARGET)
                .cloned()
                .unwrap_or_default();
            let digest = layer.digest.clone();
            match self
                .create_remote(remote.as_ref(), key, parent, labels.clone(), layer)
                .await
            {
                Ok(()) => {
                    return Err(Error::AlreadyExists(format!(
                        "{target} (layer {digest} mounted lazily)"
                    )));
                }
                Err(e @ (Error::AlreadyExists(_) | Error::NotFound(_))) => return Err(e),
                Err(e) => tracing::warn!(
                    layer = %digest, error = %e,
                    "cannot mount the layer lazily: containerd will download and unpack it"
                ),
            }
        }
        let mut m = self.meta.lock().await;
        if m.get(key).is_some() {
            return Err(Error::AlreadyExists(key.to_owned()));
        }
        self.check_parent(&m, parent)?;
        let id = m.allocate_id();
        let dir = self.dir(id);
        let mkdir =
            |p: PathBuf| std::fs::create_dir_all(&p).map_err(|e| Error::io("cannot create", p, e));
        mkdir(dir.join("fs"))?;
        if kind == Kind::Active {
            mkdir(dir.join("work"))?;
        }
        let now = SystemTime::now();
        let rec = Record {
            id,
            kind,
            parent: parent.to_owned(),
            labels,
            created: now,
            updated: now,
            size: 0,
            inodes: 0,
            remote: None,
        };
        if let Err(e) = m.put(key, rec.clone()) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        self.mounts_of(&m, &rec)
    }

    pub async fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let m = self.meta.lock().await;
        let rec = m.get(key).ok_or_else(|| Error::NotFound(key.to_owned()))?;
        if rec.kind == Kind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is committed: it has no mounts"
            )));
        }
        self.mounts_of(&m, rec)
    }

    /// The ids of `rec`'s parents, nearest first.
    fn parent_ids(&self, m: &MetaStore, rec: &Record) -> Result<Vec<u64>> {
        let mut ids = Vec::new();
        let mut parent = rec.parent.clone();
        while !parent.is_empty() {
            let p = m.get(&parent).ok_or_else(|| {
                Error::FailedPrecondition(format!("parent {parent:?} is missing from the metadata"))
            })?;
            ids.push(p.id);
            if ids.len() > MAX_DEPTH {
                return Err(Error::FailedPrecondition(format!(
                    "parent chain deeper than {MAX_DEPTH}"
                )));
            }
            parent = p.parent.clone();
        }
        Ok(ids)
    }

    fn mounts_of(&self, m: &MetaStore, rec: &Record) -> Result<Vec<Mount>> {
        let parents = self.parent_ids(m, rec)?;
        let fs = |id: u64| self.dir(id).join("fs").to_string_lossy().into_owned();
        let bind = |source: String, mode: &str| Mount {
            r#type: "bind".into(),
            source,
            target: String::new(),
            options: vec![mode.into(), "rbind".into()],
        };
        let lowerdir = || {
            let dirs: Vec<String> = parents.iter().map(|id| fs(*id)).collect();
            format!("lowerdir={}", dirs.join(":"))
        };
        Ok(vec![match (rec.kind, parents.len()) {
            (Kind::Active, 0) => bind(fs(rec.id), "rw"),
            (Kind::Active, _) => Mount {
                r#type: "overlay".into(),
                source: "overlay".into(),
                target: String::new(),
                options: vec![
                    format!("workdir={}", self.dir(rec.id).join("work").display()),
                    format!("upperdir={}", fs(rec.id)),
                    lowerdir(),
                ],
            },
            (_, 0) => bind(fs(rec.id), "ro"),
            (_, 1) => bind(fs(parents[0]), "ro"),
            (_, _) => Mount {
                r#type: "overlay".into(),
                source: "overlay".into(),
                target: String::new(),
                options: vec![lowerdir()],
            },
        }])
    }

    /// Commits the active snapshot `key` as `name`.
    pub async fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<()> {
        let mut m = self.meta.lock().await;
        if m.get(name).is_some() {
            return Err(Error::AlreadyExists(name.to_owned()));
        }
        let rec = m.get(key).ok_or_else(|| Error::NotFound(key.to_owned()))?;
        if rec.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is not active"
            )));
        }
        let dir = self.dir(rec.id);
        let fs = dir.join("fs");
        let usage = tokio::task::spawn_blocking(move || disk_usage(&fs))
            .await
            .map_err(|e| Error::FailedPrecondition(format!("usage task failed: {e}")))??;
        let now = SystemTime::now();
        let committed = Record {
            kind: Kind::Committed,
            labels,
            updated: now,
            size: usage.size,
            inodes: usage.inodes,
            ..rec.clone()
        };
        m.rename(key, name, committed)?;
        let _ = std::fs::remove_dir_all(dir.join("work"));
        Ok(())
    }

    /// Removes `key` (which must have no children) and its directory.
    pub async fn remove(&self, key: &str) -> Result<()> {
        let mut m = self.meta.lock().await;
        if m.get(key).is_none() {
            return Err(Error::NotFound(key.to_owned()));
        }
        if let Some((child, _)) = m.iter().find(|(_, r)| r.parent == key) {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} has a child {child:?}"
            )));
        }
        let rec = m.remove(key)?;
        let dir = self.dir(rec.id);
        drop(m);
        if rec.remote.is_some()
            && let Some(remote) = &self.remote
        {
            remote.unmount(rec.id, &dir).await;
        }
        remove_tree(dir).await;
        Ok(())
    }

    /// Changes labels only: `fields` empty replaces them all; `labels.<k>` sets or clears one.
    pub async fn update(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        fields: &[String],
    ) -> Result<Info> {
        let mut m = self.meta.lock().await;
        let mut rec = m
            .get(key)
            .cloned()
            .ok_or_else(|| Error::NotFound(key.to_owned()))?;
        if fields.is_empty() {
            rec.labels = labels.clone();
        }
        for f in fields {
            if f == "labels" {
                rec.labels = labels.clone();
            } else if let Some(k) = f.strip_prefix("labels.") {
                match labels.get(k) {
                    Some(v) => rec.labels.insert(k.to_owned(), v.clone()),
                    None => rec.labels.remove(k),
                };
            } else {
                return Err(Error::Invalid(format!(
                    "cannot update field {f:?} (only labels)"
                )));
            }
        }
        rec.updated = SystemTime::now();
        m.put(key, rec.clone())?;
        Ok(info(key, &rec))
    }

    pub async fn usage(&self, key: &str) -> Result<Usage> {
        let (kind, stored, fs) = {
            let m = self.meta.lock().await;
            let rec = m.get(key).ok_or_else(|| Error::NotFound(key.to_owned()))?;
            let stored = Usage {
                size: rec.size,
                inodes: rec.inodes,
            };
            (rec.kind, stored, self.dir(rec.id).join("fs"))
        };
        if kind == Kind::Committed {
            return Ok(stored);
        }
        tokio::task::spawn_blocking(move || disk_usage(&fs))
            .await
            .map_err(|e| Error::FailedPrecondition(format!("usage task failed: {e}")))?
    }

    /// Removes snapshot directories no snapshot owns (left by a crash between steps).
    pub async fn cleanup(&self) -> Result<usize> {
        let owned: std::collections::HashSet<String> = {
            let m = self.meta.lock().await;
            m.iter().map(|(_, r)| r.id.to_string()).collect()
        };
        let dir = self.root.join("snapshots");
        let mut removed = 0;
        for e in std::fs::read_dir(&dir)
            .map_err(|e| Error::io("cannot list", &dir, e))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if !owned.contains(&name) {
                remove_tree(e.path()).await;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

async fn remove_tree(dir: PathBuf) {
    let shown = dir.display().to_string();
    match tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
        Ok(Err(e)) => tracing::warn!(dir = %shown, error = %e, "cannot remove snapshot directory"),
        Err(e) => tracing::warn!(dir = %shown, error = %e, "removal task failed"),
    }
}

/// Bytes (allocated blocks) and inodes under `dir`, hard links counted once.
fn disk_usage(dir: &Path) -> Result<Usage> {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut u = Usage::default();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = std::fs::read_dir(&d).map_err(|e| Error::io("cannot list", &d, e))?;
        for e in rd.flatten() {
            let Ok(md) = e.metadata() else { continue };
            if seen.insert((md.dev(), md.ino())) {
                u.size += md.blocks() * 512;
                u.inodes += 1;
            }
            if md.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(m: &[Mount]) -> (&str, Vec<&str>) {
        (
            m[0].r#type.as_str(),
            m[0].options.iter().map(String::as_str).collect(),
        )
    }

    #[tokio::test]
    async fn layers_commit_into_a_chain_and_mount_as_overlay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Snapshots::open(dir.path()).expect("open");
        let m = s
            .create(Kind::Active, "extract-1", "", BTreeMap::new())
            .await
            .expect("prepare");
        assert_eq!(opts(&m), ("bind", vec!["rw", "rbind"]));
        std::fs::write(Path::new(&m[0].source).join("a"), vec![1u8; 10_000]).expect("write");
        s.commit("layer-1", "extract-1", BTreeMap::new())
            .await
            .expect("commit");
        assert!(matches!(s.stat("extract-1").await, Err(Error::NotFound(_))));
        let u = s.usage("layer-1").await.expect("usage");
        assert!(u.size >= 10_000 && u.inodes == 1, "{u:?}");

        s.create(Kind::Active, "extract-2", "layer-1", BTreeMap::new())
            .await
            .expect("prepare 2");
        s.commit("layer-2", "extract-2", BTreeMap::new())
            .await
            .expect("commit 2");
        let m = s
            .create(Kind::Active, "rootfs", "layer-2", BTreeMap::new())
            .await
            .expect("rootfs");
        let (ty, o) = opts(&m);
        assert_eq!(ty, "overlay");
        assert!(o[0].starts_with("workdir=") && o[1].starts_with("upperdir="));
        let lowers: Vec<&str> = o[2].trim_start_matches("lowerdir=").split(':').collect();
        assert_eq!(lowers.len(), 2);
        assert!(
            lowers[0].ends_with("/2/fs") && lowers[1].ends_with("/1/fs"),
            "{lowers:?}"
        );
        let v = s
            .create(Kind::View, "view", "layer-1", BTreeMap::new())
            .await
            .expect("view");
        assert_eq!(opts(&v), ("bind", vec!["ro", "rbind"]));

        // Rules: no duplicate keys, parents must be committed, no removal under children.
        assert!(matches!(
            s.create(Kind::Active, "rootfs", "", BTreeMap::new()).await,
            Err(Error::AlreadyExists(_))
        ));
        assert!(matches!(
            s.create(Kind::Active, "x", "rootfs", BTreeMap::new()).await,
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            s.create(Kind::Active, "x", "nope", BTreeMap::new()).await,
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            s.remove("layer-1").await,
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            s.commit("layer-1", "rootfs", BTreeMap::new()).await,
            Err(Error::AlreadyExists(_))
        ));

        // Labels: one changed by path, the rest kept.
        let labels = BTreeMap::from([
            ("a".to_owned(), "1".to_owned()),
            ("b".to_owned(), "2".to_owned()),
        ]);
        s.update("layer-2", labels, &[]).await.expect("update all");
        let one = BTreeMap::from([("a".to_owned(), "9".to_owned())]);
        let i = s
            .update("layer-2", one, &["labels.a".into(), "labels.b".into()])
            .await
            .expect("update some");
        assert_eq!(i.labels, BTreeMap::from([("a".to_owned(), "9".to_owned())]));
        assert!(matches!(
            s.update("layer-2", BTreeMap::new(), &["parent".into()])
                .await,
            Err(Error::Invalid(_))
        ));

        // Everything survives a restart; removal frees the directory; cleanup sweeps strays.
        drop(s);
        let s = Snapshots::open(dir.path()).expect("reopen");
        assert_eq!(s.list().await.len(), 4);
        s.remove("rootfs").await.expect("remove");
        std::fs::create_dir_all(dir.path().join("snapshots/999/fs")).expect("stray");
        assert_eq!(s.cleanup().await.expect("cleanup"), 1);
        assert!(!dir.path().join("snapshots/999").exists());
        assert!(
            !dir.path().join("snapshots/3").exists(),
            "rootfs dir removed"
        );
    }
}
