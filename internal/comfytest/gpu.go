package comfytest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// This file makes a fake behave like a GPU box in the ways that matter to a
// router of many ComfyUI servers: its own node classes (Options.Classes) and
// model files (Options.Models), a run time that depends on the workflow
// (Options.StepTime), a model-load time paid when a prompt needs another
// checkpoint (Options.ModelLoadTime), and counters of what it ran
// (ModelLoads, Completed, BusyTime, Runs).

// modelInputs maps a loader class and its combo input to the model folder
// whose files are the input's choices.
var modelInputs = map[string]map[string]string{
	"CheckpointLoaderSimple": {"ckpt_name": "checkpoints"},
	"LoraLoader":             {"lora_name": "loras"},
	"VAELoader":              {"vae_name": "vae"},
}

// nodeSet is what one fake can run: its node classes, their definitions
// with its model files in the loaders' combos, and its model folders.
type nodeSet struct {
	classes []string                   // sorted
	info    map[string]json.RawMessage // detailed definitions, by class
	all     []byte                     // the /object_info answer
	models  map[string][]string        // folder -> files, sorted
	folders []string                   // /models
}

// defaultNodes is the node set of Options{}: the 243 classes of v0.3.7 and
// no model files, as a real v0.3.7 install with an empty models folder.
var defaultNodes = sync.OnceValue(func() *nodeSet { return newNodeSet(nil, nil) })

// nodesFor returns the node set of opts.
func nodesFor(opts Options) *nodeSet {
	if opts.Classes == nil && opts.Models == nil {
		return defaultNodes()
	}
	return newNodeSet(opts.Classes, opts.Models)
}

func newNodeSet(classes []string, models map[string][]string) *nodeSet {
	ns := &nodeSet{info: map[string]json.RawMessage{}, models: map[string][]string{}}
	if classes == nil {
		ns.classes = classNames
	} else {
		ns.classes = slices.Clone(classes)
		slices.Sort(ns.classes)
		ns.classes = slices.Compact(ns.classes)
	}
	ns.folders = slices.Clone(modelFolders)
	for folder, files := range models {
		files = slices.Clone(files)
		slices.Sort(files) // folder_paths.get_filename_list sorts
		ns.models[folder] = slices.Compact(files)
		if !slices.Contains(ns.folders, folder) {
			ns.folders = append(ns.folders, folder)
		}
	}
	for class, def := range detailedInfo {
		for input, folder := range modelInputs[class] {
			def = withChoices(def, input, ns.models[folder])
		}
		ns.info[class] = def
	}
	var b bytes.Buffer
	b.WriteByte('{')
	for i, name := range ns.classes {
		if i > 0 {
			b.WriteByte(',')
		}
		b.Write(mustJSON(name))
		b.WriteByte(':')
		b.Write(ns.nodeInfo(name))
	}
	b.WriteByte('}')
	ns.all = b.Bytes()
	return ns
}

// withChoices puts choices in the empty combo list of input in a compact
// definition captured with no model files ("ckpt_name":[[],{...}]).
func withChoices(def json.RawMessage, input string, choices []string) json.RawMessage {
	empty := []byte(`"` + input + `":[[]`)
	if bytes.Count(def, empty) != 1 {
		panic("comfytest: no empty combo " + input + " in " + string(def))
	}
	if choices == nil {
		choices = []string{}
	}
	return bytes.Replace(def, empty, append([]byte(`"`+input+`":[`), mustJSON(choices)...), 1)
}

func (ns *nodeSet) has(class string) bool {
	_, ok := slices.BinarySearch(ns.classes, class)
	return ok
}

// nodeInfo is the definition of a class: the captured one, or a minimal one
// (no inputs) for the rest.
func (ns *nodeSet) nodeInfo(name string) []byte {
	if d, ok := ns.info[name]; ok {
		return d
	}
	return mustJSON(map[string]any{
		"input":          map[string]any{"required": map[string]any{}},
		"input_order":    map[string]any{"required": []string{}},
		"output":         []string{},
		"output_is_list": []bool{},
		"output_name":    []string{},
		"name":           name,
		"display_name":   name,
		"description":    "",
		"python_module":  "nodes",
		"category":       "simulator",
		"output_node":    outputNodes[name],
	})
}

// checkChoice is the combo check of execution.validate_inputs: the value
// must be one of the choices. Like ComfyUI, it leaves input_config out and
// names only the length of a list longer than 20.
func checkChoice(name string, v json.RawMessage, cfg []json.RawMessage, choices []json.RawMessage) []nodeErrorItem {
	var val any
	if json.Unmarshal(v, &val) != nil {
		return nil
	}
	switch val.(type) {
	case map[string]any, []any:
		val = string(v) // matches no choice, and compares safely
	}
	for _, c := range choices {
		var choice any
		if json.Unmarshal(c, &choice) == nil && choice == val {
			return nil
		}
	}
	var listInfo string
	var config any
	if len(choices) > 20 {
		listInfo = fmt.Sprintf("(list of length %d)", len(choices))
	} else {
		reprs := make([]string, len(choices))
		for i, c := range choices {
			reprs[i] = pyRepr(c)
		}
		listInfo = "[" + strings.Join(reprs, ", ") + "]"
		extra := json.RawMessage("{}")
		if len(cfg) > 1 {
			extra = cfg[1]
		}
		config = []json.RawMessage{cfg[0], extra}
	}
	return []nodeErrorItem{{"value_not_in_list", "Value not in list",
		fmt.Sprintf("%s: '%s' not in %s", name, pyStr(v), listInfo),
		map[string]any{"input_name": name, "input_config": config, "received_value": v}}}
}

