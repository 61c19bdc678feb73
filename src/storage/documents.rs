//! Reads of a synced table as documents (RxDB's pull): the rows changed after a seq, each once
//! at its latest change, and a snapshot of the current rows and then the tombstones, page by
//! page. Each page is one repeatable-read transaction scoped to its tenant, honouring the
//! reader's access view (row restriction, hidden columns) as the native snapshot does.

use std::collections::HashMap;
use std::sync::Arc;

use protocol::{Delta, ErrorCode, Object, Op};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{PgConnection, Row};

use super::as_written::keep_as_written;
use super::catalog::TableSchema;
use super::log::{changes_between, row_versions, row_versions_by_key};
use super::record::LoggedChange;
use super::Store;
use crate::error::{Error, Result};
use crate::ids::{Seq, TenantId};
use crate::rules::AccessView;
use crate::sync::views::previous_image;

/// One page of documents, with where the tenant's log stood when it was read.
#[derive(Debug, Clone, PartialEq)]
pub struct DocumentPage {
    pub docs: Vec<StoredDocument>,
    pub epoch: Arc<str>,
    /// [`Store::changed_documents`]: the tenant's head as of the read; when the page holds fewer
    /// documents than asked for, nothing else of the table changed up to it.
    /// [`Store::document_snapshot`]: the head when the snapshot began (its first page), from
    /// which changes are to be read once its last page is read.
    pub head_seq: Seq,
    pub log_floor: Seq,
}

/// A row as a document.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDocument {
    /// Seq of the row's latest change (0 in a rows/tombstones page).
    pub seq: Seq,
    /// The primary key without the tenant column.
    pub key: Object,
    /// Current row image (values as written where the log still holds them and Postgres holds
    /// the same values); for a tombstone the last values the hub knows (the delete's old row, which
    /// a trim of the log keeps in `row_versions.last_values`; else just the key). Columns hidden from the reader are left out.
    pub row: Object,
    pub deleted: bool,
}

/// Where a [`Store::document_snapshot`] goes on: JSON in the reader's checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCursor {
    /// The tenant's epoch when the snapshot began; a page of another epoch is refused.
    pub epoch: String,
    /// The tenant's head when the snapshot began: changes after it are read with
    /// [`Store::changed_documents`] once the snapshot is done.
    pub since: Seq,
    pub phase: SnapshotPhase,
    /// The key of the phase's last document read so far.
    pub after: Option<Object>,
}

/// A snapshot reads the current rows, then the tombstones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotPhase {
    Rows,
    Tombstones,
}

/// Document reads see one consistent state of the tenant.
const READ_SNAPSHOT: &str = "begin isolation level repeatable read, read only";

/// How many seqs of the log a read of changed documents decodes at a time.
const CHANGED_SCAN_SEQS: Seq = 1_000;

/// The latest log image of rows of a table: `$1` tenant, `$2` table, `$3` keys (jsonb[]).
/// Past a trim of the log, the image its last entry had, kept in `row_versions.last_values`.
/// Each key is looked up on its own (`ROW_VERSIONS_BY_KEY`), its entry by the row's version
/// (`synchub.log_entry`, migration 0015).
const LATEST_IMAGES_SQL: &str = concat!(
    "select pk, image from (select v.pk, coalesce(synchub.json_value(synchub.log_entry($1, v.version) -> 3)::jsonb, v.last_values) as image ",
    row_versions_by_key!(),
    " where v.deleted is null) x where image is not null"
);

