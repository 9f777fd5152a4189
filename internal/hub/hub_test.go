package hub

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net/http/httptest"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

type nobody struct{}

func (nobody) Route(string, map[string]any) (string, string) { return "", "" }
func (nobody) Missed(string, time.Time) []map[string]any     { return nil }

func newTestHub(t testing.TB, opts Options) (*Hub, string) {
	opts.Logger = slog.New(slog.DiscardHandler)
	h := New(nobody{}, opts)
	srv := httptest.NewServer(h)
	t.Cleanup(func() { h.Close(); srv.Close() })
	return h, "ws" + strings.TrimPrefix(srv.URL, "http") + "/ws?clientId="
}

func waitClients(t testing.TB, h *Hub, n int) {
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if h.Open() == n {
			return
		}
	}
	t.Fatalf("%d client sockets; want %d", h.Open(), n)
}

// TestSlowClient pins the per-client bound: a client that does not read
// loses previews first, then its socket (1008), and never holds up a
// client that reads.
func TestSlowClient(t *testing.T) {
	h, base := newTestHub(t, Options{ClientQueue: 4})
	ctx := t.Context()
	fast, _, err := websocket.Dial(ctx, base+"fast", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer fast.CloseNow()
	fast.SetReadLimit(8 << 20)
	slow, _, err := websocket.Dial(ctx, base+"slow", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer slow.CloseNow()
	slow.SetReadLimit(8 << 20)
	waitClients(t, h, 2)

	// The slow client is sent 64 previews of 1 MiB and reads none; the
	// fast one reads each before the next is sent. Each must arrive.
	preview := bytes.Repeat([]byte{1}, 1<<20)
	for i := range 64 {
		h.deliver("slow", "", outMsg{typ: websocket.MessageBinary, data: preview, preview: true})
		h.deliver("fast", "", outMsg{typ: websocket.MessageBinary, data: preview, preview: true})
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		typ, _, err := fast.Read(rctx)
		cancel()
		for err == nil && typ != websocket.MessageBinary { // the greeting
			typ, _, err = fast.Read(ctx)
		}
		if err != nil {
			t.Fatalf("preview %d to the reading client: %v (held up by the one that does not read?)", i, err)
		}
	}
	// A message that matters, with the slow client's queue full: its
	// socket is closed.
	h.deliver("slow", "", outMsg{typ: websocket.MessageText, data: []byte(`{"type":"executed"}`)})
	waitClients(t, h, 1)
	var ce websocket.CloseError
	for {
		if _, _, err := slow.Read(ctx); err != nil {
			if !errors.As(err, &ce) || ce.Code != websocket.StatusPolicyViolation {
				t.Errorf("the slow socket ended with %v; want close 1008", err)
			}
			break
		}
	}
}

// BenchmarkIdleSockets measures the gateway's memory per idle client
// socket (1000 of them): go test -bench IdleSockets ./internal/hub
func BenchmarkIdleSockets(b *testing.B) {
	const n = 1000
	for b.Loop() {
		h, base := newTestHub(b, Options{})
		runtime.GC()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		g0 := runtime.NumGoroutine()
		ctx, cancel := context.WithCancel(context.Background())
		conns := make([]*websocket.Conn, 0, n)
		for i := range n {
			c, _, err := websocket.Dial(ctx, base+"c"+string(rune('a'+i%26))+strings.Repeat("x", i/26), nil)
			if err != nil {
				b.Fatal(err)
			}
			conns = append(conns, c)
		}
		waitClients(b, h, n)
		runtime.GC()
		runtime.ReadMemStats(&after)
		// Both ends live in this process: the figure is an upper bound.
		b.ReportMetric(float64(after.HeapInuse-before.HeapInuse+after.StackInuse-before.StackInuse)/n, "bytes/socket")
		b.ReportMetric(float64(runtime.NumGoroutine()-g0)/n, "goroutines/socket")
		for _, c := range conns {
			c.CloseNow()
		}
		cancel()
	}
}
