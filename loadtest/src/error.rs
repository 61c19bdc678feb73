//! Errors of a load-test run: the hub could not be reached, refused us, or broke the protocol.

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot connect to {url}: {source}")]
    Connect { url: String, source: tokio_tungstenite::tungstenite::Error },
    #[error("socket error: {0}")]
    Socket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("the hub closed the socket ({code}: {reason})")]
    Closed { code: u16, reason: String },
    #[error("unexpected frame from the hub: {0}")]
    Protocol(String),
    #[error("the hub answered with error {code}: {message}")]
    Refused { code: String, message: String },
    #[error("no answer from the hub within {0:?} ({1})")]
    Timeout(std::time::Duration, &'static str),
    #[error("a load-generator worker process failed: {0}")]
    Worker(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    Usage(String),
}

pub type Result<T> = std::result::Result<T, LoadError>;
