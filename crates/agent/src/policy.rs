//! NetworkPolicy: keeps the objects policy depends on (Namespaces, Pods, NetworkPolicies,
//! Nodes) from the watch stream, compiles them with `ferrum_policy` when any changed, lowers
//! the result for this node and reconciles the policy maps by diff. Allow entries go in before
//! the endpoints that rely on them and come out after, then the generation is bumped so that
//! tracked connections are judged again under the new policy on their next packet.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use ferrum_datapath::bpf::{POLICY_CIDR_KEY_LEN, POLICY_KEY_LEN, PolicyEndpoint, PolicyMapsDump};
use ferrum_model::{Object, WatchEvent};
use ferrum_policy::compile::{DirectionPolicy, EndpointPolicy};
use ferrum_policy::lower::{NodeMaps, lower_endpoint};
use ferrum_policy::{IdentityAllocator, Inputs, PolicyState, RuleAllocator};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;

type Name = (String, String);

#[derive(Debug, Default, Clone)]
struct Objects {
    namespaces: BTreeMap<String, Namespace>,
    pods: BTreeMap<Name, Pod>,
    policies: BTreeMap<Name, NetworkPolicy>,
    nodes: BTreeMap<String, Node>,
}

/// The objects as last listed (relists replace them at their `Synced`).
#[derive(Debug, Default)]
pub struct PolicyTable {
    current: Objects,
    relisting: Option<Objects>,
    /// Something the compiled state depends on changed since the last realization.
    pub dirty: bool,
}

impl PolicyTable {
    pub fn apply(&mut self, event: &WatchEvent) {
        let (object, upsert) = match event {
            WatchEvent::Relist => {
                self.relisting = Some(Objects::default());
                return;
            }
            WatchEvent::Synced { .. } => {
                if let Some(listed) = self.relisting.take() {
                    self.current = listed;
                    self.dirty = true;
                }
                return;
            }
            WatchEvent::Upsert { object } => (object, true),
            WatchEvent::Delete { object } => (object, false),
        };
        let target = self.relisting.as_mut().unwrap_or(&mut self.current);
        let changed = match object {
            Object::Namespace(n) => {
                let key = object.name().to_string();
                if upsert {
                    target.namespaces.insert(key, n.clone()) != Some(n.clone())
                } else {
                    target.namespaces.remove(&key).is_some()
                }
            }
            Object::Pod(p) => {
                let key = object.namespaced_name();
                if upsert {
                    target.pods.insert(key, p.clone()) != Some(p.clone())
                } else {
                    target.pods.remove(&key).is_some()
                }
            }
            Object::NetworkPolicy(p) => {
                let key = object.namespaced_name();
                if upsert {
                    target.policies.insert(key, p.clone()) != Some(p.clone())
                } else {
                    target.policies.remove(&key).is_some()
                }
            }
            Object::Node(n) => {
                let key = object.name().to_string();
                if upsert {
                    target.nodes.insert(key, n.clone()) != Some(n.clone())
                } else {
                    target.nodes.remove(&key).is_some()
                }
            }
            _ => false,
        };
        self.dirty |= changed;
    }

    /// Compiles everything (identities and rule ids stay stable through `alloc` and `rules`),
    /// reading the objects in place.
    pub fn compile(&self, alloc: &mut IdentityAllocator, rules: &mut RuleAllocator) -> PolicyState {
        PolicyState::compile_objects(
            self.current.namespaces.values(),
            self.current.pods.values(),
            self.current.policies.values(),
            self.current.nodes.values(),
            alloc,
            rules,
        )
    }

    /// Copies of the objects, as [`Inputs`] wants them (for a from-scratch compile).
    pub fn objects(&self) -> (Vec<Namespace>, Vec<Pod>, Vec<NetworkPolicy>, Vec<Node>) {
        (
            self.current.namespaces.values().cloned().collect(),
            self.current.pods.values().cloned().collect(),
            self.current.policies.values().cloned().collect(),
            self.current.nodes.values().cloned().collect(),
        )
    }

