//! `supernode`: see the `supernode` library.

use clap::Parser;
use supernode::config::{self, Args};

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Some(config::Command::Certs(a)) = &args.command {
        match supernode::certs::run(a) {
            Ok(files) => {
                for f in files {
                    println!("wrote {}", f.display());
                }
                return;
            }
            Err(e) => {
                eprintln!("supernode certs: error: {e}");
                std::process::exit(2);
            }
        }
    }
    fetcher::cli::init_daemon_allocator();
    fetcher::cli::init_logging("info", args.log_json);
    let shutdown = fetcher::Shutdown::new();
    shutdown.on_signals();
    let result = async {
        let c = config::load(&args)?;
        let running = supernode::start(c, shutdown.clone()).await?;
        running.join().await;
        Ok::<_, supernode::Error>(())
    }
    .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "supernode failed");
        eprintln!("supernode: error: {e}");
        std::process::exit(1);
    }
    tracing::info!("supernode stopped");
}
