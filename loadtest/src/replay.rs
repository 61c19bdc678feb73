//! The `replay` scenario: plays a hub's capture file against a hub at 1×, N× or full speed,
//! as one or more copies whose tenants, devices and keys are renamed, measuring push→ack and
//! push→delivery latency, throughput and errors like the `devices` scenario.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::{ClientFrame, ServerFrame};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, Semaphore};
use uuid::Uuid;

use crate::capture::{Capture, RecordedDevice, RecordedSession, Remap, SeqTranslation};
use crate::client::{Receiver, Target};
use crate::error::{LoadError, Result};
use crate::report::{Monitor, Report, Stats};
use crate::tokens::TokenSource;

#[derive(Debug, Clone, Serialize, clap::Args)]
pub struct ReplayArgs {
    /// Capture file written by a hub with `record_file` set.
    #[arg(long)]
    pub capture: PathBuf,
    /// Playback speed: 1 keeps the recorded pace, 3 plays three times faster; 0 plays as fast
    /// as the hub acks (each push waits for the previous one's ack).
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Copies of the recorded traffic played at once, each as its own tenants and devices.
    #[arg(long, default_value_t = 1)]
    pub copies: usize,
    /// Play only these recorded tenants (repeat the flag); default all.
    #[arg(long = "tenant")]
    pub tenants: Vec<String>,
    /// The run stops after this many seconds at most.
    #[arg(long, default_value_t = 600)]
    pub max_secs: u64,
    /// Prefix of replayed tenant and device ids; a fresh random one by default, so runs never collide.
    #[arg(long)]
    pub id_prefix: Option<String>,
}

/// What every device of one replayed tenant shares.
struct ReplayedTenant {
    /// Recorded (device, device_seq) → recorded seq, from the capture's acks.
    recorded: Arc<HashMap<(String, u64), u64>>,
    translation: Mutex<SeqTranslation>,
}

/// Shared by every task of a run.
struct Shared {
    stats: Stats,
    /// Change ids (as replayed) whose delivery to other devices is timed, with their push time.
    timed: Mutex<HashMap<Uuid, Instant>>,
    keys: HashSet<String>,
    tokens: TokenSource,
    target: Target,
    speed: f64,
    started: Instant,
    deadline: Instant,
}

impl Shared {
    /// Deltas that reached a device, live or by catch-up, timed when their push was.
    fn count_deliveries(&self, deltas: &[protocol::Delta]) {
        self.stats.deltas_received.fetch_add(deltas.len() as u64, Ordering::Relaxed);
        let timed = self.timed.lock().unwrap();
        for d in deltas {
            if let Some(sent) = d.change_id.and_then(|id| timed.get(&id)) {
                self.stats.delivery_latency(sent.elapsed());
            }
        }
    }

    /// When a recorded instant is due in this run.
    fn due(&self, t_us: u64) -> Instant {
        if self.speed <= 0.0 {
            return self.started;
        }
        self.started + Duration::from_secs_f64(t_us as f64 / 1e6 / self.speed)
    }
}

pub async fn run(target: Target, tokens: TokenSource, args: ReplayArgs, hub_pid: Option<u32>) -> Result<Report> {
    if matches!(tokens, TokenSource::File(_)) {
        return Err(LoadError::Usage("replay mints a token per replayed device: give --secret or --secret-file".into()));
    }
    if !(args.speed >= 0.0 && args.speed.is_finite()) || args.copies == 0 {
        return Err(LoadError::Usage("--speed must be 0 or more and --copies at least 1".into()));
    }
    let capture = Capture::read(&args.capture, &args.tenants)?;
    if capture.devices.is_empty() {
        return Err(LoadError::Usage(format!("{} holds no sessions to replay", args.capture.display())));
    }
    let prefix = args.id_prefix.clone().unwrap_or_else(|| format!("rp-{}", &Uuid::new_v4().simple().to_string()[..8]));
    eprintln!(
        "replaying {} devices ({} frames over {:.1} s recorded) × {} copies at {}",
        capture.devices.len(),
        capture.frames,
        capture.span_us as f64 / 1e6,
        args.copies,
        if args.speed > 0.0 { format!("{}× speed", args.speed) } else { "full speed".into() }
    );
    let started = Instant::now();
    let shared = Arc::new(Shared {
        stats: Stats::default(),
        timed: Mutex::new(HashMap::new()),
        keys: capture.key_values.clone(),
        tokens,
        target,
        speed: args.speed,
        started,
        deadline: started + Duration::from_secs(args.max_secs),
    });
    let connecting = Arc::new(Semaphore::new(64));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut n = 0;
    for copy in 0..args.copies {
        let remap = Remap::new(&prefix, copy);
        let mut tenants: HashMap<String, Arc<ReplayedTenant>> = HashMap::new();
        for device in &capture.devices {
            let tenant = tenants
                .entry(device.tenant.clone())
                .or_insert_with(|| {
                    let recorded = capture.seqs.get(&device.tenant).cloned().unwrap_or_default();
                    Arc::new(ReplayedTenant { recorded: Arc::new(recorded), translation: Mutex::new(SeqTranslation::default()) })
                })
                .clone();
            let (shared, remap, device, connecting, stop) = (shared.clone(), remap.clone(), device.clone(), connecting.clone(), stop_rx.clone());
            tasks.push(tokio::spawn(play_device(shared, remap, tenant, device, n, connecting, stop)));
            n += 1;
        }
    }

    let mut monitor = Monitor::new(hub_pid);
    monitor.reset(&shared.stats);
    let forget_old = || shared.timed.lock().unwrap().retain(|_, t| t.elapsed() < crate::report::LATENCY_MAX);
    let measured = monitor.watch_tasks(&shared.stats, started, &mut tasks, shared.deadline, forget_old).await;
    monitor.stop(&shared.stats);
    let _ = stop_tx.send(true);
    // Tasks that ended within the window were joined there (awaiting them again would panic).
    crate::report::join_by(tasks.into_iter().filter(|t| !t.is_finished()), Duration::from_secs(15)).await;
    let mut parameters = serde_json::to_value(&args).unwrap_or(Value::Null);
    if let Value::Object(p) = &mut parameters {
        p.insert(
            "recorded".into(),
            json!({"devices": capture.devices.len(), "frames": capture.frames, "span_s": capture.span_us as f64 / 1e6}),
        );
    }
    Ok(monitor.finish("replay", parameters, &shared.stats, measured))
}