    /// Compiles from copies of the objects through [`Inputs`], the way `ferrum policy trace`
    /// does (rule ids numbered afresh).
    pub fn compile_from_scratch(&self, alloc: &mut IdentityAllocator) -> PolicyState {
        let (namespaces, pods, policies, nodes) = self.objects();
        PolicyState::compile(
            Inputs {
                namespaces: &namespaces,
                pods: &pods,
                policies: &policies,
                nodes: &nodes,
            },
            alloc,
        )
    }
}

/// One write to the policy maps (`None`: remove the entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyOp {
    Identity(u32, [u8; 4], Option<u32>),
    Cidr(u32, [u8; POLICY_CIDR_KEY_LEN], Option<u32>),
    Rule(u32, [u8; POLICY_KEY_LEN], Option<u32>),
    Endpoint(Ipv4Addr, Option<PolicyEndpoint>),
}

/// The kernel side of the policy stage.
pub trait PolicyDataplane {
    fn policy_maps(&mut self) -> anyhow::Result<PolicyMapsDump>;
    fn apply_policy_op(&mut self, op: &PolicyOp) -> anyhow::Result<()>;
    fn bump_policy_generation(&mut self) -> anyhow::Result<u32>;
}

/// `desired` as a dump, so both sides of the diff have one shape.
pub fn dump_of(desired: &NodeMaps) -> PolicyMapsDump {
    PolicyMapsDump {
        endpoints: desired
            .endpoints
            .iter()
            .map(|(ip, c)| {
                (
                    *ip,
                    PolicyEndpoint {
                        ingress_deny_rule: c.ingress_deny_rule,
                        egress_deny_rule: c.egress_deny_rule,
                    },
                )
            })
            .collect(),
        identities: desired.ipcache.entries(),
        cidr_classes: desired.cidr_classes.entries(),
        rules: desired.policy.entries(),
    }
}

/// Sorted by key (the kernel's dump order is not guaranteed; our own dumps are sorted).
fn sorted<K: Ord + Copy, T: Clone>(v: &[T], key: impl Fn(&T) -> K) -> std::borrow::Cow<'_, [T]> {
    if v.is_sorted_by_key(&key) {
        std::borrow::Cow::Borrowed(v)
    } else {
        let mut v = v.to_vec();
        v.sort_by_key(&key);
        std::borrow::Cow::Owned(v)
    }
}

/// Walks two key-sorted lists together: `changed` gets what `desired` has and `current` lacks
/// or has with another value, `gone` what only `current` has. Linear, allocation-free (a
/// change on a node with 100,000s of entries writes a handful).
fn merge_diff<K: Ord + Copy, V: PartialEq, T>(
    current: &[T],
    desired: &[T],
    kv: impl Fn(&T) -> (K, V),
    mut changed: impl FnMut(&T),
    mut gone: impl FnMut(&T),
) {
    let (mut i, mut j) = (0, 0);
    while i < current.len() || j < desired.len() {
        let c = current.get(i).map(&kv);
        let d = desired.get(j).map(&kv);
        match (c, d) {
            (Some((ck, cv)), Some((dk, dv))) if ck == dk => {
                if cv != dv {
                    changed(&desired[j]);
                }
                i += 1;
                j += 1;
            }
            (Some((ck, _)), Some((dk, _))) if ck < dk => {
                gone(&current[i]);
                i += 1;
            }
            (Some(_), None) => {
                gone(&current[i]);
                i += 1;
            }
            _ => {
                changed(&desired[j]);
                j += 1;
            }
        }
    }
}

fn diff_lpm<const N: usize>(
    current: &[(u32, [u8; N], u32)],
    desired: &[(u32, [u8; N], u32)],
    op: fn(u32, [u8; N], Option<u32>) -> PolicyOp,
    upserts: &mut Vec<PolicyOp>,
    removes: &mut Vec<PolicyOp>,
) {
    let key = |e: &(u32, [u8; N], u32)| (e.0, e.1);
    let (current, desired) = (sorted(current, key), sorted(desired, key));
    merge_diff(
        &current,
        &desired,
        |e| ((e.0, e.1), e.2),
        |e| upserts.push(op(e.0, e.1, Some(e.2))),
        |e| removes.push(op(e.0, e.1, None)),
    );
}

