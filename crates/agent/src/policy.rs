//! NetworkPolicy: keeps the objects policy depends on (Namespaces, Pods, NetworkPolicies,
//! Nodes) from the watch stream, compiles them with `ferrum_policy` when any changed, lowers
//! the result for this node and reconciles the policy maps by diff. Allow entries go in before
//! the endpoints that rely on them and come out after, then the generation is bumped so that
//! tracked connections are judged again under the new policy on their next packet.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ferrum_datapath::bpf::{POLICY_CIDR_KEY_LEN, POLICY_KEY_LEN, PolicyEndpoint, PolicyMapsDump};
use ferrum_model::{Object, WatchEvent};
use ferrum_policy::lower::NodeMaps;
use ferrum_policy::{IdentityAllocator, Inputs, PolicyState};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;

type Name = (String, String);

fn name_of(o: &Object) -> Name {
    (
        o.namespace().unwrap_or("default").to_string(),
        o.name().to_string(),
    )
}

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
                let key = name_of(object);
                if upsert {
                    target.pods.insert(key, p.clone()) != Some(p.clone())
                } else {
                    target.pods.remove(&key).is_some()
                }
            }
            Object::NetworkPolicy(p) => {
                let key = name_of(object);
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

    /// Compiles everything (identities stay stable through `alloc`).
    pub fn compile(&self, alloc: &mut IdentityAllocator) -> PolicyState {
        let namespaces: Vec<Namespace> = self.current.namespaces.values().cloned().collect();
        let pods: Vec<Pod> = self.current.pods.values().cloned().collect();
        let policies: Vec<NetworkPolicy> = self.current.policies.values().cloned().collect();
        let nodes: Vec<Node> = self.current.nodes.values().cloned().collect();
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

fn diff_lpm<const N: usize>(
    current: &[(u32, [u8; N], u32)],
    desired: &[(u32, [u8; N], u32)],
    op: fn(u32, [u8; N], Option<u32>) -> PolicyOp,
    upserts: &mut Vec<PolicyOp>,
    removes: &mut Vec<PolicyOp>,
) {
    let cur: BTreeMap<(u32, [u8; N]), u32> =
        current.iter().map(|(l, d, v)| ((*l, *d), *v)).collect();
    let want: BTreeMap<(u32, [u8; N]), u32> =
        desired.iter().map(|(l, d, v)| ((*l, *d), *v)).collect();
    for ((l, d), v) in &want {
        if cur.get(&(*l, *d)) != Some(v) {
            upserts.push(op(*l, *d, Some(*v)));
        }
    }
    for (l, d) in cur.keys() {
        if !want.contains_key(&(*l, *d)) {
            removes.push(op(*l, *d, None));
        }
    }
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
    let cur: BTreeMap<Ipv4Addr, PolicyEndpoint> = current.endpoints.iter().copied().collect();
    let want: BTreeMap<Ipv4Addr, PolicyEndpoint> = desired.endpoints.iter().copied().collect();
    for (ip, e) in &want {
        if cur.get(ip) != Some(e) {
            ups.push(PolicyOp::Endpoint(*ip, Some(*e)));
        }
    }
    let gone: BTreeSet<Ipv4Addr> = cur
        .keys()
        .filter(|ip| !want.contains_key(ip))
        .copied()
        .collect();
    // Endpoints leave first among the removals.
    let mut out = ups;
    out.extend(gone.into_iter().map(|ip| PolicyOp::Endpoint(ip, None)));
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

/// Keeps the identity allocator and the last state written, so a reconciliation reads the
/// kernel only after a restart or a failure.
#[derive(Debug, Default)]
pub struct PolicyReconciler {
    alloc: IdentityAllocator,
    applied: Option<PolicyMapsDump>,
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
        let state = table.compile(&mut self.alloc);
        let desired = dump_of(&state.lower(node));
        let current = match self.applied.take() {
            Some(c) => c,
            None => dp.policy_maps()?,
        };
        let ops = diff(&current, &desired);
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
        self.applied = Some(desired);
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
            Ok(self.maps.clone())
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
    fn a_relist_replaces_the_objects() {
        let mut table = PolicyTable::default();
        table.apply(&pod("a", "a", "n1", "10.1.0.5"));
        table.apply(&WatchEvent::Relist);
        table.apply(&pod("b", "b", "n1", "10.1.0.6"));
        table.apply(&WatchEvent::Synced { revision: 2 });
        let state = table.compile(&mut IdentityAllocator::new());
        assert_eq!(state.pod_identities.len(), 1);
    }
}
