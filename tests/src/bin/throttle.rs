//! `damselfly-throttle`: a TCP front that caps the bytes a server sends to all its clients together
//! (benchmarks: a registry with the same upload rate as every emulated host), and counts them.
//! Prints `listening on ADDR` and `stats on ADDR`: a connection to the stats address receives the
//! number of server-to-client bytes so far, as a decimal line.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use clap::Parser;
use fetcher::rate::{RateLimiter, parse_rate};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// The server behind (`host:port`).
    #[arg(long)]
    upstream: String,
    /// Cap on server-to-client bytes, all connections together (e.g. 40MiB).
    #[arg(long)]
    rate: String,
}

/// Copies server → client through the shared limiter.
async fn capped(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    limit: Arc<RateLimiter>,
    sent: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        limit.acquire(n).await;
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        sent.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown().await;
}

async fn relay(client: TcpStream, upstream: String, limit: Arc<RateLimiter>, sent: Arc<AtomicU64>) {
    let Ok(server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, client_write) = client.into_split();
    let (server_read, mut server_write) = server.into_split();
    let down = tokio::spawn(capped(server_read, client_write, limit, sent));
    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
    let _ = server_write.shutdown().await;
    let _ = down.await;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let limit = Arc::new(RateLimiter::new(parse_rate(&a.rate)?));
    let sent = Arc::new(AtomicU64::new(0));
    let listener = TcpListener::bind(a.listen).await?;
    let stats = TcpListener::bind("127.0.0.1:0").await?;
    println!("listening on {}", listener.local_addr()?);
    println!("stats on {}", stats.local_addr()?);
    let counter = sent.clone();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = stats.accept().await {
            let line = format!("{}\n", counter.load(Ordering::Relaxed));
            let _ = c.write_all(line.as_bytes()).await;
        }
    });
    loop {
        let (c, _) = listener.accept().await?;
        tokio::spawn(relay(c, a.upstream.clone(), limit.clone(), sent.clone()));
    }
}
