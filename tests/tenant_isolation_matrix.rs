//! Cross-tenant attempts over every entry point at once: frames (push, snapshot, resume),
//! subscriptions, presence, the conflicts channel, broadcasts, the HTTP API (conflict review,
//! session token refresh) and service tokens. Tenant B tries each against tenant A's rows,
//! conflicts and sessions; every attempt reads and writes nothing of A's, and is answered as an
//! attempt against something that does not exist is, so that no answer tells B what A holds.
//! Everything A does meanwhile reaches A's sessions and none of B's.

mod common;

use std::time::Duration;

use common::*;
use protocol::{Channel, ChangeStatus, ClientFrame, Condition, ErrorCode, FilterOp, Position, ServerFrame};
use serde_json::{json, Value};
use synchub::config::{Secret, ServiceToken};
use uuid::Uuid;

const A: &str = "store-a";
const B: &str = "store-b";
/// In every value A writes, so that any frame B receives can be searched for A's data.
const MARK: &str = "A-PRIVATE";
const EVERY_TENANT: &str = "service-token-every-tenant-0123";
const B_ONLY: &str = "service-token-tenant-b-only-0123";

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    async fn call(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let request = match method {
            "GET" => self.http.get(url),
            _ => self.http.post(url).json(&body.unwrap_or(Value::Null)),
        };
        let response = request.bearer_auth(token).send().await.expect("HTTP request");
        let status = response.status().as_u16();
        (status, response.json::<Value>().await.unwrap_or(Value::Null))
    }
}

/// A device's hello, returning its session id (the HTTP refresh names sessions by it).
async fn device_session(hub: &TestHub, tenant: &str, device: &str) -> (Client, Uuid) {
    let mut c = hub.client().await;
    let id = c.next_id();
    let token = token(tenant, &format!("user-{device}"), "Employee", Some(device));
    c.send(&ClientFrame::Hello { mode: Default::default(), id, versions: vec![1], token, device_id: None, position: None }).await;
    let session = c
        .expect(|f| match f {
            ServerFrame::Welcome { session_id, .. } => Some(*session_id),
            _ => None,
        })
        .await;
    c.until_up_to_date().await;
    (c, session)
}

async fn subscribed(c: &mut Client, sub: &str, table: Option<&str>, filter: Vec<Condition>, snapshot: bool, channel: Option<Channel>) {
    let id = c.send_subscribe(sub, table, filter, snapshot, channel).await;
    c.expect(|f| match f {
        ServerFrame::Subscribed { id: got, .. } if *got == id => Some(()),
        ServerFrame::Error { id: Some(got), code, message, .. } if *got == id => panic!("subscribe refused: {code:?} {message}"),
        _ => None,
    })
    .await;
}

/// A round trip on `c`'s socket (a snapshot page of an empty table), so that whatever the hub
/// sent it before is in its inbox; then every frame it holds, as JSON text.
async fn everything_received(c: &mut Client) -> String {
    let id = c.next_id();
    c.send(&ClientFrame::Snapshot { id, table: "customers".into(), after: None, limit: Some(1) }).await;
    c.expect(|f| matches!(f, ServerFrame::SnapshotPage { id: got, .. } if *got == id).then_some(())).await;
    let mut frames: Vec<ServerFrame> = c.inbox.drain(..).collect();
    while let Some(frame) = c.recv_timeout(Duration::from_millis(50)).await {
        frames.push(frame);
    }
    let text = frames.iter().map(|f| serde_json::to_string(f).unwrap()).collect::<Vec<_>>().join("\n");
    c.inbox.extend(frames);
    text
}

