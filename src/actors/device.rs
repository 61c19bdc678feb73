//! `DeviceSession`: one actor per WebSocket. It authenticates the device, forwards its
//! batches to the tenant actor and acks them after commit, catches the device up from the
//! log and then switches to live deltas with no gap and no duplicate, and bounds what it
//! buffers for a client that reads slowly (pings every N bytes; unconfirmed bytes over budget
//! pause catch-up or end the session with `slow_consumer`).

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix::WeakAddr;
use actix_web_actors::ws;
use bytes::Bytes;
use protocol::capture::{AckedChange, CaptureEvent};
use protocol::{CatchUpRef, Delta};
use protocol::{
    Channel, ClientFrame, CloseCode, Condition, Encoding, ErrorCode, Limits, Position, ServerFrame, SessionMode, SnapshotRow,
    SUPPORTED_VERSIONS,
};
use uuid::Uuid;

use super::messages::{
    ApplyBatch, Encoded, LiveFrame, Notice, RefreshToken, SessionControl, SharedFrame, Subscribe, Unsubscribe, Watch, NO_SUCH_SESSION,
};
use super::sweep::{unix_ms, SessionAddr};
use super::tenant::TenantActor;
use crate::auth::{unix_now, Identity, SessionIdentity};
use crate::rules::AccessView;
use crate::error::Error;
use crate::limits::Bucket;
use crate::ids::{id_problem, DeviceId, Seq, DASHBOARD_DEVICE_PREFIX};
use crate::server::Hub;
use crate::storage::apply::BatchInput;
use crate::transport::follow::{read_after, AfterPage, Follower, LiveVerdict, StreamRead};
use crate::transport::fragments::Fragments;
use crate::transport::socket::{Inbound, SocketCore};
use crate::storage::log::TenantHead;
use crate::storage::subscriptions::SnapshotRefusal;
use crate::sync::views::subscription_view;
use crate::sync::batch::check_batch;

/// A `catch_up` page of the deltas in `frames` with seqs in `(after, upto]`, copied out of
/// the frames' encodings (for a session that sees every delta as it is).
fn spliced_page(frames: &[Arc<SharedFrame>], encoding: Encoding, after: Seq, upto: Seq, head: Seq) -> Encoded {
    let runs: Vec<(Bytes, usize)> =
        frames.iter().filter(|f| f.seq > after && f.after < upto).map(|f| f.run(encoding, after, upto)).collect();
    let count = runs.iter().map(|(_, n)| n).sum();
    let slices: Vec<&[u8]> = runs.iter().map(|(bytes, _)| &bytes[..]).collect();
    Encoded::from_bytes(encoding, protocol::spliced::catch_up_page(encoding, &slices, count, upto, head))
}

/// `delta` as the session's rules let it see it (`None` view: as it is).
fn visible<'d>(view: Option<&AccessView>, delta: &'d Delta) -> Option<Cow<'d, Delta>> {
    match view {
        Some(view) => view.visible_delta(delta),
        None => Some(Cow::Borrowed(delta)),
    }
}

/// After the hello deadline, how long the session still looks at frames it has already read.
const HELLO_GRACE: Duration = Duration::from_millis(20);
/// Live frames a catching-up session keeps; past this it drops them and reads the log again.
const CATCH_UP_BUFFER_FRAMES: usize = 256;
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitHello,
    /// `hello` is being verified and the session registered.
    Starting,
    /// must_resync was sent; waiting for `resume`.
    AwaitResume,
    /// Following the tenant's stream: catching up, or live (`stream`).
    Streaming,
}

struct Authenticated {
    identity: SessionIdentity,
    /// The tenant actor, weak: a strong address costs every idle session a sender of its own
    /// (about 80 bytes); one is made for each send instead.
    tenant: WeakAddr<TenantActor>,
    /// What the rules let this identity read; `None` when it may read everything (then
    /// frames shared by all sessions go out as they are).
    view: Option<Arc<AccessView>>,
}

/// The socket's subscriptions, and its `subscribe` frames' rate (`session_subscribe_rate`).
#[derive(Default)]
struct Subscriptions {
    list: Vec<Subscription>,
    bucket: Option<Bucket>,
}

/// One of the socket's subscriptions.
struct Subscription {
    name: String,
    target: Target,
}

enum Target {
    /// Rows of a table matching a filter. `after`: the last seq this subscription has been
    /// given (or skipped); `ready` once its snapshot went out; `request`: the id of the
    /// `subscribe` it answers, so that a snapshot finishing after an unsubscribe and a new
    /// subscribe under the same name is not taken for the new one's.
    Table { table: String, filter: Vec<Condition>, after: Seq, ready: bool, request: u64 },
    Channel(Channel),
}

/// Pushes of a session between its socket and its acks.
#[derive(Default)]
struct PushQueues {
    /// Pushes received and not yet acked (or refused).
    in_flight: usize,
    /// Waiting to be handed to the tenant actor, in the order received.
    to_forward: VecDeque<(u64, Uuid, BatchInput)>,
    /// Queued at the tenant actor, oldest first, with the receivers of their results.
    awaiting_acks: VecDeque<(u64, Uuid, tokio::sync::oneshot::Receiver<Result<Vec<protocol::ChangeResult>, Error>>)>,
    /// A push is being handed to the tenant actor.
    forwarding: bool,
    /// The oldest of `awaiting_acks` is being waited for.
    awaiting_ack: bool,
}

/// Session state for what goes wrong or arrives in pieces.
#[derive(Default)]
struct RareState {
    /// When the bad frames of the last minute came.
    errors: VecDeque<Instant>,
    /// A fragmented message being reassembled.
    partial: Fragments,
}

pub struct DeviceSession {
    /// The socket: id, registration, bytes written and pings, close.
    core: SocketCore,
    encoding: Encoding,
    mode: SessionMode,
    phase: Phase,
    auth: Option<Authenticated>,
    epoch: Arc<str>,
    /// Where the session stands in the tenant's stream (the last seq it has handled: sent to
    /// the device, to subscriptions, or skipped as nobody's), and the live frames it holds
    /// while it catches up.
    stream: Follower,
    /// Last seq of the device stream (`catch_up`, `delta`) the client has; ahead of `position`
    /// while a new subscription makes the session read older entries again.
    device_after: Seq,
    /// `up_to_date` was sent once; later catch-ups repeat it only if they sent pages.
    device_live: bool,
    /// A `catch_up` page went to the device in the current catch-up.
    device_paged: bool,
    /// The socket's subscriptions (dashboards; boxed at the first `subscribe`, like `pushes`:
    /// 8 bytes in every session instead of a `Vec`'s 24).
    subscriptions: Option<Box<Subscriptions>>,
    /// Catch-up waits for pongs before sending more.
    catch_up_paused: bool,
    /// Pushes on their way to the tenant actor and back (boxed at the first push, like `rare`:
    /// an idle session stays small).
    pushes: Option<Box<PushQueues>>,
    closing: bool,
    /// A `resume` is reading the tenant's head.
    resuming: bool,
    /// Bad frames and fragments, which most sessions never see.
    rare: Option<Box<RareState>>,
    /// The token verified with the upgrade request, in force from `hello` on unless `hello`
    /// carries one (taken at `hello`).
    upgrade_identity: Option<Box<Identity>>,
}

