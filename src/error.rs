//! The hub's error type and its mapping onto stable wire codes. Database text is logged,
//! never sent to clients.

use protocol::ErrorCode;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{message}")]
    Client { code: ErrorCode, message: String },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("configuration: {0}")]
    Config(String),
    /// The database did not answer within the deadline of this wait (the connection is given
    /// up; the outcome of a commit under way is unknown).
    #[error("the database did not answer within {0:?}")]
    StorageTimeout(std::time::Duration),
    #[error("the hub is saturated")]
    Busy,
    /// A rate limit (see `limits`): the same request may go through after `retry_after`.
    #[error("too many {what}; retry in {} ms", retry_after_ms(*.retry_after))]
    RateLimited { what: &'static str, retry_after: std::time::Duration },
    #[error("the hub is shutting down")]
    ShuttingDown,
    /// A bug or corrupt state inside the hub; the details are logged, not sent.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn client(code: ErrorCode, message: impl Into<String>) -> Self {
        Error::Client { code, message: message.into() }
    }

    /// The code a client sees for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Client { code, .. } => *code,
            // No connection within the acquire timeout (PoolTimedOut) is an outage too: group
            // commits and session reads queue for their shares of the pool before they ask it,
            // so the hub's own load waits there, and a pool that still gives nothing means a
            // database that does not answer (down, frozen, out of connections).
            Error::Database(_) | Error::Migrate(_) | Error::StorageTimeout(_) => ErrorCode::Unavailable,
            Error::Config(_) | Error::Internal(_) => ErrorCode::Internal,
            Error::Busy => ErrorCode::Busy,
            Error::RateLimited { .. } => ErrorCode::RateLimited,
            Error::ShuttingDown => ErrorCode::ShuttingDown,
        }
    }

    /// How long the client should wait before trying again, when the error says.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Error::RateLimited { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// The message a client sees: never database internals.
    pub fn public_message(&self) -> String {
        match self {
            Error::Client { message, .. } => message.clone(),
            Error::Database(_) | Error::Migrate(_) | Error::StorageTimeout(_) => "storage is unavailable; retry later".into(),
            Error::Internal(_) => "internal error".into(),
            other => other.to_string(),
        }
    }
}

/// A wait in whole milliseconds, rounded up (never 0: "retry in 0 ms" would invite a retry
/// that is refused again).
pub fn retry_after_ms(wait: std::time::Duration) -> u64 {
    (wait.as_micros().div_ceil(1000) as u64).max(1)
}
