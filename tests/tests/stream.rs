//! `dfget -O -`: the content streams to stdout in order; the last byte waits for verification.

use std::process::Stdio;

use damselfly_tests::harness::{Env, bin, random_file, sha256_file};

async fn dfget_to_file(
    env: &Env,
    name: &str,
    args: &[String],
) -> (i32, std::path::PathBuf, String) {
    let out = env.path(&format!("{name}.stdout"));
    let status = tokio::process::Command::new(bin("dfget"))
        .args(args)
        .stdout(std::fs::File::create(&out).expect("stdout file"))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dfget")
        // (`output()` would replace the stdout file with a pipe.)
        .wait_with_output()
        .await
        .expect("run dfget");
    (
        status.status.code().unwrap_or(-1),
        out,
        String::from_utf8_lossy(&status.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_to_stdout_and_holds_back_unverified_ends() {
    let env = Env::new("stream");
    let (_origin, origin_url) = env.origin(&[]).await;
    let size = 10usize << 20;
    let want = random_file(&env.path("www/f"), size);
    let (_sn, grpc, _) = env.supernode("sn", &[]).await;
    let url = format!("{origin_url}/files/f");

    let args = env.dfget_args("p1", &url, std::path::Path::new("-"), &grpc, &[]);
    let (code, out, stderr) = dfget_to_file(&env, "ok", &args).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(sha256_file(&out), want, "streamed bytes differ");
    assert!(
        stderr.contains("dfget: done - size=10485760"),
        "summary goes to stderr: {stderr}"
    );

    let wrong = format!("sha256:{}", "0".repeat(64));
    let args = env.dfget_args(
        "p2",
        &url,
        std::path::Path::new("-"),
        &grpc,
        &["--digest", &wrong],
    );
    let (code, out, stderr) = dfget_to_file(&env, "bad", &args).await;
    assert_eq!(code, 6, "{stderr}");
    let got = std::fs::read(&out).expect("stdout");
    let orig = std::fs::read(env.path("www/f")).expect("orig");
    assert!(
        got.len() < size,
        "the whole content was streamed although it did not verify"
    );
    assert_eq!(
        &got[..],
        &orig[..got.len()],
        "what was streamed must be a prefix of the content"
    );
}
