//! Flow observability in the agent: datapath events become flow records in a bounded ring,
//! counted for metrics; an HTTP API serves them (on TCP inside the node's netns and on a unix
//! socket): `/metrics`, `/v1/flows`, `/v1/map` and the web service map at `/`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ferrum_datapath::bpf::{Event, EventKind, MapFill};
use ferrum_flow::filter::query_pairs;
use ferrum_flow::metrics::{Exposition, Histogram, Kind};
use ferrum_flow::{Directory, Filter, Flow, FlowEvent, FlowRing, build_flow};
use ferrum_model::{AgentReport, Source, SourceError, WatchEvent};

/// Flows returned when a request does not say how many.
pub const DEFAULT_FLOWS: usize = 20;
/// Reconcile latency buckets, seconds.
const RECONCILE_BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

/// Kernel-side numbers for the metrics endpoint.
#[derive(Debug, Default, Clone)]
pub struct DatapathStats {
    pub endpoints: u64,
    pub maps: Vec<MapFill>,
    pub events_lost: u64,
    pub nat_entries: u64,
}

pub type StatsFn = dyn Fn() -> anyhow::Result<DatapathStats> + Send + Sync;

#[derive(Default)]
struct Counters {
    /// (verdict, type) -> flows
    flows: BTreeMap<(String, String), u64>,
    /// (reason, direction) -> drops
    drops: BTreeMap<(String, String), u64>,
    /// (policy namespace/name, verdict) -> flows decided by it
    policy_verdicts: BTreeMap<(String, String), u64>,
    reconcile: Option<Histogram>,
}

/// The node's flow state, shared by the event thread, the watch and the HTTP API.
pub struct Observer {
    pub node: String,
    pub port: u16,
    ring: Mutex<FlowRing>,
    directory: RwLock<Directory>,
    counters: Mutex<Counters>,
    events: AtomicU64,
    /// Wall clock minus CLOCK_MONOTONIC (what bpf_ktime_get_ns counts), nanoseconds.
    clock_offset_ns: i128,
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec out-pointer; both clocks always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

impl Observer {
    pub fn new(node: &str, ring_size: usize, port: u16) -> Observer {
        Observer {
            node: node.to_string(),
            port,
            ring: Mutex::new(FlowRing::new(ring_size)),
            directory: RwLock::new(Directory::default()),
            counters: Mutex::new(Counters {
                reconcile: Some(Histogram::new(&RECONCILE_BUCKETS)),
                ..Counters::default()
            }),
            events: AtomicU64::new(0),
            clock_offset_ns: clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC),
        }
    }

