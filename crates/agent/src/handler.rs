//! The CNI API's request handling: IPAM and endpoint lifecycle over a [`Dataplane`].
//!
//! Every handler runs with the node state locked (one request at a time changes state), makes
//! the IPAM change durable before answering, and orders kernel and store steps so that a crash
//! between them never leaves an address free while it is still routed to a pod.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use ferrum_agent_api::{
    AgentError, Allocation, AttachmentKey, ErrorKind, PodRef, Reply, Request, host_ifname,
};
use ferrum_ipam::{PoolError, Store, StoreError};
use serde::{Deserialize, Serialize};

use crate::ipcache::PeerEntry;

/// Next hop every pod routes through; a permanent neighbour entry in the pod points it at the
/// host side of the veth, so it never needs to exist as an address anywhere.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// What the agent remembers about one attachment, next to its address in the IPAM store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    pub netns: String,
    /// The CNI network the runtime attached through (GC is per network).
    #[serde(default)]
    pub network: String,
    /// Set once the endpoint is attached (Attach succeeded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<EndpointSpec>,
}

impl Attachment {
    pub fn attached(&self) -> bool {
        self.endpoint.is_some()
    }
}

/// The host side of a pod's veth as the datapath needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSpec {
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub host_mac: [u8; 6],
    pub pod_mac: [u8; 6],
}

pub type IpamStore = Store<AttachmentKey, Attachment>;

/// The kernel operations behind the endpoint lifecycle. Each is idempotent: attaching twice
/// or detaching something already gone succeeds.
pub trait Dataplane: Send {
    /// Attaches the pod programs to the host veth, publishes the endpoint (map entry) and
    /// routes `ip/32` to the veth.
    fn attach_endpoint(&mut self, ip: Ipv4Addr, ep: &EndpointSpec) -> anyhow::Result<()>;
    /// Undoes [`Dataplane::attach_endpoint`]; parts already gone are skipped.
    fn detach_endpoint(&mut self, ip: Ipv4Addr, host_ifname: &str) -> anyhow::Result<()>;
    /// Whether the endpoint is published and attached as `ep` says.
    fn endpoint_present(&mut self, ip: Ipv4Addr, ep: &EndpointSpec) -> anyhow::Result<bool>;
    /// The ipcache as the kernel holds it.
    fn ipcache(&mut self) -> anyhow::Result<BTreeMap<Ipv4Net, PeerEntry>>;
    fn upsert_ipcache(&mut self, prefix: Ipv4Net, entry: &PeerEntry) -> anyhow::Result<()>;
    fn remove_ipcache(&mut self, prefix: Ipv4Net) -> anyhow::Result<()>;
    /// Points the datapath at this node's pod block (node config; idempotent).
    fn configure_block(&mut self, block: Ipv4Net) -> anyhow::Result<()>;
}

/// VNet mode: what the cloud last said about this node's addresses.
#[derive(Debug, Clone, Default)]
pub struct VnetState {
    /// The batch policy from the NodeNetworkConfig status (None until the cloud answered).
    pub scaler: Option<ferrum_ipam::Scaler>,
    /// The pod subnet had no address left for this node's last request.
    pub exhausted: bool,
    pub message: String,
    /// Addresses come in aligned batches of this prefix length and only whole batches can be
    /// given back (Kubernetes mode); None: any address can be (the lab cloud).
    pub batch_prefix_length: Option<u8>,
}

/// The node's mutable state; the server keeps it behind one mutex.
pub struct NodeState<D> {
    /// VNet mode state (None in overlay mode).
    pub vnet: Option<VnetState>,
    /// Wakes the VNet scaler after a change to the node's address use.
    pub wake: Option<std::sync::mpsc::Sender<()>>,
    pub store: IpamStore,
    pub dataplane: D,
    /// MTU pods get (uplink MTU minus VXLAN overhead).
    pub pod_mtu: u32,
    /// The source has confirmed this node's block (spec.podCIDR), and it is in the store.
    pub block_confirmed: bool,
    /// Why the agent is not ready, for Status and reports.
    pub not_ready_reason: Option<String>,
}

impl<D: Dataplane> NodeState<D> {
    pub fn new(store: IpamStore, dataplane: D, pod_mtu: u32) -> Self {
        Self {
            vnet: None,
            wake: None,
            store,
            dataplane,
            pod_mtu,
            block_confirmed: false,
            not_ready_reason: Some("waiting for this node's pod CIDR from the cluster".into()),
        }
    }

    pub fn ready(&self) -> bool {
        self.block_confirmed && self.store.pool().block().is_some()
    }

