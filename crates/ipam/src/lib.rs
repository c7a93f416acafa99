//! IPAM for both modes. Overlay: a node's pod block (a prefix carved from the cluster pod CIDR) handed out one
//! address per attachment, plus a crash-safe file store for that state.
//!
//! [`Pool`] is the pure allocator: keyed by attachment, idempotent, round-robin so a freed
//! address is not reused at once. [`Store`] keeps a [`Pool`] on disk and writes every change
//! atomically before returning, so a crash at any instant never duplicates or leaks an address.
//! VNet mode ([`vnet`]): the same pool restricted to the addresses the cloud assigned to the
//! node, a batch [`Scaler`], and the cloud's [`SubnetAllocator`]. Overlay blocks per node:
//! [`BlockAllocator`].

pub mod blocks;
mod pool;
mod store;
pub mod vnet;

pub use blocks::{BlockAllocator, BlockError};
pub use pool::{Lease, Pool, PoolError};
pub use store::{Store, StoreError};
pub use vnet::{Scaler, SubnetAllocator};

/// Pods per node when nothing else is configured (the AKS overlay default).
pub const DEFAULT_MAX_PODS: u32 = 250;
