//! NetworkPolicy conformance on a live lab, modelled on the upstream Kubernetes network-policy
//! e2e suite (test/e2e/network/netpol): namespaces x, y, z with pods a, b, c (label
//! pod=<name>, spread over two nodes, serving TCP and UDP on 80 and 81 with named ports
//! serve-80-tcp ...), each behind its own ClusterIP Service. Every scenario applies policies,
//! probes the 9×9 matrix through the Services from each pod's network namespace, and compares
//! with a truth table written out by hand (never computed by Ferrum's compiler, so compiler bugs
//! show). Scenarios clean up their policies; one lab serves them all. A mismatch does not stop
//! the run: every failing scenario is reported at the end with its expected and observed matrix.

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ferrum_datapath::netns::run_in_netns;
use ferrum_e2e::Lab;
use serde_json::Value;

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
const N: usize = 9;
/// How long a probe waits for a connection or an answer; denied probes take this long.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// The lab's pod CIDR (passed to `lab up`), for ipBlock scenarios.
const POD_CIDR: &str = "10.244.0.0/16";

// ---- the truth table ----

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Proto {
    Tcp,
    Udp,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Port {
    port: u16,
    proto: Proto,
}

impl std::fmt::Display for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = match self.proto {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        };
        write!(f, "{}/{proto}", self.port)
    }
}

const TCP80: Port = Port {
    port: 80,
    proto: Proto::Tcp,
};
const TCP81: Port = Port {
    port: 81,
    proto: Proto::Tcp,
};
const UDP80: Port = Port {
    port: 80,
    proto: Proto::Udp,
};
const UDP81: Port = Port {
    port: 81,
    proto: Proto::Udp,
};

fn pod_name(i: usize) -> String {
    format!("{}/{}", NAMESPACES[i / 3], PODS[i % 3])
}

/// Pods a pattern names: `*` every pod, `x` the pods of namespace x, `x/a` one pod, `*/a` pod
/// a of every namespace.
fn select(pattern: &str) -> Vec<usize> {
    let (ns, pod) = match pattern.split_once('/') {
        Some((ns, pod)) => (ns, pod),
        None => (pattern, "*"),
    };
    let picked: Vec<usize> = (0..N)
        .filter(|i| (ns == "*" || ns == NAMESPACES[i / 3]) && (pod == "*" || pod == PODS[i % 3]))
        .collect();
    assert!(!picked.is_empty(), "pattern {pattern:?} names no pod");
    picked
}

/// Expected reachability, [from][to]; starts with everything allowed.
#[derive(Clone, PartialEq, Eq)]
struct Truth([[bool; N]; N]);

impl Truth {
    fn all_allowed() -> Self {
        Truth([[true; N]; N])
    }

    fn set(mut self, from: &str, to: &str, allowed: bool) -> Self {
        for f in select(from) {
            for t in select(to) {
                self.0[f][t] = allowed;
            }
        }
        self
    }

    fn allow(self, from: &str, to: &str) -> Self {
        self.set(from, to, true)
    }

    fn deny(self, from: &str, to: &str) -> Self {
        self.set(from, to, false)
    }

    /// Ingress isolation of `to` with nothing allowed in.
    fn deny_to(self, to: &str) -> Self {
        self.deny("*", to)
    }

    /// Egress isolation of `from` with nothing allowed out.
    fn deny_from(self, from: &str) -> Self {
        self.deny(from, "*")
    }

    fn allow_to(self, to: &str) -> Self {
        self.allow("*", to)
    }
}

/// What one probe saw.
#[derive(Clone, PartialEq, Eq, Debug)]
enum Seen {
    /// The destination pod answered with its name.
    Answer,
    /// Connection refused/timed out, or no UDP answer in time.
    Blocked(String),
    /// Someone else answered: always a failure.
    Wrong(String),
}

fn render(title: &str, cell: impl Fn(usize, usize) -> char) -> String {
    let mut out = format!("{title}\n      ");
    for t in 0..N {
        out += &format!("{:<4}", pod_name(t));
    }
    out.push('\n');
    for f in 0..N {
        out += &format!("{:<6}", pod_name(f));
        for t in 0..N {
            out += &format!("{:<4}", cell(f, t));
        }
        out.push('\n');
    }
    out
}

// ---- objects ----

fn namespace_yaml(ns: &str, extra_labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}{extra_labels}}}}}\n"
    )
}

fn node_of(i: usize) -> &'static str {
    if i.is_multiple_of(2) {
        "node-0"
    } else {
        "node-1"
    }
}

fn pod_yaml(i: usize, extra_labels: &str) -> String {
    let (ns, name) = (NAMESPACES[i / 3], PODS[i % 3]);
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{pod: {name}{extra_labels}}}}}\n\
         spec:\n  nodeName: {node}\n  containers:\n  - name: server\n    image: agnhost\n    ports:\n\
         \x20   - {{name: serve-80-tcp, containerPort: 80, protocol: TCP}}\n\
         \x20   - {{name: serve-80-udp, containerPort: 80, protocol: UDP}}\n\
         \x20   - {{name: serve-81-tcp, containerPort: 81, protocol: TCP}}\n\
         \x20   - {{name: serve-81-udp, containerPort: 81, protocol: UDP}}\n",
        node = node_of(i)
    )
}

fn service_yaml(i: usize) -> String {
    let (ns, name) = (NAMESPACES[i / 3], PODS[i % 3]);
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: s-{name}, namespace: {ns}}}\n\
         spec:\n  selector: {{pod: {name}}}\n  ports:\n\
         \x20 - {{name: tcp-80, port: 80, targetPort: 80, protocol: TCP}}\n\
         \x20 - {{name: udp-80, port: 80, targetPort: 80, protocol: UDP}}\n\
         \x20 - {{name: tcp-81, port: 81, targetPort: 81, protocol: TCP}}\n\
         \x20 - {{name: udp-81, port: 81, targetPort: 81, protocol: UDP}}\n"
    )
}

