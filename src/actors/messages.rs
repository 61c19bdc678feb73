//! Messages between actors (named fields, not wire types). Delivery to sessions always uses
//! `try_send` on bounded mailboxes; a full mailbox makes the session catch up from the log.

use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

use actix::prelude::*;
use bytes::Bytes;
use bytestring::ByteString;
use protocol::{ChangeResult, Channel, ConflictEvent, ConflictRecord, Delta, Encoding, PresenceEntry, ServerFrame, SessionMode};

use super::sweep::SessionHandle;
use crate::error::Result;
use crate::ids::{DeviceId, Seq, SessionId, UserId};
use crate::storage::apply::BatchInput;

/// A device's batch for its tenant actor. The reply comes as soon as the batch is queued (or
/// refused `busy`), and carries the receiver of its results, which are sent after commit.
#[derive(Message)]
#[rtype(result = "Result<tokio::sync::oneshot::Receiver<Result<Vec<ChangeResult>>>>")]
pub struct ApplyBatch {
    pub input: BatchInput,
}

/// A session asks for the tenant's live stream. The answer is the tenant's head as the actor
/// knows it: its epoch and log floor as of its start, and the last seq it fanned out, after
/// which the session's live frames begin.
#[derive(Message)]
#[rtype(result = "crate::storage::log::TenantHead")]
pub struct Subscribe {
    pub session: SessionId,
    pub device: DeviceId,
    /// Who the session is, as presence shows it.
    pub user: UserId,
    pub role: Arc<str>,
    pub mode: SessionMode,
    /// When the session came online, Unix ms.
    pub since_ms: u64,
    /// Where the session is reached (live frames, control, notices).
    pub link: Arc<SessionHandle>,
    /// A newer exclusive session of the same device replaces this one (native sessions). An
    /// RxDB app opens one socket per collection, all with the same device: those coexist.
    pub exclusive: bool,
}

/// A session starts or stops watching a channel (presence, conflicts) of its tenant.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Watch {
    pub session: SessionId,
    pub channel: Channel,
    pub on: bool,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Unsubscribe {
    pub session: SessionId,
}

/// Who is online in the tenant now, as presence lists them (for the operations view).
#[derive(Message)]
#[rtype(result = "Arc<Vec<PresenceEntry>>")]
pub struct Online;

/// A session asks its tenant actor for log entries after `after` from memory; `None` when
/// they are not all there (the session then reads Postgres). Answers with the shared frames
/// that hold the next `limit` entries (the first may also hold entries up to `after`, the last
/// more than the page takes: no delta is copied) and the last seq the actor has fanned out.
#[derive(Message)]
#[rtype(result = "Option<(Vec<Arc<SharedFrame>>, Seq)>")]
pub struct RecentLog {
    pub after: Seq,
    pub limit: u32,
}

/// An ephemeral message on a channel of the tenant (never stored): native sessions get every
/// public one, sessions that joined the channel as a topic get it as the topic's broadcast.
/// Answers how many sessions it was handed to.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Broadcast {
    pub channel: String,
    /// What the message is, as the sender named it (Supabase clients always do).
    pub event: Option<String>,
    pub payload: serde_json::Value,
    /// A private topic's message reaches only sessions that joined it as private.
    pub private: bool,
    /// The sending session, left out unless it asked for its own broadcasts.
    pub from: Option<SessionId>,
}

/// A channel of the tenant that sessions join by name (Supabase Realtime's channels). A private
/// and a public channel of the same name are two topics.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Topic {
    pub name: Arc<str>,
    pub private: bool,
}

/// A session joins a topic: it receives the topic's broadcasts (its own too when
/// `receive_own`) and, with `presence`, the topic's presence state and then its diffs.
#[derive(Message)]
#[rtype(result = "()")]
pub struct JoinTopic {
    pub session: SessionId,
    pub topic: Topic,
    pub receive_own: bool,
    pub presence: bool,
}

/// A session leaves a topic; what it tracked there leaves with it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LeaveTopic {
    pub session: SessionId,
    pub topic: Topic,
}

/// A session shows itself on a topic's presence under `key` with `meta` (replacing what it
/// tracked there before), or, with `meta: None`, stops showing itself.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Track {
    pub session: SessionId,
    pub topic: Topic,
    pub key: Arc<str>,
    pub meta: Option<serde_json::Map<String, serde_json::Value>>,
}

/// An event of a topic for the sessions that joined it, with its payload rendered once.
pub struct TopicEvent {
    pub topic: Topic,
    pub kind: TopicEventKind,
    /// A session that must not receive it (a sender that did not ask for its own broadcasts).
    pub skip: Option<SessionId>,
}

pub enum TopicEventKind {
    /// `event` and its JSON payload (as the sender gave it).
    Broadcast { event: Arc<str>, payload: Arc<str> },
    /// The whole presence of the topic, `{key: {metas: [...]}}` as JSON.
    PresenceState(Arc<str>),
    /// `{joins: {...}, leaves: {...}}` as JSON.
    PresenceDiff(Arc<str>),
}

