package requestlog

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/comfygate/comfygate/internal/reqscope"
)

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string { l.mu.Lock(); defer l.mu.Unlock(); return l.b.String() }

func newLogged(h http.Handler) (http.Handler, *lockedBuffer) {
	var out lockedBuffer
	mw := Middleware(slog.New(slog.NewJSONHandler(&out, nil)), func(q string) string { return q },
		func(*http.Request) netip.Addr { return netip.MustParseAddr("127.0.0.1") }, false, nil)
	return mw(h), &out
}

func TestLineFields(t *testing.T) {
	h, out := newLogged(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		scope := reqscope.From(r.Context())
		if scope.Route.Label != "/prompt" || scope.Client.String() != "127.0.0.1" {
			t.Errorf("scope %+v; want the /prompt entry and the client", scope)
		}
		scope.KeyName = "ci"
		w.WriteHeader(201)
		w.Write([]byte("hello"))
	}))
	h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("GET", "/api/prompt?a=1", nil))
	var line map[string]any
	if err := json.Unmarshal([]byte(out.String()), &line); err != nil {
		t.Fatalf("%v: %q", err, out.String())
	}
	for k, want := range map[string]any{"msg": "request", "method": "GET", "path": "/api/prompt?a=1",
		"status": 201.0, "bytes": 5.0, "client": "127.0.0.1", "key": "ci"} {
		if line[k] != want {
			t.Errorf("%s = %v; want %v", k, line[k], want)
		}
	}
	if _, ok := line["duration_ms"]; !ok {
		t.Error("no duration_ms")
	}
}

// A handler that hijacks the connection and returns while goroutines keep
// using it (the proxy's WebSocket path) is logged when the connection closes.
func TestHijackedLoggedOnClose(t *testing.T) {
	conns := make(chan net.Conn, 1)
	h, out := newLogged(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Error(err)
			return
		}
		brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
		brw.Flush()
		conns <- c
	}))
	srv := httptest.NewServer(h)
	defer srv.Close()
	c, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
	if _, err := http.ReadResponse(bufio.NewReader(c), nil); err != nil {
		t.Fatal(err)
	}
	hijacked := <-conns
	time.Sleep(50 * time.Millisecond) // the handler has returned
	if out.String() != "" {
		t.Fatalf("logged before the connection closed: %s", out.String())
	}
	hijacked.Close()
	var line map[string]any
	if err := json.Unmarshal([]byte(out.String()), &line); err != nil {
		t.Fatalf("%v: %q", err, out.String())
	}
	if line["status"] != 101.0 || line["path"] != "/ws" {
		t.Errorf("line %v; want status 101, path /ws", line)
	}
	hijacked.Close() // a second Close logs nothing more
	if n := bytes.Count([]byte(out.String()), []byte("\n")); n != 1 {
		t.Errorf("%d lines; want 1", n)
	}
}
