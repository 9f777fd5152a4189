package fleet

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/comfygate/comfygate/internal/hub"
	"github.com/comfygate/comfygate/internal/jsonerr"
	"github.com/comfygate/comfygate/internal/reqscope"
	"github.com/comfygate/comfygate/internal/upstream"
)

// graphNode is one node of an API-format prompt.
type graphNode struct {
	ClassType string                     `json:"class_type"`
	Inputs    map[string]json.RawMessage `json:"inputs"`
}

// modelExts are the file extensions of model files: a combo value with one
// of them is a model the prompt loads (checkpoint, LoRA, VAE...).
var modelExts = []string{".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft", ".onnx"}

// models returns the model files graph loads, sorted.
func models(graph map[string]graphNode) []string {
	var out []string
	for _, n := range graph {
		for _, v := range n.Inputs {
			var s string
			if json.Unmarshal(v, &s) != nil {
				continue
			}
			low := strings.ToLower(s)
			for _, ext := range modelExts {
				if strings.HasSuffix(low, ext) && !slices.Contains(out, s) {
					out = append(out, s)
				}
			}
		}
	}
	sort.Strings(out)
	return out
}

// missing is what one server lacks to run a prompt.
type missing struct {
	classes []string          // class_types it does not have (by node id order)
	nodes   map[string]string // node id → class_type it lacks
	values  map[string][]valueMiss
	// nowhere are the classes no known server has (set by choose).
	nowhere []string
}

type valueMiss struct {
	input string
	value string
	class string
}

func (x *missing) none() bool { return len(x.classes) == 0 && len(x.values) == 0 }

// further reports whether x is further from runnable than y: a missing
// node class counts more than any number of missing values.
func (x *missing) further(y *missing) bool {
	if len(x.classes) != len(y.classes) {
		return len(x.classes) > len(y.classes)
	}
	return x.count() > y.count()
}

func (x *missing) count() int {
	n := len(x.classes)
	for _, v := range x.values {
		n += len(v)
	}
	return n
}

// lacks returns what m lacks to run graph; nil when its capabilities are
// not known yet.
func (m *member) lacks(graph map[string]graphNode) *missing {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.caps == nil {
		return nil
	}
	x := &missing{nodes: map[string]string{}, values: map[string][]valueMiss{}}
	ids := make([]string, 0, len(graph))
	for id := range graph {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		n := graph[id]
		combos, ok := m.caps.classes[n.ClassType]
		if !ok {
			if !slices.Contains(x.classes, n.ClassType) {
				x.classes = append(x.classes, n.ClassType)
			}
			x.nodes[id] = n.ClassType
			continue
		}
		names := make([]string, 0, len(n.Inputs))
		for name := range n.Inputs {
			names = append(names, name)
		}
		sort.Strings(names)
		for _, name := range names {
			choices, isCombo := combos[name]
			if !isCombo {
				continue
			}
			var s string
			if json.Unmarshal(n.Inputs[name], &s) != nil {
				continue // a link to another node's output, or not a string
			}
			if choices[s] || m.uploads[s] || m.uploads[strings.TrimSuffix(s, " [input]")] {
				continue
			}
			x.values[id] = append(x.values[id], valueMiss{name, s, n.ClassType})
		}
	}
	return x
}

// placement is a server chosen for a prompt.
type placement struct {
	m     *member
	known bool // its capabilities are known (else: a last resort)
	idle  bool
	warm  bool // its last prompt used the same model files
	queue int
	order int
}