impl DeviceSession {
    /// A session for a new socket; `upgrade_identity` is the token its upgrade request carried,
    /// already verified.
    pub fn new(hub: Arc<Hub>, upgrade_identity: Option<Identity>) -> DeviceSession {
        DeviceSession {
            core: SocketCore::new(hub),
            encoding: Encoding::Json,
            mode: SessionMode::Device,
            phase: Phase::AwaitHello,
            auth: None,
            epoch: Arc::from(""),
            stream: Follower::new(),
            device_after: 0,
            device_live: false,
            device_paged: false,
            subscriptions: None,
            catch_up_paused: false,
            pushes: None,
            closing: false,
            resuming: false,
            rare: None,
            upgrade_identity: upgrade_identity.map(Box::new),
        }
    }

    fn pushes_in_flight(&self) -> usize {
        self.pushes.as_ref().map_or(0, |p| p.in_flight)
    }

    fn subscriptions(&self) -> &[Subscription] {
        self.subscriptions.as_deref().map_or(&[], |s| s.list.as_slice())
    }

    fn subscriptions_mut(&mut self) -> &mut Vec<Subscription> {
        &mut self.subscriptions.get_or_insert_with(Box::default).list
    }

    /// Whether the hub records this session's traffic (its tenant is in `record_tenants`).
    /// Asked, not kept: a flag would cost every session its bytes (see the allocation test).
    fn recording(&self) -> bool {
        match (&self.core.hub.recorder, &self.auth) {
            (Some(recorder), Some(auth)) => recorder.records(auth.identity.tenant.as_str()),
            _ => false,
        }
    }

    /// Add an event of this session to the capture file, when its tenant is recorded.
    fn record(&self, event: CaptureEvent) {
        if let (Some(recorder), Some(auth)) = (&self.core.hub.recorder, &self.auth) {
            if recorder.records(auth.identity.tenant.as_str()) {
                recorder.record(self.core.id, &auth.identity, event);
            }
        }
    }

    fn unconfirmed(&self) -> u64 {
        self.core.unconfirmed()
    }

    fn write(&mut self, ctx: &mut ws::WebsocketContext<Self>, encoded: Encoded) {
        match encoded {
            Encoded::Text(text) => self.core.text(ctx, text),
            Encoded::Binary(bytes) => self.core.binary(ctx, bytes),
        }
    }

    fn send(&mut self, ctx: &mut ws::WebsocketContext<Self>, frame: &ServerFrame) {
        let encoded = Encoded::of(self.encoding, frame);
        self.write(ctx, encoded);
    }

    fn send_error(&mut self, ctx: &mut ws::WebsocketContext<Self>, id: Option<u64>, code: ErrorCode, message: impl Into<String>) {
        self.core.hub.metrics.error(code);
        let frame = ServerFrame::Error { id, code, message: message.into(), temporary: code.is_temporary(), retry_after_ms: None };
        self.send(ctx, &frame);
    }

    /// An error frame for `err`, with how long to wait when it says (a rate limit).
    fn send_failure(&mut self, ctx: &mut ws::WebsocketContext<Self>, id: Option<u64>, err: &Error) {
        let code = err.code();
        self.core.hub.metrics.error(code);
        let retry_after_ms = err.retry_after().map(crate::error::retry_after_ms);
        let frame = ServerFrame::Error { id, code, message: err.public_message(), temporary: code.is_temporary(), retry_after_ms };
        self.send(ctx, &frame);
    }

    fn close(&mut self, ctx: &mut ws::WebsocketContext<Self>, code: CloseCode, reason: &str) {
        if !self.core.close(ctx, code, reason) {
            return;
        }
        if let Some(auth) = &self.auth {
            if let Some(tenant) = auth.tenant.upgrade() {
                let _ = tenant.try_send(Unsubscribe { session: self.core.id });
            }
        }
    }

    /// Count a bad frame; too many in a minute closes the socket.
    fn bad_frame(&mut self, ctx: &mut ws::WebsocketContext<Self>, id: Option<u64>, code: ErrorCode, message: String) {
        let now = Instant::now();
        let errors = &mut self.rare.get_or_insert_with(Box::default).errors;
        while errors.front().is_some_and(|t| now.duration_since(*t) > Duration::from_secs(60)) {
            errors.pop_front();
        }
        errors.push_back(now);
        let too_many = errors.len() > self.core.hub.config.max_errors_per_minute as usize;
        self.send_error(ctx, id, code, message);
        if too_many {
            self.close(ctx, CloseCode::TooManyErrors, "too many bad frames");
        }
    }

    fn handle_payload(&mut self, ctx: &mut ws::WebsocketContext<Self>, bytes: &[u8], encoding: Encoding) {
        if self.phase == Phase::AwaitHello {
            // The encoding of `hello` is the session's encoding.
            self.encoding = encoding;
        }
        match protocol::codec::decode_client(encoding, bytes) {
            Ok(frame) => self.handle_frame(ctx, frame),
            // The reply echoes the request's id when the frame could be read that far.
            Err(err) => {
                let id = protocol::codec::peek_request_id(encoding, bytes);
                self.bad_frame(ctx, id, err.code(), err.to_string())
            }
        }
    }

    fn handle_frame(&mut self, ctx: &mut ws::WebsocketContext<Self>, frame: ClientFrame) {
        let id = frame.request_id();
        if self.recording() && !matches!(frame, ClientFrame::Hello { .. }) {
            self.record(CaptureEvent::Frame { msgpack: self.encoding == Encoding::MsgPack, frame: frame.clone().without_token() });
        }
        match frame {
            ClientFrame::Hello { versions, token, device_id, position, mode, .. } => {
                // The mode is the first hello's: a second one is refused and changes nothing.
                if self.phase == Phase::AwaitHello {
                    self.mode = mode;
                }
                self.hello(ctx, id, versions, token, device_id, position)
            }
            _ if self.auth.is_none() || self.phase == Phase::Starting => {
                self.bad_frame(ctx, Some(id), ErrorCode::NotAuthenticated, "send hello first".into())
            }
            ClientFrame::Ping { .. } => self.send(ctx, &ServerFrame::Pong { id }),
            ClientFrame::Push { .. } if self.mode == SessionMode::Dashboard => {
                self.send_error(ctx, Some(id), ErrorCode::Forbidden, "a dashboard session is read-only")
            }
            ClientFrame::Push { batch_id, changes, .. } => self.push(ctx, id, batch_id, changes),
            ClientFrame::Auth { token, .. } => self.refresh_token(ctx, id, &token),
            ClientFrame::Resume { position, .. } => self.resume(ctx, id, position),
            ClientFrame::Snapshot { table, after, limit, .. } => self.snapshot(ctx, id, table, after, limit),
            ClientFrame::Subscribe { sub, table, filter, snapshot, channel, .. } => {
                self.subscribe(ctx, id, sub, table, filter, snapshot, channel)
            }
            ClientFrame::Unsubscribe { sub, .. } => self.unsubscribe(ctx, id, &sub),
        }
    }

