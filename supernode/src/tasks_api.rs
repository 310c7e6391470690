//! `GET /api/v1/tasks` (admin token): what this supernode seeds and serves, one entry per held
//! version: how far its seed is, how many peers are on it and how long it has been idle. URLs are
//! shown redacted (no query, no user info): they may carry signed parameters.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde::Serialize;

use crate::http::Admin;
use crate::scheduler::Scheduling;
use crate::task::{Status, Version};

/// One version as the tasks API shows it.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct TaskView {
    pub task_id: String,
    pub version_id: String,
    pub url: String,
    /// `seeding`, `complete` or `failed`.
    pub status: &'static str,
    /// Why the seed failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Known once the origin answered with a length (or the seed completed).
    pub content_length: Option<u64>,
    /// Known once the seed completed.
    pub piece_count: Option<u32>,
    /// Verified pieces on this supernode's disk, and their bytes.
    pub pieces_held: usize,
    pub bytes_held: u64,
    /// Peers on the version now.
    pub peers: usize,
    /// Seconds since a peer or a piece request last used it.
    pub idle_s: u64,
}

/// The view of version `version_id`.
pub fn view(version_id: &str, v: &Version) -> TaskView {
    let (pieces_held, bytes_held) = v.store.get().map_or((0, 0), |s| s.held());
    let st = v.lock();
    let (status, error, length, count) = match &st.status {
        Status::Seeding => (
            "seeding",
            None,
            st.info
                .as_ref()
                .and_then(|i| u64::try_from(i.content_length).ok()),
            None,
        ),
        Status::Complete {
            content_length,
            piece_count,
            ..
        } => ("complete", None, Some(*content_length), Some(*piece_count)),
        Status::Failed(e) => ("failed", Some(e.message.clone()), None, None),
    };
    TaskView {
        task_id: v.task_id.clone(),
        version_id: version_id.to_owned(),
        url: fetcher::source::redact(&v.url),
        status,
        error,
        content_length: length,
        piece_count: count,
        pieces_held,
        bytes_held,
        peers: st.peers.len(),
        idle_s: st.last_access.elapsed().as_secs(),
    }
}

/// Every held version, by task id.
pub(crate) async fn tasks(State(s): State<Arc<Scheduling>>, _admin: Admin) -> Json<Vec<TaskView>> {
    let mut all: Vec<TaskView> = s
        .tasks
        .versions()
        .iter()
        .map(|(id, v)| view(id, v))
        .collect();
    all.sort_by(|a, b| (&a.task_id, &a.version_id).cmp(&(&b.task_id, &b.version_id)));
    Json(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seeding_version_shows_its_progress_and_no_query() {
        let v = Version::new(
            "t1".into(),
            "https://r.example/v2/a/blobs/sha256:ab?X-Amz-Signature=secret".into(),
            Vec::new(),
            None,
        );
        let got = view("v1", &v);
        assert_eq!(got.status, "seeding");
        assert_eq!((got.pieces_held, got.peers), (0, 0));
        assert!(!got.url.contains("secret"), "{}", got.url);
        v.lock().status = Status::Complete {
            content_length: 10,
            piece_count: 1,
            digest: String::new(),
        };
        let got = view("v1", &v);
        assert_eq!(
            (got.status, got.content_length, got.piece_count),
            ("complete", Some(10), Some(1))
        );
    }
}
