// The console's Operations view in Debian's headless chromium, driven by playwright-core.
// Run by tests/operations_view.rs (a_manager_reads_the_operations_view_in_the_browser), which
// reads its stdout (lines starting with "operations-e2e:").
//
// Environment:
//   CONSOLE_URL            hub base URL, e.g. http://127.0.0.1:40123
//   CONSOLE_TOKEN          a manager token of the tenant
//   OPERATIONS_SCREENSHOT  where to save the screenshot of the view (PNG)
//   E2E_ONLINE             a device that is online now
//   E2E_OFFLINE            a device seen today that is offline
//   E2E_NOT_TODAY          a device last seen before today
//   E2E_CHANGES            changes the tenant logged in the last day (the first chart's total)
//   E2E_CONFLICTS          conflicts logged in the last day (the second chart's total)
//   CHROMIUM               browser binary (default /usr/bin/chromium)
//
// Exits 0 when every step passed, 1 with the reason otherwise.

import { chromium } from 'playwright-core';
import { launchPage } from './page.mjs';
import path from 'node:path';

function say(msg) {
  process.stdout.write(`operations-e2e: ${msg}\n`);
}

function fail(msg) {
  process.stderr.write(`operations-e2e: FAILED: ${msg}\n`);
  process.exit(1);
}

const env = (name) => process.env[name] ?? fail(`environment variable ${name} is not set`);

const url = env('CONSOLE_URL');
const token = env('CONSOLE_TOKEN');
const screenshot = env('OPERATIONS_SCREENSHOT');
const online = env('E2E_ONLINE');
const offline = env('E2E_OFFLINE');
const notToday = env('E2E_NOT_TODAY');
const changes = Number(env('E2E_CHANGES'));
const conflicts = Number(env('E2E_CONFLICTS'));
const STEP_MS = 20000;

let step = 'start';

async function check(name, fn) {
  step = name;
  say(`step: ${name}`);
  await fn();
}

function expect(cond, msg) {
  if (!cond) throw new Error(msg);
}

const { browser, page, pageErrors } = await launchPage(chromium, { stepMs: STEP_MS, fail });

/** The text of the device row whose header cell is `device`. */
async function rowText(device) {
  const row = page.locator('#ops-device-rows tr', { has: page.locator('th', { hasText: device }) });
  await row.waitFor();
  return (await row.innerText()).replace(/\s+/g, ' ');
}

