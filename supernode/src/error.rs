//! The supernode's error type.

use std::path::PathBuf;

/// Result alias for the supernode crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Failures of the supernode process itself (task failures travel to peers as `TaskError`s).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Invalid configuration: names the key and what is wrong.
    #[error("invalid config {key}: {detail}")]
    Config { key: &'static str, detail: String },

    /// Could not bind a listening address.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },

    /// Reading the config file failed.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Another supernode sent task metadata that does not hold together (see `replica`).
    #[error("replica of task {task_id}: {detail}")]
    Replica { task_id: String, detail: String },

    /// The piece store or a source failed.
    #[error(transparent)]
    Fetcher(#[from] fetcher::Error),

    /// The gRPC server failed.
    #[error("scheduler server: {0}")]
    Grpc(#[from] tonic::transport::Error),
}
