//! Harness for end-to-end tests: a uniquely named lab that is always torn down, and helpers to
//! run the `ferrum` CLI and code inside lab namespaces.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};
use ferrum_lab::profile::LabPaths;
use serde_json::Value;

pub mod bench;

/// Directory holding the workspace's binaries (`ferrum`, `ferrum-agent`, `ferrum-cni`): next to
/// the running program, or one level up for test executables in `<target>/<profile>/deps/`.
pub fn bin_dir() -> PathBuf {
    ferrum_lab::daemon::bin_dir()
}

/// Path of a workspace binary, checked to exist.
pub fn bin(name: &str) -> Result<PathBuf> {
    let p = bin_dir().join(name);
    if !p.exists() {
        bail!(
            "{} is missing: build the workspace binaries with the same profile first \
             (cargo build --workspace --bins, or --release for the benchmark)",
            p.display()
        );
    }
    Ok(p)
}

/// A lab for one test; `lab down` runs on drop, even when the test panics.
pub struct Lab {
    pub name: String,
    pub paths: LabPaths,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Lab {
    /// Brings up a lab with a name unique to this process and test (`t<pid>x<n>`).
    pub fn up(nodes: u32, extra: &[&str]) -> Result<Lab> {
        let name = format!(
            "t{}x{}",
            std::process::id() % 100_000,
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        Self::up_named(&name, nodes, extra)
    }

    /// Brings up a lab with the given name; a failed `up` is torn down too.
    pub fn up_named(name: &str, nodes: u32, extra: &[&str]) -> Result<Lab> {
        let name = name.to_string();
        let paths = LabPaths::new(&name)?;
        let lab = Lab { name, paths };
        let nodes = nodes.to_string();
        let mut args = vec!["lab", "up", "--nodes", nodes.as_str()];
        args.extend_from_slice(extra);
        lab.ferrum_ok(&args).context("lab up")?;
        Ok(lab)
    }

    /// Runs `ferrum --name <lab> ARGS`.
    pub fn ferrum(&self, args: &[&str], stdin: Option<&str>) -> Result<Output> {
        let mut cmd = Command::new(bin("ferrum")?);
        cmd.arg("--name").arg(&self.name).args(args);
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawn ferrum")?;
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .expect("piped stdin")
                .write_all(input.as_bytes())?;
        }
        Ok(child.wait_with_output()?)
    }

    /// Runs ferrum and fails with its stderr unless it exits 0; returns stdout.
    pub fn ferrum_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.ferrum(args, None)?;
        check(&out, args)
    }

    pub fn apply(&self, yaml: &str) -> Result<String> {
        let out = self.ferrum(&["apply", "-f", "-"], Some(yaml))?;
        check(&out, &["apply"])
    }

    pub fn status(&self) -> Result<Value> {
        Ok(serde_json::from_str(
            &self.ferrum_ok(&["lab", "status", "-o", "json"])?,
        )?)
    }

    /// The pod object as `get pods -o json` shows it.
    pub fn pod(&self, namespace: &str, name: &str) -> Result<Value> {
        let list: Value = serde_json::from_str(
            &self.ferrum_ok(&["get", "pods", "-n", namespace, "-o", "json"])?,
        )?;
        list["items"]
            .as_array()
            .and_then(|items| {
                items
                    .iter()
                    .find(|p| p["metadata"]["name"] == name)
                    .cloned()
            })
            .with_context(|| format!("pod {namespace}/{name} not listed"))
    }

    pub fn pod_ip(&self, namespace: &str, name: &str) -> Result<Ipv4Addr> {
        let pod = self.pod(namespace, name)?;
        pod["status"]["podIP"]
            .as_str()
            .with_context(|| format!("pod {namespace}/{name} has no podIP: {pod}"))?
            .parse()
            .context("podIP")
    }

    /// A node's IP from `lab status`.
    pub fn node_ip(&self, node: &str) -> Result<Ipv4Addr> {
        let status = self.status()?;
        status["nodes"]
            .as_array()
            .and_then(|nodes| nodes.iter().find(|n| n["name"] == node))
            .and_then(|n| n["ip"].as_str())
            .with_context(|| format!("node {node} has no ip in `lab status`: {status}"))?
            .parse()
            .with_context(|| format!("ip of node {node}"))
    }

    /// /run/netns path of a pod's network namespace.
    pub fn pod_netns(&self, namespace: &str, name: &str) -> Result<PathBuf> {
        let pod = self.pod(namespace, name)?;
        let uid = pod["metadata"]["uid"].as_str().context("pod uid")?;
        Ok(PathBuf::from("/run/netns").join(self.paths.pod_netns(uid)))
    }

    pub fn node_netns(&self, node: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(self.paths.node_netns(node))
    }

    pub fn external_netns(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(self.paths.external_netns())
    }

    /// `ferrum exec -n NS POD -- ARGS`: (exit code, stdout).
    pub fn exec(&self, namespace: &str, pod: &str, args: &[&str]) -> Result<(i32, String)> {
        let mut full = vec!["exec", "-n", namespace, pod, "--"];
        full.extend_from_slice(args);
        let out = self.ferrum(&full, None)?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        match self.ferrum(&["lab", "down"], None) {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "lab down {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("lab down {} failed: {e:#}", self.name),
        }
    }
}

fn check(out: &Output, args: &[&str]) -> Result<String> {
    if !out.status.success() {
        bail!(
            "ferrum {} exited {:?}: {}{}",
            args.join(" "),
            out.status.code(),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Two pods serving TCP 80 and UDP 53 (they answer with their name), pinned to nodes.
pub fn pod_yaml(namespace: &str, name: &str, node: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {namespace}
  labels:
    app: {name}
spec:
  nodeName: {node}
  containers:
  - name: main
    image: busybox
    ports:
    - containerPort: 80
      protocol: TCP
    - containerPort: 53
      protocol: UDP
"#
    )
}
