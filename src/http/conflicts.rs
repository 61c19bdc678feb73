//! Conflict review for managers: list the tenant's conflicts with filters and keyset paging,
//! count them by status, read one with its row as it is now, and resolve one by writing a
//! value as an ordinary change of the field (device `console:<user>`), which syncs to every
//! device, is logged, and marks the conflict resolved in the same transaction.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use actix_web::{web, HttpResponse};
use protocol::{Change, ChangeStatus, ConflictEvent, ConflictRecord, ErrorCode, Hlc, Object, Op, ReviewStatus};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::auth::Manager;
use super::conflicts_csv;
use super::error::ApiError;
use super::{check_accepting, submit};
use crate::cluster::Body;
use crate::actors::messages::{ConflictNews, TellConflicts};
use crate::actors::sweep::unix_ms;
use crate::error::Error;
use crate::ids::{DeviceId, CONSOLE_DEVICE_PREFIX};
use crate::server::Hub;
use crate::storage::apply::BatchInput;
use crate::storage::conflicts::{ConflictFilter, ResolveConflict, Resolution, Timestamp};
use crate::sync::conditional::WriteCondition;

/// Longest table, device, user or field name, or label text, accepted as a filter, characters.
const MAX_FILTER_NAME_CHARS: usize = 200;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
    table: Option<String>,
    device: Option<String>,
    user: Option<String>,
    field: Option<String>,
    label: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<u32>,
    before_id: Option<i64>,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidFilter, message)
}

impl ListQuery {
    fn filter(self, hub: &Hub) -> Result<ConflictFilter, ApiError> {
        let status = match self.status.as_deref() {
            None => None,
            Some("open") => Some(ReviewStatus::Open),
            Some("resolved") => Some(ReviewStatus::Resolved),
            Some("dismissed") => Some(ReviewStatus::Dismissed),
            Some(other) => return Err(invalid(format!("status `{other}`: expected open, resolved or dismissed"))),
        };
        // Text goes to Postgres as a parameter: it must hold no NUL, which `text` cannot store.
        let names = [("table", &self.table), ("device", &self.device), ("user", &self.user), ("field", &self.field), ("label", &self.label)];
        for (name, value) in names {
            if value.as_ref().is_some_and(|v| v.is_empty() || v.chars().count() > MAX_FILTER_NAME_CHARS || v.contains('\0')) {
                return Err(invalid(format!("{name} must be 1 to {MAX_FILTER_NAME_CHARS} characters, none of them NUL")));
            }
        }
        let date = |name: &str, value: Option<&str>| match value {
            None => Ok(None),
            Some(text) => Timestamp::parse_rfc3339(text).map(Some).ok_or_else(|| {
                invalid(format!("{name} must be an RFC 3339 date-time in the years 0001 to 9999, such as 2024-11-30T10:00:00Z"))
            }),
        };
        let since = date("since", self.since.as_deref())?;
        let until = date("until", self.until.as_deref())?;
        if self.limit == Some(0) {
            return Err(invalid(format!("limit must be 1 to {} (conflict_page_max; a larger one is lowered to it)", hub.config.conflict_page_max)));
        }
        let limit = self.limit.unwrap_or(hub.config.conflict_page_default).min(hub.config.conflict_page_max);
        Ok(ConflictFilter {
            status,
            table: self.table,
            device: self.device,
            user: self.user,
            field: self.field,
            label: self.label,
            since,
            until,
            before_id: self.before_id,
            limit,
        })
    }
}

/// `GET /v1/conflicts`: newest first.
pub async fn list(hub: web::Data<Arc<Hub>>, manager: Manager, query: web::Query<ListQuery>) -> Result<HttpResponse, ApiError> {
    let filter = query.into_inner().filter(&hub)?;
    let (conflicts, next) = hub.store.list_conflicts(&manager.0.tenant, &filter).await?;
    Ok(HttpResponse::Ok().json(json!({"conflicts": conflicts, "next_before_id": next})))
}

