//! FUSE passthrough: once a file's chunks are local, a new open of it is handed to the kernel, its
//! reads never reach the snapshotter and return exactly the layer's bytes, also through overlayfs;
//! an inode never gets both kinds of open at once (the kernel would fail the open with EIO).
//! Needs root, /dev/fuse and Linux ≥ 6.9: skipped with the reason otherwise (a failure under
//! `CI=true`).

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use layerindex::LayerIndex;
use snapshotter::layerfs::{FileBlob, LayerFs, cache::ChunkCache, mount};

mod common;
use common::skip_reason;

/// Why this kernel cannot pass files through (FUSE passthrough came with Linux 6.9).
fn kernel_reason() -> Option<String> {
    let release = rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    if (major, minor) >= (6, 9) {
        return None;
    }
    let why = format!("Linux {release} has no FUSE passthrough (6.9 or later needed)");
    assert!(
        std::env::var_os("CI").is_none_or(|v| v != "true"),
        "CI=true, but {why}"
    );
    Some(why)
}

fn gzip_layer(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        b.append_data(&mut h, name, *data).expect("append");
    }
    let tar = b.into_inner().expect("tar");
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(&tar).expect("gzip");
    e.finish().expect("gzip")
}

fn poll<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn local_files_are_passed_through_to_the_kernel() {
    if let Some(why) = skip_reason().or_else(kernel_reason) {
        eprintln!("SKIP local_files_are_passed_through_to_the_kernel: {why}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut big = vec![0u8; 5 << 20];
    for (i, b) in big.iter_mut().enumerate() {
        *b = (i.wrapping_mul(2_654_435_761) >> 13) as u8;
    }
    let blob = gzip_layer(&[("small", b"small\n"), ("big.bin", &big)]);
    let blob_path = dir.path().join("layer.tar.gz");
    std::fs::write(&blob_path, &blob).expect("write blob");
    let index = LayerIndex::build_gzip(blob.as_slice(), 1 << 20).expect("index");
    let metrics = snapshotter::metrics::Metrics::new();
    let fs = LayerFs::new(
        "sha256:passthrough",
        Arc::new(index),
        Arc::new(FileBlob(std::fs::File::open(&blob_path).expect("open"))),
        metrics.clone(),
    )
    .with_passthrough(true)
    .with_cache(
        Arc::new(ChunkCache::new(1 << 20)),
        Some(&dir.path().join("chunks")),
    )
    .expect("cache");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    let session = mount(fs, &mnt).expect("mount");
    let big_path = mnt.join("big.bin");
    let fuse_bytes = || metrics.fuse_read_bytes.get();
    let passed = || metrics.passthrough_opens.get();

    // Not local yet: read through FUSE, which makes it local. While that handle is open, a second
    // open stays a cached one (mixing the two would be EIO).
    let mut first = std::fs::File::open(&big_path).expect("open");
    let mut got = Vec::new();
    first.read_to_end(&mut got).expect("read through FUSE");
    assert!(got == big, "big.bin differs through FUSE");
    assert!(fuse_bytes() >= big.len() as u64);
    let second = std::fs::read(&big_path).expect("a second open while the first is cached");
    assert!(second == big);
    assert_eq!(passed(), 0, "no passthrough while a cached handle is open");
    drop(first);

    // Once the cached handles are released (the kernel says so asynchronously), a new open is
    // passed through and its reads never reach FUSE.
    let got = poll("a passthrough open", || {
        let before = passed();
        let f = std::fs::File::open(&big_path).expect("open");
        (passed() > before).then_some(f)
    });
    let before = fuse_bytes();
    let mut via_kernel = Vec::new();
    (&got)
        .read_to_end(&mut via_kernel)
        .expect("read passed through");
    assert!(via_kernel == big, "big.bin differs through passthrough");
    // A second handle shares the backing; a small file stays on FUSE.
    let again = std::fs::read(&big_path).expect("a second passthrough open");
    assert!(again == big);
    assert_eq!(fuse_bytes(), before, "passthrough reads reached FUSE");
    drop(got);
    let opens = passed();
    assert_eq!(std::fs::read(mnt.join("small")).expect("small"), b"small\n");
    assert_eq!(passed(), opens, "a small file is not passed through");

    // As overlayfs's lower layer (the way containerd mounts it).
    let merged = dir.path().join("merged");
    std::fs::create_dir(&merged).expect("merged");
    let upper = dir.path().join("base");
    std::fs::create_dir(&upper).expect("base");
    let opts = format!("lowerdir={}:{}", mnt.display(), upper.display());
    let status = std::process::Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(&merged)
        .status()
        .expect("mount overlay");
    assert!(status.success(), "overlay over a passthrough FUSE layer");
    let through_overlay = std::fs::read(merged.join("big.bin"));
    let _ = std::process::Command::new("umount").arg(&merged).status();
    assert!(through_overlay.expect("read through overlayfs") == big);
    assert!(
        passed() > opens,
        "the open through overlayfs was passed through"
    );
    snapshotter::layerfs::unmount(session).expect("unmount");
}
