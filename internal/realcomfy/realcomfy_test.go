package realcomfy_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"io"
	"log/slog"
	"math/big"
	"mime/multipart"
	"net"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/google/go-cmp/cmp"
	"go.uber.org/goleak"

	"github.com/comfygate/comfygate/internal/config"
	"github.com/comfygate/comfygate/internal/realcomfy"
	"github.com/comfygate/comfygate/internal/server"
	"github.com/comfygate/comfygate/internal/session"
)

// shared holds one real ComfyUI per version for the whole test binary:
// each takes 4 to 8 seconds to start.
var shared realcomfy.Shared

func TestMain(m *testing.M) {
	code := m.Run()
	if err := shared.Close(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		code = 1
	}
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

// TestGateway runs the flows of API clients and of the web UI through
// comfygate in front of each real ComfyUI version. The versions run in
// parallel; the flows of one version run one after another, since an
// interrupt stops whatever that server is running.
func TestGateway(t *testing.T) {
	flows := []struct {
		name string
		run  func(t *testing.T, g *gateway)
	}{
		{"health", testHealth},
		{"key required", testKeyRequired},
		{"prompt over the socket", testPrompt},
		{"upload then LoadImage", testUpload},
		{"interrupt", testInterrupt},
		{"login session", testLogin},
		{"ComfyUI's origin check", testOriginCheck},
		{"web UI page", testWebUI},
	}
	for _, v := range realcomfy.Versions() {
		t.Run(string(v), func(t *testing.T) {
			t.Parallel()
			g := startGateway(t, shared.Get(t, v))
			for _, f := range flows {
				t.Run(f.name, func(t *testing.T) { f.run(t, g) })
			}
		})
	}
}

// testHealth: /health reads the real /system_stats and /queue.
func testHealth(t *testing.T, g *gateway) {
	resp, body := g.do(t, "GET", "/health", nil)
	var rep struct {
		Status, Version, Device string
		Queue                   *struct{ Pending, Running int }
	}
	if err := json.Unmarshal(body, &rep); err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET /health: %d %s", resp.StatusCode, body)
	}
	want := struct{ Status, Version, Device string }{"healthy", g.comfy.Version.ReportedVersion(), "cpu"}
	if diff := cmp.Diff(want, struct{ Status, Version, Device string }{rep.Status, rep.Version, rep.Device}); diff != "" {
		t.Errorf("/health (-want +got)\n%s", diff)
	}
	if rep.Queue == nil {
		t.Errorf("/health has no queue: %s", body)
	}
}

// testKeyRequired: without a valid key nothing reaches ComfyUI.
func testKeyRequired(t *testing.T, g *gateway) {
	marker := "rc_nokey_" + randomHex(4)
	body := promptBody(saveGraph(64, 64, randomColor(), marker), "")
	for _, tt := range []struct {
		name   string
		header []string
		wantWA string // WWW-Authenticate
	}{
		{"no key", nil, `Bearer realm="comfygate"`},
		{"wrong key", []string{"Authorization", "Bearer cg_wrong_" + randomHex(16)}, `Bearer realm="comfygate", error="invalid_token"`},
	} {
		resp, b := g.do(t, "POST", "/prompt", strings.NewReader(body), append([]string{"Content-Type", "application/json"}, tt.header...)...)
		if resp.StatusCode != 401 || resp.Header.Get("WWW-Authenticate") != tt.wantWA || !strings.Contains(string(b), `"unauthorized"`) {
			t.Errorf("%s: POST /prompt = %d %q %s", tt.name, resp.StatusCode, resp.Header.Get("WWW-Authenticate"), b)
		}
	}
	for _, p := range []string{"/queue", "/history", "/view?filename=x.png", "/api/object_info/EmptyImage"} {
		if resp, _ := g.do(t, "GET", p, nil); resp.StatusCode != 401 {
			t.Errorf("GET %s without a key = %d, want 401", p, resp.StatusCode)
		}
	}
	if _, resp, err := websocket.Dial(t.Context(), g.wsURL("nokey"), nil); err == nil || resp == nil || resp.StatusCode != 401 {
		t.Errorf("WebSocket without a key (--protect-ws): %v %v", resp, err)
	}
	// POST /prompt is synchronous in ComfyUI: a prompt that got through
	// would already be in its queue or history.
	for _, p := range []string{"/queue", "/history"} {
		if b := g.direct(t, p); strings.Contains(string(b), marker) {
			t.Errorf("ComfyUI's %s holds the refused prompt: %s", p, b)
		}
	}
}

