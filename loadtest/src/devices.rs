//! The `devices` scenario: N devices over T tenants connect, catch up, then push batches of
//! changes (inserts and updates of their own rows, plus a share of changes to rows every
//! device of the tenant writes, which conflict), while receiving each other's deltas.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::{Change, ClientFrame, Hlc, Object, Op, ServerFrame};
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::sync::{watch, Semaphore};
use uuid::Uuid;

use crate::client::{Received, Receiver, Sender, Target};
use crate::report::{Monitor, Report, Stats};
use crate::tokens::TokenSource;
use crate::wal::WalWindow;

#[derive(Debug, Clone, Serialize, clap::Args)]
pub struct DevicesArgs {
    /// Number of tenants; devices are spread over them evenly.
    #[arg(long, default_value_t = 4)]
    pub tenants: usize,
    /// Number of devices (sockets) in all.
    #[arg(long, default_value_t = 40)]
    pub devices: usize,
    /// Changes per pushed batch.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Batches each device pushes at most (the run also stops at --duration-secs).
    #[arg(long, default_value_t = 1_000)]
    pub batches_per_device: usize,
    /// Seconds of pushing at most, after the warm-up.
    #[arg(long, default_value_t = 20)]
    pub duration_secs: u64,
    /// Seconds of pushing before the measured window opens (latencies, rates and CPU then start
    /// afresh; the report also gives latencies over both, and the timeline covers both).
    #[arg(long, default_value_t = 0)]
    pub warmup_secs: u64,
    /// Share of changes (0..1) written to rows that all devices of the tenant write (conflicts).
    #[arg(long, default_value_t = 0.0)]
    pub conflict_rate: f64,
    /// Changes per second per device; 0 pushes the next batch as soon as the last is acked.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Rows of its own that each device creates and then updates.
    #[arg(long, default_value_t = 200)]
    pub rows_per_device: usize,
    /// Rows per tenant that every device writes (the targets of conflicting changes).
    #[arg(long, default_value_t = 20)]
    pub shared_rows: usize,
    /// Prefix of tenant and device ids; a fresh random one by default, so runs never collide.
    #[arg(long)]
    pub id_prefix: Option<String>,
}

/// Change ids whose delivery to other devices is timed, with their push time.
type Timed = Mutex<HashMap<Uuid, Instant>>;

/// One device's changes: own rows first inserted then updated; shared rows written blind.
pub struct Workload {
    tenant_key: u128,
    device_key: u128,
    rows: usize,
    shared: usize,
    conflict_rate: f64,
    next_device_seq: u64,
    counter: u32,
    created: usize,
    /// Versions of own rows, learned from acks (so updates merge cleanly).
    versions: Vec<u64>,
    rng: u64,
}

impl Workload {
    pub fn new(tenant: &str, device: &str, rows: usize, shared: usize, conflict_rate: f64) -> Workload {
        let rows = rows.max(1);
        Workload {
            tenant_key: hash128(tenant),
            device_key: hash128(device),
            rows,
            shared,
            conflict_rate,
            next_device_seq: 1,
            counter: 0,
            created: 0,
            versions: vec![0; rows],
            rng: hash128(device) as u64 | 1,
        }
    }

