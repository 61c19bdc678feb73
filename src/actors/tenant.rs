//! `TenantActor`: one per tenant. It serializes the tenant's merges, commits the batches that
//! queued up while a transaction was in flight in one transaction (group commit), and after
//! commit fans the deltas out to the tenant's sessions in seq order, with no gap.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use protocol::{ChangeResult, Channel, ConflictEvent, Delta, PresenceEntry, SessionMode};
use tokio::sync::oneshot;

use super::messages::{
    ApplyBatch, Broadcast, ConflictNews, JoinTopic, LeaveTopic, LiveFrame, LogAppended, Notice, RecentLog, SessionControl, SharedFrame,
    SharedServerFrame, Online, Subscribe, TellConflicts, Topic, TopicEventKind, Track, Unsubscribe, Watch,
};
use super::topics::{Deliveries, Topics};
use super::registry::TenantRegistry;
use super::sweep::SessionHandle;
use crate::cluster::{Body, Cluster, RemoteSession};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::ids::{DeviceId, NodeId, Seq, SessionId, TenantId, UserId};
use crate::metrics::Metrics;
use crate::storage::apply::{ApplyLimits, BatchInput};
use crate::storage::log::TenantHead;
use crate::storage::row_cache::RowCache;
use crate::storage::{GroupConnection, Store};

/// Cluster mode: what the actor tells the other nodes and does with what they tell it.
mod cluster;

/// How often the actor retries nudging lagged sessions and checks for idleness.
const TICK: Duration = Duration::from_millis(250);
/// Log entries read per query when filling a gap left by other SQL writers.
const LOG_READ_PAGE: u32 = 1000;
/// Frames that keep their renderings for other protocols (the latest ones, still being
/// delivered); older frames kept for catch-up let theirs go.
const RENDERED_FRAMES: usize = 64;
/// Backstop for a lost notification: while sessions are connected, re-read the log this often.
const LOG_REREAD_EVERY: Duration = Duration::from_secs(5);

struct Subscriber {
    device: DeviceId,
    /// A native protocol session (it takes native broadcast frames).
    native: bool,
    /// Replaced by a newer exclusive session of the same device.
    exclusive: bool,
    /// The session's mailbox, shared with the session clock.
    link: Arc<SessionHandle>,
    /// A frame could not be delivered; the session must be told to catch up.
    lagged: bool,
    user: UserId,
    role: Arc<str>,
    mode: SessionMode,
    since_ms: u64,
    watches_presence: bool,
    watches_conflicts: bool,
    /// A presence diff could not be delivered: the whole list goes out on the next tick.
    presence_stale: bool,
}

struct Queued {
    input: BatchInput,
    reply: oneshot::Sender<Result<Vec<ChangeResult>>>,
}

impl Subscriber {
    /// The session as presence shows it (built when asked: subscribers keep shared ids only).
    fn presence(&self, session: SessionId) -> PresenceEntry {
        PresenceEntry {
            session_id: session,
            device_id: self.device.to_string(),
            user_id: self.user.to_string(),
            role: self.role.to_string(),
            mode: self.mode,
            since_ms: self.since_ms,
        }
    }
}