/// A NetworkPolicy; `spec` is a YAML flow mapping.
struct Policy {
    ns: &'static str,
    name: &'static str,
    spec: String,
}

fn np(ns: &'static str, name: &'static str, spec: impl Into<String>) -> Policy {
    Policy {
        ns,
        name,
        spec: spec.into(),
    }
}

impl Policy {
    fn yaml(&self) -> String {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {{name: {}, namespace: {}}}\nspec: {}\n",
            self.name, self.ns, self.spec
        )
    }
}

// ---- probes ----

fn probe(netns: &Path, vip: Ipv4Addr, port: Port, expect: &str) -> Seen {
    let answer = run_in_netns(netns, move || -> std::io::Result<String> {
        match port.proto {
            Proto::Tcp => {
                let mut s =
                    TcpStream::connect_timeout(&SocketAddr::from((vip, port.port)), PROBE_TIMEOUT)?;
                s.set_read_timeout(Some(PROBE_TIMEOUT))?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                Ok(out)
            }
            Proto::Udp => {
                let s = UdpSocket::bind("0.0.0.0:0")?;
                s.set_read_timeout(Some(PROBE_TIMEOUT))?;
                s.connect((vip, port.port))?;
                s.send(b"probe")?;
                let mut buf = [0u8; 256];
                let n = s.recv(&mut buf)?;
                Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
            }
        }
    });
    match answer {
        Ok(Ok(text)) if text.trim() == expect => Seen::Answer,
        Ok(Ok(text)) if text.is_empty() => Seen::Blocked("closed without an answer".into()),
        Ok(Ok(text)) => Seen::Wrong(text.trim().to_string()),
        Ok(Err(e)) => Seen::Blocked(e.kind().to_string()),
        Err(e) => Seen::Blocked(format!("cannot enter {}: {e}", netns.display())),
    }
}

struct Target {
    netns: PathBuf,
    vip: Ipv4Addr,
    ip: Ipv4Addr,
}

struct Suite {
    lab: Lab,
    pods: Vec<Target>,
    /// Policies applied by the current scenario, deleted before the next.
    policies: BTreeSet<(&'static str, &'static str)>,
    scenario: String,
    scenarios: Vec<(String, bool)>,
    failures: Vec<String>,
}

fn lookup(lab: &Lab, kind: &str, ns: &str, name: &str) -> Result<Value> {
    let list: Value =
        serde_json::from_str(&lab.ferrum_ok(&["get", kind, "-n", ns, "-o", "json"])?)?;
    list["items"]
        .as_array()
        .and_then(|items| items.iter().find(|o| o["metadata"]["name"] == name))
        .cloned()
        .with_context(|| format!("{kind} {ns}/{name} not listed"))
}

/// Retries `f` for up to 30 s (pods start and endpoints follow asynchronously).
fn eventually<T>(what: &str, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("{what}: gave up")));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

impl Suite {
    fn up() -> Result<Suite> {
        let lab = Lab::up(2, &["--pod-cidr", POD_CIDR])?;
        let mut yaml: Vec<String> = NAMESPACES.iter().map(|ns| namespace_yaml(ns, "")).collect();
        yaml.extend((0..N).map(|i| pod_yaml(i, "")));
        yaml.extend((0..N).map(service_yaml));
        lab.apply(&yaml.join("---\n"))?;
        let mut suite = Suite {
            lab,
            pods: Vec::new(),
            policies: BTreeSet::new(),
            scenario: String::new(),
            scenarios: Vec::new(),
            failures: Vec::new(),
        };
        for i in 0..N {
            let target = suite.target(i)?;
            suite.pods.push(target);
        }
        Ok(suite)
    }

    /// Where pod `i` lives now (its netns and IP change when it is recreated).
    fn target(&self, i: usize) -> Result<Target> {
        let (ns, name) = (NAMESPACES[i / 3], PODS[i % 3]);
        let ip = eventually(&format!("{ns}/{name} running"), || {
            self.lab.pod_ip(ns, name)
        })?;
        let svc = lookup(&self.lab, "services", ns, &format!("s-{name}"))?;
        let vip = svc["spec"]["clusterIP"]
            .as_str()
            .context("clusterIP")?
            .parse()
            .context("clusterIP")?;
        Ok(Target {
            netns: self.lab.pod_netns(ns, name)?,
            vip,
            ip,
        })
    }

    fn ip(&self, pod: &str) -> Ipv4Addr {
        self.pods[select(pod)[0]].ip
    }

    /// Starts a scenario: the previous one's policies are deleted first.
    fn scenario(&mut self, name: &str) -> Result<()> {
        self.cleanup()?;
        eprintln!("== {name}");
        self.scenario = name.to_string();
        self.scenarios.push((name.to_string(), true));
        Ok(())
    }

    fn apply(&mut self, policies: &[Policy]) -> Result<()> {
        let yaml: Vec<String> = policies.iter().map(Policy::yaml).collect();
        self.lab
            .apply(&yaml.join("---\n"))
            .with_context(|| format!("scenario {:?}: apply", self.scenario))?;
        self.policies
            .extend(policies.iter().map(|p| (p.ns, p.name)));
        Ok(())
    }

    fn delete_policies(&mut self, refs: &[(&'static str, &'static str)]) -> Result<()> {
        if refs.is_empty() {
            return Ok(());
        }
        let yaml: Vec<String> = refs
            .iter()
            .map(|(ns, name)| np(ns, name, "{podSelector: {}}").yaml())
            .collect();
        let out = self
            .lab
            .ferrum(&["delete", "-f", "-"], Some(&yaml.join("---\n")))?;
        ensure!(
            out.status.success(),
            "deleting policies {refs:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for r in refs {
            self.policies.remove(r);
        }
        Ok(())
    }

