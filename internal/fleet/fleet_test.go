package fleet

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"mime/multipart"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/comfygate/comfygate/internal/comfytest"
	"github.com/comfygate/comfygate/internal/hub"
	"github.com/comfygate/comfygate/internal/proxy"
	"github.com/comfygate/comfygate/internal/reqscope"
	"github.com/comfygate/comfygate/internal/route"
	"github.com/comfygate/comfygate/internal/upstream"
)

// lateRouter is the fleet as the hub's router, made after the hub.
type lateRouter struct{ f **Fleet }

func (r lateRouter) Route(server string, msg map[string]any) (string, string) {
	return (*r.f).Route(server, msg)
}

func (r lateRouter) Missed(server string, since time.Time) []map[string]any {
	return (*r.f).Missed(server, since)
}

// testFleet is a fleet over fakes, served over loopback.
type testFleet struct {
	*Fleet
	URL   string
	fakes []*comfytest.Fake
	pool  *upstream.Pool
}

func newTestFleet(t *testing.T, opts []comfytest.Options) *testFleet {
	t.Helper()
	var fakes []*comfytest.Fake
	for _, o := range opts {
		fakes = append(fakes, comfytest.New(t, o))
	}
	tf := serveFleet(t, specsOf(fakes), fakes, Options{PollInterval: time.Hour, PollTimeout: 2 * time.Second}, nil)
	tf.Tick(t.Context())
	return tf
}

// specsOf names fakes gpu1, gpu2, ... in a pool.
func specsOf(fakes []*comfytest.Fake) []upstream.Spec {
	var specs []upstream.Spec
	for i, fk := range fakes {
		u, _ := url.Parse(fk.URL())
		specs = append(specs, upstream.Spec{Name: fmt.Sprintf("gpu%d", i+1), URL: u})
	}
	return specs
}

// serveFleet serves, over loopback, a fleet of the servers of specs (the
// fakes are those behind them) with a socket hub, relayed to other
// replicas when relay is not nil. It does not poll yet. opts' Hub,
// ClientID and Logger are set here.
func serveFleet(t *testing.T, specs []upstream.Spec, fakes []*comfytest.Fake, opts Options, relay hub.Relay) *testFleet {
	t.Helper()
	pool, err := upstream.NewPool(specs, upstream.Options{ResponseHeaderTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	logger := slog.New(slog.DiscardHandler)
	p := proxy.New(pool, proxy.Options{Logger: logger})
	var fl *Fleet
	h := hub.New(lateRouter{&fl}, hub.Options{Logger: logger, Relay: relay})
	opts.Hub, opts.ClientID, opts.Logger = h, h.ID, logger
	fl = New(pool, p, opts)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx := reqscope.NewContext(r.Context(), &reqscope.Scope{Route: route.Classify(r, false)})
		fl.ServeHTTP(w, r.WithContext(ctx))
	}))
	t.Cleanup(func() {
		h.Close()
		srv.Close()
		pool.CloseIdleConnections()
	})
	return &testFleet{Fleet: fl, URL: srv.URL, fakes: fakes, pool: pool}
}

func (tf *testFleet) do(t *testing.T, method, path string, body any) (int, []byte) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, _ := http.NewRequest(method, tf.URL+path, rd)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return res.StatusCode, b
}

func workflow(prefix string) map[string]any {
	return map[string]any{
		"prompt": map[string]any{
			"1": map[string]any{"class_type": "EmptyImage", "inputs": map[string]any{"width": 8, "height": 8, "batch_size": 1, "color": 0}},
			"2": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"1", 0}, "filename_prefix": prefix}},
		},
		"client_id": "tester",
	}
}

func (tf *testFleet) queue(t *testing.T, body map[string]any) string {
	t.Helper()
	status, b := tf.do(t, "POST", "/api/prompt", body)
	if status != http.StatusOK {
		t.Fatalf("POST /prompt: %d %s", status, b)
	}
	var res struct {
		PromptID string `json:"prompt_id"`
	}
	json.Unmarshal(b, &res)
	return res.PromptID
}

