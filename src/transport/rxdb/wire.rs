//! RxDB's websocket replication frames as the `rxdb` 17 client sends and reads them: requests
//! `{id, collection, method, params}`, replies `{id, collection, result}`, stream events
//! `{id: "stream", collection, result}`, and the hub's checkpoint carried inside them. Pure
//! code: parsing and building text, no I/O.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use protocol::Object;

/// A request frame. The id is echoed as sent (RxDB's are strings; any JSON value is kept).
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: Value,
    pub collection: String,
    pub method: Method,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    /// The `headers` object of the client's replication options.
    Auth(Object),
    ChangeStream,
    ChangesSince { checkpoint: Option<Value>, batch_size: u32 },
    Write(Vec<WriteRow>),
    /// A method this protocol does not define, or parameters it cannot take: answered with a
    /// `null` result so that the client is never left waiting.
    Unusable { method: String, why: &'static str },
}

impl Method {
    /// The method's name for metrics.
    pub fn name(&self) -> &str {
        match self {
            Method::Auth(_) => "auth",
            Method::ChangeStream => "masterChangeStream$",
            Method::ChangesSince { .. } => "masterChangesSince",
            Method::Write(_) => "masterWrite",
            Method::Unusable { method, .. } => method,
        }
    }
}

/// One row of `masterWrite`: the document as the client wants it, and as it believed the hub
/// held it (absent when it knew no document).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WriteRow {
    pub new_document_state: Object,
    #[serde(default)]
    pub assumed_master_state: Option<Object>,
}

/// Why a text frame is not a request at all (no id to answer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameProblem {
    #[error("the frame is not a JSON object")]
    NotAnObject,
    #[error("the request has no id")]
    NoId,
}

#[derive(Deserialize)]
struct RawRequest {
    id: Option<Value>,
    #[serde(default)]
    collection: Value,
    #[serde(default)]
    method: Value,
    #[serde(default)]
    params: Value,
}

pub fn parse_request(text: &str) -> Result<Request, FrameProblem> {
    // Parsed as a value first: a struct would also be read from an array.
    let value: Value = serde_json::from_str(text).map_err(|_| FrameProblem::NotAnObject)?;
    if !value.is_object() {
        return Err(FrameProblem::NotAnObject);
    }
    let raw: RawRequest = serde_json::from_value(value).map_err(|_| FrameProblem::NotAnObject)?;
    let id = match raw.id {
        Some(Value::Null) | None => return Err(FrameProblem::NoId),
        Some(id) => id,
    };
    let collection = match raw.collection {
        Value::String(s) => s,
        _ => String::new(),
    };
    let method = match raw.method {
        Value::String(name) => method(name, raw.params),
        _ => Method::Unusable { method: String::new(), why: "no method" },
    };
    Ok(Request { id, collection, method })
}

fn method(name: String, params: Value) -> Method {
    let mut params = match params {
        Value::Array(items) => items,
        Value::Null => Vec::new(),
        _ => return Method::Unusable { method: name, why: "params is not an array" },
    }
    .into_iter();
    match name.as_str() {
        "auth" => match params.next() {
            Some(Value::Object(headers)) => Method::Auth(headers),
            _ => Method::Auth(Object::new()),
        },
        "masterChangeStream$" => Method::ChangeStream,
        "masterChangesSince" => {
            let checkpoint = params.next().filter(|c| !c.is_null());
            match params.next().as_ref().and_then(Value::as_u64) {
                Some(n) => Method::ChangesSince { checkpoint, batch_size: n.min(u32::MAX as u64) as u32 },
                None => Method::Unusable { method: name, why: "the batch size is not a number" },
            }
        }
        "masterWrite" => match params.next().map(serde_json::from_value::<Vec<WriteRow>>) {
            Some(Ok(rows)) => Method::Write(rows),
            _ => Method::Unusable { method: name, why: "the rows are not [{newDocumentState, assumedMasterState?}]" },
        },
        _ => Method::Unusable { method: name, why: "unknown method" },
    }
}

/// Where a client stands in its tenant's stream, opaque to it. `snapshot` is set while the
/// client is served the current rows (a first pull, a checkpoint of another epoch or older
/// than the log); it is always written, `null` otherwise, because the client merges a new
/// checkpoint over its saved one field by field and a stale cursor would survive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub epoch: String,
    pub seq: u64,
    #[serde(default)]
    pub snapshot: Option<Value>,
}

impl Checkpoint {
    /// The checkpoint a client sent, if it is one of the hub's.
    pub fn read(value: &Value) -> Option<Checkpoint> {
        serde_json::from_value(value.clone()).ok()
    }
}

pub fn reply(id: &Value, collection: &str, result: &Value) -> String {
    json!({ "id": id, "collection": collection, "result": result }).to_string()
}

/// The reply to `masterChangesSince`.
pub fn changes_reply(id: &Value, collection: &str, documents: Vec<Value>, checkpoint: &Checkpoint) -> String {
    reply(id, collection, &json!({ "documents": documents, "checkpoint": checkpoint }))
}

