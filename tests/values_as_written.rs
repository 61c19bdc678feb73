//! Values come back as their writer wrote them while Postgres holds the same value: a timestamp
//! in JavaScript's notation, a number without the scale of its column, a jsonb object with its
//! keys and numbers as written, an upper-case uuid. Deltas, catch-up and the log all carry them.
//! A value the database changed (a trigger) comes back as the database holds it.

mod common;

use common::*;
use protocol::{ChangeStatus, Delta};
use serde_json::{json, Value};

const TENANT: &str = "as-written";

const SCHEMA: &str = "
create table readings (
    tenant_id text not null,
    id        text not null,
    at        timestamptz,
    amount    numeric(10,2),
    doc       jsonb,
    day       date,
    flag      boolean,
    ref       uuid,
    note      text,
    primary key (tenant_id, id)
);
create table stamped (
    tenant_id text not null,
    id        text not null,
    at        timestamptz,
    amount    numeric(10,2),
    note      text,
    primary key (tenant_id, id)
);
-- The database has its say: times to the whole hour, amounts to whole units.
create function stamp() returns trigger language plpgsql as $$
begin
    new.at := date_trunc('hour', new.at);
    new.amount := round(new.amount);
    return new;
end $$;
create trigger stamp before insert or update on stamped for each row execute function stamp();
";

async fn hub() -> TestHub {
    TestHub::start_with_schema(SCHEMA, &["readings", "stamped"]).await
}

/// The row as Postgres renders it (`to_jsonb`).
async fn rendered(hub: &TestHub, table: &str, id: &str) -> Value {
    sqlx::query_scalar(&format!("select to_jsonb(t) from {table} t where tenant_id = $1 and id = $2"))
        .bind(TENANT)
        .bind(id)
        .fetch_one(&hub.db)
        .await
        .unwrap()
}

/// The log's image of the row after its latest change.
async fn logged(hub: &TestHub, table: &str, id: &str) -> Value {
    sqlx::query_scalar("select new_row::jsonb from synchub.change_log where tenant_id = $1 and table_name = $2 and pk = $3 order by seq desc limit 1")
        .bind(TENANT)
        .bind(table)
        .bind(json!({"id": id}))
        .fetch_one(&hub.db)
        .await
        .unwrap()
}

/// The JSON text of `row`'s field: `2` and `2.0` are told apart.
fn text_of(row: &Value, field: &str) -> String {
    row[field].to_string()
}

fn row_of(delta: &Delta) -> Value {
    Value::Object(delta.row.clone().expect("an upsert's row"))
}

