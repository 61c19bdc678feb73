//! Renders the JSON reports of a benchmark run (`run-benchmarks` writes them) as the tables of
//! `BENCHMARKS.md`, replacing what stands between each table's begin and end markers.

use std::path::Path;

use serde_json::Value;

use crate::error::{LoadError, Result};

pub(crate) fn load(dir: &Path, name: &str) -> Option<Value> {
    let text = std::fs::read_to_string(dir.join(format!("{name}.json"))).ok()?;
    serde_json::from_str(&text).ok()
}

pub(crate) fn num(v: &Value, path: &[&str]) -> f64 {
    path.iter().try_fold(v, |v, k| v.get(*k)).and_then(Value::as_f64).unwrap_or(0.0)
}

/// The time an idle run's hub CPU was measured over (reports before the field: the hold).
fn idle_window_s(report: &Value) -> f64 {
    Some(num(report, &["idle_window_s"])).filter(|w| *w > 0.0).unwrap_or_else(|| num(report, &["parameters", "hold_secs"]).max(1.0))
}

/// Errors of a report, all codes together.
pub(crate) fn error_count(report: &Value) -> u64 {
    report.get("errors").and_then(Value::as_object).map(|m| m.values().filter_map(Value::as_u64).sum()).unwrap_or(0)
}

/// The runs of one measurement: `{name}-r1.json`, `{name}-r2.json`, … as `run-benchmarks`
/// repeats them, or a single `{name}.json`.
pub(crate) fn repeated_runs(dir: &Path, name: &str) -> Vec<Value> {
    let repeated: Vec<Value> = (1..).map_while(|run| load(dir, &format!("{name}-r{run}"))).collect();
    if repeated.is_empty() {
        load(dir, name).into_iter().collect()
    } else {
        repeated
    }
}

/// The run with the median of the figure at `path` (the lower middle one of an even count), and
/// the lowest and highest of that figure over all runs.
pub(crate) fn median_run_by<'a>(runs: &'a [Value], path: &[&str]) -> Option<(&'a Value, f64, f64)> {
    let figure = |r: &Value| num(r, path);
    let mut sorted: Vec<&Value> = runs.iter().collect();
    sorted.sort_by(|a, b| figure(a).total_cmp(&figure(b)));
    let median = *sorted.get((sorted.len().checked_sub(1)?) / 2)?;
    Some((median, figure(sorted[0]), figure(sorted[sorted.len() - 1])))
}

/// The run with the median throughput, and the lowest and highest throughput of all.
fn median_run(runs: &[Value]) -> Option<(&Value, f64, f64)> {
    median_run_by(runs, &["changes_merged_per_s"])
}

/// The figure a repeated measurement's runs are ranked by: device→device p99 for the latency
/// runs, throughput for the others.
fn ranking_figure(name: &str) -> &'static [&'static str] {
    if name == "d2d" {
        &["delivery_latency", "p99_ms"]
    } else {
        &["changes_merged_per_s"]
    }
}

/// A report by name, as [`crate::compare`] reads it: the median run of a repeated measurement.
pub fn median_report(dir: &Path, name: &str) -> Option<Value> {
    median_run_by(&repeated_runs(dir, name), ranking_figure(name)).map(|(run, _, _)| run.clone())
}

/// A median rate, with the range of the runs when there were several.
pub(crate) fn rate_cell(runs: &[Value]) -> String {
    match median_run(runs) {
        None => "not run".into(),
        Some((median, low, high)) if runs.len() > 1 => {
            format!("{:.0} ({low:.0}–{high:.0})", num(median, &["changes_merged_per_s"]))
        }
        Some((median, _, _)) => format!("{:.0}", num(median, &["changes_merged_per_s"])),
    }
}