    fn hello(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        id: u64,
        versions: Vec<u32>,
        token: String,
        device_id: Option<String>,
        position: Option<Position>,
    ) {
        if self.phase != Phase::AwaitHello {
            return self.bad_frame(ctx, Some(id), ErrorCode::AlreadyAuthenticated, "hello was already sent".into());
        }
        self.core.clear_deadline();
        let Some(version) = SUPPORTED_VERSIONS.iter().rev().find(|v| versions.contains(v)).copied() else {
            self.send_error(ctx, Some(id), ErrorCode::UnsupportedVersion, format!("this hub speaks versions {SUPPORTED_VERSIONS:?}"));
            return self.close(ctx, CloseCode::UnsupportedVersion, "no common protocol version");
        };
        if !self.core.hub.accepting() {
            self.send_error(ctx, Some(id), ErrorCode::ShuttingDown, "the hub is shutting down");
            return self.close(ctx, CloseCode::GoingAway, "shutting down");
        }
        let verified = match self.upgrade_identity.take() {
            _ if !token.is_empty() => self.core.hub.verifier.verify(&token),
            Some(identity) => self.core.hub.verifier.still_valid(*identity),
            None => Err(Error::client(ErrorCode::InvalidToken, "no token: send it in hello.token or with the upgrade request")),
        };
        let identity = match verified {
            Ok(identity) => identity,
            Err(err) => {
                self.send_error(ctx, Some(id), err.code(), err.public_message());
                return self.close(ctx, CloseCode::Unauthorized, "token refused");
            }
        };
        let device = match (&identity.device, device_id) {
            // Dashboards never take a device's id (they would replace its session).
            _ if self.mode == SessionMode::Dashboard => DeviceId::new(format!("{DASHBOARD_DEVICE_PREFIX}{}", self.core.id)),
            (Some(claimed), Some(given)) if claimed.as_str() != given => {
                self.send_error(ctx, Some(id), ErrorCode::Forbidden, "device_id differs from the token's device");
                return self.close(ctx, CloseCode::Unauthorized, "device mismatch");
            }
            (Some(claimed), _) => claimed.clone(),
            (None, Some(given)) => match id_problem(&given, self.core.hub.config.max_id_bytes) {
                None => DeviceId::new(given),
                Some(problem) => {
                    self.send_error(ctx, Some(id), ErrorCode::Forbidden, format!("hello.device_id {problem}"));
                    return self.close(ctx, CloseCode::Unauthorized, "unusable device id");
                }
            },
            (None, None) => {
                self.send_error(ctx, Some(id), ErrorCode::Forbidden, "the token names no device: hello.device_id is required");
                return self.close(ctx, CloseCode::Unauthorized, "no device id");
            }
        };
        if self.mode == SessionMode::Device && DeviceId::is_reserved(device.as_str()) {
            self.send_error(ctx, Some(id), ErrorCode::Forbidden, "device ids starting with `console:`, `dashboard:` or `rxdb:` are the hub's own");
            return self.close(ctx, CloseCode::Unauthorized, "reserved device id");
        }
        if let Err(err) = self.core.hub.limits.connect(&identity.tenant) {
            self.send_failure(ctx, Some(id), &err);
            return self.close(ctx, CloseCode::RateLimited, "too many new sessions");
        }
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
        let (user, role) = (identity.user.clone(), identity.role.clone());
        let tenant_id = identity.tenant.clone();
        self.auth = Some(Authenticated { identity, tenant: tenant.downgrade(), view });
        let hello = ClientFrame::Hello { mode: Default::default(), id, versions, token: String::new(), device_id: Some(device.to_string()), position: position.clone() };
        self.record(CaptureEvent::Frame { msgpack: self.encoding == Encoding::MsgPack, frame: hello });
        // `started` set the link before any frame was read.
        let Some(link) = self.core.link.clone() else { return self.close(ctx, CloseCode::GoingAway, "session not started") };
        self.phase = Phase::Starting;
        let subscribe = Subscribe {
            session: self.core.id,
            device: device.clone(),
            user,
            role,
            mode: self.mode,
            since_ms: unix_ms(),
            link,
            exclusive: true,
        };
        let store = self.core.hub.store.clone();
        let asked = position.clone();
        let work = async move {
            // The actor stopped before answering: it could not read the tenant's head.
            let head = tenant.send(subscribe).await.map_err(|_| Error::client(ErrorCode::Unavailable, "storage is unavailable; retry later"))?;
            // The tenant actor's head answers a hello without a query. A position past it, or of
            // another epoch, is checked against Postgres before the device is told to resync:
            // it may hold entries of other SQL writers that a read of the log or a snapshot
            // showed the device before the actor fanned them out.
            match asked {
                Some(p) if *p.epoch != *head.epoch || p.seq > head.head_seq => store.tenant_head(&tenant_id).await,
                _ => Ok(head),
            }
        };
        ctx.spawn(work.into_actor(self).map(move |result, session, ctx| {
            if session.core.closed {
                return;
            }
            let head = match result {
                Ok(head) => head,
                Err(err) => {
                    session.send_error(ctx, Some(id), err.code(), err.public_message());
                    return session.close(ctx, CloseCode::GoingAway, "hub unavailable");
                }
            };
            let limits = Limits {
                max_frame_bytes: session.core.hub.config.max_frame_bytes as u64,
                max_batch_changes: session.core.hub.config.max_batch_changes as u32,
                catch_up_page_changes: session.core.hub.config.catch_up_page_changes,
                snapshot_page_rows: session.core.hub.config.snapshot_page_rows,
                session_pushes_in_flight: u32::try_from(session.core.hub.config.session_pushes_in_flight).unwrap_or(u32::MAX),
            };
            session.core.hub.metrics.sessions_opened.fetch_add(1, Ordering::Relaxed);
            session.send(
                ctx,
                &ServerFrame::Welcome {
                    id,
                    version,
                    session_id: session.core.id,
                    device_id: device.to_string(),
                    epoch: head.epoch.to_string(),
                    head_seq: head.head_seq,
                    limits,
                },
            );
            if session.mode == SessionMode::Dashboard {
                // Nothing to catch up on: subscriptions start from their own snapshots.
                session.epoch = head.epoch.clone();
                return session.start_catch_up(ctx, head.head_seq);
            }
            // No position (first start) is seq 0 of the current epoch.
            let position = position.unwrap_or_else(|| Position { epoch: head.epoch.to_string(), seq: 0 });
            session.start_from(ctx, &head, position);
        }));
    }

    /// Catch up from `position`, or send must_resync when it cannot be resumed: another epoch
    /// (or a seq past the head), or older than the log's floor.
    fn start_from(&mut self, ctx: &mut ws::WebsocketContext<Self>, head: &TenantHead, position: Position) {
        self.epoch = head.epoch.clone();
        if *position.epoch != *head.epoch || position.seq > head.head_seq {
            self.must_resync(ctx, head.head_seq, ErrorCode::EpochMismatch)
        } else if position.seq < head.log_floor {
            self.must_resync(ctx, head.head_seq, ErrorCode::PositionTooOld)
        } else {
            self.device_after = position.seq;
            self.note_seen(Some(position.seq));
            self.start_catch_up(ctx, position.seq)
        }
    }

    /// Tell the operations view (in the background: nothing waits for it, nothing fails with
    /// it) that this device was seen now, with the position it has.
    fn note_seen(&self, position: Option<Seq>) {
        if let (Some(auth), SessionMode::Device) = (&self.auth, self.mode) {
            let who = &auth.identity;
            self.core.hub.store.note_device_seen(&who.tenant, &who.device, &who.user, position);
        }
    }

