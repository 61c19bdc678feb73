//! Conflicts and exactly-once delivery against a real hub, real Postgres and real sockets:
//! offline batches that conflict (both clock orders), delete against update in both orders,
//! the `client_wins` policy, re-sent batches after a dropped connection, device_seq gaps and
//! rejected changes in the middle of a batch, and catch-up while another device keeps writing.

mod common;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::rc::Rc;
use std::time::Duration;

use common::*;
use protocol::{Change, ChangeResult, ChangeStatus, ClientFrame, Delta, ErrorCode, Object, Op, Position, ServerFrame};
use serde_json::{json, Value};
use uuid::Uuid;

const TENANT: &str = "store-1";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Connect a device and say hello (no catch-up drained); returns the client and welcome's
/// (epoch, head_seq).
async fn connect(hub: &TestHub, device: &str, position: Option<Position>) -> (Client, String, u64) {
    let mut c = hub.client().await;
    let (epoch, head) = c.hello(&token(TENANT, &format!("user-{device}"), "Employee", Some(device)), None, position).await;
    (c, epoch, head)
}

/// Send a push with a chosen batch id; returns the request id.
async fn send_push(c: &mut Client, batch_id: Uuid, changes: &[Change]) -> u64 {
    let id = c.next_id();
    c.send(&ClientFrame::Push { id, batch_id, changes: changes.to_vec() }).await;
    id
}

/// Wait for the ack of request `id` (other frames stay in the inbox).
async fn ack_of(c: &mut Client, id: u64, batch_id: Uuid) -> Vec<ChangeResult> {
    c.expect(|f| match f {
        ServerFrame::Ack { id: got, batch_id: b, results } if *got == id => {
            assert_eq!(*b, batch_id, "ack echoes the batch id");
            Some(results.clone())
        }
        ServerFrame::Error { id: Some(got), code, message, .. } if *got == id => panic!("push refused: {code:?} {message}"),
        _ => None,
    })
    .await
}

async fn push_batch(c: &mut Client, batch_id: Uuid, changes: &[Change]) -> Vec<ChangeResult> {
    let id = send_push(c, batch_id, changes).await;
    let results = ack_of(c, id, batch_id).await;
    assert_eq!(results.len(), changes.len(), "one result per change");
    for (r, ch) in results.iter().zip(changes) {
        assert_eq!((r.change_id, r.device_seq), (ch.change_id, ch.device_seq), "results are in the order of the changes");
    }
    results
}

/// The error a push is refused with (instead of an ack).
async fn push_refused(c: &mut Client, changes: &[Change]) -> (ErrorCode, bool) {
    let id = c.next_id();
    c.send(&ClientFrame::Push { id, batch_id: Uuid::now_v7(), changes: changes.to_vec() }).await;
    c.expect(|f| match f {
        ServerFrame::Error { id: Some(got), code, temporary, .. } if *got == id => Some((*code, *temporary)),
        ServerFrame::Ack { id: got, results, .. } if *got == id => panic!("expected the batch to be refused, got an ack {results:?}"),
        _ => None,
    })
    .await
}

fn with_clock(mut c: Change, wall_ms: u64, counter: u32) -> Change {
    c.hlc = protocol::Hlc { wall_ms, counter };
    c
}

fn key_text(key: &Value) -> String {
    key.to_string()
}

/// A device's local copy of the tenant's rows, kept the way the protocol tells a client to:
/// deltas and ack results replace rows at their version, older deltas are skipped, deletes
/// leave a tombstone.
#[derive(Default, Debug)]
struct Replica {
    /// (table, key) → (version, row; `None` when deleted).
    rows: BTreeMap<(String, String), (u64, Option<Object>)>,
}

impl Replica {
    fn apply_delta(&mut self, d: &Delta) {
        let id = (d.table.clone(), key_text(&Value::Object(d.key.clone())));
        if self.rows.get(&id).is_some_and(|(v, _)| *v >= d.seq) {
            return;
        }
        let row = match d.op {
            Op::Delete => None,
            Op::Upsert => Some(d.row.clone().expect("an upsert delta carries the row")),
        };
        self.rows.insert(id, (d.seq, row));
    }

    fn apply_deltas<'a>(&mut self, deltas: impl IntoIterator<Item = &'a Delta>) {
        for d in deltas {
            self.apply_delta(d);
        }
    }

    fn apply_result(&mut self, change: &Change, r: &ChangeResult) {
        let id = (change.table.clone(), key_text(&Value::Object(change.key.clone())));
        let current = self.rows.get(&id).cloned();
        let version = |fallback: u64| r.seq.unwrap_or(fallback);
        match r.status {
            ChangeStatus::Applied => {
                let Some(seq) = r.seq else { return };
                if current.as_ref().is_some_and(|(v, _)| *v >= seq) {
                    return;
                }
                let row = match change.op {
                    Op::Delete => None,
                    Op::Upsert => {
                        let mut row = current.and_then(|(_, r)| r).unwrap_or_else(|| change.key.clone());
                        row.extend(change.fields.clone());
                        Some(row)
                    }
                };
                self.rows.insert(id, (seq, row));
            }
            ChangeStatus::Merged | ChangeStatus::Conflict => {
                let old_version = current.as_ref().map_or(0, |(v, _)| *v);
                if r.seq.is_some_and(|s| s <= old_version) {
                    return;
                }
                // A conflict without a row means a delete won: the row is gone.
                self.rows.insert(id, (version(old_version), r.row.clone()));
            }
            ChangeStatus::Rejected | ChangeStatus::Duplicate => {}
        }
    }

    fn row(&self, table: &str, key: &Value) -> Option<&Object> {
        self.rows.get(&(table.to_string(), key_text(key))).and_then(|(_, r)| r.as_ref())
    }

    fn version(&self, table: &str, key: &Value) -> Option<u64> {
        self.rows.get(&(table.to_string(), key_text(key))).map(|(v, _)| *v)
    }

    fn is_deleted(&self, table: &str, key: &Value) -> bool {
        matches!(self.rows.get(&(table.to_string(), key_text(key))), Some((_, None)))
    }

    /// Live rows of a table by key text.
    fn table(&self, table: &str) -> BTreeMap<String, Object> {
        self.rows
            .iter()
            .filter(|((t, _), (_, r))| t == table && r.is_some())
            .map(|((_, k), (_, r))| (k.clone(), r.clone().unwrap()))
            .collect()
    }
}

async fn db_row(hub: &TestHub, table: &str, id: Uuid) -> Option<Object> {
    let v: Option<Value> =
        sqlx::query_scalar(&format!("select to_jsonb(t) from {table} t where id = $1")).bind(id).fetch_optional(&hub.db).await.unwrap();
    v.map(|v| v.as_object().unwrap().clone())
}

/// Every row of a table for the tenant, by key text (as the hub renders keys: `{"id": ...}`).
async fn db_table(hub: &TestHub, table: &str) -> BTreeMap<String, Object> {
    let rows: Vec<Value> = sqlx::query_scalar(&format!("select to_jsonb(t) from {table} t where tenant_id = $1"))
        .bind(TENANT)
        .fetch_all(&hub.db)
        .await
        .unwrap();
    rows.into_iter()
        .map(|r| {
            let o = r.as_object().unwrap().clone();
            (key_text(&json!({"id": o["id"]})), o)
        })
        .collect()
}

async fn conflict_rows(hub: &TestHub, change_id: Uuid) -> Vec<Object> {
    let rows: Vec<Value> =
        sqlx::query_scalar("select to_jsonb(c) from synchub.conflicts c where change_id = $1 order by field, conflict_id")
            .bind(change_id)
            .fetch_all(&hub.db)
            .await
            .unwrap();
    rows.into_iter().map(|r| r.as_object().unwrap().clone()).collect()
}

async fn conflict_count(hub: &TestHub) -> i64 {
    sqlx::query_scalar("select count(*) from synchub.conflicts").fetch_one(&hub.db).await.unwrap()
}

/// The columns of `synchub.conflicts` a conflict record is checked on, one by one.
const CONFLICT_FIELDS: &[&str] = &[
    "tenant_id",
    "table_name",
    "pk",
    "field",
    "base_version",
    "server_version",
    "server_value",
    "server_hlc",
    "server_device",
    "server_user",
    "incoming_value",
    "incoming_hlc",
    "incoming_device",
    "incoming_user",
    "winner",
    "policy",
    "change_id",
    "batch_id",
    "seq",
    "review_status",
    "reviewed_by",
    "reviewed_at",
];

fn assert_conflict(row: &Object, expected: Value) {
    let expected = expected.as_object().unwrap();
    for column in CONFLICT_FIELDS {
        let want = expected.get(*column).unwrap_or_else(|| panic!("test expects no value for conflicts.{column}"));
        let got = row.get(*column).unwrap_or_else(|| panic!("conflicts has no column {column}"));
        assert_eq!(got, want, "conflicts.{column} of {row:?}");
    }
    assert!(row["conflict_id"].as_i64().is_some(), "conflict has an id");
    assert!(row["created_at"].is_string(), "conflict has a creation time");
}

fn hlc(wall_ms: u64, counter: u32) -> Value {
    json!({"wall_ms": wall_ms, "counter": counter})
}

async fn cursor(hub: &TestHub, device: &str) -> Option<i64> {
    sqlx::query_scalar("select last_device_seq from synchub.device_cursors where tenant_id = $1 and device_id = $2")
        .bind(TENANT)
        .bind(device)
        .fetch_optional(&hub.db)
        .await
        .unwrap()
}

async fn log_seq_of(hub: &TestHub, change_id: Uuid) -> Option<i64> {
    sqlx::query_scalar("select seq from synchub.change_log where tenant_id = $1 and change_id = $2")
        .bind(TENANT)
        .bind(change_id)
        .fetch_optional(&hub.db)
        .await
        .unwrap()
}

async fn head_seq(hub: &TestHub) -> i64 {
    sqlx::query_scalar("select head_seq from synchub.tenants where tenant_id = $1").bind(TENANT).fetch_one(&hub.db).await.unwrap()
}

async fn row_version(hub: &TestHub, table: &str, id: Uuid) -> Option<(i64, Option<Value>, Value)> {
    sqlx::query_as("select version, deleted::json, synchub.field_clocks(clocks) from synchub.row_versions where tenant_id = $1 and table_name = $2 and pk = $3")
        .bind(TENANT)
        .bind(table)
        .bind(json!({"id": id}))
        .fetch_optional(&hub.db)
        .await
        .unwrap()
}

