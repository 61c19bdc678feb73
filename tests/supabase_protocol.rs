//! Supabase Realtime's Phoenix protocol at the frame level, with a raw WebSocket client: what
//! supabase-js never sends on purpose but a hub must answer as Phoenix and Supabase do
//! (unjoined topics, duplicate joins, refused joins and their `"Code: message"` reasons,
//! limits, expiring tokens, unreadable frames), in both serializers. The supabase-js suite
//! (`supabase_realtime.rs`) covers what the real client does.

mod common;

use std::time::Duration;

use common::{token, TestHub, SECRET, WAIT};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Vsn {
    V1,
    V2,
}

impl Vsn {
    fn as_str(self) -> &'static str {
        match self {
            Vsn::V1 => "1.0.0",
            Vsn::V2 => "2.0.0",
        }
    }
}

/// One Phoenix message as the hub sent it.
#[derive(Debug, Clone)]
struct Msg {
    join_ref: Value,
    msg_ref: Value,
    topic: String,
    event: String,
    payload: Value,
}

struct Phoenix {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    vsn: Vsn,
    next_ref: u64,
}

impl Phoenix {
    async fn connect(hub: &TestHub, vsn: Vsn, apikey: &str) -> Phoenix {
        let url = format!("ws://{}/realtime/v1/websocket?apikey={apikey}&vsn={}", hub.addr, vsn.as_str());
        let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("upgrade");
        Phoenix { ws, vsn, next_ref: 0 }
    }

    /// Send a message; returns its ref.
    async fn send(&mut self, join_ref: Option<&str>, topic: &str, event: &str, payload: Value) -> String {
        self.next_ref += 1;
        let msg_ref = self.next_ref.to_string();
        let text = match self.vsn {
            Vsn::V1 => json!({"join_ref": join_ref, "ref": msg_ref, "topic": topic, "event": event, "payload": payload}).to_string(),
            Vsn::V2 => json!([join_ref, msg_ref, topic, event, payload]).to_string(),
        };
        self.ws.send(Message::Text(text)).await.unwrap();
        msg_ref
    }

    async fn next(&mut self) -> Option<Msg> {
        loop {
            let frame = tokio::time::timeout(WAIT, self.ws.next()).await.ok()??.ok()?;
            let value: Value = match frame {
                Message::Text(text) => serde_json::from_str(&text).unwrap(),
                Message::Binary(bytes) => return Some(decode_kind4(&bytes)),
                Message::Close(_) => return None,
                _ => continue,
            };
            return Some(match value {
                Value::Array(parts) => Msg {
                    join_ref: parts[0].clone(),
                    msg_ref: parts[1].clone(),
                    topic: parts[2].as_str().unwrap().to_owned(),
                    event: parts[3].as_str().unwrap().to_owned(),
                    payload: parts[4].clone(),
                },
                object => Msg {
                    join_ref: object["join_ref"].clone(),
                    msg_ref: object["ref"].clone(),
                    topic: object["topic"].as_str().unwrap().to_owned(),
                    event: object["event"].as_str().unwrap().to_owned(),
                    payload: object["payload"].clone(),
                },
            });
        }
    }

    /// The next message matching `pick`, skipping others.
    async fn expect(&mut self, what: &str, mut pick: impl FnMut(&Msg) -> bool) -> Msg {
        loop {
            let msg = self.next().await.unwrap_or_else(|| panic!("socket ended waiting for {what}"));
            if pick(&msg) {
                return msg;
            }
        }
    }

    async fn reply(&mut self, msg_ref: &str) -> Value {
        let r = msg_ref.to_owned();
        self.expect("a reply", |m| m.event == "phx_reply" && m.msg_ref == json!(r)).await.payload
    }

    async fn join(&mut self, topic: &str, payload: Value) -> (String, Value) {
        self.next_ref += 1;
        let join_ref = (self.next_ref + 1).to_string();
        let msg_ref = self.send(Some(&join_ref), topic, "phx_join", payload).await;
        // `send` numbered the message with the ref after `join_ref`'s; use that as the join ref.
        (msg_ref.clone(), self.reply(&msg_ref).await)
    }

    /// Nothing but heartbeat-free silence for `wait`.
    async fn quiet(&mut self, wait: Duration) -> Option<Msg> {
        match tokio::time::timeout(wait, self.next()).await {
            Ok(msg) => msg,
            Err(_) => None,
        }
    }
}

