//! `ferrum apply|delete|get`: Kubernetes objects in the lab's control plane, kubectl-style.

use std::io::Read;

use anyhow::{Context, Result, bail};
use clap::Args;
use ferrum_lab::client::LabClient;
use ferrum_lab::profile::LabPaths;
use ferrum_model::{Kind, Object, ObjectRef, parse_documents};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};

#[derive(Args, Debug, Clone)]
pub struct ApplyArgs {
    /// File with multi-document YAML, or `-` for standard input.
    #[arg(short = 'f', long = "filename")]
    pub filename: String,
    /// Return once the change is stored, without waiting for every node's datapath.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Args, Debug, Clone)]
pub struct GetArgs {
    /// pods, services, networkpolicies, namespaces, nodes, endpointslices (or pod, po, svc, ...).
    pub resource: String,
    /// Only these names.
    pub names: Vec<String>,
    /// Namespace to list (default: "default").
    #[arg(short = 'n', long = "namespace")]
    pub namespace: Option<String>,
    /// List across all namespaces.
    #[arg(short = 'A', long = "all-namespaces")]
    pub all_namespaces: bool,
    /// Output format: json, yaml or wide.
    #[arg(short = 'o', long = "output")]
    pub output: Option<String>,
}

pub(crate) fn client(lab_name: &str) -> Result<LabClient> {
    let paths = LabPaths::new(lab_name)?;
    Ok(LabClient::new(paths.cp_socket()))
}

fn read_documents(filename: &str) -> Result<Vec<Object>> {
    let text = if filename == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading YAML from standard input")?;
        s
    } else {
        std::fs::read_to_string(filename).with_context(|| format!("reading {filename}"))?
    };
    let objects = parse_documents(&text).with_context(|| format!("in {filename}"))?;
    if objects.is_empty() {
        bail!("no objects in {filename}");
    }
    Ok(objects)
}

pub fn apply(lab_name: &str, args: ApplyArgs) -> Result<()> {
    let objects = read_documents(&args.filename)?;
    let outcome = client(lab_name)?
        .apply(objects, !args.no_wait)
        .context("apply failed")?;
    for (r, action) in outcome.results {
        println!("{} {}", r.kubectl_name(), action.as_str());
    }
    Ok(())
}

pub fn delete(lab_name: &str, args: ApplyArgs) -> Result<()> {
    let refs: Vec<ObjectRef> = read_documents(&args.filename)?
        .iter()
        .map(ObjectRef::of)
        .collect();
    client(lab_name)?
        .delete(refs.clone(), !args.no_wait)
        .context("delete failed")?;
    for r in refs {
        println!("{} deleted", r.kubectl_name());
    }
    Ok(())
}

pub fn get(lab_name: &str, args: GetArgs) -> Result<()> {
    let Some(kind) = Kind::from_resource(&args.resource) else {
        bail!(
            "the server doesn't have a resource type {:?}; use one of pods, services, \
             networkpolicies, namespaces, nodes, endpointslices",
            args.resource
        );
    };
    let namespace = match (kind.namespaced(), args.all_namespaces) {
        (true, false) => Some(args.namespace.clone().unwrap_or_else(|| "default".into())),
        _ => None,
    };
    let mut items = client(lab_name)?
        .list(kind, namespace.as_deref())
        .context("get failed")?;
    if !args.names.is_empty() {
        for name in &args.names {
            if !items.iter().any(|o| o.name() == name) {
                bail!("{} {name:?} not found", kind.plural());
            }
        }
        items.retain(|o| args.names.iter().any(|n| n == o.name()));
    }
    match args.output.as_deref() {
        Some("json") => {
            println!("{}", serde_json::to_string_pretty(&as_list(&items))?);
        }
        Some("yaml") => print!("{}", serde_yaml::to_string(&as_list(&items))?),
        None | Some("wide") => {
            if items.is_empty() {
                match &namespace {
                    Some(ns) => eprintln!("No resources found in {ns} namespace."),
                    None => eprintln!("No resources found"),
                }
                return Ok(());
            }
            let wide = args.output.is_some();
            let with_ns = args.all_namespaces && kind.namespaced();
            // Services -o wide also show how many backends each has (ready/all endpoints).
            let extra = if kind == Kind::Service && wide {
                let slices = client(lab_name)?
                    .list(Kind::EndpointSlice, None)
                    .context("listing EndpointSlices")?;
                Some((
                    "BACKENDS",
                    crate::service_cmd::backend_counts(&items, &slices),
                ))
            } else {
                None
            };
            print!(
                "{}",
                render_table_with(kind, &items, wide, with_ns, now_secs(), extra)
            );
        }
        Some(other) => bail!("unknown output format {other:?}: use json, yaml or wide"),
    }
    Ok(())
}

