//! `GET /v1/ws`: upgrades to a WebSocket run by a `DeviceSession`, with the framing (and the
//! frame size limit, at each frame's header) checked by `frame_guard` before actix buffers a
//! frame. A token sent with the upgrade request is verified here, so a refused one never gets
//! a socket.

use std::rc::Rc;
use std::sync::Arc;

use actix_http::ws::Codec;
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use actix::{Actor, StreamHandler};
use actix_web_actors::ws;
use serde::Deserialize;

use super::frame_guard::{InboundGuard, OutboundCloser, Verdict};
use crate::actors::device::DeviceSession;
use crate::auth::Identity;
use crate::http::auth::bearer;
use crate::http::error::ApiError;
use crate::server::Hub;
use protocol::ErrorCode;

#[derive(Deserialize)]
struct UpgradeQuery {
    access_token: Option<String>,
}

pub async fn upgrade(req: HttpRequest, stream: web::Payload, hub: web::Data<Arc<Hub>>) -> actix_web::Result<HttpResponse> {
    if let Some(refused) = refuse_upgrade(&hub) {
        return Ok(refused);
    }
    let identity = match upgrade_identity(&req, &hub) {
        Ok(identity) => identity,
        Err(err) => return Ok(err.error_response()),
    };
    let session = DeviceSession::new(hub.get_ref().clone(), identity);
    serve(&req, stream, &hub, session)
}

/// An upgrade refused before a socket and a session exist: the hub is shutting down, or holds
/// its most sessions (config `max_connections`).
pub fn refuse_upgrade(hub: &Hub) -> Option<HttpResponse> {
    if !hub.accepting() {
        return Some(HttpResponse::ServiceUnavailable().body("shutting down"));
    }
    if hub.sessions.len() >= hub.limits.max_connections {
        let full = ApiError::new(ErrorCode::Busy, format!("this hub holds its most sessions ({}); retry later", hub.limits.max_connections));
        return Some(full.error_response());
    }
    None
}

/// Upgrade the connection and run `session` on it, its framing checked on the way in (a
/// violation ends the connection with its code) and the frame size limit applied at each frame's
/// header.
pub fn serve<A>(req: &HttpRequest, stream: web::Payload, hub: &Arc<Hub>, session: A) -> actix_web::Result<HttpResponse>
where
    A: Actor<Context = ws::WebsocketContext<A>> + StreamHandler<Result<ws::Message, ws::ProtocolError>>,
{
    let mut response = ws::handshake(req)?;
    let max = hub.config.max_frame_bytes;
    let verdict = Rc::new(Verdict::new(hub.metrics.clone()));
    let input = InboundGuard::new(stream, max, verdict.clone());
    let output = ws::WebsocketContext::with_codec(session, input, Codec::new().max_size(max));
    Ok(response.streaming(OutboundCloser::new(output, verdict)))
}

/// The verified token of the upgrade request, if it carried one: `Authorization: Bearer <jwt>`,
/// else the `access_token` query parameter (browsers cannot set headers on a WebSocket).
fn upgrade_identity(req: &HttpRequest, hub: &Hub) -> Result<Option<Identity>, ApiError> {
    let token = if req.headers().contains_key(header::AUTHORIZATION) {
        Some(bearer(req)?.to_string())
    } else if req.query_string().is_empty() {
        None
    } else {
        let query = web::Query::<UpgradeQuery>::from_query(req.query_string())
            .map_err(|e| ApiError::new(ErrorCode::InvalidToken, format!("query string: {e}")))?;
        query.into_inner().access_token.filter(|t| !t.is_empty())
    };
    Ok(token.map(|t| hub.verifier.verify(&t)).transpose()?)
}
