//! Trust on the network, tried as an attacker would (findings 1–4 and 10 of
//! `../shared/SECURITY-REVIEW.md`) against a private HTTPS registry with htpasswd, a supernode and
//! two agents, each attack beside the legitimate path that keeps working:
//! - a seed from a lying origin (short body) leaves no piece behind, and alice's pull is intact;
//! - piece reads without a ticket (401), with a forged one, or with alice's ticket from another
//!   address (403), from the supernode and from an agent; alice's ticket works;
//! - a content-keyed registration through a mimicking origin, or without credentials, gets no
//!   task; the layer index needs an index ticket, and the admin API its token;
//! - one hostile reporter framing an honest agent isolates nobody.

use std::net::IpAddr;
use std::time::Duration;

use base64::Engine;
use damselfly_tests::cluster::ca_certificate as cluster_ca;
use damselfly_tests::harness::{Env, get_text, metric, random_file};
use damselfly_tests::pki::ensure_hosts_entry;
use damselfly_tests::registry::{CREDS, PrivateRegistry, private_registry, skopeo, tools_missing};
use proto::scheduler::{
    self as pb, PeerMessage, SchedulerMessage, peer_message, scheduler_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn skip_reason() -> Option<String> {
    tools_missing().or_else(|| ensure_hosts_entry().err())
}

fn basic(creds: &str) -> pb::Header {
    pb::Header {
        name: "Authorization".into(),
        value: format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(creds)
        ),
    }
}

/// A scheduler session of a hand-made peer: its sender and the supernode's first answer.
struct Session {
    tx: mpsc::Sender<PeerMessage>,
    inbound: tonic::Streaming<SchedulerMessage>,
    first: Option<scheduler_message::Msg>,
}

async fn register(grpc: &str, url: &str, digest: &str, headers: Vec<pb::Header>) -> Session {
    // The attacker holds a cluster certificate: membership alone opens nothing.
    let mut client = damselfly_tests::cluster::scheduler(grpc).await;
    let (tx, rx) = mpsc::channel(64);
    let reg = pb::Register {
        url: url.to_owned(),
        task_id: fetcher::task_id::content_task_id(digest).expect("digest"),
        headers,
        peer_id: format!("attacker-{:08x}", rand::random::<u32>()),
        // A new host id every session: the supernode counts hosts by their connection.
        host_id: format!("host-{:08x}", rand::random::<u32>()),
        upload_addr: "127.0.0.1:1".into(),
        content_key: digest.to_owned(),
        ..Default::default()
    };
    tx.send(PeerMessage {
        msg: Some(peer_message::Msg::Register(reg)),
    })
    .await
    .expect("send register");
    let mut inbound = client
        .download(ReceiverStream::new(rx))
        .await
        .expect("download stream")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(60), inbound.message())
        .await
        .expect("an answer to Register")
        .ok()
        .flatten()
        .and_then(|m| m.msg);
    Session { tx, inbound, first }
}

