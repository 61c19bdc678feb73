//! What must hold for any text an RxDB client sends to `/rxdb/v1` (`--features hub`), as the
//! session reads it (src/transport/rxdb/wire.rs, then collection.rs and push.rs for
//! `masterWrite` rows, pull.rs for the checkpoint of `masterChangesSince`): no panic; a frame
//! is refused as `NotAnObject` exactly when it is not a JSON object and as `NoId` exactly when
//! its id is absent or null; a request re-encodes as RxDB writes it and reads back the same,
//! and its reply carries its id and collection as sent; a hub checkpoint reads back as written
//! and plans the pull it says; a `masterWrite` row is either refused for the reason it breaks
//! or becomes a change whose row gives back the document.

// Each includer uses a part: the fuzz targets leave out the seeds.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use protocol::{Object, Op};
use serde_json::{json, Value};
use synchub::config::{Config, MergePolicy, RxdbCollectionConfig, RxdbConflicts, RxdbNulls};
use synchub::storage::catalog::{Catalog, Column, TableSchema};
use synchub::transport::rxdb::collection::{Collection, DocumentProblem, DELETED};
use synchub::transport::rxdb::pull::PullPlan;
use synchub::transport::rxdb::push;
use synchub::transport::rxdb::wire::{self, Checkpoint, FrameProblem, Method, Request, WriteRow};

/// The epoch the pull plans are made in (a checkpoint of another epoch starts a snapshot).
const EPOCH: &str = "e1";

/// The tests' `items` table (tests/rxdb_replication.rs) as two collections: `items` as the
/// tests configure it (nulls kept, conflicts reported) and `merged` (the same table merged by
/// the hub, nulls left out).
fn collections() -> &'static [Collection; 2] {
    static COLLECTIONS: OnceLock<[Collection; 2]> = OnceLock::new();
    COLLECTIONS.get_or_init(|| {
        let columns: BTreeMap<String, Column> = [
            ("tenant_id", "text"),
            ("id", "text"),
            ("price", "numeric(10,2)"),
            ("at", "timestamp with time zone"),
            ("done", "boolean"),
            ("note", "text"),
            ("meta", "jsonb"),
            ("qty", "integer"),
        ]
        .into_iter()
        .map(|(name, ty)| (name.to_owned(), Column { name: name.to_owned(), sql_type: ty.to_owned() }))
        .collect();
        let table = TableSchema::assemble("items".into(), "tenant_id".into(), "text".into(), vec!["id".into()], columns, MergePolicy::Lww, "to_jsonb");
        let catalog = Catalog::of(vec![table]);
        let mut config = Config::default();
        config.rxdb_collections = vec![
            RxdbCollectionConfig { name: "items".into(), table: None, fields: None, conflicts: RxdbConflicts::Report, nulls: RxdbNulls::Keep },
            RxdbCollectionConfig { name: "merged".into(), table: Some("items".into()), fields: None, conflicts: RxdbConflicts::ServerMerge, nulls: Default::default() },
        ];
        let resolve = |name: &str| Collection::resolve(name, &config, &catalog).expect("the items collections resolve");
        [resolve("items"), resolve("merged")]
    })
}

/// Body of the `rxdb` target: the bytes are one text frame.
pub fn rxdb(bytes: &[u8]) {
    // The session takes text frames only (binary ones close the socket).
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    let value = serde_json::from_str::<Value>(text).ok();
    let request = match wire::parse_request(text) {
        Ok(request) => request,
        Err(problem) => {
            match &value {
                Some(Value::Object(object)) => {
                    assert_eq!(problem, FrameProblem::NoId, "{text:?}");
                    assert!(object.get("id").is_none_or(Value::is_null), "an id was there: {text:?}");
                }
                _ => assert_eq!(problem, FrameProblem::NotAnObject, "{text:?}"),
            }
            return;
        }
    };
    let Some(Value::Object(object)) = &value else { panic!("a request read from something not a JSON object: {text:?}") };
    // What was sent is what the request holds.
    assert_eq!(Some(&request.id), object.get("id"), "the id as sent: {text:?}");
    assert!(!request.id.is_null());
    assert_eq!(request.collection, object.get("collection").and_then(Value::as_str).unwrap_or(""), "{text:?}");
    let method = object.get("method").and_then(Value::as_str).unwrap_or("");
    match &request.method {
        Method::Unusable { method: name, why } => {
            assert_eq!(name, method, "{text:?}");
            assert!(!why.is_empty());
        }
        known => assert_eq!(known.name(), method, "{text:?}"),
    }
    // The answer (a `null` result for what is unusable) names the request as sent.
    let reply: Value = serde_json::from_str(&wire::reply(&request.id, &request.collection, &Value::Null)).expect("a reply is JSON");
    assert_eq!(reply, json!({"id": request.id, "collection": request.collection, "result": null}));
    // Re-encoded as RxDB writes requests, it reads back the same.
    if let Some(again) = encode(&request) {
        assert_eq!(wire::parse_request(&again).as_ref(), Ok(&request), "{text:?} re-encoded as {again}");
    }
    match &request.method {
        Method::Auth(headers) => check_token(headers),
        Method::ChangesSince { checkpoint, .. } => check_checkpoint(checkpoint.as_ref()),
        Method::Write(rows) => {
            for collection in collections() {
                check_rows(collection, rows);
            }
        }
        Method::ChangeStream | Method::Unusable { .. } => {}
    }
}