/// The writes that turn `current` into `desired`, in a safe order: identities, ipBlock classes
/// and allow rules first, then endpoints (so a newly isolated pod finds its allows), then the
/// removals (an endpoint is no longer isolated before its allows go).
pub fn diff(current: &PolicyMapsDump, desired: &PolicyMapsDump) -> Vec<PolicyOp> {
    let (mut ups, mut removes) = (Vec::new(), Vec::new());
    diff_lpm(
        &current.identities,
        &desired.identities,
        PolicyOp::Identity,
        &mut ups,
        &mut removes,
    );
    diff_lpm(
        &current.cidr_classes,
        &desired.cidr_classes,
        PolicyOp::Cidr,
        &mut ups,
        &mut removes,
    );
    diff_lpm(
        &current.rules,
        &desired.rules,
        PolicyOp::Rule,
        &mut ups,
        &mut removes,
    );
    let key = |e: &(Ipv4Addr, PolicyEndpoint)| e.0;
    let (cur, want) = (
        sorted(&current.endpoints, key),
        sorted(&desired.endpoints, key),
    );
    let mut gone = Vec::new();
    merge_diff(
        &cur,
        &want,
        |e| (e.0, e.1),
        |e| ups.push(PolicyOp::Endpoint(e.0, Some(e.1))),
        |e| gone.push(PolicyOp::Endpoint(e.0, None)),
    );
    // Endpoints leave first among the removals.
    let mut out = ups;
    out.extend(gone);
    out.extend(removes);
    out
}

/// What one reconciliation did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PolicyStats {
    pub writes: usize,
    pub removes: usize,
    pub generation: Option<u32>,
}

/// One endpoint's entries as last written, with the policy they were lowered from.
#[derive(Debug, Clone)]
struct AppliedEndpoint {
    ingress: Arc<DirectionPolicy>,
    egress: Arc<DirectionPolicy>,
    /// The endpoint's part of the maps (`identities` empty).
    maps: PolicyMapsDump,
}

impl AppliedEndpoint {
    fn lower(ep: &EndpointPolicy) -> Self {
        AppliedEndpoint {
            ingress: ep.ingress.clone(),
            egress: ep.egress.clone(),
            maps: dump_of(&lower_endpoint(ep)),
        }
    }

    /// Lowering depends on nothing else of the endpoint (its address is the key).
    fn unchanged(&self, ep: &EndpointPolicy) -> bool {
        let same = |a: &Arc<DirectionPolicy>, b: &Arc<DirectionPolicy>| Arc::ptr_eq(a, b) || a == b;
        same(&self.ingress, &ep.ingress) && same(&self.egress, &ep.egress)
    }
}

/// What the maps of the node hold, as last written by us.
#[derive(Debug, Clone)]
struct Applied {
    node: String,
    identities: Vec<(u32, [u8; 4], u32)>,
    endpoints: BTreeMap<Ipv4Addr, AppliedEndpoint>,
}

/// Keeps the identity allocator and the last state written, so a reconciliation reads the
/// kernel only after a restart or a failure, and lowers and diffs only the endpoints whose
/// policy changed (an endpoint's entries depend on nothing else; see `lower_endpoint`).
#[derive(Debug, Default)]
pub struct PolicyReconciler {
    alloc: IdentityAllocator,
    rules: RuleAllocator,
    applied: Option<Applied>,
}

/// Puts the endpoint parts together (the lists sorted, as a dump of ours is).
fn merge_parts<'a>(
    identities: Vec<(u32, [u8; 4], u32)>,
    parts: impl Iterator<Item = &'a PolicyMapsDump>,
) -> PolicyMapsDump {
    let mut out = PolicyMapsDump {
        identities,
        ..PolicyMapsDump::default()
    };
    for p in parts {
        out.endpoints.extend(p.endpoints.iter().copied());
        out.cidr_classes.extend(p.cidr_classes.iter().copied());
        out.rules.extend(p.rules.iter().copied());
    }
    out.endpoints.sort_by_key(|e| e.0);
    out.cidr_classes.sort();
    out.rules.sort();
    out
}