// waitDone polls /history/{id} through the fleet until the prompt is there.
func (tf *testFleet) waitDone(t *testing.T, id string) map[string]any {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		status, b := tf.do(t, "GET", "/api/history/"+id, nil)
		var h map[string]map[string]any
		if status == http.StatusOK && json.Unmarshal(b, &h) == nil && h[id] != nil {
			return h[id]
		}
	}
	t.Fatalf("prompt %s never finished", id)
	return nil
}

func TestDispatchSpreadsAndMapsIDs(t *testing.T) {
	tf := newTestFleet(t, []comfytest.Options{{}, {}})
	for _, fk := range tf.fakes {
		fk.SetNodeDelay(200 * time.Millisecond)
	}
	a := tf.queue(t, workflow("a"))
	b := tf.queue(t, workflow("b"))
	pa, _, _ := tf.store.Get(context.Background(), a)
	pb, _, _ := tf.store.Get(context.Background(), b)
	if pa.Server == pb.Server {
		t.Errorf("both prompts went to %s; want one per idle server", pa.Server)
	}
	for _, id := range []string{a, b} {
		h := tf.waitDone(t, id)
		outs, _ := json.Marshal(h["outputs"])
		if !strings.Contains(string(outs), `"subfolder":"@gpu`) {
			t.Errorf("outputs %s: file references are not marked with their server", outs)
		}
	}
	status, body := tf.do(t, "GET", "/api/history", nil)
	var hist map[string]any
	if status != 200 || json.Unmarshal(body, &hist) != nil || hist[a] == nil || hist[b] == nil {
		t.Errorf("merged history %d %s; want both prompts", status, body)
	}
	// /view of a marked output reaches the server that made it.
	h := tf.waitDone(t, a)
	var outs map[string]struct {
		Images []struct{ Filename, Subfolder, Type string }
	}
	ob, _ := json.Marshal(h["outputs"])
	json.Unmarshal(ob, &outs)
	img := outs["2"].Images[0]
	q := url.Values{"filename": {img.Filename}, "subfolder": {img.Subfolder}, "type": {img.Type}}
	if status, png := tf.do(t, "GET", "/api/view?"+q.Encode(), nil); status != 200 || !bytes.HasPrefix(png, []byte("\x89PNG")) {
		t.Errorf("/view of %v: %d, %d bytes", q, status, len(png))
	}
}

// wsMessage is one message a client socket received.
type wsMessage struct {
	binary bool
	typ    string
	data   map[string]any
	raw    []byte
}

// dialWS opens a client socket to the fleet and collects its messages.
func (tf *testFleet) dialWS(t *testing.T, clientID string) <-chan wsMessage {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	c, _, err := websocket.Dial(ctx, strings.Replace(tf.URL, "http", "ws", 1)+"/ws?clientId="+clientID, nil)
	if err != nil {
		t.Fatal(err)
	}
	c.SetReadLimit(64 << 20)
	t.Cleanup(func() { c.CloseNow() })
	ch := make(chan wsMessage, 1000)
	go func() {
		defer close(ch)
		for {
			typ, b, err := c.Read(ctx)
			if err != nil {
				return
			}
			m := wsMessage{binary: typ == websocket.MessageBinary, raw: b}
			if !m.binary {
				var v struct {
					Type string         `json:"type"`
					Data map[string]any `json:"data"`
				}
				json.Unmarshal(b, &v)
				m.typ, m.data = v.Type, v.Data
			}
			ch <- m
		}
	}()
	return ch
}

