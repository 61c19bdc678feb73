//! The `pg-ceiling` baseline: the same rows the `devices` scenario merges, written straight
//! to Postgres with the best plain SQL (typed arrays, one upsert and one update statement per
//! batch, one transaction per batch, several connections), into a trigger-free copy of the
//! products table. Hub throughput is reported as a ratio to this.
//!
//! With `--with-log`, each batch also writes what the hub keeps beside the row, in one more
//! statement, into copies of the hub's own tables: a change-log entry per change (seq from the
//! tenant's head, locked first, the row image, the old values of the written fields, the fields
//! as written), the row's version with a clock per field, and the writer's cursor. No merge
//! decisions, rules or conflict records: what Postgres alone costs for the hub's storage. The
//! log is the previous hub's (a row per change, migrations 0001 and 0013), defined here.
//!
//! With `--lean-log`, the same in the hub's current log format ([`crate::lean_log`]): a record
//! per batch, built and encoded by the writer as the hub does.
//!
//! Reports give the WAL Postgres wrote over the run (`wal_bytes`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use uuid::Uuid;

use crate::devices::{self, Workload};
use crate::error::Result;
use crate::lean_log;
use crate::report::{Monitor, Report, Stats};
use crate::wal::WalWindow;

#[derive(Debug, Clone, Serialize, clap::Args)]
pub struct CeilingArgs {
    #[arg(long, env = "DATABASE_URL")]
    #[serde(skip)]
    pub database_url: String,
    /// Concurrent writers (connections), each with its own rows, like the devices.
    #[arg(long, default_value_t = 40)]
    pub writers: usize,
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    #[arg(long, default_value_t = 20)]
    pub duration_secs: u64,
    #[arg(long, default_value_t = 1_000)]
    pub batches_per_writer: usize,
    #[arg(long, default_value_t = 0.0)]
    pub conflict_rate: f64,
    #[arg(long, default_value_t = 200)]
    pub rows_per_writer: usize,
    #[arg(long, default_value_t = 20)]
    pub shared_rows: usize,
    /// Connections in the pool (at most this many transactions at once); the hub's default
    /// `db_pool_size` is 16.
    #[arg(long, default_value_t = 16)]
    pub connections: u32,
    /// Writers are spread over this many tenants (each its own shared rows and, with
    /// `--with-log`, its own head, which its writers take in turn, as a hub tenant's merges do).
    #[arg(long, default_value_t = 1)]
    pub tenants: usize,
    /// Write the hub's bookkeeping too, with the previous hub's log of a row per change
    /// (needs the hub's schema in the database).
    #[arg(long)]
    pub with_log: bool,
    /// Write the hub's bookkeeping too, with the lean log: a record per batch built by the
    /// writer, as the hub now writes it (needs the hub's schema, migration 0018 or later).
    #[arg(long, conflicts_with = "with_log")]
    #[serde(default)]
    pub lean_log: bool,
}

/// What each batch writes beside the rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bookkeeping {
    None,
    PreviousLog,
    LeanLog,
}

impl CeilingArgs {
    fn bookkeeping(&self) -> Bookkeeping {
        match (self.with_log, self.lean_log) {
            (true, _) => Bookkeeping::PreviousLog,
            (false, true) => Bookkeeping::LeanLog,
            (false, false) => Bookkeeping::None,
        }
    }
}


/// The rows of a batch written the way the best plain SQL would (`full_rows`: whole rows
/// upserted from `$3`–`$7`; `partial_rows`: prices and stock updated from `$8`–`$10`), each
/// returning its image: the CTEs that the baselines with bookkeeping share.
macro_rules! write_rows_ctes {
    () => {
        "full_rows as (\
           insert into loadtest_products as t (tenant_id, id, sku, name, price_cents, stock) \
           select $1, * from unnest($3::uuid[], $4::text[], $5::text[], $6::int4[], $7::int4[]) \
           on conflict (id) do update set sku = excluded.sku, name = excluded.name, price_cents = excluded.price_cents, stock = excluded.stock \
           returning t.id, to_json(t) as img), \
         partial_rows as (\
           update loadtest_products p set price_cents = x.price, stock = x.stock \
           from unnest($8::uuid[], $9::int4[], $10::int4[]) as x(id, price, stock) where p.id = x.id \
           returning p.id, to_json(p) as img)"
    };
}
pub(crate) use write_rows_ctes;