    fn cleanup(&mut self) -> Result<()> {
        let all: Vec<_> = self.policies.iter().copied().collect();
        self.delete_policies(&all)
    }

    /// Probes the given (from, to) cells once, in parallel threads.
    fn probe_cells(&self, port: Port, cells: &[(usize, usize)]) -> Vec<((usize, usize), Seen)> {
        std::thread::scope(|scope| {
            let handles: Vec<_> = cells
                .iter()
                .map(|&(f, t)| {
                    let from = &self.pods[f];
                    let to = &self.pods[t];
                    scope.spawn(move || ((f, t), probe(&from.netns, to.vip, port, PODS[t % 3])))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("probe thread"))
                .collect()
        })
    }

    /// Probes the whole matrix on `port` and compares with `truth`. A probe that should have
    /// been answered but was not is retried twice (a lost datagram or a slow start on a busy
    /// machine, as upstream retries); an answer where a denial was expected is never retried:
    /// one leaked connection is a failure.
    fn check(&mut self, port: Port, truth: &Truth) {
        let all: Vec<(usize, usize)> = (0..N).flat_map(|f| (0..N).map(move |t| (f, t))).collect();
        let mut seen = vec![vec![Seen::Answer; N]; N];
        let mut todo = all.clone();
        for attempt in 0..3 {
            if attempt > 0 {
                eprintln!("   {port}: retrying {} unanswered probe(s)", todo.len());
                std::thread::sleep(Duration::from_millis(500));
            }
            for ((f, t), s) in self.probe_cells(port, &todo) {
                seen[f][t] = s;
            }
            todo.retain(|&(f, t)| truth.0[f][t] && matches!(seen[f][t], Seen::Blocked(_)));
            if todo.is_empty() {
                break;
            }
        }
        let wrong: Vec<(usize, usize)> = all
            .into_iter()
            .filter(|&(f, t)| {
                (seen[f][t] == Seen::Answer) != truth.0[f][t]
                    || matches!(seen[f][t], Seen::Wrong(_))
            })
            .collect();
        if wrong.is_empty() {
            return;
        }
        let mismatches: Vec<String> = wrong
            .iter()
            .map(|&(f, t)| {
                let got = match &seen[f][t] {
                    Seen::Answer => "ALLOW".to_string(),
                    Seen::Blocked(why) => format!("DENY ({why})"),
                    Seen::Wrong(who) => format!("an answer from {who:?}"),
                };
                format!(
                    "{} -> {}:{port} expected {} got {got}",
                    pod_name(f),
                    pod_name(t),
                    if truth.0[f][t] { "ALLOW" } else { "DENY" }
                )
            })
            .collect();
        let expected = render(
            &format!("expected {port} (. allowed, X denied; rows from, columns to):"),
            |f, t| {
                if truth.0[f][t] { '.' } else { 'X' }
            },
        );
        let observed = render(
            &format!("observed {port} (? = wrong pod answered):"),
            |f, t| match seen[f][t] {
                Seen::Answer => '.',
                Seen::Blocked(_) => 'X',
                Seen::Wrong(_) => '?',
            },
        );
        let report = format!(
            "scenario {:?}, {port}: {} cell(s) wrong\n{}\n{expected}{observed}",
            self.scenario,
            mismatches.len(),
            mismatches.join("\n")
        );
        eprintln!("{report}");
        self.fail(report);
    }

    fn fail(&mut self, report: String) {
        if let Some(last) = self.scenarios.last_mut() {
            last.1 = false;
        }
        self.failures.push(report);
    }

    /// Re-applies pod `i` with extra labels; it must stay the same pod (IP and sandbox).
    fn relabel_pod(&mut self, i: usize, extra_labels: &str) -> Result<()> {
        self.lab.apply(&pod_yaml(i, extra_labels))?;
        let now = self.target(i)?;
        if now.ip != self.pods[i].ip || now.netns != self.pods[i].netns {
            self.fail(format!(
                "scenario {:?}: relabelling {} replaced the pod ({} {} -> {} {})",
                self.scenario,
                pod_name(i),
                self.pods[i].ip,
                self.pods[i].netns.display(),
                now.ip,
                now.netns.display()
            ));
            self.pods[i] = now;
        }
        Ok(())
    }
}

// ---- scenarios ----

#[test]
fn network_policy_conformance_matrix() -> Result<()> {
    let started = Instant::now();
    let mut s = Suite::up()?;
    eprintln!(
        "lab up with 9 pods and 9 Services in {:.1?}",
        started.elapsed()
    );

    // Baseline: no policy, everything reachable on every port (waits for endpoints first).
    eventually("baseline matrix", || {
        let all: Vec<(usize, usize)> = (0..N).flat_map(|f| (0..N).map(move |t| (f, t))).collect();
        for port in [TCP80, UDP80] {
            let bad: Vec<_> = s
                .probe_cells(port, &all)
                .into_iter()
                .filter(|(_, seen)| *seen != Seen::Answer)
                .collect();
            if !bad.is_empty() {
                bail!("{port}: {} pairs not answering yet: {bad:?}", bad.len());
            }
        }
        Ok(())
    })?;
    s.scenario("no policies: all allowed on TCP and UDP, ports 80 and 81")?;
    for port in [TCP80, TCP81, UDP80, UDP81] {
        s.check(port, &Truth::all_allowed());
    }

    s.scenario("default-deny-ingress in x")?;
    s.apply(&[np(
        "x",
        "deny-ingress",
        "{podSelector: {}, policyTypes: [Ingress]}",
    )])?;
    s.check(TCP80, &Truth::all_allowed().deny_to("x"));
    s.check(UDP81, &Truth::all_allowed().deny_to("x"));

    s.scenario("default-deny-egress in x")?;
    s.apply(&[np(
        "x",
        "deny-egress",
        "{podSelector: {}, policyTypes: [Egress]}",
    )])?;
    s.check(TCP80, &Truth::all_allowed().deny_from("x"));
    s.check(UDP80, &Truth::all_allowed().deny_from("x"));

    s.scenario("default-deny-all (ingress and egress) in x")?;
    s.apply(&[np(
        "x",
        "deny-all",
        "{podSelector: {}, policyTypes: [Ingress, Egress]}",
    )])?;
    s.check(TCP81, &Truth::all_allowed().deny_to("x").deny_from("x"));

    s.scenario("x/a: ingress only from x/b by podSelector")?;
    s.apply(&[np(
        "x",
        "a-from-b",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]}",
    )])?;
    s.check(
        TCP80,
        &Truth::all_allowed().deny_to("x/a").allow("x/b", "x/a"),
    );

    s.scenario("allow from the same namespace only (podSelector {} peer)")?;
    s.apply(&[np(
        "x",
        "same-ns",
        "{podSelector: {}, ingress: [{from: [{podSelector: {}}]}]}",
    )])?;
    s.check(TCP80, &Truth::all_allowed().deny_to("x").allow("x", "x"));

    s.scenario("x/a: ingress from namespace y by namespaceSelector matchLabels")?;
    s.apply(&[np(
        "x",
        "a-from-ns-y",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]}",
    )])?;
    s.check(
        TCP80,
        &Truth::all_allowed().deny_to("x/a").allow("y", "x/a"),
    );

    s.scenario("x/a: ingress from namespaces NotIn [x] (matchExpressions)")?;
    s.apply(&[np(
        "x",
        "a-from-not-x",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [x]}]}}]}]}",
    )])?;
    s.check(
        TCP80,
        &Truth::all_allowed()
            .deny_to("x/a")
            .allow("y", "x/a")
            .allow("z", "x/a"),
    );

    s.scenario(
        "x/a: ingress from kubernetes.io/metadata.name In [y, z] (automatic namespace label)",
    )?;
    s.apply(&[np(
        "x",
        "a-from-yz-by-name",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: In, values: [y, z]}]}}]}]}",
    )])?;
    s.check(
        TCP80,
        &Truth::all_allowed()
            .deny_to("x/a")
            .allow("y", "x/a")
            .allow("z", "x/a"),
    );

    s.scenario("x/a: ingress from pods In [b, c] in x (matchExpressions)")?;
    s.apply(&[np(
        "x",
        "a-from-b-c",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{podSelector: {matchExpressions: [{key: pod, operator: In, values: [b, c]}]}}]}]}",
    )])?;
    s.check(
        TCP80,
        &Truth::all_allowed()
            .deny_to("x/a")
            .allow("x/b", "x/a")
            .allow("x/c", "x/a"),
    );

    s.scenario("x/a: ingress from pods NotIn [b] in x (includes itself)")?;
    s.apply(&[np(
        "x",
        "a-from-not-b",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{podSelector: {matchExpressions: [{key: pod, operator: NotIn, values: [b]}]}}]}]}",
    )])?;
    s.check(
        TCP80,
        &Truth::all_allowed()
            .deny_to("x/a")
            .allow("x/a", "x/a")
            .allow("x/c", "x/a"),
    );

    s.scenario("x/a: ingress from pods where label pod DoesNotExist (nobody)")?;
    s.apply(&[np(
        "x",
        "a-from-unlabelled",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{podSelector: {matchExpressions: [{key: pod, operator: DoesNotExist}]}}]}]}",
    )])?;
    s.check(TCP80, &Truth::all_allowed().deny_to("x/a"));

    s.scenario("target selected by matchExpressions: pod In [a, b] in x, from pods with label pod Exists in any namespace on 81 only")?;
    s.apply(&[np(
        "x",
        "ab-81",
        "{podSelector: {matchExpressions: [{key: pod, operator: In, values: [a, b]}]}, ingress: [{from: [{namespaceSelector: {}, podSelector: {matchExpressions: [{key: pod, operator: Exists}]}}], ports: [{port: 81}]}]}",
    )])?;
    s.check(TCP80, &Truth::all_allowed().deny_to("x/a").deny_to("x/b"));
    s.check(TCP81, &Truth::all_allowed());

    s.scenario("podSelector AND namespaceSelector in one peer: only y/b reaches x/a")?;
    s.apply(&[np(
        "x",
        "a-from-y-and-b",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}]}]}",
    )])?;
    s.check(
        TCP80,
        &Truth::all_allowed().deny_to("x/a").allow("y/b", "x/a"),
    );

    s.scenario("podSelector OR namespaceSelector as two peers: y/* and x/b reach x/a")?;
    s.apply(&[np(
        "x",
        "a-from-y-or-b",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}, {podSelector: {matchLabels: {pod: b}}}]}]}",
    )])?;
    s.check(
        TCP80,
        &Truth::all_allowed()
            .deny_to("x/a")
            .allow("y", "x/a")
            .allow("x/b", "x/a"),
    );

    s.scenario("namespaceSelector {} with podSelector: pod b of every namespace reaches x/a")?;
    s.apply(&[np(
        "x",
        "a-from-any-b",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {pod: b}}}]}]}",
    )])?;
    s.check(
        TCP80,
        &Truth::all_allowed().deny_to("x/a").allow("*/b", "x/a"),
    );

    s.scenario("a policy in y selecting pod=a does not apply to x/a")?;
    s.apply(&[np(
        "y",
        "deny-a",
        "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress]}",
    )])?;
    s.check(TCP80, &Truth::all_allowed().deny_to("y/a"));

    s.scenario("a policy selecting no pod changes nothing")?;
    s.apply(&[np(
        "x",
        "selects-nobody",
        "{podSelector: {matchLabels: {pod: nobody}}, policyTypes: [Ingress, Egress]}",
    )])?;
    s.check(TCP80, &Truth::all_allowed());

    s.scenario("empty ingress rule allows everything, also with default-deny in the namespace")?;
    s.apply(&[
        np(
            "x",
            "deny-ingress",
            "{podSelector: {}, policyTypes: [Ingress]}",
        ),
        np(
            "x",
            "a-allow-all",
            "{podSelector: {matchLabels: {pod: a}}, ingress: [{}]}",
        ),
    ])?;
    s.check(TCP80, &Truth::all_allowed().deny_to("x").allow_to("x/a"));

    s.scenario("namespaceSelector {} peer allows every pod of every namespace")?;
    s.apply(&[
        np(
            "x",
            "deny-ingress",
            "{podSelector: {}, policyTypes: [Ingress]}",
        ),
        np(
            "x",
            "b-from-all-ns",
            "{podSelector: {matchLabels: {pod: b}}, ingress: [{from: [{namespaceSelector: {}}]}]}",
        ),
    ])?;
    s.check(UDP80, &Truth::all_allowed().deny_to("x").allow_to("x/b"));

    s.scenario("ingress on port number 81 (TCP by default)")?;
    s.apply(&[np(
        "x",
        "a-81",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{ports: [{port: 81}]}]}",
    )])?;
    s.check(TCP80, &Truth::all_allowed().deny_to("x/a"));
    s.check(TCP81, &Truth::all_allowed());
    s.check(UDP81, &Truth::all_allowed().deny_to("x/a"));

    s.scenario("ingress on named port serve-81-tcp, from namespace y")?;
    s.apply(&[np(
        "x",
        "a-named-81",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: serve-81-tcp}]}]}",
    )])?;
    s.check(TCP80, &Truth::all_allowed().deny_to("x/a"));
    s.check(
        TCP81,
        &Truth::all_allowed().deny_to("x/a").allow("y", "x/a"),
    );

    s.scenario("ingress on named UDP port serve-80-udp")?;
    s.apply(&[np(
        "x",
        "a-named-udp",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{ports: [{port: serve-80-udp, protocol: UDP}]}]}",
    )])?;
    s.check(UDP80, &Truth::all_allowed());
    s.check(TCP80, &Truth::all_allowed().deny_to("x/a"));
    s.check(UDP81, &Truth::all_allowed().deny_to("x/a"));

    s.scenario("ingress on a port range (port 81, endPort 90): 81 in, 80 out")?;
    s.apply(&[np(
        "x",
        "a-range",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{ports: [{port: 81, endPort: 90, protocol: TCP}]}]}",
    )])?;
    s.check(TCP80, &Truth::all_allowed().deny_to("x/a"));
    s.check(TCP81, &Truth::all_allowed());

    s.scenario("ingress on UDP only (protocol UDP, no port)")?;
    s.apply(&[np(
        "x",
        "a-udp",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{ports: [{protocol: UDP}]}]}",
    )])?;
    s.check(UDP80, &Truth::all_allowed());
    s.check(UDP81, &Truth::all_allowed());
    s.check(TCP80, &Truth::all_allowed().deny_to("x/a"));

    s.scenario("ingress on two ports of different protocols: 80/TCP and 81/UDP")?;
    s.apply(&[np(
        "x",
        "a-two-ports",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{ports: [{port: 80}, {port: 81, protocol: UDP}]}]}",
    )])?;
    s.check(TCP80, &Truth::all_allowed());
    s.check(UDP81, &Truth::all_allowed());
    s.check(TCP81, &Truth::all_allowed().deny_to("x/a"));
    s.check(UDP80, &Truth::all_allowed().deny_to("x/a"));

    s.scenario("egress to named port serve-80-tcp (resolved on each destination pod)")?;
    s.apply(&[np(
        "x",
        "a-egress-named",
        "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{ports: [{port: serve-80-tcp}]}]}",
    )])?;
    s.check(TCP80, &Truth::all_allowed());
    s.check(TCP81, &Truth::all_allowed().deny_from("x/a"));
    s.check(UDP80, &Truth::all_allowed().deny_from("x/a"));

    s.scenario("egress to a named port no pod declares: nothing out")?;
    s.apply(&[np(
        "x",
        "a-egress-unknown",
        "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{ports: [{port: serve-99-tcp}]}]}",
    )])?;
    s.check(TCP80, &Truth::all_allowed().deny_from("x/a"));

    s.scenario("deny egress except a DNS-like UDP port (81/UDP) for all of x")?;
    s.apply(&[np(
        "x",
        "egress-udp-81",
        "{podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: 81, protocol: UDP}]}]}",
    )])?;
    s.check(UDP81, &Truth::all_allowed());
    s.check(UDP80, &Truth::all_allowed().deny_from("x"));
    s.check(TCP81, &Truth::all_allowed().deny_from("x"));

    s.scenario("egress to namespace y only")?;
    s.apply(&[np(
        "x",
        "a-to-y",
        "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{to: [{namespaceSelector: {matchLabels: {ns: y}}}]}]}",
    )])?;
    s.check(
        TCP80,
        &Truth::all_allowed().deny_from("x/a").allow("x/a", "y"),
    );

    s.scenario("egress to z/c only (namespaceSelector AND podSelector)")?;
    s.apply(&[np(
        "x",
        "a-to-z-c",
        "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{to: [{namespaceSelector: {matchLabels: {ns: z}}, podSelector: {matchLabels: {pod: c}}}]}]}",
    )])?;
    s.check(
        UDP80,
        &Truth::all_allowed().deny_from("x/a").allow("x/a", "z/c"),
    );

    s.scenario("empty egress rule allows everything, also with default-deny-egress in x")?;
    s.apply(&[
        np(
            "x",
            "deny-egress",
            "{podSelector: {}, policyTypes: [Egress]}",
        ),
        np(
            "x",
            "a-egress-all",
            "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{}]}",
        ),
    ])?;
    s.check(
        TCP80,
        &Truth::all_allowed().deny_from("x").allow("x/a", "*"),
    );

    s.scenario("policyTypes left out with egress rules: both directions isolated")?;
    s.apply(&[np(
        "x",
        "a-implicit-types",
        "{podSelector: {matchLabels: {pod: a}}, egress: [{to: [{podSelector: {matchLabels: {pod: b}}}]}]}",
    )])?;
    s.check(
        TCP80,
        &Truth::all_allowed()
            .deny_to("x/a")
            .deny_from("x/a")
            .allow("x/a", "x/b"),
    );

    s.scenario("policyTypes [Egress] only: its ingress rules are ignored, ingress stays open")?;
    s.apply(&[np(
        "x",
        "a-egress-only",
        "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]}",
    )])?;
    s.check(TCP80, &Truth::all_allowed().deny_from("x/a"));

    s.scenario("egress-isolated x/a still answers x/b (replies follow conntrack)")?;
    s.apply(&[np(
        "x",
        "a-in-from-b-no-egress",
        "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress, Egress], ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]}",
    )])?;
    let truth = Truth::all_allowed()
        .deny_to("x/a")
        .deny_from("x/a")
        .allow("x/b", "x/a");
    s.check(TCP80, &truth);
    s.check(UDP80, &truth);

    s.scenario("hairpin: x/a reaches itself through its own Service with ingress from pod=a")?;
    s.apply(&[np(
        "x",
        "a-from-a",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{podSelector: {matchLabels: {pod: a}}}]}]}",
    )])?;
    let truth = Truth::all_allowed().deny_to("x/a").allow("x/a", "x/a");
    s.check(TCP80, &truth);
    s.check(UDP81, &truth);

    s.scenario("multiple policies on x/a are unioned")?;
    s.apply(&[
        np(
            "x",
            "a-from-b",
            "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]}",
        ),
        np(
            "x",
            "a-from-ns-z-81",
            "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: z}}}], ports: [{port: 81}]}]}",
        ),
    ])?;
    s.check(
        TCP80,
        &Truth::all_allowed().deny_to("x/a").allow("x/b", "x/a"),
    );
    s.check(
        TCP81,
        &Truth::all_allowed()
            .deny_to("x/a")
            .allow("x/b", "x/a")
            .allow("z", "x/a"),
    );

    s.scenario("egress of x/a and ingress of y/b must both allow: x/a -> y/b denied by y/b")?;
    s.apply(&[
        np(
            "x",
            "a-to-y-b",
            "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{to: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}]}]}",
        ),
        np(
            "y",
            "b-from-x-c",
            "{podSelector: {matchLabels: {pod: b}}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: x}}, podSelector: {matchLabels: {pod: c}}}]}]}",
        ),
    ])?;
    s.check(
        TCP80,
        &Truth::all_allowed()
            .deny_from("x/a")
            .deny_to("y/b")
            .allow("x/c", "y/b"),
    );

    // ipBlock matches pod IPs too (the upstream suite cannot test this; we can).
    let (yb, zc) = (s.ip("y/b"), s.ip("z/c"));
    s.scenario("egress to ipBlock pod CIDR except y/b's IP")?;
    s.apply(&[np(
        "x",
        "a-to-cidr-except",
        format!(
            "{{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Egress], egress: [{{to: [{{ipBlock: {{cidr: {POD_CIDR}, except: [{yb}/32]}}}}]}}]}}"
        ),
    )])?;
    s.check(TCP80, &Truth::all_allowed().deny("x/a", "y/b"));

    s.scenario("ingress from ipBlock z/c/32 only")?;
    s.apply(&[np(
        "x",
        "a-from-zc-ip",
        format!(
            "{{podSelector: {{matchLabels: {{pod: a}}}}, ingress: [{{from: [{{ipBlock: {{cidr: {zc}/32}}}}]}}]}}"
        ),
    )])?;
    s.check(
        TCP80,
        &Truth::all_allowed().deny_to("x/a").allow("z/c", "x/a"),
    );

    s.scenario("egress to 0.0.0.0/0 except the pod CIDR: no pod reachable")?;
    s.apply(&[np(
        "x",
        "a-to-world",
        format!(
            "{{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Egress], egress: [{{to: [{{ipBlock: {{cidr: 0.0.0.0/0, except: [{POD_CIDR}]}}}}]}}]}}"
        ),
    )])?;
    s.check(TCP80, &Truth::all_allowed().deny_from("x/a"));

    // ---- updates ----

    s.scenario("update a policy in place: x/a from x/b, then from x/c")?;
    s.apply(&[np(
        "x",
        "a-from",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]}",
    )])?;
    s.check(
        TCP80,
        &Truth::all_allowed().deny_to("x/a").allow("x/b", "x/a"),
    );
    s.apply(&[np(
        "x",
        "a-from",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{podSelector: {matchLabels: {pod: c}}}]}]}",
    )])?;
    s.check(
        TCP80,
        &Truth::all_allowed().deny_to("x/a").allow("x/c", "x/a"),
    );

    s.scenario("delete one of two policies, then the other: back to all allowed")?;
    s.apply(&[
        np(
            "x",
            "deny-ingress",
            "{podSelector: {}, policyTypes: [Ingress]}",
        ),
        np(
            "y",
            "deny-egress",
            "{podSelector: {}, policyTypes: [Egress]}",
        ),
    ])?;
    s.check(TCP80, &Truth::all_allowed().deny_to("x").deny_from("y"));
    s.delete_policies(&[("x", "deny-ingress")])?;
    s.check(TCP80, &Truth::all_allowed().deny_from("y"));
    s.delete_policies(&[("y", "deny-egress")])?;
    s.check(TCP80, &Truth::all_allowed());

    s.scenario("pod labels change: x/c gains and loses role=client")?;
    s.apply(&[np(
        "x",
        "a-from-clients",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{podSelector: {matchLabels: {role: client}}}]}]}",
    )])?;
    s.check(TCP80, &Truth::all_allowed().deny_to("x/a"));
    s.relabel_pod(2, ", role: client")?;
    s.check(
        TCP80,
        &Truth::all_allowed().deny_to("x/a").allow("x/c", "x/a"),
    );
    s.relabel_pod(2, "")?;
    s.check(TCP80, &Truth::all_allowed().deny_to("x/a"));

    s.scenario("the target's labels change: x/b gains locked=yes (isolated), then loses it")?;
    s.apply(&[np(
        "x",
        "isolate-locked",
        "{podSelector: {matchLabels: {locked: 'yes'}}, policyTypes: [Ingress]}",
    )])?;
    s.relabel_pod(1, ", locked: 'yes'")?;
    s.check(TCP80, &Truth::all_allowed().deny_to("x/b"));
    s.relabel_pod(1, "")?;
    s.check(TCP80, &Truth::all_allowed());

    s.scenario("namespace labels change: y gains and loses team=blue")?;
    s.apply(&[np(
        "x",
        "a-from-blue",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {team: blue}}}]}]}",
    )])?;
    s.check(TCP80, &Truth::all_allowed().deny_to("x/a"));
    s.lab.apply(&namespace_yaml("y", ", team: blue"))?;
    s.check(
        TCP80,
        &Truth::all_allowed().deny_to("x/a").allow("y", "x/a"),
    );
    s.lab.apply(&namespace_yaml("y", ""))?;
    s.check(TCP80, &Truth::all_allowed().deny_to("x/a"));

    s.scenario("a Namespace cannot fake kubernetes.io/metadata.name (the server overwrites it)")?;
    s.apply(&[np(
        "x",
        "a-from-y-by-name",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}}]}]}",
    )])?;
    s.lab
        .apply(&namespace_yaml("z", ", kubernetes.io/metadata.name: y"))?;
    let namespaces: Value =
        serde_json::from_str(&s.lab.ferrum_ok(&["get", "namespaces", "-o", "json"])?)?;
    let z = namespaces["items"]
        .as_array()
        .and_then(|items| items.iter().find(|o| o["metadata"]["name"] == "z"))
        .cloned()
        .context("namespace z not listed")?;
    if z["metadata"]["labels"]["kubernetes.io/metadata.name"] != "z" {
        let labels = z["metadata"]["labels"].to_string();
        s.fail(format!(
            "namespace z kept a user value for its name label: {labels}"
        ));
    }
    s.check(
        TCP80,
        &Truth::all_allowed().deny_to("x/a").allow("y", "x/a"),
    );
    s.lab.apply(&namespace_yaml("z", ""))?;

    s.scenario("pods deleted and recreated: the policy follows the new pods")?;
    s.apply(&[np(
        "x",
        "a-from-b",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]}",
    )])?;
    s.check(
        TCP80,
        &Truth::all_allowed().deny_to("x/a").allow("x/b", "x/a"),
    );
    // x/a (the selected pod) and x/b (the allowed peer) both go and come back.
    let recreated = format!("{}---\n{}", pod_yaml(0, ""), pod_yaml(1, ""));
    let out = s.lab.ferrum(&["delete", "-f", "-"], Some(&recreated))?;
    ensure!(
        out.status.success(),
        "delete pods: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.lab.apply(&recreated)?;
    for i in [0, 1] {
        s.pods[i] = s.target(i)?;
    }
    // Endpoints follow the new pods asynchronously; wait for x/b's own Service to answer.
    eventually("recreated pods serve through their Services", || {
        let seen = s.probe_cells(TCP80, &[(1, 1), (2, 1), (1, 0)]);
        ensure!(seen.iter().all(|(_, v)| *v == Seen::Answer), "{seen:?}");
        Ok(())
    })?;
    s.check(
        TCP80,
        &Truth::all_allowed().deny_to("x/a").allow("x/b", "x/a"),
    );

    s.scenario("established connections: re-evaluated on their next packet")?;
    established_connections(&mut s)?;

    s.scenario("bad NetworkPolicy input is refused naming the field, nothing applied")?;
    bad_input_is_refused(&mut s)?;

    s.cleanup()?;
    eprintln!(
        "\n{} scenarios in {:.1?}:",
        s.scenarios.len(),
        started.elapsed()
    );
    for (name, ok) in &s.scenarios {
        eprintln!("  {} {name}", if *ok { "ok  " } else { "FAIL" });
    }
    if !s.failures.is_empty() {
        bail!(
            "{} check(s) failed:\n\n{}",
            s.failures.len(),
            s.failures.join("\n")
        );
    }
    Ok(())
}

