package realcomfy_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/comfygate/comfygate/internal/config"
	"github.com/comfygate/comfygate/internal/realcomfy"
)

// startFleetGateway runs comfygate in front of servers as a fleet named
// a, b, ... (the first serves the web UI and user data).
func startFleetGateway(t *testing.T, servers []*realcomfy.Server) *gateway {
	t.Helper()
	var args []string
	for i, s := range servers {
		args = append(args, "--upstream", fmt.Sprintf("%c=%s", 'a'+i, s.URL))
	}
	g := serveGateway(t, servers[0], args, func(c *config.Config) { c.FleetPollInterval = 500 * time.Millisecond })
	// Ready once every server is up and the fleet has read its node list.
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		_, b := g.do(t, "GET", "/health", nil)
		if strings.Count(string(b), `"status":"healthy"`) == len(servers)+1 && !strings.Contains(string(b), `"nodes":0`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the fleet never found every server healthy: %s", b)
		}
	}
	return g
}

// blurGraph is EmptyImage → n small ImageBlurs → SaveImage: a prompt that
// runs a few hundred milliseconds on CPU.
func blurGraph(n, col int, prefix string) map[string]any {
	graph := map[string]any{"1": node("EmptyImage", map[string]any{"width": 128, "height": 128, "batch_size": 1, "color": col})}
	for i := 2; i <= n+1; i++ {
		graph[strconv.Itoa(i)] = node("ImageBlur", map[string]any{"image": []any{strconv.Itoa(i - 1), 0}, "blur_radius": 10, "sigma": 1.0})
	}
	graph[strconv.Itoa(n+2)] = node("SaveImage", map[string]any{"images": []any{strconv.Itoa(n + 1), 0}, "filename_prefix": prefix})
	return graph
}

// waitHistory polls the merged /history/{id} until the prompt is there.
func (g *gateway) waitHistory(t *testing.T, id string, within time.Duration) historyEntry {
	t.Helper()
	for deadline := time.Now().Add(within); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		resp, b := g.do(t, "GET", "/api/history/"+id, nil, "X-API-Key", g.apiKey)
		var h map[string]historyEntry
		if resp.StatusCode == 200 && json.Unmarshal(b, &h) == nil {
			if e, ok := h[id]; ok && e.Status.Completed {
				return e
			}
		}
	}
	t.Fatalf("prompt %s did not finish within %v", id, within)
	return historyEntry{}
}

