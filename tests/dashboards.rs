//! Dashboards: read-only sessions, table subscriptions with filters (snapshot, then live with no
//! gap and no duplicate), unsubscribe and limits, presence, and the conflicts channel.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use protocol::{Channel, ClientFrame, Condition, ErrorCode, FilterOp, Op, ServerFrame};
use serde_json::{json, Value};
use uuid::Uuid;

fn cond(column: &str, op: FilterOp, value: Value) -> Condition {
    Condition { column: column.into(), op, value }
}

fn product_with_stock(name: &str, stock: i64) -> Value {
    json!({"sku": format!("SKU-{name}"), "name": name, "price_cents": 100, "stock": stock})
}

fn name_of(row: &protocol::Object) -> String {
    row["name"].as_str().unwrap().to_string()
}

/// The operators' meaning on integers, to compute what each subscription must see.
fn holds(op: FilterOp, stock: i64) -> bool {
    match op {
        FilterOp::Eq => stock == 10,
        FilterOp::Neq => stock != 10,
        FilterOp::Lt => stock < 10,
        FilterOp::Lte => stock <= 10,
        FilterOp::Gt => stock > 10,
        FilterOp::Gte => stock >= 10,
        FilterOp::In => stock == 5 || stock == 20,
    }
}

const OPS: [FilterOp; 7] = [FilterOp::Eq, FilterOp::Neq, FilterOp::Lt, FilterOp::Lte, FilterOp::Gt, FilterOp::Gte, FilterOp::In];

fn op_condition(op: FilterOp) -> Condition {
    let value = if op == FilterOp::In { json!([5, 20]) } else { json!(10) };
    cond("stock", op, value)
}

#[actix_web::test]
async fn each_filter_operator_on_snapshot_and_live_deltas() {
    let hub = TestHub::start().await;
    let (mut device, _, _) = Client::device(&hub, "store-1", "pos-1").await;
    let stocks = [0i64, 5, 10, 15, 20];
    let changes = stocks
        .iter()
        .enumerate()
        .map(|(i, stock)| upsert("products", json!({"id": Uuid::new_v4()}), product_with_stock(&format!("old-{stock}"), *stock), i as u64 + 1, now_ms(), 0))
        .collect();
    device.push(changes).await;

    let (mut dash, _) = Client::dashboard(&hub, "store-1", "mia", "Manager").await;
    for op in OPS {
        let (_, rows) = dash.subscribe_table(&format!("{op:?}"), "products", vec![op_condition(op)], true).await;
        let got: BTreeSet<String> = rows.iter().map(|r| name_of(&r.row)).collect();
        let want: BTreeSet<String> = stocks.iter().filter(|s| holds(op, **s)).map(|s| format!("old-{s}")).collect();
        assert_eq!(got, want, "snapshot of {op:?}");
        assert!(rows.iter().all(|r| r.version > 0), "snapshot rows carry their versions");
    }
    // AND of two conditions.
    let both = vec![cond("stock", FilterOp::Gte, json!(5)), cond("name", FilterOp::Lt, json!("old-2"))];
    let (_, rows) = dash.subscribe_table("and", "products", both, true).await;
    let got: BTreeSet<String> = rows.iter().map(|r| name_of(&r.row)).collect();
    assert_eq!(got, ["old-10", "old-15"].map(String::from).into_iter().collect(), "stock >= 5 and name < 'old-2'");

    // Live: the same stocks again under new keys, in one batch.
    let changes = stocks
        .iter()
        .enumerate()
        .map(|(i, stock)| upsert("products", json!({"id": Uuid::new_v4()}), product_with_stock(&format!("new-{stock}"), *stock), i as u64 + 6, now_ms(), 0))
        .collect();
    device.push(changes).await;
    for op in OPS {
        let (deltas, _) = dash.next_sub_delta(&format!("{op:?}")).await;
        let got: BTreeSet<String> = deltas.iter().map(|d| name_of(d.row.as_ref().unwrap())).collect();
        let want: BTreeSet<String> = stocks.iter().filter(|s| holds(op, **s)).map(|s| format!("new-{s}")).collect();
        assert_eq!(got, want, "live deltas of {op:?}");
        assert!(deltas.iter().all(|d| d.op == Op::Upsert));
    }
    let (deltas, _) = dash.next_sub_delta("and").await;
    let got: BTreeSet<String> = deltas.iter().map(|d| name_of(d.row.as_ref().unwrap())).collect();
    assert_eq!(got, ["new-5", "new-10", "new-15", "new-20"].map(String::from).into_iter().collect(), "new-* sorts before old-2");

    // A row that stops matching comes as a delete with its previous image; one that starts
    // matching comes as an upsert.
    let moved = rows.iter().find(|r| name_of(&r.row) == "old-15").unwrap();
    let key = json!({"id": moved.row["id"]});
    device.push(vec![upsert("products", key.clone(), json!({"stock": 1}), 11, now_ms(), moved.version)]).await;
    let (deltas, _) = dash.next_sub_delta("and").await;
    assert_eq!(deltas.len(), 1);
    assert_eq!((deltas[0].op, deltas[0].row.is_none(), deltas[0].left), (Op::Delete, true, true), "left the subscription");
    assert_eq!(deltas[0].old.as_ref().unwrap()["stock"], json!(15), "the previous image");
    let (deltas, _) = dash.next_sub_delta("Lt").await;
    assert_eq!((deltas[0].op, deltas[0].row.as_ref().unwrap()["stock"].clone()), (Op::Upsert, json!(1)), "entered");
    hub.shutdown().await;
}

