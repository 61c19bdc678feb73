//! Session control across a cluster, with two hubs in this process over one database and a
//! nats-server of the test's own: a token refresh sent to the node that does not hold the
//! session, a device that reconnects to the other node while its old socket lingers, a
//! broadcast and conflict news sent on one node for sessions on the other, and a tenant's rate
//! shared by the nodes.

mod common;

use std::time::Duration;

use common::nats::NatsServer;
use common::{token, upsert, Api, Client, TestHub, SECRET, WAIT};
use protocol::{ClientFrame, ServerFrame};
use serde_json::json;
use synchub::config::{Secret, ServiceToken};

const TENANT: &str = "store-cluster";
const BRIDGE: &str = "bridge-token-0123456789";

async fn two_nodes(nats: &NatsServer, adjust: impl Fn(&mut synchub::config::Config) + Copy) -> (TestHub, TestHub) {
    let url = common::fresh_database().await;
    let node = |name: &'static str| {
        move |c: &mut synchub::config::Config| {
            c.nats_url = Some(nats.url());
            c.node_id = Some(name.into());
            c.cluster_heartbeat_ms = 200;
            c.cluster_node_timeout_ms = 1500;
            c.service_tokens = vec![ServiceToken { name: "bridge".into(), token: Secret(BRIDGE.into()), tenants: vec![] }];
            adjust(c);
        }
    };
    let a = TestHub::start_on(url.clone(), node("node-a")).await;
    let b = TestHub::start_on(url, node("node-b")).await;
    // Both know of each other before the test begins.
    for hub in [&a, &b] {
        wait_for(|| async { metric(hub, "synchub_cluster_nodes").await == Some(2.0) }, "the nodes see each other").await;
    }
    (a, b)
}

async fn metric(hub: &TestHub, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{}/metrics", hub.addr)).await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.parse().ok()))
}

async fn wait_for<F, Fut>(mut check: F, what: &str)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn log_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cluster-sessions-{}", uuid::Uuid::new_v4().simple()))
}

#[actix_web::test]
async fn a_token_refresh_sent_to_another_node_reaches_the_session() {
    let nats = NatsServer::start(&log_dir());
    let (a, b) = two_nodes(&nats, |_| {}).await;
    let mut device = a.client().await;
    let id = device.next_id();
    device.send(&ClientFrame::Hello { mode: Default::default(), id, versions: vec![1], token: token(TENANT, "u1", "Employee", Some("pos-1")), device_id: None, position: None }).await;
    let session = device.expect(|f| match f { ServerFrame::Welcome { session_id, .. } => Some(*session_id), _ => None }).await;
    let http = reqwest::Client::new();
    let refresh = |hub: &TestHub, token: String| http.post(format!("http://{}/v1/sessions/{session}/token", hub.addr)).bearer_auth(token).send();

    // To node B, which does not hold it: passed on to node A, which takes it.
    let fresh = synchub::auth::mint_hs256(SECRET, &json!({"sub": "u1", "role": "Employee", "tenant_id": TENANT, "device_id": "pos-1", "exp": synchub::auth::unix_now() + 7200}));
    let answer = refresh(&b, fresh).await.unwrap();
    assert_eq!(answer.status(), 200);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert!(body["expires_at"].as_u64().unwrap() > synchub::auth::unix_now() + 3600, "{body}");

    // The node holding it checks the token by its own rules: another tenant's token is refused
    // with the code the session gives, whichever node was asked.
    let foreign = token("store-other", "u1", "Employee", Some("pos-1"));
    let (on_a, on_b) = (refresh(&a, foreign.clone()).await.unwrap(), refresh(&b, foreign).await.unwrap());
    assert_eq!(on_a.status(), on_b.status());
    assert_ne!(on_b.status(), 200);
    let (on_a, on_b): (serde_json::Value, serde_json::Value) = (on_a.json().await.unwrap(), on_b.json().await.unwrap());
    assert_eq!(on_a["error"]["code"], on_b["error"]["code"], "{on_a} {on_b}");

    // A session no node holds: 404, as on one node.
    let nobody = http
        .post(format!("http://{}/v1/sessions/{}/token", b.addr, uuid::Uuid::new_v4()))
        .bearer_auth(token(TENANT, "u1", "Employee", Some("pos-1")))
        .send()
        .await
        .unwrap();
    assert_eq!(nobody.status(), 404);
    a.shutdown().await;
    b.shutdown().await;
}

