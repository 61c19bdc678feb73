//! Device tokens: minted from the hub's HS256 secret, or read one per line from a file.

use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;

use crate::error::{LoadError, Result};

pub enum TokenSource {
    /// Mint a token per device with the hub's shared secret (claims as `synchub dev` uses).
    Secret(String),
    /// Pre-made tokens, used round-robin; each must name its device or the client sends one.
    File(Vec<String>),
}

impl TokenSource {
    pub fn from_args(secret: Option<String>, secret_file: Option<std::path::PathBuf>, tokens_file: Option<std::path::PathBuf>) -> Result<TokenSource> {
        if let Some(path) = tokens_file {
            let text = std::fs::read_to_string(&path)?;
            let tokens: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
            if tokens.is_empty() {
                return Err(LoadError::Usage(format!("{} holds no tokens", path.display())));
            }
            return Ok(TokenSource::File(tokens));
        }
        if let Some(secret) = secret {
            return Ok(TokenSource::Secret(secret));
        }
        if let Some(path) = secret_file {
            return Ok(TokenSource::Secret(std::fs::read_to_string(path)?.trim().to_string()));
        }
        Err(LoadError::Usage("give --secret, --secret-file or --tokens-file".into()))
    }

    /// The token for device number `n` of `tenant` (user `user-<device>`).
    pub fn token(&self, tenant: &str, device: &str, n: usize, role: &str) -> String {
        match self {
            TokenSource::File(tokens) => tokens[n % tokens.len()].clone(),
            TokenSource::Secret(_) => self.token_for(tenant, device, &format!("user-{device}"), role),
        }
    }

    /// A token naming `tenant`, `device`, `user` and `role`, valid for a day (minted only; with
    /// a tokens file, the file's first token).
    pub fn token_for(&self, tenant: &str, device: &str, user: &str, role: &str) -> String {
        match self {
            TokenSource::File(tokens) => tokens[0].clone(),
            TokenSource::Secret(secret) => {
                let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) + 24 * 3600;
                let claims = json!({"sub": user, "role": role, "tenant_id": tenant, "device_id": device, "exp": exp});
                // unwrap: HS256 with a JSON object always encodes.
                encode(&Header::default(), &claims, &EncodingKey::from_secret(secret.as_bytes())).expect("token encodes")
            }
        }
    }
}
