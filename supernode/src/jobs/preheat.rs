//! What a preheat job does: [`PreheatPlan`] checks a job request once (URL, scope, platform,
//! limits), and [`run`] carries it out. An image job reads the manifest the URL names (through an
//! index to the platform's manifest, every document checked against its digest), then seeds the
//! config and each layer blob from the registry with the job's headers and builds each layer's
//! index, a few blobs at a time; a file job seeds the URL as `POST /api/v1/preheat` does. With
//! scope `all_peers`, every agent subscribed to this supernode ([`crate::subscribers`]) then
//! fetches each seeded blob into its store. Every origin request goes through the supernode's
//! source, so the origin policy applies as to any seed.

use std::collections::BTreeMap;
use std::time::Duration;

use fetcher::source::image::{self, MANIFEST_TYPES, MAX_MANIFEST_BYTES};

use proto::scheduler::HostCommand;

use super::CreateJob;
use crate::layer_index::IndexError;
use crate::scheduler::Scheduling;
use crate::scheduler::index::{IndexRequest, proto_headers, seed, seeded_index, wait_seeded};
use crate::subscribers::HostOutcome;

/// Layers seeded at once when the request does not say.
const DEFAULT_CONCURRENCY: usize = 4;
/// At most this many at once, whatever the request says.
const MAX_CONCURRENCY: usize = 16;
/// How long a job may take when the request does not say.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);

/// Where the content goes. A supernode is the whole seed tier of its tasks, so the two seed
/// scopes are the same here; `all_peers` then has every agent subscribed to this supernode fetch
/// each layer into its store too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    SingleSeedPeer,
    AllSeedPeers,
    AllPeers,
}

impl Scope {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "" | "single_seed_peer" => Ok(Self::SingleSeedPeer),
            "all_seed_peers" => Ok(Self::AllSeedPeers),
            "all_peers" => Ok(Self::AllPeers),
            other => Err(format!(
                "unknown scope {other:?} (single_seed_peer, all_seed_peers or all_peers)"
            )),
        }
    }

    /// The scope's name in the API.
    pub fn name(self) -> &'static str {
        match self {
            Self::SingleSeedPeer => "single_seed_peer",
            Self::AllSeedPeers => "all_seed_peers",
            Self::AllPeers => "all_peers",
        }
    }
}

/// What to preheat: image (a manifest URL) or file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `https://<registry>/v2/<name>/manifests/<reference>`: the registry base, name, reference.
    Image {
        base: String,
        name: String,
        reference: String,
    },
    File,
}

/// A checked job request.
#[derive(Clone, Debug)]
pub struct PreheatPlan {
    pub kind: Kind,
    pub url: String,
    pub tag: String,
    pub filter: String,
    pub headers: BTreeMap<String, String>,
    pub scope: Scope,
    pub platform: String,
    pub concurrency: usize,
    pub timeout: Duration,
}

