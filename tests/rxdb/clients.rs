//! RxDB clients in a Node process (tests/rxdb/driver.mjs), driven from a test over the
//! process's stdin and stdout, one JSON line per command and per answer (tests/common/driver.rs).
//! Commands may overlap: `send` starts one and `answer` collects it later, so a test can act on
//! the hub while a client waits. An error answer, a driver that dies, or an answer that does not
//! come panics with the driver's message and the tail of its stderr.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::driver::NodeDriver;
use crate::common::node;

fn npm_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/rxdb")
}

/// node and the pinned RxDB packages (tests/rxdb/package-lock.json), installed if missing.
pub fn ensure_installed() {
    node::ensure_node(20, "the RxDB replication tests");
    node::npm_ci(&npm_dir(), "the RxDB replication tests (rxdb, rxjs)");
}

/// The driver process (the JSON-line plumbing is tests/common/driver.rs).
pub struct RxDriver {
    node: NodeDriver,
}

impl RxDriver {
    pub async fn start() -> RxDriver {
        ensure_installed();
        let mut node = NodeDriver::start("RxDB", &npm_dir(), "driver.mjs").await;
        let versions = node.call(json!({"cmd": "ping"})).await;
        assert_eq!(versions["rxdb"], json!("17.6.0"), "tests/rxdb/package.json pins rxdb 17.6.0: {versions}");
        RxDriver { node }
    }

    /// Start a command; its answer is read by `answer`.
    pub async fn send(&mut self, command: Value) -> u64 {
        self.node.send(command).await
    }

    /// The result of command `id`; panics with the driver's message when it failed.
    pub async fn answer(&mut self, id: u64) -> Value {
        self.node.answer(id).await
    }

    pub async fn call(&mut self, command: Value) -> Value {
        self.node.call(command).await
    }

    // ---- clients ----

    /// A client (RxDB database, memory storage + ajv, dev-mode) with one collection, not yet
    /// replicating: what it writes stays local until `replicate`.
    pub async fn create(&mut self, client: &str, collection: &str) {
        self.call(json!({"cmd": "create", "client": client, "collection": collection})).await;
    }

    /// `replicateWithWebsocketServer` with the token in the `auth` headers; waits for the
    /// initial replication.
    pub async fn replicate(&mut self, client: &str, url: &str, token: &str, batch_size: Option<u32>) {
        let mut command = json!({"cmd": "replicate", "client": client, "url": url, "token": token});
        if let Some(n) = batch_size {
            command["batchSize"] = json!(n);
        }
        self.call(command).await;
    }

    /// A client of `collection` that replicates from now on.
    pub async fn connected(&mut self, client: &str, collection: &str, url: &str, token: &str) {
        self.create(client, collection).await;
        self.replicate(client, url, token, None).await;
    }

    pub async fn insert(&mut self, client: &str, docs: &[Value]) {
        self.call(json!({"cmd": "insert", "client": client, "docs": docs})).await;
    }

    /// Each document in a write of its own, all started at once.
    pub async fn insert_one_by_one(&mut self, client: &str, docs: &[Value]) -> u64 {
        self.send(json!({"cmd": "insert", "client": client, "docs": docs, "oneByOne": true, "timeoutMs": 40_000})).await
    }

    /// `incrementalPatch(set)` on each document of `ids`.
    pub async fn patch(&mut self, client: &str, ids: &[&str], set: Value) {
        self.call(json!({"cmd": "patch", "client": client, "ids": ids, "set": set})).await;
    }

    pub async fn remove(&mut self, client: &str, ids: &[&str]) {
        self.call(json!({"cmd": "remove", "client": client, "ids": ids})).await;
    }

    /// The client's documents sorted by id, without RxDB's meta fields.
    pub async fn dump(&mut self, client: &str) -> Vec<Value> {
        array(self.call(json!({"cmd": "dump", "client": client})).await)
    }

    pub async fn await_in_sync(&mut self, client: &str) {
        self.call(json!({"cmd": "awaitInSync", "client": client})).await;
    }

