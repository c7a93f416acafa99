//! kube-proxy takeover on real rule sets: a test network namespace gets kube-proxy's
//! iptables chains (legacy and nf_tables backends, IPv4 and IPv6), its nftables-mode table,
//! kubelet's chains and unrelated rules; the cleanup removes exactly kube-proxy's. Needs root.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ferrum_datapath::netns::run_in_netns;
use ferrum_k8s::kubeproxy::{CleanupError, cleanup};

struct TestNetns {
    name: String,
}

impl TestNetns {
    fn new(tag: &str) -> Self {
        let name = format!("ferrum-kp-{tag}-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip netns add {name}");
        Self { name }
    }
    fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs a tool inside the calling thread's netns with `input` on stdin; returns stdout.
fn tool(cmd: &str, args: &[&str], input: &str) -> String {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

const RULES_V4: &str = r#"*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-NPX46M4PTMTKRN6Y - [0:0]
:KUBE-SEP-ABCDEFGHIJKLMNOP - [0:0]
:KUBE-NODEPORTS - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A POSTROUTING -s 192.168.77.0/24 -j MASQUERADE
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MASQUERADE
-A KUBE-SERVICES -d 10.0.0.1/32 -p tcp -m comment --comment "default/kubernetes:https cluster IP" -m tcp --dport 443 -j KUBE-SVC-NPX46M4PTMTKRN6Y
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-SVC-NPX46M4PTMTKRN6Y -j KUBE-SEP-ABCDEFGHIJKLMNOP
-A KUBE-SEP-ABCDEFGHIJKLMNOP -p tcp -m tcp -j DNAT --to-destination 10.224.0.4:6443
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A INPUT -j KUBE-FIREWALL
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
COMMIT
"#;

const RULES_V6: &str = "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\nCOMMIT\n";

const NFT: &str = "table ip kube-proxy {\n chain services {\n }\n chain nat-prerouting {\n  type nat hook prerouting priority dstnat; policy accept;\n  jump services\n }\n}\ntable ip6 kube-proxy {\n chain services {\n }\n}\ntable inet site-firewall {\n chain input {\n  type filter hook input priority 0; policy accept;\n  tcp dport 22 accept\n }\n}\n";

fn snapshot() -> String {
    let mut s = String::new();
    for t in [
        "iptables-legacy-save",
        "iptables-nft-save",
        "ip6tables-legacy-save",
        "ip6tables-nft-save",
    ] {
        // Without the "# Generated ... on <time>" comments, which change with the clock.
        let rules: String = tool(t, &[], "")
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        s.push_str(&format!("== {t}\n{rules}"));
    }
    s.push_str(&format!("== nft\n{}", tool("nft", &["list", "tables"], "")));
    s
}

fn load_rules() {
    tool("iptables-legacy-restore", &[], RULES_V4);
    tool("iptables-nft-restore", &[], RULES_V4);
    tool("ip6tables-legacy-restore", &[], RULES_V6);
    tool("nft", &["-f", "-"], NFT);
}

#[test]
fn removes_exactly_kube_proxys_rules_from_every_backend() {
    let ns = TestNetns::new("clean");
    let empty_proc = tempfile::tempdir().unwrap();
    run_in_netns(&ns.path(), || {
        load_rules();
        let before = snapshot();
        assert!(before.contains(":KUBE-SEP-ABCDEFGHIJKLMNOP"));

        // Dry run: reports, changes nothing.
        let plan = cleanup(true, false, empty_proc.path()).unwrap();
        assert_eq!(snapshot(), before);
        let backends: Vec<&str> = plan
            .iptables
            .iter()
            .map(|(b, p)| if p.table == "nat" { b.as_str() } else { "" })
            .filter(|b| !b.is_empty())
            .collect();
        assert_eq!(
            backends,
            ["iptables-legacy", "iptables-nft", "ip6tables-legacy"]
        );
        assert_eq!(plan.nftables.len(), 2);

        let done = cleanup(false, false, empty_proc.path()).unwrap();
        assert_eq!(done, plan);
        let after = snapshot();
        for line in after.lines() {
            let kube_chain = line.starts_with(":KUBE-")
                || line.contains("-j KUBE-")
                || line.starts_with("-A KUBE-");
            let kubelet = line.contains("KUBE-FIREWALL") || line.contains("KUBE-KUBELET-CANARY");
            assert!(!kube_chain || kubelet, "left behind: {line}\n{after}");
        }
        // Everything that is not kube-proxy's is still there, in both backends.
        for backend in ["iptables-legacy-save", "iptables-nft-save"] {
            let rules = tool(backend, &[], "");
            assert!(
                rules.contains("-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT"),
                "{rules}"
            );
            assert!(rules.contains("-A INPUT -j KUBE-FIREWALL"), "{rules}");
            assert!(rules.contains(":KUBE-KUBELET-CANARY"), "{rules}");
            assert!(
                rules.contains("-A POSTROUTING -s 192.168.77.0/24 -j MASQUERADE"),
                "{rules}"
            );
        }
        let tables = tool("nft", &["list", "tables"], "");
        assert!(tables.contains("table inet site-firewall"), "{tables}");
        assert!(!tables.contains("kube-proxy"), "{tables}");

        // Idempotent: a second run finds nothing.
        assert!(cleanup(false, false, empty_proc.path()).unwrap().is_empty());
    })
    .unwrap();
}

#[test]
fn refuses_while_kube_proxy_runs_and_changes_nothing() {
    let ns = TestNetns::new("busy");
    let fake_proc = tempfile::tempdir().unwrap();
    std::fs::create_dir(fake_proc.path().join("4242")).unwrap();
    std::fs::write(fake_proc.path().join("4242/comm"), "kube-proxy\n").unwrap();
    run_in_netns(&ns.path(), || {
        load_rules();
        let before = snapshot();
        let e = cleanup(false, false, fake_proc.path()).unwrap_err();
        assert!(matches!(e, CleanupError::KubeProxyRunning(4242)), "{e}");
        assert!(e.to_string().contains("DaemonSet"), "{e}");
        assert_eq!(snapshot(), before);
        // --force overrides.
        assert!(!cleanup(false, true, fake_proc.path()).unwrap().is_empty());
    })
    .unwrap();
}
