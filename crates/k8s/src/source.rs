//! [`KubeSource`]: the agent's [`Source`] backed by the Kubernetes API server. kube-rs
//! watchers (list, then watch with bookmarks; relist after 410 Gone; reconnect with backoff)
//! for every kind the model knows run on a small tokio runtime in their own thread; the
//! [`Merger`] turns them into the model's event stream. Objects that fail validation become a
//! Kubernetes Event on the object and a log line; the agent's reports land in the node's
//! FerrumNode status. In VNet mode it also watches the FerrumIPPool and the FerrumNodes and
//! passes them on as the NodeNetworkConfigs the agent consumes ([`crate::vnet`]), and its
//! [`IpRequester`] claims and releases batches in the pool.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use ferrum_model::{
    AgentReport, IpRequester, Kind, NncSpec, Object, Source, SourceError, WatchEvent,
};
use futures::stream::{BoxStream, SelectAll};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, ObjectReference, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serde::de::DeserializeOwned;

use crate::crd::{FerrumIPPool, FerrumNode, FerrumNodeSpec};
use crate::merge::{Merger, Rejected, event_reporter};
use crate::vnet::{VnetOptions, VnetView};

/// Name the agent reports Events and field managers under.
pub const CONTROLLER: &str = "ferrum-agent";
/// Status writes that only move realizedRevision are spaced at least this far apart.
const STATUS_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("reading kubeconfig {path}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("no in-cluster service account (not running in a pod?): pass --kubeconfig PATH")]
    InCluster(#[source] kube::config::InClusterError),
    #[error("building the Kubernetes client")]
    Client(#[source] kube::Error),
    #[error("starting the Kubernetes watch runtime")]
    Runtime(#[source] std::io::Error),
}

/// An error with its causes, for logs.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(&format!(": {c}"));
        cause = c.source();
    }
    out
}

/// The client configuration from a kubeconfig file, or from the pod's service account when
/// `kubeconfig` is None.
pub async fn config_from(kubeconfig: Option<&Path>) -> Result<kube::Config, ConnectError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc_err = |source| ConnectError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(kc_err)?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(kc_err)?
        }
        None => kube::Config::incluster().map_err(ConnectError::InCluster)?,
    };
    Ok(config)
}

type KindStream = BoxStream<'static, (Kind, Result<watcher::Event<Object>, watcher::Error>)>;

fn watch_kind<K>(client: &Client, kind: Kind, wrap: fn(K) -> Object) -> KindStream
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::ClusterResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    watch_api(Api::<K>::all(client.clone()), kind, wrap)
}

fn watch_namespaced<K>(client: &Client, kind: Kind, wrap: fn(K) -> Object) -> KindStream
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    watch_api(Api::<K>::all(client.clone()), kind, wrap)
}

fn watch_api<K>(api: Api<K>, kind: Kind, wrap: fn(K) -> Object) -> KindStream
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    // Bookmarks are on by default: the watch resumes from the newest resourceVersion instead
    // of relisting after the server closes an idle watch.
    watcher(api, watcher::Config::default())
        .default_backoff()
        .map(move |r| (kind, r.map(|ev| map_event(ev, wrap))))
        .boxed()
}

