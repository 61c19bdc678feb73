//! Device status for the operations view: when the hub last saw each device of a tenant and the
//! last position (seq) it knows the device has (`synchub.device_status`, migration 0016), and
//! the read of every device's status (with its cursor and latest push) and the tenant's head.
//!
//! The writes come from device sessions (a resume from a position, the session's end) and must
//! never slow or fail a session or a push: [`Store::note_device_seen`] only notes the device in
//! memory and returns at once. Every `device_status_flush_ms` the noted devices of every tenant
//! are written together, a statement per `STATUS_ROWS_PER_STATEMENT` devices, one statement at a
//! time, each counted against the session reads' share of the pool, touching only its own table
//! (never a row a merge locks) and waiting at most `device_status_lock_timeout_ms` for its rows.
//! A device noted twice before the write is written once, with the latest; at most
//! `device_status_writes` devices wait (more are dropped: a status is only ever a little
//! staler), and a failure is logged, never reported to the client. (One transaction per note
//! cost a reconnect storm of 10,000 devices about a tenth of the hub's CPU.)

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::Store;
use crate::error::{Error, Result};
use crate::ids::{DeviceId, Seq, TenantId, UserId, CONSOLE_DEVICE_PREFIX, DASHBOARD_DEVICE_PREFIX};

/// Devices written by one statement at most.
const STATUS_ROWS_PER_STATEMENT: usize = 1_000;

/// A device's status as noted, waiting to be written.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    user: String,
    /// Unix ms.
    at_ms: i64,
    /// `None`: not known; the last one known stays.
    position: Option<Seq>,
}

/// The devices noted since the last write, by tenant and device, at most `max` of them.
#[derive(Debug, Default)]
struct Waiting {
    devices: HashMap<(TenantId, String), Seen>,
    /// Whether a flush is under way or scheduled: it writes what is noted until it finds
    /// nothing left, so a note made meanwhile needs no flush of its own.
    flushing: bool,
}

/// What a note did.
#[derive(Debug, PartialEq, Eq)]
enum Noted {
    /// Kept; a flush has to be started.
    StartFlush,
    /// Kept; the flush under way writes it.
    Kept,
    /// Not kept: `max` devices wait already.
    Dropped,
}

impl Waiting {
    fn note(&mut self, tenant: &TenantId, device: &str, seen: Seen, max: usize) -> Noted {
        let held = self.devices.len();
        match self.devices.entry((tenant.clone(), device.to_owned())) {
            Entry::Occupied(mut earlier) => {
                let position = seen.position.or(earlier.get().position);
                earlier.insert(Seen { position, ..seen });
            }
            Entry::Vacant(slot) if held < max => {
                slot.insert(seen);
            }
            Entry::Vacant(_) => return Noted::Dropped,
        }
        if std::mem::replace(&mut self.flushing, true) {
            Noted::Kept
        } else {
            Noted::StartFlush
        }
    }

    /// Everything noted, in one order (tenant, device) so that two writers (two hubs of a
    /// cluster) lock rows in the same order; when nothing is, the flush ends.
    fn take(&mut self) -> Vec<((TenantId, String), Seen)> {
        let mut devices: Vec<_> = std::mem::take(&mut self.devices).into_iter().collect();
        devices.sort_by(|a, b| a.0.cmp(&b.0));
        if devices.is_empty() {
            self.flushing = false;
        }
        devices
    }
}

/// The bounds of the status writes (config `device_status_writes`, `device_status_flush_ms`,
/// `device_status_lock_timeout_ms`): devices waiting to be written over every tenant, past
/// which a note is dropped (and counted in the log), so a reconnect storm cannot queue unbounded
/// work; how often they are written; and how long a write waits for a status row (another
/// hub's write of the same device holds it).
pub struct StatusWrites {
    waiting: Mutex<Waiting>,
    max: usize,
    flush_every: Duration,
    dropped: AtomicUsize,
    lock_timeout: Duration,
}

impl StatusWrites {
    pub fn new(max: usize, flush_every: Duration, lock_timeout: Duration) -> StatusWrites {
        StatusWrites { waiting: Mutex::new(Waiting::default()), max, flush_every, dropped: AtomicUsize::new(0), lock_timeout }
    }