/// Live delta frames until one covers `upto`; checks each frame starts where the previous
/// one ended (from `after`) and returns the deltas.
async fn deltas_until(c: &mut Client, mut after: u64, upto: u64) -> Vec<Delta> {
    let mut all = Vec::new();
    while after < upto {
        let (deltas, seq) = c.next_deltas().await;
        assert!(seq > after, "delta frame seq {seq} does not move past {after}");
        for d in &deltas {
            assert!(d.seq > after && d.seq <= seq, "delta {} outside its frame ({after}, {seq}]", d.seq);
            after = d.seq;
        }
        after = seq;
        all.extend(deltas);
    }
    assert_eq!(after, upto, "frames end exactly at {upto}");
    all
}

/// Nothing more arrives on the socket (besides frames already read).
async fn assert_quiet(c: &mut Client, what: &str) {
    if let Some(f) = c.recv_timeout(Duration::from_millis(400)).await {
        panic!("{what}: unexpected frame {f:?}");
    }
}

fn product_fields(id: Uuid, name: &str, price: i64, stock: i64) -> Value {
    let mut p = product(id, name, price);
    p["stock"] = json!(stock);
    p
}

fn pos(epoch: &str, seq: u64) -> Option<Position> {
    Some(Position { epoch: epoch.to_string(), seq })
}

// ---------------------------------------------------------------------------------------------
// 1. Offline batch that conflicts
// ---------------------------------------------------------------------------------------------

/// Two live devices of the tenant after A created a product (clock `age_ms` in the past) that
/// B has received at version `v`, with both devices' replicas.
struct SharedRow {
    hub: TestHub,
    a: Client,
    b: Client,
    epoch: String,
    rep_a: Replica,
    rep_b: Replica,
    p: Uuid,
    pk: Value,
    create: Change,
    v: u64,
}

async fn shared_row(name: &str, price: i64, stock: i64, age_ms: u64) -> SharedRow {
    let hub = TestHub::start().await;
    let (mut a, epoch, _) = Client::device(&hub, TENANT, "pos-a").await;
    let (mut b, _, _) = Client::device(&hub, TENANT, "pos-b").await;
    let (mut rep_a, mut rep_b) = (Replica::default(), Replica::default());
    let p = Uuid::new_v4();
    let pk = json!({"id": p});
    let create = upsert("products", pk.clone(), product_fields(p, name, price, stock), 1, now_ms() - age_ms, 0);
    let r = push_batch(&mut a, Uuid::now_v7(), std::slice::from_ref(&create)).await;
    assert_eq!(r[0].status, ChangeStatus::Applied);
    let v = r[0].seq.unwrap();
    rep_a.apply_result(&create, &r[0]);
    rep_b.apply_deltas(&deltas_until(&mut b, 0, v).await);
    assert_eq!(rep_b.version("products", &pk), Some(v));
    SharedRow { hub, a, b, epoch, rep_a, rep_b, p, pk, create, v }
}

/// Both devices see a product at version v. A changes price and name; B, offline since v,
/// pushes a batch whose price change has a newer clock. B's price wins, A's name stays, the
/// conflict is recorded with both values, and both devices converge on the same row.
#[actix_web::test]
async fn offline_batch_conflict_newer_clock_wins_and_is_logged() {
    let SharedRow { hub, mut a, mut b, epoch, mut rep_a, mut rep_b, p, pk, create, v } = shared_row("Latte", 400, 10, 10_000).await;

    // B goes offline at v.
    b.ws.close(None).await.unwrap();
    drop(b);

    let t_a = now_ms();
    let a_change = with_clock(upsert("products", pk.clone(), json!({"price_cents": 450, "name": "Latte grande"}), 2, 0, v), t_a, 0);
    let r = push_batch(&mut a, Uuid::now_v7(), std::slice::from_ref(&a_change)).await;
    assert_eq!((r[0].status, r[0].seq, r[0].row.as_ref()), (ChangeStatus::Applied, Some(v + 1), None));
    rep_a.apply_result(&a_change, &r[0]);
    let s2 = v + 1;

    // B comes back and pushes its offline batch (made at base v) right after welcome.
    let (mut b, _, head) = connect(&hub, "pos-b", pos(&epoch, v)).await;
    assert_eq!(head, s2);
    let t_b = t_a + 5_000;
    let customer = Uuid::new_v4();
    let order = Uuid::new_v4();
    let batch = vec![
        with_clock(upsert("products", pk.clone(), json!({"price_cents": 520, "active": false}), 1, 0, v), t_b, 2),
        with_clock(upsert("customers", json!({"id": customer}), json!({"name": "Ada", "email": "ada@example.org"}), 2, 0, 0), t_b, 3),
        with_clock(upsert("products", pk.clone(), json!({"stock": 3}), 3, 0, v), t_b, 4),
        with_clock(
            upsert("orders", json!({"id": order}), json!({"store_id": "s1", "customer_id": customer, "total_cents": 520}), 4, 0, 0),
            t_b,
            5,
        ),
        // The same name A chose: concurrent, but an agreement is not a conflict.
        with_clock(upsert("products", pk.clone(), json!({"name": "Latte grande"}), 5, 0, v), t_b, 6),
    ];
    let batch_id = Uuid::now_v7();
    let results = push_batch(&mut b, batch_id, &batch).await;
    let statuses: Vec<_> = results.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        vec![ChangeStatus::Conflict, ChangeStatus::Applied, ChangeStatus::Merged, ChangeStatus::Applied, ChangeStatus::Merged]
    );
    let seqs: Vec<_> = results.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=5).map(|i| Some(s2 + i)).collect::<Vec<_>>(), "each change committed at the next seq");
    for r in &results {
        assert!(r.lost_fields.is_empty(), "nothing of B lost: {r:?}");
        assert_eq!((r.reason, r.message.as_ref()), (None, None));
    }
    assert_eq!(results[1].row, None, "applied results carry no row");
    assert_eq!(results[3].row, None);
    let row1 = results[0].row.as_ref().expect("conflict result carries the row");
    assert_eq!(
        (&row1["price_cents"], &row1["active"], &row1["name"], &row1["stock"], &row1["sku"], &row1["tenant_id"]),
        (&json!(520), &json!(false), &json!("Latte grande"), &json!(10), &create.fields["sku"], &json!(TENANT))
    );
    let row3 = results[2].row.as_ref().expect("merged result carries the row");
    assert_eq!((&row3["stock"], &row3["price_cents"], &row3["name"]), (&json!(3), &json!(520), &json!("Latte grande")));
    let final_row = results[4].row.clone().expect("merged result carries the row");

    // B: catch-up (A's change at s2, possibly its own) and the ack rows, by version.
    let (catch_up, up_to) = b.until_up_to_date().await;
    assert!(up_to >= s2);
    assert!(catch_up.iter().any(|d| d.seq == s2 && d.origin.as_deref() == Some("pos-a")));
    rep_b.apply_deltas(&catch_up);
    for (ch, r) in batch.iter().zip(&results) {
        rep_b.apply_result(ch, r);
    }
    // A: B's five changes arrive live, in order, exactly once.
    let live = deltas_until(&mut a, s2, s2 + 5).await;
    assert_eq!(live.iter().map(|d| d.seq).collect::<Vec<_>>(), (s2 + 1..=s2 + 5).collect::<Vec<_>>());
    assert_eq!(live.iter().map(|d| d.change_id.unwrap()).collect::<Vec<_>>(), batch.iter().map(|c| c.change_id).collect::<Vec<_>>());
    assert!(live.iter().all(|d| d.origin.as_deref() == Some("pos-b")));
    assert_eq!(live[0].old.as_ref().unwrap(), &json!({"price_cents": 450, "active": true}).as_object().unwrap().clone());
    rep_a.apply_deltas(&live);

    let stored = db_row(&hub, "products", p).await.expect("row exists");
    assert_eq!(stored, final_row, "the ack row is the committed row");
    assert_eq!(rep_a.row("products", &pk), Some(&stored), "A converged");
    assert_eq!(rep_b.row("products", &pk), Some(&stored), "B converged");
    assert_eq!(rep_a.version("products", &pk), Some(s2 + 5));
    assert_eq!(rep_b.version("products", &pk), Some(s2 + 5));
    assert_eq!(
        (&stored["price_cents"], &stored["name"], &stored["stock"], &stored["active"]),
        (&json!(520), &json!("Latte grande"), &json!(3), &json!(false))
    );
    assert_eq!(db_row(&hub, "customers", customer).await.unwrap()["name"], json!("Ada"));
    assert_eq!(db_row(&hub, "orders", order).await.unwrap()["total_cents"], json!(520));
    let (version, deleted, clocks) = row_version(&hub, "products", p).await.unwrap();
    assert_eq!((version, deleted), ((s2 + 5) as i64, None));
    assert_eq!(clocks["price_cents"], json!([t_b, 2, "pos-b", s2 + 1, "user-pos-b"]));
    assert_eq!(clocks["name"], json!([t_b, 6, "pos-b", s2 + 5, "user-pos-b"]));
    assert_eq!(cursor(&hub, "pos-b").await, Some(5));

    // Exactly one conflict: price_cents. (name agreed; stock and active were not concurrent.)
    assert_eq!(conflict_count(&hub).await, 1);
    let conflicts = conflict_rows(&hub, batch[0].change_id).await;
    assert_eq!(conflicts.len(), 1);
    assert_conflict(
        &conflicts[0],
        json!({
            "tenant_id": TENANT, "table_name": "products", "pk": {"id": p}, "field": "price_cents",
            "base_version": v, "server_version": s2, "server_value": 450, "server_hlc": hlc(t_a, 0),
            "server_device": "pos-a", "server_user": "user-pos-a",
            "incoming_value": 520, "incoming_hlc": hlc(t_b, 2), "incoming_device": "pos-b", "incoming_user": "user-pos-b",
            "winner": "incoming", "policy": "lww", "change_id": batch[0].change_id, "batch_id": batch_id, "seq": s2 + 1,
            "review_status": "open", "reviewed_by": null, "reviewed_at": null,
        }),
    );
    assert_quiet(&mut a, "A after B's batch").await;
    hub.shutdown().await;
}

