//! Registry token requests seen by the proxy. The proxy learns token realms from the registry's
//! `WWW-Authenticate: Bearer realm="..."` answers that pass through it; a later `GET` of such a
//! realm (a hijacked host, or an absolute-form request) is a token request. In mirror mode the
//! client would go to the realm directly, so the challenge's realm is pointed at
//! `http://<proxy>/_damselfly/token?realm=<the registry's realm>` instead (clients add their
//! `service` and `scope` to it), which comes back here. It is asked of the
//! supernode (rendezvous over the URL), which shares one upstream request among all peers asking
//! the same thing with the same credentials and reuses the token while fresh; when no supernode
//! answers, this agent's own [`TokenCache`] does the same for its clients.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use proto::scheduler::TokenRequest;

use super::{Proxy, text};
use crate::rendezvous;
use crate::source::token::{TokenAnswer, TokenCache};

/// Where mirror-mode clients are sent for tokens.
pub(crate) const MIRROR_TOKEN_PATH: &str = "/_damselfly/token";

/// Realms remembered (a host talks to a handful of registries).
const MAX_REALMS: usize = 256;

pub(crate) struct Tokens {
    /// realm key → base URL of the registry that named it.
    realms: Mutex<HashMap<String, String>>,
    local: TokenCache,
}

use crate::source::token::realm_key;

pub(crate) use crate::source::token::bearer_realm;

impl Tokens {
    pub fn new(client: reqwest::Client) -> Self {
        Self {
            realms: Mutex::new(HashMap::new()),
            local: TokenCache::new(client),
        }
    }

    /// Remembers the realms of the Bearer challenges in `headers` (an answer of the registry
    /// `upstream` was asked).
    pub fn learn(&self, upstream: &url::Url, headers: &HeaderMap) {
        let registry = crate::source::token::registry_base(upstream);
        for v in headers.get_all(header::WWW_AUTHENTICATE) {
            if let Some(realm) = v.to_str().ok().and_then(bearer_realm)
                && let Ok(mut r) = self.realms.lock()
                && r.len() < MAX_REALMS
            {
                r.insert(realm_key(&realm), registry.clone());
            }
        }
    }

    /// Is `target` a token request for a realm we have seen?
    pub fn is_token_request(&self, target: &url::Url) -> bool {
        self.realms
            .lock()
            .is_ok_and(|r| r.contains_key(&realm_key(target)))
    }

    /// The registry that named the realm of `target`.
    fn registry_of(&self, target: &url::Url) -> String {
        self.realms
            .lock()
            .ok()
            .and_then(|r| r.get(&realm_key(target)).cloned())
            .unwrap_or_default()
    }

    /// The token answer: from a supernode, else fetched (coalesced) by this agent.
    async fn answer(
        &self,
        peer: &crate::peer::Peer,
        target: &url::Url,
        authorization: Option<&str>,
    ) -> Result<TokenAnswer, String> {
        for addr in rendezvous::order(target.as_str(), peer.supernodes()) {
            let Ok(mut c) = peer.inner.channels.client(addr, peer.tls()).await else {
                continue;
            };
            let req = TokenRequest {
                url: target.to_string(),
                authorization: authorization.map(str::to_owned),
                registry: self.registry_of(target),
            };
            let mut req = tonic::Request::new(req);
            req.set_timeout(Duration::from_secs(40));
            match c.token(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    return Ok(TokenAnswer::new(
                        u16::try_from(r.status).unwrap_or(502),
                        r.content_type,
                        r.www_authenticate,
                        r.body.into(),
                    ));
                }
                Err(e) => {
                    tracing::warn!(supernode = addr, error = %e.message(), "token via supernode failed");
                }
            }
        }
        self.local.get(target, authorization).await
    }
}

/// `http://<Host>` as the client addressed us, if the Host header is a plain authority.
pub(crate) fn proxy_base(headers: &HeaderMap) -> Option<String> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let authority: http::uri::Authority = host.parse().ok()?;
    Some(format!("http://{authority}"))
}

/// Rewrites the realm of every Bearer challenge in `headers` to our mirror token endpoint.
pub(crate) fn point_realms_at(headers: &mut HeaderMap, via: &str) {
    let values: Vec<_> = headers
        .get_all(header::WWW_AUTHENTICATE)
        .iter()
        .cloned()
        .collect();
    if values.is_empty() {
        return;
    }
    headers.remove(header::WWW_AUTHENTICATE);
    for v in values {
        let rewritten = v
            .to_str()
            .ok()
            .and_then(|s| rewrite_realm(s, via))
            .and_then(|s| http::HeaderValue::from_str(&s).ok());
        headers.append(header::WWW_AUTHENTICATE, rewritten.unwrap_or(v));
    }
}

/// `Bearer realm="R",...` → `Bearer realm="<via>/_damselfly/token?realm=<R>",...`.
fn rewrite_realm(challenge: &str, via: &str) -> Option<String> {
    let realm = bearer_realm(challenge)?;
    let quoted = format!("realm=\"{}\"", realm_text(challenge)?);
    let ours = format!(
        "{via}{MIRROR_TOKEN_PATH}?{}",
        url::form_urlencoded::Serializer::new(String::new())
            .append_pair("realm", realm.as_str())
            .finish()
    );
    Some(challenge.replacen(&quoted, &format!("realm=\"{ours}\""), 1))
}

