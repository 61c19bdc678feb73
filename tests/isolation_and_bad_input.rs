//! Tenant isolation (a device of one tenant never sees or touches another tenant's rows, even
//! with a forged tenant value or another tenant's key) and bad input: every documented error
//! and close code, exactly as protocol/README.md gives it; nothing of a refused batch or a
//! rejected change is written; the socket stays open after ordinary errors and is closed with
//! its code for abuse.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use protocol::{Change, ChangeResult, ChangeStatus, ClientFrame, Delta, Encoding, ErrorCode, ServerFrame, SnapshotRow};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

const TABLES: [&str; 4] = ["products", "customers", "orders", "order_lines"];
/// How long a device is watched to show that nothing arrives.
const QUIET: Duration = Duration::from_millis(700);

// ---------------------------------------------------------------------------------------------
// Helpers

/// An `error` frame, as received.
#[derive(Debug, PartialEq)]
struct Refusal {
    code: ErrorCode,
    id: Option<u64>,
    temporary: bool,
}

/// The very next frame must be an `error`; returns it (its message must not be empty).
async fn next_error(c: &mut Client) -> Refusal {
    match c.recv().await {
        ServerFrame::Error { code, id, temporary, message, .. } => {
            assert!(!message.is_empty(), "an error frame carries a message");
            Refusal { code, id, temporary }
        }
        other => panic!("expected an error frame, got {other:?}"),
    }
}

/// A permanent error with this code echoing this id.
fn refusal(code: ErrorCode, id: Option<u64>) -> Refusal {
    Refusal { code, id, temporary: false }
}

/// Prove the socket is open and answering: the very next frame after a ping is its pong.
async fn still_open(c: &mut Client) {
    let id = c.next_id();
    c.send(&ClientFrame::Ping { id }).await;
    match c.recv().await {
        ServerFrame::Pong { id: got } => assert_eq!(got, id),
        other => panic!("expected pong {id}, got {other:?}"),
    }
    assert!(c.closed.is_none());
}

/// Every frame until the socket closes, and the close code.
async fn frames_until_close(c: &mut Client) -> (Vec<ServerFrame>, u16) {
    let mut frames: Vec<ServerFrame> = c.inbox.drain(..).collect();
    let deadline = tokio::time::Instant::now() + WAIT;
    while c.closed.is_none() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.recv_timeout(left).await {
            Some(f) => frames.push(f),
            None => break,
        }
    }
    let code = c.closed.as_ref().map(|c| c.0).unwrap_or_else(|| panic!("socket did not close with a code; frames: {frames:?}"));
    (frames, code)
}

/// Nothing at all arrives for a while, and the socket stays open.
async fn receives_nothing(c: &mut Client, who: &str) {
    let got = c.recv_timeout(QUIET).await;
    assert!(got.is_none(), "{who} must receive nothing, got {got:?}");
    assert!(c.closed.is_none(), "{who}'s socket closed: {:?}", c.closed);
}

/// The next WebSocket message that is not a control frame, undecoded.
async fn next_message(c: &mut Client) -> Message {
    assert!(c.inbox.is_empty());
    loop {
        let msg = tokio::time::timeout(WAIT, c.ws.next()).await.expect("a message in time").expect("socket open").expect("readable");
        match msg {
            Message::Ping(_) | Message::Pong(_) => continue,
            other => return other,
        }
    }
}

/// Send a push with its own id; the reply (ack or error) is left to the caller.
async fn send_push(c: &mut Client, changes: Vec<Change>) -> u64 {
    let id = c.next_id();
    c.send(&ClientFrame::Push { id, batch_id: Uuid::now_v7(), changes }).await;
    id
}

/// Live deltas until one covering `seq` has arrived.
async fn deltas_through(c: &mut Client, seq: u64) -> Vec<Delta> {
    let mut seen = Vec::new();
    loop {
        let (deltas, upto) = c.next_deltas().await;
        seen.extend(deltas);
        if upto >= seq {
            return seen;
        }
    }
}

/// Every row of a table, paging with `next_after`.
async fn snapshot_all(c: &mut Client, table: &str) -> Vec<SnapshotRow> {
    let mut rows = Vec::new();
    let mut after = None;
    loop {
        let id = c.next_id();
        c.send(&ClientFrame::Snapshot { id, table: table.into(), after: after.take(), limit: None }).await;
        let (page, next) = c
            .expect(|f| match f {
                ServerFrame::SnapshotPage { id: got, table: t, rows, next_after, .. } if *got == id => {
                    assert_eq!(t, table);
                    Some((rows.clone(), next_after.clone()))
                }
                ServerFrame::Error { id: Some(got), code, message, .. } if *got == id => panic!("snapshot of {table} refused: {code:?} {message}"),
                _ => None,
            })
            .await;
        rows.extend(page);
        match next {
            Some(n) => after = Some(n),
            None => return rows,
        }
    }
}

async fn count(db: &sqlx::PgPool, sql: &str, tenant: &str) -> i64 {
    sqlx::query_scalar(sql).bind(tenant).fetch_one(db).await.unwrap()
}

/// How many rows a tenant has in the app tables and in each piece of the hub's state.
async fn footprint(db: &sqlx::PgPool, tenant: &str) -> Vec<(&'static str, i64)> {
    let mut out = Vec::new();
    for (name, sql) in [
        ("products", "select count(*) from products where tenant_id = $1"),
        ("customers", "select count(*) from customers where tenant_id = $1"),
        ("orders", "select count(*) from orders where tenant_id = $1"),
        ("order_lines", "select count(*) from order_lines where tenant_id = $1"),
        ("change_log", "select count(*) from synchub.change_log where tenant_id = $1"),
        ("row_versions", "select count(*) from synchub.row_versions where tenant_id = $1"),
        ("conflicts", "select count(*) from synchub.conflicts where tenant_id = $1"),
    ] {
        out.push((name, count(db, sql, tenant).await));
    }
    out
}

/// A row as Postgres holds it, or None.
async fn row_of(db: &sqlx::PgPool, table: &str, where_sql: &str, bind: Uuid) -> Option<Value> {
    sqlx::query_scalar(&format!("select to_jsonb(t) from {table} t where {where_sql}")).bind(bind).fetch_optional(db).await.unwrap()
}

async fn product_row(db: &sqlx::PgPool, id: Uuid) -> Option<Value> {
    row_of(db, "products", "id = $1", id).await
}

async fn cursor(db: &sqlx::PgPool, tenant: &str, device: &str) -> Option<i64> {
    sqlx::query_scalar("select last_device_seq from synchub.device_cursors where tenant_id = $1 and device_id = $2")
        .bind(tenant)
        .bind(device)
        .fetch_optional(db)
        .await
        .unwrap()
}

fn statuses(results: &[ChangeResult]) -> Vec<(ChangeStatus, Option<ErrorCode>)> {
    results.iter().map(|r| (r.status, r.reason)).collect()
}

/// A rejected result carries its reason and a message, and nothing of a committed change.
fn assert_rejected_shape(r: &ChangeResult) {
    assert_eq!(r.status, ChangeStatus::Rejected);
    assert!(r.reason.is_some(), "{r:?}");
    assert!(r.message.as_deref().is_some_and(|m| !m.is_empty()), "a rejection says why: {r:?}");
    assert!(r.seq.is_none() && r.row.is_none() && r.lost_fields.is_empty(), "a rejected change was not committed: {r:?}");
}

