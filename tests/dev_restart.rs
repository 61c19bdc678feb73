//! `synchub dev` killed with SIGKILL and started again at any moment afterwards ends with a hub
//! that serves (ready, and a push is acked) and keeps serving once the dead hub's watchdog has
//! had its turn; a second hub on a data folder whose owner is alive refuses to start, naming it.
//! Spawns the real binary with its own data folder and port.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use protocol::{ChangeStatus, Encoding};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};
use uuid::Uuid;

/// Generous bound for a start (initdb, Postgres start or adoption, migrations).
const START_WAIT: Duration = Duration::from_secs(120);
/// Longer than the dead hub's watchdog takes to notice and act: the restarted hub must still
/// serve after it.
const SETTLE: Duration = Duration::from_secs(3);

struct DevHub {
    child: Child,
    addr: SocketAddr,
}

fn dev_command(data_dir: &Path, log: &Path) -> Command {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_synchub"));
    cmd.arg("dev")
        .arg("--data-dir")
        .arg(data_dir)
        .env("SYNCHUB_LISTEN", "127.0.0.1:0")
        .env("SYNCHUB_WORKERS", "1")
        .env("SYNCHUB_DB_POOL_SIZE", "4")
        .env_remove("DATABASE_URL")
        .env_remove("SYNCHUB_CONFIG")
        .env_remove("SYNCHUB_DATABASE_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        // A failed test leaves no hub behind (its watchdog then stops the cluster).
        .kill_on_drop(true);
    cmd
}

/// Start `synchub dev` and wait for its ready line; Err(exit status) if it exits first. Its
/// output (logs included) is copied to `log` as long as it runs, so that it never blocks on a
/// full pipe.
async fn start(data_dir: &Path, log: &Path) -> Result<DevHub, std::process::ExitStatus> {
    let mut child = dev_command(data_dir, log).spawn().expect("spawn synchub dev");
    let stdout = child.stdout.take().expect("stdout");
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(copy_output(stdout, log.to_path_buf(), ready_tx));
    let ready = tokio::time::timeout(START_WAIT, ready_rx)
        .await
        .unwrap_or_else(|_| panic!("synchub dev neither got ready nor exited within {START_WAIT:?}; log:\n{}", tail(log)));
    match ready {
        Ok(addr) => Ok(DevHub { child, addr }),
        Err(_) => Err(child.wait().await.expect("wait for synchub dev")),
    }
}

/// Append the hub's stdout to `log`; the address of its ready line goes to `ready`.
async fn copy_output(stdout: ChildStdout, log: PathBuf, ready: tokio::sync::oneshot::Sender<SocketAddr>) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
    let mut lines = BufReader::new(stdout).lines();
    let mut ready = Some(ready);
    while let Ok(Some(line)) = lines.next_line().await {
        let _ = writeln!(file, "{line}");
        if let Some(addr) = line.split("synchub dev is ready: ws://").nth(1).and_then(|rest| rest.split("/v1/ws").next()) {
            if let (Some(tx), Ok(addr)) = (ready.take(), addr.parse()) {
                let _ = tx.send(addr);
            }
        }
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

async fn readyz(addr: SocketAddr) -> Option<u16> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    Some(client.get(format!("http://{addr}/readyz")).send().await.ok()?.status().as_u16())
}

/// Ready, and a device's push of a new row is acked `applied`.
async fn assert_serving(hub: &DevHub, data_dir: &Path, device: &str, log: &Path) {
    let status = readyz(hub.addr).await;
    assert_eq!(status, Some(200), "/readyz of the restarted hub; log:\n{}", tail(log));
    let secret = std::fs::read_to_string(data_dir.join("dev-jwt-secret")).expect("dev secret");
    let claims = json!({"sub": "restart-test", "role": "Employee", "tenant_id": synchub::demo::DEMO_TENANT,
                        "device_id": device, "exp": synchub::auth::unix_now() + 3600});
    let token = synchub::auth::mint_hs256(secret.trim(), &claims);
    let mut c = Client::connect(hub.addr, Encoding::Json).await;
    c.hello(&token, None, None).await;
    c.until_up_to_date().await;
    let id = Uuid::new_v4();
    let results = c.push(vec![upsert("products", json!({"id": id}), product(id, device, 100), 1, now_ms(), 0)]).await;
    assert_eq!(results[0].status, ChangeStatus::Applied, "{results:?}");
}

fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().expect("kill");
    assert!(status.success(), "kill -{sig} {pid}");
}

