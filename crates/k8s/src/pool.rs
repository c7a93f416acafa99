//! VNet pod address batches: which batch a node gets (pure), and claiming it in the cluster's
//! FerrumIPPool with resourceVersion-based optimistic concurrency (no database but the API
//! server: a concurrent writer makes our replace fail with 409 and we start over).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use kube::api::{DeleteParams, ObjectMeta, PostParams, Preconditions};
use kube::{Api, ResourceExt};

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

/// The pool's CIDR (validated), the batches other nodes own, and `node`'s own valid batches
/// in order (a batch claimed by two nodes belongs to neither here: never share).
fn parse_pool(
    spec: &FerrumIPPoolSpec,
    node: &str,
) -> Result<(Ipv4Net, BTreeSet<Ipv4Net>, Vec<Ipv4Net>), PoolError> {
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
    let mut mine: Vec<Ipv4Net> = Vec::new();
    for b in spec
        .allocations
        .get(node)
        .into_iter()
        .flatten()
        .filter_map(parse)
    {
        if b.prefix_len() == spec.batch_prefix_length
            && pool.contains(&b)
            && !taken.contains(&b)
            && !mine.contains(&b)
        {
            mine.push(b);
        }
    }
    Ok((pool, taken, mine))
}

/// Appends the lowest batches nobody owns to `mine` until it has `want`; false when the pool
/// ran out first.
fn fill(
    pool: Ipv4Net,
    batch_prefix_length: u8,
    taken: &BTreeSet<Ipv4Net>,
    mine: &mut Vec<Ipv4Net>,
    want: usize,
) -> bool {
    if mine.len() >= want {
        return true;
    }
    let Ok(subnets) = pool.subnets(batch_prefix_length) else {
        return false;
    };
    for batch in subnets {
        if mine.len() >= want {
            break;
        }
        if !taken.contains(&batch) && !mine.contains(&batch) {
            mine.push(batch);
        }
    }
    mine.len() >= want
}

/// The batches `node` should own after wanting `want` of them: what it already has (still
/// valid ones, in order), then the lowest batches nobody owns. Deterministic, so every agent
/// computing it from the same pool object agrees.
pub fn plan_batches(
    spec: &FerrumIPPoolSpec,
    node: &str,
    want: usize,
) -> Result<Vec<Ipv4Net>, PoolError> {
    let (pool, taken, mut mine) = parse_pool(spec, node)?;
    // Never shrink here: addresses in a batch may be in use.
    if !fill(pool, spec.batch_prefix_length, &taken, &mut mine, want) {
        return Err(PoolError::Exhausted {
            cidr: pool,
            node: node.to_string(),
        });
    }
    Ok(mine)
}

/// The addresses of `batch` a pod can use: all but the pool's network and broadcast
/// addresses (the first and last batch lose one each).
pub fn usable_addresses(pool: Ipv4Net, batch: Ipv4Net) -> impl Iterator<Item = Ipv4Addr> {
    let skip_edges = pool.prefix_len() <= 30;
    let (network, broadcast) = (pool.network(), pool.broadcast());
    let batch = batch.trunc();
    (u32::from(batch.network())..=u32::from(batch.broadcast()))
        .map(Ipv4Addr::from)
        .filter(move |ip| !skip_edges || (*ip != network && *ip != broadcast))
}

/// The addresses `node` holds according to the pool (its valid batches, usable addresses).
pub fn node_addresses(spec: &FerrumIPPoolSpec, node: &str) -> Result<Vec<Ipv4Addr>, PoolError> {
    let (pool, _, mine) = parse_pool(spec, node)?;
    Ok(mine
        .into_iter()
        .flat_map(|b| usable_addresses(pool, b))
        .collect())
}

/// The batches `node` owns according to the pool (valid ones, in order).
pub fn node_batches(spec: &FerrumIPPoolSpec, node: &str) -> Result<Vec<Ipv4Net>, PoolError> {
    parse_pool(spec, node).map(|(_, _, mine)| mine)
}

