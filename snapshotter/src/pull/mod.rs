//! `dfsnapshotter pull REF`: makes an image runnable with `ctr run --snapshotter damselfly`
//! without downloading its layers. The manifest and config come from the registry (small); each
//! layer becomes a snapshot prepared through containerd with the remote-layer labels, which this
//! snapshotter answers by mounting the layer lazily; then containerd's content store gets the
//! manifest and config, and the image its name. A lease keeps it all from containerd's garbage
//! collector until the image names it. A layer the snapshotter could not mount lazily is pulled
//! normally ([`unpack`]) and counted, so the pull still succeeds.

mod containerd;
pub mod image;
mod unpack;

use std::collections::HashMap;
use std::path::PathBuf;

use proto::containerd::services::images::v1 as images;
use proto::containerd::services::snapshots::v1 as snapshots;
use proto::containerd::types::Descriptor;

use crate::error::{Error, Result};
use crate::registry::{Reference, Registry};
use crate::remote::{LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_TARGET};
use containerd::Containerd;
use image::{Layer, MANIFEST_TYPES, sha256};

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
    /// Bytes of the layers.
    pub layer_bytes: u64,
    /// Layers that could not be mounted lazily and were pulled normally.
    pub unpacked: Vec<String>,
}

pub use fetcher::source::image::host_platform;

/// A registry document: its bytes, content type and digest.
struct Doc {
    bytes: Vec<u8>,
    media_type: String,
    digest: String,
}

/// An image's documents, fetched and verified, and the layers they name.
struct Resolved {
    /// What the reference names: the index of a multi-platform image, else the manifest.
    top: Doc,
    /// The platform's manifest (the same as `top` for a single-platform image).
    manifest: Doc,
    config: Doc,
    layers: Vec<Layer>,
}

impl Resolved {
    fn is_index(&self) -> bool {
        self.top.digest != self.manifest.digest
    }
}

/// Pulls `opts.image` for lazy starts.
pub async fn pull(registry: &Registry, opts: &PullOptions) -> Result<PullSummary> {
    let image = Reference::parse(&opts.image)?;
    let docs = resolve(registry, &image, opts).await?;
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
    let lease = ctd.lease().await?;
    let result = async {
        let unpacked = prepare_layers(&ctd, registry, opts, &image, &docs, &lease).await?;
        store_documents(&ctd, opts, &docs).await?;
        ctd.name_image(image_record(&image, &docs)).await?;
        Ok(PullSummary {
            name: image.name(),
            manifest: docs.manifest.digest.clone(),
            layers: docs.layers.len(),
            layer_bytes: docs.layers.iter().map(|l| l.size).sum(),
            unpacked,
        })
    }
    .await;
    ctd.release().await;
    result
}

/// Fetches the reference's manifest (through an index for `opts.platform`) and its config, each
/// checked against its digest, and the layers they name.
async fn resolve(registry: &Registry, image: &Reference, opts: &PullOptions) -> Result<Resolved> {
    let get_manifest = |reference: String| async move {
        let path = format!("manifests/{reference}");
        let (bytes, media_type) = registry.get(image, &path, MANIFEST_TYPES, MAX_DOC).await?;
        let digest = sha256(&bytes);
        Ok::<_, Error>(Doc {
            bytes,
            media_type,
            digest,
        })
    };
    let top = get_manifest(image.reference.clone()).await?;
    if image.reference.starts_with("sha256:") {
        image::check_digest("manifest of", &top.bytes, &image.reference)?;
    }
    let manifest = if image::is_index(&top.media_type) {
        let digest = image::platform_manifest(&top.bytes, &opts.platform, &opts.image)?;
        let m = get_manifest(digest.clone()).await?;
        image::check_digest("manifest", &m.bytes, &digest)?;
        m
    } else {
        Doc {
            bytes: top.bytes.clone(),
            media_type: top.media_type.clone(),
            digest: top.digest.clone(),
        }
    };
    let parts = image::manifest(&manifest.bytes)?;
    let (bytes, media_type) = registry
        .get(image, &format!("blobs/{}", parts.config), &["*/*"], MAX_DOC)
        .await?;
    image::check_digest("config", &bytes, &parts.config)?;
    let layers = image::layers(&parts, &bytes, &opts.image)?;
    Ok(Resolved {
        top,
        manifest,
        config: Doc {
            bytes,
            media_type,
            digest: parts.config,
        },
        layers,
    })
}