// TestFleetOfRealServers runs a mixed fleet, ComfyUI 0.3.7 (which makes
// its own prompt ids) and 0.8.0 (which takes the client's), behind one
// comfygate: prompts spread over both, every answer uses the ids the
// client got, /history, /view and /queue answer as one server, and a
// server stopped mid-run loses nothing.
func TestFleetOfRealServers(t *testing.T) {
	servers := realcomfy.Start(t, realcomfy.V037, realcomfy.V080)
	g := startFleetGateway(t, servers)

	ws := g.dial(t, "fleet-client", g.keyHeader())
	var ids []string
	for i := range 8 {
		ids = append(ids, g.queue(t, blurGraph(3, 0x102030*(i+1)&0xffffff, fmt.Sprint("fleet", i)), "fleet-client"))
	}
	// The socket ends every prompt, with the ids the client knows.
	ended := map[string]bool{}
	deadline := time.Now().Add(90 * time.Second)
	for len(ended) < len(ids) && time.Now().Before(deadline) {
		ctx, cancel := context.WithDeadline(t.Context(), deadline)
		_, b, err := ws.Read(ctx)
		cancel()
		if err != nil {
			for _, id := range ids {
				_, hb := g.do(t, "GET", "/api/history/"+id, nil, "X-API-Key", g.apiKey)
				t.Logf("%s ended=%v history=%.300s", id, ended[id], hb)
			}
			t.Fatalf("socket: %v after %d ends", err, len(ended))
		}
		var m struct {
			Type string
			Data struct {
				Node     *string `json:"node"`
				PromptID string  `json:"prompt_id"`
			}
		}
		if json.Unmarshal(b, &m) == nil && m.Type == "executing" && m.Data.Node == nil && m.Data.PromptID != "" {
			ended[m.Data.PromptID] = true
		}
	}
	ran := map[string]int{}
	for i, id := range ids {
		if !ended[id] {
			t.Errorf("no end signal on the socket for %s", id)
		}
		e := g.waitHistory(t, id, 30*time.Second)
		img := e.image(t, strconv.Itoa(3+2))
		server, _, _ := strings.Cut(strings.TrimPrefix(img.Subfolder, "@"), "/")
		ran[server]++
		checkPNG(t, g.view(t, img), 128, 128, 0x102030*(i+1)&0xffffff)
	}
	if ran["a"] == 0 || ran["b"] == 0 {
		t.Errorf("prompts per server %v; want both servers used", ran)
	}
	// As one server: the merged history holds each id once; the queue is
	// empty.
	_, hb := g.do(t, "GET", "/api/history", nil, "X-API-Key", g.apiKey)
	for _, id := range ids {
		if n := strings.Count(string(hb), `"`+id+`":`); n != 1 {
			t.Errorf("merged history has %s %d times", id, n)
		}
	}
	if _, qb := g.do(t, "GET", "/api/queue", nil, "X-API-Key", g.apiKey); !strings.Contains(string(qb), `"queue_running":[]`) {
		t.Errorf("queue after the run: %s", qb)
	}

	// Failover: b stops while prompts wait and run. A prompt that ended
	// on b before (its end signal reached the gateway) ran once: its
	// result stays on b, and it is not run again. Every other one
	// finishes on a.
	fws := g.dial(t, "failover-client", g.keyHeader())
	var more []string
	for i := range 8 {
		more = append(more, g.queue(t, blurGraph(6, 0x405060, fmt.Sprint("failover", i)), "failover-client"))
	}
	// b stops at once, with its share queued and running. The socket
	// says which server ran each prompt that ended (b's ends were sent
	// before it stopped).
	if err := servers[1].Stop(); err != nil {
		t.Fatal(err)
	}
	ranOn, ended := map[string]string{}, map[string]bool{}
	for {
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		_, b, err := fws.Read(ctx)
		cancel()
		if err != nil {
			break // nothing more for 5 s
		}
		var m struct {
			Type string
			Data struct {
				Node     *string `json:"node"`
				PromptID string  `json:"prompt_id"`
				Output   struct {
					Images []struct{ Subfolder string }
				}
			}
		}
		if json.Unmarshal(b, &m) != nil {
			continue
		}
		if m.Type == "executed" && len(m.Data.Output.Images) > 0 {
			ranOn[m.Data.PromptID] = strings.TrimPrefix(m.Data.Output.Images[0].Subfolder, "@")
		}
		if m.Type == "executing" && m.Data.Node == nil {
			ended[m.Data.PromptID] = true
		}
	}
	doneOnB := func(id string) bool { return ended[id] && ranOn[id] == "b" }
	for _, id := range more {
		if doneOnB(id) {
			continue // ran once, on b; its result is there
		}
		e := g.waitHistory(t, id, 120*time.Second)
		if e.Status.StatusStr != "success" {
			t.Errorf("prompt %s ended %q after the failover", id, e.Status.StatusStr)
		}
		if sub := e.image(t, "8").Subfolder; !strings.HasPrefix(sub, "@a") {
			t.Errorf("prompt %s finished on %q with b stopped; want a", id, sub)
		}
	}
	_, hb = g.do(t, "GET", "/api/history", nil, "X-API-Key", g.apiKey)
	for _, id := range more {
		n := strings.Count(string(hb), `"`+id+`":`)
		switch {
		case doneOnB(id) && n != 0:
			// Its result is on b, which is down: a copy on a means it
			// ran twice.
			t.Errorf("prompt %s, done on b before it stopped, is %d times in the merged history", id, n)
		case !doneOnB(id) && n != 1:
			t.Errorf("after the failover the merged history has %s %d times", id, n)
		}
	}
	// Some of b's share was still waiting when it stopped, and was queued
	// again on a.
	_, mb := g.do(t, "GET", "/metrics", nil, "X-API-Key", g.apiKey)
	if !strings.Contains(string(mb), `comfygate_fleet_prompts_resubmitted_total{`) {
		t.Errorf("no prompt was queued again after b stopped; the test needs some to move:\n%s", grepLines(string(mb), "comfygate_fleet_prompts"))
	}
}

// grepLines returns the lines of s that contain sub.
func grepLines(s, sub string) string {
	var out []string
	for l := range strings.SplitSeq(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