fn as_list(items: &[Object]) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": items,
        "metadata": {"resourceVersion": ""},
    })
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// kubectl's compact age: 45s, 5m30s, 3h, 2d4h, ...
fn age(created: Option<&Time>, now: i64) -> String {
    let Some(t) = created else {
        return "<unknown>".into();
    };
    let s = (now - t.0.as_second()).max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86400);
    match s {
        _ if s < 120 => format!("{s}s"),
        _ if m < 10 => match s % 60 {
            0 => format!("{m}m"),
            r => format!("{m}m{r}s"),
        },
        _ if h < 3 => format!("{m}m"),
        _ if h < 8 => match m % 60 {
            0 => format!("{h}h"),
            r => format!("{h}h{r}m"),
        },
        _ if h < 48 => format!("{h}h"),
        _ if d < 8 => match h % 24 {
            0 => format!("{d}d"),
            r => format!("{d}d{r}h"),
        },
        _ if d < 365 * 2 => format!("{d}d"),
        _ => format!("{}y", d / 365),
    }
}

fn none_if_empty(s: String) -> String {
    if s.is_empty() { "<none>".into() } else { s }
}

fn selector_text(sel: Option<&LabelSelector>) -> String {
    let Some(sel) = sel else {
        return "<none>".into();
    };
    let mut parts: Vec<String> = sel
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in sel.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            op => format!("{} {} ({values})", e.key, op.to_lowercase()),
        });
    }
    if parts.is_empty() {
        "<none>".into()
    } else {
        parts.join(",")
    }
}

