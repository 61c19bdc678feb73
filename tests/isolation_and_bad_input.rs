//! Tenant isolation (a device of one tenant never sees or touches another's rows, even with a
//! forged tenant value) and bad input: every documented error code, nothing half-applied, the
//! socket kept open for ordinary errors and closed with a code for abuse.

mod common;

use std::time::Duration;

use common::*;
use protocol::{ChangeStatus, ClientFrame, Encoding, ErrorCode, ServerFrame};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

/// The next `error` frame's code and id.
async fn next_error(c: &mut Client) -> (ErrorCode, Option<u64>) {
    match c.recv().await {
        ServerFrame::Error { code, id, .. } => (code, id),
        other => panic!("expected an error frame, got {other:?}"),
    }
}

/// Prove the socket is still open and answering.
async fn still_open(c: &mut Client) {
    let id = c.next_id();
    c.send(&ClientFrame::Ping { id }).await;
    match c.recv().await {
        ServerFrame::Pong { id: got } => assert_eq!(got, id),
        other => panic!("expected pong, got {other:?}"),
    }
}

async fn product_count(db: &sqlx::PgPool, tenant: &str) -> i64 {
    sqlx::query_scalar("select count(*) from products where tenant_id = $1").bind(tenant).fetch_one(db).await.unwrap()
}

#[actix_web::test]
async fn a_tenant_never_sees_or_touches_another_tenants_rows() {
    let hub = TestHub::start().await;
    let (mut a, _, _) = Client::device(&hub, "store-a", "pos-a").await;
    let (mut b, _, _) = Client::device(&hub, "store-b", "pos-b").await;

    let id = Uuid::new_v4();
    let results = a
        .push(vec![
            upsert("products", json!({"id": id}), product(id, "A's latte", 420), 1, now_ms(), 0),
            // Forged tenant values, in the fields and in the key: refused, nothing written.
            upsert("products", json!({"id": Uuid::new_v4()}), json!({"tenant_id": "store-b", "sku": "F", "name": "Forged", "price_cents": 1}), 2, now_ms(), 0),
            upsert("products", json!({"id": Uuid::new_v4(), "tenant_id": "store-b"}), json!({"sku": "F", "name": "Forged", "price_cents": 1}), 3, now_ms(), 0),
        ])
        .await;
    assert_eq!(results[0].status, ChangeStatus::Applied);
    for r in &results[1..] {
        assert_eq!((r.status, r.reason), (ChangeStatus::Rejected, Some(ErrorCode::TenantMismatch)), "{r:?}");
    }

    // B writes to the key of A's row: it cannot reach A's row (it is not B's), and the key is
    // taken, so the change is refused and A's row stays as it was.
    let results = b.push(vec![upsert("products", json!({"id": id}), product(id, "B's takeover", 1), 1, now_ms(), 0)]).await;
    assert_eq!((results[0].status, results[0].reason), (ChangeStatus::Rejected, Some(ErrorCode::InvalidValue)), "{:?}", results[0]);
    let (tenant, name, price): (String, String, i32) =
        sqlx::query_as("select tenant_id, name, price_cents from products where id = $1").bind(id).fetch_one(&hub.db).await.unwrap();
    assert_eq!((tenant.as_str(), name.as_str(), price), ("store-a", "A's latte", 420));

    // A plain SQL write of tenant A reaches A's device only.
    sqlx::query("update products set price_cents = 430 where id = $1").bind(id).execute(&hub.db).await.unwrap();
    let (deltas, _) = a.next_deltas().await;
    assert_eq!(deltas[0].row.as_ref().unwrap()["price_cents"], json!(430));

    assert!(b.recv_timeout(Duration::from_millis(500)).await.is_none(), "B receives nothing of tenant A");
    assert_eq!(product_count(&hub.db, "store-b").await, 0, "nothing was written for store-b");

    // A new device of B catching up from 0, and B's snapshots of every table: nothing of A.
    let (mut b2, _, _) = Client::device(&hub, "store-b", "pos-b2").await;
    let mut fresh = hub.client().await;
    fresh.hello(&token("store-b", "user-pos-b3", "Employee", Some("pos-b3")), None, None).await;
    let (caught_up, _) = fresh.until_up_to_date().await;
    assert!(caught_up.is_empty(), "B's log holds nothing: {caught_up:?}");
    for table in ["products", "customers", "orders", "order_lines"] {
        let id = b2.next_id();
        b2.send(&ClientFrame::Snapshot { id, table: table.into(), after: None, limit: None }).await;
        match b2.recv().await {
            ServerFrame::SnapshotPage { rows, .. } => assert!(rows.is_empty(), "{table}: {rows:?}"),
            other => panic!("expected a snapshot page, got {other:?}"),
        }
    }
    let a_log: i64 = sqlx::query_scalar("select count(*) from synchub.change_log where tenant_id = 'store-a'").fetch_one(&hub.db).await.unwrap();
    let b_log: i64 = sqlx::query_scalar("select count(*) from synchub.change_log where tenant_id = 'store-b'").fetch_one(&hub.db).await.unwrap();
    assert_eq!((a_log, b_log), (2, 0));
    hub.shutdown().await;
}

