//! `masterWrite` for one collection: the client's rows as changes for the ordinary merge path
//! (hub-numbered, conditional on the document the client assumed unless the collection is
//! merged by the hub), and the merge's results as RxDB's answer: the master documents of the
//! rows that were not written as asked.

use std::collections::HashMap;

use protocol::{Change, ChangeResult, ChangeStatus, ErrorCode, Hlc, Object};
use uuid::Uuid;

use super::collection::{Collection, DocumentProblem};
use super::wire::WriteRow;
use crate::config::RxdbConflicts;
use crate::rules::AccessView;
use crate::sync::conditional::WriteCondition;

/// The rows of one `masterWrite` as changes, and what became of those that are not changes.
pub struct PlannedWrite {
    /// The changes, each with its row's index and condition.
    pub changes: Vec<(usize, Change, Option<WriteCondition>)>,
    /// Rows that can never be written, by index.
    pub refused: Vec<(usize, DocumentProblem)>,
}

/// The rows as changes, stamped with clocks from `next_clock`.
pub fn plan(collection: &Collection, rows: &[WriteRow], mut next_clock: impl FnMut() -> Hlc) -> PlannedWrite {
    let mut planned = PlannedWrite { changes: Vec::with_capacity(rows.len()), refused: Vec::new() };
    let merged_by_hub = collection.conflicts == RxdbConflicts::ServerMerge;
    for (index, row) in rows.iter().enumerate() {
        // Merged by the hub, a row writes what the client changed, merged on what it saw;
        // otherwise the whole document, on the condition that the stored one is the one the
        // client assumed.
        let since = if merged_by_hub { row.assumed_master_state.as_ref() } else { None };
        let write = match collection.write_of(&row.new_document_state, since) {
            Ok(write) => write,
            Err(problem) => {
                planned.refused.push((index, problem));
                continue;
            }
        };
        let condition = Some(collection.condition(row.assumed_master_state.as_ref()));
        if merged_by_hub && write.op == protocol::Op::Upsert && write.fields.is_empty() {
            continue; // nothing changed: nothing to merge
        }
        let change = Change {
            change_id: Uuid::now_v7(),
            // The hub numbers the changes of RxDB clients (`assign_device_seqs`).
            device_seq: 1 + planned.changes.len() as u64,
            table: collection.table.name.clone(),
            op: write.op,
            key: write.key,
            fields: write.fields,
            hlc: next_clock(),
            base_version: 0,
        };
        planned.changes.push((index, change, condition));
    }
    planned
}

/// What the answer says of one row.
#[derive(Debug, Clone, PartialEq)]
pub enum RowOutcome {
    /// Written as asked (or merged by the hub): not in the answer.
    Written,
    /// Not written: the hub's document goes back (a tombstone when it holds a deleted one).
    Master(Object),
    /// Refused for good and the hub's document is not known from the result: the caller looks
    /// it up (and answers a tombstone of the client's document when there is none).
    LookUp(ErrorCode),
}

/// The outcome of a change from its result, showing the writer only what its rules let it
/// read of the stored row (a row it may not see is answered as a tombstone).
pub fn outcome(collection: &Collection, row: &WriteRow, result: &ChangeResult, view: Option<&AccessView>) -> RowOutcome {
    match result.status {
        ChangeStatus::Applied | ChangeStatus::Merged | ChangeStatus::Duplicate => RowOutcome::Written,
        ChangeStatus::Conflict if collection.conflicts == RxdbConflicts::ServerMerge => RowOutcome::Written,
        ChangeStatus::Conflict => {
            let visible = match (&result.row, view) {
                (Some(current), Some(view)) => view.visible_row(&collection.table.name, current),
                (current, _) => current.clone(),
            };
            match visible {
                Some(current) => RowOutcome::Master(collection.document(&current, false)),
                None => RowOutcome::Master(collection.refusal_tombstone(&row.new_document_state)),
            }
        }
        ChangeStatus::Rejected if result.reason == Some(ErrorCode::RowDeleted) => RowOutcome::Master(collection.refusal_tombstone(&row.new_document_state)),
        ChangeStatus::Rejected => RowOutcome::LookUp(result.reason.unwrap_or(ErrorCode::InvalidValue)),
    }
}

