//! Validation of objects, following the Kubernetes API server's rules where they matter to
//! Ferrum (names, labels, ports, protocols, selectors, CIDRs).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Container, Namespace, Node, Pod, Probe, Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::kind::{Kind, ObjectRef};
use crate::object::Object;

/// An object broke a rule: which object, which field, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {field}: {message}")]
pub struct ValidationError {
    /// `Pod default/a`
    pub object: String,
    /// `spec.containers[0].ports[0].containerPort`
    pub field: String,
    pub message: String,
}

type Check = Result<(), (String, String)>;

fn fail(field: impl Into<String>, message: impl Into<String>) -> Check {
    Err((field.into(), message.into()))
}

/// Sets defaults the API server would: namespace "default" for namespaced kinds, no namespace
/// for cluster-scoped ones.
pub fn normalize(object: &mut Object) {
    let namespaced = Kind::of(object).namespaced();
    let meta = object.metadata_mut();
    if namespaced {
        if meta.namespace.as_deref().is_none_or(str::is_empty) {
            meta.namespace = Some("default".to_string());
        }
    } else {
        meta.namespace = None;
    }
}

/// Checks an object (after [`normalize`]) against the rules the API server enforces for the
/// fields Ferrum uses.
pub fn validate(object: &Object) -> Result<(), ValidationError> {
    let kind = Kind::of(object);
    let result = validate_meta(kind, object.metadata()).and_then(|()| match object {
        Object::Namespace(ns) => validate_namespace(ns),
        Object::Node(node) => validate_node(node),
        Object::Pod(pod) => validate_pod(pod),
        Object::Service(svc) => validate_service(svc),
        Object::EndpointSlice(slice) => validate_endpoint_slice(slice),
        Object::NetworkPolicy(np) => validate_network_policy(np),
        Object::NodeNetworkConfig(_) => Ok(()),
    });
    result.map_err(|(field, message)| {
        let mut named = ObjectRef::of(object);
        if named.name.is_empty() {
            named.name = "<unnamed>".to_string();
        }
        ValidationError {
            object: named.to_string(),
            field,
            message,
        }
    })
}

// ---- names and labels ----

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// DNS-1123 label: what Namespaces and container names must be.
pub fn is_dns1123_label(s: &str) -> bool {
    is_dns_label(s)
}

/// DNS-1123 subdomain: what Pods, Nodes, NetworkPolicies and EndpointSlices must be named.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// DNS-1035 label: what Services must be named (starts with a letter).
pub fn is_dns1035_label(s: &str) -> bool {
    is_dns_label(s) && s.starts_with(|c: char| c.is_ascii_lowercase())
}

fn is_label_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn is_label_key(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => is_dns1123_subdomain(prefix) && is_label_name(name),
        None => is_label_name(s),
    }
}

fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_label_name(s)
}

/// IANA service name: what named ports must be (1-15 chars, a letter somewhere, no `--`).
fn is_iana_svc_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

fn check_labels(field: &str, labels: &BTreeMap<String, String>) -> Check {
    for (key, value) in labels {
        if !is_label_key(key) {
            return fail(
                format!("{field}[{key}]"),
                "invalid label key: use an optional DNS prefix and '/', then 1-63 characters from \
                 [A-Za-z0-9-_.] starting and ending alphanumeric",
            );
        }
        if !is_label_value(value) {
            return fail(
                format!("{field}[{key}]"),
                format!(
                    "invalid label value {value:?}: use 0-63 characters from [A-Za-z0-9-_.] \
                     starting and ending alphanumeric"
                ),
            );
        }
    }
    Ok(())
}

fn validate_meta(kind: Kind, meta: &ObjectMeta) -> Check {
    let Some(name) = meta.name.as_deref().filter(|n| !n.is_empty()) else {
        return fail("metadata.name", "required");
    };
    let (ok, rule) = match kind {
        Kind::Namespace => (
            is_dns1123_label(name),
            "a DNS-1123 label (lower-case letters, digits and '-', at most 63, starting and ending alphanumeric)",
        ),
        Kind::Service => (
            is_dns1035_label(name),
            "a DNS-1035 label (lower-case letters, digits and '-', at most 63, starting with a letter)",
        ),
        _ => (
            is_dns1123_subdomain(name),
            "a DNS-1123 subdomain (lower-case letters, digits, '-' and '.', at most 253)",
        ),
    };
    if !ok {
        return fail(
            "metadata.name",
            format!("invalid name {name:?}: must be {rule}"),
        );
    }
    if kind.namespaced() {
        match meta.namespace.as_deref() {
            None | Some("") => return fail("metadata.namespace", "required"),
            Some(ns) if !is_dns1123_label(ns) => {
                return fail(
                    "metadata.namespace",
                    format!("invalid namespace {ns:?}: must be a DNS-1123 label"),
                );
            }
            Some(_) => {}
        }
    }
    if let Some(labels) = &meta.labels {
        check_labels("metadata.labels", labels)?;
    }
    if let Some(annotations) = &meta.annotations {
        for key in annotations.keys() {
            if !is_label_key(key) {
                return fail(
                    format!("metadata.annotations[{key}]"),
                    "invalid annotation key",
                );
            }
        }
    }
    Ok(())
}

