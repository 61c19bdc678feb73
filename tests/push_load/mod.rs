//! Shared by the crash and restart tests (tests/crash_restart.rs, tests/pg_trouble.rs): the hub
//! binary running `serve` in its own process, devices pushing a stream of batches that survive
//! lost sockets (re-sending what is in doubt), and the check of the log and cursors in Postgres
//! against every ack the devices were given.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use protocol::{Change, ChangeResult, ChangeStatus, ClientFrame, Encoding, ErrorCode, Hlc, Op, Position, ServerFrame};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

// The hub process lives in tests/common/hub_process.rs; its old names stay here for the tests
// that use this module (not every one uses every name).
#[allow(unused_imports)]
pub use crate::common::hub_process::{tail, HubProcess, START_LIMIT};
use crate::common::{now_ms, obj, token, SECRET};

pub const TENANT: &str = "crash-tenant";
pub const DEVICES: usize = 4;
/// Rows every device writes, so that concurrent writes merge or conflict.
const SHARED_ROWS: usize = 4;
/// Rows each device writes alone.
const OWN_ROWS: usize = 16;
/// Most changes in one pushed batch.
const MAX_BATCH: usize = 20;
/// Most batches of one session of `Device::sessions_until`.
const SESSION_BATCHES: usize = 8;
/// Batches each device pushes in the last phase, which no trouble interrupts.
pub const FINAL_BATCHES: usize = 5;
/// A hub that says nothing for this long is stuck, not slow (a liveness bound, not a timing
/// assertion: pushes are acked in milliseconds).
const SILENCE: Duration = Duration::from_secs(60);

