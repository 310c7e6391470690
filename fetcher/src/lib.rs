//! Damselfly's peer engine and its command-line front ends.
//!
//! A [`peer::Peer`] owns a [`piece_store::Store`], an [`upload`] server and host-wide rate limits;
//! [`peer::Peer::download`] runs one download through the supernodes (rendezvous order, failover)
//! or, when none is reachable, from the origin. `dfget` embeds a peer or asks the host's agent
//! (`dfdaemon`, [`agent`]) over its Unix socket.

pub mod agent;
pub mod cli;
pub mod download;
pub mod error;
pub mod layer_index;
pub mod location;
pub mod metrics;
pub mod output;
pub mod peer;
pub mod piece;
pub mod piece_store;
pub mod private;
pub mod proxy;
pub mod range_read;
pub mod rate;
pub mod rendezvous;
pub mod shutdown;
pub mod source;
pub mod start_set;
pub mod subscription;
pub mod task_id;
pub mod tasks_api;
pub mod ticket;
pub mod tls;
pub mod uds;
pub mod upload;

pub use download::{BackSource, DownloadRequest, Progress, Summary};
pub use error::{Error, Result};
pub use peer::{Peer, PeerConfig};
pub use shutdown::Shutdown;
