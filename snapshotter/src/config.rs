//! `dfsnapshotter.toml`: every flag of the service has a key (the flag's name with `_` for `-`),
//! every key is optional, unknown keys are rejected with their name, and a flag given on the
//! command line wins over the file (a key replaces the flag's default only). The sample in
//! `packaging/dfsnapshotter.toml` holds every key at its default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches};
use serde::Deserialize;

use crate::cli::Args;
use crate::error::{Error, Result};

/// The keys of `dfsnapshotter.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotterConfig {
    pub root: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub metrics_addr: Option<SocketAddr>,
    pub log_json: Option<bool>,
    pub lazy: Option<bool>,
    pub background_fetch: Option<bool>,
    pub cache_mib: Option<usize>,
    pub fuse_passthrough: Option<bool>,
    pub prefetch: Option<bool>,
    /// A duration (`10s`, `500ms`).
    pub start_window: Option<String>,
    pub agent_socket: Option<PathBuf>,
    pub image_service_socket: Option<PathBuf>,
    pub containerd_socket: Option<PathBuf>,
    pub plain_http: Option<Vec<String>>,
    pub hosts_dir: Option<PathBuf>,
}

impl SnapshotterConfig {
    /// Reads `path`; a bad key or value names the file and the key.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Invalid(format!("cannot read config {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| Error::Invalid(format!("config {}: {e}", path.display())))
    }

    /// Sets in `args` what this file gives, except where `m` says the flag was on the command
    /// line.
    pub fn apply(self, args: &mut Args, m: &ArgMatches) -> Result<()> {
        let flagged = |id: &str| m.value_source(id) == Some(ValueSource::CommandLine);
        macro_rules! over {
            ($($field:ident),*) => {
                $( if let Some(v) = self.$field && !flagged(stringify!($field)) { args.$field = v; } )*
            };
        }
        over!(
            root,
            socket,
            metrics_addr,
            log_json,
            lazy,
            background_fetch,
            cache_mib,
            fuse_passthrough,
            prefetch,
            agent_socket,
            containerd_socket
        );
        if let Some(v) = self.image_service_socket
            && !flagged("image_service_socket")
        {
            args.image_service_socket = Some(v);
        }
        if let Some(v) = self.start_window
            && !flagged("start_window")
        {
            args.start_window = fetcher::cli::parse_duration(&v)
                .map_err(|e| Error::Invalid(format!("config start_window: {e}")))?;
        }
        if let Some(v) = self.plain_http
            && !flagged("plain_http")
        {
            args.registry.plain_http = v;
        }
        if let Some(v) = self.hosts_dir
            && !flagged("hosts_dir")
        {
            args.registry.hosts_dir = v;
        }
        Ok(())
    }
}

/// The command line, over `--config`'s file when one is given.
pub fn parse() -> Result<Args> {
    parse_from(std::env::args_os())
}

/// [`parse`] of `argv` (clap exits on `--help` and on bad flags, as it does without a file).
pub fn parse_from<I, T>(argv: I) -> Result<Args>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let m = Args::command().get_matches_from(argv);
    let mut args = Args::from_arg_matches(&m).map_err(|e| Error::Invalid(e.to_string()))?;
    if let Some(path) = args.config.clone() {
        SnapshotterConfig::load(&path)?.apply(&mut args, &m)?;
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = include_str!("../../packaging/dfsnapshotter.toml");

    fn args(argv: &[&str]) -> (Args, ArgMatches) {
        let m = Args::command().try_get_matches_from(argv).expect("flags");
        (Args::from_arg_matches(&m).expect("args"), m)
    }

    #[test]
    fn the_sample_holds_every_default() {
        let cfg: SnapshotterConfig = toml::from_str(SAMPLE).expect("the sample parses");
        let (defaults, _) = args(&["dfsnapshotter"]);
        let (mut from_file, m) = args(&["dfsnapshotter"]);
        cfg.apply(&mut from_file, &m).expect("apply");
        assert_eq!(format!("{from_file:?}"), format!("{defaults:?}"));
        // Every flag of the service is a key of the sample.
        for a in Args::command().get_arguments() {
            let id = a.get_id().as_str();
            if matches!(id, "config" | "help" | "version" | "registry") {
                continue;
            }
            assert!(
                SAMPLE.contains(&format!("\n{id} =")) || SAMPLE.contains(&format!("\n# {id} =")),
                "packaging/dfsnapshotter.toml has no key {id}"
            );
        }
    }

    #[test]
    fn flags_win_and_typos_are_named() {
        let cfg: SnapshotterConfig =
            toml::from_str("cache_mib = 64\nprefetch = false\nstart_window = \"2s\"").expect("cfg");
        let (mut a, m) = args(&["dfsnapshotter", "--cache-mib", "32"]);
        cfg.apply(&mut a, &m).expect("apply");
        assert_eq!(a.cache_mib, 32, "the flag wins");
        assert!(!a.prefetch, "the file replaces a default");
        assert_eq!(a.start_window, std::time::Duration::from_secs(2));
        let err = toml::from_str::<SnapshotterConfig>("cache_mb = 1").expect_err("typo");
        assert!(err.to_string().contains("cache_mb"), "{err}");
        let cfg: SnapshotterConfig = toml::from_str("start_window = \"soon\"").expect("cfg");
        let (mut a, m) = args(&["dfsnapshotter"]);
        let err = cfg.apply(&mut a, &m).expect_err("bad duration");
        assert!(err.to_string().contains("start_window"), "{err}");
    }

    #[test]
    fn address_is_the_socket() {
        let (a, _) = args(&["dfsnapshotter", "--address", "/run/x.sock"]);
        assert_eq!(a.socket, PathBuf::from("/run/x.sock"));
    }
}