/// Play every session of one recorded device, in order, as the copy `remap` names it.
async fn play_device(
    shared: Arc<Shared>,
    remap: Remap,
    tenant: Arc<ReplayedTenant>,
    device: RecordedDevice,
    n: usize,
    connecting: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
) {
    let name = remap.device(&device.device);
    for session in &device.sessions {
        if !sleep_until(shared.due(session.start_us), &shared, &stop).await {
            return;
        }
        if let Err(err) = play_session(&shared, &remap, &tenant, &device, &name, session, n, &connecting, &stop).await {
            shared.stats.error(&err.to_string());
        }
    }
}

/// Sleep until `at`; false when the run stops first.
async fn sleep_until(at: Instant, shared: &Shared, stop: &watch::Receiver<bool>) -> bool {
    let mut stop = stop.clone();
    let at = at.min(shared.deadline);
    let slept = tokio::select! {
        _ = tokio::time::sleep_until(at.into()) => true,
        _ = stop.wait_for(|s| *s) => false,
    };
    slept && Instant::now() < shared.deadline && !*stop.borrow()
}

#[allow(clippy::too_many_arguments)]
async fn play_session(
    shared: &Arc<Shared>,
    remap: &Remap,
    tenant: &Arc<ReplayedTenant>,
    device: &RecordedDevice,
    name: &str,
    session: &RecordedSession,
    n: usize,
    connecting: &Semaphore,
    stop: &watch::Receiver<bool>,
) -> Result<()> {
    let tenant_id = remap.tenant(&device.tenant);
    let token = || shared.tokens.token_for(&tenant_id, name, &format!("{}-{}", remap.tag, device.user), &device.role);
    let mut target = shared.target.clone();
    if session.msgpack {
        target.encoding = protocol::Encoding::MsgPack;
    }
    let mut client = {
        let _permit = connecting.acquire().await;
        let connected = async {
            let mut client = target.connect(n).await?;
            // A device that connects after others pushed gets their changes by catch-up:
            // those are deliveries too.
            client.handshake_with(token(), name, None, |deltas| shared.count_deliveries(deltas)).await?;
            Ok::<_, LoadError>(client)
        };
        match connected.await {
            Ok(client) => client,
            Err(err) => {
                shared.stats.connections_failed.fetch_add(1, Ordering::Relaxed);
                return Err(err);
            }
        }
    };
    shared.stats.connections_opened.fetch_add(1, Ordering::Relaxed);
    let pending: Arc<Mutex<HashMap<u64, (Instant, Vec<u64>)>>> = Arc::new(Mutex::new(HashMap::new()));
    let (acked_tx, mut acked_rx) = mpsc::channel::<()>(64);
    let closing = Arc::new(AtomicBool::new(false));
    let receiving =
        tokio::spawn(receive(client.receiver, shared.clone(), tenant.clone(), device.device.clone(), pending.clone(), acked_tx, closing.clone()));
    let offset = device.first_device_seq.saturating_sub(1);
    let mut outcome = Ok(());
    // Request ids are the replayer's own (after the handshake's), so replies are matched even
    // when the recorded device reused ids.
    let mut next_id = 10u64;
    for (t_us, frame) in &session.frames {
        if !sleep_until(shared.due(*t_us), shared, stop).await {
            break;
        }
        next_id += 1;
        let id = next_id;
        let frame = match frame {
            ClientFrame::Push { batch_id, changes, .. } => {
                let changes: Vec<_> = {
                    let translation = tenant.translation.lock().unwrap();
                    changes
                        .iter()
                        .map(|c| {
                            let mut change = remap.change(c, &device.tenant, &shared.keys, offset);
                            change.base_version = translation.translate(c.base_version);
                            change
                        })
                        .collect()
                };
                let now = Instant::now();
                shared.timed.lock().unwrap().extend(changes.iter().map(|c| (c.change_id, now)));
                shared.stats.changes_sent.fetch_add(changes.len() as u64, Ordering::Relaxed);
                let recorded_seqs = changes.iter().map(|c| c.device_seq + offset).collect();
                pending.lock().unwrap().insert(id, (now, recorded_seqs));
                ClientFrame::Push { id: id, batch_id: remap.uuid(*batch_id), changes }
            }
            ClientFrame::Auth { .. } => ClientFrame::Auth { id: id, token: token() },
            ClientFrame::Snapshot { table, after, limit, .. } => ClientFrame::Snapshot {
                id: id,
                table: table.clone(),
                after: after.as_ref().map(|a| remap.object(a, &device.tenant, &shared.keys)),
                limit: *limit,
            },
            // A recorded resume names the recorded epoch and seq; the replayed device catches
            // up in its own tenant instead (its handshake resumed at the head if told to).
            ClientFrame::Resume { .. } | ClientFrame::Hello { .. } => continue,
            ClientFrame::Ping { .. } => ClientFrame::Ping { id: id },
            // Filter values may name keys or the tenant: they are renamed like row values.
            ClientFrame::Subscribe { sub, table, filter, snapshot, channel, .. } => ClientFrame::Subscribe {
                id,
                sub: sub.clone(),
                table: table.clone(),
                filter: filter
                    .iter()
                    .map(|c| {
                        let single: protocol::Object = [(c.column.clone(), c.value.clone())].into_iter().collect();
                        let renamed = remap.object(&single, &device.tenant, &shared.keys);
                        protocol::Condition { value: renamed.get(&c.column).cloned().unwrap_or_default(), ..c.clone() }
                    })
                    .collect(),
                snapshot: *snapshot,
                channel: *channel,
            },
            ClientFrame::Unsubscribe { sub, .. } => ClientFrame::Unsubscribe { id, sub: sub.clone() },
        };
        let is_push = matches!(frame, ClientFrame::Push { .. });
        if let Err(err) = client.sender.send(&frame).await {
            outcome = Err(err);
            break;
        }
        if is_push && shared.speed <= 0.0 && acked_rx.recv().await.is_none() {
            break; // the socket ended; the receiver counted why
        }
    }
    // Wait for the acks of what was pushed (at most until the recorded close, or 10 s), then
    // close as the device did.
    let close_at = session.end_us.map(|t| shared.due(t)).unwrap_or_else(Instant::now).max(Instant::now() + Duration::from_millis(1));
    let ack_deadline = close_at.max(Instant::now() + Duration::from_secs(10)).min(shared.deadline);
    while !pending.lock().unwrap().is_empty() && Instant::now() < ack_deadline && !receiving.is_finished() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sleep_until(close_at, shared, stop).await;
    closing.store(true, Ordering::Relaxed);
    client.sender.close().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), receiving).await;
    outcome
}

