// RxDB clients for tests/rxdb_replication.rs: real RxDB 17 databases (memory storage wrapped
// in ajv validation, dev-mode on) replicating with `replicateWithWebsocketServer`, and raw `ws`
// sockets, driven line by line over stdin/stdout.
//
// Protocol: each stdin line is a JSON command `{"id": n, "cmd": "...", ...}`; each command is
// answered by one stdout line `{"id": n, "ok": true, "result": ...}` or
// `{"id": n, "ok": false, "error": "readable message"}`. Commands run concurrently, so the test
// may start a wait and act on the hub before reading its answer. Every wait has a timeout
// (`timeoutMs`, default DEFAULT_TIMEOUT_MS). Anything else RxDB prints goes to stderr; an
// uncaught error is written as `{"fatal": "..."}` and ends the process with status 1.
//
// The `ws` class is instrumented (send and incoming messages) to keep a per-client log of
// frames, so that a wait that times out can say which requests were never answered.

import { send, serve } from '../common/json-lines.mjs';
import { createRxDatabase, addRxPlugin } from 'rxdb';
import { getRxStorageMemory } from 'rxdb/plugins/storage-memory';
import { wrappedValidateAjvStorage } from 'rxdb/plugins/validate-ajv';
import { RxDBDevModePlugin, disableWarnings } from 'rxdb/plugins/dev-mode';
import { replicateWithWebsocketServer } from 'rxdb/plugins/replication-websocket';
import { WebSocket } from 'ws';

const DEFAULT_TIMEOUT_MS = 20000;
const POLL_MS = 50;
const WIRE_LOG_FRAMES = 4000;


disableWarnings();
addRxPlugin(RxDBDevModePlugin);

function fatal(what, err) {
    const text = `${what}: ${err && err.stack ? err.stack : String(err)}`;
    console.error('driver fatal', text);
    send({ fatal: text });
    process.exit(1);
}
process.on('uncaughtException', err => fatal('uncaught exception', err));
process.on('unhandledRejection', err => fatal('unhandled rejection', err));

// ---------------------------------------------------------------- schemas

/** Schemas of the tables the tests create or the demo schema holds, by collection name. */
const SCHEMAS = {
    // tests/rxdb_replication.rs ITEMS_SQL
    items: {
        version: 0,
        primaryKey: 'id',
        type: 'object',
        properties: {
            id: { type: 'string', maxLength: 100 },
            price: { type: 'number' },
            at: { type: 'string' },
            done: { type: 'boolean' },
            note: { type: ['string', 'null'] },
            meta: { type: 'object' },
            qty: { type: 'integer' }
        },
        required: ['id', 'price', 'at', 'done', 'meta', 'qty']
    },
    // src/demo.rs products
    products: {
        version: 0,
        primaryKey: 'id',
        type: 'object',
        properties: {
            id: { type: 'string', maxLength: 36 },
            sku: { type: 'string' },
            name: { type: 'string' },
            price_cents: { type: 'integer', minimum: 0 },
            stock: { type: 'integer' },
            active: { type: 'boolean' },
            updated_at: { type: 'string' }
        },
        required: ['id', 'sku', 'name', 'price_cents', 'stock', 'active', 'updated_at']
    }
};

// ---------------------------------------------------------------- wire log

/** Sockets seen by the instrumentation, each with the database token of its client once known. */
const sockets = [];

function wireOf(socket) {
    if (!socket.__wire) {
        socket.__wire = { dbToken: null, frames: [] };
        sockets.push(socket);
    }
    return socket.__wire;
}

