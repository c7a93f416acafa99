//! Services: keeps the Services and EndpointSlices from the watch stream, compiles them with
//! `ferrum_lb` for this node, and reconciles the load-balancer maps by diff (backends before
//! the frontends that count them, removals last), purging tracked flows whose backend left.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ferrum_datapath::bpf::{LbBackend, LbConntrack, LbFrontendKey, LbService, MAGLEV_CHUNK};
use ferrum_lb::alloc::IdAllocator;
use ferrum_lb::{Algorithm, Cluster, Compiled, FrontendKey, Protocol, Scope};
use ferrum_model::{Object, WatchEvent};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

type Name = (String, String);

#[derive(Debug, Default, Clone)]
struct Objects {
    services: BTreeMap<Name, Service>,
    slices: BTreeMap<Name, EndpointSlice>,
}

/// Services and EndpointSlices as last listed (same relist rules as the node table), and
/// each Service's compiled frontends, recompiled only when the Service or its slices change.
#[derive(Debug, Default)]
pub struct ServiceTable {
    current: Objects,
    relisting: Option<Objects>,
    /// Something the compiled state depends on changed since the last realization.
    pub dirty: bool,
    cache: BTreeMap<Name, Compiled>,
    stale: BTreeSet<Name>,
    /// Everything must be recompiled (nodes changed, relist, first run).
    all_stale: bool,
}

fn slice_service(o: &Object) -> Option<Name> {
    match o {
        Object::EndpointSlice(s) => service_of(s),
        _ => None,
    }
}

/// The Service an EndpointSlice belongs to (its kubernetes.io/service-name label).
fn service_of(s: &EndpointSlice) -> Option<Name> {
    let svc = s
        .metadata
        .labels
        .as_ref()?
        .get(ferrum_lb::SERVICE_NAME_LABEL)?;
    Some((
        s.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        svc.clone(),
    ))
}

impl ServiceTable {
    pub fn apply(&mut self, event: &WatchEvent) {
        match event {
            WatchEvent::Relist => {
                self.relisting = Some(Objects::default());
                return;
            }
            WatchEvent::Synced { .. } => {
                if let Some(listed) = self.relisting.take() {
                    self.current = listed;
                    self.dirty = true;
                    self.all_stale = true;
                }
                return;
            }
            _ => {}
        }
        // Which Services' compilations this event invalidates.
        match event {
            WatchEvent::Upsert { object } | WatchEvent::Delete { object } => match object {
                Object::Service(_) => {
                    self.stale.insert(object.namespaced_name());
                }
                Object::EndpointSlice(_) => {
                    self.stale.extend(slice_service(object));
                    // The slice may have belonged to another Service before.
                    if let Some(old) = self.current.slices.get(&object.namespaced_name()) {
                        self.stale.extend(service_of(old));
                    }
                }
                Object::Node(_) => self.all_stale = true,
                _ => {}
            },
            _ => {}
        }
        let target = self.relisting.as_mut().unwrap_or(&mut self.current);
        let changed = match event {
            WatchEvent::Upsert { object } => match object {
                Object::Service(s) => {
                    target.services.insert(object.namespaced_name(), s.clone());
                    true
                }
                Object::EndpointSlice(s) => {
                    target.slices.insert(object.namespaced_name(), s.clone());
                    true
                }
                Object::Node(_) => true,
                _ => false,
            },
            WatchEvent::Delete { object } => match object {
                Object::Service(_) => target.services.remove(&object.namespaced_name()).is_some(),
                Object::EndpointSlice(_) => {
                    target.slices.remove(&object.namespaced_name()).is_some()
                }
                Object::Node(_) => true,
                _ => false,
            },
            _ => false,
        };
        self.dirty |= changed;
    }

