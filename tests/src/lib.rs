pub mod cluster;
pub mod containerd;
pub mod docker;
pub mod harness;
pub mod host;
pub mod origin;
pub mod pki;
pub mod registry;
