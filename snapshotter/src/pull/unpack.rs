//! A layer that could not be mounted lazily (no credentials, the index refused, the agent or the
//! supernode unreachable), pulled the normal way instead of failing the pull: its blob streams
//! from the registry into containerd's content store (which checks it against its digest before
//! committing it), containerd's diff service unpacks it onto the snapshot the snapshotter
//! prepared, and the snapshot is committed under the layer's chain id.

use std::collections::HashMap;

use proto::containerd::services::content::v1 as content;
use proto::containerd::services::diff::v1 as diff;
use proto::containerd::services::snapshots::v1 as snapshots;
use proto::containerd::types::{Descriptor, Mount};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::containerd::Containerd;
use super::image::Layer;
use crate::error::{Error, Result};
use crate::registry::{Reference, Registry};

/// Pulls `layer` of `image` into the active snapshot `key` (whose `mounts` the prepare gave)
/// and commits it as the layer's chain id.
pub async fn unpack(
    ctd: &Containerd,
    registry: &Registry,
    image: &Reference,
    layer: &Layer,
    snapshot: (&str, &str, Vec<Mount>),
) -> Result<()> {
    let (snapshotter, key, mounts) = snapshot;
    write_blob(ctd, registry, image, layer).await?;
    let mut dc = diff::diff_client::DiffClient::new(ctd.channel.clone());
    dc.apply(ctd.req(diff::ApplyRequest {
        diff: Some(Descriptor {
            media_type: layer.media_type.clone(),
            digest: layer.digest.clone(),
            size: i64::try_from(layer.size).unwrap_or(i64::MAX),
            annotations: HashMap::new(),
        }),
        mounts,
    }))
    .await
    .map_err(Containerd::err(&format!(
        "unpacking layer {}",
        layer.digest
    )))?;
    let mut sc = snapshots::snapshots_client::SnapshotsClient::new(ctd.channel.clone());
    sc.commit(ctd.req(snapshots::CommitSnapshotRequest {
        snapshotter: snapshotter.to_owned(),
        name: layer.chain_id.clone(),
        key: key.to_owned(),
        labels: HashMap::new(),
    }))
    .await
    .map_err(Containerd::err(&format!(
        "committing layer {}",
        layer.digest
    )))?;
    Ok(())
}

/// Streams the layer blob from the registry into containerd's content store (a blob already
/// there is kept).
async fn write_blob(
    ctd: &Containerd,
    registry: &Registry,
    image: &Reference,
    layer: &Layer,
) -> Result<()> {
    let mut resp = registry.open_blob(image, &layer.digest).await?;
    let total = i64::try_from(layer.size).unwrap_or(i64::MAX);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let ingest = format!("dfsnapshotter-{}-{nanos}", layer.digest);
    let expected = layer.digest.clone();
    let request = move |action: content::WriteAction, offset: i64, data: Vec<u8>| {
        content::WriteContentRequest {
            action: action as i32,
            r#ref: ingest.clone(),
            total,
            expected: expected.clone(),
            offset,
            data,
            labels: HashMap::new(),
        }
    };
    let (tx, rx) = mpsc::channel(4);
    let digest = layer.digest.clone();
    // The registry's bytes go to containerd as they come; containerd verifies the digest.
    let feed = tokio::spawn(async move {
        let mut offset = 0i64;
        while let Some(chunk) = resp.chunk().await.map_err(|e| {
            Error::Registry(format!(
                "layer {digest}: {}",
                fetcher::source::error_chain(&e)
            ))
        })? {
            let n = i64::try_from(chunk.len()).unwrap_or(i64::MAX);
            if offset.saturating_add(n) > total {
                return Err(Error::Registry(format!(
                    "layer {digest}: the registry sent more than its {total} bytes"
                )));
            }
            if tx
                .send(request(content::WriteAction::Write, offset, chunk.to_vec()))
                .await
                .is_err()
            {
                return Ok(()); // containerd ended the write: its answer says why.
            }
            offset += n;
        }
        let _ = tx
            .send(request(content::WriteAction::Commit, offset, Vec::new()))
            .await;
        Ok(())
    });
    let mut c = content::content_client::ContentClient::new(ctd.channel.clone());
    let written = async {
        let mut answers = c
            .write(ctd.req(ReceiverStream::new(rx)))
            .await?
            .into_inner();
        while answers.message().await?.is_some() {}
        Ok::<_, tonic::Status>(())
    }
    .await;
    let fed = feed
        .await
        .map_err(|e| Error::Registry(format!("layer {}: {e}", layer.digest)))?;
    match written {
        Err(s) if s.code() == tonic::Code::AlreadyExists => Ok(()),
        Err(s) => Err(Containerd::err(&format!("storing layer {}", layer.digest))(
            s,
        )),
        Ok(()) => fed,
    }
}