pub struct TenantActor {
    tenant: TenantId,
    store: Arc<Store>,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    registry: std::sync::Weak<TenantRegistry>,
    sessions: HashMap<SessionId, Subscriber>,
    queue: VecDeque<Queued>,
    committing: bool,
    /// The head after this actor's last commit (or as read at start): the next group expects
    /// it, and finds out in its own transaction when another writer moved it. `None` after a
    /// failed commit, whose outcome may be unknown.
    committed_head: Option<Seq>,
    /// The rows the last groups read and wrote (at most `row_cache_rows`), current while the
    /// head is `committed_head`; lent to the group in flight.
    row_cache: Option<RowCache>,
    /// Last seq handed to subscribers; fan-out continues at `fanned + 1`.
    fanned: Seq,
    /// The tenant's epoch and log floor: `hello` is answered from them instead of a query per
    /// session. Read at start; `trim_log`'s notification brings the new floor (`learn_floor`),
    /// and a catch-up from Postgres that meets trimmed entries resyncs the device meanwhile.
    epoch: Arc<str>,
    log_floor: Seq,
    /// The latest fanned-out frames, covering `(recent_after, fanned]` without a gap, at most
    /// about `catch_up_cache_deltas` entries: catch-up reads these instead of Postgres.
    recent: VecDeque<Arc<SharedFrame>>,
    recent_after: Seq,
    recent_len: usize,
    /// Committed deltas not yet fanned out because an earlier seq is still missing.
    ready: BTreeMap<Seq, Delta>,
    reading_log: bool,
    last_log_read: Instant,
    /// The log grew while a read was under way: read again after it.
    log_dirty: bool,
    last_activity: Instant,
    /// Channels joined by name (Supabase Realtime): members, broadcasts, presence.
    topics: Topics,
    /// Cluster mode: the link to the other nodes.
    cluster: Option<Arc<Cluster>>,
    /// The tenant's sessions on other nodes, by node.
    remote: HashMap<NodeId, RemoteNode>,
    /// The tenant's NATS subscription is held, or being taken (the tick retries it when not).
    subscription: Subscription,
    /// A seq gap waits `cluster_gap_wait_ms` for the missing seqs to arrive over NATS.
    gap_wait_pending: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subscription {
    Off,
    Taking,
    Held,
}

/// What this node knows of another node's sessions of the tenant.
struct RemoteNode {
    /// When it last said anything about the tenant: a node that dies before any heartbeat of
    /// it was heard is forgotten once this is older than `cluster_node_timeout_ms`.
    heard: Instant,
    sessions: HashMap<SessionId, RemoteSession>,
}

impl TenantActor {
    pub fn new(
        tenant: TenantId,
        store: Arc<Store>,
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        registry: std::sync::Weak<TenantRegistry>,
        cluster: Option<Arc<Cluster>>,
    ) -> Self {
        TenantActor {
            tenant,
            store,
            metrics,
            registry,
            sessions: HashMap::new(),
            queue: VecDeque::new(),
            committing: false,
            committed_head: None,
            row_cache: None,
            fanned: 0,
            epoch: Arc::from(""),
            log_floor: 0,
            recent: VecDeque::new(),
            recent_after: 0,
            recent_len: 0,
            ready: BTreeMap::new(),
            reading_log: false,
            last_log_read: Instant::now(),
            log_dirty: false,
            last_activity: Instant::now(),
            topics: Topics::new(config.supabase_sessions_channel.as_deref().filter(|c| !c.is_empty()).map(Arc::from)),
            cluster,
            remote: HashMap::new(),
            subscription: Subscription::Off,
            gap_wait_pending: false,
            config,
        }
    }

    fn limits(&self) -> ApplyLimits {
        ApplyLimits {
            max_field_bytes: self.config.max_field_bytes,
            max_key_bytes: self.config.max_key_bytes,
            max_clock_skew_ms: self.config.max_clock_skew_ms,
        }
    }

