//! The `pg-ceiling` baseline: the same rows the `devices` scenario merges, written straight
//! to Postgres with the best plain SQL (typed arrays, one upsert and one update statement per
//! batch, one transaction per batch, several connections), into a trigger-free copy of the
//! products table. Hub throughput is reported as a ratio to this.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

use crate::devices::{self, Workload};
use crate::error::Result;
use crate::report::{Monitor, Report, Stats};

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
}

const TABLE_SQL: &str = "create table if not exists loadtest_products (like products including defaults including constraints); \
    alter table loadtest_products drop constraint if exists loadtest_products_pkey; \
    alter table loadtest_products add primary key (id)";

pub async fn run(args: CeilingArgs) -> Result<Report> {
    let pool = PgPoolOptions::new().max_connections(args.connections).connect(&args.database_url).await?;
    sqlx::raw_sql(TABLE_SQL).execute(&pool).await?;
    sqlx::query("truncate loadtest_products").execute(&pool).await?;
    let stats = Arc::new(Stats::default());
    let prefix = Uuid::new_v4().simple().to_string();
    let mut monitor = Monitor::new(None);
    monitor.reset(&stats);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration_secs);
    let mut tasks = Vec::new();
    for n in 0..args.writers {
        let (pool, stats, args) = (pool.clone(), stats.clone(), args.clone());
        let mut workload = Workload::new(
            &format!("{prefix}-t0"),
            &format!("{prefix}-w{n}"),
            args.rows_per_writer,
            args.shared_rows,
            args.conflict_rate,
        );
        tasks.push(tokio::spawn(async move {
            for _ in 0..args.batches_per_writer {
                if Instant::now() >= deadline {
                    break;
                }
                let changes: Vec<_> = (0..args.batch).map(|_| workload.next().0).collect();
                let t = Instant::now();
                match write_batch(&pool, "ceiling", &changes).await {
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
    let parameters = serde_json::to_value(&args).unwrap_or(Value::Null);
    Ok(monitor.finish("pg-ceiling", parameters, &stats, measured))
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
