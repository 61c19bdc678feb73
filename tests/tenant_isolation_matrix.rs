//! Cross-tenant attempts over every entry point at once: frames (push, snapshot, resume),
//! subscriptions, presence, the conflicts channel, broadcasts, the HTTP API (conflict review,
//! session token refresh) and service tokens; and the RxDB endpoint (pulls from A's
//! checkpoints, writes under A's ids, the live stream) and the Supabase Realtime endpoint
//! (postgres_changes, presence and broadcast on A's channel names, the REST broadcasts, an anon
//! key's socket, refused joins). Tenant B tries each against tenant A's rows, conflicts and
//! sessions; every attempt reads and writes nothing of A's, and is answered as an attempt
//! against something that does not exist is, so that no answer tells B what A holds.
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

/// A hub with two service tokens (one for every tenant, one for B only) and its HTTP API.
async fn hub_with_bridges() -> (TestHub, Api) {
    let hub = TestHub::start_with(|config| {
        config.service_tokens = vec![
            ServiceToken { name: "bridge".into(), token: Secret(EVERY_TENANT.into()), tenants: vec![] },
            ServiceToken { name: "b-bridge".into(), token: Secret(B_ONLY.into()), tenants: vec![B.into()] },
        ];
    })
    .await;
    let api = Api { base: format!("http://{}", hub.addr), http: reqwest::Client::new() };
    (hub, api)
}

#[actix_web::test]
async fn no_entry_point_crosses_tenants_or_tells_what_another_tenant_holds() {
    let (hub, api) = hub_with_bridges().await;

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

// ---------------------------------------------------------------------------------------------
// The RxDB endpoint (`/rxdb/v1`) and the Supabase Realtime endpoint (`/realtime/v1`), spoken raw
// over WebSockets as tests/rxdb_replication.rs and tests/supabase_protocol.rs speak them.
// ---------------------------------------------------------------------------------------------

type RawWs = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What B sends that A must never receive (B's own data, by the same token).
const B_MARK: &str = "B-PRIVATE";
/// Short waits for what must not arrive, after a control that did.
const QUIET: Duration = Duration::from_millis(300);

async fn next_text(ws: &mut RawWs, wait: Duration) -> Option<Value> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await.ok()??.ok()? {
            Message::Text(text) => return Some(serde_json::from_str(&text).expect("a JSON frame")),
            Message::Close(_) => return None,
            _ => continue,
        }
    }
}

async fn send_text(ws: &mut RawWs, value: Value) {
    use futures_util::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::Text(value.to_string())).await.expect("send");
}

/// An RxDB replication socket of the `products` collection, authenticated by `?token=`. Stream
/// events (`id: "stream"`) are kept in `stream` as they pass.
struct Rx {
    ws: RawWs,
    next: u64,
    stream: Vec<Value>,
}

impl Rx {
    async fn open(hub: &TestHub, token: &str) -> Rx {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/rxdb/v1?token={token}", hub.addr)).await.expect("rxdb upgrade");
        Rx { ws, next: 0, stream: Vec::new() }
    }

    async fn send(&mut self, method: &str, params: Value) -> String {
        self.next += 1;
        let id = format!("r{}", self.next);
        send_text(&mut self.ws, json!({"id": id, "collection": "products", "method": method, "params": params})).await;
        id
    }

    /// A request and its reply's `result`.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.send(method, params).await;
        loop {
            let frame = next_text(&mut self.ws, WAIT).await.unwrap_or_else(|| panic!("no reply to {method}"));
            if frame["id"] == json!(id) {
                return frame["result"].clone();
            }
            self.stream.push(frame);
        }
    }

    /// Stream events until one satisfies `pick`.
    async fn stream_until(&mut self, what: &str, pick: impl Fn(&Value) -> bool) {
        if self.stream.iter().any(&pick) {
            return;
        }
        loop {
            let frame = next_text(&mut self.ws, WAIT).await.unwrap_or_else(|| panic!("the stream never brought {what}: {:?}", self.stream));
            let found = pick(&frame);
            self.stream.push(frame);
            if found {
                return;
            }
        }
    }

    /// Everything streamed so far, and until `wait` passes without a frame, as text.
    async fn streamed(&mut self, wait: Duration) -> String {
        while let Some(frame) = next_text(&mut self.ws, wait).await {
            self.stream.push(frame);
        }
        self.stream.iter().map(Value::to_string).collect::<Vec<_>>().join("\n")
    }
}

