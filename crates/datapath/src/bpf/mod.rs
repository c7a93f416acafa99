//! Loader and control plane of the eBPF datapath (bpf/ferrum.c): loads the embedded object,
//! pins maps and tcx links under a per-node bpffs directory, and reads/writes the maps.
//!
//! Pins are the datapath's persistence: maps are pinned by name under `pin_dir`, tcx links
//! under `pin_dir/links` (pods) and `pin_dir/links-dev` (overlay and uplink). A restarted agent
//! opens the same directory, reuses the maps and moves the pinned links to its freshly loaded
//! programs with an atomic link update, so forwarding never stops.

mod abi;
mod events;
mod lb;
pub mod packet;
mod policy;
mod sys;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use aya::maps::lpm_trie::Key as LpmKey;
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, MapInfo, PerCpuArray, RingBuf};
use aya::programs::links::{FdLink, LinkOrder, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{ProgramError, SchedClassifier, TcAttachType, TestRun, TestRunOptions};
use aya::{Ebpf, EbpfLoader};
use ipnet::Ipv4Net;

use abi::{
    CONFIG_FLAG_TRACE, CONFIG_FLAG_TRACE_ALL, CONFIG_SIZE, ENDPOINT_SIZE, FLOW_SLOT_SIZE,
    IPCACHE_KEY_SIZE, IPCACHE_VALUE_SIZE, NAT_KEY_SIZE, NAT_VALUE_SIZE, RawConfig, RawEndpoint,
    RawIpcacheValue, RawNatKey, RawNatValue, addr_from_raw, addr_to_raw, port_from_raw,
};
pub use events::{Event, EventKind, EventReader, Reason};
pub use lb::{LbBackend, LbConntrack, LbFrontendKey, LbService, MAGLEV_CHUNK, MAGLEV_SIZE};
pub use policy::{
    POLICY_CIDR_KEY_LEN, POLICY_KEY_LEN, PolicyConntrack, PolicyEndpoint, PolicyMapsDump,
};

/// tc verdicts returned by the programs (linux/pkt_cls.h).
pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;
pub const TC_ACT_REDIRECT: i32 = 7;

/// UDP port of the overlay; the programs let it through from_uplink without lookups
/// (bpf/ferrum.h FERRUM_VXLAN_PORT, checked by a test).
pub const VXLAN_PORT: u16 = 8472;

const BPFFS_ROOT: &str = "/sys/fs/bpf";
const POD_LINKS_DIR: &str = "links";
const DEVICE_LINKS_DIR: &str = "links-dev";
/// Pin suffix of the per-pod to_pod links older agents created.
const LEGACY_POD_EGRESS: &str = "egress";
/// Socket-level load balancing links (cgroup sock_addr hooks).
pub(crate) const CGROUP_LINKS_DIR: &str = "links-cgroup";

const MAP_CONFIG: &str = "ferrum_config";
const MAP_ENDPOINTS: &str = "ferrum_endpoints";
const MAP_IPCACHE: &str = "ferrum_ipcache";
const MAP_NAT: &str = "ferrum_nat";
const MAP_NAT_REV: &str = "ferrum_nat_rev";
/// First fragments' ports for the later fragments of their datagram (bpf/ferrum.h
/// `struct ferrum_frag_key` and `struct ferrum_frag_value`).
const MAP_FRAGS: &str = "ferrum_frags";
const FRAG_KEY_SIZE: usize = 12;
const FRAG_VALUE_SIZE: usize = 8;
/// `ferrum_nat_value.flags` (bpf/ferrum.h FERRUM_NAT_*).
const NAT_REPLIED: u16 = 1;
const NAT_CLOSING: u16 = 1 << 1;
const MAP_EVENTS: &str = "ferrum_events";
const MAP_EVENTS_LOST: &str = "ferrum_events_lost";
const MAP_FLOW_AGG: &str = "ferrum_flow_agg";
pub(crate) const MAP_LB_SERVICES: &str = "ferrum_lb_services";
pub(crate) const MAP_LB_BACKENDS: &str = "ferrum_lb_backends";
pub(crate) const MAP_LB_CT: &str = "ferrum_lb_ct";
pub(crate) const MAP_LB_REV: &str = "ferrum_lb_rev";
/// Last packet of each masqueraded client flow (values are `struct ferrum_nat_value`).
pub(crate) const MAP_LB_SNAT_SEEN: &str = "ferrum_lb_snat_seen";
pub(crate) const MAP_LB_MAGLEV: &str = "ferrum_lb_maglev";
pub(crate) const MAP_LB_AFFINITY: &str = "ferrum_lb_affinity";
pub(crate) const MAP_LB_RANGES: &str = "ferrum_lb_ranges";
pub(crate) const MAP_POL_ENDPOINTS: &str = "ferrum_pol_endpoints";
pub(crate) const MAP_POL_IPCACHE: &str = "ferrum_pol_ipcache";
pub(crate) const MAP_POL_CIDR: &str = "ferrum_pol_cidr";
pub(crate) const MAP_POLICY: &str = "ferrum_policy";
pub(crate) const MAP_POLICY_EXACT: &str = "ferrum_policy_exact";
pub(crate) const MAP_POL_CT: &str = "ferrum_pol_ct";

/// (map, key size, value size) of every pinned map, to refuse pins left by an incompatible build.
const MAP_LAYOUTS: [(&str, usize, usize); 21] = [
    (MAP_POLICY_EXACT, POLICY_KEY_LEN, 4),
    (MAP_POL_ENDPOINTS, 4, abi::POL_ENDPOINT_SIZE),
    (MAP_POL_IPCACHE, 4, 4),
    (MAP_POL_CIDR, abi::POL_CIDR_KEY_SIZE, 4),
    (MAP_POLICY, abi::POLICY_KEY_SIZE, 4),
    (MAP_POL_CT, NAT_KEY_SIZE, abi::POL_CT_SIZE),
    (MAP_FLOW_AGG, 4, FLOW_SLOT_SIZE),
    (MAP_CONFIG, 4, CONFIG_SIZE),
    (MAP_ENDPOINTS, 4, ENDPOINT_SIZE),
    (MAP_IPCACHE, IPCACHE_KEY_SIZE, IPCACHE_VALUE_SIZE),
    (MAP_NAT, NAT_KEY_SIZE, NAT_VALUE_SIZE),
    (MAP_NAT_REV, NAT_KEY_SIZE, NAT_VALUE_SIZE),
    (MAP_FRAGS, FRAG_KEY_SIZE, FRAG_VALUE_SIZE),
    (MAP_LB_SERVICES, abi::LB_KEY_SIZE, abi::LB_SERVICE_SIZE),
    (
        MAP_LB_BACKENDS,
        abi::LB_BACKEND_KEY_SIZE,
        abi::LB_BACKEND_SIZE,
    ),
    (MAP_LB_CT, NAT_KEY_SIZE, abi::LB_CT_SIZE),
    (MAP_LB_REV, NAT_KEY_SIZE, abi::LB_REV_SIZE),
    (MAP_LB_SNAT_SEEN, NAT_KEY_SIZE, NAT_VALUE_SIZE),
    (
        MAP_LB_MAGLEV,
        abi::LB_MAGLEV_KEY_SIZE,
        abi::LB_MAGLEV_VALUE_SIZE,
    ),
    (
        MAP_LB_AFFINITY,
        abi::LB_AFFINITY_KEY_SIZE,
        abi::LB_AFFINITY_SIZE,
    ),
    (MAP_LB_RANGES, abi::LB_RANGE_KEY_SIZE, 4),
];

/// aya parses ELF in place and wants it 8-byte aligned; include_bytes! only guarantees 1.
#[repr(C)]
struct Aligned<Bytes: ?Sized> {
    _align: [u64; 0],
    bytes: Bytes,
}

macro_rules! include_bytes_aligned {
    ($path:expr) => {{
        static ALIGNED: &Aligned<[u8]> = &Aligned {
            _align: [],
            bytes: *include_bytes!($path),
        };
        &ALIGNED.bytes
    }};
}

/// The compiled bpf/ferrum.c.
fn object() -> &'static [u8] {
    include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferrum.o"))
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot mount bpffs at {BPFFS_ROOT}: {source} (mount it by hand: mount -t bpf bpf {BPFFS_ROOT})"
    )]
    MountBpffs {
        #[source]
        source: nix::Error,
    },
    #[error("pin directory {0} is not on a bpffs; use a path under {BPFFS_ROOT}")]
    NotBpffs(PathBuf),
    #[error("cannot load the eBPF object (is this root on a kernel >= 6.6 with BTF?): {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("the eBPF object has no {what} named {name} (build mismatch)")]
    Missing {
        what: &'static str,
        name: &'static str,
    },
    #[error("program {program}: cannot {op}: {source}")]
    Program {
        program: &'static str,
        op: String,
        #[source]
        source: ProgramError,
    },
    #[error("map {map}: cannot {op}: {source}")]
    Map {
        map: &'static str,
        op: String,
        #[source]
        source: MapError,
    },
    #[error(
        "pinned map {path} has key/value size {found:?}, this build needs {expected:?}; \
         remove the stale pins (ferrum lab down, or remove the directory) and start again"
    )]
    IncompatiblePin {
        path: PathBuf,
        expected: (usize, usize),
        found: (u32, u32),
    },
    #[error("link {path}: cannot {op}: {reason}")]
    Link {
        path: PathBuf,
        op: &'static str,
        reason: String,
    },
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    #[error("the events ring buffer was already taken")]
    EventsTaken,
    #[error("cannot {op}: {source}")]
    Events {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Node-wide settings the programs read from `ferrum_config`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    pub node_ip: Ipv4Addr,
    pub cluster_cidr: Ipv4Net,
    pub local_block: Ipv4Net,
    pub overlay_ifindex: u32,
    pub uplink_ifindex: u32,
    pub vni: u32,
    pub nat_ports: std::ops::RangeInclusive<u16>,
    /// Emit a trace event per forwarded packet (costs throughput; drops are always reported).
    pub trace: bool,
}

