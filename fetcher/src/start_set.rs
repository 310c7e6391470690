//! Start sets for lazy readers (see `Scheduler.StartSet`): the agent asks, and records at, the
//! supernode that seeds the blob (rendezvous over the blob's task id, as for its index), on the
//! local snapshotter's behalf, with the registry credentials it was handed.

use proto::scheduler::{LayerIndexRequest, RecordStartRequest};

use crate::error::{Error, Result};
use crate::peer::Peer;
use crate::range_read::RangeRequest;
use crate::{rendezvous, task_id};

/// What a supernode's answer (or silence) means.
enum Asked<T> {
    Answer(T),
    /// Worth asking the next supernode.
    Unreachable(String),
}

impl Peer {
    /// The start set of blob `r.digest` (empty when none is recorded).
    pub async fn start_set(&self, r: &RangeRequest) -> Result<Vec<u64>> {
        self.ask(r, |mut client, req| async move {
            client.start_set(req).await.map(|a| a.into_inner().offsets)
        })
        .await
    }

    /// Records `offsets` as what the first start of blob `r.digest` read; whether the
    /// supernode kept them (it keeps the first record of a layer).
    pub async fn record_start(&self, r: &RangeRequest, offsets: Vec<u64>) -> Result<bool> {
        self.ask(r, move |mut client, layer| {
            let offsets = offsets.clone();
            async move {
                let req = RecordStartRequest {
                    layer: Some(layer),
                    offsets,
                };
                client.record_start(req).await.map(|a| a.into_inner().kept)
            }
        })
        .await
    }

    /// Asks the blob's supernodes in rendezvous order until one answers.
    async fn ask<T, F, Fut>(&self, r: &RangeRequest, call: F) -> Result<T>
    where
        F: Fn(
            proto::scheduler::scheduler_client::SchedulerClient<tonic::transport::Channel>,
            LayerIndexRequest,
        ) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, tonic::Status>>,
    {
        let task_id = task_id::content_task_id(&r.digest)?;
        let mut last = String::from("no supernode is configured");
        for addr in rendezvous::order(&task_id, self.supernodes()) {
            let asked = match (self.inner.channels)
                .client(addr, self.inner.cfg.tls.as_ref())
                .await
            {
                Err(e) => Asked::Unreachable(e),
                Ok(client) => match call(client, crate::layer_index::index_request(r)).await {
                    Ok(t) => Asked::Answer(t),
                    Err(s)
                        if matches!(
                            s.code(),
                            tonic::Code::Unavailable | tonic::Code::Cancelled
                        ) =>
                    {
                        Asked::Unreachable(s.message().to_owned())
                    }
                    Err(s) if s.code() == tonic::Code::InvalidArgument => {
                        return Err(Error::invalid("start set request", s.message().to_owned()));
                    }
                    Err(s) => {
                        return Err(Error::Download(format!(
                            "start set of {} at supernode {addr}: {}",
                            r.digest,
                            s.message()
                        )));
                    }
                },
            };
            match asked {
                Asked::Answer(t) => return Ok(t),
                Asked::Unreachable(e) => {
                    tracing::warn!(supernode = addr, error = %e, "start set: supernode unreachable");
                    last = format!("supernode {addr}: {e}");
                }
            }
        }
        Err(Error::Download(format!(
            "no supernode answered for the start set of {} ({last})",
            r.digest
        )))
    }
}
