//! RxDB replication (`GET /rxdb/v1`) end to end with real RxDB 17.6 clients: memory storage
//! wrapped in ajv validation, dev-mode on, `replicateWithWebsocketServer` with the device JWT in
//! the `auth` headers. The clients live in one Node process per test (tests/rxdb/driver.mjs,
//! driven through tests/rxdb/clients.rs), so the test can interleave hub actions (a restart on
//! the same port, SQL writes, native device pushes, conflict review over HTTP, log trimming)
//! with client actions.
//!
//! The test installs what it needs when it is missing: node and npm with apt-get, and rxdb and
//! rxjs (pinned in tests/rxdb/package-lock.json) with `npm ci`. It fails, never skips, when it
//! cannot.

mod common;
#[path = "rxdb/clients.rs"]
mod clients;

use std::time::Duration;

use clients::RxDriver;
use common::*;
use protocol::{ChangeStatus, Encoding};
use serde_json::{json, Value};
use synchub::config::{Config, MergePolicy, RxdbCollectionConfig, RxdbConflicts, RxdbNulls, TableConfig};

const TENANT: &str = "rx-store";
const OTHER_TENANT: &str = "rx-other-store";
/// Convergence of a few dozen documents (an RxDB reconnect alone waits 1 to 3 s).
const CONVERGE: Duration = Duration::from_secs(20);
/// Convergence after a burst of hundreds of changes, or after a hub restart.
const CONVERGE_LONG: Duration = Duration::from_secs(45);

/// The test table: text key, and a column of each kind whose value must come back as written.
const ITEMS_SQL: &str = "create table public.items (
    tenant_id text not null,
    id        text not null,
    price     numeric(10,2) not null,
    at        timestamptz not null,
    done      boolean not null,
    note      text,
    meta      jsonb not null default '{}',
    qty       integer not null,
    primary key (tenant_id, id)
)";

/// `items` synced next to the demo tables. No `config.rxdb` section: a collection named like
/// its table needs none.
fn register_items(config: &mut Config) {
    config.tables.push(TableConfig { name: "items".into(), tenant_column: "tenant_id".into(), policy: MergePolicy::Lww, ..Default::default() });
    // The clients' schema says `note: ['string', 'null']`: nulls come back as null.
    config.rxdb_collections.push(RxdbCollectionConfig {
        name: "items".into(),
        table: None,
        fields: None,
        conflicts: RxdbConflicts::Report,
        nulls: RxdbNulls::Keep,
    });
}

async fn items_hub() -> TestHub {
    items_hub_with(|_| {}).await
}

/// A hub with `items`, configured further by `adjust`.
async fn items_hub_with(adjust: impl FnOnce(&mut Config)) -> TestHub {
    let url = fresh_database().await;
    let db = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::raw_sql(ITEMS_SQL).execute(&db).await.unwrap();
    db.close().await;
    TestHub::start_on(url, |config| {
        register_items(config);
        adjust(config);
    })
    .await
}

fn rxdb_url(hub: &TestHub) -> String {
    format!("ws://{}/rxdb/v1", hub.addr)
}

/// A device token for an RxDB client (each client is a device of its own).
fn device_token(tenant: &str, device: &str) -> String {
    token(tenant, &format!("user-{device}"), "Employee", Some(device))
}

fn manager_token(tenant: &str) -> String {
    token(tenant, "manager-mia", "Manager", None)
}

/// An `items` document with every field.
fn item(id: &str, qty: i64) -> Value {
    json!({"id": id, "price": 10.5, "at": "2025-01-02T03:04:05.678Z", "done": false, "note": null, "meta": {"n": qty}, "qty": qty})
}

fn ids(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i:03}")).collect()
}

fn strs(ids: &[String]) -> Vec<&str> {
    ids.iter().map(String::as_str).collect()
}

/// Whether Postgres holds exactly `docs` as the tenant's rows of `table`, compared by value in
/// the column types (Postgres reads the documents with `jsonb_populate_recordset`, so 12.5 and
/// 12.50 or two spellings of one instant are the same). Panics with both sides' differences.
async fn assert_table_holds(hub: &TestHub, table: &str, tenant: &str, docs: &[Value]) {
    let with_tenant: Vec<Value> = docs
        .iter()
        .map(|d| {
            let mut d = d.clone();
            d["tenant_id"] = json!(tenant);
            d
        })
        .collect();
    let sql = format!(
        "with client as (select * from jsonb_populate_recordset(null::public.{table}, $1::jsonb)),
              stored as (select * from public.{table} where tenant_id = $2)
         select (select coalesce(jsonb_agg(to_jsonb(x)), '[]') from (select * from client except all select * from stored) x),
                (select coalesce(jsonb_agg(to_jsonb(x)), '[]') from (select * from stored except all select * from client) x)"
    );
    let (only_clients, only_table): (Value, Value) =
        sqlx::query_as(&sql).bind(Value::Array(with_tenant)).bind(tenant).fetch_one(&hub.db).await.unwrap();
    assert!(
        only_clients == json!([]) && only_table == json!([]),
        "{table} of {tenant} differs from the clients' documents\nonly in the clients: {only_clients:#}\nonly in the table: {only_table:#}"
    );
}

async fn row_count(hub: &TestHub, table: &str, tenant: &str) -> i64 {
    sqlx::query_scalar(&format!("select count(*) from public.{table} where tenant_id = $1")).bind(tenant).fetch_one(&hub.db).await.unwrap()
}

/// `GET /v1/conflicts?status=open&table=items` as the tenant's manager.
async fn open_conflicts(hub: &TestHub, tenant: &str) -> Vec<Value> {
    let response = reqwest::Client::new()
        .get(format!("http://{}/v1/conflicts?status=open&table=items", hub.addr))
        .bearer_auth(manager_token(tenant))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "GET /v1/conflicts");
    let body: Value = response.json().await.unwrap();
    body["conflicts"].as_array().expect("a conflicts list").clone()
}

/// JSON equality, numbers compared by value (12.5 and 12.50 are one numeric value).
fn same_value(left: &Value, right: &Value) -> bool {
    match (left.as_f64(), right.as_f64()) {
        (Some(l), Some(r)) => l == r,
        _ => left == right,
    }
}

fn number(value: &Value) -> f64 {
    value.as_f64().unwrap_or_else(|| panic!("a number, not {value}"))
}

