//! supabase-js clients in a Node process (tests/supabase/driver.mjs), driven from a test through
//! the generic JSON-line driver (tests/common/driver.rs). Each client is a real
//! `createClient(url, token, { realtime: { vsn, transport } })` of @supabase/supabase-js
//! 2.119.2; channels are named by the test and record what their callbacks get (broadcast,
//! presence sync / join / leave, postgres_changes, system) along with the hub's `seq` read from
//! the frame being dispatched.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::driver::NodeDriver;
use crate::common::node;

fn npm_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/supabase")
}

/// node and the pinned packages (tests/supabase/package-lock.json), installed if missing.
pub fn ensure_installed() {
    node::ensure_node(20, "the Supabase Realtime tests");
    node::npm_ci(&npm_dir(), "the Supabase Realtime tests (@supabase/supabase-js, ws)");
}

/// A listener of a channel: `.on(type, filter, callback)`.
pub fn broadcast(event: &str) -> Value {
    json!({"type": "broadcast", "filter": {"event": event}})
}

pub fn presence(event: &str) -> Value {
    json!({"type": "presence", "filter": {"event": event}})
}

/// `postgres_changes` with `filter` the binding object (`{event, schema, table?, filter?}`,
/// plus the hub's `since_seq` / `snapshot` when a test asks for them).
pub fn changes(filter: Value) -> Value {
    json!({"type": "postgres_changes", "filter": filter})
}

pub fn system() -> Value {
    json!({"type": "system", "filter": {}})
}

pub struct SbDriver {
    pub node: NodeDriver,
}

impl SbDriver {
    pub async fn start() -> SbDriver {
        ensure_installed();
        let mut node = NodeDriver::start("supabase", &npm_dir(), "driver.mjs").await;
        let versions = node.call(json!({"cmd": "ping"})).await;
        assert_eq!(versions["supabase"], json!("2.119.2"), "tests/supabase/package.json pins @supabase/supabase-js 2.119.2: {versions}");
        assert_eq!(versions["ws"], json!("8.18.3"), "tests/supabase/package.json pins ws 8.18.3: {versions}");
        SbDriver { node }
    }

    pub async fn call(&mut self, command: Value) -> Value {
        self.node.call(command).await
    }

    /// `createClient(url, token, { realtime: { vsn, transport } })`.
    pub async fn create(&mut self, client: &str, url: &str, token: &str, vsn: &str) {
        self.call(json!({"cmd": "create", "client": client, "url": url, "token": token, "vsn": vsn})).await;
    }

    /// A bare `new RealtimeClient('ws://host/realtime/v1', { params: { apikey: token }, vsn })`.
    pub async fn create_bare(&mut self, client: &str, url: &str, token: &str, vsn: &str) {
        self.call(json!({"cmd": "create", "client": client, "url": url, "token": token, "vsn": vsn, "bare": true})).await;
    }

    /// A client with third-party auth: `createClient(url, key, { accessToken: async () => ... })`,
    /// the callback answering `user_token` (`None`: not signed in) until `set_user_token`.
    pub async fn create_third_party(&mut self, client: &str, url: &str, key: &str, vsn: &str, user_token: Option<&str>) {
        self.call(json!({"cmd": "create", "client": client, "url": url, "token": key, "vsn": vsn, "accessToken": user_token})).await;
    }

    pub async fn set_user_token(&mut self, client: &str, token: &str) {
        self.call(json!({"cmd": "setUserToken", "client": client, "token": token})).await;
    }

    /// `supabase.realtime.setAuth()`: the token from the client's own source.
    pub async fn refresh_auth(&mut self, client: &str) {
        self.call(json!({"cmd": "setAuth", "client": client})).await;
    }

    pub async fn await_access_token(&mut self, client: &str, token: &str) {
        self.call(json!({"cmd": "awaitAccessToken", "client": client, "token": token})).await;
    }

    /// A client that sends a heartbeat every `heartbeat` (supabase-js's default is 25 s).
    pub async fn create_with_heartbeat(&mut self, client: &str, url: &str, token: &str, vsn: &str, heartbeat: Duration) {
        let ms = heartbeat.as_millis() as u64;
        self.call(json!({"cmd": "create", "client": client, "url": url, "token": token, "vsn": vsn, "heartbeatIntervalMs": ms})).await;
    }

