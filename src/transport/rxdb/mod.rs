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

use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use super::ws::{refuse_upgrade, serve};
use crate::server::Hub;
use session::RxdbSession;

#[derive(Deserialize)]
struct UpgradeQuery {
    token: Option<String>,
}

/// `GET /rxdb/v1[?token=<jwt>]`. A token in the URL is verified at once; a refused one still
/// gets its socket, closed 4001 (or 4002 when expired) at the start, since RxDB's client sees a
/// close code where it would retry a refused upgrade forever.
pub async fn upgrade(req: HttpRequest, stream: web::Payload, hub: web::Data<Arc<Hub>>) -> actix_web::Result<HttpResponse> {
    if let Some(refused) = refuse_upgrade(&hub) {
        return Ok(refused);
    }
    let token = web::Query::<UpgradeQuery>::from_query(req.query_string()).ok().and_then(|q| q.into_inner().token).filter(|t| !t.is_empty());
    let identity = token.map(|t| hub.verifier.verify(&t));
    let session = RxdbSession::new(hub.get_ref().clone(), identity);
    serve(&req, stream, &hub, session)
}
