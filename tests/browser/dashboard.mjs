// Drives /dashboard in headless Chromium for tests/dashboard_browser.rs, which runs it as
// `node dashboard.mjs '<json config>'` and checks what it reports against the API.
//
// Config: {node_modules, chromium, base, key, ad, campaign, demo_key, screenshot,
//          demo_screenshot, out}. Writes to `out` what the page showed: the totals, every
//          chart point and the top-ads rows for the ad and the campaign, the error a bad
//          key gets, and for the demo advertiser the totals twice (live refresh).
// Only reads the page: every comparison with the API happens in the Rust test.

import { createRequire } from "node:module";
import { writeFileSync } from "node:fs";
import path from "node:path";

const config = JSON.parse(process.argv[2]);
// playwright-core lives in a cache outside the clone; ESM imports ignore NODE_PATH.
const require = createRequire(path.join(config.node_modules, "resolve-from-here.js"));
const { chromium } = require("playwright-core");

const TIMEOUT = 30_000;
const DASHBOARD = '[data-testid="dashboard"]';

async function login(page, key) {
  await page.fill('[data-testid="key"]', key);
  await page.click('[data-testid="login-submit"]');
}

// Waits until `scope` is rendered, then reads everything shown in ONE evaluation, so the
// numbers all come from the same refresh.
async function readView(page, scope) {
  await page.waitForSelector(`${DASHBOARD}[data-scope="${scope}"][data-state="ready"]`,
                             { timeout: TIMEOUT });
  return page.evaluate(() => {
    const main = document.querySelector('[data-testid="dashboard"]');
    const total = (id) => {
      const e = document.querySelector(`[data-testid="${id}"]`);
      return { value: Number(e.dataset.value), text: e.textContent };
    };
    const chart = document.querySelector('[data-testid="chart"]').getBoundingClientRect();
    return {
      scope: main.dataset.scope,
      granularity: main.dataset.granularity,
      from: Number(main.dataset.from),
      to: Number(main.dataset.to),
      complete_through: main.dataset.completeThrough,
      refreshes: Number(main.dataset.refreshes),
      totals: {
        billable: total("total-billable"),
        fraud: total("total-fraud"),
        late: total("total-late"),
        spend_micros: total("total-spend"),
      },
      points: [...document.querySelectorAll('[data-testid="point"]')].map((p) => ({
        series: p.dataset.series,
        window: p.dataset.window,
        value: Number(p.dataset.value),
        final: p.dataset.final === "true",
      })),
      top_ads: [...document.querySelectorAll('[data-testid="top-ad"]')].map((r) => ({
        ad_id: r.dataset.adId,
        clicks: Number(r.dataset.clicks),
        fraud_clicks: Number(r.dataset.fraudClicks),
        late_clicks: Number(r.dataset.lateClicks),
        spend_micros: Number(r.dataset.spendMicros),
      })),
      chart_size: [chart.width, chart.height],
      error: document.querySelector('[data-testid="error"]').hidden
        ? "" : document.querySelector('[data-testid="error"]').textContent,
    };
  });
}

const stored = (page) => page.evaluate(() => ({
  session: sessionStorage.getItem("clickagg.dashboard"),
  local_storage_items: localStorage.length,
  cookies: document.cookie,
}));

const browser = await chromium.launch({
  executablePath: config.chromium,
  headless: true,
  // Root in a container: Chromium's sandbox needs user namespaces it may not have.
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});
const result = { console_errors: [] };
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.on("console", (m) => { if (m.type() === "error") result.console_errors.push(m.text()); });
  page.on("pageerror", (e) => result.console_errors.push(String(e)));

  const response = await page.goto(`${config.base}/dashboard`);
  const headers = response.headers();
  result.http = {
    status: response.status(),
    content_type: headers["content-type"] || "",
    csp: headers["content-security-policy"] || "",
  };

  // A bad key: an error on the page, no dashboard, nothing stored.
  await login(page, "ckv_this-key-does-not-exist");
  const loginError = page.locator('[data-testid="login-error"]');
  await loginError.waitFor({ state: "visible", timeout: TIMEOUT });
  result.bad_key = {
    error: await loginError.textContent(),
    dashboard_visible: await page.locator(DASHBOARD).isVisible(),
    stored: await stored(page),
  };

  // The test's advertiser: one ad, then its campaign.
  await login(page, config.key);
  await page.waitForSelector(`${DASHBOARD}[data-state="ready"]`, { timeout: TIMEOUT });
  result.scopes = await page.$$eval('[data-testid="scope"] option', (os) => os.map((o) => o.value));
  result.who = await page.locator('[data-testid="who"]').textContent();
  await page.selectOption('[data-testid="scope"]', `ad:${config.ad}`);
  result.ad = await readView(page, `ad:${config.ad}`);
  await page.screenshot({ path: config.screenshot, fullPage: true });
  await page.selectOption('[data-testid="scope"]', `campaign:${config.campaign}`);
  result.campaign = await readView(page, `campaign:${config.campaign}`);
  result.logged_in_storage = await stored(page);

  // A reload keeps the session (sessionStorage) and the chosen scope.
  await page.reload();
  result.after_reload = await readView(page, `campaign:${config.campaign}`);
  await page.click('[data-testid="logout"]');
  await page.locator('[data-testid="login"]').waitFor({ state: "visible", timeout: TIMEOUT });
  result.after_logout_storage = await stored(page);

  // A demo advertiser under live traffic: the numbers move without a reload.
  if (config.demo_key) {
    await login(page, config.demo_key);
    const scope = `advertiser:${config.demo_advertiser}`;
    const first = await readView(page, scope);
    await page.waitForFunction(
      ([n, billable]) => {
        const main = document.querySelector('[data-testid="dashboard"]');
        const shown = Number(document.querySelector('[data-testid="total-billable"]').dataset.value);
        return Number(main.dataset.refreshes) >= n + 2 && shown !== billable;
      },
      [first.refreshes, first.totals.billable.value],
      { timeout: 40_000, polling: 250 },
    );
    const later = await readView(page, scope);
    await page.screenshot({ path: config.demo_screenshot, fullPage: true });
    result.demo = { first, later };
  }
} finally {
  writeFileSync(config.out, JSON.stringify(result, null, 2));
  await browser.close();
}
