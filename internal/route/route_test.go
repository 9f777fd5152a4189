package route

import (
	"net/http"
	"net/url"
	"strings"
	"testing"
)

// classify is Classify for a method and a path exactly as sent, which may be
// one no *http.Request can carry ("*", "prompt", raw backslashes).
func classify(method, escapedPath string, h http.Header, protectWS bool) Access {
	return match(method, escapedPath, isPreflight(method, h), protectWS).Access
}

// requiredScope is the scope Classify asks of a protected request.
func requiredScope(method, escapedPath string) Scope {
	return match(method, escapedPath, false, false).Scope
}

// TestClassifyPathTricks pins the rule that a trick can only ever make a
// public path protected, never a protected route public.
func TestClassifyPathTricks(t *testing.T) {
	tests := []struct {
		method, path string
		protectWS    bool
		want         Access
	}{
		// Public as documented.
		{"GET", "/", false, Public},
		{"HEAD", "/", false, Public},
		{"GET", "/ws", false, Public},
		{"GET", "/api/ws", false, Public},
		{"GET", "/assets/index-BxZ1.js", false, Public},
		{"GET", "/assets/index-BxZ1.css", false, Public},
		{"GET", "/extensions/core/clipspace.js", false, Public},
		{"GET", "/extensions/my%20pack/widget.js", false, Public},
		{"GET", "/scripts/api.js", false, Public},
		{"GET", "/templates/index.json", false, Public},
		{"GET", "/fonts/inter.woff2", false, Public},
		{"GET", "/favicon.ico", false, Public},
		{"OPTIONS", "/prompt", false, Protected}, // not a preflight: no Access-Control-Request-Method

		// --protect-ws.
		{"GET", "/ws", true, Protected},
		{"GET", "/api/ws", true, Protected},

		// Methods.
		{"POST", "/", false, Protected},
		{"POST", "/assets/index.js", false, Protected},
		{"PUT", "/ws", false, Protected},
		{"DELETE", "/extensions/core/x.js", false, Protected},
		{"get", "/", false, Protected},

		// API routes stay protected.
		{"GET", "/prompt", false, Protected},
		{"GET", "/api/prompt", false, Protected},
		{"GET", "/api/", false, Protected},
		{"GET", "/queue", false, Protected},
		{"GET", "/view", false, Protected},
		{"GET", "/system_stats", false, Protected},
		{"GET", "/userdata/workflows%2Fa.json", false, Protected},
		{"GET", "/api/userdata/comfy.settings.json", false, Protected},
		{"GET", "/userdata/a.json", false, Protected},
		{"GET", "/settings.json", false, Protected},
		{"GET", "/manager/queue/start.js", false, Protected},
		{"GET", "/internal/logs", false, Protected},
		{"GET", "/custom_node_route", false, Protected},
		{"GET", "/assets", false, Protected},
		{"GET", "/assets/", false, Protected},
		{"GET", "/assets/noext", false, Protected},
		{"GET", "/assets/x.py", false, Protected},

		// Dot segments, doubled and encoded slashes, encoded dots, backslashes, case.
		{"GET", "/assets/../prompt", false, Protected},
		{"GET", "/assets/../userdata/x.json", false, Protected},
		{"GET", "/assets/./index.js", false, Protected},
		{"GET", "/assets/%2e%2e/prompt.js", false, Protected},
		{"GET", "/assets/%2E%2E/prompt.js", false, Protected},
		{"GET", "/assets/.%2e/queue.js", false, Protected},
		{"GET", "/assets%2f..%2fprompt.js", false, Protected},
		{"GET", "/assets%2Findex.js", false, Protected},
		{"GET", "/assets/..%2fprompt.js", false, Protected},
		{"GET", "/assets/..\\prompt.js", false, Protected},
		{"GET", "/assets\\..\\prompt.js", false, Protected},
		{"GET", "/assets/%5c..%5cprompt.js", false, Protected},
		{"GET", "//ws", false, Protected},
		{"GET", "/ws/", false, Protected},
		{"GET", "/ws/../prompt", false, Protected},
		{"GET", "/./ws", false, Protected},
		{"GET", "/%77s", false, Public}, // decodes to /ws, which is public anyway
		{"GET", "/%77s", true, Protected},
		{"GET", "/WS", false, Protected},
		{"GET", "/Ws", false, Protected},
		{"GET", "/ASSETS/index.js", false, Protected},
		{"GET", "/assets//index.js", false, Protected},
		{"GET", "/assets/index.js%00", false, Protected},
		{"GET", "/assets/index.js;.css", false, Protected},
		{"GET", "/assets/%25%32%65%25%32%65/prompt.js", false, Protected},
		{"GET", "/favicon.ico/../prompt", false, Protected},
		{"GET", "/prompt.js", false, Public}, // a root file: ComfyUI has no such route, static handler answers
		{"GET", "/prompt.json", false, Protected},
		{"GET", "", false, Protected},
		{"GET", "*", false, Protected},
		{"GET", "prompt", false, Protected},
	}
	for _, tt := range tests {
		if got := classify(tt.method, tt.path, http.Header{}, tt.protectWS); got != tt.want {
			t.Errorf("Classify(%s %q, protectWS=%v) = %v; want %v", tt.method, tt.path, tt.protectWS, got, tt.want)
		}
	}
}

