//! synchub wire protocol v1: the frames a device and the hub exchange over one WebSocket.
//!
//! The same serde model is used for JSON (text frames) and MessagePack with named fields
//! (binary frames); see [`codec`]. `README.md` beside this crate is the normative spec.
//!
//! Every request a client sends carries an `id` that the reply echoes; frames the hub pushes
//! on its own (deltas, catch-up pages, must-resync) carry none. Unknown fields are ignored;
//! an unknown `type` is answered with [`ErrorCode::UnknownType`].

pub mod capture;
pub mod codec;
mod error_codes;
pub mod filter;
pub mod spliced;
mod type_first;

pub use codec::{DecodeError, Encoding};
pub use error_codes::{CloseCode, ErrorCode};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Whether a string anywhere in `value` (object keys too) holds U+0000, which neither
/// Postgres `text` nor `jsonb` can store: such a value can be neither written nor matched.
pub fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}
use uuid::Uuid;

/// Protocol versions this crate speaks, newest last. The hub picks the highest one
/// that the client also offers in `hello.versions`.
pub const SUPPORTED_VERSIONS: &[u32] = &[1];

/// A JSON object: a row image, a primary key, or the fields a change writes.
pub type Object = Map<String, Value>;

/// Request id chosen by the client; replies echo it.
pub type RequestId = u64;

/// Where a device stands in its tenant's change stream: the last tenant seq it applied,
/// valid only within `epoch`. A new epoch means the log was reset and the device must resync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub epoch: String,
    pub seq: u64,
}

/// Hybrid logical clock of a change as the device stamped it. The device id completes it
/// (ties between equal clocks are broken by device id); the hub adds that from the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Hlc {
    /// Physical time in milliseconds since the Unix epoch.
    pub wall_ms: u64,
    /// Logical counter for events within the same millisecond.
    pub counter: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Insert the row or update the given fields of it.
    Upsert,
    /// Delete the row (it becomes a tombstone).
    Delete,
}

/// One change a device made offline or online.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// Globally unique id of this change (UUIDv7 recommended).
    pub change_id: Uuid,
    /// Per-device sequence number: 1 for the device's first change, +1 for each next one.
    pub device_seq: u64,
    pub table: String,
    pub op: Op,
    /// Primary-key columns and their values.
    #[serde(deserialize_with = "object_not_null")]
    pub key: Object,
    /// Columns written (upsert only; must be empty or absent for delete); absent is empty,
    /// `null` is malformed.
    #[serde(default, deserialize_with = "object_not_null")]
    pub fields: Object,
    pub hlc: Hlc,
    /// The row version (tenant seq of its last write) the device had seen when it made
    /// this change; 0 when it had never seen the row.
    #[serde(default)]
    pub base_version: u64,
}

/// A unit-only enum of client frames is read from its name alone. serde's derive would also
/// take a variant's index (`1` for the second), which MessagePack's reader offers for an
/// integer while JSON refuses one: both encodings must refuse it. Serialization stays derived
/// (`rename_all`); a test checks that it writes the names listed here.
macro_rules! names_only {
    ($ty:ident { $($name:literal => $variant:ident),+ $(,)? }) => {
        impl $ty {
            /// Every variant with its name on the wire.
            pub const NAMES: &'static [(&'static str, $ty)] = &[$(($name, $ty::$variant)),+];
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                deserializer.deserialize_str(ByName($ty::NAMES))
            }
        }
    };
}

