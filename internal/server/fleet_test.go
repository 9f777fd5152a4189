package server

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
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

// startFleet runs comfygate in front of n fakes named gpu1..gpuN.
func startFleet(t *testing.T, n int, args ...string) (*gateway, []*comfytest.Fake) {
	t.Helper()
	var fakes []*comfytest.Fake
	for i := range n {
		fk := comfytest.New(t, comfytest.Options{})
		fakes = append(fakes, fk)
		args = append(args, "--upstream", fmt.Sprintf("gpu%d=%s", i+1, fk.URL()))
	}
	g := serve(t, fakes[0], func(c *config.Config) { c.FleetPollInterval = 50 * time.Millisecond }, args)
	return g, fakes
}

const smallPrompt = `{"prompt":{"1":{"class_type":"EmptyImage","inputs":{"width":8,"height":8,"batch_size":1,"color":0}},` +
	`"2":{"class_type":"SaveImage","inputs":{"images":["1",0],"filename_prefix":"fleet"}}},"client_id":"%s"}`

// TestFleetThroughTheGateway runs the fleet behind the whole chain: keys
// still guard every route, prompts spread over the servers, the merged
// routes answer as one ComfyUI, /health lists the servers, the metrics
// carry their names, and the socket follows the prompt.
func TestFleetThroughTheGateway(t *testing.T) {
	g, fakes := startFleet(t, 2, "--api-key", testKey, "--protect-ws")
	for _, fk := range fakes {
		fk.SetNodeDelay(150 * time.Millisecond)
	}
	key := []string{"X-API-Key", testKey}

	// Without a key, nothing.
	for _, p := range []string{"/api/queue", "/api/history", "/api/object_info"} {
		if res, _ := do(t, "GET", g.URL+p, nil); res.StatusCode != http.StatusUnauthorized {
			t.Errorf("GET %s without a key: %d; want 401", p, res.StatusCode)
		}
	}
	if res, _ := do(t, "POST", g.URL+"/api/prompt", strings.NewReader(fmt.Sprintf(smallPrompt, "x"))); res.StatusCode != http.StatusUnauthorized {
		t.Errorf("POST /prompt without a key: %d; want 401", res.StatusCode)
	}
	if _, _, err := websocket.Dial(t.Context(), "ws"+strings.TrimPrefix(g.URL, "http")+"/ws?clientId=x", nil); err == nil {
		t.Error("a socket opened without a key under --protect-ws")
	}

	// The socket, with the key.
	ws, _, err := websocket.Dial(t.Context(), "ws"+strings.TrimPrefix(g.URL, "http")+"/ws?clientId=me",
		&websocket.DialOptions{HTTPHeader: http.Header{"X-Api-Key": {testKey}}})
	if err != nil {
		t.Fatal(err)
	}
	defer ws.CloseNow()
	ws.SetReadLimit(1 << 24)

	// Wait for the hub's sockets to the servers, then queue two prompts.
	waitFor(t, func() bool { return fleetReady(t, g, fakes) })
	var ids []string
	for range 2 {
		res, body := do(t, "POST", g.URL+"/api/prompt", strings.NewReader(fmt.Sprintf(smallPrompt, "me")), key...)
		var pr struct {
			PromptID string `json:"prompt_id"`
		}
		if res.StatusCode != 200 || json.Unmarshal(body, &pr) != nil || pr.PromptID == "" {
			t.Fatalf("POST /prompt: %d %s", res.StatusCode, body)
		}
		ids = append(ids, pr.PromptID)
	}
	// Both servers got one, under the gateway's client id.
	for i, fk := range fakes {
		var got int
		for _, r := range fk.Requests() {
			if r.Method == "POST" && strings.HasSuffix(r.Path, "/prompt") {
				got++
				if strings.Contains(string(r.Body), `"client_id":"me"`) || strings.Contains(string(r.Body), testKey) {
					t.Errorf("gpu%d received %s; want the hub's client id and no key", i+1, r.Body)
				}
			}
		}
		if got != 1 {
			t.Errorf("gpu%d received %d prompts; want 1", i+1, got)
		}
	}
	// The merged queue lists both under the ids the client knows.
	res, body := do(t, "GET", g.URL+"/api/queue", nil, key...)
	for _, id := range ids {
		if res.StatusCode != 200 || !strings.Contains(string(body), id) {
			t.Errorf("merged queue %d %s lacks %s", res.StatusCode, body, id)
		}
	}
	if strings.Contains(string(body), "comfygate-") {
		t.Errorf("merged queue shows the hub's client id: %s", body)
	}
	// The socket sees both prompts end.
	ended := map[string]bool{}
	deadline := time.Now().Add(10 * time.Second)
	for len(ended) < 2 && time.Now().Before(deadline) {
		ctx, cancel := contextWithDeadline(t, deadline)
		typ, b, err := ws.Read(ctx)
		cancel()
		if err != nil {
			t.Fatalf("socket: %v (ended %v)", err, ended)
		}
		if typ != websocket.MessageText {
			continue
		}
		var m struct {
			Type string `json:"type"`
			Data struct {
				Node     *string `json:"node"`
				PromptID string  `json:"prompt_id"`
			} `json:"data"`
		}
		json.Unmarshal(b, &m)
		if m.Type == "executing" && m.Data.Node == nil {
			ended[m.Data.PromptID] = true
		}
	}
	for _, id := range ids {
		if !ended[id] {
			t.Errorf("no end signal for %s on the client's socket", id)
		}
		if res, body := do(t, "GET", g.URL+"/api/history/"+id, nil, key...); res.StatusCode != 200 || !strings.Contains(string(body), id) {
			t.Errorf("GET /history/%s: %d %s", id, res.StatusCode, body)
		}
	}

	// /health lists both servers; the metrics name them.
	res, body = do(t, "GET", g.URL+"/health", nil)
	var h struct {
		Status    string `json:"status"`
		Upstreams []struct {
			Name, Status string
		} `json:"upstreams"`
	}
	if res.StatusCode != 200 || json.Unmarshal(body, &h) != nil || h.Status != "healthy" || len(h.Upstreams) != 2 || h.Upstreams[1].Name != "gpu2" {
		t.Errorf("/health %d %s; want healthy with gpu1 and gpu2", res.StatusCode, body)
	}
	reg := g.Server.Metrics().Registry()
	waitFor(t, func() bool {
		return testutil.ToFloat64(mustCounter(t, reg, "comfygate_fleet_prompts_dispatched_total", "upstream", "gpu1")) == 1 &&
			testutil.ToFloat64(mustCounter(t, reg, "comfygate_fleet_prompts_dispatched_total", "upstream", "gpu2")) == 1
	})
}