// choose orders the servers that can run graph, best first: an idle one
// (with the prompt's models loaded first), then the shortest queue,
// counting a server with the prompt's models loaded as one prompt
// shorter. It
// returns what the closest server lacks when none can run it.
func (f *Fleet) choose(graph map[string]graphNode, mods []string, except string) ([]*member, *missing) {
	var (
		cands   []placement
		closest *missing
		lacking = map[string]int{} // class → known servers without it
		known   int
	)
	for i, m := range f.all() {
		if !m.usable() || m.u.Name == except {
			continue
		}
		x := m.lacks(graph)
		if x != nil {
			known++
			for _, c := range x.classes {
				lacking[c]++
			}
		}
		if x != nil && !x.none() {
			if closest == nil || closest.further(x) {
				closest = x
			}
			continue
		}
		q := m.queueLen()
		m.mu.Lock()
		warm := len(mods) > 0 && slices.Equal(m.lastModels, mods)
		m.mu.Unlock()
		cands = append(cands, placement{m: m, known: x != nil, idle: q == 0, warm: warm, queue: q, order: i})
	}
	sort.SliceStable(cands, func(i, j int) bool {
		a, b := cands[i], cands[j]
		if a.known != b.known {
			// A server whose node list is not read yet (it just joined)
			// may take a prompt only when no known one can: it checks
			// the prompt itself.
			return a.known
		}
		if a.idle != b.idle {
			return a.idle
		}
		// Among busy servers a warm one is worth one queued prompt (the
		// model load it saves), not more: a popular model must not pile
		// up on one server while others wait.
		qa, qb := a.queue, b.queue
		if !a.warm {
			qa++
		}
		if !b.warm {
			qb++
		}
		if qa != qb {
			return qa < qb
		}
		if a.warm != b.warm {
			return a.warm
		}
		return a.order < b.order
	})
	out := make([]*member, len(cands))
	for i, c := range cands {
		out[i] = c.m
	}
	if closest != nil {
		for _, c := range closest.classes {
			if lacking[c] == known {
				closest.nowhere = append(closest.nowhere, c)
			}
		}
	}
	return out, closest
}

// dispatch is POST /prompt: choose a server, queue the prompt there under
// the id the client will see, and remember where it went.
func (f *Fleet) dispatch(w http.ResponseWriter, r *http.Request) {
	raw, err := f.readBody(w, r)
	if err != nil {
		f.proxy.Fail(w, r, "", err)
		return
	}
	var body map[string]json.RawMessage
	var graph map[string]graphNode
	if json.Unmarshal(raw, &body) != nil || body == nil || json.Unmarshal(body["prompt"], &graph) != nil || graph == nil {
		// Not a prompt the fleet can read: the first server answers it
		// with ComfyUI's own error.
		f.passOn(w, r, raw)
		return
	}
	if name, theirs := f.othersFile(r.Context(), f.viewerOf(r), graph); theirs {
		reqscope.From(r.Context()).AuthFailure = "isolation"
		writeJSON(w, http.StatusForbidden, comfyError("forbidden",
			fmt.Sprintf("this prompt loads %q, which this key did not upload (with --isolation keys a prompt may load only its own key's uploads)", name), "", nil))
		return
	}
	id, err := promptID(body)
	if err != nil {
		writeJSON(w, http.StatusBadRequest, comfyError("invalid_prompt_id", err.Error(), "", nil))
		return
	}
	_, known, err := f.store.Get(r.Context(), id)
	if err != nil {
		// Without its records the fleet could not find the prompt again
		// (its id, its socket messages, failover): queue nothing.
		f.log.Error("fleet: the prompt records cannot be read; refusing the prompt", "err", err)
		jsonerr.SetRetryAfter(w.Header(), 5*time.Second)
		jsonerr.Write(w, http.StatusServiceUnavailable, "state_store_unavailable",
			"the gateway cannot reach its shared state (Redis); the prompt was not queued, try again shortly")
		return
	}
	if known {
		writeJSON(w, http.StatusBadRequest, comfyError("invalid_prompt_id", "prompt_id "+id+" is already used", "", nil))
		return
	}
	var clientID string
	json.Unmarshal(body["client_id"], &clientID)
	body["prompt_id"], _ = json.Marshal(id)
	if f.opts.ClientID != "" {
		body["client_id"], _ = json.Marshal(f.opts.ClientID)
	}
	sendBody, err := json.Marshal(body)
	if err != nil {
		f.passOn(w, r, raw)
		return
	}
	mods := models(graph)
	p := Prompt{
		ID: id, ClientID: clientID, Owner: owner(r), Body: sendBody, Models: mods,
		Created: time.Now(),
	}
	// Choosing and counting the prompt on the chosen server are one step:
	// prompts posted at the same moment do not all see the same server
	// idle.
	f.chooseMu.Lock()
	ms, closest := f.choose(graph, mods, "")
	if len(ms) > 0 {
		ms[0].reserve(mods)
	}
	f.chooseMu.Unlock()
	if len(ms) == 0 {
		if closest != nil {
			writeJSON(w, http.StatusBadRequest, cannotRun(closest))
			return
		}
		f.proxy.Fail(w, r, "", upstream.ErrNoUpstream)
		return
	}
	for i, m := range ms {
		if i > 0 {
			m.reserve(mods)
		}
		a := f.send(r.Context(), r, m, http.MethodPost, "/api/prompt", sendBody)
		if a.err != nil {
			m.unreserve()
			if upstream.IsDialError(a.err) {
				continue // nothing was sent: the next server may take it
			}
			f.proxy.Fail(w, r, m.u.Name, a.err)
			return
		}
		reqscope.From(r.Context()).Upstream = m.u.Name
		if a.status != http.StatusOK {
			m.unreserve()
			relay(w, a) // ComfyUI's own verdict: node_errors and all
			return
		}
		var res map[string]json.RawMessage
		var sid string
		if json.Unmarshal(a.body, &res) != nil || json.Unmarshal(res["prompt_id"], &sid) != nil || sid == "" {
			m.unreserve()
			relay(w, a)
			return
		}
		m.placed()
		p.Server, p.ServerID, p.Placed = m.u.Name, sid, time.Now()
		if err := f.store.Put(r.Context(), p); err != nil {
			f.log.Error("fleet: cannot record a prompt; it runs, but its id may not be found", "prompt_id", id, "err", err)
		}
		f.recorded(m)
		if f.opts.Events.Dispatched != nil {
			f.opts.Events.Dispatched(m.u.Name)
		}
		res["prompt_id"], _ = json.Marshal(id)
		writeJSON(w, http.StatusOK, res)
		return
	}
	f.proxy.Fail(w, r, "", upstream.ErrNoUpstream)
}

