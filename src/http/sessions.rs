//! Token refresh over HTTP for an open WebSocket session (`POST /v1/sessions/{id}/token`, the
//! fresh token as the bearer): the same rules as an `auth` frame, with nothing read or written
//! on the socket, so an idle session's buffers keep the size of its small frames. In a cluster
//! the request may reach another node than the session's: it is passed on over NATS to the
//! node that holds the session, which checks the token itself.

use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use protocol::ErrorCode;
use serde_json::json;
use uuid::Uuid;

use super::auth::bearer;
use super::error::ApiError;
use crate::actors::messages::{RefreshToken, NO_SUCH_SESSION};
use crate::cluster::{Body, Cluster};
use crate::error::Error;
use crate::ids::SessionId;
use crate::server::Hub;

/// How long a refresh waits for the session to take it (its mailbox may be full of frames).
const REFRESH_WAIT: Duration = Duration::from_secs(5);
/// How long a refresh passed on to the cluster waits for the node holding the session: its
/// own wait and the NATS round trip.
const FORWARD_WAIT: Duration = Duration::from_secs(6);

/// `POST /v1/sessions/{id}/token`: `{"expires_at": <Unix seconds>}`.
pub async fn refresh_token(req: HttpRequest, hub: web::Data<Arc<Hub>>, session: web::Path<Uuid>) -> Result<HttpResponse, ApiError> {
    let token = bearer(&req)?;
    let identity = hub.verifier.verify(token)?;
    hub.limits.http(&identity.tenant)?;
    let session = session.into_inner();
    let expires_at = match (&hub.cluster, hub.sessions.contains_key(&session)) {
        (Some(cluster), false) => refresh_elsewhere(cluster, session, token).await?,
        _ => refresh_here(&hub, token, session).await?,
    };
    Ok(HttpResponse::Ok().json(json!({ "expires_at": expires_at })))
}

fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, NO_SUCH_SESSION)
}

/// Refresh a session of this node with `token`.
async fn refresh_here(hub: &Hub, token: &str, session: SessionId) -> Result<u64, ApiError> {
    let identity = hub.verifier.verify(token)?;
    let session = hub.sessions.get(&session).map(|handle| handle.session.clone()).ok_or_else(not_found)?;
    match session.refresh(RefreshToken(identity), REFRESH_WAIT).await {
        Ok(answer) => Ok(answer?),
        Err(actix::MailboxError::Timeout) => Err(Error::Busy.into()),
        Err(actix::MailboxError::Closed) => Err(not_found()),
    }
}

/// Ask the node holding the session to refresh it; no answer means no node holds it.
async fn refresh_elsewhere(cluster: &Cluster, session: SessionId, token: &str) -> Result<u64, ApiError> {
    let ask = Body::RefreshToken { session, token: token.to_owned() };
    let answer = cluster.ask_session_holder(ask, FORWARD_WAIT).await.ok_or_else(not_found)?;
    match answer.body {
        Body::Refreshed { expires_at: Some(expires_at), .. } => Ok(expires_at),
        Body::Refreshed { code: Some(code), message, .. } => Err(ApiError::new(code, message)),
        _ => Err(ApiError::new(ErrorCode::Unavailable, "the session's node gave no answer; retry")),
    }
}

/// Answer other nodes' refreshes for the sessions of this node (and stay silent on others).
pub async fn serve_forwarded_refreshes(hub: Arc<Hub>, cluster: Arc<Cluster>) {
    let mut requests = loop {
        match cluster.session_requests().await {
            Ok(requests) => break requests,
            Err(err) => {
                tracing::warn!(%err, "cannot take session requests; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    while let Some((request, reply)) = requests.next().await {
        let Body::RefreshToken { session, token } = request.body else { continue };
        if !hub.sessions.contains_key(&session) {
            continue;
        }
        let (hub, cluster) = (hub.clone(), cluster.clone());
        tokio::spawn(async move {
            let answer = match refresh_here(&hub, &token, session).await {
                Ok(expires_at) => Body::Refreshed { expires_at: Some(expires_at), code: None, message: String::new() },
                Err(err) => {
                    let (_, message) = err.code_and_message();
                    Body::Refreshed { expires_at: None, code: Some(err.0.code()), message }
                }
            };
            cluster.answer(reply, answer).await;
        });
    }
}