impl PolicyReconciler {
    /// Compiles `table`, lowers it for `node` and writes the difference. Returns the compiled
    /// state (for names of rules and identities) and what was written.
    pub fn reconcile<D: PolicyDataplane>(
        &mut self,
        dp: &mut D,
        table: &PolicyTable,
        node: &str,
    ) -> anyhow::Result<(PolicyState, PolicyStats)> {
        let state = table.compile(&mut self.alloc, &mut self.rules);
        let identities = state.lower_ipcache(node).entries();
        let local = state.endpoints.values().filter(|e| e.node == node);
        let (ops, applied) = match self.applied.take().filter(|a| a.node == node) {
            Some(mut applied) => {
                // Only the endpoints that came, went or changed policy take part in the diff:
                // their keys are theirs alone, so the rest would diff to nothing.
                let (mut before, mut after) = (Vec::new(), Vec::new());
                let mut endpoints = BTreeMap::new();
                for ep in local {
                    match applied.endpoints.remove(&ep.ip) {
                        Some(old) if old.unchanged(ep) => {
                            endpoints.insert(ep.ip, old);
                        }
                        old => {
                            let new = AppliedEndpoint::lower(ep);
                            before.extend(old.map(|o| o.maps));
                            after.push(new.maps.clone());
                            endpoints.insert(ep.ip, new);
                        }
                    }
                }
                before.extend(applied.endpoints.into_values().map(|o| o.maps));
                let current = merge_parts(applied.identities, before.iter());
                let desired = merge_parts(identities.clone(), after.iter());
                let applied = Applied {
                    node: node.to_string(),
                    identities,
                    endpoints,
                };
                (diff(&current, &desired), applied)
            }
            None => {
                let endpoints: BTreeMap<Ipv4Addr, AppliedEndpoint> = local
                    .map(|ep| (ep.ip, AppliedEndpoint::lower(ep)))
                    .collect();
                let desired = merge_parts(identities.clone(), endpoints.values().map(|e| &e.maps));
                let current = dp.policy_maps()?;
                let applied = Applied {
                    node: node.to_string(),
                    identities,
                    endpoints,
                };
                (diff(&current, &desired), applied)
            }
        };
        let mut stats = PolicyStats::default();
        for op in &ops {
            // On failure `applied` stays empty: the next run starts from the kernel's maps.
            dp.apply_policy_op(op)?;
            let removal = matches!(
                op,
                PolicyOp::Identity(_, _, None)
                    | PolicyOp::Cidr(_, _, None)
                    | PolicyOp::Rule(_, _, None)
                    | PolicyOp::Endpoint(_, None)
            );
            if removal {
                stats.removes += 1;
            } else {
                stats.writes += 1;
            }
        }
        if !ops.is_empty() {
            stats.generation = Some(dp.bump_policy_generation()?);
        }
        self.applied = Some(applied);
        Ok((state, stats))
    }
}

impl PolicyDataplane for crate::kernel::KernelDataplane {
    fn policy_maps(&mut self) -> anyhow::Result<PolicyMapsDump> {
        use anyhow::Context;
        self.datapath
            .policy_maps()
            .context("reading the policy maps")
    }

    fn apply_policy_op(&mut self, op: &PolicyOp) -> anyhow::Result<()> {
        use anyhow::Context;
        let dp = &mut self.datapath;
        match *op {
            PolicyOp::Identity(l, d, Some(v)) => dp.upsert_identity(l, d, v),
            PolicyOp::Identity(l, d, None) => dp.remove_identity(l, d),
            PolicyOp::Cidr(l, d, Some(v)) => dp.upsert_policy_cidr(l, d, v),
            PolicyOp::Cidr(l, d, None) => dp.remove_policy_cidr(l, d),
            PolicyOp::Rule(l, d, Some(v)) => dp.upsert_policy_rule(l, d, v),
            PolicyOp::Rule(l, d, None) => dp.remove_policy_rule(l, d),
            PolicyOp::Endpoint(ip, Some(e)) => dp.upsert_policy_endpoint(ip, e),
            PolicyOp::Endpoint(ip, None) => dp.remove_policy_endpoint(ip),
        }
        .with_context(|| format!("writing the policy maps ({op:?})"))
    }

