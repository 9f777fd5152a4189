package proxy

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/textproto"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/comfygate/comfygate/internal/jsonerr"
	"github.com/comfygate/comfygate/internal/session"
	"github.com/comfygate/comfygate/internal/upstream"
)

// Tests for the direct forwarding path (forward.go, pool.go): plain
// requests to an http:// ComfyUI written and read by the handler goroutine
// on comfygate's own connection pool.
//
// ComfyUI is played by rawUpstream, a bare TCP listener on 127.0.0.1 that
// answers with canned bytes. Unlike an httptest.Server it can send what
// net/http never would (two lengths, folded lines, a 101 out of nowhere, a
// body cut short), and it records every request byte for byte and the
// connection that carried it, so the tests assert what the upstream
// actually received and whether a connection was reused.

// clientTimeout bounds every client exchange, so that a proxy that waits
// for a body that never comes fails the test instead of hanging it.
const clientTimeout = 3 * time.Second

// seenRequest is one request as rawUpstream received it.
type seenRequest struct {
	conn   int         // the accepted connection that carried it, from 1
	line   string      // the request line
	head   string      // request line and header lines, as sent
	header http.Header // the header lines, parsed (Host included)
	body   []byte      // the body, de-chunked
}

// String keeps failure messages that print requests short.
func (r seenRequest) String() string {
	return fmt.Sprintf("{conn %d, %q, %d-byte body}", r.conn, r.line, len(r.body))
}

// reply is rawUpstream's answer to one request whose head has been read.
// It reports whether to go on serving the connection.
type reply func(u *rawUpstream, c net.Conn, br *bufio.Reader, req seenRequest) (keep bool)

// rawUpstream is a fake ComfyUI that answers the requests it receives, on
// any connection, with the next of its replies in order. A request beyond
// the last reply is recorded and its connection closed.
type rawUpstream struct {
	addr      string
	ln        net.Listener
	done      chan struct{} // closed when the test ends
	closeOnce sync.Once
	accepts   atomic.Int32
	wg        sync.WaitGroup

	mu      sync.Mutex
	replies []reply
	seen    []seenRequest
	conns   map[net.Conn]bool
	ended   map[int]bool // connections whose handling is over (closed)
	extra   int64        // bytes received on connections after their last answer
}

func newRawUpstream(t *testing.T, replies ...reply) *rawUpstream {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := &rawUpstream{
		addr:    ln.Addr().String(),
		ln:      ln,
		done:    make(chan struct{}),
		replies: replies,
		conns:   make(map[net.Conn]bool),
		ended:   make(map[int]bool),
	}
	u.wg.Add(1)
	go u.acceptLoop()
	t.Cleanup(func() {
		u.shutdown()
		u.wg.Wait()
	})
	return u
}

// shutdown closes the listener and every connection. The proxy's cleanup
// calls it before closing its server, so that a handler stuck on a silent
// upstream (a failing test) is released instead of blocking the cleanup.
func (u *rawUpstream) shutdown() {
	u.closeOnce.Do(func() {
		close(u.done)
		u.ln.Close()
		u.mu.Lock()
		for c := range u.conns {
			c.Close()
		}
		u.mu.Unlock()
	})
}

func (u *rawUpstream) acceptLoop() {
	defer u.wg.Done()
	for {
		c, err := u.ln.Accept()
		if err != nil {
			return
		}
		id := int(u.accepts.Add(1))
		u.mu.Lock()
		select {
		case <-u.done:
			u.mu.Unlock()
			c.Close()
			return
		default:
		}
		u.conns[c] = true
		u.mu.Unlock()
		u.wg.Add(1)
		go u.serve(c, id)
	}
}

func (u *rawUpstream) serve(c net.Conn, id int) {
	defer u.wg.Done()
	defer func() {
		c.Close()
		u.mu.Lock()
		delete(u.conns, c)
		u.ended[id] = true
		u.mu.Unlock()
	}()
	br := bufio.NewReader(c)
	for {
		req, err := readHead(br)
		if err != nil {
			return
		}
		req.conn = id
		u.mu.Lock()
		var next reply
		if len(u.replies) > 0 {
			next, u.replies = u.replies[0], u.replies[1:]
		}
		u.mu.Unlock()
		if next == nil {
			u.record(req)
			return
		}
		if !next(u, c, br, req) {
			return
		}
	}
}

func (u *rawUpstream) record(req seenRequest) {
	u.mu.Lock()
	u.seen = append(u.seen, req)
	u.mu.Unlock()
}

// requests returns the requests received so far.
func (u *rawUpstream) requests() []seenRequest {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]seenRequest(nil), u.seen...)
}

// onlyRequest returns the one request received, failing the test if there
// were more or none.
func (u *rawUpstream) onlyRequest(t *testing.T) seenRequest {
	t.Helper()
	reqs := u.requests()
	if len(reqs) != 1 {
		t.Fatalf("upstream received %d requests; want 1", len(reqs))
	}
	return reqs[0]
}

// connsOf lists the connection that carried each request, in order.
func (u *rawUpstream) connsOf() []int {
	var ids []int
	for _, r := range u.requests() {
		ids = append(ids, r.conn)
	}
	return ids
}

// waitEnded waits until connection id is closed: by the proxy, or by the
// fake after its reply.
func (u *rawUpstream) waitEnded(t *testing.T, id int) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for {
		u.mu.Lock()
		ended := u.ended[id]
		u.mu.Unlock()
		if ended {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("upstream connection %d is still open: the proxy kept it", id)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// readHead reads a request line and header section.
func readHead(br *bufio.Reader) (seenRequest, error) {
	var head strings.Builder
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			return seenRequest{}, err
		}
		head.WriteString(line)
		if line == "\r\n" || line == "\n" {
			break
		}
	}
	line, rest, _ := strings.Cut(head.String(), "\r\n")
	h, err := textproto.NewReader(bufio.NewReader(strings.NewReader(rest))).ReadMIMEHeader()
	if err != nil {
		return seenRequest{}, err
	}
	return seenRequest{line: line, head: head.String(), header: http.Header(h)}, nil
}

