package server

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"mime/multipart"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/comfygate/comfygate/internal/comfytest"
	"github.com/comfygate/comfygate/internal/config"
)

const (
	aliceKey = "alice-0123456789abcdef0123456789"
	bobKey   = "bob-0123456789abcdef0123456789ab"
	rootKey  = "root-0123456789abcdef0123456789a"
)

// startIsolated runs comfygate with --isolation keys in front of n fakes,
// with the keys alice and bob (submit) and root (admin).
func startIsolated(t *testing.T, n int) (*gateway, []*comfytest.Fake) {
	t.Helper()
	keys := filepath.Join(t.TempDir(), "keys")
	os.WriteFile(keys, []byte("alice:"+aliceKey+" submit\nbob:"+bobKey+" submit\nroot:"+rootKey+" admin\n"), 0o600)
	var fakes []*comfytest.Fake
	args := []string{"--api-key-file", keys, "--isolation", "keys"}
	for i := range n {
		fk := comfytest.New(t, comfytest.Options{})
		fakes = append(fakes, fk)
		args = append(args, "--upstream", fmt.Sprintf("gpu%d=%s", i+1, fk.URL()))
	}
	g := serve(t, fakes[0], func(c *config.Config) { c.FleetPollInterval = 50 * time.Millisecond }, args)
	return g, fakes
}

func as(key string) []string { return []string{"X-API-Key", key} }

// upload sends a small image as key and returns the status.
func upload(t *testing.T, g *gateway, key, name string) int {
	t.Helper()
	var body bytes.Buffer
	mw := multipart.NewWriter(&body)
	fw, _ := mw.CreateFormFile("image", name)
	fw.Write([]byte("\x89PNG\r\n\x1a\n" + name))
	mw.WriteField("overwrite", "true")
	mw.Close()
	res, _ := do(t, "POST", g.URL+"/api/upload/image", &body, "X-API-Key", key, "Content-Type", mw.FormDataContentType())
	return res.StatusCode
}

func queueAs(t *testing.T, g *gateway, key, clientID string) string {
	t.Helper()
	res, body := do(t, "POST", g.URL+"/api/prompt", strings.NewReader(fmt.Sprintf(smallPrompt, clientID)), as(key)...)
	var pr struct {
		PromptID string `json:"prompt_id"`
	}
	if res.StatusCode != 200 || json.Unmarshal(body, &pr) != nil {
		t.Fatalf("POST /prompt as %s: %d %s", key[:5], res.StatusCode, body)
	}
	return pr.PromptID
}

// TestIsolation pins --isolation keys route by route: alice and bob each
// see and touch only their own prompts, outputs and uploads; root (admin)
// sees everything; what the other key has looks as if it did not exist.
func TestIsolation(t *testing.T) {
	for _, n := range []int{1, 2} {
		t.Run(fmt.Sprintf("%d server(s)", n), func(t *testing.T) { testIsolation(t, n) })
	}
}

