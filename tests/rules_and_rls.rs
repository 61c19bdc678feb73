//! Roles and rules, and row-level security. A field-service tenant (the shape of the
//! field-service app in shared/context): employees read and write only the work orders
//! assigned to them and never see their cost, the service-type price list is read-only but for
//! managers, and managers do everything. Writes are checked on push; Postgres's row-level
//! security keeps the hub's tenant role to one tenant's rows whatever the hub asks.
//! Reads follow the rules on catch-up, live deltas, snapshots and subscriptions alike.

mod common;

use std::time::Duration;

use common::*;
use protocol::{ChangeResult, ChangeStatus, ClientFrame, Delta, ErrorCode, Op, ServerFrame, SnapshotRow};
use serde_json::{json, Value};
use sqlx::Row;
use synchub::config::{Config, MergePolicy, TableConfig};
use synchub::rules::{Access, RuleConfig};
use uuid::Uuid;

const FIELD_SERVICE_SQL: &str = r#"
create table public.work_orders (
    tenant_id   text not null,
    id          uuid primary key,
    title       text not null,
    employee_id text,
    status      text not null default 'open',
    cost_cents  integer not null default 0
);
create table public.service_types (
    tenant_id   text not null,
    id          uuid primary key,
    name        text not null,
    price_cents integer not null
);
"#;

/// How long a device is watched to show that nothing arrives.
const QUIET: Duration = Duration::from_millis(700);

fn rule(table: &str, role: &str, access: Access) -> RuleConfig {
    RuleConfig { table: table.into(), role: role.into(), access, row_column: None, row_claim: None, hidden_columns: vec![] }
}

/// The README's example.
fn field_service_rules() -> Vec<RuleConfig> {
    vec![
        RuleConfig {
            row_column: Some("employee_id".into()),
            hidden_columns: vec!["cost_cents".into()],
            ..rule("work_orders", "Employee", Access::ReadWrite)
        },
        rule("service_types", "*", Access::Read),
        rule("service_types", "Manager", Access::ReadWrite),
        rule("customers", "Employee", Access::Read),
        rule("*", "Manager", Access::ReadWrite),
    ]
}

/// A hub over the demo schema plus the field-service tables, with the field-service rules.
async fn start(adjust: impl FnOnce(&mut Config)) -> TestHub {
    let url = fresh_database().await;
    let db = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::raw_sql(FIELD_SERVICE_SQL).execute(&db).await.unwrap();
    let mut config = test_config(url.clone());
    for name in ["work_orders", "service_types"] {
        config.tables.push(TableConfig { name: name.into(), tenant_column: "tenant_id".into(), policy: MergePolicy::Lww, ..Default::default() });
    }
    config.rules = field_service_rules();
    adjust(&mut config);
    let running = synchub::server::start(config).await.expect("hub starts");
    TestHub { addr: running.addr, running: Some(running), db, database_url: url }
}

async fn connect(hub: &TestHub, tenant: &str, user: &str, role: &str, device: &str) -> Client {
    let mut c = hub.client().await;
    c.hello(&token(tenant, user, role, Some(device)), None, None).await;
    c.until_up_to_date().await;
    c
}

fn work_order(id: Uuid, employee: &str, title: &str, cost: i64) -> Value {
    json!({"title": title, "employee_id": employee, "cost_cents": cost, "id": id})
}

fn statuses(results: &[ChangeResult]) -> Vec<(ChangeStatus, Option<ErrorCode>)> {
    results.iter().map(|r| (r.status, r.reason)).collect()
}

async fn row(db: &sqlx::PgPool, table: &str, id: Uuid) -> Option<Value> {
    sqlx::query_scalar(&format!("select to_jsonb(t) - 'tenant_id' from {table} t where id = $1"))
        .bind(id)
        .fetch_optional(db)
        .await
        .unwrap()
}

/// A snapshot request's pages until the last, or the error code that refused it.
async fn snapshot_all(c: &mut Client, table: &str, limit: u32) -> Result<Vec<SnapshotRow>, ErrorCode> {
    let mut rows = Vec::new();
    let mut after = None;
    loop {
        let id = c.next_id();
        c.send(&ClientFrame::Snapshot { id, table: table.into(), after: after.take(), limit: Some(limit) }).await;
        let page = c
            .expect(|f| match f {
                ServerFrame::SnapshotPage { id: got, rows, next_after, .. } if *got == id => Some(Ok((rows.clone(), next_after.clone()))),
                ServerFrame::Error { id: Some(got), code, .. } if *got == id => Some(Err(*code)),
                _ => None,
            })
            .await?;
        assert!(page.0.len() <= limit as usize);
        rows.extend(page.0);
        match page.1 {
            Some(next) => after = Some(next),
            None => return Ok(rows),
        }
    }
}

