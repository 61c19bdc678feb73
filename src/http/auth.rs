//! Who calls the HTTP API: a reviewer with a JWT whose role is in `manager_roles`, or a
//! server-side writer with one of the configured service tokens (compared in constant time).

use std::future::{ready, Ready};
use std::sync::Arc;

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{web, FromRequest, HttpRequest};
use protocol::ErrorCode;

use super::error::ApiError;
use crate::auth::Identity;
use crate::config::ServiceToken;
use crate::ids::TenantId;
use crate::server::Hub;

/// The bearer token of `Authorization: Bearer <token>`.
pub(crate) fn bearer(req: &HttpRequest) -> Result<&str, ApiError> {
    let missing = || ApiError::new(ErrorCode::InvalidToken, "send Authorization: Bearer <token>");
    let value = req.headers().get(header::AUTHORIZATION).ok_or_else(missing)?.to_str().map_err(|_| missing())?;
    let (scheme, token) = value.split_once(' ').ok_or_else(missing)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(missing());
    }
    Ok(token)
}

fn hub(req: &HttpRequest) -> Result<Arc<Hub>, ApiError> {
    req.app_data::<web::Data<Arc<Hub>>>()
        .map(|d| d.get_ref().clone())
        .ok_or_else(|| ApiError::new(ErrorCode::Internal, "hub state missing"))
}

/// A verified token of any role (within the tenant's HTTP rate). The tenant is the token's.
pub struct Member(pub Identity);

impl Member {
    fn from_request(req: &HttpRequest) -> Result<Member, ApiError> {
        let hub = hub(req)?;
        let identity = hub.verifier.verify(bearer(req)?)?;
        hub.limits.http(&identity.tenant)?;
        Ok(Member(identity))
    }
}

impl FromRequest for Member {
    type Error = ApiError;
    type Future = Ready<Result<Member, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(Member::from_request(req))
    }
}

/// A verified token whose role may review conflicts. The tenant is the token's.
pub struct Manager(pub Identity);

impl Manager {
    fn from_request(req: &HttpRequest) -> Result<Manager, ApiError> {
        let hub = hub(req)?;
        let identity = hub.verifier.verify(bearer(req)?)?;
        hub.limits.http(&identity.tenant)?;
        if !hub.config.is_manager(&identity.role) {
            return Err(ApiError::new(ErrorCode::Forbidden, format!("role `{}` may not review conflicts", identity.role)));
        }
        Ok(Manager(identity))
    }
}

impl FromRequest for Manager {
    type Error = ApiError;
    type Future = Ready<Result<Manager, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(Manager::from_request(req))
    }
}

/// A server-side writer, identified by its service token.
pub struct ServiceWriter {
    pub name: String,
    tenants: Vec<String>,
}

impl ServiceWriter {
    fn from_request(req: &HttpRequest) -> Result<ServiceWriter, ApiError> {
        let hub = hub(req)?;
        let given = bearer(req)?.as_bytes();
        // Every configured token is compared, whatever matched, so timing tells nothing.
        let mut found: Option<&ServiceToken> = None;
        for service in &hub.config.service_tokens {
            if constant_time_eq(service.token.0.as_bytes(), given) {
                found = Some(service);
            }
        }
        let service = found.ok_or_else(|| ApiError::new(ErrorCode::InvalidToken, "unknown service token"))?;
        Ok(ServiceWriter { name: service.name.clone(), tenants: service.tenants.clone() })
    }

    /// Refuse a tenant outside the token's `tenants` (empty: every tenant).
    pub fn check_tenant(&self, tenant: &TenantId) -> Result<(), ApiError> {
        if self.tenants.is_empty() || self.tenants.iter().any(|t| t == tenant.as_str()) {
            Ok(())
        } else {
            Err(ApiError::new(ErrorCode::Forbidden, format!("service `{}` may not write to tenant `{tenant}`", self.name)))
        }
    }
}

impl FromRequest for ServiceWriter {
    type Error = ApiError;
    type Future = Ready<Result<ServiceWriter, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(ServiceWriter::from_request(req))
    }
}

/// Equality whose time depends on the lengths only, not on where the bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= u64::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_equality() {
        assert!(constant_time_eq(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcdef", b"0123456789abcdeF"));
        assert!(!constant_time_eq(b"0123456789abcdef", b"0123456789abcde"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
