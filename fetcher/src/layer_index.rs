//! Layer indexes for lazy readers: the agent asks the supernode that seeds the blob (rendezvous
//! over the blob's task id, the same order downloads use) for the blob's index, which that
//! supernode builds once from its seed.

use std::time::Duration;

use proto::scheduler::{Header, LayerIndexRequest};

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

    async fn layer_index_from(
        &self,
        addr: &str,
        r: &RangeRequest,
    ) -> std::result::Result<Vec<u8>, IndexFailure> {
        let mut client = crate::download::scheduled::connect(addr)
            .await
            .map_err(IndexFailure::Unreachable)?;
        let mut req = tonic::Request::new(LayerIndexRequest {
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
        });
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
        let mut stream = client.layer_index(req).await.map_err(refused)?.into_inner();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.message().await.map_err(refused)? {
            if bytes.len() + chunk.data.len() > MAX_INDEX {
                return Err(IndexFailure::Refused(Error::Download(format!(
                    "layer index of {} exceeds {MAX_INDEX} bytes",
                    r.digest
                ))));
            }
            bytes.extend_from_slice(&chunk.data);
        }
        Ok(bytes)
    }
}

enum IndexFailure {
    /// Worth asking the next supernode.
    Unreachable(String),
    /// The answer.
    Refused(Error),
}
