//! Operations endpoints: health, readiness, and Prometheus metrics that follow what happens.

mod common;

use common::*;
use protocol::ChangeStatus;
use serde_json::json;
use uuid::Uuid;

async fn get(hub: &TestHub, path: &str) -> (u16, String) {
    let response = reqwest::get(format!("http://{}{path}", hub.addr)).await.expect("HTTP request");
    (response.status().as_u16(), response.text().await.unwrap())
}

/// The value of one sample line, e.g. `synchub_changes_total{status="applied"}`.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
        .parse()
        .unwrap()
}

#[actix_web::test]
async fn health_readiness_and_metrics() {
    let hub = TestHub::start().await;
    assert_eq!(get(&hub, "/healthz").await, (200, "ok".to_string()));
    assert_eq!(get(&hub, "/readyz").await, (200, "ready\npostgres: up\nnats: off\n".to_string()), "one node: no NATS link");

    let (status, before) = get(&hub, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(sample(&before, "synchub_sessions"), 0.0);
    assert_eq!(sample(&before, "synchub_changes_total{status=\"applied\"}"), 0.0);

    let (mut a, _, _) = Client::device(&hub, "store-1", "pos-a").await;
    let (mut b, _, _) = Client::device(&hub, "store-1", "pos-b").await;
    let id = Uuid::new_v4();
    let results = a
        .push(vec![
            upsert("products", json!({"id": id}), product(id, "Tea", 300), 1, now_ms(), 0),
            upsert("products", json!({"id": id}), json!({"price_cents": "free"}), 2, now_ms(), 0),
        ])
        .await;
    assert_eq!(results[0].status, ChangeStatus::Applied);
    assert_eq!(results[1].status, ChangeStatus::Rejected);
    b.next_deltas().await;

    let (_, after) = get(&hub, "/metrics").await;
    assert_eq!(sample(&after, "synchub_sessions"), 2.0);
    assert_eq!(sample(&after, "synchub_sessions_opened_total"), 2.0);
    assert_eq!(sample(&after, "synchub_tenants_active"), 1.0);
    assert_eq!(sample(&after, "synchub_batches_pushed_total"), 1.0);
    assert_eq!(sample(&after, "synchub_changes_total{status=\"applied\"}"), 1.0);
    assert_eq!(sample(&after, "synchub_changes_total{status=\"rejected\"}"), 1.0);
    assert_eq!(sample(&after, "synchub_errors_total{code=\"invalid_value\"}"), 1.0);
    assert_eq!(sample(&after, "synchub_deltas_committed_total"), 1.0);
    assert!(sample(&after, "synchub_group_commit_seconds_count") >= 1.0);
    assert!(sample(&after, "synchub_frames_sent_total") >= 5.0, "welcome, up_to_date ×2, ack, delta");
    assert_eq!(sample(&after, "synchub_tenant_queue_batches"), 0.0);
    assert_eq!(sample(&after, "synchub_merge_rows_total{source=\"postgres\"}"), 1.0);
    assert_eq!(sample(&after, "synchub_merge_rows_total{source=\"cache\"}"), 0.0);

    // The row's next write finds it kept by the tenant actor instead of reading it again.
    let seq = results[0].seq.expect("committed");
    let results = a.push(vec![upsert("products", json!({"id": id}), json!({"price_cents": 310}), 3, now_ms(), seq)]).await;
    assert_eq!(results[0].status, ChangeStatus::Applied);
    let (_, kept) = get(&hub, "/metrics").await;
    assert_eq!(sample(&kept, "synchub_merge_rows_total{source=\"postgres\"}"), 1.0);
    assert_eq!(sample(&kept, "synchub_merge_rows_total{source=\"cache\"}"), 1.0);
    assert_eq!(sample(&kept, "synchub_row_cache_rows"), 1.0);

    // A second session of pos-a replaces the first: counted as a 4010 close.
    let (_c, _, _) = Client::device(&hub, "store-1", "pos-a").await;
    assert_eq!(a.expect_close().await, 4010);
    let (_, replaced) = get(&hub, "/metrics").await;
    assert_eq!(sample(&replaced, "synchub_session_closes_total{code=\"4010\"}"), 1.0);
    hub.shutdown().await;
}