    /// Start the next group transaction if none is in flight. The group is formed once a
    /// connection is free: batches that arrive while the pool is busy join it, so a hub under
    /// load commits fewer and larger groups.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        if self.committing || self.queue.is_empty() {
            return;
        }
        self.committing = true;
        let store = self.store.clone();
        ctx.spawn(async move { store.group_connection().await }.into_actor(self).map(|conn, actor, ctx| actor.commit_queued(conn, ctx)));
    }

    /// Commit the queued batches (up to the group limit) on `conn`.
    fn commit_queued(&mut self, conn: Result<GroupConnection>, ctx: &mut Context<Self>) {
        let mut inputs: Vec<BatchInput> = Vec::new();
        let mut replies = Vec::new();
        let mut changes = 0;
        while let Some(next) = self.queue.front() {
            if !inputs.is_empty() && changes + next.input.changes.len() > self.config.group_commit_max_changes {
                break;
            }
            changes += next.input.changes.len();
            // unwrap: front() was Some.
            let queued = self.queue.pop_front().expect("queued batch");
            inputs.push(queued.input);
            replies.push(queued.reply);
        }
        self.metrics.queued_batches.fetch_sub(inputs.len() as i64, Ordering::Relaxed);
        let store = self.store.clone();
        let tenant = self.tenant.clone();
        let limits = self.limits();
        let expected_head = self.committed_head;
        let mut row_cache = self.row_cache.take().unwrap_or_else(|| RowCache::new(self.config.row_cache_rows, self.store.row_budget()));
        let started = Instant::now();
        let metrics = self.metrics.clone();
        let work = async move {
            let mut conn = match conn {
                Ok(conn) => conn,
                Err(err) => return (Err(err), row_cache),
            };
            let mut attempt = 0;
            loop {
                let commit = store.commit_group(&mut conn, &tenant, &inputs, limits, expected_head, &mut row_cache);
                match store.within_transaction_deadline(commit).await {
                    Err(Error::Database(err)) if attempt < 2 && is_retryable(&err) => {
                        attempt += 1;
                        metrics.group_commit_retries.fetch_add(1, Ordering::Relaxed);
                    }
                    other => return (other, row_cache),
                }
            }
        };
        ctx.spawn(work.into_actor(self).map(move |(outcome, row_cache), actor, ctx| {
            actor.committing = false;
            actor.row_cache = Some(row_cache);
            actor.last_activity = Instant::now();
            match outcome {
                Ok(mut output) => {
                    // A group committed piece by piece, some of it perhaps not at all, leaves
                    // no head this actor can vouch for; the next group reads it under lock.
                    actor.committed_head = output.failed.is_empty().then_some(output.head_seq);
                    actor.metrics.commit(started.elapsed());
                    actor.metrics.merge_rows_read.fetch_add(output.rows_read, Ordering::Relaxed);
                    actor.metrics.merge_rows_from_cache.fetch_add(output.rows_from_cache, Ordering::Relaxed);
                    let mut failed: HashMap<usize, Error> = output.failed.drain(..).collect();
                    for (b, (reply, results)) in replies.into_iter().zip(output.results).enumerate() {
                        if let Some(err) = failed.remove(&b) {
                            actor.metrics.group_commit_failures.fetch_add(1, Ordering::Relaxed);
                            let _ = reply.send(Err(Error::client(err.code(), err.public_message())));
                            continue;
                        }
                        for result in &results {
                            actor.metrics.change(result.status);
                            if let Some(code) = result.reason {
                                actor.metrics.error(code);
                            }
                        }
                        let _ = reply.send(Ok(results));
                    }
                    actor.publish_deltas(&output.deltas);
                    if let Some(open) = output.open_conflicts {
                        let opened = output.conflicts.into_iter().map(|c| (ConflictEvent::Opened, c));
                        let events = opened.chain(output.resolved.into_iter().map(|c| (ConflictEvent::Resolved, c))).collect();
                        actor.tell_conflicts(ConflictNews { events, open }, true);
                    }
                    actor.accept(output.deltas, ctx);
                }
                Err(err) => {
                    actor.committed_head = None;
                    tracing::error!(tenant = %actor.tenant, %err, "group commit failed");
                    actor.metrics.group_commit_failures.fetch_add(1, Ordering::Relaxed);
                    for reply in replies {
                        let _ = reply.send(Err(Error::client(err.code(), err.public_message())));
                    }
                }
            }
            actor.pump(ctx);
        }));
    }

    /// Take committed deltas (own or read from the log) and fan out what is contiguous.
    fn accept(&mut self, deltas: Vec<Delta>, ctx: &mut Context<Self>) {
        for delta in deltas {
            if delta.seq > self.fanned {
                self.ready.insert(delta.seq, delta);
            }
        }
        let mut batch = Vec::new();
        while let Some(entry) = self.ready.first_entry() {
            if *entry.key() != self.fanned + batch.len() as u64 + 1 {
                break;
            }
            batch.push(entry.remove());
        }
        if !batch.is_empty() {
            self.fan_out(batch);
        }
        self.fill_gap(ctx);
    }

    /// Seqs are missing before those in `ready`: someone else committed them. Alone, the hub
    /// reads them at once (another SQL writer's, whose notification brought them); in a
    /// cluster they are most likely another node's commit still on its way over NATS, so they
    /// are read from the log only if they have not come within `cluster_gap_wait_ms`.
    fn fill_gap(&mut self, ctx: &mut Context<Self>) {
        if self.ready.is_empty() {
            return;
        }
        // Bounded: what is dropped here is read from the log in its turn.
        let limit = self.config.group_commit_max_changes.saturating_mul(4).max(LOG_READ_PAGE as usize);
        while self.ready.len() > limit {
            self.ready.pop_last();
        }
        if self.cluster.is_none() {
            return self.read_log(ctx);
        }
        if self.gap_wait_pending {
            return;
        }
        self.gap_wait_pending = true;
        ctx.run_later(Duration::from_millis(self.config.cluster_gap_wait_ms), |actor, ctx| {
            actor.gap_wait_pending = false;
            if !actor.ready.is_empty() {
                actor.metrics.cluster_gap_fills.fetch_add(1, Ordering::Relaxed);
                actor.read_log(ctx);
            }
        });
    }

    fn fan_out(&mut self, deltas: Vec<Delta>) {
        let after = self.fanned;
        let seq = deltas.last().map(|d| d.seq).unwrap_or(after);
        self.fanned = seq;
        if !self.committing && self.committed_head == Some(after) {
            self.follow_head(after, seq, &deltas);
        }
        self.metrics.deltas_committed.fetch_add(deltas.len() as u64, Ordering::Relaxed);
        let frames = Arc::new(SharedFrame::split_by_origin(after, deltas));
        // Remembered even with no session: catch-up from memory answers up to `fanned`, so a
        // frame left out would be skipped by the next device that catches up.
        self.remember(frames.iter().cloned());
        // The frames that these pushed out of the window of fresh ones.
        for stale in self.recent.iter().rev().skip(RENDERED_FRAMES).take(frames.len()) {
            stale.forget_renderings();
        }
        if self.sessions.is_empty() {
            return;
        }
        let mut gone = Vec::new();
        for (id, sub) in self.sessions.iter_mut() {
            match sub.link.session.try_live(LiveFrame(frames.clone())) {
                Ok(()) => {}
                Err(SendError::Full(_)) => {
                    sub.lagged = true;
                    self.metrics.lagged_sessions.fetch_add(1, Ordering::Relaxed);
                }
                Err(SendError::Closed(_)) => gone.push(*id),
            }
        }
        self.remove_sessions(gone);
        self.nudge_lagged();
    }

    /// Someone else's seqs `after + 1 ..= seq` (another node's commit, another SQL client's
    /// write) follow this actor's last commit with none missing: the next group expects the
    /// new head rather than finding it moved and being redone, and the row cache drops the
    /// rows they wrote and stays usable. (Another writer between them shows in the group's own
    /// transaction, as always.)
    ///
    /// Only the hub's own commits name rows exactly as the cache holds them (by the keys its
    /// merge read from Postgres); after another SQL client's write the cache starts over.
    fn follow_head(&mut self, after: Seq, seq: Seq, deltas: &[Delta]) {
        self.committed_head = Some(seq);
        let hub_written = deltas.iter().all(|d| d.origin.is_some());
        if let Some(cache) = self.row_cache.as_mut().filter(|_| hub_written) {
            let written = deltas.iter().map(|d| (d.table.as_str(), serde_json::to_string(&d.key).unwrap_or_default()));
            cache.advance(after, seq, written);
        }
    }

    /// Forget sessions and tell presence watchers they left.
    fn remove_sessions(&mut self, ids: impl IntoIterator<Item = SessionId>) {
        let mut leaves = Vec::new();
        for id in ids {
            let Some(gone) = self.sessions.remove(&id) else { continue };
            leaves.push(gone.presence(id));
            let deliveries = self.topics.remove_session(id);
            self.deliver_topic_events(deliveries);
        }
        if !leaves.is_empty() {
            self.publish(Body::Presence { joins: Vec::new(), leaves: leaves.iter().map(|e| e.session_id).collect() });
        }
        self.announce_presence(Vec::new(), leaves);
    }

    /// Hand topic events to their sessions. A presence event that does not fit a mailbox makes
    /// that member's presence stale (the whole state follows on a tick); a broadcast that does
    /// not fit is missed, as broadcasts are.
    fn deliver_topic_events(&mut self, deliveries: Deliveries) {
        for (id, event) in deliveries {
            let Some(sub) = self.sessions.get(&id) else { continue };
            let presence = !matches!(event.kind, TopicEventKind::Broadcast { .. });
            if sub.link.session.try_notice(Notice::Topic(event.clone())).is_err() && presence {
                self.topics.mark_stale(id, &event.topic);
            }
        }
    }

    fn presence_list(&self) -> Arc<Vec<PresenceEntry>> {
        Arc::new(online(&self.sessions, &self.remote))
    }

    fn announce_presence(&mut self, joins: Vec<PresenceEntry>, leaves: Vec<PresenceEntry>) {
        if joins.is_empty() && leaves.is_empty() {
            return;
        }
        let deliveries = self.topics.sessions_changed(&joins, &leaves);
        self.deliver_topic_events(deliveries);
        let (joins, leaves) = (Arc::new(joins), Arc::new(leaves));
        for sub in self.sessions.values_mut().filter(|s| s.watches_presence && !s.presence_stale) {
            let notice = Notice::PresenceDiff { joins: joins.clone(), leaves: leaves.clone() };
            if sub.link.session.try_notice(notice).is_err() {
                sub.presence_stale = true;
            }
        }
    }

    /// Watchers that missed a diff get the whole list again.
    fn refresh_stale_presence(&mut self) {
        let (sessions, remote) = (&self.sessions, &self.remote);
        let deliveries = self.topics.refresh_stale(|| online(sessions, remote));
        self.deliver_topic_events(deliveries);
        if !self.sessions.values().any(|s| s.presence_stale) {
            return;
        }
        let list = self.presence_list();
        for sub in self.sessions.values_mut().filter(|s| s.presence_stale) {
            if sub.link.session.try_notice(Notice::PresenceList(list.clone())).is_ok() {
                sub.presence_stale = false;
            }
        }
    }

    /// Conflicts a commit opened or resolved, to the sessions watching them (and, when they
    /// happened here, to the other nodes' sessions). A watcher whose mailbox is full misses
    /// them; the review API lists them all.
    fn tell_conflicts(&mut self, news: ConflictNews, here: bool) {
        if news.events.is_empty() {
            return;
        }
        if here && self.cluster.is_some() {
            self.publish(Body::Conflicts { events: news.events.clone(), open: news.open });
        }
        let news = Arc::new(news);
        for sub in self.sessions.values().filter(|s| s.watches_conflicts) {
            let _ = sub.link.session.try_notice(Notice::Conflicts(news.clone()));
        }
    }

    /// Keep frames that continue `recent` for catch-up, dropping the oldest past the limit.
    fn remember(&mut self, frames: impl IntoIterator<Item = Arc<SharedFrame>>) {
        let limit = self.config.catch_up_cache_deltas;
        if limit == 0 {
            return;
        }
        for frame in frames {
            let end = self.recent.back().map_or(self.recent_after, |f| f.seq);
            if frame.after != end {
                // Not contiguous (cannot happen for fanned frames): start over from here.
                self.recent.clear();
                self.recent_len = 0;
                self.recent_after = frame.after;
            }
            self.recent_len += frame.deltas.len();
            self.recent.push_back(frame);
        }
        while self.recent_len > limit && self.recent.len() > 1 {
            // unwrap: len > 1.
            let oldest = self.recent.pop_front().expect("a frame");
            self.recent_len -= oldest.deltas.len();
            self.recent_after = oldest.seq;
        }
    }

    /// The frames holding the next `limit` entries after `after`, if memory reaches back that far.
    fn recent_after(&self, after: Seq, limit: u32) -> Option<(Vec<Arc<SharedFrame>>, Seq)> {
        if self.config.catch_up_cache_deltas == 0 || after < self.recent_after || after > self.fanned {
            return None;
        }
        let first = self.recent.partition_point(|f| f.seq <= after);
        let mut frames = Vec::new();
        let mut entries = 0;
        for frame in self.recent.range(first..) {
            if entries >= limit as usize {
                break;
            }
            entries += frame.deltas.iter().filter(|d| d.seq > after).count();
            frames.push(frame.clone());
        }
        Some((frames, self.fanned))
    }

    /// The log was trimmed (`synchub.trim_log` notifies like a write): hellos from below the
    /// new floor get must_resync, and memory no longer serves what the log dropped.
    fn learn_floor(&mut self, floor: Seq) {
        if floor <= self.log_floor {
            return;
        }
        self.log_floor = floor;
        while self.recent.front().is_some_and(|f| f.seq <= floor) {
            // unwrap: front() was Some.
            let dropped = self.recent.pop_front().expect("a frame");
            self.recent_len -= dropped.deltas.len();
            self.recent_after = dropped.seq;
        }
    }

    fn nudge_lagged(&mut self) {
        for sub in self.sessions.values_mut().filter(|s| s.lagged) {
            if sub.link.session.try_control(SessionControl::Lagged).is_ok() {
                sub.lagged = false;
            }
        }
    }

    /// Read log entries after `fanned` (written by other SQL clients) and fan them out.
    fn read_log(&mut self, ctx: &mut Context<Self>) {
        if self.reading_log {
            self.log_dirty = true;
            return;
        }
        self.reading_log = true;
        self.log_dirty = false;
        self.last_log_read = Instant::now();
        let store = self.store.clone();
        let tenant = self.tenant.clone();
        let after = self.fanned;
        let upto = self.ready.first_key_value().map(|(s, _)| s - 1);
        let read = async move { store.within_transaction_deadline(store.read_log(&tenant, after, upto, LOG_READ_PAGE)).await };
        ctx.spawn(read.into_actor(self).map(
            |result, actor, ctx| {
                actor.reading_log = false;
                match result {
                    Ok(read) => {
                        actor.learn_floor(read.log_floor);
                        let full_page = read.deltas.len() as u32 == LOG_READ_PAGE;
                        actor.accept(read.deltas, ctx);
                        if full_page || actor.log_dirty {
                            actor.read_log(ctx);
                        }
                    }
                    Err(err) => {
                        tracing::warn!(tenant = %actor.tenant, %err, "log read failed; retrying on the next tick");
                        actor.log_dirty = true;
                    }
                }
            },
        ));
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        // Unsubscribe is best-effort (try_send); sessions that are gone are dropped here.
        let gone: Vec<SessionId> = self.sessions.iter().filter(|(_, s)| !s.link.session.connected()).map(|(id, _)| *id).collect();
        self.remove_sessions(gone);
        self.refresh_stale_presence();
        self.nudge_lagged();
        if !self.sessions.is_empty() && self.last_log_read.elapsed() >= LOG_REREAD_EVERY {
            self.log_dirty = true;
        }
        if self.log_dirty && !self.reading_log {
            self.read_log(ctx);
        }
        if self.cluster.is_some() {
            self.cluster_tick(ctx);
        }
        let idle = self.sessions.is_empty() && self.queue.is_empty() && !self.committing && !self.reading_log;
        if idle && self.last_activity.elapsed() >= self.config.tenant_idle() {
            if let Some(registry) = self.registry.upgrade() {
                registry.forget(&self.tenant, &ctx.address());
            }
            ctx.stop();
        }
    }
}

