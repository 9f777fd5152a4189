// Package requestlog writes one structured log line per request. Its
// middleware is the outermost layer: it creates the request's scope (package
// reqscope) with the client address and the route entry, and reads what the
// inner layers filled in (which key was used) once the request is done.
package requestlog

import (
	"bufio"
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/comfygate/comfygate/internal/reqscope"
	"github.com/comfygate/comfygate/internal/route"
)

// StatusClientClosed is the status recorded, never sent, for a request whose
// client went away before it was answered (nginx's 499).
const StatusClientClosed = 499

// Redactor rewrites a raw query string for logging, hiding credentials.
type Redactor func(rawQuery string) string

// ClientResolver finds a request's client address.
type ClientResolver func(*http.Request) netip.Addr

// Result is what an Observer learns about a finished request.
type Result struct {
	Method   string
	Status   int
	BytesIn  int64 // request body bytes read
	BytesOut int64 // response body bytes written
	Duration time.Duration
	Scope    *reqscope.Scope
}

// Observer is told about every finished request (metrics).
type Observer func(*Result)

// Middleware logs one line per request at level Info on logger, after the
// request is done: method, path (query redacted by redact), status, bytes
// written, duration, client address and key name. A WebSocket is logged when
// it closes, with status 101 and its lifetime as the duration, even if the
// handler returned before (see recorder.Hijack).
//
// It gives every request its reqscope.Scope, with the client address that
// client resolves and the route entry of route.Classify (protectWS is
// passed on to it), for the inner layers to read and fill in.
func Middleware(logger *slog.Logger, redact Redactor, client ClientResolver, protectWS bool, observe Observer) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			// Everything a request needs here is one allocation.
			e := &entry{logger: logger, redact: redact, observe: observe, start: time.Now()}
			e.scope.Client = client(r)
			e.scope.Route = route.Classify(r, protectWS)
			e.rec.ResponseWriter, e.rec.e = w, e
			// The path as sent (escaped), so a log shows /assets/%2e%2e/x,
			// not the decoded /assets/../x.
			e.rawPath, e.query, e.method = r.URL.EscapedPath(), r.URL.RawQuery, r.Method
			if r.Body != nil && r.Body != http.NoBody {
				e.body.ReadCloser = r.Body
				e.hasBody = true
				r.Body = &e.body
			}
			e.pending.Store(1) // the handler; a hijacked connection adds one
			// Log in a defer: ReverseProxy aborts a response whose upstream
			// body fails midway with a panic (http.ErrAbortHandler), and
			// that request deserves its line too.
			defer e.handlerDone(r.Context())
			next.ServeHTTP(&e.rec, r.WithContext(reqscope.NewContext(r.Context(), &e.scope)))
		})
	}
}

// entry is one request's state in the middleware.
type entry struct {
	logger  *slog.Logger
	redact  Redactor
	observe Observer
	start   time.Time

	method, rawPath, query string

	scope   reqscope.Scope
	rec     recorder
	body    countingBody
	hasBody bool
	res     Result

	// wsIn and wsOut count the bytes a hijacked connection (a WebSocket)
	// carried from and to the client; "bytes" in its line includes wsOut.
	wsIn, wsOut atomic.Int64

	// pending counts what must end before the line is written: the handler,
	// and the hijacked connection if there is one.
	pending atomic.Int32
	once    sync.Once
}

// handlerDone runs when the handler returns (or panics). A handler aborted
// because its client left (see reqscope.Scope.Canceled) is no failure of the
// gateway's, and is logged as an ordinary line.
func (e *entry) handlerDone(ctx context.Context) {
	if p := recover(); p != nil {
		aborted := !(p == http.ErrAbortHandler && e.scope.Canceled)
		e.once.Do(func() { e.finish(ctx, aborted) })
		panic(p)
	}
	e.release(ctx)
}

// release ends one pending part and writes the line after the last.
func (e *entry) release(ctx context.Context) {
	if e.pending.Add(-1) == 0 {
		e.once.Do(func() { e.finish(ctx, false) })
	}
}

