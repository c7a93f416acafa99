//! Taking a node over from kube-proxy: find the rules kube-proxy left (iptables chains named
//! KUBE-* in any table, through the legacy and the nf_tables iptables backends, IPv4 and IPv6;
//! the `kube-proxy` nftables tables of its nftables mode) and remove exactly those.
//!
//! The planning is pure ([`plan_iptables`], [`kube_proxy_tables`]); [`cleanup`] runs the tools.
//! Each iptables table is rewritten with one `iptables-restore --noflush` transaction, so a
//! table is either fully cleaned or untouched. Chains kubelet owns (KUBE-FIREWALL and its
//! canaries) and every rule that is not kube-proxy's stay.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};

/// Chains named KUBE-* that kubelet, not kube-proxy, creates: left alone.
pub const KUBELET_CHAINS: &[&str] = &[
    "KUBE-FIREWALL",
    "KUBE-KUBELET-CANARY",
    "KUBE-IPTABLES-HINT",
    "KUBE-MARK-DROP",
];

/// The tables kube-proxy's nftables mode creates.
pub const NFT_TABLE: &str = "kube-proxy";

fn is_kube_proxy_chain(name: &str) -> bool {
    name.starts_with("KUBE-") && !KUBELET_CHAINS.contains(&name)
}

/// What is removed from one iptables table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TablePlan {
    pub table: String,
    /// Rules in other chains that jump to kube-proxy chains (as `-A ...` lines).
    pub jumps: Vec<String>,
    pub chains: Vec<String>,
}

impl TablePlan {
    /// The iptables-restore --noflush input that applies the plan.
    pub fn restore_script(&self) -> String {
        let mut s = format!("*{}\n", self.table);
        for rule in &self.jumps {
            s.push_str("-D");
            s.push_str(&rule[2..]);
            s.push('\n');
        }
        for chain in &self.chains {
            s.push_str(&format!("-F {chain}\n"));
        }
        for chain in &self.chains {
            s.push_str(&format!("-X {chain}\n"));
        }
        s.push_str("COMMIT\n");
        s
    }
}

/// The target of a rule line (`-j X` or `-g X`), if any.
fn rule_target(rule: &str) -> Option<&str> {
    let mut words = rule.split_whitespace();
    while let Some(w) = words.next() {
        if w == "-j" || w == "-g" || w == "--jump" || w == "--goto" {
            return words.next();
        }
    }
    None
}

/// Plans the cleanup of `iptables-save` output: per table with kube-proxy chains, the jumps to
/// them from other chains and the chains themselves.
pub fn plan_iptables(save: &str) -> Vec<TablePlan> {
    let mut plans = Vec::new();
    let mut current: Option<TablePlan> = None;
    let mut rules: Vec<String> = Vec::new();
    let finish = |plan: Option<TablePlan>, rules: &mut Vec<String>, plans: &mut Vec<TablePlan>| {
        if let Some(mut plan) = plan {
            let owned: BTreeSet<&str> = plan.chains.iter().map(String::as_str).collect();
            plan.jumps = rules
                .iter()
                .filter(|r| {
                    let chain = r.split_whitespace().nth(1).unwrap_or_default();
                    !owned.contains(chain) && rule_target(r).is_some_and(|t| owned.contains(t))
                })
                .cloned()
                .collect();
            if !plan.chains.is_empty() {
                plans.push(plan);
            }
        }
        rules.clear();
    };
    for line in save.lines().map(str::trim) {
        if let Some(table) = line.strip_prefix('*') {
            finish(current.take(), &mut rules, &mut plans);
            current = Some(TablePlan {
                table: table.to_string(),
                ..Default::default()
            });
        } else if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or_default();
            if let Some(plan) = current.as_mut()
                && is_kube_proxy_chain(name)
            {
                plan.chains.push(name.to_string());
            }
        } else if line.starts_with("-A ") {
            rules.push(line.to_string());
        } else if line == "COMMIT" {
            finish(current.take(), &mut rules, &mut plans);
        }
    }
    finish(current.take(), &mut rules, &mut plans);
    plans
}

/// kube-proxy's tables in `nft list tables` output, as (family, name).
pub fn kube_proxy_tables(list: &str) -> Vec<(String, String)> {
    list.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            match (w.next(), w.next(), w.next()) {
                (Some("table"), Some(family), Some(name)) if name == NFT_TABLE => {
                    Some((family.to_string(), name.to_string()))
                }
                _ => None,
            }
        })
        .collect()
}

/// One iptables flavour: `<prefix>-save` / `<prefix>-restore`.
pub const IPTABLES_BACKENDS: &[&str] = &[
    "iptables-legacy",
    "iptables-nft",
    "ip6tables-legacy",
    "ip6tables-nft",
];

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error(
        "kube-proxy is still running on this node (pid {0}); it would recreate its rules: remove the kube-proxy DaemonSet from this node first (see README, Migrate from kube-proxy)"
    )]
    KubeProxyRunning(u32),
    #[error("running {tool}: {error}")]
    Spawn { tool: String, error: std::io::Error },
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        tool: String,
        status: String,
        stderr: String,
    },
}

/// What a cleanup removed (or, for a dry run, would remove).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// (backend, table plan)
    pub iptables: Vec<(String, TablePlan)>,
    /// (family, table)
    pub nftables: Vec<(String, String)>,
}

