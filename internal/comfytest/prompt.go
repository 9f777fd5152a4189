package comfytest

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path"
	"slices"
	"strconv"
	"strings"
	"time"
)

// A node is one node of an API-format graph.
type node struct {
	id        string
	classType string
	inputs    map[string]json.RawMessage
}

// job is a queued or running prompt.
type job struct {
	number   json.RawMessage // int, or a float when the client chose it
	id       string
	graph    json.RawMessage // the "prompt" object as sent, compacted
	extra    json.RawMessage // extra_data plus client_id
	outputs  []string        // output node ids, in graph order
	clientID string          // "" when the prompt has none
	nodes    []node          // in graph order
}

// queueItem renders a job the way /queue and /history list it:
// [number, prompt_id, graph, extra_data, outputs_to_execute].
type queueItem []any

func (j *job) item() queueItem {
	return queueItem{j.number, j.id, j.graph, j.extra, j.outputs}
}

type historyEntry struct {
	id   string
	json json.RawMessage
}

// cachedRun remembers the last run for Options.Cache.
type cachedRun struct {
	graph   []byte
	order   []string
	outputs map[string]json.RawMessage
}

// promptError is the 400 body of POST /prompt.
type promptError struct {
	Error      errorInfo `json:"error"`
	NodeErrors any       `json:"node_errors"`
}

type errorInfo struct {
	Type      string         `json:"type"`
	Message   string         `json:"message"`
	Details   string         `json:"details"`
	ExtraInfo map[string]any `json:"extra_info"`
}

type nodeError struct {
	Errors           []nodeErrorItem `json:"errors"`
	DependentOutputs []string        `json:"dependent_outputs"`
	ClassType        string          `json:"class_type"`
}

type nodeErrorItem struct {
	Type      string         `json:"type"`
	Message   string         `json:"message"`
	Details   string         `json:"details"`
	ExtraInfo map[string]any `json:"extra_info"`
}

func (f *Fake) serveGetPrompt(w http.ResponseWriter, r *http.Request, _ []string) {
	writeJSON(w, http.StatusOK, mustJSON(execInfo(f.queueRemaining())))
}

func execInfo(n int) map[string]any {
	return map[string]any{"exec_info": map[string]int{"queue_remaining": n}}
}

func (f *Fake) queueRemaining() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.queueRemainingLocked()
}

func (f *Fake) queueRemainingLocked() int {
	n := len(f.synRunning) + len(f.synPending) + len(f.pending)
	if f.running != nil {
		n++
	}
	return n
}

