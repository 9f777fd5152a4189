// client.mjs: run one ComfyUI workflow through comfygate and download its images.
//
// ComfyUI's standard API flow with an API key added:
//   1. open the WebSocket /ws?clientId=<uuid>, sending the key in a header
//   2. POST /prompt with the same client_id
//   3. read messages until {"type":"executing","data":{"node":null,"prompt_id":<ours>}}
//   4. GET /history/<prompt_id>
//   5. GET /view for every output image
//
// Node 20 or newer: fetch is built in; the WebSocket comes from the `ws`
// package (npm install in this directory).
//
//   cd examples/js && npm install
//   COMFYGATE_URL=http://127.0.0.1:8188 COMFYGATE_API_KEY_FILE=../../keys.txt \
//     node client.mjs [workflow.json] [output-dir]
//
// The key comes from COMFYGATE_API_KEY, or from the first key in the file named
// by COMFYGATE_API_KEY_FILE. The script exits non-zero on any failure.
//
// In a browser: fetch() can send the Authorization header as below, but the
// browser's WebSocket API cannot set any header on the handshake. If comfygate
// runs with --protect-ws, a page must put the key in the socket URL instead:
//   new WebSocket(`wss://gateway.example/ws?clientId=${id}&token=${key}`)
// (api_key= works too). comfygate removes it before ComfyUI sees the request
// and redacts it from its own log, but the URL may still reach other logs, so
// serve the page over HTTPS and prefer a short-lived or per-user key there.
// Without --protect-ws the socket needs no key at all.

