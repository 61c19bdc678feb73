//! `RxdbSession`: one actor per `/rxdb/v1` socket, translating RxDB's replication requests
//! onto the hub's own paths: the token is verified as a native session's is, writes go through
//! the tenant actor's group commit, pulls through the storage's document reads, and the
//! tenant's one live fan-out becomes stream events. Every request is answered exactly once
//! with a result the client can take (it has no error frame); what goes wrong is logged and
//! counted (`synchub_rxdb_failures_total`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix::WeakAddr;
use actix_web_actors::ws;
use bytestring::ByteString;
use protocol::{ChangeResult, CloseCode, ErrorCode, Hlc, Object, SessionMode};
use serde_json::{json, Value};

use super::collection::{Collection, DocumentProblem};
use super::pull::{self, PullPlan, Pulled};
use super::push::{self, RowOutcome};
use super::stream::{Coverage, FrameVerdict};
use super::wire::{self, Checkpoint, Method, Request, WriteRow};
use crate::actors::messages::{ApplyBatch, LiveFrame, Notice, RefreshToken, SessionControl, SharedFrame, Subscribe, Unsubscribe, NO_SUCH_SESSION};
use crate::actors::sweep::{unix_ms, AdapterRecipients, SessionAddr};
use crate::actors::tenant::TenantActor;
use crate::auth::{unix_now, Identity, SessionIdentity};
use crate::error::Error;
use crate::ids::{DeviceId, Seq, RXDB_DEVICE_PREFIX};
use crate::rules::AccessView;
use crate::server::Hub;
use crate::storage::apply::BatchInput;
use crate::transport::fragments::Fragments;
use crate::transport::socket::{Inbound, SocketCore};

/// After a pull that could not be read, when the collection is told to pull again.
const PULL_RETRY: Duration = Duration::from_secs(1);

struct Authenticated {
    identity: SessionIdentity,
    tenant: WeakAddr<TenantActor>,
    view: Option<Arc<AccessView>>,
}

/// One collection on this socket.
struct CollectionState {
    collection: Arc<Collection>,
    streaming: bool,
    coverage: Coverage,
    /// Live changes were withheld (a slow reader): `RESYNC` once it has read what it was sent.
    resync_owed: bool,
}

pub struct RxdbSession {
    /// The socket: id, registration, bytes written and pings, close.
    core: SocketCore,
    /// The token of the upgrade request (`?token=`) as verified, put in force (or refused)
    /// when the session starts.
    upgrade_identity: Option<Result<Identity, Error>>,
    auth: Option<Authenticated>,
    /// The tenant's epoch and the last seq of its live stream this session has taken in;
    /// `None` until the tenant actor answered the subscription.
    live: Option<(Arc<str>, Seq)>,
    /// Requests that came before the session was authenticated and subscribed.
    early: VecDeque<Request>,
    collections: HashMap<String, CollectionState>,
    /// Live frames that came while pulls were being read (or before the subscription was
    /// answered), and whether some had to be dropped.
    held: VecDeque<Arc<SharedFrame>>,
    held_overflow: bool,
    pulls_in_flight: usize,
    writes_in_flight: usize,
    last_clock: Hlc,
    fragments: Fragments,
    /// Shutting down: close once the writes in flight are answered.
    closing: bool,
}

impl RxdbSession {
    pub fn new(hub: Arc<Hub>, upgrade_identity: Option<Result<Identity, Error>>) -> RxdbSession {
        RxdbSession {
            core: SocketCore::new(hub),
            upgrade_identity,
            auth: None,
            live: None,
            early: VecDeque::new(),
            collections: HashMap::new(),
            held: VecDeque::new(),
            held_overflow: false,
            pulls_in_flight: 0,
            writes_in_flight: 0,
            last_clock: Hlc { wall_ms: 0, counter: 0 },
            fragments: Fragments::default(),
            closing: false,
        }
    }

    // ---- the socket ----

