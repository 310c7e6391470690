//! The gRPC contract between Damselfly's processes.
//!
//! - [`scheduler`]: peer ⇄ supernode (registration, piece metadata, parent assignments, results).
//! - [`agent`]: dfget ⇄ the host agent (dfdaemon) over its local Unix socket.
//! - [`fusemanager`]: dfsnapshotter ⇄ its FUSE manager (the process serving lazy layers).
//! - [`cri`]: what dfsnapshotter's CRI image-service proxy reads of kubelet's calls, and the
//!   runtime calls the tests' kubelet emulation makes to containerd.
//! - [`containerd`]: containerd's snapshotter API, which dfsnapshotter serves as a proxy plugin,
//!   and the content, image and lease APIs `dfsnapshotter pull` calls.
//! - [`codec`]: the codec of every generated client and server (small per-call buffers).

pub mod codec;

/// Scheduler API (`damselfly.scheduler.v1`).
pub mod scheduler {
    tonic::include_proto!("damselfly.scheduler.v1");
}

/// Local agent API (`damselfly.agent.v1`).
pub mod agent {
    tonic::include_proto!("damselfly.agent.v1");
}

/// dfsnapshotter's FUSE manager (`damselfly.fusemanager.v1`).
pub mod fusemanager {
    tonic::include_proto!("damselfly.fusemanager.v1");

    /// Never prints the password.
    impl std::fmt::Debug for BasicAuth {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("BasicAuth")
                .field("user", &self.user)
                .field("password", &"***")
                .finish()
        }
    }
}

/// The subset of Kubernetes' CRI (`runtime.v1`): the image service, as dfsnapshotter's proxy
/// reads it, and the runtime calls of the tests' kubelet emulation.
pub mod cri {
    tonic::include_proto!("runtime.v1");

    /// Never prints the secret.
    impl std::fmt::Debug for AuthConfig {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("AuthConfig")
                .field("username", &self.username)
                .field("server_address", &self.server_address)
                .field("secret", &"***")
                .finish()
        }
    }
}

/// containerd's API that dfsnapshotter serves and calls (module paths follow the proto packages).
pub mod containerd {
    /// `containerd.types` (`Mount`, `Descriptor`).
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    pub mod services {
        pub mod content {
            /// `containerd.services.content.v1`: the content store.
            pub mod v1 {
                tonic::include_proto!("containerd.services.content.v1");
            }
        }
        pub mod images {
            /// `containerd.services.images.v1`: image names.
            pub mod v1 {
                tonic::include_proto!("containerd.services.images.v1");
            }
        }
        pub mod diff {
            /// `containerd.services.diff.v1`: unpacking a layer onto mounts.
            pub mod v1 {
                tonic::include_proto!("containerd.services.diff.v1");
            }
        }
        pub mod leases {
            /// `containerd.services.leases.v1`: leases against garbage collection.
            pub mod v1 {
                tonic::include_proto!("containerd.services.leases.v1");
            }
        }
        pub mod snapshots {
            /// `containerd.services.snapshots.v1`: the `Snapshots` service.
            pub mod v1 {
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
    }
}
