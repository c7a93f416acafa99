//! Prometheus text exposition format (version 0.0.4): just enough to write the agent's
//! metrics correctly (HELP/TYPE once per family, escaped label values, histograms).

use std::fmt::Write;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// A histogram with fixed upper bounds (cumulative buckets are computed when written).
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &[f64]) -> Histogram {
        Histogram {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.counts[i] += 1;
        }
        self.sum += value;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

#[derive(Default)]
pub struct Exposition {
    out: String,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('"', "\\\"")
}

fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

fn number(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else {
        format!("{v}")
    }
}

impl Exposition {
    /// Starts a family; every sample of it must follow before the next family.
    pub fn family(&mut self, name: &str, help: &str, kind: Kind) {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let _ = writeln!(self.out, "# HELP {name} {}", help.replace('\n', " "));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, pairs: &[(&str, &str)], value: f64) {
        let _ = writeln!(self.out, "{name}{} {}", labels(pairs), number(value));
    }

    /// The samples of a histogram family started with [`Exposition::family`].
    pub fn histogram(&mut self, name: &str, pairs: &[(&str, &str)], h: &Histogram) {
        let mut cumulative = 0;
        for (bound, n) in h.bounds.iter().zip(&h.counts) {
            cumulative += n;
            let le = number(*bound);
            let mut with_le = pairs.to_vec();
            with_le.push(("le", &le));
            self.sample(&format!("{name}_bucket"), &with_le, cumulative as f64);
        }
        let mut inf = pairs.to_vec();
        inf.push(("le", "+Inf"));
        self.sample(&format!("{name}_bucket"), &inf, h.count as f64);
        self.sample(&format!("{name}_sum"), pairs, h.sum);
        self.sample(&format!("{name}_count"), pairs, h.count as f64);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_families_escaped_labels_and_cumulative_buckets() {
        let mut e = Exposition::default();
        e.family("ferrum_drops_total", "Drops.", Kind::Counter);
        e.sample("ferrum_drops_total", &[("reason", "a\"b\\c\nd")], 3.0);
        e.family("ferrum_reconcile_seconds", "Latency.", Kind::Histogram);
        let mut h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.5, 0.7, 3.0] {
            h.observe(v);
        }
        e.histogram("ferrum_reconcile_seconds", &[], &h);
        let text = e.finish();
        assert!(text.contains("# TYPE ferrum_drops_total counter\n"));
        assert!(
            text.contains("ferrum_drops_total{reason=\"a\\\"b\\\\c\\nd\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("ferrum_reconcile_seconds_bucket{le=\"0.1\"} 1\n"));
        assert!(text.contains("ferrum_reconcile_seconds_bucket{le=\"1\"} 3\n"));
        assert!(text.contains("ferrum_reconcile_seconds_bucket{le=\"+Inf\"} 4\n"));
        assert!(text.contains("ferrum_reconcile_seconds_sum 4.25\n"));
        assert!(text.contains("ferrum_reconcile_seconds_count 4\n"));
    }
}
