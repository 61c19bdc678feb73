//! The group-commit transaction: several devices' batches for one tenant are checked against
//! device cursors, merged into the application's tables, logged with gap-free seqs, and
//! committed together. Writes are set-based (one statement per table and column set); when
//! one of them fails, the group is redone change by change under savepoints so that only the
//! bad change is rejected.

use std::borrow::Cow;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use protocol::{holds_nul, Change, ChangeResult, ChangeStatus, ConflictRecord, Delta, ErrorCode, Hlc, Object, Op};
use serde_json::{json, Value};
use sqlx::types::Json;
use sqlx::{Connection, PgConnection, Row};
use uuid::Uuid;

use super::as_written::{keep_as_written, same_value, stored_as_written};
use super::catalog::{Catalog, TableSchema};
use super::clock_writers::ClockWriters;
use super::clocks::{self, WriterNumber};
use super::presentation::Presentation;
use super::conflicts::{self, ResolveConflict};
use super::record::{self, ChangeToLog, LogOp};
use super::refusal::{self, Blame};
use super::row_cache::{CachedRow, RowCache};
use super::Store;
use crate::error::{Error, Result};
use crate::ids::{DeviceId, Seq, TenantId, UserId};
use crate::rules::AccessView;
use crate::sync::conditional::{self, WriteCondition};
use crate::sync::merge::{self, Decision, Effect, FieldClock, Incoming, RowState};

/// One device's pushed batch, as handed to storage.
#[derive(Debug, Clone)]
pub struct BatchInput {
    pub device: DeviceId,
    pub user: UserId,
    pub batch_id: Uuid,
    pub changes: Vec<Change>,
    /// The hub numbers this batch's changes (`console:*` devices, which have no counter of
    /// their own): each `device_seq` is ignored and set to the device's cursor + 1, + 2, …
    /// under the cursor lock; results and the log carry the assigned numbers.
    pub assign_device_seqs: bool,
    /// The batch writes this conflict's resolution (its one change). In the same transaction
    /// the conflict is marked resolved; when it is no longer open, the change is rejected
    /// `conflict_not_open` and writes nothing, and a change rejected for any other reason
    /// leaves the conflict open.
    pub resolves: Option<ResolveConflict>,
    /// What the pushing identity may write; `None`: everything.
    pub access: Option<Arc<AccessView>>,
    /// Empty: no change is conditional. Otherwise one entry per change: a change with a
    /// condition is written only when the stored row is the one it assumed (see
    /// [`crate::sync::conditional`]); a batch whose conditions do not match its changes in
    /// number has every change rejected `invalid_batch`.
    pub conditions: Vec<Option<WriteCondition>>,
}

impl BatchInput {
    /// A device's batch as it pushed it (its own device_seqs, resolving nothing).
    pub fn pushed(device: DeviceId, user: UserId, batch_id: Uuid, changes: Vec<Change>) -> BatchInput {
        BatchInput { device, user, batch_id, changes, assign_device_seqs: false, resolves: None, access: None, conditions: Vec::new() }
    }

    /// The condition of change `index`; `Err` when the batch's conditions do not match its
    /// changes in number.
    fn condition(&self, index: usize) -> std::result::Result<Option<&WriteCondition>, ()> {
        match self.conditions.len() {
            0 => Ok(None),
            n if n == self.changes.len() => Ok(self.conditions[index].as_ref()),
            _ => Err(()),
        }
    }

    /// Change `index` alone, with its condition.
    fn single(&self, index: usize) -> BatchInput {
        BatchInput {
            changes: vec![self.changes[index].clone()],
            conditions: self.conditions.get(index).cloned().into_iter().collect(),
            ..self.clone()
        }
    }
}

/// What a committed group produced.
#[derive(Debug, Default)]
pub struct GroupOutput {
    /// Results per input batch, in input order, one per change.
    pub results: Vec<Vec<ChangeResult>>,
    /// The committed changes in seq order (possibly none).
    pub deltas: Vec<Delta>,
    /// Head seq after the commit.
    pub head_seq: Seq,
    /// Conflicts the group logged, in id order.
    pub conflicts: Vec<ConflictRecord>,
    /// Conflicts the group resolved (see [`BatchInput::resolves`]).
    pub resolved: Vec<ConflictRecord>,
    /// The tenant's open conflicts after the commit, when the group logged or resolved any.
    pub open_conflicts: Option<u64>,
    /// Rows the group merged into, by where it found them: read from Postgres, or kept from
    /// the tenant's earlier groups (see `row_cache`).
    pub rows_read: u64,
    pub rows_from_cache: u64,
    /// Batches that failed as a whole, by index, when the group had to be committed piece by
    /// piece (see [`Store::commit_group`]); their entries in `results` are empty. The other
    /// batches' results and deltas are committed.
    pub failed: Vec<(usize, Error)>,
}

impl GroupOutput {
    /// Add what a later transaction of the same tenant committed (results as well).
    fn absorb(&mut self, later: GroupOutput) {
        self.results.extend(later.results);
        self.deltas.extend(later.deltas);
        self.head_seq = self.head_seq.max(later.head_seq);
        self.conflicts.extend(later.conflicts);
        self.resolved.extend(later.resolved);
        self.open_conflicts = later.open_conflicts.or(self.open_conflicts);
        self.rows_read += later.rows_read;
        self.rows_from_cache += later.rows_from_cache;
    }
}

/// Versions assigned before the tenant's head is locked are provisional: this base plus the
/// change's ordinal in the group. They compare above every real version, which is what a
/// concurrent write in the same group must do.
const PROVISIONAL: u64 = 1 << 62;

/// Limits applied while validating changes.
#[derive(Debug, Clone, Copy)]
pub struct ApplyLimits {
    pub max_field_bytes: usize,
    pub max_key_bytes: usize,
    pub max_clock_skew_ms: u64,
}

/// A change that passed validation, on its way to be merged once the cursor check passes too.
struct Pending<'a> {
    batch: usize,
    index: usize,
    change: &'a Change,
    /// The pushing identity's rules; `None`: unrestricted.
    access: Option<&'a AccessView>,
    /// Write only if the stored row is the one assumed (see [`BatchInput::conditions`]).
    condition: Option<&'a WriteCondition>,
    table: Arc<TableSchema>,
    /// Table and normalized key (as Postgres renders it), set once the row has been read.
    row_id: Option<RowId>,
    clock: FieldClock,
}

/// Per-row state during the group.
#[derive(Clone)]
struct RowSlot {
    key: Object,
    state: RowState,
    /// Writes to this row so far in the group (a row appears once per statement).
    writes: usize,
    /// Whether `synchub.row_versions` held the row's version when the group took the row (a
    /// version of 0 is none): the bookkeeping then updates that version row rather than upsert it.
    stored_version: bool,
}

type RowId = (String, String); // (table, normalized key)

#[derive(Clone, Default)]
struct MergeState {
    rows: HashMap<RowId, RowSlot>,
    /// (table, key as pushed) → key as Postgres renders it, for the keys read from Postgres.
    aliases: Vec<(RowId, String)>,
    /// Rows read from Postgres, and rows taken from the tenant's row cache (not locked).
    rows_read: u64,
    rows_from_cache: u64,
    /// Merge decisions in the order they were taken.
    decided: Vec<Decided>,
    /// Changes with an effect so far; the next one takes seq `head + next_ordinal + 1`.
    next_ordinal: u64,
}

#[derive(Clone)]
struct Decided {
    /// Index into the group's pending changes.
    pending: usize,
    decision: Decision,
    /// Row image before the change, kept only for a row's first write in the group (the log
    /// compares later writes with the image the earlier one left), and after it.
    before: Option<Object>,
    after: Option<Object>,
    /// Position among the changes that wrote something; `None` when it wrote nothing.
    ordinal: Option<u64>,
    /// Why the change was refused, when the rules refused it.
    forbidden: Option<String>,
}

struct Outcome {
    status: ChangeStatus,
    reason: Option<(ErrorCode, String)>,
}

