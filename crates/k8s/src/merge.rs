//! Turns the per-kind watcher streams (each with its own list/relist cycle) into the one
//! [`WatchEvent`] stream of [`ferrum_model::Source`]. Pure: it keeps the last good state of
//! every object, so a kind's relist (after 410 Gone or a reconnect) becomes exact Upserts and
//! Deletes against it, and objects that fail validation are reported, never passed on.

use std::collections::{BTreeMap, BTreeSet};

use ferrum_model::{Kind, Object, ValidationError, WatchEvent, normalize, validate};
use kube::runtime::watcher::Event;

type Key = (String, String);

fn key(object: &Object) -> Key {
    (
        object.namespace().unwrap_or_default().to_string(),
        object.name().to_string(),
    )
}

/// An object the agent will not use, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub object: Object,
    pub error: ValidationError,
}

/// FNV-1a: a hash every agent computes the same way, whatever its build.
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.bytes().chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Which node's agent records the Event for a rejected object, so a cluster of N nodes writes
/// one Event rather than N: a Pod's own node, a Node itself, anything else the node that wins
/// a rendezvous hash of the object over the known nodes (every agent sees the same Nodes, so
/// they agree without talking). With no known nodes, `me`.
pub fn event_reporter<'a>(
    object: &Object,
    nodes: impl IntoIterator<Item = &'a str>,
    me: &str,
) -> String {
    match object {
        Object::Pod(p) => {
            if let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.as_deref()) {
                return node.to_string();
            }
        }
        Object::Node(_) => return object.name().to_string(),
        _ => {}
    }
    let kind = Kind::of(object).name();
    let ns = object.namespace().unwrap_or_default();
    let name = object.name();
    nodes
        .into_iter()
        .max_by_key(|node| (fnv1a(&[node, kind, ns, name]), *node))
        .unwrap_or(me)
        .to_string()
}

#[derive(Debug, Default)]
pub struct Merger {
    cache: BTreeMap<Kind, BTreeMap<Key, Object>>,
    /// Kinds in the middle of a listing: what has been listed so far.
    listing: BTreeMap<Kind, BTreeMap<Key, Object>>,
    /// Kinds whose first listing has completed.
    listed: BTreeSet<Kind>,
    /// Something was passed on since the last Synced.
    dirty: bool,
    revision: u64,
}

/// What one watcher event produced.
#[derive(Debug, Default, PartialEq)]
pub struct Output {
    pub events: Vec<WatchEvent>,
    pub rejected: Vec<Rejected>,
}

impl Merger {
    /// The kinds every listing must have completed before the first Synced.
    pub fn new(kinds: impl IntoIterator<Item = Kind>) -> Self {
        let mut m = Self::default();
        for kind in kinds {
            m.cache.insert(kind, BTreeMap::new());
        }
        m
    }

    /// Every watched kind has been listed once.
    pub fn initialized(&self) -> bool {
        self.cache.keys().all(|k| self.listed.contains(k))
    }

