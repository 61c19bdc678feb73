//! `SupabaseSession`: one actor per `/realtime/v1/websocket` socket, translating Phoenix
//! channels onto the hub's own paths. The socket is one session of its tenant (so native
//! presence lists it); each joined channel is a topic of the tenant actor (broadcasts and
//! presence) and, with `postgres_changes` bindings, a reader of the tenant's one ordered
//! stream, followed with [`Follower`] so that a binding gets every change after its position
//! once and in order, from memory, the log, or live.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix::WeakAddr;
use actix_web_actors::ws;
use bytestring::ByteString;
use protocol::{CloseCode, Delta, ErrorCode, SessionMode};
use serde_json::{json, Value};

use super::changes::{self, Binding, Stamp};
use super::join::{channel_name, JoinRequest};
use super::wire::{self, BroadcastData, Inbound, InboundPayload, Vsn};
use crate::actors::messages::{
    Broadcast, JoinTopic, LeaveTopic, LiveFrame, Notice, RefreshToken, SessionControl, SharedFrame, Subscribe, Topic, TopicEvent, TopicEventKind,
    Track, Unsubscribe, NO_SUCH_SESSION,
};
use crate::actors::sweep::{unix_ms, AdapterRecipients, SessionAddr};
use crate::actors::tenant::TenantActor;
use crate::auth::{unix_now, Identity};
use crate::error::Error;
use crate::ids::{DeviceId, Seq, SUPABASE_DEVICE_PREFIX};
use crate::limits::{Bucket, Rate};
use crate::rules::AccessView;
use crate::server::Hub;
use crate::storage::subscriptions::SnapshotRefusal;
use crate::transport::follow::{read_after, AfterPage, Follower, LiveVerdict, StreamRead};
use crate::transport::fragments::Fragments;
use crate::transport::socket::{Inbound as SocketInbound, SocketCore};

/// After a stream read that failed, when it is tried again.
const READ_RETRY: Duration = Duration::from_secs(1);

/// One joined channel.
struct Channel {
    join_ref: Option<String>,
    /// The wire topic, `realtime:<name>`.
    wire_topic: String,
    topic: Topic,
    /// Numbers joins, so that the end of an older join's work is not taken for a newer one's.
    generation: u64,
    /// The join was answered `ok`: the channel takes events.
    joined: bool,
    identity: Identity,
    view: Option<Arc<AccessView>>,
    ack: bool,
    presence_key: Arc<str>,
    bindings: Vec<Binding>,
}

pub struct SupabaseSession {
    core: SocketCore,
    vsn: Vsn,
    /// Who the socket is for its tenant: the `apikey` verified at the upgrade, or, when that
    /// key names no tenant (a project-wide anon key), the token of the first channel that
    /// brought one.
    identity: Option<Identity>,
    tenant: Option<WeakAddr<TenantActor>>,
    /// The tenant's epoch and log floor as the subscription found them.
    epoch: Arc<str>,
    log_floor: Seq,
    subscribed: bool,
    /// Messages that came before the tenant answered the subscription.
    early: VecDeque<Inbound>,
    follower: Follower,
    /// Catch-up waits for the client to read what it was sent (resumed on pong).
    read_paused: bool,
    channels: HashMap<String, Channel>,
    generations: u64,
    joins: Bucket,
    messages: Bucket,
    /// Joins whose snapshot is being read.
    pending: usize,
    fragments: Fragments,
}

impl SupabaseSession {
    pub fn new(hub: Arc<Hub>, vsn: Vsn, identity: Option<Identity>) -> SupabaseSession {
        let now = Instant::now();
        let joins = Rate::new(hub.config.supabase_joins_per_second, hub.config.supabase_joins_per_second).full(now);
        let messages = Rate::new(hub.config.supabase_messages_per_second, hub.config.supabase_messages_per_second).full(now);
        SupabaseSession {
            core: SocketCore::new(hub),
            vsn,
            identity,
            tenant: None,
            epoch: Arc::from(""),
            log_floor: 0,
            subscribed: false,
            early: VecDeque::new(),
            follower: Follower::new(),
            read_paused: false,
            channels: HashMap::new(),
            generations: 0,
            joins,
            messages,
            pending: 0,
            fragments: Fragments::default(),
        }
    }

    fn hub(&self) -> &Hub {
        &self.core.hub
    }

    // ---- writing ----

    fn text(&mut self, ctx: &mut ws::WebsocketContext<Self>, text: String) {
        self.core.text(ctx, ByteString::from(text));
    }

    /// A message the hub pushes on `topic` (no ref).
    fn push(&mut self, ctx: &mut ws::WebsocketContext<Self>, topic: &str, event: &str, payload: &str) {
        let text = wire::encode_text(self.vsn, None, None, topic, event, payload);
        self.text(ctx, text);
    }

    fn reply(&mut self, ctx: &mut ws::WebsocketContext<Self>, to: &Inbound, ok: bool, response: &Value) {
        let payload = wire::reply_payload(ok, &response.to_string());
        let text = wire::encode_text(self.vsn, to.join_ref.as_deref(), to.msg_ref.as_deref(), &to.topic, "phx_reply", &payload);
        self.text(ctx, text);
    }

