//! Where an image's registry requests go: the endpoints containerd's `hosts.toml` names for the
//! registry (mirrors first, in file order, then the server; [`fetcher::source::hosts`]), else
//! `https://host` (`http://` for `--plain-http` registries). Each endpoint gets its own HTTP
//! client (its CA, client certificate, `skip_verify`) and its own token cache, so a Harbor with a
//! private CA works from the same file ctr and CRI read.

use std::time::Duration;

use fetcher::source::hosts::{self, Capability, Endpoint, RegistryHosts, TlsSettings};
use fetcher::source::token::TokenCache;

use super::RegistryConfig;
use crate::error::{Error, Result};

/// `docker.io` images live here.
const DOCKER_HUB: &str = "registry-1.docker.io";

/// One endpoint, ready to be spoken to.
pub struct Hop {
    /// `scheme://host[:port][/prefix]`, without a trailing slash.
    pub base: String,
    /// A mirror (requests carry `?ns=<registry>`, as containerd sends them) or the server.
    pub mirror: bool,
    capabilities: Vec<Capability>,
    pub client: reqwest::Client,
    pub tokens: TokenCache,
}

/// A registry's hops in the order to try them.
pub struct Route {
    registry: String,
    hops: Vec<Hop>,
}

impl Route {
    /// The route to `registry` under `cfg` (reads its hosts.toml, loads certificates).
    pub fn build(registry: &str, cfg: &RegistryConfig) -> Result<Self> {
        let host = if registry == "docker.io" {
            DOCKER_HUB
        } else {
            registry
        };
        let scheme = if cfg.plain_http.iter().any(|h| h == registry) {
            "http"
        } else {
            "https"
        };
        let server = url::Url::parse(&format!("{scheme}://{host}"))
            .map_err(|e| Error::Invalid(format!("registry {registry:?}: {e}")))?;
        let found = match &cfg.hosts_dir {
            Some(dir) => hosts::load(dir, registry, &server)
                .map_err(|e| Error::Registry(format!("registry host config {e}")))?,
            None => None,
        };
        let hosts = found.unwrap_or_else(|| RegistryHosts::plain(server.clone()));
        let hops = hosts
            .endpoints
            .iter()
            .map(|e| hop(e, e.url != server))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            registry: registry.to_owned(),
            hops,
        })
    }

    /// The hops that serve `path` (`manifests/<tag>` needs `resolve`, the rest `pull`).
    pub fn hops_for(&self, path: &str) -> impl Iterator<Item = &Hop> {
        let need = match path.strip_prefix("manifests/") {
            Some(r) if !r.starts_with("sha256:") => Capability::Resolve,
            _ => Capability::Pull,
        };
        self.hops
            .iter()
            .filter(move |h| h.capabilities.contains(&need))
    }

    /// The hop blobs are read from (by the agent, through the supernode).
    pub fn blobs(&self) -> Result<&Hop> {
        self.hops_for("blobs/").next().ok_or_else(|| {
            Error::Registry(format!(
                "registry host config for {} names no endpoint that can pull",
                self.registry
            ))
        })
    }

    /// The URL of `path` under `/v2/<repository>/` at `hop`.
    pub fn url(&self, hop: &Hop, repository: &str, path: &str) -> String {
        let url = format!("{}/v2/{repository}/{path}", hop.base);
        if hop.mirror {
            format!("{url}?ns={}", self.registry)
        } else {
            url
        }
    }
}

fn hop(e: &Endpoint, mirror: bool) -> Result<Hop> {
    let client = client(&e.tls)?;
    Ok(Hop {
        base: e.url.as_str().trim_end_matches('/').to_owned(),
        mirror,
        capabilities: e.capabilities.clone(),
        tokens: TokenCache::new(client.clone()),
        client,
    })
}

/// An HTTP client with the endpoint's TLS settings.
fn client(tls: &TlsSettings) -> Result<reqwest::Client> {
    let b = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(120));
    hosts::apply_tls(b, tls)
        .map_err(|e| Error::Registry(format!("registry TLS: {e}")))?
        .build()
        .map_err(|e| Error::Registry(format!("HTTP client: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: Option<&std::path::Path>, plain: &[&str]) -> RegistryConfig {
        RegistryConfig {
            plain_http: plain.iter().map(|s| (*s).to_owned()).collect(),
            hosts_dir: dir.map(std::path::Path::to_path_buf),
        }
    }

    #[test]
    fn without_a_host_config_the_registry_is_its_own_server() {
        let r = Route::build("reg.example:5000", &cfg(None, &[])).expect("route");
        let hop = r.blobs().expect("blobs");
        assert_eq!(
            r.url(hop, "team/app", "blobs/sha256:ab"),
            "https://reg.example:5000/v2/team/app/blobs/sha256:ab"
        );
        let r = Route::build("docker.io", &cfg(None, &[])).expect("hub");
        assert!(r.blobs().expect("blobs").base.contains(DOCKER_HUB));
        let r = Route::build("plain:5000", &cfg(None, &["plain:5000"])).expect("plain");
        assert!(r.blobs().expect("blobs").base.starts_with("http://"));
    }

    #[test]
    fn mirrors_come_first_and_carry_the_namespace() {
        let dir = tempfile::tempdir().expect("dir");
        let reg = dir.path().join("reg.example:5000");
        std::fs::create_dir_all(&reg).expect("mkdir");
        std::fs::write(
            reg.join("hosts.toml"),
            "server = \"https://reg.example:5000\"\n\
             [host.\"http://127.0.0.1:65001\"]\n  capabilities = [\"pull\"]\n",
        )
        .expect("write");
        let r = Route::build("reg.example:5000", &cfg(Some(dir.path()), &[])).expect("route");
        let hop = r.blobs().expect("blobs");
        assert_eq!(
            r.url(hop, "team/app", "blobs/sha256:ab"),
            "http://127.0.0.1:65001/v2/team/app/blobs/sha256:ab?ns=reg.example:5000"
        );
        // Tags resolve at the server only: the mirror cannot.
        let tags: Vec<_> = r.hops_for("manifests/v1").map(|h| h.base.clone()).collect();
        assert_eq!(tags, vec!["https://reg.example:5000".to_owned()]);
        assert_eq!(r.hops_for("manifests/sha256:ab").count(), 2);
    }

    #[test]
    fn a_missing_or_bad_ca_is_named() {
        let dir = tempfile::tempdir().expect("dir");
        let reg = dir.path().join("reg.example");
        std::fs::create_dir_all(&reg).expect("mkdir");
        std::fs::write(reg.join("hosts.toml"), "ca = \"ca.crt\"\n").expect("write");
        let err = Route::build("reg.example", &cfg(Some(dir.path()), &[]))
            .err()
            .expect("no CA file")
            .to_string();
        assert!(err.contains("ca.crt"), "{err}");
        std::fs::write(reg.join("ca.crt"), "not a certificate").expect("write");
        let err = Route::build("reg.example", &cfg(Some(dir.path()), &[]))
            .err()
            .expect("bad CA")
            .to_string();
        assert!(err.contains("ca.crt"), "{err}");
    }
}
