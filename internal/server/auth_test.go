package server

import (
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
	"testing"

	"github.com/comfygate/comfygate/internal/comfytest"
)

// TestNoKeysIsPassThrough pins "off by default": without keys nothing is
// checked and nothing is removed.
func TestNoKeysIsPassThrough(t *testing.T) {
	g := start(t, comfytest.Options{})
	resp, _ := do(t, "GET", g.URL+"/api/prompt?api_key=abc&x=1", nil, "Authorization", "Bearer whatever")
	if resp.StatusCode != 200 {
		t.Fatalf("status %d; want 200", resp.StatusCode)
	}
	r, _ := g.Fake.LastRequest()
	if r.Header.Get("Authorization") != "Bearer whatever" || r.RawQuery != "api_key=abc&x=1" {
		t.Errorf("pass-through changed the request: auth %q, query %q", r.Header.Get("Authorization"), r.RawQuery)
	}
}

func TestEveryAuthMethod(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key-file", keyFile(t, testKey2))
	tests := []struct {
		name   string
		query  string
		header []string
	}{
		{"bearer", "", []string{"Authorization", "Bearer " + testKey2}},
		{"bearer lower-case scheme", "", []string{"Authorization", "bearer " + testKey2}},
		{"x-api-key", "", []string{"X-API-Key", testKey2}},
		{"api_key query", "api_key=" + testKey2, nil},
		{"token query", "token=" + testKey2, nil},
		{"all at once", "api_key=" + testKey2 + "&token=" + testKey2, []string{"Authorization", "Bearer " + testKey2, "X-API-Key", testKey2}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g.Fake.Reset()
			q := "max_items=1"
			if tt.query != "" {
				q = tt.query + "&max_items=1"
			}
			resp, body := do(t, "GET", g.URL+"/api/history?"+q, nil, tt.header...)
			if resp.StatusCode != 200 {
				t.Fatalf("status %d (%s); want 200", resp.StatusCode, body)
			}
			r, ok := g.Fake.LastRequest()
			if !ok || r.Path != "/api/history" {
				t.Fatalf("upstream did not get the request: %+v", r)
			}
			if r.RawQuery != "max_items=1" {
				t.Errorf("upstream query %q; want only max_items=1", r.RawQuery)
			}
			if seen := credentialsSeen(g.Fake); len(seen) > 0 {
				t.Errorf("credentials reached ComfyUI: %q", seen)
			}
		})
	}
}

func TestAuthFailures(t *testing.T) {
	// Sixteen bad attempts in a row would lock the test client out.
	g := start(t, comfytest.Options{}, "--api-key-file", keyFile(t, testKey2), "--lockout-attempts", "0")
	wrong := testKey2[:len(testKey2)-1] + "X"
	tests := []struct {
		name   string
		query  string
		header []string
		reason string
	}{
		{"nothing", "", nil, "missing"},
		{"wrong bearer", "", []string{"Authorization", "Bearer " + wrong}, "invalid"},
		{"empty bearer", "", []string{"Authorization", "Bearer "}, "invalid"},
		{"basic scheme is not a key", "", []string{"Authorization", "Basic " + testKey2}, "missing"},
		{"key without scheme is not a key", "", []string{"Authorization", testKey2}, "missing"},
		{"wrong x-api-key", "", []string{"X-API-Key", wrong}, "invalid"},
		{"key prefix", "", []string{"X-API-Key", testKey2[:10]}, "invalid"},
		{"key plus suffix", "", []string{"X-API-Key", testKey2 + "x"}, "invalid"},
		{"wrong query", "api_key=" + wrong, nil, "invalid"},
		{"empty query", "api_key=", nil, "invalid"},
		{"wrong token", "token=" + wrong, nil, "invalid"},
		{"good header, bad query", "api_key=" + wrong, []string{"Authorization", "Bearer " + testKey2}, "invalid"},
		{"good query, bad header", "token=" + testKey2, []string{"X-API-Key", wrong}, "invalid"},
		{"good and bad x-api-key", "", []string{"X-API-Key", testKey2, "X-API-Key", wrong}, "invalid"},
		{"key in another param", "key=" + testKey2, nil, "missing"},
		{"key in a cookie", "", []string{"Cookie", "api_key=" + testKey2}, "missing"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g.Fake.Reset()
			target := g.URL + "/api/prompt"
			if tt.query != "" {
				target += "?" + tt.query
			}
			resp, body := do(t, "POST", target, strings.NewReader(`{"prompt":{}}`), tt.header...)
			if resp.StatusCode != http.StatusUnauthorized {
				t.Fatalf("status %d; want 401", resp.StatusCode)
			}
			if got := resp.Header.Get("WWW-Authenticate"); !strings.HasPrefix(got, `Bearer realm="comfygate"`) {
				t.Errorf("WWW-Authenticate = %q", got)
			}
			var e struct{ Error, Message string }
			if err := json.Unmarshal(body, &e); err != nil || e.Error != "unauthorized" || e.Message == "" {
				t.Errorf("body %q is not the JSON error", body)
			}
			if strings.Contains(string(body), wrong) || strings.Contains(string(body), testKey2) {
				t.Errorf("401 body echoes the credential: %s", body)
			}
			if n := len(g.Fake.Requests()); n != 0 {
				t.Errorf("ComfyUI received %d requests; want none", n)
			}
		})
	}
	if strings.Contains(g.logs.String(), wrong) || strings.Contains(g.logs.String(), testKey2) {
		t.Error("the log contains a key")
	}
}