/// `GET /v1/conflicts/export.csv`: every conflict the filters match, newest first, as CSV
/// (`conflicts_csv`), read a page of `conflict_page_max` at a time; more than
/// `conflict_export_max_rows` is refused `invalid_filter`, naming the limit.
pub async fn export_csv(hub: web::Data<Arc<Hub>>, manager: Manager, query: web::Query<ListQuery>) -> Result<HttpResponse, ApiError> {
    let query = query.into_inner();
    if query.limit.is_some() || query.before_id.is_some() {
        return Err(invalid("an export takes every conflict the filters match: no limit or before_id"));
    }
    let mut filter = query.filter(&hub)?;
    filter.limit = hub.config.conflict_page_max;
    let max = hub.config.conflict_export_max_rows as usize;
    let mut body = conflicts_csv::header();
    let mut rows = 0;
    loop {
        let (page, next) = hub.store.list_conflicts(&manager.0.tenant, &filter).await?;
        rows += page.len();
        if rows > max {
            return Err(invalid(format!(
                "more than {max} conflicts match (conflict_export_max_rows); narrow the filters, e.g. with since and until"
            )));
        }
        for conflict in &page {
            body.push_str(&conflicts_csv::line(conflict));
        }
        match next {
            Some(before) => filter.before_id = Some(before),
            None => break,
        }
    }
    Ok(HttpResponse::Ok()
        .content_type("text/csv; charset=utf-8")
        .insert_header(("Content-Disposition", "attachment; filename=\"conflicts.csv\""))
        .body(body))
}

/// `GET /v1/conflicts/counts`
pub async fn counts(hub: web::Data<Arc<Hub>>, manager: Manager) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(hub.store.conflict_counts(&manager.0.tenant).await?))
}

/// The tenant's conflict, or 404 (also for another tenant's).
async fn find(hub: &Hub, manager: &Manager, id: i64) -> Result<ConflictRecord, ApiError> {
    hub.store
        .conflict(&manager.0.tenant, id)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no conflict {id}")))
}

/// `GET /v1/conflicts/{id}`: the conflict, and its row as it is now with its version.
pub async fn get(hub: web::Data<Arc<Hub>>, manager: Manager, id: web::Path<i64>) -> Result<HttpResponse, ApiError> {
    let conflict = find(&hub, &manager, id.into_inner()).await?;
    let (row, version) = hub.store.current_row(&manager.0.tenant, &conflict.table, &conflict.key).await?;
    Ok(HttpResponse::Ok().json(json!({"conflict": conflict, "current": {"row": row, "version": version}})))
}

/// A resolution. `expected` is the field's value the reviewer saw (null included); without it,
/// the value the field held right after the conflict (the winner's). The resolution is written
/// only if the field still holds it, else it is refused `stale_conflict`.
#[derive(Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum ResolveBody {
    Keep {
        #[serde(default, deserialize_with = "present")]
        expected: Option<Value>,
    },
    TakeOther {
        #[serde(default, deserialize_with = "present")]
        expected: Option<Value>,
    },
    Value {
        value: Value,
        #[serde(default, deserialize_with = "present")]
        expected: Option<Value>,
    },
    /// Close the conflict without writing anything.
    Dismiss,
}

/// A field that is present, null included (absent is `None`, by `default`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

impl ResolveBody {
    fn expected(&self) -> Option<&Value> {
        match self {
            ResolveBody::Keep { expected } | ResolveBody::TakeOther { expected } | ResolveBody::Value { expected, .. } => expected.as_ref(),
            ResolveBody::Dismiss => None,
        }
    }
}

/// The condition a resolution is written under: the field still holds `expected` (or the
/// winner's value). A "keep" whose value is already there then writes nothing.
fn resolution_condition(conflict: &ConflictRecord, body: &ResolveBody) -> WriteCondition {
    let winner = if conflict.winner == "server" { &conflict.server } else { &conflict.incoming };
    let expected = body.expected().unwrap_or(&winner.value).clone();
    WriteCondition {
        assumed: Some(Object::from_iter([(conflict.field.clone(), expected)])),
        assumed_deleted: false,
        compared: Arc::from(vec![conflict.field.clone()]),
        merge: false,
        refuse: Some(ErrorCode::StaleConflict),
    }
}

