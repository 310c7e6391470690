//! Many peers, one origin fetch: 8 concurrent dfget processes through one supernode.

use damselfly_tests::harness::{Env, origin_bytes, random_file, run, sha256_file, summary_field};

const SIZE: usize = 200 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_peers_share_one_origin_fetch() {
    let env = Env::new("p2p");
    let (_origin, origin_url) = env.origin(&[]).await;
    let want = random_file(&env.path("www/big"), SIZE);
    let (_sn, grpc, _) = env.supernode("sn", &[]).await;
    let url = format!("{origin_url}/files/big");
    let mut procs = Vec::new();
    for i in 0..8 {
        let out = env.path(&format!("out{i}"));
        let args = env.dfget_args(&format!("peer{i}"), &url, &out, &grpc, &[]);
        procs.push((out, env.spawn(&format!("dfget{i}"), "dfget", &args)));
    }
    let (mut from_peers, mut from_sn) = (0u64, 0u64);
    for (out, p) in &mut procs {
        let (code, output) = run(p).await;
        if code != 0 {
            env.dump_logs();
        }
        assert_eq!(code, 0, "dfget failed: {output}");
        assert_eq!(
            sha256_file(out),
            want,
            "{} differs from the origin's file",
            out.display()
        );
        from_peers += summary_field(&output, "peers").expect("peers field");
        from_sn += summary_field(&output, "supernode").expect("supernode field");
    }
    let served = origin_bytes(&origin_url).await;
    eprintln!("origin served {served} bytes; peers gave {from_peers}, supernode {from_sn}");
    assert!(
        served as f64 <= 1.05 * SIZE as f64,
        "origin served {served} bytes for a {SIZE}-byte file"
    );
    assert_eq!(
        from_peers + from_sn,
        8 * SIZE as u64,
        "every byte accounted for"
    );
    assert!(
        from_peers as f64 >= 0.5 * (from_peers + from_sn) as f64,
        "only {from_peers} of {} piece bytes came from peers",
        from_peers + from_sn
    );
}