// ---- shared pieces ----

fn check_protocol(field: &str, protocol: Option<&str>) -> Check {
    match protocol {
        None | Some("TCP" | "UDP" | "SCTP") => Ok(()),
        Some(other) => fail(
            field,
            format!("unsupported protocol {other:?}: use TCP, UDP or SCTP"),
        ),
    }
}

fn check_port_number(field: &str, port: i32) -> Check {
    if (1..=65535).contains(&port) {
        Ok(())
    } else {
        fail(field, format!("must be between 1 and 65535, got {port}"))
    }
}

fn check_int_or_name_port(field: &str, port: &IntOrString) -> Check {
    match port {
        IntOrString::Int(n) => check_port_number(field, *n),
        IntOrString::String(name) => {
            // YAML quoting can turn a number into a string; the API server accepts it as a number.
            if let Ok(n) = name.parse::<i32>() {
                return check_port_number(field, n);
            }
            if is_iana_svc_name(name) {
                Ok(())
            } else {
                fail(
                    field,
                    format!(
                        "invalid port name {name:?}: use a number 1-65535 or an IANA service name \
                         (1-15 lower-case letters, digits, '-')"
                    ),
                )
            }
        }
    }
}

fn check_cidr(field: &str, cidr: &str) -> Result<IpNet, (String, String)> {
    cidr.parse::<IpNet>().map_err(|_| {
        (
            field.to_string(),
            format!("invalid CIDR {cidr:?}: use an address and prefix length such as 10.0.0.0/16"),
        )
    })
}

fn check_selector(field: &str, selector: &LabelSelector) -> Check {
    if let Some(labels) = &selector.match_labels {
        check_labels(&format!("{field}.matchLabels"), labels)?;
    }
    for (i, expr) in selector.match_expressions.iter().flatten().enumerate() {
        let f = format!("{field}.matchExpressions[{i}]");
        if !is_label_key(&expr.key) {
            return fail(
                format!("{f}.key"),
                format!("invalid label key {:?}", expr.key),
            );
        }
        let values = expr.values.as_deref().unwrap_or_default();
        match expr.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                return fail(
                    format!("{f}.values"),
                    format!("operator {} needs at least one value", expr.operator),
                );
            }
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                return fail(
                    format!("{f}.values"),
                    format!("operator {} takes no values", expr.operator),
                );
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => {
                return fail(
                    format!("{f}.operator"),
                    format!("unknown operator {other:?}: use In, NotIn, Exists or DoesNotExist"),
                );
            }
        }
        for (j, v) in values.iter().enumerate() {
            if !is_label_value(v) {
                return fail(
                    format!("{f}.values[{j}]"),
                    format!("invalid label value {v:?}"),
                );
            }
        }
    }
    Ok(())
}

// ---- kinds ----

fn validate_namespace(_ns: &Namespace) -> Check {
    Ok(())
}

fn validate_node(node: &Node) -> Check {
    if let Some(spec) = &node.spec {
        if let Some(cidr) = &spec.pod_cidr {
            check_cidr("spec.podCIDR", cidr)?;
        }
        for (i, cidr) in spec.pod_cidrs.iter().flatten().enumerate() {
            check_cidr(&format!("spec.podCIDRs[{i}]"), cidr)?;
        }
    }
    Ok(())
}

