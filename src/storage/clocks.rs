//! The text form of a row's field clocks, as `synchub.row_versions.clocks` and the row cache keep
//! them. The hub writes one entry per distinct clock followed by the fields it stamps: a change
//! writes several fields under one clock, so its writer is written once per change rather than
//! once per field. A writer with a number (`synchub.clock_writers`, migration 0020) is written as
//! that number, `[wall_ms, counter, writer, version, field, …]`; one without is named,
//! `[wall_ms, counter, device, version, user, field, …]` (migration 0019). A product row's clocks
//! in the merge benchmark went from about 300 bytes (per field) to 170 (named) and 100
//! (numbered). It reads both and the per-field form `{field: [wall_ms, counter, device,
//! version, user]}` that SQL writes (the capture trigger, and every row written before 0019).
//! SQL reads any form as the per-field one with `synchub.field_clocks(clocks)`.

use std::collections::BTreeMap;
use std::fmt;

use protocol::Hlc;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::sync::merge::FieldClock;

/// A clock writer's number (`synchub.clock_writers.writer_id`).
pub type WriterNumber = u32;

/// Who a number stands for: device and user.
pub type NamedWriter = (String, Option<String>);

/// Why clocks text could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum Unreadable {
    /// It holds no clocks in any form (only SQL written by hand could make it so).
    NotClocks,
    /// It names writers by numbers the lookup did not know (sorted, without repeats).
    UnknownWriters(Vec<WriterNumber>),
}

/// `clocks` written down in the compact form, each clock's version passed through `version`
/// (the group's provisional versions are made real on the way out), and its writer written as
/// the number `number` gives it, or named when it gives none.
pub fn encode(
    clocks: &BTreeMap<String, FieldClock>,
    version: impl Fn(u64) -> u64,
    mut number: impl FnMut(&FieldClock) -> Option<WriterNumber>,
) -> String {
    // A row has few distinct clocks (one per change that last wrote some field): a linear scan
    // finds a field's entry.
    let mut entries: Vec<Entry<'_>> = Vec::new();
    for (field, clock) in clocks {
        match entries.iter_mut().find(|e| e.clock == clock) {
            Some(entry) => entry.fields.push(field),
            None => entries.push(Entry { clock, version: version(clock.version), writer: number(clock), fields: vec![field] }),
        }
    }
    // unwrap: numbers and strings always serialize.
    serde_json::to_string(&entries).expect("clocks serialize")
}

/// The clocks `text` holds, in any form, numbered writers named by `writer`. In the per-field
/// form a field whose clock is not one is left out, as it always was.
pub fn decode(text: &str, writer: impl Fn(WriterNumber) -> Option<NamedWriter>) -> Result<BTreeMap<String, FieldClock>, Unreadable> {
    match text.trim_start().as_bytes().first() {
        Some(b'[') => {
            let entries: Vec<OwnedEntry> = serde_json::from_str(text).map_err(|_| Unreadable::NotClocks)?;
            let mut unknown = Vec::new();
            let mut clocks = BTreeMap::new();
            for OwnedEntry { hlc, version, writer: written, mut fields } in entries {
                let (device, user) = match written {
                    Written::Named(device, user) => (device, user),
                    Written::Numbered(number) => match writer(number) {
                        Some(named) => named,
                        None => {
                            unknown.push(number);
                            continue;
                        }
                    },
                };
                let clock = FieldClock { hlc, device, user, version };
                // The last field takes the clock, the others a copy.
                let last = fields.pop();
                for field in fields {
                    clocks.insert(field, clock.clone());
                }
                if let Some(field) = last {
                    clocks.insert(field, clock);
                }
            }
            if !unknown.is_empty() {
                unknown.sort_unstable();
                unknown.dedup();
                return Err(Unreadable::UnknownWriters(unknown));
            }
            Ok(clocks)
        }
        Some(b'{') => {
            let fields: serde_json::Map<String, Value> = serde_json::from_str(text).map_err(|_| Unreadable::NotClocks)?;
            Ok(fields.into_iter().filter_map(|(field, clock)| Some((field, clock_of(&clock)?))).collect())
        }
        _ => Err(Unreadable::NotClocks),
    }
}