func TestClassifyPreflight(t *testing.T) {
	h := http.Header{"Access-Control-Request-Method": {"POST"}, "Origin": {"https://app.example"}}
	if got := classify("OPTIONS", "/prompt", h, true); got != Preflight {
		t.Errorf("Classify(preflight) = %v; want preflight", got)
	}
	if got := classify("POST", "/prompt", h, false); got != Protected {
		t.Errorf("POST with preflight headers = %v; want protected", got)
	}
}

// routerView decodes a path the most permissive way any server might: every
// escape decoded, backslashes as slashes, dot segments and doubled slashes
// resolved. A public classification must mean the same route under it.
func routerView(escaped string) string {
	p, err := url.PathUnescape(escaped)
	if err != nil {
		p = escaped
	}
	p = strings.ReplaceAll(p, "\\", "/")
	for strings.Contains(p, "//") {
		p = strings.ReplaceAll(p, "//", "/")
	}
	return cleanPath(p)
}

func cleanPath(p string) string {
	var out []string
	for _, seg := range strings.Split(p, "/") {
		switch seg {
		case "", ".":
		case "..":
			if len(out) > 0 {
				out = out[:len(out)-1]
			}
		default:
			out = append(out, seg)
		}
	}
	return "/" + strings.Join(out, "/")
}

func FuzzClassify(f *testing.F) {
	for _, s := range []string{"/", "/ws", "/assets/index.js", "/assets/../prompt", "/assets/%2e%2e/prompt.js",
		"/extensions/a%20b/c.js", "//ws", "/assets\\..\\x.js", "/favicon.ico", "/templates/index.json", "/%77s"} {
		f.Add("GET", s)
	}
	f.Fuzz(func(t *testing.T, method, p string) {
		if classify(method, p, http.Header{}, false) != Public {
			return
		}
		if method != "GET" && method != "HEAD" {
			t.Fatalf("%s %q is public", method, p)
		}
		decoded, err := url.PathUnescape(p)
		if err != nil {
			t.Fatalf("%q is public but does not decode: %v", p, err)
		}
		if rv := routerView(p); rv != decoded && !(decoded == "/" && rv == "/") {
			t.Fatalf("%q is public but a router could read it as %q", p, rv)
		}
		if classify(method, p, http.Header{}, true) == Public && (decoded == "/ws" || decoded == "/api/ws") {
			t.Fatalf("%q is public under protectWS", p)
		}
	})
}

