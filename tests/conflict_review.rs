//! The HTTP API against a real hub, real Postgres and real sockets: conflict review (list with
//! every filter and paging, counts, one conflict with its current row, resolve keep /
//! take_other / value as ordinary synced and logged changes, a delete that won), roles, tokens
//! and tenants; server-side writers (a push that meets a conflict, exactly once on retry, the
//! checks of a device push, service tokens and their tenants) and broadcasts.

mod common;

use common::*;
use protocol::{Change, ChangeStatus, ServerFrame};
use serde_json::{json, Value};
use synchub::config::{Secret, ServiceToken};
use uuid::Uuid;

const TENANT: &str = "store-1";
const OTHER: &str = "store-2";
const BRIDGE_TOKEN: &str = "bridge-token-0123456789";
const LIMITED_TOKEN: &str = "limited-token-0123456789";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn manager(tenant: &str) -> String {
    token(tenant, "mgr-1", "Manager", None)
}

/// A live device that numbers its own changes.
struct Dev {
    c: Client,
    seq: u64,
}

impl Dev {
    async fn connect(hub: &TestHub, tenant: &str, device: &str) -> Dev {
        let (c, _, _) = Client::device(hub, tenant, device).await;
        Dev { c, seq: 0 }
    }

    /// Push one upsert of `table` and return its result.
    async fn upsert(&mut self, table: &str, key: Value, fields: Value, wall_ms: u64, base_version: u64) -> protocol::ChangeResult {
        self.seq += 1;
        let change = upsert(table, key, fields, self.seq, wall_ms, base_version);
        self.c.push(vec![change]).await.remove(0)
    }

    async fn delete(&mut self, table: &str, key: Value, wall_ms: u64, base_version: u64) -> protocol::ChangeResult {
        self.seq += 1;
        let change = delete(table, key, self.seq, wall_ms, base_version);
        self.c.push(vec![change]).await.remove(0)
    }
}

/// `a` creates a product and sets its price to `a_price`; `b`, which saw only the creation,
/// sets `b_price`: a conflict on `price_cents`, won by `b` when `b_later` (its clock is later).
/// Returns the product's key and its version after the conflict.
async fn price_conflict(a: &mut Dev, b: &mut Dev, a_price: i64, b_price: i64, b_later: bool) -> (Value, u64) {
    let id = Uuid::now_v7();
    let key = json!({"id": id});
    let now = now_ms();
    let created = a.upsert("products", key.clone(), product(id, "Tea", 100), now - 5_000, 0).await;
    let v1 = created.seq.expect("created");
    let raised = a.upsert("products", key.clone(), json!({"price_cents": a_price}), now - 2_000, v1).await;
    assert_eq!(raised.status, ChangeStatus::Applied);
    let b_wall = if b_later { now } else { now - 4_000 };
    let r = b.upsert("products", key.clone(), json!({"price_cents": b_price}), b_wall, v1).await;
    assert_eq!(r.status, ChangeStatus::Conflict, "{r:?}");
    let version = r.seq.or(raised.seq).unwrap();
    (key, version)
}

/// The conflict on the row with `key`, found through the API.
async fn conflict_of(api: &Api, tenant: &str, key: &Value) -> Value {
    let (status, body) = api.get("/v1/conflicts", Some(&manager(tenant)), &[("limit", "500")]).await;
    assert_eq!(status, 200, "{body}");
    body["conflicts"].as_array().unwrap().iter().find(|c| c["key"] == *key).cloned().unwrap_or_else(|| panic!("no conflict on {key} in {body}"))
}

fn ids(body: &Value) -> Vec<i64> {
    body["conflicts"].as_array().unwrap().iter().map(|c| c["id"].as_i64().unwrap()).collect()
}