    fn write(&mut self, ctx: &mut ws::WebsocketContext<Self>, text: String) {
        self.core.text(ctx, ByteString::from(text));
    }

    fn over_budget(&self) -> bool {
        self.core.unconfirmed() > self.core.hub.config.session_outbound_budget_bytes as u64
    }

    fn answer(&mut self, ctx: &mut ws::WebsocketContext<Self>, request: &Request, result: &Value) {
        let text = wire::reply(&request.id, &request.collection, result);
        self.write(ctx, text);
    }

    fn close(&mut self, ctx: &mut ws::WebsocketContext<Self>, code: CloseCode, reason: &str) {
        if self.core.close(ctx, code, reason) {
            self.unsubscribe();
        }
    }

    fn unsubscribe(&self) {
        if let Some(tenant) = self.auth.as_ref().and_then(|a| a.tenant.upgrade()) {
            let _ = tenant.try_send(Unsubscribe { session: self.core.id });
        }
    }

    fn handle_text(&mut self, ctx: &mut ws::WebsocketContext<Self>, text: &str) {
        let request = match wire::parse_request(text) {
            Ok(request) => request,
            Err(problem) => {
                // Nothing to answer without an id; RxDB never sends such a frame.
                self.core.hub.metrics.rxdb_failure("malformed");
                tracing::debug!(session = %self.core.id, %problem, "RxDB frame is not a request");
                return;
            }
        };
        self.core.hub.metrics.rxdb_request(request.method.name());
        if let Method::Auth(headers) = &request.method {
            let token = wire::token_from_headers(headers).map(str::to_owned);
            return self.auth_message(ctx, token);
        }
        if self.live.is_none() {
            // RxDB flushes what it queued offline before `auth`: held, answered after it.
            if self.early.len() >= self.core.hub.config.rxdb_pending_requests {
                return self.close(ctx, CloseCode::Unauthorized, "too many requests before auth");
            }
            self.early.push_back(request);
            return;
        }
        self.handle_request(ctx, request);
    }

    fn handle_request(&mut self, ctx: &mut ws::WebsocketContext<Self>, request: Request) {
        let method = request.method.clone();
        match method {
            Method::Auth(_) => {}
            Method::ChangeStream => {
                if let Some(state) = self.collection(&request.collection) {
                    state.streaming = true;
                }
            }
            Method::ChangesSince { checkpoint, batch_size } => self.changes_since(ctx, request, checkpoint, batch_size),
            Method::Write(rows) => self.master_write(ctx, request, rows),
            Method::Unusable { why, .. } => {
                self.core.hub.metrics.rxdb_failure("malformed");
                tracing::debug!(session = %self.core.id, why, "unusable RxDB request");
                self.answer(ctx, &request, &Value::Null);
            }
        }
    }

    /// The collection's state on this socket, resolved on first use; `None` (logged and
    /// counted) when no synced table serves it.
    fn collection(&mut self, name: &str) -> Option<&mut CollectionState> {
        if !self.collections.contains_key(name) {
            match Collection::resolve(name, &self.core.hub.config, &self.core.hub.store.catalog()) {
                Ok(collection) => {
                    let state = CollectionState { collection: Arc::new(collection), streaming: false, coverage: Coverage::default(), resync_owed: false };
                    self.collections.insert(name.to_owned(), state);
                }
                Err(problem) => {
                    self.core.hub.metrics.rxdb_failure("unknown_collection");
                    tracing::warn!(session = %self.core.id, collection = name, %problem, "RxDB collection cannot be served");
                    return None;
                }
            }
        }
        self.collections.get_mut(name)
    }

    // ---- authentication ----