// testPrompt is the standard API flow (ComfyUI's websockets_api_example.py)
// with a key: socket, POST /prompt, messages up to "executing" with node
// null, /history, /view.
func testPrompt(t *testing.T, g *gateway) {
	clientID := "rc-" + randomHex(8)
	ws := g.dial(t, clientID, g.keyHeader())
	greeting := readMessage(t, ws)
	if greeting.Type != "status" || greeting.Data["sid"] != clientID {
		t.Fatalf("first message = %s, want status with sid %q", greeting.raw, clientID)
	}

	col := randomColor() // a new color each time: nothing is cached
	prefix := "rc_prompt_" + randomHex(4)
	resp, b := g.do(t, "POST", "/prompt", strings.NewReader(promptBody(saveGraph(64, 64, col, prefix), clientID)),
		g.key("Content-Type", "application/json")...)
	if resp.StatusCode != 200 {
		t.Fatalf("POST /prompt = %d %s", resp.StatusCode, b)
	}
	var queued struct {
		PromptID   string          `json:"prompt_id"`
		Number     *int            `json:"number"`
		NodeErrors json.RawMessage `json:"node_errors"`
	}
	if err := json.Unmarshal(b, &queued); err != nil || !uuidRE.MatchString(queued.PromptID) || queued.Number == nil || string(queued.NodeErrors) != "{}" {
		t.Fatalf("POST /prompt answer %s", b)
	}

	msgs := readRun(t, ws, queued.PromptID)
	// The order of the sample ws_messages_prompt.json, which 0.8.0 keeps
	// while adding progress_state messages.
	want := []string{
		"status 1", "status 1", "execution_start", "execution_cached []",
		"executing 1", "executing 2", "executed 2", "execution_success",
		"status 0", "executing null",
	}
	if diff := cmp.Diff(want, summarize(msgs, false)); diff != "" {
		t.Errorf("message order (-want +got)\n%s", diff)
	}
	if g.comfy.Version == realcomfy.V080 && !slices.Contains(summarize(msgs, true), "progress_state") {
		t.Errorf("0.8.0 sent no progress_state: %v", summarize(msgs, true))
	}
	var executed json.RawMessage
	for _, m := range msgs {
		if m.Type == "executed" {
			executed = m.rawData["output"]
		}
	}

	// "executing" with node null comes after the history is written.
	entry := g.history(t, queued.PromptID)
	if entry.Status.StatusStr != "success" || !entry.Status.Completed {
		t.Errorf("history status = %+v", entry.Status)
	}
	if diff := cmp.Diff(decodeAny(t, executed), decodeAny(t, entry.Outputs["2"])); diff != "" {
		t.Errorf("history outputs vs executed message (-executed +history)\n%s", diff)
	}
	var extra struct {
		ClientID string `json:"client_id"`
	}
	if len(entry.Prompt) != 5 || json.Unmarshal(entry.Prompt[3], &extra) != nil || extra.ClientID != clientID {
		t.Errorf("history prompt = %s; want extra_data with client_id %q", entry.Prompt, clientID)
	}

	img := entry.image(t, "2")
	if img.Type != "output" || img.Subfolder != "" || !strings.HasPrefix(img.Filename, prefix+"_") {
		t.Errorf("output image %+v; want %s_*.png in output", img, prefix)
	}
	checkPNG(t, g.view(t, img), 64, 64, col)

	// Range requests reach aiohttp's FileResponse.
	resp, b = g.do(t, "GET", "/view?"+img.query(), nil, g.key("Range", "bytes=1-3")...)
	if resp.StatusCode != 206 || string(b) != "PNG" || !strings.HasPrefix(resp.Header.Get("Content-Range"), "bytes 1-3/") {
		t.Errorf("Range on /view: %d %q %q", resp.StatusCode, b, resp.Header.Get("Content-Range"))
	}
}