// servePostPrompt is POST /prompt (server.py post_prompt and
// execution.validate_prompt, as far as the samples show them).
func (f *Fake) servePostPrompt(w http.ResponseWriter, r *http.Request, _ []string) {
	// The body is JSON whatever the Content-Type says.
	raw, err := io.ReadAll(r.Body)
	if err != nil {
		serverError(w)
		return
	}
	var body map[string]json.RawMessage
	if err := json.Unmarshal(raw, &body); err != nil || body == nil {
		serverError(w)
		return
	}

	// The number comes first, as in server.py: a prompt that is then
	// refused, or a body with no prompt at all, still uses one up.
	var number json.RawMessage
	if n, ok := body["number"]; ok {
		var v float64
		if json.Unmarshal(n, &v) != nil {
			serverError(w)
			return
		}
		number = json.RawMessage(pyFloat(v))
	} else {
		f.mu.Lock()
		n := f.number
		f.number++
		f.mu.Unlock()
		if front, ok := body["front"]; ok && truthy(front) {
			n = -n
		}
		number = json.RawMessage(strconv.Itoa(n))
	}

	rawPrompt, ok := body["prompt"]
	if !ok {
		writeJSON(w, http.StatusBadRequest, mustJSON(promptError{
			Error:      errorInfo{"no_prompt", "No prompt provided", "No prompt provided", map[string]any{}},
			NodeErrors: map[string]any{},
		}))
		return
	}
	nodes, err := parseGraph(rawPrompt)
	if err != nil {
		serverError(w)
		return
	}
	extra := json.RawMessage("{}")
	if e, ok := body["extra_data"]; ok {
		extra = compactJSON(e)
		if !bytes.HasPrefix(extra, []byte("{")) {
			serverError(w)
			return
		}
	}
	var clientID string
	if c, ok := body["client_id"]; ok {
		// Only a string can name a socket; null means no client.
		json.Unmarshal(c, &clientID)
		extra = appendField(extra, "client_id", c)
	}

	outputs, perr := validate(nodes, f.nodes, f.inputExists)
	if perr != nil {
		writeJSON(w, http.StatusBadRequest, mustJSON(perr))
		return
	}

	if f.opts.CreateTime {
		extra = appendField(extra, "create_time", mustJSON(time.Now().UnixMilli()))
	}
	j := &job{
		number:   number,
		graph:    compactJSON(rawPrompt),
		extra:    extra,
		outputs:  outputs,
		clientID: clientID,
		nodes:    nodes,
	}
	if p, ok := body["prompt_id"]; ok && f.opts.PromptIDs {
		j.id = pyStr(p) // str(json.get("prompt_id", uuid4())): null is "None"
	} else {
		j.id = uuid4()
	}

	f.emitMu.Lock()
	f.mu.Lock()
	f.pending = append(f.pending, j)
	f.startWorkerLocked()
	remaining := f.queueRemainingLocked()
	f.mu.Unlock()
	f.broadcastStatus(remaining)
	f.emitMu.Unlock()
	f.signalWorker()

	writeJSON(w, http.StatusOK, mustJSON(struct {
		PromptID   string          `json:"prompt_id"`
		Number     json.RawMessage `json:"number"`
		NodeErrors map[string]any  `json:"node_errors"`
	}{j.id, j.number, map[string]any{}}))
}

// parseGraph reads an API-format graph, keeping the order of its nodes.
func parseGraph(raw json.RawMessage) ([]node, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return nil, fmt.Errorf("prompt is not an object")
	}
	var nodes []node
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return nil, err
		}
		var n struct {
			ClassType *string                    `json:"class_type"`
			Inputs    map[string]json.RawMessage `json:"inputs"`
		}
		if err := dec.Decode(&n); err != nil {
			return nil, err
		}
		nd := node{id: t.(string), inputs: n.Inputs}
		if n.ClassType != nil {
			nd.classType = *n.ClassType
		} else {
			nd.classType = "\x00" // missing
		}
		nodes = append(nodes, nd)
	}
	return nodes, nil
}

// validate checks a graph like execution.validate_prompt: every class must
// exist in ns, there must be an output node, and the inputs of the nodes the
// outputs depend on must be within the bounds of their definitions (numbers
// between min and max, combo values among the choices), and a LoadImage
// must name an input file that exists. It returns the output node ids to
// execute.
func validate(nodes []node, ns *nodeSet, inputExists func(string) bool) ([]string, *promptError) {
	byID := map[string]*node{}
	var outputs []string
	for i := range nodes {
		n := &nodes[i]
		byID[n.id] = n
		switch {
		case n.classType == "\x00":
			return nil, &promptError{
				Error:      errorInfo{"invalid_prompt", "Cannot execute because a node is missing the class_type property.", fmt.Sprintf("Node ID '#%s'", n.id), map[string]any{}},
				NodeErrors: []any{},
			}
		case !ns.has(n.classType):
			return nil, &promptError{
				Error:      errorInfo{"invalid_prompt", fmt.Sprintf("Cannot execute because node %s does not exist.", n.classType), fmt.Sprintf("Node ID '#%s'", n.id), map[string]any{}},
				NodeErrors: []any{},
			}
		}
		if outputNodes[n.classType] {
			outputs = append(outputs, n.id)
		}
	}
	if len(outputs) == 0 {
		return nil, &promptError{
			Error:      errorInfo{"prompt_no_outputs", "Prompt has no outputs", "", map[string]any{}},
			NodeErrors: []any{},
		}
	}

	nodeErrors := map[string]*nodeError{}
	var good []string
	for _, o := range outputs {
		ok := true
		for _, id := range dependencies(byID, o) {
			errs := append(ns.checkInputs(byID[id]), checkImage(byID[id], inputExists)...)
			if len(errs) == 0 {
				continue
			}
			ok = false
			ne := nodeErrors[id]
			if ne == nil {
				ne = &nodeError{Errors: errs, DependentOutputs: []string{}, ClassType: byID[id].classType}
				nodeErrors[id] = ne
			}
			ne.DependentOutputs = append(ne.DependentOutputs, o)
		}
		if ok {
			good = append(good, o)
		}
	}
	if len(good) == 0 {
		return nil, &promptError{
			Error:      errorInfo{"prompt_outputs_failed_validation", "Prompt outputs failed validation", "", map[string]any{}},
			NodeErrors: nodeErrors,
		}
	}
	return good, nil
}

