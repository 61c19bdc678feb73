//! The conflict log as reviewers see it: listing with filters and keyset paging, counts by
//! status, one conflict with its row as it is now, and the one conversion from a
//! `synchub.conflicts` row (selected as `to_jsonb(c)`) to [`protocol::ConflictRecord`], used by
//! these reads and by the merge (conflicts it logs, and the ones it resolves).

use std::collections::HashMap;

use protocol::{ConflictRecord, ConflictSide, Hlc, Object, ReviewStatus};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::types::Oid;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo};
use sqlx::{Encode, PgConnection, Postgres, Row, Type};
use uuid::Uuid;

use super::Store;
use crate::error::{Error, Result};
use crate::ids::{TenantId, UserId};

/// How a reviewer resolved a conflict (stored in `conflicts.resolution`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resolution {
    /// The winner's value was written again.
    Keep,
    /// The loser's value was written.
    TakeOther,
    /// A value given by the reviewer was written.
    Value,
}

impl Resolution {
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::Keep => "keep",
            Resolution::TakeOther => "take_other",
            Resolution::Value => "value",
        }
    }
}

/// A batch that writes a conflict's resolution: the merge marks the conflict resolved in the
/// same transaction as the write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveConflict {
    pub conflict_id: i64,
    pub resolution: Resolution,
    /// The conflict's field: its value in the resolving change is the value the resolution
    /// wrote (a restore writes the whole row).
    pub field: String,
}

/// Filters of `GET /v1/conflicts`; every one optional but `limit`.
#[derive(Debug, Clone, Default)]
pub struct ConflictFilter {
    pub status: Option<ReviewStatus>,
    pub table: Option<String>,
    /// Either side's device.
    pub device: Option<String>,
    /// Either side's user.
    pub user: Option<String>,
    pub field: Option<String>,
    /// Text the row's label holds, compared without case.
    pub label: Option<String>,
    /// Inclusive, on `created_at`.
    pub since: Option<Timestamp>,
    /// Exclusive, on `created_at`.
    pub until: Option<Timestamp>,
    /// Only conflicts with a smaller id (the previous page's `next_before_id`).
    pub before_id: Option<i64>,
    pub limit: u32,
}

/// The tenant's conflicts by review status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictCounts {
    pub open: u64,
    pub resolved: u64,
    pub dismissed: u64,
}

pub fn status_str(status: ReviewStatus) -> &'static str {
    match status {
        ReviewStatus::Open => "open",
        ReviewStatus::Resolved => "resolved",
        ReviewStatus::Dismissed => "dismissed",
    }
}

/// A `synchub.conflicts` row as `to_jsonb` renders it.
#[derive(Deserialize)]
struct ConflictRow {
    conflict_id: i64,
    table_name: String,
    pk: Object,
    field: String,
    base_version: i64,
    server_version: i64,
    #[serde(default)]
    server_value: Value,
    server_hlc: Hlc,
    server_device: String,
    server_user: Option<String>,
    #[serde(default)]
    incoming_value: Value,
    incoming_hlc: Hlc,
    incoming_device: String,
    incoming_user: Option<String>,
    winner: String,
    policy: String,
    change_id: Uuid,
    batch_id: Uuid,
    seq: Option<i64>,
    review_status: ReviewStatus,
    reviewed_by: Option<String>,
    reviewed_at: Option<String>,
    created_at: String,
    #[serde(default)]
    resolution: Option<String>,
    #[serde(default)]
    resolution_seq: Option<i64>,
    #[serde(default)]
    resolved_value: Option<Value>,
    #[serde(default)]
    row_label: Option<String>,
}