/// Which forwarded packets produce flow (trace) events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowEvents {
    Off,
    /// TCP SYN/FIN/RST packets, and one event per other flow and observation point per second.
    Sampled,
    EveryPacket,
}

/// How full one BPF map is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapFill {
    pub name: &'static str,
    pub entries: u64,
    pub max_entries: u64,
}

/// A local pod as the programs see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    /// ifindex of the host-side veth in the node netns.
    pub ifindex: u32,
    pub pod_mac: [u8; 6],
    pub host_mac: [u8; 6],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PeerKind {
    LocalNode,
    RemoteNode,
    RemotePodBlock,
    LocalPodBlock,
}

impl PeerKind {
    fn code(self) -> u8 {
        match self {
            PeerKind::LocalNode => 1,
            PeerKind::RemoteNode => 2,
            PeerKind::RemotePodBlock => 3,
            PeerKind::LocalPodBlock => 4,
        }
    }

    fn from_code(code: u8) -> Option<PeerKind> {
        Some(match code {
            1 => PeerKind::LocalNode,
            2 => PeerKind::RemoteNode,
            3 => PeerKind::RemotePodBlock,
            4 => PeerKind::LocalPodBlock,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpcacheEntry {
    /// Node IP to tunnel to; None when the prefix is reached without the overlay.
    pub tunnel_endpoint: Option<Ipv4Addr>,
    pub kind: PeerKind,
}

/// One SNAT mapping (from the forward table, with whether its reverse half exists).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatEntry {
    pub proto: u8,
    /// Pod address and port (ICMP: echo id).
    pub pod: SocketAddrV4,
    pub remote: SocketAddrV4,
    /// Node address and allocated port (ICMP: echo id).
    pub nat: SocketAddrV4,
    pub has_reverse: bool,
    /// From the reverse entry: the remote side answered / a FIN or RST was seen.
    pub replied: bool,
    pub closing: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Program {
    FromPod,
    FromOverlay,
    ToOverlay,
    ToUplink,
    FromUplink,
    ToPod,
}

impl Program {
    pub const ALL: [Program; 6] = [
        Program::FromPod,
        Program::ToPod,
        Program::FromOverlay,
        Program::ToOverlay,
        Program::ToUplink,
        Program::FromUplink,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Program::FromPod => "from_pod",
            Program::FromOverlay => "from_overlay",
            Program::ToOverlay => "to_overlay",
            Program::ToUplink => "to_uplink",
            Program::FromUplink => "from_uplink",
            Program::ToPod => "to_pod",
        }
    }
}

/// Result of one BPF_PROG_TEST_RUN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestRunOutput {
    /// The program's verdict (TC_ACT_*).
    pub retval: i32,
    /// The packet as the program left it.
    pub frame: Vec<u8>,
    /// Average time per run as measured by the kernel.
    pub duration: Duration,
}

/// The loaded datapath of one node.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DatapathError {
    let path = path.to_path_buf();
    move |source| DatapathError::Io { op, path, source }
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|fs| fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Mounts bpffs at /sys/fs/bpf unless it is there already.
fn ensure_bpffs() -> Result<(), DatapathError> {
    let root = Path::new(BPFFS_ROOT);
    if is_bpffs(root) {
        return Ok(());
    }
    std::fs::create_dir_all(root).map_err(io_err("create", root))?;
    nix::mount::mount(
        Some("bpf"),
        root,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| DatapathError::MountBpffs { source })?;
    tracing::info!(path = BPFFS_ROOT, "mounted bpffs");
    Ok(())
}

/// Refuses pins whose layout differs from this build (a stale lab from an older version).
fn check_pinned_layouts(pin_dir: &Path) -> Result<(), DatapathError> {
    for (name, key, value) in MAP_LAYOUTS {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|source| DatapathError::Map {
            map: name,
            op: format!("read the pinned map at {}", path.display()),
            source,
        })?;
        if (info.key_size() as usize, info.value_size() as usize) != (key, value) {
            return Err(DatapathError::IncompatiblePin {
                path,
                expected: (key, value),
                found: (info.key_size(), info.value_size()),
            });
        }
    }
    Ok(())
}

/// One of our tc programs in a loaded object, as a classifier.
fn classifier_in(ebpf: &mut Ebpf, program: Program) -> Result<&mut SchedClassifier, DatapathError> {
    let name = program.name();
    ebpf.program_mut(name)
        .ok_or(DatapathError::Missing {
            what: "program",
            name,
        })?
        .try_into()
        .map_err(|source| DatapathError::Program {
            program: name,
            op: "use it as a classifier".into(),
            source,
        })
}

fn map_op_err(map: &'static str, op: impl Into<String>) -> impl FnOnce(MapError) -> DatapathError {
    let op = op.into();
    move |source| DatapathError::Map { map, op, source }
}

fn prefix_len_is_valid(net: Ipv4Net) -> Result<(), DatapathError> {
    if net.network() != net.addr() {
        return Err(DatapathError::InvalidConfig(format!(
            "{net} has host bits set; use {}",
            net.trunc()
        )));
    }
    Ok(())
}

impl Datapath {
    /// Mounts bpffs at /sys/fs/bpf if needed, creates pin_dir, loads the embedded object with
    /// maps pinned by name under pin_dir (existing pins are reused: that is how a restarted
    /// agent adopts the running datapath).
    pub fn open(pin_dir: &Path) -> Result<Datapath, DatapathError> {
        ensure_bpffs()?;
        std::fs::create_dir_all(pin_dir).map_err(io_err("create the pin directory", pin_dir))?;
        if !is_bpffs(pin_dir) {
            return Err(DatapathError::NotBpffs(pin_dir.to_path_buf()));
        }
        for sub in [POD_LINKS_DIR, DEVICE_LINKS_DIR] {
            let dir = pin_dir.join(sub);
            std::fs::create_dir_all(&dir).map_err(io_err("create the link pin directory", &dir))?;
        }
        check_pinned_layouts(pin_dir)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(object())
            .map_err(|e| DatapathError::Load(Box::new(e)))?;
        for program in Program::ALL {
            let name = program.name();
            let prog = classifier_in(&mut ebpf, program)?;
            // The verifier gives up with EAGAIN when a signal reaches the loading thread;
            // that says nothing about the program: try again.
            let mut attempt = 0;
            loop {
                match prog.load() {
                    Err(ProgramError::LoadError { io_error, .. })
                        if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < 3 =>
                    {
                        attempt += 1;
                        tracing::debug!(program = name, attempt, "verifier interrupted, retrying");
                    }
                    other => {
                        other.map_err(|source| DatapathError::Program {
                            program: name,
                            op: "load it (verifier)".into(),
                            source,
                        })?;
                        break;
                    }
                }
            }
        }
        tracing::debug!(pin_dir = %pin_dir.display(), "datapath loaded");
        Ok(Datapath {
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    fn map(&self, name: &'static str) -> Result<&Map, DatapathError> {
        self.ebpf
            .map(name)
            .ok_or(DatapathError::Missing { what: "map", name })
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut Map, DatapathError> {
        self.ebpf
            .map_mut(name)
            .ok_or(DatapathError::Missing { what: "map", name })
    }

    /// A typed read-only view of one of our hash maps.
    fn hash_map<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
    ) -> Result<HashMap<&MapData, K, V>, DatapathError> {
        HashMap::try_from(self.map(name)?).map_err(map_op_err(name, "open"))
    }

    /// A typed writable view of one of our hash maps.
    fn hash_map_mut<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, K, V>, DatapathError> {
        HashMap::try_from(self.map_mut(name)?).map_err(map_op_err(name, "open"))
    }

    fn classifier(&mut self, program: Program) -> Result<&mut SchedClassifier, DatapathError> {
        classifier_in(&mut self.ebpf, program)
    }

    pub fn set_config(&mut self, cfg: &NodeConfig) -> Result<(), DatapathError> {
        prefix_len_is_valid(cfg.cluster_cidr)?;
        prefix_len_is_valid(cfg.local_block)?;
        if !cfg.cluster_cidr.contains(&cfg.local_block) {
            return Err(DatapathError::InvalidConfig(format!(
                "local pod block {} is not inside the cluster pod CIDR {}",
                cfg.local_block, cfg.cluster_cidr
            )));
        }
        if *cfg.nat_ports.start() == 0 || cfg.nat_ports.is_empty() {
            return Err(DatapathError::InvalidConfig(format!(
                "NAT port range {}-{} must be non-empty and start above 0",
                cfg.nat_ports.start(),
                cfg.nat_ports.end()
            )));
        }
        if cfg.vni == 0 || cfg.vni >= 1 << 24 {
            return Err(DatapathError::InvalidConfig(format!(
                "VNI {} is outside 1..2^24",
                cfg.vni
            )));
        }
        let raw = RawConfig {
            node_ip: addr_to_raw(cfg.node_ip),
            cluster_cidr_addr: addr_to_raw(cfg.cluster_cidr.network()),
            cluster_cidr_prefix_len: u32::from(cfg.cluster_cidr.prefix_len()),
            local_block_addr: addr_to_raw(cfg.local_block.network()),
            local_block_prefix_len: u32::from(cfg.local_block.prefix_len()),
            overlay_ifindex: cfg.overlay_ifindex,
            uplink_ifindex: cfg.uplink_ifindex,
            vni: cfg.vni,
            nat_port_min: *cfg.nat_ports.start(),
            nat_port_max: *cfg.nat_ports.end(),
            flags: if cfg.trace { CONFIG_FLAG_TRACE } else { 0 },
            policy_gen: 0,
        };
        let mut array: Array<_, RawConfig> =
            Array::try_from(self.map_mut(MAP_CONFIG)?).map_err(map_op_err(MAP_CONFIG, "open"))?;
        // The policy generation belongs to the policy stage: keep it.
        let current = array
            .get(&0, 0)
            .map_err(map_op_err(MAP_CONFIG, "read the node config"))?;
        array
            .set(
                0,
                RawConfig {
                    policy_gen: current.policy_gen,
                    ..raw
                },
                0,
            )
            .map_err(map_op_err(MAP_CONFIG, "write the node config"))
    }

    /// tcx ingress from_pod on a host veth (in the calling thread's netns): the pod's one
    /// hook, since every tcx attach waits for an RCU grace period under RTNL and so sets the
    /// pace of CNI ADD. The link is pinned at pin_dir/links/<ifname>-ingress so it survives
    /// the agent; a pinned link for this ifname that is still attached is adopted, not
    /// duplicated. Idempotent.
    pub fn attach_pod(&mut self, ifname: &str) -> Result<(), DatapathError> {
        let dir = self.pin_dir.join(POD_LINKS_DIR);
        self.attach_pinned(
            Program::FromPod,
            ifname,
            TcAttachType::Ingress,
            &dir.join(format!("{ifname}-ingress")),
        )
    }

    /// Ok if nothing is attached.
    pub fn detach_pod(&mut self, ifname: &str) -> Result<(), DatapathError> {
        let dir = self.pin_dir.join(POD_LINKS_DIR);
        remove_link_pin(&dir.join(format!("{ifname}-ingress")))
    }

    /// Removes the per-pod egress links older agents pinned (to_pod on every host veth, now
    /// on the node's host device); returns how many there were.
    pub fn remove_legacy_pod_links(&mut self) -> Result<usize, DatapathError> {
        let dir = self.pin_dir.join(POD_LINKS_DIR);
        let entries = std::fs::read_dir(&dir).map_err(io_err("list", &dir))?;
        let mut removed = 0;
        for entry in entries {
            let entry = entry.map_err(io_err("list", &dir))?;
            let name = entry.file_name();
            if name
                .to_str()
                .is_some_and(|n| n.ends_with(&format!("-{LEGACY_POD_EGRESS}")))
            {
                remove_link_pin(&entry.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// to_pod on egress of the node's host device, where the host stack routes local pods.
    pub fn attach_host_device(&mut self, ifname: &str) -> Result<(), DatapathError> {
        let dir = self.pin_dir.join(DEVICE_LINKS_DIR);
        self.attach_pinned(
            Program::ToPod,
            ifname,
            TcAttachType::Egress,
            &dir.join(format!("{ifname}-egress")),
        )
    }

    /// from_overlay on ingress and to_overlay on egress of the VXLAN device.
    pub fn attach_overlay(&mut self, ifname: &str) -> Result<(), DatapathError> {
        let dir = self.pin_dir.join(DEVICE_LINKS_DIR);
        self.attach_pinned(
            Program::FromOverlay,
            ifname,
            TcAttachType::Ingress,
            &dir.join(format!("{ifname}-ingress")),
        )?;
        self.attach_pinned(
            Program::ToOverlay,
            ifname,
            TcAttachType::Egress,
            &dir.join(format!("{ifname}-egress")),
        )
    }

    /// from_uplink on ingress and to_uplink on egress of the node's uplink.
    pub fn attach_uplink(&mut self, ifname: &str) -> Result<(), DatapathError> {
        let dir = self.pin_dir.join(DEVICE_LINKS_DIR);
        self.attach_pinned(
            Program::FromUplink,
            ifname,
            TcAttachType::Ingress,
            &dir.join(format!("{ifname}-ingress")),
        )?;
        self.attach_pinned(
            Program::ToUplink,
            ifname,
            TcAttachType::Egress,
            &dir.join(format!("{ifname}-egress")),
        )
    }

    /// Interface names of the pods whose from_pod link is pinned.
    pub fn pinned_pod_links(&self) -> Result<Vec<String>, DatapathError> {
        let dir = self.pin_dir.join(POD_LINKS_DIR);
        let entries = std::fs::read_dir(&dir).map_err(io_err("list", &dir))?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err("list", &dir))?;
            if let Some(name) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix("-ingress"))
            {
                names.push(name.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    fn attach_pinned(
        &mut self,
        program: Program,
        ifname: &str,
        attach_type: TcAttachType,
        pin_path: &Path,
    ) -> Result<(), DatapathError> {
        let link_err = |op: &'static str, reason: String| DatapathError::Link {
            path: pin_path.to_path_buf(),
            op,
            reason,
        };
        if pin_path.exists() {
            match adoptable_link(pin_path, ifname, attach_type)? {
                Some(fd_link) => {
                    // Atomically move the running link to this loader's program (an upgrade
                    // installs new code without a gap; same code is a no-op in effect).
                    let link = SchedClassifierLink::try_from(fd_link).map_err(|e| {
                        link_err("use the pinned link as a tcx link", e.to_string())
                    })?;
                    let prog = self.classifier(program)?;
                    let id =
                        prog.attach_to_link(link)
                            .map_err(|source| DatapathError::Program {
                                program: program.name(),
                                op: format!("update the pinned link on {ifname}"),
                                source,
                            })?;
                    // Dropping our handle only closes the fd; the pin keeps the link attached.
                    drop(prog.take_link(id));
                    tracing::debug!(ifname, program = program.name(), "adopted pinned tcx link");
                    return Ok(());
                }
                None => {
                    tracing::info!(ifname, path = %pin_path.display(), "removing stale tcx link pin");
                    remove_link_pin(pin_path)?;
                }
            }
        }
        let prog = self.classifier(program)?;
        let id = prog
            .attach_with_options(ifname, attach_type, TcAttachOptions::TcxOrder(LinkOrder::default()))
            .map_err(|source| DatapathError::Program {
                program: program.name(),
                op: format!("attach with tcx to {ifname} ({attach_type:?}); does the interface exist in this netns?"),
                source,
            })?;
        let link = prog
            .take_link(id)
            .map_err(|source| DatapathError::Program {
                program: program.name(),
                op: format!("take the link on {ifname}"),
                source,
            })?;
        let fd_link = FdLink::try_from(link)
            .map_err(|e| link_err("turn the tcx link into an fd link", e.to_string()))?;
        fd_link
            .pin(pin_path)
            .map_err(|e| link_err("pin", e.to_string()))?;
        tracing::debug!(ifname, program = program.name(), "attached tcx link");
        Ok(())
    }

    pub fn upsert_endpoint(
        &mut self,
        ip: Ipv4Addr,
        ep: &EndpointInfo,
    ) -> Result<(), DatapathError> {
        let raw = RawEndpoint {
            ifindex: ep.ifindex,
            pod_mac: ep.pod_mac,
            host_mac: ep.host_mac,
            flags: 0,
        };
        let mut map = self.hash_map_mut::<u32, RawEndpoint>(MAP_ENDPOINTS)?;
        map.insert(addr_to_raw(ip), raw, 0)
            .map_err(map_op_err(MAP_ENDPOINTS, format!("insert {ip}")))
    }

    pub fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        let mut map = self.hash_map_mut::<u32, RawEndpoint>(MAP_ENDPOINTS)?;
        ignore_missing(map.remove(&addr_to_raw(ip)))
            .map_err(map_op_err(MAP_ENDPOINTS, format!("remove {ip}")))
    }

    pub fn endpoints(&self) -> Result<Vec<(Ipv4Addr, EndpointInfo)>, DatapathError> {
        let map = self.hash_map::<u32, RawEndpoint>(MAP_ENDPOINTS)?;
        let mut out = Vec::new();
        for item in map.iter() {
            let (key, raw) = item.map_err(map_op_err(MAP_ENDPOINTS, "iterate"))?;
            out.push((
                addr_from_raw(key),
                EndpointInfo {
                    ifindex: raw.ifindex,
                    pod_mac: raw.pod_mac,
                    host_mac: raw.host_mac,
                },
            ));
        }
        out.sort_by_key(|(ip, _)| *ip);
        Ok(out)
    }

    pub fn upsert_ipcache(
        &mut self,
        prefix: Ipv4Net,
        e: &IpcacheEntry,
    ) -> Result<(), DatapathError> {
        prefix_len_is_valid(prefix)?;
        let raw = RawIpcacheValue {
            tunnel_endpoint: e.tunnel_endpoint.map(addr_to_raw).unwrap_or(0),
            kind: e.kind.code(),
            ..RawIpcacheValue::default()
        };
        let mut trie: LpmTrie<_, u32, RawIpcacheValue> =
            LpmTrie::try_from(self.map_mut(MAP_IPCACHE)?)
                .map_err(map_op_err(MAP_IPCACHE, "open"))?;
        let key = LpmKey::new(
            u32::from(prefix.prefix_len()),
            addr_to_raw(prefix.network()),
        );
        trie.insert(&key, raw, 0)
            .map_err(map_op_err(MAP_IPCACHE, format!("insert {prefix}")))
    }

    /// Ok if absent.
    pub fn remove_ipcache(&mut self, prefix: Ipv4Net) -> Result<(), DatapathError> {
        let mut trie: LpmTrie<_, u32, RawIpcacheValue> =
            LpmTrie::try_from(self.map_mut(MAP_IPCACHE)?)
                .map_err(map_op_err(MAP_IPCACHE, "open"))?;
        let key = LpmKey::new(
            u32::from(prefix.prefix_len()),
            addr_to_raw(prefix.network()),
        );
        ignore_missing(trie.remove(&key))
            .map_err(map_op_err(MAP_IPCACHE, format!("remove {prefix}")))
    }

    pub fn ipcache(&self) -> Result<Vec<(Ipv4Net, IpcacheEntry)>, DatapathError> {
        let trie: LpmTrie<_, u32, RawIpcacheValue> =
            LpmTrie::try_from(self.map(MAP_IPCACHE)?).map_err(map_op_err(MAP_IPCACHE, "open"))?;
        let mut out = Vec::new();
        for item in trie.iter() {
            let (key, raw) = item.map_err(map_op_err(MAP_IPCACHE, "iterate"))?;
            let prefix_len = u8::try_from(key.prefix_len()).unwrap_or(u8::MAX);
            let Ok(prefix) = Ipv4Net::new(addr_from_raw(key.data()), prefix_len) else {
                tracing::warn!(
                    prefix_len,
                    "ipcache entry with an invalid prefix length skipped"
                );
                continue;
            };
            let Some(kind) = PeerKind::from_code(raw.kind) else {
                tracing::warn!(%prefix, kind = raw.kind, "ipcache entry of unknown kind skipped");
                continue;
            };
            let tunnel_endpoint =
                (raw.tunnel_endpoint != 0).then(|| addr_from_raw(raw.tunnel_endpoint));
            out.push((
                prefix,
                IpcacheEntry {
                    tunnel_endpoint,
                    kind,
                },
            ));
        }
        out.sort_by_key(|(p, _)| (p.network(), p.prefix_len()));
        Ok(out)
    }

    /// Current SNAT mappings (inspection and tests).
    pub fn nat_entries(&self) -> Result<Vec<NatEntry>, DatapathError> {
        let fwd = self.hash_map::<RawNatKey, RawNatValue>(MAP_NAT)?;
        let rev = self.hash_map::<RawNatKey, RawNatValue>(MAP_NAT_REV)?;
        let mut out = Vec::new();
        for item in fwd.iter() {
            let (key, value) = item.map_err(map_op_err(MAP_NAT, "iterate"))?;
            let rev_key = RawNatKey {
                addr_a: key.addr_b,
                addr_b: value.addr,
                port_a: key.port_b,
                port_b: value.port,
                proto: key.proto,
                pad: [0; 3],
            };
            let back = match rev.get(&rev_key, 0) {
                Ok(back) if back.addr == key.addr_a && back.port == key.port_a => Some(back),
                Ok(_) | Err(MapError::KeyNotFound) => None,
                Err(source) => return Err(map_op_err(MAP_NAT_REV, "look up")(source)),
            };
            let flag = |bit: u16| back.is_some_and(|b| b.flags & bit != 0);
            out.push(NatEntry {
                proto: key.proto,
                pod: SocketAddrV4::new(addr_from_raw(key.addr_a), port_from_raw(key.port_a)),
                remote: SocketAddrV4::new(addr_from_raw(key.addr_b), port_from_raw(key.port_b)),
                nat: SocketAddrV4::new(addr_from_raw(value.addr), port_from_raw(value.port)),
                has_reverse: back.is_some(),
                replied: flag(NAT_REPLIED),
                closing: flag(NAT_CLOSING),
            });
        }
        out.sort_by_key(|e| (e.proto, e.pod, e.remote));
        Ok(out)
    }

    /// Flow events for forwarded traffic: off, sampled (connection starts/ends, one per flow
    /// and second otherwise: the default) or every packet. Drops are always reported.
    pub fn set_flow_events(&mut self, mode: FlowEvents) -> Result<(), DatapathError> {
        let mut array: Array<_, RawConfig> =
            Array::try_from(self.map_mut(MAP_CONFIG)?).map_err(map_op_err(MAP_CONFIG, "open"))?;
        let mut raw = array
            .get(&0, 0)
            .map_err(map_op_err(MAP_CONFIG, "read the node config"))?;
        raw.flags &= !(CONFIG_FLAG_TRACE | CONFIG_FLAG_TRACE_ALL);
        raw.flags |= match mode {
            FlowEvents::Off => 0,
            FlowEvents::Sampled => CONFIG_FLAG_TRACE,
            FlowEvents::EveryPacket => CONFIG_FLAG_TRACE | CONFIG_FLAG_TRACE_ALL,
        };
        array
            .set(0, raw, 0)
            .map_err(map_op_err(MAP_CONFIG, "write the node config"))
    }

    /// Events the programs could not put into the full ring buffer, summed over CPUs.
    pub fn events_lost(&self) -> Result<u64, DatapathError> {
        let array: PerCpuArray<_, u64> = PerCpuArray::try_from(self.map(MAP_EVENTS_LOST)?)
            .map_err(map_op_err(MAP_EVENTS_LOST, "open"))?;
        let values = array
            .get(&0, 0)
            .map_err(map_op_err(MAP_EVENTS_LOST, "read"))?;
        Ok(values.iter().sum())
    }

    /// Entries and capacity of every keyed map (metrics; the per-CPU flow cache is always full).
    pub fn map_fill(&self) -> Result<Vec<MapFill>, DatapathError> {
        fn count<K: aya::Pod, V: aya::Pod>(
            dp: &Datapath,
            name: &'static str,
        ) -> Result<usize, DatapathError> {
            let map: HashMap<_, K, V> =
                HashMap::try_from(dp.map(name)?).map_err(map_op_err(name, "open"))?;
            Ok(map.keys().filter(Result::is_ok).count())
        }
        let counts = [
            (
                MAP_ENDPOINTS,
                count::<u32, RawEndpoint>(self, MAP_ENDPOINTS)?,
            ),
            (MAP_IPCACHE, self.ipcache()?.len()),
            (MAP_NAT, count::<RawNatKey, RawNatValue>(self, MAP_NAT)?),
            (
                MAP_NAT_REV,
                count::<RawNatKey, RawNatValue>(self, MAP_NAT_REV)?,
            ),
            (
                MAP_FRAGS,
                count::<[u8; FRAG_KEY_SIZE], [u8; FRAG_VALUE_SIZE]>(self, MAP_FRAGS)?,
            ),
            (
                MAP_LB_SERVICES,
                count::<abi::RawLbKey, abi::RawLbService>(self, MAP_LB_SERVICES)?,
            ),
            (
                MAP_LB_BACKENDS,
                count::<abi::RawLbBackendKey, abi::RawLbBackend>(self, MAP_LB_BACKENDS)?,
            ),
            (
                MAP_LB_CT,
                count::<RawNatKey, abi::RawLbCt>(self, MAP_LB_CT)?,
            ),
            (
                MAP_LB_REV,
                count::<RawNatKey, abi::RawLbRev>(self, MAP_LB_REV)?,
            ),
            (
                MAP_LB_SNAT_SEEN,
                count::<RawNatKey, RawNatValue>(self, MAP_LB_SNAT_SEEN)?,
            ),
            (
                MAP_POL_ENDPOINTS,
                count::<u32, abi::RawPolEndpoint>(self, MAP_POL_ENDPOINTS)?,
            ),
            (
                MAP_POL_IPCACHE,
                count::<[u8; 4], u32>(self, MAP_POL_IPCACHE)?,
            ),
            (
                MAP_POLICY_EXACT,
                count::<[u8; POLICY_KEY_LEN], u32>(self, MAP_POLICY_EXACT)?,
            ),
            (
                MAP_POL_CT,
                count::<RawNatKey, abi::RawPolCt>(self, MAP_POL_CT)?,
            ),
        ];
        let mut out = Vec::new();
        for (name, entries) in counts {
            let path = self.pin_dir.join(name);
            let info = MapInfo::from_pin(&path).map_err(map_op_err(name, "read its info"))?;
            out.push(MapFill {
                name,
                entries: entries as u64,
                max_entries: u64::from(info.max_entries()),
            });
        }
        Ok(out)
    }

    /// Takes the ring buffer reader (once).
    pub fn take_events(&mut self) -> Result<EventReader, DatapathError> {
        let map = self
            .ebpf
            .take_map(MAP_EVENTS)
            .ok_or(DatapathError::EventsTaken)?;
        let ring =
            RingBuf::try_from(map).map_err(map_op_err(MAP_EVENTS, "open the ring buffer"))?;
        Ok(EventReader { ring })
    }

    /// BPF_PROG_TEST_RUN of one program on a crafted frame (tests and benchmarks).
    /// `ctx_ifindex` becomes skb->ifindex and must name a device in the calling thread's netns
    /// (or be 0/1 for loopback).
    pub fn test_run(
        &mut self,
        prog: Program,
        frame: &[u8],
        ctx_ifindex: u32,
        repeat: u32,
    ) -> Result<TestRunOutput, DatapathError> {
        // struct __sk_buff up to and including `ifindex`; the kernel zero-fills the rest and
        // accepts only ingress_ifindex/ifindex (and a few others) as non-zero.
        const INGRESS_IFINDEX_OFF: usize = 36;
        const IFINDEX_OFF: usize = 40;
        let mut ctx = [0u8; IFINDEX_OFF + 4];
        ctx[INGRESS_IFINDEX_OFF..IFINDEX_OFF].copy_from_slice(&ctx_ifindex.to_ne_bytes());
        ctx[IFINDEX_OFF..].copy_from_slice(&ctx_ifindex.to_ne_bytes());
        // Room for programs that grow the packet.
        let mut out = vec![0u8; frame.len() + 256];
        let program = self.classifier(prog)?;
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                repeat: repeat.max(1),
                ..TestRunOptions::default()
            })
            .map_err(|source| DatapathError::Program {
                program: prog.name(),
                op: format!("BPF_PROG_TEST_RUN (ctx ifindex {ctx_ifindex})"),
                source,
            })?;
        out.truncate(result.data_size_out as usize);
        Ok(TestRunOutput {
            retval: result.return_value as i32,
            frame: out,
            duration: result.duration,
        })
    }
}

fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// Opens a pinned tcx link and returns it if it is still attached to `ifname` in this netns
/// with the expected direction; None if it is defunct (its device is gone or was recreated).
fn adoptable_link(
    pin_path: &Path,
    ifname: &str,
    attach_type: TcAttachType,
) -> Result<Option<FdLink>, DatapathError> {
    let pinned = match PinnedLink::from_pin(pin_path) {
        Ok(pinned) => pinned,
        Err(e) => {
            tracing::warn!(path = %pin_path.display(), error = %e, "unreadable link pin");
            return Ok(None);
        }
    };
    let fd_link: FdLink = pinned.into();
    let prog_id = fd_link
        .info()
        .map_err(|e| DatapathError::Link {
            path: pin_path.to_path_buf(),
            op: "read link info",
            reason: e.to_string(),
        })?
        .program_id();
    let attached = match SchedClassifier::query_tcx(ifname, attach_type) {
        Ok((_, programs)) => programs.iter().any(|p| p.id() == prog_id),
        Err(_) => false, // the interface does not exist (any more) in this netns
    };
    Ok(attached.then_some(fd_link))
}

/// Detaches a pinned link and removes its pin. Ok if absent.
fn remove_link_pin(path: &Path) -> Result<(), DatapathError> {
    sys::detach_and_unpin(path).map_err(io_err("detach and unpin the link", path))
}

/// Removes a whole pin directory (lab down): unpins links (detaching programs) and maps.
/// Ok if the directory does not exist.
pub fn remove_pins(pin_dir: &Path) -> Result<(), DatapathError> {
    if !pin_dir.exists() {
        return Ok(());
    }
    if !is_bpffs(pin_dir) {
        return Err(DatapathError::NotBpffs(pin_dir.to_path_buf()));
    }
    // Links first so programs detach before their maps disappear.
    for sub in [POD_LINKS_DIR, DEVICE_LINKS_DIR, CGROUP_LINKS_DIR] {
        let dir = pin_dir.join(sub);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries {
                let entry = entry.map_err(io_err("list", &dir))?;
                remove_link_pin(&entry.path())?;
            }
        }
    }
    std::fs::remove_dir_all(pin_dir).map_err(io_err("remove the pin directory", pin_dir))
}

#[cfg(test)]
mod header_tests {
    #[test]
    fn vxlan_port_matches_the_programs() {
        let header = include_str!("../../../../bpf/ferrum.h");
        let define = format!("#define FERRUM_VXLAN_PORT {}\n", super::VXLAN_PORT);
        assert!(header.contains(&define), "bpf/ferrum.h lacks `{define}`");
    }
}
