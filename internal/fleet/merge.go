package fleet

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/comfygate/comfygate/internal/jsonerr"
	"github.com/comfygate/comfygate/internal/route"
)

// merge answers a read of fleet-wide state (route policy merge) from every
// healthy server's answer, as one ComfyUI would give it.
func (f *Fleet) merge(w http.ResponseWriter, r *http.Request, e route.Entry) {
	hs := f.healthy()
	if len(hs) == 0 {
		f.proxy.Fail(w, r, "", errNoServer)
		return
	}
	target := r.URL.EscapedPath()
	if strings.HasPrefix(e.Label, "/history") || e.Label == "/jobs" {
		target = apiPath(r.URL.EscapedPath()) // the query is the fleet's to apply
	} else if r.URL.RawQuery != "" {
		target += "?" + r.URL.RawQuery
	}
	var q url.Values
	if e.Label == "/jobs" {
		q = r.URL.Query()
		target += "?" + jobsQuery(q, f.opts.Isolation)
	}
	as := f.sendAll(r.Context(), r, hs, http.MethodGet, target, nil)
	var ok []answer
	for _, a := range as {
		if a.err == nil && a.status == http.StatusOK {
			ok = append(ok, a)
		}
	}
	if len(ok) == 0 {
		for _, a := range as {
			if a.err == nil {
				relay(w, a) // every server refused: its own words
				return
			}
		}
		server, err := firstError(as)
		f.proxy.Fail(w, r, server, err)
		return
	}
	ctx := r.Context()
	v := f.viewerOf(r)
	var (
		out []byte
		err error
	)
	switch e.Label {
	case "/queue":
		out, err = f.mergeQueue(ctx, v, ok)
	case "/prompt":
		out, err = mergePrompt(ok)
	case "/history":
		out, err = f.mergeHistory(ctx, v, ok, r.URL.Query())
	case "/jobs":
		out, err = f.mergeJobs(ctx, v, ok, q)
	case "/object_info":
		out, err = mergeObjectInfo(ok)
	case "/system_stats":
		out, err = mergeSystemStats(ok)
	default:
		relay(w, ok[0])
		return
	}
	if err != nil {
		if errors, isQuery := err.(queryError); isQuery {
			jsonerr.Write(w, http.StatusBadRequest, "bad_request", string(errors))
			return
		}
		f.log.Warn("fleet: cannot merge the servers' answers", "path", r.URL.Path, "err", err)
		relay(w, ok[0])
		return
	}
	writeRaw(w, http.StatusOK, out)
}

// apiPath is p under /api, as every server mirrors it.
func apiPath(p string) string {
	if strings.HasPrefix(p, "/api/") {
		return p
	}
	return "/api" + p
}

type queryError string

func (e queryError) Error() string { return string(e) }

// idMap turns a server's prompt id into the one clients see, and fills in
// the record's client_id.
func (f *Fleet) idMap(ctx context.Context, server, sid string) (string, *Prompt) {
	p, ok, err := f.store.ByServerID(ctx, server, sid)
	if err != nil || !ok {
		return sid, nil
	}
	return p.ID, &p
}

// decode reads JSON keeping numbers as written.
func decode(b []byte, v any) error {
	d := json.NewDecoder(bytes.NewReader(b))
	d.UseNumber()
	return d.Decode(v)
}

// mapItem rewrites one queue item or history "prompt" array of server:
// [number, prompt_id, graph, extra_data, outputs...].
func (f *Fleet) mapItem(ctx context.Context, server string, item []any) []any {
	if len(item) < 2 {
		return item
	}
	sid, _ := item[1].(string)
	id, p := f.idMap(ctx, server, sid)
	item[1] = id
	if p != nil && len(item) > 3 {
		if extra, ok := item[3].(map[string]any); ok {
			if _, has := extra["client_id"]; has {
				extra["client_id"] = p.ClientID
			}
		}
	}
	return item
}

