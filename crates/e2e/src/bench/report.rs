//! Statistics over repeated measurements, the result table and the JSON report.

use serde::Serialize;

/// Nearest-rank percentile (`p` in 0..=100) of unsorted samples; None when empty.
pub fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

pub fn mean(samples: &[f64]) -> Option<f64> {
    (!samples.is_empty()).then(|| samples.iter().sum::<f64>() / samples.len() as f64)
}

pub fn max(samples: &[f64]) -> Option<f64> {
    samples.iter().copied().max_by(f64::total_cmp)
}

/// Median of the repeats (the lower middle for an even count, so it is always a measured value).
pub fn median(samples: &[f64]) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some(sorted[(sorted.len() - 1) / 2])
}

/// Latency summary of one ping-pong run, microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RrSummary {
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

impl RrSummary {
    pub fn of(rtts_us: &[f64]) -> Option<RrSummary> {
        Some(RrSummary {
            mean_us: mean(rtts_us)?,
            p50_us: percentile(rtts_us, 50.0)?,
            p99_us: percentile(rtts_us, 99.0)?,
        })
    }
}

/// Which way a target points.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// ferrum / baseline must be at least this.
    RatioAtLeast(f64),
    /// ferrum / baseline must be at most this.
    RatioAtMost(f64),
    /// The ferrum value itself must be at most this.
    ValueAtMost(f64),
    /// Reported without a target.
    None,
}

impl Target {
    fn describe(self, unit: &str) -> String {
        match self {
            Target::RatioAtLeast(r) => format!(">= {r}x"),
            Target::RatioAtMost(r) => format!("<= {r}x"),
            Target::ValueAtMost(v) => format!("<= {v} {unit}"),
            Target::None => "-".into(),
        }
    }
}

/// One row of the result.
#[derive(Debug, Clone, Serialize)]
pub struct Metric {
    pub name: String,
    pub unit: String,
    /// How the repeats were reduced to this value.
    pub aggregate: String,
    pub baseline: Option<f64>,
    pub ferrum: f64,
    pub ratio: Option<f64>,
    pub target: Target,
    pub target_text: String,
    /// None when the metric has no target.
    pub met: Option<bool>,
    /// Every repeat, in run order.
    pub baseline_samples: Vec<f64>,
    pub ferrum_samples: Vec<f64>,
}

impl Metric {
    /// A ferrum-vs-baseline comparison; `reduce` picks the value from the repeats.
    pub fn compared(
        name: &str,
        unit: &str,
        aggregate: &str,
        reduce: fn(&[f64]) -> Option<f64>,
        baseline_samples: Vec<f64>,
        ferrum_samples: Vec<f64>,
        target: Target,
    ) -> Metric {
        let baseline = reduce(&baseline_samples);
        let ferrum = reduce(&ferrum_samples).unwrap_or(f64::NAN);
        let ratio = baseline.map(|b| ferrum / b);
        let met = match (target, ratio) {
            (Target::RatioAtLeast(t), Some(r)) => Some(r >= t),
            (Target::RatioAtMost(t), Some(r)) => Some(r <= t),
            _ => None,
        };
        Metric {
            name: name.into(),
            unit: unit.into(),
            aggregate: aggregate.into(),
            baseline,
            ferrum,
            ratio,
            target,
            target_text: target.describe(unit),
            met,
            baseline_samples,
            ferrum_samples,
        }
    }

    /// A ferrum-only value (CNI latency).
    pub fn absolute(name: &str, unit: &str, aggregate: &str, value: f64, target: Target) -> Metric {
        let met = match target {
            Target::ValueAtMost(t) => Some(value <= t),
            _ => None,
        };
        Metric {
            name: name.into(),
            unit: unit.into(),
            aggregate: aggregate.into(),
            baseline: None,
            ferrum: value,
            ratio: None,
            target,
            target_text: target.describe(unit),
            met,
            baseline_samples: Vec::new(),
            ferrum_samples: vec![value],
        }
    }
}

/// The whole run, as written to `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub settings: serde_json::Value,
    pub method: serde_json::Value,
    pub metrics: Vec<Metric>,
    /// Raw measurements that are not per-repeat samples (per-invocation CNI times).
    pub raw: serde_json::Value,
}

impl Report {
    /// The table printed at the end of a run.
    pub fn table(&self) -> String {
        let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        let mut rows = vec![[
            "metric".to_string(),
            "unit".into(),
            "baseline".into(),
            "ferrum".into(),
            "ratio".into(),
            "target".into(),
            "met?".into(),
        ]];
        for m in &self.metrics {
            rows.push([
                m.name.clone(),
                m.unit.clone(),
                fmt(m.baseline),
                fmt(Some(m.ferrum)),
                m.ratio.map_or("-".into(), |r| format!("{r:.3}")),
                m.target_text.clone(),
                match m.met {
                    Some(true) => "yes".into(),
                    Some(false) => "NO".into(),
                    None => "-".into(),
                },
            ]);
        }
        let mut widths = [0usize; 7];
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        let mut out = String::new();
        for row in &rows {
            let line: Vec<String> = row
                .iter()
                .zip(widths)
                .enumerate()
                .map(|(i, (cell, w))| {
                    if i == 0 || i == 1 || i == 5 {
                        format!("{cell:<w$}")
                    } else {
                        format!("{cell:>w$}")
                    }
                })
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let samples: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&samples, 50.0), Some(50.0));
        assert_eq!(percentile(&samples, 99.0), Some(99.0));
        assert_eq!(percentile(&samples, 100.0), Some(100.0));
        assert_eq!(percentile(&samples, 0.0), Some(1.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn median_and_mean() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.0));
        assert_eq!(mean(&[1.0, 2.0, 6.0]), Some(3.0));
        assert_eq!(max(&[1.0, 9.0, 2.0]), Some(9.0));
    }

    #[test]
    fn targets_decide_met() {
        let tp = Metric::compared(
            "tp",
            "Gbit/s",
            "best",
            max,
            vec![10.0, 8.0],
            vec![8.5, 9.5],
            Target::RatioAtLeast(0.9),
        );
        assert_eq!(tp.baseline, Some(10.0));
        assert_eq!(tp.ferrum, 9.5);
        assert_eq!(tp.met, Some(true));
        let lat = Metric::compared(
            "lat",
            "us",
            "median",
            median,
            vec![10.0, 10.0, 10.0],
            vec![12.0, 11.5, 30.0],
            Target::RatioAtMost(1.1),
        );
        assert_eq!(lat.ratio, Some(1.2));
        assert_eq!(lat.met, Some(false));
        let cni = Metric::absolute("p99", "ms", "p99", 12.0, Target::ValueAtMost(50.0));
        assert_eq!(cni.met, Some(true));
        let report = Report {
            settings: serde_json::json!({}),
            method: serde_json::json!({}),
            metrics: vec![tp, lat, cni],
            raw: serde_json::json!({}),
        };
        let table = report.table();
        assert!(table.contains("NO"), "{table}");
        assert!(table.lines().count() == 4, "{table}");
    }
}
