//! Preheat jobs as Harbor's P2P preheat speaks to a Dragonfly manager, so a Harbor "P2P Preheat"
//! policy with the provider set to Dragonfly and the endpoint set to a supernode's HTTPS address
//! works unchanged: `GET /healthy`, `POST /oapi/v1/jobs` (type `preheat`, args `type`/`url`/
//! `headers`/`scope`/...), `GET /oapi/v1/jobs/{id}`, with the admin token as the personal access
//! token (`Authorization: Bearer`, Harbor's "OAuth" auth mode).
//!
//! What Harbor's driver relies on, and this keeps: a create answers 2xx but never 208 (Harbor
//! takes a 208 for an error); job ids are JSON integers; a job's `state` is `PENDING` until it is
//! `SUCCESS` or `FAILURE` (Harbor fails a task on any other state); `result.job_states[].results[]`
//! lists `success_tasks` and `failure_tasks` (`url`, `hostname`, `ip`, `description`), and a
//! failure's reasons are in `job_states[].error`.
//!
//! An image job ([`preheat`]) resolves the manifest URL Harbor sends (an index to the platform's
//! manifest), then seeds the config and every layer once from the registry with the credentials
//! Harbor sent, and builds each layer's index, so later pulls and lazy starts take nothing from
//! the registry; with scope `all_peers` the subscribed agents fetch every blob too.

mod preheat;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::http::Admin;
use crate::scheduler::Scheduling;

pub use preheat::{Outcome, PreheatPlan, Scope};

/// Jobs remembered; past this the oldest finished ones are forgotten.
const MAX_JOBS: usize = 1024;

/// `POST /oapi/v1/jobs` body (unknown fields are ignored: Harbor's driver may grow).
#[derive(Debug, Deserialize)]
pub struct CreateJob {
    #[serde(rename = "type")]
    pub kind: String,
    pub args: JobArgs,
    /// Dragonfly's scheduler clusters; a supernode is one cluster, so ids are accepted and unused.
    #[serde(default)]
    pub scheduler_cluster_ids: Option<Vec<u64>>,
}

/// A preheat job's arguments.
#[derive(Debug, Deserialize)]
pub struct JobArgs {
    /// `image` (a manifest URL) or `file` (any URL, seeded as dfget would fetch it).
    #[serde(rename = "type", default)]
    pub kind: String,
    pub url: String,
    #[serde(default)]
    pub tag: String,
    /// `&`-separated query parameters that do not name the content (as dfget's --filter).
    #[serde(default)]
    pub filtered_query_params: String,
    /// Sent to the registry with every request (Harbor: its pull token for the repository).
    #[serde(default)]
    pub headers: Option<BTreeMap<String, String>>,
    /// `single_seed_peer` (default), `all_seed_peers` or `all_peers`.
    #[serde(default)]
    pub scope: String,
    /// `os/arch` of the image to preheat (default: the supernode's own).
    #[serde(default)]
    pub platform: String,
    /// Layers seeded at once (0: 4).
    #[serde(default)]
    pub concurrent_count: i64,
    /// Nanoseconds the job may take (0: one hour).
    #[serde(default)]
    pub timeout: i64,
}

