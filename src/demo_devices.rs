//! Two simulated point-of-sale tills for `synchub dev --demo`: `pos-1` and `pos-2` connect to
//! the hub over a real WebSocket with the printed device tokens and speak protocol v1 as a real
//! offline-first client does, so that the console has something to show from the first minute.
//!
//! - **Live changes.** Each till rings up a sale every `sale_every` (±50 %): an order, one or two
//!   order lines and the new `stock` of each product sold, pushed as one batch.
//! - **Offline episodes.** Every `offline_every` one till (in turn) closes its socket for
//!   `offline_for`. While it is away both tills change the same `price_cents` of one product and
//!   the same `stock` of another; the offline till queues its changes with the row versions and
//!   clocks it had. Back online it resumes from its position, catches up and pushes its queue:
//!   the hub logs two conflicts (the price kept by the newer online change, the stock taken
//!   from the newer offline one).
//! - **One line per notable event** (went offline, came back with N conflicts, lost the hub).
//!
//! The tills never hold up the hub: `synchub dev` starts them after the hub is ready, a till
//! that loses the hub reconnects with exponential backoff, and both close their sockets when
//! the hub stops. A till's counter of changes (`device_seq`) is the one thing a real device
//! keeps on disk; these tills keep theirs in memory and read the hub's cursor for their device
//! when they start (and again if the hub ever answers `seq_gap`).

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use protocol::{Change, ChangeResult, ChangeStatus, ClientFrame, CloseCode, Delta, ErrorCode, Hlc, Object, Op, Position, ServerFrame};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

use super::DEMO_TENANT;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The first retry after a lost connection; each failed attempt doubles it up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// Connecting and upgrading give up after this, so a hub that stopped answering is retried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A push the hub answered with a temporary error (`busy`, `rate_limited`, …) is sent again
/// after this (or after the hub's `retry_after_ms`).
const PUSH_RETRY: Duration = Duration::from_secs(1);
/// After an offline till's queue is acked, the other keeps off the episode's products this much
/// longer, so that it has the committed rows (their deltas) before it sells them again.
const SETTLE: Duration = Duration::from_secs(1);
/// A planned offline episode waits this long when a till is not online to take part.
const EPISODE_POSTPONE: Duration = Duration::from_secs(3);

/// What the tills do and how often. [`Options::new`] holds the defaults of `synchub dev --demo`.
#[derive(Debug, Clone)]
pub struct Options {
    /// The hub's WebSocket endpoint, `ws://HOST:PORT/v1/ws`.
    pub url: String,
    /// The two tills: device id and its token (the token's device claim must name it).
    pub devices: [(String, String); 2],
    /// Mean time between two sales of one till (each wait is drawn from ±50 % of it).
    pub sale_every: Duration,
    /// When the first offline episode starts, after the tills started.
    pub first_offline_after: Duration,
    /// Time from the start of one offline episode to the start of the next.
    pub offline_every: Duration,
    /// How long a till stays offline in an episode.
    pub offline_for: Duration,
}

impl Options {
    /// A sale every 4 s per till; one till offline for 10 s every 40 s, the first after 15 s:
    /// two conflicts per episode, three a minute.
    pub fn new(url: String, pos1_token: String, pos2_token: String) -> Options {
        Options {
            url,
            devices: [("pos-1".into(), pos1_token), ("pos-2".into(), pos2_token)],
            sale_every: Duration::from_secs(4),
            first_offline_after: Duration::from_secs(15),
            offline_every: Duration::from_secs(40),
            offline_for: Duration::from_secs(10),
        }
    }
}

/// A product as a till knows it: the hub's values at `version`, with the till's own changes
/// laid over them until they are acked.
#[derive(Debug, Clone)]
struct Product {
    name: String,
    price_cents: i64,
    stock: i64,
    version: u64,
}

/// A batch sent (or to be sent again) and not yet acked.
struct Batch {
    request_id: u64,
    batch_id: Uuid,
    changes: Vec<Change>,
    /// False after the socket was lost or the hub asked for a retry: send it again, unchanged.
    sent: bool,
    retry_at: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Disconnected,
    /// `hello` sent; waiting for `welcome`, then catch-up pages (or a resync) until `up_to_date`.
    CatchingUp,
    Live,
}

