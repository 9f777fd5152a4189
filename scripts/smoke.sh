#!/usr/bin/env bash
# smoke.sh: check that a running comfygate does its job.
#
# Usage:
#   scripts/smoke.sh [options] [URL [KEY]]
#
#   URL   gateway base URL; default $COMFYGATE_URL, else http://127.0.0.1:8188
#   KEY   a valid API key; default $COMFYGATE_API_KEY, else the first key in
#         the file named by $COMFYGATE_API_KEY_FILE. Prefer the environment:
#         a key given as an argument is visible in `ps`.
#
# Options:
#   --protect-ws   the gateway runs with --protect-ws: expect /ws to need a key
#   --cacert FILE  trust this CA certificate (for a gateway with a private TLS certificate)
#   -k, --insecure do not verify the TLS certificate
#   -h, --help     show this help
#
# It only reads: GET /health, GET /prompt (ComfyUI's queue counter), GET /,
# and a WebSocket handshake that it drops at once; plus one POST /prompt
# without a key, which the gateway must refuse before ComfyUI sees it.
# Every check prints PASS or FAIL; the last line is "N passed, M failed".
# Exit status: 0 all passed, 1 a check failed, 2 bad usage.
#
# Keys never appear on curl's command line: they go to curl through a config
# on its standard input.
set -euo pipefail

usage() { sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

protect_ws=false
curl_extra=()
args=()
while (($#)); do
  case $1 in
    --protect-ws) protect_ws=true; shift ;;
    --cacert) curl_extra+=(--cacert "${2:?--cacert needs a file}"); shift 2 ;;
    -k | --insecure) curl_extra+=(--insecure); shift ;;
    -h | --help) usage; exit 0 ;;
    -*) echo "smoke.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
