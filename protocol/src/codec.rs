//! Encoding and decoding of frames: JSON in text frames, MessagePack (named fields,
//! human-readable ids) in binary frames, one serde model for both.

use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

use crate::type_first::{TypeFirst, TypeFirstVisitor};

use crate::{ClientFrame, ErrorCode, ServerFrame};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// UTF-8 JSON, sent in WebSocket text frames.
    Json,
    /// MessagePack with named fields, sent in WebSocket binary frames.
    MsgPack,
}

/// Why a frame could not be decoded; maps onto a wire [`ErrorCode`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("unknown frame type `{0}`")]
    UnknownType(String),
}

impl DecodeError {
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::Malformed(_) => ErrorCode::MalformedFrame,
            DecodeError::UnknownType(_) => ErrorCode::UnknownType,
        }
    }
}

/// Just enough of a frame to tell an unknown `type` from a malformed frame.
#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: String,
}

/// Every `type` of [`ClientFrame`] and [`ServerFrame`]: a frame of one of these that does not
/// decode is malformed, any other type is unknown (which a reader may skip).
pub const CLIENT_TYPES: &[&str] = &["hello", "push", "auth", "resume", "snapshot", "ping", "subscribe", "unsubscribe"];
pub const SERVER_TYPES: &[&str] = &[
    "welcome",
    "ack",
    "catch_up",
    "up_to_date",
    "delta",
    "must_resync",
    "snapshot_page",
    "auth_ok",
    "pong",
    "error",
    "subscribed",
    "sub_rows",
    "sub_delta",
    "presence",
    "presence_diff",
    "conflict",
    "unsubscribed",
    "broadcast",
];

/// How deep arrays and maps of a MessagePack frame may nest: JSON's limit (serde_json's
/// recursion limit). The reader recurses once per level; rmp-serde's own limit of 1024 let a
/// frame of about 1 KB overflow the stack of the thread that read it.
pub const MAX_MSGPACK_DEPTH: usize = 128;

fn msgpack_reader(bytes: &[u8]) -> rmp_serde::Deserializer<rmp_serde::decode::ReadRefReader<'_, [u8]>, rmp_serde::config::HumanReadableConfig<rmp_serde::config::DefaultConfig>> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes).with_human_readable();
    de.set_max_depth(MAX_MSGPACK_DEPTH);
    de
}

/// Decode a frame (or any value) in `encoding` as `T`: a reader that needs only part of a
/// frame decodes it into a view of its own, whose unknown keys are skipped unparsed.
pub fn decode_value<T: DeserializeOwned>(encoding: Encoding, bytes: &[u8]) -> Result<T, String> {
    match encoding {
        Encoding::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
        Encoding::MsgPack => T::deserialize(&mut msgpack_reader(bytes)).map_err(|e| e.to_string()),
    }
}

/// `Some(frame)` when `type` is the frame's first key (read without buffering the frame),
/// `None` when it is not.
fn decode_type_first<T: TypeFirst>(encoding: Encoding, bytes: &[u8]) -> Result<Option<T>, String> {
    let visitor = TypeFirstVisitor::<T>(PhantomData);
    match encoding {
        Encoding::Json => {
            let mut de = serde_json::Deserializer::from_slice(bytes);
            let frame = de.deserialize_map(visitor).map_err(|e| e.to_string())?;
            de.end().map_err(|e| e.to_string())?;
            Ok(frame)
        }
        Encoding::MsgPack => msgpack_reader(bytes).deserialize_map(visitor).map_err(|e| e.to_string()),
    }
}

fn decode_frame<T: DeserializeOwned + TypeFirst>(encoding: Encoding, bytes: &[u8], known: &[&str]) -> Result<T, DecodeError> {
    let decoded = match decode_type_first::<T>(encoding, bytes) {
        Ok(Some(frame)) => Ok(frame),
        // The derived decoding would take an integer `type` as a variant's index, as
        // MessagePack's reader offers it where JSON's refuses: a type is a name in both.
        Ok(None) => decode_value::<Envelope>(encoding, bytes).and_then(|_| decode_value::<T>(encoding, bytes)),
        Err(message) => Err(message),
    };
    decoded.map_err(|message| {
        // Only on the error path: find out whether the type tag was the problem.
        match decode_value::<Envelope>(encoding, bytes) {
            Ok(env) if !known.contains(&env.kind.as_str()) => DecodeError::UnknownType(env.kind),
            _ => DecodeError::Malformed(message),
        }
    })
}

