//! Postgres Changes as Supabase Realtime sends them: a channel's bindings (`{event, schema,
//! table, filter}` with the ids the join reply echoes), which committed changes each binding
//! takes, and the `postgres_changes` payload of a change (`{ids, data: {schema, table,
//! commit_timestamp, type, columns, record, old_record, errors}}`, plus the hub's `seq` and
//! `epoch`). Pure code: the session feeds it the tenant's deltas.

use std::borrow::Cow;
use std::sync::Arc;

use protocol::{Condition, Delta, Object, Op};
use serde_json::{json, Map, Value};

use super::filter::parse_filter;
use super::types::supabase_type_name;
use crate::ids::Seq;
use crate::rules::AccessView;
use crate::storage::catalog::{Catalog, TableSchema};

/// The schema a table without one in its name is shown in, as Postgres's default schema.
const DEFAULT_SCHEMA: &str = "public";

/// A hub table name (`products`, `app.orders`) as (schema, table).
pub fn schema_and_table(name: &str) -> (&str, &str) {
    match name.split_once('.') {
        Some((schema, table)) => (schema, table),
        None => (DEFAULT_SCHEMA, name),
    }
}

/// What a change is, in Supabase's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeType {
    Insert,
    Update,
    Delete,
}

impl ChangeType {
    pub fn of(delta: &Delta) -> ChangeType {
        match delta.op {
            Op::Delete => ChangeType::Delete,
            Op::Upsert if delta.old.as_ref().is_none_or(|old| old.is_empty()) => ChangeType::Insert,
            Op::Upsert => ChangeType::Update,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ChangeType::Insert => "INSERT",
            ChangeType::Update => "UPDATE",
            ChangeType::Delete => "DELETE",
        }
    }
}

/// Which change types a binding takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventFilter {
    All,
    Only(ChangeType),
}

impl EventFilter {
    fn parse(event: &str) -> Option<EventFilter> {
        match event.to_ascii_uppercase().as_str() {
            "*" => Some(EventFilter::All),
            "INSERT" => Some(EventFilter::Only(ChangeType::Insert)),
            "UPDATE" => Some(EventFilter::Only(ChangeType::Update)),
            "DELETE" => Some(EventFilter::Only(ChangeType::Delete)),
            _ => None,
        }
    }

    fn takes(self, change: ChangeType) -> bool {
        self == EventFilter::All || self == EventFilter::Only(change)
    }
}

/// A `postgres_changes` entry of a join, as the client sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct BindingRequest {
    pub event: String,
    pub schema: String,
    pub table: Option<String>,
    pub filter: Option<String>,
    /// Extension: every change after this seq first.
    pub since_seq: Option<Seq>,
    pub since_epoch: Option<String>,
    /// Extension: the matching rows first.
    pub snapshot: bool,
}

impl BindingRequest {
    /// Read one entry of `config.postgres_changes`.
    pub fn parse(value: &Value) -> Result<BindingRequest, String> {
        let text = |key: &str| -> Result<Option<String>, String> {
            match value.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s.is_empty() => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(format!("postgres_changes `{key}` must be a string")),
            }
        };
        let event = text("event")?.ok_or("postgres_changes needs an `event` (INSERT, UPDATE, DELETE or *)")?;
        let since_seq = match value.get("since_seq") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_u64().ok_or("`since_seq` must be a seq (a whole number, 0 or more)")?),
        };
        Ok(BindingRequest {
            event,
            schema: text("schema")?.unwrap_or_else(|| DEFAULT_SCHEMA.to_owned()),
            table: text("table")?,
            filter: text("filter")?,
            since_seq,
            since_epoch: text("since_epoch")?,
            snapshot: super::join::lenient_bool(value.get("snapshot")),
        })
    }

    /// The entry the join reply echoes: the client's own strings, in its order, with the id.
    pub fn echo(&self, id: u32) -> Value {
        let mut entry = Map::new();
        entry.insert("event".into(), Value::String(self.event.clone()));
        entry.insert("schema".into(), Value::String(self.schema.clone()));
        if let Some(table) = &self.table {
            entry.insert("table".into(), Value::String(table.clone()));
        }
        if let Some(filter) = &self.filter {
            entry.insert("filter".into(), Value::String(filter.clone()));
        }
        entry.insert("id".into(), json!(id));
        Value::Object(entry)
    }

    /// The binding's id: the same for the same event, schema, table and filter on every socket
    /// (FNV-1a), so that a rendering is shared by every channel with the same bindings.
    pub fn id(&self) -> u32 {
        let mut hash: u32 = 0x811c_9dc5;
        let parts = [self.event.as_str(), self.schema.as_str(), self.table.as_deref().unwrap_or(""), self.filter.as_deref().unwrap_or("")];
        for part in parts {
            for byte in part.bytes().chain([0xff]) {
                hash ^= byte as u32;
                hash = hash.wrapping_mul(0x0100_0193);
            }
        }
        // Positive in every JavaScript integer representation.
        hash & 0x7fff_ffff
    }
}

