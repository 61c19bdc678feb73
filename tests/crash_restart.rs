//! Crash and restart: the hub binary, in its own process, is killed with SIGKILL at random
//! moments of a push stream and started again on the same database. Every change it acked is in
//! the log exactly once, the tenant's seqs stay gap-free, and devices resume: from their
//! positions without a resync, re-sent acked batches come back `duplicate`, batches whose ack
//! the crash swallowed commit once.
//!
//! `CRASH_TRIALS` (default 3 here, 100 for the ignored long form) and `CRASH_SEED` (default:
//! random, printed) choose the run; `loadtest/run-crash` runs the long form in release.

mod common;
mod push_load;

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

use common::fresh_database;
use push_load::{check_database, write_config, Device, HubProcess, Stats, DEVICES, FINAL_BATCHES};

/// A kill lands this long after the hub was ready, at most (ms); at least `KILL_AFTER_MIN_MS`.
const KILL_AFTER_MIN_MS: u64 = 50;
const KILL_AFTER_MAX_MS: u64 = 1500;

/// A few trials, as the suite runs them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_hub_restarts_without_losing_doubling_or_skipping_a_change() {
    run_trials(trials_from_env(3)).await;
}

/// The long form (`CRASH_TRIALS=100` by default); see `loadtest/run-crash`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run with loadtest/run-crash"]
async fn killed_hub_restarts_without_loss_long() {
    run_trials(trials_from_env(100)).await;
}

fn trials_from_env(default: usize) -> usize {
    std::env::var("CRASH_TRIALS").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn run_trials(trials: usize) {
    let seed: u64 = std::env::var("CRASH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(rand::random);
    println!("crash_restart: seed {seed} (rerun with CRASH_SEED={seed}), {trials} trials");
    let mut rng = StdRng::seed_from_u64(seed);
    let run_dir = std::env::temp_dir().join(format!("synchub-crash-{seed}-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&run_dir).unwrap();
    let database_url = fresh_database().await;
    let config = write_config(&run_dir, &database_url, "");
    let mut devices = Device::fleet(seed);
    let mut stats = Stats::default();

    for trial in 0..trials {
        let log = run_dir.join(format!("hub-{trial}.log"));
        let (mut hub, took) = HubProcess::start(&config, &log).await;
        stats.restarts.push(took);
        let kill_after = Duration::from_millis(rng.gen_range(KILL_AFTER_MIN_MS..=KILL_AFTER_MAX_MS));
        let tasks: Vec<_> = devices.drain(..).map(|d| tokio::spawn(d.session(hub.addr, None))).collect();
        tokio::time::sleep(kill_after).await;
        hub.kill().await;
        for task in tasks {
            devices.push(task.await.unwrap_or_else(|e| panic!("seed {seed}, trial {trial}: a device failed: {e}; hub log {}", log.display())));
        }
        for d in &devices {
            stats.in_doubt_at_kill += d.in_doubt.as_ref().map_or(0, |b| b.changes.len());
        }
    }

    // One last hub that nobody kills: devices resume, re-send, push a few more batches, and
    // then catch up to the head from their positions.
    let log = run_dir.join("hub-final.log");
    let (hub, took) = HubProcess::start(&config, &log).await;
    stats.restarts.push(took);
    let tasks: Vec<_> = devices.drain(..).map(|d| tokio::spawn(d.session(hub.addr, Some(FINAL_BATCHES)))).collect();
    for task in tasks {
        devices.push(task.await.unwrap_or_else(|e| panic!("seed {seed}: a device failed in the last phase: {e}; hub log {}", log.display())));
    }
    for d in &mut devices {
        assert!(d.in_doubt.is_none(), "seed {seed}: {} ended the last phase with an unacked batch (hub log {})", d.id, log.display());
        d.catch_up_to_head(hub.addr).await;
    }

    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    let report = check_database(&pool, &devices, &mut stats).await;
    pool.close().await;
    drop(hub); // killed on drop
    print_summary(&stats, seed, trials);
    assert!(report.is_empty(), "seed {seed}: the hub lost, doubled or skipped changes (hub logs in {}):\n{}", run_dir.display(), report.join("\n"));
    let _ = std::fs::remove_dir_all(&run_dir);
}

fn print_summary(stats: &Stats, seed: u64, trials: usize) {
    let mut restarts = stats.restarts.clone();
    restarts.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = restarts.get(restarts.len() / 2).copied().unwrap_or_default();
    let max = restarts.last().copied().unwrap_or_default();
    println!(
        "crash_restart summary: seed {seed}, trials {trials}, devices {DEVICES}, log head {}, changes acked {}, \
         in flight at a kill {}, of which committed before it (acked duplicate on re-send) {}, sessions resumed {}, \
         acked changes re-sent {} (all duplicate at their seq), lost {}, doubled {}, gaps {}, restart to ready median {:.0} ms, max {:.0} ms",
        stats.head,
        stats.acked,
        stats.in_doubt_at_kill,
        stats.committed_before_crash,
        stats.resumed_sessions,
        stats.duplicates_on_resend,
        stats.lost,
        stats.doubled,
        stats.gaps,
        ms(median),
        ms(max)
    );
}
