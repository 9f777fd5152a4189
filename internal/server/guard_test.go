package server

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/comfygate/comfygate/internal/comfytest"
	"github.com/comfygate/comfygate/internal/config"
)

// rawExchange writes req on a new connection to addr (then half-closes it
// when halfClose is set) and returns everything the gateway sent until it
// closed the connection. It fails the test if the gateway keeps the
// connection open for longer than wait.
func rawExchange(t *testing.T, addr, req string, halfClose bool, wait time.Duration) string {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(wait))
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	if halfClose {
		c.(*net.TCPConn).CloseWrite()
	}
	b, err := io.ReadAll(c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("the gateway kept the connection open for %v; it sent %q", wait, b)
	}
	return string(b)
}

// statusOf parses the first answer in raw and returns its status and body.
func statusOf(t *testing.T, raw string) (int, string) {
	t.Helper()
	res, err := http.ReadResponse(bufio.NewReader(strings.NewReader(raw)), nil)
	if err != nil {
		t.Fatalf("no HTTP answer in %q: %v", raw, err)
	}
	body, _ := io.ReadAll(res.Body)
	return res.StatusCode, string(body)
}

// logLines returns the gateway's JSON log lines with msg.
func logLines(t *testing.T, g *gateway, msg string) []map[string]any {
	t.Helper()
	var out []map[string]any
	for l := range strings.SplitSeq(g.logs.String(), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(l), &m) == nil && m["msg"] == msg {
			out = append(out, m)
		}
	}
	return out
}

// TestMethodsComfyUINeverUses pins that methods ComfyUI has no route for
// are refused before the key check and never reach it. A CONNECT with a
// body once desynchronised a pooled connection to ComfyUI, so that the
// request hidden in its body was answered to another client.
func TestMethodsComfyUINeverUses(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key", testKey)
	for _, m := range []string{"CONNECT", "TRACE", "PROPFIND", "BREW"} {
		target := "/prompt"
		if m == "CONNECT" {
			target = "comfy:443"
		}
		smuggled := "GET /history HTTP/1.1\r\nHost: x\r\nX-API-Key: " + testKey + "\r\n\r\n"
		raw := rawExchange(t, g.Addr, m+" "+target+" HTTP/1.1\r\nHost: x\r\nX-API-Key: "+testKey+
			"\r\nContent-Length: "+strconv.Itoa(len(smuggled))+"\r\n\r\n"+smuggled, false, 5*time.Second)
		status, body := statusOf(t, raw)
		if status != http.StatusMethodNotAllowed || !strings.Contains(body, `"method_not_allowed"`) {
			t.Errorf("%s: %d %s; want 405 method_not_allowed", m, status, body)
		}
		if strings.Count(raw, "HTTP/1.1 ") != 1 {
			t.Errorf("%s: the gateway answered more than once on the connection:\n%s", m, raw)
		}
	}
	if reqs := g.Fake.Requests(); len(reqs) != 0 {
		t.Errorf("ComfyUI received %d requests; want none: %+v", len(reqs), reqs)
	}
	// Another client on a fresh connection gets its own answer.
	resp, body := do(t, "GET", g.URL+"/api/queue", nil, "X-API-Key", testKey)
	if resp.StatusCode != 200 || !strings.Contains(string(body), "queue_running") {
		t.Errorf("next client: %d %s", resp.StatusCode, body)
	}
}

// TestBodyOnPublicGETRefused pins that a public GET or HEAD (the page, a
// static file, the WebSocket) with a body is refused: it would otherwise be
// streamed to ComfyUI without a key.
func TestBodyOnPublicGETRefused(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key", testKey)
	for _, req := range []string{
		"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
		"GET /assets/index.js HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
		"HEAD /favicon.ico HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
		"GET /ws?clientId=a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
		// Not a body, but a target that is not a path is refused too.
		// (OPTIONS * never gets this far: net/http answers it itself.)
		"GET a:b HTTP/1.1\r\nHost: x\r\n\r\n",
	} {
		raw := rawExchange(t, g.Addr, req, false, 5*time.Second)
		first, _, _ := strings.Cut(req, "\r\n")
		if !strings.HasPrefix(raw, "HTTP/1.1 400 ") {
			t.Errorf("%s: got %q; want 400", first, raw)
		}
	}
	if reqs := g.Fake.Requests(); len(reqs) != 0 {
		t.Errorf("ComfyUI received %+v; want nothing", reqs)
	}
}

