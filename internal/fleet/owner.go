package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"

	"github.com/comfygate/comfygate/internal/jsonerr"
	"github.com/comfygate/comfygate/internal/proxy"
	"github.com/comfygate/comfygate/internal/reqscope"
	"github.com/comfygate/comfygate/internal/route"
	"github.com/comfygate/comfygate/internal/upstream"
)

var errNoServer = upstream.ErrNoUpstream

// owner answers a route about one prompt or file from the server that has
// it: /history/{id}, /api/jobs/{id}, /view.
func (f *Fleet) owner(w http.ResponseWriter, r *http.Request, e route.Entry) {
	switch e.Label {
	case "/view":
		f.view(w, r)
	case "/history/{id}", "/jobs":
		f.promptRoute(w, r, e)
	default:
		f.forwardAny(w, r)
	}
}

// lastSegments splits a /history/{id} or /api/jobs/{id}[/cancel] path into
// the part before the id, the id and the part after it.
func splitID(r *http.Request, e route.Entry) (before, id, after string, ok bool) {
	p := r.URL.EscapedPath()
	var marker string
	switch e.Label {
	case "/history/{id}":
		marker = "/history/"
	default:
		marker = "/jobs/"
	}
	i := strings.LastIndex(p, marker)
	if i < 0 {
		return "", "", "", false
	}
	before = p[:i+len(marker)]
	rest := p[i+len(marker):]
	escID, after, _ := strings.Cut(rest, "/")
	if after != "" {
		after = "/" + after
	}
	id, err := url.PathUnescape(escID)
	return before, id, after, err == nil && id != ""
}

// promptRoute sends a request about one prompt to its server, under the
// server's id, and maps the answer back. An id the fleet does not know is
// asked of every server in turn (a gateway restart loses no results).
func (f *Fleet) promptRoute(w http.ResponseWriter, r *http.Request, e route.Entry) {
	before, id, after, ok := splitID(r, e)
	if !ok {
		f.forwardAny(w, r)
		return
	}
	var body []byte
	if r.Method == http.MethodPost {
		var err error
		if body, err = f.readBody(w, r); err != nil {
			f.proxy.Fail(w, r, "", err)
			return
		}
	}
	query := ""
	if r.URL.RawQuery != "" {
		query = "?" + r.URL.RawQuery
	}
	ctx := r.Context()
	v := f.viewerOf(r)
	var order []*member
	sids := map[*member]string{}
	p, known, _ := f.store.Get(ctx, id)
	if !v.sees(promptOrNil(p, known)) {
		f.hidden(w, r)
		return
	}
	if known {
		if m, ok := f.byName(p.Server); ok {
			order, sids[m] = append(order, m), p.ServerID
		}
	}
	if len(order) == 0 {
		for _, m := range f.healthy() {
			order, sids[m] = append(order, m), id
		}
	}
	var last answer
	for _, m := range order {
		target := before + url.PathEscape(sids[m]) + after + query
		a := f.send(ctx, r, m, r.Method, target, body)
		last = a
		if a.err != nil {
			continue
		}
		if a.status == http.StatusNotFound || (a.status == http.StatusOK && strings.TrimSpace(string(a.body)) == "{}") {
			continue // not this server's
		}
		if a.status == http.StatusOK {
			a.body = f.mapPromptAnswer(ctx, m.u.Name, sids[m], a.body)
		}
		relay(w, a)
		return
	}
	if last.err != nil && last.m != nil {
		f.proxy.Fail(w, r, last.m.u.Name, last.err)
		return
	}
	if last.m != nil {
		relay(w, last) // {} or 404: as one ComfyUI says it does not know the id
		return
	}
	f.proxy.Fail(w, r, "", errNoServer)
}

func promptOrNil(p Prompt, known bool) *Prompt {
	if !known {
		return nil
	}
	return &p
}

// mapPromptAnswer rewrites a server's answer about prompt sid: the
// /history/{id} object keyed by id, or a job with an "id".
func (f *Fleet) mapPromptAnswer(ctx context.Context, server, sid string, body []byte) []byte {
	var obj map[string]any
	if decode(body, &obj) != nil {
		return body
	}
	if entry, ok := obj[sid].(map[string]any); ok && len(obj) == 1 {
		id, _ := f.mapEntry(ctx, server, sid, entry)
		out, err := orderedObject([]historyEntry{{id: id, entry: entry}})
		if err != nil {
			return body
		}
		return out
	}
	if jid, ok := obj["id"].(string); ok {
		obj["id"], _ = f.idMap(ctx, server, jid)
		for _, k := range []string{"outputs", "preview_output"} {
			if v, ok := obj[k]; ok {
				markFiles(v, server)
			}
		}
		if wf, ok := obj["workflow"].(map[string]any); ok {
			if extra, ok := wf["extra_data"].(map[string]any); ok {
				if _, p := f.idMap(ctx, server, jid); p != nil {
					if _, has := extra["client_id"]; has {
						extra["client_id"] = p.ClientID
					}
				}
			}
		}
	}
	out, err := json.Marshal(obj)
	if err != nil {
		return body
	}
	return out
}

