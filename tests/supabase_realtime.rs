//! Supabase Realtime (`/realtime/v1`, Phoenix channels) end to end with the real
//! @supabase/supabase-js 2.119.2: `createClient('http://127.0.0.1:PORT', token, { realtime: {
//! vsn, transport } })` clients in one Node process per test (tests/supabase/driver.mjs, driven
//! through tests/supabase/clients.rs), against a real hub and real Postgres, next to native
//! devices, SQL writers, server-side writers and the conflict console. Every test runs once with
//! the Phoenix serializer 1.0.0 (JSON objects) and once with 2.0.0 (JSON arrays, binary
//! broadcasts).
//!
//! The test installs what it needs when it is missing: node and npm with apt-get, and
//! @supabase/supabase-js and ws (pinned in tests/supabase/package-lock.json) with `npm ci`.
//! It fails, never skips, when it cannot.

#[path = "supabase/clients.rs"]
mod clients;
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use clients::{broadcast, changes, presence, system, SbDriver};
use common::*;
use protocol::{ChangeResult, ChangeStatus, ServerFrame};
use serde_json::{json, Value};
use synchub::config::{Secret, ServiceToken};
use uuid::Uuid;

const TENANT: &str = "sb-store";
const OTHER_TENANT: &str = "sb-other-store";
const BRIDGE_TOKEN: &str = "bridge-token-0123456789";
/// How long a test watches for something that must not arrive.
const QUIET: Duration = Duration::from_millis(800);
/// supabase-js reconnects 1, 2, 5, 10 s after a drop: a rejoin may take that long.
const REJOIN: Duration = Duration::from_secs(40);

/// Each test once per Phoenix serializer.
macro_rules! both_vsns {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[actix_web::test]
            async fn vsn_1_0_0() {
                super::$name("1.0.0").await
            }
            #[actix_web::test]
            async fn vsn_2_0_0() {
                super::$name("2.0.0").await
            }
        }
    )*};
}

both_vsns!(
    broadcast_between_two_clients_with_self_and_ack,
    rest_and_native_broadcasts_reach_a_subscribed_client,
    presence_sync_join_leave_and_the_sessions_channel,
    postgres_changes_from_a_device_sql_and_the_console,
    several_bindings_are_echoed_and_each_gets_its_changes,
    set_auth_keeps_the_channel_alive,
    a_token_signed_with_the_wrong_key_is_refused,
    an_anon_key_client_gets_its_tenant_from_the_users_token,
    another_tenant_on_the_same_channel_name_gets_nothing,
    two_hundred_changes_missed_offline_arrive_in_order_after_rejoin,
    snapshot_then_live_without_a_gap_under_concurrent_writes,
);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

async fn start_hub() -> TestHub {
    TestHub::start_with(|config| {
        config.service_tokens = vec![ServiceToken { name: "bridge".into(), token: Secret(BRIDGE_TOKEN.into()), tenants: vec![] }];
        config.max_broadcast_payload_bytes = 1024;
    })
    .await
}

/// What supabase-js is given as the project URL.
fn project_url(hub: &TestHub) -> String {
    format!("http://{}", hub.addr)
}

fn user_token(tenant: &str, user: &str) -> String {
    token(tenant, user, "Employee", None)
}

/// A token with claims of the test's choosing, signed with `secret`.
fn token_with(secret: &str, tenant: &str, user: &str, exp_in_secs: i64) -> String {
    let exp = synchub::auth::unix_now() as i64 + exp_in_secs;
    synchub::auth::mint_hs256(secret, &json!({"sub": user, "role": "Employee", "tenant_id": tenant, "exp": exp}))
}

fn manager(tenant: &str) -> String {
    token(tenant, "mgr-1", "Manager", None)
}

/// `{"event":"*","schema":"public","table":<table>}` and more keys from `extra`.
fn binding(event: &str, table: &str, extra: Value) -> Value {
    let mut b = json!({"event": event, "schema": "public", "table": table});
    if let Value::Object(more) = extra {
        b.as_object_mut().unwrap().extend(more);
    }
    b
}

/// A live native device that numbers its changes and keeps its clock ahead.
struct Dev {
    c: Client,
    seq: u64,
    clock: u64,
}

impl Dev {
    async fn connect(hub: &TestHub, tenant: &str, device: &str) -> Dev {
        let (c, _, _) = Client::device(hub, tenant, device).await;
        Dev { c, seq: 0, clock: now_ms() }
    }

    fn tick(&mut self) -> u64 {
        self.clock = self.clock.max(now_ms()) + 1;
        self.clock
    }

    fn upsert(&mut self, table: &str, key: Value, fields: Value, base_version: u64) -> protocol::Change {
        self.seq += 1;
        let wall = self.tick();
        upsert(table, key, fields, self.seq, wall, base_version)
    }

    fn delete(&mut self, table: &str, key: Value, base_version: u64) -> protocol::Change {
        self.seq += 1;
        let wall = self.tick();
        delete(table, key, self.seq, wall, base_version)
    }

    /// Push `changes` in one batch; every one must be applied. Returns the seqs.
    async fn push(&mut self, changes: Vec<protocol::Change>) -> Vec<u64> {
        let results = self.c.push(changes).await;
        results.iter().map(|r| applied(r)).collect()
    }
}

fn applied(r: &ChangeResult) -> u64 {
    assert_eq!(r.status, ChangeStatus::Applied, "{r:?}");
    r.seq.expect("an applied change has a seq")
}

/// A product's fields for a device push.
fn product_fields(id: Uuid, name: &str, price: i64) -> Value {
    product(id, name, price)
}

/// The product row as Postgres holds it, as JSON.
async fn product_row(hub: &TestHub, id: Uuid) -> Option<Value> {
    sqlx::query_scalar("select to_jsonb(p) from products p where tenant_id = $1 and id = $2").bind(TENANT).bind(id).fetch_optional(&hub.db).await.unwrap()
}

/// Compare a record as supabase-js hands it over with the row Postgres holds: the same columns,
/// equal values (timestamps compared as instants).
fn assert_same_row(got: &Value, want: &Value, what: &str) {
    let (Some(g), Some(w)) = (got.as_object(), want.as_object()) else { panic!("{what}: {got} vs {want}") };
    let mut gk: Vec<&String> = g.keys().collect();
    let mut wk: Vec<&String> = w.keys().collect();
    gk.sort();
    wk.sort();
    assert_eq!(gk, wk, "{what}: columns differ\n got: {got}\nwant: {want}");
    for (k, wv) in w {
        let gv = &g[k];
        if k == "updated_at" || k == "created_at" {
            let parse = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap_or_default()).map(|t| t.timestamp_micros());
            assert_eq!(parse(gv).ok(), parse(wv).ok(), "{what}: {k} is {gv}, the row holds {wv}");
        } else {
            assert_eq!(gv, wv, "{what}: {k}\n got: {got}\nwant: {want}");
        }
    }
}

/// `(eventType, id, new.price_cents, old.price_cents)` of postgres_changes events.
fn summary(events: &[Value]) -> Vec<(String, String, Value, Value)> {
    events
        .iter()
        .map(|e| {
            let p = &e["payload"];
            let id = p["new"]["id"].as_str().or(p["old"]["id"].as_str()).unwrap_or("?").to_owned();
            (p["eventType"].as_str().unwrap_or("?").to_owned(), id, p["new"]["price_cents"].clone(), p["old"]["price_cents"].clone())
        })
        .collect()
}

fn ev(kind: &str, id: Uuid, new_price: Option<i64>, old_price: Option<i64>) -> (String, String, Value, Value) {
    (kind.to_owned(), id.to_string(), new_price.map_or(Value::Null, |p| json!(p)), old_price.map_or(Value::Null, |p| json!(p)))
}

/// Events of binding `index` among `events`.
fn of_binding(events: &[Value], index: usize) -> Vec<Value> {
    events.iter().filter(|e| e["binding"] == json!(index)).cloned().collect()
}

/// Broadcast events as `(listener, event, payload)`.
fn broadcasts(events: &[Value]) -> Vec<(u64, String, Value)> {
    events
        .iter()
        .filter(|e| e["kind"] == "broadcast")
        .map(|e| (e["binding"].as_u64().unwrap(), e["payload"]["event"].as_str().unwrap_or("?").to_owned(), e["payload"]["payload"].clone()))
        .collect()
}

/// A broadcast payload as supabase-js hands it to the callback.
fn assert_broadcast_shape(event: &Value) {
    let p = &event["payload"];
    assert_eq!(p["type"], "broadcast", "{event}");
    let keys: Vec<&String> = p.as_object().unwrap().keys().collect();
    assert!(keys.iter().all(|k| ["type", "event", "payload", "meta"].contains(&k.as_str())), "unexpected keys in {p}");
}

async fn head_seq(hub: &TestHub, tenant: &str) -> u64 {
    let head: Option<i64> = sqlx::query_scalar("select head_seq from synchub.tenants where tenant_id = $1").bind(tenant).fetch_optional(&hub.db).await.unwrap();
    head.unwrap_or(0) as u64
}