/// One `synchub.conflicts` row (`to_jsonb(c)`) as the wire's conflict record.
pub fn conflict_record(row: Value) -> Result<ConflictRecord> {
    let r: ConflictRow = serde_json::from_value(row).map_err(|e| Error::Internal(format!("unreadable conflict row: {e}")))?;
    Ok(ConflictRecord {
        id: r.conflict_id,
        table: r.table_name,
        key: r.pk,
        field: r.field,
        status: r.review_status,
        winner: r.winner,
        policy: r.policy,
        base_version: r.base_version as u64,
        seq: r.seq.map(|s| s as u64),
        server: ConflictSide {
            value: r.server_value,
            hlc: r.server_hlc,
            device: r.server_device,
            user: r.server_user,
            version: Some(r.server_version as u64),
        },
        incoming: ConflictSide { value: r.incoming_value, hlc: r.incoming_hlc, device: r.incoming_device, user: r.incoming_user, version: None },
        change_id: r.change_id,
        batch_id: r.batch_id,
        created_at: r.created_at,
        reviewed_by: r.reviewed_by,
        reviewed_at: r.reviewed_at,
        resolution: r.resolution,
        resolution_seq: r.resolution_seq.map(|s| s as u64),
        resolved_value: r.resolved_value,
        row_label: r.row_label,
    })
}

/// The conflicts a group logged, as records ordered by id: the rows it sent to be logged
/// (`sent`, objects of `synchub.conflicts`' columns) completed with what Postgres gave each
/// (`given`: `[conflict_id, change_id, field, created_at]`, a change's conflicts being one per
/// field), open. Postgres's rows are not sent back whole: building them as JSON cost it more
/// than inserting them.
pub fn logged_records(sent: Vec<Value>, given: Value) -> Result<Vec<ConflictRecord>> {
    let unreadable = |what: &str| Error::Internal(format!("unreadable logged conflict: {what}"));
    let Value::Array(given) = given else { return Err(unreadable("not an array")) };
    let mut by_change_field: HashMap<(String, String), (Value, Value)> = HashMap::with_capacity(given.len());
    for entry in given {
        let Value::Array(entry) = entry else { return Err(unreadable("an entry not an array")) };
        let [conflict_id, Value::String(change_id), Value::String(field), created_at] = <[Value; 4]>::try_from(entry).map_err(|_| unreadable("an entry not of four"))?
        else {
            return Err(unreadable("an entry without its change and field"));
        };
        by_change_field.insert((change_id, field), (conflict_id, created_at));
    }
    let mut records = sent
        .into_iter()
        .map(|mut row| {
            let fields = row.as_object_mut().ok_or_else(|| unreadable("a sent row not an object"))?;
            let key = (fields.get("change_id").and_then(Value::as_str), fields.get("field").and_then(Value::as_str));
            let (Some(change_id), Some(field)) = key else { return Err(unreadable("a sent row without its change and field")) };
            let (conflict_id, created_at) =
                by_change_field.remove(&(change_id.to_owned(), field.to_owned())).ok_or_else(|| unreadable("a sent row not logged"))?;
            fields.insert("conflict_id".into(), conflict_id);
            fields.insert("created_at".into(), created_at);
            fields.insert("review_status".into(), Value::String("open".into()));
            conflict_record(row)
        })
        .collect::<Result<Vec<_>>>()?;
    records.sort_by_key(|r| r.id);
    Ok(records)
}

/// A date-time a client gave, parsed at the boundary: a real RFC 3339 date-time
/// (`2024-11-30T10:00:00Z`; fraction and offset as the RFC allows) in the years 0001 to 9999.
/// It is bound as a binary `timestamptz`, so Postgres never parses client text: a date it would
/// refuse (Feb 31, year 0, an offset past ±15:59) is a 400 here, not a database error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp {
    /// Microseconds since 2000-01-01T00:00:00Z, Postgres's own epoch and binary form.
    pg_micros: i64,
}

/// Seconds from the Unix epoch to Postgres's (2000-01-01T00:00:00Z).
const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;

