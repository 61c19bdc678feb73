//! Conditional writes (RxDB's masterWrite rule) through the group commit against real Postgres:
//! a write that assumed the stored document goes in, one that assumed another is a conflict
//! that writes nothing, returns the master row and is logged for review (GET /v1/conflicts) with
//! both values and both devices; a write retried after its success is a conflict with nothing
//! to log; a tombstone is written over only by a writer that saw it.

mod common;

use std::sync::Arc;

use common::*;
use protocol::{Change, ChangeResult, ChangeStatus, ErrorCode, Object};
use serde_json::{json, Value};
use synchub::ids::{DeviceId, TenantId, UserId};
use synchub::storage::apply::{ApplyLimits, BatchInput, GroupOutput};
use synchub::storage::row_cache::RowCache;
use synchub::sync::conditional::WriteCondition;
use uuid::Uuid;

const TENANT: &str = "rx-store";
const COMPARED: [&str; 7] = ["id", "sku", "name", "price_cents", "stock", "active", "updated_at"];

/// Commit `batches` as one group straight through the store, as the tenant actor would.
async fn commit(hub: &TestHub, batches: &[BatchInput]) -> GroupOutput {
    let store = hub.running.as_ref().unwrap().hub.store.clone();
    let tenant = TenantId::new(TENANT);
    store.tenant_head(&tenant).await.unwrap();
    let limits = ApplyLimits { max_field_bytes: 65_536, max_key_bytes: 1024, max_clock_skew_ms: 300_000 };
    let mut conn = store.group_connection().await.unwrap();
    store.commit_group(&mut conn, &tenant, batches, limits, None, &mut RowCache::off()).await.expect("the group commits")
}

/// A batch of `device` whose changes carry these conditions (the hub numbers its changes).
fn conditional(device: &str, changes: Vec<(Change, Option<WriteCondition>)>) -> BatchInput {
    let (changes, conditions) = changes.into_iter().unzip();
    BatchInput {
        assign_device_seqs: true,
        conditions,
        ..BatchInput::pushed(DeviceId::new(device), UserId::new(format!("user-{device}")), Uuid::now_v7(), changes)
    }
}

fn assumed(doc: Option<&Value>, deleted: bool) -> Option<WriteCondition> {
    let compared: Arc<[String]> = COMPARED.iter().map(|c| c.to_string()).collect();
    Some(WriteCondition { assumed: doc.map(|d| d.as_object().unwrap().clone()), assumed_deleted: deleted, compared, merge: false, refuse: None })
}

/// The master document: the row without its tenant column, as Postgres renders it.
async fn master(hub: &TestHub, id: Uuid) -> Option<Value> {
    sqlx::query_scalar("select to_jsonb(t) - 'tenant_id' from products t where tenant_id = $1 and id = $2")
        .bind(TENANT)
        .bind(id)
        .fetch_optional(&hub.db)
        .await
        .unwrap()
}

/// `doc` with `changes` laid over it.
fn edited(doc: &Value, changes: Value) -> Value {
    let mut doc = doc.clone();
    for (k, v) in changes.as_object().unwrap() {
        doc[k] = v.clone();
    }
    doc
}

/// An upsert of the whole document (as RxDB pushes its new document state).
fn write_doc(id: Uuid, doc: &Value) -> Change {
    upsert("products", json!({"id": id}), doc.clone(), 1, now_ms(), 0)
}

fn remove_doc(id: Uuid) -> Change {
    delete("products", json!({"id": id}), 1, now_ms(), 0)
}

async fn log_entries(hub: &TestHub, id: Uuid) -> i64 {
    sqlx::query_scalar("select count(*) from synchub.change_log where tenant_id = $1 and pk = $2")
        .bind(TENANT)
        .bind(json!({"id": id}))
        .fetch_one(&hub.db)
        .await
        .unwrap()
}

async fn conflicts_of(hub: &TestHub, id: Uuid) -> Vec<Value> {
    let (status, body) = get(hub, "/v1/conflicts").await;
    assert_eq!(status, 200, "{body}");
    body["conflicts"].as_array().unwrap().iter().filter(|c| c["key"] == json!({"id": id})).cloned().collect()
}