fn reject(code: ErrorCode, message: impl Into<String>) -> Outcome {
    Outcome { status: ChangeStatus::Rejected, reason: Some((code, message.into())) }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Validate one change against the catalog; `None` when it may go on.
fn validate(change: &Change, table: &TableSchema, tenant: &TenantId, limits: ApplyLimits) -> Option<Outcome> {
    let tenant_matches = |v: &Value| match v {
        Value::String(s) => s == tenant.as_str(),
        other => other.to_string() == tenant.as_str(),
    };
    for column in &table.key {
        if !change.key.get(column).is_some_and(|v| !v.is_null()) {
            return Some(reject(ErrorCode::InvalidKey, format!("key lacks primary-key column `{column}`")));
        }
    }
    let key_size: usize = change.key.iter().map(|(name, value)| name.len() + json_size(value)).sum();
    if key_size > limits.max_key_bytes {
        return Some(reject(ErrorCode::InvalidKey, format!("the key is {key_size} bytes, more than {}", limits.max_key_bytes)));
    }
    for (name, value) in &change.key {
        if holds_nul(value) {
            return Some(reject(ErrorCode::InvalidValue, format!("key `{name}` holds the character U+0000, which Postgres cannot store")));
        }
        if *name == table.tenant_column {
            if !tenant_matches(value) {
                return Some(reject(ErrorCode::TenantMismatch, "tenant value differs from the token's tenant"));
            }
        } else if !table.key.contains(name) {
            return Some(reject(ErrorCode::InvalidKey, format!("`{name}` is not a primary-key column of {}", table.name)));
        }
    }
    if change.op == Op::Delete && !change.fields.is_empty() {
        return Some(reject(ErrorCode::InvalidValue, "a delete carries no fields"));
    }
    for (name, value) in &change.fields {
        if *name == table.tenant_column {
            if !tenant_matches(value) {
                return Some(reject(ErrorCode::TenantMismatch, "tenant value differs from the token's tenant"));
            }
            continue;
        }
        if !table.columns.contains_key(name) {
            return Some(reject(ErrorCode::UnknownColumn, format!("{} has no column `{name}`", table.name)));
        }
        if let Some(key_value) = change.key.get(name) {
            if key_value != value {
                return Some(reject(ErrorCode::InvalidKey, format!("fields change primary-key column `{name}`")));
            }
        }
        if holds_nul(value) {
            return Some(reject(ErrorCode::InvalidValue, format!("`{name}` holds the character U+0000, which Postgres cannot store")));
        }
        let size = json_size(value);
        if size > limits.max_field_bytes {
            return Some(reject(ErrorCode::ValueTooLarge, format!("`{name}` is {size} bytes, more than {}", limits.max_field_bytes)));
        }
    }
    None
}

/// Bytes of `value` as JSON, counted without writing it out.
fn json_size(value: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value).map(|_| count.0).unwrap_or(usize::MAX)
}

/// The refusal of one change for a database error its own values caused (see
/// [`refusal::blame`]); `None` when the error is not the change's. Postgres's text is logged
/// here, never returned.
fn change_refusal(err: &sqlx::Error, tenant: &TenantId) -> Option<Outcome> {
    match refusal::blame(err) {
        Blame::Change(code, message) => {
            tracing::info!(tenant = %tenant, %err, "change refused by the database");
            Some(reject(code, message))
        }
        _ => None,
    }
}

fn hlc_json(hlc: Hlc) -> Value {
    json!({"wall_ms": hlc.wall_ms, "counter": hlc.counter})
}

fn real_version(version: u64, head: Seq) -> u64 {
    if version >= PROVISIONAL {
        head + (version - PROVISIONAL) + 1
    } else {
        version
    }
}

fn as_object(value: Value) -> Option<Object> {
    match value {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

/// Settings of a merge transaction. Every statement of the group looks rows up by primary
/// key. Tenants are often newer than the planner's statistics, which then expect a few rows per
/// tenant and pick a scan of all of them: sequentially, or (with that off) a bitmap scan of the
/// tenant's part of the key joined by hash (seen updating 84 version rows by reading 1,100); a
/// key lookup is always the right plan here. JIT off: the disabled plans' nominal cost would
/// otherwise trigger it.
pub const MERGE_SETTINGS: &[(&str, &str)] =
    &[("synchub.origin", "hub"), ("enable_seqscan", "off"), ("enable_bitmapscan", "off"), ("enable_hashjoin", "off"), ("jit", "off")];

/// Settings of a large group: Memoize off as well. The row read puts a cache in front of each
/// key probe, and a group reads each key once, so every lookup misses and pays for the cache:
/// 8–12% more changes/s at batches of 100. Small groups keep the planner's default: at
/// batches of one, device→device p50 was 0.2–0.4 ms higher without it in alternating runs (in
/// two sessions), a difference near the runs' spread but always the same way.
pub const LARGE_GROUP_SETTINGS: &[(&str, &str)] = &[
    ("synchub.origin", "hub"),
    ("enable_seqscan", "off"),
    ("enable_bitmapscan", "off"),
    ("enable_hashjoin", "off"),
    ("jit", "off"),
    ("enable_memoize", "off"),
];

/// The log records' primary key, (tenant, last seq) (migration 0015).
const LOG_SEQ_KEY: &str = "log_groups_pkey";

/// Changes from which a group counts as large.
const LARGE_GROUP_CHANGES: usize = 64;

/// What a group's transaction runs after its settings in a cluster: the tenant's group lock
/// (keyed by the tenant just set), then the group's savepoint; in the same round trip.
const CLUSTER_GROUP_LOCK_THEN_SAVEPOINT: &str =
    "select pg_advisory_xact_lock(hashtextextended('synchub.group:' || current_setting('synchub.tenant'), 0)); savepoint synchub_group";

impl Store {
    /// Commit one group of batches for a tenant. Errors are group-wide and temporary
    /// (nothing was committed); per-change problems come back as rejected results.
    ///
    /// `expected_head` is the tenant's head as the caller last saw it committed. With it, the
    /// group's seqs follow it and the log statement takes the head only if it is still there,
    /// which saves a round trip; when another writer moved it, the group is redone from its
    /// savepoint with the head read under lock.
    ///
    /// `cache` holds the rows the tenant's earlier groups left (see `row_cache`): when it is
    /// current as of `expected_head`, rows found in it are not read from Postgres, and the
    /// group's bookkeeping statement checks the head even when the group wrote nothing. After a
    /// commit it holds the group's rows; after anything else it is empty.
    /// ([`RowCache::off`] keeps nothing.)
    ///
    /// No batch fails another: when the group meets a database error that is not transient
    /// (see [`refusal::blame`]), it is committed again batch by batch, and a batch that fails
    /// alone change by change, so that a change whose values the database refuses is rejected
    /// for good and a batch that fails for an unknown reason fails alone (in
    /// [`GroupOutput::failed`]).
    pub async fn commit_group(
        &self,
        conn: &mut PgConnection,
        tenant: &TenantId,
        batches: &[BatchInput],
        limits: ApplyLimits,
        expected_head: Option<Seq>,
        cache: &mut RowCache,
    ) -> Result<GroupOutput> {
        match self.commit_pass(conn, tenant, batches, limits, expected_head, cache, None).await {
            Err(Error::Database(err)) if refusal::blame(&err).isolate() => {
                tracing::warn!(tenant = %tenant, %err, batches = batches.len(), "group failed on its input; committing its batches one by one");
                self.commit_isolated(conn, tenant, batches, limits).await
            }
            other => other,
        }
    }

    /// Commit each batch in its own transaction; a batch that fails for a reason other than
    /// the database's state is committed change by change ([`Store::commit_changes_alone`]).
    /// Slow, and only for a group that failed.
    async fn commit_isolated(&self, conn: &mut PgConnection, tenant: &TenantId, batches: &[BatchInput], limits: ApplyLimits) -> Result<GroupOutput> {
        let mut output = GroupOutput::default();
        for (b, batch) in batches.iter().enumerate() {
            // A group of one batch is that batch, which just failed.
            let alone = if batches.len() > 1 {
                Some(self.commit_pass(conn, tenant, std::slice::from_ref(batch), limits, None, &mut RowCache::off(), None).await)
            } else {
                None
            };
            let failure = match alone {
                Some(Ok(one)) => {
                    output.absorb(one);
                    continue;
                }
                Some(Err(Error::Database(err))) if !refusal::blame(&err).isolate() => Some(Error::Database(err)),
                // It failed on its input: find the change.
                _ => self.commit_changes_alone(conn, tenant, batch, limits, &mut output).await,
            };
            if let Some(err) = failure {
                tracing::warn!(tenant = %tenant, device = %batch.device, batch = %batch.batch_id, %err, "batch failed alone");
                output.results.push(Vec::new());
                output.failed.push((b, err));
            }
        }
        Ok(output)
    }

    /// Commit `batch`'s changes one per transaction, in order, adding their results to the
    /// last entry of `output.results` (which this pushes); a change the database refuses for
    /// its values is committed as rejected, which moves the device's cursor past it. Returns
    /// the error that stopped the batch, if one did: its results are then dropped, and the
    /// batch fails with a temporary error (a retry finds the changes committed so far
    /// `duplicate`).
    async fn commit_changes_alone(
        &self,
        conn: &mut PgConnection,
        tenant: &TenantId,
        batch: &BatchInput,
        limits: ApplyLimits,
        output: &mut GroupOutput,
    ) -> Option<Error> {
        let mut results = Vec::with_capacity(batch.changes.len());
        for (index, change) in batch.changes.iter().enumerate() {
            let single = [batch.single(index)];
            let mut committed = self.commit_pass(conn, tenant, &single, limits, None, &mut RowCache::off(), None).await;
            if let Err(Error::Database(err)) = &committed {
                if let Blame::Change(code, message) = refusal::blame(err) {
                    tracing::info!(tenant = %tenant, device = %batch.device, change = %change.change_id, %err, "change refused by the database");
                    let refusal = (code, message);
                    committed = self.commit_pass(conn, tenant, &single, limits, None, &mut RowCache::off(), Some(&refusal)).await;
                }
            }
            match committed {
                Ok(mut one) => {
                    results.append(&mut one.results[0]);
                    one.results.clear();
                    output.absorb(one);
                }
                Err(err) => return Some(err),
            }
        }
        output.results.push(results);
        None
    }

    /// One try at committing the group in one transaction (see [`Store::commit_group`]);
    /// `refuse` rejects every change of it with that code and message, moving the cursors.
    #[allow(clippy::too_many_arguments)]
    async fn commit_pass(
        &self,
        conn: &mut PgConnection,
        tenant: &TenantId,
        batches: &[BatchInput],
        limits: ApplyLimits,
        expected_head: Option<Seq>,
        cache: &mut RowCache,
        refuse: Option<&(ErrorCode, String)>,
    ) -> Result<GroupOutput> {
        let committed = async {
            let catalog = match batches.iter().flat_map(|b| &b.changes).map(|c| c.table.as_str()).find(|t| self.catalog().get(t).is_none()) {
                Some(unknown) => self.catalog_with(unknown).await,
                None => self.catalog(),
            };
            // One round trip opens the transaction, sets it up and takes the savepoint that a
            // refused value rolls back to (at a batch of one change, round trips are the cost).
            let changes: usize = batches.iter().map(|b| b.changes.len()).sum();
            let settings = if changes >= LARGE_GROUP_CHANGES { LARGE_GROUP_SETTINGS } else { MERGE_SETTINGS };
            // In a cluster, the groups of one tenant are serialized across nodes by a lock taken
            // first (on one node its actor does it): otherwise two nodes' groups lock the rows
            // they share in different orders (a deadlock) or both insert the same new row (one
            // fails on its key). An advisory lock, not the head row: other SQL writers' triggers
            // take the head after their rows, and a group waits for the head after its rows too.
            let then = if self.clustered { CLUSTER_GROUP_LOCK_THEN_SAVEPOINT } else { "savepoint synchub_group" };
            // The pushing writers this hub has no number for get one first (a statement of its
            // own, once per writer and hub), so the group writes their clocks by number; it
            // commits before the group begins, so that failing it fails the group with nothing
            // of it committed.
            self.clock_writers.number_all(conn, tenant, batches.iter().map(|b| (b.device.as_str(), b.user.as_str()))).await?;
            let begin = self.tenant_begin_sql(tenant, "begin", settings, then);
            let mut tx = conn.begin_with(begin).await?;
            // In a cluster, another node may have committed since this tenant's last group here:
            // the head as of the lock tells (one more round trip), so the group goes with rows
            // read from Postgres rather than running once with stale ones and again after the
            // head check fails. Only another SQL writer can move the head now (caught as ever).
            let expected_head = match self.clustered {
                true => sqlx::query_scalar::<_, i64>("select head_seq from synchub.tenants where tenant_id = $1")
                    .bind(tenant.as_str())
                    .fetch_optional(&mut *tx)
                    .await?
                    .map(|head| head as Seq),
                false => expected_head,
            };
            let mut usable = cache.usable_at(expected_head).then_some(&mut *cache);
            let presentation = &self.presentation;
            let writers = &self.clock_writers;
            let done = match apply_group(&mut tx, &catalog, presentation, writers, tenant, batches, limits, expected_head, usable.as_deref_mut(), refuse).await? {
                Applied::Done(output, fill) => (output, fill),
                Applied::HeadMoved => {
                    tracing::debug!(tenant = %tenant, "head moved under the group; redone with the head locked");
                    // Another writer moved it: what the cache holds may be stale.
                    if let Some(cache) = usable {
                        cache.clear();
                    }
                    sqlx::query("rollback to savepoint synchub_group").execute(&mut *tx).await?;
                    match apply_group(&mut tx, &catalog, presentation, writers, tenant, batches, limits, None, None, refuse).await? {
                        Applied::Done(output, fill) => (output, fill),
                        Applied::HeadMoved => return Err(Error::Internal("the tenant's head moved while locked".into())),
                    }
                }
            };
            tx.commit().await?;
            Ok::<_, Error>(done)
        }
        .await;
        match committed {
            Ok((output, fill)) => {
                cache.put(output.head_seq, fill.rows.into_iter(), fill.aliases.into_iter());
                Ok(output)
            }
            Err(err) => {
                cache.clear();
                Err(err)
            }
        }
    }
}

/// Read and lock the cursors of the group's devices.
async fn lock_cursors(conn: &mut PgConnection, tenant: &TenantId, devices: &[&str]) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as("select device_id, last_device_seq from synchub.device_cursors where tenant_id = $1 and device_id = any($2) for update")
        .bind(tenant.as_str())
        .bind(devices)
        .fetch_all(&mut *conn)
        .await
}

/// What the group locks right after its savepoint: the devices' cursors, and the conflicts
/// its batches resolve.
struct GroupLocks<'a> {
    devices: Vec<&'a str>,
    conflicts: Vec<i64>,
}