// untilEnd collects messages until executing with node null for id.
func untilEnd(t *testing.T, ch <-chan wsMessage, id string) []wsMessage {
	t.Helper()
	var got []wsMessage
	timeout := time.After(10 * time.Second)
	for {
		select {
		case m, ok := <-ch:
			if !ok {
				t.Fatalf("socket closed after %d messages", len(got))
			}
			got = append(got, m)
			if m.typ == "executing" && m.data["node"] == nil && m.data["prompt_id"] == id {
				return got
			}
		case <-timeout:
			t.Fatalf("no end signal for %s after %d messages", id, len(got))
		}
	}
}

func TestSocketsFollowPrompts(t *testing.T) {
	tf := newTestFleet(t, []comfytest.Options{{PreviewFrames: 2}, {PreviewFrames: 2}})
	for _, fk := range tf.fakes {
		fk.SetNodeDelay(100 * time.Millisecond)
	}
	// Let the hub's server sockets connect.
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		n := 0
		for _, fk := range tf.fakes {
			for _, r := range fk.Requests() {
				if r.WebSocket {
					n++
					break
				}
			}
		}
		if n == len(tf.fakes) {
			break
		}
	}
	alice := tf.dialWS(t, "alice")
	bob := tf.dialWS(t, "bob")
	for _, ch := range []<-chan wsMessage{alice, bob} {
		first := <-ch
		if first.typ != "status" || first.data["sid"] == nil {
			t.Fatalf("first message %s; want status with sid", first.raw)
		}
	}
	wa, wb := workflow("a"), workflow("b")
	wa["client_id"], wb["client_id"] = "alice", "bob"
	a := tf.queue(t, wa)
	b := tf.queue(t, wb)
	pa, _, _ := tf.store.Get(context.Background(), a)
	pb, _, _ := tf.store.Get(context.Background(), b)
	if pa.Server == pb.Server {
		t.Fatalf("both prompts on %s; the test needs one per server", pa.Server)
	}
	for _, c := range []struct {
		ch       <-chan wsMessage
		id, peer string
	}{{alice, a, b}, {bob, b, a}} {
		got := untilEnd(t, c.ch, c.id)
		var types []string
		previews := 0
		for _, m := range got {
			if m.binary {
				previews++
				continue
			}
			types = append(types, m.typ)
			if pid, ok := m.data["prompt_id"]; ok && pid != c.id {
				t.Errorf("message %s names prompt %v; want only %s", m.raw, pid, c.id)
			}
			if m.typ == "executed" && !strings.Contains(string(m.raw), `"subfolder":"@gpu`) {
				t.Errorf("executed %s: output not marked with its server", m.raw)
			}
		}
		if previews != 2 {
			t.Errorf("%d previews; want the 2 of its own prompt", previews)
		}
		want := []string{"execution_start", "executing", "executing", "executed", "execution_success", "executing"}
		var exec []string
		for _, ty := range types {
			if ty != "status" && ty != "execution_cached" && ty != "progress" && ty != "progress_state" {
				exec = append(exec, ty)
			}
		}
		if strings.Join(exec, ",") != strings.Join(want, ",") {
			t.Errorf("execution messages %v; want %v", exec, want)
		}
	}
}

// historyIDs returns the ids of the merged /history, in order.
func (tf *testFleet) historyIDs(t *testing.T, query string) []string {
	t.Helper()
	status, b := tf.do(t, "GET", "/api/history"+query, nil)
	if status != http.StatusOK {
		t.Fatalf("GET /history%s: %d %s", query, status, b)
	}
	keys, err := objectKeys(b)
	if err != nil {
		t.Fatal(err)
	}
	return keys
}