    fn require_ready(&self) -> Result<(), AgentError> {
        if self.ready() {
            return Ok(());
        }
        let why = self
            .not_ready_reason
            .clone()
            .unwrap_or_else(|| "the pod CIDR is not known yet".into());
        Err(AgentError::new(
            ErrorKind::NotReady,
            format!("agent not ready: {why}"),
        ))
    }

    /// Asks the VNet scaler to look at the node's address use again.
    pub fn wake_scaler(&self) {
        if let Some(w) = &self.wake {
            let _ = w.send(());
        }
    }

    /// VNet mode: the request this node should have in its NodeNetworkConfig spec, from its
    /// address use and the batch policy. Surplus addresses are first marked as being released,
    /// durably, so they are never handed to a pod again. None until the cloud has answered once.
    pub fn vnet_request(&mut self) -> Result<Option<ferrum_model::NncSpec>, StoreError> {
        let Some(scaler) = self.vnet.as_ref().and_then(|v| v.scaler) else {
            return Ok(None);
        };
        let pool = self.store.pool();
        let held = pool.capacity_unbounded();
        let target = scaler.target(pool.used(), held);
        if target < held {
            let n = (held - target) as usize;
            let batches = self.vnet.as_ref().and_then(|v| v.batch_prefix_length);
            let released = self.store.update(|p| {
                Ok(match batches {
                    Some(len) => p.mark_releasing_batches(n, len),
                    None => p.mark_releasing(n),
                })
            })?;
            // With whole batches there may be nothing to give back yet (pods in every batch).
            if !released.is_empty() {
                tracing::info!(
                    count = released.len(),
                    "releasing surplus addresses to the cloud"
                );
            }
        }
        Ok(Some(ferrum_model::NncSpec {
            requested_ip_count: target,
            ips_not_in_use: self.store.pool().releasing().iter().copied().collect(),
        }))
    }

    /// Serves one CNI API request.
    pub fn handle(&mut self, req: Request) -> Result<Reply, AgentError> {
        let changes_use = matches!(
            req,
            Request::Allocate { .. } | Request::Release { .. } | Request::Gc { .. }
        );
        let reply = self.handle_inner(req);
        if changes_use {
            self.wake_scaler();
        }
        reply
    }

    fn handle_inner(&mut self, req: Request) -> Result<Reply, AgentError> {
        match req {
            Request::Allocate {
                key,
                netns,
                pod,
                network,
            } => self.allocate(key, netns, pod, network),
            Request::Attach {
                key,
                host_ifname,
                host_ifindex,
                host_mac,
                pod_mac,
            } => self.attach(
                key,
                EndpointSpec {
                    host_ifname,
                    host_ifindex,
                    host_mac,
                    pod_mac,
                },
            ),
            Request::Release { key } => self.release(&key).map(|_| Reply::Done),
            Request::Check { key } => self.check(&key),
            Request::Gc { valid, network } => self.gc(valid, &network),
            Request::Status => {
                self.require_ready()?;
                Ok(Reply::Ready {
                    free_ips: self.store.pool().free(),
                })
            }
        }
    }

    fn allocate(
        &mut self,
        key: AttachmentKey,
        netns: String,
        pod: Option<PodRef>,
        network: String,
    ) -> Result<Reply, AgentError> {
        validate_key(&key)?;
        if netns.is_empty() {
            return Err(AgentError::new(
                ErrorKind::InvalidRequest,
                "allocate: netns is empty",
            ));
        }
        self.require_ready()?;
        let owner = Attachment {
            pod,
            netns,
            network,
            endpoint: None,
        };
        let (ip, fresh) = match self.store.allocate(key.clone(), owner) {
            Ok(v) => v,
            Err(StoreError::Pool(e @ PoolError::NoAddresses { .. })) => {
                let vnet = self.vnet.clone().unwrap_or_default();
                return Err(if vnet.exhausted {
                    AgentError::new(
                        ErrorKind::Exhausted,
                        format!(
                            "{}/{}: {e}; the cloud cannot assign more: {}. Delete pods to free \
                             addresses, or use a larger --pod-subnet",
                            key.container_id, key.ifname, vnet.message
                        ),
                    )
                } else {
                    AgentError::new(
                        ErrorKind::NotReady,
                        format!(
                            "{}/{}: {e}; waiting for the cloud to assign the next batch \
                             (try again later)",
                            key.container_id, key.ifname
                        ),
                    )
                });
            }
            Err(e) => return Err(store_error(&key, e)),
        };
        let block = self
            .store
            .pool()
            .block()
            .ok_or_else(|| AgentError::new(ErrorKind::NotReady, "the pod block disappeared"))?;
        if fresh {
            tracing::info!(container = %key.container_id, ifname = %key.ifname, %ip, "allocated");
        }
        Ok(Reply::Allocated(Allocation {
            ip,
            block,
            gateway: POD_GATEWAY,
            mtu: self.pod_mtu,
        }))
    }

