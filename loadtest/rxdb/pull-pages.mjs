// Time of each masterChangesSince page, in snapshot mode (no checkpoint) and in log mode (from
// seq 0), after writing 5000 products through one raw socket (no RxDB client in the way).
//   node pull-pages.mjs ws://127.0.0.1:PORT/rxdb/v1 SECRET_FILE TENANT
import WebSocket from 'ws';
import { createHmac } from 'node:crypto';
import { readFileSync } from 'node:fs';
const [url, secretFile, tenant] = process.argv.slice(2);
const b64 = (v) => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v)).toString('base64url');
const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub: 'probe', role: 'Employee', tenant_id: tenant, device_id: 'probe', exp: Math.floor(Date.now() / 1000) + 3600 })}`;
const token = `${body}.${createHmac('sha256', readFileSync(secretFile, 'utf8').trim()).update(body).digest('base64url')}`;
const ws = new WebSocket(`${url}?token=${token}`);
const pending = new Map(); let n = 0;
ws.on('message', (m) => { const msg = JSON.parse(m); const p = pending.get(msg.id); if (p) { pending.delete(msg.id); p(msg.result); } });
await new Promise((r) => ws.on('open', r));
const call = (method, params) => new Promise((r) => { const id = String(++n); pending.set(id, r); ws.send(JSON.stringify({ id, collection: 'products', method, params })); });
// seed
const rows = Array.from({ length: 5000 }, (_, i) => ({ newDocumentState: { id: crypto.randomUUID(), sku: `P${i}`, name: `p${i}`, price_cents: i, stock: 1, active: true, updated_at: new Date().toISOString(), _deleted: false } }));
let t = performance.now();
for (let i = 0; i < rows.length; i += 100) await call('masterWrite', [rows.slice(i, i + 100)]);
console.log('write ms', (performance.now() - t).toFixed(0));
for (const mode of ['snapshot', 'log']) {
  let cp = mode === 'snapshot' ? null : { epoch: (await call('masterChangesSince', [null, 1])).checkpoint.epoch, seq: 0, snapshot: null };
  t = performance.now(); let total = 0; const times = [];
  for (;;) { const s = performance.now(); const r = await call('masterChangesSince', [cp, 100]); times.push(performance.now() - s); total += r.documents.length; cp = r.checkpoint; if (r.documents.length < 100) break; }
  times.sort((a, b) => a - b);
  console.log(mode, total, 'docs in', (performance.now() - t).toFixed(0), 'ms; per page median', times[times.length >> 1].toFixed(1), 'max', times[times.length - 1].toFixed(1));
}
process.exit(0);
