//! `ferrum observe` output: compact lines (Hubble's layout), a table, or JSON lines in the
//! shape of Hubble's `GetFlowsResponse` (`{"flow": …, "node_name": …, "time": …}`).

use serde_json::json;

use crate::record::{Endpoint, Flow};
use crate::time::compact as compact_time;

fn endpoint_name(e: &Endpoint, ip: &str, port: u16) -> String {
    let who = if ip.is_empty() {
        "-".to_string()
    } else if !e.pod_name.is_empty() {
        format!("{}/{}", e.namespace, e.pod_name)
    } else if let Some(label) = e.labels.first() {
        match label.strip_prefix("reserved:") {
            Some("host") | Some("remote-node") if !e.node_name.is_empty() => {
                format!("{ip} ({})", e.node_name)
            }
            Some(_) | None => ip.to_string(),
        }
    } else {
        ip.to_string()
    };
    if port != 0 {
        format!("{who}:{port}")
    } else {
        who
    }
}

fn ends(f: &Flow) -> (String, String) {
    let (sp, dp) = f.ports();
    (
        endpoint_name(&f.source, &f.ip.source, sp),
        endpoint_name(&f.destination, &f.ip.destination, dp),
    )
}

/// What happened: `to-endpoint FORWARDED` or `UNKNOWN_ENDPOINT DROPPED`.
fn what(f: &Flow) -> String {
    match (&f.drop_reason_desc, &f.trace_observation_point) {
        (Some(reason), _) => format!("{reason} {}", f.verdict.as_str()),
        (None, Some(point)) => format!(
            "{} {}",
            point.to_ascii_lowercase().replace('_', "-"),
            f.verdict.as_str()
        ),
        (None, None) => f.verdict.as_str().to_string(),
    }
}

/// `Nov 29 18:49:15.123 [node-1]: default/a:40000 (ID:0) -> default/b:80 (ID:0) to-endpoint FORWARDED (TCP Flags: SYN)`
pub fn compact(f: &Flow) -> String {
    let (src, dst) = ends(f);
    let arrow = if f.is_reply == Some(true) { "<-" } else { "->" };
    let (left, right) = if f.is_reply == Some(true) {
        ((dst, f.destination.identity), (src, f.source.identity))
    } else {
        ((src, f.source.identity), (dst, f.destination.identity))
    };
    let service = f
        .destination_service
        .as_ref()
        .or(f.source_service.as_ref())
        .map(|s| format!(" via service {}/{}", s.namespace, s.name))
        .unwrap_or_default();
    format!(
        "{} [{}]: {} (ID:{}) {arrow} {} (ID:{}){service} {} ({})",
        compact_time(&f.time),
        f.node_name,
        left.0,
        left.1,
        right.0,
        right.1,
        what(f),
        f.summary
    )
}

pub const TABLE_HEADER: [&str; 7] = [
    "TIMESTAMP",
    "NODE",
    "SOURCE",
    "DESTINATION",
    "TYPE",
    "VERDICT",
    "SUMMARY",
];

pub fn table_row(f: &Flow) -> [String; 7] {
    let (src, dst) = ends(f);
    let kind = match (&f.drop_reason_desc, &f.trace_observation_point) {
        (Some(reason), _) => reason.clone(),
        (None, Some(point)) => point.to_ascii_lowercase().replace('_', "-"),
        _ => String::new(),
    };
    [
        compact_time(&f.time),
        f.node_name.clone(),
        src,
        dst,
        kind,
        f.verdict.as_str().to_string(),
        f.summary.clone(),
    ]
}

/// Left-aligned columns two spaces apart.
pub fn table(rows: &[[String; 7]]) -> String {
    let mut widths = TABLE_HEADER.map(str::len);
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(&TABLE_HEADER.map(String::from));
    for r in rows {
        out.push_str(&line(r));
    }
    out
}

/// One JSON line as `hubble observe -o json` prints it.
pub fn json_line(f: &Flow) -> String {
    json!({ "flow": f, "node_name": f.node_name, "time": f.time }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::build_flow;
    use crate::record::tests::event;

    #[test]
    fn compact_and_table_show_pods_verdicts_and_reasons() {
        let dir = crate::directory::tests::directory();
        let f = build_flow(&event("TO_ENDPOINT", false), &dir, "node-1");
        assert_eq!(
            compact(&f),
            "Nov 29 18:49:15.000 [node-1]: default/a:40000 (ID:0) -> default/b:80 (ID:0) to-endpoint FORWARDED (TCP Flags: SYN)"
        );
        let mut ev = event("UNKNOWN_ENDPOINT", true);
        ev.dst = "10.244.0.99".parse().unwrap();
        let d = build_flow(&ev, &dir, "node-1");
        assert!(
            compact(&d).contains("-> 10.244.0.99:80 (ID:0) UNKNOWN_ENDPOINT DROPPED"),
            "{}",
            compact(&d)
        );
        let t = table(&[table_row(&f), table_row(&d)]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("TIMESTAMP"));
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1].find("default/a"), lines[0].find("SOURCE"));
        let j: serde_json::Value = serde_json::from_str(&json_line(&f)).unwrap();
        assert_eq!(j["flow"]["verdict"], "FORWARDED");
        assert_eq!(j["node_name"], "node-1");
    }

    #[test]
    fn replies_point_back_at_the_client() {
        let dir = crate::directory::tests::directory();
        let mut ev = event("TO_ENDPOINT", false);
        ev.tcp_flags = 0x12;
        std::mem::swap(&mut ev.src, &mut ev.dst);
        std::mem::swap(&mut ev.sport, &mut ev.dport);
        let line = compact(&build_flow(&ev, &dir, "node-1"));
        assert!(
            line.contains("default/a:40000 (ID:0) <- default/b:80"),
            "{line}"
        );
    }
}
