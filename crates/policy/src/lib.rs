//! Kubernetes NetworkPolicy (networking.k8s.io/v1) compiled for an eBPF datapath.
//!
//! Pure logic, no syscalls:
//! - [`selector`]: label selector matching (matchLabels, matchExpressions).
//! - [`identity`]: security identities. Pods with the same labels in the same namespace (with
//!   the same namespace labels) share one numeric identity, so the datapath's per-packet work
//!   depends on neither the number of pods nor the number of policies.
//! - [`compile`]: policies + pods + namespaces + nodes -> per-endpoint allow rules
//!   ([`PolicyState`]), and [`PolicyState::decide`], the reference verdict for a connection's
//!   first packet.
//! - [`lower`]: the same state as BPF map entries (ipcache, per-endpoint CIDR classes, an LPM
//!   policy map keyed by endpoint/direction/peer/protocol/port prefix) and a lookup over those
//!   entries that does exactly what the BPF program does; tests check it agrees with `decide`.
//! - [`trace`]: `ferrum policy trace`, the verdict and the policy/rule that decided it.

pub mod compile;
pub mod identity;
pub mod lower;
pub mod selector;
pub mod trace;

pub use compile::{
    CompileError, Decision, Direction, Inputs, PolicyState, Proto, Reason, RuleAllocator, RuleInfo,
};
pub use identity::{Identity, IdentityAllocator};