function summarize(dir, text) {
    let msg;
    try {
        msg = JSON.parse(text);
    } catch (e) {
        return { dir, at: Date.now(), unparsed: String(text).slice(0, 200) };
    }
    const frame = { dir, at: Date.now(), id: msg.id, collection: msg.collection };
    if (dir === 'out') {
        frame.method = msg.method;
        if (msg.method === 'masterChangesSince') {
            frame.checkpoint = msg.params[0] ?? null;
            frame.batchSize = msg.params[1];
        } else if (msg.method === 'masterWrite') {
            frame.rows = msg.params[0].length;
            frame.ids = msg.params[0].map(r => r.newDocumentState && r.newDocumentState.id);
        }
    } else if (msg.result === 'RESYNC') {
        frame.resync = true;
    } else if (Array.isArray(msg.result)) {
        frame.conflicts = msg.result.length;
    } else if (msg.result && Array.isArray(msg.result.documents)) {
        frame.documents = msg.result.documents.length;
        frame.docIds = msg.result.documents.slice(0, 100).map(d => d && d.id);
        frame.checkpoint = msg.result.checkpoint ?? null;
    } else {
        frame.result = JSON.stringify(msg.result === undefined ? null : msg.result).slice(0, 200);
    }
    return frame;
}

function record(socket, dir, data) {
    const wire = wireOf(socket);
    const text = typeof data === 'string' ? data : Buffer.from(data).toString('utf8');
    const frame = summarize(dir, text);
    if (!wire.dbToken && dir === 'out' && typeof frame.id === 'string') {
        const token = frame.id.split('|')[0];
        if (frame.id.includes('|') && token) {
            wire.dbToken = token;
        }
    }
    wire.frames.push(frame);
    if (wire.frames.length > WIRE_LOG_FRAMES) {
        wire.frames.splice(0, wire.frames.length - WIRE_LOG_FRAMES);
    }
}

const originalSend = WebSocket.prototype.send;
WebSocket.prototype.send = function (data, ...rest) {
    record(this, 'out', data);
    return originalSend.call(this, data, ...rest);
};
/** The latest failures to open or keep a socket, with their URL (a client not yet connected has no frames). */
const socketErrors = [];
const originalEmit = WebSocket.prototype.emit;
WebSocket.prototype.emit = function (event, ...args) {
    if (event === 'message') {
        record(this, 'in', args[0]);
    } else if (event === 'error') {
        socketErrors.push({ url: this.url, at: Date.now(), message: String(args[0] && args[0].message ? args[0].message : args[0]) });
        if (socketErrors.length > 50) {
            socketErrors.shift();
        }
    } else if (event === 'close') {
        wireOf(this).frames.push({ dir: 'closed', at: Date.now(), code: args[0], reason: String(args[1] || '') });
    }
    return originalEmit.call(this, event, ...args);
};

/** Every frame of the client's sockets, oldest first (sockets in the order they were made). */
function wireFrames(client) {
    return sockets.filter(s => s.__wire.dbToken === client.db.token).flatMap(s => s.__wire.frames);
}

/** Requests of the client that have no answer yet (the stream subscription excluded). */
function pendingRequests(client) {
    const frames = wireFrames(client);
    const answered = new Set(frames.filter(f => f.dir === 'in').map(f => f.id));
    return frames.filter(f => f.dir === 'out' && f.method !== 'auth' && f.id !== 'stream' && !answered.has(f.id));
}

// ---------------------------------------------------------------- clients

const clients = new Map();
const rawSockets = new Map();

function client(name) {
    const c = clients.get(name);
    if (!c) {
        throw new Error(`no client named ${JSON.stringify(name)}`);
    }
    return c;
}

function replication(c) {
    if (!c.replication) {
        throw new Error(`client ${c.name} is not replicating (call replicate first, and let it connect)`);
    }
    return c.replication;
}

function timeoutOf(cmd) {
    return typeof cmd.timeoutMs === 'number' ? cmd.timeoutMs : DEFAULT_TIMEOUT_MS;
}

/** `promise`, or an error naming `what` and the client's state after `ms`. */
async function within(ms, what, promise, c) {
    let timer;
    const timeout = new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`${what}: timed out after ${ms} ms${c ? '\n' + describe(c) : ''}`)), ms);
    });
    try {
        return await Promise.race([promise, timeout]);
    } finally {
        clearTimeout(timer);
    }
}

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));