    fn auth_message(&mut self, ctx: &mut ws::WebsocketContext<Self>, token: Option<String>) {
        let verified = match token {
            Some(token) => self.core.hub.verifier.verify(&token),
            // Headers without a token: the one of the upgrade request stands, if any.
            None if self.auth.is_some() => return,
            None => Err(Error::client(ErrorCode::InvalidToken, "the auth message carries no token")),
        };
        match verified {
            Ok(identity) if self.auth.is_some() => {
                // Every reconnect sends `auth` again; on a live socket it refreshes the token.
                if let Err(err) = self.replace_token(identity) {
                    tracing::debug!(session = %self.core.id, %err, "RxDB token refresh refused");
                    self.close(ctx, CloseCode::Unauthorized, "token of another identity");
                }
            }
            Ok(identity) => self.start(ctx, identity),
            Err(err) => self.refuse(ctx, &err),
        }
    }

    /// Close for a token that was refused: 4002 when it expired, 4001 otherwise.
    fn refuse(&mut self, ctx: &mut ws::WebsocketContext<Self>, err: &Error) {
        tracing::debug!(session = %self.core.id, %err, "RxDB token refused");
        let code = if err.code() == ErrorCode::TokenExpired { CloseCode::TokenExpired } else { CloseCode::Unauthorized };
        self.close(ctx, code, "token refused");
    }

    fn set_token_deadline(&self, expires_at: u64) {
        self.core.set_token_deadline(expires_at);
    }

    fn replace_token(&mut self, identity: Identity) -> Result<u64, Error> {
        let Some(auth) = self.auth.as_mut() else {
            return Err(Error::client(ErrorCode::NotAuthenticated, NO_SUCH_SESSION));
        };
        if identity.tenant != auth.identity.tenant || identity.user != auth.identity.user {
            return Err(Error::client(ErrorCode::Forbidden, "a refreshed token must name the same tenant and user"));
        }
        auth.view = self.core.hub.rules.view_for(&identity);
        auth.identity.role = identity.role;
        auth.identity.expires_at = identity.expires_at;
        self.set_token_deadline(identity.expires_at);
        Ok(identity.expires_at)
    }

    /// Put a verified token in force and subscribe to the tenant's stream.
    fn start(&mut self, ctx: &mut ws::WebsocketContext<Self>, identity: Identity) {
        if !self.core.hub.accepting() {
            return self.close(ctx, CloseCode::GoingAway, "shutting down");
        }
        if let Err(err) = self.core.hub.limits.connect(&identity.tenant) {
            tracing::debug!(session = %self.core.id, %err, "RxDB session refused");
            return self.close(ctx, CloseCode::RateLimited, "too many new sessions");
        }
        let Some(link) = self.core.link.clone() else { return self.close(ctx, CloseCode::GoingAway, "session not started") };
        // The hub numbers an RxDB client's changes: its cursor is its own (`rxdb:` device).
        let named = identity.device.as_ref().map_or_else(|| identity.user.to_string(), |d| d.to_string());
        let device = DeviceId::new(format!("{RXDB_DEVICE_PREFIX}{named}"));
        let tenant = self.core.hub.registry.get(&identity.tenant);
        self.set_token_deadline(identity.expires_at);
        let view = self.core.hub.rules.view_for(&identity);
        let identity = SessionIdentity {
            tenant: self.core.hub.registry.shared_id(&identity.tenant),
            user: identity.user,
            role: identity.role,
            device: device.clone(),
            expires_at: identity.expires_at,
        };
        let subscribe = Subscribe {
            session: self.core.id,
            device,
            user: identity.user.clone(),
            role: identity.role.clone(),
            mode: SessionMode::Device,
            since_ms: unix_ms(),
            link,
            exclusive: false,
        };
        self.auth = Some(Authenticated { identity, tenant: tenant.downgrade(), view });
        ctx.spawn(async move { tenant.send(subscribe).await }.into_actor(self).map(|head, session, ctx| {
            if session.core.closed {
                return;
            }
            let Ok(head) = head else { return session.close(ctx, CloseCode::GoingAway, "hub unavailable") };
            session.core.hub.metrics.rxdb_sessions_opened.fetch_add(1, Ordering::Relaxed);
            session.live = Some((head.epoch.clone(), head.head_seq));
            for request in std::mem::take(&mut session.early) {
                session.handle_request(ctx, request);
            }
            session.release_held(ctx);
        }));
    }

