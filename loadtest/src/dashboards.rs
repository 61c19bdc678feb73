//! The `dashboards` scenario: S dashboard sessions over T tenants subscribe to low-stock rows
//! (each with its own threshold, a snapshot first) while the tenants' devices keep writing
//! stock levels; measures push→delivery latency at the dashboards, subscription deltas per
//! second, snapshot time, push→ack latency and errors.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::{Change, ClientFrame, Condition, FilterOp, Hlc, Op, ServerFrame, SessionMode};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::watch;
use uuid::Uuid;

use crate::client::{Client, Target};
use crate::error::{LoadError, Result};
use crate::report::{join_by, Monitor, Report, Stats};
use crate::tokens::TokenSource;

#[derive(Debug, Clone, Serialize, clap::Args)]
pub struct DashboardsArgs {
    /// Dashboard sessions, spread over the tenants.
    #[arg(long, default_value_t = 100)]
    pub dashboards: usize,
    #[arg(long, default_value_t = 10)]
    pub tenants: usize,
    /// Writing devices per tenant.
    #[arg(long, default_value_t = 2)]
    pub devices_per_tenant: usize,
    /// Changes per second over all devices.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 20)]
    pub duration_secs: u64,
    /// Products per tenant (stock levels 0 to 39; a dashboard watches stock below 5 to 24).
    #[arg(long, default_value_t = 200)]
    pub products: usize,
    /// Sockets connecting at once.
    #[arg(long, default_value_t = 100)]
    pub concurrency: usize,
}

fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Product `i` of a tenant: a name-based key, so every device and run agrees on it.
fn product_id(tenant: &str, i: usize) -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("{tenant}/product/{i}").as_bytes())
}

fn change(device_seq: u64, id: Uuid, fields: Value) -> Change {
    Change {
        change_id: Uuid::now_v7(),
        device_seq,
        table: "products".into(),
        op: Op::Upsert,
        key: json!({"id": id}).as_object().cloned().unwrap_or_default(),
        fields: fields.as_object().cloned().unwrap_or_default(),
        hlc: Hlc { wall_ms: now_us() / 1000, counter: 0 },
        base_version: 0,
    }
}