func TestFailoverLosesNothing(t *testing.T) {
	tf := newTestFleet(t, []comfytest.Options{{}, {}})
	for _, fk := range tf.fakes {
		fk.SetNodeDelay(150 * time.Millisecond)
	}
	var ids []string
	for i := range 6 {
		ids = append(ids, tf.queue(t, workflow(fmt.Sprint("p", i))))
	}
	var onDead int
	for _, id := range ids {
		if p, _, _ := tf.store.Get(context.Background(), id); p.Server == "gpu1" {
			onDead++
		}
	}
	if onDead == 0 {
		t.Fatal("no prompt on gpu1; the test needs some")
	}
	tf.fakes[0].Close()
	tf.Tick(context.Background())
	tf.Tick(context.Background())
	for _, id := range ids {
		p, _, _ := tf.store.Get(context.Background(), id)
		if p.Server != "gpu2" {
			t.Errorf("prompt %s still on %s after gpu1 died", id, p.Server)
		}
	}
	for _, id := range ids {
		tf.waitDone(t, id)
	}
	got := tf.historyIDs(t, "")
	seen := map[string]int{}
	for _, id := range got {
		seen[id]++
	}
	for _, id := range ids {
		if seen[id] != 1 {
			t.Errorf("prompt %s is %d times in the merged history; want once", id, seen[id])
		}
	}
}

func TestIdleServerStealsWaitingPrompts(t *testing.T) {
	tf := newTestFleet(t, []comfytest.Options{{}, {}})
	for _, fk := range tf.fakes {
		fk.SetNodeDelay(300 * time.Millisecond)
	}
	gpu2, _ := tf.pool.Get("gpu2")
	gpu2.SetDraining(true) // keeps new prompts off it, for now
	var ids []string
	for i := range 3 {
		ids = append(ids, tf.queue(t, workflow(fmt.Sprint("s", i))))
	}
	gpu2.SetDraining(false)
	tf.Tick(context.Background()) // sees gpu1 busy with two waiting, gpu2 idle
	moved := 0
	for _, id := range ids {
		if p, _, _ := tf.store.Get(context.Background(), id); p.Server == "gpu2" {
			moved++
			if len(p.Stale) != 0 {
				t.Errorf("stolen prompt %s keeps a stale placement %v; it was deleted from gpu1", id, p.Stale)
			}
		}
	}
	if moved != 1 {
		t.Errorf("%d prompts moved to the idle server; want 1 (the last waiting)", moved)
	}
	for _, id := range ids {
		tf.waitDone(t, id)
	}
	// gpu1 ran only what it kept.
	var ran int
	for _, r := range tf.fakes[0].Requests() {
		if r.Method == "POST" && strings.HasSuffix(r.Path, "/prompt") {
			ran++
		}
	}
	if ran != 3 {
		t.Errorf("gpu1 received %d prompts; want the 3 queued there", ran)
	}
	if n := len(tf.historyIDs(t, "")); n != 3 {
		t.Errorf("merged history has %d entries; want 3 (the stolen one once)", n)
	}
}