impl CleanupReport {
    pub fn is_empty(&self) -> bool {
        self.iptables.is_empty() && self.nftables.is_empty()
    }
}

fn run(tool: &str, args: &[&str], stdin: Option<&str>) -> Result<Option<String>, CleanupError> {
    let mut cmd = Command::new(tool);
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        // A backend that is not installed holds no rules.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(CleanupError::Spawn {
                tool: tool.into(),
                error,
            });
        }
    };
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|error| CleanupError::Spawn {
                tool: tool.into(),
                error,
            })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|error| CleanupError::Spawn {
            tool: tool.into(),
            error,
        })?;
    if !out.status.success() {
        return Err(CleanupError::Tool {
            tool: format!("{tool} {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// A running kube-proxy process under `proc_root` (the host's /proc), if any.
pub fn kube_proxy_pid(proc_root: &std::path::Path) -> Option<u32> {
    std::fs::read_dir(proc_root).ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (comm.trim() == "kube-proxy").then_some(pid)
    })
}

/// Removes kube-proxy's rules from the calling thread's network namespace (every backend and
/// family; nftables tables too). Refuses while kube-proxy runs (a process named kube-proxy
/// under `proc_root`) unless `force`. With `dry_run`
/// it only reports what it would remove.
pub fn cleanup(
    dry_run: bool,
    force: bool,
    proc_root: &std::path::Path,
) -> Result<CleanupReport, CleanupError> {
    if !force && let Some(pid) = kube_proxy_pid(proc_root) {
        return Err(CleanupError::KubeProxyRunning(pid));
    }
    let mut report = CleanupReport::default();
    for backend in IPTABLES_BACKENDS {
        let Some(save) = run(&format!("{backend}-save"), &[], None)? else {
            continue;
        };
        for plan in plan_iptables(&save) {
            if !dry_run {
                run(
                    &format!("{backend}-restore"),
                    &["--noflush"],
                    Some(&plan.restore_script()),
                )?;
                tracing::info!(backend, table = %plan.table, chains = plan.chains.len(), jumps = plan.jumps.len(), "removed kube-proxy iptables chains");
            }
            report.iptables.push((backend.to_string(), plan));
        }
    }
    if let Some(list) = run("nft", &["list", "tables"], None)? {
        for (family, table) in kube_proxy_tables(&list) {
            if !dry_run {
                run("nft", &["delete", "table", &family, &table], None)?;
                tracing::info!(%family, %table, "removed kube-proxy nftables table");
            }
            report.nftables.push((family, table));
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = r#"# Generated by iptables-save
*mangle
:PREROUTING ACCEPT [0:0]
:KUBE-IPTABLES-HINT - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-PROXY-CANARY - [0:0]
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-SERVICES - [0:0]
-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-SERVICES
-A INPUT -j KUBE-FIREWALL
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ABC - [0:0]
:KUBE-SEP-XYZ - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -d 10.0.0.1/32 -p tcp -j KUBE-SVC-ABC
-A KUBE-SVC-ABC -j KUBE-SEP-XYZ
-A KUBE-SEP-XYZ -p tcp -j DNAT --to-destination 10.224.0.4:6443
COMMIT
"#;

    #[test]
    fn plans_only_kube_proxy_chains_and_the_jumps_into_them() {
        let plans = plan_iptables(SAVE);
        let tables: Vec<_> = plans.iter().map(|p| p.table.as_str()).collect();
        assert_eq!(tables, ["mangle", "filter", "nat"]);
        assert_eq!(plans[0].chains, ["KUBE-PROXY-CANARY"]);
        let filter = &plans[1];
        assert_eq!(filter.chains, ["KUBE-FORWARD", "KUBE-SERVICES"]);
        assert_eq!(filter.jumps.len(), 2, "{:?}", filter.jumps);
        assert!(filter.jumps.iter().all(|j| !j.contains("KUBE-FIREWALL")));
        let nat = &plans[2];
        assert_eq!(nat.chains.len(), 3);
        assert_eq!(
            nat.jumps,
            [r#"-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#]
        );
        let script = nat.restore_script();
        assert!(script.starts_with("*nat\n-D PREROUTING -m comment"));
        assert!(script.ends_with("-X KUBE-SEP-XYZ\nCOMMIT\n"));
        // Flushes come before deletes: chains reference each other.
        assert!(script.find("-F KUBE-SEP-XYZ").unwrap() < script.find("-X KUBE-SERVICES").unwrap());
    }

    #[test]
    fn nothing_to_do_on_a_clean_node() {
        assert!(plan_iptables("*filter\n:INPUT ACCEPT [0:0]\n:KUBE-FIREWALL - [0:0]\n-A INPUT -j KUBE-FIREWALL\nCOMMIT\n").is_empty());
        assert!(plan_iptables("").is_empty());
    }

    #[test]
    fn finds_only_kube_proxys_nft_tables() {
        let list = "table inet filter\ntable ip kube-proxy\ntable ip6 kube-proxy\ntable ip kube-proxy-other\n";
        assert_eq!(
            kube_proxy_tables(list),
            [
                ("ip".to_string(), "kube-proxy".to_string()),
                ("ip6".into(), "kube-proxy".into())
            ]
        );
    }
}
