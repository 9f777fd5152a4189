// Package comfytest provides a fake ComfyUI server for tests of the gateway
// and for the comfyui-sim command.
//
// The fake answers like the ComfyUI builds captured in testdata/: the same
// JSON shapes, status codes, WebSocket message order and Host/Origin 403 rule.
// TestFakeMatchesReal in internal/realcomfy compares it with real v0.3.7 and
// 0.8.0 servers, when they are installed.
// It records every request it receives, so a test can check what actually
// reached the upstream, and it has knobs for latency, canned answers and a
// busy queue. It runs no models: every image it "generates" is the PNG of
// testdata/view_output.png.
package comfytest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"time"
)

// TB is the subset of testing.TB the fake needs, so that programs that are
// not tests can use it without importing "testing".
type TB interface {
	Helper()
	Cleanup(func())
	Fatalf(format string, args ...any)
	Logf(format string, args ...any)
}

// Options configures a Fake. The zero value behaves like ComfyUI v0.3.7;
// Options{Version: "0.8.0", PromptIDs: true, ProgressState: true,
// CreateTime: true} like 0.8.0, as far as internal/realcomfy's comparison
// with the real servers goes.
type Options struct {
	// NoOriginCheck turns off the Host/Origin 403 rule, like the 2024-08 build.
	NoOriginCheck bool

	// SecFetchSiteCheck adds the rule of newer builds: a request with
	// Sec-Fetch-Site: cross-site gets 403.
	SecFetchSiteCheck bool

	// Version is reported as system.comfyui_version in /system_stats.
	// The empty string keeps the v0.3.7 value, "unknown".
	Version string

	// PreviewFrames is the number of binary preview frames sent between the
	// "executing" and the "executed" message of each output node. A frame is
	// type 1 (PREVIEW_IMAGE), format 2 (PNG), then the PNG; a client that
	// announced supports_preview_metadata gets type 4 frames instead, as
	// newer builds do.
	PreviewFrames int

	// PromptIDs turns on what 0.8.0 does with the ids clients choose:
	// POST /prompt keeps a client's prompt_id (any JSON value, rendered as
	// Python's str() renders it, so null becomes "None"), and POST
	// /interrupt with a prompt_id stops only that prompt. v0.3.7, the
	// default, ignores both: every prompt gets a new uuid4, and every
	// interrupt stops whatever runs.
	PromptIDs bool

	// ProgressState sends the progress_state messages of 0.8.0 around each
	// node a prompt executes: the node "running" before its "executing",
	// "finished" after it (and after its "executed"). Like 0.8.0, it sends
	// those of a prompt without client_id to every socket.
	ProgressState bool

	// CreateTime adds "create_time" (milliseconds since the epoch) to the
	// extra_data of each queued prompt, as 0.8.0 does.
	CreateTime bool

	// Cache makes a prompt whose graph equals the previous one's run fully
	// cached, as ComfyUI does (testdata/ws_messages_cached_prompt.json): no
	// per-node "executing", and "executed" names the earlier files. Off by
	// default, so every run has the message order of ws_messages_prompt.json.
	Cache bool

	// Classes, if not nil, are the only node classes the server has:
	// /object_info lists only them, and a prompt with any other class is
	// refused as ComfyUI refuses an unknown node. A class the fake does not
	// know (a custom node) gets a definition without inputs. Nil: the 243
	// classes of v0.3.7.
	Classes []string

	// Models lists the model files of each model folder ("checkpoints",
	// "loras", "vae", ...), as the server's models directory would hold
	// them. They are the choices of the loaders' combo inputs in
	// /object_info (CheckpointLoaderSimple.ckpt_name, LoraLoader.lora_name,
	// VAELoader.vae_name), the answer of /models/{folder}, and what
	// validation accepts: a prompt naming another file fails with
	// ComfyUI's value_not_in_list node error. Nil: no model files, as a
	// fresh install (every loader then fails validation).
	Models map[string][]string

	// StepTime makes each KSampler of a prompt run steps × StepTime (its
	// "steps" input; 20 when it has none), sending a "progress" message
	// per step and noticing an interrupt at the next step, instead of the
	// node delay. Zero: a KSampler takes the node delay like any node.
	StepTime time.Duration

	// ModelLoadTime is paid, when a CheckpointLoaderSimple executes, if
	// its ckpt_name is not the checkpoint loaded by the previous one (the
	// first load is paid too). ModelLoads counts the loads either way.
	ModelLoadTime time.Duration

	// Logf, if set, receives debug lines.
	Logf func(format string, args ...any)
}