    // ---- pulls ----

    fn changes_since(&mut self, ctx: &mut ws::WebsocketContext<Self>, request: Request, checkpoint: Option<Value>, batch_size: u32) {
        let Some(state) = self.collection(&request.collection) else {
            // No table: nothing to pull, and the checkpoint stays where it was.
            return self.answer(ctx, &request, &json!({ "documents": [], "checkpoint": checkpoint }));
        };
        let collection = state.collection.clone();
        // unwrap: requests are handled once the session is live.
        let (epoch, _) = self.live.clone().expect("live session");
        let auth = self.auth.as_ref().expect("authenticated");
        if auth.view.as_ref().is_some_and(|v| !v.can_read(&collection.table.name)) {
            // A role that may not read the table is given nothing, and no error to crash on.
            let (_, head) = self.live.clone().expect("live session");
            let cp = Checkpoint { epoch: epoch.to_string(), seq: head, snapshot: None };
            return self.answer(ctx, &request, &json!({ "documents": [], "checkpoint": cp }));
        }
        let plan = PullPlan::for_checkpoint(checkpoint.as_ref(), &epoch);
        let limit = batch_size.clamp(1, self.core.hub.config.rxdb_max_pull_documents);
        let read = pull::read(self.core.hub.store.clone(), auth.identity.tenant.clone(), collection, plan, limit, auth.view.clone());
        self.pulls_in_flight += 1;
        ctx.spawn(read.into_actor(self).map(move |pulled, session, ctx| {
            session.pulls_in_flight -= 1;
            session.pulled(ctx, request, checkpoint, pulled);
            session.release_held(ctx);
        }));
    }

    fn pulled(&mut self, ctx: &mut ws::WebsocketContext<Self>, request: Request, asked: Option<Value>, pulled: Result<Pulled, Error>) {
        match pulled {
            Ok(Pulled { documents, checkpoint, covers }) => {
                if let Some(state) = self.collections.get_mut(&request.collection) {
                    state.coverage.pulled(covers);
                    state.resync_owed = false;
                }
                let text = wire::changes_reply(&request.id, &request.collection, documents, &checkpoint);
                self.write(ctx, text);
            }
            Err(err) => {
                // The client takes an empty page as "nothing new" and keeps its checkpoint; it is
                // told to pull again shortly, when the read may work.
                self.core.hub.metrics.rxdb_failure("pull_unavailable");
                tracing::warn!(session = %self.core.id, collection = %request.collection, %err, "RxDB pull could not be read");
                self.answer(ctx, &request, &json!({ "documents": [], "checkpoint": asked }));
                let collection = request.collection.clone();
                ctx.run_later(PULL_RETRY, move |session, ctx| session.resync(ctx, &collection));
            }
        }
    }

    fn resync(&mut self, ctx: &mut ws::WebsocketContext<Self>, collection: &str) {
        if let Some(state) = self.collections.get_mut(collection) {
            state.coverage.lose();
            if state.streaming {
                self.core.hub.metrics.rxdb_resyncs.fetch_add(1, Ordering::Relaxed);
                self.write(ctx, wire::resync_event(collection));
            }
        }
    }

    // ---- writes ----

    fn next_clock(last: &mut Hlc) -> Hlc {
        let now = unix_ms();
        *last = if now > last.wall_ms { Hlc { wall_ms: now, counter: 0 } } else { Hlc { wall_ms: last.wall_ms, counter: last.counter + 1 } };
        *last
    }

    /// Answer a write with a non-array result: RxDB retries it after its `retryTime`.
    fn write_unavailable(&mut self, ctx: &mut ws::WebsocketContext<Self>, request: &Request, err: &Error) {
        self.core.hub.metrics.rxdb_failure("write_unavailable");
        tracing::debug!(session = %self.core.id, %err, "RxDB write not taken; the client retries");
        let result = json!({ "error": { "code": err.code(), "message": err.public_message() } });
        self.answer(ctx, request, &result);
    }

