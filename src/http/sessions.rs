//! Token refresh over HTTP for an open WebSocket session (`POST /v1/sessions/{id}/token`, the
//! fresh token as the bearer): the same rules as an `auth` frame, with nothing read or written
//! on the socket, so an idle session's buffers keep the size of its small frames.

use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use protocol::ErrorCode;
use serde_json::json;
use uuid::Uuid;

use super::auth::bearer;
use super::error::ApiError;
use crate::actors::messages::{RefreshToken, NO_SUCH_SESSION};
use crate::error::Error;
use crate::server::Hub;

/// How long a refresh waits for the session to take it (its mailbox may be full of frames).
const REFRESH_WAIT: Duration = Duration::from_secs(5);

/// `POST /v1/sessions/{id}/token`: `{"expires_at": <Unix seconds>}`.
pub async fn refresh_token(req: HttpRequest, hub: web::Data<Arc<Hub>>, session: web::Path<Uuid>) -> Result<HttpResponse, ApiError> {
    let identity = hub.verifier.verify(bearer(&req)?)?;
    hub.limits.http(&identity.tenant)?;
    let not_found = || ApiError::new(ErrorCode::NotFound, NO_SUCH_SESSION);
    let session = hub.sessions.get(&session.into_inner()).map(|handle| handle.session.clone()).ok_or_else(not_found)?;
    let expires_at = match session.refresh(RefreshToken(identity), REFRESH_WAIT).await {
        Ok(answer) => answer?,
        Err(actix::MailboxError::Timeout) => return Err(Error::Busy.into()),
        Err(actix::MailboxError::Closed) => return Err(not_found()),
    };
    Ok(HttpResponse::Ok().json(json!({ "expires_at": expires_at })))
}