/// A binding resolved against the synced tables.
#[derive(Debug, Clone)]
pub struct Binding {
    pub id: u32,
    pub events: EventFilter,
    /// The synced tables it covers (hub names).
    pub tables: Vec<Arc<TableSchema>>,
    pub filter: Vec<Condition>,
    /// Last seq this binding was given (or skipped).
    pub after: Seq,
    /// Positioned in the stream: changes after `after` are its.
    pub ready: bool,
}

impl Binding {
    /// Resolve `request` against `catalog` for a reader with `view`; why not, in Supabase's
    /// `"Code: message"` form.
    pub fn resolve(request: &BindingRequest, catalog: &Catalog, view: Option<&AccessView>) -> Result<Binding, String> {
        let events = EventFilter::parse(&request.event)
            .ok_or_else(|| format!("InvalidFilter: event `{}` is not one of INSERT, UPDATE, DELETE, *", request.event))?;
        let wanted = |name: &str| {
            let (schema, table) = schema_and_table(name);
            (request.schema == "*" || request.schema == schema) && request.table.as_deref().is_none_or(|t| t == "*" || t == table)
        };
        let mut tables: Vec<Arc<TableSchema>> = catalog.names().filter(|n| wanted(n)).filter_map(|n| catalog.get(n).cloned()).collect();
        tables.sort_by(|a, b| a.name.cmp(&b.name));
        let named = request.table.as_deref().filter(|t| *t != "*");
        if let Some(table) = named {
            if tables.is_empty() {
                return Err(format!(
                    "RealtimeDisabledForConfiguration: {}.{table} is not a synced table of this hub",
                    request.schema
                ));
            }
        }
        // A role that may not read a table gets none of its changes.
        tables.retain(|t| view.is_none_or(|v| v.can_read(&t.name)));
        if named.is_some() && tables.is_empty() {
            return Err(format!("Unauthorized: this role may not read {}.{}", request.schema, named.unwrap_or_default()));
        }
        let filter = match &request.filter {
            None => Vec::new(),
            Some(filter) => {
                let [table] = tables.as_slice() else {
                    return Err("InvalidFilter: a filter needs one table (name `table`)".into());
                };
                let hidden = view.map_or(&[][..], |v| v.hidden_columns(&table.name));
                let conditions = parse_filter(filter, |column| if hidden.iter().any(|h| h == column) { None } else { table.column_type(column) })
                    .map_err(|why| format!("InvalidFilter: {why}"))?;
                for condition in &conditions {
                    protocol::filter::check(condition).map_err(|why| format!("InvalidFilter: {why}"))?;
                }
                conditions
            }
        };
        Ok(Binding { id: request.id(), events, tables, filter, after: 0, ready: false })
    }

    fn covers(&self, table: &str) -> bool {
        self.tables.iter().any(|t| t.name == table)
    }

