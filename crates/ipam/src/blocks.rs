//! Overlay mode: one pod block (a /24 by default) per node, carved from the cluster pod CIDR,
//! as the Kubernetes node IPAM controller does it. Pure; the owner persists the assignments
//! (the lab keeps them in the Node objects' spec.podCIDR).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error(
        "node {node} cannot get a /{prefix} pod block: the pod CIDR {cidr} holds {total} and all \
         are assigned; expand it with `ferrum lab update --pod-cidr` to a larger CIDR containing {cidr}"
    )]
    Full {
        node: String,
        cidr: Ipv4Net,
        prefix: u8,
        total: u64,
    },
    #[error(
        "--pod-cidr {requested} does not contain the current pod CIDR {current}: the pod CIDR can \
         only be expanded (running pods keep their addresses), never shrunk or moved"
    )]
    NotSuperset {
        current: Ipv4Net,
        requested: Ipv4Net,
    },
    #[error("node {node}'s pod block {block} is not a /{prefix} inside the pod CIDR {cidr}")]
    Foreign {
        node: String,
        block: Ipv4Net,
        cidr: Ipv4Net,
        prefix: u8,
    },
    #[error("pod block {block} is assigned to both {first} and {second}")]
    Duplicate {
        block: Ipv4Net,
        first: String,
        second: String,
    },
    #[error("pod CIDR {cidr} is smaller than one /{prefix} node block")]
    TooSmall { cidr: Ipv4Net, prefix: u8 },
}

/// Which node holds which block of the cluster pod CIDR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockAllocator {
    cidr: Ipv4Net,
    prefix: u8,
    nodes: BTreeMap<String, Ipv4Net>,
}

impl BlockAllocator {
    pub fn new(cidr: Ipv4Net, prefix: u8) -> Result<Self, BlockError> {
        let cidr = cidr.trunc();
        if cidr.prefix_len() > prefix || prefix > 32 {
            return Err(BlockError::TooSmall { cidr, prefix });
        }
        Ok(Self {
            cidr,
            prefix,
            nodes: BTreeMap::new(),
        })
    }

    pub fn cidr(&self) -> Ipv4Net {
        self.cidr
    }

    pub fn block_of(&self, node: &str) -> Option<Ipv4Net> {
        self.nodes.get(node).copied()
    }

    pub fn total(&self) -> u64 {
        1u64 << (self.prefix - self.cidr.prefix_len())
    }

    /// Records a block a node already holds (from its Node object), checking it.
    pub fn adopt(&mut self, node: &str, block: Ipv4Net) -> Result<(), BlockError> {
        let block = block.trunc();
        if block.prefix_len() != self.prefix || !self.cidr.contains(&block) {
            return Err(BlockError::Foreign {
                node: node.into(),
                block,
                cidr: self.cidr,
                prefix: self.prefix,
            });
        }
        if let Some((other, _)) = self.nodes.iter().find(|(n, b)| **b == block && *n != node) {
            return Err(BlockError::Duplicate {
                block,
                first: other.clone(),
                second: node.into(),
            });
        }
        self.nodes.insert(node.into(), block);
        Ok(())
    }

    /// The node's block: the one it holds, or the lowest free one.
    pub fn assign(&mut self, node: &str) -> Result<Ipv4Net, BlockError> {
        if let Some(b) = self.nodes.get(node) {
            return Ok(*b);
        }
        let step = 1u64 << (32 - u32::from(self.prefix));
        let base = u64::from(u32::from(self.cidr.network()));
        let taken: std::collections::BTreeSet<Ipv4Net> = self.nodes.values().copied().collect();
        for i in 0..self.total() {
            let addr = Ipv4Addr::from(u32::try_from(base + i * step).unwrap_or(u32::MAX));
            let Ok(block) = Ipv4Net::new(addr, self.prefix) else {
                break;
            };
            if !taken.contains(&block) {
                self.nodes.insert(node.into(), block);
                return Ok(block);
            }
        }
        Err(BlockError::Full {
            node: node.into(),
            cidr: self.cidr,
            prefix: self.prefix,
            total: self.total(),
        })
    }

    pub fn release(&mut self, node: &str) -> Option<Ipv4Net> {
        self.nodes.remove(node)
    }