func TestMergedRoutes(t *testing.T) {
	tf := newTestFleet(t, []comfytest.Options{{}, {}})
	var ids []string
	for i := range 4 {
		id := tf.queue(t, workflow(fmt.Sprint("m", i)))
		tf.waitDone(t, id)
		ids = append(ids, id)
	}
	if got := tf.historyIDs(t, ""); strings.Join(got, ",") != strings.Join(ids, ",") {
		t.Errorf("merged history order %v; want oldest first %v", got, ids)
	}
	if got := tf.historyIDs(t, "?max_items=2"); strings.Join(got, ",") != strings.Join(ids[2:], ",") {
		t.Errorf("max_items=2 gave %v; want the newest two %v", got, ids[2:])
	}
	if got := tf.historyIDs(t, "?max_items=2&offset=1"); strings.Join(got, ",") != strings.Join(ids[1:3], ",") {
		t.Errorf("max_items=2&offset=1 gave %v; want %v", got, ids[1:3])
	}
	if status, _ := tf.do(t, "GET", "/api/history?max_items=x", nil); status != http.StatusBadRequest {
		t.Errorf("max_items=x: %d; want 400", status)
	}

	// /prompt sums the queues.
	for _, fk := range tf.fakes {
		fk.SetQueue(1, 2)
	}
	status, b := tf.do(t, "GET", "/api/prompt", nil)
	if status != 200 || !strings.Contains(string(b), `"queue_remaining":6`) {
		t.Errorf("GET /prompt %d %s; want queue_remaining 6", status, b)
	}
	status, b = tf.do(t, "GET", "/api/queue", nil)
	var q struct {
		Running, Pending []any `json:"-"`
		R                []any `json:"queue_running"`
		P                []any `json:"queue_pending"`
	}
	if status != 200 || json.Unmarshal(b, &q) != nil || len(q.R) != 2 || len(q.P) != 4 {
		t.Errorf("GET /queue %d: %d running, %d pending; want 2 and 4", status, len(q.R), len(q.P))
	}
	// clear goes to every server.
	if status, _ := tf.do(t, "POST", "/api/queue", map[string]any{"clear": true}); status != 200 {
		t.Errorf("POST /queue clear: %d", status)
	}
	for i, fk := range tf.fakes {
		got := false
		for _, r := range fk.Requests() {
			got = got || r.Method == "POST" && r.Path == "/api/queue" && strings.Contains(string(r.Body), "clear")
		}
		if !got {
			t.Errorf("gpu%d did not receive the clear", i+1)
		}
	}

	// /system_stats lists both servers' devices, named by server.
	status, b = tf.do(t, "GET", "/api/system_stats", nil)
	if status != 200 || !strings.Contains(string(b), `"name":"gpu1: `) || !strings.Contains(string(b), `"name":"gpu2: `) {
		t.Errorf("GET /system_stats %d %s; want devices of gpu1 and gpu2", status, b)
	}
	// /object_info answers as one server.
	status, b = tf.do(t, "GET", "/api/object_info", nil)
	var info map[string]json.RawMessage
	if status != 200 || json.Unmarshal(b, &info) != nil || info["SaveImage"] == nil {
		t.Errorf("GET /object_info %d: %d classes", status, len(info))
	}

	// An id the fleet never saw is asked of every server; unknown is {}.
	if status, b := tf.do(t, "GET", "/api/history/nope", nil); status != 200 || strings.TrimSpace(string(b)) != "{}" {
		t.Errorf("GET /history/nope: %d %s; want 200 {}", status, b)
	}
}

func TestUploadReachesEveryServer(t *testing.T) {
	tf := newTestFleet(t, []comfytest.Options{{}, {}})
	var body bytes.Buffer
	mw := multipart.NewWriter(&body)
	fw, _ := mw.CreateFormFile("image", "cat.png")
	fw.Write([]byte("\x89PNG\r\n\x1a\nnot really a png"))
	mw.Close()
	req, _ := http.NewRequest("POST", tf.URL+"/api/upload/image", &body)
	req.Header.Set("Content-Type", mw.FormDataContentType())
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != 200 || !strings.Contains(string(b), `"name":"cat.png"`) {
		t.Fatalf("upload: %d %s", res.StatusCode, b)
	}
	for i, fk := range tf.fakes {
		got := false
		for _, r := range fk.Requests() {
			got = got || r.Path == "/api/upload/image" && strings.Contains(string(r.Body), "not really a png")
		}
		if !got {
			t.Errorf("gpu%d did not receive the upload", i+1)
		}
	}
	// The uploaded file is a valid value on both, for prompts that load it.
	for _, name := range []string{"gpu1", "gpu2"} {
		m, _ := tf.byName(name)
		m.mu.Lock()
		ok := m.uploads["cat.png"]
		m.mu.Unlock()
		if !ok {
			t.Errorf("%s does not count cat.png among its inputs", name)
		}
	}
	// /view of an unmarked input is found on a server that has it.
	q := url.Values{"filename": {"cat.png"}, "type": {"input"}}
	if status, got := tf.do(t, "GET", "/api/view?"+q.Encode(), nil); status != 200 || !strings.Contains(string(got), "not really a png") {
		t.Errorf("/view of the upload: %d %q", status, got)
	}
}