/// The change that writes a resolution, at the row's current version so that it does not
/// conflict. Where a delete won, a keep is a delete of the missing row (nothing written) and
/// the other value, or a new one, restores the row: `deleted_values` (what it held when it was
/// deleted) with the field set.
fn resolution_change(
    conflict: &ConflictRecord,
    body: &ResolveBody,
    version: u64,
    row_exists: bool,
    deleted_values: Option<Object>,
) -> Result<Change, ApiError> {
    let winner_is_server = conflict.winner == "server";
    let (winner, loser) = if winner_is_server { (&conflict.server, &conflict.incoming) } else { (&conflict.incoming, &conflict.server) };
    let by_delete = conflict.policy == "delete_wins";
    let change = |op: Op, fields: Object| Change {
        change_id: Uuid::now_v7(),
        device_seq: 1, // the hub assigns the console device's seqs
        table: conflict.table.clone(),
        op,
        key: conflict.key.clone(),
        fields,
        hlc: Hlc { wall_ms: unix_ms(), counter: 0 },
        base_version: version,
    };
    let value = match body {
        // A delete won: keeping it writes nothing more (a delete of the missing row, logged as
        // the resolution without a seq).
        ResolveBody::Keep { .. } if by_delete => {
            if row_exists {
                return Err(ApiError::new(
                    ErrorCode::ConflictNotOpen,
                    "the row was re-created since the delete won; resolve with take_other or value",
                ));
            }
            return Ok(change(Op::Delete, Object::new()));
        }
        ResolveBody::Keep { .. } => winner.value.clone(),
        ResolveBody::TakeOther { .. } => loser.value.clone(),
        ResolveBody::Value { value, .. } => value.clone(),
        // Handled by `dismiss`, before any write is made.
        ResolveBody::Dismiss => return Err(ApiError(Error::Internal("a dismissal writes nothing".into()))),
    };
    if by_delete {
        if row_exists {
            return Err(ApiError::new(
                ErrorCode::StaleConflict,
                "the row was re-created since the delete won; nothing was written: look at it and resolve again",
            ));
        }
        let Some(mut fields) = deleted_values else {
            return Err(ApiError::new(ErrorCode::RowDeleted, "the row's values from before its delete are no longer kept; it cannot be restored"));
        };
        fields.insert(conflict.field.clone(), value);
        return Ok(change(Op::Upsert, fields));
    }
    Ok(change(Op::Upsert, Object::from_iter([(conflict.field.clone(), value)])))
}

/// The condition a restore is written under: the row is still deleted (re-created meanwhile,
/// it is refused `stale_conflict`).
fn restore_condition() -> WriteCondition {
    WriteCondition {
        assumed: Some(Object::new()),
        assumed_deleted: true,
        compared: Arc::from(Vec::<String>::new()),
        merge: false,
        refuse: Some(ErrorCode::StaleConflict),
    }
}

/// `{"action": "dismiss"}`: the conflict is closed as `dismissed` with nothing written, and the
/// sessions watching conflicts are told (a `resolved` event whose record says `dismissed`).
async fn dismiss(hub: &Hub, manager: &Manager, id: i64) -> Result<Value, ApiError> {
    let identity = &manager.0;
    let Some((conflict, open)) = hub.store.dismiss_conflict(&identity.tenant, id, identity.user.as_str()).await? else {
        return Err(ApiError::new(ErrorCode::ConflictNotOpen, format!("conflict {id} is not open")));
    };
    let events = vec![(ConflictEvent::Resolved, conflict.clone())];
    // Best effort, as every conflict event: the review API lists them all.
    match hub.registry.running(&identity.tenant) {
        Some(actor) => {
            let _ = actor.try_send(TellConflicts(ConflictNews { events, open }));
        }
        None => hub.registry.publish_elsewhere(&identity.tenant, Body::Conflicts { events, open }),
    }
    hub.metrics.conflict_resolutions.fetch_add(1, Ordering::Relaxed);
    Ok(json!({ "conflict": conflict }))
}