func TestRequiredScopeTricks(t *testing.T) {
	tests := []struct {
		method, path string
		want         Scope
	}{
		{"GET", "/queue", ScopeRead},
		{"GET", "/api/queue", ScopeRead},
		{"GET", "/api/api/jobs", ScopeRead},
		{"GET", "/api/userdata/workflows%2Fa.json", ScopeRead},
		{"GET", "/api/userdata/workflows%2F%E5%B7%A5%E4%BD%9C.json", ScopeRead}, // a CJK file name
		{"GET", "/api/userdata/100%25.json", ScopeRead},
		{"GET", "/view%25", ScopeAdmin},
		{"GET", "/history/%2e%2e%2finternal", ScopeAdmin},
		{"POST", "/api/prompt", ScopeSubmit},
		{"POST", "/api/jobs/abc/cancel", ScopeSubmit},
		{"POST", "/api/jobs/a/b/cancel", ScopeAdmin},
		{"POST", "/api/userdata/workflows%2Fa.json", ScopeAdmin},
		{"GET", "/internal/logs", ScopeAdmin},
		{"GET", "/userdata%2F..%2Finternal%2Flogs", ScopeAdmin},
		{"GET", "/history/../internal/logs", ScopeAdmin},
		{"GET", "/history/%2e%2e/internal/logs", ScopeAdmin},
		{"GET", "/view/../manager/x", ScopeAdmin},
		{"GET", "/viewx", ScopeAdmin},
		{"GET", "/api%2Finternal/logs", ScopeAdmin},
		{"GET", "//queue", ScopeAdmin},
		{"GET", "/QUEUE", ScopeAdmin},
		{"DELETE", "/queue", ScopeAdmin},
		{"PUT", "/prompt", ScopeAdmin},
		{"GET", "/manager/queue/status", ScopeAdmin},
		{"GET", "/custom/route", ScopeAdmin},
	}
	for _, tt := range tests {
		if got := requiredScope(tt.method, tt.path); got != tt.want {
			t.Errorf("RequiredScope(%s %s) = %v; want %v", tt.method, tt.path, got, tt.want)
		}
	}
}

func TestLabels(t *testing.T) {
	tests := []struct {
		method, path string
		label, kind  string
	}{
		{"GET", "/", "/", "ui"},
		{"GET", "/ws", "/ws", "ws"},
		{"GET", "/api/ws", "/ws", "ws"},
		{"POST", "/api/prompt", "/prompt", "prompt"},
		{"GET", "/prompt", "/prompt", "prompt"},
		{"GET", "/api/history/abc-123-secret-id", "/history/{id}", "history"},
		{"POST", "/api/upload/image", "/upload/image", "upload"},
		{"GET", "/api/userdata/workflows%2Fa.json", "/userdata", "userdata"},
		{"GET", "/api/v2/userdata", "/userdata", "userdata"},
		{"POST", "/api/jobs/abc/cancel", "/jobs", "jobs"},
		{"GET", "/api/api/jobs", "/jobs", "jobs"},
		{"POST", "/api/manager/queue/install", "/manager", "manager"},
		{"POST", "/customnode/install", "/customnode", "manager"},
		{"GET", "/api/assets/123/content", "/assets", "assets"},
		{"GET", "/assets/index-BxZ1.js", "/assets", "assets"},
		{"GET", "/extensions/core/clipspace.js", "/extensions", "extensions"},
		{"GET", "/experiment/models/checkpoints", "/experiment", "experiment"},
		{"GET", "/internal/logs", "/internal", "internal"},
		{"GET", "/health", "/health", "health"},
		{"GET", "/health/ready", "/health/ready", "health/ready"},
		{"POST", "/login", "/login", "login"},
		{"GET", "/metrics", "/metrics", "metrics"},
		// comfygate's own endpoints have no /api form.
		{"GET", "/api/health", "other", "other"},
		{"POST", "/api/login", "other", "other"},
		// Never a raw path: unknown routes, ids below unknown routes, tricks.
		{"GET", "/custom/raw/path/secret", "other", "other"},
		{"GET", "/favicon.ico", "other", "other"},
		{"GET", "/history/../internal/logs", "other", "other"},
		{"GET", "//prompt", "other", "other"},
		{"GET", "*", "other", "other"},
	}
	for _, tt := range tests {
		e := match(tt.method, tt.path, false, false)
		if e.Label != tt.label || e.Kind != tt.kind {
			t.Errorf("%s %s: label %q, kind %q; want %q, %q", tt.method, tt.path, e.Label, e.Kind, tt.label, tt.kind)
		}
	}
}

