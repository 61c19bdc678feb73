//! Cluster mode: three hub processes (`synchub serve --nats …`) on one Postgres database and one
//! nats-server of the test's own, with real sockets. Devices of one tenant on different nodes
//! stay in live sync (every seq once and in order), a dashboard sees writes made through every
//! node and straight in SQL, presence is cluster-wide and forgets a killed node, devices of a
//! killed or drained node resume on another one without losing or doubling a change, and a NATS
//! outage only slows deliveries down (nodes poll the tenants' heads in Postgres). Races that only
//! a cluster has: nodes starting at once on a fresh database, a new tenant met on every node at
//! once, the same new rows written on every node at once.
//!
//! Hub and NATS logs go to `target/tmp/cluster/<test>-<id>/` (printed at the start of each test),
//! kept when the test fails.
//! `CLUSTER_SEED` replays the devices' choices of a run.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use protocol::{Change, ChangeResult, ChangeStatus, ClientFrame, Encoding, ErrorCode, Hlc, Op, Position, ServerFrame, SessionMode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use common::hub_process::HubProcess;
use common::nats::NatsServer;
use common::{fresh_database, now_ms, obj, token, Client, SECRET};

const TENANT: &str = "cluster-tenant";
const SERVICE_TOKEN: &str = "cluster-bridge-token-0123456789";
const HEARTBEAT_MS: u64 = 200;
const NODE_TIMEOUT_MS: u64 = 1500;
/// A node whose sessions are still listed this long after the node died: too late (the node
/// timeout plus slack for the heartbeat's period, the sweep and the diff's trip).
const LEAVE_SLACK: Duration = Duration::from_millis(3500);
/// Bounded waits for the cluster to come to a state (liveness bounds, not timing assertions).
const SETTLE: Duration = Duration::from_secs(30);
/// A hub that says nothing for this long to a device waiting for an ack is stuck, not slow.
const SILENCE: Duration = Duration::from_secs(30);
/// Rows every device writes, so that concurrent writes on different nodes merge or conflict.
const SHARED_ROWS: usize = 4;
const OWN_ROWS: usize = 8;
const MAX_BATCH: usize = 5;

// ---------------------------------------------------------------------------------------------
// The cluster: NATS, a database, hub processes.

struct Cluster {
    name: String,
    dir: PathBuf,
    nats: NatsServer,
    /// Node i+1 is `nodes[i]`; a killed or stopped node stays here, exited.
    nodes: Vec<HubProcess>,
    db: sqlx::PgPool,
    http: reqwest::Client,
}

impl Cluster {
    /// NATS, a fresh database and `n` hubs (node ids `node-1`…), started one after another;
    /// returns once every node is connected to NATS and knows all `n` nodes.
    async fn start(name: &str, n: usize) -> Cluster {
        Self::start_nodes(name, n, false).await
    }

    /// `start`, with the hubs' processes started at once (as a deployment may).
    async fn start_at_once(name: &str, n: usize) -> Cluster {
        Self::start_nodes(name, n, true).await
    }

    async fn start_nodes(name: &str, n: usize, at_once: bool) -> Cluster {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cluster").join(format!("{name}-{}", &Uuid::new_v4().simple().to_string()[..8]));
        std::fs::create_dir_all(&dir).unwrap();
        println!("cluster test {name}: hub and NATS logs in {}", dir.display());
        let nats = tokio::task::block_in_place(|| NatsServer::start(&dir));
        let database_url = fresh_database().await;
        let config = write_config(&dir, &database_url);
        let url = nats.url();
        let starts = (1..=n).map(|i| {
            let (config, url, log) = (config.clone(), url.clone(), dir.join(format!("node-{i}.log")));
            async move {
                let node_id = format!("node-{i}");
                HubProcess::start_with(&config, &log, &["--nats", &url], &[("SYNCHUB_NODE_ID", node_id.as_str())]).await.0
            }
        });
        let nodes = if at_once {
            futures_util::future::join_all(starts).await
        } else {
            let mut nodes = Vec::new();
            for start in starts {
                nodes.push(start.await);
            }
            nodes
        };
        let db = sqlx::PgPool::connect(&database_url).await.unwrap();
        let cluster = Cluster { name: name.into(), dir, nats, nodes, db, http: reqwest::Client::new() };
        for i in 1..=n {
            cluster.wait_metric(i, "synchub_cluster_nats_connected", |v| v == 1.0, "connected to NATS").await;
            cluster.wait_metric(i, "synchub_cluster_nodes", |v| v == n as f64, &format!("knowing all {n} nodes")).await;
        }
        cluster
    }

