package server

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/coder/websocket"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/comfygate/comfygate/internal/auth"
	"github.com/comfygate/comfygate/internal/comfytest"
	"github.com/comfygate/comfygate/internal/config"
	"github.com/comfygate/comfygate/internal/route"
)

// Team keys used by these tests.
const (
	readKey   = "cg_read_0123456789abcdef0123456789abcdef01"
	submitKey = "cg_subm_0123456789abcdef0123456789abcdef01"
	adminKey  = "cg_admn_0123456789abcdef0123456789abcdef01"
)

func teamKeyFile(t *testing.T) string {
	return keyFile(t, strings.Join([]string{
		"# viewer keeps only the hash",
		"viewer:sha256:" + auth.HashSecret(readKey) + " read",
		"render-bot:" + submitKey + " submit",
		"ops:" + adminKey,
	}, "\n"))
}

// wantScope is the scope table of docs/keys.md, written out independently of
// the route table (package route) so that a change to either shows up here.
func wantScope(method, path string) route.Scope {
	p := strings.SplitN(path, "?", 2)[0]
	p = strings.TrimPrefix(p, "/api")
	switch {
	case method == "GET" && (p == "/internal/logs" || p == "/internal/folder_paths" ||
		strings.HasPrefix(p, "/manager/") || strings.HasPrefix(p, "/snapshot/") ||
		p == "/assets" || p == "/tags" || p == "/some_custom_node/route" || p == "/no/such/path"):
		return route.ScopeAdmin
	case method == "GET":
		return route.ScopeRead
	case method == "POST" && (p == "/prompt" || p == "/upload/image" || p == "/upload/mask" ||
		p == "/interrupt" || p == "/queue" || p == "/history" || p == "/jobs/abc/cancel"):
		return route.ScopeSubmit
	}
	return route.ScopeAdmin
}

func TestScopesOverRouteTable(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key-file", teamKeyFile(t))
	keys := []struct {
		key   string
		scope route.Scope
	}{{readKey, route.ScopeRead}, {submitKey, route.ScopeSubmit}, {adminKey, route.ScopeAdmin}}
	for _, rt := range comfyRoutes {
		for _, prefix := range []string{"", "/api"} {
			target := prefix + rt.path
			need := wantScope(rt.method, target)
			for _, k := range keys {
				g.Fake.Reset()
				resp, body := do(t, rt.method, g.URL+target, strings.NewReader("{}"), "X-API-Key", k.key)
				reached := len(g.Fake.Requests()) > 0
				if k.scope < need {
					if resp.StatusCode != http.StatusForbidden || reached {
						t.Errorf("%s %s with a %s key: %d, reached %v; want 403 (needs %s)", rt.method, target, k.scope, resp.StatusCode, reached, need)
					} else if !strings.Contains(string(body), `"error":"forbidden"`) {
						t.Errorf("%s %s: 403 body %s", rt.method, target, body)
					}
				} else if resp.StatusCode == http.StatusForbidden && !reached || !reached {
					t.Errorf("%s %s with a %s key: %d, reached %v; want it through", rt.method, target, k.scope, resp.StatusCode, reached)
				}
			}
		}
	}
	// The WebSocket needs read under --protect-ws; every scope has it.
	g2 := start(t, comfytest.Options{}, "--api-key-file", teamKeyFile(t), "--protect-ws")
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	c, _, err := dialWS(ctx, g2, "/ws?clientId=v&token="+readKey, nil, nil)
	if err != nil {
		t.Fatalf("read key on /ws: %v", err)
	}
	c.Close(websocket.StatusNormalClosure, "")
}

// eventually polls cond until it holds or the time is up.
func eventually(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %s", within, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func status(t *testing.T, g *gateway, key string) int {
	t.Helper()
	resp, _ := do(t, "GET", g.URL+"/api/queue", nil, "X-API-Key", key)
	return resp.StatusCode
}

// keyReloads reads comfygate_key_reloads_total{result=result}: every
// reload attempt that applied a change or failed moves it, after the keys
// have been swapped (or kept).
func keyReloads(t *testing.T, g *gateway, result string) float64 {
	t.Helper()
	return testutil.ToFloat64(mustCounter(t, g.Server.Metrics().Registry(), "comfygate_key_reloads_total", "result", result))
}

