//! RxDB clients in a Node process (tests/rxdb/driver.mjs), driven from a test over the
//! process's stdin and stdout, one JSON line per command and per answer. Commands may overlap:
//! `send` starts one and `answer` collects it later, so a test can act on the hub while a client
//! waits. An error answer, a driver that dies, or an answer that does not come panics with the
//! driver's message and the tail of its stderr.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::common::node;

/// The driver's own wait when a command names none (driver.mjs DEFAULT_TIMEOUT_MS).
pub const DRIVER_WAIT: Duration = Duration::from_secs(20);
/// How much longer than its own timeout a command's answer may take to come back.
const ANSWER_MARGIN: Duration = Duration::from_secs(15);
/// Starting node and loading RxDB.
const START_WAIT: Duration = Duration::from_secs(60);
const STDERR_TAIL_LINES: usize = 80;

fn npm_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/rxdb")
}

/// node and the pinned RxDB packages (tests/rxdb/package-lock.json), installed if missing.
pub fn ensure_installed() {
    node::ensure_node(20, "the RxDB replication tests");
    node::npm_ci(&npm_dir(), "the RxDB replication tests (rxdb, rxjs)");
}

pub struct RxDriver {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    next_id: u64,
    /// Answers read while waiting for another one.
    answers: HashMap<u64, Value>,
    /// Each command's own timeout, for the wait on its answer.
    waits: HashMap<u64, Duration>,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

/// A failed command: the driver's message.
#[derive(Debug)]
pub struct DriverError(pub String);

impl RxDriver {
    pub async fn start() -> RxDriver {
        ensure_installed();
        let mut child = tokio::process::Command::new("node")
            .arg(npm_dir().join("driver.mjs"))
            .current_dir(npm_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node starts tests/rxdb/driver.mjs");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let tail = stderr.clone();
        let mut errors = BufReader::new(child.stderr.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = errors.next_line().await {
                eprintln!("rxdb driver: {line}");
                let mut tail = tail.lock().unwrap();
                if tail.len() == STDERR_TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
        let mut driver = RxDriver { child, stdin, stdout, next_id: 0, answers: HashMap::new(), waits: HashMap::new(), stderr };
        let ready = tokio::time::timeout(START_WAIT, driver.next_message()).await;
        match ready {
            Ok(message) if message.get("ready") == Some(&json!(true)) => {}
            Ok(other) => driver.fail(&format!("the driver's first line is not ready: {other}")).await,
            Err(_) => driver.fail(&format!("the driver did not start within {START_WAIT:?}")).await,
        }
        let versions = driver.call(json!({"cmd": "ping"})).await;
        assert_eq!(versions["rxdb"], json!("17.6.0"), "tests/rxdb/package.json pins rxdb 17.6.0: {versions}");
        driver
    }

    /// Start a command; its answer is read by `answer` (or `try_answer`).
    pub async fn send(&mut self, mut command: Value) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        command["id"] = json!(id);
        let wait = command.get("timeoutMs").and_then(Value::as_u64).map(Duration::from_millis).unwrap_or(DRIVER_WAIT);
        self.waits.insert(id, wait);
        let mut line = command.to_string();
        line.push('\n');
        if let Err(e) = self.stdin.write_all(line.as_bytes()).await {
            self.fail(&format!("cannot send {command} to the driver: {e}")).await;
        }
        let _ = self.stdin.flush().await;
        id
    }

    /// The answer of command `id`: its result, or the driver's error message.
    pub async fn try_answer(&mut self, id: u64) -> Result<Value, DriverError> {
        let wait = self.waits.remove(&id).unwrap_or(DRIVER_WAIT) + ANSWER_MARGIN;
        let deadline = tokio::time::Instant::now() + wait;
        let answer = loop {
            if let Some(answer) = self.answers.remove(&id) {
                break answer;
            }
            let Ok(message) = tokio::time::timeout_at(deadline, self.next_message()).await else {
                self.fail(&format!("no answer to command {id} within {wait:?}")).await
            };
            match message.get("id").and_then(Value::as_u64) {
                Some(got) if got == id => break message,
                Some(got) => {
                    self.answers.insert(got, message);
                }
                None => self.fail(&format!("the driver answered without an id: {message}")).await,
            }
        };
        if answer["ok"] == json!(true) {
            Ok(answer["result"].clone())
        } else {
            Err(DriverError(answer["error"].as_str().unwrap_or("(no message)").to_owned()))
        }
    }

    /// The result of command `id`; panics with the driver's message when it failed.
    pub async fn answer(&mut self, id: u64) -> Value {
        match self.try_answer(id).await {
            Ok(result) => result,
            Err(DriverError(message)) => self.fail(&message).await,
        }
    }

    pub async fn call(&mut self, command: Value) -> Value {
        let id = self.send(command).await;
        self.answer(id).await
    }

    /// Next protocol line of the driver (other output is shown and skipped).
    async fn next_message(&mut self) -> Value {
        loop {
            match self.stdout.next_line().await {
                Ok(Some(line)) => match serde_json::from_str::<Value>(&line) {
                    Ok(message) if message.get("fatal").is_some() => {
                        self.fail(&format!("the driver crashed: {}", message["fatal"].as_str().unwrap_or_default())).await
                    }
                    Ok(message) if message.is_object() => return message,
                    _ => eprintln!("rxdb driver (stdout): {line}"),
                },
                Ok(None) | Err(_) => {
                    let status = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
                    self.fail(&format!("the driver exited ({status:?})")).await
                }
            }
        }
    }

    /// Panic with `message` and the tail of the driver's stderr.
    async fn fail(&mut self, message: &str) -> ! {
        // Let the last stderr lines arrive.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let tail: Vec<String> = self.stderr.lock().unwrap().iter().cloned().collect();
        panic!("RxDB driver: {message}\n--- driver stderr (last {} lines) ---\n{}", tail.len(), tail.join("\n"));
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
    pub async fn exit(mut self) {
        self.call(json!({"cmd": "exit"})).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
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
