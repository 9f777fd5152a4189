package realcomfy_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"mime/multipart"
	"net/http"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/google/go-cmp/cmp"

	"github.com/comfygate/comfygate/internal/comfytest"
	"github.com/comfygate/comfygate/internal/realcomfy"
)

// fakeOptions configures the fake ComfyUI of internal/comfytest to stand
// in for each real version.
var fakeOptions = map[realcomfy.Version]comfytest.Options{
	realcomfy.V037: {},
	realcomfy.V080: {Version: "0.8.0", PromptIDs: true, ProgressState: true, CreateTime: true},
}

// TestFakeMatchesReal runs the same requests against each real ComfyUI and
// against the fake that stands in for it in every other package's tests,
// and compares what they answer, with ids, numbers, times and file sizes
// normalized away. When it fails, the fake has drifted from ComfyUI (or a
// new ComfyUI behaves differently): fix the fake, not this test.
func TestFakeMatchesReal(t *testing.T) {
	for _, v := range realcomfy.Versions() {
		t.Run(string(v), func(t *testing.T) {
			t.Parallel()
			real := shared.Get(t, v)
			fake := comfytest.New(t, fakeOptions[v])
			p := newObserveParams()
			got := observe(t, real.URL, p, nil)
			want := observe(t, fake.URL(), p, func() { fake.SetNodeDelay(30 * time.Millisecond) })
			for _, k := range observationOrder {
				if diff := cmp.Diff(got[k], want[k]); diff != "" {
					t.Errorf("%s: ComfyUI %s and the fake differ (-real +fake)\n%s", k, v, diff)
				}
			}
		})
	}
}

var observationOrder = []string{
	"greeting", "prompt answer", "messages", "history", "view", "view range",
	"client prompt_id", "observer of a prompt without client_id", "upload", "upload renamed", "LoadImage of an upload", "LoadImage of a missing file",
	"interrupt while idle", "interrupted run", "interrupted history", "routing", "origin check", "page headers",
}

// observeParams are the names and colors both servers get, so that their
// answers can be compared as they are.
type observeParams struct {
	clientID, prefix, mine, upload string
	colors                         [3]int
}

func newObserveParams() observeParams {
	return observeParams{
		clientID: "rc-" + randomHex(8),
		prefix:   "rc_cmp_" + randomHex(4),
		mine:     "rc-mine-" + randomHex(4),
		upload:   "rc_cmp_" + randomHex(4) + ".png",
		colors:   [3]int{randomColor(), randomColor(), randomColor()},
	}
}

