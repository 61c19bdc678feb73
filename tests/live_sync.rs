//! Two devices of one tenant in live sync, and a plain SQL write reaching a device.

mod common;

use common::*;
use protocol::{ChangeStatus, Op};
use serde_json::json;
use uuid::Uuid;

#[actix_web::test]
async fn two_devices_in_live_sync() {
    let hub = TestHub::start().await;
    let (mut a, _, _) = Client::device(&hub, "store-1", "pos-a").await;
    let (mut b, _, _) = Client::device(&hub, "store-1", "pos-b").await;

    let id = Uuid::new_v4();
    let results = a.push(vec![upsert("products", json!({"id": id}), product(id, "Latte", 420), 1, now_ms(), 0)]).await;
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].status, ChangeStatus::Applied);
    let seq = results[0].seq.expect("committed at a seq");

    let (deltas, frame_seq) = b.next_deltas().await;
    assert_eq!(frame_seq, seq);
    assert_eq!(deltas.len(), 1);
    let d = &deltas[0];
    assert_eq!((d.seq, d.op, d.table.as_str(), d.origin.as_deref()), (seq, Op::Upsert, "products", Some("pos-a")));
    let row = d.row.as_ref().unwrap();
    assert_eq!(row["name"], json!("Latte"));
    assert_eq!(row["price_cents"], json!(420));
    assert_eq!(row["tenant_id"], json!("store-1"), "tenant column filled from the token");

    // B answers; A receives it, and never an echo of its own change.
    let results = b.push(vec![upsert("products", json!({"id": id}), json!({"price_cents": 450}), 1, now_ms(), seq)]).await;
    assert_eq!(results[0].status, ChangeStatus::Applied);
    let (deltas, _) = a.next_deltas().await;
    assert_eq!(deltas.len(), 1);
    assert_eq!(deltas[0].origin.as_deref(), Some("pos-b"));
    assert_eq!(deltas[0].old.as_ref().unwrap()["price_cents"], json!(420));
    assert_eq!(deltas[0].row.as_ref().unwrap()["price_cents"], json!(450));

    let stored: i32 = sqlx::query_scalar("select price_cents from products where id = $1").bind(id).fetch_one(&hub.db).await.unwrap();
    assert_eq!(stored, 450);
    hub.shutdown().await;
}

#[actix_web::test]
async fn a_row_written_twice_in_one_batch_logs_old_values_of_what_the_second_write_changed() {
    let hub = TestHub::start().await;
    let (mut a, _, _) = Client::device(&hub, "store-1", "pos-a").await;
    let (mut b, _, _) = Client::device(&hub, "store-1", "pos-b").await;
    let id = Uuid::new_v4();
    let t = now_ms();
    a.push(vec![
        upsert("products", json!({"id": id}), product(id, "Latte", 420), 1, t, 0),
        upsert("products", json!({"id": id}), json!({"price_cents": 450}), 2, t + 1, 0),
    ])
    .await;
    let mut deltas = Vec::new();
    while deltas.len() < 2 {
        deltas.extend(b.next_deltas().await.0);
    }
    assert_eq!(deltas[0].old, None, "an insert has no old values");
    assert_eq!(deltas[1].old, Some(obj(json!({"price_cents": 420}))), "only the column the second write changed");
    assert_eq!(deltas[1].row.as_ref().unwrap()["price_cents"], json!(450));
    let logged: Option<serde_json::Value> = sqlx::query_scalar("select old_values from synchub.change_log where seq = $1 and tenant_id = 'store-1'")
        .bind(deltas[1].seq as i64)
        .fetch_one(&hub.db)
        .await
        .unwrap();
    assert_eq!(logged, Some(json!({"price_cents": 420})));
    hub.shutdown().await;
}