// recorded tells the hub a prompt was recorded on m.
func (f *Fleet) recorded(m *member) {
	if f.opts.Hub != nil {
		f.opts.Hub.Placed(m.u.Name)
	}
}

// passOn sends a body the fleet could not read to the first healthy
// server, whose answer goes back unchanged.
func (f *Fleet) passOn(w http.ResponseWriter, r *http.Request, raw []byte) {
	hs := f.healthy()
	if len(hs) == 0 {
		f.proxy.Fail(w, r, "", upstream.ErrNoUpstream)
		return
	}
	a := f.send(r.Context(), r, hs[0], r.Method, "/api/prompt", raw)
	if a.err != nil {
		f.proxy.Fail(w, r, hs[0].u.Name, a.err)
		return
	}
	relay(w, a)
}

// resubmit queues p again, on the best other server that can run it. why
// is logged.
func (f *Fleet) resubmit(ctx context.Context, p Prompt, why string) bool {
	return f.move(ctx, p, p.Server, why, f.opts.Events.Resubmitted)
}

// move queues p on the best server other than except, keeps its old place
// as stale, and tells event.
func (f *Fleet) move(ctx context.Context, p Prompt, except, why string, event func(from, to string)) bool {
	var body map[string]json.RawMessage
	var graph map[string]graphNode
	if p.Body == nil || json.Unmarshal(p.Body, &body) != nil || json.Unmarshal(body["prompt"], &graph) != nil {
		return false
	}
	if f.opts.ClientID != "" {
		// The prompt may have been queued through another replica: its
		// messages now come to this one's hub.
		body["client_id"], _ = json.Marshal(f.opts.ClientID)
		if b, err := json.Marshal(body); err == nil {
			p.Body = b
		}
	}
	ms, _ := f.choose(graph, p.Models, except)
	// A server that may still hold an old copy goes last; if it is chosen,
	// the old copy is deleted first (on servers that take the client's id,
	// both copies would have the same id).
	stale := func(m *member) (string, bool) {
		for _, st := range p.Stale {
			if st.Server == m.u.Name {
				return st.ServerID, true
			}
		}
		return "", false
	}
	sort.SliceStable(ms, func(i, j int) bool {
		_, si := stale(ms[i])
		_, sj := stale(ms[j])
		return !si && sj
	})
	for _, m := range ms {
		if sid, ok := stale(m); ok {
			del, _ := json.Marshal(map[string]any{"delete": []string{sid}})
			f.send(ctx, nil, m, http.MethodPost, "/api/queue", del)
			p.Stale = slices.DeleteFunc(p.Stale, func(pl Placement) bool { return pl.Server == m.u.Name })
		}
		m.reserve(p.Models)
		a := f.send(ctx, nil, m, http.MethodPost, "/api/prompt", p.Body)
		var res struct {
			PromptID string `json:"prompt_id"`
		}
		if a.err != nil || a.status != http.StatusOK || json.Unmarshal(a.body, &res) != nil || res.PromptID == "" {
			m.unreserve()
			continue
		}
		m.placed()
		from := p.Server
		p.Stale = append(p.Stale, Placement{p.Server, p.ServerID})
		p.Server, p.ServerID, p.Placed = m.u.Name, res.PromptID, time.Now()
		p.Moves++
		f.store.Put(ctx, p)
		f.recorded(m)
		f.log.Warn("fleet: prompt queued again on another server", "prompt_id", p.ID, "from", from, "to", m.u.Name, "why", why)
		if event != nil {
			event(from, m.u.Name)
		}
		return true
	}
	f.log.Warn("fleet: no server can take a prompt that must be queued again; will retry", "prompt_id", p.ID, "from", p.Server, "why", why)
	return false
}

