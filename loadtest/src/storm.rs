//! The `storm` scenario: N devices go live, all drop at once, their tenants move on without
//! them, and then all come back at once, each catching up from its position and pushing the
//! changes it queued meanwhile. Measures how long until every device is caught up and every
//! queued change acked.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::{ClientFrame, Position, ServerFrame};
use serde::Serialize;
use uuid::Uuid;

use crate::client::{Client, Received, Target};
use crate::devices::Workload;
use crate::error::{LoadError, Result};
use crate::proc_stats;
use crate::tokens::TokenSource;

#[derive(Debug, Clone, Serialize, clap::Args)]
pub struct StormArgs {
    #[arg(long, default_value_t = 1_000)]
    pub devices: usize,
    #[arg(long, default_value_t = 100)]
    pub tenants: usize,
    /// Changes each device queues while away and pushes on its return.
    #[arg(long, default_value_t = 10)]
    pub pending: usize,
    /// Changes written to each tenant by another device while the devices are away.
    #[arg(long, default_value_t = 100)]
    pub missed: usize,
    /// Sockets connecting at once in the first (calm) phase.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Seconds the storm may take before the run gives up on the rest.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
    /// While the devices are away, print `restart the hub now` and wait until the hub has gone
    /// down and come back (restarted by whoever runs the test) before the storm.
    #[arg(long)]
    pub await_restart: bool,
    /// File holding the hub's pid, read after a restart to measure the new process.
    #[arg(long)]
    pub hub_pid_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct StormReport {
    pub parameters: StormArgs,
    pub devices_back: u64,
    pub devices_failed: u64,
    /// Hellos and pushes tried again after `busy` or `unavailable` (the hub shedding load).
    pub retries: u64,
    /// From the first reconnect to the last device's `up_to_date`; a device that failed counts
    /// at the run's timeout (here, in the median and in the deciles of catching up).
    pub all_caught_up_s: f64,
    /// Half of the devices were caught up by this time.
    pub median_caught_up_s: f64,
    /// By these times 10%, 20%, … 100% of the devices had their `welcome` (hello answered)…
    pub welcomed_by_decile_s: Vec<f64>,
    /// …and were caught up.
    pub caught_up_by_decile_s: Vec<f64>,
    /// From the first reconnect to the last ack of a queued batch.
    pub all_acked_s: f64,
    pub catch_up_deltas: u64,
    pub hub_cpu_s: f64,
    pub hub_rss_max_kib: u64,
    /// CPU seconds the hypervisor took from the machine during the storm (all CPUs).
    pub steal_cpu_s: f64,
    pub errors: Vec<String>,
}

/// Tries of one device's hello or push after `busy` or `unavailable`.
const MAX_RETRIES: u64 = 20;

fn retryable(err: &LoadError) -> bool {
    matches!(err, LoadError::Refused { code, .. } if code == "busy" || code == "unavailable")
}

/// 200 ms doubling to 1.6 s, plus up to as much again by the device's number, so that retries do
/// not all come back at once.
fn backoff(retries: u64, device: usize) -> Duration {
    let base = 100u64 << retries.min(4);
    Duration::from_millis(base + (device as u64 * 7919) % base)
}

/// After `err`, wait out the device's backoff and say whether to try again: only load shedding
/// is retried, at most `MAX_RETRIES` times per device.
async fn backed_off(err: &LoadError, retries: &mut u64, device: usize) -> bool {
    if !retryable(err) || *retries >= MAX_RETRIES {
        return false;
    }
    *retries += 1;
    tokio::time::sleep(backoff(*retries, device)).await;
    true
}

/// One device's return: connect, hello from its position, read catch-up to `up_to_date`.
/// Returns the connection, when the hello was answered and when catch-up was done.
async fn come_back(
    target: &Target,
    n: usize,
    token: &str,
    device: &str,
    position: &Position,
    started: Instant,
    deltas: &AtomicU64,
) -> Result<(Client, Duration, Duration)> {
    let mut client = target.connect(n).await?;
    client
        .sender
        .send(&ClientFrame::Hello {
            mode: Default::default(),
            id: 1,
            versions: vec![1],
            token: token.to_string(),
            device_id: Some(device.to_string()),
            position: Some(position.clone()),
        })
        .await?;
    let mut welcomed = None;
    loop {
        let frame = client.receiver.recv_heads().await?;
        welcomed.get_or_insert_with(|| started.elapsed());
        match frame {
            Received::Deltas { catch_up: true, deltas: page } => {
                deltas.fetch_add(page.len() as u64, Ordering::Relaxed);
            }
            Received::Frame(ServerFrame::UpToDate { .. }) => break,
            Received::Frame(ServerFrame::Error { code, message, .. }) => return Err(LoadError::Refused { code: code.as_str().into(), message }),
            _ => {}
        }
    }
    let caught_up = started.elapsed();
    Ok((client, welcomed.unwrap_or(caught_up), caught_up))
}

impl StormReport {
    pub fn table(&self) -> String {
        format!(
            "  devices back                 {} ({} failed, {} retries)\n  half caught up after         {:.2} s\n  all caught up after          {:.2} s\n  all queued changes acked     {:.2} s\n  catch-up deltas received     {}\n  hub CPU during the storm     {:.1} s\n  hub RSS max                  {} KiB\n  CPU taken by the hypervisor  {:.1} s\n  errors                       {:?}\n",
            self.devices_back, self.devices_failed, self.retries, self.median_caught_up_s, self.all_caught_up_s, self.all_acked_s, self.catch_up_deltas, self.hub_cpu_s, self.hub_rss_max_kib, self.steal_cpu_s, self.errors
        )
    }
}

/// Ask for a hub restart and wait until the hub has stopped accepting and then accepts sockets
/// again (its tenant actors start cold: nothing of the tenants is in memory).
async fn await_restart(target: &Target, limit: Duration) -> Result<()> {
    eprintln!("storm: the devices are away; restart the hub now");
    let deadline = Instant::now() + limit;
    while tokio::net::TcpStream::connect(target.addr).await.is_ok() {
        if Instant::now() > deadline {
            return Err(LoadError::Usage("the hub did not go down for the restart".into()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    loop {
        if let Ok(mut ws) = target.connect_raw(&target.url, 0).await {
            let _ = ws.close(None).await;
            eprintln!("storm: the hub is back");
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(LoadError::Usage("the hub did not come back after the restart".into()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn device_name(run: &str, n: usize) -> String {
    format!("{run}-d{n}")
}

fn tenant_name(run: &str, n: usize, tenants: usize) -> String {
    format!("{run}-t{}", n % tenants.max(1))
}

pub async fn run(target: Target, tokens: TokenSource, args: StormArgs, hub_pid: Option<u32>) -> Result<StormReport> {
    let run = format!("storm-{}", &Uuid::new_v4().simple().to_string()[..8]);
    let tenants = args.tenants.max(1);

    // 1. Every device goes live once (so it has a position), then drops.
    let gate = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let mut tasks = Vec::new();
    for n in 0..args.devices {
        let (target, gate) = (target.clone(), gate.clone());
        let (tenant, device) = (tenant_name(&run, n, tenants), device_name(&run, n));
        let token = tokens.token(&tenant, &device, n, "Employee");
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await;
            let mut client = target.connect(n).await?;
            let position = client.handshake(token, &device, None).await?;
            client.sender.close().await;
            Ok::<Position, LoadError>(position)
        }));
    }
    let mut positions = Vec::with_capacity(args.devices);
    for task in tasks {
        positions.push(task.await.map_err(|e| LoadError::Usage(e.to_string()))??);
    }
    eprintln!("{} devices went live and dropped; writing {} changes per tenant while they are away", args.devices, args.missed);

    // 2. The tenants move on: one other device per tenant writes `missed` changes.
    for t in 0..tenants {
        let tenant = format!("{run}-t{t}");
        let device = format!("{run}-writer{t}");
        let mut client = target.connect(args.devices + t).await?;
        client.handshake(tokens.token(&tenant, &device, args.devices + t, "Employee"), &device, None).await?;
        let mut workload = Workload::new(&tenant, &device, 200, 0, 0.0);
        let mut left = args.missed;
        let mut id = 10;
        while left > 0 {
            let n = left.min(500);
            left -= n;
            id += 1;
            let changes = (0..n).map(|_| workload.next().0).collect();
            client.sender.send(&ClientFrame::Push { id, batch_id: Uuid::now_v7(), changes }).await?;
            loop {
                match client.receiver.recv().await? {
                    ServerFrame::Ack { .. } => break,
                    ServerFrame::Error { code, message, .. } => return Err(LoadError::Refused { code: code.as_str().into(), message }),
                    _ => {}
                }
            }
        }
        client.sender.close().await;
    }

    let mut hub_pid = hub_pid;
    if args.await_restart {
        await_restart(&target, Duration::from_secs(args.timeout_secs)).await?;
        if let Some(path) = &args.hub_pid_file {
            hub_pid = std::fs::read_to_string(path)?.trim().parse().ok();
        }
    }

    // 3. The storm: everyone back at once, catching up and pushing what they queued.
    let before = proc_stats::sample(hub_pid);
    let rss_max = Arc::new(AtomicU64::new(before.hub_rss_kib));
    let sampler = {
        let rss_max = rss_max.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                rss_max.fetch_max(proc_stats::sample(hub_pid).hub_rss_kib, Ordering::Relaxed);
            }
        })
    };
    let deltas = Arc::new(AtomicU64::new(0));
    eprintln!("the storm begins: {} devices return at once", args.devices);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (n, position) in positions.into_iter().enumerate() {
        let (target, deltas) = (target.clone(), deltas.clone());
        let (tenant, device) = (tenant_name(&run, n, tenants), device_name(&run, n));
        let token = tokens.token(&tenant, &device, n, "Employee");
        let pending = args.pending;
        tasks.push(tokio::spawn(async move {
            // A device told `busy` or `unavailable` comes back later, as a real one does.
            let mut retries = 0;
            let (mut client, welcomed, caught_up) = loop {
                match come_back(&target, n, &token, &device, &position, started, &deltas).await {
                    Ok(back) => break back,
                    Err(err) if backed_off(&err, &mut retries, n).await => {}
                    Err(err) => return Err(err),
                }
            };
            let mut workload = Workload::new(&tenant, &device, pending.max(1), 0, 0.0);
            let changes = (0..pending).map(|_| workload.next().0).collect::<Vec<_>>();
            if !changes.is_empty() {
                // The same batch each time: the hub applies it once.
                let push = ClientFrame::Push { id: 2, batch_id: Uuid::now_v7(), changes };
                'pushing: loop {
                    client.sender.send(&push).await?;
                    loop {
                        match client.receiver.recv_heads().await? {
                            Received::Frame(ServerFrame::Ack { .. }) => break 'pushing,
                            Received::Frame(ServerFrame::Error { code, message, .. }) => {
                                let err = LoadError::Refused { code: code.as_str().into(), message };
                                if backed_off(&err, &mut retries, n).await {
                                    continue 'pushing;
                                }
                                return Err(err);
                            }
                            _ => {}
                        }
                    }
                }
            }
            let acked = started.elapsed();
            client.sender.close().await;
            Ok::<(Duration, Duration, Duration, u64), LoadError>((welcomed, caught_up, acked, retries))
        }));
    }
    let (mut back, mut failed, mut retried, mut caught_up, mut acked, mut errors) = (0, 0, 0, Duration::ZERO, Duration::ZERO, Vec::new());
    let mut each = Vec::with_capacity(args.devices);
    let mut each_welcomed = Vec::with_capacity(args.devices);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    for task in tasks {
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(Ok((w, c, a, r)))) => {
                back += 1;
                retried += r;
                each.push(c);
                each_welcomed.push(w);
                caught_up = caught_up.max(c);
                acked = acked.max(a);
            }
            // A device that failed or never finished within the run's timeout has not caught
            // up: it counts at the timeout, so a run that loses devices cannot look faster.
            outcome => {
                failed += 1;
                let why = match outcome {
                    Ok(Ok(Err(err))) => err.to_string(),
                    Ok(Err(join)) => format!("device task: {join}"),
                    _ => format!("not caught up within {} s", args.timeout_secs),
                };
                if errors.len() < 10 {
                    errors.push(why);
                }
                let never = Duration::from_secs(args.timeout_secs);
                each.push(never);
                caught_up = caught_up.max(never);
                acked = acked.max(never);
            }
        }
    }
    sampler.abort();
    let after = proc_stats::sample(hub_pid);
    each.sort();
    each_welcomed.sort();
    let deciles = |sorted: &[Duration]| -> Vec<f64> {
        (1..=10).filter_map(|d| sorted.get((sorted.len() * d / 10).saturating_sub(1)).map(Duration::as_secs_f64)).collect()
    };
    Ok(StormReport {
        parameters: args,
        devices_back: back,
        devices_failed: failed,
        retries: retried,
        all_caught_up_s: caught_up.as_secs_f64(),
        median_caught_up_s: each.get(each.len() / 2).map_or(0.0, Duration::as_secs_f64),
        welcomed_by_decile_s: deciles(&each_welcomed),
        caught_up_by_decile_s: deciles(&each),
        all_acked_s: acked.as_secs_f64(),
        catch_up_deltas: deltas.load(Ordering::Relaxed),
        hub_cpu_s: after.hub_cpu_s - before.hub_cpu_s,
        hub_rss_max_kib: rss_max.load(Ordering::Relaxed).max(after.hub_rss_kib),
        steal_cpu_s: after.machine_steal_s - before.machine_steal_s,
        errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_load_shedding_is_tried_again() {
        let refused = |code: &str| LoadError::Refused { code: code.into(), message: String::new() };
        assert!(retryable(&refused("busy")) && retryable(&refused("unavailable")));
        assert!(!retryable(&refused("unauthorized")) && !retryable(&refused("seq_gap")));
        assert!(!retryable(&LoadError::Protocol("closed".into())));
    }

    #[test]
    fn backoff_doubles_to_a_bound_and_spreads_devices() {
        let waits: Vec<Duration> = (1..=6).map(|r| backoff(r, 0)).collect();
        assert_eq!(waits[0], Duration::from_millis(200));
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
        assert!((0..10_000).all(|n| backoff(20, n) < Duration::from_millis(3_200)));
        let spread: std::collections::HashSet<Duration> = (0..100).map(|n| backoff(1, n)).collect();
        assert!(spread.len() > 50, "devices retry at {} distinct times", spread.len());
    }
}
