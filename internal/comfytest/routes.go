package comfytest

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"
)

// A route is one ComfyUI route. Patterns use {name} for one path segment,
// matched on the escaped path and then unescaped, so "workflows%2Fa.json"
// is one segment.
type route struct {
	method  string
	pattern string
	mirror  bool // also served under /api, like every route in server.py's RouteTableDef
	handle  func(f *Fake, w http.ResponseWriter, r *http.Request, args []string)
}

var routes = []route{
	{"GET", "/", true, (*Fake).serveIndex},
	{"GET", "/ws", true, (*Fake).serveWS},
	{"GET", "/embeddings", true, jsonConst([]byte("[]"))},
	{"GET", "/models", true, (*Fake).serveModelFolders},
	{"GET", "/models/{folder}", true, (*Fake).serveModels},
	{"GET", "/extensions", true, jsonConst(sampleExtensions)},
	{"POST", "/upload/image", true, (*Fake).serveUpload},
	{"POST", "/upload/mask", true, (*Fake).serveUpload},
	{"GET", "/view", true, (*Fake).serveView},
	{"GET", "/view_metadata/{folder_name}", true, emptyStatus(http.StatusNotFound)},
	{"GET", "/system_stats", true, (*Fake).serveSystemStats},
	{"GET", "/features", true, jsonConst(sampleFeatures)},
	{"GET", "/prompt", true, (*Fake).serveGetPrompt},
	{"POST", "/prompt", true, (*Fake).servePostPrompt},
	{"GET", "/object_info", true, (*Fake).serveObjectInfoAll},
	{"GET", "/object_info/{node_class}", true, (*Fake).serveObjectInfo},
	{"GET", "/history", true, (*Fake).serveHistory},
	{"GET", "/history/{prompt_id}", true, (*Fake).serveHistoryItem},
	{"POST", "/history", true, (*Fake).servePostHistory},
	{"GET", "/queue", true, (*Fake).serveQueue},
	{"POST", "/queue", true, (*Fake).servePostQueue},
	{"POST", "/interrupt", true, (*Fake).serveInterrupt},
	{"POST", "/free", true, emptyStatus(http.StatusOK)},
	{"GET", "/users", true, jsonConst([]byte(`{"storage":"server","migrated":true}`))},
	{"GET", "/settings", true, (*Fake).serveSettings},
	{"POST", "/settings", true, (*Fake).servePostSettings},
	{"GET", "/settings/{id}", true, (*Fake).serveSetting},
	{"POST", "/settings/{id}", true, (*Fake).servePostSetting},
	{"GET", "/userdata", true, (*Fake).serveUserdataList},
	{"GET", "/userdata/{file}", true, (*Fake).serveUserdataGet},
	{"POST", "/userdata/{file}", true, (*Fake).serveUserdataPost},
	{"DELETE", "/userdata/{file}", true, (*Fake).serveUserdataDelete},
	{"POST", "/userdata/{file}/move/{dest}", true, (*Fake).serveUserdataMove},
	{"GET", "/internal/logs", false, (*Fake).serveLogs},
	{"GET", "/internal/logs/raw", false, (*Fake).serveLogsRaw},
	// Static files of the frontend: no /api form.
	{"GET", "/index.html", false, (*Fake).serveIndex},
	{"GET", "/assets/index.js", false, staticFile("index.js", []byte(indexJS))},
	{"GET", "/scripts/api.js", false, staticFile("api.js", []byte(apiJS))},
	{"GET", "/favicon.ico", false, staticFile("favicon.ico", faviconICO)},
	{"GET", "/extensions/core/{script}", false, serveCoreExtension},
}

var modelFolders = []string{
	"checkpoints", "loras", "vae", "text_encoders", "diffusion_models", "clip_vision",
	"style_models", "embeddings", "diffusers", "vae_approx", "controlnet", "gligen",
	"upscale_models", "custom_nodes", "hypernetworks", "photomaker", "classifiers", "configs",
}

