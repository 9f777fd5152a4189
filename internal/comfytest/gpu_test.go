package comfytest

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/google/go-cmp/cmp"
)

// txt2img is the body of POST /prompt for Txt2Img(checkpoint, steps).
func txt2img(t *testing.T, checkpoint string, steps int, clientID string) string {
	t.Helper()
	body := map[string]any{"prompt": Txt2Img(checkpoint, steps)}
	if clientID != "" {
		body["client_id"] = clientID
	}
	b, err := json.Marshal(body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// queue posts a prompt that must be accepted and returns its id.
func queue(t *testing.T, f *Fake, body string) string {
	t.Helper()
	res, b := post(t, f, "/prompt", body)
	if res.StatusCode != 200 {
		t.Fatalf("POST /prompt = %d %s", res.StatusCode, b)
	}
	return decode(t, b).(map[string]any)["prompt_id"].(string)
}

// runUntilEnd reads a socket until the end of prompt id and returns every
// text message, decoded.
func runUntilEnd(t *testing.T, c *websocket.Conn, id string) []map[string]any {
	t.Helper()
	var msgs []map[string]any
	for {
		fr := read(t, c)
		if fr.binary {
			continue
		}
		m := decode(t, fr.data).(map[string]any)
		msgs = append(msgs, m)
		if d, _ := m["data"].(map[string]any); m["type"] == "executing" && d["node"] == nil && d["prompt_id"] == id {
			return msgs
		}
	}
}

var sdModels = map[string][]string{
	"checkpoints": {"sdxl.safetensors", "sd15.safetensors"},
	"loras":       {"detail.safetensors"},
	"vae":         {"ft-mse.safetensors"},
}

// TestModelsInObjectInfo: Options.Models are the loaders' combo choices,
// sorted as ComfyUI sorts them, and the answer of /models/{folder}; every
// other part of the captured definitions is unchanged.
func TestModelsInObjectInfo(t *testing.T) {
	f := New(t, Options{Models: sdModels})
	_, b := get(t, f, "/object_info")
	info := decode(t, b).(map[string]any)
	if len(info) != len(classNames) {
		t.Errorf("/object_info has %d classes, want %d", len(info), len(classNames))
	}
	choices := func(class, input string) any {
		return info[class].(map[string]any)["input"].(map[string]any)["required"].(map[string]any)[input].([]any)[0]
	}
	for _, tt := range []struct {
		class, input string
		want         []any
	}{
		{"CheckpointLoaderSimple", "ckpt_name", []any{"sd15.safetensors", "sdxl.safetensors"}},
		{"LoraLoader", "lora_name", []any{"detail.safetensors"}},
		{"VAELoader", "vae_name", []any{"ft-mse.safetensors"}},
	} {
		if diff := cmp.Diff(tt.want, choices(tt.class, tt.input)); diff != "" {
			t.Errorf("%s.%s (-want +got)\n%s", tt.class, tt.input, diff)
		}
	}

	// The rest is the capture: KSampler's combos, output types, output_node.
	want := sample(t, "object_info_txt2img.json").(map[string]any)
	for _, class := range []string{"KSampler", "CLIPTextEncode", "EmptyLatentImage", "VAEDecode"} {
		if diff := cmp.Diff(want[class], info[class]); diff != "" {
			t.Errorf("%s (-capture +fake)\n%s", class, diff)
		}
		_, b := get(t, f, "/api/object_info/"+class)
		if diff := cmp.Diff(map[string]any{class: want[class]}, decode(t, b)); diff != "" {
			t.Errorf("/object_info/%s (-capture +fake)\n%s", class, diff)
		}
	}
	if info["SaveImage"].(map[string]any)["output_node"] != true || info["KSampler"].(map[string]any)["output_node"] != false {
		t.Errorf("output_node: SaveImage %v, KSampler %v", info["SaveImage"].(map[string]any)["output_node"], info["KSampler"].(map[string]any)["output_node"])
	}

	for _, tt := range []struct {
		path   string
		status int
		want   string
	}{
		{"/models/checkpoints", 200, `["sd15.safetensors","sdxl.safetensors"]`},
		{"/api/models/loras", 200, `["detail.safetensors"]`},
		{"/models/upscale_models", 200, `[]`},
		{"/models/nosuch", 404, ``},
	} {
		res, b := get(t, f, tt.path)
		if res.StatusCode != tt.status || string(b) != tt.want {
			t.Errorf("GET %s = %d %s, want %d %s", tt.path, res.StatusCode, b, tt.status, tt.want)
		}
	}

	// Options{} is a fresh v0.3.7 install: loaders with no choices.
	zero := New(t, Options{})
	_, b = get(t, zero, "/object_info/CheckpointLoaderSimple")
	if diff := cmp.Diff(map[string]any{"CheckpointLoaderSimple": want["CheckpointLoaderSimple"]}, decode(t, b)); diff != "" {
		t.Errorf("zero options (-capture +fake)\n%s", diff)
	}
}

// TestValueNotInList: a prompt naming a model file the server does not have
// fails as real v0.3.7 fails it (testdata/prompt_error_value_not_in_list.json).
func TestValueNotInList(t *testing.T) {
	f := New(t, Options{Models: sdModels})
	res, b := post(t, f, "/prompt", txt2img(t, "nope.safetensors", 20, ""))
	if res.StatusCode != 400 {
		t.Fatalf("POST /prompt = %d %s", res.StatusCode, b)
	}
	if diff := cmp.Diff(sample(t, "prompt_error_value_not_in_list.json"), decode(t, b)); diff != "" {
		t.Errorf("(-real +fake)\n%s", diff)
	}

	for _, tt := range []struct {
		name   string
		opts   Options
		body   string
		errors map[string]string // node id -> "input_name: details"
		config map[string]any    // node id -> input_config
	}{{
		// What real v0.3.7 with no models answers.
		name:   "no models",
		opts:   Options{},
		body:   txt2img(t, "sd15.safetensors", 20, ""),
		errors: map[string]string{"4": "ckpt_name: 'sd15.safetensors' not in []"},
		config: map[string]any{"4": []any{[]any{}, map[string]any{"tooltip": "The name of the checkpoint (model) to load."}}},
	}, {
		// A list over 20 choices is not sent back (29 samplers in v0.3.7).
		name:   "long list",
		opts:   Options{Models: sdModels},
		body:   strings.Replace(txt2img(t, "sd15.safetensors", 20, ""), `"euler"`, `"nosuch"`, 1),
		errors: map[string]string{"3": "sampler_name: 'nosuch' not in (list of length 29)"},
		config: map[string]any{"3": nil},
	}, {
		name: "lora and vae",
		opts: Options{Models: sdModels},
		body: `{"prompt":{"1":{"class_type":"CheckpointLoaderSimple","inputs":{"ckpt_name":"sd15.safetensors"}},` +
			`"2":{"class_type":"LoraLoader","inputs":{"model":["1",0],"clip":["1",1],"lora_name":"it's.safetensors","strength_model":1,"strength_clip":1}},` +
			`"3":{"class_type":"VAELoader","inputs":{"vae_name":"x.pt"}},` +
			`"4":{"class_type":"EmptyLatentImage","inputs":{"width":64,"height":64,"batch_size":1}},` +
			`"5":{"class_type":"VAEDecode","inputs":{"samples":["4",0],"vae":["3",0]}},` +
			`"6":{"class_type":"SaveImage","inputs":{"images":["5",0],"filename_prefix":"x"}},` +
			`"7":{"class_type":"SaveImage","inputs":{"images":["5",0],"filename_prefix":["2",0]}}}}`,
		errors: map[string]string{
			"2": `lora_name: 'it's.safetensors' not in ['detail.safetensors']`,
			"3": "vae_name: 'x.pt' not in ['ft-mse.safetensors']",
		},
		config: map[string]any{
			"2": []any{[]any{"detail.safetensors"}, map[string]any{"tooltip": "The name of the LoRA."}},
			"3": []any{[]any{"ft-mse.safetensors"}, map[string]any{}},
		},
	}} {
		t.Run(tt.name, func(t *testing.T) {
			f := New(t, tt.opts)
			res, b := post(t, f, "/prompt", tt.body)
			if res.StatusCode != 400 {
				t.Fatalf("POST /prompt = %d %s", res.StatusCode, b)
			}
			var got struct {
				Error      errorInfo                   `json:"error"`
				NodeErrors map[string]nodeErrorDecoded `json:"node_errors"`
			}
			if err := json.Unmarshal(b, &got); err != nil {
				t.Fatal(err)
			}
			if got.Error.Type != "prompt_outputs_failed_validation" {
				t.Errorf("error = %+v", got.Error)
			}
			errs, configs := map[string]string{}, map[string]any{}
			for id, ne := range got.NodeErrors {
				for _, e := range ne.Errors {
					if e.Type != "value_not_in_list" || e.Message != "Value not in list" {
						t.Errorf("node %s: %+v", id, e)
					}
					errs[id] = e.Details
					configs[id] = e.ExtraInfo["input_config"]
				}
			}
			if diff := cmp.Diff(tt.errors, errs); diff != "" {
				t.Errorf("details (-want +got)\n%s", diff)
			}
			if diff := cmp.Diff(tt.config, configs); diff != "" {
				t.Errorf("input_config (-want +got)\n%s", diff)
			}
		})
	}
}

type nodeErrorDecoded struct {
	Errors []struct {
		Type      string         `json:"type"`
		Message   string         `json:"message"`
		Details   string         `json:"details"`
		ExtraInfo map[string]any `json:"extra_info"`
	} `json:"errors"`
	ClassType string `json:"class_type"`
}

// TestClasses: a server with Options.Classes has those classes only, a
// custom one included, and refuses the others as an unknown node.
func TestClasses(t *testing.T) {
	f := New(t, Options{Classes: []string{"SaveImage", "EmptyImage", "MyCustomNode"}})
	_, b := get(t, f, "/object_info")
	var keys []string
	for k := range decode(t, b).(map[string]any) {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	if diff := cmp.Diff([]string{"EmptyImage", "MyCustomNode", "SaveImage"}, keys); diff != "" {
		t.Errorf("/object_info classes (-want +got)\n%s", diff)
	}
	if _, b := get(t, f, "/object_info/KSampler"); string(b) != "{}" {
		t.Errorf("/object_info/KSampler = %s, want {}", b)
	}
	if _, b := get(t, f, "/object_info/MyCustomNode"); !strings.Contains(string(b), `"name":"MyCustomNode"`) {
		t.Errorf("/object_info/MyCustomNode = %s", b)
	}

	res, b := post(t, f, "/prompt", txt2img(t, "sd15.safetensors", 20, ""))
	if res.StatusCode != 400 || !strings.Contains(string(b), "does not exist") {
		t.Errorf("txt2img on a server without its nodes = %d %s", res.StatusCode, b)
	}
	waitHistory(t, f, queue(t, f, `{"prompt":{"1":{"class_type":"MyCustomNode","inputs":{}},`+
		`"2":{"class_type":"EmptyImage","inputs":{"width":8,"height":8,"batch_size":1,"color":0}},`+
		`"3":{"class_type":"SaveImage","inputs":{"images":["2",0],"filename_prefix":"c"}}}}`))
}

// TestTxt2ImgRuns: the standard workflow validates and "runs" on a server
// that has its checkpoint: the messages of ComfyUI's run, a progress
// message per sampler step, and a history entry with the saved image.
func TestTxt2ImgRuns(t *testing.T) {
	f := New(t, Options{Models: sdModels, StepTime: time.Millisecond, Version: "0.8.0", PromptIDs: true, ProgressState: true, CreateTime: true})
	c := dial(t, f, "gpu")
	readText(t, c)
	id := queue(t, f, txt2img(t, "sd15.safetensors", 5, "gpu"))
	var summary []string
	finished := false
	for _, m := range runUntilEnd(t, c, id) {
		d := m["data"].(map[string]any)
		switch m["type"] {
		case "progress":
			if d["prompt_id"] != id || d["node"] != "3" {
				t.Errorf("progress = %v", d)
			}
			summary = append(summary, "progress "+jsonString(d["value"])+"/"+jsonString(d["max"]))
		case "progress_state":
			if n := d["nodes"].(map[string]any)["3"]; n != nil && n.(map[string]any)["state"] == "running" {
				summary = append(summary, "state 3 "+jsonString(n.(map[string]any)["value"])+"/"+jsonString(n.(map[string]any)["max"]))
			}
			if n := d["nodes"].(map[string]any)["3"]; n != nil && n.(map[string]any)["state"] == "finished" && !finished {
				finished = true
				summary = append(summary, "finished 3 "+jsonString(n.(map[string]any)["value"])+"/"+jsonString(n.(map[string]any)["max"]))
			}
		case "executing", "executed":
			if d["node"] != nil {
				summary = append(summary, m["type"].(string)+" "+d["node"].(string))
			}
		}
	}
	want := []string{
		"executing 5", "executing 4", "executing 7", "executing 6",
		"state 3 0/1", "executing 3",
		"state 3 1/5", "progress 1/5", "state 3 2/5", "progress 2/5", "state 3 3/5", "progress 3/5",
		"state 3 4/5", "progress 4/5", "state 3 5/5", "progress 5/5", "finished 3 5/5",
		"executing 8", "executing 9", "executed 9",
	}
	if diff := cmp.Diff(want, summary); diff != "" {
		t.Errorf("(-want +got)\n%s", diff)
	}
	_, b := get(t, f, "/history/"+id)
	outputs := decode(t, b).(map[string]any)[id].(map[string]any)["outputs"].(map[string]any)
	img := outputs["9"].(map[string]any)["images"].([]any)[0].(map[string]any)
	if res, _ := get(t, f, "/view?filename="+img["filename"].(string)+"&type=output"); res.StatusCode != 200 {
		t.Errorf("/view of %v = %d", img, res.StatusCode)
	}
	if diff := cmp.Diff([]string{id}, f.Completed()); diff != "" {
		t.Errorf("Completed (-want +got)\n%s", diff)
	}
}

func jsonString(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

// TestStepTime: a prompt runs the sum over its KSamplers of steps ×
// StepTime; a prompt without KSampler keeps the node delay.
func TestStepTime(t *testing.T) {
	const step = 10 * time.Millisecond
	f := New(t, Options{Models: sdModels, StepTime: step})
	c := dial(t, f, "gpu")
	readText(t, c)

	// Two samplers, 3 + 7 steps.
	graph := Txt2Img("sd15.safetensors", 3)
	second := map[string]any{"class_type": "KSampler", "inputs": map[string]any{}}
	for k, v := range graph["3"].(map[string]any)["inputs"].(map[string]any) {
		second["inputs"].(map[string]any)[k] = v
	}
	second["inputs"].(map[string]any)["steps"] = 7
	second["inputs"].(map[string]any)["latent_image"] = []any{"3", 0}
	graph["10"] = second
	graph["8"].(map[string]any)["inputs"].(map[string]any)["samples"] = []any{"10", 0}
	b, _ := json.Marshal(map[string]any{"prompt": graph, "client_id": "gpu"})
	id := queue(t, f, string(b))
	progress := 0
	for _, m := range runUntilEnd(t, c, id) {
		if m["type"] == "progress" {
			progress++
		}
	}
	if progress != 10 {
		t.Errorf("%d progress messages, want 10", progress)
	}
	runs := f.Runs()
	if len(runs) != 1 || runs[0].PromptID != id || !runs[0].Completed {
		t.Fatalf("Runs = %+v", runs)
	}
	if d := runs[0].End.Sub(runs[0].Start); d < 10*step {
		t.Errorf("the prompt ran %v, want at least 10 steps × %v", d, step)
	}

	// No KSampler: the node delay, no progress.
	f.SetNodeDelay(15 * time.Millisecond)
	id = queue(t, f, string(samplePrompt)) // three nodes, client "test"
	waitHistory(t, f, id)
	runs = f.Runs()
	if d := runs[1].End.Sub(runs[1].Start); d < 45*time.Millisecond {
		t.Errorf("the prompt without sampler ran %v, want at least 3 × 15ms", d)
	}
}

// TestModelLoadTime: a checkpoint load is paid when a prompt's checkpoint
// is not the one loaded, the first one included; prompts run one at a
// time, in queue order; BusyTime adds up the runs.
func TestModelLoadTime(t *testing.T) {
	const load = 40 * time.Millisecond
	f := New(t, Options{Models: sdModels, ModelLoadTime: load, StepTime: time.Millisecond})
	if f.ModelLoads() != 0 || f.LoadedModel() != "" || f.BusyTime() != 0 || f.Completed() != nil {
		t.Fatalf("a new fake: %d loads, %q loaded, busy %v, completed %v", f.ModelLoads(), f.LoadedModel(), f.BusyTime(), f.Completed())
	}
	var ids []string
	for _, ckpt := range []string{"sd15.safetensors", "sd15.safetensors", "sdxl.safetensors", "sd15.safetensors"} {
		ids = append(ids, queue(t, f, txt2img(t, ckpt, 2, "")))
	}
	waitHistory(t, f, ids[3])
	if got := f.ModelLoads(); got != 3 {
		t.Errorf("ModelLoads = %d, want 3", got)
	}
	if got := f.LoadedModel(); got != "sd15.safetensors" {
		t.Errorf("LoadedModel = %q", got)
	}
	if diff := cmp.Diff(ids, f.Completed()); diff != "" {
		t.Errorf("Completed (-want +got)\n%s", diff)
	}
	runs := f.Runs()
	var busy time.Duration
	for i, r := range runs {
		d := r.End.Sub(r.Start)
		busy += d
		wantLoads := []int{1, 0, 1, 1}[i]
		if r.PromptID != ids[i] || r.ModelLoads != wantLoads || !r.Completed {
			t.Errorf("run %d = %+v, want %s with %d load(s)", i, r, ids[i], wantLoads)
		}
		if wantLoads == 1 && d < load {
			t.Errorf("run %d paid a load and took %v, want at least %v", i, d, load)
		}
		if i > 0 && r.Start.Before(runs[i-1].End) {
			t.Errorf("run %d started at %v, before run %d ended at %v", i, r.Start, i-1, runs[i-1].End)
		}
	}
	if got := f.BusyTime(); got != busy {
		t.Errorf("BusyTime = %v, want the sum of the runs, %v", got, busy)
	}
	st := f.Stats()
	if st.ModelLoads != 3 || len(st.Runs) != 4 || st.Running != "" || len(st.Pending) != 0 || st.BusySeconds != busy.Seconds() {
		t.Errorf("Stats = %+v", st)
	}
}

// TestInterruptWhileSampling: an interrupt stops a KSampler at its next
// step, as ComfyUI's progress hook does; the prompt is not completed.
func TestInterruptWhileSampling(t *testing.T) {
	f := New(t, Options{Models: sdModels, StepTime: 20 * time.Millisecond})
	c := dial(t, f, "gpu")
	readText(t, c)
	id := queue(t, f, txt2img(t, "sd15.safetensors", 10000, "gpu")) // 200 s unless stopped
	var interrupted map[string]any
	for {
		m := readText(t, c)
		d := m["data"].(map[string]any)
		if m["type"] == "progress" && d["value"] == 1.0 {
			post(t, f, "/interrupt", "")
		}
		if m["type"] == "progress" && d["value"].(float64) > 100 {
			t.Fatalf("still sampling after the interrupt: %v", d)
		}
		if m["type"] == "execution_interrupted" {
			interrupted = d
		}
		if m["type"] == "executing" && d["node"] == nil && d["prompt_id"] == id {
			break
		}
	}
	if interrupted == nil || interrupted["node_id"] != "3" || interrupted["node_type"] != "KSampler" {
		t.Errorf("execution_interrupted = %v", interrupted)
	}
	if got := f.Completed(); got != nil {
		t.Errorf("Completed = %v, want none", got)
	}
	if runs := f.Runs(); len(runs) != 1 || runs[0].Completed || runs[0].End.IsZero() {
		t.Errorf("Runs = %+v", runs)
	}
}
