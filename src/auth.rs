//! Token verification: JWT (HS256 secret, RS256/ES256 public keys from PEM or JWKS) → the
//! session's identity. Which claim holds tenant, user, role and device is configurable.
//! No database access here.

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use protocol::ErrorCode;
use std::sync::Arc;

use serde_json::Value;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::ids::{id_problem, DeviceId, TenantId, UserId};

/// Who a verified token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub tenant: TenantId,
    pub user: UserId,
    pub role: Arc<str>,
    /// Present when the token names a device; then the session must use it.
    pub device: Option<DeviceId>,
    /// `exp`, Unix seconds.
    pub expires_at: u64,
    /// Every claim of the token, for rules that compare rows with a claim.
    pub claims: Arc<Value>,
}

/// What a session keeps of its token once the rules' view is resolved: who it is, on which
/// device, and until when (no claims: a long-lived session does not need them).
pub struct SessionIdentity {
    pub tenant: TenantId,
    pub user: UserId,
    pub role: Arc<str>,
    pub device: DeviceId,
    /// `exp`, Unix seconds.
    pub expires_at: u64,
}

struct VerifyingKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

pub struct TokenVerifier {
    keys: Vec<VerifyingKey>,
    audience: Option<String>,
    issuer: Option<String>,
    leeway_secs: u64,
    claim_tenant: Vec<String>,
    claim_user: Vec<String>,
    claim_role: Vec<String>,
    claim_device: Vec<String>,
    /// Longest id a claim may hold (config `max_id_bytes`).
    max_id_bytes: usize,
    /// Role names seen in tokens, one allocation shared by every session with that role.
    roles: std::sync::RwLock<Vec<Arc<str>>>,
}

/// Distinct role names shared; past this many, a role is allocated per session (roles are
/// few in every design we serve, but their names come from tokens).
const MAX_SHARED_ROLES: usize = 64;

fn claim_path(path: &str) -> Vec<String> {
    path.split('.').map(str::to_owned).collect()
}

fn config_error(what: &str, err: impl std::fmt::Display) -> Error {
    Error::Config(format!("{what}: {err}"))
}

impl TokenVerifier {
    pub fn from_config(config: &Config) -> Result<TokenVerifier> {
        let mut keys = Vec::new();
        if !config.jwt_hs256_secret.0.is_empty() {
            keys.push(VerifyingKey {
                kid: None,
                algorithm: Algorithm::HS256,
                key: DecodingKey::from_secret(config.jwt_hs256_secret.0.as_bytes()),
            });
        }
        if let Some(path) = &config.jwt_public_key_file {
            let pem = std::fs::read(path).map_err(|e| config_error(&path.display().to_string(), e))?;
            let (algorithm, key) = match DecodingKey::from_rsa_pem(&pem) {
                Ok(key) => (Algorithm::RS256, key),
                Err(_) => (
                    Algorithm::ES256,
                    DecodingKey::from_ec_pem(&pem).map_err(|e| config_error("jwt_public_key_file is neither RSA nor EC PEM", e))?,
                ),
            };
            keys.push(VerifyingKey { kid: None, algorithm, key });
        }
        if let Some(path) = &config.jwt_jwks_file {
            let text = std::fs::read_to_string(path).map_err(|e| config_error(&path.display().to_string(), e))?;
            let set: JwkSet = serde_json::from_str(&text).map_err(|e| config_error("jwt_jwks_file", e))?;
            for jwk in &set.keys {
                let algorithm = match &jwk.algorithm {
                    AlgorithmParameters::RSA(_) => Algorithm::RS256,
                    AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                    _ => continue, // symmetric keys do not belong in a published key set
                };
                let key = DecodingKey::from_jwk(jwk).map_err(|e| config_error("jwt_jwks_file key", e))?;
                keys.push(VerifyingKey { kid: jwk.common.key_id.clone(), algorithm, key });
            }
        }
        if keys.is_empty() {
            return Err(Error::Config(
                "no token key configured: set jwt_hs256_secret, jwt_public_key_file or jwt_jwks_file".into(),
            ));
        }
        Ok(TokenVerifier {
            keys,
            audience: config.jwt_audience.clone(),
            issuer: config.jwt_issuer.clone(),
            leeway_secs: config.jwt_leeway_secs,
            claim_tenant: claim_path(&config.claim_tenant),
            claim_user: claim_path(&config.claim_user),
            claim_role: claim_path(&config.claim_role),
            claim_device: claim_path(&config.claim_device),
            max_id_bytes: config.max_id_bytes,
            roles: Default::default(),
        })
    }

