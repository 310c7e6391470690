//! Rendezvous (highest-random-weight) hashing: which supernode owns a task, and which come next.
//! Every peer computes the same order from the same list, so a task's peers meet on one supernode,
//! and losing a supernode moves only its own tasks.

use sha2::{Digest, Sha256};

/// `nodes` ordered by preference for `task_id` (owner first).
pub fn order<'a>(task_id: &str, nodes: &'a [String]) -> Vec<&'a str> {
    let mut scored: Vec<(u64, &str)> = nodes
        .iter()
        .map(|n| {
            let h = Sha256::new()
                .chain_update(task_id)
                .chain_update(b"\0")
                .chain_update(n)
                .finalize();
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[..8]);
            (u64::from_be_bytes(b), n.as_str())
        })
        .collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    scored.into_iter().map(|(_, n)| n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_stable_and_removal_moves_only_the_owner_s_tasks() {
        let nodes: Vec<String> = (0..5).map(|i| format!("10.0.0.{i}:8002")).collect();
        let mut moved = 0;
        for t in 0..200 {
            let id = format!("task{t}");
            let full = order(&id, &nodes);
            assert_eq!(full, order(&id, &nodes));
            let fewer: Vec<String> = nodes
                .iter()
                .filter(|n| n.as_str() != "10.0.0.2:8002")
                .cloned()
                .collect();
            let after = order(&id, &fewer);
            if full[0] != after[0] {
                assert_eq!(full[0], "10.0.0.2:8002");
                assert_eq!(full[1], after[0]);
                moved += 1;
            }
        }
        assert!(moved > 10 && moved < 80, "moved {moved} of 200");
    }
}
