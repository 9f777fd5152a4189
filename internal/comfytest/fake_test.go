package comfytest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"mime/multipart"
	"net"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/google/go-cmp/cmp"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// sample decodes a file of testdata/.
func sample(t *testing.T, name string) any {
	t.Helper()
	return decode(t, mustRead(name))
}

func decode(t *testing.T, b []byte) any {
	t.Helper()
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("decoding %q: %v", b, err)
	}
	return v
}

// do sends one request to the fake and returns the answer and its body.
func do(t *testing.T, c *http.Client, method, u string, body io.Reader, header http.Header) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), method, u, body)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	if h := header.Get("Host"); h != "" {
		req.Host = h
	}
	if c == nil {
		c = http.DefaultClient
	}
	res, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, u, err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	return res, b
}

func get(t *testing.T, f *Fake, p string) (*http.Response, []byte) {
	t.Helper()
	return do(t, nil, "GET", f.URL()+p, nil, nil)
}

func post(t *testing.T, f *Fake, p, body string) (*http.Response, []byte) {
	t.Helper()
	return do(t, nil, "POST", f.URL()+p, strings.NewReader(body), http.Header{"Content-Type": {"application/json"}})
}

// pinnedClient sends every request to the fake whatever the URL's host, so
// a test can choose the Host header (and the WebSocket handshake's Host).
func pinnedClient(t *testing.T, f *Fake) *http.Client {
	addr := strings.TrimPrefix(f.URL(), "http://")
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, addr)
		},
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

func dial(t *testing.T, f *Fake, clientID string) *websocket.Conn {
	t.Helper()
	u := "ws" + strings.TrimPrefix(f.URL(), "http") + "/ws"
	if clientID != "" {
		u += "?clientId=" + url.QueryEscape(clientID)
	}
	c, _, err := websocket.Dial(t.Context(), u, nil)
	if err != nil {
		t.Fatalf("dial %s: %v", u, err)
	}
	c.SetReadLimit(1 << 20)
	t.Cleanup(func() { c.CloseNow() })
	return c
}

type frame struct {
	binary bool
	data   []byte
}

func read(t *testing.T, c *websocket.Conn) frame {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	typ, data, err := c.Read(ctx)
	if err != nil {
		t.Fatalf("reading WebSocket: %v", err)
	}
	return frame{typ == websocket.MessageBinary, data}
}

func readText(t *testing.T, c *websocket.Conn) map[string]any {
	t.Helper()
	fr := read(t, c)
	if fr.binary {
		t.Fatalf("got a binary frame, want text")
	}
	return decode(t, fr.data).(map[string]any)
}

// readRun reads text messages up to and including "executing" with node
// null, the end of a prompt.
func readRun(t *testing.T, c *websocket.Conn) []any {
	t.Helper()
	var msgs []any
	for {
		m := readText(t, c)
		msgs = append(msgs, m)
		if m["type"] == "executing" {
			if d := m["data"].(map[string]any); d["node"] == nil {
				return msgs
			}
		}
	}
}

// normalize replaces the values that differ from run to run.
func normalize(v any) any {
	switch v := v.(type) {
	case map[string]any:
		out := map[string]any{}
		for k, e := range v {
			switch k {
			case "prompt_id":
				out[k] = "<prompt_id>"
			case "timestamp":
				out[k] = 0.0
			default:
				out[k] = normalize(e)
			}
		}
		return out
	case []any:
		out := make([]any, len(v))
		for i, e := range v {
			out[i] = normalize(e)
		}
		return out
	}
	return v
}

func sampleMessages(t *testing.T, name string) []any {
	t.Helper()
	var msgs []any
	for _, e := range sample(t, name).([]any) {
		if text, ok := e.(map[string]any)["text"]; ok {
			msgs = append(msgs, text)
		}
	}
	return msgs
}

func TestOriginMatrix(t *testing.T) {
	type row struct {
		name    string
		header  http.Header
		request string // "GET /api/system_stats", "POST /api/prompt" or "WS /ws?..."
		body    string
		want    int
	}
	var rows []row

	var v037 struct {
		Results []struct {
			Case    string            `json:"case"`
			Headers map[string]string `json:"headers"`
			Request string            `json:"request"`
			Status  int               `json:"status"`
		} `json:"results"`
	}
	if err := json.Unmarshal(mustRead("origin_check_matrix.json"), &v037); err != nil {
		t.Fatal(err)
	}
	for _, r := range v037.Results {
		h := http.Header{"Host": {"127.0.0.1:8188"}}
		for k, v := range r.Headers {
			h.Set(k, v)
		}
		// The capture's POST body was not a valid prompt; {} gets a 400 too.
		rows = append(rows, row{"v0.3.7/" + r.Case + "/" + r.Request, h, r.Request, "{}", r.Status})
	}

	var newest map[string]map[string]any
	if err := json.Unmarshal(mustRead("newest_origin_check_matrix.json"), &newest); err != nil {
		t.Fatal(err)
	}
	for name, c := range newest {
		h := http.Header{"Host": {"127.0.0.1:8190"}}
		if hs, ok := c["headers"].(map[string]any); ok {
			for k, v := range hs {
				h.Set(k, v.(string))
			}
		}
		if o, ok := c["origin"].(string); ok {
			h.Set("Origin", o)
			want := 403
			if strings.Contains(c["result"].(string), "101") {
				want = 101
			}
			rows = append(rows, row{"newest/" + name, h, "WS /ws?clientId=origin-test", "", want})
			continue
		}
		rows = append(rows,
			row{"newest/" + name + "/GET", h, "GET /system_stats", "", int(c["GET /system_stats"].(float64))},
			row{"newest/" + name + "/POST", h, "POST /prompt", `{"prompt":{}}`, int(c["POST /prompt {prompt:{}}"].(float64))})
	}

	f := New(t, Options{})
	client := pinnedClient(t, f)
	for _, r := range rows {
		t.Run(r.name, func(t *testing.T) {
			method, p, _ := strings.Cut(r.request, " ")
			u := "http://" + r.header.Get("Host") + p
			var got int
			switch method {
			case "WS":
				c, res, err := websocket.Dial(t.Context(), "ws"+strings.TrimPrefix(u, "http"), &websocket.DialOptions{
					HTTPClient: client,
					HTTPHeader: http.Header{"Origin": r.header["Origin"]},
				})
				if err == nil {
					c.CloseNow()
				}
				if res == nil {
					t.Fatalf("dial: %v", err)
				}
				got = res.StatusCode
			default:
				var body io.Reader
				if method == "POST" {
					body = strings.NewReader(r.body)
				}
				res, b := do(t, client, method, u, body, r.header)
				got = res.StatusCode
				if got == 403 && len(b) != 0 {
					t.Errorf("403 body = %q, want empty", b)
				}
			}
			if got != r.want {
				t.Errorf("status = %d, want %d", got, r.want)
			}
		})
	}
}