/// Undo everything since the group's savepoint (taken when the transaction began), then take
/// the group's locks again, as they were taken after it; returns the cursors.
async fn back_to_group_start(conn: &mut PgConnection, tenant: &TenantId, locks: &GroupLocks<'_>) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query("rollback to savepoint synchub_group").execute(&mut *conn).await?;
    let cursors = lock_cursors(conn, tenant, &locks.devices).await?;
    conflicts::lock_open(conn, tenant, &locks.conflicts).await?;
    Ok(cursors)
}

/// Hub-numbered batches (`assign_device_seqs`) with their device_seqs set from the cursors
/// just locked; `None` when the group has none.
fn assign_device_seqs(batches: &[BatchInput], cursors: &HashMap<&str, u64>) -> Option<Vec<BatchInput>> {
    if !batches.iter().any(|b| b.assign_device_seqs) {
        return None;
    }
    let mut next: HashMap<DeviceId, u64> = HashMap::new();
    let assigned = batches
        .iter()
        .map(|batch| {
            let mut batch = batch.clone();
            if batch.assign_device_seqs {
                let cursor = cursors.get(batch.device.as_str()).copied().unwrap_or(0);
                let seq = next.entry(batch.device.clone()).or_insert(cursor);
                for change in &mut batch.changes {
                    *seq += 1;
                    change.device_seq = *seq;
                }
            }
            batch
        })
        .collect();
    Some(assigned)
}

/// How a pass over the group ended.
enum Applied {
    /// With the group's rows as it leaves them, for the tenant's row cache.
    Done(GroupOutput, CacheFill),
    /// The head was not where the caller expected it: the pass must be rolled back.
    HeadMoved,
}

/// The rows a committed group read and wrote, versions made real, and the keys devices used.
struct CacheFill {
    rows: Vec<(RowId, CachedRow)>,
    aliases: Vec<(RowId, String)>,
}

/// The hub's bookkeeping statement of a group (step 5 of [`apply_group`]) around its conflicts
/// part: the expected head, log, versions, conflicts and cursors in one statement, returning
/// what Postgres gave each conflict logged (`[conflict_id, change_id, field, created_at]`; the
/// hub has the rest), whether it took the head, and how many of the version rows
/// the group found it updated. Version rows the group found are updated in place (`$19`–`$23`):
/// an upsert, as the new ones take (`$8`–`$12`), first probes the key for a conflict, then
/// locks and updates the row it found.
macro_rules! bookkeeping_sql {
    ($conflicts:literal) => {
        concat!(
            "with head as (\
           update synchub.tenants set head_seq = head_seq + $18 where tenant_id = $1 and head_seq = $17 returning 1), \
         log as (\
           insert into synchub.log_groups (tenant_id, first_seq, last_seq, changes) \
           select $1, $2, $3, $4::text where $4::text is not null), \
         ranges as (\
           insert into synchub.log_device_ranges (tenant_id, device_id, first_device_seq, last_device_seq, group_last_seq) \
           select $1, d, f, l, $3 from unnest($5::text[], $6::int8[], $7::int8[]) as x(d, f, l)), \
         versions as (\
           insert into synchub.row_versions (tenant_id, table_name, pk, version, deleted, clocks) \
           select $1, t, k, v, d, c from unnest($8::text[], $9::jsonb[], $10::int8[], $11::text[], $12::text[]) as x(t, k, v, d, c) \
           on conflict (tenant_id, table_name, pk_text) do update set version = excluded.version, deleted = excluded.deleted, clocks = excluded.clocks), \
         stored_versions as (\
           update synchub.row_versions v set version = x.v, deleted = x.d, clocks = x.c \
           from (select t, k::text as k_text, v, d, c from unnest($19::text[], $20::jsonb[], $21::int8[], $22::text[], $23::text[]) as x(t, k, v, d, c) \
             offset 0) x \
           where v.tenant_id = $1 and v.table_name = x.t and v.pk_text = x.k_text returning 1), ",
            $conflicts,
            "cursors as (\
           insert into synchub.device_cursors (tenant_id, device_id, user_id, last_device_seq) \
           select $1, d, u, s from unnest($14::text[], $15::text[], $16::int8[]) as x(d, u, s) \
           on conflict (tenant_id, device_id) do update set last_device_seq = greatest(device_cursors.last_device_seq, excluded.last_device_seq), \
             user_id = excluded.user_id, updated_at = now()) \
         select coalesce(jsonb_agg(jsonb_build_array(c.conflict_id, c.change_id, c.field, c.created_at)), '[]'::jsonb), \
           $17::int8 is null or exists (select from head), (select count(*) from stored_versions) from conflicts c"
        )
    };
}