// TestPreflights pins who answers a CORS preflight: ComfyUI for a public
// path, comfygate for a protected one (a preflight carries no key, so it
// must not become a way to reach a protected route without one), with the
// --enable-cors-header origin when set.
func TestPreflights(t *testing.T) {
	tests := []struct {
		name       string
		args       []string
		path       string
		wantComfy  bool
		wantOrigin string
	}{
		{"protected, CORS off", nil, "/api/prompt", false, ""},
		{"protected, /api twin", nil, "/prompt", false, ""},
		{"protected, CORS on", []string{"--enable-cors-header", "https://app.example"}, "/api/prompt", false, "https://app.example"},
		{"protected, bare flag", []string{"--enable-cors-header"}, "/api/view?filename=a.png", false, "*"},
		{"public", nil, "/assets/index.js", true, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := start(t, comfytest.Options{}, append([]string{"--api-key", testKey}, tt.args...)...)
			resp, _ := do(t, "OPTIONS", g.URL+tt.path, nil, "Host", "comfy.example.com",
				"Origin", "https://app.example", "Access-Control-Request-Method", "POST",
				"Access-Control-Request-Headers", "authorization")
			if resp.StatusCode != 200 {
				t.Errorf("status %d; want 200", resp.StatusCode)
			}
			_, reached := g.Fake.LastRequest()
			if reached != tt.wantComfy {
				t.Errorf("reached ComfyUI: %v; want %v", reached, tt.wantComfy)
			}
			if got := resp.Header.Get("Access-Control-Allow-Origin"); got != tt.wantOrigin {
				t.Errorf("Access-Control-Allow-Origin %q; want %q", got, tt.wantOrigin)
			}
			if tt.wantOrigin != "" && !strings.Contains(resp.Header.Get("Access-Control-Allow-Headers"), "Authorization") {
				t.Errorf("Access-Control-Allow-Headers %q lacks Authorization", resp.Header.Get("Access-Control-Allow-Headers"))
			}
		})
	}
}

// TestCORSHeadersOnAnswers pins that with --enable-cors-header ComfyUI's
// answers carry the CORS headers once, whether or not ComfyUI adds its own.
func TestCORSHeadersOnAnswers(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key", testKey, "--enable-cors-header", "https://app.example")
	resp, _ := do(t, "GET", g.URL+"/api/queue", nil, "X-API-Key", testKey, "Origin", "https://app.example")
	if got := resp.Header.Values("Access-Control-Allow-Origin"); len(got) != 1 || got[0] != "https://app.example" {
		t.Errorf("Access-Control-Allow-Origin %q; want exactly https://app.example", got)
	}
}

// TestKeyInRefererNeverReachesComfyUI pins that a key in the Referer (a page
// opened as /?token=KEY sends that URL with everything it loads) is removed
// before ComfyUI, which would log it.
func TestKeyInRefererNeverReachesComfyUI(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key", testKey)
	for _, ref := range []string{
		"http://gw/?token=" + testKey + "&x=1",
		"http://gw/page?x=1&api_key=" + testKey,
		"http://gw/?api%5Fkey=" + testKey,
	} {
		g.Fake.Reset()
		resp, _ := do(t, "GET", g.URL+"/api/queue", nil, "X-API-Key", testKey, "Referer", ref)
		if resp.StatusCode != 200 {
			t.Fatalf("status %d", resp.StatusCode)
		}
		r, ok := g.Fake.LastRequest()
		if !ok {
			t.Fatal("no request reached ComfyUI")
		}
		got := r.Header.Get("Referer")
		if strings.Contains(got, testKey) || strings.Contains(got, "token") || strings.Contains(got, "api") {
			t.Errorf("Referer %q reached ComfyUI as %q", ref, got)
		}
		if !strings.HasPrefix(got, "http://gw/") {
			t.Errorf("Referer %q became %q; want the rest kept", ref, got)
		}
	}
}