// route finds the handler for r, honouring delays and canned answers.
func (f *Fake) route(w http.ResponseWriter, r *http.Request) {
	p := r.URL.EscapedPath()
	api := false
	if strings.HasPrefix(p, "/api/") {
		p, api = p[len("/api"):], true
	}
	var (
		found   *route
		args    []string
		allowed []string
	)
	for i := range routes {
		rt := &routes[i]
		if api && !rt.mirror {
			continue
		}
		a, ok := matchPattern(rt.pattern, p)
		if !ok {
			continue
		}
		if rt.method == r.Method || rt.method == "GET" && r.Method == "HEAD" {
			found, args = rt, a
			break
		}
		allowed = append(allowed, rt.method)
	}

	pattern := p
	if found != nil {
		pattern = found.pattern
	}
	plain, _ := url.PathUnescape(p)
	f.mu.Lock()
	d, ok := f.delays[pattern]
	if !ok {
		d = f.delays[plain]
	}
	ov, hasOv := f.overrides[pattern]
	if !hasOv {
		ov, hasOv = f.overrides[plain]
	}
	f.mu.Unlock()
	if d > 0 {
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
			return
		}
	}
	if hasOv {
		if ov.contentType != "" {
			w.Header().Set("Content-Type", ov.contentType)
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(ov.body)))
		w.WriteHeader(ov.status)
		w.Write(ov.body)
		return
	}

	switch {
	case found != nil:
		found.handle(f, w, r, args)
	case r.Method == http.MethodGet || r.Method == http.MethodHead:
		// The frontend's static route under "/" takes every GET that no
		// route took, so a GET of a POST-only route such as /interrupt is a
		// missing file, not a wrong method.
		aiohttpError(w, http.StatusNotFound)
	default:
		// For any other method every path has at least that static
		// route's GET and HEAD to offer.
		w.Header().Set("Allow", allowHeader(allowed))
		aiohttpError(w, http.StatusMethodNotAllowed)
	}
}

// allowHeader lists the methods of the routes that matched the path, plus
// the static route's GET and HEAD, as aiohttp does: HEAD with every GET,
// sorted, comma-separated.
func allowHeader(methods []string) string {
	set := []string{http.MethodGet, http.MethodHead}
	for _, m := range methods {
		if !slices.Contains(set, m) {
			set = append(set, m)
		}
	}
	slices.Sort(set)
	return strings.Join(set, ",")
}

// matchPattern matches an escaped path against a pattern and returns the
// unescaped values of its {wildcards}.
func matchPattern(pattern, p string) ([]string, bool) {
	ps := strings.Split(pattern, "/")
	ss := strings.Split(p, "/")
	if len(ps) != len(ss) {
		return nil, false
	}
	var args []string
	for i, seg := range ps {
		if strings.HasPrefix(seg, "{") {
			v, err := url.PathUnescape(ss[i])
			if err != nil || v == "" {
				return nil, false
			}
			args = append(args, v)
			continue
		}
		if seg != ss[i] {
			return nil, false
		}
	}
	return args, true
}

// aiohttpError answers like aiohttp's default HTTPException, "404: Not Found".
func aiohttpError(w http.ResponseWriter, code int) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(code)
	io.WriteString(w, strconv.Itoa(code)+": "+http.StatusText(code))
}

// serverError answers like an uncaught exception in a ComfyUI handler.
func serverError(w http.ResponseWriter) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(http.StatusInternalServerError)
	io.WriteString(w, "500 Internal Server Error\n\nServer got itself in trouble")
}

func writeJSON(w http.ResponseWriter, code int, body []byte) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(code)
	w.Write(body)
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

func jsonConst(body []byte) func(*Fake, http.ResponseWriter, *http.Request, []string) {
	return func(_ *Fake, w http.ResponseWriter, _ *http.Request, _ []string) {
		writeJSON(w, http.StatusOK, body)
	}
}

func emptyStatus(code int) func(*Fake, http.ResponseWriter, *http.Request, []string) {
	return func(_ *Fake, w http.ResponseWriter, _ *http.Request, _ []string) {
		writeEmpty(w, code)
	}
}

// writeEmpty answers like aiohttp's web.Response(status=code): no body, and
// the default Content-Type, application/octet-stream.
func writeEmpty(w http.ResponseWriter, code int) {
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", "0")
	w.WriteHeader(code)
}

func (f *Fake) serveModelFolders(w http.ResponseWriter, r *http.Request, _ []string) {
	writeJSON(w, http.StatusOK, mustJSON(f.nodes.folders))
}

// serveModels is /models/{folder}: the files of Options.Models there.
func (f *Fake) serveModels(w http.ResponseWriter, r *http.Request, args []string) {
	if !slices.Contains(f.nodes.folders, args[0]) {
		writeEmpty(w, http.StatusNotFound)
		return
	}
	files := f.nodes.models[args[0]]
	if files == nil {
		files = []string{}
	}
	writeJSON(w, http.StatusOK, mustJSON(files))
}

