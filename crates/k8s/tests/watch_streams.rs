//! The Kubernetes Source against recorded API-server responses served through the real kube
//! client: initial listing, bookmarks, 410 Gone and relist, deletes of unknown objects, an
//! object the agent cannot handle (Event, not a crash), and the node status report.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrum_k8s::KubeSource;
use ferrum_model::{AgentReport, Object, Source, WatchEvent};
use support::{MockApi, Reply, recorded, recorded_stream};

const NODES: &str = "/api/v1/nodes";

fn describe(e: &WatchEvent) -> String {
    let obj = |o: &Object| {
        format!(
            "{}@{}",
            o.name(),
            o.metadata().resource_version.as_deref().unwrap_or("")
        )
    };
    match e {
        WatchEvent::Upsert { object } => format!("upsert {}", obj(object)),
        WatchEvent::Delete { object } => format!("delete {}", obj(object)),
        WatchEvent::Relist => "relist".into(),
        WatchEvent::Synced { .. } => "synced".into(),
    }
}

/// Reads events until `done` holds for the ones read so far (or fails after a while).
fn read_until(src: &mut KubeSource, done: impl Fn(&[String]) -> bool) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = Vec::new();
    while !done(&got) {
        assert!(
            Instant::now() < deadline,
            "timed out; events so far: {got:?}"
        );
        if let Some(e) = src.next_event_timeout(Duration::from_millis(200)).unwrap() {
            got.push(describe(&e));
        }
    }
    got
}

