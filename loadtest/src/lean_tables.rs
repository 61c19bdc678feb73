//! The tables of `loadtest/run-lean-log`: the previous hub (a change-log row per change) against
//! this one (a log record per group commit), from the reports it keeps (`lean-*.json`), as
//! markdown. Per-change figures are CPU time or WAL over the changes of the measured window, each
//! the median over the runs; throughput is the median run's, with the range of the runs; latency
//! is that of the run with the median throughput (of the median p99, for device→device latency;
//! of the median catch-up time, for the storm).

use std::path::Path;

use serde_json::Value;

use crate::tables::{error_count, median_run_by, num, rate_cell, repeated_runs};

/// The merge scenarios the script runs: batch sizes and conflict rates (percent).
const BATCHES: [u32; 2] = [100, 1000];
const CONFLICTS: [u32; 2] = [0, 10];

/// The writers of a merge scenario: label and report name (`lean-{name}-b{batch}-c{conflict}`).
const OLD_HUB: (&str, &str) = ("previous hub", "old");
const NEW_HUB: (&str, &str) = ("this hub", "new");
const PLAIN: (&str, &str) = ("plain rows (Postgres alone)", "pg");
const PREVIOUS_LOG: (&str, &str) = ("with the previous log (Postgres alone)", "pglog");
const LEAN_LOG: (&str, &str) = ("with the lean log (Postgres alone)", "pglean");

/// The median of some figures (the lower middle one of an even count).
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    values.get(values.len().checked_sub(1)? / 2).copied()
}

/// A run's `field` (seconds or bytes) per change of its window, times `scale`; none when the
/// report lacks the field or merged nothing.
fn per_change(run: &Value, field: &str, scale: f64) -> Option<f64> {
    let changes = num(run, &["changes_merged_per_s"]) * num(run, &["duration_s"]);
    let value = run.get(field)?.as_f64()?;
    (changes > 0.0).then(|| value * scale / changes)
}

/// What one writer's runs of a merge scenario cost.
#[derive(Debug, Clone, PartialEq)]
struct Costs {
    runs: usize,
    /// Changes per second of the median run.
    rate: f64,
    postgres_us: Option<f64>,
    wal_bytes: Option<f64>,
    /// None for Postgres alone.
    hub_us: Option<f64>,
    loadgen_us: Option<f64>,
    /// Push→ack (a batch's transaction, for Postgres alone) p50 and p99 of the median run, ms.
    ack_ms: (f64, f64),
}