    fn must_resync(&mut self, ctx: &mut ws::WebsocketContext<Self>, head_seq: Seq, reason: ErrorCode) {
        self.phase = Phase::AwaitResume;
        self.stream.stop();
        let frame = ServerFrame::MustResync { epoch: self.epoch.to_string(), head_seq, reason };
        self.send(ctx, &frame);
    }

    /// Hand the token's expiry (plus leeway) to the session clock.
    fn set_token_deadline(&self, expires_at: u64) {
        self.core.set_token_deadline(expires_at);
    }

    /// The session clock says the token expired: close, unless a refresh came first.
    fn token_expired(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        let Some(expires_at) = self.auth.as_ref().map(|a| a.identity.expires_at) else { return };
        if unix_now() < expires_at + self.core.hub.config.jwt_leeway_secs {
            return self.set_token_deadline(expires_at);
        }
        self.send_error(ctx, None, ErrorCode::TokenExpired, "the session's token expired");
        self.close(ctx, CloseCode::TokenExpired, "token expired");
    }

    fn refresh_token(&mut self, ctx: &mut ws::WebsocketContext<Self>, id: u64, token: &str) {
        match self.core.hub.verifier.verify(token).and_then(|identity| self.replace_token(identity)) {
            Ok(expires_at) => self.send(ctx, &ServerFrame::AuthOk { id, expires_at }),
            Err(err) => self.send_error(ctx, Some(id), err.code(), err.public_message()),
        }
    }

    /// Put a verified token in force in place of the session's (`auth`, or over HTTP); its
    /// expiry, or why it may not replace the session's.
    fn replace_token(&mut self, identity: Identity) -> Result<u64, Error> {
        // A dashboard session has an id of its own and ignores the token's device claim, as at
        // its hello.
        let dashboard = self.mode == SessionMode::Dashboard;
        let Some(auth) = self.auth.as_mut() else {
            return Err(Error::client(ErrorCode::NotAuthenticated, "the session has not been welcomed yet"));
        };
        let same_device = dashboard || identity.device.as_ref().is_none_or(|d| *d == auth.identity.device);
        if identity.tenant != auth.identity.tenant || identity.user != auth.identity.user || !same_device {
            return Err(Error::client(ErrorCode::Forbidden, "a refreshed token must name the same tenant, user and device"));
        }
        let expires_at = identity.expires_at;
        auth.view = self.core.hub.rules.view_for(&identity);
        auth.identity.role = identity.role;
        auth.identity.expires_at = expires_at;
        self.set_token_deadline(expires_at);
        Ok(expires_at)
    }

    fn push(&mut self, ctx: &mut ws::WebsocketContext<Self>, id: u64, batch_id: Uuid, changes: Vec<protocol::Change>) {
        if self.closing {
            return self.send_error(ctx, Some(id), ErrorCode::ShuttingDown, "the hub is shutting down; reconnect");
        }
        if let Err(err) = check_batch(&changes, self.core.hub.config.max_batch_changes) {
            return self.bad_frame(ctx, Some(id), err.code(), err.public_message());
        }
        if self.pushes_in_flight() >= self.core.hub.config.session_pushes_in_flight {
            let max = self.core.hub.config.session_pushes_in_flight;
            return self.send_error(ctx, Some(id), ErrorCode::Busy, format!("{max} pushes already await their acks on this session; wait for acks"));
        }
        // unwrap: only authenticated sessions reach here.
        let auth = self.auth.as_ref().expect("authenticated");
        if let Err(err) = self.core.hub.limits.push(&auth.identity.tenant, &auth.identity.device) {
            return self.send_failure(ctx, Some(id), &err);
        }
        let auth = self.auth.as_ref().expect("authenticated");
        let input = BatchInput { access: auth.view.clone(), ..BatchInput::pushed(auth.identity.device.clone(), auth.identity.user.clone(), batch_id, changes) };
        self.core.hub.metrics.batches_pushed.fetch_add(1, Ordering::Relaxed);
        let pushes = self.pushes.get_or_insert_with(Box::default);
        pushes.in_flight += 1;
        pushes.to_forward.push_back((id, batch_id, input));
        self.forward_pushes(ctx);
    }

    /// Hand pushes to the tenant actor one at a time, each once the previous one is queued there:
    /// concurrent sends could overtake each other while its mailbox is full, and a batch merged
    /// before an earlier one of the same device would be refused `seq_gap`.
    fn forward_pushes(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        let Some(pushes) = self.pushes.as_mut().filter(|p| !p.forwarding) else { return };
        let (Some(auth), Some((id, batch_id, input))) = (self.auth.as_ref(), pushes.to_forward.pop_front()) else { return };
        let tenant = auth.tenant.upgrade();
        pushes.forwarding = true;
        let queue = async move {
            match tenant {
                Some(tenant) => tenant.send(ApplyBatch { input }).await,
                None => Err(MailboxError::Closed),
            }
        };
        ctx.spawn(queue.into_actor(self).map(move |queued, session, ctx| {
            if let Some(pushes) = session.pushes.as_mut() {
                pushes.forwarding = false;
            }
            match queued {
                Ok(Ok(answer)) => {
                    session.pushes.get_or_insert_with(Box::default).awaiting_acks.push_back((id, batch_id, answer));
                    session.await_next_ack(ctx);
                }
                Ok(Err(err)) => session.push_done(ctx, id, batch_id, Err(err)),
                Err(_) => session.push_done(ctx, id, batch_id, Err(Error::client(ErrorCode::Unavailable, "tenant actor unavailable; retry"))),
            }
            session.forward_pushes(ctx);
        }));
    }

    /// Wait for the results of the oldest queued push, so that acks go out in push order.
    fn await_next_ack(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        let Some(pushes) = self.pushes.as_mut().filter(|p| !p.awaiting_ack) else { return };
        let Some((id, batch_id, answer)) = pushes.awaiting_acks.pop_front() else { return };
        pushes.awaiting_ack = true;
        ctx.spawn(async move { answer.await }.into_actor(self).map(move |reply, session, ctx| {
            if let Some(pushes) = session.pushes.as_mut() {
                pushes.awaiting_ack = false;
            }
            session.push_done(ctx, id, batch_id, reply.unwrap_or(Err(Error::ShuttingDown)));
            session.await_next_ack(ctx);
        }));
    }

    /// A push was committed (ack) or refused as a whole (error).
    fn push_done(&mut self, ctx: &mut ws::WebsocketContext<Self>, id: u64, batch_id: Uuid, reply: Result<Vec<protocol::ChangeResult>, Error>) {
        if let Some(pushes) = self.pushes.as_mut() {
            pushes.in_flight -= 1;
        }
        match reply {
            Ok(results) => {
                if self.recording() {
                    let acked = results.iter().map(|r| AckedChange { device_seq: r.device_seq, status: r.status, seq: r.seq }).collect();
                    self.record(CaptureEvent::Ack { batch_id, results: acked });
                }
                self.send(ctx, &ServerFrame::Ack { id, batch_id, results })
            }
            Err(err) => self.send_error(ctx, Some(id), err.code(), err.public_message()),
        }
        if self.closing && self.pushes_in_flight() == 0 {
            self.close(ctx, CloseCode::GoingAway, "shutting down");
        }
    }

