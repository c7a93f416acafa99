//! Loader lifecycle: map CRUD, pinned maps reused by a second loader (agent restart), tcx
//! links pinned, adopted without duplication, detached, and a pin directory removed.

mod bpf_support;

use std::net::Ipv4Addr;

use anyhow::Result;
use aya::programs::{SchedClassifier, TcAttachType};
use bpf_support::{Netns, PinDir, ifindex};
use ferrum_datapath::bpf::{
    Datapath, DatapathError, EndpointInfo, IpcacheEntry, PeerKind, remove_pins,
};

fn tcx_programs(ifname: &str, attach: TcAttachType) -> usize {
    SchedClassifier::query_tcx(ifname, attach)
        .map(|(_, progs)| progs.len())
        .unwrap_or(0)
}

#[test]
fn maps_round_trip_and_survive_a_reopen() -> Result<()> {
    let pins = PinDir::new();
    let mut dp = Datapath::open(&pins.path)?;
    let ep = EndpointInfo {
        ifindex: 7,
        pod_mac: [2, 0, 0, 0, 0, 1],
        host_mac: [2, 0, 0, 0, 0, 2],
    };
    dp.upsert_endpoint(Ipv4Addr::new(10, 1, 0, 5), &ep)?;
    dp.upsert_endpoint(Ipv4Addr::new(10, 1, 0, 6), &ep)?;
    dp.remove_endpoint(Ipv4Addr::new(10, 1, 0, 6))?;
    dp.remove_endpoint(Ipv4Addr::new(10, 1, 0, 99))?; // absent: fine
    let remote = IpcacheEntry {
        tunnel_endpoint: Some(Ipv4Addr::new(10, 224, 0, 11)),
        kind: PeerKind::RemotePodBlock,
    };
    dp.upsert_ipcache("10.1.1.0/24".parse()?, &remote)?;
    dp.upsert_ipcache(
        "10.224.0.10/32".parse()?,
        &IpcacheEntry {
            tunnel_endpoint: None,
            kind: PeerKind::LocalNode,
        },
    )?;
    dp.remove_ipcache("10.9.0.0/16".parse()?)?; // absent: fine
    assert!(matches!(
        dp.upsert_ipcache("10.1.1.1/24".parse()?, &remote),
        Err(DatapathError::InvalidConfig(_))
    ));

    // A second loader (the restarted agent) sees the same pinned maps.
    let reopened = Datapath::open(&pins.path)?;
    assert_eq!(
        reopened.endpoints()?,
        vec![(Ipv4Addr::new(10, 1, 0, 5), ep)]
    );
    let ipcache = reopened.ipcache()?;
    assert_eq!(ipcache.len(), 2);
    assert_eq!(ipcache[0], ("10.1.1.0/24".parse()?, remote));
    dp.remove_ipcache("10.1.1.0/24".parse()?)?;
    assert_eq!(reopened.ipcache()?.len(), 1);
    Ok(())
}

#[test]
fn events_can_be_taken_once() -> Result<()> {
    let pins = PinDir::new();
    let mut dp = Datapath::open(&pins.path)?;
    let _reader = dp.take_events()?;
    assert!(matches!(dp.take_events(), Err(DatapathError::EventsTaken)));
    Ok(())
}