((${#args[@]} <= 2)) || { echo "smoke.sh: too many arguments (see --help)" >&2; exit 2; }

URL=${args[0]:-${COMFYGATE_URL:-http://127.0.0.1:8188}}
URL=${URL%/}
KEY=${args[1]:-${COMFYGATE_API_KEY:-}}
if [[ -z $KEY && -n ${COMFYGATE_API_KEY_FILE:-} ]]; then
  KEY=$(grep -v -E '^[[:space:]]*(#|$)' "$COMFYGATE_API_KEY_FILE" | head -n 1 | tr -d '[:space:]') || true
fi
if [[ -z $KEY ]]; then
  echo "smoke.sh: no API key: set COMFYGATE_API_KEY or COMFYGATE_API_KEY_FILE (see --help)" >&2
  exit 2
fi
for tool in curl jq; do
  command -v "$tool" >/dev/null || { echo "smoke.sh: $tool is required" >&2; exit 2; }
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The key as a query-string value, percent-encoded.
QKEY=$(jq -rn --arg k "$KEY" '$k | @uri')
# A key that is certainly wrong, to check it is refused and not echoed.
WRONG="smoke-wrong-key-$RANDOM$RANDOM$RANDOM"

passed=0
failed=0
pass() { passed=$((passed + 1)); printf 'PASS  %s\n' "$1"; }
fail() { failed=$((failed + 1)); printf 'FAIL  %s%s\n' "$1" "${2:+ ($2)}"; }

# conf_quote escapes a value for a double-quoted string in a curl config file.
conf_quote() {
  local v=${1//\\/\\\\}
  printf '"%s"' "${v//\"/\\\"}"
}

# http METHOD PATH [HEADER...]: send one request. The body is left in
# $tmp/body and the response headers in $tmp/headers; the status code is
# printed (000 when nothing answered). URL and headers go to curl on stdin.
http() {
  local method=$1 path=$2 h
  shift 2
  local -a opts=(--silent --max-time 10 --output "$tmp/body" --dump-header "$tmp/headers" --write-out '%{http_code}')
  case $method in
    POST) opts+=(--data-binary '{}' --header 'Content-Type: application/json') ;;
    WS)   # A WebSocket handshake: 101 means the upgrade went through. curl
          # does not speak WebSocket, so it waits until --max-time; that is fine.
          opts=(--silent --max-time 2 --output /dev/null --dump-header "$tmp/headers" --write-out '%{http_code}'
            --header 'Connection: Upgrade' --header 'Upgrade: websocket'
            --header 'Sec-WebSocket-Version: 13' --header 'Sec-WebSocket-Key: c21va2UtdGVzdC1ub25jZQ==') ;;
  esac
  [[ $path == *'/..'* || $path == *'/./'* ]] && opts+=(--path-as-is)
  : >"$tmp/body"
  {
    printf 'url = %s\n' "$(conf_quote "$URL$path")"
    for h in "$@"; do printf 'header = %s\n' "$(conf_quote "$h")"; done
  } | curl --config - "${opts[@]}" ${curl_extra[@]+"${curl_extra[@]}"} || true
}

# expect NAME WANT GOT: pass when the status code is as wanted.
expect() {
  if [[ $3 == "$2" ]]; then pass "$1"; else fail "$1" "got $3, want $2"; fi
}

echo "smoke test of $URL"

# --- /health --------------------------------------------------------------
code=$(http GET /health)
expect "GET /health answers 200 without a key" 200 "$code"
if jq -e '
    .status == "healthy"
    and (.version | type == "string")
    and (.timestamp | type == "number")
    and (.queue.pending | type == "number") and (.queue.running | type == "number")
    and (.device | type == "string")
    and (.vram.total | type == "number") and (.vram.free | type == "number") and (.vram.used | type == "number")
  ' "$tmp/body" >/dev/null 2>&1; then
  pass "/health has status, version, timestamp, queue{pending,running}, device, vram{total,free,used}"
else
  fail "/health has the documented fields" "$(head -c 300 "$tmp/body")"
fi

# --- no key, wrong key ----------------------------------------------------
code=$(http GET /prompt)
expect "GET /prompt without a key is refused with 401" 401 "$code"
if grep -qi '^www-authenticate: *bearer realm="comfygate"' "$tmp/headers"; then
  pass "the 401 carries WWW-Authenticate: Bearer realm=\"comfygate\""
else
  fail "the 401 carries WWW-Authenticate: Bearer realm=\"comfygate\"" "$(grep -i '^www-authenticate' "$tmp/headers" | tr -d '\r' || echo none)"
fi
if jq -e '.error == "unauthorized" and (.message | type == "string")' "$tmp/body" >/dev/null 2>&1; then
  pass "the 401 body is JSON {\"error\":\"unauthorized\",\"message\":...}"
else
  fail "the 401 body is JSON with error \"unauthorized\"" "$(head -c 200 "$tmp/body")"
fi

code=$(http GET /prompt "X-API-Key: $WRONG")
expect "a wrong key is refused with 401" 401 "$code"
if grep -qF "$WRONG" "$tmp/body" "$tmp/headers"; then
  fail "the 401 does not echo the key that was sent"
else
  pass "the 401 does not echo the key that was sent"
fi

code=$(http POST /prompt)
expect "POST /prompt without a key is refused with 401" 401 "$code"

code=$(http GET /api/prompt)
expect "GET /api/prompt (the /api/ form) without a key is refused with 401" 401 "$code"

# --- each way of sending the key -------------------------------------------
expect "Authorization: Bearer <key> is accepted" 200 "$(http GET /prompt "Authorization: Bearer $KEY")"
expect "authorization: bearer <key> (lower case) is accepted" 200 "$(http GET /prompt "authorization: bearer $KEY")"
expect "X-API-Key: <key> is accepted" 200 "$(http GET /prompt "X-API-Key: $KEY")"
expect "X-API-Key on /api/prompt is accepted" 200 "$(http GET /api/prompt "X-API-Key: $KEY")"
expect "?api_key=<key> in the query is accepted" 200 "$(http GET "/prompt?api_key=$QKEY")"
expect "?token=<key> in the query is accepted" 200 "$(http GET "/prompt?token=$QKEY")"
expect "a valid header with a wrong query key is refused (every credential must be valid)" 401 \
  "$(http GET "/prompt?api_key=$WRONG" "Authorization: Bearer $KEY")"

# --- paths that must not be mistaken for public ones -------------------------
expect "GET /assets/../prompt (sent as is) without a key is refused with 401" 401 "$(http GET /assets/../prompt)"
expect "GET /assets/%2e%2e/prompt without a key is refused with 401" 401 "$(http GET /assets/%2e%2e/prompt)"
expect "GET //prompt without a key is refused with 401" 401 "$(http GET //prompt)"

# --- what stays public -------------------------------------------------------
code=$(http GET /)
if [[ $code != 401 && $code != 000 ]]; then
  pass "GET / (the web UI page) needs no key (status $code)"
else
  fail "GET / (the web UI page) needs no key" "got $code"
fi

# --- the WebSocket -------------------------------------------------------------
expect "a WebSocket handshake on /ws with a key is accepted (101)" 101 \
  "$(http WS "/ws?clientId=smoke-test" "Authorization: Bearer $KEY")"
if $protect_ws; then
  expect "a WebSocket handshake on /ws without a key is refused (--protect-ws)" 401 "$(http WS "/ws?clientId=smoke-test")"
  expect "a WebSocket handshake with ?token=<key> is accepted (--protect-ws)" 101 "$(http WS "/ws?clientId=smoke-test&token=$QKEY")"
else
  expect "a WebSocket handshake on /ws needs no key (no --protect-ws)" 101 "$(http WS "/ws?clientId=smoke-test")"
fi

echo
echo "$passed passed, $failed failed"
((failed == 0))