#[actix_web::test]
async fn offline_writes_before_the_first_connection_are_pushed_on_connect() {
    let hub = items_hub().await;
    let mut rx = RxDriver::start().await;
    rx.create("a", "items").await;
    // Written before the client ever reached the hub: an insert, an updated insert, and a
    // document removed before it was pushed.
    rx.insert("a", &[item("o1", 1), item("o2", 2), item("o3", 3)]).await;
    rx.patch("a", &["o2"], json!({"qty": 20, "note": "edited offline"})).await;
    rx.remove("a", &["o3"]).await;
    assert_eq!(row_count(&hub, "items", TENANT).await, 0, "nothing reached the hub yet");

    rx.replicate("a", &rxdb_url(&hub), &device_token(TENANT, "rx-a"), None).await;
    rx.await_in_sync("a").await;
    let docs = rx.dump("a").await;
    assert_eq!(docs, vec![item("o1", 1), json!({"id": "o2", "price": 10.5, "at": "2025-01-02T03:04:05.678Z", "done": false, "note": "edited offline", "meta": {"n": 2}, "qty": 20})]);
    assert_table_holds(&hub, "items", TENANT, &docs).await;

    // A second client pulls exactly those (the removed document is not a row).
    rx.connected("b", "items", &rxdb_url(&hub), &device_token(TENANT, "rx-b")).await;
    rx.await_equal(&["a", "b"], 2, CONVERGE).await;
    for client in ["a", "b"] {
        rx.assert_no_errors(client, &[]).await;
    }
    rx.exit().await;
    hub.shutdown().await;
}

#[actix_web::test]
async fn a_second_client_pulls_everything_in_pages_of_four() {
    let hub = items_hub().await;
    let mut rx = RxDriver::start().await;
    rx.connected("a", "items", &rxdb_url(&hub), &device_token(TENANT, "rx-a")).await;
    let docs: Vec<Value> = ids("p", 0..23).iter().enumerate().map(|(i, id)| item(id, i as i64)).collect();
    rx.insert("a", &docs).await;
    rx.await_in_sync("a").await;
    assert_eq!(row_count(&hub, "items", TENANT).await, 23);

    rx.create("b", "items").await;
    rx.replicate("b", &rxdb_url(&hub), &device_token(TENANT, "rx-b"), Some(4)).await;
    let pulled = rx.await_equal(&["a", "b"], 23, CONVERGE).await;
    assert_eq!(pulled, docs);

    // The pull really paged: requests of 4, answers of at most 4, and as many as 23 needs.
    let frames = rx.wire("b").await;
    let pulls: Vec<&Value> = frames.iter().filter(|f| f["method"] == json!("masterChangesSince")).collect();
    assert!(pulls.iter().all(|p| p["batchSize"] == json!(4)), "every pull asks for 4: {pulls:?}");
    let pages: Vec<u64> = frames
        .iter()
        .filter(|f| f["dir"] == json!("in") && f["id"] != json!("stream") && f["documents"].is_u64())
        .map(|f| f["documents"].as_u64().unwrap())
        .collect();
    assert!(pages.iter().all(|&n| n <= 4), "no page holds more than asked: {pages:?}");
    assert!(pages.iter().sum::<u64>() >= 23 && pages.len() >= 6, "23 documents take at least 6 pages of 4: {pages:?}");
    assert_table_holds(&hub, "items", TENANT, &pulled).await;
    for client in ["a", "b"] {
        rx.assert_no_errors(client, &[]).await;
    }
    rx.exit().await;
    hub.shutdown().await;
}

#[actix_web::test]
async fn live_inserts_updates_and_deletes_reach_the_other_client() {
    let hub = items_hub().await;
    let mut rx = RxDriver::start().await;
    rx.connected("a", "items", &rxdb_url(&hub), &device_token(TENANT, "rx-a")).await;
    rx.connected("b", "items", &rxdb_url(&hub), &device_token(TENANT, "rx-b")).await;

    rx.insert("a", &[item("l1", 1)]).await;
    rx.await_doc("b", "l1", item("l1", 1)).await;
    rx.patch("a", &["l1"], json!({"qty": 2, "note": "second", "done": true})).await;
    rx.await_doc("b", "l1", json!({"qty": 2, "note": "second", "done": true})).await;
    rx.remove("a", &["l1"]).await;
    rx.await_gone("b", "l1").await;
    assert_eq!(row_count(&hub, "items", TENANT).await, 0, "the removal deleted the row");

    // And the other way round.
    rx.insert("b", &[item("l2", 5)]).await;
    rx.await_doc("a", "l2", item("l2", 5)).await;
    let docs = rx.await_equal(&["a", "b"], 1, CONVERGE).await;
    assert_table_holds(&hub, "items", TENANT, &docs).await;
    for client in ["a", "b"] {
        rx.assert_no_errors(client, &[]).await;
        assert_eq!(rx.conflicts(client).await, Vec::<Value>::new());
    }
    rx.exit().await;
    hub.shutdown().await;
}