    fn bump_policy_generation(&mut self) -> anyhow::Result<u32> {
        use anyhow::Context;
        self.datapath
            .bump_policy_generation()
            .context("bumping the policy generation")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrum_policy::Direction;

    /// The policy maps in memory, written op by op.
    #[derive(Default)]
    struct MemPolicy {
        maps: PolicyMapsDump,
        generation: u32,
        ops: Vec<PolicyOp>,
    }

    fn put<const N: usize>(v: &mut Vec<(u32, [u8; N], u32)>, l: u32, d: [u8; N], val: Option<u32>) {
        v.retain(|(a, b, _)| (*a, *b) != (l, d));
        if let Some(x) = val {
            v.push((l, d, x));
            v.sort();
        }
    }

    impl PolicyDataplane for MemPolicy {
        fn policy_maps(&mut self) -> anyhow::Result<PolicyMapsDump> {
            // The kernel dumps in hash order, not sorted: give the reconciler unsorted lists.
            let mut m = self.maps.clone();
            m.endpoints.reverse();
            m.identities.reverse();
            m.cidr_classes.reverse();
            m.rules.reverse();
            Ok(m)
        }
        fn apply_policy_op(&mut self, op: &PolicyOp) -> anyhow::Result<()> {
            self.ops.push(op.clone());
            let m = &mut self.maps;
            match *op {
                PolicyOp::Identity(l, d, v) => put(&mut m.identities, l, d, v),
                PolicyOp::Cidr(l, d, v) => put(&mut m.cidr_classes, l, d, v),
                PolicyOp::Rule(l, d, v) => put(&mut m.rules, l, d, v),
                PolicyOp::Endpoint(ip, e) => {
                    m.endpoints.retain(|(a, _)| *a != ip);
                    if let Some(e) = e {
                        m.endpoints.push((ip, e));
                        m.endpoints.sort_by_key(|(a, _)| *a);
                    }
                }
            }
            Ok(())
        }
        fn bump_policy_generation(&mut self) -> anyhow::Result<u32> {
            self.generation += 1;
            Ok(self.generation)
        }
    }

    fn upsert(yaml: &str) -> WatchEvent {
        WatchEvent::Upsert {
            object: ferrum_model::parse_documents(yaml)
                .expect("valid object")
                .remove(0),
        }
    }

    fn pod(name: &str, app: &str, node: &str, ip: &str) -> WatchEvent {
        upsert(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: x, labels: {{app: {app}}}}}\n\
             spec: {{nodeName: {node}, containers: [{{name: c, image: i}}]}}\nstatus: {{podIP: {ip}}}\n"
        ))
    }

    const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
        metadata: {name: b-from-a, namespace: x}\n\
        spec: {podSelector: {matchLabels: {app: b}}, ingress: [{from: [{podSelector: {matchLabels: {app: a}}}]}]}\n";

    #[test]
    fn reconciles_by_diff_in_a_safe_order_and_bumps_the_generation_only_on_change() {
        let mut table = PolicyTable::default();
        table.apply(&upsert(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n",
        ));
        table.apply(&pod("a", "a", "n1", "10.1.0.5"));
        table.apply(&pod("b", "b", "n1", "10.1.0.6"));
        table.apply(&pod("r", "r", "n2", "10.1.1.7"));
        assert!(table.dirty);
        let mut dp = MemPolicy::default();
        let mut rec = PolicyReconciler::default();
        let (_, stats) = rec.reconcile(&mut dp, &table, "n1").expect("reconcile");
        // Not isolated yet: only identities and the two local endpoints (rules 0).
        assert_eq!(dp.maps.identities.len(), 3);
        assert_eq!(dp.maps.endpoints.len(), 2);
        assert!(dp.maps.rules.is_empty());
        assert_eq!(stats.generation, Some(1));

        table.apply(&upsert(POLICY));
        dp.ops.clear();
        let (state, stats) = rec.reconcile(&mut dp, &table, "n1").expect("reconcile");
        let b: Ipv4Addr = "10.1.0.6".parse().expect("ip");
        let isolating = state.endpoints[&b].ingress.isolated_by[0];
        assert_eq!(
            dp.maps
                .endpoints
                .iter()
                .find(|(ip, _)| *ip == b)
                .map(|e| e.1),
            Some(PolicyEndpoint {
                ingress_deny_rule: isolating,
                egress_deny_rule: 0
            })
        );
        let endpoint_at = dp
            .ops
            .iter()
            .position(|o| matches!(o, PolicyOp::Endpoint(..)))
            .expect("endpoint written");
        let last_rule = dp
            .ops
            .iter()
            .rposition(|o| matches!(o, PolicyOp::Rule(..)))
            .expect("rules written");
        assert!(last_rule < endpoint_at, "allows go in first: {:?}", dp.ops);
        assert_eq!((stats.removes, stats.generation), (0, Some(2)));

        // Nothing changed: nothing written, no new generation.
        dp.ops.clear();
        let (_, stats) = rec.reconcile(&mut dp, &table, "n1").expect("reconcile");
        assert!(dp.ops.is_empty());
        assert_eq!(stats.generation, None);

        // The policy goes: the endpoint is no longer isolated before its allows are removed.
        table.apply(&WatchEvent::Delete {
            object: ferrum_model::parse_documents(POLICY)
                .expect("valid")
                .remove(0),
        });
        dp.ops.clear();
        rec.reconcile(&mut dp, &table, "n1").expect("reconcile");
        let endpoint_at = dp
            .ops
            .iter()
            .position(|o| matches!(o, PolicyOp::Endpoint(..)))
            .expect("endpoint rewritten");
        let first_removal = dp
            .ops
            .iter()
            .position(|o| matches!(o, PolicyOp::Rule(_, _, None)))
            .expect("rules removed");
        assert!(endpoint_at < first_removal, "{:?}", dp.ops);
        assert!(dp.maps.rules.is_empty());

        // A restarted agent starts from the kernel's maps and writes nothing new.
        let mut fresh = PolicyReconciler::default();
        dp.ops.clear();
        fresh.reconcile(&mut dp, &table, "n1").expect("reconcile");
        assert!(dp.ops.is_empty(), "{:?}", dp.ops);
    }

    #[test]
    fn adding_a_policy_writes_only_the_entries_of_the_pods_it_selects() {
        let mut table = PolicyTable::default();
        table.apply(&upsert(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n",
        ));
        table.apply(&pod("a", "a", "n1", "10.1.0.5"));
        table.apply(&pod("b", "b", "n1", "10.1.0.6"));
        table.apply(&pod("c", "c", "n1", "10.1.0.7"));
        table.apply(&upsert(POLICY));
        let mut dp = MemPolicy::default();
        let mut rec = PolicyReconciler::default();
        rec.reconcile(&mut dp, &table, "n1").expect("reconcile");
        let before = dp.maps.clone();
        // Sorts before b-from-a: with rule ids numbered in name order, b's entries would be
        // renumbered and rewritten too.
        table.apply(&upsert(
            &POLICY
                .replace("b-from-a", "a-c-from-a")
                .replace("app: b", "app: c"),
        ));
        dp.ops.clear();
        let (state, stats) = rec.reconcile(&mut dp, &table, "n1").expect("reconcile");
        let c = Ipv4Addr::new(10, 1, 0, 7);
        assert!(stats.writes > 0);
        for op in &dp.ops {
            let endpoint = match op {
                PolicyOp::Rule(_, d, _) => Ipv4Addr::new(d[0], d[1], d[2], d[3]),
                PolicyOp::Cidr(_, d, _) => Ipv4Addr::new(d[0], d[1], d[2], d[3]),
                PolicyOp::Endpoint(ip, _) => *ip,
                PolicyOp::Identity(..) => panic!("identities unchanged: {op:?}"),
            };
            assert_eq!(endpoint, c, "only c's entries: {:?}", dp.ops);
        }
        let b = Ipv4Addr::new(10, 1, 0, 6);
        let b_rules = |m: &PolicyMapsDump| -> Vec<(u32, [u8; POLICY_KEY_LEN], u32)> {
            m.rules
                .iter()
                .filter(|r| r.1[..4] == b.octets())
                .copied()
                .collect()
        };
        assert_eq!(b_rules(&dp.maps), b_rules(&before));
        // The names are still right for both.
        let isolating = |ip: Ipv4Addr| state.endpoints[&ip].ingress.isolated_by[0];
        assert_eq!(state.rule(isolating(b)).expect("named").policy, "b-from-a");
        assert_eq!(
            state.rule(isolating(c)).expect("named").policy,
            "a-c-from-a"
        );
    }

    #[test]
    fn a_relist_replaces_the_objects() {
        let mut table = PolicyTable::default();
        table.apply(&pod("a", "a", "n1", "10.1.0.5"));
        table.apply(&WatchEvent::Relist);
        table.apply(&pod("b", "b", "n1", "10.1.0.6"));
        table.apply(&WatchEvent::Synced { revision: 2 });
        let state = table.compile(&mut IdentityAllocator::new(), &mut RuleAllocator::new());
        assert_eq!(state.pod_identities.len(), 1);
    }

    /// One change to the objects, from a small world where changes collide often.
    #[derive(Debug, Clone)]
    enum Change {
        Namespace(usize, usize),
        DeleteNamespace(usize),
        Pod {
            name: usize,
            ns: usize,
            app: usize,
            node: usize,
            ports: bool,
        },
        DeletePod(usize),
        Policy {
            name: usize,
            ns: usize,
            variant: usize,
        },
        DeletePolicy(usize, usize),
        Node(usize),
        DeleteNode(usize),
    }

    fn change() -> impl proptest::strategy::Strategy<Value = Change> {
        use proptest::prelude::*;
        prop_oneof![
            (0usize..2, 0usize..2).prop_map(|(n, t)| Change::Namespace(n, t)),
            (0usize..2).prop_map(Change::DeleteNamespace),
            (0usize..6, 0usize..2, 0usize..3, 0usize..2, any::<bool>()).prop_map(
                |(name, ns, app, node, ports)| Change::Pod {
                    name,
                    ns,
                    app,
                    node,
                    ports
                }
            ),
            (0usize..6).prop_map(Change::DeletePod),
            (0usize..3, 0usize..2, 0usize..5).prop_map(|(name, ns, variant)| Change::Policy {
                name,
                ns,
                variant
            }),
            (0usize..3, 0usize..2).prop_map(|(n, ns)| Change::DeletePolicy(n, ns)),
            (0usize..2).prop_map(Change::Node),
            (0usize..2).prop_map(Change::DeleteNode),
        ]
    }

    const NS: [&str; 2] = ["x", "y"];

    fn policy_yaml(name: usize, ns: usize, variant: usize) -> String {
        let spec = match variant {
            0 => {
                "{podSelector: {matchLabels: {app: a0}}, ingress: [{from: [{podSelector: {matchLabels: {app: a1}}}]}]}"
            }
            1 => {
                "{podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {team: t1}}}], ports: [{port: web}, {port: 90, endPort: 99}]}]}"
            }
            2 => {
                "{podSelector: {matchLabels: {app: a2}}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 10.244.0.0/16, except: [10.244.0.0/24]}}]}, {ports: [{port: web}]}]}"
            }
            3 => {
                "{podSelector: {matchExpressions: [{key: app, operator: NotIn, values: [a0]}]}, policyTypes: [Ingress, Egress]}"
            }
            _ => {
                "{podSelector: {matchLabels: {app: a1}}, egress: [{to: [{podSelector: {}}], ports: [{port: web}, {protocol: UDP, port: 53}]}]}"
            }
        };
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: q{name}, namespace: {}}}\nspec: {spec}\n",
            NS[ns]
        )
    }

    fn event(c: &Change) -> WatchEvent {
        let delete = |yaml: String| WatchEvent::Delete {
            object: ferrum_model::parse_documents(&yaml)
                .expect("valid object")
                .remove(0),
        };
        match *c {
            Change::Namespace(n, t) => upsert(&format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {}, labels: {{team: t{t}}}}}\n",
                NS[n]
            )),
            Change::DeleteNamespace(n) => delete(format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {}}}\n",
                NS[n]
            )),
            Change::Pod {
                name,
                ns,
                app,
                node,
                ports,
            } => {
                let ports = if ports {
                    "[{name: web, containerPort: 8080}]"
                } else {
                    "[]"
                };
                // A pod keeps its address whatever its namespace (names are unique here).
                upsert(&format!(
                    "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{name}, namespace: {}, labels: {{app: a{app}}}}}\n\
                     spec: {{nodeName: n{node}, containers: [{{name: c, image: i, ports: {ports}}}]}}\n\
                     status: {{podIP: 10.244.{}.{}}}\n",
                    NS[ns],
                    name % 2,
                    name + 1
                ))
            }
            Change::DeletePod(name) => WatchEvent::Delete {
                object: ferrum_model::parse_documents(&format!(
                    "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{name}, namespace: {}}}\n\
                     spec: {{containers: [{{name: c, image: i}}]}}\n",
                    NS[name % 2]
                ))
                .expect("valid")
                .remove(0),
            },
            Change::Policy { name, ns, variant } => upsert(&policy_yaml(name, ns, variant)),
            Change::DeletePolicy(name, ns) => delete(policy_yaml(name, ns, 0)),
            Change::Node(n) => upsert(&format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: n{n}}}\n\
                 status: {{addresses: [{{type: InternalIP, address: 10.0.0.{}}}]}}\n",
                n + 1
            )),
            Change::DeleteNode(n) => delete(format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: n{n}}}\n"
            )),
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 48, ..Default::default() })]
        /// After every change of a random sequence, the maps the reconciler wrote (diff by diff,
        /// from the last state written) equal the lowering of a from-scratch compile of the
        /// same objects, and the state it returns (rules, identities, endpoints, nodes: what
        /// trace and the flow directory read) equals that compile's.
        #[test]
        fn incremental_writes_equal_a_from_scratch_compile(
            changes in proptest::collection::vec(change(), 1..24)
        ) {
            let mut table = PolicyTable::default();
            let mut dp = MemPolicy::default();
            let mut rec = PolicyReconciler::default();
            for c in &changes {
                table.apply(&event(c));
                let (state, _) = rec.reconcile(&mut dp, &table, "n0").expect("reconcile");
                // The allocators now hold exactly the identities and rules in use, so a
                // from-scratch compile with copies of them numbers everything the same.
                let (namespaces, pods, policies, nodes) = table.objects();
                let want = PolicyState::compile_objects(
                    &namespaces, &pods, &policies, &nodes,
                    &mut rec.alloc.clone(), &mut rec.rules.clone(),
                );
                // ... and one numbered afresh (as `ferrum policy trace` compiles) names the
                // same policies and rules for every endpoint and direction.
                let fresh = table.compile_from_scratch(&mut rec.alloc.clone());
                for (ip, ep) in &state.endpoints {
                    for d in [Direction::Ingress, Direction::Egress] {
                        let names = |s: &PolicyState, e: &EndpointPolicy| -> Vec<String> {
                            let dp = e.direction(d);
                            dp.isolated_by.iter().chain(dp.grants.iter().map(|g| &g.rule))
                                .map(|r| s.rule(*r).expect("rule named").to_string())
                                .collect()
                        };
                        proptest::prop_assert_eq!(names(&state, ep), names(&fresh, &fresh.endpoints[ip]));
                    }
                }
                proptest::prop_assert_eq!(
                    serde_json::to_value(&state).expect("json"),
                    serde_json::to_value(&want).expect("json")
                );
                let want_maps = dump_of(&want.lower("n0"));
                proptest::prop_assert_eq!(&dp.maps, &want_maps, "after {:?}", c);
            }
            // A restarted agent diffs against the kernel's (unsorted) dump; its fresh allocator
            // may number identities differently, so compare with a compile numbered the same.
            PolicyReconciler::default().reconcile(&mut dp, &table, "n0").expect("reconcile");
            let (namespaces, pods, policies, nodes) = table.objects();
            let fresh = PolicyState::compile_objects(
                &namespaces, &pods, &policies, &nodes,
                &mut IdentityAllocator::new(), &mut RuleAllocator::new(),
            );
            proptest::prop_assert_eq!(&dp.maps, &dump_of(&fresh.lower("n0")));
        }
    }
}
