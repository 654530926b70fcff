//! Where a session lives: its shard, and the node a shard should live on.
//!
//! Both are pure functions of stable inputs, so every node computes the
//! same answer without asking anyone:
//! - a session's shard is a hash of its tenant id and session id, modulo
//!   the cluster's fixed shard count;
//! - a shard's desired owner is the live member with the highest hash of
//!   (node id, shard): rendezvous (highest-random-weight) hashing. Shards
//!   spread evenly, and when a node joins or leaves only the shards it
//!   wins or held change their desired owner, about 1/N of them.
//!
//! The hash is the first 8 bytes of SHA-256, not `std`'s `DefaultHasher`,
//! whose output may change between Rust releases: nodes built by
//! different releases must agree during a rolling deploy.

use sha2::{Digest as _, Sha256};
use uuid::Uuid;

/// The stable 64-bit hash of `parts`, each length-prefixed so that no two
/// different lists hash alike by concatenation.
fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// The shard of session `session_id` of `tenant`, in `0..shards`.
pub fn shard_of(tenant: Uuid, session_id: &str, shards: u32) -> u32 {
    debug_assert!(shards > 0);
    (stable_hash(&[tenant.as_bytes(), session_id.as_bytes()]) % u64::from(shards.max(1))) as u32
}

/// The member that should own `shard`: the one with the highest weight
/// (ties, which need equal 64-bit hashes, go to the smaller node id).
/// `None` without members.
pub fn desired_owner(shard: u32, members: &[String]) -> Option<&str> {
    members
        .iter()
        .map(|node| (weight(node, shard), node.as_str()))
        .max_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(a.1)))
        .map(|(_, node)| node)
}

fn weight(node: &str, shard: u32) -> u64 {
    stable_hash(&[node.as_bytes(), &shard.to_be_bytes()])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node-{i}")).collect()
    }

    #[test]
    fn a_session_keeps_its_shard_and_sessions_spread_over_all_shards() {
        let tenant = Uuid::from_u128(0x6f1c_0d3e_8a4b_4c6e_9f10_2b3c_4d5e_6f70);
        assert_eq!(
            shard_of(tenant, "ses_a", 256),
            shard_of(tenant, "ses_a", 256)
        );
        // Pinned: a change of this function would move every session of a
        // running cluster to another shard. (SHA-256 of the length-prefixed
        // tenant bytes and id, first 8 bytes big-endian, mod 256.)
        assert_eq!(shard_of(tenant, "ses_a", 256), 140);
        assert_ne!(
            shard_of(tenant, "ses_a", 1 << 20),
            shard_of(Uuid::nil(), "ses_a", 1 << 20),
            "the tenant is part of the key"
        );
        let mut counts = vec![0u32; 256];
        for i in 0..256_000 {
            counts[shard_of(tenant, &format!("s-{i}"), 256) as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*min > 800 && *max < 1200, "uneven: {min}..{max}");
    }

    #[test]
    fn shards_spread_evenly_and_a_join_moves_only_what_the_new_node_wins() {
        let three = nodes(3);
        let owners: Vec<&str> = (0..256)
            .map(|s| desired_owner(s, &three).unwrap())
            .collect();
        for node in &three {
            let owned = owners.iter().filter(|o| **o == node.as_str()).count();
            assert!((60..=110).contains(&owned), "{node} owns {owned} of 256");
        }
        let four = nodes(4);
        let mut moved = 0;
        for shard in 0..256u32 {
            let after = desired_owner(shard, &four).unwrap();
            if after != owners[shard as usize] {
                moved += 1;
                assert_eq!(after, "node-3", "a shard moved between old nodes");
            }
        }
        assert!((40..=90).contains(&moved), "{moved} of 256 moved");
        assert_eq!(desired_owner(0, &[]), None, "no members, no owner");
        // The order of the member list does not matter.
        let mut reversed = four.clone();
        reversed.reverse();
        for shard in 0..256u32 {
            assert_eq!(desired_owner(shard, &four), desired_owner(shard, &reversed));
        }
    }
}
