//! The hub binary running `serve` in a process of its own (crash and restart tests, cluster
//! tests): started from a TOML configuration, its output copied to a log file, its address read
//! from the log, ready once `/readyz` answers 200; killed (SIGKILL) when dropped, or stopped with
//! SIGTERM to drain.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// Time a started hub has to report its address and pass `/readyz`.
pub const START_LIMIT: Duration = Duration::from_secs(120);

/// The hub binary running `serve`; killed (SIGKILL) when dropped.
pub struct HubProcess {
    pub child: Child,
    pub addr: SocketAddr,
    /// The file its standard output and error are copied to.
    pub log: PathBuf,
}

impl HubProcess {
    /// Start the hub, read the address it bound from its log, and wait for `/readyz`.
    /// Returns it and the time from spawning it to ready.
    pub async fn start(config: &Path, log: &Path) -> (HubProcess, Duration) {
        Self::start_with(config, log, &[], &[]).await
    }

    /// `start`, with more arguments after `serve` (e.g. `--nats URL`) and more environment
    /// variables (e.g. `SYNCHUB_NODE_ID`).
    pub async fn start_with(config: &Path, log: &Path, serve_args: &[&str], envs: &[(&str, &str)]) -> (HubProcess, Duration) {
        let started = Instant::now();
        let mut command = Command::new(env!("CARGO_BIN_EXE_synchub"));
        command
            .arg("--config")
            .arg(config)
            .arg("serve")
            .args(serve_args)
            .env("RUST_LOG", "info,sqlx=warn")
            .env("NO_COLOR", "1")
            .env_remove("DATABASE_URL")
            .env_remove("SYNCHUB_CONFIG")
            .env_remove("SYNCHUB_NATS_URL")
            .env_remove("SYNCHUB_NODE_ID");
        for (name, value) in envs {
            command.env(name, value);
        }
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true).spawn().expect("the hub binary starts");
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        let file = tokio::fs::File::create(log).await.unwrap();
        let file = std::sync::Arc::new(tokio::sync::Mutex::new(file));
        tokio::spawn(copy_log(child.stdout.take().unwrap(), file.clone(), Some(addr_tx)));
        tokio::spawn(copy_log(child.stderr.take().unwrap(), file, None));
        let addr = match tokio::time::timeout(START_LIMIT, addr_rx).await {
            Ok(Ok(addr)) => addr,
            _ => {
                // It exited, most likely: let its last lines reach the log first.
                let exit = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                panic!("the hub did not report its address; exit {exit:?}; log {}:\n{}", log.display(), tail(log))
            }
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + START_LIMIT;
        loop {
            let ready = http.get(format!("http://{addr}/readyz")).timeout(Duration::from_secs(5)).send().await;
            if matches!(&ready, Ok(r) if r.status() == 200) {
                break;
            }
            assert!(Instant::now() < deadline, "the hub at {addr} never became ready; log {}:\n{}", log.display(), tail(log));
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the hub exited ({status}) before it was ready; log {}:\n{}", log.display(), tail(log));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (HubProcess { child, addr, log: log.to_path_buf() }, started.elapsed())
    }

    /// SIGKILL, and wait until the process is gone.
    pub async fn kill(&mut self) {
        self.child.start_kill().expect("SIGKILL the hub");
        let _ = self.child.wait().await;
    }

    /// SIGTERM: the hub drains and exits by itself (see `wait_exit`).
    pub fn terminate(&self) {
        let pid = self.child.id().expect("the hub is running") as libc::pid_t;
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "SIGTERM to the hub (pid {pid})");
    }

    /// The exit status, once the process exits within `limit`; None if it is still running.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(limit, self.child.wait()).await.ok().map(|r| r.expect("waiting for the hub"))
    }

    /// The last lines of its log.
    pub fn tail(&self) -> String {
        tail(&self.log)
    }
}

/// Copy the hub's output to its log file; pass the address of the "listening" line to `addr`.
async fn copy_log(
    out: impl tokio::io::AsyncRead + Unpin,
    file: std::sync::Arc<tokio::sync::Mutex<tokio::fs::File>>,
    mut addr: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) {
    let mut lines = BufReader::new(out).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.contains("synchub listening") {
            if let Some(found) = listening_addr(&line) {
                if let Some(tx) = addr.take() {
                    let _ = tx.send(found);
                }
            }
        }
        let mut f = file.lock().await;
        let _ = f.write_all(line.as_bytes()).await;
        let _ = f.write_all(b"\n").await;
        let _ = f.flush().await;
    }
}

/// `addr=127.0.0.1:PORT` in a log line, colours or not.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let plain: String = {
        let mut out = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                // skip an ANSI escape: ESC [ … letter
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    };
    let rest = &plain[plain.find("addr=")? + "addr=".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

pub fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