fn row(kind: Kind, object: &Object, wide: bool, now: i64) -> Vec<String> {
    let name = object.name().to_string();
    let age = age(object.metadata().creation_timestamp.as_ref(), now);
    match object {
        Object::Pod(p) => {
            let total = p.spec.as_ref().map_or(0, |s| s.containers.len());
            let status = p.status.clone().unwrap_or_default();
            let statuses = status.container_statuses.unwrap_or_default();
            let ready = statuses.iter().filter(|c| c.ready).count();
            let restarts: i32 = statuses.iter().map(|c| c.restart_count).sum();
            let mut r = vec![
                name,
                format!("{ready}/{total}"),
                status.phase.clone().unwrap_or_else(|| "Pending".into()),
                restarts.to_string(),
                age,
            ];
            if wide {
                r.push(status.pod_ip.unwrap_or_else(|| "<none>".into()));
                r.push(
                    p.spec
                        .as_ref()
                        .and_then(|s| s.node_name.clone())
                        .unwrap_or_else(|| "<none>".into()),
                );
            }
            r
        }
        Object::Service(s) => {
            let spec = s.spec.clone().unwrap_or_default();
            let svc_type = spec.type_.clone().unwrap_or_else(|| "ClusterIP".into());
            let lb_ips: Vec<String> = s
                .status
                .as_ref()
                .and_then(|st| st.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref())
                .into_iter()
                .flatten()
                .filter_map(|i| i.ip.clone().or_else(|| i.hostname.clone()))
                .chain(spec.external_ips.clone().unwrap_or_default())
                .collect();
            let external = match (svc_type.as_str(), lb_ips.is_empty()) {
                ("ExternalName", _) => spec.external_name.clone().unwrap_or_default(),
                ("LoadBalancer", true) => "<pending>".into(),
                (_, true) => "<none>".into(),
                _ => lb_ips.join(","),
            };
            let ports: Vec<String> = spec
                .ports
                .iter()
                .flatten()
                .map(|p| {
                    let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
                    match p.node_port {
                        Some(np) if np != 0 => format!("{}:{np}/{proto}", p.port),
                        _ => format!("{}/{proto}", p.port),
                    }
                })
                .collect();
            let mut r = vec![
                name,
                svc_type,
                spec.cluster_ip.clone().unwrap_or_else(|| "<none>".into()),
                external,
                none_if_empty(ports.join(",")),
                age,
            ];
            if wide {
                let sel: Vec<String> = spec
                    .selector
                    .iter()
                    .flatten()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                r.push(none_if_empty(sel.join(",")));
            }
            r
        }
        Object::Node(n) => {
            let status = n.status.clone().unwrap_or_default();
            let ready = status
                .conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == "Ready")
                .map(|c| {
                    if c.status == "True" {
                        "Ready"
                    } else {
                        "NotReady"
                    }
                })
                .unwrap_or("Unknown");
            let version = status
                .node_info
                .as_ref()
                .map(|i| i.kubelet_version.clone())
                .unwrap_or_default();
            let mut r = vec![
                name,
                ready.into(),
                "<none>".into(),
                age,
                none_if_empty(version),
            ];
            if wide {
                let ip = status
                    .addresses
                    .iter()
                    .flatten()
                    .find(|a| a.type_ == "InternalIP")
                    .map(|a| a.address.clone())
                    .unwrap_or_else(|| "<none>".into());
                let cidr = n
                    .spec
                    .as_ref()
                    .and_then(|s| s.pod_cidr.clone())
                    .unwrap_or_else(|| "<none>".into());
                r.push(ip);
                r.push(cidr);
            }
            r
        }
        Object::Namespace(ns) => {
            let phase = ns
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_else(|| "Active".into());
            vec![name, phase, age]
        }
        Object::NodeNetworkConfig(n) => {
            let (assigned, subnet) = n.status.as_ref().map_or((0, "<none>".to_string()), |s| {
                (s.assigned_ips.len(), s.pod_subnet.clone())
            });
            vec![
                name,
                n.spec.requested_ip_count.to_string(),
                assigned.to_string(),
                subnet,
                age,
            ]
        }
        Object::NetworkPolicy(np) => {
            let sel = selector_text(np.spec.as_ref().and_then(|s| s.pod_selector.as_ref()));
            vec![name, sel, age]
        }
        Object::EndpointSlice(es) => {
            let ports: Vec<String> = es
                .ports
                .iter()
                .flatten()
                .filter_map(|p| p.port.map(|n| n.to_string()))
                .collect();
            let addrs: Vec<String> = es
                .endpoints
                .iter()
                .flat_map(|e| e.addresses.clone())
                .collect();
            debug_assert_eq!(kind, Kind::EndpointSlice);
            vec![
                name,
                es.address_type.clone(),
                none_if_empty(ports.join(",")),
                none_if_empty(addrs.join(",")),
                age,
            ]
        }
    }
}

fn headers(kind: Kind, wide: bool) -> Vec<&'static str> {
    let mut h = match kind {
        Kind::Pod => vec!["NAME", "READY", "STATUS", "RESTARTS", "AGE"],
        Kind::Service => vec![
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE",
        ],
        Kind::Node => vec!["NAME", "STATUS", "ROLES", "AGE", "VERSION"],
        Kind::Namespace => vec!["NAME", "STATUS", "AGE"],
        Kind::NetworkPolicy => vec!["NAME", "POD-SELECTOR", "AGE"],
        Kind::NodeNetworkConfig => vec!["NAME", "REQUESTED IPS", "ASSIGNED IPS", "SUBNET", "AGE"],
        Kind::EndpointSlice => vec!["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"],
    };
    if wide {
        match kind {
            Kind::Pod => h.extend(["IP", "NODE"]),
            Kind::Service => h.push("SELECTOR"),
            Kind::Node => h.extend(["INTERNAL-IP", "POD-CIDR"]),
            _ => {}
        }
    }
    h
}