/// Merge throughput of the hub against the plain-SQL ceiling, per batch size and conflict rate,
/// and against Postgres writing the hub's bookkeeping as well (`pg-ceiling --with-log`), when run.
/// Each figure is the median of the runs (with their range); ratios are of medians, and latency
/// and CPU (the hub's, Postgres's, and what the hypervisor took from the machine) come from the
/// hub's median run.
fn merge_table(dir: &Path) -> String {
    let mut out = String::from(
        "| batch | conflicts | runs | hub changes/s (range) | ceiling changes/s (range) | ratio | with the hub's log, changes/s (range) | ratio | push→ack p50 / p99 (ms) | conflicts logged | hub CPU s | Postgres CPU s | CPU taken by the hypervisor s |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let ratio = |hub: f64, base: f64| if base > 0.0 { format!("{:.2}", hub / base) } else { String::new() };
    let median_rate = |runs: &[Value]| median_run(runs).map_or(0.0, |(r, _, _)| num(r, &["changes_merged_per_s"]));
    for batch in [1, 100, 1000] {
        for conflict in ["0", "10"] {
            let hub = repeated_runs(dir, &format!("merge-hub-b{batch}-c{conflict}"));
            let pg = repeated_runs(dir, &format!("merge-pg-b{batch}-c{conflict}"));
            let logged = repeated_runs(dir, &format!("merge-pglog-b{batch}-c{conflict}"));
            let Some((hub_median, _, _)) = median_run(&hub).filter(|_| !pg.is_empty()) else {
                out.push_str(&format!("| {batch} | {conflict}% | | not run | | | | | | | | | |\n"));
                continue;
            };
            let hub_rate = num(hub_median, &["changes_merged_per_s"]);
            out.push_str(&format!(
                "| {batch} | {conflict}% | {} | {} | {} | {} | {} | {} | {:.1} / {:.1} | {:.0} | {:.1} | {:.1} | {:.1} |\n",
                hub.len(),
                rate_cell(&hub),
                rate_cell(&pg),
                ratio(hub_rate, median_rate(&pg)),
                rate_cell(&logged),
                ratio(hub_rate, median_rate(&logged)),
                num(hub_median, &["ack_latency", "p50_ms"]),
                num(hub_median, &["ack_latency", "p99_ms"]),
                num(hub_median, &["outcomes", "conflict"]),
                num(hub_median, &["hub_cpu_s"]),
                num(hub_median, &["postgres_cpu_s"]),
                num(hub_median, &["steal_cpu_s"]),
            ));
        }
    }
    out
}

/// Device-to-device latency at a steady rate: the run with the median p99 of its measured
/// window, every run's p99, the median run's p99 with its warm-up counted too, and the CPU time
/// the hypervisor took from the machine in that run.
fn latency_table(dir: &Path) -> String {
    let mut out = String::from(
        "| devices | changes/s offered | changes/s merged | deltas/s | runs | warm-up (s) | device→device p50 / p99 / max (ms) | p99 of each run (ms) | p99 with the warm-up (ms) | push→ack p50 / p99 (ms) | CPU taken by the hypervisor (s) | errors |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let runs = repeated_runs(dir, "d2d");
    let p99 = ["delivery_latency", "p99_ms"];
    let Some((r, _, _)) = median_run_by(&runs, &p99) else {
        out.push_str("| not run | | | | | | | | | | | |\n");
        return out;
    };
    let devices = num(r, &["parameters", "devices"]);
    let offered = devices * num(r, &["parameters", "rate"]);
    let mut each: Vec<f64> = runs.iter().map(|run| num(run, &p99)).collect();
    each.sort_by(f64::total_cmp);
    let each = each.iter().map(|p| format!("{p:.1}")).collect::<Vec<_>>().join(", ");
    let with_warmup = match r.get("delivery_latency_with_warmup").filter(|v| !v.is_null()) {
        Some(whole) => format!("{:.1}", num(whole, &["p99_ms"])),
        None => "no warm-up".into(),
    };
    out.push_str(&format!(
        "| {devices:.0} | {offered:.0} | {:.0} | {:.0} | {} | {:.0} | {:.1} / {:.1} / {:.1} | {each} | {with_warmup} | {:.1} / {:.1} | {:.1} | {:.0} |\n",
        num(r, &["changes_merged_per_s"]),
        num(r, &["deltas_per_s"]),
        runs.len(),
        num(r, &["warmup_s"]),
        num(r, &["delivery_latency", "p50_ms"]),
        num(r, &p99),
        num(r, &["delivery_latency", "max_ms"]),
        num(r, &["ack_latency", "p50_ms"]),
        num(r, &["ack_latency", "p99_ms"]),
        num(r, &["steal_cpu_s"]),
        error_count(r),
    ));
    out
}

/// Dashboards watching filtered subscriptions while devices write.
fn dashboards_table(dir: &Path) -> String {
    let mut out = String::from(
        "| dashboards | tenants | changes/s offered | changes/s merged | subscription deltas/s | push→dashboard p50 / p99 / max (ms) | push→ack p50 / p99 (ms) | snapshot p50 / p99 (ms) | errors | hub CPU (s) |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    match load(dir, "dashboards") {
        Some(r) => out.push_str(&format!(
            "| {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} / {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {} | {:.1} |\n",
            num(&r, &["parameters", "dashboards"]),
            num(&r, &["parameters", "tenants"]),
            num(&r, &["parameters", "rate"]),
            num(&r, &["changes_merged_per_s"]),
            num(&r, &["deltas_per_s"]),
            num(&r, &["delivery_latency", "p50_ms"]),
            num(&r, &["delivery_latency", "p99_ms"]),
            num(&r, &["delivery_latency", "max_ms"]),
            num(&r, &["ack_latency", "p50_ms"]),
            num(&r, &["ack_latency", "p99_ms"]),
            num(&r, &["parameters", "snapshot_p50_ms"]),
            num(&r, &["parameters", "snapshot_p99_ms"]),
            error_count(&r),
            num(&r, &["hub_cpu_s"]),
        )),
        None => out.push_str("| not run | | | | | | | | | |\n"),
    }
    out
}

/// Native dashboards and Supabase Realtime clients watching the same rows in one run.
fn supabase_table(dir: &Path) -> String {
    let mut out = String::from(
        "| clients (one run) | sockets | deliveries/s | timed deliveries | push→delivery p50 / p99 / max (ms) | subscribed p50 / p99 (ms) |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    let Some(r) = load(dir, "dashboards-supabase") else {
        out.push_str("| not run | | | | | |\n");
        return out;
    };
    let latency = |base: &[&str]| {
        let at = |q: &str| num(&r, &[base, &[q]].concat());
        format!("{:.1} / {:.1} / {:.1}", at("p50_ms"), at("p99_ms"), at("max_ms"))
    };
    out.push_str(&format!(
        "| native dashboards (`sub_delta`, MessagePack; snapshot first) | {:.0} | {:.0} | {:.0} | {} | {:.1} / {:.1} (snapshot) |\n",
        num(&r, &["connections_opened"]),
        num(&r, &["deltas_per_s"]),
        num(&r, &["delivery_latency", "count"]),
        latency(&["delivery_latency"]),
        num(&r, &["parameters", "snapshot_p50_ms"]),
        num(&r, &["parameters", "snapshot_p99_ms"]),
    ));
    let group = ["client_groups", "supabase"];
    out.push_str(&format!(
        "| Supabase Realtime, Phoenix vsn {} (`postgres_changes`, JSON) | {:.0} | {:.0} | {:.0} | {} | {:.1} / {:.1} (join) |\n",
        r["parameters"]["supabase_vsn"].as_str().unwrap_or("?"),
        num(&r, &[&group[..], &["connections_opened"]].concat()),
        num(&r, &[&group[..], &["deliveries_per_s"]].concat()),
        num(&r, &[&group[..], &["delivery_latency", "count"]].concat()),
        latency(&[&group[..], &["delivery_latency"]].concat()),
        num(&r, &["parameters", "supabase_join_p50_ms"]),
        num(&r, &["parameters", "supabase_join_p99_ms"]),
    ));
    let secs = num(&r, &["duration_s"]).max(1e-6);
    out.push_str(&format!(
        "\nSame run: {:.0} tenants, {:.0} changes/s offered, {:.0} merged, push→ack p50 / p99 {:.1} / {:.1} ms, {} errors; \
         over {:.1} s the hub used {:.1} CPU s ({:.0}% of one core), Postgres {:.1}, the load generator {:.1}.\n",
        num(&r, &["parameters", "tenants"]),
        num(&r, &["parameters", "rate"]),
        num(&r, &["changes_merged_per_s"]),
        num(&r, &["ack_latency", "p50_ms"]),
        num(&r, &["ack_latency", "p99_ms"]),
        error_count(&r),
        secs,
        num(&r, &["hub_cpu_s"]),
        num(&r, &["hub_cpu_s"]) / secs * 100.0,
        num(&r, &["postgres_cpu_s"]),
        num(&r, &["loadgen_cpu_s"]),
    ));
    out
}

/// Memory per idle authenticated connection.
fn idle_table(dir: &Path) -> String {
    let mut out = String::from(
        "| connections held | token sent with | connect rate (/s) | hub RSS held (MiB) | hub user-space KiB / connection | kernel slab KiB / connection (both ends) | hub CPU while idle (s per 10 s) | dropped |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for (run, token) in [("10000", "upgrade request"), ("19000", "upgrade request"), ("10000-hello", "`hello`")] {
        match load(dir, &format!("idle-{run}")) {
            Some(r) => out.push_str(&format!(
                "| {:.0} | {token} | {:.0} | {:.1} | {:.2} | {:.2} | {:.2} | {:.0} |\n",
                num(&r, &["connections_held"]),
                num(&r, &["accepted_per_s"]),
                num(&r, &["hub_rss_held_kib"]) / 1024.0,
                num(&r, &["hub_kib_per_connection"]),
                num(&r, &["slab_kib_per_connection"]),
                num(&r, &["hub_cpu_s_while_idle"]) * 10.0 / idle_window_s(&r),
                num(&r, &["dropped_while_holding"]),
            )),
            None => out.push_str(&format!("| {run}: not run | | | | | | | |\n")),
        }
    }
    out
}

/// Fan-out from one publisher, hub against nats-server.
fn fanout_table(dir: &Path) -> String {
    let mut out = String::from(
        "| subscribers | offered msgs/s | server | delivered/s | ratio to NATS | publish→delivery p50 / p99 (ms) | server CPU (s) | load generator CPU (s) |\n\
         |---:|---:|---|---:|---:|---:|---:|---:|\n",
    );
    for n in [1_000, 10_000] {
        let (hub, nats) = (load(dir, &format!("fanout-hub-{n}")), load(dir, &format!("fanout-nats-{n}")));
        let nats_rate = nats.as_ref().map(|r| num(r, &["deltas_per_s"])).unwrap_or(0.0);
        for (name, report) in [("synchub", &hub), ("nats-server", &nats)] {
            match report {
                Some(r) => out.push_str(&format!(
                    "| {n} | {:.0} | {name} | {:.0} | {:.2} | {:.1} / {:.1} | {:.1} | {:.1} |\n",
                    num(r, &["parameters", "rate"]),
                    num(r, &["deltas_per_s"]),
                    if nats_rate > 0.0 { num(r, &["deltas_per_s"]) / nats_rate } else { 0.0 },
                    num(r, &["delivery_latency", "p50_ms"]),
                    num(r, &["delivery_latency", "p99_ms"]),
                    num(r, &["hub_cpu_s"]),
                    num(r, &["loadgen_cpu_s"]),
                )),
                None => out.push_str(&format!("| {n} | | {name} | not run | | | | |\n")),
            }
        }
    }
    out
}

/// Reconnect storm.
fn storm_table(dir: &Path) -> String {
    let mut out = String::from(
        "| devices | tenants | missed per tenant | queued per device | hub restarted | back | retries after busy | half caught up (s) | all caught up (s) | all queued acked (s) | catch-up deltas | hub CPU (s) | hub RSS max (MiB) | CPU taken by the hypervisor (s) |\n\
         |---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for name in ["storm", "storm-restart"] {
        let Some(r) = load(dir, name) else {
            out.push_str(&format!("| {name}: not run | | | | | | | | | | | | | |\n"));
            continue;
        };
        out.push_str(&format!(
            "| {:.0} | {:.0} | {:.0} | {:.0} | {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} | {:.1} | {:.0} | {:.1} |\n",
            num(&r, &["parameters", "devices"]),
            num(&r, &["parameters", "tenants"]),
            num(&r, &["parameters", "missed"]),
            num(&r, &["parameters", "pending"]),
            if r["parameters"]["await_restart"].as_bool() == Some(true) { "yes" } else { "no" },
            num(&r, &["devices_back"]),
            num(&r, &["retries"]),
            num(&r, &["median_caught_up_s"]),
            num(&r, &["all_caught_up_s"]),
            num(&r, &["all_acked_s"]),
            num(&r, &["catch_up_deltas"]),
            num(&r, &["hub_cpu_s"]),
            num(&r, &["hub_rss_max_kib"]) / 1024.0,
            num(&r, &["steal_cpu_s"]),
        ));
    }
    out
}

/// A recorded store replayed as many stores.
fn replay_table(dir: &Path) -> String {
    let mut out = String::from(
        "| recorded | copies | speed | changes sent | merged/s | deltas/s | push→ack p50 / p99 (ms) | device→device p50 / p99 (ms) | errors | hub CPU (s) | Postgres CPU (s) | hub RSS max (MiB) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut any = false;
    for copies in [100, 400] {
        let Some(r) = load(dir, &format!("replay-{copies}")) else { continue };
        any = true;
        let errors = error_count(&r);
        out.push_str(&format!(
            "| {:.0} devices, {:.0} changes in {:.0} s | {copies} | {}× | {:.0} | {:.0} | {:.0} | {:.1} / {:.1} | {:.1} / {:.1} | {errors} | {:.1} | {:.1} | {:.0} |\n",
            num(&r, &["parameters", "recorded", "devices"]),
            num(&r, &["parameters", "recorded", "frames"]),
            num(&r, &["parameters", "recorded", "span_s"]),
            num(&r, &["parameters", "speed"]),
            num(&r, &["changes_sent"]),
            num(&r, &["changes_merged_per_s"]),
            num(&r, &["deltas_per_s"]),
            num(&r, &["ack_latency", "p50_ms"]),
            num(&r, &["ack_latency", "p99_ms"]),
            num(&r, &["delivery_latency", "p50_ms"]),
            num(&r, &["delivery_latency", "p99_ms"]),
            num(&r, &["hub_cpu_s"]),
            num(&r, &["postgres_cpu_s"]),
            num(&r, &["hub_rss_max_kib"]) / 1024.0,
        ));
    }
    if !any {
        out.push_str("| not run | | | | | | | | | | | |\n");
    }
    out
}

fn replace_between(doc: &str, name: &str, table: &str) -> Result<String> {
    let begin = format!("<!-- {name}:begin -->");
    let end = format!("<!-- {name}:end -->");
    let (Some(b), Some(e)) = (doc.find(&begin), doc.find(&end)) else {
        return Err(LoadError::Usage(format!("BENCHMARKS.md lacks the markers {begin} … {end}")));
    };
    Ok(format!("{}{begin}\n{table}{}", &doc[..b], &doc[e..]))
}

/// Rewrite the tables of `benchmarks` from the reports in `results`.
pub fn rewrite(results: &Path, benchmarks: &Path) -> Result<()> {
    let mut doc = std::fs::read_to_string(benchmarks)?;
    doc = replace_between(&doc, "merge", &merge_table(results))?;
    doc = replace_between(&doc, "latency", &latency_table(results))?;
    doc = replace_between(&doc, "dashboards", &dashboards_table(results))?;
    doc = replace_between(&doc, "supabase", &supabase_table(results))?;
    doc = replace_between(&doc, "idle", &idle_table(results))?;
    doc = replace_between(&doc, "fanout", &fanout_table(results))?;
    doc = replace_between(&doc, "storm", &storm_table(results))?;
    doc = replace_between(&doc, "replay", &replay_table(results))?;
    std::fs::write(benchmarks, doc)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_only_between_its_markers() {
        let doc = "intro\n<!-- merge:begin -->\nold\n<!-- merge:end -->\nrest\n";
        let out = replace_between(doc, "merge", "| new |\n").unwrap();
        assert_eq!(out, "intro\n<!-- merge:begin -->\n| new |\n<!-- merge:end -->\nrest\n");
        assert!(replace_between(doc, "storm", "x").is_err());
    }

    #[test]
    fn the_supabase_table_sets_both_paths_of_one_run_side_by_side() {
        let dir = std::env::temp_dir().join(format!("synchub-supabase-table-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(supabase_table(&dir).contains("| not run |"));
        let latency = |p50: f64, p99: f64, count: u64| serde_json::json!({"count": count, "p50_ms": p50, "p99_ms": p99, "max_ms": 50.0});
        let report = serde_json::json!({
            "parameters": {"tenants": 10, "rate": 200.0, "supabase_vsn": "2.0.0", "snapshot_p50_ms": 180.0, "snapshot_p99_ms": 230.0,
                           "supabase_join_p50_ms": 3.0, "supabase_join_p99_ms": 9.5},
            "duration_s": 20.0, "changes_merged_per_s": 199.0, "deltas_per_s": 11000.0, "connections_opened": 1000,
            "delivery_latency": latency(2.5, 4.7, 150000), "ack_latency": latency(2.0, 3.5, 4000),
            "client_groups": {"supabase": {"connections_opened": 1000, "deliveries_per_s": 7000.0, "delivery_latency": latency(3.0, 6.0, 140000)}},
            "errors": {}, "hub_cpu_s": 10.0, "postgres_cpu_s": 2.0, "loadgen_cpu_s": 8.0
        });
        std::fs::write(dir.join("dashboards-supabase.json"), report.to_string()).unwrap();
        let table = supabase_table(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(table.contains("| 1000 | 11000 | 150000 | 2.5 / 4.7 / 50.0 | 180.0 / 230.0 (snapshot) |"), "{table}");
        assert!(table.contains("vsn 2.0.0 (`postgres_changes`, JSON) | 1000 | 7000 | 140000 | 3.0 / 6.0 / 50.0 | 3.0 / 9.5 (join) |"), "{table}");
        assert!(table.contains("used 10.0 CPU s (50% of one core)"), "{table}");
    }

    #[test]
    fn the_latency_table_gives_the_run_with_the_median_p99_and_every_run_s_p99() {
        let dir = std::env::temp_dir().join(format!("synchub-latency-table-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(latency_table(&dir).contains("| not run |"));
        for (run, p99, steal) in [(1, 14.5, 3.0), (2, 8.25, 0.5), (3, 9.0, 1.0)] {
            let report = serde_json::json!({
                "parameters": {"devices": 1000, "rate": 0.1},
                "changes_merged_per_s": 100.0, "deltas_per_s": 900.0, "warmup_s": 5.0,
                "delivery_latency": {"p50_ms": 3.0, "p99_ms": p99, "max_ms": 40.0},
                "delivery_latency_with_warmup": {"p99_ms": p99 + 2.0},
                "ack_latency": {"p50_ms": 2.5, "p99_ms": 7.0},
                "steal_cpu_s": steal, "errors": {"busy": 1}
            });
            std::fs::write(dir.join(format!("d2d-r{run}.json")), report.to_string()).unwrap();
        }
        let table = latency_table(&dir);
        let median = median_report(&dir, "d2d").map(|r| num(&r, &["delivery_latency", "p99_ms"]));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(table.contains("| 1000 | 100 | 100 | 900 | 3 | 5 | 3.0 / 9.0 / 40.0 | 8.2, 9.0, 14.5 | 11.0 | 2.5 / 7.0 | 1.0 | 1 |"), "{table}");
        assert_eq!(median, Some(9.0));
    }

    #[test]
    fn the_merge_table_gives_medians_of_the_runs_and_the_ratio_to_each_baseline_that_ran() {
        let dir = std::env::temp_dir().join(format!("synchub-tables-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, rate: f64| std::fs::write(dir.join(format!("{name}.json")), format!(r#"{{"changes_merged_per_s": {rate}, "hub_cpu_s": {}}}"#, rate / 1000.0)).unwrap();
        // Three runs each: the median is the middle one, whatever order they ran in.
        for (run, hub, pg, logged) in [(1, 30000.0, 250000.0, 24000.0), (2, 20000.0, 200000.0, 25000.0), (3, 10000.0, 300000.0, 26000.0)] {
            write(&format!("merge-hub-b100-c0-r{run}"), hub);
            write(&format!("merge-pg-b100-c0-r{run}"), pg);
            write(&format!("merge-pglog-b100-c0-r{run}"), logged);
        }
        // A single run without a run number; no second baseline.
        write("merge-hub-b1000-c0", 30000.0);
        write("merge-pg-b1000-c0", 600000.0);
        // Two runs: the lower middle one.
        write("merge-hub-b1-c0-r1", 5000.0);
        write("merge-hub-b1-c0-r2", 6000.0);
        write("merge-pg-b1-c0-r1", 7000.0);
        write("merge-pg-b1-c0-r2", 8000.0);
        let table = merge_table(&dir);
        // `compare` reads the median run, or the only one.
        let median = |name: &str| median_report(&dir, name).map(|r| num(&r, &["changes_merged_per_s"]));
        assert_eq!((median("merge-hub-b100-c0"), median("merge-hub-b1000-c0"), median("d2d")), (Some(20000.0), Some(30000.0), None));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            table.contains("| 100 | 0% | 3 | 20000 (10000–30000) | 250000 (200000–300000) | 0.08 | 25000 (24000–26000) | 0.80 |"),
            "{table}"
        );
        // Latency and CPU come from the hub's median run.
        assert!(table.contains("| 0 | 20.0 | 0.0 |"), "{table}");
        assert!(table.contains("| 1000 | 0% | 1 | 30000 | 600000 | 0.05 | not run |  |"), "{table}");
        assert!(table.contains("| 1 | 0% | 2 | 5000 (5000–6000) | 7000 (7000–8000) | 0.71 |"), "{table}");
        assert!(table.contains("| 1 | 10% | | not run |"), "{table}");
    }
}
