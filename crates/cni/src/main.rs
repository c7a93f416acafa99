//! ferrum-cni: the CNI 1.1 plugin. Thin: it parses the runtime's request, asks the node's
//! ferrum-agent for an address, builds the veth pair and the pod's addressing over netlink, and
//! tells the agent to attach the datapath.
//!
//! Output contract: the Result (ADD) or VERSION answer is the only thing on stdout; failures
//! print the spec's Error object on stdout and exit 1. Logs go to stderr (FERRUM_CNI_LOG sets
//! the filter, default `warn`).

mod agent;
mod pod;

use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;

use ferrum_agent_api::{AttachmentKey, PodRef, Reply, Request, host_ifname};
use ferrum_cni_types::{
    Attachment, CniError, CniResult, Command, Dns, Environment, ErrorCode, Interface, IpConfig,
    LATEST_VERSION, NetConf, Route, requested_version, version_reply,
};
use ferrum_datapath::link::format_mac;
use ferrum_datapath::netns::netns_exists;
use ipnet::{IpNet, Ipv4Net};
use serde_json::Value;

fn main() -> ExitCode {
    init_logging();
    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => run(&stdin),
        Err(e) => Err((
            LATEST_VERSION.to_string(),
            CniError::new(
                ErrorCode::Io,
                format!("cannot read the network config from stdin: {e}"),
            ),
        )),
    };
    let (output, code) = match outcome {
        Ok(Some(value)) => (Some(value), ExitCode::SUCCESS),
        Ok(None) => (None, ExitCode::SUCCESS),
        Err((version, err)) => {
            tracing::error!(code = err.code.code(), details = %err.details, "{}", err.msg);
            (Some(err.to_json(&version)), ExitCode::FAILURE)
        }
    };
    if let Some(value) = output {
        let mut out = std::io::stdout().lock();
        // If stdout is gone there is nobody left to tell; the exit code still speaks.
        let _ = writeln!(out, "{value}");
        let _ = out.flush();
    }
    code
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRUM_CNI_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// Runs one command. Errors carry the cniVersion to answer in.
fn run(stdin: &[u8]) -> Result<Option<Value>, (String, CniError)> {
    let latest = |e| (LATEST_VERSION.to_string(), e);
    let env = Environment::from_vars(|k| std::env::var(k).ok()).map_err(latest)?;
    if env.command == Command::Version {
        let requested = requested_version(stdin).map_err(latest)?;
        return Ok(Some(version_reply(requested.as_deref())));
    }
    let conf = NetConf::parse(stdin).map_err(latest)?;
    let version = conf.cni_version.clone();
    let answer = match env.command {
        Command::Add => cmd_add(&env, &conf).map(|r| Some(to_value(&r))),
        Command::Del => cmd_del(&env, &conf).map(|()| None),
        Command::Check => cmd_check(&env, &conf).map(|()| None),
        Command::Status => cmd_status(&conf).map(|()| None),
        Command::Gc => cmd_gc(&conf).map(|()| None),
        Command::Version => Ok(Some(version_reply(Some(&version)))),
    };
    answer.map_err(|e| (version, e))
}

fn to_value(r: &CniResult) -> Value {
    // Serializing plain data with string keys cannot fail.
    serde_json::to_value(r).unwrap_or(Value::Null)
}

fn attachment(env: &Environment) -> Result<&Attachment, CniError> {
    // Environment::from_vars guarantees an attachment for ADD/DEL/CHECK.
    env.attachment.as_ref().ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidEnv,
            "CNI_CONTAINERID / CNI_IFNAME: not set",
        )
    })
}

fn key_of(a: &Attachment) -> AttachmentKey {
    AttachmentKey {
        container_id: a.container_id.clone(),
        ifname: a.ifname.clone(),
    }
}

fn kernel_error(what: &str, e: anyhow::Error) -> CniError {
    CniError::new(ErrorCode::Other, format!("{what}: {e:#}"))
}