/// Whether some batch of the pool is owned by nobody.
pub fn has_free_batch(spec: &FerrumIPPoolSpec) -> bool {
    let Ok((pool, taken, _)) = parse_pool(spec, "") else {
        return false;
    };
    let Ok(mut subnets) = pool.subnets(spec.batch_prefix_length) else {
        return false;
    };
    subnets.any(|b| !taken.contains(&b))
}

/// What a node's request does to its batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestPlan {
    /// The batches the node owns afterwards, in allocation order.
    pub batches: Vec<Ipv4Net>,
    /// Batches given back (every usable address of them was in the release set).
    pub released: Vec<Ipv4Net>,
    /// The pool had no free batch left for the request.
    pub exhausted: bool,
}

/// A node's request in the terms of the lab's NodeNetworkConfig spec, applied to the pool:
/// batches whose every usable address is in `releasing` go back, then the node is topped up
/// with the lowest free batches to `requested` addresses' worth of batches (as many as there
/// are when the pool runs out). A batch with any address not being released is kept: it may
/// be in use. Deterministic.
pub fn plan_request(
    spec: &FerrumIPPoolSpec,
    node: &str,
    requested: u32,
    releasing: &BTreeSet<Ipv4Addr>,
) -> Result<RequestPlan, PoolError> {
    let (pool, taken, mine) = parse_pool(spec, node)?;
    let (released, mut kept): (Vec<Ipv4Net>, Vec<Ipv4Net>) = mine
        .into_iter()
        .partition(|b| usable_addresses(pool, *b).all(|ip| releasing.contains(&ip)));
    let batch_size = 1u64 << (32 - u32::from(spec.batch_prefix_length));
    let want = usize::try_from(u64::from(requested).div_ceil(batch_size)).unwrap_or(usize::MAX);
    // A released batch is not taken back in the same step: the node has just stopped using it.
    let mut not_now = taken.clone();
    not_now.extend(released.iter().copied());
    let exhausted = !fill(pool, spec.batch_prefix_length, &not_now, &mut kept, want);
    Ok(RequestPlan {
        batches: kept,
        released,
        exhausted,
    })
}

/// How often a claim re-reads and retries after losing a concurrent update.
pub const CLAIM_ATTEMPTS: u32 = 8;

/// Replaces the pool object with `node`'s entry as `plan` computes it from the pool just read,
/// only with the resourceVersion it read (409 Conflict -> re-read, re-plan, retry). Writes
/// nothing when the entry is already as planned. Returns the plan that is in force.
async fn update_pool<T>(
    pools: &Api<FerrumIPPool>,
    node: &str,
    plan: impl Fn(&FerrumIPPoolSpec) -> Result<(Vec<Ipv4Net>, T), PoolError>,
) -> Result<(Vec<Ipv4Net>, T), PoolError> {
    let api_err = |source| PoolError::Api {
        node: node.to_string(),
        source,
    };
    for attempt in 1..=CLAIM_ATTEMPTS {
        let mut pool = pools
            .get_opt(POOL_NAME)
            .await
            .map_err(api_err)?
            .ok_or(PoolError::Missing)?;
        let (planned, extra) = plan(&pool.spec)?;
        let as_strings: Vec<String> = planned.iter().map(ToString::to_string).collect();
        let current = pool.spec.allocations.get(node);
        if current == Some(&as_strings) || (current.is_none() && as_strings.is_empty()) {
            return Ok((planned, extra));
        }
        if as_strings.is_empty() {
            pool.spec.allocations.remove(node);
        } else {
            pool.spec.allocations.insert(node.to_string(), as_strings);
        }
        // The object carries the resourceVersion we read: the API server refuses the write
        // if anyone changed the pool since.
        match pools
            .replace(POOL_NAME, &PostParams::default(), &pool)
            .await
        {
            Ok(_) => {
                tracing::info!(node, attempt, batches = ?planned, "VNet pod batches updated in the pool");
                return Ok((planned, extra));
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                tracing::debug!(node, attempt, "pool changed under us; re-reading");
            }
            Err(e) => return Err(api_err(e)),
        }
    }
    Err(PoolError::Contended {
        node: node.to_string(),
        attempts: CLAIM_ATTEMPTS,
    })
}