#[actix_web::test]
async fn plain_sql_write_reaches_a_device() {
    let hub = TestHub::start().await;
    let (mut a, _, _) = Client::device(&hub, "store-1", "pos-a").await;
    let id = Uuid::new_v4();
    sqlx::query("insert into products (tenant_id, id, sku, name, price_cents) values ('store-1', $1, 'BO-1', 'Back office bagel', 199)")
        .bind(id)
        .execute(&hub.db)
        .await
        .unwrap();
    sqlx::query("update products set price_cents = 209 where id = $1").bind(id).execute(&hub.db).await.unwrap();
    // Another tenant's write must not arrive.
    sqlx::query("insert into products (tenant_id, id, sku, name, price_cents) values ('store-2', $1, 'X', 'Other', 1)")
        .bind(Uuid::new_v4())
        .execute(&hub.db)
        .await
        .unwrap();

    let mut seen = Vec::new();
    while seen.len() < 2 {
        let (deltas, _) = a.next_deltas().await;
        seen.extend(deltas);
    }
    assert_eq!(seen[0].op, Op::Upsert);
    assert_eq!(seen[0].origin, None, "SQL writes have no origin device");
    assert_eq!(seen[0].row.as_ref().unwrap()["name"], json!("Back office bagel"));
    assert_eq!(seen[1].old.as_ref().unwrap(), &obj(json!({"price_cents": 199})));
    assert_eq!(seen[1].seq, seen[0].seq + 1);
    assert!(a.recv_timeout(std::time::Duration::from_millis(300)).await.is_none(), "nothing of store-2 arrives");
    hub.shutdown().await;
}

/// The tenant actor's next group expects the head its last one left; a plain SQL write in
/// between moves it, and the group is redone at the right seq: the log stays gap-free.
#[actix_web::test]
async fn pushes_around_a_plain_sql_write_keep_the_log_gap_free() {
    let hub = TestHub::start().await;
    let (mut a, _, _) = Client::device(&hub, "store-1", "pos-a").await;
    let (mut b, _, _) = Client::device(&hub, "store-1", "pos-b").await;
    let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
    let results = a.push(vec![upsert("products", json!({"id": first}), product(first, "Tea", 300), 1, now_ms(), 0)]).await;
    let pushed_at = results[0].seq.expect("committed");
    sqlx::query("insert into products (tenant_id, id, sku, name, price_cents) values ('store-1', $1, 'BO-2', 'Back office scone', 250)")
        .bind(Uuid::new_v4())
        .execute(&hub.db)
        .await
        .unwrap();
    let results = a.push(vec![upsert("products", json!({"id": second}), product(second, "Juice", 350), 2, now_ms(), 0)]).await;
    assert_eq!(results[0].status, ChangeStatus::Applied);
    assert_eq!(results[0].seq, Some(pushed_at + 2), "after the SQL write's seq");

    let mut seen = Vec::new();
    while seen.len() < 3 {
        seen.extend(b.next_deltas().await.0);
    }
    let seqs: Vec<u64> = seen.iter().map(|d| d.seq).collect();
    assert_eq!(seqs, vec![pushed_at, pushed_at + 1, pushed_at + 2]);
    assert_eq!(seen[1].origin, None);
    let logged: Vec<i64> = sqlx::query_scalar("select seq from synchub.change_log where tenant_id = 'store-1' order by seq")
        .fetch_all(&hub.db)
        .await
        .unwrap();
    assert_eq!(logged, (1..=logged.len() as i64).collect::<Vec<_>>(), "one entry per seq, none missing");
    assert_eq!(logged.last().copied(), Some(pushed_at as i64 + 2));
    hub.shutdown().await;
}