fn existing_netns(a: &Attachment) -> Result<&Path, CniError> {
    let netns = a
        .netns
        .as_deref()
        .ok_or_else(|| CniError::new(ErrorCode::InvalidEnv, "CNI_NETNS: is not set"))?;
    if !netns_exists(netns) {
        return Err(CniError::new(
            ErrorCode::UnknownContainer,
            format!(
                "container network namespace {} does not exist",
                netns.display()
            ),
        )
        .with_details(format!("container {}", a.container_id)));
    }
    Ok(netns)
}

fn cmd_add(env: &Environment, conf: &NetConf) -> Result<CniResult, CniError> {
    let a = attachment(env)?;
    let netns = existing_netns(a)?;
    let key = key_of(a);
    let pod = match (env.arg("K8S_POD_NAMESPACE"), env.arg("K8S_POD_NAME")) {
        (Some(namespace), Some(name)) => Some(PodRef {
            namespace: namespace.to_string(),
            name: name.to_string(),
            uid: env.arg("K8S_POD_UID").unwrap_or_default().to_string(),
        }),
        _ => None,
    };
    let socket = &conf.agent_socket;
    let allocation = match agent::call(
        socket,
        &Request::Allocate {
            key: key.clone(),
            netns: netns.display().to_string(),
            pod,
            network: conf.name.clone(),
        },
    ) {
        Ok(Reply::Allocated(a)) => a,
        Ok(other) => return Err(agent::unexpected(socket, "Allocate", &other).into_cni("ADD")),
        Err(e) => return Err(e.into_cni("allocate a pod address")),
    };
    tracing::info!(container = %key.container_id, ip = %allocation.ip, "address allocated");
    let host = host_ifname(&key);
    let mtu = conf.mtu.unwrap_or(allocation.mtu);

    let attached = (|| -> Result<pod::Built, CniError> {
        let built = pod::build(
            &host,
            &pod::PodSpec {
                netns,
                ifname: &a.ifname,
                ip: allocation.ip,
                gateway: allocation.gateway,
                mtu,
            },
        )
        .map_err(|e| kernel_error("build the pod interface", e))?;
        let request = Request::Attach {
            key: key.clone(),
            host_ifname: built.host.name.clone(),
            host_ifindex: built.host.index,
            host_mac: built.host.mac,
            pod_mac: built.pod.mac,
        };
        match agent::call(socket, &request) {
            Ok(Reply::Done) => Ok(built),
            Ok(other) => Err(agent::unexpected(socket, "Attach", &other).into_cni("ADD")),
            Err(e) => Err(e.into_cni("attach the datapath")),
        }
    })();

    let built = match attached {
        Ok(b) => b,
        Err(err) => {
            // Leave nothing half-created: the veth (and with it the pod end), then the address.
            if let Err(e) = pod::remove(&host) {
                tracing::error!("cleanup after failed ADD: {e:#}");
            }
            if let Err(e) = agent::call(socket, &Request::Release { key: key.clone() }) {
                tracing::error!(
                    "cleanup after failed ADD: release of {}/{} failed: {e:?}",
                    key.container_id,
                    key.ifname
                );
            }
            return Err(err);
        }
    };

    let gateway = std::net::IpAddr::V4(allocation.gateway);
    Ok(CniResult {
        cni_version: conf.cni_version.clone(),
        interfaces: vec![
            Interface {
                name: built.host.name.clone(),
                mac: format_mac(&built.host.mac),
                mtu: Some(built.host.mtu),
                sandbox: None,
            },
            Interface {
                name: a.ifname.clone(),
                mac: format_mac(&built.pod.mac),
                mtu: Some(built.pod.mtu),
                sandbox: Some(netns.display().to_string()),
            },
        ],
        ips: vec![IpConfig {
            address: IpNet::V4(Ipv4Net::from(allocation.ip)),
            gateway: Some(gateway),
            interface: Some(1),
        }],
        routes: vec![Route {
            dst: IpNet::V4(Ipv4Net::default()),
            gw: Some(gateway),
            mtu: None,
            scope: None,
        }],
        dns: Dns::default(),
    })
}

