//! containerd's `Snapshots` gRPC service over [`Snapshots`], served on a Unix socket that
//! containerd's `proxy_plugins` entry names.
//!
//! Not the `containerd-snapshots` crate: its latest release (0.3) is built on tonic 0.9 / prost
//! 0.11 (a second gRPC stack beside our tonic 0.14) and, like `containerd-client`, generates its
//! code with a system `protoc` at build time. The contract is small, so `proto/containerd/` states
//! it (package, methods, field numbers as containerd's) and protox compiles it with the rest.

use std::collections::BTreeMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use futures::Stream;
use proto::containerd::services::snapshots::v1 as api;
use proto::containerd::services::snapshots::v1::snapshots_server::{
    Snapshots as SnapshotsApi, SnapshotsServer,
};
use tonic::{Request, Response, Status};

use crate::error::{Error, Result};
use crate::metastore::Kind;
use crate::snapshots::{Info, Snapshots};

pub struct Service {
    snapshots: Arc<Snapshots>,
}

fn labels(m: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn to_api(i: Info) -> api::Info {
    api::Info {
        name: i.name,
        parent: i.parent,
        kind: match i.kind {
            Kind::View => api::Kind::View,
            Kind::Active => api::Kind::Active,
            Kind::Committed => api::Kind::Committed,
        } as i32,
        created_at: Some(timestamp(i.created)),
        updated_at: Some(timestamp(i.updated)),
        labels: i.labels.into_iter().collect(),
    }
}

type ListStream = Pin<Box<dyn Stream<Item = Result<api::ListSnapshotsResponse, Status>> + Send>>;

/// Infos per `List` message (containerd reads a stream of batches).
const LIST_BATCH: usize = 100;

#[tonic::async_trait]
impl SnapshotsApi for Service {
    #[tracing::instrument(skip_all, fields(key = %r.get_ref().key, parent = %r.get_ref().parent))]
    async fn prepare(
        &self,
        r: Request<api::PrepareSnapshotRequest>,
    ) -> Result<Response<api::PrepareSnapshotResponse>, Status> {
        let r = r.into_inner();
        let mounts = self
            .snapshots
            .create(Kind::Active, &r.key, &r.parent, labels(r.labels))
            .await?;
        Ok(Response::new(api::PrepareSnapshotResponse { mounts }))
    }

    #[tracing::instrument(skip_all, fields(key = %r.get_ref().key, parent = %r.get_ref().parent))]
    async fn view(
        &self,
        r: Request<api::ViewSnapshotRequest>,
    ) -> Result<Response<api::ViewSnapshotResponse>, Status> {
        let r = r.into_inner();
        let mounts = self
            .snapshots
            .create(Kind::View, &r.key, &r.parent, labels(r.labels))
            .await?;
        Ok(Response::new(api::ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        r: Request<api::MountsRequest>,
    ) -> Result<Response<api::MountsResponse>, Status> {
        let mounts = self.snapshots.mounts(&r.into_inner().key).await?;
        Ok(Response::new(api::MountsResponse { mounts }))
    }

    #[tracing::instrument(skip_all, fields(key = %r.get_ref().key, name = %r.get_ref().name))]
    async fn commit(&self, r: Request<api::CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = r.into_inner();
        self.snapshots
            .commit(&r.name, &r.key, labels(r.labels))
            .await?;
        Ok(Response::new(()))
    }

    #[tracing::instrument(skip_all, fields(key = %r.get_ref().key))]
    async fn remove(&self, r: Request<api::RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        self.snapshots.remove(&r.into_inner().key).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        r: Request<api::StatSnapshotRequest>,
    ) -> Result<Response<api::StatSnapshotResponse>, Status> {
        let info = self.snapshots.stat(&r.into_inner().key).await?;
        Ok(Response::new(api::StatSnapshotResponse {
            info: Some(to_api(info)),
        }))
    }

    async fn update(
        &self,
        r: Request<api::UpdateSnapshotRequest>,
    ) -> Result<Response<api::UpdateSnapshotResponse>, Status> {
        let r = r.into_inner();
        let info = r
            .info
            .ok_or_else(|| Status::from(Error::Invalid("update without info".into())))?;
        let fields = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let updated = self
            .snapshots
            .update(&info.name, labels(info.labels), &fields)
            .await?;
        Ok(Response::new(api::UpdateSnapshotResponse {
            info: Some(to_api(updated)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        _r: Request<api::ListSnapshotsRequest>,
    ) -> Result<Response<ListStream>, Status> {
        // containerd's metadata layer filters what it shows per namespace itself; all snapshots go.
        let infos: Vec<api::Info> = self
            .snapshots
            .list()
            .await
            .into_iter()
            .map(to_api)
            .collect();
        let batches: Vec<Result<api::ListSnapshotsResponse, Status>> = infos
            .chunks(LIST_BATCH)
            .map(|c| Ok(api::ListSnapshotsResponse { info: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(batches))))
    }

    async fn usage(
        &self,
        r: Request<api::UsageRequest>,
    ) -> Result<Response<api::UsageResponse>, Status> {
        let u = self.snapshots.usage(&r.into_inner().key).await?;
        Ok(Response::new(api::UsageResponse {
            size: i64::try_from(u.size).unwrap_or(i64::MAX),
            inodes: i64::try_from(u.inodes).unwrap_or(i64::MAX),
        }))
    }

    async fn cleanup(&self, _r: Request<api::CleanupRequest>) -> Result<Response<()>, Status> {
        let n = self.snapshots.cleanup().await?;
        tracing::info!(removed = n, "cleanup");
        Ok(Response::new(()))
    }
}

/// Serves the snapshotter on the Unix socket `path` until `shutdown`.
pub fn serve(
    path: &Path,
    snapshots: Arc<Snapshots>,
    shutdown: fetcher::Shutdown,
) -> Result<fetcher::uds::Served> {
    let router = tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(Service { snapshots }));
    fetcher::uds::serve(path, router, shutdown, "snapshotter")
        .map_err(|(what, e)| Error::io(what, path, e))
}
