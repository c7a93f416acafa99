//! End-to-end test of flow observability on one shared lab: `ferrum observe` (merge, filters,
//! formats, --follow), each agent's Prometheus endpoint (checked by promtool) at the URL
//! `lab status` gives, and the web service map in headless Chromium inside a node's netns.

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ferrum_datapath::netns::run_in_netns;
use ferrum_e2e::{Lab, bin, bin_dir, pod_yaml};
use serde_json::Value;

/// A TCP connection from inside `netns`; Ok(true) if it was accepted.
fn connect(netns: &Path, ip: Ipv4Addr, port: u16) -> Result<bool> {
    run_in_netns(netns, move || {
        match TcpStream::connect_timeout(&SocketAddr::from((ip, port)), Duration::from_secs(1)) {
            Ok(mut s) => {
                let mut out = String::new();
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.read_to_string(&mut out);
                true
            }
            Err(_) => false,
        }
    })
    .map_err(Into::into)
}

/// `ferrum observe ARGS -o json`: the flows (Hubble's GetFlowsResponse lines).
fn observe_json(lab: &Lab, args: &[&str]) -> Result<Vec<Value>> {
    let mut full = vec!["observe", "-o", "json"];
    full.extend_from_slice(args);
    lab.ferrum_ok(&full)?
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("flow line {l:?}")))
        .collect()
}

/// Polls until `pred` holds for some flow (flows reach the agent asynchronously).
fn wait_for_flow(lab: &Lab, args: &[&str], pred: impl Fn(&Value) -> bool) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let flows = observe_json(lab, args)?;
        if let Some(f) = flows.iter().find(|f| pred(&f["flow"])) {
            return Ok(f["flow"].clone());
        }
        if Instant::now() > deadline {
            bail!("no matching flow in {:#?}", flows);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn http_get(netns: &Path, url: &str) -> Result<String> {
    let rest = url.strip_prefix("http://").context("http URL")?;
    let (host, path) = rest.split_once('/').context("URL path")?;
    let addr: SocketAddr = host.parse().context("URL host:port")?;
    let path = format!("/{path}");
    run_in_netns(netns, move || -> Result<String> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(ferrum_flow::client::get(s, &path)?)
    })?
}