    /// `{connects, connected, heartbeats}`: sockets opened, connected now, heartbeats answered ok.
    pub async fn stats(&mut self, client: &str) -> Value {
        self.call(json!({"cmd": "stats", "client": client})).await
    }

    /// A client with synchub-since (clients/supabase/synchub-since.mjs) keeping its positions
    /// in the driver's in-memory storage named `storage`.
    pub async fn create_with_since(&mut self, client: &str, url: &str, token: &str, vsn: &str, storage: &str) {
        self.call(json!({"cmd": "create", "client": client, "url": url, "token": token, "vsn": vsn, "since": {"storage": storage}})).await;
    }

    /// `supabase.channel(name, {config}).on(...).subscribe()`, waiting for SUBSCRIBED; returns
    /// `{status, joinReply}`. The channel is `name` in later commands.
    pub async fn subscribe(&mut self, client: &str, name: &str, config: Value, listen: &[Value]) -> Value {
        self.call(json!({"cmd": "subscribe", "client": client, "name": name, "config": config, "listen": listen})).await
    }

    /// As `subscribe`, restoring the channel's synchub-since position first.
    pub async fn subscribe_since(&mut self, client: &str, name: &str, config: Value, listen: &[Value]) -> Value {
        self.call(json!({"cmd": "subscribe", "client": client, "name": name, "config": config, "listen": listen, "since": true})).await
    }

    /// As `subscribe`, returning the first status whatever it is (`{status, error?}`).
    pub async fn subscribe_any(&mut self, client: &str, name: &str, config: Value, listen: &[Value], wait: Duration) -> Value {
        let ms = wait.as_millis() as u64;
        self.call(json!({"cmd": "subscribe", "client": client, "name": name, "config": config, "listen": listen, "wait": "any", "timeoutMs": ms})).await
    }

    pub async fn await_status(&mut self, client: &str, channel: &str, status: &str, after: usize, wait: Duration) -> Value {
        self.call(json!({"cmd": "awaitStatus", "client": client, "channel": channel, "status": status, "after": after, "timeoutMs": wait.as_millis() as u64}))
            .await
    }

    pub async fn statuses(&mut self, client: &str, channel: &str) -> Vec<Value> {
        array(self.call(json!({"cmd": "statuses", "client": client, "channel": channel})).await)
    }

    /// Every recorded event of the channel, oldest first.
    pub async fn events(&mut self, client: &str, channel: &str) -> Vec<Value> {
        array(self.call(json!({"cmd": "events", "client": client, "channel": channel})).await)
    }

    pub async fn events_of(&mut self, client: &str, channel: &str, kind: &str) -> Vec<Value> {
        array(self.call(json!({"cmd": "events", "client": client, "channel": channel, "kind": kind})).await)
    }

    /// Wait for at least `count` events of `kind` (all of them are returned).
    pub async fn await_events(&mut self, client: &str, channel: &str, kind: &str, count: usize) -> Vec<Value> {
        array(self.call(json!({"cmd": "awaitEvents", "client": client, "channel": channel, "kind": kind, "count": count})).await)
    }

    pub async fn await_events_for(&mut self, client: &str, channel: &str, kind: &str, count: usize, wait: Duration) -> Vec<Value> {
        let ms = wait.as_millis() as u64;
        array(self.call(json!({"cmd": "awaitEvents", "client": client, "channel": channel, "kind": kind, "count": count, "timeoutMs": ms})).await)
    }

    /// Wait for at least `count` events of binding (listener index) `binding`.
    pub async fn await_binding(&mut self, client: &str, channel: &str, binding: usize, count: usize) -> Vec<Value> {
        array(self.call(json!({"cmd": "awaitEvents", "client": client, "channel": channel, "binding": binding, "count": count})).await)
    }

    pub async fn await_presence(&mut self, client: &str, channel: &str, event: &str, count: usize) -> Vec<Value> {
        array(self.call(json!({"cmd": "awaitEvents", "client": client, "channel": channel, "kind": "presence", "event": event, "count": count})).await)
    }

