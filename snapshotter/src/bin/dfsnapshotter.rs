//! `dfsnapshotter`: see `snapshotter::cli`.

use clap::Parser;

#[tokio::main]
async fn main() {
    let code = snapshotter::cli::run(snapshotter::cli::Args::parse()).await;
    std::process::exit(code);
}
