//! Registration: find or start the task version a peer joins, revalidating a finished version with
//! the origin and checking the peer's credentials with the origin when the version has not seen them.
//! A content-keyed task (registry blob by digest) is joined through another URL or other
//! credentials only once that URL served a random range of the very bytes the seed holds
//! ([`super::proof`]): a server echoing the right length and ETag gets nothing.

use std::sync::Arc;
use std::time::Instant;

use fetcher::source::HeaderPair;
use proto::scheduler::{ErrorKind, Register, TaskError};

use super::Scheduling;
use super::proof::{self, ProofError};
use crate::seed::{self, task_error};
use crate::task::{Status, Version, fingerprint, url_key};

fn invalid(message: String) -> TaskError {
    TaskError {
        kind: ErrorKind::Invalid as i32,
        http_status: 0,
        message,
    }
}

/// Validates a registration and returns the version the peer joins.
pub async fn join(s: &Scheduling, reg: &Register) -> Result<Arc<Version>, TaskError> {
    let filter = reg.filter.clone();
    let key = (!reg.content_key.is_empty()).then_some(reg.content_key.as_str());
    let task_id = fetcher::task_id::task_id_of(&reg.url, &reg.tag, &filter, key)
        .map_err(|e| invalid(e.to_string()))?;
    if let Some(p) = s.seed.source.policy() {
        let url = url::Url::parse(&reg.url).map_err(|e| invalid(e.to_string()))?;
        p.check(&url).map_err(|e| {
            s.metrics.refused.with_label_values(&["origin"]).inc();
            invalid(e.to_string())
        })?;
    }
    if task_id != reg.task_id {
        return Err(invalid(format!(
            "task id {} does not match url, tag and filter",
            reg.task_id
        )));
    }
    let headers: Vec<HeaderPair> = reg
        .headers
        .iter()
        .map(|h| (h.name.clone(), h.value.clone()))
        .collect();
    let fp = fingerprint(key.map(|_| url_key(&reg.url)).as_deref(), &headers);
    if reg.seed_only
        && s.tasks.current(&task_id).is_none()
        && !s.seed.cluster.as_ref().is_some_and(|c| c.knows(&task_id))
    {
        // A peer that only wants to keep serving must not start a seed from the origin.
        return Err(invalid(
            "this supernode neither has the task nor its metadata: nothing to serve it for".into(),
        ));
    }

    // Get the current version or start one, atomically.
    let new_version = || {
        Version::new(
            task_id.clone(),
            reg.url.clone(),
            headers.clone(),
            key.map(str::to_owned),
        )
    };
    let (version, created) = current_or_new(s, &task_id, |cur| !cur.failed(), new_version);
    if created {
        return Ok(version);
    }
    let (complete, known) = {
        let st = version.lock();
        (
            matches!(st.status, Status::Complete { .. }),
            st.validated.contains(&fp),
        )
    };
    if !complete && known {
        return Ok(version);
    }
    if key.is_some() {
        // The content cannot change under its digest: only access is in question, asked again
        // for every registration of a finished version (a revoked credential stops working).
        s.metrics
            .source_requests
            .with_label_values(&["proof"])
            .inc();
        return match proof::prove(&s.seed.source, &version, &reg.url, &headers, &s.shutdown).await {
            Ok(()) => {
                version.lock().validated.insert(fp);
                Ok(version)
            }
            Err(ProofError::Origin(e)) => Err(task_error(&e)),
            Err(ProofError::Mismatch(why)) => {
                s.metrics.refused.with_label_values(&["register"]).inc();
                tracing::warn!(url = %fetcher::source::redact(&reg.url), %why, "content-keyed registration refused");
                Err(TaskError {
                    kind: if complete {
                        ErrorKind::Invalid
                    } else {
                        ErrorKind::Internal
                    } as i32,
                    http_status: 0,
                    message: why,
                })
            }
            Err(ProofError::Unavailable(why)) => Err(TaskError {
                kind: ErrorKind::Internal as i32,
                http_status: 0,
                message: why,
            }),
        };
    }
    // A finished version may be stale, and unknown credentials must be accepted by the origin
    // before this peer gets any piece: one small ranged request answers both.
    s.metrics
        .source_requests
        .with_label_values(&["probe"])
        .inc();
    let probe = s
        .seed
        .source
        .probe(&reg.url, &headers)
        .await
        .map_err(|e| task_error(&e))?;
    let changed = {
        let mut st = version.lock();
        st.validated.insert(fp);
        st.last_validated = Instant::now();
        match &st.info {
            Some(info) => {
                let len_changed = info.content_length >= 0
                    && probe.content_length.map(|l| l as i64) != Some(info.content_length);
                len_changed || info.etag != probe.etag || info.last_modified != probe.last_modified
            }
            None => false,
        }
    };
    if !changed {
        return Ok(version);
    }
    tracing::info!(task_id = %&task_id[..16], "origin content changed: starting a new version");
    // Another registration may have replaced it already.
    let (fresh, _) = current_or_new(
        s,
        &task_id,
        |cur| !Arc::ptr_eq(cur, &version) && !cur.failed(),
        new_version,
    );
    Ok(fresh)
}

/// The current version of `task_id` if `keep(current)`, else a new one from `make`, installed as
/// current and seeding. Returns it and whether it is new.
fn current_or_new(
    s: &Scheduling,
    task_id: &str,
    keep: impl FnOnce(&Arc<Version>) -> bool,
    make: impl FnOnce() -> Arc<Version>,
) -> (Arc<Version>, bool) {
    let (v, created) = s.tasks.with_current(|m| match m.get(task_id) {
        Some(cur) if keep(cur) => (cur.clone(), false),
        _ => {
            let v = make();
            m.insert(task_id.to_owned(), v.clone());
            (v, true)
        }
    });
    if created {
        tokio::spawn(seed::seed(s.seed.clone(), v.clone()));
    }
    (v, created)
}
