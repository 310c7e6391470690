//! Directories only their owner can enter: piece stores, the supernode's cache and the
//! snapshotter's root hold private layers (and, under the snapshotter, setuid binaries of
//! unpacked layers), so their roots are 0700 whatever the umask, and an existing root is
//! tightened when a daemon opens it. Files inside are created 0600 besides ([`FILE_MODE`]).

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// Mode of the data files daemons create in their stores.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` (and missing parents, which keep the umask's mode) and makes it 0700.
pub fn dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o7777;
    if mode != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_and_existing_roots_end_0700() {
        let t = tempfile::tempdir().expect("tmp");
        let fresh = t.path().join("a/b");
        dir(&fresh).expect("create");
        let loose = t.path().join("loose");
        std::fs::create_dir(&loose).expect("mkdir");
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        dir(&loose).expect("tighten");
        for d in [&fresh, &loose] {
            let mode = std::fs::metadata(d).expect("meta").permissions().mode() & 0o7777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
    }
}