func TestServerThatReturnsLosesItsCopies(t *testing.T) {
	tf := newTestFleet(t, []comfytest.Options{{}, {}})
	for _, fk := range tf.fakes {
		fk.SetNodeDelay(200 * time.Millisecond)
	}
	gpu2, _ := tf.pool.Get("gpu2")
	gpu2.SetDraining(true)
	id1 := tf.queue(t, workflow("r1"))
	id2 := tf.queue(t, workflow("r2"))
	gpu2.SetDraining(false)
	// gpu1 looks dead for a while (a partition): its prompts go to gpu2.
	gpu1, _ := tf.pool.Get("gpu1")
	gpu1.SetHealthy(false)
	ctx := context.Background()
	active, _ := tf.store.Active(ctx)
	tf.reconcile(ctx, tf.all(), active, time.Now())
	p2, _, _ := tf.store.Get(ctx, id2)
	if p2.Server != "gpu2" || len(p2.Stale) != 1 {
		t.Fatalf("after gpu1 went away: %+v; want on gpu2 with gpu1 stale", p2)
	}
	// gpu1 is back: the waiting copy there is deleted.
	tf.Tick(ctx)
	found := false
	for _, r := range tf.fakes[0].Requests() {
		if r.Method == "POST" && r.Path == "/api/queue" && strings.Contains(string(r.Body), p2.Stale[0].ServerID) {
			found = true
		}
	}
	if !found {
		t.Error("the stale copy on gpu1 was not deleted when it came back")
	}
	tf.waitDone(t, id1)
	tf.waitDone(t, id2)
}

func TestInterruptStopsOnlyThatPrompt(t *testing.T) {
	tf := newTestFleet(t, []comfytest.Options{{}, {}}) // 0.3.7: an interrupt stops whatever runs
	for _, fk := range tf.fakes {
		fk.SetNodeDelay(300 * time.Millisecond)
	}
	a := tf.queue(t, workflow("a"))
	b := tf.queue(t, workflow("b"))
	pb, _, _ := tf.store.Get(context.Background(), b)
	// Wait until a runs, then interrupt it by its id.
	waitQueue := func() {
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			_, q := tf.do(t, "GET", "/api/queue", nil)
			var v struct {
				R [][]any `json:"queue_running"`
			}
			json.Unmarshal(q, &v)
			if len(v.R) == 2 {
				return
			}
		}
		t.Fatal("the prompts never both ran")
	}
	waitQueue()
	if status, _ := tf.do(t, "POST", "/api/interrupt", map[string]any{"prompt_id": a}); status != 200 {
		t.Fatalf("interrupt: %d", status)
	}
	ha := tf.waitDone(t, a)
	hb := tf.waitDone(t, b)
	sa, _ := json.Marshal(ha["status"])
	sb, _ := json.Marshal(hb["status"])
	if !strings.Contains(string(sa), "execution_interrupted") {
		t.Errorf("prompt a was not interrupted: %s", sa)
	}
	if strings.Contains(string(sb), "execution_interrupted") {
		t.Errorf("prompt b on %s was interrupted too: %s", pb.Server, sb)
	}
	// An id that runs nowhere stops nothing.
	c := tf.queue(t, workflow("c"))
	if status, _ := tf.do(t, "POST", "/api/interrupt", map[string]any{"prompt_id": "nobody"}); status != 200 {
		t.Errorf("interrupt of an unknown id: %d; want 200", status)
	}
	hc := tf.waitDone(t, c)
	if sc, _ := json.Marshal(hc["status"]); strings.Contains(string(sc), "execution_interrupted") {
		t.Errorf("an interrupt of an unknown id stopped another prompt: %s", sc)
	}
}

// cutter forwards TCP connections to a server and can cut them all, and
// refuse new ones for a while: a network drop between gateway and server.
type cutter struct {
	ln      net.Listener
	target  string
	mu      sync.Mutex
	conns   []net.Conn
	refuseT time.Time
}