/// A token like `common::token`, signed with `secret`.
fn token_signed_with(tenant: &str, user: &str, role: &str, secret: &str) -> String {
    let claims = json!({"sub": user, "role": role, "tenant_id": tenant, "exp": synchub::auth::unix_now() + 3600});
    synchub::auth::mint_hs256(secret, &claims)
}

/// A token that expires in `secs` seconds.
fn token_expiring_in(tenant: &str, user: &str, role: &str, secs: u64) -> String {
    let claims = json!({"sub": user, "role": role, "tenant_id": tenant, "exp": synchub::auth::unix_now() + secs});
    synchub::auth::mint_hs256(SECRET, &claims)
}

/// A vsn 2 binary broadcast (kind 4) as the client decodes it.
fn decode_kind4(bytes: &[u8]) -> Msg {
    assert_eq!(bytes[0], 4, "the hub sends binary kind 4 only");
    let (topic_len, event_len, meta_len, enc) = (bytes[1] as usize, bytes[2] as usize, bytes[3] as usize, bytes[4]);
    let mut at = 5;
    let topic = String::from_utf8(bytes[at..at + topic_len].to_vec()).unwrap();
    at += topic_len;
    let event = String::from_utf8(bytes[at..at + event_len].to_vec()).unwrap();
    at += event_len + meta_len;
    assert_eq!(enc, 1, "JSON payloads");
    let payload: Value = serde_json::from_slice(&bytes[at..]).unwrap();
    Msg { join_ref: Value::Null, msg_ref: Value::Null, topic, event: "broadcast".into(), payload: json!({"type": "broadcast", "event": event, "payload": payload}) }
}

/// A user broadcast push as supabase-js's vsn 2 serializer writes it (kind 3).
fn kind3(join_ref: &str, msg_ref: &str, topic: &str, event: &str, encoding: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![3, join_ref.len() as u8, msg_ref.len() as u8, topic.len() as u8, event.len() as u8, 0, encoding];
    for part in [join_ref, msg_ref, topic, event] {
        out.extend_from_slice(part.as_bytes());
    }
    out.extend_from_slice(payload);
    out
}

fn reason(reply: &Value) -> &str {
    assert_eq!(reply["status"], "error", "{reply}");
    reply["response"]["reason"].as_str().unwrap_or_default()
}

fn ok(reply: &Value) {
    assert_eq!(reply["status"], "ok", "{reply}");
}

async fn each_vsn<F, Fut>(test: F)
where
    F: Fn(Vsn) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    test(Vsn::V1).await;
    test(Vsn::V2).await;
}

#[actix_web::test]
async fn heartbeats_unjoined_topics_duplicate_joins_and_leaves() {
    each_vsn(|vsn| async move {
        let hub = TestHub::start().await;
        let key = token("t1", "u1", "authenticated", None);
        let mut c = Phoenix::connect(&hub, vsn, &key).await;
        let beat = c.send(None, "phoenix", "heartbeat", json!({})).await;
        ok(&c.reply(&beat).await);

        let stray = c.send(Some("9"), "realtime:nowhere", "broadcast", json!({"type": "broadcast", "event": "e", "payload": {}})).await;
        assert_eq!(reason(&c.reply(&stray).await), "unmatched topic");

        let (first, reply) = c.join("realtime:room1", json!({"config": {"broadcast": {"ack": true}}})).await;
        ok(&reply);
        assert_eq!(reply["response"]["postgres_changes"], json!([]), "no bindings: an empty list");
        // A second join of the same topic closes the first (phx_close to its join ref) and joins anew.
        c.next_ref += 1;
        let second = (c.next_ref + 1).to_string();
        let asked = c.send(Some(&second), "realtime:room1", "phx_join", json!({"config": {"broadcast": {"ack": true}}})).await;
        let closed = c.next().await.expect("phx_close of the first join");
        assert_eq!((closed.event.as_str(), &closed.join_ref), ("phx_close", &json!(first)), "{closed:?}");
        ok(&c.reply(&asked).await);
        assert_ne!(first, second);
        let leave = c.send(Some(&second), "realtime:room1", "phx_leave", json!({})).await;
        ok(&c.reply(&leave).await);
        let closed = c.expect("phx_close", |m| m.event == "phx_close").await;
        assert_eq!(closed.topic, "realtime:room1");
        let after = c.send(Some(&second), "realtime:room1", "broadcast", json!({"type": "broadcast", "event": "e", "payload": {}})).await;
        assert_eq!(reason(&c.reply(&after).await), "unmatched topic", "a left channel takes nothing");

        for (topic, why) in [("realtime:", "TopicNameInvalid"), ("room1", "TopicNameInvalid")] {
            let (_, reply) = c.join(topic, json!({})).await;
            assert!(reason(&reply).starts_with(why), "{topic}: {reply}");
        }
        // Unreadable frames are dropped; the socket goes on.
        c.ws.send(Message::Text("{not json".into())).await.unwrap();
        c.ws.send(Message::Binary(vec![9, 9, 9].into())).await.unwrap();
        let beat = c.send(None, "phoenix", "heartbeat", json!({})).await;
        ok(&c.reply(&beat).await);
        hub.shutdown().await;
    })
    .await;
}