fn wait_for(api: &MockApi, what: &str, pred: impl Fn(&support::Seen) -> bool) -> support::Seen {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = api.seen().into_iter().find(|s| pred(s)) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} request; seen: {:#?}",
            api.seen()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn recorded_watch_streams_through_the_real_client() {
    let api = MockApi::default();
    api.on(
        "GET",
        NODES,
        false,
        Reply::Json(200, recorded("nodes-list-1.json")),
    )
    .on(
        "GET",
        NODES,
        true,
        Reply::Watch(recorded_stream("nodes-watch-1.jsonl")),
    )
    .on(
        "GET",
        NODES,
        true,
        Reply::Watch(recorded_stream("nodes-watch-2-gone.jsonl")),
    )
    .on(
        "GET",
        NODES,
        false,
        Reply::Json(200, recorded("nodes-list-2.json")),
    )
    .on(
        "GET",
        NODES,
        true,
        Reply::Watch(recorded_stream("nodes-watch-3-bad.jsonl")),
    )
    .on(
        "GET",
        "/api/v1/pods",
        false,
        Reply::Json(200, recorded("pods-list-1.json")),
    );
    // The node status report: the FerrumNode does not exist yet, so create, then patch.
    let status_path = "/apis/ferrum.dev/v1alpha1/ferrumnodes/a/status";
    api.on(
        "PATCH",
        status_path,
        false,
        Reply::Json(
            404,
            support::status(404, "NotFound", "ferrumnodes \"a\" not found"),
        ),
    )
    .on(
        "POST",
        "/apis/ferrum.dev/v1alpha1/ferrumnodes",
        false,
        Reply::Echo(201),
    )
    .on(
        "PATCH",
        status_path,
        false,
        Reply::Json(
            200,
            serde_json::json!({
                "apiVersion": "ferrum.dev/v1alpha1", "kind": "FerrumNode",
                "metadata": {"name": "a", "resourceVersion": "50"},
                "spec": {"podCIDRs": []},
                "status": {"ready": true, "realizedRevision": 3}
            }),
        ),
    );
    api.on(
        "POST",
        "/apis/events.k8s.io/v1/namespaces/default/events",
        false,
        Reply::Echo(201),
    );

    let mock = api.clone();
    let mut src = KubeSource::start(Arc::new(move || Ok(mock.client())), "a").unwrap();

    // The initial listing of every kind closes with one Synced.
    let initial = read_until(&mut src, |g| g.last().is_some_and(|l| l == "synced"));
    // Of the pods, only the valid one is passed on (the others ask for protocol ICMP).
    assert_eq!(initial, ["upsert a@5", "upsert web@7", "synced"]);

    // Watch 1: b added, a delete of a node never seen (ignored), a modified, a bookmark, end;
    // watch 2 resumes from the bookmark's resourceVersion and gets 410 Gone; the relist
    // replaces the state exactly (b gone, c new, a unchanged), then watch 3 brings a node with
    // an invalid podCIDR (rejected) and a good one.
    let got = read_until(&mut src, |g| g.iter().any(|e| e == "upsert d@42"));
    let changes: Vec<&str> = got
        .iter()
        .map(String::as_str)
        .filter(|e| *e != "synced")
        .collect();
    assert_eq!(
        changes,
        [
            "upsert b@11",
            "upsert a@13",
            "delete b@11",
            "upsert c@36",
            "upsert d@42"
        ]
    );
    let last = read_until(&mut src, |g| g.last().is_some_and(|l| l == "synced"));
    assert!(last.len() <= 1, "{last:?}");

    let watches: Vec<_> = api
        .seen()
        .into_iter()
        .filter(|s| s.path == NODES && s.is_watch())
        .collect();
    assert!(watches.len() >= 3, "{watches:#?}");
    assert_eq!(watches[0].param("resourceVersion").as_deref(), Some("10"));
    assert_eq!(
        watches[0].param("allowWatchBookmarks").as_deref(),
        Some("true")
    );
    assert_eq!(
        watches[1].param("resourceVersion").as_deref(),
        Some("20"),
        "resumes at the bookmark"
    );
    assert_eq!(
        watches[2].param("resourceVersion").as_deref(),
        Some("40"),
        "after the relist"
    );
    let lists = api
        .seen()
        .into_iter()
        .filter(|s| s.path == NODES && !s.is_watch())
        .count();
    assert_eq!(lists, 2, "one listing at start, one after 410 Gone");

    // The pod on this node with an unsupported protocol is reported on the object as a Warning
    // Event naming the field. The one on node c and the bad Node are left to their own
    // agents (one Event per object in the cluster, not one per node): only logged here.
    let is_event = |s: &support::Seen| s.method == "POST" && s.path.ends_with("/events");
    let event = wait_for(&api, "Event", is_event);
    let event: serde_json::Value = serde_json::from_str(&event.body).unwrap();
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "FerrumRejected");
    assert_eq!(event["regarding"]["name"], "icmp");
    assert_eq!(event["regarding"]["kind"], "Pod");
    let note = event["note"].as_str().unwrap();
    assert!(
        note.contains("spec.containers[0].ports[0].protocol"),
        "{note}"
    );
    assert!(note.contains("ICMP"), "{note}");
    assert_eq!(api.seen().iter().filter(|s| is_event(s)).count(), 1);

    // The agent's report becomes the FerrumNode status (created first when missing).
    src.report(&AgentReport {
        node: "a".into(),
        ready: true,
        realized_revision: 3,
        message: String::new(),
    })
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status_writes = || -> Vec<support::Seen> {
        api.seen()
            .into_iter()
            .filter(|s| s.path == status_path)
            .collect()
    };
    while status_writes().len() < 2 {
        assert!(Instant::now() < deadline, "seen: {:#?}", api.seen());
        std::thread::sleep(Duration::from_millis(50));
    }
    // 404, then the FerrumNode is created, then the status patched.
    let methods: Vec<String> = api
        .seen()
        .into_iter()
        .filter(|s| s.path.starts_with("/apis/ferrum.dev"))
        .map(|s| format!("{} {}", s.method, s.path))
        .collect();
    assert_eq!(
        methods,
        [
            format!("PATCH {status_path}"),
            "POST /apis/ferrum.dev/v1alpha1/ferrumnodes".to_string(),
            format!("PATCH {status_path}")
        ]
    );
    let body: serde_json::Value = serde_json::from_str(&status_writes()[1].body).unwrap();
    assert_eq!(body["status"]["realizedRevision"], 3);
    assert_eq!(body["status"]["ready"], true);

    // The same report again changes nothing on the server.
    let before = api.seen().len();
    src.report(&AgentReport {
        node: "a".into(),
        ready: true,
        realized_revision: 3,
        message: String::new(),
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        api.seen()
            .iter()
            .skip(before)
            .filter(|s| s.path == status_path)
            .count(),
        0
    );

    assert_eq!(
        api.seen().iter().filter(|s| is_event(s)).count(),
        1,
        "still one Event"
    );
    // The expected calls were made, and every call the source made is allowed by deploy/'s
    // least-privilege RBAC.
    api.assert_calls_made(&[
        ("", "nodes", "list"),
        ("", "pods", "watch"),
        ("events.k8s.io", "events", "create"),
        ("ferrum.dev", "ferrumnodes/status", "patch"),
    ]);
    support::assert_rbac_allows(&api.seen());
}
