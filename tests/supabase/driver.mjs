// supabase-js clients for tests/supabase_realtime.rs: real `@supabase/supabase-js` clients
// (createClient with `realtime: { vsn, transport }`) talking to the hub's /realtime/v1, driven
// line by line over stdin/stdout.
//
// Protocol (as tests/rxdb/driver.mjs): each stdin line is a JSON command
// `{"id": n, "cmd": "...", ...}`; each command is answered by one stdout line
// `{"id": n, "ok": true, "result": ...}` or `{"id": n, "ok": false, "error": "readable message"}`.
// Commands run concurrently; every wait has a timeout (`timeoutMs`, default DEFAULT_TIMEOUT_MS).
// Anything the libraries print goes to stderr.
//
// Each client gets a WebSocket class of its own (the `transport` option, a subclass of `ws`)
// that logs the frames both ways, decoded (vsn 1.0.0 JSON objects, vsn 2.0.0 JSON arrays and
// binary broadcasts), and that can be taken "offline": its socket is cut and new sockets go
// to a closed port until it is back online, so supabase-js reconnects and rejoins by itself.
// A channel callback can read the raw message being dispatched (the decoded frame), which is
// how events carry the hub's `seq`, `epoch` and `snapshot` (supabase-js drops them from the
// payload it hands to postgres_changes callbacks).
//
// Exceptions thrown inside the clients (e.g. by supabase-js on a frame it cannot handle) do
// not end the process: they are kept, shown by every failed wait, and returned by `errors`.

import { send, serve } from '../common/json-lines.mjs';
import { readFileSync } from 'node:fs';
import { createClient, RealtimeClient } from '@supabase/supabase-js';
import { WebSocket } from 'ws';
import { syncHubSince } from '../../clients/supabase/synchub-since.mjs';

const DEFAULT_TIMEOUT_MS = 20000;
const WIRE_LOG_FRAMES = 3000;
/** The installed version of package `name` (read from its package.json under node_modules). */
const versionOf = name => JSON.parse(readFileSync(new URL(`./node_modules/${name}/package.json`, import.meta.url), 'utf8')).version;


/** Exceptions thrown by client code outside a command (kept, never fatal). */
const uncaught = [];
function keepUncaught(what, err) {
    const text = `${what}: ${err && err.stack ? err.stack : String(err)}`;
    console.error('driver:', text);
    uncaught.push({ at: Date.now(), error: text });
}
process.on('uncaughtException', err => keepUncaught('uncaught exception', err));
process.on('unhandledRejection', err => keepUncaught('unhandled rejection', err));

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));

function timeoutOf(cmd) {
    return typeof cmd.timeoutMs === 'number' ? cmd.timeoutMs : DEFAULT_TIMEOUT_MS;
}

// ---------------------------------------------------------------- frames

/** A frame as a plain object `{join_ref, ref, topic, event, payload}` (payload parsed), or `{unparsed}`. */
function decodeFrame(data) {
    if (typeof data === 'string') {
        let parsed;
        try {
            parsed = JSON.parse(data);
        } catch (e) {
            return { unparsed: data.slice(0, 300) };
        }
        if (Array.isArray(parsed)) {
            const [join_ref, ref, topic, event, payload] = parsed;
            return { join_ref, ref, topic, event, payload };
        }
        return { join_ref: parsed.join_ref ?? null, ref: parsed.ref ?? null, topic: parsed.topic, event: parsed.event, payload: parsed.payload };
    }
    const bytes = Buffer.isBuffer(data) ? data : Buffer.from(data instanceof ArrayBuffer ? new Uint8Array(data) : new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
    const kind = bytes[0];
    const text = (from, len) => bytes.subarray(from, from + len).toString('utf8');
    const body = (enc, from) => {
        const rest = bytes.subarray(from);
        if (enc === 1) {
            try {
                return JSON.parse(rest.toString('utf8'));
            } catch (e) {
                return { unparsedJson: rest.toString('utf8').slice(0, 300) };
            }
        }
        return { binary: rest.length };
    };
    if (kind === 4) {
        // server → client broadcast: 4, topic_len, event_len, meta_len, enc, topic, event, meta, payload
        const [tl, el, ml, enc] = [bytes[1], bytes[2], bytes[3], bytes[4]];
        let at = 5;
        const topic = text(at, tl);
        at += tl;
        const userEvent = text(at, el);
        at += el;
        const meta = ml ? text(at, ml) : null;
        at += ml;
        return { binaryKind: 4, join_ref: null, ref: null, topic, event: 'broadcast', payload: { type: 'broadcast', event: userEvent, meta: meta ? JSON.parse(meta) : undefined, payload: body(enc, at) } };
    }
    if (kind === 3) {
        // client → server user broadcast: 3, jr_len, ref_len, topic_len, event_len, meta_len, enc, ...
        const [jl, rl, tl, el, ml, enc] = [bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6]];
        let at = 7;
        const join_ref = text(at, jl);
        at += jl;
        const ref = text(at, rl);
        at += rl;
        const topic = text(at, tl);
        at += tl;
        const userEvent = text(at, el);
        at += el;
        at += ml;
        return { binaryKind: 3, join_ref, ref, topic, event: 'broadcast', payload: { type: 'broadcast', event: userEvent, payload: body(enc, at) } };
    }
    return { binaryKind: kind, bytes: bytes.length };
}

