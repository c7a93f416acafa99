//! `ferrum observe`: flows from every node's agent (over its observe socket), merged by time.

use std::io::{BufRead, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;

use anyhow::{Context, Result, bail};
use clap::Args;
use ferrum_flow::format;
use ferrum_flow::{Filter, Flow};
use ferrum_lab::network_profile::NetworkProfile;
use ferrum_lab::profile::LabPaths;

#[derive(Args, Debug, Clone)]
pub struct ObserveArgs {
    /// How many of the latest flows to show (after filtering, over all nodes).
    #[arg(long, default_value_t = 20)]
    pub last: usize,
    /// Keep printing flows as they happen.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// compact, json (Hubble's `observe -o json` lines) or table.
    #[arg(short = 'o', long = "output", default_value = "compact")]
    pub output: String,
    /// Only these nodes (default: all).
    #[arg(long)]
    pub node: Vec<String>,
    /// Flows with an end in this namespace.
    #[arg(short = 'n', long)]
    pub namespace: Vec<String>,
    /// Flows from or to this pod (`ns/name` or `name`).
    #[arg(long)]
    pub pod: Vec<String>,
    #[arg(long)]
    pub from_pod: Vec<String>,
    #[arg(long)]
    pub to_pod: Vec<String>,
    /// FORWARDED, DROPPED, TRANSLATED, …
    #[arg(long)]
    pub verdict: Vec<String>,
    /// tcp, udp or icmp.
    #[arg(long)]
    pub protocol: Vec<String>,
    /// Source or destination port.
    #[arg(long)]
    pub port: Vec<String>,
    /// Source or destination address or CIDR.
    #[arg(long)]
    pub ip: Vec<String>,
    /// A pod label on either end: `key=value` or `key`.
    #[arg(long)]
    pub label: Vec<String>,
    /// Destination Service (`ns/name` or `name`).
    #[arg(long)]
    pub service: Vec<String>,
    /// drop, trace, or trace:<point> (e.g. trace:to-endpoint).
    #[arg(long = "type")]
    pub type_: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Output {
    Compact,
    Json,
    Table,
}

impl ObserveArgs {
    fn filter(&self) -> Result<Filter> {
        let mut f = Filter::default();
        for (field, values) in [
            ("namespace", &self.namespace),
            ("pod", &self.pod),
            ("from-pod", &self.from_pod),
            ("to-pod", &self.to_pod),
            ("verdict", &self.verdict),
            ("protocol", &self.protocol),
            ("port", &self.port),
            ("ip", &self.ip),
            ("label", &self.label),
            ("service", &self.service),
            ("type", &self.type_),
        ] {
            for v in values {
                f.add(field, v)?;
            }
        }
        Ok(f)
    }

    fn output(&self) -> Result<Output> {
        Ok(match self.output.as_str() {
            "compact" => Output::Compact,
            "json" | "jsonpb" => Output::Json,
            "table" => Output::Table,
            other => bail!("-o {other:?}: use compact, json or table"),
        })
    }
}

fn print(out: &mut impl Write, flows: &[Flow], output: Output) -> std::io::Result<()> {
    match output {
        Output::Compact => {
            for f in flows {
                writeln!(out, "{}", format::compact(f))?;
            }
        }
        Output::Json => {
            for f in flows {
                writeln!(out, "{}", format::json_line(f))?;
            }
        }
        Output::Table => {
            let rows: Vec<_> = flows.iter().map(format::table_row).collect();
            write!(out, "{}", format::table(&rows))?;
        }
    }
    out.flush()
}

pub fn observe(name: &str, args: ObserveArgs) -> Result<()> {
    let paths = LabPaths::new(name)?;
    let profile_file = ferrum_lab::daemon::profile_path(&paths);
    if !profile_file.exists() {
        bail!("lab {name:?} does not exist (create it with `ferrum --name {name} lab up`)");
    }
    let profile = NetworkProfile::load(&profile_file)?;
    let filter = args.filter()?;
    let output = args.output()?;
    let nodes: Vec<String> = profile
        .node_names()
        .into_iter()
        .filter(|n| args.node.is_empty() || args.node.contains(n))
        .collect();
    if nodes.is_empty() {
        bail!("--node {:?}: no such node in lab {name:?}", args.node);
    }
    let mut path = format!("/v1/flows?scope=node&number={}", args.last);
    if args.follow {
        path.push_str("&follow=1");
    }
    if !filter.is_empty() {
        path.push('&');
        path.push_str(&filter.to_query());
    }
    let connect = |node: &str| -> Result<UnixStream> {
        let socket = paths.observe_socket(node);
        UnixStream::connect(&socket).with_context(|| {
            format!(
                "node {node}: cannot reach its agent at {} (is the lab up? see `ferrum lab status`)",
                socket.display()
            )
        })
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if !args.follow {
        let mut flows = Vec::new();
        let mut failures = Vec::new();
        for node in &nodes {
            let fetched = connect(node).and_then(|stream| {
                let body = ferrum_flow::client::get(stream, &path)
                    .with_context(|| format!("node {node}: reading flows"))?;
                ferrum_flow::client::parse_flows(&body)
                    .with_context(|| format!("node {node}: decoding flows"))
            });
            match fetched {
                Ok(more) => flows.extend(more),
                // A bad filter is refused the same way by every node: no point going on.
                Err(e) if e.chain().any(|c| c.to_string().contains("400")) => return Err(e),
                Err(e) => failures.push(e),
            }
        }
        if failures.len() == nodes.len() {
            return Err(failures.remove(0));
        }
        // The other nodes' flows are still worth showing; say which node is missing.
        for e in &failures {
            eprintln!("warning: {e:#}");
        }
        flows.sort_by(|a, b| a.time.cmp(&b.time));
        let skip = flows.len().saturating_sub(args.last);
        print(&mut out, &flows[skip..], output)?;
        return Ok(());
    }

    let (tx, rx) = mpsc::channel::<Result<Flow, String>>();
    for node in &nodes {
        let stream = connect(node)?;
        let reader = ferrum_flow::client::request(stream, &path)
            .with_context(|| format!("node {node}: following flows"))?;
        let tx = tx.clone();
        let node = node.clone();
        std::thread::spawn(move || {
            for line in reader.lines() {
                let msg = match line {
                    Ok(l) if l.trim().is_empty() => continue,
                    Ok(l) => serde_json::from_str::<Flow>(&l)
                        .map_err(|e| format!("node {node}: undecodable flow: {e}")),
                    Err(e) => Err(format!("node {node}: connection lost: {e}")),
                };
                let stop = msg.is_err();
                if tx.send(msg).is_err() || stop {
                    return;
                }
            }
            let _ = tx.send(Err(format!("node {node}: the agent closed the stream")));
        });
    }
    drop(tx);
    if output == Output::Table {
        writeln!(out, "{}", format::TABLE_HEADER.join("\t"))?;
    }
    // The first flows of every node arrive together: hold them briefly to merge by time.
    let mut batch = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(300);
    loop {
        let wait = deadline.saturating_duration_since(std::time::Instant::now());
        let msg = if wait.is_zero() && batch.is_empty() {
            match rx.recv() {
                Ok(m) => m,
                Err(_) => return Ok(()),
            }
        } else if wait.is_zero() {
            batch.sort_by(|a: &Flow, b: &Flow| a.time.cmp(&b.time));
            let skip = batch.len().saturating_sub(args.last);
            emit_follow(&mut out, &batch[skip..], output)?;
            batch.clear();
            continue;
        } else {
            match rx.recv_timeout(wait) {
                Ok(m) => m,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            }
        };
        match msg {
            Ok(f) if !wait.is_zero() => batch.push(f),
            Ok(f) => emit_follow(&mut out, std::slice::from_ref(&f), output)?,
            Err(e) => eprintln!("warning: {e}"),
        }
    }
}

fn emit_follow(out: &mut impl Write, flows: &[Flow], output: Output) -> std::io::Result<()> {
    if output == Output::Table {
        for f in flows {
            writeln!(out, "{}", format::table_row(f).join("\t"))?;
        }
        return out.flush();
    }
    print(out, flows, output)
}