/** What a failed wait reports about a client: unanswered requests, errors, recent frames. */
function describe(c) {
    const lines = [`client ${c.name}:`];
    if (c.replication) {
        lines.push(`  paused: ${c.replication.isPaused()}, stopped: ${c.replication.isStopped()}`);
    } else {
        lines.push(c.replicating ? '  replication: still connecting for the first time' : '  replication: not started');
    }
    const failures = socketErrors.filter(e => e.url === c.url).slice(-3);
    if (failures.length) {
        lines.push(`  latest socket errors: ${JSON.stringify(failures)}`);
    }
    const pending = pendingRequests(c);
    if (pending.length) {
        lines.push(`  requests never answered: ${JSON.stringify(pending)}`);
    }
    if (c.errors.length) {
        lines.push(`  error$: ${JSON.stringify(c.errors.slice(-5))}`);
    }
    lines.push(`  conflict$ events: ${c.conflicts.length}`);
    lines.push(`  last frames: ${JSON.stringify(wireFrames(c).slice(-12))}`);
    return lines.join('\n');
}

function plainError(err) {
    const out = { code: err && err.code, message: String(err && err.message ? err.message : err) };
    if (err && err.parameters) {
        try {
            out.parameters = JSON.parse(JSON.stringify(err.parameters)).errors ?? undefined;
        } catch (e) {
            // parameters that do not serialize are left out
        }
    }
    return out;
}

async function createClient(cmd) {
    if (clients.has(cmd.client)) {
        throw new Error(`client ${cmd.client} exists already`);
    }
    const collectionName = cmd.collection || 'items';
    const schema = cmd.schema || SCHEMAS[collectionName];
    if (!schema) {
        throw new Error(`no schema for collection ${collectionName}; pass one in "schema"`);
    }
    const db = await createRxDatabase({
        name: `rx${cmd.client.replace(/[^a-z0-9]/gi, '')}${Math.random().toString(36).slice(2, 10)}`,
        storage: wrappedValidateAjvStorage({ storage: getRxStorageMemory() }),
        multiInstance: false,
        eventReduce: true
    });
    await db.addCollections({ [collectionName]: { schema } });
    const c = {
        name: cmd.client,
        db,
        collection: db.collections[collectionName],
        replication: null,
        replicating: null,
        conflicts: [],
        errors: []
    };
    clients.set(cmd.client, c);
    return { database: db.name, collection: collectionName };
}

/**
 * Start `replicateWithWebsocketServer`. Its promise resolves once the socket first opened, so
 * with the hub down it stays pending: `wait: "none"` returns at once, `"open"` (default
 * `"initial"`) waits for the socket, `"initial"` for the initial replication as well.
 */
async function replicate(cmd) {
    const c = client(cmd.client);
    if (c.replicating) {
        throw new Error(`client ${c.name} replicates already`);
    }
    c.url = cmd.url;
    const options = {
        collection: c.collection,
        url: cmd.url,
        replicationIdentifier: cmd.replicationIdentifier || `synchub-${c.name}`
    };
    if (cmd.token) {
        options.headers = { authorization: 'Bearer ' + cmd.token };
    }
    if (typeof cmd.batchSize === 'number') {
        options.batchSize = cmd.batchSize;
    }
    c.replicating = replicateWithWebsocketServer(options).then(state => {
        c.replication = state;
        state.error$.subscribe(err => {
            const plain = plainError(err);
            console.error(`client ${c.name} error$:`, JSON.stringify(plain));
            c.errors.push(plain);
        });
        state.conflict$.subscribe(conflict => {
            c.conflicts.push({
                newDocumentState: conflict.input.newDocumentState,
                assumedMasterState: conflict.input.assumedMasterState ?? null,
                realMasterState: conflict.input.realMasterState,
                output: conflict.output
            });
        });
        return state;
    });
    const wait = cmd.wait || 'initial';
    if (wait === 'none') {
        c.replicating.catch(err => c.errors.push(plainError(err)));
        return null;
    }
    const state = await within(timeoutOf(cmd), `client ${c.name}: the socket to ${cmd.url} did not open`, c.replicating, c);
    if (wait === 'initial') {
        await within(timeoutOf(cmd), `client ${c.name}: initial replication`, state.awaitInitialReplication(), c);
    }
    return null;
}

/** The replication state once the socket opened (for clients started with `wait: "none"`). */
async function replicationOf(c, ms) {
    if (c.replication) {
        return c.replication;
    }
    if (!c.replicating) {
        throw new Error(`client ${c.name} is not replicating (call replicate first)`);
    }
    return within(ms, `client ${c.name}: the socket never opened`, c.replicating, c);
}

