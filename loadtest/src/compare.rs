//! Comparing two benchmark runs (two folders of JSON reports, as `run-benchmarks` keeps them):
//! the headline figure of each scenario side by side, with the change, and a mark where the
//! current run is worse than the baseline by more than a tolerance. Of a repeated measurement,
//! the median run stands for the run.

use std::path::Path;

use serde_json::Value;

use crate::error::{LoadError, Result};
use crate::tables;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Better {
    Higher,
    Lower,
}

/// The figures compared: report file (without `.json`), path in the report, label, direction.
const FIGURES: &[(&str, &[&str], &str, Better)] = &[
    ("merge-hub-b1-c0", &["changes_merged_per_s"], "merge batch 1: changes/s", Better::Higher),
    ("merge-hub-b1-c10", &["changes_merged_per_s"], "merge batch 1, 10% conflicts: changes/s", Better::Higher),
    ("merge-hub-b100-c0", &["changes_merged_per_s"], "merge batch 100: changes/s", Better::Higher),
    ("merge-hub-b100-c10", &["changes_merged_per_s"], "merge batch 100, 10% conflicts: changes/s", Better::Higher),
    ("merge-hub-b1000-c0", &["changes_merged_per_s"], "merge batch 1000: changes/s", Better::Higher),
    ("merge-hub-b1000-c10", &["changes_merged_per_s"], "merge batch 1000, 10% conflicts: changes/s", Better::Higher),
    ("merge-hub-b1-c0", &["ack_latency", "p99_ms"], "merge batch 1: push→ack p99 ms", Better::Lower),
    ("d2d", &["delivery_latency", "p50_ms"], "device→device p50 ms", Better::Lower),
    ("d2d", &["delivery_latency", "p99_ms"], "device→device p99 ms", Better::Lower),
    ("fanout-hub-1000", &["deltas_per_s"], "fan-out 1,000 subscribers: deliveries/s", Better::Higher),
    ("fanout-hub-1000", &["delivery_latency", "p99_ms"], "fan-out 1,000 subscribers: p99 ms", Better::Lower),
    ("fanout-hub-10000", &["deltas_per_s"], "fan-out 10,000 subscribers: deliveries/s", Better::Higher),
    ("fanout-hub-10000", &["delivery_latency", "p99_ms"], "fan-out 10,000 subscribers: p99 ms", Better::Lower),
    ("dashboards-supabase", &["client_groups", "supabase", "deliveries_per_s"], "Supabase 1,000 subscribers: deliveries/s", Better::Higher),
    ("dashboards-supabase", &["client_groups", "supabase", "delivery_latency", "p99_ms"], "Supabase 1,000 subscribers: p99 ms", Better::Lower),
    ("idle-10000", &["hub_kib_per_connection"], "idle 10,000: KiB per connection", Better::Lower),
    ("idle-19000", &["hub_kib_per_connection"], "idle 19,000: KiB per connection", Better::Lower),
    ("idle-10000-hello", &["hub_kib_per_connection"], "idle 10,000, token in hello: KiB per connection", Better::Lower),
    ("storm", &["all_caught_up_s"], "storm: s until all caught up", Better::Lower),
    ("storm-restart", &["all_caught_up_s"], "storm after restart: s until all caught up", Better::Lower),
    ("replay-400", &["ack_latency", "p99_ms"], "replay 400 stores: push→ack p99 ms", Better::Lower),
];

/// One compared figure.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub label: &'static str,
    pub baseline: f64,
    pub current: f64,
    /// Relative change, current against baseline (0.1 = 10% more).
    pub change: f64,
    /// Worse than the baseline by more than the tolerance.
    pub worse: bool,
}

fn figure(report: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(report, |v, k| v.get(*k)).and_then(Value::as_f64)
}

/// Compare the figures found in both runs; `load` reads a report of a run by name.
pub fn compare_with(
    baseline: impl Fn(&str) -> Option<Value>,
    current: impl Fn(&str) -> Option<Value>,
    tolerance: f64,
) -> Vec<Row> {
    FIGURES
        .iter()
        .filter_map(|(file, path, label, better)| {
            let (b, c) = (figure(&baseline(file)?, path)?, figure(&current(file)?, path)?);
            let change = if b != 0.0 { (c - b) / b.abs() } else { 0.0 };
            let worse = match better {
                Better::Higher => change < -tolerance,
                Better::Lower => change > tolerance,
            };
            Some(Row { label, baseline: b, current: c, change, worse })
        })
        .collect()
}

/// Compare two results folders; the table, and whether anything got worse.
pub fn compare(baseline: &Path, current: &Path, tolerance: f64) -> Result<(String, bool)> {
    let rows = compare_with(|n| tables::median_report(baseline, n), |n| tables::median_report(current, n), tolerance);
    if rows.is_empty() {
        return Err(LoadError::Usage(format!("no report is in both {} and {}", baseline.display(), current.display())));
    }
    let mut out = format!("  {:<44} {:>12} {:>12} {:>8}\n", "figure", "baseline", "current", "change");
    for r in &rows {
        out.push_str(&format!(
            "  {:<44} {:>12.1} {:>12.1} {:>+7.1}%{}\n",
            r.label,
            r.baseline,
            r.current,
            r.change * 100.0,
            if r.worse { "  worse" } else { "" }
        ));
    }
    let worse = rows.iter().filter(|r| r.worse).count();
    out.push_str(&format!("  {worse} of {} figures worse than the baseline by more than {:.0}%\n", rows.len(), tolerance * 100.0));
    Ok((out, worse > 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn marks_what_got_worse_in_the_direction_that_matters() {
        let baseline = |name: &str| match name {
            "merge-hub-b100-c0" => Some(json!({"changes_merged_per_s": 10000.0})),
            "d2d" => Some(json!({"delivery_latency": {"p50_ms": 2.0, "p99_ms": 8.0}})),
            "storm" => Some(json!({"all_caught_up_s": 30.0})),
            _ => None,
        };
        let current = |name: &str| match name {
            "merge-hub-b100-c0" => Some(json!({"changes_merged_per_s": 9000.0})),
            "d2d" => Some(json!({"delivery_latency": {"p50_ms": 2.04, "p99_ms": 12.0}})),
            "storm" => Some(json!({"all_caught_up_s": 20.0})),
            "idle-10000" => Some(json!({"hub_kib_per_connection": 13.0})),
            _ => None,
        };
        let rows = compare_with(baseline, current, 0.05);
        let by_label = |l: &str| rows.iter().find(|r| r.label == l).unwrap().clone();
        // Fewer changes per second is worse; more latency is worse; less storm time is better.
        assert!(by_label("merge batch 100: changes/s").worse);
        assert!((by_label("merge batch 100: changes/s").change + 0.1).abs() < 1e-9);
        assert!(!by_label("device→device p50 ms").worse, "2% is within the tolerance");
        assert!(by_label("device→device p99 ms").worse);
        assert!(!by_label("storm: s until all caught up").worse);
        // A figure missing from either run is left out.
        assert_eq!(rows.len(), 4);
    }
}
