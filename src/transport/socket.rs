//! What every session keeps of its socket, whatever protocol it speaks: its id and registration
//! with the session clock, the bytes written and the pings that measure what the client read
//! (the outbound byte budget), heartbeats, the token deadline, and the one way to close. The
//! native session and the protocol adapters build on it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_web_actors::ws;

use crate::actors::sweep::{monotonic_ms, SessionAddr, SessionHandle};
use crate::ids::SessionId;
use crate::server::Hub;
use protocol::CloseCode;

/// After sending a close frame, how long a session waits for the client's close reply before
/// it drops the connection (at once while the hub shuts down).
const CLOSE_REPLY_WAIT: Duration = Duration::from_secs(10);

/// What a session does with what its stream handler received.
pub enum Inbound {
    /// A message to handle.
    Message(ws::Message),
    /// Close the session with this code.
    Close(CloseCode, &'static str),
    /// Nothing to do (the session is closing, or the connection is gone).
    Nothing,
}

pub struct SocketCore {
    pub id: SessionId,
    pub hub: Arc<Hub>,
    /// How the session clock and the tenant actor reach this session (set once started); it
    /// also holds the counts of bytes written and confirmed.
    pub link: Option<Arc<SessionHandle>>,
    /// A close frame was sent: nothing more is written or handled, and the session stops when
    /// the client answers the close (or after `CLOSE_REPLY_WAIT`).
    pub closed: bool,
}

impl SocketCore {
    pub fn new(hub: Arc<Hub>) -> SocketCore {
        SocketCore { id: SessionId::new_v4(), hub, link: None, closed: false }
    }

    /// Register the started session with the hub: `deadline_ms` (Unix ms) is when it must have
    /// authenticated.
    pub fn register(&mut self, addr: SessionAddr, deadline_ms: u64) {
        let link = Arc::new(SessionHandle::new(addr, deadline_ms.max(1)));
        self.hub.sessions.insert(self.id, link.clone());
        self.link = Some(link);
    }

    pub fn deregister(&self) {
        self.hub.sessions.remove(&self.id);
    }

    /// Count a frame about to be written of `len` bytes; returns the ping to send after it,
    /// each time the count passes a multiple of `ping_every_bytes` (no per-session "next ping
    /// at" to keep). The pong echoes the count: everything before it has been read.
    fn count(&mut self, len: usize) -> Option<[u8; 8]> {
        self.hub.metrics.frames_sent.fetch_add(1, Ordering::Relaxed);
        self.hub.metrics.bytes_sent.fetch_add(len as u64, Ordering::Relaxed);
        let link = self.link.as_ref()?;
        let before = link.bytes_written.fetch_add(len as u64, Ordering::Relaxed);
        let after = before + len as u64;
        let every = self.hub.config.ping_every_bytes.max(1) as u64;
        (before / every != after / every).then(|| after.to_be_bytes())
    }

    /// Bytes written to the socket so far.
    pub fn bytes_written(&self) -> u64 {
        self.link.as_ref().map_or(0, |link| link.bytes_written.load(Ordering::Relaxed))
    }

    pub fn text<A>(&mut self, ctx: &mut ws::WebsocketContext<A>, text: bytestring::ByteString)
    where
        A: Actor<Context = ws::WebsocketContext<A>>,
    {
        if self.closed {
            return; // nothing may follow the close frame
        }
        let ping = self.count(text.len());
        ctx.text(text);
        if let Some(count) = ping {
            ctx.ping(&count);
        }
    }

    pub fn binary<A>(&mut self, ctx: &mut ws::WebsocketContext<A>, bytes: bytes::Bytes)
    where
        A: Actor<Context = ws::WebsocketContext<A>>,
    {
        if self.closed {
            return;
        }
        let ping = self.count(bytes.len());
        ctx.binary(bytes);
        if let Some(count) = ping {
            ctx.ping(&count);
        }
    }

    /// Bytes written that no pong has confirmed yet.
    pub fn unconfirmed(&self) -> u64 {
        let confirmed = self.link.as_ref().map_or(0, |link| link.bytes_confirmed.load(Ordering::Relaxed));
        self.bytes_written().saturating_sub(confirmed)
    }

