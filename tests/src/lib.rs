pub mod activation;
pub mod cluster;
pub mod containerd;
#[cfg(test)]
mod dashboard;
pub mod docker;
pub mod harbor;
pub mod harness;
pub mod host;
pub mod kubelet;
pub mod loadgen;
#[cfg(test)]
mod manifests;
pub mod origin;
pub mod pki;
pub mod registry;