// readBody reads req's body as its head frames it.
func readBody(br *bufio.Reader, req *seenRequest) error {
	if req.header.Get("Transfer-Encoding") == "chunked" {
		b, err := io.ReadAll(httputil.NewChunkedReader(br))
		if err != nil {
			return err
		}
		req.body = b
		for { // the trailer section
			line, err := br.ReadString('\n')
			if err != nil {
				return err
			}
			if line == "\r\n" {
				return nil
			}
		}
	}
	if cl := req.header.Get("Content-Length"); cl != "" {
		n, err := strconv.Atoi(cl)
		if err != nil {
			return err
		}
		req.body = make([]byte, n)
		_, err = io.ReadFull(br, req.body)
		return err
	}
	return nil
}

// respond reads the request body and answers with raw.
func respond(raw string) reply {
	return func(u *rawUpstream, c net.Conn, br *bufio.Reader, req seenRequest) bool {
		if readBody(br, &req) != nil {
			return false
		}
		u.record(req)
		_, err := io.WriteString(c, raw)
		return err == nil
	}
}

// respondAndClose answers with raw and closes the connection.
func respondAndClose(raw string) reply {
	r := respond(raw)
	return func(u *rawUpstream, c net.Conn, br *bufio.Reader, req seenRequest) bool {
		r(u, c, br, req)
		return false
	}
}

// respondAndHalfClose answers with raw, then shuts down its sending side,
// which ends a close-delimited body, and keeps reading until the proxy
// closes the connection: whatever arrives meanwhile is counted in extra, as
// a proxy that reused the connection would send another request on it.
func respondAndHalfClose(raw string) reply {
	return func(u *rawUpstream, c net.Conn, br *bufio.Reader, req seenRequest) bool {
		if readBody(br, &req) != nil {
			return false
		}
		u.record(req)
		io.WriteString(c, raw)
		c.(*net.TCPConn).CloseWrite()
		n, _ := io.Copy(io.Discard, br)
		u.mu.Lock()
		u.extra += n
		u.mu.Unlock()
		return false
	}
}

// hangUp closes the connection right after the request head, leaving any
// body unread and the request unanswered.
func hangUp(u *rawUpstream, c net.Conn, br *bufio.Reader, req seenRequest) bool {
	u.record(req)
	return false
}

// hangUpAfter reads n bytes of the body, then closes the connection.
func hangUpAfter(n int) reply {
	return func(u *rawUpstream, c net.Conn, br *bufio.Reader, req seenRequest) bool {
		req.body = make([]byte, n)
		io.ReadFull(br, req.body)
		u.record(req)
		return false
	}
}

// silent never answers; it returns once the proxy closes the connection
// (or the test ends).
func silent(u *rawUpstream, c net.Conn, br *bufio.Reader, req seenRequest) bool {
	u.record(req)
	io.Copy(io.Discard, br)
	return false
}

// ok is a 200 answer with a Content-Length body.
func ok(body string) string {
	return "HTTP/1.1 200 OK\r\nContent-Length: " + strconv.Itoa(len(body)) + "\r\n\r\n" + body
}

// testProxy is a Proxy on the direct path, served by an httptest.Server.
type testProxy struct {
	*Proxy
	srv    *httptest.Server
	client *http.Client
	// handled receives a value each time ServeHTTP returns (or panics).
	handled chan struct{}
}

func newTestProxy(t *testing.T, u *rawUpstream, opts Options) *testProxy {
	t.Helper()
	return newWrappedProxy(t, u, opts, nil)
}

// newTimedProxy is newTestProxy with a response header timeout.
func newTimedProxy(t *testing.T, u *rawUpstream, timeout time.Duration) *testProxy {
	t.Helper()
	return newWrappedProxy(t, u, Options{StripCredentials: true}, nil, upstream.Options{ResponseHeaderTimeout: timeout})
}

// newWrappedProxy is newTestProxy with an outer handler around the proxy
// (nil: none), as the gateway's middleware sits around it.
func newWrappedProxy(t *testing.T, u *rawUpstream, opts Options, wrap func(http.Handler) http.Handler, upOpts ...upstream.Options) *testProxy {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	p := New(poolOf(t, "http://"+u.addr, upOpts...), opts)
	tp := &testProxy{Proxy: p, handled: make(chan struct{}, 64)}
	var h http.Handler = p
	if wrap != nil {
		h = wrap(p)
	}
	tp.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			select {
			case tp.handled <- struct{}{}:
			default:
			}
		}()
		h.ServeHTTP(w, r)
	}))
	c := *tp.srv.Client()
	c.Timeout = clientTimeout
	tp.client = &c
	t.Cleanup(func() {
		u.shutdown()
		tp.srv.Close()
		p.Close()
	})
	return tp
}

func (tp *testProxy) addr() string { return tp.srv.Listener.Addr().String() }

func (tp *testProxy) request(t *testing.T, method, path string, body io.Reader) *http.Request {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), method, tp.srv.URL+path, body)
	if err != nil {
		t.Fatal(err)
	}
	return req
}

// do sends req and reads the whole answer.
func (tp *testProxy) do(t *testing.T, req *http.Request) (*http.Response, []byte) {
	t.Helper()
	res, err := tp.client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", req.Method, req.URL.Path, err)
	}
	defer res.Body.Close()
	body, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatalf("%s %s: reading the body: %v", req.Method, req.URL.Path, err)
	}
	return res, body
}

func (tp *testProxy) get(t *testing.T, path string) (*http.Response, []byte) {
	t.Helper()
	return tp.do(t, tp.request(t, http.MethodGet, path, nil))
}

// wantBody fails the test unless the answer is 200 with body want.
func wantBody(t *testing.T, res *http.Response, body []byte, want string) {
	t.Helper()
	if res.StatusCode != http.StatusOK || string(body) != want {
		t.Fatalf("got %d %q; want 200 %q", res.StatusCode, truncateForLog(body), truncateForLog([]byte(want)))
	}
}

func truncateForLog(b []byte) string {
	if len(b) > 80 {
		return string(b[:80]) + "…"
	}
	return string(b)
}