/// A TCP connection to an echo server in x/b from x/a and one from x/c, then a policy that
/// admits only pod=c into x/b: a's connection stops on its next packet, c's continues, and a
/// new connection from a is refused.
fn established_connections(s: &mut Suite) -> Result<()> {
    const PORT: u16 = 7070;
    let b_ip = s.pods[1].ip;
    let listener = run_in_netns(&s.pods[1].netns, || TcpListener::bind(("0.0.0.0", PORT)))??;
    listener.set_nonblocking(true)?;
    // The listener stays open until the end, so a refused new connection means the policy.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server_stop = stop.clone();
    let server = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !server_stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
            match listener.accept() {
                Ok((mut conn, _)) => {
                    let _ = conn.set_nonblocking(false);
                    // A connection the policy cuts never sees its FIN; do not wait forever.
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 256];
                        while let Ok(n) = conn.read(&mut buf) {
                            if n == 0 || conn.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    });
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(_) => break,
            }
        }
    });
    let connect = |netns: &Path| -> Result<TcpStream> {
        let conn = run_in_netns(netns, move || {
            TcpStream::connect_timeout(&SocketAddr::from((b_ip, PORT)), PROBE_TIMEOUT)
        })??;
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(conn)
    };
    let roundtrip = |conn: &mut TcpStream, msg: &[u8]| -> Result<()> {
        conn.write_all(msg)?;
        let mut buf = vec![0u8; msg.len()];
        conn.read_exact(&mut buf)?;
        ensure!(buf == msg, "echo mismatch");
        Ok(())
    };
    let mut from_a = connect(&s.pods[0].netns).context("x/a -> x/b:7070 before the policy")?;
    let mut from_c = connect(&s.pods[2].netns).context("x/c -> x/b:7070 before the policy")?;
    roundtrip(&mut from_a, b"before")?;
    roundtrip(&mut from_c, b"before")?;

    s.apply(&[np(
        "x",
        "b-from-c",
        "{podSelector: {matchLabels: {pod: b}}, ingress: [{from: [{podSelector: {matchLabels: {pod: c}}}]}]}",
    )])?;
    if let Err(e) = roundtrip(&mut from_c, b"after") {
        s.fail(format!(
            "established x/c -> x/b:{PORT}/TCP (allowed by the new policy) stopped: {e:#}"
        ));
    }
    if roundtrip(&mut from_a, b"after").is_ok() {
        s.fail(format!(
            "established x/a -> x/b:{PORT}/TCP expected DENY on its next packet got ALLOW"
        ));
    }
    if connect(&s.pods[0].netns).is_ok() {
        s.fail(format!("new x/a -> x/b:{PORT}/TCP expected DENY got ALLOW"));
    }
    drop((from_a, from_c));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = server.join();
    Ok(())
}