    fn attach(&mut self, key: AttachmentKey, ep: EndpointSpec) -> Result<Reply, AgentError> {
        validate_key(&key)?;
        let expected = host_ifname(&key);
        // Only the veth named for this attachment: never let a request attach to, say, eth0.
        if ep.host_ifname != expected {
            return Err(AgentError::new(
                ErrorKind::InvalidRequest,
                format!(
                    "attach {}/{}: host interface must be {expected:?}, got {:?}",
                    key.container_id, key.ifname, ep.host_ifname
                ),
            ));
        }
        let lease = self.store.pool().get(&key).cloned().ok_or_else(|| {
            AgentError::new(
                ErrorKind::InvalidRequest,
                format!(
                    "attach {}/{}: no address allocated for this attachment; send Allocate first",
                    key.container_id, key.ifname
                ),
            )
        })?;
        self.dataplane.attach_endpoint(lease.ip, &ep).map_err(|e| {
            AgentError::new(
                ErrorKind::Internal,
                format!("attach {} for {}: {e:#}", ep.host_ifname, lease.ip),
            )
        })?;
        let mut owner = lease.owner;
        owner.endpoint = Some(ep);
        self.store
            .set_owner(&key, owner)
            .map_err(|e| store_error(&key, e))?;
        tracing::info!(container = %key.container_id, ip = %lease.ip, host_ifname = %expected, "endpoint attached");
        Ok(Reply::Done)
    }

    /// Detaches, then frees the address (never free while routed). Unknown keys succeed.
    fn release(&mut self, key: &AttachmentKey) -> Result<bool, AgentError> {
        let Some(lease) = self.store.pool().get(key).cloned() else {
            return Ok(false);
        };
        let ifname = lease
            .owner
            .endpoint
            .as_ref()
            .map(|e| e.host_ifname.clone())
            .unwrap_or_else(|| host_ifname(key));
        self.dataplane
            .detach_endpoint(lease.ip, &ifname)
            .map_err(|e| {
                AgentError::new(
                    ErrorKind::Internal,
                    format!("release {}: detaching {ifname}: {e:#}", lease.ip),
                )
            })?;
        self.store.release(key).map_err(|e| store_error(key, e))?;
        tracing::info!(container = %key.container_id, ip = %lease.ip, "released");
        Ok(true)
    }

    fn check(&mut self, key: &AttachmentKey) -> Result<Reply, AgentError> {
        let not_found = |what: &str| {
            AgentError::new(
                ErrorKind::NotFound,
                format!("check {}/{}: {what}", key.container_id, key.ifname),
            )
        };
        let lease = self
            .store
            .pool()
            .get(key)
            .cloned()
            .ok_or_else(|| not_found("the agent holds no address for it"))?;
        let ep = lease
            .owner
            .endpoint
            .ok_or_else(|| not_found("allocated but never attached"))?;
        let present = self
            .dataplane
            .endpoint_present(lease.ip, &ep)
            .map_err(|e| AgentError::new(ErrorKind::Internal, format!("check: {e:#}")))?;
        if !present {
            return Err(not_found(&format!(
                "endpoint {} on {} is missing from the datapath",
                lease.ip, ep.host_ifname
            )));
        }
        Ok(Reply::Present {
            ip: lease.ip,
            host_ifname: ep.host_ifname,
        })
    }

    fn gc(&mut self, valid: Vec<AttachmentKey>, network: &str) -> Result<Reply, AgentError> {
        let valid: BTreeSet<AttachmentKey> = valid.into_iter().collect();
        let stale: Vec<AttachmentKey> = self
            .store
            .pool()
            .leases()
            .filter(|(k, lease)| lease.owner.network == network && !valid.contains(*k))
            .map(|(k, _)| k)
            .cloned()
            .collect();
        let mut released = Vec::new();
        for key in stale {
            if self.release(&key)? {
                released.push(key);
            }
        }
        Ok(Reply::Collected { released })
    }
}

fn validate_key(key: &AttachmentKey) -> Result<(), AgentError> {
    if key.container_id.is_empty() || key.ifname.is_empty() {
        return Err(AgentError::new(
            ErrorKind::InvalidRequest,
            "attachment key needs a non-empty containerId and ifname",
        ));
    }
    Ok(())
}

