//! Supabase Realtime's protocol at `/realtime/v1`: dashboards built on supabase-js connect
//! unchanged. The translation lives here (`wire` frames for vsn 1.0.0 and 2.0.0, `join`
//! payloads, `filter` strings, `types` names, `changes` bindings and payloads, the `session`
//! actor, and the REST broadcast endpoints below); topics, presence, merges and the ordered
//! change stream are the hub's one path for every protocol.

pub mod changes;
pub mod filter;
pub mod join;
pub mod session;
pub mod types;
pub mod wire;

use std::sync::Arc;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use super::ws::{refuse_upgrade, serve};
use crate::cluster::Body;
use crate::actors::messages::Broadcast;
use crate::auth::Identity;
use crate::error::Error;
use crate::server::Hub;
use protocol::ErrorCode;
use session::SupabaseSession;
use wire::Vsn;

#[derive(Deserialize)]
struct Query {
    apikey: Option<String>,
    vsn: Option<String>,
    private: Option<String>,
}

fn query(req: &HttpRequest) -> Query {
    web::Query::<Query>::from_query(req.query_string()).map(|q| q.into_inner()).unwrap_or(Query { apikey: None, vsn: None, private: None })
}

/// An error as Supabase Realtime's HTTP endpoints answer it: `{"error": "..."}`.
fn error(status: StatusCode, message: impl Into<String>) -> HttpResponse {
    HttpResponse::build(status).json(json!({ "error": message.into() }))
}

fn refused(err: &Error) -> HttpResponse {
    let status = match err.code() {
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Unavailable | ErrorCode::Busy | ErrorCode::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::UNAUTHORIZED,
    };
    error(status, err.public_message())
}

/// The caller's token: `Authorization: Bearer`, else the `apikey` (header or query), as
/// Supabase reads them.
fn token(req: &HttpRequest, query_key: Option<&str>, prefer_bearer: bool) -> Option<String> {
    let header_value = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty());
    let bearer = header_value(header::AUTHORIZATION.as_str())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim().to_owned())
        .filter(|t| !t.starts_with("sb_"));
    let api_key = header_value("x-api-key").or_else(|| header_value("apikey")).map(str::to_owned).or_else(|| query_key.map(str::to_owned));
    if prefer_bearer {
        bearer.or(api_key)
    } else {
        api_key.or(bearer)
    }
}

fn verify(hub: &Hub, token: Option<String>) -> Result<Identity, Box<HttpResponse>> {
    let token = token.ok_or_else(|| Box::new(error(StatusCode::UNAUTHORIZED, "No api key provided: send `apikey` (a JWT)")))?;
    hub.verifier.verify(&token).map_err(|err| Box::new(refused(&err)))
}

/// `GET /realtime/v1/websocket?apikey=<jwt>&vsn=1.0.0|2.0.0`. A refused token or vsn is
/// answered over HTTP, as Supabase does, so no socket is made for it.
pub async fn upgrade(req: HttpRequest, stream: web::Payload, hub: web::Data<Arc<Hub>>) -> actix_web::Result<HttpResponse> {
    if let Some(refused) = refuse_upgrade(&hub) {
        return Ok(refused);
    }
    let query = query(&req);
    let Some(vsn) = Vsn::parse(query.vsn.as_deref().unwrap_or("1.0.0")) else {
        return Ok(error(StatusCode::BAD_REQUEST, "unsupported vsn: this hub speaks 1.0.0 and 2.0.0"));
    };
    let Some(key) = token(&req, query.apikey.as_deref(), false) else {
        return Ok(error(StatusCode::UNAUTHORIZED, "No api key provided: send `apikey` (a JWT)"));
    };
    // A key without a tenant (a project-wide anon key) is let in; its channels bring one.
    let identity = match hub.verifier.verify_api_key(&key) {
        Ok(identity) => identity,
        Err(err) => return Ok(refused(&err)),
    };
    if let Some(identity) = &identity {
        if let Err(err) = hub.limits.connect(&identity.tenant) {
            return Ok(refused(&err));
        }
    }
    serve(&req, stream, &hub, SupabaseSession::new(hub.get_ref().clone(), vsn, identity))
}

#[derive(Deserialize)]
struct BatchBody {
    messages: Vec<BatchMessage>,
}

#[derive(Deserialize)]
struct BatchMessage {
    topic: String,
    event: String,
    #[serde(default)]
    payload: Value,
    #[serde(default)]
    private: bool,
}

