//! Recording device traffic to a capture file, and replaying it with the load tester as
//! renamed copies against another hub.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use protocol::capture::{CaptureEntry, CaptureEvent, CaptureHeader};
use protocol::{ChangeStatus, ClientFrame, Encoding, ServerFrame};
use serde_json::{json, Value};
use synchub_loadtest::capture::Remap;
use synchub_loadtest::client::Target;
use synchub_loadtest::replay::{self, ReplayArgs};
use synchub_loadtest::tokens::TokenSource;
use uuid::Uuid;

const RECORDED: &str = "store-rec";
const NOT_RECORDED: &str = "store-other";
/// Pause between the recorded devices' steps, so that a replay at 1× keeps their order.
const STEP: Duration = Duration::from_millis(400);

/// Rows of a tenant as (table, row) with the columns a replay must reproduce.
async fn rows(db: &sqlx::PgPool, tenant: &str) -> Vec<(String, Value)> {
    let queries = [
        ("products", "select jsonb_build_object('id', id, 'sku', sku, 'name', name, 'price_cents', price_cents, 'tenant_id', tenant_id) from products where tenant_id = $1 order by sku"),
        ("customers", "select jsonb_build_object('id', id, 'name', name, 'tenant_id', tenant_id) from customers where tenant_id = $1 order by name"),
        ("orders", "select jsonb_build_object('id', id, 'customer_id', customer_id, 'total_cents', total_cents, 'tenant_id', tenant_id) from orders where tenant_id = $1"),
        ("order_lines", "select jsonb_build_object('order_id', order_id, 'line_no', line_no, 'product_id', product_id, 'quantity', quantity, 'tenant_id', tenant_id) from order_lines where tenant_id = $1 order by line_no"),
    ];
    let mut out = Vec::new();
    for (table, sql) in queries {
        for (row,) in sqlx::query_as::<_, (Value,)>(sql).bind(tenant).fetch_all(db).await.unwrap() {
            out.push((table.to_string(), row));
        }
    }
    out
}

