//! CNI 1.1 protocol types: the runtime's environment, the network configuration on stdin,
//! version negotiation, and the Result / Error JSON a plugin prints. Pure: no I/O.
//!
//! Error codes (spec 1.1 "Error" section, plus ours above 99):
//! 1 incompatible CNI version · 2 unsupported field · 3 container unknown or does not exist ·
//! 4 invalid necessary environment variable · 5 I/O failure · 6 failed to decode content ·
//! 7 invalid network config · 11 try again later (the agent is unreachable or not ready) ·
//! 50 plugin not available (STATUS) · 999 any other failure (agent internal error, kernel
//! refused an operation, node out of pod addresses).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// CNI spec versions this plugin speaks, oldest first.
pub const SUPPORTED_VERSIONS: [&str; 2] = ["1.0.0", "1.1.0"];
/// The newest supported version; used for errors raised before the config's version is known.
pub const LATEST_VERSION: &str = "1.1.0";
/// Where the agent listens when the network config does not say (`agentSocket`).
pub const DEFAULT_AGENT_SOCKET: &str = ferrum_agent_api::DEFAULT_SOCKET;

/// Spec error codes (see the crate docs for when each is used).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    IncompatibleVersion,
    UnsupportedField,
    UnknownContainer,
    InvalidEnv,
    Io,
    Decode,
    InvalidConfig,
    TryAgainLater,
    PluginNotAvailable,
    Other,
}

impl ErrorCode {
    pub fn code(self) -> u32 {
        match self {
            ErrorCode::IncompatibleVersion => 1,
            ErrorCode::UnsupportedField => 2,
            ErrorCode::UnknownContainer => 3,
            ErrorCode::InvalidEnv => 4,
            ErrorCode::Io => 5,
            ErrorCode::Decode => 6,
            ErrorCode::InvalidConfig => 7,
            ErrorCode::TryAgainLater => 11,
            ErrorCode::PluginNotAvailable => 50,
            ErrorCode::Other => 999,
        }
    }
}

/// A CNI error, printed on stdout as `{"cniVersion","code","msg","details"}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CNI error {}: {msg}{}", code.code(), if details.is_empty() { String::new() } else { format!(" ({details})") })]
pub struct CniError {
    pub code: ErrorCode,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The spec's Error object for a response in `cni_version`.
    pub fn to_json(&self, cni_version: &str) -> Value {
        let mut out = serde_json::Map::new();
        out.insert("cniVersion".into(), Value::from(cni_version));
        out.insert("code".into(), Value::from(self.code.code()));
        out.insert("msg".into(), Value::from(self.msg.clone()));
        if !self.details.is_empty() {
            out.insert("details".into(), Value::from(self.details.clone()));
        }
        Value::Object(out)
    }
}

fn env_error(var: &str, problem: impl fmt::Display) -> CniError {
    CniError::new(ErrorCode::InvalidEnv, format!("{var}: {problem}"))
}

fn config_error(field: &str, problem: impl fmt::Display) -> CniError {
    CniError::new(
        ErrorCode::InvalidConfig,
        format!("network config field {field}: {problem}"),
    )
}

// ---------------------------------------------------------------------------------------------
// Environment

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Result<Self, CniError> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            other => {
                return Err(env_error(
                    "CNI_COMMAND",
                    format!(
                        "unknown command {other:?}; expected one of ADD, DEL, CHECK, STATUS, GC, VERSION"
                    ),
                ));
            }
        })
    }
}

/// One container attachment as the runtime describes it in the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
    /// CNI_NETNS; required for ADD and CHECK, optional for DEL.
    pub netns: Option<PathBuf>,
}

/// The runtime's request, from environment variables (spec "Parameters").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Environment {
    pub command: Command,
    /// Present for ADD, DEL, CHECK.
    pub attachment: Option<Attachment>,
    /// CNI_ARGS as ordered key/value pairs.
    pub args: Vec<(String, String)>,
    /// CNI_PATH split on ':'.
    pub path: Vec<PathBuf>,
}

