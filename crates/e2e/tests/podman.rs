//! A real container runtime calling ferrum-cni: podman (CNI backend), run inside a lab node's
//! network namespace, starts two containers on a Ferrum network served by that node's agent;
//! they reach each other and a lab pod on the other node. Nothing touches the root netns: podman
//! runs under `nsenter --net=<node netns>`, so the plugin (and the host side of each veth) lives
//! in the node, where its agent works.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, bail};
use ferrum_e2e::{Lab, bin_dir, pod_yaml};

/// Podman configuration private to this test: its own containers.conf (CNI backend, our plugin
/// directory, our network config directory) and a busybox root filesystem.
struct PodmanEnv {
    dir: PathBuf,
    node_netns: PathBuf,
    network: String,
    containers: Vec<String>,
}

impl PodmanEnv {
    fn new(lab: &Lab, node: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("ferrum-podman-{}", lab.name));
        let net_dir = dir.join("net.d");
        let rootfs = dir.join("rootfs/bin");
        std::fs::create_dir_all(&net_dir)?;
        std::fs::create_dir_all(&rootfs)?;
        std::fs::copy("/bin/busybox", rootfs.join("busybox"))
            .context("busybox-static is needed (apt-get install busybox-static)")?;
        let network = format!("ferrum-{}", lab.name);
        // libcni in podman 4.3 speaks CNI up to 1.0.0; the plugin negotiates it.
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": network,
            "plugins": [{
                "type": "ferrum-cni",
                "agentSocket": lab.paths.agent_socket(node),
            }]
        });
        std::fs::write(
            net_dir.join(format!("{network}.conflist")),
            conflist.to_string(),
        )?;
        std::fs::write(
            dir.join("containers.conf"),
            format!(
                "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\nnetwork_config_dir = \"{}\"\n",
                bin_dir().display(),
                net_dir.display()
            ),
        )?;
        Ok(Self {
            dir,
            node_netns: lab.node_netns(node),
            network,
            containers: Vec::new(),
        })
    }

    fn podman(&self, args: &[&str]) -> Result<Output> {
        Command::new("nsenter")
            .arg(format!("--net={}", self.node_netns.display()))
            .arg("podman")
            .args(["--runtime", "runc", "--cgroup-manager=cgroupfs"])
            .args(args)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .output()
            .context("run podman")
    }

    fn podman_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.podman(args)?;
        if !out.status.success() {
            bail!(
                "podman {} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn rootfs(&self) -> String {
        self.dir.join("rootfs").display().to_string()
    }

    /// Starts a detached container that answers TCP 80 with `name`.
    fn start_server(&mut self, name: &str) -> Result<()> {
        let rootfs = self.rootfs();
        let net = self.network.clone();
        self.containers.push(name.to_string());
        self.podman_ok(&[
            "run",
            "-d",
            "--name",
            name,
            "--ulimit",
            "nproc=1000:1000",
            "--ulimit",
            "nofile=1000:1000",
            "--network",
            &net,
            "--rootfs",
            &rootfs,
            "/bin/busybox",
            "nc",
            "-ll",
            "-p",
            "80",
            "-e",
            "/bin/busybox",
            "echo",
            name,
        ])?;
        Ok(())
    }

    fn ip_of(&self, name: &str) -> Result<String> {
        let fmt = format!(
            "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
            self.network
        );
        let ip = self
            .podman_ok(&["inspect", "-f", &fmt, name])?
            .trim()
            .to_string();
        if ip.is_empty() {
            bail!("container {name} has no address on {}", self.network);
        }
        Ok(ip)
    }

    /// Runs a one-shot container and returns its output.
    fn run(&self, args: &[&str]) -> Result<String> {
        let rootfs = self.rootfs();
        let mut full = vec![
            "run",
            "--rm",
            "--ulimit",
            "nproc=1000:1000",
            "--ulimit",
            "nofile=1000:1000",
            "--network",
            &self.network,
            "--rootfs",
            &rootfs,
            "/bin/busybox",
        ];
        full.extend_from_slice(args);
        self.podman_ok(&full)
    }
}

impl Drop for PodmanEnv {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = self.podman(&["rm", "-f", "-t", "0", c]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn podman_available() -> bool {
    Path::new("/usr/bin/podman").exists() && Path::new("/bin/busybox").exists()
}

#[test]
fn podman_containers_on_a_ferrum_network_reach_each_other_and_lab_pods() -> Result<()> {
    assert!(
        podman_available(),
        "podman and busybox-static are required (scripts/install-deps.sh installs them)"
    );
    let lab = Lab::up(2, &[])?;
    lab.apply(&pod_yaml("default", "remote", "node-1"))?;
    let remote_ip = lab.pod_ip("default", "remote")?.to_string();

    let mut podman = PodmanEnv::new(&lab, "node-0")?;
    let server = format!("{}-c1", lab.name);
    podman.start_server(&server)?;
    let server_ip = podman.ip_of(&server)?;
    assert!(
        server_ip.starts_with("10.244."),
        "address from the node's block: {server_ip}"
    );

    // Container -> container on the same node, then container -> lab pod on the other node.
    let out = podman.run(&["nc", "-w", "3", &server_ip, "80"])?;
    assert_eq!(out.trim(), server);
    let out = podman.run(&["nc", "-w", "3", &remote_ip, "80"])?;
    assert_eq!(out.trim(), "remote");
    // And the lab pod reaches the container.
    let remote_ns = lab.pod_netns("default", "remote")?;
    let (code, out) = lab.exec("default", "remote", &["nc", "-w", "3", &server_ip, "80"])?;
    assert_eq!(
        (code, out.trim()),
        (0, server.as_str()),
        "from {}",
        remote_ns.display()
    );

    // Removing the container calls CNI DEL: its address goes back to the node's pool and the
    // host side of its veth is gone.
    podman.podman_ok(&["rm", "-f", "-t", "0", &server])?;
    podman.containers.clear();
    let links = Command::new("ip")
        .args(["-n", &lab.paths.node_netns("node-0"), "-o", "link"])
        .output()?;
    let links = String::from_utf8_lossy(&links.stdout);
    // Host sides are named `fe` + 12 hex digits (agent_api::host_ifname).
    let pod_veths: Vec<&str> = links
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .filter(|name| name.starts_with("fe") && !name.starts_with("ferrum"))
        .collect();
    assert!(pod_veths.is_empty(), "host veths left: {pod_veths:?}");
    Ok(())
}