let problem = null;
try {
  await check('open /console and sign in as a manager', async () => {
    const res = await page.goto(`${url}/console`);
    expect(res && res.ok(), `GET /console answered ${res?.status()}`);
    await page.getByLabel('Token', { exact: true }).fill(token);
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.locator('#conn[data-state="open"]').waitFor();
    await page.locator('#ops-toggle').waitFor();
  });

  await check('reach the Operations view with the keyboard', async () => {
    // From the page's first stop (the skip link), Tab reaches the header's Operations button.
    await page.locator('a.skip').focus();
    const trail = [];
    let reached = false;
    for (let i = 0; i < 10 && !reached; i++) {
      await page.keyboard.press('Tab');
      const at = await page.evaluate(() => document.activeElement?.id || document.activeElement?.tagName.toLowerCase());
      trail.push(at);
      reached = at === 'ops-toggle';
    }
    expect(reached, `Tab never reached the Operations button: ${trail.join(' → ')}`);
    expect((await page.locator('#ops-toggle').getAttribute('aria-expanded')) === 'false', 'the view starts closed');
    await page.keyboard.press('Enter');
    await page.locator('#operations').waitFor();
    expect((await page.locator('#ops-toggle').getAttribute('aria-expanded')) === 'true', 'aria-expanded does not say the view is open');
    const focused = await page.evaluate(() => document.activeElement?.id);
    expect(focused === 'operations-h', `focus went to ${focused}, not the view's heading`);
  });

  await check('the device rows', async () => {
    await page.locator('#ops-device-rows tr').first().waitFor();
    const on = await rowText(online);
    expect(/Online/.test(on) && /now/.test(on), `${online} is not shown online, seen now: "${on}"`);
    const off = await rowText(offline);
    expect(/Offline/.test(off) && /3/.test(off) && /behind|up to date/.test(off), `${offline} is not shown offline with its position and lag: "${off}"`);
    const stale = await rowText(notToday);
    expect(/Not seen today/.test(stale), `${notToday} is not marked in words as not seen today: "${stale}"`);
    const staleRow = page.locator('#ops-device-rows tr.stale', { has: page.locator('th', { hasText: notToday }) });
    expect((await staleRow.count()) === 1, `${notToday}'s row does not stand out`);
    const first = await page.locator('#ops-device-rows tr th').first().innerText();
    expect(first === notToday, `the device not seen today comes first, not ${first}`);
    // Last seen is local time: the <time> element carries the instant, the text the local date.
    const seen = await page.locator('#ops-device-rows tr', { has: page.locator('th', { hasText: offline }) }).locator('time').first().getAttribute('datetime');
    expect(seen && !Number.isNaN(Date.parse(seen)), `no machine-readable last seen for ${offline}`);
    const summary = await page.locator('#ops-devices-summary').innerText();
    expect(/1 online/.test(summary) && /1 not seen today/.test(summary), `the table's summary says "${summary}"`);
  });

  await check('the two charts, with text summaries', async () => {
    for (const [id, total, name] of [['#ops-changes', changes, 'Changes pushed per hour'], ['#ops-conflicts', conflicts, 'Conflicts per hour']]) {
      const chart = page.locator(id);
      const bars = chart.locator('svg rect.bar');
      expect((await bars.count()) === 24, `${id} does not draw 24 hourly bars`);
      const values = await bars.evaluateAll((rs) => rs.map((r) => Number(r.getAttribute('data-value'))));
      const sum = values.reduce((a, b) => a + b, 0);
      expect(sum === total, `${id}'s bars add up to ${sum}, not ${total}`);
      const tall = await bars.evaluateAll((rs) => rs.filter((r) => Number(r.getAttribute('height')) > 0).length);
      expect(total === 0 || tall > 0, `${id} draws no bar`);
      const svg = chart.locator('svg');
      expect((await svg.getAttribute('role')) === 'img', `${id}'s drawing is not an image to assistive technology`);
      const labelledBy = await svg.getAttribute('aria-labelledby');
      const label = await page.locator(`#${labelledBy}`).innerText();
      expect(label.startsWith(name) && label.includes(`${total} in all`), `${id}'s summary says "${label}"`);
    }
  });

  await check('refresh, and the page keeps to its policy', async () => {
    const before = await page.locator('#ops-updated').innerText();
    await page.waitForTimeout(1100);
    await page.getByRole('button', { name: 'Refresh now' }).click();
    await page.waitForFunction((text) => document.querySelector('#ops-updated').textContent !== text, before);
    const inline = await page.evaluate(() => [...document.querySelectorAll('#operations [style]')].length);
    expect(inline === 0, 'elements with inline styles (the policy forbids them)');
    const real = pageErrors.filter((e) => !/Failed to load resource/.test(e));
    expect(real.length === 0, `the page logged errors: ${real.join(' | ')}`);
  });

  await check('Escape closes the view and focus returns to its button', async () => {
    await page.locator('#operations-h').focus();
    await page.keyboard.press('Escape');
    await page.locator('#operations').waitFor({ state: 'hidden' });
    const focused = await page.evaluate(() => document.activeElement?.id);
    expect(focused === 'ops-toggle', `focus went to ${focused}`);
    await page.keyboard.press('Enter');
    await page.locator('#operations').waitFor();
    await page.locator('#ops-device-rows tr').first().waitFor();
  });
} catch (err) {
  problem = `step "${step}": ${err.message.split('\n')[0]}`;
} finally {
  try {
    await page.locator('#operations').scrollIntoViewIfNeeded().catch(() => {});
    await page.screenshot({ path: screenshot, fullPage: true });
    say(`screenshot: ${path.resolve(screenshot)}`);
  } catch (err) {
    problem ??= `screenshot failed: ${err.message}`;
  }
  await browser.close();
}

if (problem) fail(problem);
say('done');
process.exit(0);