    /// An error reply in Supabase's `"Code: message"` form.
    fn refuse(&mut self, ctx: &mut ws::WebsocketContext<Self>, to: &Inbound, reason: &str) {
        self.hub().metrics.supabase_refusal(reason.split(':').next().unwrap_or("error"));
        self.reply(ctx, to, false, &json!({ "reason": reason }));
    }

    fn system(&mut self, ctx: &mut ws::WebsocketContext<Self>, topic: &str, extension: &str, ok: bool, message: &str) {
        let name = topic.strip_prefix("realtime:").unwrap_or(topic);
        let payload = json!({"extension": extension, "status": if ok { "ok" } else { "error" }, "message": message, "channel": name});
        self.push(ctx, topic, "system", &payload.to_string());
    }

    fn close(&mut self, ctx: &mut ws::WebsocketContext<Self>, code: CloseCode, reason: &str) {
        if self.core.close(ctx, code, reason) {
            self.unsubscribe();
        }
    }

    fn unsubscribe(&self) {
        if let Some(tenant) = self.tenant.as_ref().and_then(WeakAddr::upgrade) {
            let _ = tenant.try_send(Unsubscribe { session: self.core.id });
        }
    }

    fn tenant(&self) -> Option<Addr<TenantActor>> {
        self.tenant.as_ref().and_then(WeakAddr::upgrade)
    }

    // ---- start ----

    /// Subscribe the socket to its tenant's stream; messages wait until it is answered.
    fn start(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        let Some(link) = self.core.link.clone() else { return self.close(ctx, CloseCode::GoingAway, "session not started") };
        let Some(identity) = self.identity.as_ref() else { return };
        let tenant = self.core.hub.registry.get(&identity.tenant);
        self.tenant = Some(tenant.downgrade());
        let subscribe = Subscribe {
            session: self.core.id,
            device: DeviceId::new(format!("{SUPABASE_DEVICE_PREFIX}{}", self.core.id)),
            user: identity.user.clone(),
            role: identity.role.clone(),
            mode: SessionMode::Dashboard,
            since_ms: unix_ms(),
            link,
            exclusive: false,
        };
        ctx.spawn(async move { tenant.send(subscribe).await }.into_actor(self).map(|head, session, ctx| {
            if session.core.closed {
                return;
            }
            let Ok(head) = head else { return session.close(ctx, CloseCode::GoingAway, "hub unavailable") };
            session.hub().metrics.supabase_sessions_opened.fetch_add(1, Ordering::Relaxed);
            session.subscribed = true;
            session.epoch = head.epoch.clone();
            session.log_floor = head.log_floor;
            session.follower.start_at(head.head_seq);
            session.read_step(ctx);
            for message in std::mem::take(&mut session.early) {
                session.handle(ctx, message);
            }
        }));
    }

    // ---- inbound ----

    fn inbound(&mut self, ctx: &mut ws::WebsocketContext<Self>, decoded: Result<Inbound, wire::WireError>) {
        let message = match decoded {
            Ok(message) => message,
            Err(err) => {
                // Nothing to answer without a ref: Phoenix drops what it cannot read.
                self.hub().metrics.supabase_refusal("malformed");
                tracing::debug!(session = %self.core.id, %err, "unreadable Phoenix frame");
                return;
            }
        };
        if !self.subscribed && self.identity.is_none() {
            return self.before_tenant(ctx, message);
        }
        if !self.subscribed {
            if self.early.len() >= self.hub().config.supabase_pending_requests {
                return self.close(ctx, CloseCode::RateLimited, "too many messages before the session started");
            }
            self.early.push_back(message);
            return;
        }
        self.handle(ctx, message);
    }

    /// A socket whose key names no tenant waits for a join whose token does: that join starts
    /// the session (it is handled once the tenant answered); heartbeats are answered meanwhile.
    fn before_tenant(&mut self, ctx: &mut ws::WebsocketContext<Self>, message: Inbound) {
        if message.topic == "phoenix" || message.event != "phx_join" {
            return self.handle(ctx, message);
        }
        let token = JoinRequest::parse(Self::json_payload(&message)).ok().and_then(|j| j.access_token);
        let verified = match token {
            Some(token) => self.hub().verifier.verify(&token).map_err(|err| format!("Unauthorized: {}", err.public_message())),
            None => Err("Unauthorized: the API key names no tenant; join with a user's token (setAuth)".to_owned()),
        };
        match verified {
            Ok(identity) => {
                // The upgrade counted keys with a tenant; this socket's tenant is known now.
                if let Err(err) = self.core.hub.limits.connect(&identity.tenant) {
                    tracing::debug!(session = %self.core.id, %err, "Supabase session refused");
                    return self.close(ctx, CloseCode::RateLimited, "too many new sessions");
                }
                self.identity = Some(identity);
                self.early.push_back(message);
                self.start(ctx);
            }
            Err(why) => self.refuse(ctx, &message, &why),
        }
    }