// Request is one request as the fake received it.
type Request struct {
	Method     string
	Path       string // r.URL.Path
	RawPath    string // r.URL.EscapedPath()
	RawQuery   string
	Host       string
	RemoteAddr string
	RequestURI string
	Header     http.Header

	// Body holds at most the first MaxRecordedBody bytes of the body.
	Body []byte
	// BodySize is the full size of the body, in bytes.
	BodySize int64
	// BodySHA256 is the hex SHA-256 of the full body.
	BodySHA256 string

	// WebSocket reports whether the request asked for a WebSocket upgrade.
	WebSocket bool
}

// MaxRecordedBody is how much of each request body Request.Body keeps.
const MaxRecordedBody = 1 << 20

// WSMessage is one WebSocket frame received from a client.
type WSMessage struct {
	Binary bool
	Data   []byte
}

// Fake is a fake ComfyUI server. It is an http.Handler; New also starts it
// on a loopback httptest server. All methods are safe for concurrent use.
//
// Prompts run one at a time on a worker goroutine, in a few milliseconds
// (see SetNodeDelay, and Options.StepTime and ModelLoadTime for a
// simulated GPU). WebSockets follow server.py: a socket that connects
// with a clientId already in use takes over the registration without closing
// the old socket, and when either socket closes the clientId is
// unregistered, even if the newer socket is still open.
type Fake struct {
	opts  Options
	nodes *nodeSet // node classes, definitions and model files
	srv   *httptest.Server

	ctx    context.Context // cancelled by Close
	cancel context.CancelFunc
	wg     sync.WaitGroup // WebSocket handlers and the prompt worker

	// emitMu serializes queue changes with the status broadcasts that
	// announce them, as ComfyUI's single event loop does, so a prompt's
	// "queued" status always goes out before its execution_start.
	emitMu sync.Mutex

	mu          sync.Mutex
	closed      bool
	requests    []*Request
	delays      map[string]time.Duration
	overrides   map[string]override
	nodeDelay   time.Duration
	synRunning  []queueItem
	synPending  []queueItem
	pending     []*job
	running     *job
	currentNode string // node of running that is executing, for the reconnect replay
	interrupt   bool
	workerOn    bool
	wake        chan struct{}
	number      int
	history     []historyEntry
	lastRun     *cachedRun
	counters    map[string]int
	tempPrefix  string
	files       map[fileKey]*file
	uploads     map[fileKey]string // name -> sha256 of uploads, for renaming
	userdata    map[string]userFile
	settings    map[string]any
	sockets     map[string]*wsConn // registered sockets by sid
	conns       map[*wsConn]bool   // every open socket
	received    map[string][]WSMessage
	socketsSeen chan struct{} // closed and replaced when a socket registers
	logLines    []string
	gpu         gpu
}

type override struct {
	status      int
	contentType string
	body        []byte
}

// NewFake returns a fake that is not serving; use it as an http.Handler.
// Call Close to close its WebSockets and stop its worker.
func NewFake(opts Options) *Fake {
	ctx, cancel := context.WithCancel(context.Background())
	f := &Fake{
		opts:        opts,
		nodes:       nodesFor(opts),
		ctx:         ctx,
		cancel:      cancel,
		delays:      map[string]time.Duration{},
		overrides:   map[string]override{},
		wake:        make(chan struct{}, 1),
		counters:    map[string]int{},
		tempPrefix:  "ComfyUI_temp_" + randomLetters(5),
		files:       map[fileKey]*file{},
		uploads:     map[fileKey]string{},
		userdata:    map[string]userFile{},
		settings:    map[string]any{},
		sockets:     map[string]*wsConn{},
		conns:       map[*wsConn]bool{},
		received:    map[string][]WSMessage{},
		socketsSeen: make(chan struct{}),
	}
	f.AddFile("output", "", sampleOutputName, bytes.NewReader(samplePNG), time.Now())
	f.logf("comfytest: fake ComfyUI ready")
	return f
}

