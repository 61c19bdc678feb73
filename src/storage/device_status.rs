//! Device status for the operations view: when the hub last saw each device of a tenant and the
//! last position (seq) it knows the device has (`synchub.device_status`, migration 0016), and
//! the read of every device's status (with its cursor and latest push) and the tenant's head.
//!
//! The writes come from device sessions (a resume from a position, the session's end) and must
//! never slow or fail a session or a push: [`Store::note_device_seen`] spawns the write and
//! returns at once, at most `device_status_writes` run at a time (more are dropped: a status is
//! only ever a little staler), each counts against the session reads' share of the pool and
//! touches only its own table (never a row a merge locks), waits at most
//! `device_status_lock_timeout_ms` for its row, and a failure is logged, never reported to the
//! client.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::Store;
use crate::error::{Error, Result};
use crate::ids::{DeviceId, Seq, TenantId, UserId, CONSOLE_DEVICE_PREFIX, DASHBOARD_DEVICE_PREFIX};

/// The bounds of the status writes (config `device_status_writes`, `device_status_lock_timeout_ms`):
/// writes in flight at once over every tenant, past which a write is dropped (and counted in
/// the log), so a reconnect storm cannot queue unbounded work behind the sessions' reads; and how
/// long a write waits for the device's status row (another write of the same device holds it).
pub struct StatusWrites {
    in_flight: Arc<tokio::sync::Semaphore>,
    max: usize,
    dropped: AtomicUsize,
    lock_timeout: Duration,
}

impl StatusWrites {
    pub fn new(max: usize, lock_timeout: Duration) -> StatusWrites {
        StatusWrites { in_flight: Arc::new(tokio::sync::Semaphore::new(max)), max, dropped: AtomicUsize::new(0), lock_timeout }
    }
}

/// A device as the hub last knew it (its rows of `synchub.device_status` and `device_cursors`).
#[derive(Debug, Clone, Serialize)]
pub struct DeviceStatus {
    pub device_id: String,
    pub user_id: Option<String>,
    /// When a session of the device last said hello or ended, Unix ms.
    pub last_seen_ms: Option<i64>,
    /// The last seq the hub knows the device has.
    pub position: Option<Seq>,
    /// The last `device_seq` of the device's changes the hub has taken.
    pub last_device_seq: u64,
    /// When the device's latest logged change was committed, Unix ms (none once the log
    /// holding it was trimmed).
    pub last_push_ms: Option<i64>,
}

/// A row of [`Store::device_statuses`]' query: device, user, last seen (ms), position, last
/// device_seq, last push (ms).
type StatusRow = (String, Option<String>, Option<i64>, Option<i64>, i64, Option<i64>);

/// The tenant's head and its devices, read together.
#[derive(Debug, Clone)]
pub struct DeviceStatuses {
    pub head_seq: Seq,
    pub devices: Vec<DeviceStatus>,
    /// More devices than the read asked for at most: the list holds the first by id.
    pub truncated: bool,
}

impl Store {
    /// Record, in the background, that a session of `device` was seen now, with the position
    /// it has (`None`: unknown, e.g. a session that ended before it resumed). Returns at once.
    pub fn note_device_seen(self: &Arc<Self>, tenant: &TenantId, device: &DeviceId, user: &UserId, position: Option<Seq>) {
        // A session that stops while its arbiter shuts down has no runtime left to write with.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let writes = &self.status_writes;
        let Ok(slot) = writes.in_flight.clone().try_acquire_owned() else {
            let dropped = writes.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            // Once, then every thousandth: a storm should not flood the log either.
            if dropped % 1000 == 1 {
                tracing::warn!(dropped, in_flight = writes.max, "device status writes dropped (device_status_writes)");
            }
            return;
        };
        let (store, tenant, device, user) = (self.clone(), tenant.clone(), device.to_string(), user.to_string());
        runtime.spawn(async move {
            let _slot = slot;
            let write = store.within_transaction_deadline(store.write_device_seen(&tenant, &device, &user, position));
            match write.await {
                Ok(()) | Err(Error::ShuttingDown) => {}
                Err(err) => tracing::warn!(%err, %tenant, %device, "device status not written"),
            }
        });
    }

