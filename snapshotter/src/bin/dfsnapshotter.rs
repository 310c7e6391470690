//! `dfsnapshotter`: see `snapshotter::cli`.

#[tokio::main]
async fn main() {
    let args = match snapshotter::config::parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("dfsnapshotter: error: {e}");
            std::process::exit(2);
        }
    };
    std::process::exit(snapshotter::cli::run(args).await);
}
