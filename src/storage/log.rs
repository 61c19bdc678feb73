//! Reads of the change log and of tenant state: the tenant's head and epoch, catch-up pages
//! after a position, and snapshot pages of a table's current rows with their versions. Each
//! read is a transaction scoped to its tenant ([`Store::begin_tenant`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use protocol::{Delta, ErrorCode, Object, SnapshotRow};
use serde_json::Value;
use sqlx::Row;

use super::record::{self, LoggedChange};
use super::Store;
use crate::error::{Error, Result};
use crate::ids::{Seq, TenantId, CONSOLE_DEVICE_PREFIX};
use crate::rules::AccessView;
use crate::storage::catalog::TableSchema;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantHead {
    pub epoch: Arc<str>,
    pub head_seq: Seq,
    pub log_floor: Seq,
}

/// A read of the change log: the entries, and where the tenant's log stood.
pub struct LogPage {
    pub deltas: Vec<Delta>,
    pub head_seq: Seq,
    pub log_floor: Seq,
}

fn object(value: Option<Value>) -> Option<Object> {
    match value {
        Some(Value::Object(map)) => Some(map),
        _ => None,
    }
}

impl Store {
    /// The tenant's head, creating the tenant on first sight.
    pub async fn tenant_head(&self, tenant: &TenantId) -> Result<TenantHead> {
        let _read = self.read_permit().await?;
        let mut tx = self.begin_tenant(tenant).await?;
        let row = sqlx::query(
            "with ins as (insert into synchub.tenants (tenant_id) values ($1) on conflict do nothing returning epoch, head_seq, log_floor) \
             select epoch, head_seq, log_floor from ins union all \
             select epoch, head_seq, log_floor from synchub.tenants where tenant_id = $1 limit 1",
        )
        .bind(tenant.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        // Another transaction created the tenant after this statement's snapshot (another
        // node meeting the same new tenant): the insert waited for it and did nothing, and the
        // select could not see its row. A new statement does.
        let row = match row {
            Some(row) => row,
            None => sqlx::query("select epoch, head_seq, log_floor from synchub.tenants where tenant_id = $1").bind(tenant.as_str()).fetch_one(&mut *tx).await?,
        };
        tx.commit().await?;
        Ok(TenantHead {
            epoch: row.get::<String, _>("epoch").into(),
            head_seq: row.get::<i64, _>("head_seq") as Seq,
            log_floor: row.get::<i64, _>("log_floor") as Seq,
        })
    }

    /// The heads of `tenants` (those the log knows), in one read as the hub's own login: a
    /// cluster node whose NATS link is down polls them to learn of other nodes' commits.
    pub async fn tenant_heads(&self, tenants: &[TenantId]) -> Result<Vec<(TenantId, Seq)>> {
        let ids: Vec<&str> = tenants.iter().map(TenantId::as_str).collect();
        let _read = self.read_permit().await?;
        let rows: Vec<(String, i64)> = sqlx::query_as("select tenant_id, head_seq from synchub.tenants where tenant_id = any($1)")
            .bind(&ids)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|(t, h)| (TenantId::new(t), h as Seq)).collect())
    }

    /// Up to `limit` log entries with `after < seq <= upto`, in seq order, with the tenant's
    /// head seq and log floor as of the read (entries at or below the floor are never served).
    pub async fn read_log(&self, tenant: &TenantId, after: Seq, upto: Option<Seq>, limit: u32) -> Result<LogPage> {
        let _read = self.read_permit().await?;
        let mut tx = self.begin_tenant(tenant).await?;
        let head: Option<(i64, i64)> = sqlx::query_as("select head_seq, log_floor from synchub.tenants where tenant_id = $1")
            .bind(tenant.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        let (head, floor) = head.map_or((0, 0), |(h, f)| (h as Seq, f as Seq));
        // Seqs are gap-free above the floor: `limit` entries end at `after + limit`.
        let from = after.max(floor);
        let last = upto.unwrap_or(head).min(from.saturating_add(limit as Seq));
        let changes = changes_between(&mut tx, tenant, from, last).await?;
        tx.commit().await?;
        let deltas: Vec<Delta> = changes.into_iter().map(LoggedChange::into_delta).collect();
        let head_seq = head.max(deltas.last().map_or(0, |d| d.seq));
        Ok(LogPage { deltas, head_seq, log_floor: floor })
    }

    /// One page of a table's rows in key order, read together with the head seq in one
    /// repeatable-read snapshot, so a device can resume from that seq without a gap.
    /// With an access view: an unreadable table is `forbidden`, the row restriction is part of
    /// the query (so pages stay full and `after` stays right), hidden columns are stripped.
    pub async fn snapshot_page(
        &self,
        tenant: &TenantId,
        table: &TableSchema,
        after: Option<&Object>,
        limit: u32,
        access: Option<&AccessView>,
    ) -> Result<(Vec<SnapshotRow>, Seq, String)> {
        if access.is_some_and(|a| !a.can_read(&table.name)) {
            return Err(Error::client(ErrorCode::Forbidden, format!("this role may not read `{}`", table.name)));
        }
        let restriction = access.and_then(|a| a.row_restriction(&table.name));
        let _read = self.read_permit().await?;
        let mut tx = self.begin_tenant_with(tenant, "begin isolation level repeatable read, read only", &[], "").await?;
        let head = sqlx::query("select epoch, head_seq from synchub.tenants where tenant_id = $1")
            .bind(tenant.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        let (epoch, head_seq) = match head {
            Some(r) => (r.get::<String, _>("epoch"), r.get::<i64, _>("head_seq") as Seq),
            None => (String::new(), 0),
        };
        let sql = table.snapshot_sql(restriction.is_some());
        let mut query = sqlx::query(&sql).bind(tenant.as_str()).bind(after.map(|a| Value::Object(a.clone()))).bind(limit as i64);
        if let Some((column, value)) = restriction {
            query = query.bind(column).bind(value);
        }
        let rows = query.fetch_all(&mut *tx).await?;
        let keys: Vec<Value> = rows.iter().map(|r| r.get::<Value, _>("key")).collect();
        let versions = row_versions(&mut tx, tenant, &table.name, &keys).await?;
        tx.commit().await?;
        let page = rows
            .into_iter()
            .zip(versions)
            .map(|(r, version)| {
                let mut row = object(r.get("row")).unwrap_or_default();
                if let Some(access) = access {
                    // Key columns stay: they name the row and the next page starts after them.
                    for column in access.hidden_columns(&table.name).iter().filter(|c| !table.key.contains(c)) {
                        row.remove(column);
                    }
                }
                SnapshotRow { row, version }
            })
            .collect();
        Ok((page, head_seq, epoch))
    }

}

/// One hour of the tenant's log: how many changes were committed in it, and how many devices
/// pushed some of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HourOfChanges {
    /// The hour's start, Unix ms (a whole UTC hour).
    pub hour_ms: i64,
    /// Changes logged (every writer's: devices, the console, SQL clients).
    pub changes: u64,
    /// Of them, the devices' own (their pushes'; not the console's or SQL writers').
    pub pushed: u64,
    /// Devices whose changes were among them.
    pub devices: u64,
}

