//! The synced tables as Postgres describes them: columns, primary key, tenant column, merge
//! policy, and the SQL the hub runs against each, built once when the catalog is loaded.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use sqlx::{PgPool, Row};

use crate::config::MergePolicy;
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    /// `format_type` of the column, e.g. `integer`, `numeric(10,2)`, `uuid`.
    pub sql_type: String,
}

#[derive(Debug)]
pub struct TableSchema {
    /// Name on the wire and in the log: the table's `regclass::text`.
    pub name: String,
    pub tenant_column: String,
    pub tenant_type: String,
    /// Primary-key columns other than the tenant column, in key order.
    pub key: Vec<String>,
    /// Writable columns (generated columns are left out).
    pub columns: BTreeMap<String, Column>,
    pub policy: MergePolicy,
    /// How the merge's reads and writes render a row: `to_json` where it renders every column
    /// as `to_jsonb` does (snapshots, the capture trigger) and is cheaper, `to_jsonb` otherwise
    /// ([`renders_as_jsonb`]).
    pub row_json: &'static str,
    /// Set when Postgres stores an update's values and nothing else: no generated column, no
    /// `before` row trigger, no rule. An update then leaves the row as the hub knew it with the
    /// written values, where they are stored as written (`as_written::stored_as_written`), and
    /// the merge need not have it returned. `None` otherwise, and for catalogs not loaded from
    /// Postgres. Read it with [`TableSchema::plain`].
    pub plain_updates: Option<PlainUpdates>,
    /// Reads the current rows of a set of keys and locks them (how: `build_read_sql`).
    pub read_sql: String,
    /// The same, and reads and locks the cursors of a group's devices as well.
    pub read_locking_cursors_sql: String,
    pub delete_sql: String,
}

/// What the catalog knows of a table whose updates store their values and nothing else.
#[derive(Debug, Clone)]
pub struct PlainUpdates {
    /// The table's shape ([`shape_sql`]) as loaded; each plain update compares it.
    pub shape: String,
    /// No row trigger but the hub's capture trigger (which leaves the hub's writes alone) and
    /// Postgres's own (foreign keys, checked on the rows as they end): nothing sees a row between
    /// two updates of one transaction, so a group's successive updates of a row are written as
    /// one, with the last values.
    pub coalesce: bool,
    /// Set by the first update that found the shape changed (a trigger, rule or column added
    /// while the hub runs): from then on the table's updates are returned, as any table's.
    changed: Arc<AtomicBool>,
}

impl PlainUpdates {
    /// From a table's shape as [`shape_sql`] renders it; `None` when its updates may store
    /// more than their values (a generated column, a `before` row trigger, a rule).
    pub fn of(shape: String, any_generated: bool) -> Option<PlainUpdates> {
        let mut counts = shape.rsplit(';').take(3).map(|n| n.parse::<u64>().ok());
        let (after_triggers, rules, before_triggers) = (counts.next()??, counts.next()??, counts.next()??);
        (!any_generated && before_triggers == 0 && rules == 0)
            .then(|| PlainUpdates { shape, coalesce: after_triggers == 0, changed: Arc::default() })
    }

    /// Note that an update found the table's shape changed since it was loaded.
    pub fn mark_changed(&self) {
        self.changed.store(true, Ordering::Relaxed);
    }
}

pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl TableSchema {
    /// How its updates may be written, while the table has the shape the catalog loaded
    /// ([`TableSchema::plain_updates`]).
    pub fn plain(&self) -> Option<&PlainUpdates> {
        self.plain_updates.as_ref().filter(|p| !p.changed.load(Ordering::Relaxed))
    }

    /// The `format_type` of a column; `None` for a column the table lacks (or a generated one).
    pub fn column_type(&self, column: &str) -> Option<&str> {
        self.columns.get(column).map(|c| c.sql_type.as_str())
    }

    fn key_list(&self, alias: &str) -> String {
        self.key.iter().map(|k| format!("{alias}.{}", quote_ident(k))).collect::<Vec<_>>().join(", ")
    }

    /// `jsonb_build_object('k1', alias.k1, ...)`: the normalized key as Postgres renders it.
    pub fn key_object(&self, alias: &str) -> String {
        let parts: Vec<String> =
            self.key.iter().map(|k| format!("'{}', {alias}.{}", k.replace('\'', "''"), quote_ident(k))).collect();
        format!("jsonb_build_object({})", parts.join(", "))
    }

    fn tenant_match(&self, alias: &str) -> String {
        format!("{alias}.{} = $1::{}", quote_ident(&self.tenant_column), self.tenant_type)
    }

    /// `$1` tenant, `$2` jsonb[] of keys → (ordinal, normalized key, current row or null,
    /// and the row's version, tombstone clock and field clocks from `synchub.row_versions`).
    /// Key values are cast by Postgres, so a key of the wrong type fails the statement.
    /// Both lookups are lateral with `limit 1` so that each stays a primary-key probe per key
    /// (and locks just that row): as joins, the planner's guess for a young tenant could read
    /// the tenant's whole table. Versions are matched on the key's text, computed apart
    /// (`offset 0` keeps it from being folded back into the comparison): under row-level
    /// security only a comparison of plain values may drive an index (migration 0007).
    ///
    /// With `lock_cursors`, `$3` is a text[] of device ids: the statement also locks their
    /// cursors in `synchub.device_cursors` and returns them as a `{device: last_device_seq}`
    /// object in the `cursors` column of the first key's row (null in the others), which saves
    /// a group its own round trip for them.
    fn build_read_sql(&self, lock_cursors: bool) -> String {
        let table = &self.name;
        let first = quote_ident(&self.key[0]);
        let (cursors_cte, cursors_column) = if lock_cursors {
            (
                "with c as materialized (select device_id, last_device_seq from synchub.device_cursors \
                   where tenant_id = $1 and device_id = any($3) for update) ",
                ", case when x.i = 1 then (select coalesce(jsonb_object_agg(device_id, last_device_seq), '{}') from c) end as cursors",
            )
        } else {
            ("", "")
        };
        format!(
            "{cursors_cte}select x.i, kt.key, case when t.{first} is null then null else {row_json}(t) end as row, \
               rv.version, rv.deleted, rv.clocks{cursors_column} \
             from unnest($2::jsonb[]) with ordinality as x(kj, i) \
             cross join lateral jsonb_populate_record(null::{table}, x.kj) as k \
             cross join lateral (select {keyobj} as key, ({keyobj})::text as key_text offset 0) kt \
             left join lateral (select * from {table} t where {tenant} and ({tk}) = ({kk}) limit 1 for update) t on true \
             left join lateral (select v.version, v.deleted, v.clocks from synchub.row_versions v \
               where v.tenant_id = $1 and v.table_name = '{table_literal}' and v.pk_text = kt.key_text limit 1) rv on true",
            table_literal = self.name.replace('\'', "''"),
            tenant = self.tenant_match("t"),
            tk = self.key_list("t"),
            kk = self.key_list("k"),
            keyobj = self.key_object("k"),
            row_json = self.row_json,
        )
    }

    /// The text of `label_column` for the row whose normalized key is the `jsonb` expression
    /// `key` (`$1` tenant): from the row, or once deleted from the old values its delete
    /// logged (through `synchub.log_entry`) or, past a trim, its tombstone's last values; null
    /// when none holds it. A scalar subquery, for a select list or a condition.
    pub fn label_sql(&self, label_column: &str, key: &str) -> String {
        format!(
            "(select coalesce((select t.{label}::text from {table} t where {tenant} and ({tk}) = ({kk}) limit 1), \
               (select coalesce(synchub.json_value(x.e -> 4)::jsonb, v.last_values) ->> '{label_literal}' \
                 from synchub.row_versions v \
                 left join lateral (select synchub.log_entry($1, v.version) as e) x on x.e ->> 1 = 'd' \
                 where v.tenant_id = $1 and v.table_name = '{table_literal}' and v.pk_text = ({key})::text \
                   and v.deleted is not null limit 1)) \
             from jsonb_populate_record(null::{table}, {key}) k)",
            label = quote_ident(label_column),
            label_literal = label_column.replace('\'', "''"),
            table = self.name,
            table_literal = self.name.replace('\'', "''"),
            tenant = self.tenant_match("t"),
            tk = self.key_list("t"),
            kk = self.key_list("k"),
        )
    }

    /// `$1` tenant, `$2` normalized key (jsonb) → the current row (null when missing) and
    /// its version from `synchub.row_versions` (0 when never written through the log). Reads
    /// without locking, for the review API.
    pub fn current_row_sql(&self) -> String {
        format!(
            "select (select to_jsonb(t) from {table} t where {tenant} and ({tk}) = ({kk}) limit 1) as row, \
               coalesce((select v.version from synchub.row_versions v \
                 where v.tenant_id = $1 and v.table_name = '{table_literal}' and v.pk_text = $2::jsonb::text limit 1), 0) as version \
             from jsonb_populate_record(null::{table}, $2) k",
            table = self.name,
            table_literal = self.name.replace('\'', "''"),
            tenant = self.tenant_match("t"),
            tk = self.key_list("t"),
            kk = self.key_list("k"),
        )
    }

    /// Delete rows: `$1` tenant, `$2` jsonb array of keys. Like the update, a key probe per row
    /// (`synchub.records_of`, migration 0010), whatever the planner's statistics say.
    fn build_delete_sql(&self) -> String {
        format!(
            "delete from {table} t using synchub.records_of(null::{table}, $2) v where {matched} {returning}",
            table = self.name,
            matched = self.row_of_record(),
            returning = self.returning_image(),
        )
    }

    /// Update existing rows: `$1` tenant, `$2` jsonb array of {key columns, `columns`}. The
    /// batch comes through `synchub.records_of`, which the planner takes for one row, so each
    /// row is found by a key probe (migration 0010).
    pub fn update_sql(&self, columns: &[&str]) -> String {
        format!("{} {}", self.update_from_records(columns), self.returning_image())
    }

    /// [`TableSchema::update_sql`] without the rows' images, for a table with `plain_updates`:
    /// returns how many rows it updated and whether the table still has the shape `$3` (a
    /// trigger, rule or column added since the catalog was loaded would change what an update
    /// stores; the statement sees the table as its own lock leaves it).
    pub fn plain_update_sql(&self, columns: &[&str]) -> String {
        format!(
            "with u as ({update} returning 1) select (select count(*) from u) as updated, {shape} = $3 as same_shape",
            update = self.update_from_records(columns),
            shape = shape_sql(&self.name),
        )
    }

    /// The current rows of the keys in `$2` (a jsonb array of objects holding the key columns,
    /// as the writes take them), `$1` tenant: images of rows a plain update wrote when the
    /// merge cannot know them after all.
    pub fn images_sql(&self) -> String {
        format!(
            "select {keyobj} as key, {row_json}(t) as row from {table} t join synchub.records_of(null::{table}, $2) v on {matched}",
            table = self.name,
            matched = self.row_of_record(),
            keyobj = self.key_object("t"),
            row_json = self.row_json,
        )
    }

    /// `update … from synchub.records_of(…, $2) v` of `columns`, each row `t` matched to its record.
    fn update_from_records(&self, columns: &[&str]) -> String {
        let sets: Vec<String> = columns.iter().map(|c| format!("{q} = v.{q}", q = quote_ident(c))).collect();
        format!(
            "update {table} t set {sets} from synchub.records_of(null::{table}, $2) v where {matched}",
            table = self.name,
            sets = sets.join(", "),
            matched = self.row_of_record(),
        )
    }

    /// Row `t` of tenant `$1` is the one record `v` names.
    fn row_of_record(&self) -> String {
        format!("{} and ({}) = ({})", self.tenant_match("t"), self.key_list("t"), self.key_list("v"))
    }

    /// A write's `returning`: row `t`'s normalized key and image.
    fn returning_image(&self) -> String {
        format!("returning {} as key, {}(t) as row", self.key_object("t"), self.row_json)
    }

    /// Insert new rows: `$1` tenant, `$2` jsonb array of {key columns, `columns`}; columns
    /// not named take their defaults.
    pub fn insert_sql(&self, columns: &[&str]) -> String {
        let mut names = vec![quote_ident(&self.tenant_column)];
        let mut values = vec![format!("$1::{}", self.tenant_type)];
        for c in self.key.iter().map(String::as_str).chain(columns.iter().copied()) {
            names.push(quote_ident(c));
            values.push(format!("v.{}", quote_ident(c)));
        }
        format!(
            "insert into {table} as t ({names}) select {values} from jsonb_populate_recordset(null::{table}, $2) v {returning}",
            table = self.name,
            names = names.join(", "),
            values = values.join(", "),
            returning = self.returning_image(),
        )
    }

    /// Snapshot page: `$1` tenant, `$2` key to start after (jsonb, may be null), `$3` limit;
    /// `row_restricted`: only rows whose column `$4`, as text, is `$5`.
    pub fn snapshot_sql(&self, row_restricted: bool) -> String {
        format!(
            "select {keyobj} as key, to_jsonb(t) as row from {table} t \
             where {tenant} and ($2::jsonb is null or ({tk}) > (select {ak} from jsonb_populate_record(null::{table}, $2) a)) {restricted}\
             order by {tk} limit $3",
            restricted = if row_restricted { "and (to_jsonb(t) ->> $4::text) = $5::text " } else { "" },
            table = self.name,
            keyobj = self.key_object("t"),
            tenant = self.tenant_match("t"),
            tk = self.key_list("t"),
            ak = self.key_list("a"),
        )
    }
}