/// The tenant's sessions as presence lists them, oldest first.
fn online(sessions: &HashMap<SessionId, Subscriber>, remote: &HashMap<NodeId, RemoteNode>) -> Vec<PresenceEntry> {
    let mut online: Vec<PresenceEntry> = sessions.iter().map(|(id, s)| s.presence(*id)).collect();
    online.extend(remote.values().flat_map(|node| node.sessions.values().map(|s| s.entry.clone())));
    online.sort_by_key(|e| (e.since_ms, e.session_id));
    online
}

fn is_retryable(err: &sqlx::Error) -> bool {
    // Deadlock with another writer's trigger, or a serialization failure: redo the group.
    err.as_database_error().and_then(|e| e.code()).is_some_and(|c| c == "40P01" || c == "40001")
}

impl Actor for TenantActor {
    type Context = Context<Self>;

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        // Batches still queued are answered `shutting_down` as their reply channels drop.
        self.metrics.queued_batches.fetch_sub(self.queue.len() as i64, Ordering::Relaxed);
    }

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.config.tenant_mailbox);
        ctx.run_interval(TICK, |actor, ctx| actor.tick(ctx));
        // Learn where the log stands before handling anything else. In a cluster, listen to the
        // other nodes first: a commit of theirs after the read then arrives over NATS, and one
        // before it is below the head and skipped.
        let store = self.store.clone();
        let tenant = self.tenant.clone();
        let cluster = self.cluster.clone();
        self.subscription = if cluster.is_some() { Subscription::Taking } else { Subscription::Off };
        let head = async move {
            let subscription = match &cluster {
                Some(cluster) => Some(cluster.subscribe(&tenant).await),
                None => None,
            };
            (subscription, store.within_transaction_deadline(store.tenant_head(&tenant)).await)
        };
        ctx.wait(head.into_actor(self).map(|(subscription, head), actor, ctx| match head {
            Ok(head) => {
                if let Some(subscription) = subscription {
                    actor.follow_cluster(subscription, ctx);
                }
                actor.fanned = head.head_seq;
                actor.committed_head = Some(head.head_seq);
                actor.epoch = head.epoch;
                actor.log_floor = head.log_floor;
                actor.recent_after = head.head_seq;
                actor.warm_recent(ctx, head.head_seq);
            }
            Err(err) => {
                tracing::error!(tenant = %actor.tenant, %err, "cannot read tenant head; tenant actor stops");
                if let Some(registry) = actor.registry.upgrade() {
                    registry.forget(&actor.tenant, &ctx.address());
                }
                ctx.stop();
            }
        }));
    }
}

