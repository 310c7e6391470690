//! A gzip layer mounted through FUSE from its index reads back exactly as `tar` wrote it, and
//! works as an overlayfs lower layer (whiteouts hide, opaque directories hide). Needs root and
//! /dev/fuse: skipped with the reason otherwise.

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

use layerindex::LayerIndex;
use snapshotter::layerfs::{FileBlob, LayerFs, mount};

mod common;
use common::skip_reason;

fn header(kind: tar::EntryType, size: u64, mode: u32, uid: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(uid + 1);
    h.set_mtime(1_700_000_000);
    h
}

/// Upper layer: a big file, a symlink, a hard link, a fifo, a whiteout of `lower/gone`, an
/// opaque `lower/opaque-dir`, an xattr.
fn layer(big: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Directory, 0, 0o750, 7);
    b.append_data(&mut h, "lower/", std::io::empty())
        .expect("dir");
    let mut h = header(tar::EntryType::Regular, big.len() as u64, 0o640, 1000);
    b.append_pax_extensions([("SCHILY.xattr.user.origin", b"damselfly".as_slice())])
        .expect("pax");
    b.append_data(&mut h, "lower/big.bin", big).expect("big");
    let mut h = header(tar::EntryType::Symlink, 0, 0o777, 0);
    b.append_link(&mut h, "lower/link", "big.bin")
        .expect("symlink");
    let mut h = header(tar::EntryType::Link, 0, 0o640, 1000);
    b.append_link(&mut h, "hard", "lower/big.bin")
        .expect("hard");
    let mut h = header(tar::EntryType::Fifo, 0, 0o600, 0);
    b.append_data(&mut h, "lower/fifo", std::io::empty())
        .expect("fifo");
    let mut h = header(tar::EntryType::Regular, 0, 0o644, 0);
    b.append_data(&mut h, "lower/.wh.gone", std::io::empty())
        .expect("whiteout");
    let mut h = header(tar::EntryType::Regular, 0, 0o644, 0);
    b.append_data(&mut h, "lower/opaque-dir/.wh..wh..opq", std::io::empty())
        .expect("opaque");
    let mut h = header(tar::EntryType::Regular, 4, 0o644, 0);
    b.append_data(&mut h, "lower/opaque-dir/new", b"new\n".as_slice())
        .expect("new");
    let tar = b.into_inner().expect("tar");
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(&tar).expect("gzip");
    e.finish().expect("gzip")
}

#[test]
fn a_fuse_layer_reads_back_exactly_and_stacks_under_overlayfs() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP a_fuse_layer_reads_back_exactly_and_stacks_under_overlayfs: {why}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut big = vec![0u8; 9 << 20];
    for (i, b) in big.iter_mut().enumerate() {
        *b = (i.wrapping_mul(2_654_435_761) >> 13) as u8;
    }
    let blob = layer(&big);
    let blob_path = dir.path().join("layer.tar.gz");
    std::fs::write(&blob_path, &blob).expect("write blob");
    let index = LayerIndex::build_gzip(blob.as_slice(), 1 << 20).expect("index");
    let file = std::fs::File::open(&blob_path).expect("open blob");
    let metrics = snapshotter::metrics::Metrics::new();
    let fs = LayerFs::new(
        "sha256:test",
        Arc::new(index),
        Arc::new(FileBlob(file)),
        metrics.clone(),
    );
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    let session = mount(fs, &mnt).expect("mount");

    let got = std::fs::read(mnt.join("lower/big.bin")).expect("read big");
    assert!(got == big, "big.bin differs through FUSE");
    // Each chunk (1 MiB apart here) was fetched and inflated once; the other reads hit memory.
    let inflates = metrics.chunk_reads.with_label_values(&["inflate"]).get();
    let hits = metrics.chunk_reads.with_label_values(&["memory"]).get();
    assert!(inflates <= 12, "{inflates} chunk inflates for a 9 MiB file");
    assert!(hits > inflates, "{hits} memory hits");
    let md = std::fs::symlink_metadata(mnt.join("lower/big.bin")).expect("stat");
    assert_eq!(
        (md.mode() & 0o7777, md.uid(), md.gid(), md.nlink()),
        (0o640, 1000, 1001, 2)
    );
    assert_eq!(md.mtime(), 1_700_000_000);
    let hard = std::fs::symlink_metadata(mnt.join("hard")).expect("hard");
    assert_eq!(hard.ino(), md.ino(), "hard link shares the inode");
    assert_eq!(
        std::fs::read_link(mnt.join("lower/link")).expect("readlink"),
        Path::new("big.bin")
    );
    assert!(
        std::fs::symlink_metadata(mnt.join("lower/fifo"))
            .expect("fifo")
            .file_type()
            .is_fifo()
    );
    let wh = std::fs::symlink_metadata(mnt.join("lower/gone")).expect("whiteout");
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
    let mut buf = [0u8; 64];
    let n =
        rustix::fs::getxattr(mnt.join("lower/big.bin"), "user.origin", &mut buf).expect("xattr");
    assert_eq!(&buf[..n], b"damselfly");
    let dirmd = std::fs::metadata(mnt.join("lower")).expect("dir");
    assert_eq!((dirmd.mode() & 0o7777, dirmd.uid()), (0o750, 7));
    // Partial reads in the middle of the file (across checkpoints).
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(mnt.join("lower/big.bin")).expect("open");
    let mut part = vec![0u8; 300_000];
    f.read_exact_at(&mut part, 5_000_000).expect("pread");
    assert!(part == big[5_000_000..5_300_000]);
    assert!(
        std::fs::write(mnt.join("new-file"), b"x").is_err(),
        "read-only"
    );

    // As overlayfs's upper lower layer over a plain directory holding the files it deletes.
    let base = dir.path().join("base");
    std::fs::create_dir_all(base.join("lower/opaque-dir")).expect("base");
    std::fs::write(base.join("lower/gone"), b"old").expect("gone");
    std::fs::write(base.join("lower/kept"), b"kept").expect("kept");
    std::fs::write(base.join("lower/opaque-dir/old"), b"old").expect("old");
    let merged = dir.path().join("merged");
    std::fs::create_dir(&merged).expect("merged");
    let opts = format!("lowerdir={}:{}", mnt.display(), base.display());
    let status = std::process::Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(&merged)
        .status()
        .expect("mount overlay");
    assert!(
        status.success(),
        "overlay mount with the FUSE layer as a lower failed"
    );
    let exists = |p: &str| merged.join(p).exists();
    let result = (
        exists("lower/gone"),
        exists("lower/kept"),
        exists("lower/opaque-dir/old"),
        exists("lower/opaque-dir/new"),
        std::fs::read(merged.join("lower/big.bin")).map(|b| b == big),
    );
    let _ = std::process::Command::new("umount").arg(&merged).status();
    assert_eq!(
        (result.0, result.1, result.2, result.3),
        (false, true, false, true),
        "whiteout hides gone, opaque dir hides old"
    );
    assert!(matches!(result.4, Ok(true)));
    drop(f);
    snapshotter::layerfs::unmount(session).expect("unmount");
}

