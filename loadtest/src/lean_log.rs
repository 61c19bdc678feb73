//! The `pg-ceiling --lean-log` baseline: what Postgres alone costs for the hub's bookkeeping in
//! its lean log format (migration 0015), built the way the hub builds it. Each writer's batch is
//! one transaction: the tenant's head (locked until commit), the rows (each once, with the
//! batch's last values, returning their images), then in one statement the batch's record (one
//! row of a copy of `synchub.log_groups`, encoded by the writer with the hub's own
//! `synchub::storage::record::encode`), the writer's range of device seqs (one row of a copy of
//! `synchub.log_device_ranges`), each written row's version once with its field clocks in the
//! hub's compact form (`synchub::storage::clocks::encode`, the writer named by its number,
//! migrations 0019 and 0020; updated in place when the writer wrote it before, upserted
//! otherwise), and the writer's cursor. No merge decisions, rules, conflict records or fan-out.
//!
//! Unlike the hub, which keeps the rows it merges in a cache and does not have an update it can
//! follow return its row, the writer reads the rows as they were before the batch in the
//! statement that writes them and has every write return its row, as `--with-log` does.

use std::collections::{BTreeMap, HashMap};

use protocol::{Change, Object};
use serde_json::Value;
use sqlx::{PgConnection, Row};
use synchub::storage::clocks;
use synchub::storage::record::{self, ChangeToLog, LogOp};
use synchub::sync::merge::FieldClock;
use uuid::Uuid;

use crate::devices;
use crate::error::Result;
use crate::pg_ceiling::{take_head, write_rows_ctes, LastValues, Writer};

/// Copies of the hub's log, versions and cursors as they are now (trigger-free; `including all`
/// keeps the keys, the check and the records' compression; the fill factor is set as the hub's
/// migrations set it), made anew.
pub const TABLES_SQL: &str = "drop table if exists loadtest_log_groups, loadtest_log_device_ranges, loadtest_row_versions, \
      loadtest_device_cursors; \
    create table loadtest_log_groups (like synchub.log_groups including all); \
    create table loadtest_log_device_ranges (like synchub.log_device_ranges including all); \
    create table loadtest_row_versions (like synchub.row_versions including all); \
    create table loadtest_device_cursors (like synchub.device_cursors including all); \
    alter table loadtest_row_versions set (fillfactor = 80); \
    alter table loadtest_device_cursors set (fillfactor = 80)";

/// One batch, as one of the hub's group commits writes it.
pub(crate) async fn write_batch(pool: &sqlx::PgPool, writer: &Writer, clocks: &mut Clocks, changes: &[Change]) -> Result<()> {
    if changes.is_empty() {
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    let base = take_head(&mut tx, &writer.tenant, changes.len()).await?;
    let images = write_rows(&mut tx, &writer.tenant, changes).await?;
    let record = record_text(changes, &images, &writer.device);
    let versions = clocks.versions(changes, base, &writer.device);
    write_bookkeeping(&mut tx, writer, base, changes, &record, &versions).await?;
    tx.commit().await?;
    Ok(())
}

/// A written row as it was before the batch (none when the batch created it) and after it, as
/// Postgres renders it.
#[derive(Debug, Clone, PartialEq)]
pub struct Images {
    pub before: Option<Object>,
    pub after: Object,
}

/// Write each row of the batch once (full rows upserted, partial rows updated, as `--with-log`
/// does), returning the rows' images by id.
async fn write_rows(conn: &mut PgConnection, tenant: &str, changes: &[Change]) -> Result<HashMap<Uuid, Images>> {
    let rows = LastValues::of(changes);
    let ids: Vec<Uuid> = rows.full_ids.iter().chain(&rows.part_ids).copied().collect();
    let query = sqlx::query(
        // The rows before the statement (its snapshot; the head serializes the tenant's writers).
        concat!(
            "with old as materialized (\
               select q.id, to_json(q) as img from loadtest_products q where q.id = any($2)), ",
            write_rows_ctes!(),
            " select new.id, new.img as after, old.img as before \
             from (select * from full_rows union all select * from partial_rows) new left join old on old.id = new.id"
        ),
    )
    .bind(tenant)
    .bind(&ids);
    let returned = rows.bind(query).fetch_all(&mut *conn).await?;
    let object = |v: Option<Value>| match v {
        Some(Value::Object(m)) => Some(m),
        _ => None,
    };
    Ok(returned
        .into_iter()
        .map(|r| (r.get("id"), Images { before: object(r.get("before")), after: object(r.get("after")).unwrap_or_default() }))
        .collect())
}

/// The old values of the fields `written` changes in `before` (null for a field it lacked).
pub fn old_values(before: &Object, written: &Object) -> Object {
    written
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(*v))
        .map(|(k, _)| (k.clone(), before.get(k).cloned().unwrap_or(Value::Null)))
        .collect()
}

