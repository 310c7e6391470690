//! A test origin: serves files from a directory over HTTP with Range, ETag and Last-Modified, counts
//! the body bytes it sends, caps its upload rate, and offers failure modes for tests:
//!
//! - `GET /files/<name>`: the file.
//! - `GET /auth/<name>`: the file, only with `Authorization: Bearer <token>` (else 401).
//! - `GET /status/<code>/<anything>`: answers `<code>`.
//! - `GET /short/<name>`: announces the file's length, sends half, closes.
//! - `GET /redirect/<name>`: 302 to `/files/<name>`.
//! - `GET|HEAD /v2/<repo>/blobs/sha256:<hex>`: the file `blob-<hex>` (registry-like; may lie);
//!   with `--bearer`, only for that token (else 401 with a Bearer challenge); when a file
//!   `redirect-blob-<hex>` exists, a 307 to `/files/blob-<hex>?X-Amz-Signature=<random>` instead,
//!   as a registry whose storage is an object store;
//!   `/v2/<repo>/manifests/<ref>`: the file `manifest-<ref>` as an OCI manifest, whatever its bytes.
//! - `GET /_stats`: `{"bytes": N, "requests": N}` of file bodies served; `POST /_reset` zeroes them.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use fetcher::rate::RateLimiter;
use std::os::unix::fs::MetadataExt;

/// Origin state.
pub struct Origin {
    pub dir: PathBuf,
    pub bearer: Option<String>,
    pub limiter: RateLimiter,
    pub bytes: AtomicU64,
    pub requests: AtomicU64,
}

/// The origin's routes.
pub fn router(origin: Arc<Origin>) -> Router {
    Router::new()
        .route("/files/{name}", get(files))
        .route("/auth/{name}", get(auth))
        .route("/status/{code}/{rest}", get(status))
        .route("/short/{name}", get(short))
        .route("/redirect/{name}", get(redirect))
        .route("/v2/{*path}", get(registry_api))
        .route("/endless", get(endless))
        .route("/_stats", get(stats))
        .route("/_reset", post(reset))
        .with_state(origin)
}

async fn stats(State(o): State<Arc<Origin>>) -> impl IntoResponse {
    let body = format!(
        "{{\"bytes\": {}, \"requests\": {}}}",
        o.bytes.load(Ordering::Relaxed),
        o.requests.load(Ordering::Relaxed)
    );
    ([(header::CONTENT_TYPE, "application/json")], body)
}

async fn reset(State(o): State<Arc<Origin>>) -> StatusCode {
    o.bytes.store(0, Ordering::Relaxed);
    o.requests.store(0, Ordering::Relaxed);
    StatusCode::NO_CONTENT
}

async fn status(Path((code, _)): Path<(u16, String)>) -> Response {
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, format!("test origin says {code}\n")).into_response()
}

async fn redirect(Path(name): Path<String>) -> Response {
    (
        StatusCode::FOUND,
        [(header::LOCATION, format!("/files/{name}"))],
    )
        .into_response()
}

async fn auth(
    State(o): State<Arc<Origin>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let want = o.bearer.as_deref().map(|t| format!("Bearer {t}"));
    let got = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if want.is_none() || got != want.as_deref() {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer realm=\"test\"")],
            "unauthorized\n",
        )
            .into_response();
    }
    serve(o, &name, &headers, false).await
}

async fn files(
    State(o): State<Arc<Origin>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    serve(o, &name, &headers, false).await
}

/// Registry-like paths: blobs serve the file `blob-<hex>`, manifests the file `manifest-<ref>`,
/// whatever their bytes (tests make them lie or be malformed).
async fn registry_api(
    State(o): State<Arc<Origin>>,
    Path(path): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some((_, reference)) = path.rsplit_once("/manifests/") {
        let mut r = serve(o, &format!("manifest-{reference}"), &headers, false).await;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json"),
        );
        return r;
    }
    let Some(hex) = path
        .rsplit_once("/blobs/sha256:")
        .map(|(_, h)| h.to_owned())
    else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if let Some(token) = &o.bearer {
        let got = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if got != Some(format!("Bearer {token}").as_str()) {
            return (
                StatusCode::UNAUTHORIZED,
                [(
                    header::WWW_AUTHENTICATE,
                    "Bearer realm=\"http://127.0.0.1:1/token\"",
                )],
            )
                .into_response();
        }
    }
    if hex.bytes().all(|b| b.is_ascii_hexdigit())
        && o.dir.join(format!("redirect-blob-{hex}")).exists()
    {
        let signature = format!("{:016x}", rand::random::<u64>());
        return (
            StatusCode::TEMPORARY_REDIRECT,
            [(
                header::LOCATION,
                format!("/files/blob-{hex}?X-Amz-Signature={signature}&X-Amz-Expires=60"),
            )],
        )
            .into_response();
    }
    serve(o, &format!("blob-{hex}"), &headers, false).await
}

