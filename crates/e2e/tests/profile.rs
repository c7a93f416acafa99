//! The overlay profile end to end: a node that cannot get a /24 is refused (and nothing is
//! created), `lab update --pod-cidr` expands the pod CIDR without disturbing running pods, and
//! shrinking is refused naming both values.

use anyhow::Result;
use ferrum_e2e::{Lab, pod_yaml};

#[test]
fn overlay_pod_cidr_expands_without_disturbing_pods_and_never_shrinks() -> Result<()> {
    let lab = Lab::up(2, &["--pod-cidr", "10.244.0.0/23"])?;
    // A third node would need a third /24: refused before anything is built.
    let other = format!("{}x", &lab.name[..lab.name.len().min(14)]);
    let refused = std::process::Command::new(ferrum_e2e::bin("ferrum")?)
        .args([
            "--name",
            &other,
            "lab",
            "up",
            "--nodes",
            "3",
            "--pod-cidr",
            "10.244.0.0/23",
        ])
        .output()?;
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        err.contains("--pod-cidr 10.244.0.0/23") && err.contains("--nodes 3"),
        "{err}"
    );
    assert!(
        !std::path::Path::new("/run/netns")
            .join(ferrum_lab::profile::LabPaths::new(&other)?.fabric_netns())
            .exists()
    );

    lab.apply(
        &(pod_yaml("default", "a", "node-0") + "---\n" + &pod_yaml("default", "b", "node-1")),
    )?;
    let (a, b) = (lab.pod_ip("default", "a")?, lab.pod_ip("default", "b")?);
    let uid_a = lab.pod("default", "a")?["metadata"]["uid"].clone();

    lab.ferrum_ok(&["lab", "update", "--pod-cidr", "10.244.0.0/16"])?;
    let status = lab.status()?;
    assert_eq!(status["profile"]["podCidr"], "10.244.0.0/16");
    assert_eq!(status["nodes"][0]["podCIDR"], "10.244.0.0/24");
    assert_eq!(status["nodes"][1]["podCIDR"], "10.244.1.0/24");
    // Same pods, same addresses, still talking across nodes.
    assert_eq!(lab.pod_ip("default", "a")?, a);
    assert_eq!(lab.pod("default", "a")?["metadata"]["uid"], uid_a);
    assert_eq!(
        lab.exec("default", "a", &["nc", "-w", "3", &b.to_string(), "80"])?
            .1,
        "b\n"
    );

    for bad in ["10.244.0.0/20", "10.245.0.0/16"] {
        let out = lab.ferrum(&["lab", "update", "--pod-cidr", bad], None)?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains(bad) && err.contains("10.244.0.0/16"), "{err}");
    }
    assert_eq!(lab.status()?["profile"]["podCidr"], "10.244.0.0/16");
    Ok(())
}