// replaceFile puts content at path with a rename, so that the watcher never
// reads a half-written file.
func replaceFile(t *testing.T, path, content string) {
	t.Helper()
	tmp := filepath.Join(filepath.Dir(path), ".keys.tmp")
	if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// fastKeyPoll checks the key file every 10ms instead of every second.
func fastKeyPoll(c *config.Config) { c.KeyPollInterval = 10 * time.Millisecond }

func TestReloadOnEdit(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "keys")
	os.WriteFile(file, []byte("alice:"+submitKey+"\n"), 0o600)
	g := startTuned(t, comfytest.Options{}, fastKeyPoll, "--api-key-file", file, "--lockout-attempts", "0")
	if s := status(t, g, submitKey); s != 200 {
		t.Fatalf("alice before: %d", s)
	}

	// Edit in place.
	os.WriteFile(file, []byte("bob:"+adminKey+"\n"), 0o600)
	eventually(t, 3*time.Second, "the edit was not applied", func() bool { return status(t, g, adminKey) == 200 })
	if s := status(t, g, submitKey); s != 401 {
		t.Errorf("alice after removal: %d; want 401", s)
	}

	// Atomic replace, as editors do: write a temporary file, rename it over.
	replaceFile(t, file, "carol:"+readKey+" read\n")
	eventually(t, 3*time.Second, "the renamed file was not applied", func() bool { return status(t, g, readKey) == 200 })
	if s := status(t, g, adminKey); s != 401 {
		t.Errorf("bob after replace: %d; want 401", s)
	}

	// A broken file keeps the keys in force. The assertions wait for the
	// failed reload, so that they test a reload that ran.
	failed := keyReloads(t, g, "failed")
	replaceFile(t, file, "carol:"+readKey+" read\ndave:bad key with spaces\n")
	eventually(t, 3*time.Second, "the broken file was not reported", func() bool { return keyReloads(t, g, "failed") == failed+1 })
	if !strings.Contains(g.logs.String(), "key file not reloaded") {
		t.Errorf("no log line for the broken file:\n%s", g.logs)
	}
	if s := status(t, g, readKey); s != 200 {
		t.Errorf("carol after a broken edit: %d; want 200", s)
	}

	// Fixed again, so that the next failure is reported afresh (a file
	// that stays bad is reported once).
	ok := keyReloads(t, g, "ok")
	replaceFile(t, file, "carol:"+readKey+" read\n")
	eventually(t, 3*time.Second, "the fixed file was not applied", func() bool { return keyReloads(t, g, "ok") == ok+1 })

	// So does an empty one: no keys must never mean no authentication.
	failed = keyReloads(t, g, "failed")
	replaceFile(t, file, "# all keys removed by mistake\n")
	eventually(t, 3*time.Second, "the emptied file was not reported", func() bool { return keyReloads(t, g, "failed") == failed+1 })
	if s := status(t, g, readKey); s != 200 {
		t.Errorf("carol after emptying the file: %d; want 200 (previous keys kept)", s)
	}
	if resp, _ := do(t, "GET", g.URL+"/api/queue", nil); resp.StatusCode != 401 {
		t.Errorf("no key after emptying the file: %d; want 401", resp.StatusCode)
	}
}

// TestReloadKubernetesSecret: a Secret volume is a symlink chain
// (keys -> ..data/keys, ..data -> ..2026_11_28_v1) that is updated by
// swapping the ..data link.
func TestReloadKubernetesSecret(t *testing.T) {
	dir := t.TempDir()
	for v, key := range map[string]string{"v1": "alice:" + submitKey, "v2": "bob:" + adminKey} {
		os.Mkdir(filepath.Join(dir, "..2026_"+v), 0o700)
		os.WriteFile(filepath.Join(dir, "..2026_"+v, "keys"), []byte(key+"\n"), 0o600)
	}
	os.Symlink("..2026_v1", filepath.Join(dir, "..data"))
	os.Symlink("..data/keys", filepath.Join(dir, "keys"))
	g := startTuned(t, comfytest.Options{}, fastKeyPoll, "--api-key-file", filepath.Join(dir, "keys"), "--lockout-attempts", "0")
	if s := status(t, g, submitKey); s != 200 {
		t.Fatalf("v1 key: %d", s)
	}
	os.Symlink("..2026_v2", filepath.Join(dir, "..data_tmp"))
	os.Rename(filepath.Join(dir, "..data_tmp"), filepath.Join(dir, "..data"))
	eventually(t, 3*time.Second, "the swapped secret was not applied", func() bool { return status(t, g, adminKey) == 200 })
	if s := status(t, g, submitKey); s != 401 {
		t.Errorf("v1 key after the swap: %d", s)
	}
}