func (f *Fake) serveSystemStats(w http.ResponseWriter, r *http.Request, _ []string) {
	body := compactJSON(sampleStats)
	if f.opts.Version != "" {
		body = bytes.Replace(body, []byte(`"comfyui_version":"unknown"`),
			append([]byte(`"comfyui_version":`), mustJSON(f.opts.Version)...), 1)
	}
	writeJSON(w, http.StatusOK, body)
}

// serveObjectInfoAll is /object_info: the captured definitions for the
// classes that have one (with Options.Models in the loaders' combos), a
// minimal definition for the rest.
func (f *Fake) serveObjectInfoAll(w http.ResponseWriter, r *http.Request, _ []string) {
	writeJSON(w, http.StatusOK, f.nodes.all)
}

func (f *Fake) serveObjectInfo(w http.ResponseWriter, r *http.Request, args []string) {
	if !f.nodes.has(args[0]) {
		writeJSON(w, http.StatusOK, []byte("{}"))
		return
	}
	writeJSON(w, http.StatusOK, []byte("{"+string(mustJSON(args[0]))+":"+string(f.nodes.nodeInfo(args[0]))+"}"))
}

func (f *Fake) serveSettings(w http.ResponseWriter, r *http.Request, _ []string) {
	f.mu.Lock()
	b := mustJSON(f.settings)
	f.mu.Unlock()
	writeJSON(w, http.StatusOK, b)
}

func (f *Fake) servePostSettings(w http.ResponseWriter, r *http.Request, _ []string) {
	var m map[string]any
	if err := json.NewDecoder(r.Body).Decode(&m); err != nil {
		serverError(w)
		return
	}
	f.mu.Lock()
	for k, v := range m {
		f.settings[k] = v
	}
	f.mu.Unlock()
	writeEmpty(w, http.StatusOK)
}

func (f *Fake) serveSetting(w http.ResponseWriter, r *http.Request, args []string) {
	f.mu.Lock()
	b := mustJSON(f.settings[args[0]])
	f.mu.Unlock()
	writeJSON(w, http.StatusOK, b)
}

func (f *Fake) servePostSetting(w http.ResponseWriter, r *http.Request, args []string) {
	var v any
	if err := json.NewDecoder(r.Body).Decode(&v); err != nil {
		serverError(w)
		return
	}
	f.mu.Lock()
	f.settings[args[0]] = v
	f.mu.Unlock()
	writeEmpty(w, http.StatusOK)
}

func (f *Fake) serveLogs(w http.ResponseWriter, r *http.Request, _ []string) {
	f.mu.Lock()
	s := strings.Join(f.logLines, "\n")
	f.mu.Unlock()
	writeJSON(w, http.StatusOK, mustJSON(s))
}

func (f *Fake) serveLogsRaw(w http.ResponseWriter, r *http.Request, _ []string) {
	type entry struct {
		T string `json:"t"`
		M string `json:"m"`
	}
	f.mu.Lock()
	entries := make([]entry, 0, len(f.logLines))
	for _, l := range f.logLines {
		entries = append(entries, entry{"", l + "\n"})
	}
	f.mu.Unlock()
	writeJSON(w, http.StatusOK, mustJSON(map[string]any{
		"entries": entries,
		"size":    map[string]int{"cols": 80, "rows": 24},
	}))
}

// userFile is one file of the in-memory user directory.
type userFile struct {
	data     []byte
	modified time.Time
}

// userdataPath validates a user file path the way get_request_user_filepath
// does: relative, with no way out of the user directory.
func userdataPath(p string) (string, bool) {
	if p == "" || strings.HasPrefix(p, "/") || strings.Contains(p, "\\") {
		return "", false
	}
	for seg := range strings.SplitSeq(p, "/") {
		if seg == ".." {
			return "", false
		}
	}
	return strings.Trim(p, "/"), true
}

