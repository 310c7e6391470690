//! The `Cluster` gRPC service: task metadata from the other supernodes, taken only from them.

use std::net::IpAddr;
use std::sync::Arc;

use proto::scheduler::cluster_server::Cluster as ClusterApi;
use proto::scheduler::{Replica, ReplicaAck};
use tonic::{Request, Response, Status};

use super::Cluster;
use crate::scheduler::identity::Caller;

/// Serves `Replicate` (refused on a supernode without `[cluster]`).
#[derive(Clone)]
pub struct ClusterService {
    pub cluster: Option<Arc<Cluster>>,
}

impl Cluster {
    /// Whether `caller` is another supernode of the cluster (see the module doc).
    async fn is_member(&self, caller: &Caller) -> bool {
        let others = self.members.iter().filter(|m| **m != self.me);
        match (&caller.cert, self.tls.is_some()) {
            (Some(cert), true) => others
                .map(|m| fetcher::tls::host_of(m))
                .any(|host| fetcher::tls::names_host(cert, host)),
            (None, true) => false,
            (_, false) => {
                let Some(ip) = caller.remote.map(|r| r.ip()) else {
                    return false;
                };
                for m in others {
                    if resolves_to(m, ip).await {
                        return true;
                    }
                }
                false
            }
        }
    }
}

async fn resolves_to(member: &str, ip: IpAddr) -> bool {
    tokio::net::lookup_host(member)
        .await
        .is_ok_and(|mut addrs| addrs.any(|a| a.ip() == ip))
}

#[tonic::async_trait]
impl ClusterApi for ClusterService {
    async fn replicate(&self, request: Request<Replica>) -> Result<Response<ReplicaAck>, Status> {
        let Some(cluster) = &self.cluster else {
            return Err(Status::failed_precondition(
                "this supernode is in no cluster (no [cluster] supernodes)",
            ));
        };
        let caller = Caller::of(&request);
        if !cluster.is_member(&caller).await {
            cluster
                .metrics
                .replica_messages
                .with_label_values(&["refused"])
                .inc();
            tracing::warn!(remote = ?caller.remote, "task metadata refused: the caller is not a supernode of the cluster");
            return Err(Status::permission_denied(
                "only the supernodes in cluster.supernodes may replicate",
            ));
        }
        let m = request.into_inner();
        let applied = {
            let mut records = cluster.records.lock().unwrap_or_else(|p| p.into_inner());
            let applied = records.apply(&m);
            cluster.metrics.replica_pieces.set(records.pieces() as i64);
            applied
        };
        match applied {
            Ok(pieces) => {
                cluster
                    .metrics
                    .replica_messages
                    .with_label_values(&["received"])
                    .inc();
                Ok(Response::new(ReplicaAck { pieces }))
            }
            Err(e) => {
                cluster
                    .metrics
                    .replica_messages
                    .with_label_values(&["refused"])
                    .inc();
                tracing::warn!(remote = ?caller.remote, error = %e, "task metadata refused");
                Err(Status::invalid_argument(e.to_string()))
            }
        }
    }
}
