package fleet

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/comfygate/comfygate/internal/comfytest"
)

// txt2img is a POST /prompt body of the standard txt2img workflow with the
// given checkpoint.
func txt2img(ckpt string, steps int) map[string]any {
	return map[string]any{"prompt": comfytest.Txt2Img(ckpt, steps), "client_id": "tester"}
}

// serverOf returns the server a prompt was placed on.
func (tf *testFleet) serverOf(t *testing.T, id string) string {
	t.Helper()
	p, ok, err := tf.store.Get(context.Background(), id)
	if err != nil || !ok {
		t.Fatalf("no record of %s: %v", id, err)
	}
	return p.Server
}

// TestRoutingByCapability: a prompt goes only to a server that has every
// node class and every model file it names, whatever the queues; when no
// server has them, the client gets ComfyUI's error shape naming what is
// missing, and no server is asked.
func TestRoutingByCapability(t *testing.T) {
	classes := func(extra ...string) []string {
		return append(slices.Clone(comfytest.Txt2ImgClasses), extra...)
	}
	tf := newTestFleet(t, []comfytest.Options{
		{Classes: classes("OtherNode"), Models: map[string][]string{"checkpoints": {"sd15.safetensors"}}},
		{Classes: classes("MyCustomNode"), Models: map[string][]string{"checkpoints": {"sdxl.safetensors"}}},
	})
	for _, fk := range tf.fakes {
		fk.SetNodeDelay(50 * time.Millisecond)
	}

	// Each checkpoint exists on one server only: three prompts of each go
	// there, although the other server is idle.
	var ids []string
	want := map[string]string{}
	for range 3 {
		for ckpt, server := range map[string]string{"sd15.safetensors": "gpu1", "sdxl.safetensors": "gpu2"} {
			id := tf.queue(t, txt2img(ckpt, 2))
			ids = append(ids, id)
			want[id] = server
		}
	}
	for _, id := range ids {
		if got := tf.serverOf(t, id); got != want[id] {
			t.Errorf("prompt %s went to %s; only %s has its checkpoint", id, got, want[id])
		}
	}
	for _, id := range ids {
		tf.waitDone(t, id)
	}

	// A custom node that only gpu2 has.
	custom := txt2img("sdxl.safetensors", 2)
	custom["prompt"].(map[string]any)["10"] = map[string]any{"class_type": "MyCustomNode", "inputs": map[string]any{}}
	id := tf.queue(t, custom)
	if got := tf.serverOf(t, id); got != "gpu2" {
		t.Errorf("a prompt with MyCustomNode went to %s; only gpu2 has it", got)
	}
	tf.waitDone(t, id)

	before := len(tf.fakes[0].Completed()) + len(tf.fakes[1].Completed())
	for _, tc := range []struct {
		name     string
		body     map[string]any
		wantType string
		wantIn   string // in the error's message or node_errors
	}{
		{"model on no server", txt2img("nope.safetensors", 2), "prompt_outputs_failed_validation", "nope.safetensors"},
		{"node on no server", func() map[string]any {
			b := txt2img("sd15.safetensors", 2)
			b["prompt"].(map[string]any)["10"] = map[string]any{"class_type": "NoSuchNode", "inputs": map[string]any{}}
			return b
		}(), "invalid_prompt", "NoSuchNode"},
		{"custom node and the other server's model", func() map[string]any {
			b := txt2img("sd15.safetensors", 2)
			b["prompt"].(map[string]any)["10"] = map[string]any{"class_type": "MyCustomNode", "inputs": map[string]any{}}
			return b
		}(), "prompt_outputs_failed_validation", "sd15.safetensors"},
		{"nodes split over two servers", func() map[string]any {
			b := txt2img("sdxl.safetensors", 2)
			b["prompt"].(map[string]any)["10"] = map[string]any{"class_type": "MyCustomNode", "inputs": map[string]any{}}
			b["prompt"].(map[string]any)["11"] = map[string]any{"class_type": "OtherNode", "inputs": map[string]any{}}
			return b
		}(), "invalid_prompt", "only on servers that lack others"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			status, b := tf.do(t, "POST", "/api/prompt", tc.body)
			var e struct {
				Error struct {
					Type    string `json:"type"`
					Message string `json:"message"`
				} `json:"error"`
				NodeErrors json.RawMessage `json:"node_errors"`
			}
			if status != http.StatusBadRequest || json.Unmarshal(b, &e) != nil {
				t.Fatalf("got %d %s; want 400 in ComfyUI's error shape", status, b)
			}
			if e.Error.Type != tc.wantType || e.NodeErrors == nil {
				t.Errorf("error %s; want type %s with node_errors", b, tc.wantType)
			}
			if !strings.Contains(e.Error.Message+string(e.NodeErrors), tc.wantIn) {
				t.Errorf("error %s does not name %s", b, tc.wantIn)
			}
		})
	}
	time.Sleep(100 * time.Millisecond)
	if after := len(tf.fakes[0].Completed()) + len(tf.fakes[1].Completed()); after != before {
		t.Errorf("%d prompts ran after refusals; want none", after-before)
	}
}

