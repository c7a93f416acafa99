//! Flow records. Field names follow Hubble's `flow.Flow` JSON (protojson names) wherever the
//! field exists there, so tooling built for `hubble observe -o json` can read them; what
//! Hubble lacks lives under `ferrum`.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::directory::Directory;
use crate::time::rfc3339;

/// One datapath event, decoded (the agent converts from the kernel's record).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    /// Wall-clock time of the event, nanoseconds since the Unix epoch.
    pub time_ns: u64,
    pub drop: bool,
    /// The datapath's reason code (drop reason below 64, observation point from 64).
    pub reason_code: u8,
    /// Its stable name, e.g. `SPOOFED_IP` or `TO_ENDPOINT`.
    pub reason: String,
    pub ifindex: u32,
    pub proto: u8,
    pub src: Ipv4Addr,
    pub sport: u16,
    pub dst: Ipv4Addr,
    pub dport: u16,
    pub tcp_flags: u8,
    pub icmp_type: u8,
    pub is_reply: bool,
    pub tunnel_endpoint: Option<Ipv4Addr>,
    /// The translated address and port of SNAT / reverse SNAT.
    pub nat: Option<(Ipv4Addr, u16)>,
    pub rule_id: u32,
    pub service_id: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Verdict {
    Forwarded,
    Dropped,
    Translated,
    Error,
    Audit,
    Redirected,
    Traced,
}

impl Verdict {
    pub const ALL: [Verdict; 7] = [
        Verdict::Forwarded,
        Verdict::Dropped,
        Verdict::Translated,
        Verdict::Error,
        Verdict::Audit,
        Verdict::Redirected,
        Verdict::Traced,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Verdict::Forwarded => "FORWARDED",
            Verdict::Dropped => "DROPPED",
            Verdict::Translated => "TRANSLATED",
            Verdict::Error => "ERROR",
            Verdict::Audit => "AUDIT",
            Verdict::Redirected => "REDIRECTED",
            Verdict::Traced => "TRACED",
        }
    }

    pub fn parse(s: &str) -> Option<Verdict> {
        Verdict::ALL
            .into_iter()
            .find(|v| v.as_str().eq_ignore_ascii_case(s))
    }
}

/// Hubble's `flow.Endpoint`, plus the node the endpoint runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    #[serde(rename = "ID", default, skip_serializing_if = "is_zero")]
    pub id: u32,
    #[serde(default)]
    pub identity: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// `k8s:key=value` for pod labels, `reserved:world` and the like for non-pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node_name: String,
}

impl Endpoint {
    /// `namespace/pod`, or "" for non-pod endpoints.
    pub fn pod_ref(&self) -> String {
        if self.pod_name.is_empty() {
            String::new()
        } else {
            format!("{}/{}", self.namespace, self.pod_name)
        }
    }