/// An hour in ms.
pub const HOUR_MS: i64 = 3_600_000;

impl Store {
    /// The tenant's changes per hour for the `hours` whole UTC hours ending with the current
    /// one (oldest first, every hour present), counted from the log's records (`log_groups`,
    /// by commit time) and the devices' ranges in them: the records themselves are not read.
    /// Hours whose log was trimmed count only what is left.
    pub async fn changes_per_hour(&self, tenant: &TenantId, now_ms: i64, hours: u32) -> Result<Vec<HourOfChanges>> {
        let first_hour = now_ms.div_euclid(HOUR_MS) * HOUR_MS - (i64::from(hours.max(1)) - 1) * HOUR_MS;
        let _read = self.read_permit().await?;
        let mut tx = self.begin_tenant_with(tenant, "begin isolation level repeatable read, read only", &[], "").await?;
        let rows: Vec<(i64, i64, i64, i64)> = sqlx::query_as(
            "with g as materialized (select last_seq, last_seq - first_seq + 1 as n, \
                 (floor(extract(epoch from committed_at) / 3600) * 3600000)::int8 as hour_ms \
               from synchub.log_groups where tenant_id = $1 and committed_at >= to_timestamp($2::float8 / 1000)) \
             , d as (select g.hour_ms, count(distinct r.device_id) as devices, \
                   sum(r.last_device_seq - r.first_device_seq + 1) as pushed from g \
                 join synchub.log_device_ranges r on r.tenant_id = $1 and r.group_last_seq = g.last_seq \
                 where left(r.device_id, $3) <> $4 group by g.hour_ms) \
             select g.hour_ms, sum(g.n)::int8, coalesce(max(d.pushed), 0)::int8, coalesce(max(d.devices), 0)::int8 \
             from g left join d on d.hour_ms = g.hour_ms group by g.hour_ms",
        )
        .bind(tenant.as_str())
        .bind(first_hour as f64)
        .bind(CONSOLE_DEVICE_PREFIX.len() as i32)
        .bind(CONSOLE_DEVICE_PREFIX)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut buckets: Vec<HourOfChanges> =
            (0..i64::from(hours.max(1))).map(|i| HourOfChanges { hour_ms: first_hour + i * HOUR_MS, ..Default::default() }).collect();
        for (hour_ms, changes, pushed, devices) in rows {
            if let Some(bucket) = usize::try_from((hour_ms - first_hour) / HOUR_MS).ok().and_then(|i| buckets.get_mut(i)) {
                bucket.changes = changes.max(0) as u64;
                bucket.pushed = pushed.max(0) as u64;
                bucket.devices = devices.max(0) as u64;
            }
        }
        Ok(buckets)
    }
}

