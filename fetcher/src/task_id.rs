//! Task identity: the canonical key of a piece of content, and the id of one version of it.
//!
//! The *task id* is a sha256 over the URL with volatile query parameters removed plus the user's tag,
//! so `?Expires=..&Signature=..` variants of one object are one task. The *version id* adds what the
//! origin says about the bytes (length, ETag, Last-Modified): a changed origin is a new version, and
//! pieces of two versions never mix. Both are computed the same way by peers and supernodes.

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Default piece size: 1 MiB. Smaller pieces are forwarded sooner (a peer serves a piece once it
/// holds all of it): against 4 MiB, 16 hosts on shaped links finished in 1.85 instead of 2.42 ×
/// the bound (`tests/bench/cluster.sh`), 8 loopback peers in 1.66 instead of 2.01 (`p2p.sh`).
pub const DEFAULT_PIECE_SIZE: u32 = 1024 * 1024;
/// Pieces per task above which the piece size grows (keeps metadata small for huge files).
pub const MAX_PIECES: u64 = 4096;

/// Removes the query parameters named in `filter` from `url` (order of the rest is kept).
pub fn filter_url(url: &str, filter: &[String]) -> Result<String> {
    let mut parsed = url::Url::parse(url)
        .map_err(|e| Error::invalid("URL", format!("{}: {e}", crate::source::redact(url))))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(Error::invalid(
            "URL",
            format!("{url}: only http and https are supported"),
        ));
    }
    if filter.is_empty() || parsed.query().is_none() {
        return Ok(parsed.to_string());
    }
    let kept: Vec<(String, String)> = parsed
        .query_pairs()
        .filter(|(k, _)| !filter.iter().any(|f| f == k))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if kept.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(kept);
    }
    Ok(parsed.to_string())
}