const TABLE_SQL: &str = "create table if not exists loadtest_products (like products including defaults including constraints); \
    alter table loadtest_products drop constraint if exists loadtest_products_pkey; \
    alter table loadtest_products add primary key (id)";

/// A head per tenant, made anew for each run.
const HEADS_TABLE_SQL: &str = "drop table if exists loadtest_heads; \
    create table loadtest_heads (tenant_id text primary key, head_seq bigint not null default 0)";

/// The previous hub's log, versions and cursors (trigger-free, with their keys and indexes), as
/// its migrations left them (0001, 0007, 0009, 0013 and 0014), whatever the hub's own tables have
/// become since: the log a row per change, keyed by tenant and seq, change ids unique per tenant,
/// row images and written fields as `json`; clocks as `jsonb`. Like the copies `--with-log` made
/// of the hub's tables before (`like … including all`), with the default fill factor.
const PREVIOUS_TABLES_SQL: &str = "drop table if exists loadtest_change_log, loadtest_row_versions, loadtest_device_cursors; \
    create table loadtest_change_log (\
      tenant_id text not null, \
      seq bigint not null, \
      table_name text not null, \
      op text not null check (op in ('insert', 'update', 'delete')), \
      pk jsonb not null, \
      new_row json, \
      old_values json, \
      written json, \
      origin_device text, \
      user_id text, \
      change_id uuid, \
      device_seq bigint, \
      hlc_wall_ms bigint, \
      hlc_counter integer, \
      committed_at timestamptz not null default now(), \
      primary key (tenant_id, seq)); \
    create unique index loadtest_change_log_change_id on loadtest_change_log (tenant_id, change_id) where change_id is not null; \
    create table loadtest_row_versions (\
      tenant_id text not null, \
      table_name text not null, \
      pk jsonb not null, \
      version bigint not null, \
      deleted jsonb, \
      clocks jsonb not null default '{}', \
      pk_text text not null generated always as (pk::text) stored, \
      last_values jsonb, \
      primary key (tenant_id, table_name, pk_text)); \
    create table loadtest_device_cursors (\
      tenant_id text not null, \
      device_id text not null, \
      last_device_seq bigint not null default 0, \
      user_id text, \
      updated_at timestamptz not null default now(), \
      primary key (tenant_id, device_id))";

/// The tables of each kind of bookkeeping, made anew.
async fn create_tables(pool: &sqlx::PgPool, bookkeeping: Bookkeeping) -> Result<()> {
    sqlx::raw_sql(TABLE_SQL).execute(pool).await?;
    sqlx::query("truncate loadtest_products").execute(pool).await?;
    let tables_sql = match bookkeeping {
        Bookkeeping::None => return Ok(()),
        Bookkeeping::PreviousLog => PREVIOUS_TABLES_SQL,
        Bookkeeping::LeanLog => lean_log::TABLES_SQL,
    };
    sqlx::raw_sql(HEADS_TABLE_SQL).execute(pool).await?;
    sqlx::raw_sql(tables_sql).execute(pool).await?;
    Ok(())
}