/// The tenant actor keeps the rows its groups wrote and merges the next group into them
/// without reading them again; a plain SQL write in between moves the tenant's head, and the
/// group is merged against the row as the SQL write left it.
#[actix_web::test]
async fn a_plain_sql_write_between_pushes_is_merged_against_not_the_row_the_hub_kept() {
    let hub = TestHub::start().await;
    let (mut a, _, _) = Client::device(&hub, "store-1", "pos-a").await;
    let id = Uuid::new_v4();
    let results = a.push(vec![upsert("products", json!({"id": id}), product(id, "Tea", 300), 1, now_ms(), 0)]).await;
    let inserted_at = results[0].seq.expect("committed");
    sqlx::query("update products set name = 'Back office tea' where id = $1").bind(id).execute(&hub.db).await.unwrap();

    // The device had seen the row at its insert: the SQL write changed another field.
    let results = a.push(vec![upsert("products", json!({"id": id}), json!({"price_cents": 350}), 2, now_ms(), inserted_at)]).await;
    assert_eq!(results[0].status, ChangeStatus::Merged, "the row changed since the device saw it");
    assert_eq!(results[0].seq, Some(inserted_at + 2), "after the SQL write's seq");
    let row = results[0].row.as_ref().expect("a merged result carries the row");
    assert_eq!((row["name"].clone(), row["price_cents"].clone()), (json!("Back office tea"), json!(350)));
    let (old, new): (Option<serde_json::Value>, Option<serde_json::Value>) =
        sqlx::query_as("select old_values, new_row from synchub.change_log where tenant_id = 'store-1' and seq = $1")
            .bind(inserted_at as i64 + 2)
            .fetch_one(&hub.db)
            .await
            .unwrap();
    assert_eq!(old, Some(json!({"price_cents": 300})));
    assert_eq!(new.unwrap()["name"], json!("Back office tea"));
    hub.shutdown().await;
}

/// The hub writes a row's field clocks in the compact form and the capture trigger merges a SQL
/// write's clocks into them: the fields SQL did not write keep the device's clocks, and a later
/// stale write from another device still loses to them.
#[actix_web::test]
async fn a_plain_sql_write_keeps_the_clocks_of_the_fields_it_did_not_write() {
    let hub = TestHub::start().await;
    let (mut a, _, _) = Client::device(&hub, "store-1", "pos-a").await;
    let id = Uuid::new_v4();
    let t = now_ms();
    let results = a.push(vec![upsert("products", json!({"id": id}), product(id, "Tea", 300), 1, t, 0)]).await;
    let inserted_at = results[0].seq.expect("committed");
    let clocks = || async {
        let (stored, read): (String, serde_json::Value) =
            sqlx::query_as("select clocks, synchub.field_clocks(clocks) from synchub.row_versions where tenant_id = 'store-1' and pk = $1")
                .bind(json!({"id": id}))
                .fetch_one(&hub.db)
                .await
                .unwrap();
        (stored, read)
    };
    let (stored, read) = clocks().await;
    assert!(stored.starts_with('['), "the hub writes the compact form: {stored}");
    let device_clock = json!([t, 0, "pos-a", inserted_at, "user-pos-a"]);
    assert_eq!(read["price_cents"], device_clock);
    assert_eq!(read["name"], device_clock);

    sqlx::query("update products set name = 'Back office tea' where id = $1").bind(id).execute(&hub.db).await.unwrap();
    let (_, read) = clocks().await;
    assert_eq!(read["price_cents"], device_clock, "a field SQL did not write keeps its clock");
    assert_eq!(read["sku"], device_clock);
    assert_eq!((&read["name"][2], &read["name"][3]), (&json!(""), &json!(inserted_at + 1)), "SQL's clock on the field it wrote");

    // Another device's write of price_cents, made before pos-a's, loses to pos-a's clock.
    let (mut b, _, _) = Client::device(&hub, "store-1", "pos-b").await;
    let results = b.push(vec![upsert("products", json!({"id": id}), json!({"price_cents": 999}), 1, t - 1_000, 0)]).await;
    assert_eq!(results[0].status, ChangeStatus::Conflict, "{:?}", results[0]);
    assert_eq!(results[0].lost_fields, vec!["price_cents".to_string()]);
    let price: i32 = sqlx::query_scalar("select price_cents from products where id = $1").bind(id).fetch_one(&hub.db).await.unwrap();
    assert_eq!(price, 300);
    hub.shutdown().await;
}

