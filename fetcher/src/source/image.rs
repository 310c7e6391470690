//! Registry documents, decided from their bytes alone: which manifest an image index names for a
//! platform, which config and layer blobs a manifest names, and whether a document is the one its
//! digest names. Shared by `dfsnapshotter pull` (lazy pulls) and the supernode (preheating an
//! image from its manifest URL). Nothing here does I/O, so all of it is property-tested against
//! arbitrary and mangled documents; every digest it hands back is a well-formed sha256, safe to
//! put in a registry API path.

use oci_spec::image::{ImageIndex, ImageManifest};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Media types a manifest request accepts, indexes first.
pub const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// The largest manifest or index read from a registry (distribution refuses pushes of larger
/// ones; a bigger answer is no manifest).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn bad(what: &str, e: impl std::fmt::Display) -> Error {
    Error::ImageDocument(format!("{what}: {e}"))
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

/// Whether a manifest answer of `content_type` is an index (multi-platform image).
pub fn is_index(content_type: &str) -> bool {
    content_type.contains("index") || content_type.contains("manifest.list")
}

/// The digest of the manifest `index` names for `platform` (`os/arch`).
pub fn platform_manifest(index: &[u8], platform: &str, image: &str) -> Result<String> {
    let index: ImageIndex = serde_json::from_slice(index).map_err(|e| bad("image index", e))?;
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
        .filter(|d| is_sha256(d))
        .ok_or_else(|| Error::ImageDocument(format!("{image} has no manifest for {platform}")))
}

/// Checks that `bytes` are the document `digest` names.
pub fn check_digest(what: &str, bytes: &[u8], digest: &str) -> Result<()> {
    if sha256(bytes) == digest {
        Ok(())
    } else {
        Err(Error::ImageDocument(format!(
            "{what} {digest} does not match its digest"
        )))
    }
}

/// One blob a manifest names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    /// `sha256:<hex>`.
    pub digest: String,
    pub size: u64,
    pub media_type: String,
}

/// A manifest's config digest and layer blobs.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub config: String,
    pub blobs: Vec<Blob>,
}

/// The config and layers `bytes` (an image manifest) name.
pub fn manifest(bytes: &[u8]) -> Result<Manifest> {
    let m: ImageManifest = serde_json::from_slice(bytes).map_err(|e| bad("image manifest", e))?;
    let out = Manifest {
        config: m.config().digest().to_string(),
        blobs: m
            .layers()
            .iter()
            .map(|l| Blob {
                digest: l.digest().to_string(),
                size: l.size(),
                media_type: l.media_type().to_string(),
            })
            .collect(),
    };
    // Blobs are fetched, verified and cached by their sha256 everywhere downstream.
    let names = std::iter::once(&out.config).chain(out.blobs.iter().map(|b| &b.digest));
    if let Some(bad) = names.into_iter().find(|d| !is_sha256(d)) {
        return Err(Error::ImageDocument(format!(
            "image manifest: {bad:?} is not a sha256 digest"
        )));
    }
    Ok(out)
}

/// Whether `d` is `sha256:` and 64 lowercase hex digits.
pub fn is_sha256(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn digest(seed: u8) -> String {
        sha256(&[seed])
    }

    /// An OCI manifest naming `config` and gzip layers `(digest, size)`.
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
    fn a_manifest_names_its_config_and_layers_in_order() {
        let m = manifest(manifest_json(&digest(0), &[(digest(1), 10), (digest(2), 20)]).as_bytes())
            .expect("manifest");
        assert_eq!(m.config, digest(0));
        let got: Vec<(&str, u64)> = m
            .blobs
            .iter()
            .map(|b| (b.digest.as_str(), b.size))
            .collect();
        assert_eq!(
            got,
            vec![(digest(1).as_str(), 10), (digest(2).as_str(), 20)]
        );
        assert!(check_digest("manifest", b"x", &sha256(b"x")).is_ok());
        let err = check_digest("manifest", b"y", &sha256(b"x")).expect_err("wrong bytes");
        assert!(
            err.to_string().contains("does not match its digest"),
            "{err}"
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_are_errors_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = platform_manifest(&bytes, "linux/amd64", "app");
            let _ = manifest(&bytes);
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
                prop_assert!(m.blobs.iter().all(|b| is_sha256(&b.digest)));
            }
            if let Ok(d) = platform_manifest(&b, "linux/amd64", "app") {
                prop_assert!(is_sha256(&d));
            }
        }
    }
}