fn cmd_del(env: &Environment, conf: &NetConf) -> Result<(), CniError> {
    let a = attachment(env)?;
    let key = key_of(a);
    let released = agent::call(&conf.agent_socket, &Request::Release { key: key.clone() });
    // Delete the veth even when the agent is away: the runtime is tearing the pod down now.
    // A missing netns or an unknown container means the interface is already gone: fine.
    pod::remove(&host_ifname(&key)).map_err(|e| kernel_error("DEL", e))?;
    match released {
        Ok(Reply::Done) => Ok(()),
        Ok(other) => Err(agent::unexpected(&conf.agent_socket, "Release", &other).into_cni("DEL")),
        // Unreachable -> 11: the runtime retries; the agent's GC also frees the address.
        Err(e) => Err(e.into_cni("release the pod address")),
    }
}

fn cmd_check(env: &Environment, conf: &NetConf) -> Result<(), CniError> {
    let a = attachment(env)?;
    let netns = existing_netns(a)?;
    let key = key_of(a);
    let (ip, host) = match agent::call(&conf.agent_socket, &Request::Check { key: key.clone() }) {
        Ok(Reply::Present { ip, host_ifname }) => (ip, host_ifname),
        Ok(other) => {
            return Err(agent::unexpected(&conf.agent_socket, "Check", &other).into_cni("CHECK"));
        }
        Err(e) => return Err(e.into_cni("CHECK")),
    };
    if let Some(prev) = &conf.prev_result {
        let expected = IpNet::V4(Ipv4Net::from(ip));
        if !prev.ips.iter().any(|c| c.address.addr() == expected.addr()) {
            return Err(CniError::new(
                ErrorCode::Other,
                format!(
                    "CHECK: the agent holds {ip} for this container, but prevResult does not list it"
                ),
            ));
        }
    }
    pod::verify(&host, netns, &a.ifname, ip).map_err(|e| kernel_error("CHECK", e))
}

fn cmd_status(conf: &NetConf) -> Result<(), CniError> {
    match agent::call(&conf.agent_socket, &Request::Status) {
        Ok(Reply::Ready { free_ips }) => {
            tracing::debug!(free_ips, "agent ready");
            Ok(())
        }
        Ok(other) => {
            Err(agent::unexpected(&conf.agent_socket, "Status", &other).into_cni("STATUS"))
        }
        Err(e)
            if e.is_unreachable()
                || matches!(&e, agent::CallError::Agent(a) if a.kind == ferrum_agent_api::ErrorKind::NotReady) =>
        {
            let inner = e.into_cni("STATUS");
            Err(CniError::new(
                ErrorCode::PluginNotAvailable,
                "plugin not available: the ferrum agent cannot serve ADD now",
            )
            .with_details(format!("{}; {}", inner.msg, inner.details)))
        }
        Err(e) => Err(e.into_cni("STATUS")),
    }
}

fn cmd_gc(conf: &NetConf) -> Result<(), CniError> {
    let valid = conf.valid_attachments.as_ref().ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidConfig,
            "network config field cni.dev/valid-attachments: is missing; GC needs it",
        )
    })?;
    let valid = valid
        .iter()
        .map(|v| AttachmentKey {
            container_id: v.container_id.clone(),
            ifname: v.ifname.clone(),
        })
        .collect();
    let request = Request::Gc {
        valid,
        network: conf.name.clone(),
    };
    match agent::call(&conf.agent_socket, &request) {
        Ok(Reply::Collected { released }) => {
            // The agent freed the addresses; the host ends of their veths are ours to remove
            // (deleting one removes its pod end too).
            for key in &released {
                pod::remove(&host_ifname(key)).map_err(|e| kernel_error("GC", e))?;
            }
            tracing::info!(released = released.len(), "garbage collected attachments");
            Ok(())
        }
        Ok(other) => Err(agent::unexpected(&conf.agent_socket, "Gc", &other).into_cni("GC")),
        Err(e) => Err(e.into_cni("GC")),
    }
}