/// The realm exactly as written in the challenge.
fn realm_text(challenge: &str) -> Option<&str> {
    let start = challenge.find("realm=\"")? + 7;
    let len = challenge[start..].find('"')?;
    Some(&challenge[start..start + len])
}

/// `GET /_damselfly/token?realm=R&service=..&scope=..` from a mirror-mode client: a token request
/// for realm R (only realms the registry named to us). Other methods (OAuth2 `POST`) go to the
/// realm unchanged.
pub(crate) async fn mirror_token(p: &Proxy, req: axum::extract::Request<Body>) -> Response {
    let pairs = super::query_pairs(req.uri());
    let realm = pairs
        .iter()
        .find(|(k, _)| k == "realm")
        .and_then(|(_, v)| url::Url::parse(v).ok());
    let Some(mut target) = realm.filter(|r| p.tokens.is_token_request(r)) else {
        return text(
            StatusCode::BAD_REQUEST,
            "dfdaemon proxy: unknown token realm (only realms named by a registry answer are served)",
        );
    };
    let rest: Vec<&(String, String)> = pairs.iter().filter(|(k, _)| k != "realm").collect();
    if !rest.is_empty() {
        target
            .query_pairs_mut()
            .extend_pairs(rest.iter().map(|(k, v)| (k, v)));
    }
    if req.method() == http::Method::GET {
        p.count("token");
        serve(p, req.headers(), target).await
    } else {
        p.count("passthrough");
        super::passthrough::forward(p, req, target).await
    }
}

/// Serves a token request (never logs the credentials).
pub(crate) async fn serve(p: &Proxy, headers: &HeaderMap, target: url::Url) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match p.tokens.answer(&p.peer, &target, authorization).await {
        Ok(a) => {
            let mut b = Response::builder().status(a.status);
            if let Some(ct) = &a.content_type {
                b = b.header(header::CONTENT_TYPE, ct);
            }
            if let Some(w) = &a.www_authenticate {
                b = b.header(header::WWW_AUTHENTICATE, w);
            }
            b.body(Body::from(a.body)).unwrap_or_else(|_| {
                text(StatusCode::BAD_GATEWAY, "dfdaemon proxy: bad token answer")
            })
        }
        Err(msg) => text(StatusCode::BAD_GATEWAY, format!("dfdaemon proxy: {msg}")),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        // Registry challenges are the registry's text: whatever it says, no panic.
        #[test]
        fn challenges_are_parsed_or_left_alone(c in "\\PC{0,120}", q in "[a-z]{0,3}realm=\"[^\"]{0,40}\"[a-z,=\" ]{0,30}") {
            let _ = realm_text(&c);
            let _ = realm_text(&q);
            let mut h = http::HeaderMap::new();
            for v in [&c, &q] {
                if let Ok(v) = http::HeaderValue::from_str(v) {
                    h.append(http::header::WWW_AUTHENTICATE, v);
                }
            }
            point_realms_at(&mut h, "http://127.0.0.1:65001");
        }
    }

    use super::*;

    #[test]
    fn finds_bearer_realms_only() {
        let r = bearer_realm(
            r#"Bearer realm="https://harbor.example.com/service/token",service="harbor-registry",scope="repository:p/a:pull""#,
        )
        .expect("realm");
        assert_eq!(r.as_str(), "https://harbor.example.com/service/token");
        assert_eq!(
            realm_key(&r),
            "https://harbor.example.com:443/service/token"
        );
        assert!(bearer_realm(r#"Basic realm="registry""#).is_none());
        assert!(bearer_realm(r#"Bearer realm="file:///etc/passwd""#).is_none());
        assert!(bearer_realm(r#"Bearer realm="unterminated"#).is_none());
        assert!(bearer_realm("Bearer").is_none());
        assert!(bearer_realm("").is_none());
    }

    #[test]
    fn mirror_mode_points_realms_at_the_proxy() {
        let mut h = HeaderMap::new();
        h.append(
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static(
                r#"Bearer realm="https://auth.example.com/token?x=1",service="reg",scope="repository:p/a:pull""#,
            ),
        );
        h.append(
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static(r#"Basic realm="reg""#),
        );
        point_realms_at(&mut h, "http://127.0.0.1:65001");
        let v: Vec<&str> = h
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        assert_eq!(
            v,
            [
                r#"Bearer realm="http://127.0.0.1:65001/_damselfly/token?realm=https%3A%2F%2Fauth.example.com%2Ftoken%3Fx%3D1",service="reg",scope="repository:p/a:pull""#,
                r#"Basic realm="reg""#
            ]
        );
        let mut host = HeaderMap::new();
        host.insert(
            header::HOST,
            http::HeaderValue::from_static("127.0.0.1:65001"),
        );
        assert_eq!(proxy_base(&host).as_deref(), Some("http://127.0.0.1:65001"));
        host.insert(header::HOST, http::HeaderValue::from_static("evil/x"));
        assert_eq!(proxy_base(&host), None);
    }
}