/// Tenant-wide events for sessions, besides the change stream.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub enum Notice {
    /// The same frame for everyone, encoded once per encoding.
    Broadcast(Arc<SharedServerFrame>),
    /// Everyone online (to a session that starts watching presence, or missed diffs).
    PresenceList(Arc<Vec<PresenceEntry>>),
    PresenceDiff { joins: Arc<Vec<PresenceEntry>>, leaves: Arc<Vec<PresenceEntry>> },
    /// Conflicts opened or resolved by one commit, and the tenant's open count after it.
    Conflicts(Arc<ConflictNews>),
    /// An event of a topic the session joined.
    Topic(Arc<TopicEvent>),
}

pub struct ConflictNews {
    pub events: Vec<(ConflictEvent, ConflictRecord)>,
    pub open: u64,
}

/// A hub frame that many sessions send unchanged, encoded at most once per encoding.
pub struct SharedServerFrame {
    pub frame: ServerFrame,
    json: OnceLock<Encoded>,
    msgpack: OnceLock<Encoded>,
}

impl SharedServerFrame {
    pub fn new(frame: ServerFrame) -> SharedServerFrame {
        SharedServerFrame { frame, json: OnceLock::new(), msgpack: OnceLock::new() }
    }

    pub fn encoded(&self, encoding: Encoding) -> Encoded {
        let cell = match encoding {
            Encoding::Json => &self.json,
            Encoding::MsgPack => &self.msgpack,
        };
        cell.get_or_init(|| Encoded::of(encoding, &self.frame)).clone()
    }
}

/// Conflicts reviewed outside a commit (a dismissal), for the sessions watching them.
#[derive(Message)]
#[rtype(result = "()")]
pub struct TellConflicts(pub ConflictNews);

/// News of the cluster as a whole (cluster mode): a resync, a node that joined or went.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ClusterNews(pub crate::cluster::ClusterEvent);

/// Rows were written to the tenant's log by someone else (another SQL client).
#[derive(Message)]
#[rtype(result = "()")]
pub struct LogAppended;

/// A fresh token for an authenticated session, sent over HTTP instead of in an `auth` frame:
/// the session answers with the new expiry, or why the token may not replace its own.
#[derive(Message)]
#[rtype(result = "Result<u64>")]
pub struct RefreshToken(pub crate::auth::Identity);

/// What a refresh over HTTP is told when the session is not one its token may refresh: not
/// open, not welcomed yet, or of another tenant. The caller knows only the session's id, and
/// learns nothing from it about sessions that are not its own.
pub const NO_SUCH_SESSION: &str = "no open session with this id on this hub";

/// Orders from the hub to a session.
#[derive(Message, Debug, Clone, Copy, PartialEq, Eq)]
#[rtype(result = "()")]
pub enum SessionControl {
    /// The same device opened a newer session.
    Replaced,
    /// Frames for this session were dropped (mailbox full): catch up from the log.
    Lagged,
    /// The hub is shutting down.
    Shutdown,
    /// From the session clock: ping the client, or close if it has been silent too long.
    Heartbeat,
    /// From the session clock: the session's deadline passed (its hello's before `hello`, its
    /// token's expiry plus leeway after).
    Deadline,
}

/// One commit's deltas as consecutive frames, shared by every receiver of the tenant.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct LiveFrame(pub Arc<Vec<Arc<SharedFrame>>>);

/// One `delta` frame covering seqs `(after, seq]`, encoded at most once per encoding however
/// many sessions receive it. A commit is cut into frames at every change of origin, so the
/// origin device can skip its own frame (it has the acks) while everyone shares the others.
/// Catch-up pages copy their deltas' bytes out of the same encoding ([`SharedFrame::run`]).
pub struct SharedFrame {
    pub after: Seq,
    pub seq: Seq,
    /// The device every delta of this frame came from; `None` for other SQL writers.
    pub origin: Option<String>,
    pub deltas: Vec<Delta>,
    /// When the hub published the frame, Unix ms (Supabase's `commit_timestamp`).
    published_ms: u64,
    json: OnceLock<(ByteString, Vec<Range<usize>>)>,
    msgpack: OnceLock<(Bytes, Vec<Range<usize>>)>,
    /// Renderings for other wire protocols (e.g. an RxDB collection's documents), by the
    /// adapter's key, made once however many of the tenant's sessions send them.
    adapted: Mutex<Vec<(Box<str>, Option<Arc<str>>)>>,
}

/// Bytes of a frame, ready for a text or binary WebSocket message.
#[derive(Clone)]
pub enum Encoded {
    Text(ByteString),
    Binary(Bytes),
}

