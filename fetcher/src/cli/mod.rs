//! Command-line front ends: `dfget` and `dfdaemon`. The binaries are thin wrappers over these.

pub mod dfdaemon;
pub mod dfget;

use std::time::Duration;

use crate::error::{Error, Result};

/// Initialises `tracing` to stderr. `RUST_LOG` overrides `default_level`; `json` selects JSON lines.
pub fn init_logging(default_level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    use std::io::IsTerminal;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        let _ = b.json().try_init();
    } else {
        let _ = b.try_init();
    }
}

/// Malloc arenas a daemon keeps, at most (see [`init_daemon_allocator`]).
pub const MALLOC_ARENAS: i32 = 2;

/// Caps glibc's malloc arenas for a long-running daemon (unless `MALLOC_ARENA_MAX` says
/// otherwise). glibc gives each thread that allocates under contention an arena of its own, up
/// to 8 per core, and each keeps what it freed: a daemon whose piece I/O hops over the blocking
/// pool's threads kept a third of its peak RSS in freed memory of idle arenas (the registry
/// benchmark: 68-69 MiB peak per agent, 51 MiB with 2 arenas).
pub fn init_daemon_allocator() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator tunable; any value is valid, and glibc serialises
    // it against concurrent allocations.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
    }
}

/// Parses a duration: a number with `ms`, `s`, `m`, `h` or `d` (plain numbers are seconds).
pub fn parse_duration(spec: &str) -> Result<Duration> {
    let (num, unit) = crate::rate::split_unit(spec);
    let v: f64 = num.parse().map_err(|_| {
        Error::invalid("duration", format!("{spec:?}: expected e.g. 30s, 10m, 24h"))
    })?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "" | "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        "d" => v * 86400.0,
        other => {
            return Err(Error::invalid(
                "duration",
                format!("{spec:?}: unknown unit {other:?}"),
            ));
        }
    };
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `-H 'Name: value'`.
pub fn parse_header(spec: &str) -> Result<(String, String)> {
    let (name, value) = spec
        .split_once(':')
        .ok_or_else(|| Error::invalid("header", format!("{spec:?}: expected 'Name: value'")))?;
    let name = name.trim();
    if name.is_empty() || http::HeaderName::from_bytes(name.as_bytes()).is_err() {
        return Err(Error::invalid(
            "header",
            format!("{spec:?}: bad header name"),
        ));
    }
    Ok((name.to_owned(), value.trim().to_owned()))
}

/// Splits `a:1,b:2` lists of supernodes, trimming blanks.
pub fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Reads a TOML config file into `T`; unknown keys and bad values fail with the key's name.
pub fn load_toml<T: serde::de::DeserializeOwned + Default>(
    path: Option<&std::path::Path>,
) -> Result<T> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text =
        std::fs::read_to_string(path).map_err(|e| Error::io("cannot read config", path, e))?;
    toml::from_str(&text).map_err(|e| Error::invalid("config", format!("{}: {e}", path.display())))
}

/// Formats bytes for humans (`12.5 MiB`).
pub fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations_and_headers() {
        assert_eq!(parse_duration("10m").expect("ok"), Duration::from_secs(600));
        assert_eq!(
            parse_duration("1.5s").expect("ok"),
            Duration::from_millis(1500)
        );
        assert!(parse_duration("soon").is_err());
        assert_eq!(
            parse_header("Authorization: Bearer x").expect("ok"),
            ("Authorization".into(), "Bearer x".into())
        );
        assert!(parse_header("no colon").is_err());
        assert!(parse_header("bad name: v").is_err());
    }
}
