#!/usr/bin/env bash
# examples-test.sh: run scripts/smoke.sh and every example against a real
# comfygate in front of the ComfyUI simulator, all on 127.0.0.1.
#
# Usage:
#   scripts/examples-test.sh [--install] [--verbose] [--keep]
#
#   --install   first apt-get install -y jq curl python3-websocket (Debian/Ubuntu, as root)
#   --verbose   show every step's output, not only a failing step's
#   --keep      keep the temporary directory (binaries, logs, downloaded images)
#
# What it does:
#   1. builds comfygate and comfyui-sim into a temporary directory
#   2. starts the simulator on a free loopback port, and comfygate in front of
#      it with a freshly generated key file (two keys)
#   3. runs smoke.sh, examples/curl.sh, examples/monitor.sh, the Python client
#      (if /usr/bin/python3 has websocket-client) and the Node client (if the
#      `ws` package is installed or `npm install` works), and checks that the
#      gateway's log never contains a key
#   4. restarts comfygate with --protect-ws and runs smoke.sh and the clients again
#   5. stops the simulator and comfygate in turn: monitor.sh must say
#      "unhealthy" (1), then "unreachable" (2)
# Both processes are stopped by PID on exit. The last line is
# "N passed, M failed"; the exit status is non-zero if anything failed.
# Needs: go, curl, jq; optionally python3-websocket, node >= 20 and npm.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
install=false
verbose=false
keep=false
for arg in "$@"; do
  case $arg in
    --install) install=true ;;
    --verbose | -v) verbose=true ;;
    --keep) keep=true ;;
    -h | --help) sed -n '2,26p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "examples-test.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

if $install; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y jq curl python3-websocket ||
    { apt-get update && apt-get install -y jq curl python3-websocket; }
fi
for tool in go curl jq; do
  if ! command -v "$tool" >/dev/null; then
    echo "examples-test.sh: $tool is required (jq and curl: run with --install, as root, on Debian/Ubuntu)" >&2
    exit 2
  fi
done

# The gateway and the clients get exactly the variables given below, nothing
# inherited: COMFYGATE_API_KEY in the caller's shell would otherwise add a key
# to the gateway (every COMFYGATE_* variable is also a comfygate flag).
while read -r var; do unset "$var"; done < <(compgen -e | grep '^COMFYGATE_' || true)
# The clients give up after this many seconds without a WebSocket message
# (the simulator finishes a prompt in milliseconds).
export COMFYGATE_TIMEOUT=20

tmp=$(mktemp -d "${TMPDIR:-/tmp}/comfygate-examples.XXXXXX")
sim_pid=
gw_pid=
passed=0
failed=0
skipped=0

