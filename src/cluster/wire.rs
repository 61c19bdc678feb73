//! What nodes tell each other about a tenant over NATS, and its encoding (MessagePack with
//! field names, so that a node of the next version can add a field that this one ignores).
//! Pure: no I/O.

use std::borrow::Cow;

use protocol::{ConflictEvent, ConflictRecord, Delta, ErrorCode, PresenceEntry};
use serde::{Deserialize, Serialize};

use crate::ids::{NodeId, Seq, SessionId};

/// Wire version of [`Envelope`]; a node drops messages of another version (and fills what it
/// missed from Postgres, as for any lost message).
pub const WIRE_VERSION: u8 = 1;

/// One message on a tenant's subject or on the nodes' subject, with the node that sent it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<'a> {
    pub version: u8,
    pub node: String,
    pub body: Body<'a>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Body<'a> {
    /// Committed log entries `first..=last`, in seq order, as the committing node fanned them
    /// out; `deltas` is absent when they did not fit in one NATS message (receivers read them
    /// from Postgres). `committed_ms`: the commit's wall clock, for the cross-node lag.
    /// (Borrowed when sent: the committing node encodes its group's deltas without a copy.)
    Deltas { first: Seq, last: Seq, committed_ms: u64, deltas: Option<Cow<'a, [Delta]>> },
    /// Sessions of the sending node that joined or left the tenant.
    Presence { joins: Vec<RemoteSession>, leaves: Vec<SessionId> },
    /// Every session of the sending node for the tenant, and what they tracked on topics:
    /// replaces what receivers knew of that node.
    PresenceSnapshot { sessions: Vec<RemoteSession>, tracked: Vec<RemoteTrack> },
    /// A node that started serving the tenant asks the others for their snapshots.
    PresenceAsk,
    /// A session of the sending node tracked (or, with `meta: None`, untracked) itself on a
    /// topic's presence.
    Track(RemoteTrack),
    /// A broadcast on a channel of the tenant. `payload` is JSON text.
    Broadcast { channel: String, event: Option<String>, payload: String, private: bool, from: Option<SessionId> },
    /// Conflicts opened or resolved, and the tenant's open count after them.
    Conflicts { events: Vec<(ConflictEvent, ConflictRecord)>, open: u64 },
    /// On the session-control subject, as a request: the node holding `session` refreshes
    /// its token with `token` (sent by a client over HTTP to another node), by the same rules
    /// as if it came to it, and answers [`Body::Refreshed`]; the other nodes stay silent.
    RefreshToken { session: SessionId, token: String },
    /// The answer: the new expiry (Unix seconds), or the error code and message for the client.
    Refreshed { expires_at: Option<u64>, code: Option<ErrorCode>, message: String },
    /// On the nodes' subject: the sender is alive.
    Heartbeat,
    /// On the nodes' subject: the sender is stopping; its sessions are gone or going.
    Leaving,
}

/// A session of another node, as presence lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoteSession {
    pub entry: PresenceEntry,
    /// The device keeps one live session: a newer one on any node replaces it.
    pub exclusive: bool,
}

/// A remote session's presence on a topic (Supabase Realtime's `track`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoteTrack {
    pub session: SessionId,
    pub topic: String,
    pub private: bool,
    pub key: String,
    /// The tracked meta as JSON text; `None` untracks.
    pub meta: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("cluster message does not decode: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    #[error("cluster message of wire version {0}, this node speaks {WIRE_VERSION}")]
    Version(u8),
}

impl<'a> Envelope<'a> {
    pub fn new(node: &NodeId, body: Body<'a>) -> Envelope<'a> {
        Envelope { version: WIRE_VERSION, node: node.to_string(), body }
    }

    pub fn encode(&self) -> Vec<u8> {
        // unwrap-free: every field serializes (no maps with non-string keys, no NaN checks).
        rmp_serde::to_vec_named(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Envelope<'static>, WireError> {
        let envelope: Envelope<'static> = rmp_serde::from_slice(bytes)?;
        if envelope.version != WIRE_VERSION {
            return Err(WireError::Version(envelope.version));
        }
        Ok(envelope)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{Op, SessionMode};
    use serde_json::json;

    fn delta(seq: Seq) -> Delta {
        Delta {
            seq,
            table: "products".into(),
            op: Op::Upsert,
            key: json!({"id": seq}).as_object().unwrap().clone(),
            row: Some(json!({"id": seq, "name": "Flat white", "price_cents": 350, "tags": ["a", 1.5, null]}).as_object().unwrap().clone()),
            old: None,
            origin: Some("pos-1".into()),
            change_id: Some(uuid::Uuid::new_v4()),
            left: false,
        }
    }

    #[test]
    fn deltas_round_trip_with_their_values() {
        let node = NodeId::new("node-1");
        let sent = Envelope::new(&node, Body::Deltas { first: 7, last: 8, committed_ms: 1_700_000_000_000, deltas: Some(Cow::Owned(vec![delta(7), delta(8)])) });
        let got = Envelope::decode(&sent.encode()).unwrap();
        assert_eq!(got, sent);
    }

    #[test]
    fn presence_and_broadcasts_round_trip() {
        let node = NodeId::new("n");
        let entry = PresenceEntry {
            session_id: uuid::Uuid::new_v4(),
            device_id: "pos-1".into(),
            user_id: "u".into(),
            role: "cashier".into(),
            mode: SessionMode::Device,
            since_ms: 5,
        };
        let track = RemoteTrack { session: entry.session_id, topic: "room".into(), private: false, key: "k".into(), meta: Some("{\"a\":1}".into()) };
        for body in [
            Body::Presence { joins: vec![RemoteSession { entry: entry.clone(), exclusive: true }], leaves: vec![uuid::Uuid::new_v4()] },
            Body::PresenceSnapshot { sessions: vec![RemoteSession { entry, exclusive: false }], tracked: vec![track.clone()] },
            Body::PresenceAsk,
            Body::Track(track),
            Body::Broadcast { channel: "c".into(), event: None, payload: "{\"x\":[1,2]}".into(), private: true, from: None },
            Body::RefreshToken { session: uuid::Uuid::new_v4(), token: "t".into() },
            Body::Refreshed { expires_at: None, code: Some(ErrorCode::TenantMismatch), message: "no".into() },
            Body::Heartbeat,
            Body::Leaving,
        ] {
            let sent = Envelope::new(&node, body);
            assert_eq!(Envelope::decode(&sent.encode()).unwrap(), sent);
        }
    }

    #[test]
    fn another_version_or_garbage_is_refused() {
        let mut envelope = Envelope::new(&NodeId::new("n"), Body::Heartbeat);
        envelope.version = WIRE_VERSION + 1;
        assert!(matches!(Envelope::decode(&envelope.encode()), Err(WireError::Version(_))));
        assert!(matches!(Envelope::decode(b"\xc1not msgpack"), Err(WireError::Decode(_))));
    }
}