// TestRemovedKeyClosesItsWebSockets: removing a key ends the sockets it
// opened (close code 1008) and leaves the others open.
func TestRemovedKeyClosesItsWebSockets(t *testing.T) {
	file := keyFile(t, "alice:"+submitKey+"\nbob:"+adminKey)
	g := start(t, comfytest.Options{}, "--api-key-file", file, "--protect-ws", "--audit-log", filepath.Join(t.TempDir(), "audit.log"))
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	alice, _, err := dialWS(ctx, g, "/ws?clientId=alice&token="+submitKey, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer alice.CloseNow()
	bob, _, err := dialWS(ctx, g, "/ws?clientId=bob", http.Header{"Authorization": {"Bearer " + adminKey}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer bob.CloseNow()
	readJSON(t, ctx, alice)
	readJSON(t, ctx, bob)

	os.WriteFile(file, []byte("bob:"+adminKey+"\n"), 0o600)
	g.Server.ReloadKeys() // as SIGHUP does; the watcher would also see it within a second
	_, _, err = alice.Read(ctx)
	if got := websocket.CloseStatus(err); got != websocket.StatusPolicyViolation {
		t.Fatalf("alice's socket: %v; want close 1008", err)
	}
	if err := g.Fake.Send("bob", false, []byte(`{"type":"status"}`)); err != nil {
		t.Fatal(err)
	}
	if m := readJSON(t, ctx, bob); m["type"] != "status" {
		t.Errorf("bob's socket: %v", m)
	}
}

func TestLockout(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key-file", keyFile(t, adminKey), "--lockout-attempts", "3", "--lockout-window", "1m",
		"--trusted-proxy", "127.0.0.1/32")
	attacker := []string{"X-Forwarded-For", "198.51.100.7"}
	for i := range 3 {
		resp, _ := do(t, "GET", g.URL+"/api/queue", nil, append([]string{"X-API-Key", fmt.Sprintf("guess-%d", i)}, attacker...)...)
		if resp.StatusCode != 401 {
			t.Fatalf("attempt %d: %d", i, resp.StatusCode)
		}
	}
	// Locked out, whatever it sends, even the right key.
	resp, body := do(t, "GET", g.URL+"/api/queue", nil, append([]string{"X-API-Key", adminKey}, attacker...)...)
	retry, _ := strconv.Atoi(resp.Header.Get("Retry-After"))
	if resp.StatusCode != 429 || retry < 50 || retry > 60 || !strings.Contains(string(body), "too_many_requests") {
		t.Errorf("locked-out client: %d Retry-After %q %s", resp.StatusCode, resp.Header.Get("Retry-After"), body)
	}
	// Another client behind the same proxy is not affected.
	if resp, _ := do(t, "GET", g.URL+"/api/queue", nil, "X-API-Key", adminKey, "X-Forwarded-For", "198.51.100.8"); resp.StatusCode != 200 {
		t.Errorf("other client: %d", resp.StatusCode)
	}
	// Missing keys (a browser without one) do not count as attempts.
	for range 5 {
		do(t, "GET", g.URL+"/api/queue", nil, "X-Forwarded-For", "198.51.100.9")
	}
	if resp, _ := do(t, "GET", g.URL+"/api/queue", nil, "X-API-Key", adminKey, "X-Forwarded-For", "198.51.100.9"); resp.StatusCode != 200 {
		t.Errorf("client that only forgot its key: %d", resp.StatusCode)
	}
}

// TestLockoutIgnoresSpoofedForwardedFor: without --trusted-proxy the header
// is the client's own words and cannot move it to a fresh address.
func TestLockoutIgnoresSpoofedForwardedFor(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key-file", keyFile(t, adminKey), "--lockout-attempts", "3")
	for i := range 3 {
		do(t, "GET", g.URL+"/api/queue", nil, "X-API-Key", "guess", "X-Forwarded-For", fmt.Sprintf("203.0.113.%d", i))
	}
	resp, _ := do(t, "GET", g.URL+"/api/queue", nil, "X-API-Key", adminKey, "X-Forwarded-For", "203.0.113.99")
	if resp.StatusCode != 429 {
		t.Errorf("spoofing X-Forwarded-For escaped the lockout: %d", resp.StatusCode)
	}
}

// TestPerKeyLimits runs the chain in process inside a synctest bubble, so
// the token buckets see fake time and the test is exact.
func TestPerKeyLimits(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := loadConfig(t, "--api-key-file", keyFile(t, "a:"+adminKey+"\nb:"+submitKey),
			"--key-rate-limit", "2", "--key-prompt-limit", "3")
		srv, err := newServer(cfg, discardLogger(), "test", nil, staticTransport{})
		if err != nil {
			t.Fatal(err)
		}
		h := srv.Handler()
		send := func(method, path, key string) *httptest.ResponseRecorder {
			var body io.Reader
			if method == "POST" {
				body = strings.NewReader(`{"prompt":{}}`)
			}
			r := httptest.NewRequest(method, "http://gw"+path, body)
			r.Header.Set("X-API-Key", key)
			w := httptest.NewRecorder()
			h.ServeHTTP(w, r)
			return w
		}
		for i := range 2 {
			if w := send("GET", "/api/queue", adminKey); w.Code != 200 {
				t.Fatalf("request %d: %d", i, w.Code)
			}
		}
		w := send("GET", "/api/queue", adminKey)
		if w.Code != 429 || w.Header().Get("Retry-After") != "1" {
			t.Errorf("third request in the same instant: %d, Retry-After %q", w.Code, w.Header().Get("Retry-After"))
		}
		if w := send("GET", "/api/queue", submitKey); w.Code != 200 {
			t.Errorf("another key is limited separately: %d", w.Code)
		}
		// The UI's static files carry the key (or session) too, but do not
		// use up its budget.
		for range 5 {
			if w := send("GET", "/assets/index.js", adminKey); w.Code != 200 {
				t.Errorf("a static file was limited: %d", w.Code)
			}
		}
		time.Sleep(500 * time.Millisecond) // one token back at 2/s
		if w := send("GET", "/api/queue", adminKey); w.Code != 200 {
			t.Errorf("after 500ms: %d", w.Code)
		}

		// Prompts: 3 a minute, independent of other requests.
		time.Sleep(10 * time.Second)
		for i := range 3 {
			time.Sleep(time.Second) // stay under the request limit
			if w := send("POST", "/prompt", submitKey); w.Code != 200 {
				t.Fatalf("prompt %d: %d", i, w.Code)
			}
		}
		time.Sleep(time.Second)
		w = send("POST", "/api/prompt", submitKey)
		if w.Code != 429 || w.Header().Get("Retry-After") != "17" {
			// 3 tokens spent at 1s intervals, 0.05 back per second: 0.15 left,
			// 17s until the next whole one.
			t.Errorf("fourth prompt: %d, Retry-After %q; want 429, 17", w.Code, w.Header().Get("Retry-After"))
		}
		if w := send("GET", "/prompt", submitKey); w.Code != 200 {
			t.Errorf("GET /prompt is not a prompt: %d", w.Code)
		}
		time.Sleep(20 * time.Second)
		if w := send("POST", "/prompt", submitKey); w.Code != 200 {
			t.Errorf("prompt after the wait: %d", w.Code)
		}
	})
}

