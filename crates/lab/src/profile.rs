//! Where a lab keeps its state, and how its namespaces are named.

use std::path::PathBuf;

/// Root of every lab's persistent state (control-plane objects, IPAM stores, logs).
pub const STATE_ROOT: &str = "/var/lib/ferrum/labs";
/// Root of every lab's runtime files (sockets, pid files).
pub const RUN_ROOT: &str = "/run/ferrum/labs";
/// Root of every lab's bpffs pins (one directory per node below the lab's).
pub const BPF_ROOT: &str = "/sys/fs/bpf/ferrum/labs";

#[derive(Debug, thiserror::Error)]
pub enum NameError {
    #[error(
        "invalid lab name {0:?}: use 1-16 characters from a-z, 0-9 and '-', starting with a letter"
    )]
    Invalid(String),
}

/// Ends the lab name in namespace names: not a lab-name character (see `LabPaths::new`), and
/// allowed in netns names (which only forbid '/', "." and "..").
pub const NETNS_SEPARATOR: char = '.';

/// The file-system and namespace layout of one lab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabPaths {
    pub name: String,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub bpf_dir: PathBuf,
}

impl LabPaths {
    pub fn new(name: &str) -> Result<Self, NameError> {
        let ok = !name.is_empty()
            && name.len() <= 16
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !ok {
            return Err(NameError::Invalid(name.to_string()));
        }
        Ok(Self {
            name: name.to_string(),
            state_dir: PathBuf::from(STATE_ROOT).join(name),
            run_dir: PathBuf::from(RUN_ROOT).join(name),
            bpf_dir: PathBuf::from(BPF_ROOT).join(name),
        })
    }

    /// The control plane's unix socket.
    pub fn cp_socket(&self) -> PathBuf {
        self.run_dir.join("cp.sock")
    }

    /// A node's agent socket (CNI plugin -> agent).
    pub fn agent_socket(&self, node: &str) -> PathBuf {
        self.run_dir.join("nodes").join(node).join("agent.sock")
    }

    /// A node's observability API socket (flows, metrics, service map; `ferrum observe`).
    pub fn observe_socket(&self, node: &str) -> PathBuf {
        self.run_dir.join("nodes").join(node).join("observe.sock")
    }

    /// A node's persistent state (IPAM store, logs, CNI config).
    pub fn node_state_dir(&self, node: &str) -> PathBuf {
        self.state_dir.join("nodes").join(node)
    }

    /// A node's bpffs pin directory.
    pub fn node_bpf_dir(&self, node: &str) -> PathBuf {
        self.bpf_dir.join(node)
    }

    /// Prefix of every network namespace this lab creates (used to find leftovers on `down`).
    /// The lab name is followed by `NETNS_SEPARATOR`, which no lab name contains, so no lab's
    /// prefix is a prefix of another lab's names ("demo." never matches "demo-x.fabric").
    pub fn netns_prefix(&self) -> String {
        format!("fe-{}{NETNS_SEPARATOR}", self.name)
    }

    pub fn fabric_netns(&self) -> String {
        format!("{}fabric", self.netns_prefix())
    }

    pub fn external_netns(&self) -> String {
        format!("{}ext", self.netns_prefix())
    }

    pub fn node_netns(&self, node: &str) -> String {
        format!("{}n-{}", self.netns_prefix(), node)
    }

    /// A pod's netns, named from its uid (stable for the pod's life, unique across re-creation).
    pub fn pod_netns(&self, pod_uid: &str) -> String {
        let short: String = pod_uid.chars().filter(|c| *c != '-').take(12).collect();
        format!("{}p-{}", self.netns_prefix(), short)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(LabPaths::new("ferrum").is_ok());
        assert!(LabPaths::new("t-123").is_ok());
        for bad in [
            "",
            "Ferrum",
            "1lab",
            "a/b",
            "a b",
            "a.b",
            "seventeen-chars-x",
        ] {
            assert!(LabPaths::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn layout_is_per_lab() {
        let a = LabPaths::new("a").unwrap();
        let b = LabPaths::new("b").unwrap();
        assert_ne!(a.cp_socket(), b.cp_socket());
        assert_ne!(a.node_netns("node-0"), b.node_netns("node-0"));
        assert!(a.node_netns("node-0").starts_with(&a.netns_prefix()));
        assert!(
            a.pod_netns("1234-5678-9abc-def0")
                .starts_with(&a.netns_prefix())
        );
        assert_eq!(a.pod_netns("1234-5678-9abc-def0"), "fe-a.p-123456789abc");
    }

    /// A lab whose name extends another's ("a" and "a-x", "a-n", "a-p") owns none of the
    /// other's namespaces: `down` of one never matches the other's.
    #[test]
    fn no_lab_prefix_matches_another_labs_namespaces() {
        let names = [
            "a",
            "a-x",
            "a-n",
            "a-p",
            "a-n-node-0",
            "a-fabric",
            "ab",
            "a-",
        ];
        for one in names {
            let one = LabPaths::new(one).unwrap();
            for other in names {
                let other = LabPaths::new(other).unwrap();
                let owned = [
                    other.fabric_netns(),
                    other.external_netns(),
                    other.node_netns("node-0"),
                    other.node_netns("node-63"),
                    other.pod_netns("1234-5678-9abc-def0"),
                ];
                for ns in owned {
                    assert_eq!(
                        ns.starts_with(&one.netns_prefix()),
                        one == other,
                        "{ns} vs prefix {}",
                        one.netns_prefix()
                    );
                    // Linux netns names live in /run/netns: one path component.
                    assert!(ns.len() < 256 && !ns.contains('/'), "{ns}");
                }
            }
        }
    }
}