/// A device's clocks name it by its number (`synchub.clock_writers`, given before its first
/// group) rather than by device and user. A hub started again, which has not seen the number,
/// reads it back from Postgres: another device's stale write still loses to it and its conflict
/// names the device. A writer the hub does not number (a plain SQL write) stays named beside
/// numbered ones, and SQL reads every entry by names.
#[actix_web::test]
async fn a_numbered_writer_is_read_back_by_a_hub_that_has_not_seen_its_number() {
    let mut hub = TestHub::start().await;
    let (mut a, _, _) = Client::device(&hub, "store-1", "pos-a").await;
    let id = Uuid::new_v4();
    let t = now_ms();
    let clocks = |db: sqlx::PgPool| async move {
        let (stored, read): (String, serde_json::Value) =
            sqlx::query_as("select clocks, synchub.field_clocks(clocks) from synchub.row_versions where tenant_id = 'store-1' and pk = $1")
                .bind(json!({"id": id}))
                .fetch_one(&db)
                .await
                .unwrap();
        (stored, read)
    };
    let number = |db: sqlx::PgPool, device: &'static str| async move {
        sqlx::query_scalar::<_, i32>("select writer_id from synchub.clock_writers where tenant_id = 'store-1' and device = $1 and user_id = 'user-' || $1")
            .bind(device)
            .fetch_one(&db)
            .await
            .unwrap_or_else(|err| panic!("{device} numbered: {err}"))
    };
    let first = a.push(vec![upsert("products", json!({"id": id}), product(id, "Tea", 300), 1, t, 0)]).await[0].seq.expect("committed");
    let pos_a = number(hub.db.clone(), "pos-a").await;
    let (stored, read) = clocks(hub.db.clone()).await;
    assert!(!stored.contains("pos-a") && stored.contains(&format!(",{pos_a},")), "the device by its number: {stored}");
    assert_eq!(read["price_cents"], json!([t, 0, "pos-a", first, "user-pos-a"]));

    hub.stop().await;
    hub.start_again(|_| {}).await;
    let (mut b, _, _) = Client::device(&hub, "store-1", "pos-b").await;
    let results = b.push(vec![upsert("products", json!({"id": id}), json!({"price_cents": 999, "stock": 4}), 1, t - 1_000, 0)]).await;
    assert_eq!(results[0].status, ChangeStatus::Conflict, "{:?}", results[0]);
    assert_eq!(results[0].lost_fields, vec!["price_cents".to_string()], "pos-a's clock, read by number, wins price_cents");
    let b_stock = results[0].seq.unwrap();
    let (server_device, server_user): (String, Option<String>) =
        sqlx::query_as("select server_device, server_user from synchub.conflicts where tenant_id = 'store-1' and pk = $1 and field = 'price_cents'")
            .bind(json!({"id": id}))
            .fetch_one(&hub.db)
            .await
            .unwrap();
    assert_eq!((server_device.as_str(), server_user.as_deref()), ("pos-a", Some("user-pos-a")));

    // A plain SQL write leaves its clock named (the capture trigger writes the per-field form);
    // the device's next write keeps it so beside the numbered ones.
    sqlx::query("update products set name = 'Back office tea' where id = $1").bind(id).execute(&hub.db).await.unwrap();
    let results = b.push(vec![upsert("products", json!({"id": id}), json!({"sku": "TEA-2"}), 2, now_ms() + 1_000, 0)]).await;
    assert!(results[0].seq.is_some() && results[0].lost_fields.is_empty(), "{:?}", results[0]);
    let pos_b = number(hub.db.clone(), "pos-b").await;
    let (stored, read) = clocks(hub.db.clone()).await;
    assert!(stored.starts_with("[["), "the hub writes the compact form: {stored}");
    assert!(stored.contains(&format!(",{pos_a},")) && stored.contains(&format!(",{pos_b},")) && stored.contains("\"postgres\""), "{stored}");
    assert_eq!(read["price_cents"], json!([t, 0, "pos-a", first, "user-pos-a"]));
    assert_eq!(read["stock"], json!([t - 1_000, 0, "pos-b", b_stock, "user-pos-b"]));
    assert_eq!((&read["name"][2], &read["name"][4]), (&json!(""), &json!("postgres")), "SQL's clock, named");
    assert_eq!(read["sku"][2], json!("pos-b"));
    hub.shutdown().await;
}

