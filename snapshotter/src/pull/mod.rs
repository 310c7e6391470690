//! `dfsnapshotter pull REF`: makes an image runnable with `ctr run --snapshotter damselfly`
//! without downloading its layers. The manifest and config come from the registry (small); each
//! layer becomes a snapshot prepared through containerd with the remote-layer labels, which this
//! snapshotter answers by mounting the layer lazily; then containerd's content store gets the
//! manifest and config, and the image its name. A lease keeps it all from containerd's garbage
//! collector until the image names it.

use std::collections::HashMap;
use std::path::PathBuf;

use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use proto::containerd::services::content::v1 as content;
use proto::containerd::services::images::v1 as images;
use proto::containerd::services::leases::v1 as leases;
use proto::containerd::services::snapshots::v1 as snapshots;
use proto::containerd::types::Descriptor;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

use crate::error::{Error, Result};
use crate::registry::{Reference, Registry};
use crate::remote::{LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_TARGET};

const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];
/// Manifests and configs larger than this are refused.
const MAX_DOC: usize = 8 << 20;

/// What to pull, and into which containerd.
#[derive(Clone, Debug)]
pub struct PullOptions {
    pub image: String,
    /// containerd's socket.
    pub containerd: PathBuf,
    pub namespace: String,
    /// The name containerd knows this snapshotter by (its `proxy_plugins` key).
    pub snapshotter: String,
    /// `os/arch` to pick from a multi-platform image.
    pub platform: String,
}

/// What a pull did.
#[derive(Debug)]
pub struct PullSummary {
    pub name: String,
    pub manifest: String,
    pub layers: usize,
    /// Bytes of the layers, which were not downloaded.
    pub layer_bytes: u64,
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn docs(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Registry(format!("{what}: {e}"))
}

/// The platform this machine runs, as OCI names it (`linux/amd64`).
pub fn host_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    format!("linux/{arch}")
}

/// containerd's gRPC clients, each request carrying the namespace (and lease).
struct Containerd {
    channel: Channel,
    namespace: String,
    lease: Option<String>,
}

impl Containerd {
    fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Ok(v) = self.namespace.parse() {
            r.metadata_mut().insert("containerd-namespace", v);
        }
        if let Some(l) = self.lease.as_ref().and_then(|l| l.parse().ok()) {
            r.metadata_mut().insert("containerd-lease", l);
        }
        r
    }

    fn err(what: &str) -> impl Fn(tonic::Status) -> Error + '_ {
        move |s| Error::Containerd(format!("{what}: {}", s.message()))
    }

    /// Stores `bytes` (whose digest is `digest`) with `labels`; existing content gets the labels.
    async fn put(&self, digest: &str, bytes: &[u8], labels: HashMap<String, String>) -> Result<()> {
        let mut c = content::content_client::ContentClient::new(self.channel.clone());
        let msg = content::WriteContentRequest {
            action: content::WriteAction::Commit as i32,
            r#ref: format!("dfsnapshotter-{digest}"),
            total: bytes.len() as i64,
            expected: digest.to_owned(),
            offset: 0,
            data: bytes.to_vec(),
            labels: labels.clone(),
        };
        let written = async {
            let mut stream = c
                .write(self.req(tokio_stream::once(msg)))
                .await?
                .into_inner();
            while stream.message().await?.is_some() {}
            Ok::<_, tonic::Status>(())
        };
        match written.await {
            Ok(()) => Ok(()),
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
                c.update(self.req(content::UpdateRequest {
                    info: Some(content::Info {
                        digest: digest.to_owned(),
                        labels,
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask { paths }),
                }))
                .await
                .map_err(Self::err("cannot label content"))?;
                Ok(())
            }
            Err(s) => Err(Self::err("cannot store content")(s)),
        }
    }
}

