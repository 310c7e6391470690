//! Restarts nobody notices: each daemon's local API socket is held across restarts (systemd
//! socket activation, as `packaging/systemd/*.socket` sets up; here the test holds it), so a
//! client that keeps calling while the daemon is stopped (SIGTERM) and started again, over and
//! over, sees no call fail: calls made while no daemon runs wait in the socket's backlog for the
//! next one. The agent's client is `dfget --agent`; the snapshotter's is containerd itself (its
//! proxy-plugin client, which backs off after a failed dial when the socket goes away).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use damselfly_tests::activation::{HeldSocket, stop};
use damselfly_tests::containerd::{containerd_missing, start_containerd};
use damselfly_tests::harness::{Env, Proc, bin, free_port};

const RESTARTS: usize = 4;

/// What the client loop saw.
#[derive(Debug, Default)]
struct Calls {
    ok: usize,
    failed: Vec<String>,
    /// Calls begun while no daemon ran.
    while_down: usize,
    /// Whether a call is under way.
    in_flight: bool,
    /// Restarts that found a call waiting for the daemon.
    waited: usize,
}

/// Runs `call(i)` back to back until told to stop, counting results; `down` says whether the
/// daemon is stopped when a call begins.
fn client_loop<F, Fut>(
    down: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    calls: Arc<Mutex<Calls>>,
    call: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(usize) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    tokio::spawn(async move {
        let mut i = 0;
        while !done.load(Ordering::SeqCst) {
            let was_down = down.load(Ordering::SeqCst);
            if was_down {
                calls.lock().expect("calls").while_down += 1;
            }
            calls.lock().expect("calls").in_flight = true;
            let r = tokio::time::timeout(Duration::from_secs(60), call(i)).await;
            let mut c = calls.lock().expect("calls");
            c.in_flight = false;
            match r {
                Ok(Ok(())) => c.ok += 1,
                Ok(Err(e)) => c
                    .failed
                    .push(format!("call {i} (begun while down: {was_down}): {e}")),
                Err(_) => c.failed.push(format!("call {i}: no answer within 60 s")),
            }
            i += 1;
        }
    })
}

