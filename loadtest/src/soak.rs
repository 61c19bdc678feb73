//! The `soak` scenario: devices pushing (with conflicts) and dashboards subscribed for a long
//! run, every client reconnecting and resuming through hub and Postgres restarts; reports the
//! hub's RSS, push→ack p99 and errors by code every interval and per phase, and checks at the
//! end that every acked change is in the log once, at its seq, with no seq skipped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use protocol::{Change, ChangeStatus, ClientFrame, Condition, FilterOp, Position, ServerFrame, SessionMode};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};
use uuid::Uuid;

use crate::client::{Client, Received, Target};
use crate::devices::Workload;
use crate::error::{LoadError, Result};
use crate::proc_stats;
use crate::report::{Latency, Stats, Tick};
use crate::tokens::TokenSource;

#[derive(Debug, Clone, Serialize, clap::Args)]
pub struct SoakArgs {
    /// Seconds of traffic.
    #[arg(long, default_value_t = 1800)]
    pub duration_secs: u64,
    /// Seconds between report lines (RSS, p99, errors by code).
    #[arg(long, default_value_t = 10)]
    pub interval_secs: u64,
    #[arg(long, default_value_t = 4)]
    pub tenants: usize,
    /// Pushing devices, spread over the tenants.
    #[arg(long, default_value_t = 40)]
    pub devices: usize,
    /// Changes per pushed batch.
    #[arg(long, default_value_t = 5)]
    pub batch: usize,
    /// Changes per second per device.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Share of changes (0..1) written blind to rows every device of the tenant writes.
    #[arg(long, default_value_t = 0.1)]
    pub conflict_rate: f64,
    #[arg(long, default_value_t = 200)]
    pub rows_per_device: usize,
    #[arg(long, default_value_t = 20)]
    pub shared_rows: usize,
    /// Dashboard sessions subscribed to low-stock products, spread over the tenants.
    #[arg(long, default_value_t = 20)]
    pub dashboards: usize,
    /// Mean seconds between a device's own disconnects (it then reconnects and resumes); 0: never.
    #[arg(long, default_value_t = 120)]
    pub reconnect_every_secs: u64,
    /// File holding the hub's pid, read at every sample (the pid changes when the hub restarts).
    #[arg(long)]
    pub hub_pid_file: Option<PathBuf>,
    /// File of events, one `<unix ms> <label>` a line, appended by whoever restarts the hub or
    /// Postgres; the run's phases are split there.
    #[arg(long)]
    pub events_file: Option<PathBuf>,
    /// The hub's database (superuser), read at the end to check the log against the acks.
    #[arg(long)]
    #[serde(skip)]
    pub database_url: String,
    /// Prefix of tenant and device ids; a fresh random one by default.
    #[arg(long)]
    pub id_prefix: Option<String>,
}

/// One change the hub acknowledged, as the log must hold it.
#[derive(Debug, Clone)]
pub struct Acked {
    pub tenant: String,
    pub device: String,
    pub change_id: Uuid,
    /// None: it wrote nothing, so it took no seq.
    pub seq: Option<u64>,
}

