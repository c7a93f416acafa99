//! The service load balancer's maps: frontends, backends by (frontend id, slot), and the
//! connection tracking of balanced flows.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use aya::maps::MapError;

use aya::maps::LpmTrie;
use aya::maps::lpm_trie::Key as LpmKey;

use super::abi::{
    RawLbAffinity, RawLbAffinityKey, RawLbBackend, RawLbBackendKey, RawLbCt, RawLbKey,
    RawLbMaglevChunk, RawLbMaglevKey, RawLbRangeData, RawLbRev, RawLbService, RawNatKey,
    RawNatValue, addr_from_raw, addr_to_raw, port_from_raw,
};
use super::{
    Datapath, DatapathError, MAP_LB_AFFINITY, MAP_LB_BACKENDS, MAP_LB_CT, MAP_LB_MAGLEV,
    MAP_LB_RANGES, MAP_LB_REV, MAP_LB_SERVICES, MAP_LB_SNAT_SEEN, ignore_missing, map_op_err,
};

/// Backend slots per Maglev chunk (bpf/ferrum.h FERRUM_MAGLEV_CHUNK).
pub const MAGLEV_CHUNK: usize = 64;
/// Entries of a Maglev table (bpf/ferrum.h FERRUM_MAGLEV_SIZE).
pub const MAGLEV_SIZE: u32 = 32749;

const FLAG_MASQUERADE: u8 = 1;
const FLAG_SOURCE_RANGES: u8 = 2;
const ALGO_MAGLEV: u8 = 1;

/// A frontend: (address, port, IP protocol number, scope code: 0 internal, 1 external).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LbFrontendKey {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

/// What the programs know about a frontend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbService {
    pub id: u32,
    /// Backends are in slots 1..=count of this id; 0 rejects new flows.
    pub count: u16,
    pub masquerade: bool,
    pub source_ranges: bool,
    pub maglev: bool,
    /// Session affinity timeout in seconds, 0 for none.
    pub affinity_timeout: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LbBackend {
    pub addr: Ipv4Addr,
    pub port: u16,
}

/// One tracked balanced flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LbConntrack {
    pub proto: u8,
    pub client: SocketAddrV4,
    pub frontend: SocketAddrV4,
    pub backend: SocketAddrV4,
    pub id: u32,
    /// The client's address and port as the backend sees them, when they were replaced
    /// (hairpin, masquerade of external clients).
    pub snat: Option<SocketAddrV4>,
}

fn key_to_raw(k: &LbFrontendKey) -> RawLbKey {
    RawLbKey {
        addr: addr_to_raw(k.addr),
        port: k.port.to_be(),
        proto: k.proto,
        scope: k.scope,
    }
}

impl Datapath {
    pub fn lb_services(&self) -> Result<BTreeMap<LbFrontendKey, LbService>, DatapathError> {
        let map = self.hash_map::<RawLbKey, RawLbService>(MAP_LB_SERVICES)?;
        let mut out = BTreeMap::new();
        for item in map.iter() {
            let (k, v) = item.map_err(map_op_err(MAP_LB_SERVICES, "iterate"))?;
            out.insert(
                LbFrontendKey {
                    addr: addr_from_raw(k.addr),
                    port: port_from_raw(k.port),
                    proto: k.proto,
                    scope: k.scope,
                },
                LbService {
                    id: v.id,
                    count: v.count,
                    masquerade: v.flags & FLAG_MASQUERADE != 0,
                    source_ranges: v.flags & FLAG_SOURCE_RANGES != 0,
                    maglev: v.algorithm == ALGO_MAGLEV,
                    affinity_timeout: v.affinity_timeout,
                },
            );
        }
        Ok(out)
    }