func (f *Fake) serveUserdataList(w http.ResponseWriter, r *http.Request, _ []string) {
	q := r.URL.Query()
	dir := q.Get("dir")
	if dir == "" {
		w.WriteHeader(http.StatusBadRequest)
		io.WriteString(w, "Directory not provided")
		return
	}
	dir, ok := userdataPath(dir)
	if !ok {
		w.WriteHeader(http.StatusForbidden)
		io.WriteString(w, "Invalid directory")
		return
	}
	recurse := strings.EqualFold(q.Get("recurse"), "true")
	fullInfo := strings.EqualFold(q.Get("full_info"), "true")
	split := strings.EqualFold(q.Get("split"), "true")

	f.mu.Lock()
	var names []string
	for name := range f.userdata {
		rel, ok := strings.CutPrefix(name, dir+"/")
		if ok && (recurse || !strings.Contains(rel, "/")) {
			names = append(names, rel)
		}
	}
	sort.Strings(names)
	var out []any
	for _, rel := range names {
		uf := f.userdata[dir+"/"+rel]
		switch {
		case fullInfo:
			ms := float64(uf.modified.UnixMilli())
			out = append(out, map[string]any{"path": rel, "size": len(uf.data), "modified": ms, "created": ms})
		case split:
			out = append(out, append([]string{rel}, strings.Split(rel, "/")...))
		default:
			out = append(out, rel)
		}
	}
	f.mu.Unlock()
	if len(names) == 0 {
		w.WriteHeader(http.StatusNotFound)
		io.WriteString(w, "Directory not found")
		return
	}
	writeJSON(w, http.StatusOK, mustJSON(out))
}

func (f *Fake) serveUserdataGet(w http.ResponseWriter, r *http.Request, args []string) {
	p, ok := userdataPath(args[0])
	if !ok {
		writeEmpty(w, http.StatusForbidden)
		return
	}
	f.mu.Lock()
	uf, ok := f.userdata[p]
	f.mu.Unlock()
	if !ok {
		writeEmpty(w, http.StatusNotFound)
		return
	}
	w.Header().Set("Content-Type", contentType(p))
	http.ServeContent(w, r, "", uf.modified, strings.NewReader(string(uf.data)))
}

func (f *Fake) serveUserdataPost(w http.ResponseWriter, r *http.Request, args []string) {
	p, ok := userdataPath(args[0])
	if !ok {
		writeEmpty(w, http.StatusBadRequest)
		return
	}
	data, err := io.ReadAll(r.Body)
	if err != nil {
		serverError(w)
		return
	}
	overwrite := r.URL.Query().Get("overwrite") != "false"
	now := time.Now()
	f.mu.Lock()
	_, exists := f.userdata[p]
	if exists && !overwrite {
		f.mu.Unlock()
		w.WriteHeader(http.StatusConflict)
		io.WriteString(w, "File already exists")
		return
	}
	f.userdata[p] = userFile{data, now}
	f.mu.Unlock()
	f.answerUserFile(w, r, p, len(data), now)
}

func (f *Fake) answerUserFile(w http.ResponseWriter, r *http.Request, p string, size int, mod time.Time) {
	if strings.EqualFold(r.URL.Query().Get("full_info"), "true") {
		ms := float64(mod.UnixMilli())
		writeJSON(w, http.StatusOK, mustJSON(map[string]any{"path": p, "size": size, "modified": ms, "created": ms}))
		return
	}
	writeJSON(w, http.StatusOK, mustJSON(p))
}

func (f *Fake) serveUserdataDelete(w http.ResponseWriter, r *http.Request, args []string) {
	p, ok := userdataPath(args[0])
	if !ok {
		writeEmpty(w, http.StatusForbidden)
		return
	}
	f.mu.Lock()
	_, exists := f.userdata[p]
	delete(f.userdata, p)
	f.mu.Unlock()
	if !exists {
		writeEmpty(w, http.StatusNotFound)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (f *Fake) serveUserdataMove(w http.ResponseWriter, r *http.Request, args []string) {
	src, ok1 := userdataPath(args[0])
	dst, ok2 := userdataPath(args[1])
	if !ok1 || !ok2 {
		writeEmpty(w, http.StatusForbidden)
		return
	}
	overwrite := r.URL.Query().Get("overwrite") != "false"
	f.mu.Lock()
	uf, ok := f.userdata[src]
	_, exists := f.userdata[dst]
	switch {
	case !ok:
		f.mu.Unlock()
		writeEmpty(w, http.StatusNotFound)
		return
	case exists && !overwrite:
		f.mu.Unlock()
		writeEmpty(w, http.StatusConflict)
		return
	}
	delete(f.userdata, src)
	f.userdata[dst] = uf
	f.mu.Unlock()
	f.answerUserFile(w, r, dst, len(uf.data), uf.modified)
}