impl Store {
    /// Rows of `table` changed after `after` (only this table's entries), each once at its latest
    /// log entry, ordered by that entry's seq, at most `limit`: live rows with their image,
    /// deleted ones as tombstones with the delete's old row, and for a reader with a row
    /// restriction, a row that left it as a tombstone with the values it had. Fails with
    /// `position_too_old` when `after < log_floor` (the log was trimmed past it: resync with
    /// [`Store::document_snapshot`]) and `forbidden` when the reader may not read the table.
    pub async fn changed_documents(
        &self,
        tenant: &TenantId,
        table: &TableSchema,
        after: Seq,
        limit: u32,
        access: Option<&AccessView>,
    ) -> Result<DocumentPage> {
        check_readable(table, access)?;
        let restriction = access.and_then(|a| a.row_restriction(&table.name));
        let _read = self.read_permit().await?;
        let mut tx = self.begin_tenant_with(tenant, READ_SNAPSHOT, &[], "").await?;
        let state = log_state(&mut tx, tenant).await?;
        if after < state.log_floor {
            return Err(Error::client(
                ErrorCode::PositionTooOld,
                format!("changes after seq {after} are no longer kept (the log starts after {}); resync", state.log_floor),
            ));
        }
        let entries = latest_entries(&mut tx, tenant, table, (after, state.head_seq), limit, restriction).await?;
        tx.commit().await?;
        let mut docs: Vec<StoredDocument> = entries.into_iter().filter_map(|entry| changed_document(table, entry, access)).collect();
        strip_hidden(table, access, &mut docs);
        Ok(DocumentPage { docs, epoch: state.epoch, head_seq: state.head_seq, log_floor: state.log_floor })
    }

    /// Current rows and then tombstones of `table`, each in key order, `limit` documents a page
    /// from where `after` left off (`None`: from the start); returns the cursor of the next page,
    /// `None` after the last. The page's `head_seq` is the head when the snapshot began: read
    /// changes from there once it is done. Fails with `position_too_old` when the tenant's epoch
    /// changed or its log was trimmed past that head since the snapshot began (start again), and
    /// `forbidden` when the reader may not read the table.
    pub async fn document_snapshot(
        &self,
        tenant: &TenantId,
        table: &TableSchema,
        after: Option<&SnapshotCursor>,
        limit: u32,
        access: Option<&AccessView>,
    ) -> Result<(DocumentPage, Option<SnapshotCursor>)> {
        check_readable(table, access)?;
        let restriction = access.and_then(|a| a.row_restriction(&table.name));
        let limit = limit.max(1) as usize;
        let _read = self.read_permit().await?;
        let mut tx = self.begin_tenant_with(tenant, READ_SNAPSHOT, &[], "").await?;
        let state = log_state(&mut tx, tenant).await?;
        let since = snapshot_since(after, &state)?;
        let from = after.and_then(|c| c.after.as_ref());
        let (mut docs, phase) = match after.map_or(SnapshotPhase::Rows, |c| c.phase) {
            SnapshotPhase::Rows => {
                let mut docs = current_rows(&mut tx, tenant, table, from, limit, restriction).await?;
                if docs.len() < limit {
                    docs.extend(tombstones(&mut tx, tenant, table, None, limit - docs.len(), restriction).await?);
                }
                let phase = if docs.last().is_some_and(|d| d.deleted) { SnapshotPhase::Tombstones } else { SnapshotPhase::Rows };
                (docs, phase)
            }
            SnapshotPhase::Tombstones => (tombstones(&mut tx, tenant, table, from, limit, restriction).await?, SnapshotPhase::Tombstones),
        };
        tx.commit().await?;
        let next = (docs.len() == limit).then(|| SnapshotCursor {
            epoch: state.epoch.to_string(),
            since,
            phase,
            after: docs.last().map(|d| d.key.clone()),
        });
        strip_hidden(table, access, &mut docs);
        Ok((DocumentPage { docs, epoch: state.epoch, head_seq: since, log_floor: state.log_floor }, next))
    }
}

fn check_readable(table: &TableSchema, access: Option<&AccessView>) -> Result<()> {
    match access {
        Some(a) if !a.can_read(&table.name) => Err(Error::client(ErrorCode::Forbidden, format!("this role may not read `{}`", table.name))),
        _ => Ok(()),
    }
}

/// Where the tenant's log stands, as read in a page's transaction.
struct LogState {
    epoch: Arc<str>,
    head_seq: Seq,
    log_floor: Seq,
}

/// The tenant's epoch, head and floor (empty and zero for a tenant not yet seen).
async fn log_state(conn: &mut PgConnection, tenant: &TenantId) -> Result<LogState> {
    let row: Option<(String, i64, i64)> = sqlx::query_as("select epoch, head_seq, log_floor from synchub.tenants where tenant_id = $1")
        .bind(tenant.as_str())
        .fetch_optional(&mut *conn)
        .await?;
    let (epoch, head, floor) = row.unwrap_or_default();
    Ok(LogState { epoch: epoch.into(), head_seq: head as Seq, log_floor: floor as Seq })
}