/// Serialize any value the way frames are serialized.
pub fn encode<T: Serialize>(encoding: Encoding, value: &T) -> Vec<u8> {
    match encoding {
        // unwrap: our frame types contain only maps with string keys, which always encode.
        Encoding::Json => serde_json::to_vec(value).expect("frame encodes as JSON"),
        Encoding::MsgPack => {
            let mut buf = Vec::with_capacity(128);
            let mut ser = rmp_serde::Serializer::new(&mut buf).with_struct_map().with_human_readable();
            value.serialize(&mut ser).expect("frame encodes as MessagePack");
            buf
        }
    }
}

/// The `id` of a frame that did not decode (unknown `type`, a missing or mistyped field),
/// when the frame is an object with a u64 `id`: the error reply echoes it.
pub fn peek_request_id(encoding: Encoding, bytes: &[u8]) -> Option<u64> {
    decode_value::<serde_json::Value>(encoding, bytes).ok()?.get("id")?.as_u64()
}

pub fn decode_client(encoding: Encoding, bytes: &[u8]) -> Result<ClientFrame, DecodeError> {
    decode_frame(encoding, bytes, CLIENT_TYPES)
}

pub fn decode_server(encoding: Encoding, bytes: &[u8]) -> Result<ServerFrame, DecodeError> {
    decode_frame(encoding, bytes, SERVER_TYPES)
}

pub fn encode_client(encoding: Encoding, frame: &ClientFrame) -> Vec<u8> {
    encode(encoding, frame)
}