    /// The shared copy of `role`.
    fn shared_role(&self, role: &str) -> Arc<str> {
        let find = |roles: &[Arc<str>]| roles.iter().find(|r| &***r == role).cloned();
        // unwrap: the lock is never held across a panic.
        if let Some(shared) = find(&self.roles.read().unwrap()) {
            return shared;
        }
        let mut roles = self.roles.write().unwrap();
        if let Some(shared) = find(&roles) {
            return shared;
        }
        let role: Arc<str> = Arc::from(role);
        if roles.len() < MAX_SHARED_ROLES {
            roles.push(role.clone());
        }
        role
    }

    /// An identity verified earlier (with the upgrade request), if its token has not expired
    /// since.
    pub fn still_valid(&self, identity: Identity) -> Result<Identity> {
        if identity.expires_at.saturating_add(self.leeway_secs) <= unix_now() {
            return Err(Error::client(ErrorCode::TokenExpired, "the upgrade request's token expired before hello"));
        }
        Ok(identity)
    }

    pub fn verify(&self, token: &str) -> Result<Identity> {
        let claims = self.verified_claims(token)?;
        self.identity_of(claims)
    }

    /// A Supabase API key (`apikey`): verified like any token, but it may name no tenant, as a
    /// project-wide anon key does; then `Ok(None)`, and the tenant comes from the channels'
    /// tokens. It must still carry the role claim, as Supabase Realtime requires.
    pub fn verify_api_key(&self, token: &str) -> Result<Option<Identity>> {
        let claims = self.verified_claims(token)?;
        let present = |path: &[String]| path.iter().try_fold(&claims, |v, part| v.get(part)).is_some_and(|v| !v.is_null());
        if present(&self.claim_tenant) {
            return self.identity_of(claims).map(Some);
        }
        if !present(&self.claim_role) {
            let path = self.claim_role.join(".");
            return Err(Error::client(ErrorCode::InvalidToken, format!("the key names no tenant and lacks the role claim `{path}`")));
        }
        Ok(None)
    }

    /// The claims of a token whose signature, expiry and (when configured) audience and issuer
    /// hold.
    fn verified_claims(&self, token: &str) -> Result<Value> {
        let invalid = |msg: String| Error::client(ErrorCode::InvalidToken, msg);
        let header = decode_header(token).map_err(|e| invalid(format!("token header: {e}")))?;
        let key = self
            .keys
            .iter()
            .find(|k| k.algorithm == header.alg && (k.kid.is_none() || k.kid == header.kid))
            .ok_or_else(|| invalid(format!("no key for algorithm {:?} and kid {:?}", header.alg, header.kid)))?;
        let mut validation = Validation::new(key.algorithm);
        validation.leeway = self.leeway_secs;
        validation.validate_nbf = true;
        // A configured audience or issuer is required, not only checked when present.
        let mut required = vec!["exp"];
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        let data = decode::<Value>(token, &key.key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature | ErrorKind::ImmatureSignature => {
                    Error::client(ErrorCode::TokenExpired, "token expired or not yet valid")
                }
                _ => invalid(format!("token rejected: {e}")),
            }
        })?;
        Ok(data.claims)
    }

    fn identity_of(&self, claims: Value) -> Result<Identity> {
        let invalid = |msg: String| Error::client(ErrorCode::InvalidToken, msg);
        let text = |path: &[String], name: &str| -> Result<Option<String>> {
            let mut value = &claims;
            for part in path {
                match value.get(part) {
                    Some(v) => value = v,
                    None => return Ok(None),
                }
            }
            match value {
                Value::String(s) if !s.is_empty() => Ok(Some(s.clone())),
                Value::Number(n) => Ok(Some(n.to_string())),
                Value::Null => Ok(None),
                _ => Err(invalid(format!("claim {name} is not a string"))),
            }
        };
        let required = |path: &[String], name: &str| -> Result<String> {
            text(path, name)?.ok_or_else(|| invalid(format!("token lacks the {name} claim `{}`", path.join("."))))
        };
        // Ids become Postgres settings and indexed text values (see `id_problem`).
        let checked = |value: String, name: &str| -> Result<String> {
            match id_problem(&value, self.max_id_bytes) {
                Some(problem) => Err(invalid(format!("the {name} claim {problem}"))),
                None => Ok(value),
            }
        };
        let tenant = checked(required(&self.claim_tenant, "tenant")?, "tenant")?;
        let user = checked(required(&self.claim_user, "user")?, "user")?;
        let role = checked(required(&self.claim_role, "role")?, "role")?;
        let device = text(&self.claim_device, "device")?.map(|d| checked(d, "device")).transpose()?;
        let expires_at = numeric_date(claims.get("exp")).ok_or_else(|| invalid("exp is not a NumericDate".into()))?;
        Ok(Identity {
            tenant: TenantId::new(tenant),
            user: UserId::new(user),
            role: self.shared_role(&role),
            device: device.map(DeviceId::new),
            expires_at,
            claims: Arc::new(claims),
        })
    }
}