fn validate_probe(field: &str, probe: &Probe) -> Check {
    let handlers = [
        probe.exec.is_some(),
        probe.tcp_socket.is_some(),
        probe.http_get.is_some(),
        probe.grpc.is_some(),
    ];
    match handlers.iter().filter(|h| **h).count() {
        0 => return fail(field, "needs one handler: exec, tcpSocket, httpGet or grpc"),
        1 => {}
        _ => {
            return fail(
                field,
                "may have only one handler of exec, tcpSocket, httpGet, grpc",
            );
        }
    }
    if let Some(tcp) = &probe.tcp_socket {
        check_int_or_name_port(&format!("{field}.tcpSocket.port"), &tcp.port)?;
    }
    if let Some(http) = &probe.http_get {
        check_int_or_name_port(&format!("{field}.httpGet.port"), &http.port)?;
    }
    if let Some(exec) = &probe.exec
        && exec.command.as_deref().unwrap_or_default().is_empty()
    {
        return fail(format!("{field}.exec.command"), "required");
    }
    Ok(())
}

fn validate_container(field: &str, c: &Container) -> Check {
    if !is_dns1123_label(&c.name) {
        return fail(
            format!("{field}.name"),
            format!(
                "invalid container name {:?}: must be a DNS-1123 label",
                c.name
            ),
        );
    }
    let mut port_names = BTreeSet::new();
    for (i, p) in c.ports.iter().flatten().enumerate() {
        let f = format!("{field}.ports[{i}]");
        check_port_number(&format!("{f}.containerPort"), p.container_port)?;
        if let Some(host_port) = p.host_port
            && !(0..=65535).contains(&host_port)
        {
            return fail(
                format!("{f}.hostPort"),
                format!("must be between 0 and 65535, got {host_port}"),
            );
        }
        check_protocol(&format!("{f}.protocol"), p.protocol.as_deref())?;
        if let Some(name) = &p.name {
            if !is_iana_svc_name(name) {
                return fail(
                    format!("{f}.name"),
                    format!("invalid port name {name:?}: must be an IANA service name"),
                );
            }
            if !port_names.insert(name.clone()) {
                return fail(format!("{f}.name"), format!("duplicate port name {name:?}"));
            }
        }
    }
    if let Some(probe) = &c.readiness_probe {
        validate_probe(&format!("{field}.readinessProbe"), probe)?;
    }
    Ok(())
}

fn validate_pod(pod: &Pod) -> Check {
    let Some(spec) = &pod.spec else {
        return fail("spec", "required");
    };
    if spec.containers.is_empty() {
        return fail(
            "spec.containers",
            "required: a Pod needs at least one container",
        );
    }
    let mut names = BTreeSet::new();
    let all = spec
        .init_containers
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, c)| (format!("spec.initContainers[{i}]"), c))
        .chain(
            spec.containers
                .iter()
                .enumerate()
                .map(|(i, c)| (format!("spec.containers[{i}]"), c)),
        );
    for (field, c) in all {
        validate_container(&field, c)?;
        if !names.insert(c.name.clone()) {
            return fail(
                format!("{field}.name"),
                format!("duplicate container name {:?}", c.name),
            );
        }
    }
    if let Some(node) = &spec.node_name
        && !is_dns1123_subdomain(node)
    {
        return fail("spec.nodeName", format!("invalid node name {node:?}"));
    }
    match spec.restart_policy.as_deref() {
        None | Some("Always" | "OnFailure" | "Never") => {}
        Some(other) => {
            return fail(
                "spec.restartPolicy",
                format!("unsupported value {other:?}: use Always, OnFailure or Never"),
            );
        }
    }
    Ok(())
}

fn validate_service_port(field: &str, p: &ServicePort, node_ports_allowed: bool) -> Check {
    check_port_number(&format!("{field}.port"), p.port)?;
    check_protocol(&format!("{field}.protocol"), p.protocol.as_deref())?;
    if let Some(name) = &p.name
        && !name.is_empty()
        && !is_dns1123_label(name)
    {
        return fail(
            format!("{field}.name"),
            format!("invalid port name {name:?}: must be a DNS-1123 label"),
        );
    }
    if let Some(target) = &p.target_port {
        check_int_or_name_port(&format!("{field}.targetPort"), target)?;
    }
    if let Some(node_port) = p.node_port.filter(|n| *n != 0) {
        if !node_ports_allowed {
            return fail(
                format!("{field}.nodePort"),
                "may only be set for type NodePort or LoadBalancer",
            );
        }
        check_port_number(&format!("{field}.nodePort"), node_port)?;
    }
    Ok(())
}