// pyRepr renders a JSON value as Python's repr renders the decoded value,
// for the lists in value_not_in_list details: strings in single quotes
// unless they hold a single quote and no double quote.
func pyRepr(v json.RawMessage) string {
	var s string
	if json.Unmarshal(v, &s) != nil {
		return pyStr(v)
	}
	q := "'"
	if strings.Contains(s, "'") && !strings.Contains(s, `"`) {
		q = `"`
	}
	var b strings.Builder
	b.WriteString(q)
	for _, r := range s {
		switch {
		case r == '\\':
			b.WriteString(`\\`)
		case string(r) == q:
			b.WriteString(`\` + q)
		case r == '\n':
			b.WriteString(`\n`)
		case r == '\r':
			b.WriteString(`\r`)
		case r == '\t':
			b.WriteString(`\t`)
		case r < 0x20 || r == 0x7f:
			fmt.Fprintf(&b, `\x%02x`, r)
		default:
			b.WriteRune(r)
		}
	}
	b.WriteString(q)
	return b.String()
}

// Run is one prompt a fake ran: from the moment it left the queue to the
// moment it was done (completed, interrupted, or cut short by Close).
type Run struct {
	PromptID string
	Start    time.Time
	End      time.Time // zero while it runs
	// Completed reports that it ran to the end (execution_success).
	Completed bool
	// ModelLoads is how many checkpoint loads it paid (0 or 1 for a
	// workflow with one checkpoint loader).
	ModelLoads int
}

// gpu is the state of the simulated GPU, under Fake.mu.
type gpu struct {
	loaded     string // checkpoint in memory; "" before the first load
	modelLoads int
	runs       []Run
}

// maxRuns bounds the runs a fake remembers (Runs, Completed).
const maxRuns = 100000

// ModelLoads returns how many times the fake loaded a checkpoint: each
// CheckpointLoaderSimple it executed whose ckpt_name differed from the
// checkpoint loaded (the first load counts too). Options.ModelLoadTime is
// paid for each.
func (f *Fake) ModelLoads() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.gpu.modelLoads
}

// LoadedModel returns the checkpoint the fake has loaded, "" before the
// first.
func (f *Fake) LoadedModel() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.gpu.loaded
}

// Completed returns the ids of the prompts that ran to completion
// (execution_success, not interrupted), in the order they completed.
func (f *Fake) Completed() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var ids []string
	for _, r := range f.gpu.runs {
		if r.Completed {
			ids = append(ids, r.PromptID)
		}
	}
	return ids
}

// BusyTime returns the time spent running prompts, the one running now
// included up to now.
func (f *Fake) BusyTime() time.Duration {
	f.mu.Lock()
	defer f.mu.Unlock()
	now := time.Now()
	var d time.Duration
	for _, r := range f.gpu.runs {
		end := r.End
		if end.IsZero() {
			end = now
		}
		d += end.Sub(r.Start)
	}
	return d
}

// Runs returns every prompt the fake started, in the order it started
// them; the last one has a zero End while it runs.
func (f *Fake) Runs() []Run {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.gpu.runs)
}

// Stats is a snapshot of what the simulated GPU did, for comfyui-sim's
// --stats route.
type Stats struct {
	ModelLoads  int       `json:"model_loads"`
	LoadedModel string    `json:"loaded_model"`
	BusySeconds float64   `json:"busy_seconds"`
	Completed   []string  `json:"completed"`
	Running     string    `json:"running"` // prompt id, "" when idle
	Pending     []string  `json:"pending"` // prompt ids, in queue order
	Runs        []RunJSON `json:"runs"`
}

// RunJSON is a Run with times in Unix nanoseconds (End 0 while it runs).
type RunJSON struct {
	PromptID   string `json:"prompt_id"`
	Start      int64  `json:"start_ns"`
	End        int64  `json:"end_ns"`
	Completed  bool   `json:"completed"`
	ModelLoads int    `json:"model_loads"`
}

// Stats returns a snapshot of the counters, the queue and every run.
func (f *Fake) Stats() Stats {
	busy := f.BusyTime()
	completed := f.Completed()
	if completed == nil {
		completed = []string{}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	s := Stats{
		ModelLoads:  f.gpu.modelLoads,
		LoadedModel: f.gpu.loaded,
		BusySeconds: busy.Seconds(),
		Completed:   completed,
		Pending:     []string{},
		Runs:        make([]RunJSON, 0, len(f.gpu.runs)),
	}
	if f.running != nil {
		s.Running = f.running.id
	}
	for _, j := range f.pending {
		s.Pending = append(s.Pending, j.id)
	}
	for _, r := range f.gpu.runs {
		rj := RunJSON{PromptID: r.PromptID, Start: r.Start.UnixNano(), Completed: r.Completed, ModelLoads: r.ModelLoads}
		if !r.End.IsZero() {
			rj.End = r.End.UnixNano()
		}
		s.Runs = append(s.Runs, rj)
	}
	return s
}

// startRunLocked records that j left the queue.
func (f *Fake) startRunLocked(j *job) {
	f.gpu.runs = append(f.gpu.runs, Run{PromptID: j.id, Start: time.Now()})
	if len(f.gpu.runs) > maxRuns {
		f.gpu.runs = f.gpu.runs[1:]
	}
}

// endRunLocked records that the running prompt is done.
func (f *Fake) endRunLocked(completed bool) {
	if n := len(f.gpu.runs); n > 0 && f.gpu.runs[n-1].End.IsZero() {
		f.gpu.runs[n-1].End = time.Now()
		f.gpu.runs[n-1].Completed = completed
	}
}

// runNode spends the time node n of j takes on the simulated GPU, after
// its "executing" message: a checkpoint load when CheckpointLoaderSimple
// names another checkpoint than the one loaded, steps x Options.StepTime
// for a KSampler (with a "progress" message per step, as ComfyUI's
// progress hook sends, and the interrupt checked at each step), and the
// node delay for every other node. It reports whether an interrupt
// stopped the node.
func (f *Fake) runNode(j *job, n *node, delay time.Duration, progress *progressState) (stopped bool) {
	switch {
	case n.classType == "CheckpointLoaderSimple":
		f.loadCheckpoint(n)
	case n.classType == "KSampler" && f.opts.StepTime > 0:
		return f.sample(j, n, progress)
	}
	f.sleep(delay)
	return false
}

// loadCheckpoint pays Options.ModelLoadTime when the node names a
// checkpoint other than the one loaded.
func (f *Fake) loadCheckpoint(n *node) {
	var name string
	if json.Unmarshal(n.inputs["ckpt_name"], &name) != nil {
		return
	}
	f.mu.Lock()
	load := name != f.gpu.loaded
	f.mu.Unlock()
	if !load {
		return
	}
	f.sleep(f.opts.ModelLoadTime)
	f.mu.Lock()
	f.gpu.loaded = name
	f.gpu.modelLoads++
	if k := len(f.gpu.runs); k > 0 {
		f.gpu.runs[k-1].ModelLoads++
	}
	f.mu.Unlock()
}

// sample runs a KSampler's steps. Each step ends at start + i x StepTime
// (so timer slack does not add up); then, as ComfyUI's progress hook does,
// the interrupt is checked and the step announced: progress_state (with
// Options.ProgressState), then "progress", to the prompt's client or, for
// a prompt without one, to every socket.
func (f *Fake) sample(j *job, n *node, progress *progressState) (stopped bool) {
	steps := 20 // KSampler's default
	var v float64
	if json.Unmarshal(n.inputs["steps"], &v) == nil && v >= 1 {
		steps = int(v)
	}
	start := time.Now()
	for i := 1; i <= steps; i++ {
		f.sleep(time.Until(start.Add(time.Duration(i) * f.opts.StepTime)))
		if f.ctx.Err() != nil {
			return false
		}
		f.mu.Lock()
		stop := f.interrupt
		f.mu.Unlock()
		if stop {
			return true
		}
		f.sendProgressState(j, progress.set(n.id, "running", strconv.Itoa(i), strconv.Itoa(steps)))
		msg := mustJSON(struct {
			Value    int    `json:"value"`
			Max      int    `json:"max"`
			PromptID string `json:"prompt_id"`
			Node     string `json:"node"`
		}{i, steps, j.id, n.id})
		if j.clientID == "" {
			f.broadcast(wsText("progress", msg))
		} else {
			f.sendTarget(j.clientID, "progress", msg)
		}
	}
	return false
}

// Txt2ImgClasses are the node classes of Txt2Img's graph: with them as
// Options.Classes, a fake runs Txt2Img and nothing else of ComfyUI's.
var Txt2ImgClasses = []string{"CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "SaveImage", "VAEDecode"}

// Txt2Img returns the API-format graph (the "prompt" of POST /prompt) of
// the standard txt2img workflow, as testdata/prompt_txt2img.json has it,
// with the given checkpoint and KSampler steps: CheckpointLoaderSimple
// "4", EmptyLatentImage "5", CLIPTextEncode "6" and "7", KSampler "3",
// VAEDecode "8", SaveImage "9".
func Txt2Img(checkpoint string, steps int) map[string]any {
	var body struct {
		Prompt map[string]map[string]any `json:"prompt"`
	}
	if err := json.Unmarshal(samplePromptTxt2Img, &body); err != nil {
		panic(err)
	}
	body.Prompt["4"]["inputs"].(map[string]any)["ckpt_name"] = checkpoint
	body.Prompt["3"]["inputs"].(map[string]any)["steps"] = steps
	out := make(map[string]any, len(body.Prompt))
	for id, n := range body.Prompt {
		out[id] = n
	}
	return out
}
