//! What must hold for any frame a supabase-js client sends to `/realtime/v1` (`--features hub`),
//! as the session reads it: Phoenix text frames of vsn 1.0.0 (objects) and 2.0.0 (arrays) and
//! vsn 2 binary kind 3 pushes (src/transport/supabase/wire.rs), the topic's channel name and a
//! `phx_join` payload (join.rs) with its `postgres_changes` bindings (changes.rs) and filter
//! strings (filter.rs). No panic; a frame that reads re-encodes (in either vsn, and a kind 3
//! push as the hub's kind 4 broadcast) to the same message, one that does not is refused with
//! an error of its kind; a join is read or refused as `InvalidJoinPayload`, its bindings echo
//! as they came; a filter reads as conditions the hub can evaluate that written back read the
//! same, or is refused with a reason.

// Each includer uses a part: the fuzz targets leave out the seeds.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use protocol::{Condition, FilterOp};
use serde_json::{json, Value};
use synchub::config::MergePolicy;
use synchub::storage::catalog::{Catalog, Column, TableSchema};
use synchub::transport::supabase::changes::{Binding, BindingRequest};
use synchub::transport::supabase::filter::parse_filter;
use synchub::transport::supabase::join::{channel_name, JoinRequest, MAX_CHANNEL_NAME_BYTES};
use synchub::transport::supabase::wire::{self, BroadcastData, Inbound, InboundPayload, Vsn, WireError};

/// Columns of every kind a filter types its values by (filter.rs's tests), and `stock` as the
/// demo's products have it (tests/supabase_protocol.rs).
const COLUMNS: &[(&str, &str)] = &[
    ("tenant_id", "text"),
    ("id", "bigint"),
    ("age", "integer"),
    ("small", "smallint"),
    ("stock", "integer"),
    ("price", "numeric(10,2)"),
    ("ratio", "double precision"),
    ("score", "real"),
    ("active", "boolean"),
    ("name", "text"),
    ("code", "character varying(20)"),
    ("owner", "uuid"),
    ("created_at", "timestamp with time zone"),
    ("doc", "jsonb"),
    ("tags", "text[]"),
    ("status", "public.status"),
];

/// A catalog of `products` with those columns, and `orders` with only a key.
fn catalog() -> &'static Catalog {
    static CATALOG: OnceLock<Catalog> = OnceLock::new();
    CATALOG.get_or_init(|| {
        let table = |name: &str, columns: &[(&str, &str)]| {
            let columns: BTreeMap<String, Column> =
                columns.iter().map(|(name, ty)| (name.to_string(), Column { name: name.to_string(), sql_type: ty.to_string() })).collect();
            TableSchema::assemble(name.into(), "tenant_id".into(), "text".into(), vec!["id".into()], columns, MergePolicy::Lww, "to_jsonb")
        };
        Catalog::of(vec![table("products", COLUMNS), table("orders", &[("tenant_id", "text"), ("id", "bigint")])])
    })
}

fn products() -> &'static Arc<TableSchema> {
    catalog().get("products").expect("products is in the catalog")
}

/// Body of the `supabase` target: the bytes as a text frame of either vsn, as a binary frame,
/// and (as text) as a filter string.
pub fn supabase(bytes: &[u8]) {
    if let Ok(text) = std::str::from_utf8(bytes) {
        let parsed = serde_json::from_str::<Value>(text).ok();
        for vsn in [Vsn::V1, Vsn::V2] {
            match wire::decode_text(vsn, text) {
                Ok(message) => check_message(vsn, &message),
                Err(WireError::NotJson(_)) => assert!(parsed.is_none(), "JSON refused as not JSON: {text:?}"),
                Err(err @ WireError::Shape(_)) => {
                    assert!(parsed.is_some(), "{text:?}: {err}");
                    let fits = match (vsn, &parsed) {
                        (Vsn::V1, Some(Value::Object(_))) => true,
                        (Vsn::V2, Some(Value::Array(items))) => items.len() >= 5,
                        _ => false,
                    };
                    // A frame of the vsn's shape is refused for a field, and says which.
                    let field = ["join_ref", "ref", "topic", "event", "payload"].iter().any(|f| err.to_string().contains(f));
                    assert!(!fits || field, "{vsn:?} {text:?}: {err}");
                }
                Err(err) => panic!("{vsn:?} text refused with a binary frame's error: {err}"),
            }
        }
        check_filter(text);
    }
    assert_eq!(wire::decode_binary(Vsn::V1, bytes), Err(WireError::BinaryInV1));
    match wire::decode_binary(Vsn::V2, bytes) {
        Ok(message) => check_message(Vsn::V2, &message),
        Err(WireError::Truncated { needed, got }) => assert!(got < needed && got == bytes.len(), "truncated {got} of {needed}"),
        Err(WireError::UnknownKind(kind)) => assert!(kind != 3 && bytes.first() == Some(&kind)),
        Err(WireError::UnknownEncoding(encoding)) => assert!(encoding > 1 && bytes.get(6) == Some(&encoding)),
        Err(WireError::NotJson(_) | WireError::Shape(_) | WireError::BinaryInV1) => panic!("a binary frame refused as text: {bytes:?}"),
        Err(WireError::BadUtf8(_) | WireError::BadJson { .. }) => {}
    }
}

