//! Flow filters, shared by `ferrum observe`, the agent and the web page. Different kinds of
//! filter must all match (AND); several values of one kind match if any does (OR). They travel
//! as a URL query string (`namespace=default&verdict=DROPPED&port=80`).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::record::{Endpoint, Flow, Verdict};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("--{field} {value:?}: {why}")]
    Invalid {
        field: &'static str,
        value: String,
        why: String,
    },
    #[error("unknown filter {0:?}")]
    Unknown(String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub namespace: Vec<String>,
    /// `namespace/name` or `name`: either end.
    pub pod: Vec<String>,
    pub from_pod: Vec<String>,
    pub to_pod: Vec<String>,
    pub verdict: Vec<Verdict>,
    /// tcp, udp, icmp (case-insensitive).
    pub protocol: Vec<String>,
    pub port: Vec<u16>,
    pub ip: Vec<Ipv4Net>,
    /// `key=value` or `key`: a pod label on either end.
    pub label: Vec<String>,
    /// `namespace/name` or `name` of the destination Service.
    pub service: Vec<String>,
    /// `drop`, `trace`, or `trace:<observation point>` (e.g. `trace:to-endpoint`).
    pub type_: Vec<String>,
}

const PROTOCOLS: [&str; 3] = ["tcp", "udp", "icmp"];

impl Filter {
    /// Adds one `field=value` (field names as the CLI flags, without dashes or with `-`/`_`).
    pub fn add(&mut self, field: &str, value: &str) -> Result<(), FilterError> {
        let invalid = |field: &'static str, why: &str| FilterError::Invalid {
            field,
            value: value.to_string(),
            why: why.to_string(),
        };
        match field.replace('_', "-").as_str() {
            "namespace" => self.namespace.push(non_empty(value, "namespace")?),
            "pod" => self.pod.push(non_empty(value, "pod")?),
            "from-pod" => self.from_pod.push(non_empty(value, "from-pod")?),
            "to-pod" => self.to_pod.push(non_empty(value, "to-pod")?),
            "verdict" => self.verdict.push(Verdict::parse(value).ok_or_else(|| {
                invalid(
                    "verdict",
                    "expected FORWARDED, DROPPED, TRANSLATED, ERROR, AUDIT, REDIRECTED or TRACED",
                )
            })?),
            "protocol" => {
                let p = value.to_ascii_lowercase();
                let p = if p == "icmpv4" { "icmp".to_string() } else { p };
                if !PROTOCOLS.contains(&p.as_str()) {
                    return Err(invalid("protocol", "expected tcp, udp or icmp"));
                }
                self.protocol.push(p);
            }
            "port" => self.port.push(
                value
                    .parse()
                    .map_err(|_| invalid("port", "expected a number 0-65535"))?,
            ),
            "ip" => self.ip.push(match value.parse::<Ipv4Net>() {
                Ok(net) => net,
                Err(_) => Ipv4Net::from(
                    value
                        .parse::<Ipv4Addr>()
                        .map_err(|_| invalid("ip", "expected an IPv4 address or CIDR"))?,
                ),
            }),
            "label" => self.label.push(non_empty(value, "label")?),
            "service" => self.service.push(non_empty(value, "service")?),
            "type" => {
                let t = value.to_ascii_lowercase();
                let ok = t == "drop" || t == "trace" || t.starts_with("trace:");
                if !ok {
                    return Err(invalid("type", "expected drop, trace or trace:<point>"));
                }
                self.type_.push(t);
            }
            _ => return Err(FilterError::Unknown(field.to_string())),
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        *self == Filter::default()
    }