func TestOriginOptions(t *testing.T) {
	tests := []struct {
		name   string
		opts   Options
		method string
		header http.Header
		want   int
	}{
		{"options passes", Options{}, "OPTIONS", http.Header{}, 200},
		{"no origin check", Options{NoOriginCheck: true}, "GET", http.Header{"Origin": {"http://evil.example"}}, 200},
		{"origin check", Options{}, "GET", http.Header{"Origin": {"http://evil.example"}}, 403},
		{"cross-site allowed by default", Options{}, "GET", http.Header{"Sec-Fetch-Site": {"cross-site"}}, 200},
		{"cross-site refused", Options{SecFetchSiteCheck: true}, "GET", http.Header{"Sec-Fetch-Site": {"cross-site"}}, 403},
		{"same-site allowed", Options{SecFetchSiteCheck: true}, "GET", http.Header{"Sec-Fetch-Site": {"same-origin"}}, 200},
		{"ipv6 loopback host checked", Options{}, "GET", http.Header{"Host": {"[::1]:8188"}, "Origin": {"http://evil.example"}}, 403},
		{"public host not checked", Options{}, "GET", http.Header{"Host": {"gw.example.com"}, "Origin": {"http://evil.example"}}, 200},
		{"host without port", Options{}, "GET", http.Header{"Host": {"127.0.0.1"}, "Origin": {"http://127.0.0.1:9999"}}, 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := New(t, tt.opts)
			host := tt.header.Get("Host")
			if host == "" {
				host = strings.TrimPrefix(f.URL(), "http://")
			}
			res, _ := do(t, pinnedClient(t, f), tt.method, "http://"+host+"/system_stats", nil, tt.header)
			if res.StatusCode != tt.want {
				t.Errorf("status = %d, want %d", res.StatusCode, tt.want)
			}
			if _, ok := f.LastRequest(); !ok {
				t.Errorf("request was not recorded")
			}
		})
	}
}

func TestSamples(t *testing.T) {
	f := New(t, Options{})
	tests := []struct {
		path, sample string
	}{
		{"/system_stats", "system_stats.json"},
		{"/queue", "queue_idle.json"},
		{"/prompt", "prompt_get_idle.json"},
		{"/object_info/EmptyImage", "object_info_EmptyImage.json"},
		{"/object_info/SaveImage", "object_info_SaveImage.json"},
		{"/embeddings", "embeddings.json"},
		{"/extensions", "extensions.json"},
		{"/features", "newest_features.json"},
		{"/api/features", "newest_features.json"},
	}
	for _, tt := range tests {
		t.Run(tt.path, func(t *testing.T) {
			res, b := get(t, f, tt.path)
			if res.StatusCode != 200 {
				t.Fatalf("status = %d", res.StatusCode)
			}
			if ct := res.Header.Get("Content-Type"); ct != "application/json; charset=utf-8" {
				t.Errorf("Content-Type = %q", ct)
			}
			want := sample(t, tt.sample)
			if diff := cmp.Diff(want, decode(t, b)); diff != "" {
				t.Errorf("(-want +got)\n%s", diff)
			}
		})
	}

	t.Run("version", func(t *testing.T) {
		f := New(t, Options{Version: "0.8.0"})
		_, b := get(t, f, "/system_stats")
		got := decode(t, b).(map[string]any)["system"].(map[string]any)["comfyui_version"]
		if got != "0.8.0" {
			t.Errorf("comfyui_version = %v", got)
		}
	})
	t.Run("history", func(t *testing.T) {
		if _, b := get(t, f, "/history"); string(b) != "{}" {
			t.Errorf("history of a fresh fake = %s", b)
		}
	})
	t.Run("object_info", func(t *testing.T) {
		_, b := get(t, f, "/object_info")
		info := decode(t, b).(map[string]any)
		if len(info) != 243 {
			t.Errorf("got %d classes, want 243", len(info))
		}
		if diff := cmp.Diff(sample(t, "object_info_EmptyImage.json").(map[string]any)["EmptyImage"], info["EmptyImage"]); diff != "" {
			t.Errorf("EmptyImage (-want +got)\n%s", diff)
		}
		_, b = get(t, f, "/object_info/NoSuchNode")
		if string(b) != "{}" {
			t.Errorf("unknown class = %s, want {}", b)
		}
	})
	t.Run("status codes", func(t *testing.T) {
		for p, want := range map[string]int{
			"/history/unknown-id":            200,
			"/models":                        200,
			"/models/checkpoints":            200,
			"/models/nope":                   404,
			"/nope":                          404,
			"/system_stats/":                 404,
			"/api/internal/logs":             404,
			"/internal/logs":                 200,
			"/api/assets/index.js":           404,
			"/assets/index.js":               200,
			"/favicon.ico":                   200,
			"/scripts/api.js":                200,
			"/extensions/core/example.js":    200,
			"/extensions/core/clipspace.js":  200,
			"/extensions/core/missing.js":    404,
			"/view_metadata/checkpoints":     404,
			"/userdata":                      400,
			"/userdata?dir=workflows":        404,
			"/api/userdata/missing%2Fa.json": 404,
		} {
			res, b := get(t, f, p)
			if res.StatusCode != want {
				t.Errorf("GET %s = %d, want %d", p, res.StatusCode, want)
			}
			if p == "/nope" && string(b) != "404: Not Found" {
				t.Errorf("GET /nope body = %q", b)
			}
		}
		res, _ := do(t, nil, "DELETE", f.URL()+"/system_stats", nil, nil)
		if res.StatusCode != 405 {
			t.Errorf("DELETE /system_stats = %d, want 405", res.StatusCode)
		}
	})
}

func TestBusyQueue(t *testing.T) {
	f := New(t, Options{})
	f.SetQueue(1, 1)
	_, b := get(t, f, "/prompt")
	if diff := cmp.Diff(sample(t, "prompt_get_busy.json"), decode(t, b)); diff != "" {
		t.Errorf("GET /prompt (-want +got)\n%s", diff)
	}
	_, b = get(t, f, "/queue")
	var q, want struct {
		Running [][]any `json:"queue_running"`
		Pending [][]any `json:"queue_pending"`
	}
	json.Unmarshal(b, &q)
	json.Unmarshal(mustRead("queue_busy.json"), &want)
	if len(q.Running) != 1 || len(q.Pending) != 1 || len(q.Running[0]) != 5 || len(q.Pending[0]) != 5 {
		t.Fatalf("queue = %s", b)
	}
	if diff := cmp.Diff(want.Running[0][2], q.Running[0][2]); diff != "" {
		t.Errorf("running graph (-want +got)\n%s", diff)
	}

	c := dial(t, f, "busy")
	if got := readText(t, c)["data"].(map[string]any)["status"]; !cmp.Equal(got, execInfoAny(2)) {
		t.Errorf("greeting status = %v", got)
	}

	// Deleting the last pending item broadcasts twice, like ComfyUI.
	id := q.Pending[0][1].(string)
	if res, _ := post(t, f, "/queue", `{"delete":["`+id+`"]}`); res.StatusCode != 200 {
		t.Fatalf("POST /queue = %d", res.StatusCode)
	}
	for range 2 {
		if got := readText(t, c)["data"].(map[string]any)["status"]; !cmp.Equal(got, execInfoAny(1)) {
			t.Errorf("status after delete = %v", got)
		}
	}
	_, b = get(t, f, "/prompt")
	if diff := cmp.Diff(decode(t, mustJSON(execInfo(1))), decode(t, b)); diff != "" {
		t.Errorf("after delete (-want +got)\n%s", diff)
	}
}

