//! The HTTP API beside the WebSocket: conflict review for managers (`/v1/conflicts*`) and the
//! tables as they see them (`/v1/catalog`),
//! server-side writers (`/v1/tenants/{tenant}/push`, `/broadcast`) and a session's token
//! refresh (`/v1/sessions/{id}/token`). Here: the routes, the
//! request limits and error answers of the extractors, and the one way a batch reaches its
//! tenant actor from HTTP (the same queue, merge and cursor rules as a device's push).

pub mod auth;
pub mod catalog;
pub mod conflicts;
pub mod conflicts_csv;
pub mod error;
pub mod operations;
pub mod sessions;
pub mod writers;

use actix_web::error::{JsonPayloadError, QueryPayloadError};
use actix_web::web;
use protocol::{ChangeResult, ErrorCode};

use crate::actors::messages::ApplyBatch;
use crate::config::Config;
use crate::error::Error;
use crate::ids::TenantId;
use crate::server::Hub;
use crate::storage::apply::BatchInput;
use error::ApiError;

/// Register the API's routes and extractor settings on the app.
pub fn routes(cfg: &mut web::ServiceConfig, config: &Config) {
    let json = web::JsonConfig::default()
        .limit(config.max_http_body_bytes)
        .content_type_required(false)
        .error_handler(|err, _req| json_error(err).into());
    let query = web::QueryConfig::default().error_handler(|err: QueryPayloadError, _req| {
        ApiError::new(ErrorCode::InvalidFilter, format!("query: {err}")).into()
    });
    // A path that does not parse (an id that is not a number) names nothing.
    let path = web::PathConfig::default().error_handler(|_, _req| ApiError::new(ErrorCode::NotFound, "no such object").into());
    cfg.app_data(json).app_data(query).app_data(path);
    cfg.route("/v1/catalog", web::get().to(catalog::catalog))
        .route("/v1/conflicts", web::get().to(conflicts::list))
        .route("/v1/conflicts/counts", web::get().to(conflicts::counts))
        .route("/v1/conflicts/export.csv", web::get().to(conflicts::export_csv))
        .route("/v1/conflicts/resolve", web::post().to(conflicts::resolve_many))
        .route("/v1/conflicts/{id}", web::get().to(conflicts::get))
        .route("/v1/conflicts/{id}/resolve", web::post().to(conflicts::resolve))
        .route("/v1/operations", web::get().to(operations::operations))
        .route("/v1/tenants/{tenant}/push", web::post().to(writers::push))
        .route("/v1/tenants/{tenant}/broadcast", web::post().to(writers::broadcast))
        .route("/v1/sessions/{session}/token", web::post().to(sessions::refresh_token));
}

fn json_error(err: JsonPayloadError) -> ApiError {
    match err {
        JsonPayloadError::Overflow { limit } | JsonPayloadError::OverflowKnownLength { limit, .. } => {
            ApiError::new(ErrorCode::ValueTooLarge, format!("request body larger than {limit} bytes (max_http_body_bytes)"))
        }
        other => ApiError::new(ErrorCode::MalformedFrame, format!("request body: {other}")),
    }
}

/// Refuse writes while the hub shuts down.
fn check_accepting(hub: &Hub) -> Result<(), ApiError> {
    if hub.accepting() {
        Ok(())
    } else {
        Err(ApiError(Error::ShuttingDown))
    }
}

/// Queue a batch at its tenant actor and wait for its results, exactly as a device's push.
async fn submit(hub: &Hub, tenant: &TenantId, input: BatchInput) -> Result<Vec<ChangeResult>, ApiError> {
    let actor = hub.registry.get(tenant);
    let answer = actor
        .send(ApplyBatch { input })
        .await
        .map_err(|_| ApiError::new(ErrorCode::Unavailable, "tenant actor unavailable; retry"))??;
    Ok(answer.await.map_err(|_| ApiError(Error::ShuttingDown))??)
}
