//! Socket activation as systemd does it, for tests: the test holds the listening Unix socket (as
//! a `.socket` unit does) and starts a daemon with it as its first passed descriptor (fd 3,
//! `LISTEN_FDS=1`, `LISTEN_PID` = the daemon's pid), so the socket outlives each daemon.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::{Env, Proc, bin};

/// A listening socket the test holds across daemon restarts.
pub struct HeldSocket {
    listener: std::os::unix::net::UnixListener,
    pub path: PathBuf,
}

impl HeldSocket {
    /// Binds `path` (replacing a stale socket), inheritable by the daemons the test starts.
    pub fn bind(path: &Path) -> Self {
        let _ = std::fs::remove_file(path);
        let listener = std::os::unix::net::UnixListener::bind(path).expect("bind held socket");
        // Kept open across exec, as the service manager passes it.
        rustix::io::fcntl_setfd(&listener, rustix::io::FdFlags::empty()).expect("inheritable");
        Self {
            listener,
            path: path.to_path_buf(),
        }
    }

    /// Starts workspace binary `bin_name` with `args`, passed this socket as systemd passes a
    /// socket unit's: bash (dash takes one-digit descriptors only) moves it to fd 3, sets `LISTEN_FDS=1` and `LISTEN_PID` to its own
    /// pid, and execs the daemon (which keeps that pid).
    pub fn spawn(&self, env: &Env, name: &str, bin_name: &str, args: &[String]) -> Proc {
        let fd = self.listener.as_raw_fd();
        let script =
            format!("exec 3<&{fd} {fd}<&- && LISTEN_FDS=1 LISTEN_PID=$$ exec \"$0\" \"$@\"");
        let mut sh_args = vec!["-c".to_owned(), script];
        sh_args.push(bin(bin_name).to_string_lossy().into_owned());
        sh_args.extend_from_slice(args);
        env.spawn_program(name, Path::new("/bin/bash"), &sh_args, &[])
    }
}

/// Sends SIGTERM to `p` (a graceful stop, as `systemctl restart` does) and waits until it exits.
pub async fn stop(p: &mut Proc, within: Duration) {
    let pid = p.pid().to_string();
    let _ = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await;
    match tokio::time::timeout(within, p.child.wait()).await {
        Ok(_) => {}
        Err(_) => panic!("{} did not stop within {within:?}:\n{}", p.name, p.output()),
    }
}