function docJson(doc) {
    const json = doc.toJSON();
    delete json._rev;
    delete json._meta;
    delete json._attachments;
    delete json._deleted;
    return json;
}

async function dumpDocs(c) {
    const docs = await c.collection.find().exec();
    return docs.map(docJson).sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
}

function checkWrite(what, result) {
    if (result.error && result.error.length) {
        const errors = result.error.map(e => ({ status: e.status, id: e.documentId, validationErrors: e.validationErrors }));
        throw new Error(`${what} refused: ${JSON.stringify(errors)}`);
    }
}

/** Deep equality independent of key order (as RxDB's default conflict handler compares). */
function deepEqual(a, b) {
    if (a === b) {
        return true;
    }
    if (typeof a !== 'object' || typeof b !== 'object' || a === null || b === null) {
        return false;
    }
    if (Array.isArray(a) !== Array.isArray(b)) {
        return false;
    }
    const ka = Object.keys(a);
    const kb = Object.keys(b);
    return ka.length === kb.length && ka.every(k => Object.prototype.hasOwnProperty.call(b, k) && deepEqual(a[k], b[k]));
}

function matches(doc, expect) {
    return Object.keys(expect).every(k => deepEqual(doc[k] === undefined ? null : doc[k], expect[k]));
}

/** Poll until `check()` returns a value other than undefined, or fail with `what()`. */
async function pollUntil(ms, check, what) {
    const deadline = Date.now() + ms;
    for (;;) {
        const value = await check();
        if (value !== undefined) {
            return value;
        }
        if (Date.now() > deadline) {
            throw new Error(`timed out after ${ms} ms: ${await what()}`);
        }
        await sleep(POLL_MS);
    }
}

function firstDifference(docsA, docsB) {
    const byId = new Map(docsB.map(d => [d.id, d]));
    for (const a of docsA) {
        const b = byId.get(a.id);
        if (!b) {
            return `${a.id} is missing on the second`;
        }
        if (!deepEqual(a, b)) {
            return `${a.id} differs: ${JSON.stringify(a)} vs ${JSON.stringify(b)}`;
        }
        byId.delete(a.id);
    }
    const extra = [...byId.keys()];
    return extra.length ? `only on the second: ${extra.slice(0, 10).join(', ')}` : 'none';
}

/** Wait until every client is in sync and all hold the same documents (`count` of them, if given). */
async function awaitEqual(cmd) {
    const cs = cmd.clients.map(client);
    const ms = timeoutOf(cmd);
    const deadline = Date.now() + ms;
    let last = null;
    for (;;) {
        const remaining = deadline - Date.now();
        if (remaining <= 0) {
            const detail = last ? last : 'no comparison ran';
            throw new Error(`clients ${cmd.clients.join(', ')} did not converge within ${ms} ms: ${detail}\n${cs.map(describe).join('\n')}`);
        }
        try {
            for (const c of cs) {
                const state = await replicationOf(c, remaining);
                await within(Math.max(remaining, 1), `client ${c.name}: awaitInSync`, state.awaitInSync(), c);
            }
        } catch (err) {
            last = String(err.message || err);
            continue;
        }
        const dumps = await Promise.all(cs.map(dumpDocs));
        const counts = dumps.map(d => d.length);
        if (typeof cmd.count === 'number' && counts.some(n => n !== cmd.count)) {
            last = `document counts ${JSON.stringify(counts)}, expected ${cmd.count} each`;
            await sleep(POLL_MS);
            continue;
        }
        const different = dumps.findIndex(d => !deepEqual(d, dumps[0]));
        if (different >= 0) {
            last = `${cs[0].name} and ${cs[different].name} differ, first difference: ${firstDifference(dumps[0], dumps[different])}`;
            await sleep(POLL_MS);
            continue;
        }
        return dumps[0];
    }
}

// ---------------------------------------------------------------- raw sockets

