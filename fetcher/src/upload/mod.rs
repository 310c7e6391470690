//! The piece upload server: `GET /pieces/{version_id}/{piece}` serves a verified piece to other peers
//! that show a ticket for that version (`Authorization: Bearer <ticket>`, see [`crate::ticket`]:
//! none → 401, a bad one → 403, both without a byte of content), throttled by the process-wide
//! upload bucket and capped in concurrency, in all and per peer address ([`slots`]; busy → 503,
//! so the downloader reports it and the scheduler picks another parent).

mod body;
pub mod slots;

pub use body::PieceBody;

use std::net::SocketAddr;
use std::sync::Arc;

use crate::error::Result;
use crate::metrics::PeerMetrics;
use crate::rate::RateLimiter;
use crate::shutdown::Shutdown;
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// Where the upload server reads pieces from. The peer's open tasks implement it; tests wrap it
/// to misbehave.
pub trait PieceSource: Send + Sync + 'static {
    /// Piece `num` of `version_id` to send (blocking: may touch the disk), or `None` when not
    /// held. Its bytes are verified as they are read.
    fn open_piece(&self, version_id: &str, num: u32) -> Result<Option<PieceBody>>;
    /// The keys whose tickets open `version_id`: those of the supernodes that scheduled this
    /// holder for it (empty: nobody gets it).
    fn ticket_keys(&self, version_id: &str) -> Vec<crate::ticket::PublicKey>;
}

/// How the upload server behaves.
#[derive(Clone)]
pub struct UploadConfig {
    pub limiter: RateLimiter,
    pub max_concurrent: usize,
    pub upload_bytes: prometheus::IntCounter,
    /// Piece requests refused for a missing or bad ticket.
    pub refused: prometheus::IntCounter,
}

struct AppState {
    source: Arc<dyn PieceSource>,
    limiter: RateLimiter,
    slots: slots::Slots,
    upload_bytes: prometheus::IntCounter,
    refused: prometheus::IntCounter,
}

/// The upload routes, for embedding into another router (the supernode's HTTP server).
pub fn router(source: Arc<dyn PieceSource>, cfg: UploadConfig) -> Router {
    let state = Arc::new(AppState {
        source,
        limiter: cfg.limiter,
        slots: slots::Slots::new(
            cfg.max_concurrent,
            slots::per_peer_share(cfg.max_concurrent),
        ),
        upload_bytes: cfg.upload_bytes,
        refused: cfg.refused,
    });
    Router::new()
        .route("/pieces/{version}/{num}", get(serve_piece))
        .with_state(state)
}

/// Binds `addr` and serves `router` until `shutdown` (over TLS with `tls`); in-flight responses
/// then finish. Returns the bound address and the server task (which ends once the last response
/// is sent). Handlers see the client's address (`ConnectInfo<SocketAddr>`), which piece tickets
/// are bound to.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: Shutdown,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((local, serve_on(listener, router, tls, shutdown)?))
}

/// Like [`serve`], on a bound listener.
pub fn serve_on(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: Shutdown,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use axum::serve::ListenerExt;
    let app = router.into_make_service_with_connect_info::<SocketAddr>();
    let done = async move { shutdown.wait().await };
    let report = |r: std::io::Result<()>| {
        if let Err(e) = r {
            tracing::error!(error = %e, "HTTP server failed");
        }
    };
    Ok(match tls {
        Some(config) => {
            // `tap_io` gives the TLS listener axum's `ConnectInfo<SocketAddr>`.
            let l = crate::tls::TlsListener::new(listener, config)?.tap_io(|_| ());
            tokio::spawn(async move {
                report(axum::serve(l, app).with_graceful_shutdown(done).await);
            })
        }
        None => tokio::spawn(async move {
            report(
                axum::serve(listener, app)
                    .with_graceful_shutdown(done)
                    .await,
            );
        }),
    })
}

/// Metrics snapshot helper for a `PeerMetrics`.
pub fn upload_config(
    limiter: RateLimiter,
    max_concurrent: usize,
    metrics: &PeerMetrics,
) -> UploadConfig {
    UploadConfig {
        limiter,
        max_concurrent,
        upload_bytes: metrics.upload_bytes.clone(),
        refused: metrics.tickets_refused.clone(),
    }
}

/// Checks the request's ticket for `scope` of `version_id` (refusals are logged).
pub fn authorize(
    keys: &[crate::ticket::PublicKey],
    headers: &axum::http::HeaderMap,
    scope: crate::ticket::Scope,
    version_id: &str,
    from: SocketAddr,
) -> std::result::Result<(), crate::ticket::TicketError> {
    use crate::ticket::{self, TicketError};
    let t = ticket::from_header(headers.get(ticket::HEADER));
    match ticket::verify(keys, t, scope, version_id, from.ip()) {
        Ok(_) => Ok(()),
        Err(TicketError::Missing) => Err(TicketError::Missing),
        Err(e) => {
            tracing::warn!(%from, version = %version_id.get(..16).unwrap_or(version_id), error = %e, "ticket refused");
            Err(e)
        }
    }
}

/// The answer to a request whose ticket was refused: 401 without one, 403 otherwise; never a
/// byte of content.
pub fn refusal(e: &crate::ticket::TicketError) -> Response {
    match e {
        crate::ticket::TicketError::Missing => (
            StatusCode::UNAUTHORIZED,
            [(
                axum::http::header::WWW_AUTHENTICATE,
                "Bearer realm=\"damselfly\"",
            )],
            "a ticket from the supernode is required\n",
        )
            .into_response(),
        e => (StatusCode::FORBIDDEN, format!("{e}\n")).into_response(),
    }
}