#[actix_web::test]
async fn recorded_traffic_replays_as_renamed_copies_with_the_same_rows() {
    let dir = std::env::temp_dir().join(format!("synchub-capture-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let capture = dir.join("traffic.jsonl");
    let path = capture.clone();
    let hub = TestHub::start_with(move |c| {
        c.record_file = Some(path);
        c.record_tenants = vec![RECORDED.into()];
    })
    .await;

    // A till (JSON) rings up a sale, then corrects the price; a phone (MessagePack) renames the
    // product concurrently and refreshes its token; a device of another tenant is not recorded.
    let till_token = token(RECORDED, "ann", "Employee", Some("till-1"));
    let mut till = hub.client().await;
    till.hello(&till_token, None, None).await;
    till.until_up_to_date().await;
    let (product, customer, order) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let t0 = now_ms();
    let sale = till
        .push(vec![
            upsert("products", json!({"id": product}), json!({"sku": "TEA", "name": "Tea", "price_cents": 500, "tenant_id": RECORDED}), 1, t0, 0),
            upsert("customers", json!({"id": customer}), json!({"name": "Bo"}), 2, t0, 0),
            upsert("orders", json!({"id": order}), json!({"store_id": "s1", "customer_id": customer, "total_cents": 1000}), 3, t0, 0),
            upsert("order_lines", json!({"order_id": order, "line_no": 1}), json!({"product_id": product, "quantity": 2, "unit_price_cents": 500}), 4, t0, 0),
        ])
        .await;
    assert!(sale.iter().all(|r| r.status == ChangeStatus::Applied), "{sale:?}");
    tokio::time::sleep(STEP).await;
    let phone_token = token(RECORDED, "bea", "Manager", Some("phone-1"));
    let mut phone = Client::connect(hub.addr, Encoding::MsgPack).await;
    phone.hello(&phone_token, None, None).await;
    phone.until_up_to_date().await;
    tokio::time::sleep(STEP).await;
    let price = till.push(vec![upsert("products", json!({"id": product}), json!({"price_cents": 450}), 5, t0 + 10, sale[0].seq.unwrap())]).await;
    assert_eq!(price[0].status, ChangeStatus::Applied);
    tokio::time::sleep(STEP).await;
    // Based on the product as first written: the price change is concurrent, on another field.
    let rename = phone.push(vec![upsert("products", json!({"id": product}), json!({"name": "Green tea"}), 1, t0 + 20, sale[0].seq.unwrap())]).await;
    assert_eq!(rename[0].status, ChangeStatus::Merged, "{rename:?}");
    let fresh_token = token(RECORDED, "bea", "Manager", Some("phone-1"));
    phone.send(&ClientFrame::Auth { id: 90, token: fresh_token.clone() }).await;
    phone.expect(|f| matches!(f, ServerFrame::AuthOk { id: 90, .. }).then_some(())).await;

    let other_token = token(NOT_RECORDED, "cy", "Employee", Some("till-9"));
    let (mut other, _, _) = Client::device(&hub, NOT_RECORDED, "till-9").await;
    other.push(vec![upsert("products", json!({"id": Uuid::now_v7()}), json!({"sku": "X", "name": "X", "price_cents": 1}), 1, t0, 0)]).await;

    let original = rows(&hub.db, RECORDED).await;
    assert_eq!(original.len(), 4);
    till.ws.close(None).await.unwrap();
    phone.ws.close(None).await.unwrap();
    other.ws.close(None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    hub.shutdown().await;

    // The capture: a header, the recorded tenant's events only, no token anywhere.
    let text = std::fs::read_to_string(&capture).unwrap();
    for secret in [&till_token, &phone_token, &fresh_token, &other_token] {
        let signature = secret.rsplit('.').next().unwrap();
        assert!(!text.contains(signature), "a token was written to the capture");
    }
    let mut lines = text.lines();
    let header: CaptureHeader = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(header.synchub_capture, 1);
    let entries: Vec<CaptureEntry> = lines.map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(entries.iter().all(|e| e.tenant == RECORDED), "only the configured tenant is recorded");
    // Each session's entries are in time order (sessions on different threads interleave).
    for session in entries.iter().map(|e| e.session).collect::<HashSet<_>>() {
        let times: Vec<u64> = entries.iter().filter(|e| e.session == session).map(|e| e.t_us).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "entries of session {session} are in time order");
    }
    let till_events: Vec<&str> = entries
        .iter()
        .filter(|e| e.device == "till-1")
        .map(|e| match &e.event {
            CaptureEvent::Frame { frame: ClientFrame::Hello { token, .. }, msgpack: false } if token.is_empty() => "hello",
            CaptureEvent::Frame { frame: ClientFrame::Push { .. }, msgpack: false } => "push",
            CaptureEvent::Ack { .. } => "ack",
            CaptureEvent::Close => "close",
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(till_events, ["hello", "push", "ack", "push", "ack", "close"]);
    let phone_entry = entries.iter().find(|e| e.device == "phone-1").unwrap();
    assert_eq!((phone_entry.user.as_str(), phone_entry.role.as_str()), ("bea", "Manager"));
    assert!(entries.iter().any(|e| matches!(&e.event, CaptureEvent::Frame { frame: ClientFrame::Auth { token, .. }, msgpack: true } if token.is_empty())));
    let first_ack = entries.iter().find_map(|e| match &e.event {
        CaptureEvent::Ack { results, .. } => Some(results.clone()),
        _ => None,
    });
    assert_eq!(first_ack.unwrap().iter().map(|r| r.seq).collect::<Vec<_>>(), sale.iter().map(|r| r.seq).collect::<Vec<_>>());

    // Replay at 1× as two copies against a fresh hub: each copy ends with the recorded rows,
    // under its own tenant and keys, and nothing of the other tenant is played.
    let target_hub = TestHub::start().await;
    let target = Target::new(&format!("ws://{}/v1/ws", target_hub.addr), Encoding::Json, 0).unwrap();
    let args = ReplayArgs { capture: capture.clone(), speed: 1.0, copies: 2, tenants: vec![], max_secs: 60, id_prefix: Some("rp".into()) };
    let report = replay::run(target, TokenSource::Secret(SECRET.into()), args, None).await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.changes_sent, 2 * 6);
    assert_eq!((report.outcomes["applied"], report.outcomes["merged"], report.outcomes["rejected"]), (2 * 5, 2, 0));
    assert_eq!(report.connections_opened, 2 * 2);
    let keys: HashSet<String> = [product, customer, order].iter().map(|u| u.to_string()).collect();
    for copy in 0..2 {
        let remap = Remap::new("rp", copy);
        let replayed_tenant = format!("rp-{copy}-{RECORDED}");
        let expected: Vec<(String, Value)> =
            original.iter().map(|(table, row)| (table.clone(), Value::Object(remap.object(row.as_object().unwrap(), RECORDED, &keys)))).collect();
        let got = rows(&target_hub.db, &replayed_tenant).await;
        assert_eq!(got, expected, "copy {copy}");
        assert_eq!(got[0].1["name"], json!("Green tea"));
        assert_ne!(got[0].1["id"], json!(product), "keys are renamed");
    }
    let others: i64 = sqlx::query_scalar("select count(*) from products where tenant_id like 'rp-%' and tenant_id like '%other'")
        .fetch_one(&target_hub.db)
        .await
        .unwrap();
    assert_eq!(others, 0);
    target_hub.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