    fn addr(&self, node: usize) -> SocketAddr {
        self.nodes[node - 1].addr
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.addr).collect()
    }

    fn logs(&self) -> String {
        format!("logs of {} in {}", self.name, self.dir.display())
    }

    /// `/metrics` of a node; None when it does not answer.
    async fn metrics(&self, node: usize) -> Option<String> {
        let response = self.http.get(format!("http://{}/metrics", self.addr(node))).timeout(Duration::from_secs(5)).send().await.ok()?;
        response.text().await.ok()
    }

    /// A metric's value on a node (summed over its labels); None when absent or unanswered.
    async fn metric(&self, node: usize, name: &str) -> Option<f64> {
        metric_value(&self.metrics(node).await?, name)
    }

    /// Wait (bounded) until a node's metric satisfies `ok`; returns its value.
    async fn wait_metric(&self, node: usize, name: &str, ok: impl Fn(f64) -> bool, what: &str) -> f64 {
        self.wait_metric_within(node, name, ok, what, SETTLE).await
    }

    async fn wait_metric_within(&self, node: usize, name: &str, ok: impl Fn(f64) -> bool, what: &str, limit: Duration) -> f64 {
        let deadline = Instant::now() + limit;
        loop {
            let value = self.metric(node, name).await;
            if let Some(v) = value.filter(|v| ok(*v)) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "node-{node} is not {what} within {limit:?}: {name} = {value:?}; {}; node-{node}'s log:\n{}",
                self.logs(),
                self.nodes[node - 1].tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `/readyz` of a node: status and body.
    async fn readyz(&self, node: usize) -> (u16, String) {
        let response = self.http.get(format!("http://{}/readyz", self.addr(node))).timeout(Duration::from_secs(10)).send().await.expect("/readyz answers");
        (response.status().as_u16(), response.text().await.unwrap_or_default())
    }

    async fn head(&self) -> u64 {
        let head: Option<i64> = sqlx::query_scalar("select head_seq from synchub.tenants where tenant_id = $1").bind(TENANT).fetch_optional(&self.db).await.unwrap();
        head.unwrap_or(0) as u64
    }
}

impl Drop for Cluster {
    /// The logs are kept when the test failed (a panic is unwinding), removed otherwise.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The configuration every node shares: the demo tables, a service token, small presence timings.
fn write_config(dir: &Path, database_url: &str) -> PathBuf {
    let q = |s: &str| serde_json::to_string(s).unwrap(); // a JSON string is a TOML basic string here
    let mut text = format!(
        "listen = \"127.0.0.1:0\"\ndatabase_url = {}\njwt_hs256_secret = {}\nworkers = 2\ndb_pool_size = 6\n\
         cluster_heartbeat_ms = {HEARTBEAT_MS}\ncluster_node_timeout_ms = {NODE_TIMEOUT_MS}\nshutdown_timeout_ms = 5000\n",
        q(database_url),
        q(SECRET)
    );
    for table in synchub::demo::tables() {
        text += &format!("\n[[tables]]\nname = {}\ntenant_column = {}\npolicy = {}\n", q(&table.name), q(&table.tenant_column), q(table.policy.as_str()));
    }
    text += &format!("\n[[service_tokens]]\nname = \"bridge\"\ntoken = {}\ntenants = [{}]\n", q(SERVICE_TOKEN), q(TENANT));
    let path = dir.join("synchub.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `name value` or `name{labels} value` lines of a Prometheus text, summed.
fn metric_value(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else { continue };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

fn seed() -> u64 {
    let seed = std::env::var("CLUSTER_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(rand::random);
    println!("cluster: seed {seed} (rerun with CLUSTER_SEED={seed})");
    seed
}

// ---------------------------------------------------------------------------------------------
// Devices that survive lost sockets by resuming on the next node of their list.

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

#[derive(Clone)]
struct Batch {
    batch_id: Uuid,
    changes: Vec<Change>,
}

struct Acked {
    change_id: Uuid,
    device_seq: u64,
    status: ChangeStatus,
    seq: Option<u64>,
}

enum Got {
    Frame(ServerFrame),
    Quiet,
    Lost,
}

struct Dev {
    id: String,
    /// The node (1-based) it starts on.
    home: usize,
    token: String,
    /// Nodes in the order it uses them: it starts on the first; a lost session moves it on.
    addrs: Vec<SocketAddr>,
    /// The node number of each of `addrs`.
    node_numbers: Vec<usize>,
    at: usize,
    /// Hellos refused in a row on the current node.
    refused_hellos: usize,
    rng: StdRng,
    shared_rows: Vec<Uuid>,
    own_rows: Vec<Uuid>,
    next_device_seq: u64,
    position: Option<Position>,
    /// Sent, not acked: re-sent first thing on the next session.
    in_doubt: Option<Batch>,
    /// Re-sent on every new session, as a device that lost its acks would: answered `duplicate`.
    last_acked: Option<(Batch, Vec<ChangeResult>)>,
    acked: Vec<Acked>,
    /// Seqs of its own acked changes past the position: they count once every seq before them
    /// has been applied (protocol §5, "Position").
    own_ahead: BTreeSet<u64>,
    /// Seq → change id of every delta delivered, catch-up and live.
    delivered: BTreeMap<u64, Option<Uuid>>,
    /// Deltas delivered live, by origin device.
    live_from: BTreeMap<String, usize>,
    live_deltas: Arc<AtomicUsize>,
    acked_batches: Arc<AtomicUsize>,
    problems: Vec<String>,
    sessions: usize,
    /// The node of each session.
    nodes_used: Vec<usize>,
    duplicates_on_resend: usize,
    /// Close codes of every socket the hub closed, and of those it closed after a welcome.
    closes: BTreeMap<u16, usize>,
    session_closes: BTreeMap<u16, usize>,
    /// A welcome came on the current socket.
    in_session: bool,
    refusals: BTreeMap<String, usize>,
    ws: Option<Ws>,
    next_id: u64,
}

/// `per_node` devices homed on each node, every one listing the nodes from its home on.
fn fleet(addrs: &[SocketAddr], per_node: usize, seed: u64) -> Vec<Dev> {
    let mut rng = StdRng::seed_from_u64(seed);
    let shared: Vec<Uuid> = (0..SHARED_ROWS).map(|_| Uuid::from_u128(rng.gen())).collect();
    let mut devices = Vec::new();
    for home in 1..=addrs.len() {
        for j in 0..per_node {
            let id = format!("n{home}-dev{j}");
            let order: Vec<usize> = (0..addrs.len()).map(|k| (home - 1 + k) % addrs.len() + 1).collect();
            devices.push(Dev::new(id, home, order.iter().map(|n| addrs[n - 1]).collect(), order, shared.clone(), StdRng::seed_from_u64(rng.gen())));
        }
    }
    devices
}

impl Dev {
    fn new(id: String, home: usize, addrs: Vec<SocketAddr>, node_numbers: Vec<usize>, shared_rows: Vec<Uuid>, mut rng: StdRng) -> Dev {
        let own_rows = (0..OWN_ROWS).map(|_| Uuid::from_u128(rng.gen())).collect();
        Dev {
            token: token(TENANT, &format!("user-{id}"), "Employee", Some(&id)),
            id,
            home,
            addrs,
            node_numbers,
            at: 0,
            refused_hellos: 0,
            rng,
            shared_rows,
            own_rows,
            next_device_seq: 1,
            position: None,
            in_doubt: None,
            last_acked: None,
            acked: Vec::new(),
            own_ahead: BTreeSet::new(),
            delivered: BTreeMap::new(),
            live_from: BTreeMap::new(),
            live_deltas: Arc::default(),
            acked_batches: Arc::default(),
            problems: Vec::new(),
            sessions: 0,
            nodes_used: Vec::new(),
            duplicates_on_resend: 0,
            closes: BTreeMap::new(),
            session_closes: BTreeMap::new(),
            in_session: false,
            refusals: BTreeMap::new(),
            ws: None,
            next_id: 0,
        }
    }

    fn seq(&self) -> u64 {
        self.position.as_ref().map_or(0, |p| p.seq)
    }

    fn describe(&self) -> String {
        format!(
            "{}: position {}, sessions {} on nodes {:?}, closes {:?} (of sessions {:?}), refusals {:?}, problems {:?}",
            self.id,
            self.seq(),
            self.sessions,
            self.nodes_used,
            self.closes,
            self.session_closes,
            self.refusals,
            self.problems
        )
    }

    /// The session is gone: the next one goes to the next node of the list.
    fn lost(&mut self) {
        self.ws = None;
        self.in_session = false;
        self.at = (self.at + 1) % self.addrs.len();
    }

    /// A live session, opened if there is none: hello from the position, then the last acked
    /// batch and the batch in doubt sent again.
    async fn connect(&mut self, deadline: Instant) {
        while self.ws.is_none() {
            assert!(Instant::now() < deadline, "{}: no node took a session in time ({})", self.id, self.describe());
            let addr = self.addrs[self.at];
            match tokio::time::timeout(Duration::from_secs(5), tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws"))).await {
                Ok(Ok((ws, _))) => self.ws = Some(ws),
                _ => {
                    self.lost();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
            if !self.hello().await {
                // A node that refuses a hello (its database out of reach, say) is tried again,
                // twice; a node that is gone fails to connect and the next one is tried.
                self.refused_hellos += 1;
                if self.refused_hellos >= 3 {
                    self.refused_hellos = 0;
                    self.lost();
                } else {
                    self.ws = None;
                    self.in_session = false;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            self.refused_hellos = 0;
            self.in_session = true;
            self.sessions += 1;
            self.nodes_used.push(self.node_numbers[self.at]);
            if let Some((batch, results)) = self.last_acked.clone() {
                let Some((again, _)) = self.push(&batch).await else {
                    self.lost();
                    continue;
                };
                for (before, now) in results.iter().zip(&again) {
                    if now.status != ChangeStatus::Duplicate || now.seq != before.seq {
                        self.problems.push(format!(
                            "{}: re-sent acked change {} (device_seq {}, acked {:?} at seq {:?}) to {addr} came back {:?} at seq {:?}",
                            self.id, before.change_id, before.device_seq, before.status, before.seq, now.status, now.seq
                        ));
                    }
                }
                self.duplicates_on_resend += again.len();
            }
            if let Some(batch) = self.in_doubt.clone() {
                let Some((results, _)) = self.push(&batch).await else {
                    self.lost();
                    continue;
                };
                self.record(&batch, results, true);
            }
        }
    }

    async fn send(&mut self, frame: &ClientFrame) -> bool {
        let bytes = protocol::codec::encode_client(Encoding::Json, frame);
        match self.ws.as_mut() {
            Some(ws) => ws.send(Message::Text(String::from_utf8(bytes).unwrap())).await.is_ok(),
            None => false,
        }
    }

    /// `hello` from the position; false when the socket was lost or the hello refused.
    async fn hello(&mut self) -> bool {
        self.next_id += 1;
        let id = self.next_id;
        let hello = ClientFrame::Hello {
            mode: Default::default(),
            id,
            versions: vec![1],
            token: self.token.clone(),
            device_id: Some(self.id.clone()),
            position: self.position.clone(),
        };
        if !self.send(&hello).await {
            return false;
        }
        loop {
            match self.recv(SILENCE).await {
                Got::Lost => return false,
                Got::Quiet => panic!("{}: no answer to hello within {SILENCE:?}", self.id),
                Got::Frame(ServerFrame::Welcome { epoch, .. }) => {
                    if let Some(p) = &self.position {
                        if p.epoch != epoch {
                            self.problems.push(format!("{}: the epoch changed from one node to another: {} → {epoch}", self.id, p.epoch));
                        }
                    }
                    self.position.get_or_insert(Position { epoch, seq: 0 });
                    return true;
                }
                Got::Frame(ServerFrame::Error { id: Some(got), code, temporary: true, .. }) if got == id => {
                    *self.refusals.entry(format!("hello {code:?}")).or_default() += 1;
                }
                Got::Frame(other) => self.problems.push(format!("{}: expected welcome, got {other:?}", self.id)),
            }
        }
    }

    /// Push `batch` (again after a temporary refusal): its results and whether it was refused
    /// first; None when the socket was lost.
    async fn push(&mut self, batch: &Batch) -> Option<(Vec<ChangeResult>, bool)> {
        let mut refused = false;
        loop {
            self.next_id += 1;
            let id = self.next_id;
            if !self.send(&ClientFrame::Push { id, batch_id: batch.batch_id, changes: batch.changes.clone() }).await {
                return None;
            }
            loop {
                match self.recv(SILENCE).await {
                    Got::Lost => return None,
                    Got::Quiet => panic!("{}: no ack within {SILENCE:?} ({})", self.id, self.describe()),
                    Got::Frame(ServerFrame::Ack { id: got, batch_id, results }) if got == id => {
                        assert_eq!(batch_id, batch.batch_id, "{}: the ack names another batch", self.id);
                        self.acked_batches.fetch_add(1, Ordering::Relaxed);
                        return Some((results, refused));
                    }
                    Got::Frame(ServerFrame::Error { id: Some(got), code, message, .. }) if got == id => {
                        assert!(
                            matches!(code, ErrorCode::Busy | ErrorCode::Unavailable | ErrorCode::ShuttingDown | ErrorCode::Internal),
                            "{}: push refused for good: {code:?} {message}",
                            self.id
                        );
                        *self.refusals.entry(format!("push {code:?}")).or_default() += 1;
                        refused = true;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        break;
                    }
                    Got::Frame(_) => {}
                }
            }
        }
    }

    /// Next frame within `wait`, with the stream's bookkeeping done.
    async fn recv(&mut self, wait: Duration) -> Got {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let Some(ws) = self.ws.as_mut() else { return Got::Lost };
            let msg = match tokio::time::timeout_at(deadline, ws.next()).await {
                Err(_) => return Got::Quiet,
                Ok(None) | Ok(Some(Err(_))) => return Got::Lost,
                Ok(Some(Ok(msg))) => msg,
            };
            let frame = match msg {
                Message::Text(t) => protocol::codec::decode_server(Encoding::Json, t.as_bytes()).expect("the hub sends valid frames"),
                Message::Close(frame) => {
                    let code = frame.map_or(1005, |f| u16::from(f.code));
                    *self.closes.entry(code).or_default() += 1;
                    if self.in_session {
                        *self.session_closes.entry(code).or_default() += 1;
                    }
                    return Got::Lost;
                }
                _ => continue,
            };
            match &frame {
                ServerFrame::CatchUp { deltas, seq, .. } => self.delivered_deltas(deltas, *seq, false),
                ServerFrame::Delta { deltas, seq } => self.delivered_deltas(deltas, *seq, true),
                ServerFrame::UpToDate { seq } => self.advance(*seq),
                ServerFrame::MustResync { reason, .. } => {
                    self.problems.push(format!("{}: must_resync {reason:?} from position {:?}", self.id, self.position));
                }
                ServerFrame::Error { id: None, code, .. } => *self.refusals.entry(format!("session {code:?}")).or_default() += 1,
                _ => {}
            }
            return Got::Frame(frame);
        }
    }

    fn delivered_deltas(&mut self, deltas: &[protocol::Delta], seq: u64, live: bool) {
        let mut from = self.seq();
        for delta in deltas {
            // Strictly after what came before (in order, never twice) and within the frame.
            if delta.seq <= from || delta.seq > seq {
                self.problems.push(format!("{}: delta at seq {} after seq {from}, in a frame up to {seq} (live: {live})", self.id, delta.seq));
            }
            from = from.max(delta.seq);
            if self.delivered.insert(delta.seq, delta.change_id).is_some() {
                self.problems.push(format!("{}: seq {} delivered twice", self.id, delta.seq));
            }
            if live && delta.origin.as_deref() == Some(self.id.as_str()) {
                self.problems.push(format!("{}: its own change at seq {} came back in a live delta", self.id, delta.seq));
            }
            if live {
                *self.live_from.entry(delta.origin.clone().unwrap_or_else(|| "sql".into())).or_default() += 1;
                self.live_deltas.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.advance(seq);
    }

    /// The position moves to a frame's seq (a frame may cover less than an ack already took it
    /// to), then over its own acked seqs that follow.
    fn advance(&mut self, seq: u64) {
        if let Some(p) = &mut self.position {
            p.seq = p.seq.max(seq);
            while let Some(&next) = self.own_ahead.first() {
                if next <= p.seq {
                    self.own_ahead.remove(&next);
                } else if next == p.seq + 1 {
                    self.own_ahead.remove(&next);
                    p.seq = next;
                } else {
                    break;
                }
            }
        }
    }

    /// Take the results of `batch`; `resent`: sent before without an ack, so it may be `duplicate`.
    fn record(&mut self, batch: &Batch, results: Vec<ChangeResult>, resent: bool) {
        if results.len() != batch.changes.len() {
            self.problems.push(format!("{}: {} results for {} changes", self.id, results.len(), batch.changes.len()));
        }
        // A batch commits in one transaction: all of it or none.
        let duplicates = results.iter().filter(|r| r.status == ChangeStatus::Duplicate).count();
        if duplicates != 0 && duplicates != results.len() {
            self.problems.push(format!("{}: batch {} re-sent came back part duplicate: {results:?}", self.id, batch.batch_id));
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
                    let id = change.key.get("id").and_then(|v| v.as_str()).and_then(|v| v.parse::<Uuid>().ok());
                    let row = if id.is_some_and(|id| self.shared_rows.contains(&id)) { "a row every device writes" } else { "a row of its own" };
                    self.problems.push(format!(
                        "{}: change {} (device_seq {}, resent: {resent}) to {row}, key {:?}, got {result:?}",
                        self.id, change.change_id, change.device_seq, change.key
                    ));
                    continue;
                }
            }
            self.acked.push(Acked { change_id: change.change_id, device_seq: change.device_seq, status: result.status, seq: result.seq });
            if let Some(seq) = result.seq {
                self.own_ahead.insert(seq);
            }
        }
        let at = self.seq();
        self.advance(at);
        self.in_doubt = None;
        self.last_acked = Some((batch.clone(), results));
    }

    /// Whole product rows, some shared with the other devices (so that some writes lose).
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
                    hlc: Hlc { wall_ms: now_ms() - self.rng.gen_range(0..200), counter: 0 },
                    base_version: 0,
                }
            })
            .collect();
        Batch { batch_id: Uuid::now_v7(), changes }
    }

    /// Keep reading (deltas, acks of nothing) for `wait`.
    async fn read_for(&mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.recv(left).await {
                Got::Quiet => break,
                Got::Lost => {
                    self.lost();
                    break;
                }
                Got::Frame(_) => {}
            }
        }
    }

    /// Push `batches` new batches (fewer if `stop` is set first), `pace` apart, resuming on the
    /// next node whenever the session is lost; ends with nothing in doubt.
    async fn push_batches(mut self, batches: usize, pace: Duration, stop: Option<Arc<AtomicBool>>, limit: Duration) -> Dev {
        let deadline = Instant::now() + limit;
        let mut made = 0;
        while made < batches && !stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed)) {
            self.connect(deadline).await;
            let batch = self.new_batch();
            made += 1;
            self.in_doubt = Some(batch.clone());
            match self.push(&batch).await {
                // Sent again by the next session.
                None => self.lost(),
                Some((results, refused)) => {
                    self.record(&batch, results, refused);
                    self.read_for(pace).await;
                }
            }
        }
        self.connect(deadline).await;
        assert!(self.in_doubt.is_none(), "{}: ends with a batch in doubt", self.id);
        self
    }

    /// Read the stream (reconnecting if it must) until the position is `head`.
    async fn settle(&mut self, head: u64, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.seq() < head {
            assert!(Instant::now() < deadline, "{}: did not reach seq {head} within {limit:?} ({})", self.id, self.describe());
            self.connect(deadline).await;
            if let Got::Lost = self.recv(Duration::from_millis(500)).await {
                self.lost();
            }
        }
    }

    async fn close(&mut self) {
        if let Some(mut ws) = self.ws.take() {
            let _ = ws.close(None).await;
        }
    }
}

/// Compare the tenant's log and the device cursors with what the devices were told and given:
/// every acked change in the log once at its seq, seqs gap-free, nothing committed unacked,
/// every seq delivered once to every device (or acked to it as its own), each delta the log's
/// change at its seq, every device at the head. Returns the problems and the head.
async fn check(db: &sqlx::PgPool, devices: &[Dev]) -> (Vec<String>, u64) {
    let mut problems: Vec<String> = devices.iter().flat_map(|d| d.problems.iter().cloned()).collect();
    let head: i64 = sqlx::query_scalar("select head_seq from synchub.tenants where tenant_id = $1").bind(TENANT).fetch_one(db).await.unwrap();
    let rows: Vec<(i64, Option<Uuid>, Option<String>, Option<i64>)> =
        sqlx::query_as("select seq, change_id, origin_device, device_seq from synchub.change_log where tenant_id = $1 order by seq")
            .bind(TENANT)
            .fetch_all(db)
            .await
            .unwrap();
    let mut expected = 1i64;
    for (seq, ..) in &rows {
        if *seq != expected {
            problems.push(format!("log seq {seq} where {expected} was due"));
        }
        expected = seq + 1;
    }
    if expected - 1 != head {
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
            problems.push(format!("{device} device_seq {device_seq} is in the log {n} times"));
        }
    }
    for d in devices {
        for a in &d.acked {
            let found = by_change.get(&a.change_id).map(Vec::as_slice).unwrap_or_default();
            match (a.seq, found) {
                (Some(seq), [at]) if *at == seq as i64 => {}
                (Some(seq), []) => problems.push(format!("{}: change {} (device_seq {}) acked {:?} at seq {seq} is not in the log", d.id, a.change_id, a.device_seq, a.status)),
                (None, []) => {} // it wrote nothing, so it took no seq
                (_, found) => problems.push(format!("{}: change {} (device_seq {}) acked {:?} at seq {:?} is in the log at {found:?}", d.id, a.change_id, a.device_seq, a.status, a.seq)),
            }
        }
        let told: BTreeSet<Uuid> = d.acked.iter().map(|a| a.change_id).collect();
        for (seq, change_id, origin, device_seq) in &rows {
            if origin.as_deref() == Some(d.id.as_str()) && !change_id.is_some_and(|id| told.contains(&id)) {
                problems.push(format!("{}: seq {seq} (change {change_id:?}, device_seq {device_seq:?}) was committed but never acked", d.id));
            }
        }
        let cursor: Option<i64> = sqlx::query_scalar("select last_device_seq from synchub.device_cursors where tenant_id = $1 and device_id = $2")
            .bind(TENANT)
            .bind(&d.id)
            .fetch_optional(db)
            .await
            .unwrap();
        let last = d.next_device_seq as i64 - 1;
        if cursor.unwrap_or(0) != last {
            problems.push(format!("{}: the hub's cursor is {cursor:?}, the device's last change is device_seq {last}", d.id));
        }
        if d.seq() as i64 != head {
            problems.push(format!("{}: at seq {}, the head is {head}", d.id, d.seq()));
        }
        let own: BTreeSet<i64> = rows.iter().filter(|r| r.2.as_deref() == Some(d.id.as_str())).map(|r| r.0).collect();
        let mut missing = Vec::new();
        for (seq, change_id, ..) in &rows {
            match d.delivered.get(&(*seq as u64)) {
                Some(delivered) if delivered != change_id => {
                    problems.push(format!("{}: the delta at seq {seq} was change {delivered:?}, the log has {change_id:?}", d.id))
                }
                Some(_) => {}
                None if own.contains(seq) => {}
                None => missing.push(*seq),
            }
        }
        if !missing.is_empty() {
            problems.push(format!("{}: {} seqs never reached it: {:?}", d.id, missing.len(), &missing[..missing.len().min(20)]));
        }
    }
    (problems, head as u64)
}

/// Run the devices' pushes as tasks; returns the tasks and each device's (id, home, acked
/// batches, live deltas) counters.
fn spawn_pushes(
    devices: Vec<Dev>,
    batches: usize,
    pace: Duration,
    stop: Option<Arc<AtomicBool>>,
) -> (Vec<tokio::task::JoinHandle<Dev>>, Vec<(String, usize, Arc<AtomicUsize>, Arc<AtomicUsize>)>) {
    let counters = devices.iter().map(|d| (d.id.clone(), d.home, d.acked_batches.clone(), d.live_deltas.clone())).collect();
    let tasks = devices.into_iter().map(|d| tokio::spawn(d.push_batches(batches, pace, stop.clone(), Duration::from_secs(60)))).collect();
    (tasks, counters)
}

async fn join(tasks: Vec<tokio::task::JoinHandle<Dev>>, cluster: &Cluster) -> Vec<Dev> {
    let mut devices = Vec::new();
    for task in tasks {
        devices.push(task.await.unwrap_or_else(|e| panic!("a device failed: {e}; {}", cluster.logs())));
    }
    devices
}

/// Every device reads up to the head, then the log and cursors are checked against them.
async fn settle_and_check(cluster: &Cluster, devices: &mut [Dev]) -> u64 {
    let head = cluster.head().await;
    for d in devices.iter_mut() {
        d.settle(head, SETTLE).await;
    }
    let (problems, head) = check(&cluster.db, devices).await;
    for d in devices.iter() {
        println!("{}", d.describe());
    }
    assert!(problems.is_empty(), "{} problems (head {head}; {}):\n{}", problems.len(), cluster.logs(), problems.join("\n"));
    head
}

fn total(counters: &[(String, usize, Arc<AtomicUsize>, Arc<AtomicUsize>)]) -> usize {
    counters.iter().map(|c| c.2.load(Ordering::Relaxed)).sum()
}

/// Wait (bounded) until the devices have acked `n` batches in all.
async fn wait_acked(counters: &[(String, usize, Arc<AtomicUsize>, Arc<AtomicUsize>)], n: usize, cluster: &Cluster) {
    let deadline = Instant::now() + SETTLE;
    while total(counters) < n {
        assert!(Instant::now() < deadline, "the devices acked {} batches, not {n}, within {SETTLE:?}; {}", total(counters), cluster.logs());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Sessions of common::Client on a node.

async fn device_on(addr: SocketAddr, device: &str) -> Client {
    let mut c = Client::connect(addr, Encoding::Json).await;
    c.hello(&token(TENANT, &format!("user-{device}"), "Employee", Some(device)), None, None).await;
    c.until_up_to_date().await;
    c
}

async fn dashboard_on(addr: SocketAddr, user: &str) -> Client {
    let mut c = Client::connect(addr, Encoding::Json).await;
    let id = c.next_id();
    c.send(&ClientFrame::Hello { mode: SessionMode::Dashboard, id, versions: vec![1], token: token(TENANT, user, "Manager", None), device_id: None, position: None })
        .await;
    match c.recv().await {
        ServerFrame::Welcome { .. } => c,
        other => panic!("expected welcome, got {other:?}"),
    }
}

/// A presence subscription's view: the list, then joins and leaves applied.
struct PresenceView {
    sub: String,
    online: HashMap<Uuid, protocol::PresenceEntry>,
}

impl PresenceView {
    async fn subscribe(dash: &mut Client, sub: &str) -> PresenceView {
        let id = dash.send_subscribe(sub, None, vec![], false, Some(protocol::Channel::Presence)).await;
        dash.expect(|f| match f {
            ServerFrame::Subscribed { id: got, .. } if *got == id => Some(()),
            ServerFrame::Error { id: Some(got), code, message, .. } if *got == id => panic!("presence refused: {code:?} {message}"),
            _ => None,
        })
        .await;
        let online = dash
            .expect(|f| match f {
                ServerFrame::Presence { sub: s, online } if s == sub => Some(online.clone()),
                _ => None,
            })
            .await;
        PresenceView { sub: sub.into(), online: online.into_iter().map(|p| (p.session_id, p)).collect() }
    }

    fn devices(&self) -> BTreeSet<String> {
        self.online.values().filter(|p| p.mode == SessionMode::Device).map(|p| p.device_id.clone()).collect()
    }

    /// Apply the dashboard's presence frames until `done` holds; panics past `limit`. Returns
    /// the time it took.
    async fn until(&mut self, dash: &mut Client, limit: Duration, what: &str, done: impl Fn(&BTreeSet<String>) -> bool) -> Duration {
        match self.within(dash, limit, done).await {
            Some(took) => took,
            None => panic!("presence: not {what} within {limit:?}; the list shows {:?}", self.devices()),
        }
    }

    /// Apply the dashboard's presence frames until `done` holds (the time it took) or `limit`
    /// passes (None).
    async fn within(&mut self, dash: &mut Client, limit: Duration, done: impl Fn(&BTreeSet<String>) -> bool) -> Option<Duration> {
        let started = Instant::now();
        let deadline = started + limit;
        while !done(&self.devices()) {
            let left = deadline.checked_duration_since(Instant::now())?;
            match dash.recv_timeout(left).await {
                Some(ServerFrame::PresenceDiff { sub, joins, leaves }) if sub == self.sub => {
                    for p in leaves {
                        self.online.remove(&p.session_id);
                    }
                    for p in joins {
                        self.online.insert(p.session_id, p);
                    }
                }
                Some(ServerFrame::Presence { sub, online }) if sub == self.sub => {
                    self.online = online.into_iter().map(|p| (p.session_id, p)).collect();
                }
                Some(_) => {}
                None if dash.closed.is_some() => panic!("presence: the dashboard was closed: {:?}", dash.closed),
                None => {}
            }
        }
        Some(started.elapsed())
    }
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------------------------
// The tests.

/// a. Two devices on each of three nodes push at once; every device receives every other
/// device's changes live, once and in order, and all end at the same head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_on_three_nodes_stay_in_live_sync() {
    let cluster = Cluster::start("live-sync", 3).await;
    let seed = seed();
    let mut devices = fleet(&cluster.addrs(), 2, seed);
    let deadline = Instant::now() + SETTLE;
    for d in devices.iter_mut() {
        d.connect(deadline).await;
    }
    let (tasks, _) = spawn_pushes(devices, 15, Duration::from_millis(10), None);
    let mut devices = join(tasks, &cluster).await;
    let head = settle_and_check(&cluster, &mut devices).await;
    for d in &devices {
        assert_eq!(d.sessions, 1, "{}: its one session was lost ({})", d.id, d.describe());
        // Every delta came live (the devices connected before anyone pushed), from every node.
        let from_nodes: BTreeSet<&str> = d.live_from.keys().map(|origin| &origin[..2]).collect();
        let others: BTreeSet<String> = (1..=3).filter(|n| *n != d.home).map(|n| format!("n{n}")).collect();
        for other in &others {
            assert!(from_nodes.contains(other.as_str()), "{}: no live delta from a device of node {other}: {:?}", d.id, d.live_from);
        }
    }
    let published: f64 = futures_util::future::join_all((1..=3).map(|n| cluster.metric(n, "synchub_cluster_published_total"))).await.into_iter().flatten().sum();
    let received: f64 = futures_util::future::join_all((1..=3).map(|n| cluster.metric(n, "synchub_cluster_received_total"))).await.into_iter().flatten().sum();
    println!("live sync: head {head}, published {published}, received {received}");
    assert!(published > 0.0 && received > 0.0, "the nodes published {published} and received {received} messages over NATS");
    for d in devices.iter_mut() {
        d.close().await;
    }
}

/// b. A dashboard on node 3 sees a native push to node 1, an HTTP push to node 2 and a plain SQL
/// write, in seq order; the device on node 1 receives the other two live, and its session is
/// replaced (4010) when it connects to node 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dashboard_sees_writes_made_through_every_node_and_in_sql() {
    let cluster = Cluster::start("dashboard", 3).await;
    let mut dash = dashboard_on(cluster.addr(3), "mia").await;
    let (subscribed, _) = dash.subscribe_table("all", "products", vec![], false).await;
    assert_eq!(subscribed, 0, "a fresh tenant");
    let mut device = device_on(cluster.addr(1), "pos-1").await;

    // A native push to node 1.
    let a = Uuid::now_v7();
    let results = device.push(vec![common::upsert("products", json!({"id": a}), common::product(a, "Native on node 1", 100), 1, now_ms(), 0)]).await;
    assert_eq!(results[0].status, ChangeStatus::Applied, "{results:?}");
    let seq_a = results[0].seq.unwrap();
    let (deltas, _) = dash.next_sub_delta("all").await;
    assert_eq!(deltas.len(), 1, "{deltas:?}");
    assert_eq!((deltas[0].seq, deltas[0].origin.as_deref(), deltas[0].row.as_ref().unwrap()["name"].clone()), (seq_a, Some("pos-1"), json!("Native on node 1")));

    // An HTTP push to node 2.
    let b = Uuid::now_v7();
    let change = common::upsert("products", json!({"id": b}), common::product(b, "HTTP on node 2", 200), 1, now_ms(), 0);
    let response = cluster
        .http
        .post(format!("http://{}/v1/tenants/{TENANT}/push", cluster.addr(2)))
        .bearer_auth(SERVICE_TOKEN)
        .json(&json!({"device_id": "bridge-1", "batch_id": Uuid::now_v7(), "changes": [change]}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["status"], json!("applied"), "{body}");
    let seq_b = body["results"][0]["seq"].as_u64().unwrap();
    assert_eq!(seq_b, seq_a + 1);
    let (deltas, _) = dash.next_sub_delta("all").await;
    assert_eq!(deltas.len(), 1, "{deltas:?}");
    assert_eq!((deltas[0].seq, deltas[0].origin.as_deref(), deltas[0].row.as_ref().unwrap()["name"].clone()), (seq_b, Some("bridge-1"), json!("HTTP on node 2")));

    // A plain SQL write, which the capture trigger logs.
    let c = Uuid::now_v7();
    sqlx::query("insert into products (tenant_id, id, sku, name, price_cents) values ($1, $2, 'SKU-SQL', 'Written in SQL', 300)")
        .bind(TENANT)
        .bind(c)
        .execute(&cluster.db)
        .await
        .unwrap();
    let (deltas, _) = dash.next_sub_delta("all").await;
    assert_eq!(deltas.len(), 1, "{deltas:?}");
    assert_eq!((deltas[0].seq, deltas[0].origin.as_deref(), deltas[0].row.as_ref().unwrap()["name"].clone()), (seq_b + 1, None, json!("Written in SQL")));
    assert_eq!(cluster.head().await, seq_b + 1);

    // The device on node 1 got the other two, live, in order.
    let mut got = Vec::new();
    while got.len() < 2 {
        let (deltas, _) = device.next_deltas().await;
        got.extend(deltas.into_iter().map(|d| (d.seq, d.row.unwrap()["name"].clone())));
    }
    assert_eq!(got, vec![(seq_b, json!("HTTP on node 2")), (seq_b + 1, json!("Written in SQL"))]);
    assert!(dash.inbox.iter().all(|f| !matches!(f, ServerFrame::SubDelta { .. })), "nothing more: {:?}", dash.inbox);

    // A device keeps one session across the cluster: pos-1 connecting to node 2 replaces its
    // session on node 1 (closed with 4010), and resumes there.
    let mut again = Client::connect(cluster.addr(2), Encoding::Json).await;
    let (_, head) = again.hello(&token(TENANT, "user-pos-1", "Employee", Some("pos-1")), None, None).await;
    // Node 2 may not have read the SQL write's notification yet: its head may be one behind,
    // and the change then comes live.
    assert!(head == seq_b || head == seq_b + 1, "head {head}");
    let (mut seen, _) = again.until_up_to_date().await;
    while !seen.iter().any(|d| d.seq == seq_b + 1) {
        seen.extend(again.next_deltas().await.0);
    }
    assert_eq!(seen.iter().map(|d| d.seq).collect::<Vec<_>>(), (1..=seq_b + 1).collect::<Vec<_>>(), "every seq once, in order");
    assert_eq!(device.expect_close().await, 4010, "the older session of pos-1, on node 1");
}

/// c. A presence watcher on node 1 lists the sessions of nodes 2 and 3; once node 3 is killed,
/// its sessions leave the list within the node timeout (plus slack), and node 2's stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_cluster_wide_and_forgets_a_killed_node() {
    let mut cluster = Cluster::start("presence", 3).await;
    let mut watcher = dashboard_on(cluster.addr(1), "watcher").await;
    let mut view = PresenceView::subscribe(&mut watcher, "who").await;
    let _on_1 = device_on(cluster.addr(1), "pos-1a").await;
    let _on_2 = device_on(cluster.addr(2), "pos-2a").await;
    let _on_2b = device_on(cluster.addr(2), "pos-2b").await;
    let _on_3 = device_on(cluster.addr(3), "pos-3a").await;
    let _on_3b = device_on(cluster.addr(3), "pos-3b").await;
    let all = set(&["pos-1a", "pos-2a", "pos-2b", "pos-3a", "pos-3b"]);
    view.until(&mut watcher, SETTLE, "listing the devices of every node", |d| *d == all).await;
    // A second subscription's list has them at once.
    let mut again = PresenceView::subscribe(&mut watcher, "who-again").await;
    assert_eq!(again.devices(), all, "the list a new presence subscription gets");

    cluster.nodes[2].kill().await;
    let killed = Instant::now();
    let survivors = set(&["pos-1a", "pos-2a", "pos-2b"]);
    let limit = Duration::from_millis(NODE_TIMEOUT_MS) + LEAVE_SLACK;
    view.until(&mut watcher, limit, "without node 3's sessions", |d| *d == survivors).await;
    let took = killed.elapsed();
    println!("presence: node 3's sessions left {took:?} after the kill (node timeout {NODE_TIMEOUT_MS} ms)");
    again.until(&mut watcher, limit, "without node 3's sessions (second subscription)", |d| *d == survivors).await;
    cluster.wait_metric(1, "synchub_cluster_nodes", |v| v == 2.0, "counting two nodes").await;
    // Node 2 stays alive and listed: a few more heartbeat timeouts later, nothing else left.
    let changed = view.within(&mut watcher, Duration::from_millis(2 * NODE_TIMEOUT_MS), |d| *d != survivors).await;
    assert!(changed.is_none(), "presence changed {changed:?} after node 3's sessions left: {:?}", view.devices());
}

/// Three nodes started at the same moment on a fresh database (each registers the synced tables
/// at start) all come up and form the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_started_at_once_on_a_fresh_database_all_come_up() {
    let cluster = Cluster::start_at_once("at-once", 3).await;
    let mut device = device_on(cluster.addr(1), "pos-1").await;
    let mut other = device_on(cluster.addr(3), "pos-3").await;
    let id = Uuid::now_v7();
    let results = device.push(vec![common::upsert("products", json!({"id": id}), common::product(id, "First", 100), 1, now_ms(), 0)]).await;
    assert_eq!(results[0].status, ChangeStatus::Applied, "{results:?}");
    let (deltas, _) = other.next_deltas().await;
    assert_eq!(deltas.iter().map(|d| d.seq).collect::<Vec<_>>(), vec![results[0].seq.unwrap()]);
}

/// A tenant that devices on every node meet for the first time at the same moment: each node
/// starts the tenant's actor (reading its head, creating its row), and every hello is welcomed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_tenant_met_on_every_node_at_once_welcomes_every_device() {
    let cluster = Cluster::start("new-tenant", 3).await;
    async fn first_answer(addr: SocketAddr, tenant: String, device: String) -> Result<Client, String> {
        let mut c = Client::connect(addr, Encoding::Json).await;
        let id = c.next_id();
        let token = token(&tenant, &format!("user-{device}"), "Employee", Some(&device));
        c.send(&ClientFrame::Hello { mode: Default::default(), id, versions: vec![1], token, device_id: None, position: None }).await;
        match c.recv_timeout(common::WAIT).await {
            Some(ServerFrame::Welcome { .. }) => Ok(c),
            other => Err(format!("{tenant}/{device} on {addr}: {other:?}, then closed {:?}", c.closed)),
        }
    }
    let mut refused = Vec::new();
    for round in 0..20 {
        let tenant = format!("fresh-{round}");
        let hellos = (1..=3).map(|n| first_answer(cluster.addr(n), tenant.clone(), format!("dev-{n}")));
        for answer in futures_util::future::join_all(hellos).await {
            match answer {
                Ok(mut c) => {
                    let _ = c.ws.close(None).await;
                }
                Err(e) => refused.push(e),
            }
        }
    }
    assert!(refused.is_empty(), "{} of 60 first hellos were not welcomed ({}):\n{}", refused.len(), cluster.logs(), refused.join("\n"));
}