    pub fn directory(&self) -> std::sync::RwLockReadGuard<'_, Directory> {
        self.directory.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn directory_mut(&self) -> std::sync::RwLockWriteGuard<'_, Directory> {
        self.directory.write().unwrap_or_else(|p| p.into_inner())
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, FlowRing> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn counters(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The datapath record as a flow event with wall-clock time.
    pub fn flow_event(&self, ev: &Event) -> FlowEvent {
        let wall = i128::from(ev.timestamp_ns) + self.clock_offset_ns;
        FlowEvent {
            time_ns: u64::try_from(wall.max(0)).unwrap_or(u64::MAX),
            drop: ev.kind == EventKind::Drop,
            reason_code: ev.reason.code(),
            reason: ev.reason.text().to_string(),
            ifindex: ev.ifindex,
            proto: ev.proto,
            src: *ev.src.ip(),
            sport: ev.src.port(),
            dst: *ev.dst.ip(),
            dport: ev.dst.port(),
            tcp_flags: ev.tcp_flags,
            icmp_type: ev.icmp_type,
            is_reply: ev.is_reply,
            tunnel_endpoint: ev.tunnel_endpoint,
            nat: ev.nat.map(|n| (*n.ip(), n.port())),
            rule_id: ev.rule_id,
            service_id: ev.service_id,
        }
    }

    /// Turns a batch of datapath events into flows: ring, counters.
    pub fn record(&self, batch: &[Event]) {
        let flows: Vec<Flow> = {
            let dir = self.directory();
            batch
                .iter()
                .filter(|ev| !matches!(ev.kind, EventKind::Unknown(_)))
                .map(|ev| build_flow(&self.flow_event(ev), &dir, &self.node))
                .collect()
        };
        self.events.fetch_add(batch.len() as u64, Ordering::Relaxed);
        {
            let mut c = self.counters();
            for f in &flows {
                *c.flows
                    .entry((f.verdict.as_str().to_string(), f.type_.clone()))
                    .or_default() += 1;
                if let Some(reason) = &f.drop_reason_desc {
                    *c.drops
                        .entry((reason.clone(), f.traffic_direction.clone()))
                        .or_default() += 1;
                }
                for p in f
                    .egress_allowed_by
                    .iter()
                    .chain(&f.ingress_allowed_by)
                    .chain(&f.egress_denied_by)
                    .chain(&f.ingress_denied_by)
                {
                    *c.policy_verdicts
                        .entry((
                            format!("{}/{}", p.namespace, p.name),
                            f.verdict.as_str().to_string(),
                        ))
                        .or_default() += 1;
                }
            }
        }
        let mut ring = self.ring();
        for f in flows {
            ring.push(f);
        }
    }

    pub fn observe_reconcile(&self, took: Duration) {
        if let Some(h) = self.counters().reconcile.as_mut() {
            h.observe(took.as_secs_f64());
        }
    }

    /// The last `n` flows of this node matching `filter`.
    pub fn last(&self, n: usize, filter: &Filter) -> Vec<Flow> {
        self.ring()
            .last(n, filter)
            .into_iter()
            .map(|(_, f)| f)
            .collect()
    }

    /// Prometheus text for this node.
    pub fn metrics(&self, stats: &DatapathStats) -> String {
        let mut e = Exposition::default();
        let c = self.counters();
        for (name, help, labels, counts) in [
            (
                "ferrum_flows_processed_total",
                "Flows recorded by this node, by verdict and type.",
                ["verdict", "type"],
                &c.flows,
            ),
            (
                "ferrum_drops_total",
                "Packets dropped by the datapath, by reason and direction.",
                ["reason", "direction"],
                &c.drops,
            ),
            (
                "ferrum_policy_verdicts_total",
                "Flows decided by a network policy, by policy and verdict.",
                ["policy", "verdict"],
                &c.policy_verdicts,
            ),
        ] {
            e.family(name, help, Kind::Counter);
            for ((first, second), n) in counts {
                e.sample(name, &[(labels[0], first), (labels[1], second)], *n as f64);
            }
        }
        e.family(
            "ferrum_datapath_events_total",
            "Records read from the datapath event ring.",
            Kind::Counter,
        );
        e.sample(
            "ferrum_datapath_events_total",
            &[],
            self.events.load(Ordering::Relaxed) as f64,
        );
        e.family(
            "ferrum_datapath_events_lost_total",
            "Events the datapath could not put into the full event ring.",
            Kind::Counter,
        );
        e.sample(
            "ferrum_datapath_events_lost_total",
            &[],
            stats.events_lost as f64,
        );
        let ring = self.ring();
        e.family(
            "ferrum_flow_ring_overwritten_total",
            "Flows overwritten in the node's flow ring before being read.",
            Kind::Counter,
        );
        e.sample(
            "ferrum_flow_ring_overwritten_total",
            &[],
            ring.overwritten() as f64,
        );
        e.family(
            "ferrum_flow_ring_flows",
            "Flows currently held in the node's flow ring.",
            Kind::Gauge,
        );
        e.sample("ferrum_flow_ring_flows", &[], ring.len() as f64);
        e.family(
            "ferrum_flow_ring_capacity",
            "Capacity of the node's flow ring.",
            Kind::Gauge,
        );
        e.sample("ferrum_flow_ring_capacity", &[], ring.capacity() as f64);
        drop(ring);
        e.family(
            "ferrum_endpoints",
            "Local pod endpoints in the datapath.",
            Kind::Gauge,
        );
        e.sample("ferrum_endpoints", &[], stats.endpoints as f64);
        let dir = self.directory();
        let pods: Vec<_> = dir.pods().collect();
        let mut identities: Vec<u32> = pods
            .iter()
            .map(|p| p.identity)
            .filter(|i| *i != 0)
            .collect();
        identities.sort_unstable();
        identities.dedup();
        e.family(
            "ferrum_identities",
            "Security identities of pods known to this node (assigned by the policy stage).",
            Kind::Gauge,
        );
        e.sample("ferrum_identities", &[], identities.len() as f64);
        e.family("ferrum_services", "Services in the cluster.", Kind::Gauge);
        let services: Vec<_> = dir.services().collect();
        e.sample("ferrum_services", &[], services.len() as f64);
        e.family(
            "ferrum_service_backends",
            "Pods with an IP selected by a Service's selector, summed over Services.",
            Kind::Gauge,
        );
        let backends: usize = services
            .iter()
            .filter(|s| !s.selector.is_empty())
            .map(|s| {
                pods.iter()
                    .filter(|p| {
                        p.namespace == s.namespace
                            && p.ip.is_some()
                            && s.selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
                    })
                    .count()
            })
            .sum();
        e.sample("ferrum_service_backends", &[], backends as f64);
        drop(dir);
        e.family(
            "ferrum_bpf_map_entries",
            "Entries in each BPF map.",
            Kind::Gauge,
        );
        for m in &stats.maps {
            e.sample(
                "ferrum_bpf_map_entries",
                &[("map", m.name)],
                m.entries as f64,
            );
        }
        e.family(
            "ferrum_bpf_map_capacity",
            "Maximum entries of each BPF map.",
            Kind::Gauge,
        );
        for m in &stats.maps {
            e.sample(
                "ferrum_bpf_map_capacity",
                &[("map", m.name)],
                m.max_entries as f64,
            );
        }
        e.family(
            "ferrum_bpf_map_fill_ratio",
            "Entries over capacity of each BPF map.",
            Kind::Gauge,
        );
        for m in &stats.maps {
            let ratio = m.entries as f64 / (m.max_entries.max(1)) as f64;
            e.sample("ferrum_bpf_map_fill_ratio", &[("map", m.name)], ratio);
        }
        e.family(
            "ferrum_conntrack_entries",
            "Tracked (NATed) connections.",
            Kind::Gauge,
        );
        e.sample("ferrum_conntrack_entries", &[], stats.nat_entries as f64);
        e.family(
            "ferrum_reconcile_duration_seconds",
            "Time from a cluster change being delivered to the node's datapath realizing it.",
            Kind::Histogram,
        );
        if let Some(h) = &c.reconcile {
            e.histogram("ferrum_reconcile_duration_seconds", &[], h);
        }
        e.finish()
    }
}

/// A [`Source`] that also feeds the observer's directory and times each reconcile (from the
/// `Synced` that triggers it to the report that follows it).
pub struct ObservedSource {
    inner: Box<dyn Source>,
    observer: Arc<Observer>,
    synced_at: Option<Instant>,
}

impl ObservedSource {
    pub fn new(inner: Box<dyn Source>, observer: Arc<Observer>) -> ObservedSource {
        ObservedSource {
            inner,
            observer,
            synced_at: None,
        }
    }
}

impl Source for ObservedSource {
    fn next_event(&mut self) -> Result<WatchEvent, SourceError> {
        let event = self.inner.next_event()?;
        self.observer.directory_mut().apply(&event);
        if matches!(event, WatchEvent::Synced { .. }) {
            self.synced_at = Some(Instant::now());
        }
        Ok(event)
    }