/// A message read in `vsn` re-encodes to itself, its topic names a channel or is refused as
/// `TopicNameInvalid`, and a JSON payload is read as a join.
fn check_message(vsn: Vsn, message: &Inbound) {
    assert!(message.join_ref.as_deref() != Some("") || !matches!(message.payload, InboundPayload::UserBroadcast { .. }));
    match &message.payload {
        InboundPayload::Json(payload) => {
            // The hub's text encoder writes the same message in either vsn (its replies and
            // fan-out carry the client's refs and topic back).
            for other in [Vsn::V1, Vsn::V2] {
                let again = wire::encode_text(other, message.join_ref.as_deref(), message.msg_ref.as_deref(), &message.topic, &message.event, &payload.to_string());
                assert_eq!(wire::decode_text(other, &again).as_ref(), Ok(message), "{vsn:?} message re-encoded in {other:?}: {again}");
            }
            check_join(payload);
        }
        InboundPayload::UserBroadcast { event, payload, meta } => {
            assert_eq!((vsn, message.event.as_str()), (Vsn::V2, "broadcast"));
            let meta_json = meta.as_ref().map(Value::to_string);
            let body = match payload {
                BroadcastData::Json(value) => serde_json::to_vec(value).expect("a value encodes"),
                BroadcastData::Binary(bytes) => bytes.to_vec(),
            };
            let encoding = u8::from(matches!(payload, BroadcastData::Json(_)));
            let fields = [message.join_ref.as_deref().unwrap_or(""), message.msg_ref.as_deref().unwrap_or(""), &message.topic, event, meta_json.as_deref().unwrap_or("")];
            if let Some(again) = kind3(fields, encoding, &body) {
                assert_eq!(wire::decode_binary(Vsn::V2, &again).as_ref(), Ok(message), "kind 3 re-encoded");
            }
            // Relayed to a vsn 2 client as kind 4, as its serializer reads it.
            let out = wire::encode_user_broadcast(&message.topic, event, meta_json.as_deref(), payload);
            let fits = [message.topic.len(), event.len(), meta_json.as_ref().map_or(0, String::len)].iter().all(|n| *n <= 255);
            assert_eq!(out.is_some(), fits, "kind 4 only when the lengths fit a byte");
            if let Some(out) = out {
                let (topic, user_event, meta_again, data) = read_kind4(&out);
                assert_eq!((topic, user_event), (message.topic.as_str(), event.as_str()));
                assert_eq!(meta_again, meta.clone());
                match (payload, data) {
                    (BroadcastData::Json(value), (1, data)) => assert_eq!(serde_json::from_slice::<Value>(data).ok().as_ref(), Some(value)),
                    (BroadcastData::Binary(bytes), (0, data)) => assert_eq!(&bytes[..], data),
                    (payload, (encoding, _)) => panic!("{payload:?} sent with encoding {encoding}"),
                }
            }
        }
    }
    match channel_name(&message.topic) {
        Ok(name) => {
            assert_eq!(format!("realtime:{name}"), message.topic);
            assert!(!name.is_empty() && name.len() <= MAX_CHANNEL_NAME_BYTES && !name.contains('\0'), "{name:?}");
        }
        Err(why) => assert!(why.starts_with("TopicNameInvalid: "), "{why}"),
    }
}

