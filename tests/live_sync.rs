//! Two devices of one tenant in live sync, and a plain SQL write reaching a device.

mod common;

use common::*;
use protocol::{ChangeStatus, Op};
use serde_json::json;
use uuid::Uuid;

#[actix_web::test]
async fn two_devices_in_live_sync() {
    let hub = TestHub::start().await;
    let (mut a, _, _) = Client::device(&hub, "store-1", "pos-a").await;
    let (mut b, _, _) = Client::device(&hub, "store-1", "pos-b").await;

    let id = Uuid::new_v4();
    let results = a.push(vec![upsert("products", json!({"id": id}), product(id, "Latte", 420), 1, now_ms(), 0)]).await;
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].status, ChangeStatus::Applied);
    let seq = results[0].seq.expect("committed at a seq");

    let (deltas, frame_seq) = b.next_deltas().await;
    assert_eq!(frame_seq, seq);
    assert_eq!(deltas.len(), 1);
    let d = &deltas[0];
    assert_eq!((d.seq, d.op, d.table.as_str(), d.origin.as_deref()), (seq, Op::Upsert, "products", Some("pos-a")));
    let row = d.row.as_ref().unwrap();
    assert_eq!(row["name"], json!("Latte"));
    assert_eq!(row["price_cents"], json!(420));
    assert_eq!(row["tenant_id"], json!("store-1"), "tenant column filled from the token");

    // B answers; A receives it, and never an echo of its own change.
    let results = b.push(vec![upsert("products", json!({"id": id}), json!({"price_cents": 450}), 1, now_ms(), seq)]).await;
    assert_eq!(results[0].status, ChangeStatus::Applied);
    let (deltas, _) = a.next_deltas().await;
    assert_eq!(deltas.len(), 1);
    assert_eq!(deltas[0].origin.as_deref(), Some("pos-b"));
    assert_eq!(deltas[0].old.as_ref().unwrap()["price_cents"], json!(420));
    assert_eq!(deltas[0].row.as_ref().unwrap()["price_cents"], json!(450));

    let stored: i32 = sqlx::query_scalar("select price_cents from products where id = $1").bind(id).fetch_one(&hub.db).await.unwrap();
    assert_eq!(stored, 450);
    hub.shutdown().await;
}

#[actix_web::test]
async fn plain_sql_write_reaches_a_device() {
    let hub = TestHub::start().await;
    let (mut a, _, _) = Client::device(&hub, "store-1", "pos-a").await;
    let id = Uuid::new_v4();
    sqlx::query("insert into products (tenant_id, id, sku, name, price_cents) values ('store-1', $1, 'BO-1', 'Back office bagel', 199)")
        .bind(id)
        .execute(&hub.db)
        .await
        .unwrap();
    sqlx::query("update products set price_cents = 209 where id = $1").bind(id).execute(&hub.db).await.unwrap();
    // Another tenant's write must not arrive.
    sqlx::query("insert into products (tenant_id, id, sku, name, price_cents) values ('store-2', $1, 'X', 'Other', 1)")
        .bind(Uuid::new_v4())
        .execute(&hub.db)
        .await
        .unwrap();

    let mut seen = Vec::new();
    while seen.len() < 2 {
        let (deltas, _) = a.next_deltas().await;
        seen.extend(deltas);
    }
    assert_eq!(seen[0].op, Op::Upsert);
    assert_eq!(seen[0].origin, None, "SQL writes have no origin device");
    assert_eq!(seen[0].row.as_ref().unwrap()["name"], json!("Back office bagel"));
    assert_eq!(seen[1].old.as_ref().unwrap(), &obj(json!({"price_cents": 199})));
    assert_eq!(seen[1].seq, seen[0].seq + 1);
    assert!(a.recv_timeout(std::time::Duration::from_millis(300)).await.is_none(), "nothing of store-2 arrives");
    hub.shutdown().await;
}