func (e *entry) finish(ctx context.Context, aborted bool) {
	now := time.Now()
	status := e.rec.status
	switch {
	case e.scope.Canceled && status == 0:
		status = StatusClientClosed
	case status == 0:
		status = http.StatusOK
	}
	elapsed := now.Sub(e.start)
	if e.observe != nil {
		e.res = Result{Method: e.method, Status: status, BytesOut: e.rec.bytes, Duration: elapsed, Scope: &e.scope}
		if e.hasBody {
			e.res.BytesIn = e.body.n
		}
		e.observe(&e.res)
	}
	level := slog.LevelInfo
	if aborted {
		level = slog.LevelWarn
	}
	if !e.logger.Enabled(ctx, level) {
		return // before redacting the query
	}
	path := e.rawPath
	if e.query != "" {
		path += "?" + e.redact(e.query)
	}
	var buf [11]slog.Attr
	a := append(buf[:0],
		slog.String("method", e.method),
		slog.String("path", path),
		slog.Int("status", status),
		slog.Int64("bytes", e.rec.bytes+e.wsOut.Load()),
		slog.Float64("duration_ms", float64(elapsed.Microseconds())/1000),
		slog.String("client", e.scope.Client.String()),
	)
	if e.scope.KeyName != "" {
		a = append(a, slog.String("key", e.scope.KeyName))
	}
	if e.scope.AuthFailure != "" {
		a = append(a, slog.String("auth_failure", e.scope.AuthFailure))
	}
	if e.scope.Upstream != "" {
		a = append(a, slog.String("upstream", e.scope.Upstream))
	}
	if status == http.StatusSwitchingProtocols {
		a = append(a, slog.Int64("bytes_in", e.wsIn.Load()))
	}
	if aborted {
		a = append(a, slog.Bool("aborted", true))
	}
	e.logger.LogAttrs(ctx, level, "request", a...)
}

// countingBody counts the request body bytes read through it.
type countingBody struct {
	io.ReadCloser
	n int64
}

func (c *countingBody) Read(p []byte) (int, error) {
	n, err := c.ReadCloser.Read(p)
	c.n += int64(n)
	return n, err
}

// recorder notes the status and size of a response. It passes Flush,
// ReadFrom and Hijack through and has Unwrap, so streaming responses and WebSocket
// upgrades work through it.
type recorder struct {
	http.ResponseWriter
	e      *entry
	status int
	bytes  int64
}

func (r *recorder) WriteHeader(code int) {
	if r.status == 0 || (r.status >= 100 && r.status < 200 && code >= 200) {
		r.status = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *recorder) Write(p []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	n, err := r.ResponseWriter.Write(p)
	r.bytes += int64(n)
	return n, err
}

// ReadFrom passes large bodies on to the server connection's ReadFrom, which
// can splice them from the source socket without copying them through
// user space.
func (r *recorder) ReadFrom(src io.Reader) (int64, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	n, err := io.Copy(r.ResponseWriter, src)
	r.bytes += n
	return n, err
}

func (r *recorder) Flush() {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	http.NewResponseController(r.ResponseWriter).Flush()
}

// Hijack hands over the connection. The request's line is written when both
// the handler has returned and the connection is closed, so a WebSocket
// proxied by goroutines that outlive the handler is logged when it ends.
func (r *recorder) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	conn, brw, err := http.NewResponseController(r.ResponseWriter).Hijack()
	if err != nil {
		return conn, brw, err
	}
	r.status = http.StatusSwitchingProtocols
	r.e.pending.Add(1)
	// The entry lives as long as the connection (its line is written at
	// the close); it must not keep the server's response, and with it the
	// connection's read and write buffers, alive for that long.
	r.ResponseWriter = hijackedWriter{}
	return &hijackedConn{Conn: conn, e: r.e}, brw, nil
}

// hijackedWriter stands in for a response writer whose connection was
// hijacked: what a handler still writes is refused, as net/http refuses it.
type hijackedWriter struct{}

func (hijackedWriter) Header() http.Header { return http.Header{} }

func (hijackedWriter) Write([]byte) (int, error) { return 0, http.ErrHijacked }

func (hijackedWriter) WriteHeader(int) {}

// hijackedConn counts what the connection carries and writes the request's
// line when it is closed.
type hijackedConn struct {
	net.Conn
	e    *entry
	once sync.Once
}

func (c *hijackedConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.e.wsIn.Add(int64(n))
	return n, err
}

func (c *hijackedConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.e.wsOut.Add(int64(n))
	return n, err
}

func (c *hijackedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { c.e.release(context.Background()) })
	return err
}

func (r *recorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

var (
	_ http.Flusher  = (*recorder)(nil)
	_ http.Hijacker = (*recorder)(nil)
)
