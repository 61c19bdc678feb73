//! Everything the hub keeps in Postgres: the connection pool, migrations, the catalog of synced
//! tables, the group-commit transaction, and reads of the change log. Storage never calls
//! actors; it returns results and deltas to whoever asked.

pub mod apply;
pub mod catalog;
pub mod conflicts;
pub mod log;
pub mod subscriptions;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::config::Config;
use crate::error::{Error, Result};
use catalog::Catalog;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How often an unknown table name may trigger a catalog reload (tables can be registered
/// in SQL while the hub runs).
const CATALOG_RELOAD_MIN_INTERVAL: Duration = Duration::from_secs(1);

pub struct Store {
    pub pool: PgPool,
    /// Reads for sessions (hello, catch-up, snapshots) take at most half the pool, so that a
    /// reconnect storm queues here, in order, while merges still find connections.
    reads: tokio::sync::Semaphore,
    catalog: RwLock<(Arc<Catalog>, Instant)>,
}

impl Store {
    /// Connect, migrate, register the configured tables and load the catalog.
    pub async fn open(config: &Config) -> Result<Arc<Store>> {
        let options: PgConnectOptions =
            config.database_url.0.parse().map_err(|e| Error::Config(format!("database_url: {e}")))?;
        let pool = PgPoolOptions::new()
            .max_connections(config.db_pool_size)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        MIGRATOR.run(&pool).await?;
        for table in &config.tables {
            catalog::register_table(&pool, &table.name, &table.tenant_column, table.policy).await?;
        }
        let catalog = Catalog::load(&pool).await?;
        tracing::info!(tables = ?catalog.names().collect::<Vec<_>>(), "synced tables loaded");
        let reads = tokio::sync::Semaphore::new((config.db_pool_size as usize / 2).max(1));
        Ok(Arc::new(Store { pool, reads, catalog: RwLock::new((Arc::new(catalog), Instant::now())) }))
    }

    /// Wait for a turn to read (without a deadline: a waiting session costs no connection).
    async fn read_permit(&self) -> Result<tokio::sync::SemaphorePermit<'_>> {
        self.reads.acquire().await.map_err(|_| Error::ShuttingDown)
    }

    pub fn catalog(&self) -> Arc<Catalog> {
        // unwrap: the lock is never held across a panic-prone section.
        self.catalog.read().expect("catalog lock").0.clone()
    }

    /// Reload the catalog when a table is not found, at most once per interval.
    pub async fn catalog_with(&self, table: &str) -> Arc<Catalog> {
        let (current, loaded_at) = self.catalog.read().expect("catalog lock").clone();
        if current.get(table).is_some() || loaded_at.elapsed() < CATALOG_RELOAD_MIN_INTERVAL {
            return current;
        }
        match Catalog::load(&self.pool).await {
            Ok(fresh) => {
                let fresh = Arc::new(fresh);
                *self.catalog.write().expect("catalog lock") = (fresh.clone(), Instant::now());
                fresh
            }
            Err(err) => {
                tracing::warn!(%err, "catalog reload failed");
                current
            }
        }
    }

    pub async fn ping(&self) -> Result<()> {
        sqlx::query("select 1").execute(&self.pool).await?;
        Ok(())
    }
}