// testUpload uploads a PNG and runs LoadImage on it.
func testUpload(t *testing.T, g *gateway) {
	col := randomColor()
	upload := solidPNG(t, 16, 8, col)
	name := "rc_upload_" + randomHex(4) + ".png"

	var body bytes.Buffer
	mw := multipart.NewWriter(&body)
	part, _ := mw.CreateFormFile("image", name)
	part.Write(upload)
	mw.WriteField("type", "input")
	mw.Close()
	resp, b := g.do(t, "POST", "/upload/image", &body, g.key("Content-Type", mw.FormDataContentType())...)
	if resp.StatusCode != 200 {
		t.Fatalf("POST /upload/image = %d %s", resp.StatusCode, b)
	}
	var got map[string]any
	json.Unmarshal(b, &got)
	if diff := cmp.Diff(map[string]any{"name": name, "subfolder": "", "type": "input"}, got); diff != "" {
		t.Errorf("upload answer (-want +got)\n%s", diff)
	}
	if b := g.view(t, fileRef{Filename: name, Type: "input"}); !bytes.Equal(b, upload) {
		t.Errorf("/view of the upload: %d bytes, want the %d uploaded", len(b), len(upload))
	}

	clientID := "rc-" + randomHex(8)
	ws := g.dial(t, clientID, g.keyHeader())
	readMessage(t, ws) // the greeting
	prefix := "rc_loaded_" + randomHex(4)
	graph := map[string]any{
		"1": node("LoadImage", map[string]any{"image": name}),
		"2": node("SaveImage", map[string]any{"images": []any{"1", 0}, "filename_prefix": prefix}),
	}
	id := g.queue(t, graph, clientID)
	readRun(t, ws, id)
	entry := g.history(t, id)
	if entry.Status.StatusStr != "success" {
		t.Fatalf("history status = %+v", entry.Status)
	}
	checkPNG(t, g.view(t, entry.image(t, "2")), 16, 8, col)

	// ComfyUI validates LoadImage's file before queueing; the 400 and its
	// node_errors pass through.
	graph["1"] = node("LoadImage", map[string]any{"image": "rc_missing_" + randomHex(4) + ".png"})
	resp, b = g.do(t, "POST", "/prompt", strings.NewReader(promptBody(graph, "")), g.key("Content-Type", "application/json")...)
	var perr struct {
		Error      struct{ Type string }
		NodeErrors map[string]struct {
			Errors []struct{ Type string }
		} `json:"node_errors"`
	}
	if err := json.Unmarshal(b, &perr); err != nil || resp.StatusCode != 400 || perr.Error.Type != "prompt_outputs_failed_validation" ||
		len(perr.NodeErrors["1"].Errors) != 1 || perr.NodeErrors["1"].Errors[0].Type != "custom_validation_failed" {
		t.Errorf("LoadImage of a missing file: %d %s", resp.StatusCode, b)
	}
}

