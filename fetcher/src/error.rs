//! The fetcher's error type: every failure a download can meet, with enough context to print one
//! clear line, and the exit code `dfget` uses for it.

use std::path::PathBuf;

/// Result alias for the fetcher crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while fetching, storing or serving content.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The origin answered with a non-success HTTP status.
    #[error("origin returned HTTP {status} for {}", crate::source::redact(.url))]
    OriginStatus { url: String, status: u16 },

    /// The origin policy refuses the URL (or a redirect to it).
    #[error("origin {} refused by the origin policy: {why}", crate::source::redact(.url))]
    Refused { url: String, why: String },

    /// The origin could not be reached (DNS, connection refused, TLS, timeout).
    #[error("origin unreachable for {}: {}", crate::source::redact(.url), crate::source::redact_urls(.detail))]
    OriginUnreachable { url: String, detail: String },

    /// The origin's body ended early or broke.
    #[error("origin sent a broken body for {}: {detail}", crate::source::redact(.url))]
    OriginBody { url: String, detail: String },

    /// The supernode reported a failure of the task.
    #[error("supernode {supernode} failed the task: {message}")]
    Supernode { supernode: String, message: String },

    /// No supernode could be reached and back-to-source is disabled.
    #[error(
        "no supernode reachable ({tried}) and back-to-source is disabled (--back-source never)"
    )]
    NoSupernode { tried: String },

    /// The whole content does not match the expected digest.
    #[error("content digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: String, actual: String },

    /// Not enough free disk space for the download.
    #[error(
        "not enough disk space at {path}: need {needed} bytes, {available} available (nothing was downloaded)"
    )]
    NoSpace {
        path: PathBuf,
        needed: u64,
        available: u64,
    },

    /// A local I/O operation failed.
    #[error("{context} {path}: {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Invalid user input (URL, header, digest, rate, config).
    #[error("invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },

    /// The download took longer than `--timeout`.
    #[error("download timed out after {0:?}")]
    Timeout(std::time::Duration),

    /// A piece's bytes do not fit it (a parent, the origin or a caller gave too many or too few).
    #[error("piece {piece}: {got} bytes for a {size}-byte piece")]
    PieceSize { piece: u32, got: u64, size: u32 },

    /// Another writer is already storing this piece of the task.
    #[error("piece {piece} is already being written")]
    PieceBusy { piece: u32 },

    /// The task's data was discarded while this piece was being written into it.
    #[error("piece {piece}: the task's data was discarded while it was written")]
    PieceStale { piece: u32 },

    /// A stored piece no longer matches its digest (a bad disk, or someone changed the file).
    #[error("stored piece {piece} in {} fails its digest", .path.display())]
    CorruptPiece { piece: u32, path: PathBuf },

    /// Pieces could not be obtained from any parent.
    #[error("download failed: {0}")]
    Download(String),

    /// A failure reported by the host agent, with the exit code it chose.
    #[error("{message}")]
    Remote { message: String, code: i32 },

    /// The local agent failed or could not be reached.
    #[error("agent at {socket}: {detail}")]
    Agent { socket: PathBuf, detail: String },

    /// A registry document (image index, manifest) that is malformed, names no manifest for the
    /// platform, or is not the one its digest names.
    #[error("{0}")]
    ImageDocument(String),
}

impl Error {
    /// Builds an [`Error::Io`] from an I/O error, what was being done, and the path.
    pub fn io(context: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            context,
            path: path.into(),
            source,
        }
    }

    /// Builds an [`Error::Invalid`].
    pub fn invalid(what: &'static str, detail: impl std::fmt::Display) -> Self {
        Error::Invalid {
            what,
            detail: detail.to_string(),
        }
    }

    /// The process exit code `dfget` uses for this error (documented in `dfget --help`).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Invalid { .. } => 2,
            Error::NoSupernode { .. } => 3,
            Error::OriginStatus { .. }
            | Error::OriginUnreachable { .. }
            | Error::OriginBody { .. }
            | Error::Refused { .. }
            | Error::ImageDocument(_) => 4,
            Error::Supernode { .. } => 4,
            Error::NoSpace { .. } => 5,
            Error::DigestMismatch { .. } => 6,
            Error::Timeout(_) => 7,
            Error::Remote { code, .. } => *code,
            Error::Io { .. }
            | Error::Download(_)
            | Error::Agent { .. }
            | Error::PieceSize { .. }
            | Error::PieceBusy { .. }
            | Error::PieceStale { .. }
            | Error::CorruptPiece { .. } => 1,
        }
    }
}