/// The errors in the test cluster's Postgres log (deadlocks, unique violations), with the lines
/// that detail them, at most 60 lines.
fn postgres_log_errors() -> String {
    let text = std::fs::read_to_string(common::cluster().cluster_dir().join("server.log")).unwrap_or_default();
    let mut out = Vec::new();
    let mut keep = false;
    for line in text.lines() {
        if line.contains("ERROR:") {
            keep = line.contains("deadlock") || line.contains("duplicate key") || line.contains("concurrently");
        } else if !(line.contains("DETAIL:") || line.contains("CONTEXT:") || line.contains("STATEMENT:") || line.starts_with('\t') || line.starts_with(' ')) {
            keep = false;
        }
        if keep {
            out.push(line.chars().take(600).collect::<String>());
        }
    }
    out[out.len().saturating_sub(60)..].join("\n")
}

/// Push a batch, sent again after each temporary refusal (as a client does): its results and
/// the refusals met on the way.
async fn push_answer(c: &mut Client, changes: Vec<Change>) -> (Vec<ChangeResult>, Vec<String>) {
    let batch_id = Uuid::now_v7();
    let mut refusals = Vec::new();
    loop {
        let id = c.next_id();
        c.send(&ClientFrame::Push { id, batch_id, changes: changes.clone() }).await;
        let answer = c
            .expect(|f| match f {
                ServerFrame::Ack { id: got, results, .. } if *got == id => Some(Ok(results.clone())),
                ServerFrame::Error { id: Some(got), code, message, temporary, .. } if *got == id => Some(Err((*temporary, format!("{code:?}: {message}")))),
                _ => None,
            })
            .await;
        match answer {
            Ok(results) => return (results, refusals),
            Err((true, refusal)) if refusals.len() < 10 => refusals.push(refusal),
            Err((_, refusal)) => panic!("push refused for good: {refusal} (after {refusals:?})"),
        }
    }
}