/// Reads one of `names` from a string, and nothing else.
struct ByName<T: 'static>(&'static [(&'static str, T)]);

impl<'de, T: Copy> serde::de::Visitor<'de> for ByName<T> {
    type Value = T;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let names: Vec<String> = self.0.iter().map(|(name, _)| format!("`{name}`")).collect();
        write!(f, "one of {}", names.join(", "))
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<T, E> {
        match self.0.iter().find(|(name, _)| *name == text) {
            Some((_, value)) => Ok(*value),
            None => Err(E::invalid_value(serde::de::Unexpected::Str(text), &self)),
        }
    }
}

/// An object that must be one. `Map`'s own reader takes a unit as an empty map, which
/// MessagePack's `nil` is while JSON's `null` is refused: both encodings must refuse it.
fn object_not_null<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Object, D::Error> {
    struct ObjectOnly;
    impl<'de> serde::de::Visitor<'de> for ObjectOnly {
        type Value = Object;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Object, A::Error> {
            let mut object = Object::new();
            while let Some((key, value)) = map.next_entry::<String, Value>()? {
                object.insert(key, value);
            }
            Ok(object)
        }
    }
    deserializer.deserialize_map(ObjectOnly)
}

/// Frames a client sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// First frame on every socket: authenticate and say where the device stands.
    Hello {
        id: RequestId,
        /// Protocol versions the client speaks.
        versions: Vec<u32>,
        /// The JWT; may be left out (empty) when the upgrade request carried it.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        token: String,
        /// Device id; required when the token carries none, must match when it does.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device_id: Option<String>,
        /// Last position the device applied; absent on first start (catch up from 0).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        position: Option<Position>,
        /// `dashboard` opens a read-only session that receives only what it subscribes to.
        #[serde(default, skip_serializing_if = "SessionMode::is_device")]
        mode: SessionMode,
    },
    /// A batch of the device's changes, in `device_seq` order.
    Push {
        id: RequestId,
        batch_id: Uuid,
        changes: Vec<Change>,
    },
    /// Replace the session's token before it expires.
    Auth { id: RequestId, token: String },
    /// Restart catch-up from a position (after a snapshot taken on must-resync).
    Resume { id: RequestId, position: Position },
    /// Read one page of the current rows of a table, in primary-key order.
    Snapshot {
        id: RequestId,
        table: String,
        /// The `next_after` of the previous page; absent for the first page.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<Object>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// Application-level keepalive; answered with `pong`.
    Ping { id: RequestId },
    /// Subscribe to a table's rows that match a filter (optionally with a snapshot first), or
    /// to a channel (`conflicts`, `presence`). Exactly one of `table` and `channel`.
    Subscribe {
        id: RequestId,
        /// The client's name for the subscription, unique on the socket (1 to 64 characters).
        sub: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        table: Option<String>,
        /// Conditions that must all hold (table subscriptions only).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        filter: Vec<Condition>,
        /// Send the matching rows as `sub_rows` pages before the live `sub_delta`s.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        snapshot: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        channel: Option<Channel>,
    },
    Unsubscribe { id: RequestId, sub: String },
}

/// What a session is for: a device that syncs, or a read-only dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionMode {
    #[default]
    Device,
    Dashboard,
}

impl SessionMode {
    pub fn is_device(&self) -> bool {
        *self == SessionMode::Device
    }
}

/// Channels a session can subscribe to besides tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    /// Conflicts opened and resolved in the tenant (manager roles only).
    Conflicts,
    /// Which sessions of the tenant are online.
    Presence,
}

/// Comparison of a filter condition; see [`filter`] for the exact semantics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FilterOp {
    Eq,
    Neq,
    Lt,
    Lte,
    Gt,
    Gte,
    /// `value` is an array; the column equals one of its elements.
    In,
}

names_only!(Op { "upsert" => Upsert, "delete" => Delete });
names_only!(SessionMode { "device" => Device, "dashboard" => Dashboard });
names_only!(Channel { "conflicts" => Conflicts, "presence" => Presence });
names_only!(FilterOp { "eq" => Eq, "neq" => Neq, "lt" => Lt, "lte" => Lte, "gt" => Gt, "gte" => Gte, "in" => In });

/// One condition of a subscription filter: `row[column] <op> value`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    pub column: String,
    pub op: FilterOp,
    pub value: Value,
}

impl ClientFrame {
    pub fn request_id(&self) -> RequestId {
        match self {
            ClientFrame::Hello { id, .. }
            | ClientFrame::Push { id, .. }
            | ClientFrame::Auth { id, .. }
            | ClientFrame::Resume { id, .. }
            | ClientFrame::Snapshot { id, .. }
            | ClientFrame::Subscribe { id, .. }
            | ClientFrame::Unsubscribe { id, .. }
            | ClientFrame::Ping { id } => *id,
        }
    }
}

