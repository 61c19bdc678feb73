//! `masterChangesSince` for one collection: from the client's checkpoint, what to read (the
//! log after a seq, or the current rows and tombstones when the checkpoint is none, of another
//! epoch, or older than the log), the read itself through the storage's document API, and the
//! checkpoint the reply carries.

use std::sync::Arc;

use serde_json::Value;

use super::collection::Collection;
use super::wire::Checkpoint;
use crate::error::Result;
use protocol::ErrorCode;
use crate::ids::{Seq, TenantId};
use crate::rules::AccessView;
use crate::storage::documents::{DocumentPage, SnapshotCursor};
use crate::storage::Store;

/// Where a pull starts.
#[derive(Debug, Clone, PartialEq)]
pub enum PullPlan {
    /// The log's entries after `after`.
    Log { after: Seq },
    /// The current rows, then the tombstones, after `cursor` (from the start when `None`), in a
    /// snapshot begun at head seq `head` (this page's head when `None`: the first page).
    Snapshot { head: Option<Seq>, cursor: Option<SnapshotCursor> },
}

impl PullPlan {
    /// The plan for a client's checkpoint in the tenant's `epoch`.
    pub fn for_checkpoint(checkpoint: Option<&Value>, epoch: &str) -> PullPlan {
        let fresh = PullPlan::Snapshot { head: None, cursor: None };
        let Some(checkpoint) = checkpoint.and_then(Checkpoint::read) else { return fresh };
        if checkpoint.epoch != epoch {
            return fresh;
        }
        match checkpoint.snapshot {
            None => PullPlan::Log { after: checkpoint.seq },
            Some(cursor) => match serde_json::from_value(cursor) {
                Ok(cursor) => PullPlan::Snapshot { head: Some(checkpoint.seq), cursor: Some(cursor) },
                Err(_) => fresh,
            },
        }
    }
}

/// A pull's answer: the documents, the checkpoint to hand out, and what it covers of the
/// tenant's stream (`None` while a snapshot is under way).
pub struct Pulled {
    pub documents: Vec<Value>,
    pub checkpoint: Checkpoint,
    pub covers: Option<Seq>,
}

/// Read the pull `plan` of at most `limit` documents.
pub async fn read(store: Arc<Store>, tenant: TenantId, collection: Arc<Collection>, plan: PullPlan, limit: u32, access: Option<Arc<AccessView>>) -> Result<Pulled> {
    let access = access.as_deref();
    if let PullPlan::Log { after } = plan {
        match store.changed_documents(&tenant, &collection.table, after, limit, access).await {
            Ok(page) => return Ok(from_log(&collection, page, after, limit)),
            // Older than the log: serve the current rows instead.
            Err(err) if err.code() == ErrorCode::PositionTooOld => {}
            Err(err) => return Err(err),
        }
    }
    let (mut head, mut cursor) = match plan {
        PullPlan::Snapshot { head, cursor } => (head, cursor),
        PullPlan::Log { .. } => (None, None),
    };
    // A page short of `limit` ends the client's pulling: fill it while the snapshot goes on.
    let mut documents = Vec::new();
    let mut first: Option<DocumentPage> = None;
    loop {
        let wanted = limit - documents.len() as u32;
        let (page, next) = match store.document_snapshot(&tenant, &collection.table, cursor.as_ref(), wanted, access).await {
            Ok(read) => read,
            // The epoch changed or the log was trimmed past the snapshot's start: start over.
            Err(err) if err.code() == ErrorCode::PositionTooOld && cursor.is_some() && documents.is_empty() => {
                (head, cursor) = (None, None);
                continue;
            }
            Err(err) => return Err(err),
        };
        documents.extend(page.docs.iter().map(|d| Value::Object(collection.document(&d.row, d.deleted))));
        first.get_or_insert(page);
        cursor = next;
        if cursor.is_none() || documents.len() as u32 >= limit {
            break;
        }
    }
    // unwrap: the loop ran at least once.
    let first = first.expect("a snapshot page");
    let head = head.unwrap_or(first.head_seq);
    let snapshot = cursor.as_ref().map(|c| serde_json::to_value(c).unwrap_or(Value::Null));
    let covers = snapshot.is_none().then_some(head);
    Ok(Pulled { documents, checkpoint: Checkpoint { epoch: first.epoch.to_string(), seq: head, snapshot }, covers })
}

/// A reply from a log page: a full page ends at its last document (the client pulls on);
/// a short one covers everything up to the head the read saw.
fn from_log(collection: &Collection, page: DocumentPage, after: Seq, limit: u32) -> Pulled {
    let full = page.docs.len() as u32 >= limit;
    let seq = match page.docs.last() {
        Some(last) if full => last.seq,
        _ => page.head_seq.max(after),
    };
    let documents = page.docs.iter().map(|d| Value::Object(collection.document(&d.row, d.deleted))).collect();
    Pulled { documents, checkpoint: Checkpoint { epoch: page.epoch.to_string(), seq, snapshot: None }, covers: Some(seq) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn checkpoints_choose_the_log_or_a_snapshot() {
        assert_eq!(PullPlan::for_checkpoint(None, "e1"), PullPlan::Snapshot { head: None, cursor: None });
        assert_eq!(PullPlan::for_checkpoint(Some(&json!({"epoch": "e1", "seq": 9, "snapshot": null})), "e1"), PullPlan::Log { after: 9 });
        // Another epoch, RxDB's own checkpoint shape, or a cursor the hub cannot read: start over.
        assert_eq!(PullPlan::for_checkpoint(Some(&json!({"epoch": "e0", "seq": 9})), "e1"), PullPlan::Snapshot { head: None, cursor: None });
        assert_eq!(PullPlan::for_checkpoint(Some(&json!({"id": "a", "lwt": 1.5})), "e1"), PullPlan::Snapshot { head: None, cursor: None });
        assert_eq!(PullPlan::for_checkpoint(Some(&json!({"epoch": "e1", "seq": 9, "snapshot": "?"})), "e1"), PullPlan::Snapshot { head: None, cursor: None });
    }
}