    pub fn upsert_lb_service(
        &mut self,
        key: &LbFrontendKey,
        svc: &LbService,
    ) -> Result<(), DatapathError> {
        let raw = RawLbService {
            id: svc.id,
            count: svc.count,
            flags: if svc.masquerade { FLAG_MASQUERADE } else { 0 }
                | if svc.source_ranges {
                    FLAG_SOURCE_RANGES
                } else {
                    0
                },
            algorithm: if svc.maglev { ALGO_MAGLEV } else { 0 },
            affinity_timeout: svc.affinity_timeout,
            pad: 0,
        };
        let mut map = self.hash_map_mut::<RawLbKey, RawLbService>(MAP_LB_SERVICES)?;
        map.insert(key_to_raw(key), raw, 0).map_err(map_op_err(
            MAP_LB_SERVICES,
            format!("insert {}:{} proto {}", key.addr, key.port, key.proto),
        ))
    }

    /// Ok if absent.
    pub fn remove_lb_service(&mut self, key: &LbFrontendKey) -> Result<(), DatapathError> {
        let mut map = self.hash_map_mut::<RawLbKey, RawLbService>(MAP_LB_SERVICES)?;
        ignore_missing(map.remove(&key_to_raw(key))).map_err(map_op_err(
            MAP_LB_SERVICES,
            format!("remove {}:{} proto {}", key.addr, key.port, key.proto),
        ))
    }

    /// Every backend slot: (frontend id, slot) -> backend.
    pub fn lb_backends(&self) -> Result<BTreeMap<(u32, u32), LbBackend>, DatapathError> {
        let map = self.hash_map::<RawLbBackendKey, RawLbBackend>(MAP_LB_BACKENDS)?;
        let mut out = BTreeMap::new();
        for item in map.iter() {
            let (k, v) = item.map_err(map_op_err(MAP_LB_BACKENDS, "iterate"))?;
            out.insert(
                (k.id, k.slot),
                LbBackend {
                    addr: addr_from_raw(v.addr),
                    port: port_from_raw(v.port),
                },
            );
        }
        Ok(out)
    }

    pub fn upsert_lb_backend(
        &mut self,
        id: u32,
        slot: u32,
        b: &LbBackend,
    ) -> Result<(), DatapathError> {
        let mut map = self.hash_map_mut::<RawLbBackendKey, RawLbBackend>(MAP_LB_BACKENDS)?;
        let raw = RawLbBackend {
            addr: addr_to_raw(b.addr),
            port: b.port.to_be(),
            pad: 0,
        };
        map.insert(RawLbBackendKey { id, slot }, raw, 0)
            .map_err(map_op_err(
                MAP_LB_BACKENDS,
                format!("insert frontend {id} slot {slot}"),
            ))
    }

    /// Ok if absent.
    pub fn remove_lb_backend(&mut self, id: u32, slot: u32) -> Result<(), DatapathError> {
        let mut map = self.hash_map_mut::<RawLbBackendKey, RawLbBackend>(MAP_LB_BACKENDS)?;
        ignore_missing(map.remove(&RawLbBackendKey { id, slot })).map_err(map_op_err(
            MAP_LB_BACKENDS,
            format!("remove frontend {id} slot {slot}"),
        ))
    }

    /// Tracked balanced flows (inspection, tests, and purging flows of removed backends).
    pub fn lb_conntrack(&self) -> Result<Vec<LbConntrack>, DatapathError> {
        let map = self.hash_map::<RawNatKey, RawLbCt>(MAP_LB_CT)?;
        let mut out = Vec::new();
        for item in map.iter() {
            let (k, v) = item.map_err(map_op_err(MAP_LB_CT, "iterate"))?;
            out.push(LbConntrack {
                proto: k.proto,
                client: SocketAddrV4::new(addr_from_raw(k.addr_a), port_from_raw(k.port_a)),
                frontend: SocketAddrV4::new(addr_from_raw(k.addr_b), port_from_raw(k.port_b)),
                backend: SocketAddrV4::new(
                    addr_from_raw(v.backend_addr),
                    port_from_raw(v.backend_port),
                ),
                id: v.id,
                snat: (v.snat_addr != 0).then(|| {
                    SocketAddrV4::new(addr_from_raw(v.snat_addr), port_from_raw(v.snat_port))
                }),
            });
        }
        out.sort_by_key(|c| (c.proto, c.client, c.frontend));
        Ok(out)
    }