    fn resume(&mut self, ctx: &mut ws::WebsocketContext<Self>, id: u64, position: Position) {
        if self.phase != Phase::AwaitResume || self.resuming {
            return self.bad_frame(ctx, Some(id), ErrorCode::InvalidBatch, "resume is only valid after must_resync".into());
        }
        // The position is checked as on hello, against the tenant's head as it is now: the
        // epoch or the log's floor may have moved while the device read its snapshot.
        self.resuming = true;
        let store = self.core.hub.store.clone();
        // unwrap: only authenticated sessions reach here.
        let tenant = self.auth.as_ref().expect("authenticated").identity.tenant.clone();
        ctx.spawn(async move { store.tenant_head(&tenant).await }.into_actor(self).map(move |result, session, ctx| {
            session.resuming = false;
            match result {
                Ok(head) => session.start_from(ctx, &head, position),
                Err(err) => session.send_error(ctx, Some(id), err.code(), err.public_message()),
            }
        }));
    }

    fn snapshot(&mut self, ctx: &mut ws::WebsocketContext<Self>, id: u64, table: String, after: Option<protocol::Object>, limit: Option<u32>) {
        let store = self.core.hub.store.clone();
        // unwrap: only authenticated sessions reach here.
        let identity = &self.auth.as_ref().expect("authenticated").identity;
        let (tenant, access) = (identity.tenant.clone(), self.view());
        let limit = limit.unwrap_or(self.core.hub.config.snapshot_page_rows).clamp(1, self.core.hub.config.snapshot_page_rows);
        let work = async move {
            let catalog = store.catalog_with(&table).await;
            let Some(schema) = catalog.get(&table).cloned() else {
                return Err(Error::client(ErrorCode::UnknownTable, format!("`{table}` is not a synced table")));
            };
            let (rows, seq, epoch) = store.snapshot_page(&tenant, &schema, after.as_ref(), limit, access.as_deref()).await.map_err(|e| match e {
                // Only an `after` the key's columns refuse is the client's; an outage is not.
                Error::Database(ref db) if matches!(crate::storage::refusal::blame(db), crate::storage::refusal::Blame::Change(..)) => {
                    Error::client(ErrorCode::InvalidKey, "`after` does not match the table's primary key")
                }
                other => other,
            })?;
            let next_after = (rows.len() as u32 == limit)
                .then(|| rows.last().map(|r| schema.key.iter().filter_map(|k| Some((k.clone(), r.row.get(k)?.clone()))).collect()))
                .flatten();
            Ok(ServerFrame::SnapshotPage { id, table, rows, seq, epoch, next_after })
        };
        ctx.spawn(work.into_actor(self).map(move |result, session, ctx| match result {
            Ok(frame) => session.send(ctx, &frame),
            Err(err) => session.send_error(ctx, Some(id), err.code(), err.public_message()),
        }));
    }

    #[allow(clippy::too_many_arguments)]
    fn subscribe(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        id: u64,
        name: String,
        table: Option<String>,
        filter: Vec<Condition>,
        snapshot: bool,
        channel: Option<Channel>,
    ) {
        if self.phase != Phase::Streaming {
            return self.bad_frame(ctx, Some(id), ErrorCode::InvalidBatch, "subscribe after welcome (and after resume, when told to resync)".into());
        }
        let rate = self.core.hub.limits.session_subscribes;
        let now = std::time::Instant::now();
        let bucket = self.subscriptions.get_or_insert_with(Box::default).bucket.get_or_insert_with(|| rate.full(now));
        if let Err(retry_after) = rate.take(bucket, now) {
            return self.send_failure(ctx, Some(id), &Error::RateLimited { what: "subscriptions", retry_after });
        }
        if name.is_empty() || name.chars().count() > 64 {
            return self.bad_frame(ctx, Some(id), ErrorCode::InvalidFilter, "`sub` must be 1 to 64 characters".into());
        }
        if self.subscriptions().iter().any(|s| s.name == name) {
            return self.bad_frame(ctx, Some(id), ErrorCode::InvalidFilter, format!("a subscription named `{name}` exists on this socket"));
        }
        let max = self.core.hub.config.max_subscriptions_per_session;
        if self.subscriptions().len() >= max {
            return self.send_error(ctx, Some(id), ErrorCode::TooManySubscriptions, format!("at most {max} subscriptions per socket"));
        }
        match (table, channel) {
            (Some(table), None) => self.subscribe_table(ctx, id, name, table, filter, snapshot),
            (None, Some(channel)) if filter.is_empty() && !snapshot => self.subscribe_channel(ctx, id, name, channel),
            (None, Some(_)) => self.bad_frame(ctx, Some(id), ErrorCode::InvalidFilter, "a channel takes no filter and no snapshot".into()),
            _ => self.bad_frame(ctx, Some(id), ErrorCode::InvalidFilter, "name exactly one of `table` and `channel`".into()),
        }
    }

    fn subscribe_channel(&mut self, ctx: &mut ws::WebsocketContext<Self>, id: u64, name: String, channel: Channel) {
        // unwrap: only authenticated sessions reach here.
        let auth = self.auth.as_ref().expect("authenticated");
        if channel == Channel::Conflicts && !self.core.hub.config.is_manager(&auth.identity.role) {
            return self.send_error(ctx, Some(id), ErrorCode::Forbidden, format!("role {} may not review conflicts", auth.identity.role));
        }
        let watching = self.subscriptions().iter().any(|s| matches!(s.target, Target::Channel(c) if c == channel));
        // Presence is asked for again by a second subscription: the tenant answers with the
        // list, which every presence subscription gets after its `subscribed`.
        let ask = !watching || channel == Channel::Presence;
        if ask && auth.tenant.upgrade().is_none_or(|t| t.try_send(Watch { session: self.core.id, channel, on: true }).is_err()) {
            return self.send_error(ctx, Some(id), ErrorCode::Busy, "the tenant is saturated; retry");
        }
        self.subscriptions_mut().push(Subscription { name: name.clone(), target: Target::Channel(channel) });
        self.core.hub.metrics.subscriptions.fetch_add(1, Ordering::Relaxed);
        self.send(ctx, &ServerFrame::Subscribed { id, sub: name, seq: self.stream.position() });
    }

