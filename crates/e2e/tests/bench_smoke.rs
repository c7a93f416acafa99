//! Runs `ferrum-bench` with tiny settings so the benchmark cannot rot: every metric must be in
//! the JSON with a positive value. It asserts nothing about performance.

use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Every metric the benchmark promises (compared metrics carry a baseline too).
const COMPARED: &[&str] = &[
    "same_node_tcp_throughput",
    "same_node_tcp_rr_mean",
    "same_node_tcp_rr_p50",
    "same_node_tcp_rr_p99",
    "cross_node_tcp_throughput",
    "cross_node_tcp_rr_mean",
    "cross_node_tcp_rr_p50",
    "cross_node_tcp_rr_p99",
    "cross_node_kernel_routed_tcp_throughput",
    "cross_node_kernel_routed_tcp_rr_p50",
    "cross_node_kernel_routed_tcp_rr_p99",
];
const ABSOLUTE: &[&str] = &[
    "same_node_tcp_throughput_paired_ratio",
    "cross_node_tcp_throughput_paired_ratio",
    "cni_add_p50",
    "cni_add_p99",
    "cni_add_max",
    "cni_del_p50",
    "cni_del_p99",
    "cni_del_max",
    "policy_apply_to_enforced_p50",
    "policy_apply_to_enforced_p99",
    "policy_apply_to_enforced_max",
];

fn positive(metric: &Value, field: &str) -> Result<f64> {
    let v = metric[field]
        .as_f64()
        .with_context(|| format!("{field} missing in {metric}"))?;
    if !(v.is_finite() && v > 0.0) {
        bail!("{field} is not a positive number in {metric}");
    }
    Ok(v)
}

#[test]
fn bench_runs_and_reports_every_metric() -> Result<()> {
    let json = std::env::temp_dir().join(format!("ferrum-bench-smoke-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_ferrum-bench"))
        .args([
            "--duration",
            "1",
            "--rr-count",
            "200",
            "--pods",
            "5",
            "--policy-changes",
            "5",
            "--repeats",
            "1",
        ])
        .arg("--json")
        .arg(&json)
        .output()
        .context("running ferrum-bench")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "ferrum-bench exited with {}:\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    let _ = std::fs::remove_file(&json);
    let metrics = report["metrics"].as_array().context("metrics array")?;
    let find = |name: &str| {
        metrics
            .iter()
            .find(|m| m["name"] == name)
            .with_context(|| format!("metric {name} missing from the JSON"))
    };
    for name in COMPARED {
        let m = find(name)?;
        positive(m, "baseline")?;
        positive(m, "ferrum")?;
        positive(m, "ratio")?;
        assert!(stdout.contains(name), "table lacks {name}:\n{stdout}");
    }
    for name in ABSOLUTE {
        positive(find(name)?, "ferrum")?;
        assert!(stdout.contains(name), "table lacks {name}:\n{stdout}");
    }
    assert_eq!(metrics.len(), COMPARED.len() + ABSOLUTE.len());
    assert_eq!(report["settings"]["pods"], 5);
    for raw in ["cniAddMs", "cniDelMs", "policyApplyMs"] {
        let times = report["raw"][raw].as_array().context("raw times")?;
        assert_eq!(times.len(), 5, "{raw}: one time per pod or policy change");
    }
    Ok(())
}
