//! The text form of a row's field clocks, as `synchub.row_versions.clocks` and the row cache keep
//! them. The hub writes one entry per distinct clock followed by the fields it stamps,
//! `[[wall_ms, counter, device, version, user, field, …], …]` (migration 0019): a change writes
//! several fields under one clock, so the device and user are written once per change rather
//! than once per field: a product row's clocks in the merge benchmark went from about 300 to 170 bytes. It reads that form and the per-field
//! form `{field: [wall_ms, counter, device, version, user]}` that SQL writes (the capture
//! trigger, and every row written before 0019). SQL reads either form as the per-field one with
//! `synchub.field_clocks(clocks)`.

use std::collections::BTreeMap;
use std::fmt;

use protocol::Hlc;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::sync::merge::FieldClock;

/// `clocks` written down in the compact form, each clock's version passed through `version`
/// (the group's provisional versions are made real on the way out).
pub fn encode(clocks: &BTreeMap<String, FieldClock>, version: impl Fn(u64) -> u64) -> String {
    // A row has few distinct clocks (one per change that last wrote some field): a linear scan
    // finds a field's entry.
    let mut entries: Vec<Entry<'_>> = Vec::new();
    for (field, clock) in clocks {
        match entries.iter_mut().find(|e| e.clock == clock) {
            Some(entry) => entry.fields.push(field),
            None => entries.push(Entry { clock, version: version(clock.version), fields: vec![field] }),
        }
    }
    // unwrap: numbers and strings always serialize.
    serde_json::to_string(&entries).expect("clocks serialize")
}

/// The clocks `text` holds, in either form; `None` when it is neither (only SQL written by hand
/// could make it so). In the per-field form a field whose clock is not one is left out, as it
/// always was.
pub fn decode(text: &str) -> Option<BTreeMap<String, FieldClock>> {
    match text.trim_start().as_bytes().first()? {
        b'[' => {
            let entries: Vec<OwnedEntry> = serde_json::from_str(text).ok()?;
            let mut clocks = BTreeMap::new();
            for OwnedEntry { clock, mut fields } in entries {
                // The last field takes the clock, the others a copy.
                let last = fields.pop();
                for field in fields {
                    clocks.insert(field, clock.clone());
                }
                if let Some(field) = last {
                    clocks.insert(field, clock);
                }
            }
            Some(clocks)
        }
        b'{' => {
            let fields: serde_json::Map<String, Value> = serde_json::from_str(text).ok()?;
            Some(fields.into_iter().filter_map(|(field, clock)| Some((field, clock_of(&clock)?))).collect())
        }
        _ => None,
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
    fields: Vec<&'a String>,
}

impl Serialize for Entry<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(5 + self.fields.len()))?;
        seq.serialize_element(&self.clock.hlc.wall_ms)?;
        seq.serialize_element(&self.clock.hlc.counter)?;
        seq.serialize_element(&self.clock.device)?;
        seq.serialize_element(&self.version)?;
        seq.serialize_element(&self.clock.user)?;
        for field in &self.fields {
            seq.serialize_element(field)?;
        }
        seq.end()
    }
}

/// One clock and the fields it stamps, as read.
struct OwnedEntry {
    clock: FieldClock,
    fields: Vec<String>,
}

