//! containerd's registry host configuration, read the way containerd reads it, so that one file
//! per registry (`<config_path>/<host[:port]>/hosts.toml`, e.g.
//! `/etc/containerd/certs.d/harbor.example:443/hosts.toml`) configures ctr, CRI and Damselfly
//! alike: `server` (the registry's own endpoint), `[host."<url>"]` mirrors tried first in file
//! order, and per endpoint `ca`, `client`, `skip_verify` and `capabilities`. Relative paths are
//! taken from the registry's directory. A directory `_default` applies to registries without
//! their own. Unknown keys are refused by name; `header`, `override_path` and `dial_timeout` are
//! accepted and not used.

use std::path::{Path, PathBuf};

use toml::Value;

use crate::error::{Error, Result};

/// containerd's own default `config_path` for host configs.
pub const DEFAULT_DIR: &str = "/etc/containerd/certs.d";

/// What an endpoint is used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capability {
    /// Blobs and manifests by digest.
    Pull,
    /// Tags to digests.
    Resolve,
    Push,
}

/// How to speak TLS to an endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// CA certificates (PEM files) trusted besides the system's.
    pub ca: Vec<PathBuf>,
    /// Client certificate and key (PEM; the key may be in the certificate file).
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    /// Accept any server certificate (containerd's `skip_verify`).
    pub skip_verify: bool,
}

/// One endpoint of a registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `scheme://host[:port]` (and a path prefix, for mirrors that need one).
    pub url: url::Url,
    pub capabilities: Vec<Capability>,
    pub tls: TlsSettings,
}

impl Endpoint {
    pub fn can(&self, c: Capability) -> bool {
        self.capabilities.contains(&c)
    }
}

/// A registry's endpoints in the order to try them: mirrors, then the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryHosts {
    pub endpoints: Vec<Endpoint>,
}

impl RegistryHosts {
    /// The first endpoint that can do `c` (the server, if no mirror can).
    pub fn first(&self, c: Capability) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| e.can(c))
    }

    /// The endpoints of a registry without a hosts.toml: `scheme://host`, all capabilities.
    pub fn plain(server: url::Url) -> Self {
        Self {
            endpoints: vec![Endpoint {
                url: server,
                capabilities: vec![Capability::Pull, Capability::Resolve, Capability::Push],
                tls: TlsSettings::default(),
            }],
        }
    }
}

/// The directory name containerd looks up for `registry` (`docker.io` for Docker Hub).
fn dir_name(registry: &str) -> &str {
    match registry {
        "index.docker.io" | "registry-1.docker.io" => "docker.io",
        r => r,
    }
}

/// The hosts config for `registry` under `dir` (its own directory, else `_default`); `None`
/// when neither has a `hosts.toml`. `default_server` is the server when the file names none.
pub fn load(
    dir: &Path,
    registry: &str,
    default_server: &url::Url,
) -> Result<Option<RegistryHosts>, String> {
    for name in [dir_name(registry), "_default"] {
        let base = dir.join(name);
        let file = base.join("hosts.toml");
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("{}: {e}", file.display())),
        };
        return parse(&text, &base, default_server)
            .map(Some)
            .map_err(|e| format!("{}: {e}", file.display()));
    }
    Ok(None)
}

const ENDPOINT_KEYS: &[&str] = &[
    "capabilities",
    "ca",
    "client",
    "skip_verify",
    "header",
    "override_path",
    "dial_timeout",
];

/// Parses a hosts.toml whose relative paths are under `base`.
pub fn parse(text: &str, base: &Path, default_server: &url::Url) -> Result<RegistryHosts, String> {
    let doc: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| e.message().to_owned())?;
    for key in doc.keys() {
        if key != "server" && key != "host" && !ENDPOINT_KEYS.contains(&key.as_str()) {
            return Err(format!("unknown key {key:?}"));
        }
    }
    let server = match doc.get("server") {
        None => default_server.clone(),
        Some(Value::String(s)) => endpoint_url(s).map_err(|e| format!("server: {e}"))?,
        Some(_) => return Err("server: not a string".into()),
    };
    let mut endpoints = Vec::new();
    if let Some(hosts) = doc.get("host") {
        let Value::Table(hosts) = hosts else {
            return Err("host: not a table of [host.\"<url>\"] entries".into());
        };
        for (name, v) in hosts {
            let Value::Table(t) = v else {
                return Err(format!("host.{name:?}: not a table"));
            };
            let url = endpoint_url(name).map_err(|e| format!("host.{name:?}: {e}"))?;
            let at = format!("host.{name:?}");
            endpoints.push(endpoint(url, t, base, &at, false)?);
        }
    }
    // The server's own settings are the top-level keys (and a host entry naming it, if any).
    let own = endpoint(server.clone(), &doc, base, "", true)?;
    match endpoints.iter_mut().find(|e| e.url == server) {
        Some(e) => {
            e.tls.ca.extend(own.tls.ca);
            e.tls.client.extend(own.tls.client);
            e.tls.skip_verify |= own.tls.skip_verify;
        }
        None => endpoints.push(own),
    }
    Ok(RegistryHosts { endpoints })
}