impl Encoded {
    pub fn len(&self) -> usize {
        match self {
            Encoded::Text(s) => s.len(),
            Encoded::Binary(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn of(encoding: Encoding, frame: &ServerFrame) -> Encoded {
        Encoded::of_value(encoding, frame)
    }

    /// Any value serialized as frames are (e.g. a borrowed `catch_up` page).
    pub fn of_value<T: serde::Serialize>(encoding: Encoding, value: &T) -> Encoded {
        Encoded::from_bytes(encoding, protocol::codec::encode(encoding, value))
    }

    /// A frame already encoded in `encoding`.
    pub fn from_bytes(encoding: Encoding, bytes: Vec<u8>) -> Encoded {
        match encoding {
            // unwrap: serde_json produces UTF-8.
            Encoding::Json => Encoded::Text(ByteString::try_from(Bytes::from(bytes)).expect("JSON is UTF-8")),
            Encoding::MsgPack => Encoded::Binary(Bytes::from(bytes)),
        }
    }
}

impl SharedFrame {
    /// Cut `deltas` (consecutive seqs after `after`) into frames, one per run of one origin.
    pub fn split_by_origin(mut after: Seq, deltas: Vec<Delta>) -> Vec<Arc<SharedFrame>> {
        let mut frames = Vec::new();
        let mut run: Vec<Delta> = Vec::new();
        for delta in deltas {
            if run.last().is_some_and(|last| last.origin != delta.origin) {
                let frame = SharedFrame::new(after, std::mem::take(&mut run));
                after = frame.seq;
                frames.push(Arc::new(frame));
            }
            run.push(delta);
        }
        if !run.is_empty() {
            frames.push(Arc::new(SharedFrame::new(after, run)));
        }
        frames
    }

    fn new(after: Seq, deltas: Vec<Delta>) -> SharedFrame {
        let seq = deltas.last().map_or(after, |d| d.seq);
        let origin = deltas.first().and_then(|d| d.origin.clone());
        let published_ms = super::sweep::unix_ms();
        SharedFrame { after, seq, origin, deltas, published_ms, json: OnceLock::new(), msgpack: OnceLock::new(), adapted: Mutex::new(Vec::new()) }
    }

    pub fn published_ms(&self) -> u64 {
        self.published_ms
    }

    /// The frame as an adapter renders it under `key`, rendered on first use (`None`: the
    /// rendering is empty, e.g. no change of the adapter's collection).
    pub fn rendered(&self, key: &str, render: impl FnOnce() -> Option<String>) -> Option<Arc<str>> {
        // unwrap: the lock is never held across a panic-prone section.
        let mut adapted = self.adapted.lock().expect("frame renderings");
        if let Some((_, text)) = adapted.iter().find(|(k, _)| &**k == key) {
            return text.clone();
        }
        let text: Option<Arc<str>> = render().map(Arc::from);
        adapted.push((key.into(), text.clone()));
        text
    }

    fn encode(&self, encoding: Encoding) -> (Bytes, Vec<Range<usize>>) {
        let frame = protocol::spliced::delta_frame(encoding, &self.deltas, self.seq);
        (Bytes::from(frame.bytes), frame.deltas)
    }

    /// Let go of the renderings for other protocols: kept only while the frame is fresh (its
    /// live delivery), they would otherwise stay with every frame kept for catch-up, one per
    /// set of Supabase bindings or RxDB collection. A late reader renders again.
    pub fn forget_renderings(&self) {
        // unwrap: the lock is never held across a panic-prone section.
        let mut adapted = self.adapted.lock().expect("frame renderings");
        *adapted = Vec::new();
    }

    /// The JSON frame and where each delta lies in it, encoded on first use.
    fn json(&self) -> &(ByteString, Vec<Range<usize>>) {
        self.json.get_or_init(|| {
            let (bytes, ranges) = self.encode(Encoding::Json);
            // unwrap: serde_json produces UTF-8.
            (ByteString::try_from(bytes).expect("JSON is UTF-8"), ranges)
        })
    }

    /// The MessagePack frame and where each delta lies in it, encoded on first use.
    fn msgpack(&self) -> &(Bytes, Vec<Range<usize>>) {
        self.msgpack.get_or_init(|| self.encode(Encoding::MsgPack))
    }

    pub fn encoded(&self, encoding: Encoding) -> Encoded {
        match encoding {
            Encoding::Json => Encoded::Text(self.json().0.clone()),
            Encoding::MsgPack => Encoded::Binary(self.msgpack().0.clone()),
        }
    }

    /// The encoded bytes of this frame's deltas with seqs in `(after, upto]` (one run for
    /// `protocol::spliced::catch_up_page`, shared, not copied), and how many they are.
    pub fn run(&self, encoding: Encoding, after: Seq, upto: Seq) -> (Bytes, usize) {
        let from = self.deltas.partition_point(|d| d.seq <= after);
        let to = self.deltas.partition_point(|d| d.seq <= upto).max(from);
        let (bytes, ranges): (&Bytes, &[Range<usize>]) = match encoding {
            Encoding::Json => {
                let (text, ranges) = self.json();
                (text.as_bytes(), ranges)
            }
            Encoding::MsgPack => {
                let (bytes, ranges) = self.msgpack();
                (bytes, ranges)
            }
        };
        (bytes.slice(protocol::spliced::run_of(ranges, from, to)), to - from)
    }
}