/// Work orders W1 (emp-1), W2 (emp-2) and a service type, written by a manager of `tenant`.
async fn seed(hub: &TestHub, tenant: &str) -> (Uuid, Uuid, Uuid) {
    let mut manager = connect(hub, tenant, "mia", "Manager", &format!("office-{tenant}")).await;
    let (w1, w2, s1) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let t = now_ms();
    let r = manager
        .push(vec![
            upsert("work_orders", json!({"id": w1}), work_order(w1, "emp-1", "boiler service", 12000), 1, t, 0),
            upsert("work_orders", json!({"id": w2}), work_order(w2, "emp-2", "roof inspection", 30000), 2, t, 0),
            upsert("service_types", json!({"id": s1}), json!({"name": "inspection", "price_cents": 9000}), 3, t, 0),
        ])
        .await;
    assert!(r.iter().all(|r| r.status == ChangeStatus::Applied), "{r:?}");
    (w1, w2, s1)
}

// ---------------------------------------------------------------------------------------------
// Writes

#[actix_web::test]
async fn each_write_rule_rejects_forbidden_while_the_rest_of_the_batch_applies() {
    let hub = start(|_| {}).await;
    let (w1, w2, s1) = seed(&hub, "acme").await;
    let before_w2 = row(&hub.db, "work_orders", w2).await;
    let mut emp = connect(&hub, "acme", "emp-1", "Employee", "tablet-1").await;
    let (w3, w4) = (Uuid::new_v4(), Uuid::new_v4());
    let t = now_ms() + 1;
    let batch = vec![
        // 1. the price list is read-only for employees
        upsert("service_types", json!({"id": s1}), json!({"price_cents": 1}), 1, t, 0),
        // 2. the cost is hidden from employees
        upsert("work_orders", json!({"id": w1}), json!({"cost_cents": 1}), 2, t, 0),
        // 3. someone else's work order
        upsert("work_orders", json!({"id": w2}), json!({"title": "taken over"}), 3, t, 0),
        // 4. a new work order for someone else
        upsert("work_orders", json!({"id": w3}), json!({"title": "for ben", "employee_id": "emp-2"}), 4, t, 0),
        // 5. a new work order of one's own: applies
        upsert("work_orders", json!({"id": w4}), json!({"title": "mine", "employee_id": "emp-1"}), 5, t, 0),
        // 6. an update of one's own work order: applies
        upsert("work_orders", json!({"id": w1}), json!({"status": "done"}), 6, t, 0),
        // 7. handing one's work order to someone else
        upsert("work_orders", json!({"id": w1}), json!({"employee_id": "emp-2"}), 7, t, 0),
        // 8. deleting someone else's work order
        delete("work_orders", json!({"id": w2}), 8, t, 0),
        // 9. a table no rule gives employees
        upsert("products", json!({"id": Uuid::new_v4()}), product(Uuid::new_v4(), "x", 1), 9, t, 0),
        // 10. a new work order without the row column (it must be the employee's)
        upsert("work_orders", json!({"id": Uuid::new_v4()}), json!({"title": "nobody's"}), 10, t, 0),
    ];
    let results = emp.push(batch.clone()).await;
    let forbidden = (ChangeStatus::Rejected, Some(ErrorCode::Forbidden));
    let applied = |r: &ChangeResult| matches!(r.status, ChangeStatus::Applied | ChangeStatus::Merged);
    assert_eq!(
        statuses(&results).iter().enumerate().filter(|(i, _)| ![4, 5].contains(i)).map(|(_, s)| *s).collect::<Vec<_>>(),
        vec![forbidden; 8],
        "{results:#?}"
    );
    assert!(applied(&results[4]) && applied(&results[5]), "{results:#?}");
    let message = |i: usize| results[i].message.clone().unwrap_or_default();
    assert!(message(0).contains("may not write `service_types`"), "{}", message(0));
    assert!(message(1).contains("hidden"), "{}", message(1));
    assert!(message(2).contains("not yours"), "{}", message(2));
    assert!(message(3).contains("must be `emp-1`"), "{}", message(3));

    // Nothing of a forbidden change was written or logged.
    assert_eq!(row(&hub.db, "work_orders", w2).await, before_w2);
    assert_eq!(row(&hub.db, "work_orders", w3).await, None);
    let w1_now = row(&hub.db, "work_orders", w1).await.unwrap();
    assert_eq!((&w1_now["employee_id"], &w1_now["status"], &w1_now["cost_cents"]), (&json!("emp-1"), &json!("done"), &json!(12000)));
    assert_eq!(row(&hub.db, "work_orders", w4).await.unwrap()["employee_id"], json!("emp-1"));
    let forbidden_ids: Vec<Uuid> =
        results.iter().filter(|r| r.reason == Some(ErrorCode::Forbidden)).map(|r| r.change_id).collect();
    let logged: i64 = sqlx::query_scalar("select count(*) from synchub.change_log where change_id = any($1)")
        .bind(&forbidden_ids)
        .fetch_one(&hub.db)
        .await
        .unwrap();
    assert_eq!(logged, 0);
    let conflicts: i64 = sqlx::query_scalar("select count(*) from synchub.conflicts").fetch_one(&hub.db).await.unwrap();
    assert_eq!(conflicts, 0);

    // The cursor moved past every change: sent again, all are duplicates.
    let again = emp.push(batch).await;
    assert!(again.iter().all(|r| r.status == ChangeStatus::Duplicate), "{again:#?}");

    // The manager is not restricted.
    let mut manager = connect(&hub, "acme", "mia", "Manager", "office-2").await;
    let r = manager.push(vec![upsert("service_types", json!({"id": s1}), json!({"price_cents": 9500}), 1, now_ms() + 5, 0)]).await;
    assert!(r[0].status != ChangeStatus::Rejected && r[0].seq.is_some(), "{r:?}");
    hub.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Snapshots (served with the rules now)

#[actix_web::test]
async fn snapshots_hold_only_the_rows_and_columns_a_role_may_read() {
    let hub = start(|_| {}).await;
    let (w1, _, _) = seed(&hub, "acme").await;
    let mut mine = vec![w1];
    let mut manager = connect(&hub, "acme", "mia", "Manager", "office-3").await;
    let mut changes = Vec::new();
    for i in 0..6u64 {
        let id = Uuid::new_v4();
        let employee = if i % 2 == 0 { "emp-1" } else { "emp-2" };
        if employee == "emp-1" {
            mine.push(id);
        }
        changes.push(upsert("work_orders", json!({"id": id}), work_order(id, employee, "job", 100), i + 1, now_ms(), 0));
    }
    manager.push(changes).await;
    let all: i64 = sqlx::query_scalar("select count(*) from work_orders").fetch_one(&hub.db).await.unwrap();
    assert_eq!(all, 8);

    let mut emp = connect(&hub, "acme", "emp-1", "Employee", "tablet-1").await;
    // Pages of one row: the restriction is part of the query, so paging stays right.
    let rows = snapshot_all(&mut emp, "work_orders", 1).await.unwrap();
    let mut got: Vec<Uuid> = rows.iter().map(|r| serde_json::from_value(r.row["id"].clone()).unwrap()).collect();
    got.sort();
    mine.sort();
    assert_eq!(got, mine);
    for r in &rows {
        assert_eq!(r.row["employee_id"], json!("emp-1"));
        assert!(!r.row.contains_key("cost_cents"), "hidden column sent: {:?}", r.row);
        assert!(r.version > 0);
    }
    // A readable table without restriction comes whole; an unreadable one is forbidden.
    assert_eq!(snapshot_all(&mut emp, "service_types", 10).await.unwrap().len(), 1);
    assert_eq!(snapshot_all(&mut emp, "products", 10).await.unwrap_err(), ErrorCode::Forbidden);
    // The manager sees every row with its cost.
    let rows = snapshot_all(&mut manager, "work_orders", 1000).await.unwrap();
    assert_eq!(rows.len(), all as usize);
    assert!(rows.iter().all(|r| r.row.contains_key("cost_cents")));
    hub.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Catch-up, live deltas and subscriptions.

fn ids_of(deltas: &[Delta], table: &str) -> Vec<Value> {
    deltas.iter().filter(|d| d.table == table).map(|d| d.key["id"].clone()).collect()
}

#[actix_web::test]
async fn catch_up_holds_only_readable_tables_own_rows_and_no_hidden_column() {
    let hub = start(|_| {}).await;
    let (w1, w2, s1) = seed(&hub, "acme").await;
    sqlx::query("insert into products (tenant_id, id, sku, name, price_cents) values ('acme', $1, 'P-1', 'pump', 500)")
        .bind(Uuid::new_v4())
        .execute(&hub.db)
        .await
        .unwrap();
    let mut emp = hub.client().await;
    emp.hello(&token("acme", "emp-1", "Employee", Some("tablet-1")), None, None).await;
    let (deltas, _) = emp.until_up_to_date().await;
    assert_eq!(ids_of(&deltas, "work_orders"), vec![json!(w1)]);
    assert!(!ids_of(&deltas, "work_orders").contains(&json!(w2)));
    assert_eq!(ids_of(&deltas, "service_types"), vec![json!(s1)]);
    assert!(ids_of(&deltas, "products").is_empty(), "an unreadable table was sent");
    for d in &deltas {
        for image in d.row.iter().chain(d.old.iter()) {
            assert!(!image.contains_key("cost_cents"), "hidden column sent: {d:?}");
        }
    }
    hub.shutdown().await;
}

#[actix_web::test]
async fn live_deltas_follow_the_rules_and_a_row_that_moves_away_comes_as_a_delete() {
    let hub = start(|_| {}).await;
    let (w1, w2, _) = seed(&hub, "acme").await;
    let mut emp = connect(&hub, "acme", "emp-1", "Employee", "tablet-1").await;
    let mut manager = connect(&hub, "acme", "mia", "Manager", "office-2").await;
    let w5 = Uuid::new_v4();
    let t = now_ms() + 10;
    manager
        .push(vec![
            // W1 goes to emp-2: emp-1 must drop it.
            upsert("work_orders", json!({"id": w1}), json!({"employee_id": "emp-2"}), 1, t, 0),
            // emp-2's work order changes: nothing for emp-1.
            upsert("work_orders", json!({"id": w2}), json!({"title": "roof and gutters"}), 2, t, 0),
            // A new one for emp-1, with its cost.
            upsert("work_orders", json!({"id": w5}), work_order(w5, "emp-1", "new job", 5000), 3, t, 0),
        ])
        .await;
    // Only the cost of it changes: nothing to see. A product (a table employees may not read)
    // is written: nothing to see either.
    let p1 = Uuid::new_v4();
    manager.push(vec![upsert("work_orders", json!({"id": w5}), json!({"cost_cents": 5500}), 4, t + 1, 0)]).await;
    manager.push(vec![upsert("products", json!({"id": p1}), product(p1, "pump", 500), 5, t + 1, 0)]).await;
    let mut seen = Vec::new();
    while !seen.iter().any(|d: &Delta| d.key["id"] == json!(w5)) {
        seen.extend(emp.next_deltas().await.0);
    }
    assert_eq!(seen.len(), 2, "{seen:#?}");
    let (gone, new) = (&seen[0], &seen[1]);
    assert_eq!((gone.op, &gone.key["id"], gone.row.as_ref()), (Op::Delete, &json!(w1), None));
    let old = gone.old.as_ref().expect("the row as it was");
    assert_eq!(old["employee_id"], json!("emp-1"));
    assert!(!old.contains_key("cost_cents"));
    assert_eq!(new.op, Op::Upsert);
    assert!(!new.row.as_ref().unwrap().contains_key("cost_cents"));
    // And the cost-only update never arrives.
    assert!(emp.recv_timeout(QUIET).await.is_none());
    hub.shutdown().await;
}

#[actix_web::test]
async fn subscriptions_follow_the_rules_on_snapshot_and_live() {
    let hub = start(|_| {}).await;
    let (w1, w2, _) = seed(&hub, "acme").await;
    let (mut emp, _) = Client::dashboard(&hub, "acme", "emp-1", "Employee").await;
    // An unreadable table, and a filter on a hidden column, are refused.
    let id = emp.send_subscribe("p", Some("products"), vec![], true, None).await;
    assert_eq!(emp.expect_error(id).await, ErrorCode::Forbidden);
    let cost = protocol::Condition { column: "cost_cents".into(), op: protocol::FilterOp::Gt, value: json!(0) };
    let id = emp.send_subscribe("c", Some("work_orders"), vec![cost], true, None).await;
    assert_eq!(emp.expect_error(id).await, ErrorCode::InvalidFilter);
    // The snapshot holds the employee's own work orders, without their cost.
    let open = protocol::Condition { column: "status".into(), op: protocol::FilterOp::Eq, value: json!("open") };
    let (_, rows) = emp.subscribe_table("mine", "work_orders", vec![open], true).await;
    assert_eq!(rows.iter().map(|r| r.row["id"].clone()).collect::<Vec<_>>(), vec![json!(w1)]);
    assert!(rows.iter().all(|r| !r.row.contains_key("cost_cents")));

    // Live: another employee's work order changes (nothing), w1 moves to emp-2 (a delete),
    // a new one for emp-1 arrives without its cost.
    let mut manager = connect(&hub, "acme", "mia", "Manager", "office-2").await;
    let w5 = Uuid::new_v4();
    let t = now_ms() + 10;
    manager.push(vec![upsert("work_orders", json!({"id": w2}), json!({"title": "roof and gutters"}), 1, t, 0)]).await;
    manager.push(vec![upsert("work_orders", json!({"id": w1}), json!({"employee_id": "emp-2"}), 2, t, 0)]).await;
    manager.push(vec![upsert("work_orders", json!({"id": w5}), work_order(w5, "emp-1", "new job", 5000), 3, t, 0)]).await;
    let mut seen = Vec::new();
    while !seen.iter().any(|d: &Delta| d.key["id"] == json!(w5)) {
        seen.extend(emp.next_sub_delta("mine").await.0);
    }
    assert_eq!(seen.iter().map(|d| (d.op, d.key["id"].clone())).collect::<Vec<_>>(), vec![(Op::Delete, json!(w1)), (Op::Upsert, json!(w5))]);
    for d in &seen {
        for image in d.row.iter().chain(d.old.iter()) {
            assert!(!image.contains_key("cost_cents"), "hidden column sent: {d:?}");
        }
    }
    hub.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Row-level security

/// Counts as the tenant role, with `synchub.tenant` set to `tenant` (or never set).
async fn counts_as_tenant_role(db: &sqlx::PgPool, tenant: Option<&str>) -> (i64, i64, i64, Vec<String>) {
    let mut tx = db.begin().await.unwrap();
    sqlx::query("set local role synchub_tenant").execute(&mut *tx).await.unwrap();
    if let Some(t) = tenant {
        sqlx::query("select set_config('synchub.tenant', $1, true)").bind(t).execute(&mut *tx).await.unwrap();
    }
    let log: i64 = sqlx::query_scalar("select count(*) from synchub.change_log").fetch_one(&mut *tx).await.unwrap();
    let versions: i64 = sqlx::query_scalar("select count(*) from synchub.row_versions").fetch_one(&mut *tx).await.unwrap();
    let orders: i64 = sqlx::query_scalar("select count(*) from work_orders").fetch_one(&mut *tx).await.unwrap();
    let tenants: Vec<String> = sqlx::query_scalar("select tenant_id from synchub.tenants order by 1").fetch_all(&mut *tx).await.unwrap();
    tx.rollback().await.unwrap();
    (log, versions, orders, tenants)
}

/// An insert of a work order as the tenant role; the Postgres error code when refused.
async fn insert_as_tenant_role(db: &sqlx::PgPool, setting: Option<&str>, row_tenant: &str) -> Result<(), (String, String)> {
    let mut tx = db.begin().await.unwrap();
    sqlx::query("set local role synchub_tenant").execute(&mut *tx).await.unwrap();
    if let Some(t) = setting {
        sqlx::query("select set_config('synchub.tenant', $1, true)").bind(t).execute(&mut *tx).await.unwrap();
    }
    let result = sqlx::query("insert into work_orders (tenant_id, id, title) values ($1, $2, 'sneaky')")
        .bind(row_tenant)
        .bind(Uuid::new_v4())
        .execute(&mut *tx)
        .await;
    tx.rollback().await.unwrap();
    match result {
        Ok(_) => Ok(()),
        Err(e) => {
            let db = e.as_database_error().expect("a database error");
            Err((db.code().unwrap_or_default().into_owned(), db.message().to_owned()))
        }
    }
}

#[actix_web::test]
async fn row_level_security_keeps_the_tenant_role_to_one_tenant() {
    let hub = start(|_| {}).await;
    seed(&hub, "acme").await;
    seed(&hub, "globex").await;
    let total: i64 = sqlx::query_scalar("select count(*) from synchub.change_log").fetch_one(&hub.db).await.unwrap();
    assert!(total >= 6);

    // Without the setting, the tenant role sees nothing and may write nothing.
    assert_eq!(counts_as_tenant_role(&hub.db, None).await, (0, 0, 0, vec![]));
    let (code, message) = insert_as_tenant_role(&hub.db, None, "acme").await.unwrap_err();
    assert_eq!(code, "42501");
    assert!(message.contains("row-level security"), "{message}");

    // With it, one tenant's rows only.
    let (log, versions, orders, tenants) = counts_as_tenant_role(&hub.db, Some("acme")).await;
    assert_eq!((log, versions, orders, tenants), (3, 3, 2, vec!["acme".to_string()]));
    assert!(insert_as_tenant_role(&hub.db, Some("acme"), "acme").await.is_ok());
    assert_eq!(insert_as_tenant_role(&hub.db, Some("acme"), "globex").await.unwrap_err().0, "42501");

    // The application's other roles are not locked out of the table, and their writes still
    // reach the log through the capture trigger.
    let app_role = format!("app_{}", Uuid::new_v4().simple());
    sqlx::raw_sql(&format!("create role {app_role} nologin; grant select, insert, update on work_orders to {app_role}"))
        .execute(&hub.db)
        .await
        .unwrap();
    let head_before: i64 =
        sqlx::query_scalar("select head_seq from synchub.tenants where tenant_id = 'globex'").fetch_one(&hub.db).await.unwrap();
    let written = Uuid::new_v4();
    let mut tx = hub.db.begin().await.unwrap();
    sqlx::query(&format!("set local role {app_role}")).execute(&mut *tx).await.unwrap();
    let visible: i64 = sqlx::query_scalar("select count(*) from work_orders").fetch_one(&mut *tx).await.unwrap();
    assert_eq!(visible, 4, "every tenant's rows, as before row-level security");
    sqlx::query("insert into work_orders (tenant_id, id, title, employee_id) values ('globex', $1, 'from the back office', 'emp-9')")
        .bind(written)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let entry = sqlx::query("select seq, table_name, op, origin_device from synchub.change_log where tenant_id = 'globex' and pk = $1")
        .bind(json!({"id": written}))
        .fetch_one(&hub.db)
        .await
        .unwrap();
    assert_eq!(entry.get::<i64, _>("seq"), head_before + 1);
    assert_eq!((entry.get::<String, _>("table_name"), entry.get::<String, _>("op")), ("work_orders".into(), "insert".into()));
    assert_eq!(entry.get::<Option<String>, _>("origin_device"), None);

    // The hub itself keeps working under the role: a device of globex gets that write.
    let mut device = hub.client().await;
    device.hello(&token("globex", "mia", "Manager", Some("office-9")), None, None).await;
    // (by catch-up, or live once the tenant actor has read the notified log entry)
    let (mut deltas, _) = device.until_up_to_date().await;
    while !deltas.iter().any(|d| d.key["id"] == json!(written)) {
        deltas = device.next_deltas().await.0;
    }
    hub.shutdown().await;
}

#[actix_web::test]
async fn policies_and_the_hub_role_are_in_place() {
    let hub = start(|_| {}).await;
    // Every synced table has row-level security with the tenant policies; the tables had none
    // before, so the policy for other roles is there too.
    let rows = sqlx::query(
        "select c.relname::text as t, c.relrowsecurity as on, \
           array(select polname::text from pg_policy p where p.polrelid = c.oid order by 1) as policies \
         from pg_class c where c.oid = any(array['work_orders', 'products', 'synchub.log_groups', 'synchub.log_device_ranges', 'synchub.tenants']::regclass[]) order by 1",
    )
    .fetch_all(&hub.db)
    .await
    .unwrap();
    for r in rows {
        let (table, on, policies): (String, bool, Vec<String>) = (r.get("t"), r.get("on"), r.get("policies"));
        assert!(on, "{table}");
        assert!(policies.contains(&"synchub_tenant_only".to_string()) && policies.contains(&"synchub_tenant_rows".to_string()), "{table}: {policies:?}");
        assert_eq!(policies.contains(&"synchub_other_roles".to_string()), !table.starts_with("log_") && table != "tenants", "{table}");
    }
    // So does every table of the hub's own that has a tenant_id column, a table added by a
    // later migration too.
    let hub_tables = sqlx::query(
        "select c.relname::text as t, c.relrowsecurity as on, \
           array(select polname::text from pg_policy p where p.polrelid = c.oid order by 1) as policies \
         from pg_class c where c.relnamespace = 'synchub'::regnamespace and c.relkind = 'r' \
           and exists (select from pg_attribute a where a.attrelid = c.oid and a.attname = 'tenant_id' and not a.attisdropped) order by 1",
    )
    .fetch_all(&hub.db)
    .await
    .unwrap();
    let names: Vec<String> = hub_tables.iter().map(|r| r.get("t")).collect();
    assert!(names.contains(&"clock_writers".to_string()) && names.contains(&"row_versions".to_string()), "{names:?}");
    for r in hub_tables {
        let (table, on, policies): (String, bool, Vec<String>) = (r.get("t"), r.get("on"), r.get("policies"));
        assert!(on, "{table}");
        assert!(policies.contains(&"synchub_tenant_only".to_string()) && policies.contains(&"synchub_tenant_rows".to_string()), "{table}: {policies:?}");
    }
    // The capture function runs as its owner, with a fixed search_path.
    let (definer, config): (bool, Vec<String>) =
        sqlx::query_as("select prosecdef, coalesce(proconfig, '{}') from pg_proc where oid = 'synchub.capture_change'::regproc")
            .fetch_one(&hub.db)
            .await
            .unwrap();
    assert!(definer);
    assert!(config.iter().any(|c| c.starts_with("search_path=")), "{config:?}");
    hub.shutdown().await;
}

#[actix_web::test]
async fn an_application_that_had_row_level_security_keeps_its_own_policies() {
    let url = fresh_database().await;
    let db = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::raw_sql(FIELD_SERVICE_SQL).execute(&db).await.unwrap();
    // The application's own rule: its role `app_reader` sees open work orders only.
    let reader = format!("app_{}", Uuid::new_v4().simple());
    sqlx::raw_sql(&format!(
        "create role {reader} nologin; grant select on work_orders to {reader}; \
         alter table work_orders enable row level security; \
         create policy open_only on work_orders for select to {reader} using (status = 'open'); \
         insert into work_orders (tenant_id, id, title, status) values ('acme', gen_random_uuid(), 'a', 'open'), ('acme', gen_random_uuid(), 'b', 'done')"
    ))
    .execute(&db)
    .await
    .unwrap();
    let mut config = test_config(url.clone());
    config.tables.push(TableConfig { name: "work_orders".into(), tenant_column: "tenant_id".into(), policy: MergePolicy::Lww, ..Default::default() });
    let running = synchub::server::start(config).await.expect("hub starts");
    let hub = TestHub { addr: running.addr, running: Some(running), db, database_url: url };
    let policies: Vec<String> =
        sqlx::query_scalar("select polname::text from pg_policy where polrelid = 'work_orders'::regclass order by 1")
            .fetch_all(&hub.db)
            .await
            .unwrap();
    assert_eq!(policies, vec!["open_only", "synchub_tenant_only", "synchub_tenant_rows"]);
    let mut tx = hub.db.begin().await.unwrap();
    sqlx::query(&format!("set local role {reader}")).execute(&mut *tx).await.unwrap();
    let seen: i64 = sqlx::query_scalar("select count(*) from work_orders").fetch_one(&mut *tx).await.unwrap();
    assert_eq!(seen, 1, "the application's policy still decides for its role");
    tx.rollback().await.unwrap();
    // And the hub writes under its tenant role.
    let mut device = connect(&hub, "acme", "mia", "Manager", "office-1").await;
    let id = Uuid::new_v4();
    let r = device.push(vec![upsert("work_orders", json!({"id": id}), json!({"title": "c"}), 1, now_ms(), 0)]).await;
    assert_eq!(r[0].status, ChangeStatus::Applied);
    hub.shutdown().await;
}

#[actix_web::test]
async fn tables_registered_before_the_migration_are_secured_and_still_captured() {
    let url = fresh_database().await;
    let db = sqlx::PgPool::connect(&url).await.unwrap();
    // The hub as it was before row-level security: migrations up to 0004, a registered table.
    let mut earlier = sqlx::migrate::Migrator::new(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations")))
        .await
        .unwrap();
    earlier.migrations = std::borrow::Cow::Owned(earlier.migrations.iter().filter(|m| m.version < 5).cloned().collect());
    earlier.run(&db).await.unwrap();
    sqlx::query("select synchub.register_table('products', 'tenant_id')").execute(&db).await.unwrap();
    synchub::storage::MIGRATOR.run(&db).await.unwrap();

    let policies: i64 = sqlx::query_scalar("select count(*) from pg_policy where polrelid = 'products'::regclass")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(policies, 3);
    let id = Uuid::new_v4();
    sqlx::query("insert into products (tenant_id, id, sku, name, price_cents) values ('acme', $1, 'S', 'n', 1)")
        .bind(id)
        .execute(&db)
        .await
        .unwrap();
    let (table, pk): (String, Value) = sqlx::query_as("select table_name, pk from synchub.change_log where tenant_id = 'acme'")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!((table.as_str(), pk), ("products", json!({"id": id})));
}

#[actix_web::test]
async fn the_hub_runs_without_row_level_security_when_switched_off() {
    let hub = start(|c| {
        c.row_level_security = false;
        c.rules.clear();
    })
    .await;
    let (w1, _, _) = seed(&hub, "acme").await;
    let mut device = connect(&hub, "acme", "emp-1", "Employee", "tablet-1").await;
    // No rules: an employee writes anything.
    let r = device.push(vec![upsert("work_orders", json!({"id": w1}), json!({"cost_cents": 1}), 1, now_ms() + 5, 0)]).await;
    assert!(r[0].status != ChangeStatus::Rejected && r[0].seq.is_some(), "{r:?}");
    // The tables the hub registered without row-level security carry no synchub policy.
    let policies: i64 = sqlx::query_scalar("select count(*) from pg_policy where polrelid = 'work_orders'::regclass")
        .fetch_one(&hub.db)
        .await
        .unwrap();
    assert_eq!(policies, 0);
    hub.shutdown().await;
}

/// The scans of `relation` in a plan from `explain (format json)`.
fn scans_of<'a>(plan: &'a Value, relation: &str) -> Vec<&'a Value> {
    fn walk<'a>(node: &'a Value, relation: &str, out: &mut Vec<&'a Value>) {
        if node.get("Relation Name").and_then(Value::as_str) == Some(relation) {
            out.push(node);
        }
        for child in node.get("Plans").and_then(Value::as_array).into_iter().flatten() {
            walk(child, relation, out);
        }
    }
    let mut found = Vec::new();
    walk(&plan[0]["Plan"], relation, &mut found);
    found
}

/// Under the tenant role's policies, only leakproof comparisons may drive an index; the merge's
/// row read must still find each row's version by an index probe, not by filtering every
/// version row of the tenant's table (which made merging slow down as tables grew).
#[actix_web::test]
async fn the_merge_reads_versions_by_index_under_row_level_security() {
    let hub = start(|_| {}).await;
    seed(&hub, "acme").await;
    let store = hub.running.as_ref().unwrap().hub.store.clone();
    let schema = store.catalog().get("work_orders").cloned().expect("registered");
    let keys = vec![json!({"id": Uuid::new_v4()}), json!({"id": Uuid::new_v4()})];
    // The read alone, and the read that locks the group's cursors as well.
    for (sql, devices) in [(&schema.read_sql, None), (&schema.read_locking_cursors_sql, Some(vec!["tab-1"]))] {
        let mut tx = hub.db.begin().await.unwrap();
        sqlx::raw_sql("set local role synchub_tenant; select set_config('synchub.tenant', 'acme', true)").execute(&mut *tx).await.unwrap();
        let explain = format!("explain (format json) {sql}");
        let mut query = sqlx::query_scalar(&explain).bind("acme").bind(&keys);
        if let Some(devices) = &devices {
            query = query.bind(devices);
        }
        let plan: Value = query.fetch_one(&mut *tx).await.unwrap();
        tx.rollback().await.unwrap();
        let found = scans_of(&plan, "row_versions");
        assert_eq!(found.len(), 1, "{plan:#}");
        let index_cond = found[0]["Index Cond"].as_str().unwrap_or_default();
        assert!(index_cond.contains("pk_text"), "the key is not an index condition: {:#}", found[0]);
        assert_eq!(scans_of(&plan, "device_cursors").len(), usize::from(devices.is_some()), "{plan:#}");
    }
}

/// Tables are often younger than the planner's statistics. The merge's writes must still find
/// each row by a key probe: a plan cached while a table held a few thousand rows joined the
/// batch to every row of the table, read through the key index, for each update (tens of
/// milliseconds per write, and more as the table grew).
#[actix_web::test]
async fn the_merge_writes_rows_by_key_probes_whatever_the_statistics() {
    let hub = start(|_| {}).await;
    seed(&hub, "acme").await;
    // Another tenant's rows, never analyzed.
    sqlx::query("insert into work_orders (tenant_id, id, title) select 'globex', gen_random_uuid(), 'order ' || i from generate_series(1, 1500) i")
        .execute(&hub.db)
        .await
        .unwrap();
    let store = hub.running.as_ref().unwrap().hub.store.clone();
    let schema = store.catalog().get("work_orders").cloned().expect("registered");
    let tenant = synchub::ids::TenantId::new("acme");
    let batch = json!([{"id": Uuid::new_v4(), "title": "renamed"}]).to_string();
    let statements = [("update", schema.update_sql(&["title"])), ("delete", schema.delete_sql.clone())];
    let settings = [synchub::storage::apply::MERGE_SETTINGS, synchub::storage::apply::LARGE_GROUP_SETTINGS];
    for ((name, sql), settings) in statements.iter().flat_map(|s| settings.iter().map(move |t| (s, t))) {
        let mut conn = hub.db.acquire().await.unwrap();
        // The merge's own settings, and the plan a connection caches after a few runs.
        let begin = store.tenant_begin_sql(&tenant, "begin", settings, "set local plan_cache_mode = force_generic_plan");
        sqlx::raw_sql(&begin).execute(&mut *conn).await.unwrap();
        sqlx::raw_sql(&format!("prepare write(text, jsonb) as {sql}")).execute(&mut *conn).await.unwrap();
        let plan: Value = sqlx::query_scalar(&format!("explain (format json) execute write('acme', '{batch}')"))
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        sqlx::raw_sql("rollback; deallocate write").execute(&mut *conn).await.unwrap();
        // The table's reads (the update or delete node names the table too).
        let found: Vec<&Value> = scans_of(&plan, "work_orders").into_iter().filter(|n| n["Node Type"] != "ModifyTable").collect();
        assert_eq!(found.len(), 1, "{name}: {plan:#}");
        let index_cond = found[0]["Index Cond"].as_str().unwrap_or_default();
        assert!(index_cond.contains("id ="), "{name}: the key is not an index condition: {plan:#}");
    }
    hub.shutdown().await;
}
