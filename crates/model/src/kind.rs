//! Kinds by name (as `get` and YAML spell them) and references to single objects.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::object::Object;

/// The kinds Ferrum understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    Namespace,
    Node,
    Pod,
    Service,
    EndpointSlice,
    NetworkPolicy,
    NodeNetworkConfig,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Namespace,
        Kind::Node,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::NetworkPolicy,
        Kind::NodeNetworkConfig,
    ];

    /// The kind of an object.
    pub fn of(object: &Object) -> Kind {
        match object {
            Object::Namespace(_) => Kind::Namespace,
            Object::Node(_) => Kind::Node,
            Object::Pod(_) => Kind::Pod,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::NetworkPolicy(_) => Kind::NetworkPolicy,
            Object::NodeNetworkConfig(_) => Kind::NodeNetworkConfig,
        }
    }

    /// `kind:` as written in YAML.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Node => "Node",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::NodeNetworkConfig => "NodeNetworkConfig",
        }
    }

    /// `apiVersion:` of the kind.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Namespace | Kind::Node | Kind::Pod | Kind::Service => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::NetworkPolicy => "networking.k8s.io/v1",
            Kind::NodeNetworkConfig => crate::nnc::NNC_API_VERSION,
        }
    }

    /// The kind for an (apiVersion, kind) pair, if it is one we support.
    pub fn from_api(api_version: &str, kind: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == kind && k.api_version() == api_version)
    }

    /// Lower-case singular resource name (`pod`), used in `pod/a created`.
    pub fn singular(self) -> &'static str {
        match self {
            Kind::Namespace => "namespace",
            Kind::Node => "node",
            Kind::Pod => "pod",
            Kind::Service => "service",
            Kind::EndpointSlice => "endpointslice",
            Kind::NetworkPolicy => "networkpolicy",
            Kind::NodeNetworkConfig => "nodenetworkconfig",
        }
    }

    /// Plural resource name (`pods`).
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Namespace => "namespaces",
            Kind::Node => "nodes",
            Kind::Pod => "pods",
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::NetworkPolicy => "networkpolicies",
            Kind::NodeNetworkConfig => "nodenetworkconfigs",
        }
    }

    /// kubectl's short name, where the kind has one.
    pub fn short(self) -> Option<&'static str> {
        match self {
            Kind::Namespace => Some("ns"),
            Kind::Node => Some("no"),
            Kind::Pod => Some("po"),
            Kind::Service => Some("svc"),
            Kind::EndpointSlice => None,
            Kind::NetworkPolicy => Some("netpol"),
            Kind::NodeNetworkConfig => Some("nnc"),
        }
    }

    /// Resolves what a user types after `get`: plural, singular, short name or kind,
    /// case-insensitively, optionally qualified with the API group (`networkpolicies.networking.k8s.io`).
    pub fn from_resource(resource: &str) -> Option<Kind> {
        let lower = resource.to_ascii_lowercase();
        Kind::ALL.into_iter().find(|k| {
            let group_suffix = match k.api_version().rsplit_once('/') {
                Some((group, _)) => format!(".{group}"),
                None => String::new(),
            };
            let bare = lower.strip_suffix(group_suffix.as_str()).unwrap_or(&lower);
            bare == k.plural()
                || bare == k.singular()
                || Some(bare) == k.short()
                || bare == k.name().to_ascii_lowercase()
        })
    }

    /// Whether objects of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::Node)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Names one object: kind, namespace (None for cluster-scoped kinds) and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectRef {
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
}

impl ObjectRef {
    /// A reference; the namespace is dropped for cluster-scoped kinds and defaults to
    /// "default" for namespaced ones.
    pub fn new(kind: Kind, namespace: Option<&str>, name: &str) -> Self {
        let namespace = if kind.namespaced() {
            Some(namespace.unwrap_or("default").to_string())
        } else {
            None
        };
        Self {
            kind,
            namespace,
            name: name.to_string(),
        }
    }

    /// The reference of an object (namespace defaulted as in [`ObjectRef::new`]).
    pub fn of(object: &Object) -> Self {
        let meta = object.metadata();
        Self::new(
            Kind::of(object),
            meta.namespace.as_deref(),
            meta.name.as_deref().unwrap_or(""),
        )
    }

    /// kubectl's way to name it in messages: `pod/a`.
    pub fn kubectl_name(&self) -> String {
        format!("{}/{}", self.kind.singular(), self.name)
    }
}

impl fmt::Display for ObjectRef {
    /// `Pod default/a` or `Node node-0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {}/{}", self.kind, ns, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_resolve_by_every_kubectl_spelling() {
        let cases = [
            ("pods", Kind::Pod),
            ("pod", Kind::Pod),
            ("po", Kind::Pod),
            ("Pods", Kind::Pod),
            ("svc", Kind::Service),
            ("services", Kind::Service),
            ("netpol", Kind::NetworkPolicy),
            ("networkpolicies", Kind::NetworkPolicy),
            ("networkpolicies.networking.k8s.io", Kind::NetworkPolicy),
            ("ns", Kind::Namespace),
            ("namespaces", Kind::Namespace),
            ("no", Kind::Node),
            ("nodes", Kind::Node),
            ("endpointslices", Kind::EndpointSlice),
            ("endpointslice", Kind::EndpointSlice),
        ];
        for (input, want) in cases {
            assert_eq!(Kind::from_resource(input), Some(want), "{input}");
        }
        assert_eq!(Kind::from_resource("deployments"), None);
        assert_eq!(Kind::from_resource("pods.networking.k8s.io"), None);
    }

    #[test]
    fn api_pairs_are_exact() {
        assert_eq!(Kind::from_api("v1", "Pod"), Some(Kind::Pod));
        assert_eq!(
            Kind::from_api("networking.k8s.io/v1", "NetworkPolicy"),
            Some(Kind::NetworkPolicy)
        );
        assert_eq!(Kind::from_api("apps/v1", "Pod"), None);
        assert_eq!(Kind::from_api("v1", "NetworkPolicy"), None);
    }

    #[test]
    fn refs_default_namespace_only_for_namespaced_kinds() {
        let pod = ObjectRef::new(Kind::Pod, None, "a");
        assert_eq!(pod.namespace.as_deref(), Some("default"));
        assert_eq!(pod.kubectl_name(), "pod/a");
        assert_eq!(pod.to_string(), "Pod default/a");
        let node = ObjectRef::new(Kind::Node, Some("x"), "n0");
        assert_eq!(node.namespace, None);
        assert_eq!(node.to_string(), "Node n0");
    }
}