func newCutter(t *testing.T, target string) *cutter {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &cutter{ln: ln, target: target}
	go func() {
		for {
			in, err := ln.Accept()
			if err != nil {
				return
			}
			c.mu.Lock()
			refuse := time.Now().Before(c.refuseT)
			c.mu.Unlock()
			if refuse {
				in.Close()
				continue
			}
			out, err := net.Dial("tcp", target)
			if err != nil {
				in.Close()
				continue
			}
			c.mu.Lock()
			c.conns = append(c.conns, in, out)
			c.mu.Unlock()
			go func() { io.Copy(out, in); out.Close() }()
			go func() { io.Copy(in, out); in.Close() }()
		}
	}()
	t.Cleanup(func() { ln.Close(); c.cut(0) })
	return c
}

// cut closes every connection and refuses new ones for d.
func (c *cutter) cut(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.refuseT = time.Now().Add(d)
	for _, conn := range c.conns {
		conn.Close()
	}
	c.conns = nil
}

func TestSocketDropLosesNoEnd(t *testing.T) {
	fk := comfytest.New(t, comfytest.Options{})
	fk.SetNodeDelay(300 * time.Millisecond)
	cut := newCutter(t, strings.TrimPrefix(fk.URL(), "http://"))
	u, _ := url.Parse("http://" + cut.ln.Addr().String())
	tf := serveFleet(t, []upstream.Spec{{Name: "gpu1", URL: u}}, []*comfytest.Fake{fk}, Options{PollInterval: time.Hour}, nil)
	ctx := t.Context()
	tf.Tick(ctx)
	h := tf.opts.Hub
	if err := fk.WaitSocket(ctx, h.ID); err != nil {
		t.Fatal(err)
	}
	ws := tf.dialWS(t, "tester")
	id := tf.queue(t, workflow("drop"))
	// At the prompt's start, the network between gateway and server drops
	// for longer than the prompt runs.
	for started := false; !started; {
		select {
		case m := <-ws:
			started = m.typ == "execution_start"
		case <-time.After(10 * time.Second):
			t.Fatal("no execution_start on the client's socket")
		}
	}
	cut.cut(time.Second)
	got := untilEnd(t, ws, id)
	var executed bool
	for _, m := range got {
		executed = executed || m.typ == "executed" && strings.Contains(string(m.raw), `"subfolder":"@gpu1"`)
	}
	if !executed {
		t.Errorf("after the drop the client got no executed message with its output: %d messages", len(got))
	}
}

// TestPromptBeforeServerSocket: a prompt queued on a server before the
// hub's socket to it opens (the gateway just started, or the server just
// joined) still ends on the client's socket, with its output.
func TestPromptBeforeServerSocket(t *testing.T) {
	fk := comfytest.New(t, comfytest.Options{})
	tf := serveFleet(t, specsOf([]*comfytest.Fake{fk}), []*comfytest.Fake{fk}, Options{PollInterval: time.Hour}, nil)
	ctx := t.Context()
	h := tf.opts.Hub

	// No tick yet: the hub has no socket to gpu1, so gpu1 sends the
	// prompt's messages to nobody.
	ws := tf.dialWS(t, "tester")
	id := tf.queue(t, workflow("early"))
	tf.waitDone(t, id)
	if got := fk.Received(h.ID); len(got) != 0 {
		t.Fatalf("the hub had a socket to gpu1 before the first tick: %d messages", len(got))
	}
	tf.Tick(ctx)
	got := untilEnd(t, ws, id)
	var executed bool
	for _, m := range got {
		executed = executed || m.typ == "executed" && m.data["prompt_id"] == id && strings.Contains(string(m.raw), `"subfolder":"@gpu1"`)
	}
	if !executed {
		t.Errorf("the client got no executed message with its output: %d messages", len(got))
	}
}