fn store_error(key: &AttachmentKey, e: StoreError) -> AgentError {
    let kind = match &e {
        StoreError::Pool(PoolError::Exhausted { .. }) => ErrorKind::Exhausted,
        StoreError::Pool(PoolError::NoBlock) => ErrorKind::NotReady,
        _ => ErrorKind::Internal,
    };
    AgentError::new(kind, format!("{}/{}: {e}", key.container_id, key.ifname))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A dataplane held in memory: the endpoints it publishes and the veths that "exist".
    /// Stands in for the kernel only where the logic, not the kernel, is under test.
    #[derive(Default)]
    pub struct MemDataplane {
        pub endpoints: BTreeMap<Ipv4Addr, EndpointSpec>,
        pub ipcache: BTreeMap<Ipv4Net, PeerEntry>,
        /// Every ipcache write, to prove a reconcile touched only what differed.
        pub ipcache_writes: usize,
        pub block: Option<Ipv4Net>,
        pub fail: bool,
    }

    impl Dataplane for MemDataplane {
        fn attach_endpoint(&mut self, ip: Ipv4Addr, ep: &EndpointSpec) -> anyhow::Result<()> {
            anyhow::ensure!(!self.fail, "kernel refused");
            self.endpoints.insert(ip, ep.clone());
            Ok(())
        }
        fn detach_endpoint(&mut self, ip: Ipv4Addr, _: &str) -> anyhow::Result<()> {
            anyhow::ensure!(!self.fail, "kernel refused");
            self.endpoints.remove(&ip);
            Ok(())
        }
        fn endpoint_present(&mut self, ip: Ipv4Addr, ep: &EndpointSpec) -> anyhow::Result<bool> {
            Ok(self.endpoints.get(&ip) == Some(ep))
        }
        fn ipcache(&mut self) -> anyhow::Result<BTreeMap<Ipv4Net, PeerEntry>> {
            Ok(self.ipcache.clone())
        }
        fn upsert_ipcache(&mut self, prefix: Ipv4Net, entry: &PeerEntry) -> anyhow::Result<()> {
            self.ipcache_writes += 1;
            self.ipcache.insert(prefix, *entry);
            Ok(())
        }
        fn remove_ipcache(&mut self, prefix: Ipv4Net) -> anyhow::Result<()> {
            self.ipcache_writes += 1;
            self.ipcache.remove(&prefix);
            Ok(())
        }
        fn configure_block(&mut self, block: Ipv4Net) -> anyhow::Result<()> {
            self.block = Some(block);
            Ok(())
        }
    }

    pub fn key(id: &str) -> AttachmentKey {
        AttachmentKey {
            container_id: id.into(),
            ifname: "eth0".into(),
        }
    }

    fn ready_state(dir: &std::path::Path, max: u32) -> NodeState<MemDataplane> {
        let mut store = IpamStore::open(dir, max).unwrap();
        store.set_block("10.244.3.0/24".parse().unwrap()).unwrap();
        let mut s = NodeState::new(store, MemDataplane::default(), 1450);
        s.block_confirmed = true;
        s.not_ready_reason = None;
        s
    }

    fn alloc(s: &mut NodeState<MemDataplane>, id: &str) -> Result<Allocation, AgentError> {
        alloc_on(s, id, "ferrum")
    }

    fn alloc_on(
        s: &mut NodeState<MemDataplane>,
        id: &str,
        network: &str,
    ) -> Result<Allocation, AgentError> {
        match s.handle(Request::Allocate {
            key: key(id),
            netns: format!("/run/netns/{id}"),
            pod: None,
            network: network.into(),
        })? {
            Reply::Allocated(a) => Ok(a),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn attach_req(id: &str) -> Request {
        Request::Attach {
            key: key(id),
            host_ifname: host_ifname(&key(id)),
            host_ifindex: 7,
            host_mac: [2, 0, 0, 0, 0, 1],
            pod_mac: [2, 0, 0, 0, 0, 2],
        }
    }

    #[test]
    fn not_ready_until_block_confirmed() {
        let dir = tempfile::tempdir().unwrap();
        let store = IpamStore::open(dir.path(), 250).unwrap();
        let mut s = NodeState::new(store, MemDataplane::default(), 1450);
        assert_eq!(alloc(&mut s, "a").unwrap_err().kind, ErrorKind::NotReady);
        assert_eq!(
            s.handle(Request::Status).unwrap_err().kind,
            ErrorKind::NotReady
        );
    }

    #[test]
    fn allocate_is_idempotent_durable_and_has_gateway_and_mtu() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = ready_state(dir.path(), 250);
        let a = alloc(&mut s, "a").unwrap();
        assert_eq!(a.ip, "10.244.3.1".parse::<Ipv4Addr>().unwrap());
        assert_eq!((a.gateway, a.mtu), (POD_GATEWAY, 1450));
        assert_eq!(alloc(&mut s, "a").unwrap(), a);
        let reopened = IpamStore::open(dir.path(), 250).unwrap();
        assert_eq!(reopened.pool().get(&key("a")).unwrap().ip, a.ip);
    }

    #[test]
    fn exhausted_maps_to_exhausted() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = ready_state(dir.path(), 1);
        alloc(&mut s, "a").unwrap();
        let e = alloc(&mut s, "b").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Exhausted);
        assert!(e.message.contains("10.244.3.0/24"), "{}", e.message);
    }

    #[test]
    fn attach_publishes_and_check_sees_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = ready_state(dir.path(), 250);
        let a = alloc(&mut s, "a").unwrap();
        assert_eq!(s.handle(attach_req("a")).unwrap(), Reply::Done);
        assert_eq!(s.dataplane.endpoints[&a.ip].host_ifindex, 7);
        assert_eq!(
            s.handle(Request::Check { key: key("a") }).unwrap(),
            Reply::Present {
                ip: a.ip,
                host_ifname: host_ifname(&key("a"))
            }
        );
        // The attached flag is durable.
        let reopened = IpamStore::open(dir.path(), 250).unwrap();
        assert!(reopened.pool().get(&key("a")).unwrap().owner.attached());
        // Someone removed the map entry: Check reports it.
        s.dataplane.endpoints.clear();
        assert_eq!(
            s.handle(Request::Check { key: key("a") }).unwrap_err().kind,
            ErrorKind::NotFound
        );
    }

    #[test]
    fn attach_refuses_unknown_key_and_foreign_interface() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = ready_state(dir.path(), 250);
        assert_eq!(
            s.handle(attach_req("a")).unwrap_err().kind,
            ErrorKind::InvalidRequest
        );
        alloc(&mut s, "a").unwrap();
        let mut req = attach_req("a");
        if let Request::Attach { host_ifname, .. } = &mut req {
            *host_ifname = "eth0".into();
        }
        assert_eq!(s.handle(req).unwrap_err().kind, ErrorKind::InvalidRequest);
        assert!(s.dataplane.endpoints.is_empty());
    }

    #[test]
    fn failed_kernel_attach_is_not_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = ready_state(dir.path(), 250);
        alloc(&mut s, "a").unwrap();
        s.dataplane.fail = true;
        assert_eq!(
            s.handle(attach_req("a")).unwrap_err().kind,
            ErrorKind::Internal
        );
        assert!(!s.store.pool().get(&key("a")).unwrap().owner.attached());
    }

    #[test]
    fn release_detaches_then_frees_and_unknown_is_ok() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = ready_state(dir.path(), 250);
        let a = alloc(&mut s, "a").unwrap();
        s.handle(attach_req("a")).unwrap();
        // If the kernel refuses, the address stays allocated (it is still routed).
        s.dataplane.fail = true;
        assert!(s.handle(Request::Release { key: key("a") }).is_err());
        assert!(s.store.pool().get(&key("a")).is_some());
        s.dataplane.fail = false;
        assert_eq!(
            s.handle(Request::Release { key: key("a") }).unwrap(),
            Reply::Done
        );
        assert!(s.dataplane.endpoints.is_empty());
        assert!(s.store.pool().holder(a.ip).is_none());
        assert_eq!(
            s.handle(Request::Release { key: key("a") }).unwrap(),
            Reply::Done
        );
    }

    #[test]
    fn gc_releases_everything_not_valid() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = ready_state(dir.path(), 250);
        for id in ["a", "b", "c"] {
            alloc(&mut s, id).unwrap();
            s.handle(attach_req(id)).unwrap();
        }
        // Another runtime's network on the same agent: not this GC's business.
        alloc_on(&mut s, "other", "podman-net").unwrap();
        s.handle(attach_req("other")).unwrap();
        let reply = s
            .handle(Request::Gc {
                valid: vec![key("b")],
                network: "ferrum".into(),
            })
            .unwrap();
        assert_eq!(
            reply,
            Reply::Collected {
                released: vec![key("a"), key("c")]
            }
        );
        assert_eq!(s.dataplane.endpoints.len(), 2);
        assert_eq!(
            s.handle(Request::Status).unwrap(),
            Reply::Ready { free_ips: 248 }
        );
    }
}
