//! Subscription snapshots: every row of a table that matches a filter, read page by page in
//! one repeatable-read transaction together with the tenant's head seq, so that the live
//! changes after that seq continue the snapshot without a gap or a duplicate.

use protocol::{Condition, FilterOp, Object, SnapshotRow};
use serde_json::Value;
use sqlx::Row;

use super::catalog::TableSchema;
use super::Store;
use crate::error::{Error, Result};
use crate::ids::{Seq, TenantId};

/// Why a subscription snapshot was not read.
pub enum SnapshotRefusal {
    /// More rows match than allowed.
    TooLarge { max_rows: usize },
}

impl Store {
    /// The rows of `table` matching `filter` (and `keep`, the caller's further test, e.g. the
    /// reader's row restriction), in primary-key order, with their versions, and the head
    /// seq they were read at. At most `max_rows`; more is refused.
    pub async fn subscription_snapshot(
        &self,
        tenant: &TenantId,
        table: &TableSchema,
        filter: &[Condition],
        page_rows: u32,
        max_rows: usize,
        keep: impl Fn(&Object) -> bool,
    ) -> Result<std::result::Result<(Vec<SnapshotRow>, Seq), SnapshotRefusal>> {
        let _read = self.read_permit().await?;
        let mut tx = self.begin_tenant_with(tenant, "begin isolation level repeatable read, read only", &[], "").await?;
        let head: Option<i64> = sqlx::query_scalar("select head_seq from synchub.tenants where tenant_id = $1")
            .bind(tenant.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        // Equalities narrow the scan in SQL (jsonb containment compares numbers numerically and
        // strings exactly, as the filter does); every condition is then checked here.
        let equalities: Object = filter
            .iter()
            .filter(|c| c.op == FilterOp::Eq && !c.value.is_null())
            .map(|c| (c.column.clone(), c.value.clone()))
            .collect();
        let sql = table.filtered_snapshot_sql();
        let mut rows = Vec::new();
        let mut after: Option<Value> = None;
        loop {
            let page = sqlx::query(&sql)
                .bind(tenant.as_str())
                .bind(after.take())
                .bind(page_rows as i64)
                .bind(Value::Object(equalities.clone()))
                .fetch_all(&mut *tx)
                .await?;
            let full = page.len() as u32 == page_rows;
            let mut keys = Vec::new();
            let mut page_matches = Vec::new();
            for r in page {
                let key: Value = r.get("key");
                after = Some(key.clone());
                let Some(Value::Object(row)) = r.get::<Option<Value>, _>("row") else { continue };
                if protocol::filter::matches(filter, &row) && keep(&row) {
                    keys.push(key);
                    page_matches.push(row);
                }
            }
            if rows.len() + page_matches.len() > max_rows {
                return Ok(Err(SnapshotRefusal::TooLarge { max_rows }));
            }
            let versions = super::log::row_versions(&mut tx, tenant, &table.name, &keys).await?;
            rows.extend(page_matches.into_iter().zip(versions).map(|(row, version)| SnapshotRow { row, version }));
            if !full {
                break;
            }
        }
        tx.commit().await.map_err(Error::from)?;
        Ok(Ok((rows, head.unwrap_or(0) as Seq)))
    }
}