    fn report(&mut self, report: &AgentReport) -> Result<(), SourceError> {
        if let Some(at) = self.synced_at.take()
            && report.realized_revision != 0
        {
            self.observer.observe_reconcile(at.elapsed());
        }
        self.inner.report(report)
    }
}

/// What the HTTP handlers need.
pub struct Api {
    pub observer: Arc<Observer>,
    pub stats: Box<StatsFn>,
}

pub fn bind_tcp(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context;
    TcpListener::bind(addr).with_context(|| {
        format!("listening for the observability API on {addr}; pass another --observe-addr")
    })
}

pub fn bind_unix(path: &std::path::Path) -> anyhow::Result<UnixListener> {
    use anyhow::Context;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the directory of {}", path.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("removing the stale socket {}", path.display()));
        }
    }
    UnixListener::bind(path).with_context(|| {
        format!(
            "listening for the observability API on {}; pass another --observe-socket",
            path.display()
        )
    })
}

pub fn serve_tcp(listener: TcpListener, api: Arc<Api>) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let api = Arc::clone(&api);
                spawn_handler(move || handle(stream, &api));
            }
            Err(e) => tracing::warn!("accepting an observability connection failed: {e}"),
        }
    }
}

pub fn serve_unix(listener: UnixListener, api: Arc<Api>) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let api = Arc::clone(&api);
                spawn_handler(move || handle(stream, &api));
            }
            Err(e) => tracing::warn!("accepting an observability connection failed: {e}"),
        }
    }
}

