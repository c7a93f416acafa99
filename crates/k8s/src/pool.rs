//! VNet pod address batches: which batch a node gets (pure), and claiming it in the cluster's
//! FerrumIPPool with resourceVersion-based optimistic concurrency (no database but the API
//! server: a concurrent writer makes our replace fail with 409 and we start over).

use std::collections::BTreeSet;

use ipnet::Ipv4Net;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};

use crate::crd::{FerrumIPPool, FerrumIPPoolSpec, FerrumNode, FerrumNodeSpec, POOL_NAME};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(
        "FerrumIPPool {POOL_NAME}: invalid spec.cidr {0:?}: use an IPv4 CIDR such as 10.241.0.0/16"
    )]
    BadCidr(String),
    #[error(
        "FerrumIPPool {POOL_NAME}: spec.batchPrefixLength {len} must be between the pool's prefix length {pool} and 32"
    )]
    BadBatchLength { len: u8, pool: u8 },
    #[error(
        "FerrumIPPool {POOL_NAME} ({cidr}) has no free batch left for node {node}: enlarge the pool or remove stale allocations"
    )]
    Exhausted { cidr: Ipv4Net, node: String },
    #[error("FerrumIPPool {POOL_NAME} does not exist: apply deploy/ (it creates the pool) first")]
    Missing,
    #[error(
        "claiming a batch for node {node}: {attempts} attempts all lost a concurrent update; retry later"
    )]
    Contended { node: String, attempts: u32 },
    #[error("claiming a batch for node {node}: {source}")]
    Api {
        node: String,
        #[source]
        source: kube::Error,
    },
}

/// The batches `node` should own after wanting `want` of them: what it already has (still
/// valid ones, in order), then the lowest batches nobody owns. Deterministic, so every agent
/// computing it from the same pool object agrees.
pub fn plan_batches(
    spec: &FerrumIPPoolSpec,
    node: &str,
    want: usize,
) -> Result<Vec<Ipv4Net>, PoolError> {
    let pool: Ipv4Net = spec
        .cidr
        .parse()
        .map_err(|_| PoolError::BadCidr(spec.cidr.clone()))?;
    let pool = pool.trunc();
    if spec.batch_prefix_length < pool.prefix_len() || spec.batch_prefix_length > 32 {
        return Err(PoolError::BadBatchLength {
            len: spec.batch_prefix_length,
            pool: pool.prefix_len(),
        });
    }
    let parse = |s: &String| s.parse::<Ipv4Net>().ok().map(|n| n.trunc());
    let taken: BTreeSet<Ipv4Net> = spec
        .allocations
        .iter()
        .filter(|(owner, _)| owner.as_str() != node)
        .flat_map(|(_, batches)| batches.iter().filter_map(parse))
        .collect();
    let mut mine: Vec<Ipv4Net> = spec
        .allocations
        .get(node)
        .into_iter()
        .flatten()
        .filter_map(parse)
        .filter(|b| b.prefix_len() == spec.batch_prefix_length && pool.contains(b))
        .filter(|b| !taken.contains(b))
        .collect();
    mine.dedup();
    // Never shrink here: addresses in a batch may be in use.
    if mine.len() >= want {
        return Ok(mine);
    }
    let subnets =
        pool.subnets(spec.batch_prefix_length)
            .map_err(|_| PoolError::BadBatchLength {
                len: spec.batch_prefix_length,
                pool: pool.prefix_len(),
            })?;
    for batch in subnets {
        if mine.len() >= want {
            break;
        }
        if !taken.contains(&batch) && !mine.contains(&batch) {
            mine.push(batch);
        }
    }
    if mine.len() < want {
        return Err(PoolError::Exhausted {
            cidr: pool,
            node: node.to_string(),
        });
    }
    Ok(mine)
}

/// How often a claim re-reads and retries after losing a concurrent update.
pub const CLAIM_ATTEMPTS: u32 = 8;

/// Ensures `node` owns `want` batches in the pool, replacing the pool object only with the
/// resourceVersion it read (409 Conflict -> re-read, re-plan, retry), then mirrors the result
/// into the node's FerrumNode spec. Returns the node's batches.
pub async fn claim_batches(
    pools: &Api<FerrumIPPool>,
    nodes: &Api<FerrumNode>,
    node: &str,
    want: usize,
) -> Result<Vec<Ipv4Net>, PoolError> {
    let api_err = |source| PoolError::Api {
        node: node.to_string(),
        source,
    };
    let mut batches = None;
    for attempt in 1..=CLAIM_ATTEMPTS {
        let mut pool = pools
            .get_opt(POOL_NAME)
            .await
            .map_err(api_err)?
            .ok_or(PoolError::Missing)?;
        let planned = plan_batches(&pool.spec, node, want)?;
        let as_strings: Vec<String> = planned.iter().map(ToString::to_string).collect();
        if pool.spec.allocations.get(node) == Some(&as_strings) {
            batches = Some(planned);
            break;
        }
        pool.spec.allocations.insert(node.to_string(), as_strings);
        // The object carries the resourceVersion we read: the API server refuses the write
        // if anyone changed the pool since.
        match pools
            .replace(POOL_NAME, &PostParams::default(), &pool)
            .await
        {
            Ok(_) => {
                tracing::info!(node, attempt, batches = ?planned, "claimed VNet pod batches");
                batches = Some(planned);
                break;
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                tracing::debug!(node, attempt, "pool changed under us; re-reading");
            }
            Err(e) => return Err(api_err(e)),
        }
    }
    let batches = batches.ok_or(PoolError::Contended {
        node: node.to_string(),
        attempts: CLAIM_ATTEMPTS,
    })?;
    mirror_to_node(nodes, node, &batches)
        .await
        .map_err(api_err)?;
    Ok(batches)
}