/// A NumericDate claim (RFC 7519 §2: seconds since the epoch, a JSON number that may be
/// fractional) as whole Unix seconds, rounded down: a token is never taken to live longer than
/// it says. A date before 1970 is 0. `None` when the claim is not a number.
fn numeric_date(claim: Option<&Value>) -> Option<u64> {
    let Value::Number(n) = claim? else { return None };
    Some(match (n.as_u64(), n.as_f64()) {
        (Some(whole), _) => whole,
        // `as` saturates: past u64::MAX is u64::MAX, negative is 0.
        (None, Some(seconds)) if seconds.is_finite() => seconds.floor() as u64,
        _ => return None,
    })
}

/// Mint an HS256 token (used by `synchub dev` to print ready-made tokens, and by tests).
pub fn mint_hs256(secret: &str, claims: &Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    // unwrap: HS256 signing of a JSON object cannot fail.
    jsonwebtoken::encode(&jsonwebtoken::Header::new(Algorithm::HS256), claims, &key).expect("HS256 signs")
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn verifier(config: Config) -> TokenVerifier {
        TokenVerifier::from_config(&config).unwrap()
    }

    fn hs_config() -> Config {
        Config { jwt_hs256_secret: crate::config::Secret("s3cret".into()), ..Config::default() }
    }

    #[test]
    fn reads_identity_from_configured_claims() {
        let config = Config {
            claim_tenant: "app_metadata.tenant_id".into(),
            jwt_audience: Some("authenticated".into()),
            ..hs_config()
        };
        let token = mint_hs256(
            "s3cret",
            &json!({"sub": "u1", "role": "Manager", "aud": "authenticated", "exp": unix_now() + 60,
                    "app_metadata": {"tenant_id": "t-9"}, "device_id": "pos-1"}),
        );
        let id = verifier(config).verify(&token).unwrap();
        assert_eq!(id.tenant.as_str(), "t-9");
        assert_eq!(id.user.as_str(), "u1");
        assert_eq!(&*id.role, "Manager");
        assert_eq!(id.device.unwrap().as_str(), "pos-1");
    }

    #[test]
    fn sessions_with_the_same_role_share_its_name_up_to_a_bound() {
        let v = verifier(hs_config());
        let role_of = |role: &str| {
            let token = mint_hs256("s3cret", &json!({"sub": "u", "role": role, "tenant_id": "t", "exp": unix_now() + 60}));
            v.verify(&token).unwrap().role
        };
        let (first, second, other) = (role_of("Employee"), role_of("Employee"), role_of("Manager"));
        assert!(Arc::ptr_eq(&first, &second));
        assert!(!Arc::ptr_eq(&first, &other));
        for n in 0..MAX_SHARED_ROLES {
            role_of(&format!("role-{n}"));
        }
        assert_eq!(v.roles.read().unwrap().len(), MAX_SHARED_ROLES);
        assert!(!Arc::ptr_eq(&role_of("past-the-bound"), &role_of("past-the-bound")));
        assert_eq!(&*role_of("past-the-bound"), "past-the-bound");
    }

    #[test]
    fn refuses_expired_wrong_audience_wrong_key_and_missing_tenant() {
        let v = verifier(Config { jwt_audience: Some("hub".into()), ..hs_config() });
        let base = json!({"sub": "u", "role": "Employee", "tenant_id": "t", "aud": "hub", "exp": unix_now() + 60});
        assert!(v.verify(&mint_hs256("s3cret", &base)).is_ok());

        let mut expired = base.clone();
        expired["exp"] = json!(unix_now() - 3600);
        assert_eq!(v.verify(&mint_hs256("s3cret", &expired)).unwrap_err().code(), ErrorCode::TokenExpired);

        let mut aud = base.clone();
        aud["aud"] = json!("other");
        assert_eq!(v.verify(&mint_hs256("s3cret", &aud)).unwrap_err().code(), ErrorCode::InvalidToken);

        assert_eq!(v.verify(&mint_hs256("wrong", &base)).unwrap_err().code(), ErrorCode::InvalidToken);

        let mut no_tenant = base.clone();
        no_tenant.as_object_mut().unwrap().remove("tenant_id");
        assert_eq!(v.verify(&mint_hs256("s3cret", &no_tenant)).unwrap_err().code(), ErrorCode::InvalidToken);

        let mut nul = base.clone();
        nul["tenant_id"] = json!("t\u{0}x");
        assert_eq!(v.verify(&mint_hs256("s3cret", &nul)).unwrap_err().code(), ErrorCode::InvalidToken);

        let mut future = base;
        future["nbf"] = json!(unix_now() + 3600);
        assert_eq!(v.verify(&mint_hs256("s3cret", &future)).unwrap_err().code(), ErrorCode::TokenExpired);
    }

    #[test]
    fn a_fractional_exp_is_a_numeric_date() {
        let v = verifier(hs_config());
        let exp = unix_now() + 3600;
        let token = mint_hs256("s3cret", &json!({"sub": "u", "role": "r", "tenant_id": "t", "exp": exp as f64 + 0.5}));
        assert_eq!(v.verify(&token).unwrap().expires_at, exp);
        let past = mint_hs256("s3cret", &json!({"sub": "u", "role": "r", "tenant_id": "t", "exp": (unix_now() - 3600) as f64 + 0.25}));
        assert_eq!(v.verify(&past).unwrap_err().code(), ErrorCode::TokenExpired);
        let text = mint_hs256("s3cret", &json!({"sub": "u", "role": "r", "tenant_id": "t", "exp": exp.to_string()}));
        assert_eq!(v.verify(&text).unwrap_err().code(), ErrorCode::InvalidToken);
        assert_eq!(numeric_date(Some(&json!(1e300))), Some(u64::MAX));
        assert_eq!(numeric_date(Some(&json!(-5.5))), Some(0));
        assert_eq!(numeric_date(Some(&json!(null))), None);
    }

    #[test]
    fn a_configured_audience_and_issuer_are_required() {
        let v = verifier(Config { jwt_audience: Some("hub".into()), jwt_issuer: Some("idp".into()), ..hs_config() });
        let base = json!({"sub": "u", "role": "r", "tenant_id": "t", "aud": "hub", "iss": "idp", "exp": unix_now() + 60});
        assert!(v.verify(&mint_hs256("s3cret", &base)).is_ok());
        for claim in ["aud", "iss"] {
            let mut without = base.clone();
            without.as_object_mut().unwrap().remove(claim);
            assert_eq!(v.verify(&mint_hs256("s3cret", &without)).unwrap_err().code(), ErrorCode::InvalidToken, "{claim}");
        }
    }

    #[test]
    fn ids_postgres_cannot_store_are_refused_in_every_claim() {
        let v = verifier(Config { max_id_bytes: 8, ..hs_config() });
        let base = json!({"sub": "u", "role": "r", "tenant_id": "t", "device_id": "d", "exp": unix_now() + 60});
        assert!(v.verify(&mint_hs256("s3cret", &base)).is_ok());
        for claim in ["sub", "role", "tenant_id", "device_id"] {
            for bad in ["a\u{0}b", "a\nb", "123456789"] {
                let mut token = base.clone();
                token[claim] = json!(bad);
                assert_eq!(v.verify(&mint_hs256("s3cret", &token)).unwrap_err().code(), ErrorCode::InvalidToken, "{claim} = {bad:?}");
            }
        }
    }

    fn es256_token(kid: Option<&str>) -> String {
        let key = jsonwebtoken::EncodingKey::from_ec_pem(include_bytes!("../tests/fixtures/ec_private.pem")).unwrap();
        let mut header = jsonwebtoken::Header::new(Algorithm::ES256);
        header.kid = kid.map(str::to_owned);
        let claims = json!({"sub": "u", "role": "Manager", "tenant_id": "t", "exp": unix_now() + 60});
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    }

    #[test]
    fn es256_from_pem_and_from_jwks() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let pem = verifier(Config { jwt_public_key_file: Some(fixtures.join("ec_public.pem")), ..Config::default() });
        assert_eq!(pem.verify(&es256_token(None)).unwrap().tenant.as_str(), "t");
        let jwks = verifier(Config { jwt_jwks_file: Some(fixtures.join("jwks.json")), ..Config::default() });
        assert_eq!(jwks.verify(&es256_token(Some("test-key-1"))).unwrap().role.as_ref(), "Manager");
        assert_eq!(jwks.verify(&es256_token(Some("other-kid"))).unwrap_err().code(), ErrorCode::InvalidToken);
        // An HS256 token is refused where only public keys are configured.
        let hs = mint_hs256("x", &json!({"sub": "u", "role": "r", "tenant_id": "t", "exp": unix_now() + 60}));
        assert_eq!(pem.verify(&hs).unwrap_err().code(), ErrorCode::InvalidToken);
    }

    #[test]
    fn no_key_is_a_config_error() {
        assert!(TokenVerifier::from_config(&Config::default()).is_err());
    }
}