    /// Whether this binding takes `delta` (as the reader sees it), with its change type.
    /// A change whose new row is outside the filter is not taken (as Supabase does: a row that
    /// leaves the filter is not announced); a delete is taken when the old row matched.
    pub fn takes(&self, delta: &Delta) -> bool {
        if !self.ready || delta.seq <= self.after || !self.covers(&delta.table) {
            return false;
        }
        let change = ChangeType::of(delta);
        if !self.events.takes(change) {
            return false;
        }
        if self.filter.is_empty() {
            return true;
        }
        match change {
            ChangeType::Delete => delta.old.as_ref().is_some_and(|old| protocol::filter::matches(&self.filter, old)),
            _ => delta.row.as_ref().is_some_and(|row| protocol::filter::matches(&self.filter, row)),
        }
    }
}

/// `delta` as a reader with `view` sees it (`None`: not at all).
pub fn visible<'d>(view: Option<&AccessView>, delta: &'d Delta) -> Option<Cow<'d, Delta>> {
    match view {
        Some(view) => view.visible_delta(delta),
        None => Some(Cow::Borrowed(delta)),
    }
}

/// Where a change came from, for the `data` of its message.
pub struct Stamp<'a> {
    pub epoch: &'a str,
    /// RFC 3339, UTC.
    pub commit_timestamp: &'a str,
}

/// The `postgres_changes` payload of `delta` for bindings `ids` (JSON text), written straight
/// from the delta's rows (nothing is cloned into a JSON tree: every change of a tenant is
/// rendered here once per set of bindings).
pub fn payload(delta: &Delta, table: &TableSchema, ids: &[u32], stamp: &Stamp<'_>) -> String {
    payload_with(delta, table, ids, stamp, false)
}

