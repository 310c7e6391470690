//! `damselfly-token-server`: a small registry token service (what Harbor's core does for its
//! registry), over HTTPS. `GET /token?service=S&scope=repository:NAME:ACTIONS` with HTTP Basic
//! credentials (or none: anonymous) answers `{"token": JWT, "expires_in": N}`; the JWT is ES256,
//! signed by `--signing-key`, with the signing certificate in its `x5c` header, which the registry
//! checks against its `rootcertbundle`. `GET /_stats` reports how many tokens were issued per user
//! and scope. Prints `listening on ADDR`.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use clap::Parser;
use hyper_util::rt::TokioIo;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tower::ServiceExt;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: std::net::SocketAddr,
    /// TLS server certificate and key (PEM).
    #[arg(long)]
    tls_cert: std::path::PathBuf,
    #[arg(long)]
    tls_key: std::path::PathBuf,
    /// Token-signing certificate and its P-256 key (PEM, PKCS#8).
    #[arg(long)]
    signing_cert: std::path::PathBuf,
    #[arg(long)]
    signing_key: std::path::PathBuf,
    #[arg(long, default_value = "damselfly-token-issuer")]
    issuer: String,
    #[arg(long, default_value = "damselfly-registry")]
    service: String,
    /// `NAME:PASSWORD`, repeatable.
    #[arg(long)]
    user: Vec<String>,
    /// `REPO=USER,USER`: only these users may touch REPO; other repositories are open to every
    /// known user, and to anonymous clients for pull.
    #[arg(long)]
    private: Vec<String>,
    /// Token lifetime, seconds.
    #[arg(long, default_value_t = 300)]
    expires_in: u64,
}

struct Server {
    args: Args,
    key: EcdsaKeyPair,
    x5c: String,
    users: HashMap<String, String>,
    private: HashMap<String, Vec<String>>,
    issued: Mutex<BTreeMap<String, u64>>,
}

#[derive(serde::Deserialize)]
struct TokenQuery {
    service: Option<String>,
    scope: Option<String>,
}

/// The user named by valid Basic credentials; `Ok(None)`: anonymous; `Err`: bad credentials.
fn authenticate(s: &Server, headers: &HeaderMap) -> Result<Option<String>, ()> {
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let v = v.to_str().map_err(|_| ())?;
    let b64 = v.strip_prefix("Basic ").ok_or(())?;
    let raw = STANDARD.decode(b64.trim()).map_err(|_| ())?;
    let raw = String::from_utf8(raw).map_err(|_| ())?;
    let (user, pass) = raw.split_once(':').ok_or(())?;
    match s.users.get(user) {
        Some(p) if p == pass => Ok(Some(user.to_owned())),
        _ => Err(()),
    }
}

/// The actions of `wanted` that `user` may have on `repo`.
fn allowed(s: &Server, user: Option<&str>, repo: &str, wanted: &[&str]) -> Vec<String> {
    let ok = |action: &str| match (s.private.get(repo), user) {
        (Some(members), Some(u)) => members.iter().any(|m| m == u),
        (Some(_), None) => false,
        (None, Some(_)) => true,
        (None, None) => action == "pull",
    };
    wanted
        .iter()
        .filter(|a| ok(a))
        .map(|a| (*a).to_owned())
        .collect()
}

async fn token(
    State(s): State<Arc<Server>>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
) -> Response {
    let user = match authenticate(&s, &headers) {
        Ok(u) => u,
        Err(()) => {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Basic realm=\"token\"")],
                "bad credentials\n",
            )
                .into_response();
        }
    };
    if q.service.as_deref() != Some(s.args.service.as_str()) {
        return (StatusCode::BAD_REQUEST, "unknown service\n").into_response();
    }
    let scope = q.scope.clone().unwrap_or_default();
    let mut access = Vec::new();
    for one in scope.split(' ').filter(|x| !x.is_empty()) {
        // repository:NAME:ACTIONS (NAME may not contain ':' here)
        let mut parts = one.splitn(3, ':');
        let (Some(kind), Some(name), Some(actions)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let wanted: Vec<&str> = actions.split(',').collect();
        let granted = allowed(&s, user.as_deref(), name, &wanted);
        access.push(serde_json::json!({"type": kind, "name": name, "actions": granted}));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let claims = serde_json::json!({
        "iss": s.args.issuer,
        "sub": user.clone().unwrap_or_default(),
        "aud": s.args.service,
        "exp": now + s.args.expires_in,
        "nbf": now.saturating_sub(10),
        "iat": now,
        "jti": format!("{:016x}", rand::random::<u64>()),
        "access": access,
    });
    let head = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [s.x5c]});
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(head.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let rng = ring::rand::SystemRandom::new();
    let Ok(sig) = s.key.sign(&rng, signing_input.as_bytes()) else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "signing failed\n").into_response();
    };
    let jwt = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()));
    let key = format!("{}|{scope}", user.as_deref().unwrap_or("<anonymous>"));
    if let Ok(mut m) = s.issued.lock() {
        *m.entry(key).or_default() += 1;
    }
    axum::Json(serde_json::json!({
        "token": jwt, "access_token": jwt, "expires_in": s.args.expires_in,
    }))
    .into_response()
}

async fn stats(State(s): State<Arc<Server>>) -> Response {
    let m = s.issued.lock().map(|m| m.clone()).unwrap_or_default();
    axum::Json(serde_json::json!({ "issued": m })).into_response()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let key_der = PrivateKeyDer::from_pem_file(&args.signing_key).context("signing key")?;
    let rng = ring::rand::SystemRandom::new();
    let key =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, key_der.secret_der(), &rng)
            .map_err(|e| anyhow::anyhow!("signing key is not a P-256 PKCS#8 key: {e}"))?;
    let cert = CertificateDer::from_pem_file(&args.signing_cert).context("signing cert")?;
    let x5c = STANDARD.encode(cert.as_ref());
    let users = args
        .user
        .iter()
        .filter_map(|u| u.split_once(':'))
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .collect();
    let private = args
        .private
        .iter()
        .filter_map(|p| p.split_once('='))
        .map(|(r, us)| (r.to_owned(), us.split(',').map(str::to_owned).collect()))
        .collect();
    let tls_chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&args.tls_cert)
        .context("tls cert")?
        .collect::<Result<_, _>>()
        .context("tls cert")?;
    let tls_key = PrivateKeyDer::from_pem_file(&args.tls_key).context("tls key")?;
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(tls_chain, tls_key)?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    let server = Arc::new(Server {
        args,
        key,
        x5c,
        users,
        private,
        issued: Mutex::new(BTreeMap::new()),
    });
    let app = Router::new()
        .route("/token", get(token))
        .route("/_stats", get(stats))
        .with_state(server);
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (tcp, _) = listener.accept().await?;
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let app = app.clone();
                    async move {
                        Ok::<_, Infallible>(
                            app.oneshot(req.map(axum::body::Body::new))
                                .await
                                .unwrap_or_else(|e| match e {}),
                        )
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
