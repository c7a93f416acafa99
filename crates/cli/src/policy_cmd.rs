//! `ferrum policy trace`: why a connection is allowed or denied, from the lab's objects compiled
//! by the same compiler whose state the datapath's maps come from.

use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use ferrum_lab::client::LabClient;
use ferrum_lab::profile::LabPaths;
use ferrum_model::{Kind, Object};
use ferrum_policy::{IdentityAllocator, Inputs, PolicyState, Proto};

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Print the verdict for a connection's first packet and the policy and rule that decided.
    Trace(TraceArgs),
}

#[derive(Args, Debug)]
pub struct TraceArgs {
    /// Source: NAMESPACE/POD or an IPv4 address.
    #[arg(long)]
    from: String,
    /// Destination: NAMESPACE/POD or an IPv4 address.
    #[arg(long)]
    to: String,
    /// Destination port.
    #[arg(long)]
    port: u16,
    /// tcp, udp or sctp.
    #[arg(long, default_value = "tcp")]
    protocol: String,
    /// Output format: text (default) or json.
    #[arg(short = 'o', long = "output", default_value = "text")]
    output: String,
}

pub fn run(name: &str, command: PolicyCommand) -> Result<i32> {
    match command {
        PolicyCommand::Trace(args) => trace(name, args),
    }
}

fn trace(name: &str, args: TraceArgs) -> Result<i32> {
    let proto = Proto::parse(&args.protocol).with_context(|| {
        format!(
            "--protocol {:?} is not supported: use tcp, udp or sctp",
            args.protocol
        )
    })?;
    if !matches!(args.output.as_str(), "text" | "json") {
        bail!("-o {:?} is not supported: use text or json", args.output);
    }
    let paths = LabPaths::new(name)?;
    let client = LabClient::new(paths.cp_socket().as_path());
    let list = |kind| {
        client
            .list(kind, None)
            .with_context(|| format!("listing {} in lab {name:?}", kind.plural()))
    };
    let (mut namespaces, mut pods, mut policies, mut nodes) = (vec![], vec![], vec![], vec![]);
    for kind in [Kind::Namespace, Kind::Pod, Kind::NetworkPolicy, Kind::Node] {
        for o in list(kind)? {
            match o {
                Object::Namespace(n) => namespaces.push(n),
                Object::Pod(p) => pods.push(p),
                Object::NetworkPolicy(p) => policies.push(p),
                Object::Node(n) => nodes.push(n),
                _ => {}
            }
        }
    }
    let state = PolicyState::compile(
        Inputs {
            namespaces: &namespaces,
            pods: &pods,
            policies: &policies,
            nodes: &nodes,
        },
        &mut IdentityAllocator::new(),
    );
    let resolve = |flag: &str, s: &str| -> Result<Ipv4Addr> {
        if let Ok(ip) = s.parse() {
            return Ok(ip);
        }
        let Some((ns, pod)) = s.split_once('/') else {
            bail!("--{flag} {s:?}: use NAMESPACE/POD or an IPv4 address");
        };
        state
            .endpoint_by_name(ns, pod)
            .map(|e| e.ip)
            .with_context(|| format!("--{flag}: pod {ns}/{pod} not found or has no IP yet"))
    };
    let src = resolve("from", &args.from)?;
    let dst = resolve("to", &args.to)?;
    let t = state.trace(src, dst, proto.number(), args.port);
    for r in &state.rejected {
        eprintln!("warning: left out: {r}");
    }
    if args.output == "json" {
        println!("{}", serde_json::to_string_pretty(&t)?);
    } else {
        print!("{}", t.text);
    }
    Ok(if t.allowed { 0 } else { 1 })
}