/// With conflicts to log.
const BOOKKEEPING_SQL: &str = bookkeeping_sql!(
    "conflicts as (\
           insert into synchub.conflicts (tenant_id, table_name, pk, field, base_version, server_version, server_value, server_hlc, \
             server_device, server_user, incoming_value, incoming_hlc, incoming_device, incoming_user, winner, policy, change_id, batch_id, seq) \
           select $1, table_name, pk, field, base_version, server_version, server_value, server_hlc, server_device, server_user, \
             incoming_value, incoming_hlc, incoming_device, incoming_user, winner, policy, change_id, batch_id, seq \
           from jsonb_to_recordset($13) as x(table_name text, pk jsonb, field text, base_version int8, server_version int8, \
             server_value jsonb, server_hlc jsonb, server_device text, server_user text, incoming_value jsonb, incoming_hlc jsonb, \
             incoming_device text, incoming_user text, winner text, policy text, change_id uuid, batch_id uuid, seq int8) \
           returning conflict_id, change_id, field, created_at), "
);

/// Without: the conflicts table is left alone, so its statement triggers (migration 0012) do
/// not run for the many groups that log none. `$13` stays typed for the same arguments.
const BOOKKEEPING_NO_CONFLICTS_SQL: &str =
    bookkeeping_sql!("conflicts as (select conflict_id, change_id, field, created_at from synchub.conflicts where false and $13::jsonb is not null), ");

/// Version rows the bookkeeping statement did not find to update (only SQL run by hand could
/// have deleted one since the group read it), written as new ones are.
const UPSERT_VERSIONS_SQL: &str = "insert into synchub.row_versions (tenant_id, table_name, pk, version, deleted, clocks) \
     select $1, t, k, v, d, c from unnest($2::text[], $3::jsonb[], $4::int8[], $5::text[], $6::text[]) as x(t, k, v, d, c) \
     on conflict (tenant_id, table_name, pk_text) do update set version = excluded.version, deleted = excluded.deleted, clocks = excluded.clocks";

