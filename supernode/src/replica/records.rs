//! What this supernode holds of other supernodes' tasks: per task, the version's description and
//! its piece metadata in order, as the owner sent them. Every message is checked before it is
//! kept (ids, sizes, offsets, digests, continuity), and the whole is bounded by a piece budget,
//! least recently updated tasks going first: another supernode cannot grow this one's memory.

use fetcher::piece::PieceMeta;
use fetcher::task_id::MAX_PIECES;
use proto::scheduler::Replica;

use crate::error::{Error, Result};

/// Pieces described, over all tasks, before the least recently updated tasks are dropped
/// (about 100 bytes each).
pub const PIECE_BUDGET: usize = 1 << 20;

/// One task's replicated version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub version_id: String,
    pub content_length: u64,
    pub piece_size: u32,
    pub etag: String,
    pub last_modified: String,
    /// Pieces `0..pieces.len()`, in order.
    pub pieces: Vec<PieceMeta>,
    /// `sha256:<hex>` of the whole content, once every piece is described.
    pub digest: Option<String>,
}

impl Record {
    /// Pieces of the whole version.
    pub fn piece_count(&self) -> u32 {
        self.content_length.div_ceil(u64::from(self.piece_size)) as u32
    }
}

/// Replicated versions by task id.
#[derive(Debug)]
pub struct Records {
    tasks: lru::LruCache<String, Record>,
    pieces: usize,
    budget: usize,
}

impl Default for Records {
    fn default() -> Self {
        Self::with_budget(PIECE_BUDGET)
    }
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

fn bad(m: &Replica, detail: impl Into<String>) -> Error {
    Error::Replica {
        task_id: m.task_id.get(..16).unwrap_or(&m.task_id).to_owned(),
        detail: detail.into(),
    }
}

/// The pieces of `m`, checked against the version it describes.
fn check(m: &Replica) -> Result<(u64, Vec<PieceMeta>)> {
    if !is_hex64(&m.task_id) || !is_hex64(&m.version_id) {
        return Err(bad(m, "task and version ids must be sha256 hex"));
    }
    let len = u64::try_from(m.content_length)
        .map_err(|_| bad(m, "a version of unknown length is not replicated"))?;
    if !(64 * 1024..=1 << 30).contains(&m.piece_size) {
        return Err(bad(m, format!("piece size {} out of range", m.piece_size)));
    }
    let count = len.div_ceil(u64::from(m.piece_size));
    if count > MAX_PIECES {
        return Err(bad(m, format!("{count} pieces (at most {MAX_PIECES})")));
    }
    if m.etag.len() > 1024 || m.last_modified.len() > 1024 {
        return Err(bad(m, "etag or last_modified too long"));
    }
    let mut out = Vec::with_capacity(m.pieces.len().min(MAX_PIECES as usize));
    for (i, p) in m.pieces.iter().enumerate() {
        let num = u64::from(m.first_piece) + i as u64;
        let offset = num * u64::from(m.piece_size);
        let size = len.saturating_sub(offset).min(u64::from(m.piece_size));
        if num >= count || u64::from(p.piece) != num || p.offset != offset {
            return Err(bad(
                m,
                format!("piece {} out of place (expected {num})", p.piece),
            ));
        }
        if u64::from(p.size) != size || !is_hex64(&p.sha256) {
            return Err(bad(m, format!("piece {num}: bad size or sha256")));
        }
        out.push(PieceMeta::from_proto(p));
    }
    Ok((count, out))
}

impl Records {
    /// An empty set holding at most `budget` pieces.
    pub fn with_budget(budget: usize) -> Self {
        Self {
            tasks: lru::LruCache::unbounded(),
            pieces: 0,
            budget,
        }
    }

    /// Takes in a message; returns how many pieces of the version are now described (a message
    /// that does not continue what is held changes nothing: the sender resends from there).
    pub fn apply(&mut self, m: &Replica) -> Result<u32> {
        let (count, pieces) = check(m)?;
        let held = match self.tasks.get(&m.task_id) {
            Some(r) if r.version_id == m.version_id => {
                if (r.content_length, r.piece_size) != (m.content_length as u64, m.piece_size) {
                    return Err(bad(m, "the version's length or piece size changed"));
                }
                r.pieces.len()
            }
            _ => 0,
        };
        let first = m.first_piece as usize;
        if first > held {
            return Ok(held as u32);
        }
        if !m.digest.is_empty() {
            let complete = (first + pieces.len()).max(held) as u64 == count;
            let well_formed = m.digest.strip_prefix("sha256:").is_some_and(is_hex64);
            if !complete || !well_formed {
                return Err(bad(m, "a digest before every piece is described"));
            }
        }
        if held == 0 {
            self.remove(&m.task_id);
            let r = Record {
                version_id: m.version_id.clone(),
                content_length: m.content_length as u64,
                piece_size: m.piece_size,
                etag: m.etag.clone(),
                last_modified: m.last_modified.clone(),
                pieces: Vec::new(),
                digest: None,
            };
            self.tasks.put(m.task_id.clone(), r);
        }
        let r = self
            .tasks
            .get_mut(&m.task_id)
            .ok_or_else(|| bad(m, "record vanished"))?;
        // What overlaps what is held must agree with it: a version's pieces never change.
        for p in pieces.iter().take(held.saturating_sub(first)) {
            if r.pieces.get(p.num as usize) != Some(p) {
                return Err(bad(
                    m,
                    format!("piece {} differs from what was sent before", p.num),
                ));
            }
        }
        let new: Vec<PieceMeta> = pieces.into_iter().skip(held - first).collect();
        self.pieces += new.len();
        r.pieces.extend(new);
        if !m.digest.is_empty() {
            r.digest = Some(m.digest.clone());
        }
        let now = r.pieces.len() as u32;
        while self.pieces > self.budget && self.tasks.len() > 1 {
            if let Some((_, old)) = self.tasks.pop_lru() {
                self.pieces -= old.pieces.len();
            }
        }
        Ok(now)
    }