#[actix_web::test]
async fn values_come_back_as_written_and_a_later_push_does_not_conflict() {
    let hub = items_hub().await;
    let mut rx = RxDriver::start().await;
    rx.connected("a", "items", &rxdb_url(&hub), &device_token(TENANT, "rx-a")).await;
    rx.connected("b", "items", &rxdb_url(&hub), &device_token(TENANT, "rx-b")).await;

    let now = rx.now_iso().await;
    let written = vec![
        // numeric(10,2) holds 1234.50, timestamptz holds microseconds and no zone spelling,
        // jsonb orders keys its own way: each must come back as the client wrote it.
        json!({"id": "v1", "price": 1234.5, "at": now, "done": true, "note": null,
               "meta": {"zeta": 1, "alpha": [1, "two", {"deep": null}], "text": "é ✓", "float": 0.25}, "qty": -7}),
        json!({"id": "v2", "price": 3, "at": "2024-02-29T23:59:59.999Z", "done": false, "note": "", "meta": {}, "qty": 0}),
    ];
    rx.insert("a", &written).await;
    let pulled = rx.await_equal(&["a", "b"], 2, CONVERGE).await;
    assert_eq!(pulled, written, "the second client holds the values exactly as written");
    assert_table_holds(&hub, "items", TENANT, &written).await;

    // A later edit pushes the document A last saw as the assumed master state: the hub must
    // find it equal to what it holds, so nothing conflicts.
    rx.patch("a", &["v1"], json!({"qty": 8, "note": "later"})).await;
    rx.patch("a", &["v2"], json!({"done": true})).await;
    rx.await_in_sync("a").await;
    rx.await_doc("b", "v1", json!({"qty": 8, "note": "later", "at": now, "price": 1234.5})).await;
    rx.await_doc("b", "v2", json!({"done": true})).await;
    let wire = rx.wire("a").await;
    let write_answers: Vec<&Value> = wire.iter().filter(|f| f["dir"] == json!("in") && f["conflicts"].is_u64()).collect();
    assert!(write_answers.len() >= 2 && write_answers.iter().all(|f| f["conflicts"] == json!(0)), "no masterWrite answered a conflict: {write_answers:?}");
    for client in ["a", "b"] {
        assert_eq!(rx.conflicts(client).await, Vec::<Value>::new(), "client {client} saw no conflict");
        rx.assert_no_errors(client, &[]).await;
    }
    assert_eq!(open_conflicts(&hub, TENANT).await, Vec::<Value>::new(), "nothing in the conflict log");
    let docs = rx.await_equal(&["a", "b"], 2, CONVERGE).await;
    assert_table_holds(&hub, "items", TENANT, &docs).await;
    rx.exit().await;
    hub.shutdown().await;
}

/// Clients `a` and `b` both edit `c1`'s price while paused: `a` (11.25) reaches the hub first,
/// then `b` (12.75) conflicts. Returns the open conflict from the hub's log.
async fn offline_conflict(hub: &TestHub, rx: &mut RxDriver) -> Value {
    rx.connected("a", "items", &rxdb_url(hub), &device_token(TENANT, "rx-a")).await;
    rx.connected("b", "items", &rxdb_url(hub), &device_token(TENANT, "rx-b")).await;
    rx.insert("a", &[json!({"id": "c1", "price": 10, "at": "2025-01-02T03:04:05.678Z", "done": false, "note": null, "meta": {}, "qty": 1})]).await;
    rx.await_doc("b", "c1", json!({"price": 10})).await;

    rx.pause("a").await;
    rx.pause("b").await;
    rx.patch("a", &["c1"], json!({"price": 11.25})).await;
    rx.patch("b", &["c1"], json!({"price": 12.75})).await;
    rx.resume("a").await;
    rx.await_in_sync("a").await;
    let price: f64 = sqlx::query_scalar("select price::float8 from items where tenant_id = $1 and id = 'c1'").bind(TENANT).fetch_one(&hub.db).await.unwrap();
    assert_eq!(price, 11.25, "the first writer's price is the master's");
    rx.resume("b").await;

    // RxDB's default handler: the master wins on the loser, which reports the conflict.
    let conflicts = rx.await_conflicts("b", 1).await;
    assert_eq!(conflicts.len(), 1, "one conflict$ event: {conflicts:#?}");
    assert_eq!(number(&conflicts[0]["newDocumentState"]["price"]), 12.75);
    assert_eq!(number(&conflicts[0]["realMasterState"]["price"]), 11.25);
    assert_eq!(conflicts[0]["realMasterState"]["_deleted"], json!(false));
    assert_eq!(number(&conflicts[0]["output"]["price"]), 11.25, "the default handler keeps the master");
    let docs = rx.await_equal(&["a", "b"], 1, CONVERGE).await;
    assert_eq!(number(&docs[0]["price"]), 11.25, "both clients hold the master's price");
    assert_eq!(rx.conflicts("a").await, Vec::<Value>::new(), "the winner saw no conflict");

    // The hub logged it for review, open, with both values.
    let open = open_conflicts(hub, TENANT).await;
    assert_eq!(open.len(), 1, "one open conflict (price is the only field that differs): {open:#?}");
    let conflict = open[0].clone();
    assert_eq!(conflict["table"], json!("items"));
    assert_eq!(conflict["key"], json!({"id": "c1"}));
    assert_eq!(conflict["field"], json!("price"));
    assert_eq!(conflict["status"], json!("open"));
    assert_eq!(conflict["winner"], json!("server"));
    assert_eq!(number(&conflict["server"]["value"]), 11.25);
    assert_eq!(number(&conflict["incoming"]["value"]), 12.75);
    assert_eq!(conflict["incoming"]["device"], json!("rxdb:rx-b"), "RxDB clients write as rxdb:<device>");
    conflict
}

#[actix_web::test]
async fn an_offline_conflict_keeps_the_master_and_is_logged_for_review() {
    let hub = items_hub().await;
    let mut rx = RxDriver::start().await;
    offline_conflict(&hub, &mut rx).await;
    let docs = rx.dump("a").await;
    assert_table_holds(&hub, "items", TENANT, &docs).await;
    for client in ["a", "b"] {
        rx.assert_no_errors(client, &[]).await;
    }
    rx.exit().await;
    hub.shutdown().await;
}