/// `scheme://host[:port][/path]` of an endpoint, http or https only.
fn endpoint_url(s: &str) -> Result<url::Url, String> {
    let u = url::Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(format!("{s:?} is not an http(s)://host URL"));
    }
    if u.query().is_some() || !u.username().is_empty() || u.password().is_some() {
        return Err(format!(
            "{} must not carry a query or credentials",
            super::redact(s)
        ));
    }
    Ok(u)
}

fn endpoint(
    url: url::Url,
    t: &toml::Table,
    base: &Path,
    at: &str,
    server: bool,
) -> Result<Endpoint, String> {
    let field = |k: &str| {
        if at.is_empty() {
            k.to_owned()
        } else {
            format!("{at}.{k}")
        }
    };
    if !server && let Some(k) = t.keys().find(|k| !ENDPOINT_KEYS.contains(&k.as_str())) {
        return Err(format!("unknown key {:?}", field(k)));
    }
    let path = |s: &str| {
        let p = Path::new(s);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };
    let strings = |v: &Value, k: &str| -> Result<Vec<String>, String> {
        match v {
            Value::String(s) => Ok(vec![s.clone()]),
            Value::Array(a) => a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| format!("{}: not a string", field(k)))
                })
                .collect(),
            _ => Err(format!("{}: not a string or a list of strings", field(k))),
        }
    };
    let capabilities = match t.get("capabilities") {
        None => vec![Capability::Pull, Capability::Resolve, Capability::Push],
        Some(v) => strings(v, "capabilities")?
            .iter()
            .map(|c| match c.as_str() {
                "pull" => Ok(Capability::Pull),
                "resolve" => Ok(Capability::Resolve),
                "push" => Ok(Capability::Push),
                other => Err(format!(
                    "{}: unknown capability {other:?}",
                    field("capabilities")
                )),
            })
            .collect::<Result<_, _>>()?,
    };
    let ca = match t.get("ca") {
        None => Vec::new(),
        Some(v) => strings(v, "ca")?.iter().map(|s| path(s)).collect(),
    };
    let client = match t.get("client") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![(path(s), None)],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| match x {
                Value::String(s) => Ok((path(s), None)),
                Value::Array(pair) => match pair.as_slice() {
                    [Value::String(c)] => Ok((path(c), None)),
                    [Value::String(c), Value::String(k)] => Ok((path(c), Some(path(k)))),
                    _ => Err(format!("{}: want [\"cert\", \"key\"]", field("client"))),
                },
                _ => Err(format!(
                    "{}: want a path or [\"cert\", \"key\"]",
                    field("client")
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(format!("{}: want a path or a list", field("client"))),
    };
    let skip_verify = match t.get("skip_verify") {
        None => false,
        Some(Value::Boolean(b)) => *b,
        Some(_) => return Err(format!("{}: not a boolean", field("skip_verify"))),
    };
    Ok(Endpoint {
        url,
        capabilities,
        tls: TlsSettings {
            ca,
            client,
            skip_verify,
        },
    })
}

/// Trusts the PEM certificates in the file `path` too.
pub fn add_ca(mut b: reqwest::ClientBuilder, path: &Path) -> Result<reqwest::ClientBuilder> {
    let pem = std::fs::read(path).map_err(|e| Error::io("cannot read CA file", path, e))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| Error::invalid("CA file", format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::invalid(
            "CA file",
            format!("{}: no PEM certificate in it", path.display()),
        ));
    }
    for c in certs {
        b = b.add_root_certificate(c);
    }
    Ok(b)
}

