//! The hub's counters and gauges, and their rendering in the Prometheus text format for
//! `GET /metrics`. Counting is lock-free (atomics); only error codes go through a small map.
//! The allocator's figures are read here too, and its free pages returned.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use protocol::{ChangeStatus, CloseCode, ErrorCode};

/// Upper bounds (seconds) of the group-commit latency histogram's buckets.
const COMMIT_BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

const CLOSE_CODES: [CloseCode; 13] = [
    CloseCode::GoingAway,
    CloseCode::ProtocolError,
    CloseCode::InvalidPayload,
    CloseCode::MessageTooBig,
    CloseCode::HelloTimeout,
    CloseCode::Unauthorized,
    CloseCode::TokenExpired,
    CloseCode::UnsupportedVersion,
    CloseCode::SlowConsumer,
    CloseCode::RateLimited,
    CloseCode::TooManyErrors,
    CloseCode::Replaced,
    CloseCode::HeartbeatTimeout,
];

#[derive(Default)]
pub struct Metrics {
    pub sessions_opened: AtomicU64,
    /// Sessions closed by the hub, by close code (index in `CLOSE_CODES`).
    closes: [AtomicU64; 13],
    pub batches_pushed: AtomicU64,
    /// Change results by status: applied, merged, conflict, rejected, duplicate.
    changes: [AtomicU64; 5],
    pub group_commits: AtomicU64,
    pub group_commit_failures: AtomicU64,
    /// Group transactions run again after a deadlock or serialization failure.
    pub group_commit_retries: AtomicU64,
    commit_buckets: [AtomicU64; 12],
    commit_micros_sum: AtomicU64,
    pub deltas_committed: AtomicU64,
    /// Rows group commits merged into, by where they found them: Postgres, or the tenant's
    /// row cache.
    pub merge_rows_read: AtomicU64,
    pub merge_rows_from_cache: AtomicU64,
    pub frames_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub lagged_sessions: AtomicU64,
    /// Catch-up pages sent, by where they were read: Postgres, or the tenant actor's memory.
    pub catch_up_pages: AtomicU64,
    pub catch_up_pages_from_memory: AtomicU64,
    /// Batches waiting in tenant queues, over all tenants.
    pub queued_batches: AtomicI64,
    /// Capture-file entries queued for writing, and entries dropped because the queue was full.
    pub capture_entries: AtomicU64,
    pub capture_dropped: AtomicU64,
    /// Subscriptions held by sessions (tables and channels).
    pub subscriptions: AtomicI64,
    pub subscription_deltas: AtomicU64,
    pub subscription_snapshot_rows: AtomicU64,
    /// HTTP API: batches pushed and broadcasts sent by server-side writers, and conflicts
    /// resolved by reviewers.
    pub http_pushes: AtomicU64,
    pub http_broadcasts: AtomicU64,
    pub conflict_resolutions: AtomicU64,
    /// RxDB replication (`/rxdb/v1`): sockets authenticated, requests by method, and what
    /// could not be served as asked, by kind.
    pub rxdb_sessions_opened: AtomicU64,
    rxdb_requests: [AtomicU64; RXDB_METHODS.len()],
    rxdb_failures: [AtomicU64; RXDB_FAILURES.len()],
    pub rxdb_resyncs: AtomicU64,
    /// Supabase Realtime (`/realtime/v1`): sockets started, joins asked, messages by kind, and
    /// requests refused by reason.
    pub supabase_sessions_opened: AtomicU64,
    pub supabase_joins: AtomicU64,
    /// Cluster mode: messages handed to NATS, dropped instead (link down, queue full, too
    /// large), and received from other nodes; seq gaps read from Postgres; polls of the
    /// tenants' heads while NATS was down; and the lag of other nodes' commits here.
    pub cluster_published: AtomicU64,
    pub cluster_publish_dropped: AtomicU64,
    pub cluster_received: AtomicU64,
    pub cluster_gap_fills: AtomicU64,
    pub cluster_fallback_polls: AtomicU64,
    pub cluster_deltas_received: AtomicU64,
    pub cluster_lag_ms_sum: AtomicU64,
    pub cluster_lag_count: AtomicU64,
    supabase_messages: [AtomicU64; SUPABASE_MESSAGES.len()],
    supabase_refusals: [AtomicU64; SUPABASE_REFUSALS.len()],
    errors: Mutex<BTreeMap<&'static str, u64>>,
}