/// A pid the owner file (`cluster.lock` in the data folder) names, e.g. the watchdog's.
fn owner_file_pid(data_dir: &Path, role: &str) -> Option<u32> {
    let text = std::fs::read_to_string(data_dir.join("cluster.lock")).ok()?;
    text.lines().find_map(|l| l.strip_prefix(role)?.split_whitespace().next()?.parse().ok())
}

/// Where the cluster lives: `pgdata` in the data folder, or (as root) where the pointer says.
fn cluster_dir(data_dir: &Path) -> PathBuf {
    match std::fs::read_to_string(data_dir.join("pgdata-location")) {
        Ok(text) => PathBuf::from(text.trim()),
        Err(_) => data_dir.join("pgdata"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_restarted_at_any_moment_after_kill_9_serves_or_names_the_owner() {
    let data_dir = std::env::temp_dir().join(format!("synchub-dev-restart-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&data_dir).unwrap();
    let log = std::env::temp_dir().join(format!("synchub-dev-restart-{}.log", Uuid::new_v4().simple()));

    let mut hub = start(&data_dir, &log).await.unwrap_or_else(|s| panic!("first start failed ({s}); log:\n{}", tail(&log)));
    // A newcomer is told where the console is; a log written to a file is plain text.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first_log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(first_log.contains(&format!("console: http://{}/console", hub.addr)), "the console's URL is printed:\n{first_log}");
    assert!(!first_log.contains('\u{1b}'), "no terminal colour codes in a log file:\n{first_log}");
    assert_serving(&hub, &data_dir, "first", &log).await;

    // A second hub while the first is alive: refused, naming the first, and the first unharmed.
    let owner = hub.child.id().expect("pid");
    match start(&data_dir, &log).await {
        Ok(second) => panic!("a second hub started on a folder whose owner (pid {owner}) is alive, at {}", second.addr),
        Err(status) => assert!(!status.success(), "the refusal exits non-zero"),
    }
    let refusal = tail(&log);
    assert!(refusal.contains(&format!("pid {owner}")), "the refusal names the owner (pid {owner}):\n{refusal}");
    assert_serving(&hub, &data_dir, "after-refusal", &log).await;

    // 2500 ms: after the dead hub's watchdog has acted.
    for delay_ms in [0u64, 5, 100, 2500, 0] {
        hub.child.start_kill().expect("kill -9");
        hub.child.wait().await.expect("reap");
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        hub = start(&data_dir, &log)
            .await
            .unwrap_or_else(|s| panic!("restart {delay_ms} ms after kill -9 failed ({s}); log:\n{}", tail(&log)));
        tokio::time::sleep(SETTLE).await;
        assert_serving(&hub, &data_dir, &format!("restart-{delay_ms}-{}", Uuid::new_v4().simple()), &log).await;
    }

    // The dead hub's watchdog is slow to run (stopped here): the new hub takes the cluster over
    // first, and the old watchdog, once it runs again, must not stop the server.
    let watchdog = owner_file_pid(&data_dir, "watchdog").expect("the owner file names the watchdog");
    signal(watchdog, "STOP");
    hub.child.start_kill().expect("kill -9");
    hub.child.wait().await.expect("reap");
    hub = start(&data_dir, &log).await.unwrap_or_else(|s| panic!("restart with a slow watchdog failed ({s}); log:\n{}", tail(&log)));
    let _ = std::process::Command::new("kill").args(["-CONT", &watchdog.to_string()]).status();
    tokio::time::sleep(SETTLE).await;
    assert_serving(&hub, &data_dir, "after-slow-watchdog", &log).await;

    // A graceful stop stops the cluster; then nothing of the test is left.
    signal(hub.child.id().expect("pid"), "TERM");
    let status = tokio::time::timeout(START_WAIT, hub.child.wait()).await.expect("hub stops").expect("wait");
    assert!(status.success(), "graceful stop: {status}; log:\n{}", tail(&log));
    let cluster = cluster_dir(&data_dir);
    assert!(!cluster.join("postmaster.pid").exists(), "the cluster was stopped");
    let _ = std::fs::remove_dir_all(&cluster);
    let _ = std::fs::remove_dir_all(&data_dir);
    if std::env::var_os("KEEP_LOG").is_none() {
        let _ = std::fs::remove_file(&log);
    }
}
