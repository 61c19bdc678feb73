//! Measurements of a run: latency histograms, counters by outcome and error code, a per-second
//! timeline, the live progress line, and the final table and JSON report.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use protocol::ChangeStatus;
use serde::Serialize;
use serde_json::Value;

use crate::proc_stats::{self, PostgresCpu, Sample};

/// The longest latency the histograms hold; longer ones count as this. Clients remember a
/// push's send time as long, so that a delivery that late is still measured.
pub const LATENCY_MAX: Duration = Duration::from_secs(60);

/// Latency histogram in microseconds, 1 µs to [`LATENCY_MAX`] at 3 significant digits.
fn histogram() -> Histogram<u64> {
    // unwrap: the bounds are valid constants.
    Histogram::new_with_bounds(1, LATENCY_MAX.as_micros() as u64, 3).expect("valid histogram bounds")
}

/// Counters and histograms shared by every task of a run.
pub struct Stats {
    pub changes_sent: AtomicU64,
    pub batches_acked: AtomicU64,
    pub applied: AtomicU64,
    pub merged: AtomicU64,
    pub conflict: AtomicU64,
    pub rejected: AtomicU64,
    pub duplicate: AtomicU64,
    pub deltas_received: AtomicU64,
    pub connections_opened: AtomicU64,
    pub connections_failed: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    ack_latency: Mutex<Histogram<u64>>,
    delivery_latency: Mutex<Histogram<u64>>,
    /// Histograms of the current second, for the timeline.
    window_ack: Mutex<Histogram<u64>>,
    window_delivery: Mutex<Histogram<u64>>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            changes_sent: AtomicU64::new(0),
            batches_acked: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            merged: AtomicU64::new(0),
            conflict: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            duplicate: AtomicU64::new(0),
            deltas_received: AtomicU64::new(0),
            connections_opened: AtomicU64::new(0),
            connections_failed: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
            ack_latency: Mutex::new(histogram()),
            delivery_latency: Mutex::new(histogram()),
            window_ack: Mutex::new(histogram()),
            window_delivery: Mutex::new(histogram()),
        }
    }
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, LATENCY_MAX.as_micros() as u64)
}

impl Stats {
    pub fn error(&self, code: &str) {
        // unwrap (here and below): a poisoned lock means a task panicked; the run is void anyway.
        *self.errors.lock().unwrap().entry(code.to_string()).or_default() += 1;
    }

    /// The errors counted so far, by code.
    pub fn errors_snapshot(&self) -> BTreeMap<String, u64> {
        self.errors.lock().unwrap().clone()
    }

    pub fn ack_latency(&self, d: Duration) {
        let us = micros(d);
        let _ = self.ack_latency.lock().unwrap().record(us);
        let _ = self.window_ack.lock().unwrap().record(us);
    }

    pub fn delivery_latency(&self, d: Duration) {
        let us = micros(d);
        let _ = self.delivery_latency.lock().unwrap().record(us);
        let _ = self.window_delivery.lock().unwrap().record(us);
    }

    /// Start the latency histograms afresh; returns what they held (push→ack, push→delivery).
    pub(crate) fn take_latencies(&self) -> (Histogram<u64>, Histogram<u64>) {
        let ack = std::mem::replace(&mut *self.ack_latency.lock().unwrap(), histogram());
        let delivery = std::mem::replace(&mut *self.delivery_latency.lock().unwrap(), histogram());
        (ack, delivery)
    }