// TestHeldOpenBody pins the deadline on request bodies: a client that
// sends headers and then nothing must not hold a connection (300 such
// sockets once took a gateway with 256 file descriptors down for good). An
// authenticated request gets 408 once --body-timeout passes without a
// byte; an unauthenticated one is refused at once and its connection
// closed, without waiting for the body.
func TestHeldOpenBody(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key", testKey, "--body-timeout", "300ms")
	head := "POST /api/prompt HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n"

	t.Run("with a key", func(t *testing.T) {
		raw := rawExchange(t, g.Addr, head+"X-API-Key: "+testKey+"\r\n\r\n{\"pro", false, 10*time.Second)
		if status, body := statusOf(t, raw); status != http.StatusRequestTimeout || !strings.Contains(body, `"request_timeout"`) {
			t.Errorf("%d %s; want 408 request_timeout", status, body)
		}
	})
	t.Run("without a key", func(t *testing.T) {
		// The whole exchange must end well inside the body timeout
		// multiplied many times over; the bound only catches a hang.
		raw := rawExchange(t, g.Addr, head+"\r\n", false, 10*time.Second)
		if status, _ := statusOf(t, raw); status != http.StatusUnauthorized {
			t.Errorf("status %d; want 401", status)
		}
	})
	t.Run("many at once", func(t *testing.T) {
		conns := make([]net.Conn, 50)
		for i := range conns {
			c, err := net.Dial("tcp", g.Addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			io.WriteString(c, head+"X-API-Key: "+testKey+"\r\n\r\n")
			conns[i] = c
		}
		for i, c := range conns {
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			b, err := io.ReadAll(c)
			if err != nil || !strings.HasPrefix(string(b), "HTTP/1.1 408 ") {
				t.Fatalf("connection %d: %q, %v; want 408 and a close", i, b, err)
			}
		}
	})
	if n := len(logLines(t, g, "upstream connection failed")) + len(logLines(t, g, "upstream unreachable")); n != 0 {
		t.Errorf("%d upstream errors logged for slow clients", n)
	}
}

// TestClientFaultsAreNotComfyUIs pins whose fault a failed request is, in
// the status, the log and the metrics: a malformed or cut-short body and a
// body over the limit are the client's (4xx, no upstream error counted, no
// upstream WARN), so nobody can fire ComfyUI-outage alerts with a key and
// some garbage.
func TestClientFaultsAreNotComfyUIs(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key", testKey, "--max-upload-size", "0.001") // 1048 bytes
	head := "POST /api/prompt HTTP/1.1\r\nHost: x\r\nX-API-Key: " + testKey + "\r\nContent-Type: application/json\r\n"
	big := strings.Repeat("x", 4000)
	tests := []struct {
		name      string
		req       string
		halfClose bool
		status    int
		code      string
	}{
		{"malformed chunked body", head + "Transfer-Encoding: chunked\r\n\r\nzz\r\nxx\r\n", false, 400, "bad_request"},
		{"body cut short", head + "Content-Length: 100\r\n\r\n{\"prompt\":", true, 400, "bad_request"},
		{"declared length over the limit", head + "Content-Length: 4000\r\n\r\n" + big, false, 413, "request_too_large"},
		{"chunked body over the limit", head + "Transfer-Encoding: chunked\r\n\r\nfa0\r\n" + big + "\r\n0\r\n\r\n", false, 413, "request_too_large"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			raw := rawExchange(t, g.Addr, tt.req, tt.halfClose, 10*time.Second)
			status, body := statusOf(t, raw)
			if status != tt.status || !strings.Contains(body, `"`+tt.code+`"`) {
				t.Errorf("%d %s; want %d %s", status, body, tt.status, tt.code)
			}
		})
	}
	reg := g.Server.Metrics().Registry()
	if n := testutil.CollectAndCount(reg, "comfygate_upstream_errors_total"); n != 0 {
		t.Errorf("comfygate_upstream_errors_total has %d series; want none", n)
	}
	for _, l := range logLines(t, g, "request") {
		if l["level"] != "INFO" {
			t.Errorf("request line at level %v; want INFO: %v", l["level"], l)
		}
	}
	for _, msg := range []string{"upstream connection failed", "upstream unreachable", "upstream timeout"} {
		if n := len(logLines(t, g, msg)); n != 0 {
			t.Errorf("%d %q lines for client faults", n, msg)
		}
	}
	if got := testutil.ToFloat64(mustCounter(t, reg, "comfygate_http_requests_total", "route", "/prompt", "method", "POST", "code", "400")); got != 2 {
		t.Errorf("requests_total{code=400} = %v; want 2", got)
	}
}

