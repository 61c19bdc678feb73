//! Test harness: a private Postgres cluster per test process, a fresh database per test, a hub
//! on port 0, and a WebSocket client that speaks the protocol crate's codec.
#![allow(dead_code)]

pub mod browser;
pub mod driver;
pub mod hub_process;
pub mod nats;
pub mod node;

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use protocol::{Change, ClientFrame, Encoding, Hlc, Object, Op, Position, ServerFrame};
use serde_json::{json, Value};
use synchub::config::{Config, Secret};
use synchub::embedded_pg::{ClusterOptions, PgCluster};
use synchub::server::RunningHub;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

pub const SECRET: &str = "test-secret";
pub const WAIT: Duration = Duration::from_secs(15);

static CLUSTER: OnceLock<PgCluster> = OnceLock::new();

/// The process's private cluster (started on first use, stopped by its watchdog at exit).
pub fn cluster() -> &'static PgCluster {
    CLUSTER.get_or_init(|| {
        std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let dir = std::env::temp_dir().join(format!("synchub-test-{}", Uuid::new_v4().simple()));
            rt.block_on(PgCluster::start(ClusterOptions { data_dir: dir, ephemeral: true })).expect("test cluster starts")
        })
        .join()
        .unwrap()
    })
}

/// A fresh database with the demo schema; returns its URL.
pub async fn fresh_database() -> String {
    let admin = sqlx::PgPool::connect(&cluster().database_url("postgres")).await.unwrap();
    let name = format!("t_{}", Uuid::new_v4().simple());
    sqlx::query(&format!("create database {name}")).execute(&admin).await.unwrap();
    admin.close().await;
    let url = cluster().database_url(&name);
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    synchub::demo::install_schema(&pool).await.unwrap();
    pool.close().await;
    url
}

pub fn test_config(database_url: String) -> Config {
    Config {
        listen: "127.0.0.1:0".into(),
        database_url: Secret(database_url),
        db_pool_size: 8,
        workers: 2,
        jwt_hs256_secret: Secret(SECRET.into()),
        tables: synchub::demo::tables(),
        ..Config::default()
    }
}

pub struct TestHub {
    pub running: Option<RunningHub>,
    pub addr: SocketAddr,
    pub db: sqlx::PgPool,
    pub database_url: String,
}

impl TestHub {
    pub async fn start() -> TestHub {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestHub {
        Self::start_on(fresh_database().await, adjust).await
    }

    /// A hub on a database the test prepared (e.g. with tables of its own).
    pub async fn start_on(url: String, adjust: impl FnOnce(&mut Config)) -> TestHub {
        if std::env::var_os("TEST_LOG").is_some() {
            synchub::telemetry::init();
        }
        let mut config = test_config(url.clone());
        adjust(&mut config);
        let running = synchub::server::start(config).await.expect("hub starts");
        let db = sqlx::PgPool::connect(&url).await.unwrap();
        TestHub { addr: running.addr, running: Some(running), db, database_url: url }
    }

    /// A hub on a new database holding `schema`, syncing `tables` (tenant column `tenant_id`,
    /// last writer wins per field).
    pub async fn start_with_schema(schema: &str, tables: &[&str]) -> TestHub {
        let url = fresh_database().await;
        let db = sqlx::PgPool::connect(&url).await.unwrap();
        sqlx::raw_sql(schema).execute(&db).await.unwrap();
        db.close().await;
        TestHub::start_on(url, |config| {
            for name in tables {
                config.tables.push(synchub::config::TableConfig {
                    name: name.to_string(),
                    tenant_column: "tenant_id".into(),
                    policy: synchub::config::MergePolicy::Lww,
                    ..Default::default()
                });
            }
        })
        .await
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.addr, Encoding::Json).await
    }

    /// Stop the hub gracefully, keeping its address and database for `start_again`.
    pub async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }

    /// Start a stopped hub again on the same address and database, configured by `adjust`
    /// (clients reconnect to the URL they had).
    pub async fn start_again(&mut self, adjust: impl FnOnce(&mut Config)) {
        assert!(self.running.is_none(), "start_again: the hub is running; stop it first");
        let mut config = test_config(self.database_url.clone());
        adjust(&mut config);
        config.listen = self.addr.to_string();
        // The old listener's port may take a moment to be free again.
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match synchub::server::start(config.clone()).await {
                Ok(running) => {
                    self.running = Some(running);
                    return;
                }
                Err(err) if tokio::time::Instant::now() < deadline => {
                    eprintln!("start_again: {err}; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(err) => panic!("the hub does not start again on {}: {err}", self.addr),
            }
        }
    }

    pub async fn shutdown(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }
}