stop() { # stop PID: stop one process we started, and reap it
  if [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; then
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
  fi
}
cleanup() {
  stop "$gw_pid"
  stop "$sim_pid"
  if $keep; then echo "kept $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

pass() { passed=$((passed + 1)); printf 'PASS  %s\n' "$1"; }
fail() { failed=$((failed + 1)); printf 'FAIL  %s\n' "$1"; }
skip() { skipped=$((skipped + 1)); printf 'SKIP  %s\n' "$1"; }

# step NAME WANT_EXIT CMD...: run CMD from $tmp/work, pass if it exits WANT_EXIT.
step() {
  local name=$1 want=$2 out rc=0 start=$SECONDS
  shift 2
  out="$tmp/logs/step-$((passed + failed + 1)).log"
  (cd "$tmp/work" && "$@") >"$out" 2>&1 || rc=$?
  if [[ $rc == "$want" ]]; then
    pass "$name ($((SECONDS - start))s)"
    if $verbose; then sed 's/^/      | /' "$out"; fi
  else
    fail "$name: exit status $rc, want $want"
    tail -n 25 "$out" | sed 's/^/      | /'
  fi
}

# free_port prints a loopback TCP port nobody listens on right now.
free_port() {
  local port
  for _ in $(seq 1 50); do
    port=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return
    fi
  done
  echo "examples-test.sh: no free port found" >&2
  return 1
}

# start_gateway [FLAGS...]: start comfygate on a free port in front of the
# simulator; sets gw_pid and GW_URL. Retries if the port was taken meanwhile.
start_gateway() {
  local port
  stop "$gw_pid"
  for _ in 1 2 3 4 5; do
    port=$(free_port)
    "$tmp/bin/comfygate" --listen 127.0.0.1 --port "$port" --upstream "$SIM_URL" \
      --api-key-file "$tmp/keys.txt" "$@" >>"$tmp/logs/comfygate.log" 2>&1 &
    gw_pid=$!
    GW_URL="http://127.0.0.1:$port"
    for _ in $(seq 1 100); do
      if ! kill -0 "$gw_pid" 2>/dev/null; then break; fi
      if [[ $(curl -s -o /dev/null -w '%{http_code}' "$GW_URL/health") == 200 ]]; then
        return 0
      fi
      sleep 0.1
    done
    stop "$gw_pid"
    grep -q 'already in use' "$tmp/logs/comfygate.log" || break
  done
  echo "examples-test.sh: comfygate did not start; its log:" >&2
  tail -n 20 "$tmp/logs/comfygate.log" >&2
  return 1
}

mkdir -p "$tmp/bin" "$tmp/logs" "$tmp/work"
echo "examples-test: working in $tmp"

# --- 1. build ----------------------------------------------------------------
step "build comfygate and comfyui-sim" 0 \
  go -C "$root" build -o "$tmp/bin/" ./cmd/comfygate ./cmd/comfyui-sim
if [[ ! -x $tmp/bin/comfygate || ! -x $tmp/bin/comfyui-sim ]]; then
  echo
  echo "$passed passed, $failed failed"
  exit 1
fi

# --- 2. simulator, keys, gateway -------------------------------------------------
# The simulator picks its own free port (--port 0) and prints it.
"$tmp/bin/comfyui-sim" --listen 127.0.0.1 --port 0 >"$tmp/logs/comfyui-sim.log" 2>&1 &
sim_pid=$!
SIM_URL=
for _ in $(seq 1 100); do
  SIM_URL=$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$tmp/logs/comfyui-sim.log" | head -n 1 || true)
  [[ -n $SIM_URL ]] && break
  sleep 0.1
done
if [[ -z $SIM_URL ]]; then
  fail "start the simulator"
  cat "$tmp/logs/comfyui-sim.log"
  echo
  echo "$passed passed, $failed failed"
  exit 1
fi

# Two random keys, in the documented file format.
newkey() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
KEY1=$(newkey)
KEY2=$(newkey)
umask 077
printf '# keys for examples-test.sh\n%s\n\n  %s  \n' "$KEY1" "$KEY2" >"$tmp/keys.txt"
umask 022

if start_gateway; then
  pass "start comfygate in front of the simulator ($GW_URL -> $SIM_URL)"
else
  fail "start comfygate"
  echo
  echo "$passed passed, $failed failed"
  exit 1
fi

# Which optional clients can run here?
python_ok=false
if [[ -x /usr/bin/python3 ]] && /usr/bin/python3 -c 'import websocket' 2>/dev/null; then
  python_ok=true
fi
node_ok=false
node_why="node >= 20 is not installed"
if command -v node >/dev/null && node -e 'process.exit(+process.versions.node.split(".")[0] >= 20 ? 0 : 1)'; then
  if [[ -d $root/examples/js/node_modules/ws ]]; then
    node_ok=true
  elif ! command -v npm >/dev/null; then
    node_why="npm is not installed, so the ws package cannot be installed"
  elif (cd "$root/examples/js" && timeout 120 npm install --no-audit --no-fund --no-package-lock) >"$tmp/logs/npm.log" 2>&1; then
    node_ok=true
  else
    node_why="npm install in examples/js failed (offline?); see the npm output above"
    tail -n 5 "$tmp/logs/npm.log"
  fi
fi

# run_clients LABEL: the Python and Node clients, one key each.
run_clients() {
  if $python_ok; then
    step "examples/python/client.py$1" 0 env COMFYGATE_URL="$GW_URL" COMFYGATE_API_KEY_FILE="$tmp/keys.txt" \
      /usr/bin/python3 "$root/examples/python/client.py" --out "$tmp/work/out-python"
  else
    skip "examples/python/client.py$1: /usr/bin/python3 cannot import websocket (apt-get install python3-websocket, or run with --install)"
  fi
  if $node_ok; then
    step "examples/js/client.mjs$1" 0 env COMFYGATE_URL="$GW_URL" COMFYGATE_API_KEY="$KEY2" \
      node "$root/examples/js/client.mjs" "" "$tmp/work/out-js"
  else
    skip "examples/js/client.mjs$1: $node_why"
  fi
}

# --- 3. default mode: /ws is public --------------------------------------------
echo "--- comfygate with an API key file"
step "scripts/smoke.sh" 0 env COMFYGATE_URL="$GW_URL" COMFYGATE_API_KEY_FILE="$tmp/keys.txt" \
  bash "$root/scripts/smoke.sh"
step "scripts/smoke.sh with the second key" 0 env COMFYGATE_URL="$GW_URL" COMFYGATE_API_KEY="$KEY2" \
  bash "$root/scripts/smoke.sh"
step "examples/curl.sh" 0 env COMFYGATE_URL="$GW_URL" COMFYGATE_API_KEY="$KEY1" OUTPUT_DIR="$tmp/work/out-curl" \
  bash "$root/examples/curl.sh"
step "examples/monitor.sh says healthy (exit 0)" 0 env COMFYGATE_URL="$GW_URL" bash "$root/examples/monitor.sh"
step "examples/monitor.sh --watch 1 --count 2" 0 env COMFYGATE_URL="$GW_URL" \
  bash "$root/examples/monitor.sh" --watch 1 --count 2
run_clients ""

# --- 4. --protect-ws: the WebSocket needs a key too ---------------------------------
echo "--- comfygate with --protect-ws"
if start_gateway --protect-ws; then
  pass "restart comfygate with --protect-ws ($GW_URL)"
  step "scripts/smoke.sh --protect-ws" 0 env COMFYGATE_URL="$GW_URL" COMFYGATE_API_KEY_FILE="$tmp/keys.txt" \
    bash "$root/scripts/smoke.sh" --protect-ws
  step "scripts/smoke.sh without --protect-ws notices that /ws is protected (exit 1)" 1 \
    env COMFYGATE_URL="$GW_URL" COMFYGATE_API_KEY_FILE="$tmp/keys.txt" bash "$root/scripts/smoke.sh"
  run_clients " (--protect-ws)"
else
  fail "restart comfygate with --protect-ws"
fi

# --- 5. failures the monitor must tell apart ----------------------------------------
echo "--- failure modes"
stop "$sim_pid"
sim_pid=
sleep 1.2 # /health shares one result for a second; let the last healthy one expire
step "examples/monitor.sh says unhealthy when ComfyUI is down (exit 1)" 1 \
  env COMFYGATE_URL="$GW_URL" bash "$root/examples/monitor.sh"
stop "$gw_pid"
gw_pid=
step "examples/monitor.sh says unreachable when comfygate is down (exit 2)" 2 \
  env COMFYGATE_URL="$GW_URL" bash "$root/examples/monitor.sh"

# --- 6. the log ----------------------------------------------------------------------
if grep -qF -e "$KEY1" -e "$KEY2" "$tmp/logs/comfygate.log"; then
  fail "comfygate's log never contains a key"
else
  pass "comfygate's log never contains a key ($(grep -c '"msg":"request"' "$tmp/logs/comfygate.log") request lines checked)"
fi
if grep -q '"key":"key-2"' "$tmp/logs/comfygate.log"; then
  pass "comfygate's log names the second key key-2"
else
  fail "comfygate's log names the second key key-2"
fi

echo
if ((skipped > 0)); then echo "($skipped skipped)"; fi
echo "$passed passed, $failed failed"
((failed == 0))