/// A TOML configuration for `synchub serve` on `database_url`, with the demo tables.
/// `settings`: more top-level `key = value` lines.
pub fn write_config(dir: &Path, database_url: &str, settings: &str) -> PathBuf {
    let mut text = format!(
        "listen = \"127.0.0.1:0\"\ndatabase_url = {}\njwt_hs256_secret = {}\nworkers = 2\ndb_pool_size = 8\n{settings}",
        toml_string(database_url),
        toml_string(SECRET)
    );
    for table in synchub::demo::tables() {
        text += &format!(
            "\n[[tables]]\nname = {}\ntenant_column = {}\npolicy = {}\n",
            toml_string(&table.name),
            toml_string(&table.tenant_column),
            toml_string(table.policy.as_str())
        );
    }
    let path = dir.join("synchub.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap() // a JSON string is a valid TOML basic string here
}

/// A batch as first sent; a re-send keeps its batch id and changes.
#[derive(Clone)]
pub struct Batch {
    pub batch_id: Uuid,
    pub changes: Vec<Change>,
}

/// A change the hub acked, and how.
pub struct Acked {
    pub change_id: Uuid,
    pub device_seq: u64,
    pub status: ChangeStatus,
    pub seq: Option<u64>,
    /// Sent without an ack (the socket lost, the hub killed, or the push refused as
    /// temporary), and found committed (`duplicate`) when re-sent.
    pub committed_before_crash: bool,
}

/// One device: what it persists across sessions (its counter, position, unacked batch) and
/// what the test checks at the end (every ack, every delta delivered).
pub struct Device {
    pub id: String,
    pub token: String,
    pub rng: StdRng,
    pub shared_rows: Vec<Uuid>,
    pub own_rows: Vec<Uuid>,
    pub next_device_seq: u64,
    pub position: Option<Position>,
    /// The batch sent whose ack has not come; re-sent unchanged first thing after a reconnect.
    pub in_doubt: Option<Batch>,
    /// The last batch acked and its results; re-sent after a reconnect, as a device that lost
    /// its acks would, to be answered `duplicate` at the same seqs.
    pub last_acked: Option<(Batch, Vec<ChangeResult>)>,
    pub acked: Vec<Acked>,
    /// Seq → change id of every delta delivered (catch-up and live).
    pub delivered: BTreeMap<u64, Option<Uuid>>,
    /// Problems seen on the wire, reported with the database's.
    pub problems: Vec<String>,
    pub duplicates_on_resend: usize,
    pub sessions: usize,
    /// Error codes that answered this device's hellos and pushes, by name.
    pub refusals: BTreeMap<String, usize>,
    /// Close codes of the sockets the hub closed.
    pub closes: BTreeMap<u16, usize>,
    /// Batches acked so far, readable while a session task owns the device.
    pub acked_batches: Arc<AtomicUsize>,
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Why a session ended.
pub enum Ended {
    /// The socket failed or closed (the hub was killed, or closed it), or the hello was refused.
    Lost,
    /// The session's batches are all acked, or it was told to stop.
    Done,
}

impl Device {
    /// `DEVICES` devices sharing `SHARED_ROWS` rows, their choices seeded from `seed`.
    pub fn fleet(seed: u64) -> Vec<Device> {
        let shared: Vec<Uuid> = (0..SHARED_ROWS).map(|_| Uuid::now_v7()).collect();
        (0..DEVICES).map(|i| Device::new(format!("crash-device-{i}"), shared.clone(), StdRng::seed_from_u64(seed ^ (i as u64 + 1) * 0x9e37_79b9))).collect()
    }

    pub fn new(id: String, shared_rows: Vec<Uuid>, mut rng: StdRng) -> Device {
        let own_rows = (0..OWN_ROWS).map(|_| Uuid::from_u128(rng.gen())).collect();
        Device {
            token: token(TENANT, &format!("user-{id}"), "Employee", Some(&id)),
            id,
            rng,
            shared_rows,
            own_rows,
            next_device_seq: 1,
            position: None,
            in_doubt: None,
            last_acked: None,
            acked: Vec::new(),
            delivered: BTreeMap::new(),
            problems: Vec::new(),
            duplicates_on_resend: 0,
            sessions: 0,
            refusals: BTreeMap::new(),
            closes: BTreeMap::new(),
            acked_batches: Arc::default(),
        }
    }

    /// Connect, resume, re-send, and push new batches until the socket is lost or, with
    /// `batches`, that many new batches are acked.
    pub async fn session(mut self, addr: SocketAddr, batches: Option<usize>) -> Device {
        let _ = self.run_session(addr, batches, None).await;
        self
    }

    /// Sessions one after another until `stop` is set: each ends after a few batches (so that
    /// hellos and catch-ups meet the trouble too) or when the hub closes the socket or refuses
    /// the hello, and the device reconnects.
    pub async fn sessions_until(mut self, addr: SocketAddr, stop: Arc<AtomicBool>) -> Device {
        while !stop.load(Ordering::Relaxed) {
            let batches = self.rng.gen_range(1..=SESSION_BATCHES);
            if let Ended::Lost = self.run_session(addr, Some(batches), Some(&stop)).await {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        self
    }

    /// Sessions one after another until `batches` new batches are acked; panics past `limit`.
    pub async fn sessions_until_done(mut self, addr: SocketAddr, batches: usize, limit: Duration) -> Device {
        let deadline = Instant::now() + limit;
        loop {
            if let Ended::Done = self.run_session(addr, Some(batches), None).await {
                return self;
            }
            assert!(Instant::now() < deadline, "{}: no session pushed {batches} batches within {limit:?}; problems so far: {:?}", self.id, self.problems);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn run_session(&mut self, addr: SocketAddr, batches: Option<usize>, stop: Option<&AtomicBool>) -> Ended {
        let Ok((mut ws, _)) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws")).await else { return Ended::Lost };
        let mut next_id = 0u64;
        if !self.hello(&mut ws, &mut next_id).await {
            return Ended::Lost;
        }
        self.sessions += 1;
        if let Some((batch, results)) = self.last_acked.clone() {
            let Some((again, _)) = self.push(&mut ws, &mut next_id, &batch).await else { return Ended::Lost };
            for (before, now) in results.iter().zip(&again) {
                if now.status != ChangeStatus::Duplicate || now.seq != before.seq {
                    self.problems.push(format!(
                        "{}: re-sent acked change {} (device_seq {}, acked {:?} at seq {:?}) came back {:?} at seq {:?}",
                        self.id, before.change_id, before.device_seq, before.status, before.seq, now.status, now.seq
                    ));
                }
            }
            self.duplicates_on_resend += again.len();
        }
        if let Some(batch) = self.in_doubt.clone() {
            let Some((results, _)) = self.push(&mut ws, &mut next_id, &batch).await else { return Ended::Lost };
            self.record(&batch, results, true);
        }
        let mut pushed = 0;
        while batches.map_or(true, |n| pushed < n) && !stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            let batch = self.new_batch();
            self.in_doubt = Some(batch.clone());
            let Some((results, refused)) = self.push(&mut ws, &mut next_id, &batch).await else { return Ended::Lost };
            // Refused as temporary and sent again: the first attempt may have committed.
            self.record(&batch, results, refused);
            pushed += 1;
        }
        let _ = ws.close(None).await;
        Ended::Done
    }

    /// `hello` from the device's position; false when the socket was lost.
    async fn hello(&mut self, ws: &mut Ws, next_id: &mut u64) -> bool {
        *next_id += 1;
        let id = *next_id;
        let hello = ClientFrame::Hello {
            mode: Default::default(),
            id,
            versions: vec![1],
            token: self.token.clone(),
            device_id: Some(self.id.clone()),
            position: self.position.clone(),
        };
        if !send(ws, &hello).await {
            return false;
        }
        loop {
            match self.recv(ws).await {
                None => return false,
                Some(ServerFrame::Welcome { epoch, .. }) => {
                    if let Some(p) = &self.position {
                        if p.epoch != epoch {
                            self.problems.push(format!("{}: the epoch changed across a restart: {} → {epoch}", self.id, p.epoch));
                        }
                    }
                    self.position.get_or_insert(Position { epoch, seq: 0 });
                    return true;
                }
                // Refused (the database out of reach): the hub closes the socket next.
                Some(ServerFrame::Error { id: Some(got), code, temporary: true, .. }) if got == id => {
                    *self.refusals.entry(format!("hello {code:?}")).or_default() += 1;
                }
                Some(other) => self.problems.push(format!("{}: expected welcome, got {other:?}", self.id)),
            }
        }
    }

    /// Push `batch` (again after a temporary refusal) and return its results and whether it
    /// was refused first; None when the socket was lost.
    async fn push(&mut self, ws: &mut Ws, next_id: &mut u64, batch: &Batch) -> Option<(Vec<ChangeResult>, bool)> {
        let mut refused = false;
        loop {
            *next_id += 1;
            let id = *next_id;
            if !send(ws, &ClientFrame::Push { id, batch_id: batch.batch_id, changes: batch.changes.clone() }).await {
                return None;
            }
            loop {
                match self.recv(ws).await? {
                    ServerFrame::Ack { id: got, batch_id, results } if got == id => {
                        assert_eq!(batch_id, batch.batch_id, "{}: the ack names another batch", self.id);
                        self.acked_batches.fetch_add(1, Ordering::Relaxed);
                        return Some((results, refused));
                    }
                    ServerFrame::Error { id: Some(got), code, message, .. } if got == id => {
                        // Temporary refusals (the hub starting, or busy, or its database out of
                        // reach): the same batch again.
                        if !matches!(code, ErrorCode::Busy | ErrorCode::Unavailable | ErrorCode::ShuttingDown | ErrorCode::Internal) {
                            panic!("{}: push refused for good: {code:?} {message}", self.id);
                        }
                        *self.refusals.entry(format!("push {code:?}")).or_default() += 1;
                        refused = true;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        break;
                    }
                    _ => {}
                }
            }
        }
    }

    /// Next frame, with the stream's bookkeeping done (position, deltas delivered); None when
    /// the socket was lost.
    async fn recv(&mut self, ws: &mut Ws) -> Option<ServerFrame> {
        loop {
            let msg = match tokio::time::timeout(SILENCE, ws.next()).await {
                Err(_) => panic!("{}: the hub sent nothing for {SILENCE:?}", self.id),
                Ok(None) | Ok(Some(Err(_))) => return None,
                Ok(Some(Ok(msg))) => msg,
            };
            let frame = match msg {
                Message::Text(t) => protocol::codec::decode_server(Encoding::Json, t.as_bytes()).expect("the hub sends valid frames"),
                Message::Close(frame) => {
                    *self.closes.entry(frame.map_or(1005, |f| u16::from(f.code))).or_default() += 1;
                    return None;
                }
                _ => continue,
            };
            match &frame {
                ServerFrame::CatchUp { deltas, seq, .. } | ServerFrame::Delta { deltas, seq } => {
                    self.delivered_deltas(deltas, *seq);
                }
                ServerFrame::UpToDate { seq } => self.advance(*seq),
                ServerFrame::MustResync { reason, .. } => {
                    self.problems.push(format!("{}: must_resync {reason:?} from position {:?}", self.id, self.position));
                }
                // The session's own failure (a catch-up read), before the hub closes it.
                ServerFrame::Error { id: None, code, .. } => *self.refusals.entry(format!("session {code:?}")).or_default() += 1,
                _ => {}
            }
            return Some(frame);
        }
    }

    fn delivered_deltas(&mut self, deltas: &[protocol::Delta], seq: u64) {
        let from = self.position.as_ref().map_or(0, |p| p.seq);
        for delta in deltas {
            if delta.seq <= from || delta.seq > seq {
                self.problems.push(format!("{}: delta at seq {} outside the frame's range {from}..={seq}", self.id, delta.seq));
            }
            if self.delivered.insert(delta.seq, delta.change_id).is_some() {
                self.problems.push(format!("{}: seq {} delivered twice", self.id, delta.seq));
            }
        }
        self.advance(seq);
    }

    fn advance(&mut self, seq: u64) {
        if let Some(p) = &mut self.position {
            if seq < p.seq {
                self.problems.push(format!("{}: the stream went back from seq {} to {seq}", self.id, p.seq));
            }
            p.seq = p.seq.max(seq);
        }
    }

    /// Take the results of `batch`; `resent`: it was in doubt when the hub died.
    fn record(&mut self, batch: &Batch, results: Vec<ChangeResult>, resent: bool) {
        if results.len() != batch.changes.len() {
            self.problems.push(format!("{}: {} results for {} changes", self.id, results.len(), batch.changes.len()));
        }
        // A batch commits in one transaction: a crash leaves all of it or none.
        let duplicates = results.iter().filter(|r| r.status == ChangeStatus::Duplicate).count();
        if duplicates != 0 && duplicates != results.len() {
            self.problems.push(format!("{}: batch {} re-sent after a crash came back part duplicate: {results:?}", self.id, batch.batch_id));
        }
        for (change, result) in batch.changes.iter().zip(&results) {
            if result.change_id != change.change_id || result.device_seq != change.device_seq {
                self.problems.push(format!("{}: result {result:?} does not answer change {}", self.id, change.change_id));
                continue;
            }
            match result.status {
                ChangeStatus::Applied | ChangeStatus::Merged | ChangeStatus::Conflict => {}
                ChangeStatus::Duplicate if resent => {}
                _ => {
                    self.problems.push(format!("{}: change {} (device_seq {}, resent: {resent}) got {result:?}", self.id, change.change_id, change.device_seq));
                    continue;
                }
            }
            self.acked.push(Acked {
                change_id: change.change_id,
                device_seq: change.device_seq,
                status: result.status,
                seq: result.seq,
                committed_before_crash: result.status == ChangeStatus::Duplicate,
            });
        }
        self.in_doubt = None;
        self.last_acked = Some((batch.clone(), results));
    }

    /// A new batch of upserts: whole product rows, some shared with the other devices.
    fn new_batch(&mut self) -> Batch {
        let n = self.rng.gen_range(1..=MAX_BATCH);
        let changes = (0..n)
            .map(|_| {
                let id = if self.rng.gen_bool(0.25) {
                    self.shared_rows[self.rng.gen_range(0..self.shared_rows.len())]
                } else {
                    self.own_rows[self.rng.gen_range(0..self.own_rows.len())]
                };
                let device_seq = self.next_device_seq;
                self.next_device_seq += 1;
                // Clocks a little in the past, so that some writes to shared rows lose.
                let wall_ms = now_ms() - self.rng.gen_range(0..200);
                Change {
                    change_id: Uuid::now_v7(),
                    device_seq,
                    table: "products".into(),
                    op: Op::Upsert,
                    key: obj(json!({"id": id})),
                    fields: obj(json!({
                        "sku": format!("SKU-{}", &id.simple().to_string()[..8]),
                        "name": format!("{} #{device_seq}", self.id),
                        "price_cents": self.rng.gen_range(0..10_000),
                    })),
                    hlc: Hlc { wall_ms, counter: 0 },
                    base_version: 0,
                }
            })
            .collect();
        Batch { batch_id: Uuid::now_v7(), changes }
    }

    /// Reconnect once more from the position and read the log up to the head.
    pub async fn catch_up_to_head(&mut self, addr: SocketAddr) {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws")).await.expect("the last hub accepts");
        let mut next_id = 0;
        assert!(self.hello(&mut ws, &mut next_id).await, "{}: the last hub closed the socket", self.id);
        loop {
            match self.recv(&mut ws).await {
                Some(ServerFrame::UpToDate { .. }) => break,
                Some(_) => {}
                None => panic!("{}: the last hub closed the socket during catch-up", self.id),
            }
        }
        let _ = ws.close(None).await;
    }
}

async fn send(ws: &mut Ws, frame: &ClientFrame) -> bool {
    let bytes = protocol::codec::encode_client(Encoding::Json, frame);
    ws.send(Message::Text(String::from_utf8(bytes).unwrap())).await.is_ok()
}

#[derive(Default)]
pub struct Stats {
    pub restarts: Vec<Duration>,
    pub in_doubt_at_kill: usize,
    pub acked: usize,
    pub committed_before_crash: usize,
    pub duplicates_on_resend: usize,
    pub resumed_sessions: usize,
    pub lost: usize,
    pub doubled: usize,
    pub gaps: usize,
    pub head: u64,
}

/// Compare the log and the cursors with what the devices were told; returns the problems.
pub async fn check_database(pool: &sqlx::PgPool, devices: &[Device], stats: &mut Stats) -> Vec<String> {
    let mut problems: Vec<String> = devices.iter().flat_map(|d| d.problems.iter().cloned()).collect();
    let head: i64 = sqlx::query_scalar("select head_seq from synchub.tenants where tenant_id = $1").bind(TENANT).fetch_one(pool).await.unwrap();
    let rows: Vec<(i64, Option<Uuid>, Option<String>, Option<i64>)> =
        sqlx::query_as("select seq, change_id, origin_device, device_seq from synchub.change_log where tenant_id = $1 order by seq")
            .bind(TENANT)
            .fetch_all(pool)
            .await
            .unwrap();
    stats.head = head as u64;

    // Gap-free: seqs are exactly 1..=head.
    let mut expected = 1i64;
    for (seq, ..) in &rows {
        if *seq != expected {
            stats.gaps += 1;
            problems.push(format!("log seq {seq} where {expected} was due"));
        }
        expected = seq + 1;
    }
    if expected - 1 != head {
        stats.gaps += 1;
        problems.push(format!("the log ends at seq {} but the head is {head}", expected - 1));
    }

    let mut by_change: HashMap<Uuid, Vec<i64>> = HashMap::new();
    let mut by_device_seq: HashMap<(String, i64), usize> = HashMap::new();
    for (seq, change_id, origin, device_seq) in &rows {
        if let Some(id) = change_id {
            by_change.entry(*id).or_default().push(*seq);
        }
        if let (Some(origin), Some(device_seq)) = (origin, device_seq) {
            *by_device_seq.entry((origin.clone(), *device_seq)).or_default() += 1;
        }
    }
    for ((device, device_seq), n) in &by_device_seq {
        if *n > 1 {
            stats.doubled += n - 1;
            problems.push(format!("{device} device_seq {device_seq} is in the log {n} times"));
        }
    }

    for d in devices {
        stats.duplicates_on_resend += d.duplicates_on_resend;
        stats.resumed_sessions += d.sessions.saturating_sub(1);
        for a in &d.acked {
            stats.acked += 1;
            stats.committed_before_crash += usize::from(a.committed_before_crash);
            let found = by_change.get(&a.change_id).map(Vec::as_slice).unwrap_or_default();
            match (a.seq, found) {
                (Some(seq), [at]) if *at == seq as i64 => {}
                (Some(seq), []) => {
                    stats.lost += 1;
                    problems.push(format!("{}: change {} (device_seq {}) acked {:?} at seq {seq} is not in the log", d.id, a.change_id, a.device_seq, a.status));
                }
                (None, []) => {} // it wrote nothing, so it took no seq
                (_, found) => {
                    stats.doubled += found.len().saturating_sub(1);
                    problems.push(format!("{}: change {} (device_seq {}) acked {:?} at seq {:?} is in the log at {found:?}", d.id, a.change_id, a.device_seq, a.status, a.seq));
                }
            }
        }
        // Nothing of the device's is in the log that it was not told about.
        let told: std::collections::HashSet<Uuid> = d.acked.iter().map(|a| a.change_id).collect();
        for (seq, change_id, origin, device_seq) in &rows {
            if origin.as_deref() == Some(d.id.as_str()) && !change_id.is_some_and(|id| told.contains(&id)) {
                problems.push(format!("{}: seq {seq} (change {change_id:?}, device_seq {device_seq:?}) was committed but never acked", d.id));
            }
        }
        let cursor: Option<i64> = sqlx::query_scalar("select last_device_seq from synchub.device_cursors where tenant_id = $1 and device_id = $2")
            .bind(TENANT)
            .bind(&d.id)
            .fetch_optional(pool)
            .await
            .unwrap();
        let last = d.next_device_seq as i64 - 1;
        if cursor.unwrap_or(0) != last {
            problems.push(format!("{}: the hub's cursor is {cursor:?}, the device's last change is device_seq {last}", d.id));
        }
        // Devices resumed: every seq reached them once, as a delta or as their own ack, and
        // each delta is the log's change at its seq.
        let own: std::collections::HashSet<i64> = rows.iter().filter(|r| r.2.as_deref() == Some(d.id.as_str())).map(|r| r.0).collect();
        let position = d.position.as_ref().map_or(0, |p| p.seq) as i64;
        if position != head {
            problems.push(format!("{}: caught up to seq {position}, the head is {head}", d.id));
        }
        for (seq, change_id, ..) in &rows {
            match d.delivered.get(&(*seq as u64)) {
                Some(delivered) if delivered != change_id => {
                    problems.push(format!("{}: the delta at seq {seq} was change {delivered:?}, the log has {change_id:?}", d.id))
                }
                Some(_) => {}
                None if own.contains(seq) => {}
                None => problems.push(format!("{}: seq {seq} never reached it", d.id)),
            }
        }
    }
    problems
}