impl Environment {
    /// Reads the CNI_* variables through `get` (e.g. `|k| std::env::var(k).ok()`).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let command = match get("CNI_COMMAND") {
            Some(c) if !c.is_empty() => Command::parse(&c)?,
            _ => return Err(env_error("CNI_COMMAND", "is not set")),
        };
        let args = parse_cni_args(get("CNI_ARGS").as_deref().unwrap_or(""))?;
        let path = get("CNI_PATH")
            .unwrap_or_default()
            .split(':')
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .collect();
        let attachment = match command {
            Command::Add | Command::Check | Command::Del => {
                let container_id = required(&get, "CNI_CONTAINERID")?;
                validate_container_id(&container_id)?;
                let ifname = required(&get, "CNI_IFNAME")?;
                validate_ifname(&ifname).map_err(|p| env_error("CNI_IFNAME", p))?;
                let netns = match (command, get("CNI_NETNS").filter(|n| !n.is_empty())) {
                    (_, Some(n)) => {
                        if !n.starts_with('/') {
                            return Err(env_error(
                                "CNI_NETNS",
                                format!("{n:?} is not an absolute path to a network namespace"),
                            ));
                        }
                        Some(PathBuf::from(n))
                    }
                    (Command::Del, None) => None,
                    (_, None) => return Err(env_error("CNI_NETNS", "is not set")),
                };
                Some(Attachment {
                    container_id,
                    ifname,
                    netns,
                })
            }
            Command::Status | Command::Gc | Command::Version => None,
        };
        Ok(Environment {
            command,
            attachment,
            args,
            path,
        })
    }

    /// The value of a CNI_ARGS key (e.g. `K8S_POD_NAME`).
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn required(get: &impl Fn(&str) -> Option<String>, var: &str) -> Result<String, CniError> {
    match get(var) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(env_error(var, "is not set")),
    }
}

/// Parses CNI_ARGS: `K=V;K=V`, empty allowed; every entry needs a key and an `=`.
pub fn parse_cni_args(raw: &str) -> Result<Vec<(String, String)>, CniError> {
    let mut out = Vec::new();
    for entry in raw.split(';').filter(|e| !e.is_empty()) {
        match entry.split_once('=') {
            Some((k, v)) if !k.is_empty() => out.push((k.to_string(), v.to_string())),
            _ => {
                return Err(env_error(
                    "CNI_ARGS",
                    format!("entry {entry:?} is not KEY=VALUE"),
                ));
            }
        }
    }
    Ok(out)
}

/// Spec: a container id starts with an alphanumeric character, followed by alphanumerics,
/// `_`, `.` or `-`.
pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    let mut chars = id.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(env_error(
            "CNI_CONTAINERID",
            format!("{id:?} is not a valid container id (alphanumeric first, then [A-Za-z0-9_.-])"),
        ))
    }
}