#[actix_web::test]
async fn a_conflict_resolved_in_the_console_reaches_both_clients() {
    let hub = items_hub().await;
    let mut rx = RxDriver::start().await;
    let conflict = offline_conflict(&hub, &mut rx).await;

    // The manager takes the loser's value.
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/conflicts/{}/resolve", hub.addr, conflict["id"]))
        .bearer_auth(manager_token(TENANT))
        .json(&json!({"action": "take_other"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "resolve: {}", response.text().await.unwrap_or_default());
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["conflict"]["status"], json!("resolved"));
    assert_eq!(body["result"]["status"], json!("applied"));

    for client in ["a", "b"] {
        rx.await_doc(client, "c1", json!({"price": 12.75})).await;
    }
    let docs = rx.await_equal(&["a", "b"], 1, CONVERGE).await;
    assert_table_holds(&hub, "items", TENANT, &docs).await;
    assert_eq!(open_conflicts(&hub, TENANT).await, Vec::<Value>::new(), "the resolution opened no new conflict");
    assert_eq!(rx.conflicts("a").await.len(), 0, "the resolution reached a as an ordinary change");
    assert_eq!(rx.conflicts("b").await.len(), 1, "b saw only the original conflict");
    for client in ["a", "b"] {
        rx.assert_no_errors(client, &[]).await;
    }
    rx.exit().await;
    hub.shutdown().await;
}

#[actix_web::test]
async fn a_burst_of_500_changes_from_two_clients_converges() {
    let hub = items_hub().await;
    let mut rx = RxDriver::start().await;
    rx.connected("a", "items", &rxdb_url(&hub), &device_token(TENANT, "rx-a")).await;
    rx.connected("b", "items", &rxdb_url(&hub), &device_token(TENANT, "rx-b")).await;
    let started = std::time::Instant::now();

    // 250 inserts each, one write per document, both clients at once.
    let a_ids = ids("a-", 0..250);
    let b_ids = ids("b-", 0..250);
    let a_docs: Vec<Value> = a_ids.iter().enumerate().map(|(i, id)| item(id, i as i64)).collect();
    let b_docs: Vec<Value> = b_ids.iter().enumerate().map(|(i, id)| item(id, i as i64)).collect();
    let a_writes = rx.insert_one_by_one("a", &a_docs).await;
    let b_writes = rx.insert_one_by_one("b", &b_docs).await;
    rx.answer(a_writes).await;
    rx.answer(b_writes).await;
    rx.await_equal(&["a", "b"], 500, CONVERGE_LONG).await;

    // Updates and removals on both sides, a also editing documents b created.
    rx.patch("a", &strs(&a_ids[0..50]), json!({"done": true})).await;
    rx.patch("b", &strs(&b_ids[0..50]), json!({"note": "b"})).await;
    rx.patch("a", &strs(&b_ids[100..150]), json!({"qty": 1000})).await;
    rx.remove("a", &strs(&a_ids[0..20])).await;
    rx.remove("b", &strs(&b_ids[30..50])).await;
    let docs = rx.await_equal(&["a", "b"], 460, CONVERGE_LONG).await;
    eprintln!("500 inserts and 160 edits converged in {:?}", started.elapsed());
    assert_eq!(docs.iter().filter(|d| d["done"] == json!(true)).count(), 30);
    assert_eq!(docs.iter().filter(|d| d["note"] == json!("b")).count(), 30);
    assert_eq!(docs.iter().filter(|d| d["qty"] == json!(1000)).count(), 50);
    assert_table_holds(&hub, "items", TENANT, &docs).await;
    for client in ["a", "b"] {
        assert_eq!(rx.conflicts(client).await, Vec::<Value>::new(), "client {client}: nobody edited the same document");
        rx.assert_no_errors(client, &[]).await;
    }
    rx.exit().await;
    hub.shutdown().await;
}

/// The hub stops while client b has changes to pull (a pushed 40 documents while b was paused)
/// and to push (b's own edits), both clients write while it is down, and so does SQL; it starts
/// again on the same port, the clients reconnect by themselves (their queued requests reach the
/// hub before their `auth`), and everything converges.
///
/// The stop comes while no client request is on the wire: RxDB's client waits forever for the
/// answer to a request its socket lost (no timeout), which no hub can answer once the socket is
/// gone.
#[actix_web::test]
async fn a_hub_restart_in_the_middle_of_replication_loses_nothing() {
    let mut hub = items_hub().await;
    let mut rx = RxDriver::start().await;
    rx.connected("a", "items", &rxdb_url(&hub), &device_token(TENANT, "rx-a")).await;
    rx.connected("b", "items", &rxdb_url(&hub), &device_token(TENANT, "rx-b")).await;
    let first = ids("r", 0..10);
    rx.insert("a", &first.iter().map(|id| item(id, 1)).collect::<Vec<_>>()).await;
    rx.await_equal(&["a", "b"], 10, CONVERGE).await;

    rx.pause("b").await;
    let burst = ids("s", 0..40);
    let writes = rx.insert_one_by_one("a", &burst.iter().map(|id| item(id, 2)).collect::<Vec<_>>()).await;
    rx.answer(writes).await;
    rx.patch("b", &strs(&first[0..5]), json!({"qty": 50})).await;
    rx.await_in_sync("a").await;

    hub.stop().await;
    // While the hub is down: b resumes (its pull and push wait in its socket's queue), both
    // write, and another SQL client writes the table.
    rx.resume("b").await;
    rx.insert("a", &ids("t", 0..5).iter().map(|id| item(id, 3)).collect::<Vec<_>>()).await;
    rx.patch("b", &strs(&first[5..7]), json!({"note": "offline"})).await;
    rx.remove("b", &strs(&first[7..9])).await;
    sqlx::query("update items set qty = 99 where tenant_id = $1 and id = 'r009'").bind(TENANT).execute(&hub.db).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    hub.start_again(register_items).await;

    let docs = rx.await_equal(&["a", "b"], 53, CONVERGE_LONG).await;
    let value = |id: &str| docs.iter().find(|d| d["id"] == json!(id)).unwrap_or_else(|| panic!("{id} is missing")).clone();
    assert_eq!(value("r000")["qty"], json!(50));
    assert_eq!(value("r005")["note"], json!("offline"));
    assert_eq!(value("r009")["qty"], json!(99), "the SQL write made while the hub was down");
    assert!(docs.iter().all(|d| d["id"] != json!("r007") && d["id"] != json!("r008")));
    assert_table_holds(&hub, "items", TENANT, &docs).await;
    // a's writes made while the hub was down went out on the new socket before its auth.
    let frames = rx.wire("a").await;
    let reopened = frames.iter().rposition(|f| f["dir"] == json!("closed")).expect("the stop closed a's socket") + 1;
    let after: Vec<&Value> = frames[reopened..].iter().filter(|f| f["dir"] == json!("out")).collect();
    assert_eq!(after.first().map(|f| &f["method"]), Some(&json!("masterWrite")), "the queued write goes first: {after:?}");
    assert!(after.iter().any(|f| f["method"] == json!("auth")), "then auth: {after:?}");
    for client in ["a", "b"] {
        // RC_STREAM: the socket's errors while the hub was down.
        rx.assert_no_errors(client, &["RC_STREAM"]).await;
        assert_eq!(rx.conflicts(client).await, Vec::<Value>::new());
    }
    rx.exit().await;
    hub.shutdown().await;
}

#[actix_web::test]
async fn a_checkpoint_older_than_the_trimmed_log_converges_with_deletes() {
    let hub = items_hub().await;
    let mut rx = RxDriver::start().await;
    rx.connected("a", "items", &rxdb_url(&hub), &device_token(TENANT, "rx-a")).await;
    rx.connected("b", "items", &rxdb_url(&hub), &device_token(TENANT, "rx-b")).await;
    let k = ids("k", 0..12);
    rx.insert("a", &k.iter().map(|id| item(id, 1)).collect::<Vec<_>>()).await;
    rx.await_equal(&["a", "b"], 12, CONVERGE).await;

    // b stops pulling at its checkpoint; meanwhile a and SQL delete, update and insert.
    rx.pause("b").await;
    rx.remove("a", &strs(&k[0..3])).await;
    rx.patch("a", &strs(&k[3..6]), json!({"qty": 9})).await;
    rx.insert("a", &ids("n", 0..3).iter().map(|id| item(id, 4)).collect::<Vec<_>>()).await;
    rx.await_in_sync("a").await;
    sqlx::query("delete from items where tenant_id = $1 and id = 'k011'").bind(TENANT).execute(&hub.db).await.unwrap();
    sqlx::query("update items set note = 'sql' where tenant_id = $1 and id = 'k010'").bind(TENANT).execute(&hub.db).await.unwrap();
    rx.await_gone("a", "k011").await;
    rx.await_doc("a", "k010", json!({"note": "sql"})).await;

    // The whole log goes: b's checkpoint is now below the floor.
    let head: i64 = sqlx::query_scalar("select head_seq from synchub.tenants where tenant_id = $1").bind(TENANT).fetch_one(&hub.db).await.unwrap();
    sqlx::query("select synchub.trim_log($1, $2)").bind(TENANT).bind(head).execute(&hub.db).await.unwrap();
    let left: i64 = sqlx::query_scalar("select count(*) from synchub.change_log where tenant_id = $1").bind(TENANT).fetch_one(&hub.db).await.unwrap();
    assert_eq!(left, 0, "the log is trimmed up to the head");

    rx.resume("b").await;
    let docs = rx.await_equal(&["a", "b"], 11, CONVERGE).await;
    for gone in ["k000", "k001", "k002", "k011"] {
        assert!(docs.iter().all(|d| d["id"] != json!(gone)), "{gone} was deleted while b was away");
    }
    // A client starting from nothing after the trim gets the same, in pages.
    rx.create("c", "items").await;
    rx.replicate("c", &rxdb_url(&hub), &device_token(TENANT, "rx-c"), Some(5)).await;
    rx.await_equal(&["a", "b", "c"], 11, CONVERGE).await;
    assert_table_holds(&hub, "items", TENANT, &docs).await;
    for client in ["a", "b", "c"] {
        rx.assert_no_errors(client, &[]).await;
        assert_eq!(rx.conflicts(client).await, Vec::<Value>::new());
    }
    rx.exit().await;
    hub.shutdown().await;
}

/// The version (seq of the latest change) of each `items` row in a device's catch-up.
fn versions(deltas: &[protocol::Delta]) -> std::collections::HashMap<String, u64> {
    let mut versions = std::collections::HashMap::new();
    for delta in deltas.iter().filter(|d| d.table == "items") {
        let id = delta.key["id"].as_str().unwrap().to_owned();
        let seen = versions.entry(id).or_insert(0);
        *seen = (*seen).max(delta.seq);
    }
    versions
}

#[actix_web::test]
async fn rxdb_clients_a_native_device_and_a_sql_writer_converge_on_the_same_rows() {
    let hub = items_hub().await;
    let mut rx = RxDriver::start().await;
    rx.connected("a", "items", &rxdb_url(&hub), &device_token(TENANT, "rx-a")).await;
    rx.connected("b", "items", &rxdb_url(&hub), &device_token(TENANT, "rx-b")).await;
    let m = ids("m", 1..6);
    rx.insert("a", &m.iter().map(|id| item(id, 1)).collect::<Vec<_>>()).await;
    rx.await_equal(&["a", "b"], 5, CONVERGE).await;

    // A native device sees the RxDB documents as rows, edits one and adds one.
    let mut device = Client::connect(hub.addr, Encoding::Json).await;
    device.hello(&device_token(TENANT, "pos-1"), Some("pos-1"), None).await;
    let (deltas, _) = device.until_up_to_date().await;
    let seen = versions(&deltas);
    assert_eq!(seen.len(), 5, "the device caught up on the five documents: {deltas:?}");
    let now = now_ms();
    let results = device
        .push(vec![
            upsert("items", json!({"id": "m001"}), json!({"qty": 41}), 1, now, seen["m001"]),
            upsert("items", json!({"id": "m006"}), json!({"price": 6.5, "at": "2025-06-01T12:00:00.000Z", "done": true, "note": "device", "meta": {"from": "pos"}, "qty": 6}), 2, now, 0),
        ])
        .await;
    assert!(results.iter().all(|r| r.status == ChangeStatus::Applied), "the device's changes apply: {results:?}");

    // Another SQL client edits the same row (another field) and others.
    sqlx::raw_sql(&format!(
        "update items set note = 'from sql' where tenant_id = '{TENANT}' and id = 'm001';
         update items set price = 7.25 where tenant_id = '{TENANT}' and id = 'm002';
         insert into items (tenant_id, id, price, at, done, note, meta, qty)
             values ('{TENANT}', 'm007', 1.99, '2025-06-01 14:00:00+02', false, null, '{{\"from\": \"sql\"}}', 7);"
    ))
    .execute(&hub.db)
    .await
    .unwrap();

    // The RxDB clients edit after seeing those, so they push the master they saw.
    rx.await_doc("a", "m001", json!({"qty": 41, "note": "from sql"})).await;
    rx.await_doc("b", "m002", json!({"price": 7.25})).await;
    rx.patch("a", &["m001"], json!({"price": 99.99})).await;
    rx.patch("a", &["m003"], json!({"done": true})).await;
    rx.patch("b", &["m004"], json!({"qty": 44})).await;
    rx.patch("b", &["m002"], json!({"note": "b after sql"})).await;
    let docs = rx.await_equal(&["a", "b"], 7, CONVERGE).await;
    let doc = |id: &str| docs.iter().find(|d| d["id"] == json!(id)).unwrap_or_else(|| panic!("{id} is missing")).clone();
    assert_eq!(doc("m001")["qty"], json!(41));
    assert_eq!(doc("m001")["note"], json!("from sql"));
    assert_eq!(number(&doc("m001")["price"]), 99.99);
    assert_eq!(doc("m006")["meta"], json!({"from": "pos"}));
    assert_eq!(doc("m007")["meta"], json!({"from": "sql"}));
    assert_eq!(doc("m002")["note"], json!("b after sql"));
    assert_table_holds(&hub, "items", TENANT, &docs).await;

    // The device receives the RxDB clients' edits as ordinary deltas.
    let mut waiting = vec![("m001", "price", json!(99.99)), ("m003", "done", json!(true)), ("m004", "qty", json!(44)), ("m002", "note", json!("b after sql"))];
    let deadline = tokio::time::Instant::now() + CONVERGE;
    while !waiting.is_empty() {
        let (deltas, _) = tokio::time::timeout_at(deadline, device.next_deltas())
            .await
            .unwrap_or_else(|_| panic!("the device did not receive the RxDB edits {waiting:?}"));
        for delta in deltas {
            let (Some(id), Some(row)) = (delta.key.get("id").and_then(Value::as_str), delta.row.as_ref()) else { continue };
            waiting.retain(|(want, field, value)| !(id == *want && row.get(*field).is_some_and(|v| same_value(v, value))));
        }
    }
    for client in ["a", "b"] {
        assert_eq!(rx.conflicts(client).await, Vec::<Value>::new());
        rx.assert_no_errors(client, &[]).await;
    }
    assert_eq!(open_conflicts(&hub, TENANT).await, Vec::<Value>::new());
    rx.exit().await;
    hub.shutdown().await;
}

fn product(id: &str, name: &str, price_cents: i64) -> Value {
    json!({"id": id, "sku": format!("SKU-{}", &id[..8]), "name": name, "price_cents": price_cents, "stock": 3,
           "active": true, "updated_at": "2025-03-04T05:06:07.089Z"})
}

#[actix_web::test]
async fn another_tenants_token_sees_none_of_the_documents() {
    let hub = items_hub().await;
    let mut rx = RxDriver::start().await;
    let url = rxdb_url(&hub);
    rx.connected("a", "products", &url, &device_token(TENANT, "rx-a")).await;
    let ours: Vec<Value> = (0..5).map(|i| product(&uuid::Uuid::new_v4().to_string(), &format!("Ours {i}"), 100 + i)).collect();
    rx.insert("a", &ours).await;
    rx.await_in_sync("a").await;

    // The other tenant's client: nothing to pull, and its writes land in its own tenant, one
    // of them under an id the first tenant uses as well.
    rx.connected("x", "products", &url, &device_token(OTHER_TENANT, "rx-x")).await;
    rx.await_in_sync("x").await;
    assert_eq!(rx.dump("x").await, Vec::<Value>::new(), "the other tenant pulls none of the first tenant's documents");
    let shared_id = ours[0]["id"].as_str().unwrap();
    let theirs = vec![product(shared_id, "Theirs, same id", 999), product(&uuid::Uuid::new_v4().to_string(), "Theirs", 5)];
    rx.insert("x", &theirs).await;
    rx.await_in_sync("x").await;
    assert_eq!(rx.conflicts("x").await, Vec::<Value>::new(), "the same id in another tenant is another row");

    // Fresh clients of each tenant pull exactly their tenant's documents.
    rx.connected("a2", "products", &url, &device_token(TENANT, "rx-a2")).await;
    rx.connected("x2", "products", &url, &device_token(OTHER_TENANT, "rx-x2")).await;
    let mut sorted_ours = ours.clone();
    sorted_ours.sort_by(|l, r| l["id"].as_str().cmp(&r["id"].as_str()));
    let mut sorted_theirs = theirs.clone();
    sorted_theirs.sort_by(|l, r| l["id"].as_str().cmp(&r["id"].as_str()));
    assert_eq!(rx.await_equal(&["a", "a2"], 5, CONVERGE).await, sorted_ours);
    assert_eq!(rx.await_equal(&["x", "x2"], 2, CONVERGE).await, sorted_theirs);
    assert_table_holds(&hub, "products", TENANT, &ours).await;
    assert_table_holds(&hub, "products", OTHER_TENANT, &theirs).await;
    // Nothing of the other tenant ever reached the first tenant's sockets.
    let other_id = theirs[1]["id"].clone();
    for client in ["a", "a2"] {
        let frames = rx.wire(client).await;
        assert!(!frames.iter().any(|f| f["docIds"].as_array().is_some_and(|ids| ids.contains(&other_id))), "{client} never received {other_id}");
        assert!(rx.dump(client).await.iter().all(|d| d["name"] != json!("Theirs, same id")));
    }
    for client in ["a", "x", "a2", "x2"] {
        rx.assert_no_errors(client, &[]).await;
    }
    rx.exit().await;
    hub.shutdown().await;
}

#[actix_web::test]
async fn requests_sent_before_auth_are_answered_after_it() {
    let hub = items_hub().await;
    let mut rx = RxDriver::start().await;
    rx.raw_open("raw", &rxdb_url(&hub)).await;
    let doc = json!({"id": "raw1", "price": 2.5, "at": "2025-01-02T03:04:05.678Z", "done": false, "note": null, "meta": {"raw": true}, "qty": 1});
    let mut new_state = doc.clone();
    new_state["_deleted"] = json!(false);
    rx.raw_send("raw", json!({"id": "w1", "collection": "items", "method": "masterWrite", "params": [[{"newDocumentState": new_state}]]})).await;
    rx.raw_send("raw", json!({"id": "p1", "collection": "items", "method": "masterChangesSince", "params": [null, 10]})).await;
    let before = rx.raw_quiet("raw", 500).await;
    assert_eq!(before["messages"], json!([]), "nothing is answered before auth");
    assert_eq!(before["closed"], Value::Null, "the socket stays open while it waits for auth");
    assert_eq!(row_count(&hub, "items", TENANT).await, 0, "nothing is written before auth");

    rx.raw_send("raw", json!({"id": "a1", "collection": "items", "method": "auth", "params": [{"authorization": format!("Bearer {}", device_token(TENANT, "raw-1"))}]})).await;
    let written = rx.raw_next("raw", "w1").await;
    assert_eq!(written["collection"], json!("items"));
    assert_eq!(written["result"], json!([]), "the held write is applied without conflict");
    let pulled = rx.raw_next("raw", "p1").await;
    assert!(pulled["result"]["documents"].is_array(), "the held pull is answered with documents: {pulled}");
    assert!(pulled["result"]["checkpoint"].is_object(), "and a checkpoint: {pulled}");
    assert_table_holds(&hub, "items", TENANT, std::slice::from_ref(&doc)).await;

    // Read again after the write: the document as written, `_deleted` false.
    rx.raw_send("raw", json!({"id": "p2", "collection": "items", "method": "masterChangesSince", "params": [null, 10]})).await;
    let again = rx.raw_next("raw", "p2").await;
    assert_eq!(again["result"]["documents"], json!([new_state]));
    rx.exit().await;
    hub.shutdown().await;
}

#[actix_web::test]
async fn a_refused_token_closes_the_socket_with_4001() {
    let hub = items_hub().await;
    let mut rx = RxDriver::start().await;
    // Something to leak, were the refused socket ever answered.
    let mut device = Client::connect(hub.addr, Encoding::Json).await;
    device.hello(&device_token(TENANT, "pos-1"), Some("pos-1"), None).await;
    device.until_up_to_date().await;
    let results = device
        .push(vec![upsert("items", json!({"id": "secret"}), json!({"price": 1, "at": "2025-01-02T03:04:05.678Z", "done": false, "meta": {}, "qty": 1}), 1, now_ms(), 0)])
        .await;
    assert_eq!(results[0].status, ChangeStatus::Applied);

    let forged = synchub::auth::mint_hs256(
        "not-the-hub-secret",
        &json!({"sub": "mallory", "role": "Manager", "tenant_id": TENANT, "device_id": "rx-m", "exp": synchub::auth::unix_now() + 3600}),
    );
    rx.raw_open("forged", &rxdb_url(&hub)).await;
    rx.raw_send("forged", json!({"id": "p1", "collection": "items", "method": "masterChangesSince", "params": [null, 10]})).await;
    rx.raw_send("forged", json!({"id": "a1", "collection": "items", "method": "auth", "params": [{"authorization": format!("Bearer {forged}")}]})).await;
    let closed = rx.raw_await_close("forged").await;
    assert_eq!(closed["code"], json!(4001), "a token that does not verify: {closed}");
    assert!(!closed["messages"].to_string().contains("secret"), "the refused socket got no document: {closed}");

    // An expired token is refused as well, with its own code.
    let expired = synchub::auth::mint_hs256(
        SECRET,
        &json!({"sub": "user-old", "role": "Employee", "tenant_id": TENANT, "device_id": "rx-old", "exp": synchub::auth::unix_now() - 3600}),
    );
    rx.raw_open("expired", &rxdb_url(&hub)).await;
    rx.raw_send("expired", json!({"id": "a1", "collection": "items", "method": "auth", "params": [{"token": expired}]})).await;
    let closed = rx.raw_await_close("expired").await;
    assert_eq!(closed["code"], json!(4002), "an expired token: {closed}");
    rx.exit().await;
    hub.shutdown().await;
}

/// A collection the hub merges: two clients that edited different fields of one document
/// offline both keep their edits, a field both edited goes to the later writer, the conflict is
/// logged for review and neither client sees one; `/metrics` counts the RxDB traffic.
#[actix_web::test]
async fn a_server_merged_collection_keeps_both_clients_edits() {
    let hub = items_hub_with(|config| {
        config.rxdb_collections[0].conflicts = RxdbConflicts::ServerMerge;
    })
    .await;
    let mut rx = RxDriver::start().await;
    rx.connected("a", "items", &rxdb_url(&hub), &device_token(TENANT, "rx-a")).await;
    rx.connected("b", "items", &rxdb_url(&hub), &device_token(TENANT, "rx-b")).await;
    rx.insert("a", &[item("m1", 1)]).await;
    rx.await_doc("b", "m1", json!({"qty": 1})).await;

    rx.pause("a").await;
    rx.pause("b").await;
    rx.patch("a", &["m1"], json!({"price": 11.25, "note": "from a"})).await;
    rx.patch("b", &["m1"], json!({"qty": 7, "note": "from b"})).await;
    rx.resume("a").await;
    rx.await_in_sync("a").await;
    rx.resume("b").await;
    rx.await_in_sync("b").await;

    let docs = rx.await_equal(&["a", "b"], 1, CONVERGE).await;
    assert_eq!(number(&docs[0]["price"]), 11.25, "a's edit kept");
    assert_eq!(docs[0]["qty"], json!(7), "b's edit kept");
    assert_eq!(docs[0]["note"], json!("from b"), "the later writer wins the field both edited");
    assert_table_holds(&hub, "items", TENANT, &docs).await;
    for client in ["a", "b"] {
        assert_eq!(rx.conflicts(client).await, Vec::<Value>::new(), "the hub merged: {client} saw no conflict");
        rx.assert_no_errors(client, &[]).await;
    }
    let open = open_conflicts(&hub, TENANT).await;
    assert_eq!(open.len(), 1, "one field was written by both: {open:#?}");
    assert_eq!(open[0]["field"], json!("note"));
    assert_eq!(open[0]["winner"], json!("incoming"));
    assert_eq!(open[0]["server"]["value"], json!("from a"));

    let metrics = reqwest::get(format!("http://{}/metrics", hub.addr)).await.unwrap().text().await.unwrap();
    let sample = |name: &str| -> f64 {
        metrics.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()).unwrap_or_else(|| panic!("{name} in {metrics}"))
    };
    assert!(sample("synchub_rxdb_sessions_opened_total ") >= 2.0);
    assert!(sample("synchub_rxdb_requests_total{method=\"masterWrite\"} ") >= 3.0);
    assert!(sample("synchub_rxdb_requests_total{method=\"masterChangesSince\"} ") >= 2.0);
    assert_eq!(sample("synchub_rxdb_failures_total{kind=\"malformed\"} "), 0.0);
    rx.exit().await;
    hub.shutdown().await;
}