/// The head a snapshot began at: the current one for its first page; the cursor's while the
/// epoch is the same and the log still holds the changes after it.
fn snapshot_since(after: Option<&SnapshotCursor>, state: &LogState) -> Result<Seq> {
    let Some(cursor) = after else { return Ok(state.head_seq) };
    if *cursor.epoch != *state.epoch || cursor.since < state.log_floor {
        return Err(Error::client(
            ErrorCode::PositionTooOld,
            "the tenant's log began anew or was trimmed during the snapshot; start the snapshot again",
        ));
    }
    Ok(cursor.since)
}

/// This table's log entries after `after` (up to the tenant's `head`) that are their rows'
/// latest (the row's version is the entry's seq), in seq order, at most `limit`; with a row
/// restriction, only entries whose new row or old values hold the value. The log is decoded
/// `CHANGED_SCAN_SEQS` at a time until the page is full.
async fn latest_entries(
    conn: &mut PgConnection,
    tenant: &TenantId,
    table: &TableSchema,
    (after, head): (Seq, Seq),
    limit: u32,
    restriction: Option<(&str, &str)>,
) -> Result<Vec<Delta>> {
    let limit = limit as usize;
    let mut found = Vec::new();
    let mut from = after;
    while found.len() < limit && from < head {
        let upto = from.saturating_add(CHANGED_SCAN_SEQS).min(head);
        let candidates: Vec<LoggedChange> = changes_between(conn, tenant, from, upto)
            .await?
            .into_iter()
            .filter(|c| c.table == table.name && restriction.is_none_or(|r| holds_restricted(c, r)))
            .collect();
        let keys: Vec<Value> = candidates.iter().map(|c| Value::Object(c.key.clone())).collect();
        let versions = row_versions(conn, tenant, &table.name, &keys).await?;
        found.extend(candidates.into_iter().zip(versions).filter(|(c, version)| c.seq == *version).map(|(c, _)| c.into_delta()));
        from = upto;
    }
    found.truncate(limit);
    Ok(found)
}

/// Whether the change's new row (else its old values), or its old values, hold `value` in
/// `column`, compared as text the way Postgres's `->>` renders it.
fn holds_restricted(change: &LoggedChange, (column, value): (&str, &str)) -> bool {
    let as_text = |v: &Value| match v {
        Value::String(s) => s == value,
        Value::Null => false,
        other => other.to_string() == value,
    };
    let image = change.row.as_ref().or(change.old.as_ref());
    image.and_then(|i| i.get(column)).is_some_and(as_text) || change.old.as_ref().and_then(|o| o.get(column)).is_some_and(as_text)
}

/// A row's latest change as the reader sees the document: live with its new row, or deleted
/// with the values it had (a delete's old row; for a reader with a row restriction, the row as it
/// was before it left the restriction). `None` when the reader sees neither.
fn changed_document(table: &TableSchema, mut entry: Delta, access: Option<&AccessView>) -> Option<StoredDocument> {
    let visible = |row: &Object| access.is_none_or(|a| a.row_visible(&table.name, row));
    let (row, deleted) = match entry.op {
        Op::Upsert if entry.row.as_ref().is_some_and(visible) => (entry.row.take()?, false),
        // It left the reader's rows: deleted, as far as the reader is concerned.
        Op::Upsert => (previous_image(&entry).filter(visible)?, true),
        Op::Delete => (Some(entry.old.take().unwrap_or_else(|| entry.key.clone())).filter(visible)?, true),
    };
    Some(StoredDocument { seq: entry.seq, key: entry.key, row, deleted })
}

