//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table of prime size M in
//! which every backend owns about M/N entries, filled from per-backend permutations so that
//! removing one backend moves almost only the flows it owned.

use crate::Backend;

/// Table size: prime, and large against the backend count so disruption stays small (with
/// 100 backends, losing one moves < 1% of the other flows; 16381 would move ~1.5%).
pub const TABLE_SIZE: u32 = 32749;
/// The datapath stores the table in chunks of this many 16-bit backend slots.
pub const CHUNK: usize = 64;

/// The table as the datapath stores it: chunk number -> slots (1-based backend slots).
pub fn chunks(table: &[u32]) -> Vec<[u16; CHUNK]> {
    table
        .chunks(CHUNK)
        .map(|c| {
            let mut out = [0u16; CHUNK];
            for (o, i) in out.iter_mut().zip(c) {
                *o = u16::try_from(*i + 1).unwrap_or(0);
            }
            out
        })
        .collect()
}

fn fnv1a64(seed: u64, data: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Final avalanche (splitmix64) so nearby addresses get unrelated permutations.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn name(b: &Backend) -> Vec<u8> {
    let mut v = b.addr.octets().to_vec();
    v.extend_from_slice(&b.port.to_be_bytes());
    v
}

/// The table for `backends` (indices into the slice), `size` entries; empty without backends.
pub fn table(backends: &[Backend], size: u32) -> Vec<u32> {
    let n = backends.len();
    if n == 0 || size < 2 {
        return Vec::new();
    }
    let m = u64::from(size);
    let perms: Vec<(u64, u64)> = backends
        .iter()
        .map(|b| {
            let key = name(b);
            let offset = fnv1a64(0x5bd1_e995, &key) % m;
            let skip = fnv1a64(0x1b87_3593, &key) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; n];
    let mut entry = vec![u32::MAX; size as usize];
    let mut filled = 0u32;
    loop {
        for i in 0..n {
            let (offset, skip) = perms[i];
            let mut c = (offset + next[i] * skip) % m;
            while entry[c as usize] != u32::MAX {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            entry[c as usize] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == size {
                return entry;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn backends(n: u32) -> Vec<Backend> {
        (0..n)
            .map(|i| Backend {
                addr: Ipv4Addr::from(0x0af4_0000 + i),
                port: 8080,
            })
            .collect()
    }

    #[test]
    fn every_backend_gets_a_fair_share() {
        let b = backends(100);
        let t = table(&b, TABLE_SIZE);
        assert_eq!(t.len(), TABLE_SIZE as usize);
        let mut counts = vec![0u32; b.len()];
        for i in &t {
            counts[*i as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        // Maglev keeps every share within about 1% of M/N.
        let fair = f64::from(TABLE_SIZE) / 100.0;
        assert!(
            f64::from(*min) >= fair * 0.98 && f64::from(*max) <= fair * 1.02,
            "shares {min}..{max} around {fair}"
        );
        assert!(table(&[], TABLE_SIZE).is_empty());
    }

    /// The acceptance test: with 100 backends, removing one moves at most 1% of the
    /// flows that were on the 99 survivors to a different backend.
    #[test]
    fn removing_one_of_100_backends_moves_at_most_one_percent_of_surviving_flows() {
        let all = backends(100);
        let before = table(&all, TABLE_SIZE);
        for gone in [0usize, 37, 99] {
            let mut rest = all.clone();
            rest.remove(gone);
            let after = table(&rest, TABLE_SIZE);
            let (mut surviving, mut moved) = (0u32, 0u32);
            // Flows hash uniformly over table entries: count entries, i.e. flows.
            for (e, old) in before.iter().enumerate() {
                let old_backend = all[*old as usize];
                if *old as usize == gone {
                    continue;
                }
                surviving += 1;
                if rest[after[e] as usize] != old_backend {
                    moved += 1;
                }
            }
            let share = f64::from(moved) / f64::from(surviving);
            eprintln!("M={TABLE_SIZE} removing {gone}: {moved}/{surviving} = {share:.4}");
            assert!(
                share <= 0.01,
                "removing {gone}: {moved}/{surviving} = {share:.4} moved"
            );
        }
    }

    #[test]
    fn the_table_depends_only_on_the_backend_set() {
        let b = backends(10);
        assert_eq!(table(&b, 251), table(&b, 251));
    }
}