/// Adds a host's CA certificates, client certificate and `skip_verify` to `b`.
pub fn apply_tls(
    mut b: reqwest::ClientBuilder,
    tls: &TlsSettings,
) -> Result<reqwest::ClientBuilder> {
    for ca in &tls.ca {
        b = add_ca(b, ca)?;
    }
    if let Some((cert, key)) = tls.client.first() {
        let mut pem = std::fs::read(cert)
            .map_err(|e| Error::io("cannot read client certificate", cert, e))?;
        if let Some(key) = key {
            pem.push(b'\n');
            pem.extend(
                std::fs::read(key).map_err(|e| Error::io("cannot read client key", key, e))?,
            );
        }
        let id = reqwest::Identity::from_pem(&pem).map_err(|e| {
            Error::invalid("client certificate", format!("{}: {e}", cert.display()))
        })?;
        b = b.identity(id);
    }
    Ok(b.danger_accept_invalid_certs(tls.skip_verify))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> url::Url {
        url::Url::parse(s).expect("url")
    }

    #[test]
    fn a_private_ca_and_a_mirror() {
        let text = r#"
server = "https://harbor.example:443"
ca = "ca.crt"

[host."https://mirror.example:5000"]
  capabilities = ["pull", "resolve"]
  ca = ["/etc/ssl/mirror.pem"]
  client = [["client.pem", "client.key"]]
  skip_verify = false
  [host."https://mirror.example:5000".header]
    x-tenant = ["a"]
"#;
        let base = Path::new("/etc/containerd/certs.d/harbor.example:443");
        let h = parse(text, base, &url("https://harbor.example:443")).expect("parse");
        assert_eq!(h.endpoints.len(), 2);
        let mirror = &h.endpoints[0];
        assert_eq!(mirror.url, url("https://mirror.example:5000"));
        assert!(mirror.can(Capability::Pull) && !mirror.can(Capability::Push));
        assert_eq!(mirror.tls.ca, vec![PathBuf::from("/etc/ssl/mirror.pem")]);
        assert_eq!(
            mirror.tls.client,
            vec![(base.join("client.pem"), Some(base.join("client.key")))]
        );
        let server = &h.endpoints[1];
        assert_eq!(server.tls.ca, vec![base.join("ca.crt")]);
        assert!(server.can(Capability::Push));
        assert_eq!(h.first(Capability::Pull).map(|e| &e.url), Some(&mirror.url));
        assert_eq!(h.first(Capability::Push).map(|e| &e.url), Some(&server.url));
    }

    #[test]
    fn the_server_defaults_and_may_be_plain_http() {
        let h = parse(
            "skip_verify = true\n",
            Path::new("/x"),
            &url("https://r.example"),
        )
        .expect("parse");
        assert_eq!(h.endpoints[0].url, url("https://r.example"));
        assert!(h.endpoints[0].tls.skip_verify);
        let h = parse(
            "server = \"http://r.example:5000\"\n",
            Path::new("/x"),
            &url("https://r.example:5000"),
        )
        .expect("parse");
        assert_eq!(h.endpoints[0].url.scheme(), "http");
    }

    #[test]
    fn mistakes_are_named() {
        let d = url("https://r");
        for (text, want) in [
            ("serve = \"https://r\"", "unknown key \"serve\""),
            ("server = \"ftp://r\"", "server:"),
            (
                "[host.\"https://m\"]\ncapabilitys = [\"pull\"]",
                "capabilitys",
            ),
            (
                "[host.\"https://m\"]\ncapabilities = [\"fetch\"]",
                "unknown capability",
            ),
            ("ca = 3", "ca: not a string"),
            ("client = [[1]]", "client"),
            ("server = \"https://u:p@r\"", "credentials"),
            ("= broken", ""),
        ] {
            let err = parse(text, Path::new("/x"), &d).expect_err(text);
            assert!(err.contains(want), "{text}: {err}");
            assert!(!err.contains("u:p@"), "{err}");
        }
    }

    #[test]
    fn files_are_found_per_registry_then_default() {
        let dir = tempfile::tempdir().expect("dir");
        let d = url("https://reg.example:5000");
        assert_eq!(load(dir.path(), "reg.example:5000", &d), Ok(None));
        std::fs::create_dir_all(dir.path().join("_default")).expect("mkdir");
        std::fs::write(
            dir.path().join("_default/hosts.toml"),
            "skip_verify = true\n",
        )
        .expect("write");
        let h = load(dir.path(), "reg.example:5000", &d)
            .expect("load")
            .expect("default");
        assert!(h.endpoints[0].tls.skip_verify);
        std::fs::create_dir_all(dir.path().join("reg.example:5000")).expect("mkdir");
        std::fs::write(
            dir.path().join("reg.example:5000/hosts.toml"),
            "ca = \"ca.pem\"\n",
        )
        .expect("write");
        let h = load(dir.path(), "reg.example:5000", &d)
            .expect("load")
            .expect("own");
        assert_eq!(
            h.endpoints[0].tls.ca,
            vec![dir.path().join("reg.example:5000/ca.pem")]
        );
        std::fs::write(
            dir.path().join("reg.example:5000/hosts.toml"),
            "bogus = 1\n",
        )
        .expect("write");
        let err = load(dir.path(), "reg.example:5000", &d).expect_err("bad");
        assert!(err.contains("hosts.toml") && err.contains("bogus"), "{err}");
    }
}