pub fn encode_server(encoding: Encoding, frame: &ServerFrame) -> Vec<u8> {
    encode(encoding, frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;
    use serde_json::{json, Value};

    fn sample_push() -> ClientFrame {
        let mut key = Object::new();
        key.insert("id".into(), json!("9f1c"));
        let mut fields = Object::new();
        fields.insert("price_cents".into(), json!(450));
        fields.insert("name".into(), json!("Flat white"));
        ClientFrame::Push {
            id: 7,
            batch_id: uuid::Uuid::from_u128(1),
            changes: vec![Change {
                change_id: uuid::Uuid::from_u128(2),
                device_seq: 1,
                table: "products".into(),
                op: Op::Upsert,
                key,
                fields,
                hlc: Hlc { wall_ms: 1_700_000_000_000, counter: 3 },
                base_version: 0,
            }],
        }
    }

    /// A frame of a known type that does not decode is malformed, for every type: the lists
    /// of known types hold every frame (a subscribe with a bad filter was reported unknown).
    #[test]
    fn every_frame_type_is_known() {
        for kind in CLIENT_TYPES.iter().chain(SERVER_TYPES) {
            let bytes = serde_json::to_vec(&json!({"type": kind, "id": "not a number", "sub": 5})).unwrap();
            let decoded = if CLIENT_TYPES.contains(kind) {
                decode_client(Encoding::Json, &bytes).map(|_| ())
            } else {
                decode_server(Encoding::Json, &bytes).map(|_| ())
            };
            assert!(matches!(decoded, Err(DecodeError::Malformed(_))), "{kind}: {decoded:?}");
        }
        let subscribe = json!({"type": "subscribe", "id": 1, "sub": "s", "table": "t", "filter": [{"column": "a", "op": "like", "value": 1}]});
        let bytes = serde_json::to_vec(&subscribe).unwrap();
        assert!(matches!(decode_client(Encoding::Json, &bytes), Err(DecodeError::Malformed(_))));
        let unknown = serde_json::to_vec(&json!({"type": "teleport", "id": 1})).unwrap();
        assert!(matches!(decode_client(Encoding::Json, &unknown), Err(DecodeError::UnknownType(t)) if t == "teleport"));
    }

    #[test]
    fn both_encodings_round_trip() {
        for enc in [Encoding::Json, Encoding::MsgPack] {
            let frame = sample_push();
            let bytes = encode_client(enc, &frame);
            assert_eq!(decode_client(enc, &bytes).unwrap(), frame);
        }
    }

    #[test]
    fn msgpack_uses_named_fields_and_string_uuids() {
        let bytes = encode_client(Encoding::MsgPack, &sample_push());
        let value: serde_json::Value = decode_value(Encoding::MsgPack, &bytes).unwrap();
        assert_eq!(value["type"], "push");
        assert_eq!(value["batch_id"], "00000000-0000-0000-0000-000000000001");
    }

    /// Every golden vector decodes the same by the type-first path as by the derived one, so
    /// the mirror enums of `type_first` keep the frames' serde attributes.
    #[test]
    fn type_first_decoding_agrees_with_the_derived_one_on_every_vector() {
        fn agree<T: TypeFirst + DeserializeOwned + PartialEq + std::fmt::Debug>(enc: Encoding, bytes: &[u8], name: &str) {
            let derived: T = decode_value(enc, bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            let fast = decode_type_first::<T>(enc, bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(fast.as_ref(), Some(&derived), "{name}");
        }
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
        let mut checked = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let enc = match path.extension().and_then(|e| e.to_str()) {
                Some("json") => Encoding::Json,
                Some("msgpack") => Encoding::MsgPack,
                _ => continue,
            };
            let bytes = std::fs::read(&path).unwrap();
            if name.starts_with("client_") {
                agree::<ClientFrame>(enc, &bytes, &name);
            } else if name.starts_with("server_") {
                agree::<ServerFrame>(enc, &bytes, &name);
            } else {
                continue;
            }
            checked += 1;
        }
        assert!(checked >= 60, "only {checked} vectors found");
    }

    #[test]
    fn frames_with_type_not_first_take_the_derived_decoding() {
        let frame = br#"{"id":3,"token":"t","type":"auth","extra":[1,{"a":2}]}"#;
        assert_eq!(decode_type_first::<ClientFrame>(Encoding::Json, frame), Ok(None));
        assert_eq!(decode_client(Encoding::Json, frame).unwrap(), ClientFrame::Auth { id: 3, token: "t".into() });
        let err = decode_client(Encoding::Json, br#"{"id":3,"type":"teleport"}"#).unwrap_err();
        assert_eq!(err, DecodeError::UnknownType("teleport".into()));
        // Type first but a field missing or unknown: the same errors as before.
        let err = decode_client(Encoding::Json, br#"{"type":"auth","id":3}"#).unwrap_err();
        assert_eq!(err.code(), ErrorCode::MalformedFrame);
        assert!(decode_client(Encoding::Json, br#"{"type":"auth","id":3,"token":"t"} x"#).is_err());
    }

    #[test]
    fn unknown_type_is_told_apart_from_malformed() {
        let err = decode_client(Encoding::Json, br#"{"type":"teleport","id":1}"#).unwrap_err();
        assert_eq!(err, DecodeError::UnknownType("teleport".into()));
        let err = decode_client(Encoding::Json, br#"{"type":"push","id":1}"#).unwrap_err();
        assert_eq!(err.code(), ErrorCode::MalformedFrame);
        let err = decode_client(Encoding::Json, b"{not json").unwrap_err();
        assert_eq!(err.code(), ErrorCode::MalformedFrame);
        let err = decode_client(Encoding::MsgPack, &[0xc1, 0x00]).unwrap_err();
        assert_eq!(err.code(), ErrorCode::MalformedFrame);
    }

    #[test]
    fn request_id_is_read_from_frames_that_do_not_decode() {
        assert_eq!(peek_request_id(Encoding::Json, br#"{"type":"teleport","id":7}"#), Some(7));
        assert_eq!(peek_request_id(Encoding::Json, br#"{"type":"push","id":8}"#), Some(8));
        assert_eq!(peek_request_id(Encoding::Json, br#"{"type":"push","id":"8"}"#), None);
        assert_eq!(peek_request_id(Encoding::Json, b"{not json"), None);
        assert_eq!(peek_request_id(Encoding::Json, b"[1]"), None);
        let bytes = encode(Encoding::MsgPack, &json!({"type": "teleport", "id": 9}));
        assert_eq!(peek_request_id(Encoding::MsgPack, &bytes), Some(9));
        assert_eq!(peek_request_id(Encoding::MsgPack, &[0xc1, 0x00]), None);
        assert_eq!(peek_request_id(Encoding::MsgPack, &encode(Encoding::MsgPack, &json!([9]))), None);
    }

    /// A subscribe whose filter value is `depth` arrays deep.
    fn nested_filter(depth: usize) -> Value {
        let mut value = json!(null);
        for _ in 0..depth {
            value = json!([value]);
        }
        json!({"type": "subscribe", "id": 4, "sub": "s", "table": "products", "filter": [{"column": "a", "op": "eq", "value": value}]})
    }

    /// MessagePack nests as deep as JSON does and no deeper, and a frame nested past that is
    /// malformed, not a stack overflow: a MessagePack array of arrays a thousand deep overflowed
    /// a 2 MiB stack in a debug build, as the filter value of a subscribe, in an unknown field,
    /// and when the hub looked for the id of the frame that did not decode.
    #[test]
    fn frames_nested_past_the_limit_are_malformed_in_both_encodings() {
        // The frame, the filter list, the condition and the innermost array's null take four
        // levels: both encodings read 124 arrays there, and refuse 125.
        let fits = nested_filter(MAX_MSGPACK_DEPTH - 4);
        let deep = nested_filter(MAX_MSGPACK_DEPTH - 3);
        for encoding in [Encoding::Json, Encoding::MsgPack] {
            let bytes = encode(encoding, &fits);
            assert!(decode_client(encoding, &bytes).is_ok(), "{encoding:?}");
            let bytes = match encoding {
                // serde_json writes values of any depth; only its reader has the limit.
                Encoding::Json => serde_json::to_vec(&deep).unwrap(),
                Encoding::MsgPack => encode(encoding, &deep),
            };
            assert_eq!(decode_client(encoding, &bytes).map_err(|e| e.code()), Err(ErrorCode::MalformedFrame), "{encoding:?}");
        }
        let thousand = |prefix: &[u8]| {
            let mut bytes = prefix.to_vec();
            bytes.extend(std::iter::repeat(0x91).take(1000));
            bytes.push(0xc0);
            bytes
        };
        // A ping with such an unknown field `x`; a subscribe with such a filter value (the
        // frame's map is written last, with its `value` left out); an array that is no frame.
        let ping = thousand(&[0x83, 0xa4, b't', b'y', b'p', b'e', 0xa4, b'p', b'i', b'n', b'g', 0xa2, b'i', b'd', 0x07, 0xa1, b'x']);
        let mut head = encode(Encoding::MsgPack, &json!({"type": "subscribe", "id": 4, "sub": "s", "table": "products", "filter": [{"column": "a", "op": "eq"}]}));
        let last_map = head.iter().rposition(|b| *b == 0x82).unwrap();
        head[last_map] = 0x83;
        head.extend([0xa5, b'v', b'a', b'l', b'u', b'e']);
        let filter = thousand(&head);
        let array = thousand(&[]);
        let read = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                for bytes in [&ping, &filter, &array] {
                    assert_eq!(decode_client(Encoding::MsgPack, bytes).map_err(|e| e.code()), Err(ErrorCode::MalformedFrame));
                    assert_eq!(peek_request_id(Encoding::MsgPack, bytes), None);
                }
            })
            .unwrap()
            .join();
        assert!(read.is_ok());
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let frame = decode_client(Encoding::Json, br#"{"type":"ping","id":5,"future":true}"#).unwrap();
        assert_eq!(frame, ClientFrame::Ping { id: 5 });
    }

    #[test]
    fn enums_are_read_by_the_names_they_are_written_with() {
        fn check<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug + Copy>(names: &[(&str, T)]) {
            for (name, value) in names {
                assert_eq!(serde_json::to_value(value).unwrap(), json!(name));
                for encoding in [Encoding::Json, Encoding::MsgPack] {
                    assert_eq!(decode_value::<T>(encoding, &encode(encoding, name)).as_ref(), Ok(value), "{encoding:?} {name}");
                    // Not the variant's index, nor the map form `{"name": null}`.
                    assert!(decode_value::<T>(encoding, &encode(encoding, &0)).is_err(), "{encoding:?}");
                    assert!(decode_value::<T>(encoding, &encode(encoding, &json!({*name: null}))).is_err(), "{encoding:?}");
                }
            }
            assert!(decode_value::<T>(Encoding::Json, b"\"teleport\"").is_err());
        }
        check(Op::NAMES);
        check(SessionMode::NAMES);
        check(Channel::NAMES);
        check(FilterOp::NAMES);
        assert_eq!(FilterOp::NAMES.len(), 7);
    }

    #[test]
    fn error_code_spelling_matches_serde() {
        for code in [ErrorCode::SeqGap, ErrorCode::TenantMismatch, ErrorCode::MalformedFrame, ErrorCode::Busy] {
            assert_eq!(serde_json::to_value(code).unwrap(), json!(code.as_str()));
        }
    }

    #[test]
    fn a_borrowed_catch_up_page_encodes_like_the_owned_frame() {
        let delta = |seq: u64| Delta {
            seq,
            table: "products".into(),
            op: Op::Upsert,
            key: json!({"id": "a1"}).as_object().unwrap().clone(),
            row: Some(json!({"id": "a1", "name": "Tea", "price_cents": 300}).as_object().unwrap().clone()),
            old: Some(json!({"price_cents": 250}).as_object().unwrap().clone()),
            origin: Some("pos-1".into()),
            change_id: Some(uuid::Uuid::from_u128(seq as u128)),
            left: false,
        };
        let deltas = vec![delta(4), delta(5)];
        let owned = ServerFrame::CatchUp { deltas: deltas.clone(), seq: 5, head_seq: 9 };
        let borrowed = CatchUpRef { deltas: deltas.iter().collect(), seq: 5, head_seq: 9 };
        for encoding in [Encoding::Json, Encoding::MsgPack] {
            assert_eq!(encode(encoding, &borrowed), encode_server(encoding, &owned), "{encoding:?}");
        }
    }
}
