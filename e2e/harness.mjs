// Starts the ComfyUI simulator and comfygate in front of it, on free
// loopback ports, for the browser tests. Everything is stopped by PID.
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, writeFileSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { randomBytes } from "node:crypto";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const repo = join(dirname(fileURLToPath(import.meta.url)), "..");

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

async function waitFor(url, ok, timeoutMs = 20000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      const res = await fetch(url);
      if (ok(res.status)) return;
    } catch { /* not up yet */ }
    if (Date.now() > deadline) throw new Error(`${url} did not come up`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

// start builds both binaries and runs them; args are extra comfygate flags.
export async function start(args = []) {
  const dir = mkdtempSync(join(tmpdir(), "comfygate-e2e-"));
  for (const cmd of ["comfygate", "comfyui-sim"]) {
    execFileSync("go", ["build", "-o", join(dir, cmd), `./cmd/${cmd}`], { cwd: repo, stdio: "inherit" });
  }
  const key = "cg_" + randomBytes(24).toString("base64url");
  const keyFile = join(dir, "keys");
  writeFileSync(keyFile, `browser:${key} submit\n`, { mode: 0o600 });
  const simPort = await freePort();
  const gwPort = await freePort();
  const procs = [];
  const logs = { sim: "", gateway: "" };
  const run = (name, bin, argv) => {
    const p = spawn(join(dir, bin), argv, { stdio: ["ignore", "pipe", "pipe"], env: { PATH: process.env.PATH } });
    p.stdout.on("data", (d) => { logs[name] += d; });
    p.stderr.on("data", (d) => { logs[name] += d; });
    procs.push(p);
  };
  run("sim", "comfyui-sim", ["--listen", "127.0.0.1", "--port", String(simPort)]);
  await waitFor(`http://127.0.0.1:${simPort}/api/prompt`, (s) => s === 200);
  run("gateway", "comfygate", ["--listen", "127.0.0.1", "--port", String(gwPort),
    "--upstream", `http://127.0.0.1:${simPort}`, "--api-key-file", keyFile, "--log-format", "text", ...args]);
  const url = `http://127.0.0.1:${gwPort}`;
  await waitFor(`${url}/health/ready`, (s) => s === 200);
  return {
    url, key, keyFile, logs, simUrl: `http://127.0.0.1:${simPort}`,
    async stop() {
      for (const p of procs) {
        if (p.exitCode === null) {
          const exited = new Promise((r) => p.once("exit", r));
          p.kill("SIGTERM");
          await Promise.race([exited, new Promise((r) => setTimeout(r, 5000))]);
          if (p.exitCode === null) p.kill("SIGKILL");
        }
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

// Flags for Debian's chromium as root, in a sandbox with no outside network.
export const chromiumArgs = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"];
export const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";
