//! The scheduler gRPC service: one session per (peer, task) stream.

pub mod assign;
pub mod identity;
pub mod index;
pub mod per_host;
mod proof;
pub mod realms;
mod register;
mod session;
mod start;

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use proto::scheduler::scheduler_server::Scheduler;
use proto::scheduler::{PeerMessage, SchedulerMessage};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::isolation::Isolation;
use crate::metrics::Metrics;
use crate::seed::SeedContext;
use crate::task::Tasks;

/// Scheduling knobs (see `supernode.toml`).
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub limits: assign::Limits,
    /// The IP of this supernode's piece server, or `None` to derive it per connection.
    pub advertise_ip: Option<std::net::IpAddr>,
    pub http_port: u16,
    /// `https` with cluster TLS (every piece server of the cluster then runs it), else `http`.
    pub http_scheme: &'static str,
    /// The admin API's bearer token (`None`: the admin API is disabled).
    pub admin_token: Option<String>,
}

impl SchedulerConfig {
    /// The base URL of a piece server at `addr`.
    pub fn base_url(&self, addr: std::net::SocketAddr) -> String {
        format!("{}://{addr}", self.http_scheme)
    }
}

/// Shared by every session.
pub struct Scheduling {
    pub cfg: SchedulerConfig,
    /// Sessions and one-shot RPCs per host.
    pub per_host: per_host::PerHost,
    pub tasks: Arc<Tasks>,
    pub seed: Arc<SeedContext>,
    pub isolation: Isolation,
    pub metrics: Metrics,
    pub shutdown: fetcher::Shutdown,
    /// Registry token fetches shared by every peer.
    pub tokens: fetcher::source::token::TokenCache,
    /// Layer indexes of seeded registry blobs.
    pub indexes: crate::layer_index::Indexes,
    /// What the first start of each layer read.
    pub start_sets: crate::start_sets::StartSets,
    /// Ticket signing for pieces and indexes.
    pub tickets: Arc<crate::tickets::Tickets>,
    /// Preheat jobs (Harbor's P2P preheat API).
    pub jobs: crate::jobs::Jobs,
    /// Host agents subscribed for work (preheats of scope all_peers).
    pub subscribers: Arc<crate::subscribers::Subscribers>,
    /// Token realms registries announced.
    pub realms: realms::Realms,
}

/// The tonic service.
#[derive(Clone)]
pub struct SchedulerService {
    pub(crate) inner: Arc<Scheduling>,
}

impl SchedulerService {
    /// Wraps the shared scheduling state.
    pub fn new(inner: Arc<Scheduling>) -> Self {
        Self { inner }
    }

    fn refuse(&self, why: &'static str, message: &str) -> Status {
        self.refuse_as(why, Status::resource_exhausted(message.to_owned()))
    }

    fn refuse_as(&self, why: &'static str, status: Status) -> Status {
        self.inner.metrics.refused.with_label_values(&[why]).inc();
        status
    }

    /// A session slot of the caller's host (see [`per_host`]).
    fn admit_session(&self, caller: &identity::Caller) -> Result<per_host::Slot, Status> {
        self.inner
            .per_host
            .session(&caller.host(""))
            .ok_or_else(|| self.refuse("sessions", "too many scheduler sessions from this host"))
    }

    /// One `Token`/`LayerIndex` call within the caller's host's rate.
    fn admit_rpc(&self, caller: &identity::Caller) -> Result<(), Status> {
        if self.inner.per_host.rpc(&caller.host("")) {
            Ok(())
        } else {
            Err(self.refuse("rate", "too many requests from this host; retry later"))
        }
    }
}

type OutStream = Pin<Box<dyn Stream<Item = Result<SchedulerMessage, Status>> + Send>>;

type CommandStream =
    Pin<Box<dyn Stream<Item = Result<proto::scheduler::HostCommand, Status>> + Send>>;

#[tonic::async_trait]
impl Scheduler for SchedulerService {
    type DownloadStream = OutStream;
    type SubscribeStream = CommandStream;

    async fn subscribe(
        &self,
        request: Request<Streaming<proto::scheduler::HostReport>>,
    ) -> Result<Response<CommandStream>, Status> {
        let caller = identity::Caller::of(&request);
        // Commands carry registry credentials: cluster members only (with TLS on).
        if self.inner.cfg.http_scheme == "https" && caller.cert.is_none() {
            return Err(self.refuse_as(
                "subscribe",
                Status::permission_denied("subscribing needs a cluster certificate"),
            ));
        }
        let ip = caller
            .remote
            .map(|r| r.ip().to_string())
            .unwrap_or_default();
        let commands = self
            .inner
            .subscribers
            .subscribe(ip, request.into_inner())
            .ok_or_else(|| self.refuse("subscribers", "too many subscribed agents"))?;
        Ok(Response::new(Box::pin(
            ReceiverStream::new(commands).map(Ok),
        )))
    }

    async fn download(
        &self,
        request: Request<Streaming<PeerMessage>>,
    ) -> Result<Response<OutStream>, Status> {
        let caller = identity::Caller::of(&request);
        let slot = self.admit_session(&caller)?;
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(1024);
        let inner = self.inner.clone();
        // Registration and the session proper are tasks of their own (see `session::start`).
        tokio::spawn(async move {
            if let Some(serving) = session::start(inner, inbound, tx, caller).await {
                tokio::spawn(async move {
                    let _slot = slot;
                    serving.await;
                });
            }
        });
        Ok(Response::new(Box::pin(
            ReceiverStream::new(rx).map(|m: Box<SchedulerMessage>| Ok(*m)),
        )))
    }

