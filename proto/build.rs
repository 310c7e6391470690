//! Generates the tonic/prost code from `proto/*.proto` with `protox`, so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/scheduler.proto",
        "proto/agent.proto",
        "proto/fusemanager.proto",
        "proto/cri/images.proto",
        "proto/cri/runtime.proto",
        "proto/containerd/snapshots.proto",
        "proto/containerd/mount.proto",
        "proto/containerd/descriptor.proto",
        "proto/containerd/content.proto",
        "proto/containerd/images.proto",
        "proto/containerd/leases.proto",
        "proto/containerd/diff.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    // Messages carrying secrets get a Debug that hides them (proto/src/lib.rs).
    tonic_prost_build::configure()
        // Small per-call buffers (proto/src/codec.rs).
        .codec_path("crate::codec::SmallCodec")
        .skip_debug([
            ".damselfly.fusemanager.v1.BasicAuth",
            ".runtime.v1.AuthConfig",
        ])
        .compile_fds(fds)?;
    Ok(())
}
