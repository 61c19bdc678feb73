//! `synchub dev --demo`'s simulated tills against a real hub and real Postgres: their sales are
//! committed (the tenant's log advances), their offline episodes end in conflicts that the review
//! API lists (on `price_cents` and on `stock`, each between pos-1 and pos-2, both tills having
//! been the offline one), they reconnect after the hub restarts, and they close their sockets
//! when stopped. Timings are shortened; the defaults are those of `Options::new`.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::Value;
use synchub::demo::{self, devices};

/// Everything the test waits for must happen within this.
const BOUND: Duration = Duration::from_secs(20);

async fn head_seq(db: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("select coalesce((select head_seq from synchub.tenants where tenant_id = $1), 0)")
        .bind(demo::DEMO_TENANT)
        .fetch_one(db)
        .await
        .unwrap()
}

async fn orders(db: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("select count(*) from public.orders where tenant_id = $1").bind(demo::DEMO_TENANT).fetch_one(db).await.unwrap()
}

/// Every conflict of the demo tenant, through `GET /v1/conflicts` with the manager token.
async fn conflicts(hub: &TestHub, manager: &str) -> Vec<Value> {
    let response = reqwest::Client::new()
        .get(format!("http://{}/v1/conflicts?limit=500", hub.addr))
        .bearer_auth(manager)
        .send()
        .await
        .expect("GET /v1/conflicts");
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    body["conflicts"].as_array().cloned().unwrap_or_default()
}

/// Poll `check` until it holds, or fail with `what` and the tills' lines so far.
async fn eventually<F, Fut>(what: &str, lines: &Arc<Mutex<Vec<String>>>, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + BOUND;
    while !check().await {
        if tokio::time::Instant::now() > deadline {
            panic!("{what}: not within {BOUND:?}; the tills said:\n{}", lines.lock().unwrap().join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[actix_web::test]
async fn demo_tills_sync_live_and_log_conflicts_from_offline_episodes() {
    let mut hub = TestHub::start().await;
    demo::seed(&hub.db).await.unwrap();
    let tokens = demo::tokens(SECRET, 1);
    let manager = tokens[2].1.clone();
    let mut options = devices::Options::new(format!("ws://{}/v1/ws", hub.addr), tokens[0].1.clone(), tokens[1].1.clone());
    options.sale_every = Duration::from_millis(400);
    options.first_offline_after = Duration::from_millis(1500);
    options.offline_every = Duration::from_secs(4);
    options.offline_for = Duration::from_millis(1500);

    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let said = lines.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let tills = tokio::spawn(devices::run(
        options,
        hub.db.clone(),
        async move {
            let _ = stopped.await;
        },
        move |line: &str| {
            eprintln!("demo: {line}");
            said.lock().unwrap().push(line.to_owned());
        },
    ));

    // Live changes: sales are committed and the log advances.
    let start_seq = head_seq(&hub.db).await;
    eventually("sales committed", &lines, || async { orders(&hub.db).await >= 5 && head_seq(&hub.db).await > start_seq + 10 }).await;

    // Offline episodes: both tills went offline in turn, and the conflicts are listed.
    eventually("conflicts on price_cents and stock, from both tills coming back", &lines, || async {
        let listed = conflicts(&hub, &manager).await;
        let between_tills = |c: &&Value| {
            let (server, incoming) = (c["server"]["device"].as_str(), c["incoming"]["device"].as_str());
            matches!((server, incoming), (Some("pos-1"), Some("pos-2")) | (Some("pos-2"), Some("pos-1")))
        };
        let field = |name: &str| listed.iter().filter(between_tills).any(|c| c["table"] == "products" && c["field"] == name);
        let came_back_from = |till: &str| listed.iter().any(|c| c["incoming"]["device"] == till && c["field"] == "price_cents");
        field("price_cents") && field("stock") && came_back_from("pos-1") && came_back_from("pos-2")
    })
    .await;
    {
        let said = lines.lock().unwrap();
        assert!(said.iter().any(|l| l.contains("went offline")), "no offline line: {said:?}");
        assert!(said.iter().any(|l| l.contains("came back") && l.contains("conflicts logged")), "no comeback line with conflicts: {said:?}");
    }
    // A few per episode, not a flood: two per episode (up to the race of two live sales).
    let listed = conflicts(&hub, &manager).await.len();
    let episodes = lines.lock().unwrap().iter().filter(|l| l.contains("went offline")).count();
    assert!(listed <= 2 * episodes + 2, "{listed} conflicts from {episodes} episodes");

    // The hub restarts: the tills reconnect with backoff and their sales go on.
    hub.stop().await;
    hub.start_again(|_| {}).await;
    let restarted_seq = head_seq(&hub.db).await;
    eventually("sales after the hub restarted", &lines, || async { head_seq(&hub.db).await > restarted_seq + 5 }).await;
    assert!(lines.lock().unwrap().iter().any(|l| l.contains("connected again")), "no reconnect line");

    // Stopped, the tills close their sockets.
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(3), tills).await.expect("the tills stop").unwrap();
    let running = hub.running.as_ref().unwrap().hub.clone();
    eventually("the tills' sessions closed", &lines, || {
        let open = running.sessions.len();
        async move { open == 0 }
    })
    .await;
    hub.shutdown().await;
}
