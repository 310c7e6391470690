//! Ticket verification throughput on one core: what every piece request costs a piece server
//! (`bash tests/bench/ticket.sh`). Prints one line: verifications per second, and the same for
//! sha256 of one 4 MiB piece (the work each verified request guards) as the baseline.

use std::time::{Duration, Instant};

use fetcher::ticket::{Claims, Issuer, Scope, verify};
use sha2::Digest;

fn main() -> anyhow::Result<()> {
    let issuer = Issuer::generate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let keys = [issuer.public()];
    let version_id = "ab".repeat(32);
    let holder: std::net::IpAddr = "10.0.0.7".parse()?;
    let ticket = issuer
        .issue(&Claims {
            scope: Scope::Pieces,
            version_id: version_id.clone(),
            holder,
            expires: fetcher::ticket::now() + 600,
        })
        .ok_or_else(|| anyhow::anyhow!("cannot issue"))?;
    let run = |f: &mut dyn FnMut()| {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_secs(2) {
            for _ in 0..64 {
                f();
            }
            n += 64;
        }
        n as f64 / start.elapsed().as_secs_f64()
    };
    let mut ok = 0u64;
    let verifies = run(&mut || {
        if verify(&keys, Some(&ticket), Scope::Pieces, &version_id, holder).is_ok() {
            ok += 1;
        }
    });
    anyhow::ensure!(ok > 0, "the ticket never verified");
    let piece = vec![7u8; 4 << 20];
    let mut sink = 0u8;
    let hashes = run(&mut || sink ^= sha2::Sha256::digest(&piece)[0]);
    println!(
        "ticket verify_per_s={verifies:.0} piece_sha256_per_s={hashes:.1} verify_cost_over_piece_hash={:.4} (sink {sink})",
        hashes / verifies
    );
    Ok(())
}
