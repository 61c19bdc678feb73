//! The merge decision: given a row's current state (values, per-field clocks, tombstone) and
//! one incoming change, decide which fields are written, which lose, and which conflicts to
//! record. Pure code: no I/O, no clock reads, so it is unit- and property-tested here.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use protocol::{ChangeStatus, ErrorCode, Hlc, Object, Op};
use serde_json::Value;

use crate::config::MergePolicy;

/// Who last wrote a field, when (HLC), and at which row version (tenant seq).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldClock {
    pub hlc: Hlc,
    /// Writing device; empty for a write by another SQL client.
    pub device: String,
    pub user: Option<String>,
    pub version: u64,
}

impl FieldClock {
    /// Total order of last-write-wins: clock first, device id breaks ties.
    fn lww_key(&self) -> (Hlc, &str) {
        (self.hlc, &self.device)
    }
}

/// What the hub knows of one row before a change is merged into it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RowState {
    /// Current values, `None` when the row does not exist (never did, or deleted).
    pub values: Option<Object>,
    /// Tenant seq of the row's last write; 0 when never written through the log.
    pub version: u64,
    /// Per-field clocks of fields written through the log.
    pub clocks: BTreeMap<String, FieldClock>,
    /// Set when the row is a tombstone: the clock of the delete.
    pub deleted: Option<FieldClock>,
}

/// The incoming change, with its HLC already clamped.
#[derive(Debug, Clone)]
pub struct Incoming<'a> {
    pub op: Op,
    pub fields: &'a Object,
    pub clock: FieldClock,
    /// Row version the device had seen.
    pub base_version: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Winner {
    /// The value already stored stays.
    Server,
    /// The incoming value is written.
    Incoming,
}

impl Winner {
    pub fn as_str(self) -> &'static str {
        match self {
            Winner::Server => "server",
            Winner::Incoming => "incoming",
        }
    }
}

/// One field written concurrently by two devices, to be logged for review.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldConflict {
    /// Column name.
    pub field: String,
    pub server_value: Value,
    pub server_clock: FieldClock,
    pub incoming_value: Value,
    pub winner: Winner,
    /// Decided by the delete-beats-update rule rather than the table's policy.
    pub by_delete: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Write these fields (insert the row when it does not exist).
    Write(Object),
    /// Delete the row (leaving a tombstone).
    Delete,
    /// Nothing to write (every field lost, or a delete of a missing row).
    Nothing,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub status: ChangeStatus,
    pub effect: Effect,
    pub lost_fields: Vec<String>,
    pub conflicts: Vec<FieldConflict>,
    /// Set when the change is refused for good.
    pub rejection: Option<ErrorCode>,
}

impl Decision {
    fn rejected(code: ErrorCode) -> Decision {
        Decision { status: ChangeStatus::Rejected, effect: Effect::Nothing, lost_fields: vec![], conflicts: vec![], rejection: Some(code) }
    }
}

/// Whether a stored write is concurrent with the incoming change: newer than what the
/// device had seen, and made by someone else.
fn is_concurrent(stored: &FieldClock, incoming: &Incoming<'_>) -> bool {
    stored.version > incoming.base_version && stored.device != incoming.clock.device
}

fn incoming_wins(stored: &FieldClock, incoming: &FieldClock, policy: MergePolicy) -> bool {
    match policy {
        MergePolicy::ClientWins => true,
        MergePolicy::Lww => incoming.lww_key().cmp(&stored.lww_key()) == Ordering::Greater,
    }
}

pub fn decide(row: &RowState, change: &Incoming<'_>, policy: MergePolicy) -> Decision {
    match change.op {
        Op::Upsert => decide_upsert(row, change, policy),
        Op::Delete => decide_delete(row, change),
    }
}