/// Splits a `--filter` value such as `Expires&Signature&ns` into parameter names.
pub fn parse_filter(spec: &str) -> Vec<String> {
    spec.split('&')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The task id (lowercase hex sha256) of `url` under `filter` and `tag`.
pub fn task_id(url: &str, tag: &str, filter: &[String]) -> Result<String> {
    let canonical = filter_url(url, filter)?;
    let mut h = Sha256::new();
    h.update(b"url\0");
    h.update(canonical.as_bytes());
    h.update(b"\0tag\0");
    h.update(tag.as_bytes());
    Ok(hex::encode(h.finalize()))
}

/// The task id of content known by its digest (`sha256:<hex>`), whatever URL serves it.
pub fn content_task_id(content_key: &str) -> Result<String> {
    let hex_digest = parse_digest(content_key)?;
    let mut h = Sha256::new();
    h.update(b"content\0sha256:");
    h.update(hex_digest.as_bytes());
    Ok(hex::encode(h.finalize()))
}

/// The task id of a request: by content key when given, else by URL, tag and filter.
pub fn task_id_of(
    url: &str,
    tag: &str,
    filter: &[String],
    content_key: Option<&str>,
) -> Result<String> {
    match content_key {
        Some(k) => {
            filter_url(url, filter)?;
            content_task_id(k)
        }
        None => task_id(url, tag, filter),
    }
}

/// The version id of a task: the task id plus the origin's description of the bytes.
pub fn version_id(task_id: &str, content_length: i64, etag: &str, last_modified: &str) -> String {
    let mut h = Sha256::new();
    for part in [task_id, &content_length.to_string(), etag, last_modified] {
        h.update(part.as_bytes());
        h.update(b"\0");
    }
    hex::encode(h.finalize())
}

/// Pieces a task should have at least (see [`piece_size_for`]).
pub const MIN_PIECES: u64 = 128;
/// The smallest piece [`piece_size_for`] shrinks to for small content.
pub const SMALL_PIECE: u32 = 256 * 1024;

/// Piece size for content of `content_length` bytes (`-1`: unknown): `base`, halved (down to
/// [`SMALL_PIECE`], never below `base`'s own floor) while the task would have fewer than
/// [`MIN_PIECES`] pieces, doubled while it would have more than [`MAX_PIECES`]. A piece crosses
/// each hop of the swarm whole before it is passed on, sharing links with a window of others, so
/// the time one hop costs, relative to the whole download, goes with the window over the number
/// of pieces: small content needs small pieces (16 hosts, 32 MiB, 25 Mbit links: 1.74 x the bound
/// with 1 MiB pieces, 1.36-1.42 with 256 KiB). Deterministic, so every supernode cuts a version
/// identically.
pub fn piece_size_for(content_length: i64, base: u32) -> u32 {
    let base = u64::from(base.max(64 * 1024));
    let mut size = base;
    if content_length > 0 {
        let len = content_length as u64;
        let floor = u64::from(SMALL_PIECE).min(base);
        while len.div_ceil(size) < MIN_PIECES && size / 2 >= floor {
            size /= 2;
        }
        while len.div_ceil(size) > MAX_PIECES && size < (1 << 30) {
            size *= 2;
        }
    }
    size as u32
}

/// Parses `sha256:<64 hex>` (the prefix is optional) into lowercase hex.
pub fn parse_digest(digest: &str) -> Result<String> {
    let hex_part = digest
        .strip_prefix("sha256:")
        .unwrap_or(digest)
        .to_ascii_lowercase();
    if hex_part.len() != 64 || !hex_part.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::invalid(
            "digest",
            format!("{digest:?} is not sha256:<64 hex digits>"),
        ));
    }
    Ok(hex_part)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_removes_volatile_params_only() {
        let f = parse_filter("Expires&Signature");
        let a = filter_url("http://h/o?Expires=1&x=2&Signature=abc", &f).expect("valid");
        assert_eq!(a, "http://h/o?x=2");
        let b = filter_url("http://h/o?Expires=1&Signature=abc", &f).expect("valid");
        assert_eq!(b, "http://h/o");
    }

    #[test]
    fn task_id_ignores_filtered_params_but_not_tag() {
        let f = parse_filter("Expires");
        let a = task_id("http://h/o?Expires=1", "", &f).expect("valid");
        let b = task_id("http://h/o?Expires=2", "", &f).expect("valid");
        let c = task_id("http://h/o?Expires=2", "t", &f).expect("valid");
        assert_eq!(a, b);
        assert_ne!(b, c);
        assert!(task_id("ftp://h/o", "", &f).is_err());
    }

    #[test]
    fn content_keyed_tasks_ignore_the_url() {
        let key = format!("sha256:{}", "ab".repeat(32));
        let a = task_id_of("http://r1/v2/a/blobs/x", "", &[], Some(&key)).expect("valid");
        let b = task_id_of("https://r2/v2/b/blobs/x", "t", &[], Some(&key)).expect("valid");
        assert_eq!(a, b);
        assert_ne!(
            a,
            task_id("http://r1/v2/a/blobs/x", "", &[]).expect("valid")
        );
        assert!(task_id_of("http://r1/x", "", &[], Some("md5:00")).is_err());
    }

    #[test]
    fn piece_size_shrinks_for_small_content_and_grows_for_huge_content() {
        assert_eq!(
            piece_size_for(200 << 20, DEFAULT_PIECE_SIZE),
            DEFAULT_PIECE_SIZE
        );
        assert_eq!(piece_size_for(32 << 20, DEFAULT_PIECE_SIZE), SMALL_PIECE);
        assert_eq!(piece_size_for(64 << 20, DEFAULT_PIECE_SIZE), 512 * 1024);
        assert_eq!(piece_size_for(100 << 10, DEFAULT_PIECE_SIZE), SMALL_PIECE);
        // A base below the small-piece size is kept as it is.
        assert_eq!(piece_size_for(1 << 20, 64 * 1024), 64 * 1024);
        assert_eq!(piece_size_for(-1, DEFAULT_PIECE_SIZE), DEFAULT_PIECE_SIZE);
        let huge = 64i64 << 30;
        let s = piece_size_for(huge, DEFAULT_PIECE_SIZE);
        assert!((huge as u64).div_ceil(u64::from(s)) <= MAX_PIECES);
    }

    #[test]
    fn digest_parsing_is_strict() {
        let hex = "ab".repeat(32);
        assert_eq!(parse_digest(&format!("sha256:{hex}")).expect("valid"), hex);
        assert!(parse_digest("sha256:xyz").is_err());
        assert!(parse_digest("").is_err());
    }
}
