//! The change log's durable record: one per group commit (or per SQL write caught by the
//! capture trigger), covering a gap-free range of the tenant's seqs. The record is a JSON array
//! whose element `i` is the change with seq `first_seq + i`, itself an array:
//!
//! `[table, op, key, row, old, written, origin, user, change_id, device_seq, wall_ms, counter]`
//!
//! with `op` one of `"i"`, `"u"`, `"d"`. It is stored as Postgres `text` (compressed by
//! Postgres; migration 0017: as `json`, Postgres checked every record it was handed), JSON that
//! SQL can still read (`changes::json`, the `synchub.change_log` view, migrations 0015 and 0017)
//! while the hub writes and reads it in one piece. This module is pure: it
//! encodes a group's changes and decodes any slice of a record.

use protocol::{Delta, Object, Op};
use serde::de::{self, IgnoredAny, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::ids::Seq;

/// What the log says a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogOp {
    Insert,
    Update,
    Delete,
}

impl LogOp {
    fn code(self) -> &'static str {
        match self {
            LogOp::Insert => "i",
            LogOp::Update => "u",
            LogOp::Delete => "d",
        }
    }

    fn of_code(code: &str) -> Option<LogOp> {
        match code {
            "i" => Some(LogOp::Insert),
            "u" => Some(LogOp::Update),
            "d" => Some(LogOp::Delete),
            _ => None,
        }
    }
}

/// One change as the writer hands it to the record, borrowing the group's images.
#[derive(Debug, Clone, Copy)]
pub struct ChangeToLog<'a> {
    pub table: &'a str,
    pub op: LogOp,
    pub key: &'a Object,
    /// The row after the change, values as written; none for a delete.
    pub row: Option<&'a Object>,
    /// Old values of the changed columns; the whole old row for a delete; none for an insert.
    pub old: Option<&'a Object>,
    /// The fields exactly as the device sent them (none for a delete or a SQL write).
    pub written: Option<&'a Object>,
    pub origin: Option<&'a str>,
    pub user: Option<&'a str>,
    pub change_id: Option<Uuid>,
    pub device_seq: Option<u64>,
    pub wall_ms: u64,
    pub counter: u32,
}

impl Serialize for ChangeToLog<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut t = serializer.serialize_tuple(12)?;
        t.serialize_element(self.table)?;
        t.serialize_element(self.op.code())?;
        t.serialize_element(self.key)?;
        t.serialize_element(&self.row)?;
        t.serialize_element(&self.old)?;
        t.serialize_element(&self.written)?;
        t.serialize_element(&self.origin)?;
        t.serialize_element(&self.user)?;
        t.serialize_element(&self.change_id)?;
        t.serialize_element(&self.device_seq)?;
        t.serialize_element(&self.wall_ms)?;
        t.serialize_element(&self.counter)?;
        t.end()
    }
}

/// A group's changes as one record (`[change, …]`), in seq order.
pub struct Record<'a>(pub &'a [ChangeToLog<'a>]);

impl Serialize for Record<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter())
    }
}

/// The record's text.
pub fn encode(changes: &[ChangeToLog<'_>]) -> String {
    // Serializing maps of JSON values and plain scalars cannot fail.
    serde_json::to_string(&Record(changes)).expect("a record serializes")
}

/// One change read back from a record.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedChange {
    pub seq: Seq,
    pub table: String,
    pub op: LogOp,
    pub key: Object,
    pub row: Option<Object>,
    pub old: Option<Object>,
    pub written: Option<Object>,
    pub origin: Option<String>,
    pub user: Option<String>,
    pub change_id: Option<Uuid>,
    pub device_seq: Option<u64>,
    pub wall_ms: u64,
    pub counter: u32,
}

impl LoggedChange {
    /// The change as devices and dashboards receive it.
    pub fn into_delta(self) -> Delta {
        Delta {
            seq: self.seq,
            table: self.table,
            op: if self.op == LogOp::Delete { Op::Delete } else { Op::Upsert },
            key: self.key,
            row: self.row,
            old: self.old,
            origin: self.origin,
            change_id: self.change_id,
            left: false,
        }
    }
}

/// Why a record could not be read (a record the hub did not write, or a damaged one).
#[derive(Debug, thiserror::Error)]
#[error("change log record at seq {first_seq}: {reason}")]
pub struct BadRecord {
    pub first_seq: Seq,
    pub reason: String,
}