// testInterrupt: POST /interrupt answers 200 when idle, and stops a
// running prompt at the start of its next node.
func testInterrupt(t *testing.T, g *gateway) {
	for _, body := range []string{"", `{"prompt_id":"` + newUUID() + `"}`} {
		if resp, b := g.do(t, "POST", "/interrupt", strings.NewReader(body), g.key()...); resp.StatusCode != 200 || len(b) != 0 {
			t.Errorf("POST /interrupt %q while idle = %d %q", body, resp.StatusCode, b)
		}
	}

	// A chain of blurs, each some tens of milliseconds on CPU, so that
	// the interrupt lands long before the end whatever the machine.
	const blurs = 30
	graph := map[string]any{"1": node("EmptyImage", map[string]any{"width": 256, "height": 256, "batch_size": 1, "color": randomColor()})}
	for i := 2; i <= blurs+1; i++ {
		graph[strconv.Itoa(i)] = node("ImageBlur", map[string]any{"image": []any{strconv.Itoa(i - 1), 0}, "blur_radius": 10, "sigma": 1.0})
	}
	last := strconv.Itoa(blurs + 2)
	graph[last] = node("PreviewImage", map[string]any{"images": []any{strconv.Itoa(blurs + 1), 0}})

	clientID := "rc-" + randomHex(8)
	ws := g.dial(t, clientID, g.keyHeader())
	readMessage(t, ws)
	id := g.queue(t, graph, clientID)
	interrupted := false
	var seen []string
	msgs := readRunFunc(t, ws, id, func(m message) {
		seen = append(seen, m.summary())
		if m.Type == "executing" && m.Data["node"] == "3" && !interrupted {
			interrupted = true
			if resp, b := g.do(t, "POST", "/api/interrupt", nil, g.key()...); resp.StatusCode != 200 {
				t.Errorf("POST /api/interrupt = %d %s", resp.StatusCode, b)
			}
		}
	})
	var stop *message
	for i := range msgs {
		switch msgs[i].Type {
		case "execution_interrupted":
			stop = &msgs[i]
		case "execution_success", "executed":
			t.Errorf("the interrupted prompt sent %s", msgs[i].raw)
		}
	}
	if stop == nil {
		t.Fatalf("no execution_interrupted; messages %v", seen)
	}
	n, _ := strconv.Atoi(fmt.Sprint(stop.Data["node_id"]))
	if n < 3 || n > blurs+1 || stop.Data["node_type"] != "ImageBlur" {
		t.Errorf("interrupted at %s; want a blur after node 3", stop.raw)
	}
	entry := g.history(t, id)
	if entry.Status.StatusStr != "error" || entry.Status.Completed || len(entry.Outputs) != 0 {
		t.Errorf("history of the interrupted prompt: status %+v, outputs %v", entry.Status, entry.Outputs)
	}
}

// testLogin is the web UI's road: sign in with the key once, then use the
// session cookie for REST and the socket. The gateway keeps the Host
// header, so ComfyUI's own Host/Origin check accepts the browser's Origin.
func testLogin(t *testing.T, g *gateway) {
	form := url.Values{"key": {g.apiKey}, "next": {"/queue"}}
	resp, b := g.do(t, "POST", "/login", strings.NewReader(form.Encode()),
		"Content-Type", "application/x-www-form-urlencoded", "Origin", g.URL, "Sec-Fetch-Site", "same-origin")
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/queue" {
		t.Fatalf("POST /login = %d %q %s", resp.StatusCode, resp.Header.Get("Location"), b)
	}
	var cookie string
	for _, c := range resp.Cookies() {
		if c.Name == session.CookieName {
			cookie = c.Name + "=" + c.Value
		}
	}
	if cookie == "" {
		t.Fatalf("no session cookie in %q", resp.Header.Values("Set-Cookie"))
	}
	browser := []string{"Cookie", cookie, "Origin", g.URL, "Sec-Fetch-Site", "same-origin"}

	resp, b = g.do(t, "GET", "/api/queue", nil, "Cookie", cookie, "Sec-Fetch-Site", "same-origin")
	if resp.StatusCode != 200 || !strings.Contains(string(b), `"queue_running"`) {
		t.Errorf("GET /api/queue with the session = %d %s", resp.StatusCode, b)
	}

	clientID := "rc-" + randomHex(8)
	hdr := http.Header{}
	for i := 0; i < len(browser); i += 2 {
		hdr.Set(browser[i], browser[i+1])
	}
	ws := g.dial(t, clientID, hdr)
	if m := readMessage(t, ws); m.Data["sid"] != clientID {
		t.Fatalf("greeting over the session = %s", m.raw)
	}
	col := randomColor()
	resp, b = g.do(t, "POST", "/api/prompt", strings.NewReader(promptBody(saveGraph(32, 32, col, "rc_login_"+randomHex(4)), clientID)),
		append([]string{"Content-Type", "application/json"}, browser...)...)
	var queued struct {
		PromptID string `json:"prompt_id"`
	}
	if json.Unmarshal(b, &queued) != nil || resp.StatusCode != 200 || queued.PromptID == "" {
		t.Fatalf("POST /api/prompt with the session = %d %s", resp.StatusCode, b)
	}
	readRun(t, ws, queued.PromptID)
	entry := g.history(t, queued.PromptID)
	resp, b = g.do(t, "GET", "/api/view?"+entry.image(t, "2").query(), nil, "Cookie", cookie, "Sec-Fetch-Site", "same-origin", "Sec-Fetch-Dest", "image")
	if resp.StatusCode != 200 {
		t.Fatalf("GET /api/view with the session = %d", resp.StatusCode)
	}
	checkPNG(t, b, 32, 32, col)

	// A browser without a session is sent to the login page; with one it
	// gets ComfyUI's page.
	navigate := []string{"Accept", "text/html,application/xhtml+xml,*/*;q=0.8", "Sec-Fetch-Mode", "navigate", "Sec-Fetch-Site", "none"}
	if resp, _ := g.do(t, "GET", "/", nil, navigate...); resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/login" {
		t.Errorf("GET / without a session = %d %q; want 303 /login", resp.StatusCode, resp.Header.Get("Location"))
	}
	if resp, b := g.do(t, "GET", "/", nil, append(navigate, "Cookie", cookie)...); resp.StatusCode != 200 || !bytes.Equal(b, g.direct(t, "/")) {
		t.Errorf("GET / with a session = %d, %d bytes; want ComfyUI's page", resp.StatusCode, len(b))
	}
}