pub fn token(tenant: &str, user: &str, role: &str, device: Option<&str>) -> String {
    let mut claims = json!({"sub": user, "role": role, "tenant_id": tenant, "exp": synchub::auth::unix_now() + 3600});
    if let Some(d) = device {
        claims["device_id"] = json!(d);
    }
    synchub::auth::mint_hs256(SECRET, &claims)
}

pub fn obj(v: Value) -> Object {
    v.as_object().expect("object").clone()
}

pub fn upsert(table: &str, key: Value, fields: Value, device_seq: u64, wall_ms: u64, base_version: u64) -> Change {
    Change {
        change_id: Uuid::now_v7(),
        device_seq,
        table: table.into(),
        op: Op::Upsert,
        key: obj(key),
        fields: obj(fields),
        hlc: Hlc { wall_ms, counter: 0 },
        base_version,
    }
}

pub fn delete(table: &str, key: Value, device_seq: u64, wall_ms: u64, base_version: u64) -> Change {
    Change { op: Op::Delete, fields: Object::new(), ..upsert(table, key, json!({}), device_seq, wall_ms, base_version) }
}

/// A product row for the demo schema.
pub fn product(id: Uuid, name: &str, price: i64) -> Value {
    json!({"sku": format!("SKU-{}", &id.simple().to_string()[..6]), "name": name, "price_cents": price})
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Client {
    pub ws: Ws,
    pub encoding: Encoding,
    next_id: u64,
    /// Frames received but not yet consumed by an expectation.
    pub inbox: std::collections::VecDeque<ServerFrame>,
    pub closed: Option<(u16, String)>,
}

impl Client {
    pub async fn connect(addr: SocketAddr, encoding: Encoding) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws")).await.expect("websocket connects");
        Client { ws, encoding, next_id: 1, inbox: Default::default(), closed: None }
    }

    /// Open a socket whose upgrade request carries `headers` and the query string `query`
    /// (empty for none); the hub's refusal comes back as the error.
    pub async fn connect_with(addr: SocketAddr, headers: &[(&str, &str)], query: &str) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = format!("ws://{addr}/v1/ws{query}").into_client_request()?;
        for (name, value) in headers {
            let name = tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap();
            request.headers_mut().insert(name, value.parse().unwrap());
        }
        let (ws, _) = tokio_tungstenite::connect_async(request).await?;
        Ok(Client { ws, encoding: Encoding::Json, next_id: 1, inbox: Default::default(), closed: None })
    }

    pub fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub async fn send(&mut self, frame: &ClientFrame) {
        let bytes = protocol::codec::encode_client(self.encoding, frame);
        let msg = match self.encoding {
            Encoding::Json => Message::Text(String::from_utf8(bytes).unwrap()),
            Encoding::MsgPack => Message::Binary(bytes),
        };
        self.ws.send(msg).await.expect("send");
    }

    pub async fn send_raw(&mut self, msg: Message) {
        self.ws.send(msg).await.expect("send raw");
    }

    /// Next frame from the hub; `None` when the socket closed (see `closed`) or on timeout.
    pub async fn recv_timeout(&mut self, wait: Duration) -> Option<ServerFrame> {
        if let Some(f) = self.inbox.pop_front() {
            return Some(f);
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next()).await.ok()??;
            match msg {
                Ok(Message::Text(t)) => return Some(protocol::codec::decode_server(Encoding::Json, t.as_bytes()).expect("valid JSON frame")),
                Ok(Message::Binary(b)) => return Some(protocol::codec::decode_server(Encoding::MsgPack, &b).expect("valid MsgPack frame")),
                Ok(Message::Close(reason)) => {
                    self.closed = Some(reason.map(|r| (u16::from(r.code), r.reason.to_string())).unwrap_or((1005, String::new())));
                    return None;
                }
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    pub async fn recv(&mut self) -> ServerFrame {
        self.recv_timeout(WAIT).await.unwrap_or_else(|| panic!("no frame within {WAIT:?}; closed: {:?}", self.closed))
    }

    /// Receive until `pick` returns Some; other frames are kept in the inbox for later.
    pub async fn expect<T>(&mut self, mut pick: impl FnMut(&ServerFrame) -> Option<T>) -> T {
        let mut skipped = Vec::new();
        let found = loop {
            let frame = self.recv().await;
            if let Some(t) = pick(&frame) {
                break t;
            }
            skipped.push(frame);
        };
        for f in skipped.into_iter().rev() {
            self.inbox.push_front(f);
        }
        found
    }

    /// Wait for the socket to close; returns the close code.
    pub async fn expect_close(&mut self) -> u16 {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.closed.is_none() && tokio::time::Instant::now() < deadline {
            if self.recv_timeout(deadline - tokio::time::Instant::now()).await.is_none() && self.closed.is_none() {
                break;
            }
        }
        self.closed.as_ref().map(|c| c.0).expect("socket closed with a code")
    }

    /// `hello`, returning the `welcome` frame's (epoch, head_seq).
    pub async fn hello(&mut self, token: &str, device: Option<&str>, position: Option<Position>) -> (String, u64) {
        let id = self.next_id();
        self.send(&ClientFrame::Hello { mode: Default::default(), id, versions: vec![1], token: token.into(), device_id: device.map(Into::into), position }).await;
        match self.recv().await {
            ServerFrame::Welcome { id: got, epoch, head_seq, .. } => {
                assert_eq!(got, id);
                (epoch, head_seq)
            }
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    /// Drain catch-up until `up_to_date`; returns every delta seen and the final seq. Other
    /// frames are kept in the inbox for later (set aside meanwhile: `recv` takes from the inbox
    /// first, so putting them back at once would spin on them, e.g. on a `must_resync`).
    pub async fn until_up_to_date(&mut self) -> (Vec<protocol::Delta>, u64) {
        let mut deltas = Vec::new();
        let mut others = Vec::new();
        let seq = loop {
            match self.recv().await {
                ServerFrame::CatchUp { deltas: page, .. } => deltas.extend(page),
                ServerFrame::UpToDate { seq } => break seq,
                other => others.push(other),
            }
        };
        for frame in others.into_iter().rev() {
            self.inbox.push_front(frame);
        }
        (deltas, seq)
    }

    /// A device that connects and is live: hello + catch-up. Returns its position.
    pub async fn device(hub: &TestHub, tenant: &str, device: &str) -> (Client, String, u64) {
        let mut c = hub.client().await;
        let (epoch, _) = c.hello(&token(tenant, &format!("user-{device}"), "Employee", Some(device)), None, None).await;
        let (_, seq) = c.until_up_to_date().await;
        (c, epoch, seq)
    }

    /// A read-only dashboard session: hello in dashboard mode; returns the welcome's head seq.
    pub async fn dashboard(hub: &TestHub, tenant: &str, user: &str, role: &str) -> (Client, u64) {
        let mut c = hub.client().await;
        let id = c.next_id();
        let token = token(tenant, user, role, None);
        c.send(&ClientFrame::Hello { mode: protocol::SessionMode::Dashboard, id, versions: vec![1], token, device_id: None, position: None })
            .await;
        match c.recv().await {
            ServerFrame::Welcome { head_seq, .. } => (c, head_seq),
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    /// Send `subscribe` and return its request id (the reply is read separately).
    pub async fn send_subscribe(&mut self, sub: &str, table: Option<&str>, filter: Vec<protocol::Condition>, snapshot: bool, channel: Option<protocol::Channel>) -> u64 {
        let id = self.next_id();
        self.send(&ClientFrame::Subscribe { id, sub: sub.into(), table: table.map(Into::into), filter, snapshot, channel }).await;
        id
    }

    /// Subscribe to a table and read the reply and the snapshot: (subscribed seq, snapshot rows).
    pub async fn subscribe_table(&mut self, sub: &str, table: &str, filter: Vec<protocol::Condition>, snapshot: bool) -> (u64, Vec<protocol::SnapshotRow>) {
        let id = self.send_subscribe(sub, Some(table), filter, snapshot, None).await;
        let seq = self
            .expect(|f| match f {
                ServerFrame::Subscribed { id: got, seq, .. } if *got == id => Some(*seq),
                ServerFrame::Error { id: Some(got), code, message, .. } if *got == id => panic!("subscribe refused: {code:?} {message}"),
                _ => None,
            })
            .await;
        let mut rows = Vec::new();
        if snapshot {
            loop {
                let (page, last) = self
                    .expect(|f| match f {
                        ServerFrame::SubRows { sub: s, rows, last, seq: at } if s == sub => {
                            assert_eq!(*at, seq, "every page is read at the subscribed seq");
                            Some((rows.clone(), *last))
                        }
                        _ => None,
                    })
                    .await;
                rows.extend(page);
                if last {
                    break;
                }
            }
        }
        (seq, rows)
    }

    /// The error answering request `id`.
    pub async fn expect_error(&mut self, id: u64) -> protocol::ErrorCode {
        self.expect(|f| match f {
            ServerFrame::Error { id: Some(got), code, .. } if *got == id => Some(*code),
            _ => None,
        })
        .await
    }

    /// Next `sub_delta` of subscription `sub`: (deltas, seq).
    pub async fn next_sub_delta(&mut self, sub: &str) -> (Vec<protocol::Delta>, u64) {
        self.expect(|f| match f {
            ServerFrame::SubDelta { sub: s, deltas, seq } if s == sub => Some((deltas.clone(), *seq)),
            _ => None,
        })
        .await
    }

    pub async fn push(&mut self, changes: Vec<Change>) -> Vec<protocol::ChangeResult> {
        let id = self.next_id();
        let batch_id = Uuid::now_v7();
        self.send(&ClientFrame::Push { id, batch_id, changes }).await;
        self.expect(|f| match f {
            ServerFrame::Ack { id: got, results, .. } if *got == id => Some(results.clone()),
            ServerFrame::Error { id: Some(got), code, message, .. } if *got == id => panic!("push refused: {code:?} {message}"),
            _ => None,
        })
        .await
    }

    /// Next live delta frame's deltas.
    pub async fn next_deltas(&mut self) -> (Vec<protocol::Delta>, u64) {
        self.expect(|f| match f {
            ServerFrame::Delta { deltas, seq } => Some((deltas.clone(), *seq)),
            _ => None,
        })
        .await
    }
}

/// The cluster's postmaster and every process it forked (backends, background workers).
pub fn cluster_processes() -> Vec<u32> {
    let pid_file = cluster().cluster_dir().join("postmaster.pid");
    let postmaster: u32 = std::fs::read_to_string(pid_file).expect("postmaster.pid").lines().next().unwrap().trim().parse().unwrap();
    let mut pids = vec![postmaster];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // "pid (comm) state ppid ...": the parent is the second field after the name.
        let ppid = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(postmaster) {
            pids.push(pid);
        }
    }
    pids
}

pub fn signal_cluster(sig: &str) {
    let pids: Vec<String> = cluster_processes().iter().map(u32::to_string).collect();
    let status = std::process::Command::new("kill").arg(format!("-{sig}")).args(&pids).status().expect("kill");
    assert!(status.success(), "kill -{sig} {pids:?}");
}

/// Thaws the cluster when dropped, even by a failing assertion.
pub struct Frozen;

impl Frozen {
    pub fn freeze() -> Frozen {
        signal_cluster("STOP");
        Frozen
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal_cluster("CONT");
    }
}

/// A hub on a thread of its own, in an actix system of its own, for tests whose body is not
/// async (a proptest runner driving sessions from a runtime of its own). Dropped, it shuts the
/// hub down and joins the thread.
pub struct HubThread {
    pub addr: SocketAddr,
    pub database_url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HubThread {
    pub fn start(adjust: impl FnOnce(&mut Config) + Send + 'static) -> HubThread {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let hub = TestHub::start_with(adjust).await;
                let _ = ready_tx.send((hub.addr, hub.database_url.clone()));
                let _ = stop_rx.await;
                hub.shutdown().await;
            })
        });
        let (addr, database_url) = ready_rx.recv().expect("hub starts on its thread");
        HubThread { addr, database_url, stop: Some(stop_tx), thread: Some(thread) }
    }
}

impl Drop for HubThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The HTTP API of a test hub: each call answers its status and JSON body (null when none).
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn of(hub: &TestHub) -> Api {
        Api { base: format!("http://{}", hub.addr), http: reqwest::Client::new() }
    }

    pub async fn send(&self, request: reqwest::RequestBuilder, token: Option<&str>) -> (u16, Value) {
        let request = match token {
            Some(t) => request.bearer_auth(t),
            None => request,
        };
        let response = request.send().await.expect("HTTP request");
        let status = response.status().as_u16();
        let body = response.json::<Value>().await.unwrap_or(Value::Null);
        (status, body)
    }

    pub async fn get(&self, path: &str, token: Option<&str>, query: &[(&str, &str)]) -> (u16, Value) {
        self.send(self.http.get(format!("{}{path}", self.base)).query(query), token).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> (u16, Value) {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body), token).await
    }
}
