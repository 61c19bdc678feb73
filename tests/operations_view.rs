//! The operations view (`GET /v1/operations` and the console's Operations view) against a real
//! hub, real Postgres and real sockets: devices connect, push and disconnect, and the view shows
//! who is online, when each device was last seen, the position it has and its lag behind the
//! head, its last push, and the last 24 hours of changes and conflicts; only managers of the
//! tenant see it (a device's token is refused), within the API's rate limit. The browser test
//! (tests/browser/operations.mjs, set up as tests/console_browser.rs does) signs in as a manager,
//! opens the view with the keyboard, checks the device rows and both charts, and keeps a
//! screenshot at `target/operations-view.png`.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::browser::{echo_and_keep, ensure_browser_tools, repo, target_dir, CHROMIUM};
use common::*;
use protocol::{ChangeStatus, Position};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use uuid::Uuid;

const TENANT: &str = "store-ops";
const OTHER: &str = "store-elsewhere";
/// The whole browser run, from launch to the last check.
const BROWSER_RUN: Duration = Duration::from_secs(180);

/// `GET /v1/operations` of a test hub.
trait OperationsApi {
    async fn operations(&self, token: Option<&str>) -> (u16, Value);
    async fn operations_when(&self, token: &str, what: &str, ready: impl Fn(&Value) -> bool) -> Value;
}

impl OperationsApi for Api {
    async fn operations(&self, token: Option<&str>) -> (u16, Value) {
        self.get("/v1/operations", token, &[]).await
    }

    /// The view once `ready` holds for it (status writes happen in the background).
    async fn operations_when(&self, token: &str, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (status, body) = self.operations(Some(token)).await;
            assert_eq!(status, 200, "{body}");
            if ready(&body) {
                return body;
            }
            assert!(tokio::time::Instant::now() < deadline, "{what} within {WAIT:?}; the view says {body:#}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn manager(tenant: &str) -> String {
    token(tenant, "mgr-ops", "Manager", None)
}

fn device<'v>(view: &'v Value, id: &str) -> &'v Value {
    view["devices"].as_array().expect("devices").iter().find(|d| d["device_id"] == id).unwrap_or_else(|| panic!("no {id} in {view:#}"))
}

fn seconds_ago(rfc3339: &Value) -> i64 {
    let at = chrono::DateTime::parse_from_rfc3339(rfc3339.as_str().expect("a time")).expect("RFC 3339");
    (now_ms() as i64 - at.timestamp_millis()) / 1000
}

async fn close(mut c: Client) {
    use futures_util::SinkExt;
    let _ = c.ws.close(None).await;
    let _ = c.ws.flush().await;
    // Read to the end so the hub's close is seen.
    while c.recv_timeout(Duration::from_millis(500)).await.is_some() {}
}

async fn head(hub: &TestHub, tenant: &str) -> u64 {
    let head: i64 = sqlx::query_scalar("select head_seq from synchub.tenants where tenant_id = $1").bind(tenant).fetch_one(&hub.db).await.unwrap();
    head as u64
}

