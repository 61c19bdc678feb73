//! The demo point-of-sale schema that `synchub dev` loads (products, customers, orders,
//! order lines, each with a tenant column), its demo tenant, and ready-made tokens; with
//! `--demo`, [`devices`] runs two simulated tills against the hub.

use serde_json::json;
use sqlx::PgPool;

use crate::config::{MergePolicy, TableConfig};
use crate::error::Result;

#[path = "demo_devices.rs"]
pub mod devices;

pub const DEMO_TENANT: &str = "demo-store";

/// Idempotent: tables are created only if missing. Every primary key starts with the tenant, as
/// a multi-tenant schema's should: two tenants may use the same id, and a write under one
/// tenant's key cannot meet, or reveal, another tenant's row.
pub const SCHEMA_SQL: &str = r#"
create table if not exists public.products (
    tenant_id   text not null,
    id          uuid not null,
    sku         text not null,
    name        text not null,
    price_cents integer not null check (price_cents >= 0),
    stock       integer not null default 0,
    active      boolean not null default true,
    updated_at  timestamptz not null default now(),
    primary key (tenant_id, id)
);
create table if not exists public.customers (
    tenant_id  text not null,
    id         uuid not null,
    name       text not null,
    email      text,
    phone      text,
    loyalty_points integer not null default 0,
    primary key (tenant_id, id)
);
create table if not exists public.orders (
    tenant_id   text not null,
    id          uuid not null,
    store_id    text not null,
    customer_id uuid,
    status      text not null default 'open' check (status in ('open', 'paid', 'void', 'refunded')),
    total_cents integer not null default 0,
    employee_id text,
    created_at  timestamptz not null default now(),
    primary key (tenant_id, id)
);
create table if not exists public.order_lines (
    tenant_id        text not null,
    order_id         uuid not null,
    line_no          integer not null,
    product_id       uuid not null,
    quantity         integer not null check (quantity > 0),
    unit_price_cents integer not null,
    primary key (tenant_id, order_id, line_no)
);
"#;

/// The demo tables, as start-up registrations, with the label columns and value formats the
/// console shows them by.
pub fn tables() -> Vec<TableConfig> {
    use crate::config::ColumnFormat::{LocalTime, MoneyCents};
    let table = |name: &str, label: Option<&str>, formats: &[(&str, crate::config::ColumnFormat)]| TableConfig {
        name: name.into(),
        tenant_column: "tenant_id".into(),
        policy: MergePolicy::Lww,
        label_column: label.map(String::from),
        formats: formats.iter().map(|(c, f)| (c.to_string(), *f)).collect(),
    };
    vec![
        table("products", Some("name"), &[("price_cents", MoneyCents), ("updated_at", LocalTime)]),
        table("customers", Some("name"), &[]),
        table("orders", None, &[("total_cents", MoneyCents), ("created_at", LocalTime)]),
        table("order_lines", None, &[("unit_price_cents", MoneyCents)]),
    ]
}

pub async fn install_schema(pool: &PgPool) -> Result<()> {
    sqlx::raw_sql(SCHEMA_SQL).execute(pool).await?;
    Ok(())
}

/// A few products for the demo tenant, written as a back-office tool would (plain SQL, so
/// they enter the log through the capture trigger once the tables are registered).
pub async fn seed(pool: &PgPool) -> Result<()> {
    let products = [
        ("00000000-0000-4000-8000-000000000001", "ESP-01", "Espresso", 250),
        ("00000000-0000-4000-8000-000000000002", "FLW-01", "Flat white", 380),
        ("00000000-0000-4000-8000-000000000003", "CRS-01", "Croissant", 290),
    ];
    for (id, sku, name, price) in products {
        sqlx::query(
            "insert into public.products (tenant_id, id, sku, name, price_cents, stock) values ($1, $2::uuid, $3, $4, $5, 50) \
             on conflict (tenant_id, id) do nothing",
        )
        .bind(DEMO_TENANT)
        .bind(id)
        .bind(sku)
        .bind(name)
        .bind(price)
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// Tokens for two POS devices and a manager console, valid for `days`.
pub fn tokens(secret: &str, days: u64) -> Vec<(&'static str, String)> {
    let exp = crate::auth::unix_now() + days * 86_400;
    let mint = |sub: &str, role: &str, device: Option<&str>| {
        let mut claims = json!({"sub": sub, "role": role, "tenant_id": DEMO_TENANT, "exp": exp});
        if let Some(d) = device {
            claims["device_id"] = json!(d);
        }
        crate::auth::mint_hs256(secret, &claims)
    };
    vec![
        ("device pos-1 (Employee)", mint("employee-ana", "Employee", Some("pos-1"))),
        ("device pos-2 (Employee)", mint("employee-ben", "Employee", Some("pos-2"))),
        ("manager (Manager)", mint("manager-mia", "Manager", None)),
    ]
}
