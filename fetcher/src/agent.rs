//! The host agent's local API (`agent.sock`): dfget asks the agent to download for it, so all
//! downloads of a host share one store, one upload server and one set of rate limits.

use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::agent::agent_client::AgentClient;
use proto::agent::agent_server::{Agent, AgentServer};
use proto::agent::{DownloadProgress, DownloadRequest as PbRequest};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::download::{BackSource, Destination, DownloadRequest, Progress};
use crate::error::{Error, Result};
use crate::peer::Peer;
use crate::shutdown::Shutdown;
use crate::task_id;

/// Serves the agent API on the Unix socket at `path` until `shutdown`.
pub fn serve(path: &Path, peer: Peer, shutdown: Shutdown) -> Result<crate::uds::Served> {
    let router =
        tonic::transport::Server::builder().add_service(AgentServer::new(AgentService { peer }));
    crate::uds::serve(path, router, shutdown, "agent").map_err(|(what, e)| Error::io(what, path, e))
}

/// Connects to the agent at `path`.
pub async fn connect(path: &Path) -> Result<AgentClient<tonic::transport::Channel>> {
    let channel = crate::uds::channel(path).await.map_err(|e| Error::Agent {
        socket: path.to_path_buf(),
        detail: crate::source::error_chain(&e),
    })?;
    Ok(AgentClient::new(channel).max_decoding_message_size(32 << 20))
}

/// Converts the user's request, with its destination file `output`, to the wire form (the agent
/// writes files; streams stay with an embedded peer).
pub fn to_proto(req: &DownloadRequest, output: &Path) -> PbRequest {
    PbRequest {
        url: req.url.clone(),
        output: output.to_string_lossy().into_owned(),
        headers: req
            .headers
            .iter()
            .map(|(n, v)| proto::agent::Header {
                name: n.clone(),
                value: v.clone(),
            })
            .collect(),
        digest: req.digest.clone().unwrap_or_default(),
        tag: req.tag.clone(),
        filter: req.filter.clone(),
        limit_rate: req.limit_rate,
        back_source: match req.back_source {
            BackSource::Auto => "auto".into(),
            BackSource::Never => "never".into(),
        },
        timeout_ms: req.timeout.map(|t| t.as_millis() as u64).unwrap_or(0),
    }
}

fn from_proto(r: PbRequest) -> Result<DownloadRequest> {
    let output = PathBuf::from(&r.output);
    if !output.is_absolute() {
        return Err(Error::invalid(
            "output",
            format!("{:?} must be an absolute path for the agent", r.output),
        ));
    }
    let back_source = match r.back_source.as_str() {
        "" | "auto" => BackSource::Auto,
        "never" => BackSource::Never,
        other => {
            return Err(Error::invalid(
                "back_source",
                format!("{other:?}: expected auto or never"),
            ));
        }
    };
    Ok(DownloadRequest {
        url: r.url,
        output: Destination::File(output),
        headers: r.headers.into_iter().map(|h| (h.name, h.value)).collect(),
        digest: if r.digest.is_empty() {
            None
        } else {
            Some(task_id::parse_digest(&r.digest)?)
        },
        tag: r.tag,
        filter: r.filter,
        limit_rate: r.limit_rate,
        back_source,
        timeout: (r.timeout_ms > 0).then(|| Duration::from_millis(r.timeout_ms)),
        content_key: None,
        seed_only: false,
    })
}

fn progress_msg(p: &Progress) -> DownloadProgress {
    DownloadProgress {
        content_length: p.content_length,
        completed_bytes: p.completed,
        from_peers: p.from_peers,
        from_supernode: p.from_supernode,
        from_origin: p.from_origin,
        reused: p.reused,
        ..Default::default()
    }
}

/// Reads the wire progress back.
pub fn progress_from(m: &DownloadProgress) -> Progress {
    Progress {
        content_length: m.content_length,
        completed: m.completed_bytes,
        from_peers: m.from_peers,
        from_supernode: m.from_supernode,
        from_origin: m.from_origin,
        reused: m.reused,
    }
}

struct AgentService {
    peer: Peer,
}

#[tonic::async_trait]
impl Agent for AgentService {
    type DownloadStream = ReceiverStream<Result<DownloadProgress, Status>>;