/// Spec: an interface name is 1..=15 bytes, not `.`/`..`, without `/`, `:` or whitespace.
pub fn validate_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!("{name:?} must be 1 to 15 bytes long"));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(format!("{name:?} must not contain '/', ':' or whitespace"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Network configuration

/// Picks the version for a VERSION answer: the requested one when we speak it, else our newest
/// (VERSION must always answer, so a newer runtime can negotiate down from our list).
pub fn version_reply(requested: Option<&str>) -> Value {
    let version = requested
        .filter(|v| SUPPORTED_VERSIONS.contains(v))
        .unwrap_or(LATEST_VERSION);
    serde_json::json!({ "cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS })
}

/// Reads `cniVersion` from stdin for VERSION, tolerating empty input (treated as no request).
pub fn requested_version(stdin: &[u8]) -> Result<Option<String>, CniError> {
    if stdin.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let value: Value = serde_json::from_slice(stdin).map_err(decode_error)?;
    match value.get("cniVersion") {
        None => Ok(None),
        Some(Value::String(v)) => Ok(Some(v.clone())),
        Some(_) => Err(config_error("cniVersion", "must be a string")),
    }
}

fn decode_error(e: serde_json::Error) -> CniError {
    CniError::new(
        ErrorCode::Decode,
        format!("network config on stdin is not valid JSON: {e}"),
    )
}

/// The network configuration the runtime passes on stdin.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub plugin_type: String,
    pub agent_socket: PathBuf,
    /// Overrides the agent's MTU for pod interfaces.
    pub mtu: Option<u32>,
    /// GC: `cni.dev/valid-attachments`; `None` when the runtime did not send the key (a GC
    /// without it must not be read as "nothing is valid").
    pub valid_attachments: Option<Vec<ValidAttachment>>,
    /// CHECK (and chained ADD/DEL): the previous plugin's result.
    pub prev_result: Option<CniResult>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

impl NetConf {
    /// Decodes and validates the config. Errors: 6 when stdin is not a JSON object, 7 when a
    /// field is missing or wrong (the message names it), 1 when cniVersion is not supported.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let value: Value = serde_json::from_slice(stdin).map_err(decode_error)?;
        let Value::Object(obj) = value else {
            return Err(CniError::new(
                ErrorCode::Decode,
                "network config on stdin must be a JSON object",
            ));
        };
        let string = |field: &str| -> Result<Option<String>, CniError> {
            match obj.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(config_error(field, "must be a string")),
            }
        };
        let cni_version =
            string("cniVersion")?.ok_or_else(|| config_error("cniVersion", "is missing"))?;
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(
                CniError::new(ErrorCode::IncompatibleVersion, "incompatible CNI version")
                    .with_details(format!(
                        "config has cniVersion {cni_version:?}; this plugin supports {}",
                        SUPPORTED_VERSIONS.join(", ")
                    )),
            );
        }
        let name = string("name")?.ok_or_else(|| config_error("name", "is missing"))?;
        validate_network_name(&name)?;
        let plugin_type = string("type")?.ok_or_else(|| config_error("type", "is missing"))?;
        if plugin_type.is_empty() {
            return Err(config_error("type", "must not be empty"));
        }
        let agent_socket = match string("agentSocket")? {
            None => PathBuf::from(DEFAULT_AGENT_SOCKET),
            Some(s) if s.starts_with('/') => PathBuf::from(s),
            Some(s) => {
                return Err(config_error(
                    "agentSocket",
                    format!("{s:?} must be an absolute path"),
                ));
            }
        };
        let mtu = match obj.get("mtu") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(m) if (576..=65535).contains(&m) => Some(m as u32),
                _ => {
                    return Err(config_error(
                        "mtu",
                        format!("{v} must be an integer from 576 to 65535"),
                    ));
                }
            },
        };
        let valid_attachments = match obj.get("cni.dev/valid-attachments") {
            None | Some(Value::Null) => None,
            Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|e| {
                config_error(
                    "cni.dev/valid-attachments",
                    format!("must be a list of {{\"containerID\", \"ifname\"}}: {e}"),
                )
            })?,
        };
        let prev_result = match obj.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                serde_json::from_value(v.clone())
                    .map_err(|e| config_error("prevResult", format!("is not a CNI result: {e}")))?,
            ),
        };
        Ok(NetConf {
            cni_version,
            name,
            plugin_type,
            agent_socket,
            mtu,
            valid_attachments,
            prev_result,
        })
    }
}