func TestPolicies(t *testing.T) {
	tests := []struct {
		method, path string
		want         Policy
	}{
		{"POST", "/api/prompt", PolicyDispatch},
		{"GET", "/api/prompt", PolicyMerge},
		{"GET", "/api/queue", PolicyMerge},
		{"POST", "/api/queue", PolicyAll},
		{"GET", "/api/history", PolicyMerge},
		{"GET", "/api/history/abc", PolicyOwner},
		{"GET", "/api/object_info", PolicyMerge},
		{"GET", "/api/system_stats", PolicyMerge},
		{"POST", "/api/free", PolicyAll},
		{"POST", "/api/interrupt", PolicyAll},
		{"GET", "/api/view", PolicyOwner},
		{"GET", "/api/jobs/abc", PolicyOwner},
		{"GET", "/ws", PolicySocket},
		{"GET", "/api/models/checkpoints", PolicyAnyHealthy},
		{"GET", "/", PolicyAnyHealthy},
		{"GET", "/assets/index-BxZ1.js", PolicyAnyHealthy},
		{"GET", "/assets/123", PolicyPrimary}, // the assets API, not a file of the UI
		{"POST", "/api/userdata/workflows%2Fa.json", PolicyPrimary},
		{"GET", "/api/settings", PolicyPrimary},
		{"GET", "/custom_node_route", PolicyPrimary},
		{"DELETE", "/api/queue", PolicyPrimary},
	}
	for _, tt := range tests {
		if got := match(tt.method, tt.path, false, false).Policy; got != tt.want {
			t.Errorf("%s %s: policy %v; want %v", tt.method, tt.path, got, tt.want)
		}
	}
}

// TestEveryRowReachable: no row is shadowed by an earlier one, and each
// matches its own pattern in both its plain and /api forms (own endpoints
// only plain).
func TestEveryRowReachable(t *testing.T) {
	for i := range table {
		rw := &table[i]
		p := strings.NewReplacer("{id}", "x1", "*", "x1/x2").Replace(rw.pattern)
		forms := []string{p}
		if !rw.own && p != "/" {
			forms = append(forms, "/api"+p)
		}
		for _, f := range forms {
			if got, _ := lookup(f); got != rw {
				t.Errorf("%s: row %q, found %v", f, rw.pattern, got)
			}
		}
	}
}

// TestZeroEntryIsProtected: a handler that reads a request's entry without
// requestlog's middleware in front sees a protected request.
func TestZeroEntryIsProtected(t *testing.T) {
	var e Entry
	if e.Access != Protected || e.PublicPath {
		t.Errorf("zero Entry: %+v", e)
	}
}

func TestClassifyRequest(t *testing.T) {
	r, _ := http.NewRequest("OPTIONS", "http://gw/api/prompt", nil)
	r.Header.Set("Access-Control-Request-Method", "POST")
	if e := Classify(r, false); e.Access != Preflight || e.PublicPath || e.Label != "/prompt" {
		t.Errorf("preflight for /api/prompt: %+v", e)
	}
	r, _ = http.NewRequest("OPTIONS", "http://gw/assets/index.js", nil)
	r.Header.Set("Access-Control-Request-Method", "GET")
	if e := Classify(r, false); e.Access != Preflight || !e.PublicPath {
		t.Errorf("preflight for a static file: %+v", e)
	}
	r, _ = http.NewRequest("GET", "http://gw/api/ws?clientId=a", nil)
	if e := Classify(r, false); e.Access != Public || e.Scope != ScopeNone {
		t.Errorf("GET /api/ws: %+v", e)
	}
	if e := Classify(r, true); e.Access != Protected || e.Scope != ScopeRead || e.PublicPath {
		t.Errorf("GET /api/ws with protectWS: %+v", e)
	}
}