// rawDo sends req, a complete request that should ask for Connection:
// close, on a new connection to addr and returns the raw answer, parsed.
func rawDo(t *testing.T, addr, req string) (raw string, res *http.Response, body []byte) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(clientTimeout))
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("reading the answer: %v (got %q)", err, b)
	}
	res, err = http.ReadResponse(bufio.NewReader(bytes.NewReader(b)), nil)
	if err != nil {
		t.Fatalf("parsing the answer: %v (got %q)", err, b)
	}
	defer res.Body.Close()
	body, err = io.ReadAll(res.Body)
	if err != nil {
		t.Fatalf("reading the body: %v (got %q)", err, b)
	}
	return string(b), res, body
}

// wantGatewayError fails the test unless the answer is the gateway's own
// JSON error with the given status and code.
func wantGatewayError(t *testing.T, res *http.Response, body []byte, status int, code string) {
	t.Helper()
	if res.StatusCode != status {
		t.Fatalf("status %d, body %q; want %d", res.StatusCode, body, status)
	}
	if ct := res.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Errorf("Content-Type %q; want JSON", ct)
	}
	var got jsonerr.Body
	if err := json.Unmarshal(body, &got); err != nil || got.Error != code {
		t.Errorf("body %q; want a JSON error %q", body, code)
	}
}

// TestForwardRejectsMalformedResponse pins that an answer whose framing is
// ambiguous or not HTTP/1.1 becomes a 502 of the gateway's own: a proxy that
// guesses where such a body ends can be desynchronised from ComfyUI
// (response smuggling). None of the broken answer's headers may reach the
// client, and its connection must not be used again.
//
// The answers are parsed by net/http's Transport, which accepts a folded
// header line, a space before a colon and HTTP/1.2 (none of them changes
// where the answer ends); the cases below are what it refuses.
func TestForwardRejectsMalformedResponse(t *testing.T) {
	// leak comes before the broken part where there is a header section.
	const leak = "X-Leak: yes\r\nSet-Cookie: leak=1\r\n"
	tests := []struct {
		name   string
		answer string
	}{
		{"two Content-Length values", "HTTP/1.1 200 OK\r\n" + leak + "Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"},
		{"Content-Length list", "HTTP/1.1 200 OK\r\n" + leak + "Content-Length: 5, 6\r\n\r\nhello!"},
		{"Content-Length with letters", "HTTP/1.1 200 OK\r\n" + leak + "Content-Length: 5a\r\n\r\nhello"},
		{"Content-Length with sign", "HTTP/1.1 200 OK\r\n" + leak + "Content-Length: +5\r\n\r\nhello"},
		{"negative Content-Length", "HTTP/1.1 200 OK\r\n" + leak + "Content-Length: -1\r\n\r\nhello"},
		{"empty Content-Length", "HTTP/1.1 200 OK\r\n" + leak + "Content-Length: \r\n\r\nhello"},
		{"Transfer-Encoding gzip, chunked", "HTTP/1.1 200 OK\r\n" + leak + "Transfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"},
		{"Transfer-Encoding identity", "HTTP/1.1 200 OK\r\n" + leak + "Transfer-Encoding: identity\r\n\r\nhello"},
		{"Transfer-Encoding twice", "HTTP/1.1 200 OK\r\n" + leak + "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"},
		{"header line without colon", "HTTP/1.1 200 OK\r\n" + leak + "X-Bad a\r\nContent-Length: 5\r\n\r\nhello"},
		{"NUL in header value", "HTTP/1.1 200 OK\r\n" + leak + "X-Bad: a\x00b\r\nContent-Length: 5\r\n\r\nhello"},
		{"HTTP/2 status line", "HTTP/2 200 OK\r\n" + leak + "Content-Length: 5\r\n\r\nhello"},
		{"two-digit status", "HTTP/1.1 20 OK\r\n" + leak + "Content-Length: 5\r\n\r\nhello"},
		{"four-digit status", "HTTP/1.1 2000 OK\r\n" + leak + "Content-Length: 5\r\n\r\nhello"},
		{"not HTTP at all", "hello\r\n\r\n"},
		{"101 to a plain request", "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			u := newRawUpstream(t, respond(tt.answer), respond(ok("fine")))
			tp := newTestProxy(t, u, Options{StripCredentials: true})

			res, body := tp.get(t, "/broken")
			wantGatewayError(t, res, body, http.StatusBadGateway, "upstream_unavailable")
			for _, h := range []string{"X-Leak", "Set-Cookie", "Upgrade"} {
				if v, ok := res.Header[h]; ok {
					t.Errorf("the broken answer's %s: %q reached the client", h, v)
				}
			}
			res, body = tp.get(t, "/next")
			wantBody(t, res, body, "fine")
			if diff := cmp.Diff([]int{1, 2}, u.connsOf()); diff != "" {
				t.Errorf("connection of each request (-want +got):\n%s", diff)
			}
		})
	}
}

// TestForwardMalformedResponseRestoresHeaders pins that the headers a broken
// answer added are taken back exactly, also when a name repeats and when the
// header was already set by an outer handler (a request ID, say).
func TestForwardMalformedResponseRestoresHeaders(t *testing.T) {
	tests := []struct {
		name   string
		preset []string // X-Request-Id set before the proxy runs
	}{
		{"repeated header", nil},
		{"repeated header set before", []string{"gateway-id"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			u := newRawUpstream(t, respond("HTTP/1.1 200 OK\r\n"+
				"X-Request-Id: up-1\r\nX-Request-Id: up-2\r\n"+
				"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"))
			tp := newWrappedProxy(t, u, Options{StripCredentials: true}, func(next http.Handler) http.Handler {
				return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					if tt.preset != nil {
						w.Header()["X-Request-Id"] = append([]string(nil), tt.preset...)
					}
					next.ServeHTTP(w, r)
				})
			})
			res, body := tp.get(t, "/broken")
			wantGatewayError(t, res, body, http.StatusBadGateway, "upstream_unavailable")
			if diff := cmp.Diff(tt.preset, res.Header["X-Request-Id"]); diff != "" {
				t.Errorf("X-Request-Id (-want +got):\n%s", diff)
			}
		})
	}
}

