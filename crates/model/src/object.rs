//! The Kubernetes kinds Ferrum understands, as one enum over the k8s-openapi types.

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

// Boxing the variants would make every match on them clumsier for a few hundred bytes per
// object; the lab holds at most thousands of objects.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Namespace(Namespace),
    Node(Node),
    Pod(Pod),
    Service(Service),
    EndpointSlice(EndpointSlice),
    NetworkPolicy(NetworkPolicy),
    /// The per-node VNet IP state (see [`crate::nnc`]).
    NodeNetworkConfig(crate::nnc::NodeNetworkConfig),
}

impl Object {
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Namespace(_) => "Namespace",
            Object::Node(_) => "Node",
            Object::Pod(_) => "Pod",
            Object::Service(_) => "Service",
            Object::EndpointSlice(_) => "EndpointSlice",
            Object::NetworkPolicy(_) => "NetworkPolicy",
            Object::NodeNetworkConfig(_) => "NodeNetworkConfig",
        }
    }

    pub fn metadata_mut(
        &mut self,
    ) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Object::Namespace(o) => &mut o.metadata,
            Object::Node(o) => &mut o.metadata,
            Object::Pod(o) => &mut o.metadata,
            Object::Service(o) => &mut o.metadata,
            Object::EndpointSlice(o) => &mut o.metadata,
            Object::NetworkPolicy(o) => &mut o.metadata,
            Object::NodeNetworkConfig(o) => &mut o.metadata,
        }
    }

    /// metadata.name ("" when missing; [`crate::validate`] refuses such objects).
    pub fn name(&self) -> &str {
        self.metadata().name.as_deref().unwrap_or("")
    }

    /// metadata.namespace (None for cluster-scoped kinds).
    pub fn namespace(&self) -> Option<&str> {
        self.metadata().namespace.as_deref()
    }

    /// (namespace, name) of a namespaced object, the namespace defaulting to "default" as
    /// the API server's does.
    pub fn namespaced_name(&self) -> (String, String) {
        (
            self.namespace().unwrap_or("default").to_string(),
            self.name().to_string(),
        )
    }

    pub fn metadata(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::Node(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::NetworkPolicy(o) => &o.metadata,
            Object::NodeNetworkConfig(o) => &o.metadata,
        }
    }
}

impl Serialize for Object {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Object::Namespace(o) => o.serialize(s),
            Object::Node(o) => o.serialize(s),
            Object::Pod(o) => o.serialize(s),
            Object::Service(o) => o.serialize(s),
            Object::EndpointSlice(o) => o.serialize(s),
            Object::NetworkPolicy(o) => o.serialize(s),
            Object::NodeNetworkConfig(o) => o.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Object {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let v = serde_json::Value::deserialize(d)?;
        let kind = v
            .get("kind")
            .and_then(|k| k.as_str())
            .ok_or_else(|| D::Error::custom("object has no kind"))?
            .to_string();
        let conv = |r: Result<Object, serde_json::Error>| r.map_err(D::Error::custom);
        match kind.as_str() {
            "Namespace" => conv(serde_json::from_value(v).map(Object::Namespace)),
            "Node" => conv(serde_json::from_value(v).map(Object::Node)),
            "Pod" => conv(serde_json::from_value(v).map(Object::Pod)),
            "Service" => conv(serde_json::from_value(v).map(Object::Service)),
            "EndpointSlice" => conv(serde_json::from_value(v).map(Object::EndpointSlice)),
            "NetworkPolicy" => conv(serde_json::from_value(v).map(Object::NetworkPolicy)),
            "NodeNetworkConfig" => conv(serde_json::from_value(v).map(Object::NodeNetworkConfig)),
            other => Err(D::Error::custom(format!("unsupported kind {other:?}"))),
        }
    }
}
