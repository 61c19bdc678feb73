//! The `dashboards` scenario: S dashboard sessions over T tenants subscribe to low-stock rows
//! (each with its own threshold, a snapshot first) while the tenants' devices keep writing
//! stock levels; measures push→delivery latency at the dashboards, subscription deltas per
//! second, snapshot time, push→ack latency and errors. With `--supabase-subscribers`, Supabase
//! Realtime clients (Phoenix channels, as supabase-js speaks them) watch the same rows beside
//! the native dashboards in the same run, counted apart (the report's `client_groups.supabase`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use protocol::{Change, ClientFrame, Condition, FilterOp, Hlc, Op, ServerFrame, SessionMode};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::client::{Client, Target};
use crate::error::{LoadError, Result};
use crate::phoenix::{self, Vsn};
use crate::report::{join_by, ClientGroup, Monitor, Report, Stats};
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
    /// Supabase Realtime clients beside the dashboards, spread over the same tenants: each a
    /// socket to /realtime/v1/websocket joining `realtime:low-stock-<n>` with one
    /// postgres_changes binding on `products`, filter `stock=lt.<5 + n % 20>` (a dashboard's
    /// threshold), as supabase-js sends it; counted apart from the dashboards.
    #[arg(long, default_value_t = 0)]
    pub supabase_subscribers: usize,
    /// Phoenix serializer of the Supabase clients: 1.0.0 (JSON objects) or 2.0.0 (JSON arrays).
    #[arg(long, default_value = "1.0.0")]
    pub supabase_vsn: String,
}

/// How often supabase-js sends a `heartbeat` (its `HEARTBEAT_INTERVAL`).
const SUPABASE_HEARTBEAT: Duration = Duration::from_secs(25);

