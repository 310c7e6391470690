//! Harbor's P2P preheat provider for Dragonfly, as a test client: the requests Harbor's driver
//! (`src/pkg/p2p/preheat/provider/dragonfly.go`, v2.12 and later, and its HTTP client) makes, and
//! the way it reads the answers, written from that source so the supernode is held to what Harbor
//! really accepts:
//! - health: `GET {endpoint}/healthy`, any 2xx is healthy;
//! - create: `POST {endpoint}/oapi/v1/jobs` with every field of the request (no `omitempty`), the
//!   personal access token as `Authorization: Bearer` (auth mode OAUTH); any 2xx but 208 (which
//!   the driver turns into an error) is accepted, and the answer must carry an integer `id`;
//! - progress: `GET {endpoint}/oapi/v1/jobs/{id}`: `PENDING` is running, `SUCCESS` and `FAILURE`
//!   end the task, and any other state fails it (`unknown state: X`).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::json;

/// Harbor's view of a preheat task.
#[derive(Debug, PartialEq, Eq)]
pub enum Status {
    Running,
    /// The table of blob URLs Harbor logs: `(url, "SUCCESS" | "FAILURE", description)`.
    Success(Vec<(String, String, String)>),
    /// The errors of the job's states.
    Fail(String),
}

/// The answer both job calls parse (Go: `dragonflyJobResponse`; unknown fields ignored, any
/// type mismatch an error).
#[derive(Debug, Deserialize)]
struct JobResponse {
    id: i64,
    #[serde(default)]
    created_at: Option<String>,
    #[serde(default)]
    updated_at: Option<String>,
    #[serde(default)]
    state: String,
    #[serde(default)]
    result: JobResult,
}

#[derive(Debug, Default, Deserialize)]
struct JobResult {
    #[serde(default)]
    job_states: Option<Vec<JobState>>,
}

#[derive(Debug, Deserialize)]
struct JobState {
    #[serde(default)]
    error: String,
    #[serde(default)]
    results: Option<Vec<ClusterResult>>,
}

#[derive(Debug, Deserialize)]
struct ClusterResult {
    #[serde(default)]
    success_tasks: Option<Vec<TaskRef>>,
    #[serde(default)]
    failure_tasks: Option<Vec<TaskRef>>,
    #[serde(default)]
    #[allow(dead_code)]
    scheduler_cluster_id: u64,
}

#[derive(Debug, Deserialize)]
struct TaskRef {
    url: String,
    #[serde(default)]
    #[allow(dead_code)]
    hostname: String,
    #[serde(default)]
    #[allow(dead_code)]
    ip: String,
    #[serde(default)]
    description: String,
}

/// A Harbor preheat instance: provider Dragonfly, the endpoint, auth mode OAUTH with `token`.
pub struct Driver {
    pub endpoint: String,
    pub token: Option<String>,
    pub client: reqwest::Client,
}

/// Go's `time.Time` accepts RFC 3339 (or a missing field: the zero time).
fn check_time(t: &Option<String>) -> Result<(), String> {
    match t.as_deref() {
        None => Ok(()),
        Some(s) if is_rfc3339(s) => Ok(()),
        Some(s) => Err(format!("parsing time {s:?} as RFC3339")),
    }
}

fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && (s.ends_with('Z') || s[19..].contains('+') || s[19..].contains('-'))
        && [0..4, 5..7, 8..10, 11..13, 14..16, 17..19]
            .into_iter()
            .all(|r| s[r].bytes().all(|c| c.is_ascii_digit()))
}

/// Sends a job call and reads its answer as the driver's HTTP client and JSON decoding do: any
/// non-2xx is an error, and so is a 208 (only POSTs see one); the body must be a job.
async fn answer(r: reqwest::RequestBuilder, what: &str) -> Result<JobResponse, String> {
    let r = r
        .header("Accept", "application/json")
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    let text = r.text().await.map_err(|e| e.to_string())?;
    if status / 100 != 2 {
        return Err(format!("{what} error: {status} {text}"));
    }
    if status == 208 {
        return Err("http error: code 208, message status already reported".into());
    }
    let job: JobResponse = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
    check_time(&job.created_at)?;
    check_time(&job.updated_at)?;
    Ok(job)
}

impl Driver {
    fn url(&self, path: &str) -> String {
        format!(
            "{}{path}",
            self.endpoint.strip_suffix('/').unwrap_or(&self.endpoint)
        )
    }

    fn auth(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => rb.header("Authorization", format!("Bearer {t}")),
            None => rb,
        }
    }

    /// `GetHealth`.
    pub async fn health(&self) -> Result<(), String> {
        let r = self
            .auth(self.client.get(self.url("/healthy")))
            .header("Accept", "application/json")
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if r.status().is_success() {
            Ok(())
        } else {
            Err(format!("GET /healthy: {}", r.status()))
        }
    }

    /// `Preheat`: returns the task id (`%d` of the answer's id).
    pub async fn preheat(
        &self,
        url: &str,
        headers: &BTreeMap<String, String>,
        scope: &str,
    ) -> Result<String, String> {
        let body = json!({
            "type": "preheat",
            "args": {
                "type": "image",
                "url": url,
                "tag": "",
                "filtered_query_params": "",
                "headers": headers,
                "scope": scope,
                "concurrent_count": 0,
                "timeout": 0,
            },
            "scheduler_cluster_ids": serde_json::Value::Null,
        });
        let r = self
            .auth(self.client.post(self.url("/oapi/v1/jobs")))
            .header("Content-Type", "application/json")
            .body(body.to_string());
        let job = answer(r, "POST /oapi/v1/jobs").await?;
        Ok(job.id.to_string())
    }

    /// `CheckProgress`.
    pub async fn check_progress(&self, task_id: &str) -> Result<Status, String> {
        if task_id.is_empty() {
            return Err("empty task id".into());
        }
        let path = format!("/oapi/v1/jobs/{task_id}");
        let r = self.auth(self.client.get(self.url(&path)));
        let job = answer(r, &format!("GET {path}")).await?;
        let states = job.result.job_states.unwrap_or_default();
        match job.state.as_str() {
            "PENDING" => Ok(Status::Running),
            "SUCCESS" => {
                let mut rows = Vec::new();
                for r in states.iter().flat_map(|s| s.results.iter().flatten()) {
                    for t in r.success_tasks.iter().flatten() {
                        rows.push((t.url.clone(), "SUCCESS".into(), String::new()));
                    }
                    for t in r.failure_tasks.iter().flatten() {
                        rows.push((t.url.clone(), "FAILURE".into(), t.description.clone()));
                    }
                }
                Ok(Status::Success(rows))
            }
            "FAILURE" => {
                let errors: Vec<&str> = states.iter().map(|s| s.error.as_str()).collect();
                Ok(Status::Fail(errors.join("\n")))
            }
            other => Ok(Status::Fail(format!("unknown state: {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_as_go_reads_it() {
        assert!(super::is_rfc3339("2026-12-06T13:55:00.123Z"));
        assert!(super::is_rfc3339("2026-12-06T13:55:00+01:00"));
        assert!(!super::is_rfc3339("2026-12-06 13:55:00"));
        assert!(!super::is_rfc3339("1733493300"));
    }
}
