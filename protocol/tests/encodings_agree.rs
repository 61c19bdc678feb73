//! JSON and MessagePack decode every client frame alike: random value trees shaped like client
//! frames (the golden vectors with fields kept, dropped, nulled, retyped or replaced, and
//! `type` first or last) are encoded both ways, and the codec must return equal frames or
//! errors with the same code for both.

use proptest::prelude::*;
use protocol::codec::{decode_client, encode, CLIENT_TYPES};
use protocol::{DecodeError, Encoding};
use serde_json::{Map, Value};

/// The golden client frames, as value trees.
fn templates() -> Vec<Value> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let mut frames: Vec<(String, Value)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .filter(|path| path.file_name().unwrap().to_string_lossy().starts_with("client_"))
        .map(|path| (path.display().to_string(), serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()))
        .collect();
    frames.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(frames.len() >= 15, "only {} client vectors", frames.len());
    frames.into_iter().map(|(_, frame)| frame).collect()
}

/// Any small value: scalars of every JSON type, strings that name frame types, ops and
/// channels, and short arrays and objects of those.
fn any_value() -> BoxedStrategy<Value> {
    let words: Vec<&'static str> = CLIENT_TYPES.iter().copied().chain(["teleport", "upsert", "delete", "dashboard", "device", "presence", "conflicts", "eq", "in", ""]).collect();
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (0u64..40).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        Just(Value::from(1.0)),
        prop::sample::select(words).prop_map(Value::from),
        "[a-z0-9-]{0,12}".prop_map(Value::from),
        Just(Value::from("0193304f-a001-7b3c-9d2e-1f0a2b3c4d01")),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..3).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
    .boxed()
}

/// `value` with random changes at every depth; `None` when the value is left out of its object.
fn mutated(value: Value) -> BoxedStrategy<Option<Value>> {
    let same = match value {
        Value::Object(map) => {
            let fields: Vec<_> = map.into_iter().map(|(k, v)| mutated(v).prop_map(move |v| (k.clone(), v))).collect();
            fields.prop_map(|fields| Some(Value::Object(fields.into_iter().filter_map(|(k, v)| Some((k, v?))).collect()))).boxed()
        }
        Value::Array(items) => {
            let items: Vec<_> = items.into_iter().map(mutated).collect();
            items.prop_map(|items| Some(Value::Array(items.into_iter().flatten().collect()))).boxed()
        }
        scalar => Just(Some(scalar)).boxed(),
    };
    prop_oneof![
        12 => same,
        1 => Just(None),
        1 => Just(Some(Value::Null)),
        1 => any_value().prop_map(Some),
    ]
    .boxed()
}

/// A frame's top level: its fields in a random order, `type` first or not, or another value.
fn frame() -> impl Strategy<Value = Result<Vec<(String, Value)>, Value>> {
    let frame = prop::sample::select(templates()).prop_flat_map(|template| {
        let Value::Object(mut map) = template else { unreachable!("client vectors are objects") };
        let kind = map.remove("type").unwrap_or(Value::Null);
        let extra = prop::option::of(("[a-z_]{1,8}", any_value()));
        (mutated(kind), mutated(Value::Object(map)), extra, any::<prop::sample::Index>(), any::<bool>())
    });
    let frame = frame.prop_map(|(kind, rest, extra, at, type_first)| {
        let mut fields: Vec<(String, Value)> = match rest {
            Some(Value::Object(map)) => map.into_iter().collect(),
            _ => Vec::new(),
        };
        fields.extend(extra);
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        fields.dedup_by(|a, b| a.0 == b.0);
        if !fields.is_empty() {
            let n = at.index(fields.len());
            fields.rotate_left(n);
        }
        if let Some(kind) = kind {
            fields.retain(|(k, _)| k != "type");
            if type_first {
                fields.insert(0, ("type".into(), kind));
            } else {
                fields.push(("type".into(), kind));
            }
        }
        Ok(fields)
    });
    prop_oneof![20 => frame, 1 => any_value().prop_map(Err)]
}

/// The frame as JSON text and as MessagePack, keys in the given order.
fn encode_both(frame: &Result<Vec<(String, Value)>, Value>) -> (Vec<u8>, Vec<u8>) {
    match frame {
        Err(value) => (encode(Encoding::Json, value), encode(Encoding::MsgPack, value)),
        Ok(fields) => {
            let entries: Vec<String> = fields.iter().map(|(k, v)| format!("{}:{}", Value::from(k.as_str()), v)).collect();
            let json = format!("{{{}}}", entries.join(",")).into_bytes();
            let mut msgpack = Vec::new();
            rmp::encode::write_map_len(&mut msgpack, fields.len() as u32).unwrap();
            for (k, v) in fields {
                rmp::encode::write_str(&mut msgpack, k).unwrap();
                msgpack.extend(encode(Encoding::MsgPack, v));
            }
            (json, msgpack)
        }
    }
}

fn outcome(decoded: Result<protocol::ClientFrame, DecodeError>) -> Result<protocol::ClientFrame, protocol::ErrorCode> {
    decoded.map_err(|e| e.code())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    #[test]
    fn json_and_msgpack_decode_alike(frame in frame()) {
        let (json, msgpack) = encode_both(&frame);
        let from_json = outcome(decode_client(Encoding::Json, &json));
        let from_msgpack = outcome(decode_client(Encoding::MsgPack, &msgpack));
        prop_assert_eq!(&from_json, &from_msgpack, "JSON {}", String::from_utf8_lossy(&json));
    }
}

/// The cases the property found, kept as plain examples: `null` is not an empty object
/// (MessagePack `nil` was read as `{}` when `type` came first), absent `fields` is.
#[test]
fn null_is_not_an_empty_object() {
    let push = |change: Value| -> Result<Vec<(String, Value)>, Value> {
        Ok(vec![
            ("type".into(), "push".into()),
            ("id".into(), 1.into()),
            ("batch_id".into(), "0193304f-a001-7b3c-9d2e-1f0a2b3c4d01".into()),
            ("changes".into(), Value::Array(vec![change])),
        ])
    };
    let change = serde_json::json!({
        "change_id": "0193304f-9e4b-7c61-a2d8-5b7c9e1f3b01", "device_seq": 1, "table": "t", "op": "upsert",
        "key": {"id": 1}, "fields": {"a": 1}, "hlc": {"wall_ms": 1, "counter": 0}});
    let with = |name: &str, value: Option<Value>| {
        let mut change = change.clone();
        match value {
            Some(value) => change[name] = value,
            None => drop(change.as_object_mut().unwrap().remove(name)),
        }
        encode_both(&push(change))
    };
    for (json, msgpack) in [with("fields", Some(Value::Null)), with("key", Some(Value::Null))] {
        for (encoding, bytes) in [(Encoding::Json, json), (Encoding::MsgPack, msgpack)] {
            let decoded = decode_client(encoding, &bytes);
            assert!(matches!(&decoded, Err(e) if e.code() == protocol::ErrorCode::MalformedFrame), "{encoding:?}: {decoded:?}");
        }
    }
    let (json, msgpack) = with("fields", None);
    for (encoding, bytes) in [(Encoding::Json, json), (Encoding::MsgPack, msgpack)] {
        match decode_client(encoding, &bytes) {
            Ok(protocol::ClientFrame::Push { changes, .. }) => assert_eq!(changes[0].fields, Map::new(), "{encoding:?}"),
            other => panic!("{encoding:?}: absent fields are {{}}, got {other:?}"),
        }
    }
}
