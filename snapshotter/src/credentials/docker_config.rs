//! Docker's `config.json`, read the way the docker CLI reads it, for the user who runs
//! `dfsnapshotter pull`: a registry named in `credHelpers` asks that helper; otherwise a
//! `credsStore` asks the store; otherwise `auths` holds `auth` (base64 `user:password`) or
//! `username`/`password`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine;

use super::Secret;
use crate::error::{Error, Result};

/// Docker Hub's key in `auths` and credential stores.
const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

/// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
pub fn default_path() -> Option<PathBuf> {
    match std::env::var_os("DOCKER_CONFIG") {
        Some(d) => Some(PathBuf::from(d).join("config.json")),
        None => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json")),
    }
}

/// The credentials `path` gives `registry`; `None` when the file or an entry is absent.
pub fn read(path: &Path, registry: &str) -> Result<Option<Secret>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("cannot read docker config", path, e)),
    };
    secret_for(&bytes, registry)
        .map_err(|detail| Error::Credentials(format!("docker config {}: {detail}", path.display())))
}

#[derive(serde::Deserialize)]
struct Entry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

#[derive(serde::Deserialize)]
struct Config {
    #[serde(default)]
    auths: HashMap<String, Entry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

/// The keys a registry may be filed under.
fn keys_of(registry: &str) -> Vec<&str> {
    if registry == "docker.io" {
        vec![DOCKER_HUB_KEY, "docker.io", "index.docker.io"]
    } else {
        vec![registry]
    }
}

fn host_of(key: &str) -> &str {
    key.trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/')
}

/// The credentials a `config.json` (its bytes) gives `registry`.
pub fn secret_for(bytes: &[u8], registry: &str) -> Result<Option<Secret>, String> {
    let cfg: Config = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let wanted = keys_of(registry);
    let server = if registry == "docker.io" {
        DOCKER_HUB_KEY
    } else {
        registry
    };
    let helper = |name: &str| Secret::Helper {
        helper: name.to_owned(),
        server: server.to_owned(),
    };
    if let Some((_, h)) = cfg
        .cred_helpers
        .iter()
        .find(|(k, _)| wanted.iter().any(|w| *w == k.as_str() || *w == host_of(k)))
    {
        return check_helper(h, "credHelpers").map(|()| Some(helper(h)));
    }
    if let Some(store) = cfg.creds_store.as_deref().filter(|s| !s.is_empty()) {
        return check_helper(store, "credsStore").map(|()| Some(helper(store)));
    }
    let Some((key, e)) = cfg
        .auths
        .iter()
        .find(|(k, _)| wanted.iter().any(|w| *w == k.as_str() || *w == host_of(k)))
    else {
        return Ok(None);
    };
    if let Some(auth) = &e.auth {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| format!("auths.{key:?}.auth is not base64"))?;
        let s = String::from_utf8(raw).map_err(|_| format!("auths.{key:?}.auth is not UTF-8"))?;
        return Secret::from_user_password(&s)
            .map(Some)
            .map_err(|_| format!("auths.{key:?}.auth is not user:password"));
    }
    match (&e.username, &e.password) {
        (Some(u), Some(p)) if !u.is_empty() => Ok(Some(Secret::Basic {
            user: u.clone(),
            password: p.clone(),
        })),
        _ => Ok(None),
    }
}

fn check_helper(name: &str, key: &str) -> Result<(), String> {
    if super::helper::valid_name(name) {
        Ok(())
    } else {
        Err(format!("{key}: {name:?} is not a credential helper name"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(u: &str, p: &str) -> Option<Secret> {
        Some(Secret::Basic {
            user: u.into(),
            password: p.into(),
        })
    }

    #[test]
    fn auths_entries_by_host() {
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:wonderland");
        let cfg = format!(r#"{{"auths":{{"https://reg.example:5000":{{"auth":"{auth}"}}}}}}"#);
        assert_eq!(
            secret_for(cfg.as_bytes(), "reg.example:5000"),
            Ok(basic("alice", "wonderland"))
        );
        assert_eq!(secret_for(cfg.as_bytes(), "other"), Ok(None));
        let plain = r#"{"auths":{"docker.io":{"username":"bob","password":"pw"}}}"#;
        assert_eq!(
            secret_for(plain.as_bytes(), "docker.io"),
            Ok(basic("bob", "pw"))
        );
        let bad = r#"{"auths":{"reg":{"auth":"!!"}}}"#;
        assert!(secret_for(bad.as_bytes(), "reg").is_err());
        assert!(secret_for(b"{", "reg").is_err());
    }

    #[test]
    fn helpers_come_before_stores_and_stores_before_auths() {
        let cfg = r#"{"auths":{"reg:5000":{"auth":"YTpi"}},"credsStore":"desktop",
                      "credHelpers":{"reg:5000":"test","ecr.example":"ecr-login"}}"#;
        assert_eq!(
            secret_for(cfg.as_bytes(), "reg:5000"),
            Ok(Some(Secret::Helper {
                helper: "test".into(),
                server: "reg:5000".into()
            }))
        );
        assert_eq!(
            secret_for(cfg.as_bytes(), "other:443"),
            Ok(Some(Secret::Helper {
                helper: "desktop".into(),
                server: "other:443".into()
            }))
        );
        assert_eq!(
            secret_for(br#"{"credsStore":"desktop"}"#, "docker.io"),
            Ok(Some(Secret::Helper {
                helper: "desktop".into(),
                server: DOCKER_HUB_KEY.into()
            }))
        );
        let err = secret_for(br#"{"credHelpers":{"r":"../evil"}}"#, "r").expect_err("bad");
        assert!(err.contains("credHelpers"), "{err}");
    }
}