    pub fn matches(&self, f: &Flow) -> bool {
        let any = |values: &[String], pred: &dyn Fn(&str) -> bool| {
            values.is_empty() || values.iter().any(|v| pred(v))
        };
        let ends = [&f.source, &f.destination];
        any(&self.namespace, &|ns| {
            ends.iter().any(|e| e.namespace == ns)
        }) && any(&self.pod, &|p| ends.iter().any(|e| pod_matches(e, p)))
            && any(&self.from_pod, &|p| pod_matches(&f.source, p))
            && any(&self.to_pod, &|p| pod_matches(&f.destination, p))
            && (self.verdict.is_empty() || self.verdict.contains(&f.verdict))
            && any(&self.protocol, &|p| protocol_of(f) == p)
            && (self.port.is_empty() || {
                let (s, d) = f.ports();
                self.port.iter().any(|p| *p == s || *p == d)
            })
            && (self.ip.is_empty() || {
                let addrs = [&f.ip.source, &f.ip.destination].map(|a| a.parse::<Ipv4Addr>().ok());
                self.ip
                    .iter()
                    .any(|net| addrs.iter().flatten().any(|a| net.contains(a)))
            })
            && any(&self.label, &|l| {
                ends.iter().any(|e| match l.split_once('=') {
                    Some((k, v)) => e.label(k) == Some(v),
                    None => e.label(l).is_some(),
                })
            })
            && any(&self.service, &|s| {
                [&f.source_service, &f.destination_service]
                    .into_iter()
                    .flatten()
                    .any(|svc| match s.split_once('/') {
                        Some((ns, name)) => svc.namespace == ns && svc.name == name,
                        None => svc.name == s,
                    })
            })
            && any(&self.type_, &|t| match t.split_once(':') {
                Some(("trace", point)) => {
                    f.event_kind() == "trace"
                        && f.trace_observation_point
                            .as_deref()
                            .is_some_and(|p| p.replace('_', "-").eq_ignore_ascii_case(point))
                }
                _ => f.event_kind() == t,
            })
    }

    /// `field=value&...`, percent-encoded, in a stable order.
    pub fn to_query(&self) -> String {
        self.pairs()
            .into_iter()
            .map(|(k, v)| format!("{k}={}", encode(&v)))
            .collect::<Vec<_>>()
            .join("&")
    }

    fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let mut put =
            |k: &'static str, vals: Vec<String>| out.extend(vals.into_iter().map(|v| (k, v)));
        put("namespace", self.namespace.clone());
        put("pod", self.pod.clone());
        put("from-pod", self.from_pod.clone());
        put("to-pod", self.to_pod.clone());
        put(
            "verdict",
            self.verdict
                .iter()
                .map(|v| v.as_str().to_string())
                .collect(),
        );
        put("protocol", self.protocol.clone());
        put("port", self.port.iter().map(u16::to_string).collect());
        put("ip", self.ip.iter().map(Ipv4Net::to_string).collect());
        put("label", self.label.clone());
        put("service", self.service.clone());
        put("type", self.type_.clone());
        out
    }

    /// Parses a query string; keys that are not filters are refused (callers strip theirs).
    pub fn parse_query(query: &str) -> Result<Filter, FilterError> {
        let mut f = Filter::default();
        for (k, v) in query_pairs(query) {
            f.add(&k, &v)?;
        }
        Ok(f)
    }
}

fn non_empty(value: &str, field: &'static str) -> Result<String, FilterError> {
    if value.is_empty() {
        return Err(FilterError::Invalid {
            field,
            value: String::new(),
            why: "must not be empty".into(),
        });
    }
    Ok(value.to_string())
}

fn pod_matches(e: &Endpoint, p: &str) -> bool {
    match p.split_once('/') {
        Some((ns, name)) => e.namespace == ns && e.pod_name == name,
        None => !e.pod_name.is_empty() && e.pod_name == p,
    }
}

fn protocol_of(f: &Flow) -> &'static str {
    match f.protocol() {
        "TCP" => "tcp",
        "UDP" => "udp",
        "ICMPv4" => "icmp",
        _ => "other",
    }
}

/// Splits `a=1&b=x%2Fy` into decoded pairs (empty segments skipped; `+` is a space).
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|s| {
            let (k, v) = s.split_once('=').unwrap_or((s, ""));
            (decode(k), decode(v))
        })
        .collect()
}