/// A group updates in place the version rows it found, and writes again one that SQL run by
/// hand deleted since (the row cache still held the row, and the head did not move).
#[actix_web::test]
async fn a_version_row_deleted_by_hand_is_written_again() {
    let hub = TestHub::start().await;
    let (mut a, _, _) = Client::device(&hub, "store-1", "pos-a").await;
    let id = Uuid::new_v4();
    let version = || async {
        sqlx::query_as::<_, (i64, serde_json::Value)>(
            "select version, synchub.field_clocks(clocks) from synchub.row_versions where tenant_id = 'store-1' and pk = $1",
        )
        .bind(json!({"id": id}))
        .fetch_optional(&hub.db)
        .await
        .unwrap()
    };
    let t = now_ms();
    let results = a.push(vec![upsert("products", json!({"id": id}), product(id, "Tea", 300), 1, t, 0)]).await;
    let inserted_at = results[0].seq.expect("committed");
    let results = a.push(vec![upsert("products", json!({"id": id}), json!({"price_cents": 310}), 2, t + 1, inserted_at)]).await;
    let updated_at = results[0].seq.expect("committed");
    let (v, clocks) = version().await.expect("a version row");
    assert_eq!(v as u64, updated_at, "the version row found was updated");
    assert_eq!(clocks["price_cents"], json!([t + 1, 0, "pos-a", updated_at, "user-pos-a"]));
    assert_eq!(clocks["name"], json!([t, 0, "pos-a", inserted_at, "user-pos-a"]));

    sqlx::query("delete from synchub.row_versions where tenant_id = 'store-1' and pk = $1").bind(json!({"id": id})).execute(&hub.db).await.unwrap();
    let results = a.push(vec![upsert("products", json!({"id": id}), json!({"stock": 4}), 3, t + 2, updated_at)]).await;
    let again_at = results[0].seq.expect("committed");
    let (v, clocks) = version().await.expect("the version row is written again");
    assert_eq!(v as u64, again_at);
    assert_eq!(clocks["stock"], json!([t + 2, 0, "pos-a", again_at, "user-pos-a"]));
    assert_eq!(clocks["price_cents"], json!([t + 1, 0, "pos-a", updated_at, "user-pos-a"]), "with the clocks the hub kept");
    hub.shutdown().await;
}

/// A group whose changes write nothing against the rows the hub kept still checks that no other
/// writer moved the head: here SQL brought a deleted row back, and the device's delete of it
/// must delete it, not be taken for a delete of a row that is already gone.
#[actix_web::test]
async fn a_delete_after_sql_brought_the_row_back_deletes_it() {
    let hub = TestHub::start().await;
    let (mut a, _, _) = Client::device(&hub, "store-1", "pos-a").await;
    let id = Uuid::new_v4();
    let results = a.push(vec![upsert("products", json!({"id": id}), product(id, "Tea", 300), 1, now_ms(), 0)]).await;
    let inserted_at = results[0].seq.expect("committed");
    let results = a.push(vec![delete("products", json!({"id": id}), 2, now_ms(), inserted_at)]).await;
    assert_eq!(results[0].status, ChangeStatus::Applied);
    sqlx::query("insert into products (tenant_id, id, sku, name, price_cents) values ('store-1', $1, 'BO-3', 'Tea again', 310)")
        .bind(id)
        .execute(&hub.db)
        .await
        .unwrap();
    let back_at = inserted_at + 2;

    let results = a.push(vec![delete("products", json!({"id": id}), 3, now_ms(), back_at)]).await;
    assert_eq!(results[0].status, ChangeStatus::Applied);
    assert_eq!(results[0].seq, Some(back_at + 1));
    let left: i64 = sqlx::query_scalar("select count(*) from products where id = $1").bind(id).fetch_one(&hub.db).await.unwrap();
    assert_eq!(left, 0, "the row SQL brought back is deleted");
    hub.shutdown().await;
}

