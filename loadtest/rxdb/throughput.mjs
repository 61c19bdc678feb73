// RxDB documents replicated per second through a hub: pushed by one client (offline writes
// sent on connect), pulled by a new client (first sync), and live from one client to another.
//   node throughput.mjs URL SECRET_FILE TENANT [documents] [DATABASE_URL]
// With DATABASE_URL, the first pull is measured again after `ANALYZE` (psql): right after a
// bulk load into a new database, Postgres has no statistics for the hub's tables yet.
// The device token is minted here (HS256) from the hub's secret, as `synchub dev` writes it.
import { createRxDatabase, addRxPlugin } from 'rxdb';
import { getRxStorageMemory } from 'rxdb/plugins/storage-memory';
import { replicateWithWebsocketServer } from 'rxdb/plugins/replication-websocket';
import { createHmac } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
const [url, secretFile, tenant, countArg, databaseUrl] = process.argv.slice(2);
const b64 = (v) => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v)).toString('base64url');
const mint = (claims) => {
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${body}.${createHmac('sha256', readFileSync(secretFile, 'utf8').trim()).update(body).digest('base64url')}`;
};
const token = mint({ sub: 'bench', role: 'Employee', tenant_id: tenant, device_id: 'bench-1', exp: Math.floor(Date.now() / 1000) + 3600 });
const count = Number(countArg || 5000);
const schema = { version: 0, primaryKey: 'id', type: 'object', properties: {
  id: { type: 'string', maxLength: 64 }, sku: { type: 'string' }, name: { type: 'string' },
  price_cents: { type: 'integer' }, stock: { type: 'integer' }, active: { type: 'boolean' }, updated_at: { type: 'string' } },
  required: ['id', 'sku', 'name', 'price_cents'] };
const client = async () => {
  const db = await createRxDatabase({ name: 'bench' + Math.random().toString(36).slice(2), storage: getRxStorageMemory(), multiInstance: false });
  await db.addCollections({ products: { schema } });
  return db;
};
const replicate = async (db, batchSize) => {
  const r = await replicateWithWebsocketServer({ collection: db.products, url, replicationIdentifier: 'bench', headers: { authorization: 'Bearer ' + token }, batchSize });
  r.error$.subscribe((e) => { console.error('replication error', e); process.exit(2); });
  return r;
};
const run = Math.random().toString(36).slice(2, 8);
const docs = (n, tag) => Array.from({ length: n }, (_, i) => ({ id: crypto.randomUUID(), sku: `${tag}-${run}-${i}`, name: `bench ${i}`, price_cents: i, stock: 1, active: true, updated_at: new Date().toISOString() }));
const rate = (n, ms) => `${n} documents in ${(ms / 1000).toFixed(2)} s = ${Math.round(n / (ms / 1000))} documents/s`;

// 1. Push: documents written offline, pushed on connect (batches of 100).
const a = await client();
await a.products.bulkInsert(docs(count, 'push'));
let t = performance.now();
const ra = await replicate(a, 100);
await ra.awaitInitialReplication();
await ra.awaitInSync();
console.log(`push (offline writes, batch 100): ${rate(count, performance.now() - t)}`);

// 2. Pull: a new client pulls everything the tenant holds (batches of 100).
const firstPull = async (label) => {
  const fresh = await client();
  const t = performance.now();
  const r = await replicate(fresh, 100);
  await r.awaitInitialReplication();
  const pulled = await fresh.products.count().exec();
  console.log(`pull (first sync, batch 100${label}): ${rate(pulled, performance.now() - t)}`);
  await r.cancel();
  await fresh.close();
};
await firstPull(', no planner statistics yet');
if (databaseUrl) {
  execFileSync('psql', [databaseUrl, '-qc', 'analyze'], { stdio: 'inherit' });
  await firstPull(', after ANALYZE');
}
const b = await client();
const rb = await replicate(b, 100);
await rb.awaitInitialReplication();

// 3. Live: A writes one document at a time; time until B holds all of them.
const live = Math.min(count, 2000);
const before = await b.products.count().exec();
t = performance.now();
for (const doc of docs(live, 'live')) await a.products.insert(doc);
while ((await b.products.count().exec()) < before + live) await new Promise((r) => setTimeout(r, 5));
console.log(`live (one insert at a time, A to B): ${rate(live, performance.now() - t)}`);
await a.close(); await b.close();
process.exit(0);