/// Limits the hub enforces on this session, announced in `welcome`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub max_frame_bytes: u64,
    pub max_batch_changes: u32,
    pub catch_up_page_changes: u32,
    pub snapshot_page_rows: u32,
    /// Pushes the session may have awaiting their acks; one more is refused `busy`. Absent
    /// (0) from a hub that does not announce it.
    #[serde(default)]
    pub session_pushes_in_flight: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeStatus {
    /// Committed; every field was written and nothing concurrent touched the row.
    Applied,
    /// Committed; the row had changed since `base_version` but on other fields only.
    Merged,
    /// Committed; at least one field was written concurrently by another device. The
    /// conflict was decided by the table's policy and recorded for review.
    Conflict,
    /// Not applied (see `reason`). For every reason but `seq_gap` this is final and the
    /// device's cursor advanced past the change; after `seq_gap` re-send from the cursor.
    Rejected,
    /// Already applied earlier (a re-sent change); not applied again.
    Duplicate,
}

/// The outcome of one change of a pushed batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeResult {
    pub change_id: Uuid,
    pub device_seq: u64,
    pub status: ChangeStatus,
    /// Tenant seq the change was committed at. Absent when rejected, when the change wrote
    /// nothing (every field lost, an update beaten by a delete, a delete of a missing row),
    /// or for a duplicate whose original is no longer in the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Fields whose incoming value lost (conflict status only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lost_fields: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<ErrorCode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The row as committed, for `merged` and `conflict` results: it differs from what the
    /// device wrote, and live deltas leave out the device's own changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row: Option<Object>,
}

/// One committed change of the tenant's log, as every subscriber sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    pub seq: u64,
    pub table: String,
    pub op: Op,
    pub key: Object,
    /// The full row after the change; absent for a delete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row: Option<Object>,
    /// Old values of the columns this change modified (the whole old row for a delete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<Object>,
    /// Device that made the change; absent for writes by other SQL clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_id: Option<Uuid>,
    /// On a delete: the row still exists but left what this reader sees (a subscription's
    /// filter, or the rows the reader's role may read); absent otherwise.
    #[serde(default, skip_serializing_if = "is_false")]
    pub left: bool,
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// A `catch_up` frame over borrowed deltas: encodes to the same bytes as
/// [`ServerFrame::CatchUp`], for a hub that serves pages from deltas it keeps without copying them.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename = "catch_up")]
pub struct CatchUpRef<'a> {
    pub deltas: Vec<&'a Delta>,
    pub seq: u64,
    pub head_seq: u64,
}

/// A current row and its version (the tenant seq of its last write), which the device
/// sends back as `base_version` when it changes the row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRow {
    pub row: Object,
    pub version: u64,
}