fn assert_error(got: (u16, Value), status: u16, code: &str) {
    assert_eq!(got.0, status, "{}", got.1);
    assert_eq!(got.1["code"], code, "{}", got.1);
    assert!(got.1["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", got.1);
}

/// The next `conflict` frame a session subscribed to the conflicts channel receives.
async fn next_conflict_news(c: &mut Client) -> (protocol::ConflictEvent, protocol::ConflictRecord, u64) {
    c.expect(|f| match f {
        ServerFrame::Conflict { event, conflict, open, .. } => Some((*event, (**conflict).clone(), *open)),
        _ => None,
    })
    .await
}

/// A manager's dashboard of `TENANT` watching the conflicts channel.
async fn conflicts_board(hub: &TestHub) -> Client {
    let (mut board, _) = Client::dashboard(hub, TENANT, "mgr-2", "Manager").await;
    let id = board.send_subscribe("conflicts", None, vec![], false, Some(protocol::Channel::Conflicts)).await;
    board.expect(|f| matches!(f, ServerFrame::Subscribed { id: got, .. } if *got == id).then_some(())).await;
    board
}

/// The tenant's head seq, as Postgres holds it.
async fn head_of(hub: &TestHub, tenant: &str) -> i64 {
    sqlx::query_scalar("select head_seq from synchub.tenants where tenant_id = $1").bind(tenant).fetch_one(&hub.db).await.unwrap()
}

/// The next live delta (the row's, from `origin`) a device receives.
async fn delta_from(c: &mut Client, origin: &str) -> protocol::Delta {
    loop {
        let (deltas, _) = c.next_deltas().await;
        if let Some(d) = deltas.into_iter().find(|d| d.origin.as_deref() == Some(origin)) {
            return d;
        }
    }
}

async fn start_with_services() -> TestHub {
    TestHub::start_with(|config| {
        config.service_tokens = vec![
            ServiceToken { name: "bridge".into(), token: Secret(BRIDGE_TOKEN.into()), tenants: vec![] },
            ServiceToken { name: "limited".into(), token: Secret(LIMITED_TOKEN.into()), tenants: vec![OTHER.into()] },
        ];
        config.max_broadcast_payload_bytes = 1024;
        config.max_http_body_bytes = 64 * 1024;
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Conflict review
// ---------------------------------------------------------------------------------------------

#[actix_web::test]
async fn list_filters_paging_counts_and_one_conflict() {
    let hub = TestHub::start().await;
    let api = Api::of(&hub);
    let mgr = manager(TENANT);
    let mut a = Dev::connect(&hub, TENANT, "pos-1").await;
    let mut b = Dev::connect(&hub, TENANT, "pos-2").await;
    let mut c = Dev::connect(&hub, TENANT, "pos-3").await;

    // Three conflicts: products (pos-1 / pos-2, incoming wins), customers (pos-1 / pos-3,
    // server wins), products again (pos-1 / pos-2).
    let (k1, _) = price_conflict(&mut a, &mut b, 200, 300, true).await;
    let cid = Uuid::now_v7();
    let ckey = json!({"id": cid});
    let now = now_ms();
    let v1 = a.upsert("customers", ckey.clone(), json!({"name": "Ada", "loyalty_points": 1}), now - 5_000, 0).await.seq.unwrap();
    a.upsert("customers", ckey.clone(), json!({"loyalty_points": 5}), now - 1_000, v1).await;
    let r = c.upsert("customers", ckey.clone(), json!({"loyalty_points": 9}), now - 3_000, v1).await;
    assert_eq!(r.status, ChangeStatus::Conflict);
    let (k3, v3) = price_conflict(&mut a, &mut b, 400, 500, false).await;
    // Another tenant's conflict is never seen.
    let mut x = Dev::connect(&hub, OTHER, "pos-1").await;
    let mut y = Dev::connect(&hub, OTHER, "pos-2").await;
    let (kx, _) = price_conflict(&mut x, &mut y, 1, 2, true).await;
    let foreign = conflict_of(&api, OTHER, &kx).await["id"].as_i64().unwrap();

    // All, newest first.
    let (status, all) = api.get("/v1/conflicts", Some(&mgr), &[]).await;
    assert_eq!(status, 200, "{all}");
    let all_ids = ids(&all);
    assert_eq!(all_ids.len(), 3);
    assert!(all_ids.windows(2).all(|w| w[0] > w[1]), "newest first: {all_ids:?}");
    assert_eq!(all["next_before_id"], Value::Null);
    assert!(!all_ids.contains(&foreign));
    let first = &all["conflicts"][2];
    assert_eq!(first["key"], k1);
    assert_eq!(first["table"], "products");
    assert_eq!(first["field"], "price_cents");
    assert_eq!(first["status"], "open");
    assert_eq!(first["winner"], "incoming");
    assert_eq!(first["policy"], "lww");
    assert_eq!(first["server"]["value"], 200);
    assert_eq!(first["server"]["device"], "pos-1");
    assert_eq!(first["server"]["user"], "user-pos-1");
    assert!(first["server"]["version"].as_u64().is_some());
    assert_eq!(first["incoming"]["value"], 300);
    assert_eq!(first["incoming"]["device"], "pos-2");
    assert!(first["incoming"]["hlc"]["wall_ms"].as_u64().is_some());
    assert_eq!(first["resolution"], Value::Null);
    assert_eq!(first["reviewed_by"], Value::Null);
    let created: Vec<String> = all["conflicts"].as_array().unwrap().iter().map(|c| c["created_at"].as_str().unwrap().to_string()).collect();

    // Filters.
    let count = |body: &Value| body["conflicts"].as_array().unwrap().len();
    assert_eq!(count(&api.get("/v1/conflicts", Some(&mgr), &[("status", "open")]).await.1), 3);
    assert_eq!(count(&api.get("/v1/conflicts", Some(&mgr), &[("status", "resolved")]).await.1), 0);
    assert_eq!(count(&api.get("/v1/conflicts", Some(&mgr), &[("status", "dismissed")]).await.1), 0);
    let customers = api.get("/v1/conflicts", Some(&mgr), &[("table", "customers")]).await.1;
    assert_eq!(count(&customers), 1);
    assert_eq!(customers["conflicts"][0]["key"], ckey);
    assert_eq!(customers["conflicts"][0]["winner"], "server");
    assert_eq!(count(&api.get("/v1/conflicts", Some(&mgr), &[("table", "products")]).await.1), 2);
    // The device filter matches either side.
    assert_eq!(ids(&api.get("/v1/conflicts", Some(&mgr), &[("device", "pos-3")]).await.1), vec![all_ids[1]]);
    assert_eq!(count(&api.get("/v1/conflicts", Some(&mgr), &[("device", "pos-1")]).await.1), 3);
    assert_eq!(count(&api.get("/v1/conflicts", Some(&mgr), &[("device", "pos-2"), ("table", "products")]).await.1), 2);
    assert_eq!(count(&api.get("/v1/conflicts", Some(&mgr), &[("device", "pos-9")]).await.1), 0);
    // since is inclusive, until exclusive, on created_at (RFC 3339 with offsets and fractions).
    let middle = created[1].as_str();
    assert_eq!(ids(&api.get("/v1/conflicts", Some(&mgr), &[("since", middle)]).await.1), all_ids[..2].to_vec());
    assert_eq!(ids(&api.get("/v1/conflicts", Some(&mgr), &[("until", middle)]).await.1), vec![all_ids[2]]);
    assert_eq!(count(&api.get("/v1/conflicts", Some(&mgr), &[("since", "2000-01-01T00:00:00Z")]).await.1), 3);
    assert_eq!(count(&api.get("/v1/conflicts", Some(&mgr), &[("since", "2999-01-01T00:00:00+02:00")]).await.1), 0);
    assert_eq!(count(&api.get("/v1/conflicts", Some(&mgr), &[("until", "2000-01-01T00:00:00.5Z")]).await.1), 0);

    // Keyset paging.
    let page1 = api.get("/v1/conflicts", Some(&mgr), &[("limit", "2")]).await.1;
    assert_eq!(ids(&page1), all_ids[..2].to_vec());
    assert_eq!(page1["next_before_id"], all_ids[1]);
    let before = all_ids[1].to_string();
    let page2 = api.get("/v1/conflicts", Some(&mgr), &[("limit", "2"), ("before_id", &before)]).await.1;
    assert_eq!(ids(&page2), vec![all_ids[2]]);
    assert_eq!(page2["next_before_id"], Value::Null);
    // limit is 1..=conflict_page_max: 0 is refused, a larger one lowered.
    assert_error(api.get("/v1/conflicts", Some(&mgr), &[("limit", "0")]).await, 400, "invalid_filter");
    assert_eq!(count(&api.get("/v1/conflicts", Some(&mgr), &[("limit", "100000")]).await.1), 3);

    // Bad filters.
    assert_error(api.get("/v1/conflicts", Some(&mgr), &[("status", "closed")]).await, 400, "invalid_filter");
    assert_error(api.get("/v1/conflicts", Some(&mgr), &[("since", "yesterday")]).await, 400, "invalid_filter");
    assert_error(api.get("/v1/conflicts", Some(&mgr), &[("limit", "many")]).await, 400, "invalid_filter");
    assert_error(api.get("/v1/conflicts", Some(&mgr), &[("sort", "asc")]).await, 400, "invalid_filter");

    // Counts.
    let (status, counts) = api.get("/v1/conflicts/counts", Some(&mgr), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(counts, json!({"open": 3, "resolved": 0, "dismissed": 0}));

    // One conflict, with its row as it is now.
    let (status, one) = api.get(&format!("/v1/conflicts/{}", all_ids[0]), Some(&mgr), &[]).await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["conflict"], all["conflicts"][0]);
    assert_eq!(one["conflict"]["key"], k3);
    assert_eq!(one["current"]["version"], v3);
    assert_eq!(one["current"]["row"]["price_cents"], 400, "server won");
    assert_eq!(one["current"]["row"]["id"], k3["id"]);

    // Not found: another tenant's conflict, an unknown id, an id that is not a number.
    assert_error(api.get(&format!("/v1/conflicts/{foreign}"), Some(&mgr), &[]).await, 404, "not_found");
    assert_error(api.get("/v1/conflicts/999999", Some(&mgr), &[]).await, 404, "not_found");
    assert_error(api.get("/v1/conflicts/abc", Some(&mgr), &[]).await, 404, "not_found");
    hub.shutdown().await;
}

/// Every query parameter and path segment of the API with input Postgres would refuse (a date
/// that is not in the calendar or out of its range, a NUL in text, a number out of range) is
/// the client's error, never a 503 from the database; dates Postgres would misread or refuse
/// but RFC 3339 allows are answered; and the tenant is served as before afterwards.
#[actix_web::test]
async fn no_query_or_path_input_reaches_the_database_as_an_error() {
    let hub = start_with_services().await;
    let api = Api::of(&hub);
    let mgr = manager(TENANT);
    let mut a = Dev::connect(&hub, TENANT, "pos-1").await;
    let mut b = Dev::connect(&hub, TENANT, "pos-2").await;
    price_conflict(&mut a, &mut b, 200, 300, true).await;
    let long = "p".repeat(201);

    // (method, path, query, status, code)
    let bad: &[(&str, &str, &[(&str, &str)], u16, &str)] = &[
        ("GET", "/v1/conflicts", &[("since", "2024-02-31T00:00:00Z")], 400, "invalid_filter"),
        ("GET", "/v1/conflicts", &[("since", "0000-01-01T00:00:00Z")], 400, "invalid_filter"),
        ("GET", "/v1/conflicts", &[("until", "2023-02-29T00:00:00Z")], 400, "invalid_filter"),
        ("GET", "/v1/conflicts", &[("until", "1900-02-29T12:00:00+01:00")], 400, "invalid_filter"),
        ("GET", "/v1/conflicts", &[("since", "2024-04-31T00:00:00Z")], 400, "invalid_filter"),
        ("GET", "/v1/conflicts", &[("since", "2024-11-30T24:00:00Z")], 400, "invalid_filter"),
        ("GET", "/v1/conflicts", &[("since", "2024-11-30T10:00:00+24:00")], 400, "invalid_filter"),
        ("GET", "/v1/conflicts", &[("since", "2024-11-30T10:00:00Z\0")], 400, "invalid_filter"),
        ("GET", "/v1/conflicts", &[("table", "\0")], 400, "invalid_filter"),
        ("GET", "/v1/conflicts", &[("table", "products\0")], 400, "invalid_filter"),
        ("GET", "/v1/conflicts", &[("device", "\0")], 400, "invalid_filter"),
        ("GET", "/v1/conflicts", &[("device", "pos-\01")], 400, "invalid_filter"),
        ("GET", "/v1/conflicts", &[("device", &long)], 400, "invalid_filter"),
        ("GET", "/v1/conflicts", &[("status", "open\0")], 400, "invalid_filter"),
        ("GET", "/v1/conflicts", &[("before_id", "9223372036854775808")], 400, "invalid_filter"),
        ("GET", "/v1/conflicts", &[("limit", "4294967296")], 400, "invalid_filter"),
        ("GET", "/v1/conflicts", &[("limit", "-1")], 400, "invalid_filter"),
        ("GET", "/v1/conflicts/9223372036854775808", &[], 404, "not_found"),
        ("GET", "/v1/conflicts/%00", &[], 404, "not_found"),
        ("POST", "/v1/conflicts/-9223372036854775809/resolve", &[], 404, "not_found"),
        ("POST", "/v1/tenants/%00/push", &[], 400, "malformed_frame"),
        ("POST", "/v1/tenants/store-1%00/push", &[], 400, "malformed_frame"),
        ("POST", "/v1/tenants/%00/broadcast", &[], 400, "malformed_frame"),
        ("POST", "/v1/sessions/%00/token", &[], 404, "not_found"),
    ];
    let push = push_body("bridge-1", Uuid::now_v7(), &[upsert("products", json!({"id": Uuid::now_v7()}), product(Uuid::now_v7(), "Tea", 1), 1, now_ms(), 0)]);
    let mut wrong = Vec::new();
    for (method, path, query, status, code) in bad {
        let (url, token) = (format!("{}{path}", api.base), if path.starts_with("/v1/tenants") { BRIDGE_TOKEN } else { mgr.as_str() });
        let request = match *method {
            "GET" => api.http.get(url).query(query),
            _ if path.ends_with("/broadcast") => api.http.post(url).json(&json!({"channel": "c", "payload": 1})),
            _ if path.ends_with("/resolve") => api.http.post(url).json(&json!({"action": "keep"})),
            _ => api.http.post(url).json(&push),
        };
        let got = api.send(request, Some(token)).await;
        if (got.0, got.1["code"].as_str()) != (*status, Some(*code)) {
            wrong.push(format!("{method} {path} {query:?}: expected {status} {code}, got {} {}", got.0, got.1));
        }
    }

    // RFC 3339 allows these; Postgres would refuse the text of some (an offset past 15:59, a
    // fraction of a leap second) but gets them in binary. (date, conflicts at or after it)
    let dates = [
        ("0001-01-01T00:00:00+23:59", 1),
        ("2000-02-29T00:00:00Z", 1),
        ("2016-12-31T23:59:60.5Z", 1),
        ("2024-01-01T00:00:00+16:00", 1),
        ("9999-12-31T23:59:59.999999-23:59", 0),
    ];
    for (date, n) in dates {
        for (filter, expected) in [("since", n), ("until", 1 - n)] {
            let (status, body) = api.get("/v1/conflicts", Some(&mgr), &[(filter, date)]).await;
            if (status, body["conflicts"].as_array().map(Vec::len)) != (200, Some(expected)) {
                wrong.push(format!("{filter}={date}: expected 200 with {expected} conflicts, got {status} {body}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{} wrong answers:\n{}", wrong.len(), wrong.join("\n"));
    let (status, body) = api.get("/v1/conflicts", Some(&mgr), &[]).await;
    assert_eq!((status, body["conflicts"].as_array().map(Vec::len)), (200, Some(1)), "{body}");
    hub.shutdown().await;
}

#[actix_web::test]
async fn resolutions_sync_as_ordinary_changes_and_are_logged() {
    let hub = TestHub::start().await;
    let api = Api::of(&hub);
    let mgr = manager(TENANT);
    let mut a = Dev::connect(&hub, TENANT, "pos-1").await;
    let mut b = Dev::connect(&hub, TENANT, "pos-2").await;
    // A manager's dashboard watches the conflicts channel.
    let mut board = conflicts_board(&hub).await;
    let (k1, _) = price_conflict(&mut a, &mut b, 200, 300, true).await; // incoming (300) won
    let (k2, _) = price_conflict(&mut a, &mut b, 400, 500, true).await; // incoming (500) won
    let (k3, _) = price_conflict(&mut a, &mut b, 600, 700, false).await; // server (600) won
    let mut watcher = Dev::connect(&hub, TENANT, "pos-3").await;
    let c1 = conflict_of(&api, TENANT, &k1).await["id"].as_i64().unwrap();
    let c2 = conflict_of(&api, TENANT, &k2).await["id"].as_i64().unwrap();
    let c3 = conflict_of(&api, TENANT, &k3).await["id"].as_i64().unwrap();
    let mut news = Vec::new();
    for _ in 0..3 {
        news.push(next_conflict_news(&mut board).await);
    }
    let opened: Vec<(protocol::ConflictEvent, i64, u64)> = news.iter().map(|(e, c, open)| (*e, c.id, *open)).collect();
    use protocol::ConflictEvent::{Opened, Resolved};
    assert_eq!(opened, vec![(Opened, c1, 1), (Opened, c2, 2), (Opened, c3, 3)], "each conflict pushed live with the open count");
    assert_eq!(news[0].1.incoming.value, json!(300));
    assert_eq!(news[0].1.server.value, json!(200));

    // Keeping the value that is already there writes nothing: no change, no delta.
    let head_before = head_of(&hub, TENANT).await;
    let (status, kept) = api.post(&format!("/v1/conflicts/{c1}/resolve"), Some(&mgr), &json!({"action": "keep"})).await;
    assert_eq!(status, 200, "{kept}");
    assert_eq!((kept["result"]["status"].as_str(), &kept["result"]["seq"]), (Some("applied"), &Value::Null), "nothing written: {kept}");
    let conflict = &kept["conflict"];
    assert_eq!((conflict["status"].as_str(), conflict["resolution"].as_str()), (Some("resolved"), Some("keep")));
    assert_eq!((&conflict["resolution_seq"], &conflict["resolved_value"]), (&Value::Null, &json!(300)));
    assert_eq!(head_of(&hub, TENANT).await, head_before, "no change was logged");
    let (event, record, open) = next_conflict_news(&mut board).await;
    assert_eq!((event, record.id, open), (Resolved, c1, 2));
    let _ = k1;

    let cases = [(c2, &k2, json!({"action": "take_other"}), 400, "take_other"), (c3, &k3, json!({"action": "value", "value": 777}), 777, "value")];
    for (n, (id, key, body, price, resolution)) in cases.into_iter().enumerate() {
        let n = n + 1;
        let (status, resolved) = api.post(&format!("/v1/conflicts/{id}/resolve"), Some(&mgr), &body).await;
        assert_eq!(status, 200, "{resolved}");
        let result = &resolved["result"];
        assert_eq!(result["status"], "applied", "the resolution does not conflict: {result}");
        let seq = result["seq"].as_u64().expect("the resolution wrote at a seq");
        assert_eq!(result["device_seq"], n as u64 + 1, "the hub numbers the console device's changes");
        let conflict = &resolved["conflict"];
        assert_eq!(conflict["id"], id);
        assert_eq!(conflict["status"], "resolved");
        assert_eq!(conflict["resolution"], resolution);
        assert_eq!(conflict["resolution_seq"], seq);
        assert_eq!(conflict["resolved_value"], price, "the value written is returned");
        let (_, fetched) = api.get(&format!("/v1/conflicts/{id}"), Some(&mgr), &[]).await;
        assert_eq!(fetched["conflict"]["resolved_value"], price, "and kept");
        assert_eq!(conflict["reviewed_by"], "mgr-1");
        assert!(conflict["reviewed_at"].is_string());

        // Every device receives it as an ordinary delta.
        for dev in [&mut watcher.c, &mut a.c] {
            let delta = delta_from(dev, "console:mgr-1").await;
            assert_eq!(delta.seq, seq);
            assert_eq!(Value::Object(delta.key.clone()), *key);
            assert_eq!(delta.row.as_ref().unwrap()["price_cents"], price);
        }
        // It is in the change log, and in the table.
        let (origin, user, device_seq, written): (String, String, i64, Value) = sqlx::query_as(
            "select origin_device, user_id, device_seq, written from synchub.change_log where tenant_id = $1 and seq = $2",
        )
        .bind(TENANT)
        .bind(seq as i64)
        .fetch_one(&hub.db)
        .await
        .unwrap();
        assert_eq!((origin.as_str(), user.as_str(), device_seq), ("console:mgr-1", "mgr-1", n as i64 + 1));
        assert_eq!(written, json!({"price_cents": price}));
        let stored: i32 = sqlx::query_scalar("select price_cents from products where id = ($1::jsonb->>'id')::uuid")
            .bind(key)
            .fetch_one(&hub.db)
            .await
            .unwrap();
        assert_eq!(stored as i64, price);
        let resolved_value: Value = sqlx::query_scalar("select resolved_value from synchub.conflicts where conflict_id = $1")
            .bind(id)
            .fetch_one(&hub.db)
            .await
            .unwrap();
        assert_eq!(resolved_value, json!(price));

        // The manager's dashboard hears of it.
        let (event, record, open) = next_conflict_news(&mut board).await;
        assert_eq!((event, record.id, record.status, open), (Resolved, id, protocol::ReviewStatus::Resolved, 2 - n as u64));

        // A second resolve is refused.
        assert_error(api.post(&format!("/v1/conflicts/{id}/resolve"), Some(&mgr), &json!({"action": "keep"})).await, 409, "conflict_not_open");
    }
    // No new conflict came of the resolutions.
    let (_, counts) = api.get("/v1/conflicts/counts", Some(&mgr), &[]).await;
    assert_eq!(counts, json!({"open": 0, "resolved": 3, "dismissed": 0}));
    let (_, resolved) = api.get("/v1/conflicts", Some(&mgr), &[("status", "resolved")]).await;
    assert_eq!(resolved["conflicts"].as_array().unwrap().len(), 3);
    // A bad body.
    assert_error(api.post(&format!("/v1/conflicts/{c1}/resolve"), Some(&mgr), &json!({"action": "value"})).await, 400, "malformed_frame");
    assert_error(api.post(&format!("/v1/conflicts/{c1}/resolve"), Some(&mgr), &json!({"action": "merge"})).await, 400, "malformed_frame");
    hub.shutdown().await;
}

#[actix_web::test]
async fn a_delete_that_won_is_kept_or_the_row_restored_with_the_other_value() {
    let hub = TestHub::start().await;
    let api = Api::of(&hub);
    let mgr = manager(TENANT);
    let mut a = Dev::connect(&hub, TENANT, "pos-1").await;
    let mut b = Dev::connect(&hub, TENANT, "pos-2").await;
    let now = now_ms();
    let mut keys = Vec::new();
    for _ in 0..4 {
        // a deletes the product; b, which saw only its creation, changes its price.
        let id = Uuid::now_v7();
        let key = json!({"id": id});
        let v1 = a.upsert("products", key.clone(), product(id, "Tea", 100), now - 5_000, 0).await.seq.unwrap();
        a.delete("products", key.clone(), now - 2_000, v1).await;
        let r = b.upsert("products", key.clone(), json!({"price_cents": 300}), now, v1).await;
        assert_eq!(r.status, ChangeStatus::Conflict);
        keys.push(key);
    }
    let resolve = |id: &Value, body: Value| {
        let (api, mgr, path) = (&api, &mgr, format!("/v1/conflicts/{id}/resolve"));
        async move { api.post(&path, Some(mgr), &body).await }
    };
    let price = |key: &Value| {
        let id = Uuid::parse_str(key["id"].as_str().unwrap()).unwrap();
        let db = hub.db.clone();
        async move {
            sqlx::query_as::<_, (String, i32)>("select name, price_cents from public.products where tenant_id = $1 and id = $2")
                .bind(TENANT)
                .bind(id)
                .fetch_optional(&db)
                .await
                .unwrap()
        }
    };

    // Keep: the delete stays, nothing is written.
    let keep = conflict_of(&api, TENANT, &keys[0]).await;
    assert_eq!(keep["policy"], "delete_wins");
    let (status, resolved) = resolve(&keep["id"], json!({"action": "keep"})).await;
    assert_eq!(status, 200, "{resolved}");
    assert_eq!(resolved["result"]["status"], "applied");
    assert_eq!(resolved["result"]["seq"], Value::Null, "keeping the delete writes nothing");
    assert_eq!(resolved["conflict"]["status"], "resolved");
    assert_eq!(resolved["conflict"]["resolution"], "keep");
    assert_eq!(resolved["conflict"]["resolution_seq"], Value::Null);
    assert_eq!(price(&keys[0]).await, None);

    // The other value: the row comes back as it was deleted, with the price b wrote, as an
    // ordinary change that devices receive.
    let restore = conflict_of(&api, TENANT, &keys[1]).await;
    let (status, resolved) = resolve(&restore["id"], json!({"action": "take_other"})).await;
    assert_eq!(status, 200, "{resolved}");
    assert_eq!(resolved["result"]["status"], "applied", "{resolved}");
    assert!(resolved["result"]["seq"].is_u64(), "the restore is logged: {resolved}");
    assert_eq!((&resolved["conflict"]["resolution"], &resolved["conflict"]["resolved_value"]), (&json!("take_other"), &json!(300)));
    assert_eq!(price(&keys[1]).await, Some(("Tea".to_string(), 300)));
    let delta = delta_from(&mut a.c, "console:mgr-1").await;
    assert_eq!((delta.key.clone(), delta.row.as_ref().and_then(|r| r.get("name").cloned())), (obj(keys[1].clone()), Some(json!("Tea"))));

    // Re-created meanwhile (here by SQL): a restore is refused, nothing written, still open.
    let recreated = conflict_of(&api, TENANT, &keys[2]).await;
    let id = Uuid::parse_str(keys[2]["id"].as_str().unwrap()).unwrap();
    sqlx::query("insert into public.products (tenant_id, id, sku, name, price_cents) values ($1, $2, 'SKU-NEW', 'Chai', 250)")
        .bind(TENANT)
        .bind(id)
        .execute(&hub.db)
        .await
        .unwrap();
    for body in [json!({"action": "take_other"}), json!({"action": "value", "value": 5})] {
        assert_error(resolve(&recreated["id"], body).await, 409, "stale_conflict");
    }
    let (_, still) = api.get(&format!("/v1/conflicts/{}", recreated["id"]), Some(&mgr), &[]).await;
    assert_eq!(still["conflict"]["status"], "open", "a refused resolution leaves the conflict open");
    assert_eq!(price(&keys[2]).await, Some(("Chai".to_string(), 250)));

    // A value of the reviewer's own restores the row with it.
    let own = conflict_of(&api, TENANT, &keys[3]).await;
    let (status, resolved) = resolve(&own["id"], json!({"action": "value", "value": 7})).await;
    assert_eq!(status, 200, "{resolved}");
    assert_eq!(price(&keys[3]).await, Some(("Tea".to_string(), 7)));
    hub.shutdown().await;
}

fn obj(value: Value) -> protocol::Object {
    match value {
        Value::Object(o) => o,
        other => panic!("not an object: {other}"),
    }
}

#[actix_web::test]
async fn review_needs_a_manager_token_of_the_tenant() {
    let hub = TestHub::start().await;
    let api = Api::of(&hub);
    let mut a = Dev::connect(&hub, TENANT, "pos-1").await;
    let mut b = Dev::connect(&hub, TENANT, "pos-2").await;
    let (key, _) = price_conflict(&mut a, &mut b, 200, 300, true).await;
    let id = conflict_of(&api, TENANT, &key).await["id"].as_i64().unwrap();
    let resolve = format!("/v1/conflicts/{id}/resolve");
    let keep = json!({"action": "keep"});

    let employee = token(TENANT, "emp-1", "Employee", None);
    assert_error(api.get("/v1/conflicts", Some(&employee), &[]).await, 403, "forbidden");
    assert_error(api.get("/v1/conflicts/counts", Some(&employee), &[]).await, 403, "forbidden");
    assert_error(api.get(&format!("/v1/conflicts/{id}"), Some(&employee), &[]).await, 403, "forbidden");
    assert_error(api.post(&resolve, Some(&employee), &keep).await, 403, "forbidden");
    assert_error(api.get("/v1/conflicts", None, &[]).await, 401, "invalid_token");
    assert_error(api.post(&resolve, None, &keep).await, 401, "invalid_token");
    assert_error(api.get("/v1/conflicts", Some("not-a-jwt"), &[]).await, 401, "invalid_token");
    let expired = synchub::auth::mint_hs256(
        SECRET,
        &json!({"sub": "mgr-1", "role": "Manager", "tenant_id": TENANT, "exp": synchub::auth::unix_now() - 3600}),
    );
    assert_error(api.get("/v1/conflicts", Some(&expired), &[]).await, 401, "token_expired");
    // The tenant is the token's: another tenant's manager does not find the conflict.
    assert_error(api.get(&format!("/v1/conflicts/{id}"), Some(&manager(OTHER)), &[]).await, 404, "not_found");
    assert_error(api.post(&resolve, Some(&manager(OTHER)), &keep).await, 404, "not_found");
    let (_, list) = api.get("/v1/conflicts", Some(&manager(OTHER)), &[]).await;
    assert_eq!(list["conflicts"], json!([]));
    // Nothing was resolved by the refused calls.
    let (_, one) = api.get(&format!("/v1/conflicts/{id}"), Some(&manager(TENANT)), &[]).await;
    assert_eq!(one["conflict"]["status"], "open");
    hub.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Server-side writers
// ---------------------------------------------------------------------------------------------

fn push_body(device: &str, batch_id: Uuid, changes: &[Change]) -> Value {
    json!({"device_id": device, "batch_id": batch_id, "changes": changes})
}

#[actix_web::test]
async fn service_push_merges_like_a_device_exactly_once() {
    let hub = start_with_services().await;
    let api = Api::of(&hub);
    let path = format!("/v1/tenants/{TENANT}/push");
    let mut a = Dev::connect(&hub, TENANT, "pos-1").await;
    let mut watcher = Dev::connect(&hub, TENANT, "pos-2").await;
    let id = Uuid::now_v7();
    let key = json!({"id": id});
    let now = now_ms();
    let v1 = a.upsert("products", key.clone(), product(id, "Tea", 100), now - 5_000, 0).await.seq.unwrap();
    a.upsert("products", key.clone(), json!({"price_cents": 200}), now - 2_000, v1).await;

    // The bridge saw only the creation: its price meets pos-1's (its clock is later: it wins).
    let batch_id = Uuid::now_v7();
    let changes = vec![
        upsert("products", key.clone(), json!({"price_cents": 250}), 1, now, v1),
        upsert("products", key.clone(), json!({"name": "Green tea"}), 2, now + 1, v1),
    ];
    let (status, body) = api.post(&path, Some(BRIDGE_TOKEN), &push_body("chat-bridge", batch_id, &changes)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["batch_id"], json!(batch_id));
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["status"], "conflict");
    assert_eq!(results[0]["device_seq"], 1);
    // pos-1's price is gone (the bridge's own first change won it): nothing of another writer's
    // is left that the bridge had not seen, so its name is applied, not merged.
    assert_eq!(results[1]["status"], "applied");
    let seqs: Vec<u64> = results.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    // Devices receive the writes like any other device's.
    let delta = delta_from(&mut watcher.c, "chat-bridge").await;
    assert_eq!(delta.seq, seqs[0]);
    assert_eq!(delta.row.as_ref().unwrap()["price_cents"], 250);
    // The conflict is listed, with the service as the incoming side.
    let conflict = conflict_of(&api, TENANT, &key).await;
    assert_eq!(conflict["incoming"]["device"], "chat-bridge");
    assert_eq!(conflict["incoming"]["user"], "service:bridge");
    assert_eq!(conflict["server"]["device"], "pos-1");
    assert_eq!(conflict["winner"], "incoming");
    let (_, listed) = api.get("/v1/conflicts", Some(&manager(TENANT)), &[("device", "chat-bridge")]).await;
    assert_eq!(ids(&listed), vec![conflict["id"].as_i64().unwrap()]);

    // Retried with the same device_seqs: acknowledged again, applied once.
    let (status, again) = api.post(&path, Some(BRIDGE_TOKEN), &push_body("chat-bridge", batch_id, &changes)).await;
    assert_eq!(status, 200, "{again}");
    for (r, seq) in again["results"].as_array().unwrap().iter().zip(&seqs) {
        assert_eq!(r["status"], "duplicate");
        assert_eq!(r["seq"], *seq);
    }
    let logged: i64 = sqlx::query_scalar("select count(*) from synchub.change_log where tenant_id = $1 and origin_device = 'chat-bridge'")
        .bind(TENANT)
        .fetch_one(&hub.db)
        .await
        .unwrap();
    assert_eq!(logged, 2);
    // The cursor rules of a device: a gap after the cursor is rejected seq_gap.
    let gap = vec![upsert("products", key.clone(), json!({"stock": 1}), 5, now + 2, seqs[1])];
    let (status, body) = api.post(&path, Some(BRIDGE_TOKEN), &push_body("chat-bridge", Uuid::now_v7(), &gap)).await;
    assert_eq!(status, 200);
    assert_eq!(body["results"][0]["status"], "rejected");
    assert_eq!(body["results"][0]["reason"], "seq_gap");

    // Checks of a device push refuse the batch whole.
    let one = vec![upsert("products", key.clone(), json!({"stock": 1}), 3, now + 2, seqs[1])];
    assert_error(api.post(&path, Some(BRIDGE_TOKEN), &push_body("chat-bridge", Uuid::now_v7(), &[])).await, 400, "invalid_batch");
    let broken = vec![one[0].clone(), upsert("products", key.clone(), json!({"stock": 2}), 5, now + 3, seqs[1])];
    assert_error(api.post(&path, Some(BRIDGE_TOKEN), &push_body("chat-bridge", Uuid::now_v7(), &broken)).await, 400, "invalid_batch");
    assert_error(api.post(&path, Some(BRIDGE_TOKEN), &push_body("console:mgr-1", Uuid::now_v7(), &one)).await, 403, "forbidden");
    assert_error(api.post(&path, Some(BRIDGE_TOKEN), &push_body("dashboard:x", Uuid::now_v7(), &one)).await, 403, "forbidden");
    assert_error(api.post(&path, Some(BRIDGE_TOKEN), &json!({"device_id": "chat-bridge"})).await, 400, "malformed_frame");
    let huge = json!({"device_id": "chat-bridge", "batch_id": Uuid::now_v7(), "changes": [], "pad": "x".repeat(70_000)});
    assert_error(api.post(&path, Some(BRIDGE_TOKEN), &huge).await, 413, "value_too_large");
    // Tokens: unknown, missing, a JWT, or one limited to other tenants.
    assert_error(api.post(&path, Some("wrong-token-0123456789"), &push_body("chat-bridge", Uuid::now_v7(), &one)).await, 401, "invalid_token");
    assert_error(api.post(&path, None, &push_body("chat-bridge", Uuid::now_v7(), &one)).await, 401, "invalid_token");
    assert_error(api.post(&path, Some(&manager(TENANT)), &push_body("chat-bridge", Uuid::now_v7(), &one)).await, 401, "invalid_token");
    assert_error(api.post(&path, Some(LIMITED_TOKEN), &push_body("chat-bridge", Uuid::now_v7(), &one)).await, 403, "forbidden");
    // None of the refused pushes moved the cursor: the next change goes in at seq 3.
    let (status, body) = api.post(&path, Some(BRIDGE_TOKEN), &push_body("chat-bridge", Uuid::now_v7(), &one)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["status"], "applied");
    // The limited token may write to its own tenant.
    let other = vec![upsert("products", json!({"id": Uuid::now_v7()}), product(Uuid::now_v7(), "Cake", 5), 1, now, 0)];
    let (status, body) = api.post(&format!("/v1/tenants/{OTHER}/push"), Some(LIMITED_TOKEN), &push_body("chat-bridge", Uuid::now_v7(), &other)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["status"], "applied");
    hub.shutdown().await;
}

#[actix_web::test]
async fn broadcast_reaches_every_session_of_the_tenant() {
    let hub = start_with_services().await;
    let api = Api::of(&hub);
    let path = format!("/v1/tenants/{TENANT}/broadcast");
    // Every screen: a device and a dashboard.
    let mut one = Dev::connect(&hub, TENANT, "pos-1").await;
    let (board, _) = Client::dashboard(&hub, TENANT, "mgr-1", "Manager").await;
    let mut two = Dev { c: board, seq: 0 };
    let _elsewhere = Dev::connect(&hub, OTHER, "pos-1").await;
    let payload = json!({"text": "Till 3 needs change", "level": 2});
    let (status, body) = api.post(&path, Some(BRIDGE_TOKEN), &json!({"channel": "alerts", "payload": payload})).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body, json!({"sessions": 2}));
    for dev in [&mut one.c, &mut two.c] {
        let (channel, got) = dev
            .expect(|f| match f {
                ServerFrame::Broadcast { channel, payload, .. } => Some((channel.clone(), payload.clone())),
                _ => None,
            })
            .await;
        assert_eq!(channel, "alerts");
        assert_eq!(got, payload);
    }
    // A tenant with nobody online.
    let (status, body) = api.post("/v1/tenants/store-9/broadcast", Some(BRIDGE_TOKEN), &json!({"channel": "alerts", "payload": 1})).await;
    assert_eq!((status, body), (202, json!({"sessions": 0})));
    // Limits and tokens.
    assert_error(api.post(&path, Some(BRIDGE_TOKEN), &json!({"channel": "", "payload": 1})).await, 400, "malformed_frame");
    assert_error(api.post(&path, Some(BRIDGE_TOKEN), &json!({"channel": "c".repeat(65), "payload": 1})).await, 400, "malformed_frame");
    assert_error(api.post(&path, Some(BRIDGE_TOKEN), &json!({"channel": "alerts", "payload": "x".repeat(2000)})).await, 413, "value_too_large");
    assert_error(api.post(&path, Some(BRIDGE_TOKEN), &json!({"channel": "alerts"})).await, 400, "malformed_frame");
    assert_error(api.post(&path, Some("nope-nope-nope-nope"), &json!({"channel": "alerts", "payload": 1})).await, 401, "invalid_token");
    assert_error(api.post(&path, Some(LIMITED_TOKEN), &json!({"channel": "alerts", "payload": 1})).await, 403, "forbidden");
    // Counted in the metrics.
    let metrics = reqwest::get(format!("http://{}/metrics", hub.addr)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("synchub_http_broadcasts_total 2\n"), "{metrics}");
    hub.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// The merge's side of it
// ---------------------------------------------------------------------------------------------

#[actix_web::test]
async fn the_group_returns_the_conflicts_it_logged_and_resolved() {
    use synchub::ids::{DeviceId, TenantId, UserId};
    use synchub::storage::apply::{ApplyLimits, BatchInput};
    use synchub::storage::conflicts::{ResolveConflict, Resolution};
    use synchub::storage::row_cache::{RowBudget, RowCache};

    let hub = TestHub::start().await;
    let store = hub.running.as_ref().unwrap().hub.store.clone();
    let tenant = TenantId::new("store-direct");
    store.tenant_head(&tenant).await.unwrap();
    let limits = ApplyLimits { max_field_bytes: 65_536, max_key_bytes: 1024, max_clock_skew_ms: 300_000 };
    let batch = |device: &str, changes: Vec<Change>| {
        BatchInput::pushed(DeviceId::new(device), UserId::new(format!("user-{device}")), Uuid::now_v7(), changes)
    };
    let id = Uuid::now_v7();
    let key = json!({"id": id});
    let now = now_ms();
    let head_before = store.tenant_head(&tenant).await.unwrap().head_seq;
    let mut conn = store.group_connection().await.unwrap();
    // The rows each group leaves are kept for the next, as a tenant actor keeps them.
    let mut cache = RowCache::new(64, RowBudget::new(64));
    // Expecting a head the tenant does not have: the group is redone with the real one.
    let expected_wrong = Some(head_before + 1000);
    let out = store
        .commit_group(&mut conn, &tenant, &[batch("pos-1", vec![upsert("products", key.clone(), product(id, "Tea", 1), 1, now - 9, 0)])], limits, expected_wrong, &mut cache)
        .await
        .unwrap();
    let v1 = out.results[0][0].seq.unwrap();
    assert_eq!((v1, out.head_seq), (head_before + 1, head_before + 1));
    assert!(out.conflicts.is_empty() && out.resolved.is_empty());
    let out = store
        .commit_group(
            &mut conn,
            &tenant,
            &[
                batch("pos-1", vec![upsert("products", key.clone(), json!({"price_cents": 2}), 2, now - 5, v1)]),
                batch("pos-2", vec![upsert("products", key.clone(), json!({"price_cents": 3, "stock": 4}), 1, now, v1)]),
            ],
            limits,
            Some(out.head_seq),
            &mut cache,
        )
        .await
        .unwrap();
    assert_eq!(out.rows_from_cache, 1, "merged into the row the first group left");
    assert_eq!(out.results[1][0].status, ChangeStatus::Conflict);
    assert_eq!(out.conflicts.len(), 1, "{:?}", out.conflicts);
    let logged = &out.conflicts[0];
    assert_eq!((logged.field.as_str(), logged.status, logged.winner.as_str()), ("price_cents", protocol::ReviewStatus::Open, "incoming"));
    assert_eq!(logged.seq, out.results[1][0].seq);
    assert_eq!(store.open_conflict_count(&tenant).await.unwrap(), 1);
    assert_eq!(store.conflict(&tenant, logged.id).await.unwrap().as_ref(), Some(logged), "the same record as the API reads");

    // Two resolutions of it in one group: the first resolves it, the second is refused;
    // the hub numbers the console device's changes.
    let version = out.results[1][0].seq.unwrap();
    let resolving = |price: i64| BatchInput {
        assign_device_seqs: true,
        resolves: Some(ResolveConflict { conflict_id: logged.id, resolution: Resolution::Value, field: "price_cents".into() }),
        ..batch("console:mgr", vec![upsert("products", key.clone(), json!({"price_cents": price}), 99, now, version)])
    };
    let out = store.commit_group(&mut conn, &tenant, &[resolving(7), resolving(8)], limits, None, &mut cache).await.unwrap();
    assert_eq!(out.results[0][0].status, ChangeStatus::Applied);
    assert_eq!(out.results[0][0].device_seq, 1);
    assert_eq!(out.results[1][0].status, ChangeStatus::Rejected);
    assert_eq!(out.results[1][0].reason, Some(protocol::ErrorCode::ConflictNotOpen));
    assert_eq!(out.results[1][0].device_seq, 2);
    assert!(out.conflicts.is_empty());
    assert_eq!(out.resolved.len(), 1);
    let resolved = &out.resolved[0];
    assert_eq!((resolved.id, resolved.status), (logged.id, protocol::ReviewStatus::Resolved));
    assert_eq!(resolved.resolution.as_deref(), Some("value"));
    assert_eq!(resolved.resolution_seq, out.results[0][0].seq);
    assert_eq!(resolved.reviewed_by.as_deref(), Some("user-console:mgr"));
    assert_eq!(store.open_conflict_count(&tenant).await.unwrap(), 0);
    let price: i32 = sqlx::query_scalar("select price_cents from products where id = $1").bind(id).fetch_one(&hub.db).await.unwrap();
    assert_eq!(price, 7);

    // The count follows other SQL clients' writes to the conflicts too: reopened, dismissed,
    // reopened, deleted.
    let mut expected = Vec::new();
    let mut counted = Vec::new();
    for (sql, open) in [
        ("update synchub.conflicts set review_status = 'open' where conflict_id = $1", 1),
        ("update synchub.conflicts set review_status = 'dismissed' where conflict_id = $1", 0),
        ("update synchub.conflicts set review_status = 'open' where conflict_id = $1", 1),
        ("delete from synchub.conflicts where conflict_id = $1", 0),
    ] {
        sqlx::query(sql).bind(logged.id).execute(&hub.db).await.unwrap();
        expected.push(open);
        counted.push(store.open_conflict_count(&tenant).await.unwrap());
    }
    assert_eq!(counted, expected);
    hub.shutdown().await;
}

/// The count of a tenant's open conflicts (which conflict news and the review API report)
/// follows every statement on the conflicts table, the hub's and any other SQL client's:
/// several rows at once, other statuses, a conflict moved to another tenant, deletes.
#[actix_web::test]
async fn the_open_conflict_count_follows_every_statement_on_the_conflicts_table() {
    let hub = TestHub::start().await;
    let db = &hub.db;
    sqlx::query("insert into synchub.tenants (tenant_id) values ('count-a'), ('count-b') on conflict do nothing").execute(db).await.unwrap();
    let counted = || async {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "select t.tenant_id, t.open_conflicts, (select count(*) from synchub.conflicts c where c.tenant_id = t.tenant_id and review_status = 'open') \
             from synchub.tenants t where t.tenant_id in ('count-a', 'count-b') order by 1",
        )
        .fetch_all(db)
        .await
        .unwrap();
        for (tenant, kept, actual) in &rows {
            assert_eq!(kept, actual, "{tenant}");
        }
        rows.into_iter().map(|(_, kept, _)| kept).collect::<Vec<_>>()
    };
    let insert = "insert into synchub.conflicts (tenant_id, table_name, pk, field, base_version, server_version, server_hlc, \
         server_device, incoming_hlc, incoming_device, winner, policy, change_id, batch_id, review_status) \
         select tenant, 'products', jsonb_build_object('id', i), 'price', 0, 1, '[1, 0]', 'd1', '[2, 0]', 'd2', 'incoming', 'lww', \
           gen_random_uuid(), gen_random_uuid(), status \
         from (values ('count-a', 'open'), ('count-a', 'open'), ('count-a', 'open'), ('count-a', 'dismissed'), \
           ('count-b', 'open'), ('count-b', 'open')) v(tenant, status), generate_series(1, 2) i";
    sqlx::query(insert).execute(db).await.unwrap();
    assert_eq!(counted().await, vec![6, 4]);
    // Nothing inserted: nothing counted.
    sqlx::query(&format!("{insert} where false")).execute(db).await.unwrap();
    assert_eq!(counted().await, vec![6, 4]);

    // Two of a's resolved, a dismissed one reopened, one of b's moved to a.
    sqlx::query(
        "update synchub.conflicts set review_status = 'resolved' where conflict_id in \
           (select conflict_id from synchub.conflicts where tenant_id = 'count-a' and review_status = 'open' order by conflict_id limit 2)",
    )
    .execute(db)
    .await
    .unwrap();
    sqlx::query("update synchub.conflicts set review_status = 'open' where tenant_id = 'count-a' and review_status = 'dismissed'").execute(db).await.unwrap();
    sqlx::query("update synchub.conflicts set tenant_id = 'count-a' where conflict_id = (select min(conflict_id) from synchub.conflicts where tenant_id = 'count-b')")
        .execute(db)
        .await
        .unwrap();
    assert_eq!(counted().await, vec![7, 3]);
    // An update that changes no status moves no count.
    sqlx::query("update synchub.conflicts set review_status = review_status where tenant_id = 'count-b'").execute(db).await.unwrap();
    assert_eq!(counted().await, vec![7, 3]);

    sqlx::query("delete from synchub.conflicts where tenant_id = 'count-a' and (review_status <> 'open' or conflict_id % 2 = 0)").execute(db).await.unwrap();
    sqlx::query("delete from synchub.conflicts where tenant_id = 'count-b'").execute(db).await.unwrap();
    let left = counted().await;
    assert_eq!(left[1], 0);
    assert!(left[0] > 0 && left[0] < 7, "{left:?}");
    hub.shutdown().await;
}

#[actix_web::test]
async fn a_dismissal_writes_nothing_and_is_recorded_and_told() {
    let hub = TestHub::start().await;
    let api = Api::of(&hub);
    let mgr = manager(TENANT);
    let mut a = Dev::connect(&hub, TENANT, "pos-1").await;
    let mut b = Dev::connect(&hub, TENANT, "pos-2").await;
    let mut board = conflicts_board(&hub).await;
    let (key, _) = price_conflict(&mut a, &mut b, 200, 300, true).await;
    let conflict = conflict_of(&api, TENANT, &key).await;
    let id = conflict["id"].as_i64().unwrap();
    assert_eq!(next_conflict_news(&mut board).await.2, 1, "opened");
    let (_, before) = api.get(&format!("/v1/conflicts/{id}"), Some(&mgr), &[]).await;

    let (status, dismissed) = api.post(&format!("/v1/conflicts/{id}/resolve"), Some(&mgr), &json!({"action": "dismiss"})).await;
    assert_eq!(status, 200, "{dismissed}");
    let record = &dismissed["conflict"];
    assert_eq!((record["status"].as_str(), record["reviewed_by"].as_str()), (Some("dismissed"), Some("mgr-1")));
    assert!(record["reviewed_at"].is_string());
    assert_eq!((&record["resolution_seq"], record.get("resolved_value")), (&Value::Null, None), "nothing written: {record}");
    let (event, told, open) = next_conflict_news(&mut board).await;
    assert_eq!((event, told.id, told.status, open), (protocol::ConflictEvent::Resolved, id, protocol::ReviewStatus::Dismissed, 0));
    let (_, after) = api.get(&format!("/v1/conflicts/{id}"), Some(&mgr), &[]).await;
    assert_eq!(after["current"], before["current"], "the row and its version are as they were");
    let (_, counts) = api.get("/v1/conflicts/counts", Some(&mgr), &[]).await;
    assert_eq!(counts, json!({"open": 0, "resolved": 0, "dismissed": 1}));
    let (_, listed) = api.get("/v1/conflicts", Some(&mgr), &[("status", "dismissed")]).await;
    assert_eq!(ids(&listed), vec![id]);

    // A dismissed conflict is no longer open: neither dismissed nor resolved again.
    for body in [json!({"action": "dismiss"}), json!({"action": "keep"})] {
        assert_error(api.post(&format!("/v1/conflicts/{id}/resolve"), Some(&mgr), &body).await, 409, "conflict_not_open");
    }
    hub.shutdown().await;
}

#[actix_web::test]
async fn a_resolution_based_on_a_value_that_changed_is_refused_and_writes_nothing() {
    let hub = TestHub::start().await;
    let api = Api::of(&hub);
    let mgr = manager(TENANT);
    let mut a = Dev::connect(&hub, TENANT, "pos-1").await;
    let mut b = Dev::connect(&hub, TENANT, "pos-2").await;
    let (key, version) = price_conflict(&mut a, &mut b, 200, 300, true).await; // incoming (300) won
    let id = conflict_of(&api, TENANT, &key).await["id"].as_i64().unwrap();
    // The field moves on after the conflict: 300 → 270, by another write.
    let moved = a.upsert("products", key.clone(), json!({"price_cents": 270}), now_ms(), version).await;
    assert_eq!(moved.status, ChangeStatus::Applied, "{moved:?}");
    let head = head_of(&hub, TENANT).await;

    // "Keep 300" now would overwrite 270: refused, nothing written, the conflict stays open.
    for body in [json!({"action": "keep"}), json!({"action": "take_other"}), json!({"action": "value", "value": 1}), json!({"action": "keep", "expected": 300})] {
        let (status, refused) = api.post(&format!("/v1/conflicts/{id}/resolve"), Some(&mgr), &body).await;
        assert_eq!((status, refused["code"].as_str()), (409, Some("stale_conflict")), "{body}: {refused}");
        assert!(refused["message"].as_str().is_some_and(|m| m.contains("price_cents")), "{refused}");
    }
    assert_eq!(head_of(&hub, TENANT).await, head, "nothing was written");
    let (_, current) = api.get(&format!("/v1/conflicts/{id}"), Some(&mgr), &[]).await;
    assert_eq!((current["conflict"]["status"].as_str(), &current["current"]["row"]["price_cents"]), (Some("open"), &json!(270)));
    let (_, counts) = api.get("/v1/conflicts/counts", Some(&mgr), &[]).await;
    assert_eq!(counts["open"], 1, "no conflict was logged by the refusals: {counts}");

    // Based on what the manager now sees (270), keeping the winner writes it.
    let (status, resolved) = api.post(&format!("/v1/conflicts/{id}/resolve"), Some(&mgr), &json!({"action": "keep", "expected": 270})).await;
    assert_eq!(status, 200, "{resolved}");
    assert!(resolved["result"]["seq"].as_u64().is_some(), "written: {resolved}");
    assert_eq!(resolved["conflict"]["resolved_value"], 300);
    let (_, after) = api.get(&format!("/v1/conflicts/{id}"), Some(&mgr), &[]).await;
    assert_eq!(after["current"]["row"]["price_cents"], 300);
    hub.shutdown().await;
}

#[actix_web::test]
async fn every_matching_conflict_downloads_as_csv() {
    let hub = TestHub::start_with(|config| {
        // Pages of 2, so the export reads several; at most 3 rows in one file.
        config.conflict_page_default = 2;
        config.conflict_page_max = 2;
        config.conflict_export_max_rows = 3;
    })
    .await;
    let api = Api::of(&hub);
    let mgr = manager(TENANT);
    let mut a = Dev::connect(&hub, TENANT, "pos-1").await;
    let mut b = Dev::connect(&hub, TENANT, "pos-2").await;
    // Three conflicts; the last one's losing name would run as a formula in a spreadsheet.
    price_conflict(&mut a, &mut b, 200, 300, true).await;
    price_conflict(&mut a, &mut b, 400, 500, false).await;
    let id = Uuid::now_v7();
    let key = json!({"id": id});
    let now = now_ms();
    let v1 = a.upsert("products", key.clone(), product(id, "Tea", 100), now - 5_000, 0).await.seq.unwrap();
    a.upsert("products", key.clone(), json!({"name": "Green tea"}), now - 1_000, v1).await;
    let r = b.upsert("products", key.clone(), json!({"name": "=HYPERLINK(\"http://x\",\"y\")"}), now - 3_000, v1).await;
    assert_eq!(r.status, ChangeStatus::Conflict);
    // Another tenant's conflict is never in the file.
    let mut x = Dev::connect(&hub, OTHER, "pos-1").await;
    let mut y = Dev::connect(&hub, OTHER, "pos-2").await;
    price_conflict(&mut x, &mut y, 1, 2, true).await;

    let export = |query: Vec<(&'static str, &'static str)>| {
        let request = api.http.get(format!("{}/v1/conflicts/export.csv", api.base)).query(&query).bearer_auth(&mgr);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_string());
            (status, content_type, response.text().await.unwrap())
        }
    };
    let (status, content_type, text) = export(vec![("status", "open")]).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(content_type.as_deref(), Some("text/csv; charset=utf-8"));
    let lines: Vec<&str> = text.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert_eq!(lines[0], synchub::http::conflicts_csv::COLUMNS.join(","));
    assert_eq!(lines.len(), 4, "the header and three conflicts over two pages:\n{text}");
    let listed: Vec<i64> = lines[1..].iter().map(|l| l.split(',').next().unwrap().parse().unwrap()).collect();
    assert!(listed.windows(2).all(|w| w[0] > w[1]), "newest first: {listed:?}");
    assert!(lines[1].contains("\"'=HYPERLINK(\"\"http://x\"\",\"\"y\"\")\""), "a formula from a device is defused: {}", lines[1]);
    assert!(lines[1].contains(",products,") && lines[1].contains(",pos-2,"), "{}", lines[1]);
    assert!(lines[1].ends_with(",Green tea") && lines[2].ends_with(",Tea"), "the rows' labels come last:\n{text}");

    // Filters as the list's; paging is the export's own business.
    let (_, _, text) = export(vec![("status", "resolved")]).await;
    assert_eq!(text.split("\r\n").filter(|l| !l.is_empty()).count(), 1, "only the header: {text}");
    assert_error(api.get("/v1/conflicts/export.csv", Some(&mgr), &[("limit", "1")]).await, 400, "invalid_filter");
    assert_error(api.get("/v1/conflicts/export.csv", Some(&mgr), &[("since", "2024-02-31T00:00:00Z")]).await, 400, "invalid_filter");
    assert_error(api.get("/v1/conflicts/export.csv", Some(&token(TENANT, "emp", "Employee", None)), &[]).await, 403, "forbidden");
    // One more conflict than conflict_export_max_rows: refused, naming the setting.
    price_conflict(&mut a, &mut b, 600, 700, true).await;
    let (status, body) = api.get("/v1/conflicts/export.csv", Some(&mgr), &[]).await;
    assert_error((status, body.clone()), 400, "invalid_filter");
    assert!(body["message"].as_str().unwrap().contains("conflict_export_max_rows"), "{body}");
    hub.shutdown().await;
}

#[actix_web::test]
async fn many_conflicts_are_reviewed_at_once_each_still_conditional() {
    let hub = TestHub::start_with(|config| config.conflict_bulk_max = 3).await;
    let api = Api::of(&hub);
    let mgr = manager(TENANT);
    let mut a = Dev::connect(&hub, TENANT, "pos-1").await;
    let mut b = Dev::connect(&hub, TENANT, "pos-2").await;
    // Three conflicts on prices; the second's price moves on afterwards, so keeping what the
    // conflict left there is refused.
    let (k1, _) = price_conflict(&mut a, &mut b, 200, 300, true).await;
    let (k2, v2) = price_conflict(&mut a, &mut b, 400, 500, true).await;
    let (k3, _) = price_conflict(&mut a, &mut b, 600, 700, true).await;
    let moved = a.upsert("products", k2.clone(), json!({"price_cents": 450}), now_ms(), v2).await;
    assert_eq!(moved.status, ChangeStatus::Applied);
    let id = |key: &Value| {
        let api = &api;
        let key = key.clone();
        async move { conflict_of(api, TENANT, &key).await["id"].as_i64().unwrap() }
    };
    let (c1, c2, c3) = (id(&k1).await, id(&k2).await, id(&k3).await);
    // Another tenant's conflict id is not found, and does not stop the others.
    let mut x = Dev::connect(&hub, OTHER, "pos-1").await;
    let mut y = Dev::connect(&hub, OTHER, "pos-2").await;
    let (kx, _) = price_conflict(&mut x, &mut y, 1, 2, true).await;
    let foreign = conflict_of(&api, OTHER, &kx).await["id"].as_i64().unwrap();

    let (status, body) = api.post("/v1/conflicts/resolve", Some(&mgr), &json!({"action": "keep", "ids": [c1, c2, foreign]})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!((body["applied"].as_u64(), body["refused"].as_u64()), (Some(1), Some(2)), "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results[0]["id"], json!(c1));
    assert_eq!((results[0]["applied"].clone(), results[0]["conflict"]["status"].clone()), (json!(true), json!("resolved")));
    assert_eq!((results[1]["applied"].clone(), results[1]["code"].clone()), (json!(false), json!("stale_conflict")), "{body}");
    assert_eq!(results[2]["code"], json!("not_found"), "{body}");
    let price: i32 = sqlx::query_scalar("select price_cents from products where tenant_id = $1 and id = $2")
        .bind(TENANT)
        .bind(Uuid::parse_str(k2["id"].as_str().unwrap()).unwrap())
        .fetch_one(&hub.db)
        .await
        .unwrap();
    assert_eq!(price, 450, "the refused one wrote nothing");
    let (_, other_tenant) = api.get(&format!("/v1/conflicts/{foreign}"), Some(&manager(OTHER)), &[]).await;
    assert_eq!(other_tenant["conflict"]["status"], json!("open"), "another tenant's conflict untouched");

    // Every open one a filter matches: c2 and c3, dismissed.
    let (status, body) = api.post("/v1/conflicts/resolve", Some(&mgr), &json!({"action": "dismiss", "filter": {"status": "open", "table": "products"}})).await;
    assert_eq!(status, 200, "{body}");
    let done: Vec<i64> = body["results"].as_array().unwrap().iter().filter(|r| r["applied"] == json!(true)).map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(done, vec![c3, c2], "newest first");
    let (_, counts) = api.get("/v1/conflicts/counts", Some(&mgr), &[]).await;
    assert_eq!((counts["open"].as_u64(), counts["resolved"].as_u64(), counts["dismissed"].as_u64()), (Some(0), Some(1), Some(2)));

    // Refused as a whole: a bad action, both or neither of ids and filter, more than
    // conflict_bulk_max, another role.
    assert_error(api.post("/v1/conflicts/resolve", Some(&mgr), &json!({"action": "value", "ids": [c1]})).await, 400, "invalid_batch");
    assert_error(api.post("/v1/conflicts/resolve", Some(&mgr), &json!({"action": "keep"})).await, 400, "invalid_batch");
    assert_error(api.post("/v1/conflicts/resolve", Some(&mgr), &json!({"action": "keep", "ids": [c1], "filter": {}})).await, 400, "invalid_batch");
    assert_error(api.post("/v1/conflicts/resolve", Some(&mgr), &json!({"action": "keep", "ids": [1, 2, 3, 4]})).await, 400, "invalid_batch");
    assert_error(api.post("/v1/conflicts/resolve", Some(&mgr), &json!({"action": "keep", "filter": {"limit": 1}})).await, 400, "invalid_filter");
    assert_error(
        api.post("/v1/conflicts/resolve", Some(&token(TENANT, "emp", "Employee", None)), &json!({"action": "keep", "ids": [c1]})).await,
        403,
        "forbidden",
    );
    hub.shutdown().await;
}

/// A conflict on `field` of a new product named `name`: `a` writes `a_value`, then `b`, which saw
/// only the creation, writes `b_value` with an earlier clock.
async fn field_conflict(a: &mut Dev, b: &mut Dev, name: &str, field: &str, a_value: i64, b_value: i64) -> Value {
    let id = Uuid::now_v7();
    let key = json!({"id": id});
    let now = now_ms();
    let v1 = a.upsert("products", key.clone(), product(id, name, 100), now - 5_000, 0).await.seq.expect("created");
    assert_eq!(a.upsert("products", key.clone(), json!({ field: a_value }), now - 1_000, v1).await.status, ChangeStatus::Applied);
    let r = b.upsert("products", key.clone(), json!({ field: b_value }), now - 3_000, v1).await;
    assert_eq!(r.status, ChangeStatus::Conflict, "{r:?}");
    key
}

#[actix_web::test]
async fn conflicts_carry_their_row_label_and_are_found_by_label_user_and_field() {
    let hub = TestHub::start().await;
    let api = Api::of(&hub);
    let mgr = manager(TENANT);
    let mut a = Dev::connect(&hub, TENANT, "pos-1").await;
    let mut b = Dev::connect(&hub, TENANT, "pos-2").await;
    let tea = field_conflict(&mut a, &mut b, "Green Tea", "price_cents", 200, 300).await;
    let beans = field_conflict(&mut a, &mut b, "Coffee beans", "stock", 5, 7).await;
    // The demo config labels products by name.
    let listed = |body: &Value| -> Vec<(Value, Value)> {
        body["conflicts"].as_array().unwrap().iter().map(|c| (c["key"].clone(), c["row_label"].clone())).collect()
    };
    let (status, all) = api.get("/v1/conflicts", Some(&mgr), &[]).await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(listed(&all), vec![(beans.clone(), json!("Coffee beans")), (tea.clone(), json!("Green Tea"))]);
    let search = |query: Vec<(&'static str, &'static str)>| {
        let (api, mgr) = (&api, &mgr);
        async move {
            let (status, body) = api.get("/v1/conflicts", Some(mgr), &query).await;
            assert_eq!(status, 200, "{query:?}: {body}");
            listed(&body).into_iter().map(|(key, _)| key).collect::<Vec<_>>()
        }
    };
    // Search by label: part of it, in any case.
    assert_eq!(search(vec![("label", "TEA")]).await, vec![tea.clone()]);
    assert_eq!(search(vec![("label", "beans")]).await, vec![beans.clone()]);
    assert_eq!(search(vec![("label", "milk")]).await, Vec::<Value>::new());
    // By field, and by either side's user.
    assert_eq!(search(vec![("field", "stock")]).await, vec![beans.clone()]);
    assert_eq!(search(vec![("field", "price_cents"), ("label", "tea")]).await, vec![tea.clone()]);
    assert_eq!(search(vec![("user", "user-pos-2")]).await, vec![beans.clone(), tea.clone()]);
    assert_eq!(search(vec![("user", "user-pos-9")]).await, Vec::<Value>::new());
    // A NUL or an empty value is refused before the database.
    assert_error(api.get("/v1/conflicts", Some(&mgr), &[("label", "")]).await, 400, "invalid_filter");
    assert_error(api.get("/v1/conflicts", Some(&mgr), &[("user", "a\0b")]).await, 400, "invalid_filter");

    // Once the row is deleted, its label comes from its last values.
    let (_, one) = api.get("/v1/conflicts", Some(&mgr), &[("label", "tea")]).await;
    let id = one["conflicts"][0]["id"].as_i64().unwrap();
    let version = head_of(&hub, TENANT).await as u64;
    assert!(a.delete("products", tea.clone(), now_ms(), version).await.seq.is_some());
    let (status, conflict) = api.get(&format!("/v1/conflicts/{id}"), Some(&mgr), &[]).await;
    assert_eq!(status, 200, "{conflict}");
    assert_eq!(conflict["conflict"]["row_label"], json!("Green Tea"), "{conflict}");
    assert_eq!(search(vec![("label", "green")]).await, vec![tea.clone()]);

    // Another tenant's rows never label or match this tenant's conflicts.
    let mut x = Dev::connect(&hub, OTHER, "pos-1").await;
    let mut y = Dev::connect(&hub, OTHER, "pos-2").await;
    field_conflict(&mut x, &mut y, "Coffee beans", "stock", 1, 2).await;
    assert_eq!(search(vec![("label", "beans")]).await, vec![beans.clone()]);
    hub.shutdown().await;
}

#[actix_web::test]
async fn the_catalog_offers_real_columns_with_labels_and_formats() {
    let hub = TestHub::start_with(|config| config.console_currency = "EUR".into()).await;
    let api = Api::of(&hub);
    let (status, body) = api.get("/v1/catalog", Some(&manager(TENANT)), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["currency"], json!("EUR"));
    let tables = body["tables"].as_array().unwrap();
    let names: Vec<&str> = tables.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["customers", "order_lines", "orders", "products"]);
    let products = &tables[3];
    assert_eq!(products["key"], json!(["id"]));
    assert_eq!(products["tenant_column"], json!("tenant_id"));
    assert_eq!(products["label_column"], json!("name"));
    assert_eq!(products["formats"], json!({"price_cents": "money_cents", "updated_at": "local_time"}));
    let columns: Vec<(&str, &str)> =
        products["columns"].as_array().unwrap().iter().map(|c| (c["name"].as_str().unwrap(), c["type"].as_str().unwrap())).collect();
    assert!(columns.contains(&("stock", "integer")) && columns.contains(&("updated_at", "timestamp with time zone")), "{columns:?}");
    assert!(!columns.iter().any(|(name, _)| *name == "tenant_id"), "the tenant column is the token's: {columns:?}");
    assert_eq!(tables[1]["label_column"], Value::Null);
    let (status, for_employee) = api.get("/v1/catalog", Some(&token(TENANT, "emp", "Employee", None)), &[]).await;
    assert_eq!((status, &for_employee), (200, &body), "every role reads the same catalog");
    assert_error(api.get("/v1/catalog", None, &[]).await, 401, "invalid_token");
    hub.shutdown().await;
}

#[actix_web::test]
async fn a_label_or_format_of_a_column_the_table_lacks_stops_the_start() {
    for (label, format) in [(Some("nmae"), None), (None, Some("price"))] {
        let mut config = test_config(fresh_database().await);
        let products = config.tables.iter_mut().find(|t| t.name == "products").unwrap();
        products.label_column = label.map(String::from);
        products.formats = format.map(|c| (c.to_string(), synchub::config::ColumnFormat::MoneyCents)).into_iter().collect();
        let err = synchub::server::start(config).await.err().expect("the hub refuses to start");
        let named = label.or(format).unwrap();
        assert!(err.to_string().contains(&format!("`{named}`")) && err.to_string().contains("products"), "{err}");
    }
}
