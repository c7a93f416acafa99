//! NetworkPolicy apply-to-enforced on a live lab: the time from sending a policy change to the
//! control plane until every node's agent reports its datapath realized it (what `ferrum
//! apply` waits for), for a series of changes to one policy.

use std::time::Instant;

use anyhow::{Context, Result};
use ferrum_lab::client::LabClient;

use super::check_interrupted;
use crate::Lab;

fn policy(round: usize) -> String {
    format!(
        r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: bench-policy, namespace: default}}
spec:
  podSelector: {{matchLabels: {{app: bench-b}}}}
  ingress:
  - from: [{{podSelector: {{matchLabels: {{app: bench-a}}}}}}, {{ipBlock: {{cidr: 192.0.2.0/24}}}}]
    ports: [{{port: {}}}, {{port: 9000, endPort: 9100}}]
"#,
        1000 + round
    )
}

/// Milliseconds per change, `count` changes (the policy is deleted afterwards).
pub fn apply_to_enforced(lab: &Lab, count: usize) -> Result<Vec<f64>> {
    let client = LabClient::new(lab.paths.cp_socket());
    let mut samples = Vec::with_capacity(count);
    for round in 0..count {
        check_interrupted()?;
        let objects = ferrum_model::parse_documents(&policy(round))?;
        let start = Instant::now();
        client
            .apply(objects, true)
            .context("applying the benchmark policy")?;
        samples.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let refs = ferrum_model::parse_documents(&policy(0))?
        .iter()
        .map(ferrum_model::ObjectRef::of)
        .collect();
    client
        .delete(refs, true)
        .context("deleting the benchmark policy")?;
    Ok(samples)
}