// TestRoutingAffinity: with two servers that both have two checkpoints,
// prompts alternating between the checkpoints each go back to the server
// that last loaded theirs, so each server loads one checkpoint once.
func TestRoutingAffinity(t *testing.T) {
	models := map[string][]string{"checkpoints": {"a.safetensors", "b.safetensors"}}
	tf := newTestFleet(t, []comfytest.Options{{Models: models}, {Models: models}})
	for _, fk := range tf.fakes {
		fk.SetNodeDelay(20 * time.Millisecond)
	}
	// Two at once: one per idle server.
	first := map[string]string{
		tf.queue(t, txt2img("a.safetensors", 2)): "a.safetensors",
		tf.queue(t, txt2img("b.safetensors", 2)): "b.safetensors",
	}
	home := map[string]string{} // checkpoint → server
	for id, ckpt := range first {
		tf.waitDone(t, id)
		home[ckpt] = tf.serverOf(t, id)
	}
	tf.Tick(context.Background())
	if home["a.safetensors"] == home["b.safetensors"] {
		t.Fatalf("both first prompts went to %s; want one per idle server", home["a.safetensors"])
	}
	// Then one at a time, both servers idle each time: the warm one wins.
	for i := range 6 {
		ckpt := []string{"a.safetensors", "b.safetensors"}[i%2]
		id := tf.queue(t, txt2img(ckpt, 2))
		if got := tf.serverOf(t, id); got != home[ckpt] {
			t.Errorf("prompt %d (%s) went to %s; %s has it loaded", i, ckpt, got, home[ckpt])
		}
		tf.waitDone(t, id)
		tf.Tick(context.Background()) // both idle again
	}
	for i, fk := range tf.fakes {
		if n := fk.ModelLoads(); n != 1 {
			t.Errorf("gpu%d loaded a checkpoint %d times; want 1", i+1, n)
		}
	}
}

// TestRoutingShortestQueue: when every server is busy and none has the
// prompt's model loaded, the prompt goes to the shortest queue.
func TestRoutingShortestQueue(t *testing.T) {
	tf := newTestFleet(t, []comfytest.Options{{}, {}, {}})
	for _, fk := range tf.fakes {
		fk.SetNodeDelay(300 * time.Millisecond)
	}
	counts := map[string]int{}
	var ids []string
	for i := range 9 {
		id := tf.queue(t, workflow("q"+string(rune('a'+i))))
		ids = append(ids, id)
		counts[tf.serverOf(t, id)]++
	}
	for _, server := range []string{"gpu1", "gpu2", "gpu3"} {
		if counts[server] != 3 {
			t.Errorf("queues %v; want 3 prompts on each of three servers", counts)
			break
		}
	}
	for _, id := range ids {
		tf.waitDone(t, id)
	}
}