    fn subscribe_table(&mut self, ctx: &mut ws::WebsocketContext<Self>, id: u64, name: String, table: String, filter: Vec<Condition>, snapshot: bool) {
        // Reserve the name now; the subscription gets deltas once `ready`.
        self.subscriptions_mut().push(Subscription {
            name: name.clone(),
            target: Target::Table { table: table.clone(), filter: filter.clone(), after: Seq::MAX, ready: false, request: id },
        });
        let store = self.core.hub.store.clone();
        // unwrap: only authenticated sessions reach here.
        let tenant = self.auth.as_ref().expect("authenticated").identity.tenant.clone();
        let (page_rows, max_rows) = (self.core.hub.config.snapshot_page_rows, self.core.hub.config.subscription_snapshot_max_rows);
        let view = self.view();
        let work = async move {
            let catalog = store.catalog_with(&table).await;
            let Some(schema) = catalog.get(&table).cloned() else {
                return Err(Error::client(ErrorCode::UnknownTable, format!("`{table}` is not a synced table")));
            };
            if view.as_ref().is_some_and(|v| !v.can_read(&table)) {
                return Err(Error::client(ErrorCode::Forbidden, format!("this role may not read {table}")));
            }
            let hidden = view.as_ref().map_or(&[][..], |v| v.hidden_columns(&table));
            for condition in &filter {
                if !schema.columns.contains_key(&condition.column) || hidden.contains(&condition.column) {
                    return Err(Error::client(ErrorCode::InvalidFilter, format!("{table} has no column `{}`", condition.column)));
                }
                protocol::filter::check(condition).map_err(|m| Error::client(ErrorCode::InvalidFilter, m))?;
            }
            if !snapshot {
                return Ok(None);
            }
            let keep = |row: &protocol::Object| view.as_ref().is_none_or(|v| v.row_visible(&table, row));
            match store.subscription_snapshot(&tenant, &schema, &filter, page_rows, max_rows, keep).await? {
                Ok((mut rows, seq)) => {
                    if let Some(view) = &view {
                        for r in &mut rows {
                            view.strip_hidden(&table, &mut r.row);
                        }
                    }
                    Ok(Some((rows, seq)))
                }
                Err(SnapshotRefusal::TooLarge { max_rows }) => Err(Error::client(
                    ErrorCode::SnapshotTooLarge,
                    format!("more than {max_rows} rows match; narrow the filter or subscribe without a snapshot"),
                )),
            }
        };
        ctx.spawn(work.into_actor(self).map(move |result, session, ctx| {
            let pending = |s: &Subscription| s.name == name && matches!(s.target, Target::Table { ready: false, request, .. } if request == id);
            if session.core.closed {
                return;
            }
            let Some(index) = session.subscriptions().iter().position(pending) else {
                // Unsubscribed before its snapshot finished: every request gets its answer.
                let withdrawn = format!("`{name}` was unsubscribed before its snapshot finished");
                return session.send_error(ctx, Some(id), ErrorCode::UnknownSubscription, withdrawn);
            };
            let snapshot = match result {
                Ok(snapshot) => snapshot,
                Err(err) => {
                    session.subscriptions_mut().remove(index);
                    return session.send_error(ctx, Some(id), err.code(), err.public_message());
                }
            };
            // Without a snapshot the subscription starts where the session's stream is.
            let seq = snapshot.as_ref().map_or(session.stream.position(), |(_, seq)| *seq);
            session.send(ctx, &ServerFrame::Subscribed { id, sub: name.clone(), seq });
            session.core.hub.metrics.subscriptions.fetch_add(1, Ordering::Relaxed);
            if let Some((rows, _)) = snapshot {
                session.core.hub.metrics.subscription_snapshot_rows.fetch_add(rows.len() as u64, Ordering::Relaxed);
                let page = page_rows.max(1) as usize;
                let pages = rows.len().div_ceil(page).max(1);
                let mut rows = rows.into_iter();
                for n in 1..=pages {
                    let chunk: Vec<SnapshotRow> = rows.by_ref().take(page).collect();
                    session.send(ctx, &ServerFrame::SubRows { sub: name.clone(), rows: chunk, seq, last: n == pages });
                }
            }
            if let Target::Table { after, ready, .. } = &mut session.subscriptions_mut()[index].target {
                *after = seq;
                *ready = true;
            }
            session.rewind(ctx, seq);
        }));
    }

    fn unsubscribe(&mut self, ctx: &mut ws::WebsocketContext<Self>, id: u64, name: &str) {
        let Some(index) = self.subscriptions().iter().position(|s| s.name == name) else {
            return self.send_error(ctx, Some(id), ErrorCode::UnknownSubscription, format!("no subscription named `{name}`"));
        };
        let removed = self.subscriptions_mut().remove(index);
        if !matches!(removed.target, Target::Table { ready: false, .. }) {
            self.core.hub.metrics.subscriptions.fetch_sub(1, Ordering::Relaxed);
        }
        if let Target::Channel(channel) = removed.target {
            let still = self.subscriptions().iter().any(|s| matches!(s.target, Target::Channel(c) if c == channel));
            if let (false, Some(auth)) = (still, &self.auth) {
                // Best effort: a watcher that is gone is also dropped with the session.
                if let Some(tenant) = auth.tenant.upgrade() {
                    let _ = tenant.try_send(Watch { session: self.core.id, channel, on: false });
                }
            }
        }
        self.send(ctx, &ServerFrame::Unsubscribed { id, sub: removed.name });
    }

    fn view(&self) -> Option<Arc<AccessView>> {
        self.auth.as_ref().and_then(|a| a.view.clone())
    }

    fn channel_subscriptions(&self, channel: Channel) -> Vec<String> {
        self.subscriptions().iter().filter(|s| matches!(s.target, Target::Channel(c) if c == channel)).map(|s| s.name.clone()).collect()
    }

    fn start_catch_up(&mut self, ctx: &mut ws::WebsocketContext<Self>, from: Seq) {
        self.phase = Phase::Streaming;
        self.stream.start_at(from);
        self.catch_up_step(ctx);
    }

    /// Read one page of the stream after the session's position when it is catching up; when
    /// the log is exhausted and the held live frames continue where it ended, switch to live.
    fn catch_up_step(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        if self.phase != Phase::Streaming || !self.stream.wants_read() || self.core.closed {
            return;
        }
        if self.unconfirmed() > self.core.hub.config.session_outbound_budget_bytes as u64 / 2 {
            // Flow control: wait for the client to read what was sent (resumed on pong).
            self.catch_up_paused = true;
            ctx.ping(&self.core.bytes_written().to_be_bytes());
            return;
        }
        let Some(after) = self.stream.next_read() else { return };
        let store = self.core.hub.store.clone();
        // unwrap: catch-up only starts after hello succeeded.
        let auth = self.auth.as_ref().expect("authenticated");
        let (tenant, actor) = (auth.identity.tenant.clone(), auth.tenant.upgrade());
        let page = self.core.hub.config.catch_up_page_changes;
        let read = async move { read_after(&store, &tenant, actor, after, page).await };
        ctx.spawn(read.into_actor(self).map(move |result, session, ctx| {
            let (read, head) = match result {
                Ok(read) => read,
                Err(err) => {
                    session.stream.read_failed();
                    tracing::warn!(session = %session.core.id, %err, "catch-up read failed");
                    session.send_error(ctx, None, err.code(), err.public_message());
                    return session.close(ctx, CloseCode::GoingAway, "storage unavailable");
                }
            };
            let deltas = read.page(after, page);
            // Seqs in the log have no gaps: a read from Postgres that does not continue right
            // after `after` while the head is past it met entries trimmed away since hello
            // (the floor the session was checked against is the tenant actor's, read at its start).
            let first = deltas.first().map_or(head + 1, |d| d.seq);
            if session.mode == SessionMode::Device && matches!(read, StreamRead::Log(_)) && after < head && first > after + 1 {
                return session.must_resync(ctx, head, ErrorCode::PositionTooOld);
            }
            let exhausted = (deltas.len() as u32) < page;
            let last = deltas.last().map(|d| d.seq);
            if let Some(last) = last {
                session.send_catch_up_page(ctx, &read, &deltas, after, last, head);
                session.route_to_subscriptions(ctx, &deltas, last);
            }
            // Go live only once the client has confirmed most of what catch-up sent: past the
            // budget a live frame closes the session, so switching with a large page still
            // unconfirmed would cut off a client that reads fine but whose pong is on its way.
            // Otherwise the next step waits for the pong and reads the log again.
            let confirmed_enough = session.unconfirmed() <= session.core.hub.config.session_outbound_budget_bytes as u64 / 2;
            match session.stream.page_read(last, exhausted && confirmed_enough) {
                AfterPage::ReadAgain => session.catch_up_step(ctx),
                AfterPage::Live(held) => session.went_live(ctx, held),
            }
        }));
    }