/// The subscription's view of the table: snapshot rows, then deltas applied in order.
#[derive(Default)]
struct View {
    rows: BTreeMap<String, protocol::Object>,
    last_seq: u64,
    /// Seqs of every delta received.
    seqs: Vec<u64>,
}

impl View {
    fn apply(&mut self, deltas: &[protocol::Delta], frame_seq: u64) {
        for d in deltas {
            assert!(d.seq > self.last_seq, "delta {} after {}: out of order or a duplicate", d.seq, self.last_seq);
            assert!(d.seq <= frame_seq);
            self.last_seq = d.seq;
            self.seqs.push(d.seq);
            let key = Value::Object(d.key.clone()).to_string();
            match d.op {
                Op::Upsert => {
                    self.rows.insert(key, d.row.clone().unwrap());
                }
                Op::Delete => {
                    self.rows.remove(&key);
                }
            }
        }
        self.last_seq = frame_seq;
    }
}

#[actix_web::test]
async fn snapshot_then_live_has_no_gap_and_no_duplicate_while_writes_go_on() {
    let hub = TestHub::start().await;
    let (mut seeder, _, _) = Client::device(&hub, "store-1", "seeder").await;
    let ids: Vec<Uuid> = (0..40).map(|_| Uuid::new_v4()).collect();
    let seed = ids
        .iter()
        .enumerate()
        .map(|(i, id)| upsert("products", json!({"id": id}), product_with_stock(&format!("p{i}"), (i % 20) as i64), i as u64 + 1, now_ms(), 0))
        .collect();
    seeder.push(seed).await;

    // Two writers keep changing stock levels (rows move in and out of `stock < 10`) while
    // dashboards subscribe with snapshots.
    let writers: Vec<_> = ["w1", "w2"]
        .into_iter()
        .enumerate()
        .map(|(w, name)| {
            let ids = ids.clone();
            let addr = hub.addr;
            tokio::spawn(async move {
                let mut c = Client::connect(addr, protocol::Encoding::Json).await;
                c.hello(&token("store-1", name, "Employee", Some(name)), None, None).await;
                let mut seq = 0;
                for round in 0..40u64 {
                    let changes = (0..3)
                        .map(|k| {
                            seq += 1;
                            let id = ids[((round * 7 + k * 13 + w as u64 * 5) % ids.len() as u64) as usize];
                            let stock = ((round * 3 + k + w as u64) % 20) as i64;
                            upsert("products", json!({"id": id}), json!({"stock": stock}), seq, now_ms(), 0)
                        })
                        .collect();
                    c.push(changes).await;
                }
            })
        })
        .collect();

    let mut dashboards = Vec::new();
    for n in 0..3 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        let (mut dash, _) = Client::dashboard(&hub, "store-1", &format!("m{n}"), "Manager").await;
        let (seq, rows) = dash.subscribe_table("low", "products", vec![cond("stock", FilterOp::Lt, json!(10))], true).await;
        let mut view = View { last_seq: seq, ..View::default() };
        view.seqs.push(seq); // first entry: where the subscription starts
        for r in rows {
            assert!(r.row["stock"].as_i64().unwrap() < 10, "snapshot holds matching rows only");
            view.rows.insert(json!({"id": r.row["id"]}).to_string(), r.row);
        }
        dashboards.push((dash, view));
    }
    for w in writers {
        w.await.unwrap();
    }
    // A last change every subscription sees marks the end.
    let marker = Uuid::new_v4();
    seeder.push(vec![upsert("products", json!({"id": marker}), product_with_stock("marker", 0), 41, now_ms(), 0)]).await;
    let expected: BTreeMap<String, protocol::Object> = sqlx::query_scalar::<_, Value>(
        "select to_jsonb(p) from products p where tenant_id = 'store-1' and stock < 10",
    )
    .fetch_all(&hub.db)
    .await
    .unwrap()
    .into_iter()
    .map(|row| (json!({"id": row["id"]}).to_string(), row.as_object().unwrap().clone()))
    .collect();
    for (dash, view) in dashboards.iter_mut() {
        while !view.rows.keys().any(|k| k.contains(&marker.to_string())) {
            let (deltas, seq) = dash.next_sub_delta("low").await;
            view.apply(&deltas, seq);
        }
        let got: BTreeMap<&String, &Value> = view.rows.iter().map(|(k, r)| (k, &r["stock"])).collect();
        let want: BTreeMap<&String, &Value> = expected.iter().map(|(k, r)| (k, &r["stock"])).collect();
        assert_eq!(got, want, "snapshot + deltas = the table");
        // Exactly the log entries after the snapshot whose row matched before or after.
        let from = view.seqs[0];
        let logged: Vec<(i64, Option<Value>, Option<Value>)> = sqlx::query_as(
            "select seq, new_row, old_values from synchub.change_log where tenant_id = 'store-1' and seq > $1 and seq <= $2 order by seq",
        )
        .bind(from as i64)
        .bind(view.last_seq as i64)
        .fetch_all(&hub.db)
        .await
        .unwrap();
        let low = |row: &Value| row["stock"].as_i64().is_some_and(|s| s < 10);
        let want_seqs: Vec<u64> = logged
            .into_iter()
            .filter(|(_, new, old)| {
                let before = match (new, old) {
                    (Some(Value::Object(n)), Some(Value::Object(o))) => {
                        let mut image = n.clone();
                        image.extend(o.clone());
                        Some(Value::Object(image))
                    }
                    _ => None,
                };
                new.as_ref().is_some_and(low) || before.as_ref().is_some_and(low)
            })
            .map(|(seq, _, _)| seq as u64)
            .collect();
        assert_eq!(view.seqs[1..], want_seqs[..], "every matching change after the snapshot, once, in order");
    }
    hub.shutdown().await;
}