#[allow(clippy::too_many_arguments)]
async fn apply_group(
    conn: &mut PgConnection,
    catalog: &Catalog,
    presentation: &Presentation,
    writers: &ClockWriters,
    tenant: &TenantId,
    batches: &[BatchInput],
    limits: ApplyLimits,
    expected_head: Option<Seq>,
    cache: Option<&mut RowCache>,
    refuse: Option<&(ErrorCode, String)>,
) -> Result<Applied> {
    let now = now_ms();
    let mut outcomes: Vec<Vec<Option<Outcome>>> = batches.iter().map(|b| b.changes.iter().map(|_| None).collect()).collect();

    // 1. Changes that could be merged, before their cursors are known: a table, valid values,
    // columns the identity may write, and the conflicts the group resolves (locked).
    let locks = GroupLocks {
        devices: batches.iter().map(|b| b.device.as_str()).collect(),
        conflicts: batches.iter().filter_map(|b| b.resolves.as_ref().map(|r| r.conflict_id)).collect(),
    };
    // Hub-numbered batches take their device_seqs from the cursors, so these are read first;
    // otherwise they come with the rows (step 2), a round trip less.
    let early_cursors =
        if batches.iter().any(|b| b.assign_device_seqs) { Some(lock_cursors(conn, tenant, &locks.devices).await?) } else { None };
    let assigned = early_cursors.as_ref().and_then(|rows| assign_device_seqs(batches, &rows.iter().map(|(d, s)| (d.as_str(), *s as u64)).collect()));
    let batches: &[BatchInput] = assigned.as_deref().unwrap_or(batches);
    let mut resolvable: HashSet<i64> = conflicts::lock_open(conn, tenant, &locks.conflicts).await?.into_iter().collect();
    let mut pending: Vec<Pending> = Vec::new();
    // A change id names one change: a second change under the same id in one batch is the
    // client's mistake (beyond its batch, a change is told apart by device and device_seq alone,
    // whatever its id; see `change_id_reused` in the protocol).
    let mut change_ids: HashSet<Uuid> = HashSet::new();
    for (b, batch) in batches.iter().enumerate() {
        change_ids.clear();
        // A conflict is resolved by the first batch of the group that resolves it.
        let may_resolve = batch.resolves.as_ref().is_none_or(|r| resolvable.remove(&r.conflict_id));
        for (i, change) in batch.changes.iter().enumerate() {
            if let Some(refusal) = refuse {
                outcomes[b][i] = Some(reject(refusal.0, refusal.1.clone()));
                continue;
            }
            if !change_ids.insert(change.change_id) {
                outcomes[b][i] = Some(reject(ErrorCode::ChangeIdReused, "an earlier change of this batch has the same change_id"));
                continue;
            }
            if let Some(conflict_id) = batch.resolves.as_ref().filter(|_| !may_resolve).map(|r| r.conflict_id) {
                outcomes[b][i] = Some(reject(ErrorCode::ConflictNotOpen, format!("conflict {conflict_id} is not open")));
                continue;
            }
            let Some(table) = catalog.get(&change.table) else {
                outcomes[b][i] = Some(reject(ErrorCode::UnknownTable, format!("`{}` is not a synced table", change.table)));
                continue;
            };
            if let Some(bad) = validate(change, table, tenant, limits) {
                outcomes[b][i] = Some(bad);
                continue;
            }
            // Rules that need no row: the table is writable, no hidden column is written.
            if let Some(Err(why)) = batch.access.as_ref().map(|a| a.check_columns(change)) {
                outcomes[b][i] = Some(reject(ErrorCode::Forbidden, why));
                continue;
            }
            let Ok(condition) = batch.condition(i) else {
                outcomes[b][i] = Some(reject(ErrorCode::InvalidBatch, "a batch's conditions must be none or one per change"));
                continue;
            };
            let (hlc, _) = merge::clamp_hlc(change.hlc, now, limits.max_clock_skew_ms);
            pending.push(Pending {
                batch: b,
                index: i,
                change,
                access: batch.access.as_deref(),
                condition,
                table: table.clone(),
                row_id: None,
                clock: FieldClock { hlc, device: batch.device.to_string(), user: Some(batch.user.to_string()), version: 0 },
            });
        }
    }

    // 2. Current rows (locked) with their versions, and the devices' cursors (locked).
    let lock_devices = early_cursors.is_none().then_some(locks.devices.as_slice());
    let (mut state, read_cursors) = load_all_rows(conn, tenant, writers, &locks, &mut pending, &mut outcomes, lock_devices, cache).await?;
    // Rows merged from the cache are current only if the head is still the expected one,
    // which the bookkeeping statement then checks whatever the group writes.
    let from_cache = state.rows_from_cache > 0;
    let cursor_rows = match (early_cursors, read_cursors) {
        (Some(rows), _) | (None, Some(rows)) => rows,
        // No row was read: nothing to merge, but duplicates and gaps are still told apart.
        (None, None) => lock_cursors(conn, tenant, &locks.devices).await?,
    };

    // Cursors: duplicates and gaps, whatever else was found about them; the changes after
    // the cursor go on, the others are dropped from the merge (their rows were read for nothing).
    let mut cursors: HashMap<&str, u64> = cursor_rows.iter().map(|(d, s)| (d.as_str(), *s as u64)).collect();
    let mut devices_users: BTreeMap<&str, (&str, u64)> = BTreeMap::new();
    let mut duplicates = Vec::new();
    for (b, batch) in batches.iter().enumerate() {
        let cursor = cursors.entry(batch.device.as_str()).or_insert(0);
        let mut gap = false;
        for (i, change) in batch.changes.iter().enumerate() {
            if gap || change.device_seq > *cursor + 1 {
                gap = true;
                outcomes[b][i] = Some(reject(ErrorCode::SeqGap, format!("expected device_seq {}", *cursor + 1)));
                continue;
            }
            if change.device_seq <= *cursor {
                outcomes[b][i] = Some(Outcome { status: ChangeStatus::Duplicate, reason: None });
                duplicates.push((batch.device.as_str(), change.device_seq));
                continue;
            }
            *cursor = change.device_seq;
            if outcomes[b][i].is_none() && merge::clamp_hlc(change.hlc, now, limits.max_clock_skew_ms).1 {
                tracing::warn!(tenant = %tenant, device = %batch.device, change = %change.change_id, wall_ms = change.hlc.wall_ms, "clock too far ahead; clamped");
            }
        }
        devices_users.insert(batch.device.as_str(), (batch.user.as_str(), *cursor));
    }
    pending.retain(|p| outcomes[p.batch][p.index].is_none());

    // 3. Merge and write: all at once, or change by change when a value is refused.
    let all: Vec<usize> = (0..pending.len()).filter(|&p| pending[p].row_id.is_some()).collect();
    let fast = merge_and_write(conn, tenant, &pending, &mut state, &all).await;
    if let Err(err) = fast {
        if !matches!(refusal::blame(&err), Blame::Change(..)) {
            return Err(err.into());
        }
        // Rare: start over from the rows as loaded (reading them again is cheaper than
        // keeping a copy of the group's state on the common path).
        back_to_group_start(conn, tenant, &locks).await?;
        state = load_all_rows(conn, tenant, writers, &locks, &mut pending, &mut outcomes, None, None).await?.0;
        for &p in &all {
            let pend = &pending[p];
            let id = pend.row_id.clone().unwrap_or_default();
            let before = (state.rows.get(&id).cloned(), state.decided.len(), state.next_ordinal);
            sqlx::query("savepoint synchub_change").execute(&mut *conn).await?;
            if let Err(err) = merge_and_write(conn, tenant, &pending, &mut state, &[p]).await {
                let refused = change_refusal(&err, tenant).ok_or(Error::Database(err))?;
                sqlx::query("rollback to savepoint synchub_change").execute(&mut *conn).await?;
                // Only this change's row and its decision moved: put them back.
                if let Some(slot) = before.0 {
                    state.rows.insert(id, slot);
                }
                state.decided.truncate(before.1);
                state.next_ordinal = before.2;
                outcomes[pending[p].batch][pending[p].index] = Some(refused);
            }
        }
    }

    // 4. Seqs: take them from the head, which stays locked to commit (after the app rows,
    // the order other writers' triggers use). With an expected head, the log statement takes
    // it (step 5), and only if it is still the expected one.
    let head: i64 = match expected_head {
        Some(expected) => expected as i64,
        None if state.next_ordinal > 0 => {
            sqlx::query_scalar("update synchub.tenants set head_seq = head_seq + $2 where tenant_id = $1 returning head_seq - $2")
                .bind(tenant.as_str())
                .bind(state.next_ordinal as i64)
                .fetch_one(&mut *conn)
                .await?
        }
        None => sqlx::query_scalar("select head_seq from synchub.tenants where tenant_id = $1").bind(tenant.as_str()).fetch_one(&mut *conn).await?,
    };
    let head = head as Seq;
    let new_head = head + state.next_ordinal;

    // 5. Log entries, deltas, conflict records and results of the decided changes.
    let mut deltas: Vec<Delta> = Vec::with_capacity(state.next_ordinal as usize);
    // For each delta: its pending change and log op; the log borrows the deltas' row images.
    let mut logged: Vec<(usize, LogOp)> = Vec::with_capacity(state.next_ordinal as usize);
    let mut conflicts = Vec::new();
    let mut results_by_change: HashMap<(usize, usize), ChangeResult> = HashMap::new();
    // The delta of each row's latest write so far: a second write to a row in the same group
    // compares with the row as the first one left it in the database (the image its decision
    // saw holds only the fields written, without defaults, key or tenant).
    let mut latest: HashMap<&RowId, usize> = HashMap::new();
    for decided in state.decided.iter_mut() {
        let pend = &pending[decided.pending];
        // unwrap: only changes with a row are decided.
        let row_id = pend.row_id.as_ref().expect("decided change's row");
        let slot = &state.rows[row_id];
        let seq = decided.ordinal.map(|o| head + o + 1);
        let decision = &decided.decision;
        let status = if decision.rejection.is_some() { ChangeStatus::Rejected } else { decision.status };
        let row = match status {
            ChangeStatus::Merged | ChangeStatus::Conflict => decided.after.clone().or_else(|| slot.state.values.clone()),
            _ => None,
        };
        if let Some(seq) = seq {
            let before = match latest.insert(row_id, deltas.len()) {
                Some(earlier) => deltas[earlier].row.as_ref(),
                None => decided.before.as_ref(),
            };
            let (op, old) = log_op_and_old(&pend.table, decision, before, decided.after.as_ref());
            logged.push((decided.pending, op));
            deltas.push(Delta {
                seq,
                table: pend.table.name.clone(),
                op: if op == LogOp::Delete { Op::Delete } else { Op::Upsert },
                key: slot.key.clone(),
                // The delta owns the image from here on (the log borrows it from the delta).
                row: decided.after.take(),
                old,
                origin: Some(batches[pend.batch].device.to_string()),
                change_id: Some(pend.change.change_id),
                left: false,
            });
        }
        for c in &decision.conflicts {
            conflicts.push(json!({
                "table_name": pend.table.name, "pk": slot.key, "field": c.field,
                "base_version": pend.change.base_version, "server_version": real_version(c.server_clock.version, head),
                "server_value": c.server_value, "server_hlc": hlc_json(c.server_clock.hlc),
                "server_device": c.server_clock.device, "server_user": c.server_clock.user,
                "incoming_value": c.incoming_value, "incoming_hlc": hlc_json(pend.clock.hlc),
                "incoming_device": pend.clock.device, "incoming_user": pend.clock.user,
                "winner": c.winner.as_str(),
                "policy": if c.by_delete { "delete_wins" } else { pend.table.policy.as_str() },
                "change_id": pend.change.change_id, "batch_id": batches[pend.batch].batch_id, "seq": seq,
            }));
        }
        results_by_change.insert(
            (pend.batch, pend.index),
            ChangeResult {
                change_id: pend.change.change_id,
                device_seq: pend.change.device_seq,
                status,
                seq,
                lost_fields: decision.lost_fields.clone(),
                reason: decision.rejection,
                message: decided
                    .forbidden
                    .take()
                    .or_else(|| decision.rejection.map(|_| "the row was deleted; re-create it under a new key".to_string())),
                row,
            },
        );
    }

    let (cursor_devices, (cursor_users, cursor_seqs)): (Vec<&str>, (Vec<&str>, Vec<i64>)) =
        devices_users.iter().map(|(d, (u, s))| (*d, (*u, *s as i64))).unzip();
    let (versions, stored_versions) = RowVersionColumns::of(&state, head, |clock| writers.number(tenant, clock));
    let log = LogRecord::of(&deltas, logged.iter().map(|&(p, op)| (&pending[p], op)));
    // One statement for the hub's own bookkeeping (`bookkeeping_sql`).
    let take_head = expected_head.filter(|_| state.next_ordinal > 0 || from_cache).map(|h| h as i64);
    let bookkeeping: sqlx::Result<(Value, bool, i64)> = sqlx::query_as(
        if conflicts.is_empty() { BOOKKEEPING_NO_CONFLICTS_SQL } else { BOOKKEEPING_SQL },
    )
    .bind(tenant.as_str())
    .bind((head + 1) as i64)
    .bind(new_head as i64)
    .bind(log.text.as_deref())
    .bind(&log.devices)
    .bind(&log.first_device_seqs)
    .bind(&log.last_device_seqs)
    .bind(&versions.tables)
    .bind(&versions.keys)
    .bind(&versions.versions)
    .bind(&versions.deleted)
    .bind(&versions.clocks)
    .bind(Json(&conflicts))
    .bind(&cursor_devices)
    .bind(&cursor_users)
    .bind(&cursor_seqs)
    .bind(take_head)
    .bind(state.next_ordinal as i64)
    .bind(&stored_versions.tables)
    .bind(&stored_versions.keys)
    .bind(&stored_versions.versions)
    .bind(&stored_versions.deleted)
    .bind(&stored_versions.clocks)
    .fetch_one(&mut *conn)
    .await;
    let logged_conflicts = match bookkeeping {
        Ok((_, false, _)) => return Ok(Applied::HeadMoved),
        Ok((logged, true, updated)) if updated as usize == stored_versions.tables.len() => logged,
        Ok((logged, true, _)) => {
            sqlx::query(UPSERT_VERSIONS_SQL)
                .bind(tenant.as_str())
                .bind(&stored_versions.tables)
                .bind(&stored_versions.keys)
                .bind(&stored_versions.versions)
                .bind(&stored_versions.deleted)
                .bind(&stored_versions.clocks)
                .execute(&mut *conn)
                .await?;
            logged
        }
        // Another writer's log entries took the seqs this pass expected (a reused change id
        // violates the log's other unique index: that one is the change's, see `refusal`).
        Err(sqlx::Error::Database(err)) if take_head.is_some() && err.constraint() == Some(LOG_SEQ_KEY) => return Ok(Applied::HeadMoved),
        Err(err) => return Err(err.into()),
    };
    let mut logged_conflicts = conflicts::logged_records(conflicts, logged_conflicts)?;
    label_conflicts(&mut logged_conflicts, &state, presentation);

    // Resolutions: a resolving batch whose change was not rejected marks its conflict (locked
    // and open since step 1) resolved.
    let mut marks = Vec::new();
    for (b, batch) in batches.iter().enumerate() {
        let (Some(resolves), Some(last)) = (batch.resolves.as_ref(), batch.changes.len().checked_sub(1)) else { continue };
        let rejected = (0..batch.changes.len()).any(|i| {
            outcomes[b][i].is_some() || results_by_change.get(&(b, i)).is_none_or(|r| r.status == ChangeStatus::Rejected)
        });
        if rejected {
            continue;
        }
        let change = &batch.changes[last];
        marks.push(conflicts::Resolved {
            conflict_id: resolves.conflict_id,
            user: batch.user.clone(),
            resolution: resolves.resolution,
            seq: results_by_change.get(&(b, last)).and_then(|r| r.seq),
            value: (change.op == Op::Upsert).then(|| change.fields.get(&resolves.field).cloned()).flatten(),
        });
    }
    let resolved = conflicts::mark_resolved(conn, tenant, &marks).await?;
    if resolved.len() != marks.len() {
        // Cannot happen: the conflicts were locked open since step 1.
        return Err(Error::Internal("a conflict being resolved was no longer open".into()));
    }
    // Counted in the transaction, so the counts sent with consecutive commits are in order.
    let open_conflicts = if logged_conflicts.is_empty() && resolved.is_empty() {
        None
    } else {
        // Kept by triggers on the conflicts table (migration 0011).
        let open: i64 = sqlx::query_scalar("select open_conflicts from synchub.tenants where tenant_id = $1")
            .bind(tenant.as_str())
            .fetch_one(&mut *conn)
            .await?;
        Some(open as u64)
    };

    let original_seqs = super::log::device_change_seqs(conn, tenant, &duplicates).await?;

    // 6. Results, in input order.
    let results = batches
        .iter()
        .enumerate()
        .map(|(b, batch)| {
            batch
                .changes
                .iter()
                .enumerate()
                .map(|(i, change)| {
                    if let Some(outcome) = outcomes[b][i].take() {
                        return ChangeResult {
                            change_id: change.change_id,
                            device_seq: change.device_seq,
                            status: outcome.status,
                            seq: if outcome.status == ChangeStatus::Duplicate { original_seqs.get(&(batch.device.to_string(), change.device_seq)).copied() } else { None },
                            lost_fields: vec![],
                            reason: outcome.reason.as_ref().map(|r| r.0),
                            message: outcome.reason.map(|r| r.1),
                            row: None,
                        };
                    }
                    // unwrap: every change without an early outcome was decided above.
                    results_by_change.remove(&(b, i)).expect("decided change")
                })
                .collect()
        })
        .collect();
    let (rows_read, rows_from_cache) = (state.rows_read, state.rows_from_cache);
    let fill = CacheFill::of(catalog, state, head);
    let output = GroupOutput {
        results,
        deltas,
        head_seq: new_head,
        conflicts: logged_conflicts,
        resolved,
        open_conflicts,
        rows_read,
        rows_from_cache,
        failed: Vec::new(),
    };
    Ok(Applied::Done(output, fill))
}