    /// `channel.send({type: 'broadcast', event, payload})`: "ok", "timed out" or "error". A
    /// channel the client never subscribed sends over REST, as supabase-js does.
    pub async fn send(&mut self, client: &str, channel: &str, event: &str, payload: Value) -> String {
        let answer = self.call(json!({"cmd": "send", "client": client, "channel": channel, "event": event, "payload": payload})).await;
        answer.as_str().unwrap_or_else(|| panic!("send answers a string, not {answer}")).to_owned()
    }

    /// `channel.httpSend(event, payload)`: `{success: true}`, `{success: false, ...}` or `{error}`.
    pub async fn http_send(&mut self, client: &str, channel: &str, event: &str, payload: Value) -> Value {
        self.call(json!({"cmd": "httpSend", "client": client, "channel": channel, "event": event, "payload": payload})).await
    }

    pub async fn track(&mut self, client: &str, channel: &str, payload: Value) -> String {
        self.call(json!({"cmd": "track", "client": client, "channel": channel, "payload": payload})).await.as_str().unwrap_or_default().to_owned()
    }

    pub async fn untrack(&mut self, client: &str, channel: &str) -> String {
        self.call(json!({"cmd": "untrack", "client": client, "channel": channel})).await.as_str().unwrap_or_default().to_owned()
    }

    pub async fn presence_state(&mut self, client: &str, channel: &str) -> Value {
        self.call(json!({"cmd": "presenceState", "client": client, "channel": channel})).await
    }

    pub async fn set_auth(&mut self, client: &str, token: &str) {
        self.call(json!({"cmd": "setAuth", "client": client, "token": token})).await;
    }

    pub async fn remove_channel(&mut self, client: &str, channel: &str) -> String {
        self.call(json!({"cmd": "removeChannel", "client": client, "channel": channel})).await.as_str().unwrap_or_default().to_owned()
    }

    /// Cut the client's socket like a network failure, and keep it from reconnecting.
    pub async fn offline(&mut self, client: &str) {
        self.call(json!({"cmd": "offline", "client": client})).await;
    }

    /// Let the client reconnect (supabase-js retries after 1, 2, 5, 10 s).
    pub async fn online(&mut self, client: &str) {
        self.call(json!({"cmd": "online", "client": client})).await;
    }

    /// Remove every channel and close the socket.
    pub async fn close(&mut self, client: &str) {
        self.call(json!({"cmd": "close", "client": client})).await;
    }

    /// Decoded frames of the client (heartbeats left out), of `topic` if given.
    pub async fn wire(&mut self, client: &str, topic: Option<&str>) -> Vec<Value> {
        array(self.call(json!({"cmd": "wire", "client": client, "topic": topic})).await)
    }

    /// Received frames with full payloads, of `topic` and `event`.
    pub async fn raw(&mut self, client: &str, topic: &str, event: &str) -> Vec<Value> {
        array(self.call(json!({"cmd": "raw", "client": client, "topic": topic, "event": event})).await)
    }

    pub async fn refusals(&mut self, client: &str) -> Vec<Value> {
        array(self.call(json!({"cmd": "refusals", "client": client})).await)
    }

    pub async fn describe(&mut self, client: &str) -> String {
        self.call(json!({"cmd": "describe", "client": client})).await.as_str().unwrap_or_default().to_owned()
    }

    /// synchub-since's view of a channel: `{position, lost, joinPayload}`.
    pub async fn since_position(&mut self, client: &str, channel: &str) -> Value {
        self.call(json!({"cmd": "sincePosition", "client": client, "channel": channel})).await
    }

    /// A named storage of the driver: `{values: {key: json text}, writes}`.
    pub async fn storage(&mut self, storage: &str) -> Value {
        self.call(json!({"cmd": "storage", "storage": storage})).await
    }

    /// Fails the test when client code threw anything (supabase-js choking on a frame).
    pub async fn assert_no_client_errors(&mut self) {
        let errors = array(self.call(json!({"cmd": "errors"})).await);
        assert!(errors.is_empty(), "exceptions were thrown inside the supabase-js clients: {errors:#?}");
    }

    pub async fn exit(self) {
        self.node.exit().await;
    }
}

pub fn array(value: Value) -> Vec<Value> {
    match value {
        Value::Array(items) => items,
        other => panic!("expected an array from the driver, got {other}"),
    }
}
