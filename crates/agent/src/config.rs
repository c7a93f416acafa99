//! Command line of ferrum-agent.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use ipnet::Ipv4Net;

/// How pods get addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IpamMode {
    /// A block of --cluster-pod-cidr per node (the Node's spec.podCIDR), VXLAN between nodes.
    Overlay,
    /// Addresses of the pod subnet (--cluster-pod-cidr) assigned to the node in batches by the
    /// cloud through the node's NodeNetworkConfig; routed by the underlay, no encapsulation.
    Vnet,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The Ferrum node agent: IPAM, endpoints and the eBPF datapath of one node.
///
/// Tools (run as `ferrum-agent TOOL --help`): install-cni, cleanup-kube-proxy, crds.
#[derive(Debug, Clone, Parser)]
#[command(name = "ferrum-agent", version)]
pub struct Config {
    /// This node's name (as in the Node object).
    #[arg(long, env = "FERRUM_NODE_NAME")]
    pub node_name: String,
    /// Network namespace to run in (entered before anything else starts).
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// The lab control plane's unix socket to watch the cluster through.
    #[arg(long)]
    pub lab_socket: Option<PathBuf>,
    /// Watch a Kubernetes cluster through this kubeconfig.
    #[arg(long, conflicts_with_all = ["lab_socket", "in_cluster"])]
    pub kubeconfig: Option<PathBuf>,
    /// Watch the Kubernetes cluster the agent runs in (its service account's credentials).
    #[arg(long, conflicts_with = "lab_socket")]
    pub in_cluster: bool,
    /// Unix socket of the CNI API (ferrum-cni connects here).
    #[arg(long, default_value = ferrum_agent_api::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Directory of persistent node state (IPAM store).
    #[arg(long, default_value = "/var/lib/ferrum/agent")]
    pub state_dir: PathBuf,
    /// bpffs directory for this node's pinned maps and programs.
    #[arg(long, default_value = "/sys/fs/bpf/ferrum")]
    pub bpf_pin_dir: PathBuf,
    /// The node's uplink interface; its IPv4 address is the node IP.
    #[arg(long, default_value = "eth0")]
    pub uplink: String,
    /// The cluster's pod CIDR; node blocks are carved from it.
    #[arg(long, default_value = "10.244.0.0/16")]
    pub cluster_pod_cidr: Ipv4Net,
    /// Maximum pods (addresses) on this node.
    #[arg(long, default_value_t = ferrum_ipam::DEFAULT_MAX_PODS)]
    pub max_pods: u32,
    /// overlay or vnet (then --cluster-pod-cidr is the pod subnet).
    #[arg(long, value_enum, default_value_t = IpamMode::Overlay)]
    pub ipam_mode: IpamMode,
    /// VXLAN network identifier of the overlay.
    #[arg(long, default_value_t = 2)]
    pub vni: u32,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Where the agent serves metrics (/metrics), flows (/v1/flows) and the service map (/)
    /// over HTTP, inside the node's network namespace.
    #[arg(long, default_value = "0.0.0.0:9962")]
    pub observe_addr: std::net::SocketAddr,
    /// The same HTTP API on a unix socket (how `ferrum observe` reaches the agent).
    #[arg(long, default_value = "/run/ferrum/observe.sock")]
    pub observe_socket: PathBuf,
    /// Flows the node keeps in memory (the oldest are overwritten).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub flow_ring_size: u32,
    /// Which forwarded packets become flows: sampled (TCP connection starts/ends, one per
    /// other flow and second), every-packet (debugging), off. Drops are always reported.
    #[arg(long, value_enum, default_value_t = FlowEventsArg::Sampled)]
    pub flow_events: FlowEventsArg,
    /// Default Service load-balancing algorithm (a Service may override it with the
    /// ferrum.io/lb-algorithm annotation).
    #[arg(long, value_enum, default_value_t = LbAlgorithm::Random)]
    pub lb_algorithm: LbAlgorithm,
    /// cgroup v2 directory holding this node's host processes: socket-level load balancing
    /// attaches there, and the agent joins it. Never the root cgroup.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FlowEventsArg {
    Sampled,
    EveryPacket,
    Off,
}

impl From<FlowEventsArg> for ferrum_datapath::bpf::FlowEvents {
    fn from(a: FlowEventsArg) -> Self {
        match a {
            FlowEventsArg::Sampled => ferrum_datapath::bpf::FlowEvents::Sampled,
            FlowEventsArg::EveryPacket => ferrum_datapath::bpf::FlowEvents::EveryPacket,
            FlowEventsArg::Off => ferrum_datapath::bpf::FlowEvents::Off,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LbAlgorithm {
    Random,
    Maglev,
}

impl LbAlgorithm {
    pub fn to_lb(self) -> ferrum_lb::Algorithm {
        match self {
            LbAlgorithm::Random => ferrum_lb::Algorithm::Random,
            LbAlgorithm::Maglev => ferrum_lb::Algorithm::Maglev,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_ones() {
        let c = Config::try_parse_from(["ferrum-agent", "--node-name", "n1"]).unwrap();
        assert_eq!(c.uplink, "eth0");
        assert_eq!(c.max_pods, 250);
        assert_eq!(c.vni, 2);
        assert_eq!(c.cluster_pod_cidr.to_string(), "10.244.0.0/16");
        assert_eq!(c.socket, PathBuf::from(ferrum_agent_api::DEFAULT_SOCKET));
        assert_eq!(
            c.flow_events,
            FlowEventsArg::Sampled,
            "observability is on by default"
        );
        assert_eq!(c.observe_addr.port(), 9962);
        assert_eq!(c.flow_ring_size, 4096);
    }

    #[test]
    fn flow_ring_size_zero_is_refused() {
        let e =
            Config::try_parse_from(["ferrum-agent", "--node-name", "n1", "--flow-ring-size", "0"])
                .unwrap_err();
        assert!(e.to_string().contains("flow-ring-size"), "{e}");
    }

    #[test]
    fn one_cluster_source_at_a_time() {
        let parse = |extra: &[&str]| {
            let mut args = vec!["ferrum-agent", "--node-name", "n1"];
            args.extend_from_slice(extra);
            Config::try_parse_from(args)
        };
        assert!(parse(&["--kubeconfig", "/k", "--lab-socket", "/s"]).is_err());
        assert!(parse(&["--in-cluster", "--lab-socket", "/s"]).is_err());
        assert!(parse(&["--in-cluster", "--kubeconfig", "/k"]).is_err());
        let c = parse(&["--kubeconfig", "/k"]).unwrap();
        assert_eq!(c.kubeconfig, Some(PathBuf::from("/k")));
        assert!(parse(&["--in-cluster"]).unwrap().in_cluster);
    }

    #[test]
    fn bad_cidr_is_refused() {
        assert!(
            Config::try_parse_from([
                "ferrum-agent",
                "--node-name",
                "n1",
                "--cluster-pod-cidr",
                "10.244.0.0/33"
            ])
            .is_err()
        );
    }
}