// TestMergedObjectInfoKeepsOrder: when servers define a node differently
// (other model files), the merged definition offers every server's
// choices and keeps the inputs in the order ComfyUI writes them; the web
// UI (frontend 1.4) lays out widgets in that order, so a reordered
// definition put a workflow's seed into cfg.
func TestMergedObjectInfoKeepsOrder(t *testing.T) {
	tf := newTestFleet(t, []comfytest.Options{
		{Models: map[string][]string{"loras": {"one.safetensors"}}},
		{Models: map[string][]string{"loras": {"two.safetensors"}}},
	})
	status, b := tf.do(t, "GET", "/api/object_info", nil)
	if status != http.StatusOK {
		t.Fatalf("GET /object_info: %d", status)
	}
	var all map[string]json.RawMessage
	if err := json.Unmarshal(b, &all); err != nil {
		t.Fatal(err)
	}
	def := all["LoraLoader"]
	var d struct {
		Input struct {
			Required map[string]json.RawMessage `json:"required"`
		} `json:"input"`
	}
	json.Unmarshal(def, &d)
	var spec []json.RawMessage
	json.Unmarshal(d.Input.Required["lora_name"], &spec)
	if len(spec) == 0 || !strings.Contains(string(spec[0]), "one.safetensors") || !strings.Contains(string(spec[0]), "two.safetensors") {
		t.Errorf("merged lora_name choices %s; want both servers' files", d.Input.Required["lora_name"])
	}
	in, _ := objectFields(def)
	var req json.RawMessage
	for _, f := range in {
		if f.key == "input" {
			req = f.value
		}
	}
	groups, _ := objectFields(req)
	var keys []string
	for _, g := range groups {
		if g.key == "required" {
			fs, _ := objectFields(g.value)
			for _, f := range fs {
				keys = append(keys, f.key)
			}
		}
	}
	if want := []string{"model", "clip", "lora_name", "strength_model", "strength_clip"}; !slices.Equal(keys, want) {
		t.Errorf("merged LoraLoader inputs in order %v; want ComfyUI's %v", keys, want)
	}
	// The definition's own keys keep their order too.
	var top []string
	for _, f := range in {
		top = append(top, f.key)
	}
	res, err := http.Get(tf.fakes[0].URL() + "/api/object_info/LoraLoader")
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	var one map[string]json.RawMessage
	json.NewDecoder(res.Body).Decode(&one)
	single, _ := objectFields(one["LoraLoader"])
	var want []string
	for _, f := range single {
		want = append(want, f.key)
	}
	if !slices.Equal(top, want) {
		t.Errorf("merged LoraLoader keys %v; want %v", top, want)
	}
}

// TestRoutingConcurrentPosts: prompts posted at the same moment spread
// over the idle servers (choosing a server and counting the prompt on it
// are one step), rather than all seeing the same server idle.
func TestRoutingConcurrentPosts(t *testing.T) {
	tf := newTestFleet(t, []comfytest.Options{{}, {}, {}, {}})
	for _, fk := range tf.fakes {
		fk.SetNodeDelay(200 * time.Millisecond)
		fk.SetDelay("/prompt", 100*time.Millisecond) // a slow POST widens the window
	}
	ids := make(chan string, 4)
	for i := range 4 {
		go func() { ids <- tf.queue(t, workflow(fmt.Sprint("c", i))) }()
	}
	servers := map[string]bool{}
	for range 4 {
		servers[tf.serverOf(t, <-ids)] = true
	}
	if len(servers) != 4 {
		t.Errorf("4 prompts posted at once went to %d servers; want one per idle server", len(servers))
	}
}

// TestRoutingWarmIsWorthOnePrompt: among busy servers, one with the
// prompt's checkpoint loaded wins a tie but not a queue two prompts
// longer.
func TestRoutingWarmIsWorthOnePrompt(t *testing.T) {
	models := map[string][]string{"checkpoints": {"a.safetensors", "b.safetensors"}}
	tf := newTestFleet(t, []comfytest.Options{{Models: models}, {Models: models}})
	for _, fk := range tf.fakes {
		fk.SetNodeDelay(500 * time.Millisecond)
	}
	// gpu1 runs a and has two more a waiting; gpu2 runs b.
	for _, ckpt := range []string{"a.safetensors", "b.safetensors", "a.safetensors", "a.safetensors"} {
		tf.queue(t, txt2img(ckpt, 1))
	}
	// Another a: gpu1 is warm but three deep; gpu2 is one deep.
	if got := tf.serverOf(t, tf.queue(t, txt2img("a.safetensors", 1))); got != "gpu2" {
		t.Errorf("went to %s; a warm server three deep should lose to a cold one with one", got)
	}
	// Now gpu1 (3, warm for a) and gpu2 (2, warm for a): a goes to gpu2.
	if got := tf.serverOf(t, tf.queue(t, txt2img("a.safetensors", 1))); got != "gpu2" {
		t.Errorf("went to %s; want the shorter queue among warm servers", got)
	}
}

// TestEndSignalFreesServer: a server whose prompt ended (its end signal
// on the hub's socket) is idle for routing at once, not at the next
// poll.
func TestEndSignalFreesServer(t *testing.T) {
	tf := newTestFleet(t, []comfytest.Options{{}, {}})
	ws := tf.dialWS(t, "tester")
	first := tf.queue(t, workflow("first"))
	untilEnd(t, ws, first)
	// No poll since: without the end signal gpu1 would still count the
	// first prompt, and gpu2 (idle) would get the next.
	if got := tf.serverOf(t, tf.queue(t, workflow("second"))); got != tf.serverOf(t, first) {
		t.Errorf("the second prompt went to %s; the first's server was idle again", got)
	}
	if p, _, _ := tf.store.Get(context.Background(), first); !p.Done {
		t.Error("the first prompt is not done after its end signal")
	}
}