impl Timestamp {
    /// The date-time of RFC 3339 `text`, or `None` when it is not one. Fractions finer than a
    /// microsecond are dropped, as the column keeps microseconds; a leap second (`:60`) is the
    /// next minute's first, as Postgres reads it.
    pub fn parse_rfc3339(text: &str) -> Option<Timestamp> {
        let b = text.as_bytes();
        let digits = |range: std::ops::Range<usize>| -> Option<i64> {
            let s = b.get(range)?;
            s.iter().all(u8::is_ascii_digit).then(|| s.iter().fold(0, |n, d| n * 10 + i64::from(d - b'0')))
        };
        let at = |i: usize, allowed: &[u8]| b.get(i).is_some_and(|c| allowed.contains(c));
        if !(at(4, b"-") && at(7, b"-") && at(10, b"Tt ") && at(13, b":") && at(16, b":")) {
            return None;
        }
        let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
        let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
        if year == 0 || !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
            return None;
        }
        if hour > 23 || minute > 59 || second > 60 {
            return None;
        }
        let mut rest = &b[19..];
        let mut micros = 0;
        if let Some(frac) = rest.strip_prefix(b".") {
            let n = frac.iter().take_while(|c| c.is_ascii_digit()).count();
            if n == 0 {
                return None;
            }
            micros = frac[..n].iter().chain(std::iter::repeat(&b'0')).take(6).fold(0, |m, d| m * 10 + i64::from(d - b'0'));
            rest = &frac[n..];
        }
        let offset_secs = match rest {
            [b'Z' | b'z'] => 0,
            [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] if [h1, h2, m1, m2].iter().all(|c| c.is_ascii_digit()) => {
                let (h, m) = (i64::from((h1 - b'0') * 10 + (h2 - b'0')), i64::from((m1 - b'0') * 10 + (m2 - b'0')));
                if h > 23 || m > 59 {
                    return None;
                }
                if *sign == b'+' { h * 3600 + m * 60 } else { -(h * 3600 + m * 60) }
            }
            _ => return None,
        };
        let unix_secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
        Some(Timestamp { pg_micros: (unix_secs - PG_EPOCH_UNIX_SECS) * 1_000_000 + micros })
    }
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar (H. Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `timestamptz` in `pg_type`.
const TIMESTAMPTZ_OID: Oid = Oid(1184);

impl Type<Postgres> for Timestamp {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(TIMESTAMPTZ_OID)
    }
}

impl Encode<'_, Postgres> for Timestamp {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        // The binary form of `timestamptz`: microseconds since 2000-01-01 UTC, big-endian.
        buf.extend_from_slice(&self.pg_micros.to_be_bytes());
        Ok(IsNull::No)
    }
}

impl Store {
    /// A page of the tenant's conflicts, newest first, and the `before_id` of the next page
    /// (`None` on the last page).
    pub async fn list_conflicts(&self, tenant: &TenantId, filter: &ConflictFilter) -> Result<(Vec<ConflictRecord>, Option<i64>)> {
        let _read = self.read_permit().await?;
        let mut tx = self.begin_tenant(tenant).await?;
        let limit = filter.limit.max(1);
        // One more than the page, to know whether another page follows.
        let rows: Vec<Value> = sqlx::query_scalar(&format!(
            "select to_jsonb(c) || jsonb_build_object('row_label', l.label) from synchub.conflicts c \
             cross join lateral (select {label} as label) l \
             where c.tenant_id = $1 \
               and ($2::text is null or c.review_status = $2) \
               and ($3::text is null or c.table_name = $3) \
               and ($4::text is null or c.server_device = $4 or c.incoming_device = $4) \
               and ($5::timestamptz is null or c.created_at >= $5::timestamptz) \
               and ($6::timestamptz is null or c.created_at < $6::timestamptz) \
               and ($7::int8 is null or c.conflict_id < $7) \
               and ($9::text is null or c.server_user = $9 or c.incoming_user = $9) \
               and ($10::text is null or c.field = $10) \
               and ($11::text is null or strpos(lower(l.label), lower($11)) > 0) \
             order by c.conflict_id desc limit $8",
            label = self.presentation().conflict_label_sql(&self.catalog()),
        ))
        .bind(tenant.as_str())
        .bind(filter.status.map(status_str))
        .bind(filter.table.as_deref())
        .bind(filter.device.as_deref())
        .bind(filter.since)
        .bind(filter.until)
        .bind(filter.before_id)
        .bind(i64::from(limit) + 1)
        .bind(filter.user.as_deref())
        .bind(filter.field.as_deref())
        .bind(filter.label.as_deref())
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let more = rows.len() > limit as usize;
        let records = rows.into_iter().take(limit as usize).map(conflict_record).collect::<Result<Vec<_>>>()?;
        let next = if more { records.last().map(|c| c.id) } else { None };
        Ok((records, next))
    }

