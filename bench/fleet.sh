#!/usr/bin/env bash
# comfygate fleet benchmark: comfygate's fleet mode next to nginx (round
# robin, least_conn) and HAProxy (leastconn) with sticky sessions, in front
# of 1, 2, 4 and 8 simulated GPU servers (cmd/comfyui-sim), all on
# 127.0.0.1, plus a failover run that kills one of 4 servers halfway.
#
#   bash bench/fleet.sh            full run (about 9 minutes on 2 cores):
#                                  writes bench/results/fleet.json,
#                                  docs/fleet-benchmarks.md and
#                                  docs/fleet-benchmarks.svg
#   bash bench/fleet.sh --quick    CI smoke (under 2 minutes): 1 and 2
#                                  servers, short prompts, a failover with 2
#                                  servers; writes bench/results/quick.fleet.*
#                                  only and fails on any functional error (a
#                                  prompt lost or run twice through
#                                  comfygate, a failed request), never on
#                                  timing
#   bash bench/fleet.sh --install  first apt-get install nginx haproxy caddy
#                                  (as bench/run.sh --install does)
#
# Other flags: --keep (keep the temporary directory with every
# configuration and log), --rev REV (build comfygate and the simulator from
# a git revision), and anything after -- goes to "fleetbench run" (e.g.
# -- --servers 2,4 --targets comfygate,nginx-lc --failover-targets '').
# A balancer whose binary is missing is skipped with a message. Every
# process started is stopped by process group on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0 install=0 keep=0 rev="" extra=()
args=("$@")
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --install) install=1 ;;
    --keep) keep=1 ;;
    --rev) rev=$2; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "fleet.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

log() { printf '== %s\n' "$*" >&2; }

if [ "$install" = 1 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "fleet.sh: --install needs root (apt-get)" >&2; exit 1
  fi
  # The same guarded install as bench/run.sh: packages must not start their
  # system services.
  guard=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    guard=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' > "$guard"; chmod 755 "$guard"
  fi
  rc=0
  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y nginx haproxy caddy; } || rc=$?
  [ -n "$guard" ] && rm -f "$guard"
  [ "$rc" = 0 ] || { echo "fleet.sh: apt-get failed ($rc)" >&2; exit "$rc"; }
fi

export PATH="$PATH:/usr/sbin:/sbin"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/fleetbench.XXXXXX")
fb_pid=""

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$fb_pid" ] && kill -0 "$fb_pid" 2>/dev/null; then
    kill -TERM "$fb_pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$fb_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$fb_pid" 2>/dev/null || true
  fi
  # Whatever fleetbench started and could not stop (if it was killed): each
  # process leads its own group, listed in $tmp/work/pids.
  if [ -f "$tmp/work/pids" ]; then
    while read -r pid; do
      case "$pid" in ''|*[!0-9]*) continue ;; esac
      kill -KILL -- "-$pid" 2>/dev/null || true
    done < "$tmp/work/pids"
  fi
  if [ "$keep" = 1 ]; then echo "kept $tmp" >&2; else rm -rf "$tmp"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -n "$rev" ]; then
  log "building comfygate and comfyui-sim at $rev"
  mkdir -p "$tmp/src"
  git archive --format=tar "$rev" | tar -x -C "$tmp/src"
  (cd "$tmp/src" && go build -o "$tmp/comfygate" ./cmd/comfygate && go build -o "$tmp/comfyui-sim" ./cmd/comfyui-sim)
  built="$(git rev-parse --short "$rev")"
else
  log "building comfygate and comfyui-sim from the working tree"
  if ! go build -o "$tmp/comfygate" ./cmd/comfygate || ! go build -o "$tmp/comfyui-sim" ./cmd/comfyui-sim; then
    echo "fleet.sh: comfygate or comfyui-sim does not build from the working tree; try --rev HEAD" >&2
    exit 1
  fi
  built="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- cmd internal go.mod 2>/dev/null || echo ', with uncommitted changes')"
fi
log "building the harness"
go build -o "$tmp/fleetbench" ./bench/cmd/fleetbench

opts=(--sim "$tmp/comfyui-sim" --comfygate "$tmp/comfygate" --dir "$tmp/work")
if command -v nginx >/dev/null; then opts+=(--nginx "$(command -v nginx)"); else log "nginx not installed: its targets are skipped (bash bench/fleet.sh --install)"; fi
if command -v haproxy >/dev/null; then opts+=(--haproxy "$(command -v haproxy)"); else log "haproxy not installed: its target is skipped (bash bench/fleet.sh --install)"; fi
opts+=(--meta "command=bash bench/fleet.sh ${args[*]:-}" --meta "comfygate_build=$built")

mkdir -p bench/results
notes=()
if [ "$quick" = 1 ]; then
  out=bench/results/quick.fleet.json md=bench/results/quick.fleet.md svg=bench/results/quick.fleet.svg
  opts+=(--quick)
else
  out=bench/results/fleet.json md=docs/fleet-benchmarks.md svg=docs/fleet-benchmarks.svg
  [ -f bench/fleet-notes.md ] && notes=(--notes bench/fleet-notes.md)
fi

log "measuring; progress below"
rc=0
"$tmp/fleetbench" run --out "$tmp/results.json" "${opts[@]}" "${extra[@]}" &
fb_pid=$!
wait "$fb_pid" || rc=$?
fb_pid=""
if [ -f "$tmp/results.json" ]; then
  cp "$tmp/results.json" "$out"
  "$tmp/fleetbench" report --in "$out" --md "$md" --svg "$svg" "${notes[@]}"
  log "wrote $out, $md, $svg"
  awk '/^## Against the targets/ {f = 1; print; next} f && /^\|/ {print; t = 1; next} f && t {exit}' "$md"
fi
exit "$rc"
