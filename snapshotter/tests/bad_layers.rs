//! Hostile and damaged layers through FUSE: entries that try to leave the layer (`../`, absolute
//! paths, hard links out of it) stay inside or are dropped, symlinks are served as the text they
//! are; blob bytes that cannot be had (a truncated blob) are EIO, never wrong bytes; a broken
//! layer leaves the other layers of the process serving. Needs root and /dev/fuse: skipped with
//! the reason otherwise.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use layerindex::LayerIndex;
use snapshotter::layerfs::{FileBlob, LayerFs, mount};

mod common;
use common::skip_reason;

/// A tar entry whose name is written raw (the `tar` crate refuses `..` in paths it builds).
fn raw_entry(
    b: &mut tar::Builder<Vec<u8>>,
    kind: tar::EntryType,
    name: &str,
    link: &str,
    data: &[u8],
) {
    let mut h = tar::Header::new_old();
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_cksum();
    b.append(&h, data).expect("append");
}

fn gzip(tar: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(tar).expect("gzip");
    e.finish().expect("gzip")
}

fn mount_blob(
    dir: &Path,
    name: &str,
    blob_for_index: &[u8],
    served: &[u8],
) -> fuser::BackgroundSession {
    let index = LayerIndex::build_gzip(blob_for_index, 1 << 20).expect("index");
    let path = dir.join(format!("{name}.blob"));
    std::fs::write(&path, served).expect("write blob");
    let fs = LayerFs::new(
        format!("sha256:{name}"),
        Arc::new(index),
        Arc::new(FileBlob(std::fs::File::open(&path).expect("open"))),
        snapshotter::metrics::Metrics::new(),
    );
    let mnt = dir.join(name);
    std::fs::create_dir_all(&mnt).expect("mkdir");
    mount(fs, &mnt).expect("mount")
}

#[test]
fn hostile_and_damaged_layers_stay_contained() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP hostile_and_damaged_layers_stay_contained: {why}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");

    // Escapes.
    let mut b = tar::Builder::new(Vec::new());
    raw_entry(&mut b, tar::EntryType::Regular, "../escape", "", b"out\n");
    raw_entry(
        &mut b,
        tar::EntryType::Regular,
        "a/../../escape2",
        "",
        b"out\n",
    );
    raw_entry(&mut b, tar::EntryType::Regular, "/abs/file", "", b"abs\n");
    raw_entry(
        &mut b,
        tar::EntryType::Symlink,
        "passwd",
        "/etc/passwd",
        b"",
    );
    raw_entry(&mut b, tar::EntryType::Symlink, "up", "../../../..", b"");
    raw_entry(
        &mut b,
        tar::EntryType::Link,
        "hard-out",
        "../../etc/passwd",
        b"",
    );
    raw_entry(&mut b, tar::EntryType::Regular, "ok", "", b"fine\n");
    let hostile = gzip(&b.into_inner().expect("tar"));
    let hostile_mount = mount_blob(dir.path(), "hostile", &hostile, &hostile);
    let mnt = dir.path().join("hostile");
    let mut names: Vec<String> = std::fs::read_dir(&mnt)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["abs", "ok", "passwd", "up"],
        "escapes dropped, /abs kept inside"
    );
    assert_eq!(std::fs::read(mnt.join("abs/file")).expect("abs"), b"abs\n");
    assert!(!dir.path().join("escape").exists() && !dir.path().join("escape2").exists());
    // Symlinks are text; whoever follows them does so inside the container's root.
    assert_eq!(
        std::fs::read_link(mnt.join("passwd")).expect("link"),
        Path::new("/etc/passwd")
    );
    assert_eq!(
        std::fs::read_link(mnt.join("up")).expect("link"),
        Path::new("../../../..")
    );

    // A big file whose blob is served truncated: the intact start reads, the rest is EIO.
    // Incompressible (xorshift), so the compressed offsets track the uncompressed ones.
    let mut big = vec![0u8; 6 << 20];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for x in big.iter_mut() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *x = state as u8;
    }
    let mut b = tar::Builder::new(Vec::new());
    raw_entry(&mut b, tar::EntryType::Regular, "big.bin", "", &big);
    let whole = gzip(&b.into_inner().expect("tar"));
    let truncated_mount = mount_blob(dir.path(), "truncated", &whole, &whole[..whole.len() / 2]);
    let f = std::fs::File::open(dir.path().join("truncated/big.bin")).expect("open");
    let mut head = vec![0u8; 100_000];
    f.read_exact_at(&mut head, 0).expect("intact start");
    assert!(head == big[..100_000]);
    let mut tail = vec![0u8; 100_000];
    let err = f
        .read_exact_at(&mut tail, (5 << 20) as u64)
        .expect_err("damaged range");
    assert_eq!(err.raw_os_error(), Some(libc_eio()), "{err}");

    // The other layers of the process still serve.
    assert_eq!(std::fs::read(mnt.join("ok")).expect("ok"), b"fine\n");
    drop(f);
    snapshotter::layerfs::unmount(truncated_mount).expect("unmount");
    snapshotter::layerfs::unmount(hostile_mount).expect("unmount");
}

/// EIO's number on Linux.
fn libc_eio() -> i32 {
    rustix::io::Errno::IO.raw_os_error()
}
