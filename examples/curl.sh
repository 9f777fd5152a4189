#!/usr/bin/env bash
# curl.sh: a tour of comfygate with nothing but curl and jq.
#
#   1. /health, which never needs a key
#   2. the three ways to send a key: Authorization: Bearer, X-API-Key, ?api_key=
#   3. queue the workflow in workflow_api.json, poll /history/{id} until it is done
#   4. download each output image through /view
#   5. what a request without a key gets: 401
#
# Configuration (environment):
#   COMFYGATE_URL           gateway base URL (default http://127.0.0.1:8188)
#   COMFYGATE_API_KEY       the API key, or
#   COMFYGATE_API_KEY_FILE  a key file; its first key is used
#   OUTPUT_DIR              where images are saved (default ./comfygate-output)
#   WORKFLOW                request body to POST to /prompt (default workflow_api.json here)
#
# Note: a key given on a command line (curl -H "...$KEY") is visible in `ps` to
# other users of the machine while curl runs. That is fine on your laptop; on
# a shared server prefer `curl -H @file`, as scripts/smoke.sh does.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
URL=${COMFYGATE_URL:-http://127.0.0.1:8188}
URL=${URL%/}
OUTPUT_DIR=${OUTPUT_DIR:-./comfygate-output}
WORKFLOW=${WORKFLOW:-$here/workflow_api.json}

for tool in curl jq; do
  command -v "$tool" >/dev/null || { echo "curl.sh: $tool is required" >&2; exit 1; }
done

# The key: COMFYGATE_API_KEY, else the first key line of COMFYGATE_API_KEY_FILE
# (the same file format comfygate reads: # comments and blank lines skipped).
KEY=${COMFYGATE_API_KEY:-}
if [[ -z $KEY && -n ${COMFYGATE_API_KEY_FILE:-} ]]; then
  KEY=$(grep -v -E '^[[:space:]]*(#|$)' "$COMFYGATE_API_KEY_FILE" | head -n 1 | tr -d '[:space:]')
fi
if [[ -z $KEY ]]; then
  echo "curl.sh: set COMFYGATE_API_KEY or COMFYGATE_API_KEY_FILE" >&2
  exit 1
fi

step() { printf '\n== %s\n' "$*"; }

step "1. GET /health (no key needed)"
curl -sS --fail-with-body "$URL/health" | jq .

step "2a. Authorization: Bearer <key>"
curl -sS --fail-with-body -H "Authorization: Bearer $KEY" "$URL/prompt"
echo

step "2b. X-API-Key: <key>"
curl -sS --fail-with-body -H "X-API-Key: $KEY" "$URL/api/prompt"
echo

# The query form exists for clients that cannot set headers (a browser's
# WebSocket, an <img src>). The URL ends up in history and logs: avoid it
# otherwise. comfygate removes the key before ComfyUI sees the request.
step "2c. ?api_key=<key> (query parameter; ?token=<key> works too)"
curl -sS --fail-with-body -G --data-urlencode "api_key=$KEY" "$URL/system_stats" | jq -c '.system | {comfyui_version, os}'

step "3. POST /prompt with $(basename "$WORKFLOW")"
response=$(curl -sS --fail-with-body -H "Authorization: Bearer $KEY" \
  -H 'Content-Type: application/json' --data-binary "@$WORKFLOW" "$URL/prompt")
echo "$response" | jq -c .
prompt_id=$(echo "$response" | jq -er .prompt_id)

# /history/{id} answers {} until the prompt has finished.
echo "polling /history/$prompt_id ..."
history='{}'
for _ in $(seq 1 120); do
  history=$(curl -sS --fail-with-body -H "Authorization: Bearer $KEY" "$URL/history/$prompt_id")
  if echo "$history" | jq -e --arg id "$prompt_id" '.[$id].status.completed' >/dev/null; then
    break
  fi
  sleep 0.5
done
status=$(echo "$history" | jq -r --arg id "$prompt_id" '.[$id].status.status_str // "not finished"')
echo "status: $status"
[[ $status == success ]] || { echo "curl.sh: the prompt did not succeed" >&2; exit 1; }

step "4. GET /view for each output image"
mkdir -p "$OUTPUT_DIR"
count=0
# One compact JSON object per image: {"filename": ..., "subfolder": ..., "type": ...}.
while read -r image; do
  filename=$(jq -r .filename <<<"$image")
  # -G with --data-urlencode builds ?filename=...&subfolder=...&type=... safely.
  curl -sS --fail-with-body -H "X-API-Key: $KEY" -G \
    --data-urlencode "filename=$filename" \
    --data-urlencode "subfolder=$(jq -r '.subfolder // ""' <<<"$image")" \
    --data-urlencode "type=$(jq -r '.type // "output"' <<<"$image")" \
    -o "$OUTPUT_DIR/$(basename "$filename")" "$URL/view"
  echo "saved $OUTPUT_DIR/$(basename "$filename") ($(wc -c <"$OUTPUT_DIR/$(basename "$filename")") bytes)"
  count=$((count + 1))
done < <(jq -c --arg id "$prompt_id" '.[$id].outputs[] | .images[]?' <<<"$history")
((count > 0)) || { echo "curl.sh: the prompt produced no image" >&2; exit 1; }

step "5. GET /prompt without a key: 401"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
code=$(curl -sS -o "$tmp/body" -D "$tmp/headers" -w '%{http_code}' "$URL/prompt")
echo "status: $code"
grep -i '^www-authenticate:' "$tmp/headers" || true
jq -c . "$tmp/body"
[[ $code == 401 ]] || { echo "curl.sh: expected 401 without a key, got $code" >&2; exit 1; }

echo
echo "curl.sh: all steps done"
