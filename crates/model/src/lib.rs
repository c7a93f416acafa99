//! The cluster model: Kubernetes objects (k8s-openapi types) as Ferrum sees them, and the
//! [`Source`] interface through which an agent watches them — the lab's control plane and the
//! Kubernetes API server are two implementations of it. Pure: no I/O here.

pub mod object;
pub mod source;

pub use object::Object;
pub use source::{AgentReport, Source, SourceError, WatchEvent};
