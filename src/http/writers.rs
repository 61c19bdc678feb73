//! Server-side writers: a service with a configured token pushes a batch for a tenant exactly
//! as a device would (same checks, cursor rules, merge and conflicts), or broadcasts an
//! ephemeral message to every session of the tenant.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix_web::{web, HttpResponse};
use protocol::{Change, ErrorCode};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::auth::ServiceWriter;
use super::error::ApiError;
use super::{check_accepting, submit};
use crate::cluster::Body;
use crate::actors::messages::Broadcast;
use crate::ids::{id_problem, DeviceId, TenantId, UserId};
use crate::server::Hub;
use crate::storage::apply::BatchInput;
use crate::sync::batch::check_batch;

/// Longest broadcast channel name, characters.
const MAX_CHANNEL_CHARS: usize = 64;

fn tenant_of(path: String, writer: &ServiceWriter, max_id_bytes: usize) -> Result<TenantId, ApiError> {
    if let Some(problem) = id_problem(&path, max_id_bytes) {
        return Err(ApiError::new(ErrorCode::MalformedFrame, format!("the tenant id {problem}")));
    }
    let tenant = TenantId::new(path);
    writer.check_tenant(&tenant)?;
    Ok(tenant)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushBody {
    device_id: String,
    batch_id: Uuid,
    changes: Vec<Change>,
}

/// `POST /v1/tenants/{tenant}/push` → `{"batch_id", "results"}`.
pub async fn push(
    hub: web::Data<Arc<Hub>>,
    writer: ServiceWriter,
    tenant: web::Path<String>,
    body: web::Json<PushBody>,
) -> Result<HttpResponse, ApiError> {
    let tenant = tenant_of(tenant.into_inner(), &writer, hub.config.max_id_bytes)?;
    hub.limits.http(&tenant)?;
    check_accepting(&hub)?;
    let PushBody { device_id, batch_id, changes } = body.into_inner();
    if let Some(problem) = id_problem(&device_id, hub.config.max_id_bytes) {
        return Err(ApiError::new(ErrorCode::InvalidBatch, format!("device_id {problem}")));
    }
    if DeviceId::is_reserved(&device_id) {
        return Err(ApiError::new(ErrorCode::Forbidden, "device ids starting with `console:`, `dashboard:` or `rxdb:` are the hub's own"));
    }
    check_batch(&changes, hub.config.max_batch_changes)?;
    let device = DeviceId::new(device_id);
    hub.limits.push(&tenant, &device)?;
    let input = BatchInput::pushed(device, UserId::new(format!("service:{}", writer.name)), batch_id, changes);
    hub.metrics.http_pushes.fetch_add(1, Ordering::Relaxed);
    let results = submit(&hub, &tenant, input).await?;
    Ok(HttpResponse::Ok().json(json!({"batch_id": batch_id, "results": results})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BroadcastBody {
    channel: String,
    /// What the message is; Supabase clients on the channel receive it under this event
    /// (`"broadcast"` when absent).
    #[serde(default)]
    event: Option<String>,
    payload: Value,
}

/// `POST /v1/tenants/{tenant}/broadcast` → 202 `{"sessions": n}`.
pub async fn broadcast(
    hub: web::Data<Arc<Hub>>,
    writer: ServiceWriter,
    tenant: web::Path<String>,
    body: web::Json<BroadcastBody>,
) -> Result<HttpResponse, ApiError> {
    let tenant = tenant_of(tenant.into_inner(), &writer, hub.config.max_id_bytes)?;
    hub.limits.http(&tenant)?;
    check_accepting(&hub)?;
    let BroadcastBody { channel, event, payload } = body.into_inner();
    if channel.is_empty() || channel.chars().count() > MAX_CHANNEL_CHARS {
        return Err(ApiError::new(ErrorCode::MalformedFrame, format!("channel must be 1 to {MAX_CHANNEL_CHARS} characters")));
    }
    let size = serde_json::to_vec(&payload).map(|b| b.len()).unwrap_or(usize::MAX);
    let max = hub.config.max_broadcast_payload_bytes;
    if size > max {
        return Err(ApiError::new(ErrorCode::ValueTooLarge, format!("payload is {size} bytes, more than {max} (max_broadcast_payload_bytes)")));
    }
    hub.metrics.http_broadcasts.fetch_add(1, Ordering::Relaxed);
    // A tenant without a running actor has no session here to reach: none is started for it
    // (in a cluster, the other nodes still hear of it).
    let sessions = match hub.registry.running(&tenant) {
        Some(actor) => actor
            .send(Broadcast { channel, event, payload, private: false, from: None })
            .await
            .map_err(|_| ApiError::new(ErrorCode::Unavailable, "tenant actor unavailable; retry"))?,
        None => {
            hub.registry.publish_elsewhere(&tenant, Body::Broadcast { channel, event, payload: payload.to_string(), private: false, from: None });
            0
        }
    };
    Ok(HttpResponse::Accepted().json(json!({"sessions": sessions})))
}