// comfyRoutes is every ComfyUI API route (API.md section 2), for the
// protection table. Each is also tried under /api/.
var comfyRoutes = []struct{ method, path string }{
	{"GET", "/embeddings"}, {"GET", "/models"}, {"GET", "/models/checkpoints"}, {"GET", "/extensions"},
	{"POST", "/upload/image"}, {"POST", "/upload/mask"}, {"GET", "/view?filename=x.png"},
	{"GET", "/view_metadata/loras?filename=x.safetensors"}, {"GET", "/system_stats"}, {"GET", "/features"},
	{"GET", "/prompt"}, {"POST", "/prompt"}, {"GET", "/object_info"}, {"GET", "/object_info/KSampler"},
	{"GET", "/history"}, {"GET", "/history/abc"}, {"POST", "/history"}, {"GET", "/queue"}, {"POST", "/queue"},
	{"POST", "/interrupt"}, {"POST", "/free"}, {"GET", "/users"}, {"POST", "/users"}, {"GET", "/settings"},
	{"GET", "/settings/Comfy.Theme"}, {"POST", "/settings"}, {"POST", "/settings/Comfy.Theme"},
	{"GET", "/userdata?dir=workflows"}, {"GET", "/v2/userdata"}, {"GET", "/userdata/workflows%2Fa.json"},
	{"POST", "/userdata/workflows%2Fa.json"}, {"DELETE", "/userdata/workflows%2Fa.json"},
	{"POST", "/userdata/a.json/move/b.json"}, {"GET", "/userdata/comfy.settings.json"},
	{"GET", "/experiment/models"}, {"GET", "/experiment/models/checkpoints"},
	{"GET", "/workflow_templates"}, {"GET", "/i18n"}, {"GET", "/global_subgraphs"}, {"GET", "/node_replacements"},
	{"GET", "/jobs"}, {"GET", "/jobs/abc"}, {"POST", "/jobs/abc/cancel"}, {"GET", "/assets"}, {"GET", "/tags"},
	{"PATCH", "/internal/logs/subscribe"}, {"GET", "/internal/logs"}, {"GET", "/internal/folder_paths"},
	{"GET", "/manager/queue/status"}, {"POST", "/customnode/install"}, {"GET", "/snapshot/getlist"},
	{"GET", "/some_custom_node/route"}, {"GET", "/no/such/path"},
}