// TestForwardAcceptsResponseFraming covers the unusual but unambiguous
// answers: each is passed on with a single, correct framing, and the
// connection stays in step for the next request.
func TestForwardAcceptsResponseFraming(t *testing.T) {
	tests := []struct {
		name       string
		answer     string
		wantBody   string
		wantHeader http.Header // checked in the client's answer
		// wantLength is how many Content-Length lines the client gets.
		wantLength int
	}{
		{
			name:       "same Content-Length twice",
			answer:     "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
			wantBody:   "hello",
			wantLength: 1,
		},
		{
			name:       "chunked wins over Content-Length",
			answer:     "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
			wantBody:   "hello world",
			wantLength: 0,
		},
		{
			name:       "Transfer-Encoding in capitals",
			answer:     "HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
			wantBody:   "hello",
			wantLength: 0,
		},

		{
			name:       "no reason phrase",
			answer:     "HTTP/1.1 200\r\nContent-Length: 5\r\n\r\nhello",
			wantBody:   "hello",
			wantLength: 1,
		},
		{
			name:       "bare LF line ends",
			answer:     "HTTP/1.1 200 OK\nContent-Length: 5\nX-Thing: v\n\nhello",
			wantBody:   "hello",
			wantHeader: http.Header{"X-Thing": {"v"}},
			wantLength: 1,
		},
		{
			name:       "lower-case names and padded values",
			answer:     "HTTP/1.1 200 OK\r\ncontent-length:5\r\nx-thing: \t v w \t\r\n\r\nhello",
			wantBody:   "hello",
			wantHeader: http.Header{"X-Thing": {"v w"}},
			wantLength: 1,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			u := newRawUpstream(t, respond(tt.answer), respond(ok("fine")))
			tp := newTestProxy(t, u, Options{StripCredentials: true})

			raw, res, body := rawDo(t, tp.addr(), "GET /a HTTP/1.1\r\nHost: comfy\r\nConnection: close\r\n\r\n")
			wantBody(t, res, body, tt.wantBody)
			head, _, _ := strings.Cut(raw, "\r\n\r\n")
			if n := strings.Count(strings.ToLower(head), "\r\ncontent-length:"); n != tt.wantLength {
				t.Errorf("client got %d Content-Length lines; want %d:\n%s", n, tt.wantLength, head)
			}
			for name, want := range tt.wantHeader {
				if diff := cmp.Diff(want, res.Header[name]); diff != "" {
					t.Errorf("%s (-want +got):\n%s", name, diff)
				}
			}
			_, res, body = rawDo(t, tp.addr(), "GET /b HTTP/1.1\r\nHost: comfy\r\nConnection: close\r\n\r\n")
			wantBody(t, res, body, "fine")
			if diff := cmp.Diff([]int{1, 1}, u.connsOf()); diff != "" {
				t.Errorf("connection of each request (-want +got):\n%s", diff)
			}
		})
	}
}