impl TenantActor {
    /// Fill `recent` with the log's latest entries up to `head` (one read per tenant, instead
    /// of one per returning device). The actor handles nothing else until then: after a
    /// restart, devices that said hello before the read was done each read the log themselves
    /// (5,613 of 10,000 catch-up pages in a reconnect storm).
    fn warm_recent(&mut self, ctx: &mut Context<Self>, head: Seq) {
        let limit = self.config.catch_up_cache_deltas;
        if limit == 0 || head == 0 {
            return;
        }
        let store = self.store.clone();
        let tenant = self.tenant.clone();
        let after = head.saturating_sub(limit as u64);
        let read = async move { store.within_transaction_deadline(store.read_log(&tenant, after, Some(head), limit as u32)).await };
        ctx.wait(read.into_actor(self).map(
            move |result, actor, _ctx| {
                let Ok(read) = result else { return };
                let deltas = read.deltas;
                // Only if they end where memory begins, so that no seq is missing in between.
                let (Some(first), Some(last)) = (deltas.first().map(|d| d.seq), deltas.last().map(|d| d.seq)) else { return };
                if last != actor.recent_after {
                    return;
                }
                let newer: Vec<_> = actor.recent.drain(..).collect();
                actor.recent_len = 0;
                actor.recent_after = first - 1;
                let older = SharedFrame::split_by_origin(first - 1, deltas);
                actor.remember(older.into_iter().chain(newer));
            },
        ));
    }
}