impl PreheatPlan {
    /// Checks `req`; the error names what is wrong.
    pub fn from_request(req: &CreateJob) -> Result<Self, String> {
        if req.kind != "preheat" {
            return Err(format!("unknown job type {:?} (preheat)", req.kind));
        }
        let a = &req.args;
        let url = url::Url::parse(&a.url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
            .ok_or_else(|| format!("args.url {:?} is not an http(s) URL", a.url))?;
        let kind = match a.kind.as_str() {
            "" | "image" => image_kind(&url)?,
            "file" => Kind::File,
            other => return Err(format!("unknown args.type {other:?} (image or file)")),
        };
        let platform = match a.platform.as_str() {
            "" => image::host_platform(),
            p if p.split_once('/').is_some_and(|(os, arch)| {
                !os.is_empty() && !arch.is_empty() && !arch.contains('/')
            }) =>
            {
                p.to_owned()
            }
            p => return Err(format!("args.platform {p:?} is not os/arch")),
        };
        let concurrency = match a.concurrent_count {
            n if n <= 0 => DEFAULT_CONCURRENCY,
            n => usize::try_from(n)
                .unwrap_or(MAX_CONCURRENCY)
                .min(MAX_CONCURRENCY),
        };
        let timeout = match a.timeout {
            n if n <= 0 => DEFAULT_TIMEOUT,
            n => Duration::from_nanos(n.unsigned_abs()),
        };
        Ok(Self {
            kind,
            url: a.url.clone(),
            tag: a.tag.clone(),
            filter: a.filtered_query_params.clone(),
            headers: a.headers.clone().unwrap_or_default(),
            scope: Scope::parse(&a.scope)?,
            platform,
            concurrency,
            timeout,
        })
    }
}

/// Splits a manifest URL into registry base, repository name and reference.
fn image_kind(url: &url::Url) -> Result<Kind, String> {
    let bad = || {
        format!(
            "args.url {:?} is not a manifest URL (https://<registry>/v2/<name>/manifests/<tag or digest>)",
            fetcher::source::redact(url.as_str())
        )
    };
    let path = url.path();
    let rest = path.strip_prefix("/v2/").ok_or_else(bad)?;
    let (name, reference) = rest.rsplit_once("/manifests/").ok_or_else(bad)?;
    let name_ok = !name.is_empty()
        && name.split('/').all(|c| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        });
    let ref_ok = !reference.is_empty()
        && reference.len() <= 128 + 7
        && reference
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b));
    if !name_ok || !ref_ok {
        return Err(bad());
    }
    let mut base = url.clone();
    base.set_path("");
    base.set_query(None);
    base.set_fragment(None);
    Ok(Kind::Image {
        base: base.as_str().trim_end_matches('/').to_owned(),
        name: name.to_owned(),
        reference: reference.to_owned(),
    })
}

/// What a job did: the URLs seeded, the ones that failed and why, a failure before any (the
/// manifest could not be read), and what each agent did (scope `all_peers`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub seeded: Vec<String>,
    pub failed: Vec<(String, String)>,
    pub error: Option<String>,
    pub agents: Vec<HostOutcome>,
}

/// Carries out `plan` as job `job`, within its timeout.
pub async fn run(s: &Scheduling, job: u64, plan: &PreheatPlan) -> Outcome {
    let started = tokio::time::Instant::now();
    let work = async {
        match &plan.kind {
            Kind::Image {
                base,
                name,
                reference,
            } => image_job(s, plan, base, name, reference).await,
            Kind::File => file_job(s, plan).await,
        }
    };
    let mut outcome = match tokio::time::timeout(plan.timeout, work).await {
        Ok(outcome) => outcome,
        Err(_) => {
            return Outcome {
                error: Some(format!("the job took longer than {:?}", plan.timeout)),
                ..Default::default()
            };
        }
    };
    if plan.scope == Scope::AllPeers && !outcome.blobs.is_empty() {
        let commands: Vec<HostCommand> = outcome
            .blobs
            .iter()
            .map(|(url, digest)| HostCommand {
                job,
                url: url.clone(),
                headers: proto_headers(&plan.headers),
                digest: digest.clone(),
            })
            .collect();
        let left = plan.timeout.saturating_sub(started.elapsed());
        outcome.outcome.agents = s.subscribers.fan_out(job, &commands, left).await;
    }
    outcome.outcome
}

/// A job's outcome on the seed tier, and the blobs (URL, digest) it seeded.
struct Seeded {
    outcome: Outcome,
    blobs: Vec<(String, String)>,
}

async fn file_job(s: &Scheduling, plan: &PreheatPlan) -> Seeded {
    let req = crate::http::PreheatRequest {
        url: plan.url.clone(),
        headers: plan.headers.clone(),
        tag: plan.tag.clone(),
        filter: plan.filter.clone(),
    };
    let url = fetcher::source::redact(&plan.url);
    let result = match crate::scheduler::register_for_preheat(s, req).await {
        Ok((_, version)) => wait_seeded(s, &version).await,
        Err(e) => Err(e.message),
    };
    let outcome = match result {
        Ok(()) => Outcome {
            seeded: vec![url],
            ..Default::default()
        },
        Err(e) => Outcome {
            failed: vec![(url, e)],
            ..Default::default()
        },
    };
    // Agents fetch registry blobs by digest; a file has none to fetch by.
    Seeded {
        outcome,
        blobs: Vec::new(),
    }
}