// dependencies returns the ids of the nodes that output o needs, o
// included, each one after the nodes it links to.
func dependencies(byID map[string]*node, o string) []string {
	var order []string
	seen := map[string]bool{}
	var visit func(id string)
	visit = func(id string) {
		n, ok := byID[id]
		if !ok || seen[id] {
			return
		}
		seen[id] = true
		keys := make([]string, 0, len(n.inputs))
		for k := range n.inputs {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for _, k := range keys {
			if src, ok := linkSource(n.inputs[k]); ok {
				visit(src)
			}
		}
		order = append(order, id)
	}
	visit(o)
	return order
}

// linkSource returns the source node of an input of the form [id, index].
func linkSource(v json.RawMessage) (string, bool) {
	var link []json.RawMessage
	if json.Unmarshal(v, &link) != nil || len(link) != 2 {
		return "", false
	}
	var id string
	if json.Unmarshal(link[0], &id) != nil {
		return "", false
	}
	return id, true
}

// checkInputs checks the literal inputs of a node that has a detailed
// definition: numbers against their min and max, combo values against the
// choices.
func (ns *nodeSet) checkInputs(n *node) []nodeErrorItem {
	info, ok := ns.info[n.classType]
	if !ok {
		return nil
	}
	var def struct {
		Input struct {
			Required map[string]json.RawMessage `json:"required"`
		} `json:"input"`
		InputOrder struct {
			Required []string `json:"required"`
		} `json:"input_order"`
	}
	if err := json.Unmarshal(info, &def); err != nil {
		panic(err)
	}
	var errs []nodeErrorItem
	for _, name := range def.InputOrder.Required {
		cfgRaw := def.Input.Required[name]
		v, present := n.inputs[name]
		if !present {
			errs = append(errs, nodeErrorItem{"required_input_missing", "Required input is missing", name, map[string]any{"input_name": name}})
			continue
		}
		if _, isLink := linkSource(v); isLink {
			continue
		}
		var cfg []json.RawMessage
		json.Unmarshal(cfgRaw, &cfg)
		var choices []json.RawMessage
		if len(cfg) > 0 && json.Unmarshal(cfg[0], &choices) == nil {
			errs = append(errs, checkChoice(name, v, cfg, choices)...)
			continue
		}
		if len(cfg) < 2 {
			continue
		}
		var typ string
		json.Unmarshal(cfg[0], &typ)
		var opts struct{ Min, Max *json.Number }
		d := json.NewDecoder(bytes.NewReader(cfg[1]))
		d.UseNumber()
		d.Decode(&opts)
		var val float64
		if typ != "INT" && typ != "FLOAT" || json.Unmarshal(v, &val) != nil {
			continue
		}
		format := pyFloat
		if typ == "INT" {
			val = float64(int64(val))
			format = func(x float64) string { return strconv.FormatInt(int64(x), 10) }
		}
		received := json.Number(format(val))
		extra := map[string]any{"input_name": name, "input_config": cfgRaw, "received_value": received}
		if opts.Min != nil {
			if m, _ := opts.Min.Float64(); val < m {
				errs = append(errs, nodeErrorItem{"value_smaller_than_min",
					fmt.Sprintf("Value %s smaller than min of %s", received, opts.Min), name, extra})
				continue
			}
		}
		if opts.Max != nil {
			if m, _ := opts.Max.Float64(); val > m {
				errs = append(errs, nodeErrorItem{"value_bigger_than_max",
					fmt.Sprintf("Value %s bigger than max of %s", received, opts.Max), name, extra})
			}
		}
	}
	return errs
}

// checkImage is LoadImage.VALIDATE_INPUTS (nodes.py): the image must be a
// file in the input folder, or in the folder its " [output]"-style suffix
// names.
func checkImage(n *node, exists func(string) bool) []nodeErrorItem {
	if n.classType != "LoadImage" {
		return nil
	}
	var name string
	if json.Unmarshal(n.inputs["image"], &name) != nil || exists(name) {
		return nil
	}
	return []nodeErrorItem{{"custom_validation_failed", "Custom validation failed for node",
		"image - Invalid image file: " + name, map[string]any{"input_name": "image"}}}
}

// inputExists reports whether an annotated file name ("a.png",
// "sub/a.png", "a.png [output]") names a file the fake holds.
func (f *Fake) inputExists(name string) bool {
	typ := "input"
	for _, t := range []string{"output", "input", "temp"} {
		if n, ok := strings.CutSuffix(name, " ["+t+"]"); ok {
			name, typ = n, t
			break
		}
	}
	dir, base := path.Split(name)
	key := fileKey{typ, cleanSubfolder(dir), base}
	f.mu.Lock()
	defer f.mu.Unlock()
	_, stored := f.files[key]
	_, uploaded := f.uploads[key]
	return stored || uploaded
}

// startWorkerLocked starts the goroutine that executes prompts, once.
func (f *Fake) startWorkerLocked() {
	if f.workerOn || f.closed {
		return
	}
	f.workerOn = true
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		f.work()
	}()
}