/// A page of current rows after `after` in key order, values as written where the rows' latest
/// log entries hold them and Postgres holds the same values.
async fn current_rows(
    conn: &mut PgConnection,
    tenant: &TenantId,
    table: &TableSchema,
    after: Option<&Object>,
    limit: usize,
    restriction: Option<(&str, &str)>,
) -> Result<Vec<StoredDocument>> {
    let rows = key_ordered_page(conn, &table.snapshot_sql(restriction.is_some()), tenant, after, limit, restriction).await?;
    let keys: Vec<Value> = rows.iter().map(|r| r.get::<Value, _>("key")).collect();
    let mut images = latest_images(conn, tenant, &table.name, &keys).await?;
    let docs = rows
        .into_iter()
        .zip(keys)
        .map(|(r, key)| {
            let mut row = object(r.get("row"));
            if let Some(logged) = images.remove(&key.to_string()) {
                keep_as_written(&mut row, &logged, |c| table.column_type(c));
            }
            StoredDocument { seq: 0, key: object(key), row, deleted: false }
        })
        .collect();
    Ok(docs)
}

/// One page of a key-ordered read (`sql` takes `$1` tenant, `$2` key to start after, `$3`
/// limit, and with a row restriction `$4` column and `$5` value).
async fn key_ordered_page(
    conn: &mut PgConnection,
    sql: &str,
    tenant: &TenantId,
    after: Option<&Object>,
    limit: usize,
    restriction: Option<(&str, &str)>,
) -> Result<Vec<sqlx::postgres::PgRow>> {
    let mut query = sqlx::query(sql).bind(tenant.as_str()).bind(after.map(|a| Value::Object(a.clone()))).bind(limit as i64);
    if let Some((column, value)) = restriction {
        query = query.bind(column).bind(value);
    }
    Ok(query.fetch_all(&mut *conn).await?)
}

/// The latest log images of these rows, by key text (the log may no longer hold some).
async fn latest_images(conn: &mut PgConnection, tenant: &TenantId, table: &str, keys: &[Value]) -> Result<HashMap<String, Object>> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let found: Vec<(Value, Value)> =
        sqlx::query_as(LATEST_IMAGES_SQL).bind(tenant.as_str()).bind(table).bind(keys).fetch_all(&mut *conn).await?;
    Ok(found.into_iter().map(|(key, image)| (key.to_string(), object(image))).collect())
}

/// A page of tombstones after `after` in key order: the delete's old row while the log holds
/// it, else the key.
async fn tombstones(
    conn: &mut PgConnection,
    tenant: &TenantId,
    table: &TableSchema,
    after: Option<&Object>,
    limit: usize,
    restriction: Option<(&str, &str)>,
) -> Result<Vec<StoredDocument>> {
    let rows = key_ordered_page(conn, &table.tombstones_sql(restriction.is_some()), tenant, after, limit, restriction).await?;
    let docs = rows
        .into_iter()
        .map(|r| {
            let key = object(r.get("key"));
            let row = r.get::<Option<Value>, _>("old_values").map(object).unwrap_or_else(|| key.clone());
            StoredDocument { seq: 0, key, row, deleted: true }
        })
        .collect();
    Ok(docs)
}

/// Remove the columns hidden from the reader; key columns stay (they name the document).
fn strip_hidden(table: &TableSchema, access: Option<&AccessView>, docs: &mut [StoredDocument]) {
    let Some(access) = access else { return };
    let hidden: Vec<&String> = access.hidden_columns(&table.name).iter().filter(|c| !table.key.contains(c)).collect();
    if hidden.is_empty() {
        return;
    }
    for doc in docs {
        for column in &hidden {
            doc.row.remove(column.as_str());
        }
    }
}

fn object(value: Value) -> Object {
    match value {
        Value::Object(map) => map,
        _ => Object::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_are_plain_json() {
        let cursor = SnapshotCursor {
            epoch: "e1".into(),
            since: 42,
            phase: SnapshotPhase::Tombstones,
            after: Some(serde_json::json!({"id": "a"}).as_object().unwrap().clone()),
        };
        let text = serde_json::to_value(&cursor).unwrap();
        assert_eq!(text, serde_json::json!({"epoch": "e1", "since": 42, "phase": "tombstones", "after": {"id": "a"}}));
        assert_eq!(serde_json::from_value::<SnapshotCursor>(text).unwrap(), cursor);
    }
}