async fn image_job(
    s: &Scheduling,
    plan: &PreheatPlan,
    base: &str,
    name: &str,
    reference: &str,
) -> Seeded {
    let blobs = match layer_blobs(s, plan, base, name, reference).await {
        Ok(b) => b,
        Err(e) => {
            return Seeded {
                outcome: Outcome {
                    error: Some(e),
                    ..Default::default()
                },
                blobs: Vec::new(),
            };
        }
    };
    use futures::StreamExt;
    let results: Vec<(String, String, Result<(), String>)> = futures::stream::iter(blobs)
        .map(|(digest, layer)| async move {
            let url = format!("{base}/v2/{name}/blobs/{digest}");
            let req = IndexRequest {
                url: url.clone(),
                headers: plan.headers.clone().into_iter().collect(),
                digest: digest.clone(),
            };
            let r = match owner_elsewhere(s, &digest) {
                // Agents ask the layer's owner: it seeds and indexes it.
                Some((cluster, owner)) if layer => cluster.seed_layer_at(&owner, req.into()).await,
                _ => {
                    let r = if layer {
                        seeded_index(s, &req).await.map(|_| ())
                    } else {
                        seed(s, &req).await
                    };
                    match r {
                        // Seeded; a layer that cannot be indexed is still pulled from the seed.
                        Ok(()) | Err(IndexError::Unindexable { .. }) => Ok(()),
                        Err(e) => Err(e.to_string()),
                    }
                }
            };
            (url, digest, r)
        })
        .buffer_unordered(plan.concurrency)
        .collect()
        .await;
    let mut out = Seeded {
        outcome: Outcome::default(),
        blobs: Vec::new(),
    };
    for (url, digest, r) in results {
        match r {
            Ok(()) => {
                out.outcome.seeded.push(url.clone());
                out.blobs.push((url, digest));
            }
            Err(e) => out.outcome.failed.push((url, e)),
        }
    }
    out
}

/// The cluster and the supernode that owns the task of blob `digest`, when that is another one.
fn owner_elsewhere(
    s: &Scheduling,
    digest: &str,
) -> Option<(std::sync::Arc<crate::replica::Cluster>, String)> {
    let cluster = s.seed.cluster.clone()?;
    let task_id = fetcher::task_id::content_task_id(digest).ok()?;
    let owner = cluster.owner_elsewhere(&task_id)?;
    Some((cluster, owner))
}

/// The blobs of the image: its config, then its layers in manifest order, each with whether it
/// is a layer (indexed for lazy starts).
async fn layer_blobs(
    s: &Scheduling,
    plan: &PreheatPlan,
    base: &str,
    name: &str,
    reference: &str,
) -> Result<Vec<(String, bool)>, String> {
    let image = format!("{name}:{reference}");
    let (bytes, media_type) = document(s, plan, base, name, reference).await?;
    if reference.starts_with("sha256:") {
        image::check_digest("manifest", &bytes, reference).map_err(|e| e.to_string())?;
    }
    let manifest = if image::is_index(&media_type) {
        let digest =
            image::platform_manifest(&bytes, &plan.platform, &image).map_err(|e| e.to_string())?;
        let (m, _) = document(s, plan, base, name, &digest).await?;
        image::check_digest("manifest", &m, &digest).map_err(|e| e.to_string())?;
        m
    } else {
        bytes
    };
    let m = image::manifest(&manifest).map_err(|e| e.to_string())?;
    // The config too: every pull asks for it (a few hundred bytes, but a request per host).
    let mut blobs = vec![(m.config, false)];
    blobs.extend(m.blobs.into_iter().map(|b| (b.digest, true)));
    Ok(blobs)
}

