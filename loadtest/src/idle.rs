//! The `idle` scenario: hold many authenticated, idle sockets (answering the hub's heartbeats)
//! and measure what each costs the hub: user-space memory (RSS) and kernel memory (slab).
//! A process may hold at most 20,000 open files here, so the sockets are spread over several
//! worker processes (this same binary, `idle-worker`).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::client::Target;
use crate::error::{LoadError, Result};
use crate::proc_stats;
use crate::tokens::TokenSource;

#[derive(Debug, Clone, Serialize, clap::Args)]
pub struct IdleArgs {
    /// Sockets to hold in all.
    #[arg(long, default_value_t = 1_000)]
    pub connections: usize,
    #[arg(long, default_value_t = 10)]
    pub tenants: usize,
    /// Worker processes the sockets are spread over.
    #[arg(long, default_value_t = 2)]
    pub processes: usize,
    /// Seconds to hold the sockets once all are connected.
    #[arg(long, default_value_t = 20)]
    pub hold_secs: u64,
    /// Sockets opening at once per worker.
    #[arg(long, default_value_t = 100)]
    pub concurrency: usize,
    /// Open the WebSockets without sending `hello`, to measure the transport's own share (the
    /// hub closes them after `hello_timeout_ms`, so keep the hold shorter).
    #[arg(long)]
    pub no_hello: bool,
    /// Send the token in `hello` instead of the upgrade request's `Authorization` header (the
    /// hub's read buffer then keeps the size of a `hello` with its token).
    #[arg(long, conflicts_with = "no_hello")]
    pub token_in_hello: bool,
}

/// How an idle worker's sockets authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleHandshake {
    /// No `hello`: the transport's own share.
    None,
    /// The token in the upgrade request, then a `hello` without it.
    TokenAtUpgrade,
    TokenInHello,
}