func (f *Fake) signalWorker() {
	select {
	case f.wake <- struct{}{}:
	default:
	}
}

// work executes queued prompts one at a time, in queue order.
func (f *Fake) work() {
	for {
		f.emitMu.Lock()
		f.mu.Lock()
		var j *job
		if len(f.pending) > 0 {
			j, f.pending = f.pending[0], f.pending[1:]
			f.running = j
			f.interrupt = false
			f.startRunLocked(j)
		}
		remaining := f.queueRemainingLocked()
		f.mu.Unlock()
		if j != nil {
			f.broadcastStatus(remaining)
		}
		f.emitMu.Unlock()

		if j == nil {
			select {
			case <-f.wake:
				continue
			case <-f.ctx.Done():
				return
			}
		}
		f.execute(j)
		if f.ctx.Err() != nil {
			return
		}
	}
}

// execute runs one prompt and sends the messages of
// testdata/ws_messages_prompt.json.
func (f *Fake) execute(j *job) {
	byID := map[string]*node{}
	for i := range j.nodes {
		byID[j.nodes[i].id] = &j.nodes[i]
	}
	var order []string
	seen := map[string]bool{}
	for _, o := range j.outputs {
		for _, id := range dependencies(byID, o) {
			if !seen[id] {
				seen[id] = true
				order = append(order, id)
			}
		}
	}

	var messages []json.RawMessage // for the history
	record := func(typ string, data any) {
		b := mustJSON(data)
		messages = append(messages, mustJSON([]any{typ, json.RawMessage(b)}))
		f.sendTarget(j.clientID, typ, b)
	}
	record("execution_start", map[string]any{"prompt_id": j.id, "timestamp": time.Now().UnixMilli()})

	f.mu.Lock()
	var cached *cachedRun
	if f.opts.Cache && f.lastRun != nil && bytes.Equal(f.lastRun.graph, j.graph) && slices.Equal(f.lastRun.order, order) {
		cached = f.lastRun
	}
	delay := f.nodeDelay
	f.mu.Unlock()

	cachedNodes := []string{}
	if cached != nil {
		cachedNodes = order
	}
	record("execution_cached", struct {
		Nodes     []string `json:"nodes"`
		PromptID  string   `json:"prompt_id"`
		Timestamp int64    `json:"timestamp"`
	}{cachedNodes, j.id, time.Now().UnixMilli()})

	outputs := map[string]json.RawMessage{}
	var executed []string
	interrupted := false
	progress := &progressState{}
	for _, id := range order {
		n := byID[id]
		if cached == nil {
			// The interrupt flag is read before "executing" goes out, so an
			// interrupt a client sends on seeing it lands at the next node,
			// whatever the scheduler does. The message order stays ComfyUI's
			// (executing N, then execution_interrupted N).
			f.mu.Lock()
			stop := f.interrupt
			f.mu.Unlock()
			f.sendProgressState(j, progress.set(id, "running", "0.0", "1.0"))
			f.sendTarget(j.clientID, "executing", mustJSON(struct {
				Node        string `json:"node"`
				DisplayNode string `json:"display_node"`
				PromptID    string `json:"prompt_id"`
			}{id, id, j.id}))
			f.setCurrentNode(id)
			if stop || f.runNode(j, n, delay, progress) {
				interrupted = true
				f.sendInterrupted(j, id, n.classType, executed, &messages)
				break
			}
		}
		if outputNodes[n.classType] {
			var out json.RawMessage
			if cached != nil {
				out = cached.outputs[id]
			} else {
				f.sendPreviews(j, id)
				out = f.writeOutput(n)
			}
			outputs[id] = out
			f.sendTarget(j.clientID, "executed", mustJSON(struct {
				Node        string          `json:"node"`
				DisplayNode string          `json:"display_node"`
				Output      json.RawMessage `json:"output"`
				PromptID    string          `json:"prompt_id"`
			}{id, id, out, j.id}))
		}
		switch {
		case cached == nil:
			f.sendProgressState(j, progress.finish(id))
		case outputNodes[n.classType]:
			// A cached output node: only it is listed, with integers.
			f.sendProgressState(j, progress.set(id, "finished", "1", "1"))
		}
		executed = append(executed, id)
	}
	if !interrupted {
		record("execution_success", map[string]any{"prompt_id": j.id, "timestamp": time.Now().UnixMilli()})
	}

	// task_done: write the history, then announce the shorter queue.
	entry := f.historyEntry(j, order, outputs, messages, interrupted)
	f.emitMu.Lock()
	f.mu.Lock()
	f.running = nil
	f.currentNode = ""
	f.endRunLocked(!interrupted && f.ctx.Err() == nil)
	f.history = append(f.history, historyEntry{j.id, entry})
	if len(f.history) > maxHistory {
		f.history = f.history[1:]
	}
	if !interrupted {
		f.lastRun = &cachedRun{graph: j.graph, order: order, outputs: outputs}
	}
	remaining := f.queueRemainingLocked()
	f.mu.Unlock()
	f.broadcastStatus(remaining)
	f.emitMu.Unlock()
	if j.clientID != "" {
		f.sendTarget(j.clientID, "executing", mustJSON(struct {
			Node     *string `json:"node"`
			PromptID string  `json:"prompt_id"`
		}{nil, j.id}))
	}
}