// observe sends the requests to the ComfyUI at base and returns what it
// saw, normalized. slow, if not nil, makes nodes take long enough to be
// interrupted (the real blur chain is slow by itself).
func observe(t *testing.T, base string, p observeParams, slow func()) map[string]any {
	t.Helper()
	hc := &http.Client{}
	t.Cleanup(hc.CloseIdleConnections)
	obs := map[string]any{}
	get := func(path string, header ...string) (*http.Response, []byte) {
		t.Helper()
		return doURL(t, hc, "GET", base+path, nil, header...)
	}
	post := func(path, body string, header ...string) (*http.Response, []byte) {
		t.Helper()
		return doURL(t, hc, "POST", base+path, strings.NewReader(body), header...)
	}

	clientID := p.clientID
	ws, _, err := websocket.Dial(t.Context(), "ws"+strings.TrimPrefix(base, "http")+"/ws?clientId="+clientID, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.CloseNow()
	greeting := readMessage(t, ws)
	obs["greeting"] = normalizeJSON(greeting.raw, map[string]string{clientID: "<client>"})

	// The sample workflow, EmptyImage → ImageInvert → SaveImage.
	prefix := p.prefix
	graph := map[string]any{
		"1": node("EmptyImage", map[string]any{"width": 16, "height": 16, "batch_size": 1, "color": p.colors[0]}),
		"2": node("ImageInvert", map[string]any{"image": []any{"1", 0}}),
		"3": node("SaveImage", map[string]any{"images": []any{"2", 0}, "filename_prefix": prefix}),
	}
	resp, b := post("/prompt", promptBody(graph, clientID), "Content-Type", "application/json")
	var queued struct {
		PromptID string `json:"prompt_id"`
	}
	json.Unmarshal(b, &queued)
	id := queued.PromptID
	obs["prompt answer"] = []any{resp.StatusCode, resp.Header.Get("Content-Type"), normalizeJSON(b, map[string]string{id: "<id>"})}
	obs["messages"] = progressSummary(readRun(t, ws, id))

	_, b = get("/history/" + id)
	obs["history"] = normalizeJSON(b, map[string]string{id: "<id>", clientID: "<client>"})
	img := fileRef{Filename: prefix + "_00001_.png", Type: "output"}
	resp, b = get("/view?" + img.query())
	obs["view"] = []any{resp.StatusCode, bytes.HasPrefix(b, []byte("\x89PNG\r\n\x1a\n")), headers(resp,
		"Content-Type", "Content-Disposition", "Accept-Ranges", "Cache-Control", "X-Content-Type-Options", "Vary"),
		resp.Header.Get("ETag") != "", resp.Header.Get("Last-Modified") != ""}
	resp, b = get("/view?"+img.query(), "Range", "bytes=1-3")
	obs["view range"] = []any{resp.StatusCode, string(b), strings.HasPrefix(resp.Header.Get("Content-Range"), "bytes 1-3/")}

	// What the server makes of a prompt_id the client chose.
	// What the server makes of a prompt_id the client chose, and what a
	// socket sees of a prompt without client_id.
	mine := p.mine
	graph["1"] = node("EmptyImage", map[string]any{"width": 16, "height": 16, "batch_size": 1, "color": p.colors[1]})
	_, b = post("/prompt", strings.Replace(promptBody(graph, ""), `{`, `{"prompt_id":"`+mine+`",`, 1))
	json.Unmarshal(b, &queued)
	obs["client prompt_id"] = map[bool]string{true: "kept", false: "replaced"}[queued.PromptID == mine]
	obs["observer of a prompt without client_id"] = drainUntilIdle(t, ws)

	name := p.upload
	upload := func(content []byte) []any {
		var body bytes.Buffer
		mw := multipart.NewWriter(&body)
		part, _ := mw.CreateFormFile("image", name)
		part.Write(content)
		mw.Close()
		resp, b := doURL(t, hc, "POST", base+"/upload/image", &body, "Content-Type", mw.FormDataContentType())
		return []any{resp.StatusCode, normalizeJSON(b, map[string]string{strings.TrimSuffix(name, ".png"): "<name>"})}
	}
	obs["upload"] = upload(solidPNG(t, 4, 4, 0x336699))
	obs["upload renamed"] = upload(solidPNG(t, 4, 4, 0x996633))
	loadGraph := func(image string) string {
		return promptBody(map[string]any{
			"1": node("LoadImage", map[string]any{"image": image}),
			"2": node("PreviewImage", map[string]any{"images": []any{"1", 0}}),
		}, "")
	}
	resp, _ = post("/prompt", loadGraph(name))
	obs["LoadImage of an upload"] = resp.StatusCode
	drainUntilIdle(t, ws)
	resp, b = post("/prompt", loadGraph("rc_missing.png"))
	obs["LoadImage of a missing file"] = []any{resp.StatusCode, normalizeJSON(b, nil)}

	resp, b = post("/interrupt", "")
	obs["interrupt while idle"] = []any{resp.StatusCode, resp.Header.Get("Content-Type"), len(b)}

	// A chain of blurs, interrupted while the third node runs.
	if slow != nil {
		slow()
	}
	chain := map[string]any{"1": node("EmptyImage", map[string]any{"width": 256, "height": 256, "batch_size": 1, "color": p.colors[2]})}
	for i := 2; i <= 31; i++ {
		chain[strconv.Itoa(i)] = node("ImageBlur", map[string]any{"image": []any{strconv.Itoa(i - 1), 0}, "blur_radius": 10, "sigma": 1.0})
	}
	chain["32"] = node("PreviewImage", map[string]any{"images": []any{"31", 0}})
	_, b = post("/prompt", promptBody(chain, clientID))
	json.Unmarshal(b, &queued)
	sent := false
	msgs := readRunFunc(t, ws, queued.PromptID, func(m message) {
		if m.Type == "executing" && m.Data["node"] == "3" && !sent {
			sent = true
			post("/interrupt", "")
		}
	})
	obs["interrupted run"] = interruptSummary(t, msgs)
	_, b = get("/history/" + queued.PromptID)
	obs["interrupted history"] = normalizeInterrupt(normalizeJSON(b, map[string]string{queued.PromptID: "<id>", clientID: "<client>"}))

	var routing []string
	for _, r := range []struct{ method, path string }{
		{"GET", "/interrupt"}, {"GET", "/nope"}, {"POST", "/nope"}, {"PUT", "/prompt"},
		{"DELETE", "/system_stats"}, {"POST", "/view"}, {"GET", "/view?filename=missing.png"},
		{"GET", "/view?filename=../x.png"}, {"GET", "/history/unknown"}, {"GET", "/object_info/NoSuchNode"},
		{"OPTIONS", "/prompt"}, {"GET", "/api/prompt"},
	} {
		resp, b := doURL(t, hc, r.method, base+r.path, nil)
		body := string(b)
		if strings.Contains(r.path, "prompt") && r.method == "GET" {
			body = "<json>"
		}
		routing = append(routing, fmt.Sprintf("%s %s: %d allow=%q type=%q %q", r.method, r.path, resp.StatusCode,
			resp.Header.Get("Allow"), resp.Header.Get("Content-Type"), body))
	}
	obs["routing"] = routing
	resp, b = post("/prompt", "{}", "Origin", "http://evil.example")
	obs["origin check"] = []any{resp.StatusCode, resp.Header.Get("Content-Type"), len(b)}
	resp, _ = get("/")
	obs["page headers"] = headers(resp, "Content-Type", "Cache-Control", "Pragma", "Expires", "Accept-Ranges")
	return obs
}

// drainUntilIdle reads the socket up to the status message that announces
// an empty queue, and returns what it read.
func drainUntilIdle(t *testing.T, ws *websocket.Conn) []string {
	t.Helper()
	var msgs []message
	for {
		m := readMessage(t, ws)
		msgs = append(msgs, m)
		if m.summary() == "status 0" {
			return progressSummary(msgs)
		}
	}
}

// normalizeInterrupt replaces, in a normalized history, the node where the
// run stopped (which depends on timing) by "<K>", after checking that the
// nodes before it are the ones listed as executed.
func normalizeInterrupt(v any) any {
	h, _ := v.(map[string]any)
	entry, _ := h["<id>"].(map[string]any)
	status, _ := entry["status"].(map[string]any)
	msgs, _ := status["messages"].([]any)
	for _, m := range msgs {
		pair, _ := m.([]any)
		if len(pair) != 2 || pair[0] != "execution_interrupted" {
			continue
		}
		d := pair[1].(map[string]any)
		k, _ := strconv.Atoi(fmt.Sprint(d["node_id"]))
		var want []any
		for i := 1; i < k; i++ {
			want = append(want, strconv.Itoa(i))
		}
		slices.SortFunc(want, func(a, b any) int { return strings.Compare(a.(string), b.(string)) })
		d["executed"] = fmt.Sprintf("all before <K>: %v", cmp.Equal(want, d["executed"]))
		d["node_id"] = "<K>"
	}
	return v
}

func headers(resp *http.Response, names ...string) map[string]string {
	m := map[string]string{}
	for _, n := range names {
		if v := resp.Header.Get(n); v != "" {
			m[n] = v
		}
	}
	return m
}

var (
	uuidInText = regexp.MustCompile(`[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}`)
	msTime     = regexp.MustCompile(`^1[0-9]{12}$`)
)

// normalizeJSON decodes b and replaces what differs from run to run:
// the strings in replace, other uuids, timestamps, and numbers in the
// queue ("number", the first element of a history "prompt").
func normalizeJSON(b []byte, replace map[string]string) any {
	s := string(b)
	for from, to := range replace {
		s = strings.ReplaceAll(s, from, to)
	}
	s = uuidInText.ReplaceAllString(s, "<uuid>")
	var v any
	dec := json.NewDecoder(strings.NewReader(s))
	dec.UseNumber()
	if err := dec.Decode(&v); err != nil {
		return "not JSON: " + s
	}
	return normalizeValue(v, "")
}

func normalizeValue(v any, key string) any {
	switch v := v.(type) {
	case map[string]any:
		out := map[string]any{}
		for k, e := range v {
			out[k] = normalizeValue(e, k)
		}
		return out
	case []any:
		out := make([]any, len(v))
		for i, e := range v {
			out[i] = normalizeValue(e, key)
		}
		if key == "prompt" && len(out) == 5 {
			out[0] = "<number>"
		}
		if key == "executed" { // the order of this list is not fixed
			slices.SortFunc(out, func(a, b any) int { return strings.Compare(fmt.Sprint(a), fmt.Sprint(b)) })
		}
		return out
	case json.Number:
		switch {
		case key == "number":
			return "<number>"
		case key == "timestamp" || key == "create_time" || msTime.MatchString(v.String()):
			return "<ms>"
		}
		f, _ := v.Float64()
		return f // 1 and 1.0 alike: Go and Python print floats differently
	}
	return v
}

// progressSummary renders messages as "executing 2", "status 1",
// "progress_state 1:finished 2:running", "execution_cached []".
func progressSummary(msgs []message) []string {
	var out []string
	for _, m := range msgs {
		s := m.summary()
		if m.Type == "progress_state" {
			nodes, _ := m.Data["nodes"].(map[string]any)
			var ids []string
			for id := range nodes {
				ids = append(ids, id)
			}
			slices.SortFunc(ids, func(a, b string) int { x, _ := strconv.Atoi(a); y, _ := strconv.Atoi(b); return x - y })
			for _, id := range ids {
				st, _ := nodes[id].(map[string]any)
				s += fmt.Sprintf(" %s:%v", id, st["state"])
			}
		}
		out = append(out, s)
	}
	return out
}

// interruptSummary renders an interrupted run with the node it stopped at,
// which depends on timing, replaced by K: the messages up to "executing 3",
// then "executing K" and what follows it.
func interruptSummary(t *testing.T, msgs []message) []string {
	t.Helper()
	all := progressSummary(msgs)
	stop := slices.IndexFunc(msgs, func(m message) bool { return m.Type == "execution_interrupted" })
	three := slices.Index(all, "executing 3")
	if stop < 1 || three < 0 || three >= stop {
		return append([]string{"unexpected:"}, all...)
	}
	k := fmt.Sprint(msgs[stop].Data["node_id"])
	out := append(slices.Clone(all[:three+1]), "…")
	var executed []string
	for _, e := range msgs[stop].Data["executed"].([]any) {
		executed = append(executed, e.(string))
	}
	n, _ := strconv.Atoi(k)
	var want []string
	for i := 1; i < n; i++ {
		want = append(want, strconv.Itoa(i))
	}
	slices.Sort(executed)
	slices.Sort(want)
	out = append(out, fmt.Sprintf("execution_interrupted node_type=%v executed all before it: %v", msgs[stop].Data["node_type"], slices.Equal(executed, want)))
	for _, s := range all[stop-1:] {
		out = append(out, strings.ReplaceAll(strings.ReplaceAll(s, " "+k+":", " K:"), "executing "+k, "executing K"))
	}
	return out
}