// TestClientGoneGetsNoInventedStatus pins that a client that half-closes
// after its request, and so leaves while ComfyUI is still working on it,
// is sent nothing (once it got "HTTP/1.1 499", a code that exists only in
// nginx's logs), and that the log records it as 499, at INFO, with no
// upstream error counted.
func TestClientGoneGetsNoInventedStatus(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key", testKey)
	g.Fake.SetDelay("/history", 2*time.Second)
	raw := rawExchange(t, g.Addr, "GET /api/history HTTP/1.1\r\nHost: x\r\nX-API-Key: "+testKey+"\r\n\r\n", true, 10*time.Second)
	if raw != "" {
		t.Errorf("a client that left was sent %q; want nothing", raw)
	}
	var line map[string]any
	for deadline := time.Now().Add(5 * time.Second); line == nil && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		for _, l := range logLines(t, g, "request") {
			if l["path"] == "/api/history" {
				line = l
			}
		}
	}
	if line == nil {
		t.Fatal("no request line for the canceled request")
	}
	if line["status"] != float64(499) || line["level"] != "INFO" || line["aborted"] != nil {
		t.Errorf("request line %v; want status 499 at INFO, not aborted", line)
	}
	if n := testutil.CollectAndCount(g.Server.Metrics().Registry(), "comfygate_upstream_errors_total"); n != 0 {
		t.Errorf("comfygate_upstream_errors_total has %d series; want none", n)
	}
}

// TestComfyUIDownIsComfyUIs pins the other side: ComfyUI not listening is a
// 502 with reason "unreachable", logged at WARN.
func TestComfyUIDownIsComfyUIs(t *testing.T) {
	fake := comfytest.New(t, comfytest.Options{})
	g := startWith(t, fake, "--upstream", "http://"+deadAddr(t), "--api-key", testKey)
	resp, body := do(t, "POST", g.URL+"/api/prompt", strings.NewReader(`{"prompt":{}}`), "X-API-Key", testKey)
	if resp.StatusCode != 502 || !strings.Contains(string(body), "upstream_unavailable") {
		t.Errorf("%d %s; want 502 upstream_unavailable", resp.StatusCode, body)
	}
	reg := g.Server.Metrics().Registry()
	if got := testutil.ToFloat64(mustCounter(t, reg, "comfygate_upstream_errors_total", "reason", "unreachable")); got != 1 {
		t.Errorf("upstream_errors_total{reason=unreachable} = %v; want 1", got)
	}
	if l := logLines(t, g, "upstream unreachable"); len(l) != 1 || l[0]["level"] != "WARN" {
		t.Errorf("upstream unreachable lines: %v; want one at WARN", l)
	}
}