// TestForwardChunkedResponse pins that a chunked answer (chunk extensions,
// a trailer section) reaches the client whole, that each chunk is passed
// on as it comes (ComfyUI streams), and that the connection is reused: the
// trailer section must be consumed, or the next answer would be read from
// the middle of it.
func TestForwardChunkedResponse(t *testing.T) {
	t.Run("complete and reused", func(t *testing.T) {
		u := newRawUpstream(t,
			respond("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\nContent-Type: text/plain\r\n\r\n"+
				"5\r\nhello\r\n"+
				"1;name=value\r\n,\r\n"+
				"1A\r\nabcdefghijklmnopqrstuvwxyz\r\n"+
				"0\r\nX-Checksum: 42\r\nX-More: 1\r\n\r\n"),
			respond(ok("second")))
		tp := newTestProxy(t, u, Options{StripCredentials: true})

		res, body := tp.get(t, "/history")
		wantBody(t, res, body, "hello,abcdefghijklmnopqrstuvwxyz")
		if ct := res.Header.Get("Content-Type"); ct != "text/plain" {
			t.Errorf("Content-Type %q; want text/plain", ct)
		}
		res, body = tp.get(t, "/queue")
		wantBody(t, res, body, "second")
		if diff := cmp.Diff([]int{1, 1}, u.connsOf()); diff != "" {
			t.Errorf("connection of each request (-want +got):\n%s", diff)
		}
	})

	t.Run("streamed chunk by chunk", func(t *testing.T) {
		release := make(chan struct{})
		u := newRawUpstream(t, func(u *rawUpstream, c net.Conn, br *bufio.Reader, req seenRequest) bool {
			u.record(req)
			io.WriteString(c, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
			select { // the rest only once the client has the first chunk
			case <-release:
			case <-u.done:
				return false
			}
			io.WriteString(c, "5\r\nworld\r\n0\r\n\r\n")
			return true
		})
		tp := newTestProxy(t, u, Options{StripCredentials: true})

		res, err := tp.client.Do(tp.request(t, http.MethodGet, "/events", nil))
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		first := make([]byte, 5)
		if _, err := io.ReadFull(res.Body, first); err != nil || string(first) != "hello" {
			t.Fatalf("first chunk %q, %v; want it before the rest is sent", first, err)
		}
		close(release)
		rest, err := io.ReadAll(res.Body)
		if err != nil || string(rest) != "world" {
			t.Fatalf("rest %q, %v; want \"world\"", rest, err)
		}
	})
}

// TestForwardResponseNotReused pins that a connection whose answer ends
// when ComfyUI closes it, that ComfyUI asked to close, or that carries
// more than the answer, is not put back in the pool. The fake only half-closes, so a request sent on the old
// connection would reach it and be counted.
func TestForwardResponseNotReused(t *testing.T) {
	big := strings.Repeat("0123456789abcdef", 100<<10/16) // several reads
	tests := []struct {
		name     string
		answer   string
		wantBody string
	}{
		{"close-delimited", "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + big, big},
		{"Connection: close", "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello", "hello"},
		{"Connection: close among others", "HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 5\r\n\r\nhello", "hello"},
		{"HTTP/1.0", "HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello", "hello"},
		// Bytes after the answer would be read as the answer to the next
		// request on the connection.
		{"more than the answer", ok("hello") + ok("smuggled"), "hello"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			u := newRawUpstream(t, respondAndHalfClose(tt.answer), respond(ok("fine")))
			tp := newTestProxy(t, u, Options{StripCredentials: true})

			res, body := tp.get(t, "/a")
			wantBody(t, res, body, tt.wantBody)
			u.waitEnded(t, 1)
			res, body = tp.get(t, "/b")
			wantBody(t, res, body, "fine")
			if diff := cmp.Diff([]int{1, 2}, u.connsOf()); diff != "" {
				t.Errorf("connection of each request (-want +got):\n%s", diff)
			}
			u.mu.Lock()
			extra := u.extra
			u.mu.Unlock()
			if extra != 0 {
				t.Errorf("the proxy sent %d bytes on the finished connection", extra)
			}
		})
	}
}

// TestForwardHopByHopRequestHeaders pins that the headers meant for the
// gateway alone are not sent to ComfyUI: those named in Connection,
// Keep-Alive, Proxy-*, Upgrade, and Te unless it asks for trailers only.
func TestForwardHopByHopRequestHeaders(t *testing.T) {
	tests := []struct {
		te     string
		wantTe []string
	}{
		{"trailers", []string{"trailers"}},
		{"trailers, deflate;q=0.5", []string{"trailers"}},
		{"deflate", nil},
	}
	for _, tt := range tests {
		t.Run(tt.te, func(t *testing.T) {
			u := newRawUpstream(t, respond(ok("ok")))
			tp := newTestProxy(t, u, Options{StripCredentials: true})

			_, res, body := rawDo(t, tp.addr(), "GET /hop HTTP/1.1\r\n"+
				"Host: comfy.local\r\n"+
				"Connection: X-Secret, close\r\n"+
				"X-Secret: 1\r\n"+
				"Keep-Alive: timeout=5\r\n"+
				"Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"+
				"Proxy-Connection: keep-alive\r\n"+
				"Te: "+tt.te+"\r\n"+
				"Upgrade: foo/1\r\n"+
				"X-Keep: yes\r\n\r\n")
			wantBody(t, res, body, "ok")
			got := u.onlyRequest(t).header
			for _, h := range []string{"Connection", "X-Secret", "Keep-Alive", "Proxy-Authorization", "Proxy-Connection", "Upgrade"} {
				if v, ok := got[h]; ok {
					t.Errorf("upstream got %s: %q", h, v)
				}
			}
			if diff := cmp.Diff(tt.wantTe, got["Te"]); diff != "" {
				t.Errorf("Te (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff([]string{"yes"}, got["X-Keep"]); diff != "" {
				t.Errorf("X-Keep (-want +got):\n%s", diff)
			}
		})
	}
}

// TestForwardHopByHopResponseHeaders pins that ComfyUI's hop-by-hop headers,
// and those its Connection header names (in any case), stop at the gateway.
func TestForwardHopByHopResponseHeaders(t *testing.T) {
	u := newRawUpstream(t, respond("HTTP/1.1 200 OK\r\n"+
		"Connection: x-up-secret, keep-alive\r\n"+
		"X-UP-Secret: 1\r\n"+
		"Keep-Alive: timeout=5, max=100\r\n"+
		"Proxy-Authenticate: Basic\r\n"+
		"Proxy-Connection: keep-alive\r\n"+
		"Upgrade: foo/1\r\n"+
		"X-Keep: yes\r\n"+
		"Content-Length: 2\r\n\r\nok"), respond(ok("fine")))
	tp := newTestProxy(t, u, Options{StripCredentials: true})

	res, body := tp.get(t, "/a")
	wantBody(t, res, body, "ok")
	for _, h := range []string{"X-Up-Secret", "Keep-Alive", "Proxy-Authenticate", "Proxy-Connection", "Upgrade"} {
		if v, ok := res.Header[h]; ok {
			t.Errorf("client got %s: %q", h, v)
		}
	}
	for _, v := range res.Header["Connection"] {
		if strings.Contains(strings.ToLower(v), "x-up-secret") {
			t.Errorf("client got Connection: %q", v)
		}
	}
	if diff := cmp.Diff([]string{"yes"}, res.Header["X-Keep"]); diff != "" {
		t.Errorf("X-Keep (-want +got):\n%s", diff)
	}
	// "keep-alive" in Connection is no reason to drop the connection.
	res, body = tp.get(t, "/b")
	wantBody(t, res, body, "fine")
	if diff := cmp.Diff([]int{1, 1}, u.connsOf()); diff != "" {
		t.Errorf("connection of each request (-want +got):\n%s", diff)
	}
}

// TestForwardStripsCredentials pins that the gateway's key never reaches
// ComfyUI (header, query or session cookie) while everything else passes
// byte for byte: ComfyUI's /view?preview=webp;90 needs the ';' and the
// exact encoding.
func TestForwardStripsCredentials(t *testing.T) {
	sess := session.CookieName + "=sekrit-cookie"
	tests := []struct {
		name       string
		strip      bool
		path       string
		wantLine   string
		wantCookie []string
		wantAuth   []string
	}{
		{
			name:       "stripped",
			strip:      true,
			path:       "/view?a=1;b=2&api_key=sekrit-q1&c=%2F&token=sekrit-q2&d=x+y",
			wantLine:   "GET /view?a=1;b=2&c=%2F&d=x+y HTTP/1.1",
			wantCookie: []string{"theme=dark; lang=en", "x=1"},
		},
		{
			name:       "only credentials in the query",
			strip:      true,
			path:       "/view?token=sekrit-q1",
			wantLine:   "GET /view HTTP/1.1",
			wantCookie: []string{"theme=dark; lang=en", "x=1"},
		},
		{
			name:       "kept without StripCredentials",
			strip:      false,
			path:       "/view?a=1;b=2&api_key=sekrit-q1&c=%2F",
			wantLine:   "GET /view?a=1;b=2&api_key=sekrit-q1&c=%2F HTTP/1.1",
			wantCookie: []string{"theme=dark; " + sess + "; lang=en", sess, "x=1"},
			wantAuth:   []string{"Bearer sekrit-h1"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			u := newRawUpstream(t, respond(ok("ok")))
			tp := newTestProxy(t, u, Options{StripCredentials: tt.strip})

			req := tp.request(t, http.MethodGet, tt.path, nil)
			req.Header.Set("Authorization", "Bearer sekrit-h1")
			req.Header.Set("X-API-Key", "sekrit-h2")
			req.Header.Add("Cookie", "theme=dark; "+sess+"; lang=en")
			req.Header.Add("Cookie", sess)
			req.Header.Add("Cookie", "x=1")
			res, body := tp.do(t, req)
			wantBody(t, res, body, "ok")

			got := u.onlyRequest(t)
			if got.line != tt.wantLine {
				t.Errorf("request line %q; want %q", got.line, tt.wantLine)
			}
			if diff := cmp.Diff(tt.wantCookie, got.header["Cookie"]); diff != "" {
				t.Errorf("Cookie (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(tt.wantAuth, got.header["Authorization"]); diff != "" {
				t.Errorf("Authorization (-want +got):\n%s", diff)
			}
			if tt.strip {
				if strings.Contains(got.head, "sekrit") {
					t.Errorf("a credential reached the upstream:\n%s", got.head)
				}
			} else if !strings.Contains(got.head, "X-Api-Key: sekrit-h2") {
				t.Errorf("X-API-Key missing without StripCredentials:\n%s", got.head)
			}
		})
	}
}

// TestForwardXForwarded pins the forwarding headers: spoofed ones are
// replaced unless the request comes from a trusted proxy, whose chain is
// extended, and Host always passes unchanged (ComfyUI's own Host/Origin
// check must see what the browser sent).
func TestForwardXForwarded(t *testing.T) {
	spoofed := http.Header{
		"X-Forwarded-For":   {"1.2.3.4"},
		"X-Forwarded-Host":  {"evil.example"},
		"X-Forwarded-Proto": {"https"},
		"Forwarded":         {"for=6.6.6.6"},
		"X-Real-Ip":         {"6.6.6.6"},
	}
	tests := []struct {
		name    string
		trusted bool
		inbound http.Header
		want    http.Header
	}{
		{
			name:    "untrusted",
			inbound: spoofed,
			want: http.Header{
				"X-Forwarded-For":   {"127.0.0.1"},
				"X-Forwarded-Host":  {"comfy.example:8188"},
				"X-Forwarded-Proto": {"http"},
			},
		},
		{
			name:    "trusted",
			trusted: true,
			inbound: spoofed,
			want: http.Header{
				"X-Forwarded-For":   {"1.2.3.4, 127.0.0.1"},
				"X-Forwarded-Host":  {"evil.example"},
				"X-Forwarded-Proto": {"https"},
			},
		},
		{
			name:    "trusted, chain in two lines",
			trusted: true,
			inbound: http.Header{"X-Forwarded-For": {"1.2.3.4", "5.6.7.8"}},
			want: http.Header{
				"X-Forwarded-For":   {"1.2.3.4, 5.6.7.8, 127.0.0.1"},
				"X-Forwarded-Host":  {"comfy.example:8188"},
				"X-Forwarded-Proto": {"http"},
			},
		},
		{
			name:    "trusted, nothing inbound",
			trusted: true,
			want: http.Header{
				"X-Forwarded-For":   {"127.0.0.1"},
				"X-Forwarded-Host":  {"comfy.example:8188"},
				"X-Forwarded-Proto": {"http"},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			u := newRawUpstream(t, respond(ok("ok")))
			opts := Options{StripCredentials: true}
			if tt.trusted {
				opts.TrustForwarded = func(*http.Request) bool { return true }
			}
			tp := newTestProxy(t, u, opts)

			req := tp.request(t, http.MethodGet, "/prompt", nil)
			req.Host = "comfy.example:8188"
			for k, vv := range tt.inbound {
				req.Header[k] = vv
			}
			res, body := tp.do(t, req)
			wantBody(t, res, body, "ok")

			h := u.onlyRequest(t).header
			got := http.Header{}
			for _, k := range []string{"X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "Forwarded", "X-Real-Ip"} {
				if v, ok := h[k]; ok {
					got[k] = v
				}
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("forwarding headers (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff([]string{"comfy.example:8188"}, h["Host"]); diff != "" {
				t.Errorf("Host (-want +got):\n%s", diff)
			}
		})
	}
}

// TestForwardRetriesGETOnClosedIdleConn pins that a GET sent on a pooled
// connection ComfyUI closed a moment ago (too recently for the liveness
// check) is sent again on a new connection instead of failing.
func TestForwardRetriesGETOnClosedIdleConn(t *testing.T) {
	u := newRawUpstream(t, respondAndClose(ok("first")), respond(ok("second")))
	tp := newTestProxy(t, u, Options{StripCredentials: true})

	res, body := tp.get(t, "/a")
	wantBody(t, res, body, "first")
	u.waitEnded(t, 1) // ComfyUI closed the idle connection (no Connection: close)
	res, body = tp.get(t, "/b")
	wantBody(t, res, body, "second")
	if diff := cmp.Diff([]int{1, 2}, u.connsOf()); diff != "" {
		t.Errorf("connection of each request (-want +got):\n%s", diff)
	}
}

// TestIdleConnClosedByComfyUILeavesPool pins that a pooled connection
// ComfyUI closes while it is idle (a restart, its keep-alive timeout) leaves
// the pool when the close arrives, not on its next use: even a POST with a
// body, which is never sent twice, then gets through on a fresh connection.
// (The custom pool this replaced checked only on reuse, after 1s idle, and
// a restarted ComfyUI meant a burst of 502s.)
func TestIdleConnClosedByComfyUILeavesPool(t *testing.T) {
	t.Parallel()
	u := newRawUpstream(t, respondAndClose(ok("first")), respond(ok("second")))
	tp := newTestProxy(t, u, Options{StripCredentials: true})

	res, body := tp.get(t, "/a")
	wantBody(t, res, body, "first")
	u.waitEnded(t, 1)
	// The Transport's reader sees the close a moment after ComfyUI sends
	// it; this is not a timing assertion, only time for that to happen.
	time.Sleep(100 * time.Millisecond)
	res, body = tp.do(t, tp.request(t, http.MethodPost, "/prompt", strings.NewReader(`{"prompt":{}}`)))
	wantBody(t, res, body, "second")
	reqs := u.requests()
	if len(reqs) != 2 || reqs[1].conn != 2 || string(reqs[1].body) != `{"prompt":{}}` {
		t.Errorf("upstream got %+v; want the POST with its body on connection 2", reqs)
	}
}

// TestForwardUpstreamClosesDuringPOST pins that a POST whose connection
// ComfyUI closes before answering gets 502 at once, and is not sent again:
// POST /prompt is not idempotent.
func TestForwardUpstreamClosesDuringPOST(t *testing.T) {
	tests := []struct {
		name    string
		replies []reply
		reuse   bool // a GET first, so that the POST goes on a pooled connection
	}{
		{"after the head", []reply{hangUp}, false},
		{"in the body", []reply{hangUpAfter(1000)}, false},
		{"after the head, pooled connection", []reply{respond(ok("warm")), hangUp}, true},
		{"in the body, pooled connection", []reply{respond(ok("warm")), hangUpAfter(1000)}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			u := newRawUpstream(t, tt.replies...)
			tp := newTestProxy(t, u, Options{StripCredentials: true})
			if tt.reuse {
				res, body := tp.get(t, "/warm")
				wantBody(t, res, body, "warm")
			}
			payload := bytes.Repeat([]byte("p"), 64<<10)
			res, body := tp.do(t, tp.request(t, http.MethodPost, "/prompt", bytes.NewReader(payload)))
			wantGatewayError(t, res, body, http.StatusBadGateway, "upstream_unavailable")
			if n := u.accepts.Load(); n != 1 {
				t.Errorf("upstream accepted %d connections; want 1 (the POST must not be sent again)", n)
			}
		})
	}
}

// TestForwardBodylessPOSTNotResent pins that a POST without a body (ComfyUI's
// POST /interrupt, POST /free) that reached ComfyUI is not sent a second
// time when the connection closes before the answer: only a request that
// is safe to repeat may be retried once bytes went upstream (house style
// 4.4), as http.Transport retries only GET, HEAD, OPTIONS and TRACE then.
func TestForwardBodylessPOSTNotResent(t *testing.T) {
	u := newRawUpstream(t, respond(ok("warm")), hangUp, respond(ok("again")))
	tp := newTestProxy(t, u, Options{StripCredentials: true})
	res, body := tp.get(t, "/warm")
	wantBody(t, res, body, "warm")
	res, body = tp.do(t, tp.request(t, http.MethodPost, "/interrupt", nil))
	wantGatewayError(t, res, body, http.StatusBadGateway, "upstream_unavailable")
	var posts int
	for _, r := range u.requests() {
		if strings.HasPrefix(r.line, "POST ") {
			posts++
		}
	}
	if posts != 1 {
		t.Errorf("upstream received the POST %d times; want 1", posts)
	}
}

// TestForwardRequestBodies pins the outbound framing of request bodies: a
// known length is sent as Content-Length, an unknown one chunked, and a
// body-less POST says Content-Length: 0 (aiohttp would otherwise wait).
func TestForwardRequestBodies(t *testing.T) {
	rnd := rand.New(rand.NewPCG(1, 2))
	large := make([]byte, 100<<10)
	for i := range large {
		large[i] = byte(rnd.Uint32())
	}
	tests := []struct {
		name     string
		method   string
		body     func() io.Reader
		length   int64 // set on the request; -1: unknown
		wantHead http.Header
		wantBody []byte
	}{
		{
			name:     "Content-Length body",
			method:   http.MethodPost,
			body:     func() io.Reader { return bytes.NewReader(large) },
			length:   int64(len(large)),
			wantHead: http.Header{"Content-Length": {strconv.Itoa(len(large))}},
			wantBody: large,
		},
		{
			name:     "unknown length",
			method:   http.MethodPut,
			body:     func() io.Reader { return io.MultiReader(bytes.NewReader(large[:1000]), bytes.NewReader(large[1000:])) },
			length:   -1,
			wantHead: http.Header{"Transfer-Encoding": {"chunked"}},
			wantBody: large,
		},
		{
			name:     "POST without body",
			method:   http.MethodPost,
			wantHead: http.Header{"Content-Length": {"0"}},
		},
		{
			name:     "GET without body",
			method:   http.MethodGet,
			wantHead: http.Header{},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			u := newRawUpstream(t, respond(ok("ok")))
			tp := newTestProxy(t, u, Options{StripCredentials: true})
			var body io.Reader
			if tt.body != nil {
				body = tt.body()
			}
			req := tp.request(t, tt.method, "/upload/image", body)
			if tt.body != nil {
				req.ContentLength = tt.length
			}
			res, resBody := tp.do(t, req)
			wantBody(t, res, resBody, "ok")

			got := u.onlyRequest(t)
			framing := http.Header{}
			for _, k := range []string{"Content-Length", "Transfer-Encoding"} {
				if v, ok := got.header[k]; ok {
					framing[k] = v
				}
			}
			if diff := cmp.Diff(tt.wantHead, framing); diff != "" {
				t.Errorf("framing headers (-want +got):\n%s", diff)
			}
			if !bytes.Equal(got.body, tt.wantBody) {
				t.Errorf("upstream got a %d-byte body; want %d bytes exactly", len(got.body), len(tt.wantBody))
			}
		})
	}
}

// TestForwardNoBodyResponses pins that answers which have no body whatever
// their headers say (HEAD, 204, 304) do not make the proxy wait for one:
// it would hang, and the connection would be out of step.
func TestForwardNoBodyResponses(t *testing.T) {
	tests := []struct {
		name       string
		method     string
		answer     string
		wantStatus int
	}{
		{"HEAD with Content-Length", http.MethodHead, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", 200},
		{"HEAD with chunked", http.MethodHead, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", 200},
		{"204 with Content-Length", http.MethodGet, "HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n", 204},
		{"304 with Content-Length", http.MethodGet, "HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\nEtag: \"v1\"\r\n\r\n", 304},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			u := newRawUpstream(t, respond(tt.answer), respond(ok("fine")))
			tp := newTestProxy(t, u, Options{StripCredentials: true})

			res, body := tp.do(t, tp.request(t, tt.method, "/view", nil))
			if res.StatusCode != tt.wantStatus || len(body) != 0 {
				t.Fatalf("got %d %q; want %d with no body", res.StatusCode, body, tt.wantStatus)
			}
			res, body = tp.get(t, "/next")
			wantBody(t, res, body, "fine")
			if diff := cmp.Diff([]int{1, 1}, u.connsOf()); diff != "" {
				t.Errorf("connection of each request (-want +got):\n%s", diff)
			}
		})
	}
}

// TestForwardClientGoesAway pins that a client leaving while ComfyUI is
// still thinking ends the handler at once and closes the upstream
// connection, which is in the middle of an exchange and cannot be reused.
func TestForwardClientGoesAway(t *testing.T) {
	u := newRawUpstream(t, silent)
	tp := newTestProxy(t, u, Options{StripCredentials: true})

	c, err := net.Dial("tcp", tp.addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "GET /history HTTP/1.1\r\nHost: comfy\r\n\r\n")
	for deadline := time.Now().Add(2 * time.Second); len(u.requests()) == 0; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the request did not reach the upstream")
		}
	}
	c.Close()
	select {
	case <-tp.handled:
	case <-time.After(2 * time.Second):
		t.Fatal("the handler is still waiting for ComfyUI after the client left")
	}
	u.waitEnded(t, 1)
}