fn spawn_handler(f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new()
        .name("observe-http".into())
        .spawn(f)
    {
        tracing::warn!("cannot start an observability handler thread: {e}");
    }
}

/// The request target of an HTTP/1.x request (`/path?query`), headers read and ignored.
fn read_request(reader: &mut impl BufRead) -> Option<String> {
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next()?, parts.next()?);
    if method != "GET" {
        return None;
    }
    let target = target.to_string();
    // Headers up to the blank line (bounded: a client cannot make us read forever).
    for _ in 0..100 {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
    }
    Some(target)
}

fn respond(w: &mut impl Write, status: &str, content_type: &str, body: &[u8]) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = w.write_all(head.as_bytes());
    let _ = w.write_all(body);
    let _ = w.flush();
}

trait Stream: Read + Write + Send {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn Stream>>;
    fn set_timeout(&self, t: Option<Duration>);
}

impl Stream for TcpStream {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn set_timeout(&self, t: Option<Duration>) {
        let _ = self.set_read_timeout(t);
    }
}

impl Stream for std::os::unix::net::UnixStream {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn set_timeout(&self, t: Option<Duration>) {
        let _ = self.set_read_timeout(t);
    }
}

/// Query parameters that are not flow filters.
#[derive(Debug)]
struct FlowParams {
    number: usize,
    follow: bool,
    cluster: bool,
    filter: Filter,
}

fn flow_params(query: &str) -> Result<FlowParams, String> {
    let mut p = FlowParams {
        number: DEFAULT_FLOWS,
        follow: false,
        cluster: false,
        filter: Filter::default(),
    };
    for (k, v) in query_pairs(query) {
        match k.as_str() {
            "number" => {
                p.number = v
                    .parse()
                    .map_err(|_| format!("number {v:?}: expected a count of flows"))?
            }
            "follow" => p.follow = v == "1" || v == "true",
            "scope" => match v.as_str() {
                "node" => p.cluster = false,
                "cluster" => p.cluster = true,
                other => return Err(format!("scope {other:?}: expected node or cluster")),
            },
            _ => p.filter.add(&k, &v).map_err(|e| e.to_string())?,
        }
    }
    Ok(p)
}

fn handle<S: Stream + 'static>(stream: S, api: &Api) {
    stream.set_timeout(Some(Duration::from_secs(10)));
    let Ok(read_half) = stream.try_clone_box() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut w = stream;
    let Some(target) = read_request(&mut reader) else {
        respond(
            &mut w,
            "400 Bad Request",
            "text/plain",
            b"expected a GET request\n",
        );
        return;
    };
    let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
    match path {
        "/" | "/index.html" => respond(
            &mut w,
            "200 OK",
            "text/html; charset=utf-8",
            include_str!("ui.html").as_bytes(),
        ),
        "/metrics" => match (api.stats)() {
            Ok(stats) => respond(
                &mut w,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                api.observer.metrics(&stats).as_bytes(),
            ),
            Err(e) => respond(
                &mut w,
                "500 Internal Server Error",
                "text/plain",
                format!("reading datapath statistics failed: {e:#}\n").as_bytes(),
            ),
        },
        "/v1/map" => {
            let body = map_json(&api.observer).to_string();
            respond(&mut w, "200 OK", "application/json", body.as_bytes());
        }
        "/v1/flows" => match flow_params(query) {
            Err(e) => respond(
                &mut w,
                "400 Bad Request",
                "text/plain",
                format!("{e}\n").as_bytes(),
            ),
            Ok(p) if p.follow => follow(&mut w, &api.observer, &p),
            Ok(p) => {
                let flows = if p.cluster {
                    cluster_flows(&api.observer, &p)
                } else {
                    api.observer.last(p.number, &p.filter)
                };
                let mut body = String::new();
                for f in flows {
                    body.push_str(&serde_json::to_string(&f).unwrap_or_default());
                    body.push('\n');
                }
                respond(&mut w, "200 OK", "application/x-ndjson", body.as_bytes());
            }
        },
        _ => respond(&mut w, "404 Not Found", "text/plain", b"not found\n"),
    }
}