// promptID is the id the client sees: its own prompt_id, else a new UUID.
func promptID(body map[string]json.RawMessage) (string, error) {
	if v, ok := body["prompt_id"]; ok && !bytes.Equal(v, []byte("null")) {
		var s string
		if json.Unmarshal(v, &s) != nil || s == "" {
			return "", fmt.Errorf("prompt_id must be a string")
		}
		return s, nil
	}
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:]), nil
}

// owner identifies the key that made r ("" without one).
func owner(r *http.Request) string { return hub.Owner(reqscope.From(r.Context()).KeyID) }

// comfyError is ComfyUI's error document for POST /prompt.
func comfyError(typ, message, details string, nodeErrors any) map[string]any {
	if nodeErrors == nil {
		nodeErrors = map[string]any{}
	}
	return map[string]any{
		"error":       map[string]any{"type": typ, "message": message, "details": details, "extra_info": map[string]any{}},
		"node_errors": nodeErrors,
	}
}

// cannotRun is the 400 for a prompt no server can run, in ComfyUI's shape
// so that the web UI shows it: a missing node class as ComfyUI reports
// one, else the inputs whose values (model files above all) no server
// has, as value_not_in_list node errors.
func cannotRun(x *missing) map[string]any {
	if len(x.classes) > 0 {
		ids := make([]string, 0, len(x.nodes))
		for id := range x.nodes {
			ids = append(ids, id)
		}
		sort.Strings(ids)
		msg := fmt.Sprintf("Cannot execute because node %s does not exist on any ComfyUI server of this gateway.", strings.Join(x.nowhere, ", "))
		if len(x.nowhere) == 0 {
			msg = fmt.Sprintf("Cannot execute because no ComfyUI server of this gateway has every node and model of this prompt: node %s is only on servers that lack others.", strings.Join(x.classes, ", "))
		}
		return comfyError("invalid_prompt", msg, fmt.Sprintf("Node ID '#%s'", ids[0]), nil)
	}
	nodeErrors := map[string]any{}
	for id, misses := range x.values {
		var errs []any
		class := misses[0].class
		for _, v := range misses {
			errs = append(errs, map[string]any{
				"type":    "value_not_in_list",
				"message": "Value not in list",
				"details": fmt.Sprintf("%s: '%s' is on no ComfyUI server of this gateway that has the prompt's other nodes and models", v.input, v.value),
				"extra_info": map[string]any{
					"input_name": v.input, "input_config": nil, "received_value": v.value,
				},
			})
		}
		nodeErrors[id] = map[string]any{"errors": errs, "dependent_outputs": []string{}, "class_type": class}
	}
	return comfyError("prompt_outputs_failed_validation", "Prompt outputs failed validation", "", nodeErrors)
}