// New starts a fake on an httptest server listening on 127.0.0.1 and
// registers its Close with t.Cleanup.
func New(t TB, opts Options) *Fake {
	t.Helper()
	if opts.Logf == nil {
		opts.Logf = t.Logf
	}
	f := NewFake(opts)
	f.srv = httptest.NewServer(f)
	t.Cleanup(f.Close)
	return f
}

// URL returns the base URL of the server started by New, such as
// "http://127.0.0.1:34567". It is "" for a fake made by NewFake.
func (f *Fake) URL() string {
	if f.srv == nil {
		return ""
	}
	return f.srv.URL
}

// Close closes every WebSocket (status 1001), stops the prompt worker and,
// for a fake made by New, the server. It is safe to call more than once.
func (f *Fake) Close() {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return
	}
	f.closed = true
	conns := make([]*wsConn, 0, len(f.conns))
	for c := range f.conns {
		conns = append(conns, c)
	}
	f.mu.Unlock()

	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.shutdown()
		}()
	}
	wg.Wait()
	f.cancel()
	f.wg.Wait()
	if f.srv != nil {
		f.srv.Close()
	}
}

// Requests returns a copy of every request received since the start or
// the last Reset, in arrival order.
func (f *Fake) Requests() []Request {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]Request, len(f.requests))
	for i, r := range f.requests {
		out[i] = r.clone()
	}
	return out
}

// LastRequest returns the most recent request, if any.
func (f *Fake) LastRequest() (Request, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.requests) == 0 {
		return Request{}, false
	}
	return f.requests[len(f.requests)-1].clone(), true
}

// Reset forgets the recorded requests.
func (f *Fake) Reset() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.requests = nil
}

func (r *Request) clone() Request {
	c := *r
	c.Header = r.Header.Clone()
	c.Body = slices.Clone(r.Body)
	return c
}

// SetDelay delays the answers of one route by d, under both its /api and
// its plain form. path is the route as registered without /api, such as
// "/system_stats" or "/history/{prompt_id}", or a concrete path such as
// "/history/abc". A zero d removes the delay.
func (f *Fake) SetDelay(path string, d time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if d <= 0 {
		delete(f.delays, path)
		return
	}
	f.delays[path] = d
}

// SetResponse makes one route (named as for SetDelay) answer status,
// contentType and body instead of its normal answer. The origin check still
// runs first.
func (f *Fake) SetResponse(path string, status int, contentType string, body []byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.overrides[path] = override{status, contentType, slices.Clone(body)}
}

// ClearOverrides removes every delay and canned response.
func (f *Fake) ClearOverrides() {
	f.mu.Lock()
	defer f.mu.Unlock()
	clear(f.delays)
	clear(f.overrides)
}

// SetNodeDelay makes every executed node take d, so that tests can watch a
// prompt while it runs or interrupt it.
func (f *Fake) SetNodeDelay(d time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.nodeDelay = d
}

func (f *Fake) logf(format string, args ...any) {
	if f.opts.Logf != nil {
		f.opts.Logf(format, args...)
	}
	f.mu.Lock()
	if len(f.logLines) < 1000 {
		f.logLines = append(f.logLines, fmt.Sprintf(format, args...))
	}
	f.mu.Unlock()
}