#[actix_web::test]
async fn a_device_that_moves_to_another_node_replaces_its_old_session_there() {
    let nats = NatsServer::start(&log_dir());
    let (a, b) = two_nodes(&nats, |_| {}).await;
    let (mut old, _, _) = Client::device(&a, TENANT, "pos-7").await;
    let (_new, _, _) = Client::device(&b, TENANT, "pos-7").await;
    assert_eq!(old.expect_close().await, protocol::CloseCode::Replaced.code(), "one live session per device, across nodes");
    a.shutdown().await;
    b.shutdown().await;
}

#[actix_web::test]
async fn broadcasts_and_conflict_news_reach_sessions_on_the_other_node() {
    let nats = NatsServer::start(&log_dir());
    let (a, b) = two_nodes(&nats, |_| {}).await;
    let (mut board, _) = Client::dashboard(&b, TENANT, "mgr", "Manager").await;
    let watch = board.send_subscribe("c", None, Vec::new(), false, Some(protocol::Channel::Conflicts)).await;
    board.expect(|f| matches!(f, ServerFrame::Subscribed { id, .. } if *id == watch).then_some(())).await;

    let api = Api::of(&a);
    let (status, body) = api.post(&format!("/v1/tenants/{TENANT}/broadcast"), Some(BRIDGE), &json!({"channel": "alerts", "payload": {"till": 3}})).await;
    assert_eq!(status, 202, "{body}");
    let payload = board.expect(|f| match f { ServerFrame::Broadcast { channel, payload, .. } if channel == "alerts" => Some(payload.clone()), _ => None }).await;
    assert_eq!(payload, json!({"till": 3}));

    // Two devices on node A write the same field from the same base: a conflict, told on B.
    let (mut one, _, _) = Client::device(&a, TENANT, "pos-1").await;
    let (mut two, _, _) = Client::device(&a, TENANT, "pos-2").await;
    let t = synchub::auth::unix_now() * 1000;
    let tea = uuid::Uuid::new_v4();
    let created = one.push(vec![upsert("products", json!({"id": tea}), json!({"sku": "TEA", "name": "Tea", "price_cents": 300}), 1, t, 0)]).await;
    let base = created[0].seq.expect("created");
    one.push(vec![upsert("products", json!({"id": tea}), json!({"price_cents": 310}), 2, t + 1, base)]).await;
    two.push(vec![upsert("products", json!({"id": tea}), json!({"price_cents": 320}), 1, t + 2, base)]).await;
    let open = board.expect(|f| match f { ServerFrame::Conflict { open, .. } => Some(*open), _ => None }).await;
    assert_eq!(open, 1);
    a.shutdown().await;
    b.shutdown().await;
}

#[actix_web::test]
async fn a_tenants_push_rate_is_shared_by_the_nodes() {
    let nats = NatsServer::start(&log_dir());
    let (a, b) = two_nodes(&nats, |c| {
        c.tenant_push_rate = 1;
        c.tenant_push_burst = 4;
        c.device_push_rate = 1000;
        c.device_push_burst = 1000;
    })
    .await;
    let (mut one, _, _) = Client::device(&a, TENANT, "pos-1").await;
    let (mut two, _, _) = Client::device(&b, TENANT, "pos-2").await;
    let t = synchub::auth::unix_now() * 1000;
    let mut acked = 0;
    for (n, client) in [&mut one, &mut two].into_iter().enumerate() {
        for i in 0..4u64 {
            let id = client.next_id();
            let change = upsert("products", json!({"id": uuid::Uuid::new_v4()}), json!({"sku": format!("S{n}{i}"), "name": format!("item {n}.{i}"), "price_cents": 100}), i + 1, t, 0);
            client.send(&ClientFrame::Push { id, batch_id: uuid::Uuid::now_v7(), changes: vec![change] }).await;
            let answer = client
                .expect(|f| match f {
                    ServerFrame::Ack { id: got, .. } if *got == id => Some(true),
                    ServerFrame::Error { id: Some(got), code, .. } if *got == id => Some(*code != protocol::ErrorCode::RateLimited),
                    _ => None,
                })
                .await;
            acked += usize::from(answer);
        }
    }
    // A burst of 4 for the tenant, 2 per node: not 4 on each.
    assert_eq!(acked, 4, "the tenant's burst holds across the two nodes");
    a.shutdown().await;
    b.shutdown().await;
}

