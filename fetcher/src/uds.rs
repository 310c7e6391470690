//! Unix sockets for local APIs (the agent's, the snapshotter's): root-owned, mode 0660.

use std::path::Path;

use tokio::net::UnixListener;

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