/// A socket that never sends `auth` is closed 4001 after `rxdb_auth_timeout_ms`; a token in the
/// URL authenticates without one.
#[actix_web::test]
async fn a_socket_without_auth_is_closed_and_a_url_token_needs_none() {
    let hub = items_hub_with(|config| {
        config.rxdb_auth_timeout_ms = 500;
    })
    .await;
    let mut rx = RxDriver::start().await;
    rx.raw_open("silent", &rxdb_url(&hub)).await;
    rx.raw_send("silent", json!({"id": "p1", "collection": "items", "method": "masterChangesSince", "params": [null, 10]})).await;
    let closed = rx.raw_await_close("silent").await;
    assert_eq!(closed["code"], json!(4001), "no auth in time: {closed}");

    let with_token = format!("{}?token={}", rxdb_url(&hub), device_token(TENANT, "rx-url"));
    rx.raw_open("url", &with_token).await;
    rx.raw_send("url", json!({"id": "p1", "collection": "items", "method": "masterChangesSince", "params": [null, 10]})).await;
    let reply = rx.raw_next("url", "p1").await;
    assert_eq!(reply["result"]["documents"], json!([]), "answered without an auth message: {reply}");
    assert!(reply["result"]["checkpoint"]["epoch"].is_string(), "{reply}");
    rx.exit().await;
    hub.shutdown().await;
}

