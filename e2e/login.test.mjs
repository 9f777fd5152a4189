// The ComfyUI web UI behind comfygate with a key and --protect-ws: a person
// opens the UI, lands on the login page, signs in once, and the page's API
// calls, its image and its WebSocket all work, with no key visible to the
// page's scripts. After logout they all fail again.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { start, chromiumArgs, chromiumPath } from "./harness.mjs";

let gw, browser;

before(async () => {
  gw = await start(["--protect-ws"]);
  browser = await chromium.launch({ executablePath: chromiumPath, args: chromiumArgs });
});

after(async () => {
  await browser?.close();
  await gw?.stop();
});

async function statusOf(page, id) {
  await page.waitForFunction((id) => !/^(pending|not sent)$/.test(document.getElementById(id).textContent), id, { timeout: 15000 });
  return page.textContent(`#${id}`);
}

test("log in, use the UI, log out", async () => {
  const context = await browser.newContext();
  const page = await context.newPage();

  // Opening the UI lands on the login page.
  await page.goto(gw.url + "/");
  assert.match(new URL(page.url()).pathname, /^\/login$/);
  assert.equal(await page.getAttribute("#key", "type"), "password");
  const shots = process.env.E2E_SCREENSHOTS || join(process.env.TMPDIR || "/tmp", "comfygate-e2e-shots");
  mkdirSync(shots, { recursive: true });
  await page.screenshot({ path: join(shots, "login.png") });

  // A wrong key: a clear error, no session.
  await page.fill("#key", gw.key.slice(0, -2) + "xx");
  await page.click("button[type=submit]");
  assert.equal((await page.textContent("#error")).trim(), "That key is not valid.");
  assert.equal((await context.cookies()).length, 0);
  await page.screenshot({ path: join(shots, "login-error.png") });

  // The right key: back to the UI, and everything it does works.
  await page.fill("#key", gw.key);
  await Promise.all([page.waitForURL(gw.url + "/"), page.click("button[type=submit]")]);
  assert.match(await statusOf(page, "object-info"), /^ok \d+ node classes/);
  assert.match(await statusOf(page, "ws"), /^ok connected/);
  assert.equal(await statusOf(page, "img"), "ok 64x64");
  await page.click("#queue");
  await page.waitForFunction(() => /^ok finished /.test(document.getElementById("prompt").textContent), null, { timeout: 15000 });
  await page.screenshot({ path: join(shots, "ui-after-login.png") });

  // No key anywhere a script could read it.
  const visible = await page.evaluate(() => [document.cookie, document.documentElement.outerHTML,
    JSON.stringify({ ...localStorage }), JSON.stringify({ ...sessionStorage }), window.name].join("\n"));
  assert.ok(!visible.includes(gw.key), "the key is visible to the page");
  assert.ok(!visible.includes("comfygate_session"), "the session cookie is visible to scripts");
  const [cookie] = await context.cookies();
  assert.equal(cookie.name, "comfygate_session");
  assert.equal(cookie.httpOnly, true);
  assert.equal(cookie.sameSite, "Lax");
  assert.ok(!cookie.value.includes(gw.key));

  // Log out in a second tab: the UI tab's calls, image and socket all fail.
  const other = await context.newPage();
  await other.goto(gw.url + "/logout");
  assert.match(other.url(), /\/login\?logged_out=1$/);
  await page.screenshot({ path: join(shots, "ui-before-reload.png") });
  const after = await page.evaluate(async () => {
    const api = (await fetch("/api/object_info")).status;
    const view = (await fetch("/api/view?filename=gw_probe_207800_00001_.png&type=output")).status;
    const prompt = (await fetch("/api/prompt", { method: "POST", body: "{}" })).status;
    const socket = await new Promise((resolve) => {
      const ws = new WebSocket(`ws://${location.host}/ws?clientId=after-logout`);
      ws.onopen = () => resolve("open");
      ws.onerror = () => resolve("refused");
    });
    const img = await new Promise((resolve) => {
      const i = new Image();
      i.onload = () => resolve("loaded");
      i.onerror = () => resolve("failed");
      i.src = "/api/view?filename=gw_probe_207800_00001_.png&type=output&n=" + Math.random();
    });
    return { api, view, prompt, socket, img };
  });
  assert.deepEqual(after, { api: 401, view: 401, prompt: 401, socket: "refused", img: "failed" });
  await page.goto(gw.url + "/");
  assert.match(new URL(page.url()).pathname, /^\/login$/);
  await context.close();

  assert.ok(!gw.logs.gateway.includes(gw.key), "the gateway logged the key");
});

test("another site cannot use the session", async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  await page.goto(gw.url + "/login");
  await page.fill("#key", gw.key);
  await Promise.all([page.waitForURL(gw.url + "/"), page.click("button[type=submit]")]);

  // A page on another origin of the same site (the simulator's port plays
  // the attacker; SameSite=Lax still sends the cookie to same-site hosts)
  // posts to the gateway with the browser's cookies.
  const evil = await context.newPage();
  await evil.goto(gw.simUrl + "/");
  const before = (gw.logs.gateway.match(/path=\/api\/interrupt status=403/g) || []).length;
  await evil.evaluate(async (target) => {
    await fetch(target + "/api/interrupt", { method: "POST", credentials: "include", mode: "no-cors" }).catch(() => {});
  }, gw.url);
  await new Promise((r) => setTimeout(r, 300));
  const refused = (gw.logs.gateway.match(/path=\/api\/interrupt status=403/g) || []).length;
  assert.equal(refused, before + 1, "the cross-site POST was not refused with 403");
  assert.match(gw.logs.gateway, /auth_failure=cross_site/);
  await context.close();
});
