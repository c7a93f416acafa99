//! Stable numeric ids for frontends. The datapath keys backends by a frontend's id, so an id
//! must not move while the frontend exists; a restarted agent seeds the allocator with the ids
//! it finds in the kernel's maps and keeps them.

use std::collections::{BTreeMap, BTreeSet};

use crate::FrontendKey;

#[derive(Debug, Clone, Default)]
pub struct IdAllocator {
    ids: BTreeMap<FrontendKey, u32>,
    used: BTreeSet<u32>,
}

impl IdAllocator {
    /// Starts from the ids already in use (what the kernel holds). Duplicate ids keep the
    /// first key (in key order); the others get new ids at the next [`IdAllocator::assign`].
    pub fn seeded(existing: impl IntoIterator<Item = (FrontendKey, u32)>) -> Self {
        let mut a = IdAllocator::default();
        let mut sorted: Vec<(FrontendKey, u32)> = existing.into_iter().collect();
        sorted.sort();
        for (key, id) in sorted {
            if id != 0 && a.used.insert(id) {
                a.ids.insert(key, id);
            }
        }
        a
    }

    pub fn get(&self, key: &FrontendKey) -> Option<u32> {
        self.ids.get(key).copied()
    }

    /// Keeps the ids of `keys` that have one, gives the lowest free ids (from 1) to the rest,
    /// and frees the ids of keys no longer wanted. Returns the full assignment.
    pub fn assign<'k>(
        &mut self,
        keys: impl IntoIterator<Item = &'k FrontendKey>,
    ) -> BTreeMap<FrontendKey, u32> {
        let wanted: BTreeSet<FrontendKey> = keys.into_iter().copied().collect();
        self.ids.retain(|k, _| wanted.contains(k));
        self.used = self.ids.values().copied().collect();
        let mut next = 1u32;
        for key in &wanted {
            if self.ids.contains_key(key) {
                continue;
            }
            while self.used.contains(&next) {
                next += 1;
            }
            self.ids.insert(*key, next);
            self.used.insert(next);
        }
        self.ids.clone()
    }
}