    /// The client was heard from (any frame).
    pub fn heard(&self) {
        if let Some(link) = &self.link {
            link.last_heard_ms.store(monotonic_ms(), Ordering::Relaxed);
        }
    }

    /// The first step of every stream handler: note that the client was heard, ignore what
    /// follows our close frame (stopping at the client's answer to it), and turn protocol
    /// errors into the close they call for.
    pub fn receive<A>(&self, ctx: &mut ws::WebsocketContext<A>, msg: Result<ws::Message, ws::ProtocolError>) -> Inbound
    where
        A: Actor<Context = ws::WebsocketContext<A>>,
    {
        self.heard();
        if self.closed {
            // Waiting for the client's answer to our close frame; everything else is ignored.
            if matches!(msg, Ok(ws::Message::Close(_)) | Err(_)) {
                ctx.stop();
            }
            return Inbound::Nothing;
        }
        match msg {
            Ok(msg) => Inbound::Message(msg),
            Err(ws::ProtocolError::Overflow) => Inbound::Close(CloseCode::MessageTooBig, "frame larger than max_frame_bytes"),
            Err(ws::ProtocolError::Io(err)) => {
                // The connection is gone: no close frame can reach the client.
                tracing::debug!(session = %self.id, %err, "connection lost");
                ctx.stop();
                Inbound::Nothing
            }
            Err(err) => {
                tracing::debug!(session = %self.id, %err, "websocket protocol error");
                Inbound::Close(CloseCode::MessageTooBig, "websocket protocol error")
            }
        }
    }

    /// A pong: the count it echoes has been read.
    pub fn pong(&self, payload: &[u8]) {
        if let (Ok(count), Some(link)) = (<[u8; 8]>::try_from(payload), &self.link) {
            link.bytes_confirmed.fetch_max(u64::from_be_bytes(count).min(self.bytes_written()), Ordering::Relaxed);
        }
    }

    /// The session clock's deadline: the token's expiry plus leeway.
    pub fn set_token_deadline(&self, expires_at: u64) {
        if let Some(link) = &self.link {
            let void_at = expires_at.saturating_add(self.hub.config.jwt_leeway_secs).saturating_mul(1000);
            link.deadline_ms.store(void_at.max(1), Ordering::Relaxed);
        }
    }

    pub fn clear_deadline(&self) {
        if let Some(link) = &self.link {
            link.deadline_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Send the close frame (once). Returns whether it was sent now: the caller then lets go of
    /// what the session holds (its tenant subscription).
    pub fn close<A>(&mut self, ctx: &mut ws::WebsocketContext<A>, code: CloseCode, reason: &str) -> bool
    where
        A: Actor<Context = ws::WebsocketContext<A>>,
    {
        if self.closed {
            return false;
        }
        self.closed = true;
        self.hub.metrics.closed(code);
        tracing::debug!(session = %self.id, code = code.code(), reason, "closing session");
        ctx.close(Some(ws::CloseReason { code: ws::CloseCode::Other(code.code()), description: Some(reason.to_owned()) }));
        if self.hub.accepting() {
            // Keep the connection until the client answers the close frame. Dropping it now
            // would lose the close code for a client that is behind in reading: its pending
            // writes (pongs to pings it has yet to read) would make the connection reset
            // before it reads the frames sent so far and the close frame.
            ctx.run_later(CLOSE_REPLY_WAIT, |_, ctx| ctx.stop());
        } else {
            ctx.stop();
        }
        true
    }

    /// A heartbeat from the session clock: ping the client, or tell the caller to close
    /// (`false`) when it has been silent past `heartbeat_timeout_ms`.
    pub fn heartbeat<A>(&mut self, ctx: &mut ws::WebsocketContext<A>) -> bool
    where
        A: Actor<Context = ws::WebsocketContext<A>>,
    {
        if self.closed {
            return true;
        }
        let last_heard_ms = self.link.as_ref().map_or(0, |link| link.last_heard_ms.load(Ordering::Relaxed));
        if monotonic_ms().saturating_sub(last_heard_ms) > self.hub.config.heartbeat_timeout_ms {
            return false;
        }
        ctx.ping(&self.bytes_written().to_be_bytes());
        true
    }
}