// TestForwardResponseHeaderTimeout pins Options.ResponseHeaderTimeout: 504
// when ComfyUI is silent for that long, and no limit on the body after.
func TestForwardResponseHeaderTimeout(t *testing.T) {
	const timeout = 100 * time.Millisecond

	t.Run("silent upstream", func(t *testing.T) {
		u := newRawUpstream(t, silent)
		tp := newTimedProxy(t, u, timeout)
		start := time.Now()
		res, body := tp.get(t, "/history")
		elapsed := time.Since(start)
		wantGatewayError(t, res, body, http.StatusGatewayTimeout, "upstream_timeout")
		if elapsed < timeout || elapsed > timeout+time.Second {
			t.Errorf("504 after %v; want about %v", elapsed, timeout)
		}
		u.waitEnded(t, 1)
	})

	t.Run("silent upstream, pooled connection", func(t *testing.T) {
		u := newRawUpstream(t, respond(ok("warm")), silent, silent)
		tp := newTimedProxy(t, u, timeout)
		res, body := tp.get(t, "/warm")
		wantBody(t, res, body, "warm")
		start := time.Now()
		res, body = tp.get(t, "/history")
		elapsed := time.Since(start)
		wantGatewayError(t, res, body, http.StatusGatewayTimeout, "upstream_timeout")
		// A retry on a fresh connection would be seen in the count below;
		// the time bound is generous, for a busy machine.
		if elapsed < timeout || elapsed > timeout+time.Second {
			t.Errorf("504 after %v; want about %v", elapsed, timeout)
		}
		if n := len(u.requests()); n != 2 {
			t.Errorf("upstream received %d requests; want 2 (the slow GET once)", n)
		}
	})

	t.Run("slow body is not cut", func(t *testing.T) {
		u := newRawUpstream(t, func(u *rawUpstream, c net.Conn, br *bufio.Reader, req seenRequest) bool {
			u.record(req)
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
			time.Sleep(3 * timeout)
			io.WriteString(c, "world")
			return true
		})
		tp := newTimedProxy(t, u, timeout)
		res, body := tp.get(t, "/view")
		wantBody(t, res, body, "helloworld")
	})
}