    #[tracing::instrument(skip_all, fields(url))]
    async fn download(
        &self,
        request: Request<PbRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let req = from_proto(request.into_inner())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::Span::current().record("url", crate::source::redact(&req.url).as_str());
        let (tx, rx) = mpsc::channel(16);
        let peer = self.peer.clone();
        tokio::spawn(async move {
            let (ptx, mut prx) = watch::channel(Progress::default());
            let dl = peer.download(&req, &ptx);
            tokio::pin!(dl);
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            let result = loop {
                tokio::select! {
                    r = &mut dl => break r,
                    _ = tick.tick() => {
                        if prx.has_changed().unwrap_or(false) {
                            let msg = progress_msg(&prx.borrow_and_update());
                            let _ = tx.try_send(Ok(msg));
                        }
                    }
                }
            };
            let last = match result {
                Ok(summary) => DownloadProgress {
                    done: true,
                    digest: summary.digest,
                    verify_failures: summary.verify_failures,
                    ..progress_msg(&summary.progress)
                },
                Err(e) => DownloadProgress {
                    error: e.to_string(),
                    exit_code: e.exit_code(),
                    ..progress_msg(&ptx.borrow())
                },
            };
            let _ = tx.send(Ok(last)).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    #[tracing::instrument(skip_all, fields(digest = %request.get_ref().digest, offset = request.get_ref().offset, length = request.get_ref().length))]
    async fn read_range(
        &self,
        request: Request<proto::agent::ReadRangeRequest>,
    ) -> Result<Response<proto::agent::ReadRangeReply>, Status> {
        /// A reply must fit a gRPC message comfortably.
        const MAX_RANGE: u64 = 16 << 20;
        let r = request.into_inner();
        if r.length > MAX_RANGE {
            return Err(Status::invalid_argument(format!(
                "range of {} bytes: at most {MAX_RANGE} per read",
                r.length
            )));
        }
        let req = crate::range_read::RangeRequest {
            url: r.url,
            headers: r.headers.into_iter().map(|h| (h.name, h.value)).collect(),
            digest: r.digest,
            offset: r.offset,
            length: r.length,
            only_range: r.only_range,
        };
        match self.peer.read_range(&req).await {
            Ok(data) => Ok(Response::new(proto::agent::ReadRangeReply {
                data: data.to_vec(),
            })),
            Err(e) => Err(status(&e)),
        }
    }

    type LayerIndexStream = ReceiverStream<Result<proto::agent::LayerIndexChunk, Status>>;

    #[tracing::instrument(skip_all, fields(digest = %request.get_ref().digest))]
    async fn layer_index(
        &self,
        request: Request<proto::agent::LayerIndexRequest>,
    ) -> Result<Response<Self::LayerIndexStream>, Status> {
        let req = layer_request(request.into_inner());
        let bytes = match self.peer.layer_index(&req).await {
            Ok(b) => b,
            Err(e) => return Err(status(&e)),
        };
        Ok(Response::new(chunked(bytes, |data| {
            proto::agent::LayerIndexChunk { data }
        })))
    }

    #[tracing::instrument(skip_all, fields(digest = %request.get_ref().digest))]
    async fn start_set(
        &self,
        request: Request<proto::agent::LayerIndexRequest>,
    ) -> Result<Response<proto::agent::StartSet>, Status> {
        let req = layer_request(request.into_inner());
        match self.peer.start_set(&req).await {
            Ok(offsets) => Ok(Response::new(proto::agent::StartSet { offsets })),
            Err(e) => Err(status(&e)),
        }
    }

    async fn tasks(
        &self,
        _request: Request<proto::agent::TasksRequest>,
    ) -> Result<Response<proto::agent::TasksReply>, Status> {
        let tasks = self
            .peer
            .tasks()
            .into_iter()
            .map(|t| proto::agent::TaskState {
                task_id: t.task_id,
                digest: t.digest.unwrap_or_default(),
                content_length: t
                    .content_length
                    .and_then(|n| i64::try_from(n).ok())
                    .unwrap_or(-1),
                bytes_held: t.bytes_held,
            })
            .collect();
        Ok(Response::new(proto::agent::TasksReply { tasks }))
    }

    async fn record_start(
        &self,
        request: Request<proto::agent::RecordStartRequest>,
    ) -> Result<Response<proto::agent::RecordStartReply>, Status> {
        let r = request.into_inner();
        let layer = r
            .layer
            .ok_or_else(|| Status::invalid_argument("RecordStart names no layer"))?;
        let req = layer_request(layer);
        match self.peer.record_start(&req, r.offsets).await {
            Ok(kept) => Ok(Response::new(proto::agent::RecordStartReply { kept })),
            Err(e) => Err(status(&e)),
        }
    }
}

/// A lazy reader's request about a whole blob.
fn layer_request(r: proto::agent::LayerIndexRequest) -> crate::range_read::RangeRequest {
    crate::range_read::RangeRequest {
        url: r.url,
        headers: r.headers.into_iter().map(|h| (h.name, h.value)).collect(),
        digest: r.digest,
        offset: 0,
        length: 0,
        only_range: false,
    }
}

/// The status a lazy reader gets for `e`.
fn status(e: &Error) -> Status {
    match e {
        Error::Invalid { .. } => Status::invalid_argument(e.to_string()),
        _ => Status::unavailable(e.to_string()),
    }
}

/// `bytes` as a stream of messages of at most 1 MiB each.
pub fn chunked<M: Send + 'static>(
    bytes: Vec<u8>,
    wrap: impl Fn(Vec<u8>) -> M + Send + 'static,
) -> ReceiverStream<Result<M, Status>> {
    const CHUNK: usize = 1 << 20;
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        for c in bytes.chunks(CHUNK) {
            if tx.send(Ok(wrap(c.to_vec()))).await.is_err() {
                break;
            }
        }
    });
    ReceiverStream::new(rx)
}
