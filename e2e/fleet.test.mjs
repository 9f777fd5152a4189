// The stock ComfyUI web UI (v0.3.7's real frontend, 1.4.13) in headless
// Chromium, behind comfygate in front of two REAL ComfyUI servers:
//
// 1. A fleet of two 0.3.7 servers: a person signs in on /login with a key,
//    opens a tiny workflow (EmptyImage 64x64 → ImageBlur → SaveImage), queues
//    it a few times with the UI's own Queue button, and the UI shows the
//    execution (its tab title counts the nodes done) and the final images,
//    served through the gateway by whichever server made each one.
// 2. A mixed fleet (0.3.7, which serves the UI, and 0.8.0) with --isolation
//    keys: two people, each signed in with their own key in their own
//    browser context, queue at the same time; each one's queue, history,
//    socket messages and images hold only their own prompts, and the other's
//    image URLs (and those of the first scenario, made on the same 0.3.7
//    before this gateway started) answer 404.
//
// Real ComfyUI comes from ../shared/comfyui/real/install.sh (see
// realcomfy.mjs): without it the tests skip, or fail under CI=true or
// COMFYUI_REAL_REQUIRED=1.
import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { chromiumArgs, chromiumPath } from "./harness.mjs";
import { V037, V080, missing, required, startComfys, startGateway, buildComfygate } from "./realcomfy.mjs";

const notInstalled = missing();
if (notInstalled && required()) {
  test("real ComfyUI is installed", () => {
    assert.fail(`${notInstalled} (a real ComfyUI is required here: CI or COMFYUI_REAL_REQUIRED is set)`);
  });
}
const suite = notInstalled ? { skip: notInstalled } : {};

const shots = process.env.E2E_SCREENSHOTS || join(process.env.TMPDIR || "/tmp", "comfygate-e2e-shots");
const uiTimeout = 60_000; // the machine is small and shared: generous, but every wait is for a condition

// workflow is a tiny API-format workflow: EmptyImage (size x size, color) →
// blurs × ImageBlur(radius) → SaveImage(prefix). On 64x64, a blur of
// radius 31 takes about half a second to a second on a small busy CPU:
// enough for prompts to overlap, little enough to keep the file quick.
function workflow({ prefix, color, size = 64, blurs = 1, radius = 3 }) {
  const g = { 1: { class_type: "EmptyImage", inputs: { width: size, height: size, batch_size: 1, color } } };
  for (let i = 2; i <= blurs + 1; i++) {
    g[i] = { class_type: "ImageBlur", inputs: { image: [String(i - 1), 0], blur_radius: radius, sigma: 1.0 } };
  }
  g[blurs + 2] = { class_type: "SaveImage", inputs: { images: [String(blurs + 1), 0], filename_prefix: prefix } };
  return g;
}

// Runs in every page before its own scripts: records the tab titles the UI
// sets, and every message of every WebSocket the page opens (the UI's own
// socket included), without changing what the page sees.
function recorders() {
  window.__titles = [];
  new MutationObserver(() => {
    const t = document.title;
    if (window.__titles[window.__titles.length - 1] !== t) window.__titles.push(t);
  }).observe(document, { subtree: true, childList: true, characterData: true });
  window.__ws = [];
  const Native = window.WebSocket;
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      const rec = { url: String(args[0]), opened: false, messages: [] };
      window.__ws.push(rec);
      this.addEventListener("open", () => { rec.opened = true; });
      this.addEventListener("message", (e) => {
        if (typeof e.data !== "string") {
          rec.messages.push({ type: "binary" });
          return;
        }
        try {
          rec.messages.push(JSON.parse(e.data));
        } catch {
          rec.messages.push({ type: "unparsed" });
        }
      });
    }
  };
}