async fn get(hub: &TestHub, path: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .get(format!("http://{}{path}", hub.addr))
        .bearer_auth(token(TENANT, "mgr-1", "Manager", None))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

fn only(out: &GroupOutput) -> &ChangeResult {
    assert_eq!(out.results.len(), 1);
    &out.results[0][0]
}

fn fields_of(result: &ChangeResult) -> Object {
    let mut row = result.row.clone().expect("the master row");
    row.remove("tenant_id");
    row
}

#[actix_web::test]
async fn a_write_that_assumed_the_master_goes_in_and_one_that_did_not_is_a_logged_conflict() {
    let hub = TestHub::start().await;
    let id = Uuid::now_v7();
    let out = commit(&hub, &[conditional("rx-a", vec![(write_doc(id, &product(id, "Tea", 300)), assumed(None, false))])]).await;
    assert_eq!((only(&out).status, only(&out).seq.is_some()), (ChangeStatus::Applied, true), "no master: inserted");
    let first = master(&hub, id).await.unwrap();

    // rx-a renames it, having seen it; rx-b, which saw the first version, changes its price.
    let renamed = edited(&first, json!({"name": "Green tea"}));
    let out = commit(&hub, &[conditional("rx-a", vec![(write_doc(id, &renamed), assumed(Some(&first), false))])]).await;
    assert_eq!(only(&out).status, ChangeStatus::Applied);
    let current = master(&hub, id).await.unwrap();
    assert_eq!(current["name"], json!("Green tea"));
    let stale = edited(&first, json!({"price_cents": 999}));
    let out = commit(&hub, &[conditional("rx-b", vec![(write_doc(id, &stale), assumed(Some(&first), false))])]).await;
    let result = only(&out);
    assert_eq!((result.status, result.seq), (ChangeStatus::Conflict, None), "nothing written");
    assert_eq!(Value::Object(fields_of(result)), current, "the master comes back");
    assert_eq!(master(&hub, id).await.unwrap(), current);
    let mut lost = result.lost_fields.clone();
    lost.sort();
    assert_eq!(lost, ["name", "price_cents"]);

    // Logged per differing field, open, with both values and both devices.
    assert_eq!(out.conflicts.len(), 2);
    assert_eq!(out.open_conflicts, Some(2));
    let logged = conflicts_of(&hub, id).await;
    assert_eq!(logged.len(), 2, "{logged:?}");
    let by_field = |f: &str| logged.iter().find(|c| c["field"] == json!(f)).unwrap_or_else(|| panic!("no conflict on {f}: {logged:?}")).clone();
    let price = by_field("price_cents");
    assert_eq!((&price["status"], &price["winner"]), (&json!("open"), &json!("server")));
    assert_eq!((&price["server"]["value"], &price["incoming"]["value"]), (&json!(300), &json!(999)));
    assert_eq!((&price["server"]["device"], &price["incoming"]["device"]), (&json!("rx-a"), &json!("rx-b")));
    let name = by_field("name");
    assert_eq!((&name["server"]["value"], &name["incoming"]["value"]), (&json!("Green tea"), &json!("Tea")));

    // rx-b takes the master as its assumption and writes again: in.
    let merged = edited(&current, json!({"price_cents": 999}));
    let out = commit(&hub, &[conditional("rx-b", vec![(write_doc(id, &merged), assumed(Some(&current), false))])]).await;
    assert_eq!(only(&out).status, ChangeStatus::Applied);
    assert_eq!(master(&hub, id).await.unwrap(), merged);
    hub.shutdown().await;
}

#[actix_web::test]
async fn two_writes_assuming_the_same_master_in_one_group_the_second_conflicts() {
    let hub = TestHub::start().await;
    let id = Uuid::now_v7();
    commit(&hub, &[conditional("rx-a", vec![(write_doc(id, &product(id, "Tea", 300)), assumed(None, false))])]).await;
    let first = master(&hub, id).await.unwrap();
    let out = commit(
        &hub,
        &[
            conditional("rx-a", vec![(write_doc(id, &edited(&first, json!({"stock": 5}))), assumed(Some(&first), false))]),
            conditional("rx-b", vec![(write_doc(id, &edited(&first, json!({"stock": 7}))), assumed(Some(&first), false))]),
        ],
    )
    .await;
    assert_eq!(out.results[0][0].status, ChangeStatus::Applied);
    assert_eq!(out.results[1][0].status, ChangeStatus::Conflict);
    assert_eq!(out.results[1][0].row.as_ref().unwrap()["stock"], json!(5), "the master the first left");
    assert_eq!(master(&hub, id).await.unwrap()["stock"], json!(5));
    assert_eq!(out.conflicts.len(), 1);
    assert_eq!((out.conflicts[0].field.as_str(), &out.conflicts[0].incoming.value), ("stock", &json!(7)));
    hub.shutdown().await;
}

#[actix_web::test]
async fn a_write_retried_after_its_success_writes_nothing_twice_and_logs_nothing() {
    let hub = TestHub::start().await;
    let id = Uuid::now_v7();
    let insert = || conditional("rx-a", vec![(write_doc(id, &product(id, "Tea", 300)), assumed(None, false))]);
    let out = commit(&hub, &[insert()]).await;
    assert_eq!(only(&out).status, ChangeStatus::Applied);
    let head = out.head_seq;
    // The reply was lost; the client sends the same write again.
    let out = commit(&hub, &[insert()]).await;
    let result = only(&out);
    assert_eq!((result.status, result.seq), (ChangeStatus::Conflict, None));
    let written = master(&hub, id).await.unwrap();
    assert_eq!(Value::Object(fields_of(result)), written, "the master is what it wrote");
    assert!(result.lost_fields.is_empty() && out.conflicts.is_empty() && out.open_conflicts.is_none(), "no field differs");
    assert_eq!((out.head_seq, log_entries(&hub, id).await), (head, 1));

    // The same for an update.
    let update = || conditional("rx-a", vec![(write_doc(id, &edited(&written, json!({"stock": 9}))), assumed(Some(&written), false))]);
    assert_eq!(only(&commit(&hub, &[update()]).await).status, ChangeStatus::Applied);
    let out = commit(&hub, &[update()]).await;
    assert_eq!(only(&out).status, ChangeStatus::Conflict);
    assert!(out.conflicts.is_empty());
    assert_eq!(log_entries(&hub, id).await, 2);
    assert!(conflicts_of(&hub, id).await.is_empty());

    // The master written again as it is, having seen it: applied, with nothing to write.
    let now = master(&hub, id).await.unwrap();
    let out = commit(&hub, &[conditional("rx-a", vec![(write_doc(id, &now), assumed(Some(&now), false))])]).await;
    assert_eq!((only(&out).status, only(&out).seq), (ChangeStatus::Applied, None));
    assert_eq!(log_entries(&hub, id).await, 2);
    hub.shutdown().await;
}

#[actix_web::test]
async fn tombstones_are_deleted_once_and_written_over_only_by_one_that_saw_them() {
    let hub = TestHub::start().await;
    let id = Uuid::now_v7();
    commit(&hub, &[conditional("rx-a", vec![(write_doc(id, &product(id, "Tea", 300)), assumed(None, false))])]).await;
    let doc = master(&hub, id).await.unwrap();

    // A delete that assumed an older version is a conflict naming what it had not seen.
    let older = edited(&doc, json!({"stock": 42}));
    let out = commit(&hub, &[conditional("rx-b", vec![(remove_doc(id), assumed(Some(&older), false))])]).await;
    assert_eq!(only(&out).status, ChangeStatus::Conflict);
    assert!(master(&hub, id).await.is_some());
    assert_eq!(out.conflicts.iter().map(|c| c.field.as_str()).collect::<Vec<_>>(), ["stock"]);

    // Deleted by one that saw it; deleting again, as a retry would, writes nothing.
    let out = commit(&hub, &[conditional("rx-a", vec![(remove_doc(id), assumed(Some(&doc), false))])]).await;
    assert_eq!((only(&out).status, only(&out).seq.is_some()), (ChangeStatus::Applied, true));
    assert_eq!(master(&hub, id).await, None);
    let out = commit(&hub, &[conditional("rx-a", vec![(remove_doc(id), assumed(Some(&doc), true))])]).await;
    assert_eq!((only(&out).status, only(&out).seq), (ChangeStatus::Applied, None));
    // One that assumed nothing conflicts, but both are deleted: nothing to log.
    let out = commit(&hub, &[conditional("rx-a", vec![(remove_doc(id), assumed(None, false))])]).await;
    assert_eq!((only(&out).status, out.conflicts.len()), (ChangeStatus::Conflict, 0));

    // Writing over the tombstone without having seen it conflicts: its master is no row, and
    // every field lost to the delete is logged.
    for (device, condition) in [("rx-b", assumed(Some(&doc), false)), ("rx-d", assumed(None, false))] {
        let out = commit(&hub, &[conditional(device, vec![(write_doc(id, &edited(&doc, json!({"stock": 1}))), condition)])]).await;
        let result = only(&out);
        assert_eq!((result.status, result.row.is_none()), (ChangeStatus::Conflict, true), "{device}");
        assert_eq!(out.conflicts.len(), doc.as_object().unwrap().len() - 1, "every field but the key");
        assert!(out.conflicts.iter().all(|c| c.policy == "delete_wins" && c.winner == "server" && c.server.device == "rx-a"));
        assert!(out.conflicts.iter().all(|c| c.incoming.device == device && c.server.value.is_null()));
    }
    assert_eq!(master(&hub, id).await, None);
    assert_eq!(log_entries(&hub, id).await, 2, "the insert and the delete");

    // One that saw the tombstone brings the document back, as RxDB's own server does.
    let revived = edited(&doc, json!({"stock": 1}));
    let out = commit(&hub, &[conditional("rx-c", vec![(write_doc(id, &revived), assumed(Some(&doc), true))])]).await;
    assert_eq!((only(&out).status, only(&out).seq.is_some(), out.conflicts.len()), (ChangeStatus::Applied, true, 0));
    assert_eq!(master(&hub, id).await.unwrap()["stock"], json!(1));
    // Alive again: a later write that assumed it is an ordinary update.
    let now = master(&hub, id).await.unwrap();
    let out = commit(&hub, &[conditional("rx-c", vec![(write_doc(id, &edited(&now, json!({"stock": 2}))), assumed(Some(&now), false))])]).await;
    assert_eq!(only(&out).status, ChangeStatus::Applied);
    assert_eq!(log_entries(&hub, id).await, 4, "insert, delete, revival, update");
    hub.shutdown().await;
}

#[actix_web::test]
async fn conditions_ride_along_unconditional_changes_and_must_match_them_in_number() {
    let hub = TestHub::start().await;
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let out = commit(&hub, &[conditional("rx-a", vec![(write_doc(a, &product(a, "Tea", 300)), assumed(None, false))])]).await;
    let version = only(&out).seq.unwrap();
    let doc = master(&hub, a).await.unwrap();
    // One conditional change that conflicts, one unconditional change to the same row, and a new row.
    let stale = edited(&doc, json!({"name": "Stale"}));
    let out = commit(
        &hub,
        &[conditional(
            "rx-b",
            vec![
                (write_doc(a, &edited(&stale, json!({"stock": 3}))), assumed(Some(&stale), false)),
                (upsert("products", json!({"id": a}), json!({"stock": 4}), 1, now_ms(), version), None),
                (write_doc(b, &product(b, "Coffee", 200)), None),
            ],
        )],
    )
    .await;
    let statuses: Vec<ChangeStatus> = out.results[0].iter().map(|r| r.status).collect();
    assert_eq!(statuses, [ChangeStatus::Conflict, ChangeStatus::Applied, ChangeStatus::Applied]);
    let now = master(&hub, a).await.unwrap();
    assert_eq!((&now["name"], &now["stock"]), (&json!("Tea"), &json!(4)), "the conditional change wrote nothing");
    assert!(out.conflicts.len() == 2 && out.conflicts.iter().all(|c| c.winner == "server"), "{:?}", out.conflicts);

    let mut mismatched = conditional("rx-c", vec![(write_doc(b, &product(b, "Tea", 1)), None), (remove_doc(a), None)]);
    mismatched.conditions.pop();
    let out = commit(&hub, &[mismatched]).await;
    let refused: Vec<_> = out.results[0].iter().map(|r| (r.status, r.reason)).collect();
    assert_eq!(refused, vec![(ChangeStatus::Rejected, Some(ErrorCode::InvalidBatch)); 2]);
    assert!(master(&hub, a).await.is_some());
    hub.shutdown().await;
}