func (f *Fleet) mergeQueue(ctx context.Context, v viewer, as []answer) ([]byte, error) {
	running, pending := []any{}, []any{}
	for _, a := range as {
		var q struct {
			Running [][]any `json:"queue_running"`
			Pending [][]any `json:"queue_pending"`
		}
		if err := decode(a.body, &q); err != nil {
			return nil, err
		}
		// Under isolation, others' entries are left out; the totals
		// (GET /prompt, status messages) still count them.
		for _, it := range q.Running {
			if v.sees(f.itemPrompt(ctx, a.m.u.Name, it)) {
				running = append(running, f.mapItem(ctx, a.m.u.Name, it))
			}
		}
		for _, it := range q.Pending {
			if v.sees(f.itemPrompt(ctx, a.m.u.Name, it)) {
				pending = append(pending, f.mapItem(ctx, a.m.u.Name, it))
			}
		}
	}
	return json.Marshal(map[string]any{"queue_running": running, "queue_pending": pending})
}

// itemPrompt is the record of a queue item's prompt (nil: unknown).
func (f *Fleet) itemPrompt(ctx context.Context, server string, item []any) *Prompt {
	if len(item) < 2 {
		return nil
	}
	sid, _ := item[1].(string)
	_, p := f.idMap(ctx, server, sid)
	return p
}

func mergePrompt(as []answer) ([]byte, error) {
	total := 0
	for _, a := range as {
		var p struct {
			ExecInfo struct {
				QueueRemaining int `json:"queue_remaining"`
			} `json:"exec_info"`
		}
		if err := json.Unmarshal(a.body, &p); err != nil {
			return nil, err
		}
		total += p.ExecInfo.QueueRemaining
	}
	return json.Marshal(map[string]any{"exec_info": map[string]any{"queue_remaining": total}})
}

// historyEntry is one finished prompt from one server's /history.
type historyEntry struct {
	id    string
	entry map[string]any
	when  int64 // the last timestamp in its status messages
	// created is when the gateway queued it (zero: not through the
	// fleet), to order prompts that ended in the same millisecond.
	created time.Time
}

// mapEntry rewrites one history entry of server: ids, client_id, and the
// output file references, marked with the server (see markSubfolder). It
// returns the id and, when the fleet queued it, when.
func (f *Fleet) mapEntry(ctx context.Context, server, sid string, entry map[string]any) (string, *Prompt) {
	id, p := f.idMap(ctx, server, sid)
	if item, ok := entry["prompt"].([]any); ok {
		f.mapItem(ctx, server, item)
	}
	if outs, ok := entry["outputs"]; ok {
		markFiles(outs, server)
	}
	// The status messages name the prompt too.
	st, _ := entry["status"].(map[string]any)
	msgs, _ := st["messages"].([]any)
	for _, m := range msgs {
		pair, _ := m.([]any)
		if len(pair) < 2 {
			continue
		}
		if data, ok := pair[1].(map[string]any); ok && data["prompt_id"] == sid {
			data["prompt_id"] = id
		}
	}
	return id, p
}

// lastTimestamp is the newest "timestamp" in a history entry's status
// messages (0 when it has none).
func lastTimestamp(entry map[string]any) int64 {
	st, _ := entry["status"].(map[string]any)
	msgs, _ := st["messages"].([]any)
	var last int64
	for _, m := range msgs {
		pair, _ := m.([]any)
		if len(pair) < 2 {
			continue
		}
		data, _ := pair[1].(map[string]any)
		if n, ok := data["timestamp"].(json.Number); ok {
			if v, err := n.Int64(); err == nil && v > last {
				last = v
			}
		}
	}
	return last
}