    /// Wait until the client's document `id` holds the fields of `expect`; returns it.
    pub async fn await_doc(&mut self, client: &str, id: &str, expect: Value) -> Value {
        self.call(json!({"cmd": "awaitDoc", "client": client, "docId": id, "expect": expect})).await
    }

    /// Wait until the client has no document `id`.
    pub async fn await_gone(&mut self, client: &str, id: &str) {
        self.call(json!({"cmd": "awaitDoc", "client": client, "docId": id, "expect": null})).await;
    }

    /// Wait until all `clients` are in sync and hold the same `count` documents; returns them.
    pub async fn await_equal(&mut self, clients: &[&str], count: usize, wait: Duration) -> Vec<Value> {
        array(self.call(json!({"cmd": "awaitEqual", "clients": clients, "count": count, "timeoutMs": wait.as_millis() as u64})).await)
    }

    pub async fn pause(&mut self, client: &str) {
        self.call(json!({"cmd": "pause", "client": client})).await;
    }

    pub async fn resume(&mut self, client: &str) {
        self.call(json!({"cmd": "resume", "client": client})).await;
    }

    /// conflict$ events: `{newDocumentState, assumedMasterState, realMasterState, output}`.
    pub async fn conflicts(&mut self, client: &str) -> Vec<Value> {
        array(self.call(json!({"cmd": "conflicts", "client": client})).await)
    }

    pub async fn await_conflicts(&mut self, client: &str, count: usize) -> Vec<Value> {
        array(self.call(json!({"cmd": "awaitConflicts", "client": client, "count": count})).await)
    }

    /// Frames of the client's sockets (summaries: method, batch size, documents, checkpoint).
    pub async fn wire(&mut self, client: &str) -> Vec<Value> {
        array(self.call(json!({"cmd": "wire", "client": client})).await["frames"].take())
    }

    /// Fails the test when the client's error$ emitted anything but errors of codes `allowed`.
    pub async fn assert_no_errors(&mut self, client: &str, allowed: &[&str]) {
        let errors = array(self.call(json!({"cmd": "errors", "client": client})).await);
        let unexpected: Vec<&Value> = errors.iter().filter(|e| !allowed.iter().any(|code| e["code"] == json!(code))).collect();
        assert!(unexpected.is_empty(), "client {client}'s error$ emitted: {unexpected:#?}");
    }

    /// `new Date().toISOString()` in the driver.
    pub async fn now_iso(&mut self) -> String {
        self.call(json!({"cmd": "now"})).await.as_str().expect("a string").to_owned()
    }

    /// Close every client and end the process.
    pub async fn exit(self) {
        self.node.exit().await;
    }

    // ---- raw sockets (the `ws` package, no RxDB) ----

    pub async fn raw_open(&mut self, name: &str, url: &str) {
        self.call(json!({"cmd": "raw.open", "name": name, "url": url})).await;
    }

    pub async fn raw_send(&mut self, name: &str, message: Value) {
        self.call(json!({"cmd": "raw.send", "name": name, "message": message})).await;
    }

    /// The next message whose id is `id`.
    pub async fn raw_next(&mut self, name: &str, id: &str) -> Value {
        self.call(json!({"cmd": "raw.next", "name": name, "messageId": id})).await
    }

    /// What arrived within `ms`: `{messages, closed}`.
    pub async fn raw_quiet(&mut self, name: &str, ms: u64) -> Value {
        self.call(json!({"cmd": "raw.quiet", "name": name, "ms": ms})).await
    }

    /// Wait for the hub to close the socket: `{code, reason, messages}`.
    pub async fn raw_await_close(&mut self, name: &str) -> Value {
        self.call(json!({"cmd": "raw.awaitClose", "name": name})).await
    }
}

fn array(value: Value) -> Vec<Value> {
    match value {
        Value::Array(items) => items,
        other => panic!("expected an array from the driver, got {other}"),
    }
}