func TestEveryRouteProtected(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key-file", keyFile(t, testKey2))
	for _, rt := range comfyRoutes {
		for _, prefix := range []string{"", "/api"} {
			target := prefix + rt.path
			t.Run(rt.method+" "+target, func(t *testing.T) {
				g.Fake.Reset()
				resp, _ := do(t, rt.method, g.URL+target, strings.NewReader("{}"))
				if resp.StatusCode != http.StatusUnauthorized {
					t.Errorf("without key: status %d; want 401", resp.StatusCode)
				}
				if n := len(g.Fake.Requests()); n != 0 {
					t.Errorf("without key: ComfyUI received %d requests", n)
				}
				resp, _ = do(t, rt.method, g.URL+target, strings.NewReader("{}"), "X-API-Key", testKey2)
				if resp.StatusCode == http.StatusUnauthorized {
					t.Errorf("with key: status 401")
				}
				if r, ok := g.Fake.LastRequest(); !ok || r.Method != rt.method {
					t.Errorf("with key: ComfyUI did not receive it")
				}
			})
		}
	}
}

// TestPathTricksThroughChain sends each trick as raw bytes, so nothing
// between the test and the gateway normalises it.
func TestPathTricksThroughChain(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key-file", keyFile(t, testKey2))
	tricks := []string{
		"/assets/../prompt", "/assets/../api/queue", "/assets/%2e%2e/prompt", "/assets/%2E%2E/api/prompt",
		"/assets/.%2e/queue", "/assets%2f..%2fprompt", "/assets/..%2fqueue", "/assets/..\\prompt",
		"/assets\\..\\prompt", "/assets/%5c..%5cprompt", "//prompt", "//api//prompt", "/./prompt",
		"/ws/../prompt", "/ws/../api/queue", "/extensions/../userdata/comfy.settings.json",
		"/extensions/%2e%2e/userdata/a.json", "/favicon.ico/../prompt", "/PROMPT", "/Api/Prompt",
		"/api/userdata/comfy.settings.json", "/userdata/workflows%2Fsecret.json", "/templates/../history",
		"/assets/index.js/../../queue", "/%2fprompt", "/assets/%252e%252e/prompt",
		"/view?filename=../../x&api_key=", "/ws/%2e%2e/prompt",
		"http://" + "127.0.0.1" + "/prompt", // absolute-form request target
	}
	for _, target := range tricks {
		for _, method := range []string{"GET", "POST"} {
			g.Fake.Reset()
			if got := rawRequest(t, g.Addr, method, target, "Content-Length", "0"); got != http.StatusUnauthorized {
				t.Errorf("%s %s: status %d; want 401", method, target, got)
			}
			if n := len(g.Fake.Requests()); n != 0 {
				t.Errorf("%s %s: reached ComfyUI", method, target)
			}
		}
	}
}

func TestPublicRoutesNeedNoKey(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key-file", keyFile(t, testKey2))
	for _, p := range []string{"/", "/assets/index.js", "/extensions/core/example.js", "/scripts/api.js", "/favicon.ico"} {
		resp, _ := do(t, "GET", g.URL+p, nil)
		if resp.StatusCode == http.StatusUnauthorized {
			t.Errorf("GET %s: 401; the web UI's static files are public", p)
		}
		if r, ok := g.Fake.LastRequest(); !ok || r.Path != p {
			t.Errorf("GET %s did not reach ComfyUI", p)
		}
	}
	// A CORS preflight carries no key by design. For a public path it goes
	// on to ComfyUI, which answers it empty (after its own Host/Origin
	// check, hence the public Host here); for a protected one comfygate
	// answers it (guard_test.go).
	g.Fake.Reset()
	resp, _ := do(t, "OPTIONS", g.URL+"/assets/index.js", nil, "Host", "comfy.example.com",
		"Origin", "https://app.example", "Access-Control-Request-Method", "GET")
	if resp.StatusCode != 200 {
		t.Errorf("preflight: status %d; want 200", resp.StatusCode)
	}
	if r, ok := g.Fake.LastRequest(); !ok || r.Method != "OPTIONS" {
		t.Error("preflight did not reach ComfyUI")
	}
	// /health never needs the key.
	if resp, _ := do(t, "GET", g.URL+"/health", nil); resp.StatusCode != 200 {
		t.Errorf("/health: status %d", resp.StatusCode)
	}
}

