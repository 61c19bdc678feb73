//! A value the merge writes means what `jsonb_populate_record` makes of it: the row the hub
//! stores is the row that function builds from the fields, and a value it refuses is refused
//! with the change (never cut to fit, never rounded differently), for inserts and updates, alone
//! and in one batch. A differential test: any other way of binding rows (text arrays were
//! tried, measured and dropped) must keep it passing.

mod common;

use common::*;
use protocol::ChangeStatus;
use serde_json::{json, Value};

const TENANT: &str = "written-values";

const SCHEMA: &str = "
create table typed (
    tenant_id text not null,
    id        text not null,
    v5        varchar(5),
    c3        character(3),
    n         numeric(6,2),
    ts        timestamp(0),
    tz        timestamptz,
    d         date,
    tm        time,
    b         boolean,
    i2        smallint,
    i8        bigint,
    f         double precision,
    r         real,
    j         jsonb,
    js        json,
    arr       text[],
    u         uuid,
    note      text,
    primary key (tenant_id, id)
);
create table plain (
    tenant_id text not null,
    id        text not null,
    n         integer,
    label     text,
    flag      boolean,
    note      text,
    primary key (tenant_id, id)
);
create table stamped (
    tenant_id text not null,
    id        text not null,
    n         integer,
    note      text,
    primary key (tenant_id, id)
);
create function stamp() returns trigger language plpgsql as $$
begin
    new.note := 'stamped ' || new.n;
    return new;
end $$;
create trigger stamped_before before insert or update on stamped for each row execute function stamp();
create table tallied (
    tenant_id text not null,
    id        text not null,
    n         integer,
    label     text,
    primary key (tenant_id, id)
);
create table audited (like tallied including all);
-- Rows each update statement on `tallied` wrote, and each row `audited`'s updates left.
create table tally (statement_rows integer not null);
create table audit (n integer, label text);
create function tally() returns trigger language plpgsql security definer as $$
begin
    insert into tally select count(*) from updated_rows;
    return null;
end $$;
create trigger tallied_updates after update on tallied referencing new table as updated_rows
    for each statement execute function tally();
create function audit() returns trigger language plpgsql security definer as $$
begin
    insert into audit values (new.n, new.label);
    return null;
end $$;
create trigger audited_after after update on audited for each row execute function audit();
";