/// Frames the hub sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Welcome {
        id: RequestId,
        version: u32,
        session_id: Uuid,
        device_id: String,
        epoch: String,
        head_seq: u64,
        limits: Limits,
    },
    Ack {
        id: RequestId,
        batch_id: Uuid,
        results: Vec<ChangeResult>,
    },
    /// A page of the log after the device's position, sent after `welcome` or `resume`.
    CatchUp {
        deltas: Vec<Delta>,
        /// The last seq this page covers: the device's position once it has applied the page.
        seq: u64,
        /// The tenant's head when the page was read; more pages follow while `seq < head_seq`.
        head_seq: u64,
    },
    /// Catch-up is complete up to `seq`; live `delta` frames follow, starting at `seq + 1`.
    UpToDate { seq: u64 },
    /// Newly committed changes, pushed live in seq order. Covers the seqs after the previous
    /// frame's `seq` up to this `seq`; the receiving device's own changes are left out
    /// (it has their acks), so `deltas` may skip those seqs.
    Delta { deltas: Vec<Delta>, seq: u64 },
    /// The device's position cannot be resumed (other epoch, or older than the log keeps).
    /// Drop local state, page a snapshot of each table, then `resume` in `epoch` from the
    /// smallest `snapshot_page.seq` received.
    MustResync {
        epoch: String,
        head_seq: u64,
        reason: ErrorCode,
    },
    SnapshotPage {
        id: RequestId,
        table: String,
        rows: Vec<SnapshotRow>,
        /// Tenant seq the page was read at; resume from the smallest `seq` of all pages.
        seq: u64,
        epoch: String,
        /// Pass as `after` to read the next page; absent on the last page.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next_after: Option<Object>,
    },
    /// Reply to `auth`: the new token is in force until `expires_at` (Unix seconds).
    AuthOk { id: RequestId, expires_at: u64 },
    Pong { id: RequestId },
    /// Reply to `subscribe`: the subscription is in force. For a table, every matching change
    /// after `seq` follows in `sub_delta` frames (after the `sub_rows` pages of a snapshot).
    Subscribed { id: RequestId, sub: String, seq: u64 },
    /// A page of a subscription's snapshot, read at `seq`; `last` on the final page.
    SubRows { sub: String, rows: Vec<SnapshotRow>, seq: u64, last: bool },
    /// Changes matching a table subscription, in seq order, covering up to `seq`. A row that
    /// stops matching (or is deleted) comes with `op: "delete"` and its previous image in `old`.
    SubDelta { sub: String, deltas: Vec<Delta>, seq: u64 },
    /// Everyone online in the tenant (first after `subscribed`, and again after diffs were lost).
    Presence { sub: String, online: Vec<PresenceEntry> },
    /// Sessions that came online or went away since the previous presence frame.
    PresenceDiff { sub: String, joins: Vec<PresenceEntry>, leaves: Vec<PresenceEntry> },
    /// A conflict was opened (logged by a merge) or resolved; `open` counts the tenant's open ones.
    Conflict { sub: String, event: ConflictEvent, conflict: Box<ConflictRecord>, open: u64 },
    /// Reply to `unsubscribe`.
    Unsubscribed { id: RequestId, sub: String },
    /// An ephemeral message to every session of the tenant; never stored. `event` names what
    /// it is, when the sender said (a Supabase client's broadcast always does).
    Broadcast {
        channel: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        event: Option<String>,
        payload: Value,
    },
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
        code: ErrorCode,
        message: String,
        /// True when the same request may succeed if retried later.
        temporary: bool,
        /// With `rate_limited`: how long to wait before retrying, ms.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
}

/// One online session of the tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEntry {
    pub session_id: Uuid,
    pub device_id: String,
    pub user_id: String,
    pub role: String,
    pub mode: SessionMode,
    /// When the session came online, Unix milliseconds.
    pub since_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictEvent {
    Opened,
    Resolved,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReviewStatus {
    Open,
    Resolved,
    Dismissed,
}

/// One side of a conflict: the value, its clock and who wrote it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConflictSide {
    pub value: Value,
    pub hlc: Hlc,
    pub device: String,
    #[serde(default)]
    pub user: Option<String>,
    /// Row version of the stored value (server side only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

/// A logged conflict on one field, as the review API and the `conflicts` channel show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConflictRecord {
    pub id: i64,
    pub table: String,
    pub key: Object,
    pub field: String,
    pub status: ReviewStatus,
    /// `server` (the stored value stayed) or `incoming` (the pushed value was written).
    pub winner: String,
    /// `lww`, `client_wins` or `delete_wins`.
    pub policy: String,
    pub base_version: u64,
    /// Seq of the change that met the conflict, when it wrote anything.
    #[serde(default)]
    pub seq: Option<u64>,
    pub server: ConflictSide,
    pub incoming: ConflictSide,
    pub change_id: Uuid,
    pub batch_id: Uuid,
    /// RFC 3339.
    pub created_at: String,
    #[serde(default)]
    pub reviewed_by: Option<String>,
    #[serde(default)]
    pub reviewed_at: Option<String>,
    /// `keep`, `take_other` or `value`, once resolved.
    #[serde(default)]
    pub resolution: Option<String>,
    /// Seq of the change that wrote the resolution.
    #[serde(default)]
    pub resolution_seq: Option<u64>,
    /// The value the resolution wrote, once resolved with a write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_value: Option<Value>,
    /// The row's label (its table's `label_column`, from the row or, once deleted, its last
    /// values), in the conflict review API; absent where the table has none or in frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row_label: Option<String>,
}
