//! Supabase Realtime's wire protocol (Phoenix channels) as supabase-js speaks it, for load
//! clients of `/realtime/v1/websocket`: the socket's URL, client frames for serializer vsn
//! 1.0.0 (JSON objects) and 2.0.0 (JSON arrays), and server frames read down to what a load
//! client uses (event, ref, reply status, and a change's type and record `name`).

use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{LoadError, Result};

/// The Phoenix serializer a socket speaks (`vsn` in its URL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vsn {
    /// `1.0.0`: `{"topic","event","payload","ref","join_ref"}`.
    V1,
    /// `2.0.0`: `[join_ref, ref, topic, event, payload]`.
    V2,
}

impl Vsn {
    pub fn parse(vsn: &str) -> Result<Vsn> {
        match vsn {
            "1.0.0" => Ok(Vsn::V1),
            "2.0.0" => Ok(Vsn::V2),
            other => Err(LoadError::Usage(format!("Supabase serializer vsn {other}: give 1.0.0 or 2.0.0"))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Vsn::V1 => "1.0.0",
            Vsn::V2 => "2.0.0",
        }
    }
}

/// The Supabase Realtime socket of the hub whose native socket is `native_url`
/// (`ws://127.0.0.1:PORT/v1/ws` → `ws://127.0.0.1:PORT/realtime/v1/websocket?apikey=…&vsn=…`).
pub fn realtime_url(native_url: &str, apikey: &str, vsn: Vsn) -> Result<String> {
    let rest = native_url.strip_prefix("ws://").ok_or_else(|| LoadError::Usage(format!("{native_url}: only ws:// URLs are supported")))?;
    let host_port = rest.split('/').next().unwrap_or(rest);
    // A JWT is URL-safe base64 and dots: nothing to escape.
    Ok(format!("ws://{host_port}/realtime/v1/websocket?apikey={apikey}&vsn={}", vsn.as_str()))
}

/// A client frame's text.
pub fn encode(vsn: Vsn, join_ref: Option<&str>, msg_ref: Option<&str>, topic: &str, event: &str, payload: &Value) -> String {
    match vsn {
        Vsn::V1 => json!({"topic": topic, "event": event, "payload": payload, "ref": msg_ref, "join_ref": join_ref}).to_string(),
        Vsn::V2 => json!([join_ref, msg_ref, topic, event, payload]).to_string(),
    }
}

/// The `phx_join` payload supabase-js sends for a channel with one `postgres_changes` listener
/// (no broadcast or presence listeners), with the user's token.
pub fn join_payload(bindings: Value, access_token: &str) -> Value {
    json!({
        "config": {
            "broadcast": {"self": false, "ack": false},
            "presence": {"key": "", "enabled": false},
            "postgres_changes": bindings,
            "private": false
        },
        "access_token": access_token
    })
}

/// A server frame as a load client reads it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Message {
    #[serde(rename = "ref")]
    pub msg_ref: Option<String>,
    pub event: String,
    pub payload: Payload,
}

/// The parts of a payload a load client reads: `status` (`phx_reply`, `system`), `response`
/// (`phx_reply`) and `message` (`system`), `data` (`postgres_changes`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Payload {
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub response: Option<Value>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub data: Option<ChangeData>,
}

/// A `postgres_changes` message's `data`, down to its type and its record's `name`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChangeData {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub record: Option<Record>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Record {
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Deserialize)]
struct V1Frame {
    #[serde(rename = "ref", default)]
    msg_ref: Option<String>,
    event: String,
    #[serde(default)]
    payload: Option<Payload>,
}

/// Read a server text frame.
pub fn decode(vsn: Vsn, text: &str) -> Result<Message> {
    let bad = |e: serde_json::Error| LoadError::Protocol(format!("Phoenix vsn {} frame: {e}: {}", vsn.as_str(), text.chars().take(200).collect::<String>()));
    match vsn {
        Vsn::V1 => {
            let frame: V1Frame = serde_json::from_str(text).map_err(bad)?;
            Ok(Message { msg_ref: frame.msg_ref, event: frame.event, payload: frame.payload.unwrap_or_default() })
        }
        Vsn::V2 => {
            let (_join_ref, msg_ref, _topic, event, payload): (IgnoredAny, Option<String>, IgnoredAny, String, Option<Payload>) =
                serde_json::from_str(text).map_err(bad)?;
            Ok(Message { msg_ref, event, payload: payload.unwrap_or_default() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_realtime_url_is_on_the_native_socket_s_host() {
        let url = realtime_url("ws://127.0.0.1:4000/v1/ws", "a.b.c", Vsn::V2).unwrap();
        assert_eq!(url, "ws://127.0.0.1:4000/realtime/v1/websocket?apikey=a.b.c&vsn=2.0.0");
        assert!(realtime_url("wss://127.0.0.1:4000/v1/ws", "k", Vsn::V1).is_err());
    }

    #[test]
    fn client_frames_in_both_shapes() {
        let payload = json!({});
        let v1: Value = serde_json::from_str(&encode(Vsn::V1, None, Some("2"), "phoenix", "heartbeat", &payload)).unwrap();
        assert_eq!(v1, json!({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": "2", "join_ref": null}));
        let v2: Value = serde_json::from_str(&encode(Vsn::V2, Some("1"), Some("1"), "realtime:x", "phx_join", &payload)).unwrap();
        assert_eq!(v2, json!(["1", "1", "realtime:x", "phx_join", {}]));
    }

    #[test]
    fn server_frames_read_in_both_shapes() {
        let reply = r#"{"topic":"realtime:x","event":"phx_reply","payload":{"status":"ok","response":{"postgres_changes":[{"id":7}]}},"ref":"1"}"#;
        let m = decode(Vsn::V1, reply).unwrap();
        assert_eq!((m.msg_ref.as_deref(), m.event.as_str(), m.payload.status.as_deref()), (Some("1"), "phx_reply", Some("ok")));
        let change = r#"[null,null,"realtime:x","postgres_changes",{"ids":[7],"data":{"schema":"public","table":"products","commit_timestamp":"2026-01-01T00:00:00.000Z","type":"UPDATE","columns":[{"name":"name","type":"text"}],"record":{"id":"u","name":"dash 1234","stock":3},"old_record":{"stock":9},"errors":null,"seq":9,"epoch":"e"}}]"#;
        let m = decode(Vsn::V2, change).unwrap();
        assert_eq!(m.event, "postgres_changes");
        let data = m.payload.data.unwrap();
        assert_eq!((data.kind.as_str(), data.record.and_then(|r| r.name).as_deref()), ("UPDATE", Some("dash 1234")));
        let system = r#"{"topic":"realtime:x","event":"system","payload":{"extension":"postgres_changes","status":"ok","message":"Subscribed to PostgreSQL","channel":"x"},"ref":null}"#;
        let m = decode(Vsn::V1, system).unwrap();
        assert_eq!((m.msg_ref, m.payload.message.as_deref()), (None, Some("Subscribed to PostgreSQL")));
        assert!(decode(Vsn::V2, system).is_err());
    }
}