// TestRefusedUploadIsAnsweredNotReset pins the lingering close: a client
// that sends its whole body before it reads (Python's urllib, curl) must
// receive the gateway's refusal, not a connection reset. Closing a socket
// with the upload still arriving makes the kernel send a reset that
// destroyed the 413 in flight (urllib: ConnectionResetError 8 times of 8).
func TestRefusedUploadIsAnsweredNotReset(t *testing.T) {
	g := start(t, comfytest.Options{}, "--api-key", testKey, "--max-upload-size", "1")
	body := bytes.Repeat([]byte("x"), 5<<20)
	cases := []struct {
		name   string
		key    string
		status int
		code   string
	}{
		{"over --max-upload-size", "X-API-Key: " + testKey + "\r\n", http.StatusRequestEntityTooLarge, "request_too_large"},
		{"without a key", "", http.StatusUnauthorized, "unauthorized"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			for range 5 {
				c, err := net.Dial("tcp", g.Addr)
				if err != nil {
					t.Fatal(err)
				}
				c.SetDeadline(time.Now().Add(20 * time.Second))
				head := "POST /api/upload/image HTTP/1.1\r\nHost: x\r\n" + tc.key +
					"Content-Type: application/octet-stream\r\nContent-Length: " + strconv.Itoa(len(body)) + "\r\n\r\n"
				sent := make(chan error, 1)
				go func() {
					_, err := c.Write(append([]byte(head), body...))
					sent <- err
				}()
				if err := <-sent; err != nil {
					t.Fatalf("sending the upload: %v (the gateway reset the connection)", err)
				}
				res, err := http.ReadResponse(bufio.NewReader(c), nil)
				if err != nil {
					t.Fatalf("reading the answer: %v; want %d", err, tc.status)
				}
				got, err := io.ReadAll(res.Body)
				if err != nil {
					t.Fatalf("reading the answer's body: %v", err)
				}
				if res.StatusCode != tc.status || !strings.Contains(string(got), tc.code) {
					t.Fatalf("%d %s; want %d %s", res.StatusCode, got, tc.status, tc.code)
				}
				c.Close()
			}
		})
	}
}

// TestUpstreamLoop pins the run-time loop check: a gateway whose --upstream
// leads back to itself (here its own port, which the start-up check cannot
// know from the flags) answers 508 after one round, instead of forwarding
// to itself until file descriptors run out (29,000 log lines in 4 s). A
// gateway in front of another gateway is no loop.
func TestUpstreamLoop(t *testing.T) {
	t.Run("upstream is the gateway itself", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		cfg, err := config.Load([]string{"--upstream", "http://" + ln.Addr().String(), "--metrics-interval", "1h"},
			func(string) (string, bool) { return "", false })
		if err != nil {
			t.Fatal(err)
		}
		logs := &syncBuffer{}
		srv, err := New(cfg, slog.New(slog.NewJSONHandler(logs, nil)), "test", io.Discard)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- srv.Serve(ctx, []net.Listener{ln}, nil) }()
		t.Cleanup(func() { cancel(); <-done })

		res, err := http.Get("http://" + ln.Addr().String() + "/api/prompt")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode != http.StatusLoopDetected || !strings.Contains(string(body), `"loop_detected"`) {
			t.Fatalf("%d %s; want 508 loop_detected", res.StatusCode, body)
		}
		// The start-up check of ComfyUI goes round once too; count this
		// request's lines.
		g := &gateway{logs: logs}
		count := func(msg string) (n int) {
			for _, l := range logLines(t, g, msg) {
				if l["path"] == "/api/prompt" {
					n++
				}
			}
			return n
		}
		// The client's line is written as its handler returns, which may
		// be just after the answer reached the client.
		for deadline := time.Now().Add(2 * time.Second); count("request") < 2 && time.Now().Before(deadline); {
			time.Sleep(10 * time.Millisecond)
		}
		if n := count("request"); n != 2 {
			t.Errorf("%d requests logged; want 2 (the client's, and the one that came back)", n)
		}
		if n := count("request loop: this gateway received a request it forwarded itself; --upstream must be ComfyUI, not comfygate"); n != 1 {
			t.Errorf("%d loop warnings; want 1", n)
		}
	})
	t.Run("a gateway in front of a gateway", func(t *testing.T) {
		inner := start(t, comfytest.Options{})
		outer := startWith(t, inner.Fake, "--upstream", inner.URL)
		res, err := http.Get(outer.URL + "/api/prompt")
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if res.StatusCode != http.StatusOK {
			t.Fatalf("status %d through two gateways; want 200", res.StatusCode)
		}
		last, ok := inner.Fake.LastRequest()
		if !ok || last.Path != "/api/prompt" {
			t.Fatalf("ComfyUI's last request %+v; want GET /api/prompt", last)
		}
		if got := strings.Join(last.Header.Values("Via"), ","); strings.Count(got, "comfygate-") != 2 {
			t.Errorf("ComfyUI saw Via %q; want both gateways", got)
		}
	})
}
