// Package requestlog writes one structured log line per request and carries
// the per-request facts that inner handlers learn (which key was used) out to
// that line.
package requestlog

import (
	"bufio"
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"time"
)

// Scope holds facts about one request that inner layers fill in and the
// access log reads after the request is done. It is not safe for use by
// several goroutines at once; a request's handlers run one after another.
type Scope struct {
	// Client is the client's address (behind trusted proxies, the one they
	// report).
	Client netip.Addr
	// KeyName names the API key that authenticated the request ("" if none).
	KeyName string
	// KeyID is the authenticating key's in-process identity (its SHA-256);
	// it is never logged.
	KeyID [32]byte
	// AuthFailure says why authentication failed ("missing", "invalid"), or "".
	AuthFailure string
}

type scopeKey struct{}

// ScopeFrom returns the request's Scope. Outside a Middleware it returns a
// throwaway Scope, so callers never need a nil check.
func ScopeFrom(ctx context.Context) *Scope {
	if s, ok := ctx.Value(scopeKey{}).(*Scope); ok {
		return s
	}
	return &Scope{}
}

// Redactor rewrites a raw query string for logging, hiding credentials.
type Redactor func(rawQuery string) string

// ClientResolver finds a request's client address.
type ClientResolver func(*http.Request) netip.Addr

// Result is what an Observer learns about a finished request.
type Result struct {
	Method   string
	Path     string // r.URL.Path, decoded, without the query
	Status   int
	BytesIn  int64 // request body bytes read
	BytesOut int64 // response body bytes written
	Duration time.Duration
	Scope    *Scope
}

// Observer is told about every finished request (metrics).
type Observer func(*Result)

// Middleware logs one line per request at level Info on logger, after the
// request is done: method, path (query redacted by redact), status, bytes
// written, duration, client address and key name. A WebSocket is logged when
// it closes, with status 101 and its lifetime as the duration.
func Middleware(logger *slog.Logger, redact Redactor, client ClientResolver, observe Observer) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			start := time.Now()
			scope := &Scope{Client: client(r)}
			rec := &recorder{ResponseWriter: w}
			// The path as sent (escaped), so a log shows /assets/%2e%2e/x,
			// not the decoded /assets/../x.
			path, rawPath, query := r.URL.Path, r.URL.EscapedPath(), r.URL.RawQuery
			method := r.Method
			var body *countingBody
			if r.Body != nil && r.Body != http.NoBody {
				body = &countingBody{ReadCloser: r.Body}
				r.Body = body
			}
			// Log in a defer: ReverseProxy aborts a response whose upstream
			// body fails midway with a panic (http.ErrAbortHandler), and
			// that request deserves its line too.
			defer func() {
				status := rec.status
				if status == 0 {
					status = http.StatusOK
				}
				elapsed := time.Since(start)
				if observe != nil {
					res := &Result{Method: method, Path: path, Status: status, BytesOut: rec.bytes, Duration: elapsed, Scope: scope}
					if body != nil {
						res.BytesIn = body.n
					}
					observe(res)
				}
				logged := rawPath
				if query != "" {
					logged += "?" + redact(query)
				}
				attrs := []slog.Attr{
					slog.String("method", method),
					slog.String("path", logged),
					slog.Int("status", status),
					slog.Int64("bytes", rec.bytes),
					slog.Float64("duration_ms", float64(elapsed.Microseconds())/1000),
					slog.String("client", scope.Client.String()),
				}
				if scope.KeyName != "" {
					attrs = append(attrs, slog.String("key", scope.KeyName))
				}
				if scope.AuthFailure != "" {
					attrs = append(attrs, slog.String("auth_failure", scope.AuthFailure))
				}
				if p := recover(); p != nil {
					attrs = append(attrs, slog.Bool("aborted", true))
					logger.LogAttrs(r.Context(), slog.LevelWarn, "request", attrs...)
					panic(p)
				}
				logger.LogAttrs(r.Context(), slog.LevelInfo, "request", attrs...)
			}()
			next.ServeHTTP(rec, r.WithContext(context.WithValue(r.Context(), scopeKey{}, scope)))
		})
	}
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

// recorder notes the status and size of a response. It passes Flush and
// Hijack through and has Unwrap, so streaming responses and WebSocket
// upgrades work through it.
type recorder struct {
	http.ResponseWriter
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

func (r *recorder) Flush() {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	http.NewResponseController(r.ResponseWriter).Flush()
}

func (r *recorder) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	conn, brw, err := http.NewResponseController(r.ResponseWriter).Hijack()
	if err == nil {
		r.status = http.StatusSwitchingProtocols
	}
	return conn, brw, err
}

func (r *recorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

var (
	_ http.Flusher  = (*recorder)(nil)
	_ http.Hijacker = (*recorder)(nil)
)
