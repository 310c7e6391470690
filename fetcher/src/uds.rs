//! Unix sockets for local APIs (the agent's, the snapshotter's, the FUSE manager's, the CRI
//! proxy's): root-owned, mode 0660, served by one loop ([`serve`]).
//!
//! A socket can also be inherited (systemd socket activation: `LISTEN_FDS`/`LISTEN_PID`, as
//! `packaging/systemd/*.socket` set up): the listening socket then outlives the daemon, so while
//! the daemon restarts, clients' connections wait in its backlog instead of failing (containerd
//! backs off for a while after a failed dial of a proxy plugin). An inherited socket is taken by
//! the path it is bound to, and left in place at shutdown.

use std::path::Path;
use std::sync::Mutex;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::Shutdown;

/// Listening Unix sockets this process inherited, not yet taken ([`inherited`]).
static INHERITED: Mutex<Option<Vec<std::os::unix::net::UnixListener>>> = Mutex::new(None);

/// The inherited listening socket bound to `path`, if the process was started with one
/// (`LISTEN_FDS` for this pid). Each is handed out once; they are closed on exec, so processes
/// this one starts do not hold them.
pub fn inherited(path: &Path) -> std::io::Result<Option<std::os::unix::net::UnixListener>> {
    let mut guard = INHERITED.lock().unwrap_or_else(|p| p.into_inner());
    let all = match &mut *guard {
        Some(all) => all,
        None => guard.insert(take_inherited()?),
    };
    let found = all.iter().position(|l| {
        l.local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(Path::to_path_buf))
            .is_some_and(|p| p == path)
    });
    Ok(found.map(|i| all.swap_remove(i)))
}

/// Every listening Unix socket passed by the service manager.
fn take_inherited() -> std::io::Result<Vec<std::os::unix::net::UnixListener>> {
    let mut fds = listenfd::ListenFd::from_env();
    let mut out = Vec::new();
    for i in 0..fds.len() {
        // Other kinds of sockets (none are configured today) are left alone.
        if let Ok(Some(l)) = fds.take_unix_listener(i) {
            rustix::io::fcntl_setfd(&l, rustix::io::FdFlags::CLOEXEC)?;
            out.push(l);
        }
    }
    Ok(out)
}

/// A listening socket for `path`: the inherited one ([`inherited`]), else [`bind`]; and whether
/// it was inherited.
pub fn listen(path: &Path) -> Result<(UnixListener, bool), (&'static str, std::io::Error)> {
    match inherited(path).map_err(|e| ("cannot take the inherited socket", e))? {
        Some(l) => {
            l.set_nonblocking(true)
                .map_err(|e| ("cannot use the inherited socket", e))?;
            let l =
                UnixListener::from_std(l).map_err(|e| ("cannot use the inherited socket", e))?;
            Ok((l, true))
        }
        None => Ok((bind(path)?, false)),
    }
}

/// Binds a Unix socket at `path`: creates its directory, replaces a stale socket left by a
/// previous run, sets mode 0660. On failure, says which step failed.
pub fn bind(path: &Path) -> Result<UnixListener, (&'static str, std::io::Error)> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| ("cannot create the socket directory of", e))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(("cannot remove stale socket", e)),
    }
    let listener = UnixListener::bind(path).map_err(|e| ("cannot bind socket", e))?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660));
    Ok(listener)
}

/// A local API being served: ends when the server stops, with its error if it failed.
pub type Served = tokio::task::JoinHandle<Result<(), tonic::transport::Error>>;

/// Serves `router` (a tonic server and its services) on the Unix socket `path` ([`listen`]:
/// inherited, or bound) until `shutdown`, then removes the socket unless it was inherited. The
/// task ends with the server's error, if it failed, after logging it as `api`'s.
pub fn serve(
    path: &Path,
    router: tonic::transport::server::Router,
    shutdown: Shutdown,
    api: &'static str,
) -> Result<Served, (&'static str, std::io::Error)> {
    let (listener, inherited) = listen(path)?;
    if inherited {
        tracing::info!(socket = %path.display(), api, "serving an inherited socket");
    }
    let socket = path.to_path_buf();
    Ok(tokio::spawn(async move {
        let r = router
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
                shutdown.wait().await
            })
            .await;
        if let Err(e) = &r {
            tracing::error!(error = %e, api, "local API failed");
        }
        if !inherited {
            let _ = std::fs::remove_file(&socket);
        }
        r
    }))
}

fn endpoint() -> tonic::transport::Endpoint {
    tonic::transport::Endpoint::from_static("http://local.socket")
        .connect_timeout(std::time::Duration::from_secs(3))
}

/// Connects to the Unix socket `path` (for a channel's connector).
fn connector(
    path: &Path,
) -> impl tower::Service<
    http::Uri,
    Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    let p = path.to_path_buf();
    tower::service_fn(move |_: http::Uri| {
        let p = p.clone();
        async move {
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                tokio::net::UnixStream::connect(p).await?,
            ))
        }
    })
}

/// A gRPC channel to a server on the Unix socket `path` (connects now, reconnects as needed).
pub async fn channel(path: &Path) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    endpoint().connect_with_connector(connector(path)).await
}

/// Like [`channel`], connecting on first use (the server may start later).
pub fn lazy_channel(path: &Path) -> tonic::transport::Channel {
    endpoint().connect_with_connector_lazy(connector(path))
}