/// Results by change id, for matching them with the rows.
pub fn by_change(results: Vec<ChangeResult>) -> HashMap<Uuid, ChangeResult> {
    results.into_iter().map(|r| (r.change_id, r)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, MergePolicy, RxdbCollectionConfig};
    use crate::storage::catalog::{Catalog, Column, TableSchema};
    use protocol::Op;
    use serde_json::{json, Value};

    fn obj(v: Value) -> Object {
        v.as_object().unwrap().clone()
    }

    fn collection(conflicts: RxdbConflicts) -> Collection {
        let columns = [("tenant_id", "text"), ("id", "text"), ("name", "text"), ("stock", "integer")]
            .into_iter()
            .map(|(name, ty)| (name.to_owned(), Column { name: name.to_owned(), sql_type: ty.to_owned() }))
            .collect();
        let table = TableSchema::assemble("items".into(), "tenant_id".into(), "text".into(), vec!["id".into()], columns, MergePolicy::Lww, "to_jsonb");
        let mut config = Config::default();
        config.rxdb_collections = vec![RxdbCollectionConfig { name: "items".into(), table: None, fields: None, conflicts, nulls: Default::default() }];
        Collection::resolve("items", &config, &Catalog::of(vec![table])).unwrap()
    }

    fn row(new: Value, assumed: Option<Value>) -> WriteRow {
        WriteRow { new_document_state: obj(new), assumed_master_state: assumed.map(obj) }
    }

    fn clock() -> impl FnMut() -> Hlc {
        let mut n = 0;
        move || {
            n += 1;
            Hlc { wall_ms: 1_000, counter: n }
        }
    }

    #[test]
    fn rows_become_numbered_conditional_changes_and_bad_documents_are_set_aside() {
        let c = collection(RxdbConflicts::Report);
        let rows = [
            row(json!({"id": "a", "name": "x", "stock": 1, "_deleted": false}), None),
            row(json!({"name": "no key"}), None),
            row(json!({"id": "b", "_deleted": true}), Some(json!({"id": "b", "name": "y", "_deleted": false}))),
        ];
        let planned = plan(&c, &rows, clock());
        assert_eq!(planned.refused, vec![(1, DocumentProblem::NoKey("id".into()))]);
        let (indexes, seqs): (Vec<usize>, Vec<u64>) = planned.changes.iter().map(|(i, ch, _)| (*i, ch.device_seq)).unzip();
        assert_eq!((indexes, seqs), (vec![0, 2], vec![1, 2]));
        assert_eq!(planned.changes[1].1.op, Op::Delete);
        let condition = planned.changes[1].2.as_ref().unwrap();
        assert_eq!(condition.assumed, Some(obj(json!({"id": "b", "name": "y"}))));
        assert!(planned.changes[0].2.as_ref().unwrap().assumed.is_none());
        assert!(planned.changes[0].1.hlc < planned.changes[1].1.hlc);
    }

    #[test]
    fn merged_by_the_hub_a_row_writes_only_what_the_client_changed() {
        let c = collection(RxdbConflicts::ServerMerge);
        let rows = [
            row(json!({"id": "a", "name": "x", "stock": 2}), Some(json!({"id": "a", "name": "x", "stock": 1}))),
            row(json!({"id": "b", "name": "same"}), Some(json!({"id": "b", "name": "same"}))),
        ];
        let planned = plan(&c, &rows, clock());
        assert_eq!(planned.changes.len(), 1, "an unchanged document is not written");
        assert_eq!(planned.changes[0].1.fields, obj(json!({"stock": 2})));
        assert!(planned.changes[0].2.as_ref().is_some_and(|c| c.merge), "merged by the hub, on what the client saw");
    }

    #[test]
    fn results_become_rxdb_answers() {
        let report = collection(RxdbConflicts::Report);
        let r = row(json!({"id": "a", "name": "mine", "stock": 1}), None);
        let result = |status, row: Option<Value>, reason| ChangeResult {
            change_id: Uuid::now_v7(),
            device_seq: 1,
            status,
            seq: None,
            lost_fields: vec![],
            reason,
            message: None,
            row: row.map(obj),
        };
        assert_eq!(outcome(&report, &r, &result(ChangeStatus::Applied, None, None), None), RowOutcome::Written);
        let theirs = json!({"tenant_id": "t", "id": "a", "name": "theirs", "stock": 3});
        assert_eq!(
            outcome(&report, &r, &result(ChangeStatus::Conflict, Some(theirs.clone()), None), None),
            RowOutcome::Master(obj(json!({"id": "a", "name": "theirs", "stock": 3, "_deleted": false})))
        );
        assert_eq!(
            outcome(&report, &r, &result(ChangeStatus::Rejected, None, Some(ErrorCode::RowDeleted)), None),
            RowOutcome::Master(obj(json!({"id": "a", "name": "mine", "stock": 1, "_deleted": true})))
        );
        assert_eq!(outcome(&report, &r, &result(ChangeStatus::Rejected, None, Some(ErrorCode::Forbidden)), None), RowOutcome::LookUp(ErrorCode::Forbidden));
        let merged = collection(RxdbConflicts::ServerMerge);
        assert_eq!(outcome(&merged, &r, &result(ChangeStatus::Conflict, Some(theirs), None), None), RowOutcome::Written);
    }
}