    fn take(&self) -> Vec<((TenantId, String), Seen)> {
        // unwrap: nothing panics while holding the lock.
        self.waiting.lock().expect("status lock").take()
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
    /// Note that a session of `device` was seen now, with the position it has (`None`:
    /// unknown, e.g. a session that ended before it resumed); written with the other noted
    /// devices by the next flush. Returns at once.
    pub fn note_device_seen(self: &Arc<Self>, tenant: &TenantId, device: &DeviceId, user: &UserId, position: Option<Seq>) {
        // A session that stops while its arbiter shuts down has no runtime left to write with.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let writes = &self.status_writes;
        let at_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let seen = Seen { user: user.to_string(), at_ms, position };
        // unwrap: nothing panics while holding the lock.
        let noted = writes.waiting.lock().expect("status lock").note(tenant, device.as_str(), seen, writes.max);
        match noted {
            Noted::Kept => {}
            Noted::StartFlush => {
                runtime.spawn(self.clone().flush_device_statuses());
            }
            Noted::Dropped => {
                let dropped = writes.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                // Once, then every thousandth: a storm should not flood the log either.
                if dropped % 1000 == 1 {
                    tracing::warn!(dropped, waiting = writes.max, "device statuses dropped (device_status_writes)");
                }
            }
        }
    }

    /// Every `device_status_flush_ms`, write what was noted, until a flush finds nothing.
    async fn flush_device_statuses(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.status_writes.flush_every).await;
            let devices = self.status_writes.take();
            if devices.is_empty() {
                return;
            }
            for rows in devices.chunks(STATUS_ROWS_PER_STATEMENT) {
                match self.within_transaction_deadline(self.write_devices_seen(rows)).await {
                    Ok(()) => {}
                    Err(Error::ShuttingDown) => return,
                    Err(err) => tracing::warn!(%err, devices = rows.len(), "device statuses not written"),
                }
            }
        }
    }

    /// One statement for the devices of every tenant, as the hub's own login (like its
    /// numbering of clock writers): the tenants are the ones the devices' tokens named.
    async fn write_devices_seen(&self, rows: &[((TenantId, String), Seen)]) -> Result<()> {
        let tenants: Vec<&str> = rows.iter().map(|((tenant, _), _)| tenant.as_str()).collect();
        let devices: Vec<&str> = rows.iter().map(|((_, device), _)| device.as_str()).collect();
        let users: Vec<&str> = rows.iter().map(|(_, seen)| seen.user.as_str()).collect();
        let seen_ms: Vec<i64> = rows.iter().map(|(_, seen)| seen.at_ms).collect();
        let positions: Vec<Option<i64>> = rows.iter().map(|(_, seen)| seen.position.map(|p| p as i64)).collect();
        let _read = self.read_permit().await?;
        let lock_timeout = self.status_writes.lock_timeout.as_millis().to_string();
        let mut tx = self.pool.begin().await?;
        sqlx::query("select set_config('lock_timeout', $1, true)").bind(&lock_timeout).execute(&mut *tx).await?;
        // A position not known keeps the last one known.
        sqlx::query(
            "insert into synchub.device_status as s (tenant_id, device_id, user_id, last_seen_at, last_position) \
             select t, d, u, to_timestamp(ms / 1000.0), p from unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[]) as x(t, d, u, ms, p) \
             on conflict (tenant_id, device_id) do update set last_seen_at = excluded.last_seen_at, \
               last_position = coalesce(excluded.last_position, s.last_position), user_id = excluded.user_id",
        )
        .bind(&tenants)
        .bind(&devices)
        .bind(&users)
        .bind(&seen_ms)
        .bind(&positions)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(at_ms: i64, position: Option<Seq>) -> Seen {
        Seen { user: "u".into(), at_ms, position }
    }

    #[test]
    fn a_device_noted_twice_waits_once_with_the_latest_and_the_last_position_known() {
        let (shop, other) = (TenantId::new("shop"), TenantId::new("other"));
        let mut waiting = Waiting::default();
        assert_eq!(waiting.note(&shop, "till", seen(1, Some(4)), 10), Noted::StartFlush);
        assert_eq!(waiting.note(&shop, "till", seen(2, None), 10), Noted::Kept, "the flush started writes it");
        assert_eq!(waiting.note(&other, "till", seen(3, Some(1)), 10), Noted::Kept);
        let taken = waiting.take();
        assert_eq!(
            taken,
            vec![((other.clone(), "till".to_owned()), seen(3, Some(1))), ((shop.clone(), "till".to_owned()), seen(2, Some(4)))],
            "one per device, in (tenant, device) order; a session's end keeps the position its resume gave"
        );
        // A note while the flush writes is written by that flush's next round, which ends the
        // flush only when it finds nothing.
        assert_eq!(waiting.note(&shop, "till", seen(5, None), 10), Noted::Kept);
        assert_eq!(waiting.take().len(), 1);
        assert!(waiting.take().is_empty());
        assert_eq!(waiting.note(&shop, "till", seen(6, None), 10), Noted::StartFlush, "the flush ended: a new one starts");
    }

    #[test]
    fn at_most_max_devices_wait_and_more_are_dropped() {
        let shop = TenantId::new("shop");
        let mut waiting = Waiting::default();
        assert_eq!(waiting.note(&shop, "a", seen(1, None), 2), Noted::StartFlush);
        assert_eq!(waiting.note(&shop, "b", seen(1, None), 2), Noted::Kept);
        assert_eq!(waiting.note(&shop, "c", seen(1, None), 2), Noted::Dropped);
        assert_eq!(waiting.note(&shop, "a", seen(2, None), 2), Noted::Kept, "a device waiting already is updated");
        assert_eq!(waiting.take().len(), 2);
        assert_eq!(waiting.note(&shop, "c", seen(3, None), 2), Noted::Kept, "room again once written");
    }
}