    pub async fn conflict_counts(&self, tenant: &TenantId) -> Result<ConflictCounts> {
        let _read = self.read_permit().await?;
        let mut tx = self.begin_tenant(tenant).await?;
        let rows: Vec<(String, i64)> =
            sqlx::query_as("select review_status, count(*) from synchub.conflicts where tenant_id = $1 group by review_status")
                .bind(tenant.as_str())
                .fetch_all(&mut *tx)
                .await?;
        tx.commit().await?;
        let mut counts = ConflictCounts::default();
        for (status, n) in rows {
            match status.as_str() {
                "open" => counts.open = n as u64,
                "resolved" => counts.resolved = n as u64,
                "dismissed" => counts.dismissed = n as u64,
                _ => {}
            }
        }
        Ok(counts)
    }

    /// The tenant's open conflicts (the badge of `conflict` frames), as the conflicts table's
    /// triggers keep them (migration 0011).
    pub async fn open_conflict_count(&self, tenant: &TenantId) -> Result<u64> {
        let mut tx = self.begin_tenant(tenant).await?;
        let n: Option<i64> = sqlx::query_scalar("select open_conflicts from synchub.tenants where tenant_id = $1")
            .bind(tenant.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(n.unwrap_or(0) as u64)
    }

    /// Dismiss an open conflict: nothing is written, the review (`reviewed_by`, `reviewed_at`) is
    /// recorded. The record and the tenant's open count after it; `None` when the conflict is
    /// not open (or not the tenant's).
    pub async fn dismiss_conflict(&self, tenant: &TenantId, id: i64, user: &str) -> Result<Option<(ConflictRecord, u64)>> {
        let mut tx = self.begin_tenant(tenant).await?;
        // The tenant's row first, as a group commit takes it, then the conflict's (whose update
        // moves the open count on the tenant's row): the same order, so no deadlock with a
        // group that resolves the same conflict.
        sqlx::query("select 1 from synchub.tenants where tenant_id = $1 for update").bind(tenant.as_str()).execute(&mut *tx).await?;
        let row: Option<Value> = sqlx::query_scalar(
            "update synchub.conflicts c set review_status = 'dismissed', reviewed_by = $3, reviewed_at = now() \
             where c.tenant_id = $1 and c.conflict_id = $2 and c.review_status = 'open' returning to_jsonb(c)",
        )
        .bind(tenant.as_str())
        .bind(id)
        .bind(user)
        .fetch_optional(&mut *tx)
        .await?;
        let open: Option<i64> = sqlx::query_scalar("select open_conflicts from synchub.tenants where tenant_id = $1")
            .bind(tenant.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        row.map(|row| Ok((conflict_record(row)?, open.unwrap_or(0) as u64))).transpose()
    }

    /// One conflict of the tenant; `None` when there is none with this id in the tenant.
    pub async fn conflict(&self, tenant: &TenantId, id: i64) -> Result<Option<ConflictRecord>> {
        let _read = self.read_permit().await?;
        let mut tx = self.begin_tenant(tenant).await?;
        let sql = format!(
            "select to_jsonb(c) || jsonb_build_object('row_label', {label}) from synchub.conflicts c where c.tenant_id = $1 and c.conflict_id = $2",
            label = self.presentation().conflict_label_sql(&self.catalog()),
        );
        let row: Option<Value> = sqlx::query_scalar(&sql)
            .bind(tenant.as_str())
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        row.map(conflict_record).transpose()
    }

    /// A row as it is now and its version (0 when never written through the log); the row is
    /// `None` when it does not exist (deleted, or its table is no longer synced).
    pub async fn current_row(&self, tenant: &TenantId, table: &str, key: &Object) -> Result<(Option<Object>, u64)> {
        let catalog = self.catalog_with(table).await;
        let Some(schema) = catalog.get(table).cloned() else { return Ok((None, 0)) };
        let _read = self.read_permit().await?;
        let mut tx = self.begin_tenant(tenant).await?;
        let row = sqlx::query(&schema.current_row_sql())
            .bind(tenant.as_str())
            .bind(Value::Object(key.clone()))
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        let values = match row.get::<Option<Value>, _>("row") {
            Some(Value::Object(values)) => Some(values),
            _ => None,
        };
        Ok((values, row.get::<i64, _>("version") as u64))
    }

    /// The values a deleted row had when it was deleted: the old values its delete logged or,
    /// once that entry is trimmed, the ones its tombstone kept. `None` when the row is not
    /// deleted (it was never written through the hub, or is there again) or nothing kept them.
    pub async fn deleted_values(&self, tenant: &TenantId, table: &str, key: &Object) -> Result<Option<Object>> {
        let _read = self.read_permit().await?;
        let mut tx = self.begin_tenant(tenant).await?;
        let values: Option<Option<Value>> = sqlx::query_scalar(
            "select coalesce(synchub.json_value(x.e -> 4)::jsonb, v.last_values) from synchub.row_versions v \
             left join lateral (select synchub.log_entry($1, v.version) as e) x on x.e ->> 1 = 'd' \
             where v.tenant_id = $1 and v.table_name = $2 and v.pk_text = $3::jsonb::text and v.deleted is not null",
        )
        .bind(tenant.as_str())
        .bind(table)
        .bind(Value::Object(key.clone()))
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(match values.flatten() {
            Some(Value::Object(values)) => Some(values),
            _ => None,
        })
    }
}

/// Lock the conflicts `ids` of the tenant until commit; returns those that are open.
pub(super) async fn lock_open(conn: &mut PgConnection, tenant: &TenantId, ids: &[i64]) -> sqlx::Result<Vec<i64>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar(
        "select conflict_id from synchub.conflicts where tenant_id = $1 and conflict_id = any($2) and review_status = 'open' \
         order by conflict_id for update",
    )
    .bind(tenant.as_str())
    .bind(ids)
    .fetch_all(&mut *conn)
    .await
}

/// One conflict to mark resolved.
pub(super) struct Resolved {
    pub conflict_id: i64,
    pub user: UserId,
    pub resolution: Resolution,
    /// Seq of the change that wrote the resolution; `None` when it wrote nothing.
    pub seq: Option<u64>,
    /// The value written; `None` when nothing was.
    pub value: Option<Value>,
}

/// Mark conflicts resolved (those still open, which the caller has locked) and return them.
pub(super) async fn mark_resolved(conn: &mut PgConnection, tenant: &TenantId, marks: &[Resolved]) -> Result<Vec<ConflictRecord>> {
    if marks.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = marks.iter().map(|m| m.conflict_id).collect();
    let users: Vec<&str> = marks.iter().map(|m| m.user.as_str()).collect();
    let resolutions: Vec<&str> = marks.iter().map(|m| m.resolution.as_str()).collect();
    let seqs: Vec<Option<i64>> = marks.iter().map(|m| m.seq.map(|s| s as i64)).collect();
    let values: Vec<Option<Value>> = marks.iter().map(|m| m.value.clone()).collect();
    let rows: Vec<Value> = sqlx::query_scalar(
        "update synchub.conflicts c set review_status = 'resolved', reviewed_by = x.u, reviewed_at = now(), resolution = x.r, \
           resolution_seq = x.s, resolved_value = x.v \
         from unnest($2::int8[], $3::text[], $4::text[], $5::int8[], $6::jsonb[]) as x(id, u, r, s, v) \
         where c.tenant_id = $1 and c.conflict_id = x.id and c.review_status = 'open' \
         returning to_jsonb(c)",
    )
    .bind(tenant.as_str())
    .bind(&ids)
    .bind(&users)
    .bind(&resolutions)
    .bind(&seqs)
    .bind(&values)
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter().map(conflict_record).collect()
}

impl Store {
    /// How many conflicts the tenant logged in each of the `hours` whole UTC hours ending with
    /// the current one (oldest first, every hour present), whatever their review status.
    pub async fn conflicts_per_hour(&self, tenant: &TenantId, now_ms: i64, hours: u32) -> Result<Vec<(i64, u64)>> {
        const HOUR_MS: i64 = super::log::HOUR_MS;
        let first_hour = now_ms.div_euclid(HOUR_MS) * HOUR_MS - (i64::from(hours.max(1)) - 1) * HOUR_MS;
        let _read = self.read_permit().await?;
        let mut tx = self.begin_tenant_with(tenant, "begin read only", &[], "").await?;
        // Each status is its own range of the (tenant, status, created_at) index.
        let rows: Vec<(i64, i64)> = sqlx::query_as(
            "select (floor(extract(epoch from created_at) / 3600) * 3600000)::int8 as hour_ms, count(*)::int8 \
             from synchub.conflicts where tenant_id = $1 and review_status in ('open', 'resolved', 'dismissed') \
               and created_at >= to_timestamp($2::float8 / 1000) group by 1",
        )
        .bind(tenant.as_str())
        .bind(first_hour as f64)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut buckets: Vec<(i64, u64)> = (0..i64::from(hours.max(1))).map(|i| (first_hour + i * HOUR_MS, 0)).collect();
        for (hour_ms, count) in rows {
            if let Some(bucket) = usize::try_from((hour_ms - first_hour) / HOUR_MS).ok().and_then(|i| buckets.get_mut(i)) {
                bucket.1 = count.max(0) as u64;
            }
        }
        Ok(buckets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rfc3339_accepts_real_dates_and_nothing_else() {
        let at = |text: &str| Timestamp::parse_rfc3339(text).unwrap_or_else(|| panic!("{text}")).pg_micros;
        assert_eq!(at("2000-01-01T00:00:00Z"), 0);
        assert_eq!(at("1970-01-01T00:00:00Z"), -PG_EPOCH_UNIX_SECS * 1_000_000);
        assert_eq!(at("2024-11-30T10:00:00Z"), (1_732_960_800 - PG_EPOCH_UNIX_SECS) * 1_000_000);
        assert_eq!(at("2024-11-30T11:30:00+01:30"), at("2024-11-30T10:00:00Z"));
        assert_eq!(at("2024-11-30T04:30:00-05:30"), at("2024-11-30t10:00:00z"));
        assert_eq!(at("2024-11-30 10:00:00.1234567Z") - at("2024-11-30T10:00:00Z"), 123_456);
        assert_eq!(at("2024-11-30T10:00:00.5Z") - at("2024-11-30T10:00:00Z"), 500_000);
        assert_eq!(at("2016-12-31T23:59:60Z"), at("2017-01-01T00:00:00Z"), "a leap second");
        assert_eq!(at("2024-03-01T00:00:00Z") - at("2024-02-29T00:00:00Z"), 86_400_000_000);
        assert_eq!(at("2001-03-01T00:00:00Z") - at("2001-02-28T00:00:00Z"), 86_400_000_000);
        assert!(at("0001-01-01T00:00:00+23:59") < at("9999-12-31T23:59:59.999999-23:59"));
        for ok in ["2000-02-29T00:00:00Z", "2024-02-29T23:59:60-05:30", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z"] {
            assert!(Timestamp::parse_rfc3339(ok).is_some(), "{ok}");
        }
        for bad in [
            "2024-02-31T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "1900-02-29T00:00:00Z",
            "2024-04-31T00:00:00Z",
            "0000-01-01T00:00:00Z",
            "2024-00-01T00:00:00Z",
            "2024-01-00T00:00:00Z",
            "2024-11-30",
            "2024-11-30T10:00:00",
            "2024-13-01T00:00:00Z",
            "2024-11-30T24:00:00Z",
            "2024-11-30T10:60:00Z",
            "2024-11-30T10:00:61Z",
            "2024-11-30T10:00:00.Z",
            "2024-11-30T10:00:00+24:00",
            "2024-11-30T10:00:00+1:00",
            "2024-11-30T10:00:00Z ",
            "+2024-11-30T10:00:00Z",
            "2024-11-30T10:00:00\0Z",
            "yesterday",
            "'; drop",
            "",
        ] {
            assert!(Timestamp::parse_rfc3339(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn timestamps_bind_as_binary_timestamptz() {
        let mut buf = PgArgumentBuffer::default();
        let t = Timestamp::parse_rfc3339("2000-01-01T00:00:01Z").unwrap();
        assert!(matches!(t.encode_by_ref(&mut buf), Ok(IsNull::No)));
        assert_eq!(&buf[..], &1_000_000i64.to_be_bytes());
        assert_eq!(<Timestamp as Type<Postgres>>::type_info().oid(), Some(TIMESTAMPTZ_OID));
    }

    #[test]
    fn a_conflict_row_becomes_a_record() {
        let row = json!({
            "conflict_id": 17, "tenant_id": "t", "table_name": "products", "pk": {"id": "a"}, "field": "price_cents",
            "base_version": 3, "server_version": 5, "server_value": 100, "server_hlc": {"wall_ms": 10, "counter": 1},
            "server_device": "pos-1", "server_user": "u1", "incoming_value": null, "incoming_hlc": {"wall_ms": 9, "counter": 0},
            "incoming_device": "pos-2", "incoming_user": null, "winner": "server", "policy": "lww",
            "change_id": "0192f0d8-0000-7000-8000-000000000001", "batch_id": "0192f0d8-0000-7000-8000-000000000002",
            "seq": null, "review_status": "resolved", "reviewed_by": "m", "reviewed_at": "2024-11-30T10:00:01+00:00",
            "created_at": "2024-11-30T10:00:00+00:00", "resolution": "keep", "resolution_seq": 9, "resolved_value": 100
        });
        let record = conflict_record(row).unwrap();
        assert_eq!(record.id, 17);
        assert_eq!(record.status, ReviewStatus::Resolved);
        assert_eq!(record.server.version, Some(5));
        assert_eq!(record.server.value, json!(100));
        assert_eq!(record.incoming.value, Value::Null);
        assert_eq!(record.incoming.version, None);
        assert_eq!(record.resolution.as_deref(), Some("keep"));
        assert_eq!(record.resolution_seq, Some(9));
        assert_eq!(record.resolved_value, Some(json!(100)));
        assert_eq!(record.seq, None);
    }

    #[test]
    fn logged_conflicts_are_the_rows_sent_with_what_postgres_gave_them() {
        let sent = |field: &str, change: &str| {
            json!({
                "table_name": "products", "pk": {"id": "a"}, "field": field, "base_version": 3, "server_version": 5,
                "server_value": 100, "server_hlc": {"wall_ms": 10, "counter": 1}, "server_device": "pos-1", "server_user": "u1",
                "incoming_value": 90, "incoming_hlc": {"wall_ms": 9, "counter": 0}, "incoming_device": "pos-2", "incoming_user": "u2",
                "winner": "server", "policy": "lww", "change_id": change, "batch_id": "0192f0d8-0000-7000-8000-000000000002", "seq": 12
            })
        };
        let (c1, c2) = ("0192f0d8-0000-7000-8000-000000000001", "0192f0d8-0000-7000-8000-000000000003");
        let given = json!([
            [42, c2, "stock", "2024-11-30T10:00:00.5+00:00"],
            [40, c1, "price_cents", "2024-11-30T10:00:00+00:00"],
            [41, c1, "stock", "2024-11-30T10:00:00+00:00"]
        ]);
        let records = logged_records(vec![sent("stock", c2), sent("price_cents", c1), sent("stock", c1)], given).unwrap();
        let ids: Vec<(i64, &str, String)> = records.iter().map(|r| (r.id, r.field.as_str(), r.change_id.to_string())).collect();
        assert_eq!(ids, [(40, "price_cents", c1.to_string()), (41, "stock", c1.to_string()), (42, "stock", c2.to_string())], "by id");
        assert_eq!(records[2].created_at, "2024-11-30T10:00:00.5+00:00");
        assert!(records.iter().all(|r| r.status == ReviewStatus::Open && r.reviewed_by.is_none() && r.resolution.is_none()));
        assert_eq!((records[0].server.version, records[0].incoming.value.clone(), records[0].seq), (Some(5), json!(90), Some(12)));

        let not_logged = logged_records(vec![sent("stock", c1)], json!([[40, c1, "price_cents", "2024-11-30T10:00:00+00:00"]]));
        assert!(not_logged.is_err(), "a row Postgres did not log is an error, not a record without an id");
    }
}