fn refused(s: &Session) -> String {
    match &s.first {
        Some(scheduler_message::Msg::Error(e)) => format!("{} (HTTP {})", e.message, e.http_status),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn task_info(s: &Session) -> pb::TaskInfo {
    match &s.first {
        Some(scheduler_message::Msg::TaskInfo(i)) => i.clone(),
        other => panic!("expected TaskInfo, got {other:?}"),
    }
}

/// Reads `/pieces/<vid>/0` at `base` with `ticket`, from `local` (a loopback address).
async fn piece(base: &str, vid: &str, ticket: Option<&str>, local: &str) -> (u16, Vec<u8>) {
    let ip: IpAddr = local.parse().expect("ip");
    let client = reqwest::Client::builder()
        .local_address(ip)
        .no_proxy()
        .add_root_certificate(cluster_ca())
        .build()
        .expect("client");
    let mut req = client.get(format!("{base}/pieces/{vid}/0"));
    if let Some(t) = ticket {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.expect("piece request");
    let code = r.status().as_u16();
    (code, r.bytes().await.expect("body").to_vec())
}

/// Alice's skopeo pull of the test image through the agent whose proxy is at `proxy`.
async fn pull(proxy: &str, dest: &std::path::Path) -> (i32, String) {
    let src = format!("docker://{proxy}/project/app:v1");
    let dest = format!("oci:{}:app", dest.display());
    skopeo(
        &[
            "--insecure-policy",
            "copy",
            "--src-tls-verify=false",
            "--src-creds",
            CREDS,
            &src,
            &dest,
        ],
        &[],
    )
    .await
}

/// The agent's upload address, from its "peer started" log line.
fn upload_addr(log: &str) -> String {
    let at = log
        .find("upload_addr=")
        .expect("upload_addr in the agent log")
        + 12;
    log[at..]
        .split_whitespace()
        .next()
        .expect("address")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_lying_and_framing_parties_get_nothing_while_alice_pulls() {
    if let Some(why) = skip_reason() {
        damselfly_tests::harness::skip(
            "anonymous_lying_and_framing_parties_get_nothing_while_alice_pulls",
            &why,
        );
        return;
    }
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let env = Env::new("trust");
    let PrivateRegistry {
        addr: registry,
        layers,
        ca,
        grpc,
        http,
        supernode: sn,
        proc: _registry,
        ..
    } = private_registry(&env, 6 << 20).await;
    let (_origin, origin) = env.origin(&[]).await;
    let blob_url = |d: &str| format!("https://{registry}/v2/project/app/blobs/{d}");
    let big = layers[1].clone();
    let big_hex = big.trim_start_matches("sha256:").to_owned();

    // Poisoning: before anyone pulled the big layer, a lying origin announces its length and
    // sends half; the failed seed must leave nothing behind.
    random_file(&env.path(&format!("www/blob-{big_hex}")), 6 << 20);
    let liar = register(
        &grpc,
        &format!("{origin}/short/blob-{big_hex}"),
        &big,
        vec![],
    )
    .await;
    let mut failed = matches!(liar.first, Some(scheduler_message::Msg::Error(_)));
    let mut liar = liar;
    if !failed {
        liar.tx
            .send(PeerMessage {
                msg: Some(peer_message::Msg::Have(pb::Have { pieces: vec![] })),
            })
            .await
            .expect("have");
    }
    while !failed {
        match tokio::time::timeout(Duration::from_secs(30), liar.inbound.message()).await {
            Ok(Ok(Some(m))) => failed = matches!(m.msg, Some(scheduler_message::Msg::Error(_))),
            other => panic!("the lying seed did not fail: {other:?}"),
        }
    }
    drop(liar);
    let mut kept = 0u64;
    for d in std::fs::read_dir(env.path("sn/tasks"))
        .expect("tasks dir")
        .flatten()
    {
        kept += std::fs::metadata(d.path().join("pieces.log"))
            .map(|m| m.len())
            .unwrap_or(0);
    }
    assert_eq!(kept, 0, "the failed seed kept pieces");

    // Alice pulls through agent A (mirror mode): every layer is seeded and verified.
    let mirror = format!("https://{registry}");
    let (a_proc, a) = env
        .dfdaemon(
            "host-a",
            &grpc,
            &["--registry-mirror", &mirror, "--upstream-ca", &ca],
        )
        .await;
    let (_b_proc, b) = env
        .dfdaemon(
            "host-b",
            &grpc,
            &["--registry-mirror", &mirror, "--upstream-ca", &ca],
        )
        .await;
    let (code, out) = pull(&a.proxy, &env.path("alice")).await;
    if code != 0 {
        env.dump_logs();
    }
    assert_eq!(code, 0, "alice's pull (digests verified by skopeo): {out}");

    // Alice's own session: a ticket for the big layer's version, bound to 127.0.0.1.
    let alice = register(&grpc, &blob_url(&big), &big, vec![basic(CREDS)]).await;
    let info = task_info(&alice);
    let vid = info.version_id.clone();
    assert_eq!(info.ticket_key.len(), 32);
    let agent_a = format!("https://{}", upload_addr(&a_proc.output()));
    for base in [http.as_str(), agent_a.as_str()] {
        let (code, body) = piece(base, &vid, None, "127.0.0.1").await;
        assert_eq!(code, 401, "anonymous piece read from {base}");
        assert!(
            !body.windows(4).any(|w| w == b"\x1f\x8b\x08\x00"),
            "content leaked"
        );
        let forged = fetcher::ticket::Issuer::generate()
            .expect("key")
            .issue(&fetcher::ticket::Claims {
                scope: fetcher::ticket::Scope::Pieces,
                version_id: vid.clone(),
                holder: "127.0.0.1".parse().expect("ip"),
                expires: fetcher::ticket::now() + 600,
            })
            .expect("forged ticket");
        assert_eq!(
            piece(base, &vid, Some(&forged), "127.0.0.1").await.0,
            403,
            "forged ticket at {base}"
        );
        assert_eq!(
            piece(base, &vid, Some(&info.ticket), "127.0.0.2").await.0,
            403,
            "alice's ticket used from another address at {base}"
        );
        let (code, bytes) = piece(base, &vid, Some(&info.ticket), "127.0.0.1").await;
        assert_eq!(code, 200, "alice's ticket at {base}");
        assert_eq!(bytes.len(), info.piece_size as usize);
    }
    drop(alice);

    // A mimicking origin (same path shape, same length, other bytes) and a registration
    // without credentials get no task.
    let mimic = register(
        &grpc,
        &format!("{origin}/v2/project/app/blobs/{big}"),
        &big,
        vec![],
    )
    .await;
    let why = refused(&mimic);
    assert!(why.contains("does not serve this content"), "{why}");
    let anonymous = register(&grpc, &blob_url(&big), &big, vec![]).await;
    assert!(
        refused(&anonymous).contains("401"),
        "{}",
        refused(&anonymous)
    );
    let wrong = register(&grpc, &blob_url(&big), &big, vec![basic("alice:guess")]).await;
    assert!(refused(&wrong).contains("401"), "{}", refused(&wrong));

    // The layer index: no ticket → 401, LayerIndex through a mimic → refused, the admin API
    // without its token → 401; alice's agent gets the index.
    let client = damselfly_tests::cluster::http_client();
    let r = client
        .get(format!("{http}/api/v1/index/{big}"))
        .send()
        .await
        .expect("index");
    assert_eq!(r.status().as_u16(), 401);
    let mut sched = damselfly_tests::cluster::scheduler(&grpc).await;
    let mimic_index = sched
        .layer_index(pb::LayerIndexRequest {
            url: format!("{origin}/v2/project/app/blobs/{big}"),
            headers: vec![],
            digest: big.clone(),
        })
        .await;
    assert!(mimic_index.is_err(), "the mimic got {mimic_index:?}");
    // The admin API: disabled without a configured token; with one, only that token opens it.
    let post = |url: String, token: Option<&'static str>| {
        let client = client.clone();
        let body = serde_json::json!({"url": format!("{origin}/files/x"), "digest": big});
        async move {
            let mut r = client
                .post(url)
                .header("content-type", "application/json")
                .body(body.to_string());
            if let Some(t) = token {
                r = r.bearer_auth(t);
            }
            let r = r.send().await.expect("admin request");
            (r.status().as_u16(), r.text().await.unwrap_or_default())
        }
    };
    for path in ["/api/v1/index", "/api/v1/preheat"] {
        let (code, body) = post(format!("{http}{path}"), None).await;
        assert_eq!(
            code, 403,
            "{path} on a supernode without admin token: {body}"
        );
        assert!(body.contains("admin_token_file"), "{body}");
    }
    std::fs::write(env.path("admin-token"), "s3cret-admin-token-0123456789\n").expect("token");
    random_file(&env.path("www/x"), 1000);
    let token_file = env.path("admin-token").to_string_lossy().into_owned();
    // sn2 has the default origin policy: nothing on loopback, except under an allowed prefix.
    let origin_port = origin.rsplit(':').next().expect("port").to_owned();
    let redirect_prefix = format!("http://127.0.0.1:{origin_port}/redirect/");
    let (sn2, grpc2, http2) = env
        .strict_supernode(
            "sn2",
            &[
                "--admin-token-file",
                &token_file,
                "--allow-origin",
                &redirect_prefix,
            ],
        )
        .await;
    let preheat = format!("{http2}/api/v1/preheat");
    assert_eq!(post(preheat.clone(), None).await.0, 401);
    assert_eq!(
        post(preheat.clone(), Some("guess-guess-guess-guess"))
            .await
            .0,
        403
    );
    let preheat_url = |url: String| {
        let (client, preheat) = (client.clone(), preheat.clone());
        async move {
            let r = client
                .post(preheat)
                .bearer_auth("s3cret-admin-token-0123456789")
                .header("content-type", "application/json")
                .body(serde_json::json!({ "url": url }).to_string())
                .send()
                .await
                .expect("preheat");
            (r.status().as_u16(), r.text().await.unwrap_or_default())
        }
    };

    // SSRF: the admin token opens the API, not the network. A loopback origin is refused before
    // any request; an allowed prefix's redirect to a path outside it is refused at the hop.
    let stats = || async { get_text(&format!("{origin}/_stats")).await };
    let before = stats().await;
    let (code, body) = preheat_url(format!("{origin}/files/x")).await;
    assert_eq!(code, 400, "preheat of a loopback origin: {body}");
    assert!(body.contains("origin policy"), "{body}");
    let (code, body) = preheat_url("http://169.254.169.254/latest/meta-data/".into()).await;
    assert_eq!(code, 400, "preheat of the metadata address: {body}");
    let (code, body) = preheat_url(format!("{origin}/redirect/x")).await;
    assert_eq!(code, 202, "preheat under the allowed prefix: {body}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !sn2.output().contains("seed failed") {
        assert!(
            std::time::Instant::now() < deadline,
            "the redirect was not refused: {}",
            sn2.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sn2.output().contains("origin policy"), "{}", sn2.output());
    assert_eq!(stats().await, before, "the origin served a refused request");
    // Token: only realms a registry under the policy announces; never the URL the caller names.
    for (g, registry_base) in [
        (&grpc2, origin.clone()),
        (&grpc, format!("https://{registry}")),
    ] {
        let mut c = damselfly_tests::cluster::scheduler(g).await;
        let r = c
            .token(pb::TokenRequest {
                url: format!("{origin}/files/x?service=metadata"),
                authorization: Some("Bearer attacker-chosen".into()),
                registry: registry_base,
            })
            .await;
        let status = r.expect_err("a token for an unannounced realm");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    }
    assert_eq!(stats().await, before, "the origin served a token SSRF");
    let index = damselfly_tests::harness::agent_layer_index(
        &b.socket,
        &blob_url(&big),
        &[("Authorization", &basic(CREDS).value)],
        &big,
    )
    .await
    .expect("alice's agent gets the index");
    let index = layerindex::LayerIndex::from_bytes(&index).expect("index parses");
    assert!(index.toc.entries.iter().any(|e| e.path == "big.bin"));

    // Framing: a hostile peer with alice's credentials reports agent A's pieces as corrupt on
    // every layer, claiming another host id each time; one host's word isolates nobody.
    let mut framed = 0;
    let mut framers = Vec::new();
    for d in &layers {
        let mut s = register(&grpc, &blob_url(d), d, vec![basic(CREDS)]).await;
        task_info(&s);
        s.tx.send(PeerMessage {
            msg: Some(peer_message::Msg::Have(pb::Have { pieces: vec![] })),
        })
        .await
        .expect("have");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while let Ok(Ok(Some(m))) = tokio::time::timeout_at(deadline, s.inbound.message()).await {
            if let Some(scheduler_message::Msg::Assign(asg)) = m.msg {
                let parent = asg.parent.unwrap_or_default();
                if parent.is_supernode {
                    continue;
                }
                framed += 1;
                let _ =
                    s.tx.send(PeerMessage {
                        msg: Some(peer_message::Msg::PieceResult(pb::PieceResult {
                            piece: asg.piece,
                            parent_id: parent.id,
                            success: false,
                            reason: pb::FailureReason::DigestMismatch as i32,
                            detail: "framed".into(),
                            ..Default::default()
                        })),
                    })
                    .await;
                break;
            }
        }
        framers.push(s);
    }
    assert!(
        framed >= 3,
        "agent A was assigned as a parent only {framed} times"
    );
    let reported = || async {
        let m = get_text(&format!("{http}/metrics")).await;
        let n = metric(
            &m,
            "damselfly_supernode_piece_failures_total",
            "reason=\"FAILURE_REASON_DIGEST_MISMATCH\"",
        );
        (n, m)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let m = loop {
        let (n, m) = reported().await;
        if n >= f64::from(framed) {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "reports not booked: {m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    drop(framers);
    assert_eq!(
        metric(&m, "damselfly_supernode_isolations_total", "scope=\"host\""),
        0.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "damselfly_supernode_isolations_total", "scope=\"task\""),
        0.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "damselfly_supernode_requests_refused_total",
            "api=\"pieces\""
        ) >= 3.0
    );

    // Host B still gets the image from the cluster, agent A included.
    let (code, out) = pull(&b.proxy, &env.path("bob-host")).await;
    assert_eq!(code, 0, "{out}");
    let from_peers = b
        .metric("damselfly_peer_download_bytes_total", "from=\"peer\"")
        .await;
    assert!(from_peers > 0.0, "host B took nothing from agent A");
    // A flood of claims (review finding 10): 16 sessions, each claiming a million pieces of a
    // two-piece layer, raise the supernode's VmHWM by less than 64 MiB (a set per session of
    // everything claimed would take ~160 MB), and it goes on serving.
    let before = damselfly_tests::host::vm_hwm(sn.pid());
    let mut floods = Vec::new();
    for _ in 0..16 {
        let mut s = register(&grpc, &blob_url(&big), &big, vec![basic(CREDS)]).await;
        task_info(&s);
        s.tx.send(PeerMessage {
            msg: Some(peer_message::Msg::Have(pb::Have {
                pieces: (0..1_000_000).collect(),
            })),
        })
        .await
        .expect("have");
        // Booked once the supernode answers after it.
        let next = tokio::time::timeout(Duration::from_secs(20), s.inbound.message()).await;
        assert!(
            matches!(next, Ok(Ok(Some(_)))),
            "no answer after Have: {next:?}"
        );
        floods.push(s);
    }
    let grew = damselfly_tests::host::vm_hwm(sn.pid()).saturating_sub(before);
    assert!(
        grew < 64 << 20,
        "claims raised the supernode's VmHWM by {grew} bytes"
    );
    drop(floods);
    assert!(get_text(&format!("{http}/healthz")).await.contains("ok"));

    // Alice's password went through agents and supernodes: it is in no log, store or index.
    let password = CREDS.split_once(':').map_or(CREDS, |(_, p)| p);
    let basic = base64::engine::general_purpose::STANDARD.encode(CREDS);
    env.assert_no_secret(&[password, &basic]);
}