    fn handle(&mut self, ctx: &mut ws::WebsocketContext<Self>, message: Inbound) {
        if message.topic == "phoenix" {
            return match message.event.as_str() {
                "heartbeat" => self.reply(ctx, &message, true, &json!({})),
                _ => self.refuse(ctx, &message, "unmatched topic"),
            };
        }
        match message.event.as_str() {
            "phx_join" => self.join(ctx, message),
            "phx_leave" => self.leave(ctx, message),
            "access_token" => self.access_token(ctx, message),
            "broadcast" => self.broadcast(ctx, message),
            "presence" => self.presence(ctx, message),
            _ if !self.is_joined(&message) => self.refuse(ctx, &message, "unmatched topic"),
            // An event this hub does not know on a joined channel: Phoenix ignores it.
            _ => {}
        }
    }

    /// Whether the message's topic is a joined channel (of the same join, when it says which).
    fn is_joined(&self, message: &Inbound) -> bool {
        self.channels.get(&message.topic).is_some_and(|c| c.joined && (message.join_ref.is_none() || message.join_ref == c.join_ref))
    }

    fn json_payload(message: &Inbound) -> &Value {
        static NULL: Value = Value::Null;
        match &message.payload {
            InboundPayload::Json(value) => value,
            InboundPayload::UserBroadcast { .. } => &NULL,
        }
    }

    // ---- joins ----

    fn join(&mut self, ctx: &mut ws::WebsocketContext<Self>, message: Inbound) {
        self.hub().metrics.supabase_joins.fetch_add(1, Ordering::Relaxed);
        let name = match channel_name(&message.topic) {
            Ok(name) => name.to_owned(),
            Err(why) => return self.refuse(ctx, &message, &why),
        };
        let rate = Rate::new(self.hub().config.supabase_joins_per_second, self.hub().config.supabase_joins_per_second);
        if rate.take(&mut self.joins, Instant::now()).is_err() {
            return self.refuse(ctx, &message, "ClientJoinRateLimitReached: Too many joins per second");
        }
        let request = match JoinRequest::parse(Self::json_payload(&message)) {
            Ok(request) => request,
            Err(why) => return self.refuse(ctx, &message, &why),
        };
        // A second join of a joined topic replaces it, as Phoenix does.
        if let Some(old) = self.channels.remove(&message.topic) {
            self.drop_channel(ctx, old, true);
        }
        let max = self.hub().config.supabase_max_channels_per_socket;
        if self.channels.len() >= max {
            return self.refuse(ctx, &message, &format!("ChannelRateLimitReached: Too many channels (at most {max} per connection)"));
        }
        if self.pending >= self.hub().config.supabase_pending_requests {
            return self.refuse(ctx, &message, "ClientJoinRateLimitReached: too many joins are being read; retry");
        }
        let identity = match self.channel_identity(request.access_token.as_deref()) {
            Ok(identity) => identity,
            Err(why) => return self.refuse(ctx, &message, &why),
        };
        if request.private && !self.hub().config.may_join_private(&name, &identity.role) {
            return self.refuse(ctx, &message, &format!("Unauthorized: You do not have permissions to read from this Channel topic: {name}"));
        }
        let view = self.hub().rules.view_for(&identity);
        let catalog = self.hub().store.catalog();
        let mut bindings = Vec::with_capacity(request.bindings.len());
        for binding in &request.bindings {
            match Binding::resolve(binding, &catalog, view.as_deref()) {
                Ok(resolved) => bindings.push(resolved),
                Err(why) => return self.refuse(ctx, &message, &why),
            }
        }
        let snapshots: Vec<usize> = request.bindings.iter().enumerate().filter(|(_, b)| b.snapshot).map(|(i, _)| i).collect();
        if snapshots.iter().any(|&i| bindings[i].tables.len() != 1) {
            return self.refuse(ctx, &message, "InvalidJoinPayload: a snapshot needs one table (name `table`)");
        }
        self.generations += 1;
        let topic = Topic { name: Arc::from(name.as_str()), private: request.private };
        let channel = Channel {
            join_ref: message.join_ref.clone(),
            wire_topic: message.topic.clone(),
            topic: topic.clone(),
            generation: self.generations,
            joined: false,
            presence_key: Arc::from(request.presence_key.clone().unwrap_or_else(|| self.core.id.to_string())),
            identity,
            view,
            ack: request.broadcast_ack,
            bindings,
        };
        self.channels.insert(message.topic.clone(), channel);
        self.update_deadline();
        if snapshots.is_empty() {
            return self.answer_join(ctx, message, request, Vec::new());
        }
        self.read_snapshots(ctx, message, request, snapshots);
    }

    /// The identity a channel acts as: its own token, or the socket's while it is valid.
    fn channel_identity(&self, token: Option<&str>) -> Result<Identity, String> {
        let Some(socket) = self.identity.as_ref() else { return Err("Unauthorized: no tenant".into()) };
        let verified = match token {
            Some(token) => self.hub().verifier.verify(token),
            None => self.hub().verifier.still_valid(socket.clone()),
        };
        let identity = verified.map_err(|err| format!("Unauthorized: {}", err.public_message()))?;
        if identity.tenant != socket.tenant {
            return Err("Unauthorized: the channel's token names another tenant than the socket's".into());
        }
        Ok(identity)
    }

