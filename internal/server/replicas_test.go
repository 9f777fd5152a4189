package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/comfygate/comfygate/internal/comfytest"
	"github.com/comfygate/comfygate/internal/config"
	"github.com/comfygate/comfygate/internal/redistest"
)

// TestRedisFleetReplicas: two gateways in fleet mode on one Redis act as
// one. A prompt queued through one streams to the client's socket on the
// other, under the client's ids, and its history and image are served by
// either. With Redis down, a prompt is refused with a clear 503 (it could
// not be found again) while reads with a key keep working; when Redis is
// back, prompts go through again, without a restart.
func TestRedisFleetReplicas(t *testing.T) {
	rs := redistest.Start(t)
	fakes := []*comfytest.Fake{comfytest.New(t, comfytest.Options{}), comfytest.New(t, comfytest.Options{})}
	args := []string{"--api-key-file", keyFile(t, "alice:"+submitKey), "--redis", rs.RawURL(), "--protect-ws"}
	for i, fk := range fakes {
		args = append(args, "--upstream", fmt.Sprintf("gpu%d=%s", i+1, fk.URL()))
	}
	tune := func(c *config.Config) { c.FleetPollInterval = 100 * time.Millisecond }
	a, b := serve(t, fakes[0], tune, args), serve(t, fakes[0], tune, args)
	waitFor(t, func() bool { return fleetReady(t, a, fakes) && fleetReady(t, b, fakes) })
	key := []string{"X-API-Key", submitKey}
	// Each replica's /health names it, says Redis answers, and exactly
	// one acts on the fleet's records; the metrics say the same.
	replica := func(g *gateway) (redis string, acting bool) {
		_, body := do(t, "GET", g.URL+"/health", nil)
		var h struct {
			Replica *struct {
				ID     string `json:"id"`
				Redis  string `json:"redis"`
				Acting bool   `json:"acting"`
			} `json:"replica"`
		}
		if json.Unmarshal(body, &h) != nil || h.Replica == nil || h.Replica.ID == "" {
			t.Fatalf("/health without the replica: %s", body)
		}
		return h.Replica.Redis, h.Replica.Acting
	}
	ra, actA := replica(a)
	rb, actB := replica(b)
	if ra != "ok" || rb != "ok" || actA == actB {
		t.Errorf("replicas: redis %q %q, acting %v %v; want ok, ok and exactly one acting", ra, rb, actA, actB)
	}
	if _, m := do(t, "GET", a.URL+"/metrics", nil, key...); !strings.Contains(string(m), "comfygate_redis_up 1") ||
		!strings.Contains(string(m), fmt.Sprintf("comfygate_fleet_acting %d", map[bool]int{false: 0, true: 1}[actA])) {
		t.Errorf("metrics of replica a lack comfygate_redis_up 1 or comfygate_fleet_acting:\n%s", m)
	}

	ws, _, err := websocket.Dial(t.Context(), "ws"+strings.TrimPrefix(b.URL, "http")+"/ws?clientId=me",
		&websocket.DialOptions{HTTPHeader: http.Header{"X-Api-Key": {submitKey}}})
	if err != nil {
		t.Fatal(err)
	}
	defer ws.CloseNow()
	ws.SetReadLimit(1 << 24)

	res, body := do(t, "POST", a.URL+"/api/prompt", strings.NewReader(fmt.Sprintf(smallPrompt, "me")), key...)
	var pr struct {
		PromptID string `json:"prompt_id"`
	}
	if res.StatusCode != 200 || json.Unmarshal(body, &pr) != nil || pr.PromptID == "" {
		t.Fatalf("POST /prompt through a: %d %s", res.StatusCode, body)
	}
	// The socket on b gets the prompt's outputs and end, with its id.
	var image struct{ Filename, Subfolder, Type string }
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	for ended := false; !ended; {
		_, raw, err := ws.Read(ctx)
		if err != nil {
			t.Fatalf("socket on b: %v (no end signal for the prompt queued through a)", err)
		}
		var m struct {
			Type string
			Data struct {
				Node     *string `json:"node"`
				PromptID string  `json:"prompt_id"`
				Output   struct {
					Images []struct{ Filename, Subfolder, Type string }
				}
			}
		}
		json.Unmarshal(raw, &m)
		if m.Data.PromptID != "" && m.Data.PromptID != pr.PromptID {
			t.Errorf("socket on b: a message for %s; want only %s", m.Data.PromptID, pr.PromptID)
		}
		if m.Type == "executed" && len(m.Data.Output.Images) > 0 {
			image = m.Data.Output.Images[0]
		}
		ended = m.Type == "executing" && m.Data.Node == nil && m.Data.PromptID == pr.PromptID
	}
	if image.Filename == "" {
		t.Fatal("socket on b: no executed message with the image")
	}
	if res, body := do(t, "GET", b.URL+"/api/history/"+pr.PromptID, nil, key...); res.StatusCode != 200 || !strings.Contains(string(body), image.Filename) {
		t.Errorf("history through b: %d %s", res.StatusCode, body)
	}
	q := fmt.Sprintf("/api/view?filename=%s&subfolder=%s&type=%s", image.Filename, image.Subfolder, image.Type)
	if res, body := do(t, "GET", b.URL+q, nil, key...); res.StatusCode != 200 || !strings.HasPrefix(string(body), "\x89PNG") {
		t.Errorf("view through b: %d", res.StatusCode)
	}

	rs.Stop()
	res, body = do(t, "POST", a.URL+"/api/prompt", strings.NewReader(fmt.Sprintf(smallPrompt, "me")), key...)
	if res.StatusCode != 503 || !strings.Contains(string(body), "state_store_unavailable") || res.Header.Get("Retry-After") == "" {
		t.Errorf("POST /prompt with Redis down: %d %s; want 503 state_store_unavailable", res.StatusCode, body)
	}
	if res, _ := do(t, "GET", a.URL+"/api/queue", nil, key...); res.StatusCode != 200 {
		t.Errorf("GET /queue with Redis down: %d; want 200", res.StatusCode)
	}
	redistest.Eventually(t, func(ctx context.Context) error {
		if r, _ := replica(a); r == "ok" {
			return errors.New("/health still says Redis is ok")
		}
		return nil
	})
	rs.Restart()
	redistest.Eventually(t, func(ctx context.Context) error {
		res, body := do(t, "POST", b.URL+"/api/prompt", strings.NewReader(fmt.Sprintf(smallPrompt, "me")), key...)
		if res.StatusCode != 200 {
			return errors.New(string(body))
		}
		return nil
	})
}
