package main

import (
	"fmt"
	"path/filepath"
	"strings"
)

// The load balancers people put in front of several ComfyUI servers today,
// configured as their documentation suggests, with sticky sessions so that
// the socket, POST /prompt, /history and /view of one prompt reach one
// server (a ComfyUI server only knows its own prompts and sends their
// messages only on its own sockets).

// nginxConf is nginx (open source: no "sticky" directive, which is nginx
// Plus only) with round robin or least_conn. Stickiness is the usual
// open-source recipe: the answer to the first request of a session (the
// socket's handshake) sets a cookie naming the server that answered
// ($upstream_addr), and a map sends requests that carry the cookie to that
// server. A request without the cookie is balanced. Passive health checks
// (max_fails=1 fail_timeout=10s, nginx's defaults) take a dead server out;
// a refused connection moves the request to the next server.
func nginxConf(dir string, port int, servers []int, leastConn bool) string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	w("daemon off;\nmaster_process on;\nworker_processes 1;\n")
	w("pid %s;\nerror_log %s warn;\n", filepath.Join(dir, "nginx.pid"), filepath.Join(dir, "error.log"))
	w("events { worker_connections 4096; }\nhttp {\n")
	w("  access_log %s;\n", filepath.Join(dir, "access.log"))
	for _, t := range []string{"client_body", "proxy", "fastcgi", "uwsgi", "scgi"} {
		w("  %s_temp_path %s;\n", t, filepath.Join(dir, "tmp", t))
	}
	w("  client_max_body_size 100m;\n")
	w("  map $http_upgrade $connection_upgrade { default upgrade; '' ''; }\n")
	w("  upstream comfyui {\n")
	if leastConn {
		w("    least_conn;\n")
	}
	for _, p := range servers {
		w("    server %s max_fails=1 fail_timeout=10s;\n", addr(p))
	}
	w("    keepalive 32;\n  }\n")
	w("  # Sticky sessions: the cookie names the server that answered first.\n")
	w("  map $cookie_comfy_server $comfy_backend {\n    default comfyui;\n")
	for _, p := range servers {
		w("    %q %s;\n", addr(p), addr(p))
	}
	w("  }\n")
	w("  # $upstream_addr lists every server tried; the last one answered.\n")
	w("  map $upstream_addr $comfy_answered { \"~(?<last>[^ ,]+)$\" $last; default \"\"; }\n")
	w("  server {\n    listen %s;\n    location / {\n", addr(port))
	w("      proxy_pass http://$comfy_backend;\n")
	w("      add_header Set-Cookie \"comfy_server=$comfy_answered; Path=/; HttpOnly\" always;\n")
	w("      proxy_http_version 1.1;\n")
	w("      proxy_set_header Host $http_host;\n")
	w("      proxy_set_header Upgrade $http_upgrade;\n")
	w("      proxy_set_header Connection $connection_upgrade;\n")
	w("      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n")
	w("      proxy_buffering off;\n      proxy_request_buffering off;\n")
	w("      proxy_read_timeout 1h;\n      proxy_send_timeout 1h;\n")
	w("    }\n  }\n}\n")
	return b.String()
}

// haproxyConf is HAProxy with balance leastconn (or another algorithm) and
// its own sticky sessions: "cookie ... insert indirect nocache" adds a
// cookie naming the server to the first answer of a session (the socket's
// 101 too) and routes requests carrying it there. Active health checks
// every 2 s (the interval comfygate polls at), "option redispatch" to
// leave a dead server's cookie for a live server.
func haproxyConf(port int, servers []int, balance string) string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	w("global\n  maxconn 4000\n  log stdout format raw local0 info\n\n")
	w("defaults\n  mode http\n  log global\n  option httplog\n  option forwardfor\n")
	w("  option redispatch\n  retries 3\n")
	w("  timeout connect 5s\n  timeout client 120s\n  timeout server 300s\n  timeout tunnel 1h\n")
	w("  timeout http-request 10s\n  timeout http-keep-alive 120s\n\n")
	w("frontend comfy\n  bind %s\n  default_backend comfyui\n\n", addr(port))
	w("backend comfyui\n  balance %s\n", balance)
	w("  cookie comfy_server insert indirect nocache httponly\n")
	for i, p := range servers {
		w("  server s%d %s cookie s%d check inter 2s\n", i+1, addr(p), i+1)
	}
	return b.String()
}
