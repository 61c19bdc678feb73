//! What must hold for any token a client presents (`TokenVerifier::verify` with an HS256 key):
//! no panic; only the documented codes (`invalid_token`, `token_expired`); nothing verifies
//! without its exact signature; and a signed token's claims are read as the configuration says
//! (tenant, user, role and device as text an id can hold, `exp` as the NumericDate RFC 7519
//! defines), with a comfortably valid token always accepted.

// Each includer uses a part: the fuzz targets leave out the seeds.
#![allow(dead_code)]

use std::sync::OnceLock;

use jsonwebtoken::{Algorithm, DecodingKey};
use protocol::ErrorCode;
use serde_json::{json, Value};
use synchub::auth::{mint_hs256, unix_now, TokenVerifier};
use synchub::config::{Config, Secret};

use super::draw::Draw;

pub const SECRET: &str = "fuzz-secret";

/// A verifier and the claim paths and checks it was configured with.
pub struct Setup {
    pub verifier: TokenVerifier,
    tenant: &'static [&'static str],
    audience: Option<&'static str>,
    issuer: Option<&'static str>,
}

/// The default claims, and nested tenant claims with an audience, an issuer and no leeway.
fn setups() -> &'static [Setup; 2] {
    static SETUPS: OnceLock<[Setup; 2]> = OnceLock::new();
    SETUPS.get_or_init(|| {
        let plain = Config { jwt_hs256_secret: Secret(SECRET.into()), ..Config::default() };
        let strict = Config {
            jwt_audience: Some("hub".into()),
            jwt_issuer: Some("issuer".into()),
            jwt_leeway_secs: 0,
            claim_tenant: "app_metadata.tenant_id".into(),
            ..plain.clone()
        };
        let verifier = |config: &Config| TokenVerifier::from_config(config).expect("an HS256 verifier");
        [
            Setup { verifier: verifier(&plain), tenant: &["tenant_id"], audience: None, issuer: None },
            Setup { verifier: verifier(&strict), tenant: &["app_metadata", "tenant_id"], audience: Some("hub"), issuer: Some("issuer") },
        ]
    })
}

const CLAIMS: &[&str] = &["sub", "role", "tenant_id", "device_id", "exp", "nbf", "aud", "iss", "app_metadata"];

/// Body of the `auth` target. The first byte picks what the rest is: a token's text, bytes
/// that draw changes to a valid set of claims, or claims as JSON text; the second picks the
/// configuration. Claims are signed with the key, so they reach claim parsing.
pub fn auth(bytes: &[u8]) {
    let mut draw = Draw::new(bytes);
    let mode = draw.byte() % 3;
    let setup = &setups()[usize::from(draw.byte() & 1)];
    match mode {
        0 => check_token(setup, &String::from_utf8_lossy(draw.rest()), None),
        1 => {
            let claims = drawn_claims(&mut draw, setup);
            check_token(setup, &mint_hs256(SECRET, &claims), Some(&claims));
        }
        _ => {
            if let Ok(claims) = serde_json::from_slice::<Value>(draw.rest()) {
                check_token(setup, &mint_hs256(SECRET, &claims), Some(&claims));
            }
        }
    }
}

/// Claims that pass every check of `setup`, then up to four drawn changes.
fn drawn_claims(draw: &mut Draw, setup: &Setup) -> Value {
    let now = unix_now();
    let mut claims = json!({"sub": "u1", "role": "Employee", "device_id": "pos-1", "exp": now + 3600});
    set_path(&mut claims, setup.tenant, json!("acme"));
    if let Some(aud) = setup.audience {
        claims["aud"] = json!(aud);
    }
    if let Some(iss) = setup.issuer {
        claims["iss"] = json!(iss);
    }
    for _ in 0..draw.below(5) {
        let claim = *draw.pick(CLAIMS);
        let value = match (claim, draw.below(4)) {
            (_, 0) => {
                claims.as_object_mut().expect("claims are an object").remove(claim);
                continue;
            }
            ("exp" | "nbf", 1) => {
                let offset = draw.below(8000) as f64 - 4000.0;
                let fraction = [0.0, 0.25, 0.5, 0.75][draw.below(4)];
                json!(now as f64 + offset + fraction)
            }
            ("exp" | "nbf", 2) => json!((now as i64).wrapping_add(draw.u64() as i64 % 100_000)),
            ("app_metadata", 1 | 2) => json!({"tenant_id": draw.value(1)}),
            _ => draw.value(2),
        };
        claims[claim] = value;
    }
    claims
}

fn set_path(claims: &mut Value, path: &[&str], value: Value) {
    match path {
        [last] => claims[*last] = value,
        [first, rest @ ..] => {
            if !claims.get(*first).is_some_and(Value::is_object) {
                claims[*first] = json!({});
            }
            set_path(&mut claims[*first], rest, value)
        }
        [] => {}
    }
}

/// The claim at `path` as the hub reads it: `Ok(None)` when absent or null, `Err` when it is
/// not text (a non-empty string or a number).
fn text(claims: &Value, path: &[&str]) -> Result<Option<String>, ()> {
    let mut value = claims;
    for part in path {
        match value.get(*part) {
            Some(v) => value = v,
            None => return Ok(None),
        }
    }
    match value {
        Value::String(s) if !s.is_empty() => Ok(Some(s.clone())),
        Value::Number(n) => Ok(Some(n.to_string())),
        Value::Null => Ok(None),
        _ => Err(()),
    }
}