#[test]
fn a_zstd_layer_is_read_whole_once_then_served_locally() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP a_zstd_layer_is_read_whole_once_then_served_locally: {why}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut big = vec![0u8; 3 << 20];
    for (i, b) in big.iter_mut().enumerate() {
        *b = (i.wrapping_mul(2_654_435_761) >> 13) as u8;
    }
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Regular, big.len() as u64, 0o644, 0);
    b.append_data(&mut h, "big.bin", big.as_slice())
        .expect("big");
    let mut h = header(tar::EntryType::Regular, 6, 0o644, 0);
    b.append_data(&mut h, "etc/small", b"small\n".as_slice())
        .expect("small");
    let tar = b.into_inner().expect("tar");
    let blob = ruzstd::encoding::compress_to_vec(
        tar.as_slice(),
        ruzstd::encoding::CompressionLevel::Fastest,
    );
    let blob_path = dir.path().join("layer.tar.zst");
    std::fs::write(&blob_path, &blob).expect("write blob");
    let index = Arc::new(LayerIndex::build_zstd(blob.as_slice()).expect("index"));
    let mount_it = |name: &str, disk: bool| {
        let metrics = snapshotter::metrics::Metrics::new();
        let mut fs = LayerFs::new(
            "sha256:zstd",
            index.clone(),
            Arc::new(FileBlob(std::fs::File::open(&blob_path).expect("open"))),
            metrics.clone(),
        );
        if disk {
            fs = fs
                .with_cache(
                    Arc::new(snapshotter::layerfs::cache::ChunkCache::new(1 << 20)),
                    Some(&dir.path().join(format!("{name}.chunks"))),
                )
                .expect("cache");
        }
        let mnt = dir.path().join(name);
        std::fs::create_dir(&mnt).expect("mkdir");
        (mount(fs, &mnt).expect("mount"), mnt, metrics)
    };
    let (session, mnt, metrics) = mount_it("with-disk", true);
    assert_eq!(
        std::fs::read(mnt.join("etc/small")).expect("small"),
        b"small\n"
    );
    assert!(std::fs::read(mnt.join("big.bin")).expect("big") == big);
    assert_eq!(
        metrics.chunk_reads.with_label_values(&["inflate"]).get(),
        1,
        "decompressed once"
    );
    snapshotter::layerfs::unmount(session).expect("unmount");
    // Without a local copy to serve from, reads fail cleanly (EIO), never with wrong bytes.
    let (session, mnt, _) = mount_it("without-disk", false);
    let err = std::fs::read(mnt.join("etc/small")).expect_err("no local copy");
    assert_eq!(
        err.raw_os_error(),
        Some(rustix::io::Errno::IO.raw_os_error())
    );
    snapshotter::layerfs::unmount(session).expect("unmount");
}