/// `GET <base>/v2/<name>/manifests/<reference>`: the document and its media type.
async fn document(
    s: &Scheduling,
    plan: &PreheatPlan,
    base: &str,
    name: &str,
    reference: &str,
) -> Result<(bytes::Bytes, String), String> {
    let url = format!("{base}/v2/{name}/manifests/{reference}");
    let mut headers: Vec<(String, String)> = plan
        .headers
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("accept"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    headers.push(("Accept".into(), MANIFEST_TYPES.join(", ")));
    let r = s
        .seed
        .source
        .get(&url, &headers, None)
        .await
        .map_err(|e| e.to_string())?;
    let media_type = r.content_type().to_owned();
    let bytes = r
        .bytes_bounded(MAX_MANIFEST_BYTES)
        .await
        .map_err(|e| e.to_string())?;
    Ok((bytes, media_type))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::JobArgs;

    fn job(kind: &str, url: &str, scope: &str) -> CreateJob {
        CreateJob {
            kind: "preheat".into(),
            args: JobArgs {
                kind: kind.into(),
                url: url.into(),
                tag: String::new(),
                filtered_query_params: String::new(),
                headers: None,
                scope: scope.into(),
                platform: String::new(),
                concurrent_count: 0,
                timeout: 0,
            },
            scheduler_cluster_ids: None,
        }
    }

    #[test]
    fn a_manifest_url_names_registry_repository_and_reference() {
        let p = PreheatPlan::from_request(&job(
            "image",
            "https://harbor.example.com:8443/v2/library/team/app/manifests/v1.2",
            "all_peers",
        ))
        .expect("plan");
        assert_eq!(
            p.kind,
            Kind::Image {
                base: "https://harbor.example.com:8443".into(),
                name: "library/team/app".into(),
                reference: "v1.2".into(),
            }
        );
        assert_eq!(p.scope, Scope::AllPeers);
        assert_eq!(p.concurrency, DEFAULT_CONCURRENCY);
        assert_eq!(p.timeout, DEFAULT_TIMEOUT);
        assert_eq!(p.platform, image::host_platform());
    }

    #[test]
    fn bad_requests_are_refused_by_what_is_wrong() {
        let refuse = |kind: &str, url: &str, scope: &str, want: &str| {
            let err = PreheatPlan::from_request(&job(kind, url, scope)).expect_err(url);
            assert!(err.contains(want), "{url}: {err}");
        };
        let m = "https://r.example/v2/app/manifests/v1";
        refuse("image", m, "single_peer", "unknown scope \"single_peer\"");
        refuse("chart", m, "", "unknown args.type");
        refuse(
            "image",
            "ftp://r.example/v2/app/manifests/v1",
            "",
            "not an http(s) URL",
        );
        refuse(
            "image",
            "https://r.example/app/v1",
            "",
            "not a manifest URL",
        );
        refuse(
            "image",
            "https://r.example/v2/App/manifests/v1",
            "",
            "not a manifest URL",
        );
        refuse(
            "image",
            "https://r.example/v2/a/manifests/..%2F",
            "",
            "not a manifest URL",
        );
        let mut j = job("image", m, "");
        j.kind = "sync_peers".into();
        assert!(PreheatPlan::from_request(&j).is_err());
        j.kind = "preheat".into();
        j.args.platform = "linux".into();
        let err = PreheatPlan::from_request(&j).expect_err("platform");
        assert!(err.contains("not os/arch"), "{err}");
    }

    #[test]
    fn limits_are_bounded_and_files_take_any_url() {
        let mut j = job("file", "https://files.example/a.iso?Expires=1", "");
        j.args.concurrent_count = 1_000_000;
        j.args.timeout = 5_000_000_000;
        let p = PreheatPlan::from_request(&j).expect("plan");
        assert_eq!(p.kind, Kind::File);
        assert_eq!(p.concurrency, MAX_CONCURRENCY);
        assert_eq!(p.timeout, Duration::from_secs(5));
        assert_eq!(p.scope, Scope::SingleSeedPeer);
    }
}
