//! Conditional writes, RxDB's `masterWrite` rule: a change that carries a [`WriteCondition`] is
//! written only when the stored document is the one its writer assumed, and then as a change
//! that has seen the stored row; otherwise it is a conflict that writes nothing and logs the
//! fields it would have changed. Pure code, like `merge`, whose decision it returns.

use std::sync::Arc;

use protocol::{ChangeStatus, ErrorCode, Hlc, Object, Op};
use serde_json::Value;

use super::merge::{self, Decision, Effect, FieldClock, FieldConflict, Incoming, RowState, Winner};
use crate::config::MergePolicy;
use crate::storage::as_written::same_value;

/// RxDB's masterWrite rule: write only if the stored document is the one the client assumed.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteCondition {
    /// The document the client assumed (its fields without `_deleted`), `None` when it assumed
    /// no document.
    pub assumed: Option<Object>,
    pub assumed_deleted: bool,
    /// Columns compared (the collection's exposed fields, without the tenant column).
    pub compared: Arc<[String]>,
    /// Merge instead of refusing (RxDB's `server_merge` collections): a field whose stored value
    /// is the one assumed was seen by the writer and is simply written; the others were written
    /// concurrently and are merged by the table's policy, with their conflicts logged.
    pub merge: bool,
    /// Refuse with this code instead of logging a conflict when the stored row is not the one
    /// assumed (a reviewer's resolution based on a value that has changed since).
    pub refuse: Option<ErrorCode>,
}

/// Whether a conditional change may be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Conflict,
}

/// A column's `format_type` (`None` for a column the table lacks: compared as plain JSON).
pub type ColumnType<'f, 't> = &'f dyn Fn(&str) -> Option<&'t str>;

/// Whether the stored row is the one `condition` assumed: no row and no tombstone passes (an
/// insert); a row or a tombstone with nothing assumed is a conflict; a tombstone passes a change
/// that assumed it deleted (a delete writes nothing, an upsert brings the document back, as
/// RxDB's own server does);
/// a live row passes when the writer assumed it live and every compared column holds the value
/// assumed (a column missing on either side reads as null).
pub fn verdict(condition: &WriteCondition, row: &RowState, column_type: ColumnType<'_, '_>) -> Verdict {
    let pass = match (&row.values, &row.deleted, &condition.assumed) {
        (None, None, _) => true,
        (_, _, None) => false,
        (Some(values), _, Some(assumed)) => !condition.assumed_deleted && compared_equal(condition, values, assumed, column_type),
        (None, Some(_), Some(_)) => condition.assumed_deleted,
    };
    if pass {
        Verdict::Pass
    } else {
        Verdict::Conflict
    }
}

fn compared_equal(condition: &WriteCondition, stored: &Object, assumed: &Object, column_type: ColumnType<'_, '_>) -> bool {
    condition.compared.iter().all(|column| same_value(column_type(column).unwrap_or(""), value_of(stored, column), value_of(assumed, column)))
}

fn value_of<'v>(row: &'v Object, column: &str) -> &'v Value {
    row.get(column).unwrap_or(&Value::Null)
}

/// The merge decision for a change under `condition`. Passed, it is decided as a change that
/// has seen the row (base version = the row's), writing only the fields whose values differ from
/// the row's: nothing at all when none does (applied, without a seq). Refused, it is a conflict
/// that writes nothing, with one field conflict (the server winning) per field whose value
/// differs from the stored one.
pub fn decide(condition: &WriteCondition, row: &RowState, change: &Incoming<'_>, policy: MergePolicy, column_type: ColumnType<'_, '_>) -> Decision {
    if condition.merge {
        return merged(condition, row, change, policy, column_type);
    }
    match verdict(condition, row, column_type) {
        Verdict::Conflict if condition.refuse.is_some() => {
            Decision { status: ChangeStatus::Rejected, effect: Effect::Nothing, lost_fields: vec![], conflicts: vec![], rejection: condition.refuse }
        }
        Verdict::Pass if is_revival(row, change.op) => revival(change),
        Verdict::Pass => {
            let fields = changed_fields(change.fields, row.values.as_ref(), column_type);
            let seen = Incoming { fields: &fields, base_version: row.version, ..change.clone() };
            merge::decide(row, &seen, policy)
        }
        Verdict::Conflict => conflict(condition, row, change, column_type),
    }
}