fn decide_upsert(row: &RowState, change: &Incoming<'_>, policy: MergePolicy) -> Decision {
    if let Some(tombstone) = &row.deleted {
        if !is_concurrent(tombstone, change) {
            // The device saw the delete (or made it): re-creating needs a new key.
            return Decision::rejected(ErrorCode::RowDeleted);
        }
        // A delete beats a concurrent update, whatever the policy; the update is logged.
        let conflicts = change
            .fields
            .iter()
            .map(|(field, value)| FieldConflict {
                field: field.clone(),
                server_value: Value::Null,
                server_clock: tombstone.clone(),
                incoming_value: value.clone(),
                winner: Winner::Server,
                by_delete: true,
            })
            .collect();
        return Decision {
            status: ChangeStatus::Conflict,
            effect: Effect::Nothing,
            lost_fields: change.fields.keys().cloned().collect(),
            conflicts,
            rejection: None,
        };
    }

    let mut writes = Object::new();
    let mut lost_fields = Vec::new();
    let mut conflicts = Vec::new();
    for (field, value) in change.fields {
        let stored = row.clocks.get(field).filter(|clock| is_concurrent(clock, change));
        let current = row.values.as_ref().and_then(|v| v.get(field)).cloned().unwrap_or(Value::Null);
        match stored {
            // Two devices agreeing on a value is not worth a reviewer's time.
            Some(_) if current == *value => {
                writes.insert(field.clone(), value.clone());
            }
            Some(clock) => {
                let winner = if incoming_wins(clock, &change.clock, policy) { Winner::Incoming } else { Winner::Server };
                conflicts.push(FieldConflict {
                    field: field.clone(),
                    server_value: current,
                    server_clock: clock.clone(),
                    incoming_value: value.clone(),
                    winner,
                    by_delete: false,
                });
                match winner {
                    Winner::Incoming => {
                        writes.insert(field.clone(), value.clone());
                    }
                    Winner::Server => lost_fields.push(field.clone()),
                }
            }
            None => {
                writes.insert(field.clone(), value.clone());
            }
        }
    }
    // The row's version alone cannot tell: it moves with the device's own earlier writes too
    // (a batch that inserts a row and then updates it), and those are simply overwritten.
    let others_wrote_since_seen = row.clocks.values().any(|clock| is_concurrent(clock, change));
    let status = if !conflicts.is_empty() {
        ChangeStatus::Conflict
    } else if row.values.is_some() && others_wrote_since_seen {
        ChangeStatus::Merged
    } else {
        ChangeStatus::Applied
    };
    let effect = if writes.is_empty() && row.values.is_some() { Effect::Nothing } else { Effect::Write(writes) };
    Decision { status, effect, lost_fields, conflicts, rejection: None }
}

fn decide_delete(row: &RowState, change: &Incoming<'_>) -> Decision {
    let Some(values) = &row.values else {
        return Decision { status: ChangeStatus::Applied, effect: Effect::Nothing, lost_fields: vec![], conflicts: vec![], rejection: None };
    };
    // The delete wins over every concurrent field write; each is logged.
    let conflicts: Vec<FieldConflict> = row
        .clocks
        .iter()
        .filter(|(_, clock)| is_concurrent(clock, change))
        .map(|(field, clock)| FieldConflict {
            field: field.clone(),
            server_value: values.get(field).cloned().unwrap_or(Value::Null),
            server_clock: clock.clone(),
            incoming_value: Value::Null,
            winner: Winner::Incoming,
            by_delete: true,
        })
        .collect();
    let status = if conflicts.is_empty() { ChangeStatus::Applied } else { ChangeStatus::Conflict };
    Decision { status, effect: Effect::Delete, lost_fields: vec![], conflicts, rejection: None }
}

/// Apply a decision's effect to the in-memory row state, at the change's new version.
/// `written` is the row image the database returned after the write (for `Write`).
pub fn advance(row: &mut RowState, decision: &Decision, clock: &FieldClock, version: u64, written: Option<Object>) {
    match &decision.effect {
        Effect::Write(fields) => {
            // Written over a tombstone (a conditional write that saw the delete): alive again.
            row.deleted = None;
            for field in fields.keys() {
                row.clocks.insert(field.clone(), FieldClock { version, ..clock.clone() });
            }
            match written {
                Some(written) => row.values = Some(written),
                // In place: the row's other fields stay as they are.
                None => row.values.get_or_insert_with(Object::new).extend(fields.iter().map(|(k, v)| (k.clone(), v.clone()))),
            }
            row.version = version;
        }
        Effect::Delete => {
            row.values = None;
            row.deleted = Some(FieldClock { version, ..clock.clone() });
            row.version = version;
        }
        Effect::Nothing => {}
    }
}