#[actix_web::test]
async fn bad_frames_get_their_codes_and_the_socket_stays_open() {
    let hub = TestHub::start_with(|c| {
        c.max_batch_changes = 5;
        c.max_errors_per_minute = 100;
    })
    .await;

    // Before hello: not_authenticated, and the socket stays open for the hello.
    let mut c = hub.client().await;
    c.send(&ClientFrame::Push { id: 1, batch_id: Uuid::now_v7(), changes: vec![] }).await;
    assert_eq!(next_error(&mut c).await, (ErrorCode::NotAuthenticated, Some(1)));
    c.hello(&token("store-1", "user-pos-1", "Employee", Some("pos-1")), None, None).await;
    c.until_up_to_date().await;

    c.send_raw(Message::Text("{not json".into())).await;
    assert_eq!(next_error(&mut c).await.0, ErrorCode::MalformedFrame);
    still_open(&mut c).await;

    c.send_raw(Message::Binary(vec![0xc1, 0x00, 0xff])).await;
    assert_eq!(next_error(&mut c).await.0, ErrorCode::MalformedFrame);
    still_open(&mut c).await;

    c.send_raw(Message::Text(json!({"type": "teleport", "id": 7}).to_string())).await;
    assert_eq!(next_error(&mut c).await.0, ErrorCode::UnknownType);
    still_open(&mut c).await;

    // A known type lacking a required field.
    c.send_raw(Message::Text(json!({"type": "push", "id": 8}).to_string())).await;
    assert_eq!(next_error(&mut c).await.0, ErrorCode::MalformedFrame);

    // Unknown fields are ignored.
    c.send_raw(Message::Text(json!({"type": "ping", "id": 9, "colour": "teal"}).to_string())).await;
    assert!(matches!(c.recv().await, ServerFrame::Pong { id: 9 }));

    let id = c.next_id();
    c.send(&ClientFrame::Hello { id, versions: vec![1], token: token("store-1", "u", "Employee", Some("pos-1")), device_id: None, position: None })
        .await;
    assert_eq!(next_error(&mut c).await, (ErrorCode::AlreadyAuthenticated, Some(id)));

    let id = c.next_id();
    c.send(&ClientFrame::Push { id, batch_id: Uuid::now_v7(), changes: vec![] }).await;
    assert_eq!(next_error(&mut c).await, (ErrorCode::InvalidBatch, Some(id)));

    let six = (1..=6u64)
        .map(|n| {
            let pid = Uuid::new_v4();
            upsert("products", json!({"id": pid}), product(pid, "Too many", 100), n, now_ms(), 0)
        })
        .collect();
    let id = c.next_id();
    c.send(&ClientFrame::Push { id, batch_id: Uuid::now_v7(), changes: six }).await;
    assert_eq!(next_error(&mut c).await, (ErrorCode::BatchTooLarge, Some(id)));
    assert_eq!(product_count(&hub.db, "store-1").await, 0, "nothing of a refused batch is applied");

    // The same device goes on normally after all of it.
    let pid = Uuid::new_v4();
    let results = c.push(vec![upsert("products", json!({"id": pid}), product(pid, "Fine", 100), 1, now_ms(), 0)]).await;
    assert_eq!(results[0].status, ChangeStatus::Applied);
    still_open(&mut c).await;
    assert!(c.closed.is_none());
    hub.shutdown().await;
}

