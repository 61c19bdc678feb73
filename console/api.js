// The hub's HTTP API (conflict review), with the token as a Bearer credential. Errors come back
// as ApiError carrying the API's {"code","message"}.

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }

  /** "conflict_not_open: The conflict was already resolved" (or a plain text for network errors). */
  describe() {
    return this.code ? `${this.message} (${this.code}${this.status ? `, HTTP ${this.status}` : ''})` : this.message;
  }
}

export class Api {
  constructor(token) {
    this.token = token;
  }

  /** The response of a GET, or ApiError (network, or the API's {"code","message"}). */
  async fetchOk(path, accept) {
    let response;
    try {
      response = await fetch(path, { headers: { Authorization: `Bearer ${this.token}`, Accept: accept }, cache: 'no-store' });
    } catch {
      throw new ApiError(0, 'network', 'The hub could not be reached. Check the connection and try again.');
    }
    if (!response.ok) {
      const data = await response.json().catch(() => null);
      if (data && typeof data.code === 'string') throw new ApiError(response.status, data.code, data.message || data.code);
      throw new ApiError(response.status, 'http_error', `The hub answered HTTP ${response.status}.`);
    }
    return response;
  }

  /** Every conflict the filters ({status, table}) match, as CSV text in a Blob. */
  async exportCsv(filters = {}) {
    const query = new URLSearchParams();
    for (const [k, v] of Object.entries(filters)) {
      if (v !== undefined && v !== null && v !== '') query.set(k, String(v));
    }
    const qs = query.toString();
    const response = await this.fetchOk(`/v1/conflicts/export.csv${qs ? `?${qs}` : ''}`, 'text/csv');
    return response.blob();
  }

  async request(method, path, body) {
    let response;
    try {
      response = await fetch(path, {
        method,
        headers: {
          Authorization: `Bearer ${this.token}`,
          Accept: 'application/json',
          ...(body === undefined ? {} : { 'Content-Type': 'application/json' }),
        },
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: 'no-store',
      });
    } catch {
      throw new ApiError(0, 'network', 'The hub could not be reached. Check the connection and try again.');
    }
    const text = await response.text();
    let data;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = null;
    }
    if (!response.ok) {
      if (data && typeof data.code === 'string') {
        throw new ApiError(response.status, data.code, data.message || data.code);
      }
      const what = response.status === 404 ? 'This hub does not offer conflict review (no such endpoint).' : `The hub answered HTTP ${response.status}.`;
      throw new ApiError(response.status, response.status === 404 ? 'not_available' : 'http_error', what);
    }
    if (data === null) throw new ApiError(response.status, 'bad_response', 'The hub sent a response that is not JSON.');
    return data;
  }

  counts() {
    return this.request('GET', '/v1/conflicts/counts');
  }

  /** The synced tables: key, columns, label column and formats (GET /v1/catalog). */
  catalog() {
    return this.request('GET', '/v1/catalog');
  }

  /** filters: {status, table, before_id, limit}; empty values are left out. */
  conflicts(filters = {}) {
    const query = new URLSearchParams();
    for (const [k, v] of Object.entries(filters)) {
      if (v !== undefined && v !== null && v !== '') query.set(k, String(v));
    }
    const qs = query.toString();
    return this.request('GET', `/v1/conflicts${qs ? `?${qs}` : ''}`);
  }

  conflict(id) {
    return this.request('GET', `/v1/conflicts/${encodeURIComponent(id)}`);
  }

  /** Resolve many: action "keep" | "take_other" | "dismiss", for these ids. */
  resolveMany(action, ids) {
    return this.request('POST', '/v1/conflicts/resolve', { action, ids });
  }

  /** action: {action: "keep"} | {action: "take_other"} | {action: "value", value}. */
  resolve(id, action) {
    return this.request('POST', `/v1/conflicts/${encodeURIComponent(id)}/resolve`, action);
  }
}