/// The sorted times of a phase (ms), and their quantile `q`.
fn quantile(times: &Mutex<Vec<f64>>, q: f64) -> f64 {
    let mut times = times.lock().unwrap();
    times.sort_by(|a, b| a.total_cmp(b));
    times.get(((times.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0.0)
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
    let vsn = Vsn::parse(&args.supabase_vsn)?;
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

    // Dashboards subscribe, each timing its snapshot; Supabase clients join, each timing its join.
    let (stop_tx, stop_rx) = watch::channel(false);
    let gate = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let snapshot_times = Arc::new(Mutex::new(Vec::new()));
    let join_times = Arc::new(Mutex::new(Vec::new()));
    let supabase = Arc::new(Stats::default());
    let mut tasks = Vec::new();
    for n in 0..args.dashboards.max(args.supabase_subscribers) {
        let tenant = tenants[n % tenants.len()].clone();
        if n < args.dashboards {
            let token = tokens.token_for(&tenant, &format!("{tenant}-board{n}"), &format!("manager-{n}"), "Manager");
            let (target, stats, gate, stop, times) = (target.clone(), stats.clone(), gate.clone(), stop_rx.clone(), snapshot_times.clone());
            tasks.push(tokio::spawn(dashboard(target, token, n, stats, gate, stop, times)));
        }
        if n < args.supabase_subscribers {
            let token = tokens.token_for(&tenant, &format!("{tenant}-sb{n}"), &format!("manager-sb{n}"), "Manager");
            let client = SupabaseClient {
                target: target.clone(),
                // On the node its socket number goes to (see `join`).
                url: phoenix::realtime_url(target.url_of(200_000 + n), &token, vsn)?,
                token,
                n,
                vsn,
                errors: stats.clone(),
                stats: supabase.clone(),
                join_times: join_times.clone(),
            };
            tasks.push(tokio::spawn(client.run(gate.clone(), stop_rx.clone())));
        }
    }
    let t0 = Instant::now();
    stats.wait_for_connections(args.dashboards, Duration::from_secs(120)).await;
    supabase.wait_for_connections(args.supabase_subscribers, Duration::from_secs(120)).await;
    let (snapshot_p50, snapshot_p99) = (quantile(&snapshot_times, 0.5), quantile(&snapshot_times, 0.99));
    let (join_p50, join_p99) = (quantile(&join_times, 0.5), quantile(&join_times, 0.99));
    eprintln!(
        "{} dashboards subscribed in {:.1} s (snapshot p50 {:.1} ms, p99 {:.1} ms); writing {}/s for {} s",
        stats.connections_opened.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64(),
        snapshot_p50,
        snapshot_p99,
        args.rate,
        args.duration_secs
    );
    if args.supabase_subscribers > 0 {
        eprintln!(
            "{} Supabase clients (vsn {}) joined, {} failed (join p50 {:.1} ms, p99 {:.1} ms)",
            supabase.connections_opened.load(Ordering::Relaxed),
            vsn.as_str(),
            supabase.connections_failed.load(Ordering::Relaxed),
            join_p50,
            join_p99
        );
    }

    let mut monitor = Monitor::new(hub_pid);
    monitor.reset(&stats);
    let supabase_before = supabase.deltas_received.load(Ordering::Relaxed);
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
    // The window closed as `watch_until` returned: the Supabase clients' count at the same moment.
    let supabase_in_window = supabase.deltas_received.load(Ordering::Relaxed) - supabase_before;
    let _ = stop_tx.send(true);
    join_by(jobs.into_iter().chain(tasks), Duration::from_secs(5)).await;
    let mut parameters = serde_json::to_value(&args).unwrap_or(Value::Null);
    parameters["snapshot_p50_ms"] = json!(snapshot_p50);
    parameters["snapshot_p99_ms"] = json!(snapshot_p99);
    if args.supabase_subscribers > 0 {
        parameters["supabase_join_p50_ms"] = json!(join_p50);
        parameters["supabase_join_p99_ms"] = json!(join_p99);
    }
    let mut report = monitor.finish("dashboards", parameters, &stats, measured);
    if args.supabase_subscribers > 0 {
        let label = format!("Supabase Realtime (Phoenix vsn {}), postgres_changes", vsn.as_str());
        report.client_groups.insert("supabase".into(), ClientGroup::of(&label, &supabase, supabase_in_window, measured));
    }
    Ok(report)
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

/// The latency of a delivered row whose `name` is a writer's `dash <micros>`.
fn latency_of(name: Option<&str>) -> Option<Duration> {
    let sent = name?.strip_prefix("dash ")?.parse::<u64>().ok()?;
    Some(Duration::from_micros(now_us().saturating_sub(sent)))
}

/// A Supabase Realtime client as a supabase-js dashboard is one: a socket to
/// `/realtime/v1/websocket`, one channel with one postgres_changes binding, a heartbeat every
/// 25 s.
struct SupabaseClient {
    target: Target,
    url: String,
    token: String,
    n: usize,
    vsn: Vsn,
    /// The run's errors go with the dashboards' (prefixed `supabase`).
    errors: Arc<Stats>,
    /// The Supabase clients' own connections, deliveries and latencies.
    stats: Arc<Stats>,
    join_times: Arc<Mutex<Vec<f64>>>,
}

impl SupabaseClient {
    async fn run(self, gate: Arc<tokio::sync::Semaphore>, mut stop: watch::Receiver<bool>) {
        let permit = gate.acquire().await;
        let joined = tokio::time::timeout(self.target.answer_timeout, self.join()).await;
        let ws = match joined.unwrap_or(Err(LoadError::Timeout(self.target.answer_timeout, "phx_join"))) {
            Ok(ws) => {
                self.stats.connections_opened.fetch_add(1, Ordering::Relaxed);
                ws
            }
            Err(err) => {
                self.stats.connections_failed.fetch_add(1, Ordering::Relaxed);
                self.errors.error(&format!("supabase: {err}"));
                return;
            }
        };
        drop(permit);
        let (mut sink, mut stream) = ws.split();
        let mut heartbeat = tokio::time::interval_at((Instant::now() + SUPABASE_HEARTBEAT).into(), SUPABASE_HEARTBEAT);
        let mut next_ref = 2u64;
        let mut pending_heartbeat: Option<String> = None;
        loop {
            tokio::select! {
                frame = stream.next() => {
                    let text = match frame {
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(Message::Close(_))) | None => {
                            self.errors.error("supabase: the hub closed the socket");
                            return;
                        }
                        Some(Ok(_)) => continue,
                        Some(Err(err)) => {
                            self.errors.error(&format!("supabase: {err}"));
                            return;
                        }
                    };
                    let message = match phoenix::decode(self.vsn, &text) {
                        Ok(message) => message,
                        Err(err) => {
                            self.errors.error(&format!("supabase: {err}"));
                            continue;
                        }
                    };
                    match message.event.as_str() {
                        "postgres_changes" => {
                            self.stats.deltas_received.fetch_add(1, Ordering::Relaxed);
                            let name = message.payload.data.as_ref().and_then(|d| d.record.as_ref()?.name.as_deref());
                            if let Some(latency) = latency_of(name) {
                                self.stats.delivery_latency(latency);
                            }
                        }
                        "phx_reply" if message.msg_ref.is_some() && message.msg_ref == pending_heartbeat => pending_heartbeat = None,
                        "phx_reply" | "system" if message.payload.status.as_deref() == Some("error") => {
                            let why = message.payload.message.clone().unwrap_or_else(|| format!("{:?}", message.payload.response));
                            self.errors.error(&format!("supabase {}: {why}", message.event));
                        }
                        "phx_close" | "phx_error" => {
                            self.errors.error(&format!("supabase: {}", message.event));
                            return;
                        }
                        _ => {}
                    }
                }
                _ = heartbeat.tick() => {
                    // As supabase-js: an unanswered heartbeat when the next is due is a dead socket.
                    if pending_heartbeat.is_some() {
                        self.errors.error("supabase: heartbeat timeout");
                        return;
                    }
                    let msg_ref = next_ref.to_string();
                    next_ref += 1;
                    let text = phoenix::encode(self.vsn, None, Some(&msg_ref), "phoenix", "heartbeat", &json!({}));
                    pending_heartbeat = Some(msg_ref);
                    if let Err(err) = sink.send(Message::Text(text)).await {
                        self.errors.error(&format!("supabase: {err}"));
                        return;
                    }
                }
                _ = stop.changed() => {
                    let _ = sink.close().await;
                    return;
                }
            }
        }
    }

    /// Open the socket and join the channel: returns once the join is answered `ok`.
    async fn join(&self) -> Result<crate::client::Ws> {
        let mut ws = self.target.connect_raw(&self.url, 200_000 + self.n).await?;
        let topic = format!("realtime:low-stock-{}", self.n);
        let binding = json!([{"event": "*", "schema": "public", "table": "products", "filter": format!("stock=lt.{}", 5 + self.n % 20)}]);
        let payload = phoenix::join_payload(binding, &self.token);
        let asked = Instant::now();
        ws.send(Message::Text(phoenix::encode(self.vsn, Some("1"), Some("1"), &topic, "phx_join", &payload))).await?;
        loop {
            let text = match ws.next().await {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Close(_))) | None => return Err(LoadError::Closed { code: 1006, reason: "closed before the join was answered".into() }),
                Some(Ok(_)) => continue,
                Some(Err(err)) => return Err(err.into()),
            };
            let message = phoenix::decode(self.vsn, &text)?;
            if message.event != "phx_reply" || message.msg_ref.as_deref() != Some("1") {
                continue;
            }
            if message.payload.status.as_deref() != Some("ok") {
                let reason = message.payload.response.as_ref().and_then(|r| r["reason"].as_str()).unwrap_or("no reason").to_owned();
                return Err(LoadError::Refused { code: "phx_join".into(), message: reason });
            }
            self.join_times.lock().unwrap().push(asked.elapsed().as_secs_f64() * 1000.0);
            return Ok(ws);
        }
    }
}
