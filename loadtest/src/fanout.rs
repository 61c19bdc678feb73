//! The `fanout` scenario: one publisher, S subscribers, a steady offered rate; measures deltas
//! delivered per second and publish→delivery latency. The same run against nats-server's
//! WebSocket listener (`--nats-url`) gives the baseline: same clients, same payload size, the
//! send time carried in the payload either way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use protocol::{Change, ClientFrame, Hlc, Op, ServerFrame};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::client::{Target, Ws};
use crate::error::{LoadError, Result};
use crate::report::{join_by, Monitor, Report, Stats};
use crate::tokens::TokenSource;

#[derive(Debug, Clone, Serialize, clap::Args)]
pub struct FanoutArgs {
    /// Receiving sockets (devices of one tenant, or NATS subscribers of one subject).
    #[arg(long, default_value_t = 1_000)]
    pub subscribers: usize,
    /// Messages per second the publisher offers.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 20)]
    pub duration_secs: u64,
    /// Sockets connecting at once.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Run against nats-server's WebSocket listener at this URL instead of the hub.
    #[arg(long)]
    pub nats_url: Option<String>,
    /// After the last message is published, wait at most this long for every subscriber to
    /// receive every message; the measured window ends when they have (seconds).
    #[arg(long, default_value_t = 10)]
    pub drain_secs: u64,
    /// The hub's publisher keeps at most this many pushes awaiting their acks, as a device
    /// does; keep it within the hub's `session_pushes_in_flight` (64), past which pushes are
    /// refused `busy` and the ones after them with `seq_gap`.
    #[arg(long, default_value_t = 32)]
    pub in_flight: usize,
}

fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

fn record(stats: &Stats, payload_sent_us: Option<u64>) {
    stats.deltas_received.fetch_add(1, Ordering::Relaxed);
    if let Some(sent) = payload_sent_us {
        stats.delivery_latency(Duration::from_micros(now_us().saturating_sub(sent)));
    }
}

/// A row like the hub's delta rows, with the send time in its name.
fn row(id: Uuid, n: u64) -> Value {
    json!({"tenant_id": "fan", "id": id, "sku": format!("FAN-{}", n % 100), "name": format!("fan {}", now_us()), "price_cents": n % 10_000, "stock": 1, "active": true})
}

