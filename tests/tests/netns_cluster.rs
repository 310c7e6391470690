//! CI's small run of the namespaced cluster benchmark (`tests/bench/cluster.sh`): 4 hosts in 2 racks,
//! the origin and the supernode each in a network namespace of their own, every link shaped with
//! HTB, real dfget peers, a real aria2 + opentracker swarm and direct curl downloads on the same
//! links. The script itself checks that every host of every run ends with the exact bytes; this
//! checks what the benchmark is there to show: the origin sends one copy, hosts serve each other
//! most of the content over their own links, about one copy of the content enters each rack (the
//! hosts' agents give their rack as `--location`), and the shaping is real (straight from the
//! origin, 4 hosts take about 4 × the one-host bound).

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use damselfly_tests::harness::{bin_dir, is_root, missing_tools, skip};

const TEST: &str = "netns_cluster";
const SIZE_MIB: u32 = 16;

/// The `key=value` fields of the benchmark's summary line.
fn fields(line: &str) -> HashMap<&str, &str> {
    line.split_whitespace()
        .filter_map(|f| f.split_once('='))
        .collect()
}

fn number(fields: &HashMap<&str, &str>, key: &str) -> f64 {
    let v = fields
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in the summary line"));
    v.parse().unwrap_or_else(|e| panic!("{key}={v}: {e}"))
}

#[test]
fn four_hosts_in_two_racks_fetch_from_each_other() {
    if !is_root() {
        return skip(TEST, "network namespaces need root");
    }
    if let Some(why) = missing_tools(&["ip", "tc", "aria2c", "opentracker", "mktorrent", "curl"]) {
        return skip(TEST, &why);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/cluster.sh");
    let out = Command::new("bash")
        .arg(&script)
        .envs([
            ("HOSTS", "4"),
            ("RACKS", "2"),
            ("SIZE_MIB", &SIZE_MIB.to_string()),
            ("RATE_MBIT", "200"),
        ])
        .env("BIN", bin_dir())
        .output()
        .expect("run cluster.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "cluster.sh failed:\n{stdout}\n{stderr}"
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("cluster "))
        .unwrap_or_else(|| panic!("no summary line:\n{stdout}\n{stderr}"));
    eprintln!("{line}");
    let f = fields(line);
    let origin = number(&f, "origin_bytes_ratio");
    assert!(origin <= 1.1, "the origin sent {origin} copies: {line}");
    // 4 hosts need 4 S; the supernode sends each piece about once, the hosts the rest.
    let upload = number(&f, "host_upload_ratio");
    assert!(
        upload >= 0.5,
        "hosts served only {upload} of the content: {line}"
    );
    let direct = number(&f, "direct_over_bound");
    assert!(
        direct >= 3.0,
        "the origin's link is not shaped ({direct} × bound for 4 hosts): {line}"
    );
    let p2p = number(&f, "p2p_over_bound");
    assert!(
        p2p < direct,
        "Damselfly ({p2p} × bound) no faster than direct: {line}"
    );
    assert!(number(&f, "bt_over_bound") > 0.0, "{line}");
    // Hosts give their rack as --location: one copy of each piece enters a rack (measured 1.01;
    // without locations 1.5-1.8).
    let rack_in = number(&f, "rack_in_over_size");
    assert!(rack_in <= 1.25, "{rack_in} copies entered a rack: {line}");
    // The supernode counts what it sent across: about one assignment per piece and rack.
    let size = SIZE_MIB << 20;
    let piece =
        fetcher::task_id::piece_size_for(i64::from(size), fetcher::task_id::DEFAULT_PIECE_SIZE);
    let pieces = f64::from(size.div_ceil(piece));
    let cross = number(&f, "cross_rack_pieces");
    assert!(
        (2.0 * pieces..=2.5 * pieces).contains(&cross),
        "{cross} assignments crossed racks for {pieces} pieces in 2 racks: {line}"
    );
}
