//! dfsnapshotter: a containerd snapshotter served as a `proxy_plugins` entry.
//!
//! - [`snapshots`]: the snapshot tree (active, view, committed; parent chains; labels) over
//!   directories and overlayfs mounts, as containerd's own overlayfs snapshotter lays them out.
//! - [`metastore`]: its metadata, embedded and persistent across restarts.
//! - [`service`]: containerd's `Snapshots` gRPC API on a Unix socket.
//! - [`layerfs`]: a layer as a read-only FUSE filesystem over its index (lazy reads).
//! - [`cli`]: the `dfsnapshotter` command.
//!
//! Layers are unpacked by containerd into overlayfs snapshots, so every image runs. Lazy remote
//! layers (FUSE, read piece by piece from peers) come next: see `DESIGN.md`, flow 3.

pub mod cli;
pub mod error;
pub mod layerfs;
pub mod metastore;
pub mod metrics;
pub mod pull;
pub mod registry;
pub mod remote;
pub mod service;
pub mod snapshots;

pub use error::{Error, Result};
