//! `dfdaemon`: see `fetcher::cli::dfdaemon`.

use clap::Parser;

#[tokio::main]
async fn main() {
    let args = fetcher::cli::dfdaemon::Args::parse();
    std::process::exit(fetcher::cli::dfdaemon::run(args).await);
}
