//! Index a gzip-compressed tar built here, then read files and random ranges through the index.

use std::io::Write;

use layerindex::{Compression, Error, Kind, LayerIndex};
use rand::{Rng, RngCore, SeedableRng};

fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(1000);
    h.set_gid(100);
    h.set_mtime(1_700_000_000);
    h
}

/// A layer with every entry type, a long name, xattrs, a 5 MiB mostly-random file and text.
fn layer() -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut big = vec![0u8; 5 << 20];
    rng.fill_bytes(&mut big[..3 << 20]);
    for (i, b) in big[3 << 20..].iter_mut().enumerate() {
        *b = b"compressible text "[i % 18];
    }
    let long = format!("usr/share/{}/file.txt", "d".repeat(120));
    let files = vec![
        ("big.bin".to_owned(), big),
        ("etc/hostname".to_owned(), b"damselfly\n".to_vec()),
        (long, b"long name\n".to_vec()),
        ("empty".to_owned(), Vec::new()),
    ];
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Directory, 0, 0o755);
    b.append_data(&mut h, "etc/", std::io::empty())
        .expect("dir");
    for (name, data) in &files {
        let mut h = header(tar::EntryType::Regular, data.len() as u64, 0o644);
        if name == "etc/hostname" {
            b.append_pax_extensions([("SCHILY.xattr.user.note", b"hi".as_slice())])
                .expect("pax");
        }
        b.append_data(&mut h, name, data.as_slice()).expect("file");
    }
    let mut h = header(tar::EntryType::Symlink, 0, 0o777);
    b.append_link(&mut h, "etc/link", "/etc/hostname")
        .expect("symlink");
    let mut h = header(tar::EntryType::Link, 0, 0o644);
    b.append_link(&mut h, "hard", "etc/hostname")
        .expect("hardlink");
    let mut h = header(tar::EntryType::Char, 0, 0o666);
    h.set_device_major(1).expect("major");
    h.set_device_minor(3).expect("minor");
    b.append_data(&mut h, "dev-null", std::io::empty())
        .expect("char");
    let mut h = header(tar::EntryType::Fifo, 0, 0o600);
    b.append_data(&mut h, "fifo", std::io::empty())
        .expect("fifo");
    let mut h = header(tar::EntryType::Regular, 4, 0o644);
    h.as_old_mut().name[..9].copy_from_slice(b"../escape");
    h.set_cksum();
    b.append(&h, b"evil".as_slice()).expect("escape");
    (b.into_inner().expect("tar"), files)
}

fn gzip(data: &[u8], level: u32) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

fn read(index: &LayerIndex, blob: &[u8], start: u64, len: usize) -> Result<Vec<u8>, Error> {
    let plan = index.plan(start, len as u64)?;
    let (a, b) = (plan.compressed.start as usize, plan.compressed.end as usize);
    index.read(&plan, &blob[a..b], start, len)
}

