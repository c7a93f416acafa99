//! The README's first command, scripts/demo.sh, end to end: on a lab of its own (and its VNet
//! step's second lab), with the binaries this suite built. The demo prints what each step
//! shows; the checks below are the results a reader is told to expect. Root only.

use std::process::Command;

use anyhow::{Context, Result};
use ferrum_e2e::{Lab, bin_dir};
use ferrum_lab::profile::LabPaths;

/// Takes down a lab the demo brought up (the demo leaves its main lab running on purpose).
fn teardown_on_drop(name: &str) -> Result<Lab> {
    Ok(Lab {
        name: name.to_string(),
        paths: LabPaths::new(name)?,
    })
}

#[test]
fn the_demo_runs_end_to_end() -> Result<()> {
    let name = format!("dm{}", std::process::id() % 100_000);
    let _labs = [
        teardown_on_drop(&name)?,
        teardown_on_drop(&format!("vnet{name}"))?,
    ];
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let path = format!(
        "{}:{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("scripts/demo.sh")
        .current_dir(root)
        .env("PATH", path)
        .env("FERRUM_DEMO_LAB", &name)
        .env("FERRUM_DEMO_SKIP_BUILD", "1")
        .output()
        .context("run scripts/demo.sh")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo exited {:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status.code()
    );
    // `time` reports on stderr.
    let shown = format!("{stdout}{stderr}");
    for expected in [
        // Same node, across nodes, UDP.
        "nc -w 3 10.244.0.2 80\nweb-0\n",
        "nc -w 3 10.244.1.1 80\nweb-1\n",
        "nc -u -w 1 10.244.1.1 53'\nweb-1\n",
        // The external host sees the node's address.
        "external host: Connection received on 10.224.0.10 ",
        // The spoofed packet's drop, as a flow.
        "SPOOFED_IP  DROPPED",
        // A Service with no backend refuses at once (`time` shows under a second).
        "system 0:00.",
        // The policy drop names its policy.
        "\"ingress_denied_by\":[{\"kind\":\"NetworkPolicy\",\"name\":\"web-from-client\"",
        // VNet: the fabric routes the pod's address to its node.
        "via 10.224.0.11 dev",
        "== The lab keeps running",
    ] {
        assert!(
            shown.contains(expected),
            "the demo did not show {expected:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
        );
    }
    Ok(())
}