func execInfoAny(n int) any {
	return map[string]any{"exec_info": map[string]any{"queue_remaining": float64(n)}}
}

func TestPromptValidation(t *testing.T) {
	withWidth := strings.Replace(string(samplePrompt), `"width":64`, `"width":0`, 1)
	tests := []struct {
		name        string
		contentType string
		body        string
		status      int
		sample      string // expected body, when a sample has it
	}{
		{"unknown node", "application/json", `{"prompt":{"1":{"class_type":"NoSuchNode","inputs":{}}}}`, 400, "prompt_error_unknown_node.json"},
		{"bad value", "application/json", withWidth, 400, "prompt_error_bad_value.json"},
		{"no outputs", "application/json", `{"prompt":{"1":{"class_type":"EmptyImage","inputs":{"width":64,"height":64,"batch_size":1,"color":0}}}}`, 400, "prompt_error_no_outputs.json"},
		{"empty graph", "application/json", `{"prompt":{}}`, 400, "prompt_error_no_outputs.json"},
		{"no prompt", "application/json", `{}`, 400, "newest_prompt_error_empty.json"},
		{"invalid json", "application/json", `{"prompt":`, 500, ""},
		{"text/plain body", "text/plain", string(samplePrompt), 200, ""},
		{"no content type", "", string(samplePrompt), 200, ""},
	}
	f := New(t, Options{})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := http.Header{}
			if tt.contentType != "" {
				h.Set("Content-Type", tt.contentType)
			}
			res, b := do(t, nil, "POST", f.URL()+"/api/prompt", strings.NewReader(tt.body), h)
			if res.StatusCode != tt.status {
				t.Fatalf("status = %d, want %d; body %s", res.StatusCode, tt.status, b)
			}
			if tt.sample != "" {
				if diff := cmp.Diff(sample(t, tt.sample), decode(t, b)); diff != "" {
					t.Errorf("(-want +got)\n%s", diff)
				}
			}
		})
	}

	t.Run("numbers and ids", func(t *testing.T) {
		f := New(t, Options{})
		_, b := post(t, f, "/prompt", string(samplePrompt))
		got := decode(t, b).(map[string]any)
		want := normalize(sample(t, "prompt_response.json"))
		if diff := cmp.Diff(want, normalize(got)); diff != "" {
			t.Errorf("(-want +got)\n%s", diff)
		}
		if id := got["prompt_id"].(string); len(id) != 36 || id[14] != '4' {
			t.Errorf("prompt_id %q is not a uuid4", id)
		}
		// v0.3.7 ignores a prompt_id the client chose.
		body := strings.Replace(string(samplePrompt), `{"prompt"`, `{"prompt_id":"ec63091d-b990-4a3e-9758-0cb052612c95","prompt"`, 1)
		_, b = post(t, f, "/prompt", body)
		if got := decode(t, b).(map[string]any); got["prompt_id"] == "ec63091d-b990-4a3e-9758-0cb052612c95" || got["number"] != 1.0 {
			t.Errorf("client prompt_id on v0.3.7: %s; want a new uuid4", b)
		}
	})

	// server.py takes the number before it looks at the prompt.
	t.Run("refused prompts use a number", func(t *testing.T) {
		f := New(t, Options{})
		post(t, f, "/prompt", `{}`)
		post(t, f, "/prompt", `{"prompt":{"1":{"class_type":"NoSuchNode","inputs":{}}}}`)
		post(t, f, "/prompt", `{"number":7,"prompt":{}}`) // its own number: the counter stays
		_, b := post(t, f, "/prompt", string(samplePrompt))
		if got := decode(t, b).(map[string]any)["number"]; got != 2.0 {
			t.Errorf("number after two refused prompts = %v, want 2", got)
		}
	})

	t.Run("create_time", func(t *testing.T) {
		f := New(t, Options{CreateTime: true})
		_, b := post(t, f, "/prompt", string(samplePrompt))
		id := decode(t, b).(map[string]any)["prompt_id"].(string)
		waitHistory(t, f, id)
		_, b = get(t, f, "/history/"+id)
		var h map[string]struct{ Prompt []json.RawMessage }
		json.Unmarshal(b, &h)
		extra := string(h[id].Prompt[3])
		if !regexp.MustCompile(`^\{"extra_pnginfo":\{"note":"gateway probe"\},"client_id":"test","create_time":1[0-9]{12}\}$`).MatchString(extra) {
			t.Errorf("extra_data = %s", extra)
		}
	})

	// 0.8.0 keeps it, whatever it is: str() of the JSON value.
	t.Run("client prompt_id", func(t *testing.T) {
		f := New(t, Options{PromptIDs: true})
		for i, tt := range []struct{ sent, want string }{
			{`"ec63091d-b990-4a3e-9758-0cb052612c95"`, "ec63091d-b990-4a3e-9758-0cb052612c95"},
			{`"x y/z"`, "x y/z"},
			{`12345`, "12345"},
			{`null`, "None"},
		} {
			_, b := post(t, f, "/prompt", strings.Replace(string(samplePrompt), `{"prompt"`, `{"prompt_id":`+tt.sent+`,"prompt"`, 1))
			want := fmt.Sprintf(`{"prompt_id":%q,"number":%d,"node_errors":{}}`, tt.want, i)
			if diff := cmp.Diff(want, string(b)); diff != "" {
				t.Errorf("prompt_id %s (-want +got)\n%s", tt.sent, diff)
			}
		}
	})
}

