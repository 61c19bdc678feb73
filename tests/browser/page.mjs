// What the browser tests share: headless chromium (Debian's, or $CHROMIUM) with one desktop-sized
// page whose script errors and console errors are collected.

/** Launch chromium and open a 1280×900 page; `fail(message)` ends the run when it cannot start. */
export async function launchPage(chromium, { stepMs, fail }) {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-dev-shm-usage'],
    headless: true,
  }).catch((err) => fail(`cannot start chromium: ${err.message}`));
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.setDefaultTimeout(stepMs);
  const pageErrors = [];
  page.on('pageerror', (err) => pageErrors.push(err.message));
  page.on('console', (msg) => {
    if (msg.type() === 'error') pageErrors.push(`console: ${msg.text()}`);
  });
  return { browser, page, pageErrors };
}