import { randomUUID } from "node:crypto";
import { readFileSync, mkdirSync, writeFileSync } from "node:fs";
import { basename, dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import WebSocket from "ws";

const here = dirname(fileURLToPath(import.meta.url));
const baseURL = (process.env.COMFYGATE_URL || "http://127.0.0.1:8188").replace(/\/+$/, "");
const timeoutMs = Number(process.env.COMFYGATE_TIMEOUT || 120) * 1000; // silence allowed on the socket
const workflowPath = process.argv[2] || join(here, "..", "workflow_api.json");
const outDir = process.argv[3] || "comfygate-output";

function fail(message) {
  console.error(`client.mjs: ${message}`);
  process.exit(1);
}

// The key: COMFYGATE_API_KEY, else the first key line of COMFYGATE_API_KEY_FILE.
function readKey() {
  const key = (process.env.COMFYGATE_API_KEY || "").trim();
  if (key) return key;
  const file = process.env.COMFYGATE_API_KEY_FILE;
  if (file) {
    const line = readFileSync(file, "utf8")
      .replace(/^\uFEFF/, "")
      .split("\n")
      .map((l) => l.trim())
      .find((l) => l && !l.startsWith("#"));
    if (line) return line;
  }
  fail("set COMFYGATE_API_KEY or COMFYGATE_API_KEY_FILE");
}

const headers = { Authorization: `Bearer ${readKey()}` };

// call fetches a gateway path and fails with the JSON error body on a non-2xx answer.
async function call(path, init = {}) {
  let res;
  try {
    res = await fetch(baseURL + path, { ...init, headers: { ...headers, ...init.headers } });
  } catch (err) {
    fail(`cannot reach ${baseURL}: ${err.cause?.code || err.message}`);
  }
  if (!res.ok) fail(`${init.method || "GET"} ${path} failed: ${res.status} ${(await res.text()).slice(0, 2000)}`);
  return res;
}

// A whole /prompt request body ({"prompt": {...}}) or a bare API-format graph.
function loadWorkflow(path) {
  const data = JSON.parse(readFileSync(path, "utf8"));
  if (data.prompt && typeof data.prompt === "object" && !("class_type" in data.prompt)) return data;
  return { prompt: data };
}

// openSocket resolves once the WebSocket is open. A 401 (--protect-ws without
// a valid key) rejects with the status.
function openSocket(clientId) {
  const wsURL = baseURL.replace(/^http/, "ws") + `/ws?clientId=${encodeURIComponent(clientId)}`;
  const ws = new WebSocket(wsURL, { headers }); // ws lets Node send headers; browsers cannot
  return new Promise((resolve, reject) => {
    ws.once("open", () => resolve(ws));
    ws.once("unexpected-response", (_req, res) => reject(new Error(`handshake answered ${res.statusCode}`)));
    ws.once("error", reject);
  });
}

// inbox starts collecting the socket's JSON messages at once: the simulator,
// or ComfyUI with a cached workflow, can finish a prompt before the answer to
// POST /prompt has even arrived, and an event emitter drops what nobody hears.
function inbox(ws) {
  const queue = [];
  let wake = () => {};
  let closed = null;
  ws.on("message", (raw, isBinary) => {
    if (isBinary) return; // previews; this example ignores them
    queue.push(JSON.parse(raw.toString()));
    wake();
  });
  ws.on("close", (code) => {
    closed = new Error(`the WebSocket closed (code ${code})`);
    wake();
  });
  // next resolves with the next message; rejects on close or too long a silence.
  return async function next() {
    while (queue.length === 0) {
      if (closed) throw closed;
      let timer;
      await new Promise((resolve, reject) => {
        wake = resolve;
        timer = setTimeout(() => reject(new Error(`no message for ${timeoutMs / 1000}s`)), timeoutMs);
      }).finally(() => clearTimeout(timer));
    }
    return queue.shift();
  };
}

// waitForPrompt returns when ComfyUI says the prompt is done; it throws on an
// execution error or an interrupt.
async function waitForPrompt(next, promptId) {
  for (;;) {
    const { type, data = {} } = await next();
    if (data.prompt_id !== undefined && data.prompt_id !== promptId) continue; // another prompt
    if (type === "executing" && data.node !== null) console.log(`  running node ${data.node}`);
    else if (type === "progress") console.log(`  progress ${data.value}/${data.max}`);
    else if (type === "execution_error")
      throw new Error(`ComfyUI reported ${data.exception_type}: ${data.exception_message}`);
    else if (type === "execution_interrupted") throw new Error("the prompt was interrupted");
    else if (type === "executing" && data.node === null && data.prompt_id === promptId) return;
  }
}

async function main() {
  const health = await (await call("/health")).json();
  console.log(
    `gateway healthy: ComfyUI ${health.version} on ${health.device}, ` +
      `queue ${health.queue.running} running / ${health.queue.pending} pending`,
  );

  const clientId = randomUUID();
  let ws;
  try {
    ws = await openSocket(clientId); // connect first, so no event is missed
  } catch (err) {
    fail(`cannot open the WebSocket: ${err.message}`);
  }
  const next = inbox(ws);

  let promptId;
  try {
    const body = loadWorkflow(workflowPath);
    body.client_id = clientId; // decides which socket gets our events
    const queued = await (
      await call("/prompt", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      })
    ).json();
    promptId = queued.prompt_id;
    console.log(`queued prompt ${promptId}`);
    await waitForPrompt(next, promptId);
  } catch (err) {
    fail(err.message);
  } finally {
    ws.close();
  }

  const entry = (await (await call(`/history/${promptId}`)).json())[promptId];
  if (!entry) fail(`/history/${promptId} is empty`);
  if (entry.status?.status_str !== "success") fail(`prompt finished with status ${entry.status?.status_str}`);

  mkdirSync(outDir, { recursive: true });
  let saved = 0;
  for (const [nodeId, output] of Object.entries(entry.outputs || {})) {
    for (const image of output.images || []) {
      const query = new URLSearchParams({
        filename: image.filename,
        subfolder: image.subfolder || "",
        type: image.type || "output",
      });
      const bytes = Buffer.from(await (await call(`/view?${query}`)).arrayBuffer());
      const path = join(outDir, basename(image.filename));
      writeFileSync(path, bytes);
      console.log(`saved ${path} (${bytes.length} bytes) from node ${nodeId}`);
      saved++;
    }
  }
  if (saved === 0) fail("the prompt produced no image");
  console.log("done");
}

main().catch((err) => fail(err.stack || err.message));