/// Ensures `node` owns `want` batches in the pool, replacing the pool object only with the
/// resourceVersion it read (409 Conflict -> re-read, re-plan, retry), then mirrors the result
/// into the node's FerrumNode spec. Returns the node's batches.
pub async fn claim_batches(
    pools: &Api<FerrumIPPool>,
    nodes: &Api<FerrumNode>,
    node: &str,
    want: usize,
) -> Result<Vec<Ipv4Net>, PoolError> {
    let (batches, ()) = update_pool(pools, node, |spec| {
        Ok((plan_batches(spec, node, want)?, ()))
    })
    .await?;
    update_node(nodes, node, |spec| {
        spec.pod_cidrs = batches.iter().map(ToString::to_string).collect();
    })
    .await
    .map_err(|source| PoolError::Api {
        node: node.to_string(),
        source,
    })?;
    Ok(batches)
}

/// Serves a node agent's address request (the NodeNetworkConfig spec of the lab: how many
/// addresses it wants, which it gives back) against the cluster pool: records the request in
/// the node's FerrumNode spec.requestedIPCount first (so anyone topping the node up reads the
/// new count), gives back whole released batches and claims free ones in one optimistic
/// update of the pool ([`plan_request`]), then mirrors the batches into spec.podCIDRs.
pub async fn request_batches(
    pools: &Api<FerrumIPPool>,
    nodes: &Api<FerrumNode>,
    node: &str,
    requested: u32,
    releasing: &BTreeSet<Ipv4Addr>,
) -> Result<RequestPlan, PoolError> {
    let api_err = |source| PoolError::Api {
        node: node.to_string(),
        source,
    };
    update_node(nodes, node, |spec| spec.requested_ip_count = requested)
        .await
        .map_err(api_err)?;
    let (batches, (released, exhausted)) = update_pool(pools, node, |spec| {
        let plan = plan_request(spec, node, requested, releasing)?;
        Ok((plan.batches, (plan.released, plan.exhausted)))
    })
    .await?;
    update_node(nodes, node, |spec| {
        spec.pod_cidrs = batches.iter().map(ToString::to_string).collect();
    })
    .await
    .map_err(api_err)?;
    if exhausted {
        tracing::warn!(
            node,
            requested,
            "the FerrumIPPool has no free batch left for this node's request"
        );
    }
    Ok(RequestPlan {
        batches,
        released,
        exhausted,
    })
}

/// Claims batches for `node`'s recorded request (FerrumNode spec.requestedIPCount) when the
/// pool changed: a request the pool could not meet earlier is met once batches are free
/// again, without the agent asking anew. Releases nothing.
pub async fn top_up(
    pools: &Api<FerrumIPPool>,
    nodes: &Api<FerrumNode>,
    node: &str,
) -> Result<Option<RequestPlan>, PoolError> {
    let api_err = |source| PoolError::Api {
        node: node.to_string(),
        source,
    };
    let Some(object) = nodes.get_opt(node).await.map_err(api_err)? else {
        return Ok(None);
    };
    let requested = object.spec.requested_ip_count;
    if requested == 0 {
        return Ok(None);
    }
    request_batches(pools, nodes, node, requested, &BTreeSet::new())
        .await
        .map(Some)
}

/// What collecting a deleted node's leftovers did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Collected {
    /// The Node exists after all (our watch lags, or the name came back): nothing touched.
    pub node_exists: bool,
    /// The batches removed from the pool's allocations.
    pub batches: Vec<String>,
    /// The node's FerrumNode was deleted.
    pub ferrum_node_deleted: bool,
}

