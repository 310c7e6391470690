//! `dfget`: see `fetcher::cli::dfget`.

use clap::Parser;

#[tokio::main]
async fn main() {
    let args = fetcher::cli::dfget::Args::parse();
    std::process::exit(fetcher::cli::dfget::run(args).await);
}