// testOriginCheck: a key does not switch off ComfyUI's CSRF guard. The
// gateway keeps the Host header, so a foreign Origin still gets
// ComfyUI's own empty 403.
func testOriginCheck(t *testing.T, g *gateway) {
	body := promptBody(saveGraph(8, 8, randomColor(), "rc_origin_"+randomHex(4)), "")
	resp, b := g.do(t, "POST", "/prompt", strings.NewReader(body), g.key("Content-Type", "application/json", "Origin", "http://evil.example")...)
	if resp.StatusCode != 403 || len(b) != 0 {
		t.Errorf("POST /prompt with a key and a foreign Origin = %d %q; want ComfyUI's empty 403", resp.StatusCode, b)
	}
	resp, b = g.do(t, "GET", "/prompt", nil, g.key("Origin", g.URL)...)
	if resp.StatusCode != 200 || !strings.Contains(string(b), "queue_remaining") {
		t.Errorf("GET /prompt with the gateway's own Origin = %d %s", resp.StatusCode, b)
	}
}

// scriptRE finds the frontend's entry script in v0.3.7's index.html.
var scriptRE = regexp.MustCompile(`<script type="module" crossorigin src="\./(assets/index-[\w-]+\.js)"></script>`)

// testWebUI: the page and its static files need no key and pass through
// unchanged.
func testWebUI(t *testing.T, g *gateway) {
	resp, page := g.do(t, "GET", "/", nil)
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") {
		t.Fatalf("GET / = %d %q", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	if !bytes.Equal(page, g.direct(t, "/")) {
		t.Errorf("GET / through the gateway differs from ComfyUI's page")
	}
	if !g.comfy.Version.HasWebUI() {
		return
	}
	m := scriptRE.FindSubmatch(page)
	if m == nil || !bytes.Contains(page, []byte(`<div id="vue-app">`)) {
		t.Fatalf("GET / is not the ComfyUI frontend:\n%s", page)
	}
	resp, js := g.do(t, "GET", "/"+string(m[1]), nil)
	if resp.StatusCode != 200 || !strings.Contains(resp.Header.Get("Content-Type"), "javascript") || len(js) < 10000 {
		t.Errorf("GET /%s = %d %q, %d bytes", m[1], resp.StatusCode, resp.Header.Get("Content-Type"), len(js))
	}
	if resp, b := g.do(t, "GET", "/extensions", nil, g.key()...); resp.StatusCode != 200 || !strings.Contains(string(b), "/extensions/core/") {
		t.Errorf("GET /extensions = %d %s", resp.StatusCode, b)
	}
}

// gateway is comfygate serving on a loopback listener in front of one real
// ComfyUI, with one API key and --protect-ws.
type gateway struct {
	URL    string
	apiKey string
	comfy  *realcomfy.Server
	hc     *http.Client
}

func startGateway(t *testing.T, comfy *realcomfy.Server, extraArgs ...string) *gateway {
	t.Helper()
	g := serveGateway(t, comfy, append([]string{"--upstream", comfy.URL, "--protect-ws"}, extraArgs...), nil)
	// Wait for the gateway's first check of ComfyUI.
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		resp, _ := g.do(t, "GET", "/health/ready", nil)
		if resp.StatusCode == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the gateway never found ComfyUI %s at %s ready", comfy.Version, comfy.URL)
		}
	}
	return g
}