    /// Read the snapshots of a join's snapshot bindings, then answer it.
    fn read_snapshots(&mut self, ctx: &mut ws::WebsocketContext<Self>, message: Inbound, request: JoinRequest, snapshots: Vec<usize>) {
        let Some(channel) = self.channels.get(&message.topic) else { return };
        let generation = channel.generation;
        let work: Vec<_> = snapshots
            .iter()
            .map(|&i| {
                let binding = &channel.bindings[i];
                (i, binding.tables[0].clone(), binding.filter.clone())
            })
            .collect();
        let view = channel.view.clone();
        let store = self.hub().store.clone();
        let Some(tenant) = self.identity.as_ref().map(|i| i.tenant.clone()) else { return };
        let (page_rows, max_rows) = (self.hub().config.snapshot_page_rows, self.hub().config.subscription_snapshot_max_rows);
        self.pending += 1;
        let read = async move {
            let mut results = Vec::new();
            for (i, table, filter) in work {
                let keep = |row: &protocol::Object| view.as_ref().is_none_or(|v| v.row_visible(&table.name, row));
                match store.subscription_snapshot(&tenant, &table, &filter, page_rows, max_rows, keep).await? {
                    Ok((mut rows, seq)) => {
                        if let Some(view) = &view {
                            rows.iter_mut().for_each(|r| view.strip_hidden(&table.name, &mut r.row));
                        }
                        results.push((i, rows.into_iter().map(|r| r.row).collect::<Vec<_>>(), seq));
                    }
                    Err(SnapshotRefusal::TooLarge { max_rows }) => {
                        return Err(Error::client(ErrorCode::SnapshotTooLarge, format!("more than {max_rows} rows match; narrow the filter")));
                    }
                }
            }
            Ok(results)
        };
        ctx.spawn(read.into_actor(self).map(move |result, session, ctx| {
            session.pending -= 1;
            if session.core.closed || session.channels.get(&message.topic).is_none_or(|c| c.generation != generation) {
                return; // left or joined again meanwhile
            }
            match result {
                Ok(snapshots) => session.answer_join(ctx, message, request, snapshots),
                Err(err) => {
                    if let Some(channel) = session.channels.remove(&message.topic) {
                        session.drop_channel(ctx, channel, false);
                    }
                    let code = if err.code() == ErrorCode::SnapshotTooLarge { "SnapshotTooLarge" } else { "Unavailable" };
                    session.refuse(ctx, &message, &format!("{code}: {}", err.public_message()));
                }
            }
        }));
    }

    /// Position the join's bindings in the stream, answer it `ok` with the bindings echoed, and
    /// send what comes before live changes: the snapshot rows, then (by rewinding the stream)
    /// the changes after each binding's position.
    fn answer_join(&mut self, ctx: &mut ws::WebsocketContext<Self>, message: Inbound, request: JoinRequest, snapshots: Vec<(usize, Vec<protocol::Object>, Seq)>) {
        // The topic is joined at the tenant now, so that its presence state comes after the
        // reply, as the client expects it.
        let topic = self.channels.get(&message.topic).map(|c| c.topic.clone());
        let join = topic.map(|topic| JoinTopic { session: self.core.id, topic, receive_own: request.broadcast_self, presence: request.presence_enabled });
        if join.is_some_and(|join| self.tenant().is_none_or(|tenant| tenant.try_send(join).is_err())) {
            if let Some(channel) = self.channels.remove(&message.topic) {
                self.drop_channel(ctx, channel, false);
            }
            return self.refuse(ctx, &message, "Unavailable: the tenant is saturated; retry");
        }
        let position = self.follower.position();
        let epoch = self.epoch.clone();
        let floor = self.log_floor;
        let mut rewind_to: Option<Seq> = None;
        let mut problems = Vec::new();
        let Some(channel) = self.channels.get_mut(&message.topic) else { return };
        for (i, binding) in channel.bindings.iter_mut().enumerate() {
            let asked = &request.bindings[i];
            binding.after = position;
            if let Some((_, _, seq)) = snapshots.iter().find(|(s, _, _)| *s == i) {
                binding.after = *seq;
            } else if let Some(since) = asked.since_seq {
                if asked.since_epoch.as_deref().is_some_and(|e| *e != *epoch) {
                    problems.push(format!("EpochMismatch: the hub's log is of epoch {epoch}; changes after seq {since} of another epoch cannot be sent"));
                } else if since > position {
                    problems.push(format!("EpochMismatch: seq {since} is past the hub's head {position}"));
                } else if since < floor {
                    problems.push(format!("PositionTooOld: changes after seq {since} are no longer kept (the log starts after {floor})"));
                } else {
                    binding.after = since;
                }
            }
            binding.ready = true;
            rewind_to = Some(rewind_to.map_or(binding.after, |r: Seq| r.min(binding.after)));
        }
        channel.joined = true;
        let echoed: Vec<Value> = request.bindings.iter().map(|b| b.echo(b.id())).collect();
        let has_bindings = !echoed.is_empty();
        let wire_topic = channel.wire_topic.clone();
        self.reply(ctx, &message, true, &json!({ "postgres_changes": echoed }));
        if has_bindings {
            self.system(ctx, &wire_topic, "postgres_changes", true, "Subscribed to PostgreSQL");
        }
        for problem in problems {
            self.system(ctx, &wire_topic, "postgres_changes", false, &problem);
        }
        for (i, rows, seq) in snapshots {
            self.send_snapshot(ctx, &wire_topic, i, rows, seq);
        }
        if let Some(to) = rewind_to.filter(|to| *to < position) {
            if self.follower.rewind(to) {
                self.read_step(ctx);
            }
        }
    }