/// New rows written by devices on three nodes at the same moment (four rows a batch, in either
/// order) merge as they would on one node (last writer wins): no push is refused, no change
/// rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_new_row_written_on_three_nodes_at_once_merges() {
    let cluster = Cluster::start("same-row", 3).await;
    // Two devices on each node, so that a node's group commits hold batches of both.
    let mut devices = Vec::new();
    for n in 1..=3 {
        for k in ["a", "b"] {
            devices.push((n, format!("pos-{n}{k}"), device_on(cluster.addr(n), &format!("pos-{n}{k}")).await));
        }
    }
    let deadlocks_before = postgres_deadlocks();
    let mut rejected = Vec::new();
    let rounds = 15u64;
    const ROWS: usize = 4;
    for round in 0..rounds {
        // New rows each round, every device writing all of them, half of them in the
        // opposite order.
        let ids: Vec<Uuid> = (0..ROWS).map(|_| Uuid::now_v7()).collect();
        let pushes = devices.iter_mut().enumerate().map(|(i, (_, name, d))| {
            let mut order = ids.clone();
            if i % 2 == 1 {
                order.reverse();
            }
            let changes = order
                .iter()
                .enumerate()
                .map(|(j, id)| {
                    let device_seq = ROWS as u64 * round + j as u64 + 1;
                    common::upsert("products", json!({"id": id}), common::product(*id, &format!("round {round} by {name}"), 100 + i as i64), device_seq, now_ms(), 0)
                })
                .collect();
            push_answer(d, changes)
        });
        let answers = futures_util::future::join_all(pushes).await;
        for ((n, name, _), answer) in devices.iter().zip(answers) {
            let (results, refusals) = answer;
            for refusal in refusals {
                rejected.push(format!("round {round}, {name} on node-{n}: push refused (then sent again) {refusal}"));
            }
            for r in results {
                if !matches!(r.status, ChangeStatus::Applied | ChangeStatus::Merged | ChangeStatus::Conflict) {
                    rejected.push(format!("round {round}, {name} on node-{n}: {r:?}"));
                }
            }
        }
    }
    let deadlocks = postgres_deadlocks() - deadlocks_before;
    println!("same row: {deadlocks} deadlocks in Postgres's log while it ran");
    assert!(
        rejected.is_empty(),
        "{} refusals and rejections for {} writes of new rows ({}):\n{}\nPostgres's log says:\n{}",
        rejected.len(),
        rounds * 6 * ROWS as u64,
        cluster.logs(),
        rejected.join("\n"),
        postgres_log_errors()
    );
    // Groups of one tenant are serialized by its head row, so that they cannot deadlock; a
    // deadlock costs the groups in it Postgres's deadlock_timeout (1 s) before one is redone.
    // (The count is of the test process's Postgres, which the other tests running meanwhile
    // share; the log's lines name the statements.)
    assert_eq!(deadlocks, 0, "groups of one tenant on different nodes deadlocked ({}); Postgres's log says:\n{}", cluster.logs(), postgres_log_errors());
}