    /// The frontends of every Service for this node; only Services whose objects changed
    /// since the last call are recompiled (the result equals a full `ferrum_lb::compile`).
    pub fn compile(
        &mut self,
        node_name: &str,
        node_ip: Ipv4Addr,
        node_ips: Vec<Ipv4Addr>,
        algorithm: Algorithm,
    ) -> Compiled {
        let cluster = Cluster {
            services: Vec::new(),
            slices: Vec::new(),
            node_name: node_name.to_string(),
            node_ip: Some(node_ip),
            node_ips,
            default_algorithm: algorithm,
        };
        // A changed default algorithm or node set shows up as a Node event or a restart.
        if self.all_stale || self.cache.is_empty() {
            self.cache.clear();
            self.stale = self.current.services.keys().cloned().collect();
            self.all_stale = false;
        }
        if !self.stale.is_empty() {
            let mut slices: BTreeMap<Name, Vec<&EndpointSlice>> = BTreeMap::new();
            for slice in self.current.slices.values() {
                if let Some(svc) = service_of(slice).filter(|svc| self.stale.contains(svc)) {
                    slices.entry(svc).or_default().push(slice);
                }
            }
            for name in std::mem::take(&mut self.stale) {
                match self.current.services.get(&name) {
                    Some(svc) => {
                        let mut c = Compiled::default();
                        let own = slices.get(&name).map(Vec::as_slice).unwrap_or_default();
                        ferrum_lb::compile_service(&cluster, svc, own, &mut c);
                        self.cache.insert(name, c);
                    }
                    None => {
                        self.cache.remove(&name);
                    }
                }
            }
        }
        ferrum_lb::merge(self.cache.values())
    }
}

/// The load-balancer maps' contents.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LbState {
    pub services: BTreeMap<LbFrontendKey, LbService>,
    pub backends: BTreeMap<(u32, u32), LbBackend>,
    /// Maglev tables: (frontend id, chunk) -> backend slots.
    pub maglev: BTreeMap<(u32, u32), [u16; MAGLEV_CHUNK]>,
    /// loadBalancerSourceRanges: (frontend id, network, prefix length).
    pub ranges: BTreeSet<(u32, Ipv4Addr, u8)>,
}

/// The kernel side of the load balancer.
pub trait LbDataplane {
    fn lb_state(&mut self) -> anyhow::Result<LbState>;
    fn upsert_lb_service(&mut self, key: &LbFrontendKey, svc: &LbService) -> anyhow::Result<()>;
    fn remove_lb_service(&mut self, key: &LbFrontendKey) -> anyhow::Result<()>;
    fn upsert_lb_backend(&mut self, id: u32, slot: u32, b: &LbBackend) -> anyhow::Result<()>;
    fn remove_lb_backend(&mut self, id: u32, slot: u32) -> anyhow::Result<()>;
    fn lb_conntrack(&mut self) -> anyhow::Result<Vec<LbConntrack>>;
    fn remove_lb_conntrack(&mut self, ct: &LbConntrack) -> anyhow::Result<()>;
    fn upsert_lb_maglev(
        &mut self,
        id: u32,
        chunk: u32,
        slots: &[u16; MAGLEV_CHUNK],
    ) -> anyhow::Result<()>;
    fn remove_lb_maglev(&mut self, id: u32, chunk: u32) -> anyhow::Result<()>;
    fn upsert_lb_range(&mut self, id: u32, addr: Ipv4Addr, len: u8) -> anyhow::Result<()>;
    fn remove_lb_range(&mut self, id: u32, addr: Ipv4Addr, len: u8) -> anyhow::Result<()>;
    /// Session affinity records: (frontend id, client, backend).
    fn lb_affinity(&mut self) -> anyhow::Result<Vec<(u32, Ipv4Addr, LbBackend)>>;
    fn remove_lb_affinity(&mut self, id: u32, client: Ipv4Addr) -> anyhow::Result<()>;
}

pub fn raw_key(k: &FrontendKey) -> LbFrontendKey {
    LbFrontendKey {
        addr: k.addr,
        port: k.port,
        proto: k.proto.number(),
        scope: k.scope.code(),
    }
}

pub fn key_from_raw(k: &LbFrontendKey) -> Option<FrontendKey> {
    Some(FrontendKey {
        addr: k.addr,
        port: k.port,
        proto: Protocol::from_number(k.proto)?,
        scope: Scope::from_code(k.scope)?,
    })
}