impl<'de> Deserialize<'de> for OwnedEntry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntryVisitor;
        impl<'de> Visitor<'de> for EntryVisitor {
            type Value = OwnedEntry;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("[wall_ms, counter, device, version, user, field, …]")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OwnedEntry, A::Error> {
                let missing = |what| de::Error::custom(format_args!("a clock without its {what}"));
                let wall_ms: u64 = seq.next_element()?.ok_or_else(|| missing("wall_ms"))?;
                let counter: u32 = seq.next_element()?.ok_or_else(|| missing("counter"))?;
                let device: String = seq.next_element()?.ok_or_else(|| missing("device"))?;
                let version: u64 = seq.next_element()?.ok_or_else(|| missing("version"))?;
                let user: Option<String> = seq.next_element()?.ok_or_else(|| missing("user"))?;
                let mut fields = Vec::with_capacity(seq.size_hint().unwrap_or(4));
                while let Some(field) = seq.next_element::<String>()? {
                    fields.push(field);
                }
                Ok(OwnedEntry { clock: FieldClock { hlc: Hlc { wall_ms, counter }, device, user, version }, fields })
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

    fn clock(wall_ms: u64, counter: u32, device: &str, version: u64, user: Option<&str>) -> FieldClock {
        FieldClock { hlc: Hlc { wall_ms, counter }, device: device.into(), user: user.map(Into::into), version }
    }

    #[test]
    fn fields_with_one_clock_share_its_entry() {
        let a = clock(1_700_000_000_000, 3, "pos-1", 41, Some("u1"));
        let b = clock(1_700_000_000_500, 0, "pos-2", 57, None);
        let clocks: BTreeMap<String, FieldClock> =
            [("name", &a), ("price", &b), ("sku", &a), ("stock", &b)].into_iter().map(|(f, c)| (f.to_string(), c.clone())).collect();
        let text = encode(&clocks, |v| v);
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap(),
            json!([[1_700_000_000_000u64, 3, "pos-1", 41, "u1", "name", "sku"], [1_700_000_000_500u64, 0, "pos-2", 57, null, "price", "stock"]])
        );
        assert_eq!(decode(&text).unwrap(), clocks);
    }

    #[test]
    fn versions_are_passed_through_on_the_way_out() {
        let clocks: BTreeMap<String, FieldClock> = [("a".to_string(), clock(1, 0, "d", 3, None))].into();
        let decoded = decode(&encode(&clocks, |v| v + 100)).unwrap();
        assert_eq!(decoded["a"].version, 103);
    }

    #[test]
    fn the_per_field_form_sql_writes_is_read_too() {
        let text = r#"{"id": [1796643819832, 0, "", 1, "postgres"], "name": [5, 2, "pos-1", 9], "bad": "x"}"#;
        let decoded = decode(text).unwrap();
        assert_eq!(decoded.len(), 2, "a field whose clock is not one is left out");
        assert_eq!(decoded["id"], clock(1796643819832, 0, "", 1, Some("postgres")));
        assert_eq!(decoded["name"], clock(5, 2, "pos-1", 9, None));
        assert_eq!(decode("{}").unwrap().len(), 0);
        assert_eq!(decode("[]").unwrap().len(), 0);
    }

    #[test]
    fn text_in_neither_form_is_none() {
        for text in ["", "null", "3", "\"x\"", "[[1, 2]]", "[[1, 2, \"d\", 4, null, 7]]", "{", "[1]"] {
            assert!(decode(text).is_none(), "{text}");
        }
    }

    fn any_clock() -> impl Strategy<Value = FieldClock> {
        (0u64..3, 0u32..3, prop::sample::select(vec!["", "pos-1", "pos \"2\""]), 0u64..4, prop::option::of(prop::sample::select(vec!["u1", "ü"])))
            .prop_map(|(w, c, d, v, u)| clock(1_700_000_000_000 + w, c, d, v, u))
    }

    proptest! {
        #[test]
        fn any_clocks_round_trip(clocks in prop::collection::btree_map("[a-z_é]{1,8}", any_clock(), 0..12)) {
            let text = encode(&clocks, |v| v);
            prop_assert_eq!(decode(&text).unwrap(), clocks.clone());
            // Never longer than the per-field form.
            let per_field: BTreeMap<&String, (u64, u32, &str, u64, Option<&str>)> = clocks
                .iter()
                .map(|(f, c)| (f, (c.hlc.wall_ms, c.hlc.counter, c.device.as_str(), c.version, c.user.as_deref())))
                .collect();
            prop_assert!(text.len() <= serde_json::to_string(&per_field).unwrap().len().max(2));
        }
    }
}