#[actix_web::test]
async fn refused_joins_say_why_in_supabases_words() {
    each_vsn(|vsn| async move {
        let hub = TestHub::start_with(|c| {
            c.supabase_max_channels_per_socket = 2;
            c.supabase_private_channels = vec![synchub::config::PrivateChannelRule { prefix: "staff:".into(), roles: vec!["Manager".into()] }];
        })
        .await;
        let key = token("t1", "u1", "authenticated", None);
        let mut c = Phoenix::connect(&hub, vsn, &key).await;
        let private = json!({"config": {"private": true}});
        let (_, reply) = c.join("realtime:staff:room", private.clone()).await;
        assert!(reason(&reply).starts_with("Unauthorized: You do not have permissions to read from this Channel topic: staff:room"), "{reply}");
        let manager = token("t1", "u2", "Manager", None);
        let (_, reply) = c.join("realtime:staff:room", json!({"config": {"private": true}, "access_token": manager})).await;
        ok(&reply);
        let (_, reply) = c.join("realtime:other", private).await;
        assert!(reason(&reply).starts_with("Unauthorized"), "no rule names `other`: {reply}");

        let bad = |binding: Value| json!({"config": {"postgres_changes": [binding]}});
        let cases = [
            (bad(json!({"event": "*", "schema": "public", "table": "nope"})), "RealtimeDisabledForConfiguration"),
            (bad(json!({"event": "TRUNCATE", "schema": "public", "table": "products"})), "InvalidFilter"),
            (bad(json!({"event": "*", "schema": "public", "table": "products", "filter": "stock=like.5"})), "InvalidFilter"),
            (bad(json!({"event": "*", "schema": "public", "table": "products", "filter": "nope=eq.5"})), "InvalidFilter"),
            (bad(json!({"event": "*", "schema": "public", "table": "products", "filter": "stock=eq.many"})), "InvalidFilter"),
            (bad(json!({"event": "*", "schema": "public", "filter": "stock=eq.5"})), "InvalidFilter"),
            (json!({"config": {"postgres_changes": "all"}}), "InvalidJoinPayload"),
        ];
        for (payload, code) in cases {
            let (_, reply) = c.join("realtime:changes", payload.clone()).await;
            assert!(reason(&reply).starts_with(code), "{payload} → {reply}");
        }
        let other_tenant = token("t2", "u1", "authenticated", None);
        let (_, reply) = c.join("realtime:x", json!({"access_token": other_tenant})).await;
        assert!(reason(&reply).starts_with("Unauthorized"), "{reply}");
        let wrong_key = token_signed_with("t1", "u1", "authenticated", "not-the-secret");
        let (_, reply) = c.join("realtime:x", json!({"access_token": wrong_key})).await;
        assert!(reason(&reply).starts_with("Unauthorized"), "{reply}");

        let (_, reply) = c.join("realtime:second", json!({})).await;
        ok(&reply);
        let (_, reply) = c.join("realtime:third", json!({})).await;
        assert!(reason(&reply).starts_with("ChannelRateLimitReached"), "at most 2 channels: {reply}");
        hub.shutdown().await;
    })
    .await;
}