/// The map contents for `compiled`, with ids from `alloc`.
pub fn desired_state(compiled: &Compiled, alloc: &mut IdAllocator) -> LbState {
    let ids = alloc.assign(compiled.frontends.keys());
    let mut state = LbState::default();
    for (key, fe) in &compiled.frontends {
        let id = ids[key];
        // The datapath counts slots in 16 bits; a Service with more backends uses the first.
        let backends = &fe.backends[..fe.backends.len().min(usize::from(u16::MAX))];
        state.services.insert(
            raw_key(key),
            LbService {
                id,
                count: backends.len() as u16,
                masquerade: fe.masquerade,
                source_ranges: !fe.source_ranges.is_empty(),
                maglev: fe.algorithm == Algorithm::Maglev,
                affinity_timeout: fe.affinity_timeout.unwrap_or(0),
            },
        );
        if fe.algorithm == Algorithm::Maglev {
            let table = ferrum_lb::maglev::table(backends, ferrum_lb::maglev::TABLE_SIZE);
            for (chunk, slots) in ferrum_lb::maglev::chunks(&table).into_iter().enumerate() {
                state.maglev.insert((id, chunk as u32), slots);
            }
        }
        for (addr, len) in &fe.source_ranges {
            let net = ipnet::Ipv4Net::new(*addr, *len)
                .map(|n| n.network())
                .unwrap_or(*addr);
            state.ranges.insert((id, net, *len));
        }
        for (i, b) in backends.iter().enumerate() {
            state.backends.insert(
                (id, i as u32 + 1),
                LbBackend {
                    addr: b.addr,
                    port: b.port,
                },
            );
        }
    }
    state
}

/// What one reconciliation changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LbStats {
    pub writes: usize,
    pub removes: usize,
    pub purged_flows: usize,
}

/// Keeps the allocator and the last state written, so a reconciliation reads the kernel only
/// after a restart or a failure.
#[derive(Debug, Default)]
pub struct LbReconciler {
    alloc: Option<IdAllocator>,
    applied: Option<LbState>,
}

impl LbReconciler {
    pub fn reconcile<D: LbDataplane>(
        &mut self,
        dp: &mut D,
        compiled: &Compiled,
    ) -> anyhow::Result<LbStats> {
        let actual = match self.applied.take() {
            Some(s) => s,
            None => dp.lb_state()?,
        };
        let alloc = self.alloc.get_or_insert_with(|| {
            IdAllocator::seeded(
                actual
                    .services
                    .iter()
                    .filter_map(|(k, v)| Some((key_from_raw(k)?, v.id))),
            )
        });
        let desired = desired_state(compiled, alloc);
        let stats = match apply_diff(dp, &actual, &desired) {
            Ok(stats) => stats,
            Err(e) => {
                // Unknown kernel state now: re-read it next time.
                self.applied = None;
                return Err(e);
            }
        };
        self.applied = Some(desired);
        Ok(stats)
    }

    /// Each frontend the last reconciliation wrote, with its datapath id and its Service.
    pub fn service_frontends(&self, compiled: &Compiled) -> Vec<ferrum_flow::ServiceFrontend> {
        let Some(applied) = &self.applied else {
            return Vec::new();
        };
        compiled
            .frontends
            .iter()
            .filter_map(|(key, fe)| {
                let id = applied.services.get(&raw_key(key))?.id;
                // `namespace/name:port`
                let (ns, rest) = fe.service.split_once('/')?;
                let name = rest.split(':').next().unwrap_or(rest);
                Some(ferrum_flow::ServiceFrontend {
                    id,
                    addr: key.addr,
                    port: key.port,
                    proto: key.proto.number(),
                    service: ferrum_flow::ServiceRef {
                        name: name.to_string(),
                        namespace: ns.to_string(),
                    },
                })
            })
            .collect()
    }
}

