//! Flow observability, the pure part: datapath events plus endpoint context become flow
//! records whose JSON uses Hubble's field names; a bounded per-node ring keeps the latest;
//! filters, output formats and the Prometheus text format are shared by the agent and the CLI.

pub mod client;
pub mod directory;
pub mod filter;
pub mod format;
pub mod metrics;
pub mod record;
pub mod ring;
pub mod time;

pub use directory::{Directory, ServiceFrontend};
pub use filter::{Filter, FilterError};
pub use record::{Endpoint, Flow, FlowEvent, PolicyRef, ServiceRef, Verdict, build_flow};
pub use ring::FlowRing;