fn map_event<K>(ev: watcher::Event<K>, wrap: fn(K) -> Object) -> watcher::Event<Object> {
    match ev {
        watcher::Event::Apply(o) => watcher::Event::Apply(wrap(o)),
        watcher::Event::Delete(o) => watcher::Event::Delete(wrap(o)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(o) => watcher::Event::InitApply(wrap(o)),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// The API calls the source makes, as (apiGroup, resource, verb): deploy/'s RBAC must grant
/// exactly these (a test compares them).
pub const API_CALLS: &[(&str, &str, &str)] = &[
    ("", "pods", "list"),
    ("", "pods", "watch"),
    ("", "namespaces", "list"),
    ("", "namespaces", "watch"),
    ("", "services", "list"),
    ("", "services", "watch"),
    ("", "nodes", "get"),
    ("", "nodes", "list"),
    ("", "nodes", "watch"),
    ("discovery.k8s.io", "endpointslices", "list"),
    ("discovery.k8s.io", "endpointslices", "watch"),
    ("networking.k8s.io", "networkpolicies", "list"),
    ("networking.k8s.io", "networkpolicies", "watch"),
    ("events.k8s.io", "events", "create"),
    ("events.k8s.io", "events", "patch"),
    ("ferrum.dev", "ferrumnodes", "get"),
    ("ferrum.dev", "ferrumnodes", "list"),
    ("ferrum.dev", "ferrumnodes", "watch"),
    ("ferrum.dev", "ferrumnodes", "create"),
    ("ferrum.dev", "ferrumnodes", "update"),
    ("ferrum.dev", "ferrumnodes", "delete"),
    ("ferrum.dev", "ferrumnodes/status", "patch"),
    ("ferrum.dev", "ferrumippools", "get"),
    ("ferrum.dev", "ferrumippools", "list"),
    ("ferrum.dev", "ferrumippools", "watch"),
    ("ferrum.dev", "ferrumippools", "update"),
];

/// VNet mode: a change of the pool or of a FerrumNode.
enum CrdEvent {
    Pool(Result<watcher::Event<FerrumIPPool>, watcher::Error>),
    Node(Result<watcher::Event<FerrumNode>, watcher::Error>),
}

/// VNet mode's watches of Ferrum's own resources (never ending when VNet mode is off).
fn crd_streams(client: &Client, vnet: bool) -> BoxStream<'static, CrdEvent> {
    if !vnet {
        return futures::stream::pending().boxed();
    }
    futures::stream::select(
        watcher(
            Api::<FerrumIPPool>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .map(CrdEvent::Pool),
        watcher(
            Api::<FerrumNode>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .map(CrdEvent::Node),
    )
    .boxed()
}

fn all_streams(client: &Client) -> SelectAll<KindStream> {
    futures::stream::select_all([
        watch_kind::<Namespace>(client, Kind::Namespace, Object::Namespace),
        watch_kind::<Node>(client, Kind::Node, Object::Node),
        watch_namespaced::<Pod>(client, Kind::Pod, Object::Pod),
        watch_namespaced::<Service>(client, Kind::Service, Object::Service),
        watch_namespaced::<EndpointSlice>(client, Kind::EndpointSlice, Object::EndpointSlice),
        watch_namespaced::<NetworkPolicy>(client, Kind::NetworkPolicy, Object::NetworkPolicy),
    ])
}

/// A reference to `object` for an Event.
pub fn object_reference(object: &Object) -> ObjectReference {
    let kind = Kind::of(object);
    let meta = object.metadata();
    ObjectReference {
        api_version: Some(kind.api_version().to_string()),
        kind: Some(kind.name().to_string()),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        field_path: None,
    }
}

struct Pump {
    client: Client,
    node: String,
    events: mpsc::Sender<WatchEvent>,
    recorder: Recorder,
    /// (object, resourceVersion) already reported, so relists don't repeat Events.
    reported: HashSet<(String, String)>,
    last_status: Option<(AgentReport, Instant)>,
    /// VNet mode: the pool and FerrumNodes as NodeNetworkConfigs.
    vnet: Option<VnetView>,
    /// VNet mode: deleted nodes this agent has collected, until the watches stop showing them.
    collected: BTreeSet<String>,
}

impl Pump {
    async fn run(
        mut self,
        mut streams: SelectAll<KindStream>,
        mut crds: BoxStream<'static, CrdEvent>,
        mut reports: tokio::sync::mpsc::UnboundedReceiver<AgentReport>,
    ) {
        // NodeNetworkConfig is not a Kubernetes resource: in VNet mode it is made from the
        // FerrumIPPool and FerrumNodes (and holds up the first Synced until both are listed);
        // in overlay mode there is none.
        let vnet = self.vnet.is_some();
        let mut merger = Merger::new(
            Kind::ALL
                .into_iter()
                .filter(|k| vnet || *k != Kind::NodeNetworkConfig),
        );
        loop {
            tokio::select! {
                Some(event) = crds.next() => {
                    for e in self.on_crd(event, &mut merger).await {
                        if self.events.send(e).is_err() {
                            return;
                        }
                    }
                    self.collect_deleted_nodes(&merger).await;
                    if let Some(synced) = merger.flush()
                        && self.events.send(synced).is_err()
                    {
                        return;
                    }
                }
                next = streams.next() => {
                    let Some(first) = next else { return };
                    let mut batch = vec![first];
                    // Take everything already waiting, so one Synced closes the whole burst.
                    while let Some(Some(more)) = streams.next().now_or_never() {
                        batch.push(more);
                    }
                    let nodes_changed = batch.iter().any(|(kind, _)| *kind == Kind::Node);
                    for (kind, result) in batch {
                        match result {
                            Ok(event) => {
                                let out = merger.apply(kind, event);
                                for e in out.events {
                                    if self.events.send(e).is_err() {
                                        return;
                                    }
                                }
                                for r in out.rejected {
                                    let reporter = event_reporter(
                                        &r.object,
                                        merger.objects(Kind::Node).map(Object::name),
                                        &self.node,
                                    );
                                    self.reject(r, reporter == self.node).await;
                                }
                            }
                            Err(e) => tracing::warn!(kind = kind.name(), "Kubernetes watch failed: {e}; retrying with backoff"),
                        }
                    }
                    if let Some(synced) = merger.flush()
                        && self.events.send(synced).is_err()
                    {
                        return;
                    }
                    if nodes_changed {
                        self.collect_deleted_nodes(&merger).await;
                    }
                }
                Some(report) = reports.recv() => self.write_status(report).await,
            }
        }
    }

    /// VNet mode: applies a pool or FerrumNode change; when the NodeNetworkConfigs it amounts
    /// to changed, hands them to the merger as a complete listing (exact upserts and deletes).
    /// A pool change that frees a batch this node is still short of claims it.
    async fn on_crd(&mut self, event: CrdEvent, merger: &mut Merger) -> Vec<WatchEvent> {
        let Some(view) = self.vnet.as_mut() else {
            return Vec::new();
        };
        let pool_changed = matches!(event, CrdEvent::Pool(Ok(_)));
        match event {
            CrdEvent::Pool(Ok(e)) => view.apply_pool(e),
            CrdEvent::Node(Ok(e)) => view.apply_node(e),
            CrdEvent::Pool(Err(e)) | CrdEvent::Node(Err(e)) => {
                tracing::warn!(
                    "Kubernetes watch of Ferrum's resources failed: {e}; retrying with backoff"
                );
                return Vec::new();
            }
        }
        let mut out = Vec::new();
        if let Some(nncs) = view.changed() {
            let kind = Kind::NodeNetworkConfig;
            merger.apply(kind, watcher::Event::Init);
            for n in nncs {
                merger.apply(
                    kind,
                    watcher::Event::InitApply(Object::NodeNetworkConfig(n)),
                );
            }
            out = merger.apply(kind, watcher::Event::InitDone).events;
        }
        if pool_changed && view.shortfall() {
            let pools: Api<FerrumIPPool> = Api::all(self.client.clone());
            let nodes: Api<FerrumNode> = Api::all(self.client.clone());
            match crate::pool::top_up(&pools, &nodes, &self.node).await {
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(node = %self.node, "claiming batches freed in the pool failed: {}", chain(&e))
                }
            }
        }
        out
    }

    /// VNet mode: frees the batches and deletes the FerrumNode of every node that no longer
    /// exists, when this agent is the collector ([`VnetView::stale_nodes`]). Runs after Node
    /// and Ferrum resource changes (a watched delete, a relist that lost a node, a pool entry
    /// of an unknown node); a failure is retried at the next such change.
    async fn collect_deleted_nodes(&mut self, merger: &Merger) {
        let Some(view) = self.vnet.as_ref() else {
            return;
        };
        if !merger.listed(Kind::Node) {
            return;
        }
        let live: BTreeSet<String> = merger
            .objects(Kind::Node)
            .map(|o| o.name().to_string())
            .collect();
        let stale = view.stale_nodes(&live);
        self.collected.retain(|n| stale.contains(n));
        let pools: Api<FerrumIPPool> = Api::all(self.client.clone());
        let ferrum_nodes: Api<FerrumNode> = Api::all(self.client.clone());
        let nodes: Api<Node> = Api::all(self.client.clone());
        for node in stale {
            if self.collected.contains(&node) {
                continue;
            }
            match crate::pool::collect_node(&pools, &ferrum_nodes, &nodes, &node).await {
                Ok(c) if c.node_exists => {
                    tracing::debug!(node, "Node still exists (the watch lags): not collected")
                }
                Ok(c) => {
                    tracing::info!(node, batches = ?c.batches, ferrum_node_deleted = c.ferrum_node_deleted,
                        "collected a deleted node: its batches are back in the FerrumIPPool");
                    self.collected.insert(node);
                }
                Err(e) => tracing::warn!(
                    node,
                    "collecting a deleted node failed (retried at the next change): {}",
                    chain(&e)
                ),
            }
        }
    }

    /// Logs a rejected object; the agent chosen by [`event_reporter`] also records an Event.
    async fn reject(&mut self, r: Rejected, record: bool) {
        let meta = r.object.metadata();
        let id = (
            r.error.object.clone(),
            meta.resource_version.clone().unwrap_or_default(),
        );
        tracing::warn!(object = %r.error.object, field = %r.error.field, "ignoring an object the agent cannot handle: {}", r.error);
        if !record || !self.reported.insert(id) {
            return;
        }
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: "FerrumRejected".into(),
            note: Some(format!(
                "ferrum-agent on node {} ignores this object: {}: {}",
                self.node, r.error.field, r.error.message
            )),
            action: "Realize".into(),
            secondary: None,
        };
        if let Err(e) = self
            .recorder
            .publish(&event, &object_reference(&r.object))
            .await
        {
            tracing::warn!(object = %r.error.object, "could not record a Kubernetes Event: {e}");
        }
    }

    async fn write_status(&mut self, report: AgentReport) {
        let due = match &self.last_status {
            None => true,
            Some((last, at)) => {
                last.ready != report.ready
                    || last.message != report.message
                    || (last.realized_revision != report.realized_revision
                        && at.elapsed() >= STATUS_INTERVAL)
            }
        };
        if !due {
            return;
        }
        match patch_status(&self.client, &self.node, &report).await {
            Ok(()) => self.last_status = Some((report, Instant::now())),
            Err(e) => tracing::warn!(node = %self.node, "writing FerrumNode status failed: {e}"),
        }
    }
}

/// Writes the report into the node's FerrumNode status, creating the FerrumNode if missing.
pub async fn patch_status(
    client: &Client,
    node: &str,
    report: &AgentReport,
) -> Result<(), kube::Error> {
    let api: Api<FerrumNode> = Api::all(client.clone());
    let status = serde_json::json!({
        "status": {
            "ready": report.ready,
            "realizedRevision": report.realized_revision,
            "message": report.message,
        }
    });
    let params = PatchParams::default();
    match api
        .patch_status(node, &params, &Patch::Merge(&status))
        .await
    {
        Err(kube::Error::Api(s)) if s.code == 404 => {
            let object = FerrumNode::new(node, FerrumNodeSpec::default());
            match api.create(&PostParams::default(), &object).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(e),
            }
            api.patch_status(node, &params, &Patch::Merge(&status))
                .await
                .map(|_| ())
        }
        other => other.map(|_| ()),
    }
}

/// Makes the client, inside the watch thread's runtime (the client's request buffer runs as a
/// task of the runtime it was made in).
pub type ClientFactory = Arc<dyn Fn() -> Result<Client, ConnectError> + Send + Sync>;

/// The Kubernetes API server as a [`Source`].
pub struct KubeSource {
    factory: ClientFactory,
    node: String,
    vnet: Option<VnetOptions>,
    events: mpsc::Receiver<WatchEvent>,
    reports: tokio::sync::mpsc::UnboundedSender<AgentReport>,
}

impl KubeSource {
    /// Starts watching, with a client from `factory`, for the agent of `node` (overlay mode).
    pub fn start(factory: ClientFactory, node: &str) -> Result<Self, ConnectError> {
        Self::start_with(factory, node, None)
    }

    /// Starts watching; with `vnet`, also the FerrumIPPool and FerrumNodes (VNet mode: the
    /// node's addresses come as batches of the pool).
    pub fn start_with(
        factory: ClientFactory,
        node: &str,
        vnet: Option<VnetOptions>,
    ) -> Result<Self, ConnectError> {
        let (events, reports) = spawn_pump(factory.clone(), node, vnet)?;
        Ok(Self {
            factory,
            node: node.to_string(),
            vnet,
            events,
            reports,
        })
    }

    /// The next event if one comes within `timeout` (None otherwise).
    pub fn next_event_timeout(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<WatchEvent>, SourceError> {
        match self.events.recv_timeout(timeout) {
            Ok(e) => Ok(Some(e)),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => self.next_event().map(Some),
        }
    }

    /// Reads a kubeconfig (or the in-cluster config) and starts watching. A bad kubeconfig
    /// fails here, before the agent touches the node.
    pub fn connect(kubeconfig: Option<&Path>, node: &str) -> Result<Self, ConnectError> {
        Self::connect_with(kubeconfig, node, None)
    }

    /// [`KubeSource::connect`], in VNet mode when `vnet` is given.
    pub fn connect_with(
        kubeconfig: Option<&Path>,
        node: &str,
        vnet: Option<VnetOptions>,
    ) -> Result<Self, ConnectError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ConnectError::Runtime)?;
        let config = rt.block_on(config_from(kubeconfig))?;
        Self::start_with(
            Arc::new(move || Client::try_from(config.clone()).map_err(ConnectError::Client)),
            node,
            vnet,
        )
    }
}