// signIn opens the UI in a new browser context, lands on the login page,
// signs in with key, and waits until the stock UI is up: its app, its
// socket (with the sid comfygate gave it) and its Queue button.
async function signIn(browser, gw, key) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  const responses = [];
  page.on("response", (r) => responses.push({ status: r.status(), method: r.request().method(), url: r.url() }));
  await page.addInitScript(recorders);
  await page.goto(gw.url + "/");
  assert.equal(new URL(page.url()).pathname, "/login", "opening the UI did not land on the login page");
  await page.fill("#key", key);
  await Promise.all([page.waitForURL(gw.url + "/", { timeout: uiTimeout }), page.click("button[type=submit]")]);
  await page.waitForFunction(() => window.app?.graph && window.comfyAPI?.api?.api?.clientId &&
    window.__ws.some((s) => s.opened && s.messages.some((m) => m.type === "status" && m.data?.sid)),
  null, { timeout: uiTimeout });
  await page.locator("[data-testid=queue-button]").waitFor({ timeout: uiTimeout });
  // The UI took the sid the gateway's socket gave it as its client id.
  assert.ok(await page.evaluate(() => window.__ws.some((s) => s.messages.some((m) => m.type === "status" &&
    m.data?.sid === window.comfyAPI.api.api.clientId))), "the UI's client id is not the sid its socket got");
  return { context, page, responses };
}

// openWorkflow opens an API-format workflow file the way Workflow → Open
// does: through the UI's own file input.
async function openWorkflow(page, wf) {
  await page.setInputFiles("#comfy-file-input", {
    name: "tiny.json", mimeType: "application/json", buffer: Buffer.from(JSON.stringify(wf)),
  });
  const types = Object.values(wf).map((n) => n.class_type).sort();
  await page.waitForFunction((types) => JSON.stringify(window.app.graph._nodes.map((n) => n.type).sort()) === JSON.stringify(types),
    types, { timeout: uiTimeout });
}

// queueWithButton sets the EmptyImage node's color widget (so every prompt
// makes its own image), clicks the UI's Queue button, and returns the id
// of the prompt the gateway answered the UI's POST /api/prompt with.
async function queueWithButton(page, color) {
  await page.evaluate((color) => {
    const node = window.app.graph._nodes.find((n) => n.type === "EmptyImage");
    const w = node.widgets.find((w) => w.name === "color");
    w.value = color;
    w.callback?.(color);
    window.app.graph.setDirtyCanvas(true, true);
  }, color);
  const [res] = await Promise.all([
    page.waitForResponse((r) => new URL(r.url()).pathname === "/api/prompt" && r.request().method() === "POST", { timeout: uiTimeout }),
    page.click("[data-testid=queue-button]"),
  ]);
  const body = await res.json();
  assert.equal(res.status(), 200, `POST /api/prompt: ${JSON.stringify(body)}`);
  assert.match(body.prompt_id, /^[0-9a-f-]{36}$/);
  return body.prompt_id;
}

// socketMessages returns the messages the page's sockets got, by socket.
function socketMessages(page) {
  return page.evaluate(() => window.__ws.map((s) => ({ url: s.url, messages: s.messages })));
}

// waitFinished waits until the UI's socket has told the page that every
// prompt in ids succeeded; an execution_error fails at once.
async function waitFinished(page, ids) {
  await page.waitForFunction((ids) => {
    const msgs = window.__ws.flatMap((s) => s.messages);
    const failed = msgs.find((m) => (m.type === "execution_error" || m.type === "execution_interrupted") && ids.includes(m.data?.prompt_id));
    if (failed) throw new Error(`prompt failed: ${JSON.stringify(failed).slice(0, 500)}`);
    return ids.every((id) => msgs.some((m) => m.type === "execution_success" && m.data?.prompt_id === id));
  }, ids, { timeout: uiTimeout * 2, polling: 100 });
}

// api calls the gateway from the page, as the UI's own scripts do: with
// the session cookie only.
function api(page, path) {
  return page.evaluate(async (path) => {
    const res = await fetch(path);
    const text = await res.text();
    let json = null;
    try { json = JSON.parse(text); } catch { /* not JSON */ }
    return { status: res.status, json, text: text.slice(0, 300) };
  }, path);
}

