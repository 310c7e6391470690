//! The gRPC contract between Damselfly's processes.
//!
//! - [`scheduler`]: peer ⇄ supernode (registration, piece metadata, parent assignments, results).
//! - [`agent`]: dfget ⇄ the host agent (dfdaemon) over its local Unix socket.

/// Scheduler API (`damselfly.scheduler.v1`).
pub mod scheduler {
    tonic::include_proto!("damselfly.scheduler.v1");
}

/// Local agent API (`damselfly.agent.v1`).
pub mod agent {
    tonic::include_proto!("damselfly.agent.v1");
}