/// A stream event whose documents are already JSON text (shared between sockets).
pub fn stream_event(collection: &str, documents_json: &str, checkpoint: &Checkpoint) -> String {
    format!(
        "{{\"id\":\"stream\",\"collection\":{},\"result\":{{\"documents\":{documents_json},\"checkpoint\":{}}}}}",
        Value::String(collection.to_owned()),
        serde_json::to_string(checkpoint).unwrap_or_else(|_| "null".into()),
    )
}

/// Tells the client to pull from its checkpoint again.
pub fn resync_event(collection: &str) -> String {
    json!({ "id": "stream", "collection": collection, "result": "RESYNC" }).to_string()
}

/// The token of an `auth` message's headers: `authorization: Bearer <jwt>` (any case), or a
/// `token` field.
pub fn token_from_headers(headers: &Object) -> Option<&str> {
    let bearer = headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("authorization")).and_then(|(_, v)| v.as_str()).and_then(|v| {
        let (scheme, token) = v.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    });
    bearer.or_else(|| headers.get("token").and_then(Value::as_str)).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_of_each_method_are_read() {
        let r = parse_request(r#"{"id":"a|1","collection":"todos","method":"masterChangesSince","params":[null,2]}"#).unwrap();
        assert_eq!(r.id, json!("a|1"));
        assert_eq!(r.collection, "todos");
        assert_eq!(r.method, Method::ChangesSince { checkpoint: None, batch_size: 2 });
        let r = parse_request(r#"{"id":"stream","collection":"todos","method":"masterChangeStream$","params":[]}"#).unwrap();
        assert_eq!(r.method, Method::ChangeStream);
        let r = parse_request(r#"{"id":"x","collection":"t","method":"masterWrite","params":[[{"newDocumentState":{"id":"1","_deleted":false}}]]}"#).unwrap();
        let Method::Write(rows) = r.method else { panic!("write") };
        assert_eq!(rows[0].assumed_master_state, None);
        assert_eq!(rows[0].new_document_state["id"], json!("1"));
        let r = parse_request(r#"{"id":"y","collection":"t","method":"auth","params":[{"authorization":"Bearer abc"}]}"#).unwrap();
        let Method::Auth(headers) = r.method else { panic!("auth") };
        assert_eq!(token_from_headers(&headers), Some("abc"));
    }

    #[test]
    fn unusable_requests_keep_their_id_and_broken_frames_have_none() {
        let r = parse_request(r#"{"id":7,"collection":"t","method":"masterWrite","params":[{"not":"rows"}]}"#).unwrap();
        assert_eq!(r.id, json!(7));
        assert!(matches!(r.method, Method::Unusable { .. }));
        let r = parse_request(r#"{"id":"z","collection":"t","method":"dropDatabase","params":[]}"#).unwrap();
        assert_eq!(r.method.name(), "dropDatabase");
        assert_eq!(parse_request("[1,2]"), Err(FrameProblem::NotAnObject));
        assert_eq!(parse_request("{\"method\":\"auth\"}"), Err(FrameProblem::NoId));
        assert_eq!(parse_request("not json"), Err(FrameProblem::NotAnObject));
    }

    #[test]
    fn tokens_come_from_a_bearer_header_of_any_case_or_a_token_field() {
        let headers = |v: Value| v.as_object().unwrap().clone();
        assert_eq!(token_from_headers(&headers(json!({"Authorization": "bearer t1"}))), Some("t1"));
        assert_eq!(token_from_headers(&headers(json!({"token": "t2"}))), Some("t2"));
        assert_eq!(token_from_headers(&headers(json!({"authorization": "Basic xyz"}))), None);
        assert_eq!(token_from_headers(&headers(json!({"token": ""}))), None);
    }

    #[test]
    fn checkpoints_always_carry_their_snapshot_field() {
        let cp = Checkpoint { epoch: "e".into(), seq: 4, snapshot: None };
        assert_eq!(serde_json::to_value(&cp).unwrap(), json!({"epoch": "e", "seq": 4, "snapshot": null}));
        assert_eq!(Checkpoint::read(&json!({"epoch": "e", "seq": 4})), Some(cp));
        // RxDB's own checkpoint shape is not the hub's.
        assert_eq!(Checkpoint::read(&json!({"id": "x", "lwt": 12.5})), None);
    }

    proptest! {
        /// A stream event built from text is the JSON a serializer would write.
        #[test]
        fn stream_events_are_well_formed_json(collection in "\\PC{0,12}", seq in any::<u64>(), n in 0usize..4) {
            let docs: Vec<Value> = (0..n).map(|i| json!({"id": i.to_string(), "_deleted": false})).collect();
            let cp = Checkpoint { epoch: "e1".into(), seq, snapshot: None };
            let text = stream_event(&collection, &Value::Array(docs.clone()).to_string(), &cp);
            let parsed: Value = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(parsed, json!({"id": "stream", "collection": collection, "result": {"documents": docs, "checkpoint": cp}}));
        }
    }
}