/// A request as RxDB's client writes it; `None` for one the hub cannot use.
fn encode(request: &Request) -> Option<String> {
    let params = match &request.method {
        Method::Auth(headers) => json!([headers]),
        Method::ChangeStream => json!([]),
        Method::ChangesSince { checkpoint, batch_size } => json!([checkpoint, batch_size]),
        Method::Write(rows) => {
            let rows: Vec<Value> = rows
                .iter()
                .map(|row| {
                    let mut out = json!({"newDocumentState": row.new_document_state});
                    if let Some(assumed) = &row.assumed_master_state {
                        out["assumedMasterState"] = Value::Object(assumed.clone());
                    }
                    out
                })
                .collect();
            json!([rows])
        }
        Method::Unusable { .. } => return None,
    };
    Some(json!({"id": request.id, "collection": request.collection, "method": request.method.name(), "params": params}).to_string())
}

/// The token of `auth` headers is a non-empty one the headers hold.
fn check_token(headers: &Object) {
    let Some(token) = wire::token_from_headers(headers) else { return };
    assert!(!token.is_empty());
    let in_bearer = headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("authorization") && v.as_str().is_some_and(|v| v.contains(token)));
    assert!(in_bearer || headers.get("token").and_then(Value::as_str) == Some(token), "token {token:?} from {headers:?}");
}

/// A checkpoint of the hub's reads back as written, and plans the pull it stands for.
fn check_checkpoint(checkpoint: Option<&Value>) {
    let plan = PullPlan::for_checkpoint(checkpoint, EPOCH);
    let Some(read) = checkpoint.and_then(Checkpoint::read) else {
        assert_eq!(plan, PullPlan::Snapshot { head: None, cursor: None }, "an unknown checkpoint starts over: {checkpoint:?}");
        return;
    };
    let written = serde_json::to_value(&read).expect("a checkpoint encodes");
    assert_eq!(Checkpoint::read(&written).as_ref(), Some(&read), "checkpoint {written}");
    assert_eq!(PullPlan::for_checkpoint(Some(&written), EPOCH), plan, "the same plan from {written}");
    match (&plan, read.epoch == EPOCH, &read.snapshot) {
        (PullPlan::Snapshot { head: None, cursor: None }, false, _) => {}
        (PullPlan::Log { after }, true, None) => assert_eq!(*after, read.seq),
        (PullPlan::Snapshot { head, cursor: Some(cursor) }, true, Some(snapshot)) => {
            assert_eq!(*head, Some(read.seq));
            let written = serde_json::to_value(cursor).expect("a cursor encodes");
            assert_eq!(serde_json::from_value(written).ok().as_ref(), Some(cursor), "the cursor of {snapshot} reads back");
        }
        (PullPlan::Snapshot { head: None, cursor: None }, true, Some(_)) => {} // not a cursor
        _ => panic!("plan {plan:?} for {read:?}"),
    }
}