/// Field sets, each written into a row of its own: values Postgres takes as they are, takes after
/// its own rounding or padding, and refuses.
fn field_sets() -> Vec<Value> {
    vec![
        json!({"v5": "abc", "n": 1.234, "i2": 5, "i8": "7", "b": true, "note": "plain"}),
        json!({"v5": "abcdef"}),
        json!({"v5": "abc  "}),
        json!({"n": "12.5", "f": 1.5, "r": 0.1, "tz": "2026-01-01T10:00:00.123456+01:00"}),
        json!({"n": 99999.999}),
        json!({"ts": "2026-01-01 10:00:00.6", "d": "2026-02-03", "tm": "10:11:12.5"}),
        json!({"b": "yes", "i2": 70000}),
        json!({"i2": 5.0}),
        json!({"u": "not-a-uuid"}),
        json!({"u": "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "j": {"z": 1, "a": [1, 2.50]}}),
        json!({"j": "text", "note": null, "b": null}),
        json!({"note": 1.50}),
        json!({"note": true}),
        json!({"b": 1}),
        json!({"i8": [1]}),
        json!({"c3": "ab"}),
        json!({"js": {"b": 1,  "a": 2}}),
        json!({"arr": ["x", "y"]}),
        json!({"i8": 9007199254740993i64, "i2": -32768, "note": "tab\tand ü ", "b": false}),
    ]
}

async fn hub() -> TestHub {
    TestHub::start_with_schema(SCHEMA, &["typed", "plain", "stamped", "tallied", "audited"]).await
}

/// What `jsonb_populate_record` builds from `fields` for row `id` (as `to_jsonb`), or `None`
/// when it refuses them.
async fn populated(hub: &TestHub, id: &str, fields: &Value) -> Option<Value> {
    let mut image = fields.clone();
    image["tenant_id"] = json!(TENANT);
    image["id"] = json!(id);
    sqlx::query_scalar("select to_jsonb(jsonb_populate_record(null::typed, $1))").bind(image).fetch_one(&hub.db).await.ok()
}

async fn stored(hub: &TestHub, id: &str) -> Option<Value> {
    sqlx::query_scalar("select to_jsonb(t) from typed t where tenant_id = $1 and id = $2")
        .bind(TENANT)
        .bind(id)
        .fetch_optional(&hub.db)
        .await
        .unwrap()
}

/// Checks row `id` after `fields` were pushed to it with result `status`; `before` is the row
/// before the push (none for an insert).
async fn check(hub: &TestHub, id: &str, fields: &Value, status: ChangeStatus, before: Option<Value>) {
    let mut expected_fields = before.clone().unwrap_or_else(|| json!({}));
    for (name, value) in fields.as_object().unwrap() {
        expected_fields[name] = value.clone();
    }
    match populated(hub, id, &expected_fields).await {
        Some(row) => {
            assert_eq!(status, ChangeStatus::Applied, "{id}: {fields} is a value Postgres takes");
            assert_eq!(stored(hub, id).await, Some(row), "{id}: {fields} stored as jsonb_populate_record builds it");
        }
        None => {
            assert_eq!(status, ChangeStatus::Rejected, "{id}: {fields} is a value Postgres refuses");
            assert_eq!(stored(hub, id).await, before, "{id}: a refused value leaves the row as it was");
        }
    }
}

#[actix_web::test]
async fn rows_hold_what_jsonb_populate_record_builds_from_the_fields() {
    let hub = hub().await;
    let (mut writer, _, _) = Client::device(&hub, TENANT, "writer").await;
    let mut device_seq = 0;
    let mut next = || {
        device_seq += 1;
        device_seq
    };

    // Inserts, one push each.
    for (i, fields) in field_sets().iter().enumerate() {
        let id = format!("alone-{i}");
        let results = writer.push(vec![upsert("typed", json!({"id": id}), fields.clone(), next(), now_ms(), 0)]).await;
        check(&hub, &id, fields, results[0].status, None).await;
    }

    // Updates of existing rows, one push each.
    for (i, fields) in field_sets().iter().enumerate() {
        let id = format!("updated-{i}");
        let first = writer.push(vec![upsert("typed", json!({"id": id}), json!({"note": "before"}), next(), now_ms(), 0)]).await;
        assert_eq!(first[0].status, ChangeStatus::Applied);
        let before = stored(&hub, &id).await;
        let results = writer.push(vec![upsert("typed", json!({"id": id}), fields.clone(), next(), now_ms(), first[0].seq.unwrap())]).await;
        check(&hub, &id, fields, results[0].status, before).await;
    }

    // All the inserts in one batch: the refused ones are found change by change, the others merge.
    let sets = field_sets();
    let batch = sets.iter().enumerate().map(|(i, fields)| upsert("typed", json!({"id": format!("batch-{i}")}), fields.clone(), next(), now_ms(), 0)).collect();
    let results = writer.push(batch).await;
    for (i, fields) in sets.iter().enumerate() {
        check(&hub, &format!("batch-{i}"), fields, results[i].status, None).await;
    }
    hub.shutdown().await;
}

/// The merge takes an update's row from Postgres unless Postgres stores the values as written
/// (`as_written::stored_as_written`) on a table whose updates store nothing else: then it lays
/// the written values over the row it had. That rests on this: where `stored_as_written` says so,
/// `jsonb_populate_record` renders the value exactly as written, or refuses it.
#[actix_web::test]
async fn values_stored_as_written_render_as_written() {
    let hub = hub().await;
    let types: Vec<(String, String)> = sqlx::query_as(
        "select attname::text, format_type(atttypid, atttypmod) from pg_attribute where attrelid = 'typed'::regclass and attnum > 0 and not attisdropped",
    )
    .fetch_all(&hub.db)
    .await
    .unwrap();
    let mut checked = 0;
    for fields in field_sets() {
        for (column, value) in fields.as_object().unwrap() {
            let sql_type = &types.iter().find(|(name, _)| name == column).unwrap().1;
            if !synchub::storage::as_written::stored_as_written(sql_type, value) {
                continue;
            }
            if let Some(row) = populated(&hub, "x", &json!({ column: value })).await {
                assert_eq!(&row[column], value, "{column} ({sql_type}): {value} renders as written");
                checked += 1;
            }
        }
    }
    assert!(checked >= 6, "only {checked} values checked");
    hub.shutdown().await;
}

/// Updates' rows as other devices receive them are the rows as stored: on a table whose updates
/// store the written values and nothing else, on one with a `before` trigger, and on one that
/// gets such a trigger while the hub runs.
#[actix_web::test]
async fn an_update_delivers_the_row_as_stored_also_after_a_trigger_is_added() {
    let hub = hub().await;
    let (mut writer, _, _) = Client::device(&hub, TENANT, "writer").await;
    let (mut reader, _, _) = Client::device(&hub, TENANT, "reader").await;
    let mut device_seq = 0;
    let stored_row = |table: &'static str| {
        let db = hub.db.clone();
        async move {
            sqlx::query_scalar::<_, Value>(&format!("select to_jsonb(t) from {table} t where tenant_id = $1 and id = 'r1'"))
                .bind(TENANT)
                .fetch_one(&db)
                .await
                .unwrap()
        }
    };
    // Pushes `fields` to row r1 of `table` and returns the row the reader received.
    let mut write = async |table: &str, fields: Value, base: u64| {
        device_seq += 1;
        let results = writer.push(vec![upsert(table, json!({"id": "r1"}), fields, device_seq, now_ms(), base)]).await;
        assert_eq!(results[0].status, ChangeStatus::Applied, "{results:?}");
        let (deltas, _) = reader.next_deltas().await;
        (Value::Object(deltas[0].row.clone().expect("an upsert's delta holds the row")), results[0].seq.unwrap())
    };

    let (_, at) = write("plain", json!({"n": 1, "label": "a", "flag": true, "note": "x"}), 0).await;
    let (row, at) = write("plain", json!({"n": 2, "label": "b"}), at).await;
    assert_eq!(row, stored_row("plain").await, "a plain update");
    let (row, at) = write("plain", json!({"flag": null, "note": "y"}), at).await;
    assert_eq!(row, stored_row("plain").await, "a plain update writing null");

    let (_, stamped_at) = write("stamped", json!({"n": 1, "note": "x"}), 0).await;
    let (row, _) = write("stamped", json!({"n": 2}), stamped_at).await;
    assert_eq!(row["note"], json!("stamped 2"), "the trigger's value, not the row the hub had");
    assert_eq!(row, stored_row("stamped").await);

    sqlx::raw_sql("create trigger plain_before before update on plain for each row execute function stamp()").execute(&hub.db).await.unwrap();
    let (row, _) = write("plain", json!({"n": 3}), at).await;
    assert_eq!(row["note"], json!("stamped 3"), "a trigger added while the hub runs");
    assert_eq!(row, stored_row("plain").await);
    hub.shutdown().await;
}

/// A group's successive updates of a row are written to a table without row triggers of the
/// application's as one update with the last values, while every change still carries the row
/// as it left it; a table with such a trigger has each update written.
#[actix_web::test]
async fn a_groups_updates_of_a_row_are_written_once_where_no_row_trigger_sees_them() {
    let hub = hub().await;
    let (mut writer, _, _) = Client::device(&hub, TENANT, "writer").await;
    let (mut reader, _, _) = Client::device(&hub, TENANT, "reader").await;
    let row = |id: &str, n: i64, label: &str| json!({"tenant_id": TENANT, "id": id, "n": n, "label": label});
    for (round, table) in ["tallied", "audited"].into_iter().enumerate() {
        let seq = 6 * round as u64;
        let inserted = writer
            .push(vec![
                upsert(table, json!({"id": "r1"}), json!({"n": 0, "label": "a"}), seq + 1, now_ms(), 0),
                upsert(table, json!({"id": "r2"}), json!({"n": 0, "label": "a"}), seq + 2, now_ms(), 0),
            ])
            .await;
        let at = inserted[1].seq.unwrap_or_else(|| panic!("{table}: {inserted:?}"));
        let written = [("r1", json!({"n": 1})), ("r1", json!({"label": "b"})), ("r2", json!({"n": 5})), ("r1", json!({"n": 2}))];
        let changes = written.iter().enumerate().map(|(i, (id, fields))| upsert(table, json!({"id": id}), fields.clone(), seq + 3 + i as u64, now_ms(), at)).collect();
        let results = writer.push(changes).await;
        assert!(results.iter().all(|r| r.status == ChangeStatus::Applied), "{results:?}");
        let mut deltas = Vec::new();
        while deltas.len() < 6 {
            deltas.extend(reader.next_deltas().await.0);
        }
        let rows: Vec<Value> = deltas[2..].iter().map(|d| Value::Object(d.row.clone().expect("an upsert's delta holds the row"))).collect();
        assert_eq!(rows, [row("r1", 1, "a"), row("r1", 1, "b"), row("r2", 5, "a"), row("r1", 2, "b")], "{table}: each change's row as it left it");
        for id in ["r1", "r2"] {
            let stored: Value = sqlx::query_scalar(&format!("select to_jsonb(t) from {table} t where tenant_id = $1 and id = $2"))
                .bind(TENANT)
                .bind(id)
                .fetch_one(&hub.db)
                .await
                .unwrap();
            let last = rows.iter().rev().find(|r| r["id"] == json!(id)).unwrap();
            assert_eq!(&stored, last, "{table}: the row as the last change left it");
        }
    }
    let tallied: Vec<i32> = sqlx::query_scalar("select statement_rows from tally").fetch_all(&hub.db).await.unwrap();
    assert_eq!(tallied.iter().sum::<i32>(), 2, "each row written once: {tallied:?}");
    let audited: Vec<(i32, String)> = sqlx::query_as("select n, label from audit").fetch_all(&hub.db).await.unwrap();
    assert_eq!(audited.len(), 4, "a row trigger sees every update: {audited:?}");
    hub.shutdown().await;
}

/// A row trigger added while the hub runs: the first group to update the table finds its shape
/// changed, and from then on the table's updates are each written, as the trigger expects.
#[actix_web::test]
async fn updates_are_each_written_once_a_row_trigger_is_added_while_the_hub_runs() {
    let hub = hub().await;
    let (mut writer, _, _) = Client::device(&hub, TENANT, "writer").await;
    let inserted = writer.push(vec![upsert("tallied", json!({"id": "t1"}), json!({"n": 0, "label": "a"}), 1, now_ms(), 0)]).await;
    let mut base = inserted[0].seq.unwrap();
    sqlx::raw_sql(
        "create function count_row() returns trigger language plpgsql security definer as $$ \
         begin insert into audit values (new.n, new.label); return null; end $$; \
         create trigger tallied_after after update on tallied for each row execute function count_row();",
    )
    .execute(&hub.db)
    .await
    .unwrap();
    let mut device_seq = 1;
    for group in 0..2 {
        let changes = (0..3)
            .map(|i| {
                device_seq += 1;
                upsert("tallied", json!({"id": "t1"}), json!({"n": 10 * group + i}), device_seq, now_ms(), base)
            })
            .collect();
        let results = writer.push(changes).await;
        assert!(results.iter().all(|r| r.status == ChangeStatus::Applied), "{results:?}");
        base = results[2].seq.unwrap();
    }
    let seen: Vec<i32> = sqlx::query_scalar("select n from audit").fetch_all(&hub.db).await.unwrap();
    assert!(seen.ends_with(&[10, 11, 12]), "the second group's updates each written: {seen:?}");
    hub.shutdown().await;
}
