//! The checks a pushed batch passes before it is queued, whoever pushed it (a device on its
//! socket, or a server-side writer over HTTP): not empty, at most `max_batch_changes`, and
//! device_seqs from 1 up, consecutive and increasing, and versions in range. A batch that fails
//! is refused whole.

use protocol::{Change, ErrorCode};

use crate::error::{Error, Result};

pub fn check_batch(changes: &[Change], max_batch_changes: usize) -> Result<()> {
    if changes.is_empty() {
        return Err(Error::client(ErrorCode::InvalidBatch, "a batch needs at least one change"));
    }
    if changes.len() > max_batch_changes {
        return Err(Error::client(ErrorCode::BatchTooLarge, format!("{} changes; at most {max_batch_changes} per batch", changes.len())));
    }
    // device_seqs count from 1, fit the log's bigint, and are consecutive within a batch.
    if changes.iter().any(|c| c.device_seq == 0 || c.device_seq > i64::MAX as u64)
        || changes.windows(2).any(|w| w[0].device_seq.checked_add(1) != Some(w[1].device_seq))
    {
        return Err(Error::client(
            ErrorCode::InvalidBatch,
            "device_seqs must start at 1 or more and be consecutive and increasing within a batch",
        ));
    }
    // Versions are seqs, which fit the log's bigint; a larger one could never be stored.
    if changes.iter().any(|c| c.base_version > i64::MAX as u64) {
        return Err(Error::client(ErrorCode::InvalidBatch, "base_version is larger than any version (2^63 - 1)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{Hlc, Object, Op};
    use uuid::Uuid;

    fn change(device_seq: u64) -> Change {
        Change {
            change_id: Uuid::now_v7(),
            device_seq,
            table: "products".into(),
            op: Op::Upsert,
            key: Object::new(),
            fields: Object::new(),
            hlc: Hlc { wall_ms: 1, counter: 0 },
            base_version: 0,
        }
    }

    #[test]
    fn empty_large_and_broken_sequences_are_refused() {
        let code = |changes: &[Change], max| check_batch(changes, max).err().map(|e| e.code());
        assert_eq!(code(&[], 10), Some(ErrorCode::InvalidBatch));
        assert_eq!(code(&[change(1), change(2), change(3)], 2), Some(ErrorCode::BatchTooLarge));
        assert_eq!(code(&[change(0)], 10), Some(ErrorCode::InvalidBatch));
        assert_eq!(code(&[change(1), change(3)], 10), Some(ErrorCode::InvalidBatch));
        assert_eq!(code(&[change(2), change(1)], 10), Some(ErrorCode::InvalidBatch));
        assert_eq!(code(&[change(u64::MAX)], 10), Some(ErrorCode::InvalidBatch));
        assert_eq!(code(&[change(7), change(8)], 10), None);
        let mut far = change(1);
        far.base_version = u64::MAX;
        assert_eq!(code(&[far], 10), Some(ErrorCode::InvalidBatch));
    }
}
