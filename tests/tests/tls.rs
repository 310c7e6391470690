//! Cluster TLS on the scheduler link (finding 7 of `../shared/SECURITY-REVIEW.md`): a supernode
//! with the cluster CA and its certificate, an agent reaching it through a recording TCP relay.
//! A download with a secret origin credential works through the agent, the relay's capture of
//! both directions holds neither the credential nor a ticket, and the listener answers neither a
//! plaintext client nor a TLS client without a cluster certificate.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use damselfly_tests::harness::{Env, random_file, run, sha256_file};
use damselfly_tests::pki::make_pki;
use proto::scheduler::scheduler_client::SchedulerClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Relays 127.0.0.1:<port> to `to`, recording every byte in both directions.
async fn recording_relay(to: String) -> (String, Arc<Mutex<Vec<u8>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
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
    let pki = make_pki(&env);
    let s = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let (ca, cert, key) = (s(&pki.ca_crt), s(&pki.server_crt), s(&pki.server_key));
    let tls = [
        "--tls-ca",
        ca.as_str(),
        "--tls-cert",
        cert.as_str(),
        "--tls-key",
        key.as_str(),
    ];
    let (_origin, origin) = env.origin(&["--bearer", "s3cret-origin-token-4711"]).await;
    let want = random_file(&env.path("www/f"), 6 << 20);
    let (_sn, grpc, _http) = env.supernode("sn", &tls).await;
    let (relay, seen) = recording_relay(grpc.clone()).await;
    let (_agent, a) = env.dfdaemon("agent", &relay, &tls).await;

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
    for secret in [
        &b"s3cret-origin-token-4711"[..],
        b"Authorization",
        b"/auth/f",
    ] {
        assert!(
            !contains(&capture, secret),
            "{:?} crossed the network in clear",
            String::from_utf8_lossy(secret)
        );
    }

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
    let ca_pem = std::fs::read(&pki.ca_crt).expect("ca");
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