// TestForwardLargeBody pins the body copy with a known length, in large
// buffers above largeBufferSize and small ones below it: the body
// arrives byte for byte and the connection stays in step, and a body that
// ComfyUI cuts short is an error for the client, never a response that
// looks complete.
func TestForwardLargeBody(t *testing.T) {
	rnd := rand.New(rand.NewPCG(3, 4))
	large := make([]byte, 4<<20)
	for i := range large {
		large[i] = byte(rnd.Uint32())
	}

	t.Run("complete", func(t *testing.T) {
		u := newRawUpstream(t,
			respond("HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: "+strconv.Itoa(len(large))+"\r\n\r\n"+string(large)),
			respond(ok("fine")))
		tp := newTestProxy(t, u, Options{StripCredentials: true})
		res, body := tp.get(t, "/view?filename=big.png")
		if res.StatusCode != http.StatusOK || !bytes.Equal(body, large) {
			t.Fatalf("got %d with %d bytes; want 200 with the %d bytes sent", res.StatusCode, len(body), len(large))
		}
		res, body = tp.get(t, "/next")
		wantBody(t, res, body, "fine")
		if diff := cmp.Diff([]int{1, 1}, u.connsOf()); diff != "" {
			t.Errorf("connection of each request (-want +got):\n%s", diff)
		}
	})

	truncated := []struct {
		name   string
		answer string
	}{
		{"large, cut short", "HTTP/1.1 200 OK\r\nContent-Length: " + strconv.Itoa(len(large)) + "\r\n\r\n" + string(large[:1<<20])},
		{"small, cut short", "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + string(large[:10])},
		{"chunked, cut short", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n10\r\nabc"},
	}
	for _, tt := range truncated {
		t.Run(tt.name, func(t *testing.T) {
			u := newRawUpstream(t, respondAndClose(tt.answer), respond(ok("fine")))
			tp := newTestProxy(t, u, Options{StripCredentials: true})
			res, err := tp.client.Do(tp.request(t, http.MethodGet, "/view", nil))
			if err == nil { // else an error before the body: fine too
				body, err := io.ReadAll(res.Body)
				res.Body.Close()
				if err == nil {
					t.Errorf("client read %d bytes and a clean end; want an error", len(body))
				}
			}
			// The cut connection must not go back to the pool: a POST,
			// which is never retried, would fail on it.
			res, body := tp.do(t, tp.request(t, http.MethodPost, "/prompt", strings.NewReader("{}")))
			wantBody(t, res, body, "fine")
			if diff := cmp.Diff([]int{1, 2}, u.connsOf()); diff != "" {
				t.Errorf("connection of each request (-want +got):\n%s", diff)
			}
		})
	}
}