/// The batch's record, its changes at consecutive seqs, as the hub logs a group's: an insert for
/// a row's first write when the row did not exist, else an update with the old values of the
/// fields it changed; each change's row as the change left it (a row's later change in the batch
/// compares with the row as the earlier one left it).
pub fn record_text(changes: &[Change], images: &HashMap<Uuid, Images>, device: &str) -> String {
    let mut latest: HashMap<Uuid, Object> = HashMap::new();
    let mut logged: Vec<(LogOp, Object, Option<Object>)> = Vec::with_capacity(changes.len());
    for c in changes {
        let id = devices::key_uuid(c);
        let image = images.get(&id);
        let prior = latest.remove(&id).or_else(|| image.and_then(|i| i.before.clone()));
        let (op, old) = match &prior {
            Some(before) => (LogOp::Update, Some(old_values(before, &c.fields))),
            None => (LogOp::Insert, None),
        };
        let mut row = prior.or_else(|| image.map(|i| i.after.clone())).unwrap_or_else(|| c.key.clone());
        row.extend(c.fields.iter().map(|(k, v)| (k.clone(), v.clone())));
        latest.insert(id, row.clone());
        logged.push((op, row, old));
    }
    let entries: Vec<ChangeToLog> = changes
        .iter()
        .zip(&logged)
        .map(|(c, (op, row, old))| ChangeToLog {
            table: &c.table,
            op: *op,
            key: &c.key,
            row: Some(row),
            old: old.as_ref(),
            written: Some(&c.fields),
            origin: Some(device),
            user: Some(device),
            change_id: Some(c.change_id),
            device_seq: Some(c.device_seq),
            wall_ms: c.hlc.wall_ms,
            counter: c.hlc.counter,
        })
        .collect();
    record::encode(&entries)
}

/// A writer's rows' field clocks, as the hub keeps them for the rows it merges, so that each
/// written row's version carries all of its clocks, written with the writer's number as the hub
/// writes a numbered writer's (migration 0020).
pub struct Clocks {
    rows: HashMap<Uuid, BTreeMap<String, FieldClock>>,
    writer: clocks::WriterNumber,
}

/// The rows a batch wrote, once each in key order, as the hub's bookkeeping statement takes them:
/// those whose version row the writer wrote before (`stored`, updated in place) and the others
/// (`new`, upserted).
#[derive(Debug, Default, PartialEq)]
pub struct Versions {
    pub new: VersionRows,
    pub stored: VersionRows,
}

/// Version rows as arguments: key, version (the seq of the row's last change) and field clocks in
/// the hub's compact text form (`synchub::storage::clocks::encode`).
#[derive(Debug, Default, PartialEq)]
pub struct VersionRows {
    pub keys: Vec<Value>,
    pub versions: Vec<i64>,
    pub clocks: Vec<String>,
}

impl Clocks {
    /// Clocks of the writer numbered `writer`.
    pub fn of_writer(writer: clocks::WriterNumber) -> Clocks {
        Clocks { rows: HashMap::new(), writer }
    }