pub async fn run(target: Target, tokens: TokenSource, args: FanoutArgs, hub_pid: Option<u32>) -> Result<Report> {
    let stats = Arc::new(Stats::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let gate = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let run = format!("fan-{}", &Uuid::new_v4().simple().to_string()[..8]);
    let mut tasks = Vec::new();
    for n in 0..args.subscribers {
        if n == 1 && args.nats_url.is_none() {
            // The first subscriber connects alone: the tenant's row is made at its first hello,
            // and the first hellos of one new tenant at several nodes of a cluster at once are
            // a race no real tenant runs (it is new once).
            let deadline = Instant::now() + Duration::from_secs(60);
            while stats.connections_opened.load(Ordering::Relaxed) + stats.connections_failed.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let (target, stats, gate, stop) = (target.clone(), stats.clone(), gate.clone(), stop_rx.clone());
        let job = match &args.nats_url {
            Some(url) => tokio::spawn(nats_subscriber(target, url.clone(), n, stats, gate, stop)),
            None => {
                let device = format!("{run}-s{n}");
                let token = tokens.token(&run, &device, n, "Employee");
                tokio::spawn(hub_subscriber(target, token, device, n, stats, gate, stop))
            }
        };
        tasks.push(job);
    }
    let t0 = Instant::now();
    stats.wait_for_connections(args.subscribers, Duration::from_secs(120)).await;
    eprintln!("{} subscribers ready in {:.1} s; publishing {}/s for {} s", stats.connections_opened.load(Ordering::Relaxed), t0.elapsed().as_secs_f64(), args.rate, args.duration_secs);

    let mut monitor = Monitor::new(hub_pid);
    monitor.reset(&stats);
    let started = Instant::now();
    // Set once the last message is sent, before the publisher's socket closes: closing is no
    // part of the measured window.
    let published = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (target, stats, args, published) = (target.clone(), stats.clone(), args.clone(), published.clone());
        let token = tokens.token(&run, &format!("{run}-publisher"), args.subscribers, "Employee");
        let device = format!("{run}-publisher");
        tokio::spawn(async move {
            let result = match &args.nats_url {
                Some(url) => nats_publisher(&target, url, &args, &stats, &published).await,
                None => hub_publisher(&target, token, device, &args, &stats, &published).await,
            };
            published.store(true, Ordering::Relaxed);
            if let Err(err) = result {
                stats.error(&format!("publisher: {err}"));
            }
        })
    };
    // The window ends when every subscriber has every message the server took (for both
    // servers alike; only the hub refuses any).
    let subscribed = stats.connections_opened.load(Ordering::Relaxed);
    let delivered_all = || {
        let taken = stats.changes_sent.load(Ordering::Relaxed).saturating_sub(stats.rejected.load(Ordering::Relaxed));
        stats.deltas_received.load(Ordering::Relaxed) >= taken * subscribed
    };
    let drain = Duration::from_secs(args.drain_secs);
    // A publisher that never finishes (a hub that stops acking keeps its window shut) is
    // given up on a drain period after its last send was due.
    let hard_end = started + Duration::from_secs(args.duration_secs + args.drain_secs);
    let measured =
        monitor.watch_until_drained(&stats, started, hard_end, || published.load(Ordering::Relaxed), delivered_all, drain).await;
    join_by([publisher], Duration::from_secs(5)).await;
    let _ = stop_tx.send(true);
    join_by(tasks, Duration::from_secs(5)).await;
    let name = if args.nats_url.is_some() { "fanout-nats" } else { "fanout-hub" };
    Ok(monitor.finish(name, serde_json::to_value(&args).unwrap_or(Value::Null), &stats, measured))
}

/// Open a subscriber's socket when the gate lets it, counting it as opened or failed.
async fn open<T>(stats: &Stats, gate: &tokio::sync::Semaphore, connect: impl std::future::Future<Output = Result<T>>) -> Option<T> {
    let _permit = gate.acquire().await;
    match connect.await {
        Ok(socket) => {
            stats.connections_opened.fetch_add(1, Ordering::Relaxed);
            Some(socket)
        }
        Err(err) => {
            stats.connections_failed.fetch_add(1, Ordering::Relaxed);
            stats.error(&format!("subscriber: {err}"));
            None
        }
    }
}

async fn hub_subscriber(
    target: Target,
    token: String,
    device: String,
    n: usize,
    stats: Arc<Stats>,
    gate: Arc<tokio::sync::Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let connect = async {
        let mut client = target.connect(n).await?;
        client.handshake(token, &device, None).await?;
        Ok(client)
    };
    let Some(mut client) = open(&stats, &gate, connect).await else { return };
    loop {
        tokio::select! {
            frame = client.receiver.recv() => match frame {
                // A session that fell behind is caught up from the log: those are deliveries too.
                Ok(ServerFrame::Delta { deltas, .. } | ServerFrame::CatchUp { deltas, .. }) => {
                    for d in &deltas {
                        let sent = d.row.as_ref().and_then(|r| r.get("name")).and_then(Value::as_str)
                            .and_then(|s| s.strip_prefix("fan ")).and_then(|s| s.parse().ok());
                        record(&stats, sent);
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    stats.error(&format!("subscriber: {err}"));
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

/// The publisher's clock: message numbers at the offered rate until the run's time is up.
struct Pacer {
    pace: Duration,
    deadline: Instant,
    next_at: Instant,
    seq: u64,
}

impl Pacer {
    fn new(args: &FanoutArgs) -> Pacer {
        let now = Instant::now();
        Pacer { pace: Duration::from_secs_f64(1.0 / args.rate.max(0.001)), deadline: now + Duration::from_secs(args.duration_secs), next_at: now, seq: 0 }
    }

    async fn next(&mut self) -> Option<u64> {
        if Instant::now() >= self.deadline {
            return None;
        }
        tokio::time::sleep_until(self.next_at.into()).await;
        self.next_at += self.pace;
        self.seq += 1;
        Some(self.seq)
    }
}

async fn hub_publisher(target: &Target, token: String, device: String, args: &FanoutArgs, stats: &Stats, published: &AtomicBool) -> Result<()> {
    let mut client = target.connect(args.subscribers).await?;
    client.handshake(token, &device, None).await?;
    let crate::client::Client { mut sender, mut receiver } = client;
    // Pushes awaiting their answers: each answer (ack or error) frees a place.
    let window = tokio::sync::Semaphore::new(args.in_flight.max(1));
    // Read the acks as a device would: a publisher that never reads stalls its own socket once
    // the hub's send buffer to it is full, and then the hub stops reading its pushes.
    let reading = async {
        loop {
            match receiver.recv().await {
                Ok(ServerFrame::Ack { results, .. }) => {
                    stats.batches_acked.fetch_add(1, Ordering::Relaxed);
                    // Merged as the hub says; a refused change is an error and reaches no one.
                    stats.count_results(&results);
                    window.add_permits(1);
                }
                Ok(ServerFrame::Error { code, .. }) => {
                    // A refused push (one change): nothing merged, nothing to deliver.
                    stats.error(code.as_str());
                    stats.rejected.fetch_add(1, Ordering::Relaxed);
                    window.add_permits(1);
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    };
    let publishing = async {
        let ids: Vec<Uuid> = (0..100).map(|_| Uuid::new_v4()).collect();
        let mut pacer = Pacer::new(args);
        while let Some(seq) = pacer.next().await {
            // A place in the window; a slow hub delays the publisher instead of refusing it.
            window.acquire().await.map_err(|_| LoadError::Protocol("the publisher's window closed".into()))?.forget();
            let id = ids[(seq % 100) as usize];
            let mut fields = row(id, seq);
            if let Some(map) = fields.as_object_mut() {
                for k in ["tenant_id", "id"] {
                    map.remove(k);
                }
            }
            let change = Change {
                change_id: Uuid::now_v7(),
                device_seq: seq,
                table: "products".into(),
                op: Op::Upsert,
                key: json!({"id": id}).as_object().cloned().unwrap_or_default(),
                fields: fields.as_object().cloned().unwrap_or_default(),
                hlc: Hlc { wall_ms: now_us() / 1000, counter: seq as u32 },
                base_version: 0,
            };
            sender.send(&ClientFrame::Push { id: seq + 10, batch_id: Uuid::now_v7(), changes: vec![change] }).await?;
            stats.changes_sent.fetch_add(1, Ordering::Relaxed);
        }
        published.store(true, Ordering::Relaxed);
        // A device keeps its socket until its pushes are acked: closing earlier may leave the
        // last ones unmerged, and never delivered.
        let acks_due = Instant::now() + Duration::from_secs(args.drain_secs);
        while stats.batches_acked.load(Ordering::Relaxed) < stats.changes_sent.load(Ordering::Relaxed) && Instant::now() < acks_due {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        sender.close().await;
        Ok(())
    };
    tokio::pin!(reading);
    tokio::select! {
        result = publishing => result,
        _ = &mut reading => Err(LoadError::Closed { code: 1006, reason: "the hub closed the publisher's socket".into() }),
    }
}

/// Connect to nats-server over WebSocket and wait until it has processed CONNECT (and SUB).
async fn nats_connect(target: &Target, url: &str, n: usize, subscribe: bool) -> Result<Ws> {
    let mut ws = target.connect_raw(url, n).await?;
    ws.next().await.ok_or_else(|| LoadError::Protocol("nats-server sent no INFO".into()))??;
    let mut hello = String::from("CONNECT {\"verbose\":false,\"pedantic\":false,\"protocol\":1}\r\n");
    if subscribe {
        hello.push_str("SUB fan 1\r\n");
    }
    hello.push_str("PING\r\n");
    ws.send(Message::Binary(hello.into_bytes())).await?;
    loop {
        let msg = ws.next().await.ok_or_else(|| LoadError::Protocol("nats-server closed".into()))??;
        let data = msg.into_data();
        if data.windows(4).any(|w| w == b"PONG") {
            return Ok(ws);
        }
        if data.starts_with(b"-ERR") {
            return Err(LoadError::Protocol(String::from_utf8_lossy(&data).into()));
        }
    }
}

async fn nats_subscriber(target: Target, url: String, n: usize, stats: Arc<Stats>, gate: Arc<tokio::sync::Semaphore>, mut stop: watch::Receiver<bool>) {
    let Some(mut ws) = open(&stats, &gate, nats_connect(&target, &url, n, true)).await else { return };
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let msg = tokio::select! {
            msg = ws.next() => msg,
            _ = stop.changed() => { let _ = ws.close(None).await; return; }
        };
        match msg {
            Some(Ok(m)) => buf.extend_from_slice(&m.into_data()),
            _ => {
                stats.error("subscriber: nats-server closed the socket");
                return;
            }
        }
        // Protocol lines, possibly several per frame or split across frames.
        loop {
            let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else { break };
            let line = &buf[..end];
            if line.starts_with(b"MSG ") {
                let size: usize = std::str::from_utf8(line).ok().and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0);
                if buf.len() < end + 2 + size + 2 {
                    break; // payload not complete yet
                }
                // Decode the payload as a client would, as the hub's subscribers decode frames.
                let payload = &buf[end + 2..end + 2 + size];
                let sent = serde_json::from_slice::<Value>(payload)
                    .ok()
                    .and_then(|v| v["row"]["name"].as_str()?.strip_prefix("fan ")?.parse().ok());
                record(&stats, sent);
                buf.drain(..end + 2 + size + 2);
            } else {
                if line == b"PING" {
                    let _ = ws.send(Message::Binary(b"PONG\r\n".to_vec())).await;
                }
                buf.drain(..end + 2);
            }
        }
    }
}

async fn nats_publisher(target: &Target, url: &str, args: &FanoutArgs, stats: &Stats, published: &AtomicBool) -> Result<()> {
    let mut ws = nats_connect(target, url, args.subscribers, false).await?;
    let mut pacer = Pacer::new(args);
    while let Some(seq) = pacer.next().await {
        // The same shape and size as a hub delta of this scenario.
        let payload = json!({"seq": seq, "table": "products", "op": "upsert", "key": {"id": Uuid::new_v4()}, "row": row(Uuid::new_v4(), seq), "origin": "fan-publisher", "change_id": Uuid::now_v7()}).to_string();
        ws.send(Message::Binary(format!("PUB fan {}\r\n{payload}\r\n", payload.len()).into_bytes())).await?;
        stats.changes_sent.fetch_add(1, Ordering::Relaxed);
        stats.applied.fetch_add(1, Ordering::Relaxed);
    }
    published.store(true, Ordering::Relaxed);
    let _ = ws.close(None).await;
    Ok(())
}
