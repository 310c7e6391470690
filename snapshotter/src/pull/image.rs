//! What an image is made of, decided from its registry documents alone: the manifest an index
//! names for a platform, the config and layers a manifest names, and the chain ids containerd
//! keys layer snapshots by. Every function here reads bytes a registry sent and does no I/O, so
//! all of it is property-tested against arbitrary and mangled documents.

pub use fetcher::source::image::{MANIFEST_TYPES, is_index, sha256};
use fetcher::source::image::{Manifest, is_sha256};
use oci_spec::image::ImageConfiguration;

use crate::error::{Error, Result};

fn docs(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Registry(format!("{what}: {e}"))
}

/// The digest of the manifest `index` names for `platform` (`os/arch`).
pub fn platform_manifest(index: &[u8], platform: &str, image: &str) -> Result<String> {
    fetcher::source::image::platform_manifest(index, platform, image).map_err(registry)
}

/// Checks that `bytes` are the document `digest` names.
pub fn check_digest(what: &str, bytes: &[u8], digest: &str) -> Result<()> {
    fetcher::source::image::check_digest(what, bytes, digest).map_err(registry)
}

/// The config and layers `bytes` (an image manifest) name.
pub fn manifest(bytes: &[u8]) -> Result<Manifest> {
    fetcher::source::image::manifest(bytes).map_err(registry)
}

fn registry(e: fetcher::Error) -> Error {
    Error::Registry(e.to_string())
}

/// One layer of an image, as a snapshot of it is prepared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    /// The compressed blob's digest (the registry's name for it).
    pub digest: String,
    pub size: u64,
    pub media_type: String,
    /// The chain id of the stack up to and including this layer.
    pub chain_id: String,
}

/// The layers of `manifest` with their chain ids from `config` (the image config's diff ids,
/// one per layer or the image is refused).
pub fn layers(manifest: &Manifest, config: &[u8], image: &str) -> Result<Vec<Layer>> {
    let config: ImageConfiguration =
        serde_json::from_slice(config).map_err(|e| docs("image config", e))?;
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != manifest.blobs.len() {
        return Err(Error::Registry(format!(
            "{image}: {} layers but {} diff ids in the config",
            manifest.blobs.len(),
            diff_ids.len()
        )));
    }
    if let Some(bad) = diff_ids.iter().find(|d| !is_sha256(d)) {
        return Err(Error::Registry(format!(
            "{image}: diff id {bad:?} is not a sha256 digest"
        )));
    }
    Ok(manifest
        .blobs
        .iter()
        .zip(chain_ids(diff_ids))
        .map(|(b, chain_id)| Layer {
            digest: b.digest.clone(),
            size: b.size,
            media_type: b.media_type.clone(),
            chain_id,
        })
        .collect())
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

#[cfg(test)]
mod tests {
    use super::*;
    use fetcher::source::image::Blob;
    use proptest::prelude::*;

    fn digest(seed: u8) -> String {
        sha256(&[seed])
    }

    fn manifest_of(config: &str, layers: &[(String, u64)]) -> Manifest {
        Manifest {
            config: config.to_owned(),
            blobs: layers
                .iter()
                .map(|(d, s)| Blob {
                    digest: d.clone(),
                    size: *s,
                    media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                })
                .collect(),
        }
    }

    fn config_json(diff_ids: &[String]) -> String {
        let ids: Vec<String> = diff_ids.iter().map(|d| format!("{d:?}")).collect();
        format!(
            r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[{}]}}}}"#,
            ids.join(",")
        )
    }

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
    fn a_config_with_other_diff_ids_is_refused_by_name() {
        let m = manifest_of(&digest(0), &[(digest(1), 10)]);
        let err = layers(&m, config_json(&[]).as_bytes(), "app").expect_err("count");
        assert!(err.to_string().contains("1 layers but 0 diff ids"), "{err}");
        let err = layers(&m, config_json(&["sha256:../x".into()]).as_bytes(), "app")
            .expect_err("not a digest");
        assert!(err.to_string().contains("not a sha256 digest"), "{err}");
    }

    #[test]
    fn registry_document_errors_are_registry_errors() {
        let err = manifest(b"{").expect_err("not a manifest");
        assert!(matches!(err, Error::Registry(_)), "{err}");
    }

    proptest! {
        #[test]
        fn well_formed_documents_give_their_layers(
            seeds in proptest::collection::vec((any::<u8>(), 0u64..1 << 40), 0..12),
        ) {
            let blobs: Vec<(String, u64)> = seeds.iter().map(|(s, n)| (digest(*s), *n)).collect();
            let diffs: Vec<String> = seeds.iter().map(|(s, _)| sha256(&[*s, 0xff])).collect();
            let m = manifest_of(&digest(0), &blobs);
            let ls = layers(&m, config_json(&diffs).as_bytes(), "app").expect("layers");
            prop_assert_eq!(ls.len(), blobs.len());
            let chain = chain_ids(&diffs);
            for (l, ((d, n), c)) in ls.iter().zip(blobs.iter().zip(chain)) {
                prop_assert_eq!(&l.digest, d);
                prop_assert_eq!(l.size, *n);
                prop_assert_eq!(&l.chain_id, &c);
            }
        }

        #[test]
        fn arbitrary_configs_are_errors_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let m = manifest_of(&digest(0), &[(digest(1), 7), (digest(2), 9)]);
            let _ = layers(&m, &bytes, "app");
        }
    }
}
