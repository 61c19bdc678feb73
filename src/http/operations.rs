//! The operations view for managers (`GET /v1/operations`): the tenant's devices with when the
//! hub last saw them, the position they have and how far behind the head it is, who is online
//! now (the tenant actor's presence), and the last 24 hours of changes and conflicts, hour by
//! hour. Everything comes from the hub's own state and tables, read through the storage API.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, HttpResponse};
use chrono::{DateTime, SecondsFormat};
use protocol::{ErrorCode, SessionMode};
use serde::Serialize;

use super::auth::Manager;
use super::error::ApiError;
use crate::actors::messages::Online;
use crate::actors::sweep::unix_ms;
use crate::ids::Seq;
use crate::server::Hub;
use crate::storage::device_status::DeviceStatus;

/// Hours of history the view shows (the current hour last).
pub const HOURS: u32 = 24;
/// How long the answer waits for the tenant actor's presence (its mailbox may be full).
const PRESENCE_WAIT: Duration = Duration::from_secs(5);

/// Unix ms as RFC 3339 UTC with milliseconds (`2026-12-07T03:19:08.000Z`).
fn rfc3339(ms: i64) -> Option<String> {
    DateTime::from_timestamp_millis(ms).map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

#[derive(Serialize)]
struct DeviceRow {
    device_id: String,
    user_id: Option<String>,
    /// A session of the device is connected now.
    online: bool,
    /// Now when online; else when a session of it last said hello or ended.
    last_seen: Option<String>,
    /// The last seq the hub knows the device has: where its session resumed from while it is
    /// online, the last seq sent to it when its session ended.
    position: Option<Seq>,
    /// `head_seq - position`.
    lag: Option<Seq>,
    last_push: Option<String>,
    last_device_seq: u64,
}

#[derive(Serialize)]
struct Hour {
    /// The hour's start, RFC 3339 UTC.
    hour: String,
    /// Changes logged in the hour (devices', the console's and other writers').
    changes: u64,
    /// Of them, the devices' pushes'.
    pushed: u64,
    /// Devices that pushed some of them.
    devices: u64,
    /// Conflicts logged in the hour.
    conflicts: u64,
}

#[derive(Serialize)]
struct Operations {
    now: String,
    head_seq: Seq,
    online: usize,
    devices: Vec<DeviceRow>,
    /// More devices than one answer lists: `devices` holds the first by id (and every online one).
    devices_truncated: bool,
    hours: Vec<Hour>,
}

/// `GET /v1/operations`
pub async fn operations(hub: web::Data<Arc<Hub>>, manager: Manager) -> Result<HttpResponse, ApiError> {
    let tenant = &manager.0.tenant;
    let now = unix_ms() as i64;
    // A tenant without a running actor has nobody online (asking would start one).
    let online = match hub.registry.running(tenant) {
        Some(actor) => match actor.send(Online).timeout(PRESENCE_WAIT).await {
            Ok(list) => list,
            Err(actix::MailboxError::Timeout) => return Err(crate::error::Error::Busy.into()),
            Err(actix::MailboxError::Closed) => Arc::new(Vec::new()),
        },
        None => Arc::new(Vec::new()),
    };
    // One after another: each takes one of the session reads' connections, not three at once.
    let statuses = hub.store.device_statuses(tenant, hub.config.operations_max_devices).await?;
    let changes = hub.store.changes_per_hour(tenant, now, HOURS).await?;
    let conflicts = hub.store.conflicts_per_hour(tenant, now, HOURS).await?;
    let head = statuses.head_seq;

    let mut devices: BTreeMap<String, (DeviceStatus, bool)> =
        statuses.devices.into_iter().map(|d| (d.device_id.clone(), (d, false))).collect();
    for entry in online.iter().filter(|e| e.mode != SessionMode::Dashboard) {
        let (status, online) = devices.entry(entry.device_id.clone()).or_insert_with(|| {
            // Online before its status was written (or past the listed ones).
            let status = DeviceStatus {
                device_id: entry.device_id.clone(),
                user_id: None,
                last_seen_ms: None,
                position: None,
                last_device_seq: 0,
                last_push_ms: None,
            };
            (status, false)
        });
        *online = true;
        status.user_id.get_or_insert_with(|| entry.user_id.clone());
    }
    let online_count = devices.values().filter(|(_, online)| *online).count();
    let devices = devices
        .into_values()
        .map(|(d, online)| DeviceRow {
            online,
            last_seen: if online { rfc3339(now) } else { d.last_seen_ms.and_then(rfc3339) },
            lag: d.position.map(|p| head.saturating_sub(p)),
            position: d.position,
            last_push: d.last_push_ms.and_then(rfc3339),
            last_device_seq: d.last_device_seq,
            user_id: d.user_id,
            device_id: d.device_id,
        })
        .collect();
    if changes.len() != conflicts.len() {
        return Err(ApiError::new(ErrorCode::Internal, "hourly counts disagree"));
    }
    let hours = changes
        .iter()
        .zip(&conflicts)
        .map(|(c, (_, conflicts))| Hour { hour: rfc3339(c.hour_ms).unwrap_or_default(), changes: c.changes, pushed: c.pushed, devices: c.devices, conflicts: *conflicts })
        .collect();
    let body = Operations {
        now: rfc3339(now).unwrap_or_default(),
        head_seq: head,
        online: online_count,
        devices,
        devices_truncated: statuses.truncated,
        hours,
    };
    Ok(HttpResponse::Ok().insert_header(("Cache-Control", "no-store")).json(body))
}