async function rawOpen(cmd) {
    if (rawSockets.has(cmd.name)) {
        throw new Error(`raw socket ${cmd.name} exists already`);
    }
    const socket = new WebSocket(cmd.url);
    const raw = { socket, inbox: [], waiters: [], closed: null };
    rawSockets.set(cmd.name, raw);
    socket.on('message', data => {
        raw.inbox.push(JSON.parse(data.toString('utf8')));
        raw.waiters.splice(0).forEach(w => w());
    });
    socket.on('close', (code, reason) => {
        raw.closed = { code, reason: reason.toString('utf8') };
        raw.waiters.splice(0).forEach(w => w());
    });
    socket.on('error', err => {
        raw.error = String(err.message || err);
        raw.waiters.splice(0).forEach(w => w());
    });
    await within(timeoutOf(cmd), `raw socket ${cmd.name}: open ${cmd.url}`, new Promise((resolve, reject) => {
        socket.once('open', resolve);
        socket.once('error', reject);
        socket.once('unexpected-response', (_req, res) => reject(new Error(`upgrade refused with HTTP ${res.statusCode}`)));
    }));
    return null;
}

function raw(name) {
    const r = rawSockets.get(name);
    if (!r) {
        throw new Error(`no raw socket named ${name}`);
    }
    return r;
}

function changed(r) {
    return new Promise(resolve => r.waiters.push(resolve));
}

/** The next message (the next one whose id is `messageId`, if given), removed from the inbox. */
async function rawNext(cmd) {
    const r = raw(cmd.name);
    const ms = timeoutOf(cmd);
    const deadline = Date.now() + ms;
    for (;;) {
        const index = r.inbox.findIndex(m => cmd.messageId === undefined || m.id === cmd.messageId);
        if (index >= 0) {
            return r.inbox.splice(index, 1)[0];
        }
        if (r.closed) {
            throw new Error(`raw socket ${cmd.name} closed (${JSON.stringify(r.closed)}) before a message${cmd.messageId !== undefined ? ' with id ' + cmd.messageId : ''} arrived`);
        }
        const remaining = deadline - Date.now();
        if (remaining <= 0) {
            throw new Error(`raw socket ${cmd.name}: no message${cmd.messageId !== undefined ? ' with id ' + cmd.messageId : ''} within ${ms} ms; inbox: ${JSON.stringify(r.inbox).slice(0, 500)}`);
        }
        await Promise.race([changed(r), sleep(remaining)]);
    }
}

/** The messages that arrive within `ms` (left in the inbox). */
async function rawQuiet(cmd) {
    const r = raw(cmd.name);
    await sleep(cmd.ms);
    return { messages: r.inbox.slice(), closed: r.closed };
}

async function rawAwaitClose(cmd) {
    const r = raw(cmd.name);
    const ms = timeoutOf(cmd);
    const deadline = Date.now() + ms;
    while (!r.closed) {
        const remaining = deadline - Date.now();
        if (remaining <= 0) {
            throw new Error(`raw socket ${cmd.name} still open after ${ms} ms; messages: ${JSON.stringify(r.inbox).slice(0, 500)}`);
        }
        await Promise.race([changed(r), sleep(remaining)]);
    }
    return { ...r.closed, messages: r.inbox.slice() };
}

// ---------------------------------------------------------------- commands

