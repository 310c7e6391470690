//! dfsnapshotter: a containerd snapshotter served as a `proxy_plugins` entry.
//!
//! - [`snapshots`]: the snapshot tree (active, view, committed; parent chains; labels) over
//!   directories and overlayfs mounts, as containerd's own overlayfs snapshotter lays them out.
//! - [`metastore`]: its metadata, embedded and persistent across restarts.
//! - [`service`]: containerd's `Snapshots` gRPC API on a Unix socket.
//! - [`layerfs`]: a layer as a read-only FUSE filesystem over its index (lazy reads).
//! - [`remote`]: layers containerd's labels name (CRI, `dfsnapshotter pull`) mounted lazily:
//!   index from the supernode through the agent, bytes through the agent.
//! - [`fusemanager`]: the process that mounts and serves lazy layers, apart from this one, so that
//!   dfsnapshotter's restarts leave running containers' layers served.
//! - [`credentials`]: registry credentials per image scope, as handed to the FUSE manager
//!   (user/password or a docker credential helper), and docker's `config.json`.
//! - [`cri`]: the CRI image-service proxy for kubelet, which hands pull secrets to lazy layers.
//! - [`registry`]: image references, blob URLs and the `Authorization` registries accept.
//! - [`start`]: what a layer's first start read, recorded and prefetched at later mounts.
//! - [`pull`]: `dfsnapshotter pull`, which makes containerd prepare an image's layers that way.
//! - [`cli`]: the `dfsnapshotter` command; [`config`]: its TOML file, under its flags.
//!
//! Layers without the labels are unpacked by containerd into overlayfs snapshots, so every image
//! runs. See `DESIGN.md`, flow 3.

pub mod cli;
pub mod config;
pub mod credentials;
pub mod cri;
pub mod error;
pub mod fusemanager;
pub mod layerfs;
pub mod metastore;
pub mod metrics;
pub mod pull;
pub mod registry;
pub mod remote;
pub mod service;
pub mod snapshots;
pub mod start;

pub use error::{Error, Result};
