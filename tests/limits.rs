//! Rate limits and the session cap: a device, a session or a tenant over its limit is refused
//! `rate_limited` with how long to wait, nothing of the request is done, the same request goes
//! through after that wait, and every other device and tenant goes on as before.

mod common;

use std::time::Duration;

use common::*;
use protocol::{ChangeStatus, ClientFrame, ErrorCode, ServerFrame};
use serde_json::json;
use uuid::Uuid;

fn new_product(device_seq: u64) -> protocol::Change {
    let id = Uuid::now_v7();
    upsert("products", json!({"id": id}), product(id, "Tea", 250), device_seq, now_ms(), 0)
}

/// Send a push; its answer: the statuses, or the error's code and `retry_after_ms`.
async fn push(c: &mut Client, batch_id: Uuid, changes: Vec<protocol::Change>) -> Result<Vec<ChangeStatus>, (ErrorCode, Option<u64>)> {
    let id = c.next_id();
    c.send(&ClientFrame::Push { id, batch_id, changes }).await;
    c.expect(|f| match f {
        ServerFrame::Ack { id: got, results, .. } if *got == id => Some(Ok(results.iter().map(|r| r.status).collect())),
        ServerFrame::Error { id: Some(got), code, retry_after_ms, temporary, .. } if *got == id => {
            assert_eq!(*temporary, code.is_temporary());
            Some(Err((*code, *retry_after_ms)))
        }
        _ => None,
    })
    .await
}

async fn product_count(hub: &TestHub) -> i64 {
    sqlx::query_scalar("select count(*) from products").fetch_one(&hub.db).await.unwrap()
}

#[actix_web::test]
async fn a_device_over_its_push_rate_waits_and_others_go_on() {
    let hub = TestHub::start_with(|config| {
        config.device_push_rate = 1;
        config.device_push_burst = 2;
    })
    .await;
    let (mut d, _, _) = Client::device(&hub, "store-1", "pos-1").await;
    let (mut other, _, _) = Client::device(&hub, "store-1", "pos-2").await;
    assert_eq!(push(&mut d, Uuid::now_v7(), vec![new_product(1)]).await, Ok(vec![ChangeStatus::Applied]));
    assert_eq!(push(&mut d, Uuid::now_v7(), vec![new_product(2)]).await, Ok(vec![ChangeStatus::Applied]));
    let third = (Uuid::now_v7(), vec![new_product(3)]);
    let Err((code, Some(wait))) = push(&mut d, third.0, third.1.clone()).await else { panic!("the third push within the burst's second is limited") };
    assert_eq!(code, ErrorCode::RateLimited);
    assert!(wait > 0 && wait <= 1000, "{wait} ms");
    assert_eq!(product_count(&hub).await, 2, "nothing of the refused push was done");
    // Another device of the tenant is not held back.
    assert_eq!(push(&mut other, Uuid::now_v7(), vec![new_product(1)]).await, Ok(vec![ChangeStatus::Applied]));
    // The same push after the wait goes through.
    tokio::time::sleep(Duration::from_millis(wait)).await;
    assert_eq!(push(&mut d, third.0, third.1).await, Ok(vec![ChangeStatus::Applied]));
    hub.shutdown().await;
}

#[actix_web::test]
async fn a_tenant_over_its_push_rate_is_limited_across_its_devices() {
    let hub = TestHub::start_with(|config| {
        config.tenant_push_rate = 1;
        config.tenant_push_burst = 2;
    })
    .await;
    let (mut a, _, _) = Client::device(&hub, "store-1", "pos-1").await;
    let (mut b, _, _) = Client::device(&hub, "store-1", "pos-2").await;
    let (mut elsewhere, _, _) = Client::device(&hub, "store-2", "pos-1").await;
    assert!(push(&mut a, Uuid::now_v7(), vec![new_product(1)]).await.is_ok());
    assert!(push(&mut b, Uuid::now_v7(), vec![new_product(1)]).await.is_ok());
    assert!(matches!(push(&mut a, Uuid::now_v7(), vec![new_product(2)]).await, Err((ErrorCode::RateLimited, Some(_)))));
    assert!(matches!(push(&mut b, Uuid::now_v7(), vec![new_product(2)]).await, Err((ErrorCode::RateLimited, Some(_)))));
    assert_eq!(push(&mut elsewhere, Uuid::now_v7(), vec![new_product(1)]).await, Ok(vec![ChangeStatus::Applied]), "another tenant");
    hub.shutdown().await;
}