/// One clock in the per-field form, `[wall_ms, counter, device, version, user]` (also a
/// tombstone's clock in `row_versions.deleted`); `None` when it is not one.
pub fn clock_of(value: &Value) -> Option<FieldClock> {
    let a = value.as_array()?;
    Some(FieldClock {
        hlc: Hlc { wall_ms: a.first()?.as_u64()?, counter: a.get(1)?.as_u64()? as u32 },
        device: a.get(2)?.as_str()?.to_owned(),
        version: a.get(3)?.as_u64()?,
        user: a.get(4).and_then(Value::as_str).map(str::to_owned),
    })
}

/// One clock and the fields it stamps, as written.
struct Entry<'a> {
    clock: &'a FieldClock,
    version: u64,
    /// The writer's number; `None`: named.
    writer: Option<WriterNumber>,
    fields: Vec<&'a String>,
}

impl Serialize for Entry<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let header = if self.writer.is_some() { 4 } else { 5 };
        let mut seq = serializer.serialize_seq(Some(header + self.fields.len()))?;
        seq.serialize_element(&self.clock.hlc.wall_ms)?;
        seq.serialize_element(&self.clock.hlc.counter)?;
        match self.writer {
            Some(number) => {
                seq.serialize_element(&number)?;
                seq.serialize_element(&self.version)?;
            }
            None => {
                seq.serialize_element(&self.clock.device)?;
                seq.serialize_element(&self.version)?;
                seq.serialize_element(&self.clock.user)?;
            }
        }
        for field in &self.fields {
            seq.serialize_element(field)?;
        }
        seq.end()
    }
}

/// One clock and the fields it stamps, as read, its writer not yet looked up.
struct OwnedEntry {
    hlc: Hlc,
    version: u64,
    writer: Written,
    fields: Vec<String>,
}

/// A clock's writer as an entry has it.
enum Written {
    Numbered(WriterNumber),
    Named(String, Option<String>),
}

/// An entry's third element: a writer's number, or the device's name.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrName {
    Number(WriterNumber),
    Name(String),
}