// TestLoadImageValidation pins what both real builds answer for a LoadImage
// of a file that is not in the input folder, and that an upload makes it
// valid.
func TestLoadImageValidation(t *testing.T) {
	f := New(t, Options{})
	graph := `{"prompt":{"1":{"class_type":"LoadImage","inputs":{"image":"NAME"}},"2":{"class_type":"SaveImage","inputs":{"images":["1",0],"filename_prefix":"rl"}}}}`
	res, b := post(t, f, "/prompt", strings.Replace(graph, "NAME", "missing.png", 1))
	want := `{"error":{"type":"prompt_outputs_failed_validation","message":"Prompt outputs failed validation","details":"","extra_info":{}},` +
		`"node_errors":{"1":{"errors":[{"type":"custom_validation_failed","message":"Custom validation failed for node","details":"image - Invalid image file: missing.png","extra_info":{"input_name":"image"}}],"dependent_outputs":["2"],"class_type":"LoadImage"}}}`
	if res.StatusCode != 400 {
		t.Errorf("status = %d, want 400", res.StatusCode)
	}
	if diff := cmp.Diff(decode(t, []byte(want)), decode(t, b)); diff != "" {
		t.Errorf("(-want +got)\n%s", diff)
	}

	var body bytes.Buffer
	mw := multipart.NewWriter(&body)
	part, _ := mw.CreateFormFile("image", "here.png")
	part.Write(samplePNG)
	mw.WriteField("subfolder", "sub")
	mw.Close()
	if res, b := do(t, nil, "POST", f.URL()+"/upload/image", &body, http.Header{"Content-Type": {mw.FormDataContentType()}}); res.StatusCode != 200 {
		t.Fatalf("upload = %d %s", res.StatusCode, b)
	}
	for name, want := range map[string]int{"sub/here.png": 200, "sub/here.png [input]": 200, "here.png": 400, "sub/here.png [output]": 400} {
		if res, b := post(t, f, "/prompt", strings.Replace(graph, "NAME", name, 1)); res.StatusCode != want {
			t.Errorf("LoadImage %q = %d %s, want %d", name, res.StatusCode, b, want)
		}
	}
	if res, b := post(t, f, "/prompt", strings.Replace(graph, "NAME", sampleOutputName+" [output]", 1)); res.StatusCode != 200 {
		t.Errorf("LoadImage of an output = %d %s", res.StatusCode, b)
	}
}

// TestRouting pins aiohttp's answers around ComfyUI's routes, as both real
// builds give them: the frontend's static route under "/" takes every GET
// no route took (404), and offers GET and HEAD to every other method (405).
// Answers without a body carry aiohttp's default type.
func TestRouting(t *testing.T) {
	f := New(t, Options{})
	for _, tt := range []struct {
		method, path string
		status       int
		allow        string
	}{
		{"GET", "/interrupt", 404, ""},
		{"GET", "/api/upload/image", 404, ""},
		{"HEAD", "/prompt", 200, ""},
		{"DELETE", "/system_stats", 405, "GET,HEAD"},
		{"PUT", "/prompt", 405, "GET,HEAD,POST"},
		{"PUT", "/api/userdata/a.json", 405, "DELETE,GET,HEAD,POST"},
		{"POST", "/view", 405, "GET,HEAD"},
		{"POST", "/nope", 405, "GET,HEAD"},
	} {
		res, b := do(t, nil, tt.method, f.URL()+tt.path, nil, nil)
		if res.StatusCode != tt.status || res.Header.Get("Allow") != tt.allow {
			t.Errorf("%s %s = %d, Allow %q; want %d, %q", tt.method, tt.path, res.StatusCode, res.Header.Get("Allow"), tt.status, tt.allow)
		}
		if tt.status == 405 && string(b) != "405: Method Not Allowed" {
			t.Errorf("%s %s body = %q", tt.method, tt.path, b)
		}
	}
	for _, tt := range []struct {
		method, path string
		header       http.Header
		status       int
	}{
		{"POST", "/interrupt", nil, 200},
		{"POST", "/api/queue", nil, 500}, // no JSON body: not empty
		{"POST", "/queue", http.Header{"Content-Type": {"application/json"}}, 200},
		{"OPTIONS", "/prompt", nil, 200},
		{"GET", "/view?filename=missing.png", nil, 404},
		{"GET", "/view?filename=../x.png", nil, 400},
		{"POST", "/prompt", http.Header{"Origin": {"http://evil.example"}}, 403},
	} {
		body := io.Reader(nil)
		if tt.path == "/queue" {
			body = strings.NewReader(`{"clear":true}`)
		}
		res, b := do(t, nil, tt.method, f.URL()+tt.path, body, tt.header)
		if res.StatusCode != tt.status {
			t.Errorf("%s %s = %d, want %d", tt.method, tt.path, res.StatusCode, tt.status)
			continue
		}
		if tt.status == 500 {
			continue
		}
		if ct := res.Header.Get("Content-Type"); ct != "application/octet-stream" || len(b) != 0 || res.Header.Get("Content-Length") != "0" {
			t.Errorf("%s %s: Content-Type %q, Content-Length %q, body %q; want an empty octet-stream",
				tt.method, tt.path, ct, res.Header.Get("Content-Length"), b)
		}
	}
}

func TestRun(t *testing.T) {
	f := New(t, Options{})
	c := dial(t, f, "test")
	if err := f.WaitSocket(t.Context(), "test"); err != nil {
		t.Fatal(err)
	}
	greeting := readText(t, c)

	res, b := post(t, f, "/prompt", string(samplePrompt))
	if res.StatusCode != 200 {
		t.Fatalf("POST /prompt = %d %s", res.StatusCode, b)
	}
	id := decode(t, b).(map[string]any)["prompt_id"].(string)

	got := append([]any{greeting}, readRun(t, c)...)
	want := sampleMessages(t, "ws_messages_prompt.json")
	if diff := cmp.Diff(normalize(want), normalize(got)); diff != "" {
		t.Errorf("messages (-want +got)\n%s", diff)
	}
	for _, m := range got {
		if m := m.(map[string]any); m["type"] == "status" {
			continue
		}
		if d := m.(map[string]any)["data"].(map[string]any); d["prompt_id"] != id {
			t.Errorf("message %v has prompt_id %v, want %s", m, d["prompt_id"], id)
		}
	}

	// The history is written before "executing" with node null.
	_, b = get(t, f, "/history/"+id)
	wantHist := decode(t, bytes.ReplaceAll(mustRead("history_prompt.json"),
		[]byte("034bd86a-6f3b-447a-a7d3-2ca21285399c"), []byte(id)))
	if diff := cmp.Diff(normalize(wantHist), normalize(decode(t, b))); diff != "" {
		t.Errorf("history (-want +got)\n%s", diff)
	}
	_, b = get(t, f, "/api/history?max_items=1")
	if diff := cmp.Diff(normalize(wantHist), normalize(decode(t, b))); diff != "" {
		t.Errorf("history?max_items=1 (-want +got)\n%s", diff)
	}
	res, b = get(t, f, "/view?filename=gw_probe_207800_00001_.png&type=output&subfolder=")
	if res.StatusCode != 200 || !bytes.Equal(b, samplePNG) {
		t.Errorf("/view of the output = %d, %d bytes", res.StatusCode, len(b))
	}

	// A second run names the next file, and does not change the first one.
	post(t, f, "/prompt", string(samplePrompt))
	msgs := readRun(t, c)
	executed := msgs[len(msgs)-4].(map[string]any)
	images := executed["data"].(map[string]any)["output"].(map[string]any)["images"].([]any)
	if name := images[0].(map[string]any)["filename"]; name != "gw_probe_207800_00002_.png" {
		t.Errorf("second output = %v", name)
	}
	_, b = get(t, f, "/history")
	if n := len(decode(t, b).(map[string]any)); n != 2 {
		t.Errorf("history has %d entries, want 2", n)
	}
	if res, _ := post(t, f, "/history", `{"clear":true}`); res.StatusCode != 200 {
		t.Errorf("POST /history = %d", res.StatusCode)
	}
	if _, b = get(t, f, "/history"); string(b) != "{}" {
		t.Errorf("history after clear = %s", b)
	}
}