    /// A catch-up page's deltas the device has not had, as a `catch_up` frame (devices only).
    fn send_catch_up_page(&mut self, ctx: &mut ws::WebsocketContext<Self>, read: &StreamRead, deltas: &[&Delta], after: Seq, last: Seq, head: Seq) {
        let from_memory = matches!(read, StreamRead::Memory(_));
        let pages = if from_memory { &self.core.hub.metrics.catch_up_pages_from_memory } else { &self.core.hub.metrics.catch_up_pages };
        pages.fetch_add(1, Ordering::Relaxed);
        if self.mode != SessionMode::Device || last <= self.device_after {
            return;
        }
        let device_after = self.device_after;
        let view = self.view();
        let visible: Vec<Cow<Delta>> = deltas.iter().filter(|d| d.seq > device_after).filter_map(|d| visible(view.as_deref(), d)).collect();
        // A page that the rules emptied is not sent; `up_to_date` carries the position.
        if !visible.is_empty() {
            let encoded = match (read, &view) {
                // Cut from the frames' own encoding: no delta encoded per session.
                (StreamRead::Memory(frames), None) => spliced_page(frames, self.encoding, after.max(device_after), last, head),
                // Encoded from the deltas where they are kept: no copy per session.
                _ => {
                    let page = CatchUpRef { deltas: visible.iter().map(|d| d.as_ref()).collect(), seq: last, head_seq: head };
                    Encoded::of_value(self.encoding, &page)
                }
            };
            self.write(ctx, encoded);
            self.device_paged = true;
        }
        self.device_after = last;
    }

    /// Live now: the device hears `up_to_date` (after a catch-up that sent pages, or the first
    /// time), and the frames held meanwhile go out.
    fn went_live(&mut self, ctx: &mut ws::WebsocketContext<Self>, held: VecDeque<Arc<SharedFrame>>) {
        if self.mode == SessionMode::Device && (!self.device_live || self.device_paged) {
            self.send(ctx, &ServerFrame::UpToDate { seq: self.stream.position() });
        }
        self.device_live = true;
        self.device_paged = false;
        for frame in held {
            self.deliver(ctx, frame);
        }
    }

    /// Send a live frame, dropping deltas the client already has; hold it while catching up.
    fn deliver(&mut self, ctx: &mut ws::WebsocketContext<Self>, frame: Arc<SharedFrame>) {
        let after = match self.stream.live_frame(frame.clone(), CATCH_UP_BUFFER_FRAMES) {
            LiveVerdict::Deliver { after } => after,
            LiveVerdict::Nothing => return,
            // Frames went missing (mailbox was full): fall back to the log.
            LiveVerdict::Read => return self.catch_up_step(ctx),
        };
        let own = frame.origin.is_some() && frame.origin.as_deref() == self.auth.as_ref().map(|a| a.identity.device.as_str());
        if own && self.subscriptions().is_empty() {
            // The device's own changes: it has their acks, so only the position moves.
            self.device_after = self.device_after.max(frame.seq);
            return;
        }
        if self.unconfirmed() > self.core.hub.config.session_outbound_budget_bytes as u64 {
            return self.close(ctx, CloseCode::SlowConsumer, "client is not reading; resume from your last seq");
        }
        if self.mode == SessionMode::Device && frame.seq > self.device_after {
            let view = self.view();
            let encoded = if own {
                None
            } else if frame.after == self.device_after && view.is_none() {
                (!frame.deltas.is_empty()).then(|| frame.encoded(self.encoding))
            } else {
                let device_after = self.device_after;
                let rest: Vec<Delta> = frame
                    .deltas
                    .iter()
                    .filter(|d| d.seq > device_after)
                    .filter_map(|d| visible(view.as_deref(), d).map(Cow::into_owned))
                    .collect();
                (!rest.is_empty()).then(|| Encoded::of(self.encoding, &ServerFrame::Delta { deltas: rest, seq: frame.seq }))
            };
            self.device_after = frame.seq;
            if let Some(encoded) = encoded {
                self.write(ctx, encoded);
            }
        }
        let fresh: Vec<&Delta> = frame.deltas.iter().filter(|d| d.seq > after).collect();
        self.route_to_subscriptions(ctx, &fresh, frame.seq);
    }

    /// Give each ready table subscription the deltas up to `seq` that it has not had and that
    /// its filter lets through.
    fn route_to_subscriptions(&mut self, ctx: &mut ws::WebsocketContext<Self>, deltas: &[&Delta], seq: Seq) {
        if self.subscriptions().is_empty() {
            return;
        }
        let mut frames = Vec::new();
        let view = self.view();
        let Some(subscriptions) = self.subscriptions.as_mut() else { return };
        for sub in subscriptions.list.iter_mut() {
            let Target::Table { table, filter, after, ready: true, .. } = &mut sub.target else { continue };
            if seq <= *after {
                continue;
            }
            let since = *after;
            let picked: Vec<Delta> = deltas
                .iter()
                .filter(|d| d.seq > since && d.table == *table)
                // The rules first (they may hide the row or turn it into a delete), then the filter.
                .filter_map(|d| {
                    let seen = visible(view.as_deref(), d)?;
                    subscription_view(table, filter, &seen).map(|c| c.into_owned())
                })
                .collect();
            *after = seq;
            if !picked.is_empty() {
                self.core.hub.metrics.subscription_deltas.fetch_add(picked.len() as u64, Ordering::Relaxed);
                frames.push(ServerFrame::SubDelta { sub: sub.name.clone(), deltas: picked, seq });
            }
        }
        for frame in frames {
            self.send(ctx, &frame);
        }
    }

    /// Read the stream again from `to` (a subscription's snapshot is older than `position`);
    /// whoever already has an entry skips it.
    fn rewind(&mut self, ctx: &mut ws::WebsocketContext<Self>, to: Seq) {
        if self.phase == Phase::Streaming && self.stream.rewind(to) {
            self.catch_up_step(ctx);
        }
    }

    fn heartbeat(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        if !self.core.heartbeat(ctx) {
            self.close(ctx, CloseCode::HeartbeatTimeout, "no pong or frame within the heartbeat timeout");
        }
    }
}

