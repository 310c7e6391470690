//! Bandwidth limits: parsing of rates (`40MiB`, `100Mbit`, `1048576`) and token buckets.
//!
//! A [`RateLimiter`] is cheap to clone; clones share one bucket, which is how a host-wide limit is
//! shared by every download (or every upload) of an agent. Buckets are `governor`'s GCRA limiters.

use std::num::NonZeroU32;
use std::sync::Arc;

use governor::{DefaultDirectRateLimiter, Quota};

use crate::error::{Error, Result};

/// Splits `"40MiB"` into `("40", "MiB")` (trimmed).
pub(crate) fn split_unit(spec: &str) -> (&str, &str) {
    let s = spec.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    (num, unit.trim())
}

/// Parses a rate in bytes per second: a number with an optional unit. Byte units: `B`, `K`/`KB`/`KiB`,
/// `M`/`MB`/`MiB`, `G`/`GB`/`GiB` (all binary multiples, as `dfget` always did); bit units: `bit`,
/// `Kbit`, `Mbit`, `Gbit` (decimal). `0` means unlimited.
pub fn parse_rate(spec: &str) -> Result<u64> {
    let (num, unit) = split_unit(spec);
    let value: f64 = num.parse().map_err(|_| {
        Error::invalid(
            "rate",
            format!("{spec:?}: expected e.g. 40MiB, 100Mbit or 1048576"),
        )
    })?;
    let mult: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "bit" => 1.0 / 8.0,
        "kbit" => 1e3 / 8.0,
        "mbit" => 1e6 / 8.0,
        "gbit" => 1e9 / 8.0,
        other => {
            return Err(Error::invalid(
                "rate",
                format!("{spec:?}: unknown unit {other:?}"),
            ));
        }
    };
    Ok((value * mult).round() as u64)
}

/// Parses a size (`100GiB`, `512MiB`, plain bytes) with the byte units of [`parse_rate`].
pub fn parse_size(spec: &str) -> Result<u64> {
    parse_rate(spec)
        .map_err(|_| Error::invalid("size", format!("{spec:?}: expected e.g. 100GiB or 1048576")))
}

/// A token bucket of bytes per second; unlimited when built with rate 0.
#[derive(Clone, Default)]
pub struct RateLimiter {
    inner: Option<Arc<Bucket>>,
}

struct Bucket {
    limiter: DefaultDirectRateLimiter,
    burst: u32,
    rate: u64,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Some(b) => write!(f, "RateLimiter({} B/s)", b.rate),
            None => write!(f, "RateLimiter(unlimited)"),
        }
    }
}

impl RateLimiter {
    /// A bucket refilling at `bytes_per_sec` (0: unlimited). The burst is an eighth of a second.
    pub fn new(bytes_per_sec: u64) -> Self {
        let Some(rate) = NonZeroU32::new(bytes_per_sec.min(u64::from(u32::MAX)) as u32) else {
            return Self::default();
        };
        let burst = (rate.get() / 8)
            .clamp(16 * 1024, 4 * 1024 * 1024)
            .min(rate.get());
        let burst_nz = NonZeroU32::new(burst).unwrap_or(rate);
        let limiter =
            DefaultDirectRateLimiter::direct(Quota::per_second(rate).allow_burst(burst_nz));
        Self {
            inner: Some(Arc::new(Bucket {
                limiter,
                burst: burst_nz.get(),
                rate: bytes_per_sec,
            })),
        }
    }

    /// An unlimited bucket.
    pub fn unlimited() -> Self {
        Self::default()
    }

    /// The configured rate in bytes per second, if limited.
    pub fn rate(&self) -> Option<u64> {
        self.inner.as_ref().map(|b| b.rate)
    }

    /// Waits until `n` bytes may pass.
    pub async fn acquire(&self, n: usize) {
        let Some(bucket) = &self.inner else { return };
        let mut left = n as u64;
        while left > 0 {
            let take = left.min(u64::from(bucket.burst)) as u32;
            if let Some(nz) = NonZeroU32::new(take) {
                // `take` never exceeds the burst, so capacity is always sufficient.
                let _ = bucket.limiter.until_n_ready(nz).await;
            }
            left -= u64::from(take);
        }
    }
}

/// Waits on each limiter in turn for `n` bytes (host-wide bucket and per-task bucket).
pub async fn acquire_all(limiters: &[&RateLimiter], n: usize) {
    for l in limiters {
        l.acquire(n).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_rate("40MiB").expect("ok"), 40 << 20);
        assert_eq!(parse_rate("40M").expect("ok"), 40 << 20);
        assert_eq!(parse_rate("100Mbit").expect("ok"), 12_500_000);
        assert_eq!(parse_rate("1024").expect("ok"), 1024);
        assert_eq!(parse_rate("1.5KiB").expect("ok"), 1536);
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("10 parsecs").is_err());
        assert_eq!(parse_size("100GiB").expect("ok"), 100 << 30);
    }

    #[tokio::test]
    async fn limits_throughput() {
        let l = RateLimiter::new(1 << 20);
        let start = std::time::Instant::now();
        // The first burst (128 KiB) is free; the next 512 KiB take about half a second.
        l.acquire(128 << 10).await;
        l.acquire(512 << 10).await;
        let t = start.elapsed().as_secs_f64();
        assert!(t > 0.4, "1 MiB/s bucket let 640 KiB through in {t}s");
    }
}