pub fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::event;
    use crate::record::{ServiceRef, build_flow};

    fn flows() -> Vec<Flow> {
        let dir = crate::directory::tests::directory();
        let fwd = build_flow(&event("TO_ENDPOINT", false), &dir, "node-1");
        let mut drop = event("UNKNOWN_ENDPOINT", true);
        drop.dst = "10.244.0.99".parse().unwrap();
        drop.proto = 17;
        drop.dport = 53;
        let drop = build_flow(&drop, &dir, "node-1");
        let mut svc = fwd.clone();
        svc.destination_service = Some(ServiceRef {
            name: "web".into(),
            namespace: "default".into(),
        });
        vec![fwd, drop, svc]
    }

    fn count(q: &str) -> usize {
        let f = Filter::parse_query(q).unwrap();
        flows().iter().filter(|x| f.matches(x)).count()
    }

    #[test]
    fn the_service_filter_also_selects_replies_from_the_service() {
        let dir = crate::directory::tests::directory();
        let mut reply = build_flow(&event("TO_ENDPOINT", false), &dir, "node-1");
        reply.source_service = Some(ServiceRef {
            name: "web".into(),
            namespace: "default".into(),
        });
        let matches = |q: &str| Filter::parse_query(q).unwrap().matches(&reply);
        assert!(matches("service=default/web"));
        assert!(matches("service=web"));
        assert!(!matches("service=other/web"));
    }

    #[test]
    fn each_filter_kind_selects() {
        assert_eq!(count(""), 3);
        assert_eq!(count("namespace=default"), 3);
        assert_eq!(count("namespace=kube-system"), 0);
        assert_eq!(count("pod=b"), 2);
        assert_eq!(count("pod=default%2Fa"), 3);
        assert_eq!(count("from-pod=a"), 3);
        assert_eq!(count("to-pod=a"), 0);
        assert_eq!(count("to-pod=default/b"), 2);
        assert_eq!(count("verdict=dropped"), 1);
        assert_eq!(count("verdict=DROPPED&verdict=FORWARDED"), 3);
        assert_eq!(count("protocol=UDP"), 1);
        assert_eq!(count("port=53"), 1);
        assert_eq!(count("port=40000"), 3);
        assert_eq!(count("ip=10.244.0.99"), 1);
        assert_eq!(count("ip=10.244.1.0/24"), 2);
        assert_eq!(count("label=app%3Ddb"), 2);
        assert_eq!(count("label=app"), 3);
        assert_eq!(count("label=app=nope"), 0);
        assert_eq!(count("service=web"), 1);
        assert_eq!(count("service=default/web"), 1);
        assert_eq!(count("type=drop"), 1);
        assert_eq!(count("type=trace"), 2);
        assert_eq!(count("type=trace:to-endpoint"), 2);
        assert_eq!(count("type=trace:to-overlay"), 0);
        // AND across kinds.
        assert_eq!(count("verdict=FORWARDED&protocol=udp"), 0);
    }

    #[test]
    fn bad_values_name_the_field() {
        let e = Filter::parse_query("port=http").unwrap_err();
        assert!(e.to_string().contains("--port"), "{e}");
        assert!(matches!(
            Filter::parse_query("verdict=MAYBE"),
            Err(FilterError::Invalid {
                field: "verdict",
                ..
            })
        ));
        assert!(Filter::parse_query("protocol=sctp").is_err());
        assert!(Filter::parse_query("ip=10.0.0.300").is_err());
        assert!(Filter::parse_query("type=l7").is_err());
        assert_eq!(
            Filter::parse_query("colour=red"),
            Err(FilterError::Unknown("colour".into()))
        );
    }

    #[test]
    fn query_round_trip() {
        let f = Filter::parse_query(
            "namespace=a%20b&pod=x%2Fy&verdict=DROPPED&protocol=tcp&port=80&ip=10.0.0.0/8&label=k=v&service=s&type=trace:to-endpoint&from-pod=p&to-pod=q",
        )
        .unwrap();
        assert_eq!(f.namespace, vec!["a b".to_string()]);
        assert_eq!(Filter::parse_query(&f.to_query()).unwrap(), f);
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%zz"), "%zz");
    }
}