type Channels = (
    mpsc::Receiver<WatchEvent>,
    tokio::sync::mpsc::UnboundedSender<AgentReport>,
);

fn spawn_pump(
    factory: ClientFactory,
    node: &str,
    vnet: Option<VnetOptions>,
) -> Result<Channels, ConnectError> {
    let (tx, rx) = mpsc::channel();
    let (report_tx, report_rx) = tokio::sync::mpsc::unbounded_channel();
    let node = node.to_string();
    std::thread::Builder::new()
        .name("kube-watch".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("cannot start the Kubernetes watch runtime: {e}");
                    return;
                }
            };
            rt.block_on(async move {
                let client = match factory() {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!("cannot make the Kubernetes client: {}", chain(&e));
                        return;
                    }
                };
                let recorder = Recorder::new(
                    client.clone(),
                    Reporter {
                        controller: CONTROLLER.into(),
                        instance: Some(node.clone()),
                    },
                );
                let streams = all_streams(&client);
                let crds = crd_streams(&client, vnet.is_some());
                let pump = Pump {
                    client,
                    vnet: vnet.map(|o| VnetView::new(&node, o)),
                    node,
                    events: tx,
                    recorder,
                    reported: HashSet::new(),
                    last_status: None,
                    collected: BTreeSet::new(),
                };
                pump.run(streams, crds, report_rx).await;
            });
        })
        .map_err(ConnectError::Runtime)?;
    Ok((rx, report_tx))
}

