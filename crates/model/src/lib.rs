//! The cluster model: Kubernetes objects (k8s-openapi types) as Ferrum sees them, and the
//! [`Source`] interface through which an agent watches them — the lab's control plane and the
//! Kubernetes API server are two implementations of it. Pure: no I/O here.

pub mod kind;
pub mod nnc;
pub mod object;
pub mod parse;
pub mod source;
pub mod validate;

pub use kind::{Kind, ObjectRef};
pub use nnc::{NncScaler, NncSpec, NncStatus, NodeNetworkConfig};
pub use object::Object;
pub use parse::{ParseError, parse_documents};
pub use source::{AgentReport, IpRequester, Source, SourceError, WatchEvent};
pub use validate::{ValidationError, normalize, validate};