/// The ids of a pull's documents.
fn doc_ids(result: &Value) -> Vec<String> {
    result["documents"].as_array().unwrap_or_else(|| panic!("documents in {result}")).iter().map(|d| d["id"].as_str().unwrap_or_default().to_owned()).collect()
}

/// A Supabase Realtime socket, Phoenix serializer 1.0.0 (JSON objects). Every message received
/// is kept in `seen`.
struct Sb {
    ws: RawWs,
    next_ref: u64,
    seen: Vec<Value>,
}

impl Sb {
    async fn connect(hub: &TestHub, apikey: &str) -> Sb {
        let url = format!("ws://{}/realtime/v1/websocket?apikey={apikey}&vsn=1.0.0", hub.addr);
        let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("realtime upgrade");
        Sb { ws, next_ref: 0, seen: Vec::new() }
    }

    async fn send(&mut self, topic: &str, event: &str, payload: Value, join: bool) -> String {
        self.next_ref += 1;
        let msg_ref = self.next_ref.to_string();
        let join_ref = join.then(|| msg_ref.clone());
        send_text(&mut self.ws, json!({"join_ref": join_ref, "ref": msg_ref, "topic": topic, "event": event, "payload": payload})).await;
        msg_ref
    }

    /// Messages until one satisfies `pick` (looked for among those already seen first).
    async fn until(&mut self, what: &str, pick: impl Fn(&Value) -> bool) -> Value {
        if let Some(found) = self.seen.iter().find(|m| pick(m)) {
            return found.clone();
        }
        loop {
            let msg = next_text(&mut self.ws, WAIT).await.unwrap_or_else(|| panic!("never received {what}; seen: {:#?}", self.seen));
            self.seen.push(msg.clone());
            if pick(&msg) {
                return msg;
            }
        }
    }

    async fn call(&mut self, topic: &str, event: &str, payload: Value) -> Value {
        let join = event == "phx_join";
        let r = self.send(topic, event, payload, join).await;
        self.until("a reply", |m| m["event"] == "phx_reply" && m["ref"] == json!(r)).await["payload"].clone()
    }

    async fn join(&mut self, topic: &str, payload: Value) -> Value {
        self.call(topic, "phx_join", payload).await
    }