function summarize(frame) {
    const copy = { ...frame };
    if (copy.payload !== undefined) {
        const text = JSON.stringify(copy.payload);
        copy.payload = text && text.length > 3000 ? text.slice(0, 3000) + '…' : copy.payload;
    }
    return copy;
}

// ---------------------------------------------------------------- clients

const clients = new Map();
/** Named in-memory storages for synchub-since (shared across clients, as localStorage is). */
const storages = new Map();

function client(name) {
    const c = clients.get(name);
    if (!c) {
        throw new Error(`no client named ${JSON.stringify(name)}`);
    }
    return c;
}

function chan(c, name) {
    const ch = c.channels.get(name);
    if (!ch) {
        throw new Error(`client ${c.name} has no channel named ${JSON.stringify(name)}`);
    }
    return ch;
}

function storageNamed(name) {
    if (!storages.has(name)) {
        const values = new Map();
        storages.set(name, {
            values,
            writes: 0,
            get: async key => (values.has(key) ? values.get(key) : null),
            set: async (key, value) => {
                storages.get(name).writes += 1;
                values.set(key, value);
            },
            remove: async key => {
                values.delete(key);
            }
        });
    }
    return storages.get(name);
}

/** A `ws` subclass for client `c`: logs frames, exposes the message being dispatched, can go offline. */
function transportFor(c) {
    return class HubSocket extends WebSocket {
        constructor(url, protocols) {
            const target = c.offline ? String(url).replace(/^ws:\/\/[^/]+/, 'ws://127.0.0.1:1') : url;
            super(target, protocols);
            c.sockets.push(this);
            c.connects += 1;
            const wire = (dir, frame) => {
                c.frames.push({ dir, at: Date.now(), ...summarize(frame) });
                if (c.frames.length > WIRE_LOG_FRAMES) {
                    c.frames.splice(0, c.frames.length - WIRE_LOG_FRAMES);
                }
            };
            this.__wire = wire;
            // Registered before supabase-js sets `onmessage`: runs first for every message.
            this.addEventListener('message', event => {
                const frame = decodeFrame(event.data);
                c.current = frame;
                c.raw.push(frame);
                if (c.raw.length > 20000) {
                    c.raw.splice(0, c.raw.length - 20000);
                }
                if (!(frame.topic === 'phoenix' && frame.event === 'phx_reply')) {
                    wire('in', frame);
                }
            });
            this.addEventListener('close', event => {
                wire('closed', { code: event.code, reason: String(event.reason || '') });
            });
            this.addEventListener('error', event => {
                const message = String(event && event.message ? event.message : event);
                const refused = /Unexpected server response: (\d+)/.exec(message);
                if (refused) {
                    c.refusals.push({ status: Number(refused[1]), at: Date.now() });
                }
                wire('error', { message });
            });
            // A refused upgrade (401, 400...) is an `error` "Unexpected server response: <status>".
        }

        // As in a browser, an exception thrown by the message handler is reported and the
        // socket goes on (with `ws` it would stall the socket's reader for good).
        get onmessage() {
            return this.__onmessage || null;
        }

        set onmessage(handler) {
            this.__onmessage = handler;
            super.onmessage = typeof handler === 'function'
                ? event => {
                    try {
                        handler.call(this, event);
                    } catch (err) {
                        keepUncaught(`client ${c.name}: the message handler threw on ${JSON.stringify(summarize(c.current || {})).slice(0, 600)}`, err);
                    }
                }
                : handler;
        }

        send(data, ...rest) {
            const frame = decodeFrame(data);
            if (!(frame.topic === 'phoenix' && frame.event === 'heartbeat')) {
                this.__wire('out', frame);
            }
            return super.send(data, ...rest);
        }
    };
}