    /// Count the outcome of each change of an ack (rejections also by their reason).
    pub fn count_results(&self, results: &[protocol::ChangeResult]) {
        for r in results {
            let counter = match r.status {
                ChangeStatus::Applied => &self.applied,
                ChangeStatus::Merged => &self.merged,
                ChangeStatus::Conflict => &self.conflict,
                ChangeStatus::Rejected => {
                    self.error(r.reason.map(|c| c.as_str()).unwrap_or("rejected"));
                    &self.rejected
                }
                ChangeStatus::Duplicate => &self.duplicate,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Wait until `expected` sockets have opened or failed, at most `limit`; false on timeout.
    pub async fn wait_for_connections(&self, expected: usize, limit: Duration) -> bool {
        let t0 = Instant::now();
        while self.connections_opened.load(Ordering::Relaxed) + self.connections_failed.load(Ordering::Relaxed) < expected as u64 {
            if t0.elapsed() > limit {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    pub fn merged_total(&self) -> u64 {
        self.applied.load(Ordering::Relaxed) + self.merged.load(Ordering::Relaxed) + self.conflict.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Latency { count: h.len(), p50_ms: ms(0.5), p90_ms: ms(0.9), p99_ms: ms(0.99), p999_ms: ms(0.999), max_ms: h.max() as f64 / 1000.0 }
    }
}

/// One second of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Tick {
    pub t_s: f64,
    pub changes_merged_per_s: f64,
    pub deltas_per_s: f64,
    pub ack_p99_ms: f64,
    /// p99 of the push→delivery latencies measured in the second (0 when there were none).
    pub delivery_p99_ms: f64,
    pub hub_rss_kib: u64,
    /// Hub CPU over the second, percent of one core (0 when the hub pid is unknown).
    pub hub_cpu_pct: f64,
    /// CPU time the hypervisor took from the machine over the second, percent of one core.
    pub steal_pct: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub parameters: Value,
    pub duration_s: f64,
    pub changes_sent: u64,
    pub batches_acked: u64,
    pub outcomes: BTreeMap<&'static str, u64>,
    pub changes_merged_per_s: f64,
    pub deltas_received: u64,
    pub deltas_per_s: f64,
    pub ack_latency: Latency,
    pub delivery_latency: Latency,
    pub connections_opened: u64,
    pub connections_failed: u64,
    pub errors: BTreeMap<String, u64>,
    pub hub_cpu_s: f64,
    pub hub_rss_max_kib: u64,
    pub postgres_cpu_s: f64,
    pub loadgen_cpu_s: f64,
    /// CPU seconds over the measured window of processes watched apart (`--side-pid`, and each
    /// node when `--hub-pid` names several; `hub_cpu_s` is the nodes' sum), by name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub other_cpu_s: BTreeMap<String, f64>,
    /// CPU seconds the hypervisor took from the machine over the measured window (all CPUs).
    pub steal_cpu_s: f64,
    /// Bytes of WAL Postgres wrote over the measured window (when the scenario was given the
    /// database; see [`crate::wal`]).
    pub wal_bytes: Option<u64>,
    /// Seconds of load before the measured window (`--warmup-secs`); the timeline includes them.
    pub warmup_s: f64,
    /// Latencies over the warm-up and the measured window together, when there was a warm-up.
    pub ack_latency_with_warmup: Option<Latency>,
    pub delivery_latency_with_warmup: Option<Latency>,
    /// Clients of another protocol measured beside the scenario's own in the same run, by name
    /// (the dashboards scenario's Supabase Realtime subscribers: `supabase`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub client_groups: BTreeMap<String, ClientGroup>,
    pub timeline: Vec<Tick>,
}

/// What a second group of clients of a run received, counted apart from the scenario's own
/// (with a [`Stats`] of its own: deliveries, push→delivery latency, connections).
#[derive(Debug, Clone, Serialize)]
pub struct ClientGroup {
    /// What the clients are, for the table.
    pub label: String,
    pub connections_opened: u64,
    pub connections_failed: u64,
    /// Deliveries over the whole run, and per second of the measured window.
    pub deliveries: u64,
    pub deliveries_per_s: f64,
    pub delivery_latency: Latency,
}

impl ClientGroup {
    /// The group counted in `stats`, of which `in_window` deliveries fell in the measured window.
    pub fn of(label: &str, stats: &Stats, in_window: u64, measured: Duration) -> ClientGroup {
        ClientGroup {
            label: label.to_string(),
            connections_opened: stats.connections_opened.load(Ordering::Relaxed),
            connections_failed: stats.connections_failed.load(Ordering::Relaxed),
            deliveries: stats.deltas_received.load(Ordering::Relaxed),
            deliveries_per_s: in_window as f64 / measured.as_secs_f64().max(1e-6),
            delivery_latency: Latency::of(&stats.delivery_latency.lock().unwrap()),
        }
    }
}

/// Prints a progress line every second and keeps the timeline; stop it to get the report.
pub struct Monitor {
    hub_pid: Option<u32>,
    start_sample: Sample,
    start_cpu: f64,
    timeline: Vec<Tick>,
    rss_max: u64,
    last: (Instant, u64, u64),
    /// Hub CPU and machine steal seconds at the previous tick.
    last_cpu: f64,
    last_steal: f64,
    /// The warm-up's latencies (push→ack, push→delivery) and length, when there was one.
    warmup: Option<(Histogram<u64>, Histogram<u64>, Duration)>,
    /// Changes merged and deltas received when the measured window closed.
    at_stop: Option<(u64, u64)>,
    /// The hub's and Postgres's CPU, the machine's steal and the load generator's own CPU when
    /// the window closed: shutting the clients down afterwards is not part of the run.
    sample_at_stop: Option<(Sample, f64, PostgresCpu)>,
    /// Postgres's processes when the measured window opened.
    start_postgres: PostgresCpu,
    /// The processes watched apart, when the window opened and when it closed.
    start_others: Vec<(String, f64)>,
    others_at_stop: Option<Vec<(String, f64)>>,
    /// The same counters when the measured window opened.
    start_counts: (u64, u64),
}

impl Monitor {
    pub fn new(hub_pid: Option<u32>) -> Monitor {
        let start_sample = proc_stats::sample(hub_pid);
        Monitor {
            hub_pid,
            start_sample,
            start_cpu: proc_stats::own_cpu_seconds(),
            timeline: Vec::new(),
            rss_max: start_sample.hub_rss_kib,
            last: (Instant::now(), 0, 0),
            last_cpu: start_sample.hub_cpu_s,
            last_steal: start_sample.machine_steal_s,
            warmup: None,
            at_stop: None,
            sample_at_stop: None,
            start_postgres: PostgresCpu::read(),
            start_others: proc_stats::others_cpu(),
            others_at_stop: None,
            start_counts: (0, 0),
        }
    }

    /// Restart the clock and counters' baseline (after connecting, before the measured phase).
    pub fn reset(&mut self, stats: &Stats) {
        self.start_sample = proc_stats::sample(self.hub_pid);
        self.start_postgres = PostgresCpu::read();
        self.start_others = proc_stats::others_cpu();
        self.start_cpu = proc_stats::own_cpu_seconds();
        self.last_cpu = self.start_sample.hub_cpu_s;
        self.last_steal = self.start_sample.machine_steal_s;
        self.last = (Instant::now(), stats.merged_total(), stats.deltas_received.load(Ordering::Relaxed));
        self.start_counts = (self.last.1, self.last.2);
    }

    /// End a warm-up of length `warmup`: what follows is the measured window. Latencies start
    /// afresh (the report gives both), and so do rates and CPU; the timeline goes on.
    pub fn end_warmup(&mut self, stats: &Stats, warmup: Duration) {
        let (ack, delivery) = stats.take_latencies();
        self.warmup = Some((ack, delivery, warmup));
        self.reset(stats);
    }

    pub fn tick(&mut self, stats: &Stats, t0: Instant) {
        let now = Instant::now();
        let merged = stats.merged_total();
        let deltas = stats.deltas_received.load(Ordering::Relaxed);
        let dt = now.duration_since(self.last.0).as_secs_f64().max(1e-6);
        let sample = proc_stats::sample(self.hub_pid);
        self.rss_max = self.rss_max.max(sample.hub_rss_kib);
        let window_p99 = |window: &Mutex<Histogram<u64>>| {
            let mut w = window.lock().unwrap();
            let p = w.value_at_quantile(0.99) as f64 / 1000.0;
            w.reset();
            p
        };
        let p99 = window_p99(&stats.window_ack);
        let delivery_p99 = window_p99(&stats.window_delivery);
        let tick = Tick {
            t_s: now.duration_since(t0).as_secs_f64(),
            changes_merged_per_s: (merged - self.last.1) as f64 / dt,
            deltas_per_s: (deltas - self.last.2) as f64 / dt,
            ack_p99_ms: p99,
            delivery_p99_ms: delivery_p99,
            hub_rss_kib: sample.hub_rss_kib,
            hub_cpu_pct: (sample.hub_cpu_s - self.last_cpu).max(0.0) / dt * 100.0,
            steal_pct: (sample.machine_steal_s - self.last_steal).max(0.0) / dt * 100.0,
        };
        self.last_cpu = sample.hub_cpu_s;
        self.last_steal = sample.machine_steal_s;
        let errors: u64 = stats.errors.lock().unwrap().values().sum();
        let line = format!(
            "{:>6.1}s  merged {:>9} ({:>8.0}/s)  deltas {:>9} ({:>8.0}/s)  ack p99 {:>7.2} ms  errors {:>5}  hub cpu {:>4.0}%  rss {:>7} KiB",
            tick.t_s, merged, tick.changes_merged_per_s, deltas, tick.deltas_per_s, p99, errors, tick.hub_cpu_pct, sample.hub_rss_kib
        );
        // One line rewritten in place on a terminal; a line per second in a file or a CI log.
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
        self.timeline.push(tick);
        self.last = (now, merged, deltas);
    }

    /// Tick every second until `done` (or `hard_end`, should the sender never finish), then end
    /// the window at the first moment `drained` holds (looked at every 10 ms), or `grace` after
    /// that at the latest; returns the window. Both servers of a comparison get the same end:
    /// when what was sent has arrived.
    pub async fn watch_until_drained(
        &mut self,
        stats: &Stats,
        started: Instant,
        hard_end: Instant,
        done: impl Fn() -> bool,
        drained: impl Fn() -> bool,
        grace: Duration,
    ) -> Duration {
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.tick().await;
        let mut poll = tokio::time::interval(Duration::from_millis(10));
        let mut drain_deadline: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = ticker.tick() => self.tick(stats, started),
                _ = poll.tick() => {
                    if drain_deadline.is_none() && (done() || Instant::now() >= hard_end) {
                        drain_deadline = Some(Instant::now() + grace);
                    }
                    if drain_deadline.is_some_and(|deadline| drained() || Instant::now() >= deadline) {
                        break;
                    }
                }
            }
        }
        let measured = started.elapsed();
        self.stop(stats);
        measured
    }

    /// Tick every second (calling `each_tick` too) until every task has ended or `deadline`
    /// passed; returns the measured window. Tasks that end by themselves end the window at
    /// once, not at the next whole second (a run of 12.1 s was counted as 13). Tasks that
    /// ended are joined here: do not await them again.
    pub async fn watch_tasks<T>(
        &mut self,
        stats: &Stats,
        started: Instant,
        tasks: &mut [tokio::task::JoinHandle<T>],
        deadline: Instant,
        mut each_tick: impl FnMut(),
    ) -> Duration {
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.tick().await;
        // Tasks an earlier watch saw end were joined then; a join handle is awaited only once.
        let all_ended = futures_util::future::join_all(tasks.iter_mut().filter(|t| !t.is_finished()));
        tokio::pin!(all_ended);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    self.tick(stats, started);
                    each_tick();
                    if Instant::now() >= deadline {
                        break;
                    }
                }
                _ = &mut all_ended => break,
            }
        }
        started.elapsed()
    }

