//! The numbers that stand for clock writers (a device and its user) in row versions' field
//! clocks (`synchub.clock_writers`, migration 0020), as far as this hub has seen them.
//!
//! A number is committed before any row names it and never changes meaning, so a hub may keep
//! every number it has seen, whichever node gave it. A group first numbers the pushing writers
//! this hub has no number for (one statement of its own, once per writer and hub), and writes
//! any other writer without a number here (another SQL client, a device not in the group) by
//! name. A row naming a number this hub has not seen (another node gave it, or a restart forgot
//! it) has it looked up in the group's transaction.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;
use sqlx::PgConnection;

use super::clocks::{NamedWriter, WriterNumber};
use crate::ids::TenantId;
use crate::sync::merge::FieldClock;

/// Numbered writers this hub knows, both ways, bounded (config `clock_writer_cache_entries`).
pub struct ClockWriters {
    /// Tenant → device → (user, number), for writing clocks.
    numbers: DashMap<TenantId, HashMap<String, Vec<(String, WriterNumber)>>>,
    /// Number → writer, for reading them.
    writers: DashMap<WriterNumber, NamedWriter>,
    /// Entries in `writers` (as many as in `numbers`).
    held: AtomicUsize,
    /// Most entries held; past it the hub forgets them all and learns them again.
    limit: usize,
}

impl ClockWriters {
    pub fn new(limit: usize) -> ClockWriters {
        ClockWriters { numbers: DashMap::new(), writers: DashMap::new(), held: AtomicUsize::new(0), limit }
    }

    /// The number of `clock`'s writer in `tenant`, if this hub knows it.
    pub fn number(&self, tenant: &TenantId, clock: &FieldClock) -> Option<WriterNumber> {
        self.number_of(tenant, &clock.device, clock.user.as_deref()?)
    }

    /// The number of `device` as `user` in `tenant`, if this hub knows it.
    fn number_of(&self, tenant: &TenantId, device: &str, user: &str) -> Option<WriterNumber> {
        let devices = self.numbers.get(tenant)?;
        devices.get(device)?.iter().find(|(u, _)| u == user).map(|&(_, number)| number)
    }

    /// Who `number` stands for, if this hub knows it.
    pub fn writer(&self, number: WriterNumber) -> Option<NamedWriter> {
        self.writers.get(&number).map(|named| named.clone())
    }

    fn remember(&self, tenant: &TenantId, number: WriterNumber, device: String, user: String) {
        if self.writers.contains_key(&number) {
            return;
        }
        if self.held.fetch_add(1, Ordering::Relaxed) >= self.limit {
            // Rare (more writers than the limit): start over rather than track an order. A
            // number forgotten is looked up again when a row names it.
            self.numbers.clear();
            self.writers.clear();
            self.held.store(1, Ordering::Relaxed);
        }
        self.writers.insert(number, (device.clone(), Some(user.clone())));
        self.numbers.entry(tenant.clone()).or_default().entry(device).or_default().push((user, number));
    }

    /// Number the `writers` (device, user) of `tenant` that have none here: those that have
    /// one in Postgres are learnt, the others given one. Committed at once (no transaction must
    /// be open on `conn`), so that rows may name the numbers from now on. A writer another
    /// transaction numbers at the same time is left for the next call. No statement when every
    /// writer has a number here.
    pub async fn number_all<'a>(
        &self,
        conn: &mut PgConnection,
        tenant: &TenantId,
        writers: impl Iterator<Item = (&'a str, &'a str)>,
    ) -> sqlx::Result<()> {
        let mut devices: Vec<&str> = Vec::new();
        let mut users: Vec<&str> = Vec::new();
        for (device, user) in writers {
            let known = self.number_of(tenant, device, user).is_some();
            let listed = devices.iter().zip(&users).any(|(d, u)| *d == device && *u == user);
            if !known && !listed {
                devices.push(device);
                users.push(user);
            }
        }
        if devices.is_empty() {
            return Ok(());
        }
        // The select sees the table as it was before the insert: it finds the writers numbered
        // before, the insert returns those it numbers.
        let numbered: Vec<(i32, String, String)> = sqlx::query_as(
            "with wanted (device, user_id) as (select * from unnest($2::text[], $3::text[])), \
                  given as (insert into synchub.clock_writers (tenant_id, device, user_id) \
                            select $1, device, user_id from wanted on conflict do nothing \
                            returning writer_id, device, user_id) \
             select writer_id, device, user_id from given \
             union all \
             select w.writer_id, w.device, w.user_id from synchub.clock_writers w \
               join wanted x on w.tenant_id = $1 and w.device = x.device and w.user_id = x.user_id",
        )
        .bind(tenant.as_str())
        .bind(&devices)
        .bind(&users)
        .fetch_all(&mut *conn)
        .await?;
        self.remember_rows(tenant, numbered);
        Ok(())
    }

    /// Learn who `numbers` (named by `tenant`'s rows) stand for; numbers not in Postgres (only
    /// SQL written by hand could remove them) stay unknown.
    pub async fn learn(&self, conn: &mut PgConnection, tenant: &TenantId, numbers: &[WriterNumber]) -> sqlx::Result<()> {
        let wanted: Vec<i32> = numbers.iter().map(|&n| n as i32).collect();
        let found: Vec<(i32, String, String)> =
            sqlx::query_as("select writer_id, device, user_id from synchub.clock_writers where tenant_id = $1 and writer_id = any($2)")
                .bind(tenant.as_str())
                .bind(&wanted)
                .fetch_all(&mut *conn)
                .await?;
        self.remember_rows(tenant, found);
        Ok(())
    }

    /// `synchub.clock_writers` rows as read: `(writer_id, device, user_id)`.
    fn remember_rows(&self, tenant: &TenantId, rows: Vec<(i32, String, String)>) {
        for (number, device, user) in rows {
            self.remember(tenant, number as WriterNumber, device, user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::Hlc;

    fn clock(device: &str, user: Option<&str>) -> FieldClock {
        FieldClock { hlc: Hlc { wall_ms: 1, counter: 0 }, device: device.into(), user: user.map(Into::into), version: 1 }
    }

    #[test]
    fn a_number_is_known_both_ways_and_only_in_its_tenant() {
        let writers = ClockWriters::new(10);
        let t1 = TenantId::new("t1");
        writers.remember(&t1, 7, "pos-1".into(), "u1".into());
        assert_eq!(writers.number(&t1, &clock("pos-1", Some("u1"))), Some(7));
        assert_eq!(writers.number(&t1, &clock("pos-1", Some("u2"))), None, "another user of the device");
        assert_eq!(writers.number(&t1, &clock("pos-1", None)), None, "a clock without a user is never numbered");
        assert_eq!(writers.number(&TenantId::new("t2"), &clock("pos-1", Some("u1"))), None);
        assert_eq!(writers.writer(7), Some(("pos-1".into(), Some("u1".into()))));
        assert_eq!(writers.writer(8), None);
    }

    #[test]
    fn past_the_limit_it_starts_over() {
        let writers = ClockWriters::new(2);
        let t = TenantId::new("t");
        writers.remember(&t, 1, "a".into(), "u".into());
        writers.remember(&t, 2, "b".into(), "u".into());
        writers.remember(&t, 2, "b".into(), "u".into());
        assert_eq!(writers.held.load(Ordering::Relaxed), 2, "a number remembered twice is held once");
        writers.remember(&t, 3, "c".into(), "u".into());
        assert_eq!(writers.held.load(Ordering::Relaxed), 1);
        assert_eq!(writers.writer(1), None);
        assert_eq!(writers.number(&t, &clock("c", Some("u"))), Some(3));
    }
}