#[actix_web::test]
async fn dashboard_sessions_are_read_only_and_receive_only_what_they_subscribe_to() {
    let hub = TestHub::start().await;
    let (mut device, _, _) = Client::device(&hub, "store-1", "pos-1").await;
    // A dashboard opened with the device's own token does not replace the device's session.
    let mut dash = hub.client().await;
    let id = dash.next_id();
    let device_token = token("store-1", "user-pos-1", "Employee", Some("pos-1"));
    dash.send(&ClientFrame::Hello { mode: protocol::SessionMode::Dashboard, id, versions: vec![1], token: device_token, device_id: None, position: None }).await;
    match dash.recv().await {
        ServerFrame::Welcome { device_id, .. } => assert!(device_id.starts_with("dashboard:"), "{device_id}"),
        other => panic!("expected welcome, got {other:?}"),
    }
    // No catch-up or up_to_date for a dashboard, and no deltas without a subscription.
    device.push(vec![upsert("products", json!({"id": Uuid::new_v4()}), product(Uuid::new_v4(), "Tea", 200), 1, now_ms(), 0)]).await;
    assert!(dash.recv_timeout(Duration::from_millis(400)).await.is_none(), "nothing unasked-for");
    // Pushes are refused.
    let id = dash.next_id();
    dash.send(&ClientFrame::Push { id, batch_id: Uuid::now_v7(), changes: vec![upsert("products", json!({"id": Uuid::new_v4()}), product(Uuid::new_v4(), "X", 1), 1, now_ms(), 0)] }).await;
    assert_eq!(dash.expect_error(id).await, ErrorCode::Forbidden);
    // A second hello asking for a device session is refused and leaves the session a dashboard.
    let id = dash.next_id();
    let again = token("store-1", "user-pos-1", "Employee", Some("pos-1"));
    dash.send(&ClientFrame::Hello { mode: protocol::SessionMode::Device, id, versions: vec![1], token: again, device_id: None, position: None }).await;
    assert_eq!(dash.expect_error(id).await, ErrorCode::AlreadyAuthenticated);
    let id = dash.next_id();
    dash.send(&ClientFrame::Push { id, batch_id: Uuid::now_v7(), changes: vec![upsert("products", json!({"id": Uuid::new_v4()}), product(Uuid::new_v4(), "X", 1), 1, now_ms(), 0)] }).await;
    assert_eq!(dash.expect_error(id).await, ErrorCode::Forbidden, "still read-only");
    // Its token, with the device claim it ignores, can be refreshed.
    let id = dash.next_id();
    dash.send(&ClientFrame::Auth { id, token: token("store-1", "user-pos-1", "Employee", Some("pos-1")) }).await;
    dash.expect(|f| match f {
        ServerFrame::AuthOk { id: got, .. } if *got == id => Some(()),
        ServerFrame::Error { id: Some(got), code, message, .. } if *got == id => panic!("refresh refused: {code:?} {message}"),
        _ => None,
    })
    .await;
    assert_eq!(sqlx::query_scalar::<_, i64>("select count(*) from products where name = 'X'").fetch_one(&hub.db).await.unwrap(), 0);
    // The device still works: it was not replaced.
    let results = device.push(vec![upsert("products", json!({"id": Uuid::new_v4()}), product(Uuid::new_v4(), "Mate", 300), 2, now_ms(), 0)]).await;
    assert_eq!(results[0].status, protocol::ChangeStatus::Applied);

    // A device may subscribe too: its own changes reach its subscription (not its delta stream).
    let (_, rows) = device.subscribe_table("mine", "products", vec![cond("name", FilterOp::Eq, json!("Chai"))], true).await;
    assert!(rows.is_empty());
    device.push(vec![upsert("products", json!({"id": Uuid::new_v4()}), product(Uuid::new_v4(), "Chai", 300), 3, now_ms(), 0)]).await;
    let (deltas, _) = device.next_sub_delta("mine").await;
    assert_eq!(deltas[0].origin.as_deref(), Some("pos-1"));
    assert!(
        !device.inbox.iter().any(|f| matches!(f, ServerFrame::Delta { .. })),
        "the device's own change is not in its delta stream"
    );
    hub.shutdown().await;
}