/// Deadlocks Postgres detected so far in the test process's cluster.
fn postgres_deadlocks() -> usize {
    std::fs::read_to_string(common::cluster().cluster_dir().join("server.log")).unwrap_or_default().matches("deadlock detected").count()
}

/// d. Node 3 is killed (SIGKILL) while two devices per node push: its devices resume on node 1
/// from their positions; every acked change is in the log and in every device's stream once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_devices_resume_on_another_node_without_loss_or_doubles() {
    let mut cluster = Cluster::start("kill", 3).await;
    let seed = seed();
    let devices = fleet(&cluster.addrs(), 2, seed);
    let (tasks, counters) = spawn_pushes(devices, 30, Duration::from_millis(15), None);
    wait_acked(&counters, 6 * 8, &cluster).await;
    cluster.nodes[2].kill().await;
    println!("kill: node 3 killed after {} batches acked", total(&counters));
    let mut devices = join(tasks, &cluster).await;
    let head = settle_and_check(&cluster, &mut devices).await;
    for d in &devices {
        if d.home == 3 {
            assert!(d.sessions >= 2, "{}: was on the killed node but never resumed ({})", d.id, d.describe());
            assert!(d.duplicates_on_resend > 0, "{}: resumed without re-sending its last acked batch ({})", d.id, d.describe());
        } else {
            assert_eq!(d.sessions, 1, "{}: its node lived, yet its session was lost ({})", d.id, d.describe());
        }
    }
    println!("kill: head {head}");
}

