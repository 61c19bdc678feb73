//! Database waits have deadlines. A group commit that hangs (on a lock another client holds)
//! answers `unavailable` after `db_transaction_timeout_ms`. The database frozen (SIGSTOP on
//! every process of the cluster): readiness answers 503, a push and a `hello` for a tenant
//! whose actor is not running answer `unavailable` (not `busy`, which means saturated) within
//! their deadlines. Each time the hub recovers by itself, and the same batch re-sent commits
//! exactly once. This file's cluster is its own (one per test binary), so freezing it hurts no
//! other test; its one test does every step in order.

mod common;

use std::time::{Duration, Instant};

use common::*;
use protocol::{ChangeStatus, ClientFrame, ErrorCode, ServerFrame};
use serde_json::json;
use uuid::Uuid;

/// Generous bound for any answer; the deadlines configured below are far shorter.
const ANSWER: Duration = Duration::from_secs(30);

async fn readyz(hub: &TestHub) -> u16 {
    let client = reqwest::Client::builder().timeout(ANSWER).build().unwrap();
    client.get(format!("http://{}/readyz", hub.addr)).send().await.expect("/readyz answers").status().as_u16()
}

/// The answer to push `id`: its results, or the error's code and whether it is temporary.
async fn push_answer(c: &mut Client, id: u64) -> Result<Vec<protocol::ChangeResult>, (ErrorCode, bool)> {
    loop {
        match c.recv_timeout(ANSWER).await {
            Some(ServerFrame::Ack { id: got, results, .. }) if got == id => return Ok(results),
            Some(ServerFrame::Error { id: Some(got), code, temporary, .. }) if got == id => return Err((code, temporary)),
            Some(_) => continue,
            None => panic!("no answer to push {id} within {ANSWER:?}; closed: {:?}", c.closed),
        }
    }
}

/// Re-send the same batch while it is refused as temporary (the hub may still be recovering).
async fn resend_until_acked(c: &mut Client, batch_id: Uuid, change: &protocol::Change) -> Vec<protocol::ChangeResult> {
    let deadline = Instant::now() + ANSWER;
    loop {
        let id = c.next_id();
        c.send(&ClientFrame::Push { id, batch_id, changes: vec![change.clone()] }).await;
        match push_answer(c, id).await {
            Ok(results) => return results,
            Err((_, true)) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(refused) => panic!("the re-sent batch is refused: {refused:?}"),
        }
    }
}

/// How many times the change is in the log.
async fn logged(hub: &TestHub, change: &protocol::Change) -> i64 {
    sqlx::query_scalar("select count(*) from synchub.change_log where change_id = $1").bind(change.change_id).fetch_one(&hub.db).await.unwrap()
}

#[actix_web::test]
async fn a_hung_or_frozen_database_answers_unavailable_and_the_hub_recovers_by_itself() {
    let hub = TestHub::start_with(|c| {
        c.db_acquire_timeout_ms = 1000;
        c.db_transaction_timeout_ms = 2000;
        c.readyz_timeout_ms = 1000;
    })
    .await;
    let (mut device, _, _) = Client::device(&hub, "store-1", "pos-1").await;
    assert_eq!(readyz(&hub).await, 200);
    // Postgres's own timeouts are set on the hub's connections (defaults: 30 s and 60 s).
    let pool = &hub.running.as_ref().expect("running").hub.store.pool;
    let timeouts: (String, String) =
        sqlx::query_as("select current_setting('statement_timeout'), current_setting('idle_in_transaction_session_timeout')")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(timeouts, ("30s".to_string(), "1min".to_string()));

    // A transaction that hangs: another client holds a lock the group commit needs.
    let locked = Uuid::new_v4();
    let locked_push = upsert("products", json!({"id": locked}), product(locked, "Coffee", 250), 1, now_ms(), 0);
    let locked_batch = Uuid::now_v7();
    let mut holder = hub.db.begin().await.unwrap();
    sqlx::query("lock table public.products in access exclusive mode").execute(&mut *holder).await.unwrap();
    let id = device.next_id();
    device.send(&ClientFrame::Push { id, batch_id: locked_batch, changes: vec![locked_push.clone()] }).await;
    assert_eq!(push_answer(&mut device, id).await.err(), Some((ErrorCode::Unavailable, true)), "a push whose transaction hangs");
    holder.rollback().await.unwrap();
    let results = resend_until_acked(&mut device, locked_batch, &locked_push).await;
    assert!(matches!(results[0].status, ChangeStatus::Applied | ChangeStatus::Duplicate), "{results:?}");
    assert_eq!(logged(&hub, &locked_push).await, 1, "the change is committed exactly once");

    let row = Uuid::new_v4();
    let change = upsert("products", json!({"id": row}), product(row, "Tea", 300), 2, now_ms(), 0);
    let batch_id = Uuid::now_v7();

    {
        let _frozen = Frozen::freeze();
        assert_eq!(readyz(&hub).await, 503, "readiness while the database is frozen");

        let id = device.next_id();
        device.send(&ClientFrame::Push { id, batch_id, changes: vec![change.clone()] }).await;
        assert_eq!(push_answer(&mut device, id).await.err(), Some((ErrorCode::Unavailable, true)), "a push while the database is frozen");

        // A tenant with no running actor: its actor cannot read the tenant's head.
        let mut fresh = hub.client().await;
        let id = fresh.next_id();
        let token = token("store-fresh", "user-fresh", "Employee", Some("pos-fresh"));
        fresh.send(&ClientFrame::Hello { mode: Default::default(), id, versions: vec![1], token, device_id: None, position: None }).await;
        let refused = fresh.recv_timeout(ANSWER).await;
        assert!(
            matches!(refused, Some(ServerFrame::Error { id: Some(got), code: ErrorCode::Unavailable, temporary: true, .. }) if got == id),
            "hello while the database is frozen: {refused:?}"
        );
        assert_eq!(fresh.expect_close().await, 1001);
    }

    // Thawed: ready again without help, and the same batch, re-sent, commits once.
    let deadline = Instant::now() + ANSWER;
    while readyz(&hub).await != 200 {
        assert!(Instant::now() < deadline, "/readyz is not 200 again within {ANSWER:?} of the thaw");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let results = resend_until_acked(&mut device, batch_id, &change).await;
    assert!(matches!(results[0].status, ChangeStatus::Applied | ChangeStatus::Duplicate), "{results:?}");
    assert_eq!(logged(&hub, &change).await, 1, "the change is committed exactly once");
    let rows: i64 = sqlx::query_scalar("select count(*) from public.products where id = $1").bind(row).fetch_one(&hub.db).await.unwrap();
    assert_eq!(rows, 1);

    // And a tenant whose actor could not start before starts now.
    let (_fresh, _, _) = Client::device(&hub, "store-fresh", "pos-fresh").await;
    hub.shutdown().await;
}