impl TableSchema {
    /// Tombstones page: `$1` tenant, `$2` key to start after (jsonb, may be null), `$3` limit →
    /// the keys of rows deleted and not there again, in the order of their keys' text, with the
    /// old row of the delete while the log still holds it (`old_values`, else null);
    /// `row_restricted`: only tombstones whose last known values (else key) hold `$5` in column
    /// `$4`, as text.
    pub fn tombstones_sql(&self, row_restricted: bool) -> String {
        format!(
            "select v.pk as key, coalesce(l.old_values::jsonb, v.last_values) as old_values from synchub.row_versions v \
             left join lateral (select synchub.json_value(e -> 4) as old_values \
               from (select synchub.log_entry($1, v.version) as e) x where e ->> 1 = 'd') l on true \
             where v.tenant_id = $1 and v.table_name = '{table_literal}' and v.deleted is not null \
             and ($2::jsonb is null or v.pk_text > $2::jsonb::text) \
             and not exists (select from {table} t, jsonb_populate_record(null::{table}, v.pk) k where {tenant} and ({tk}) = ({kk})) {restricted}\
             order by v.pk_text limit $3",
            restricted = if row_restricted { "and (coalesce(l.old_values::jsonb, v.last_values, v.pk) ->> $4::text) = $5::text " } else { "" },
            table_literal = self.name.replace('\'', "''"),
            table = self.name,
            tenant = self.tenant_match("t"),
            tk = self.key_list("t"),
            kk = self.key_list("k"),
        )
    }