    /// Everything received so far, and until `wait` passes without a message, as text; left out are the replies that
    /// accepted a join (they echo the bindings as asked, A's tenant name included) and the
    /// refusals of the joins that were compared case by case (they echo the value refused).
    async fn received(&mut self, wait: Duration) -> String {
        while let Some(msg) = next_text(&mut self.ws, wait).await {
            self.seen.push(msg);
        }
        self.seen
            .iter()
            .filter(|m| !(m["event"] == "phx_reply" && (m["payload"]["status"] == "ok" || m["topic"].as_str().is_some_and(|t| t.starts_with("realtime:refused-")))))
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn join_ok(what: &str, reply: &Value) {
    assert_eq!(reply["status"], "ok", "{what}: {reply}");
}

fn refusal(what: &str, reply: &Value) -> String {
    assert_eq!(reply["status"], "error", "{what}: {reply}");
    reply["response"]["reason"].as_str().unwrap_or_default().to_owned()
}

/// Text a reply must never hold: A's data, and what only the database would say.
fn assert_clean(what: &str, text: &str, forbidden: &[String]) {
    for word in forbidden.iter().map(String::as_str).chain(["ERROR:", "violates", "constraint", "sqlx", "SQLSTATE", "relation \""]) {
        assert!(!text.contains(word), "{what} holds `{word}`:\n{text}");
    }
}

async fn rows_of(db: &sqlx::PgPool, tenant: &str) -> Value {
    sqlx::query_scalar("select coalesce(jsonb_agg(to_jsonb(p) order by id), '[]') from products p where tenant_id = $1").bind(tenant).fetch_one(db).await.unwrap()
}

fn products_binding(extra: Value) -> Value {
    let mut b = json!({"event": "*", "schema": "public", "table": "products"});
    b.as_object_mut().unwrap().extend(extra.as_object().cloned().unwrap_or_default());
    b
}

#[actix_web::test]
async fn the_rxdb_and_supabase_endpoints_do_not_cross_tenants_or_tell_what_another_tenant_holds() {
    let (hub, api) = hub_with_bridges().await;

    // A's products, and B's own one (the control: B's sessions do see B's rows).
    let (mut a1, _) = device_session(&hub, A, "pos-a1").await;
    let (mut b1, _) = device_session(&hub, B, "pos-b1").await;
    let (pa, pa2, pb) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let t = now_ms();
    let a_product = |id: Uuid, seq: u64| upsert("products", json!({"id": id}), json!({"sku": MARK, "name": MARK, "price_cents": 100}), seq, t, 0);
    // One more of A's per RxDB write case below, so that each case starts where B holds nothing
    // under A's id, as under the never-used id it is compared with.
    let a_write_targets: Vec<Uuid> = (0..7).map(|_| Uuid::now_v7()).collect();
    let mut a_seq = 0;
    let mut next_a_seq = || {
        a_seq += 1;
        a_seq
    };
    let mut first_products = vec![a_product(pa, next_a_seq()), a_product(pa2, next_a_seq())];
    first_products.extend(a_write_targets.iter().map(|id| a_product(*id, next_a_seq())));
    let r = a1.push(first_products).await;
    assert!(r.iter().all(|r| r.status == ChangeStatus::Applied), "{r:?}");
    let r = b1.push(vec![upsert("products", json!({"id": pb}), json!({"sku": "B-1", "name": B_MARK, "price_cents": 5}), 1, t, 0)]).await;
    assert_eq!(r[0].status, ChangeStatus::Applied);
    let mut a_ids: Vec<String> = vec![pa.to_string(), pa2.to_string()];
    let mut forbidden_to_b: Vec<String> = vec![MARK.into(), "pos-a".into(), "user-a".into(), "rx-a".into()];

    // ---- RxDB ----
    // A's own pulls: a checkpoint in the middle of A's snapshot, and one at A's log head.
    let mut rx_a = Rx::open(&hub, &token(A, "user-rx-a", "Employee", Some("rx-a"))).await;
    rx_a.send("masterChangeStream$", json!([])).await;
    let first = rx_a.call("masterChangesSince", json!([null, 1])).await;
    let a_doc = first["documents"][0].clone();
    assert_eq!(a_doc["name"], json!(MARK), "A pulls its own documents: {first}");
    let a_mid_snapshot = first["checkpoint"].clone();
    assert!(!a_mid_snapshot["snapshot"].is_null(), "a page of one of A's nine documents is mid-snapshot: {a_mid_snapshot}");
    let mut a_head = a_mid_snapshot.clone();
    loop {
        let page = rx_a.call("masterChangesSince", json!([a_head, 10])).await;
        a_head = page["checkpoint"].clone();
        if page["documents"].as_array().unwrap().len() < 10 {
            break;
        }
    }
    assert!(a_head["snapshot"].is_null() && a_head["seq"].as_u64() >= Some(9), "A's log head: {a_head}");
    let a_epoch = a_head["epoch"].as_str().unwrap().to_owned();

    let mut rx_b = Rx::open(&hub, &token(B, "user-rx-b", "Employee", Some("rx-b"))).await;
    rx_b.send("masterChangeStream$", json!([])).await;
    // Pulls of B from every checkpoint of A's, and forged ones in A's epoch: each, paged to its
    // end, brings B's document and nothing of A's.
    let pulls = [
        ("a first pull", Value::Null),
        ("A's checkpoint in the middle of its snapshot", a_mid_snapshot.clone()),
        ("A's checkpoint at its log head", a_head.clone()),
        ("A's epoch from seq 0", json!({"epoch": a_epoch, "seq": 0, "snapshot": null})),
        ("A's epoch from seq 1", json!({"epoch": a_epoch, "seq": 1, "snapshot": null})),
        ("A's snapshot cursor at seq 0", json!({"epoch": a_epoch, "seq": 0, "snapshot": a_mid_snapshot["snapshot"]})),
    ];
    for (what, checkpoint) in pulls {
        let mut checkpoint = checkpoint;
        let mut pulled = Vec::new();
        for _ in 0..10 {
            let page = rx_b.call("masterChangesSince", json!([checkpoint, 1])).await;
            assert_clean(&format!("RxDB pull from {what}"), &page.to_string(), &forbidden_to_b);
            let ids = doc_ids(&page);
            checkpoint = page["checkpoint"].clone();
            assert_ne!(checkpoint["epoch"], json!(a_epoch), "{what}: B is handed A's epoch");
            pulled.extend(ids.clone());
            if ids.is_empty() {
                break;
            }
        }
        assert!(pulled.iter().all(|id| *id == pb.to_string()), "{what}: B pulled {pulled:?}");
        if what == "a first pull" {
            assert_eq!(pulled, vec![pb.to_string()], "B pulls its own document");
        }
    }

    // Writes of B under A's ids, answered as the same write under an id no tenant ever used,
    // and touching none of A's rows.
    let a_rows_before = rows_of(&hub.db, A).await;
    let b_doc = |id: &str| json!({"id": id, "sku": "B-SKU", "name": B_MARK, "price_cents": 7, "stock": 1, "active": true, "updated_at": "2025-03-04T05:06:07.089Z", "_deleted": false});
    let as_a_saw_it = |id: &str| {
        let mut d = a_doc.clone();
        d["id"] = json!(id);
        d
    };
    let with = |mut d: Value, extra: Value| {
        d.as_object_mut().unwrap().extend(extra.as_object().cloned().unwrap());
        d
    };
    type Row<'a> = Box<dyn Fn(&str) -> Value + 'a>;
    let writes: Vec<(&str, Row)> = vec![
        ("an update assuming A's document", Box::new(|id| json!({"newDocumentState": b_doc(id), "assumedMasterState": as_a_saw_it(id)}))),
        ("a delete assuming A's document", Box::new(|id| json!({"newDocumentState": with(b_doc(id), json!({"_deleted": true})), "assumedMasterState": as_a_saw_it(id)}))),
        ("a delete assuming A's document deleted", Box::new(|id| json!({"newDocumentState": with(b_doc(id), json!({"_deleted": true})), "assumedMasterState": with(as_a_saw_it(id), json!({"_deleted": true}))}))),
        ("a document naming A's tenant", Box::new(|id| json!({"newDocumentState": with(b_doc(id), json!({"tenant_id": A}))}))),
        ("a value Postgres refuses", Box::new(|id| json!({"newDocumentState": with(b_doc(id), json!({"price_cents": -1}))}))),
        ("a tombstone of a document never seen", Box::new(|id| json!({"newDocumentState": with(b_doc(id), json!({"_deleted": true}))}))),
        ("an insert under A's id", Box::new(|id| json!({"newDocumentState": b_doc(id)}))),
    ];
    assert_eq!(writes.len(), a_write_targets.len());
    for ((what, row), target) in writes.iter().zip(&a_write_targets) {
        let a_doc_id = target.to_string();
        let never_used = Uuid::now_v7().to_string();
        let on_a = rx_b.call("masterWrite", json!([[row(&a_doc_id)]])).await;
        let on_nothing = rx_b.call("masterWrite", json!([[row(&never_used)]])).await;
        assert_eq!(on_a.to_string().replace(&a_doc_id, "<id>"), on_nothing.to_string().replace(&never_used, "<id>"), "RxDB write, {what}");
        assert_clean(&format!("RxDB write, {what}"), &on_a.to_string(), &forbidden_to_b);
    }
    assert_eq!(rows_of(&hub.db, A).await, a_rows_before, "B's RxDB writes touched none of A's rows");
    let b_has_a_id: i64 = sqlx::query_scalar("select count(*) from products where tenant_id = $1 and id = $2").bind(B).bind(a_write_targets[6]).fetch_one(&hub.db).await.unwrap();
    assert_eq!(b_has_a_id, 1, "B's insert under A's id is B's own row");

    // ---- Supabase Realtime ----
    let a_key = token(A, "user-a", "Employee", None);
    let b_key = token(B, "user-b", "Employee", None);
    let room = |bindings: Value, who: &str| json!({"config": {"broadcast": {"ack": true}, "presence": {"key": who}, "postgres_changes": bindings}});
    let mut sa = Sb::connect(&hub, &a_key).await;
    let mut sa2 = Sb::connect(&hub, &a_key).await;
    join_ok("A on room1", &sa.join("realtime:room1", room(json!([products_binding(json!({}))]), "A-PRIVATE-who")).await);
    join_ok("A's second socket on room1", &sa2.join("realtime:room1", room(json!([]), "a-two")).await);

    // B's socket joins the channel names A uses, with bindings that would match A's rows, and
    // bindings that replay and snapshot; an anon key's socket takes B's tenant from its join.
    let mut sb = Sb::connect(&hub, &b_key).await;
    let b_channels = [
        ("room1", json!([products_binding(json!({}))])),
        ("on-a-tenant", json!([products_binding(json!({"filter": format!("tenant_id=eq.{A}")}))])),
        ("on-a-name", json!([products_binding(json!({"filter": format!("name=eq.{MARK}")}))])),
        ("from-seq-0", json!([products_binding(json!({"since_seq": 0}))])),
        ("snapshot", json!([products_binding(json!({"snapshot": true}))])),
        ("sessions", json!([])),
    ];
    for (name, bindings) in &b_channels {
        join_ok(&format!("B on {name}"), &sb.join(&format!("realtime:{name}"), room(bindings.clone(), "b-user")).await);
    }
    sb.until("B's snapshot", |m| m["topic"] == "realtime:snapshot" && m["payload"]["message"] == "Snapshot complete").await;
    sb.until("B's own row replayed from seq 0", |m| m["topic"] == "realtime:from-seq-0" && m.to_string().contains(B_MARK)).await;
    sb.until("B's sessions", |m| m["topic"] == "realtime:sessions" && m["event"] == "presence_state" && m.to_string().contains("pos-b1")).await;
    let anon = synchub::auth::mint_hs256(SECRET, &json!({"role": "anon", "exp": synchub::auth::unix_now() + 3600}));
    let mut sanon = Sb::connect(&hub, &anon).await;
    let mut anon_join = room(json!([products_binding(json!({}))]), "anon-b");
    anon_join["access_token"] = json!(b_key);
    join_ok("the anon socket on room1 with B's token", &sanon.join("realtime:room1", anon_join).await);

    // Refused joins: A's token on B's socket is refused as a never-used tenant's is; a position
    // in A's epoch is answered as one in a made-up epoch; nothing says what A holds.
    let nowhere_key = token("store-nowhere", "user-a", "Employee", None);
    let never_used = Uuid::now_v7().to_string();
    let on_value = |v: &str| room(json!([products_binding(json!({"filter": format!("price_cents=eq.{v}")}))]), "b");
    let refusals = [
        ("A's token on B's socket", json!({"access_token": a_key}), json!({"access_token": nowhere_key}), [a_key.as_str(), nowhere_key.as_str()]),
        ("A's token on the anon socket holding B", json!({"access_token": a_key}), json!({"access_token": nowhere_key}), [a_key.as_str(), nowhere_key.as_str()]),
        ("a filter on A's product id, which is no price", on_value(&pa.to_string()), on_value(&never_used), [&pa.to_string(), never_used.as_str()]),
    ];
    for (i, (what, on_a, on_nothing, [a_text, nothing_text])) in refusals.into_iter().enumerate() {
        let c = if what.contains("anon") { &mut sanon } else { &mut sb };
        let r1 = refusal(what, &c.join(&format!("realtime:refused-{i}"), on_a).await);
        let r2 = refusal(what, &c.join(&format!("realtime:refused-{i}"), on_nothing).await);
        assert_eq!(r1.replace(a_text, "<v>"), r2.replace(nothing_text, "<v>"), "{what}");
        assert!(r1.starts_with("Unauthorized") || r1.starts_with("InvalidFilter"), "{what}: {r1}");
        assert_clean(what, &r1, &forbidden_to_b);
    }
    let made_up_epoch = Uuid::new_v4().simple().to_string();
    let mut epoch_problems = Vec::new();
    for (name, epoch) in [("in-a-epoch", &a_epoch), ("in-made-up-epoch", &made_up_epoch)] {
        join_ok(name, &sb.join(&format!("realtime:{name}"), room(json!([products_binding(json!({"since_seq": 1, "since_epoch": epoch}))]), "b")).await);
        let topic = format!("realtime:{name}");
        let system = sb.until("the epoch's refusal", |m| m["topic"] == json!(topic) && m["event"] == "system" && m["payload"]["status"] == "error").await;
        epoch_problems.push(system["payload"].to_string().replace(&topic, "<topic>").replace(name, "<topic>"));
    }
    assert_eq!(epoch_problems[0], epoch_problems[1], "A's epoch is answered as a made-up one");
    assert_clean("an epoch refusal", &epoch_problems[0], &forbidden_to_b);

    // Presence: A tracks on room1 (its second socket sees it), then B does (it sees itself).
    let r = sa.call("realtime:room1", "presence", json!({"type": "presence", "event": "track", "payload": {"who": MARK}})).await;
    assert_eq!(r["status"], "ok", "{r}");
    sa2.until("A's presence", |m| m["event"] == "presence_diff" && m.to_string().contains(MARK)).await;
    let r = sb.call("realtime:room1", "presence", json!({"type": "presence", "event": "track", "payload": {"who": B_MARK}})).await;
    assert_eq!(r["status"], "ok", "{r}");
    sb.until("B's presence", |m| m["topic"] == "realtime:room1" && m["event"] == "presence_diff" && m.to_string().contains(B_MARK)).await;
    sanon.until("B's presence on the anon socket", |m| m["event"].as_str().is_some_and(|e| e.starts_with("presence")) && m.to_string().contains(B_MARK)).await;

    // Broadcasts on room1 from each side, over the socket and every REST way; each reaches its
    // own tenant (the controls) and never the other.
    let shout = |text: &str| json!({"type": "broadcast", "event": "shout", "payload": {"text": text}});
    let r = sa.call("realtime:room1", "broadcast", shout(&format!("{MARK} shout"))).await;
    assert_eq!(r["status"], "ok", "{r}");
    sa2.until("A's broadcast", |m| m["event"] == "broadcast" && m.to_string().contains("A-PRIVATE shout")).await;
    let r = sb.call("realtime:room1", "broadcast", shout(&format!("{B_MARK} shout"))).await;
    assert_eq!(r["status"], "ok", "{r}");
    sanon.until("B's broadcast", |m| m["event"] == "broadcast" && m.to_string().contains("B-PRIVATE shout")).await;

    let nobody = "service-token-of-nobody-at-all-0123";
    let (to_a, to_b) = (format!("/v1/tenants/{A}/broadcast"), format!("/v1/tenants/{B}/broadcast"));
    let rest: [(&str, &str, &str, Value, u16); 6] = [
        ("B's service token on the Supabase batch endpoint", "/realtime/v1/api/broadcast", B_ONLY, json!({"messages": [{"topic": "room1", "event": "shout", "payload": {"text": "B-PRIVATE by service batch"}}]}), 401),
        ("B's service token on the Supabase topic endpoint", "/realtime/v1/api/broadcast/room1/events/shout", B_ONLY, json!({"text": "B-PRIVATE by service topic"}), 401),
        ("B's service token on A's tenant", &to_a, B_ONLY, json!({"channel": "room1", "event": "shout", "payload": {"text": "B-PRIVATE to A"}}), 403),
        ("B's service token on B's tenant", &to_b, B_ONLY, json!({"channel": "room1", "event": "shout", "payload": {"text": "B-PRIVATE rest service"}}), 202),
        ("B's user on the Supabase batch endpoint", "/realtime/v1/api/broadcast", &b_key, json!({"messages": [{"topic": "realtime:room1", "event": "shout", "payload": {"text": "B-PRIVATE rest batch"}}]}), 202),
        ("B's user on the Supabase topic endpoint", "/realtime/v1/api/broadcast/room1/events/shout", &b_key, json!({"text": "B-PRIVATE rest topic"}), 202),
    ];
    for (what, path, key, body, status) in rest {
        let got = api.call("POST", path, key, Some(body.clone())).await;
        assert_eq!(got.0, status, "{what}: {}", got.1);
        if status != 202 {
            let nobodys = if path.starts_with("/v1/tenants/") {
                api.call("POST", "/v1/tenants/store-nowhere/broadcast", key, Some(body)).await
            } else {
                api.call("POST", path, nobody, Some(body)).await
            };
            assert_eq!(got.0, nobodys.0, "{what}: answered as a token of nobody's or a tenant of nobody's is");
            assert_eq!(got.1.to_string().replace(A, "<t>"), nobodys.1.to_string().replace("store-nowhere", "<t>"), "{what}");
        } else {
            let text = body.to_string();
            let sent = text.split("\"text\":\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
            sb.until(what, |m| m["topic"] == "realtime:room1" && m["event"] == "broadcast" && m.to_string().contains(&sent)).await;
        }
    }

    // A writes while B listens: A's socket gets the change (the control), B's own write reaches
    // B's channels after it, and then nothing of A's has reached any of B's.
    let pa3 = Uuid::now_v7();
    a_ids.push(pa3.to_string());
    let r = a1.push(vec![a_product(pa3, next_a_seq()), upsert("products", json!({"id": pa}), json!({"price_cents": 101, "name": format!("{MARK} 2")}), next_a_seq(), now_ms(), 0)]).await;
    assert!(r.iter().all(|r| r.status == ChangeStatus::Applied), "{r:?}");
    sa.until("A's change", |m| m["event"] == "postgres_changes" && m.to_string().contains(&pa3.to_string())).await;
    rx_a.stream_until("A's change", |f| f.to_string().contains(&pa3.to_string())).await;
    let pb2 = Uuid::now_v7();
    let r = b1.push(vec![upsert("products", json!({"id": pb2}), json!({"sku": "B-2", "name": B_MARK, "price_cents": 6}), 2, now_ms(), 0)]).await;
    assert_eq!(r[0].status, ChangeStatus::Applied);
    for c in [&mut sb, &mut sanon] {
        c.until("B's change", |m| m["topic"] == "realtime:room1" && m["event"] == "postgres_changes" && m.to_string().contains(&pb2.to_string())).await;
    }
    rx_b.stream_until("B's change", |f| f.to_string().contains(&pb2.to_string())).await;

    // Whatever is still on its way arrives within a quiet moment; then every socket's inbox.
    tokio::time::sleep(QUIET).await;
    let drain = Duration::from_millis(20);
    let (streamed_to_a, streamed_to_b) = (rx_a.streamed(drain).await, rx_b.streamed(drain).await);
    let (received_by_a, received_by_a2) = (sa.received(drain).await, sa2.received(drain).await);
    let (received_by_b, received_by_anon) = (sb.received(drain).await, sanon.received(drain).await);

    forbidden_to_b.extend(a_ids.iter().cloned());
    assert_clean("B's RxDB stream", &streamed_to_b, &forbidden_to_b);
    assert_clean("B's Supabase socket", &received_by_b, &forbidden_to_b);
    assert_clean("the anon socket holding B", &received_by_anon, &forbidden_to_b);
    let forbidden_to_a = vec![B_MARK.to_string(), "pos-b".into(), "user-b".into(), "rx-b".into(), pb.to_string(), pb2.to_string()];
    assert_clean("A's Supabase socket", &received_by_a, &forbidden_to_a);
    assert_clean("A's second Supabase socket", &received_by_a2, &forbidden_to_a);
    assert_clean("A's RxDB stream", &streamed_to_a, &forbidden_to_a);
    // The scans see what is sent: A's own sockets hold A's changes, presence and broadcasts,
    // and B's hold B's.
    assert!(received_by_a.contains(&pa3.to_string()) && received_by_a.contains("A-PRIVATE 2"), "A's changes reach A's socket:\n{received_by_a}");
    assert!(received_by_a2.contains(&format!("{MARK} shout")) && received_by_a2.contains("\"who\":\"A-PRIVATE\""), "A's broadcast and presence reach A's other socket");
    assert!(streamed_to_a.contains(&format!("{MARK} 2")), "A's RxDB stream carries A's update");
    for sent in ["B-PRIVATE rest service", "B-PRIVATE rest batch", "B-PRIVATE rest topic", "\"who\":\"B-PRIVATE\"", "Snapshot complete"] {
        assert!(received_by_b.contains(sent), "B's socket received `{sent}`");
    }
    assert!(received_by_anon.contains("B-PRIVATE rest service") && received_by_anon.contains(&pb2.to_string()), "the anon socket holding B receives B's broadcasts and changes");
    hub.shutdown().await;
}
