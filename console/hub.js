// The console's WebSocket to the hub: a dashboard session (protocol section 13) that says
// hello, keeps its subscriptions across reconnects, and reconnects with backoff unless the
// close code says not to (protocol section 8, close codes).

/** Close codes after which reconnecting with the same token cannot help. */
const FINAL_CLOSES = new Map([
  [4001, 'The hub refused the token.'],
  [4002, 'The token expired.'],
  [4003, 'This console and the hub share no protocol version.'],
  [4010, 'Another session replaced this one.'],
]);

const PING_EVERY_MS = 25000;
const PONG_WAIT_MS = 10000;

export class HubSocket {
  /**
   * handlers: {
   *   frame(frame)                 every hub frame after welcome (sub_rows, presence, ...)
   *   status(state, detail)        'connecting' | 'open' | 'waiting' (detail: {delayMs, attempt, reason}) | 'stopped' (detail: {reason, code})
   *   welcome(frame, reconnected)  after each successful hello; subscriptions are being re-sent
   *   refused(spec, error)         a subscription re-sent after a reconnect was refused (and dropped)
   * }
   * Replies to requests reach both the request's promise and frame(): `frame` handlers ignore
   * `error` frames that carry an id, since the request's caller reports them.
   */
  constructor(url, token, handlers) {
    this.url = url;
    this.token = token;
    this.handlers = handlers;
    this.ws = null;
    this.nextId = 1;
    this.pending = new Map();
    this.subs = new Map(); // name -> subscribe frame (without id), in order of creation
    this.attempt = 0;
    this.stopped = false;
    this.timer = null;
    this.pingTimer = null;
    this.welcomed = false;
    this.everWelcomed = false;
  }

  start() {
    this.stopped = false;
    this.open();
  }

  /** Close for good (sign out). */
  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    clearInterval(this.pingTimer);
    if (this.ws) this.ws.close(1000, 'signed out');
    this.ws = null;
    this.failPending('signed out');
  }

  open() {
    clearTimeout(this.timer);
    this.welcomed = false;
    this.handlers.status('connecting', { attempt: this.attempt });
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (err) {
      this.handlers.status('stopped', { reason: `Cannot open the WebSocket: ${err.message}` });
      return;
    }
    this.ws = ws;
    let lastError = null;
    ws.addEventListener('open', () => {
      const id = this.nextId++;
      this.helloId = id;
      this.sendRaw({ type: 'hello', id, versions: [1], token: this.token, mode: 'dashboard' });
    });
    ws.addEventListener('message', (event) => {
      if (typeof event.data !== 'string') return; // a JSON session gets text frames only
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      if (frame.type === 'error' && !this.welcomed) lastError = frame;
      this.onFrame(frame);
    });
    ws.addEventListener('close', (event) => {
      if (this.ws !== ws) return;
      this.ws = null;
      clearInterval(this.pingTimer);
      this.failPending('the connection closed');
      if (this.stopped) return;
      const final = FINAL_CLOSES.get(event.code);
      if (final) {
        const why = lastError?.message ? `${final} The hub said: ${lastError.message} (${lastError.code}).` : final;
        this.handlers.status('stopped', { reason: why, code: event.code });
        return;
      }
      this.attempt += 1;
      const base = Math.min(30000, 500 * 2 ** Math.min(this.attempt - 1, 6));
      const delayMs = Math.round(base / 2 + Math.random() * (base / 2));
      const reason = event.code === 1006 ? 'connection lost' : `closed with ${event.code}${event.reason ? ` (${event.reason})` : ''}`;
      this.handlers.status('waiting', { delayMs, attempt: this.attempt, reason });
      this.timer = setTimeout(() => this.open(), delayMs);
    });
  }

  /** Reconnect now instead of waiting for the backoff. */
  retryNow() {
    if (this.stopped || this.ws) return;
    this.open();
  }

  onFrame(frame) {
    if (frame.type === 'welcome' && frame.id === this.helloId) {
      const reconnected = this.everWelcomed;
      this.welcomed = true;
      this.everWelcomed = true;
      this.attempt = 0;
      this.handlers.status('open', { sessionId: frame.session_id, deviceId: frame.device_id });
      this.handlers.welcome(frame, reconnected);
      for (const spec of this.subs.values()) {
        this.sendSubscribe(spec).catch((err) => {
          if (err.code === 'not_connected') return; // sent again on the next welcome
          this.subs.delete(spec.sub);
          this.handlers.refused(spec, err);
        });
      }
      this.startPings();
      return;
    }
    if (frame.id !== undefined && this.pending.has(frame.id) && frame.type !== 'welcome') {
      const { resolve, reject } = this.pending.get(frame.id);
      this.pending.delete(frame.id);
      if (frame.type === 'error') reject(frame);
      else resolve(frame);
    }
    this.handlers.frame(frame);
  }

  startPings() {
    clearInterval(this.pingTimer);
    this.pingTimer = setInterval(() => {
      const ws = this.ws;
      if (!ws || !this.welcomed) return;
      const timeout = setTimeout(() => {
        if (this.ws === ws) ws.close(4999, 'no pong'); // counts as a lost connection: reconnect
      }, PONG_WAIT_MS);
      this.request({ type: 'ping' }).then(() => clearTimeout(timeout), () => clearTimeout(timeout));
    }, PING_EVERY_MS);
  }

  sendRaw(frame) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }

  /** Send a request frame; resolves with its reply, rejects with an `error` frame. */
  request(frame) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      if (!this.welcomed || !this.sendRaw({ ...frame, id })) {
        reject({ type: 'error', code: 'not_connected', message: 'Not connected to the hub.' });
        return;
      }
      this.pending.set(id, { resolve, reject });
    });
  }

  failPending(why) {
    for (const { reject } of this.pending.values()) reject({ type: 'error', code: 'not_connected', message: `Not connected: ${why}.` });
    this.pending.clear();
  }

  sendSubscribe(spec) {
    return this.request(spec);
  }

  /**
   * Subscribe (spec: {sub, table, filter, snapshot} or {sub, channel}). The subscription is
   * kept and re-sent after every reconnect; a refusal removes it again.
   */
  async subscribe(spec) {
    const frame = { type: 'subscribe', ...spec };
    this.subs.set(spec.sub, frame);
    if (!this.welcomed) return null; // sent on welcome
    try {
      return await this.sendSubscribe(frame);
    } catch (err) {
      if (err.code !== 'not_connected') this.subs.delete(spec.sub);
      throw err;
    }
  }

  async unsubscribe(sub) {
    this.subs.delete(sub);
    if (!this.welcomed) return null;
    try {
      return await this.request({ type: 'unsubscribe', sub });
    } catch (err) {
      if (err.code === 'unknown_subscription' || err.code === 'not_connected') return null;
      throw err;
    }
  }

  has(sub) {
    return this.subs.has(sub);
  }
}