    /// The versions of the rows `changes` wrote at seqs `base + 1 …`.
    pub fn versions(&mut self, changes: &[Change], base: i64, device: &str) -> Versions {
        let mut written: BTreeMap<Uuid, (&Object, i64, bool)> = BTreeMap::new();
        for (n, c) in changes.iter().enumerate() {
            let seq = base + 1 + n as i64;
            let id = devices::key_uuid(c);
            let stored = self.rows.contains_key(&id);
            let clocks = self.rows.entry(id).or_default();
            let clock = FieldClock {
                hlc: c.hlc,
                device: device.to_owned(),
                user: Some(device.to_owned()),
                version: seq as u64,
            };
            for field in c.fields.keys() {
                clocks.insert(field.clone(), clock.clone());
            }
            written.entry(id).and_modify(|w| w.1 = seq).or_insert((&c.key, seq, stored));
        }
        let mut out = Versions::default();
        for (id, (key, version, stored)) in written {
            let rows = if stored { &mut out.stored } else { &mut out.new };
            rows.keys.push(Value::Object(key.clone()));
            rows.versions.push(version);
            rows.clocks.push(clocks::encode(&self.rows[&id], |v| v, |_| Some(self.writer)));
        }
        out
    }
}

/// The record, the writer's device range, the rows' versions and the cursor, in one statement,
/// as the hub's: version rows the writer wrote before are updated in place, the others upserted.
async fn write_bookkeeping(
    conn: &mut PgConnection,
    writer: &Writer,
    base: i64,
    changes: &[Change],
    record: &str,
    versions: &Versions,
) -> Result<()> {
    let (first, last) = (changes[0].device_seq as i64, changes[changes.len() - 1].device_seq as i64);
    sqlx::query(
        "with log as (\
           insert into loadtest_log_groups (tenant_id, first_seq, last_seq, changes) values ($1, $2, $3, $4::text)), \
         ranges as (\
           insert into loadtest_log_device_ranges (tenant_id, device_id, first_device_seq, last_device_seq, group_last_seq) \
           values ($1, $5, $6, $7, $3)), \
         versions as (\
           insert into loadtest_row_versions (tenant_id, table_name, pk, version, clocks) \
           select $1, 'products', k, v, c from unnest($8::jsonb[], $9::int8[], $10::text[]) as x(k, v, c) \
           on conflict (tenant_id, table_name, pk_text) do update set version = excluded.version, deleted = excluded.deleted, \
             clocks = excluded.clocks), \
         stored_versions as (\
           update loadtest_row_versions v set version = x.v, clocks = x.c \
           from (select k::text as k_text, v, c from unnest($11::jsonb[], $12::int8[], $13::text[]) as x(k, v, c) offset 0) x \
           where v.tenant_id = $1 and v.table_name = 'products' and v.pk_text = x.k_text) \
         insert into loadtest_device_cursors (tenant_id, device_id, user_id, last_device_seq) values ($1, $5, $5, $7) \
         on conflict (tenant_id, device_id) do update set \
           last_device_seq = greatest(loadtest_device_cursors.last_device_seq, excluded.last_device_seq), \
           user_id = excluded.user_id, updated_at = now()",
    )
    .bind(&writer.tenant)
    .bind(base + 1)
    .bind(base + changes.len() as i64)
    .bind(record)
    .bind(&writer.device)
    .bind(first)
    .bind(last)
    .bind(&versions.new.keys)
    .bind(&versions.new.versions)
    .bind(&versions.new.clocks)
    .bind(&versions.stored.keys)
    .bind(&versions.stored.versions)
    .bind(&versions.stored.clocks)
    .execute(conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use synchub::storage::record::decode;

    fn object(v: Value) -> Object {
        match v {
            Value::Object(m) => m,
            _ => Object::new(),
        }
    }

    fn change(id: Uuid, device_seq: u64, fields: Value) -> Change {
        Change {
            change_id: Uuid::from_u128(device_seq as u128),
            device_seq,
            table: "products".into(),
            op: protocol::Op::Upsert,
            key: object(json!({"id": id})),
            fields: object(fields),
            hlc: protocol::Hlc { wall_ms: 1_000 + device_seq, counter: device_seq as u32 },
            base_version: 0,
        }
    }

    #[test]
    fn old_values_are_the_changed_fields_before_the_change() {
        let before = object(json!({"sku": "A", "price_cents": 5, "stock": 1}));
        let written = object(json!({"price_cents": 7, "stock": 1, "name": "x"}));
        assert_eq!(old_values(&before, &written), object(json!({"price_cents": 5, "name": null})));
    }

    #[test]
    fn the_record_logs_inserts_then_updates_each_from_the_row_the_last_change_left() {
        let (new, old) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let changes = [
            change(new, 1, json!({"sku": "N", "name": "New", "price_cents": 10, "stock": 1})),
            change(old, 2, json!({"price_cents": 20, "stock": 2})),
            change(new, 3, json!({"price_cents": 11, "stock": 1})),
        ];
        let image = |id: Uuid, name: &str, price: i64, stock: i64| {
            object(json!({"tenant_id": "t", "id": id, "sku": &name[..1], "name": name, "price_cents": price, "stock": stock}))
        };
        let images = HashMap::from([
            (new, Images { before: None, after: image(new, "New", 11, 1) }),
            (old, Images { before: Some(image(old, "Old", 5, 2)), after: image(old, "Old", 20, 2) }),
        ]);
        let text = record_text(&changes, &images, "w1");
        let read = decode(&text, 41).unwrap();
        assert_eq!(read.iter().map(|c| (c.seq, c.op)).collect::<Vec<_>>(), [(41, LogOp::Insert), (42, LogOp::Update), (43, LogOp::Update)]);
        assert_eq!(read[0].old, None);
        // The insert's row is the row as it left it, not as the batch did.
        assert_eq!(read[0].row.as_ref().unwrap()["price_cents"], json!(10));
        assert_eq!(read[1].old, Some(object(json!({"price_cents": 5}))));
        assert_eq!(read[2].old, Some(object(json!({"price_cents": 10}))));
        assert_eq!(read[2].row, Some(image(new, "New", 11, 1)));
        assert_eq!(read[1].row, Some(image(old, "Old", 20, 2)));
        assert_eq!(read[2].written, Some(changes[2].fields.clone()));
        assert_eq!((read[2].origin.as_deref(), read[2].device_seq, read[2].change_id), (Some("w1"), Some(3), Some(changes[2].change_id)));
        assert_eq!((read[2].wall_ms, read[2].counter), (1_003, 3));
    }

    #[test]
    fn versions_are_one_per_row_with_every_clock_the_writer_knows() {
        let (a, b, c) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        let mut clocks = Clocks::of_writer(7);
        let first = clocks.versions(&[change(b, 1, json!({"sku": "B"})), change(a, 2, json!({"sku": "A", "stock": 1}))], 10, "w");
        assert_eq!(first.new.versions, [12, 11], "in key order");
        assert!(first.stored.keys.is_empty());
        let second = clocks.versions(&[change(a, 3, json!({"stock": 2})), change(a, 4, json!({"stock": 3})), change(c, 5, json!({"sku": "C"}))], 20, "w");
        assert_eq!((second.stored.keys.clone(), second.stored.versions.clone()), (vec![json!({"id": a})], vec![22]), "a's version row is updated in place");
        assert_eq!((second.new.keys.clone(), second.new.versions.clone()), (vec![json!({"id": c})], vec![23]));
        let written = |text: &str| -> Value {
            let clocks = clocks::decode(text, |n| (n == 7).then(|| ("w".to_string(), Some("w".to_string())))).unwrap();
            clocks.iter().map(|(f, c)| (f.clone(), json!([c.hlc.wall_ms, c.hlc.counter, c.device, c.version, c.user]))).collect()
        };
        assert_eq!(written(&second.stored.clocks[0]), json!({"sku": [1_002, 2, "w", 12, "w"], "stock": [1_004, 4, "w", 22, "w"]}));
        assert!(second.stored.clocks[0].starts_with("[[1002,2,7,"), "in the compact form, with the writer's number: {}", second.stored.clocks[0]);
    }
}