const maxHistory = 10000

// progressState holds the node states that 0.8.0's progress_state messages
// list: every node that has started, in the order it started (pending nodes
// are left out).
type progressState struct {
	ids    []string
	states map[string][3]string // state, value, max (JSON numbers as Python prints them)
}

// finish marks a node finished with its value at its max, as
// ProgressRegistry.finish_progress does.
func (p *progressState) finish(id string) *progressState {
	max := p.states[id][2]
	return p.set(id, "finished", max, max)
}

func (p *progressState) set(id, state, value, max string) *progressState {
	if p.states == nil {
		p.states = map[string][3]string{}
	}
	if _, ok := p.states[id]; !ok {
		p.ids = append(p.ids, id)
	}
	p.states[id] = [3]string{state, value, max}
	return p
}

// sendProgressState sends a progress_state message (Options.ProgressState)
// to the prompt's client, or to every socket when it has none, as 0.8.0's
// WebUIProgressHandler does.
func (f *Fake) sendProgressState(j *job, p *progressState) {
	if !f.opts.ProgressState {
		return
	}
	pid := mustJSON(j.id)
	var b bytes.Buffer
	b.WriteString(`{"prompt_id":`)
	b.Write(pid)
	b.WriteString(`,"nodes":{`)
	for i, id := range p.ids {
		st := p.states[id]
		nid := mustJSON(id)
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `%s:{"value":%s,"max":%s,"state":%s,"node_id":%s,"prompt_id":%s,"display_node_id":%s,"parent_node_id":null,"real_node_id":%s}`,
			nid, st[1], st[2], mustJSON(st[0]), nid, pid, nid, nid)
	}
	b.WriteString(`}}`)
	if j.clientID == "" {
		f.broadcast(wsText("progress_state", b.Bytes()))
		return
	}
	f.sendTarget(j.clientID, "progress_state", b.Bytes())
}

