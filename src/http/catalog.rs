//! `GET /v1/catalog` for any token of a tenant: the synced tables as the hub knows them (key, columns and
//! their types) with how people see their rows (label column, column formats, the console's
//! currency), so that the console offers real columns and shows values readably.

use std::sync::Arc;

use actix_web::{web, HttpResponse};
use serde::Serialize;
use serde_json::json;

use super::auth::Member;
use super::error::ApiError;
use crate::server::Hub;
use crate::storage::presentation::TablePresentation;

#[derive(Serialize)]
struct ColumnView<'a> {
    name: &'a str,
    #[serde(rename = "type")]
    sql_type: &'a str,
}

#[derive(Serialize)]
struct TableView<'a> {
    name: &'a str,
    tenant_column: &'a str,
    /// Key columns a client sends (the tenant column is the token's).
    key: &'a [String],
    columns: Vec<ColumnView<'a>>,
    #[serde(flatten)]
    presentation: TablePresentation,
}

/// `GET /v1/catalog`: tables by name, columns in name order. The same for every tenant and role:
/// it says what a client may name in a change or a filter, never what any row holds.
pub async fn catalog(hub: web::Data<Arc<Hub>>, _member: Member) -> Result<HttpResponse, ApiError> {
    let catalog = hub.store.catalog();
    let mut names: Vec<&str> = catalog.names().collect();
    names.sort_unstable();
    let tables: Vec<TableView> = names
        .into_iter()
        .filter_map(|name| catalog.get(name))
        .map(|schema| TableView {
            name: &schema.name,
            tenant_column: &schema.tenant_column,
            key: &schema.key,
            columns: schema
                .columns
                .values()
                .filter(|c| c.name != schema.tenant_column)
                .map(|c| ColumnView { name: &c.name, sql_type: &c.sql_type })
                .collect(),
            presentation: hub.store.presentation().get(&schema.name).cloned().unwrap_or_default(),
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "currency": hub.config.console_currency, "tables": tables })))
}