    /// Subscription snapshot page: `$1` tenant, `$2` key to start after (jsonb, may be null),
    /// `$3` limit, `$4` jsonb object the row must contain (the filter's equalities).
    pub fn filtered_snapshot_sql(&self) -> String {
        format!(
            "select {keyobj} as key, to_jsonb(t) as row from {table} t \
             where {tenant} and ($2::jsonb is null or ({tk}) > (select {ak} from jsonb_populate_record(null::{table}, $2) a)) \
             and to_jsonb(t) @> $4::jsonb \
             order by {tk} limit $3",
            table = self.name,
            keyobj = self.key_object("t"),
            tenant = self.tenant_match("t"),
            tk = self.key_list("t"),
            ak = self.key_list("a"),
        )
    }
}

/// All synced tables by wire name.
#[derive(Debug, Default)]
pub struct Catalog {
    tables: HashMap<String, Arc<TableSchema>>,
}

impl Catalog {
    pub fn get(&self, name: &str) -> Option<&Arc<TableSchema>> {
        self.tables.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tables.keys().map(String::as_str)
    }

    pub async fn load(pool: &PgPool) -> Result<Catalog> {
        let registered = sqlx::query("select table_name, tenant_column, policy, to_regclass(table_name)::oid::int8 as oid from synchub.synced_tables")
            .fetch_all(pool)
            .await?;
        let mut tables = HashMap::new();
        for row in registered {
            let name: String = row.get("table_name");
            let Some(oid) = row.get::<Option<i64>, _>("oid") else {
                tracing::warn!(table = %name, "registered table no longer exists; skipped");
                continue;
            };
            let tenant_column: String = row.get("tenant_column");
            let policy = MergePolicy::parse(row.get::<&str, _>("policy")).unwrap_or_default();
            let cols = sqlx::query(
                "select attname::text as name, format_type(atttypid, atttypmod) as ty, attgenerated <> '' as generated \
                 from pg_attribute where attrelid = $1::int8::oid and attnum > 0 and not attisdropped order by attnum",
            )
            .bind(oid)
            .fetch_all(pool)
            .await?;
            let key: Vec<String> = sqlx::query_scalar(
                "select a.attname::text from pg_index i join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey) \
                 where i.indrelid = $1::int8::oid and i.indisprimary order by array_position(i.indkey::int2[], a.attnum)",
            )
            .bind(oid)
            .fetch_all(pool)
            .await?;
            let key: Vec<String> = key.into_iter().filter(|k| *k != tenant_column).collect();
            let mut columns = BTreeMap::new();
            let mut tenant_type = None;
            let row_json = if cols.iter().all(|c| renders_as_jsonb(c.get("ty"))) { "to_json" } else { "to_jsonb" };
            let any_generated = cols.iter().any(|c| c.get::<bool, _>("generated"));
            for c in cols {
                let col = Column { name: c.get("name"), sql_type: c.get("ty") };
                if col.name == tenant_column {
                    tenant_type = Some(col.sql_type.clone());
                }
                if !c.get::<bool, _>("generated") {
                    columns.insert(col.name.clone(), col);
                }
            }
            let (Some(tenant_type), false) = (tenant_type, key.is_empty()) else {
                tracing::warn!(table = %name, "registered table lacks its tenant column or a primary key; skipped");
                continue;
            };
            let shape: String = sqlx::query_scalar(&format!("select {}", shape_sql(&name))).fetch_one(pool).await?;
            let mut schema = TableSchema::assemble(name.clone(), tenant_column, tenant_type, key, columns, policy, row_json);
            schema.plain_updates = PlainUpdates::of(shape, any_generated);
            tables.insert(name, Arc::new(schema));
        }
        Ok(Catalog { tables })
    }

