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