#[actix_web::test]
async fn a_tenant_opening_sessions_too_fast_is_refused_with_4029() {
    let hub = TestHub::start_with(|config| {
        config.tenant_connect_rate = 1;
        config.tenant_connect_burst = 2;
    })
    .await;
    let _first = Client::device(&hub, "store-1", "pos-1").await;
    let _second = Client::device(&hub, "store-1", "pos-2").await;
    let mut third = hub.client().await;
    let id = third.next_id();
    let token = token("store-1", "user-3", "Employee", Some("pos-3"));
    third.send(&ClientFrame::Hello { id, versions: vec![1], token, device_id: None, position: None, mode: Default::default() }).await;
    let (code, wait) = third
        .expect(|f| match f {
            ServerFrame::Error { id: Some(got), code, retry_after_ms, .. } if *got == id => Some((*code, *retry_after_ms)),
            _ => None,
        })
        .await;
    assert_eq!((code, wait.is_some_and(|w| w > 0)), (ErrorCode::RateLimited, true));
    assert_eq!(third.expect_close().await, 4029);
    // Another tenant connects.
    let _other = Client::device(&hub, "store-2", "pos-1").await;
    hub.shutdown().await;
}

#[actix_web::test]
async fn a_session_subscribing_too_fast_is_refused_and_stays_open() {
    let hub = TestHub::start_with(|config| {
        config.session_subscribe_rate = 1;
        config.session_subscribe_burst = 2;
    })
    .await;
    let (mut dash, _) = Client::dashboard(&hub, "store-1", "mgr-1", "Manager").await;
    dash.subscribe_table("a", "products", vec![], false).await;
    dash.subscribe_table("b", "customers", vec![], false).await;
    let id = dash.send_subscribe("c", Some("orders"), vec![], false, None).await;
    assert_eq!(dash.expect_error(id).await, ErrorCode::RateLimited);
    // Still open: the next subscription after the wait is taken.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    dash.subscribe_table("c", "orders", vec![], false).await;
    hub.shutdown().await;
}

#[actix_web::test]
async fn http_requests_over_the_tenants_rate_get_429_with_retry_after() {
    let hub = TestHub::start_with(|config| {
        config.tenant_http_rate = 1;
        config.tenant_http_burst = 2;
    })
    .await;
    let http = reqwest::Client::new();
    let list = |tenant: &str| {
        http.get(format!("http://{}/v1/conflicts", hub.addr)).bearer_auth(token(tenant, "mgr-1", "Manager", None)).send()
    };
    assert_eq!(list("store-1").await.unwrap().status(), 200);
    assert_eq!(list("store-1").await.unwrap().status(), 200);
    let refused = list("store-1").await.unwrap();
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry_after >= 1);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "rate_limited");
    assert!(body["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{body}");
    assert_eq!(list("store-2").await.unwrap().status(), 200, "another tenant");
    hub.shutdown().await;
}

#[actix_web::test]
async fn sessions_past_max_connections_are_refused_at_the_upgrade() {
    let hub = TestHub::start_with(|config| config.max_connections = 2).await;
    let _one = Client::device(&hub, "store-1", "pos-1").await;
    let _two = Client::device(&hub, "store-1", "pos-2").await;
    match tokio_tungstenite::connect_async(format!("ws://{}/v1/ws", hub.addr)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503);
            assert_eq!(response.headers()["retry-after"], "1");
        }
        other => panic!("a third session was not refused: {:?}", other.map(|_| ())),
    }
    // Plain HTTP still answers.
    let ready = reqwest::get(format!("http://{}/healthz", hub.addr)).await.unwrap();
    assert_eq!(ready.status(), 200);
    hub.shutdown().await;
}