// serveGateway runs comfygate with args and one API key on a loopback
// listener; comfy is the server whose log is shown when the test fails.
// tune, if set, changes the loaded configuration (durations that are not
// flags).
func serveGateway(t *testing.T, comfy *realcomfy.Server, args []string, tune func(*config.Config)) *gateway {
	t.Helper()
	key := "cg_rc_" + randomHex(20)
	keyFile := t.TempDir() + "/keys"
	if err := os.WriteFile(keyFile, []byte("realcomfy:"+key+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(append(args, "--api-key-file", keyFile), func(string) (string, bool) { return "", false })
	if err != nil {
		t.Fatalf("config: %v", err)
	}
	if tune != nil {
		tune(cfg)
	}
	logs := &syncBuffer{}
	logger := slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	srv, err := server.New(cfg, logger, "test", logs)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, []net.Listener{ln}, nil) }()
	g := &gateway{
		URL:    "http://" + ln.Addr().String(),
		apiKey: key,
		comfy:  comfy,
		hc: &http.Client{
			Transport:     &http.Transport{DisableCompression: true},
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
	}
	t.Cleanup(func() {
		g.hc.CloseIdleConnections()
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("gateway: %v", err)
			}
		case <-time.After(20 * time.Second):
			t.Error("the gateway did not shut down")
		}
		if t.Failed() {
			t.Logf("gateway log:\n%s", logs.tail(60))
			t.Logf("ComfyUI %s log (%s):\n%s", comfy.Version, comfy.LogPath(), comfy.LogTail(40))
		}
	})
	return g
}

// do sends a request to the gateway and returns the response with its body
// read. header holds name, value pairs.
func (g *gateway) do(t *testing.T, method, path string, body io.Reader, header ...string) (*http.Response, []byte) {
	t.Helper()
	return doURL(t, g.hc, method, g.URL+path, body, header...)
}

func doURL(t *testing.T, hc *http.Client, method, u string, body io.Reader, header ...string) (*http.Response, []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Add(header[i], header[i+1])
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, u, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading the body: %v", method, u, err)
	}
	return resp, b
}

// direct GETs path from ComfyUI itself, around the gateway.
func (g *gateway) direct(t *testing.T, path string) []byte {
	t.Helper()
	resp, b := doURL(t, g.hc, "GET", g.comfy.URL+path, nil)
	if resp.StatusCode != 200 {
		t.Fatalf("GET %s from ComfyUI directly = %d", path, resp.StatusCode)
	}
	return b
}

// key returns header pairs with the API key added.
func (g *gateway) key(header ...string) []string {
	return append([]string{"Authorization", "Bearer " + g.apiKey}, header...)
}

func (g *gateway) keyHeader() http.Header {
	return http.Header{"Authorization": {"Bearer " + g.apiKey}}
}

func (g *gateway) wsURL(clientID string) string {
	return "ws" + strings.TrimPrefix(g.URL, "http") + "/ws?clientId=" + url.QueryEscape(clientID)
}

// dial opens the WebSocket through the gateway.
func (g *gateway) dial(t *testing.T, clientID string, header http.Header) *websocket.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	c, resp, err := websocket.Dial(ctx, g.wsURL(clientID), &websocket.DialOptions{HTTPHeader: header})
	if err != nil {
		status := 0
		if resp != nil {
			status = resp.StatusCode
		}
		t.Fatalf("WebSocket %s: %v (status %d)", clientID, err, status)
	}
	c.SetReadLimit(8 << 20)
	t.Cleanup(func() { c.CloseNow() })
	return c
}