#[test]
fn pod_links_are_pinned_adopted_and_detached() -> Result<()> {
    let ns = Netns::new("fe-bpfl")?;
    ns.ip(&[
        "link",
        "add",
        "fe-pod1",
        "type",
        "veth",
        "peer",
        "name",
        "fe-pod1-p",
    ])?;
    ns.ip(&[
        "link", "add", "fe-vx", "type", "veth", "peer", "name", "fe-vx-p",
    ])?;
    ns.enter()?;
    let pins = PinDir::new();
    {
        let mut dp = Datapath::open(&pins.path)?;
        dp.attach_pod("fe-pod1")?;
        dp.attach_pod("fe-pod1")?; // idempotent
        dp.attach_overlay("fe-vx")?;
        assert_eq!(tcx_programs("fe-pod1", TcAttachType::Ingress), 1);
        assert_eq!(tcx_programs("fe-vx", TcAttachType::Ingress), 1);
        assert_eq!(tcx_programs("fe-vx", TcAttachType::Egress), 1);
        assert_eq!(dp.pinned_pod_links()?, vec!["fe-pod1".to_string()]);
    }
    // The loader is gone; the pinned links keep the programs attached.
    assert_eq!(tcx_programs("fe-pod1", TcAttachType::Ingress), 1);

    // A restarted agent adopts the links (moving them to its programs), no duplicates.
    let mut dp = Datapath::open(&pins.path)?;
    dp.attach_pod("fe-pod1")?;
    dp.attach_overlay("fe-vx")?;
    assert_eq!(tcx_programs("fe-pod1", TcAttachType::Ingress), 1);
    assert_eq!(tcx_programs("fe-vx", TcAttachType::Egress), 1);

    // A pod veth recreated under the same name: the stale pin is replaced by a working link.
    ns.ip(&["link", "del", "fe-pod1"])?;
    ns.ip(&[
        "link",
        "add",
        "fe-pod1",
        "type",
        "veth",
        "peer",
        "name",
        "fe-pod1-p",
    ])?;
    assert_eq!(tcx_programs("fe-pod1", TcAttachType::Ingress), 0);
    dp.attach_pod("fe-pod1")?;
    assert_eq!(tcx_programs("fe-pod1", TcAttachType::Ingress), 1);

    // The node's host device gets to_pod on egress, pinned with the device links.
    dp.attach_host_device("fe-vx-p")?;
    dp.attach_host_device("fe-vx-p")?; // idempotent
    assert_eq!(tcx_programs("fe-vx-p", TcAttachType::Egress), 1);
    // Older agents pinned to_pod on every pod veth (links/<veth>-egress); a new agent removes
    // those links. Made here by moving a link pin into that place (bpffs renames pins).
    dp.attach_host_device("fe-pod1")?;
    std::fs::rename(
        pins.path.join("links-dev/fe-pod1-egress"),
        pins.path.join("links/fe-pod1-egress"),
    )?;
    assert_eq!(tcx_programs("fe-pod1", TcAttachType::Egress), 1);
    assert_eq!(dp.pinned_pod_links()?, vec!["fe-pod1".to_string()]);
    assert_eq!(dp.remove_legacy_pod_links()?, 1);
    assert_eq!(tcx_programs("fe-pod1", TcAttachType::Egress), 0);
    assert_eq!(
        tcx_programs("fe-pod1", TcAttachType::Ingress),
        1,
        "from_pod stays"
    );
    assert_eq!(dp.remove_legacy_pod_links()?, 0);

    dp.detach_pod("fe-pod1")?;
    dp.detach_pod("fe-pod1")?; // absent: fine
    assert_eq!(tcx_programs("fe-pod1", TcAttachType::Ingress), 0);
    assert!(dp.pinned_pod_links()?.is_empty());

    // Lab down: removing the directory detaches the device programs too.
    drop(dp);
    remove_pins(&pins.path)?;
    assert!(!pins.path.exists());
    assert_eq!(tcx_programs("fe-vx", TcAttachType::Ingress), 0);
    assert_eq!(tcx_programs("fe-vx", TcAttachType::Egress), 0);
    assert_eq!(tcx_programs("fe-vx-p", TcAttachType::Egress), 0);
    Ok(())
}

#[test]
fn attaching_to_a_missing_interface_names_it() -> Result<()> {
    let ns = Netns::new("fe-bpfl")?;
    ns.enter()?;
    let pins = PinDir::new();
    let mut dp = Datapath::open(&pins.path)?;
    let err = dp.attach_pod("fe-missing").expect_err("no such interface");
    assert!(err.to_string().contains("fe-missing"), "{err}");
    assert!(dp.pinned_pod_links()?.is_empty());
    let _ = ifindex("lo")?;
    Ok(())
}