/// Each row is refused for what it breaks, or written so that its row gives back the document.
fn check_rows(collection: &Collection, rows: &[WriteRow]) {
    let merged = collection.conflicts == RxdbConflicts::ServerMerge;
    let mut expected = Vec::new();
    let mut refused = Vec::new();
    for (index, row) in rows.iter().enumerate() {
        let doc = &row.new_document_state;
        let since = if merged { row.assumed_master_state.as_ref() } else { None };
        let unknown = doc.keys().find(|k| !k.starts_with('_') && !collection.fields.contains(k));
        let no_key = collection.table.key.iter().find(|k| doc.get(*k).is_none_or(Value::is_null));
        let deleted = match doc.get(DELETED) {
            None | Some(Value::Null) => Some(false),
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => None,
        };
        let write = collection.write_of(doc, since);
        let context = format!("{} row {doc:?}", collection.name);
        match (&write, unknown, no_key, deleted) {
            (Err(DocumentProblem::UnknownField(field)), Some(_), _, _) => {
                assert!(!field.starts_with('_') && !collection.fields.contains(field), "{context}")
            }
            (Err(DocumentProblem::NoKey(key)), None, Some(_), _) => assert!(doc.get(key).is_none_or(Value::is_null), "{context}"),
            (Err(DocumentProblem::DeletedNotBoolean), None, None, None) => {}
            (Ok(write), None, None, Some(deleted)) => {
                let key: Object = collection.table.key.iter().map(|k| (k.clone(), doc[k].clone())).collect();
                assert_eq!(write.key, key, "{context}");
                if deleted {
                    assert_eq!((write.op, write.fields.is_empty()), (Op::Delete, true), "{context}");
                } else {
                    assert_eq!(write.op, Op::Upsert, "{context}");
                    check_document(collection, doc, since, write);
                }
            }
            _ => panic!("{context}: {write:?} (unknown field {unknown:?}, missing key {no_key:?}, deleted {deleted:?})"),
        }
        match write {
            Ok(write) if merged && write.op == Op::Upsert && write.fields.is_empty() => {} // nothing to merge
            Ok(write) => expected.push((index, write)),
            Err(problem) => refused.push((index, problem)),
        }
    }
    // The write's plan is the rows' changes, numbered in order, and the refusals.
    let mut clock = 0;
    let planned = push::plan(collection, rows, || {
        clock += 1;
        protocol::Hlc { wall_ms: 1_700_000_000_000, counter: clock }
    });
    assert_eq!(planned.refused, refused, "{} refusals", collection.name);
    assert_eq!(planned.changes.len(), expected.len(), "{} changes", collection.name);
    for (n, ((index, change, condition), (wanted, write))) in planned.changes.iter().zip(&expected).enumerate() {
        assert_eq!(index, wanted);
        assert_eq!((&change.key, change.op, &change.fields), (&write.key, write.op, &write.fields));
        assert_eq!(change.device_seq, n as u64 + 1);
        assert_eq!(change.table, collection.table.name);
        let condition = condition.as_ref().expect("every write is conditional");
        let assumed = rows[*index].assumed_master_state.as_ref();
        let stripped = assumed.map(|a| a.iter().filter(|(k, _)| !k.starts_with('_')).map(|(k, v)| (k.clone(), v.clone())).collect::<Object>());
        assert_eq!(condition.assumed, stripped, "the condition is the assumed document without RxDB's fields");
    }
}

/// An upsert writes every compared field (or, merged, those that changed), and its row is the
/// document again.
fn check_document(collection: &Collection, doc: &Object, since: Option<&Object>, write: &synchub::transport::rxdb::collection::DocumentWrite) {
    let value = |d: &Object, f: &str| d.get(f).cloned().unwrap_or(Value::Null);
    let changed: Vec<&String> = collection.compared.iter().filter(|f| since.is_none_or(|s| value(s, f) != value(doc, f))).collect();
    assert_eq!(write.fields.keys().collect::<Vec<_>>(), changed, "fields written of {doc:?}");
    assert!(write.fields.iter().all(|(f, v)| *v == value(doc, f)));
    if since.is_some() {
        return;
    }
    let mut row = write.key.clone();
    row.extend(write.fields.clone());
    let mut again: Object = collection.fields.iter().filter_map(|f| match doc.get(f) {
        Some(v) if !v.is_null() => Some((f.clone(), v.clone())),
        _ if collection.keep_nulls => Some((f.clone(), Value::Null)),
        _ => None,
    }).collect();
    again.insert(DELETED.into(), Value::Bool(false));
    assert_eq!(collection.document(&row, false), again, "the row of {doc:?} is the document again");
}