func TestCachedRun(t *testing.T) {
	f := New(t, Options{Cache: true})
	c := dial(t, f, "test")
	readText(t, c)
	post(t, f, "/prompt", string(samplePrompt))
	readRun(t, c)
	post(t, f, "/prompt", string(samplePrompt))
	got := readRun(t, c)
	want := sampleMessages(t, "ws_messages_cached_prompt.json")
	if diff := cmp.Diff(normalize(want), normalize(got)); diff != "" {
		t.Errorf("cached run (-want +got)\n%s", diff)
	}
}

func TestPreviewFrames(t *testing.T) {
	for _, metadata := range []bool{false, true} {
		t.Run(fmt.Sprintf("metadata=%v", metadata), func(t *testing.T) {
			f := New(t, Options{PreviewFrames: 2})
			c := dial(t, f, "test")
			readText(t, c)
			if metadata {
				c.Write(t.Context(), websocket.MessageText, []byte(`{"type":"feature_flags","data":{"supports_preview_metadata":true}}`))
				if m := readText(t, c); m["type"] != "feature_flags" {
					t.Fatalf("got %v, want feature_flags", m)
				}
			}
			post(t, f, "/prompt", string(samplePrompt))
			var kinds []string
			for {
				fr := read(t, c)
				if fr.binary {
					kinds = append(kinds, "binary")
					typ := binary.BigEndian.Uint32(fr.data)
					var png []byte
					switch {
					case !metadata && typ == 1:
						if format := binary.BigEndian.Uint32(fr.data[4:]); format != 2 {
							t.Errorf("format = %d, want 2 (PNG)", format)
						}
						png = fr.data[8:]
					case metadata && typ == 4:
						n := binary.BigEndian.Uint32(fr.data[4:])
						meta := decode(t, fr.data[8:8+n]).(map[string]any)
						if meta["node_id"] != "3" || meta["image_type"] != "image/png" {
							t.Errorf("metadata = %v", meta)
						}
						png = fr.data[8+n:]
					default:
						t.Fatalf("frame type %d, metadata %v", typ, metadata)
					}
					if !bytes.Equal(png, samplePNG) {
						t.Errorf("preview is not the sample PNG")
					}
					continue
				}
				m := decode(t, fr.data).(map[string]any)
				d := m["data"].(map[string]any)
				kinds = append(kinds, fmt.Sprintf("%s %v", m["type"], d["node"]))
				if m["type"] == "executing" && d["node"] == nil {
					break
				}
			}
			want := []string{
				"status <nil>", "status <nil>", "execution_start <nil>", "execution_cached <nil>",
				"executing 1", "executing 2", "executing 3", "binary", "binary", "executed 3",
				"execution_success <nil>", "status <nil>", "executing <nil>",
			}
			if diff := cmp.Diff(want, kinds); diff != "" {
				t.Errorf("(-want +got)\n%s", diff)
			}
		})
	}
}

func TestFeatureFlags(t *testing.T) {
	f := New(t, Options{})
	flags := `{"type":"feature_flags","data":{"supports_preview_metadata":true,"gateway_probe":"1"}}`

	t.Run("first message", func(t *testing.T) {
		c := dial(t, f, "test")
		var got []any
		got = append(got, readText(t, c))
		c.Write(t.Context(), websocket.MessageText, []byte(flags))
		got = append(got, readText(t, c))
		want := sampleMessages(t, "newest_ws_feature_flags_first_message.json")
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("(-want +got)\n%s", diff)
		}
	})

	t.Run("later message ignored", func(t *testing.T) {
		c := dial(t, f, "test-ff-late")
		want := sampleMessages(t, "newest_ws_feature_flags_second_message_ignored.json")
		if diff := cmp.Diff(want[0], any(readText(t, c))); diff != "" {
			t.Errorf("greeting (-want +got)\n%s", diff)
		}
		c.Write(t.Context(), websocket.MessageText, []byte(`{"type":"hello","data":{}}`))
		c.Write(t.Context(), websocket.MessageText, []byte(flags))
		c.Write(t.Context(), websocket.MessageBinary, []byte{1, 2, 3})
		// Wait until the fake has read all three, then check that a
		// marker is the next thing on the socket: no reply came.
		deadline := time.Now().Add(5 * time.Second)
		for len(f.Received("test-ff-late")) < 3 && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		wantRecv := []WSMessage{
			{false, []byte(`{"type":"hello","data":{}}`)},
			{false, []byte(flags)},
			{true, []byte{1, 2, 3}},
		}
		if diff := cmp.Diff(wantRecv, f.Received("test-ff-late")); diff != "" {
			t.Errorf("Received (-want +got)\n%s", diff)
		}
		if err := f.Send("test-ff-late", false, []byte(`{"type":"marker","data":{}}`)); err != nil {
			t.Fatal(err)
		}
		if m := readText(t, c); m["type"] != "marker" {
			t.Errorf("got %v, want the marker", m)
		}
	})

	t.Run("no clientId", func(t *testing.T) {
		c := dial(t, f, "")
		m := readText(t, c)
		sid, _ := m["data"].(map[string]any)["sid"].(string)
		if _, err := hex.DecodeString(sid); err != nil || len(sid) != 32 {
			t.Errorf("sid = %q, want 32 hex digits", sid)
		}
		if !cmp.Equal(normalizeSid(sample(t, "ws_first_message_no_clientid.json")), normalizeSid(m)) {
			t.Errorf("greeting = %v", m)
		}
	})
}

func normalizeSid(v any) any {
	m := v.(map[string]any)
	d := m["data"].(map[string]any)
	return map[string]any{"type": m["type"], "status": d["status"], "has_sid": d["sid"] != nil}
}