#[test]
fn gzip_layers_read_at_random_through_checkpoints() {
    let (tar, files) = layer();
    for level in [1, 6, 9] {
        let blob = gzip(&tar, level);
        let index = LayerIndex::build_gzip(blob.as_slice(), 256 << 10).expect("index");
        assert_eq!(index.compression, Compression::Gzip);
        assert_eq!(index.uncompressed_size, tar.len() as u64);
        assert_eq!(index.compressed_size, blob.len() as u64);
        assert!(
            index.checkpoints.len() > 8,
            "{} checkpoints",
            index.checkpoints.len()
        );
        assert_eq!(index.toc.unsafe_entries, 1, "the ../ entry is left out");
        for (name, data) in &files {
            let e = index
                .toc
                .entries
                .iter()
                .find(|e| &e.path == name)
                .unwrap_or_else(|| panic!("{name} not in the TOC"));
            assert_eq!(
                (e.kind, e.size, e.mode, e.uid, e.gid),
                (Kind::File, data.len() as u64, 0o644, 1000, 100)
            );
            let got = read(&index, &blob, e.offset, data.len()).expect("file read");
            assert!(got == *data, "{name} differs (level {level})");
        }
        let find = |p: &str| index.toc.entries.iter().find(|e| e.path == p).expect(p);
        assert_eq!(
            find("etc/hostname")
                .xattrs
                .get("user.note")
                .map(Vec::as_slice),
            Some(b"hi".as_slice())
        );
        assert_eq!(find("etc").kind, Kind::Dir);
        assert_eq!(
            (find("etc/link").kind, find("etc/link").link.as_deref()),
            (Kind::Symlink, Some("/etc/hostname"))
        );
        assert_eq!(
            (find("hard").kind, find("hard").link.as_deref()),
            (Kind::Hardlink, Some("etc/hostname"))
        );
        assert_eq!(
            (
                find("dev-null").kind,
                find("dev-null").devmajor,
                find("dev-null").devminor
            ),
            (Kind::Char, 1, 3)
        );
        assert_eq!(find("fifo").kind, Kind::Fifo);
        // Random ranges of the whole uncompressed stream.
        let mut rng = rand::rngs::StdRng::seed_from_u64(level.into());
        for _ in 0..60 {
            let start = rng.random_range(0..tar.len() as u64);
            let len = rng.random_range(0..=(tar.len() as u64 - start).min(700_000)) as usize;
            let got = read(&index, &blob, start, len).unwrap_or_else(|e| {
                let plan = index.plan(start, len as u64).expect("plan");
                let outs: Vec<(u64, u64)> = index
                    .checkpoints
                    .iter()
                    .map(|c| (c.out, c.in_bit))
                    .collect();
                panic!("range {start}+{len} plan {plan:?} cps {outs:?}: {e}")
            });
            assert!(
                got == tar[start as usize..start as usize + len],
                "range {start}+{len}"
            );
        }
        assert!(matches!(
            index.plan(tar.len() as u64, 1),
            Err(Error::Invalid(_))
        ));
    }
}

#[test]
fn multi_member_gzip_and_plain_tar_are_indexed() {
    let (tar, _) = layer();
    let (a, b) = tar.split_at(3 << 20);
    let mut blob = gzip(a, 6);
    blob.extend(gzip(b, 6));
    let index = LayerIndex::build_gzip(blob.as_slice(), 1 << 20).expect("index");
    assert_eq!(index.uncompressed_size, tar.len() as u64);
    let got = read(&index, &blob, (3 << 20) - 1000, 5000).expect("across members");
    assert!(got == tar[(3 << 20) - 1000..(3 << 20) + 4000]);

    let plain = LayerIndex::build_tar(tar.as_slice()).expect("tar index");
    assert_eq!(plain.compression, Compression::None);
    let e = plain
        .toc
        .entries
        .iter()
        .find(|e| e.path == "etc/hostname")
        .expect("entry");
    assert_eq!(
        read(&plain, &tar, e.offset, 10).expect("read"),
        b"damselfly\n"
    );
}

#[test]
fn truncated_or_corrupt_gzip_is_an_error_never_wrong_bytes() {
    let (tar, _) = layer();
    let blob = gzip(&tar, 6);
    let cut = &blob[..blob.len() / 2];
    assert!(
        matches!(
            LayerIndex::build_gzip(cut, 1 << 20),
            Err(Error::Corrupt { .. })
        ),
        "truncated"
    );
    let mut bad = blob.clone();
    bad[0] = 0x1e;
    assert!(matches!(
        LayerIndex::build_gzip(bad.as_slice(), 1 << 20),
        Err(Error::Corrupt { .. })
    ));
    let mut trailer = blob.clone();
    let n = trailer.len();
    trailer[n - 1] ^= 0xff;
    assert!(
        matches!(
            LayerIndex::build_gzip(trailer.as_slice(), 1 << 20),
            Err(Error::Corrupt { .. })
        ),
        "ISIZE"
    );

    // Reads with compressed bytes missing at the end fail instead of returning short data.
    let index = LayerIndex::build_gzip(blob.as_slice(), 256 << 10).expect("index");
    let plan = index.plan(1 << 20, 100_000).expect("plan");
    let (a, b) = (plan.compressed.start as usize, plan.compressed.end as usize);
    let short = &blob[a..a + (b - a) / 4];
    let mut p = plan.clone();
    p.compressed = plan.compressed.start..plan.compressed.start + short.len() as u64;
    assert!(index.read(&p, short, 1 << 20, 100_000).is_err());
}