// queue posts graph with the key and returns the prompt_id.
func (g *gateway) queue(t *testing.T, graph map[string]any, clientID string) string {
	t.Helper()
	resp, b := g.do(t, "POST", "/prompt", strings.NewReader(promptBody(graph, clientID)), g.key("Content-Type", "application/json")...)
	var queued struct {
		PromptID string `json:"prompt_id"`
	}
	if resp.StatusCode != 200 || json.Unmarshal(b, &queued) != nil || queued.PromptID == "" {
		t.Fatalf("POST /prompt = %d %s", resp.StatusCode, b)
	}
	return queued.PromptID
}

// historyEntry is one item of GET /history/{prompt_id}.
type historyEntry struct {
	Prompt  []json.RawMessage          `json:"prompt"`
	Outputs map[string]json.RawMessage `json:"outputs"`
	Status  struct {
		StatusStr string `json:"status_str"`
		Completed bool   `json:"completed"`
	} `json:"status"`
}

// history returns the finished prompt's entry. It does not wait: callers
// have seen "executing" with node null, which ComfyUI sends after writing
// the history.
func (g *gateway) history(t *testing.T, id string) historyEntry {
	t.Helper()
	resp, b := g.do(t, "GET", "/history/"+id, nil, "X-API-Key", g.apiKey)
	var h map[string]historyEntry
	if err := json.Unmarshal(b, &h); err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET /history/%s = %d %s", id, resp.StatusCode, b)
	}
	e, ok := h[id]
	if !ok {
		t.Fatalf("GET /history/%s has no entry: %s", id, b)
	}
	return e
}

// fileRef names a file in ComfyUI's input, output or temp folder.
type fileRef struct {
	Filename  string `json:"filename"`
	Subfolder string `json:"subfolder"`
	Type      string `json:"type"`
}

func (i fileRef) query() string {
	return url.Values{"filename": {i.Filename}, "subfolder": {i.Subfolder}, "type": {i.Type}}.Encode()
}

func (e historyEntry) image(t *testing.T, nodeID string) fileRef {
	t.Helper()
	var out struct{ Images []fileRef }
	if err := json.Unmarshal(e.Outputs[nodeID], &out); err != nil || len(out.Images) != 1 {
		t.Fatalf("outputs of node %s: %s", nodeID, e.Outputs[nodeID])
	}
	return out.Images[0]
}