/// e. NATS is killed and restarted while a device on each node pushes: pushes are acked and
/// deltas keep arriving during the outage (by polling Postgres), every seq once and in order;
/// `synchub_cluster_nats_connected` goes 0 then 1 and `/readyz` stays 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_outage_slows_deliveries_but_loses_nothing() {
    let mut cluster = Cluster::start("nats-outage", 3).await;
    let seed = seed();
    let devices = fleet(&cluster.addrs(), 1, seed);
    let stop = Arc::new(AtomicBool::new(false));
    let (tasks, counters) = spawn_pushes(devices, usize::MAX, Duration::from_millis(30), Some(stop.clone()));
    wait_acked(&counters, 3 * 5, &cluster).await;

    tokio::task::block_in_place(|| cluster.nats.stop());
    for n in 1..=3 {
        cluster.wait_metric(n, "synchub_cluster_nats_connected", |v| v == 0.0, "disconnected from NATS").await;
    }
    let outage_from: Vec<(usize, usize)> = counters.iter().map(|c| (c.2.load(Ordering::Relaxed), c.3.load(Ordering::Relaxed))).collect();
    for n in 1..=3 {
        let (status, body) = cluster.readyz(n).await;
        assert_eq!(status, 200, "node-{n}'s /readyz during the NATS outage: {body}");
        assert!(body.contains("postgres: up") && body.contains("nats: down"), "node-{n}'s /readyz during the NATS outage: {body}");
    }
    // The outage lasts a while (about ten of the fallback polls' periods, at least).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let outage_to: Vec<(usize, usize)> = counters.iter().map(|c| (c.2.load(Ordering::Relaxed), c.3.load(Ordering::Relaxed))).collect();
    // What went wrong during the outage, reported at the end with the rest (so that one run
    // tells all).
    let mut failures = Vec::new();
    for n in 1..=3 {
        let polls = cluster.metric(n, "synchub_cluster_fallback_polls_total").await;
        if !polls.is_some_and(|p| p > 0.0) {
            failures.push(format!("node-{n} never polled the heads during the outage: synchub_cluster_fallback_polls_total = {polls:?}"));
        }
    }
    for ((c, from), to) in counters.iter().zip(&outage_from).zip(&outage_to) {
        if to.0 <= from.0 {
            failures.push(format!("{}: no push acked during the NATS outage ({} → {} batches)", c.0, from.0, to.0));
        }
        if to.1 <= from.1 {
            failures.push(format!("{}: no delta from another node during the NATS outage ({} → {} deltas)", c.0, from.1, to.1));
        }
    }
    for f in &failures {
        println!("nats outage: {f}");
    }

    tokio::task::block_in_place(|| cluster.nats.restart());
    for n in 1..=3 {
        cluster.wait_metric(n, "synchub_cluster_nats_connected", |v| v == 1.0, "reconnected to NATS").await;
        // The nodes took each other for dead during the outage (no heartbeats); they meet again.
        cluster.wait_metric(n, "synchub_cluster_nodes", |v| v == 3.0, "knowing all 3 nodes again").await;
        let (status, body) = cluster.readyz(n).await;
        assert!(status == 200 && body.contains("nats: up"), "node-{n}'s /readyz after the outage: {status} {body}");
    }
    // Messages cross over NATS again.
    let received: Vec<f64> = futures_util::future::join_all((1..=3).map(|n| cluster.metric(n, "synchub_cluster_received_total"))).await.into_iter().map(Option::unwrap_or_default).collect();
    let acked = total(&counters);
    wait_acked(&counters, acked + 3 * 5, &cluster).await;
    for n in 1..=3 {
        let before = received[n - 1];
        cluster.wait_metric(n, "synchub_cluster_received_total", |v| v > before, "receiving over NATS again").await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut devices = join(tasks, &cluster).await;
    let head = settle_and_check(&cluster, &mut devices).await;
    for d in &devices {
        assert_eq!(d.sessions, 1, "{}: the NATS outage cost it its session ({})", d.id, d.describe());
    }
    println!("nats outage: head {head}, during the outage {outage_from:?} → {outage_to:?} (acked batches, live deltas)");
    assert!(failures.is_empty(), "during the NATS outage ({}):\n{}", cluster.logs(), failures.join("\n"));
}

