//! Phoenix channel frames as supabase-js speaks them, for serializer vsn 1.0.0 (JSON objects)
//! and 2.0.0 (JSON arrays, plus binary user broadcasts): decoding client frames and encoding
//! server frames. Pure code: bytes and text in, values and text out, no I/O.
//!
//! Ground truth: realtime-js `lib/serializer.ts` (vsn 2), `RealtimeClient.ts` (vsn 1 is plain
//! `JSON.stringify` / `JSON.parse`) and Phoenix's `V1`/`V2.JSONSerializer`.

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::Value;

/// The Phoenix serializer version a socket speaks (the `vsn` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Vsn {
    /// `1.0.0`: text frames holding JSON objects.
    V1,
    /// `2.0.0`: text frames holding JSON arrays, and binary broadcast frames.
    V2,
}

impl Vsn {
    /// `"1.0.0"` or `"2.0.0"`; anything else is a version this hub does not speak.
    pub fn parse(vsn: &str) -> Option<Vsn> {
        match vsn {
            "1.0.0" => Some(Vsn::V1),
            "2.0.0" => Some(Vsn::V2),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Vsn::V1 => "1.0.0",
            Vsn::V2 => "2.0.0",
        }
    }
}

/// One message from the client.
#[derive(Debug, Clone, PartialEq)]
pub struct Inbound {
    pub join_ref: Option<String>,
    pub msg_ref: Option<String>,
    pub topic: String,
    pub event: String,
    pub payload: InboundPayload,
}

#[derive(Debug, Clone, PartialEq)]
pub enum InboundPayload {
    Json(Value),
    /// vsn 2 binary kind 3 (user broadcast push): the server treats it as event "broadcast"
    /// with payload `{"type": "broadcast", event, payload}`.
    UserBroadcast { event: String, payload: BroadcastData, meta: Option<Value> },
}

/// A user broadcast's own payload: JSON, or (vsn 2 only) opaque bytes.
#[derive(Debug, Clone, PartialEq)]
pub enum BroadcastData {
    Json(Value),
    Binary(Bytes),
}

/// Why a client frame cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("the frame is not JSON: {0}")]
    NotJson(String),
    #[error("wrong frame shape: {0}")]
    Shape(String),
    #[error("binary frames are not part of serializer vsn 1.0.0")]
    BinaryInV1,
    #[error("binary frame kind {0} is not accepted (only 3, a user broadcast push)")]
    UnknownKind(u8),
    #[error("truncated binary frame: {needed} bytes needed, {got} present")]
    Truncated { needed: usize, got: usize },
    #[error("the binary frame's {0} is not valid UTF-8")]
    BadUtf8(&'static str),
    #[error("unknown payload encoding {0} (0 = binary, 1 = JSON)")]
    UnknownEncoding(u8),
    #[error("the binary frame's {field} is not valid JSON: {detail}")]
    BadJson { field: &'static str, detail: String },
}

const KIND_USER_BROADCAST_PUSH: u8 = 3;
const KIND_USER_BROADCAST: u8 = 4;
const ENCODING_BINARY: u8 = 0;
const ENCODING_JSON: u8 = 1;
/// The event a binary user broadcast stands for.
const BROADCAST_EVENT: &str = "broadcast";

/// Reads a client text frame: vsn 1 `{"join_ref","ref","topic","event","payload"}`, vsn 2
/// `[join_ref, ref, topic, event, payload]`.
pub fn decode_text(vsn: Vsn, text: &str) -> Result<Inbound, WireError> {
    let frame: Value = serde_json::from_str(text).map_err(|e| WireError::NotJson(e.to_string()))?;
    match vsn {
        Vsn::V1 => decode_v1(frame),
        Vsn::V2 => decode_v2(frame),
    }
}

fn decode_v1(frame: Value) -> Result<Inbound, WireError> {
    let Value::Object(mut map) = frame else {
        return Err(shape("vsn 1.0.0 expects a JSON object {topic, event, payload, ref, join_ref}"));
    };
    // As Phoenix's V1 serializer: topic, event and payload are required; the refs may be
    // absent (a vsn 1 client sends `join_ref` only on channel messages).
    let join_ref = optional_string(map.remove("join_ref"), "join_ref")?;
    let msg_ref = optional_string(map.remove("ref"), "ref")?;
    let topic = required_string(map.remove("topic"), "topic")?;
    let event = required_string(map.remove("event"), "event")?;
    let payload = map.remove("payload").ok_or_else(|| shape("the frame has no payload"))?;
    Ok(Inbound { join_ref, msg_ref, topic, event, payload: InboundPayload::Json(payload) })
}

fn decode_v2(frame: Value) -> Result<Inbound, WireError> {
    let Value::Array(items) = frame else {
        return Err(shape("vsn 2.0.0 expects a JSON array [join_ref, ref, topic, event, payload]"));
    };
    // Phoenix's V2 serializer matches `[join_ref, ref, topic, event, payload | _]`: extra
    // elements are ignored, fewer are an error.
    if items.len() < 5 {
        return Err(shape(&format!(
            "vsn 2.0.0 expects [join_ref, ref, topic, event, payload], got {} elements",
            items.len()
        )));
    }
    let mut items = items.into_iter();
    let join_ref = optional_string(items.next(), "join_ref")?;
    let msg_ref = optional_string(items.next(), "ref")?;
    let topic = required_string(items.next(), "topic")?;
    let event = required_string(items.next(), "event")?;
    let payload = items.next().unwrap_or(Value::Null); // present: the length was checked
    Ok(Inbound { join_ref, msg_ref, topic, event, payload: InboundPayload::Json(payload) })
}

fn shape(why: &str) -> WireError {
    WireError::Shape(why.to_owned())
}

fn optional_string(value: Option<Value>, field: &str) -> Result<Option<String>, WireError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        // Refs are echoed back; turning a number into a string would change what the client
        // compares its ref with, so anything but a string is refused.
        Some(other) => Err(shape(&format!("{field} must be a string or null, not {}", json_kind(&other)))),
    }
}