/// Spec: network names match `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`.
fn validate_network_name(name: &str) -> Result<(), CniError> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(config_error(
            "name",
            format!("{name:?} must start alphanumeric and contain only [A-Za-z0-9_.-]"),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Result

/// The ADD result (spec "Success" of ADD), serialized exactly in the spec's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Dns::is_empty")]
    pub dns: Dns,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    pub name: String,
    /// `aa:bb:cc:dd:ee:ff`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// 1.1: the interface MTU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The netns path for interfaces inside the container; absent for host interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpConfig {
    /// Address with prefix, e.g. `10.244.1.5/32`.
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u8>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
    /// Fields of future spec versions survive a round trip.
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub other: BTreeMap<String, Value>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_none()
            && self.search.is_empty()
            && self.options.is_empty()
            && self.other.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> Result<Environment, CniError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Environment::from_vars(|k| map.get(k).cloned())
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/run/netns/pod"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_UID=u-1",
        ),
    ];

    fn without(
        vars: &[(&'static str, &'static str)],
        drop: &str,
    ) -> Vec<(&'static str, &'static str)> {
        vars.iter().copied().filter(|(k, _)| *k != drop).collect()
    }

    #[test]
    fn add_environment_parses() {
        let e = env(ADD).expect("valid ADD env");
        assert_eq!(e.command, Command::Add);
        let a = e.attachment.clone().expect("attachment");
        assert_eq!(a.container_id, "abc123");
        assert_eq!(a.ifname, "eth0");
        assert_eq!(a.netns, Some(PathBuf::from("/run/netns/pod")));
        assert_eq!(e.arg("K8S_POD_NAME"), Some("web-0"));
        assert_eq!(e.arg("K8S_POD_UID"), Some("u-1"));
        assert_eq!(e.arg("MISSING"), None);
        assert_eq!(e.path.len(), 2);
    }

    #[test]
    fn each_missing_required_variable_is_named_with_code_4() {
        for var in ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
            let err = env(&without(ADD, var)).expect_err(var);
            assert_eq!(err.code, ErrorCode::InvalidEnv, "{var}");
            assert_eq!(err.code.code(), 4);
            assert!(err.msg.contains(var), "{var}: {}", err.msg);
        }
    }

    #[test]
    fn del_does_not_need_a_netns_but_check_does() {
        let mut del = without(ADD, "CNI_NETNS");
        del[0] = ("CNI_COMMAND", "DEL");
        let e = env(&del).expect("DEL without netns");
        assert_eq!(e.attachment.expect("attachment").netns, None);
        let mut check = without(ADD, "CNI_NETNS");
        check[0] = ("CNI_COMMAND", "CHECK");
        assert!(env(&check).expect_err("CHECK").msg.contains("CNI_NETNS"));
    }

    #[test]
    fn status_gc_version_need_only_the_command() {
        for (cmd, expected) in [
            ("STATUS", Command::Status),
            ("GC", Command::Gc),
            ("VERSION", Command::Version),
        ] {
            let e = env(&[("CNI_COMMAND", cmd)]).expect(cmd);
            assert_eq!(e.command, expected);
            assert!(e.attachment.is_none());
        }
    }

    #[test]
    fn unknown_command_is_invalid_env() {
        let err = env(&[("CNI_COMMAND", "UPDATE")]).expect_err("unknown");
        assert_eq!(err.code, ErrorCode::InvalidEnv);
        assert!(err.msg.contains("CNI_COMMAND") && err.msg.contains("UPDATE"));
    }

    #[test]
    fn bad_values_are_rejected_naming_the_variable() {
        let cases = [
            ("CNI_CONTAINERID", "-leading-dash"),
            ("CNI_CONTAINERID", "has space"),
            ("CNI_IFNAME", "this-name-is-too-long"),
            ("CNI_IFNAME", "eth/0"),
            ("CNI_IFNAME", ".."),
            ("CNI_NETNS", "relative/path"),
            ("CNI_ARGS", "K8S_POD_NAME"),
            ("CNI_ARGS", "=value"),
        ];
        for (var, value) in cases {
            let mut vars = without(ADD, var);
            vars.push((var, value));
            let err = env(&vars).expect_err(value);
            assert_eq!(err.code, ErrorCode::InvalidEnv, "{var}={value}");
            assert!(err.msg.contains(var), "{var}={value}: {}", err.msg);
        }
    }

    #[test]
    fn cni_args_allow_empty_entries_and_values() {
        assert_eq!(parse_cni_args("").expect("empty"), vec![]);
        assert_eq!(
            parse_cni_args("A=1;;B=;C=x=y").expect("parse"),
            vec![
                ("A".into(), "1".into()),
                ("B".into(), String::new()),
                ("C".into(), "x=y".into())
            ]
        );
    }

    fn conf(v: Value) -> Result<NetConf, CniError> {
        NetConf::parse(v.to_string().as_bytes())
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = conf(json!({"cniVersion": "1.0.0", "name": "ferrum", "type": "ferrum-cni"}))
            .expect("valid");
        assert_eq!(c.agent_socket, PathBuf::from(DEFAULT_AGENT_SOCKET));
        assert_eq!(c.mtu, None);
        assert!(c.valid_attachments.is_none());
        assert!(c.prev_result.is_none());
    }

    #[test]
    fn full_config_parses() {
        let c = conf(json!({
            "cniVersion": "1.1.0", "name": "ferrum", "type": "ferrum-cni",
            "agentSocket": "/run/ferrum/node-1.sock", "mtu": 1450,
            "cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"}],
            "prevResult": {"cniVersion": "1.1.0", "ips": [{"address": "10.244.1.5/32"}]},
            "runtimeConfig": {"ignored": true}
        }))
        .expect("valid");
        assert_eq!(c.agent_socket, PathBuf::from("/run/ferrum/node-1.sock"));
        assert_eq!(c.mtu, Some(1450));
        assert_eq!(
            c.valid_attachments,
            Some(vec![ValidAttachment {
                container_id: "a".into(),
                ifname: "eth0".into()
            }])
        );
        let prev = c.prev_result.expect("prevResult");
        assert_eq!(prev.ips[0].address.to_string(), "10.244.1.5/32");
    }

    #[test]
    fn malformed_json_is_decode_error() {
        for input in ["{not json", "", "[1,2]", "\"str\""] {
            let err = NetConf::parse(input.as_bytes()).expect_err(input);
            assert_eq!(err.code.code(), 6, "{input}");
        }
    }

    #[test]
    fn invalid_fields_are_code_7_and_named() {
        let base = json!({"cniVersion": "1.0.0", "name": "ferrum", "type": "ferrum-cni"});
        let cases: Vec<(&str, Value)> = vec![
            ("cniVersion", json!(null)),
            ("cniVersion", json!(1)),
            ("name", json!(null)),
            ("name", json!("bad name")),
            ("type", json!(null)),
            ("type", json!(7)),
            ("agentSocket", json!("relative.sock")),
            ("agentSocket", json!(false)),
            ("mtu", json!(70000)),
            ("mtu", json!("1500")),
            ("cni.dev/valid-attachments", json!([{"containerID": 1}])),
            ("prevResult", json!({"ips": "nope"})),
        ];
        for (field, value) in cases {
            let mut v = base.clone();
            if value.is_null() {
                v.as_object_mut().expect("object").remove(field);
            } else {
                v[field] = value.clone();
            }
            let err = conf(v).expect_err(field);
            assert_eq!(err.code.code(), 7, "{field}={value}: {err}");
            assert!(err.msg.contains(field), "{field}: {}", err.msg);
        }
    }

    #[test]
    fn unsupported_version_is_code_1() {
        for v in ["0.4.0", "1.2.0", "banana"] {
            let err = conf(json!({"cniVersion": v, "name": "n", "type": "t"})).expect_err(v);
            assert_eq!(err.code.code(), 1);
            assert_eq!(err.msg, "incompatible CNI version");
            assert!(err.details.contains(v) && err.details.contains("1.1.0"));
        }
    }

    #[test]
    fn version_replies() {
        assert_eq!(
            version_reply(Some("1.0.0")),
            json!({"cniVersion": "1.0.0", "supportedVersions": ["1.0.0", "1.1.0"]})
        );
        assert_eq!(version_reply(Some("9.9.9"))["cniVersion"], "1.1.0");
        assert_eq!(version_reply(None)["cniVersion"], "1.1.0");
        assert_eq!(requested_version(b"  ").expect("empty"), None);
        assert_eq!(
            requested_version(br#"{"cniVersion":"1.0.0"}"#).expect("v"),
            Some("1.0.0".into())
        );
        assert_eq!(requested_version(b"{").expect_err("bad").code.code(), 6);
    }

    #[test]
    fn error_json_has_the_spec_shape() {
        let e = CniError::new(ErrorCode::TryAgainLater, "agent unreachable")
            .with_details("socket /run/ferrum/agent.sock");
        assert_eq!(
            e.to_json("1.1.0"),
            json!({"cniVersion": "1.1.0", "code": 11, "msg": "agent unreachable",
                   "details": "socket /run/ferrum/agent.sock"})
        );
        let bare = CniError::new(ErrorCode::Other, "x").to_json("1.0.0");
        assert!(bare.get("details").is_none());
    }

    #[test]
    fn error_codes_match_the_spec_table() {
        let table = [
            (ErrorCode::IncompatibleVersion, 1),
            (ErrorCode::UnsupportedField, 2),
            (ErrorCode::UnknownContainer, 3),
            (ErrorCode::InvalidEnv, 4),
            (ErrorCode::Io, 5),
            (ErrorCode::Decode, 6),
            (ErrorCode::InvalidConfig, 7),
            (ErrorCode::TryAgainLater, 11),
            (ErrorCode::PluginNotAvailable, 50),
            (ErrorCode::Other, 999),
        ];
        for (c, n) in table {
            assert_eq!(c.code(), n);
        }
    }

    #[test]
    fn result_serializes_in_the_spec_shape() {
        let r = CniResult {
            cni_version: "1.1.0".into(),
            interfaces: vec![
                Interface {
                    name: "fe0123456789ab".into(),
                    mac: "02:00:00:00:00:01".into(),
                    mtu: Some(1450),
                    sandbox: None,
                },
                Interface {
                    name: "eth0".into(),
                    mac: "02:00:00:00:00:02".into(),
                    mtu: Some(1450),
                    sandbox: Some("/run/netns/pod".into()),
                },
            ],
            ips: vec![IpConfig {
                address: "10.244.1.5/32".parse().expect("net"),
                gateway: Some("169.254.1.1".parse().expect("ip")),
                interface: Some(1),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().expect("net"),
                gw: Some("169.254.1.1".parse().expect("ip")),
                mtu: None,
                scope: None,
            }],
            dns: Dns::default(),
        };
        let v = serde_json::to_value(&r).expect("serialize");
        assert_eq!(
            v,
            json!({
                "cniVersion": "1.1.0",
                "interfaces": [
                    {"name": "fe0123456789ab", "mac": "02:00:00:00:00:01", "mtu": 1450},
                    {"name": "eth0", "mac": "02:00:00:00:00:02", "mtu": 1450,
                     "sandbox": "/run/netns/pod"}
                ],
                "ips": [{"address": "10.244.1.5/32", "gateway": "169.254.1.1", "interface": 1}],
                "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]
            })
        );
        let back: CniResult = serde_json::from_value(v).expect("round trip");
        assert_eq!(back, r);
    }

    #[test]
    fn results_from_other_plugins_parse() {
        // Shape printed by the reference ptp plugin, dns included.
        let v = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "veth1", "mac": "aa:bb:cc:dd:ee:ff"},
                           {"name": "eth0", "mac": "aa:bb:cc:dd:ee:00", "sandbox": "/proc/1/ns/net"}],
            "ips": [{"interface": 1, "address": "10.1.0.2/24", "gateway": "10.1.0.1"}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {"nameservers": ["10.0.0.10"], "search": ["svc.cluster.local"]}
        });
        let r: CniResult = serde_json::from_value(v.clone()).expect("parse");
        assert_eq!(r.dns.nameservers, vec!["10.0.0.10"]);
        assert_eq!(serde_json::to_value(&r).expect("serialize"), v);
    }

    proptest! {
        #[test]
        fn cni_args_round_trip(pairs in proptest::collection::vec(("[A-Z_][A-Z0-9_]{0,8}", "[a-z0-9=./-]{0,10}"), 0..6)) {
            let raw = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(";");
            let parsed = parse_cni_args(&raw).expect("well-formed args parse");
            let expected: Vec<(String, String)> = pairs.into_iter().collect();
            prop_assert_eq!(parsed, expected);
        }

        #[test]
        fn valid_container_ids_accepted(id in "[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}") {
            prop_assert!(validate_container_id(&id).is_ok());
        }

        #[test]
        fn ids_with_other_characters_rejected(prefix in "[a-z0-9]{1,5}", bad in "[^a-zA-Z0-9_.-]", suffix in "[a-z]{0,5}") {
            let id = format!("{prefix}{bad}{suffix}");
            prop_assert_eq!(validate_container_id(&id).expect_err("invalid").code, ErrorCode::InvalidEnv);
        }

        #[test]
        fn parsing_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Err(e) = NetConf::parse(&bytes) {
                prop_assert!([1u32, 6, 7].contains(&e.code.code()));
            }
        }
    }
}
