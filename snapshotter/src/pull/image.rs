//! What an image is made of, decided from its registry documents alone: the manifest an index
//! names for a platform, the config and layers a manifest names, and the chain ids containerd
//! keys layer snapshots by. Every function here reads bytes a registry sent and does no I/O, so
//! all of it is property-tested against arbitrary and mangled documents.

use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Media types a manifest request accepts, indexes first.
pub const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn docs(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Registry(format!("{what}: {e}"))
}

/// Whether a manifest answer of `content_type` is an index (multi-platform image).
pub fn is_index(content_type: &str) -> bool {
    content_type.contains("index") || content_type.contains("manifest.list")
}

/// The digest of the manifest `index` names for `platform` (`os/arch`).
pub fn platform_manifest(index: &[u8], platform: &str, image: &str) -> Result<String> {
    let index: ImageIndex = serde_json::from_slice(index).map_err(|e| docs("image index", e))?;
    let (os, arch) = platform.split_once('/').unwrap_or(("linux", "amd64"));
    index
        .manifests()
        .iter()
        .find(|m| {
            m.platform()
                .as_ref()
                .is_some_and(|p| p.os().to_string() == os && p.architecture().to_string() == arch)
        })
        .map(|d| d.digest().to_string())
        .ok_or_else(|| Error::Registry(format!("{image} has no manifest for {platform}")))
}

/// Checks that `bytes` are the document `digest` names.
pub fn check_digest(what: &str, bytes: &[u8], digest: &str) -> Result<()> {
    if sha256(bytes) == digest {
        Ok(())
    } else {
        Err(Error::Registry(format!(
            "{what} {digest} does not match its digest"
        )))
    }
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

/// A manifest's config digest and layer blobs (digest, size, media type).
pub struct Manifest {
    pub config: String,
    pub blobs: Vec<(String, u64, String)>,
}

/// The config and layers `bytes` (an image manifest) name.
pub fn manifest(bytes: &[u8]) -> Result<Manifest> {
    let m: ImageManifest = serde_json::from_slice(bytes).map_err(|e| docs("image manifest", e))?;
    let out = Manifest {
        config: m.config().digest().to_string(),
        blobs: m
            .layers()
            .iter()
            .map(|l| (l.digest().to_string(), l.size(), l.media_type().to_string()))
            .collect(),
    };
    // Blobs are fetched, verified and cached by their sha256 everywhere downstream.
    let names = std::iter::once(&out.config).chain(out.blobs.iter().map(|(d, _, _)| d));
    if let Some(bad) = names.into_iter().find(|d| !is_sha256(d)) {
        return Err(Error::Registry(format!(
            "image manifest: {bad:?} is not a sha256 digest"
        )));
    }
    Ok(out)
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
        .map(|((digest, size, media_type), chain_id)| Layer {
            digest: digest.clone(),
            size: *size,
            media_type: media_type.clone(),
            chain_id,
        })
        .collect())
}

fn is_sha256(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
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
    use proptest::prelude::*;

    fn digest(seed: u8) -> String {
        sha256(&[seed])
    }

    fn manifest_json(config: &str, layers: &[(String, u64)]) -> String {
        let layers: Vec<String> = layers
            .iter()
            .map(|(d, s)| {
                format!(
                    r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{d}","size":{s}}}"#
                )
            })
            .collect();
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":2}},"layers":[{}]}}"#,
            layers.join(",")
        )
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
    fn an_index_names_the_manifest_of_our_platform() {
        let (amd, arm) = (digest(1), digest(2));
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[
              {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{arm}","size":1,"platform":{{"os":"linux","architecture":"arm64"}}}},
              {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{amd}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#
        );
        assert_eq!(
            platform_manifest(index.as_bytes(), "linux/amd64", "app").expect("amd64"),
            amd
        );
        let err = platform_manifest(index.as_bytes(), "linux/s390x", "app").expect_err("none");
        assert!(
            err.to_string().contains("no manifest for linux/s390x"),
            "{err}"
        );
    }

    #[test]
    fn a_config_with_other_diff_ids_is_refused_by_name() {
        let m = manifest(manifest_json(&digest(0), &[(digest(1), 10)]).as_bytes()).expect("m");
        let err = layers(&m, config_json(&[]).as_bytes(), "app").expect_err("count");
        assert!(err.to_string().contains("1 layers but 0 diff ids"), "{err}");
        let err = layers(&m, config_json(&["sha256:../x".into()]).as_bytes(), "app")
            .expect_err("not a digest");
        assert!(err.to_string().contains("not a sha256 digest"), "{err}");
    }

    proptest! {
        #[test]
        fn well_formed_documents_give_their_layers(
            seeds in proptest::collection::vec((any::<u8>(), 0u64..1 << 40), 0..12),
        ) {
            let blobs: Vec<(String, u64)> = seeds.iter().map(|(s, n)| (digest(*s), *n)).collect();
            let diffs: Vec<String> = seeds.iter().map(|(s, _)| sha256(&[*s, 0xff])).collect();
            let m = manifest(manifest_json(&digest(0), &blobs).as_bytes()).expect("manifest");
            prop_assert_eq!(&m.config, &digest(0));
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
        fn arbitrary_bytes_are_errors_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = platform_manifest(&bytes, "linux/amd64", "app");
            if let Ok(m) = manifest(&bytes) {
                let _ = layers(&m, &bytes, "app");
            }
        }

        #[test]
        fn mangled_manifests_are_errors_never_panics(
            cut in 0usize..600,
            flip in 0usize..600,
            with in any::<u8>(),
        ) {
            let good = manifest_json(&digest(0), &[(digest(1), 7), (digest(2), 9)]);
            let mut b = good.into_bytes();
            if flip < b.len() {
                b[flip] = with;
            }
            b.truncate(cut);
            if let Ok(m) = manifest(&b) {
                // Whatever parsed names sha256 digests only, safe in a registry API path.
                prop_assert!(is_sha256(&m.config));
                prop_assert!(m.blobs.iter().all(|(d, _, _)| is_sha256(d)));
                let _ = layers(&m, config_json(&[digest(3), digest(4)]).as_bytes(), "app");
            }
            let _ = platform_manifest(&b, "linux/amd64", "app");
        }
    }
}