// view downloads a file with the key in the query, as an <img> tag would.
func (g *gateway) view(t *testing.T, img fileRef) []byte {
	t.Helper()
	resp, b := g.do(t, "GET", "/view?"+img.query()+"&api_key="+url.QueryEscape(g.apiKey), nil)
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "image/png" {
		t.Fatalf("GET /view %+v = %d %q", img, resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	if cd := resp.Header.Get("Content-Disposition"); cd != `filename="`+img.Filename+`"` {
		t.Errorf("Content-Disposition = %q", cd)
	}
	return b
}

// message is one JSON message from ComfyUI's socket.
type message struct {
	Type    string
	Data    map[string]any
	rawData map[string]json.RawMessage
	raw     []byte
}

// summary renders a message for order checks: "executing 2",
// "executing null", "status 1", "execution_cached []".
func (m message) summary() string {
	switch m.Type {
	case "executing", "executed":
		if m.Data["node"] == nil {
			return m.Type + " null"
		}
		return fmt.Sprintf("%s %v", m.Type, m.Data["node"])
	case "status":
		st, _ := m.Data["status"].(map[string]any)
		ei, _ := st["exec_info"].(map[string]any)
		return fmt.Sprintf("status %v", ei["queue_remaining"])
	case "execution_cached":
		return fmt.Sprintf("%s %s", m.Type, m.rawData["nodes"])
	}
	return m.Type
}

func summarize(msgs []message, withProgress bool) []string {
	var out []string
	for _, m := range msgs {
		if !withProgress && (m.Type == "progress_state" || m.Type == "progress") {
			continue
		}
		out = append(out, m.summary())
	}
	return out
}

func readMessage(t *testing.T, c *websocket.Conn) message {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	for {
		typ, b, err := c.Read(ctx)
		if err != nil {
			t.Fatalf("reading the socket: %v", err)
		}
		if typ != websocket.MessageText {
			continue // previews; the flows here make none
		}
		var m message
		var env struct {
			Type string
			Data json.RawMessage
		}
		if err := json.Unmarshal(b, &env); err != nil {
			t.Fatalf("message %q: %v", b, err)
		}
		m.Type, m.raw = env.Type, b
		json.Unmarshal(env.Data, &m.Data)
		json.Unmarshal(env.Data, &m.rawData)
		return m
	}
}

// readRun reads messages until "executing" with node null for prompt id and
// returns those about that prompt, and the status broadcasts among them.
func readRun(t *testing.T, c *websocket.Conn, id string) []message {
	t.Helper()
	return readRunFunc(t, c, id, nil)
}

func readRunFunc(t *testing.T, c *websocket.Conn, id string, each func(message)) []message {
	t.Helper()
	var msgs []message
	for {
		m := readMessage(t, c)
		if pid, ok := m.Data["prompt_id"]; ok && pid != id {
			t.Fatalf("a message about another prompt reached this client: %s", m.raw)
		}
		if each != nil {
			each(m)
		}
		msgs = append(msgs, m)
		if m.Type == "executing" && m.Data["node"] == nil && m.Data["prompt_id"] == id {
			return msgs
		}
	}
}

func node(class string, inputs map[string]any) map[string]any {
	return map[string]any{"class_type": class, "inputs": inputs}
}

// saveGraph is EmptyImage (w×h, color 0xRRGGBB) → SaveImage, nodes "1" and "2".
func saveGraph(w, h, col int, prefix string) map[string]any {
	return map[string]any{
		"1": node("EmptyImage", map[string]any{"width": w, "height": h, "batch_size": 1, "color": col}),
		"2": node("SaveImage", map[string]any{"images": []any{"1", 0}, "filename_prefix": prefix}),
	}
}

func promptBody(graph map[string]any, clientID string) string {
	body := map[string]any{"prompt": graph}
	if clientID != "" {
		body["client_id"] = clientID
	}
	b, err := json.Marshal(body)
	if err != nil {
		panic(err)
	}
	return string(b)
}

// checkPNG checks that b is a w×h PNG whose first pixel has color col,
// give or take the rounding of ComfyUI's float pipeline.
func checkPNG(t *testing.T, b []byte, w, h, col int) {
	t.Helper()
	img, err := png.Decode(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("not a PNG (%d bytes): %v", len(b), err)
	}
	if got := img.Bounds().Size(); got != (image.Point{w, h}) {
		t.Errorf("PNG is %v, want %dx%d", got, w, h)
	}
	r, g, bl, _ := img.At(0, 0).RGBA()
	got := [3]int{int(r >> 8), int(g >> 8), int(bl >> 8)}
	want := [3]int{col >> 16 & 0xff, col >> 8 & 0xff, col & 0xff}
	for i := range got {
		if d := got[i] - want[i]; d < -1 || d > 1 {
			t.Errorf("pixel (0,0) = %v, want %v", got, want)
			break
		}
	}
}

// solidPNG encodes a w×h PNG of one color.
func solidPNG(t *testing.T, w, h, col int) []byte {
	t.Helper()
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	c := color.NRGBA{uint8(col >> 16), uint8(col >> 8), uint8(col), 255}
	for y := range h {
		for x := range w {
			img.SetNRGBA(x, y, c)
		}
	}
	var buf bytes.Buffer
	if err := png.Encode(&buf, img); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func randomColor() int {
	n, err := rand.Int(rand.Reader, big.NewInt(1<<24))
	if err != nil {
		panic(err)
	}
	return int(n.Int64())
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

var uuidRE = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)

func newUUID() string {
	b := make([]byte, 16)
	rand.Read(b)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

func decodeAny(t *testing.T, b []byte) any {
	t.Helper()
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("decoding %q: %v", b, err)
	}
	return v
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) tail(n int) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	lines := strings.Split(strings.TrimRight(s.b.String(), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