/// Devices of `TENANT` as the view tests expect them: till-a pushed three products and left;
/// till-b stays online, pushed one product and one change that conflicts; till-c resumed from
/// seq 2 and left; till-old was last seen two days ago at seq 1. Returns the epoch and till-b.
async fn devices_at_work(hub: &TestHub, api: &Api) -> (String, Client) {
    let mgr = manager(TENANT);
    let (mut b, epoch, _) = Client::device(hub, TENANT, "till-b").await;
    let (mut a, _, _) = Client::device(hub, TENANT, "till-a").await;
    let now = now_ms();
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    for (i, id) in ids.iter().enumerate() {
        let result = a.push(vec![upsert("products", json!({"id": id}), product(*id, "Espresso", 250 + i as i64), i as u64 + 1, now, 0)]).await;
        assert_eq!(result[0].status, ChangeStatus::Applied, "{result:?}");
    }
    // B sees all three live; A's session has moved its position past its own changes by then.
    let mut seen = 0;
    while seen < 3 {
        let (deltas, _) = b.next_deltas().await;
        seen += deltas.len();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    close(a).await;
    let view = api
        .operations_when(&mgr, "till-a offline at seq 3", |v| {
            v["devices"].as_array().is_some_and(|ds| ds.iter().any(|d| d["device_id"] == "till-a" && d["online"] == false && d["position"] == 3))
        })
        .await;
    assert_eq!(device(&view, "till-b")["online"], true);

    // B, offline since before A's first product, writes its price with an older clock: a
    // conflict. Then a product of its own.
    let lost = b.push(vec![upsert("products", json!({"id": ids[0]}), json!({"price_cents": 199}), 1, now - 60_000, 0)]).await;
    assert_eq!(lost[0].status, ChangeStatus::Conflict, "{lost:?}");
    let own = Uuid::new_v4();
    let applied = b.push(vec![upsert("products", json!({"id": own}), product(own, "Cortado", 320), 2, now_ms(), 0)]).await;
    assert_eq!(applied[0].status, ChangeStatus::Applied, "{applied:?}");

    // A device last seen two days ago, at seq 1.
    sqlx::query(
        "insert into synchub.device_status (tenant_id, device_id, user_id, last_seen_at, last_position) \
         values ($1, 'till-old', 'user-till-old', now() - interval '2 days', 1)",
    )
    .bind(TENANT)
    .execute(&hub.db)
    .await
    .unwrap();
    // Another tenant's device, which this tenant's view never shows.
    let (elsewhere, _, _) = Client::device(hub, OTHER, "till-elsewhere").await;
    close(elsewhere).await;
    (epoch, b)
}

#[actix_web::test]
async fn the_view_shows_devices_their_positions_lag_and_the_last_day_by_hour() {
    let hub = TestHub::start().await;
    let api = Api::of(&hub);
    let mgr = manager(TENANT);
    let (epoch, _till_b) = devices_at_work(&hub, &api).await;

    // C resumes from seq 2: while online its position is where it resumed from.
    let mut c = hub.client().await;
    c.hello(&token(TENANT, "user-till-c", "Employee", Some("till-c")), None, Some(Position { epoch: epoch.clone(), seq: 2 })).await;
    let (_, caught_up) = c.until_up_to_date().await;
    let head_now = head(&hub, TENANT).await;
    assert_eq!(caught_up, head_now);
    let view = api
        .operations_when(&mgr, "till-c online from seq 2", |v| {
            v["devices"].as_array().is_some_and(|ds| ds.iter().any(|d| d["device_id"] == "till-c" && d["position"] == 2))
        })
        .await;
    let till_c = device(&view, "till-c");
    assert_eq!(till_c["online"], true);
    assert_eq!(till_c["lag"], head_now - 2);
    assert!(seconds_ago(&till_c["last_seen"]) <= 1, "online: last seen now: {till_c}");
    // A dashboard (like the console's own socket) is no device.
    let (_dashboard, _) = Client::dashboard(&hub, TENANT, "mgr-ops", "Manager").await;
    close(c).await;

    let view = api
        .operations_when(&mgr, "till-c offline at the head", |v| {
            v["devices"].as_array().is_some_and(|ds| ds.iter().any(|d| d["device_id"] == "till-c" && d["online"] == false && d["position"] == head_now))
        })
        .await;
    let head_seq = head(&hub, TENANT).await;
    assert_eq!(view["head_seq"], head_seq, "{view:#}");
    assert_eq!(head_seq, head_now, "nothing written since");
    let ids: Vec<&str> = view["devices"].as_array().unwrap().iter().map(|d| d["device_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["till-a", "till-b", "till-c", "till-old"], "the tenant's devices by id; no dashboard, no other tenant's");
    assert_eq!(view["online"], 1, "only till-b is online: {view:#}");

    let a = device(&view, "till-a");
    assert_eq!((a["online"].clone(), a["position"].clone(), a["lag"].clone()), (json!(false), json!(3), json!(head_seq - 3)), "{a}");
    assert_eq!(a["user_id"], "user-till-a");
    assert_eq!(a["last_device_seq"], 3);
    assert!((0..60).contains(&seconds_ago(&a["last_seen"])), "{a}");
    assert!((0..60).contains(&seconds_ago(&a["last_push"])), "{a}");

    let b = device(&view, "till-b");
    assert_eq!(b["online"], true, "{b}");
    assert!(seconds_ago(&b["last_seen"]) <= 1, "online: last seen now: {b}");
    assert_eq!(b["last_device_seq"], 2, "{b}");
    assert_eq!(b["position"], 0, "till-b resumed from the start: {b}");
    assert_eq!(b["lag"], head_seq, "{b}");

    let c = device(&view, "till-c");
    assert_eq!((c["position"].clone(), c["lag"].clone()), (json!(head_seq), json!(0)), "at the head when it left: {c}");
    assert!(c["last_push"].is_null() && c["last_device_seq"] == 0, "till-c never pushed: {c}");
    // Its status is a table of its own: a device that never pushed has no cursor.
    let cursors: i64 = sqlx::query_scalar("select count(*) from synchub.device_cursors where tenant_id = $1 and device_id = 'till-c'")
        .bind(TENANT)
        .fetch_one(&hub.db)
        .await
        .unwrap();
    assert_eq!(cursors, 0);

    let old = device(&view, "till-old");
    assert_eq!((old["online"].clone(), old["position"].clone(), old["lag"].clone()), (json!(false), json!(1), json!(head_seq - 1)), "{old}");
    let days = seconds_ago(&old["last_seen"]) / 86_400;
    assert_eq!(days, 2, "{old}");

    // 24 whole hours, oldest first, the current one last; this test's changes and conflict in them.
    let hours = view["hours"].as_array().expect("hours");
    assert_eq!(hours.len(), 24);
    let starts: Vec<i64> = hours.iter().map(|h| chrono::DateTime::parse_from_rfc3339(h["hour"].as_str().unwrap()).unwrap().timestamp_millis()).collect();
    assert!(starts.windows(2).all(|w| w[1] - w[0] == 3_600_000), "consecutive hours: {starts:?}");
    assert!(starts[0] % 3_600_000 == 0 && (0..3_600_000).contains(&(now_ms() as i64 - starts[23])), "the last is the current hour: {starts:?}");
    let sum = |key: &str| hours.iter().map(|h| h[key].as_u64().unwrap()).sum::<u64>();
    assert_eq!(sum("changes"), head_seq, "every change of the log is in its hour: {hours:?}");
    assert_eq!(sum("pushed"), head_seq, "here every change was a device's push: {hours:?}");
    let conflicts: i64 = sqlx::query_scalar("select count(*) from synchub.conflicts where tenant_id = $1").bind(TENANT).fetch_one(&hub.db).await.unwrap();
    assert!(conflicts >= 1);
    assert_eq!(sum("conflicts"), conflicts as u64, "{hours:?}");
    assert!(sum("devices") >= 2, "till-a and till-b pushed: {hours:?}");
    assert!(view["now"].is_string() && !view["devices_truncated"].as_bool().unwrap());

    // A change written by SQL is logged, but pushed by no device.
    sqlx::query("update public.products set stock = stock + 1 where tenant_id = $1 and name = 'Cortado'")
        .bind(TENANT)
        .execute(&hub.db)
        .await
        .unwrap();
    let (_, later) = api.operations(Some(&mgr)).await;
    let later_sum = |key: &str| later["hours"].as_array().unwrap().iter().map(|h| h[key].as_u64().unwrap()).sum::<u64>();
    assert_eq!((later_sum("changes"), later_sum("pushed")), (head_seq + 1, head_seq), "{later:#}");

    // The other tenant sees only its own device.
    let other = api.operations_when(&manager(OTHER), "the other tenant's device offline", |v| v["devices"][0]["online"] == false).await;
    let ids: Vec<&str> = other["devices"].as_array().unwrap().iter().map(|d| d["device_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["till-elsewhere"]);
    // Row-level security keeps the status table to one tenant, as the hub's other tables.
    let mut tx = hub.db.begin().await.unwrap();
    sqlx::query("select set_config('synchub.tenant', $1, true)").bind(OTHER).execute(&mut *tx).await.unwrap();
    let visible: Vec<String> = sqlx::query_scalar("select tenant_id from synchub.device_status").fetch_all(&mut *tx).await.unwrap();
    assert!(visible.iter().filter(|t| *t == TENANT).count() >= 3, "the hub's own login sees every tenant: {visible:?}");
    sqlx::query("set local role synchub_tenant").execute(&mut *tx).await.unwrap();
    let visible: Vec<String> = sqlx::query_scalar("select tenant_id from synchub.device_status").fetch_all(&mut *tx).await.unwrap();
    assert_eq!(visible, [OTHER], "as the tenant role, only synchub.tenant's rows");
    tx.rollback().await.unwrap();
    hub.shutdown().await;
}

#[actix_web::test]
async fn only_managers_see_operations_within_the_rate_limit() {
    let hub = TestHub::start_with(|c| {
        c.tenant_http_rate = 1;
        c.tenant_http_burst = 3;
    })
    .await;
    let api = Api::of(&hub);
    let (status, body) = api.operations(None).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("invalid_token")), "{body}");
    let till = token(TENANT, "user-till-a", "Employee", Some("till-a"));
    let (status, body) = api.operations(Some(&till)).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")), "a device's token: {body}");
    let (status, body) = api.operations(Some(&manager(TENANT))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!((body["head_seq"].clone(), body["devices"].clone(), body["online"].clone()), (json!(0), json!([]), json!(0)), "a new tenant: {body}");
    // The device's request counted too: the burst of three is spent within a few more.
    let mut answers = Vec::new();
    for _ in 0..4 {
        let (status, body) = api.operations(Some(&manager(TENANT))).await;
        answers.push((status, body["code"].clone()));
        if status == 429 {
            break;
        }
    }
    assert_eq!(answers.last(), Some(&(429, json!("rate_limited"))), "{answers:?}");
    hub.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// In the browser
// ---------------------------------------------------------------------------------------------




#[actix_web::test]
async fn the_device_list_stops_at_its_limit_and_says_so() {
    let hub = TestHub::start_with(|c| c.operations_max_devices = 2).await;
    let api = Api::of(&hub);
    for device in ["till-1", "till-2", "till-3"] {
        sqlx::query("insert into synchub.device_status (tenant_id, device_id, user_id, last_seen_at, last_position) values ($1, $2, 'u', now(), 0)")
            .bind(TENANT)
            .bind(device)
            .execute(&hub.db)
            .await
            .unwrap();
    }
    let (status, view) = api.operations(Some(&manager(TENANT))).await;
    assert_eq!(status, 200, "{view}");
    let listed: Vec<&str> = view["devices"].as_array().unwrap().iter().map(|d| d["device_id"].as_str().unwrap()).collect();
    assert_eq!((listed, &view["devices_truncated"]), (vec!["till-1", "till-2"], &json!(true)));
    hub.shutdown().await;
}

#[actix_web::test]
async fn a_manager_reads_the_operations_view_in_the_browser() {
    ensure_browser_tools("the operations view test");
    let hub = TestHub::start_with(|c| c.heartbeat_timeout_ms = 600_000).await;
    let api = Api::of(&hub);
    let (_, _till_b) = devices_at_work(&hub, &api).await;

    let screenshot = target_dir().join("operations-view.png");
    std::fs::create_dir_all(target_dir()).unwrap();
    let _ = std::fs::remove_file(&screenshot);
    let conflicts: i64 = sqlx::query_scalar("select count(*) from synchub.conflicts where tenant_id = $1").bind(TENANT).fetch_one(&hub.db).await.unwrap();
    let mut node = tokio::process::Command::new("node")
        .arg(repo().join("tests/browser/operations.mjs"))
        .current_dir(repo().join("tests/browser"))
        .env("CONSOLE_URL", format!("http://{}", hub.addr))
        .env("CONSOLE_TOKEN", manager(TENANT))
        .env("OPERATIONS_SCREENSHOT", &screenshot)
        .env("CHROMIUM", CHROMIUM)
        .env("E2E_ONLINE", "till-b")
        .env("E2E_OFFLINE", "till-a")
        .env("E2E_NOT_TODAY", "till-old")
        .env("E2E_CHANGES", head(&hub, TENANT).await.to_string())
        .env("E2E_CONFLICTS", conflicts.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node starts (tests/browser/operations.mjs)");
    let mut lines = BufReader::new(node.stdout.take().unwrap()).lines();
    let stderr_text = echo_and_keep(node.stderr.take().unwrap());
    let deadline = tokio::time::Instant::now() + BROWSER_RUN;
    let mut output = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, lines.next_line()).await {
            Ok(Ok(Some(line))) => {
                eprintln!("{line}");
                output.push(line);
            }
            Ok(_) => break,
            Err(_) => {
                let _ = node.kill().await;
                panic!("the browser run took longer than {BROWSER_RUN:?}; its output:\n{}", output.join("\n"));
            }
        }
    }
    let status = tokio::time::timeout_at(deadline, node.wait()).await.expect("node exits").expect("node runs");
    let errors = stderr_text.await.unwrap();
    assert!(status.success(), "the browser run failed ({status}):\n{errors}\nscreenshot: {}\nits output:\n{}", screenshot.display(), output.join("\n"));
    assert!(output.iter().any(|l| l == "operations-e2e: done"), "the script did not finish: {}", output.join("\n"));
    assert!(screenshot.exists(), "no screenshot at {}", screenshot.display());
    println!("operations view screenshot: {}", screenshot.display());
    hub.shutdown().await;
}