    /// A catalog of the given tables (tests, and tools that know their tables).
    pub fn of(tables: Vec<TableSchema>) -> Catalog {
        Catalog { tables: tables.into_iter().map(|t| (t.name.clone(), Arc::new(t))).collect() }
    }
}

impl TableSchema {
    /// A table's schema with its statements built.
    pub fn assemble(
        name: String,
        tenant_column: String,
        tenant_type: String,
        key: Vec<String>,
        columns: BTreeMap<String, Column>,
        policy: MergePolicy,
        row_json: &'static str,
    ) -> TableSchema {
        let mut schema = TableSchema {
            name,
            tenant_column,
            tenant_type,
            key,
            columns,
            policy,
            row_json,
            plain_updates: None,
            read_sql: String::new(),
            read_locking_cursors_sql: String::new(),
            delete_sql: String::new(),
        };
        schema.read_sql = schema.build_read_sql(false);
        schema.read_locking_cursors_sql = schema.build_read_sql(true);
        schema.delete_sql = schema.build_delete_sql();
        schema
    }
}

/// A text that changes when anything that decides what an update of `table` (its
/// `regclass::text`) stores, or who sees it, changes: its columns (names, types, generated or
/// not), how many `before` row triggers and rules it has, and how many other row triggers but
/// the hub's capture trigger and Postgres's own. The catalog keeps it for tables with neither of
/// the first two (`plain_updates`), and their updates compare it.
fn shape_sql(table: &str) -> String {
    let table = table.replace('\'', "''");
    format!(
        "((select coalesce(string_agg(a.attname::text || ' ' || a.atttypid::text || ' ' || a.atttypmod::text || ' ' || a.attgenerated::text, \
             ',' order by a.attnum), '') from pg_catalog.pg_attribute a \
           where a.attrelid = '{table}'::regclass and a.attnum > 0 and not a.attisdropped) \
         || ';' || (select count(*) from pg_catalog.pg_trigger g where g.tgrelid = '{table}'::regclass and g.tgtype & 3 = 3 and g.tgenabled <> 'D') \
         || ';' || (select count(*) from pg_catalog.pg_rewrite r where r.ev_class = '{table}'::regclass) \
         || ';' || (select count(*) from pg_catalog.pg_trigger g where g.tgrelid = '{table}'::regclass and g.tgtype & 3 = 1 \
           and g.tgenabled <> 'D' and not g.tgisinternal and g.tgname <> 'synchub_capture'))"
    )
}