    /// Forgets a tracked flow and its reverse entry (its backend went away: the next packet
    /// picks a live one, or is rejected). Ok if absent.
    pub fn remove_lb_conntrack(&mut self, ct: &LbConntrack) -> Result<(), DatapathError> {
        let fwd = RawNatKey {
            addr_a: addr_to_raw(*ct.client.ip()),
            addr_b: addr_to_raw(*ct.frontend.ip()),
            port_a: ct.client.port().to_be(),
            port_b: ct.frontend.port().to_be(),
            proto: ct.proto,
            pad: [0; 3],
        };
        let seen = ct.snat.unwrap_or(ct.client);
        let rev = RawNatKey {
            addr_a: addr_to_raw(*ct.backend.ip()),
            addr_b: addr_to_raw(*seen.ip()),
            port_a: ct.backend.port().to_be(),
            port_b: seen.port().to_be(),
            proto: ct.proto,
            pad: [0; 3],
        };
        {
            let mut map = self.hash_map_mut::<RawNatKey, RawLbCt>(MAP_LB_CT)?;
            ignore_missing(map.remove(&fwd))
                .map_err(map_op_err(MAP_LB_CT, format!("remove {}", ct.client)))?;
        }
        {
            let mut map = self.hash_map_mut::<RawNatKey, RawNatValue>(MAP_LB_SNAT_SEEN)?;
            ignore_missing(map.remove(&rev)).map_err(map_op_err(
                MAP_LB_SNAT_SEEN,
                format!("remove {}", ct.backend),
            ))?;
        }
        let mut map = self.hash_map_mut::<RawNatKey, RawLbRev>(MAP_LB_REV)?;
        ignore_missing(map.remove(&rev))
            .map_err(map_op_err(MAP_LB_REV, format!("remove {}", ct.backend)))
    }

