#!/usr/bin/env bash
# comfygate benchmark: comfygate next to nginx, HAProxy and Caddy, in front of
# a fast fake ComfyUI, all on 127.0.0.1, measured interleaved in one run.
#
#   bash bench/run.sh              full run (about 6-8 minutes on 2 cores):
#                                  writes bench/results/latest.json,
#                                  docs/benchmarks.md and docs/benchmarks.svg
#   bash bench/run.sh --quick      CI smoke (under a minute): short runs, 200
#                                  idle sockets, 1 repetition; writes
#                                  bench/results/quick.{json,md,svg} only and
#                                  fails on any functional error
#   bash bench/run.sh --install    first apt-get install nginx haproxy caddy
#
# Other flags: --workers N (worker processes/threads per proxy, default 1),
# --reps N, --idle N (idle WebSockets), --keep (keep the temporary directory),
# --rev REV (build comfygate from a git revision instead of the working tree,
# e.g. to measure before and after a change).
# Installs nothing unless --install is given; a peer whose binary is missing
# is skipped with a message. Every process started here is stopped by PID on
# exit.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0 install=0 workers=1 reps="" idle="" keep=0 rev=""
args=("$@")
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --install) install=1 ;;
    --workers) workers=$2; shift ;;
    --reps) reps=$2; shift ;;
    --idle) idle=$2; shift ;;
    --keep) keep=1 ;;
    --rev) rev=$2; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$workers" in ''|*[!0-9]*) echo "run.sh: --workers needs a number" >&2; exit 2 ;; esac

log() { printf '== %s\n' "$*" >&2; }

if [ "$install" = 1 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "run.sh: --install needs root (apt-get)" >&2; exit 1
  fi
  log "installing nginx, haproxy, caddy from Debian's packages"
  # Packages must not start their system services (nginx and Caddy would
  # listen on port 80 on every interface): the usual policy-rc.d guard, put
  # in place only if the machine has none, and removed afterwards.
  guard=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    guard=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' > "$guard"; chmod 755 "$guard"
  fi
  rc=0
  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y nginx haproxy caddy; } || rc=$?
  [ -n "$guard" ] && rm -f "$guard"
  [ "$rc" = 0 ] || { echo "run.sh: apt-get failed ($rc)" >&2; exit "$rc"; }
fi

export PATH="$PATH:/usr/sbin:/sbin"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/comfybench.XXXXXX")
pids=()
names=()

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ "${#pids[@]}" -gt 0 ]; then
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 50); do
      alive=0
      for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
      [ "$alive" = 0 ] && break
      sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
  fi
  if [ "$keep" = 1 ]; then echo "kept $tmp" >&2; else rm -rf "$tmp"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Idle WebSockets need file descriptors: two per socket in each proxy.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
nofile=$(ulimit -n)
log "open files limit: $nofile"

if [ -n "$rev" ]; then
  log "building comfygate at $rev"
  mkdir -p "$tmp/src"
  git archive --format=tar "$rev" | tar -x -C "$tmp/src"
  (cd "$tmp/src" && go build -o "$tmp/comfygate" ./cmd/comfygate)
  built="$(git rev-parse --short "$rev")"
else
  log "building comfygate from the working tree"
  if ! go build -o "$tmp/comfygate" ./cmd/comfygate; then
    echo "run.sh: comfygate does not build from the working tree; try --rev HEAD" >&2
    exit 1
  fi
  built="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- cmd internal go.mod 2>/dev/null || echo ', with uncommitted changes')"
fi
log "building the harness"
go build -o "$tmp/comfybench" ./bench/cmd/comfybench
cb="$tmp/comfybench"

key=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
printf '%s\n' "$key" > "$tmp/keys.txt"
chmod 600 "$tmp/keys.txt"

read -r p_up p_cg p_cgk p_ngx p_ngxk p_hap p_hapk p_cad p_cadk <<< "$("$cb" freeport -n 9)"

# start NAME CMD...: run in the background, output to $tmp/NAME.log.
start() {
  local name=$1; shift
  "$@" > "$tmp/$name.log" 2>&1 &
  pids+=("$!")
  names+=("$name")
  last_pid=$!
}

targets=()
skipped=()

# skip WHY NAME: leave a peer out of the run, and say why on the page.
skip() {
  case $1 in
    rejected) echo "run.sh: $2: configuration rejected; skipped" >&2; cat "$tmp/$2.log" >&2
              skipped+=("$2: configuration rejected") ;;
    missing)  echo "run.sh: $2 not installed; skipped (bash bench/run.sh --install)" >&2
              skipped+=("$2: not installed") ;;
  esac
}

# up NAME PORT KIND AUTH: wait for the port, then register the target.
up() {
  local name=$1 port=$2 kind=$3 auth=$4 pid=$last_pid
  if "$cb" wait --timeout 10s --pid "$pid" "127.0.0.1:$port" && kill -0 "$pid" 2>/dev/null; then
    targets+=(--target "name=$name,kind=$kind,auth=$auth,url=http://127.0.0.1:$port,pid=$pid")
  else
    echo "run.sh: $name did not start; skipped. Last lines of its log:" >&2
    tail -5 "$tmp/$name.log" >&2 || true
    skipped+=("$name: did not start")
  fi
}