// TestAuditTrail drives every audited action and then checks the trail, and
// that no log or audit line holds a key or any piece of a key's hash.
func TestAuditTrail(t *testing.T) {
	auditFile := filepath.Join(t.TempDir(), "audit.log")
	file := teamKeyFile(t)
	g := start(t, comfytest.Options{}, "--api-key-file", file, "--audit-log", auditFile,
		"--lockout-attempts", "2", "--trusted-proxy", "127.0.0.0/8")

	prompt := `{"client_id":"a","prompt":{"1":{"class_type":"EmptyImage","inputs":{"width":8,"height":8,"batch_size":1,"color":0}},"2":{"class_type":"SaveImage","inputs":{"images":["1",0],"filename_prefix":"x"}}}}`
	_, body := do(t, "POST", g.URL+"/api/prompt", strings.NewReader(prompt), "X-API-Key", submitKey)
	var pr struct {
		PromptID string `json:"prompt_id"`
	}
	json.Unmarshal(body, &pr)
	do(t, "POST", g.URL+"/api/interrupt", nil, "Authorization", "Bearer "+submitKey)
	do(t, "POST", g.URL+"/queue?api_key="+submitKey, strings.NewReader(`{"delete":["x"]}`))
	do(t, "POST", g.URL+"/api/history", strings.NewReader(`{"clear":true}`), "X-API-Key", submitKey)
	do(t, "POST", g.URL+"/api/free", strings.NewReader(`{"unload_models":true}`), "X-API-Key", adminKey)
	do(t, "POST", g.URL+"/api/manager/queue/install", strings.NewReader(`{}`), "X-API-Key", adminKey)
	do(t, "POST", g.URL+"/api/free", strings.NewReader(`{}`), "X-API-Key", readKey)                                     // forbidden
	do(t, "POST", g.URL+"/api/prompt", strings.NewReader(`{}`), "X-API-Key", "nope", "X-Forwarded-For", "198.51.100.1") // unauthorized
	do(t, "POST", g.URL+"/api/prompt", strings.NewReader(`{}`), "X-API-Key", "nope", "X-Forwarded-For", "198.51.100.1") // locks out
	do(t, "GET", g.URL+"/api/queue", nil, "X-API-Key", readKey)                                                         // a read: not audited
	do(t, "GET", g.URL+"/logout", nil)                                                                                  // a GET that ends a session
	os.WriteFile(file, []byte("ops:"+adminKey+"\n"), 0o600)
	g.Server.ReloadKeys()
	g.stop(t)

	raw, err := os.ReadFile(auditFile)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, l := range strings.Split(strings.TrimSpace(string(raw)), "\n") {
		var e map[string]any
		if err := json.Unmarshal([]byte(l), &e); err != nil {
			t.Fatalf("audit line is not JSON: %q", l)
		}
		if e["time"] == nil {
			t.Errorf("no time: %q", l)
		}
		got = append(got, fmt.Sprintf("%v %v %v %v %v %v", e["audit"], e["key"], e["route"], e["outcome"], e["client"], e["prompt_id"]))
	}
	want := []string{
		"prompt render-bot /prompt ok 127.0.0.1 " + pr.PromptID,
		"interrupt render-bot /interrupt ok 127.0.0.1 <nil>",
		"queue render-bot /queue ok 127.0.0.1 <nil>",
		"history render-bot /history ok 127.0.0.1 <nil>",
		"free ops /free ok 127.0.0.1 <nil>",
		"manager ops /manager rejected 127.0.0.1 <nil>",
		"free viewer /free forbidden 127.0.0.1 <nil>",
		"prompt <nil> /prompt unauthorized 198.51.100.1 <nil>",
		"lockout <nil> <nil> locked_out 198.51.100.1 <nil>",
		"prompt <nil> /prompt unauthorized 198.51.100.1 <nil>",
		"logout <nil> /logout ok 127.0.0.1 <nil>",
		"key_reload <nil> <nil> ok <nil> <nil>",
	}
	if pr.PromptID == "" {
		t.Fatal("no prompt_id from ComfyUI")
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("audit trail:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if !strings.Contains(string(raw), "removed viewer, render-bot") {
		t.Errorf("key_reload does not name the removed keys:\n%s", raw)
	}

	everything := string(raw) + g.logs.String()
	for _, secret := range []string{readKey, submitKey, adminKey} {
		h := auth.HashSecret(secret)
		for _, frag := range []string{secret, secret[8:24], h, h[:8], h[len(h)-8:], strings.ToUpper(h[:8])} {
			if strings.Contains(everything, frag) {
				t.Errorf("a log or audit line holds %q", frag)
			}
		}
	}
}