async fn short(
    State(o): State<Arc<Origin>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    serve(o, &name, &headers, true).await
}

/// `GET /endless`: a body without a length that never ends (64 KiB chunks, counted in `bytes`).
async fn endless(State(o): State<Arc<Origin>>) -> Response {
    o.requests.fetch_add(1, Ordering::Relaxed);
    let stream = futures::stream::unfold((o, 0u64), |(o, n)| async move {
        let chunk: Vec<u8> = (0..64 * 1024u64)
            .map(|i| (n.wrapping_mul(31).wrapping_add(i) % 251) as u8)
            .collect();
        o.limiter.acquire(chunk.len()).await;
        o.bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        Some((Ok::<_, std::io::Error>(Bytes::from(chunk)), (o, n + 1)))
    });
    Response::builder()
        .status(StatusCode::OK)
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn parse_range(h: &HeaderMap, len: u64) -> Option<(u64, u64)> {
    let v = h
        .get(header::RANGE)?
        .to_str()
        .ok()?
        .strip_prefix("bytes=")?;
    let (a, b) = v.split_once('-')?;
    let start: u64 = a.parse().ok()?;
    let end: u64 = if b.is_empty() {
        len.checked_sub(1)?
    } else {
        b.parse::<u64>().ok()?.min(len.checked_sub(1)?)
    };
    (start <= end).then_some((start, end))
}

async fn serve(o: Arc<Origin>, name: &str, headers: &HeaderMap, truncate: bool) -> Response {
    if name.contains('/') || name.starts_with('.') {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let path = o.dir.join(name);
    let Ok(meta) = std::fs::metadata(&path) else {
        return (StatusCode::NOT_FOUND, "no such file\n").into_response();
    };
    let len = meta.len();
    let etag = format!(
        "\"{:x}-{:x}\"",
        meta.mtime_nsec() + meta.mtime() * 1_000_000_000,
        len
    );
    let modified = httpdate(meta.mtime());
    let (status, start, end) = match parse_range(headers, len) {
        Some((s, e)) => (StatusCode::PARTIAL_CONTENT, s, e + 1),
        None => (StatusCode::OK, 0, len),
    };
    let announced = end - start;
    let send = if truncate { announced / 2 } else { announced };
    o.requests.fetch_add(1, Ordering::Relaxed);
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    let origin = o.clone();
    let stream = futures::stream::unfold((file, start, start + send), move |(file, pos, stop)| {
        let origin = origin.clone();
        async move {
            if pos >= stop {
                return None;
            }
            let n = (stop - pos).min(64 * 1024) as usize;
            let mut buf = vec![0u8; n];
            use std::os::unix::fs::FileExt;
            if file.read_exact_at(&mut buf, pos).is_err() {
                return Some((
                    Err(std::io::Error::other("read failed")),
                    (file, stop, stop),
                ));
            }
            origin.limiter.acquire(n).await;
            origin.bytes.fetch_add(n as u64, Ordering::Relaxed);
            Some((
                Ok::<_, std::io::Error>(Bytes::from(buf)),
                (file, pos + n as u64, stop),
            ))
        }
    });
    let mut b = Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, announced)
        .header(header::ETAG, etag)
        .header(header::LAST_MODIFIED, modified)
        .header(header::ACCEPT_RANGES, "bytes");
    if status == StatusCode::PARTIAL_CONTENT {
        b = b.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{len}", end - 1),
        );
    }
    b.body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// RFC 7231 date for a Unix time.
fn httpdate(secs: i64) -> String {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let wd = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    let mon = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(m - 1) as usize];
    format!(
        "{wd}, {d:02} {mon} {y} {:02}:{:02}:{:02} GMT",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn http_dates() {
        assert_eq!(super::httpdate(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(
            super::httpdate(1_700_000_000),
            "Tue, 14 Nov 2023 22:13:20 GMT"
        );
    }
}