/// The changes of the tenant's log with `after < seq <= upto`, in seq order: the records that
/// hold them, read in one statement and sliced here. Every read of the log's changes goes
/// through this function (and [`device_change_seqs`]): the records' format is this module's
/// business (see `record`).
pub(super) async fn changes_between(conn: &mut sqlx::PgConnection, tenant: &TenantId, after: Seq, upto: Seq) -> Result<Vec<LoggedChange>> {
    if upto <= after {
        return Ok(Vec::new());
    }
    let records: Vec<(i64, String)> = sqlx::query_as(
        "select first_seq, changes::text from synchub.log_groups \
         where tenant_id = $1 and last_seq > $2 and first_seq <= $3 order by last_seq",
    )
    .bind(tenant.as_str())
    .bind(after as i64)
    .bind(upto as i64)
    .fetch_all(&mut *conn)
    .await?;
    let mut changes = Vec::new();
    for (first_seq, text) in records {
        changes.extend(record::decode_range(&text, first_seq as Seq, after, Some(upto)).map_err(|err| Error::Internal(err.to_string()))?);
    }
    Ok(changes)
}

/// The seqs at which these changes of devices (device, device_seq) were logged; a change that
/// wrote nothing, or whose record was trimmed, is not found. For the acks of re-sent changes.
pub(super) async fn device_change_seqs(
    conn: &mut sqlx::PgConnection,
    tenant: &TenantId,
    wanted: &[(&str, u64)],
) -> Result<HashMap<(String, u64), Seq>> {
    if wanted.is_empty() {
        return Ok(HashMap::new());
    }
    let (devices, device_seqs): (Vec<&str>, Vec<i64>) = wanted.iter().map(|(d, s)| (*d, *s as i64)).unzip();
    let records: Vec<(i64, String)> = sqlx::query_as(
        "select g.first_seq, g.changes::text from synchub.log_groups g where g.tenant_id = $1 and g.last_seq in ( \
           select r.group_last_seq from unnest($2::text[], $3::int8[]) as x(device, device_seq) \
           cross join lateral (select r.group_last_seq from synchub.log_device_ranges r \
             where r.tenant_id = $1 and r.device_id = x.device and r.last_device_seq >= x.device_seq \
             order by r.last_device_seq limit 1) r)",
    )
    .bind(tenant.as_str())
    .bind(&devices)
    .bind(&device_seqs)
    .fetch_all(&mut *conn)
    .await?;
    let wanted: HashSet<(&str, u64)> = wanted.iter().copied().collect();
    let mut found = HashMap::new();
    for (first_seq, text) in records {
        for change in record::decode(&text, first_seq as Seq).map_err(|err| Error::Internal(err.to_string()))? {
            if let (Some(origin), Some(device_seq)) = (change.origin, change.device_seq) {
                if wanted.contains(&(origin.as_str(), device_seq)) {
                    found.insert((origin, device_seq), change.seq);
                }
            }
        }
    }
    Ok(found)
}

/// `from` the `row_versions` rows (as `v`) of the keys `$3` (jsonb[]) of tenant `$1`'s table
/// `$2`, each looked up by its own descent of the primary key. A list of keys
/// (`pk_text = any(...)`) lets the planner scan the tenant's whole table instead when it expects
/// few rows under the tenant and table, as before Postgres has statistics (a new database, a new
/// tenant's first load): 237 ms a page of 100 keys against 0.9 ms at 5,000 rows. The keys are
/// made text before the lookup: under the tenant role's row-level security, a cast (not
/// leakproof) inside it would keep the key out of the index condition. `offset 0` keeps each
/// lookup its own subquery.
macro_rules! row_versions_by_key {
    () => {
        "from unnest($3::jsonb[]::text[]) k(pk_text) cross join lateral (select * from synchub.row_versions v \
         where v.tenant_id = $1 and v.table_name = $2 and v.pk_text = k.pk_text offset 0) v"
    };
}
pub(super) use row_versions_by_key;

/// The versions of rows of `table` by normalized key, in the order of `keys` (0 for a row never
/// written through the log).
pub(super) async fn row_versions(conn: &mut sqlx::PgConnection, tenant: &TenantId, table: &str, keys: &[Value]) -> Result<Vec<Seq>> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let found: Vec<(Value, i64)> = sqlx::query_as(concat!("select v.pk, v.version ", row_versions_by_key!()))
    .bind(tenant.as_str())
    .bind(table)
    .bind(keys)
    .fetch_all(&mut *conn)
    .await?;
    let found: std::collections::HashMap<String, i64> = found.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    Ok(keys.iter().map(|k| found.get(&k.to_string()).copied().unwrap_or(0) as Seq).collect())
}