/// Prepares each layer's snapshot with the remote-layer labels: the snapshotter mounts it
/// lazily and answers `AlreadyExists`. A snapshot it prepared normally instead (it could not
/// mount the layer lazily) gets the layer pulled and unpacked into it. The digests of those.
async fn prepare_layers(
    ctd: &Containerd,
    registry: &Registry,
    opts: &PullOptions,
    image: &Reference,
    docs: &Resolved,
    lease: &str,
) -> Result<Vec<String>> {
    let mut sc = snapshots::snapshots_client::SnapshotsClient::new(ctd.channel.clone());
    let mut parent = String::new();
    let mut unpacked = Vec::new();
    for (i, layer) in docs.layers.iter().enumerate() {
        let key = format!("extract-{lease}-{i}-{}", layer.chain_id);
        let labels = HashMap::from([
            (LABEL_TARGET.to_owned(), layer.chain_id.clone()),
            (LABEL_LAYER_DIGEST.to_owned(), layer.digest.clone()),
            (LABEL_IMAGE_REF.to_owned(), image.name()),
            (
                "containerd.io/snapshot/cri.manifest-digest".to_owned(),
                docs.manifest.digest.clone(),
            ),
        ]);
        let r = sc
            .prepare(ctd.req(snapshots::PrepareSnapshotRequest {
                snapshotter: opts.snapshotter.clone(),
                key: key.clone(),
                parent: std::mem::replace(&mut parent, layer.chain_id.clone()),
                labels,
            }))
            .await;
        match r {
            Err(s) if s.code() == tonic::Code::AlreadyExists => {}
            Err(s) => return Err(Containerd::err(&format!("layer {}", layer.digest))(s)),
            Ok(prepared) => {
                let mounts = prepared.into_inner().mounts;
                let done = unpack::unpack(
                    ctd,
                    registry,
                    image,
                    layer,
                    (&opts.snapshotter, &key, mounts),
                )
                .await;
                if let Err(e) = done {
                    // An empty snapshot would be wrong: take it back.
                    let _ = sc
                        .remove(ctd.req(snapshots::RemoveSnapshotRequest {
                            snapshotter: opts.snapshotter.clone(),
                            key,
                        }))
                        .await;
                    return Err(e);
                }
                unpacked.push(layer.digest.clone());
            }
        }
    }
    Ok(unpacked)
}

/// Puts the config, manifest (and index) into containerd's content store, each labelled with
/// what it keeps alive for the garbage collector.
async fn store_documents(ctd: &Containerd, opts: &PullOptions, docs: &Resolved) -> Result<()> {
    let top_chain = docs
        .layers
        .last()
        .map(|l| l.chain_id.clone())
        .unwrap_or_default();
    let gc_ref = |k: String, v: &str| HashMap::from([(k, v.to_owned())]);
    ctd.put(
        &docs.config.digest,
        &docs.config.bytes,
        gc_ref(
            format!("containerd.io/gc.ref.snapshot.{}", opts.snapshotter),
            &top_chain,
        ),
    )
    .await?;
    ctd.put(
        &docs.manifest.digest,
        &docs.manifest.bytes,
        gc_ref(
            "containerd.io/gc.ref.content.config".into(),
            &docs.config.digest,
        ),
    )
    .await?;
    if docs.is_index() {
        ctd.put(
            &docs.top.digest,
            &docs.top.bytes,
            gc_ref(
                "containerd.io/gc.ref.content.m.0".into(),
                &docs.manifest.digest,
            ),
        )
        .await?;
    }
    Ok(())
}

/// The image record: the reference's name pointing at what it names.
fn image_record(image: &Reference, docs: &Resolved) -> images::Image {
    let top = &docs.top;
    images::Image {
        name: image.name(),
        target: Some(Descriptor {
            media_type: top
                .media_type
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned(),
            digest: top.digest.clone(),
            size: top.bytes.len() as i64,
            annotations: HashMap::new(),
        }),
        ..Default::default()
    }
}
