// End-to-end run of the manager console in Debian's headless chromium, driven by playwright-core.
// Run by tests/console_browser.rs; talks to it over stdout (lines starting with "console-e2e:")
// and stdin (the test writes one line when the conflicting change has been pushed).
//
// Environment:
//   CONSOLE_URL          hub base URL, e.g. http://127.0.0.1:40123
//   CONSOLE_TOKEN        a manager token of the tenant
//   CONSOLE_EMPLOYEE_TOKEN  an Employee token of the tenant, user employee-eli (no conflict review for it)
//   CONSOLE_SHORT_TOKEN     the manager's token expiring within the console's warning time
//   CONSOLE_FRESH_TOKEN     the manager's fresh token, to renew it with
//   CONSOLE_SCREENSHOT   where to save the screenshot (PNG); a phone-width one goes next to it
//   E2E_DEVICES          comma-separated device ids that must show as online
//   E2E_WINNER, E2E_OTHER  the conflict's winning and losing values, as the console shows them (JSON)
//   E2E_BROADCAST        text of a broadcast the test sends along with the conflicting push
//   CHROMIUM             browser binary (default /usr/bin/chromium)
//
// Exits 0 when every step passed, 1 with the reason otherwise.

import { chromium } from 'playwright-core';
import { launchPage } from './page.mjs';
import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import path from 'node:path';

const env = (name, fallback) => {
  const v = process.env[name] ?? fallback;
  if (v === undefined) fail(`environment variable ${name} is not set`);
  return v;
};

function say(msg) {
  process.stdout.write(`console-e2e: ${msg}\n`);
}

function fail(msg) {
  process.stderr.write(`console-e2e: FAILED: ${msg}\n`);
  process.exit(1);
}