func TestForwardedHeadersAreFresh(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key-file", keyFile(t, testKey2))
	do(t, "GET", g.URL+"/api/queue", nil,
		"X-API-Key", testKey2,
		"X-Forwarded-For", "203.0.113.9",
		"X-Forwarded-Host", "evil.example",
		"X-Forwarded-Proto", "https",
		"Forwarded", "for=203.0.113.9",
		"X-Real-IP", "203.0.113.9",
		"Comfy-User", "alice")
	r, _ := g.Fake.LastRequest()
	want := map[string]string{
		"X-Forwarded-For":   "127.0.0.1",
		"X-Forwarded-Host":  g.Addr,
		"X-Forwarded-Proto": "http",
		"Forwarded":         "",
		"X-Real-Ip":         "",
		"Comfy-User":        "alice",
	}
	for h, v := range want {
		if got := strings.Join(r.Header.Values(h), ","); got != v {
			t.Errorf("upstream %s = %q; want %q", h, got, v)
		}
	}
	if r.Host != g.Addr {
		t.Errorf("upstream Host = %q; want the inbound %q", r.Host, g.Addr)
	}
}

// TestForwardedHeadersFromTrustedProxy: behind a --trusted-proxy, the chain
// it reports is kept and extended; anyone else's is replaced.
func TestForwardedHeadersFromTrustedProxy(t *testing.T) {
	g := start(t, comfytest.Options{}, "--trusted-proxy", "127.0.0.1/32")
	do(t, "GET", g.URL+"/api/queue", nil, "X-Forwarded-For", "198.51.100.7", "X-Forwarded-Proto", "https", "X-Forwarded-Host", "comfy.example.com")
	r, _ := g.Fake.LastRequest()
	for h, want := range map[string]string{"X-Forwarded-For": "198.51.100.7, 127.0.0.1", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "comfy.example.com"} {
		if got := r.Header.Get(h); got != want {
			t.Errorf("upstream %s = %q; want %q", h, got, want)
		}
	}
}

func TestLogsNameKeysAndHideThem(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key-file", keyFile(t, testKey+"\n"+testKey2))
	do(t, "GET", g.URL+"/api/queue?api_key="+testKey2+"&clientId=c1", nil)
	do(t, "GET", g.URL+"/api/queue", nil, "Authorization", "Bearer "+testKey)
	do(t, "GET", g.URL+"/api/queue?token=wrong-"+testKey2, nil)
	do(t, "GET", g.URL+"/ws?token="+url.QueryEscape(testKey2), nil)
	g.stop(t)
	logs := g.logs.String()
	for _, secret := range []string{testKey, testKey2, "wrong-"} {
		if strings.Contains(logs, secret) {
			t.Errorf("log contains %q:\n%s", secret, logs)
		}
	}
	var lines []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(logs), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("log line is not JSON: %q", l)
		}
		if m["msg"] == "request" && !strings.HasPrefix(str(m["path"]), "/health") {
			lines = append(lines, m)
		}
	}
	if len(lines) != 4 {
		t.Fatalf("%d request lines; want 4:\n%s", len(lines), logs)
	}
	checks := []struct{ path, key, failure string }{
		{"/api/queue?api_key=REDACTED&clientId=c1", "key-2", ""},
		{"/api/queue", "key-1", ""},
		{"/api/queue?token=REDACTED", "", "invalid"},
		{"/ws?token=REDACTED", "key-2", ""},
	}
	for i, c := range checks {
		l := lines[i]
		if l["path"] != c.path || str(l["key"]) != c.key || str(l["auth_failure"]) != c.failure {
			t.Errorf("line %d = %v; want path %q key %q failure %q", i, l, c.path, c.key, c.failure)
		}
		for _, f := range []string{"method", "status", "bytes", "duration_ms", "client"} {
			if _, ok := l[f]; !ok {
				t.Errorf("line %d lacks %s", i, f)
			}
		}
	}
}

func str(v any) string {
	s, _ := v.(string)
	return s
}