/// A kubectl-style table: columns padded to the widest cell plus three spaces.
#[cfg(test)]
fn render_table(
    kind: Kind,
    items: &[Object],
    wide: bool,
    with_namespace: bool,
    now: i64,
) -> String {
    render_table_with(kind, items, wide, with_namespace, now, None)
}

/// `extra`: one more column (header, a cell per item) appended at the end.
fn render_table_with(
    kind: Kind,
    items: &[Object],
    wide: bool,
    with_namespace: bool,
    now: i64,
    extra: Option<(&str, Vec<String>)>,
) -> String {
    let mut rows: Vec<Vec<String>> = Vec::with_capacity(items.len() + 1);
    let mut head: Vec<String> = headers(kind, wide).into_iter().map(String::from).collect();
    if with_namespace {
        head.insert(0, "NAMESPACE".into());
    }
    if let Some((h, _)) = &extra {
        head.push(h.to_string());
    }
    rows.push(head);
    for (i, o) in items.iter().enumerate() {
        let mut r = row(kind, o, wide, now);
        if with_namespace {
            r.insert(0, o.namespace().unwrap_or("").to_string());
        }
        if let Some((_, cells)) = &extra {
            r.push(cells.get(i).cloned().unwrap_or_default());
        }
        rows.push(r);
    }
    let columns = rows[0].len();
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, String::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == columns {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}   ", width = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn ages_read_like_kubectl() {
        let now = 1_000_000;
        let cases = [
            (5, "5s"),
            (119, "119s"),
            (330, "5m30s"),
            (3600, "60m"),
            (4 * 3600 + 60, "4h1m"),
            (30 * 3600, "30h"),
            (3 * 86400 + 7200, "3d2h"),
            (40 * 86400, "40d"),
        ];
        for (ago, want) in cases {
            assert_eq!(age(Some(&t(now - ago)), now), want, "{ago}s ago");
        }
        assert_eq!(age(None, now), "<unknown>");
    }

    #[test]
    fn pod_table_has_kubectl_columns_and_wide_adds_ip_and_node() {
        let yaml = "apiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: shop, creationTimestamp: \"1970-01-01T00:00:10Z\"}\n\
                    spec: {nodeName: node-1, containers: [{name: a}, {name: b}]}\n\
                    status: {phase: Running, podIP: 10.244.1.5, containerStatuses: [{name: a, ready: true, restartCount: 2, image: x, imageID: y}]}\n";
        let items = parse_documents(yaml).unwrap();
        let table = render_table(Kind::Pod, &items, false, false, 70);
        assert_eq!(
            table,
            "NAME    READY   STATUS    RESTARTS   AGE\nweb-0   1/2     Running   2          60s\n"
        );
        let wide = render_table(Kind::Pod, &items, true, true, 70);
        let lines: Vec<&str> = wide.lines().collect();
        assert!(
            lines[0].starts_with("NAMESPACE   NAME") && lines[0].ends_with("IP           NODE"),
            "{wide}"
        );
        assert!(
            lines[1].starts_with("shop        web-0") && lines[1].ends_with("10.244.1.5   node-1"),
            "{wide}"
        );
    }

    #[test]
    fn service_ports_show_node_ports_and_protocols() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n\
                    spec: {type: LoadBalancer, clusterIP: 10.0.0.10, ports: [{name: a, port: 80, nodePort: 30080}, {name: b, port: 53, protocol: UDP}]}\n";
        let items = parse_documents(yaml).unwrap();
        let table = render_table(Kind::Service, &items, false, false, 0);
        let line = table.lines().nth(1).unwrap();
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            cells[..5],
            [
                "web",
                "LoadBalancer",
                "10.0.0.10",
                "<pending>",
                "80:30080/TCP,53/UDP"
            ]
        );
    }

    #[test]
    fn json_output_is_a_kubernetes_list() {
        let items =
            parse_documents("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n").unwrap();
        let list = as_list(&items);
        assert_eq!(list["kind"], "List");
        assert_eq!(list["items"][0]["kind"], "Namespace");
        assert_eq!(list["items"][0]["apiVersion"], "v1");
    }
}