/// Streams flows as they arrive (after the last `number`) until the client goes away; an
/// empty line every few seconds finds out.
fn follow(w: &mut impl Write, observer: &Observer, p: &FlowParams) {
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n";
    if w.write_all(head.as_bytes()).is_err() {
        return;
    }
    let (initial, mut next) = {
        let ring = observer.ring();
        (ring.last(p.number, &p.filter), ring.next_seq())
    };
    let mut out = String::new();
    for (_, f) in initial {
        out.push_str(&serde_json::to_string(&f).unwrap_or_default());
        out.push('\n');
    }
    let mut quiet = Instant::now();
    loop {
        if !out.is_empty() || quiet.elapsed() > Duration::from_secs(2) {
            if out.is_empty() {
                out.push('\n');
            }
            if w.write_all(out.as_bytes())
                .and_then(|()| w.flush())
                .is_err()
            {
                return;
            }
            out.clear();
            quiet = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
        let ring = observer.ring();
        for (_, f) in ring.since(next, &p.filter) {
            out.push_str(&serde_json::to_string(&f).unwrap_or_default());
            out.push('\n');
        }
        next = ring.next_seq();
    }
}

/// This node's flows plus every other node's (asked over HTTP on their node IPs), merged by
/// time; a node that does not answer is left out (and logged).
fn cluster_flows(observer: &Observer, p: &FlowParams) -> Vec<Flow> {
    let peers: Vec<(String, Ipv4Addr)> = observer
        .directory()
        .nodes()
        .filter(|(name, _)| **name != observer.node)
        .map(|(n, ip)| (n.clone(), *ip))
        .collect();
    let query = format!("scope=node&number={}&{}", p.number, p.filter.to_query());
    let handles: Vec<_> = peers
        .into_iter()
        .map(|(name, ip)| {
            let path = format!("/v1/flows?{query}");
            let port = observer.port;
            std::thread::spawn(move || (name, fetch_flows(SocketAddr::from((ip, port)), &path)))
        })
        .collect();
    let mut flows = observer.last(p.number, &p.filter);
    for h in handles {
        match h.join() {
            Ok((_, Ok(mut more))) => flows.append(&mut more),
            Ok((name, Err(e))) => tracing::debug!(node = %name, "flows from peer unavailable: {e}"),
            Err(_) => {}
        }
    }
    flows.sort_by(|a, b| a.time.cmp(&b.time));
    let skip = flows.len().saturating_sub(p.number);
    flows.split_off(skip)
}

fn fetch_flows(addr: SocketAddr, path: &str) -> anyhow::Result<Vec<Flow>> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let body = ferrum_flow::client::get(&mut s, path)?;
    ferrum_flow::client::parse_flows(&body).map_err(Into::into)
}

