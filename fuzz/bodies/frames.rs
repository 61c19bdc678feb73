//! What must hold for any bytes a client (or, for the load tester and client libraries, the
//! hub) sends as a frame: decoding never panics, a decoded frame re-encodes to itself in both
//! encodings, and a value decodes alike whether it came as JSON or as MessagePack, with its
//! `type` key first (the fast path) or elsewhere (serde's derived decoding).

// Each includer uses a part: the fuzz targets leave out the seeds.
#![allow(dead_code)]

use std::fmt::Debug;

use protocol::codec::{self, DecodeError, Encoding, CLIENT_TYPES, SERVER_TYPES};
use serde::de::DeserializeOwned;
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::{Map, Value};

const ENCODINGS: [Encoding; 2] = [Encoding::Json, Encoding::MsgPack];

/// Body of the `frame_json` and `frame_msgpack` targets.
pub fn frame(encoding: Encoding, bytes: &[u8]) {
    check_frames(encoding, bytes, codec::decode_client, CLIENT_TYPES);
    check_frames(encoding, bytes, codec::decode_server, SERVER_TYPES);
    // Read only on the error path, but it must not panic either.
    let _ = codec::peek_request_id(encoding, bytes);
}

fn check_frames<F>(encoding: Encoding, bytes: &[u8], decode: fn(Encoding, &[u8]) -> Result<F, DecodeError>, known: &[&str])
where
    F: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let decoded = decode(encoding, bytes);
    match &decoded {
        Ok(frame) => {
            // What this crate encodes, it decodes to the same frame, in either encoding.
            for other in ENCODINGS {
                let again = codec::encode(other, frame);
                assert_eq!(decode(other, &again).as_ref(), Ok(frame), "{encoding:?} frame re-encoded as {other:?}");
            }
        }
        Err(DecodeError::UnknownType(kind)) => assert!(!known.contains(&kind.as_str()), "known type `{kind}` reported unknown"),
        Err(DecodeError::Malformed(_)) => {}
    }
    // The same value sent as JSON or as MessagePack, type first or not, decodes alike.
    let Ok(Value::Object(object)) = codec::decode_value::<Value>(encoding, bytes) else { return };
    let mut outcomes = Vec::new();
    for other in ENCODINGS {
        for type_first in [true, false] {
            let again = codec::encode(other, &Ordered { object: &object, type_first });
            outcomes.push((other, type_first, outcome(decode(other, &again))));
        }
    }
    let (_, _, first) = &outcomes[0];
    for (other, type_first, this) in &outcomes[1..] {
        assert_eq!(this, first, "{encoding:?} input as a value: {other:?} with type first {type_first} disagrees with JSON type first; value {object:?}");
    }
}

/// A decoding's result with the error text left out: encodings word their errors differently.
#[derive(Debug, PartialEq)]
enum Outcome<F> {
    Frame(F),
    Malformed,
    UnknownType(String),
}

fn outcome<F>(decoded: Result<F, DecodeError>) -> Outcome<F> {
    match decoded {
        Ok(frame) => Outcome::Frame(frame),
        Err(DecodeError::Malformed(_)) => Outcome::Malformed,
        Err(DecodeError::UnknownType(kind)) => Outcome::UnknownType(kind),
    }
}

/// An object serialized with its `type` key first or last (a `Map` alone sorts its keys).
struct Ordered<'a> {
    object: &'a Map<String, Value>,
    type_first: bool,
}

impl Serialize for Ordered<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.object.len()))?;
        let kind = self.object.get("type");
        if let (true, Some(kind)) = (self.type_first, kind) {
            map.serialize_entry("type", kind)?;
        }
        for (key, value) in self.object.iter().filter(|(key, _)| *key != "type") {
            map.serialize_entry(key, value)?;
        }
        if let (false, Some(kind)) = (self.type_first, kind) {
            map.serialize_entry("type", kind)?;
        }
        map.end()
    }
}

/// Seeds: every golden vector in `encoding` (`testdata` is protocol/testdata).
pub fn seeds(testdata: &std::path::Path, encoding: Encoding) -> Vec<(String, Vec<u8>)> {
    let extension = match encoding {
        Encoding::Json => "json",
        Encoding::MsgPack => "msgpack",
    };
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(testdata)
        .expect("protocol/testdata is readable")
        .map(|entry| entry.expect("a testdata entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == extension))
        .map(|path| (path.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&path).expect("a golden vector")))
        .collect();
    seeds.sort();
    seeds
}