/// The changes of the record starting at `first_seq` whose seq is in `after < seq <= upto`
/// (`upto` none: to the record's end), in seq order. Changes before the range are skipped
/// without being built.
pub fn decode_range(text: &str, first_seq: Seq, after: Seq, upto: Option<Seq>) -> Result<Vec<LoggedChange>, BadRecord> {
    let mut de = serde_json::Deserializer::from_str(text);
    let slice = Slice { first_seq, after, upto };
    let changes = de::DeserializeSeed::deserialize(slice, &mut de).and_then(|changes| de.end().map(|_| changes));
    changes.map_err(|err| BadRecord { first_seq, reason: err.to_string() })
}

/// The whole record.
pub fn decode(text: &str, first_seq: Seq) -> Result<Vec<LoggedChange>, BadRecord> {
    decode_range(text, first_seq, first_seq.saturating_sub(1), None)
}

/// A seed that reads a record's array, building only the changes in its seq range.
struct Slice {
    first_seq: Seq,
    after: Seq,
    upto: Option<Seq>,
}

impl<'de> de::DeserializeSeed<'de> for Slice {
    type Value = Vec<LoggedChange>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Slice {
    type Value = Vec<LoggedChange>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of changes")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        let mut seq = self.first_seq;
        loop {
            let wanted = seq > self.after && self.upto.is_none_or(|upto| seq <= upto);
            if wanted {
                match items.next_element::<WireChange>()? {
                    Some(change) => out.push(change.at(seq)),
                    None => break,
                }
            } else if items.next_element::<IgnoredAny>()?.is_none() {
                break;
            }
            seq += 1;
        }
        Ok(out)
    }
}

/// A change's array as read.
#[derive(Deserialize)]
struct WireChange(
    String,
    #[serde(deserialize_with = "op_of_code")] LogOp,
    Object,
    Option<Object>,
    Option<Object>,
    Option<Object>,
    Option<String>,
    Option<String>,
    Option<Uuid>,
    Option<u64>,
    u64,
    u32,
);

fn op_of_code<'de, D: Deserializer<'de>>(deserializer: D) -> Result<LogOp, D::Error> {
    let code = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
    LogOp::of_code(&code).ok_or_else(|| de::Error::custom(format!("unknown op `{code}`")))
}