/// A hub checkpoint in a snapshot, as the hub writes it.
fn snapshot_checkpoint() -> Value {
    json!({"epoch": EPOCH, "seq": 42, "snapshot": {"epoch": EPOCH, "since": 42, "phase": "rows", "after": {"id": "o2"}}})
}

/// Seeds: the frames of the RxDB protocol notes (/work/shared/reference/rxdb-replication.md,
/// traced from RxDB 17.6.0) and of tests/rxdb_replication.rs and wire.rs's tests.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let item = |id: &str, qty: i64| json!({"id": id, "price": 10.5, "at": "2025-01-02T03:04:05.678Z", "done": false, "note": null, "meta": {"n": qty}, "qty": qty, "_deleted": false});
    let request = |id: &str, collection: &str, method: &str, params: Value| json!({"id": id, "collection": collection, "method": method, "params": params}).to_string();
    let rxdb_id = "Zk3a9x|q8w7e6r5t4|";
    let frames: Vec<(&str, String)> = vec![
        ("stream", r#"{"id":"stream","collection":"todos","method":"masterChangeStream$","params":[]}"#.into()),
        ("first-pull", request(&format!("{rxdb_id}1"), "todos", "masterChangesSince", json!([null, 2]))),
        ("pull-rxdb-checkpoint", request(&format!("{rxdb_id}2"), "todos", "masterChangesSince", json!([{"id": "x1", "lwt": 1795341095594.02}, 100]))),
        ("pull-log", request("p2", "items", "masterChangesSince", json!([{"epoch": EPOCH, "seq": 7, "snapshot": null}, 10]))),
        ("pull-snapshot", request("p3", "items", "masterChangesSince", json!([snapshot_checkpoint(), 10]))),
        ("pull-other-epoch", request("p4", "items", "masterChangesSince", json!([{"epoch": "e0", "seq": 7, "snapshot": null}, 10]))),
        ("write-new", request(&format!("{rxdb_id}3"), "items", "masterWrite", json!([[{"newDocumentState": item("o1", 1)}]]))),
        ("write-assumed", request(&format!("{rxdb_id}4"), "items", "masterWrite", json!([[{"assumedMasterState": item("o2", 2), "newDocumentState": {"id": "o2", "price": 10.5, "at": "2025-01-02T03:04:05.678Z", "done": false, "note": "edited offline", "meta": {"n": 2}, "qty": 20, "_deleted": false}}]]))),
        ("write-merged", request("w2", "merged", "masterWrite", json!([[{"assumedMasterState": item("m1", 1), "newDocumentState": item("m1", 41)}, {"newDocumentState": item("m2", 2)}]]))),
        ("write-tombstone", request("w3", "items", "masterWrite", json!([[{"assumedMasterState": item("o3", 3), "newDocumentState": {"id": "o3", "_deleted": true}}]]))),
        ("write-refused", request("w4", "items", "masterWrite", json!([[{"newDocumentState": {"id": "a", "colour": "red"}}, {"newDocumentState": {"name": "x"}}, {"newDocumentState": {"id": "a", "_deleted": "yes"}}]]))),
        ("write-raw", request("w1", "items", "masterWrite", json!([[{"newDocumentState": {"id": "raw1", "price": 2.5, "at": "2025-01-02T03:04:05.678Z", "done": false, "note": null, "meta": {"raw": true}, "qty": 1}}]]))),
        ("auth-bearer", request("a1", "items", "auth", json!([{"authorization": "Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig"}]))),
        ("auth-token", request("a1", "items", "auth", json!([{"token": "eyJhbGciOiJIUzI1NiJ9.e30.sig"}]))),
        ("auth-basic", request("y", "t", "auth", json!([{"Authorization": "Basic xyz"}]))),
        ("unknown-method", request("z", "t", "dropDatabase", json!([]))),
        ("rows-not-array", r#"{"id":7,"collection":"t","method":"masterWrite","params":[{"not":"rows"}]}"#.into()),
        ("no-id", r#"{"method":"auth"}"#.into()),
        ("array", "[1,2]".into()),
        ("stream-event", r#"{"id":"stream","collection":"todos","result":{"documents":[],"checkpoint":{"id":"x1","lwt":1795341095594.02}}}"#.into()),
        ("resync", r#"{"id":"stream","collection":"todos","result":"RESYNC"}"#.into()),
    ];
    frames.into_iter().map(|(name, text)| (format!("rxdb-{name}"), text.into_bytes())).collect()
}