impl CacheFill {
    /// The group's rows as committed: provisional versions made real from the `head` the
    /// group's seqs follow.
    fn of(catalog: &Catalog, state: MergeState, head: Seq) -> CacheFill {
        let real = |clock: &mut FieldClock| clock.version = real_version(clock.version, head);
        let rows = state
            .rows
            .into_iter()
            .filter_map(|(id, slot)| {
                let table = catalog.get(&id.0)?.clone();
                let mut row = slot.state;
                row.version = real_version(row.version, head);
                row.clocks.values_mut().for_each(real);
                row.deleted.as_mut().map(real);
                Some((id, CachedRow { table, key: slot.key, state: row }))
            })
            .collect();
        CacheFill { rows, aliases: state.aliases }
    }
}

/// The log's op and old values: old values of changed columns for an update (a value written in
/// another notation is not a change), the whole old row for a delete, none for an insert.
fn log_op_and_old(table: &TableSchema, decision: &Decision, before: Option<&Object>, after: Option<&Object>) -> (LogOp, Option<Object>) {
    match (&decision.effect, before) {
        (Effect::Delete, _) => (LogOp::Delete, before.cloned()),
        (_, None) => (LogOp::Insert, None),
        (_, Some(before)) => {
            let changed: Object = after
                .into_iter()
                .flat_map(|after| after.iter())
                .filter(|(k, v)| match before.get(*k) {
                    Some(old) => old != *v && !same_value(table.column_type(k).unwrap_or(""), old, v),
                    None => true,
                })
                .map(|(k, _)| (k.clone(), before.get(k).cloned().unwrap_or(Value::Null)))
                .collect();
            (LogOp::Update, Some(changed))
        }
    }
}

/// Versions, tombstones and field clocks of the rows this group wrote, one vector per column,
/// borrowing the rows' keys and clocks (serialized straight into the statement's arguments).
#[derive(Default)]
struct RowVersionColumns<'a> {
    tables: Vec<&'a str>,
    keys: Vec<Json<&'a Object>>,
    versions: Vec<i64>,
    /// As JSON text (`row_versions` keeps them as `text`, migration 0018).
    deleted: Vec<Option<String>>,
    clocks: Vec<String>,
}

impl<'a> RowVersionColumns<'a> {
    /// The rows the group wrote: those without a version row yet, and those with one; clocks'
    /// writers written as the numbers `number` gives them, by name when it gives none.
    fn of(
        state: &'a MergeState,
        head: Seq,
        number: impl Fn(&FieldClock) -> Option<WriterNumber>,
    ) -> (RowVersionColumns<'a>, RowVersionColumns<'a>) {
        let mut new = RowVersionColumns::default();
        let mut stored = RowVersionColumns::default();
        for ((table, _), slot) in state.rows.iter().filter(|(_, s)| s.writes > 0) {
            let columns = if slot.stored_version { &mut stored } else { &mut new };
            columns.tables.push(table.as_str());
            columns.keys.push(Json(&slot.key));
            columns.versions.push(real_version(slot.state.version, head) as i64);
            columns.deleted.push(slot.state.deleted.as_ref().map(|clock| json_text(&RealClock { clock, head })));
            columns.clocks.push(clocks::encode(&slot.state.clocks, |version| real_version(version, head), &number));
        }
        (new, stored)
    }
}

/// `value` as JSON text.
fn json_text(value: &impl serde::Serialize) -> String {
    // unwrap: clocks are numbers and strings, which always serialize.
    serde_json::to_string(value).expect("a clock serializes")
}

/// A field clock as `row_versions` stores it (`[wall_ms, counter, device, version, user]`, read
/// back by `clocks::clock_of`), its provisional version made real from the group's `head`.
struct RealClock<'a> {
    clock: &'a FieldClock,
    head: Seq,
}

impl serde::Serialize for RealClock<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let c = self.clock;
        (c.hlc.wall_ms, c.hlc.counter, &c.device, real_version(c.version, self.head), &c.user).serialize(serializer)
    }
}