pub async fn run(target: Target, tokens: TokenSource, args: DashboardsArgs, hub_pid: Option<u32>) -> Result<Report> {
    let stats = Arc::new(Stats::default());
    let run = format!("dash-{}", &Uuid::new_v4().simple().to_string()[..8]);
    let tenants: Vec<String> = (0..args.tenants.max(1)).map(|t| format!("{run}-t{t}")).collect();

    // Seed each tenant's products (batches of at most 1,000 rows), each device its own share.
    let mut writers = Vec::new();
    for (t, tenant) in tenants.iter().enumerate() {
        for d in 0..args.devices_per_tenant.max(1) {
            let device = format!("{tenant}-d{d}");
            let mut client = target.connect(t * 1000 + d).await?;
            client.handshake(tokens.token(tenant, &device, t * 1000 + d, "Employee"), &device, None).await?;
            writers.push((tenant.clone(), device, client, 0u64));
        }
    }
    let lanes = args.devices_per_tenant.max(1);
    for (w, (tenant, _, client, seq)) in writers.iter_mut().enumerate() {
        let share: Vec<usize> = (0..args.products).filter(|i| i % lanes == w % lanes).collect();
        for chunk in share.chunks(1000) {
            let changes = chunk
                .iter()
                .map(|&i| {
                    *seq += 1;
                    change(*seq, product_id(tenant, i), json!({"sku": format!("S{i}"), "name": format!("seed {i}"), "price_cents": 100, "stock": i % 40}))
                })
                .collect();
            client.sender.send(&ClientFrame::Push { id: *seq, batch_id: Uuid::now_v7(), changes }).await?;
            loop {
                match client.receiver.recv().await? {
                    ServerFrame::Ack { results, .. } => {
                        stats.count_results(&results);
                        break;
                    }
                    ServerFrame::Error { code, message, .. } => return Err(LoadError::Refused { code: code.as_str().into(), message }),
                    _ => {}
                }
            }
        }
    }

    // Dashboards subscribe, each timing its snapshot.
    let (stop_tx, stop_rx) = watch::channel(false);
    let gate = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let snapshot_times = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for n in 0..args.dashboards {
        let tenant = tenants[n % tenants.len()].clone();
        let token = tokens.token_for(&tenant, &format!("{tenant}-board{n}"), &format!("manager-{n}"), "Manager");
        let (target, stats, gate, stop, times) = (target.clone(), stats.clone(), gate.clone(), stop_rx.clone(), snapshot_times.clone());
        tasks.push(tokio::spawn(dashboard(target, token, n, stats, gate, stop, times)));
    }
    let t0 = Instant::now();
    stats.wait_for_connections(args.dashboards, Duration::from_secs(120)).await;
    let mut times = std::mem::take(&mut *snapshot_times.lock().unwrap());
    times.sort_by(|a: &f64, b| a.total_cmp(b));
    let pick = |q: f64| times.get(((times.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0.0);
    eprintln!(
        "{} dashboards subscribed in {:.1} s (snapshot p50 {:.1} ms, p99 {:.1} ms); writing {}/s for {} s",
        stats.connections_opened.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64(),
        pick(0.5),
        pick(0.99),
        args.rate,
        args.duration_secs
    );

    let mut monitor = Monitor::new(hub_pid);
    monitor.reset(&stats);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration_secs);
    let writer_count = writers.len().max(1);
    let per_device = args.rate / writer_count as f64;
    let products = args.products.max(1);
    let mut jobs = Vec::new();
    for (w, (tenant, _, client, seq)) in writers.into_iter().enumerate() {
        let stats = stats.clone();
        // Each device of a tenant writes its own share of the products (no conflicts).
        let lane = (w % lanes, lanes);
        // Writers start spread over one pace interval: in step, they would all push in the
        // same millisecond every interval and measure their own burst.
        let offset = w as f64 / writer_count as f64;
        jobs.push(tokio::spawn(async move {
            if let Err(err) = write_loop(client, &tenant, seq, lane, (per_device, offset), products, deadline, &stats).await {
                stats.error(&format!("writer: {err}"));
            }
        }));
    }
    let measured = monitor.watch_until(&stats, started, deadline, || jobs.iter().all(|j| j.is_finished())).await;
    let _ = stop_tx.send(true);
    join_by(jobs.into_iter().chain(tasks), Duration::from_secs(5)).await;
    let mut parameters = serde_json::to_value(&args).unwrap_or(Value::Null);
    parameters["snapshot_p50_ms"] = json!(pick(0.5));
    parameters["snapshot_p99_ms"] = json!(pick(0.99));
    Ok(monitor.finish("dashboards", parameters, &stats, measured))
}

#[allow(clippy::too_many_arguments)]
async fn write_loop(
    client: Client,
    tenant: &str,
    mut seq: u64,
    (lane, lanes): (usize, usize),
    (rate, offset): (f64, f64),
    products: usize,
    deadline: Instant,
    stats: &Stats,
) -> Result<()> {
    let Client { mut sender, mut receiver } = client;
    let sent_at: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let reading = {
        let sent_at = sent_at.clone();
        async move {
            loop {
                match receiver.recv().await {
                    Ok(ServerFrame::Ack { id, results, .. }) => {
                        if let Some(at) = sent_at.lock().unwrap().remove(&id) {
                            stats.ack_latency(at.elapsed());
                        }
                        stats.batches_acked.fetch_add(1, Ordering::Relaxed);
                        stats.count_results(&results);
                    }
                    Ok(ServerFrame::Error { code, .. }) => stats.error(code.as_str()),
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        }
    };
    let writing = async {
        let pace = Duration::from_secs_f64(1.0 / rate.max(0.001));
        let mut next_at = Instant::now() + pace.mul_f64(offset);
        let mut n = lane as u64;
        let share = (products / lanes).max(1);
        while Instant::now() < deadline {
            tokio::time::sleep_until(next_at.into()).await;
            next_at += pace;
            seq += 1;
            n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let id = product_id(tenant, ((n >> 33) as usize % share * lanes + lane) % products);
            let stock = (n >> 20) % 40;
            sent_at.lock().unwrap().insert(seq, Instant::now());
            let fields = json!({"stock": stock, "name": format!("dash {}", now_us())});
            sender.send(&ClientFrame::Push { id: seq, batch_id: Uuid::now_v7(), changes: vec![change(seq, id, fields)] }).await?;
            stats.changes_sent.fetch_add(1, Ordering::Relaxed);
        }
        // Let the last acks come back.
        tokio::time::sleep(Duration::from_millis(300)).await;
        sender.close().await;
        Ok(())
    };
    tokio::pin!(reading);
    tokio::select! {
        result = writing => result,
        _ = &mut reading => Err(LoadError::Closed { code: 1006, reason: "the hub closed a writer's socket".into() }),
    }
}

async fn dashboard(
    target: Target,
    token: String,
    n: usize,
    stats: Arc<Stats>,
    gate: Arc<tokio::sync::Semaphore>,
    mut stop: watch::Receiver<bool>,
    snapshot_times: Arc<Mutex<Vec<f64>>>,
) {
    let subscribe = async {
        let mut client = target.connect(100_000 + n).await?;
        client.sender.send(&ClientFrame::Hello { mode: SessionMode::Dashboard, id: 1, versions: vec![1], token, device_id: None, position: None }).await?;
        match client.receiver.recv().await? {
            ServerFrame::Welcome { .. } => {}
            ServerFrame::Error { code, message, .. } => return Err(LoadError::Refused { code: code.as_str().into(), message }),
            other => return Err(LoadError::Protocol(format!("expected welcome, got {other:?}"))),
        }
        let asked = Instant::now();
        let filter = vec![Condition { column: "stock".into(), op: FilterOp::Lt, value: json!(5 + n % 20) }];
        client
            .sender
            .send(&ClientFrame::Subscribe { id: 2, sub: "low-stock".into(), table: Some("products".into()), filter, snapshot: true, channel: None })
            .await?;
        loop {
            match client.receiver.recv().await? {
                ServerFrame::SubRows { last: true, .. } => break,
                ServerFrame::Error { code, message, .. } => return Err(LoadError::Refused { code: code.as_str().into(), message }),
                _ => {}
            }
        }
        snapshot_times.lock().unwrap().push(asked.elapsed().as_secs_f64() * 1000.0);
        Ok(client)
    };
    let _permit = gate.acquire().await;
    let mut client = match subscribe.await {
        Ok(client) => {
            stats.connections_opened.fetch_add(1, Ordering::Relaxed);
            client
        }
        Err(err) => {
            stats.connections_failed.fetch_add(1, Ordering::Relaxed);
            stats.error(&format!("dashboard: {err}"));
            return;
        }
    };
    drop(_permit);
    loop {
        tokio::select! {
            frame = client.receiver.recv() => match frame {
                Ok(ServerFrame::SubDelta { deltas, .. }) => {
                    for d in &deltas {
                        stats.deltas_received.fetch_add(1, Ordering::Relaxed);
                        let sent = d.row.as_ref().and_then(|r| r["name"].as_str()?.strip_prefix("dash ")?.parse::<u64>().ok());
                        if let Some(sent) = sent {
                            stats.delivery_latency(Duration::from_micros(now_us().saturating_sub(sent)));
                        }
                    }
                }
                Ok(ServerFrame::Error { code, .. }) => stats.error(code.as_str()),
                Ok(_) => {}
                Err(err) => {
                    stats.error(&format!("dashboard: {err}"));
                    return;
                }
            },
            _ = stop.changed() => {
                client.sender.close().await;
                return;
            }
        }
    }
}