impl WireChange {
    fn at(self, seq: Seq) -> LoggedChange {
        let WireChange(table, op, key, row, old, written, origin, user, change_id, device_seq, wall_ms, counter) = self;
        LoggedChange { seq, table, op, key, row, old, written, origin, user, change_id, device_seq, wall_ms, counter }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    fn object(value: Value) -> Object {
        match value {
            Value::Object(map) => map,
            _ => unreachable!(),
        }
    }

    #[test]
    fn a_change_is_an_array_in_the_documented_order() {
        let key = object(json!({"id": "p1"}));
        let row = object(json!({"id": "p1", "stock": 3}));
        let old = object(json!({"stock": 5}));
        let id = Uuid::nil();
        let change = ChangeToLog {
            table: "products",
            op: LogOp::Update,
            key: &key,
            row: Some(&row),
            old: Some(&old),
            written: None,
            origin: Some("pos-1"),
            user: None,
            change_id: Some(id),
            device_seq: Some(7),
            wall_ms: 1_700_000_000_000,
            counter: 2,
        };
        let text = encode(&[change]);
        assert_eq!(
            text,
            r#"[["products","u",{"id":"p1"},{"id":"p1","stock":3},{"stock":5},null,"pos-1",null,"00000000-0000-0000-0000-000000000000",7,1700000000000,2]]"#
        );
        let back = decode(&text, 41).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].seq, 41);
        assert_eq!(back[0].device_seq, Some(7));
        let delta = back[0].clone().into_delta();
        assert_eq!((delta.op, delta.old, delta.origin.as_deref()), (Op::Upsert, Some(old), Some("pos-1")));
    }

    #[test]
    fn a_record_written_by_sql_reads_back() {
        // As the capture trigger builds it: no origin, user, change id or device seq.
        let text = r#"[["orders", "d", {"id": 4}, null, {"id": 4, "total": 120}, null, null, null, null, null, 1700000000000, 0]]"#;
        let back = decode(text, 9).unwrap();
        assert_eq!(back[0].op, LogOp::Delete);
        assert_eq!(back[0].change_id, None);
        assert_eq!(back[0].old.as_ref().unwrap()["total"], json!(120));
    }

    #[test]
    fn damaged_records_are_errors() {
        assert!(decode("[[\"t\",\"x\",{},null,null,null,null,null,null,null,0,0]]", 1).is_err());
        assert!(decode("[[\"t\",\"i\",{}]]", 1).is_err());
        assert!(decode("[] trailing", 1).is_err());
        assert!(decode("{}", 1).is_err());
    }

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            "[a-zé\"\\\\ \\n]{0,8}".prop_map(Value::String),
        ]
    }

    fn obj() -> impl Strategy<Value = Object> {
        proptest::collection::btree_map("[a-z_]{1,6}", value(), 0..4).prop_map(|m| m.into_iter().collect())
    }

    #[derive(Debug, Clone)]
    struct Owned {
        table: String,
        op: LogOp,
        key: Object,
        row: Option<Object>,
        old: Option<Object>,
        written: Option<Object>,
        origin: Option<String>,
        user: Option<String>,
        change_id: Option<Uuid>,
        device_seq: Option<u64>,
        wall_ms: u64,
        counter: u32,
    }

    fn change() -> impl Strategy<Value = Owned> {
        (
            ("[a-z_.]{1,12}", prop_oneof![Just(LogOp::Insert), Just(LogOp::Update), Just(LogOp::Delete)], obj()),
            (proptest::option::of(obj()), proptest::option::of(obj()), proptest::option::of(obj())),
            (proptest::option::of("[a-z0-9:-]{1,10}"), proptest::option::of("[a-z0-9@.]{1,10}"), proptest::option::of(any::<u128>())),
            (proptest::option::of(any::<u64>()), any::<u64>(), any::<u32>()),
        )
            .prop_map(|((table, op, key), (row, old, written), (origin, user, id), (device_seq, wall_ms, counter))| Owned {
                table,
                op,
                key,
                row,
                old,
                written,
                origin,
                user,
                change_id: id.map(Uuid::from_u128),
                device_seq,
                wall_ms,
                counter,
            })
    }

    fn borrowed(c: &Owned) -> ChangeToLog<'_> {
        ChangeToLog {
            table: &c.table,
            op: c.op,
            key: &c.key,
            row: c.row.as_ref(),
            old: c.old.as_ref(),
            written: c.written.as_ref(),
            origin: c.origin.as_deref(),
            user: c.user.as_deref(),
            change_id: c.change_id,
            device_seq: c.device_seq,
            wall_ms: c.wall_ms,
            counter: c.counter,
        }
    }

    fn same(read: &LoggedChange, c: &Owned, seq: Seq) -> bool {
        read.seq == seq
            && read.table == c.table
            && read.op == c.op
            && read.key == c.key
            && read.row == c.row
            && read.old == c.old
            && read.written == c.written
            && read.origin == c.origin
            && read.user == c.user
            && read.change_id == c.change_id
            && read.device_seq == c.device_seq
            && read.wall_ms == c.wall_ms
            && read.counter == c.counter
    }

    proptest! {
        /// Any group, sliced at any seqs, reads back exactly the changes in the slice.
        #[test]
        fn any_group_sliced_anywhere_round_trips(
            changes in proptest::collection::vec(change(), 1..12),
            first_seq in 1u64..1_000_000,
            cut in 0usize..14,
            len in 0usize..14,
            open_end in any::<bool>(),
        ) {
            let borrowed: Vec<ChangeToLog> = changes.iter().map(borrowed).collect();
            let text = encode(&borrowed);
            // Postgres keeps `json` as its text: what was written is what is read.
            let after = first_seq - 1 + cut as u64;
            let upto = (!open_end).then_some(after + len as u64);
            let read = decode_range(&text, first_seq, after, upto).unwrap();
            let expected: Vec<(usize, Seq)> = (0..changes.len())
                .map(|i| (i, first_seq + i as u64))
                .filter(|(_, seq)| *seq > after && upto.is_none_or(|u| *seq <= u))
                .collect();
            prop_assert_eq!(read.len(), expected.len());
            for (got, (i, seq)) in read.iter().zip(expected) {
                prop_assert!(same(got, &changes[i], seq), "{:?} vs {:?}", got, changes[i]);
            }
        }
    }
}