    /// Tick every second until `done` (looked at every 10 ms; at the latest a minute after
    /// `window_end`), let the last messages arrive, and close the measured window. Returns its
    /// length: up to `window_end`, when the clients stop sending, or to `done` if that came
    /// first, not the time they take to finish afterwards.
    pub async fn watch_until(&mut self, stats: &Stats, started: Instant, window_end: Instant, done: impl Fn() -> bool) -> Duration {
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.tick().await;
        let mut poll = tokio::time::interval(Duration::from_millis(10));
        let hard_end = window_end + Duration::from_secs(60);
        loop {
            tokio::select! {
                _ = ticker.tick() => self.tick(stats, started),
                _ = poll.tick() => if done() || Instant::now() >= hard_end { break },
            }
        }
        let measured = Instant::now().min(window_end).saturating_duration_since(started);
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.stop(stats);
        measured
    }

    /// Close the measured window: rates count what completed within it, not the acks of
    /// batches still in flight, which arrive afterwards.
    pub fn stop(&mut self, stats: &Stats) {
        self.at_stop = Some((stats.merged_total(), stats.deltas_received.load(Ordering::Relaxed)));
        self.sample_at_stop = Some((proc_stats::sample(self.hub_pid), proc_stats::own_cpu_seconds(), PostgresCpu::read()));
        self.others_at_stop = Some(proc_stats::others_cpu());
    }