/// Polls until `cond` holds, or panics naming `what`.
async fn until(what: &str, timeout: Duration, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "{what} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Restarts the daemon `RESTARTS` times while the client loop runs: each time after a call has
/// succeeded since the last start, stops it (SIGTERM), waits until a call is under way while it
/// is down (that call waits in the socket's backlog), starts the next. Returns the last daemon.
async fn restart_loop(
    mut daemon: Proc,
    start: impl Fn(usize) -> Proc,
    down: &AtomicBool,
    calls: &Mutex<Calls>,
) -> Proc {
    for i in 1..=RESTARTS {
        let ok_before = calls.lock().expect("calls").ok;
        until(
            "a call served since the last start",
            Duration::from_secs(60),
            || calls.lock().expect("calls").ok > ok_before,
        )
        .await;
        down.store(true, Ordering::SeqCst);
        stop(&mut daemon, Duration::from_secs(30)).await;
        // With the daemon gone, a call in flight waits for the next one.
        until(
            "a call in flight while the daemon is down",
            Duration::from_secs(60),
            || calls.lock().expect("calls").in_flight,
        )
        .await;
        daemon = start(i);
        calls.lock().expect("calls").waited += 1;
        down.store(false, Ordering::SeqCst);
    }
    daemon
}

/// Ends the client loop and checks what it saw.
async fn check(
    env: &Env,
    done: &AtomicBool,
    client: tokio::task::JoinHandle<()>,
    calls: &Mutex<Calls>,
) {
    done.store(true, Ordering::SeqCst);
    client.await.expect("client loop");
    let c = calls.lock().expect("calls");
    if !c.failed.is_empty() {
        env.dump_logs();
    }
    assert!(
        c.failed.is_empty(),
        "client calls failed across restarts: {c:?}"
    );
    assert_eq!(c.waited, RESTARTS, "{c:?}");
    assert!(c.ok > RESTARTS, "{c:?}");
    eprintln!(
        "{} calls across {RESTARTS} restarts, each restart with a call waiting, {} begun while down",
        c.ok, c.while_down
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarting_on_its_held_socket_fails_no_client_call() {
    let env = Env::new("restart-agent");
    let (_origin, origin) = env.origin(&[]).await;
    let hex = env.origin_blob(64 << 10);
    let url = format!("{origin}/files/blob-{hex}");
    let (_sn, grpc, _) = env.supernode("sn", &[]).await;
    let held = HeldSocket::bind(&env.path("agent.sock"));
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut args: Vec<String> = vec![
        "--supernode".into(),
        grpc,
        "--data-dir".into(),
        env.path("agent").to_string_lossy().into_owned(),
        "--agent-socket".into(),
        held.path.to_string_lossy().into_owned(),
        "--upload-addr".into(),
        "127.0.0.1:0".into(),
        "--metrics-addr".into(),
        metrics.clone(),
        "--proxy-addr".into(),
        format!("127.0.0.1:{}", free_port()),
        "--allow-address".into(),
        "127.0.0.0/8".into(),
    ];
    args.extend(damselfly_tests::cluster::flags("agent"));
    let start = |i: usize| held.spawn(&env, &format!("agent{i}"), "dfdaemon", &args);
    let agent = start(0);
    let up = format!("http://{metrics}/healthz");
    let deadline = Instant::now() + Duration::from_secs(30);
    while reqwest::get(&up).await.is_err() {
        if Instant::now() > deadline {
            env.dump_logs();
            panic!("the agent did not start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (down, done) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let calls = Arc::new(Mutex::new(Calls::default()));
    let (socket, out_dir) = (held.path.clone(), env.path("out"));
    std::fs::create_dir_all(&out_dir).expect("out dir");
    let client = client_loop(down.clone(), done.clone(), calls.clone(), move |i| {
        let (socket, url, out) = (socket.clone(), url.clone(), out_dir.join(format!("f{i}")));
        async move {
            let o = tokio::process::Command::new(bin("dfget"))
                .arg(&url)
                .arg("-O")
                .arg(&out)
                .arg("--agent")
                .arg(&socket)
                .arg("-q")
                .output()
                .await
                .map_err(|e| e.to_string())?;
            let got = std::fs::read(&out).map(|b| b.len()).unwrap_or(0);
            let _ = std::fs::remove_file(&out);
            if o.status.success() && got == 64 << 10 {
                Ok(())
            } else {
                Err(format!(
                    "dfget {}, {got} bytes: {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr)
                ))
            }
        }
    });
    let _agent = restart_loop(agent, start, &down, &calls).await;
    check(&env, &done, client, &calls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshotter_restarting_on_its_held_socket_fails_no_containerd_call() {
    if let Some(why) = containerd_missing() {
        damselfly_tests::harness::skip(
            "a_snapshotter_restarting_on_its_held_socket_fails_no_containerd_call",
            &why,
        );
        return;
    }
    let env = Env::new("restart-snapshotter");
    let held = HeldSocket::bind(&env.path("snapshotter.sock"));
    let args: Vec<String> = vec![
        "--root".into(),
        env.path("snapshotter").to_string_lossy().into_owned(),
        "--socket".into(),
        held.path.to_string_lossy().into_owned(),
        "--metrics-addr".into(),
        format!("127.0.0.1:{}", free_port()),
        "--lazy".into(),
        "false".into(),
    ];
    let start = |i: usize| held.spawn(&env, &format!("snapshotter{i}"), "dfsnapshotter", &args);
    let snapshotter = start(0);
    let containerd = Arc::new(start_containerd(&env, Some(&held.path)).await);

    let (down, done) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let calls = Arc::new(Mutex::new(Calls::default()));
    let ctd = containerd.clone();
    let client = client_loop(down.clone(), done.clone(), calls.clone(), move |i| {
        let ctd = ctd.clone();
        async move {
            let key = format!("restart-{i}");
            for verb in ["prepare", "rm"] {
                let (code, out) = ctd
                    .ctr(&["snapshots", "--snapshotter", "damselfly", verb, &key])
                    .await;
                if code != 0 {
                    return Err(format!("ctr snapshots {verb} {key}: {out}"));
                }
            }
            Ok(())
        }
    });
    let _snapshotter = restart_loop(snapshotter, start, &down, &calls).await;
    check(&env, &done, client, &calls).await;
}