/// `POST /v1/conflicts/{id}/resolve`
pub async fn resolve(
    hub: web::Data<Arc<Hub>>,
    manager: Manager,
    id: web::Path<i64>,
    body: web::Json<ResolveBody>,
) -> Result<HttpResponse, ApiError> {
    check_accepting(&hub)?;
    Ok(HttpResponse::Ok().json(resolve_one(&hub, &manager, id.into_inner(), body.into_inner()).await?))
}

/// Resolve (or dismiss) one open conflict of the manager's tenant; its answer's body.
async fn resolve_one(hub: &Hub, manager: &Manager, id: i64, body: ResolveBody) -> Result<Value, ApiError> {
    let identity = &manager.0;
    let conflict = find(hub, manager, id).await?;
    if conflict.status != ReviewStatus::Open {
        return Err(ApiError::new(ErrorCode::ConflictNotOpen, format!("conflict {id} is not open")));
    }
    if matches!(body, ResolveBody::Dismiss) {
        return dismiss(hub, manager, id).await;
    }
    let (row, version) = hub.store.current_row(&identity.tenant, &conflict.table, &conflict.key).await?;
    let resolution = match body {
        ResolveBody::Keep { .. } => Resolution::Keep,
        ResolveBody::TakeOther { .. } => Resolution::TakeOther,
        // (`Dismiss` returned above.)
        ResolveBody::Value { .. } | ResolveBody::Dismiss => Resolution::Value,
    };
    let restores = conflict.policy == "delete_wins" && !matches!(body, ResolveBody::Keep { .. });
    let deleted_values = if restores && row.is_none() {
        let schema = hub.store.catalog_with(&conflict.table).await.get(&conflict.table).cloned();
        // The values to restore: what the table still has columns for, the tenant's own.
        hub.store.deleted_values(&identity.tenant, &conflict.table, &conflict.key).await?.map(|values| {
            values
                .into_iter()
                .filter(|(column, _)| schema.as_ref().is_some_and(|s| s.columns.contains_key(column) && *column != s.tenant_column))
                .collect()
        })
    } else {
        None
    };
    let change = resolution_change(&conflict, &body, version, row.is_some(), deleted_values)?;
    // Conditional on what the reviewer saw: the field's value while the row is there, the row
    // still deleted for a restore (a deleted row is otherwise answered `row_deleted` by the merge).
    let conditions = match (restores, row.is_some(), change.op) {
        (true, false, Op::Upsert) => vec![Some(restore_condition())],
        (false, true, Op::Upsert) => vec![Some(resolution_condition(&conflict, &body))],
        _ => Vec::new(),
    };
    let input = BatchInput {
        device: DeviceId::new(format!("{CONSOLE_DEVICE_PREFIX}{}", identity.user)),
        user: identity.user.clone(),
        batch_id: Uuid::now_v7(),
        changes: vec![change],
        assign_device_seqs: true,
        resolves: Some(ResolveConflict { conflict_id: id, resolution, field: conflict.field.clone() }),
        // Managers only (`manager_roles`): a review is not bound by device rules.
        access: None,
        conditions,
    };
    let result = submit(hub, &identity.tenant, input)
        .await?
        .pop()
        .ok_or_else(|| ApiError(Error::Internal("a resolution got no result".into())))?;
    if result.status == ChangeStatus::Rejected {
        let code = result.reason.unwrap_or(ErrorCode::Internal);
        let message = match code {
            ErrorCode::RowDeleted => "the row has been deleted; a resolution cannot re-create it".to_string(),
            ErrorCode::StaleConflict => format!(
                "`{}` changed since the conflict (or since the value given in `expected`); nothing was written: look at its current value and resolve again",
                conflict.field
            ),
            _ => result.message.clone().unwrap_or_else(|| "the resolution was refused".into()),
        };
        return Err(ApiError::new(code, message));
    }
    hub.metrics.conflict_resolutions.fetch_add(1, Ordering::Relaxed);
    let conflict = find(hub, manager, id).await?;
    Ok(json!({"conflict": conflict, "result": result}))
}