func (f *Fake) setCurrentNode(id string) {
	f.mu.Lock()
	f.currentNode = id
	f.mu.Unlock()
}

func (f *Fake) sleep(d time.Duration) {
	if d <= 0 {
		return
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-f.ctx.Done():
	}
}

// sendInterrupted sends execution_interrupted, which ComfyUI broadcasts
// when the prompt has no client_id.
func (f *Fake) sendInterrupted(j *job, id, classType string, executed []string, messages *[]json.RawMessage) {
	if executed == nil {
		executed = []string{}
	}
	b := mustJSON(struct {
		PromptID  string   `json:"prompt_id"`
		NodeID    string   `json:"node_id"`
		NodeType  string   `json:"node_type"`
		Executed  []string `json:"executed"`
		Timestamp int64    `json:"timestamp"`
	}{j.id, id, classType, executed, time.Now().UnixMilli()})
	*messages = append(*messages, mustJSON([]any{"execution_interrupted", json.RawMessage(b)}))
	if j.clientID == "" {
		f.broadcast(wsText("execution_interrupted", b))
		return
	}
	f.sendTarget(j.clientID, "execution_interrupted", b)
}

// writeOutput "saves" the sample PNG for an output node and returns its UI
// output, {"images":[{filename, subfolder, type}]}.
func (f *Fake) writeOutput(n *node) json.RawMessage {
	typ, sub, prefix := "output", "", "ComfyUI"
	if n.classType == "PreviewImage" {
		typ = "temp"
		f.mu.Lock()
		prefix = f.tempPrefix
		f.mu.Unlock()
	} else if p, ok := n.inputs["filename_prefix"]; ok {
		var s string
		if json.Unmarshal(p, &s) == nil && s != "" {
			prefix = s
		}
	}
	if dir, base := path.Split(prefix); dir != "" {
		sub, prefix = cleanSubfolder(dir), base
	}
	f.mu.Lock()
	key := typ + "/" + sub + "/" + prefix
	f.counters[key]++
	name := fmt.Sprintf("%s_%05d_.png", prefix, f.counters[key])
	f.files[fileKey{typ, sub, name}] = &file{content: bytes.NewReader(samplePNG), size: int64(len(samplePNG)), modTime: time.Now()}
	f.mu.Unlock()
	type image struct {
		Filename  string `json:"filename"`
		Subfolder string `json:"subfolder"`
		Type      string `json:"type"`
	}
	return mustJSON(map[string][]image{"images": {{name, sub, typ}}})
}

func (f *Fake) historyEntry(j *job, order []string, outputs map[string]json.RawMessage, messages []json.RawMessage, interrupted bool) json.RawMessage {
	type meta struct {
		NodeID      string  `json:"node_id"`
		DisplayNode string  `json:"display_node"`
		ParentNode  *string `json:"parent_node"`
		RealNodeID  string  `json:"real_node_id"`
	}
	metas := map[string]meta{}
	for id := range outputs {
		metas[id] = meta{id, id, nil, id}
	}
	status := "success"
	if interrupted {
		status = "error"
	}
	if messages == nil {
		messages = []json.RawMessage{}
	}
	return mustJSON(struct {
		Prompt  queueItem                  `json:"prompt"`
		Outputs map[string]json.RawMessage `json:"outputs"`
		Status  any                        `json:"status"`
		Meta    map[string]meta            `json:"meta"`
	}{
		Prompt:  j.item(),
		Outputs: outputs,
		Status: struct {
			StatusStr string            `json:"status_str"`
			Completed bool              `json:"completed"`
			Messages  []json.RawMessage `json:"messages"`
		}{status, !interrupted, messages},
		Meta: metas,
	})
}