// view serves a file from the server that made it: the one a marked
// subfolder names, else the first server that has the file.
func (f *Fleet) view(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	v := f.viewerOf(r)
	typ := q.Get("type")
	if typ == "" {
		typ = "output" // ComfyUI's default
	}
	if server, sub, marked := unmarkSubfolder(q.Get("subfolder")); marked {
		m, ok := f.byName(server)
		if !ok || !f.seesFile(r.Context(), v, File{Server: server, Type: typ, Subfolder: sub, Filename: q.Get("filename")}) {
			f.hidden(w, r)
			return
		}
		q.Set("subfolder", sub)
		r2 := r.Clone(r.Context())
		r2.URL.RawQuery = q.Encode()
		f.proxy.Forward(w, r2, m.u)
		return
	}
	// Not marked (a file from before the fleet, or an input): ask each
	// server in turn; the first that has it answers. Under isolation only
	// the caller's own uploads are served so.
	if !f.seesFile(r.Context(), v, File{Type: typ, Subfolder: q.Get("subfolder"), Filename: q.Get("filename")}) {
		f.hidden(w, r)
		return
	}
	ms := f.healthy()
	for i, m := range ms {
		if i == len(ms)-1 {
			f.proxy.Forward(w, r, m.u)
			return
		}
		out, err := f.proxy.Outbound(r, m.u, http.MethodHead, r.URL.RequestURI(), nil)
		if err != nil {
			break
		}
		res, err := f.proxy.RoundTrip(m.u, out)
		if err != nil {
			continue
		}
		res.Body.Close()
		if res.StatusCode != http.StatusNotFound {
			f.proxy.Forward(w, r, m.u)
			return
		}
	}
	f.proxy.Fail(w, r, "", errNoServer)
}

// fanout sends a request that concerns every server (route policy all):
// POST /queue and /history (clear, or delete by id), /interrupt, /free,
// uploads and /api/jobs/cancel. Ids are sent to the server that has them,
// under its own id.
func (f *Fleet) fanout(w http.ResponseWriter, r *http.Request, e route.Entry) {
	if e.Kind == "upload" {
		f.upload(w, r)
		return
	}
	body, err := f.readBody(w, r)
	if err != nil {
		f.proxy.Fail(w, r, "", err)
		return
	}
	hs := f.healthy()
	if len(hs) == 0 {
		f.proxy.Fail(w, r, "", errNoServer)
		return
	}
	ctx := r.Context()
	target := r.URL.RequestURI()
	var obj map[string]json.RawMessage
	json.Unmarshal(body, &obj)
	v := f.viewerOf(r)
	if e.Kind == "interrupt" && obj["prompt_id"] != nil {
		var id string
		json.Unmarshal(obj["prompt_id"], &id)
		p, known, _ := f.store.Get(ctx, id)
		if !v.sees(promptOrNil(p, known)) {
			f.hidden(w, r)
			return
		}
		f.interruptOne(w, r, id)
		return
	}
	if !v.admin {
		// Under isolation a global action is the caller's own: interrupt
		// stops its running prompts, clear deletes its entries.
		switch {
		case e.Kind == "interrupt":
			f.interruptOwn(w, r, v)
			return
		case (e.Kind == "queue" || e.Kind == "history") && obj["clear"] != nil && obj["delete"] == nil:
			ids := f.ownIDs(ctx, v, e.Kind == "history")
			delete(obj, "clear")
			obj["delete"], _ = json.Marshal(ids)
			if len(ids) == 0 {
				writeEmptyOK(w)
				return
			}
		}
	}
	idsKey := ""
	switch {
	case e.Kind == "jobs":
		idsKey = "job_ids"
	case obj["delete"] != nil:
		idsKey = "delete"
	}
	if idsKey == "" {
		// Clear, free, interrupt everything: the same to every server.
		if e.Kind == "queue" && obj["clear"] != nil {
			f.forgetPending(ctx)
		}
		as := f.sendAll(ctx, r, hs, r.Method, target, body)
		f.answerFanout(w, r, as)
		return
	}
	var ids []string
	json.Unmarshal(obj[idsKey], &ids)
	// Each known id to its server, under its id there; unknown ids to all.
	per := map[*member][]string{}
	var unknown []string
	for _, id := range ids {
		p, known, _ := f.store.Get(ctx, id)
		if !v.sees(promptOrNil(p, known)) {
			continue // others' ids are not the caller's to touch
		}
		m, ok := f.byName(p.Server)
		if !known || !ok {
			unknown = append(unknown, id)
			continue
		}
		per[m] = append(per[m], p.ServerID)
		if e.Kind != "history" {
			// Deleted or cancelled: the fleet must not queue it again.
			p.Done, p.Body = true, nil
			f.store.Put(ctx, p)
		}
	}
	if len(unknown) > 0 {
		for _, m := range hs {
			per[m] = append(per[m], unknown...)
		}
	}
	if len(per) == 0 {
		writeEmptyOK(w)
		return
	}
	var as []answer
	for m, sids := range per {
		obj[idsKey], _ = json.Marshal(sids)
		b, _ := json.Marshal(obj)
		as = append(as, f.send(ctx, r, m, r.Method, target, b))
	}
	f.answerFanout(w, r, as)
}