/// The answer to an attempt on A's object, and to the same attempt on one that does not exist:
/// the same status and code, and the same message once the ids are set aside.
fn same_answer(what: &str, on_a: (u16, Value), on_nothing: (u16, Value), ids: [&str; 2]) {
    assert_eq!(on_a.0, on_nothing.0, "{what}: status");
    assert_eq!(on_a.1["code"], on_nothing.1["code"], "{what}: code");
    let message = |v: &Value, id: &str| v["message"].as_str().unwrap_or_default().replace(id, "<id>");
    assert_eq!(message(&on_a.1, ids[0]), message(&on_nothing.1, ids[1]), "{what}: message");
    assert!(!on_a.1.to_string().contains(MARK), "{what}: {}", on_a.1);
}

async fn footprint(db: &sqlx::PgPool, tenant: &str) -> Vec<i64> {
    let mut out = Vec::new();
    for table in ["products", "customers", "orders", "order_lines", "synchub.change_log", "synchub.row_versions", "synchub.conflicts", "synchub.device_cursors"] {
        let sql = format!("select count(*) from {table} where tenant_id = $1");
        out.push(sqlx::query_scalar(&sql).bind(tenant).fetch_one(db).await.unwrap());
    }
    out
}

#[actix_web::test]
async fn no_entry_point_crosses_tenants_or_tells_what_another_tenant_holds() {
    let hub = TestHub::start_with(|config| {
        config.service_tokens = vec![
            ServiceToken { name: "bridge".into(), token: Secret(EVERY_TENANT.into()), tenants: vec![] },
            ServiceToken { name: "b-bridge".into(), token: Secret(B_ONLY.into()), tenants: vec![B.into()] },
        ];
    })
    .await;
    let api = Api { base: format!("http://{}", hub.addr), http: reqwest::Client::new() };

    // A's world: a product, a conflict on it, and a session whose id B will try.
    let (mut a1, a1_session) = device_session(&hub, A, "pos-a1").await;
    let (mut a2, _) = device_session(&hub, A, "pos-a2").await;
    let pa = Uuid::now_v7();
    let t = now_ms();
    let created = a1.push(vec![upsert("products", json!({"id": pa}), json!({"sku": MARK, "name": MARK, "price_cents": 100}), 1, t - 5_000, 0)]).await;
    let v1 = created[0].seq.unwrap();
    a1.push(vec![upsert("products", json!({"id": pa}), json!({"price_cents": 200}), 2, t - 2_000, v1)]).await;
    let r = a2.push(vec![upsert("products", json!({"id": pa}), json!({"price_cents": 300}), 1, t, v1)]).await;
    assert_eq!(r[0].status, ChangeStatus::Conflict);
    let a_manager = token(A, "mgr-a", "Manager", None);
    let (_, list) = api.call("GET", "/v1/conflicts", &a_manager, None).await;
    let conflict_id = list["conflicts"][0]["id"].as_i64().expect("A's conflict");
    let (mut a_epoch_client, _, _) = Client::device(&hub, A, "pos-a3").await;
    let a_epoch = {
        let id = a_epoch_client.next_id();
        a_epoch_client.send(&ClientFrame::Snapshot { id, table: "products".into(), after: None, limit: None }).await;
        a_epoch_client.expect(|f| match f {
            ServerFrame::SnapshotPage { id: got, epoch, .. } if *got == id => Some(epoch.clone()),
            _ => None,
        })
        .await
    };
    let a_before = footprint(&hub.db, A).await;

    // B's sessions: a device, and a manager's dashboard watching everything it may.
    let (mut b1, _) = device_session(&hub, B, "pos-b1").await;
    let (mut board, _) = Client::dashboard(&hub, B, "mgr-b", "Manager").await;
    let on_a = vec![Condition { column: "tenant_id".into(), op: FilterOp::Eq, value: json!(A) }];
    subscribed(&mut board, "a-rows", Some("products"), on_a, true, None).await;
    subscribed(&mut board, "all-rows", Some("products"), vec![], true, None).await;
    subscribed(&mut board, "who", None, vec![], false, Some(Channel::Presence)).await;
    subscribed(&mut board, "conflicts", None, vec![], false, Some(Channel::Conflicts)).await;
    let b_manager = token(B, "mgr-b", "Manager", None);
    let nowhere = conflict_id + 1_000_000;

    // HTTP: conflict review, token refresh and service writers, each against A's object and
    // against one that does not exist.
    for (what, method, path, other_path, body) in [
        ("one conflict", "GET", format!("/v1/conflicts/{conflict_id}"), format!("/v1/conflicts/{nowhere}"), None),
        (
            "resolve",
            "POST",
            format!("/v1/conflicts/{conflict_id}/resolve"),
            format!("/v1/conflicts/{nowhere}/resolve"),
            Some(json!({"action": "value", "value": 1})),
        ),
    ] {
        let on_a = api.call(method, &path, &b_manager, body.clone()).await;
        let on_nothing = api.call(method, &other_path, &b_manager, body).await;
        assert_eq!(on_a.0, 404, "{what}: {}", on_a.1);
        same_answer(what, on_a, on_nothing, [&conflict_id.to_string(), &nowhere.to_string()]);
    }
    let (status, list) = api.call("GET", "/v1/conflicts", &b_manager, None).await;
    assert_eq!((status, &list["conflicts"]), (200, &json!([])));
    let (_, counts) = api.call("GET", "/v1/conflicts/counts", &b_manager, None).await;
    assert_eq!(counts, json!({"open": 0, "resolved": 0, "dismissed": 0}));

    let b_device_token = token(B, "user-pos-a1", "Employee", Some("pos-a1"));
    let random_session = Uuid::new_v4();
    let on_a = api.call("POST", &format!("/v1/sessions/{a1_session}/token"), &b_device_token, None).await;
    let on_nothing = api.call("POST", &format!("/v1/sessions/{random_session}/token"), &b_device_token, None).await;
    assert_eq!(on_a.0, 404, "{}", on_a.1);
    same_answer("token refresh", on_a, on_nothing, [&a1_session.to_string(), &random_session.to_string()]);

    let push = |device: &str| json!({"device_id": device, "batch_id": Uuid::now_v7(), "changes": [upsert("products", json!({"id": pa}), json!({"name": "taken"}), 1, t, 0)]});
    let on_a = api.call("POST", &format!("/v1/tenants/{A}/push"), B_ONLY, Some(push("bridge-1"))).await;
    let on_nothing = api.call("POST", "/v1/tenants/store-nowhere/push", B_ONLY, Some(push("bridge-1"))).await;
    assert_eq!(on_a.0, 403, "{}", on_a.1);
    same_answer("service push", on_a, on_nothing, [A, "store-nowhere"]);
    let shout = json!({"channel": "alerts", "payload": "from B"});
    let on_a = api.call("POST", &format!("/v1/tenants/{A}/broadcast"), B_ONLY, Some(shout.clone())).await;
    let on_nothing = api.call("POST", "/v1/tenants/store-nowhere/broadcast", B_ONLY, Some(shout)).await;
    assert_eq!(on_a.0, 403, "{}", on_a.1);
    same_answer("broadcast", on_a, on_nothing, [A, "store-nowhere"]);

    // Frames: B's writes under A's key make B's own row; a forged tenant is refused the same
    // way whether the key exists in A or nowhere; a snapshot and a resume from A's position
    // read nothing of A's.
    let nowhere_key = Uuid::now_v7();
    let results = b1
        .push(vec![
            upsert("products", json!({"id": pa}), json!({"sku": "B-1", "name": "B's own", "price_cents": 5}), 1, t, 0),
            upsert("products", json!({"id": pa, "tenant_id": A}), json!({"price_cents": 1}), 2, t, v1),
            upsert("products", json!({"id": nowhere_key, "tenant_id": A}), json!({"price_cents": 1}), 3, t, v1),
            delete("products", json!({"id": pa, "tenant_id": A}), 4, t, v1),
        ])
        .await;
    let answers: Vec<_> = results.iter().map(|r| (r.status, r.reason, r.message.clone())).collect();
    assert_eq!((answers[0].0, answers[0].1), (ChangeStatus::Applied, None));
    assert_eq!((answers[1].0, answers[1].1), (ChangeStatus::Rejected, Some(ErrorCode::TenantMismatch)));
    assert_eq!(answers[1], answers[2], "the same refusal for A's key and for no key");
    assert_eq!(answers[1], answers[3]);
    let id = b1.next_id();
    b1.send(&ClientFrame::Snapshot { id, table: "products".into(), after: None, limit: None }).await;
    let rows = b1
        .expect(|f| match f {
            ServerFrame::SnapshotPage { id: got, rows, .. } if *got == id => Some(rows.clone()),
            _ => None,
        })
        .await;
    assert_eq!(rows.iter().map(|r| r.row["tenant_id"].clone()).collect::<Vec<_>>(), vec![json!(B)]);
    let hub_ref = &hub;
    let resync_reason = |epoch: String| async move {
        let mut c = hub_ref.client().await;
        c.hello(&token(B, "user-pos-b2", "Employee", Some("pos-b2")), None, Some(Position { epoch, seq: 2 })).await;
        c.expect(|f| match f {
            ServerFrame::MustResync { reason, .. } => Some(*reason),
            _ => None,
        })
        .await
    };
    assert_eq!(resync_reason(a_epoch.clone()).await, resync_reason(Uuid::new_v4().simple().to_string()).await, "A's epoch means nothing to B");

    // A goes on: a write, a new conflict, a broadcast to A, a new session of A's. A's own
    // sessions receive them (the control), B's none of them.
    let (mut a4, _) = device_session(&hub, A, "pos-a4").await;
    a1.push(vec![upsert("products", json!({"id": Uuid::now_v7()}), json!({"sku": "A-2", "name": MARK, "price_cents": 1}), 3, now_ms(), 0)]).await;
    let r = a1.push(vec![upsert("products", json!({"id": pa}), json!({"price_cents": 400}), 4, t - 1_000, v1)]).await;
    assert_eq!(r[0].status, ChangeStatus::Conflict, "a second conflict in A");
    let (status, sent) = api.call("POST", &format!("/v1/tenants/{A}/broadcast"), EVERY_TENANT, Some(json!({"channel": "alerts", "payload": MARK}))).await;
    assert_eq!(status, 202, "{sent}");
    a4.expect(|f| matches!(f, ServerFrame::Broadcast { .. }).then_some(())).await;
    a4.expect(|f| matches!(f, ServerFrame::Delta { deltas, .. } if deltas.iter().any(|d| d.origin.as_deref() == Some("pos-a1"))).then_some(())).await;

    for (who, c) in [("B's device", &mut b1), ("B's dashboard", &mut board)] {
        let received = everything_received(c).await;
        assert!(!received.contains(MARK) && !received.contains(A) && !received.contains("pos-a"), "{who} received A's data:\n{received}");
    }
    // B's dashboard did see its own tenant: B's row, and its own presence.
    let received = everything_received(&mut board).await;
    assert!(received.contains("B's own") && received.contains("mgr-b"), "the dashboard's subscriptions work:\n{received}");

    // Nothing of A's was written by B, and nothing of B's attempts reached A's tables.
    let mut a_after = a_before.clone();
    a_after[0] += 1; // A's second product
    a_after[4] += 1; // its log entry (the second conflict's change lost: nothing written)
    a_after[5] += 1; // one more row version
    a_after[6] += 1; // the second conflict
    assert_eq!(footprint(&hub.db, A).await, a_after);
    assert_eq!(footprint(&hub.db, B).await, vec![1, 0, 0, 0, 1, 1, 0, 1], "B's own row, its log entry, version and cursor");
    hub.shutdown().await;
}