/// RxDB request methods as counted (`other`: a method RxDB does not define).
pub const RXDB_METHODS: [&str; 5] = ["auth", "masterChangeStream$", "masterChangesSince", "masterWrite", "other"];

/// Why an RxDB request was not served as asked:
/// - `malformed`: a frame that is not a request (answered when it has an id);
/// - `unknown_collection`: no synced table for the collection (pulls answer nothing, writes are
///   answered with a non-array result, which RxDB retries);
/// - `refused_write`: a document the hub can never write (the rules, an invalid value, an unknown
///   field): answered as a conflict with the current document (or a tombstone);
/// - `write_unavailable`: a write that may succeed later (storage down, busy, rate-limited):
///   answered with a non-array result, which RxDB retries;
/// - `pull_unavailable`: a pull that could not be read: answered with no documents and the
///   checkpoint given, then `RESYNC` once reads work again.
pub const RXDB_FAILURES: [&str; 5] = ["malformed", "unknown_collection", "refused_write", "write_unavailable", "pull_unavailable"];

/// Supabase messages as counted: `broadcast` and `presence` sent by clients,
/// `broadcast_delivered` and `postgres_changes` sent to them, `rest_broadcast` through the REST API.
pub const SUPABASE_MESSAGES: [&str; 5] = ["broadcast", "broadcast_delivered", "presence", "postgres_changes", "rest_broadcast"];

/// Why a Supabase request was refused: the code of its `"Code: message"` reason (README:
/// Supabase Realtime), `malformed` for a frame that could not be read, `other` for the rest.
pub const SUPABASE_REFUSALS: [&str; 17] = [
    "malformed",
    "unmatched topic",
    "TopicNameInvalid",
    "InvalidJoinPayload",
    "InvalidMessage",
    "InvalidFilter",
    "Unauthorized",
    "RealtimeDisabledForConfiguration",
    "ChannelRateLimitReached",
    "ClientJoinRateLimitReached",
    "ClientMessageRateLimitReached",
    "ClientPresenceRateLimitReached",
    "PayloadTooLarge",
    "PayloadFormatNotSupported",
    "SnapshotTooLarge",
    "Unavailable",
    "other",
];

impl Metrics {
    pub fn supabase_messages(&self, kind: &str, n: u64) {
        if let Some(i) = SUPABASE_MESSAGES.iter().position(|k| *k == kind) {
            self.supabase_messages[i].fetch_add(n, Relaxed);
        }
    }

    pub fn supabase_refusal(&self, code: &str) {
        let i = SUPABASE_REFUSALS.iter().position(|k| *k == code).unwrap_or(SUPABASE_REFUSALS.len() - 1);
        self.supabase_refusals[i].fetch_add(1, Relaxed);
    }

    pub fn rxdb_request(&self, method: &str) {
        let i = RXDB_METHODS.iter().position(|m| *m == method).unwrap_or(RXDB_METHODS.len() - 1);
        self.rxdb_requests[i].fetch_add(1, Relaxed);
    }

    /// Count a failure of one of the kinds in [`RXDB_FAILURES`].
    pub fn rxdb_failure(&self, kind: &'static str) {
        if let Some(i) = RXDB_FAILURES.iter().position(|k| *k == kind) {
            self.rxdb_failures[i].fetch_add(1, Relaxed);
        }
    }
}

fn status_index(status: ChangeStatus) -> usize {
    match status {
        ChangeStatus::Applied => 0,
        ChangeStatus::Merged => 1,
        ChangeStatus::Conflict => 2,
        ChangeStatus::Rejected => 3,
        ChangeStatus::Duplicate => 4,
    }
}

const STATUS_NAMES: [&str; 5] = ["applied", "merged", "conflict", "rejected", "duplicate"];

/// Values read from elsewhere at scrape time.
pub struct Gauges {
    pub sessions: usize,
    pub tenants: usize,
    pub db_connections: u32,
    pub db_idle: usize,
    /// Rows held by the tenants' row caches together.
    pub row_cache_rows: usize,
    /// The allocator's own figures (`None` where it cannot tell).
    pub memory: Option<AllocatorStats>,
    /// In cluster mode: whether the NATS link is up, and the nodes alive (this one included).
    pub cluster: Option<ClusterGauges>,
}