// interruptOne stops prompt id where it is running, and nowhere else: an
// old server (0.3.7) stops whatever it runs when told to interrupt any id,
// so the server's queue is read first, and a prompt that is only waiting
// (or unknown, or done) is left alone, as ComfyUI 0.8 does.
func (f *Fleet) interruptOne(w http.ResponseWriter, r *http.Request, id string) {
	ctx := r.Context()
	var order []*member
	sids := map[*member]string{}
	if p, known, _ := f.store.Get(ctx, id); known {
		if m, ok := f.byName(p.Server); ok && m.u.Healthy() {
			order, sids[m] = append(order, m), p.ServerID
		}
	} else {
		for _, m := range f.healthy() {
			order, sids[m] = append(order, m), id
		}
	}
	for _, m := range order {
		if q, err := f.readQueue(ctx, r, m); err != nil || !slices.Contains(q.running, sids[m]) {
			continue
		}
		body, _ := json.Marshal(map[string]string{"prompt_id": sids[m]})
		a := f.send(ctx, r, m, http.MethodPost, "/api/interrupt", body)
		if a.err != nil {
			f.proxy.Fail(w, r, m.u.Name, a.err)
			return
		}
		relay(w, a)
		return
	}
	// Not running anywhere: nothing to stop, as ComfyUI answers then.
	writeEmptyOK(w)
}

// interruptOwn stops the running prompts of v, and nobody else's.
func (f *Fleet) interruptOwn(w http.ResponseWriter, r *http.Request, v viewer) {
	ctx := r.Context()
	own, _ := f.store.Owned(ctx, v.owner)
	for _, p := range own {
		if p.Done {
			continue
		}
		m, ok := f.byName(p.Server)
		if !ok {
			continue
		}
		if running, _ := m.inQueue(p.ServerID); !running {
			continue
		}
		body, _ := json.Marshal(map[string]string{"prompt_id": p.ServerID})
		f.send(ctx, r, m, http.MethodPost, "/api/interrupt", body)
	}
	writeEmptyOK(w)
}

// ownIDs are the ids of v's prompts: done ones (history) or waiting ones.
func (f *Fleet) ownIDs(ctx context.Context, v viewer, done bool) []string {
	own, _ := f.store.Owned(ctx, v.owner)
	ids := []string{}
	for _, p := range own {
		if p.Done == done {
			ids = append(ids, p.ID)
		}
	}
	return ids
}

// writeEmptyOK answers 200 with no body, as ComfyUI answers these POSTs.
func writeEmptyOK(w http.ResponseWriter) {
	w.Header().Del("Connection")
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", "0")
	w.WriteHeader(http.StatusOK)
}

// answerFanout answers with the first server's answer that is a success,
// else the first answer, else the first error.
func (f *Fleet) answerFanout(w http.ResponseWriter, r *http.Request, as []answer) {
	for _, a := range as {
		if a.err == nil && a.status < 300 {
			relay(w, a)
			return
		}
	}
	for _, a := range as {
		if a.err == nil {
			relay(w, a)
			return
		}
	}
	server, err := firstError(as)
	f.proxy.Fail(w, r, server, err)
}