/// A change merged by the table's policy, each field as seen or not by its writer: the fields
/// whose stored values are the ones assumed are decided as a change that saw the row, the others
/// as one that saw none of it. A delete, or a write on no live row, is one decision: seen when
/// the condition holds.
fn merged(condition: &WriteCondition, row: &RowState, change: &Incoming<'_>, policy: MergePolicy, column_type: ColumnType<'_, '_>) -> Decision {
    let (Some(stored), Op::Upsert) = (&row.values, change.op) else {
        let pass = verdict(condition, row, column_type) == Verdict::Pass;
        if pass && is_revival(row, change.op) {
            return revival(change);
        }
        let base_version = if pass { row.version } else { 0 };
        return merge::decide(row, &Incoming { base_version, ..change.clone() }, policy);
    };
    let fields = changed_fields(change.fields, Some(stored), column_type);
    let was_seen = |column: &String| {
        condition.assumed.as_ref().is_some_and(|a| same_value(column_type(column).unwrap_or(""), value_of(stored, column), value_of(a, column)))
    };
    let (seen, unseen): (Object, Object) = fields.into_iter().partition(|(column, _)| was_seen(column));
    let seen_decision = merge::decide(row, &Incoming { fields: &seen, base_version: row.version, ..change.clone() }, policy);
    if unseen.is_empty() {
        return seen_decision;
    }
    let unseen_decision = merge::decide(row, &Incoming { fields: &unseen, base_version: 0, ..change.clone() }, policy);
    if seen.is_empty() {
        return unseen_decision;
    }
    combine(seen_decision, unseen_decision)
}

/// An upsert on a tombstone its writer saw.
fn is_revival(row: &RowState, op: Op) -> bool {
    op == Op::Upsert && row.values.is_none() && row.deleted.is_some()
}

/// The document written anew over its tombstone: every field it names (the merge alone would
/// refuse it, since a native device must re-create a deleted row under a new key).
fn revival(change: &Incoming<'_>) -> Decision {
    Decision { status: ChangeStatus::Applied, effect: Effect::Write(change.fields.clone()), lost_fields: Vec::new(), conflicts: Vec::new(), rejection: None }
}

/// Two decisions on disjoint fields of one row as one.
fn combine(a: Decision, b: Decision) -> Decision {
    let rank = |s: ChangeStatus| match s {
        ChangeStatus::Conflict => 3,
        ChangeStatus::Merged => 2,
        ChangeStatus::Rejected => 4,
        _ => 1,
    };
    let status = if rank(a.status) >= rank(b.status) { a.status } else { b.status };
    let effect = match (a.effect, b.effect) {
        (Effect::Write(mut x), Effect::Write(y)) => {
            x.extend(y);
            Effect::Write(x)
        }
        (Effect::Write(x), _) | (_, Effect::Write(x)) => Effect::Write(x),
        (x, _) => x,
    };
    Decision {
        status,
        effect,
        lost_fields: a.lost_fields.into_iter().chain(b.lost_fields).collect(),
        conflicts: a.conflicts.into_iter().chain(b.conflicts).collect(),
        rejection: a.rejection.or(b.rejection),
    }
}

/// The fields of `fields` whose values are not the same values as the stored row's (all of them
/// for a row that does not exist: an insert writes every field it names, nulls too).
pub fn changed_fields(fields: &Object, stored: Option<&Object>, column_type: ColumnType<'_, '_>) -> Object {
    let Some(stored) = stored else { return fields.clone() };
    fields
        .iter()
        .filter(|(column, value)| !same_value(column_type(column).unwrap_or(""), value_of(stored, column), value))
        .map(|(column, value)| (column.clone(), value.clone()))
        .collect()
}

/// The refused change: nothing written, the stored row kept, its differing fields logged.
fn conflict(condition: &WriteCondition, row: &RowState, change: &Incoming<'_>, column_type: ColumnType<'_, '_>) -> Decision {
    let conflicts = field_conflicts(condition, row, change, column_type);
    let lost_fields = if change.op == Op::Upsert { conflicts.iter().map(|c| c.field.clone()).collect() } else { Vec::new() };
    Decision { status: ChangeStatus::Conflict, effect: Effect::Nothing, lost_fields, conflicts, rejection: None }
}

