//! RxDB's websocket replication at `GET /rxdb/v1`: an unmodified RxDB 17 app points
//! `replicateWithWebsocketServer` at the hub. The translation lives here (`wire` frames,
//! `collection` documents, `pull`, `push`, the `stream` coverage, the `session` actor); merges,
//! fan-out and reads are the hub's one path for every protocol.

pub mod collection;
pub mod pull;
pub mod push;
pub mod session;
pub mod stream;
pub mod wire;

use std::rc::Rc;
use std::sync::Arc;

use actix_http::ws::Codec;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use actix_web_actors::ws;
use serde::Deserialize;

use super::frame_guard::{InboundGuard, OutboundCloser, Verdict};
use crate::http::error::ApiError;
use crate::server::Hub;
use protocol::ErrorCode;
use session::RxdbSession;

#[derive(Deserialize)]
struct UpgradeQuery {
    token: Option<String>,
}

/// `GET /rxdb/v1[?token=<jwt>]`. A token in the URL is verified at once; a refused one still
/// gets its socket, closed 4001 (or 4002 when expired) at the start, since RxDB's client sees a
/// close code where it would retry a refused upgrade forever.
pub async fn upgrade(req: HttpRequest, stream: web::Payload, hub: web::Data<Arc<Hub>>) -> actix_web::Result<HttpResponse> {
    if !hub.accepting() {
        return Ok(HttpResponse::ServiceUnavailable().body("shutting down"));
    }
    if hub.sessions.len() >= hub.limits.max_connections {
        let full = ApiError::new(ErrorCode::Busy, format!("this hub holds its most sessions ({}); retry later", hub.limits.max_connections));
        return Ok(full.error_response());
    }
    let token = web::Query::<UpgradeQuery>::from_query(req.query_string()).ok().and_then(|q| q.into_inner().token).filter(|t| !t.is_empty());
    let identity = token.map(|t| hub.verifier.verify(&t));
    let mut response = ws::handshake(&req)?;
    let max = hub.config.max_frame_bytes;
    let verdict = Rc::new(Verdict::default());
    let input = InboundGuard::new(stream, max, verdict.clone());
    let session = RxdbSession::new(hub.get_ref().clone(), identity);
    let output = ws::WebsocketContext::with_codec(session, input, Codec::new().max_size(max));
    Ok(response.streaming(OutboundCloser::new(output, verdict, hub.get_ref().clone())))
}