/// A job as the API shows it (the shape Harbor's driver parses).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct JobView {
    pub id: u64,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub state: &'static str,
    pub created_at: String,
    pub updated_at: String,
    pub result: JobResult,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct JobResult {
    pub job_states: Vec<JobState>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct JobState {
    /// Empty unless the job failed.
    pub error: String,
    pub results: Vec<ClusterResult>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ClusterResult {
    pub success_tasks: Vec<TaskRef>,
    pub failure_tasks: Vec<TaskRef>,
    pub scheduler_cluster_id: u64,
}

/// One blob (or file) of a job, where it was seeded, and why not when it failed.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct TaskRef {
    pub url: String,
    pub hostname: String,
    pub ip: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
}

struct Job {
    view: JobView,
    done: bool,
}

/// The jobs of this supernode (in memory: Harbor polls a job for at most half an hour).
#[derive(Default)]
pub struct Jobs {
    next: AtomicU64,
    jobs: std::sync::Mutex<BTreeMap<u64, Job>>,
}

fn now() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

impl Jobs {
    fn table(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Job>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a new pending job; returns its view.
    fn create(&self) -> JobView {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let t = now();
        let view = JobView {
            id,
            kind: "preheat",
            state: "PENDING",
            created_at: t.clone(),
            updated_at: t,
            result: JobResult::default(),
        };
        let mut jobs = self.table();
        while jobs.len() >= MAX_JOBS {
            let oldest = jobs
                .iter()
                .find(|(_, j)| j.done)
                .or_else(|| jobs.iter().next())
                .map(|(id, _)| *id);
            match oldest {
                Some(id) => jobs.remove(&id),
                None => break,
            };
        }
        jobs.insert(
            id,
            Job {
                view: view.clone(),
                done: false,
            },
        );
        view
    }

    /// Ends job `id` with what its tasks did.
    fn finish(&self, id: u64, outcome: &Outcome, host: &TaskRef) {
        if let Some(job) = self.table().get_mut(&id) {
            job.view = finished_view(&job.view, outcome, host);
            job.done = true;
        }
    }

    /// The job's view, if it is remembered.
    pub fn get(&self, id: u64) -> Option<JobView> {
        self.table().get(&id).map(|j| j.view.clone())
    }
}

/// `view` after its tasks ran: `SUCCESS` when every one was seeded, else `FAILURE` with the
/// failures' descriptions joined in the job state's error.
pub fn finished_view(view: &JobView, outcome: &Outcome, host: &TaskRef) -> JobView {
    let at = |url: &str, description: &str| TaskRef {
        url: url.to_owned(),
        description: description.to_owned(),
        ..host.clone()
    };
    let mut success_tasks: Vec<TaskRef> = outcome.seeded.iter().map(|u| at(u, "")).collect();
    let mut failure_tasks: Vec<TaskRef> = outcome.failed.iter().map(|(u, d)| at(u, d)).collect();
    let mut errors: Vec<String> = outcome.error.iter().cloned().collect();
    errors.extend(outcome.failed.iter().map(|(u, d)| format!("{u}: {d}")));
    for a in &outcome.agents {
        let t = TaskRef {
            url: a.url.clone(),
            hostname: a.hostname.clone(),
            ip: a.ip.clone(),
            description: a.result.as_ref().err().cloned().unwrap_or_default(),
        };
        match &a.result {
            Ok(()) => success_tasks.push(t),
            Err(e) => {
                errors.push(format!("{} on {}: {e}", a.url, a.hostname));
                failure_tasks.push(t);
            }
        }
    }
    JobView {
        state: if errors.is_empty() {
            "SUCCESS"
        } else {
            "FAILURE"
        },
        updated_at: now(),
        result: JobResult {
            job_states: vec![JobState {
                error: errors.join("; "),
                results: vec![ClusterResult {
                    success_tasks,
                    failure_tasks,
                    scheduler_cluster_id: 1,
                }],
            }],
        },
        ..view.clone()
    }
}

/// The routes, on the supernode's HTTPS port.
pub fn router() -> axum::Router<Arc<Scheduling>> {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/healthy", get(|| async { "ok" }))
        .route("/oapi/v1/jobs", post(create))
        .route("/oapi/v1/jobs/{id}", get(show))
}

/// A refusal with a JSON body, as a Dragonfly manager answers.
fn refuse(status: StatusCode, message: String) -> Response {
    #[derive(Serialize)]
    struct Refusal {
        message: String,
    }
    (status, Json(Refusal { message })).into_response()
}

async fn create(
    State(s): State<Arc<Scheduling>>,
    _admin: Admin,
    body: Result<Json<CreateJob>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(req)) => req,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("job request: {e}")),
    };
    let plan = match PreheatPlan::from_request(&req) {
        Ok(plan) => plan,
        Err(why) => return refuse(StatusCode::BAD_REQUEST, why),
    };
    let view = s.jobs.create();
    let id = view.id;
    tracing::info!(
        job = id,
        url = %fetcher::source::redact(&plan.url),
        scope = plan.scope.name(),
        "preheat job"
    );
    let shared = s.clone();
    tokio::spawn(async move {
        let outcome = preheat::run(&shared, id, &plan).await;
        let host = TaskRef {
            url: String::new(),
            hostname: hostname(),
            ip: shared
                .cfg
                .advertise_ip
                .map(|ip| ip.to_string())
                .unwrap_or_default(),
            description: String::new(),
        };
        tracing::info!(
            job = id,
            seeded = outcome.seeded.len(),
            failed = outcome.failed.len(),
            error = outcome.error.as_deref().unwrap_or(""),
            "preheat job finished"
        );
        shared.jobs.finish(id, &outcome, &host);
    });
    (StatusCode::OK, Json(view)).into_response()
}