/// Garbage collection of a deleted node (what the lab's cloud does with remove_node): removes
/// `node`'s entry from the pool's allocations and deletes its FerrumNode. Each write is made
/// only after reading the object and then finding the Node absent with a direct GET, and
/// carries what was read (pool: resourceVersion; FerrumNode: resourceVersion and uid
/// preconditions): a node of the same name that registers and claims in between makes the
/// write fail with 409, and the re-read then finds its Node and leaves it alone.
pub async fn collect_node(
    pools: &Api<FerrumIPPool>,
    ferrum_nodes: &Api<FerrumNode>,
    nodes: &Api<Node>,
    node: &str,
) -> Result<Collected, PoolError> {
    let api_err = |source| PoolError::Api {
        node: node.to_string(),
        source,
    };
    let mut out = Collected::default();
    for attempt in 1..=CLAIM_ATTEMPTS {
        let Some(mut pool) = pools.get_opt(POOL_NAME).await.map_err(api_err)? else {
            break;
        };
        let Some(batches) = pool.spec.allocations.remove(node) else {
            break;
        };
        if nodes.get_opt(node).await.map_err(api_err)?.is_some() {
            out.node_exists = true;
            return Ok(out);
        }
        match pools
            .replace(POOL_NAME, &PostParams::default(), &pool)
            .await
        {
            Ok(_) => {
                out.batches = batches;
                break;
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                tracing::debug!(
                    node,
                    attempt,
                    "pool changed under the collector; re-reading"
                );
                if attempt == CLAIM_ATTEMPTS {
                    return Err(PoolError::Contended {
                        node: node.to_string(),
                        attempts: CLAIM_ATTEMPTS,
                    });
                }
            }
            Err(e) => return Err(api_err(e)),
        }
    }
    for attempt in 1..=CLAIM_ATTEMPTS {
        let Some(object) = ferrum_nodes.get_opt(node).await.map_err(api_err)? else {
            break;
        };
        if nodes.get_opt(node).await.map_err(api_err)?.is_some() {
            out.node_exists = true;
            return Ok(out);
        }
        let params = DeleteParams::default().preconditions(Preconditions {
            resource_version: object.resource_version(),
            uid: object.uid(),
        });
        match ferrum_nodes.delete(node, &params).await {
            Ok(_) => {
                out.ferrum_node_deleted = true;
                break;
            }
            Err(kube::Error::Api(status)) if status.code == 404 => break,
            Err(kube::Error::Api(status)) if status.code == 409 && attempt < CLAIM_ATTEMPTS => {
                tracing::debug!(
                    node,
                    attempt,
                    "FerrumNode changed under the collector; re-reading"
                );
            }
            Err(e) => return Err(api_err(e)),
        }
    }
    Ok(out)
}