func TestObserver(t *testing.T) {
	f := New(t, Options{})
	runner := dial(t, f, "runner")
	observer := dial(t, f, "observer")
	readText(t, runner)
	readText(t, observer)
	want := sample(t, "ws_observer_other_clients.json").(map[string]any)

	for _, tc := range []struct{ name, clientID string }{{"other_client", "runner"}, {"no_client_id", ""}} {
		t.Run(tc.name, func(t *testing.T) {
			body := strings.Replace(string(samplePrompt), `"client_id":"test"`, `"client_id":"`+tc.clientID+`"`, 1)
			if tc.clientID == "" {
				body = strings.Replace(string(samplePrompt), `,"client_id":"test"`, "", 1)
			}
			_, b := post(t, f, "/prompt", body)
			id := decode(t, b).(map[string]any)["prompt_id"].(string)
			var got []any
			for range 3 {
				got = append(got, readText(t, observer))
			}
			// Nothing else may follow: the next message is a marker.
			waitHistory(t, f, id)
			f.Send("observer", false, []byte(`{"type":"marker","data":{}}`))
			if m := readText(t, observer); m["type"] != "marker" {
				t.Errorf("observer got %v after the run", m)
			}
			wantMsgs := want[tc.name].(map[string]any)["observer_received"]
			if diff := cmp.Diff(wantMsgs, any(got)); diff != "" {
				t.Errorf("(-want +got)\n%s", diff)
			}
			if tc.clientID == "runner" {
				readRun(t, runner)
			} else {
				for range 3 {
					if m := readText(t, runner); m["type"] != "status" {
						t.Errorf("runner got %v for a prompt without client_id", m)
					}
				}
			}
		})
	}
}