    pub fn finish(mut self, scenario: &str, parameters: Value, stats: &Stats, measured: Duration) -> Report {
        let (merged_in_window, deltas_in_window) =
            self.at_stop.unwrap_or((stats.merged_total(), stats.deltas_received.load(Ordering::Relaxed)));
        let (merged_before, deltas_before) = (self.start_counts.0, self.start_counts.1);
        eprintln!();
        let (end, own_cpu_at_end, postgres_at_end) = self
            .sample_at_stop
            .take()
            .unwrap_or_else(|| (proc_stats::sample(self.hub_pid), proc_stats::own_cpu_seconds(), PostgresCpu::read()));
        let others_at_end = self.others_at_stop.take().unwrap_or_else(proc_stats::others_cpu);
        let other_cpu_s = others_at_end
            .into_iter()
            .map(|(name, end)| {
                let start = self.start_others.iter().find(|(n, _)| *n == name).map_or(0.0, |(_, s)| *s);
                (name, (end - start).max(0.0))
            })
            .collect();
        let secs = measured.as_secs_f64().max(1e-6);
        let outcomes = BTreeMap::from([
            ("applied", stats.applied.load(Ordering::Relaxed)),
            ("merged", stats.merged.load(Ordering::Relaxed)),
            ("conflict", stats.conflict.load(Ordering::Relaxed)),
            ("rejected", stats.rejected.load(Ordering::Relaxed)),
            ("duplicate", stats.duplicate.load(Ordering::Relaxed)),
        ]);
        let ack_latency = stats.ack_latency.lock().unwrap().clone();
        let delivery_latency = stats.delivery_latency.lock().unwrap().clone();
        let with_warmup = |warmup: &Histogram<u64>, measured: &Histogram<u64>| {
            let mut whole = warmup.clone();
            // Same bounds on both sides, so adding cannot fail.
            let _ = whole.add(measured);
            Latency::of(&whole)
        };
        Report {
            scenario: scenario.to_string(),
            parameters,
            duration_s: secs,
            changes_sent: stats.changes_sent.load(Ordering::Relaxed),
            batches_acked: stats.batches_acked.load(Ordering::Relaxed),
            outcomes,
            changes_merged_per_s: (merged_in_window - merged_before) as f64 / secs,
            deltas_received: stats.deltas_received.load(Ordering::Relaxed),
            deltas_per_s: (deltas_in_window - deltas_before) as f64 / secs,
            ack_latency: Latency::of(&ack_latency),
            delivery_latency: Latency::of(&delivery_latency),
            connections_opened: stats.connections_opened.load(Ordering::Relaxed),
            connections_failed: stats.connections_failed.load(Ordering::Relaxed),
            errors: stats.errors.lock().unwrap().clone(),
            hub_cpu_s: end.hub_cpu_s - self.start_sample.hub_cpu_s,
            hub_rss_max_kib: self.rss_max.max(end.hub_rss_kib),
            postgres_cpu_s: postgres_at_end.since(&self.start_postgres),
            loadgen_cpu_s: own_cpu_at_end - self.start_cpu,
            other_cpu_s,
            steal_cpu_s: end.machine_steal_s - self.start_sample.machine_steal_s,
            wal_bytes: None,
            warmup_s: self.warmup.as_ref().map_or(0.0, |(_, _, d)| d.as_secs_f64()),
            ack_latency_with_warmup: self.warmup.as_ref().map(|(ack, _, _)| with_warmup(ack, &ack_latency)),
            delivery_latency_with_warmup: self.warmup.as_ref().map(|(_, delivery, _)| with_warmup(delivery, &delivery_latency)),
            client_groups: BTreeMap::new(),
            timeline: self.timeline,
        }
    }
}

