//! Cluster TLS, on by default (finding 7 of `../shared/SECURITY-REVIEW.md`): a supernode and an
//! agent with certificates from `supernode certs` (as every test daemon has), the agent reaching
//! the scheduler through one recording TCP relay and the supernode's piece server through
//! another (the supernode advertises the relay's address). A download of a private file with a
//! secret origin credential works through the agent; neither capture holds the credential, a
//! ticket, a URL or a window of the file's bytes; the scheduler answers neither a plaintext
//! client nor a TLS client without a cluster certificate, the piece server no plaintext client.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use damselfly_tests::harness::{Env, random_file, run, sha256_file};
use proto::scheduler::scheduler_client::SchedulerClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Relays `listen` to `to`, recording every byte in both directions.
async fn recording_relay(listen: &str, to: String) -> (String, Arc<Mutex<Vec<u8>>>) {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .expect("bind relay");
    let addr = listener.local_addr().expect("addr").to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(upstream) = tokio::net::TcpStream::connect(&to).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (ur, uw) = upstream.into_split();
            for (mut r, mut w) in [
                (
                    Box::new(cr) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                    Box::new(uw) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                ),
                (Box::new(ur), Box::new(cw)),
            ] {
                let record = record.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = r.read(&mut buf).await {
                        if n == 0 || w.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        if let Ok(mut s) = record.lock() {
                            s.extend_from_slice(&buf[..n]);
                        }
                    }
                    let _ = w.shutdown().await;
                });
            }
        }
    });
    (addr, seen)
}

/// An error the scheduler itself answered with (not a transport failure).
fn reached_the_service(s: &tonic::Status) -> bool {
    !matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_traffic_is_encrypted_and_needs_a_cluster_certificate() {
    let env = Env::new("tls");
    let s = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let (_origin, origin) = env.origin(&["--bearer", "s3cret-origin-token-4711"]).await;
    let file = env.path("www/f");
    let want = random_file(&file, 6 << 20);
    // Peers are sent to the supernode's pieces at 127.0.0.2, where a relay listens.
    let (_sn, grpc, http) = env.supernode("sn", &["--advertise-ip", "127.0.0.2"]).await;
    let http_port = http.rsplit(':').next().expect("port").to_owned();
    let (_, pieces_seen) = recording_relay(
        &format!("127.0.0.2:{http_port}"),
        format!("127.0.0.1:{http_port}"),
    )
    .await;
    let (relay, seen) = recording_relay("127.0.0.1:0", grpc.clone()).await;
    let (_agent, a) = env.dfdaemon("agent", &relay, &[]).await;

    let out = env.path("f.out");
    let args: Vec<String> = [
        format!("{origin}/auth/f"),
        "-O".into(),
        s(&out),
        "--agent".into(),
        s(&a.socket),
        "-H".into(),
        "Authorization: Bearer s3cret-origin-token-4711".into(),
    ]
    .into();
    let (code, output) = run(&mut env.spawn("dfget", "dfget", &args)).await;
    if code != 0 {
        env.dump_logs();
    }
    assert_eq!(code, 0, "{output}");
    assert_eq!(sha256_file(&out), want);
    let capture = seen.lock().expect("capture").clone();
    assert!(capture.len() > 1000, "nothing went through the relay");
    let pieces = pieces_seen.lock().expect("capture").clone();
    assert!(
        pieces.len() > 6 << 20,
        "the pieces did not come through the relay ({} bytes)",
        pieces.len()
    );
    let bytes = std::fs::read(&file).expect("file");
    let windows = [&bytes[..64], &bytes[3 << 20..(3 << 20) + 64]];
    for secret in [
        &b"s3cret-origin-token-4711"[..],
        b"Authorization",
        b"Bearer",
        b"/auth/f",
        b"/pieces/",
    ]
    .into_iter()
    .chain(windows)
    {
        for (link, c) in [("scheduler", &capture), ("piece", &pieces)] {
            assert!(
                !contains(c, secret),
                "{:?} crossed the {link} link in clear",
                String::from_utf8_lossy(&secret[..secret.len().min(24)])
            );
        }
    }
    // The piece server answers no plaintext client.
    let plain = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
        .get(format!("http://127.0.0.1:{http_port}/healthz"))
        .send()
        .await;
    assert!(plain.is_err(), "plaintext HTTP got {plain:?}");

    // Plaintext h2 and TLS without a cluster certificate get no answer.
    let plain = async {
        let mut c = SchedulerClient::connect(format!("http://{grpc}"))
            .await
            .ok()?;
        c.layer_index(proto::scheduler::LayerIndexRequest::default())
            .await
            .err()
            .filter(reached_the_service)
    };
    let answered = tokio::time::timeout(Duration::from_secs(10), plain)
        .await
        .ok()
        .flatten();
    assert!(answered.is_none(), "a plaintext client got {answered:?}");
    let ca_pem = std::fs::read(damselfly_tests::cluster::ca()).expect("ca");
    let no_cert = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem))
        .domain_name("127.0.0.1");
    let anonymous = async {
        let ch = tonic::transport::Endpoint::from_shared(format!("https://{grpc}"))
            .ok()?
            .tls_config(no_cert)
            .ok()?
            .connect()
            .await
            .ok()?;
        SchedulerClient::new(ch)
            .layer_index(proto::scheduler::LayerIndexRequest::default())
            .await
            .err()
            .filter(reached_the_service)
    };
    let reached = tokio::time::timeout(Duration::from_secs(10), anonymous)
        .await
        .ok()
        .flatten();
    assert!(
        reached.is_none(),
        "a TLS client without a cluster certificate reached the scheduler: {reached:?}"
    );
}
