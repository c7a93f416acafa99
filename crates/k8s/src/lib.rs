//! Kubernetes mode: the agent's [`ferrum_model::Source`] backed by the API server (kube-rs
//! watchers), Ferrum's custom resources, VNet batch claims with optimistic concurrency, and
//! the takeover of nodes from kube-proxy.

pub mod crd;
pub mod kubeproxy;
pub mod merge;
pub mod pool;
pub mod source;
pub mod vnet;

pub use source::{ConnectError, KubeSource};
