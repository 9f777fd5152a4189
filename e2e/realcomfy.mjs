// Real ComfyUI servers and comfygate in front of them, for the browser
// tests that drive the stock web UI. It mirrors internal/realcomfy: the
// installation made by ../shared/comfyui/real/install.sh is found in
// $COMFYUI_REAL_DIR (default /tmp/comfyui-real); each server is started on a
// free loopback port by the installation's own scripts with COMFYUI_FRESH=1
// (empty input, output and user folders) and stopped by stop-comfyui.sh,
// which kills only the PID it started. A missing installation skips the
// tests, unless CI=true or COMFYUI_REAL_REQUIRED=1 promised one: then they
// fail.
import { spawn, execFile, execFileSync } from "node:child_process";
import { existsSync, mkdtempSync, writeFileSync, rmSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { createServer } from "node:net";
import { randomBytes } from "node:crypto";
import { tmpdir } from "node:os";
import { join, dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const repo = join(dirname(fileURLToPath(import.meta.url)), "..");

export const V037 = "0.3.7"; // the real web UI (frontend 1.4.13); makes its own prompt ids
export const V080 = "0.8.0"; // API only; takes the client's prompt id

const trees = { [V037]: "comfyui-0.3.7", [V080]: "comfyui-new" };
const scripts = { [V037]: "start-comfyui.sh", [V080]: "start-comfyui-new.sh" };

// StartTimeout bounds one server's start-up (the scripts wait 90 s).
const startTimeoutMs = 120_000;

export function installDir() {
  return resolve(process.env.COMFYUI_REAL_DIR || "/tmp/comfyui-real");
}

// required reports whether a missing installation is a failure rather than
// a reason to skip, as realcomfy.Required: CI=true or COMFYUI_REAL_REQUIRED=1.
export function required() {
  return ["CI", "COMFYUI_REAL_REQUIRED"].some((name) => /^(1|t|true)$/i.test(process.env[name] || ""));
}

// missing returns why the installation cannot be used, or "" when it can.
export function missing() {
  const dir = installDir();
  for (const v of [V037, V080]) {
    for (const f of [scripts[v], "stop-comfyui.sh", "peer-start.sh", join(trees[v], "main.py")]) {
      if (!existsSync(join(dir, f))) {
        return `real ComfyUI not installed at ${dir} (no ${f}); run ../shared/comfyui/real/install.sh ${dir}`;
      }
    }
  }
  return "";
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

function run(file, args, opts) {
  return new Promise((resolve) => {
    execFile(file, args, { maxBuffer: 4 << 20, ...opts }, (err, stdout, stderr) => {
      resolve({ err, out: `${stdout}${stderr}`.trim() });
    });
  });
}

// Every server and process started here, so that an interrupted run still
// stops them (synchronously, from the exit handler).
const live = new Set();
function stopAllSync() {
  for (const entry of live) {
    try { entry.stopSync(); } catch { /* best effort */ }
  }
  live.clear();
}
process.once("exit", stopAllSync);
for (const sig of ["SIGINT", "SIGTERM"]) {
  process.once(sig, () => { stopAllSync(); process.exit(128 + (sig === "SIGINT" ? 2 : 15)); });
}

// startComfy starts one real ComfyUI of version v on a free loopback port
// and resolves once it answers /system_stats.
export async function startComfy(v) {
  const dir = installDir();
  let last;
  // The port is found free, closed, and handed to the script, so another
  // process may take it in between: the script then refuses, and another
  // port is tried.
  for (let attempt = 0; attempt < 5; attempt++) {
    const port = await freePort();
    const stopScript = join(dir, "stop-comfyui.sh");
    const server = {
      version: v, port, url: `http://127.0.0.1:${port}`,
      logPath: join(dir, "run", `comfyui-${port}.log`),
      dataDir: join(dir, "run", `port-${port}`),
      stopped: false,
      stopSync() {
        if (this.stopped) return;
        this.stopped = true;
        execFileSync(stopScript, [String(port)], { stdio: "ignore", timeout: 30_000 });
        rmSync(this.dataDir, { recursive: true, force: true });
      },
      // stop stops the server (TERM, then KILL after 2 s) and deletes its
      // folders; its log stays, for whoever has to find out why a test failed.
      async stop() {
        if (this.stopped) return;
        this.stopped = true;
        live.delete(this);
        const { err, out } = await run(stopScript, [String(port)], { timeout: 30_000 });
        rmSync(this.dataDir, { recursive: true, force: true });
        if (err) throw new Error(`stopping ComfyUI ${v} on port ${port}: ${err.message}\n${out}`);
      },
      async logTail(n = 30) {
        try {
          return (await readFile(this.logPath, "utf8")).trimEnd().split("\n").slice(-n).join("\n");
        } catch (e) {
          return String(e);
        }
      },
    };
    live.add(server);
    const { err, out } = await run(join(dir, scripts[v]), [String(port)], {
      env: { ...process.env, COMFYUI_FRESH: "1" }, timeout: startTimeoutMs,
    });
    if (!err) return server;
    if (/already in use/.test(out)) {
      server.stopped = true;
      live.delete(server);
      last = new Error(`ComfyUI ${v} on port ${port}: port already in use`);
      continue;
    }
    // The script stops a server that never became ready, but not one whose
    // start was cut short by the timeout.
    await server.stop().catch(() => {});
    throw new Error(`starting ComfyUI ${v} on port ${port}: ${err.message}\n${out}`);
  }
  throw last;
}

// startComfys starts one server per version given, concurrently; if one
// fails, the others are stopped.
export async function startComfys(...versions) {
  const results = await Promise.allSettled(versions.map((v) => startComfy(v)));
  const failed = results.filter((r) => r.status === "rejected");
  if (failed.length) {
    await Promise.all(results.filter((r) => r.status === "fulfilled").map((r) => r.value.stop().catch(() => {})));
    throw new Error(failed.map((r) => r.reason.message).join("\n"));
  }
  return results.map((r) => r.value);
}

let built;
// buildComfygate builds ./cmd/comfygate once per test file
// ($E2E_COMFYGATE_BIN names a binary to use instead).
export function buildComfygate() {
  if (process.env.E2E_COMFYGATE_BIN) return resolve(process.env.E2E_COMFYGATE_BIN);
  if (!built) {
    const dir = mkdtempSync(join(tmpdir(), "comfygate-e2e-fleet-"));
    try {
      execFileSync("go", ["build", "-o", join(dir, "comfygate"), "./cmd/comfygate"], { cwd: repo, stdio: "inherit" });
    } catch (e) {
      rmSync(dir, { recursive: true, force: true });
      throw e;
    }
    built = { dir, bin: join(dir, "comfygate") };
    live.add({ stopSync: () => rmSync(dir, { recursive: true, force: true }) });
  }
  return built.bin;
}

function newKey() {
  return "cg_" + randomBytes(24).toString("base64url");
}

// startGateway runs comfygate on a free loopback port in front of upstreams
// ({name: url}, the first serving the web UI and user data) with one key
// per entry of keys ({name: scope}), plus extra flags. It resolves once
// /health shows every upstream healthy and the merged /object_info answers.
export async function startGateway({ upstreams, keys, args = [] }) {
  const bin = buildComfygate();
  const dir = mkdtempSync(join(tmpdir(), "comfygate-e2e-gw-"));
  const keyOf = {};
  const lines = Object.entries(keys).map(([name, scope]) => {
    keyOf[name] = newKey();
    return `${name}:${keyOf[name]} ${scope}`;
  });
  const keyFile = join(dir, "keys");
  writeFileSync(keyFile, lines.join("\n") + "\n", { mode: 0o600 });
  const ups = Object.entries(upstreams).flatMap(([name, url]) => ["--upstream", `${name}=${url}`]);
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const argv = ["--listen", "127.0.0.1", "--port", String(port), ...ups, "--api-key-file", keyFile,
    "--log-format", "text", ...args];
  // Only PATH: a stray COMFYGATE_ variable would stop start-up.
  const proc = spawn(bin, argv, { stdio: ["ignore", "pipe", "pipe"], env: { PATH: process.env.PATH } });
  const gw = {
    url, keys: keyOf, log: "", proc,
    stopSync() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGKILL");
      rmSync(dir, { recursive: true, force: true });
    },
    async stop() {
      live.delete(gw);
      // $E2E_GATEWAY_LOG_DIR keeps every gateway's log, for a look afterwards.
      if (process.env.E2E_GATEWAY_LOG_DIR) writeFileSync(join(process.env.E2E_GATEWAY_LOG_DIR, `comfygate-${port}.log`), gw.log);
      if (proc.exitCode === null && proc.signalCode === null) {
        const exited = new Promise((r) => proc.once("exit", r));
        proc.kill("SIGTERM");
        await Promise.race([exited, new Promise((r) => setTimeout(r, 5000))]);
        if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGKILL");
      }
      rmSync(dir, { recursive: true, force: true });
    },
    logTail(n = 40) {
      return gw.log.trimEnd().split("\n").slice(-n).join("\n");
    },
  };
  live.add(gw);
  proc.stdout.on("data", (d) => { gw.log += d; });
  proc.stderr.on("data", (d) => { gw.log += d; });
  const names = Object.keys(upstreams);
  const anyKey = keyOf[Object.keys(keyOf)[0]];
  let last = "";
  try {
    await waitUntil(async () => {
      if (proc.exitCode !== null) throw new Error(`comfygate exited (${proc.exitCode}):\n${gw.logTail()}`);
      const res = await fetch(url + "/health").catch((e) => ({ status: 0, text: async () => String(e) }));
      last = await res.text();
      if (res.status !== 200) return false;
      const h = JSON.parse(last);
      const healthy = new Set((h.upstreams || []).filter((u) => u.status === "healthy").map((u) => u.name));
      if (!names.every((n) => healthy.has(n))) return false;
      const info = await fetch(url + "/api/object_info", { headers: { "X-API-Key": anyKey } });
      return info.status === 200 && "SaveImage" in (await info.json());
    }, 60_000, () => `the fleet never found every server healthy; last /health: ${last}\n${gw.logTail()}`);
  } catch (e) {
    await gw.stop();
    throw e;
  }
  return gw;
}

// waitUntil polls cond (which may be async) every 100 ms until it returns
// a truthy value, and returns that; after timeoutMs it throws what(), or
// what cond threw last.
export async function waitUntil(cond, timeoutMs, what = () => "condition") {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms: ${what()}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}