    fn master_write(&mut self, ctx: &mut ws::WebsocketContext<Self>, request: Request, rows: Vec<WriteRow>) {
        if self.closing {
            return self.write_unavailable(ctx, &request, &Error::ShuttingDown);
        }
        let Some(state) = self.collection(&request.collection) else {
            let err = Error::client(ErrorCode::UnknownTable, "no synced table serves this collection");
            return self.write_unavailable(ctx, &request, &err);
        };
        let collection = state.collection.clone();
        if self.writes_in_flight >= self.core.hub.config.session_pushes_in_flight {
            return self.write_unavailable(ctx, &request, &Error::Busy);
        }
        // unwrap: requests are handled once the session is live.
        let auth = self.auth.as_ref().expect("authenticated");
        if let Err(err) = self.core.hub.limits.push(&auth.identity.tenant, &auth.identity.device) {
            return self.write_unavailable(ctx, &request, &err);
        }
        let last_clock = &mut self.last_clock;
        let planned = push::plan(&collection, &rows, || Self::next_clock(last_clock));
        let inputs = self.batches(planned.changes);
        let tenant = auth.tenant.upgrade();
        let store = self.core.hub.store.clone();
        let tenant_id = auth.identity.tenant.clone();
        let view = auth.view.clone();
        self.writes_in_flight += 1;
        self.core.hub.metrics.batches_pushed.fetch_add(inputs.len() as u64, Ordering::Relaxed);
        let work = async move {
            let results = commit(tenant, inputs).await?;
            let written = WrittenRows { store, tenant: tenant_id, collection, view, rows };
            written.answer(results, planned.refused).await
        };
        ctx.spawn(work.into_actor(self).map(move |answer, session, ctx| {
            session.writes_in_flight -= 1;
            match answer {
                Ok((masters, refused)) => {
                    for _ in 0..refused {
                        session.core.hub.metrics.rxdb_failure("refused_write");
                    }
                    session.answer(ctx, &request, &Value::Array(masters));
                }
                Err(err) => session.write_unavailable(ctx, &request, &err),
            }
            if session.closing && session.writes_in_flight == 0 {
                session.close(ctx, CloseCode::GoingAway, "shutting down");
            }
        }));
    }

    /// The planned changes as batches of at most `max_batch_changes`, each with the rows its
    /// changes came from.
    fn batches(&self, changes: Vec<(usize, protocol::Change, Option<crate::sync::conditional::WriteCondition>)>) -> Vec<(HashMap<uuid::Uuid, usize>, BatchInput)> {
        // unwrap: requests are handled once the session is live.
        let auth = self.auth.as_ref().expect("authenticated");
        let max = self.core.hub.config.max_batch_changes.max(1);
        let mut batches = Vec::new();
        let mut changes = changes.into_iter().peekable();
        while changes.peek().is_some() {
            let chunk: Vec<_> = changes.by_ref().take(max).collect();
            let rows_of = chunk.iter().map(|(row, change, _)| (change.change_id, *row)).collect();
            let mut input = BatchInput::pushed(auth.identity.device.clone(), auth.identity.user.clone(), uuid::Uuid::now_v7(), Vec::new());
            input.assign_device_seqs = true;
            input.access = auth.view.clone();
            let (changes, conditions): (Vec<_>, Vec<_>) = chunk.into_iter().map(|(_, change, condition)| (change, condition)).unzip();
            input.conditions = if conditions.iter().any(Option::is_some) { conditions } else { Vec::new() };
            input.changes = changes;
            batches.push((rows_of, input));
        }
        batches
    }

    // ---- the live stream ----

    /// Take in live frames held while pulls were read, once none is.
    fn release_held(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        if self.pulls_in_flight > 0 || self.live.is_none() {
            return;
        }
        if std::mem::take(&mut self.held_overflow) {
            let names: Vec<String> = self.collections.keys().cloned().collect();
            for name in names {
                self.resync(ctx, &name);
            }
        }
        while let Some(frame) = self.held.pop_front() {
            self.take_frame(ctx, frame);
        }
    }