    /// Whether a reverse entry exists for (backend, client as seen, proto) (tests).
    pub fn lb_reverse(
        &self,
        proto: u8,
        backend: SocketAddrV4,
        client_seen: SocketAddrV4,
    ) -> Result<Option<(SocketAddrV4, Option<SocketAddrV4>)>, DatapathError> {
        let map = self.hash_map::<RawNatKey, RawLbRev>(MAP_LB_REV)?;
        let key = RawNatKey {
            addr_a: addr_to_raw(*backend.ip()),
            addr_b: addr_to_raw(*client_seen.ip()),
            port_a: backend.port().to_be(),
            port_b: client_seen.port().to_be(),
            proto,
            pad: [0; 3],
        };
        match map.get(&key, 0) {
            Ok(v) => Ok(Some((
                SocketAddrV4::new(
                    addr_from_raw(v.frontend_addr),
                    port_from_raw(v.frontend_port),
                ),
                (v.client_addr != 0).then(|| {
                    SocketAddrV4::new(addr_from_raw(v.client_addr), port_from_raw(v.client_port))
                }),
            ))),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_op_err(MAP_LB_REV, "look up")(e)),
        }
    }

    /// Maglev table chunks: (frontend id, chunk) -> 64 backend slots.
    pub fn lb_maglev(&self) -> Result<BTreeMap<(u32, u32), [u16; MAGLEV_CHUNK]>, DatapathError> {
        let map = self.hash_map::<RawLbMaglevKey, RawLbMaglevChunk>(MAP_LB_MAGLEV)?;
        let mut out = BTreeMap::new();
        for item in map.iter() {
            let (k, v) = item.map_err(map_op_err(MAP_LB_MAGLEV, "iterate"))?;
            out.insert((k.id, k.chunk), v.slots);
        }
        Ok(out)
    }

    pub fn upsert_lb_maglev(
        &mut self,
        id: u32,
        chunk: u32,
        slots: &[u16; MAGLEV_CHUNK],
    ) -> Result<(), DatapathError> {
        let mut map = self.hash_map_mut::<RawLbMaglevKey, RawLbMaglevChunk>(MAP_LB_MAGLEV)?;
        map.insert(
            RawLbMaglevKey { id, chunk },
            RawLbMaglevChunk { slots: *slots },
            0,
        )
        .map_err(map_op_err(
            MAP_LB_MAGLEV,
            format!("insert frontend {id} chunk {chunk}"),
        ))
    }

    /// Ok if absent.
    pub fn remove_lb_maglev(&mut self, id: u32, chunk: u32) -> Result<(), DatapathError> {
        let mut map = self.hash_map_mut::<RawLbMaglevKey, RawLbMaglevChunk>(MAP_LB_MAGLEV)?;
        ignore_missing(map.remove(&RawLbMaglevKey { id, chunk })).map_err(map_op_err(
            MAP_LB_MAGLEV,
            format!("remove frontend {id} chunk {chunk}"),
        ))
    }

    /// Session affinity entries: (frontend id, client) -> backend.
    pub fn lb_affinity(&self) -> Result<Vec<(u32, Ipv4Addr, LbBackend)>, DatapathError> {
        let map = self.hash_map::<RawLbAffinityKey, RawLbAffinity>(MAP_LB_AFFINITY)?;
        let mut out = Vec::new();
        for item in map.iter() {
            let (k, v) = item.map_err(map_op_err(MAP_LB_AFFINITY, "iterate"))?;
            out.push((
                k.id,
                addr_from_raw(k.client),
                LbBackend {
                    addr: addr_from_raw(v.backend_addr),
                    port: port_from_raw(v.backend_port),
                },
            ));
        }
        Ok(out)
    }

    /// Ok if absent.
    pub fn remove_lb_affinity(&mut self, id: u32, client: Ipv4Addr) -> Result<(), DatapathError> {
        let mut map = self.hash_map_mut::<RawLbAffinityKey, RawLbAffinity>(MAP_LB_AFFINITY)?;
        let key = RawLbAffinityKey {
            id,
            client: addr_to_raw(client),
        };
        ignore_missing(map.remove(&key))
            .map_err(map_op_err(MAP_LB_AFFINITY, format!("remove {id}/{client}")))
    }

    /// loadBalancerSourceRanges entries: (frontend id, network address, prefix length).
    pub fn lb_ranges(&self) -> Result<Vec<(u32, Ipv4Addr, u8)>, DatapathError> {
        let trie: LpmTrie<_, RawLbRangeData, u32> = LpmTrie::try_from(self.map(MAP_LB_RANGES)?)
            .map_err(map_op_err(MAP_LB_RANGES, "open"))?;
        let mut out = Vec::new();
        for item in trie.iter() {
            let (k, _) = item.map_err(map_op_err(MAP_LB_RANGES, "iterate"))?;
            let data = k.data();
            let len = u8::try_from(k.prefix_len().saturating_sub(32)).unwrap_or(32);
            out.push((u32::from_be(data.id_be), addr_from_raw(data.addr), len));
        }
        out.sort();
        Ok(out)
    }

    fn range_key(id: u32, addr: Ipv4Addr, len: u8) -> LpmKey<RawLbRangeData> {
        let net = u32::from(addr)
            & u32::MAX
                .checked_shl(32 - u32::from(len.min(32)))
                .unwrap_or(0);
        LpmKey::new(
            32 + u32::from(len.min(32)),
            RawLbRangeData {
                id_be: id.to_be(),
                addr: addr_to_raw(Ipv4Addr::from(net)),
            },
        )
    }

    pub fn upsert_lb_range(
        &mut self,
        id: u32,
        addr: Ipv4Addr,
        len: u8,
    ) -> Result<(), DatapathError> {
        let mut trie: LpmTrie<_, RawLbRangeData, u32> =
            LpmTrie::try_from(self.map_mut(MAP_LB_RANGES)?)
                .map_err(map_op_err(MAP_LB_RANGES, "open"))?;
        trie.insert(&Self::range_key(id, addr, len), 1, 0)
            .map_err(map_op_err(
                MAP_LB_RANGES,
                format!("insert {id} {addr}/{len}"),
            ))
    }

    /// Ok if absent.
    pub fn remove_lb_range(
        &mut self,
        id: u32,
        addr: Ipv4Addr,
        len: u8,
    ) -> Result<(), DatapathError> {
        let mut trie: LpmTrie<_, RawLbRangeData, u32> =
            LpmTrie::try_from(self.map_mut(MAP_LB_RANGES)?)
                .map_err(map_op_err(MAP_LB_RANGES, "open"))?;
        ignore_missing(trie.remove(&Self::range_key(id, addr, len))).map_err(map_op_err(
            MAP_LB_RANGES,
            format!("remove {id} {addr}/{len}"),
        ))
    }

    /// Socket-level load balancing for the processes in `cgroup` (a cgroup v2 directory):
    /// connect4/sendmsg4/recvmsg4 attached with bpf links pinned under `pin_dir/links-cgroup`.
    /// Re-attaching (a restarted agent) attaches the new links before detaching the old, so
    /// translation never stops.
    pub fn attach_socket_lb(&mut self, cgroup: &std::path::Path) -> Result<(), DatapathError> {
        use aya::programs::CgroupSockAddr;
        use aya::programs::links::{CgroupAttachMode, FdLink};
        let dir = self.pin_dir.join(super::CGROUP_LINKS_DIR);
        std::fs::create_dir_all(&dir).map_err(|source| DatapathError::Io {
            op: "create the cgroup link pin directory",
            path: dir.clone(),
            source,
        })?;
        let file = std::fs::File::open(cgroup).map_err(|source| DatapathError::Io {
            op: "open the cgroup",
            path: cgroup.to_path_buf(),
            source,
        })?;
        for name in SOCKET_PROGRAMS {
            let prog: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .ok_or(DatapathError::Missing {
                    what: "program",
                    name,
                })?
                .try_into()
                .map_err(|source| DatapathError::Program {
                    program: name,
                    op: "use as a cgroup sock_addr program".into(),
                    source,
                })?;
            if prog.fd().is_err() {
                prog.load().map_err(|source| DatapathError::Program {
                    program: name,
                    op: "load (verifier)".into(),
                    source,
                })?;
            }
            // A bpf link (kernel >= 5.7) never excludes other links; "Single" only means no
            // legacy attach flags, which link_create refuses.
            let id = prog
                .attach(&file, CgroupAttachMode::Single)
                .map_err(|source| DatapathError::Program {
                    program: name,
                    op: format!("attach to the cgroup {}", cgroup.display()),
                    source,
                })?;
            let link = prog
                .take_link(id)
                .map_err(|source| DatapathError::Program {
                    program: name,
                    op: "take the cgroup link".into(),
                    source,
                })?;
            let fd_link = FdLink::try_from(link).map_err(|e| DatapathError::Link {
                path: dir.join(name),
                op: "turn the cgroup link into an fd link",
                reason: e.to_string(),
            })?;
            let pin = dir.join(name);
            if pin.exists() {
                super::remove_link_pin(&pin)?;
            }
            fd_link.pin(&pin).map_err(|e| DatapathError::Link {
                path: pin.clone(),
                op: "pin",
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }
}

/// The cgroup sock_addr programs of socket-level load balancing.
const SOCKET_PROGRAMS: [&str; 3] = ["ferrum_connect4", "ferrum_sendmsg4", "ferrum_recvmsg4"];