/// Verify `token`; `claims` are what it was signed with (`None`: a token from elsewhere).
fn check_token(setup: &Setup, token: &str, claims: Option<&Value>) {
    let verified = setup.verifier.verify(token);
    let identity = match verified {
        Err(err) => {
            assert!(matches!(err.code(), ErrorCode::InvalidToken | ErrorCode::TokenExpired), "code {:?} for {token:?}: {err}", err.code());
            if let Some(claims) = claims {
                assert!(!err.to_string().contains("InvalidSignature"), "a signed token failed its signature: {err}");
                assert!(!comfortably_valid(setup, claims), "valid claims refused ({err}): {claims}");
            }
            return;
        }
        Ok(identity) => identity,
    };
    // Nothing verifies without the key's exact signature.
    let (message, signature) = token.rsplit_once('.').expect("a verified token has a signature");
    let key = DecodingKey::from_secret(SECRET.as_bytes());
    assert_eq!(jsonwebtoken::crypto::verify(signature, message.as_bytes(), &key, Algorithm::HS256).ok(), Some(true), "{token:?} verified");
    let claims = claims.cloned().unwrap_or_else(|| (*identity.claims).clone());
    assert_eq!(*identity.claims, claims, "the identity keeps the signed claims");
    let context = format!("claims {claims}");
    assert_eq!(text(&claims, setup.tenant), Ok(Some(identity.tenant.as_str().to_owned())), "tenant; {context}");
    let device = identity.device.as_ref().map(|d| d.as_str());
    for id in [identity.tenant.as_str(), identity.user.as_str(), &identity.role].into_iter().chain(device) {
        assert!(storable(id), "an id Postgres cannot store or index: {id:?}; {context}");
    }
    assert_eq!(text(&claims, &["sub"]), Ok(Some(identity.user.as_str().to_owned())), "user; {context}");
    assert_eq!(text(&claims, &["role"]), Ok(Some(identity.role.to_string())), "role; {context}");
    assert_eq!(text(&claims, &["device_id"]), Ok(identity.device.as_ref().map(|d| d.as_str().to_owned())), "device; {context}");
    // RFC 7519 NumericDate: seconds, possibly with a fraction.
    let exp = claims["exp"].as_f64().expect("a verified token has a numeric exp");
    assert!((identity.expires_at as f64 - exp).abs() < 1.0, "expires_at {} for exp {exp}; {context}", identity.expires_at);
}

/// Whether an id can be stored and indexed: no control character (U+0000 included), at most
/// `max_id_bytes` (default 256).
fn storable(id: &str) -> bool {
    !id.is_empty() && id.len() <= Config::default().max_id_bytes && !id.chars().any(char::is_control)
}

/// Claims every configuration must accept: storable text identity claims, an integer `exp` well
/// ahead, no `nbf` or one well past, and the audience and issuer asked for.
fn comfortably_valid(setup: &Setup, claims: &Value) -> bool {
    let now = unix_now();
    let is_text = |path: &[&str]| matches!(text(claims, path), Ok(Some(id)) if storable(&id));
    let tenant_ok = is_text(setup.tenant);
    let exp_ok = claims.get("exp").and_then(Value::as_u64).is_some_and(|exp| exp > now + 120);
    let nbf_ok = claims.get("nbf").map_or(true, |nbf| nbf.as_u64().is_some_and(|nbf| nbf.saturating_add(120) < now));
    let matches_or_absent = |claim: &str, wanted: Option<&str>| match (claims.get(claim), wanted) {
        (None, _) => wanted.is_none(),
        (Some(Value::String(s)), Some(w)) => s == w,
        (Some(Value::String(_)), None) => true,
        _ => false,
    };
    claims.is_object()
        && tenant_ok
        && is_text(&["role"])
        && claims.get("sub").is_some_and(|s| s.as_str().is_some_and(storable))
        && text(claims, &["device_id"]).is_ok_and(|device| device.as_deref().map_or(true, storable))
        && exp_ok
        && nbf_ok
        && matches_or_absent("aud", setup.audience)
        && matches_or_absent("iss", setup.issuer)
}

/// Seeds: golden client frames taken as claims; valid claims for each configuration as bytes
/// of the drawing mode; and minted tokens, valid and tampered with.
pub fn seeds(testdata: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    for (name, bytes) in super::frames::seeds(testdata, protocol::Encoding::Json) {
        seeds.push((format!("claims-{name}"), [&[2u8, 0][..], &bytes].concat()));
    }
    for setup in 0..2u8 {
        seeds.push((format!("drawn-valid-{setup}"), vec![1, setup]));
        seeds.push((format!("drawn-changed-{setup}"), vec![1, setup, 3, 0, 4, 0, 1, 0, 0x40, 0x1f]));
        let claims = drawn_claims(&mut Draw::new(&[]), &setups()[usize::from(setup)]);
        let claims = serde_json::to_vec(&claims).expect("claims encode");
        seeds.push((format!("claims-valid-{setup}"), [&[2u8, setup][..], &claims].concat()));
        let token = mint_hs256(SECRET, &serde_json::from_slice::<Value>(&claims).expect("claims decode"));
        seeds.push((format!("token-valid-{setup}"), [&[0u8, setup][..], token.as_bytes()].concat()));
        let tampered = token.replacen("eyJ", "eyK", 1);
        seeds.push((format!("token-tampered-{setup}"), [&[0u8, setup][..], tampered.as_bytes()].concat()));
    }
    seeds
}