/// One conflict per field the refused change would have changed: for an upsert on a tombstone
/// every field it writes (the delete won); for an upsert on a live row the fields whose values
/// differ from the stored ones; for a delete of a live row the compared columns whose stored
/// values are not the ones its writer assumed (the edits it had not seen). A delete of a
/// tombstone changes nothing.
fn field_conflicts(condition: &WriteCondition, row: &RowState, change: &Incoming<'_>, column_type: ColumnType<'_, '_>) -> Vec<FieldConflict> {
    let server = |field: &str, server_value: Value, incoming_value: Value| FieldConflict {
        field: field.to_owned(),
        server_value,
        server_clock: row.deleted.clone().unwrap_or_else(|| field_clock(row, field)),
        incoming_value,
        winner: Winner::Server,
        by_delete: row.values.is_none(),
    };
    match (&row.values, change.op) {
        (None, Op::Upsert) if row.deleted.is_some() => change.fields.iter().map(|(f, v)| server(f, Value::Null, v.clone())).collect(),
        (None, _) => Vec::new(),
        (Some(stored), Op::Upsert) => {
            changed_fields(change.fields, Some(stored), column_type).into_iter().map(|(f, v)| server(&f, value_of(stored, &f).clone(), v)).collect()
        }
        (Some(stored), Op::Delete) => {
            let assumed = condition.assumed.clone().unwrap_or_default();
            condition
                .compared
                .iter()
                .filter(|c| !same_value(column_type(c).unwrap_or(""), value_of(stored, c), value_of(&assumed, c)))
                .map(|c| server(c, value_of(stored, c).clone(), Value::Null))
                .collect()
        }
    }
}