impl Handler<RecentLog> for TenantActor {
    type Result = Option<(Vec<Arc<SharedFrame>>, Seq)>;

    fn handle(&mut self, msg: RecentLog, _ctx: &mut Context<Self>) -> Self::Result {
        self.recent_after(msg.after, msg.limit)
    }
}

impl Handler<ApplyBatch> for TenantActor {
    type Result = Result<oneshot::Receiver<Result<Vec<ChangeResult>>>>;

    fn handle(&mut self, msg: ApplyBatch, ctx: &mut Context<Self>) -> Self::Result {
        self.last_activity = Instant::now();
        if self.queue.len() >= self.config.tenant_queue_batches {
            return Err(Error::Busy);
        }
        let (reply, answer) = oneshot::channel();
        self.queue.push_back(Queued { input: msg.input, reply });
        self.metrics.queued_batches.fetch_add(1, Ordering::Relaxed);
        self.pump(ctx);
        Ok(answer)
    }
}

impl Handler<Subscribe> for TenantActor {
    type Result = MessageResult<Subscribe>;

    fn handle(&mut self, msg: Subscribe, _ctx: &mut Context<Self>) -> Self::Result {
        self.last_activity = Instant::now();
        // One live session per device: the newer one replaces the older.
        let replaced: Vec<SessionId> = if msg.exclusive {
            self.sessions.iter().filter(|(_, s)| s.exclusive && s.device == msg.device).map(|(id, _)| *id).collect()
        } else {
            Vec::new()
        };
        for id in &replaced {
            if let Some(old) = self.sessions.get(id) {
                let _ = old.link.session.try_control(SessionControl::Replaced);
            }
        }
        self.remove_sessions(replaced);
        let subscriber = Subscriber {
            native: matches!(msg.link.session, super::sweep::SessionAddr::Native(_)),
            device: msg.device,
            exclusive: msg.exclusive,
            link: msg.link,
            lagged: false,
            user: msg.user,
            role: msg.role,
            mode: msg.mode,
            since_ms: msg.since_ms,
            watches_presence: false,
            watches_conflicts: false,
            presence_stale: false,
        };
        let joined = subscriber.presence(msg.session);
        self.sessions.insert(msg.session, subscriber);
        if self.cluster.is_some() {
            self.publish(Body::Presence { joins: vec![RemoteSession { entry: joined.clone(), exclusive: msg.exclusive }], leaves: Vec::new() });
        }
        self.announce_presence(vec![joined], Vec::new());
        MessageResult(TenantHead { epoch: self.epoch.clone(), head_seq: self.fanned, log_floor: self.log_floor })
    }
}