#[actix_web::test]
async fn unsubscribe_limits_and_refused_subscriptions() {
    let hub = TestHub::start_with(|c| {
        c.max_subscriptions_per_session = 3;
        c.subscription_snapshot_max_rows = 3;
    })
    .await;
    let (mut device, _, _) = Client::device(&hub, "store-1", "pos-1").await;
    let changes = (0..5)
        .map(|i| upsert("products", json!({"id": Uuid::new_v4()}), product_with_stock(&format!("p{i}"), i), i as u64 + 1, now_ms(), 0))
        .collect();
    device.push(changes).await;
    let (mut dash, _) = Client::dashboard(&hub, "store-1", "mia", "Manager").await;

    // Refusals, each with the request's id; none of them takes a slot.
    let cases: Vec<(&str, Option<&str>, Vec<Condition>, bool, Option<Channel>, ErrorCode)> = vec![
        ("a", Some("no_such_table"), vec![], false, None, ErrorCode::UnknownTable),
        ("a", Some("products"), vec![cond("colour", FilterOp::Eq, json!("red"))], false, None, ErrorCode::InvalidFilter),
        ("a", Some("products"), vec![cond("stock", FilterOp::In, json!(3))], false, None, ErrorCode::InvalidFilter),
        ("a", Some("products"), vec![cond("stock", FilterOp::Lt, json!(null))], false, None, ErrorCode::InvalidFilter),
        ("a", None, vec![], false, None, ErrorCode::InvalidFilter),
        ("a", Some("products"), vec![], false, Some(Channel::Presence), ErrorCode::InvalidFilter),
        ("", Some("products"), vec![], false, None, ErrorCode::InvalidFilter),
        ("a", Some("products"), vec![], true, None, ErrorCode::SnapshotTooLarge),
    ];
    for (sub, table, filter, snapshot, channel, code) in cases {
        let id = dash.send_subscribe(sub, table, filter, snapshot, channel).await;
        assert_eq!(dash.expect_error(id).await, code, "{sub:?} {table:?}");
    }
    // Three fit (a snapshot of 3 rows is allowed); a fourth does not; a name is unique.
    dash.subscribe_table("all", "products", vec![], false).await;
    dash.subscribe_table("few", "products", vec![cond("stock", FilterOp::Lt, json!(3))], true).await;
    let id = dash.send_subscribe("all", Some("products"), vec![], false, None).await;
    assert_eq!(dash.expect_error(id).await, ErrorCode::InvalidFilter, "name in use");
    dash.subscribe_table("big", "products", vec![cond("stock", FilterOp::Gte, json!(3))], false).await;
    let id = dash.send_subscribe("fourth", Some("products"), vec![], false, None).await;
    assert_eq!(dash.expect_error(id).await, ErrorCode::TooManySubscriptions);

    // Unsubscribe: acknowledged, nothing more for it, the others go on; unknown names refused.
    let id = dash.next_id();
    dash.send(&ClientFrame::Unsubscribe { id, sub: "all".into() }).await;
    dash.expect(|f| matches!(f, ServerFrame::Unsubscribed { id: got, sub } if *got == id && sub == "all").then_some(())).await;
    device.push(vec![upsert("products", json!({"id": Uuid::new_v4()}), product_with_stock("late", 7), 6, now_ms(), 0)]).await;
    let (deltas, _) = dash.next_sub_delta("big").await;
    assert_eq!(name_of(deltas[0].row.as_ref().unwrap()), "late");
    assert!(!dash.inbox.iter().any(|f| matches!(f, ServerFrame::SubDelta { sub, .. } if sub == "all")));
    let id = dash.next_id();
    dash.send(&ClientFrame::Unsubscribe { id, sub: "all".into() }).await;
    assert_eq!(dash.expect_error(id).await, ErrorCode::UnknownSubscription);
    // The freed slot can be used again.
    dash.subscribe_table("again", "products", vec![], false).await;
    hub.shutdown().await;
}

