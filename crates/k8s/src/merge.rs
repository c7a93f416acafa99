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
