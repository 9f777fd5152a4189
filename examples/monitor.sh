#!/usr/bin/env bash
# monitor.sh: check ComfyUI's health through comfygate's /health endpoint.
#
#   monitor.sh                      one check; exit code says the result
#   monitor.sh --watch 5            check every 5 seconds until Ctrl-C
#   monitor.sh --watch 5 --count 3  three checks, 5 seconds apart
#
# Exit codes (of the last check in --watch mode):
#   0  healthy     comfygate answers 200: ComfyUI is up and answering
#   1  unhealthy   comfygate answers 503: ComfyUI is down, slow or confused
#   2  unreachable comfygate itself does not answer, or not with /health JSON
#
# /health never needs an API key, so this script does not use one.
# Configuration: COMFYGATE_URL (default http://127.0.0.1:8188).
# Requires curl and jq. Suitable for cron, systemd timers, or a Nagios-style check.
set -euo pipefail

URL=${COMFYGATE_URL:-http://127.0.0.1:8188}
URL=${URL%/}
interval=0
count=0 # 0 = forever (with --watch)

usage() { sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while (($#)); do
  case $1 in
    --watch) interval=${2:?--watch needs a number of seconds}; shift 2 ;;
    --count) count=${2:?--count needs a number}; shift 2 ;;
    --url) URL=${2:?--url needs a URL}; URL=${URL%/}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "monitor.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

for tool in curl jq; do
  command -v "$tool" >/dev/null || { echo "monitor.sh: $tool is required" >&2; exit 2; }
done

# human prints a byte count in GiB with one decimal.
human() { awk -v b="$1" 'BEGIN { printf "%.1f GiB", b / 1073741824 }'; }

# check does one /health call, prints one line and returns 0, 1 or 2.
check() {
  local body code now rc=0
  now=$(date '+%Y-%m-%d %H:%M:%S')
  # --max-time: comfygate waits at most --health-timeout (3s) for ComfyUI,
  # so 10s is only hit when comfygate itself hangs.
  body=$(curl -s --max-time 10 -w '\n%{http_code}' "$URL/health") || rc=$?
  if ((rc != 0)); then
    # 7: connection refused, 28: timeout, 6: unknown host, 35/60: TLS trouble.
    echo "$now UNREACHABLE $URL/health: curl exit code $rc"
    return 2
  fi
  code=${body##*$'\n'}
  body=${body%$'\n'*}
  if ! jq -e 'type == "object" and has("status")' >/dev/null 2>&1 <<<"$body"; then
    echo "$now UNREACHABLE $URL/health answered $code without health JSON (is this comfygate?)"
    return 2
  fi
  if [[ $code == 200 ]] && jq -e '.status == "healthy"' >/dev/null <<<"$body"; then
    local used total
    used=$(jq -r '.vram.used' <<<"$body")
    total=$(jq -r '.vram.total' <<<"$body")
    echo "$now HEALTHY $(jq -r '"ComfyUI \(.version) on \(.device) | queue: \(.queue.running) running, \(.queue.pending) pending"' <<<"$body") | VRAM: $(human "$used") used of $(human "$total")"
    return 0
  fi
  echo "$now UNHEALTHY ($code): $(jq -r '.error // "no reason given"' <<<"$body")"
  return 1
}

if ((interval <= 0)); then
  rc=0
  check || rc=$?
  exit "$rc"
fi

n=0
while :; do
  rc=0
  check || rc=$?
  n=$((n + 1))
  if ((count > 0 && n >= count)); then
    exit "$rc"
  fi
  sleep "$interval"
done