/// A snapshot still loading when its subscription is dropped and the name subscribed again is
/// thrown away: the new subscription gets its own reply and rows, once, and counts once.
#[actix_web::test]
async fn a_snapshot_finishing_after_its_unsubscribe_is_not_the_new_subscriptions() {
    let hub = TestHub::start().await;
    let (mut device, _, _) = Client::device(&hub, "store-1", "pos-1").await;
    let changes = (0..5)
        .map(|i| upsert("products", json!({"id": Uuid::new_v4()}), product_with_stock(&format!("p{i}"), i), i as u64 + 1, now_ms(), 0))
        .collect();
    device.push(changes).await;
    let (mut dash, _) = Client::dashboard(&hub, "store-1", "mia", "Manager").await;

    // The table locked, so the first snapshot's read waits while the other two frames arrive.
    let mut lock = hub.db.begin().await.unwrap();
    sqlx::query("lock table products in access exclusive mode").execute(&mut *lock).await.unwrap();
    let first = dash.send_subscribe("s", Some("products"), vec![cond("stock", FilterOp::Lt, json!(2))], true, None).await;
    let unsubscribe = dash.next_id();
    dash.send(&ClientFrame::Unsubscribe { id: unsubscribe, sub: "s".into() }).await;
    dash.expect(|f| matches!(f, ServerFrame::Unsubscribed { id, .. } if *id == unsubscribe).then_some(())).await;
    let second = dash.send_subscribe("s", Some("products"), vec![cond("stock", FilterOp::Gte, json!(2))], true, None).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    lock.rollback().await.unwrap();
    let (mut replies, mut rows, mut withdrawn) = (Vec::new(), Vec::new(), Vec::new());
    loop {
        match dash.recv().await {
            ServerFrame::Subscribed { id, .. } => replies.push(id),
            ServerFrame::Error { id: Some(id), code, .. } => withdrawn.push((id, code)),
            ServerFrame::SubRows { sub, rows: page, last, .. } if sub == "s" => {
                rows.extend(page.iter().map(|r| name_of(&r.row)));
                if last {
                    break;
                }
            }
            _ => {}
        }
    }
    assert!(!replies.contains(&first), "the dropped subscription was answered: {replies:?}");
    assert_eq!(replies, vec![second]);
    // The first request is answered all the same (its snapshot may finish after the second's):
    // it was withdrawn.
    if withdrawn.is_empty() {
        withdrawn.push((first, dash.expect_error(first).await));
    }
    assert_eq!(withdrawn, vec![(first, ErrorCode::UnknownSubscription)]);
    rows.sort();
    assert_eq!(rows, ["p2", "p3", "p4"]);
    // Nothing more comes for the first request, and the gauge holds one subscription.
    device.push(vec![upsert("products", json!({"id": Uuid::new_v4()}), product_with_stock("late", 3), 6, now_ms(), 0)]).await;
    let (deltas, _) = dash.next_sub_delta("s").await;
    assert_eq!(name_of(deltas[0].row.as_ref().unwrap()), "late");
    assert!(!dash.inbox.iter().any(|f| matches!(f, ServerFrame::Subscribed { .. } | ServerFrame::SubRows { .. })), "{:?}", dash.inbox);
    let metrics = reqwest::get(format!("http://{}/metrics", hub.addr)).await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l == "synchub_subscriptions 1"), "{metrics}");
    hub.shutdown().await;
}