async fn receive(
    mut receiver: Receiver,
    shared: Arc<Shared>,
    tenant: Arc<ReplayedTenant>,
    recorded_device: String,
    pending: Arc<Mutex<HashMap<u64, (Instant, Vec<u64>)>>>,
    acked: mpsc::Sender<()>,
    closing: Arc<AtomicBool>,
) {
    let stats = &shared.stats;
    loop {
        match receiver.recv().await {
            Ok(ServerFrame::Ack { id, results, .. }) => {
                stats.batches_acked.fetch_add(1, Ordering::Relaxed);
                let sent = pending.lock().unwrap().remove(&id);
                if let Some((at, recorded_seqs)) = sent {
                    stats.ack_latency(at.elapsed());
                    let mut translation = tenant.translation.lock().unwrap();
                    for (result, device_seq) in results.iter().zip(recorded_seqs) {
                        if let (Some(replayed), Some(recorded)) = (result.seq, tenant.recorded.get(&(recorded_device.clone(), device_seq))) {
                            translation.learn(*recorded, replayed);
                        }
                    }
                }
                stats.count_results(&results);
                let _ = acked.try_send(());
            }
            Ok(ServerFrame::Delta { deltas, .. } | ServerFrame::CatchUp { deltas, .. }) => shared.count_deliveries(&deltas),
            Ok(ServerFrame::Error { id, code, .. }) => {
                stats.error(code.as_str());
                // A refused push is answered: stop waiting for its ack.
                if let Some(id) = id {
                    if pending.lock().unwrap().remove(&id).is_some() {
                        let _ = acked.try_send(());
                    }
                }
            }
            Ok(_) => {}
            // The replayer closed the socket itself.
            Err(_) if closing.load(Ordering::Relaxed) => return,
            Err(err) => {
                stats.error(&err.to_string());
                return;
            }
        }
    }
}