/// Node A keeps the rows its groups wrote; node B's commit to one of them, once A has fanned it
/// out, must drop that row from A's cache: A's next merge of it sees B's write (and loses to
/// it, B's clock being later), not the row as A last left it. A SQL client's write is seen the
/// same way.
#[actix_web::test]
async fn a_node_merges_against_rows_another_node_or_a_sql_client_wrote() {
    let nats = NatsServer::start(&log_dir());
    let (a, b) = two_nodes(&nats, |_| {}).await;
    let (mut on_a, _, _) = Client::device(&a, TENANT, "pos-1").await;
    let (mut on_b, _, _) = Client::device(&b, TENANT, "pos-2").await;
    let t = synchub::auth::unix_now() * 1000;
    let tea = uuid::Uuid::new_v4();
    let key = json!({"id": tea});
    let created = on_a.push(vec![upsert("products", key.clone(), json!({"sku": "TEA", "name": "Tea", "price_cents": 300}), 1, t, 0)]).await;
    let v1 = created[0].seq.unwrap();
    let raised = on_a.push(vec![upsert("products", key.clone(), json!({"price_cents": 310}), 2, t + 10, v1)]).await;
    let v2 = raised[0].seq.unwrap();
    // B writes the price later (by its clock), from what it has seen.
    let on_b_write = on_b.push(vec![upsert("products", key.clone(), json!({"price_cents": 500}), 1, t + 1_000, v2)]).await;
    let v3 = on_b_write[0].seq.unwrap();
    // A's device sees B's change: node A has fanned it out (and followed the head).
    loop {
        let (deltas, _) = on_a.next_deltas().await;
        if deltas.iter().any(|d| d.seq == v3) {
            break;
        }
    }
    // A, offline meanwhile, writes an older price from v2: B's later write wins the field.
    let stale = on_a.push(vec![upsert("products", key.clone(), json!({"price_cents": 320}), 3, t + 20, v2)]).await;
    assert_eq!(stale[0].status, protocol::ChangeStatus::Conflict, "{stale:?}");
    let price: i32 = sqlx::query_scalar("select price_cents from products where tenant_id = $1 and id = $2").bind(TENANT).bind(tea).fetch_one(&a.db).await.unwrap();
    assert_eq!(price, 500, "node A merged against the row as node B left it");

    // A SQL client's write: A's next merge sees it too.
    sqlx::query("update products set price_cents = 700 where tenant_id = $1 and id = $2").bind(TENANT).bind(tea).execute(&a.db).await.unwrap();
    let head: i64 = sqlx::query_scalar("select head_seq from synchub.tenants where tenant_id = $1").bind(TENANT).fetch_one(&a.db).await.unwrap();
    loop {
        let (deltas, _) = on_a.next_deltas().await;
        if deltas.iter().any(|d| d.seq == head as u64) {
            break;
        }
    }
    let after_sql = on_a.push(vec![upsert("products", key.clone(), json!({"price_cents": 330}), 4, t + 30, v3)]).await;
    assert_eq!(after_sql[0].status, protocol::ChangeStatus::Conflict, "{after_sql:?}");
    let price: i32 = sqlx::query_scalar("select price_cents from products where tenant_id = $1 and id = $2").bind(TENANT).bind(tea).fetch_one(&a.db).await.unwrap();
    assert_eq!(price, 700, "the SQL client's write is later than pos-1's clock");
    a.shutdown().await;
    b.shutdown().await;
}