/// Catch-up reads the newest entries from the tenant actor's memory (filled from the log when
/// the actor starts) and older ones from Postgres: every seq arrives once, in order, across the
/// boundary, and live deltas follow.
#[actix_web::test]
async fn catch_up_spans_postgres_and_the_tenant_actors_memory() {
    let first = TestHub::start().await;
    let (mut w, epoch, _) = Client::device(&first, "store-1", "pos-w").await;
    for batch in 0..6u64 {
        let changes = (0..10u64)
            .map(|i| {
                let id = Uuid::new_v4();
                upsert("products", json!({"id": id}), product(id, "Item", 100), batch * 10 + i + 1, now_ms(), 0)
            })
            .collect();
        w.push(changes).await;
    }
    let url = first.database_url.clone();
    first.shutdown().await;

    // A new hub on the same database keeps the latest 25 entries in memory; pages of 7.
    let mut config = test_config(url.clone());
    config.catch_up_cache_deltas = 25;
    config.catch_up_page_changes = 7;
    let running = synchub::server::start(config).await.expect("hub starts");
    let metrics = running.hub.metrics.clone();
    let db = sqlx::PgPool::connect(&url).await.unwrap();
    let hub = TestHub { addr: running.addr, running: Some(running), db, database_url: url };
    // The tenant actor starts with the first session and fills its memory from the log.
    let (mut w, _, _) = Client::device(&hub, "store-1", "pos-w2").await;
    let waited = std::time::Instant::now();
    let mut reader = hub.client().await;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let mut probe = hub.client().await;
        probe.hello(&token("store-1", "user-probe", "Employee", Some("probe")), None, Some(protocol::Position { epoch: epoch.clone(), seq: 59 })).await;
        probe.until_up_to_date().await;
        if metrics.catch_up_pages_from_memory.load(std::sync::atomic::Ordering::Relaxed) > 0 || waited.elapsed().as_secs() > 10 {
            break;
        }
    }
    let memory_before = metrics.catch_up_pages_from_memory.load(std::sync::atomic::Ordering::Relaxed);
    let postgres_before = metrics.catch_up_pages.load(std::sync::atomic::Ordering::Relaxed);
    assert!(memory_before > 0, "the tenant actor's memory serves catch-up");

    reader.hello(&token("store-1", "user-pos-r", "Employee", Some("pos-r")), None, Some(protocol::Position { epoch, seq: 10 })).await;
    let (deltas, seq) = reader.until_up_to_date().await;
    let seqs: Vec<u64> = deltas.iter().map(|d| d.seq).collect();
    assert_eq!(seqs, (11..=60).collect::<Vec<_>>(), "every seq once, in order, across the boundary");
    assert_eq!(seq, 60);
    assert!(metrics.catch_up_pages.load(std::sync::atomic::Ordering::Relaxed) > postgres_before, "older pages come from Postgres");
    assert!(metrics.catch_up_pages_from_memory.load(std::sync::atomic::Ordering::Relaxed) > memory_before, "newer pages from memory");

    let id = Uuid::new_v4();
    let results = w.push(vec![upsert("products", json!({"id": id}), product(id, "Live", 100), 1, now_ms(), 0)]).await;
    let (live, _) = reader.next_deltas().await;
    assert_eq!(live[0].seq, results[0].seq.unwrap());
    assert_eq!(live[0].seq, 61);
    hub.shutdown().await;
}