/// Clamp a device clock that runs too far ahead of the hub's: returns the clock to use and
/// whether it was clamped.
pub fn clamp_hlc(hlc: Hlc, now_ms: u64, max_skew_ms: u64) -> (Hlc, bool) {
    if hlc.wall_ms > now_ms.saturating_add(max_skew_ms) {
        (Hlc { wall_ms: now_ms, counter: hlc.counter }, true)
    } else {
        (hlc, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn clock(wall: u64, device: &str, version: u64) -> FieldClock {
        FieldClock { hlc: Hlc { wall_ms: wall, counter: 0 }, device: device.into(), user: Some(format!("user-{device}")), version }
    }

    fn obj(v: Value) -> Object {
        v.as_object().unwrap().clone()
    }

    fn row_with(values: Value, clocks: &[(&str, FieldClock)], version: u64) -> RowState {
        RowState {
            values: Some(obj(values)),
            version,
            clocks: clocks.iter().map(|(f, c)| (f.to_string(), c.clone())).collect(),
            deleted: None,
        }
    }

    #[test]
    fn new_row_is_applied_whole() {
        let fields = obj(json!({"name": "Tea", "price": 300}));
        let change = Incoming { op: Op::Upsert, fields: &fields, clock: clock(10, "a", 0), base_version: 0 };
        let d = decide(&RowState::default(), &change, MergePolicy::Lww);
        assert_eq!(d.status, ChangeStatus::Applied);
        assert_eq!(d.effect, Effect::Write(fields.clone()));
    }

    #[test]
    fn seen_version_is_overwritten_without_conflict() {
        let row = row_with(json!({"price": 300}), &[("price", clock(50, "b", 4))], 4);
        let fields = obj(json!({"price": 350}));
        // Older clock, but the device had seen version 4: its write is causally later.
        let change = Incoming { op: Op::Upsert, fields: &fields, clock: clock(10, "a", 0), base_version: 4 };
        let d = decide(&row, &change, MergePolicy::Lww);
        assert_eq!(d.status, ChangeStatus::Applied);
        assert!(d.conflicts.is_empty());
        assert_eq!(d.effect, Effect::Write(fields.clone()));
    }

    #[test]
    fn concurrent_other_field_is_merged() {
        let row = row_with(json!({"price": 300, "name": "Tea"}), &[("price", clock(50, "b", 4))], 4);
        let fields = obj(json!({"name": "Green tea"}));
        let change = Incoming { op: Op::Upsert, fields: &fields, clock: clock(60, "a", 0), base_version: 2 };
        let d = decide(&row, &change, MergePolicy::Lww);
        assert_eq!(d.status, ChangeStatus::Merged);
        assert!(d.conflicts.is_empty());
    }

    #[test]
    fn lww_conflict_keeps_newer_clock_and_records_both_values() {
        let row = row_with(json!({"price": 300}), &[("price", clock(50, "b", 4))], 4);
        let fields = obj(json!({"price": 320}));
        let older = Incoming { op: Op::Upsert, fields: &fields, clock: clock(40, "a", 0), base_version: 2 };
        let d = decide(&row, &older, MergePolicy::Lww);
        assert_eq!(d.status, ChangeStatus::Conflict);
        assert_eq!(d.lost_fields, vec!["price".to_string()]);
        assert_eq!(d.effect, Effect::Nothing);
        let c = &d.conflicts[0];
        assert_eq!((c.server_value.clone(), c.incoming_value.clone(), c.winner), (json!(300), json!(320), Winner::Server));
        assert_eq!(c.server_clock.device, "b");

        let newer = Incoming { clock: clock(70, "a", 0), ..older.clone() };
        let d = decide(&row, &newer, MergePolicy::Lww);
        assert_eq!(d.status, ChangeStatus::Conflict);
        assert_eq!(d.conflicts[0].winner, Winner::Incoming);
        assert_eq!(d.effect, Effect::Write(fields.clone()));

        // client_wins takes the incoming value even with the older clock, and still logs it.
        let d = decide(&row, &older, MergePolicy::ClientWins);
        assert_eq!(d.conflicts[0].winner, Winner::Incoming);
        assert_eq!(d.effect, Effect::Write(fields));
    }

    #[test]
    fn equal_clocks_tie_break_on_device_id() {
        let row = row_with(json!({"qty": 1}), &[("qty", clock(50, "b", 4))], 4);
        let fields = obj(json!({"qty": 2}));
        let from_a = Incoming { op: Op::Upsert, fields: &fields, clock: clock(50, "a", 0), base_version: 0 };
        let from_c = Incoming { clock: clock(50, "c", 0), ..from_a.clone() };
        assert_eq!(decide(&row, &from_a, MergePolicy::Lww).conflicts[0].winner, Winner::Server);
        assert_eq!(decide(&row, &from_c, MergePolicy::Lww).conflicts[0].winner, Winner::Incoming);
    }

    #[test]
    fn same_device_is_never_in_conflict_with_itself() {
        let row = row_with(json!({"qty": 1}), &[("qty", clock(50, "a", 4))], 4);
        let fields = obj(json!({"qty": 2}));
        let change = Incoming { op: Op::Upsert, fields: &fields, clock: clock(60, "a", 0), base_version: 0 };
        let d = decide(&row, &change, MergePolicy::Lww);
        assert_eq!((d.status, d.conflicts.len()), (ChangeStatus::Applied, 0), "its own earlier write is simply overwritten");
    }

    /// The spec's `client_push_batch`: an order inserted and then updated in one batch, both
    /// changes made before the device had seen the row (base_version 0).
    #[test]
    fn a_device_updating_the_row_it_inserted_is_applied() {
        let mut row = RowState::default();
        let insert = obj(json!({"status": "open", "total_cents": 710}));
        let first = Incoming { op: Op::Upsert, fields: &insert, clock: clock(10, "a", 0), base_version: 0 };
        let d = decide(&row, &first, MergePolicy::Lww);
        assert_eq!(d.status, ChangeStatus::Applied);
        advance(&mut row, &d, &first.clock, 1, None);
        let update = obj(json!({"status": "paid", "paid_at": "09:14"}));
        let second = Incoming { op: Op::Upsert, fields: &update, clock: clock(20, "a", 0), base_version: 0 };
        assert_eq!(decide(&row, &second, MergePolicy::Lww).status, ChangeStatus::Applied);

        // Another writer's field, newer than what the device had seen, still makes it merged.
        row.clocks.insert("note".into(), clock(5, "b", 2));
        row.version = 2;
        assert_eq!(decide(&row, &second, MergePolicy::Lww).status, ChangeStatus::Merged);
        // ... and a plain SQL write too (no device).
        row.clocks.insert("note".into(), clock(5, "", 2));
        assert_eq!(decide(&row, &second, MergePolicy::Lww).status, ChangeStatus::Merged);
    }

    #[test]
    fn delete_beats_concurrent_update_both_ways() {
        // Update arrives after a concurrent delete.
        let mut tomb = RowState { deleted: Some(clock(10, "b", 5)), version: 5, ..RowState::default() };
        let fields = obj(json!({"qty": 9}));
        let update = Incoming { op: Op::Upsert, fields: &fields, clock: clock(99, "a", 0), base_version: 3 };
        let d = decide(&tomb, &update, MergePolicy::ClientWins);
        assert_eq!((d.status, d.effect.clone()), (ChangeStatus::Conflict, Effect::Nothing));
        assert_eq!(d.conflicts[0].winner, Winner::Server);
        // An update from a device that saw the delete is refused.
        tomb.deleted = Some(clock(10, "b", 5));
        let seen = Incoming { base_version: 5, ..update.clone() };
        assert_eq!(decide(&tomb, &seen, MergePolicy::Lww).rejection, Some(ErrorCode::RowDeleted));

        // Delete arrives after a concurrent update.
        let row = row_with(json!({"qty": 4}), &[("qty", clock(99, "b", 6))], 6);
        let empty = Object::new();
        let delete = Incoming { op: Op::Delete, fields: &empty, clock: clock(1, "a", 0), base_version: 3 };
        let d = decide(&row, &delete, MergePolicy::Lww);
        assert_eq!((d.status, d.effect.clone()), (ChangeStatus::Conflict, Effect::Delete));
        assert_eq!((d.conflicts[0].field.as_str(), d.conflicts[0].winner), ("qty", Winner::Incoming));
    }

    #[test]
    fn future_clocks_are_clamped() {
        let (hlc, clamped) = clamp_hlc(Hlc { wall_ms: 10_000_000, counter: 2 }, 1_000, 300_000);
        assert!(clamped);
        assert_eq!(hlc, Hlc { wall_ms: 1_000, counter: 2 });
        assert_eq!(clamp_hlc(Hlc { wall_ms: 2_000, counter: 0 }, 1_000, 300_000).1, false);
    }

    /// Apply a sequence of changes to a row the way storage does, returning the final values.
    fn run(changes: &[(Op, Object, FieldClock, u64)], policy: MergePolicy) -> (Option<Object>, bool) {
        let mut row = RowState::default();
        let mut next_version = 1;
        for (op, fields, clock, base) in changes {
            let change = Incoming { op: *op, fields, clock: clock.clone(), base_version: *base };
            let d = decide(&row, &change, policy);
            if d.effect != Effect::Nothing {
                advance(&mut row, &d, clock, next_version, None);
                next_version += 1;
            }
        }
        (row.values, row.deleted.is_some())
    }

    fn arb_fields() -> impl Strategy<Value = Object> {
        prop::collection::btree_map(prop::sample::select(vec!["a", "b", "c"]), 0i64..5, 1..3)
            .prop_map(|m| m.into_iter().map(|(k, v)| (k.to_string(), json!(v))).collect())
    }

    fn arb_own_change() -> impl Strategy<Value = (Op, Object, u64, u64)> {
        // Mostly upserts; a base version from 0 up to past the versions written so far.
        (prop::bool::weighted(0.1), arb_fields(), 0u64..20, 0u64..12).prop_map(|(delete, fields, wall, base)| {
            if delete {
                (Op::Delete, Object::new(), wall, base)
            } else {
                (Op::Upsert, fields, wall, base)
            }
        })
    }

    proptest! {
        /// A device's own earlier writes never make its change merged or conflict, whatever
        /// their order, clocks and base versions, and whatever other writers did before the
        /// version the device had seen.
        #[test]
        fn own_earlier_writes_never_merge_or_conflict(
            seen in prop::collection::vec((arb_fields(), prop::sample::select(vec!["b", ""])), 0..3),
            own in prop::collection::vec(arb_own_change(), 1..12),
            policy in prop::sample::select(vec![MergePolicy::Lww, MergePolicy::ClientWins]),
        ) {
            let mut row = RowState::default();
            let mut version = 0;
            for (fields, writer) in &seen {
                let change = Incoming { op: Op::Upsert, fields, clock: clock(100, writer, 0), base_version: version };
                let d = decide(&row, &change, policy);
                version += 1;
                advance(&mut row, &d, &change.clock, version, None);
            }
            let seen_version = version;
            for (op, fields, wall, base) in own {
                let change = Incoming { op, fields: &fields, clock: clock(wall, "a", 0), base_version: seen_version.max(base.min(version)) };
                let d = decide(&row, &change, policy);
                prop_assert!(d.conflicts.is_empty(), "{:?}", d);
                prop_assert!(matches!(d.status, ChangeStatus::Applied | ChangeStatus::Rejected), "{:?}", d);
                if d.effect != Effect::Nothing {
                    version += 1;
                    advance(&mut row, &d, &change.clock, version, None);
                }
            }
        }

        /// Two devices that edited the same row offline (both from the same base) converge to
        /// the same row whichever of their changes reaches the hub first.
        #[test]
        fn two_offline_devices_converge_in_either_order(
            fa in arb_fields(), fb in arb_fields(),
            wa in 0u64..4, wb in 0u64..4,
            delete_a in any::<bool>(),
        ) {
            let base = obj(json!({"a": 0, "b": 0, "c": 0}));
            let seed = (Op::Upsert, base, clock(0, "seed", 0), 0);
            let op_a = if delete_a { Op::Delete } else { Op::Upsert };
            let ca = (op_a, if delete_a { Object::new() } else { fa }, clock(wa, "a", 0), 1);
            let cb = (Op::Upsert, fb, clock(wb, "b", 0), 1);
            let ab = run(&[seed.clone(), ca.clone(), cb.clone()], MergePolicy::Lww);
            let ba = run(&[seed, cb, ca], MergePolicy::Lww);
            prop_assert_eq!(ab, ba);
        }

        /// Whatever the order, every conflict decision names exactly one winner, and a lost
        /// field is never written.
        #[test]
        fn lost_fields_are_not_written(fa in arb_fields(), wa in 0u64..4, wb in 0u64..4) {
            let row = row_with(json!({"a": 1, "b": 1, "c": 1}),
                &[("a", clock(wb, "b", 3)), ("b", clock(wb, "b", 3)), ("c", clock(wb, "b", 3))], 3);
            let change = Incoming { op: Op::Upsert, fields: &fa, clock: clock(wa, "a", 0), base_version: 1 };
            let d = decide(&row, &change, MergePolicy::Lww);
            if let Effect::Write(w) = &d.effect {
                for lost in &d.lost_fields { prop_assert!(!w.contains_key(lost)); }
            }
            for c in &d.conflicts {
                prop_assert_eq!(c.winner == Winner::Server, d.lost_fields.contains(&c.field));
            }
        }
    }
}