async fn mirror_to_node(
    nodes: &Api<FerrumNode>,
    node: &str,
    batches: &[Ipv4Net],
) -> Result<(), kube::Error> {
    let spec = FerrumNodeSpec {
        pod_cidrs: batches.iter().map(ToString::to_string).collect(),
    };
    match nodes.get_opt(node).await? {
        Some(existing) if existing.spec == spec => Ok(()),
        Some(mut existing) => {
            existing.spec = spec;
            nodes
                .replace(node, &PostParams::default(), &existing)
                .await
                .map(|_| ())
        }
        None => {
            let object = FerrumNode {
                metadata: ObjectMeta {
                    name: Some(node.to_string()),
                    ..Default::default()
                },
                spec,
                status: None,
            };
            nodes
                .create(&PostParams::default(), &object)
                .await
                .map(|_| ())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn spec(allocs: &[(&str, &[&str])]) -> FerrumIPPoolSpec {
        FerrumIPPoolSpec {
            cidr: "10.241.0.0/24".into(),
            batch_prefix_length: 28,
            allocations: allocs
                .iter()
                .map(|(n, b)| (n.to_string(), b.iter().map(|s| s.to_string()).collect()))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    #[test]
    fn lowest_free_batches_are_taken_and_existing_ones_kept() {
        let s = spec(&[("a", &["10.241.0.0/28"]), ("b", &["10.241.0.32/28"])]);
        let got = plan_batches(&s, "c", 2).unwrap();
        assert_eq!(
            got,
            vec![
                "10.241.0.16/28".parse().unwrap(),
                "10.241.0.48/28".parse().unwrap()
            ]
        );
        // A node keeps what it has.
        assert_eq!(
            plan_batches(&s, "a", 1).unwrap(),
            vec!["10.241.0.0/28".parse().unwrap()]
        );
        // Growing keeps the old batch first.
        let a2 = plan_batches(&s, "a", 2).unwrap();
        assert_eq!(a2[0], "10.241.0.0/28".parse().unwrap());
        assert_eq!(a2[1], "10.241.0.16/28".parse().unwrap());
    }

    #[test]
    fn a_batch_owned_twice_stays_with_the_other_node() {
        // Corrupt input: both claim .0/28; the planner for "a" gives it up rather than share.
        let s = spec(&[("a", &["10.241.0.0/28"]), ("b", &["10.241.0.0/28"])]);
        let got = plan_batches(&s, "a", 1).unwrap();
        assert_ne!(got[0], "10.241.0.0/28".parse::<Ipv4Net>().unwrap());
    }

    #[test]
    fn exhaustion_and_bad_specs_are_errors_naming_the_field() {
        let mut s = spec(&[]);
        s.cidr = "10.241.0.0/27".into();
        assert!(matches!(
            plan_batches(&s, "a", 3),
            Err(PoolError::Exhausted { .. })
        ));
        s.cidr = "nonsense".into();
        let e = plan_batches(&s, "a", 1).unwrap_err().to_string();
        assert!(e.contains("spec.cidr"), "{e}");
        s.cidr = "10.241.0.0/24".into();
        s.batch_prefix_length = 20;
        let e = plan_batches(&s, "a", 1).unwrap_err().to_string();
        assert!(e.contains("batchPrefixLength"), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn planned_batches_never_overlap_other_nodes(
            owners in proptest::collection::vec(0usize..4, 0..12), want in 1usize..3
        ) {
            let mut s = spec(&[]);
            for (i, owner) in owners.iter().enumerate() {
                s.allocations.entry(format!("n{owner}")).or_default()
                    .push(format!("10.241.0.{}/28", i * 16));
            }
            let got = plan_batches(&s, "n0", want).unwrap();
            proptest::prop_assert!(got.len() >= want);
            for (owner, batches) in &s.allocations {
                if owner == "n0" { continue; }
                for b in batches {
                    let b: Ipv4Net = b.parse().unwrap();
                    proptest::prop_assert!(!got.contains(&b));
                }
            }
        }
    }
}