// historyImages maps each prompt of a /history answer to its saved images.
function historyImages(history) {
  return Object.fromEntries(Object.entries(history).map(([id, e]) => [id,
    Object.values(e.outputs || {}).flatMap((o) => o.images || [])]));
}

// sidebarImages opens the UI's queue sidebar and waits until it shows
// exactly n finished images, loaded; it returns each one's URL, size and
// centre pixel (read back through a canvas).
async function sidebarImages(page, n) {
  if (!(await page.locator(".task-output-image").count())) await page.click(".queue-tab-button");
  await page.waitForFunction((n) => {
    const imgs = [...document.querySelectorAll("img.task-output-image")];
    return imgs.length === n && imgs.every((i) => i.complete && i.naturalWidth > 0);
  }, n, { timeout: uiTimeout });
  return page.evaluate(() => [...document.querySelectorAll("img.task-output-image")].map((img) => {
    const c = document.createElement("canvas");
    c.width = img.naturalWidth;
    c.height = img.naturalHeight;
    const ctx = c.getContext("2d");
    ctx.drawImage(img, 0, 0);
    const [r, g, b] = ctx.getImageData(c.width >> 1, c.height >> 1, 1, 1).data;
    return { src: img.src, width: img.naturalWidth, height: img.naturalHeight, rgb: [r, g, b] };
  }));
}

// fetchImage fetches a URL from the page (with the session) and, for a
// 200, checks that the body is a PNG.
function fetchImage(page, src) {
  return page.evaluate(async (src) => {
    const res = await fetch(src);
    const b = new Uint8Array(await res.arrayBuffer());
    return { status: res.status, type: res.headers.get("content-type"), png: b[1] === 0x50 && b[2] === 0x4e && b[3] === 0x47 };
  }, src);
}

// imageLoads reports whether an <img> with src loads in the page.
function imageLoads(page, src) {
  return page.evaluate((src) => new Promise((resolve) => {
    const i = new Image();
    i.onload = () => resolve(true);
    i.onerror = () => resolve(false);
    i.src = src;
  }), src);
}

function rgbOf(color) {
  return [(color >> 16) & 0xff, (color >> 8) & 0xff, color & 0xff];
}

function closeTo(got, want) {
  return got.every((v, i) => Math.abs(v - want[i]) <= 2);
}

// fileOf reads filename and subfolder from a /view URL.
function fileOf(src) {
  const u = new URL(src);
  assert.match(u.pathname, /^\/(api\/)?view$/, `not a /view URL: ${src}`);
  return { filename: u.searchParams.get("filename"), subfolder: u.searchParams.get("subfolder") ?? "", type: u.searchParams.get("type") };
}

// unexpectedStatuses lists the page's failed requests other than those the
// stock UI meets on any fresh ComfyUI (no saved workflows: 404 from
// ComfyUI itself) or that a submit-scope key is documented to get (saving
// settings and user data needs admin: 403).
function unexpectedStatuses(responses) {
  return responses.filter(({ status, method, url }) => {
    if (status < 400) return false;
    const path = new URL(url).pathname;
    if (status === 404 && method === "GET" && path.startsWith("/api/userdata")) return false;
    if (status === 403 && method !== "GET" && /^\/api\/(settings|userdata)(\/|$)/.test(path)) return false;
    return true;
  });
}

// withLogs runs fn and, when it fails, adds the gateway's and the servers'
// log tails to the test's output.
async function withLogs(t, gw, servers, fn) {
  try {
    await fn();
  } catch (e) {
    const say = (title, text) => {
      t.diagnostic(title);
      for (const line of text.split("\n")) t.diagnostic(`  ${line}`);
    };
    say("gateway log:", gw.logTail(60));
    for (const s of servers) say(`ComfyUI ${s.version} (${s.url}) log:`, await s.logTail(20));
    throw e;
  }
}

