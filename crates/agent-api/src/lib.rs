//! The protocol between `ferrum-cni` and the node's `ferrum-agent`.
//!
//! One request per connection over a unix socket that only root can open: the client writes a
//! single JSON [`Request`] followed by a newline, the agent answers with a single JSON
//! [`Response`] followed by a newline and closes. Pure types, no I/O.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Where the agent listens when nothing else is configured (Kubernetes mode).
pub const DEFAULT_SOCKET: &str = "/run/ferrum/agent.sock";

/// The pod a container belongs to, from the runtime's CNI_ARGS (K8S_POD_*), when known.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
}

/// One attachment of a container to the network: CNI identifies it by container id + ifname.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentKey {
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum Request {
    /// Step 1 of CNI ADD: reserve an address (idempotent for the same key: the same address
    /// comes back). The reservation is durable before the agent answers.
    Allocate {
        key: AttachmentKey,
        netns: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pod: Option<PodRef>,
        /// The CNI network name (the conflist's `name`): GC is scoped to one network.
        #[serde(default)]
        network: String,
    },
    /// Step 2 of CNI ADD, after the plugin has built the veth pair and configured the pod side:
    /// the agent attaches the datapath to the host side and publishes the endpoint.
    Attach {
        key: AttachmentKey,
        host_ifname: String,
        host_ifindex: u32,
        host_mac: [u8; 6],
        pod_mac: [u8; 6],
    },
    /// CNI DEL: remove the endpoint and free its address. Unknown keys succeed.
    Release { key: AttachmentKey },
    /// CNI CHECK: does the agent hold this attachment, attached and published?
    Check { key: AttachmentKey },
    /// CNI GC: release every attachment of `network` not in `valid`. Attachments made for
    /// other networks served by the same agent (another runtime's conflist) are left alone.
    Gc {
        valid: Vec<AttachmentKey>,
        #[serde(default)]
        network: String,
    },
    /// CNI STATUS: can the agent serve ADD now?
    Status,
}

/// What the plugin needs to configure the pod side of the veth.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Allocation {
    /// The pod's address; configured as a /32 on the pod's interface.
    pub ip: Ipv4Addr,
    /// The block the address came from (reported in the CNI result).
    pub block: Ipv4Net,
    /// Link-local next hop the pod routes everything through (a permanent neighbour entry
    /// pointing at the host side's MAC, so the pod never ARPs for it).
    pub gateway: Ipv4Addr,
    pub mtu: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "camelCase")]
pub enum Reply {
    Allocated(Allocation),
    Done,
    /// Answer to Check.
    Present {
        ip: Ipv4Addr,
        host_ifname: String,
    },
    /// Answer to Gc.
    Collected {
        released: Vec<AttachmentKey>,
    },
    /// Answer to Status.
    Ready {
        free_ips: u32,
    },
}

/// Why the agent refused; the plugin maps this onto CNI error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ErrorKind {
    /// The agent cannot serve yet (no pod CIDR, datapath not loaded): try again later.
    NotReady,
    /// No address left in the node's block.
    Exhausted,
    /// The request itself is wrong (bad field): permanent.
    InvalidRequest,
    /// Check: the agent does not hold this attachment.
    NotFound,
    /// Anything else that failed inside the agent (kernel, store).
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {message}")]
#[serde(rename_all = "camelCase")]
pub struct AgentError {
    pub kind: ErrorKind,
    pub message: String,
}

impl AgentError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Response {
    Ok(Reply),
    Err(AgentError),
}

impl From<Result<Reply, AgentError>> for Response {
    fn from(r: Result<Reply, AgentError>) -> Self {
        match r {
            Ok(v) => Response::Ok(v),
            Err(e) => Response::Err(e),
        }
    }
}

impl From<Response> for Result<Reply, AgentError> {
    fn from(r: Response) -> Self {
        match r {
            Response::Ok(v) => Ok(v),
            Response::Err(e) => Err(e),
        }
    }
}

/// Host-side interface name for a container: `fe` + 12 hex digits of a stable hash of the
/// container id and ifname (interface names are at most 15 bytes).
pub fn host_ifname(key: &AttachmentKey) -> String {
    // FNV-1a 64: stable across releases, unlike std's DefaultHasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key
        .container_id
        .bytes()
        .chain([0u8])
        .chain(key.ifname.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("fe{:012x}", h & 0xffff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> AttachmentKey {
        AttachmentKey {
            container_id: id.into(),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn requests_round_trip_as_tagged_json() {
        let r = Request::Allocate {
            key: key("abc"),
            netns: "/run/netns/x".into(),
            pod: Some(PodRef {
                namespace: "default".into(),
                name: "a".into(),
                uid: String::new(),
            }),
            network: "ferrum".into(),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.contains(r#""op":"allocate""#), "{s}");
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
    }

    #[test]
    fn responses_round_trip() {
        let r: Response = Err(AgentError::new(ErrorKind::Exhausted, "node block full")).into();
        let s = serde_json::to_string(&r).unwrap();
        let back: Result<Reply, AgentError> = serde_json::from_str::<Response>(&s).unwrap().into();
        assert_eq!(back.unwrap_err().kind, ErrorKind::Exhausted);
    }

    #[test]
    fn host_ifname_is_short_stable_and_distinct() {
        let a = host_ifname(&key("0123456789abcdef"));
        assert_eq!(a.len(), 14);
        assert_eq!(a, host_ifname(&key("0123456789abcdef")));
        assert_ne!(a, host_ifname(&key("0123456789abcdeg")));
        let mut other = key("0123456789abcdef");
        other.ifname = "net1".into();
        assert_ne!(a, host_ifname(&other));
    }
}