function describeClient(c) {
    const lines = [`client ${c.name} (vsn ${c.vsn}): connected ${c.supabase.realtime.isConnected()}, sockets opened ${c.connects}, offline ${c.offline}`];
    for (const ch of c.channels.values()) {
        lines.push(`  channel ${ch.name} (${ch.channel.topic}): state ${ch.channel.state}, statuses ${JSON.stringify(ch.statuses.map(s => s.error ? `${s.status}: ${s.error}` : s.status))}, events ${ch.events.length}`);
    }
    if (c.refusals.length) {
        lines.push(`  refused upgrades: ${JSON.stringify(c.refusals.slice(-3))}`);
    }
    if (uncaught.length) {
        lines.push(`  exceptions thrown in client code: ${JSON.stringify(uncaught.slice(-3))}`);
    }
    lines.push(`  last frames: ${JSON.stringify(c.frames.slice(-25))}`);
    return lines.join('\n');
}

async function createOne(cmd) {
    if (clients.has(cmd.client)) {
        throw new Error(`client ${cmd.client} exists already`);
    }
    const c = {
        name: cmd.client,
        vsn: cmd.vsn,
        url: cmd.url,
        offline: false,
        sockets: [],
        connects: 0,
        frames: [],
        raw: [],
        refusals: [],
        current: null,
        channels: new Map(),
        since: null,
        storage: null
    };
    const realtime = { vsn: cmd.vsn, transport: transportFor(c) };
    if (cmd.params) {
        realtime.params = cmd.params;
    }
    if (typeof cmd.heartbeatIntervalMs === 'number') {
        realtime.heartbeatIntervalMs = cmd.heartbeatIntervalMs;
        // Counts the heartbeats the hub answered ('ok'); 'timeout' makes supabase-js reconnect.
        realtime.heartbeatCallback = status => {
            if (status === 'ok') {
                c.heartbeats = (c.heartbeats || 0) + 1;
            }
        };
    }
    const options = { auth: { persistSession: false, autoRefreshToken: false, detectSessionInUrl: false }, realtime };
    if ('accessToken' in cmd) {
        // Third-party auth (Clerk, Auth0...): supabase-js asks this callback for the user's token.
        c.userToken = cmd.accessToken;
        options.accessToken = async () => c.userToken;
        delete options.auth;
    }
    if (cmd.bare) {
        // `new RealtimeClient('ws://host/realtime/v1', { params: { apikey } })`, no supabase-js
        // around it (no token callback): shaped like a SupabaseClient for the commands.
        const rt = new RealtimeClient(cmd.url.replace(/^http/, 'ws') + '/realtime/v1', { ...realtime, params: { apikey: cmd.token, ...(realtime.params || {}) } });
        c.supabase = {
            realtime: rt,
            channel: (name, opts) => rt.channel(name, opts),
            removeChannel: channel => rt.removeChannel(channel),
            removeAllChannels: () => rt.removeAllChannels()
        };
    } else {
        c.supabase = createClient(cmd.url, cmd.token, options);
    }
    if (cmd.since) {
        c.storage = cmd.since.storage ? storageNamed(cmd.since.storage) : null;
        c.since = syncHubSince(c.supabase, {
            storage: c.storage,
            onPositionLost: (channel, system) => {
                c.positionLost = (c.positionLost || []).concat([{ topic: channel.topic, system }]);
            },
            onError: err => keepUncaught('synchub-since', err)
        });
    }
    clients.set(cmd.client, c);
    return { endpoint: c.supabase.realtime.endpointURL().replace(/apikey=[^&]+/, 'apikey=…'), vsn: c.supabase.realtime.vsn };
}