// forgetPending marks every prompt that is not running as done: a client
// cleared the queue, and the fleet must not queue them again.
func (f *Fleet) forgetPending(ctx context.Context) {
	active, _ := f.store.Active(ctx)
	for _, p := range active {
		m, ok := f.byName(p.Server)
		if ok {
			if running, _ := m.inQueue(p.ServerID); running {
				continue
			}
		}
		p.Done, p.Body = true, nil
		f.store.Put(ctx, p)
	}
}

// upload sends an uploaded file to every healthy server, so that a prompt
// that loads it can run on any of them. The body is kept in a temporary
// file while it is copied (never whole in memory), capped like any body.
func (f *Fleet) upload(w http.ResponseWriter, r *http.Request) {
	w.Header().Del("Connection")
	hs := f.healthy()
	if len(hs) == 0 {
		f.proxy.Fail(w, r, "", errNoServer)
		return
	}
	if r.ContentLength > f.opts.MaxBodyBytes {
		f.proxy.Fail(w, r, "", &http.MaxBytesError{Limit: f.opts.MaxBodyBytes})
		return
	}
	tmp, err := os.CreateTemp(f.opts.UploadDir, "comfygate-upload-*")
	if err != nil {
		f.log.Error("fleet: cannot keep an upload", "err", err)
		jsonerr.Write(w, http.StatusInternalServerError, "internal_error", "the gateway could not store the upload")
		return
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	n, err := io.Copy(tmp, http.MaxBytesReader(w, r.Body, f.opts.MaxBodyBytes))
	if err != nil {
		var mb *http.MaxBytesError
		if !errors.As(err, &mb) {
			err = &proxy.ClientBodyError{Err: err}
		}
		f.proxy.Fail(w, r, "", err)
		return
	}
	v := f.viewerOf(r)
	form, _ := readUploadForm(tmp, n, r.Header.Get("Content-Type"))
	if f.opts.Isolation && form.name != "" {
		fl := File{Type: form.typ, Subfolder: form.subfolder, Filename: form.name}
		if o, known, _ := f.store.FileOwner(r.Context(), fl); known && o != v.owner {
			reqscope.From(r.Context()).AuthFailure = "isolation"
			jsonerr.Write(w, http.StatusForbidden, "forbidden", "another key uploaded a file of this name; choose another name")
			return
		}
	}
	type result struct {
		m   *member
		res *http.Response
		b   []byte
		err error
	}
	results := make([]result, len(hs))
	done := make(chan struct{})
	for i, m := range hs {
		go func() {
			defer func() { done <- struct{}{} }()
			out, err := f.proxy.Outbound(r, m.u, r.Method, r.URL.RequestURI(), nil)
			if err != nil {
				results[i] = result{m: m, err: err}
				return
			}
			out.Body = io.NopCloser(io.NewSectionReader(tmp, 0, n))
			out.ContentLength = n
			out.Header.Set("Content-Type", r.Header.Get("Content-Type"))
			res, err := f.proxy.RoundTrip(m.u, out)
			if err != nil {
				results[i] = result{m: m, err: err}
				return
			}
			b, err := io.ReadAll(io.LimitReader(res.Body, 1<<20))
			res.Body.Close()
			results[i] = result{m: m, res: res, b: b, err: err}
		}()
	}
	for range hs {
		<-done
	}
	var as []answer
	for _, res := range results {
		if res.err != nil {
			f.log.Warn("fleet: an upload did not reach a server", "upstream", res.m.u.Name, "err", res.err)
			as = append(as, answer{m: res.m, err: res.err})
			continue
		}
		a := answer{m: res.m, status: res.res.StatusCode, header: res.res.Header, body: res.b}
		if a.status == http.StatusOK {
			var up struct {
				Name      string `json:"name"`
				Subfolder string `json:"subfolder"`
				Type      string `json:"type"`
			}
			if json.Unmarshal(a.body, &up) == nil && up.Name != "" {
				name := up.Name
				if up.Subfolder != "" {
					name = up.Subfolder + "/" + up.Name
				}
				res.m.mu.Lock()
				res.m.uploads[name] = true
				res.m.mu.Unlock()
				if up.Type == "" {
					up.Type = "input"
				}
				f.store.PutFile(r.Context(), File{Type: up.Type, Subfolder: up.Subfolder, Filename: up.Name}, v.owner)
			}
		} else {
			f.log.Warn("fleet: a server refused an upload", "upstream", res.m.u.Name, "status", a.status)
		}
		as = append(as, a)
	}
	f.answerFanout(w, r, as)
}