// The three servers both scenarios use, started together once: two 0.3.7
// (the first serves the web UI in both fleets) and one 0.8.0. The second
// scenario's fleet reuses the first 0.3.7, so it also holds the first
// scenario's prompts and images, made before its gateway started: no key
// may see those under --isolation keys.
let started;
function realServers() {
  started ??= startComfys(V037, V037, V080).then(([a1, a2, b]) => ({ a1, a2, b }));
  return started;
}
after(async () => {
  if (!started) return;
  const all = await started.catch(() => null);
  if (all) await Promise.all(Object.values(all).map((s) => s.stop()));
});
// The first scenario's image URLs (under server a), for the second.
const earlierImages = [];

let browser;
async function getBrowser() {
  mkdirSync(shots, { recursive: true });
  browser ??= await chromium.launch({ executablePath: chromiumPath, args: chromiumArgs });
  return browser;
}
after(async () => { await browser?.close(); });

describe("the stock web UI behind a fleet of two real ComfyUI 0.3.7 servers", suite, () => {
  let servers = [], gw;

  before(async () => {
    buildComfygate();
    const { a1, a2 } = await realServers();
    servers = [a1, a2];
    gw = await startGateway({ upstreams: { a: a1.url, b: a2.url }, keys: { painter: "submit" } });
  });

  after(async () => {
    await gw?.stop();
  });

  test("sign in, open a workflow, queue it with the Queue button: progress, and every image from the server that made it", { timeout: 240_000 }, async (t) => {
    await withLogs(t, gw, servers, async () => {
      const { context, page, responses } = await signIn(await getBrowser(), gw, gw.keys.painter);
      // The UI's node list is the fleet's: it has the nodes, in ComfyUI's order.
      assert.deepEqual(await page.evaluate(() => window.LiteGraph.createNode("EmptyImage").widgets.map((w) => w.name)),
        ["width", "height", "batch_size", "color"]);

      await openWorkflow(page, workflow({ prefix: "fleet_ui", color: 0, radius: 31 }));
      await page.screenshot({ path: join(shots, "fleet-workflow.png") });

      // Queue a few, one click after another, as a person would; more if
      // one server got them all (the router prefers an idle server, so the
      // second of two quick clicks goes to the other one).
      const colorOf = {};
      const ids = [];
      const queue = async (n) => {
        for (let i = 0; i < n; i++) {
          const color = [0xd04020, 0x20a050, 0x3060e0, 0xc0c020, 0x9030b0, 0x20b0c0, 0x808080, 0xf08000][ids.length % 8];
          const id = await queueWithButton(page, color);
          colorOf[id] = color;
          ids.push(id);
        }
        await waitFinished(page, ids);
      };
      await queue(4);
      const serversUsed = async () => {
        const h = await api(page, "/api/history");
        assert.equal(h.status, 200, h.text);
        return new Set(Object.values(historyImages(h.json)).flat().map((img) => img.subfolder));
      };
      while ((await serversUsed()).size < 2 && ids.length < 8) await queue(2);
      assert.deepEqual([...(await serversUsed())].sort(), ["@a", "@b"], "the prompts did not go to both servers");

      // The UI showed the execution: its tab title counted the nodes done.
      const titles = await page.evaluate(() => window.__titles);
      const progress = titles.map((s) => /^\[(\d+)%\]/.exec(s)?.[1]).filter(Boolean).map(Number);
      assert.ok(progress.some((p) => p > 0 && p < 100), `the title never showed progress: ${JSON.stringify(titles)}`);
      assert.doesNotMatch(await page.title(), /^\[\d+%\]/, "the title still shows progress after the last prompt");

      // Its socket got each prompt's messages, under the ids it was given,
      // in ComfyUI's order, with file references marked with their server.
      const msgs = (await socketMessages(page)).flatMap((s) => s.messages);
      for (const id of ids) {
        const mine = msgs.filter((m) => m.data?.prompt_id === id).map((m) => m.type);
        const order = ["execution_start", "executing", "executed", "execution_success"].map((ty) => mine.indexOf(ty));
        assert.ok(order.every((i, k) => i >= 0 && (k === 0 || i > order[k - 1])), `messages of ${id}: ${mine}`);
        const executed = msgs.find((m) => m.type === "executed" && m.data?.prompt_id === id);
        assert.match(executed.data.output.images[0].subfolder, /^@(a|b)$/);
      }

      // The history the UI reads has every prompt, each with its image.
      const history = await api(page, "/api/history");
      const images = historyImages(history.json);
      assert.deepEqual(Object.keys(images).sort(), [...ids].sort());

      // The queue sidebar shows every final image, loaded through the
      // gateway from the server that made it: same file names on both
      // servers, yet each image has its own prompt's color.
      const shown = await sidebarImages(page, ids.length);
      await page.screenshot({ path: join(shots, "fleet-queue-sidebar.png") });
      const byFile = new Map(Object.entries(images).map(([id, [img]]) => [`${img.subfolder}/${img.filename}`, id]));
      for (const img of shown) {
        const f = fileOf(img.src);
        assert.equal(f.type, "output");
        assert.match(f.subfolder, /^@(a|b)$/);
        const id = byFile.get(`${f.subfolder}/${f.filename}`);
        assert.ok(id, `the sidebar shows ${img.src}, which no prompt made`);
        assert.deepEqual([img.width, img.height], [64, 64]);
        assert.ok(closeTo(img.rgb, rgbOf(colorOf[id])), `${img.src} is ${img.rgb}, want the color of ${id}: ${rgbOf(colorOf[id])}`);
        const got = await fetchImage(page, img.src);
        assert.deepEqual(got, { status: 200, type: "image/png", png: true }, img.src);
      }
      assert.equal(new Set(shown.map((i) => i.src)).size, ids.length);
      earlierImages.push(...shown.map((i) => i.src).filter((src) => fileOf(src).subfolder === "@a"));
      const views = responses.filter((r) => /^\/api\/view$/.test(new URL(r.url).pathname));
      assert.ok(views.length >= ids.length && views.every((r) => r.status === 200), `the UI's /view requests: ${JSON.stringify(views)}`);

      // The Save Image node shows, on the canvas, the image of the last
      // prompt that finished (the socket's last executed message).
      const nodeImg = await page.evaluate(() => {
        const img = window.app.graph._nodes.find((n) => n.type === "SaveImage").imgs?.[0];
        return img && { src: img.src, width: img.naturalWidth };
      });
      assert.ok(nodeImg, "the Save Image node shows no image");
      const last = msgs.filter((m) => m.type === "executed").at(-1).data.output.images[0];
      assert.deepEqual({ ...fileOf(nodeImg.src), width: nodeImg.width }, { filename: last.filename, subfolder: last.subfolder, type: "output", width: 64 });

      // Nothing the UI asked for failed, other than what any fresh ComfyUI
      // and a submit-scope key answer.
      assert.deepEqual(unexpectedStatuses(responses), []);
      await context.close();
    });
  });
});