/// Read and lock the rows of every pending change; a key value that does not fit its column
/// rejects that change with `invalid_value` (found by reading key by key) and the others go on.
/// With `lock_devices`, their cursors are read and locked as well and returned (`None` when no
/// row was read). Called right after the group's savepoint was taken or rolled back to, with
/// `locks` taken since (the devices' cursors aside when `lock_devices` is given).
#[allow(clippy::too_many_arguments)]
async fn load_all_rows(
    conn: &mut PgConnection,
    tenant: &TenantId,
    writers: &ClockWriters,
    locks: &GroupLocks<'_>,
    pending: &mut [Pending<'_>],
    outcomes: &mut [Vec<Option<Outcome>>],
    lock_devices: Option<&[&str]>,
    cache: Option<&mut RowCache>,
) -> Result<(MergeState, Option<Vec<(String, i64)>>)> {
    let mut state = MergeState::default();
    match load_rows(conn, tenant, writers, pending, &mut state, None, lock_devices, cache).await {
        Ok(cursors) => return Ok((state, cursors)),
        Err(err) if !matches!(refusal::blame(&err), Blame::Change(..)) => return Err(err.into()),
        Err(_) => {}
    }
    let cursors = back_to_group_start(conn, tenant, locks).await?;
    state = MergeState::default();
    for p in 0..pending.len() {
        sqlx::query("savepoint synchub_change").execute(&mut *conn).await?;
        if let Err(err) = load_rows(conn, tenant, writers, pending, &mut state, Some(p), None, None).await {
            let refused = change_refusal(&err, tenant).ok_or(Error::Database(err))?;
            sqlx::query("rollback to savepoint synchub_change").execute(&mut *conn).await?;
            pending[p].row_id = None;
            outcomes[pending[p].batch][pending[p].index] = Some(refused);
        }
    }
    Ok((state, lock_devices.map(|_| cursors)))
}

/// Read the current rows and versions for `pending` (or only `only`), filling row slots and
/// each change's normalized key; with `lock_devices`, the first table's statement that reads
/// rows reads and locks their cursors too, returned when a row was read. Rows found in `cache`
/// are taken from it instead (not locked; see `row_cache`).
#[allow(clippy::too_many_arguments)]
async fn load_rows(
    conn: &mut PgConnection,
    tenant: &TenantId,
    writers: &ClockWriters,
    pending: &mut [Pending<'_>],
    state: &mut MergeState,
    only: Option<usize>,
    mut lock_devices: Option<&[&str]>,
    mut cache: Option<&mut RowCache>,
) -> std::result::Result<Option<Vec<(String, i64)>>, sqlx::Error> {
    let mut by_table: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (p, pend) in pending.iter().enumerate() {
        if only.is_none_or(|o| o == p) {
            by_table.entry(pend.table.name.clone()).or_default().push(p);
        }
    }
    let mut cursors = None;
    // Rows whose clocks name writers by numbers this hub has not seen (another node gave them,
    // or before a restart): decoded once those are looked up, in one statement.
    let mut unknown_writers: Vec<WriterNumber> = Vec::new();
    let mut undecoded: Vec<(RowId, String)> = Vec::new();
    for (table_name, members) in by_table {
        let table = pending[members[0]].table.clone();
        // Each key once: a row that several changes of the group write is read (and locked)
        // once, not once per change (five times per row at batches of 1,000 in the benchmark).
        let mut keys: Vec<Value> = Vec::with_capacity(members.len());
        let mut pushed_keys: Vec<String> = Vec::with_capacity(members.len());
        let mut readers: Vec<Vec<usize>> = Vec::with_capacity(members.len());
        let mut position: HashMap<String, usize> = HashMap::with_capacity(members.len());
        let mut cached: HashMap<String, String> = HashMap::new();
        for &p in &members {
            let key = Value::Object(pending[p].change.key.clone());
            let pushed = key.to_string();
            if let Some(row_key) = cached.get(&pushed) {
                pending[p].row_id = Some((table_name.clone(), row_key.clone()));
                continue;
            }
            match position.entry(pushed) {
                Entry::Occupied(at) => readers[*at.get()].push(p),
                Entry::Vacant(at) => {
                    if let Some((row_key, row)) = cache.as_deref_mut().and_then(|c| c.take(&table, at.key())) {
                        state.rows_from_cache += 1;
                        pending[p].row_id = Some((table_name.clone(), row_key.clone()));
                        state.rows.entry((table_name.clone(), row_key.clone())).or_insert(RowSlot { key: row.key, stored_version: row.state.version > 0, state: row.state, writes: 0 });
                        cached.insert(at.into_key(), row_key);
                        continue;
                    }
                    pushed_keys.push(at.key().clone());
                    at.insert(keys.len());
                    keys.push(key);
                    readers.push(vec![p]);
                }
            }
        }
        if keys.is_empty() {
            continue;
        }
        let with_cursors = lock_devices.take();
        let rows = match with_cursors {
            Some(devices) => {
                sqlx::query(&table.read_locking_cursors_sql).bind(tenant.as_str()).bind(&keys).bind(devices).fetch_all(&mut *conn).await?
            }
            None => sqlx::query(&table.read_sql).bind(tenant.as_str()).bind(&keys).fetch_all(&mut *conn).await?,
        };
        for row in rows {
            if with_cursors.is_some() {
                if let Some(Value::Object(read)) = row.get::<Option<Value>, _>("cursors") {
                    cursors = Some(read.into_iter().map(|(device, seq)| (device, seq.as_i64().unwrap_or(0))).collect());
                }
            }
            let ordinal: i64 = row.get("i");
            let key: Value = row.get("key");
            let key_text = key.to_string();
            for &p in &readers[(ordinal - 1) as usize] {
                pending[p].row_id = Some((table_name.clone(), key_text.clone()));
            }
            state.aliases.push(((table_name.clone(), pushed_keys[(ordinal - 1) as usize].clone()), key_text.clone()));
            let id = (table_name.clone(), key_text);
            if state.rows.contains_key(&id) {
                continue;
            }
            state.rows_read += 1;
            let values = row.get::<Option<Value>, _>("row").and_then(as_object);
            let mut row_state = RowState { version: row.get::<Option<i64>, _>("version").unwrap_or(0) as u64, ..RowState::default() };
            // A row that exists again (re-inserted by SQL before the trigger saw it) is not a tombstone.
            if values.is_none() {
                row_state.deleted = json_column(&row, "deleted").as_ref().and_then(clocks::clock_of);
            }
            // Text that holds no clocks (only SQL written by hand could make it so) counts as none.
            match row.get::<Option<&str>, _>("clocks").map(|text| (text, clocks::decode(text, |n| writers.writer(n)))) {
                Some((_, Ok(read))) => row_state.clocks = read,
                Some((text, Err(clocks::Unreadable::UnknownWriters(numbers)))) => {
                    unknown_writers.extend(numbers);
                    undecoded.push((id.clone(), text.to_owned()));
                }
                Some((_, Err(clocks::Unreadable::NotClocks))) | None => {}
            }
            row_state.values = values;
            let stored_version = row_state.version > 0;
            state.rows.insert(id, RowSlot { key: as_object(key).unwrap_or_default(), state: row_state, writes: 0, stored_version });
        }
    }
    if !undecoded.is_empty() {
        unknown_writers.sort_unstable();
        unknown_writers.dedup();
        writers.learn(conn, tenant, &unknown_writers).await?;
        for (id, text) in undecoded {
            // Still unknown (only SQL written by hand could remove a number): no clocks, as for
            // text that holds none.
            if let (Some(slot), Ok(read)) = (state.rows.get_mut(&id), clocks::decode(&text, |n| writers.writer(n))) {
                slot.state.clocks = read;
            }
        }
    }
    Ok(cursors)
}

/// A `text` column holding JSON (a tombstone's clock in `row_versions.deleted`), parsed; `None`
/// when null or not JSON (only SQL written by hand could make it so: no tombstone then).
fn json_column(row: &sqlx::postgres::PgRow, column: &str) -> Option<Value> {
    serde_json::from_str(row.get::<Option<&str>, _>(column)?).ok()
}

/// Write statements of one merge pass: one per (round, table, kind, column set). A row
/// written twice in the group goes into two rounds (its first write in round 0, its next in 1,
/// …), since a statement touches a row once. Each holds the positions of the decided changes and
/// the rows to write: one per change, but one per run of updates ([`UpdateRun`]).
type WritePlan = BTreeMap<(usize, String, WriteKind, Vec<String>), (Vec<usize>, Vec<Value>)>;

/// Successive plain updates of one row in a group, written as one update of every column they
/// write with the last values (`PlainUpdates::coalesce`): a row a group updates ten times costs
/// Postgres one row version, not ten, and the versions of a large group's rows fit their pages.
struct UpdateRun {
    round: usize,
    table: String,
    positions: Vec<usize>,
    columns: Vec<String>,
    /// The key and the values written, a later change's over an earlier's.
    row: Object,
}

impl UpdateRun {
    fn add(&mut self, position: usize, columns: Vec<String>, row: Object) {
        self.positions.push(position);
        self.row.extend(row);
        for column in columns {
            if let Err(at) = self.columns.binary_search(&column) {
                self.columns.insert(at, column);
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum WriteKind {
    Insert,
    Update,
    /// An update whose row the merge knows without having it returned: the row as it was with
    /// the written values (see `TableSchema::plain_updates`).
    PlainUpdate,
    Delete,
}

/// Decide each of `which` in order against the row state, then write the effects.
async fn merge_and_write(
    conn: &mut PgConnection,
    tenant: &TenantId,
    pending: &[Pending<'_>],
    state: &mut MergeState,
    which: &[usize],
) -> std::result::Result<(), sqlx::Error> {
    let mut plan = WritePlan::new();
    // Runs of plain updates of one row, each written as one update (`PlainUpdates::coalesce`),
    // and the run each row's last write is in, while it is one.
    let mut runs: Vec<UpdateRun> = Vec::new();
    let mut open_runs: HashMap<&RowId, usize> = HashMap::new();
    for &p in which {
        let pend = &pending[p];
        let Some(row_id) = &pend.row_id else { continue };
        // unwrap: load_rows created a slot for every key it normalized.
        let slot = state.rows.get_mut(row_id).expect("row slot");
        // Key and tenant columns are identity, not fields to merge (copied only when present).
        let identity = |c: &String| *c == pend.table.tenant_column || pend.table.key.contains(c);
        let fields = if pend.change.fields.keys().any(identity) {
            Cow::Owned(pend.change.fields.iter().filter(|(c, _)| !identity(c)).map(|(c, v)| (c.clone(), v.clone())).collect())
        } else {
            Cow::Borrowed(&pend.change.fields)
        };
        // Rules on the row as it stands now (loaded and locked, with the group's earlier
        // changes laid over): a refused change is decided as nothing written, nothing logged.
        if let Some(Err(why)) = pend.access.map(|a| a.check_row(pend.change, slot.state.values.as_ref())) {
            let decision = Decision {
                status: ChangeStatus::Rejected,
                effect: Effect::Nothing,
                lost_fields: vec![],
                conflicts: vec![],
                rejection: Some(ErrorCode::Forbidden),
            };
            state.decided.push(Decided { pending: p, decision, before: None, after: None, ordinal: None, forbidden: Some(why) });
            continue;
        }
        let incoming = Incoming { op: pend.change.op, fields: &fields, clock: pend.clock.clone(), base_version: pend.change.base_version };
        let decision = match pend.condition {
            Some(condition) => conditional::decide(condition, &slot.state, &incoming, pend.table.policy, &|c| pend.table.column_type(c)),
            None => merge::decide(&slot.state, &incoming, pend.table.policy),
        };
        if decision.effect == Effect::Nothing {
            state.decided.push(Decided { pending: p, decision, before: None, after: None, ordinal: None, forbidden: None });
            continue;
        }
        let before = if slot.writes == 0 { slot.state.values.clone() } else { None };
        let ordinal = state.next_ordinal;
        state.next_ordinal += 1;
        let round = slot.writes;
        slot.writes += 1;
        let (kind, columns, json_row) = match &decision.effect {
            Effect::Write(written) => {
                let mut json_row = slot.key.clone();
                json_row.extend(written.iter().map(|(c, v)| (c.clone(), v.clone())));
                let kind = if slot.state.values.is_none() {
                    WriteKind::Insert
                } else if pend.table.plain().is_some()
                    && written.iter().all(|(c, v)| pend.table.column_type(c).is_some_and(|t| stored_as_written(t, v)))
                {
                    WriteKind::PlainUpdate
                } else {
                    WriteKind::Update
                };
                (kind, written.keys().cloned().collect(), json_row)
            }
            _ => (WriteKind::Delete, Vec::new(), slot.key.clone()),
        };
        merge::advance(&mut slot.state, &decision, &pend.clock, PROVISIONAL + ordinal, None);
        let position = state.decided.len();
        let coalesce = kind == WriteKind::PlainUpdate && pend.table.plain().is_some_and(|p| p.coalesce);
        match (coalesce, open_runs.get(row_id)) {
            (true, Some(&run)) => {
                // Joins the run: no write of its own, so the row's writes stay where they were.
                slot.writes -= 1;
                runs[run].add(position, columns, json_row);
            }
            (true, None) => {
                open_runs.insert(row_id, runs.len());
                let mut columns = columns;
                columns.sort();
                runs.push(UpdateRun { round, table: pend.table.name.clone(), positions: vec![position], columns, row: json_row });
            }
            (false, _) => {
                open_runs.remove(row_id);
                let entry = plan.entry((round, pend.table.name.clone(), kind, columns)).or_default();
                entry.0.push(position);
                entry.1.push(Value::Object(json_row));
            }
        }
        state.decided.push(Decided { pending: p, decision, before, after: None, ordinal: Some(ordinal), forbidden: None });
    }
    for run in runs {
        let entry = plan.entry((run.round, run.table, WriteKind::PlainUpdate, run.columns)).or_default();
        entry.0.extend(run.positions);
        entry.1.push(Value::Object(run.row));
    }

    for ((round, _, kind, columns), (positions, rows)) in plan {
        let table = pending[state.decided[positions[0]].pending].table.clone();
        let cols: Vec<&str> = columns.iter().map(String::as_str).collect();
        let mut known = false;
        let mut images: HashMap<String, Object> = if matches!(kind, WriteKind::Update | WriteKind::PlainUpdate) && cols.is_empty() {
            HashMap::new() // nothing but the key: the row stays as it is
        } else {
            if let (WriteKind::PlainUpdate, Some(plain)) = (kind, &table.plain_updates) {
                let (updated, same_shape): (i64, bool) = sqlx::query_as(&table.plain_update_sql(&cols))
                    .bind(tenant.as_str())
                    .bind(Json(&rows))
                    .bind(&plain.shape)
                    .fetch_one(&mut *conn)
                    .await?;
                // Every row, on a table as the catalog knows it: the images follow. Otherwise
                // (a row row-level security hides, a trigger added since) they are read back.
                known = updated as usize == rows.len() && same_shape;
                if !same_shape {
                    tracing::info!(table = %table.name, "the table changed since the catalog was loaded; its updates are returned from now on");
                    plain.mark_changed();
                }
            }
            let sql = match kind {
                WriteKind::Insert => Some(table.insert_sql(&cols)),
                WriteKind::Update => Some(table.update_sql(&cols)),
                WriteKind::PlainUpdate if known => None,
                WriteKind::PlainUpdate => Some(table.images_sql()),
                WriteKind::Delete => Some(table.delete_sql.clone()),
            };
            match sql {
                Some(sql) => {
                    let returned = sqlx::query(&sql).bind(tenant.as_str()).bind(Json(&rows)).fetch_all(&mut *conn).await?;
                    returned
                        .into_iter()
                        .filter_map(|r| Some((r.get::<Value, _>("key").to_string(), as_object(r.get("row"))?)))
                        .collect()
                }
                None => HashMap::new(),
            }
        };
        // A run of updates wrote its row once: each change but the run's last has the row as the
        // hub knows it (the row Postgres stored is the last's).
        let run_continues: HashSet<usize> = match kind {
            WriteKind::PlainUpdate if positions.len() > rows.len() => {
                let mut seen = HashSet::new();
                positions.iter().rev().filter(|&&pos| !seen.insert(&pending[state.decided[pos].pending].row_id)).copied().collect()
            }
            _ => HashSet::new(),
        };
        for pos in positions {
            let row_id = pending[state.decided[pos].pending].row_id.as_ref().expect("decided change's row");
            let slot = state.rows.get_mut(row_id);
            let decided = &state.decided[pos];
            let after = match kind {
                WriteKind::Delete => None,
                // The row before this write (a group's first write of it saw `before`; a later
                // one, the image the previous write left) with the written values.
                WriteKind::PlainUpdate if known || run_continues.contains(&pos) => {
                    let previous = if round == 0 && decided.before.is_some() {
                        decided.before.clone()
                    } else {
                        slot.as_ref().and_then(|s| s.state.values.clone())
                    };
                    previous.map(|mut image| {
                        if let Effect::Write(written) = &decided.decision.effect {
                            image.extend(written.iter().map(|(c, v)| (c.clone(), v.clone())));
                        }
                        image
                    })
                }
                // A statement touches a row once: its image is taken, not copied.
                _ => match images.remove(&row_id.1) {
                    Some(mut image) => {
                        let previous = slot.as_ref().and_then(|s| s.state.values.as_ref());
                        image_as_written(&table, &mut image, previous, &decided.decision.effect);
                        Some(image)
                    }
                    None => slot.as_ref().and_then(|s| s.state.values.clone()),
                },
            };
            // Keep the database's rendering of the row for later changes and the log.
            if let (Some(slot), Some(image)) = (slot, &after) {
                slot.state.values = Some(image.clone());
            }
            state.decided[pos].after = after;
        }
    }
    Ok(())
}

/// Each logged conflict's row label (its table's label column) from the row as the group left
/// it, so that conflict frames carry it as the review API does; none for a row the group
/// deleted.
fn label_conflicts(records: &mut [ConflictRecord], state: &MergeState, presentation: &Presentation) {
    let labelled = |table: &str| presentation.get(table).and_then(|p| p.label_column.as_deref());
    if !records.iter().any(|r| labelled(&r.table).is_some()) {
        return;
    }
    // Keys as JSON text (maps serialize in key order), for the rows of the conflicts' tables only.
    let key_text = |key: &Object| serde_json::to_string(key).unwrap_or_default();
    let tables: HashSet<&str> = records.iter().map(|r| r.table.as_str()).collect();
    let rows: HashMap<(&str, String), &RowSlot> = state
        .rows
        .iter()
        .filter(|((table, _), _)| tables.contains(table.as_str()))
        .map(|((table, _), slot)| ((table.as_str(), key_text(&slot.key)), slot))
        .collect();
    for record in records.iter_mut() {
        let Some(column) = labelled(&record.table) else { continue };
        let slot = rows.get(&(record.table.as_str(), key_text(&record.key)));
        record.row_label = match slot.and_then(|s| s.state.values.as_ref()?.get(column)) {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) => Some(text.clone()),
            Some(other) => Some(other.to_string()),
        };
    }
}

/// The row image a write returned, with the values a client wrote where Postgres holds them
/// unchanged (see `as_written`): this write's fields, and the fields of earlier writes that
/// `previous` (the row as the hub knew it) still holds as written.
fn image_as_written(table: &TableSchema, image: &mut Object, previous: Option<&Object>, effect: &Effect) {
    let column_type = |c: &str| table.column_type(c);
    if let Some(previous) = previous {
        keep_as_written(image, previous, column_type);
    }
    if let Effect::Write(written) = effect {
        keep_as_written(image, written, column_type);
    }
}

/// The group's log record (none when it logged nothing), and for each device the range of its
/// device_seqs that the record holds (`log_device_ranges`, for the acks of re-sent changes).
struct LogRecord<'a> {
    text: Option<String>,
    devices: Vec<&'a str>,
    first_device_seqs: Vec<i64>,
    last_device_seqs: Vec<i64>,
}

impl<'a> LogRecord<'a> {
    /// One change per delta, with the pending change it came from and its log op.
    fn of(deltas: &'a [Delta], changes: impl Iterator<Item = (&'a Pending<'a>, LogOp)>) -> LogRecord<'a> {
        let mut ranges: BTreeMap<&'a str, (i64, i64)> = BTreeMap::new();
        let logged: Vec<ChangeToLog<'a>> = deltas
            .iter()
            .zip(changes)
            .map(|(delta, (pend, op))| {
                let device_seq = pend.change.device_seq as i64;
                let range = ranges.entry(pend.clock.device.as_str()).or_insert((device_seq, device_seq));
                *range = (range.0.min(device_seq), range.1.max(device_seq));
                ChangeToLog {
                    table: &delta.table,
                    op,
                    key: &delta.key,
                    row: delta.row.as_ref(),
                    old: delta.old.as_ref(),
                    written: (pend.change.op == Op::Upsert).then_some(&pend.change.fields),
                    origin: Some(&pend.clock.device),
                    user: pend.clock.user.as_deref(),
                    change_id: Some(pend.change.change_id),
                    device_seq: Some(pend.change.device_seq),
                    wall_ms: pend.clock.hlc.wall_ms,
                    counter: pend.clock.hlc.counter,
                }
            })
            .collect();
        let text = (!logged.is_empty()).then(|| record::encode(&logged));
        let (devices, (first_device_seqs, last_device_seqs)) = ranges.into_iter().unzip();
        LogRecord { text, devices, first_device_seqs, last_device_seqs }
    }
}