// TestFleetUpstreamsFile pins the hot reload: a server added to the file
// joins, one removed drains and leaves, a broken file changes nothing.
func TestFleetUpstreamsFile(t *testing.T) {
	a := comfytest.New(t, comfytest.Options{})
	b := comfytest.New(t, comfytest.Options{})
	file := filepath.Join(t.TempDir(), "upstreams")
	write := func(s string) {
		// A new modification time each write, on coarse clocks too.
		os.WriteFile(file, []byte(s), 0o644)
		fi, _ := os.Stat(file)
		os.Chtimes(file, time.Now(), fi.ModTime().Add(time.Second))
	}
	write("a=" + a.URL() + "\n")
	g := serve(t, a, func(c *config.Config) {
		c.FleetPollInterval = 50 * time.Millisecond
		c.KeyPollInterval = 20 * time.Millisecond
	}, []string{"--upstreams-file", file})
	names := func() string {
		res, body := do(t, "GET", g.URL+"/health", nil)
		var h struct {
			Upstreams []struct{ Name, Status string } `json:"upstreams"`
		}
		json.Unmarshal(body, &h)
		var out []string
		for _, u := range h.Upstreams {
			out = append(out, u.Name+":"+u.Status)
		}
		_ = res
		return strings.Join(out, ",")
	}
	write("a=" + a.URL() + "\nb=" + b.URL() + "\n")
	waitFor(t, func() bool { return names() == "a:healthy,b:healthy" })
	write("a=" + a.URL() + "\nb=" + b.URL() + " drain\n")
	waitFor(t, func() bool { return names() == "a:healthy" })
	write("a=ftp://nowhere\n")
	time.Sleep(200 * time.Millisecond)
	if got := names(); got != "a:healthy" {
		t.Errorf("after a broken file: %s; want a:healthy unchanged", got)
	}
	if !strings.Contains(g.logs.String(), "upstreams file not applied") {
		t.Error("a broken upstreams file was not logged")
	}
}

// fleetReady reports whether every fake has a socket open (the hub's) and
// /health shows the node list of every server read (until then a server
// gets prompts only when no other can take them).
func fleetReady(t *testing.T, g *gateway, fakes []*comfytest.Fake) bool {
	for _, fk := range fakes {
		if len(fk.Sockets()) == 0 {
			return false
		}
	}
	_, body := do(t, "GET", g.URL+"/health", nil)
	var h struct {
		Upstreams []struct {
			Nodes int `json:"nodes"`
		} `json:"upstreams"`
	}
	if json.Unmarshal(body, &h) != nil || len(h.Upstreams) != len(fakes) {
		return false
	}
	for _, u := range h.Upstreams {
		if u.Nodes == 0 {
			return false
		}
	}
	return true
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatal("condition not met within 10s")
}

func contextWithDeadline(t *testing.T, d time.Time) (context.Context, context.CancelFunc) {
	return context.WithDeadline(t.Context(), d)
}