    fn send_snapshot(&mut self, ctx: &mut ws::WebsocketContext<Self>, wire_topic: &str, index: usize, rows: Vec<protocol::Object>, seq: Seq) {
        let Some(channel) = self.channels.get(wire_topic) else { return };
        let binding = &channel.bindings[index];
        let (table, id) = (binding.tables[0].clone(), binding.id);
        let timestamp = changes::rfc3339_ms(unix_ms());
        let stamp = Stamp { epoch: &self.epoch, commit_timestamp: &timestamp };
        let payloads: Vec<String> = rows.iter().map(|row| changes::snapshot_payload(row, &table, id, seq, &stamp)).collect();
        self.hub().metrics.supabase_messages("postgres_changes", payloads.len() as u64);
        for payload in payloads {
            self.push(ctx, wire_topic, "postgres_changes", &payload);
        }
        let done = json!({"extension": "postgres_changes", "status": "ok", "message": "Snapshot complete", "channel": channel_name(wire_topic).unwrap_or(wire_topic), "binding_ids": [id], "seq": seq});
        self.push(ctx, wire_topic, "system", &done.to_string());
    }

    fn leave(&mut self, ctx: &mut ws::WebsocketContext<Self>, message: Inbound) {
        let Some(channel) = self.channels.remove(&message.topic) else {
            // Leaving a channel that is not joined is answered ok, as Phoenix's client expects.
            return self.reply(ctx, &message, true, &json!({}));
        };
        self.reply(ctx, &message, true, &json!({}));
        self.drop_channel(ctx, channel, true);
    }

    /// Let go of a channel: the tenant forgets the membership, and the client is told it closed.
    fn drop_channel(&mut self, ctx: &mut ws::WebsocketContext<Self>, channel: Channel, tell: bool) {
        if let Some(tenant) = self.tenant() {
            let _ = tenant.try_send(LeaveTopic { session: self.core.id, topic: channel.topic.clone() });
        }
        if tell {
            let text = wire::encode_text(self.vsn, channel.join_ref.as_deref(), channel.join_ref.as_deref(), &channel.wire_topic, "phx_close", "{}");
            self.text(ctx, text);
        }
        self.update_deadline();
    }

    // ---- tokens ----

    fn access_token(&mut self, ctx: &mut ws::WebsocketContext<Self>, message: Inbound) {
        if !self.is_joined(&message) {
            return self.refuse(ctx, &message, "unmatched topic");
        }
        let Some(token) = Self::json_payload(&message).get("access_token").and_then(Value::as_str).map(str::to_owned) else { return };
        if token.starts_with("sb_") {
            return;
        }
        match self.channel_identity(Some(&token)) {
            Ok(identity) => {
                let view = self.hub().rules.view_for(&identity);
                if let Some(channel) = self.channels.get_mut(&message.topic) {
                    channel.identity = identity;
                    channel.view = view;
                }
                self.update_deadline();
            }
            Err(why) => {
                // As Supabase: the channel is told why, then closed.
                self.system(ctx, &message.topic, "system", false, &why);
                if let Some(channel) = self.channels.remove(&message.topic) {
                    self.drop_channel(ctx, channel, true);
                }
            }
        }
    }

    /// The session clock's deadline: the earliest expiry of a joined channel's token.
    fn update_deadline(&self) {
        match self.channels.values().map(|c| c.identity.expires_at).min() {
            Some(expires_at) => self.core.set_token_deadline(expires_at),
            None => self.core.clear_deadline(),
        }
    }

    /// Close the channels whose token expired (past the leeway).
    fn expire_tokens(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        let void_before = unix_now().saturating_sub(self.hub().config.jwt_leeway_secs);
        let expired: Vec<String> = self.channels.iter().filter(|(_, c)| c.identity.expires_at <= void_before).map(|(t, _)| t.clone()).collect();
        for topic in expired {
            self.system(ctx, &topic, "system", false, "Token has expired");
            if let Some(channel) = self.channels.remove(&topic) {
                self.drop_channel(ctx, channel, true);
            }
        }
        self.update_deadline();
    }

    // ---- broadcast and presence ----

    fn take_message_token(&mut self) -> bool {
        let rate = Rate::new(self.hub().config.supabase_messages_per_second, self.hub().config.supabase_messages_per_second);
        rate.take(&mut self.messages, Instant::now()).is_ok()
    }