/// f. Node 3 is drained (SIGTERM) while two devices per node push: its devices are closed with
/// 1001, resume on node 1, and nothing is lost or doubled; the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_hands_its_devices_over() {
    let mut cluster = Cluster::start("drain", 3).await;
    let seed = seed();
    let devices = fleet(&cluster.addrs(), 2, seed);
    let (tasks, counters) = spawn_pushes(devices, 30, Duration::from_millis(15), None);
    wait_acked(&counters, 6 * 8, &cluster).await;
    cluster.nodes[2].terminate();
    let status = cluster.nodes[2].wait_exit(SETTLE).await;
    assert!(status.is_some_and(|s| s.success()), "node-3 after SIGTERM: {status:?}; its log:\n{}", cluster.nodes[2].tail());
    // It said it was leaving: the others need not wait for its heartbeats to time out.
    let limit = Duration::from_millis(NODE_TIMEOUT_MS);
    for n in 1..=2 {
        cluster.wait_metric_within(n, "synchub_cluster_nodes", |v| v == 2.0, "counting two nodes once node 3 left", limit).await;
    }
    let mut devices = join(tasks, &cluster).await;
    let head = settle_and_check(&cluster, &mut devices).await;
    for d in &devices {
        if d.home == 3 {
            assert_eq!(d.session_closes, BTreeMap::from([(1001, 1)]), "{}: its session on the drained node was not closed with 1001 ({})", d.id, d.describe());
            assert!(d.sessions >= 2, "{}: did not resume on another node ({})", d.id, d.describe());
        } else {
            assert_eq!(d.sessions, 1, "{}: its node was not drained, yet its session was lost ({})", d.id, d.describe());
        }
    }
    println!("drain: head {head}");
}