    pub fn uniform(&mut self) -> f64 {
        // xorshift64*: enough randomness for picking rows, no dependency.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Own row `row` is now at version `seq` (from an ack), so its next update merges cleanly.
    pub fn learn_version(&mut self, row: usize, seq: u64) {
        if let Some(v) = self.versions.get_mut(row) {
            *v = seq;
        }
    }

    /// The next change, and which own row it writes (`None` for a shared row).
    pub fn next(&mut self) -> (Change, Option<usize>) {
        self.counter = self.counter.wrapping_add(1);
        let device_seq = self.next_device_seq;
        self.next_device_seq += 1;
        let hlc = Hlc { wall_ms: now_ms(), counter: self.counter };
        let price = (self.uniform() * 10_000.0) as i64;
        let stock = (self.uniform() * 500.0) as i64;
        let (key, fields, base_version, own) = if self.shared > 0 && self.uniform() < self.conflict_rate {
            let r = (self.uniform() * self.shared as f64) as u128;
            let id = Uuid::from_u128(self.tenant_key ^ (r + 1));
            // Blind write (base 0): concurrent with every other device's write of the row.
            (id, json!({"sku": format!("SH-{r}"), "name": format!("Shared {r}"), "price_cents": price, "stock": stock}), 0, None)
        } else if self.created < self.rows {
            let r = self.created;
            self.created += 1;
            let id = Uuid::from_u128(self.device_key ^ (r as u128 + 1));
            (id, json!({"sku": format!("SKU-{r}"), "name": format!("Item {r}"), "price_cents": price, "stock": stock}), 0, Some(r))
        } else {
            let r = (self.uniform() * self.rows as f64) as usize;
            let id = Uuid::from_u128(self.device_key ^ (r as u128 + 1));
            (id, json!({"price_cents": price, "stock": stock}), self.versions[r], Some(r))
        };
        let change = Change {
            change_id: Uuid::now_v7(),
            device_seq,
            table: "products".into(),
            op: Op::Upsert,
            key: obj(json!({ "id": key })),
            fields: obj(fields),
            hlc,
            base_version,
        };
        (change, own)
    }
}

/// The `id` key of a change made by [`Workload`].
pub fn key_uuid(change: &Change) -> Uuid {
    change.key.get("id").and_then(Value::as_str).and_then(|s| s.parse().ok()).unwrap_or_default()
}

fn obj(v: Value) -> Object {
    match v {
        Value::Object(m) => m,
        _ => Object::new(),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub(crate) fn hash128(s: &str) -> u128 {
    // Name-based UUID (SHA-1): stable row ids per tenant and device name that stay apart for
    // names differing in one character (a plain FNV hash left such ids a few bits apart, so
    // `key ^ row` of one device could meet another device's).
    Uuid::new_v5(&Uuid::NAMESPACE_OID, s.as_bytes()).as_u128()
}

struct Device {
    n: usize,
    tenant: String,
    name: String,
}

pub async fn run(target: Target, tokens: TokenSource, args: DevicesArgs, hub_pid: Option<u32>) -> Report {
    run_measuring_wal(target, tokens, args, hub_pid, None).await
}

/// [`run`], reporting as well the WAL the hub's Postgres (`database`) wrote over the window.
pub async fn run_measuring_wal(target: Target, tokens: TokenSource, args: DevicesArgs, hub_pid: Option<u32>, database: Option<&PgPool>) -> Report {
    let prefix = args.id_prefix.clone().unwrap_or_else(|| format!("lt-{}", &Uuid::new_v4().simple().to_string()[..8]));
    let stats = Arc::new(Stats::default());
    let timed: Arc<Timed> = Arc::new(Mutex::new(HashMap::new()));
    let (go_tx, go_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let connecting = Arc::new(Semaphore::new(64));
    let tenants = args.tenants.max(1);
    let mut tasks = Vec::new();
    // Each tenant's first device connects before the others: a tenant's row is made at its
    // first hello, and the first hellos of one new tenant at several nodes of a cluster at once
    // are a race no real tenant runs (it is new once), which the connect phase need not measure.
    let first_wave = tenants.min(args.devices);
    for n in 0..args.devices {
        if n == first_wave {
            let settled = || stats.connections_opened.load(Ordering::Relaxed) + stats.connections_failed.load(Ordering::Relaxed) >= first_wave as u64;
            let deadline = Instant::now() + Duration::from_secs(120);
            while !settled() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let tenant = format!("{prefix}-t{}", n % tenants);
        let device = Device { n, name: format!("{prefix}-d{n}"), tenant };
        let token = tokens.token(&device.tenant, &device.name, n, "Employee");
        let (target, stats, timed, args) = (target.clone(), stats.clone(), timed.clone(), args.clone());
        let (go, stop, connecting) = (go_rx.clone(), stop_rx.clone(), connecting.clone());
        tasks.push(tokio::spawn(async move { run_device(device, token, target, args, stats, timed, go, stop, connecting).await }));
    }

    // Connect everyone first, then measure the pushing phase only.
    let t0 = Instant::now();
    let mut monitor = Monitor::new(hub_pid);
    if !stats.wait_for_connections(args.devices, Duration::from_secs(120)).await {
        eprintln!("not every device connected within 120 s; going on with those that did");
    }
    eprintln!(
        "{} devices connected in {:.1} s ({} failed); pushing for at most {} s after a warm-up of {} s",
        stats.connections_opened.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64(),
        stats.connections_failed.load(Ordering::Relaxed),
        args.duration_secs,
        args.warmup_secs
    );
    monitor.reset(&stats);
    let mut wal = WalWindow::new(database);
    wal.open().await;
    let started = Instant::now();
    let _ = go_tx.send(true);
    let forget_old = || timed.lock().unwrap().retain(|_, t| t.elapsed() < crate::report::LATENCY_MAX);
    let mut window_opened = started;
    if args.warmup_secs > 0 {
        let warmup = Duration::from_secs(args.warmup_secs);
        monitor.watch_tasks(&stats, started, &mut tasks, started + warmup, forget_old).await;
        monitor.end_warmup(&stats, started.elapsed());
        wal.open().await;
        window_opened = Instant::now();
    }
    let deadline = window_opened + Duration::from_secs(args.duration_secs);
    monitor.watch_tasks(&stats, started, &mut tasks, deadline, forget_old).await;
    let measured = window_opened.elapsed();
    let _ = stop_tx.send(true);
    monitor.stop(&stats);
    let wal_bytes = wal.close().await;
    // Tasks that ended within the window were joined there (awaiting them again would panic).
    crate::report::join_by(tasks.into_iter().filter(|t| !t.is_finished()), Duration::from_secs(15)).await;
    let parameters = serde_json::to_value(&args).unwrap_or(Value::Null);
    Report { wal_bytes, ..monitor.finish("devices", parameters, &stats, measured) }
}

#[allow(clippy::too_many_arguments)]
async fn run_device(
    device: Device,
    token: String,
    target: Target,
    args: DevicesArgs,
    stats: Arc<Stats>,
    timed: Arc<Timed>,
    mut go: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
    connecting: Arc<Semaphore>,
) {
    let client = {
        let _permit = connecting.acquire().await;
        let mut client = match target.connect(device.n).await {
            Ok(c) => c,
            Err(err) => {
                stats.connections_failed.fetch_add(1, Ordering::Relaxed);
                stats.error(&format!("connect: {err}"));
                return;
            }
        };
        if let Err(err) = client.handshake(token, &device.name, None).await {
            stats.connections_failed.fetch_add(1, Ordering::Relaxed);
            stats.error(&format!("handshake: {err}"));
            return;
        }
        client
    };
    stats.connections_opened.fetch_add(1, Ordering::Relaxed);
    let workload = Workload::new(&device.tenant, &device.name, args.rows_per_device, args.shared_rows, args.conflict_rate);
    let _ = go.wait_for(|g| *g).await;
    let crate::client::Client { sender, receiver } = client;
    let (ack_tx, ack_rx) = tokio::sync::mpsc::channel::<Vec<protocol::ChangeResult>>(4);
    let pushing = tokio::spawn(push_loop(sender, workload, args.clone(), stats.clone(), timed.clone(), stop.clone(), ack_rx));
    receive_loop(receiver, stats, timed, ack_tx, pushing).await;
}

/// Push batches (closed loop, or paced by --rate) until told to stop or out of batches.
async fn push_loop(
    mut sender: Sender,
    mut workload: Workload,
    args: DevicesArgs,
    stats: Arc<Stats>,
    timed: Arc<Timed>,
    mut stop: watch::Receiver<bool>,
    mut acks: tokio::sync::mpsc::Receiver<Vec<protocol::ChangeResult>>,
) -> Sender {
    let pace = (args.rate > 0.0).then(|| Duration::from_secs_f64(args.batch as f64 / args.rate));
    // Paced devices start at a random point of their interval, so the load is steady, not bursts.
    let mut next_at = Instant::now() + pace.map_or(Duration::ZERO, |p| p.mul_f64(workload.uniform()));
    for id in 1..=args.batches_per_device as u64 {
        if *stop.borrow() {
            break;
        }
        if let Some(pace) = pace {
            tokio::time::sleep_until(next_at.into()).await;
            next_at += pace;
        }
        let mut changes = Vec::with_capacity(args.batch);
        let mut own = Vec::with_capacity(args.batch);
        for _ in 0..args.batch {
            let (change, row) = workload.next();
            own.push(row);
            changes.push(change);
        }
        let sent_at = Instant::now();
        timed.lock().unwrap().insert(changes[0].change_id, sent_at);
        let count = changes.len() as u64;
        if let Err(err) = sender.send(&ClientFrame::Push { id: id + 10, batch_id: Uuid::now_v7(), changes }).await {
            stats.error(&format!("send: {err}"));
            break;
        }
        stats.changes_sent.fetch_add(count, Ordering::Relaxed);
        // A push the hub refused (an error frame, counted by the receiver) is never acked: the
        // device waits for the end of the run instead of holding it open.
        let results = tokio::select! {
            results = acks.recv() => results,
            _ = stop.wait_for(|s| *s) => None,
        };
        let Some(results) = results else { break };
        stats.ack_latency(sent_at.elapsed());
        for (result, row) in results.iter().zip(own) {
            if let (Some(r), Some(seq)) = (row, result.seq) {
                workload.learn_version(r, seq);
            }
        }
    }
    sender
}

async fn receive_loop(
    mut receiver: Receiver,
    stats: Arc<Stats>,
    timed: Arc<Timed>,
    acks: tokio::sync::mpsc::Sender<Vec<protocol::ChangeResult>>,
    mut pushing: tokio::task::JoinHandle<Sender>,
) {
    loop {
        let frame = tokio::select! {
            frame = receiver.recv_heads() => frame,
            sender = &mut pushing => {
                if let Ok(mut sender) = sender { sender.close().await; }
                return;
            }
        };
        match frame {
            Ok(Received::Frame(ServerFrame::Ack { results, .. })) => {
                stats.batches_acked.fetch_add(1, Ordering::Relaxed);
                stats.count_results(&results);
                let _ = acks.send(results).await;
            }
            Ok(Received::Deltas { catch_up: false, deltas }) => {
                stats.deltas_received.fetch_add(deltas.len() as u64, Ordering::Relaxed);
                let timed = timed.lock().unwrap();
                for d in &deltas {
                    if let Some(sent) = d.change_id.and_then(|id| timed.get(&id)) {
                        stats.delivery_latency(sent.elapsed());
                    }
                }
            }
            Ok(Received::Frame(ServerFrame::Error { code, .. })) => stats.error(code.as_str()),
            Ok(Received::Deltas { catch_up: true, deltas }) => {
                stats.deltas_received.fetch_add(deltas.len() as u64, Ordering::Relaxed);
            }
            Ok(Received::Frame(_)) => {}
            Err(err) => {
                stats.error(&err.to_string());
                pushing.abort();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_numbers_changes_creates_rows_first_and_honours_the_conflict_rate() {
        let mut w = Workload::new("t", "d", 10, 5, 0.25);
        let changes: Vec<_> = (0..4000).map(|_| w.next()).collect();
        let seqs: Vec<u64> = changes.iter().map(|(c, _)| c.device_seq).collect();
        assert_eq!(seqs, (1..=4000).collect::<Vec<_>>());
        let shared = changes.iter().filter(|(_, own)| own.is_none()).count() as f64 / 4000.0;
        assert!((0.2..0.3).contains(&shared), "shared share {shared}");
        // Own rows are created with every required column before they are updated.
        let first_own = changes.iter().find(|(_, own)| own.is_some()).unwrap();
        assert!(first_own.0.fields.contains_key("sku") && first_own.0.fields.contains_key("name"));
        // Shared rows are the same keys for every device of the tenant, own rows are not.
        let mut other = Workload::new("t", "e", 10, 5, 1.0);
        let shared_keys: std::collections::HashSet<Uuid> =
            changes.iter().filter(|(_, own)| own.is_none()).map(|(c, _)| key_uuid(c)).collect();
        assert!((0..50).map(|_| key_uuid(&other.next().0)).all(|k| shared_keys.contains(&k)));
    }
}