pub async fn run(args: CeilingArgs) -> Result<Report> {
    let bookkeeping = args.bookkeeping();
    let options: PgConnectOptions = args.database_url.parse()?;
    let mut pool = PgPoolOptions::new().max_connections(args.connections).connect_with(options.clone()).await?;
    create_tables(&pool, bookkeeping).await?;
    let tenants = args.tenants.max(1);
    for t in (0..tenants).filter(|_| bookkeeping != Bookkeeping::None) {
        sqlx::query("insert into loadtest_heads (tenant_id) values ($1)").bind(format!("ceiling-{t}")).execute(&pool).await?;
    }
    let prefix = Uuid::new_v4().simple().to_string();
    let mut writers: Vec<(Writer, Workload, lean_log::Clocks)> = (0..args.writers)
        .map(|n| {
            let writer = Writer { tenant: format!("ceiling-{}", n % tenants), device: format!("w{n}") };
            let workload = Workload::new(
                &format!("{prefix}-t{}", n % tenants),
                &format!("{prefix}-w{n}"),
                args.rows_per_writer,
                args.shared_rows,
                args.conflict_rate,
            );
            (writer, workload, lean_log::Clocks::of_writer(n as u32 + 1))
        })
        .collect();
    if bookkeeping == Bookkeeping::LeanLog {
        pool = warm_up_lean_log(pool, options, &args, &mut writers).await?;
    }
    let stats = Arc::new(Stats::default());
    let mut monitor = Monitor::new(None);
    monitor.reset(&stats);
    // A connection of the pool's own, so the writers never wait for it nor it for them.
    let wal_pool = PgPoolOptions::new().max_connections(1).connect(&args.database_url).await?;
    let mut wal = WalWindow::new(Some(&wal_pool));
    wal.open().await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration_secs);
    let mut tasks = Vec::new();
    for (writer, mut workload, mut clocks) in writers {
        let (pool, stats, args) = (pool.clone(), stats.clone(), args.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..args.batches_per_writer {
                if Instant::now() >= deadline {
                    break;
                }
                let changes: Vec<_> = (0..args.batch).map(|_| workload.next().0).collect();
                let t = Instant::now();
                let written = match bookkeeping {
                    Bookkeeping::None => write_batch(&pool, "ceiling", &changes).await,
                    Bookkeeping::PreviousLog => write_logged_batch(&pool, &writer, &changes).await,
                    Bookkeeping::LeanLog => lean_log::write_batch(&pool, &writer, &mut clocks, &changes).await,
                };
                match written {
                    Ok(()) => {
                        stats.applied.fetch_add(changes.len() as u64, Ordering::Relaxed);
                        stats.ack_latency(t.elapsed());
                    }
                    Err(err) => stats.error(&err.to_string()),
                }
            }
        }));
    }
    // The writers stop by themselves (count or duration); the window ends when they do.
    let measured = monitor.watch_tasks(&stats, started, &mut tasks, started + Duration::from_secs(24 * 3600), || {}).await;
    monitor.stop(&stats);
    let wal_bytes = wal.close().await;
    let parameters = serde_json::to_value(&args).unwrap_or(Value::Null);
    Ok(Report { wal_bytes, ..monitor.finish("pg-ceiling", parameters, &stats, measured) })
}

/// Before the lean log's measured window, each writer's first batch, then statistics for the
/// copies and new connections. The copies start empty, and a plan Postgres made for an empty
/// table (a scan of every version row for each one updated in place) would be kept by each
/// connection for the whole run, where the hub's long-lived tables have statistics.
async fn warm_up_lean_log(
    pool: sqlx::PgPool,
    options: PgConnectOptions,
    args: &CeilingArgs,
    writers: &mut [(Writer, Workload, lean_log::Clocks)],
) -> Result<sqlx::PgPool> {
    for (writer, workload, clocks) in writers.iter_mut() {
        let changes: Vec<_> = (0..args.batch).map(|_| workload.next().0).collect();
        lean_log::write_batch(&pool, writer, clocks, &changes).await?;
    }
    sqlx::query("analyze loadtest_products, loadtest_heads, loadtest_log_groups, loadtest_log_device_ranges, loadtest_row_versions, loadtest_device_cursors")
        .execute(&pool)
        .await?;
    pool.close().await;
    Ok(PgPoolOptions::new().max_connections(args.connections).connect_with(options).await?)
}

