//! What the first start of a layer read: the uncompressed offsets of the layer's chunks (as its
//! index cuts them) that the first host to start a container on it read in its start window,
//! recorded by that host's snapshotter so that later hosts fetch them at mount, before their
//! containers ask. Kept next to the layer's index (`<data_dir>/indexes/<hex>.start`, one
//! offset per line); the first record of a layer is kept, later ones are not (a start set is a
//! hint: a wrong one costs bandwidth, never bytes, which are verified as any others).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Offsets a start set holds at most (2 MiB chunks: 32 GiB of a layer).
pub const MAX_OFFSETS: usize = 16_384;

/// Why a start set was not kept.
#[derive(Debug, thiserror::Error)]
pub enum StartSetError {
    #[error("bad digest {0:?}")]
    BadDigest(String),
    #[error("a start set of {0} offsets is over {MAX_OFFSETS}")]
    TooLarge(usize),
    #[error("start set storage: {0}")]
    Io(String),
}

/// Start sets by blob hex digest, on disk and the ones read in memory.
pub struct StartSets {
    dir: PathBuf,
    known: Mutex<lru::LruCache<String, Arc<Vec<u64>>>>,
}

/// `offsets` sorted, without repeats, within [`MAX_OFFSETS`].
pub fn normalize(mut offsets: Vec<u64>) -> Result<Vec<u64>, StartSetError> {
    if offsets.len() > MAX_OFFSETS {
        return Err(StartSetError::TooLarge(offsets.len()));
    }
    offsets.sort_unstable();
    offsets.dedup();
    Ok(offsets)
}

/// A start set file's offsets; `None` when it is not one (then it is as if none was recorded).
fn parse(text: &str) -> Option<Vec<u64>> {
    let offsets = text
        .lines()
        .map(|l| l.trim().parse::<u64>().ok())
        .collect::<Option<Vec<u64>>>()?;
    normalize(offsets).ok()
}

impl StartSets {
    pub fn new(data_dir: &std::path::Path) -> Self {
        let cap = std::num::NonZeroUsize::new(4096).unwrap_or(std::num::NonZeroUsize::MIN);
        Self {
            dir: data_dir.join("indexes"),
            known: Mutex::new(lru::LruCache::new(cap)),
        }
    }

    fn hex(digest: &str) -> Result<String, StartSetError> {
        fetcher::task_id::parse_digest(digest).map_err(|_| StartSetError::BadDigest(digest.into()))
    }

    /// The start set of blob `digest` (`sha256:<hex>`); empty when none was recorded.
    pub async fn get(&self, digest: &str) -> Result<Arc<Vec<u64>>, StartSetError> {
        let hex = Self::hex(digest)?;
        if let Some(s) = self
            .known
            .lock()
            .ok()
            .and_then(|mut m| m.get(&hex).cloned())
        {
            return Ok(s);
        }
        let path = self.dir.join(format!("{hex}.start"));
        let set = match tokio::fs::read_to_string(&path).await {
            Ok(text) => match parse(&text) {
                Some(s) => Arc::new(s),
                None => {
                    tracing::warn!(path = %path.display(), "start set file unreadable; ignoring it");
                    return Ok(Arc::new(Vec::new()));
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Arc::new(Vec::new())),
            Err(e) => return Err(StartSetError::Io(format!("{}: {e}", path.display()))),
        };
        if let Ok(mut m) = self.known.lock() {
            m.put(hex, set.clone());
        }
        Ok(set)
    }

    /// Keeps `offsets` as the start set of `digest` unless one is recorded already (or it is
    /// empty); whether it was kept.
    pub async fn record(&self, digest: &str, offsets: Vec<u64>) -> Result<bool, StartSetError> {
        let offsets = normalize(offsets)?;
        if offsets.is_empty() || !self.get(digest).await?.is_empty() {
            return Ok(false);
        }
        let hex = Self::hex(digest)?;
        let path = self.dir.join(format!("{hex}.start"));
        let text: String = offsets.iter().map(|o| format!("{o}\n")).collect();
        let dir = self.dir.clone();
        // A temporary file renamed into place: never a half-written set; the first rename wins.
        let kept = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
            std::fs::create_dir_all(&dir)?;
            let mut tmp = tempfile::NamedTempFile::new_in(&dir)?;
            std::io::Write::write_all(&mut tmp, text.as_bytes())?;
            match tmp.persist_noclobber(&path) {
                Ok(_) => Ok(true),
                Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(e.error),
            }
        })
        .await
        .map_err(|e| StartSetError::Io(format!("start set task failed: {e}")))?
        .map_err(|e| StartSetError::Io(e.to_string()))?;
        if kept && let Ok(mut m) = self.known.lock() {
            m.put(hex, Arc::new(offsets));
        } else if let Ok(mut m) = self.known.lock() {
            m.pop(&hex);
        }
        Ok(kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    #[test]
    fn sets_are_sorted_without_repeats_and_bounded() {
        assert_eq!(normalize(vec![4, 0, 4, 2]).ok(), Some(vec![0, 2, 4]));
        assert!(matches!(
            normalize(vec![0; MAX_OFFSETS + 1]),
            Err(StartSetError::TooLarge(_))
        ));
        assert_eq!(parse("0\n2097152\n"), Some(vec![0, 2 << 20]));
        assert_eq!(parse("0\nx\n"), None, "a damaged file is no start set");
    }

    #[tokio::test]
    async fn the_first_record_is_kept_and_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sets = StartSets::new(dir.path());
        assert!(sets.get(D).await.expect("get").is_empty());
        assert!(
            !sets.record(D, Vec::new()).await.expect("empty"),
            "nothing to keep"
        );
        assert!(sets.record(D, vec![2 << 20, 0]).await.expect("first"));
        assert!(
            !sets.record(D, vec![4 << 20]).await.expect("second"),
            "the first stays"
        );
        let again = StartSets::new(dir.path());
        assert_eq!(*again.get(D).await.expect("reload"), vec![0, 2 << 20]);
        assert!(matches!(
            sets.get("sha256:zz").await,
            Err(StartSetError::BadDigest(_))
        ));
    }
}