func testIsolation(t *testing.T, n int) {
	g, fakes := startIsolated(t, n)
	for _, fk := range fakes {
		fk.SetNodeDelay(150 * time.Millisecond)
	}
	// Sockets first: alice's, and bob's connecting with alice's client id.
	wsURL := "ws" + strings.TrimPrefix(g.URL, "http") + "/ws?clientId=alice-ui"
	dial := func(key string) *websocket.Conn {
		c, _, err := websocket.Dial(t.Context(), wsURL, &websocket.DialOptions{HTTPHeader: http.Header{"X-Api-Key": {key}}})
		if err != nil {
			t.Fatal(err)
		}
		c.SetReadLimit(1 << 24)
		t.Cleanup(func() { c.CloseNow() })
		return c
	}
	aliceWS, bobWS := dial(aliceKey), dial(bobKey)
	waitFor(t, func() bool { return fleetReady(t, g, fakes) })

	if s := upload(t, g, aliceKey, "alice.png"); s != 200 {
		t.Fatalf("alice's upload: %d", s)
	}
	if s := upload(t, g, bobKey, "alice.png"); s != http.StatusForbidden {
		t.Errorf("bob uploading over alice's file: %d; want 403", s)
	}
	a := queueAs(t, g, aliceKey, "alice-ui")
	b := queueAs(t, g, bobKey, "bob-ui")

	// While they wait or run: each sees only its own queue entries, and
	// the total.
	for _, c := range []struct {
		key, own, other string
	}{{aliceKey, a, b}, {bobKey, b, a}} {
		_, q := do(t, "GET", g.URL+"/api/queue", nil, as(c.key)...)
		if !strings.Contains(string(q), c.own) || strings.Contains(string(q), c.other) {
			t.Errorf("%s's /queue %s; want %s and not %s", c.key[:5], q, c.own, c.other)
		}
		if _, p := do(t, "GET", g.URL+"/api/prompt", nil, as(c.key)...); !strings.Contains(string(p), `"queue_remaining":2`) {
			t.Errorf("%s's /prompt %s; want the total, 2", c.key[:5], p)
		}
	}
	if _, q := do(t, "GET", g.URL+"/api/queue", nil, as(rootKey)...); !strings.Contains(string(q), a) || !strings.Contains(string(q), b) {
		t.Errorf("root's /queue %s; want both", q)
	}
	// bob cannot stop or delete alice's prompt.
	for _, req := range []struct{ path, body string }{
		{"/api/interrupt", ""},
		{"/api/interrupt", `{"prompt_id":"` + a + `"}`},
		{"/api/queue", `{"delete":["` + a + `"]}`},
	} {
		res, body := do(t, "POST", g.URL+req.path, strings.NewReader(req.body), as(bobKey)...)
		if res.StatusCode >= 500 {
			t.Errorf("bob's POST %s %s: %d %s", req.path, req.body, res.StatusCode, body)
		}
	}

	waitDone := func(id string) {
		waitFor(t, func() bool {
			res, body := do(t, "GET", g.URL+"/api/history/"+id, nil, as(rootKey)...)
			return res.StatusCode == 200 && strings.Contains(string(body), `"outputs"`)
		})
	}
	waitDone(b)
	// bob's clear, with alice's prompt maybe still waiting.
	do(t, "POST", g.URL+"/api/queue", strings.NewReader(`{"clear":true}`), as(bobKey)...)
	waitDone(a)
	_, ha := do(t, "GET", g.URL+"/api/history/"+a, nil, as(rootKey)...)
	if strings.Contains(string(ha), "execution_interrupted") {
		t.Errorf("bob interrupted alice's prompt: %s", ha)
	}

	// History, one prompt and all.
	for _, c := range []struct {
		key          string
		sees, hidden []string
	}{
		{aliceKey, []string{a}, []string{b}},
		{bobKey, []string{b}, []string{a}},
		{rootKey, []string{a, b}, nil},
	} {
		_, all := do(t, "GET", g.URL+"/api/history", nil, as(c.key)...)
		for _, id := range c.sees {
			if !strings.Contains(string(all), id) {
				t.Errorf("%s's /history lacks %s", c.key[:5], id)
			}
			if res, _ := do(t, "GET", g.URL+"/api/history/"+id, nil, as(c.key)...); res.StatusCode != 200 {
				t.Errorf("%s's /history/%s: %d; want 200", c.key[:5], id, res.StatusCode)
			}
		}
		for _, id := range c.hidden {
			if strings.Contains(string(all), id) {
				t.Errorf("%s's /history shows %s", c.key[:5], id)
			}
			if res, _ := do(t, "GET", g.URL+"/api/history/"+id, nil, as(c.key)...); res.StatusCode != http.StatusNotFound {
				t.Errorf("%s's /history/%s: %d; want 404", c.key[:5], id, res.StatusCode)
			}
		}
	}

	// Outputs and uploads.
	var hist map[string]struct {
		Outputs map[string]struct {
			Images []struct{ Filename, Subfolder, Type string }
		}
	}
	json.Unmarshal(ha, &hist)
	img := hist[a].Outputs["2"].Images[0]
	view := "/api/view?" + url.Values{"filename": {img.Filename}, "subfolder": {img.Subfolder}, "type": {img.Type}}.Encode()
	upl := "/api/view?" + url.Values{"filename": {"alice.png"}, "type": {"input"}}.Encode()
	for _, c := range []struct {
		key, path string
		want      int
	}{
		{aliceKey, view, 200}, {bobKey, view, 404}, {rootKey, view, 200},
		{aliceKey, upl, 200}, {bobKey, upl, 404}, {rootKey, upl, 200},
	} {
		if res, _ := do(t, "GET", g.URL+c.path, nil, as(c.key)...); res.StatusCode != c.want {
			t.Errorf("%s GET %s: %d; want %d", c.key[:5], c.path, res.StatusCode, c.want)
		}
	}
	// bob cannot load alice's upload in a prompt, nor delete her history.
	load := `{"prompt":{"1":{"class_type":"LoadImage","inputs":{"image":"alice.png"}},"2":{"class_type":"PreviewImage","inputs":{"images":["1",0]}}}}`
	if res, body := do(t, "POST", g.URL+"/api/prompt", strings.NewReader(load), as(bobKey)...); res.StatusCode != http.StatusForbidden {
		t.Errorf("bob's prompt loading alice.png: %d %s; want 403", res.StatusCode, body)
	}
	do(t, "POST", g.URL+"/api/history", strings.NewReader(`{"delete":["`+a+`"]}`), as(bobKey)...)
	do(t, "POST", g.URL+"/api/history", strings.NewReader(`{"clear":true}`), as(bobKey)...)
	if _, all := do(t, "GET", g.URL+"/api/history", nil, as(aliceKey)...); !strings.Contains(string(all), a) {
		t.Error("bob's delete or clear removed alice's history")
	}

	// Sockets: alice's socket got her prompt's messages; bob's, opened
	// with her client id, got none.
	read := func(c *websocket.Conn) (texts []string, previews int) {
		for {
			ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
			typ, data, err := c.Read(ctx)
			cancel()
			if err != nil {
				return
			}
			if typ == websocket.MessageBinary {
				previews++
				continue
			}
			texts = append(texts, string(data))
		}
	}
	at, _ := read(aliceWS)
	bt, bp := read(bobWS)
	if !strings.Contains(strings.Join(at, "\n"), `"executed"`) {
		t.Errorf("alice's socket got no executed message: %v", at)
	}
	for _, m := range bt {
		if strings.Contains(m, a) || strings.Contains(m, `"executed"`) {
			t.Errorf("bob's socket with alice's client id got %s", m)
		}
	}
	if bp != 0 {
		t.Errorf("bob's socket got %d previews", bp)
	}

	reg := g.Server.Metrics().Registry()
	if n := testutil.ToFloat64(mustCounter(t, reg, "comfygate_auth_failures_total", "reason", "isolation")); n < 5 {
		t.Errorf("auth_failures_total{reason=isolation} = %v; want every refusal above counted", n)
	}

	// ComfyUI's multi-user header names the key, never what a client sent.
	do(t, "GET", g.URL+"/api/userdata?dir=workflows", nil, "X-API-Key", bobKey, "Comfy-User", "alice")
	for _, r := range fakes[0].Requests() {
		if strings.HasPrefix(r.Path, "/api/userdata") {
			if got := r.Header.Get("Comfy-User"); got != "bob" {
				t.Errorf("ComfyUI saw comfy-user %q for bob's request; want bob", got)
			}
		}
	}
}