/// A review of many conflicts at once: `ids`, or every conflict a `filter` matches (the list's
/// filters), resolved the same way. No `value`: each is written under the condition a single
/// resolution without `expected` has (the field still holds what the conflict left).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkBody {
    action: String,
    ids: Option<Vec<i64>>,
    filter: Option<ListQuery>,
}

/// `POST /v1/conflicts/resolve`: each conflict resolved in its own transaction, in the order
/// given (or newest first), and a summary of what was applied and what was refused.
pub async fn resolve_many(hub: web::Data<Arc<Hub>>, manager: Manager, body: web::Json<BulkBody>) -> Result<HttpResponse, ApiError> {
    check_accepting(&hub)?;
    let body = body.into_inner();
    let action = || -> Result<ResolveBody, ApiError> {
        match body.action.as_str() {
            "keep" => Ok(ResolveBody::Keep { expected: None }),
            "take_other" => Ok(ResolveBody::TakeOther { expected: None }),
            "dismiss" => Ok(ResolveBody::Dismiss),
            other => Err(ApiError::new(ErrorCode::InvalidBatch, format!("action `{other}`: expected keep, take_other or dismiss"))),
        }
    };
    action()?;
    let max = hub.config.conflict_bulk_max as usize;
    let ids = match (body.ids, body.filter) {
        (Some(ids), None) if ids.len() <= max => ids,
        (Some(ids), None) => {
            return Err(ApiError::new(ErrorCode::InvalidBatch, format!("{} ids: at most {max} at once (conflict_bulk_max)", ids.len())))
        }
        (None, Some(query)) => matching_ids(&hub, &manager, query, max).await?,
        _ => return Err(ApiError::new(ErrorCode::InvalidBatch, "give either `ids` or `filter`")),
    };
    let mut results = Vec::with_capacity(ids.len());
    let (mut applied, mut refused) = (0, 0);
    for id in ids {
        match resolve_one(&hub, &manager, id, action()?).await {
            Ok(done) => {
                applied += 1;
                results.push(json!({"id": id, "applied": true, "conflict": done["conflict"]}));
            }
            // The hub going away stops the review; the rest is told as not done.
            Err(ApiError(Error::ShuttingDown)) => return Err(ApiError(Error::ShuttingDown)),
            Err(err) => {
                refused += 1;
                let (code, message) = err.code_and_message();
                results.push(json!({"id": id, "applied": false, "code": code, "message": message}));
            }
        }
    }
    Ok(HttpResponse::Ok().json(json!({"applied": applied, "refused": refused, "results": results})))
}

/// The ids of the conflicts `query` matches, newest first, at most `max` (more is refused).
async fn matching_ids(hub: &Hub, manager: &Manager, query: ListQuery, max: usize) -> Result<Vec<i64>, ApiError> {
    if query.limit.is_some() || query.before_id.is_some() {
        return Err(invalid("a filter for many conflicts takes no limit or before_id"));
    }
    let mut filter = query.filter(hub)?;
    filter.limit = hub.config.conflict_page_max;
    let mut ids = Vec::new();
    loop {
        let (page, next) = hub.store.list_conflicts(&manager.0.tenant, &filter).await?;
        ids.extend(page.iter().map(|c| c.id));
        if ids.len() > max {
            return Err(ApiError::new(
                ErrorCode::InvalidBatch,
                format!("more than {max} conflicts match (conflict_bulk_max); narrow the filter"),
            ));
        }
        match next {
            Some(before) => filter.before_id = Some(before),
            None => return Ok(ids),
        }
    }
}