#[actix_web::test]
async fn a_refused_key_or_vsn_gets_no_socket() {
    let hub = TestHub::start().await;
    let wrong = token_signed_with("t1", "u1", "authenticated", "not-the-secret");
    for url in [
        format!("ws://{}/realtime/v1/websocket?apikey={wrong}&vsn=1.0.0", hub.addr),
        format!("ws://{}/realtime/v1/websocket?vsn=2.0.0", hub.addr),
        format!("ws://{}/realtime/v1/websocket?apikey={}&vsn=3.0.0", hub.addr, token("t1", "u1", "r", None)),
    ] {
        match tokio_tungstenite::connect_async(&url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert!(matches!(response.status().as_u16(), 400 | 401), "{url}: {}", response.status());
                let body: Value = serde_json::from_slice(response.body().as_deref().unwrap_or_default()).unwrap();
                assert!(body["error"].is_string(), "{body}");
            }
            other => panic!("{url}: expected an HTTP refusal, got {:?}", other.map(|_| ())),
        }
    }
    hub.shutdown().await;
}

#[actix_web::test]
async fn broadcasts_in_both_serializers_and_refusals_of_what_cannot_be_relayed() {
    let hub = TestHub::start().await;
    let key = token("t1", "u1", "authenticated", None);
    let mut v1 = Phoenix::connect(&hub, Vsn::V1, &key).await;
    let mut v2 = Phoenix::connect(&hub, Vsn::V2, &key).await;
    let config = json!({"config": {"broadcast": {"self": true, "ack": true}}});
    let (_, reply) = v1.join("realtime:room1", config.clone()).await;
    ok(&reply);
    let (join2, reply) = v2.join("realtime:room1", config).await;
    ok(&reply);
    // A kind-3 binary push from the vsn 2 client reaches both, the vsn 2 one as kind 4.
    v2.next_ref += 1;
    let push_ref = v2.next_ref.to_string();
    let frame = kind3(&join2, &push_ref, "realtime:room1", "cursor", 1, br#"{"x":7}"#);
    v2.ws.send(Message::Binary(frame.into())).await.unwrap();
    ok(&v2.reply(&push_ref).await);
    for c in [&mut v1, &mut v2] {
        let got = c.expect("the broadcast", |m| m.event == "broadcast").await;
        assert_eq!(got.topic, "realtime:room1");
        assert_eq!(got.payload, json!({"type": "broadcast", "event": "cursor", "payload": {"x": 7}}));
    }
    // Binary payloads cannot reach JSON clients: refused, with the ack.
    v2.next_ref += 1;
    let push_ref = v2.next_ref.to_string();
    v2.ws.send(Message::Binary(kind3(&join2, &push_ref, "realtime:room1", "blob", 0, &[1, 2, 3]).into())).await.unwrap();
    assert!(reason(&v2.reply(&push_ref).await).starts_with("PayloadFormatNotSupported"));
    let big = "x".repeat(70_000);
    let too_big = v1.send(None, "realtime:room1", "broadcast", json!({"type": "broadcast", "event": "e", "payload": {"big": big}})).await;
    assert!(reason(&v1.reply(&too_big).await).starts_with("PayloadTooLarge"));
    assert!(v2.quiet(Duration::from_millis(300)).await.is_none(), "nothing refused was relayed");
    hub.shutdown().await;
}

#[actix_web::test]
async fn a_channel_whose_token_expires_is_told_and_closed_while_the_socket_lives() {
    each_vsn(|vsn| async move {
        let hub = TestHub::start_with(|c| c.jwt_leeway_secs = 0).await;
        let key = token("t1", "u1", "authenticated", None);
        let mut c = Phoenix::connect(&hub, vsn, &key).await;
        let short = token_expiring_in("t1", "u1", "authenticated", 2);
        let (_, reply) = c.join("realtime:short", json!({"access_token": short})).await;
        ok(&reply);
        let (_, reply) = c.join("realtime:long", json!({})).await;
        ok(&reply);
        let system = c.expect("the expiry", |m| m.event == "system").await;
        assert_eq!(system.topic, "realtime:short");
        assert_eq!(system.payload["status"], "error");
        assert_eq!(system.payload["message"], "Token has expired");
        let closed = c.expect("phx_close", |m| m.event == "phx_close").await;
        assert_eq!(closed.topic, "realtime:short");
        let beat = c.send(None, "phoenix", "heartbeat", json!({})).await;
        ok(&c.reply(&beat).await);
        let still = c.send(None, "realtime:long", "presence", json!({"type": "presence", "event": "track", "payload": {"a": 1}})).await;
        ok(&c.reply(&still).await);
        // A refreshed token that does not verify closes the channel it was sent on.
        let wrong = token_signed_with("t1", "u1", "authenticated", "not-the-secret");
        c.send(None, "realtime:long", "access_token", json!({"access_token": wrong})).await;
        let system = c.expect("the refusal", |m| m.event == "system").await;
        assert!(system.payload["message"].as_str().unwrap().starts_with("Unauthorized"), "{:?}", system.payload);
        assert_eq!(c.expect("phx_close", |m| m.event == "phx_close").await.topic, "realtime:long");
        hub.shutdown().await;
    })
    .await;
}

#[actix_web::test]
async fn limits_on_joins_and_messages_per_second_are_answered_per_socket() {
    let hub = TestHub::start_with(|c| {
        c.supabase_joins_per_second = 3;
        c.supabase_messages_per_second = 2;
    })
    .await;
    let key = token("t1", "u1", "authenticated", None);
    let mut c = Phoenix::connect(&hub, Vsn::V1, &key).await;
    let mut reasons = Vec::new();
    for n in 0..5 {
        let (_, reply) = c.join(&format!("realtime:r{n}"), json!({"config": {"broadcast": {"ack": true}}})).await;
        reasons.push(reply["response"]["reason"].as_str().unwrap_or("ok").to_owned());
    }
    assert_eq!(&reasons[..3], ["ok", "ok", "ok"]);
    assert!(reasons[3..].iter().all(|r| r.starts_with("ClientJoinRateLimitReached")), "{reasons:?}");
    let mut answers = Vec::new();
    for _ in 0..4 {
        let r = c.send(None, "realtime:r0", "broadcast", json!({"type": "broadcast", "event": "e", "payload": {}})).await;
        answers.push(c.reply(&r).await);
    }
    assert!(answers[..2].iter().all(|a| a["status"] == "ok"), "{answers:?}");
    assert!(answers[2..].iter().all(|a| reason(a).starts_with("ClientMessageRateLimitReached")), "{answers:?}");
    // Another socket of the tenant is not limited by this one.
    let mut other = Phoenix::connect(&hub, Vsn::V1, &key).await;
    let (_, reply) = other.join("realtime:r0", json!({"config": {"broadcast": {"ack": true}}})).await;
    ok(&reply);
    let r = other.send(None, "realtime:r0", "broadcast", json!({"type": "broadcast", "event": "e", "payload": {}})).await;
    ok(&other.reply(&r).await);
    hub.shutdown().await;
}

#[actix_web::test]
async fn a_project_wide_anon_key_connects_and_its_channels_bring_the_tenant() {
    each_vsn(|vsn| async move {
        let hub = TestHub::start().await;
        let anon = synchub::auth::mint_hs256(SECRET, &json!({"role": "anon", "exp": synchub::auth::unix_now() + 3600}));
        let mut c = Phoenix::connect(&hub, vsn, &anon).await;
        let beat = c.send(None, "phoenix", "heartbeat", json!({})).await;
        ok(&c.reply(&beat).await);
        let (_, reply) = c.join("realtime:room1", json!({})).await;
        assert!(reason(&reply).starts_with("Unauthorized"), "no tenant without a user's token: {reply}");
        let user = token("t1", "u1", "authenticated", None);
        let (_, reply) = c.join("realtime:room1", json!({"access_token": user, "config": {"broadcast": {"ack": true}}})).await;
        ok(&reply);
        let (_, reply) = c.join("realtime:room2", json!({})).await;
        ok(&reply);
        let other = token("t2", "u9", "authenticated", None);
        let (_, reply) = c.join("realtime:room3", json!({"access_token": other})).await;
        assert!(reason(&reply).starts_with("Unauthorized"), "one tenant per socket: {reply}");

        // A key with neither a tenant nor a role is refused at the upgrade.
        let roleless = synchub::auth::mint_hs256(SECRET, &json!({"exp": synchub::auth::unix_now() + 3600}));
        let url = format!("ws://{}/realtime/v1/websocket?apikey={roleless}&vsn={}", hub.addr, vsn.as_str());
        match tokio_tungstenite::connect_async(&url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status().as_u16(), 401),
            other => panic!("expected 401, got {:?}", other.map(|_| ())),
        }
        hub.shutdown().await;
    })
    .await;
}