fn required_string(value: Option<Value>, field: &str) -> Result<String, WireError> {
    match value {
        Some(Value::String(s)) => Ok(s),
        None => Err(shape(&format!("the frame has no {field}"))),
        Some(other) => Err(shape(&format!("{field} must be a string, not {}", json_kind(&other)))),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Reads a client binary frame: only vsn 2 kind 3, a user broadcast push, as
/// `_encodeUserBroadcastPush` builds it: `3, join_ref_len, ref_len, topic_len, event_len,
/// meta_len, encoding, join_ref, ref, topic, event, meta, payload`. Its event is `broadcast`.
pub fn decode_binary(vsn: Vsn, bytes: &[u8]) -> Result<Inbound, WireError> {
    if vsn == Vsn::V1 {
        return Err(WireError::BinaryInV1);
    }
    let Some(&kind) = bytes.first() else {
        return Err(WireError::Truncated { needed: 1, got: 0 });
    };
    if kind != KIND_USER_BROADCAST_PUSH {
        return Err(WireError::UnknownKind(kind));
    }
    const HEADER: usize = 7;
    let Some(header) = bytes.get(..HEADER) else {
        return Err(WireError::Truncated { needed: HEADER, got: bytes.len() });
    };
    let lengths = [header[1], header[2], header[3], header[4], header[5]].map(usize::from);
    let encoding = header[6];
    let needed = HEADER + lengths.iter().sum::<usize>();
    if bytes.len() < needed {
        return Err(WireError::Truncated { needed, got: bytes.len() });
    }
    let mut rest = &bytes[HEADER..];
    let mut field = |len: usize| {
        let (head, tail) = rest.split_at(len);
        rest = tail;
        head
    };
    let [join_ref, msg_ref, topic, event, meta] = lengths.map(&mut field);
    let payload = rest;

    // The client writes a missing ref as zero bytes.
    let join_ref = Some(utf8(join_ref, "join_ref")?).filter(|s| !s.is_empty()).map(str::to_owned);
    let msg_ref = Some(utf8(msg_ref, "ref")?).filter(|s| !s.is_empty()).map(str::to_owned);
    let topic = utf8(topic, "topic")?.to_owned();
    let user_event = utf8(event, "event")?.to_owned();
    // Empty metadata means none; otherwise it is always JSON.
    let meta = if meta.is_empty() { None } else { Some(json(meta, "meta")?) };
    let payload = match encoding {
        ENCODING_BINARY => BroadcastData::Binary(Bytes::copy_from_slice(payload)),
        ENCODING_JSON => BroadcastData::Json(json(payload, "payload")?),
        other => return Err(WireError::UnknownEncoding(other)),
    };
    Ok(Inbound {
        join_ref,
        msg_ref,
        topic,
        event: BROADCAST_EVENT.to_owned(),
        payload: InboundPayload::UserBroadcast { event: user_event, payload, meta },
    })
}

fn utf8<'a>(bytes: &'a [u8], field: &'static str) -> Result<&'a str, WireError> {
    std::str::from_utf8(bytes).map_err(|_| WireError::BadUtf8(field))
}

fn json(bytes: &[u8], field: &'static str) -> Result<Value, WireError> {
    serde_json::from_slice(bytes).map_err(|e| WireError::BadJson { field, detail: e.to_string() })
}

/// A server text frame. vsn 1: `{"join_ref","ref","topic","event","payload"}`; vsn 2:
/// `[join_ref, ref, topic, event, payload]`; absent refs are `null`. `payload_json` must be
/// JSON text already (spliced as is, so a rendered payload is not serialized twice).
///
/// Phoenix's V1 serializer leaves `join_ref` out; the vsn 1 client (`JSON.parse`) reads
/// `msg.join_ref`, where `null` and absent act alike (`isMember` skips a falsy join_ref), and a
/// join_ref given lets it drop stale frames as in vsn 2.
pub fn encode_text(
    vsn: Vsn,
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    event: &str,
    payload_json: &str,
) -> String {
    debug_assert!(
        serde_json::from_str::<serde::de::IgnoredAny>(payload_json).is_ok(),
        "payload_json is not JSON: {payload_json}"
    );
    let mut out = String::with_capacity(payload_json.len() + topic.len() + event.len() + 64);
    let (open, close) = if vsn == Vsn::V1 { ('{', '}') } else { ('[', ']') };
    // vsn 1 fields are keyed; vsn 2 fields are positional in the same order.
    let key = |out: &mut String, name: &str| {
        if vsn == Vsn::V1 {
            out.push('"');
            out.push_str(name);
            out.push_str("\":");
        }
    };
    out.push(open);
    key(&mut out, "join_ref");
    push_optional_string(&mut out, join_ref);
    out.push(',');
    key(&mut out, "ref");
    push_optional_string(&mut out, msg_ref);
    out.push(',');
    key(&mut out, "topic");
    push_json_string(&mut out, topic);
    out.push(',');
    key(&mut out, "event");
    push_json_string(&mut out, event);
    out.push(',');
    key(&mut out, "payload");
    out.push_str(payload_json);
    out.push(close);
    out
}

fn push_optional_string(out: &mut String, value: Option<&str>) {
    match value {
        Some(s) => push_json_string(out, s),
        None => out.push_str("null"),
    }
}

fn push_json_string(out: &mut String, s: &str) {
    // serde_json's escaping is exact JSON; serializing a string cannot fail.
    out.push_str(&serde_json::to_string(s).expect("a string always serializes"));
}

/// A vsn 2 binary kind 4 broadcast to the client: `4, topic_len, event_len, meta_len,
/// encoding, topic, event, meta, payload`. `None` when the topic, event or meta exceeds 255
/// bytes (the lengths are single bytes): the caller then sends a JSON text frame instead.
pub fn encode_user_broadcast(
    topic: &str,
    event: &str,
    meta_json: Option<&str>,
    payload: &BroadcastData,
) -> Option<Bytes> {
    let meta = meta_json.unwrap_or("");
    let topic_len = u8::try_from(topic.len()).ok()?;
    let event_len = u8::try_from(event.len()).ok()?;
    let meta_len = u8::try_from(meta.len()).ok()?;
    let (encoding, body) = match payload {
        // Writing a Value to memory cannot fail (its map keys are strings, its numbers finite).
        BroadcastData::Json(value) => (ENCODING_JSON, Bytes::from(serde_json::to_vec(value).ok()?)),
        BroadcastData::Binary(bytes) => (ENCODING_BINARY, bytes.clone()),
    };
    let mut out = BytesMut::with_capacity(5 + topic.len() + event.len() + meta.len() + body.len());
    out.put_slice(&[KIND_USER_BROADCAST, topic_len, event_len, meta_len, encoding]);
    out.put_slice(topic.as_bytes());
    out.put_slice(event.as_bytes());
    out.put_slice(meta.as_bytes());
    out.put_slice(&body);
    Some(out.freeze())
}

/// The JSON text of a `phx_reply` payload: `{"status": "ok"|"error", "response": <response>}`.
pub fn reply_payload(ok: bool, response_json: &str) -> String {
    let status = if ok { "ok" } else { "error" };
    format!(r#"{{"status":"{status}","response":{response_json}}}"#)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// A kind 3 frame exactly as realtime-js `_encodeUserBroadcastPush` builds it: UTF-8 byte
    /// lengths, missing refs as empty strings, metadata empty unless allowed keys are present.
    fn js_user_broadcast_push(
        join_ref: Option<&str>,
        msg_ref: Option<&str>,
        topic: &str,
        event: &str,
        meta: &str,
        encoding: u8,
        payload: &[u8],
    ) -> Vec<u8> {
        let join_ref = join_ref.unwrap_or("").as_bytes();
        let msg_ref = msg_ref.unwrap_or("").as_bytes();
        let mut frame = vec![
            3,
            join_ref.len() as u8,
            msg_ref.len() as u8,
            topic.len() as u8,
            event.len() as u8,
            meta.len() as u8,
            encoding,
        ];
        for part in [join_ref, msg_ref, topic.as_bytes(), event.as_bytes(), meta.as_bytes(), payload] {
            frame.extend_from_slice(part);
        }
        frame
    }

    /// realtime-js `_decodeUserBroadcast`: what the client makes of a kind 4 frame.
    fn js_decode_user_broadcast(frame: &[u8]) -> (String, Value) {
        assert_eq!(frame[0], 4);
        let (topic_len, event_len, meta_len, encoding) =
            (frame[1] as usize, frame[2] as usize, frame[3] as usize, frame[4]);
        let mut offset = 5;
        let topic = std::str::from_utf8(&frame[offset..offset + topic_len]).unwrap().to_owned();
        offset += topic_len;
        let event = std::str::from_utf8(&frame[offset..offset + event_len]).unwrap().to_owned();
        offset += event_len;
        let meta = &frame[offset..offset + meta_len];
        offset += meta_len;
        let payload = &frame[offset..];
        let payload = if encoding == 1 {
            serde_json::from_slice(payload).unwrap()
        } else {
            json!(payload.to_vec())
        };
        let mut data = json!({"type": "broadcast", "event": event, "payload": payload});
        if meta_len > 0 {
            data["meta"] = serde_json::from_slice(meta).unwrap();
        }
        (topic, data)
    }

    #[test]
    fn vsn_parses_only_the_two_versions() {
        assert_eq!(Vsn::parse("1.0.0"), Some(Vsn::V1));
        assert_eq!(Vsn::parse("2.0.0"), Some(Vsn::V2));
        for bad in ["", "1", "2.0", "3.0.0", " 2.0.0", "2.0.0 "] {
            assert_eq!(Vsn::parse(bad), None, "{bad:?}");
        }
        assert_eq!(Vsn::parse(Vsn::V2.as_str()), Some(Vsn::V2));
        assert_eq!(Vsn::parse(Vsn::V1.as_str()), Some(Vsn::V1));
    }

    #[test]
    fn reads_a_vsn2_join_as_serializer_ts_writes_it() {
        // JSON.stringify([msg.join_ref, msg.ref, msg.topic, msg.event, msg.payload])
        let text = r#"["1","1","realtime:room1","phx_join",{"config":{"broadcast":{"ack":false,"self":false},"presence":{"key":"","enabled":false},"postgres_changes":[],"private":false}}]"#;
        let msg = decode_text(Vsn::V2, text).unwrap();
        assert_eq!(msg.join_ref.as_deref(), Some("1"));
        assert_eq!(msg.msg_ref.as_deref(), Some("1"));
        assert_eq!(msg.topic, "realtime:room1");
        assert_eq!(msg.event, "phx_join");
        let InboundPayload::Json(payload) = msg.payload else { panic!("not JSON") };
        assert_eq!(payload["config"]["presence"]["enabled"], json!(false));
    }

    #[test]
    fn reads_a_vsn2_heartbeat_with_a_null_join_ref() {
        let msg = decode_text(Vsn::V2, r#"[null,"5","phoenix","heartbeat",{}]"#).unwrap();
        assert_eq!(
            msg,
            Inbound {
                join_ref: None,
                msg_ref: Some("5".into()),
                topic: "phoenix".into(),
                event: "heartbeat".into(),
                payload: InboundPayload::Json(json!({})),
            }
        );
    }

    #[test]
    fn reads_vsn1_objects_with_or_without_join_ref() {
        // RealtimeClient vsn 1 encode: JSON.stringify({topic, event, payload, ref, join_ref}).
        let msg = decode_text(
            Vsn::V1,
            r#"{"topic":"realtime:room1","event":"broadcast","payload":{"type":"broadcast","event":"e","payload":{"n":1}},"ref":"3","join_ref":"1"}"#,
        )
        .unwrap();
        assert_eq!(msg.join_ref.as_deref(), Some("1"));
        assert_eq!(msg.msg_ref.as_deref(), Some("3"));
        assert_eq!(msg.event, "broadcast");
        assert_eq!(msg.payload, InboundPayload::Json(json!({"type":"broadcast","event":"e","payload":{"n":1}})));

        let heartbeat = decode_text(Vsn::V1, r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"7"}"#).unwrap();
        assert_eq!(heartbeat.join_ref, None);
        assert_eq!(heartbeat.msg_ref.as_deref(), Some("7"));
    }

    #[test]
    fn vsn2_ignores_elements_after_the_payload_as_phoenix_does() {
        let msg = decode_text(Vsn::V2, r#"[null,"1","phoenix","heartbeat",{},"extra"]"#).unwrap();
        assert_eq!(msg.payload, InboundPayload::Json(json!({})));
    }

    #[test]
    fn refuses_malformed_text() {
        let cases: &[(Vsn, &str)] = &[
            (Vsn::V2, ""),
            (Vsn::V2, "not json"),
            (Vsn::V2, r#"["1","1","t","e"#),
            (Vsn::V2, r#"{"topic":"t","event":"e","payload":{},"ref":"1"}"#), // a vsn 1 frame
            (Vsn::V2, r#"["1","1","t","e"]"#),
            (Vsn::V2, r#"[1,"1","t","e",{}]"#),
            (Vsn::V2, r#"["1",2,"t","e",{}]"#),
            (Vsn::V2, r#"["1","1",null,"e",{}]"#),
            (Vsn::V2, r#"["1","1","t",{},{}]"#),
            (Vsn::V1, r#"["1","1","t","e",{}]"#), // a vsn 2 frame
            (Vsn::V1, r#"{"event":"e","payload":{},"ref":"1"}"#),
            (Vsn::V1, r#"{"topic":"t","payload":{},"ref":"1"}"#),
            (Vsn::V1, r#"{"topic":"t","event":"e","ref":"1"}"#),
            (Vsn::V1, r#"{"topic":"t","event":"e","payload":{},"ref":1}"#),
            (Vsn::V1, r#"{"topic":"t","event":"e","payload":{},"join_ref":[]}"#),
            (Vsn::V1, "42"),
        ];
        for (vsn, text) in cases {
            let err = decode_text(*vsn, text).expect_err(text);
            assert!(matches!(err, WireError::NotJson(_) | WireError::Shape(_)), "{text}: {err}");
        }
        assert!(matches!(decode_text(Vsn::V2, "nope"), Err(WireError::NotJson(_))));
        let err = decode_text(Vsn::V1, r#"{"topic":"t","event":"e","payload":{},"ref":1}"#).unwrap_err();
        assert_eq!(err.to_string(), "wrong frame shape: ref must be a string or null, not a number");
    }

    #[test]
    fn reads_a_json_user_broadcast_push() {
        // channel.send({type: 'broadcast', event: 'cursor', payload: {x: 1}}) with ack off.
        let frame = js_user_broadcast_push(Some("1"), Some("2"), "realtime:room1", "cursor", "", 1, br#"{"x":1}"#);
        let msg = decode_binary(Vsn::V2, &frame).unwrap();
        assert_eq!(
            msg,
            Inbound {
                join_ref: Some("1".into()),
                msg_ref: Some("2".into()),
                topic: "realtime:room1".into(),
                event: "broadcast".into(),
                payload: InboundPayload::UserBroadcast {
                    event: "cursor".into(),
                    payload: BroadcastData::Json(json!({"x": 1})),
                    meta: None,
                },
            }
        );
    }

    #[test]
    fn reads_a_binary_user_broadcast_push_with_meta_and_multibyte_text() {
        let topic = "realtime:café-☕-日本";
        let event = "émoji-🎉";
        let meta = r#"{"persist":true}"#;
        let body = [0u8, 255, 1, 2, 0xC3];
        let frame = js_user_broadcast_push(Some("10"), None, topic, event, meta, 0, &body);
        // Lengths are UTF-8 byte counts, not character counts.
        assert_eq!(frame[3] as usize, topic.len());
        assert_ne!(topic.len(), topic.chars().count());
        let msg = decode_binary(Vsn::V2, &frame).unwrap();
        assert_eq!(msg.join_ref.as_deref(), Some("10"));
        assert_eq!(msg.msg_ref, None);
        assert_eq!(msg.topic, topic);
        assert_eq!(msg.event, "broadcast");
        assert_eq!(
            msg.payload,
            InboundPayload::UserBroadcast {
                event: event.into(),
                payload: BroadcastData::Binary(Bytes::copy_from_slice(&body)),
                meta: Some(json!({"persist": true})),
            }
        );
    }

    #[test]
    fn reads_an_empty_binary_payload_and_a_json_null_payload() {
        // `message.payload?.payload ?? new ArrayBuffer(0)`.
        let frame = js_user_broadcast_push(None, None, "realtime:t", "e", "", 0, b"");
        let InboundPayload::UserBroadcast { payload, .. } = decode_binary(Vsn::V2, &frame).unwrap().payload else {
            panic!("not a user broadcast")
        };
        assert_eq!(payload, BroadcastData::Binary(Bytes::new()));
        // `message.payload?.payload ?? {}` for JSON; but a JSON null still encodes as `null`.
        let frame = js_user_broadcast_push(None, None, "realtime:t", "e", "", 1, b"null");
        let InboundPayload::UserBroadcast { payload, .. } = decode_binary(Vsn::V2, &frame).unwrap().payload else {
            panic!("not a user broadcast")
        };
        assert_eq!(payload, BroadcastData::Json(Value::Null));
    }

    #[test]
    fn refuses_malformed_binary() {
        let good = js_user_broadcast_push(Some("1"), Some("2"), "realtime:t", "e", "", 1, b"{}");
        assert_eq!(decode_binary(Vsn::V1, &good), Err(WireError::BinaryInV1));
        assert_eq!(decode_binary(Vsn::V2, &[]), Err(WireError::Truncated { needed: 1, got: 0 }));
        assert_eq!(decode_binary(Vsn::V2, &[4, 0, 0, 0, 1]), Err(WireError::UnknownKind(4)));
        assert_eq!(decode_binary(Vsn::V2, &[0]), Err(WireError::UnknownKind(0)));
        assert_eq!(decode_binary(Vsn::V2, &[3, 0, 0]), Err(WireError::Truncated { needed: 7, got: 3 }));
        // The header announces more than the frame holds.
        let header_len = 7 + 1 + 1 + "realtime:t".len() + 1;
        assert_eq!(
            decode_binary(Vsn::V2, &good[..header_len - 1]),
            Err(WireError::Truncated { needed: header_len, got: header_len - 1 })
        );
        let mut bad_encoding = good.clone();
        bad_encoding[6] = 2;
        assert_eq!(decode_binary(Vsn::V2, &bad_encoding), Err(WireError::UnknownEncoding(2)));
        let bad_topic = js_user_broadcast_push(None, None, "ab", "e", "", 1, b"{}");
        let mut bad_topic = bad_topic;
        bad_topic[7] = 0xFF;
        assert_eq!(decode_binary(Vsn::V2, &bad_topic), Err(WireError::BadUtf8("topic")));
        let bad_json = js_user_broadcast_push(None, None, "t", "e", "", 1, b"{");
        assert!(matches!(decode_binary(Vsn::V2, &bad_json), Err(WireError::BadJson { field: "payload", .. })));
        let bad_meta = js_user_broadcast_push(None, None, "t", "e", "{x", 1, b"{}");
        assert!(matches!(decode_binary(Vsn::V2, &bad_meta), Err(WireError::BadJson { field: "meta", .. })));
        // A JSON payload that is not UTF-8.
        let not_utf8 = js_user_broadcast_push(None, None, "t", "e", "", 1, b"\"\xFF\"");
        assert!(matches!(decode_binary(Vsn::V2, &not_utf8), Err(WireError::BadJson { field: "payload", .. })));
    }

    #[test]
    fn error_messages_are_readable() {
        assert_eq!(
            WireError::Truncated { needed: 7, got: 3 }.to_string(),
            "truncated binary frame: 7 bytes needed, 3 present"
        );
        assert_eq!(WireError::UnknownKind(9).to_string(), "binary frame kind 9 is not accepted (only 3, a user broadcast push)");
        assert_eq!(WireError::BadUtf8("event").to_string(), "the binary frame's event is not valid UTF-8");
    }

    #[test]
    fn encodes_vsn2_arrays() {
        let reply = reply_payload(true, "{}");
        assert_eq!(
            encode_text(Vsn::V2, Some("1"), Some("1"), "realtime:room1", "phx_reply", &reply),
            r#"["1","1","realtime:room1","phx_reply",{"status":"ok","response":{}}]"#
        );
        assert_eq!(
            encode_text(Vsn::V2, None, None, "realtime:room1", "broadcast", r#"{"type":"broadcast"}"#),
            r#"[null,null,"realtime:room1","broadcast",{"type":"broadcast"}]"#
        );
    }

    #[test]
    fn encodes_vsn1_objects_with_both_ref_keys() {
        let text = encode_text(Vsn::V1, None, Some("4"), "phoenix", "phx_reply", &reply_payload(true, "{}"));
        assert_eq!(
            text,
            r#"{"join_ref":null,"ref":"4","topic":"phoenix","event":"phx_reply","payload":{"status":"ok","response":{}}}"#
        );
        // What the vsn 1 client's JSON.parse reads.
        let parsed: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["ref"], json!("4"));
        assert_eq!(parsed["join_ref"], Value::Null);
        assert_eq!(parsed["payload"]["status"], json!("ok"));
    }

    #[test]
    fn escapes_topic_and_event() {
        let topic = "realtime:a\"b\\c\n\u{1}\u{2028}é";
        let event = "ev\"</script>";
        for vsn in [Vsn::V1, Vsn::V2] {
            let text = encode_text(vsn, Some("j\"r"), Some("r\\"), topic, event, "[1,\"x\"]");
            let msg = decode_text(vsn, &text).unwrap();
            assert_eq!(msg.topic, topic);
            assert_eq!(msg.event, event);
            assert_eq!(msg.join_ref.as_deref(), Some("j\"r"));
            assert_eq!(msg.msg_ref.as_deref(), Some("r\\"));
            assert_eq!(msg.payload, InboundPayload::Json(json!([1, "x"])));
        }
    }

    #[test]
    fn reply_payloads() {
        assert_eq!(reply_payload(true, "{}"), r#"{"status":"ok","response":{}}"#);
        let error = reply_payload(false, r#"{"reason":"unmatched topic"}"#);
        assert_eq!(
            serde_json::from_str::<Value>(&error).unwrap(),
            json!({"status": "error", "response": {"reason": "unmatched topic"}})
        );
    }

    #[test]
    fn encodes_a_user_broadcast_the_client_decodes() {
        let payload = BroadcastData::Json(json!({"msg": "héllo", "n": [1, 2]}));
        let frame = encode_user_broadcast("realtime:room☕", "chat", None, &payload).unwrap();
        let (topic, data) = js_decode_user_broadcast(&frame);
        assert_eq!(topic, "realtime:room☕");
        assert_eq!(data, json!({"type": "broadcast", "event": "chat", "payload": {"msg": "héllo", "n": [1, 2]}}));

        let bytes = BroadcastData::Binary(Bytes::from_static(&[9, 8, 7]));
        let frame = encode_user_broadcast("realtime:r", "bin", Some(r#"{"id":"x"}"#), &bytes).unwrap();
        assert_eq!(&frame[..5], &[4, 10, 3, 10, 0]);
        let (_, data) = js_decode_user_broadcast(&frame);
        assert_eq!(data, json!({"type": "broadcast", "event": "bin", "payload": [9, 8, 7], "meta": {"id": "x"}}));

        // Empty meta is no meta.
        let frame = encode_user_broadcast("t", "e", Some(""), &BroadcastData::Json(json!(null))).unwrap();
        assert_eq!(&frame[..], b"\x04\x01\x01\x00\x01tenull");
    }

    #[test]
    fn user_broadcast_lengths_over_255_bytes_fall_back() {
        let json = BroadcastData::Json(json!({}));
        let long = "é".repeat(128); // 256 bytes, 128 characters
        assert!(encode_user_broadcast(&long, "e", None, &json).is_none());
        assert!(encode_user_broadcast("t", &long, None, &json).is_none());
        assert!(encode_user_broadcast("t", "e", Some(&format!("\"{}\"", "x".repeat(254))), &json).is_none());
        let max = "x".repeat(255);
        let frame = encode_user_broadcast(&max, &max, Some(&format!("\"{}\"", "x".repeat(253))), &json).unwrap();
        assert_eq!(&frame[..4], &[4, 255, 255, 255]);
    }

    fn text() -> impl Strategy<Value = String> {
        // Short strings mixing ASCII, JSON specials and multi-byte characters.
        proptest::string::string_regex("[a-z:\"\\\\\n\u{0}é☕🎉]{0,12}").unwrap()
    }

    proptest! {
        #[test]
        fn decode_binary_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_binary(Vsn::V2, &bytes);
            let _ = decode_binary(Vsn::V1, &bytes);
        }

        #[test]
        fn decode_binary_never_panics_on_kind3_headers(
            lengths in proptest::array::uniform5(0u8..12),
            encoding in 0u8..3,
            body in proptest::collection::vec(any::<u8>(), 0..80),
        ) {
            let mut frame = vec![3];
            frame.extend_from_slice(&lengths);
            frame.push(encoding);
            frame.extend_from_slice(&body);
            let _ = decode_binary(Vsn::V2, &frame);
        }

        #[test]
        fn decode_text_never_panics(s in any::<String>()) {
            let _ = decode_text(Vsn::V1, &s);
            let _ = decode_text(Vsn::V2, &s);
        }

        #[test]
        fn kind3_frames_round_trip(
            join_ref in proptest::option::of("[0-9]{1,4}"),
            msg_ref in proptest::option::of("[0-9]{1,4}"),
            topic in text(),
            event in text(),
            persist in proptest::option::of(any::<bool>()),
            payload in proptest::collection::vec(any::<u8>(), 0..32),
            as_json in any::<bool>(),
        ) {
            let meta = persist.map(|p| json!({"persist": p}).to_string()).unwrap_or_default();
            let (encoding, body, expected) = if as_json {
                let value = json!({"data": payload});
                (1, value.to_string().into_bytes(), BroadcastData::Json(value))
            } else {
                (0, payload.clone(), BroadcastData::Binary(Bytes::from(payload)))
            };
            let frame = js_user_broadcast_push(
                join_ref.as_deref(), msg_ref.as_deref(), &topic, &event, &meta, encoding, &body,
            );
            let msg = decode_binary(Vsn::V2, &frame).unwrap();
            prop_assert_eq!(msg.join_ref, join_ref);
            prop_assert_eq!(msg.msg_ref, msg_ref);
            prop_assert_eq!(msg.topic, topic);
            prop_assert_eq!(msg.event, "broadcast");
            prop_assert_eq!(msg.payload, InboundPayload::UserBroadcast {
                event,
                payload: expected,
                meta: persist.map(|p| json!({"persist": p})),
            });
        }

        #[test]
        fn text_frames_round_trip(
            join_ref in proptest::option::of(text()),
            msg_ref in proptest::option::of(text()),
            topic in text(),
            event in text(),
            value in text(),
            v2 in any::<bool>(),
        ) {
            let vsn = if v2 { Vsn::V2 } else { Vsn::V1 };
            let payload = json!({"v": value});
            let frame = encode_text(vsn, join_ref.as_deref(), msg_ref.as_deref(), &topic, &event, &payload.to_string());
            let msg = decode_text(vsn, &frame).unwrap();
            prop_assert_eq!(msg, Inbound { join_ref, msg_ref, topic, event, payload: InboundPayload::Json(payload) });
        }

        #[test]
        fn user_broadcasts_round_trip_through_the_client_decoder(
            topic in text(), event in text(), value in text(),
        ) {
            let frame = encode_user_broadcast(&topic, &event, None, &BroadcastData::Json(json!(value))).unwrap();
            let (decoded_topic, data) = js_decode_user_broadcast(&frame);
            prop_assert_eq!(decoded_topic, topic);
            prop_assert_eq!(data, json!({"type": "broadcast", "event": event, "payload": value}));
        }
    }
}
