//! Shared by the FUSE test files: whether this machine can mount FUSE layers.

use std::path::Path;

/// Why this machine cannot run the FUSE tests (root and /dev/fuse are needed); under `CI=true`
/// a missing capability is a failure, not a skip.
pub fn skip_reason() -> Option<String> {
    let why = if !rustix::process::geteuid().is_root() {
        "needs root"
    } else if !Path::new("/dev/fuse").exists() {
        "no /dev/fuse"
    } else {
        return None;
    };
    assert!(
        std::env::var_os("CI").is_none_or(|v| v != "true"),
        "CI=true, but {why}"
    );
    Some(why.into())
}
