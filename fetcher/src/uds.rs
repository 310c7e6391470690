//! Unix sockets for local APIs (the agent's, the snapshotter's, the FUSE manager's, the CRI
//! proxy's): root-owned, mode 0660, served by one loop ([`serve`]).

use std::path::Path;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::Shutdown;

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

/// Serves `router` (a tonic server and its services) on the Unix socket `path` ([`bind`]) until
/// `shutdown`, then removes the socket. The task ends with the server's error, if it failed,
/// after logging it as `api`'s.
pub fn serve(
    path: &Path,
    router: tonic::transport::server::Router,
    shutdown: Shutdown,
    api: &'static str,
) -> Result<Served, (&'static str, std::io::Error)> {
    let listener = bind(path)?;
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
        let _ = std::fs::remove_file(&socket);
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