    #[tracing::instrument(skip_all, fields(realm))]
    async fn token(
        &self,
        request: Request<proto::scheduler::TokenRequest>,
    ) -> Result<Response<proto::scheduler::TokenReply>, Status> {
        self.admit_rpc(&identity::Caller::of(&request))?;
        let req = request.into_inner();
        let url = url::Url::parse(&req.url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| Status::invalid_argument(format!("bad token URL {:?}", req.url)))?;
        tracing::Span::current().record(
            "realm",
            tracing::field::display(format_args!(
                "{}{}",
                url.host_str().unwrap_or(""),
                url.path()
            )),
        );
        // Only realms a registry under the origin policy announces, and no other URL.
        if let Some(p) = self.inner.seed.source.policy() {
            p.check(&url)
                .map_err(|e| Status::permission_denied(e.to_string()))?;
        }
        self.inner
            .realms
            .check(&self.inner.seed.source, &req.registry, &url)
            .await
            .map_err(|why| {
                self.inner
                    .metrics
                    .refused
                    .with_label_values(&["token"])
                    .inc();
                Status::permission_denied(why)
            })?;
        let answer = self
            .inner
            .tokens
            .get(&url, req.authorization.as_deref())
            .await
            .map_err(Status::unavailable)?;
        Ok(Response::new(proto::scheduler::TokenReply {
            status: u32::from(answer.status),
            content_type: answer.content_type,
            www_authenticate: answer.www_authenticate,
            body: answer.body.to_vec(),
        }))
    }

    async fn layer_index(
        &self,
        request: Request<proto::scheduler::LayerIndexRequest>,
    ) -> Result<Response<proto::scheduler::LayerIndexReply>, Status> {
        self.admit_rpc(&identity::Caller::of(&request))?;
        let local_ip = request.local_addr().map(|a| a.ip());
        let req = index::IndexRequest::from(request.into_inner());
        let bytes = index::seeded_index(&self.inner, &req)
            .await
            .map_err(|e| index::status(&e))?;
        let ip = self
            .inner
            .cfg
            .advertise_ip
            .or(local_ip)
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        let base = std::net::SocketAddr::new(ip, self.inner.cfg.http_port);
        // The index task's origin is this supernode's own index API.
        if let Some(p) = self.inner.seed.source.policy() {
            p.allow_own(base);
        }
        // The index opens with a ticket for the blob's verified version, which this peer just
        // proved (with its own credentials) it may read.
        let task_id = fetcher::task_id::content_task_id(&req.digest)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let version = self
            .inner
            .tasks
            .current(&task_id)
            .and_then(|v| v.version_id())
            .ok_or_else(|| Status::unavailable("the blob's seed went away; ask again"))?;
        use sha2::Digest;
        Ok(Response::new(proto::scheduler::LayerIndexReply {
            ticket: self.inner.tickets.index(&version),
            index_url: format!(
                "{}/api/v1/index/{}",
                self.inner.cfg.base_url(base),
                req.digest
            ),
            size: bytes.len() as u64,
            index_digest: format!(
                "sha256:{}",
                hex::encode(sha2::Sha256::digest(bytes.as_slice()))
            ),
        }))
    }

    async fn start_set(
        &self,
        request: Request<proto::scheduler::LayerIndexRequest>,
    ) -> Result<Response<proto::scheduler::StartSet>, Status> {
        self.admit_rpc(&identity::Caller::of(&request))?;
        let req = index::IndexRequest::from(request.into_inner());
        start::start_set(&self.inner, &req).await.map(Response::new)
    }

    async fn record_start(
        &self,
        request: Request<proto::scheduler::RecordStartRequest>,
    ) -> Result<Response<proto::scheduler::RecordStartReply>, Status> {
        self.admit_rpc(&identity::Caller::of(&request))?;
        let r = request.into_inner();
        let layer = r
            .layer
            .ok_or_else(|| Status::invalid_argument("RecordStart names no layer"))?;
        let req = index::IndexRequest::from(layer);
        start::record(&self.inner, &req, r.offsets)
            .await
            .map(Response::new)
    }
}

/// Starts seeding a URL on request of the preheat API; returns its task id and the version
/// being seeded.
pub async fn register_for_preheat(
    s: &Scheduling,
    req: crate::http::PreheatRequest,
) -> Result<(String, Arc<crate::task::Version>), proto::scheduler::TaskError> {
    let filter = fetcher::task_id::parse_filter(&req.filter);
    let task_id = fetcher::task_id::task_id(&req.url, &req.tag, &filter).map_err(|e| {
        proto::scheduler::TaskError {
            kind: proto::scheduler::ErrorKind::Invalid as i32,
            http_status: 0,
            message: e.to_string(),
        }
    })?;
    let reg = proto::scheduler::Register {
        url: req.url,
        task_id: task_id.clone(),
        tag: req.tag,
        filter,
        headers: index::proto_headers(&req.headers),
        ..Default::default()
    };
    let version = register::join(s, &reg).await?;
    Ok((task_id, version))
}