/// Changes `node`'s FerrumNode spec with `edit` (creating the object when missing), replacing
/// it with the resourceVersion read and retrying on 409. Writes nothing when `edit` changes
/// nothing.
async fn update_node(
    nodes: &Api<FerrumNode>,
    node: &str,
    edit: impl Fn(&mut FerrumNodeSpec),
) -> Result<(), kube::Error> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = match nodes.get_opt(node).await? {
            Some(mut existing) => {
                let before = existing.spec.clone();
                edit(&mut existing.spec);
                if existing.spec == before {
                    return Ok(());
                }
                nodes
                    .replace(node, &PostParams::default(), &existing)
                    .await
                    .map(|_| ())
            }
            None => {
                let mut spec = FerrumNodeSpec::default();
                edit(&mut spec);
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
        };
        match result {
            // The agent's own status writes race with this: re-read and apply again.
            Err(kube::Error::Api(s)) if s.code == 409 && attempt < CLAIM_ATTEMPTS => {
                tracing::debug!(node, attempt, "FerrumNode changed under us; re-reading");
            }
            other => return other,
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
            ..Default::default()
        }
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn addrs(batch: &str) -> BTreeSet<Ipv4Addr> {
        usable_addresses(net("10.241.0.0/24"), net(batch)).collect()
    }

    #[test]
    fn requests_claim_batches_and_releases_give_back_only_whole_batches() {
        let s = spec(&[("a", &["10.241.0.0/28"]), ("b", &["10.241.0.16/28"])]);
        // 15 usable in the first batch (the pool's network address is not).
        assert_eq!(addrs("10.241.0.0/28").len(), 15);
        assert_eq!(node_addresses(&s, "a").unwrap().len(), 15);
        // More: the lowest free batch.
        let p = plan_request(&s, "a", 32, &BTreeSet::new()).unwrap();
        assert_eq!(p.batches, [net("10.241.0.0/28"), net("10.241.0.32/28")]);
        assert!(p.released.is_empty() && !p.exhausted);
        // The same request against a pool that has it already: unchanged.
        let s2 = spec(&[("a", &["10.241.0.0/28", "10.241.0.32/28"])]);
        assert_eq!(
            plan_request(&s2, "a", 32, &BTreeSet::new())
                .unwrap()
                .batches,
            p.batches
        );
        // Release: a whole batch goes back; a partial release set keeps its batch.
        let p = plan_request(&s2, "a", 16, &addrs("10.241.0.32/28")).unwrap();
        assert_eq!(p.batches, [net("10.241.0.0/28")]);
        assert_eq!(p.released, [net("10.241.0.32/28")]);
        let mut partial = addrs("10.241.0.32/28");
        partial.pop_first();
        let p = plan_request(&s2, "a", 16, &partial).unwrap();
        assert_eq!(p.batches.len(), 2, "an address of the batch may be in use");
        // Released and still short: the released batch is not taken back in the same step.
        let p = plan_request(&s2, "a", 32, &addrs("10.241.0.32/28")).unwrap();
        assert_eq!(p.batches, [net("10.241.0.0/28"), net("10.241.0.16/28")]);
        // Exhausted: as many as there are, and said so.
        let mut small = spec(&[("b", &["10.241.0.16/28"])]);
        small.cidr = "10.241.0.0/27".into();
        let p = plan_request(&small, "a", 32, &BTreeSet::new()).unwrap();
        assert_eq!(p.batches, [net("10.241.0.0/28")]);
        assert!(p.exhausted);
        assert!(has_free_batch(&small));
        small
            .allocations
            .insert("a".into(), vec!["10.241.0.0/28".into()]);
        assert!(!has_free_batch(&small));
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
        /// Any sequence of requests and releases by three nodes against one pool: no batch is
        /// ever owned twice, a node's kept batches never lose an address it did not release,
        /// and a node is short of its request only when the pool is full.
        #[test]
        fn requests_never_share_a_batch_or_drop_one_in_use(
            ops in proptest::collection::vec((0usize..3, 0u32..80, 0usize..4), 1..60)
        ) {
            let mut s = spec(&[]);
            s.cidr = "10.241.0.0/26".into();
            let pool = net("10.241.0.0/26");
            for (n, requested, release_nth) in ops {
                let node = format!("n{n}");
                let before = node_batches(&s, &node).unwrap();
                // Release every address of the node's nth batch (if it has one).
                let releasing: BTreeSet<Ipv4Addr> = before
                    .get(release_nth)
                    .into_iter()
                    .flat_map(|b| usable_addresses(pool, *b))
                    .collect();
                let p = plan_request(&s, &node, requested, &releasing).unwrap();
                for b in &before {
                    let released = usable_addresses(pool, *b).all(|ip| releasing.contains(&ip));
                    proptest::prop_assert_eq!(p.batches.contains(b), !released);
                }
                let want = requested.div_ceil(16) as usize;
                proptest::prop_assert!(p.batches.len() >= want.min(before.len() - p.released.len()));
                if p.batches.len() < want {
                    proptest::prop_assert!(p.exhausted);
                }
                s.allocations.insert(node, p.batches.iter().map(ToString::to_string).collect());
                let mut seen = BTreeSet::new();
                for batches in s.allocations.values() {
                    for b in batches {
                        proptest::prop_assert!(seen.insert(b.clone()), "{} owned twice", b);
                    }
                }
            }
        }

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