/// One transaction: full rows upserted, partial rows updated; each key once per statement.
async fn write_batch(pool: &sqlx::PgPool, tenant: &str, changes: &[protocol::Change]) -> Result<()> {
    let mut full: HashMap<Uuid, (String, String, i32, i32)> = HashMap::new();
    let mut partial: HashMap<Uuid, (i32, i32)> = HashMap::new();
    for c in changes {
        let id = devices::key_uuid(c);
        let int = |k: &str| c.fields.get(k).and_then(Value::as_i64).unwrap_or(0) as i32;
        match c.fields.get("sku").and_then(Value::as_str) {
            Some(sku) => {
                let name = c.fields.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
                full.insert(id, (sku.to_string(), name, int("price_cents"), int("stock")));
                partial.remove(&id);
            }
            None => {
                partial.insert(id, (int("price_cents"), int("stock")));
            }
        }
    }
    // Rows in key order, so that writers sharing rows lock them in one order (no deadlocks).
    let mut full: Vec<_> = full.into_iter().collect();
    full.sort_by_key(|(id, _)| *id);
    let mut partial: Vec<_> = partial.into_iter().collect();
    partial.sort_by_key(|(id, _)| *id);
    let mut tx = pool.begin().await?;
    if !full.is_empty() {
        let (ids, rest): (Vec<Uuid>, Vec<_>) = full.into_iter().unzip();
        let (skus, names, prices, stocks) = rest.into_iter().fold(
            (Vec::new(), Vec::new(), Vec::new(), Vec::new()),
            |(mut a, mut b, mut c, mut d), (sku, name, price, stock)| {
                a.push(sku);
                b.push(name);
                c.push(price);
                d.push(stock);
                (a, b, c, d)
            },
        );
        sqlx::query(
            "insert into loadtest_products (tenant_id, id, sku, name, price_cents, stock) \
             select $1, * from unnest($2::uuid[], $3::text[], $4::text[], $5::int4[], $6::int4[]) \
             on conflict (id) do update set sku = excluded.sku, name = excluded.name, price_cents = excluded.price_cents, stock = excluded.stock",
        )
        .bind(tenant)
        .bind(&ids)
        .bind(&skus)
        .bind(&names)
        .bind(&prices)
        .bind(&stocks)
        .execute(&mut *tx)
        .await?;
    }
    if !partial.is_empty() {
        let (ids, rest): (Vec<Uuid>, Vec<(i32, i32)>) = partial.into_iter().unzip();
        let (prices, stocks): (Vec<i32>, Vec<i32>) = rest.into_iter().unzip();
        sqlx::query(
            "update loadtest_products p set price_cents = x.price, stock = x.stock \
             from unnest($1::uuid[], $2::int4[], $3::int4[]) as x(id, price, stock) where p.id = x.id",
        )
        .bind(&ids)
        .bind(&prices)
        .bind(&stocks)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Who a writer is, in the log and cursor tables.
pub(crate) struct Writer {
    pub tenant: String,
    pub device: String,
}

type RowValues = (Option<(String, String)>, i32, i32);

/// Each row a batch writes, once, with the batch's last values (keys in order, so that writers
/// sharing rows lock them in one order), as the arguments of the upsert and the update.
#[derive(Default)]
pub(crate) struct LastValues {
    pub full_ids: Vec<Uuid>,
    pub skus: Vec<String>,
    pub names: Vec<String>,
    pub full_prices: Vec<i32>,
    pub full_stocks: Vec<i32>,
    pub part_ids: Vec<Uuid>,
    pub part_prices: Vec<i32>,
    pub part_stocks: Vec<i32>,
}

impl LastValues {
    /// `query` with these rows bound as `$3`–`$10` of `write_rows_ctes!()`.
    pub fn bind<'q>(
        &'q self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(&self.full_ids)
            .bind(&self.skus)
            .bind(&self.names)
            .bind(&self.full_prices)
            .bind(&self.full_stocks)
            .bind(&self.part_ids)
            .bind(&self.part_prices)
            .bind(&self.part_stocks)
    }

    pub fn of(changes: &[protocol::Change]) -> LastValues {
        // By key: sku and name when a change wrote the whole row, price and stock.
        let mut rows: std::collections::BTreeMap<Uuid, RowValues> = std::collections::BTreeMap::new();
        for c in changes {
            let int = |k: &str| c.fields.get(k).and_then(Value::as_i64).unwrap_or(0) as i32;
            let full = c.fields.get("sku").and_then(Value::as_str).map(|sku| {
                (sku.to_string(), c.fields.get("name").and_then(Value::as_str).unwrap_or_default().to_string())
            });
            let row = rows.entry(devices::key_uuid(c)).or_insert((None, 0, 0));
            *row = (full.or(row.0.take()), int("price_cents"), int("stock"));
        }
        let mut values = LastValues::default();
        for (id, (full, price, stock)) in rows {
            match full {
                Some((sku, name)) => {
                    values.full_ids.push(id);
                    values.skus.push(sku);
                    values.names.push(name);
                    values.full_prices.push(price);
                    values.full_stocks.push(stock);
                }
                None => {
                    values.part_ids.push(id);
                    values.part_prices.push(price);
                    values.part_stocks.push(stock);
                }
            }
        }
        values
    }
}

/// Take `count` seqs from the tenant's head, locking it until commit (a hub tenant's merges
/// take turns); returns the seq before them.
pub(crate) async fn take_head(conn: &mut sqlx::PgConnection, tenant: &str, count: usize) -> Result<i64> {
    let base = sqlx::query_scalar("update loadtest_heads set head_seq = head_seq + $2 where tenant_id = $1 returning head_seq - $2")
        .bind(tenant)
        .bind(count as i64)
        .fetch_one(conn)
        .await?;
    Ok(base)
}

/// One transaction: the tenant's head (locked, as a hub tenant's merges take turns), then the
/// rows, one log entry per change, the rows' versions and clocks, and the writer's cursor in
/// one statement.
async fn write_logged_batch(pool: &sqlx::PgPool, writer: &Writer, changes: &[protocol::Change]) -> Result<()> {
    let Some(last) = changes.last() else { return Ok(()) };
    let rows = LastValues::of(changes);
    let ids: Vec<Uuid> = changes.iter().map(devices::key_uuid).collect();
    let written: Vec<Value> = changes.iter().map(|c| Value::Object(c.fields.clone())).collect();
    // The log keeps the fields as written in a `json` column, as the hub's does: sent as text,
    // beside the `jsonb` the old values and clocks are computed from.
    let written_text: Vec<String> = written.iter().map(Value::to_string).collect();
    let change_ids: Vec<Uuid> = changes.iter().map(|c| c.change_id).collect();
    let device_seqs: Vec<i64> = changes.iter().map(|c| c.device_seq as i64).collect();
    let walls: Vec<i64> = changes.iter().map(|c| c.hlc.wall_ms as i64).collect();
    let counters: Vec<i32> = changes.iter().map(|c| c.hlc.counter as i32).collect();
    let mut tx = pool.begin().await?;
    let base = take_head(&mut tx, &writer.tenant, changes.len()).await?;
    let query = sqlx::query(
        // The rows before the statement (its snapshot); no row lock, which a write of the same
        // statement would make skip the row: the head serializes the tenant's writers.
        concat!(
            "with old as materialized (\
               select q.id, to_jsonb(q) as img from loadtest_products q where q.id = any($2)), ",
            write_rows_ctes!(),
            ", \
         new as (select * from full_rows union all select * from partial_rows), \
         c as (select * from unnest($11::uuid[], $12::jsonb[], $13::uuid[], $14::int8[], $15::int8[], $16::int4[], $20::text[]) \
           with ordinality as c(id, written, change_id, device_seq, wall, counter, written_text, n)), \
         log as (\
           insert into loadtest_change_log (tenant_id, seq, table_name, op, pk, new_row, old_values, written, origin_device, user_id, \
             change_id, device_seq, hlc_wall_ms, hlc_counter) \
           select $1, $17 + c.n, 'products', case when old.img is null then 'insert' else 'update' end, jsonb_build_object('id', c.id), \
             new.img, (select jsonb_object_agg(k, old.img -> k) from jsonb_object_keys(c.written) k where old.img -> k is distinct from c.written -> k), \
             c.written_text::json, $18, $18, c.change_id, c.device_seq, c.wall, c.counter \
           from c join new on new.id = c.id left join old on old.id = c.id), \
         versions as (\
           insert into loadtest_row_versions (tenant_id, table_name, pk, version, clocks) \
           select $1, 'products', jsonb_build_object('id', c.id), $17 + max(c.n), \
             jsonb_object_agg(k, jsonb_build_array(c.wall, c.counter, $18, $17 + c.n, $18) order by c.n) \
           from c cross join jsonb_object_keys(c.written) k group by c.id \
           on conflict (tenant_id, table_name, pk_text) do update set version = excluded.version, \
             clocks = loadtest_row_versions.clocks || excluded.clocks) \
         insert into loadtest_device_cursors (tenant_id, device_id, user_id, last_device_seq) values ($1, $18, $18, $19) \
         on conflict (tenant_id, device_id) do update set last_device_seq = excluded.last_device_seq, updated_at = now()"
        ),
    )
    .bind(&writer.tenant)
    .bind(&ids);
    rows.bind(query)
    .bind(&ids)
    .bind(&written)
    .bind(&change_ids)
    .bind(&device_seqs)
    .bind(&walls)
    .bind(&counters)
    .bind(base)
    .bind(&writer.device)
    .bind(last.device_seq as i64)
    .bind(&written_text)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}