func waitHistory(t *testing.T, f *Fake, id string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if _, b := get(t, f, "/history/"+id); string(b) != "{}" {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("prompt %s did not finish", id)
}

func TestInterrupt(t *testing.T) {
	f := New(t, Options{})
	f.SetNodeDelay(100 * time.Millisecond)
	c := dial(t, f, "test")
	readText(t, c)
	_, b := post(t, f, "/prompt", string(samplePrompt))
	id := decode(t, b).(map[string]any)["prompt_id"].(string)
	var types []string
	for {
		m := readText(t, c)
		types = append(types, m["type"].(string))
		d := m["data"].(map[string]any)
		if m["type"] == "executing" && d["node"] == "1" {
			if res, _ := post(t, f, "/interrupt", ""); res.StatusCode != 200 {
				t.Errorf("POST /interrupt = %d", res.StatusCode)
			}
		}
		if m["type"] == "execution_interrupted" {
			if d["node_id"] != "2" || d["node_type"] != "ImageInvert" || !cmp.Equal(d["executed"], []any{"1"}) {
				t.Errorf("execution_interrupted = %v", d)
			}
		}
		if m["type"] == "executing" && d["node"] == nil {
			break
		}
	}
	want := []string{"status", "status", "execution_start", "execution_cached", "executing", "executing",
		"execution_interrupted", "status", "executing"}
	if diff := cmp.Diff(want, types); diff != "" {
		t.Errorf("(-want +got)\n%s", diff)
	}
	_, b = get(t, f, "/history/"+id)
	status := decode(t, b).(map[string]any)[id].(map[string]any)["status"].(map[string]any)
	if status["status_str"] != "error" || status["completed"] != false {
		t.Errorf("status = %v", status)
	}
}

func TestView(t *testing.T) {
	f := New(t, Options{})
	u := f.URL() + "/view?filename=" + sampleOutputName + "&type=output&subfolder="

	res, b := do(t, nil, "GET", u, nil, nil)
	if res.StatusCode != 200 || !bytes.Equal(b, samplePNG) {
		t.Fatalf("GET = %d, %d bytes", res.StatusCode, len(b))
	}
	for k, want := range map[string]string{
		"Content-Type":           "image/png",
		"Content-Disposition":    `filename="gw_probe_207800_00001_.png"`,
		"X-Content-Type-Options": "", // neither v0.3.7 nor 0.8.0 sends nosniff
		"Content-Length":         "485",
	} {
		if got := res.Header.Get(k); got != want {
			t.Errorf("%s = %q, want %q", k, got, want)
		}
	}

	res, b = do(t, nil, "GET", u, nil, http.Header{"Range": {"bytes=1-3"}})
	if res.StatusCode != 206 || string(b) != "PNG" || res.Header.Get("Content-Range") != "bytes 1-3/485" {
		t.Errorf("Range: %d %q %q", res.StatusCode, b, res.Header.Get("Content-Range"))
	}
	etag, lastMod := res.Header.Get("ETag"), res.Header.Get("Last-Modified")
	res, _ = do(t, nil, "GET", u, nil, http.Header{"If-None-Match": {etag}})
	if res.StatusCode != 304 {
		t.Errorf("If-None-Match: %d, want 304", res.StatusCode)
	}
	res, _ = do(t, nil, "GET", u, nil, http.Header{"If-Modified-Since": {lastMod}})
	if res.StatusCode != 304 {
		t.Errorf("If-Modified-Since: %d, want 304", res.StatusCode)
	}

	for q, want := range map[string]int{
		"":                               404,
		"?type=output":                   404,
		"?filename=":                     400,
		"?filename=../etc/passwd":        400,
		"?filename=/etc/passwd":          400,
		"?filename=a.png&type=models":    400,
		"?filename=a.png&subfolder=../x": 403,
		"?filename=missing.png":          404,
		"?filename=" + sampleOutputName + "%20[output]&type=temp": 200,
	} {
		if res, _ := get(t, f, "/view"+q); res.StatusCode != want {
			t.Errorf("/view%s = %d, want %d", q, res.StatusCode, want)
		}
	}
}

// patternFile is a large file that holds nothing in memory: byte i is i%251.
type patternFile struct{ size, off int64 }

func (p *patternFile) Read(b []byte) (int, error) {
	if p.off >= p.size {
		return 0, io.EOF
	}
	n := int(min(int64(len(b)), p.size-p.off))
	for i := range n {
		b[i] = byte((p.off + int64(i)) % 251)
	}
	p.off += int64(n)
	return n, nil
}

func (p *patternFile) Seek(off int64, whence int) (int64, error) {
	switch whence {
	case io.SeekStart:
	case io.SeekCurrent:
		off += p.off
	case io.SeekEnd:
		off += p.size
	}
	p.off = off
	return off, nil
}

func TestViewLargeFile(t *testing.T) {
	f := New(t, Options{})
	const size = 2 << 30
	f.AddFile("output", "big", "video.mp4", &patternFile{size: size}, time.Unix(1700000000, 0))
	res, b := do(t, nil, "GET", f.URL()+"/api/view?filename=video.mp4&subfolder=big", nil,
		http.Header{"Range": {fmt.Sprintf("bytes=%d-", size-4)}})
	want := []byte{byte((size - 4) % 251), byte((size - 3) % 251), byte((size - 2) % 251), byte((size - 1) % 251)}
	if res.StatusCode != 206 || !bytes.Equal(b, want) || res.Header.Get("Content-Type") != "video/mp4" {
		t.Errorf("got %d %v %q", res.StatusCode, b, res.Header.Get("Content-Type"))
	}
}

func TestUpload(t *testing.T) {
	f := New(t, Options{})

	// upload streams a multipart body with an image part of n bytes and
	// returns the status, the answer and the SHA-256 of the whole body.
	upload := func(name string, content io.Reader, fields map[string]string) (int, []byte, string) {
		pr, pw := io.Pipe()
		mw := multipart.NewWriter(pw)
		h := sha256.New()
		go func() {
			for k, v := range fields {
				mw.WriteField(k, v)
			}
			if name != "" {
				part, _ := mw.CreateFormFile("image", name)
				io.Copy(part, content)
			}
			pw.CloseWithError(mw.Close())
		}()
		res, b := do(t, nil, "POST", f.URL()+"/upload/image", io.TeeReader(pr, h),
			http.Header{"Content-Type": {mw.FormDataContentType()}})
		return res.StatusCode, b, hex.EncodeToString(h.Sum(nil))
	}

	big := io.LimitReader(&patternFile{size: 1 << 62}, 20<<20)
	status, b, sum := upload("big.bin", big, map[string]string{"subfolder": ""})
	if status != 200 {
		t.Fatalf("status = %d %s", status, b)
	}
	if diff := cmp.Diff(`{"name":"big.bin","subfolder":"","type":"input"}`, string(b)); diff != "" {
		t.Errorf("(-want +got)\n%s", diff)
	}
	rec, _ := f.LastRequest()
	if rec.BodySize <= 20<<20 || rec.BodySHA256 != sum || len(rec.Body) != MaxRecordedBody {
		t.Errorf("recorded size %d, sha %s, head %d; want sha %s", rec.BodySize, rec.BodySHA256, len(rec.Body), sum)
	}

	status, b, _ = upload("gw_upload.png", bytes.NewReader(samplePNG), nil)
	if status != 200 {
		t.Fatalf("status = %d", status)
	}
	if diff := cmp.Diff(sample(t, "upload_image_response.json"), decode(t, b)); diff != "" {
		t.Errorf("(-want +got)\n%s", diff)
	}
	if res, b := get(t, f, "/view?filename=gw_upload.png&type=input"); res.StatusCode != 200 || !bytes.Equal(b, samplePNG) {
		t.Errorf("/view of the upload = %d", res.StatusCode)
	}
	// Same content keeps the name, other content gets a new one.
	if _, b, _ = upload("gw_upload.png", bytes.NewReader(samplePNG), nil); !strings.Contains(string(b), `"gw_upload.png"`) {
		t.Errorf("identical upload renamed: %s", b)
	}
	if _, b, _ = upload("gw_upload.png", strings.NewReader("other"), nil); !strings.Contains(string(b), `"gw_upload (1).png"`) {
		t.Errorf("different upload: %s", b)
	}
	if status, _, _ = upload("", nil, map[string]string{"type": "input"}); status != 400 {
		t.Errorf("no image part: %d, want 400", status)
	}
}

func TestAPITwins(t *testing.T) {
	f := New(t, Options{})
	for _, p := range []string{
		"/system_stats", "/queue", "/prompt", "/history", "/history/x", "/object_info/EmptyImage",
		"/embeddings", "/extensions", "/features", "/models", "/models/nope", "/settings",
		"/view?filename=" + sampleOutputName, "/view", "/nope",
	} {
		r1, b1 := get(t, f, p)
		r2, b2 := get(t, f, "/api"+p)
		if r1.StatusCode != r2.StatusCode || !bytes.Equal(b1, b2) {
			t.Errorf("%s: %d %q != /api: %d %q", p, r1.StatusCode, b1, r2.StatusCode, b2)
		}
	}
	for _, p := range []string{"/", "/api/"} {
		res, b := get(t, f, p)
		if res.StatusCode != 200 || !strings.Contains(string(b), "ComfyUI simulator") ||
			res.Header.Get("Cache-Control") != "no-cache" || res.Header.Get("Pragma") != "no-cache" ||
			res.Header.Get("Expires") != "0" || res.Header.Get("Content-Type") != "text/html" || res.Header.Get("Last-Modified") == "" {
			t.Errorf("GET %s = %d %v", p, res.StatusCode, res.Header)
		}
	}
	c, _, err := websocket.Dial(t.Context(), "ws"+strings.TrimPrefix(f.URL(), "http")+"/api/ws?clientId=twin", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseNow()
	if m := readText(t, c); m["data"].(map[string]any)["sid"] != "twin" {
		t.Errorf("greeting = %v", m)
	}
}

func TestUserdata(t *testing.T) {
	f := New(t, Options{})
	u := f.URL() + "/api/userdata/workflows%2Fa.json"
	res, b := do(t, nil, "POST", u, strings.NewReader(`{"nodes":[]}`), nil)
	if res.StatusCode != 200 || string(b) != `"workflows/a.json"` {
		t.Fatalf("POST = %d %s", res.StatusCode, b)
	}
	rec, _ := f.LastRequest()
	if rec.RawPath != "/api/userdata/workflows%2Fa.json" || rec.Path != "/api/userdata/workflows/a.json" {
		t.Errorf("recorded paths %q %q", rec.RawPath, rec.Path)
	}
	if res, _ := do(t, nil, "POST", u+"?overwrite=false", strings.NewReader("x"), nil); res.StatusCode != 409 {
		t.Errorf("POST without overwrite = %d, want 409", res.StatusCode)
	}
	if _, b := get(t, f, "/userdata?dir=workflows"); string(b) != `["a.json"]` {
		t.Errorf("list = %s", b)
	}
	if _, b := do(t, nil, "GET", u, nil, nil); string(b) != `{"nodes":[]}` {
		t.Errorf("GET = %s", b)
	}
	if res, _ := do(t, nil, "GET", f.URL()+"/api/userdata/workflows/a.json", nil, nil); res.StatusCode != 404 {
		t.Errorf("unescaped slash = %d, want 404 (two segments)", res.StatusCode)
	}
	if res, _ := do(t, nil, "DELETE", u, nil, nil); res.StatusCode != 204 {
		t.Errorf("DELETE = %d", res.StatusCode)
	}
	if res, _ := do(t, nil, "GET", u, nil, nil); res.StatusCode != 404 {
		t.Errorf("GET after DELETE = %d", res.StatusCode)
	}
}

func TestKnobs(t *testing.T) {
	f := New(t, Options{})
	f.SetResponse("/system_stats", 502, "text/plain", []byte("garbage"))
	for _, p := range []string{"/system_stats", "/api/system_stats"} {
		if res, b := get(t, f, p); res.StatusCode != 502 || string(b) != "garbage" {
			t.Errorf("%s = %d %q", p, res.StatusCode, b)
		}
	}
	f.SetDelay("/history/{prompt_id}", 100*time.Millisecond)
	start := time.Now()
	get(t, f, "/api/history/x")
	if d := time.Since(start); d < 100*time.Millisecond {
		t.Errorf("delayed answer took %v", d)
	}
	f.ClearOverrides()
	if res, _ := get(t, f, "/system_stats"); res.StatusCode != 200 {
		t.Errorf("after ClearOverrides = %d", res.StatusCode)
	}

	f.Reset()
	do(t, nil, "POST", f.URL()+"/interrupt?x=1", strings.NewReader("not json"), http.Header{"X-Test": {"yes"}})
	reqs := f.Requests()
	if len(reqs) != 1 {
		t.Fatalf("got %d requests", len(reqs))
	}
	r := reqs[0]
	sum := sha256.Sum256([]byte("not json"))
	if r.Method != "POST" || r.Path != "/interrupt" || r.RawQuery != "x=1" || r.RequestURI != "/interrupt?x=1" ||
		r.Header.Get("X-Test") != "yes" || string(r.Body) != "not json" || r.BodySize != 8 ||
		r.BodySHA256 != hex.EncodeToString(sum[:]) || r.WebSocket || r.RemoteAddr == "" {
		t.Errorf("recorded %+v", r)
	}

	c := dial(t, f, "knob")
	readText(t, c)
	if diff := cmp.Diff([]string{"knob"}, f.Sockets()); diff != "" {
		t.Errorf("Sockets (-want +got)\n%s", diff)
	}
	if r, _ := f.LastRequest(); !r.WebSocket {
		t.Errorf("upgrade not recorded as WebSocket: %+v", r)
	}
	if err := f.Send("nobody", false, nil); err == nil {
		t.Errorf("Send to an unknown socket succeeded")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	if err := f.WaitSocket(ctx, "nobody"); err == nil {
		t.Errorf("WaitSocket for an absent socket succeeded")
	}
}

func TestCloseClosesSockets(t *testing.T) {
	f := New(t, Options{})
	c := dial(t, f, "bye")
	readText(t, c)
	done := make(chan error, 1)
	go func() {
		_, _, err := c.Read(context.Background())
		done <- err
	}()
	f.Close()
	f.Close() // idempotent
	select {
	case err := <-done:
		if s := websocket.CloseStatus(err); s != websocket.StatusGoingAway {
			t.Errorf("close status = %v (%v), want 1001", s, err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("socket still open after Close")
	}
}

// TestProgressState pins the progress_state messages of 0.8.0, captured
// from the real server for the sample workflow: each node is listed
// "running" before its "executing" and "finished" after it (and after its
// "executed"), with every node that started before it.
func TestProgressState(t *testing.T) {
	f := New(t, Options{ProgressState: true, Cache: true})
	c := dial(t, f, "test")
	readText(t, c)
	_, b := post(t, f, "/prompt", string(samplePrompt))
	id := decode(t, b).(map[string]any)["prompt_id"].(string)
	msgs := readRun(t, c)
	want := []string{
		"status", "status", "execution_start", "execution_cached",
		"progress_state 1:running", "executing 1",
		"progress_state 1:finished", "progress_state 1:finished 2:running", "executing 2",
		"progress_state 1:finished 2:finished", "progress_state 1:finished 2:finished 3:running", "executing 3", "executed 3",
		"progress_state 1:finished 2:finished 3:finished", "execution_success", "status", "executing null",
	}
	if diff := cmp.Diff(want, summarizeProgress(msgs)); diff != "" {
		t.Errorf("(-want +got)\n%s", diff)
	}
	first := `{"type":"progress_state","data":{"prompt_id":"ID","nodes":{"1":{"value":0.0,"max":1.0,"state":"running",` +
		`"node_id":"1","prompt_id":"ID","display_node_id":"1","parent_node_id":null,"real_node_id":"1"}}}}`
	if diff := cmp.Diff(decode(t, []byte(strings.ReplaceAll(first, "ID", id))), msgs[4]); diff != "" {
		t.Errorf("first progress_state (-want +got)\n%s", diff)
	}

	// A fully cached run lists only the output node, after its "executed".
	post(t, f, "/prompt", string(samplePrompt))
	want = []string{"status", "status", "execution_start", "execution_cached", "executed 3",
		"progress_state 3:finished", "execution_success", "status", "executing null"}
	if diff := cmp.Diff(want, summarizeProgress(readRun(t, c))); diff != "" {
		t.Errorf("cached run (-want +got)\n%s", diff)
	}

	// Without a client_id, 0.8.0 sends them to every socket.
	_, b = post(t, f, "/prompt", strings.Replace(strings.Replace(string(samplePrompt), `,"client_id":"test"`, "", 1), `"width":64`, `"width":65`, 1))
	id = decode(t, b).(map[string]any)["prompt_id"].(string)
	// This socket's messages end with the status of the emptied queue.
	var got []string
	for {
		m := readText(t, c)
		got = append(got, summarizeProgress([]any{m})...)
		if m["type"] == "status" && cmp.Equal(m["data"].(map[string]any)["status"], execInfoAny(0)) {
			break
		}
	}
	waitHistory(t, f, id)
	if !slices.Contains(got, "progress_state 1:finished 2:finished 3:finished") {
		t.Errorf("a socket of another client saw %v; want the progress_state broadcasts", got)
	}
}

func summarizeProgress(msgs []any) []string {
	var out []string
	for _, m := range msgs {
		m := m.(map[string]any)
		d := m["data"].(map[string]any)
		s := m["type"].(string)
		switch s {
		case "executing", "executed":
			if d["node"] == nil {
				s += " null"
			} else {
				s += " " + d["node"].(string)
			}
		case "progress_state":
			nodes := d["nodes"].(map[string]any)
			var ids []string
			for id := range nodes {
				ids = append(ids, id)
			}
			slices.Sort(ids)
			for _, id := range ids {
				s += " " + id + ":" + nodes[id].(map[string]any)["state"].(string)
			}
		}
		out = append(out, s)
	}
	return out
}

// TestInterruptPromptID: v0.3.7 ignores the body of POST /interrupt; with
// PromptIDs, as 0.8.0, an interrupt for another prompt changes nothing.
func TestInterruptPromptID(t *testing.T) {
	for _, tt := range []struct {
		opts        Options
		interrupted bool
	}{
		{Options{}, true},
		{Options{PromptIDs: true}, false},
	} {
		t.Run(fmt.Sprintf("PromptIDs=%v", tt.opts.PromptIDs), func(t *testing.T) {
			f := New(t, tt.opts)
			f.SetNodeDelay(20 * time.Millisecond)
			c := dial(t, f, "test")
			readText(t, c)
			post(t, f, "/prompt", string(samplePrompt))
			sent, interrupted := false, false
			for {
				m := readText(t, c)
				d := m["data"].(map[string]any)
				if m["type"] == "executing" && d["node"] == "1" && !sent {
					sent = true
					post(t, f, "/interrupt", `{"prompt_id":"`+uuid4()+`"}`)
				}
				if m["type"] == "execution_interrupted" {
					interrupted = true
				}
				if m["type"] == "executing" && d["node"] == nil {
					break
				}
			}
			if interrupted != tt.interrupted {
				t.Errorf("interrupted = %v, want %v", interrupted, tt.interrupted)
			}
		})
	}
}
