//! Label selectors as Kubernetes evaluates them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use thiserror::Error;

pub type Labels = BTreeMap<String, String>;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{field}: {message}")]
pub struct SelectorError {
    pub field: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A parsed selector. The empty selector matches everything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// Matches every label set (`{}`).
    pub fn everything() -> Self {
        Selector::default()
    }

    /// Parses `sel`; `field` names it in errors (`spec.ingress[0].from[1].podSelector`).
    pub fn parse(field: &str, sel: &LabelSelector) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for (k, v) in sel.match_labels.iter().flatten() {
            requirements.push(Requirement::Equals(k.clone(), v.clone()));
        }
        for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
            let f = format!("{field}.matchExpressions[{i}]");
            let values = e.values.clone().unwrap_or_default();
            let err = |message: &str| SelectorError {
                field: f.clone(),
                message: message.to_string(),
            };
            let req = match e.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(err("operator In/NotIn needs at least one value"));
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(err("operator Exists/DoesNotExist takes no values"));
                }
                "In" => Requirement::In(e.key.clone(), values),
                "NotIn" => Requirement::NotIn(e.key.clone(), values),
                "Exists" => Requirement::Exists(e.key.clone()),
                "DoesNotExist" => Requirement::DoesNotExist(e.key.clone()),
                other => {
                    return Err(err(&format!(
                        "unknown operator {other:?}: use In, NotIn, Exists or DoesNotExist"
                    )));
                }
            };
            requirements.push(req);
        }
        Ok(Selector { requirements })
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            // NotIn matches pods without the key, as upstream does.
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: key.into(),
                operator: op.into(),
                values: (!values.is_empty())
                    .then(|| values.iter().map(|v| v.to_string()).collect()),
            }]),
        }
    }

    #[test]
    fn operators() {
        let ab = labels(&[("pod", "a"), ("tier", "web")]);
        let none = labels(&[]);
        let s = |sel| Selector::parse("s", &sel).unwrap();
        assert!(s(expr("pod", "In", &["a", "b"])).matches(&ab));
        assert!(!s(expr("pod", "In", &["c"])).matches(&ab));
        assert!(!s(expr("pod", "In", &["a"])).matches(&none));
        assert!(!s(expr("pod", "NotIn", &["a"])).matches(&ab));
        assert!(s(expr("pod", "NotIn", &["c"])).matches(&ab));
        assert!(s(expr("pod", "NotIn", &["a"])).matches(&none));
        assert!(s(expr("tier", "Exists", &[])).matches(&ab));
        assert!(!s(expr("tier", "Exists", &[])).matches(&none));
        assert!(s(expr("tier", "DoesNotExist", &[])).matches(&none));
        assert!(!s(expr("tier", "DoesNotExist", &[])).matches(&ab));
        assert!(Selector::everything().matches(&none));
        let both = LabelSelector {
            match_labels: Some(labels(&[("pod", "a")])),
            match_expressions: expr("tier", "In", &["db"]).match_expressions,
        };
        assert!(!s(both).matches(&ab), "matchLabels AND matchExpressions");
    }

    #[test]
    fn bad_selectors_name_the_field() {
        let e = Selector::parse("spec.podSelector", &expr("k", "Like", &["x"])).unwrap_err();
        assert_eq!(e.field, "spec.podSelector.matchExpressions[0]");
        assert!(e.message.contains("Like"));
        assert!(Selector::parse("s", &expr("k", "In", &[])).is_err());
        assert!(Selector::parse("s", &expr("k", "Exists", &["v"])).is_err());
    }
}
