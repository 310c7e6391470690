//! Layer indexes for lazy readers: the agent asks the supernode that seeds the blob (rendezvous
//! over the blob's task id, the same order downloads use) for the blob's index, which that
//! supernode builds once from its seed and serves over HTTP; the agent then downloads it as a task
//! of its own (tag `index`), P2P like any content and checked against the index's digest, and
//! keeps seeding it to the other hosts.

use std::time::Duration;

use proto::scheduler::{Header, LayerIndexRequest};

use crate::download::{BackSource, Destination, DownloadRequest, Progress};
use crate::error::{Error, Result};
use crate::peer::Peer;
use crate::range_read::RangeRequest;
use crate::{rendezvous, task_id};

/// An index larger than this is refused (a 10 GiB gzip layer indexes to ~170 MiB).
pub const MAX_INDEX: usize = 512 << 20;

/// The first seed of a large layer from a slow registry can take minutes.
const TIMEOUT: Duration = Duration::from_secs(30 * 60);

impl Peer {
    /// The serialized layer index of the blob `r.digest` (offset and length are ignored).
    pub async fn layer_index(&self, r: &RangeRequest) -> Result<Vec<u8>> {
        let task_id = task_id::content_task_id(&r.digest)?;
        let supernodes = self.supernodes();
        if supernodes.is_empty() {
            return Err(Error::Download(
                "layer indexes come from a supernode and none is configured".into(),
            ));
        }
        let mut last = String::new();
        for addr in rendezvous::order(&task_id, supernodes) {
            match self.layer_index_from(addr, r).await {
                Ok(bytes) => return Ok(bytes),
                // The supernode answered: another one would say the same.
                Err(IndexFailure::Refused(e)) => return Err(e),
                Err(IndexFailure::Unreachable(e)) => {
                    tracing::warn!(supernode = addr, error = %e, "layer index: supernode unreachable");
                    last = format!("supernode {addr}: {e}");
                }
            }
        }
        Err(Error::Download(format!(
            "no supernode gave the layer index ({last})"
        )))
    }

    /// Asks `addr` for the index's location, then downloads it.
    async fn layer_index_from(
        &self,
        addr: &str,
        r: &RangeRequest,
    ) -> std::result::Result<Vec<u8>, IndexFailure> {
        let reply = self.locate_index(addr, r).await?;
        if reply.size > MAX_INDEX as u64 {
            return Err(IndexFailure::Refused(Error::Download(format!(
                "layer index of {} is {} bytes, over {MAX_INDEX}",
                r.digest, reply.size
            ))));
        }
        let digest = task_id::parse_digest(&reply.index_digest)
            .map_err(|e| IndexFailure::Refused(Error::Download(format!("index digest: {e}"))))?;
        self.download_index(&reply.index_url, &digest, &reply.ticket)
            .await
            .map_err(IndexFailure::Refused)
    }

    /// Downloads the serialized index at `url` (a task of its own, P2P) into memory; `ticket` opens
    /// it at the supernode (which checks it when it seeds the task, and for each peer joining).
    async fn download_index(&self, url: &str, digest: &str, ticket: &str) -> Result<Vec<u8>> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let req = DownloadRequest {
            url: url.to_owned(),
            output: Destination::Stream(tx),
            headers: vec![("Authorization".to_owned(), format!("Bearer {ticket}"))],
            digest: Some(digest.to_owned()),
            tag: "index".into(),
            filter: Vec::new(),
            limit_rate: 0,
            back_source: BackSource::Auto,
            timeout: Some(TIMEOUT),
            content_key: None,
            seed_only: false,
        };
        let (ptx, _prx) = tokio::sync::watch::channel(Progress::default());
        let collect = async {
            let mut bytes = Vec::new();
            while let Some(chunk) = rx.recv().await {
                let chunk = chunk?;
                if bytes.len() + chunk.len() > MAX_INDEX {
                    return Err(Error::Download("layer index too large".into()));
                }
                bytes.extend_from_slice(&chunk);
            }
            Ok(bytes)
        };
        // The request holds the stream's sender: it must go when the download ends, or the
        // collector never sees the end.
        let download = async move {
            let r = self.download(&req, &ptx).await;
            drop(req);
            r
        };
        let (done, bytes) = tokio::join!(download, collect);
        done?;
        bytes
    }

    /// Where the supernode at `addr` serves the blob's index (seeding and indexing it first).
    async fn locate_index(
        &self,
        addr: &str,
        r: &RangeRequest,
    ) -> std::result::Result<proto::scheduler::LayerIndexReply, IndexFailure> {
        let mut client = (self.inner.channels)
            .client(addr, self.inner.cfg.tls.as_ref())
            .await
            .map_err(IndexFailure::Unreachable)?;
        let mut req = tonic::Request::new(index_request(r));
        req.set_timeout(TIMEOUT);
        let refused = |s: tonic::Status| match s.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
                IndexFailure::Unreachable(s.message().to_owned())
            }
            tonic::Code::InvalidArgument => IndexFailure::Refused(Error::invalid(
                "layer index request",
                s.message().to_owned(),
            )),
            _ => IndexFailure::Refused(Error::Download(format!(
                "supernode {addr}: {}",
                s.message()
            ))),
        };
        Ok(client.layer_index(req).await.map_err(refused)?.into_inner())
    }
}

/// The scheduler's form of a lazy reader's request about blob `r.digest`.
pub(crate) fn index_request(r: &RangeRequest) -> LayerIndexRequest {
    LayerIndexRequest {
        url: r.url.clone(),
        headers: r
            .headers
            .iter()
            .map(|(name, value)| Header {
                name: name.clone(),
                value: value.clone(),
            })
            .collect(),
        digest: r.digest.clone(),
    }
}

enum IndexFailure {
    /// Worth asking the next supernode.
    Unreachable(String),
    /// The answer.
    Refused(Error),
}
