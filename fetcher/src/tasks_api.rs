//! `GET /api/v1/tasks` on dfdaemon's metrics address: the task versions this agent has open (what
//! it serves to peers and reads for lazy layers): how much of each is held, verified, on disk.
//! URLs are shown redacted (no query, no user info).

use serde::Serialize;

use crate::peer::Peer;
use crate::piece_store::TaskStore;

/// One open task version.
#[derive(Debug, Serialize, PartialEq)]
pub struct TaskView {
    pub version_id: String,
    pub task_id: String,
    pub url: String,
    /// Known once the supernode told it.
    pub content_length: Option<u64>,
    /// `sha256:<hex>` of the whole content, once known.
    pub digest: Option<String>,
    pub pieces_held: usize,
    pub bytes_held: u64,
    /// `bytes_held / content_length` (0 while the length is unknown).
    pub complete: f64,
}

/// The view of an open task version.
pub fn view(s: &TaskStore) -> TaskView {
    let meta = s.meta();
    let (pieces_held, bytes_held) = s.held();
    let length = u64::try_from(meta.content_length).ok();
    let complete = match length {
        Some(0) => 1.0,
        Some(n) => bytes_held as f64 / n as f64,
        None => 0.0,
    };
    TaskView {
        version_id: meta.version_id,
        task_id: meta.task_id,
        url: crate::source::redact(&meta.url),
        content_length: length,
        digest: meta.digest,
        pieces_held,
        bytes_held,
        complete,
    }
}

impl Peer {
    /// Every task version open in this process, by task id.
    pub fn tasks(&self) -> Vec<TaskView> {
        let mut all: Vec<TaskView> = self.inner.open.all().iter().map(|s| view(s)).collect();
        all.sort_by(|a, b| (&a.task_id, &a.version_id).cmp(&(&b.task_id, &b.version_id)));
        all
    }
}