impl Source for KubeSource {
    fn next_event(&mut self) -> Result<WatchEvent, SourceError> {
        match self.events.recv() {
            Ok(e) => Ok(e),
            Err(mpsc::RecvError) => {
                // The watch thread ended (it only does on a bug): start over with a fresh
                // listing, which the consumer treats as the complete state.
                tracing::error!("the Kubernetes watch thread ended; restarting it in 1s");
                std::thread::sleep(Duration::from_secs(1));
                let (events, reports) = spawn_pump(self.factory.clone(), &self.node, self.vnet)
                    .map_err(|e| SourceError::Disconnected(chain(&e)))?;
                self.events = events;
                self.reports = reports;
                Ok(WatchEvent::Relist)
            }
        }
    }

    fn report(&mut self, report: &AgentReport) -> Result<(), SourceError> {
        self.reports
            .send(report.clone())
            .map_err(|_| SourceError::Disconnected("the Kubernetes watch thread ended".into()))
    }

    fn ip_requester(&self) -> Option<Box<dyn IpRequester>> {
        self.vnet.map(|_| {
            Box::new(KubeRequester {
                factory: self.factory.clone(),
                client: None,
            }) as Box<dyn IpRequester>
        })
    }
}

/// VNet mode: the agent's address requests (the lab's NodeNetworkConfig spec) served against
/// the cluster's FerrumIPPool ([`crate::pool::request_batches`]). Blocking: it runs the
/// calls on its own small runtime, from the agent's scaler thread.
pub struct KubeRequester {
    factory: ClientFactory,
    client: Option<(tokio::runtime::Runtime, Client)>,
}

