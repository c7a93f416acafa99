//! `ferrum service trace`: compiles the cluster's Services for each node (the same compiler
//! the agents run) and shows what happens to a flow: the frontend it hits, the candidate
//! backends, and whether the source is masqueraded or refused.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use ferrum_lb::trace::{TraceSource, trace};
use ferrum_lb::{Algorithm, Cluster, Compiled, Protocol};
use ferrum_model::{Kind, Object};

use crate::objects_cmd::client;

#[derive(Subcommand)]
pub enum ServiceCommand {
    /// Show the candidate backends of a flow to a Service, and whether its source is
    /// masqueraded, from the compiled load-balancer state.
    Trace(TraceArgs),
}

#[derive(Args, Debug, Clone)]
pub struct TraceArgs {
    /// The client: NS/POD, a pod IP, or any other IP (a client outside the cluster).
    #[arg(long)]
    pub from: String,
    /// The destination: VIP:PORT (clusterIP, node IP with a nodePort, LoadBalancer or
    /// external IP).
    #[arg(long)]
    pub to: String,
    /// tcp or udp.
    #[arg(long, default_value = "tcp")]
    pub protocol: String,
    /// The cluster's default algorithm, as the lab was started with (--lb-algorithm).
    #[arg(long, default_value = "random")]
    pub lb_algorithm: String,
}

pub fn run(lab_name: &str, command: ServiceCommand) -> Result<()> {
    match command {
        ServiceCommand::Trace(a) => trace_cmd(lab_name, &a),
    }
}

/// "ready/all" endpoint addresses of each Service's slices, in `services` order.
pub fn backend_counts(services: &[Object], slices: &[Object]) -> Vec<String> {
    let mut counts: BTreeMap<(String, String), (BTreeSet<String>, BTreeSet<String>)> =
        BTreeMap::new();
    for o in slices {
        let Object::EndpointSlice(s) = o else {
            continue;
        };
        let Some(svc) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(ferrum_lb::SERVICE_NAME_LABEL))
        else {
            continue;
        };
        let ns = s.metadata.namespace.clone().unwrap_or_default();
        let entry = counts.entry((ns, svc.clone())).or_default();
        for e in &s.endpoints {
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            for a in &e.addresses {
                entry.1.insert(a.clone());
                if ready {
                    entry.0.insert(a.clone());
                }
            }
        }
    }
    services
        .iter()
        .map(|o| {
            let key = o.namespaced_name();
            match counts.get(&key) {
                Some((ready, all)) => format!("{}/{}", ready.len(), all.len()),
                None => "<none>".into(),
            }
        })
        .collect()
}

fn parse_to(to: &str) -> Result<(Ipv4Addr, u16)> {
    let (ip, port) = to
        .rsplit_once(':')
        .with_context(|| format!("--to {to:?}: use VIP:PORT, e.g. 10.0.0.1:80"))?;
    Ok((
        ip.parse()
            .with_context(|| format!("--to {to:?}: {ip:?} is not an IPv4 address"))?,
        port.parse()
            .with_context(|| format!("--to {to:?}: {port:?} is not a port number"))?,
    ))
}

fn node_ip(o: &Object) -> Option<Ipv4Addr> {
    let Object::Node(n) = o else { return None };
    n.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse().ok())
}