#[actix_web::test]
async fn deltas_catch_up_and_the_log_hold_values_as_written() {
    let hub = hub().await;
    let (mut writer, _, _) = Client::device(&hub, TENANT, "pos-1").await;
    let (mut reader, _, _) = Client::device(&hub, TENANT, "pos-2").await;
    let id_upper = "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11";
    let written = json!({
        "at": "2026-01-01T10:00:00.000Z",
        "amount": 2,
        "doc": {"z": [1, 2.5], "a": {"y": 1.5, "x": null}},
        "day": "2026-01-01",
        "flag": true,
        "ref": id_upper,
        "note": "plain",
    });
    let results = writer.push(vec![upsert("readings", json!({"id": "r1"}), written.clone(), 1, now_ms(), 0)]).await;
    assert_eq!(results[0].status, ChangeStatus::Applied);
    let seq = results[0].seq.unwrap();

    // Postgres renders them otherwise ...
    let db_row = rendered(&hub, "readings", "r1").await;
    assert_eq!(db_row["at"], json!("2026-01-01T10:00:00+00:00"));
    assert_eq!(text_of(&db_row, "amount"), "2.0", "numeric(10,2) renders 2.00, read back as a float");
    assert_eq!(db_row["ref"], json!(id_upper.to_lowercase()));

    // ... the live delta holds them as written.
    let (deltas, _) = reader.next_deltas().await;
    let row = row_of(&deltas[0]);
    for field in ["at", "amount", "doc", "day", "flag", "ref", "note"] {
        assert_eq!(text_of(&row, field), written[field].to_string(), "{field} in the delta");
    }
    assert_eq!(row["tenant_id"], json!(TENANT));
    // So does the log, and so does a device catching up from it.
    let log_row = logged(&hub, "readings", "r1").await;
    for field in ["at", "amount", "ref"] {
        assert_eq!(text_of(&log_row, field), written[field].to_string(), "{field} in the log");
    }
    let mut late = hub.client().await;
    // No position: from the start of the log.
    late.hello(&token(TENANT, "user-3", "Employee", Some("pos-3")), Some("pos-3"), None).await;
    let (caught_up, _) = late.until_up_to_date().await;
    let row = row_of(caught_up.iter().find(|d| d.seq == seq).expect("the change in the catch-up"));
    assert_eq!((text_of(&row, "at"), text_of(&row, "amount")), (written["at"].to_string(), "2".to_string()));

    // An update of another field: the fields written before keep their notation (the hub still
    // holds the row), the new value is as written, and old values name only what changed.
    let results = writer.push(vec![upsert("readings", json!({"id": "r1"}), json!({"amount": "3.50", "note": "second"}), 2, now_ms(), seq)]).await;
    assert_eq!(results[0].status, ChangeStatus::Applied);
    let (deltas, _) = reader.next_deltas().await;
    let row = row_of(&deltas[0]);
    assert_eq!(row["amount"], json!("3.50"));
    assert_eq!(row["at"], json!("2026-01-01T10:00:00.000Z"));
    let old: Vec<&String> = deltas[0].old.as_ref().unwrap().keys().collect();
    assert_eq!(old, ["amount", "note"]);

    // The same instant in yet another notation is written (a value is a value) but changes
    // nothing: the delta holds the new notation, the old values do not name it.
    let results = writer.push(vec![upsert("readings", json!({"id": "r1"}), json!({"at": "2026-01-01T11:00:00+01:00"}), 3, now_ms(), seq + 1)]).await;
    assert_eq!(results[0].status, ChangeStatus::Applied);
    let (deltas, _) = reader.next_deltas().await;
    assert_eq!(row_of(&deltas[0])["at"], json!("2026-01-01T11:00:00+01:00"));
    assert_eq!(deltas[0].old.as_ref().map(|o| o.len()), Some(0));
    hub.shutdown().await;
}

#[actix_web::test]
async fn a_value_the_database_changed_comes_back_as_the_database_holds_it() {
    let hub = hub().await;
    let (mut writer, _, _) = Client::device(&hub, TENANT, "pos-1").await;
    let (mut reader, _, _) = Client::device(&hub, TENANT, "pos-2").await;
    let written = json!({"at": "2026-01-01T10:30:00.000Z", "amount": 2.4, "note": "kept"});
    let results = writer.push(vec![upsert("stamped", json!({"id": "s1"}), written, 1, now_ms(), 0)]).await;
    assert_eq!(results[0].status, ChangeStatus::Applied);
    let db_row = rendered(&hub, "stamped", "s1").await;
    assert_eq!(db_row["at"], json!("2026-01-01T10:00:00+00:00"), "the trigger moved it");
    let (deltas, _) = reader.next_deltas().await;
    let row = row_of(&deltas[0]);
    assert_eq!(row["at"], db_row["at"]);
    assert_eq!(text_of(&row, "amount"), text_of(&db_row, "amount"));
    assert_eq!(text_of(&row, "amount"), "2.0");
    assert_eq!(row["note"], json!("kept"));
    assert_eq!(logged(&hub, "stamped", "s1").await["at"], db_row["at"]);

    // Written already on the whole hour, the value is the database's too: as written.
    let results = writer.push(vec![upsert("stamped", json!({"id": "s1"}), json!({"at": "2026-01-01T12:00:00.000Z", "amount": 5}), 2, now_ms(), results[0].seq.unwrap())]).await;
    assert_eq!(results[0].status, ChangeStatus::Applied);
    let (deltas, _) = reader.next_deltas().await;
    let row = row_of(&deltas[0]);
    assert_eq!((text_of(&row, "at"), text_of(&row, "amount")), ("\"2026-01-01T12:00:00.000Z\"".to_string(), "5".to_string()));
    hub.shutdown().await;
}