/// One line of the log, as the check reads it.
#[derive(Debug, Clone)]
pub struct LogRow {
    pub seq: i64,
    pub change_id: Option<Uuid>,
    pub origin_device: Option<String>,
    pub device_seq: Option<i64>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LogCheck {
    /// Acked changes that took a seq.
    pub acked_with_seq: u64,
    /// Acked changes that wrote nothing (no seq).
    pub acked_without_seq: u64,
    pub lost: u64,
    pub doubled: u64,
    /// Acked at one seq, found at another.
    pub misplaced: u64,
    pub gaps: u64,
    /// Log rows of this run's devices that no ack named (batches in flight when the run ended).
    pub committed_unacked: u64,
    pub log_rows: u64,
    pub problems: Vec<String>,
}

/// Compare one tenant's log (`rows`, by seq; `floor` the trimmed prefix, `head` the tenant's
/// head seq) with what its devices were told, adding to `check`.
pub fn check_tenant_log(check: &mut LogCheck, acked: &[&Acked], rows: &[LogRow], floor: i64, head: i64) {
    let note = |check: &mut LogCheck, problem: String| {
        if check.problems.len() < 50 {
            check.problems.push(problem);
        }
    };
    check.log_rows += rows.len() as u64;
    let mut expected = floor + 1;
    for row in rows {
        if row.seq != expected {
            check.gaps += 1;
            note(check, format!("log seq {} where {expected} was due", row.seq));
        }
        expected = row.seq + 1;
    }
    if expected - 1 != head {
        check.gaps += 1;
        note(check, format!("the log ends at seq {} but the head is {head}", expected - 1));
    }
    let mut by_change: HashMap<Uuid, Vec<i64>> = HashMap::new();
    let mut by_device_seq: HashMap<(&str, i64), usize> = HashMap::new();
    for row in rows {
        if let Some(id) = row.change_id {
            by_change.entry(id).or_default().push(row.seq);
        }
        if let (Some(origin), Some(device_seq)) = (&row.origin_device, row.device_seq) {
            *by_device_seq.entry((origin.as_str(), device_seq)).or_default() += 1;
        }
    }
    for ((device, device_seq), n) in &by_device_seq {
        if *n > 1 {
            check.doubled += (*n - 1) as u64;
            note(check, format!("{device} device_seq {device_seq} is in the log {n} times"));
        }
    }
    let mut told = HashSet::new();
    for a in acked {
        told.insert(a.change_id);
        let found = by_change.get(&a.change_id).map(Vec::as_slice).unwrap_or_default();
        match (a.seq, found) {
            (Some(seq), [at]) if *at == seq as i64 => check.acked_with_seq += 1,
            (Some(seq), []) => {
                check.acked_with_seq += 1;
                check.lost += 1;
                note(check, format!("{}: change {} acked at seq {seq} is not in the log", a.device, a.change_id));
            }
            (None, []) => check.acked_without_seq += 1,
            (seq, found) => {
                check.acked_with_seq += u64::from(seq.is_some());
                if found.len() > 1 {
                    check.doubled += found.len() as u64 - 1;
                } else {
                    check.misplaced += 1;
                }
                note(check, format!("{}: change {} acked at seq {seq:?} is in the log at {found:?}", a.device, a.change_id));
            }
        }
    }
    let devices: HashSet<&str> = acked.iter().map(|a| a.device.as_str()).collect();
    check.committed_unacked += rows
        .iter()
        .filter(|r| r.origin_device.as_deref().is_some_and(|d| devices.contains(d)) && !r.change_id.is_some_and(|id| told.contains(&id)))
        .count() as u64;
}

/// One report line: what happened over an interval.
#[derive(Debug, Clone, Serialize)]
pub struct Interval {
    /// Seconds from the start of traffic to the end of the interval.
    pub t_s: f64,
    pub hub_rss_kib: u64,
    pub hub_rss_max_kib: u64,
    pub ack_p99_ms: f64,
    pub ack_max_ms: f64,
    pub batches_acked: u64,
    pub changes_merged_per_s: f64,
    pub dashboard_deltas_per_s: f64,
    /// Errors by code (and lost sockets by how they ended) in the interval.
    pub errors: BTreeMap<String, u64>,
    /// Events (hub or Postgres restarts) that fell in the interval.
    pub events: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub label: String,
    pub from_s: f64,
    pub to_s: f64,
    pub ack_latency: Latency,
    pub hub_rss_first_kib: u64,
    pub hub_rss_last_kib: u64,
    pub hub_rss_max_kib: u64,
    pub errors: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub scenario: String,
    pub parameters: Value,
    pub duration_s: f64,
    pub hub_rss_start_kib: u64,
    pub hub_rss_middle_kib: u64,
    pub hub_rss_end_kib: u64,
    pub hub_rss_max_kib: u64,
    pub ack_latency: Latency,
    pub outcomes: BTreeMap<&'static str, u64>,
    pub changes_sent: u64,
    pub dashboard_deltas: u64,
    pub device_deltas: u64,
    pub sessions_opened: u64,
    pub errors: BTreeMap<String, u64>,
    pub phases: Vec<Phase>,
    pub check: LogCheck,
    pub intervals: Vec<Interval>,
}

impl SoakReport {
    pub fn table(&self) -> String {
        let mut out = String::new();
        let mut row = |k: &str, v: String| out.push_str(&format!("  {k:<28} {v}\n"));
        row("scenario", self.scenario.clone());
        row("parameters", self.parameters.to_string());
        row("ran for", format!("{:.0} s", self.duration_s));
        row(
            "hub RSS (MiB)",
            format!(
                "start {:.1}, middle {:.1}, end {:.1}, max {:.1}",
                mib(self.hub_rss_start_kib),
                mib(self.hub_rss_middle_kib),
                mib(self.hub_rss_end_kib),
                mib(self.hub_rss_max_kib)
            ),
        );
        let l = &self.ack_latency;
        row("push→ack (ms), whole run", format!("p50 {:.1}  p99 {:.1}  max {:.1}  (n={})", l.p50_ms, l.p99_ms, l.max_ms, l.count));
        for p in &self.phases {
            let l = &p.ack_latency;
            row(
                &format!("  {}", p.label),
                format!(
                    "{:.0}–{:.0} s: p50 {:.1}  p99 {:.1}  max {:.1} ms (n={}); RSS {:.1}→{:.1} MiB; errors {:?}",
                    p.from_s,
                    p.to_s,
                    l.p50_ms,
                    l.p99_ms,
                    l.max_ms,
                    l.count,
                    mib(p.hub_rss_first_kib),
                    mib(p.hub_rss_last_kib),
                    p.errors
                ),
            );
        }
        row("outcomes", self.outcomes.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "));
        row("deltas", format!("{} to devices, {} to dashboards", self.device_deltas, self.dashboard_deltas));
        row("sessions opened", self.sessions_opened.to_string());
        row("errors", if self.errors.is_empty() { "none".into() } else { format!("{:?}", self.errors) });
        let c = &self.check;
        row(
            "log check",
            format!(
                "{} acked with a seq ({} without), lost {}, doubled {}, misplaced {}, gaps {}; {} log rows, {} committed but unacked (in flight at the end)",
                c.acked_with_seq, c.acked_without_seq, c.lost, c.doubled, c.misplaced, c.gaps, c.log_rows, c.committed_unacked
            ),
        );
        for p in &c.problems {
            row("  problem", p.clone());
        }
        out
    }

    /// The intervals as a timeline for [`crate::plot::timeline_svg`] (dashboard deltas in the
    /// throughput panel; p99 and RSS below).
    pub fn ticks(&self) -> Vec<Tick> {
        self.intervals
            .iter()
            .map(|i| Tick {
                t_s: i.t_s,
                changes_merged_per_s: i.changes_merged_per_s,
                deltas_per_s: i.dashboard_deltas_per_s,
                ack_p99_ms: i.ack_p99_ms,
                delivery_p99_ms: 0.0,
                hub_rss_kib: i.hub_rss_kib,
                hub_cpu_pct: 0.0,
                steal_pct: 0.0,
            })
            .collect()
    }

    pub fn passed(&self) -> bool {
        let c = &self.check;
        c.lost == 0 && c.doubled == 0 && c.misplaced == 0 && c.gaps == 0
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Events of the events file: `<unix ms> <label>` lines (others are skipped).
pub fn parse_events(text: &str) -> Vec<(u64, String)> {
    text.lines()
        .filter_map(|l| {
            let (at, label) = l.trim().split_once(' ')?;
            Some((at.parse().ok()?, label.trim().to_string()))
        })
        .collect()
}

fn read_events(path: &Option<PathBuf>) -> Vec<(u64, String)> {
    path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).map(|t| parse_events(&t)).unwrap_or_default()
}

fn read_pid(path: &Option<PathBuf>) -> Option<u32> {
    std::fs::read_to_string(path.as_ref()?).ok()?.trim().parse().ok()
}

/// Counts in `now` beyond those in `before`.
pub fn errors_since(now: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    now.iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0).min(*v);
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

/// How a lost socket or failed session counts among the errors.
fn loss_label(err: &LoadError) -> String {
    match err {
        LoadError::Closed { code, .. } => format!("socket closed {code}"),
        LoadError::Connect { .. } | LoadError::Io(_) => "connect failed".into(),
        LoadError::Socket(_) => "socket lost".into(),
        LoadError::Timeout(..) => "no answer".into(),
        LoadError::Refused { code, .. } => code.clone(),
        _ => "protocol".into(),
    }
}

/// What every client shares.
struct Shared {
    target: Target,
    stats: Stats,
    acked: Mutex<Vec<Acked>>,
    dashboard_deltas: AtomicU64,
    sessions: Semaphore,
}

/// An interval's histogram, kept until the end to split the run into phases.
struct Slice {
    end_ms: u64,
    ack: Histogram<u64>,
    rss: u64,
    rss_max: u64,
    errors: BTreeMap<String, u64>,
}

pub async fn run(target: Target, tokens: TokenSource, args: SoakArgs) -> Result<SoakReport> {
    let prefix = args.id_prefix.clone().unwrap_or_else(|| format!("soak-{}", &Uuid::new_v4().simple().to_string()[..8]));
    let tenants: Vec<String> = (0..args.tenants.max(1)).map(|t| format!("{prefix}-t{t}")).collect();
    let shared = Arc::new(Shared {
        target,
        stats: Stats::default(),
        acked: Mutex::new(Vec::new()),
        dashboard_deltas: AtomicU64::new(0),
        sessions: Semaphore::new(32),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    for n in 0..args.devices {
        let tenant = tenants[n % tenants.len()].clone();
        let name = format!("{prefix}-d{n}");
        let token = tokens.token(&tenant, &name, n, "Employee");
        let device = SoakDevice::new(n, tenant, name, token, &args);
        tasks.push(tokio::spawn(device.run(shared.clone(), args.clone(), stop_rx.clone())));
    }
    for n in 0..args.dashboards {
        let tenant = tenants[n % tenants.len()].clone();
        let token = tokens.token_for(&tenant, &format!("{tenant}-board{n}"), &format!("manager-{n}"), "Manager");
        tasks.push(tokio::spawn(dashboard(n, token, shared.clone(), stop_rx.clone())));
    }

    let started = Instant::now();
    let started_ms = unix_ms();
    let stats = &shared.stats;
    let sample_rss = || read_pid(&args.hub_pid_file).map_or(0, |pid| proc_stats::sample(Some(pid)).hub_rss_kib);
    let rss_start = sample_rss();
    let mut slices: Vec<Slice> = Vec::new();
    let mut intervals = Vec::new();
    let mut whole = Histogram::<u64>::new_with_bounds(1, crate::report::LATENCY_MAX.as_micros() as u64, 3).expect("valid histogram bounds");
    let mut last_errors = BTreeMap::new();
    let mut last = (started, stats.merged_total(), 0u64, 0u64);
    let mut rss_max_in_interval = rss_start;
    let mut seen_events = 0;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    let end = started + Duration::from_secs(args.duration_secs);
    let every = args.interval_secs.max(1);
    let mut second = 0u64;
    eprintln!("soak: {} devices, {} dashboards over {} tenants for {} s (prefix {prefix})", args.devices, args.dashboards, tenants.len(), args.duration_secs);
    while Instant::now() < end {
        ticker.tick().await;
        second += 1;
        let rss = sample_rss();
        rss_max_in_interval = rss_max_in_interval.max(rss);
        if second % every != 0 && Instant::now() < end {
            continue;
        }
        let now = Instant::now();
        let (ack, _) = stats.take_latencies();
        let _ = whole.add(&ack);
        let errors_now = stats.errors_snapshot();
        let errors = errors_since(&errors_now, &last_errors);
        last_errors = errors_now;
        let merged = stats.merged_total();
        let batches = stats.batches_acked.load(Ordering::Relaxed);
        let deltas = shared.dashboard_deltas.load(Ordering::Relaxed);
        let dt = now.duration_since(last.0).as_secs_f64().max(1e-6);
        let events = read_events(&args.events_file);
        let new_events: Vec<String> = events[seen_events.min(events.len())..].iter().map(|(_, l)| l.clone()).collect();
        seen_events = events.len();
        let interval = Interval {
            t_s: now.duration_since(started).as_secs_f64(),
            hub_rss_kib: rss,
            hub_rss_max_kib: rss_max_in_interval,
            ack_p99_ms: ack.value_at_quantile(0.99) as f64 / 1000.0,
            ack_max_ms: ack.max() as f64 / 1000.0,
            batches_acked: batches - last.2,
            changes_merged_per_s: (merged - last.1) as f64 / dt,
            dashboard_deltas_per_s: (deltas - last.3) as f64 / dt,
            errors: errors.clone(),
            events: new_events,
        };
        eprintln!(
            "{:>6.0} s  rss {:>6.1} MiB  ack p99 {:>8.1} ms  merged {:>6.0}/s  dashboard deltas {:>6.0}/s  errors {:?}{}",
            interval.t_s,
            mib(rss),
            interval.ack_p99_ms,
            interval.changes_merged_per_s,
            interval.dashboard_deltas_per_s,
            interval.errors,
            if interval.events.is_empty() { String::new() } else { format!("  << {}", interval.events.join(", ")) }
        );
        slices.push(Slice { end_ms: unix_ms(), ack, rss, rss_max: rss_max_in_interval, errors });
        intervals.push(interval);
        last = (now, merged, batches, deltas);
        rss_max_in_interval = rss;
    }
    let duration_s = started.elapsed().as_secs_f64();
    // Devices finish the batch in flight (its ack is part of the check), then everyone stops.
    let _ = stop_tx.send(true);
    crate::report::join_by(tasks, Duration::from_secs(30)).await;
    let (ack, _) = stats.take_latencies();
    let _ = whole.add(&ack);

    let phases = phases(&slices, &read_events(&args.events_file), started_ms);
    let acked = std::mem::take(&mut *shared.acked.lock().unwrap());
    let check = check_log(&args.database_url, &tenants, &acked).await?;
    let rss_at = |i: usize| intervals.get(i).map_or(0, |x: &Interval| x.hub_rss_kib);
    let mut parameters = serde_json::to_value(&args).unwrap_or(Value::Null);
    parameters["id_prefix"] = json!(prefix);
    Ok(SoakReport {
        scenario: "soak".into(),
        parameters,
        duration_s,
        hub_rss_start_kib: rss_start,
        hub_rss_middle_kib: rss_at(intervals.len() / 2),
        hub_rss_end_kib: rss_at(intervals.len().saturating_sub(1)),
        hub_rss_max_kib: slices.iter().map(|s| s.rss_max).max().unwrap_or(0).max(rss_start),
        ack_latency: Latency::of(&whole),
        outcomes: BTreeMap::from([
            ("applied", stats.applied.load(Ordering::Relaxed)),
            ("merged", stats.merged.load(Ordering::Relaxed)),
            ("conflict", stats.conflict.load(Ordering::Relaxed)),
            ("rejected", stats.rejected.load(Ordering::Relaxed)),
            ("duplicate", stats.duplicate.load(Ordering::Relaxed)),
        ]),
        changes_sent: stats.changes_sent.load(Ordering::Relaxed),
        dashboard_deltas: shared.dashboard_deltas.load(Ordering::Relaxed),
        device_deltas: stats.deltas_received.load(Ordering::Relaxed),
        sessions_opened: stats.connections_opened.load(Ordering::Relaxed),
        errors: stats.errors_snapshot(),
        phases,
        check,
        intervals,
    })
}

/// Split the intervals at the events: an interval belongs to the phase in which it ended, so
/// an outage lands in the phase that the event opened.
fn phases(slices: &[Slice], events: &[(u64, String)], started_ms: u64) -> Vec<Phase> {
    let mut bounds: Vec<(u64, String)> = vec![(0, "start".into())];
    bounds.extend(events.iter().filter(|(at, _)| *at >= started_ms).cloned());
    let mut out = Vec::new();
    for (i, (from, label)) in bounds.iter().enumerate() {
        let to = bounds.get(i + 1).map_or(u64::MAX, |b| b.0);
        let in_phase: Vec<&Slice> = slices.iter().filter(|s| s.end_ms >= *from && s.end_ms < to).collect();
        let Some(first) = in_phase.first() else { continue };
        let mut ack = first.ack.clone();
        ack.reset();
        let mut errors = BTreeMap::new();
        for s in &in_phase {
            let _ = ack.add(&s.ack);
            for (k, v) in &s.errors {
                *errors.entry(k.clone()).or_default() += v;
            }
        }
        let secs = |ms: u64| ms.saturating_sub(started_ms) as f64 / 1000.0;
        out.push(Phase {
            label: if i == 0 { "before any restart".into() } else { format!("after {label}") },
            from_s: if i == 0 { 0.0 } else { secs(*from) },
            to_s: secs(in_phase.last().map_or(*from, |s| s.end_ms)),
            ack_latency: Latency::of(&ack),
            hub_rss_first_kib: first.rss,
            hub_rss_last_kib: in_phase.last().map_or(0, |s| s.rss),
            hub_rss_max_kib: in_phase.iter().map(|s| s.rss_max).max().unwrap_or(0),
            errors,
        });
    }
    out
}

async fn check_log(database_url: &str, tenants: &[String], acked: &[Acked]) -> Result<LogCheck> {
    let pool = sqlx::PgPool::connect(database_url).await?;
    let mut check = LogCheck::default();
    for tenant in tenants {
        let state: Option<(i64, i64)> = sqlx::query_as("select head_seq, log_floor from synchub.tenants where tenant_id = $1")
            .bind(tenant)
            .fetch_optional(&pool)
            .await?;
        let (head, floor) = state.unwrap_or((0, 0));
        let rows: Vec<(i64, Option<Uuid>, Option<String>, Option<i64>)> =
            sqlx::query_as("select seq, change_id, origin_device, device_seq from synchub.change_log where tenant_id = $1 order by seq")
                .bind(tenant)
                .fetch_all(&pool)
                .await?;
        let rows: Vec<LogRow> =
            rows.into_iter().map(|(seq, change_id, origin_device, device_seq)| LogRow { seq, change_id, origin_device, device_seq }).collect();
        let mine: Vec<&Acked> = acked.iter().filter(|a| &a.tenant == tenant).collect();
        check_tenant_log(&mut check, &mine, &rows, floor, head);
    }
    pool.close().await;
    Ok(check)
}

/// The batch a device pushed and has no answer for yet: sent again, unchanged, after a lost
/// socket or a temporary refusal, so it commits once whatever happened to the first send.
struct InFlight {
    batch_id: Uuid,
    changes: Vec<Change>,
    own: Vec<Option<usize>>,
    first_sent: Instant,
}

struct SoakDevice {
    n: usize,
    tenant: String,
    name: String,
    token: String,
    workload: Workload,
    position: Option<Position>,
    in_flight: Option<InFlight>,
    next_id: u64,
    sessions: u64,
}

/// Why a device session ended.
enum Ended {
    /// The run is over and nothing is in flight.
    Stopped,
    /// The device chose to disconnect (a reconnect).
    Reconnect,
    Lost(LoadError),
}

impl SoakDevice {
    fn new(n: usize, tenant: String, name: String, token: String, args: &SoakArgs) -> SoakDevice {
        let workload = Workload::new(&tenant, &name, args.rows_per_device, args.shared_rows, args.conflict_rate);
        SoakDevice { n, tenant, name, token, workload, position: None, in_flight: None, next_id: 10, sessions: 0 }
    }

    async fn run(mut self, shared: Arc<Shared>, args: SoakArgs, stop: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        // Devices start spread over a second, not all in the same millisecond.
        tokio::time::sleep(Duration::from_millis((self.workload.uniform() * 1000.0) as u64)).await;
        loop {
            match self.session(&shared, &args, stop.clone()).await {
                Ended::Stopped => return,
                Ended::Reconnect => backoff = Duration::from_millis(100),
                Ended::Lost(err) => {
                    shared.stats.error(&loss_label(&err));
                    if *stop.borrow() && self.in_flight.is_none() {
                        return;
                    }
                    // Jittered, so a restarted hub is not met by every device at once.
                    tokio::time::sleep(backoff.mul_f64(0.5 + self.workload.uniform())).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    async fn session(&mut self, shared: &Shared, args: &SoakArgs, mut stop: watch::Receiver<bool>) -> Ended {
        let mut client = {
            let _permit = shared.sessions.acquire().await;
            let mut client = match shared.target.connect(self.n).await {
                Ok(c) => c,
                Err(err) => return Ended::Lost(err),
            };
            match client.handshake(self.token.clone(), &self.name, self.position.clone()).await {
                Ok(position) => self.position = Some(position),
                Err(err) => return Ended::Lost(err),
            }
            client
        };
        self.sessions += 1;
        shared.stats.connections_opened.fetch_add(1, Ordering::Relaxed);
        let pace = Duration::from_secs_f64(args.batch.max(1) as f64 / args.rate.max(0.001));
        let mut next_at = Instant::now() + pace.mul_f64(self.workload.uniform());
        let reconnect_at = (args.reconnect_every_secs > 0)
            .then(|| Instant::now() + Duration::from_secs_f64(args.reconnect_every_secs as f64 * 2.0 * self.workload.uniform()));
        loop {
            if self.in_flight.is_none() {
                if *stop.borrow() {
                    client.sender.close().await;
                    return Ended::Stopped;
                }
                if reconnect_at.is_some_and(|at| Instant::now() >= at) {
                    client.sender.close().await;
                    return Ended::Reconnect;
                }
                // Read deltas while waiting for the next push.
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(next_at.into()) => break,
                        _ = stop.changed() => break,
                        frame = client.receiver.recv_heads() => if let Err(err) = self.on_frame(frame, &shared.stats) {
                            return Ended::Lost(err);
                        },
                    }
                }
                if *stop.borrow() {
                    continue;
                }
                next_at = (next_at + pace).max(Instant::now());
                let (changes, own): (Vec<Change>, Vec<Option<usize>>) = (0..args.batch.max(1)).map(|_| self.workload.next()).unzip();
                shared.stats.changes_sent.fetch_add(changes.len() as u64, Ordering::Relaxed);
                self.in_flight = Some(InFlight { batch_id: Uuid::now_v7(), changes, own, first_sent: Instant::now() });
            }
            if let Err(err) = self.push_in_flight(&mut client, shared).await {
                return Ended::Lost(err);
            }
        }
    }

    /// Send the batch in flight and wait for its answer: an ack ends it (recorded); a temporary
    /// refusal waits and leaves it in flight; any other refusal drops it (counted by its code).
    async fn push_in_flight(&mut self, client: &mut Client, shared: &Shared) -> Result<()> {
        let Some(batch) = &self.in_flight else { return Ok(()) };
        self.next_id += 1;
        let id = self.next_id;
        client.sender.send(&ClientFrame::Push { id, batch_id: batch.batch_id, changes: batch.changes.clone() }).await?;
        let silence = shared.target.answer_timeout;
        loop {
            let frame = tokio::time::timeout(silence, client.receiver.recv_heads()).await.map_err(|_| LoadError::Timeout(silence, "push"))?;
            match frame {
                Ok(Received::Frame(ServerFrame::Ack { id: got, results, .. })) if got == id => {
                    let Some(batch) = self.in_flight.take() else { return Ok(()) };
                    shared.stats.ack_latency(batch.first_sent.elapsed());
                    shared.stats.batches_acked.fetch_add(1, Ordering::Relaxed);
                    shared.stats.count_results(&results);
                    let mut acked = shared.acked.lock().unwrap();
                    for (result, row) in results.iter().zip(&batch.own) {
                        if let (Some(r), Some(seq)) = (row, result.seq) {
                            self.workload.learn_version(*r, seq);
                        }
                        if matches!(result.status, ChangeStatus::Applied | ChangeStatus::Merged | ChangeStatus::Conflict | ChangeStatus::Duplicate) {
                            acked.push(Acked { tenant: self.tenant.clone(), device: self.name.clone(), change_id: result.change_id, seq: result.seq });
                        }
                    }
                    return Ok(());
                }
                Ok(Received::Frame(ServerFrame::Error { id: Some(got), code, retry_after_ms, .. })) if got == id => {
                    shared.stats.error(code.as_str());
                    if code.is_temporary() {
                        let wait = retry_after_ms.map_or(Duration::from_millis(200), Duration::from_millis);
                        tokio::time::sleep(wait.min(Duration::from_secs(5))).await;
                    } else {
                        self.in_flight = None;
                    }
                    return Ok(());
                }
                other => self.on_frame(other, &shared.stats)?,
            }
        }
    }

    /// Bookkeeping of a frame that is not the answer awaited: deltas move the position.
    fn on_frame(&mut self, frame: Result<Received>, stats: &Stats) -> Result<()> {
        match frame? {
            Received::Deltas { deltas, .. } => {
                stats.deltas_received.fetch_add(deltas.len() as u64, Ordering::Relaxed);
                if let (Some(p), Some(last)) = (&mut self.position, deltas.iter().map(|d| d.seq).max()) {
                    p.seq = p.seq.max(last);
                }
            }
            Received::Frame(ServerFrame::Error { code, .. }) => stats.error(code.as_str()),
            Received::Frame(_) => {}
        }
        Ok(())
    }
}

/// A dashboard session subscribed to low-stock products, subscribing again (with a snapshot)
/// whenever its socket is lost, until the run ends.
async fn dashboard(n: usize, token: String, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(100);
    tokio::time::sleep(Duration::from_millis((n as u64 * 37) % 1000)).await;
    while !*stop.borrow() {
        let session = async {
            let mut client = {
                let _permit = shared.sessions.acquire().await;
                let mut client = shared.target.connect(100_000 + n).await?;
                client
                    .sender
                    .send(&ClientFrame::Hello { mode: SessionMode::Dashboard, id: 1, versions: vec![1], token: token.clone(), device_id: None, position: None })
                    .await?;
                match client.receiver.recv().await? {
                    ServerFrame::Welcome { .. } => {}
                    ServerFrame::Error { code, message, .. } => return Err(LoadError::Refused { code: code.as_str().into(), message }),
                    other => return Err(LoadError::Protocol(format!("expected welcome, got {other:?}"))),
                }
                let filter = vec![Condition { column: "stock".into(), op: FilterOp::Lt, value: json!(5 + n % 20) }];
                client
                    .sender
                    .send(&ClientFrame::Subscribe { id: 2, sub: "low-stock".into(), table: Some("products".into()), filter, snapshot: true, channel: None })
                    .await?;
                client
            };
            shared.stats.connections_opened.fetch_add(1, Ordering::Relaxed);
            loop {
                tokio::select! {
                    frame = client.receiver.recv() => match frame? {
                        ServerFrame::SubDelta { deltas, .. } => {
                            shared.dashboard_deltas.fetch_add(deltas.len() as u64, Ordering::Relaxed);
                        }
                        ServerFrame::Error { code, .. } => shared.stats.error(code.as_str()),
                        _ => {}
                    },
                    _ = stop.changed() => {
                        client.sender.close().await;
                        return Ok(());
                    }
                }
            }
        };
        match session.await {
            Ok(()) => return,
            Err(err) => {
                shared.stats.error(&format!("dashboard: {}", loss_label(&err)));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acked(device: &str, change_id: Uuid, seq: Option<u64>) -> Acked {
        Acked { tenant: "t".into(), device: device.into(), change_id, seq }
    }

    fn row(seq: i64, change_id: Uuid, device: &str, device_seq: i64) -> LogRow {
        LogRow { seq, change_id: Some(change_id), origin_device: Some(device.into()), device_seq: Some(device_seq) }
    }

    #[test]
    fn a_log_holding_every_acked_change_once_passes() {
        let ids: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
        let a = [acked("d1", ids[0], Some(1)), acked("d2", ids[1], Some(2)), acked("d1", ids[2], None)];
        // Seq 3 is another device's change this run never acked (say, a batch in flight at the end).
        let rows = [row(1, ids[0], "d1", 1), row(2, ids[1], "d2", 1), row(3, ids[3], "d1", 3)];
        let mut check = LogCheck::default();
        check_tenant_log(&mut check, &a.iter().collect::<Vec<_>>(), &rows, 0, 3);
        assert_eq!((check.lost, check.doubled, check.misplaced, check.gaps), (0, 0, 0, 0), "{check:?}");
        assert_eq!((check.acked_with_seq, check.acked_without_seq, check.committed_unacked, check.log_rows), (2, 1, 1, 3));
        assert!(check.problems.is_empty());
    }

    #[test]
    fn lost_doubled_misplaced_and_skipped_changes_are_each_counted() {
        let ids: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
        let a = [
            acked("d1", ids[0], Some(1)), // lost: not in the log
            acked("d1", ids[1], Some(2)), // misplaced: found at 3
            acked("d2", ids[2], Some(5)), // fine
        ];
        // Seq 4 is missing (a gap), d2's device_seq 7 is there twice, and the head says 6.
        let rows = [row(2, ids[3], "d2", 7), row(3, ids[1], "d1", 2), row(5, ids[2], "d2", 8), row(6, ids[4], "d2", 7)];
        let mut check = LogCheck::default();
        check_tenant_log(&mut check, &a.iter().collect::<Vec<_>>(), &rows, 0, 6);
        // Seq 2 where 1 was due, seq 5 where 4 was due.
        assert_eq!(check.gaps, 2, "{check:?}");
        assert_eq!((check.lost, check.misplaced, check.doubled), (1, 1, 1), "{check:?}");
        assert!(!check.problems.is_empty());
        // A head beyond the last row is a gap too; a trimmed prefix (floor) is not.
        let mut check = LogCheck::default();
        check_tenant_log(&mut check, &[], &[row(11, ids[0], "d1", 1)], 10, 12);
        assert_eq!(check.gaps, 1, "{check:?}");
    }

    #[test]
    fn events_and_error_counts_parse_and_subtract() {
        let events = parse_events("1700000000000 hub-kill-9\n\ngarbage\n1700000001000 postgres-restart\n");
        assert_eq!(events, vec![(1_700_000_000_000, "hub-kill-9".to_string()), (1_700_000_001_000, "postgres-restart".to_string())]);
        let before = BTreeMap::from([("busy".to_string(), 2), ("unavailable".to_string(), 5)]);
        let now = BTreeMap::from([("busy".to_string(), 2), ("unavailable".to_string(), 9), ("socket closed 1006".to_string(), 40)]);
        let diff = errors_since(&now, &before);
        assert_eq!(diff, BTreeMap::from([("socket closed 1006".to_string(), 40), ("unavailable".to_string(), 4)]));
    }

    #[test]
    fn phases_split_at_events_and_an_interval_goes_to_the_phase_it_ended_in() {
        let hist = |us: u64| {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            h.record(us).unwrap();
            h
        };
        let slice = |end_ms: u64, us: u64, rss: u64| Slice { end_ms, ack: hist(us), rss, rss_max: rss, errors: BTreeMap::from([("x".to_string(), 1)]) };
        let slices = [slice(10_000, 1_000, 100), slice(20_000, 2_000, 110), slice(30_000, 900_000, 120), slice(40_000, 3_000, 130)];
        let phases = phases(&slices, &[(15_000, "hub-kill-9".into()), (500, "before the run".into())], 1_000);
        assert_eq!(phases.len(), 2, "{phases:?}");
        assert_eq!(phases[0].label, "before any restart");
        assert_eq!((phases[0].ack_latency.count, phases[0].hub_rss_first_kib, phases[0].hub_rss_last_kib), (1, 100, 100));
        assert_eq!(phases[1].label, "after hub-kill-9");
        assert_eq!((phases[1].ack_latency.count, phases[1].hub_rss_first_kib, phases[1].hub_rss_last_kib), (3, 110, 130));
        assert!((phases[1].ack_latency.max_ms - 900.0).abs() < 1.0, "{:?}", phases[1].ack_latency);
        assert_eq!(phases[1].errors["x"], 3);
        assert_eq!((phases[1].from_s, phases[1].to_s), (14.0, 39.0));
    }
}
