//! WAL that Postgres wrote during a measured window: its insert position (`pg_current_wal_lsn()`)
//! when the window opens, and the bytes between that position and the one when it closes. The
//! figure is the whole cluster's: the rows, the log, checkpoints' full-page images, autovacuum.

use sqlx::PgPool;

use crate::error::Result;

/// Where the WAL stood when the window opened.
pub struct WalMark {
    lsn: String,
}

/// The current WAL insert position.
pub async fn mark(pool: &PgPool) -> Result<WalMark> {
    let lsn: String = sqlx::query_scalar("select pg_current_wal_lsn()::text").fetch_one(pool).await?;
    Ok(WalMark { lsn })
}

/// Bytes of WAL written since `mark`.
pub async fn bytes_since(pool: &PgPool, mark: &WalMark) -> Result<u64> {
    let bytes: i64 = sqlx::query_scalar("select pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)::int8")
        .bind(&mark.lsn)
        .fetch_one(pool)
        .await?;
    Ok(bytes.max(0) as u64)
}

/// Measures one window on `pool`, when there is one: a figure that cannot be read is reported
/// as missing (with a warning), not as a failed run.
pub struct WalWindow<'a> {
    pool: Option<&'a PgPool>,
    mark: Option<WalMark>,
}

impl<'a> WalWindow<'a> {
    pub fn new(pool: Option<&'a PgPool>) -> WalWindow<'a> {
        WalWindow { pool, mark: None }
    }

    /// The window opens (again, after a warm-up): WAL is counted from here.
    pub async fn open(&mut self) {
        let Some(pool) = self.pool else { return };
        self.mark = match mark(pool).await {
            Ok(mark) => Some(mark),
            Err(err) => {
                eprintln!("cannot read the WAL position, no WAL figure: {err}");
                None
            }
        };
    }

    /// The window closes: the bytes written since it opened.
    pub async fn close(&self) -> Option<u64> {
        let (pool, mark) = (self.pool?, self.mark.as_ref()?);
        match bytes_since(pool, mark).await {
            Ok(bytes) => Some(bytes),
            Err(err) => {
                eprintln!("cannot read the WAL position, no WAL figure: {err}");
                None
            }
        }
    }
}
