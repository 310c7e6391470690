//! Property tests of everything that parses a layer or an index (proptest; bounded in CI).
//! Whatever the bytes, building and decoding return a value or an error, never a panic; valid
//! archives come through the tar guard exactly as the `tar` crate reads them; and reads through
//! gzip checkpoints return exactly the uncompressed bytes.
//!
//! Longer run: `PROPTEST_CASES=20000 cargo test --release -p layerindex --test hostile_input`.

use std::io::Write;

use layerindex::{LayerIndex, toc};
use proptest::collection::vec;
use proptest::prelude::*;

fn gzip(data: &[u8], level: u32) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

/// A tar archive of `files` (name, size, fill byte), long names as GNU long-name entries and
/// every other file with a PAX xattr.
fn archive(files: &[(String, usize, u8)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (i, (name, size, fill)) in files.iter().enumerate() {
        if i % 2 == 1 {
            b.append_pax_extensions([("SCHILY.xattr.user.n", format!("{i}").as_bytes())])
                .expect("pax");
        }
        let mut h = tar::Header::new_gnu();
        h.set_size(*size as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        let data = vec![*fill; *size];
        b.append_data(&mut h, name, &data[..]).expect("append");
    }
    b.into_inner().expect("tar")
}

/// Names a layer may hold: short, long (past the 100-byte header field) and nested.
fn name() -> impl Strategy<Value = String> {
    (vec("[a-z0-9]{1,40}", 1..8), any::<u8>())
        .prop_map(|(parts, n)| format!("{}/f{n}", parts.join("/")))
}

/// What the `tar` crate itself reads: (path, size, data offset) of every entry.
fn crate_view(bytes: &[u8]) -> Vec<(String, u64, u64)> {
    let mut a = tar::Archive::new(bytes);
    a.entries()
        .expect("entries")
        .map(|e| {
            let e = e.expect("entry");
            (
                String::from_utf8_lossy(&e.path_bytes()).into_owned(),
                e.size(),
                e.raw_file_position(),
            )
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(200)
    ))]

    #[test]
    fn any_bytes_as_a_tar_layer(bytes in vec(any::<u8>(), 0..8192)) {
        let _ = LayerIndex::build_tar(&bytes[..]);
    }

    #[test]
    fn any_bytes_as_a_gzip_layer(bytes in vec(any::<u8>(), 0..8192)) {
        let mut blob = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
        blob.extend(bytes);
        let _ = LayerIndex::build_gzip(&blob[..], 1024);
    }

    #[test]
    fn any_bytes_as_a_zstd_layer(bytes in vec(any::<u8>(), 0..4096)) {
        let mut blob = vec![0x28, 0xb5, 0x2f, 0xfd];
        blob.extend(bytes);
        let _ = LayerIndex::build_zstd(&blob[..]);
    }

    #[test]
    fn any_bytes_as_an_index(bytes in vec(any::<u8>(), 0..4096), start in 0u64..1 << 20, len in 0u64..4096) {
        if let Ok(index) = LayerIndex::from_bytes(&bytes)
            && let Ok(plan) = index.plan(start, len)
        {
            let n = (plan.compressed.end - plan.compressed.start).min(1 << 20) as usize;
            let _ = index.read(&plan, &vec![0; n], start, len as usize);
        }
    }

    #[test]
    fn damaged_archives_and_their_gzip_fail_cleanly(
        files in vec((name(), 0usize..3000, any::<u8>()), 1..6),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut bytes = archive(&files);
        for (at, b) in &flips {
            let i = at.index(bytes.len());
            bytes[i] ^= b | 1;
        }
        let _ = toc::build(&bytes[..]);
        let mut gz = gzip(&archive(&files), 6);
        for (at, b) in &flips {
            let i = at.index(gz.len());
            gz[i] ^= b | 1;
        }
        let _ = LayerIndex::build_gzip(&gz[..], 512);
    }

    #[test]
    fn the_guard_reads_valid_archives_as_the_tar_crate_does(
        files in vec((name(), 0usize..3000, any::<u8>()), 1..10),
    ) {
        let bytes = archive(&files);
        let toc = toc::build(&bytes[..]).expect("a valid archive is indexed");
        let ours: Vec<(String, u64, u64)> =
            toc.entries.iter().map(|e| (e.path.clone(), e.size, e.offset)).collect();
        prop_assert_eq!(ours, crate_view(&bytes));
    }

    #[test]
    fn gzip_reads_through_checkpoints_are_exact(
        seed in any::<u64>(),
        size in 1usize..200_000,
        level in 1u32..10,
        ranges in vec((any::<prop::sample::Index>(), 1usize..20_000), 1..6),
    ) {
        use rand::{RngCore, SeedableRng};
        let mut data = vec![0u8; size];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
        // Half compressible: repeat the first half.
        let half = size / 2;
        data.copy_within(0..half, size - half);
        let tar = {
            let mut b = tar::Builder::new(Vec::new());
            let mut h = tar::Header::new_gnu();
            h.set_size(size as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            b.append_data(&mut h, "blob", &data[..]).expect("append");
            b.into_inner().expect("tar")
        };
        let blob = gzip(&tar, level);
        let index = LayerIndex::build_gzip(&blob[..], 4096).expect("index");
        for (at, len) in ranges {
            let start = at.index(tar.len()) as u64;
            let len = len.min(tar.len() - start as usize);
            let plan = index.plan(start, len as u64).expect("plan");
            let c = &blob[plan.compressed.start as usize..plan.compressed.end as usize];
            let got = index.read(&plan, c, start, len).expect("read");
            prop_assert!(got == tar[start as usize..start as usize + len]);
        }
    }
}