/// Subscribe to presence as `name`; the list that follows the reply.
async fn subscribe_presence(dash: &mut Client, name: &str) -> Vec<protocol::PresenceEntry> {
    let id = dash.send_subscribe(name, None, vec![], false, Some(Channel::Presence)).await;
    dash.expect(|f| matches!(f, ServerFrame::Subscribed { id: got, .. } if *got == id).then_some(())).await;
    dash.expect(|f| match f {
        ServerFrame::Presence { sub, online } if sub == name => Some(online.clone()),
        _ => None,
    })
    .await
}

#[actix_web::test]
async fn presence_shows_joins_and_leaves_of_the_tenant_only() {
    let hub = TestHub::start().await;
    let (mut dash, _) = Client::dashboard(&hub, "store-1", "mia", "Manager").await;
    let online = subscribe_presence(&mut dash, "who").await;
    assert_eq!(online.len(), 1);
    assert_eq!((online[0].user_id.as_str(), online[0].role.as_str(), online[0].mode), ("mia", "Manager", protocol::SessionMode::Dashboard));

    let (other_tenant, _, _) = Client::device(&hub, "store-2", "pos-9").await;
    let (device, _, _) = Client::device(&hub, "store-1", "pos-1").await;
    let joins = dash
        .expect(|f| match f {
            ServerFrame::PresenceDiff { sub, joins, leaves } if sub == "who" && leaves.is_empty() => Some(joins.clone()),
            _ => None,
        })
        .await;
    assert_eq!(joins.len(), 1);
    assert_eq!((joins[0].device_id.as_str(), joins[0].user_id.as_str(), joins[0].mode), ("pos-1", "user-pos-1", protocol::SessionMode::Device));
    let session = joins[0].session_id;
    drop(device);
    let leaves = dash
        .expect(|f| match f {
            ServerFrame::PresenceDiff { sub, joins, leaves } if sub == "who" && joins.is_empty() => Some(leaves.clone()),
            _ => None,
        })
        .await;
    assert_eq!(leaves.iter().map(|p| p.session_id).collect::<Vec<_>>(), vec![session]);
    assert!(
        !dash.inbox.iter().any(|f| matches!(f, ServerFrame::PresenceDiff { joins, .. } if joins.iter().any(|p| p.device_id == "pos-9"))),
        "another tenant's device is not shown"
    );
    drop(other_tenant);

    // A second presence subscription on the socket gets the list too.
    let online = subscribe_presence(&mut dash, "who-else").await;
    assert!(online.iter().any(|p| p.user_id == "mia"), "{online:?}");
    hub.shutdown().await;
}

#[actix_web::test]
async fn the_conflicts_channel_is_for_manager_roles() {
    let hub = TestHub::start().await;
    let (mut employee, _) = Client::dashboard(&hub, "store-1", "ana", "Employee").await;
    let id = employee.send_subscribe("c", None, vec![], false, Some(Channel::Conflicts)).await;
    assert_eq!(employee.expect_error(id).await, ErrorCode::Forbidden);
    let (mut manager, _) = Client::dashboard(&hub, "store-1", "mia", "Manager").await;
    let id = manager.send_subscribe("c", None, vec![], false, Some(Channel::Conflicts)).await;
    manager.expect(|f| matches!(f, ServerFrame::Subscribed { id: got, .. } if *got == id).then_some(())).await;
    hub.shutdown().await;
}
