//! Errors of the HTTP API as JSON bodies `{"code": "<error code>", "message": "..."}` with the
//! HTTP status that fits the code; database and internal details are logged, never sent.

use std::fmt;

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use protocol::ErrorCode;
use serde_json::json;

use crate::error::Error;

/// A hub error on its way out of an HTTP handler.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        ApiError(err)
    }
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError(Error::client(code, message))
    }

    /// The wire code and the message a client may read (never the database's text), for an
    /// error reported inside an answer rather than as one; logged when it is not the client's.
    pub fn code_and_message(&self) -> (&'static str, String) {
        if !matches!(self.0, Error::Client { .. } | Error::RateLimited { .. }) {
            tracing::warn!(err = %self.0, "HTTP request failed in part");
        }
        (self.0.code().as_str(), self.0.public_message())
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The HTTP status of an error code.
pub fn status_of(code: ErrorCode) -> StatusCode {
    use ErrorCode::*;
    match code {
        InvalidToken | TokenExpired | NotAuthenticated => StatusCode::UNAUTHORIZED,
        Forbidden => StatusCode::FORBIDDEN,
        NotFound => StatusCode::NOT_FOUND,
        ConflictNotOpen | RowDeleted | StaleConflict => StatusCode::CONFLICT,
        BatchTooLarge | ValueTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        Busy | Unavailable | ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        Internal => StatusCode::INTERNAL_SERVER_ERROR,
        RateLimited => StatusCode::TOO_MANY_REQUESTS,
        MalformedFrame | UnknownType | UnsupportedVersion | AlreadyAuthenticated | InvalidBatch | UnknownTable | UnknownColumn
        | InvalidValue | InvalidKey | TenantMismatch | SeqGap | EpochMismatch | PositionTooOld | TooManySubscriptions
        | SnapshotTooLarge | UnknownSubscription | InvalidFilter | ChangeIdReused => StatusCode::BAD_REQUEST,
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        status_of(self.0.code())
    }

    fn error_response(&self) -> HttpResponse {
        let code = self.0.code();
        if !matches!(self.0, Error::Client { .. } | Error::RateLimited { .. }) {
            tracing::warn!(err = %self.0, "HTTP request failed");
        }
        let mut response = HttpResponse::build(self.status_code());
        match self.status_code() {
            StatusCode::UNAUTHORIZED => {
                response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                response.insert_header((header::RETRY_AFTER, "1"));
            }
            StatusCode::TOO_MANY_REQUESTS => {
                // Whole seconds, rounded up: a client that waits that long finds a token.
                let wait = self.0.retry_after().unwrap_or_default();
                response.insert_header((header::RETRY_AFTER, wait.as_secs_f64().ceil().max(1.0).to_string()));
            }
            _ => {}
        }
        let mut body = json!({"code": code.as_str(), "message": self.0.public_message()});
        if let Some(wait) = self.0.retry_after() {
            body["retry_after_ms"] = json!(crate::error::retry_after_ms(wait));
        }
        response.json(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::body::MessageBody;

    #[test]
    fn statuses_and_body() {
        assert_eq!(status_of(ErrorCode::TokenExpired), StatusCode::UNAUTHORIZED);
        assert_eq!(status_of(ErrorCode::ConflictNotOpen), StatusCode::CONFLICT);
        assert_eq!(status_of(ErrorCode::Busy), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(status_of(ErrorCode::InvalidBatch), StatusCode::BAD_REQUEST);
        let response = ApiError::new(ErrorCode::NotFound, "no conflict 7").error_response();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let body = response.into_body().try_into_bytes().unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body, json!({"code": "not_found", "message": "no conflict 7"}));
        // Database details stay in the log.
        let response = ApiError(Error::Database(sqlx::Error::Protocol("secret detail".into()))).error_response();
        let body = response.into_body().try_into_bytes().unwrap();
        assert!(!String::from_utf8_lossy(&body).contains("secret detail"));
    }
}