    /// Expands the pod CIDR to `larger`, which must contain the current one: every assigned
    /// block stays where it is.
    pub fn expand(&mut self, larger: Ipv4Net) -> Result<bool, BlockError> {
        let larger = larger.trunc();
        if !larger.contains(&self.cidr) {
            return Err(BlockError::NotSuperset {
                current: self.cidr,
                requested: larger,
            });
        }
        let changed = larger != self.cidr;
        self.cidr = larger;
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn assigns_lowest_free_and_refuses_when_full() {
        let mut a = BlockAllocator::new(net("10.244.0.0/23"), 24).unwrap();
        assert_eq!(a.assign("n0").unwrap(), net("10.244.0.0/24"));
        assert_eq!(a.assign("n1").unwrap(), net("10.244.1.0/24"));
        assert_eq!(a.assign("n0").unwrap(), net("10.244.0.0/24"));
        let e = a.assign("n2").unwrap_err().to_string();
        assert!(
            e.contains("n2") && e.contains("10.244.0.0/23") && e.contains("lab update"),
            "{e}"
        );
        a.release("n0");
        assert_eq!(a.assign("n2").unwrap(), net("10.244.0.0/24"));
    }

    #[test]
    fn expand_keeps_blocks_and_refuses_shrinking() {
        let mut a = BlockAllocator::new(net("10.244.0.0/24"), 24).unwrap();
        a.assign("n0").unwrap();
        assert!(a.assign("n1").is_err());
        let e = a.expand(net("10.245.0.0/16")).unwrap_err().to_string();
        assert!(
            e.contains("10.245.0.0/16") && e.contains("10.244.0.0/24"),
            "{e}"
        );
        assert!(a.expand(net("10.244.0.0/16")).unwrap());
        assert_eq!(a.block_of("n0"), Some(net("10.244.0.0/24")));
        assert_eq!(a.assign("n1").unwrap(), net("10.244.1.0/24"));
        let e = a.expand(net("10.244.0.0/20")).unwrap_err();
        assert!(matches!(e, BlockError::NotSuperset { .. }));
    }

    #[test]
    fn adopt_checks_shape_and_duplicates() {
        let mut a = BlockAllocator::new(net("10.244.0.0/16"), 24).unwrap();
        a.adopt("n0", net("10.244.3.0/24")).unwrap();
        assert!(matches!(
            a.adopt("n1", net("10.244.3.0/24")),
            Err(BlockError::Duplicate { .. })
        ));
        assert!(matches!(
            a.adopt("n1", net("10.9.3.0/24")),
            Err(BlockError::Foreign { .. })
        ));
        assert!(matches!(
            a.adopt("n1", net("10.244.4.0/25")),
            Err(BlockError::Foreign { .. })
        ));
        assert_eq!(a.assign("n1").unwrap(), net("10.244.0.0/24"));
    }

    proptest! {
        /// Random joins, leaves and expansions: no block on two nodes, every block inside the
        /// CIDR, a node keeps its block, and a refusal happens only when every block is taken.
        #[test]
        fn blocks_are_unique_and_stable(
            ops in proptest::collection::vec((0u8..3, 0u8..20), 1..100),
        ) {
            let mut a = BlockAllocator::new(net("10.244.0.0/22"), 24).unwrap();
            let mut prefix = 22u8;
            let mut held: BTreeMap<String, Ipv4Net> = BTreeMap::new();
            for (op, n) in ops {
                let node = format!("n{n}");
                match op {
                    0 => match a.assign(&node) {
                        Ok(b) => {
                            if let Some(before) = held.get(&node) { prop_assert_eq!(*before, b); }
                            held.insert(node, b);
                        }
                        Err(BlockError::Full { .. }) => prop_assert_eq!(held.len() as u64, a.total()),
                        Err(e) => prop_assert!(false, "{e}"),
                    },
                    1 => { a.release(&node); held.remove(&node); }
                    _ => if prefix > 18 {
                        prefix -= 1;
                        a.expand(Ipv4Net::new("10.244.0.0".parse().unwrap(), prefix).unwrap()).unwrap();
                    },
                }
                let blocks: BTreeSet<Ipv4Net> = held.values().copied().collect();
                prop_assert_eq!(blocks.len(), held.len());
                for (node, b) in &held {
                    prop_assert!(a.cidr().contains(b));
                    prop_assert_eq!(a.block_of(node), Some(*b));
                }
            }
        }
    }
}