fn validate_service(svc: &Service) -> Check {
    let Some(spec) = &svc.spec else {
        return fail("spec", "required");
    };
    let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if !matches!(
        service_type,
        "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
    ) {
        return fail(
            "spec.type",
            format!(
                "unsupported value {service_type:?}: use ClusterIP, NodePort, LoadBalancer or ExternalName"
            ),
        );
    }
    let headless = spec.cluster_ip.as_deref() == Some("None");
    match spec.cluster_ip.as_deref() {
        None | Some("" | "None") => {}
        Some(ip) if ip.parse::<IpAddr>().is_ok() => {}
        Some(ip) => {
            return fail(
                "spec.clusterIP",
                format!("invalid value {ip:?}: use an IP address, \"None\" or leave it out"),
            );
        }
    }
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() && !headless && service_type != "ExternalName" {
        return fail("spec.ports", "required: a Service needs at least one port");
    }
    let node_ports_allowed = matches!(service_type, "NodePort" | "LoadBalancer");
    let mut names = BTreeSet::new();
    let mut keys = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let f = format!("spec.ports[{i}]");
        validate_service_port(&f, p, node_ports_allowed)?;
        let name = p.name.clone().unwrap_or_default();
        if ports.len() > 1 && name.is_empty() {
            return fail(
                format!("{f}.name"),
                "required when a Service has more than one port",
            );
        }
        if !names.insert(name.clone()) {
            return fail(format!("{f}.name"), format!("duplicate port name {name:?}"));
        }
        let protocol = p.protocol.clone().unwrap_or_else(|| "TCP".to_string());
        if !keys.insert((p.port, protocol.clone())) {
            return fail(
                format!("{f}.port"),
                format!("duplicate port {}/{protocol}", p.port),
            );
        }
    }
    if let Some(selector) = &spec.selector {
        check_labels("spec.selector", selector)?;
    }
    for (field, value) in [
        (
            "spec.externalTrafficPolicy",
            spec.external_traffic_policy.as_deref(),
        ),
        (
            "spec.internalTrafficPolicy",
            spec.internal_traffic_policy.as_deref(),
        ),
    ] {
        if let Some(v) = value
            && !matches!(v, "Cluster" | "Local")
        {
            return fail(
                field,
                format!("unsupported value {v:?}: use Cluster or Local"),
            );
        }
    }
    if let Some(v) = spec.session_affinity.as_deref()
        && !matches!(v, "None" | "ClientIP")
    {
        return fail(
            "spec.sessionAffinity",
            format!("unsupported value {v:?}: use None or ClientIP"),
        );
    }
    Ok(())
}

fn validate_endpoint_slice(slice: &EndpointSlice) -> Check {
    let family = slice.address_type.as_str();
    if !matches!(family, "IPv4" | "IPv6" | "FQDN") {
        return fail(
            "addressType",
            format!("unsupported value {family:?}: use IPv4, IPv6 or FQDN"),
        );
    }
    for (i, ep) in slice.endpoints.iter().enumerate() {
        if ep.addresses.is_empty() || ep.addresses.len() > 100 {
            return fail(
                format!("endpoints[{i}].addresses"),
                "must hold between 1 and 100 addresses",
            );
        }
        for (j, addr) in ep.addresses.iter().enumerate() {
            let ok = match family {
                "IPv4" => addr.parse::<std::net::Ipv4Addr>().is_ok(),
                "IPv6" => addr.parse::<std::net::Ipv6Addr>().is_ok(),
                _ => is_dns1123_subdomain(addr),
            };
            if !ok {
                return fail(
                    format!("endpoints[{i}].addresses[{j}]"),
                    format!("{addr:?} is not a valid {family} address"),
                );
            }
        }
    }
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let f = format!("ports[{i}]");
        if let Some(port) = p.port {
            check_port_number(&format!("{f}.port"), port)?;
        }
        check_protocol(&format!("{f}.protocol"), p.protocol.as_deref())?;
    }
    Ok(())
}

fn validate_peer(field: &str, peer: &NetworkPolicyPeer) -> Check {
    let has_selector = peer.pod_selector.is_some() || peer.namespace_selector.is_some();
    match (&peer.ip_block, has_selector) {
        (None, false) => {
            return fail(field, "needs podSelector, namespaceSelector or ipBlock");
        }
        (Some(_), true) => {
            return fail(
                field,
                "ipBlock may not be combined with podSelector or namespaceSelector",
            );
        }
        _ => {}
    }
    if let Some(sel) = &peer.pod_selector {
        check_selector(&format!("{field}.podSelector"), sel)?;
    }
    if let Some(sel) = &peer.namespace_selector {
        check_selector(&format!("{field}.namespaceSelector"), sel)?;
    }
    if let Some(block) = &peer.ip_block {
        let cidr = check_cidr(&format!("{field}.ipBlock.cidr"), &block.cidr)?.trunc();
        for (i, except) in block.except.iter().flatten().enumerate() {
            let f = format!("{field}.ipBlock.except[{i}]");
            let ex = check_cidr(&f, except)?;
            if !(cidr.contains(&ex.trunc()) && ex.prefix_len() > cidr.prefix_len()) {
                return fail(
                    f,
                    format!(
                        "{except} must be strictly within ipBlock.cidr {}",
                        block.cidr
                    ),
                );
            }
        }
    }
    Ok(())
}

