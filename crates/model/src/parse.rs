//! Multi-document Kubernetes YAML to [`Object`]s: strict about kinds, field types, unknown
//! fields and the validation rules, with errors that name the document, the object and the field.

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::kind::Kind;
use crate::object::Object;
use crate::validate::{ValidationError, normalize, validate};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{location}: not valid YAML: {message}")]
    Yaml { location: String, message: String },
    #[error("{location}: {message}")]
    Document { location: String, message: String },
    #[error("{location} ({object}): {field}: {message}")]
    Field {
        location: String,
        object: String,
        field: String,
        message: String,
    },
    #[error("{location} ({}): {}: {}", .error.object, .error.field, .error.message)]
    Invalid {
        location: String,
        error: ValidationError,
    },
}

/// Parses every document of `yaml` (documents are numbered from 1 in errors; empty documents
/// are skipped; `kind: List` contributes its items). Each object is normalized (namespace
/// defaulted) and validated.
pub fn parse_documents(yaml: &str) -> Result<Vec<Object>, ParseError> {
    let mut objects = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let location = format!("document {}", i + 1);
        let value = serde_yaml::Value::deserialize(document).map_err(|e| ParseError::Yaml {
            location: location.clone(),
            message: e.to_string(),
        })?;
        if value.is_null() {
            continue;
        }
        let json = serde_json::to_value(&value).map_err(|e| ParseError::Document {
            location: location.clone(),
            message: format!("cannot be represented as JSON: {e}"),
        })?;
        if json.get("kind").and_then(Value::as_str) == Some("List") {
            let Some(items) = json.get("items").and_then(Value::as_array) else {
                return Err(ParseError::Document {
                    location,
                    message: "a List needs an items array".to_string(),
                });
            };
            for (j, item) in items.iter().enumerate() {
                objects.push(parse_value(item.clone(), &format!("{location}, item {j}"))?);
            }
        } else {
            objects.push(parse_value(json, &location)?);
        }
    }
    Ok(objects)
}

/// One object from its JSON form; `location` says where it came from in error messages.
pub fn parse_value(json: Value, location: &str) -> Result<Object, ParseError> {
    let doc_err = |message: String| ParseError::Document {
        location: location.to_string(),
        message,
    };
    if !json.is_object() {
        return Err(doc_err(
            "not a Kubernetes object (expected a mapping with apiVersion, kind and metadata)"
                .to_string(),
        ));
    }
    let api_version = json
        .get("apiVersion")
        .and_then(Value::as_str)
        .ok_or_else(|| doc_err("apiVersion: required".to_string()))?;
    let kind_name = json
        .get("kind")
        .and_then(Value::as_str)
        .ok_or_else(|| doc_err("kind: required".to_string()))?;
    let Some(kind) = Kind::from_api(api_version, kind_name) else {
        let supported: Vec<String> = Kind::ALL
            .iter()
            .map(|k| format!("{} {}", k.api_version(), k.name()))
            .collect();
        return Err(doc_err(format!(
            "unsupported kind {kind_name:?} in apiVersion {api_version:?}; supported: {}",
            supported.join(", ")
        )));
    };
    // Name the object in errors even when its body does not decode.
    let name = json
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>");
    let namespace = json
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let object_label = if kind.namespaced() {
        format!("{kind} {namespace}/{name}")
    } else {
        format!("{kind} {name}")
    };
    let field_err = |field: String, message: String| ParseError::Field {
        location: location.to_string(),
        object: object_label.clone(),
        field,
        message,
    };

    let mut object = match kind {
        Kind::Namespace => decode(&json).map(Object::Namespace),
        Kind::Node => decode(&json).map(Object::Node),
        Kind::Pod => decode(&json).map(Object::Pod),
        Kind::Service => decode(&json).map(Object::Service),
        Kind::EndpointSlice => decode(&json).map(Object::EndpointSlice),
        Kind::NetworkPolicy => decode(&json).map(Object::NetworkPolicy),
        Kind::NodeNetworkConfig => decode(&json).map(Object::NodeNetworkConfig),
    }
    .map_err(|(field, message)| field_err(field, message))?;

    // Fields the types do not know would be dropped silently; refuse them as the API server's
    // strict field validation does, so a typo does not quietly change meaning.
    let decoded = serde_json::to_value(&object)
        .map_err(|e| field_err(".".to_string(), format!("cannot re-encode: {e}")))?;
    let mut unknown = Vec::new();
    find_unknown_fields(&json, &decoded, "", &mut unknown);
    if let Some(first) = unknown.first() {
        return Err(field_err(first.clone(), "unknown field".to_string()));
    }

    normalize(&mut object);
    validate(&object).map_err(|error| ParseError::Invalid {
        location: location.to_string(),
        error,
    })?;
    Ok(object)
}

fn decode<T: DeserializeOwned>(json: &Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(json.clone()).map_err(|e| {
        let field = e.path().to_string();
        (field, e.into_inner().to_string())
    })
}

fn find_unknown_fields(input: &Value, decoded: &Value, path: &str, out: &mut Vec<String>) {
    match (input, decoded) {
        (Value::Object(given), Value::Object(kept)) => {
            for (key, value) in given {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match kept.get(key) {
                    Some(kept_value) => find_unknown_fields(value, kept_value, &child, out),
                    None if is_empty(value) => {}
                    None => out.push(child),
                }
            }
        }
        (Value::Array(given), Value::Array(kept)) => {
            for (i, (value, kept_value)) in given.iter().zip(kept).enumerate() {
                find_unknown_fields(value, kept_value, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}