fn map_json(observer: &Observer) -> serde_json::Value {
    let dir = observer.directory();
    let nodes: Vec<_> = dir
        .nodes()
        .map(|(n, ip)| serde_json::json!({"name": n, "ip": ip.to_string()}))
        .collect();
    let pods: Vec<_> = dir.pods().collect();
    let services: Vec<_> = dir.services().cloned().collect();
    serde_json::json!({
        "node": observer.node,
        "nodes": nodes,
        "pods": pods,
        "services": services,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrum_datapath::bpf::Reason;

    fn event(kind: EventKind, reason: Reason, dport: u16) -> Event {
        Event {
            kind,
            reason,
            ifindex: 3,
            proto: 6,
            src: "10.244.0.5:40000".parse().unwrap(),
            dst: format!("10.244.0.99:{dport}").parse().unwrap(),
            tunnel_endpoint: None,
            nat: None,
            timestamp_ns: 1_000,
            tcp_flags: 2,
            icmp_type: 0,
            is_reply: false,
            rule_id: 0,
            service_id: 0,
        }
    }

    #[test]
    fn events_become_flows_and_metrics() {
        let o = Observer::new("node-1", 2, 9962);
        o.record(&[
            event(EventKind::Drop, Reason::UnknownEndpoint, 80),
            event(EventKind::Trace, Reason::ToStack, 81),
            event(EventKind::Trace, Reason::ToStack, 82),
            event(EventKind::Unknown(9), Reason::ToStack, 83),
        ]);
        let flows = o.last(10, &Filter::default());
        assert_eq!(flows.len(), 2, "ring of 2 keeps the latest");
        assert_eq!(flows[1].ports().1, 82);
        // Monotonic 1µs after boot maps to a wall-clock time in the past.
        assert!(flows[0].time.as_str() < ferrum_flow::time::rfc3339(u64::MAX).as_str());
        o.observe_reconcile(Duration::from_millis(3));
        let text = o.metrics(&DatapathStats {
            endpoints: 2,
            maps: vec![MapFill {
                name: "ferrum_nat",
                entries: 5,
                max_entries: 10,
            }],
            events_lost: 7,
            nat_entries: 5,
        });
        assert!(
            text.contains("ferrum_flows_processed_total{verdict=\"FORWARDED\",type=\"L3_L4\"} 2\n")
        );
        // The source is no pod this node knows of: the drop counts as ingress.
        assert!(
            text.contains(
                "ferrum_drops_total{reason=\"UNKNOWN_ENDPOINT\",direction=\"INGRESS\"} 1\n"
            )
        );
        assert!(text.contains("ferrum_datapath_events_lost_total 7\n"));
        assert!(text.contains("ferrum_datapath_events_total 4\n"));
        assert!(text.contains("ferrum_flow_ring_overwritten_total 1\n"));
        assert!(text.contains("ferrum_bpf_map_fill_ratio{map=\"ferrum_nat\"} 0.5\n"));
        assert!(text.contains("ferrum_reconcile_duration_seconds_bucket{le=\"0.005\"} 1\n"));
    }

    struct Script(Vec<WatchEvent>, Vec<AgentReport>);

    impl Source for Script {
        fn next_event(&mut self) -> Result<WatchEvent, SourceError> {
            if self.0.is_empty() {
                return Err(SourceError::Disconnected("end of script".into()));
            }
            Ok(self.0.remove(0))
        }
        fn report(&mut self, report: &AgentReport) -> Result<(), SourceError> {
            self.1.push(report.clone());
            Ok(())
        }
    }

    #[test]
    fn the_observed_source_feeds_the_directory_and_times_reconciles() {
        use k8s_openapi::api::core::v1::{Pod, PodStatus};
        let pod = ferrum_model::Object::Pod(Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("a".into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            status: Some(PodStatus {
                pod_ip: Some("10.244.0.5".into()),
                ..Default::default()
            }),
            ..Default::default()
        });
        let o = Arc::new(Observer::new("n", 8, 0));
        let mut src = ObservedSource::new(
            Box::new(Script(
                vec![
                    WatchEvent::Upsert { object: pod },
                    WatchEvent::Synced { revision: 4 },
                ],
                Vec::new(),
            )),
            Arc::clone(&o),
        );
        src.next_event().unwrap();
        assert_eq!(
            o.directory()
                .endpoint("10.244.0.5".parse().unwrap(), "n")
                .pod_name,
            "a"
        );
        src.next_event().unwrap();
        let report = |rev| AgentReport {
            node: "n".into(),
            ready: true,
            realized_revision: rev,
            message: String::new(),
        };
        src.report(&report(4)).unwrap();
        // A report without a Synced before it is not a reconcile.
        src.report(&report(4)).unwrap();
        assert_eq!(o.counters().reconcile.as_ref().unwrap().count(), 1);
        assert!(src.next_event().is_err());
    }

    #[test]
    fn flow_params_split_paging_from_filters() {
        let p = flow_params("number=5&follow=1&scope=cluster&verdict=DROPPED").unwrap();
        assert_eq!((p.number, p.follow, p.cluster), (5, true, true));
        assert_eq!(p.filter.verdict.len(), 1);
        assert!(flow_params("number=x").unwrap_err().contains("number"));
        assert!(flow_params("scope=world").unwrap_err().contains("scope"));
        assert!(flow_params("port=http").unwrap_err().contains("--port"));
    }
}