/// A till coming back from an offline episode, for its one line once its queue is acked.
struct Comeback {
    offline_since: Instant,
    caught_up: usize,
    pushed: usize,
    conflicts: Vec<String>,
}

struct Till {
    id: String,
    /// The other till's device id, for the printed lines.
    peer: String,
    token: String,
    ws: Option<Ws>,
    phase: Phase,
    epoch: Option<String>,
    /// The last tenant seq applied (valid in `epoch`).
    seq: u64,
    /// During a resync: the smallest `snapshot_page.seq` so far.
    resync_seq: Option<u64>,
    products: BTreeMap<String, Product>,
    next_device_seq: u64,
    hlc: Hlc,
    next_request: u64,
    hello_id: u64,
    /// Changes made but not yet sent.
    queued: Vec<Change>,
    in_flight: Option<Batch>,
    /// In a simulated offline episode until then: no socket, changes queue up.
    offline_until: Option<Instant>,
    retry_at: Instant,
    backoff: Duration,
    /// The hub was lost and the line saying so printed; reset when the till is back.
    outage_reported: bool,
    ever_online: bool,
    comeback: Option<Comeback>,
    /// Another session took the device over (close 4010): this till stops.
    retired: bool,
    next_sale: Instant,
}

/// The offline episode under way: `offline` is the till that went away.
struct Episode {
    offline: usize,
    price_product: String,
    stock_product: String,
    step: u8,
    next_step: Instant,
}