/** What a channel callback records: the event plus what the raw frame being dispatched says. */
function recorder(c, ch, kind, index, filter) {
    return (payload, ...rest) => {
        const raw = c.current || {};
        const event = { n: ch.events.length, at: Date.now(), kind, binding: index };
        if (kind === 'postgres_changes') {
            const data = raw.payload && raw.payload.data ? raw.payload.data : {};
            event.payload = payload;
            event.ids = raw.payload ? raw.payload.ids : undefined;
            event.seq = data.seq;
            event.epoch = data.epoch;
            event.snapshot = data.snapshot === true;
            event.rawKeys = Object.keys(data).sort();
        } else if (kind === 'presence') {
            event.event = filter.event;
            event.payload = payload === undefined ? null : payload;
            event.state = ch.channel.presenceState();
        } else {
            event.payload = payload === undefined ? null : payload;
            event.wire = raw.event;
        }
        ch.events.push(event);
        ch.waiters.splice(0).forEach(w => w());
    };
}

async function subscribe(cmd) {
    const c = client(cmd.client);
    const name = cmd.channel || cmd.name;
    if (c.channels.has(name)) {
        throw new Error(`client ${c.name} has a channel ${name} already`);
    }
    const channel = c.supabase.channel(cmd.name, cmd.config ? { config: cmd.config } : undefined);
    const ch = { name, channel, statuses: [], events: [], waiters: [] };
    c.channels.set(name, ch);
    (cmd.listen || []).forEach((l, index) => {
        channel.on(l.type, l.filter || {}, recorder(c, ch, l.type, index, l.filter || {}));
    });
    if (cmd.since) {
        if (!c.since) {
            throw new Error(`client ${c.name} was created without synchub-since`);
        }
        ch.restored = await c.since.attach(channel);
    }
    const wait = cmd.wait || 'SUBSCRIBED';
    const first = new Promise(resolve => {
        channel.subscribe((status, err) => {
            const entry = { status, at: Date.now() };
            if (err) {
                entry.error = String(err.message || err);
            }
            ch.statuses.push(entry);
            ch.waiters.splice(0).forEach(w => w());
            resolve(entry);
        });
    });
    if (wait === 'none') {
        return { restored: ch.restored ?? null };
    }
    let timer;
    const timeout = new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`channel ${name}: no status within ${timeoutOf(cmd)} ms\n${describeClient(c)}`)), timeoutOf(cmd));
    });
    let got;
    try {
        got = await Promise.race([first, timeout]);
    } finally {
        clearTimeout(timer);
    }
    if (wait !== 'any' && got.status !== wait) {
        throw new Error(`channel ${name}: status ${got.status}${got.error ? ' (' + got.error + ')' : ''}, expected ${wait}\n${describeClient(c)}`);
    }
    return { ...got, restored: ch.restored ?? null, joinReply: joinReplyOf(c, channel) };
}

/** The last join reply the client received for `channel`'s topic. */
function joinReplyOf(c, channel) {
    const joinRef = channel.joinPush.ref;
    for (let i = c.raw.length - 1; i >= 0; i--) {
        const f = c.raw[i];
        if (f.topic === channel.topic && f.event === 'phx_reply' && f.ref === joinRef) {
            return f.payload;
        }
    }
    return null;
}

/** Wait until `check()` returns something other than undefined (re-checked on events and every 50 ms). */
async function until(ch, ms, check, what) {
    const deadline = Date.now() + ms;
    for (;;) {
        const value = check();
        if (value !== undefined) {
            return value;
        }
        const remaining = deadline - Date.now();
        if (remaining <= 0) {
            throw new Error(`timed out after ${ms} ms: ${what()}`);
        }
        await Promise.race([new Promise(resolve => ch.waiters.push(resolve)), sleep(Math.min(remaining, 50))]);
    }
}

function matching(ch, cmd) {
    return ch.events.filter(e => (!cmd.kind || e.kind === cmd.kind) && (cmd.binding === undefined || e.binding === cmd.binding) && (!cmd.event || (e.event ?? (e.payload && e.payload.event)) === cmd.event));
}