impl IdleHandshake {
    pub fn from_flags(no_hello: bool, token_in_hello: bool) -> IdleHandshake {
        match (no_hello, token_in_hello) {
            (true, _) => IdleHandshake::None,
            (false, true) => IdleHandshake::TokenInHello,
            (false, false) => IdleHandshake::TokenAtUpgrade,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct IdleReport {
    pub parameters: IdleArgs,
    pub connections_held: u64,
    pub connections_failed: u64,
    pub connect_seconds: f64,
    pub accepted_per_s: f64,
    pub hub_rss_before_kib: u64,
    pub hub_rss_held_kib: u64,
    pub hub_kib_per_connection: f64,
    /// Kernel slab growth per connection; on loopback this covers both ends of each socket.
    pub slab_kib_per_connection: f64,
    /// Hub CPU over `idle_window_s`: from the memory sample after connecting until the
    /// workers' hold ended.
    pub hub_cpu_s_while_idle: f64,
    pub idle_window_s: f64,
    pub dropped_while_holding: u64,
}

impl IdleReport {
    pub fn table(&self) -> String {
        format!(
            "  connections held             {} ({} failed)\n  connected in                 {:.1} s ({:.0}/s)\n  hub RSS                      {} KiB before, {} KiB held\n  hub memory per connection    {:.2} KiB user space\n  kernel slab per connection   {:.2} KiB (both ends, loopback)\n  hub CPU while idle           {:.2} s over {:.1} s\n  dropped while holding        {}\n",
            self.connections_held,
            self.connections_failed,
            self.connect_seconds,
            self.accepted_per_s,
            self.hub_rss_before_kib,
            self.hub_rss_held_kib,
            self.hub_kib_per_connection,
            self.slab_kib_per_connection,
            self.hub_cpu_s_while_idle,
            self.idle_window_s,
            self.dropped_while_holding,
        )
    }
}

fn slab_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with("Slab:"))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Parent: spawn the workers, wait until every socket is up, measure, hold, collect.
pub fn run(worker_args: &[String], args: IdleArgs, hub_pid: u32) -> Result<IdleReport> {
    let exe = std::env::current_exe()?;
    let before = proc_stats::sample(Some(hub_pid));
    let slab_before = slab_kib();
    let processes = args.processes.max(1);
    let started = Instant::now();
    let mut children = Vec::new();
    for p in 0..processes {
        let share = args.connections / processes + usize::from(p < args.connections % processes);
        let child = Command::new(&exe)
            .arg("idle-worker")
            .args(worker_args)
            .args(["--worker", &p.to_string(), "--count", &share.to_string(), "--tenants", &args.tenants.to_string()])
            .args(["--concurrency", &args.concurrency.to_string(), "--hold-secs", &args.hold_secs.to_string()])
            .args(args.no_hello.then_some("--no-hello"))
            .args(args.token_in_hello.then_some("--token-in-hello"))
            .stdout(Stdio::piped())
            .spawn()?;
        children.push(child);
    }
    // Each worker prints `ready <ok> <failed>` once connected, then `done <dropped>`.
    let mut readers: Vec<_> = children.iter_mut().map(|c| BufReader::new(c.stdout.take().expect("piped stdout")).lines()).collect();
    let (mut held, mut failed) = (0u64, 0u64);
    for lines in readers.iter_mut() {
        let line = lines.next().transpose()?.ok_or_else(|| LoadError::Worker("a worker exited before connecting".into()))?;
        let mut parts = line.split_whitespace().skip(1).map(|n| n.parse::<u64>().unwrap_or(0));
        held += parts.next().unwrap_or(0);
        failed += parts.next().unwrap_or(0);
    }
    let connect_seconds = started.elapsed().as_secs_f64();
    // Let allocations settle (first heartbeats, freed handshake buffers) before measuring.
    std::thread::sleep(Duration::from_secs(3));
    let held_sample = proc_stats::sample(Some(hub_pid));
    let idle_from = Instant::now();
    let slab_held = slab_kib();
    let mut dropped = 0;
    for lines in readers.iter_mut() {
        let line = lines.next().transpose()?.ok_or_else(|| LoadError::Worker("a worker exited before its hold ended".into()))?;
        dropped += line.split_whitespace().nth(1).and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
    }
    let idle_cpu = proc_stats::sample(Some(hub_pid)).hub_cpu_s - held_sample.hub_cpu_s;
    let idle_window_s = idle_from.elapsed().as_secs_f64();
    for mut child in children {
        let _ = child.wait();
    }
    let per = |delta: i64| if held > 0 { delta as f64 / held as f64 } else { 0.0 };
    Ok(IdleReport {
        connections_held: held,
        connections_failed: failed,
        connect_seconds,
        accepted_per_s: held as f64 / connect_seconds.max(1e-6),
        hub_rss_before_kib: before.hub_rss_kib,
        hub_rss_held_kib: held_sample.hub_rss_kib,
        hub_kib_per_connection: per(held_sample.hub_rss_kib as i64 - before.hub_rss_kib as i64),
        slab_kib_per_connection: per(slab_held as i64 - slab_before as i64),
        hub_cpu_s_while_idle: idle_cpu,
        idle_window_s,
        dropped_while_holding: dropped,
        parameters: args,
    })
}

/// Worker: open `count` sockets, report, read (and so answer heartbeats) until the hold ends.
#[allow(clippy::too_many_arguments)]
pub async fn worker(
    target: Target,
    tokens: TokenSource,
    worker: usize,
    count: usize,
    tenants: usize,
    concurrency: usize,
    hold: Duration,
    handshake: IdleHandshake,
) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let dropped = Arc::new(AtomicU64::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let prefix = format!("idle-{}", std::process::id());
    let mut tasks = Vec::new();
    for i in 0..count {
        let n = worker * 1_000_000 + i;
        let tenant = format!("idle-t{}", n % tenants.max(1));
        let device = format!("{prefix}-d{i}");
        let token = tokens.token(&tenant, &device, n, "Employee");
        let (target, ok, failed, dropped, gate, mut release) =
            (target.clone(), ok.clone(), failed.clone(), dropped.clone(), gate.clone(), release_rx.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = {
                let _permit = gate.acquire().await;
                // The token goes in the upgrade request or in `hello`, never both.
                let (opened, hello_token) = match handshake {
                    IdleHandshake::TokenAtUpgrade => (target.connect_authorized(n, &token).await, String::new()),
                    _ => (target.connect(n).await, token),
                };
                let connected = match opened {
                    Ok(mut c) if handshake != IdleHandshake::None => c.handshake(hello_token, &device, None).await.map(|_| c),
                    other => other,
                };
                match connected {
                    Ok(c) => c,
                    Err(err) => {
                        // The first failure's reason, on the worker's stderr (the parent's).
                        if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("idle worker {worker}: connection {n} failed: {err}");
                        }
                        return;
                    }
                }
            };
            ok.fetch_add(1, Ordering::Relaxed);
            loop {
                tokio::select! {
                    frame = client.receiver.recv() => if frame.is_err() {
                        dropped.fetch_add(1, Ordering::Relaxed);
                        return;
                    },
                    _ = release.changed() => {
                        client.sender.close().await;
                        return;
                    }
                }
            }
        }));
    }
    while ok.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < count as u64 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("ready {} {}", ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    tokio::time::sleep(hold).await;
    println!("done {}", dropped.load(Ordering::Relaxed));
    let _ = release_tx.send(true);
    crate::report::join_by(tasks, Duration::from_secs(5)).await;
}