fn trace_cmd(lab_name: &str, args: &TraceArgs) -> Result<()> {
    let proto = match args.protocol.to_ascii_lowercase().as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        other => bail!("--protocol {other:?}: use tcp or udp"),
    };
    let default_algorithm = Algorithm::parse(&args.lb_algorithm).with_context(|| {
        format!(
            "--lb-algorithm {:?}: use random or maglev",
            args.lb_algorithm
        )
    })?;
    let (to_ip, to_port) = parse_to(&args.to)?;
    let c = client(lab_name)?;
    let list = |k: Kind| {
        c.list(k, None)
            .with_context(|| format!("listing {}", k.plural()))
    };
    let (pods, services, slices, nodes) = (
        list(Kind::Pod)?,
        list(Kind::Service)?,
        list(Kind::EndpointSlice)?,
        list(Kind::Node)?,
    );
    let pod_by_ip: BTreeMap<Ipv4Addr, (String, String)> = pods
        .iter()
        .filter_map(|o| match o {
            Object::Pod(p) => Some((
                p.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?,
                (
                    format!("{}/{}", o.namespace().unwrap_or("default"), o.name()),
                    p.spec.as_ref()?.node_name.clone()?,
                ),
            )),
            _ => None,
        })
        .collect();
    let source = if let Some((ns, pod)) = args.from.split_once('/') {
        let (ip, (_, node)) = pod_by_ip
            .iter()
            .find(|(_, (name, _))| *name == format!("{ns}/{pod}"))
            .with_context(|| format!("--from {}: no such pod with an IP", args.from))?;
        TraceSource::Pod {
            ip: *ip,
            node: node.clone(),
        }
    } else {
        let ip: Ipv4Addr = args
            .from
            .parse()
            .with_context(|| format!("--from {:?}: use NS/POD or an IPv4 address", args.from))?;
        match pod_by_ip.get(&ip) {
            Some((_, node)) => TraceSource::Pod {
                ip,
                node: node.clone(),
            },
            None => TraceSource::External { ip },
        }
    };
    let node_ips: Vec<Ipv4Addr> = nodes.iter().filter_map(node_ip).collect();
    let svc_refs: Vec<_> = services
        .iter()
        .filter_map(|o| match o {
            Object::Service(s) => Some(s),
            _ => None,
        })
        .collect();
    let slice_refs: Vec<_> = slices
        .iter()
        .filter_map(|o| match o {
            Object::EndpointSlice(s) => Some(s),
            _ => None,
        })
        .collect();
    let by_node: BTreeMap<String, Compiled> = nodes
        .iter()
        .map(|n| {
            let compiled = ferrum_lb::compile(&Cluster {
                services: svc_refs.clone(),
                slices: slice_refs.clone(),
                node_name: n.name().to_string(),
                node_ip: node_ip(n),
                node_ips: node_ips.clone(),
                default_algorithm,
            });
            (n.name().to_string(), compiled)
        })
        .collect();
    let hops = trace(&by_node, &source, to_ip, to_port, proto);
    let src_text = match &source {
        TraceSource::Pod { ip, node } => {
            let name = pod_by_ip.get(ip).map(|p| p.0.clone()).unwrap_or_default();
            format!("pod {name} ({ip}) on {node}")
        }
        TraceSource::External { ip } => format!("{ip} (outside the cluster)"),
    };
    println!("from: {src_text}");
    println!("to:   {to_ip}:{to_port}/{proto}");
    if hops.is_empty() {
        println!(
            "no Service frontend for this source: the packet is routed as it is, untranslated"
        );
        return Ok(());
    }
    for hop in hops {
        let fe = &hop.frontend_info;
        println!();
        println!("node {}: Service {}", hop.node, hop.service);
        println!(
            "  algorithm: {}, session affinity: {}",
            match fe.algorithm {
                Algorithm::Random => "random",
                Algorithm::Maglev => "maglev",
            },
            fe.affinity_timeout
                .map(|t| format!("ClientIP ({t}s)"))
                .unwrap_or_else(|| "none".into())
        );
        if !hop.source_allowed {
            println!("  source: REFUSED (not in loadBalancerSourceRanges)");
            continue;
        }
        let src_ip = match &source {
            TraceSource::Pod { ip, .. } | TraceSource::External { ip } => *ip,
        };
        println!(
            "  source: {}",
            if hop.masquerade {
                "masqueraded to the node IP (externalTrafficPolicy=Cluster)".to_string()
            } else {
                format!("kept ({src_ip})")
            }
        );
        if hop.backends.is_empty() {
            println!("  backends: none: new connections are refused (ICMP port unreachable)");
            continue;
        }
        println!("  candidate backends ({}):", hop.backends.len());
        for b in &hop.backends {
            let pod = pod_by_ip
                .get(&b.addr)
                .map(|(name, node)| format!("pod {name} on {node}"))
                .unwrap_or_else(|| "not a pod".into());
            let hairpin = if b.addr == src_ip {
                "  (hairpin: the pod sees 169.254.42.1 as the source)"
            } else {
                ""
            };
            println!("    {:<21} {pod}{hairpin}", b.to_string());
        }
    }
    Ok(())
}