/// Run the two tills until `stop` completes, then close their sockets. Never fails: every
/// problem becomes a line for `report` and a retry. `pool` reads each device's cursor
/// (`synchub.device_cursors`) at start, standing in for the counter a real device persists.
pub async fn run(options: Options, pool: PgPool, stop: impl Future<Output = ()>, mut report: impl FnMut(&str)) {
    let start = Instant::now();
    let mut rng = StdRng::from_entropy();
    let [(id1, token1), (id2, token2)] = options.devices.clone();
    let mut tills = [Till::new(id1.clone(), id2.clone(), token1, start), Till::new(id2, id1, token2, start)];
    for till in tills.iter_mut() {
        till.next_device_seq = cursor(&pool, &till.id).await.unwrap_or(0) + 1;
        till.next_sale = start + jitter(&mut rng, options.sale_every);
    }
    report(&format!(
        "{} and {} ring up a sale every ~{} s each; every {} s one of them goes offline for {} s while both edit the same rows (the first time in {} s)",
        tills[0].id,
        tills[1].id,
        secs(options.sale_every),
        secs(options.offline_every),
        secs(options.offline_for),
        secs(options.first_offline_after),
    ));
    let mut next_episode = start + options.first_offline_after;
    let mut episodes = 0usize;
    let mut episode: Option<Episode> = None;
    tokio::pin!(stop);

    loop {
        let now = Instant::now();
        for till in tills.iter_mut() {
            if till.offline_until.is_some_and(|until| now >= until) {
                till.offline_until = None;
                till.retry_at = now;
            }
            if till.ws.is_none() && till.offline_until.is_none() && !till.retired && now >= till.retry_at {
                till.connect(&options.url, &mut report).await;
            }
        }

        // Timers: sales, the episode's steps, pushes to retry.
        let now = Instant::now();
        for till in tills.iter_mut() {
            if now < till.next_sale || till.retired {
                continue;
            }
            till.next_sale = now + jitter(&mut rng, options.sale_every);
            // A till away in an episode makes only the episode's changes, and during an
            // episode the other leaves its two products alone: each episode logs exactly its
            // two conflicts (the hub logs none between equal values, which more sales of the
            // same product could make).
            if till.offline_until.is_none() && till.phase == Phase::Live {
                let lines = rng.gen_range(1..=2);
                let busy: Vec<&String> = episode.iter().flat_map(|ep| [&ep.price_product, &ep.stock_product]).collect();
                let picks = pick_products(&mut rng, &till.products, lines, &busy);
                let sold: Vec<(String, i64)> = picks.into_iter().map(|id| (id, rng.gen_range(1..=2))).collect();
                till.sell(&sold);
            }
        }
        if episode.is_none() && now >= next_episode {
            let offline = episodes % 2;
            if tills.iter().all(|t| t.phase == Phase::Live && t.products.len() >= 2) {
                let picks = pick_products(&mut rng, &tills[offline].products, 2, &[]);
                let (price_product, stock_product) = (picks[0].clone(), picks[1].clone());
                let away = &mut tills[offline];
                away.go_offline(now + options.offline_for).await;
                report(&format!(
                    "{} went offline for {} s; it keeps working and queues its changes",
                    away.id,
                    secs(options.offline_for)
                ));
                // Offline, it changes a price first: the online till's later change of the
                // same price will be newer and kept. The two tills' values always differ (the
                // hub logs no conflict between equal values).
                away.change_price(&price_product, -20);
                episode = Some(Episode { offline, price_product, stock_product, step: 1, next_step: now + options.offline_for / 3 });
                episodes += 1;
                next_episode = now + options.offline_every.max(options.offline_for * 2);
            } else {
                next_episode = now + EPISODE_POSTPONE;
            }
        }
        if let Some(ep) = episode.as_mut().filter(|ep| now >= ep.next_step) {
            let online = 1 - ep.offline;
            match ep.step {
                1 => {
                    // The online till sells the stock product and changes the same price.
                    tills[online].sell(&[(ep.stock_product.clone(), 1)]);
                    tills[online].change_price(&ep.price_product, 30);
                    ep.step = 2;
                    ep.next_step = now + options.offline_for / 3;
                }
                2 => {
                    // Later still, the offline till sells the same product: its stock is newer.
                    tills[ep.offline].sell(&[(ep.stock_product.clone(), 2)]);
                    ep.step = 3;
                    ep.next_step = now + Duration::from_millis(100);
                }
                3 => {
                    // Back once the offline till is online and its queue acked (or it stopped).
                    let away = &tills[ep.offline];
                    if away.retired || (away.offline_until.is_none() && away.comeback.is_none()) {
                        ep.step = 4;
                        ep.next_step = now + SETTLE;
                    } else {
                        ep.next_step = now + Duration::from_millis(100);
                    }
                }
                _ => episode = None,
            }
        }
        for till in tills.iter_mut() {
            till.flush(&mut report).await;
        }

        let wake = tills
            .iter()
            .flat_map(|t| {
                let reconnect = (t.ws.is_none() && t.offline_until.is_none() && !t.retired).then_some(t.retry_at);
                let push_retry = t.in_flight.as_ref().and_then(|b| b.retry_at).filter(|_| t.phase == Phase::Live);
                [Some(t.next_sale), t.offline_until, reconnect, push_retry]
            })
            .flatten()
            .chain([next_episode])
            .chain(episode.as_ref().map(|ep| ep.next_step))
            .min()
            .unwrap_or(now + Duration::from_secs(1))
            .max(Instant::now());
        let [a, b] = &mut tills;
        tokio::select! {
            biased;
            _ = &mut stop => break,
            message = next_message(&mut a.ws) => a.on_message(message, &pool, &mut report).await,
            message = next_message(&mut b.ws) => b.on_message(message, &pool, &mut report).await,
            _ = tokio::time::sleep_until(wake) => {}
        }
    }

    for till in tills.iter_mut() {
        if let Some(mut ws) = till.ws.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
        }
    }
}

/// The next message of a socket; never completes without one.
async fn next_message(ws: &mut Option<Ws>) -> Option<Result<Message, tokio_tungstenite::tungstenite::Error>> {
    match ws {
        Some(ws) => ws.next().await,
        None => std::future::pending().await,
    }
}

/// The hub's cursor for a demo device: the last `device_seq` it accepted (0 for none).
async fn cursor(pool: &PgPool, device: &str) -> Result<u64, sqlx::Error> {
    let last: Option<i64> = sqlx::query_scalar("select last_device_seq from synchub.device_cursors where tenant_id = $1 and device_id = $2")
        .bind(DEMO_TENANT)
        .bind(device)
        .fetch_optional(pool)
        .await?;
    Ok(last.unwrap_or(0).max(0) as u64)
}

