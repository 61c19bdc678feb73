//! A Node.js driver process driven from a test over its stdin and stdout, one JSON line per
//! command and per answer (the protocol of tests/supabase/driver.mjs and tests/rxdb/driver.mjs):
//! the script prints `{"ready": true}` first, then answers each `{"id": n, "cmd": ...}` with
//! `{"id": n, "ok": true, "result": ...}` or `{"id": n, "ok": false, "error": "..."}`; a line
//! `{"fatal": "..."}` means it crashed. Commands may overlap: `send` starts one and `answer`
//! collects it later, so a test can act on the hub while a client waits. An error answer, a
//! driver that dies, or an answer that does not come panics with the driver's message and the
//! tail of its stderr.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// The driver's own wait when a command names none (DEFAULT_TIMEOUT_MS of the scripts).
pub const DRIVER_WAIT: Duration = Duration::from_secs(20);
/// How much longer than its own timeout a command's answer may take to come back.
const ANSWER_MARGIN: Duration = Duration::from_secs(15);
/// Starting node and loading the libraries.
const START_WAIT: Duration = Duration::from_secs(60);
const STDERR_TAIL_LINES: usize = 80;

pub struct NodeDriver {
    /// Shown in messages (`supabase driver: ...`).
    name: &'static str,
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

impl NodeDriver {
    /// Start `node <dir>/<script>` in `dir` and wait for its `ready` line.
    pub async fn start(name: &'static str, dir: &Path, script: &str) -> NodeDriver {
        let script: PathBuf = dir.join(script);
        let mut child = tokio::process::Command::new("node")
            .arg(&script)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("node starts {}: {e}", script.display()));
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let tail = stderr.clone();
        let mut errors = BufReader::new(child.stderr.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = errors.next_line().await {
                eprintln!("{name} driver: {line}");
                let mut tail = tail.lock().unwrap();
                if tail.len() == STDERR_TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
        let mut driver = NodeDriver { name, child, stdin, stdout, next_id: 0, answers: HashMap::new(), waits: HashMap::new(), stderr };
        let ready = tokio::time::timeout(START_WAIT, driver.next_message()).await;
        match ready {
            Ok(message) if message.get("ready") == Some(&json!(true)) => {}
            Ok(other) => driver.fail(&format!("the driver's first line is not ready: {other}")).await,
            Err(_) => driver.fail(&format!("the driver did not start within {START_WAIT:?}")).await,
        }
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

    /// A command that may fail: its result or the driver's message.
    pub async fn try_call(&mut self, command: Value) -> Result<Value, DriverError> {
        let id = self.send(command).await;
        self.try_answer(id).await
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
                    _ => eprintln!("{} driver (stdout): {line}", self.name),
                },
                Ok(None) | Err(_) => {
                    let status = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
                    self.fail(&format!("the driver exited ({status:?})")).await
                }
            }
        }
    }

    /// Panic with `message` and the tail of the driver's stderr.
    pub async fn fail(&mut self, message: &str) -> ! {
        // Let the last stderr lines arrive.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let tail: Vec<String> = self.stderr.lock().unwrap().iter().cloned().collect();
        panic!("{} driver: {message}\n--- driver stderr (last {} lines) ---\n{}", self.name, tail.len(), tail.join("\n"));
    }

    /// Send `exit` and wait for the process to end.
    pub async fn exit(mut self) {
        self.call(json!({"cmd": "exit"})).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}