#[test]
fn indexes_round_trip_and_corrupt_ones_are_refused() {
    let (tar, _) = layer();
    let blob = gzip(&tar, 6);
    let index = LayerIndex::build_gzip(blob.as_slice(), 512 << 10).expect("index");
    let bytes = index.to_bytes().expect("serialize");
    assert_eq!(LayerIndex::from_bytes(&bytes).expect("parse"), index);
    assert!(
        bytes.len() < tar.len() / 4,
        "index of {} bytes for {} of tar",
        bytes.len(),
        tar.len()
    );
    for cut in [0, 3, 5, bytes.len() / 2, bytes.len() - 1] {
        assert!(
            LayerIndex::from_bytes(&bytes[..cut]).is_err(),
            "cut at {cut}"
        );
    }
    let mut other = bytes.clone();
    other[4] = 9;
    let err = LayerIndex::from_bytes(&other).expect_err("format");
    assert!(err.to_string().contains("format 9"), "{err}");
    let mut shifted = index.clone();
    shifted.toc.entries[0].offset = index.uncompressed_size;
    shifted.toc.entries[0].size = 1;
    let err = LayerIndex::from_bytes(&shifted.to_bytes().expect("ser")).expect_err("bounds");
    assert!(err.to_string().contains("outside the layer"), "{err}");
}

#[test]
fn chunks_tile_the_stream_and_read_back() {
    let (tar, _) = layer();
    let blob = gzip(&tar, 6);
    for index in [
        LayerIndex::build_gzip(blob.as_slice(), 256 << 10).expect("gzip index"),
        LayerIndex::build_tar(tar.as_slice()).expect("tar index"),
    ] {
        let source: &[u8] = match index.compression {
            Compression::Gzip => &blob,
            Compression::None | Compression::Zstd => &tar,
        };
        let mut at = 0;
        let mut chunks = 0;
        while at < index.uncompressed_size {
            let c = index.chunk_of(at);
            assert_eq!(c.start, at, "chunks are contiguous");
            assert!(c.end > c.start, "chunks are not empty");
            assert_eq!(
                index.chunk_of(c.end - 1),
                c,
                "the chunk's last byte is in it"
            );
            let len = usize::try_from(c.end - c.start).expect("len");
            let got = read(&index, source, c.start, len).expect("chunk");
            assert!(
                got == tar[c.start as usize..c.end as usize],
                "chunk {c:?} differs"
            );
            at = c.end;
            chunks += 1;
        }
        assert_eq!(at, tar.len() as u64);
        assert!(chunks > 1, "{chunks} chunks");
    }
}

#[test]
fn zstd_layers_are_indexed_and_read_whole() {
    let (tar, files) = layer();
    let blob = ruzstd::encoding::compress_to_vec(
        tar.as_slice(),
        ruzstd::encoding::CompressionLevel::Fastest,
    );
    let index = LayerIndex::build_zstd(blob.as_slice()).expect("index");
    assert_eq!(index.compression, Compression::Zstd);
    assert_eq!(index.uncompressed_size, tar.len() as u64);
    assert_eq!(index.compressed_size, blob.len() as u64);
    assert_eq!(
        index.chunk_of(12_345),
        0..tar.len() as u64,
        "one chunk: the layer"
    );
    let gz = LayerIndex::build_tar(tar.as_slice()).expect("tar index");
    assert_eq!(index.toc, gz.toc, "same table of contents as the plain tar");
    for (name, data) in &files {
        let e = index
            .toc
            .entries
            .iter()
            .find(|e| &e.path == name)
            .unwrap_or_else(|| panic!("{name} not in the TOC"));
        let got = read(&index, &blob, e.offset, data.len()).expect("read");
        assert!(got == *data, "{name} differs");
    }
    let mut whole = Vec::new();
    assert_eq!(
        index
            .decompress_all(blob.as_slice(), &mut whole)
            .expect("whole"),
        tar.len() as u64
    );
    assert!(whole == tar);
    let cut = &blob[..blob.len() / 2];
    assert!(LayerIndex::build_zstd(cut).is_err(), "truncated zstd");
    assert!(index.decompress_all(cut, &mut Vec::new()).is_err());
}
