package server

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/comfygate/comfygate/internal/comfytest"
)

// dialWS opens a WebSocket to the gateway at path.
func dialWS(ctx context.Context, g *gateway, path string, header http.Header, tlsConf *tls.Config) (*websocket.Conn, *http.Response, error) {
	u := "ws" + strings.TrimPrefix(g.URL, "http") + path
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: tlsConf}}
	opts := &websocket.DialOptions{HTTPHeader: header, HTTPClient: hc}
	if h := header.Get("Host"); h != "" {
		opts.Host = h
	}
	c, resp, err := websocket.Dial(ctx, u, opts)
	if c != nil {
		c.SetReadLimit(64 << 20)
	}
	return c, resp, err
}

func readJSON(t *testing.T, ctx context.Context, c *websocket.Conn) map[string]any {
	t.Helper()
	typ, b, err := c.Read(ctx)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	if typ != websocket.MessageText {
		t.Fatalf("got a %v frame; want text", typ)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("message %q: %v", b, err)
	}
	return m
}

// exchange proves a socket works both ways with text and binary frames.
func exchange(t *testing.T, ctx context.Context, g *gateway, c *websocket.Conn, clientID string) {
	t.Helper()
	first := readJSON(t, ctx, c)
	data, _ := first["data"].(map[string]any)
	if first["type"] != "status" || data["sid"] != clientID {
		t.Fatalf("first message %v; want status with sid %q", first, clientID)
	}
	if err := c.Write(ctx, websocket.MessageText, []byte(`{"type":"hello"}`)); err != nil {
		t.Fatal(err)
	}
	bin := bytes.Repeat([]byte{0, 1, 2, 0xff}, 40000) // 160 KB, several frames' worth of TCP
	if err := c.Write(ctx, websocket.MessageBinary, bin); err != nil {
		t.Fatal(err)
	}
	preview := append([]byte{0, 0, 0, 1, 0, 0, 0, 2}, bytes.Repeat([]byte{0x89, 'P', 'N', 'G'}, 20000)...)
	if err := g.Fake.Send(clientID, true, preview); err != nil {
		t.Fatal(err)
	}
	if err := g.Fake.Send(clientID, false, []byte(`{"type":"progress","data":{"value":1,"max":2}}`)); err != nil {
		t.Fatal(err)
	}
	typ, got, err := c.Read(ctx)
	if err != nil || typ != websocket.MessageBinary || !bytes.Equal(got, preview) {
		t.Fatalf("binary from ComfyUI: type %v, %d bytes, err %v", typ, len(got), err)
	}
	if m := readJSON(t, ctx, c); m["type"] != "progress" {
		t.Fatalf("text from ComfyUI: %v", m)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		rec := g.Fake.Received(clientID)
		if len(rec) >= 2 {
			if rec[0].Binary || string(rec[0].Data) != `{"type":"hello"}` || !rec[1].Binary || !bytes.Equal(rec[1].Data, bin) {
				t.Fatalf("ComfyUI received %d frames, not the ones sent", len(rec))
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ComfyUI received %d frames; want 2", len(rec))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestWebSocketOpenByDefault(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key-file", keyFile(t, testKey2))
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	for _, path := range []string{"/ws", "/api/ws"} {
		c, _, err := dialWS(ctx, g, path+"?clientId=open-1", nil, nil)
		if err != nil {
			t.Fatalf("%s without key: %v", path, err)
		}
		exchange(t, ctx, g, c, "open-1")
		c.Close(websocket.StatusNormalClosure, "")
	}
}

func TestWebSocketProtected(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key-file", keyFile(t, testKey2), "--protect-ws")
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()

	for _, tt := range []struct {
		name, query string
		header      http.Header
	}{
		{"no key", "", nil},
		{"wrong query key", "&token=nope", nil},
		{"wrong header", "", http.Header{"X-Api-Key": {"nope"}}},
	} {
		g.Fake.Reset()
		_, resp, err := dialWS(ctx, g, "/ws?clientId=p1"+tt.query, tt.header, nil)
		if err == nil || resp == nil || resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("%s: err %v, response %v; want 401", tt.name, err, resp)
		}
		if n := len(g.Fake.Requests()); n != 0 {
			t.Errorf("%s: reached ComfyUI", tt.name)
		}
	}

	for i, tt := range []struct {
		name, query string
		header      http.Header
	}{
		{"token query (ComfyUI-Login clients)", "&token=" + testKey2, nil},
		{"api_key query", "&api_key=" + testKey2, nil},
		{"bearer header", "", http.Header{"Authorization": {"Bearer " + testKey2}}},
	} {
		id := "p-ok-" + string(rune('a'+i))
		g.Fake.Reset()
		c, _, err := dialWS(ctx, g, "/ws?clientId="+id+tt.query, tt.header, nil)
		if err != nil {
			t.Fatalf("%s: %v", tt.name, err)
		}
		exchange(t, ctx, g, c, id)
		c.Close(websocket.StatusNormalClosure, "")
		if seen := credentialsSeen(g.Fake); len(seen) > 0 {
			t.Errorf("%s: credentials reached ComfyUI: %q", tt.name, seen)
		}
		r, _ := g.Fake.LastRequest()
		if r.RawQuery != "clientId="+id {
			t.Errorf("%s: upstream query %q", tt.name, r.RawQuery)
		}
	}
}

// TestWebSocketFullRun follows the standard API flow through the gateway:
// socket, prompt, the sample's message order, history, /view.
func TestWebSocketFullRun(t *testing.T) {
	g := start(t, comfytest.Options{PreviewFrames: 2}, "--api-key-file", keyFile(t, testKey2), "--protect-ws")
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Second)
	defer cancel()
	c, _, err := dialWS(ctx, g, "/ws?clientId=run-1&token="+testKey2, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseNow()
	readJSON(t, ctx, c) // greeting

	prompt := `{"client_id":"run-1","prompt":{"1":{"class_type":"EmptyImage","inputs":{"width":64,"height":64,"batch_size":1,"color":16746496}},` +
		`"2":{"class_type":"ImageInvert","inputs":{"image":["1",0]}},"3":{"class_type":"SaveImage","inputs":{"images":["2",0],"filename_prefix":"gw"}}}}`
	resp, body := do(t, "POST", g.URL+"/prompt", strings.NewReader(prompt), "Content-Type", "text/plain;charset=UTF-8", "X-API-Key", testKey2)
	if resp.StatusCode != 200 {
		t.Fatalf("POST /prompt as text/plain: %d %s", resp.StatusCode, body)
	}
	var pr struct {
		PromptID string `json:"prompt_id"`
	}
	json.Unmarshal(body, &pr)

	var types []string
	binaries := 0
	for {
		typ, b, err := c.Read(ctx)
		if err != nil {
			t.Fatalf("after %v: %v", types, err)
		}
		if typ == websocket.MessageBinary {
			binaries++
			continue
		}
		var m struct {
			Type string
			Data struct {
				Node     *string
				PromptID string `json:"prompt_id"`
			}
		}
		json.Unmarshal(b, &m)
		types = append(types, m.Type)
		if m.Type == "executing" && m.Data.Node == nil && m.Data.PromptID == pr.PromptID {
			break
		}
	}
	want := "status status execution_start execution_cached executing executing executing executed execution_success status executing"
	if got := strings.Join(types, " "); got != want {
		t.Errorf("message order:\n got %s\nwant %s", got, want)
	}
	if binaries != 2 {
		t.Errorf("%d binary previews; want 2", binaries)
	}
	resp, body = do(t, "GET", g.URL+"/history/"+pr.PromptID, nil, "X-API-Key", testKey2)
	if resp.StatusCode != 200 || !strings.Contains(string(body), pr.PromptID) {
		t.Fatalf("history: %d %s", resp.StatusCode, body)
	}
	// The socket's log line, written when it closes, counts what it carried.
	c.Close(websocket.StatusNormalClosure, "")
	eventually(t, 5*time.Second, "no log line with bytes for the socket", func() bool {
		for _, l := range strings.Split(g.logs.String(), "\n") {
			if strings.Contains(l, `"path":"/ws?clientId=run-1&token=REDACTED","status":101`) && !strings.Contains(l, `"bytes":0,`) && strings.Contains(l, `"bytes_in":`) {
				return true
			}
		}
		return false
	})
}

// TestShutdownClosesWebSocketsGoingAway pins the 1001 close on SIGTERM.
func TestShutdownClosesWebSocketsGoingAway(t *testing.T) {
	g := start(t, comfytest.Options{}, "--shutdown-timeout", "5s")
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	c, _, err := dialWS(ctx, g, "/ws?clientId=bye", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseNow()
	readJSON(t, ctx, c)
	big := bytes.Repeat([]byte("x"), 1<<20)
	if err := g.Fake.Send("bye", true, big); err != nil {
		t.Fatal(err)
	}
	typ, got, err := c.Read(ctx)
	if err != nil || typ != websocket.MessageBinary || len(got) != len(big) {
		t.Fatalf("frame: %v, %d bytes, %v", typ, len(got), err)
	}
	if n := g.Server.Proxy().OpenStreams(); n != 1 {
		t.Errorf("OpenStreams = %d; want 1", n)
	}
	stopped := make(chan error, 1)
	go func() { stopped <- g.stop(t) }()

	_, _, err = c.Read(ctx)
	if status := websocket.CloseStatus(err); status != websocket.StatusGoingAway {
		t.Fatalf("close status %v (%v); want 1001 going away", status, err)
	}
	if err := <-stopped; err != nil {
		t.Errorf("Serve returned %v", err)
	}
	if n := g.Server.Proxy().OpenStreams(); n != 0 {
		t.Errorf("OpenStreams after shutdown = %d", n)
	}
}

// TestLongIdleWebSocket: the gateway sets no deadline on an upgraded
// connection, so a socket silent longer than the server's read-header and
// idle timeouts (and the body timeout) stays open. The timeouts are short
// here, and the test waits until they have closed a stalled request and an
// idle keep-alive connection opened after the socket, rather than sleeping.
func TestLongIdleWebSocket(t *testing.T) {
	const timeout = 200 * time.Millisecond
	g := start(t, comfytest.Options{}, "--header-timeout", timeout.String(), "--idle-timeout", timeout.String(),
		"--body-timeout", timeout.String())
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	c, _, err := dialWS(ctx, g, "/ws?clientId=idle", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseNow()
	readJSON(t, ctx, c)

	// A request whose headers never end, and a keep-alive connection that
	// goes idle after one answer: the server closes both once its timeouts
	// have run out.
	stalled := dialRaw(t, g.Addr)
	if _, err := io.WriteString(stalled, "GET /health/live HTTP/1.1\r\nHost: gw\r\n"); err != nil {
		t.Fatal(err)
	}
	idle := dialRaw(t, g.Addr)
	if _, err := io.WriteString(idle, "GET /health/live HTTP/1.1\r\nHost: gw\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(idle)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	waitClosedByServer(t, "a request with unfinished headers (--header-timeout)", stalled, stalled)
	waitClosedByServer(t, "an idle keep-alive connection (--idle-timeout)", idle, br)

	if err := g.Fake.Send("idle", false, []byte(`{"type":"executing","data":{"node":null}}`)); err != nil {
		t.Fatal(err)
	}
	if m := readJSON(t, ctx, c); m["type"] != "executing" {
		t.Fatalf("after idle: %v", m)
	}
	if err := c.Close(websocket.StatusNormalClosure, ""); err != nil && !errors.Is(err, context.Canceled) {
		t.Logf("close: %v", err)
	}
}

// dialRaw opens a TCP connection to addr, closed at the end of the test.
func dialRaw(t *testing.T, addr string) net.Conn {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// waitClosedByServer reads conn (through r) to its end, and fails if the
// server has not closed it within 10s.
func waitClosedByServer(t *testing.T, what string, conn net.Conn, r io.Reader) {
	t.Helper()
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.Copy(io.Discard, r); errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the server did not close %s", what)
	}
}