/// Pulls `opts.image` for lazy starts.
pub async fn pull(registry: &Registry, opts: &PullOptions) -> Result<PullSummary> {
    let image = Reference::parse(&opts.image)?;
    let (top, top_type) = registry
        .get(
            &image,
            &format!("manifests/{}", image.reference),
            MANIFEST_TYPES,
            MAX_DOC,
        )
        .await?;
    let top_digest = sha256(&top);
    if image.reference.starts_with("sha256:") && image.reference != top_digest {
        return Err(Error::Registry(format!(
            "manifest of {} has digest {top_digest}",
            opts.image
        )));
    }
    // A multi-platform image: the manifest for ours.
    let is_index = top_type.contains("index") || top_type.contains("manifest.list");
    let (manifest_bytes, manifest_type, manifest_digest) = if is_index {
        let index: ImageIndex = serde_json::from_slice(&top).map_err(|e| docs("image index", e))?;
        let (os, arch) = opts.platform.split_once('/').unwrap_or(("linux", "amd64"));
        let d = index
            .manifests()
            .iter()
            .find(|m| {
                m.platform().as_ref().is_some_and(|p| {
                    p.os().to_string() == os && p.architecture().to_string() == arch
                })
            })
            .ok_or_else(|| {
                Error::Registry(format!(
                    "{} has no manifest for {}",
                    opts.image, opts.platform
                ))
            })?;
        let digest = d.digest().to_string();
        let (bytes, ct) = registry
            .get(
                &image,
                &format!("manifests/{digest}"),
                MANIFEST_TYPES,
                MAX_DOC,
            )
            .await?;
        if sha256(&bytes) != digest {
            return Err(Error::Registry(format!(
                "manifest {digest} does not match its digest"
            )));
        }
        (bytes, ct, digest)
    } else {
        (top.clone(), top_type.clone(), top_digest.clone())
    };
    let manifest: ImageManifest =
        serde_json::from_slice(&manifest_bytes).map_err(|e| docs("image manifest", e))?;
    let config_desc = manifest.config();
    let config_digest = config_desc.digest().to_string();
    let (config_bytes, _) = registry
        .get(&image, &format!("blobs/{config_digest}"), &["*/*"], MAX_DOC)
        .await?;
    if sha256(&config_bytes) != config_digest {
        return Err(Error::Registry(format!(
            "config {config_digest} does not match its digest"
        )));
    }
    let config: ImageConfiguration =
        serde_json::from_slice(&config_bytes).map_err(|e| docs("image config", e))?;
    let diff_ids = config.rootfs().diff_ids();
    let layers = manifest.layers();
    if diff_ids.len() != layers.len() {
        return Err(Error::Registry(format!(
            "{}: {} layers but {} diff ids in the config",
            opts.image,
            layers.len(),
            diff_ids.len()
        )));
    }
    let chain = chain_ids(diff_ids);

    let channel = fetcher::uds::channel(&opts.containerd).await.map_err(|e| {
        Error::Containerd(format!(
            "{}: {}",
            opts.containerd.display(),
            fetcher::source::error_chain(&e)
        ))
    })?;
    let mut ctd = Containerd {
        channel,
        namespace: opts.namespace.clone(),
        lease: None,
    };
    let lease_id = format!(
        "dfsnapshotter-pull-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let mut lc = leases::leases_client::LeasesClient::new(ctd.channel.clone());
    let expire = time_in(std::time::Duration::from_secs(3600));
    lc.create(ctd.req(leases::CreateRequest {
        id: lease_id.clone(),
        labels: HashMap::from([("containerd.io/gc.expire".to_owned(), expire)]),
    }))
    .await
    .map_err(Containerd::err("cannot create a lease"))?;
    ctd.lease = Some(lease_id.clone());

    let result = async {
        let mut sc = snapshots::snapshots_client::SnapshotsClient::new(ctd.channel.clone());
        for (i, layer) in layers.iter().enumerate() {
            let key = format!("extract-{lease_id}-{i}-{}", chain[i]);
            let labels = HashMap::from([
                (LABEL_TARGET.to_owned(), chain[i].clone()),
                (LABEL_LAYER_DIGEST.to_owned(), layer.digest().to_string()),
                (LABEL_IMAGE_REF.to_owned(), image.name()),
                (
                    "containerd.io/snapshot/cri.manifest-digest".to_owned(),
                    manifest_digest.clone(),
                ),
            ]);
            let parent = if i == 0 {
                String::new()
            } else {
                chain[i - 1].clone()
            };
            let r = sc
                .prepare(ctd.req(snapshots::PrepareSnapshotRequest {
                    snapshotter: opts.snapshotter.clone(),
                    key: key.clone(),
                    parent,
                    labels,
                }))
                .await;
            match r {
                Err(s) if s.code() == tonic::Code::AlreadyExists => {}
                Err(s) => {
                    return Err(Containerd::err(&format!("layer {}", layer.digest()))(s));
                }
                Ok(_) => {
                    // Not mounted lazily: an empty snapshot would be wrong; take it back.
                    let _ = sc
                        .remove(ctd.req(snapshots::RemoveSnapshotRequest {
                            snapshotter: opts.snapshotter.clone(),
                            key,
                        }))
                        .await;
                    return Err(Error::Containerd(format!(
                        "layer {} could not be mounted lazily (see dfsnapshotter's log); \
                         pull this image with `ctr images pull --snapshotter {}` instead",
                        layer.digest(),
                        opts.snapshotter
                    )));
                }
            }
        }
        let top_chain = chain.last().cloned().unwrap_or_default();
        ctd.put(
            &config_digest,
            &config_bytes,
            HashMap::from([(
                format!("containerd.io/gc.ref.snapshot.{}", opts.snapshotter),
                top_chain,
            )]),
        )
        .await?;
        ctd.put(
            &manifest_digest,
            &manifest_bytes,
            HashMap::from([(
                "containerd.io/gc.ref.content.config".to_owned(),
                config_digest.clone(),
            )]),
        )
        .await?;
        let (target_type, target) = if is_index {
            ctd.put(
                &top_digest,
                &top,
                HashMap::from([(
                    "containerd.io/gc.ref.content.m.0".to_owned(),
                    manifest_digest.clone(),
                )]),
            )
            .await?;
            (top_type.clone(), (&top_digest, top.len()))
        } else {
            (
                manifest_type.clone(),
                (&manifest_digest, manifest_bytes.len()),
            )
        };
        let img = images::Image {
            name: image.name(),
            target: Some(Descriptor {
                media_type: target_type
                    .split(';')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned(),
                digest: target.0.clone(),
                size: target.1 as i64,
                annotations: HashMap::new(),
            }),
            ..Default::default()
        };
        let mut ic = images::images_client::ImagesClient::new(ctd.channel.clone());
        match ic
            .create(ctd.req(images::CreateImageRequest {
                image: Some(img.clone()),
            }))
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                ic.update(ctd.req(images::UpdateImageRequest {
                    image: Some(img),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["target".into()],
                    }),
                }))
                .await
                .map_err(Containerd::err("cannot update the image"))?;
            }
            Err(s) => return Err(Containerd::err("cannot create the image")(s)),
        }
        Ok(PullSummary {
            name: image.name(),
            manifest: manifest_digest.clone(),
            layers: layers.len(),
            layer_bytes: layers.iter().map(|l| l.size()).sum(),
        })
    }
    .await;
    let _ = lc
        .delete(ctd.req(leases::DeleteRequest {
            id: lease_id,
            sync: false,
        }))
        .await;
    result
}

/// OCI chain ids of a layer stack: `chain[0] = diff[0]`, `chain[i] = sha256(chain[i-1] + " " + diff[i])`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => sha256(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// RFC 3339 (UTC) of now + `d`.
fn time_in(d: std::time::Duration) -> String {
    let t = time::OffsetDateTime::now_utc() + d;
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_rule() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let c = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(c[0], a);
        assert_eq!(c[1], sha256(format!("{a} {b}").as_bytes()));
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn lease_expiry_is_rfc3339() {
        let t = time_in(std::time::Duration::from_secs(60));
        assert!(t.len() >= 20 && t.contains('T'), "{t}");
    }
}