    fn broadcast(&mut self, ctx: &mut ws::WebsocketContext<Self>, message: Inbound) {
        let Some(channel) = self.channels.get(&message.topic).filter(|c| c.joined) else {
            return self.refuse(ctx, &message, "unmatched topic");
        };
        let (ack, topic) = (channel.ack, channel.topic.clone());
        let answer = |session: &mut Self, ctx: &mut ws::WebsocketContext<Self>, refused: Option<String>| match refused {
            None if ack => session.reply(ctx, &message, true, &json!({})),
            None => {}
            Some(why) if ack => session.refuse(ctx, &message, &why),
            Some(why) => {
                session.hub().metrics.supabase_refusal(why.split(':').next().unwrap_or("error"));
            }
        };
        if !self.take_message_token() {
            return answer(self, ctx, Some("ClientMessageRateLimitReached: Too many messages per second".into()));
        }
        let (event, payload) = match &message.payload {
            InboundPayload::UserBroadcast { event, payload: BroadcastData::Json(payload), .. } => (event.clone(), payload.clone()),
            InboundPayload::UserBroadcast { payload: BroadcastData::Binary(_), .. } => {
                return answer(self, ctx, Some("PayloadFormatNotSupported: binary broadcast payloads are not relayed; send JSON".into()));
            }
            InboundPayload::Json(value) => match (value.get("event").and_then(Value::as_str), value.get("payload")) {
                (Some(event), payload) => (event.to_owned(), payload.cloned().unwrap_or(Value::Null)),
                (None, _) => return answer(self, ctx, Some("InvalidMessage: a broadcast needs an `event`".into())),
            },
        };
        let size = payload.to_string().len();
        let max = self.hub().config.max_broadcast_payload_bytes;
        if size > max || event.len() > 255 || event.contains('\0') {
            return answer(self, ctx, Some(format!("PayloadTooLarge: a broadcast is at most {max} bytes of JSON, its event at most 255 bytes")));
        }
        self.hub().metrics.supabase_messages("broadcast", 1);
        let sent = self.tenant().is_some_and(|tenant| {
            let msg = Broadcast { channel: topic.name.to_string(), event: Some(event), payload, private: topic.private, from: Some(self.core.id) };
            tenant.try_send(msg).is_ok()
        });
        answer(self, ctx, (!sent).then(|| "Unavailable: the tenant is saturated; retry".to_owned()));
    }

    fn presence(&mut self, ctx: &mut ws::WebsocketContext<Self>, message: Inbound) {
        let Some(channel) = self.channels.get(&message.topic).filter(|c| c.joined) else {
            return self.refuse(ctx, &message, "unmatched topic");
        };
        let (topic, key) = (channel.topic.clone(), channel.presence_key.clone());
        let payload = Self::json_payload(&message);
        let meta = match payload.get("event").and_then(Value::as_str) {
            Some("track") => match payload.get("payload") {
                Some(Value::Object(meta)) => Some(meta.clone()),
                None | Some(Value::Null) => Some(Default::default()),
                Some(_) => return self.refuse(ctx, &message, "InvalidMessage: a presence payload is an object"),
            },
            Some("untrack") => None,
            _ => return self.refuse(ctx, &message, "InvalidMessage: presence events are `track` and `untrack`"),
        };
        if !self.take_message_token() {
            return self.refuse(ctx, &message, "ClientPresenceRateLimitReached: Too many presence messages per second");
        }
        let max = self.hub().config.max_broadcast_payload_bytes;
        if meta.as_ref().is_some_and(|m| Value::Object(m.clone()).to_string().len() > max) {
            return self.refuse(ctx, &message, &format!("PayloadTooLarge: a presence payload is at most {max} bytes of JSON"));
        }
        self.hub().metrics.supabase_messages("presence", 1);
        let sent = self.tenant().is_some_and(|tenant| tenant.try_send(Track { session: self.core.id, topic, key, meta }).is_ok());
        if sent {
            self.reply(ctx, &message, true, &json!({}));
        } else {
            self.refuse(ctx, &message, "Unavailable: the tenant is saturated; retry");
        }
    }