fn payload_with(delta: &Delta, table: &TableSchema, ids: &[u32], stamp: &Stamp<'_>, snapshot: bool) -> String {
    use std::fmt::Write;
    let change = ChangeType::of(delta);
    let (schema, name) = schema_and_table(&table.name);
    let text = |s: &str| Value::String(s.to_owned()).to_string();
    let mut out = String::with_capacity(256 + 64 * table.columns.len());
    // unwrap (all `write!`s): writing to a String cannot fail.
    write!(out, r#"{{"ids":{},"data":{{"schema":{},"table":{},"commit_timestamp":{},"type":"{}","columns":["#, json!(ids), text(schema), text(name), text(stamp.commit_timestamp), change.name()).expect("string");
    for (i, column) in table.columns.values().enumerate() {
        let comma = if i == 0 { "" } else { "," };
        write!(out, r#"{comma}{{"name":{},"type":{}}}"#, text(&column.name), text(&supabase_type_name(&column.sql_type))).expect("string");
    }
    out.push(']');
    let empty = Object::new();
    match change {
        ChangeType::Insert => {
            write!(out, r#","record":{}"#, object_text(delta.row.as_ref().unwrap_or(&empty))).expect("string");
        }
        ChangeType::Update => {
            let row = delta.row.as_ref().unwrap_or(&empty);
            write!(out, r#","record":{},"old_record":{}"#, object_text(row), previous_image_text(row, delta.old.as_ref().unwrap_or(&empty))).expect("string");
        }
        ChangeType::Delete => {
            write!(out, r#","old_record":{}"#, object_text(delta.old.as_ref().unwrap_or(&empty))).expect("string");
        }
    }
    let marker = if snapshot { r#","snapshot":true"# } else { "" };
    write!(out, r#","errors":null,"seq":{},"epoch":{}{marker}}}}}"#, delta.seq, text(stamp.epoch)).expect("string");
    out
}

fn object_text(object: &Object) -> String {
    // unwrap: a JSON object always serializes.
    serde_json::to_string(object).expect("JSON object")
}

/// The row before an update, `row` with `old`'s values laid over it, written without building it.
fn previous_image_text(row: &Object, old: &Object) -> String {
    let mut out = String::from("{");
    let mut first = true;
    let mut entry = |key: &String, value: &Value| {
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(&Value::String(key.clone()).to_string());
        out.push(':');
        out.push_str(&value.to_string());
    };
    for (key, value) in row {
        entry(key, old.get(key).unwrap_or(value));
    }
    for (key, value) in old.iter().filter(|(k, _)| !row.contains_key(*k)) {
        entry(key, value);
    }
    out.push('}');
    out
}

/// A snapshot row as an `INSERT` message marked `snapshot: true`, at the snapshot's seq.
pub fn snapshot_payload(row: &Object, table: &TableSchema, id: u32, seq: Seq, stamp: &Stamp<'_>) -> String {
    let delta = Delta { seq, table: table.name.clone(), op: Op::Upsert, key: Object::new(), row: Some(row.clone()), old: None, origin: None, change_id: None, left: false };
    payload_with(&delta, table, &[id], stamp, true)
}

/// Unix milliseconds as RFC 3339 UTC with milliseconds (`2026-12-06T21:54:03.123Z`).
pub fn rfc3339_ms(unix_ms: u64) -> String {
    let secs = (unix_ms / 1000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem % 3600 / 60, rem % 60, unix_ms % 1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::FilterOp;

    fn obj(v: Value) -> Object {
        v.as_object().unwrap().clone()
    }

    fn delta(op: Op, row: Option<Value>, old: Option<Value>) -> Delta {
        Delta { seq: 9, table: "orders".into(), op, key: obj(json!({"id": 1})), row: row.map(obj), old: old.map(obj), origin: None, change_id: None, left: false }
    }

    fn binding(events: EventFilter, filter: Vec<Condition>) -> Binding {
        let columns = [("id", "integer"), ("status", "text"), ("tenant_id", "text")]
            .into_iter()
            .map(|(n, t)| (n.to_owned(), crate::storage::catalog::Column { name: n.into(), sql_type: t.into() }))
            .collect();
        let table = Arc::new(TableSchema::assemble(
            "orders".into(),
            "tenant_id".into(),
            "text".into(),
            vec!["id".into()],
            columns,
            crate::config::MergePolicy::Lww,
            "to_jsonb",
        ));
        Binding { id: 1, events, tables: vec![table], filter, after: 0, ready: true }
    }

    #[test]
    fn change_types_follow_the_delta() {
        assert_eq!(ChangeType::of(&delta(Op::Upsert, Some(json!({"id": 1})), None)), ChangeType::Insert);
        assert_eq!(ChangeType::of(&delta(Op::Upsert, Some(json!({"id": 1})), Some(json!({})))), ChangeType::Insert);
        assert_eq!(ChangeType::of(&delta(Op::Upsert, Some(json!({"id": 1})), Some(json!({"status": "a"})))), ChangeType::Update);
        assert_eq!(ChangeType::of(&delta(Op::Delete, None, Some(json!({"id": 1})))), ChangeType::Delete);
    }

    #[test]
    fn filters_see_the_new_row_and_deletes_the_old_one() {
        let open = vec![Condition { column: "status".into(), op: FilterOp::Eq, value: json!("open") }];
        let b = binding(EventFilter::All, open);
        assert!(b.takes(&delta(Op::Upsert, Some(json!({"id": 1, "status": "open"})), None)));
        assert!(!b.takes(&delta(Op::Upsert, Some(json!({"id": 1, "status": "done"})), Some(json!({"status": "open"})))), "left the filter: not announced");
        assert!(b.takes(&delta(Op::Upsert, Some(json!({"id": 1, "status": "open"})), Some(json!({"status": "new"})))), "entered it");
        assert!(b.takes(&delta(Op::Delete, None, Some(json!({"id": 1, "status": "open"})))));
        assert!(!b.takes(&delta(Op::Delete, None, Some(json!({"id": 1, "status": "done"})))));
        let inserts = binding(EventFilter::Only(ChangeType::Insert), Vec::new());
        assert!(!inserts.takes(&delta(Op::Delete, None, Some(json!({"id": 1})))));
        let mut behind = binding(EventFilter::All, Vec::new());
        behind.after = 9;
        assert!(!behind.takes(&delta(Op::Delete, None, Some(json!({"id": 1})))), "seq 9 was given");
    }

    #[test]
    fn payload_shape() {
        let b = binding(EventFilter::All, Vec::new());
        let d = delta(Op::Upsert, Some(json!({"id": 1, "status": "done", "tenant_id": "t"})), Some(json!({"status": "open"})));
        let stamp = Stamp { epoch: "e1", commit_timestamp: "2026-12-06T21:54:03.123Z" };
        let p: Value = serde_json::from_str(&payload(&d, &b.tables[0], &[1, 7], &stamp)).unwrap();
        assert_eq!(p["ids"], json!([1, 7]));
        assert_eq!(p["data"]["type"], "UPDATE");
        assert_eq!(p["data"]["schema"], "public");
        assert_eq!(p["data"]["record"]["status"], "done");
        assert_eq!(p["data"]["old_record"], json!({"id": 1, "status": "open", "tenant_id": "t"}));
        assert_eq!(p["data"]["errors"], Value::Null);
        assert_eq!(p["data"]["seq"], 9);
        assert!(p["data"]["columns"].as_array().unwrap().contains(&json!({"name": "id", "type": "int4"})));
        assert_eq!(p["data"]["epoch"], "e1");
        let written: Value = serde_json::from_str(&previous_image_text(d.row.as_ref().unwrap(), d.old.as_ref().unwrap())).unwrap();
        assert_eq!(written, Value::Object(crate::sync::views::previous_image(&d).unwrap()), "as the subscriptions' view builds it");
        let deleted = delta(Op::Delete, None, Some(json!({"id": 1, "status": "open"})));
        let p: Value = serde_json::from_str(&payload(&deleted, &b.tables[0], &[1], &stamp)).unwrap();
        assert_eq!((p["data"]["type"].as_str(), p["data"].get("record")), (Some("DELETE"), None));
        assert_eq!(p["data"]["old_record"]["status"], "open");
        let snap: Value = serde_json::from_str(&snapshot_payload(&obj(json!({"id": 3})), &b.tables[0], 1, 12, &stamp)).unwrap();
        assert_eq!((snap["data"]["type"].as_str(), &snap["data"]["snapshot"], &snap["data"]["seq"]), (Some("INSERT"), &json!(true), &json!(12)));
    }

    #[test]
    fn echoed_bindings_keep_the_clients_strings_and_ids_are_stable() {
        let r = BindingRequest::parse(&json!({"event": "*", "schema": "public", "table": "orders", "filter": "id=eq.1", "since_seq": 4})).unwrap();
        assert_eq!(r.since_seq, Some(4));
        let echo = r.echo(r.id());
        assert_eq!(echo["filter"], "id=eq.1");
        assert_eq!(echo["id"], json!(r.id()));
        let again = BindingRequest::parse(&json!({"event": "*", "schema": "public", "table": "orders", "filter": "id=eq.1"})).unwrap();
        assert_eq!(r.id(), again.id(), "the extension keys do not change the id");
        let other = BindingRequest::parse(&json!({"event": "*", "schema": "public", "table": "orders", "filter": "id=eq.2"})).unwrap();
        assert_ne!(r.id(), other.id());
        assert!(BindingRequest::parse(&json!({"event": "*", "since_seq": -1})).is_err());
        let no_table = BindingRequest::parse(&json!({"event": "INSERT", "schema": "public"})).unwrap();
        assert!(no_table.echo(1).get("table").is_none(), "absent stays absent");
    }

    #[test]
    fn timestamps_render_as_rfc3339() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_796_594_043_123), "2026-12-06T21:54:03.123Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