    fn take_frame(&mut self, ctx: &mut ws::WebsocketContext<Self>, frame: Arc<SharedFrame>) {
        let Some((epoch, at)) = self.live.clone() else { return self.hold(frame) };
        if self.pulls_in_flight > 0 {
            return self.hold(frame);
        }
        if frame.seq <= at {
            return;
        }
        self.live = Some((epoch.clone(), frame.seq));
        let over_budget = self.over_budget();
        let names: Vec<String> = self.collections.keys().cloned().collect();
        for name in names {
            let state = self.collections.get_mut(&name).expect("collection");
            if !state.streaming {
                continue;
            }
            match state.coverage.frame(frame.after, frame.seq) {
                FrameVerdict::Skip => {}
                FrameVerdict::Resync => self.resync(ctx, &name),
                FrameVerdict::Send { from, to } => {
                    let documents = self.documents_of(&name, &frame, from);
                    if documents.is_none() {
                        continue; // nothing of this collection in the frame
                    }
                    let state = self.collections.get_mut(&name).expect("collection");
                    if over_budget {
                        // A slow reader: withheld, and told to pull once it has read its backlog.
                        state.coverage.lose();
                        state.resync_owed = true;
                        continue;
                    }
                    let checkpoint = Checkpoint { epoch: epoch.to_string(), seq: to, snapshot: None };
                    let text = wire::stream_event(&name, documents.as_deref().unwrap_or("[]"), &checkpoint);
                    self.write(ctx, text);
                }
            }
        }
    }

    fn hold(&mut self, frame: Arc<SharedFrame>) {
        if self.held.len() >= self.core.hub.config.rxdb_held_frames {
            self.held.clear();
            self.held_overflow = true;
            // Frames after the dropped ones are no use without them either.
            if let Some((epoch, _)) = self.live.clone() {
                self.live = Some((epoch, frame.seq));
            }
            for state in self.collections.values_mut() {
                state.coverage.lose();
            }
            return;
        }
        self.held.push_back(frame);
    }

    /// The collection's documents among the frame's changes after `from`, as JSON text
    /// (`None` when there are none). A session that sees everything shares the rendering with
    /// every such session of the tenant.
    fn documents_of(&self, name: &str, frame: &SharedFrame, from: Seq) -> Option<Arc<str>> {
        let state = self.collections.get(name)?;
        let collection = &state.collection;
        let view = self.auth.as_ref().and_then(|a| a.view.clone());
        let render = |deltas: &mut dyn Iterator<Item = &protocol::Delta>| -> Option<String> {
            let docs: Vec<Value> = deltas
                .filter(|d| d.table == collection.table.name)
                .filter_map(|d| {
                    let visible = match &view {
                        Some(view) => view.visible_delta(d)?,
                        None => std::borrow::Cow::Borrowed(d),
                    };
                    Some(Value::Object(document_of_delta(collection, &visible)))
                })
                .collect();
            (!docs.is_empty()).then(|| Value::Array(docs).to_string())
        };
        if view.is_none() && from <= frame.after {
            let key = format!("rxdb\u{0}{}\u{0}{}", collection.name, collection.fields.join(","));
            return frame.rendered(&key, || render(&mut frame.deltas.iter()));
        }
        render(&mut frame.deltas.iter().filter(|d| d.seq > from)).map(Arc::from)
    }

    fn heartbeat(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        if !self.core.heartbeat(ctx) {
            self.close(ctx, CloseCode::HeartbeatTimeout, "no pong or frame within the heartbeat timeout");
        }
    }

    /// A pong confirmed reading: collections whose live changes were withheld pull again.
    fn confirmed(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        if self.core.unconfirmed() > self.core.hub.config.session_outbound_budget_bytes as u64 / 2 {
            return;
        }
        let owed: Vec<String> = self.collections.iter().filter(|(_, s)| s.resync_owed).map(|(n, _)| n.clone()).collect();
        for name in owed {
            if let Some(state) = self.collections.get_mut(&name) {
                state.resync_owed = false;
            }
            self.resync(ctx, &name);
        }
    }
}