    /// The record of `task_id`, if any.
    pub fn get(&mut self, task_id: &str) -> Option<Record> {
        self.tasks.get(task_id).cloned()
    }

    /// Drops the record of `task_id`.
    pub fn remove(&mut self, task_id: &str) {
        if let Some(r) = self.tasks.pop(task_id) {
            self.pieces -= r.pieces.len();
        }
    }

    /// Pieces described over all tasks.
    pub fn pieces(&self) -> usize {
        self.pieces
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::scheduler::PieceInfo;

    const PS: u32 = 64 * 1024;

    fn hex(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    fn msg(task: char, len: u64, first: u32, n: u32) -> Replica {
        let pieces = (first..first + n)
            .map(|i| {
                let offset = u64::from(i) * u64::from(PS);
                PieceInfo {
                    piece: i,
                    offset,
                    size: (len - offset).min(u64::from(PS)) as u32,
                    sha256: hex('a'),
                }
            })
            .collect();
        Replica {
            task_id: hex(task),
            version_id: hex('b'),
            content_length: len as i64,
            piece_size: PS,
            first_piece: first,
            pieces,
            ..Default::default()
        }
    }

    #[test]
    fn batches_continue_and_gaps_ask_for_a_resend() {
        let len = 3 * u64::from(PS) + 10;
        let mut r = Records::default();
        assert_eq!(r.apply(&msg('1', len, 0, 2)).expect("first"), 2);
        // A batch from further on (one was lost): nothing changes, the sender learns where to resume.
        assert_eq!(r.apply(&msg('1', len, 3, 1)).expect("gap"), 2);
        // An overlapping resend is fine when it agrees.
        let mut last = msg('1', len, 1, 3);
        last.digest = format!("sha256:{}", hex('c'));
        assert_eq!(r.apply(&last).expect("rest"), 4);
        let rec = r.get(&hex('1')).expect("record");
        assert_eq!(rec.pieces.len(), 4);
        assert_eq!(rec.pieces[3].size, 10);
        assert!(rec.digest.is_some());
        assert_eq!(r.pieces(), 4);
    }

    #[test]
    fn malformed_or_conflicting_metadata_is_refused() {
        let len = 2 * u64::from(PS);
        let mut r = Records::default();
        let mut m = msg('1', len, 0, 1);
        m.pieces[0].offset = 1;
        assert!(r.apply(&m).is_err(), "offset off its place");
        let mut m = msg('1', len, 0, 1);
        m.pieces[0].size = 5;
        assert!(r.apply(&m).is_err(), "short piece that is not the last");
        let mut m = msg('1', len, 0, 1);
        m.pieces[0].sha256 = "zz".into();
        assert!(r.apply(&m).is_err(), "bad sha256");
        let mut m = msg('1', len, 0, 1);
        m.digest = format!("sha256:{}", hex('c'));
        assert!(r.apply(&m).is_err(), "digest before the last piece");
        let mut m = msg('1', len, 0, 1);
        m.content_length = -1;
        assert!(r.apply(&m).is_err(), "unknown length");
        assert!(
            r.apply(&msg('1', 5000 * u64::from(PS), 0, 0)).is_err(),
            "too many pieces"
        );
        assert!(
            r.apply(&msg('1', len, 0, 3)).is_err(),
            "a piece past the end"
        );

        assert_eq!(r.apply(&msg('1', len, 0, 1)).expect("ok"), 1);
        let mut other = msg('1', len, 0, 2);
        other.pieces[0].sha256 = hex('d');
        assert!(r.apply(&other).is_err(), "a piece that changed");
        let mut longer = msg('1', len + 1, 1, 1);
        longer.version_id = hex('b');
        assert!(
            r.apply(&longer).is_err(),
            "the same version with another length"
        );
        assert_eq!(r.get(&hex('1')).expect("kept").pieces.len(), 1);
    }

    #[test]
    fn a_new_version_replaces_the_old_and_the_budget_evicts_the_oldest() {
        let len = 4 * u64::from(PS);
        let mut r = Records::with_budget(6);
        r.apply(&msg('1', len, 0, 4)).expect("t1");
        let mut v2 = msg('1', len, 0, 1);
        v2.version_id = hex('e');
        assert_eq!(r.apply(&v2).expect("v2"), 1);
        assert_eq!(r.pieces(), 1);
        r.apply(&msg('2', len, 0, 4)).expect("t2");
        r.apply(&msg('3', len, 0, 4)).expect("t3");
        assert!(r.pieces() <= 6, "{}", r.pieces());
        assert!(
            r.get(&hex('1')).is_none(),
            "least recently updated goes first"
        );
        assert!(r.get(&hex('3')).is_some());
    }
}