// ServeHTTP records the request, applies ComfyUI's middlewares (OPTIONS,
// Host/Origin and optionally Sec-Fetch-Site) and answers it.
func (f *Fake) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	rec := &Request{
		Method:     r.Method,
		Path:       r.URL.Path,
		RawPath:    r.URL.EscapedPath(),
		RawQuery:   r.URL.RawQuery,
		Host:       r.Host,
		RemoteAddr: r.RemoteAddr,
		RequestURI: r.RequestURI,
		Header:     r.Header.Clone(),
		WebSocket: headerHasToken(r.Header, "Connection", "upgrade") &&
			headerHasToken(r.Header, "Upgrade", "websocket"),
	}
	f.mu.Lock()
	f.requests = append(f.requests, rec)
	f.mu.Unlock()

	body := &bodyRecorder{rc: r.Body, h: sha256.New()}
	r.Body = body
	rw := &responseWriter{ResponseWriter: w, path: r.URL.Path}
	rw.before = func() {
		// Read what the handler left so that BodySize and BodySHA256
		// describe the whole body before the client sees an answer.
		io.Copy(io.Discard, body)
		f.mu.Lock()
		rec.Body = body.head.Bytes()
		rec.BodySize = body.n
		rec.BodySHA256 = hex.EncodeToString(body.h.Sum(nil))
		f.mu.Unlock()
	}
	defer rw.finish()

	if f.opts.SecFetchSiteCheck && r.Header.Get("Sec-Fetch-Site") == "cross-site" {
		f.logf("comfytest: 403 cross-site request %s %s", r.Method, r.URL.Path)
		writeEmpty(rw, http.StatusForbidden)
		return
	}
	if origin := r.Header.Values("Origin"); !f.opts.NoOriginCheck && len(origin) > 0 && originRejected(r.Host, origin[0]) {
		f.logf("comfytest: 403 non matching host %q and origin %q", r.Host, r.Header.Get("Origin"))
		writeEmpty(rw, http.StatusForbidden)
		return
	}
	if r.Method == http.MethodOptions {
		writeEmpty(rw, http.StatusOK)
		return
	}
	f.route(rw, r)
}

// bodyRecorder counts and hashes a request body as it is read and keeps its
// first MaxRecordedBody bytes.
type bodyRecorder struct {
	rc   io.ReadCloser
	h    hash.Hash
	n    int64
	head bytes.Buffer
}

func (b *bodyRecorder) Read(p []byte) (int, error) {
	n, err := b.rc.Read(p)
	if n > 0 {
		b.h.Write(p[:n])
		b.n += int64(n)
		if room := MaxRecordedBody - b.head.Len(); room > 0 {
			b.head.Write(p[:min(n, room)])
		}
	}
	return n, err
}

func (b *bodyRecorder) Close() error { return b.rc.Close() }

// responseWriter runs before once, just before the first byte of the
// answer, and applies ComfyUI's cache_control middleware.
type responseWriter struct {
	http.ResponseWriter
	path   string
	before func()
	once   sync.Once
}

func (w *responseWriter) finish() { w.once.Do(w.before) }

func (w *responseWriter) WriteHeader(code int) {
	w.finish()
	cacheControl(w.Header(), w.path, code)
	w.ResponseWriter.WriteHeader(code)
}

func (w *responseWriter) Write(p []byte) (int, error) {
	w.finish()
	return w.ResponseWriter.Write(p)
}

func (w *responseWriter) Flush() {
	w.finish()
	http.NewResponseController(w.ResponseWriter).Flush()
}

// Hijack lets coder/websocket take over the connection.
func (w *responseWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	w.finish()
	return http.NewResponseController(w.ResponseWriter).Hijack()
}

func (w *responseWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// cacheControl mirrors ComfyUI's middleware/cache_middleware.py as 0.8.0
// has it: scripts, styles and index*.json get no-cache (v0.3.7 gives .js and
// .css the same; the newest code says no-store), and static images a max-age
// (v0.3.7 leaves them alone).
func cacheControl(h http.Header, p string, code int) {
	if h.Get("Cache-Control") != "" {
		return
	}
	last := p[strings.LastIndex(p, "/")+1:]
	lower := strings.ToLower(p)
	switch {
	case strings.HasSuffix(lower, ".js"), strings.HasSuffix(lower, ".mjs"), strings.HasSuffix(lower, ".css"),
		strings.HasPrefix(last, "index") && strings.HasSuffix(last, ".json"):
		h.Set("Cache-Control", "no-cache")
	case hasImageExt(lower):
		switch code {
		case 200, 201, 202, 203, 204, 205, 206, 301, 308:
			h.Set("Cache-Control", "public, max-age=86400")
		case 404:
			h.Set("Cache-Control", "public, max-age=3600")
		case 302, 303, 307:
			h.Set("Cache-Control", "no-cache")
		}
	}
}

func hasImageExt(p string) bool {
	for _, ext := range []string{".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"} {
		if strings.HasSuffix(p, ext) {
			return true
		}
	}
	return false
}

func headerHasToken(h http.Header, name, token string) bool {
	for _, v := range h.Values(name) {
		for t := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

var _ http.Handler = (*Fake)(nil)