async fn show(State(s): State<Arc<Scheduling>>, _admin: Admin, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<u64>() else {
        return refuse(StatusCode::BAD_REQUEST, format!("bad job id {id:?}"));
    };
    match s.jobs.get(id) {
        Some(view) => Json(view).into_response(),
        None => refuse(StatusCode::NOT_FOUND, format!("no job {id}")),
    }
}

/// This machine's name (shown as the seed's host in job results).
fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> TaskRef {
        TaskRef {
            url: String::new(),
            hostname: "sn1".into(),
            ip: "10.0.0.1".into(),
            description: String::new(),
        }
    }

    #[test]
    fn a_job_is_pending_until_its_outcome_says_success_or_failure() {
        let jobs = Jobs::default();
        let a = jobs.create();
        let b = jobs.create();
        assert_eq!((a.id, b.id), (1, 2));
        assert_eq!(jobs.get(1).map(|v| v.state), Some("PENDING"));
        let ok = Outcome {
            seeded: vec!["https://r/v2/a/blobs/sha256:1".into()],
            ..Default::default()
        };
        jobs.finish(1, &ok, &host());
        let v = jobs.get(1).expect("job 1");
        assert_eq!(v.state, "SUCCESS");
        let r = &v.result.job_states[0];
        assert_eq!(r.error, "");
        assert_eq!(r.results[0].success_tasks[0].hostname, "sn1");
        let bad = Outcome {
            seeded: vec!["u1".into()],
            failed: vec![("u2".into(), "registry answered 401".into())],
            error: None,
            agents: vec![crate::subscribers::HostOutcome {
                hostname: "node-7".into(),
                ip: "10.0.0.7".into(),
                url: "u1".into(),
                result: Ok(()),
            }],
        };
        jobs.finish(2, &bad, &host());
        let v = jobs.get(2).expect("job 2");
        assert_eq!(v.state, "FAILURE");
        assert!(
            v.result.job_states[0]
                .error
                .contains("u2: registry answered 401")
        );
        assert_eq!(
            v.result.job_states[0].results[0].failure_tasks[0].description,
            "registry answered 401"
        );
        let agent = &v.result.job_states[0].results[0].success_tasks[1];
        assert_eq!(
            (agent.hostname.as_str(), agent.url.as_str()),
            ("node-7", "u1")
        );
        assert!(jobs.get(3).is_none());
    }

    #[test]
    fn the_job_table_forgets_the_oldest_finished_jobs_first() {
        let jobs = Jobs::default();
        let first = jobs.create().id;
        jobs.create();
        jobs.finish(2, &Outcome::default(), &host());
        for _ in 2..MAX_JOBS {
            jobs.create();
        }
        jobs.create();
        assert!(jobs.get(first).is_some(), "the unfinished job stays");
        assert!(jobs.get(2).is_none(), "the finished one goes");
        assert_eq!(jobs.table().len(), MAX_JOBS);
    }

    #[test]
    fn a_view_has_the_fields_harbor_parses() {
        let v = Jobs::default().create();
        let json = serde_json::to_value(&v).expect("json");
        assert!(json["id"].is_u64());
        assert_eq!(json["state"], "PENDING");
        assert!(json["result"]["job_states"].is_array());
        let at = json["created_at"].as_str().unwrap_or("");
        assert!(
            at.contains('T') && at.ends_with('Z'),
            "RFC 3339 in UTC: {json}"
        );
    }
}