/// supabase-js's `_encodeUserBroadcastPush`: `3, join_ref_len, ref_len, topic_len, event_len,
/// meta_len, encoding, join_ref, ref, topic, event, meta, payload`; `None` when a field is
/// longer than its length byte.
fn kind3(fields: [&str; 5], encoding: u8, payload: &[u8]) -> Option<Vec<u8>> {
    let mut out = vec![3];
    for field in fields {
        out.push(u8::try_from(field.len()).ok()?);
    }
    out.push(encoding);
    for field in fields {
        out.extend_from_slice(field.as_bytes());
    }
    out.extend_from_slice(payload);
    Some(out)
}

/// A kind 4 frame as supabase-js's serializer reads it: topic, event, meta, and the encoding
/// with the payload's bytes.
fn read_kind4(frame: &[u8]) -> (&str, &str, Option<Value>, (u8, &[u8])) {
    assert_eq!(frame[0], 4);
    let (topic_len, event_len, meta_len) = (usize::from(frame[1]), usize::from(frame[2]), usize::from(frame[3]));
    let mut at = 5;
    let mut take = |len: usize| {
        let part = &frame[at..at + len];
        at += len;
        part
    };
    let topic = std::str::from_utf8(take(topic_len)).expect("the topic is UTF-8");
    let event = std::str::from_utf8(take(event_len)).expect("the event is UTF-8");
    let meta = take(meta_len);
    let meta = (!meta.is_empty()).then(|| serde_json::from_slice(meta).expect("meta is JSON"));
    (topic, event, meta, (frame[4], &frame[at..]))
}

/// A payload read as a `phx_join`'s: refused as `InvalidJoinPayload`, or read as the payload
/// says, with bindings whose echo reads back the same and that resolve or are refused with a
/// Supabase error code.
fn check_join(payload: &Value) {
    let join = match JoinRequest::parse(payload) {
        Ok(join) => join,
        Err(why) => return assert!(why.starts_with("InvalidJoinPayload: "), "{why}"),
    };
    let config = payload.get("config").filter(|c| !c.is_null());
    let entries = config.and_then(|c| c.get("postgres_changes")).and_then(Value::as_array).map_or(0, Vec::len);
    assert_eq!(join.bindings.len(), entries, "one binding per postgres_changes entry: {payload}");
    if let Some(key) = &join.presence_key {
        assert!(!key.is_empty() && key.len() <= MAX_CHANNEL_NAME_BYTES && !key.contains('\0'), "presence key {key:?}");
    }
    if let Some(token) = &join.access_token {
        assert!(!token.is_empty() && !token.starts_with("sb_"), "token {token:?}");
    }
    for binding in &join.bindings {
        // The join reply echoes the binding; the client compares it with its own.
        let echo = binding.echo(binding.id());
        let again = BindingRequest::parse(&echo).expect("an echo reads as a binding");
        assert_eq!(
            (&again.event, &again.schema, &again.table, &again.filter, again.id()),
            (&binding.event, &binding.schema, &binding.table, &binding.filter, binding.id()),
            "echo {echo}"
        );
        match Binding::resolve(binding, catalog(), None) {
            Ok(resolved) => {
                assert_eq!(resolved.id, binding.id());
                if let Some(filter) = &binding.filter {
                    let [table] = resolved.tables.as_slice() else { panic!("a filter on {} tables", resolved.tables.len()) };
                    assert_eq!(parse_filter(filter, |c| table.column_type(c)).as_ref(), Ok(&resolved.filter), "{filter:?}");
                }
            }
            Err(why) => {
                let codes = ["InvalidFilter: ", "RealtimeDisabledForConfiguration: ", "Unauthorized: "];
                assert!(codes.iter().any(|code| why.starts_with(code)), "{why}");
            }
        }
        if let Some(filter) = &binding.filter {
            check_filter(filter);
        }
    }
}