impl Handler<Unsubscribe> for TenantActor {
    type Result = ();

    fn handle(&mut self, msg: Unsubscribe, _ctx: &mut Context<Self>) {
        self.remove_sessions([msg.session]);
        self.last_activity = Instant::now();
    }
}

impl Handler<Online> for TenantActor {
    type Result = MessageResult<Online>;

    fn handle(&mut self, _: Online, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(self.presence_list())
    }
}

impl Handler<Watch> for TenantActor {
    type Result = ();

    fn handle(&mut self, msg: Watch, _ctx: &mut Context<Self>) {
        let list = (msg.channel == Channel::Presence && msg.on).then(|| self.presence_list());
        let Some(sub) = self.sessions.get_mut(&msg.session) else { return };
        match msg.channel {
            Channel::Conflicts => sub.watches_conflicts = msg.on,
            Channel::Presence => {
                sub.watches_presence = msg.on;
                // The list goes through the same mailbox as the diffs after it, so none overtakes it.
                if let Some(list) = list {
                    sub.presence_stale = sub.link.session.try_notice(Notice::PresenceList(list)).is_err();
                }
            }
        }
    }
}

impl Handler<Broadcast> for TenantActor {
    type Result = usize;

    /// Native sessions get every public broadcast of a server-side writer (protocol §13.4),
    /// and native dashboards also those of Supabase clients (screen-to-screen traffic, which
    /// devices are spared); sessions that joined the channel as a topic get it as the topic's
    /// event. Ephemeral: a session whose mailbox is full misses it.
    fn handle(&mut self, msg: Broadcast, _ctx: &mut Context<Self>) -> usize {
        if self.cluster.is_some() {
            let Broadcast { channel, event, payload, private, from } = &msg;
            let body = Body::Broadcast { channel: channel.clone(), event: event.clone(), payload: payload.to_string(), private: *private, from: *from };
            self.publish(body);
        }
        self.deliver_broadcast(msg)
    }
}