/// The same situation with B's clock older than A's: A's price stays, B's other field is
/// written, B is told which field lost, and the conflict is logged with the server winning.
#[actix_web::test]
async fn offline_batch_conflict_older_clock_loses_and_is_logged() {
    let SharedRow { hub, mut a, mut b, epoch, mut rep_a, mut rep_b, p, pk, v, .. } = shared_row("Tea", 300, 5, 120_000).await;
    b.ws.close(None).await.unwrap();
    drop(b);

    let t_a = now_ms();
    let a_change = with_clock(upsert("products", pk.clone(), json!({"price_cents": 450, "name": "Green tea"}), 2, 0, v), t_a, 1);
    let r = push_batch(&mut a, Uuid::now_v7(), std::slice::from_ref(&a_change)).await;
    assert_eq!((r[0].status, r[0].seq), (ChangeStatus::Applied, Some(v + 1)));
    rep_a.apply_result(&a_change, &r[0]);
    let s2 = v + 1;

    let (mut b, _, _) = connect(&hub, "pos-b", pos(&epoch, v)).await;
    let t_b = t_a - 60_000; // B's edits were made a minute before A's
    let batch = vec![
        with_clock(upsert("products", pk.clone(), json!({"price_cents": 300, "active": false}), 1, 0, v), t_b, 0),
        // Only the conflicting field: everything of it loses, nothing is written.
        with_clock(upsert("products", pk.clone(), json!({"price_cents": 310}), 2, 0, v), t_b + 1, 0),
    ];
    let batch_id = Uuid::now_v7();
    let results = push_batch(&mut b, batch_id, &batch).await;

    assert_eq!(results[0].status, ChangeStatus::Conflict);
    assert_eq!(results[0].seq, Some(s2 + 1), "`active` was written");
    assert_eq!(results[0].lost_fields, vec!["price_cents".to_string()]);
    let row = results[0].row.as_ref().unwrap();
    assert_eq!((&row["price_cents"], &row["active"], &row["name"]), (&json!(450), &json!(false), &json!("Green tea")));

    assert_eq!(results[1].status, ChangeStatus::Conflict);
    assert_eq!(results[1].lost_fields, vec!["price_cents".to_string()]);
    assert_eq!(results[1].seq, None, "a change that wrote nothing takes no seq");
    assert_eq!(results[1].row.as_ref(), Some(row), "the row as it stands");
    assert_eq!(log_seq_of(&hub, batch[1].change_id).await, None, "nothing logged for a change that wrote nothing");
    assert_eq!(head_seq(&hub).await as u64, s2 + 1);
    assert_eq!(cursor(&hub, "pos-b").await, Some(2));

    let (catch_up, _) = b.until_up_to_date().await;
    rep_b.apply_deltas(&catch_up);
    for (ch, r) in batch.iter().zip(&results) {
        rep_b.apply_result(ch, r);
    }
    let live = deltas_until(&mut a, s2, s2 + 1).await;
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].change_id, Some(batch[0].change_id));
    assert_eq!(live[0].old.as_ref().unwrap(), json!({"active": true}).as_object().unwrap(), "only `active` changed");
    rep_a.apply_deltas(&live);

    let stored = db_row(&hub, "products", p).await.unwrap();
    assert_eq!(Some(&stored), results[0].row.as_ref());
    assert_eq!((&stored["price_cents"], &stored["active"]), (&json!(450), &json!(false)));
    assert_eq!(rep_a.row("products", &pk), Some(&stored));
    assert_eq!(rep_b.row("products", &pk), Some(&stored));
    let (_, _, clocks) = row_version(&hub, "products", p).await.unwrap();
    assert_eq!(clocks["price_cents"], json!([t_a, 1, "pos-a", s2, "user-pos-a"]), "A's clock stays on the field it won");

    assert_eq!(conflict_count(&hub).await, 2);
    let expected = |change: &Change, value: i64, wall: u64, seq: Value| {
        json!({
            "tenant_id": TENANT, "table_name": "products", "pk": {"id": p}, "field": "price_cents",
            "base_version": v, "server_version": s2, "server_value": 450, "server_hlc": hlc(t_a, 1),
            "server_device": "pos-a", "server_user": "user-pos-a",
            "incoming_value": value, "incoming_hlc": hlc(wall, 0), "incoming_device": "pos-b", "incoming_user": "user-pos-b",
            "winner": "server", "policy": "lww", "change_id": change.change_id, "batch_id": batch_id, "seq": seq,
            "review_status": "open", "reviewed_by": null, "reviewed_at": null,
        })
    };
    let c0 = conflict_rows(&hub, batch[0].change_id).await;
    assert_eq!(c0.len(), 1);
    assert_conflict(&c0[0], expected(&batch[0], 300, t_b, json!(s2 + 1)));
    let c1 = conflict_rows(&hub, batch[1].change_id).await;
    assert_eq!(c1.len(), 1);
    assert_conflict(&c1[0], expected(&batch[1], 310, t_b + 1, Value::Null));
    assert_quiet(&mut a, "A after B's batch").await;
    hub.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Delete beats a concurrent update
// ---------------------------------------------------------------------------------------------

/// A deletes the row; B, offline since before the delete, then pushes an update with a newer
/// clock. The delete wins: the row stays deleted everywhere and the update is logged.
#[actix_web::test]
async fn delete_beats_a_later_stale_update() {
    let SharedRow { hub, mut a, mut b, epoch, mut rep_a, mut rep_b, p, pk, v, .. } = shared_row("Scone", 250, 4, 10_000).await;
    b.ws.close(None).await.unwrap();
    drop(b);

    let t_a = now_ms();
    let del = with_clock(delete("products", pk.clone(), 2, 0, v), t_a, 0);
    let r = push_batch(&mut a, Uuid::now_v7(), std::slice::from_ref(&del)).await;
    assert_eq!((r[0].status, r[0].seq, r[0].row.as_ref()), (ChangeStatus::Applied, Some(v + 1), None));
    let d = v + 1;
    rep_a.apply_result(&del, &r[0]);
    assert!(db_row(&hub, "products", p).await.is_none());

    let (mut b, _, _) = connect(&hub, "pos-b", pos(&epoch, v)).await;
    let t_b = t_a + 10_000; // newer clock: the delete still wins
    let customer = Uuid::new_v4();
    let batch = vec![
        with_clock(upsert("products", pk.clone(), json!({"price_cents": 999, "name": "Big scone"}), 1, 0, v), t_b, 0),
        with_clock(upsert("customers", json!({"id": customer}), json!({"name": "Bo"}), 2, 0, 0), t_b, 1),
    ];
    let batch_id = Uuid::now_v7();
    let results = push_batch(&mut b, batch_id, &batch).await;
    assert_eq!(results[0].status, ChangeStatus::Conflict);
    let mut lost = results[0].lost_fields.clone();
    lost.sort();
    assert_eq!(lost, vec!["name".to_string(), "price_cents".to_string()], "every field of the update lost");
    assert_eq!((results[0].row.as_ref(), results[0].seq), (None, None), "delete won: no row, nothing written");
    assert_eq!((results[1].status, results[1].seq), (ChangeStatus::Applied, Some(d + 1)), "the rest of the batch goes on");

    let (catch_up, _) = b.until_up_to_date().await;
    assert!(catch_up.iter().any(|x| x.seq == d && x.op == Op::Delete));
    rep_b.apply_deltas(&catch_up);
    for (ch, r) in batch.iter().zip(&results) {
        rep_b.apply_result(ch, r);
    }
    let live = deltas_until(&mut a, d, d + 1).await;
    assert_eq!(live.iter().map(|x| x.change_id).collect::<Vec<_>>(), vec![Some(batch[1].change_id)], "A hears nothing of the lost update");
    rep_a.apply_deltas(&live);

    assert!(db_row(&hub, "products", p).await.is_none(), "row stays deleted in Postgres");
    assert!(rep_a.is_deleted("products", &pk), "deleted on A");
    assert!(rep_b.is_deleted("products", &pk), "deleted on B");
    let (version, deleted, _) = row_version(&hub, "products", p).await.unwrap();
    assert_eq!(version as u64, d);
    assert_eq!(deleted, Some(json!([t_a, 0, "pos-a", d, "user-pos-a"])), "tombstone with the delete's clock");
    assert_eq!(log_seq_of(&hub, batch[0].change_id).await, None);

    // A device starting from scratch ends without the row too.
    let (mut c, _, _) = connect(&hub, "pos-c", None).await;
    let (all, upto) = c.until_up_to_date().await;
    assert_eq!(upto, d + 1);
    let mut rep_c = Replica::default();
    rep_c.apply_deltas(&all);
    assert!(rep_c.is_deleted("products", &pk));

    assert_eq!(conflict_count(&hub).await, 2);
    let rows = conflict_rows(&hub, batch[0].change_id).await;
    assert_eq!(rows.len(), 2);
    for (row, (field, value)) in rows.iter().zip([("name", json!("Big scone")), ("price_cents", json!(999))]) {
        assert_conflict(
            row,
            json!({
                "tenant_id": TENANT, "table_name": "products", "pk": {"id": p}, "field": field,
                "base_version": v, "server_version": d, "server_value": null, "server_hlc": hlc(t_a, 0),
                "server_device": "pos-a", "server_user": "user-pos-a",
                "incoming_value": value, "incoming_hlc": hlc(t_b, 0), "incoming_device": "pos-b", "incoming_user": "user-pos-b",
                "winner": "server", "policy": "delete_wins", "change_id": batch[0].change_id, "batch_id": batch_id, "seq": null,
                "review_status": "open", "reviewed_by": null, "reviewed_at": null,
            }),
        );
    }

    // B has now seen the delete: a further update is refused for good, and the cursor moves.
    let late = upsert("products", pk.clone(), json!({"price_cents": 1}), 3, now_ms(), d);
    let r = push_batch(&mut b, Uuid::now_v7(), std::slice::from_ref(&late)).await;
    assert_eq!((r[0].status, r[0].reason, r[0].seq), (ChangeStatus::Rejected, Some(ErrorCode::RowDeleted), None));
    assert_eq!(cursor(&hub, "pos-b").await, Some(3));
    assert!(db_row(&hub, "products", p).await.is_none());
    assert_eq!(conflict_count(&hub).await, 2, "a refused change is not a conflict");
    assert_quiet(&mut a, "A after the refused update").await;
    hub.shutdown().await;
}