fn apply_diff<D: LbDataplane>(
    dp: &mut D,
    actual: &LbState,
    desired: &LbState,
) -> anyhow::Result<LbStats> {
    let mut stats = LbStats::default();
    for (slot, b) in &desired.backends {
        if actual.backends.get(slot) != Some(b) {
            dp.upsert_lb_backend(slot.0, slot.1, b)?;
            stats.writes += 1;
        }
    }
    for (k, slots) in &desired.maglev {
        if actual.maglev.get(k) != Some(slots) {
            dp.upsert_lb_maglev(k.0, k.1, slots)?;
            stats.writes += 1;
        }
    }
    for r in desired.ranges.difference(&actual.ranges) {
        dp.upsert_lb_range(r.0, r.1, r.2)?;
        stats.writes += 1;
    }
    for (key, svc) in &desired.services {
        if actual.services.get(key) != Some(svc) {
            dp.upsert_lb_service(key, svc)?;
            stats.writes += 1;
        }
    }
    for key in actual.services.keys() {
        if !desired.services.contains_key(key) {
            dp.remove_lb_service(key)?;
            stats.removes += 1;
        }
    }
    for r in actual.ranges.difference(&desired.ranges) {
        dp.remove_lb_range(r.0, r.1, r.2)?;
        stats.removes += 1;
    }
    for k in actual.maglev.keys() {
        if !desired.maglev.contains_key(k) {
            dp.remove_lb_maglev(k.0, k.1)?;
            stats.removes += 1;
        }
    }
    for slot in actual.backends.keys() {
        if !desired.backends.contains_key(slot) {
            dp.remove_lb_backend(slot.0, slot.1)?;
            stats.removes += 1;
        }
    }
    // Flows pinned to a backend their frontend no longer has would blackhole: forget them, so
    // the next packet picks a live backend (or is rejected).
    let backend_changed = actual.backends != desired.backends;
    if backend_changed {
        let live: BTreeSet<(u32, LbBackend)> = desired
            .backends
            .iter()
            .map(|((id, _), b)| (*id, *b))
            .collect();
        for ct in dp.lb_conntrack()? {
            let b = LbBackend {
                addr: *ct.backend.ip(),
                port: ct.backend.port(),
            };
            if !live.contains(&(ct.id, b)) {
                dp.remove_lb_conntrack(&ct)?;
                stats.purged_flows += 1;
            }
        }
        for (id, client, b) in dp.lb_affinity()? {
            if !live.contains(&(id, b)) {
                dp.remove_lb_affinity(id, client)?;
            }
        }
    }
    Ok(stats)
}