// intParam reads an integer query parameter; ok is false when absent.
func intParam(q url.Values, name string) (int, bool, error) {
	s := q.Get(name)
	if s == "" {
		return 0, false, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil {
		return 0, false, queryError(name + " must be an integer")
	}
	return n, true, nil
}

func (f *Fleet) mergeHistory(ctx context.Context, v viewer, as []answer, q url.Values) ([]byte, error) {
	maxItems, hasMax, err := intParam(q, "max_items")
	if err != nil {
		return nil, err
	}
	offset, hasOffset, err := intParam(q, "offset")
	if err != nil {
		return nil, err
	}
	var all []historyEntry
	for _, a := range as {
		var keys []string
		var h map[string]map[string]any
		if err := decode(a.body, &h); err != nil {
			return nil, err
		}
		if keys, err = objectKeys(a.body); err != nil {
			return nil, err
		}
		var prev int64
		for _, sid := range keys {
			e := h[sid]
			id, p := f.mapEntry(ctx, a.m.u.Name, sid, e)
			when := lastTimestamp(e)
			if when == 0 {
				when = prev // keep it after the one before it
			}
			prev = when
			if !v.sees(p) {
				continue
			}
			var created time.Time
			if p != nil {
				created = p.Created
			}
			all = append(all, historyEntry{id: id, entry: e, when: when, created: created})
		}
	}
	sort.SliceStable(all, func(i, j int) bool {
		a, b := all[i], all[j]
		if a.when != b.when {
			return a.when < b.when
		}
		if !a.created.IsZero() && !b.created.IsZero() {
			return a.created.Before(b.created)
		}
		return false
	})
	// As ComfyUI's get_history: max_items alone gives the newest N; an
	// offset skips that many of the oldest.
	if !hasOffset || offset < 0 {
		offset = 0
		if hasMax {
			offset = max(len(all)-maxItems, 0)
		}
	}
	offset = min(offset, len(all))
	end := len(all)
	if hasMax && maxItems >= 0 {
		end = min(offset+maxItems, len(all))
	}
	return orderedObject(all[offset:end])
}

// orderedObject writes entries as one JSON object, in their order.
func orderedObject(es []historyEntry) ([]byte, error) {
	fs := make([]field, len(es))
	for i, e := range es {
		v, err := json.Marshal(e.entry)
		if err != nil {
			return nil, err
		}
		fs[i] = field{e.id, v}
	}
	return writeFields(fs), nil
}

// objectKeys returns the keys of a JSON object in the order written.
func objectKeys(b []byte) ([]string, error) {
	fs, err := objectFields(b)
	if err != nil {
		return nil, err
	}
	keys := make([]string, len(fs))
	for i, f := range fs {
		keys[i] = f.key
	}
	return keys, nil
}

// jobsQuery is the query sent to each server for a merged /api/jobs: the
// client's filters, and every job up to the page the client asked for.
func jobsQuery(q url.Values, all bool) string {
	out := url.Values{}
	for k, v := range q {
		if k != "limit" && k != "offset" {
			out[k] = v
		}
	}
	offset, _ := strconv.Atoi(q.Get("offset"))
	// Under isolation every job is read: the page is made of the
	// caller's only.
	if limit, err := strconv.Atoi(q.Get("limit")); err == nil && limit > 0 && !all {
		out.Set("limit", strconv.Itoa(max(offset, 0)+limit))
	}
	return out.Encode()
}

func (f *Fleet) mergeJobs(ctx context.Context, v viewer, as []answer, q url.Values) ([]byte, error) {
	offset, _, err := intParam(q, "offset")
	if err != nil {
		return nil, err
	}
	limit, hasLimit, err := intParam(q, "limit")
	if err != nil {
		return nil, err
	}
	var jobs []map[string]any
	total := 0
	for _, a := range as {
		var page struct {
			Jobs       []map[string]any `json:"jobs"`
			Pagination struct {
				Total int `json:"total"`
			} `json:"pagination"`
		}
		if err := decode(a.body, &page); err != nil {
			return nil, err
		}
		if v.admin {
			total += page.Pagination.Total
		}
		for _, j := range page.Jobs {
			sid, _ := j["id"].(string)
			id, p := f.idMap(ctx, a.m.u.Name, sid)
			if !v.sees(p) {
				continue
			}
			if !v.admin {
				total++
			}
			j["id"] = id
			if outs, ok := j["preview_output"]; ok {
				markFiles(outs, a.m.u.Name)
			}
			jobs = append(jobs, j)
		}
	}
	key := "create_time"
	if q.Get("sort_by") == "execution_duration" {
		key = "execution_duration"
	}
	num := func(j map[string]any) float64 {
		if key == "execution_duration" {
			s, _ := j["execution_start_time"].(json.Number)
			e, _ := j["execution_end_time"].(json.Number)
			a, _ := s.Float64()
			b, _ := e.Float64()
			return b - a
		}
		n, _ := j[key].(json.Number)
		v, _ := n.Float64()
		return v
	}
	asc := q.Get("sort_order") == "asc"
	sort.SliceStable(jobs, func(i, j int) bool {
		if asc {
			return num(jobs[i]) < num(jobs[j])
		}
		return num(jobs[i]) > num(jobs[j])
	})
	offset = min(max(offset, 0), len(jobs))
	end := len(jobs)
	if hasLimit && limit > 0 {
		end = min(offset+limit, len(jobs))
	}
	page := jobs[offset:end]
	if page == nil {
		page = []map[string]any{}
	}
	pag := map[string]any{"offset": offset, "total": total, "has_more": offset+len(page) < total}
	if hasLimit {
		pag["limit"] = limit
	} else {
		pag["limit"] = nil
	}
	return json.Marshal(map[string]any{"jobs": page, "pagination": pag})
}

// mergeObjectInfo is the union of the servers' node definitions: every
// class any server has, and for a combo input every value any server
// offers (routing keeps each prompt on a server that has what it uses).
func mergeObjectInfo(as []answer) ([]byte, error) {
	merged := map[string]json.RawMessage{}
	var order []string
	for _, a := range as {
		defs, err := objectFields(a.body)
		if err != nil {
			return nil, err
		}
		for _, d := range defs {
			class, def := d.key, d.value
			have, ok := merged[class]
			if !ok {
				merged[class] = def
				order = append(order, class)
				continue
			}
			if !bytes.Equal(have, def) {
				merged[class] = unionCombos(have, def)
			}
		}
	}
	fs := make([]field, len(order))
	for i, class := range order {
		fs[i] = field{class, merged[class]}
	}
	return writeFields(fs), nil
}

// unionCombos adds to definition a the combo choices of definition b. It
// rewrites only the specs whose choices grow and keeps every object's keys
// in the order a has them: the web UI (frontend 1.4) lays out a node's
// widgets in the order of input.required, and a workflow's widget values
// are matched to them by position.
func unionCombos(a, b json.RawMessage) json.RawMessage {
	var db struct {
		Input map[string]map[string]any `json:"input"`
	}
	if decode(b, &db) != nil {
		return a
	}
	out, err := editField(a, "input", func(input json.RawMessage) (json.RawMessage, error) {
		for _, group := range []string{"required", "optional"} {
			var err error
			input, err = editFields(input, group, func(name string, spec json.RawMessage) (json.RawMessage, error) {
				sb, ok := db.Input[group][name]
				if !ok {
					return spec, nil
				}
				var sa any
				if err := decode(spec, &sa); err != nil {
					return nil, err
				}
				before, _ := json.Marshal(sa)
				after, err := json.Marshal(unionSpec(sa, sb))
				if err != nil || bytes.Equal(before, after) {
					return spec, err
				}
				return after, nil
			})
			if err != nil {
				return nil, err
			}
		}
		return input, nil
	})
	if err != nil {
		return a
	}
	return out
}

// field is one member of a JSON object, in the order written.
type field struct {
	key   string
	value json.RawMessage
}

// objectFields returns the members of a JSON object in the order written.
func objectFields(b []byte) ([]field, error) {
	d := json.NewDecoder(bytes.NewReader(b))
	if t, err := d.Token(); err != nil || t != json.Delim('{') {
		return nil, fmt.Errorf("not a JSON object")
	}
	var fs []field
	for d.More() {
		t, err := d.Token()
		if err != nil {
			return nil, err
		}
		k, _ := t.(string)
		var v json.RawMessage
		if err := d.Decode(&v); err != nil {
			return nil, err
		}
		fs = append(fs, field{k, v})
	}
	return fs, nil
}

// writeFields writes members as a JSON object, in their order.
func writeFields(fs []field) json.RawMessage {
	var buf bytes.Buffer
	buf.WriteByte('{')
	for i, f := range fs {
		if i > 0 {
			buf.WriteByte(',')
		}
		k, _ := json.Marshal(f.key)
		buf.Write(k)
		buf.WriteByte(':')
		buf.Write(f.value)
	}
	buf.WriteByte('}')
	return buf.Bytes()
}

// editField replaces the value of member key of object b (if it has one)
// with edit's result, keeping the order of b's members.
func editField(b json.RawMessage, key string, edit func(json.RawMessage) (json.RawMessage, error)) (json.RawMessage, error) {
	fs, err := objectFields(b)
	if err != nil {
		return nil, err
	}
	for i := range fs {
		if fs[i].key == key {
			if fs[i].value, err = edit(fs[i].value); err != nil {
				return nil, err
			}
		}
	}
	return writeFields(fs), nil
}

// editFields applies edit to every member of the object at member key of
// b, keeping the order of both objects' members.
func editFields(b json.RawMessage, key string, edit func(name string, v json.RawMessage) (json.RawMessage, error)) (json.RawMessage, error) {
	return editField(b, key, func(obj json.RawMessage) (json.RawMessage, error) {
		fs, err := objectFields(obj)
		if err != nil {
			return nil, err
		}
		for i := range fs {
			if fs[i].value, err = edit(fs[i].key, fs[i].value); err != nil {
				return nil, err
			}
		}
		return writeFields(fs), nil
	})
}

// unionSpec merges the choices of two specs of one combo input, in either
// form ([[choices], opts] or ["COMBO", {"options": [...]}]).
func unionSpec(sa, sb any) any {
	la, _ := sa.([]any)
	lb, _ := sb.([]any)
	if len(la) == 0 || len(lb) == 0 {
		return sa
	}
	add := func(dst, src []any) []any {
		for _, v := range src {
			if !slices.Contains(dst, v) {
				dst = append(dst, v)
			}
		}
		return dst
	}
	if ca, ok := la[0].([]any); ok {
		if cb, ok := lb[0].([]any); ok {
			la[0] = add(ca, cb)
		}
		return la
	}
	if len(la) > 1 && len(lb) > 1 {
		oa, _ := la[1].(map[string]any)
		ob, _ := lb[1].(map[string]any)
		ca, _ := oa["options"].([]any)
		cb, _ := ob["options"].([]any)
		if oa != nil && ca != nil {
			oa["options"] = add(ca, cb)
		}
	}
	return la
}

// mergeSystemStats is ComfyUI's /system_stats with the first server's
// system and every server's devices, each name prefixed by its server.
func mergeSystemStats(as []answer) ([]byte, error) {
	var first map[string]any
	var devices []any
	for i, a := range as {
		var st map[string]any
		if err := decode(a.body, &st); err != nil {
			return nil, err
		}
		if i == 0 {
			first = st
		}
		ds, _ := st["devices"].([]any)
		for _, d := range ds {
			if dm, ok := d.(map[string]any); ok {
				name, _ := dm["name"].(string)
				dm["name"] = a.m.u.Name + ": " + name
			}
			devices = append(devices, d)
		}
	}
	if devices == nil {
		devices = []any{}
	}
	first["devices"] = devices
	return json.Marshal(first)
}

// markFiles marks every file reference ({"filename", "subfolder", "type"})
// in v as made by server: ComfyUI numbers output files per server
// (ComfyUI_00001_.png on each), so the name alone does not say where a
// file is. The mark is in the subfolder, which clients pass back to /view
// as they got it.
func markFiles(v any, server string) {
	switch t := v.(type) {
	case map[string]any:
		if _, isFile := t["filename"].(string); isFile {
			if _, typed := t["type"].(string); typed {
				sub, _ := t["subfolder"].(string)
				t["subfolder"] = markSubfolder(server, sub)
				return
			}
		}
		for _, x := range t {
			markFiles(x, server)
		}
	case []any:
		for _, x := range t {
			markFiles(x, server)
		}
	}
}

// A marked subfolder is "@server" or "@server/subfolder".
func markSubfolder(server, sub string) string {
	if sub == "" {
		return "@" + server
	}
	return "@" + server + "/" + sub
}

// unmarkSubfolder splits a marked subfolder; ok is false for one that is
// not marked.
func unmarkSubfolder(marked string) (server, sub string, ok bool) {
	if !strings.HasPrefix(marked, "@") {
		return "", marked, false
	}
	server, sub, _ = strings.Cut(marked[1:], "/")
	return server, sub, server != ""
}