const commands = {
    ping: async () => ({ node: process.version, rxdb: (await import('rxdb/plugins/utils')).RXDB_VERSION }),

    /** `new Date().toISOString()`: a timestamp as a browser app would write it. */
    now: async () => new Date().toISOString(),

    create: createClient,
    replicate,

    /** Insert documents, in one bulk write, or one write each without waiting (`oneByOne`). */
    insert: async cmd => {
        const c = client(cmd.client);
        if (cmd.oneByOne) {
            await Promise.all(cmd.docs.map(doc => c.collection.insert(doc)));
        } else {
            checkWrite('insert', await c.collection.bulkInsert(cmd.docs));
        }
        return cmd.docs.length;
    },
    upsert: async cmd => {
        const c = client(cmd.client);
        checkWrite('upsert', await c.collection.bulkUpsert(cmd.docs));
        return cmd.docs.length;
    },
    /** `incrementalPatch(set)` on each of `ids` (one write each). */
    patch: async cmd => {
        const c = client(cmd.client);
        const ids = cmd.ids || [cmd.docId];
        await Promise.all(ids.map(async id => {
            const doc = await c.collection.findOne(id).exec();
            if (!doc) {
                throw new Error(`client ${c.name} has no document ${id} to patch`);
            }
            await doc.incrementalPatch(cmd.set);
        }));
        return ids.length;
    },
    remove: async cmd => {
        const c = client(cmd.client);
        checkWrite('remove', await c.collection.bulkRemove(cmd.ids));
        return cmd.ids.length;
    },
    dump: async cmd => dumpDocs(client(cmd.client)),
    get: async cmd => {
        const doc = await client(cmd.client).collection.findOne(cmd.docId).exec();
        return doc ? docJson(doc) : null;
    },

    awaitInSync: async cmd => {
        const c = client(cmd.client);
        const ms = timeoutOf(cmd);
        const state = await replicationOf(c, ms);
        await within(ms, `client ${c.name}: awaitInSync`, state.awaitInSync(), c);
        return null;
    },
    /** Wait until the client's document `docId` has the fields of `expect`, or is absent (`expect: null`). */
    awaitDoc: async cmd => {
        const c = client(cmd.client);
        let seen;
        return pollUntil(timeoutOf(cmd), async () => {
            const doc = await c.collection.findOne(cmd.docId).exec();
            seen = doc ? docJson(doc) : null;
            if (cmd.expect === null) {
                return seen === null ? null : undefined;
            }
            return seen && matches(seen, cmd.expect) ? seen : undefined;
        }, () => `client ${c.name}: document ${cmd.docId} is ${JSON.stringify(seen)}, expected ${cmd.expect === null ? 'none' : 'fields ' + JSON.stringify(cmd.expect)}\n${describe(c)}`);
    },
    awaitCount: async cmd => {
        const c = client(cmd.client);
        let n;
        return pollUntil(timeoutOf(cmd), async () => {
            n = (await c.collection.find().exec()).length;
            return n === cmd.count ? n : undefined;
        }, () => `client ${c.name} holds ${n} documents, expected ${cmd.count}\n${describe(c)}`);
    },
    awaitEqual,
    /** Wait until the client has seen at least `count` conflict$ events. */
    awaitConflicts: async cmd => {
        const c = client(cmd.client);
        return pollUntil(timeoutOf(cmd), async () => (c.conflicts.length >= cmd.count ? c.conflicts.slice() : undefined),
            () => `client ${c.name} saw ${c.conflicts.length} conflict$ events, expected ${cmd.count}\n${describe(c)}`);
    },

    pause: async cmd => {
        const c = client(cmd.client);
        await replication(c).pause();
        return null;
    },
    resume: async cmd => {
        const c = client(cmd.client);
        await within(timeoutOf(cmd), `client ${c.name}: start() after pause`, replication(c).start(), c);
        return null;
    },
    conflicts: async cmd => client(cmd.client).conflicts.slice(),
    errors: async cmd => client(cmd.client).errors.slice(),
    wire: async cmd => {
        const c = client(cmd.client);
        return { frames: wireFrames(c), pending: pendingRequests(c) };
    },
    describe: async cmd => describe(client(cmd.client)),
    /** Cancel the replication and close the database (which closes its socket). */
    close: async cmd => {
        const c = client(cmd.client);
        if (c.replication) {
            await c.replication.cancel();
        }
        await c.db.close();
        clients.delete(cmd.client);
        return null;
    },

    'raw.open': rawOpen,
    'raw.send': async cmd => {
        raw(cmd.name).socket.send(typeof cmd.message === 'string' ? cmd.message : JSON.stringify(cmd.message));
        return null;
    },
    'raw.next': rawNext,
    'raw.quiet': rawQuiet,
    'raw.awaitClose': rawAwaitClose,
    'raw.close': async cmd => {
        raw(cmd.name).socket.close();
        rawSockets.delete(cmd.name);
        return null;
    },

    exit: async () => {
        for (const c of clients.values()) {
            if (c.replication) {
                await c.replication.cancel().catch(() => { });
            }
            await c.db.close().catch(() => { });
        }
        for (const r of rawSockets.values()) {
            r.socket.terminate();
        }
        setImmediate(() => process.exit(0));
        return null;
    }
};

serve(commands);