async fn serve_piece(
    State(st): State<Arc<AppState>>,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    headers: axum::http::HeaderMap,
    Path((version, num)): Path<(String, u32)>,
) -> Response {
    let keys = st.source.ticket_keys(&version);
    if let Err(e) = authorize(
        &keys,
        &headers,
        crate::ticket::Scope::Pieces,
        &version,
        from,
    ) {
        st.refused.inc();
        return refusal(&e);
    }
    let permit = match st.slots.acquire(from.ip()) {
        Ok(p) => p,
        Err(slots::Busy::Server) => {
            return (StatusCode::SERVICE_UNAVAILABLE, "upload slots busy\n").into_response();
        }
        Err(slots::Busy::Peer) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "this peer holds its share of upload slots\n",
            )
                .into_response();
        }
    };
    let src = st.source.clone();
    let v = version.clone();
    let body = match tokio::task::spawn_blocking(move || src.open_piece(&v, num)).await {
        Ok(Ok(Some(b))) => b,
        Ok(Ok(None)) => return (StatusCode::NOT_FOUND, "piece not held").into_response(),
        Ok(Err(e)) => {
            tracing::warn!(version, num, error = %e, "cannot read piece for upload");
            return (StatusCode::INTERNAL_SERVER_ERROR, "cannot read piece").into_response();
        }
        Err(_) => return (StatusCode::INTERNAL_SERVER_ERROR, "read task failed").into_response(),
    };
    let len = body.len();
    let stream = piece_stream(body, permit, st.limiter.clone(), st.upload_bytes.clone());
    Response::builder()
        .header(axum::http::header::CONTENT_LENGTH, len)
        .header(axum::http::header::CONTENT_TYPE, "application/octet-stream")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// The response body of one piece: chunks read from `body` off the async threads, sent through
/// the upload bucket in slices of at most [`SEND_SLICE`]; the upload slot is held until the
/// last byte went out. A read error (a stored piece failing its digest) breaks the response
/// before its end, so the receiver never gets a whole wrong piece.
fn piece_stream(
    body: PieceBody,
    permit: slots::Slot,
    limiter: RateLimiter,
    counter: prometheus::IntCounter,
) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> {
    let state = (Some(body), bytes::Bytes::new(), permit);
    futures::stream::try_unfold(state, move |(mut body, mut rest, permit)| {
        let (limiter, counter) = (limiter.clone(), counter.clone());
        async move {
            if rest.is_empty() {
                let Some(mut b) = body.take() else {
                    return Ok(None);
                };
                let (b, next) = tokio::task::spawn_blocking(move || {
                    let next = b.next_chunk();
                    (b, next)
                })
                .await
                .map_err(std::io::Error::other)?;
                match next.map_err(std::io::Error::other)? {
                    Some(chunk) => (body, rest) = (Some(b), chunk),
                    None => return Ok(None),
                }
            }
            let slice = rest.split_to(SEND_SLICE.min(rest.len()));
            limiter.acquire(slice.len()).await;
            counter.inc_by(slice.len() as u64);
            Ok(Some((slice, (body, rest, permit))))
        }
    })
}

/// Most bytes taken from the upload bucket at once.
const SEND_SLICE: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ticket::{Claims, Issuer, Scope};

    const VID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// One version of one 1 MiB piece, opened by `key`.
    struct OnePiece(crate::ticket::PublicKey);

    impl PieceSource for OnePiece {
        fn open_piece(&self, version_id: &str, num: u32) -> Result<Option<PieceBody>> {
            Ok((version_id == VID && num == 0)
                .then(|| PieceBody::from_bytes(bytes::Bytes::from(vec![7u8; 1 << 20]))))
        }
        fn ticket_keys(&self, _: &str) -> Vec<crate::ticket::PublicKey> {
            vec![self.0.clone()]
        }
    }

    async fn get(base: &str, ticket: &str, from: &str) -> reqwest::Response {
        reqwest::Client::builder()
            .local_address(from.parse::<std::net::IpAddr>().expect("ip"))
            .no_proxy()
            .build()
            .expect("client")
            .get(format!("{base}/pieces/{VID}/0"))
            .bearer_auth(ticket)
            .send()
            .await
            .expect("request")
    }

    #[tokio::test]
    async fn one_peer_cannot_take_every_upload_slot() {
        let issuer = Issuer::generate().expect("key");
        let ticket = |holder: &str| {
            issuer
                .issue(&Claims {
                    scope: Scope::Pieces,
                    version_id: VID.into(),
                    holder: holder.parse().expect("ip"),
                    expires: crate::ticket::now() + 600,
                })
                .expect("ticket")
        };
        let metrics = PeerMetrics::new();
        // Slow uploads (64 KiB/s for the whole server) hold their slots while we count.
        let cfg = upload_config(RateLimiter::new(64 << 10), 4, &metrics);
        let router = router(Arc::new(OnePiece(issuer.public())), cfg);
        let shutdown = Shutdown::new();
        let (addr, _task) = serve(([127, 0, 0, 1], 0).into(), router, None, shutdown.clone())
            .await
            .expect("serve");
        let base = format!("http://{addr}");
        let (a, b) = (ticket("127.0.0.1"), ticket("127.0.0.2"));
        let mut held = Vec::new();
        for _ in 0..2 {
            let r = get(&base, &a, "127.0.0.1").await;
            assert_eq!(r.status(), StatusCode::OK);
            held.push(r);
        }
        let over = get(&base, &a, "127.0.0.1").await;
        assert_eq!(over.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(over.text().await.expect("body").contains("share"));
        // Another peer is still served while the first holds its share.
        let other = get(&base, &b, "127.0.0.2").await;
        assert_eq!(other.status(), StatusCode::OK);
        drop(held);
        drop(other);
        shutdown.trigger();
    }
}