impl Actor for DeviceSession {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.core.hub.config.session_mailbox);
        // Deadlines and heartbeats come from the session clock (`sweep`), not per-session timers.
        let hello_deadline = unix_ms() + self.core.hub.config.hello_timeout_ms;
        self.core.register(SessionAddr::Native(ctx.address()), hello_deadline);
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.core.deregister();
        let held = self.subscriptions().iter().filter(|s| !matches!(s.target, Target::Table { ready: false, .. })).count();
        self.core.hub.metrics.subscriptions.fetch_sub(held as i64, Ordering::Relaxed);
        self.record(CaptureEvent::Close);
        // The last seq sent to the device, once it resumed (before, its position is unknown).
        if matches!(self.phase, Phase::Streaming | Phase::AwaitResume) {
            self.note_seen((self.phase == Phase::Streaming).then_some(self.device_after));
        }
        if let Some(auth) = &self.auth {
            if let Some(tenant) = auth.tenant.upgrade() {
                let _ = tenant.try_send(Unsubscribe { session: self.core.id });
            }
        }
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for DeviceSession {
    fn handle(&mut self, msg: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        let msg = match self.core.receive(ctx, msg) {
            Inbound::Message(msg) => msg,
            Inbound::Close(code, reason) => return self.close(ctx, code, reason),
            Inbound::Nothing => return,
        };
        match msg {
            ws::Message::Text(text) => self.handle_payload(ctx, text.as_bytes(), Encoding::Json),
            ws::Message::Binary(bytes) => self.handle_payload(ctx, &bytes, Encoding::MsgPack),
            ws::Message::Ping(payload) => ctx.pong(&payload),
            ws::Message::Pong(payload) => {
                self.core.pong(&payload);
                if self.catch_up_paused && self.unconfirmed() <= self.core.hub.config.session_outbound_budget_bytes as u64 / 2 {
                    self.catch_up_paused = false;
                    self.catch_up_step(ctx);
                }
            }
            ws::Message::Continuation(item) => self.continuation(ctx, item),
            ws::Message::Close(reason) => {
                // The client closes: answer its close frame, then stop.
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

impl DeviceSession {
    /// Reassemble fragmented messages, bounded by `max_frame_bytes`.
    fn continuation(&mut self, ctx: &mut ws::WebsocketContext<Self>, item: actix_http::ws::Item) {
        let max = self.core.hub.config.max_frame_bytes;
        match self.rare.get_or_insert_with(Box::default).partial.add(item, max) {
            Ok(Some((text, whole))) => {
                let encoding = if text { Encoding::Json } else { Encoding::MsgPack };
                self.handle_payload(ctx, &whole, encoding);
            }
            Ok(None) => {}
            Err(why) => self.close(ctx, CloseCode::MessageTooBig, why),
        }
    }
}

impl Handler<LiveFrame> for DeviceSession {
    type Result = ();

    fn handle(&mut self, LiveFrame(frames): LiveFrame, ctx: &mut Self::Context) {
        for frame in frames.iter() {
            if self.core.closed {
                return;
            }
            match self.phase {
                // Delivered, or held (bounded) while catching up or starting.
                Phase::Streaming | Phase::Starting => self.deliver(ctx, frame.clone()),
                Phase::AwaitHello | Phase::AwaitResume => {}
            }
        }
    }
}

impl Handler<Notice> for DeviceSession {
    type Result = ();

    fn handle(&mut self, notice: Notice, ctx: &mut Self::Context) {
        if self.core.closed || self.phase == Phase::AwaitHello {
            return;
        }
        match notice {
            Notice::Broadcast(frame) => {
                let encoded = frame.encoded(self.encoding);
                self.write(ctx, encoded);
            }
            Notice::PresenceList(online) => {
                for sub in self.channel_subscriptions(Channel::Presence) {
                    self.send(ctx, &ServerFrame::Presence { sub, online: online.to_vec() });
                }
            }
            Notice::PresenceDiff { joins, leaves } => {
                for sub in self.channel_subscriptions(Channel::Presence) {
                    self.send(ctx, &ServerFrame::PresenceDiff { sub, joins: joins.to_vec(), leaves: leaves.to_vec() });
                }
            }
            Notice::Conflicts(news) => {
                for sub in self.channel_subscriptions(Channel::Conflicts) {
                    for (event, record) in &news.events {
                        let frame = ServerFrame::Conflict { sub: sub.clone(), event: *event, conflict: Box::new(record.clone()), open: news.open };
                        self.send(ctx, &frame);
                    }
                }
            }
            // Native sessions join no topics.
            Notice::Topic(_) => {}
        }
    }
}

impl Handler<RefreshToken> for DeviceSession {
    type Result = Result<u64, Error>;

    fn handle(&mut self, msg: RefreshToken, _ctx: &mut Self::Context) -> Self::Result {
        let tenant_matches = self.auth.as_ref().is_some_and(|a| a.identity.tenant == msg.0.tenant);
        if self.core.closed || self.phase == Phase::Starting || !tenant_matches {
            return Err(Error::client(ErrorCode::NotFound, NO_SUCH_SESSION));
        }
        self.replace_token(msg.0)
    }
}

impl Handler<SessionControl> for DeviceSession {
    type Result = ();

    fn handle(&mut self, msg: SessionControl, ctx: &mut Self::Context) {
        if self.core.closed {
            // Closed and waiting for the client's answer: a shutdown does not wait for it.
            if msg == SessionControl::Shutdown {
                ctx.stop();
            }
            return;
        }
        match msg {
            SessionControl::Replaced => self.close(ctx, CloseCode::Replaced, "the device opened a newer session"),
            SessionControl::Lagged => {
                if self.phase == Phase::Streaming && self.stream.lagged() {
                    self.catch_up_step(ctx);
                }
            }
            SessionControl::Shutdown => {
                self.closing = true;
                if self.pushes_in_flight() == 0 {
                    self.close(ctx, CloseCode::GoingAway, "the hub is shutting down; reconnect");
                }
            }
            SessionControl::Heartbeat => self.heartbeat(ctx),
            SessionControl::Deadline if self.phase == Phase::AwaitHello => {
                // The context handles its mailbox before the frames read from the socket: a
                // hub that fell behind (a reconnect storm) would close sessions whose hello is
                // already here. Look again once those frames had their turn.
                ctx.run_later(HELLO_GRACE, |session, ctx| {
                    if session.phase == Phase::AwaitHello && !session.core.closed {
                        session.close(ctx, CloseCode::HelloTimeout, "hello did not arrive in time");
                    }
                });
            }
            SessionControl::Deadline => self.token_expired(ctx),
        }
    }
}

#[cfg(test)]
mod tests {
    use actix::prelude::*;
    use actix_web_actors::ws;

    /// An actor as large as `DeviceSession` (and as aligned), which needs no hub to build.
    struct SameSize(#[allow(dead_code)] [u64; std::mem::size_of::<super::DeviceSession>() / 8]);

    impl Actor for SameSize {
        type Context = ws::WebsocketContext<Self>;
    }

    impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for SameSize {
        fn handle(&mut self, _: Result<ws::Message, ws::ProtocolError>, _: &mut Self::Context) {}
    }

    /// Every open socket holds its session inside actix-web-actors' context future, wrapped
    /// in the framing guard's `OutboundCloser` and boxed as the response body with 8 bytes
    /// more (actix-http's error mapper): one allocation that every idle connection pays. At
    /// 640 bytes or less it fits jemalloc's 640-byte size class (the next is 768). State an
    /// idle session does not use is boxed, or kept in its `SessionHandle` or the guard's
    /// `Verdict`, to stay under it.
    #[actix_web::test]
    async fn an_idle_session_fits_its_allocation_class() {
        use crate::transport::frame_guard::{OutboundCloser, Verdict};
        assert_eq!(std::mem::size_of::<super::DeviceSession>() % 8, 0);
        let empty = futures_util::stream::empty::<Result<bytes::Bytes, actix_web::error::PayloadError>>();
        let session = SameSize([0; std::mem::size_of::<super::DeviceSession>() / 8]);
        let context = ws::WebsocketContext::with_codec(session, empty, actix_http::ws::Codec::new());
        let verdict = std::rc::Rc::new(Verdict::new(Default::default()));
        let body = OutboundCloser::new(context, verdict);
        let size = std::mem::size_of_val(&body);
        assert!(size + 8 <= 640, "a session's response body is {size} bytes; box state an idle session does not use");
    }
}