#[actix_web::test]
async fn bad_changes_are_rejected_one_by_one_and_nothing_is_half_applied() {
    let hub = TestHub::start_with(|c| c.max_field_bytes = 64).await;
    let (mut a, _, _) = Client::device(&hub, "store-1", "pos-a").await;
    let (mut b, _, _) = Client::device(&hub, "store-1", "pos-b").await;
    let id = Uuid::new_v4();
    let t = now_ms();
    let batch = vec![
        upsert("products", json!({"id": id}), product(id, "Scone", 300), 1, t, 0),
        upsert("nope", json!({"id": id}), json!({"name": "x"}), 2, t, 0),
        upsert("products", json!({"id": id}), json!({"colour": "red"}), 3, t, 0),
        upsert("products", json!({"id": id}), json!({"price_cents": "abc"}), 4, t, 0),
        upsert("products", json!({"id": "not-a-uuid"}), json!({"name": "x"}), 5, t, 0),
        // One good and one bad field: the good one must not be written either.
        upsert("products", json!({"id": id}), json!({"name": "Renamed", "price_cents": -5}), 6, t, 0),
        upsert("products", json!({}), json!({"name": "no key"}), 7, t, 0),
        upsert("products", json!({"id": id}), json!({"tenant_id": "store-2"}), 8, t, 0),
        upsert("products", json!({"id": id}), json!({"name": "x".repeat(100)}), 9, t, 0),
        upsert("products", json!({"id": id}), json!({"price_cents": 999}), 10, t + 1, 0),
    ];
    let results = a.push(batch).await;
    let got: Vec<(ChangeStatus, Option<ErrorCode>)> = results.iter().map(|r| (r.status, r.reason)).collect();
    use ChangeStatus::*;
    assert_eq!(
        got,
        vec![
            (Applied, None),
            (Rejected, Some(ErrorCode::UnknownTable)),
            (Rejected, Some(ErrorCode::UnknownColumn)),
            (Rejected, Some(ErrorCode::InvalidValue)),
            (Rejected, Some(ErrorCode::InvalidKey)),
            (Rejected, Some(ErrorCode::InvalidValue)),
            (Rejected, Some(ErrorCode::InvalidKey)),
            (Rejected, Some(ErrorCode::TenantMismatch)),
            (Rejected, Some(ErrorCode::ValueTooLarge)),
            // Base 0 on a row the batch created: merged (the same device wrote it, no conflict).
            (Merged, None),
        ]
    );
    assert!(results[9].lost_fields.is_empty());
    for r in results.iter().filter(|r| r.status == Rejected) {
        assert!(r.seq.is_none() && r.message.as_deref().is_some_and(|m| !m.is_empty()), "{r:?}");
    }
    let (name, price): (String, i32) = sqlx::query_as("select name, price_cents from products where id = $1").bind(id).fetch_one(&hub.db).await.unwrap();
    assert_eq!((name.as_str(), price), ("Scone", 999));
    let cursor: i64 = sqlx::query_scalar("select last_device_seq from synchub.device_cursors where tenant_id = 'store-1' and device_id = 'pos-a'")
        .fetch_one(&hub.db)
        .await
        .unwrap();
    assert_eq!(cursor, 10, "rejected changes still advance the cursor");
    let logged: i64 = sqlx::query_scalar("select count(*) from synchub.change_log where tenant_id = 'store-1'").fetch_one(&hub.db).await.unwrap();
    assert_eq!(logged, 2);

    let (deltas, _) = b.next_deltas().await;
    let mut seen = deltas;
    while seen.len() < 2 {
        seen.extend(b.next_deltas().await.0);
    }
    assert_eq!(seen.len(), 2, "the other device receives the two applied changes only");
    assert_eq!(seen[1].row.as_ref().unwrap()["name"], json!("Scone"));
    hub.shutdown().await;
}

#[actix_web::test]
async fn abuse_closes_the_socket_with_a_code() {
    let hub = TestHub::start_with(|c| {
        c.max_frame_bytes = 64 * 1024;
        c.max_errors_per_minute = 3;
        c.hello_timeout_ms = 400;
    })
    .await;

    // A frame over max_frame_bytes: 1009.
    let mut c = hub.client().await;
    c.hello(&token("store-1", "u1", "Employee", Some("d1")), None, None).await;
    c.until_up_to_date().await;
    c.send_raw(Message::Text("x".repeat(100 * 1024))).await;
    assert_eq!(c.expect_close().await, 1009);

    // Too many bad frames in a minute: each is answered, then 4009.
    let mut c = hub.client().await;
    c.hello(&token("store-1", "u2", "Employee", Some("d2")), None, None).await;
    c.until_up_to_date().await;
    for _ in 0..3 {
        c.send_raw(Message::Text("nope".into())).await;
        assert_eq!(next_error(&mut c).await.0, ErrorCode::MalformedFrame);
    }
    c.send_raw(Message::Text("nope".into())).await;
    assert_eq!(c.expect_close().await, 4009);

    // A bad token: invalid_token, then 4001.
    let mut c = hub.client().await;
    c.send(&ClientFrame::Hello { id: 1, versions: vec![1], token: "not.a.token".into(), device_id: Some("d3".into()), position: None }).await;
    assert_eq!(next_error(&mut c).await, (ErrorCode::InvalidToken, Some(1)));
    assert_eq!(c.expect_close().await, 4001);

    // A token signed with another secret.
    let mut c = hub.client().await;
    let forged = synchub::auth::mint_hs256("another-secret", &json!({"sub": "u", "role": "Manager", "tenant_id": "store-1", "exp": synchub::auth::unix_now() + 60}));
    c.send(&ClientFrame::Hello { id: 1, versions: vec![1], token: forged, device_id: Some("d4".into()), position: None }).await;
    assert_eq!(next_error(&mut c).await, (ErrorCode::InvalidToken, Some(1)));
    assert_eq!(c.expect_close().await, 4001);

    // No protocol version in common: 4003.
    let mut c = Client::connect(hub.addr, Encoding::MsgPack).await;
    c.send(&ClientFrame::Hello { id: 1, versions: vec![99], token: token("store-1", "u5", "Employee", Some("d5")), device_id: None, position: None })
        .await;
    assert_eq!(next_error(&mut c).await, (ErrorCode::UnsupportedVersion, Some(1)));
    assert_eq!(c.expect_close().await, 4003);

    // No hello in time: 4000.
    let mut c = hub.client().await;
    assert_eq!(c.expect_close().await, 4000);
    hub.shutdown().await;
}
