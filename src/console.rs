//! The manager console at `/console`: static HTML, CSS and JavaScript modules built into the
//! binary, served with a strict Content-Security-Policy, plus `/console/config.json` (the claim
//! paths, manager roles and registered tables the page needs to describe a token and offer tables).

use std::sync::Arc;

use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use crate::server::Hub;

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
    etag: u64,
}

macro_rules! asset {
    ($name:literal, $ty:expr) => {
        Asset {
            name: $name,
            content_type: $ty,
            body: include_bytes!(concat!("../console/", $name)),
            etag: fnv1a(include_bytes!(concat!("../console/", $name))),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

static ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("app.css", "text/css; charset=utf-8"),
    asset!("app.js", JS),
    asset!("api.js", JS),
    asset!("catalog.js", JS),
    asset!("conflicts.js", JS),
    asset!("dom.js", JS),
    asset!("feed.js", JS),
    asset!("hub.js", JS),
    asset!("operations.js", JS),
    asset!("presence.js", JS),
    asset!("token.js", JS),
];

/// FNV-1a, at compile time: the ETag of an asset changes exactly when its bytes do.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    hash
}

/// Registers `/console`, `/console/` and `/console/{file}` (`config.json` and the assets).
pub fn configure(cfg: &mut web::ServiceConfig) {
    // The hub's root points a newcomer's browser at the console.
    cfg.route("/", web::get().to(|| async { HttpResponse::TemporaryRedirect().insert_header((header::LOCATION, "/console")).finish() }))
        .route("/console", web::get().to(index))
        .route("/console", web::head().to(index))
        .route("/console/", web::get().to(|| async { HttpResponse::PermanentRedirect().insert_header((header::LOCATION, "/console")).finish() }))
        .route("/console/config.json", web::get().to(config_json))
        .route("/console/{file}", web::get().to(file))
        .route("/console/{file}", web::head().to(file));
}

async fn index(req: HttpRequest) -> HttpResponse {
    serve(&req, &ASSETS[0])
}

async fn file(req: HttpRequest, name: web::Path<String>) -> HttpResponse {
    match ASSETS.iter().skip(1).find(|a| a.name == name.as_str()) {
        Some(asset) => serve(&req, asset),
        None => with_headers(&req, &mut HttpResponse::NotFound()).content_type("text/plain; charset=utf-8").body("not found"),
    }
}

/// What the page cannot learn from the token alone: where the hub reads tenant, user, role and
/// device in it, which roles review conflicts, and which tables are registered at start-up
/// (suggestions for subscriptions).
async fn config_json(req: HttpRequest, hub: web::Data<Arc<Hub>>) -> HttpResponse {
    let c = &hub.config;
    let tables: Vec<&str> = c.tables.iter().map(|t| t.name.as_str()).collect();
    let body = json!({
        "claims": {"tenant": c.claim_tenant, "user": c.claim_user, "role": c.claim_role, "device": c.claim_device},
        "tables": tables,
        "manager_roles": c.manager_roles,
    });
    with_headers(&req, &mut HttpResponse::Ok())
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .content_type("application/json")
        .body(body.to_string())
}

fn serve(req: &HttpRequest, asset: &Asset) -> HttpResponse {
    let etag = format!("\"{:016x}\"", asset.etag);
    let fresh = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|tag| tag.trim() == etag || tag.trim() == "*"));
    let mut builder = if fresh { HttpResponse::NotModified() } else { HttpResponse::Ok() };
    // `no-cache`: the browser may keep a copy but asks again each time (a 304 while the ETag
    // holds), so a new hub binary never runs with an old page.
    with_headers(req, builder.insert_header((header::CACHE_CONTROL, "no-cache")).insert_header((header::ETAG, etag)));
    if fresh {
        return builder.finish();
    }
    builder.content_type(asset.content_type).body(asset.body)
}

/// Security headers of every console response. The policy allows nothing but the console's
/// own files, and connections to this hub over HTTP(S) and WebSocket (`ws:`/`wss:` to the host
/// the page was loaded from, spelled out since not every browser lets `'self'` cover them).
fn with_headers<'a>(req: &HttpRequest, builder: &'a mut actix_web::HttpResponseBuilder) -> &'a mut actix_web::HttpResponseBuilder {
    let host = req.connection_info().host().to_owned();
    let mut connect = String::from("'self'");
    if is_plain_host(&host) {
        connect.push_str(&format!(" ws://{host} wss://{host}"));
    }
    let csp = format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src {connect}; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    );
    builder
        .insert_header((header::CONTENT_SECURITY_POLICY, HeaderValue::from_str(&csp).unwrap_or(HeaderValue::from_static("default-src 'none'"))))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::X_FRAME_OPTIONS, "DENY"))
}

/// A host (and port) that can go into the policy as it is: letters, digits, `.-:[]` only.
fn is_plain_host(host: &str) -> bool {
    !host.is_empty() && host.len() <= 255 && host.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_with_policy_syntax_are_left_out() {
        assert!(is_plain_host("127.0.0.1:8080"));
        assert!(is_plain_host("[::1]:8080"));
        assert!(is_plain_host("hub.example.com"));
        assert!(!is_plain_host("evil; script-src *"));
        assert!(!is_plain_host("a b"));
        assert!(!is_plain_host(""));
    }

    #[test]
    fn every_asset_has_a_type_and_a_distinct_etag() {
        let mut tags: Vec<u64> = ASSETS.iter().map(|a| a.etag).collect();
        tags.sort_unstable();
        tags.dedup();
        assert_eq!(tags.len(), ASSETS.len());
        assert_eq!(ASSETS[0].name, "index.html");
        assert!(ASSETS.iter().all(|a| !a.body.is_empty() && a.content_type.ends_with("charset=utf-8")));
    }
}