impl<'de> Deserialize<'de> for OwnedEntry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntryVisitor;
        impl<'de> Visitor<'de> for EntryVisitor {
            type Value = OwnedEntry;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("[wall_ms, counter, writer, version, field, …] or [wall_ms, counter, device, version, user, field, …]")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OwnedEntry, A::Error> {
                let missing = |what| de::Error::custom(format_args!("a clock without its {what}"));
                let wall_ms: u64 = seq.next_element()?.ok_or_else(|| missing("wall_ms"))?;
                let counter: u32 = seq.next_element()?.ok_or_else(|| missing("counter"))?;
                let who: NumberOrName = seq.next_element()?.ok_or_else(|| missing("writer"))?;
                let version: u64 = seq.next_element()?.ok_or_else(|| missing("version"))?;
                let writer = match who {
                    NumberOrName::Number(number) => Written::Numbered(number),
                    NumberOrName::Name(device) => Written::Named(device, seq.next_element()?.ok_or_else(|| missing("user"))?),
                };
                let mut fields = Vec::with_capacity(seq.size_hint().unwrap_or(4));
                while let Some(field) = seq.next_element::<String>()? {
                    fields.push(field);
                }
                Ok(OwnedEntry { hlc: Hlc { wall_ms, counter }, version, writer, fields })
            }
        }
        deserializer.deserialize_seq(EntryVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn none(_: WriterNumber) -> Option<NamedWriter> {
        None
    }

    /// Writers numbered 1 and 2: `pos-1` as `u1`, and `pos "2"` as `ü`.
    fn numbered(clock: &FieldClock) -> Option<WriterNumber> {
        match (clock.device.as_str(), clock.user.as_deref()) {
            ("pos-1", Some("u1")) => Some(1),
            ("pos \"2\"", Some("ü")) => Some(2),
            _ => None,
        }
    }

    fn named(number: WriterNumber) -> Option<NamedWriter> {
        match number {
            1 => Some(("pos-1".into(), Some("u1".into()))),
            2 => Some(("pos \"2\"".into(), Some("ü".into()))),
            _ => None,
        }
    }

    fn clock(wall_ms: u64, counter: u32, device: &str, version: u64, user: Option<&str>) -> FieldClock {
        FieldClock { hlc: Hlc { wall_ms, counter }, device: device.into(), user: user.map(Into::into), version }
    }

    #[test]
    fn fields_with_one_clock_share_its_entry() {
        let a = clock(1_700_000_000_000, 3, "pos-1", 41, Some("u1"));
        let b = clock(1_700_000_000_500, 0, "pos-2", 57, None);
        let clocks: BTreeMap<String, FieldClock> =
            [("name", &a), ("price", &b), ("sku", &a), ("stock", &b)].into_iter().map(|(f, c)| (f.to_string(), c.clone())).collect();
        let text = encode(&clocks, |v| v, |_| None);
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap(),
            json!([[1_700_000_000_000u64, 3, "pos-1", 41, "u1", "name", "sku"], [1_700_000_000_500u64, 0, "pos-2", 57, null, "price", "stock"]])
        );
        assert_eq!(decode(&text, none).unwrap(), clocks);
    }

    #[test]
    fn a_numbered_writer_is_written_as_its_number_and_others_by_name() {
        let a = clock(1_700_000_000_000, 3, "pos-1", 41, Some("u1"));
        let b = clock(1_700_000_000_500, 0, "pos-9", 57, Some("u9"));
        let clocks: BTreeMap<String, FieldClock> =
            [("name", &a), ("price", &b), ("sku", &a)].into_iter().map(|(f, c)| (f.to_string(), c.clone())).collect();
        let text = encode(&clocks, |v| v, numbered);
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap(),
            json!([[1_700_000_000_000u64, 3, 1, 41, "name", "sku"], [1_700_000_000_500u64, 0, "pos-9", 57, "u9", "price"]])
        );
        assert_eq!(decode(&text, named).unwrap(), clocks);
    }

    #[test]
    fn numbers_the_lookup_does_not_know_are_reported() {
        let text = "[[5, 0, 7, 1, \"a\"], [6, 0, 1, 2, \"b\"], [7, 0, 3, 3, \"c\"], [8, 0, 7, 4, \"d\"]]";
        assert_eq!(decode(text, named), Err(Unreadable::UnknownWriters(vec![3, 7])));
        assert_eq!(decode(text, |n| Some((format!("d{n}"), None))).unwrap()["d"], clock(8, 0, "d7", 4, None));
    }

    #[test]
    fn versions_are_passed_through_on_the_way_out() {
        let clocks: BTreeMap<String, FieldClock> = [("a".to_string(), clock(1, 0, "d", 3, None))].into();
        let decoded = decode(&encode(&clocks, |v| v + 100, |_| None), none).unwrap();
        assert_eq!(decoded["a"].version, 103);
    }

    #[test]
    fn the_per_field_form_sql_writes_is_read_too() {
        let text = r#"{"id": [1796643819832, 0, "", 1, "postgres"], "name": [5, 2, "pos-1", 9], "bad": "x"}"#;
        let decoded = decode(text, none).unwrap();
        assert_eq!(decoded.len(), 2, "a field whose clock is not one is left out");
        assert_eq!(decoded["id"], clock(1796643819832, 0, "", 1, Some("postgres")));
        assert_eq!(decoded["name"], clock(5, 2, "pos-1", 9, None));
        assert_eq!(decode("{}", none).unwrap().len(), 0);
        assert_eq!(decode("[]", none).unwrap().len(), 0);
    }

    #[test]
    fn text_in_neither_form_is_none() {
        for text in ["", "null", "3", "\"x\"", "[[1, 2]]", "[[1, 2, \"d\", 4, null, 7]]", "[[1, 2, -3, 4]]", "[[1, 2, 3, 4, 5]]", "{", "[1]"] {
            assert_eq!(decode(text, none), Err(Unreadable::NotClocks), "{text}");
        }
    }

    fn any_clock() -> impl Strategy<Value = FieldClock> {
        (0u64..3, 0u32..3, prop::sample::select(vec!["", "pos-1", "pos \"2\""]), 0u64..4, prop::option::of(prop::sample::select(vec!["u1", "ü"])))
            .prop_map(|(w, c, d, v, u)| clock(1_700_000_000_000 + w, c, d, v, u))
    }

    proptest! {
        #[test]
        fn any_clocks_round_trip(clocks in prop::collection::btree_map("[a-z_é]{1,8}", any_clock(), 0..12), number in any::<bool>()) {
            let text = if number { encode(&clocks, |v| v, numbered) } else { encode(&clocks, |v| v, |_| None) };
            prop_assert_eq!(decode(&text, named).unwrap(), clocks.clone());
            // Never longer than the per-field form.
            let per_field: BTreeMap<&String, (u64, u32, &str, u64, Option<&str>)> = clocks
                .iter()
                .map(|(f, c)| (f, (c.hlc.wall_ms, c.hlc.counter, c.device.as_str(), c.version, c.user.as_deref())))
                .collect();
            prop_assert!(text.len() <= serde_json::to_string(&per_field).unwrap().len().max(2));
        }
    }
}
