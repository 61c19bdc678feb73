//! Everything the hub keeps in Postgres: the connection pool, migrations, the catalog of synced
//! tables, the group-commit transaction, and reads of the change log. Storage never calls
//! actors; it returns results and deltas to whoever asked.

pub mod apply;
pub mod as_written;
pub mod catalog;
pub mod clock_writers;
pub mod clocks;
pub mod presentation;
pub mod conflicts;
pub mod device_status;
pub mod documents;
pub mod log;
pub mod record;
pub mod refusal;
pub mod row_cache;
pub mod subscriptions;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::pool::PoolConnection;
use sqlx::{Connection, PgConnection, PgPool, Postgres, Transaction};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::ids::TenantId;
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
    /// Group commits take at most the rest but one (the notification listener's), so that
    /// reads find connections too: after a restart, a tenant's first hello waits for its actor
    /// to read the tenant's head, which would otherwise queue behind every tenant's merge.
    merges: Arc<tokio::sync::Semaphore>,
    catalog: RwLock<(Arc<Catalog>, Instant)>,
    /// Tenant-scoped transactions run as `synchub_tenant` (config `row_level_security`).
    row_level_security: bool,
    /// Cluster mode: other hubs commit for the same tenants (see `apply`'s group lock).
    clustered: bool,
    /// Rows the tenants' row caches hold together (config `row_cache_total_rows`).
    row_budget: row_cache::RowBudget,
    /// How long one of the tenant actors' transactions may take (config
    /// `db_transaction_timeout_ms`).
    transaction_timeout: Duration,
    /// Tables' label columns and formats (config `[[tables]]`).
    presentation: presentation::Presentation,
    /// Numbers of the writers that row versions' clocks name (config
    /// `clock_writer_cache_entries`).
    clock_writers: clock_writers::ClockWriters,
    /// The bounds of the devices' status writes (config `device_status_writes`,
    /// `device_status_lock_timeout_ms`).
    status_writes: device_status::StatusWrites,
}

/// How many of the pool's connections session reads and group commits may hold at once: half
/// for reads, the rest but one (the notification listener's) for merges, so that from three
/// connections up neither waits for the other's.
fn pool_shares(pool_size: u32) -> (usize, usize) {
    let reads = (pool_size as usize / 2).max(1);
    (reads, (pool_size as usize).saturating_sub(reads + 1).max(1))
}

/// A pooled connection held for one group commit, counted against the merges' share.
pub struct GroupConnection {
    conn: PoolConnection<Postgres>,
    _turn: tokio::sync::OwnedSemaphorePermit,
}

impl std::ops::Deref for GroupConnection {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self.conn
    }
}

impl std::ops::DerefMut for GroupConnection {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}

/// The Postgres role whose row-level security policies admit one tenant's rows.
pub const TENANT_ROLE: &str = "synchub_tenant";

/// `text` as a Postgres string literal: an `E''` literal whose quotes and backslashes are
/// escaped, which reads the same whatever `standard_conforming_strings` says. Tenant ids hold
/// no NUL (auth refuses such tokens).
pub fn sql_literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 3);
    out.push_str("E'");
    for c in text.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

impl Store {
    /// What every tenant's row cache counts its rows against.
    pub fn row_budget(&self) -> row_cache::RowBudget {
        self.row_budget.clone()
    }

    /// Connect, migrate, register the configured tables and load the catalog.
    pub async fn open(config: &Config) -> Result<Arc<Store>> {
        let options: PgConnectOptions =
            config.database_url.0.parse().map_err(|e| Error::Config(format!("database_url: {e}")))?;
        // Migrations may rewrite large tables: on a connection of their own, without the
        // statement timeout.
        let mut setup = PgConnection::connect_with(&options).await?;
        MIGRATOR.run(&mut setup).await?;
        let _ = setup.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(config.db_pool_size)
            .acquire_timeout(config.db_acquire_timeout())
            .connect_with(with_server_timeouts(options, config))
            .await?;
        for table in &config.tables {
            catalog::register_table(&pool, &table.name, &table.tenant_column, table.policy, config.row_level_security).await?;
        }
        if config.row_level_security {
            check_row_level_security(&pool).await?;
        }
        let catalog = Catalog::load(&pool).await?;
        tracing::info!(tables = ?catalog.names().collect::<Vec<_>>(), "synced tables loaded");
        let presentation = presentation::Presentation::resolve(&pool, &catalog, &config.tables).await?;
        let (reads, merges) = pool_shares(config.db_pool_size);
        Ok(Arc::new(Store {
            pool,
            reads: tokio::sync::Semaphore::new(reads),
            merges: Arc::new(tokio::sync::Semaphore::new(merges)),
            catalog: RwLock::new((Arc::new(catalog), Instant::now())),
            row_level_security: config.row_level_security,
            clustered: config.clustered(),
            row_budget: row_cache::RowBudget::new(config.row_cache_total_rows),
            clock_writers: clock_writers::ClockWriters::new(config.clock_writer_cache_entries),
            transaction_timeout: config.db_transaction_timeout(),
            presentation,
            status_writes: device_status::StatusWrites::new(
                config.device_status_writes,
                Duration::from_millis(config.device_status_flush_ms),
                Duration::from_millis(config.device_status_lock_timeout_ms),
            ),
        }))
    }

    /// Run one transaction (a group commit, a read of the tenant's head or log) within the
    /// transaction deadline, so that a database that stops answering mid-way cannot hold a
    /// tenant actor. Past it the work is dropped with its connection: sqlx rolls the
    /// transaction back, or finds it committed, once Postgres answers again.
    pub async fn within_transaction_deadline<T>(&self, work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        tokio::time::timeout(self.transaction_timeout, work).await.unwrap_or(Err(Error::StorageTimeout(self.transaction_timeout)))
    }