log "starting the fake ComfyUI on 127.0.0.1:$p_up"
start upstream "$cb" upstream --listen "127.0.0.1:$p_up"
upstream_pid=$last_pid
"$cb" wait --timeout 10s "127.0.0.1:$p_up"

# ---- comfygate: one Go process each, GOMAXPROCS=$workers ------------------
log "starting comfygate (GOMAXPROCS=$workers)"
start comfygate env GOMAXPROCS="$workers" "$tmp/comfygate" --listen 127.0.0.1 --port "$p_cg" \
  --upstream "http://127.0.0.1:$p_up"
up comfygate "$p_cg" comfygate 0
# --protect-ws so that, like the peers' key configurations, every route
# including /ws needs the key.
start comfygate-key env GOMAXPROCS="$workers" "$tmp/comfygate" --listen 127.0.0.1 --port "$p_cgk" \
  --upstream "http://127.0.0.1:$p_up" --api-key-file "$tmp/keys.txt" --protect-ws
up comfygate-key "$p_cgk" comfygate 1

# ---- nginx: master + $workers worker(s) -----------------------------------
nginx_conf() { # DIR PORT AUTH
  local dir=$1 port=$2 auth=$3
  mkdir -p "$dir/tmp"
  {
    cat <<EOF
daemon off;
master_process on;
worker_processes $workers;
worker_rlimit_nofile $nofile;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 16384; }
http {
  access_log $dir/access.log;
  client_body_temp_path $dir/tmp/body;
  proxy_temp_path $dir/tmp/proxy;
  fastcgi_temp_path $dir/tmp/fastcgi;
  uwsgi_temp_path $dir/tmp/uwsgi;
  scgi_temp_path $dir/tmp/scgi;
  client_max_body_size 100m;
  map_hash_bucket_size 128;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  map \$http_upgrade \$connection_upgrade { default upgrade; '' ''; }
  upstream comfyui {
    server 127.0.0.1:$p_up;
    keepalive 256;
    keepalive_requests 1000000;
    keepalive_timeout 90s;
  }
EOF
    if [ "$auth" = 1 ]; then
      cat <<EOF
  map \$http_x_api_key \$key_header_ok { default 0; "$key" 1; }
  map \$http_authorization \$key_bearer_ok { default 0; "Bearer $key" 1; }
  map "\$key_header_ok\$key_bearer_ok" \$key_denied { default 0; "00" 1; }
EOF
    fi
    cat <<EOF
  server {
    listen 127.0.0.1:$port;
    location / {
EOF
    if [ "$auth" = 1 ]; then
      cat <<EOF
      if (\$key_denied) {
        add_header WWW-Authenticate 'Bearer realm="comfygate"' always;
        return 401 '{"error":"unauthorized"}\n';
      }
      proxy_set_header Authorization "";
      proxy_set_header X-API-Key "";
EOF
    fi
    cat <<EOF
      proxy_pass http://comfyui;
      proxy_http_version 1.1;
      proxy_set_header Host \$http_host;
      proxy_set_header Upgrade \$http_upgrade;
      proxy_set_header Connection \$connection_upgrade;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 1h;
      proxy_send_timeout 1h;
    }
  }
}
EOF
  } > "$dir/nginx.conf"
}

if command -v nginx >/dev/null; then
  log "starting nginx (worker_processes $workers)"
  for cfg in plain key; do
    name=nginx port=$p_ngx auth=0
    [ "$cfg" = key ] && { name=nginx-key; port=$p_ngxk; auth=1; }
    dir="$tmp/$name"; nginx_conf "$dir" "$port" "$auth"
    if nginx -q -t -e "$dir/error.log" -p "$dir/" -c "$dir/nginx.conf" > "$tmp/$name.log" 2>&1; then
      start "$name" nginx -e "$dir/error.log" -p "$dir/" -c "$dir/nginx.conf"
      up "$name" "$port" nginx "$auth"
    else
      skip rejected "$name"
    fi
  done
else
  skip missing nginx
fi

# ---- HAProxy: one process, nbthread $workers ------------------------------
haproxy_conf() { # FILE PORT AUTH
  local file=$1 port=$2 auth=$3
  {
    cat <<EOF
global
  nbthread $workers
  maxconn 8000
  log stdout format raw local0 info

defaults
  mode http
  log global
  option httplog
  option forwardfor
  timeout connect 5s
  timeout client 120s
  timeout server 300s
  timeout tunnel 1h
  timeout http-request 10s
  timeout http-keep-alive 120s

frontend comfy
  bind 127.0.0.1:$port
EOF
    if [ "$auth" = 1 ]; then
      cat <<EOF
  acl key_ok req.hdr(x-api-key) -m str $key
  acl key_ok req.hdr(authorization) -m str "Bearer $key"
  http-request return status 401 content-type application/json string '{"error":"unauthorized"}' hdr WWW-Authenticate 'Bearer realm="comfygate"' unless key_ok
  http-request del-header authorization
  http-request del-header x-api-key
EOF
    fi
    cat <<EOF
  default_backend comfyui

backend comfyui
  server comfyui 127.0.0.1:$p_up
EOF
  } > "$file"
}