/// One message of a REST broadcast, checked.
struct Checked {
    channel: String,
    event: String,
    payload: Value,
    private: bool,
}

fn check(hub: &Hub, identity: &Identity, topic: &str, event: String, payload: Value, private: bool) -> Result<Checked, Box<HttpResponse>> {
    let name = topic.strip_prefix("realtime:").unwrap_or(topic);
    let refuse = |status, message: String| Err(Box::new(error(status, message)));
    if let Err(why) = join::channel_name(&format!("realtime:{name}")) {
        return refuse(StatusCode::BAD_REQUEST, why);
    }
    if event.is_empty() || event.len() > 255 || event.contains('\0') {
        return refuse(StatusCode::BAD_REQUEST, "an event is 1 to 255 bytes, without U+0000".into());
    }
    let max = hub.config.max_broadcast_payload_bytes;
    if payload.to_string().len() > max {
        return refuse(StatusCode::PAYLOAD_TOO_LARGE, format!("a payload is at most {max} bytes of JSON (max_broadcast_payload_bytes)"));
    }
    if private && !hub.config.may_join_private(name, &identity.role) {
        return refuse(StatusCode::FORBIDDEN, format!("You do not have permissions to write to this Channel topic: {name}"));
    }
    Ok(Checked { channel: name.to_owned(), event, payload, private })
}

async fn send_all(hub: &Hub, identity: &Identity, messages: Vec<Checked>) -> HttpResponse {
    if let Err(err) = hub.limits.http(&identity.tenant) {
        return refused(&err);
    }
    hub.metrics.supabase_messages("rest_broadcast", messages.len() as u64);
    // A tenant without a running actor has no session here to reach (in a cluster, the other
    // nodes still hear of it).
    if let Some(actor) = hub.registry.running(&identity.tenant) {
        for m in messages {
            let msg = Broadcast { channel: m.channel, event: Some(m.event), payload: m.payload, private: m.private, from: None };
            if actor.send(msg).await.is_err() {
                return error(StatusCode::SERVICE_UNAVAILABLE, "tenant unavailable; retry");
            }
        }
    } else {
        for m in messages {
            let body = Body::Broadcast { channel: m.channel, event: Some(m.event), payload: m.payload.to_string(), private: m.private, from: None };
            hub.registry.publish_elsewhere(&identity.tenant, body);
        }
    }
    HttpResponse::Accepted().finish()
}

/// `POST /realtime/v1/api/broadcast` `{"messages": [{topic, event, payload, private?}]}` → 202.
pub async fn broadcast_batch(req: HttpRequest, body: web::Bytes, hub: web::Data<Arc<Hub>>) -> HttpResponse {
    let identity = match verify(&hub, token(&req, query(&req).apikey.as_deref(), true)) {
        Ok(identity) => identity,
        Err(response) => return *response,
    };
    let body: BatchBody = match serde_json::from_slice(&body) {
        Ok(body) => body,
        Err(err) => return error(StatusCode::BAD_REQUEST, format!("body: {err}")),
    };
    let mut checked = Vec::with_capacity(body.messages.len());
    for m in body.messages {
        match check(&hub, &identity, &m.topic, m.event, m.payload, m.private) {
            Ok(c) => checked.push(c),
            Err(response) => return *response,
        }
    }
    send_all(&hub, &identity, checked).await
}

/// `POST /realtime/v1/api/broadcast/{topic}/events/{event}[?private=true]`, the body the
/// payload (JSON) → 202.
pub async fn broadcast_one(req: HttpRequest, path: web::Path<(String, String)>, body: web::Bytes, hub: web::Data<Arc<Hub>>) -> HttpResponse {
    let query = query(&req);
    let identity = match verify(&hub, token(&req, query.apikey.as_deref(), true)) {
        Ok(identity) => identity,
        Err(response) => return *response,
    };
    let payload: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(payload) => payload,
            Err(_) => return error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "the payload must be JSON (binary payloads are not relayed)"),
        }
    };
    let private = join::lenient_bool(query.private.map(Value::String).as_ref());
    let (topic, event) = path.into_inner();
    match check(&hub, &identity, &topic, event, payload, private) {
        Ok(checked) => send_all(&hub, &identity, vec![checked]).await,
        Err(response) => *response,
    }
}

/// The routes of `/realtime/v1`.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/realtime/v1/websocket", web::get().to(upgrade))
        .route("/realtime/v1/api/broadcast", web::post().to(broadcast_batch))
        .route("/realtime/v1/api/broadcast/{topic}/events/{event}", web::post().to(broadcast_one));
}