impl TenantActor {
    /// A broadcast to the sessions of this node; answers how many it was handed to.
    fn deliver_broadcast(&mut self, msg: Broadcast) -> usize {
        let topic = Topic { name: Arc::from(msg.channel.as_str()), private: msg.private };
        let event = msg.event.as_deref().unwrap_or("broadcast");
        let deliveries = self.topics.broadcast(&topic, event, &msg.payload, msg.from);
        let mut reached = deliveries.len();
        self.deliver_topic_events(deliveries);
        if !msg.private {
            let from_writer = msg.from.is_none();
            let frame = protocol::ServerFrame::Broadcast { channel: msg.channel, event: msg.event, payload: msg.payload };
            let frame = Arc::new(SharedServerFrame::new(frame));
            reached += self
                .sessions
                .values()
                .filter(|s| s.native && (from_writer || s.mode == SessionMode::Dashboard))
                .filter(|s| s.link.session.try_notice(Notice::Broadcast(frame.clone())).is_ok())
                .count();
        }
        reached
    }
}

impl Handler<JoinTopic> for TenantActor {
    type Result = ();

    fn handle(&mut self, msg: JoinTopic, _ctx: &mut Context<Self>) {
        if !self.sessions.contains_key(&msg.session) {
            return; // gone meanwhile
        }
        let (sessions, remote) = (&self.sessions, &self.remote);
        let deliveries = self.topics.join(msg.session, msg.topic, msg.receive_own, msg.presence, || online(sessions, remote));
        self.deliver_topic_events(deliveries);
    }
}

impl Handler<LeaveTopic> for TenantActor {
    type Result = ();

    fn handle(&mut self, msg: LeaveTopic, _ctx: &mut Context<Self>) {
        if self.topics.is_member(msg.session, &msg.topic) {
            self.publish_track(msg.session, &msg.topic, "", None);
        }
        let deliveries = self.topics.leave(msg.session, &msg.topic);
        self.deliver_topic_events(deliveries);
    }
}

impl Handler<Track> for TenantActor {
    type Result = ();

    fn handle(&mut self, msg: Track, _ctx: &mut Context<Self>) {
        if self.topics.is_member(msg.session, &msg.topic) {
            self.publish_track(msg.session, &msg.topic, &msg.key, msg.meta.as_ref());
        }
        let deliveries = self.topics.track(msg.session, &msg.topic, msg.key, msg.meta);
        self.deliver_topic_events(deliveries);
    }
}

impl Handler<TellConflicts> for TenantActor {
    type Result = ();

    fn handle(&mut self, msg: TellConflicts, _ctx: &mut Context<Self>) {
        self.tell_conflicts(msg.0, true);
    }
}

impl Handler<LogAppended> for TenantActor {
    type Result = ();

    fn handle(&mut self, _: LogAppended, ctx: &mut Context<Self>) {
        self.last_activity = Instant::now();
        self.read_log(ctx);
    }
}