    fn topic_event(&mut self, ctx: &mut ws::WebsocketContext<Self>, event: &TopicEvent) {
        let Some(channel) = self.channels.values().find(|c| c.joined && c.topic == event.topic) else { return };
        let wire_topic = channel.wire_topic.clone();
        match &event.kind {
            TopicEventKind::Broadcast { event: name, payload } => {
                self.hub().metrics.supabase_messages("broadcast_delivered", 1);
                if self.vsn == Vsn::V2 {
                    if let Ok(value) = serde_json::from_str::<Value>(payload) {
                        if let Some(bytes) = wire::encode_user_broadcast(&wire_topic, name, None, &BroadcastData::Json(value)) {
                            return self.core.binary(ctx, bytes);
                        }
                    }
                }
                let body = format!(r#"{{"type":"broadcast","event":{},"payload":{payload}}}"#, Value::String(name.to_string()));
                self.push(ctx, &wire_topic, "broadcast", &body);
            }
            TopicEventKind::PresenceState(state) => self.push(ctx, &wire_topic, "presence_state", state),
            TopicEventKind::PresenceDiff(diff) => self.push(ctx, &wire_topic, "presence_diff", diff),
        }
    }

    // ---- postgres changes ----

    fn has_bindings(&self) -> bool {
        self.channels.values().any(|c| c.bindings.iter().any(|b| b.ready))
    }

    fn over_budget(&self) -> bool {
        self.core.unconfirmed() > self.hub().config.session_outbound_budget_bytes as u64
    }

    fn live_frame(&mut self, ctx: &mut ws::WebsocketContext<Self>, frame: Arc<SharedFrame>) {
        match self.follower.live_frame(frame.clone(), self.core.hub.config.supabase_held_frames) {
            LiveVerdict::Deliver { after } => {
                if !self.has_bindings() {
                    return;
                }
                if self.over_budget() {
                    return self.close(ctx, CloseCode::SlowConsumer, "client is not reading; rejoin with since_seq");
                }
                let deltas: Vec<&Delta> = frame.deltas.iter().filter(|d| d.seq > after).collect();
                self.route(ctx, Some(&frame), &deltas, frame.seq, frame.published_ms());
            }
            LiveVerdict::Nothing => {}
            LiveVerdict::Read => self.read_step(ctx),
        }
    }

    /// Read the next page of the stream after the follower's position, when it asks for one.
    fn read_step(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        if self.core.closed || self.read_paused {
            return;
        }
        if self.core.unconfirmed() > self.hub().config.session_outbound_budget_bytes as u64 / 2 {
            // Flow control: wait for the client to read what was sent (resumed on pong).
            self.read_paused = true;
            ctx.ping(&self.core.bytes_written().to_be_bytes());
            return;
        }
        let Some(after) = self.follower.next_read() else { return };
        let store = self.hub().store.clone();
        let Some(tenant) = self.identity.as_ref().map(|i| i.tenant.clone()) else { return };
        let actor = self.tenant();
        let page = self.hub().config.catch_up_page_changes;
        let read = async move { read_after(&store, &tenant, actor, after, page).await };
        ctx.spawn(read.into_actor(self).map(move |result, session, ctx| {
            let (read, head) = match result {
                Ok(read) => read,
                Err(err) => {
                    tracing::warn!(session = %session.core.id, %err, "Supabase stream read failed; retrying");
                    session.follower.read_failed();
                    ctx.run_later(READ_RETRY, |session, ctx| session.read_step(ctx));
                    return;
                }
            };
            let deltas = read.page(after, page);
            if matches!(read, StreamRead::Log(_)) && after < head && deltas.first().is_none_or(|d| d.seq > after + 1) {
                let first = deltas.first().map_or(head + 1, |d| d.seq);
                session.position_gone(ctx, first - 1);
            }
            let last = deltas.last().map(|d| d.seq);
            let exhausted = (deltas.len() as u32) < page;
            if let Some(last) = last {
                let now = unix_ms();
                session.route(ctx, None, &deltas, last, now);
            }
            match session.follower.page_read(last, exhausted) {
                AfterPage::ReadAgain => session.read_step(ctx),
                AfterPage::Live(held) => {
                    for frame in held {
                        session.live_frame(ctx, frame);
                    }
                }
            }
        }));
    }

    /// The log no longer holds the changes up to `missing_upto`: bindings that needed them are
    /// told, and continue from what there is.
    fn position_gone(&mut self, ctx: &mut ws::WebsocketContext<Self>, missing_upto: Seq) {
        let mut told = Vec::new();
        for channel in self.channels.values_mut() {
            let behind = channel.bindings.iter_mut().filter(|b| b.ready && b.after < missing_upto);
            let mut any = false;
            for binding in behind {
                binding.after = missing_upto;
                any = true;
            }
            if any {
                told.push(channel.wire_topic.clone());
            }
        }
        for topic in told {
            let message = format!("PositionTooOld: changes up to seq {missing_upto} are no longer kept; reload and rejoin");
            self.system(ctx, &topic, "postgres_changes", false, &message);
        }
    }

    /// Give each channel the deltas up to `upto` that its bindings take; `frame` when the
    /// deltas are a shared frame's (then the payload of a change for a set of bindings is
    /// rendered once for every channel of the tenant that sees everything, whatever its topic).
    fn route(&mut self, ctx: &mut ws::WebsocketContext<Self>, frame: Option<&SharedFrame>, deltas: &[&Delta], upto: Seq, at_ms: u64) {
        let mut texts: Vec<String> = Vec::new();
        let epoch = self.epoch.clone();
        let catalog = self.hub().store.catalog();
        let timestamp = changes::rfc3339_ms(at_ms);
        let stamp = Stamp { epoch: &epoch, commit_timestamp: &timestamp };
        let vsn = self.vsn;
        for channel in self.channels.values_mut().filter(|c| c.joined) {
            if channel.bindings.iter().all(|b| !b.ready || b.after >= upto) {
                continue;
            }
            let view = channel.view.as_deref();
            for delta in deltas {
                let Some(seen) = changes::visible(view, delta) else { continue };
                let ids: Vec<u32> = channel.bindings.iter().filter(|b| b.takes(&seen)).map(|b| b.id).collect();
                let Some(table) = catalog.get(&seen.table).filter(|_| !ids.is_empty()) else { continue };
                let render = || changes::payload(&seen, table, &ids, &stamp);
                let payload: Arc<str> = match frame.filter(|_| view.is_none()) {
                    Some(frame) => {
                        let key = format!("supabase:{}:{ids:?}", seen.seq);
                        frame.rendered(&key, || Some(render())).unwrap_or_else(|| Arc::from(render()))
                    }
                    None => Arc::from(render()),
                };
                texts.push(wire::encode_text(vsn, None, None, &channel.wire_topic, "postgres_changes", &payload));
            }
            for binding in channel.bindings.iter_mut().filter(|b| b.ready) {
                binding.after = binding.after.max(upto);
            }
        }
        self.hub().metrics.supabase_messages("postgres_changes", texts.len() as u64);
        for text in texts {
            self.text(ctx, text);
        }
    }
}

impl Actor for SupabaseSession {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.core.hub.config.session_mailbox);
        let addr = SessionAddr::Adapter(Arc::new(AdapterRecipients::of(&ctx.address())));
        // No deadline until a channel joins: the socket's token was checked at the upgrade.
        self.core.register(addr, 0);
        self.core.clear_deadline();
        if !self.core.hub.accepting() {
            return self.close(ctx, CloseCode::GoingAway, "shutting down");
        }
        if self.identity.is_some() {
            self.start(ctx);
        }
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.core.deregister();
        self.unsubscribe();
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for SupabaseSession {
    fn handle(&mut self, msg: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        let msg = match self.core.receive(ctx, msg) {
            SocketInbound::Message(msg) => msg,
            SocketInbound::Close(code, reason) => return self.close(ctx, code, reason),
            SocketInbound::Nothing => return,
        };
        match msg {
            ws::Message::Text(text) => {
                let decoded = wire::decode_text(self.vsn, &text);
                self.inbound(ctx, decoded);
            }
            ws::Message::Binary(bytes) => {
                let decoded = wire::decode_binary(self.vsn, &bytes);
                self.inbound(ctx, decoded);
            }
            ws::Message::Ping(payload) => ctx.pong(&payload),
            ws::Message::Pong(payload) => {
                self.core.pong(&payload);
                if self.read_paused && self.core.unconfirmed() <= self.hub().config.session_outbound_budget_bytes as u64 / 2 {
                    self.read_paused = false;
                    self.read_step(ctx);
                }
            }
            ws::Message::Continuation(item) => {
                let max = self.hub().config.max_frame_bytes;
                match self.fragments.add(item, max) {
                    Ok(Some((true, whole))) => {
                        let decoded = std::str::from_utf8(&whole).map_err(|_| wire::WireError::BadUtf8("text")).and_then(|t| wire::decode_text(self.vsn, t));
                        self.inbound(ctx, decoded);
                    }
                    Ok(Some((false, whole))) => {
                        let decoded = wire::decode_binary(self.vsn, &whole);
                        self.inbound(ctx, decoded);
                    }
                    Ok(None) => {}
                    Err(why) => self.close(ctx, CloseCode::MessageTooBig, why),
                }
            }
            ws::Message::Close(reason) => {
                ctx.close(reason);
                ctx.stop();
            }
            ws::Message::Nop => {}
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl Handler<LiveFrame> for SupabaseSession {
    type Result = ();

    fn handle(&mut self, LiveFrame(frames): LiveFrame, ctx: &mut Self::Context) {
        for frame in frames.iter() {
            if self.core.closed {
                return;
            }
            self.live_frame(ctx, frame.clone());
        }
    }
}

impl Handler<Notice> for SupabaseSession {
    type Result = ();

    fn handle(&mut self, notice: Notice, ctx: &mut Self::Context) {
        if self.core.closed {
            return;
        }
        if let Notice::Topic(event) = notice {
            self.topic_event(ctx, &event);
        }
    }
}

impl Handler<RefreshToken> for SupabaseSession {
    type Result = Result<u64, Error>;

    /// Supabase clients refresh their channels' tokens with `access_token` messages.
    fn handle(&mut self, _msg: RefreshToken, _ctx: &mut Self::Context) -> Self::Result {
        Err(Error::client(ErrorCode::NotFound, NO_SUCH_SESSION))
    }
}

impl Handler<SessionControl> for SupabaseSession {
    type Result = ();

    fn handle(&mut self, msg: SessionControl, ctx: &mut Self::Context) {
        if self.core.closed {
            if msg == SessionControl::Shutdown {
                ctx.stop();
            }
            return;
        }
        match msg {
            SessionControl::Replaced => {}
            SessionControl::Lagged => {
                if self.follower.lagged() {
                    self.read_step(ctx);
                }
            }
            SessionControl::Shutdown => {
                for topic in self.channels.keys().cloned().collect::<Vec<_>>() {
                    self.system(ctx, &topic, "system", true, "Server requested disconnect");
                }
                self.close(ctx, CloseCode::GoingAway, "the hub is shutting down; reconnect");
            }
            SessionControl::Heartbeat => {
                if !self.core.heartbeat(ctx) {
                    self.close(ctx, CloseCode::HeartbeatTimeout, "no heartbeat within the heartbeat timeout");
                }
            }
            SessionControl::Deadline => self.expire_tokens(ctx),
        }
    }
}