/// Hand the batches to the tenant actor one after another and wait for each commit: the
/// results by row index.
async fn commit(tenant: Option<Addr<TenantActor>>, inputs: Vec<(HashMap<uuid::Uuid, usize>, BatchInput)>) -> Result<HashMap<usize, ChangeResult>, Error> {
    let mut results = HashMap::new();
    for (rows_of, input) in inputs {
        let tenant = tenant.clone().ok_or(Error::ShuttingDown)?;
        let answer = tenant.send(ApplyBatch { input }).await.map_err(|_| Error::ShuttingDown)??;
        let committed = answer.await.map_err(|_| Error::ShuttingDown)??;
        results.extend(committed.into_iter().filter_map(|result| Some((*rows_of.get(&result.change_id)?, result))));
    }
    Ok(results)
}

/// The rows of one `masterWrite` once committed, and what is needed to answer them.
struct WrittenRows {
    store: Arc<crate::storage::Store>,
    tenant: crate::ids::TenantId,
    collection: Arc<Collection>,
    view: Option<Arc<AccessView>>,
    rows: Vec<WriteRow>,
}

impl WrittenRows {
    /// RxDB's answer, in row order: the master documents of the rows not written as asked; and
    /// how many of those the hub refused for good.
    async fn answer(&self, results: HashMap<usize, ChangeResult>, refused: Vec<(usize, DocumentProblem)>) -> Result<(Vec<Value>, usize), Error> {
        let mut outcomes: Vec<(usize, RowOutcome)> =
            results.into_iter().map(|(index, result)| (index, push::outcome(&self.collection, &self.rows[index], &result, self.view.as_deref()))).collect();
        for (index, problem) in refused {
            tracing::debug!(%problem, "RxDB document refused");
            outcomes.push((index, RowOutcome::LookUp(ErrorCode::InvalidValue)));
        }
        outcomes.sort_by_key(|(index, _)| *index);
        let mut masters = Vec::new();
        let mut refused = 0;
        for (index, outcome) in outcomes {
            match outcome {
                RowOutcome::Written => {}
                RowOutcome::Master(doc) => masters.push(Value::Object(doc)),
                RowOutcome::LookUp(_) => {
                    refused += 1;
                    masters.push(Value::Object(self.current_or_tombstone(&self.rows[index].new_document_state).await?));
                }
            }
        }
        Ok((masters, refused))
    }

    /// For a document refused for good: the stored one as the writer may see it, or a tombstone
    /// of the writer's when there is none.
    async fn current_or_tombstone(&self, doc: &Object) -> Result<Object, Error> {
        let table = &self.collection.table.name;
        let current = match self.collection.key_of(doc) {
            Ok(key) => self.store.current_row(&self.tenant, table, &key).await?.0,
            Err(_) => None,
        };
        // What the rules hide is not shown, here either.
        let current = match (current, &self.view) {
            (Some(row), Some(view)) => view.visible_row(table, &row),
            (current, _) => current,
        };
        Ok(match current {
            Some(row) => self.collection.document(&row, false),
            None => self.collection.refusal_tombstone(doc),
        })
    }
}

/// The document a live change leaves: the new row, or for a delete a tombstone with the old one.
fn document_of_delta(collection: &Collection, delta: &protocol::Delta) -> Object {
    match &delta.row {
        Some(row) => collection.document(row, false),
        None => {
            let mut last = delta.old.clone().unwrap_or_default();
            last.extend(delta.key.iter().map(|(k, v)| (k.clone(), v.clone())));
            collection.document(&last, true)
        }
    }
}

