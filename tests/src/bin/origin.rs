//! `damselfly-origin`: the test origin (see `damselfly_tests::origin`). Prints `listening on ADDR`.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use clap::Parser;
use damselfly_tests::origin::{Origin, router};

/// A counting, rate-capped HTTP origin for tests, benchmarks and the demo.
#[derive(Parser)]
struct Args {
    /// Directory whose files are served.
    #[arg(long)]
    dir: std::path::PathBuf,
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: std::net::SocketAddr,
    /// Upload cap for all responses together (e.g. 40MiB).
    #[arg(long, default_value = "0")]
    rate: String,
    /// Token required by /auth/ paths.
    #[arg(long)]
    bearer: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let origin = Arc::new(Origin {
        dir: a.dir,
        bearer: a.bearer,
        limiter: fetcher::rate::RateLimiter::new(fetcher::rate::parse_rate(&a.rate)?),
        bytes: AtomicU64::new(0),
        requests: AtomicU64::new(0),
    });
    let listener = tokio::net::TcpListener::bind(a.addr).await?;
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, router(origin)).await?;
    Ok(())
}