/// A socket that stops reading: once more than `session_outbound_budget_bytes` it has not
/// confirmed (by pongs) are out, its live changes are withheld rather than buffered, and when it
/// has read its backlog it is told `RESYNC`, so that its next pull brings what it missed.
#[actix_web::test]
async fn a_reader_that_falls_behind_is_told_to_resync() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let hub = items_hub_with(|config| {
        config.session_outbound_budget_bytes = 16 * 1024;
        config.ping_every_bytes = 4 * 1024;
    })
    .await;
    let (mut reader, _) = tokio_tungstenite::connect_async(format!("{}?token={}", rxdb_url(&hub), device_token(TENANT, "rx-slow"))).await.unwrap();
    let request = |id: &str, method: &str, params: Value| Message::text(json!({"id": id, "collection": "items", "method": method, "params": params}).to_string());
    reader.send(request("stream", "masterChangeStream$", json!([]))).await.unwrap();
    reader.send(request("p1", "masterChangesSince", json!([null, 10]))).await.unwrap();
    loop {
        let Message::Text(text) = reader.next().await.unwrap().unwrap() else { continue };
        if serde_json::from_str::<Value>(&text).unwrap()["id"] == json!("p1") {
            break; // covered from here on: live changes stream
        }
    }

    // The reader stops reading while a device writes 300 rows of about 300 bytes each.
    let mut device = Client::connect(hub.addr, Encoding::Json).await;
    device.hello(&device_token(TENANT, "pos-1"), Some("pos-1"), None).await;
    device.until_up_to_date().await;
    let filler = "x".repeat(200);
    for batch in 0..30u64 {
        let changes = (0..10u64)
            .map(|i| {
                let n = batch * 10 + i;
                upsert("items", json!({"id": format!("s{n:03}")}), json!({"price": 1, "at": "2025-01-02T03:04:05.678Z", "done": false, "note": filler, "meta": {}, "qty": n}), n + 1, now_ms(), 0)
            })
            .collect();
        device.push(changes).await;
    }

    // Reading again: what was sent before the budget ran out, then RESYNC.
    let mut streamed = 0;
    let resync = tokio::time::timeout(WAIT, async {
        while let Some(Ok(message)) = reader.next().await {
            let Message::Text(text) = message else { continue };
            let event: Value = serde_json::from_str(&text).unwrap();
            match &event["result"] {
                Value::String(s) if s == "RESYNC" => return true,
                result => streamed += result["documents"].as_array().map_or(0, Vec::len),
            }
        }
        false
    })
    .await
    .expect("RESYNC within the wait");
    assert!(resync, "the socket was told to pull again");
    assert!(streamed < 300, "the live changes past the budget were withheld, not buffered ({streamed} streamed)");
    hub.shutdown().await;
}

