//! Postgres in trouble under a push stream while the hub keeps running: the hub's backends
//! terminated (several times a round), the server restarted (fast shutdown, then start), the
//! server frozen (SIGSTOP on every process of the cluster, then SIGCONT). After each, the hub
//! recovers by itself (`/readyz` 200 again, the same process, no restart), devices that were
//! refused (`unavailable`) or whose sockets it closed (1001) reconnect, re-send and push on, and
//! at the end every acked change is in the log once, seqs are gap-free, cursors are right and
//! no change was committed twice (re-sent acked batches come back `duplicate` at their seqs).
//!
//! This binary's cluster is its own (tests/common/mod.rs starts one per test binary), so the
//! trouble hurts no other test. `PG_TROUBLE_ROUNDS` (default 3 here, one of each kind; 60 for
//! the ignored long form) and `PG_TROUBLE_SEED` (default: random, printed) choose the run.

mod common;
mod push_load;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::Connection;
use tokio::task::JoinHandle;
use uuid::Uuid;

use common::{cluster, fresh_database, Frozen};
use push_load::{check_database, write_config, Device, HubProcess, Stats, DEVICES, FINAL_BATCHES};

/// Short deadlines, so that trouble is answered `unavailable` rather than waited out; no
/// catch-up from the tenant actor's memory, so that every reconnect reads the log in Postgres.
const HUB_SETTINGS: &str = "db_acquire_timeout_ms = 2000\ndb_transaction_timeout_ms = 3000\nreadyz_timeout_ms = 1000\ncatch_up_cache_deltas = 0\n";
/// Trouble starts this long into a round's load, at least and at most (ms).
const TROUBLE_AFTER_MS: (u64, u64) = (50, 1500);
/// Gaps between the terminations of one round (ms), and how many a round has.
const TERMINATE_GAP_MS: (u64, u64) = (20, 500);
const TERMINATIONS: (usize, usize) = (2, 4);
/// How long the server stays down between its fast shutdown and its start (ms).
const DOWN_MS: (u64, u64) = (0, 2000);
/// How long the cluster stays frozen (ms).
const FROZEN_MS: (u64, u64) = (1000, 5000);
/// Liveness bounds, not timing assertions: readiness back after the trouble ends, and every
/// device's next acked batch after that.
const RECOVER: Duration = Duration::from_secs(60);
const PROGRESS: Duration = Duration::from_secs(60);

/// A few rounds, one of each kind, as the suite runs them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_trouble_under_load_loses_nothing_and_the_hub_recovers_by_itself() {
    run_rounds(rounds_from_env(3)).await;
}

/// The long form: `cargo test --test pg_trouble -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: 60 rounds"]
async fn database_trouble_under_load_long() {
    run_rounds(rounds_from_env(60)).await;
}