if command -v haproxy >/dev/null; then
  log "starting HAProxy (nbthread $workers)"
  for cfg in plain key; do
    name=haproxy port=$p_hap auth=0
    [ "$cfg" = key ] && { name=haproxy-key; port=$p_hapk; auth=1; }
    haproxy_conf "$tmp/$name.cfg" "$port" "$auth"
    if haproxy -q -c -f "$tmp/$name.cfg" > "$tmp/$name.log" 2>&1; then
      start "$name" haproxy -db -f "$tmp/$name.cfg"
      up "$name" "$port" haproxy "$auth"
    else
      skip rejected "$name"
    fi
  done
else
  skip missing haproxy
fi

# ---- Caddy: one Go process, GOMAXPROCS=$workers ---------------------------
caddy_conf() { # DIR PORT AUTH
  local dir=$1 port=$2 auth=$3
  mkdir -p "$dir/home"
  {
    cat <<EOF
{
  admin off
  auto_https off
  storage file_system $dir/home
}

http://127.0.0.1:$port {
  bind 127.0.0.1
  log {
    output file $dir/access.log
  }
EOF
    if [ "$auth" = 1 ]; then
      cat <<EOF
  @denied {
    not header X-API-Key $key
    not header Authorization "Bearer $key"
  }
  handle @denied {
    header WWW-Authenticate "Bearer realm=\"comfygate\""
    respond \`{"error":"unauthorized"}\` 401
  }
EOF
    fi
    cat <<EOF
  handle {
    reverse_proxy 127.0.0.1:$p_up {
EOF
    if [ "$auth" = 1 ]; then
      printf '      header_up -Authorization\n      header_up -X-API-Key\n'
    fi
    cat <<EOF
      transport http {
        keepalive_idle_conns_per_host 256
      }
    }
  }
}
EOF
  } > "$dir/Caddyfile"
}

if command -v caddy >/dev/null; then
  log "starting Caddy (GOMAXPROCS=$workers)"
  for cfg in plain key; do
    name=caddy port=$p_cad auth=0
    [ "$cfg" = key ] && { name=caddy-key; port=$p_cadk; auth=1; }
    dir="$tmp/$name"; caddy_conf "$dir" "$port" "$auth"
    start "$name" env GOMAXPROCS="$workers" HOME="$dir/home" XDG_DATA_HOME="$dir/home" XDG_CONFIG_HOME="$dir/home" \
      caddy run --config "$dir/Caddyfile" --adapter caddyfile
    up "$name" "$port" caddy "$auth"
  done
else
  skip missing caddy
fi

# ---- measure ---------------------------------------------------------------
ver() { "$@" 2>&1 | head -1 || true; }
meta=(
  --meta "command=bash bench/run.sh ${args[*]:-}"
  --meta "workers=$workers"
  --meta "go=$(ver go version)"
  --meta "comfygate=$(ver "$tmp/comfygate" --version) ($built)"
)
command -v nginx >/dev/null && meta+=(--meta "nginx=$(ver nginx -v)")
command -v haproxy >/dev/null && meta+=(--meta "haproxy=$(ver haproxy -v)")
command -v caddy >/dev/null && meta+=(--meta "caddy=$(ver caddy version)")
for s in "${skipped[@]}"; do meta+=(--meta "skipped_${s%%:*}=${s#*: }"); done

mkdir -p bench/results
opts=()
if [ "$quick" = 1 ]; then
  out=bench/results/quick.json md=bench/results/quick.md svg=bench/results/quick.svg
  opts+=(--quick --strict)
else
  out=bench/results/latest.json md=docs/benchmarks.md svg=docs/benchmarks.svg
fi
[ -n "$reps" ] && opts+=(--reps "$reps")
[ -n "$idle" ] && opts+=(--idle "$idle")
notes=()
[ -f bench/notes.md ] && [ "$quick" = 0 ] && notes=(--notes bench/notes.md)

log "measuring $((${#targets[@]} / 2)) proxy targets and direct; progress below"
rc=0
"$cb" load --key "$key" --upstream-pid "$upstream_pid" --out "$out" "${opts[@]}" "${meta[@]}" \
  --target "name=direct,kind=direct,url=http://127.0.0.1:$p_up" "${targets[@]}" || rc=$?
if [ -f "$out" ]; then
  "$cb" report --in "$out" --md "$md" --svg "$svg" "${notes[@]}"
  log "wrote $out, $md, $svg"
  sed -n '/^## Summary/,/^## Small/p' "$md" | sed '$d'
fi
exit "$rc"