func (f *Fake) serveHistory(w http.ResponseWriter, r *http.Request, _ []string) {
	q := r.URL.Query()
	maxItems, offset := -1, -1
	if q.Has("max_items") {
		n, err := strconv.Atoi(q.Get("max_items"))
		if err != nil {
			serverError(w)
			return
		}
		maxItems = n
	}
	if q.Has("offset") {
		n, err := strconv.Atoi(q.Get("offset"))
		if err != nil {
			serverError(w)
			return
		}
		offset = n
	}
	f.mu.Lock()
	hist := slices.Clone(f.history)
	f.mu.Unlock()

	// PromptQueue.get_history: without an offset, max_items means the most
	// recent ones; the result keeps insertion order, oldest first.
	if offset < 0 && maxItems >= 0 {
		offset = len(hist) - maxItems
	}
	var b bytes.Buffer
	b.WriteByte('{')
	count := 0
	for i, h := range hist {
		if i < offset {
			continue
		}
		if maxItems >= 0 && count >= maxItems {
			break
		}
		if count > 0 {
			b.WriteByte(',')
		}
		b.Write(mustJSON(h.id))
		b.WriteByte(':')
		b.Write(h.json)
		count++
	}
	b.WriteByte('}')
	writeJSON(w, http.StatusOK, b.Bytes())
}

func (f *Fake) serveHistoryItem(w http.ResponseWriter, r *http.Request, args []string) {
	f.mu.Lock()
	var entry json.RawMessage
	for _, h := range f.history {
		if h.id == args[0] {
			entry = h.json
		}
	}
	f.mu.Unlock()
	if entry == nil {
		writeJSON(w, http.StatusOK, []byte("{}"))
		return
	}
	writeJSON(w, http.StatusOK, []byte("{"+string(mustJSON(args[0]))+":"+string(entry)+"}"))
}

// clearDelete is the body of POST /queue and POST /history.
type clearDelete struct {
	Clear  bool     `json:"clear"`
	Delete []string `json:"delete"`
}

// readClearDelete decodes it, answering 500 (aiohttp's answer to bad JSON)
// when it cannot.
func readClearDelete(w http.ResponseWriter, r *http.Request) (clearDelete, bool) {
	var body clearDelete
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
		serverError(w)
		return body, false
	}
	return body, true
}

func (f *Fake) servePostHistory(w http.ResponseWriter, r *http.Request, _ []string) {
	body, ok := readClearDelete(w, r)
	if !ok {
		return
	}
	f.mu.Lock()
	if body.Clear {
		f.history = nil
	}
	f.history = slices.DeleteFunc(f.history, func(h historyEntry) bool { return slices.Contains(body.Delete, h.id) })
	f.mu.Unlock()
	writeEmpty(w, http.StatusOK)
}

func (f *Fake) serveQueue(w http.ResponseWriter, r *http.Request, _ []string) {
	f.mu.Lock()
	running := slices.Clone(f.synRunning)
	if f.running != nil {
		running = append(running, f.running.item())
	}
	pending := slices.Clone(f.synPending)
	for _, j := range f.pending {
		pending = append(pending, j.item())
	}
	f.mu.Unlock()
	if running == nil {
		running = []queueItem{}
	}
	if pending == nil {
		pending = []queueItem{}
	}
	writeJSON(w, http.StatusOK, mustJSON(struct {
		Running []queueItem `json:"queue_running"`
		Pending []queueItem `json:"queue_pending"`
	}{running, pending}))
}

