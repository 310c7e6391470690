//! What a CRI pull secret (`PullImageRequest.auth`, as kubelet fills it from the pod's
//! `imagePullSecrets` or its own credential providers) gives the image's lazy layers.

use base64::Engine;
use proto::cri::AuthConfig;

use crate::credentials::Secret;

/// Why a pull secret gives lazy layers nothing.
#[derive(Debug, PartialEq, Eq)]
pub enum Unusable {
    /// The pull carries no credentials (a public image, or node credentials containerd holds).
    None,
    /// Only a token form (`identity_token`, `registry_token`) that lazy reads cannot replay.
    TokenOnly,
    /// `auth` is not base64 of `user:password`.
    BadAuth,
}

/// The user and password of `auth`, from `username`/`password` or `auth`.
pub fn secret(auth: Option<&AuthConfig>) -> Result<Secret, Unusable> {
    let Some(a) = auth else {
        return Err(Unusable::None);
    };
    if !a.username.is_empty() {
        return Ok(Secret::Basic {
            user: a.username.clone(),
            password: a.password.clone(),
        });
    }
    if !a.auth.is_empty() {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.auth.trim())
            .map_err(|_| Unusable::BadAuth)?;
        let s = String::from_utf8(raw).map_err(|_| Unusable::BadAuth)?;
        return Secret::from_user_password(&s).map_err(|_| Unusable::BadAuth);
    }
    if !a.identity_token.is_empty() || !a.registry_token.is_empty() {
        return Err(Unusable::TokenOnly);
    }
    Err(Unusable::None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(u: &str, p: &str) -> Secret {
        Secret::Basic {
            user: u.into(),
            password: p.into(),
        }
    }

    #[test]
    fn pull_secrets_in_each_form() {
        let plain = AuthConfig {
            username: "alice".into(),
            password: "pw".into(),
            ..Default::default()
        };
        assert_eq!(secret(Some(&plain)), Ok(basic("alice", "pw")));
        let encoded = AuthConfig {
            auth: base64::engine::general_purpose::STANDARD.encode("bob:a:b"),
            ..Default::default()
        };
        assert_eq!(secret(Some(&encoded)), Ok(basic("bob", "a:b")));
        let junk = AuthConfig {
            auth: "!!".into(),
            ..Default::default()
        };
        assert_eq!(secret(Some(&junk)), Err(Unusable::BadAuth));
        let token = AuthConfig {
            registry_token: "t".into(),
            ..Default::default()
        };
        assert_eq!(secret(Some(&token)), Err(Unusable::TokenOnly));
        assert_eq!(secret(Some(&AuthConfig::default())), Err(Unusable::None));
        assert_eq!(secret(None), Err(Unusable::None));
        assert!(!format!("{plain:?}").contains("pw"));
    }
}