impl Actor for RxdbSession {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.core.hub.config.session_mailbox);
        let auth_deadline = unix_ms() + self.core.hub.config.rxdb_auth_timeout_ms;
        self.core.register(SessionAddr::Adapter(Arc::new(AdapterRecipients::of(&ctx.address()))), auth_deadline);
        match self.upgrade_identity.take() {
            Some(Ok(identity)) => self.start(ctx, identity),
            Some(Err(err)) => self.refuse(ctx, &err),
            None => {}
        }
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.core.deregister();
        self.unsubscribe();
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for RxdbSession {
    fn handle(&mut self, msg: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        let msg = match self.core.receive(ctx, msg) {
            Inbound::Message(msg) => msg,
            Inbound::Close(code, reason) => return self.close(ctx, code, reason),
            Inbound::Nothing => return,
        };
        match msg {
            ws::Message::Text(text) => self.handle_text(ctx, &text),
            ws::Message::Binary(_) => self.close(ctx, CloseCode::InvalidPayload, "RxDB replication speaks JSON text frames"),
            ws::Message::Ping(payload) => ctx.pong(&payload),
            ws::Message::Pong(payload) => {
                self.core.pong(&payload);
                self.confirmed(ctx);
            }
            ws::Message::Continuation(item) => match self.fragments.add(item, self.core.hub.config.max_frame_bytes) {
                Ok(Some((true, whole))) => match std::str::from_utf8(&whole) {
                    Ok(text) => self.handle_text(ctx, text),
                    Err(_) => self.close(ctx, CloseCode::InvalidPayload, "text message is not UTF-8"),
                },
                Ok(Some((false, _))) => self.close(ctx, CloseCode::InvalidPayload, "RxDB replication speaks JSON text frames"),
                Ok(None) => {}
                Err(why) => self.close(ctx, CloseCode::MessageTooBig, why),
            },
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

impl Handler<LiveFrame> for RxdbSession {
    type Result = ();

    fn handle(&mut self, LiveFrame(frames): LiveFrame, ctx: &mut Self::Context) {
        for frame in frames.iter() {
            if self.core.closed {
                return;
            }
            self.take_frame(ctx, frame.clone());
        }
    }
}

impl Handler<Notice> for RxdbSession {
    type Result = ();

    /// Presence, broadcasts and conflict news have no place in RxDB's protocol.
    fn handle(&mut self, _notice: Notice, _ctx: &mut Self::Context) {}
}

impl Handler<RefreshToken> for RxdbSession {
    type Result = Result<u64, Error>;

    fn handle(&mut self, RefreshToken(identity): RefreshToken, _ctx: &mut Self::Context) -> Self::Result {
        if self.live.is_none() {
            return Err(Error::client(ErrorCode::NotFound, NO_SUCH_SESSION));
        }
        self.replace_token(identity).map_err(|_| Error::client(ErrorCode::NotFound, NO_SUCH_SESSION))
    }
}

impl Handler<SessionControl> for RxdbSession {
    type Result = ();

    fn handle(&mut self, msg: SessionControl, ctx: &mut Self::Context) {
        match msg {
            SessionControl::Replaced => {} // RxDB sessions are never exclusive
            SessionControl::Lagged => {
                // Frames were dropped on their way here: every collection pulls again.
                let names: Vec<String> = self.collections.keys().cloned().collect();
                for name in names {
                    self.resync(ctx, &name);
                }
                if let Some((epoch, _)) = self.live.clone() {
                    // Later frames follow on from what the tenant fans out next.
                    self.live = Some((epoch, 0));
                }
            }
            SessionControl::Shutdown => {
                self.closing = true;
                if self.writes_in_flight == 0 {
                    self.close(ctx, CloseCode::GoingAway, "shutting down");
                }
            }
            SessionControl::Heartbeat => self.heartbeat(ctx),
            SessionControl::Deadline => match self.auth.as_ref().map(|a| a.identity.expires_at) {
                None => self.close(ctx, CloseCode::Unauthorized, "no auth message in time"),
                Some(expires_at) if unix_now() < expires_at + self.core.hub.config.jwt_leeway_secs => self.set_token_deadline(expires_at),
                Some(_) => self.close(ctx, CloseCode::TokenExpired, "token expired"),
            },
        }
    }
}
