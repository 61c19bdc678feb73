//! A `phx_join`'s payload as supabase-js sends it: `config.broadcast {self, ack}`,
//! `config.presence {key, enabled}`, `config.postgres_changes [...]`, `config.private`, and the
//! channel's own `access_token`. Booleans are read leniently, as Supabase Realtime reads them.

use serde_json::Value;

use super::changes::BindingRequest;

/// The longest channel name (after `realtime:`), bytes: it is a length byte in vsn 2's binary
/// frames.
pub const MAX_CHANNEL_NAME_BYTES: usize = 200;

#[derive(Debug, Clone, PartialEq)]
pub struct JoinRequest {
    pub broadcast_self: bool,
    pub broadcast_ack: bool,
    /// The key this client's presence is tracked under (`None`: the socket's id).
    pub presence_key: Option<String>,
    pub presence_enabled: bool,
    pub private: bool,
    pub bindings: Vec<BindingRequest>,
    /// A token for this channel, replacing the socket's.
    pub access_token: Option<String>,
}

/// `true`, `"true"`, `1`… as true; anything else false.
pub fn lenient_bool(value: Option<&Value>) -> bool {
    match value {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => matches!(s.to_ascii_lowercase().as_str(), "true" | "t" | "1"),
        Some(Value::Number(n)) => n.as_f64().is_some_and(|n| n != 0.0),
        _ => false,
    }
}

/// The channel name of a topic: `realtime:<name>`, the name non-empty and short enough.
pub fn channel_name(topic: &str) -> Result<&str, String> {
    let name = topic.strip_prefix("realtime:").ok_or_else(|| format!("TopicNameInvalid: `{topic}` does not start with `realtime:`"))?;
    if name.is_empty() {
        return Err("TopicNameInvalid: the channel name is empty".into());
    }
    if name.len() > MAX_CHANNEL_NAME_BYTES {
        return Err(format!("TopicNameInvalid: the channel name is longer than {MAX_CHANNEL_NAME_BYTES} bytes"));
    }
    if name.contains('\0') {
        return Err("TopicNameInvalid: the channel name holds U+0000".into());
    }
    Ok(name)
}

impl JoinRequest {
    pub fn parse(payload: &Value) -> Result<JoinRequest, String> {
        let config = payload.get("config").filter(|c| !c.is_null());
        if config.is_some_and(|c| !c.is_object()) {
            return Err("InvalidJoinPayload: `config` must be an object".into());
        }
        let section = |name: &str| config.and_then(|c| c.get(name));
        let broadcast = section("broadcast");
        let presence = section("presence");
        let bindings = match section("postgres_changes") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(entries)) => {
                entries.iter().map(BindingRequest::parse).collect::<Result<Vec<_>, _>>().map_err(|why| format!("InvalidJoinPayload: {why}"))?
            }
            Some(_) => return Err("InvalidJoinPayload: `postgres_changes` must be an array".into()),
        };
        let presence_key = match presence.and_then(|p| p.get("key")) {
            Some(Value::String(key)) if !key.is_empty() => Some(key.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        if presence_key.as_deref().is_some_and(|k| k.len() > MAX_CHANNEL_NAME_BYTES || k.contains('\0')) {
            return Err(format!("InvalidJoinPayload: a presence key is at most {MAX_CHANNEL_NAME_BYTES} bytes, without U+0000"));
        }
        let token = payload.get("access_token").or_else(|| payload.get("user_token"));
        // `sb_` keys are API keys, not JWTs: Supabase ignores them here.
        let access_token = token.and_then(Value::as_str).filter(|t| !t.is_empty() && !t.starts_with("sb_")).map(str::to_owned);
        Ok(JoinRequest {
            broadcast_self: lenient_bool(broadcast.and_then(|b| b.get("self"))),
            broadcast_ack: lenient_bool(broadcast.and_then(|b| b.get("ack"))),
            presence_key,
            // Old clients send no `enabled`: presence on, as Supabase assumes.
            presence_enabled: presence.and_then(|p| p.get("enabled")).map_or(presence.is_some(), |e| lenient_bool(Some(e))),
            private: lenient_bool(section("private")),
            bindings,
            access_token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn what_supabase_js_sends() {
        let payload = json!({
            "config": {
                "broadcast": {"self": true, "ack": "true"},
                "presence": {"key": "u1", "enabled": true},
                "postgres_changes": [{"event": "*", "schema": "public", "table": "orders", "filter": "id=eq.1"}],
                "private": false
            },
            "access_token": "eyJ.x.y",
            "version": "realtime-js/2.119.2"
        });
        let join = JoinRequest::parse(&payload).unwrap();
        assert!(join.broadcast_self && join.broadcast_ack && join.presence_enabled && !join.private);
        assert_eq!(join.presence_key.as_deref(), Some("u1"));
        assert_eq!(join.bindings.len(), 1);
        assert_eq!(join.access_token.as_deref(), Some("eyJ.x.y"));
        let bare = JoinRequest::parse(&json!({})).unwrap();
        assert!(!bare.broadcast_self && !bare.presence_enabled && bare.bindings.is_empty() && bare.access_token.is_none());
        let api_key = JoinRequest::parse(&json!({"access_token": "sb_publishable_x"})).unwrap();
        assert_eq!(api_key.access_token, None);
        assert!(JoinRequest::parse(&json!({"config": {"postgres_changes": {}}})).is_err());
    }

    #[test]
    fn channel_names() {
        assert_eq!(channel_name("realtime:room1"), Ok("room1"));
        assert!(channel_name("realtime:").is_err());
        assert!(channel_name("phoenix").is_err());
        assert!(channel_name(&format!("realtime:{}", "x".repeat(201))).is_err());
    }
}
