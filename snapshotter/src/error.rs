//! The snapshotter's errors. Each maps to the gRPC code containerd turns into its own error kinds
//! (`NotFound`, `AlreadyExists` — which also tells containerd a remote snapshot already exists —,
//! `FailedPrecondition`, `InvalidArgument`), never a vague catch-all.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("snapshot {0:?} not found")]
    NotFound(String),
    #[error("snapshot {0:?} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("metadata store {}: {detail}", path.display())]
    Metadata { path: PathBuf, detail: String },
    /// A registry refused or could not be reached (manifests, configs, tokens).
    #[error("registry: {0}")]
    Registry(String),
    /// Registry credentials missing, malformed, refused, or a credential helper failed.
    #[error("credentials: {0}")]
    Credentials(String),
    /// The local agent (dfdaemon) refused or could not be reached.
    #[error("agent: {0}")]
    Agent(String),
    /// containerd (for `dfsnapshotter pull`) refused or could not be reached.
    #[error("containerd: {0}")]
    Containerd(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            what,
            path: path.into(),
            source,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::NotFound(_) => tonic::Status::not_found(msg),
            Error::AlreadyExists(_) => tonic::Status::already_exists(msg),
            Error::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            Error::Invalid(_) => tonic::Status::invalid_argument(msg),
            Error::Io { .. } | Error::Metadata { .. } => tonic::Status::internal(msg),
            Error::Credentials(_) => tonic::Status::permission_denied(msg),
            Error::Registry(_) | Error::Agent(_) | Error::Containerd(_) => {
                tonic::Status::unavailable(msg)
            }
        }
    }
}