impl KubeRequester {
    fn client(&mut self) -> Result<&(tokio::runtime::Runtime, Client), ConnectError> {
        if self.client.is_none() {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(ConnectError::Runtime)?;
            // The client's request buffer is a task of the runtime it is made in.
            let client = {
                let _guard = rt.enter();
                (self.factory)()?
            };
            self.client = Some((rt, client));
        }
        Ok(self.client.as_ref().expect("set above"))
    }
}

impl IpRequester for KubeRequester {
    fn request_ips(&mut self, node: &str, spec: &NncSpec) -> Result<(), SourceError> {
        let (rt, client) = self
            .client()
            .map_err(|e| SourceError::Disconnected(chain(&e)))?;
        let pools: Api<FerrumIPPool> = Api::all(client.clone());
        let nodes: Api<FerrumNode> = Api::all(client.clone());
        let releasing = spec.ips_not_in_use.iter().copied().collect();
        let plan = rt
            .block_on(crate::pool::request_batches(
                &pools,
                &nodes,
                node,
                spec.requested_ip_count,
                &releasing,
            ))
            .map_err(|e| SourceError::Protocol(chain(&e)))?;
        if !plan.released.is_empty() {
            tracing::info!(node, released = ?plan.released, "gave VNet batches back to the pool");
        }
        Ok(())
    }
}