    async fn write_device_seen(&self, tenant: &TenantId, device: &str, user: &str, position: Option<Seq>) -> Result<()> {
        let _read = self.read_permit().await?;
        let lock_timeout = self.status_writes.lock_timeout.as_millis().to_string();
        let mut tx = self.begin_tenant_with(tenant, "begin", &[("lock_timeout", &lock_timeout)], "").await?;
        // A position not known keeps the last one known.
        sqlx::query(
            "insert into synchub.device_status as s (tenant_id, device_id, user_id, last_seen_at, last_position) \
             values ($1, $2, $3, now(), $4) \
             on conflict (tenant_id, device_id) do update set last_seen_at = excluded.last_seen_at, \
               last_position = coalesce(excluded.last_position, s.last_position), user_id = excluded.user_id",
        )
        .bind(tenant.as_str())
        .bind(device)
        .bind(user)
        .bind(position.map(|p| p as i64))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every device of the tenant the hub has a status or a cursor for (not the console's or
    /// dashboards'), by id, at most `max`, with the tenant's head seq, in one snapshot.
    pub async fn device_statuses(&self, tenant: &TenantId, max: u32) -> Result<DeviceStatuses> {
        let max = i64::from(max.max(1));
        let _read = self.read_permit().await?;
        let mut tx = self.begin_tenant_with(tenant, "begin isolation level repeatable read, read only", &[], "").await?;
        let head: Option<i64> = sqlx::query_scalar("select head_seq from synchub.tenants where tenant_id = $1")
            .bind(tenant.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        // The latest push: the device's last range, by the primary key, and its group's time.
        let rows: Vec<StatusRow> = sqlx::query_as(
            "select d.device_id, coalesce(s.user_id, c.user_id), (extract(epoch from s.last_seen_at) * 1000)::int8, s.last_position, \
               coalesce(c.last_device_seq, 0), \
               (select (extract(epoch from g.committed_at) * 1000)::int8 \
                  from synchub.log_device_ranges r \
                  join synchub.log_groups g on g.tenant_id = r.tenant_id and g.last_seq = r.group_last_seq \
                 where r.tenant_id = $1 and r.device_id = d.device_id \
                 order by r.last_device_seq desc limit 1) \
             from (select device_id from synchub.device_status where tenant_id = $1 \
                   union select device_id from synchub.device_cursors where tenant_id = $1) d \
             left join synchub.device_status s on s.tenant_id = $1 and s.device_id = d.device_id \
             left join synchub.device_cursors c on c.tenant_id = $1 and c.device_id = d.device_id \
             where left(d.device_id, $2) <> $3 and left(d.device_id, $4) <> $5 \
             order by d.device_id limit $6",
        )
        .bind(tenant.as_str())
        .bind(CONSOLE_DEVICE_PREFIX.len() as i32)
        .bind(CONSOLE_DEVICE_PREFIX)
        .bind(DASHBOARD_DEVICE_PREFIX.len() as i32)
        .bind(DASHBOARD_DEVICE_PREFIX)
        .bind(max + 1)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let truncated = rows.len() as i64 > max;
        let devices = rows
            .into_iter()
            .take(max as usize)
            .map(|(device_id, user_id, last_seen_ms, position, last_device_seq, last_push_ms)| DeviceStatus {
                device_id,
                user_id,
                last_seen_ms,
                position: position.map(|p| p.max(0) as Seq),
                last_device_seq: last_device_seq.max(0) as u64,
                last_push_ms,
            })
            .collect();
        Ok(DeviceStatuses { head_seq: head.unwrap_or(0).max(0) as Seq, devices, truncated })
    }
}
