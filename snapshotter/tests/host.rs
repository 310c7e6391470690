//! Host hardening of the snapshot tree (review finding 6): containerd unpacks layers into
//! snapshot directories as root, setuid binaries included; no other local user may reach them.
//! Run as root: the binaries are started as user `nobody` with `setpriv` (util-linux).

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use snapshotter::metastore::Kind;
use snapshotter::snapshots::Snapshots;

/// Runs `program` from a shell of user `nobody`. (Not `setpriv ... program` itself: setpriv
/// looks the program up while it still holds root's capabilities, which a real user never has.)
fn as_nobody(program: &Path) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(["/bin/sh", "-c", "exec \"$0\""])
        .arg(program)
        .output()
        .expect("run setpriv (util-linux)")
}

#[tokio::test]
async fn a_setuid_binary_in_a_snapshot_cannot_be_run_by_another_user() {
    if let Some(why) = common::skip_reason() {
        eprintln!("SKIP a_setuid_binary_in_a_snapshot_cannot_be_run_by_another_user: {why}");
        return;
    }
    let id = Path::new("/usr/bin/id");
    let dir = tempfile::tempdir().expect("tempdir");
    // Everyone may pass through the test's own directory: only the snapshotter's modes decide.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let control = dir.path().join("id-control");
    std::fs::copy(id, &control).expect("copy id");
    let out = as_nobody(&control);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("uid=65534"),
        "the control binary does not run as nobody: {out:?}"
    );

    let snapshots = Snapshots::open(&dir.path().join("root")).expect("open");
    let mounts = snapshots
        .create(Kind::Active, "layer-1", "", BTreeMap::new())
        .await
        .expect("prepare");
    let fs = Path::new(&mounts[0].source).to_path_buf();
    assert!(fs.starts_with(dir.path().join("root")), "{mounts:?}");
    // What containerd's unpack would write: a setuid-root binary.
    let pwn = fs.join("pwn");
    std::fs::copy(id, &pwn).expect("copy into the snapshot");
    std::fs::set_permissions(&pwn, std::fs::Permissions::from_mode(0o4755)).expect("setuid");
    let out = as_nobody(&pwn);
    assert!(
        !out.status.success(),
        "nobody ran a setuid binary from a snapshot: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{out:?}"
    );
    // Root (containerd, runc) still can.
    let out = Command::new(&pwn).output().expect("run as root");
    assert!(out.status.success(), "{out:?}");
}