/// Whether `to_json` renders a column of this type (`format_type`) exactly as `to_jsonb` does.
/// They differ for floats (`to_json` writes 1e15 and above in exponent form, which parses as a
/// float where `to_jsonb`'s digits parse as an integer) and for `json` (kept as written:
/// `1E2`, spaces), and may for types not listed (domains, composites, enums are not checked).
fn renders_as_jsonb(sql_type: &str) -> bool {
    // Without type modifiers: `numeric(10,2)`, `timestamp(3) with time zone`.
    let base = super::as_written::base_type(sql_type.trim_end_matches("[]"));
    matches!(
        base.as_str(),
        "text"
            | "character varying"
            | "character"
            | "smallint"
            | "integer"
            | "bigint"
            | "numeric"
            | "boolean"
            | "uuid"
            | "date"
            | "timestamp without time zone"
            | "timestamp with time zone"
            | "jsonb"
    )
}

/// Register a table through the SQL function, which also installs the capture trigger and,
/// with `row_level_security`, the tenant policies (which needs ownership of the table).
pub async fn register_table(pool: &PgPool, name: &str, tenant_column: &str, policy: MergePolicy, row_level_security: bool) -> Result<()> {
    let rls = if row_level_security { "on" } else { "off" };
    let fail = |e: sqlx::Error| Error::Config(format!("cannot register table {name}: {e}"));
    let mut tx = pool.begin().await?;
    // Hubs that start together against one database (a cluster) register one at a time:
    // concurrent changes to one table's triggers and policies fail ("tuple concurrently updated").
    sqlx::query("select pg_advisory_xact_lock(hashtextextended('synchub.register_table', 0)), set_config('synchub.row_level_security', $1, true)")
        .bind(rls)
        .execute(&mut *tx)
        .await?;
    sqlx::query("select synchub.register_table($1::regclass, $2, $3)")
        .bind(name)
        .bind(tenant_column)
        .bind(policy.as_str())
        .execute(&mut *tx)
        .await
        .map_err(fail)?;
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{renders_as_jsonb, PlainUpdates};

    #[test]
    fn updates_are_plain_without_generated_columns_before_row_triggers_or_rules_and_coalesce_without_other_row_triggers() {
        let of = |shape: &str, generated: bool| PlainUpdates::of(shape.into(), generated).map(|p| p.coalesce);
        assert_eq!(of("id 25 -1 ,n 23 -1 ;0;0;0", false), Some(true));
        assert_eq!(of("id 25 -1 ,n 23 -1 ;0;0;2", false), Some(false), "an application's after row trigger");
        assert_eq!(of("id 25 -1 ,n 23 -1 ;1;0;0", false), None, "a before row trigger");
        assert_eq!(of("id 25 -1 ,n 23 -1 ;0;1;0", false), None, "a rule");
        assert_eq!(of("id 25 -1 ,n 23 -1 ;0;0;0", true), None, "a generated column");
        assert_eq!(of("id 25 -1 ,n 23 -1 ;0;0", false), None, "a shape of another form");
    }

    #[test]
    fn to_json_only_for_types_it_renders_as_to_jsonb_does() {
        for alike in ["text", "integer", "numeric(10,2)", "timestamp(3) with time zone", "character varying(40)", "uuid[]", "jsonb", "boolean"] {
            assert!(renders_as_jsonb(alike), "{alike}");
        }
        for unlike in ["double precision", "real", "json", "double precision[]", "mood", "public.money_amount"] {
            assert!(!renders_as_jsonb(unlike), "{unlike}");
        }
    }
}