// servePostQueue is POST /queue: {"clear": true} drops the pending items,
// {"delete": [ids]} the pending items with those ids. Running items stay.
func (f *Fake) servePostQueue(w http.ResponseWriter, r *http.Request, _ []string) {
	body, ok := readClearDelete(w, r)
	if !ok {
		return
	}
	f.emitMu.Lock()
	defer f.emitMu.Unlock()
	if body.Clear {
		f.mu.Lock()
		f.synPending, f.pending = nil, nil
		n := f.queueRemainingLocked()
		f.mu.Unlock()
		f.broadcastStatus(n)
	}
	for _, id := range body.Delete {
		// PromptQueue.delete_queue_item: removing the last pending item
		// goes through wipe_queue, which broadcasts too.
		f.mu.Lock()
		before := len(f.synPending) + len(f.pending)
		f.synPending = slices.DeleteFunc(f.synPending, func(q queueItem) bool { return q[1] == id })
		f.pending = slices.DeleteFunc(f.pending, func(j *job) bool { return j.id == id })
		after := len(f.synPending) + len(f.pending)
		n := f.queueRemainingLocked()
		f.mu.Unlock()
		if before == after {
			continue
		}
		if before == 1 {
			f.broadcastStatus(n)
		}
		f.broadcastStatus(n)
	}
	writeEmpty(w, http.StatusOK)
}

// serveInterrupt is POST /interrupt. It stops whatever runs; with
// Options.PromptIDs, a body {"prompt_id": id} stops only that prompt. The
// running prompt notices at the start of its next node, as ComfyUI's does.
func (f *Fake) serveInterrupt(w http.ResponseWriter, r *http.Request, _ []string) {
	var body struct {
		PromptID *string `json:"prompt_id"`
	}
	if f.opts.PromptIDs {
		json.NewDecoder(r.Body).Decode(&body)
	}
	f.mu.Lock()
	if f.running != nil && (body.PromptID == nil || *body.PromptID == "" || *body.PromptID == f.running.id) {
		f.interrupt = true
	}
	f.mu.Unlock()
	writeEmpty(w, http.StatusOK)
}

// SetQueue makes the fake report running plus pending made-up prompts, shaped
// like testdata/queue_busy.json, in /queue, GET /prompt and the WebSocket
// status messages, on top of any real prompt. The made-up prompts never run
// and nothing is broadcast when they change; POST /queue can delete the
// pending ones.
func (f *Fake) SetQueue(running, pending int) {
	items := func(n int) []queueItem {
		var items []queueItem
		for range n {
			items = append(items, queueItem{json.RawMessage("-1"), uuid4(), slowGraph,
				json.RawMessage(`{"client_id":"comfytest-queue"}`), []string{"4"}})
		}
		return items
	}
	r, p := items(running), items(pending)
	f.mu.Lock()
	defer f.mu.Unlock()
	f.synRunning, f.synPending = r, p
}

// appendField adds "key": value at the end of a JSON object.
func appendField(obj json.RawMessage, key string, value json.RawMessage) json.RawMessage {
	var b bytes.Buffer
	b.Write(obj[:len(obj)-1])
	if !bytes.Equal(bytes.TrimSpace(obj), []byte("{}")) {
		b.WriteByte(',')
	}
	b.Write(mustJSON(key))
	b.WriteByte(':')
	b.Write(compactJSON(value))
	b.WriteByte('}')
	return b.Bytes()
}

// pyStr renders a JSON value the way Python's str() renders the decoded
// value, for ids that clients send as numbers.
func pyStr(v json.RawMessage) string {
	var s string
	if strings.TrimSpace(string(v)) != "null" && json.Unmarshal(v, &s) == nil {
		return s
	}
	switch t := strings.TrimSpace(string(v)); t {
	case "true":
		return "True"
	case "false":
		return "False"
	case "null":
		return "None"
	default:
		return t
	}
}

// pyFloat formats a float the way Python's repr does for common values.
func pyFloat(v float64) string {
	s := strconv.FormatFloat(v, 'g', -1, 64)
	if !strings.ContainsAny(s, ".eEn") {
		s += ".0"
	}
	return s
}

func truthy(v json.RawMessage) bool {
	switch strings.TrimSpace(string(v)) {
	case "false", "null", "0", `""`, "[]", "{}", "0.0":
		return false
	}
	return true
}

func uuid4() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

func randomLetters(n int) string {
	const letters = "abcdefghijklmnopqrstupvxyz" // sic, as in nodes.py
	b := make([]byte, n)
	rand.Read(b)
	for i := range b {
		b[i] = letters[int(b[i])%len(letters)]
	}
	return string(b)
}
