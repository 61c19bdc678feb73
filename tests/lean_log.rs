//! The lean log (migration 0015): a deployment's log written in the old format (one row per
//! change) moves into records, and everything that read it still reads the same: the SQL view,
//! catch-up, acks of re-sent changes, trimming (also in the middle of a record).

mod common;

use std::borrow::Cow;

use common::*;
use protocol::{ChangeStatus, ErrorCode, Position, ServerFrame};
use serde_json::{json, Value};
use uuid::Uuid;

const TENANT: &str = "store-a";
const PRODUCT: &str = "00000000-0000-4000-8000-0000000000a1";
/// Device changes written in the old format, after three SQL writes.
const DEVICE_CHANGES: i64 = 600;

/// The migrations before the lean log.
async fn migrate_to_old_format(pool: &sqlx::PgPool) {
    let old = sqlx::migrate::Migrator {
        migrations: Cow::Owned(synchub::storage::MIGRATOR.iter().filter(|m| m.version < 15).cloned().collect()),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    old.run(pool).await.unwrap();
}

/// A log as the hub wrote it before: SQL writes through the capture trigger, then a device's
/// updates as the group commit logged them, and a second tenant whose log was trimmed.
async fn write_old_log(pool: &sqlx::PgPool) {
    sqlx::raw_sql(&format!(
        "select synchub.register_table('products', 'tenant_id'); \
         insert into products (tenant_id, id, sku, name, price_cents) values \
           ('{TENANT}', '{PRODUCT}', 'ESP-01', 'Espresso', 250), \
           ('{TENANT}', gen_random_uuid(), 'FLW-01', 'Flat white', 380), \
           ('store-b', gen_random_uuid(), 'CRS-01', 'Croissant', 290); \
         update synchub.tenants set head_seq = 0 where tenant_id = 'store-b'; \
         delete from synchub.change_log where tenant_id = 'store-b'; \
         begin; \
         set local synchub.origin = 'hub'; \
         update products set stock = {DEVICE_CHANGES} where tenant_id = '{TENANT}' and id = '{PRODUCT}'; \
         insert into synchub.change_log (tenant_id, seq, table_name, op, pk, new_row, old_values, written, origin_device, \
           user_id, change_id, device_seq, hlc_wall_ms, hlc_counter) \
         select '{TENANT}', 2 + n, 'products', 'update', jsonb_build_object('id', '{PRODUCT}'), \
           json_build_object('tenant_id', '{TENANT}', 'id', '{PRODUCT}', 'sku', 'ESP-01', 'name', 'Espresso', 'price_cents', 250, 'stock', n), \
           json_build_object('stock', n - 1), json_build_object('stock', n), 'pos-1', 'user-pos-1', gen_random_uuid(), n, \
           1700000000000 + n, 0 \
         from generate_series(1, {DEVICE_CHANGES}) n; \
         update synchub.tenants set head_seq = 2 + {DEVICE_CHANGES} where tenant_id = '{TENANT}'; \
         update synchub.row_versions set version = 2 + {DEVICE_CHANGES}, \
           clocks = clocks || jsonb_build_object('stock', jsonb_build_array(1700000000000 + {DEVICE_CHANGES}, 0, 'pos-1', 2 + {DEVICE_CHANGES}, 'user-pos-1')) \
          where tenant_id = '{TENANT}' and pk = jsonb_build_object('id', '{PRODUCT}'); \
         insert into synchub.device_cursors (tenant_id, device_id, last_device_seq, user_id) values ('{TENANT}', 'pos-1', {DEVICE_CHANGES}, 'user-pos-1'); \
         insert into synchub.change_log (tenant_id, seq, table_name, op, pk, new_row, old_values, written, origin_device, \
           user_id, change_id, device_seq, hlc_wall_ms, hlc_counter) \
         select 'store-b', n, 'customers', 'insert', jsonb_build_object('id', n), json_build_object('id', n, 'name', 'c' || n), \
           null, json_build_object('name', 'c' || n), 'pos-9', null, gen_random_uuid(), n, 1700000000000 + n, 1 \
         from generate_series(101, 150) n; \
         update synchub.tenants set head_seq = 150, log_floor = 100 where tenant_id = 'store-b'; \
         commit;"
    ))
    .execute(pool)
    .await
    .unwrap();
}

/// Every change of the log, as the `change_log` table (before) or view (after) shows it.
async fn whole_log(pool: &sqlx::PgPool) -> Value {
    sqlx::query_scalar(
        "select jsonb_agg(to_jsonb(x) order by tenant_id, seq) from (select tenant_id, seq, table_name, op, pk, new_row::jsonb, \
           old_values::jsonb, written::jsonb, origin_device, user_id, change_id, device_seq, hlc_wall_ms, hlc_counter \
         from synchub.change_log) x",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// A hello from `seq`, repeated until it is answered with must_resync (hellos are answered
/// from the tenant actor's memory of the floor, which follows trim_log's notification); the
/// reason.
async fn must_resync_from(hub: &TestHub, tenant: &str, epoch: &str, seq: u64) -> ErrorCode {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let mut c = hub.client().await;
        c.hello(&token(tenant, "u", "Employee", Some("resyncing")), None, Some(Position { epoch: epoch.into(), seq })).await;
        match c.recv().await {
            ServerFrame::MustResync { reason, .. } => return reason,
            other if std::time::Instant::now() > deadline => panic!("expected must_resync, got {other:?}"),
            _ => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
}

#[actix_web::test]
async fn a_log_in_the_old_format_migrates_and_reads_the_same() {
    let url = fresh_database().await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    migrate_to_old_format(&pool).await;
    write_old_log(&pool).await;
    let before = whole_log(&pool).await;
    assert_eq!(before.as_array().unwrap().len(), 2 + DEVICE_CHANGES as usize + 50);
    assert_eq!(before[0]["origin_device"], Value::Null, "the first entries are SQL writes");

    // The hub migrates on start.
    let hub = TestHub::start_on(url, |_| {}).await;
    assert_eq!(whole_log(&hub.db).await, before, "the view shows the log as the table did");
    let records: i64 = sqlx::query_scalar("select count(*) from synchub.log_groups where tenant_id = $1").bind(TENANT).fetch_one(&hub.db).await.unwrap();
    assert!(records < 10, "{records} records for {} changes", 2 + DEVICE_CHANGES);

    // Catch-up from the start: every change once, in order, as logged.
    let epoch: String = sqlx::query_scalar("select epoch from synchub.tenants where tenant_id = $1").bind(TENANT).fetch_one(&hub.db).await.unwrap();
    let mut fresh = hub.client().await;
    fresh.hello(&token(TENANT, "user-pos-3", "Employee", Some("pos-3")), None, Some(Position { epoch: epoch.clone(), seq: 0 })).await;
    let (deltas, upto) = fresh.until_up_to_date().await;
    assert_eq!(upto, 2 + DEVICE_CHANGES as u64);
    assert_eq!(deltas.iter().map(|d| d.seq).collect::<Vec<_>>(), (1..=upto).collect::<Vec<_>>());
    let tenth = &deltas[9];
    assert_eq!((tenth.origin.as_deref(), tenth.old.as_ref().map(|o| o["stock"].clone())), (Some("pos-1"), Some(json!(7))));
    assert_eq!(tenth.row.as_ref().unwrap()["stock"], json!(8));

    // A re-sent change of the old log is acked with the seq it was committed at; the next one
    // is new.
    let (mut pos1, _, _) = Client::device(&hub, TENANT, "pos-1").await;
    let logged_id: Uuid = sqlx::query_scalar("select change_id from synchub.change_log where tenant_id = $1 and device_seq = 5")
        .bind(TENANT)
        .fetch_one(&hub.db)
        .await
        .unwrap();
    let resent = protocol::Change { change_id: logged_id, ..upsert("products", json!({"id": PRODUCT}), json!({"stock": 5}), 5, now_ms(), 0) };
    let next = upsert("products", json!({"id": PRODUCT}), json!({"stock": 1000}), DEVICE_CHANGES as u64 + 1, now_ms(), 2 + DEVICE_CHANGES as u64);
    let results = pos1.push(vec![resent]).await;
    assert_eq!((results[0].status, results[0].seq), (ChangeStatus::Duplicate, Some(2 + 5)));
    let results = pos1.push(vec![next]).await;
    assert_eq!((results[0].status, results[0].seq), (ChangeStatus::Applied, Some(3 + DEVICE_CHANGES as u64)));
    // And a change of the new format, re-sent, too.
    let again = pos1.push(vec![upsert("products", json!({"id": PRODUCT}), json!({"stock": 1000}), DEVICE_CHANGES as u64 + 1, now_ms(), 0)]).await;
    assert_eq!((again[0].status, again[0].seq), (ChangeStatus::Duplicate, Some(3 + DEVICE_CHANGES as u64)));

    // SQL readers: the tenant's changes after a seq.
    let after: Vec<i64> = sqlx::query_scalar("select seq from synchub.change_log_after($1, 600)").bind(TENANT).fetch_all(&hub.db).await.unwrap();
    assert_eq!(after, vec![601, 602, 603]);

    // The trimmed tenant keeps its floor: below it must resync, from it the rest arrives.
    let b_epoch: String = sqlx::query_scalar("select epoch from synchub.tenants where tenant_id = 'store-b'").fetch_one(&hub.db).await.unwrap();
    assert_eq!(must_resync_from(&hub, "store-b", &b_epoch, 99).await, ErrorCode::PositionTooOld);
    let mut at = hub.client().await;
    at.hello(&token("store-b", "u", "Employee", Some("b-2")), None, Some(Position { epoch: b_epoch, seq: 100 })).await;
    let (deltas, _) = at.until_up_to_date().await;
    assert_eq!(deltas.iter().map(|d| d.seq).collect::<Vec<_>>(), (101..=150).collect::<Vec<_>>());
    hub.shutdown().await;
}

#[actix_web::test]
async fn trimming_in_the_middle_of_a_record_serves_exactly_the_seqs_after_the_floor() {
    let hub = TestHub::start().await;
    let (mut d, epoch, _) = Client::device(&hub, TENANT, "pos-1").await;
    // One push, one record of 20 changes (seqs 1..=20), then a second record (21..=30).
    let products = |seqs: std::ops::RangeInclusive<u64>| -> Vec<protocol::Change> {
        seqs.map(|n| {
            let id = Uuid::now_v7();
            upsert("products", json!({"id": id}), product(id, "Tea", n as i64), n, now_ms(), 0)
        })
        .collect()
    };
    let first = products(1..=20);
    assert!(d.push(first).await.iter().all(|r| r.status == ChangeStatus::Applied));
    let second = products(21..=30);
    assert!(d.push(second).await.iter().all(|r| r.status == ChangeStatus::Applied));
    let records: Vec<(i64, i64)> = sqlx::query_as("select first_seq, last_seq from synchub.log_groups where tenant_id = $1 order by last_seq")
        .bind(TENANT)
        .fetch_all(&hub.db)
        .await
        .unwrap();
    assert_eq!(records, vec![(1, 20), (21, 30)], "one record per group commit");

    // Trim up to seq 12, inside the first record: it stays (it holds 13..=20).
    let removed: i64 = sqlx::query_scalar("select synchub.trim_log($1, 12)").bind(TENANT).fetch_one(&hub.db).await.unwrap();
    assert_eq!(removed, 12, "the log no longer serves 1..=12, though their record stays");
    assert_eq!(must_resync_from(&hub, TENANT, &epoch, 11).await, ErrorCode::PositionTooOld);
    let mut at = hub.client().await;
    at.hello(&token(TENANT, "u", "Employee", Some("pos-9")), None, Some(Position { epoch: epoch.clone(), seq: 12 })).await;
    let (deltas, _) = at.until_up_to_date().await;
    assert_eq!(deltas.iter().map(|d| d.seq).collect::<Vec<_>>(), (13..=30).collect::<Vec<_>>());

    // Past the first record's end, it goes; the second stays whole.
    let removed: i64 = sqlx::query_scalar("select synchub.trim_log($1, 22)").bind(TENANT).fetch_one(&hub.db).await.unwrap();
    assert_eq!(removed, 10, "13..=22");
    assert_eq!(must_resync_from(&hub, TENANT, &epoch, 21).await, ErrorCode::PositionTooOld);
    let mut after = hub.client().await;
    after.hello(&token(TENANT, "u", "Employee", Some("pos-7")), None, Some(Position { epoch, seq: 22 })).await;
    let (deltas, _) = after.until_up_to_date().await;
    assert_eq!(deltas.iter().map(|d| d.seq).collect::<Vec<_>>(), (23..=30).collect::<Vec<_>>());
    hub.shutdown().await;
}

/// A group's settings make its statements find rows by key even when the planner's statistics
/// are behind: here they say the tenant has one version row and it has 3,001. Without
/// `enable_bitmapscan` and `enable_hashjoin` off, the update of version rows by key read all of
/// the tenant's version rows in a bitmap scan and joined them by hash.
#[actix_web::test]
async fn a_group_updates_version_rows_by_key_whatever_the_statistics_say() {
    use synchub::storage::apply::{LARGE_GROUP_SETTINGS, MERGE_SETTINGS};
    let hub = TestHub::start().await;
    sqlx::raw_sql(
        "alter table synchub.row_versions set (autovacuum_enabled = off); \
         insert into synchub.row_versions (tenant_id, table_name, pk, version, clocks) values ('shop', 'products', '{\"id\": \"0\"}', 1, '[]'); \
         analyze synchub.row_versions; \
         insert into synchub.row_versions (tenant_id, table_name, pk, version, clocks) \
           select 'shop', 'products', jsonb_build_object('id', i::text), 1, '[]' from generate_series(1, 3000) i",
    )
    .execute(&hub.db)
    .await
    .unwrap();
    let keys: Vec<Value> = (1..=100).map(|i| json!({ "id": (i * 30).to_string() })).collect();
    let tables = vec!["products"; keys.len()];
    let versions = vec![2_i64; keys.len()];
    for settings in [MERGE_SETTINGS, LARGE_GROUP_SETTINGS] {
        let mut tx = hub.db.begin().await.unwrap();
        for (name, value) in settings {
            sqlx::query("select set_config($1, $2, true)").bind(name).bind(value).execute(&mut *tx).await.unwrap();
        }
        // The shape of the bookkeeping statement's update of the version rows a group found.
        let plan: Value = sqlx::query_scalar(
            "explain (format json) update synchub.row_versions v set version = x.v \
             from (select t, k::text as k_text, v from unnest($1::text[], $2::jsonb[], $3::int8[]) as x(t, k, v) offset 0) x \
             where v.tenant_id = $4 and v.table_name = x.t and v.pk_text = x.k_text",
        )
        .bind(&tables)
        .bind(&keys)
        .bind(&versions)
        .bind("shop")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        let plan = plan.to_string();
        assert!(plan.contains("\"Index Scan\"") && plan.contains("\"Nested Loop\""), "found by key: {plan}");
        assert!(!plan.contains("Bitmap Heap Scan") && !plan.contains("Hash Join"), "not by the tenant's every row: {plan}");
        tx.rollback().await.unwrap();
    }
}
