// The token: read (not verified: the hub verifies it) to show who is signed in, and kept in
// sessionStorage only, so it goes away with the tab.

const KEY = 'synchub.console.token';

export function savedToken() {
  try {
    return sessionStorage.getItem(KEY);
  } catch {
    return null;
  }
}

export function saveToken(token) {
  try {
    sessionStorage.setItem(KEY, token);
  } catch {
    // Storage disabled: the session lasts as long as the page.
  }
}

export function forgetToken() {
  try {
    sessionStorage.removeItem(KEY);
  } catch {
    // nothing stored
  }
}

function base64UrlDecode(part) {
  const b64 = part.replace(/-/g, '+').replace(/_/g, '/').padEnd(Math.ceil(part.length / 4) * 4, '=');
  const binary = atob(b64);
  const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
  return new TextDecoder().decode(bytes);
}

/** A claim at a dotted path (`app_metadata.tenant_id`), or undefined. */
function claimAt(claims, path) {
  return path.split('.').reduce((obj, key) => (obj && typeof obj === 'object' ? obj[key] : undefined), claims);
}

/**
 * Decode a JWT's claims and read tenant, user, role and device at the hub's claim paths.
 * Throws an Error with a readable message when the text is not a JWT.
 */
export function describeToken(token, paths) {
  const parts = token.trim().split('.');
  if (parts.length !== 3 || parts[0] === '' || parts[1] === '') {
    throw new Error('This is not a JWT: expected three parts separated by dots.');
  }
  let claims;
  try {
    claims = JSON.parse(base64UrlDecode(parts[1]));
  } catch {
    throw new Error('The token’s payload is not readable JSON.');
  }
  if (!claims || typeof claims !== 'object') throw new Error('The token’s payload is not a JSON object.');
  const text = (v) => (v === undefined || v === null ? undefined : String(v));
  return {
    tenant: text(claimAt(claims, paths.tenant)),
    user: text(claimAt(claims, paths.user)),
    role: text(claimAt(claims, paths.role)),
    device: text(claimAt(claims, paths.device)),
    expiresAt: typeof claims.exp === 'number' ? new Date(claims.exp * 1000) : undefined,
  };
}