#[derive(Debug, Clone, Copy)]
pub struct ClusterGauges {
    pub nats_connected: bool,
    pub nodes: usize,
}

/// jemalloc's figures, in bytes: what the hub asked for, the pages those allocations span,
/// the pages resident, and the allocator's own metadata.
pub struct AllocatorStats {
    pub allocated: u64,
    pub active: u64,
    pub resident: u64,
    pub metadata: u64,
}

impl AllocatorStats {
    /// Read them now (jemalloc refreshes its statistics when the epoch advances).
    pub fn read() -> Option<AllocatorStats> {
        use tikv_jemalloc_ctl::{epoch, stats};
        epoch::advance().ok()?;
        Some(AllocatorStats {
            allocated: stats::allocated::read().ok()? as u64,
            active: stats::active::read().ok()? as u64,
            resident: stats::resident::read().ok()? as u64,
            metadata: stats::metadata::read().ok()? as u64,
        })
    }
}

/// Give every arena's free pages back to the system now. jemalloc returns them on its own only
/// as an arena allocates again (or from its background threads): the arenas of threads that
/// went quiet after a burst would otherwise keep them resident. Returns the resident bytes
/// before and after, where the allocator can tell.
/// Return this thread's cached free memory to its arena (`thread.tcache.flush`). A thread's
/// cache is flushed only by that thread, or when it allocates again: an idle thread's cache
/// keeps the pages of what it holds in use, whatever the arenas purge.
pub fn flush_thread_cache() {
    let name = c"thread.tcache.flush";
    // SAFETY: a control that reads and writes no value; the name is a valid C string.
    unsafe { tikv_jemalloc_sys::mallctl(name.as_ptr(), std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut(), 0) };
}

/// The hub's threads that allocate for it (its HTTP workers and tenant arbiters), so that an
/// idle hub can have each flush its allocator cache before the arenas are purged.
#[derive(Default)]
pub struct AllocatingThreads(Mutex<Vec<actix::dev::ArbiterHandle>>);

/// How long an idle hub waits for a thread to flush its cache.
const FLUSH_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl AllocatingThreads {
    pub fn add(&self, thread: actix::dev::ArbiterHandle) {
        // unwrap: the lock is never held across a panic.
        self.0.lock().unwrap().push(thread);
    }

    /// Each thread flushes its cache (on itself), then every arena is purged: resident bytes
    /// before and after the purge, where the allocator can tell.
    pub async fn flush_and_purge(&self) -> Option<(u64, u64)> {
        flush_thread_cache();
        let threads = self.0.lock().unwrap().clone();
        let flushed: Vec<_> = threads
            .iter()
            .filter_map(|thread| {
                let (done, flushed) = tokio::sync::oneshot::channel();
                thread
                    .spawn(async move {
                        flush_thread_cache();
                        let _ = done.send(());
                    })
                    .then_some(flushed)
            })
            .collect();
        for flushed in flushed {
            let _ = tokio::time::timeout(FLUSH_WAIT, flushed).await;
        }
        tokio::task::spawn_blocking(purge_allocator).await.ok().flatten()
    }
}

pub fn purge_allocator() -> Option<(u64, u64)> {
    let before = AllocatorStats::read()?.resident;
    // `arena.<MALLCTL_ARENAS_ALL>.purge`: every arena's dirty and muzzy pages.
    let name = c"arena.4096.purge";
    // SAFETY: a control that reads and writes no value; the name is a valid C string.
    let failed = unsafe { tikv_jemalloc_sys::mallctl(name.as_ptr(), std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut(), 0) };
    if failed != 0 {
        return None;
    }
    Some((before, AllocatorStats::read()?.resident))
}

impl Metrics {
    pub fn closed(&self, code: CloseCode) {
        if let Some(i) = CLOSE_CODES.iter().position(|c| *c == code) {
            self.closes[i].fetch_add(1, Relaxed);
        }
    }

    pub fn change(&self, status: ChangeStatus) {
        self.changes[status_index(status)].fetch_add(1, Relaxed);
    }

