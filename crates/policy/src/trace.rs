//! `ferrum policy trace`: the verdict for a connection and what decided it.

use std::fmt::Write;
use std::net::Ipv4Addr;

use serde::Serialize;

use crate::compile::{Decision, Direction, PolicyState, Reason};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Trace {
    pub allowed: bool,
    /// The source pod's egress decision (None: the source is not a pod).
    pub egress: Option<Decision>,
    /// The destination pod's ingress decision (None: the destination is not a pod).
    pub ingress: Option<Decision>,
    pub text: String,
}

fn describe(state: &PolicyState, who: &str, dir: Direction, d: &Decision, out: &mut String) {
    let verdict = if d.allowed { "ALLOWED" } else { "DENIED" };
    let why = match &d.reason {
        Reason::NotIsolated => format!("no NetworkPolicy selects {who} for {dir}"),
        Reason::Host => format!("{who}'s own node is always allowed in"),
        Reason::Allowed { rule } => match state.rule(*rule) {
            Some(r) => format!("allowed by {r}"),
            None => format!("allowed by rule {rule}"),
        },
        Reason::Denied { isolated_by } => {
            let names: Vec<String> = isolated_by
                .iter()
                .filter_map(|r| state.rule(*r))
                .map(|r| format!("{}/{}", r.namespace, r.policy))
                .collect();
            format!(
                "selected for {dir} by {} and no rule allows this peer and port",
                names.join(", ")
            )
        }
    };
    let _ = writeln!(out, "  {dir} at {who}: {verdict}: {why}");
}

impl PolicyState {
    /// Traces a connection's first packet from `src` to `dst:port`.
    pub fn trace(&self, src: Ipv4Addr, dst: Ipv4Addr, proto: u8, port: u16) -> Trace {
        let name = |ip: Ipv4Addr| {
            self.endpoints
                .get(&ip)
                .map(|e| format!("{}/{} ({ip})", e.namespace, e.name))
                .unwrap_or_else(|| ip.to_string())
        };
        let mut text = format!("{} -> {}:{port} proto {proto}\n", name(src), name(dst));
        let egress = self.endpoints.get(&src).map(|ep| {
            let d = self.decide(ep, Direction::Egress, dst, proto, port);
            describe(self, &name(src), Direction::Egress, &d, &mut text);
            d
        });
        let ingress = self.endpoints.get(&dst).map(|ep| {
            let d = self.decide(ep, Direction::Ingress, src, proto, port);
            describe(self, &name(dst), Direction::Ingress, &d, &mut text);
            d
        });
        if egress.is_none() && ingress.is_none() {
            let _ = writeln!(text, "  neither end is a pod: no policy applies");
        }
        let allowed =
            egress.as_ref().is_none_or(|d| d.allowed) && ingress.as_ref().is_none_or(|d| d.allowed);
        let _ = writeln!(
            text,
            "verdict: {}",
            if allowed { "ALLOWED" } else { "DENIED" }
        );
        Trace {
            allowed,
            egress,
            ingress,
            text,
        }
    }
}
