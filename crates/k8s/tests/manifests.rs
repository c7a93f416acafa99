//! deploy/ stays true: the CRDs are what the Rust types generate, the Helm chart renders to
//! deploy/ferrum.yaml, the ClusterRole grants exactly the API calls the agent makes, and every
//! manifest passes the Kubernetes schemas (kubernetes-validate, strict).
//!
//! helm is not installable on the build machines (no Debian or registry package), so the
//! chart is kept to plain value substitution and rendered here; any other template construct
//! fails the test. `FERRUM_UPDATE_GENERATED=1 cargo test -p ferrum-k8s --test manifests`
//! rewrites the generated files.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use ferrum_k8s::source::API_CALLS;
use support::granted;

mod support;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    let p = repo().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Compares a generated file with its checked-in copy (or rewrites it on request).
fn check_generated(rel: &str, want: &str) {
    if std::env::var_os("FERRUM_UPDATE_GENERATED").is_some() {
        std::fs::write(repo().join(rel), want).unwrap();
        return;
    }
    assert!(
        read(rel) == want,
        "{rel} is out of date: run FERRUM_UPDATE_GENERATED=1 cargo test -p ferrum-k8s --test manifests"
    );
}

const RELEASE_NAMESPACE: &str = "ferrum-system";

/// Renders a chart template: `{{ .Values.x.y }}`, `{{ .Release.Namespace }}`,
/// `{{ .Chart.AppVersion }}`, each optionally `| quote`.
fn render(template: &str, values: &serde_yaml::Value, chart: &serde_yaml::Value) -> String {
    let scalar = |v: &serde_yaml::Value, expr: &str| -> String {
        match v {
            serde_yaml::Value::String(s) => s.clone(),
            serde_yaml::Value::Number(n) => n.to_string(),
            serde_yaml::Value::Bool(b) => b.to_string(),
            other => panic!("{{{{ {expr} }}}} is not a scalar: {other:?}"),
        }
    };
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find("}}").expect("unclosed {{") + start;
        let expr = rest[start + 2..end].trim();
        let (path, quote) = match expr.split_once('|') {
            Some((p, f)) if f.trim() == "quote" => (p.trim(), true),
            Some(_) => panic!("unsupported template function in {{{{ {expr} }}}}"),
            None => (expr, false),
        };
        let value = if path == ".Release.Namespace" {
            RELEASE_NAMESPACE.to_string()
        } else if path == ".Chart.AppVersion" {
            scalar(&chart["appVersion"], path)
        } else if let Some(p) = path.strip_prefix(".Values.") {
            let mut v = values;
            for key in p.split('.') {
                v = v
                    .get(key)
                    .unwrap_or_else(|| panic!("values.yaml has no {p}"));
            }
            scalar(v, path)
        } else {
            panic!("unsupported template construct {{{{ {expr} }}}}")
        };
        if quote {
            out.push_str(&serde_json::to_string(&value).unwrap());
        } else {
            out.push_str(&value);
        }
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    out
}

fn rendered_chart() -> String {
    let values: serde_yaml::Value =
        serde_yaml::from_str(&read("deploy/chart/ferrum/values.yaml")).unwrap();
    let chart: serde_yaml::Value =
        serde_yaml::from_str(&read("deploy/chart/ferrum/Chart.yaml")).unwrap();
    let mut out = String::from(
        "# Generated: the Helm chart in deploy/chart/ferrum rendered with its default values and\n# namespace ferrum-system; do not edit (see crates/k8s/tests/manifests.rs).\n",
    );
    out.push_str(&render(
        &read("deploy/chart/ferrum/templates/ferrum.yaml"),
        &values,
        &chart,
    ));
    out
}

fn documents(text: &str) -> Vec<serde_yaml::Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

#[test]
fn crds_are_generated_from_the_rust_types() {
    let yaml = ferrum_k8s::crd::crd_yaml().unwrap();
    check_generated("deploy/crds.yaml", &yaml);
    check_generated("deploy/chart/ferrum/crds/crds.yaml", &yaml);
}

#[test]
fn the_chart_renders_deploy_ferrum_yaml() {
    check_generated("deploy/ferrum.yaml", &rendered_chart());
    let kinds: Vec<String> = documents(&rendered_chart())
        .iter()
        .map(|d| d["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        kinds,
        [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet"
        ]
    );
}

#[test]
fn rbac_grants_exactly_the_api_calls_the_agent_makes() {
    let calls: BTreeSet<(String, String, String)> = API_CALLS
        .iter()
        .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()))
        .collect();
    assert_eq!(
        granted(),
        calls,
        "deploy/ RBAC vs crates/k8s/src/source.rs API_CALLS"
    );
    // The ServiceAccount the DaemonSet runs as is the one bound.
    let docs = documents(&read("deploy/ferrum.yaml"));
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let binding = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRoleBinding")
        .unwrap();
    assert_eq!(
        ds["spec"]["template"]["spec"]["serviceAccountName"],
        binding["subjects"][0]["name"]
    );
}

#[test]
fn manifests_pass_the_kubernetes_schemas() {
    let files = ["deploy/ferrum.yaml", "deploy/crds.yaml"];
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", "1.34.0"])
        .args(files.iter().map(|f| repo().join(f)))
        .output()
        .expect("kubernetes-validate is missing: run scripts/install-deps.sh (pip install kubernetes-validate)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    // Every object was checked against a schema (none skipped as unknown).
    assert!(!text.contains("Couldn't find schema"), "{text}");
    for object in [
        "namespace/ferrum-system",
        "serviceaccount/ferrum-agent",
        "clusterrole/ferrum-agent",
        "clusterrolebinding/ferrum-agent",
        "configmap/ferrum-config",
        "daemonset/ferrum-agent",
        "customresourcedefinition/ferrumnodes.ferrum.dev",
        "customresourcedefinition/ferrumippools.ferrum.dev",
    ] {
        assert!(
            text.contains(&format!("passed for resource {object}")),
            "{object} not validated:\n{text}"
        );
    }
}

#[test]
fn the_example_pool_is_a_valid_ferrum_ip_pool() {
    // No schema for our own kinds in kubernetes-validate: decode it with the CRD's Rust type
    // and plan a batch from it instead.
    let pool: ferrum_k8s::crd::FerrumIPPool =
        serde_yaml::from_str(&read("deploy/ippool.yaml")).unwrap();
    let batches = ferrum_k8s::pool::plan_batches(&pool.spec, "node-1", 1).unwrap();
    assert_eq!(batches[0].to_string(), "10.241.0.0/28");
}