/// A filter on `products` reads as conditions the hub can evaluate, on its columns, with values
/// of their types, that written back as realtime-js writes filters read the same; or it is
/// refused with a reason.
fn check_filter(filter: &str) {
    let table = products();
    let conditions = match parse_filter(filter, |c| table.column_type(c)) {
        Ok(conditions) => conditions,
        Err(why) => return assert!(!why.is_empty(), "a refusal gives a reason: {filter:?}"),
    };
    assert_eq!(conditions.is_empty(), filter.is_empty(), "{filter:?}");
    for condition in &conditions {
        assert_eq!(protocol::filter::check(condition), Ok(()), "{filter:?}");
        let sql_type = table.column_type(&condition.column).expect("a condition on a column of the table");
        let values = match &condition.value {
            Value::Array(items) => {
                assert_eq!(condition.op, FilterOp::In);
                items.iter().collect()
            }
            value => vec![value],
        };
        for value in values {
            let typed = match (sql_type, value) {
                (_, Value::Null | Value::Bool(_)) if condition.op != FilterOp::In => matches!(condition.op, FilterOp::Eq | FilterOp::Neq),
                ("bigint" | "integer" | "smallint", Value::Number(n)) => n.is_i64(),
                ("numeric(10,2)" | "double precision" | "real", Value::Number(_)) => true,
                ("boolean", Value::Bool(_)) => true,
                ("uuid", Value::String(s)) => s.len() == 36 && uuid::Uuid::parse_str(s).is_ok_and(|u| u.hyphenated().to_string() == *s),
                (_, Value::String(_)) => !matches!(sql_type, "bigint" | "integer" | "smallint" | "numeric(10,2)" | "double precision" | "real" | "boolean" | "uuid"),
                _ => false,
            };
            assert!(typed, "{value} for {} ({sql_type}) from {filter:?}", condition.column);
        }
    }
    let again = write_filter(&conditions);
    assert_eq!(parse_filter(&again, |c| table.column_type(c)).as_ref(), Ok(&conditions), "{filter:?} written back as {again:?}");
}

