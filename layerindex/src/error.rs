//! Errors of index building and of reads through an index.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The layer's bytes are not what their format says (truncated or corrupt gzip or tar).
    #[error("corrupt layer data near compressed byte {offset}: {detail}")]
    Corrupt { offset: u64, detail: String },
    /// A request that cannot be served as asked (a range outside the layer, a bad index).
    #[error("{0}")]
    Invalid(String),
    #[error("reading the layer: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