/// Each bad policy goes in one apply with a valid policy and a Pod: the apply must fail naming
/// the field, and neither of the valid objects may appear.
fn bad_input_is_refused(s: &mut Suite) -> Result<()> {
    let cases: [(&str, &str); 16] = [
        (
            "{podSelector: {matchExpressions: [{key: pod, operator: Equals, values: [a]}]}}",
            "spec.podSelector.matchExpressions[0].operator",
        ),
        (
            "{podSelector: {}, ingress: [{from: [{podSelector: {matchExpressions: [{key: pod, operator: In}]}}]}]}",
            "spec.ingress[0].from[0].podSelector.matchExpressions[0].values",
        ),
        (
            "{podSelector: {}, ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: ns, operator: Exists, values: [x]}]}}]}]}",
            "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].values",
        ),
        (
            "{podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: 'not valid'}}}]}]}",
            "spec.ingress[0].from[0].namespaceSelector.matchLabels[ns]",
        ),
        (
            "{podSelector: {matchLabels: {'bad/key/x': a}}}",
            "spec.podSelector.matchLabels[bad/key/x]",
        ),
        (
            "{podSelector: {}, egress: [{to: [{ipBlock: {cidr: 10.0.0.0/33}}]}]}",
            "spec.egress[0].to[0].ipBlock.cidr",
        ),
        (
            "{podSelector: {}, egress: [{to: [{ipBlock: {cidr: not-a-cidr}}]}]}",
            "spec.egress[0].to[0].ipBlock.cidr",
        ),
        (
            "{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.1.0.0/16, except: [10.2.0.0/24]}}]}]}",
            "spec.ingress[0].from[0].ipBlock.except[0]",
        ),
        (
            "{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.1.0.0/16, except: [10.1.0.0/16]}}]}]}",
            "spec.ingress[0].from[0].ipBlock.except[0]",
        ),
        (
            "{podSelector: {}, ingress: [{ports: [{port: 0}]}]}",
            "spec.ingress[0].ports[0].port",
        ),
        (
            "{podSelector: {}, ingress: [{ports: [{port: 70000}]}]}",
            "spec.ingress[0].ports[0].port",
        ),
        (
            "{podSelector: {}, ingress: [{ports: [{port: 81, endPort: 80}]}]}",
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            "{podSelector: {}, egress: [{ports: [{port: serve-80-tcp, endPort: 90}]}]}",
            "spec.egress[0].ports[0].endPort",
        ),
        (
            "{podSelector: {}, ingress: [{ports: [{port: 80, protocol: ICMP}]}]}",
            "spec.ingress[0].ports[0].protocol",
        ),
        (
            "{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.1.0.0/16}, podSelector: {}}]}]}",
            "spec.ingress[0].from[0]",
        ),
        (
            "{podSelector: {}, policyTypes: [Ingress, Both]}",
            "spec.policyTypes[1]",
        ),
    ];
    let extra_pod = pod_yaml(3, "").replace("name: a, namespace: y", "name: extra, namespace: x");
    for (spec, field) in cases {
        let batch = [
            np("x", "valid", "{podSelector: {}, policyTypes: [Ingress]}").yaml(),
            extra_pod.clone(),
            np("x", "bad", spec).yaml(),
        ]
        .join("---\n");
        let out = s.lab.ferrum(&["apply", "-f", "-"], Some(&batch))?;
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !err.contains(&format!("{field}:")) {
            s.fail(format!(
                "bad policy {spec}: expected a refusal naming {field}, got exit {:?}: {err}",
                out.status.code()
            ));
        }
    }
    let policies = s
        .lab
        .ferrum_ok(&["get", "networkpolicies", "-n", "x", "-o", "json"])?;
    let pods = s.lab.ferrum_ok(&["get", "pods", "-n", "x", "-o", "json"])?;
    let policies: Value = serde_json::from_str(&policies)?;
    let pods: Value = serde_json::from_str(&pods)?;
    let names = |list: &Value| -> Vec<String> {
        list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| o["metadata"]["name"].as_str().map(String::from))
            .collect()
    };
    if !names(&policies).is_empty() || names(&pods).contains(&"extra".to_string()) {
        s.fail(format!(
            "a refused apply left objects behind: policies {:?}, pods {:?}",
            names(&policies),
            names(&pods)
        ));
    }
    // Nothing of it reached the datapath either.
    s.check(TCP80, &Truth::all_allowed());
    Ok(())
}