    pub fn error(&self, code: ErrorCode) {
        // unwrap: the lock is never held across a panic.
        *self.errors.lock().unwrap().entry(code.as_str()).or_default() += 1;
    }

    pub fn commit(&self, took: Duration) {
        self.group_commits.fetch_add(1, Relaxed);
        let secs = took.as_secs_f64();
        if let Some(i) = COMMIT_BUCKETS.iter().position(|b| secs <= *b) {
            self.commit_buckets[i].fetch_add(1, Relaxed);
        }
        self.commit_micros_sum.fetch_add(took.as_micros() as u64, Relaxed);
    }

    /// Everything in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let one = |v: f64| vec![(String::new(), v)];
        let get = |a: &AtomicU64| a.load(Relaxed) as f64;
        metric("synchub_sessions", "gauge", "Open WebSocket sessions.", &one(gauges.sessions as f64));
        metric("synchub_tenants_active", "gauge", "Tenant actors running.", &one(gauges.tenants as f64));
        metric("synchub_row_cache_rows", "gauge", "Rows the tenant actors keep from their group commits, over all tenants (at most row_cache_total_rows).", &one(gauges.row_cache_rows as f64));
        metric("synchub_sessions_opened_total", "counter", "Sessions that completed hello.", &one(get(&self.sessions_opened)));
        let closes: Vec<_> = CLOSE_CODES.iter().zip(&self.closes).map(|(c, n)| (format!("{{code=\"{}\"}}", c.code()), get(n))).collect();
        metric("synchub_session_closes_total", "counter", "Sessions the hub closed, by WebSocket close code.", &closes);
        metric("synchub_batches_pushed_total", "counter", "Batches devices pushed.", &one(get(&self.batches_pushed)));
        let changes: Vec<_> = STATUS_NAMES.iter().zip(&self.changes).map(|(s, n)| (format!("{{status=\"{s}\"}}"), get(n))).collect();
        metric("synchub_changes_total", "counter", "Pushed changes by result status.", &changes);
        metric("synchub_group_commit_failures_total", "counter", "Group transactions that failed (batches answered with an error).", &one(get(&self.group_commit_failures)));
        metric("synchub_group_commit_retries_total", "counter", "Group transactions run again after a deadlock or serialization failure.", &one(get(&self.group_commit_retries)));
        let mut cumulative = 0;
        let mut buckets: Vec<_> = COMMIT_BUCKETS
            .iter()
            .zip(&self.commit_buckets)
            .map(|(b, n)| {
                cumulative += n.load(Relaxed);
                (format!("_bucket{{le=\"{b}\"}}"), cumulative as f64)
            })
            .collect();
        // One reading for both, never below the last bucket (a commit may land between reads).
        let commits = get(&self.group_commits).max(cumulative as f64);
        buckets.push(("_bucket{le=\"+Inf\"}".into(), commits));
        buckets.push(("_sum".into(), self.commit_micros_sum.load(Relaxed) as f64 / 1e6));
        buckets.push(("_count".into(), commits));
        metric("synchub_group_commit_seconds", "histogram", "Time from the start of a group transaction to its commit.", &buckets);
        metric("synchub_deltas_committed_total", "counter", "Log entries committed and fanned out.", &one(get(&self.deltas_committed)));
        if let Some(cluster) = gauges.cluster {
            metric("synchub_cluster_nats_connected", "gauge", "Whether this node's NATS link is up (1) or down (0).", &one(f64::from(u8::from(cluster.nats_connected))));
            metric("synchub_cluster_nodes", "gauge", "Nodes alive as far as this one knows, itself included.", &one(cluster.nodes as f64));
            metric("synchub_cluster_published_total", "counter", "Cluster messages handed to NATS.", &one(get(&self.cluster_published)));
            metric("synchub_cluster_publish_dropped_total", "counter", "Cluster messages dropped instead (NATS down, queue full); other nodes read what they carried from Postgres.", &one(get(&self.cluster_publish_dropped)));
            metric("synchub_cluster_received_total", "counter", "Cluster messages received from other nodes.", &one(get(&self.cluster_received)));
            metric("synchub_cluster_deltas_received_total", "counter", "Log entries received from other nodes over NATS.", &one(get(&self.cluster_deltas_received)));
            metric("synchub_cluster_gap_fills_total", "counter", "Seq gaps (lost or late cluster messages) read from Postgres.", &one(get(&self.cluster_gap_fills)));
            metric("synchub_cluster_fallback_polls_total", "counter", "Reads of the tenants' heads from Postgres while NATS was down.", &one(get(&self.cluster_fallback_polls)));
            let lag = [("_sum".to_string(), get(&self.cluster_lag_ms_sum) / 1e3), ("_count".to_string(), get(&self.cluster_lag_count))];
            metric("synchub_cluster_lag_seconds", "summary", "From another node's commit to its deltas arriving here (wall clocks of both nodes).", &lag);
        }
        let rows = [("{source=\"postgres\"}".to_string(), get(&self.merge_rows_read)), ("{source=\"cache\"}".to_string(), get(&self.merge_rows_from_cache))];
        metric("synchub_merge_rows_total", "counter", "Rows group commits merged into, by where they found them: read and locked in Postgres, or kept by the tenant actor from its earlier groups.", &rows);
        metric("synchub_frames_sent_total", "counter", "Frames written to sessions.", &one(get(&self.frames_sent)));
        metric("synchub_bytes_sent_total", "counter", "Bytes of frames written to sessions.", &one(get(&self.bytes_sent)));
        metric("synchub_lagged_sessions_total", "counter", "Live frames a full session mailbox could not take (the session catches up from the log).", &one(get(&self.lagged_sessions)));
        let pages = [("{source=\"postgres\"}".to_string(), get(&self.catch_up_pages)), ("{source=\"memory\"}".to_string(), get(&self.catch_up_pages_from_memory))];
        metric("synchub_catch_up_pages_total", "counter", "Catch-up pages sent, by where they were read.", &pages);
        metric("synchub_tenant_queue_batches", "gauge", "Batches waiting in tenant queues.", &one(self.queued_batches.load(Relaxed) as f64));
        metric("synchub_capture_entries_total", "counter", "Entries queued for the capture file (when recording).", &one(get(&self.capture_entries)));
        metric("synchub_capture_dropped_total", "counter", "Capture entries dropped because the recorder's queue was full.", &one(get(&self.capture_dropped)));
        metric("synchub_subscriptions", "gauge", "Table and channel subscriptions held by sessions.", &one(self.subscriptions.load(Relaxed) as f64));
        metric("synchub_subscription_deltas_total", "counter", "Deltas sent to table subscriptions.", &one(get(&self.subscription_deltas)));
        metric("synchub_subscription_snapshot_rows_total", "counter", "Rows sent in subscription snapshots.", &one(get(&self.subscription_snapshot_rows)));
        metric("synchub_http_pushes_total", "counter", "Batches server-side writers pushed over HTTP.", &one(get(&self.http_pushes)));
        metric("synchub_http_broadcasts_total", "counter", "Broadcasts server-side writers sent over HTTP.", &one(get(&self.http_broadcasts)));
        metric("synchub_conflict_resolutions_total", "counter", "Conflicts resolved through the review API.", &one(get(&self.conflict_resolutions)));
        metric("synchub_rxdb_sessions_opened_total", "counter", "RxDB sockets authenticated.", &one(get(&self.rxdb_sessions_opened)));
        let requests: Vec<_> = RXDB_METHODS.iter().zip(&self.rxdb_requests).map(|(m, n)| (format!("{{method=\"{m}\"}}"), get(n))).collect();
        metric("synchub_rxdb_requests_total", "counter", "RxDB requests, by method.", &requests);
        let failures: Vec<_> = RXDB_FAILURES.iter().zip(&self.rxdb_failures).map(|(k, n)| (format!("{{kind=\"{k}\"}}"), get(n))).collect();
        metric("synchub_rxdb_failures_total", "counter", "RxDB requests not served as asked, by kind (README: RxDB replication).", &failures);
        metric("synchub_supabase_sessions_opened_total", "counter", "Supabase Realtime sockets started.", &one(get(&self.supabase_sessions_opened)));
        metric("synchub_supabase_joins_total", "counter", "Supabase channel joins asked for.", &one(get(&self.supabase_joins)));
        let messages: Vec<_> = SUPABASE_MESSAGES.iter().zip(&self.supabase_messages).map(|(k, n)| (format!("{{kind=\"{k}\"}}"), get(n))).collect();
        metric("synchub_supabase_messages_total", "counter", "Supabase Realtime messages, by kind.", &messages);
        let refusals: Vec<_> = SUPABASE_REFUSALS.iter().zip(&self.supabase_refusals).map(|(k, n)| (format!("{{reason=\"{k}\"}}"), get(n))).collect();
        metric("synchub_supabase_refusals_total", "counter", "Supabase requests refused, by reason (README: Supabase Realtime).", &refusals);
        metric("synchub_rxdb_resyncs_total", "counter", "RESYNC events sent to RxDB clients (a gap, a slow reader, or a lost live stream).", &one(get(&self.rxdb_resyncs)));
        let errors: Vec<_> = self.errors.lock().unwrap().iter().map(|(c, n)| (format!("{{code=\"{c}\"}}"), *n as f64)).collect();
        metric("synchub_errors_total", "counter", "Error frames sent and rejected changes, by code.", &errors);
        metric("synchub_db_connections", "gauge", "Connections in the database pool.", &one(gauges.db_connections as f64));
        metric("synchub_db_connections_idle", "gauge", "Idle connections in the database pool.", &one(gauges.db_idle as f64));
        if let Some(memory) = &gauges.memory {
            let kinds = [("allocated", memory.allocated), ("active", memory.active), ("resident", memory.resident), ("metadata", memory.metadata)];
            let samples: Vec<_> = kinds.iter().map(|(k, v)| (format!("{{kind=\"{k}\"}}"), *v as f64)).collect();
            metric(
                "synchub_allocator_bytes",
                "gauge",
                "The allocator's heap: bytes allocated, in active pages, resident, and its metadata.",
                &samples,
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_a_cumulative_histogram() {
        let m = Metrics::default();
        m.commit(Duration::from_millis(3));
        m.commit(Duration::from_millis(30));
        m.change(ChangeStatus::Conflict);
        m.closed(CloseCode::SlowConsumer);
        m.error(ErrorCode::InvalidValue);
        m.http_pushes.fetch_add(2, Relaxed);
        let memory = AllocatorStats { allocated: 10, active: 20, resident: 30, metadata: 4 };
        let text = m.render(&Gauges { sessions: 2, tenants: 1, db_connections: 3, db_idle: 1, row_cache_rows: 0, memory: Some(memory), cluster: Some(ClusterGauges { nats_connected: true, nodes: 3 }) });
        assert!(text.contains("synchub_cluster_nodes 3\n"));
        assert!(text.contains("synchub_sessions 2\n"));
        assert!(text.contains("synchub_changes_total{status=\"conflict\"} 1\n"));
        assert!(text.contains("synchub_session_closes_total{code=\"4008\"} 1\n"));
        assert!(text.contains("synchub_errors_total{code=\"invalid_value\"} 1\n"));
        assert!(text.contains("synchub_http_pushes_total 2\n"));
        assert!(text.contains("synchub_conflict_resolutions_total 0\n"));
        m.rxdb_request("masterWrite");
        m.rxdb_request("nonsense");
        m.rxdb_failure("refused_write");
        let text = m.render(&Gauges { sessions: 2, tenants: 1, db_connections: 3, db_idle: 1, row_cache_rows: 0, memory: Some(AllocatorStats { allocated: 10, active: 20, resident: 30, metadata: 4 }), cluster: None });
        assert!(text.contains("synchub_rxdb_requests_total{method=\"masterWrite\"} 1\n"));
        assert!(text.contains("synchub_rxdb_requests_total{method=\"other\"} 1\n"));
        assert!(text.contains("synchub_rxdb_failures_total{kind=\"refused_write\"} 1\n"));
        assert!(text.contains("synchub_group_commit_seconds_bucket{le=\"0.0025\"} 0\n"));
        assert!(text.contains("synchub_group_commit_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("synchub_group_commit_seconds_bucket{le=\"0.05\"} 2\n"));
        assert!(text.contains("synchub_group_commit_seconds_count 2\n"));
        assert!(text.contains("synchub_allocator_bytes{kind=\"resident\"} 30\n"));
        // Every sample line belongs to a declared metric.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let base = name.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count");
            assert!(text.contains(&format!("# TYPE {base} ")), "{line}");
        }
    }
}