/// Who last wrote `field`: its clock, or for a field never written through the hub's log the
/// row's version with an unknown writer.
fn field_clock(row: &RowState, field: &str) -> FieldClock {
    row.clocks.get(field).cloned().unwrap_or(FieldClock { hlc: Hlc { wall_ms: 0, counter: 0 }, device: String::new(), user: None, version: row.version })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const COLUMNS: [&str; 4] = ["id", "name", "at", "price"];

    fn types(column: &str) -> Option<&'static str> {
        match column {
            "id" => Some("uuid"),
            "name" => Some("text"),
            "at" => Some("timestamp with time zone"),
            "price" => Some("numeric(10,2)"),
            _ => None,
        }
    }

    fn obj(v: Value) -> Object {
        v.as_object().unwrap().clone()
    }

    fn clock(wall: u64, device: &str, version: u64) -> FieldClock {
        FieldClock { hlc: Hlc { wall_ms: wall, counter: 0 }, device: device.into(), user: None, version }
    }

    fn stored() -> RowState {
        let values = obj(json!({"id": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "name": "Tea", "at": "2026-01-01T10:00:00+00:00", "price": 2.5, "tenant_id": "t"}));
        let clocks = ["name", "at", "price"].iter().map(|f| (f.to_string(), clock(100, "other", 7))).collect();
        RowState { values: Some(values), version: 7, clocks, deleted: None }
    }

    fn tombstone() -> RowState {
        RowState { values: None, version: 9, clocks: Default::default(), deleted: Some(clock(200, "other", 9)) }
    }

    fn condition(assumed: Option<Value>, deleted: bool) -> WriteCondition {
        WriteCondition { assumed: assumed.map(obj), assumed_deleted: deleted, compared: COLUMNS.iter().map(|c| c.to_string()).collect(), merge: false, refuse: None }
    }

    /// The document a client saw of `row`: its compared columns, values as it was handed them.
    fn as_seen(row: &RowState) -> Value {
        let values = row.values.as_ref().unwrap();
        let mut doc: Object = COLUMNS.iter().filter_map(|c| Some((c.to_string(), values.get(*c)?.clone()))).collect();
        doc.insert("at".into(), json!("2026-01-01T10:00:00.000Z"));
        doc.insert("price".into(), json!("2.50"));
        Value::Object(doc)
    }

    fn upsert(fields: &Object) -> Incoming<'_> {
        Incoming { op: Op::Upsert, fields, clock: clock(300, "rx-1", 0), base_version: 0 }
    }

    fn decide_with(condition: &WriteCondition, row: &RowState, change: &Incoming<'_>) -> Decision {
        decide(condition, row, change, MergePolicy::Lww, &types)
    }

    #[test]
    fn merged_by_the_hub_a_seen_field_is_written_and_an_unseen_one_merged() {
        let row = stored();
        // The client saw the row but an older name: its price edit was made on what is stored,
        // its name edit on a value another device has changed since.
        let mut seen = as_seen(&row);
        seen["name"] = json!("Old tea");
        let merge = WriteCondition { merge: true, ..condition(Some(seen), false) };
        let fields = obj(json!({"name": "Mint tea", "price": 3}));
        let d = decide_with(&merge, &row, &upsert(&fields));
        assert_eq!(d.status, ChangeStatus::Conflict, "the name was written concurrently");
        assert_eq!(d.effect, Effect::Write(obj(json!({"name": "Mint tea", "price": 3}))), "the later clock wins the name");
        assert_eq!(d.conflicts.iter().map(|c| (c.field.as_str(), c.winner)).collect::<Vec<_>>(), [("name", Winner::Incoming)]);
        // Everything seen as stored: no conflict at all.
        let merge = WriteCondition { merge: true, ..condition(Some(as_seen(&row)), false) };
        let d = decide_with(&merge, &row, &upsert(&fields));
        assert_eq!((d.status, d.conflicts.len()), (ChangeStatus::Applied, 0));
    }

    #[test]
    fn no_row_passes_whatever_was_assumed() {
        let fields = obj(json!({"name": "Tea", "price": null}));
        for assumed in [None, Some(json!({"name": "Old"}))] {
            let d = decide_with(&condition(assumed, false), &RowState::default(), &upsert(&fields));
            assert_eq!((d.status, d.effect), (ChangeStatus::Applied, Effect::Write(fields.clone())), "an insert writes nulls too");
        }
    }

    #[test]
    fn a_row_assumed_as_stored_takes_only_the_changed_fields() {
        let row = stored();
        let fields = obj(json!({"id": "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "name": "Green tea", "at": "2026-01-01T10:00:00Z", "price": 2.5}));
        let d = decide_with(&condition(Some(as_seen(&row)), false), &row, &upsert(&fields));
        assert_eq!(d.status, ChangeStatus::Applied, "it has seen the row: no conflict with the other device's writes");
        assert_eq!(d.effect, Effect::Write(obj(json!({"name": "Green tea"}))));
        assert!(d.conflicts.is_empty());
        // The same document again: nothing to write.
        let same = obj(json!({"name": "Tea", "price": "2.5"}));
        let d = decide_with(&condition(Some(as_seen(&row)), false), &row, &upsert(&same));
        assert_eq!((d.status, d.effect), (ChangeStatus::Applied, Effect::Nothing));
    }

    #[test]
    fn a_row_assumed_otherwise_is_a_conflict_naming_the_differing_fields() {
        let row = stored();
        let mut seen = as_seen(&row);
        seen["price"] = json!(3);
        let fields = obj(json!({"name": "Tea", "price": 4}));
        let d = decide_with(&condition(Some(seen), false), &row, &upsert(&fields));
        assert_eq!((d.status, d.effect.clone()), (ChangeStatus::Conflict, Effect::Nothing));
        assert_eq!(d.lost_fields, vec!["price".to_string()]);
        let c = &d.conflicts[..];
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].field.as_str(), &c[0].server_value, &c[0].incoming_value), ("price", &json!(2.5), &json!(4)));
        assert_eq!((c[0].winner, c[0].by_delete, c[0].server_clock.device.as_str()), (Winner::Server, false, "other"));
        // Assumed nothing, or assumed it deleted: a conflict as well.
        for cond in [condition(None, false), condition(Some(as_seen(&row)), true)] {
            assert_eq!(decide_with(&cond, &row, &upsert(&fields)).status, ChangeStatus::Conflict);
        }
    }

    #[test]
    fn a_retried_write_after_its_success_is_a_conflict_without_field_conflicts() {
        let mut row = stored();
        let fields = obj(json!({"name": "Green tea"}));
        let cond = condition(Some(as_seen(&row)), false);
        let first = decide_with(&cond, &row, &upsert(&fields));
        merge::advance(&mut row, &first, &upsert(&fields).clock, 8, None);
        let again = decide_with(&cond, &row, &upsert(&fields));
        assert_eq!((again.status, &again.effect), (ChangeStatus::Conflict, &Effect::Nothing));
        assert!(again.conflicts.is_empty() && again.lost_fields.is_empty(), "{again:?}");
    }

    #[test]
    fn tombstones() {
        let tomb = tombstone();
        let fields = obj(json!({"name": "Tea"}));
        let delete = Incoming { op: Op::Delete, fields: &Object::new(), clock: clock(300, "rx-1", 0), base_version: 0 };
        // A delete that assumed it deleted writes nothing; one that did not is a conflict
        // with nothing to log.
        let d = decide_with(&condition(Some(json!({"name": "Tea"})), true), &tomb, &delete);
        assert_eq!((d.status, d.effect), (ChangeStatus::Applied, Effect::Nothing));
        for cond in [condition(None, false), condition(Some(json!({"name": "Tea"})), false)] {
            let d = decide_with(&cond, &tomb, &delete);
            assert_eq!((d.status, d.effect, d.conflicts.len()), (ChangeStatus::Conflict, Effect::Nothing, 0));
        }
        // An upsert that saw the tombstone brings the document back, with every field it names.
        let d = decide_with(&condition(Some(json!({"name": "Tea"})), true), &tomb, &upsert(&fields));
        assert_eq!((d.status, d.effect.clone(), d.conflicts.len()), (ChangeStatus::Applied, Effect::Write(fields.clone()), 0));
        // One that did not is a conflict, the delete winning every field.
        for cond in [condition(None, false), condition(Some(json!({"name": "Tea"})), false)] {
            let d = decide_with(&cond, &tomb, &upsert(&fields));
            assert_eq!((d.status, d.effect.clone()), (ChangeStatus::Conflict, Effect::Nothing));
            assert_eq!(d.conflicts.len(), 1);
            assert!(d.conflicts[0].by_delete && d.conflicts[0].winner == Winner::Server && d.conflicts[0].server_clock.version == 9);
        }
    }

    #[test]
    fn deletes_of_live_rows() {
        let row = stored();
        let delete = Incoming { op: Op::Delete, fields: &Object::new(), clock: clock(300, "rx-1", 0), base_version: 0 };
        let d = decide_with(&condition(Some(as_seen(&row)), false), &row, &delete);
        assert_eq!((d.status, d.effect, d.conflicts.len()), (ChangeStatus::Applied, Effect::Delete, 0));
        let mut seen = as_seen(&row);
        seen["name"] = json!("Old");
        let d = decide_with(&condition(Some(seen), false), &row, &delete);
        assert_eq!((d.status, d.effect.clone()), (ChangeStatus::Conflict, Effect::Nothing));
        let logged: Vec<_> = d.conflicts.iter().map(|c| (c.field.as_str(), c.server_value.clone(), c.incoming_value.clone())).collect();
        assert_eq!(logged, vec![("name", json!("Tea"), Value::Null)]);
    }

    fn arb_value() -> impl Strategy<Value = Value> {
        prop_oneof![Just(Value::Null), (0i64..4).prop_map(|n| json!(n)), "[ab]{1,2}".prop_map(Value::String)]
    }

    fn arb_row() -> impl Strategy<Value = Object> {
        prop::collection::btree_map(prop::sample::select(vec!["a", "b", "c", "d"]), arb_value(), 0..4)
            .prop_map(|m| m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    }

    fn loose(_: &str) -> Option<&'static str> {
        Some("jsonb")
    }

    proptest! {
        /// A condition built from the stored row passes and writes exactly the fields that
        /// differ from it; any compared column that differs makes a conflict, which logs exactly
        /// the incoming fields that differ from the stored row.
        #[test]
        fn the_stored_row_passes_and_any_difference_conflicts(
            values in arb_row(), fields in arb_row(), column in prop::sample::select(vec!["a", "b", "c", "d"]), other in arb_value(),
        ) {
            let compared: Arc<[String]> = ["a", "b", "c", "d"].iter().map(|c| c.to_string()).collect();
            let row = RowState { values: Some(values.clone()), version: 5, clocks: Default::default(), deleted: None };
            let change = upsert(&fields);
            let same = WriteCondition { assumed: Some(values.clone()), assumed_deleted: false, compared: compared.clone(), merge: false, refuse: None };
            prop_assert_eq!(verdict(&same, &row, &loose), Verdict::Pass);
            let d = decide(&same, &row, &change, MergePolicy::Lww, &loose);
            prop_assert_eq!(d.status, ChangeStatus::Applied);
            let changed = changed_fields(&fields, Some(&values), &loose);
            prop_assert_eq!(d.effect, if changed.is_empty() { Effect::Nothing } else { Effect::Write(changed.clone()) });

            let mut assumed = values.clone();
            assumed.insert(column.to_string(), other.clone());
            let differs = value_of(&values, column) != &other;
            let cond = WriteCondition { assumed: Some(assumed), assumed_deleted: false, compared, merge: false, refuse: None };
            prop_assert_eq!(verdict(&cond, &row, &loose) == Verdict::Conflict, differs);
            if differs {
                let d = decide(&cond, &row, &change, MergePolicy::Lww, &loose);
                prop_assert_eq!(d.effect, Effect::Nothing);
                let logged: Vec<&str> = d.conflicts.iter().map(|c| c.field.as_str()).collect();
                let expected: Vec<&str> = changed.keys().map(String::as_str).collect();
                prop_assert_eq!(logged, expected);
                prop_assert!(d.conflicts.iter().all(|c| c.winner == Winner::Server && Some(&c.incoming_value) == fields.get(&c.field)));
            }
        }
    }
}