impl Costs {
    fn of(runs: &[Value]) -> Option<Costs> {
        let (median_run, _, _) = median_run_by(runs, &["changes_merged_per_s"])?;
        let each = |figure: &dyn Fn(&Value) -> Option<f64>| median(runs.iter().filter_map(figure).collect());
        Some(Costs {
            runs: runs.len(),
            rate: num(median_run, &["changes_merged_per_s"]),
            postgres_us: each(&|r| per_change(r, "postgres_cpu_s", 1e6)),
            wal_bytes: each(&|r| per_change(r, "wal_bytes", 1.0)),
            hub_us: each(&|r| per_change(r, "hub_cpu_s", 1e6).filter(|_| r["scenario"] == "devices")),
            loadgen_us: each(&|r| per_change(r, "loadgen_cpu_s", 1e6)),
            ack_ms: (num(median_run, &["ack_latency", "p50_ms"]), num(median_run, &["ack_latency", "p99_ms"])),
        })
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn cell(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "–".into(), |v| format!("{v:.decimals$}"))
}

const MERGE_HEADER: &str = "| writer | runs | changes/s (range) | ÷ plain rows | Postgres CPU µs/change | × plain rows | WAL B/change | × plain rows | hub CPU µs/change | load generator CPU µs/change | push→ack p50 / p99 (ms) |\n\
    |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";

/// A writer's row, with its ratios to plain rows.
fn costs_row(label: &str, runs: &[Value], costs: &Costs, plain: Option<&Costs>) -> String {
    let to_plain = |f: fn(&Costs) -> Option<f64>| cell(ratio(f(costs), plain.and_then(f)), 2);
    format!(
        "| {label} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} / {:.1} |\n",
        costs.runs,
        rate_cell(runs),
        to_plain(|c| Some(c.rate)),
        cell(costs.postgres_us, 1),
        to_plain(|c| c.postgres_us),
        cell(costs.wal_bytes, 0),
        to_plain(|c| c.wal_bytes),
        cell(costs.hub_us, 1),
        cell(costs.loadgen_us, 1),
        costs.ack_ms.0,
        costs.ack_ms.1,
    )
}

/// Each figure of `new` over the same of `old`.
fn ratio_row(label: &str, new: &Costs, old: &Costs) -> String {
    let r = |f: fn(&Costs) -> Option<f64>| cell(ratio(f(new), f(old)), 2);
    format!(
        "| *{label}* | | {} | | {} | | {} | | {} | {} | {} (p99) |\n",
        r(|c| Some(c.rate)),
        r(|c| c.postgres_us),
        r(|c| c.wal_bytes),
        r(|c| c.hub_us),
        r(|c| c.loadgen_us),
        r(|c| Some(c.ack_ms.1)),
    )
}

/// A target on the ratio of this hub's figure to the previous hub's.
#[derive(Debug, Clone, Copy)]
enum Target {
    AtMost(f64, &'static str),
    AtLeast(f64, &'static str),
}

fn verdict(name: &str, ratio: Option<f64>, target: Target) -> String {
    let Some(r) = ratio else { return format!("{name}: not measured") };
    let (met, bound) = match target {
        Target::AtMost(limit, words) => (r <= limit, format!("at most {words}")),
        Target::AtLeast(limit, words) => (r >= limit, format!("at least {words}")),
    };
    format!("{name} {r:.2}× the previous hub's (target {bound}: {})", if met { "met" } else { "not met" })
}

/// The targets of the lean log, this hub against the previous one.
fn verdicts(new: &Costs, old: &Costs) -> String {
    let third = Target::AtMost(1.0 / 3.0, "⅓");
    [
        verdict("Postgres CPU per change", ratio(new.postgres_us, old.postgres_us), third),
        verdict("WAL per change", ratio(new.wal_bytes, old.wal_bytes), third),
        verdict("changes/s", Some(new.rate / old.rate.max(1e-9)), Target::AtLeast(2.0, "2×")),
    ]
    .join("; ")
}

/// One merge scenario: both hubs and the three ways of writing with Postgres alone.
fn merge_table(dir: &Path, batch: u32, conflict: u32) -> String {
    let runs = |name: &str| repeated_runs(dir, &format!("lean-{name}-b{batch}-c{conflict}"));
    let plain = Costs::of(&runs(PLAIN.1));
    let mut out = format!("#### Batches of {batch}, {conflict}% conflicts\n\n{MERGE_HEADER}");
    let mut costs = Vec::new();
    for (label, name) in [OLD_HUB, NEW_HUB, PLAIN, PREVIOUS_LOG, LEAN_LOG] {
        let runs = runs(name);
        let Some(c) = Costs::of(&runs) else {
            out.push_str(&format!("| {label} | 0 | not run | | | | | | | | |\n"));
            costs.push(None);
            continue;
        };
        out.push_str(&costs_row(label, &runs, &c, plain.as_ref()));
        costs.push(Some(c));
        let earlier = |i: usize| costs.get(i).cloned().flatten();
        match (name, earlier(0), earlier(1), earlier(3), earlier(4)) {
            ("new", Some(old), Some(new), _, _) => out.push_str(&ratio_row("this hub ÷ previous hub", &new, &old)),
            ("pglean", _, _, Some(previous), Some(lean)) => out.push_str(&ratio_row("lean log ÷ previous log", &lean, &previous)),
            _ => {}
        }
    }
    if let (Some(Some(old)), Some(Some(new))) = (costs.first(), costs.get(1)) {
        out.push_str(&format!("\nTargets: {}.\n", verdicts(new, old)));
    }
    out
}

/// This hub against the previous one in every merge scenario, in one table.
fn summary_table(dir: &Path) -> String {
    let mut out = String::from(
        "| batch | conflicts | changes/s previous → this (×) | Postgres CPU µs/change (×) | WAL B/change (×) | hub CPU µs/change (×) | load generator CPU µs/change (×) |\n\
         |---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for batch in BATCHES {
        for conflict in CONFLICTS {
            let costs = |name: &str| Costs::of(&repeated_runs(dir, &format!("lean-{name}-b{batch}-c{conflict}")));
            let (Some(old), Some(new)) = (costs(OLD_HUB.1), costs(NEW_HUB.1)) else {
                out.push_str(&format!("| {batch} | {conflict}% | not run | | | | |\n"));
                continue;
            };
            let pair = |f: fn(&Costs) -> Option<f64>, decimals: usize| {
                format!("{} → {} ({})", cell(f(&old), decimals), cell(f(&new), decimals), cell(ratio(f(&new), f(&old)), 2))
            };
            out.push_str(&format!(
                "| {batch} | {conflict}% | {} | {} | {} | {} | {} |\n",
                pair(|c| Some(c.rate), 0),
                pair(|c| c.postgres_us, 1),
                pair(|c| c.wal_bytes, 0),
                pair(|c| c.hub_us, 1),
                pair(|c| c.loadgen_us, 1),
            ));
        }
    }
    out
}

/// Device→device latency at batches of one, previous hub against this one.
fn latency_table(dir: &Path) -> String {
    let mut out = String::from(
        "| hub | runs | device→device p50 / p99 / max (ms) | p99 of each run (ms) | push→ack p50 / p99 (ms) | changes/s merged | hub CPU µs/change | errors |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let p99 = ["delivery_latency", "p99_ms"];
    let mut medians = Vec::new();
    for (label, name) in [OLD_HUB, NEW_HUB] {
        let runs = repeated_runs(dir, &format!("lean-d2d-{name}"));
        let Some((r, _, _)) = median_run_by(&runs, &p99) else {
            out.push_str(&format!("| {label} | 0 | not run | | | | | |\n"));
            continue;
        };
        let mut each: Vec<f64> = runs.iter().map(|r| num(r, &p99)).collect();
        each.sort_by(f64::total_cmp);
        out.push_str(&format!(
            "| {label} | {} | {:.1} / {:.1} / {:.1} | {} | {:.1} / {:.1} | {:.0} | {} | {} |\n",
            runs.len(),
            num(r, &["delivery_latency", "p50_ms"]),
            num(r, &p99),
            num(r, &["delivery_latency", "max_ms"]),
            each.iter().map(|p| format!("{p:.1}")).collect::<Vec<_>>().join(", "),
            num(r, &["ack_latency", "p50_ms"]),
            num(r, &["ack_latency", "p99_ms"]),
            num(r, &["changes_merged_per_s"]),
            cell(per_change(r, "hub_cpu_s", 1e6), 1),
            error_count(r),
        ));
        medians.push(num(r, &p99));
    }
    if let [old, new] = medians[..] {
        out.push_str(&format!("\nDevice→device p99, this hub ÷ previous hub: {}.\n", cell(ratio(Some(new), Some(old)), 2)));
    }
    out
}

/// The reconnect storm, with and without a hub restart, previous hub against this one.
fn storm_table(dir: &Path) -> String {
    let mut out = String::from(
        "| hub | hub restarted | runs | back | retries after busy | half caught up (s) | all caught up (s) | all queued acked (s) | catch-up deltas | hub CPU (s) | hub RSS max (MiB) |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (variant, restarted) in [("storm", "no"), ("storm-restart", "yes")] {
        let mut medians = Vec::new();
        for (label, name) in [OLD_HUB, NEW_HUB] {
            let runs = repeated_runs(dir, &format!("lean-{variant}-{name}"));
            let Some((r, _, _)) = median_run_by(&runs, &["all_caught_up_s"]) else {
                out.push_str(&format!("| {label} | {restarted} | 0 | not run | | | | | | | |\n"));
                continue;
            };
            out.push_str(&format!(
                "| {label} | {restarted} | {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} | {:.1} | {:.0} |\n",
                runs.len(),
                num(r, &["devices_back"]),
                num(r, &["retries"]),
                num(r, &["median_caught_up_s"]),
                num(r, &["all_caught_up_s"]),
                num(r, &["all_acked_s"]),
                num(r, &["catch_up_deltas"]),
                num(r, &["hub_cpu_s"]),
                num(r, &["hub_rss_max_kib"]) / 1024.0,
            ));
            medians.push(r.clone());
        }
        if let [old, new] = &medians[..] {
            let r = |path: &[&str]| cell(ratio(Some(num(new, path)), Some(num(old, path))), 2);
            out.push_str(&format!(
                "| *this hub ÷ previous hub* | | | | | {} | {} | {} | | {} | |\n",
                r(&["median_caught_up_s"]),
                r(&["all_caught_up_s"]),
                r(&["all_acked_s"]),
                r(&["hub_cpu_s"]),
            ));
        }
    }
    out
}

/// Every table of a `run-lean-log` run, as markdown.
pub fn render(dir: &Path) -> String {
    let mut out = format!("### Merge throughput, this hub against the previous one\n\n{}\n", summary_table(dir));
    for batch in BATCHES {
        for conflict in CONFLICTS {
            out.push_str(&merge_table(dir, batch, conflict));
            out.push('\n');
        }
    }
    out.push_str(&format!("### Device→device latency, batches of one\n\n{}\n", latency_table(dir)));
    out.push_str(&format!("### Reconnect storm\n\n{}", storm_table(dir)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn merge_run(scenario: &str, rate: f64, postgres_cpu_s: f64, wal_bytes: Option<u64>, hub_cpu_s: f64) -> Value {
        json!({
            "scenario": scenario, "changes_merged_per_s": rate, "duration_s": 10.0,
            "postgres_cpu_s": postgres_cpu_s, "wal_bytes": wal_bytes, "hub_cpu_s": hub_cpu_s, "loadgen_cpu_s": 1.0,
            "ack_latency": {"p50_ms": 100.0, "p99_ms": 200.0 + rate / 1000.0}
        })
    }

    fn folder(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("synchub-lean-tables-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write(dir: &Path, name: &str, report: &Value) {
        std::fs::write(dir.join(format!("{name}.json")), report.to_string()).unwrap();
    }

    #[test]
    fn costs_are_per_change_medians_over_the_runs() {
        // 10 s at 10,000/s: 100,000 changes a run.
        let runs = [
            merge_run("devices", 10_000.0, 3.0, Some(90_000_000), 5.0),
            merge_run("devices", 12_000.0, 1.2, None, 6.0),
            merge_run("devices", 8_000.0, 2.4, Some(40_000_000), 4.0),
        ];
        let costs = Costs::of(&runs).unwrap();
        assert_eq!(costs.runs, 3);
        assert_eq!(costs.rate, 10_000.0);
        // Postgres µs per change: 3 s / 100,000, 1.2 s / 120,000, 2.4 s / 80,000.
        assert_eq!(costs.postgres_us.map(|v| v.round()), Some(30.0));
        // WAL of the two runs that measured it: 900 and 500 B per change; the lower middle.
        assert_eq!(costs.wal_bytes.map(|v| v.round()), Some(500.0));
        assert_eq!(costs.hub_us.map(|v| v.round()), Some(50.0));
        assert_eq!(costs.ack_ms, (100.0, 210.0));
        // Postgres alone has no hub.
        assert_eq!(Costs::of(&[merge_run("pg-ceiling", 1.0, 1.0, None, 0.0)]).unwrap().hub_us, None);
        assert_eq!(Costs::of(&[]), None);
    }

    #[test]
    fn verdicts_compare_with_the_previous_hub() {
        let old = Costs::of(&[merge_run("devices", 10_000.0, 6.0, Some(300_000_000), 5.0)]).unwrap();
        let new = Costs::of(&[merge_run("devices", 15_000.0, 2.0, Some(150_000_000), 5.0)]).unwrap();
        assert_eq!(
            verdicts(&new, &old),
            "Postgres CPU per change 0.22× the previous hub's (target at most ⅓: met); \
             WAL per change 0.33× the previous hub's (target at most ⅓: met); \
             changes/s 1.50× the previous hub's (target at least 2×: not met)"
        );
    }

    #[test]
    fn a_merge_table_has_both_hubs_the_baselines_and_their_ratios() {
        let dir = folder("merge");
        for run in 1..=3 {
            let r = run as f64;
            write(&dir, &format!("lean-old-b100-c0-r{run}"), &merge_run("devices", 10_000.0 * r, 6.0 * r, Some(3_000_000_000), 5.0 * r));
            write(&dir, &format!("lean-new-b100-c0-r{run}"), &merge_run("devices", 20_000.0 * r, 4.0 * r, Some(2_000_000_000), 5.0 * r));
            write(&dir, &format!("lean-pg-b100-c0-r{run}"), &merge_run("pg-ceiling", 100_000.0, 2.0, Some(1_000_000_000), 0.0));
            write(&dir, &format!("lean-pglog-b100-c0-r{run}"), &merge_run("pg-ceiling", 50_000.0, 5.0, Some(5_000_000_000), 0.0));
        }
        let table = merge_table(&dir, 100, 0);
        let summary = summary_table(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        // The median run: 20,000/s and 200,000 changes; 6 µs, 15,000 B, 50 µs and 10 µs of
        // Postgres, WAL, hub and load generator per change over 100,000, 200,000 and 300,000.
        assert!(
            table.contains("| previous hub | 3 | 20000 (10000–30000) | 0.20 | 60.0 | 30.00 | 15000 | 15.00 | 50.0 | 5.0 | 100.0 / 220.0 |"),
            "{table}"
        );
        assert!(table.contains("| this hub | 3 | 40000 (20000–60000) | 0.40 | 20.0 | 10.00 | 5000 | 5.00 | 25.0 | 2.5 | 100.0 / 240.0 |"), "{table}");
        assert!(table.contains("| *this hub ÷ previous hub* | | 2.00 | | 0.33 | | 0.33 | | 0.50 | 0.50 | 1.09 (p99) |"), "{table}");
        assert!(table.contains("| plain rows (Postgres alone) | 3 | 100000 (100000–100000) | 1.00 | 2.0 | 1.00 | 1000 | 1.00 | – | 1.0 |"), "{table}");
        assert!(table.contains("| with the lean log (Postgres alone) | 0 | not run |"), "{table}");
        assert!(!table.contains("lean log ÷ previous log"), "{table}");
        assert!(table.contains("Targets: Postgres CPU per change 0.33×"), "{table}");
        assert!(summary.contains("| 100 | 0% | 20000 → 40000 (2.00) | 60.0 → 20.0 (0.33) | 15000 → 5000 (0.33) | 50.0 → 25.0 (0.50) |"), "{summary}");
        assert!(summary.contains("| 1000 | 10% | not run |"), "{summary}");
    }

    #[test]
    fn latency_and_storm_tables_set_the_hubs_side_by_side() {
        let dir = folder("latency");
        for (run, old, new) in [(1, 5.0, 4.0), (2, 7.0, 6.0), (3, 6.0, 9.0)] {
            let d2d = |p99: f64| {
                json!({"delivery_latency": {"p50_ms": 2.0, "p99_ms": p99, "max_ms": 20.0}, "ack_latency": {"p50_ms": 1.0, "p99_ms": 3.0},
                       "changes_merged_per_s": 100.0, "duration_s": 30.0, "hub_cpu_s": 0.3, "errors": {}})
            };
            write(&dir, &format!("lean-d2d-old-r{run}"), &d2d(old));
            write(&dir, &format!("lean-d2d-new-r{run}"), &d2d(new));
        }
        let storm = |all: f64| {
            json!({"devices_back": 10000, "retries": 0, "median_caught_up_s": 2.0, "all_caught_up_s": all, "all_acked_s": 8.0,
                   "catch_up_deltas": 1000000, "hub_cpu_s": 5.0, "hub_rss_max_kib": 1048576})
        };
        write(&dir, "lean-storm-old", &storm(4.0));
        write(&dir, "lean-storm-new", &storm(3.0));
        let (latency, storms) = (latency_table(&dir), storm_table(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(latency.contains("| previous hub | 3 | 2.0 / 6.0 / 20.0 | 5.0, 6.0, 7.0 | 1.0 / 3.0 | 100 | 100.0 | 0 |"), "{latency}");
        assert!(latency.contains("| this hub | 3 | 2.0 / 6.0 / 20.0 | 4.0, 6.0, 9.0 |"), "{latency}");
        assert!(latency.contains("this hub ÷ previous hub: 1.00."), "{latency}");
        assert!(storms.contains("| this hub | no | 1 | 10000 | 0 | 2.0 | 3.0 | 8.0 | 1000000 | 5.0 | 1024 |"), "{storms}");
        assert!(storms.contains("| *this hub ÷ previous hub* | | | | | 1.00 | 0.75 | 1.00 | | 1.00 | |"), "{storms}");
        assert!(storms.contains("| previous hub | yes | 0 | not run |"), "{storms}");
    }
}