    /// The value of pod label `key` (labels are stored as `k8s:key=value`).
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find_map(|l| {
            let (k, v) = l.strip_prefix("k8s:")?.split_once('=')?;
            (k == key).then_some(v)
        })
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ip {
    pub source: String,
    pub destination: String,
    #[serde(rename = "ipVersion")]
    pub ip_version: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub struct TcpFlags {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fin: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub syn: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rst: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub psh: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ack: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub urg: bool,
}

impl TcpFlags {
    pub fn from_byte(b: u8) -> TcpFlags {
        TcpFlags {
            fin: b & 0x01 != 0,
            syn: b & 0x02 != 0,
            rst: b & 0x04 != 0,
            psh: b & 0x08 != 0,
            ack: b & 0x10 != 0,
            urg: b & 0x20 != 0,
        }
    }

    /// `SYN, ACK` as in Hubble's summaries.
    pub fn names(&self) -> String {
        [
            (self.syn, "SYN"),
            (self.fin, "FIN"),
            (self.rst, "RST"),
            (self.psh, "PSH"),
            (self.ack, "ACK"),
            (self.urg, "URG"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join(", ")
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ports {
    pub source_port: u16,
    pub destination_port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<TcpFlags>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Icmp {
    #[serde(rename = "type")]
    pub type_: u32,
    pub code: u32,
}

/// Hubble's `flow.Layer4`: exactly one member is set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer4 {
    #[serde(rename = "TCP", default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<Ports>,
    #[serde(rename = "UDP", default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<Ports>,
    #[serde(rename = "ICMPv4", default, skip_serializing_if = "Option::is_none")]
    pub icmpv4: Option<Icmp>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventType {
    #[serde(rename = "type")]
    pub type_: u32,
    #[serde(default)]
    pub sub_type: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRef {
    pub name: String,
    pub namespace: String,
}

/// Hubble's `flow.Policy`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRef {
    pub name: String,
    pub namespace: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
}

/// What Hubble has no field for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FerrumExtra {
    /// Datapath reason name (drop reason or observation point).
    pub reason: String,
    #[serde(default)]
    pub ifindex: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_endpoint: Option<String>,
    /// SNAT: the node address:port the flow left with; reverse SNAT: the pod's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub translated_to: Option<String>,
    /// The policy rule that decided (0: none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rule_id: u32,
    /// Datapath id of the Service the packet went through (0: none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub service_id: u32,
}

/// One flow record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    pub time: String,
    pub verdict: Verdict,
    /// Deprecated numeric reason in Hubble; Ferrum's datapath drop code.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub drop_reason: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_reason_desc: Option<String>,
    #[serde(rename = "IP")]
    pub ip: Ip,
    #[serde(default)]
    pub l4: Layer4,
    pub source: Endpoint,
    pub destination: Endpoint,
    #[serde(rename = "Type")]
    pub type_: String,
    pub node_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_reply: Option<bool>,
    pub event_type: EventType,
    pub traffic_direction: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_observation_point: Option<String>,
    /// The Service a reply comes from: its source is a frontend (the datapath translated it
    /// back from the backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_service: Option<ServiceRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_service: Option<ServiceRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_allowed_by: Vec<PolicyRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress_allowed_by: Vec<PolicyRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_denied_by: Vec<PolicyRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress_denied_by: Vec<PolicyRef>,
    #[serde(rename = "Summary")]
    pub summary: String,
    pub ferrum: FerrumExtra,
}

/// Cilium monitor message types, as Hubble's `event_type.type`.
pub const EVENT_TYPE_DROP: u32 = 1;
pub const EVENT_TYPE_TRACE: u32 = 4;

impl Flow {
    pub fn protocol(&self) -> &'static str {
        if self.l4.tcp.is_some() {
            "TCP"
        } else if self.l4.udp.is_some() {
            "UDP"
        } else if self.l4.icmpv4.is_some() {
            "ICMPv4"
        } else {
            "IP"
        }
    }

    /// Source and destination ports (0 when the protocol has none).
    pub fn ports(&self) -> (u16, u16) {
        match self.l4.tcp.as_ref().or(self.l4.udp.as_ref()) {
            Some(p) => (p.source_port, p.destination_port),
            None => (0, 0),
        }
    }

    /// `drop` or `trace` (Hubble's --type names).
    pub fn event_kind(&self) -> &'static str {
        if self.event_type.type_ == EVENT_TYPE_DROP {
            "drop"
        } else {
            "trace"
        }
    }
}

/// Hubble's trace observation point for a Ferrum observation point.
fn observation_point(reason: &str) -> &'static str {
    match reason {
        "TO_ENDPOINT" => "TO_ENDPOINT",
        "TO_OVERLAY" => "TO_OVERLAY",
        "TO_STACK" => "TO_STACK",
        "FROM_OVERLAY" => "FROM_OVERLAY",
        "SNAT" => "TO_NETWORK",
        "REV_SNAT" => "FROM_NETWORK",
        _ => "UNKNOWN_POINT",
    }
}

/// Builds the record of `ev` observed on `node_name`, resolving both ends through `dir`.
pub fn build_flow(ev: &FlowEvent, dir: &Directory, node_name: &str) -> Flow {
    // Frames that are not IPv4 (IPv6 from a pod, say) carry no addresses.
    let not_ip = ev.proto == 0 && ev.src.is_unspecified() && ev.dst.is_unspecified();
    let (source, destination) = if not_ip {
        (Endpoint::default(), Endpoint::default())
    } else {
        (
            dir.endpoint(ev.src, node_name),
            dir.endpoint(ev.dst, node_name),
        )
    };
    let service = (ev.service_id != 0)
        .then(|| dir.service(ev.service_id))
        .flatten();
    let source_service = match ev.proto {
        6 | 17 => dir.service_at(ev.src, ev.sport, ev.proto),
        _ => None,
    };
    let policy = (ev.rule_id != 0).then(|| dir.policy(ev.rule_id)).flatten();
    let translated = !ev.drop && (ev.nat.is_some() || service.is_some());
    let verdict = if ev.drop {
        Verdict::Dropped
    } else if translated {
        Verdict::Translated
    } else {
        Verdict::Forwarded
    };
    let flags = TcpFlags::from_byte(ev.tcp_flags);
    let ports = Ports {
        source_port: ev.sport,
        destination_port: ev.dport,
        flags: None,
    };
    let l4 = match ev.proto {
        6 => Layer4 {
            tcp: Some(Ports {
                flags: Some(flags.clone()),
                ..ports
            }),
            ..Layer4::default()
        },
        17 => Layer4 {
            udp: Some(ports),
            ..Layer4::default()
        },
        1 => Layer4 {
            icmpv4: Some(Icmp {
                type_: u32::from(ev.icmp_type),
                code: 0,
            }),
            ..Layer4::default()
        },
        _ => Layer4::default(),
    };
    // A SYN-ACK answers a SYN; a plain SYN starts a connection; otherwise only the datapath
    // knows (reverse NAT).
    let is_reply = if ev.is_reply || (flags.syn && flags.ack) {
        Some(true)
    } else if ev.proto == 6 && flags.syn {
        Some(false)
    } else {
        None
    };
    let ingress = match ev.reason.as_str() {
        "TO_ENDPOINT" | "FROM_OVERLAY" | "REV_SNAT" | "POLICY_DENIED_INGRESS" => true,
        "TO_OVERLAY" | "TO_STACK" | "SNAT" | "POLICY_DENIED_EGRESS" => false,
        // Drops: the sending side when the source is one of this node's pods.
        _ => source.node_name != node_name || source.pod_name.is_empty(),
    };
    let summary = match ev.proto {
        6 => format!("TCP Flags: {}", flags.names()),
        17 => "UDP".to_string(),
        1 => format!("ICMPv4 type {}", ev.icmp_type),
        0 if not_ip => "non-IPv4 frame".to_string(),
        p => format!("IP protocol {p}"),
    };
    let (mut egress_allowed_by, mut ingress_allowed_by) = (Vec::new(), Vec::new());
    let (mut egress_denied_by, mut ingress_denied_by) = (Vec::new(), Vec::new());
    if let Some(p) = policy {
        match (ev.drop, ingress) {
            (false, false) => egress_allowed_by.push(p),
            (false, true) => ingress_allowed_by.push(p),
            (true, false) => egress_denied_by.push(p),
            (true, true) => ingress_denied_by.push(p),
        }
    }
    let time = rfc3339(ev.time_ns);
    Flow {
        time,
        verdict,
        drop_reason: if ev.drop {
            u32::from(ev.reason_code)
        } else {
            0
        },
        drop_reason_desc: ev.drop.then(|| ev.reason.clone()),
        ip: if not_ip {
            Ip {
                ip_version: "IP_NOT_USED".into(),
                ..Ip::default()
            }
        } else {
            Ip {
                source: ev.src.to_string(),
                destination: ev.dst.to_string(),
                ip_version: "IPv4".into(),
            }
        },
        l4,
        source,
        destination,
        type_: "L3_L4".into(),
        node_name: node_name.to_string(),
        is_reply,
        event_type: EventType {
            type_: if ev.drop {
                EVENT_TYPE_DROP
            } else {
                EVENT_TYPE_TRACE
            },
            sub_type: if ev.drop {
                u32::from(ev.reason_code)
            } else {
                u32::from(ev.reason_code.saturating_sub(63))
            },
        },
        traffic_direction: if ingress { "INGRESS" } else { "EGRESS" }.into(),
        trace_observation_point: (!ev.drop).then(|| observation_point(&ev.reason).to_string()),
        source_service,
        destination_service: service,
        egress_allowed_by,
        ingress_allowed_by,
        egress_denied_by,
        ingress_denied_by,
        summary,
        ferrum: FerrumExtra {
            reason: ev.reason.clone(),
            ifindex: ev.ifindex,
            tunnel_endpoint: ev.tunnel_endpoint.map(|t| t.to_string()),
            translated_to: ev.nat.map(|(a, p)| format!("{a}:{p}")),
            rule_id: ev.rule_id,
            service_id: ev.service_id,
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn event(reason: &str, drop: bool) -> FlowEvent {
        FlowEvent {
            time_ns: 1_795_978_155_000_000_000,
            drop,
            reason_code: if drop { 4 } else { 64 },
            reason: reason.into(),
            ifindex: 7,
            proto: 6,
            src: "10.244.0.5".parse().unwrap(),
            sport: 40000,
            dst: "10.244.1.6".parse().unwrap(),
            dport: 80,
            tcp_flags: 0x02,
            icmp_type: 0,
            is_reply: false,
            tunnel_endpoint: None,
            nat: None,
            rule_id: 0,
            service_id: 0,
        }
    }

    #[test]
    fn forwarded_tcp_syn_uses_hubble_field_names() {
        let dir = crate::directory::tests::directory();
        let f = build_flow(&event("TO_ENDPOINT", false), &dir, "node-1");
        let j = serde_json::to_value(&f).unwrap();
        assert_eq!(j["verdict"], "FORWARDED");
        assert_eq!(j["time"], "2026-11-29T18:49:15.000000000Z");
        assert_eq!(j["IP"]["source"], "10.244.0.5");
        assert_eq!(j["IP"]["ipVersion"], "IPv4");
        assert_eq!(j["l4"]["TCP"]["destination_port"], 80);
        assert_eq!(j["l4"]["TCP"]["flags"]["SYN"], true);
        assert!(j["l4"]["TCP"]["flags"].get("ACK").is_none());
        assert_eq!(j["source"]["pod_name"], "a");
        assert_eq!(j["source"]["namespace"], "default");
        assert_eq!(j["source"]["node_name"], "node-1");
        assert!(
            j["source"]["labels"]
                .as_array()
                .unwrap()
                .contains(&"k8s:app=web".into())
        );
        assert_eq!(j["destination"]["pod_name"], "b");
        assert_eq!(j["Type"], "L3_L4");
        assert_eq!(j["is_reply"], false);
        assert_eq!(j["event_type"]["type"], 4);
        assert_eq!(j["traffic_direction"], "INGRESS");
        assert_eq!(j["trace_observation_point"], "TO_ENDPOINT");
        assert_eq!(j["Summary"], "TCP Flags: SYN");
        assert!(j.get("drop_reason_desc").is_none());
        // Round trip: the CLI reads what the agent writes.
        let back: Flow = serde_json::from_value(j).unwrap();
        assert_eq!(back, f);
    }

    #[test]
    fn drops_carry_code_and_text_and_direction_of_the_sender() {
        let dir = crate::directory::tests::directory();
        let f = build_flow(&event("UNKNOWN_ENDPOINT", true), &dir, "node-1");
        assert_eq!(f.verdict, Verdict::Dropped);
        assert_eq!(f.drop_reason, 4);
        assert_eq!(f.drop_reason_desc.as_deref(), Some("UNKNOWN_ENDPOINT"));
        assert_eq!(f.event_type.type_, EVENT_TYPE_DROP);
        assert_eq!(f.traffic_direction, "EGRESS", "sender a is on node-1");
        assert_eq!(f.trace_observation_point, None);
        assert_eq!(f.event_kind(), "drop");
    }

    #[test]
    fn translated_traffic_and_replies() {
        let dir = crate::directory::tests::directory();
        let mut ev = event("SNAT", false);
        ev.dst = "203.0.113.10".parse().unwrap();
        ev.nat = Some(("10.224.0.4".parse().unwrap(), 61000));
        let f = build_flow(&ev, &dir, "node-1");
        assert_eq!(f.verdict, Verdict::Translated);
        assert_eq!(f.ferrum.translated_to.as_deref(), Some("10.224.0.4:61000"));
        assert_eq!(f.destination.labels, vec!["reserved:world".to_string()]);
        assert_eq!(f.destination.identity, crate::directory::IDENTITY_WORLD);
        assert_eq!(f.trace_observation_point.as_deref(), Some("TO_NETWORK"));

        let mut reply = event("REV_SNAT", false);
        reply.is_reply = true;
        reply.tcp_flags = 0x12;
        let f = build_flow(&reply, &dir, "node-1");
        assert_eq!(f.is_reply, Some(true));
        assert_eq!(f.summary, "TCP Flags: SYN, ACK");

        let mut ack = event("TO_ENDPOINT", false);
        ack.tcp_flags = 0x10;
        assert_eq!(build_flow(&ack, &dir, "node-1").is_reply, None);
    }

    #[test]
    fn service_and_policy_hooks_fill_hubble_fields() {
        let mut dir = crate::directory::tests::directory();
        dir.set_service_id(
            3,
            ServiceRef {
                name: "web".into(),
                namespace: "default".into(),
            },
        );
        dir.set_policy_rule(
            9,
            PolicyRef {
                name: "deny-b".into(),
                namespace: "default".into(),
                ..PolicyRef::default()
            },
        );
        let mut ev = event("TO_ENDPOINT", false);
        ev.service_id = 3;
        let f = build_flow(&ev, &dir, "node-1");
        assert_eq!(f.verdict, Verdict::Translated);
        assert_eq!(f.destination_service.unwrap().name, "web");

        let mut ev = event("POLICY_DENIED", true);
        ev.rule_id = 9;
        ev.src = "10.244.1.6".parse().unwrap();
        ev.dst = "10.244.0.5".parse().unwrap();
        let f = build_flow(&ev, &dir, "node-1");
        assert_eq!(f.ingress_denied_by[0].name, "deny-b");
        assert_eq!(f.ferrum.rule_id, 9);
        // Unknown ids leave the fields empty rather than guessing.
        ev.rule_id = 10;
        assert!(build_flow(&ev, &dir, "node-1").ingress_denied_by.is_empty());
    }

    #[test]
    fn replies_from_a_frontend_name_their_service() {
        let mut dir = crate::directory::tests::directory();
        let web = ServiceRef {
            name: "web".into(),
            namespace: "default".into(),
        };
        dir.replace_service_frontends([crate::ServiceFrontend {
            id: 3,
            addr: "10.0.0.20".parse().unwrap(),
            port: 80,
            proto: 6,
            service: web.clone(),
        }]);
        let mut reply = event("TO_ENDPOINT", false);
        reply.src = "10.0.0.20".parse().unwrap();
        reply.sport = 80;
        reply.is_reply = true;
        let f = build_flow(&reply, &dir, "node-1");
        assert_eq!(f.source_service, Some(web.clone()));
        assert_eq!(f.destination_service, None);
        let j = serde_json::to_value(&f).unwrap();
        assert_eq!(j["source_service"]["name"], "web");
        // Another port, or UDP on the same port, is not that frontend.
        reply.sport = 81;
        assert_eq!(build_flow(&reply, &dir, "node-1").source_service, None);
        reply.sport = 80;
        reply.proto = 17;
        assert_eq!(build_flow(&reply, &dir, "node-1").source_service, None);
        // The request's id resolves too, and a replaced set forgets what went.
        let mut request = event("TO_ENDPOINT", false);
        request.service_id = 3;
        assert_eq!(
            build_flow(&request, &dir, "node-1").destination_service,
            Some(web)
        );
        dir.replace_service_frontends([]);
        assert_eq!(
            build_flow(&request, &dir, "node-1").destination_service,
            None
        );
    }

    #[test]
    fn udp_and_icmp_layer4() {
        let dir = Directory::default();
        let mut ev = event("TO_OVERLAY", false);
        ev.proto = 17;
        let j = serde_json::to_value(build_flow(&ev, &dir, "n")).unwrap();
        assert_eq!(j["l4"]["UDP"]["source_port"], 40000);
        assert!(j["l4"].get("TCP").is_none());
        ev.proto = 1;
        ev.icmp_type = 3;
        let f = build_flow(&ev, &dir, "n");
        assert_eq!(f.l4.icmpv4.as_ref().unwrap().type_, 3);
        assert_eq!(f.protocol(), "ICMPv4");
        assert_eq!(f.summary, "ICMPv4 type 3");
        // A non-IPv4 frame has no addresses to resolve.
        ev.proto = 0;
        ev.src = Ipv4Addr::UNSPECIFIED;
        ev.dst = Ipv4Addr::UNSPECIFIED;
        let f = build_flow(&ev, &dir, "n");
        assert_eq!(f.ip.ip_version, "IP_NOT_USED");
        assert!(f.source.labels.is_empty());
        assert_eq!(f.summary, "non-IPv4 frame");
    }
}