    /// Open a transaction scoped to `tenant`, in one round trip: `begin` (the opening
    /// statement, e.g. with an isolation level), then the tenant's role and setting (with
    /// row-level security on), `settings` as more `set_config` calls, then `then` (e.g. a
    /// savepoint). Every statement on a tenant's data goes through here.
    pub async fn begin_tenant_with(
        &self,
        tenant: &TenantId,
        begin: &str,
        settings: &[(&str, &str)],
        then: &str,
    ) -> Result<Transaction<'static, Postgres>> {
        Ok(self.pool.begin_with(self.tenant_begin_sql(tenant, begin, settings, then)).await?)
    }

    /// The statements of [`Store::begin_tenant_with`], for a connection already held.
    pub fn tenant_begin_sql(&self, tenant: &TenantId, begin: &str, settings: &[(&str, &str)], then: &str) -> String {
        let mut sql = format!("{begin}; ");
        if self.row_level_security {
            sql.push_str("set local role ");
            sql.push_str(TENANT_ROLE);
            sql.push_str("; ");
        }
        sql.push_str("select set_config('synchub.tenant', ");
        sql.push_str(&sql_literal(tenant.as_str()));
        sql.push_str(", true)");
        for (name, value) in settings {
            sql.push_str(&format!(", set_config({}, {}, true)", sql_literal(name), sql_literal(value)));
        }
        if !then.is_empty() {
            sql.push_str("; ");
            sql.push_str(then);
        }
        sql
    }

    /// A connection for one group commit (held only while the group is formed and committed),
    /// once it is the merges' turn.
    pub async fn group_connection(&self) -> Result<GroupConnection> {
        let turn = self.merges.clone().acquire_owned().await.map_err(|_| Error::ShuttingDown)?;
        Ok(GroupConnection { conn: self.pool.acquire().await?, _turn: turn })
    }

    /// [`Store::begin_tenant_with`] a plain `begin`.
    pub async fn begin_tenant(&self, tenant: &TenantId) -> Result<Transaction<'static, Postgres>> {
        self.begin_tenant_with(tenant, "begin", &[], "").await
    }

    /// Wait for a turn to read (without a deadline: a waiting session costs no connection).
    async fn read_permit(&self) -> Result<tokio::sync::SemaphorePermit<'_>> {
        self.reads.acquire().await.map_err(|_| Error::ShuttingDown)
    }

    pub fn presentation(&self) -> &presentation::Presentation {
        &self.presentation
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

    pub fn row_level_security(&self) -> bool {
        self.row_level_security
    }

    pub async fn ping(&self) -> Result<()> {
        sqlx::query("select 1").execute(&self.pool).await?;
        Ok(())
    }
}

/// The server-side timeouts of the hub's connections (`0` leaves Postgres's setting).
fn with_server_timeouts(options: PgConnectOptions, config: &Config) -> PgConnectOptions {
    let timeouts = [
        ("statement_timeout", config.db_statement_timeout_ms),
        ("idle_in_transaction_session_timeout", config.db_idle_in_transaction_timeout_ms),
    ];
    let set: Vec<(&str, String)> = timeouts.iter().filter(|(_, ms)| *ms > 0).map(|(name, ms)| (*name, ms.to_string())).collect();
    options.options(set)
}

/// With row-level security on, the hub must be able to become the tenant role, and every synced
/// table must carry the tenant policy: otherwise the hub's tenant transactions would fail or
/// the second line would be missing. Refuse to start, saying what to do.
async fn check_row_level_security(pool: &PgPool) -> Result<()> {
    let usable: bool = sqlx::query_scalar(
        "select case when exists (select 1 from pg_roles where rolname = $1) then pg_has_role(current_user, $1, 'MEMBER') else false end",
    )
    .bind(TENANT_ROLE)
    .fetch_one(pool)
    .await?;
    if !usable {
        return Err(Error::Config(format!(
            "row_level_security is on, but the role {TENANT_ROLE} is missing or not granted to the hub's login: \
             as a superuser, `create role {TENANT_ROLE} nologin; grant {TENANT_ROLE} to <hub login>; select synchub.secure_all();`, \
             or set row_level_security = false"
        )));
    }
    let unsecured: Vec<String> = sqlx::query_scalar(
        "select s.table_name from synchub.synced_tables s where to_regclass(s.table_name) is not null \
         and not exists (select 1 from pg_policy p where p.polrelid = to_regclass(s.table_name) and p.polname = 'synchub_tenant_only') \
         order by 1",
    )
    .fetch_all(pool)
    .await?;
    if !unsecured.is_empty() {
        return Err(Error::Config(format!(
            "row_level_security is on, but synced tables lack the tenant policy: {}; \
             their owner runs `select synchub.secure_table('<table>', '<tenant column>')`, or set row_level_security = false",
            unsecured.join(", ")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{pool_shares, sql_literal};

    #[test]
    fn reads_merges_and_the_listener_fit_the_pool() {
        assert_eq!(pool_shares(16), (8, 7));
        assert_eq!(pool_shares(3), (1, 1));
        for size in 3..64 {
            let (reads, merges) = pool_shares(size);
            assert!(reads + merges < size as usize, "{size}");
            assert!(reads >= 1 && merges >= reads.saturating_sub(1), "{size}");
        }
        // Below three connections the shares overlap, but neither is ever zero.
        assert_eq!(pool_shares(1), (1, 1));
    }

    #[test]
    fn literals_escape_quotes_and_backslashes() {
        assert_eq!(sql_literal("acme"), "E'acme'");
        assert_eq!(sql_literal("o'brien"), "E'o''brien'");
        assert_eq!(sql_literal("a\\'; drop table x; --"), "E'a\\\\''; drop table x; --'");
    }
}
