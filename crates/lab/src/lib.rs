//! The lab: a whole Ferrum cluster built from network namespaces on one machine.
//!
//! - control plane: a persistent store of Kubernetes objects with a watch API
//!   (`api`, `store`, `controlplane`, `server`, `client`);
//! - infrastructure: the fabric (the "VNet" and the external host), one namespace and one agent
//!   per node, and a runtime per node that plays kubelet + containerd
//!   (`profile`, `fabric`, `runtime`, `daemon`).

pub mod api;
pub mod client;
pub mod cloud;
pub mod controlplane;
pub mod daemon;
pub mod endpointslice;
pub mod fabric;
pub mod lbroutes;
pub mod network_profile;
pub mod profile;
pub mod runtime;
pub mod server;
pub mod services;
pub mod store;
