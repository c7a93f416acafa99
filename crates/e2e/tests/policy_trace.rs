//! `ferrum policy trace` and NetworkPolicy apply validation on a live lab.

use anyhow::{Result, ensure};
use ferrum_e2e::{Lab, pod_yaml};

const POLICY: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: b-from-a
  namespace: default
spec:
  podSelector: {matchLabels: {app: b}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: a}}}]
    ports: [{port: 80}]
"#;

#[test]
fn trace_names_the_deciding_policy_and_bad_policies_are_refused_whole() -> Result<()> {
    let lab = Lab::up(2, &[])?;
    lab.apply(
        &[
            pod_yaml("default", "a", "node-0"),
            pod_yaml("default", "b", "node-1"),
            pod_yaml("default", "c", "node-1"),
            POLICY.to_string(),
        ]
        .join("---\n"),
    )?;
    let trace = |from: &str, to: &str, port: &str, proto: &str| {
        lab.ferrum(
            &[
                "policy",
                "trace",
                "--from",
                from,
                "--to",
                to,
                "--port",
                port,
                "--protocol",
                proto,
            ],
            None,
        )
    };
    let out = trace("default/a", "default/b", "80", "tcp")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.code() == Some(0), "allowed exits 0: {text}");
    ensure!(
        text.contains("allowed by default/b-from-a ingress[0]"),
        "{text}"
    );
    ensure!(
        text.contains("no NetworkPolicy selects default/a"),
        "{text}"
    );

    let out = trace("default/c", "default/b", "80", "tcp")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.code() == Some(1), "denied exits 1: {text}");
    ensure!(
        text.contains("selected for ingress by default/b-from-a"),
        "{text}"
    );
    ensure!(text.contains("verdict: DENIED"), "{text}");

    let out = trace("default/a", "default/b", "80", "udp")?;
    ensure!(out.status.code() == Some(1), "UDP 80 is not in the rule");

    // The node itself reaches b (health probes).
    let node1 = lab.node_ip("node-1")?.to_string();
    let out = trace(&node1, "default/b", "81", "tcp")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.code() == Some(0) && text.contains("own node"),
        "{text}"
    );

    let out = trace("default/nope", "default/b", "80", "tcp")?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("default/nope"),
        "{err}"
    );

    // Re-applying a Pod with new labels updates it in place: same IP, and the trace follows.
    let a_ip = lab.pod_ip("default", "a")?;
    lab.apply(&pod_yaml("default", "a", "node-0").replace("app: a", "app: other"))?;
    ensure!(lab.pod_ip("default", "a")? == a_ip, "a keeps its IP");
    let out = trace("default/a", "default/b", "80", "tcp")?;
    ensure!(
        out.status.code() == Some(1),
        "a no longer matches the peer selector"
    );

    // Bad input: refused by apply naming the field; nothing of the request is applied.
    let bad = POLICY.replace("b-from-a", "bad").replace(
        "{podSelector: {matchLabels: {app: a}}}",
        "{ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24]}}",
    );
    let out = lab.ferrum(
        &["apply", "-f", "-"],
        Some(&[pod_yaml("default", "d", "node-0"), bad].join("---\n")),
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "bad policy refused");
    ensure!(
        err.contains("spec.ingress[0].from[0].ipBlock.except[0]"),
        "{err}"
    );
    let pods = lab.ferrum_ok(&["get", "pods", "-n", "default"])?;
    ensure!(
        !pods.lines().any(|l| l.starts_with("d ")),
        "pod d not created: {pods}"
    );
    Ok(())
}