fn validate_policy_port(field: &str, p: &NetworkPolicyPort) -> Check {
    check_protocol(&format!("{field}.protocol"), p.protocol.as_deref())?;
    match &p.port {
        // A quoted number is a string, which NetworkPolicy (unlike a Service's targetPort)
        // reads as a port *name* that no container can have: refuse it, as the API server does,
        // instead of storing a rule that silently matches nothing.
        Some(IntOrString::String(name)) if name.parse::<i64>().is_ok() => {
            return fail(
                format!("{field}.port"),
                format!("{name:?} is a quoted number: write the port number without quotes"),
            );
        }
        Some(port) => check_int_or_name_port(&format!("{field}.port"), port)?,
        None => {}
    }
    if let Some(end) = p.end_port {
        let Some(IntOrString::Int(start)) = p.port else {
            return fail(
                format!("{field}.endPort"),
                "may only be set together with a numeric port",
            );
        };
        if end < start || end > 65535 {
            return fail(
                format!("{field}.endPort"),
                format!("must be between port ({start}) and 65535, got {end}"),
            );
        }
    }
    Ok(())
}

fn validate_network_policy(np: &NetworkPolicy) -> Check {
    let Some(spec) = &np.spec else {
        return fail("spec", "required");
    };
    if let Some(sel) = &spec.pod_selector {
        check_selector("spec.podSelector", sel)?;
    }
    let mut seen = BTreeSet::new();
    for (i, t) in spec.policy_types.iter().flatten().enumerate() {
        let f = format!("spec.policyTypes[{i}]");
        if !matches!(t.as_str(), "Ingress" | "Egress") {
            return fail(f, format!("unsupported value {t:?}: use Ingress or Egress"));
        }
        if !seen.insert(t.clone()) {
            return fail(f, format!("duplicate policy type {t:?}"));
        }
    }
    for (i, rule) in spec.ingress.iter().flatten().enumerate() {
        for (j, peer) in rule.from.iter().flatten().enumerate() {
            validate_peer(&format!("spec.ingress[{i}].from[{j}]"), peer)?;
        }
        for (j, port) in rule.ports.iter().flatten().enumerate() {
            validate_policy_port(&format!("spec.ingress[{i}].ports[{j}]"), port)?;
        }
    }
    for (i, rule) in spec.egress.iter().flatten().enumerate() {
        for (j, peer) in rule.to.iter().flatten().enumerate() {
            validate_peer(&format!("spec.egress[{i}].to[{j}]"), peer)?;
        }
        for (j, port) in rule.ports.iter().flatten().enumerate() {
            validate_policy_port(&format!("spec.egress[{i}].ports[{j}]"), port)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names() {
        assert!(is_dns1123_label("a-1"));
        assert!(!is_dns1123_label("-a"));
        assert!(!is_dns1123_label("A"));
        assert!(!is_dns1123_label(&"a".repeat(64)));
        assert!(is_dns1123_subdomain("a.b-c.d"));
        assert!(!is_dns1123_subdomain("a..b"));
        assert!(is_dns1035_label("web"));
        assert!(!is_dns1035_label("1web"));
    }

    #[test]
    fn label_keys_and_values() {
        assert!(is_label_key("app"));
        assert!(is_label_key("kubernetes.io/metadata.name"));
        assert!(!is_label_key("bad/key/x"));
        assert!(!is_label_key("-x"));
        assert!(is_label_value(""));
        assert!(is_label_value("v1.2_3"));
        assert!(!is_label_value("has space"));
    }

    #[test]
    fn iana_names() {
        assert!(is_iana_svc_name("http"));
        assert!(is_iana_svc_name("dns-tcp"));
        assert!(!is_iana_svc_name("123"));
        assert!(!is_iana_svc_name("a--b"));
        assert!(!is_iana_svc_name("way-too-long-port-name"));
    }
}
