//! Security identities: the numbers the datapath matches policies on.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::selector::Labels;

/// A numeric security identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Identity(pub u32);

impl Identity {
    /// Not a peer; in the policy map it is the wildcard "any peer".
    pub const ANY: Identity = Identity(0);
    /// The endpoint's own node (health probes, host-network pods).
    pub const HOST: Identity = Identity(1);
    /// Anything outside the cluster.
    pub const WORLD: Identity = Identity(2);
    /// Another node of the cluster.
    pub const REMOTE_NODE: Identity = Identity(3);
    /// First identity given to pods; lower numbers are reserved.
    pub const FIRST_POD: u32 = 256;
    /// CIDR classes (see `lower`) are numbered from here, apart from pod identities.
    pub const FIRST_CIDR_CLASS: u32 = 1 << 24;

    pub fn is_reserved(self) -> bool {
        self.0 < Self::FIRST_POD
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Identity::ANY => write!(f, "any"),
            Identity::HOST => write!(f, "reserved:host"),
            Identity::WORLD => write!(f, "reserved:world"),
            Identity::REMOTE_NODE => write!(f, "reserved:remote-node"),
            Identity(n) => write!(f, "{n}"),
        }
    }
}

/// What an identity stands for: everything a selector can look at.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct IdentityKey {
    pub namespace: String,
    pub pod_labels: Labels,
    pub namespace_labels: Labels,
}

/// Hands out identities, stable across recompiles: a key keeps its number as long as some pod
/// has it, and numbers of keys no pod has any more are reused only after every other free
/// number (so a stale map entry is unlikely to name a new set of pods).
#[derive(Debug, Clone, Default)]
pub struct IdentityAllocator {
    by_key: BTreeMap<IdentityKey, Identity>,
    next: u32,
}

impl IdentityAllocator {
    pub fn new() -> Self {
        IdentityAllocator {
            by_key: BTreeMap::new(),
            next: Identity::FIRST_POD,
        }
    }

    pub fn get_or_allocate(&mut self, key: &IdentityKey) -> Identity {
        if self.next < Identity::FIRST_POD {
            self.next = Identity::FIRST_POD;
        }
        if let Some(id) = self.by_key.get(key) {
            return *id;
        }
        let id = Identity(self.next);
        self.next += 1;
        self.by_key.insert(key.clone(), id);
        id
    }

    /// Forgets every key `in_use` does not hold.
    pub fn retain(&mut self, in_use: impl Fn(&IdentityKey) -> bool) {
        self.by_key.retain(|k, _| in_use(k));
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ns: &str, pod: &str) -> IdentityKey {
        IdentityKey {
            namespace: ns.into(),
            pod_labels: [("pod".to_string(), pod.to_string())].into(),
            namespace_labels: Labels::new(),
        }
    }

    #[test]
    fn same_labels_share_identity_and_numbers_are_stable() {
        let mut a = IdentityAllocator::new();
        let x = a.get_or_allocate(&key("x", "a"));
        assert_eq!(a.get_or_allocate(&key("x", "a")), x);
        let y = a.get_or_allocate(&key("y", "a"));
        assert_ne!(
            x, y,
            "same labels in another namespace are another identity"
        );
        assert!(x.0 >= Identity::FIRST_POD && !x.is_reserved());
        a.retain(|k| k.namespace == "y");
        assert_eq!(a.get_or_allocate(&key("y", "a")), y);
        let again = a.get_or_allocate(&key("x", "a"));
        assert_ne!(
            again, x,
            "a released number is not handed out again at once"
        );
    }
}