fn rounds_from_env(default: usize) -> usize {
    std::env::var("PG_TROUBLE_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Trouble {
    Terminate,
    Restart,
    Freeze,
}

const KINDS: [Trouble; 3] = [Trouble::Terminate, Trouble::Restart, Trouble::Freeze];

#[derive(Default)]
struct Summary {
    rounds: BTreeMap<Trouble, usize>,
    backends_terminated: u64,
    /// From the end of each trouble to `/readyz` 200 again, by kind.
    recoveries: BTreeMap<Trouble, Vec<Duration>>,
    refusals: BTreeMap<String, usize>,
    closes: BTreeMap<u16, usize>,
}

async fn run_rounds(rounds: usize) {
    let seed: u64 = std::env::var("PG_TROUBLE_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(rand::random);
    println!("pg_trouble: seed {seed} (rerun with PG_TROUBLE_SEED={seed}), {rounds} rounds");
    let mut rng = StdRng::seed_from_u64(seed);
    let run_dir = std::env::temp_dir().join(format!("synchub-pgtrouble-{seed}-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&run_dir).unwrap();
    let database_url = fresh_database().await;
    let database: String = {
        let mut conn = sqlx::PgConnection::connect(&database_url).await.unwrap();
        sqlx::query_scalar("select current_database()").fetch_one(&mut conn).await.unwrap()
    };
    let config = write_config(&run_dir, &database_url, HUB_SETTINGS);
    let log = run_dir.join("hub.log");
    let (mut hub, _) = HubProcess::start(&config, &log).await;
    let http = reqwest::Client::new();
    let mut summary = Summary::default();

    let stop = Arc::new(AtomicBool::new(false));
    let devices = Device::fleet(seed);
    let progress: Vec<(String, Arc<AtomicUsize>)> = devices.iter().map(|d| (d.id.clone(), d.acked_batches.clone())).collect();
    let tasks: Vec<JoinHandle<Device>> = devices.into_iter().map(|d| tokio::spawn(d.sessions_until(hub.addr, stop.clone()))).collect();

    for round in 0..rounds {
        let kind = KINDS[round % KINDS.len()];
        let context = format!("seed {seed}, round {round} ({kind:?}), hub log {}", log.display());
        tokio::time::sleep(Duration::from_millis(rng.gen_range(TROUBLE_AFTER_MS.0..=TROUBLE_AFTER_MS.1))).await;
        match kind {
            Trouble::Terminate => {
                for _ in 0..rng.gen_range(TERMINATIONS.0..=TERMINATIONS.1) {
                    summary.backends_terminated += terminate_backends(&database).await;
                    tokio::time::sleep(Duration::from_millis(rng.gen_range(TERMINATE_GAP_MS.0..=TERMINATE_GAP_MS.1))).await;
                }
            }
            Trouble::Restart => {
                pg_ctl(&["stop", "-m", "fast", "-w", "-t", "60"]).await;
                let down = Instant::now();
                assert_eq!(readyz(&http, &hub).await, Some(503), "{context}: readiness while the server is down");
                tokio::time::sleep(Duration::from_millis(rng.gen_range(DOWN_MS.0..=DOWN_MS.1)).saturating_sub(down.elapsed())).await;
                let server_log = cluster().cluster_dir().join("server.log");
                pg_ctl(&["start", "-w", "-t", "60", "-l", server_log.to_str().unwrap()]).await;
            }
            Trouble::Freeze => {
                let frozen = Frozen::freeze();
                let since = Instant::now();
                // Thawed only once readiness answered, so that it can only have answered 503.
                assert_eq!(readyz(&http, &hub).await, Some(503), "{context}: readiness while the server is frozen");
                tokio::time::sleep(Duration::from_millis(rng.gen_range(FROZEN_MS.0..=FROZEN_MS.1)).saturating_sub(since.elapsed())).await;
                drop(frozen);
            }
        }
        *summary.rounds.entry(kind).or_default() += 1;

        // The hub recovers by itself: ready again, the same process.
        let ended = Instant::now();
        loop {
            if let Ok(Some(status)) = hub.child.try_wait() {
                panic!("{context}: the hub exited ({status}):\n{}", push_load::tail(&log));
            }
            let ready = readyz(&http, &hub).await;
            if ready == Some(200) {
                break;
            }
            assert!(ended.elapsed() < RECOVER, "{context}: /readyz is not 200 again within {RECOVER:?} (last: {ready:?}):\n{}", push_load::tail(&log));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        summary.recoveries.entry(kind).or_default().push(ended.elapsed());

        // And every device, refused or cut off or not, has a batch acked after it.
        let before: Vec<usize> = progress.iter().map(|(_, n)| n.load(Ordering::Relaxed)).collect();
        let since = Instant::now();
        loop {
            if tasks.iter().any(JoinHandle::is_finished) {
                // A device failed (it only stops when told): its panic is the report.
                stop.store(true, Ordering::Relaxed);
                join(tasks, &context).await;
                unreachable!("{context}: a device stopped before it was told to");
            }
            let stalled: Vec<&str> = progress.iter().zip(&before).filter(|((_, n), b)| n.load(Ordering::Relaxed) <= **b).map(|((id, _), _)| id.as_str()).collect();
            if stalled.is_empty() {
                break;
            }
            assert!(since.elapsed() < PROGRESS, "{context}: {stalled:?} had no batch acked within {PROGRESS:?} of the hub's recovery:\n{}", push_load::tail(&log));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    stop.store(true, Ordering::Relaxed);
    let context = format!("seed {seed}, hub log {}", log.display());
    let devices = join(tasks, &context).await;
    // A last phase with the database well: every device pushes a few more batches (re-sending
    // first what is in doubt), then catches up to the head from its position.
    let tasks: Vec<JoinHandle<Device>> = devices.into_iter().map(|d| tokio::spawn(d.sessions_until_done(hub.addr, FINAL_BATCHES, RECOVER))).collect();
    let mut devices = join(tasks, &context).await;
    for d in &mut devices {
        assert!(d.in_doubt.is_none(), "{context}: {} ended the last phase with an unacked batch", d.id);
        d.catch_up_to_head(hub.addr).await;
    }
    assert!(matches!(hub.child.try_wait(), Ok(None)), "{context}: the hub exited");

    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    let mut stats = Stats::default();
    let report = check_database(&pool, &devices, &mut stats).await;
    pool.close().await;
    drop(hub); // killed on drop
    for d in &devices {
        for (code, n) in &d.refusals {
            *summary.refusals.entry(code.clone()).or_default() += n;
        }
        for (code, n) in &d.closes {
            *summary.closes.entry(*code).or_default() += n;
        }
    }
    print_summary(&summary, &stats, seed, rounds);
    assert!(report.is_empty(), "seed {seed}: the hub lost, doubled or skipped changes (hub log {}):\n{}", log.display(), report.join("\n"));
    let _ = std::fs::remove_dir_all(&run_dir);
}

/// `/readyz`'s status; None when it did not answer within `RECOVER` (the hub's own deadline on
/// it is a second).
async fn readyz(http: &reqwest::Client, hub: &HubProcess) -> Option<u16> {
    let answer = http.get(format!("http://{}/readyz", hub.addr)).timeout(RECOVER).send().await;
    answer.ok().map(|r| r.status().as_u16())
}

async fn join(tasks: Vec<JoinHandle<Device>>, context: &str) -> Vec<Device> {
    let mut devices = Vec::new();
    for task in tasks {
        devices.push(task.await.unwrap_or_else(|e| panic!("{context}: a device failed: {e}")));
    }
    devices
}

/// Terminate every backend of `database` (the hub's connections); returns how many.
async fn terminate_backends(database: &str) -> u64 {
    let mut admin = sqlx::PgConnection::connect(&cluster().database_url("postgres")).await.expect("the admin connection");
    let terminated: Vec<bool> = sqlx::query_scalar("select pg_terminate_backend(pid) from pg_stat_activity where datname = $1 and pid <> pg_backend_pid()")
        .bind(database)
        .fetch_all(&mut admin)
        .await
        .expect("pg_terminate_backend");
    let _ = admin.close().await;
    terminated.into_iter().filter(|t| *t).count() as u64
}

/// `pg_ctl -D <cluster> args…`, from the running server's own bin dir and as the cluster's
/// owner (the `postgres` user when the tests run as root).
async fn pg_ctl(args: &[&str]) {
    let dir = cluster().cluster_dir();
    // postmaster.opts: the server's command line, its binary first.
    let opts = std::fs::read_to_string(dir.join("postmaster.opts")).expect("postmaster.opts");
    let postgres = opts.split_whitespace().next().expect("the server's path").trim_matches('"');
    let pg_ctl = Path::new(postgres).with_file_name("pg_ctl");
    let owner = std::fs::metadata(dir).unwrap().uid();
    let mut command = if owner == std::fs::metadata("/proc/self").unwrap().uid() {
        tokio::process::Command::new(&pg_ctl)
    } else {
        let name = std::process::Command::new("id").args(["-nu", &owner.to_string()]).output().expect("id");
        let mut c = tokio::process::Command::new("runuser");
        c.args(["-u", String::from_utf8_lossy(&name.stdout).trim(), "--"]).arg(&pg_ctl);
        c
    };
    let out = command.arg("-D").arg(dir).args(args).stdin(std::process::Stdio::null()).output().await.expect("pg_ctl runs");
    assert!(out.status.success(), "pg_ctl {args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

fn print_summary(summary: &Summary, stats: &Stats, seed: u64, rounds: usize) {
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let recoveries: Vec<String> = summary
        .recoveries
        .iter()
        .map(|(kind, took)| {
            let mut took = took.clone();
            took.sort();
            format!("{kind:?} median {:.0} ms, max {:.0} ms", ms(&took[took.len() / 2]), ms(took.last().unwrap()))
        })
        .collect();
    println!(
        "pg_trouble summary: seed {seed}, rounds {rounds} {:?}, devices {DEVICES}, backends terminated {}, log head {}, changes acked {}, \
         re-sent unacked and found committed (duplicate) {}, sessions resumed {}, acked changes re-sent {} (all duplicate at their seq), \
         refusals {:?}, closes {:?}, lost {}, doubled {}, gaps {}, ready again after the trouble: {}",
        summary.rounds,
        summary.backends_terminated,
        stats.head,
        stats.acked,
        stats.committed_before_crash,
        stats.resumed_sessions,
        stats.duplicates_on_resend,
        summary.refusals,
        summary.closes,
        stats.lost,
        stats.doubled,
        stats.gaps,
        recoveries.join("; ")
    );
}