/// B updates the row; A, offline since before B's update, then deletes it with an older
/// clock. The delete wins: the row is deleted everywhere and B's concurrent fields are logged.
#[actix_web::test]
async fn delete_with_older_base_beats_an_earlier_update() {
    let SharedRow { hub, mut a, mut b, epoch, mut rep_a, mut rep_b, p, pk, v, .. } = shared_row("Bagel", 199, 8, 10_000).await;
    a.ws.close(None).await.unwrap();
    drop(a);

    let t_b = now_ms();
    let upd = with_clock(upsert("products", pk.clone(), json!({"price_cents": 555, "stock": 1}), 1, 0, v), t_b, 0);
    let r = push_batch(&mut b, Uuid::now_v7(), std::slice::from_ref(&upd)).await;
    assert_eq!((r[0].status, r[0].seq), (ChangeStatus::Applied, Some(v + 1)));
    let u = v + 1;
    rep_b.apply_result(&upd, &r[0]);
    let before_delete = db_row(&hub, "products", p).await.unwrap();

    let (mut a, _, _) = connect(&hub, "pos-a", pos(&epoch, v)).await;
    let t_a = t_b - 30_000; // older clock, older base: the delete still wins
    let del = with_clock(delete("products", pk.clone(), 2, 0, v), t_a, 7);
    let batch_id = Uuid::now_v7();
    let results = push_batch(&mut a, batch_id, std::slice::from_ref(&del)).await;
    let d = u + 1;
    assert_eq!(results[0].status, ChangeStatus::Conflict);
    assert_eq!(results[0].seq, Some(d));
    assert!(results[0].lost_fields.is_empty(), "the delete lost nothing");
    assert_eq!(results[0].row, None, "a conflict without a row: the delete won");

    let (catch_up, _) = a.until_up_to_date().await;
    rep_a.apply_deltas(&catch_up);
    rep_a.apply_result(&del, &results[0]);
    let live = deltas_until(&mut b, u, d).await;
    assert_eq!(live.len(), 1);
    assert_eq!((live[0].op, live[0].seq, live[0].origin.as_deref(), live[0].row.as_ref()), (Op::Delete, d, Some("pos-a"), None));
    assert_eq!(live[0].old.as_ref(), Some(&before_delete), "a delete delta carries the whole old row");
    rep_b.apply_deltas(&live);

    assert!(db_row(&hub, "products", p).await.is_none(), "deleted in Postgres");
    assert!(rep_a.is_deleted("products", &pk), "deleted on A");
    assert!(rep_b.is_deleted("products", &pk), "deleted on B");
    assert_eq!(rep_a.version("products", &pk), Some(d));
    let (version, deleted, _) = row_version(&hub, "products", p).await.unwrap();
    assert_eq!((version as u64, deleted), (d, Some(json!([t_a, 7, "pos-a", d, "user-pos-a"]))));

    assert_eq!(conflict_count(&hub).await, 2);
    let rows = conflict_rows(&hub, del.change_id).await;
    assert_eq!(rows.len(), 2, "one record per field B wrote concurrently");
    for (row, (field, value)) in rows.iter().zip([("price_cents", json!(555)), ("stock", json!(1))]) {
        assert_conflict(
            row,
            json!({
                "tenant_id": TENANT, "table_name": "products", "pk": {"id": p}, "field": field,
                "base_version": v, "server_version": u, "server_value": value, "server_hlc": hlc(t_b, 0),
                "server_device": "pos-b", "server_user": "user-pos-b",
                "incoming_value": null, "incoming_hlc": hlc(t_a, 7), "incoming_device": "pos-a", "incoming_user": "user-pos-a",
                "winner": "incoming", "policy": "delete_wins", "change_id": del.change_id, "batch_id": batch_id, "seq": d,
                "review_status": "open", "reviewed_by": null, "reviewed_at": null,
            }),
        );
    }
    hub.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 3. client_wins
// ---------------------------------------------------------------------------------------------

/// With `client_wins` on products, the change that arrives last wins even with an older
/// clock, and the conflict is still recorded; orders keep `lww`; a delete still beats a
/// concurrent update.
#[actix_web::test]
async fn client_wins_policy_takes_the_last_arriving_change() {
    let hub = TestHub::start_with(|c| {
        for t in c.tables.iter_mut().filter(|t| t.name == "products") {
            t.policy = synchub::config::MergePolicy::ClientWins;
        }
    })
    .await;
    let policy: String =
        sqlx::query_scalar("select policy from synchub.synced_tables where table_name = 'products'").fetch_one(&hub.db).await.unwrap();
    assert_eq!(policy, "client_wins");

    let (mut a, epoch, _) = Client::device(&hub, TENANT, "pos-a").await;
    let mut rep_a = Replica::default();
    let p = Uuid::new_v4();
    let o = Uuid::new_v4();
    let gone = Uuid::new_v4();
    let t0 = now_ms() - 100_000;
    let seed = vec![
        upsert("products", json!({"id": p}), product_fields(p, "Mocha", 400, 2), 1, t0, 0),
        upsert("orders", json!({"id": o}), json!({"store_id": "s1", "total_cents": 800}), 2, t0, 0),
        upsert("products", json!({"id": gone}), product_fields(gone, "Old", 100, 0), 3, t0, 0),
    ];
    let r = push_batch(&mut a, Uuid::now_v7(), &seed).await;
    let (vp, vo, vg) = (r[0].seq.unwrap(), r[1].seq.unwrap(), r[2].seq.unwrap());

    // B saw these versions, then went offline.
    let (mut b, _, _) = Client::device(&hub, TENANT, "pos-b").await;
    b.ws.close(None).await.unwrap();
    drop(b);

    let t_a = now_ms();
    let a_changes = vec![
        with_clock(upsert("products", json!({"id": p}), json!({"price_cents": 450}), 4, 0, vp), t_a, 0),
        with_clock(upsert("orders", json!({"id": o}), json!({"total_cents": 1000}), 5, 0, vo), t_a, 0),
        with_clock(delete("products", json!({"id": gone}), 6, 0, vg), t_a, 0),
    ];
    let r = push_batch(&mut a, Uuid::now_v7(), &a_changes).await;
    assert!(r.iter().all(|x| x.status == ChangeStatus::Applied), "{r:?}");
    let (sp, so, sd) = (r[0].seq.unwrap(), r[1].seq.unwrap(), r[2].seq.unwrap());

    let (mut b, _, _) = connect(&hub, "pos-b", pos(&epoch, vg)).await;
    let t_b = t_a - 60_000; // older than A's clock
    let batch = vec![
        with_clock(upsert("products", json!({"id": p}), json!({"price_cents": 300}), 1, 0, vp), t_b, 0),
        with_clock(upsert("orders", json!({"id": o}), json!({"total_cents": 900}), 2, 0, vo), t_b, 0),
        with_clock(upsert("products", json!({"id": gone}), json!({"stock": 5}), 3, 0, vg), t_b, 0),
    ];
    let batch_id = Uuid::now_v7();
    let results = push_batch(&mut b, batch_id, &batch).await;
    let head = sd;

    // products (client_wins): B's older price wins because it arrived last.
    assert_eq!(results[0].status, ChangeStatus::Conflict);
    assert_eq!(results[0].seq, Some(head + 1));
    assert!(results[0].lost_fields.is_empty());
    assert_eq!(results[0].row.as_ref().unwrap()["price_cents"], json!(300));
    // orders (lww): B's older total loses.
    assert_eq!(results[1].status, ChangeStatus::Conflict);
    assert_eq!(results[1].seq, None);
    assert_eq!(results[1].lost_fields, vec!["total_cents".to_string()]);
    assert_eq!(results[1].row.as_ref().unwrap()["total_cents"], json!(1000));
    // A delete beats a concurrent update whatever the policy.
    assert_eq!((results[2].status, results[2].seq, results[2].row.as_ref()), (ChangeStatus::Conflict, None, None));
    assert_eq!(results[2].lost_fields, vec!["stock".to_string()]);

    assert_eq!(db_row(&hub, "products", p).await.unwrap()["price_cents"], json!(300));
    assert_eq!(db_row(&hub, "orders", o).await.unwrap()["total_cents"], json!(1000));
    assert!(db_row(&hub, "products", gone).await.is_none());
    let live = deltas_until(&mut a, head, head + 1).await;
    rep_a.apply_deltas(&live);
    assert_eq!(rep_a.row("products", &json!({"id": p})), db_row(&hub, "products", p).await.as_ref(), "A has B's price");
    let (_, _, clocks) = row_version(&hub, "products", p).await.unwrap();
    assert_eq!(clocks["price_cents"], json!([t_b, 0, "pos-b", head + 1, "user-pos-b"]));

    assert_eq!(conflict_count(&hub).await, 3);
    let common = |change: &Change, table: &str, id: Uuid, field: &str| {
        json!({
            "tenant_id": TENANT, "table_name": table, "pk": {"id": id}, "field": field,
            "base_version": change.base_version, "incoming_hlc": hlc(t_b, 0), "incoming_device": "pos-b", "incoming_user": "user-pos-b",
            "server_hlc": hlc(t_a, 0), "server_device": "pos-a", "server_user": "user-pos-a",
            "change_id": change.change_id, "batch_id": batch_id,
            "review_status": "open", "reviewed_by": null, "reviewed_at": null,
        })
    };
    let merge = |mut base: Value, extra: Value| {
        base.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        base
    };
    let c = conflict_rows(&hub, batch[0].change_id).await;
    assert_eq!(c.len(), 1);
    assert_conflict(
        &c[0],
        merge(
            common(&batch[0], "products", p, "price_cents"),
            json!({"server_version": sp, "server_value": 450, "incoming_value": 300, "winner": "incoming", "policy": "client_wins", "seq": head + 1}),
        ),
    );
    let c = conflict_rows(&hub, batch[1].change_id).await;
    assert_eq!(c.len(), 1);
    assert_conflict(
        &c[0],
        merge(
            common(&batch[1], "orders", o, "total_cents"),
            json!({"server_version": so, "server_value": 1000, "incoming_value": 900, "winner": "server", "policy": "lww", "seq": null}),
        ),
    );
    let c = conflict_rows(&hub, batch[2].change_id).await;
    assert_eq!(c.len(), 1);
    assert_conflict(
        &c[0],
        merge(
            common(&batch[2], "products", gone, "stock"),
            json!({"server_version": sd, "server_value": null, "incoming_value": 5, "winner": "server", "policy": "delete_wins", "seq": null}),
        ),
    );
    let _ = b.until_up_to_date().await;
    hub.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Exactly once after a dropped connection
// ---------------------------------------------------------------------------------------------

fn writer_batch(first_seq: u64, n: u64, wall: u64) -> (Vec<Change>, Vec<(String, Uuid)>) {
    let mut changes = Vec::new();
    let mut rows = Vec::new();
    for i in 0..n {
        let id = Uuid::new_v4();
        let seq = first_seq + i;
        let (table, fields) = if i % 3 == 2 {
            ("customers", json!({"name": format!("Customer {seq}"), "loyalty_points": seq}))
        } else {
            ("products", product_fields(id, &format!("Item {seq}"), 100 + seq as i64, seq as i64))
        };
        changes.push(with_clock(upsert(table, json!({"id": id}), fields, seq, 0, 0), wall, i as u32));
        rows.push((table.to_string(), id));
    }
    (changes, rows)
}

async fn wait_for_cursor(hub: &TestHub, device: &str, want: i64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while cursor(hub, device).await != Some(want) {
        assert!(tokio::time::Instant::now() < deadline, "cursor of {device} never reached {want}: {:?}", cursor(hub, device).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A batch re-sent after the connection dropped (before or after its ack was read) is acked
/// `duplicate` with the original seqs and applied once: in the tables, in the log, in the
/// cursor, and in what another device receives.
#[actix_web::test]
async fn resent_batch_after_dropped_connection_is_applied_once() {
    let hub = TestHub::start().await;
    let (mut reader, epoch, _) = Client::device(&hub, TENANT, "pos-r").await;
    let (mut w, _, _) = Client::device(&hub, TENANT, "pos-w").await;
    let wall = now_ms();

    // (a) The ack is never read: the socket drops once the batch is committed.
    let (batch1, rows1) = writer_batch(1, 20, wall);
    let batch1_id = Uuid::now_v7();
    send_push(&mut w, batch1_id, &batch1).await;
    wait_for_cursor(&hub, "pos-w", 20).await;
    drop(w); // no close handshake, the ack unread
    let mut original: HashMap<Uuid, u64> = HashMap::new();
    for ch in &batch1 {
        let seq = log_seq_of(&hub, ch.change_id).await.expect("committed") as u64;
        original.insert(ch.change_id, seq);
    }
    let seqs1: Vec<u64> = batch1.iter().map(|c| original[&c.change_id]).collect();
    assert_eq!(seqs1, (1..=20).collect::<Vec<_>>(), "committed in batch order at seqs 1..=20");

    let (mut w, _, head) = connect(&hub, "pos-w", pos(&epoch, 0)).await;
    assert_eq!(head, 20);
    let results = push_batch(&mut w, batch1_id, &batch1).await;
    for (ch, r) in batch1.iter().zip(&results) {
        assert_eq!(r.status, ChangeStatus::Duplicate, "{r:?}");
        assert_eq!(r.seq, Some(original[&ch.change_id]), "duplicate carries the original seq");
        assert_eq!((r.row.as_ref(), r.reason, r.lost_fields.len()), (None, None, 0));
    }
    let (caught, _) = w.until_up_to_date().await;
    assert_eq!(caught.len(), 20, "the writer's catch-up holds its own changes once");
    assert_eq!(cursor(&hub, "pos-w").await, Some(20));

    // (b) The ack is read, then the connection drops and the batch is re-sent anyway.
    let (batch2, rows2) = writer_batch(21, 20, wall + 1);
    let batch2_id = Uuid::now_v7();
    let first = push_batch(&mut w, batch2_id, &batch2).await;
    assert!(first.iter().all(|r| r.status == ChangeStatus::Applied));
    let seqs2: Vec<u64> = first.iter().map(|r| r.seq.unwrap()).collect();
    assert_eq!(seqs2, (21..=40).collect::<Vec<_>>());
    drop(w);
    let (mut w, _, _) = connect(&hub, "pos-w", pos(&epoch, 40)).await;
    let again = push_batch(&mut w, batch2_id, &batch2).await;
    for (r, s) in again.iter().zip(&seqs2) {
        assert_eq!((r.status, r.seq), (ChangeStatus::Duplicate, Some(*s)));
    }

    // (c) Retry rule: the re-sent tail of batch 2 with new changes behind it.
    let (new, rows3) = writer_batch(41, 5, wall + 2);
    let mut mixed: Vec<Change> = batch2[10..].to_vec();
    mixed.extend(new.iter().cloned());
    let mixed_results = push_batch(&mut w, Uuid::now_v7(), &mixed).await;
    for (i, r) in mixed_results.iter().enumerate() {
        if i < 10 {
            assert_eq!((r.status, r.seq), (ChangeStatus::Duplicate, Some(seqs2[10 + i])));
        } else {
            assert_eq!((r.status, r.seq), (ChangeStatus::Applied, Some(41 + (i as u64 - 10))));
        }
    }
    assert_eq!(cursor(&hub, "pos-w").await, Some(45));

    // (d) The same batch sent twice on one socket without waiting: the second copy is all
    // duplicates of the first, whether or not both were committed in one group.
    let (batch4, rows4) = writer_batch(46, 5, wall + 3);
    let batch4_id = Uuid::now_v7();
    let id1 = send_push(&mut w, batch4_id, &batch4).await;
    let id2 = send_push(&mut w, batch4_id, &batch4).await;
    let first = ack_of(&mut w, id1, batch4_id).await;
    let second = ack_of(&mut w, id2, batch4_id).await;
    assert_eq!(
        first.iter().map(|r| (r.status, r.seq)).collect::<Vec<_>>(),
        (46..=50).map(|s| (ChangeStatus::Applied, Some(s))).collect::<Vec<_>>()
    );
    assert_eq!(
        second.iter().map(|r| (r.status, r.seq)).collect::<Vec<_>>(),
        (46..=50).map(|s| (ChangeStatus::Duplicate, Some(s))).collect::<Vec<_>>()
    );

    // (e) The socket drops right after the send: the hub may or may not have taken the batch.
    // Either way the re-sent batch ends up committed once, at the same seqs.
    let (batch5, rows5) = writer_batch(51, 5, wall + 4);
    let batch5_id = Uuid::now_v7();
    send_push(&mut w, batch5_id, &batch5).await;
    drop(w);
    let (mut w, _, _) = connect(&hub, "pos-w", pos(&epoch, 50)).await;
    let results = push_batch(&mut w, batch5_id, &batch5).await;
    let status = results[0].status;
    assert!(matches!(status, ChangeStatus::Applied | ChangeStatus::Duplicate), "{results:?}");
    assert_eq!(results.iter().map(|r| (r.status, r.seq)).collect::<Vec<_>>(), (51..=55).map(|s| (status, Some(s))).collect::<Vec<_>>());
    assert_eq!(cursor(&hub, "pos-w").await, Some(55));

    // Each change exactly once in the log, in its table and in the row versions.
    let (n, distinct_ids, distinct_seqs, max_seq): (i64, i64, i64, Option<i64>) = sqlx::query_as(
        "select count(*), count(distinct change_id), count(distinct device_seq), max(device_seq) from synchub.change_log \
         where tenant_id = $1 and origin_device = 'pos-w'",
    )
    .bind(TENANT)
    .fetch_one(&hub.db)
    .await
    .unwrap();
    assert_eq!((n, distinct_ids, distinct_seqs, max_seq), (55, 55, 55, Some(55)));
    assert_eq!(head_seq(&hub).await, 55);
    let all_rows: Vec<(String, Uuid)> = rows1.iter().chain(&rows2).chain(&rows3).chain(&rows4).chain(&rows5).cloned().collect();
    let all_changes: Vec<&Change> = batch1.iter().chain(&batch2).chain(&new).chain(&batch4).chain(&batch5).collect();
    for ((table, id), ch) in all_rows.iter().zip(&all_changes) {
        assert!(db_row(&hub, table, *id).await.is_some(), "{table} {id} exists");
        let (version, _, _) = row_version(&hub, table, *id).await.unwrap();
        assert_eq!(version as u64, ch.device_seq, "row {id} written once, at its original seq");
        assert_eq!(log_seq_of(&hub, ch.change_id).await, Some(ch.device_seq as i64));
    }
    let products: i64 = sqlx::query_scalar("select count(*) from products").fetch_one(&hub.db).await.unwrap();
    let customers: i64 = sqlx::query_scalar("select count(*) from customers").fetch_one(&hub.db).await.unwrap();
    assert_eq!((products, customers), (40, 15));

    // The other device received every change exactly once, in order.
    let got = deltas_until(&mut reader, 0, 55).await;
    assert_eq!(got.iter().map(|d| d.seq).collect::<Vec<_>>(), (1..=55).collect::<Vec<_>>());
    assert_eq!(got.iter().map(|d| d.change_id.unwrap()).collect::<Vec<_>>(), all_changes.iter().map(|c| c.change_id).collect::<Vec<_>>());
    assert_quiet(&mut reader, "reader after the re-sends").await;

    // Once the originals are trimmed from the log, a re-send is still a duplicate, without seq.
    sqlx::query("select synchub.trim_log($1, 20)").bind(TENANT).execute(&hub.db).await.unwrap();
    let late = push_batch(&mut w, batch1_id, &batch1).await;
    assert!(late.iter().all(|r| r.status == ChangeStatus::Duplicate && r.seq.is_none()), "{late:?}");
    let tail = push_batch(&mut w, batch2_id, &batch2).await;
    assert_eq!(tail.iter().map(|r| r.seq).collect::<Vec<_>>(), seqs2.iter().map(|s| Some(*s)).collect::<Vec<_>>());
    assert_eq!(head_seq(&hub).await, 55);
    assert_eq!(cursor(&hub, "pos-w").await, Some(55));
    assert_quiet(&mut reader, "reader after the late re-sends").await;
    hub.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Seq gaps and changes rejected for good
// ---------------------------------------------------------------------------------------------

/// A batch that skips device_seqs is refused change by change with `seq_gap` and moves
/// nothing; re-sent from the cursor it is applied. Batches whose device_seqs are not
/// consecutive are refused whole.
#[actix_web::test]
async fn seq_gap_is_refused_and_resend_from_cursor_succeeds() {
    let hub = TestHub::start().await;
    let (mut reader, _, _) = Client::device(&hub, TENANT, "pos-r").await;
    let (mut d, _, _) = Client::device(&hub, TENANT, "pos-d").await;
    let wall = now_ms();
    let (all, rows) = writer_batch(1, 8, wall);

    let r = push_batch(&mut d, Uuid::now_v7(), &all[0..3]).await;
    assert_eq!(
        r.iter().map(|x| (x.status, x.seq)).collect::<Vec<_>>(),
        (1..=3).map(|s| (ChangeStatus::Applied, Some(s))).collect::<Vec<_>>()
    );
    assert_eq!(deltas_until(&mut reader, 0, 3).await.len(), 3);

    // 6..8 while the cursor is at 3.
    let r = push_batch(&mut d, Uuid::now_v7(), &all[5..8]).await;
    for x in &r {
        assert_eq!((x.status, x.reason, x.seq), (ChangeStatus::Rejected, Some(ErrorCode::SeqGap), None));
        assert!(x.message.as_deref().unwrap_or("").contains("expected device_seq 4"), "{:?}", x.message);
    }
    assert_eq!(cursor(&hub, "pos-d").await, Some(3), "seq_gap does not move the cursor");
    assert_eq!(head_seq(&hub).await, 3);
    for (table, id) in &rows[5..8] {
        assert!(db_row(&hub, table, *id).await.is_none());
    }
    assert_quiet(&mut reader, "reader after the refused batch").await;

    // Not consecutive, or out of order, or numbered from 0: the whole batch is refused.
    let skipping = vec![all[3].clone(), all[5].clone()];
    assert_eq!(push_refused(&mut d, &skipping).await, (ErrorCode::InvalidBatch, false));
    let backwards = vec![all[4].clone(), all[3].clone()];
    assert_eq!(push_refused(&mut d, &backwards).await, (ErrorCode::InvalidBatch, false));
    let zero = upsert("customers", json!({"id": Uuid::new_v4()}), json!({"name": "Zero"}), 0, wall, 0);
    assert_eq!(push_refused(&mut d, &[zero]).await, (ErrorCode::InvalidBatch, false));
    assert_eq!(cursor(&hub, "pos-d").await, Some(3));
    assert_eq!(head_seq(&hub).await, 3);
    assert!(db_row(&hub, &rows[3].0, rows[3].1).await.is_none(), "nothing of a refused batch applied");

    // Re-sent from the cursor: 4..8 (6..8 are the same changes as before).
    let r = push_batch(&mut d, Uuid::now_v7(), &all[3..8]).await;
    assert_eq!(
        r.iter().map(|x| (x.status, x.seq)).collect::<Vec<_>>(),
        (4..=8).map(|s| (ChangeStatus::Applied, Some(s))).collect::<Vec<_>>()
    );
    assert_eq!(cursor(&hub, "pos-d").await, Some(8));
    for (table, id) in &rows {
        assert!(db_row(&hub, table, *id).await.is_some());
    }
    let got = deltas_until(&mut reader, 3, 8).await;
    assert_eq!(got.iter().map(|x| x.change_id.unwrap()).collect::<Vec<_>>(), all[3..8].iter().map(|c| c.change_id).collect::<Vec<_>>());
    hub.shutdown().await;
}

/// Changes rejected for good in the middle of a batch (a value of the wrong type, a value a
/// check constraint refuses) advance the cursor; the rest of the batch is applied, and nothing
/// of the bad changes is written anywhere.
#[actix_web::test]
async fn invalid_value_mid_batch_advances_cursor_and_leaves_no_trace() {
    let hub = TestHub::start().await;
    let (mut reader, _, _) = Client::device(&hub, TENANT, "pos-r").await;
    let (mut d, _, _) = Client::device(&hub, TENANT, "pos-d").await;
    let t0 = now_ms() - 1_000;
    let p1 = Uuid::new_v4();
    let p2 = Uuid::new_v4();
    let seed = vec![
        upsert("products", json!({"id": p1}), product_fields(p1, "One", 100, 1), 1, t0, 0),
        upsert("products", json!({"id": p2}), product_fields(p2, "Two", 200, 2), 2, t0, 0),
    ];
    let r = push_batch(&mut d, Uuid::now_v7(), &seed).await;
    let (v1, v2) = (r[0].seq.unwrap(), r[1].seq.unwrap());
    assert_eq!(deltas_until(&mut reader, 0, v2).await.len(), 2);
    let p2_before = db_row(&hub, "products", p2).await.unwrap();
    let p2_versions_before = row_version(&hub, "products", p2).await.unwrap();

    let p3 = Uuid::new_v4();
    let p4 = Uuid::new_v4();
    let c5 = Uuid::new_v4();
    let t = now_ms();
    let batch = vec![
        upsert("products", json!({"id": p1}), json!({"stock": 50}), 3, t, v1),
        // Two fields, one of the wrong type: neither may be written.
        upsert("products", json!({"id": p2}), json!({"name": "Half applied?", "price_cents": "abc"}), 4, t, v2),
        upsert("products", json!({"id": p3}), product_fields(p3, "Three", 300, 3), 5, t, 0),
        upsert("products", json!({"id": p2}), json!({"stock": 9}), 6, t, v2),
        // Refused by the table's check constraint.
        upsert("products", json!({"id": p4}), product_fields(p4, "Negative", -5, 0), 7, t, 0),
        upsert("customers", json!({"id": c5}), json!({"name": "Cy"}), 8, t, 0),
    ];
    let batch_id = Uuid::now_v7();
    let r = push_batch(&mut d, batch_id, &batch).await;
    let head = v2;
    let expect = [
        (ChangeStatus::Applied, Some(head + 1), None),
        (ChangeStatus::Rejected, None, Some(ErrorCode::InvalidValue)),
        (ChangeStatus::Applied, Some(head + 2), None),
        (ChangeStatus::Applied, Some(head + 3), None),
        (ChangeStatus::Rejected, None, Some(ErrorCode::InvalidValue)),
        (ChangeStatus::Applied, Some(head + 4), None),
    ];
    assert_eq!(r.iter().map(|x| (x.status, x.seq, x.reason)).collect::<Vec<_>>(), expect.to_vec());
    assert!(r[1].message.is_some() && r[4].message.is_some(), "rejections say why");
    assert_eq!(cursor(&hub, "pos-d").await, Some(8), "rejected changes advance the cursor");
    assert_eq!(head_seq(&hub).await as u64, head + 4, "no seq for the rejected changes, no hole in the log");

    // Nothing of the bad changes anywhere.
    let p2_after = db_row(&hub, "products", p2).await.unwrap();
    assert_eq!(p2_after["name"], p2_before["name"]);
    assert_eq!(p2_after["price_cents"], p2_before["price_cents"]);
    assert_eq!(p2_after["stock"], json!(9), "the later change to the same row was applied");
    let mut expected_p2 = p2_before.clone();
    expected_p2.insert("stock".into(), json!(9));
    assert_eq!(p2_after, expected_p2);
    let (version, _, clocks) = row_version(&hub, "products", p2).await.unwrap();
    assert_eq!(version as u64, head + 3);
    assert_eq!(clocks["name"], p2_versions_before.2["name"], "name's clock untouched");
    assert_eq!(clocks["price_cents"], p2_versions_before.2["price_cents"], "price's clock untouched");
    assert_eq!(clocks["stock"], json!([t, 0, "pos-d", head + 3, "user-pos-d"]));
    assert!(db_row(&hub, "products", p4).await.is_none());
    assert!(row_version(&hub, "products", p4).await.is_none());
    assert_eq!(log_seq_of(&hub, batch[1].change_id).await, None);
    assert_eq!(log_seq_of(&hub, batch[4].change_id).await, None);
    assert_eq!(conflict_count(&hub).await, 0);
    assert_eq!(db_row(&hub, "products", p1).await.unwrap()["stock"], json!(50));
    assert!(db_row(&hub, "products", p3).await.is_some());
    assert!(db_row(&hub, "customers", c5).await.is_some());

    let got = deltas_until(&mut reader, head, head + 4).await;
    assert_eq!(
        got.iter().map(|x| (x.seq, x.change_id.unwrap())).collect::<Vec<_>>(),
        vec![
            (head + 1, batch[0].change_id),
            (head + 2, batch[2].change_id),
            (head + 3, batch[3].change_id),
            (head + 4, batch[5].change_id)
        ]
    );
    assert_eq!(got[2].old.as_ref().unwrap(), json!({"stock": 2}).as_object().unwrap());
    assert_quiet(&mut reader, "reader after the batch").await;

    // Re-sending: the rejected change is a duplicate with no seq (it never entered the log).
    let r = push_batch(&mut d, batch_id, &batch[4..]).await;
    assert_eq!(
        r.iter().map(|x| (x.status, x.seq)).collect::<Vec<_>>(),
        vec![(ChangeStatus::Duplicate, None), (ChangeStatus::Duplicate, Some(head + 4))]
    );
    assert!(db_row(&hub, "products", p4).await.is_none());
    hub.shutdown().await;
}

/// A value holding U+0000 is `invalid_value` up front, also when it would lose the merge: a
/// losing value is never written to its row, but its conflict record is, and Postgres refusing
/// that would fail the whole group on every retry.
#[actix_web::test]
async fn a_nul_character_is_rejected_even_in_a_losing_value() {
    let hub = TestHub::start().await;
    let (mut a, _, _) = Client::device(&hub, TENANT, "pos-a").await;
    let (mut b, _, _) = Client::device(&hub, TENANT, "pos-b").await;
    let t = now_ms();
    let (p1, p2) = (Uuid::new_v4(), Uuid::new_v4());
    let r = push_batch(&mut a, Uuid::now_v7(), &[upsert("products", json!({"id": p1}), product_fields(p1, "One", 100, 1), 1, t, 0)]).await;
    assert_eq!(r[0].status, ChangeStatus::Applied);
    // Older clock and a stale base: the name would lose to pos-a's and be logged as a conflict.
    let batch = vec![
        upsert("products", json!({"id": p1}), json!({"name": "late\u{0}name"}), 1, t - 10_000, 0),
        upsert("products", json!({"id": p2}), product_fields(p2, "Two", 200, 2), 2, t, 0),
    ];
    let r = push_batch(&mut b, Uuid::now_v7(), &batch).await;
    assert_eq!(
        r.iter().map(|x| (x.status, x.reason)).collect::<Vec<_>>(),
        vec![(ChangeStatus::Rejected, Some(ErrorCode::InvalidValue)), (ChangeStatus::Applied, None)]
    );
    assert!(r[0].message.as_deref().is_some_and(|m| m.contains("U+0000")), "{:?}", r[0].message);
    assert_eq!(db_row(&hub, "products", p1).await.unwrap()["name"], json!("One"));
    assert!(db_row(&hub, "products", p2).await.is_some());
    assert_eq!(conflict_count(&hub).await, 0);
    assert_eq!(cursor(&hub, "pos-b").await, Some(2));
    hub.shutdown().await;
}

/// The cursor check comes first, whatever else is wrong with a change: a retried change whose
/// key does not fit its column is a duplicate, and one after a gap is `seq_gap`; only a new
/// change in order is rejected for its key. The group reads the cursors with the rows, so this
/// also covers the read that fails on a key and is redone key by key.
#[actix_web::test]
async fn the_cursor_check_comes_before_a_key_that_does_not_fit() {
    let hub = TestHub::start().await;
    let (mut d, _, _) = Client::device(&hub, TENANT, "pos-d").await;
    let t = now_ms();
    let (p1, p2, p3) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let first = vec![
        upsert("products", json!({"id": p1}), product_fields(p1, "One", 100, 1), 1, t, 0),
        upsert("products", json!({"id": "not-a-uuid"}), product_fields(p2, "Bad key", 100, 1), 2, t, 0),
    ];
    let r = push_batch(&mut d, Uuid::now_v7(), &first).await;
    let status = |r: &[ChangeResult]| r.iter().map(|x| (x.status, x.seq, x.reason)).collect::<Vec<_>>();
    assert_eq!(status(&r), vec![(ChangeStatus::Applied, Some(1), None), (ChangeStatus::Rejected, None, Some(ErrorCode::InvalidValue))]);
    assert_eq!(cursor(&hub, "pos-d").await, Some(2));

    // Retried with two new changes: the bad key of a change already seen is a duplicate.
    let mut retried = first.clone();
    retried.push(upsert("products", json!({"id": p2}), product_fields(p2, "Two", 200, 2), 3, t, 0));
    retried.push(upsert("products", json!({"id": "still-not-a-uuid"}), product_fields(p3, "Bad key", 100, 1), 4, t, 0));
    let r = push_batch(&mut d, Uuid::now_v7(), &retried).await;
    assert_eq!(
        status(&r),
        vec![
            (ChangeStatus::Duplicate, Some(1), None),
            (ChangeStatus::Duplicate, None, None),
            (ChangeStatus::Applied, Some(2), None),
            (ChangeStatus::Rejected, None, Some(ErrorCode::InvalidValue)),
        ]
    );
    assert_eq!(cursor(&hub, "pos-d").await, Some(4));

    // After a gap: `seq_gap` for the bad key and the good one alike, nothing written.
    let gapped = vec![
        upsert("products", json!({"id": "not-a-uuid-either"}), product_fields(p3, "Bad key", 100, 1), 6, t, 0),
        upsert("products", json!({"id": p3}), product_fields(p3, "Three", 300, 3), 7, t, 0),
    ];
    let r = push_batch(&mut d, Uuid::now_v7(), &gapped).await;
    assert_eq!(status(&r), vec![(ChangeStatus::Rejected, None, Some(ErrorCode::SeqGap)); 2]);
    assert_eq!(cursor(&hub, "pos-d").await, Some(4));
    assert_eq!(head_seq(&hub).await, 2);
    assert!(db_row(&hub, "products", p3).await.is_none());
    hub.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Catch-up while another device keeps writing
// ---------------------------------------------------------------------------------------------

/// What one reader saw of the stream.
#[derive(Default)]
struct Stream {
    seqs: Vec<u64>,
    change_ids: Vec<Uuid>,
    pages: usize,
    live_frames: usize,
    caught_up_at: u64,
    /// Seqs delivered by catch-up pages that were committed after `welcome`.
    caught_after_welcome: usize,
}

/// Read a reader's stream from `from` until it covers `done` (set by the writer when it
/// stops), checking frame by frame that seqs continue without gap or repeat.
async fn read_stream(
    mut c: Client,
    from: u64,
    welcome_head: u64,
    page_limit: usize,
    live_readers: Rc<Cell<usize>>,
    done: Rc<Cell<Option<u64>>>,
) -> (Client, Stream, Replica) {
    let mut s = Stream::default();
    let mut rep = Replica::default();
    let mut position = from;
    let mut live = false;
    loop {
        if let Some(head) = done.get() {
            if live && position >= head {
                assert_eq!(position, head, "reader went past the head");
                break;
            }
        }
        let Some(frame) = c.recv_timeout(Duration::from_millis(200)).await else {
            assert!(c.closed.is_none(), "reader socket closed: {:?}", c.closed);
            continue;
        };
        let deltas = match frame {
            ServerFrame::CatchUp { deltas, seq, head_seq } => {
                assert!(!live, "catch_up after up_to_date");
                assert!(!deltas.is_empty() && deltas.len() <= page_limit, "page of {} deltas", deltas.len());
                assert_eq!(deltas.last().unwrap().seq, seq, "page seq is its last delta's");
                assert!(head_seq >= seq);
                s.pages += 1;
                s.caught_after_welcome += deltas.iter().filter(|d| d.seq > welcome_head).count();
                deltas
            }
            ServerFrame::UpToDate { seq } => {
                assert!(!live, "second up_to_date");
                assert_eq!(seq, position, "up_to_date at the last page's seq");
                live = true;
                s.caught_up_at = seq;
                live_readers.set(live_readers.get() + 1);
                continue;
            }
            ServerFrame::Delta { deltas, seq } => {
                assert!(live, "live delta before up_to_date");
                assert_eq!(deltas.last().map(|d| d.seq), Some(seq), "a reader with no own changes gets every seq");
                s.live_frames += 1;
                deltas
            }
            other => panic!("unexpected frame {other:?}"),
        };
        for d in deltas {
            assert_eq!(d.seq, position + 1, "gap or repeat: got seq {} after {position}", d.seq);
            position = d.seq;
            s.seqs.push(d.seq);
            s.change_ids.push(d.change_id.expect("device change"));
            rep.apply_delta(&d);
        }
    }
    (c, s, rep)
}

/// A reader catching up from position 0 (and another from the middle of the log), in pages of
/// 7, while a writer keeps pushing: each receives every seq up to the final head exactly once,
/// in order, across catch-up pages and live frames, and ends with the rows Postgres holds.
#[actix_web::test]
async fn catch_up_while_another_device_keeps_writing() {
    const PAGE: u32 = 7;
    // A small outbound budget makes catch-up pause until the reader reads (and answers pings),
    // so a reader that waits before reading is sure to see commits made during its catch-up.
    let hub = TestHub::start_with(|c| {
        c.catch_up_page_changes = PAGE;
        c.session_outbound_budget_bytes = 16 * 1024;
        c.ping_every_bytes = 1024;
    })
    .await;
    let (mut w, epoch, _) = Client::device(&hub, TENANT, "pos-w").await;

    // A few hundred existing changes: 60 products, then updates of them.
    let products: Vec<Uuid> = (0..60).map(|_| Uuid::new_v4()).collect();
    let mut versions: HashMap<Uuid, u64> = HashMap::new();
    let mut device_seq = 0u64;
    let mut committed: Vec<Uuid> = Vec::new();
    let next_change = move |versions: &HashMap<Uuid, u64>, i: usize, device_seq: &mut u64| {
        *device_seq += 1;
        let p = products[i % products.len()];
        match versions.get(&p) {
            None => upsert("products", json!({"id": p}), product_fields(p, &format!("P{i}"), 100 + i as i64, 0), *device_seq, now_ms(), 0),
            Some(v) => upsert("products", json!({"id": p}), json!({"stock": i, "price_cents": 200 + i}), *device_seq, now_ms(), *v),
        }
    };
    let mut i = 0;
    for _ in 0..6 {
        let batch: Vec<Change> = (0..50)
            .map(|_| {
                let c = next_change(&versions, i, &mut device_seq);
                i += 1;
                c
            })
            .collect();
        let results = push_batch(&mut w, Uuid::now_v7(), &batch).await;
        for (c, r) in batch.iter().zip(&results) {
            assert_eq!(r.status, ChangeStatus::Applied, "{r:?}");
            versions.insert(Uuid::parse_str(c.key["id"].as_str().unwrap()).unwrap(), r.seq.unwrap());
            committed.push(c.change_id);
        }
    }
    assert_eq!(head_seq(&hub).await, 300);

    // The writer keeps going until both readers are live, and a while after.
    let live_readers = Rc::new(Cell::new(0usize));
    let done: Rc<Cell<Option<u64>>> = Rc::new(Cell::new(None));
    let writer_ids: Rc<RefCell<Vec<Uuid>>> = Rc::new(RefCell::new(Vec::new()));
    let writer = {
        let live_readers = live_readers.clone();
        let done = done.clone();
        let writer_ids = writer_ids.clone();
        actix_web::rt::spawn(async move {
            let mut after_live = 0;
            let mut batches = 0;
            let mut head = 300;
            while after_live < 15 {
                let mut batch = Vec::new();
                for _ in 0..3 {
                    batch.push(next_change(&versions, i, &mut device_seq));
                    i += 1;
                }
                batch.push({
                    device_seq += 1;
                    upsert("customers", json!({"id": Uuid::new_v4()}), json!({"name": format!("C{device_seq}")}), device_seq, now_ms(), 0)
                });
                let results = push_batch(&mut w, Uuid::now_v7(), &batch).await;
                for (c, r) in batch.iter().zip(&results) {
                    assert_eq!(r.status, ChangeStatus::Applied, "{r:?}");
                    if c.table == "products" {
                        versions.insert(Uuid::parse_str(c.key["id"].as_str().unwrap()).unwrap(), r.seq.unwrap());
                    }
                    assert_eq!(r.seq, Some(head + 1));
                    head += 1;
                    writer_ids.borrow_mut().push(c.change_id);
                }
                batches += 1;
                if live_readers.get() == 2 {
                    after_live += 1;
                }
                assert!(batches < 2000, "readers never went live");
            }
            done.set(Some(head));
            (w, batches)
        })
    };

    let (r0, _, head0) = connect(&hub, "pos-r0", None).await;
    let (r1, _, head1) = connect(&hub, "pos-r1", pos(&epoch, 150)).await;
    let reader0 = async {
        // Reader 0 starts reading only once the writer has committed past its welcome head.
        while (head_seq(&hub).await as u64) <= head0 {
            actix_web::rt::time::sleep(Duration::from_millis(5)).await;
        }
        read_stream(r0, 0, head0, PAGE as usize, live_readers.clone(), done.clone()).await
    };
    let ((r0, s0, rep0), (r1, s1, rep1)) = futures_util::join!(
        reader0,
        read_stream(r1, 150, head1, PAGE as usize, live_readers.clone(), done.clone()),
    );
    let (_w, batches) = writer.await.unwrap();
    let head = done.get().unwrap();
    assert_eq!(head_seq(&hub).await as u64, head);
    eprintln!(
        "writer: {batches} batches, head {head}; reader 0: welcome at {head0}, {} pages ({} seqs committed after welcome), live at {}, {} live frames; \
         reader 1: welcome at {head1}, {} pages ({} after welcome), live at {}, {} live frames",
        s0.pages, s0.caught_after_welcome, s0.caught_up_at, s0.live_frames, s1.pages, s1.caught_after_welcome, s1.caught_up_at, s1.live_frames
    );

    let mut all_ids = committed.clone();
    all_ids.extend(writer_ids.borrow().iter().copied());
    assert_eq!(s0.seqs, (1..=head).collect::<Vec<_>>(), "reader 0 got every seq once, in order");
    assert_eq!(s0.change_ids, all_ids);
    assert_eq!(s1.seqs, (151..=head).collect::<Vec<_>>(), "reader 1 got every seq after 150 once, in order");
    assert_eq!(s1.change_ids, all_ids[150..].to_vec());
    assert!(s0.pages >= 300 / PAGE as usize, "catch-up came in pages of {PAGE}");
    assert!(s0.live_frames > 0 && s1.live_frames > 0, "both readers also received live frames");
    assert!(s0.caught_after_welcome > 0, "the writer committed while reader 0 was catching up (its pages went past its welcome head)");
    assert_eq!(s0.change_ids.iter().collect::<HashSet<_>>().len(), s0.change_ids.len());

    // Reader 0 saw everything: its rows are Postgres's.
    for table in ["products", "customers"] {
        assert_eq!(rep0.table(table), db_table(&hub, table).await, "{table} on reader 0");
    }
    // Reader 1 started at 150: the rows it holds are current.
    let db_products = db_table(&hub, "products").await;
    for (key, row) in rep1.table("products") {
        assert_eq!(Some(&row), db_products.get(&key), "product {key} on reader 1");
    }
    assert_eq!(rep1.table("customers"), db_table(&hub, "customers").await, "customers (all written after 150) on reader 1");
    let (mut r0, mut r1) = (r0, r1);
    assert_quiet(&mut r0, "reader 0 at the end").await;
    assert_quiet(&mut r1, "reader 1 at the end").await;
    hub.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// A device's own earlier writes (protocol §4: simply overwritten, never merged or conflict)
// ---------------------------------------------------------------------------------------------

/// Rows group commits merged into from `source` (`postgres` or `cache`), from `/metrics`.
async fn merge_rows_from(hub: &TestHub, source: &str) -> f64 {
    let text = reqwest::get(format!("http://{}/metrics", hub.addr)).await.expect("metrics").text().await.unwrap();
    let series = format!("synchub_merge_rows_total{{source=\"{source}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(series.as_str())).expect("the merge rows series").parse().unwrap()
}

/// The spec's `client_push_batch`: a device opens an order and pays it in one offline batch,
/// both changes made before it had seen the row (base_version 0). Both are `applied`.
#[actix_web::test]
async fn a_device_updating_its_own_new_row_in_one_batch_is_applied() {
    let hub = TestHub::start().await;
    let (mut a, _, _) = connect(&hub, "pos-a", None).await;
    let order = Uuid::new_v4();
    let t = now_ms();
    let batch = [
        with_clock(upsert("orders", json!({"id": order}), json!({"store_id": "s1", "status": "open", "total_cents": 710}), 1, 0, 0), t, 0),
        with_clock(upsert("orders", json!({"id": order}), json!({"status": "paid"}), 2, 0, 0), t + 9_000, 0),
    ];
    let r = push_batch(&mut a, Uuid::now_v7(), &batch).await;
    let statuses: Vec<_> = r.iter().map(|r| (r.status, r.row.is_some())).collect();
    assert_eq!(statuses, [(ChangeStatus::Applied, false), (ChangeStatus::Applied, false)], "{r:?}");
    let row = db_row(&hub, "orders", order).await.expect("the order");
    assert_eq!((row["status"].clone(), row["total_cents"].clone()), (json!("paid"), json!(710)));
    assert_eq!(conflict_count(&hub).await, 0);
    hub.shutdown().await;
}

/// The same across two batches of one device, the second made offline before the first's
/// ack (base_version 0), with the row found by the next group in the tenant's row cache and,
/// with the cache off, read back from Postgres with its field clocks.
#[actix_web::test]
async fn a_device_updating_its_own_row_in_a_later_batch_is_applied() {
    for cache_rows in [4096, 0] {
        let hub = TestHub::start_with(|c| c.row_cache_rows = cache_rows).await;
        let (mut a, _, _) = connect(&hub, "pos-a", None).await;
        let order = Uuid::new_v4();
        let t = now_ms();
        let open = with_clock(upsert("orders", json!({"id": order}), json!({"store_id": "s1", "status": "open", "total_cents": 710}), 1, 0, 0), t, 0);
        let r = push_batch(&mut a, Uuid::now_v7(), &[open]).await;
        assert_eq!(r[0].status, ChangeStatus::Applied);
        let paid = with_clock(upsert("orders", json!({"id": order}), json!({"status": "paid", "total_cents": 720}), 2, 0, 0), t + 1, 0);
        let r = push_batch(&mut a, Uuid::now_v7(), &[paid]).await;
        assert_eq!((r[0].status, r[0].row.as_ref(), r[0].lost_fields.len()), (ChangeStatus::Applied, None, 0), "row cache of {cache_rows} rows");
        let void = with_clock(upsert("orders", json!({"id": order}), json!({"status": "void"}), 3, 0, 0), t + 2, 0);
        let r = push_batch(&mut a, Uuid::now_v7(), &[void]).await;
        assert_eq!(r[0].status, ChangeStatus::Applied, "row cache of {cache_rows} rows");
        assert_eq!(db_row(&hub, "orders", order).await.expect("the order")["status"], json!("void"));
        let (read, from_cache) = (merge_rows_from(&hub, "postgres").await, merge_rows_from(&hub, "cache").await);
        assert_eq!((read, from_cache), if cache_rows > 0 { (1.0, 2.0) } else { (3.0, 0.0) }, "where the later groups found the row");
        assert_eq!(conflict_count(&hub).await, 0);
        hub.shutdown().await;
    }
}

/// Another device's write in between still counts: the same device's later changes (base 0)
/// are `merged` when the other device changed other fields, and `conflict` on the fields it
/// changed; in one batch, in a later batch from the row cache, and read back from Postgres.
#[actix_web::test]
async fn another_device_writing_in_between_still_merges_or_conflicts() {
    for cache_rows in [4096, 0] {
        let hub = TestHub::start_with(|c| c.row_cache_rows = cache_rows).await;
        let (mut a, _, _) = connect(&hub, "pos-a", None).await;
        let (mut b, _, _) = connect(&hub, "pos-b", None).await;
        let order = Uuid::new_v4();
        let t = now_ms();
        let open = with_clock(upsert("orders", json!({"id": order}), json!({"store_id": "s1", "status": "open", "total_cents": 710}), 1, 0, 0), t, 0);
        let r = push_batch(&mut a, Uuid::now_v7(), &[open]).await;
        assert_eq!(r[0].status, ChangeStatus::Applied);
        let seen = r[0].seq.expect("seq");

        // B, which had seen A's insert, sets the employee.
        let by_b = with_clock(upsert("orders", json!({"id": order}), json!({"employee_id": "emp-b"}), 1, 0, seen), t + 1, 0);
        assert_eq!(push_batch(&mut b, Uuid::now_v7(), &[by_b]).await[0].status, ChangeStatus::Applied);

        // A, offline since its insert (base 0), pays the order and then changes the employee.
        let batch = [
            with_clock(upsert("orders", json!({"id": order}), json!({"status": "paid"}), 2, 0, 0), t + 2, 0),
            with_clock(upsert("orders", json!({"id": order}), json!({"total_cents": 730}), 3, 0, 0), t + 3, 0),
        ];
        let r = push_batch(&mut a, Uuid::now_v7(), &batch).await;
        let statuses: Vec<_> = r.iter().map(|r| r.status).collect();
        assert_eq!(statuses, [ChangeStatus::Merged, ChangeStatus::Merged], "row cache of {cache_rows} rows: {r:?}");
        assert_eq!(r[1].row.as_ref().map(|row| row["employee_id"].clone()), Some(json!("emp-b")));

        let employee = with_clock(upsert("orders", json!({"id": order}), json!({"employee_id": "emp-a"}), 4, 0, 0), t + 4, 0);
        let r = push_batch(&mut a, Uuid::now_v7(), &[employee.clone()]).await;
        assert_eq!(r[0].status, ChangeStatus::Conflict, "row cache of {cache_rows} rows: {r:?}");
        assert_eq!(conflict_rows(&hub, employee.change_id).await.len(), 1);
        if cache_rows == 0 {
            assert_eq!(merge_rows_from(&hub, "cache").await, 0.0, "every group read the row and its clocks from Postgres");
        } else {
            assert!(merge_rows_from(&hub, "cache").await >= 2.0, "later groups merged into the row the earlier ones left");
        }
        hub.shutdown().await;
    }
}