/// `POST` with a bearer token; (status, body text).
async fn post(url: String, headers: &[(&str, &str)], body: Value) -> (u16, String) {
    let mut request = reqwest::Client::new().post(url).json(&body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("HTTP request");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

/// Wait until `check` holds on the channel's events (polled), returning them.
async fn until_events(sb: &mut SbDriver, client: &str, channel: &str, wait: Duration, what: &str, check: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let events = sb.events(client, channel).await;
        if check(&events) {
            return events;
        }
        if tokio::time::Instant::now() > deadline {
            let state = sb.describe(client).await;
            panic!("{what}: not within {wait:?}; {} events, last: {:#?}\n{state}", events.len(), events.iter().rev().take(3).collect::<Vec<_>>());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Broadcast
// ---------------------------------------------------------------------------------------------

async fn broadcast_between_two_clients_with_self_and_ack(vsn: &str) {
    let hub = start_hub().await;
    let url = project_url(&hub);
    let mut sb = SbDriver::start().await;
    // a heartbeats every 300 ms: the hub must answer each, or supabase-js reconnects.
    sb.create_with_heartbeat("a", &url, &user_token(TENANT, "ann"), vsn, Duration::from_millis(300)).await;
    sb.create("b", &url, &user_token(TENANT, "bob"), vsn).await;
    // c: a bare RealtimeClient, as the README says works the same.
    sb.create_bare("c", &url, &user_token(TENANT, "cat"), vsn).await;
    // A native dashboard of the tenant hears Supabase public broadcasts too; devices are
    // spared screen-to-screen traffic.
    let (mut board, _) = Client::dashboard(&hub, TENANT, "mgr-1", "Manager").await;
    let (mut device, _, _) = Client::device(&hub, TENANT, "pos-1").await;

    let listen = [broadcast("*"), broadcast("greet")];
    sb.subscribe("a", "room", json!({"broadcast": {"self": false, "ack": true}}), &listen).await;
    sb.subscribe("b", "room", json!({"broadcast": {"self": true, "ack": false}}), &listen).await;
    sb.subscribe("c", "room", json!({}), &[broadcast("*")]).await;

    // a (ack) sends: the hub answers, b gets it on both listeners, a (self: false) does not.
    assert_eq!(sb.send("a", "room", "greet", json!({"n": 1, "text": "hi"})).await, "ok");
    sb.await_binding("b", "room", 1, 1).await;
    // b (self, no ack) sends: both get it, on the `*` listener only.
    assert_eq!(sb.send("b", "room", "echo", json!({"n": 2})).await, "ok");
    sb.await_binding("a", "room", 0, 1).await;
    sb.await_binding("b", "room", 0, 2).await;
    // Too large (max_broadcast_payload_bytes = 1024): refused, and a (ack) is told.
    assert_eq!(sb.send("a", "room", "greet", json!({"blob": "x".repeat(2000)})).await, "error");
    // b has no ack: its send resolves at once, the hub drops it.
    assert_eq!(sb.send("b", "room", "echo", json!({"blob": "y".repeat(2000)})).await, "ok");
    // Another ordinary one after the refusals: the channels still work.
    assert_eq!(sb.send("a", "room", "greet", json!({"n": 3})).await, "ok");
    sb.await_binding("b", "room", 0, 3).await;
    tokio::time::sleep(QUIET).await;

    let a = sb.events("a", "room").await;
    let b = sb.events("b", "room").await;
    assert_eq!(broadcasts(&a), vec![(0, "echo".into(), json!({"n": 2}))], "a: only b's echo (self: false)");
    assert_eq!(
        broadcasts(&b),
        vec![
            (0, "greet".into(), json!({"n": 1, "text": "hi"})),
            (1, "greet".into(), json!({"n": 1, "text": "hi"})),
            (0, "echo".into(), json!({"n": 2})),
            (0, "greet".into(), json!({"n": 3})),
            (1, "greet".into(), json!({"n": 3})),
        ],
        "b: a's greetings on both listeners and its own echo (self: true), nothing too large"
    );
    a.iter().chain(b.iter()).for_each(assert_broadcast_shape);
    let c = sb.events("c", "room").await;
    assert_eq!(
        broadcasts(&c),
        vec![(0, "greet".into(), json!({"n": 1, "text": "hi"})), (0, "echo".into(), json!({"n": 2})), (0, "greet".into(), json!({"n": 3}))],
        "the bare RealtimeClient gets what b gets"
    );

    // The acks on the wire: every broadcast of a (ack: true) is answered ok, except the refused
    // one (answered error); none of b's is answered.
    let replies = |frames: &[Value]| -> Vec<(String, String)> {
        let sent: Vec<String> =
            frames.iter().filter(|f| f["dir"] == "out" && f["event"] == "broadcast").map(|f| f["ref"].as_str().unwrap_or_default().to_owned()).collect();
        sent.iter()
            .filter_map(|r| {
                frames
                    .iter()
                    .find(|f| f["dir"] == "in" && f["event"] == "phx_reply" && f["ref"] == json!(r))
                    .map(|f| (r.clone(), f["payload"]["status"].as_str().unwrap_or("?").to_owned()))
            })
            .collect()
    };
    let a_wire = sb.wire("a", Some("realtime:room")).await;
    let a_replies: Vec<String> = replies(&a_wire).into_iter().map(|(_, s)| s).collect();
    assert_eq!(a_replies, vec!["ok", "error", "ok"], "a's broadcasts and their replies: {a_wire:#?}");
    let b_wire = sb.wire("b", Some("realtime:room")).await;
    assert_eq!(replies(&b_wire), vec![], "no reply without ack: {b_wire:#?}");
    if vsn == "2.0.0" {
        // vsn 2: user broadcasts are binary both ways (kind 3 out, kind 4 in).
        assert!(a_wire.iter().filter(|f| f["event"] == "broadcast" && f["dir"] == "out").all(|f| f["binaryKind"] == 3), "{a_wire:#?}");
        assert!(a_wire.iter().filter(|f| f["event"] == "broadcast" && f["dir"] == "in").all(|f| f["binaryKind"] == 4), "{a_wire:#?}");
    }

    // The native dashboard got the public broadcasts that were relayed, the device none.
    let mut native = Vec::new();
    while native.len() < 3 {
        native.push(
            board
                .expect(|f| match f {
                    ServerFrame::Broadcast { channel, event, payload } => Some((channel.clone(), event.clone(), payload.clone())),
                    _ => None,
                })
                .await,
        );
    }
    assert_eq!(
        native,
        vec![
            ("room".into(), Some("greet".into()), json!({"n": 1, "text": "hi"})),
            ("room".into(), Some("echo".into()), json!({"n": 2})),
            ("room".into(), Some("greet".into()), json!({"n": 3})),
        ]
    );
    while let Some(frame) = device.recv_timeout(Duration::from_millis(300)).await {
        assert!(!matches!(frame, ServerFrame::Broadcast { .. }), "a device gets no Supabase client broadcast: {frame:?}");
    }
    // a's heartbeats were all answered: one socket all along, the channel never errored.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stats = sb.stats("a").await;
    assert_eq!((stats["connects"].clone(), stats["connected"].clone()), (json!(1), json!(true)), "{stats}");
    assert!(stats["heartbeats"].as_u64().unwrap_or(0) >= 5, "{stats}");
    let statuses: Vec<Value> = sb.statuses("a", "room").await.iter().map(|s| s["status"].clone()).collect();
    assert_eq!(statuses, vec![json!("SUBSCRIBED")]);
    sb.assert_no_client_errors().await;
    sb.exit().await;
    hub.shutdown().await;
}

async fn rest_and_native_broadcasts_reach_a_subscribed_client(vsn: &str) {
    let hub = start_hub().await;
    let url = project_url(&hub);
    let ann = user_token(TENANT, "ann");
    let mut sb = SbDriver::start().await;
    sb.create("a", &url, &ann, vsn).await;
    sb.create("sender", &url, &user_token(TENANT, "sam"), vsn).await;
    sb.subscribe("a", "news", json!({}), &[broadcast("*")]).await;
    let mut expected: Vec<(u64, String, Value)> = Vec::new();
    let mut step = |event: &str, payload: Value| {
        expected.push((0, event.to_owned(), payload));
        expected.len()
    };

    // POST /realtime/v1/api/broadcast (apikey header), two messages: one for another topic.
    let n = step("rest-batch", json!({"n": 1}));
    let body = json!({"messages": [
        {"topic": "elsewhere", "event": "rest-batch", "payload": {"n": 0}},
        {"topic": "news", "event": "rest-batch", "payload": {"n": 1}, "private": false},
    ]});
    let (status, text) = post(format!("{url}/realtime/v1/api/broadcast"), &[("apikey", &ann)], body).await;
    assert_eq!((status, text.as_str()), (202, ""), "the batch endpoint answers 202 with no body");
    sb.await_events("a", "news", "broadcast", n).await;

    // supabase-js's own REST paths: send() on a channel it never joined (the batch endpoint),
    // and httpSend() (the one-message endpoint).
    let n = step("rest-fallback", json!({"n": 2}));
    assert_eq!(sb.send("sender", "news", "rest-fallback", json!({"n": 2})).await, "ok");
    sb.await_events("a", "news", "broadcast", n).await;
    let n = step("rest-one", json!({"n": 3}));
    assert_eq!(sb.http_send("sender", "news", "rest-one", json!({"n": 3})).await, json!({"success": true}));
    sb.await_events("a", "news", "broadcast", n).await;

    // POST /realtime/v1/api/broadcast/{topic}/events/{event} with a bearer token.
    let n = step("rest-raw", json!({"n": 4, "list": [1, 2]}));
    let bearer = format!("Bearer {ann}");
    let (status, text) =
        post(format!("{url}/realtime/v1/api/broadcast/news/events/rest-raw"), &[("authorization", &bearer)], json!({"n": 4, "list": [1, 2]})).await;
    assert_eq!((status, text.as_str()), (202, ""));
    sb.await_events("a", "news", "broadcast", n).await;

    // A native server-side writer: POST /v1/tenants/{t}/broadcast with a service token, without
    // an event (it arrives as `broadcast`) and with one.
    let n = step("broadcast", json!({"n": 5}));
    let (status, text) = post(
        format!("{url}/v1/tenants/{TENANT}/broadcast"),
        &[("authorization", &format!("Bearer {BRIDGE_TOKEN}"))],
        json!({"channel": "news", "payload": {"n": 5}}),
    )
    .await;
    assert_eq!(status, 202, "{text}");
    sb.await_events("a", "news", "broadcast", n).await;
    let n = step("native-event", json!({"n": 6}));
    let (status, text) = post(
        format!("{url}/v1/tenants/{TENANT}/broadcast"),
        &[("authorization", &format!("Bearer {BRIDGE_TOKEN}"))],
        json!({"channel": "news", "event": "native-event", "payload": {"n": 6}}),
    )
    .await;
    assert_eq!(status, 202, "{text}");
    sb.await_events("a", "news", "broadcast", n).await;

    // Channel and event names with characters a URL must escape (supabase-js's httpSend
    // percent-encodes both path segments).
    sb.subscribe("a", "board:42/ä b", json!({}), &[broadcast("*")]).await;
    assert_eq!(sb.http_send("sender", "board:42/ä b", "moved card", json!({"n": 1})).await, json!({"success": true}));
    assert_eq!(sb.send("sender", "board:42/ä b", "moved?card#2", json!({"n": 2})).await, "ok");
    let got = sb.await_events("a", "board:42/ä b", "broadcast", 2).await;
    assert_eq!(
        broadcasts(&got),
        vec![(0, "moved card".into(), json!({"n": 1})), (0, "moved?card#2".into(), json!({"n": 2}))],
        "the names arrive as the client wrote them"
    );

    // Refusals: a private topic without a rule, no token, a payload over the limit.
    let (status, _) = post(format!("{url}/realtime/v1/api/broadcast/news/events/x?private=true"), &[("apikey", &ann)], json!({"n": 7})).await;
    assert_eq!(status, 403, "a private channel needs a [[supabase_private_channels]] rule");
    let (status, _) = post(format!("{url}/realtime/v1/api/broadcast"), &[], json!({"messages": [{"topic": "news", "event": "x", "payload": {}}]})).await;
    assert_eq!(status, 401);
    let (status, _) = post(
        format!("{url}/realtime/v1/api/broadcast"),
        &[("apikey", &ann)],
        json!({"messages": [{"topic": "news", "event": "x", "payload": {"b": "z".repeat(2000)}}]}),
    )
    .await;
    assert_eq!(status, 413);

    tokio::time::sleep(QUIET).await;
    let events = sb.events("a", "news").await;
    assert_eq!(broadcasts(&events), expected, "every REST and native broadcast once, in order, nothing else");
    events.iter().for_each(assert_broadcast_shape);
    sb.assert_no_client_errors().await;
    sb.exit().await;
    hub.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Presence
// ---------------------------------------------------------------------------------------------

/// `presenceState()` as `{key: [meta without presence_ref]}`.
fn presence_metas(state: &Value) -> BTreeMap<String, Vec<Value>> {
    state
        .as_object()
        .unwrap_or_else(|| panic!("a presence state, not {state}"))
        .iter()
        .map(|(key, metas)| {
            let metas = metas
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    let mut m = m.clone();
                    assert!(m["presence_ref"].is_string(), "supabase-js names phx_ref presence_ref: {m}");
                    m.as_object_mut().unwrap().remove("presence_ref");
                    m
                })
                .collect();
            (key.clone(), metas)
        })
        .collect()
}

async fn presence_sync_join_leave_and_the_sessions_channel(vsn: &str) {
    let hub = start_hub().await;
    let url = project_url(&hub);
    let mut sb = SbDriver::start().await;
    sb.create("a", &url, &user_token(TENANT, "ann"), vsn).await;
    sb.create("b", &url, &user_token(TENANT, "bob"), vsn).await;
    let listen = [presence("sync"), presence("join"), presence("leave")];
    sb.subscribe("a", "lobby", json!({"presence": {"key": "ann"}}), &listen).await;
    sb.subscribe("b", "lobby", json!({"presence": {"key": "bob"}}), &listen).await;
    // The first sync: nobody tracked yet.
    let first = sb.await_presence("a", "lobby", "sync", 1).await;
    assert_eq!(presence_metas(&first[0]["state"]), BTreeMap::new());

    assert_eq!(sb.track("a", "lobby", json!({"status": "online", "n": 1})).await, "ok");
    let joins = sb.await_presence("b", "lobby", "join", 1).await;
    let join = &joins[0]["payload"];
    assert_eq!(join["key"], "ann");
    assert_eq!(presence_metas(&json!({"ann": join["newPresences"]}))["ann"], vec![json!({"status": "online", "n": 1})]);
    sb.await_presence("a", "lobby", "join", 1).await;
    assert_eq!(sb.track("b", "lobby", json!({"status": "away"})).await, "ok");
    sb.await_presence("a", "lobby", "join", 2).await;
    sb.await_presence("b", "lobby", "join", 2).await;
    let want = BTreeMap::from([("ann".to_owned(), vec![json!({"status": "online", "n": 1})]), ("bob".to_owned(), vec![json!({"status": "away"})])]);
    assert_eq!(presence_metas(&sb.presence_state("a", "lobby").await), want);
    assert_eq!(presence_metas(&sb.presence_state("b", "lobby").await), want);

    // Track again: an update of ann's meta (a join of the new meta, and the old one leaves).
    assert_eq!(sb.track("a", "lobby", json!({"status": "busy", "n": 2})).await, "ok");
    until_events(&mut sb, "b", "lobby", WAIT, "b sees ann busy", |events| {
        events
            .iter()
            .rev()
            .find(|e| e["event"] == "sync")
            .is_some_and(|e| presence_metas(&e["state"]).get("ann") == Some(&vec![json!({"status": "busy", "n": 2})]))
    })
    .await;

    // Untrack: bob leaves.
    assert_eq!(sb.untrack("b", "lobby").await, "ok");
    let leaves = until_events(&mut sb, "a", "lobby", WAIT, "bob leaves a's presence", |events| {
        events.iter().any(|e| e["event"] == "leave" && e["payload"]["key"] == "bob")
    })
    .await;
    let leave = leaves.iter().find(|e| e["event"] == "leave" && e["payload"]["key"] == "bob").unwrap();
    assert_eq!(presence_metas(&json!({"bob": leave["payload"]["leftPresences"]}))["bob"], vec![json!({"status": "away"})]);
    assert_eq!(presence_metas(&sb.presence_state("a", "lobby").await), BTreeMap::from([("ann".to_owned(), vec![json!({"status": "busy", "n": 2})])]));

    // a leaves the channel: its presence goes with it.
    assert_eq!(sb.remove_channel("a", "lobby").await, "ok");
    let events = until_events(&mut sb, "b", "lobby", WAIT, "ann leaves b's presence", |events| {
        events.iter().rev().find(|e| e["event"] == "sync").is_some_and(|e| presence_metas(&e["state"]).is_empty())
    })
    .await;
    let leave = events.iter().rev().find(|e| e["event"] == "leave").unwrap();
    assert_eq!(leave["payload"]["key"], "ann");
    assert_eq!(presence_metas(&json!({"ann": leave["payload"]["leftPresences"]}))["ann"], vec![json!({"status": "busy", "n": 2})]);
    assert_eq!(presence_metas(&sb.presence_state("b", "lobby").await), BTreeMap::new());

    // The sessions channel lists the tenant's hub sessions: a native device, and the Supabase
    // sockets themselves (dashboard mode).
    let (device, _, _) = Client::device(&hub, TENANT, "pos-1").await;
    sb.create("w", &url, &user_token(TENANT, "wes"), vsn).await;
    sb.subscribe("w", "sessions", json!({}), &listen).await;
    let sync = sb.await_presence("w", "sessions", "sync", 1).await;
    let sessions = presence_metas(&sync[0]["state"]);
    let devices: Vec<(String, String, String)> = sessions
        .iter()
        .map(|(key, metas)| {
            assert_eq!(metas.len(), 1, "one meta per session: {metas:?}");
            let m = &metas[0];
            assert!(Uuid::parse_str(key).is_ok(), "keyed by session id: {key}");
            assert!(m["since_ms"].as_u64().is_some(), "{m}");
            (m["device_id"].as_str().unwrap_or("?").to_owned(), m["mode"].as_str().unwrap_or("?").to_owned(), m["user_id"].as_str().unwrap_or("?").to_owned())
        })
        .collect();
    let native: Vec<_> = devices.iter().filter(|(d, _, _)| !d.starts_with("supabase:")).cloned().collect();
    assert_eq!(native, vec![("pos-1".into(), "device".into(), "user-pos-1".into())], "{sessions:#?}");
    let mut sockets: Vec<(String, String)> = devices.iter().filter(|(d, _, _)| d.starts_with("supabase:")).map(|(_, m, u)| (m.clone(), u.clone())).collect();
    sockets.sort();
    assert_eq!(sockets, vec![("dashboard".into(), "ann".into()), ("dashboard".into(), "bob".into()), ("dashboard".into(), "wes".into())], "{sessions:#?}");
    // The device goes: it leaves; another comes: it joins.
    drop(device);
    until_events(&mut sb, "w", "sessions", WAIT, "pos-1 leaves the sessions channel", |events| {
        events.iter().any(|e| e["event"] == "leave" && e["payload"]["leftPresences"][0]["device_id"] == "pos-1")
    })
    .await;
    let (_device2, _, _) = Client::device(&hub, TENANT, "pos-2").await;
    until_events(&mut sb, "w", "sessions", WAIT, "pos-2 joins the sessions channel", |events| {
        events.iter().any(|e| e["event"] == "join" && e["payload"]["newPresences"][0]["device_id"] == "pos-2")
    })
    .await;
    sb.assert_no_client_errors().await;
    sb.exit().await;
    hub.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Postgres Changes
// ---------------------------------------------------------------------------------------------

/// Checks every postgres_changes event's frame: schema, table, errors null, a commit timestamp,
/// ids naming the binding, seqs increasing.
fn assert_change_frames(events: &[Value], table: &str) {
    let mut last = 0;
    for e in events {
        let p = &e["payload"];
        assert_eq!((p["schema"].as_str(), p["table"].as_str()), (Some("public"), Some(table)), "{e}");
        assert_eq!(p["errors"], Value::Null, "{e}");
        assert!(chrono::DateTime::parse_from_rfc3339(p["commit_timestamp"].as_str().unwrap_or_default()).is_ok(), "commit_timestamp: {e}");
        let seq = e["seq"].as_u64().unwrap_or_else(|| panic!("the frame carries data.seq: {e}"));
        assert!(seq > last, "seqs increase: {events:#?}");
        last = seq;
        assert!(e["epoch"].as_str().is_some_and(|s| !s.is_empty()), "{e}");
    }
}

async fn postgres_changes_from_a_device_sql_and_the_console(vsn: &str) {
    let hub = start_hub().await;
    let url = project_url(&hub);
    let mut sb = SbDriver::start().await;
    sb.create("a", &url, &user_token(TENANT, "ann"), vsn).await;
    let listen = [
        changes(binding("*", "products", json!({}))),
        changes(binding("*", "products", json!({"filter": "price_cents=gte.500"}))),
        changes(binding("INSERT", "products", json!({}))),
        changes(binding("DELETE", "products", json!({"filter": "name=eq.Tea"}))),
        changes(binding("*", "customers", json!({}))),
    ];
    let joined = sb.subscribe("a", "db", json!({}), &listen).await;
    assert_eq!(joined["status"], "SUBSCRIBED");
    let mut dev = Dev::connect(&hub, TENANT, "pos-1").await;
    let mut other = Dev::connect(&hub, TENANT, "pos-2").await;
    let mut all = 0;
    let mut expect_all = |n: usize| {
        all += n;
        all
    };

    // 1. A device inserts Tea at 100.
    let (p1, p2, p3) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let change = dev.upsert("products", json!({"id": p1}), product_fields(p1, "Tea", 100), 0);
    let v1 = dev.push(vec![change]).await[0];
    let got = sb.await_binding("a", "db", 0, expect_all(1)).await;
    let row = product_row(&hub, p1).await.unwrap();
    assert_same_row(&got[0]["payload"]["new"], &row, "the inserted row");
    assert_eq!(got[0]["payload"]["old"], json!({}), "an insert has no old record");
    assert_eq!(got[0]["seq"], json!(v1));
    // What supabase-js hands the callback: its reshaped payload, without the hub's `seq` and
    // `epoch` (they are in the frame's `data`, which the driver reads off the wire).
    let mut keys: Vec<&String> = got[0]["payload"].as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["commit_timestamp", "errors", "eventType", "new", "old", "schema", "table"]);
    assert_eq!(got[0]["rawKeys"], json!(["columns", "commit_timestamp", "epoch", "errors", "record", "schema", "seq", "table", "type"]));
    // 2. The device raises it to 600: an update with the previous row as old.
    let change = dev.upsert("products", json!({"id": p1}), json!({"price_cents": 600}), v1);
    let v2 = dev.push(vec![change]).await[0];
    let got = sb.await_binding("a", "db", 0, expect_all(1)).await;
    let updated = &got[1]["payload"];
    assert_same_row(&updated["new"], &product_row(&hub, p1).await.unwrap(), "the updated row");
    assert_same_row(&updated["old"], &row, "the previous row image");
    assert_eq!(got[1]["seq"], json!(v2));

    // 3-5. SQL: insert Coffee at 900, lower it to 50, delete it.
    sqlx::query("insert into products (tenant_id, id, sku, name, price_cents) values ($1, $2, 'SKU-SQL', 'Coffee', 900)")
        .bind(TENANT)
        .bind(p2)
        .execute(&hub.db)
        .await
        .unwrap();
    let got = sb.await_binding("a", "db", 0, expect_all(1)).await;
    let coffee = product_row(&hub, p2).await.unwrap();
    assert_same_row(&got[2]["payload"]["new"], &coffee, "the row inserted with SQL");
    sqlx::query("update products set price_cents = 50 where tenant_id = $1 and id = $2").bind(TENANT).bind(p2).execute(&hub.db).await.unwrap();
    let got = sb.await_binding("a", "db", 0, expect_all(1)).await;
    let cheap = product_row(&hub, p2).await.unwrap();
    assert_same_row(&got[3]["payload"]["new"], &cheap, "the row updated with SQL");
    assert_same_row(&got[3]["payload"]["old"], &coffee, "its previous image");
    sqlx::query("delete from products where tenant_id = $1 and id = $2").bind(TENANT).bind(p2).execute(&hub.db).await.unwrap();
    let got = sb.await_binding("a", "db", 0, expect_all(1)).await;
    assert_eq!(got[4]["payload"]["new"], json!({}), "a delete has no new record");
    assert_same_row(&got[4]["payload"]["old"], &cheap, "the deleted row");

    // 6. The device deletes Tea (at 600).
    let tea = product_row(&hub, p1).await.unwrap();
    let change = dev.delete("products", json!({"id": p1}), v2);
    dev.push(vec![change]).await;
    let got = sb.await_binding("a", "db", 0, expect_all(1)).await;
    assert_same_row(&got[5]["payload"]["old"], &tea, "the row the device deleted");

    // 7. A conflict on Cake, resolved in the console with a value of 777.
    let change = dev.upsert("products", json!({"id": p3}), product_fields(p3, "Cake", 100), 0);
    let c1 = dev.push(vec![change]).await[0];
    let change = dev.upsert("products", json!({"id": p3}), json!({"price_cents": 200}), c1);
    dev.push(vec![change]).await;
    other.clock = dev.clock + 1_000; // later: the incoming value wins
    let change = other.upsert("products", json!({"id": p3}), json!({"price_cents": 300}), c1);
    let r = other.c.push(vec![change]).await.remove(0);
    assert_eq!(r.status, ChangeStatus::Conflict, "{r:?}");
    sb.await_binding("a", "db", 0, expect_all(3)).await;
    let (status, list) = {
        let response = reqwest::Client::new().get(format!("{url}/v1/conflicts?status=open")).bearer_auth(manager(TENANT)).send().await.unwrap();
        (response.status().as_u16(), response.json::<Value>().await.unwrap())
    };
    assert_eq!(status, 200, "{list}");
    let conflict =
        list["conflicts"].as_array().unwrap().iter().find(|c| c["key"] == json!({"id": p3})).unwrap_or_else(|| panic!("the conflict on Cake: {list}")).clone();
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/conflicts/{}/resolve", conflict["id"]))
        .bearer_auth(manager(TENANT))
        .json(&json!({"action": "value", "value": 777}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let resolved: Value = response.json().await.unwrap();
    let resolution_seq = resolved["result"]["seq"].as_u64().expect("the resolution wrote at a seq");
    let got = sb.await_binding("a", "db", 0, expect_all(1)).await;
    let last = got.last().unwrap();
    assert_eq!(last["seq"], json!(resolution_seq));
    assert_same_row(&last["payload"]["new"], &product_row(&hub, p3).await.unwrap(), "the row the console wrote");
    tokio::time::sleep(QUIET).await;

    let events = sb.events_of("a", "db", "postgres_changes").await;
    assert_change_frames(&of_binding(&events, 0), "products");
    assert_eq!(
        summary(&of_binding(&events, 0)),
        vec![
            ev("INSERT", p1, Some(100), None),
            ev("UPDATE", p1, Some(600), Some(100)),
            ev("INSERT", p2, Some(900), None),
            ev("UPDATE", p2, Some(50), Some(900)),
            ev("DELETE", p2, None, Some(50)),
            ev("DELETE", p1, None, Some(600)),
            ev("INSERT", p3, Some(100), None),
            ev("UPDATE", p3, Some(200), Some(100)),
            ev("UPDATE", p3, Some(300), Some(200)),
            ev("UPDATE", p3, Some(777), Some(300)),
        ],
        "`*` on products: every change in order"
    );
    assert_eq!(
        summary(&of_binding(&events, 1)),
        vec![
            ev("UPDATE", p1, Some(600), Some(100)),
            ev("INSERT", p2, Some(900), None),
            ev("DELETE", p1, None, Some(600)),
            ev("UPDATE", p3, Some(777), Some(300))
        ],
        "price_cents=gte.500: changes whose new row matches, and deletes whose old row matched"
    );
    assert_eq!(
        summary(&of_binding(&events, 2)),
        vec![ev("INSERT", p1, Some(100), None), ev("INSERT", p2, Some(900), None), ev("INSERT", p3, Some(100), None)],
        "INSERT only"
    );
    assert_eq!(summary(&of_binding(&events, 3)), vec![ev("DELETE", p1, None, Some(600))], "DELETE with name=eq.Tea");
    assert_eq!(of_binding(&events, 4), Vec::<Value>::new(), "customers: nothing");
    // One frame per change, naming every binding that takes it.
    let frames = sb.raw("a", "realtime:db", "postgres_changes").await;
    assert_eq!(frames.len(), 10, "one frame per change: {frames:#?}");
    let ids: Vec<u64> = joined["joinReply"]["response"]["postgres_changes"].as_array().unwrap().iter().map(|b| b["id"].as_u64().unwrap()).collect();
    let named: Vec<Vec<u64>> = frames.iter().map(|f| f["payload"]["ids"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap()).collect()).collect();
    let want: Vec<Vec<u64>> = [vec![0, 2], vec![0, 1], vec![0, 1, 2], vec![0], vec![0], vec![0, 1, 3], vec![0, 2], vec![0], vec![0], vec![0, 1]]
        .iter()
        .map(|which| which.iter().map(|&i| ids[i]).collect())
        .collect();
    assert_eq!(named, want, "ids of each frame");
    sb.assert_no_client_errors().await;
    sb.exit().await;
    hub.shutdown().await;
}

async fn several_bindings_are_echoed_and_each_gets_its_changes(vsn: &str) {
    let hub = start_hub().await;
    let url = project_url(&hub);
    let mut sb = SbDriver::start().await;
    sb.create("a", &url, &user_token(TENANT, "ann"), vsn).await;
    sb.create("b", &url, &user_token(TENANT, "bob"), vsn).await;
    // A change before the join: only the binding that asks for it with since_seq gets it.
    let mint = Uuid::now_v7();
    sqlx::query("insert into products (tenant_id, id, sku, name, price_cents) values ($1, $2, 'M', 'Mint', 1)")
        .bind(TENANT)
        .bind(mint)
        .execute(&hub.db)
        .await
        .unwrap();
    let head = head_seq(&hub, TENANT).await;
    assert!(head > 0);
    let bindings = [
        binding("*", "products", json!({})),
        binding("INSERT", "customers", json!({"filter": "name=eq.Ada"})),
        binding("UPDATE", "orders", json!({"filter": "status=in.(open,paid)"})),
        binding("DELETE", "order_lines", json!({})),
        json!({"event": "*", "schema": "public"}),
        binding("*", "products", json!({"filter": "price_cents=lt.10", "since_seq": head - 1})),
    ];
    let mut listen: Vec<Value> = bindings.iter().cloned().map(changes).collect();
    listen.push(system());
    let joined = sb.subscribe("a", "multi", json!({}), &listen).await;
    assert_eq!(joined["status"], "SUBSCRIBED", "{joined}");
    let reply = &joined["joinReply"];
    assert_eq!(reply["status"], "ok", "{reply}");
    let echoed = reply["response"]["postgres_changes"].as_array().unwrap_or_else(|| panic!("{reply}")).clone();
    assert_eq!(echoed.len(), bindings.len(), "{reply}");
    for (sent, got) in bindings.iter().zip(&echoed) {
        let mut want = sent.clone();
        want.as_object_mut().unwrap().remove("since_seq");
        want["id"] = got["id"].clone();
        assert!(got["id"].as_u64().is_some(), "{got}");
        assert_eq!(got, &want, "echoed in order with the client's own strings (absent stays absent)");
    }
    let systems = sb.await_events("a", "multi", "system", 1).await;
    assert_eq!(systems[0]["payload"], json!({"extension": "postgres_changes", "status": "ok", "message": "Subscribed to PostgreSQL", "channel": "multi"}));
    assert_eq!(sb.statuses("a", "multi").await.iter().map(|s| s["status"].clone()).collect::<Vec<_>>(), vec![json!("SUBSCRIBED")]);
    // The same bindings on another socket get the same ids.
    let b_joined = sb.subscribe("b", "multi", json!({}), &listen).await;
    assert_eq!(b_joined["joinReply"]["response"]["postgres_changes"], reply["response"]["postgres_changes"]);

    // One write for each binding, and some that only `*` on the schema takes.
    let (ada, bob, order, product_id) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let sql = [
        format!("insert into customers (tenant_id, id, name) values ('{TENANT}', '{ada}', 'Ada')"),
        format!("insert into customers (tenant_id, id, name) values ('{TENANT}', '{bob}', 'Bob')"),
        format!("insert into orders (tenant_id, id, store_id, status) values ('{TENANT}', '{order}', 's1', 'open')"),
        format!("update orders set status = 'paid' where tenant_id = '{TENANT}' and id = '{order}'"),
        format!("update orders set status = 'void' where tenant_id = '{TENANT}' and id = '{order}'"),
        format!("insert into products (tenant_id, id, sku, name, price_cents) values ('{TENANT}', '{product_id}', 'S', 'Gum', 5)"),
        format!("insert into order_lines (tenant_id, order_id, line_no, product_id, quantity, unit_price_cents) values ('{TENANT}', '{order}', 1, '{product_id}', 2, 5)"),
        format!("delete from order_lines where tenant_id = '{TENANT}' and order_id = '{order}'"),
    ];
    for statement in &sql {
        sqlx::query(statement).execute(&hub.db).await.unwrap();
    }
    sb.await_binding("a", "multi", 4, sql.len()).await;
    tokio::time::sleep(QUIET).await;
    let events = sb.events_of("a", "multi", "postgres_changes").await;
    let kinds = |i: usize| -> Vec<(String, String)> {
        of_binding(&events, i)
            .iter()
            .map(|e| (e["payload"]["table"].as_str().unwrap().to_owned(), e["payload"]["eventType"].as_str().unwrap().to_owned()))
            .collect()
    };
    let pair = |t: &str, e: &str| (t.to_owned(), e.to_owned());
    assert_eq!(kinds(0), vec![pair("products", "INSERT")]);
    assert_eq!(kinds(1), vec![pair("customers", "INSERT")], "only Ada");
    assert_eq!(of_binding(&events, 1)[0]["payload"]["new"]["name"], "Ada");
    assert_eq!(kinds(2), vec![pair("orders", "UPDATE")], "open → paid only (void leaves the filter)");
    assert_eq!(of_binding(&events, 2)[0]["payload"]["new"]["status"], "paid");
    assert_eq!(of_binding(&events, 2)[0]["payload"]["old"]["status"], "open");
    assert_eq!(kinds(3), vec![pair("order_lines", "DELETE")]);
    assert_eq!(
        kinds(4),
        vec![
            pair("customers", "INSERT"),
            pair("customers", "INSERT"),
            pair("orders", "INSERT"),
            pair("orders", "UPDATE"),
            pair("orders", "UPDATE"),
            pair("products", "INSERT"),
            pair("order_lines", "INSERT"),
            pair("order_lines", "DELETE"),
        ],
        "`*` on the schema: every change of every table, in order"
    );
    assert_eq!(kinds(5), vec![pair("products", "INSERT"), pair("products", "INSERT")], "price_cents=lt.10, joined with since_seq before Mint");
    let names: Vec<Value> = of_binding(&events, 5).iter().map(|e| e["payload"]["new"]["name"].clone()).collect();
    assert_eq!(names, vec![json!("Mint"), json!("Gum")]);
    assert_eq!(of_binding(&events, 5)[0]["seq"], json!(head));
    // Types cast by supabase-js from the columns: numbers for int4, text as text.
    let line = &of_binding(&events, 4)[6]["payload"]["new"];
    assert_eq!((line["line_no"].clone(), line["quantity"].clone(), line["unit_price_cents"].clone()), (json!(1), json!(2), json!(5)), "{line}");

    // Bindings the hub refuses: the join fails with the reason, as Supabase's.
    let refused = sb.subscribe_any("a", "unknown", json!({}), &[changes(binding("*", "no_such_table", json!({})))], WAIT).await;
    assert_eq!(refused["status"], "CHANNEL_ERROR", "{refused}");
    assert!(refused["error"].as_str().unwrap_or_default().contains("RealtimeDisabledForConfiguration"), "{refused}");
    let refused = sb.subscribe_any("a", "badfilter", json!({}), &[changes(binding("*", "products", json!({"filter": "nope=eq.1"})))], WAIT).await;
    assert_eq!(refused["status"], "CHANNEL_ERROR", "{refused}");
    assert!(refused["error"].as_str().unwrap_or_default().contains("InvalidFilter"), "{refused}");
    // The good channel is unaffected.
    assert_eq!(sb.statuses("a", "multi").await.len(), 1);
    sb.assert_no_client_errors().await;
    sb.exit().await;
    hub.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------------

async fn set_auth_keeps_the_channel_alive(vsn: &str) {
    // No leeway: a channel whose new token expires is closed at once (see the end).
    let hub = TestHub::start_with(|config| config.jwt_leeway_secs = 0).await;
    let url = project_url(&hub);
    let mut sb = SbDriver::start().await;
    sb.create("a", &url, &user_token(TENANT, "ann"), vsn).await;
    sb.create("b", &url, &user_token(TENANT, "bob"), vsn).await;
    let listen = [changes(binding("*", "products", json!({}))), broadcast("*"), system()];
    sb.subscribe("a", "live", json!({}), &listen).await;
    sb.subscribe("b", "live", json!({}), &[broadcast("*")]).await;
    let mut dev = Dev::connect(&hub, TENANT, "pos-1").await;

    // A new token (another expiry) for the same tenant.
    let fresh = token_with(SECRET, TENANT, "ann", 7200);
    sb.set_auth("a", &fresh).await;
    let wire = sb.wire("a", Some("realtime:live")).await;
    // (supabase-js may also have pushed the key itself, when the join was answered before it
    // had read it from its session.)
    let pushed: Vec<&Value> =
        wire.iter().filter(|f| f["dir"] == "out" && f["event"] == "access_token" && f["payload"]["access_token"] == json!(fresh)).collect();
    assert_eq!(pushed.len(), 1, "setAuth pushes access_token to the joined channel: {wire:#?}");
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Still alive: changes and broadcasts arrive.
    let id = Uuid::now_v7();
    let change = dev.upsert("products", json!({"id": id}), product_fields(id, "Tea", 100), 0);
    let seq = dev.push(vec![change]).await[0];
    let got = sb.await_events("a", "live", "postgres_changes", 1).await;
    assert_eq!((got[0]["seq"].clone(), got[0]["payload"]["new"]["id"].clone()), (json!(seq), json!(id)));
    assert_eq!(sb.send("b", "live", "after", json!({"n": 1})).await, "ok");
    let got = sb.await_events("a", "live", "broadcast", 1).await;
    assert_eq!(got[0]["payload"]["payload"], json!({"n": 1}));
    let statuses: Vec<Value> = sb.statuses("a", "live").await.iter().map(|s| s["status"].clone()).collect();
    assert_eq!(statuses, vec![json!("SUBSCRIBED")], "no error, no close");
    let systems: Vec<Value> = sb.events_of("a", "live", "system").await.iter().map(|e| e["payload"].clone()).collect();
    assert!(systems.iter().all(|s| s["status"] == "ok"), "no system error: {systems:#?}");

    // A token of another tenant, or signed with another key, is refused: the channel is told
    // why (system error) and closed.
    for (client, bad) in [("c", user_token(OTHER_TENANT, "eve")), ("d", token_with("not-the-hub-secret", TENANT, "eve", 3600))] {
        sb.create(client, &url, &user_token(TENANT, "cid"), vsn).await;
        sb.subscribe(client, "live", json!({}), &listen).await;
        sb.set_auth(client, &bad).await;
        sb.await_status(client, "live", "CLOSED", 0, WAIT).await;
        let systems = sb.await_events(client, "live", "system", 1).await;
        let errors: Vec<&Value> = systems.iter().filter(|e| e["payload"]["status"] == "error").collect();
        assert_eq!(errors.len(), 1, "{client}: one system error: {systems:#?}");
        assert!(errors[0]["payload"]["message"].as_str().unwrap_or_default().starts_with("Unauthorized"), "{client}: {systems:#?}");
        assert_eq!(errors[0]["payload"]["channel"], "live");
    }
    // The closed channels get nothing more; a still does.
    let change = dev.upsert("products", json!({"id": id}), json!({"price_cents": 5}), seq);
    dev.push(vec![change]).await;
    sb.await_events("a", "live", "postgres_changes", 2).await;
    tokio::time::sleep(QUIET).await;
    for client in ["c", "d"] {
        let changes = sb.events_of(client, "live", "postgres_changes").await;
        assert!(changes.is_empty(), "{client} was closed: {changes:#?}");
    }

    // The new token is the channel's from then on: one that expires in 2 s closes it then,
    // although the socket's key is valid for an hour.
    sb.create("e", &url, &user_token(TENANT, "eli"), vsn).await;
    sb.subscribe("e", "live", json!({}), &listen).await;
    sb.set_auth("e", &token_with(SECRET, TENANT, "eli", 2)).await;
    sb.await_status("e", "live", "CLOSED", 0, WAIT).await;
    let systems: Vec<Value> = sb.events_of("e", "live", "system").await.iter().map(|e| e["payload"].clone()).collect();
    assert!(systems.contains(&json!({"extension": "system", "status": "error", "message": "Token has expired", "channel": "live"})), "{systems:#?}");
    let statuses: Vec<Value> = sb.statuses("a", "live").await.iter().map(|s| s["status"].clone()).collect();
    assert_eq!(statuses, vec![json!("SUBSCRIBED")], "a's channel is still joined");
    sb.assert_no_client_errors().await;
    sb.exit().await;
    hub.shutdown().await;
}

async fn a_token_signed_with_the_wrong_key_is_refused(vsn: &str) {
    let hub = start_hub().await;
    let url = project_url(&hub);
    let wrong = token_with("not-the-hub-secret", TENANT, "mallory", 3600);
    let expired = token_with(SECRET, TENANT, "old", -3600);

    // The upgrade is refused over HTTP: 401 with a JSON error, no socket.
    for (what, bad) in [("wrong key", &wrong), ("expired", &expired)] {
        let socket = format!("ws://{}/realtime/v1/websocket?apikey={bad}&vsn={vsn}", hub.addr);
        match tokio_tungstenite::connect_async(socket).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status().as_u16(), 401, "{what}");
                let body: Value = serde_json::from_slice(response.body().as_deref().unwrap_or_default()).unwrap_or(Value::Null);
                assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{what}: {body}");
            }
            Err(other) => panic!("{what}: refused with {other}, expected HTTP 401"),
            Ok(_) => panic!("{what}: the hub accepted the socket"),
        }
    }
    let good = format!("ws://{}/realtime/v1/websocket?apikey={}&vsn={vsn}", hub.addr, user_token(TENANT, "ann"));
    assert!(tokio_tungstenite::connect_async(good).await.is_ok(), "a good token connects");

    // The real client: its channel never joins, and no event reaches it.
    let mut sb = SbDriver::start().await;
    sb.create("m", &url, &wrong, vsn).await;
    sb.create("ok", &url, &user_token(TENANT, "ann"), vsn).await;
    let first = sb.subscribe_any("m", "room", json!({}), &[broadcast("*"), changes(binding("*", "products", json!({})))], Duration::from_secs(15)).await;
    assert_eq!(first["status"], "CHANNEL_ERROR", "{first}");
    sb.subscribe("ok", "room", json!({"broadcast": {"ack": true}}), &[broadcast("*")]).await;
    assert_eq!(sb.send("ok", "room", "e", json!({"n": 1})).await, "ok");
    let mut dev = Dev::connect(&hub, TENANT, "pos-1").await;
    let id = Uuid::now_v7();
    let change = dev.upsert("products", json!({"id": id}), product_fields(id, "Tea", 1), 0);
    dev.push(vec![change]).await;
    // Let supabase-js retry a couple of times (1 s, 2 s backoff).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let statuses = sb.statuses("m", "room").await;
    assert!(statuses.iter().all(|s| s["status"] != "SUBSCRIBED"), "{statuses:#?}");
    assert_eq!(sb.events("m", "room").await, Vec::<Value>::new());
    let refusals = sb.refusals("m").await;
    assert!(!refusals.is_empty() && refusals.iter().all(|r| r["status"] == 401), "every upgrade refused with 401: {refusals:#?}");
    sb.assert_no_client_errors().await;
    sb.exit().await;
    hub.shutdown().await;
}

/// A project-wide anon key: signed by the hub's key, with a role and no tenant.
fn anon_key() -> String {
    synchub::auth::mint_hs256(SECRET, &json!({"role": "anon", "iss": "supabase", "exp": synchub::auth::unix_now() + 3600}))
}

async fn an_anon_key_client_gets_its_tenant_from_the_users_token(vsn: &str) {
    let hub = start_hub().await;
    let url = project_url(&hub);
    let mut sb = SbDriver::start().await;
    let user = user_token(TENANT, "ann");
    let listen = [broadcast("*"), changes(binding("*", "products", json!({})))];

    // An app with third-party auth: createClient(url, anonKey, { accessToken }). Once
    // supabase-js holds the user's token, a join carries it, and it brings the tenant.
    sb.create_third_party("app", &url, &anon_key(), vsn, Some(&user)).await;
    sb.await_access_token("app", &user).await;
    sb.subscribe("app", "room", json!({}), &listen).await;
    let joins: Vec<Value> = sb.wire("app", Some("realtime:room")).await.into_iter().filter(|f| f["dir"] == "out" && f["event"] == "phx_join").collect();
    assert_eq!(joins[0]["payload"]["access_token"], json!(user), "{joins:#?}");

    // A screen that subscribes before the user signed in is refused until there is a token.
    sb.create_third_party("early", &url, &anon_key(), vsn, None).await;
    let first = sb.subscribe_any("early", "room", json!({}), &listen, WAIT).await;
    assert_eq!(first["status"], "CHANNEL_ERROR", "{first}");
    assert!(first["error"].as_str().unwrap_or_default().starts_with("Unauthorized"), "{first}");
    // The user signs in: the app tells supabase-js (setAuth()), which retries the join (1 s,
    // 2 s, 5 s...) with the token.
    let eve = user_token(TENANT, "eve");
    sb.set_user_token("early", &eve).await;
    sb.refresh_auth("early").await;
    sb.await_status("early", "room", "SUBSCRIBED", 1, REJOIN).await;

    // Both are sessions of the tenant: its broadcasts and changes reach them.
    let (status, _) = post(
        format!("{url}/v1/tenants/{TENANT}/broadcast"),
        &[("authorization", &format!("Bearer {BRIDGE_TOKEN}"))],
        json!({"channel": "room", "event": "hello", "payload": {"n": 1}}),
    )
    .await;
    assert_eq!(status, 202);
    let mut dev = Dev::connect(&hub, TENANT, "pos-1").await;
    let id = Uuid::now_v7();
    let change = dev.upsert("products", json!({"id": id}), product_fields(id, "Tea", 100), 0);
    let seq = dev.push(vec![change]).await[0];
    for client in ["app", "early"] {
        let got = sb.await_events(client, "room", "broadcast", 1).await;
        assert_eq!(got[0]["payload"]["payload"], json!({"n": 1}), "{client}");
        let got = sb.await_events(client, "room", "postgres_changes", 1).await;
        assert_eq!(got[0]["seq"], json!(seq), "{client}");
    }
    // The REST path with the anon key as apikey and the user's token as bearer (httpSend).
    assert_eq!(sb.http_send("app", "room", "rest", json!({"n": 2})).await, json!({"success": true}));
    let got = sb.await_events("early", "room", "broadcast", 2).await;
    assert_eq!(got[1]["payload"]["event"], "rest");
    // The anon key alone names no tenant for REST.
    let (status, _) =
        post(format!("{url}/realtime/v1/api/broadcast"), &[("apikey", &anon_key())], json!({"messages": [{"topic": "room", "event": "x", "payload": {}}]}))
            .await;
    assert_eq!(status, 401);
    // A token refresh (a new token of the same user, e.g. a later expiry) on the next
    // setAuth() or heartbeat: pushed to the channel, which stays joined.
    let fresh = token_with(SECRET, TENANT, "ann", 7200);
    sb.set_user_token("app", &fresh).await;
    sb.refresh_auth("app").await;
    let pushed = sb
        .wire("app", Some("realtime:room"))
        .await
        .into_iter()
        .filter(|f| f["event"] == "access_token" && f["payload"]["access_token"] == json!(fresh))
        .count();
    assert_eq!(pushed, 1);
    tokio::time::sleep(QUIET).await;
    let statuses: Vec<Value> = sb.statuses("app", "room").await.iter().map(|s| s["status"].clone()).collect();
    assert_eq!(statuses, vec![json!("SUBSCRIBED")]);
    assert_eq!(sb.events_of("app", "room", "broadcast").await.len(), 2);
    sb.assert_no_client_errors().await;
    sb.exit().await;
    hub.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Tenants
// ---------------------------------------------------------------------------------------------

async fn another_tenant_on_the_same_channel_name_gets_nothing(vsn: &str) {
    let hub = start_hub().await;
    let url = project_url(&hub);
    let mut sb = SbDriver::start().await;
    let listen = [broadcast("*"), presence("sync"), presence("join"), presence("leave"), changes(binding("*", "products", json!({})))];
    let config = json!({"broadcast": {"self": true, "ack": true}});
    for (client, tenant, user) in [("a1", TENANT, "ann"), ("a2", TENANT, "amy"), ("b1", OTHER_TENANT, "bea")] {
        sb.create(client, &url, &user_token(tenant, user), vsn).await;
        let mut config = config.clone();
        config["presence"] = json!({"key": user});
        sb.subscribe(client, "room", config, &listen).await;
        sb.subscribe(client, "sessions", json!({}), &[presence("sync"), presence("join")]).await;
    }
    let mut dev_a = Dev::connect(&hub, TENANT, "pos-1").await;
    let mut dev_b = Dev::connect(&hub, OTHER_TENANT, "pos-9").await;

    // Tenant A: a broadcast, a presence, a change, a REST broadcast, a native broadcast.
    assert_eq!(sb.send("a1", "room", "hello", json!({"from": "a"})).await, "ok");
    assert_eq!(sb.track("a1", "room", json!({"tenant": "a"})).await, "ok");
    let id = Uuid::now_v7();
    let change = dev_a.upsert("products", json!({"id": id}), product_fields(id, "A-Tea", 100), 0);
    dev_a.push(vec![change]).await;
    let (status, _) = post(
        format!("{url}/realtime/v1/api/broadcast"),
        &[("apikey", &user_token(TENANT, "ann"))],
        json!({"messages": [{"topic": "room", "event": "rest", "payload": {}}]}),
    )
    .await;
    assert_eq!(status, 202);
    let (status, _) = post(
        format!("{url}/v1/tenants/{TENANT}/broadcast"),
        &[("authorization", &format!("Bearer {BRIDGE_TOKEN}"))],
        json!({"channel": "room", "payload": {}}),
    )
    .await;
    assert_eq!(status, 202);
    // Tenant B does the same on its own.
    assert_eq!(sb.send("b1", "room", "hello", json!({"from": "b"})).await, "ok");
    assert_eq!(sb.track("b1", "room", json!({"tenant": "b"})).await, "ok");
    let other_id = Uuid::now_v7();
    let change = dev_b.upsert("products", json!({"id": other_id}), product_fields(other_id, "B-Tea", 100), 0);
    dev_b.push(vec![change]).await;

    // a2 gets everything of tenant A.
    sb.await_events("a2", "room", "broadcast", 3).await;
    sb.await_events("a2", "room", "postgres_changes", 1).await;
    until_events(&mut sb, "a2", "room", WAIT, "a2 sees ann", |events| events.iter().any(|e| e["event"] == "join" && e["payload"]["key"] == "ann")).await;
    sb.await_events("b1", "room", "postgres_changes", 1).await;
    sb.await_events("b1", "room", "broadcast", 1).await;
    tokio::time::sleep(QUIET).await;

    // b1 got only its own tenant's: its own broadcast (self), its own presence, its change.
    let b = sb.events("b1", "room").await;
    assert_eq!(broadcasts(&b), vec![(0, "hello".into(), json!({"from": "b"}))], "b1's broadcasts");
    let changes_b: Vec<Value> = b.iter().filter(|e| e["kind"] == "postgres_changes").map(|e| e["payload"]["new"]["id"].clone()).collect();
    assert_eq!(changes_b, vec![json!(other_id)], "b1's changes");
    assert_eq!(presence_metas(&sb.presence_state("b1", "room").await), BTreeMap::from([("bea".to_owned(), vec![json!({"tenant": "b"})])]));
    assert!(b.iter().filter(|e| e["kind"] == "presence" && e["event"] != "sync").all(|e| e["payload"]["key"] == "bea"), "{b:#?}");
    // And tenant A saw nothing of B.
    for client in ["a1", "a2"] {
        let a = sb.events(client, "room").await;
        assert!(broadcasts(&a).iter().all(|(_, _, p)| p != &json!({"from": "b"})), "{client}: {a:#?}");
        let ids: Vec<Value> = a.iter().filter(|e| e["kind"] == "postgres_changes").map(|e| e["payload"]["new"]["id"].clone()).collect();
        assert_eq!(ids, vec![json!(id)], "{client}");
        assert!(!presence_metas(&sb.presence_state(client, "room").await).contains_key("bea"), "{client}");
    }
    // The sessions channel lists the tenant's own sessions only.
    let state = presence_metas(&sb.presence_state("b1", "sessions").await);
    let devices: Vec<&str> = state.values().map(|m| m[0]["device_id"].as_str().unwrap_or("?")).filter(|d| !d.starts_with("supabase:")).collect();
    assert_eq!(devices, vec!["pos-9"], "{state:#?}");
    let users: Vec<&str> = state
        .values()
        .filter(|m| m[0]["device_id"].as_str().is_some_and(|d| d.starts_with("supabase:")))
        .map(|m| m[0]["user_id"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(users, vec!["bea"], "{state:#?}");
    sb.assert_no_client_errors().await;
    sb.exit().await;
    hub.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// since_seq and snapshot
// ---------------------------------------------------------------------------------------------

/// `(seq, eventType, id)` of postgres_changes events.
fn seq_kind_id(events: &[Value]) -> Vec<(u64, String, String)> {
    events
        .iter()
        .map(|e| {
            let p = &e["payload"];
            let id = p["new"]["id"].as_str().or(p["old"]["id"].as_str()).unwrap_or("?").to_owned();
            (e["seq"].as_u64().unwrap_or(0), p["eventType"].as_str().unwrap_or("?").to_owned(), id)
        })
        .collect()
}

/// Wait until the hub knows the log was trimmed past `seq`: a native device resuming from it is
/// told to resync (the trim reaches the hub by a notification).
async fn await_floor(hub: &TestHub, tenant: &str, epoch: &str, seq: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut c = hub.client().await;
        let position = protocol::Position { epoch: epoch.to_owned(), seq };
        c.hello(&token(tenant, "floor-probe", "Employee", Some("floor-probe")), Some("floor-probe"), Some(position)).await;
        let frame = c.recv().await;
        if matches!(frame, ServerFrame::MustResync { .. }) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the hub still serves from seq {seq} after the trim: {frame:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What synchub-since stored for the channel `feed` in the driver's storage `storage`.
async fn stored_position(sb: &mut SbDriver, storage: &str) -> Value {
    let stored = sb.storage(storage).await;
    let text = stored["values"]["synchub-since:realtime:feed"].as_str().unwrap_or_else(|| panic!("a stored position: {stored}"));
    serde_json::from_str(text).unwrap()
}

/// 200 changes by a device, in batches: 100 inserts, 60 updates, 40 deletes. Returns
/// `(seq, eventType, id)` of each, in order.
async fn two_hundred_changes(dev: &mut Dev) -> Vec<(u64, String, String)> {
    let ids: Vec<Uuid> = (0..100).map(|_| Uuid::now_v7()).collect();
    let mut made = Vec::new();
    let mut versions = BTreeMap::new();
    for chunk in ids.chunks(20) {
        let batch: Vec<_> =
            chunk.iter().enumerate().map(|(i, id)| dev.upsert("products", json!({"id": id}), product_fields(*id, "Bulk", 100 + i as i64), 0)).collect();
        for (id, seq) in chunk.iter().zip(dev.push(batch).await) {
            versions.insert(*id, seq);
            made.push((seq, "INSERT".to_owned(), id.to_string()));
        }
    }
    for chunk in ids[..60].chunks(20) {
        let batch: Vec<_> = chunk.iter().map(|id| dev.upsert("products", json!({"id": id}), json!({"price_cents": 999}), versions[id])).collect();
        for (id, seq) in chunk.iter().zip(dev.push(batch).await) {
            versions.insert(*id, seq);
            made.push((seq, "UPDATE".to_owned(), id.to_string()));
        }
    }
    for chunk in ids[60..].chunks(20) {
        let batch: Vec<_> = chunk.iter().map(|id| dev.delete("products", json!({"id": id}), versions[id])).collect();
        for (id, seq) in chunk.iter().zip(dev.push(batch).await) {
            made.push((seq, "DELETE".to_owned(), id.to_string()));
        }
    }
    assert_eq!(made.len(), 200);
    made
}

async fn two_hundred_changes_missed_offline_arrive_in_order_after_rejoin(vsn: &str) {
    let hub = start_hub().await;
    let url = project_url(&hub);
    let mut sb = SbDriver::start().await;
    let feed = [changes(binding("*", "products", json!({})))];
    // a: synchub-since (clients/supabase/synchub-since.mjs), rejoining by itself.
    sb.create_with_since("a", &url, &user_token(TENANT, "ann"), vsn, "store-a").await;
    let joined = sb.subscribe_since("a", "feed", json!({}), &feed).await;
    assert_eq!(joined["restored"], Value::Null, "nothing stored yet");
    // b: plain supabase-js, rejoining by hand with the seq it last saw.
    sb.create("b", &url, &user_token(TENANT, "bob"), vsn).await;
    sb.subscribe("b", "feed", json!({}), &feed).await;

    let mut dev = Dev::connect(&hub, TENANT, "pos-1").await;
    let warm: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    let batch: Vec<_> = warm.iter().map(|id| dev.upsert("products", json!({"id": id}), product_fields(*id, "Warm", 1), 0)).collect();
    let warm_seqs = dev.push(batch).await;
    for client in ["a", "b"] {
        let got = sb.await_events(client, "feed", "postgres_changes", 3).await;
        assert_eq!(got.iter().map(|e| e["seq"].as_u64().unwrap()).collect::<Vec<_>>(), warm_seqs, "{client}");
    }
    let last_seen = warm_seqs[2];
    let position = sb.since_position("a", "feed").await;
    assert_eq!(position["position"]["seq"], json!(last_seen), "synchub-since keeps the last seq: {position}");
    let epoch = position["position"]["epoch"].as_str().expect("and the epoch").to_owned();
    assert_eq!(stored_position(&mut sb, "store-a").await, json!({"seq": last_seen, "epoch": epoch}), "and stores it");

    // a loses its connection, b leaves; 200 changes are made meanwhile.
    let before = sb.statuses("a", "feed").await.len();
    sb.offline("a").await;
    assert_eq!(sb.remove_channel("b", "feed").await, "ok");
    let made = two_hundred_changes(&mut dev).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sb.events_of("a", "feed", "postgres_changes").await.len(), 3, "a is offline");

    // a reconnects; supabase-js rejoins with the payload synchub-since keeps up to date.
    sb.online("a").await;
    sb.await_status("a", "feed", "SUBSCRIBED", before, REJOIN).await;
    let got = sb.await_events_for("a", "feed", "postgres_changes", 203, REJOIN).await;
    // b rejoins by hand: a new channel whose binding carries since_seq.
    sb.subscribe("b", "feed2", json!({}), &[changes(binding("*", "products", json!({"since_seq": last_seen})))]).await;
    sb.await_events_for("b", "feed2", "postgres_changes", 200, REJOIN).await;
    tokio::time::sleep(QUIET).await;

    let got_a = sb.events_of("a", "feed", "postgres_changes").await;
    assert_eq!(got_a.len(), 203, "no change twice");
    assert_eq!(seq_kind_id(&got_a[3..]), made, "a: the 200 missed changes, in order");
    assert_eq!(&got[..3], &got_a[..3]);
    let got_b = sb.events_of("b", "feed2", "postgres_changes").await;
    assert_eq!(seq_kind_id(&got_b), made, "b: the 200 changes after since_seq, in order");
    // The contents survive the catch-up: the last update and delete as written.
    let update = got_a.iter().find(|e| e["seq"] == json!(made[160 - 1].0)).unwrap();
    assert_eq!(update["payload"]["new"]["price_cents"], 999);
    assert_eq!(update["payload"]["old"]["price_cents"], json!(100 + 19));
    assert_change_frames(&got_a, "products");

    // The rejoin asked for exactly the missed changes.
    let joins: Vec<Value> = sb.wire("a", Some("realtime:feed")).await.into_iter().filter(|f| f["dir"] == "out" && f["event"] == "phx_join").collect();
    assert_eq!(joins.len(), 2, "the first join and one rejoin: {joins:#?}");
    let rejoin = &joins[1]["payload"]["config"]["postgres_changes"][0];
    assert_eq!((rejoin["since_seq"].clone(), rejoin["since_epoch"].clone()), (json!(last_seen), json!(epoch)), "{rejoin}");
    assert_eq!(joins[0]["payload"]["config"]["postgres_changes"][0].get("since_seq"), None, "the first join starts live");
    let last = made[199].0;
    let position = sb.since_position("a", "feed").await;
    assert_eq!(position["position"]["seq"], json!(last), "{position}");
    assert_eq!(position["lost"], json!([]));

    // A reload: a goes away; 20 more changes; a new client with the same storage continues
    // where a stopped (synchub-since restores the stored seq before the first join).
    sb.close("a").await;
    assert_eq!(stored_position(&mut sb, "store-a").await, json!({"seq": last, "epoch": epoch}));
    let more: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
    let batch: Vec<_> = more.iter().map(|id| dev.upsert("products", json!({"id": id}), product_fields(*id, "Later", 7), 0)).collect();
    let more_seqs = dev.push(batch).await;
    sb.create_with_since("a2", &url, &user_token(TENANT, "ann"), vsn, "store-a").await;
    let joined = sb.subscribe_since("a2", "feed", json!({}), &feed).await;
    assert_eq!(joined["restored"], json!({"seq": last, "epoch": epoch}));
    let got = sb.await_events("a2", "feed", "postgres_changes", 20).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(sb.events_of("a2", "feed", "postgres_changes").await.len(), 20);
    assert_eq!(got.iter().map(|e| e["seq"].as_u64().unwrap()).collect::<Vec<_>>(), more_seqs, "exactly the changes after the stored seq");

    // The stored position is gone from the log (trimmed past it): the hub says so, synchub-since
    // reports it, and the channel continues live.
    sb.close("a2").await;
    let stored = stored_position(&mut sb, "store-a").await;
    assert_eq!(stored["seq"], json!(more_seqs[19]));
    let batch: Vec<_> = (0..5).map(|_| Uuid::now_v7()).map(|id| dev.upsert("products", json!({"id": id}), product_fields(id, "Trimmed", 8), 0)).collect();
    dev.push(batch).await;
    let head = head_seq(&hub, TENANT).await;
    sqlx::query("select synchub.trim_log($1, $2)").bind(TENANT).bind(head as i64).execute(&hub.db).await.unwrap();
    await_floor(&hub, TENANT, &epoch, more_seqs[19]).await;
    sb.create_with_since("a3", &url, &user_token(TENANT, "ann"), vsn, "store-a").await;
    let listen = [changes(binding("*", "products", json!({}))), system()];
    let joined = sb.subscribe_since("a3", "feed", json!({}), &listen).await;
    assert_eq!(joined["restored"]["seq"], json!(more_seqs[19]));
    let systems = until_events(&mut sb, "a3", "feed", WAIT, "a PositionTooOld system error", |events| {
        events.iter().any(|e| e["kind"] == "system" && e["payload"]["status"] == "error")
    })
    .await;
    let error = systems.iter().find(|e| e["kind"] == "system" && e["payload"]["status"] == "error").unwrap();
    assert_eq!(error["payload"]["extension"], "postgres_changes", "{error}");
    assert!(error["payload"]["message"].as_str().unwrap_or_default().starts_with("PositionTooOld"), "{error}");
    let id = Uuid::now_v7();
    let change = dev.upsert("products", json!({"id": id}), product_fields(id, "Live", 9), 0);
    let live_seq = dev.push(vec![change]).await[0];
    let got = sb.await_events("a3", "feed", "postgres_changes", 1).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(sb.events_of("a3", "feed", "postgres_changes").await.len(), 1, "nothing of the trimmed log");
    assert_eq!(got[0]["seq"], json!(live_seq), "continues live");
    let report = sb.since_position("a3", "feed").await;
    let lost = report["lost"].as_array().unwrap();
    assert_eq!(lost.len(), 1, "onPositionLost called once: {report}");
    assert_eq!(lost[0]["topic"], "realtime:feed");
    assert!(lost[0]["system"]["message"].as_str().unwrap_or_default().starts_with("PositionTooOld"), "{report}");
    assert_eq!(report["position"]["seq"], json!(live_seq), "the position moves on with live changes");
    sb.assert_no_client_errors().await;
    sb.exit().await;
    hub.shutdown().await;
}

async fn snapshot_then_live_without_a_gap_under_concurrent_writes(vsn: &str) {
    let hub = start_hub().await;
    let url = project_url(&hub);
    // 60 products to start with.
    let mut seeder = Dev::connect(&hub, TENANT, "pos-seed").await;
    let seeds: Vec<Uuid> = (0..60).map(|_| Uuid::now_v7()).collect();
    let mut versions: BTreeMap<Uuid, u64> = BTreeMap::new();
    for chunk in seeds.chunks(20) {
        let batch: Vec<_> = chunk.iter().map(|id| seeder.upsert("products", json!({"id": id}), product_fields(*id, "Seed", 10), 0)).collect();
        for (id, seq) in chunk.iter().zip(seeder.push(batch).await) {
            versions.insert(*id, seq);
        }
    }
    drop(seeder);
    let seeded_head = head_seq(&hub, TENANT).await;
    let mut sb = SbDriver::start().await;
    // With synchub-since: after the snapshot, a rejoin asks for the changes since, not a new
    // snapshot (see the end).
    sb.create_with_since("a", &url, &user_token(TENANT, "ann"), vsn, "snap").await;

    // A writer pushes while the client joins: inserts, updates and deletes of seeds, in small
    // batches.
    let mut writer = Dev::connect(&hub, TENANT, "pos-writer").await;
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let writing = tokio::spawn(async move {
        let mut started = Some(started_tx);
        let mut made = 0;
        for round in 0..30usize {
            let mut batch = Vec::new();
            let fresh = Uuid::now_v7();
            batch.push(writer.upsert("products", json!({"id": fresh}), product_fields(fresh, "Fresh", round as i64), 0));
            let seed = seeds[round];
            batch.push(writer.upsert("products", json!({"id": seed}), json!({"price_cents": 1000 + round}), versions[&seed]));
            let gone = seeds[59 - round];
            if round % 2 == 0 {
                batch.push(writer.delete("products", json!({"id": gone}), versions[&gone]));
            } else {
                batch.push(writer.upsert("products", json!({"id": gone}), json!({"name": format!("Renamed {round}")}), versions[&gone]));
            }
            made += batch.len();
            for r in writer.c.push(batch).await {
                assert_eq!(r.status, ChangeStatus::Applied, "{r:?}");
            }
            if round == 3 {
                if let Some(tx) = started.take() {
                    let _ = tx.send(());
                }
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        made
    });
    started_rx.await.unwrap();
    let listen = [changes(binding("*", "products", json!({"snapshot": true}))), system()];
    sb.subscribe_since("a", "snap", json!({}), &listen).await;
    let made = writing.await.unwrap();
    assert_eq!(made, 90);
    let head = head_seq(&hub, TENANT).await;
    let events = until_events(&mut sb, "a", "snap", Duration::from_secs(30), "every change up to the head", |events| {
        events.iter().any(|e| e["kind"] == "postgres_changes" && e["seq"] == json!(head))
    })
    .await;
    tokio::time::sleep(QUIET).await;
    let events = {
        let later = sb.events("a", "snap").await;
        assert_eq!(later.len(), events.len(), "nothing after the head");
        later
    };

    // Snapshot rows first (INSERTs marked snapshot, all at the snapshot's seq), then `Snapshot
    // complete`, then the live changes after it.
    let changes_only: Vec<&Value> = events.iter().filter(|e| e["kind"] == "postgres_changes").collect();
    let snapshot: Vec<&Value> = changes_only.iter().copied().take_while(|e| e["snapshot"] == json!(true)).collect();
    assert!(!snapshot.is_empty(), "a snapshot: {events:#?}");
    let snapshot_seq = snapshot[0]["seq"].as_u64().unwrap();
    assert!(snapshot.iter().all(|e| e["seq"] == json!(snapshot_seq) && e["payload"]["eventType"] == "INSERT"), "{snapshot:#?}");
    let live: Vec<&Value> = changes_only[snapshot.len()..].to_vec();
    assert!(live.iter().all(|e| e["snapshot"] == json!(false)), "snapshot rows come first");
    assert!(
        snapshot_seq > seeded_head && live.len() >= 10,
        "the join met the writer: snapshot at {snapshot_seq} (seeds up to {seeded_head}), {} changes after it",
        live.len()
    );
    let live_seqs: Vec<u64> = live.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    let want: Vec<u64> = (snapshot_seq + 1..=head).collect();
    assert_eq!(live_seqs, want, "every seq after the snapshot's once, in order (all writes are products)");

    // Snapshot + changes = the table.
    let mut state: BTreeMap<String, Value> = BTreeMap::new();
    for e in &snapshot {
        let row = &e["payload"]["new"];
        assert!(state.insert(row["id"].as_str().unwrap().to_owned(), row.clone()).is_none(), "a row twice in the snapshot");
    }
    for e in &live {
        let p = &e["payload"];
        match p["eventType"].as_str() {
            Some("INSERT") | Some("UPDATE") => {
                state.insert(p["new"]["id"].as_str().unwrap().to_owned(), p["new"].clone());
            }
            Some("DELETE") => {
                assert!(state.remove(p["old"]["id"].as_str().unwrap()).is_some(), "a delete of a row the client has: {e}");
            }
            other => panic!("event type {other:?}"),
        }
    }
    let rows: Vec<Value> =
        sqlx::query_scalar("select to_jsonb(p) from products p where tenant_id = $1 order by id").bind(TENANT).fetch_all(&hub.db).await.unwrap();
    assert_eq!(state.len(), rows.len(), "as many rows as the table");
    for row in &rows {
        let id = row["id"].as_str().unwrap();
        let got = state.get(id).unwrap_or_else(|| panic!("row {id} missing on the client"));
        assert_same_row(got, row, &format!("row {id}"));
    }

    // On the wire: the rows, then `Snapshot complete` at the snapshot's seq, then the changes.
    let frames: Vec<Value> = sb.wire("a", Some("realtime:snap")).await.into_iter().filter(|f| f["dir"] == "in" && f["event"] != "phx_reply").collect();
    let complete = frames
        .iter()
        .position(|f| f["event"] == "system" && f["payload"]["message"] == "Snapshot complete")
        .unwrap_or_else(|| panic!("Snapshot complete on the wire: {frames:#?}"));
    assert_eq!((frames[complete]["payload"]["status"].clone(), frames[complete]["payload"]["seq"].clone()), (json!("ok"), json!(snapshot_seq)));
    let snapshot_frames = frames.iter().filter(|f| f["payload"]["data"]["snapshot"] == json!(true)).count();
    assert_eq!(snapshot_frames, snapshot.len());
    assert!(
        frames[..complete].iter().filter(|f| f["event"] == "postgres_changes").all(|f| f["payload"]["data"]["snapshot"] == json!(true)),
        "only snapshot rows before it"
    );
    assert!(frames[complete..].iter().all(|f| f["payload"]["data"]["snapshot"] != json!(true)), "no snapshot row after it");
    // And supabase-js hands it to the `system` listener like any system message.
    let systems: Vec<Value> = events.iter().filter(|e| e["kind"] == "system").map(|e| e["payload"].clone()).collect();
    assert!(
        systems.iter().any(|s| s["message"] == "Snapshot complete" && s["status"] == "ok" && s["extension"] == "postgres_changes"),
        "the client's system listener gets Snapshot complete: {systems:#?}"
    );

    // The connection drops; 10 changes; supabase-js rejoins with since_seq (synchub-since),
    // without `snapshot`: exactly the 10 changes come, no snapshot again.
    let before = sb.statuses("a", "snap").await.len();
    sb.offline("a").await;
    let mut late = Dev::connect(&hub, TENANT, "pos-late").await;
    let batch: Vec<_> = (0..10).map(|_| Uuid::now_v7()).map(|id| late.upsert("products", json!({"id": id}), product_fields(id, "Late", 3), 0)).collect();
    let late_seqs = late.push(batch).await;
    sb.online("a").await;
    sb.await_status("a", "snap", "SUBSCRIBED", before, REJOIN).await;
    let all = sb.await_events_for("a", "snap", "postgres_changes", changes_only.len() + 10, REJOIN).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(sb.events_of("a", "snap", "postgres_changes").await.len(), changes_only.len() + 10, "nothing twice");
    let after: Vec<(u64, bool)> = all[changes_only.len()..].iter().map(|e| (e["seq"].as_u64().unwrap(), e["snapshot"] == json!(true))).collect();
    assert_eq!(after, late_seqs.iter().map(|s| (*s, false)).collect::<Vec<_>>());
    let joins: Vec<Value> = sb.wire("a", Some("realtime:snap")).await.into_iter().filter(|f| f["dir"] == "out" && f["event"] == "phx_join").collect();
    assert_eq!(joins.len(), 2, "{joins:#?}");
    let rejoin = &joins[1]["payload"]["config"]["postgres_changes"][0];
    assert_eq!(rejoin["since_seq"], json!(head), "{rejoin}");
    assert_eq!(rejoin.get("snapshot"), None, "{rejoin}");
    sb.assert_no_client_errors().await;
    sb.exit().await;
    hub.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Two nodes
// ---------------------------------------------------------------------------------------------

/// supabase-js clients on two hubs of one cluster (one database, a nats-server of the test's
/// own): presence tracked on one node shows on the other, and leaves it with the channel; a
/// broadcast sent on one node reaches the other's subscriber; a device's push to one node is a
/// postgres_changes event on the other.
#[actix_web::test]
async fn presence_broadcasts_and_changes_cross_two_nodes() {
    let nats = common::nats::NatsServer::start(&std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("sb-cluster-{}", Uuid::new_v4().simple())));
    let url = fresh_database().await;
    let node = |name: &'static str| {
        let nats = nats.url();
        move |c: &mut synchub::config::Config| {
            c.nats_url = Some(nats);
            c.node_id = Some(name.into());
        }
    };
    let one = TestHub::start_on(url.clone(), node("sb-node-1")).await;
    let two = TestHub::start_on(url, node("sb-node-2")).await;
    let mut sb = SbDriver::start().await;
    sb.create("a", &project_url(&one), &user_token(TENANT, "ann"), "2.0.0").await;
    sb.create("b", &project_url(&two), &user_token(TENANT, "bob"), "2.0.0").await;
    let listen = [presence("sync"), presence("join"), presence("leave"), broadcast("*"), changes(binding("*", "products", json!({})))];
    sb.subscribe("a", "lobby", json!({"presence": {"key": "ann"}}), &listen).await;
    sb.subscribe("b", "lobby", json!({"presence": {"key": "bob"}}), &listen).await;

    assert_eq!(sb.track("a", "lobby", json!({"till": 1})).await, "ok");
    until_events(&mut sb, "b", "lobby", WAIT, "bob on node 2 sees ann of node 1", |events| {
        events.iter().any(|e| e["event"] == "join" && e["payload"]["key"] == "ann")
    })
    .await;
    assert_eq!(presence_metas(&sb.presence_state("b", "lobby").await), BTreeMap::from([("ann".to_owned(), vec![json!({"till": 1})])]));

    assert_eq!(sb.send("b", "lobby", "greet", json!({"from": "node 2"})).await, "ok");
    sb.await_binding("a", "lobby", 3, 1).await;
    assert_eq!(broadcasts(&sb.events("a", "lobby").await), vec![(3, "greet".into(), json!({"from": "node 2"}))]);

    let mut dev = Dev::connect(&one, TENANT, "pos-1").await;
    let id = Uuid::now_v7();
    let change = dev.upsert("products", json!({"id": id}), product_fields(id, "Tea", 100), 0);
    dev.push(vec![change]).await;
    let events = sb.await_binding("b", "lobby", 4, 1).await;
    assert_eq!(summary(&events), vec![ev("INSERT", id, Some(100), None)]);

    assert_eq!(sb.remove_channel("a", "lobby").await, "ok");
    until_events(&mut sb, "b", "lobby", WAIT, "ann leaves bob's presence", |events| {
        events.iter().any(|e| e["event"] == "leave" && e["payload"]["key"] == "ann")
    })
    .await;
    assert_eq!(presence_metas(&sb.presence_state("b", "lobby").await), BTreeMap::new());
    sb.exit().await;
    one.shutdown().await;
    two.shutdown().await;
}