const url = env('CONSOLE_URL');
const token = env('CONSOLE_TOKEN');
const employeeToken = env('CONSOLE_EMPLOYEE_TOKEN');
const shortToken = env('CONSOLE_SHORT_TOKEN');
const freshToken = env('CONSOLE_FRESH_TOKEN');
const screenshot = env('CONSOLE_SCREENSHOT');
const devices = env('E2E_DEVICES', '').split(',').filter(Boolean);
const winner = env('E2E_WINNER');
const other = env('E2E_OTHER');
const broadcast = env('E2E_BROADCAST');
const phoneShot = screenshot.replace(/(\.png)?$/, '-375.png');
/** A screenshot of a step, kept beside the others as a test artifact. */
async function stepShot(page, name) {
  const file = screenshot.replace(/(\.png)?$/, `-${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  say(`screenshot (${name}): ${path.resolve(file)}`);
}
const STEP_MS = 20000;

const stdinLines = createInterface({ input: process.stdin });
const nextStdinLine = () => new Promise((resolve) => stdinLines.once('line', resolve));

let step = 'start';
const problems = [];

async function check(name, fn) {
  step = name;
  say(`step: ${name}`);
  await fn();
}

function expect(cond, msg) {
  if (!cond) throw new Error(msg);
}

/** Press Tab until `match(activeElementInfo)` holds; returns the trail of what got focus. */
async function tabUntil(page, match, maxPresses, what) {
  const trail = [];
  for (let i = 0; i < maxPresses; i++) {
    await page.keyboard.press('Tab');
    const info = await page.evaluate(() => {
      const el = document.activeElement;
      if (!el || el === document.body) return { tag: 'body', text: '' };
      return {
        tag: el.tagName.toLowerCase(),
        id: el.id,
        cls: el.className,
        text: (el.getAttribute('aria-label') || el.textContent || el.value || '').trim().replace(/\s+/g, ' ').slice(0, 80),
        outline: getComputedStyle(el).outlineStyle,
      };
    });
    trail.push(info.text ? `${info.tag}:"${info.text}"` : `${info.tag}${info.id ? `#${info.id}` : ''}`);
    if (match(info)) return { info, trail };
  }
  throw new Error(`keyboard: ${maxPresses} Tab presses did not reach ${what}; focus went ${trail.join(' → ')}`);
}

async function noHorizontalOverflow(page, where) {
  const m = await page.evaluate(() => {
    const doc = document.documentElement;
    const wide = [...document.querySelectorAll('body *')]
      .filter((el) => {
        const r = el.getBoundingClientRect();
        return r.width > 0 && r.right > doc.clientWidth + 1 && getComputedStyle(el).position !== 'absolute';
      })
      .slice(0, 5)
      .map((el) => `${el.tagName.toLowerCase()}${el.id ? `#${el.id}` : ''}.${el.className}`);
    return { scroll: doc.scrollWidth, client: doc.clientWidth, wide };
  });
  expect(m.scroll <= m.client && m.wide.length === 0,
    `${where}: the page overflows horizontally (scrollWidth ${m.scroll} > ${m.client}; too wide: ${m.wide.join(', ') || 'n/a'})`);
}

const { browser, page, pageErrors } = await launchPage(chromium, { stepMs: STEP_MS, fail });

let ok = false;
try {
  await check('open /console', async () => {
    const res = await page.goto(`${url}/console`);
    expect(res && res.ok(), `GET /console answered ${res?.status()}`);
    const csp = res.headers()['content-security-policy'] ?? '';
    expect(csp.includes("default-src 'none'"), `no strict Content-Security-Policy on /console: "${csp}"`);
    await page.getByRole('heading', { name: 'Sign in' }).waitFor();
  });

  await check('sign in with the manager token', async () => {
    await page.getByLabel('Token', { exact: true }).fill(token);
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.locator('#conn[data-state="open"]').waitFor();
    const who = await page.locator('#who').innerText();
    expect(/Manager/.test(who), `the header does not show the Manager role: "${who}"`);
    const stored = await page.evaluate(() => [sessionStorage.length, localStorage.length]);
    expect(stored[0] === 1 && stored[1] === 0, `the token must be in sessionStorage only (session ${stored[0]}, local ${stored[1]})`);
    await page.locator('#badge').waitFor();
  });

  await check('a condition without a value is refused, not sent as ""', async () => {
    await page.locator('#sub-form').getByLabel('Table').selectOption('products');
    const cond = page.locator('#condition-list li').first();
    await cond.getByLabel('Column').selectOption('price_cents');
    await cond.getByLabel('Operator').selectOption('gte');
    await page.getByRole('button', { name: 'Subscribe' }).click();
    await page.locator('#sub-form', { hasText: 'has no value' }).waitFor();
    expect(await page.locator('#feed .entry.snapshot').count() === 0, 'a subscription was made without a value');
  });

  await check('subscribe to products with a filter and a snapshot', async () => {
    await page.locator('#sub-form').getByLabel('Table').selectOption('products');
    const cond = page.locator('#condition-list li').first();
    await cond.getByLabel('Column').selectOption('price_cents');
    await cond.getByLabel('Operator').selectOption('gte');
    await cond.getByLabel('Value').fill('0');
    await page.getByRole('button', { name: 'Subscribe' }).click();
    await page.locator('#feed .entry.snapshot', { hasText: '2 rows' }).waitFor();
  });

  await check('a second subscription: products at 92 cents or less', async () => {
    await page.locator('#sub-form').getByLabel('Name').fill('cheap');
    await page.locator('#sub-form').getByLabel('Table').selectOption('products');
    const cond = page.locator('#condition-list li').first();
    await cond.getByLabel('Column').selectOption('price_cents');
    await cond.getByLabel('Operator').selectOption('lte');
    await cond.getByLabel('Value').fill('92');
    await page.getByRole('button', { name: 'Subscribe', exact: true }).click();
    await page.locator('#feed .entry.snapshot', { hasText: 'cheap' }).waitFor();
  });

  await check('presence shows the devices', async () => {
    for (const d of devices) await page.locator('#presence-list', { hasText: `device ${d}` }).waitFor();
  });

  await check('no conflict before the push', async () => {
    await page.locator('#badge-text', { hasText: 'Conflicts: 0 open' }).waitFor();
  });

  say('ready');
  await check('wait for the conflicting push', async () => {
    const line = await Promise.race([nextStdinLine(), new Promise((r) => setTimeout(() => r(null), 60000))]);
    expect(line !== null, 'the test did not say that it pushed the conflicting change');
  });

  await check('the badge shows 1 open conflict and the list shows it', async () => {
    await page.locator('#badge-text', { hasText: 'Conflicts: 1 open' }).waitFor();
    await page.locator('#conflict-list li').first().waitFor();
    const count = await page.locator('#conflict-list li').count();
    expect(count === 1, `the list shows ${count} conflicts, expected 1`);
  });

  // The demo config labels products by name and shows price_cents as money.
  let winnerShown;
  let otherShown;
  await check('the conflict names its row by its label, values read as money', async () => {
    await page.locator('#conflict-list li .ci-title', { hasText: 'Flat white (products)' }).waitFor();
    const money = (cents) => page.evaluate((c) => new Intl.NumberFormat(undefined, { style: 'currency', currency: 'USD' }).format(c / 100), Number(cents));
    [winnerShown, otherShown] = [await money(winner), await money(other)];
    const values = (await page.locator('#conflict-list li .ci-values').innerText()).trim();
    expect(values.includes(winnerShown) && values.includes(otherShown), `the list should show ${winnerShown} and ${otherShown}: "${values}"`);
  });

  let conflictTitle;
  await check('the broadcast shows as a banner', async () => {
    await page.locator('#banners .banner', { hasText: broadcast }).waitFor();
  });

  await check('keyboard: Tab from the top reaches the conflict, Enter opens it', async () => {
    // Start where a person starts: a click on the page's title moves the point from which
    // Tab goes on (blurring alone would leave it where the last focus was).
    await page.evaluate(() => { document.activeElement?.blur(); window.scrollTo(0, 0); });
    await page.locator('h1').click();
    const { info, trail } = await tabUntil(page, (i) => i.cls === 'conflict-open', 30, 'the conflict in the list');
    say(`keyboard: ${trail.length} Tab presses: ${trail.join(' → ')}`);
    conflictTitle = info.text;
    expect(info.outline !== 'none', 'the focused conflict shows no focus outline');
    await page.keyboard.press('Enter');
    await page.locator('#conflict-detail .sides').waitFor();
    const focused = await page.evaluate(() => document.activeElement?.id);
    expect(focused === 'detail-h', `opening a conflict should move focus to its heading, not ${focused}`);
  });

  await check('both values side by side', async () => {
    const server = page.locator('#conflict-detail .side-server .value');
    const incoming = page.locator('#conflict-detail .side-incoming .value');
    const [sv, iv] = [(await server.innerText()).trim(), (await incoming.innerText()).trim()];
    const shown = new Set([sv, iv]);
    expect(shown.has(winnerShown) && shown.has(otherShown), `expected values ${winnerShown} and ${otherShown} side by side, the page shows ${sv} and ${iv}`);
    const [a, b] = [await server.boundingBox(), await incoming.boundingBox()];
    expect(a && b && Math.abs(a.y - b.y) < 4 && b.x > a.x + a.width - 1, 'the two values are not side by side');
    await page.locator('#conflict-detail .side.won').waitFor();
    await page.locator('#conflict-detail .current dl').waitFor();
    // In plain words: whose change was kept and why, not "server" and "incoming".
    const kept = (await page.locator('#conflict-detail .side.won h4').innerText()).trim();
    const notKept = (await page.locator('#conflict-detail .side.lost h4').innerText()).trim();
    expect(/^Kept: \S+'s change \(newer\)/.test(kept), `the kept side says "${kept}"`);
    expect(/^Not kept: \S+'s change/.test(notKept), `the other side says "${notKept}"`);
    const line = (await page.locator('#conflict-list li.selected .ci-values').innerText()).trim();
    expect(line.startsWith('Kept: ') && line.includes(' · not kept: '), `the list says "${line}"`);
  });

  await check('Escape closes the view and returns focus to the list; Enter opens it again', async () => {
    await page.keyboard.press('Escape');
    await page.locator('#conflict-detail').waitFor({ state: 'hidden' });
    const cls = await page.evaluate(() => document.activeElement?.className);
    expect(cls === 'conflict-open', `after Escape focus is on "${cls}", not the conflict`);
    await page.keyboard.press('Enter');
    await page.locator('#conflict-detail .sides').waitFor();
  });

  await check('phone width: nothing overflows with the conflict open', async () => {
    await page.setViewportSize({ width: 375, height: 812 });
    await page.waitForTimeout(200);
    await noHorizontalOverflow(page, '375 px, conflict open');
    await page.setViewportSize({ width: 1280, height: 900 });
  });

  await check('keyboard: Tab reaches "Use the other value instead", Enter resolves', async () => {
    await page.locator('#detail-h').focus();
    const { info, trail } = await tabUntil(page, (i) => i.tag === 'button' && /^Use \S+'s value instead/.test(i.text), 10, 'the "Use …\'s value instead" button');
    say(`keyboard: ${trail.length} Tab presses: ${trail.join(' → ')}`);
    expect(info.text.includes(otherShown), `the button should name the other value ${otherShown}: "${info.text}"`);
    expect(info.outline !== 'none', 'the focused resolve button shows no focus outline');
    await page.keyboard.press('Enter');
    await page.locator('#conflict-detail .resolve.done').waitFor();
    await page.locator('#conflict-detail .result', { hasText: 'resolved' }).waitFor();
    await page.locator('#conflict-detail .status', { hasText: 'resolved' }).first().waitFor();
  });

  await check('the badge goes to 0 and the feed shows the change', async () => {
    await page.locator('#badge-text', { hasText: 'Conflicts: 0 open' }).waitFor();
    await page.locator('#feed .entry.update', { hasText: otherShown }).first().waitFor();
    await page.locator('#feed .entry.update .row-label', { hasText: 'Flat white' }).first().waitFor();
    await page.locator('#conflict-detail .current', { hasText: otherShown }).waitFor();
    await page.locator('#conflict-detail .resolution-facts', { hasText: otherShown }).waitFor();
  });

  await check('download every conflict as CSV', async () => {
    await page.locator('#cf-status').selectOption('');
    const [download] = await Promise.all([page.waitForEvent('download'), page.locator('#conflict-export').click()]);
    const text = readFileSync(await download.path(), 'utf8');
    const lines = text.trimEnd().split('\r\n');
    expect(lines[0].startsWith('id,created_at,status,table,key,field,kept,policy,stored_value'), `the CSV header is "${lines[0]}"`);
    expect(lines.some((l) => /^\d+,.*,resolved,products,/.test(l) && l.includes(other)), `no resolved conflict with ${other} in:\n${text}`);
    await page.locator('#conflicts-note', { hasText: 'downloaded' }).waitFor();
    await page.locator('#cf-status').selectOption('open');
  });

  say('ready for a second conflict');
  await check('a second conflict: a stale keep is refused, then it is dismissed, nothing written', async () => {
    const line = await Promise.race([nextStdinLine(), new Promise((r) => setTimeout(() => r(null), 60000))]);
    expect(line !== null, 'the test did not say that it pushed the second conflicting change');
    await page.locator('#badge-text', { hasText: 'Conflicts: 1 open' }).waitFor();
    await page.locator('#conflict-list li', { hasText: '70' }).first().locator('.conflict-open').click();
    await page.locator('#conflict-detail .sides').waitFor();
    await page.locator('#conflict-detail .current', { hasText: '90' }).waitFor();
    // The price moves on while the page shows 90: keeping the winner now is refused.
    say('showing the second conflict');
    const moved = await Promise.race([nextStdinLine(), new Promise((r) => setTimeout(() => r(null), 60000))]);
    expect(moved !== null, 'the test did not say that the price moved');
    // At 95 the product left the "cheap" subscription: said so, not called a delete.
    await page.locator('#feed .entry.left-filter', { hasText: 'left the filter' }).waitFor();
    expect(await page.locator('#feed .entry.delete').count() === 0, 'a row that left a filter is shown as deleted');
    await page.getByRole('button', { name: /^Keep \S+'s value/ }).click();
    await page.locator('#conflict-detail .resolve .error', { hasText: 'changed since this page showed it' }).waitFor();
    await stepShot(page, 'stale-keep');
    await page.locator('#conflict-detail .current strong', { hasText: '95' }).waitFor();
    await page.locator('#badge-text', { hasText: 'Conflicts: 1 open' }).waitFor();
    await page.getByRole('button', { name: 'Dismiss (write nothing)' }).click();
    await page.locator('#conflict-detail .resolve.done', { hasText: 'Dismissed' }).waitFor();
    await page.locator('#conflict-detail .result', { hasText: 'dismissed it (nothing written)' }).waitFor();
    await page.locator('#badge-text', { hasText: 'Conflicts: 0 open' }).waitFor();
    expect(!(await page.locator('#conflict-detail .resolution-facts').innerText()).includes('Value written'), 'a dismissal wrote a value');
    await page.locator('#conflict-detail .current', { hasText: '95' }).waitFor();
  });

  say('ready for a delete that wins');
  await check('a delete that won: "deleted by", and what can be done: keep it deleted or restore it', async () => {
    const line = await Promise.race([nextStdinLine(), new Promise((r) => setTimeout(() => r(null), 60000))]);
    expect(line !== null, 'the test did not say that it pushed the change to a deleted row');
    await page.locator('#badge-text', { hasText: 'Conflicts: 1 open' }).waitFor();
    await page.locator('#conflict-list li', { hasText: 'deleted' }).first().locator('.conflict-open').click();
    await page.locator('#conflict-detail .side.won .value', { hasText: 'deleted by pos-a' }).waitFor();
    expect(!(await page.locator('#conflict-detail').innerText()).includes('null'), 'the deleted side shows null');
    expect(await page.getByRole('button', { name: /^Use \S+'s value instead/ }).count() === 0, 'a value it cannot write is offered');
    await page.getByRole('button', { name: 'Keep it deleted' }).waitFor();
    const price = await page.evaluate(() => new Intl.NumberFormat(undefined, { style: 'currency', currency: 'USD' }).format(3));
    await page.getByRole('button', { name: `Restore it with pos-b's value: ${price}` }).click();
    await page.locator('#conflict-detail .resolve.done', { hasText: 'Resolved' }).waitFor();
    await page.locator('#badge-text', { hasText: 'Conflicts: 0 open' }).waitFor();
    // The row is back as it was deleted, with pos-b's price.
    await page.locator('#conflict-detail .current', { hasText: 'Chai' }).waitFor();
    await page.locator('#conflict-detail .current strong', { hasText: price }).waitFor();
  });

  say('ready for bulk review');
  await check('bulk review: select all, keep (one refused as stale), then dismiss the rest', async () => {
    const line = await Promise.race([nextStdinLine(), new Promise((r) => setTimeout(() => r(null), 60000))]);
    expect(line !== null, 'the test did not say that it pushed two more conflicts');
    await page.getByRole('button', { name: /^Close conflict/ }).click();
    await page.locator('#badge-text', { hasText: 'Conflicts: 2 open' }).waitFor();
    await page.locator('#conflict-list .conflict-pick').nth(1).waitFor();
    // With the keyboard: the "Select all shown" box, then the action.
    await page.locator('#bulk-all').focus();
    await page.keyboard.press('Space');
    await page.locator('#bulk-count', { hasText: '2 selected' }).waitFor();
    await page.locator('#bulk-keep').click();
    const summary = page.locator('#bulk-result');
    await summary.filter({ hasText: 'refused' }).waitFor();
    const text = await summary.innerText();
    expect(/^1 kept what was kept; 1 refused: #\d+ \(`price_cents` changed/.test(text), `the summary says "${text}"`);
    await stepShot(page, 'bulk-review');
    await page.locator('#bulk-count', { hasText: '1 selected' }).waitFor();
    await page.locator('#bulk-dismiss').click();
    await summary.filter({ hasText: '1 dismissed' }).waitFor();
    await page.locator('#badge-text', { hasText: 'Conflicts: 0 open' }).waitFor();
  });

  await check('phone width: nothing overflows after resolving', async () => {
    await page.setViewportSize({ width: 375, height: 812 });
    await page.waitForTimeout(200);
    await noHorizontalOverflow(page, '375 px, after resolving');
    await page.screenshot({ path: phoneShot, fullPage: true });
    say(`screenshot (375 px): ${path.resolve(phoneShot)}`);
    await page.setViewportSize({ width: 1280, height: 900 });
    await page.waitForTimeout(200);
  });

  await check('keyboard: the banner is dismissed with its button', async () => {
    const dismiss = page.locator('#banners .banner').getByRole('button', { name: /Dismiss/ });
    await page.locator('h1').click();
    await tabUntil(page, (i) => i.tag === 'button' && /^Dismiss/.test(i.text), 10, 'the banner\'s Dismiss button');
    await page.keyboard.press('Enter');
    await dismiss.waitFor({ state: 'detached' });
  });

  await check('filters by device and by days', async () => {
    const day = (plus) => page.evaluate((p) => {
      const d = new Date();
      d.setDate(d.getDate() + p);
      return `${d.getFullYear()}-${String(d.getMonth() + 1).padStart(2, '0')}-${String(d.getDate()).padStart(2, '0')}`;
    }, plus);
    const show = () => page.getByRole('button', { name: 'Show', exact: true }).click();
    await page.locator('#cf-status').selectOption('');
    await page.locator('#cf-device').fill('nobody');
    await show();
    await page.locator('#conflict-empty').waitFor();
    await page.locator('#cf-device').fill('pos-b');
    await page.locator('#cf-since').fill(await day(0));
    await page.locator('#cf-until').fill(await day(0));
    await show();
    await page.locator('#conflict-list li').nth(2).waitFor();
    const hash = await page.evaluate(() => location.hash);
    expect(hash.includes('device=pos-b') && hash.includes(`since=${await day(0)}`), `the URL lacks the filters: "${hash}"`);
    await page.locator('#cf-since').fill(await day(1));
    await page.locator('#cf-until').fill('');
    await show();
    await page.locator('#conflict-empty').waitFor();
    for (const f of ['#cf-device', '#cf-since']) await page.locator(f).fill('');
    await page.locator('#cf-status').selectOption('open');
    await show();
  });

  await check('search by row label, field and user', async () => {
    const show = () => page.getByRole('button', { name: 'Show', exact: true }).click();
    const titles = async (ok) => {
      let shown = [];
      for (let i = 0; i < 100; i += 1) {
        shown = await page.locator('#conflict-list li .ci-title').allInnerTexts();
        if (ok(shown)) return shown;
        await page.waitForTimeout(100);
      }
      return shown;
    };
    await page.locator('#cf-status').selectOption('');
    // The chai's conflict (its row restored by then).
    await page.locator('#cf-label').fill('chai');
    await show();
    let shown = await titles((t) => t.length === 1 && t[0].includes('Chai (products)'));
    expect(shown.length === 1 && shown[0].includes('Chai (products)'), `"chai" should find the chai's conflict alone: ${JSON.stringify(shown)}`);
    await page.locator('#cf-label').fill('OAT');
    await page.locator('#cf-field').fill('price_cents');
    await page.locator('#cf-user').fill('user-pos-b');
    await show();
    shown = await titles((t) => t.length === 2 && t.every((x) => x.includes('Oat milk (products)')));
    expect(shown.length === 2 && shown.every((x) => x.includes('Oat milk (products)')), `"OAT" by user-pos-b on price_cents: ${JSON.stringify(shown)}`);
    const hash = await page.evaluate(() => location.hash);
    expect(/label=OAT/.test(hash) && /user=user-pos-b/.test(hash) && /field=price_cents/.test(hash), `the URL lacks the filters: "${hash}"`);
    await stepShot(page, 'filters');
    await page.locator('#cf-user').fill('nobody');
    await show();
    await page.locator('#conflict-empty').waitFor();
    for (const f of ['#cf-label', '#cf-field', '#cf-user']) await page.locator(f).fill('');
    await page.locator('#cf-status').selectOption('open');
    await show();
  });

  await check('a reload keeps the filters, the open conflict and the subscriptions', async () => {
    await page.locator('#cf-status').selectOption('resolved');
    await page.getByRole('button', { name: 'Show', exact: true }).click();
    const first = page.locator('#conflict-list li button.conflict-open').first();
    await first.click();
    await page.locator('#conflict-detail .sides').waitFor();
    const title = (await page.locator('#detail-h').innerText()).trim();
    const hash = await page.evaluate(() => location.hash);
    expect(/status=resolved/.test(hash) && /conflict=\d+/.test(hash), `the URL does not say where the review is: "${hash}"`);
    await page.reload();
    await page.locator('#conn[data-state="open"]').waitFor();
    await page.locator('#conflict-detail .sides').waitFor();
    const again = (await page.locator('#detail-h').innerText()).trim();
    expect(again === title, `after a reload "${again}" is open, not "${title}"`);
    expect((await page.locator('#cf-status').inputValue()) === 'resolved', 'the status filter was lost');
    await page.locator('#sub-list li', { hasText: 'cheap' }).waitFor();
    await page.locator('#feed .entry.snapshot', { hasText: 'cheap' }).waitFor();
    // A link to a conflict opens it.
    await page.getByRole('button', { name: /^Close conflict/ }).click();
    await page.evaluate((h) => { location.hash = h; }, hash);
    await page.locator('#conflict-detail .sides').waitFor();
    expect((await page.locator('#detail-h').innerText()).trim() === title, 'the link did not open its conflict');
    await page.getByRole('button', { name: /^Close conflict/ }).click();
    await page.locator('#cf-status').selectOption('open');
    await page.getByRole('button', { name: 'Show', exact: true }).click();
  });

  await check('a token about to expire: warned, renewed in place, nothing lost', async () => {
    await page.getByRole('button', { name: 'Sign out' }).click();
    await page.getByLabel('Token', { exact: true }).fill(shortToken);
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.locator('#conn[data-state="open"]').waitFor();
    await page.locator('#renew-when', { hasText: 'expires at' }).waitFor();
    await stepShot(page, 'token-expiring');
    await page.locator('#cf-status').selectOption('resolved');
    await page.getByRole('button', { name: 'Show', exact: true }).click();
    await page.locator('#conflict-list li button.conflict-open').first().click();
    await page.locator('#conflict-detail .sides').waitFor();
    const title = (await page.locator('#detail-h').innerText()).trim();
    await page.evaluate(() => { window.stillThisPage = true; });
    // Another user's token is not a renewal.
    await page.locator('#renew-token').fill(employeeToken);
    await page.getByRole('button', { name: 'Renew' }).click();
    await page.locator('#renew-error', { hasText: 'employee-eli' }).waitFor();
    await page.locator('#renew-token').fill(freshToken);
    await page.getByRole('button', { name: 'Renew' }).click();
    await page.locator('#renew').waitFor({ state: 'hidden' });
    expect(await page.evaluate(() => window.stillThisPage === true), 'the page was reloaded');
    expect((await page.locator('#detail-h').innerText()).trim() === title, 'the open conflict was lost');
    expect((await page.locator('#conn').getAttribute('data-state')) === 'open', 'the connection is not live');
    expect((await page.locator('#renew-token').inputValue()) === '', 'the renew box was not cleared');
    expect(await page.evaluate((t) => Object.values({ ...sessionStorage }).includes(t), freshToken), 'a reload would not use the fresh token');
    await page.getByRole('button', { name: /^Close conflict/ }).click();
  });

  await check('an Employee sees the feed and presence, not conflicts', async () => {
    const other = await browser.newContext({ viewport: { width: 375, height: 812 } });
    const emp = await other.newPage();
    emp.setDefaultTimeout(STEP_MS);
    emp.on('pageerror', (err) => pageErrors.push(`employee page: ${err.message}`));
    await emp.goto(`${url}/console`);
    await emp.getByLabel('Token', { exact: true }).fill(employeeToken);
    await emp.getByLabel('Token', { exact: true }).press('Enter');
    await emp.locator('#conn[data-state="open"]').waitFor();
    for (const d of devices) await emp.locator('#presence-list', { hasText: `device ${d}` }).waitFor();
    await emp.locator('#sub-form').waitFor();
    expect(await emp.locator('#conflicts').isHidden(), 'an Employee must not see the conflict panel');
    expect(await emp.locator('#badge').isHidden(), 'an Employee must not see the conflict badge');
    await noHorizontalOverflow(emp, '375 px, Employee');
    // The manager's page saw the Employee's console come and sees it go.
    await page.locator('#presence-log', { hasText: 'employee-eli joined' }).waitFor();
    await other.close();
    await page.locator('#presence-log', { hasText: 'employee-eli left' }).waitFor();
  });

  await check('screen readers get summaries of the busy feed, not every entry', async () => {
    for (const list of ['#feed', '#presence-log']) {
      const live = await page.locator(list).getAttribute('aria-live');
      expect(live === 'off', `${list} is read out entry by entry (aria-live ${live})`);
    }
    await page.locator('#feed-summary', { hasText: /\d+ new entr(y|ies) in the feed/ }).waitFor({ state: 'attached' });
    expect((await page.locator('#feed-summary').getAttribute('role')) === 'status', 'the summary is not a status');
  });

  await check('no script errors', async () => {
    const real = pageErrors.filter((e) => !/Failed to load resource/.test(e));
    expect(real.length === 0, `the page logged errors: ${real.join(' | ')}`);
  });
  say(`resolved ${conflictTitle}`);
  ok = true;
} catch (err) {
  problems.push(`step "${step}": ${err.message.split('\n')[0]}`);
} finally {
  try {
    await page.screenshot({ path: screenshot, fullPage: true });
    say(`screenshot: ${path.resolve(screenshot)}`);
  } catch (err) {
    problems.push(`screenshot failed: ${err.message}`);
  }
  await browser.close();
  stdinLines.close();
}

if (!ok || problems.length) fail(problems.join('; ') || `stopped at step "${step}"`);
say('passed');
process.exit(0);