    /// `kind`'s first listing has completed (its objects are the complete set).
    pub fn listed(&self, kind: Kind) -> bool {
        self.listed.contains(&kind)
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The objects currently passed on for `kind`.
    pub fn objects(&self, kind: Kind) -> impl Iterator<Item = &Object> {
        self.cache.get(&kind).into_iter().flat_map(|m| m.values())
    }

    /// Normalizes and validates; a rejected object keeps its last good version in force.
    fn admit(&self, kind: Kind, mut object: Object, out: &mut Output) -> Option<Object> {
        normalize(&mut object);
        // Bookkeeping of the API server's field managers: large, and nothing here reads it.
        object.metadata_mut().managed_fields = None;
        match validate(&object) {
            Ok(()) => Some(object),
            Err(error) => {
                out.rejected.push(Rejected {
                    object: object.clone(),
                    error,
                });
                self.cache.get(&kind)?.get(&key(&object)).cloned()
            }
        }
    }

    pub fn apply(&mut self, kind: Kind, event: Event<Object>) -> Output {
        let mut out = Output::default();
        match event {
            Event::Init => {
                self.listing.insert(kind, BTreeMap::new());
            }
            Event::InitApply(object) => {
                if let Some(object) = self.admit(kind, object, &mut out) {
                    self.listing
                        .entry(kind)
                        .or_default()
                        .insert(key(&object), object);
                }
            }
            Event::InitDone => {
                let listed = self.listing.remove(&kind).unwrap_or_default();
                let cache = self.cache.entry(kind).or_default();
                for (k, old) in cache.iter() {
                    if !listed.contains_key(k) {
                        out.events.push(WatchEvent::Delete {
                            object: old.clone(),
                        });
                    }
                }
                for (k, new) in &listed {
                    if cache.get(k) != Some(new) {
                        out.events.push(WatchEvent::Upsert {
                            object: new.clone(),
                        });
                    }
                }
                *cache = listed;
                self.listed.insert(kind);
                // The first completed listing of all kinds must close with a Synced even if
                // the cluster is empty.
                self.dirty = true;
            }
            Event::Apply(object) => {
                if let Some(object) = self.admit(kind, object, &mut out) {
                    let cache = self.cache.entry(kind).or_default();
                    let k = key(&object);
                    if cache.get(&k) != Some(&object) {
                        cache.insert(k, object.clone());
                        out.events.push(WatchEvent::Upsert { object });
                        self.dirty = true;
                    }
                }
            }
            Event::Delete(mut object) => {
                normalize(&mut object);
                let cache = self.cache.entry(kind).or_default();
                match cache.remove(&key(&object)) {
                    Some(last) => {
                        out.events.push(WatchEvent::Delete { object: last });
                        self.dirty = true;
                    }
                    // Never seen (or never valid): nothing downstream knows it.
                    None => tracing::debug!(
                        kind = kind.name(),
                        name = object.name(),
                        "delete of an object never passed on; ignored"
                    ),
                }
            }
        }
        out
    }

    /// Called when no watcher event is immediately ready: closes the batch with a Synced once
    /// every kind has been listed and something changed.
    pub fn flush(&mut self) -> Option<WatchEvent> {
        if self.dirty && self.initialized() {
            self.dirty = false;
            self.revision += 1;
            Some(WatchEvent::Synced {
                revision: self.revision,
            })
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Namespace, Node, NodeSpec};
    use k8s_openapi::api::networking::v1::{
        IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyPeer, NetworkPolicySpec,
    };
    use kube::api::ObjectMeta;

    fn node(name: &str, cidr: &str) -> Object {
        Object::Node(Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: Some(cidr.into()),
                ..Default::default()
            }),
            status: None,
        })
    }

    fn ns(name: &str) -> Object {
        Object::Namespace(Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        })
    }

    fn policy(cidr: &str) -> Object {
        Object::NetworkPolicy(NetworkPolicy {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            spec: Some(NetworkPolicySpec {
                egress: Some(vec![NetworkPolicyEgressRule {
                    to: Some(vec![NetworkPolicyPeer {
                        ip_block: Some(IPBlock {
                            cidr: cidr.into(),
                            except: None,
                        }),
                        ..Default::default()
                    }]),
                    ports: None,
                }]),
                policy_types: Some(vec!["Egress".into()]),
                ..Default::default()
            }),
        })
    }

    fn list(m: &mut Merger, kind: Kind, objects: Vec<Object>) -> Vec<WatchEvent> {
        let mut events = m.apply(kind, Event::Init).events;
        for o in objects {
            events.extend(m.apply(kind, Event::InitApply(o)).events);
        }
        events.extend(m.apply(kind, Event::InitDone).events);
        events
    }

    #[test]
    fn one_agent_reports_each_rejected_object() {
        let nodes = ["n1", "n2", "n3", "n4"];
        let p = policy("bogus");
        let chosen: Vec<String> = nodes
            .iter()
            .map(|me| event_reporter(&p, nodes, me))
            .collect();
        assert!(
            chosen.iter().all(|c| c == &chosen[0]),
            "all agree: {chosen:?}"
        );
        assert!(nodes.contains(&chosen[0].as_str()));
        // Independent of the order the nodes were listed in.
        assert_eq!(
            event_reporter(&p, nodes.iter().rev().copied(), "n1"),
            chosen[0]
        );
        // Objects spread over the nodes.
        let spread: std::collections::BTreeSet<String> = (0..40)
            .map(|i| {
                let mut o = policy("bogus");
                o.metadata_mut().name = Some(format!("p{i}"));
                event_reporter(&o, nodes, "n1")
            })
            .collect();
        assert!(spread.len() >= 3, "{spread:?}");
        assert_eq!(event_reporter(&node("x", "bad"), nodes, "n1"), "x");
        assert_eq!(event_reporter(&p, [], "me"), "me");
    }

    #[test]
    fn first_synced_waits_for_every_kind() {
        let mut m = Merger::new([Kind::Node, Kind::Namespace]);
        let ev = list(&mut m, Kind::Node, vec![node("a", "10.244.0.0/24")]);
        assert_eq!(ev.len(), 1);
        assert_eq!(m.flush(), None, "namespaces not listed yet");
        assert!(list(&mut m, Kind::Namespace, vec![]).is_empty());
        assert_eq!(m.flush(), Some(WatchEvent::Synced { revision: 1 }));
        assert_eq!(m.flush(), None, "nothing changed since");
    }

    #[test]
    fn relist_turns_into_exact_deletes_and_upserts() {
        let mut m = Merger::new([Kind::Node]);
        list(
            &mut m,
            Kind::Node,
            vec![node("a", "10.244.0.0/24"), node("b", "10.244.1.0/24")],
        );
        m.flush();
        // After 410 Gone: b vanished, c appeared, a unchanged.
        let ev = list(
            &mut m,
            Kind::Node,
            vec![node("a", "10.244.0.0/24"), node("c", "10.244.2.0/24")],
        );
        assert_eq!(
            ev,
            vec![
                WatchEvent::Delete {
                    object: node("b", "10.244.1.0/24")
                },
                WatchEvent::Upsert {
                    object: node("c", "10.244.2.0/24")
                },
            ]
        );
        assert_eq!(m.flush(), Some(WatchEvent::Synced { revision: 2 }));
    }

    #[test]
    fn unknown_deletes_and_unchanged_applies_pass_nothing_on() {
        let mut m = Merger::new([Kind::Namespace]);
        list(&mut m, Kind::Namespace, vec![ns("x")]);
        m.flush();
        assert_eq!(
            m.apply(Kind::Namespace, Event::Delete(ns("ghost"))),
            Output::default()
        );
        assert_eq!(
            m.apply(Kind::Namespace, Event::Apply(ns("x"))),
            Output::default()
        );
        assert_eq!(m.flush(), None);
        let out = m.apply(Kind::Namespace, Event::Delete(ns("x")));
        assert_eq!(out.events, vec![WatchEvent::Delete { object: ns("x") }]);
    }

    #[test]
    fn a_bad_object_is_rejected_and_the_last_good_version_stays() {
        let mut m = Merger::new([Kind::NetworkPolicy]);
        list(&mut m, Kind::NetworkPolicy, vec![policy("10.0.0.0/8")]);
        m.flush();
        let out = m.apply(Kind::NetworkPolicy, Event::Apply(policy("10.0.0.0/33")));
        assert!(out.events.is_empty());
        assert_eq!(out.rejected.len(), 1);
        assert!(
            out.rejected[0].error.to_string().contains("cidr"),
            "{}",
            out.rejected[0].error
        );
        assert_eq!(
            m.objects(Kind::NetworkPolicy).next(),
            Some(&policy("10.0.0.0/8"))
        );
        // In a relist too.
        let ev = list(&mut m, Kind::NetworkPolicy, vec![policy("bogus")]);
        assert!(ev.is_empty());
        assert_eq!(m.objects(Kind::NetworkPolicy).count(), 1);
        // A new bad object is simply not passed on.
        let mut fresh = Merger::new([Kind::NetworkPolicy]);
        assert!(list(&mut fresh, Kind::NetworkPolicy, vec![policy("bogus")]).is_empty());
        assert_eq!(fresh.objects(Kind::NetworkPolicy).count(), 0);
    }
}