describe("two keys with --isolation keys, in front of real ComfyUI 0.3.7 and 0.8.0", suite, () => {
  let servers = [], gw;

  before(async () => {
    buildComfygate();
    const { a1, b } = await realServers();
    servers = [a1, b];
    gw = await startGateway({
      upstreams: { a: a1.url, b: b.url },
      keys: { alice: "submit", bob: "submit" },
      args: ["--isolation", "keys"],
    });
  });

  after(async () => {
    await gw?.stop();
  });

  test("each person's UI shows only their own queue, history, socket messages and images", { timeout: 240_000 }, async (t) => {
    await withLogs(t, gw, servers, async () => {
      const b = await getBrowser();
      const people = {
        alice: { ...(await signIn(b, gw, gw.keys.alice)), colors: [0xe03030, 0xe0a030, 0xe030a0], ids: [] },
        bob: { ...(await signIn(b, gw, gw.keys.bob)), colors: [0x3030e0, 0x30a0e0], ids: [] },
      };
      const { alice, bob } = people;
      const colorOf = {};

      // Bob opens a socket with alice's clientId (ComfyUI itself would
      // send him her messages and previews).
      const aliceClient = await alice.page.evaluate(() => window.comfyAPI.api.api.clientId);
      await bob.page.evaluate(async (cid) => {
        const ws = new WebSocket(`ws://${location.host}/ws?clientId=${encodeURIComponent(cid)}&snoop=1`);
        await new Promise((resolve, reject) => { ws.onopen = resolve; ws.onerror = reject; });
      }, aliceClient);

      // Both open a workflow whose prompts take about a second, and queue
      // with the Queue button: alice three times, then bob twice.
      for (const [name, p] of Object.entries(people)) {
        await openWorkflow(p.page, workflow({ prefix: `iso_${name}`, color: 0, blurs: 2, radius: 31 }));
      }
      for (const name of ["alice", "bob"]) {
        const p = people[name];
        for (const color of p.colors) {
          const id = await queueWithButton(p.page, color);
          colorOf[id] = color;
          p.ids.push(id);
        }
      }

      // While one's prompts wait or run, the other's queue does not list
      // them, though the total count includes them. (An id in the owner's
      // queue before and after the other's look was there throughout.)
      const queueIds = (q) => [...q.json.queue_running, ...q.json.queue_pending].map((e) => e[1]);
      const seenHidden = (owner, viewer) => waitUntilAsync(async () => {
        const first = queueIds(await api(owner.page, "/api/queue"));
        assert.ok(first.every((id) => owner.ids.includes(id)), `a queue lists someone else's prompt: ${first}`);
        if (!first.length) return null;
        const theirs = await api(viewer.page, "/api/queue");
        const total = await api(viewer.page, "/api/prompt");
        const then = queueIds(await api(owner.page, "/api/queue"));
        const throughout = first.filter((id) => then.includes(id));
        if (!throughout.length) return null;
        assert.equal(theirs.status, 200, theirs.text);
        assert.deepEqual(queueIds(theirs).filter((id) => owner.ids.includes(id)), [], "the other's queue lists the owner's prompts");
        // The total counts them. (Not asserted on every look: a prompt the
        // fleet is just moving to an idle server is briefly in no queue.)
        return total.json.exec_info.queue_remaining >= queueIds(theirs).length + throughout.length;
      });
      assert.ok(await seenHidden(alice, bob), "alice's prompts were never seen queued and counted in bob's total");
      assert.ok(await seenHidden(bob, alice), "bob's prompts were never seen queued and counted in alice's total");

      await Promise.all([waitFinished(alice.page, alice.ids), waitFinished(bob.page, bob.ids)]);

      // Each one's own view.
      const shown = {};
      for (const [name, p] of Object.entries(people)) {
        // History: exactly their prompts, each with its image (none of the
        // first scenario's, which server a still has).
        const h = await api(p.page, "/api/history");
        assert.equal(h.status, 200, h.text);
        const images = historyImages(h.json);
        assert.deepEqual(Object.keys(images).sort(), [...p.ids].sort(), `${name}'s history`);
        for (const imgs of Object.values(images)) assert.match(imgs[0].filename, new RegExp(`^iso_${name}_`));
        for (const id of p.ids) assert.equal((await api(p.page, `/api/history/${id}`)).status, 200);
        // Queue: empty now, and never anyone else's.
        const q = await api(p.page, "/api/queue");
        assert.deepEqual(queueIds(q), []);
        // The UI's socket told them about their prompts only.
        const msgs = (await socketMessages(p.page)).filter((s) => !s.url.includes("snoop=1")).flatMap((s) => s.messages);
        const ids = new Set(msgs.map((m) => m.data?.prompt_id).filter(Boolean));
        assert.deepEqual([...ids].sort(), [...p.ids].sort(), `${name}'s socket`);
        // The queue sidebar: their images, each in its prompt's color.
        shown[name] = await sidebarImages(p.page, p.ids.length);
        await p.page.screenshot({ path: join(shots, `isolation-${name}.png`) });
        const byFile = new Map(Object.entries(images).map(([id, [img]]) => [`${img.subfolder}/${img.filename}`, id]));
        for (const img of shown[name]) {
          const f = fileOf(img.src);
          const id = byFile.get(`${f.subfolder}/${f.filename}`);
          assert.ok(id && p.ids.includes(id), `${name}'s sidebar shows ${img.src}, not one of their prompts`);
          assert.ok(closeTo(img.rgb, rgbOf(colorOf[id])), `${img.src} is ${img.rgb}, want ${rgbOf(colorOf[id])}`);
          assert.deepEqual(await fetchImage(p.page, img.src), { status: 200, type: "image/png", png: true }, img.src);
        }
        assert.deepEqual(unexpectedStatuses(p.responses), [], `${name}'s UI`);
      }

      // The other's prompts do not exist for them (404), and the other's
      // image URLs, taken from the other's UI, are 404 too: no <img> loads.
      for (const [name, p] of Object.entries(people)) {
        const other = name === "alice" ? "bob" : "alice";
        for (const id of people[other].ids) {
          const r = await api(p.page, `/api/history/${id}`);
          assert.equal(r.status, 404, `${name} reads /api/history of ${other}'s ${id}: ${r.status} ${r.text}`);
        }
        for (const img of shown[other]) {
          const got = await fetchImage(p.page, img.src);
          assert.equal(got.status, 404, `${name} fetched ${other}'s ${img.src}: ${got.status}`);
          assert.equal(await imageLoads(p.page, img.src), false, `${name}'s page loaded ${other}'s ${img.src}`);
        }
      }

      // Nor can they see what the first scenario made on server a before
      // this gateway started (unattributed files are admin-only).
      t.diagnostic(`${earlierImages.length} earlier images on server a checked`);
      for (const src of earlierImages) {
        const path = new URL(src).pathname + new URL(src).search;
        for (const p of [alice, bob]) assert.equal((await fetchImage(p.page, path)).status, 404, `an earlier image: ${path}`);
      }

      // Bob's socket with alice's clientId got no execution message or
      // preview at all: status only.
      const snoop = (await socketMessages(bob.page)).find((s) => s.url.includes("snoop=1"));
      assert.ok(snoop, "bob's socket with alice's clientId was not recorded");
      assert.deepEqual([...new Set(snoop.messages.map((m) => m.type))], ["status"]);

      await alice.context.close();
      await bob.context.close();
    });
  });

  // When a node class's definition differs between servers (KSampler's does
  // between 0.3.7 and 0.8.0), the merged /object_info must keep its inputs
  // in ComfyUI's order: the 0.3.7 frontend lays out widgets in the order of
  // the inputs' keys, and a saved workflow's widgets_values are read in that
  // order. (Re-encoding the definition as a map once sorted them: KSampler
  // showed cfg, denoise, sampler_name, scheduler, seed, steps, and the
  // default workflow put the seed into cfg and NaN into the seed.)
  test("the UI's widgets keep ComfyUI's input order behind the mixed fleet", { timeout: 120_000 }, async () => {
    // The order of KSampler's inputs on the 0.3.7 server that serves the UI.
    const direct = await (await fetch(`${servers[0].url}/object_info/KSampler`)).json();
    const want = Object.keys(direct.KSampler.input.required);
    const merged = await (await fetch(`${gw.url}/api/object_info`, { headers: { "X-API-Key": gw.keys.alice } })).json();
    const { context, page } = await signIn(await getBrowser(), gw, gw.keys.alice);
    try {
      const widgets = await page.evaluate(() => window.LiteGraph.createNode("KSampler").widgets.map((w) => w.name));
      assert.deepEqual(widgets.filter((w) => w !== "control_after_generate"), want.filter((k) => widgets.includes(k)),
        "the UI lays out KSampler's widgets in another order than ComfyUI's");
      assert.deepEqual(Object.keys(merged.KSampler.input.required), want, "the merged /object_info reorders KSampler's inputs");
    } finally {
      await context.close();
    }
  });
});

// waitUntilAsync polls cond until it returns a truthy value, for up to 30
// s, and then returns false; an assertion cond throws fails at once.
async function waitUntilAsync(cond) {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > deadline) return false;
    await new Promise((r) => setTimeout(r, 50));
  }
}