/// A stopping node's leaving message is the last the others hear from it on the nodes'
/// subject: a heartbeat queued before it, or sent while the node finishes stopping, would make
/// them count the node again. Heartbeats every few milliseconds keep one queued at any moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_node_sends_no_heartbeat_after_it_said_so() {
    use synchub::cluster::{subjects, Body, Cluster as Link, Envelope};
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cluster").join(format!("leaving-{}", &Uuid::new_v4().simple().to_string()[..8]));
    let nats = tokio::task::block_in_place(|| NatsServer::start(&dir));
    let listener = async_nats::connect(nats.url()).await.unwrap();
    let mut heard = listener.subscribe(subjects::nodes("synchub")).await.unwrap();
    listener.flush().await.unwrap();
    let heartbeat_ms = 2;
    let config = synchub::config::Config {
        nats_url: Some(nats.url()),
        node_id: Some("leaver".into()),
        cluster_heartbeat_ms: heartbeat_ms,
        cluster_node_timeout_ms: 100,
        ..Default::default()
    };
    let (link, _events) = Link::start(&config, Arc::new(synchub::metrics::Metrics::default())).await.unwrap();
    for _ in 0..20 {
        let message = tokio::time::timeout(SETTLE, heard.next()).await.ok().flatten().expect("the node's heartbeats before it leaves");
        assert_eq!(Envelope::decode(&message.payload).unwrap().body, Body::Heartbeat);
    }
    link.leave().await;
    // The node keeps running (as a stopping hub does while its server winds down): anything
    // it sent after saying it was leaving has arrived by now, in order.
    tokio::time::sleep(Duration::from_millis(100 * heartbeat_ms)).await;
    listener.flush().await.unwrap();
    let mut after_leaving = Vec::new();
    let mut said_leaving = false;
    // Bounded: a node that never stops sending would keep this loop going.
    let drained_by = Instant::now() + Duration::from_secs(2);
    while let Ok(Some(message)) = tokio::time::timeout_at(drained_by.into(), heard.next()).await {
        let body = Envelope::decode(&message.payload).unwrap().body;
        if said_leaving {
            after_leaving.push(body);
        } else {
            said_leaving = body == Body::Leaving;
        }
    }
    assert!(said_leaving, "the node never said it was leaving");
    assert!(after_leaving.is_empty(), "the node sent {} messages after saying it was leaving: {:?}", after_leaving.len(), &after_leaving[..after_leaving.len().min(3)]);
}