fn jitter(rng: &mut StdRng, mean: Duration) -> Duration {
    mean.mul_f64(rng.gen_range(0.5..1.5))
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 1.0 && s.fract() == 0.0 {
        format!("{s:.0}")
    } else {
        format!("{s:.1}")
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// `n` distinct product ids, at random, none of `except`.
fn pick_products(rng: &mut StdRng, products: &BTreeMap<String, Product>, n: usize, except: &[&String]) -> Vec<String> {
    let mut ids: Vec<String> = products.keys().filter(|id| !except.contains(id)).cloned().collect();
    let mut picked = Vec::new();
    while picked.len() < n && !ids.is_empty() {
        picked.push(ids.swap_remove(rng.gen_range(0..ids.len())));
    }
    picked
}

impl Till {
    fn new(id: String, peer: String, token: String, now: Instant) -> Till {
        Till {
            id,
            peer,
            token,
            ws: None,
            phase: Phase::Disconnected,
            epoch: None,
            seq: 0,
            resync_seq: None,
            products: BTreeMap::new(),
            next_device_seq: 1,
            hlc: Hlc { wall_ms: 0, counter: 0 },
            next_request: 1,
            hello_id: 0,
            queued: Vec::new(),
            in_flight: None,
            offline_until: None,
            retry_at: now,
            backoff: BACKOFF_MIN,
            outage_reported: false,
            ever_online: false,
            comeback: None,
            retired: false,
            next_sale: now,
        }
    }

    fn request_id(&mut self) -> u64 {
        self.next_request += 1;
        self.next_request
    }

    /// A hybrid logical clock tick (protocol §4).
    fn tick(&mut self) -> Hlc {
        let wall = now_ms();
        self.hlc = if wall > self.hlc.wall_ms { Hlc { wall_ms: wall, counter: 0 } } else { Hlc { wall_ms: self.hlc.wall_ms, counter: self.hlc.counter + 1 } };
        self.hlc
    }

    fn change(&mut self, table: &str, key: Value, fields: Value, base_version: u64) -> Change {
        let change = Change {
            change_id: Uuid::now_v7(),
            device_seq: self.next_device_seq,
            table: table.into(),
            op: Op::Upsert,
            key: object(key),
            fields: object(fields),
            hlc: self.tick(),
            base_version,
        };
        self.next_device_seq += 1;
        change
    }

    /// Ring up one sale of `quantity` of each product: the order, its lines and the new stock
    /// of each product (a delivery of 50 when it would run out), queued for the hub.
    fn sell(&mut self, sold: &[(String, i64)]) {
        let order_id = Uuid::now_v7();
        let mut lines = Vec::new();
        let mut total = 0;
        for (n, (product_id, quantity)) in sold.iter().enumerate() {
            let (product_id, quantity) = (product_id, *quantity);
            let Some(product) = self.products.get_mut(product_id) else { continue };
            if product.stock < quantity {
                product.stock += 50;
            }
            product.stock -= quantity;
            total += quantity * product.price_cents;
            lines.push((n as i64 + 1, product_id.clone(), quantity, product.price_cents, product.stock, product.version));
        }
        if lines.is_empty() {
            return;
        }
        let order = self.change("orders", json!({"id": order_id}), json!({"store_id": "store-1", "status": "paid", "total_cents": total}), 0);
        self.queued.push(order);
        for (line_no, product_id, quantity, price, stock, version) in lines {
            let line = self.change(
                "order_lines",
                json!({"order_id": order_id, "line_no": line_no}),
                json!({"product_id": product_id, "quantity": quantity, "unit_price_cents": price}),
                0,
            );
            let stock = self.change("products", json!({"id": product_id}), json!({"stock": stock}), version);
            self.queued.extend([line, stock]);
        }
    }

    /// Change a product's price by `step` cents, the other way when that would leave 1.00 to
    /// 9.00.
    fn change_price(&mut self, product_id: &str, step: i64) {
        let Some(product) = self.products.get_mut(product_id) else { return };
        let price = if (100..=900).contains(&(product.price_cents + step)) { product.price_cents + step } else { product.price_cents - step.signum() * 40 };
        product.price_cents = price;
        let version = product.version;
        let change = self.change("products", json!({"id": product_id}), json!({"price_cents": price}), version);
        self.queued.push(change);
    }

    async fn connect(&mut self, url: &str, report: &mut impl FnMut(&str)) {
        let attempt = tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(url)).await;
        let mut ws = match attempt {
            Ok(Ok((ws, _))) => ws,
            Ok(Err(err)) => return self.lost(&format!("cannot connect: {err}"), report),
            Err(_) => return self.lost("no answer to the connection", report),
        };
        self.hello_id = self.request_id();
        let position = self.epoch.clone().map(|epoch| Position { epoch, seq: self.seq });
        let hello = ClientFrame::Hello {
            id: self.hello_id,
            versions: vec![1],
            token: self.token.clone(),
            device_id: Some(self.id.clone()),
            position,
            mode: Default::default(),
        };
        if let Err(err) = ws.send(text(&hello)).await {
            return self.lost(&format!("cannot send hello: {err}"), report);
        }
        self.ws = Some(ws);
        self.phase = Phase::CatchingUp;
        if let Some(comeback) = self.comeback.as_mut() {
            comeback.caught_up = 0;
        }
    }

    /// The socket is gone (or never came): try again after the backoff.
    fn lost(&mut self, why: &str, report: &mut impl FnMut(&str)) {
        self.drop_socket();
        if self.offline_until.is_some() {
            return;
        }
        if !self.outage_reported {
            report(&format!("{} lost the hub ({why}); reconnecting with backoff", self.id));
            self.outage_reported = true;
        }
        self.retry_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    fn drop_socket(&mut self) {
        self.ws = None;
        self.phase = Phase::Disconnected;
        self.resync_seq = None;
        if let Some(batch) = self.in_flight.as_mut() {
            batch.sent = false;
            batch.retry_at = None;
        }
    }

    /// Leave for an offline episode: close the socket as a till losing its network would
    /// (politely here), keeping its position, rows and queue.
    async fn go_offline(&mut self, until: Instant) {
        if let Some(mut ws) = self.ws.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
        }
        self.drop_socket();
        self.offline_until = Some(until);
        self.comeback = Some(Comeback { offline_since: Instant::now(), caught_up: 0, pushed: 0, conflicts: Vec::new() });
    }

    /// Send the batch awaiting its ack again, or the queued changes as a new batch, when live
    /// and nothing else is in flight (one push in flight, protocol §3).
    async fn flush(&mut self, report: &mut impl FnMut(&str)) {
        if self.phase != Phase::Live || self.ws.is_none() {
            return;
        }
        if self.in_flight.is_none() && !self.queued.is_empty() {
            let changes = std::mem::take(&mut self.queued);
            let request_id = self.request_id();
            self.in_flight = Some(Batch { request_id, batch_id: Uuid::now_v7(), changes, sent: false, retry_at: None });
        }
        let Some(batch) = self.in_flight.as_mut() else { return };
        if batch.sent || batch.retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        let frame = ClientFrame::Push { id: batch.request_id, batch_id: batch.batch_id, changes: batch.changes.clone() };
        batch.sent = true;
        batch.retry_at = None;
        if let Some(comeback) = self.comeback.as_mut() {
            comeback.pushed += batch.changes.len();
        }
        let sent = match self.ws.as_mut() {
            Some(ws) => ws.send(text(&frame)).await,
            None => return,
        };
        if let Err(err) = sent {
            self.lost(&format!("cannot push: {err}"), report);
        }
    }

    /// One message from the hub. Long because it is the till's whole reading of the protocol:
    /// one arm per server frame it acts on, each a few lines.
    async fn on_message(&mut self, message: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>, pool: &PgPool, report: &mut impl FnMut(&str)) {
        let bytes = match message {
            Some(Ok(Message::Text(text))) => text.into_bytes(),
            Some(Ok(Message::Binary(bytes))) => bytes,
            Some(Ok(Message::Close(frame))) => {
                let (code, reason) = frame.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or((1005, String::new()));
                return self.closed(code, &reason, report);
            }
            Some(Ok(_)) => return,
            Some(Err(err)) => return self.lost(&err.to_string(), report),
            None => return self.lost("connection closed", report),
        };
        let frame = match protocol::codec::decode_server(protocol::Encoding::Json, &bytes) {
            Ok(frame) => frame,
            // A frame type this till does not know (protocol §1: ignore it).
            Err(_) => return,
        };
        match frame {
            ServerFrame::Welcome { epoch, .. } => {
                if self.epoch.as_ref().is_some_and(|known| *known != epoch) {
                    self.products.clear();
                    self.seq = 0;
                }
                self.epoch = Some(epoch);
                self.backoff = BACKOFF_MIN;
                if self.outage_reported {
                    report(&format!("{} is connected again", self.id));
                    self.outage_reported = false;
                }
            }
            ServerFrame::CatchUp { deltas, seq, .. } => {
                self.apply_deltas(&deltas);
                if let Some(comeback) = self.comeback.as_mut() {
                    comeback.caught_up += deltas.len();
                }
                self.seq = seq;
            }
            ServerFrame::UpToDate { seq } => {
                self.seq = seq;
                self.phase = Phase::Live;
                if !self.ever_online {
                    self.ever_online = true;
                    report(&format!("{} is online (caught up to seq {seq}, {} products)", self.id, self.products.len()));
                }
                if self.comeback.as_ref().is_some_and(|c| c.pushed == 0) && self.queued.is_empty() && self.in_flight.is_none() {
                    self.finish_comeback(report);
                }
            }
            ServerFrame::Delta { deltas, seq } => {
                self.apply_deltas(&deltas);
                self.seq = seq;
            }
            ServerFrame::MustResync { epoch, .. } => {
                // Drop what it knew and read the products again (the only rows it edits).
                self.products.clear();
                self.epoch = Some(epoch);
                self.resync_seq = None;
                let id = self.request_id();
                self.send(&ClientFrame::Snapshot { id, table: "products".into(), after: None, limit: None }, report).await;
            }
            ServerFrame::SnapshotPage { rows, seq, epoch, next_after, .. } => {
                for row in rows {
                    self.apply_row(&row.row, row.version);
                }
                self.resync_seq = Some(self.resync_seq.map_or(seq, |s| s.min(seq)));
                let id = self.request_id();
                let next = match next_after {
                    Some(after) => ClientFrame::Snapshot { id, table: "products".into(), after: Some(after), limit: None },
                    None => ClientFrame::Resume { id, position: Position { epoch, seq: self.resync_seq.take().unwrap_or(seq) } },
                };
                self.send(&next, report).await;
            }
            ServerFrame::Ack { id, results, .. } if self.in_flight.as_ref().is_some_and(|b| b.request_id == id) => {
                self.on_ack(results, pool, report).await;
            }
            ServerFrame::Error { id: Some(id), code, message, temporary, retry_after_ms } if self.in_flight.as_ref().is_some_and(|b| b.request_id == id) => {
                let batch = self.in_flight.as_mut().expect("checked");
                if temporary {
                    batch.sent = false;
                    batch.retry_at = Some(Instant::now() + retry_after_ms.map_or(PUSH_RETRY, Duration::from_millis));
                } else {
                    report(&format!("{}'s push was refused ({}: {message}); its changes are dropped", self.id, code.as_str()));
                    self.in_flight = None;
                }
            }
            ServerFrame::Error { code, message, .. } => {
                report(&format!("{}: the hub answered {} ({message})", self.id, code.as_str()));
            }
            _ => {}
        }
    }

    fn closed(&mut self, code: u16, reason: &str, report: &mut impl FnMut(&str)) {
        if code == CloseCode::Replaced.code() {
            self.drop_socket();
            self.retired = true;
            report(&format!(
                "{} stops: another client connected with its token (close {code}); run `synchub dev` without --demo to drive {} yourself",
                self.id, self.id
            ));
            return;
        }
        let why = if reason.is_empty() { format!("close {code}") } else { format!("close {code}: {reason}") };
        self.lost(&why, report);
    }

    async fn send(&mut self, frame: &ClientFrame, report: &mut impl FnMut(&str)) {
        let sent = match self.ws.as_mut() {
            Some(ws) => ws.send(text(frame)).await,
            None => return,
        };
        if let Err(err) = sent {
            self.lost(&err.to_string(), report);
        }
    }

    async fn on_ack(&mut self, results: Vec<ChangeResult>, pool: &PgPool, report: &mut impl FnMut(&str)) {
        let batch = self.in_flight.take().expect("an ack for the batch in flight");
        let mut retry_from = None;
        for (change, result) in batch.changes.iter().zip(&results) {
            match result.status {
                ChangeStatus::Applied | ChangeStatus::Merged | ChangeStatus::Conflict | ChangeStatus::Duplicate => {
                    if change.table == "products" {
                        if let Some(id) = change.key.get("id").and_then(Value::as_str) {
                            let id = id.to_owned();
                            let known = self.products.get(&id).map_or(0, |p| p.version);
                            match &result.row {
                                // A change that wrote nothing (every field lost) leaves the version.
                                Some(row) => self.apply_row(row, result.seq.unwrap_or(known)),
                                None => {
                                    if let (Some(product), Some(seq)) = (self.products.get_mut(&id), result.seq) {
                                        product.version = product.version.max(seq);
                                    }
                                }
                            }
                        }
                    }
                    if result.status == ChangeStatus::Conflict {
                        let field = change.fields.keys().next().cloned().unwrap_or_default();
                        let kept = if result.lost_fields.is_empty() { format!("{}'s newer value kept", self.id) } else { format!("{}'s newer value kept", self.peer) };
                        let name = change.key.get("id").and_then(Value::as_str).and_then(|id| self.products.get(id)).map(|p| p.name.clone()).unwrap_or_default();
                        let line = format!("{}.{field} of {name}, {kept}", change.table);
                        if let Some(comeback) = self.comeback.as_mut() {
                            comeback.conflicts.push(line);
                        } else {
                            report(&format!("{} met a conflict on {line}; review it in the console", self.id));
                        }
                    }
                }
                ChangeStatus::Rejected if result.reason == Some(ErrorCode::SeqGap) => {
                    retry_from = Some(change.device_seq);
                    break;
                }
                ChangeStatus::Rejected => {
                    let reason = result.reason.map(|r| r.as_str().to_string()).unwrap_or_default();
                    report(&format!("{}: a change to {} was rejected ({reason})", self.id, change.table));
                }
            }
        }
        if let Some(from) = retry_from {
            // The hub's cursor is not where this till thought: renumber the rest from it.
            let expected = cursor(pool, &self.id).await.unwrap_or(from.saturating_sub(1)) + 1;
            let mut rest: Vec<Change> = batch.changes.into_iter().filter(|c| c.device_seq >= from).collect();
            rest.append(&mut self.queued);
            for (n, change) in rest.iter_mut().enumerate() {
                change.device_seq = expected + n as u64;
            }
            self.next_device_seq = expected + rest.len() as u64;
            self.queued = rest;
        }
        if self.comeback.is_some() && self.queued.is_empty() && self.in_flight.is_none() && self.phase == Phase::Live {
            self.finish_comeback(report);
        }
    }

    fn finish_comeback(&mut self, report: &mut impl FnMut(&str)) {
        let Some(comeback) = self.comeback.take() else { return };
        let away = secs(Duration::from_millis(comeback.offline_since.elapsed().as_millis() as u64 / 100 * 100));
        let conflicts = match comeback.conflicts.len() {
            0 => "no conflict".to_string(),
            1 => format!("1 conflict logged ({})", comeback.conflicts[0]),
            n => format!("{n} conflicts logged ({})", comeback.conflicts.join("; ")),
        };
        report(&format!(
            "{} came back after {away} s: caught up on {} changes, pushed {} queued changes, {conflicts}",
            self.id, comeback.caught_up, comeback.pushed
        ));
    }

    fn apply_deltas(&mut self, deltas: &[Delta]) {
        for delta in deltas.iter().filter(|d| d.table == "products") {
            match (&delta.op, &delta.row) {
                (Op::Upsert, Some(row)) => self.apply_row(row, delta.seq),
                _ => {
                    if let Some(id) = delta.key.get("id").and_then(Value::as_str) {
                        self.products.remove(id);
                    }
                }
            }
        }
    }

    fn apply_row(&mut self, row: &Object, version: u64) {
        let Some(id) = row.get("id").and_then(Value::as_str) else { return };
        let product = Product {
            name: row.get("name").and_then(Value::as_str).unwrap_or_default().to_owned(),
            price_cents: row.get("price_cents").and_then(Value::as_i64).unwrap_or(0),
            stock: row.get("stock").and_then(Value::as_i64).unwrap_or(0),
            version,
        };
        if row.get("active").and_then(Value::as_bool) == Some(false) {
            self.products.remove(id);
        } else {
            self.products.insert(id.to_owned(), product);
        }
    }
}

fn object(value: Value) -> Object {
    match value {
        Value::Object(map) => map,
        _ => Object::new(),
    }
}

fn text(frame: &ClientFrame) -> Message {
    let bytes = protocol::codec::encode_client(protocol::Encoding::Json, frame);
    Message::Text(String::from_utf8(bytes).expect("JSON is UTF-8"))
}