fn with_counter(mut change: Change, counter: u32) -> Change {
    change.hlc.counter = counter;
    change
}

fn order_line(order: Uuid, line: i64, product: Uuid, qty: i64) -> (Value, Value) {
    (json!({"order_id": order, "line_no": line}), json!({"product_id": product, "quantity": qty, "unit_price_cents": 420}))
}

// ---------------------------------------------------------------------------------------------
// 1. Tenant isolation

#[actix_web::test]
async fn a_tenant_never_sees_or_touches_another_tenants_rows() {
    let hub = TestHub::start().await;
    let (mut a1, _, _) = Client::device(&hub, "store-a", "pos-a1").await;
    let (mut a2, _, _) = Client::device(&hub, "store-a", "pos-a2").await;
    let (mut b1, _, _) = Client::device(&hub, "store-b", "pos-b1").await;
    let (mut b2, _, _) = Client::device(&hub, "store-b", "pos-b2").await;
    let t = now_ms();

    // A writes to every demo table, including a delete.
    let (pa, pa_gone, ca, oa) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let (line_key, line_fields) = order_line(oa, 1, pa, 1);
    let results = a1
        .push(vec![
            upsert("products", json!({"id": pa}), product(pa, "A's latte", 420), 1, t, 0),
            upsert("customers", json!({"id": ca}), json!({"name": "Alice", "email": "alice@a.example"}), 2, t, 0),
            upsert("orders", json!({"id": oa}), json!({"store_id": "a-1", "customer_id": ca, "total_cents": 420}), 3, t, 0),
            upsert("order_lines", line_key.clone(), line_fields, 4, t, 0),
            upsert("products", json!({"id": pa_gone}), product(pa_gone, "A's scone", 300), 5, t, 0),
            with_counter(delete("products", json!({"id": pa_gone}), 6, t, 0), 1),
        ])
        .await;
    assert_eq!(results.iter().map(|r| (r.status, r.seq)).collect::<Vec<_>>(), (1..=6).map(|s| (ChangeStatus::Applied, Some(s))).collect::<Vec<_>>());

    // Forged tenant values, in fields and in keys, on new rows, on A's own row (moving it to B)
    // and on a delete: each rejected tenant_mismatch. The tenant written out explicitly as A's
    // own is accepted.
    let (p_new, o_new) = (Uuid::now_v7(), Uuid::now_v7());
    let mut forged_fields = product(p_new, "Forged", 1);
    forged_fields["tenant_id"] = json!("store-b");
    let results = a1
        .push(vec![
            upsert("products", json!({"id": p_new}), forged_fields, 7, t + 1, 0),
            upsert("products", json!({"id": p_new, "tenant_id": "store-b"}), product(p_new, "Forged", 1), 8, t + 1, 0),
            upsert("products", json!({"id": pa}), json!({"tenant_id": "store-b"}), 9, t + 1, 1),
            upsert("orders", json!({"id": o_new}), json!({"tenant_id": "store-b", "store_id": "b-1"}), 10, t + 1, 0),
            upsert("order_lines", json!({"order_id": o_new, "line_no": 1, "tenant_id": "store-b"}), json!({"product_id": pa, "quantity": 1, "unit_price_cents": 1}), 11, t + 1, 0),
            delete("products", json!({"id": pa, "tenant_id": "store-b"}), 12, t + 1, 1),
            upsert("products", json!({"id": pa, "tenant_id": "store-a"}), json!({"tenant_id": "store-a", "name": "A's latte 2"}), 13, t + 1, 1),
        ])
        .await;
    let mut expected = vec![(ChangeStatus::Rejected, Some(ErrorCode::TenantMismatch)); 6];
    expected.push((ChangeStatus::Applied, None));
    assert_eq!(statuses(&results), expected);
    results[..6].iter().for_each(assert_rejected_shape);
    assert_eq!(results[6].seq, Some(7));

    // A plain SQL write of tenant A: an insert and an update.
    let p_sql = Uuid::now_v7();
    sqlx::query("insert into products (tenant_id, id, sku, name, price_cents) values ('store-a', $1, 'BO-1', 'Back office bagel', 199)")
        .bind(p_sql)
        .execute(&hub.db)
        .await
        .unwrap();
    sqlx::query("update products set price_cents = 999 where id = $1").bind(pa).execute(&hub.db).await.unwrap();

    // A's other device receives all of it, every row A's: the stream works, so B's silence
    // below means something.
    let seen = deltas_through(&mut a2, 9).await;
    assert_eq!(seen.iter().map(|d| d.seq).collect::<Vec<_>>(), (1..=9).collect::<Vec<_>>());
    for d in &seen {
        if let Some(row) = &d.row {
            assert_eq!(row["tenant_id"], json!("store-a"), "{d:?}");
        }
    }
    assert_eq!(seen[6].row.as_ref().unwrap()["name"], json!("A's latte 2"));
    assert_eq!((seen[7].origin.as_deref(), seen[8].origin.as_deref()), (None, None), "SQL writes");
    // The writing device receives the SQL writes, not its own changes.
    let seen = deltas_through(&mut a1, 9).await;
    assert_eq!(seen.iter().map(|d| (d.seq, d.origin.clone())).collect::<Vec<_>>(), vec![(8, None), (9, None)]);

    // B's devices received no frame at all, and nothing of A's pushes was written for B.
    receives_nothing(&mut b1, "B's first device").await;
    receives_nothing(&mut b2, "B's second device").await;
    let nothing: Vec<(&str, i64)> = ["products", "customers", "orders", "order_lines", "change_log", "row_versions", "conflicts"].into_iter().map(|n| (n, 0)).collect();
    assert_eq!(footprint(&hub.db, "store-b").await, nothing);
    let pa_row = product_row(&hub.db, pa).await.expect("A's row");
    assert_eq!((&pa_row["tenant_id"], &pa_row["name"], &pa_row["price_cents"]), (&json!("store-a"), &json!("A's latte 2"), &json!(999)));
    assert_eq!(count(&hub.db, "select count(*) from products where tenant_id = $1", "store-a").await, 2, "pa and the SQL bagel");

    // A new device of B, from seq 0: B's log is empty. Snapshots of every table: no rows.
    let mut b3 = hub.client().await;
    let (_, head) = b3.hello(&token("store-b", "user-pos-b3", "Employee", Some("pos-b3")), None, None).await;
    assert_eq!(head, 0);
    assert_eq!(b3.until_up_to_date().await, (vec![], 0));
    for table in TABLES {
        assert_eq!(snapshot_all(&mut b3, table).await, vec![], "B's snapshot of {table}");
    }
    // The same snapshots for A hold A's rows (the snapshot path works).
    let a_rows: Vec<usize> = {
        let mut n = Vec::new();
        for table in TABLES {
            n.push(snapshot_all(&mut a1, table).await.len());
        }
        n
    };
    assert_eq!(a_rows, vec![2, 1, 1, 1]);

    // B writes under keys that exist in tenant A. The demo tables' keys start with the tenant,
    // so B's writes make and delete B's own rows only: an upsert of A's key is a new row of B's,
    // a delete of A's key finds no row of B's (nothing written, no seq). A's rows stay exactly
    // as they were.
    let pb = Uuid::now_v7();
    let (line_key, _) = order_line(oa, 1, pa, 1);
    let results = b1
        .push(vec![
            upsert("products", json!({"id": pa}), product(pa, "B's own latte", 1), 1, t + 2, 0),
            upsert("order_lines", line_key, json!({"product_id": pb, "quantity": 50, "unit_price_cents": 1}), 2, t + 2, 0),
            delete("orders", json!({"id": oa}), 3, t + 2, 3),
            upsert("products", json!({"id": pb}), product(pb, "B's tea", 250), 4, t + 2, 0),
        ])
        .await;
    assert_eq!(statuses(&results), vec![(ChangeStatus::Applied, None); 4]);
    assert_eq!(results.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![Some(1), Some(2), None, Some(3)], "B's own seqs");
    assert_eq!(row_of(&hub.db, "products", "id = $1 and tenant_id = 'store-a'", pa).await, Some(pa_row), "A's product untouched");
    let line = row_of(&hub.db, "order_lines", "order_id = $1 and line_no = 1 and tenant_id = 'store-a'", oa).await.expect("A's order line");
    assert_eq!((&line["tenant_id"], &line["quantity"], &line["product_id"]), (&json!("store-a"), &json!(1), &json!(pa)));
    assert!(row_of(&hub.db, "orders", "id = $1 and tenant_id = 'store-a'", oa).await.is_some(), "A's order not deleted");
    let b_latte = row_of(&hub.db, "products", "id = $1 and tenant_id = 'store-b'", pa).await.expect("B's own row under A's key");
    assert_eq!(b_latte["name"], json!("B's own latte"));
    assert_eq!(cursor(&hub.db, "store-b", "pos-b1").await, Some(4));
    assert_eq!(count(&hub.db, "select count(*) from synchub.change_log where tenant_id = $1", "store-a").await, 9, "A's log unchanged");
    assert_eq!(
        footprint(&hub.db, "store-b").await,
        vec![("products", 2), ("customers", 0), ("orders", 0), ("order_lines", 1), ("change_log", 3), ("row_versions", 3), ("conflicts", 0)]
    );

    // B's other device receives exactly B's rows, at B's seqs; A's devices receive nothing.
    let deltas = deltas_through(&mut b2, 3).await;
    assert_eq!(deltas.iter().map(|d| (d.seq, d.origin.as_deref())).collect::<Vec<_>>(), vec![(1, Some("pos-b1")), (2, Some("pos-b1")), (3, Some("pos-b1"))]);
    assert_eq!(deltas[2].key, obj(json!({"id": pb})));
    for d in &deltas {
        assert_eq!(d.row.as_ref().unwrap()["tenant_id"], json!("store-b"), "{d:?}");
    }
    receives_nothing(&mut b2, "B's second device after B's row").await;
    receives_nothing(&mut a1, "A's first device").await;
    receives_nothing(&mut a2, "A's second device").await;
    hub.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Bad frames: their codes, and the socket stays open

#[actix_web::test]
async fn bad_frames_get_their_documented_codes_and_the_socket_stays_open() {
    let hub = TestHub::start_with(|c| {
        c.max_batch_changes = 3;
        c.max_errors_per_minute = 100;
    })
    .await;
    let mut c = hub.client().await;

    // Before hello: every request, ping included, is not_authenticated with its id echoed; an
    // undecodable frame is malformed_frame without an id. The socket stays open for the hello.
    c.send(&ClientFrame::Push { id: 2, batch_id: Uuid::now_v7(), changes: vec![upsert("products", json!({"id": Uuid::now_v7()}), product(Uuid::now_v7(), "Early", 1), 1, now_ms(), 0)] }).await;
    assert_eq!(next_error(&mut c).await, refusal(ErrorCode::NotAuthenticated, Some(2)));
    c.send(&ClientFrame::Ping { id: 3 }).await;
    assert_eq!(next_error(&mut c).await, refusal(ErrorCode::NotAuthenticated, Some(3)));
    c.send(&ClientFrame::Snapshot { id: 4, table: "products".into(), after: None, limit: None }).await;
    assert_eq!(next_error(&mut c).await, refusal(ErrorCode::NotAuthenticated, Some(4)));
    c.send(&ClientFrame::Auth { id: 5, token: token("store-1", "user-pos-1", "Employee", Some("pos-1")) }).await;
    assert_eq!(next_error(&mut c).await, refusal(ErrorCode::NotAuthenticated, Some(5)));
    c.send_raw(Message::Text("{not json".into())).await;
    assert_eq!(next_error(&mut c).await, refusal(ErrorCode::MalformedFrame, None));
    c.hello(&token("store-1", "user-pos-1", "Employee", Some("pos-1")), None, None).await;
    assert_eq!(c.until_up_to_date().await, (vec![], 0));
    assert_eq!(cursor(&hub.db, "store-1", "pos-1").await, None, "the early push was not applied");

    // Frames that do not decode: malformed_frame, echoing the id only when it could be read.
    for (bad, id) in [
        ("{not json", None),
        ("", None),
        ("[1, 2]", None),
        ("\"ping\"", None),
        (r#"{"type": "ping", "id": "nine"}"#, None),
        (r#"{"type": "ping", "id": -1}"#, None),
        (r#"{"id": 6}"#, Some(6)),
    ] {
        c.send_raw(Message::Text(bad.into())).await;
        assert_eq!(next_error(&mut c).await, refusal(ErrorCode::MalformedFrame, id), "{bad:?}");
        still_open(&mut c).await;
    }
    // A MessagePack frame that is not valid MessagePack; the reply stays JSON (the session's
    // encoding is the hello's).
    c.send_raw(Message::Binary(vec![0xc1, 0x00, 0xff])).await;
    match next_message(&mut c).await {
        Message::Text(text) => {
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!((&v["type"], &v["code"], v.get("id")), (&json!("error"), &json!("malformed_frame"), None), "{text}");
        }
        other => panic!("expected a JSON error, got {other:?}"),
    }
    still_open(&mut c).await;

    // Frames whose id could be read: the error echoes it.
    c.send_raw(Message::Text(json!({"type": "teleport", "id": 7}).to_string())).await;
    assert_eq!(next_error(&mut c).await, refusal(ErrorCode::UnknownType, Some(7)));
    still_open(&mut c).await;
    c.send_raw(Message::Text(json!({"type": "teleport"}).to_string())).await;
    assert_eq!(next_error(&mut c).await, refusal(ErrorCode::UnknownType, None));
    still_open(&mut c).await;
    c.send_raw(Message::Text(json!({"type": "push", "id": 8}).to_string())).await;
    assert_eq!(next_error(&mut c).await, refusal(ErrorCode::MalformedFrame, Some(8)), "a known type lacking required fields");
    still_open(&mut c).await;
    c.send_raw(Message::Text(json!({"type": "push", "id": 9, "batch_id": "not-a-uuid", "changes": []}).to_string())).await;
    assert_eq!(next_error(&mut c).await, refusal(ErrorCode::MalformedFrame, Some(9)), "a field of the wrong type");
    still_open(&mut c).await;
    c.send_raw(Message::Text(json!({"type": 5, "id": 10}).to_string())).await;
    assert_eq!(next_error(&mut c).await, refusal(ErrorCode::MalformedFrame, Some(10)), "a type that is not a string");
    still_open(&mut c).await;

    // Unknown fields are ignored.
    c.send_raw(Message::Text(json!({"type": "ping", "id": 11, "colour": "teal"}).to_string())).await;
    assert_eq!(c.recv().await, ServerFrame::Pong { id: 11 });

    // A second hello, even a valid one: already_authenticated.
    let id = c.next_id();
    c.send(&ClientFrame::Hello { mode: Default::default(), id, versions: vec![1], token: token("store-1", "user-pos-1", "Employee", Some("pos-1")), device_id: None, position: None }).await;
    assert_eq!(next_error(&mut c).await, refusal(ErrorCode::AlreadyAuthenticated, Some(id)));
    still_open(&mut c).await;

    // Batch-level refusals: error with the push's id, nothing applied, the cursor unchanged.
    let good = |n: u64| {
        let id = Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0000 + n as u128);
        upsert("products", json!({"id": id}), product(id, &format!("Good {n}"), 100 + n as i64), n, now_ms(), 0)
    };
    let id = send_push(&mut c, vec![]).await;
    assert_eq!(next_error(&mut c).await, refusal(ErrorCode::InvalidBatch, Some(id)), "an empty batch");
    still_open(&mut c).await;
    let id = send_push(&mut c, vec![good(1), good(3)]).await;
    assert_eq!(next_error(&mut c).await, refusal(ErrorCode::InvalidBatch, Some(id)), "device_seqs not consecutive");
    still_open(&mut c).await;
    let id = send_push(&mut c, vec![good(2), good(1)]).await;
    assert_eq!(next_error(&mut c).await, refusal(ErrorCode::InvalidBatch, Some(id)), "device_seqs decreasing");
    still_open(&mut c).await;
    let id = send_push(&mut c, vec![good(0), good(1)]).await;
    assert_eq!(next_error(&mut c).await, refusal(ErrorCode::InvalidBatch, Some(id)), "device_seq 0 is out of range");
    still_open(&mut c).await;
    let id = send_push(&mut c, vec![good(1), good(2), good(3), good(4)]).await;
    assert_eq!(next_error(&mut c).await, refusal(ErrorCode::BatchTooLarge, Some(id)), "4 changes, limit 3");
    still_open(&mut c).await;
    assert_eq!(count(&hub.db, "select count(*) from products where tenant_id = $1", "store-1").await, 0);
    assert_eq!(count(&hub.db, "select count(*) from synchub.change_log where tenant_id = $1", "store-1").await, 0);
    assert_eq!(cursor(&hub.db, "store-1", "pos-1").await, None);

    // A snapshot of a table that is not synced: unknown_table with its id.
    for table in ["nope", "synchub.change_log", "pg_catalog.pg_class"] {
        let id = c.next_id();
        c.send(&ClientFrame::Snapshot { id, table: table.into(), after: None, limit: None }).await;
        assert_eq!(next_error(&mut c).await, refusal(ErrorCode::UnknownTable, Some(id)), "{table}");
        still_open(&mut c).await;
    }

    // After all of it the device goes on normally, from device_seq 1: a batch of exactly the
    // limit is applied.
    let results = c.push(vec![good(1), good(2), good(3)]).await;
    assert_eq!(results.iter().map(|r| (r.status, r.seq)).collect::<Vec<_>>(), (1..=3).map(|s| (ChangeStatus::Applied, Some(s))).collect::<Vec<_>>());
    still_open(&mut c).await;
    hub.shutdown().await;
}

#[actix_web::test]
async fn bad_messagepack_frames_on_a_messagepack_session() {
    let hub = TestHub::start().await;
    let mut c = Client::connect(hub.addr, Encoding::MsgPack).await;
    c.hello(&token("store-1", "user-pos-1", "Employee", Some("pos-1")), None, None).await;
    c.until_up_to_date().await;

    let msgpack = |v: Value| protocol::codec::encode(Encoding::MsgPack, &v);
    let mut truncated = msgpack(json!({"type": "ping", "id": 4}));
    truncated.pop();
    let cases: Vec<(Vec<u8>, Refusal)> = vec![
        (vec![0xc1], refusal(ErrorCode::MalformedFrame, None)), // 0xc1 is never used in MessagePack
        (vec![], refusal(ErrorCode::MalformedFrame, None)),
        (truncated, refusal(ErrorCode::MalformedFrame, None)),
        (msgpack(json!([1, 2])), refusal(ErrorCode::MalformedFrame, None)),
        (msgpack(json!({"type": "teleport", "id": 7})), refusal(ErrorCode::UnknownType, Some(7))),
        (msgpack(json!({"type": "push", "id": 8})), refusal(ErrorCode::MalformedFrame, Some(8))),
    ];
    for (bytes, expected) in cases {
        c.send_raw(Message::Binary(bytes.clone())).await;
        // The reply is MessagePack, in a binary message.
        match next_message(&mut c).await {
            Message::Binary(reply) => match protocol::codec::decode_server(Encoding::MsgPack, &reply).unwrap() {
                ServerFrame::Error { code, id, temporary, .. } => assert_eq!(Refusal { code, id, temporary }, expected, "{bytes:x?}"),
                other => panic!("expected an error, got {other:?}"),
            },
            other => panic!("expected a binary reply, got {other:?}"),
        }
        still_open(&mut c).await;
    }
    let id = Uuid::now_v7();
    let results = c.push(vec![upsert("products", json!({"id": id}), product(id, "Still fine", 100), 1, now_ms(), 0)]).await;
    assert_eq!((results[0].status, results[0].seq), (ChangeStatus::Applied, Some(1)));
    hub.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Bad changes: rejected one by one, the rest applied, nothing half-applied

#[actix_web::test]
async fn bad_changes_are_rejected_one_by_one_and_the_rest_of_the_batch_is_applied() {
    let hub = TestHub::start_with(|c| c.max_field_bytes = 64).await;
    let (mut a, _, _) = Client::device(&hub, "store-1", "pos-a").await;
    let (mut b, _, _) = Client::device(&hub, "store-1", "pos-b").await;
    let t = now_ms();
    let [p1, p2, p3, p4, p5, o1] = [(); 6].map(|_| Uuid::now_v7());
    let mut bad_type = product(p2, "Scone", 0);
    bad_type["price_cents"] = json!("abc");
    let mut unknown_column = product(p2, "Scone", 300);
    unknown_column["colour"] = json!("red");
    let mut forged = product(p3, "Forged", 1);
    forged["tenant_id"] = json!("store-2");
    // max_field_bytes counts the value's JSON text: 62 characters and the quotes are 64 bytes.
    let at_limit = "n".repeat(62);
    let over_limit = "n".repeat(63);
    let batch = vec![
        upsert("products", json!({"id": p1}), product(p1, "Scone", 300), 1, t, 0),
        upsert("nope", json!({"id": p2}), json!({"name": "x"}), 2, t, 0),
        upsert("synchub.tenants", json!({"tenant_id": "store-1"}), json!({"head_seq": 0}), 3, t, 0),
        upsert("products", json!({"id": p2}), unknown_column, 4, t, 0),
        upsert("products", json!({"id": p2}), bad_type, 5, t, 0),
        upsert("products", json!({"id": "not-a-uuid"}), product(p2, "Bad key", 1), 6, t, 0),
        upsert("orders", json!({"id": o1}), json!({"store_id": "s-1", "status": "shipped"}), 7, t, 0),
        upsert("customers", json!({"id": p2}), json!({"name": "Cara", "loyalty_points": 12.5}), 8, t, 0),
        upsert("products", json!({}), product(p2, "No key", 1), 9, t, 0),
        upsert("order_lines", json!({"order_id": o1}), json!({"product_id": p1, "quantity": 1, "unit_price_cents": 1}), 10, t, 0),
        upsert("products", json!({"id": p1}), json!({"id": p2, "name": "Re-keyed"}), 11, t, 0),
        upsert("products", json!({"id": p3}), forged, 12, t, 0),
        upsert("products", json!({"id": p3, "tenant_id": "store-2"}), product(p3, "Forged", 1), 13, t, 0),
        upsert("products", json!({"id": p3}), product(p3, &over_limit, 1), 14, t, 0),
        upsert("products", json!({"id": p4}), product(p4, &at_limit, 1), 15, t, 0),
        upsert("products", json!({"id": p5}), product(p5, "Muffin", 350), 16, t, 0),
    ];
    let results = a.push(batch.clone()).await;
    use ChangeStatus::*;
    let rejected = |code| (Rejected, Some(code));
    assert_eq!(
        statuses(&results),
        vec![
            (Applied, None),
            rejected(ErrorCode::UnknownTable),
            rejected(ErrorCode::UnknownTable),
            rejected(ErrorCode::UnknownColumn),
            rejected(ErrorCode::InvalidValue),
            rejected(ErrorCode::InvalidValue),
            rejected(ErrorCode::InvalidValue),
            rejected(ErrorCode::InvalidValue),
            rejected(ErrorCode::InvalidKey),
            rejected(ErrorCode::InvalidKey),
            rejected(ErrorCode::InvalidKey),
            rejected(ErrorCode::TenantMismatch),
            rejected(ErrorCode::TenantMismatch),
            rejected(ErrorCode::ValueTooLarge),
            (Applied, None),
            (Applied, None),
        ]
    );
    for (r, c) in results.iter().zip(&batch) {
        assert_eq!((r.change_id, r.device_seq), (c.change_id, c.device_seq));
        if r.status == Rejected {
            assert_rejected_shape(r);
        }
    }
    assert_eq!([results[0].seq, results[14].seq, results[15].seq], [Some(1), Some(2), Some(3)]);

    // Postgres holds exactly the three applied rows; rejected changes still moved the cursor.
    let ids: Vec<Uuid> = sqlx::query_scalar("select id from products order by id").fetch_all(&hub.db).await.unwrap();
    let mut want = vec![p1, p4, p5];
    want.sort();
    assert_eq!(ids, want);
    assert_eq!(product_row(&hub.db, p1).await.unwrap()["name"], json!("Scone"), "not re-keyed, not renamed");
    assert_eq!(product_row(&hub.db, p4).await.unwrap()["name"], json!(at_limit));
    assert_eq!(footprint(&hub.db, "store-1").await[1..4], [("customers", 0), ("orders", 0), ("order_lines", 0)]);
    assert_eq!(count(&hub.db, "select count(*) from synchub.change_log where tenant_id = $1", "store-1").await, 3);
    assert_eq!(cursor(&hub.db, "store-1", "pos-a").await, Some(16));
    let head: i64 = sqlx::query_scalar("select head_seq from synchub.tenants where tenant_id = 'store-1'").fetch_one(&hub.db).await.unwrap();
    assert_eq!(head, 3, "the synchub.tenants row was not written by the device");

    // The other device receives the three applied changes and nothing else.
    let seen = deltas_through(&mut b, 3).await;
    assert_eq!(seen.iter().map(|d| (d.seq, d.key.clone())).collect::<Vec<_>>(), vec![(1, obj(json!({"id": p1}))), (2, obj(json!({"id": p4}))), (3, obj(json!({"id": p5})))]);
    receives_nothing(&mut b, "the other device").await;

    // Rejections are final: the same batch re-sent is all duplicates, with the original seqs
    // for the applied changes only.
    let again = a.push(batch).await;
    assert!(again.iter().all(|r| r.status == Duplicate), "{again:?}");
    let seqs: Vec<Option<u64>> = again.iter().map(|r| r.seq).collect();
    let mut want = vec![None; 16];
    (want[0], want[14], want[15]) = (Some(1), Some(2), Some(3));
    assert_eq!(seqs, want);
    hub.shutdown().await;
}

#[actix_web::test]
async fn a_rejected_change_leaves_its_row_untouched() {
    let hub = TestHub::start_with(|c| c.max_field_bytes = 64).await;
    let (mut a, _, _) = Client::device(&hub, "store-1", "pos-a").await;
    let (mut b, _, _) = Client::device(&hub, "store-1", "pos-b").await;
    let p = Uuid::now_v7();
    let t = now_ms();
    let results = a.push(vec![upsert("products", json!({"id": p}), product(p, "Scone", 300), 1, t, 0)]).await;
    assert_eq!((results[0].status, results[0].seq), (ChangeStatus::Applied, Some(1)));
    let original = product_row(&hub.db, p).await.unwrap();

    // One batch touching the row before, between and after bad changes that each write a good
    // field (name) next to a bad one. Only the good changes leave a trace.
    let key = json!({"id": p});
    let results = a
        .push(vec![
            upsert("products", key.clone(), json!({"name": "Scone 2"}), 2, t + 1, 1),
            upsert("products", key.clone(), json!({"name": "Hacked", "price_cents": "abc"}), 3, t + 2, 1),
            upsert("products", key.clone(), json!({"name": "Evil", "price_cents": -5}), 4, t + 3, 1),
            upsert("products", key.clone(), json!({"name": "Colourful", "colour": "red"}), 5, t + 4, 1),
            upsert("products", key.clone(), json!({"name": "Huge", "sku": "s".repeat(100)}), 6, t + 5, 1),
            upsert("products", key.clone(), json!({"name": "Moved", "tenant_id": "store-2"}), 7, t + 6, 1),
            upsert("products", key.clone(), json!({"stock": 7}), 8, t + 7, 1),
        ])
        .await;
    use ChangeStatus::*;
    assert_eq!(
        statuses(&results),
        vec![
            (Applied, None),
            (Rejected, Some(ErrorCode::InvalidValue)),
            (Rejected, Some(ErrorCode::InvalidValue)),
            (Rejected, Some(ErrorCode::UnknownColumn)),
            (Rejected, Some(ErrorCode::ValueTooLarge)),
            (Rejected, Some(ErrorCode::TenantMismatch)),
            // The row changed since base_version 1 by this device's own first change only:
            // simply overwritten (protocol §4), so applied and not merged.
            (Applied, None),
        ]
    );
    results[1..6].iter().for_each(assert_rejected_shape);
    assert_eq!((results[0].seq, results[6].seq), (Some(2), Some(3)));
    assert_eq!(results[6].row, None, "an applied result carries no row");

    // A batch whose only change is half good, half bad: nothing of it is written.
    for (n, fields) in [(9, json!({"name": "Half", "price_cents": "abc"})), (10, json!({"name": "Half", "price_cents": 99_999_999_999i64}))] {
        let results = a.push(vec![upsert("products", key.clone(), fields, n, t + 10 + n, 3)]).await;
        assert_eq!(statuses(&results), vec![(Rejected, Some(ErrorCode::InvalidValue))]);
        assert_rejected_shape(&results[0]);
    }

    let mut expected = original.clone();
    expected["name"] = json!("Scone 2");
    expected["stock"] = json!(7);
    assert_eq!(product_row(&hub.db, p).await.unwrap(), expected, "exactly the two good changes");
    let (version, clocks): (i64, Value) = sqlx::query_as("select version, synchub.field_clocks(clocks) from synchub.row_versions where tenant_id = 'store-1' and pk = $1")
        .bind(json!({"id": p}))
        .fetch_one(&hub.db)
        .await
        .unwrap();
    assert_eq!(version, 3);
    let mut fields: Vec<&String> = clocks.as_object().unwrap().keys().collect();
    fields.sort();
    assert_eq!(fields, ["name", "price_cents", "sku", "stock"], "no clock for a rejected field");
    assert_eq!(clocks["name"][3], json!(2), "name last written at seq 2");
    assert_eq!(clocks["price_cents"][3], json!(1));
    let log: Vec<(i64, Value)> = sqlx::query_as("select seq, written from synchub.change_log where tenant_id = 'store-1' order by seq").fetch_all(&hub.db).await.unwrap();
    assert_eq!(log.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!((&log[1].1, &log[2].1), (&json!({"name": "Scone 2"}), &json!({"stock": 7})));
    assert_eq!(cursor(&hub.db, "store-1", "pos-a").await, Some(10));

    // The other device sees the insert and the two good changes, nothing else; its snapshot
    // agrees with Postgres.
    let seen = deltas_through(&mut b, 3).await;
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[1].old, Some(obj(json!({"name": "Scone"}))));
    assert_eq!(seen[2].old, Some(obj(json!({"stock": 0}))));
    assert_eq!(seen[2].row.as_ref().map(|r| Value::Object(r.clone())), Some(expected.clone()));
    receives_nothing(&mut b, "the other device").await;
    let snapshot = snapshot_all(&mut b, "products").await;
    assert_eq!(snapshot, vec![SnapshotRow { row: obj(expected), version: 3 }]);
    hub.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Abuse: closed with a code

#[actix_web::test]
async fn a_frame_over_max_frame_bytes_closes_the_socket_with_1009() {
    const MAX: usize = 32 * 1024;
    let hub = TestHub::start_with(|c| c.max_frame_bytes = MAX).await;
    let push_text = |id: u64, product_id: Uuid, device_seq: u64, name_len: usize| {
        let change = upsert("products", json!({"id": product_id}), product(product_id, &"n".repeat(name_len), 1), device_seq, now_ms(), 0);
        String::from_utf8(protocol::codec::encode_client(Encoding::Json, &ClientFrame::Push { id, batch_id: Uuid::now_v7(), changes: vec![change] })).unwrap()
    };

    // A frame under the limit is accepted, whole or in fragments.
    let mut c = hub.client().await;
    let (_, _) = c.hello(&token("store-1", "u1", "Employee", Some("d1")), None, None).await;
    c.until_up_to_date().await;
    let (small, fragmented) = (Uuid::now_v7(), Uuid::now_v7());
    let text = push_text(10, small, 1, 30 * 1024);
    assert!(text.len() < MAX);
    c.send_raw(Message::Text(text)).await;
    assert!(matches!(c.recv().await, ServerFrame::Ack { id: 10, ref results, .. } if results[0].status == ChangeStatus::Applied));
    let text = push_text(11, fragmented, 2, 30 * 1024).into_bytes();
    let third = text.len() / 3;
    c.send_raw(Message::Frame(Frame::message(text[..third].to_vec(), OpCode::Data(Data::Text), false))).await;
    c.send_raw(Message::Frame(Frame::message(text[third..2 * third].to_vec(), OpCode::Data(Data::Continue), false))).await;
    c.send_raw(Message::Frame(Frame::message(text[2 * third..].to_vec(), OpCode::Data(Data::Continue), true))).await;
    assert!(matches!(c.recv().await, ServerFrame::Ack { id: 11, ref results, .. } if results[0].status == ChangeStatus::Applied));

    // Over the limit: a valid push in one text frame, garbage in one binary frame, a valid push
    // in fragments that are each under the limit. Each closes with 1009, nothing answered, and
    // nothing of it applied.
    let big_whole = Uuid::now_v7();
    c.send_raw(Message::Text(push_text(12, big_whole, 3, 40 * 1024))).await;
    let (frames, code) = frames_until_close(&mut c).await;
    assert_eq!((frames, code), (vec![], 1009));

    let mut c = hub.client().await;
    c.hello(&token("store-1", "u2", "Employee", Some("d2")), None, None).await;
    c.until_up_to_date().await;
    c.send_raw(Message::Binary(vec![0x80; MAX + 1])).await;
    assert_eq!(frames_until_close(&mut c).await, (vec![], 1009));

    let mut c = hub.client().await;
    c.hello(&token("store-1", "u3", "Employee", Some("d3")), None, None).await;
    c.until_up_to_date().await;
    let big_fragmented = Uuid::now_v7();
    let text = push_text(13, big_fragmented, 1, 48 * 1024).into_bytes();
    let chunks: Vec<&[u8]> = text.chunks(16 * 1024).collect();
    assert!(chunks.len() >= 3 && chunks.iter().all(|ch| ch.len() < MAX));
    for (i, chunk) in chunks.iter().enumerate() {
        let op = if i == 0 { OpCode::Data(Data::Text) } else { OpCode::Data(Data::Continue) };
        if c.ws.send(Message::Frame(Frame::message(chunk.to_vec(), op, i + 1 == chunks.len()))).await.is_err() {
            break; // the hub may have closed already
        }
    }
    assert_eq!(frames_until_close(&mut c).await, (vec![], 1009));

    let ids: Vec<Uuid> = sqlx::query_scalar("select id from products order by id").fetch_all(&hub.db).await.unwrap();
    let mut want = vec![small, fragmented];
    want.sort();
    assert_eq!(ids, want, "nothing of an oversized frame is applied");
    assert_eq!(cursor(&hub.db, "store-1", "d3").await, None);
    hub.shutdown().await;
}

#[actix_web::test]
async fn too_many_bad_frames_close_the_socket_with_4009() {
    let hub = TestHub::start_with(|c| {
        c.max_errors_per_minute = 4;
        c.max_batch_changes = 2;
    })
    .await;
    let mut c = hub.client().await;
    c.hello(&token("store-1", "user-pos-1", "Employee", Some("pos-1")), None, None).await;
    c.until_up_to_date().await;

    // Four bad frames of different kinds: each answered, the socket open.
    c.send_raw(Message::Text("{not json".into())).await;
    assert_eq!(next_error(&mut c).await, refusal(ErrorCode::MalformedFrame, None));
    c.send_raw(Message::Text(json!({"type": "teleport", "id": 50}).to_string())).await;
    assert_eq!(next_error(&mut c).await, refusal(ErrorCode::UnknownType, Some(50)));
    let id = send_push(&mut c, vec![]).await;
    assert_eq!(next_error(&mut c).await, refusal(ErrorCode::InvalidBatch, Some(id)));
    let id = c.next_id();
    c.send(&ClientFrame::Hello { mode: Default::default(), id, versions: vec![1], token: token("store-1", "user-pos-1", "Employee", Some("pos-1")), device_id: None, position: None }).await;
    assert_eq!(next_error(&mut c).await, refusal(ErrorCode::AlreadyAuthenticated, Some(id)));
    // Pings and pushes whose changes are rejected are not bad frames.
    for _ in 0..3 {
        still_open(&mut c).await;
    }
    for n in 0..4u64 {
        let bad = |s| upsert("nope", json!({"id": Uuid::now_v7()}), json!({"name": "x"}), s, now_ms(), 0);
        let results = c.push(vec![bad(2 * n + 1), bad(2 * n + 2)]).await;
        assert_eq!(statuses(&results), vec![(ChangeStatus::Rejected, Some(ErrorCode::UnknownTable)); 2]);
    }
    still_open(&mut c).await;

    // The fifth bad frame in the minute: closed with 4009; at most its own error before that.
    let _ = send_push(&mut c, (9..=11).map(|s| upsert("products", json!({"id": Uuid::now_v7()}), json!({"name": "x"}), s, now_ms(), 0)).collect()).await;
    let (frames, code) = frames_until_close(&mut c).await;
    assert_eq!(code, 4009);
    assert!(frames.iter().all(|f| matches!(f, ServerFrame::Error { code: ErrorCode::BatchTooLarge, .. })) && frames.len() <= 1, "{frames:?}");
    assert_eq!(cursor(&hub.db, "store-1", "pos-1").await, Some(8));

    // The same before hello: bad frames from a socket that never authenticated.
    let mut c = hub.client().await;
    for n in 0..4 {
        c.send(&ClientFrame::Ping { id: 100 + n }).await;
        assert_eq!(next_error(&mut c).await, refusal(ErrorCode::NotAuthenticated, Some(100 + n)));
    }
    c.send_raw(Message::Text("nope".into())).await;
    let (frames, code) = frames_until_close(&mut c).await;
    assert_eq!(code, 4009);
    assert!(frames.iter().all(|f| matches!(f, ServerFrame::Error { code: ErrorCode::MalformedFrame, .. })) && frames.len() <= 1, "{frames:?}");
    hub.shutdown().await;
}

#[actix_web::test]
async fn a_failed_hello_closes_with_its_code() {
    let hub = TestHub::start().await;
    let now = synchub::auth::unix_now();

    /// Send a hello; the hub must answer exactly one error and then close.
    async fn refused_hello(hub: &TestHub, token: String, device: Option<&str>, versions: Vec<u32>) -> (Refusal, u16) {
        let mut c = hub.client().await;
        c.send(&ClientFrame::Hello { mode: Default::default(), id: 1, versions, token, device_id: device.map(Into::into), position: None }).await;
        let refusal = next_error(&mut c).await;
        let (frames, code) = frames_until_close(&mut c).await;
        assert_eq!(frames, vec![], "nothing after the error but the close");
        (refusal, code)
    }

    // Bad tokens: 4001.
    let cases = [
        ("not a JWT", "not.a.token".to_string(), ErrorCode::InvalidToken),
        ("empty", String::new(), ErrorCode::InvalidToken),
        (
            "signed with another secret",
            synchub::auth::mint_hs256("another-secret", &json!({"sub": "u", "role": "Employee", "tenant_id": "store-1", "device_id": "d1", "exp": now + 600})),
            ErrorCode::InvalidToken,
        ),
        (
            "no tenant claim",
            synchub::auth::mint_hs256(SECRET, &json!({"sub": "u", "role": "Employee", "device_id": "d1", "exp": now + 600})),
            ErrorCode::InvalidToken,
        ),
        (
            "expired",
            synchub::auth::mint_hs256(SECRET, &json!({"sub": "u", "role": "Employee", "tenant_id": "store-1", "device_id": "d1", "exp": now - 3600})),
            ErrorCode::TokenExpired,
        ),
    ];
    for (what, tok, code) in cases {
        assert_eq!(refused_hello(&hub, tok, Some("d1"), vec![1]).await, (refusal(code, Some(1)), 4001), "{what}");
    }
    // No usable device id: forbidden, 4001.
    assert_eq!(refused_hello(&hub, token("store-1", "u", "Employee", Some("d1")), Some("d2"), vec![1]).await, (refusal(ErrorCode::Forbidden, Some(1)), 4001), "device differs from the token's");
    assert_eq!(refused_hello(&hub, token("store-1", "u", "Employee", None), None, vec![1]).await, (refusal(ErrorCode::Forbidden, Some(1)), 4001), "no device anywhere");
    assert_eq!(refused_hello(&hub, token("store-1", "u", "Employee", None), Some(""), vec![1]).await, (refusal(ErrorCode::Forbidden, Some(1)), 4001), "an empty device id");
    for reserved in ["console:mgr-1", "dashboard:x"] {
        assert_eq!(refused_hello(&hub, token("store-1", "u", "Employee", None), Some(reserved), vec![1]).await, (refusal(ErrorCode::Forbidden, Some(1)), 4001), "{reserved} is the hub's");
        assert_eq!(refused_hello(&hub, token("store-1", "u", "Employee", Some(reserved)), None, vec![1]).await, (refusal(ErrorCode::Forbidden, Some(1)), 4001), "{reserved} in a token");
    }

    // No protocol version in common: 4003, whatever the token.
    for versions in [vec![99], vec![], vec![0, 2]] {
        assert_eq!(
            refused_hello(&hub, token("store-1", "u", "Employee", Some("d1")), None, versions.clone()).await,
            (refusal(ErrorCode::UnsupportedVersion, Some(1)), 4003),
            "{versions:?}"
        );
    }
    let mut c = Client::connect(hub.addr, Encoding::MsgPack).await;
    c.send(&ClientFrame::Hello { mode: Default::default(), id: 1, versions: vec![99], token: token("store-1", "u", "Employee", Some("d1")), device_id: None, position: None }).await;
    assert_eq!(next_error(&mut c).await, refusal(ErrorCode::UnsupportedVersion, Some(1)));
    assert_eq!(frames_until_close(&mut c).await, (vec![], 4003));

    // The counter-checks: a token without a device claim and hello.device_id given, and
    // versions with one in common, are welcome.
    let mut c = hub.client().await;
    c.send(&ClientFrame::Hello { mode: Default::default(), id: 1, versions: vec![99, 1, 0], token: token("store-1", "u", "Employee", None), device_id: Some("d9".into()), position: None }).await;
    match c.recv().await {
        ServerFrame::Welcome { id, version, device_id, .. } => assert_eq!((id, version, device_id.as_str()), (1, 1, "d9")),
        other => panic!("expected welcome, got {other:?}"),
    }
    c.until_up_to_date().await;
    still_open(&mut c).await;
    hub.shutdown().await;
}

#[actix_web::test]
async fn a_token_sent_with_the_upgrade_request_is_in_force_from_hello() {
    let hub = TestHub::start_with(|c| c.jwt_leeway_secs = 0).await;
    let now = synchub::auth::unix_now();
    /// A hello without a token; returns the welcome's device id.
    async fn welcomed(c: &mut Client, device: Option<&str>) -> String {
        let id = c.next_id();
        c.send(&ClientFrame::Hello { mode: Default::default(), id, versions: vec![1], token: String::new(), device_id: device.map(Into::into), position: None }).await;
        match c.recv().await {
            ServerFrame::Welcome { device_id, .. } => device_id,
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    // In the Authorization header, and in the query string: hello needs no token, and the
    // session is the token's (its tenant's rows, its device).
    let bearer = format!("Bearer {}", token("store-1", "u1", "Employee", Some("d1")));
    let mut c = Client::connect_with(hub.addr, &[("authorization", &bearer)], "").await.expect("upgraded");
    assert_eq!(welcomed(&mut c, None).await, "d1");
    c.until_up_to_date().await;
    let tea = Uuid::now_v7();
    let pushed = c.push(vec![upsert("products", json!({"id": tea}), product(tea, "tea", 250), 1, now_ms(), 0)]).await;
    assert!(matches!(pushed[0].status, ChangeStatus::Applied), "{pushed:?}");
    assert_eq!(count(&hub.db, "SELECT count(*) FROM products WHERE tenant_id = $1", "store-1").await, 1);
    let query = format!("?access_token={}", token("store-2", "u2", "Employee", None));
    let mut c = Client::connect_with(hub.addr, &[], &query).await.expect("upgraded");
    assert_eq!(welcomed(&mut c, Some("d2")).await, "d2");

    // hello.token, when given, replaces the upgrade's.
    let mut c = Client::connect_with(hub.addr, &[("authorization", &bearer)], "").await.expect("upgraded");
    c.hello(&token("store-2", "u3", "Employee", Some("d3")), None, None).await;
    c.until_up_to_date().await;
    let milk = Uuid::now_v7();
    let pushed = c.push(vec![upsert("products", json!({"id": milk}), product(milk, "milk", 90), 1, now_ms(), 0)]).await;
    assert!(matches!(pushed[0].status, ChangeStatus::Applied), "{pushed:?}");
    assert_eq!(count(&hub.db, "SELECT count(*) FROM products WHERE tenant_id = $1", "store-2").await, 1);
    assert_eq!(count(&hub.db, "SELECT count(*) FROM products WHERE tenant_id = $1", "store-1").await, 1);

    // A token the hub does not take: HTTP 401 with the error's code, and no socket.
    let expired = synchub::auth::mint_hs256(SECRET, &json!({"sub": "u", "role": "Employee", "tenant_id": "store-1", "device_id": "d1", "exp": now - 60}));
    let cases = [
        ("Bearer not.a.token".to_string(), "", "invalid_token"),
        (format!("Basic {}", token("store-1", "u", "Employee", Some("d1"))), "", "invalid_token"),
        (format!("Bearer {expired}"), "", "token_expired"),
        (String::new(), "?access_token=not.a.token", "invalid_token"),
    ];
    for (header, query, code) in cases {
        let headers: Vec<(&str, &str)> = if header.is_empty() { vec![] } else { vec![("authorization", header.as_str())] };
        match Client::connect_with(hub.addr, &headers, query).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 401, "{header} {query}");
                assert_eq!(response.headers()["www-authenticate"], "Bearer");
                let body: Value = serde_json::from_slice(response.body().as_deref().unwrap_or_default()).unwrap();
                assert_eq!(body["code"], code, "{header} {query}: {body}");
            }
            Err(other) => panic!("{header} {query}: expected HTTP 401, got {other}"),
            Ok(_) => panic!("{header} {query}: upgraded with a refused token"),
        }
    }

    // A token that expires between the upgrade and hello: token_expired, 4001.
    let short = synchub::auth::mint_hs256(SECRET, &json!({"sub": "u", "role": "Employee", "tenant_id": "store-1", "device_id": "d4", "exp": now + 1}));
    let mut c = Client::connect_with(hub.addr, &[("authorization", &format!("Bearer {short}"))], "").await.expect("upgraded");
    while synchub::auth::unix_now() <= now + 1 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.send(&ClientFrame::Hello { mode: Default::default(), id: 1, versions: vec![1], token: String::new(), device_id: None, position: None }).await;
    assert_eq!(next_error(&mut c).await, refusal(ErrorCode::TokenExpired, Some(1)));
    assert_eq!(frames_until_close(&mut c).await, (vec![], 4001));
    hub.shutdown().await;
}

#[actix_web::test]
async fn a_session_token_refreshed_over_http_keeps_the_session_open() {
    let hub = TestHub::start_with(|c| c.jwt_leeway_secs = 0).await;
    let now = synchub::auth::unix_now();
    let short = synchub::auth::mint_hs256(SECRET, &json!({"sub": "u1", "role": "Employee", "tenant_id": "store-1", "device_id": "d1", "exp": now + 2}));
    let mut c = Client::connect_with(hub.addr, &[("authorization", &format!("Bearer {short}"))], "").await.expect("upgraded");
    c.send(&ClientFrame::Hello { mode: Default::default(), id: 1, versions: vec![1], token: String::new(), device_id: None, position: None }).await;
    let session = match c.recv().await {
        ServerFrame::Welcome { session_id, .. } => session_id,
        other => panic!("expected welcome, got {other:?}"),
    };
    c.until_up_to_date().await;
    let http = reqwest::Client::new();
    let refresh = |session: String, token: String| {
        let request = http.post(format!("http://{}/v1/sessions/{session}/token", hub.addr)).bearer_auth(token);
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        }
    };

    // Refused: a token of another user or device, a bad token, a session that is not open.
    // Another tenant's token is told what a token for no session is told (not_found).
    let cases = [
        (session.to_string(), token("store-1", "u2", "Employee", Some("d1")), 403, "forbidden"),
        (session.to_string(), token("store-1", "u1", "Employee", Some("d2")), 403, "forbidden"),
        (session.to_string(), token("store-2", "u1", "Employee", Some("d1")), 404, "not_found"),
        (session.to_string(), "not.a.token".to_string(), 401, "invalid_token"),
        (Uuid::new_v4().to_string(), token("store-1", "u1", "Employee", Some("d1")), 404, "not_found"),
    ];
    for (id, tok, status, code) in cases {
        let (got, body) = refresh(id, tok).await;
        assert_eq!((got, body["code"].as_str()), (status, Some(code)), "{body}");
    }

    // Accepted: the new expiry is in force, past the old token's, and the socket saw nothing.
    let fresh_exp = now + 3600;
    let fresh = synchub::auth::mint_hs256(SECRET, &json!({"sub": "u1", "role": "Employee", "tenant_id": "store-1", "device_id": "d1", "exp": fresh_exp}));
    let (status, body) = refresh(session.to_string(), fresh).await;
    assert_eq!((status, body["expires_at"].as_u64()), (200, Some(fresh_exp)), "{body}");
    while synchub::auth::unix_now() <= now + 3 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    still_open(&mut c).await;
    hub.shutdown().await;
}

#[actix_web::test]
async fn no_hello_in_time_closes_with_4000() {
    const HELLO_TIMEOUT_MS: u64 = 500;
    let hub = TestHub::start_with(|c| c.hello_timeout_ms = HELLO_TIMEOUT_MS).await;

    // Silence: closed with 4000, not before the timeout, nothing sent before the close.
    let started = Instant::now();
    let mut silent = hub.client().await;
    // Frames before hello do not stop the clock.
    let started_busy = Instant::now();
    let mut busy = hub.client().await;
    busy.send(&ClientFrame::Ping { id: 1 }).await;
    assert_eq!(next_error(&mut busy).await, refusal(ErrorCode::NotAuthenticated, Some(1)));
    // A prompt hello stays open past the timeout.
    let mut prompt = hub.client().await;
    prompt.hello(&token("store-1", "u", "Employee", Some("d1")), None, None).await;
    prompt.until_up_to_date().await;

    assert_eq!(frames_until_close(&mut silent).await, (vec![], 4000));
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(HELLO_TIMEOUT_MS) && waited < Duration::from_secs(5), "closed after {waited:?}");
    assert_eq!(frames_until_close(&mut busy).await, (vec![], 4000));
    assert!(started_busy.elapsed() >= Duration::from_millis(HELLO_TIMEOUT_MS));

    tokio::time::sleep(Duration::from_millis(2 * HELLO_TIMEOUT_MS)).await;
    still_open(&mut prompt).await;
    hub.shutdown().await;
}