const commands = {
    ping: async () => ({
        node: process.version,
        supabase: versionOf('@supabase/supabase-js'),
        realtime: versionOf('@supabase/realtime-js'),
        phoenix: versionOf('@supabase/phoenix'),
        ws: versionOf('ws')
    }),

    create: createOne,
    subscribe,

    /** Wait until the channel's status history holds `status` at an index >= `after`. */
    awaitStatus: async cmd => {
        const c = client(cmd.client);
        const ch = chan(c, cmd.channel);
        const after = cmd.after || 0;
        return until(ch, timeoutOf(cmd), () => {
            const i = ch.statuses.findIndex((s, index) => index >= after && s.status === cmd.status);
            return i >= 0 ? { index: i, ...ch.statuses[i], statuses: ch.statuses } : undefined;
        }, () => `channel ${ch.name}: no ${cmd.status} after status ${after}\n${describeClient(c)}`);
    },
    statuses: async cmd => chan(client(cmd.client), cmd.channel).statuses.slice(),

    /** Events recorded on a channel (all, or of `kind` / `binding` / `event`), oldest first. */
    events: async cmd => matching(chan(client(cmd.client), cmd.channel), cmd),
    /** Wait until the channel has at least `count` events of `kind` (`binding`, `event`); returns them all. */
    awaitEvents: async cmd => {
        const c = client(cmd.client);
        const ch = chan(c, cmd.channel);
        return until(ch, timeoutOf(cmd), () => {
            const found = matching(ch, cmd);
            return found.length >= cmd.count ? found : undefined;
        }, () => `channel ${ch.name}: ${matching(ch, cmd).length} events of ${JSON.stringify({ kind: cmd.kind, binding: cmd.binding, event: cmd.event })}, expected ${cmd.count}; last: ${JSON.stringify(matching(ch, cmd).slice(-3)).slice(0, 1500)}\n${describeClient(c)}`);
    },
    clearEvents: async cmd => {
        const ch = chan(client(cmd.client), cmd.channel);
        const n = ch.events.length;
        ch.events = [];
        return n;
    },

    /** `channel.send({type: 'broadcast', event, payload})`: 'ok', 'timed out' or 'error'. */
    send: async cmd => {
        const c = client(cmd.client);
        let ch = c.channels.get(cmd.channel);
        if (!ch) {
            // A channel never subscribed: supabase-js sends over REST (POST /api/broadcast).
            ch = { name: cmd.channel, channel: c.supabase.channel(cmd.name || cmd.channel), statuses: [], events: [], waiters: [], unjoined: true };
            c.channels.set(cmd.channel, ch);
        }
        const opts = typeof cmd.timeoutMs === 'number' ? { timeout: cmd.timeoutMs } : {};
        return ch.channel.send({ type: 'broadcast', event: cmd.event, payload: cmd.payload }, opts);
    },
    /** `channel.httpSend(event, payload)`: `{success: true}`, or the error message as `{error}`. */
    httpSend: async cmd => {
        const c = client(cmd.client);
        let ch = c.channels.get(cmd.channel);
        if (!ch) {
            ch = { name: cmd.channel, channel: c.supabase.channel(cmd.name || cmd.channel, cmd.config ? { config: cmd.config } : undefined), statuses: [], events: [], waiters: [], unjoined: true };
            c.channels.set(cmd.channel, ch);
        }
        try {
            return await ch.channel.httpSend(cmd.event, cmd.payload);
        } catch (err) {
            return { error: String(err && err.message ? err.message : err) };
        }
    },
    track: async cmd => chan(client(cmd.client), cmd.channel).channel.track(cmd.payload),
    untrack: async cmd => chan(client(cmd.client), cmd.channel).channel.untrack(),
    presenceState: async cmd => chan(client(cmd.client), cmd.channel).channel.presenceState(),

    /** `supabase.realtime.setAuth(token)`; without a token, from the client's token source. */
    setAuth: async cmd => {
        await client(cmd.client).supabase.realtime.setAuth(cmd.token ?? null);
        return null;
    },
    /** What the `accessToken` callback of a third-party-auth client returns from now on. */
    setUserToken: async cmd => {
        client(cmd.client).userToken = cmd.token;
        return null;
    },
    /** Wait until supabase-js holds `token` as its realtime access token. */
    awaitAccessToken: async cmd => {
        const c = client(cmd.client);
        const deadline = Date.now() + timeoutOf(cmd);
        while (c.supabase.realtime.accessTokenValue !== cmd.token) {
            if (Date.now() > deadline) {
                throw new Error(`client ${c.name}: its access token is still ${String(c.supabase.realtime.accessTokenValue).slice(0, 40)}…`);
            }
            await sleep(20);
        }
        return null;
    },
    /** `supabase.removeChannel(channel)`: 'ok' / 'timed out' / 'error'. */
    removeChannel: async cmd => {
        const c = client(cmd.client);
        const ch = chan(c, cmd.channel);
        const status = await c.supabase.removeChannel(ch.channel);
        c.channels.delete(cmd.channel);
        return status;
    },
    /** `supabase.realtime.disconnect()`. */
    disconnect: async cmd => client(cmd.client).supabase.realtime.disconnect(),
    connect: async cmd => {
        client(cmd.client).supabase.realtime.connect();
        return null;
    },
    /**
     * Cut the client's socket as a network failure would (no close handshake) and keep new
     * sockets from reaching the hub until `online`: supabase-js retries with its backoff.
     */
    offline: async cmd => {
        const c = client(cmd.client);
        c.offline = true;
        for (const s of c.sockets) {
            if (s.readyState === WebSocket.OPEN || s.readyState === WebSocket.CONNECTING) {
                s.terminate();
            }
        }
        return null;
    },
    online: async cmd => {
        client(cmd.client).offline = false;
        return null;
    },
    /** Wait until the client's socket is connected. */
    awaitConnected: async cmd => {
        const c = client(cmd.client);
        const deadline = Date.now() + timeoutOf(cmd);
        while (!c.supabase.realtime.isConnected()) {
            if (Date.now() > deadline) {
                throw new Error(`client ${c.name} did not connect within ${timeoutOf(cmd)} ms\n${describeClient(c)}`);
            }
            await sleep(50);
        }
        return null;
    },

    /** The client's frames (decoded; heartbeats left out), oldest first; `topic` narrows them. */
    wire: async cmd => {
        const c = client(cmd.client);
        return c.frames.filter(f => !cmd.topic || f.topic === cmd.topic);
    },
    /** Raw received frames of `topic` and `event` (full payloads). */
    raw: async cmd => client(cmd.client).raw.filter(f => (!cmd.topic || f.topic === cmd.topic) && (!cmd.event || f.event === cmd.event)),
    refusals: async cmd => client(cmd.client).refusals.slice(),
    /** Sockets the client opened, whether it is connected, and its heartbeats answered. */
    stats: async cmd => {
        const c = client(cmd.client);
        return { connects: c.connects, connected: c.supabase.realtime.isConnected(), heartbeats: c.heartbeats || 0 };
    },
    describe: async cmd => describeClient(client(cmd.client)),
    errors: async () => uncaught.slice(),
    /** synchub-since: the position of a channel, and the client's lost-position reports. */
    sincePosition: async cmd => {
        const c = client(cmd.client);
        const ch = chan(c, cmd.channel);
        return { position: c.since.position(ch.channel), lost: c.positionLost || [], joinPayload: ch.channel.joinPush.payload() };
    },
    /** A named storage's values (JSON text by key) and number of writes. */
    storage: async cmd => {
        const s = storageNamed(cmd.storage);
        return { values: Object.fromEntries(s.values), writes: s.writes };
    },
    /** Forget a client without a word to the hub's channels: remove it and close its socket. */
    close: async cmd => {
        const c = client(cmd.client);
        if (c.since) {
            c.since.close();
        }
        await c.supabase.removeAllChannels().catch(() => { });
        await c.supabase.realtime.disconnect().catch(() => { });
        clients.delete(cmd.client);
        return null;
    },

    exit: async () => {
        for (const c of clients.values()) {
            for (const s of c.sockets) {
                s.terminate();
            }
        }
        setImmediate(() => process.exit(0));
        return null;
    }
};

serve(commands);
