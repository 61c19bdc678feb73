//! `GET /v1/ws`: upgrades to a WebSocket run by a `DeviceSession`, with the frame size limit
//! applied by the codec before any frame is buffered whole. A token sent with the upgrade
//! request is verified here, so a refused one never gets a socket.

use std::sync::Arc;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws;
use serde::Deserialize;

use crate::actors::device::DeviceSession;
use crate::error::Error;
use crate::server::Hub;
use protocol::ErrorCode;

#[derive(Deserialize)]
struct UpgradeQuery {
    access_token: Option<String>,
}

pub async fn upgrade(req: HttpRequest, stream: web::Payload, hub: web::Data<Arc<Hub>>) -> actix_web::Result<HttpResponse> {
    if !hub.accepting() {
        return Ok(HttpResponse::ServiceUnavailable().body("shutting down"));
    }
    let identity = match upgrade_token(&req) {
        Ok(None) => None,
        Ok(Some(token)) => match hub.verifier.verify(&token) {
            Ok(identity) => Some(identity),
            Err(err) => return Ok(unauthorized(&err)),
        },
        Err(err) => return Ok(unauthorized(&err)),
    };
    let max = hub.config.max_frame_bytes;
    ws::WsResponseBuilder::new(DeviceSession::new(hub.get_ref().clone(), identity), &req, stream).frame_size(max).start()
}

/// The token of the upgrade request: `Authorization: Bearer <jwt>`, else the `access_token`
/// query parameter (for browsers, which cannot set headers on a WebSocket).
fn upgrade_token(req: &HttpRequest) -> Result<Option<String>, Error> {
    if let Some(value) = req.headers().get(header::AUTHORIZATION) {
        let bearer = value.to_str().ok().and_then(|v| v.split_once(' ')).filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"));
        return match bearer {
            Some((_, token)) if !token.trim().is_empty() => Ok(Some(token.trim().to_string())),
            _ => Err(Error::client(ErrorCode::InvalidToken, "the Authorization header must be `Bearer <jwt>`")),
        };
    }
    if req.query_string().is_empty() {
        return Ok(None);
    }
    let query = web::Query::<UpgradeQuery>::from_query(req.query_string())
        .map_err(|e| Error::client(ErrorCode::InvalidToken, format!("query string: {e}")))?;
    Ok(query.into_inner().access_token.filter(|t| !t.is_empty()))
}

fn unauthorized(err: &Error) -> HttpResponse {
    HttpResponse::Unauthorized()
        .insert_header((header::WWW_AUTHENTICATE, r#"Bearer error="invalid_token""#))
        .json(serde_json::json!({ "code": err.code(), "message": err.public_message() }))
}