/// Conditions as realtime-js's filter builder writes them (`col=op.value`, `is.` for null and
/// booleans, `in.(…)`), values quoted as its `serializeScalar` quotes them, and empty list
/// items quoted (an empty `in.()` is no list).
fn write_filter(conditions: &[Condition]) -> String {
    let scalar = |value: &Value, in_list: bool| match value {
        Value::String(s) => {
            let reserved = s.contains([',', '(', ')', '"', '\\']) || s.trim() != s || s.trim_matches(|c: char| matches!(c, '\u{0B}' | '\u{0C}')) != s;
            if reserved || (in_list && s.is_empty()) {
                format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
            } else {
                s.clone()
            }
        }
        other => other.to_string(),
    };
    let op = |op: FilterOp| match op {
        FilterOp::Eq => "eq",
        FilterOp::Neq => "neq",
        FilterOp::Lt => "lt",
        FilterOp::Lte => "lte",
        FilterOp::Gt => "gt",
        FilterOp::Gte => "gte",
        FilterOp::In => "in",
    };
    conditions
        .iter()
        .map(|c| match (c.op, &c.value) {
            (FilterOp::Eq, Value::Null | Value::Bool(_)) => format!("{}=is.{}", c.column, c.value),
            (FilterOp::Neq, Value::Null | Value::Bool(_)) => format!("{}=not.is.{}", c.column, c.value),
            (FilterOp::In, Value::Array(items)) => {
                format!("{}=in.({})", c.column, items.iter().map(|item| scalar(item, true)).collect::<Vec<_>>().join(","))
            }
            (o, value) => format!("{}={}.{}", c.column, op(o), scalar(value, false)),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Seeds: the frames of the Supabase Realtime notes (/work/shared/reference/supabase-realtime.md)
/// and of tests/supabase_protocol.rs and wire.rs's, join.rs's and filter.rs's tests, each text
/// frame in both vsns; kind 3 pushes as supabase-js writes them; and filter strings alone.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let binding = |filter: &str| json!({"event": "*", "schema": "public", "table": "products", "filter": filter});
    let messages: Vec<(&str, Option<&str>, Option<&str>, &str, &str, Value)> = vec![
        ("join-bare", Some("1"), Some("1"), "realtime:room1", "phx_join", json!({"config": {"broadcast": {"ack": false, "self": false}, "presence": {"key": "", "enabled": false}, "postgres_changes": [], "private": false}})),
        ("join-full", Some("2"), Some("2"), "realtime:room1", "phx_join", json!({"config": {"broadcast": {"self": true, "ack": "true"}, "presence": {"key": "u1", "enabled": true}, "postgres_changes": [{"event": "*", "schema": "public", "table": "orders", "filter": "id=eq.1"}], "private": false}, "access_token": "eyJ.x.y", "version": "realtime-js/2.119.2"})),
        ("join-changes", Some("3"), Some("3"), "realtime:changes", "phx_join", json!({"config": {"postgres_changes": [binding("stock=gte.5"), binding("name=in.(\"a,b\",c)"), {"event": "INSERT", "schema": "public", "table": "orders", "since_seq": 4, "snapshot": true}]}})),
        ("join-bad-op", Some("4"), Some("4"), "realtime:changes", "phx_join", json!({"config": {"postgres_changes": [binding("stock=like.5")]}})),
        ("join-bad-column", Some("5"), Some("5"), "realtime:changes", "phx_join", json!({"config": {"postgres_changes": [binding("nope=eq.5")]}})),
        ("join-bad-value", Some("6"), Some("6"), "realtime:changes", "phx_join", json!({"config": {"postgres_changes": [binding("stock=eq.many")]}})),
        ("join-no-table", Some("7"), Some("7"), "realtime:changes", "phx_join", json!({"config": {"postgres_changes": [{"event": "*", "schema": "public", "filter": "stock=eq.5"}]}})),
        ("join-truncate", Some("8"), Some("8"), "realtime:changes", "phx_join", json!({"config": {"postgres_changes": [{"event": "TRUNCATE", "schema": "public", "table": "products"}]}})),
        ("join-changes-not-array", Some("9"), Some("9"), "realtime:changes", "phx_join", json!({"config": {"postgres_changes": "all"}})),
        ("join-private", Some("10"), Some("10"), "realtime:staff:room", "phx_join", json!({"config": {"private": true}, "access_token": "sb_publishable_x"})),
        ("heartbeat", None, Some("5"), "phoenix", "heartbeat", json!({})),
        ("broadcast", Some("1"), Some("3"), "realtime:room1", "broadcast", json!({"type": "broadcast", "event": "e", "payload": {"n": 1}})),
        ("track", Some("1"), Some("4"), "realtime:room1", "presence", json!({"type": "presence", "event": "track", "payload": {"online_at": "2026-01-20T10:00:00Z"}})),
        ("untrack", Some("1"), Some("5"), "realtime:room1", "presence", json!({"type": "presence", "event": "untrack"})),
        ("access-token", Some("1"), Some("6"), "realtime:long", "access_token", json!({"access_token": "eyJ.x.y"})),
        ("leave", Some("1"), Some("7"), "realtime:room1", "phx_leave", json!({})),
    ];
    let mut seeds = Vec::new();
    for (name, join_ref, msg_ref, topic, event, payload) in messages {
        let v1 = json!({"topic": topic, "event": event, "payload": payload, "ref": msg_ref, "join_ref": join_ref});
        seeds.push((format!("v1-{name}"), v1.to_string().into_bytes()));
        seeds.push((format!("v2-{name}"), json!([join_ref, msg_ref, topic, event, payload]).to_string().into_bytes()));
    }
    seeds.push(("v2-extra-element".into(), br#"[null,"1","phoenix","heartbeat",{},"extra"]"#.to_vec()));
    seeds.push(("v1-no-join-ref".into(), br#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"7"}"#.to_vec()));
    let pushes: [(&str, [&str; 5], u8, &[u8]); 5] = [
        ("kind3-json", ["1", "2", "realtime:room1", "cursor", ""], 1, br#"{"x":7}"#),
        ("kind3-binary", ["1", "3", "realtime:room1", "blob", ""], 0, &[1, 2, 3]),
        ("kind3-meta-multibyte", ["10", "", "realtime:café-☕-日本", "émoji-🎉", r#"{"persist":true}"#], 0, &[0, 255, 1, 2, 0xC3]),
        ("kind3-empty", ["", "", "realtime:t", "e", ""], 0, b""),
        ("kind3-null", ["", "", "realtime:t", "e", ""], 1, b"null"),
    ];
    for (name, fields, encoding, payload) in pushes {
        seeds.push((name.into(), kind3(fields, encoding, payload).expect("a short push")));
    }
    let filters = [
        "id=eq.5",
        "id=in.(1,2,3)",
        "age=eq.-42,small=lt.+7",
        "price=gte.10.50,ratio=lt.1e-3,score=gt..5",
        "price=eq.18446744073709551615",
        "active=in.(t,false),active=neq.T",
        "name=eq. hello world",
        "name=in.(\"a,b\",\" c \",\"d\\\"e\")",
        "name=not.is.null,active=is.true",
        "owner=eq.{A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11}",
        "created_at=gt.2024-01-01T00:00:00Z,status=eq.open",
        "tags=eq.{a,b}",
        "name=eq.Oslo, Norway,stock=gt.0",
        "name=eq.a=b.c",
        "stock=not.eq.5",
    ];
    for (n, filter) in filters.iter().enumerate() {
        seeds.push((format!("filter-{n}"), filter.as_bytes().to_vec()));
    }
    seeds
}
