//! `GET /v1/ws`: upgrades to a WebSocket run by a `DeviceSession`, with the frame size limit
//! applied by the codec before any frame is buffered whole.

use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws;

use crate::actors::device::DeviceSession;
use crate::server::Hub;

pub async fn upgrade(req: HttpRequest, stream: web::Payload, hub: web::Data<Arc<Hub>>) -> actix_web::Result<HttpResponse> {
    if !hub.accepting() {
        return Ok(HttpResponse::ServiceUnavailable().body("shutting down"));
    }
    let max = hub.config.max_frame_bytes;
    ws::WsResponseBuilder::new(DeviceSession::new(hub.get_ref().clone()), &req, stream).frame_size(max).start()
}