/// Join the clients' tasks after a run, all within one `grace` from now rather than one each
/// (10,000 stuck subscribers would otherwise take hours); those still running then are aborted.
pub async fn join_by<T>(tasks: impl IntoIterator<Item = tokio::task::JoinHandle<T>>, grace: Duration) {
    let deadline = tokio::time::Instant::now() + grace;
    for task in tasks {
        let abort = task.abort_handle();
        if tokio::time::timeout_at(deadline, task).await.is_err() {
            abort.abort();
        }
    }
}

impl Report {
    /// The human-readable table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let mut row = |k: &str, v: String| out.push_str(&format!("  {k:<28} {v}\n"));
        row("scenario", self.scenario.clone());
        row("parameters", self.parameters.to_string());
        row("measured for", format!("{:.1} s", self.duration_s));
        if self.warmup_s > 0.0 {
            row("warm-up before it", format!("{:.1} s (not in the figures below unless said)", self.warmup_s));
        }
        row("changes sent", self.changes_sent.to_string());
        row("outcomes", self.outcomes.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "));
        row("changes merged / s", format!("{:.0}", self.changes_merged_per_s));
        row("deltas delivered / s", format!("{:.0} ({} in all)", self.deltas_per_s, self.deltas_received));
        for (name, l) in [("push→ack", &self.ack_latency), ("push→other device", &self.delivery_latency)] {
            row(
                &format!("{name} latency (ms)"),
                format!("p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}  (n={})", l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms, l.count),
            );
        }
        for (name, l) in [("push→ack", &self.ack_latency_with_warmup), ("push→other device", &self.delivery_latency_with_warmup)] {
            if let Some(l) = l {
                row(&format!("{name}, with warm-up"), format!("p50 {:.2}  p99 {:.2}  max {:.2}  (n={})", l.p50_ms, l.p99_ms, l.max_ms, l.count));
            }
        }
        row("connections", format!("{} opened, {} failed", self.connections_opened, self.connections_failed));
        for (name, g) in &self.client_groups {
            let l = &g.delivery_latency;
            row(&format!("{name}: clients"), format!("{} ({} opened, {} failed)", g.label, g.connections_opened, g.connections_failed));
            row(&format!("{name}: deliveries / s"), format!("{:.0} ({} in all)", g.deliveries_per_s, g.deliveries));
            row(
                &format!("{name}: push→delivery (ms)"),
                format!("p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}  (n={})", l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms, l.count),
            );
        }
        row("errors", if self.errors.is_empty() { "none".into() } else { format!("{:?}", self.errors) });
        row(
            "CPU seconds",
            format!(
                "hub {:.1}, postgres {:.1}, load generator {:.1}; taken by the hypervisor (steal) {:.1}",
                self.hub_cpu_s, self.postgres_cpu_s, self.loadgen_cpu_s, self.steal_cpu_s
            ),
        );
        if !self.other_cpu_s.is_empty() {
            row("CPU seconds, apart", self.other_cpu_s.iter().map(|(k, v)| format!("{k} {v:.1}")).collect::<Vec<_>>().join(", "));
        }
        row("hub RSS max", format!("{} KiB", self.hub_rss_max_kib));
        if let Some(bytes) = self.wal_bytes {
            let changes = self.changes_merged_per_s * self.duration_s;
            let per_change = if changes > 0.0 { format!(", {:.0} B per change", bytes as f64 / changes) } else { String::new() };
            row("WAL written", format!("{:.1} MiB{per_change}", bytes as f64 / (1024.0 * 1024.0)));
        }
        out
    }
}