fn chromium(netns: &Path, args: &[&str], profile: &Path) -> Result<String> {
    let out = Command::new("timeout")
        .arg("90")
        .arg("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args([
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=6000",
            "--window-size=1400,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .context("running chromium (Debian package chromium)")?;
    ensure!(
        out.status.success(),
        "chromium {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn flows_metrics_and_service_map_on_a_live_lab() -> Result<()> {
    let lab = Lab::up(2, &[])?;
    lab.apply(
        &[
            pod_yaml("default", "a", "node-0"),
            pod_yaml("default", "b", "node-1"),
        ]
        .join("---\n"),
    )?;
    let a_ns = lab.pod_netns("default", "a")?;
    let b_ip = lab.pod_ip("default", "b")?;
    let a_ip = lab.pod_ip("default", "a")?;
    // An address in a's node block that no pod has: the datapath drops it (UNKNOWN_ENDPOINT).
    let denied = Ipv4Addr::from((u32::from(a_ip) & !0xff) | 250);
    ensure!(connect(&a_ns, b_ip, 80)?, "a reaches b across nodes");

    // 1. Flow records, merged from both nodes, with Hubble's field names.
    let fwd = wait_for_flow(&lab, &["--last", "200"], |f| {
        f["verdict"] == "FORWARDED"
            && f["source"]["pod_name"] == "a"
            && f["destination"]["pod_name"] == "b"
            && f["l4"]["TCP"]["destination_port"] == 80
            && f["l4"]["TCP"]["flags"]["SYN"] == true
            && f["trace_observation_point"] == "TO_ENDPOINT"
    })?;
    assert_eq!(fwd["node_name"], "node-1", "delivered on b's node");
    assert_eq!(fwd["destination"]["node_name"], "node-1");
    assert_eq!(fwd["source"]["namespace"], "default");
    assert_eq!(fwd["IP"]["source"], a_ip.to_string());
    assert!(
        fwd["source"]["labels"]
            .as_array()
            .is_some_and(|l| l.contains(&Value::from("k8s:app=a")))
    );
    assert_eq!(fwd["Type"], "L3_L4");
    assert_eq!(fwd["is_reply"], false);
    let all = observe_json(&lab, &["--last", "200"])?;
    let times: Vec<&str> = all.iter().filter_map(|f| f["time"].as_str()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "merged by time");
    for node in ["node-0", "node-1"] {
        assert!(
            all.iter().any(|f| f["node_name"] == node),
            "flows from {node}"
        );
    }

    // A denied connection shows up as a DROPPED flow with its reason.
    ensure!(!connect(&a_ns, denied, 80)?, "{denied} is not reachable");
    let dropped = wait_for_flow(&lab, &["--verdict", "DROPPED"], |f| {
        f["IP"]["destination"] == denied.to_string()
    })?;
    assert_eq!(dropped["drop_reason_desc"], "UNKNOWN_ENDPOINT");
    assert_eq!(dropped["event_type"]["type"], 1);
    assert_eq!(dropped["source"]["pod_name"], "a");
    assert_eq!(dropped["traffic_direction"], "EGRESS");

    // Traffic through a ClusterIP names its Service.
    lab.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web-b, namespace: default}\n\
         spec: {selector: {app: b}, ports: [{port: 8080, targetPort: 80}]}\n",
    )?;
    let list: Value = serde_json::from_str(&lab.ferrum_ok(&["get", "services", "-o", "json"])?)?;
    let vip: Ipv4Addr = list["items"]
        .as_array()
        .and_then(|items| items.iter().find(|s| s["metadata"]["name"] == "web-b"))
        .and_then(|s| s["spec"]["clusterIP"].as_str())
        .with_context(|| format!("no clusterIP for web-b in {list}"))?
        .parse()?;
    ensure!(
        connect(&a_ns, vip, 8080)?,
        "a reaches b through its ClusterIP"
    );
    let translated = wait_for_flow(&lab, &["--service", "default/web-b"], |f| {
        f["source"]["pod_name"] == "a" && f["destination"]["pod_name"] == "b"
    })?;
    assert_eq!(translated["destination_service"]["name"], "web-b");
    assert_eq!(translated["destination_service"]["namespace"], "default");
    // Its replies, translated back to the ClusterIP, come from the Service.
    let reply = wait_for_flow(&lab, &["--service", "default/web-b"], |f| {
        f["is_reply"] == true && f["destination"]["pod_name"] == "a"
    })?;
    assert_eq!(reply["source_service"]["name"], "web-b");
    assert_eq!(reply["IP"]["source"], vip.to_string());

    // 2. Filters select, and bad ones name the flag.
    for (args, pred) in [
        (
            vec!["--verdict", "DROPPED"],
            (|f: &Value| f["verdict"] == "DROPPED") as fn(&Value) -> bool,
        ),
        (
            vec!["--to-pod", "default/b", "--protocol", "tcp", "--port", "80"],
            |f| f["destination"]["pod_name"] == "b" && f["l4"]["TCP"].is_object(),
        ),
        (vec!["--label", "app=b", "--type", "trace"], |f| {
            (f["source"]["pod_name"] == "b" || f["destination"]["pod_name"] == "b")
                && f["event_type"]["type"] == 4
        }),
        (vec!["--ip", "10.244.0.0/16", "--node", "node-0"], |f| {
            f["node_name"] == "node-0"
        }),
        (vec!["--namespace", "default", "--from-pod", "a"], |f| {
            f["source"]["pod_name"] == "a"
        }),
    ] {
        let mut full = vec!["--last", "100"];
        full.extend(args.iter().copied());
        let flows = observe_json(&lab, &full)?;
        ensure!(!flows.is_empty(), "{args:?} matched nothing");
        for f in &flows {
            ensure!(pred(&f["flow"]), "{args:?} let through {f}");
        }
    }
    assert!(observe_json(&lab, &["--service", "nope"])?.is_empty());
    let bad = lab.ferrum(&["observe", "--port", "http"], None)?;
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--port"),
        "{bad:?}"
    );
    let table = lab.ferrum_ok(&["observe", "-o", "table", "--to-pod", "b"])?;
    assert!(
        table.starts_with("TIMESTAMP") && table.contains("default/b:80"),
        "{table}"
    );
    let compact = lab.ferrum_ok(&["observe", "--from-pod", "a", "--verdict", "DROPPED"])?;
    assert!(
        compact.contains(&format!("-> {denied}:80"))
            && compact.contains("UNKNOWN_ENDPOINT DROPPED"),
        "{compact}"
    );

    // --follow prints flows as they happen.
    let mut follow = Command::new(bin("ferrum")?)
        .args([
            "--name", &lab.name, "observe", "--follow", "--last", "0", "-o", "json",
        ])
        .args(["--verdict", "DROPPED", "--port", "81"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = follow.stdout.take().context("follow stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    connect(&a_ns, denied, 81)?;
    let line = rx.recv_timeout(Duration::from_secs(10));
    let _ = follow.kill();
    let _ = follow.wait();
    let line = line.context("--follow printed the new drop")?;
    let followed: Value = serde_json::from_str(&line)?;
    assert_eq!(followed["flow"]["l4"]["TCP"]["destination_port"], 81);

    // 3. Metrics at the URL lab status gives, from inside the node's netns; promtool agrees.
    let status = lab.status()?;
    let node0 = &status["nodes"][0];
    let url = node0["metrics"].as_str().context("nodes[].metrics")?;
    let netns = lab.node_netns(node0["name"].as_str().context("node name")?);
    let text = http_get(&netns, url)?;
    for family in [
        "ferrum_flows_processed_total{verdict=\"FORWARDED\"",
        "ferrum_drops_total{reason=\"UNKNOWN_ENDPOINT\",direction=\"EGRESS\"}",
        "ferrum_policy_verdicts_total",
        "ferrum_endpoints 1",
        "ferrum_identities",
        "ferrum_services",
        "ferrum_service_backends",
        "ferrum_bpf_map_fill_ratio{map=\"ferrum_ipcache\"}",
        "ferrum_conntrack_entries",
        "ferrum_reconcile_duration_seconds_bucket",
        "ferrum_datapath_events_lost_total 0",
    ] {
        assert!(text.contains(family), "metrics lack {family}:\n{text}");
    }
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running promtool (Debian package prometheus)")?;
    std::io::Write::write_all(
        &mut promtool.stdin.take().context("stdin")?,
        text.as_bytes(),
    )?;
    let out = promtool.wait_with_output()?;
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // 4. The service map in headless Chromium, on loopback inside node-0's netns.
    let profile = tempfile_dir("fe-chromium")?;
    let page = "http://127.0.0.1:9962/";
    let fresh = Ipv4Addr::from((u32::from(a_ip) & !0xff) | 251);
    let before = chromium(&netns, &["--dump-dom", page], &profile.0)?;
    assert!(
        before.contains("data-pod=\"default/a\"") && before.contains("data-pod=\"default/b\""),
        "{before}"
    );
    assert!(before.contains("class=\"edge FORWARDED\""), "a->b edge");
    assert!(!before.contains(&format!("{fresh}:80")), "not yet denied");
    ensure!(!connect(&a_ns, fresh, 80)?, "{fresh} is not reachable");
    wait_for_flow(&lab, &["--verdict", "DROPPED"], |f| {
        f["IP"]["destination"] == fresh.to_string()
    })?;
    let after = chromium(&netns, &["--dump-dom", page], &profile.0)?;
    assert!(
        after.contains(&format!("<td>{fresh}:80</td>")) && after.contains("<tr class=\"DROPPED\">"),
        "the denied flow is in the table"
    );
    assert!(
        after.contains(&format!("data-dst=\"{fresh}\"")),
        "and on the map"
    );
    let artifacts = bin_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("target"))
        .join("artifacts");
    std::fs::create_dir_all(&artifacts)?;
    let shot = artifacts.join("service-map.png");
    chromium(
        &netns,
        &[&format!("--screenshot={}", shot.display()), page],
        &profile.0,
    )?;
    assert!(
        std::fs::metadata(&shot)?.len() > 10_000,
        "screenshot at {}",
        shot.display()
    );
    Ok(())
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

fn tempfile_dir(prefix: &str) -> Result<TempDir> {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(TempDir(dir))
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