/// Two RxDB clients on two hubs of one cluster (one database, a nats-server of the test's own):
/// each one's inserts, updates and removals reach the other through the other node.
#[actix_web::test]
async fn rxdb_clients_on_two_nodes_replicate_through_the_cluster() {
    let nats = common::nats::NatsServer::start(&std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("rx-cluster-{}", uuid::Uuid::new_v4().simple())));
    let url = fresh_database().await;
    let db = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::raw_sql(ITEMS_SQL).execute(&db).await.unwrap();
    db.close().await;
    let node = |name: &'static str| {
        let nats = nats.url();
        move |config: &mut Config| {
            register_items(config);
            config.nats_url = Some(nats);
            config.node_id = Some(name.into());
        }
    };
    let one = TestHub::start_on(url.clone(), node("rx-node-1")).await;
    let two = TestHub::start_on(url, node("rx-node-2")).await;
    let mut rx = RxDriver::start().await;
    rx.connected("a", "items", &rxdb_url(&one), &device_token(TENANT, "rx-a")).await;
    rx.connected("b", "items", &rxdb_url(&two), &device_token(TENANT, "rx-b")).await;

    rx.insert("a", &[item("c1", 1)]).await;
    rx.await_doc("b", "c1", item("c1", 1)).await;
    rx.patch("b", &["c1"], json!({"qty": 2, "note": "from node 2"})).await;
    rx.await_doc("a", "c1", json!({"qty": 2, "note": "from node 2"})).await;
    rx.insert("b", &ids("n", 0..20).iter().map(|id| item(id, 3)).collect::<Vec<_>>()).await;
    rx.remove("a", &["c1"]).await;
    rx.await_gone("b", "c1").await;
    let docs = rx.await_equal(&["a", "b"], 20, CONVERGE).await;
    assert_table_holds(&one, "items", TENANT, &docs).await;
    for client in ["a", "b"] {
        rx.assert_no_errors(client, &[]).await;
        assert_eq!(rx.conflicts(client).await, Vec::<Value>::new());
    }
    // Each node had the other's changes over NATS (the log's 5 s re-read would converge too).
    for hub in [&one, &two] {
        let text = reqwest::get(format!("http://{}/metrics", hub.addr)).await.unwrap().text().await.unwrap();
        let received = text.lines().find_map(|l| l.strip_prefix("synchub_cluster_deltas_received_total ")).and_then(|v| v.parse::<f64>().ok());
        assert!(received.is_some_and(|n| n >= 1.0), "deltas from the other node over NATS: {received:?}");
    }
    rx.exit().await;
    one.shutdown().await;
    two.shutdown().await;
}
