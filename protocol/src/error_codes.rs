//! Stable error and close codes of protocol v1. Their spellings and numbers never change;
//! new ones may be added, so clients must treat an unknown code as a generic error.

use serde::{Deserialize, Serialize};

/// Reason codes carried by `error` frames and by rejected changes in an `ack`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not valid JSON / MessagePack, or lacks a required field.
    MalformedFrame,
    /// The frame's `type` is not one this protocol version knows.
    UnknownType,
    /// None of the client's protocol versions is spoken by the hub.
    UnsupportedVersion,
    /// A request other than `hello` arrived before `hello` succeeded.
    NotAuthenticated,
    /// A second `hello` on the same socket.
    AlreadyAuthenticated,
    /// The token's signature, issuer, audience or claims are not acceptable.
    InvalidToken,
    /// The token has expired (or is not valid yet).
    TokenExpired,
    /// The token's identity may not do this.
    Forbidden,
    /// The batch has more changes than `limits.max_batch_changes`.
    BatchTooLarge,
    /// The batch is empty, or a request came at the wrong time (e.g. `resume` while live).
    InvalidBatch,
    /// The table is not registered for sync.
    UnknownTable,
    /// The change names a column the table does not have.
    UnknownColumn,
    /// A value does not fit its column's type or a constraint of the table.
    InvalidValue,
    /// The change lacks a primary-key column, or writes one in `fields`.
    InvalidKey,
    /// The change carries a tenant value that differs from the token's tenant.
    TenantMismatch,
    /// The change's `device_seq` skips numbers after the device's last accepted one.
    SeqGap,
    /// The row was deleted; re-creating it needs a new key.
    RowDeleted,
    /// A field or row exceeds the hub's size limit.
    ValueTooLarge,
    /// The position is from another epoch.
    EpochMismatch,
    /// The position is older than the log keeps.
    PositionTooOld,
    /// The hub is saturated; retry the same batch later.
    Busy,
    /// A storage error; retry the same batch later.
    Unavailable,
    /// The hub is shutting down; reconnect.
    ShuttingDown,
    /// An unexpected error inside the hub.
    Internal,
    /// The socket already holds `max_subscriptions_per_session` subscriptions.
    TooManySubscriptions,
    /// More rows match than a subscription snapshot may hold; narrow the filter.
    SnapshotTooLarge,
    /// No subscription of that name on this socket.
    UnknownSubscription,
    /// A filter names an unknown column, or `in` without an array (a filter whose `op` is not
    /// one of the operators does not decode: `malformed_frame`).
    InvalidFilter,
    /// The requested object does not exist (HTTP API).
    NotFound,
    /// The conflict was already resolved or dismissed (HTTP API).
    ConflictNotOpen,
    /// The conflict's field no longer holds the value the resolution was based on: it changed
    /// since the conflict, or since the value the reviewer saw (`expected`). Nothing was
    /// written; look at the current value and decide again (HTTP API).
    StaleConflict,
    /// The change's `change_id` belongs to another change: an earlier one of the same batch
    /// or group, or one the hub already committed under another device or device_seq.
    ChangeIdReused,
    /// A rate limit: too many pushes, sessions, subscriptions or API requests; retry after the
    /// error's `retry_after_ms`.
    RateLimited,
}

impl ErrorCode {
    /// Whether the same request can succeed if retried later unchanged.
    pub fn is_temporary(self) -> bool {
        matches!(self, ErrorCode::Busy | ErrorCode::Unavailable | ErrorCode::ShuttingDown | ErrorCode::Internal | ErrorCode::RateLimited)
    }

    /// The code as it is spelled on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedFrame => "malformed_frame",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::NotAuthenticated => "not_authenticated",
            ErrorCode::AlreadyAuthenticated => "already_authenticated",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::BatchTooLarge => "batch_too_large",
            ErrorCode::InvalidBatch => "invalid_batch",
            ErrorCode::UnknownTable => "unknown_table",
            ErrorCode::UnknownColumn => "unknown_column",
            ErrorCode::InvalidValue => "invalid_value",
            ErrorCode::InvalidKey => "invalid_key",
            ErrorCode::TenantMismatch => "tenant_mismatch",
            ErrorCode::SeqGap => "seq_gap",
            ErrorCode::RowDeleted => "row_deleted",
            ErrorCode::ValueTooLarge => "value_too_large",
            ErrorCode::EpochMismatch => "epoch_mismatch",
            ErrorCode::PositionTooOld => "position_too_old",
            ErrorCode::Busy => "busy",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::SnapshotTooLarge => "snapshot_too_large",
            ErrorCode::UnknownSubscription => "unknown_subscription",
            ErrorCode::InvalidFilter => "invalid_filter",
            ErrorCode::NotFound => "not_found",
            ErrorCode::ConflictNotOpen => "conflict_not_open",
            ErrorCode::StaleConflict => "stale_conflict",
            ErrorCode::ChangeIdReused => "change_id_reused",
            ErrorCode::RateLimited => "rate_limited",
        }
    }
}

/// WebSocket close codes the hub uses. 1000–1011 are RFC 6455's; 4000–4999 are ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CloseCode {
    /// The hub is shutting down or restarting: reconnect with backoff and resume.
    GoingAway = 1001,
    /// WebSocket framing the hub cannot accept: reserved bits set, an unmasked frame, an
    /// unknown opcode, fragments out of order, a bad control or close frame (RFC 6455 §7.4.1).
    ProtocolError = 1002,
    /// A text frame (or a close reason) that is not UTF-8.
    InvalidPayload = 1007,
    /// A frame larger than `max_frame_bytes`.
    MessageTooBig = 1009,
    /// `hello` did not arrive in time after the socket opened.
    HelloTimeout = 4000,
    /// `hello` failed: bad token, or no usable device id.
    Unauthorized = 4001,
    /// The session's token expired and no fresh one was sent with `auth`.
    TokenExpired = 4002,
    /// No protocol version in common.
    UnsupportedVersion = 4003,
    /// The client fell too far behind reading; reconnect and resume from the last seq.
    SlowConsumer = 4008,
    /// The tenant opened sessions faster than `tenant_connect_rate`: reconnect after the
    /// error frame's `retry_after_ms`.
    RateLimited = 4029,
    /// Too many bad frames on this socket.
    TooManyErrors = 4009,
    /// The same device opened another session; this one is replaced.
    Replaced = 4010,
    /// No frame or pong from the client within the heartbeat timeout.
    HeartbeatTimeout = 4011,
}

impl CloseCode {
    pub fn code(self) -> u16 {
        self as u16
    }

    pub fn from_code(code: u16) -> Option<CloseCode> {
        use CloseCode::*;
        [GoingAway, ProtocolError, InvalidPayload, MessageTooBig, HelloTimeout, Unauthorized, TokenExpired, UnsupportedVersion, SlowConsumer, RateLimited, TooManyErrors, Replaced, HeartbeatTimeout]
            .into_iter()
            .find(|c| c.code() == code)
    }
}