impl LbDataplane for crate::kernel::KernelDataplane {
    fn lb_state(&mut self) -> anyhow::Result<LbState> {
        use anyhow::Context;
        Ok(LbState {
            services: self
                .datapath
                .lb_services()
                .context("reading the LB services map")?,
            backends: self
                .datapath
                .lb_backends()
                .context("reading the LB backends map")?,
            maglev: self
                .datapath
                .lb_maglev()
                .context("reading the Maglev tables")?,
            ranges: self
                .datapath
                .lb_ranges()
                .context("reading the LB source ranges")?
                .into_iter()
                .collect(),
        })
    }
    fn upsert_lb_maglev(
        &mut self,
        id: u32,
        chunk: u32,
        slots: &[u16; MAGLEV_CHUNK],
    ) -> anyhow::Result<()> {
        Ok(self.datapath.upsert_lb_maglev(id, chunk, slots)?)
    }
    fn remove_lb_maglev(&mut self, id: u32, chunk: u32) -> anyhow::Result<()> {
        Ok(self.datapath.remove_lb_maglev(id, chunk)?)
    }
    fn upsert_lb_range(&mut self, id: u32, addr: Ipv4Addr, len: u8) -> anyhow::Result<()> {
        Ok(self.datapath.upsert_lb_range(id, addr, len)?)
    }
    fn remove_lb_range(&mut self, id: u32, addr: Ipv4Addr, len: u8) -> anyhow::Result<()> {
        Ok(self.datapath.remove_lb_range(id, addr, len)?)
    }
    fn lb_affinity(&mut self) -> anyhow::Result<Vec<(u32, Ipv4Addr, LbBackend)>> {
        Ok(self.datapath.lb_affinity()?)
    }
    fn remove_lb_affinity(&mut self, id: u32, client: Ipv4Addr) -> anyhow::Result<()> {
        Ok(self.datapath.remove_lb_affinity(id, client)?)
    }
    fn upsert_lb_service(&mut self, key: &LbFrontendKey, svc: &LbService) -> anyhow::Result<()> {
        Ok(self.datapath.upsert_lb_service(key, svc)?)
    }
    fn remove_lb_service(&mut self, key: &LbFrontendKey) -> anyhow::Result<()> {
        Ok(self.datapath.remove_lb_service(key)?)
    }
    fn upsert_lb_backend(&mut self, id: u32, slot: u32, b: &LbBackend) -> anyhow::Result<()> {
        Ok(self.datapath.upsert_lb_backend(id, slot, b)?)
    }
    fn remove_lb_backend(&mut self, id: u32, slot: u32) -> anyhow::Result<()> {
        Ok(self.datapath.remove_lb_backend(id, slot)?)
    }
    fn lb_conntrack(&mut self) -> anyhow::Result<Vec<LbConntrack>> {
        Ok(self.datapath.lb_conntrack()?)
    }
    fn remove_lb_conntrack(&mut self, ct: &LbConntrack) -> anyhow::Result<()> {
        Ok(self.datapath.remove_lb_conntrack(ct)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddrV4;

    #[derive(Default)]
    struct MemLb {
        state: LbState,
        ct: Vec<LbConntrack>,
        ops: Vec<String>,
    }

    impl LbDataplane for MemLb {
        fn lb_state(&mut self) -> anyhow::Result<LbState> {
            self.ops.push("read".into());
            Ok(self.state.clone())
        }
        fn upsert_lb_service(&mut self, k: &LbFrontendKey, s: &LbService) -> anyhow::Result<()> {
            self.ops
                .push(format!("svc+ {}:{} n={}", k.addr, k.port, s.count));
            self.state.services.insert(*k, *s);
            Ok(())
        }
        fn remove_lb_service(&mut self, k: &LbFrontendKey) -> anyhow::Result<()> {
            self.ops.push(format!("svc- {}:{}", k.addr, k.port));
            self.state.services.remove(k);
            Ok(())
        }
        fn upsert_lb_backend(&mut self, id: u32, slot: u32, b: &LbBackend) -> anyhow::Result<()> {
            self.ops.push(format!("be+ {id}/{slot} {}", b.addr));
            self.state.backends.insert((id, slot), *b);
            Ok(())
        }
        fn remove_lb_backend(&mut self, id: u32, slot: u32) -> anyhow::Result<()> {
            self.ops.push(format!("be- {id}/{slot}"));
            self.state.backends.remove(&(id, slot));
            Ok(())
        }
        fn lb_conntrack(&mut self) -> anyhow::Result<Vec<LbConntrack>> {
            Ok(self.ct.clone())
        }
        fn remove_lb_conntrack(&mut self, ct: &LbConntrack) -> anyhow::Result<()> {
            self.ct.retain(|c| c != ct);
            Ok(())
        }
        fn upsert_lb_maglev(
            &mut self,
            id: u32,
            chunk: u32,
            slots: &[u16; MAGLEV_CHUNK],
        ) -> anyhow::Result<()> {
            self.state.maglev.insert((id, chunk), *slots);
            Ok(())
        }
        fn remove_lb_maglev(&mut self, id: u32, chunk: u32) -> anyhow::Result<()> {
            self.state.maglev.remove(&(id, chunk));
            Ok(())
        }
        fn upsert_lb_range(&mut self, id: u32, addr: Ipv4Addr, len: u8) -> anyhow::Result<()> {
            self.state.ranges.insert((id, addr, len));
            Ok(())
        }
        fn remove_lb_range(&mut self, id: u32, addr: Ipv4Addr, len: u8) -> anyhow::Result<()> {
            self.state.ranges.remove(&(id, addr, len));
            Ok(())
        }
        fn lb_affinity(&mut self) -> anyhow::Result<Vec<(u32, Ipv4Addr, LbBackend)>> {
            Ok(vec![])
        }
        fn remove_lb_affinity(&mut self, _: u32, _: Ipv4Addr) -> anyhow::Result<()> {
            Ok(())
        }
    }

    fn compiled(backends: &[&str]) -> Compiled {
        let mut c = Compiled::default();
        c.frontends.insert(
            FrontendKey {
                addr: "10.0.0.20".parse().unwrap(),
                port: 80,
                proto: Protocol::Tcp,
                scope: Scope::Internal,
            },
            ferrum_lb::Frontend {
                service: "default/web:80".into(),
                backends: backends
                    .iter()
                    .map(|a| ferrum_lb::Backend {
                        addr: a.parse().unwrap(),
                        port: 8080,
                    })
                    .collect(),
                affinity_timeout: None,
                algorithm: Algorithm::Random,
                source_ranges: vec![],
                masquerade: false,
            },
        );
        c
    }

    #[test]
    fn growing_writes_backends_before_the_count_and_shrinking_removes_after() {
        let mut dp = MemLb::default();
        let mut r = LbReconciler::default();
        r.reconcile(&mut dp, &compiled(&["10.244.0.5"])).unwrap();
        assert_eq!(
            dp.ops,
            ["read", "be+ 1/1 10.244.0.5", "svc+ 10.0.0.20:80 n=1"]
        );
        dp.ops.clear();
        r.reconcile(&mut dp, &compiled(&["10.244.0.5", "10.244.1.6"]))
            .unwrap();
        assert_eq!(dp.ops, ["be+ 1/2 10.244.1.6", "svc+ 10.0.0.20:80 n=2"]);
        dp.ops.clear();
        r.reconcile(&mut dp, &compiled(&["10.244.1.6"])).unwrap();
        assert_eq!(
            dp.ops,
            ["be+ 1/1 10.244.1.6", "svc+ 10.0.0.20:80 n=1", "be- 1/2"]
        );
        dp.ops.clear();
        let stats = r.reconcile(&mut dp, &compiled(&["10.244.1.6"])).unwrap();
        assert_eq!(stats, LbStats::default(), "converged: nothing written");
        assert!(dp.ops.is_empty(), "no kernel read either: {:?}", dp.ops);
    }

    #[test]
    fn a_restarted_agent_keeps_the_kernel_ids_and_flows_of_removed_backends_are_purged() {
        let mut dp = MemLb::default();
        LbReconciler::default()
            .reconcile(&mut dp, &compiled(&["10.244.0.5", "10.244.1.6"]))
            .unwrap();
        // Pretend the kernel numbered it 9 (an older agent's choice).
        let (k, mut s) = dp.state.services.pop_first().unwrap();
        s.id = 9;
        dp.state.services.insert(k, s);
        dp.state.backends = dp
            .state
            .backends
            .iter()
            .map(|((_, slot), b)| ((9, *slot), *b))
            .collect();
        let flow = |backend: &str| LbConntrack {
            proto: 6,
            client: SocketAddrV4::new("10.244.0.9".parse().unwrap(), 40000),
            frontend: SocketAddrV4::new("10.0.0.20".parse().unwrap(), 80),
            backend: SocketAddrV4::new(backend.parse().unwrap(), 8080),
            id: 9,
            snat: None,
        };
        dp.ct = vec![flow("10.244.0.5"), flow("10.244.1.6")];
        dp.ops.clear();
        let stats = LbReconciler::default()
            .reconcile(&mut dp, &compiled(&["10.244.1.6"]))
            .unwrap();
        assert_eq!(dp.state.services.values().next().unwrap().id, 9);
        assert_eq!(stats.purged_flows, 1);
        assert_eq!(dp.ct, vec![flow("10.244.1.6")]);
    }

    #[test]
    fn maglev_tables_and_source_ranges_come_and_go_with_their_frontend() {
        let mut c = compiled(&["10.244.0.5", "10.244.1.6"]);
        for fe in c.frontends.values_mut() {
            fe.algorithm = Algorithm::Maglev;
            fe.source_ranges = vec![("203.0.113.7".parse().unwrap(), 24)];
        }
        let mut dp = MemLb::default();
        let mut r = LbReconciler::default();
        r.reconcile(&mut dp, &c).unwrap();
        let chunks = (ferrum_lb::maglev::TABLE_SIZE as usize).div_ceil(MAGLEV_CHUNK);
        assert_eq!(dp.state.maglev.len(), chunks);
        let slots: Vec<u16> = dp.state.maglev.values().flatten().copied().collect();
        // Every table entry names slot 1 or 2; only the last chunk's tail is unused (0).
        assert_eq!(
            slots.iter().filter(|s| **s == 1 || **s == 2).count(),
            ferrum_lb::maglev::TABLE_SIZE as usize
        );
        assert_eq!(
            dp.state.ranges,
            [(1, "203.0.113.0".parse().unwrap(), 24)].into()
        );
        r.reconcile(&mut dp, &Compiled::default()).unwrap();
        assert_eq!(dp.state, LbState::default(), "everything removed");
    }

    #[test]
    fn incremental_compilation_equals_a_full_one() {
        let svc = |name: &str, ip: &str| {
            Object::Service(
                serde_json::from_value(serde_json::json!({
                    "metadata": {"name": name, "namespace": "default"},
                    "spec": {"clusterIP": ip, "ports": [{"port": 80}]}
                }))
                .unwrap(),
            )
        };
        let slice = |name: &str, svc: &str, addr: &str| {
            Object::EndpointSlice(
                serde_json::from_value(serde_json::json!({
                    "metadata": {"name": name, "namespace": "default",
                                 "labels": {"kubernetes.io/service-name": svc}},
                    "addressType": "IPv4", "ports": [{"port": 8080}],
                    "endpoints": [{"addresses": [addr]}]
                }))
                .unwrap(),
            )
        };
        let up = |o: Object| WatchEvent::Upsert { object: o };
        let ip: Ipv4Addr = "10.224.0.4".parse().unwrap();
        let mut t = ServiceTable::default();
        let full = |t: &ServiceTable| {
            ferrum_lb::compile(&Cluster {
                services: t.current.services.values().collect(),
                slices: t.current.slices.values().collect(),
                node_name: "n".into(),
                node_ip: Some(ip),
                node_ips: vec![ip],
                default_algorithm: Algorithm::Random,
            })
        };
        let steps = vec![
            up(svc("a", "10.0.0.1")),
            up(svc("b", "10.0.0.2")),
            up(slice("a-1", "a", "10.244.0.5")),
            up(slice("b-1", "b", "10.244.0.6")),
            // The slice moves from b to a.
            up(slice("b-1", "a", "10.244.0.6")),
            // Two Services claim one address: the first keeps it.
            up(svc("c", "10.0.0.1")),
            WatchEvent::Delete {
                object: svc("a", "10.0.0.1"),
            },
            WatchEvent::Delete {
                object: slice("a-1", "a", "10.244.0.5"),
            },
        ];
        for (i, e) in steps.into_iter().enumerate() {
            t.apply(&e);
            let inc = t.compile("n", ip, vec![ip], Algorithm::Random);
            assert_eq!(inc, full(&t), "after step {i}");
        }
    }

    #[test]
    fn table_follows_relists() {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.0.0.20", "ports": [{"port": 80}]}
        }))
        .unwrap();
        let mut t = ServiceTable::default();
        t.apply(&WatchEvent::Upsert {
            object: Object::Service(svc),
        });
        assert!(t.dirty);
        let ip: Ipv4Addr = "10.224.0.4".parse().unwrap();
        assert_eq!(
            t.compile("n", ip, vec![], Algorithm::Random)
                .frontends
                .len(),
            1
        );
        t.apply(&WatchEvent::Relist);
        t.apply(&WatchEvent::Synced { revision: 5 });
        assert!(
            t.compile("n", ip, vec![], Algorithm::Random)
                .frontends
                .is_empty()
        );
    }
}
