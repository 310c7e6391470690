//! What a test host exposes: which files another user can read, which secrets the daemons left
//! in files, how much memory a process took at its peak.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::harness::Env;

impl Env {
    /// Asserts that no file the test's processes wrote (logs, `meta.json`, piece logs, indexes,
    /// configs; not piece `data` and not the origin's `www`) holds any of `secrets`.
    pub fn assert_no_secret(&self, secrets: &[&str]) {
        let keep = |p: &Path| {
            !p.ends_with("data")
                && !p
                    .strip_prefix(self.dir.path())
                    .is_ok_and(|r| r.starts_with("www"))
        };
        let files = files_under(self.dir.path(), usize::MAX, &keep);
        assert!(files.len() > 3, "only {files:?} to look at");
        for f in files {
            let Ok(bytes) = std::fs::read(&f) else {
                continue;
            };
            for s in secrets {
                assert!(
                    !bytes.windows(s.len()).any(|w| w == s.as_bytes()),
                    "{s:?} is in {}",
                    f.display()
                );
            }
        }
    }
}

/// Whether user `nobody` (65534, no groups) can read `path`.
pub fn readable_by_nobody(path: &Path) -> bool {
    std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(["head", "-c", "1"])
        .arg(path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run setpriv (util-linux)")
        .success()
}

/// Regular files under `dir` (depth first, at most `max`) whose path satisfies `pick`.
pub fn files_under(dir: &Path, max: usize, pick: &dyn Fn(&Path) -> bool) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(t) if t.is_file() && pick(&p) => {
                    found.push(p);
                    if found.len() >= max {
                        return found;
                    }
                }
                _ => {}
            }
        }
    }
    found
}

/// Asserts that the daemons' private roots are 0700 and that user `nobody` reads none of
/// `files` (each found as root beforehand), while the way to them is open and a world-readable
/// file beside them is readable (so the check can fail).
pub fn assert_private(env: &Env, roots: &[PathBuf], files: &[PathBuf]) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("open the test dir");
    let probe = env.path("world-readable");
    std::fs::write(&probe, "x").expect("probe");
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    assert!(
        readable_by_nobody(&probe),
        "nobody cannot read a world-readable file: the check would prove nothing"
    );
    for r in roots {
        let mode = std::fs::metadata(r).expect("root").permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700, "{} is {mode:o}", r.display());
    }
    assert!(!files.is_empty(), "no files to check");
    for f in files {
        assert!(!readable_by_nobody(f), "nobody reads {}", f.display());
    }
}

/// Peak resident memory of a process (`VmHWM`, bytes).
pub fn vm_hwm(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM")
        * 1024
}
