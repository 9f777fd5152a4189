// Package proxy forwards requests to ComfyUI: plain HTTP, streamed bodies and
// WebSocket upgrades, with credentials removed on the way out and a registry
// of upgraded connections so that shutdown can close them cleanly.
//
// A request takes one road: pick a server from the upstream pool, build the
// request ComfyUI receives (outbound, the one place that decides what that
// request holds), make one round trip through the server's http.Transport,
// and copy the answer to the client (httputil.ReverseProxy, or the upgrade
// path in upgrade.go for WebSockets). When no answer comes, fail says whose
// fault it was: the client's (400, 408, 413, or nothing at all for a client
// that left) or ComfyUI's (502, 503, 504).
package proxy

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/comfygate/comfygate/internal/auth"
	"github.com/comfygate/comfygate/internal/jsonerr"
	"github.com/comfygate/comfygate/internal/reqscope"
	"github.com/comfygate/comfygate/internal/upstream"
)

// Options configure a Proxy. The zero value works: no body limit, no
// credential stripping.
type Options struct {
	// StripCredentials removes the Authorization and X-API-Key headers, the
	// session cookie and the api_key and token query parameters (also from
	// the Referer) from every outbound request. Set it whenever keys are
	// configured.
	StripCredentials bool
	// MaxBodyBytes caps request bodies; larger ones get 413. 0 means no cap.
	MaxBodyBytes int64
	// CORSOrigin, if not empty, is added as Access-Control-Allow-Origin (with
	// ComfyUI's other CORS headers) to answers that have none, as ComfyUI's
	// --enable-cors-header does.
	CORSOrigin string
	// Observe, if set, is told of every exchange with ComfyUI: the time to
	// its response headers, or why there was no answer (reason is one of
	// the Reason* constants; "" for an answer).
	Observe func(r *http.Request, d time.Duration, reason string)
	// TrustForwarded reports whether a request came from a trusted proxy,
	// whose X-Forwarded-For, -Proto and -Host are then passed on (with the
	// proxy's address added) instead of replaced. Nil trusts nobody.
	TrustForwarded func(*http.Request) bool
	// UserHeader sets ComfyUI's comfy-user header (its --multi-user mode)
	// to the name of the request's key, so that each key has its own
	// workflows and settings (--isolation keys); a client's own
	// comfy-user header is then removed. Without it the header passes, as
	// the web UI of a --multi-user ComfyUI sends it.
	UserHeader bool
	// Via, if set, is this gateway's name in the Via header of every
	// outbound request (RFC 9110 7.6.3), so that a request that comes back
	// to the gateway that sent it is recognised (see LoopDetected).
	Via string
	// Logger receives upstream errors. Nil means slog.Default().
	Logger *slog.Logger
}

// Why an exchange with ComfyUI got no answer, as told to Options.Observe.
// Only these count against ComfyUI; a client's bad body or departure does
// not.
const (
	// ReasonUnreachable: no connection could be made (nothing was sent).
	ReasonUnreachable = "unreachable"
	// ReasonTimeout: ComfyUI did not answer within --upstream-timeout.
	ReasonTimeout = "timeout"
	// ReasonBroken: the connection failed after the request was sent and
	// before the answer's headers (ComfyUI restarted, or answered with
	// something that is not HTTP).
	ReasonBroken = "broken"
	// ReasonNoUpstream: no server could take the request.
	ReasonNoUpstream = "no_upstream"
)

// Proxy is an http.Handler that forwards to the servers of an upstream
// pool.
type Proxy struct {
	pool    *upstream.Pool
	opts    Options
	log     *slog.Logger
	errLog  *log.Logger // ReverseProxy's own complaints, at level WARN
	streams streams
}

// New returns a Proxy to the servers in pool.
func New(pool *upstream.Pool, opts Options) *Proxy {
	p := &Proxy{pool: pool, opts: opts, log: opts.Logger}
	if p.log == nil {
		p.log = slog.Default()
	}
	p.errLog = slog.NewLogLogger(p.log.Handler(), slog.LevelWarn)
	return p
}

// ServeHTTP forwards r to the server the pool picks.
func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	u, err := p.pool.Pick()
	if err != nil {
		w.Header().Del("Connection")
		p.fail(w, r, "", 0, err)
		return
	}
	p.Forward(w, r, u)
}

// Forward sends r to server u and copies the answer to w: the road of
// every request that goes to one server, whoever chose it (the pool in
// single-server mode, the fleet by route otherwise).
func (p *Proxy) Forward(w http.ResponseWriter, r *http.Request, u *upstream.Upstream) {
	// The request passed every check and its body will be read: the
	// connection may be kept (see server's guard).
	w.Header().Del("Connection")
	var body *clientBody
	if r.Body != nil && r.Body != http.NoBody {
		if max := p.opts.MaxBodyBytes; max > 0 && r.ContentLength > max {
			p.fail(w, r, "", 0, &http.MaxBytesError{Limit: max})
			return
		}
		body = &clientBody{ReadCloser: r.Body}
		if max := p.opts.MaxBodyBytes; max > 0 {
			body.ReadCloser = http.MaxBytesReader(w, r.Body, max)
		}
		r.Body = body
	}
	reqscope.From(r.Context()).Upstream = u.Name
	if up := upgradeType(r.Header); up != "" {
		p.serveUpgrade(w, r, u, up)
		return
	}
	x := &exchange{p: p, u: u, body: body}
	rp := &httputil.ReverseProxy{
		Rewrite:        func(pr *httputil.ProxyRequest) { p.outbound(pr.Out, pr.In, u) },
		Transport:      x,
		BufferPool:     x,
		ModifyResponse: x.modifyResponse,
		ErrorHandler:   x.errorHandler,
		ErrorLog:       p.errLog,
	}
	rp.ServeHTTP(w, r)
}

// Outbound builds a request of the gateway's own to server u on behalf of
// client request in: method, target (a path with its query, such as
// "/api/queue") and body replace in's, and everything else is decided by
// outbound, as for a forwarded request (the fleet's fan-outs and
// dispatches use it, so that they too carry no credential).
func (p *Proxy) Outbound(in *http.Request, u *upstream.Upstream, method, target string, body []byte) (*http.Request, error) {
	tu, err := url.ParseRequestURI(target)
	if err != nil {
		return nil, err
	}
	src := in.Clone(in.Context())
	src.Method, src.URL, src.RequestURI = method, tu, ""
	out := src.Clone(in.Context())
	out.Close = false
	removeHopByHop(out.Header)
	for _, h := range []string{"Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "Content-Length", "Content-Encoding"} {
		delete(out.Header, h)
	}
	out.Body, out.ContentLength, out.GetBody = http.NoBody, 0, nil
	if body != nil {
		out.ContentLength = int64(len(body))
		out.Body = io.NopCloser(bytes.NewReader(body))
		out.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
	}
	p.outbound(out, src, u)
	if _, ok := out.Header["User-Agent"]; !ok {
		out.Header.Set("User-Agent", "") // not Go's default
	}
	return out, nil
}

// RoundTrip sends out (from Outbound) to u, counted like a forwarded
// exchange.
func (p *Proxy) RoundTrip(u *upstream.Upstream, out *http.Request) (*http.Response, error) {
	return (&exchange{p: p, u: u}).RoundTrip(out)
}

// Fail answers a request the gateway could not get an answer for from
// server (named for the logs; "" when none was chosen), saying whose fault
// it was, as for a forwarded request.
func (p *Proxy) Fail(w http.ResponseWriter, r *http.Request, server string, err error) {
	p.fail(w, r, server, 0, err)
}

// outbound makes out, a copy of in without hop-by-hop and forwarding
// headers, into the request ComfyUI server u receives. It is the one place
// that decides what ComfyUI sees, for plain requests (through
// ReverseProxy's Rewrite) and upgrades alike.
//
// The inbound Host is kept, so ComfyUI's own Host/Origin check sees exactly
// what the browser sent: a browser on http://127.0.0.1:8188 keeps passing
// it, and a foreign page is still refused. Rewriting Host to the upstream
// address would make every same-origin browser POST and WebSocket look
// cross-origin to ComfyUI.
func (p *Proxy) outbound(out, in *http.Request, u *upstream.Upstream) {
	(&httputil.ProxyRequest{In: in, Out: out}).SetURL(u.URL)
	// The query goes on as sent. ReverseProxy re-encodes queries that Go's
	// parser dislikes and drops pairs with ';' in them, which breaks
	// ComfyUI's /view?preview=webp;90; aiohttp splits only on '&', as
	// auth.Strip does.
	out.URL.RawQuery = in.URL.RawQuery
	out.Host = in.Host
	pr := &httputil.ProxyRequest{In: in, Out: out}
	if p.opts.TrustForwarded != nil && p.opts.TrustForwarded(in) {
		// A trusted proxy in front: keep the chain it reports and add to it.
		out.Header["X-Forwarded-For"] = in.Header["X-Forwarded-For"]
		pr.SetXForwarded()
		for _, h := range []string{"X-Forwarded-Proto", "X-Forwarded-Host"} {
			if v := in.Header.Get(h); v != "" {
				out.Header.Set(h, v)
			}
		}
	} else {
		pr.SetXForwarded()
	}
	delete(out.Header, "X-Real-Ip")
	if p.opts.UserHeader {
		// ComfyUI trusts comfy-user: under isolation only the key names it.
		delete(out.Header, "Comfy-User")
		if name := reqscope.From(in.Context()).KeyName; name != "" {
			out.Header.Set("Comfy-User", ComfyUser(name))
		}
	}
	if p.opts.Via != "" {
		out.Header.Add("Via", "1.1 "+p.opts.Via)
	}
	if p.opts.StripCredentials {
		auth.Strip(out)
	}
}

// ComfyUser is the comfy-user id of the key named name: ComfyUI's own
// rule for user ids (every run of characters other than letters, digits,
// '-' and '_' becomes '-'), so users.json can list "alice": "alice".
func ComfyUser(name string) string {
	var b strings.Builder
	dash := false
	for _, r := range name {
		ok := r < 128 && (r == '-' || r == '_' || r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z')
		switch {
		case ok:
			b.WriteRune(r)
			dash = false
		case !dash:
			b.WriteByte('-')
			dash = true
		}
	}
	return b.String()
}

// LoopDetected reports whether r has already passed through the gateway
// named via: an --upstream that leads back to the gateway itself.
func LoopDetected(r *http.Request, via string) bool {
	for _, v := range r.Header.Values("Via") {
		for hop := range strings.SplitSeq(v, ",") {
			// "1.1 name" or "1.1 name (comment)": the name is the second field.
			if f := strings.Fields(hop); len(f) >= 2 && f[1] == via {
				return true
			}
		}
	}
	return false
}

// modifyResponse adds the CORS headers comfygate was asked for to an answer
// that has none of its own, and notes a large body for Get.
func (x *exchange) modifyResponse(res *http.Response) error {
	x.large = res.ContentLength >= largeBufferSize
	if o := x.p.opts.CORSOrigin; o != "" && res.Header.Get("Access-Control-Allow-Origin") == "" {
		SetCORS(res.Header, o)
	}
	return nil
}

// SetCORS sets the CORS headers ComfyUI's --enable-cors-header sends, for
// origin.
func SetCORS(h http.Header, origin string) {
	h.Set("Access-Control-Allow-Origin", origin)
	h.Set("Access-Control-Allow-Methods", "POST, GET, DELETE, PUT, OPTIONS, PATCH")
	h.Set("Access-Control-Allow-Headers", "Content-Type, Authorization, X-API-Key")
	h.Set("Access-Control-Allow-Credentials", "true")
	if origin != "*" {
		h.Add("Vary", "Origin")
	}
}

// exchange is one request's round trip to server u.
type exchange struct {
	p    *Proxy
	u    *upstream.Upstream
	body *clientBody // nil without a body
	// large is set when the answer's body is at least largeBufferSize.
	large bool
}

// RoundTrip sends out to the server and reports the time to its headers.
func (x *exchange) RoundTrip(out *http.Request) (*http.Response, error) {
	start := time.Now()
	res, err := x.u.RoundTrip(out)
	if err == nil && x.p.opts.Observe != nil {
		x.p.opts.Observe(out, time.Since(start), "")
	}
	return res, err
}

func (x *exchange) errorHandler(w http.ResponseWriter, r *http.Request, err error) {
	x.p.fail(w, r, x.u.Name, 0, x.blame(err))
}

// blame puts the client's own failure first: when reading the client's
// body failed, that, not what the Transport made of it, is the error.
func (x *exchange) blame(err error) error {
	if x.body != nil && x.body.err != nil {
		return &ClientBodyError{Err: x.body.err}
	}
	return err
}

// ClientBodyError is a failure to read the client's request body: cut
// short, malformed chunked framing, too large, or too slow. It is the
// client's fault, never ComfyUI's.
type ClientBodyError struct{ Err error }

func (e *ClientBodyError) Error() string { return "reading the request body: " + e.Err.Error() }

func (e *ClientBodyError) Unwrap() error { return e.Err }

// fail answers a request that got no answer from ComfyUI, with a status that
// says whose fault it was, and tells Observe when it was ComfyUI's. A client
// that has gone away gets nothing: the handler is aborted, and the request
// log records it as canceled.
func (p *Proxy) fail(w http.ResponseWriter, r *http.Request, server string, d time.Duration, err error) {
	var (
		maxErr  *http.MaxBytesError
		bodyErr *ClientBodyError
	)
	reason := ""
	switch {
	case errors.As(err, &maxErr):
		w.Header().Set("Connection", "close")
		jsonerr.Write(w, http.StatusRequestEntityTooLarge, "request_too_large",
			"the request body is larger than the gateway allows (--max-upload-size)")
	case errors.As(err, &bodyErr):
		w.Header().Set("Connection", "close")
		if isTimeout(bodyErr.Err) {
			p.log.Info("request body timed out", "method", r.Method, "path", r.URL.Path, "err", bodyErr.Err)
			jsonerr.Write(w, http.StatusRequestTimeout, "request_timeout",
				"the request body did not arrive in time")
			return
		}
		p.log.Info("bad request body", "method", r.Method, "path", r.URL.Path, "err", bodyErr.Err)
		jsonerr.Write(w, http.StatusBadRequest, "bad_request",
			"the request body could not be read: it was cut short or its chunked encoding is malformed")
	case r.Context().Err() != nil:
		// The client went away (a failed body read ends the request's
		// context too, hence the cases above first). Nothing may be sent:
		// net/http would otherwise answer a half-closed client with an
		// invented 200.
		reqscope.From(r.Context()).Canceled = true
		panic(http.ErrAbortHandler)
	case errors.Is(err, upstream.ErrNoUpstream):
		reason = ReasonNoUpstream
		p.log.Warn("no upstream available", "method", r.Method, "path", r.URL.Path)
		jsonerr.Write(w, http.StatusServiceUnavailable, "no_upstream", "no ComfyUI server is available")
	case isTimeout(err):
		reason = ReasonTimeout
		p.log.Warn("upstream timeout", "upstream", server, "method", r.Method, "path", r.URL.Path, "err", err)
		jsonerr.Write(w, http.StatusGatewayTimeout, "upstream_timeout", "ComfyUI did not answer in time")
	case upstream.IsDialError(err):
		reason = ReasonUnreachable
		p.log.Warn("upstream unreachable", "upstream", server, "method", r.Method, "path", r.URL.Path, "err", err)
		jsonerr.Write(w, http.StatusBadGateway, "upstream_unavailable", "ComfyUI is not reachable")
	default:
		reason = ReasonBroken
		p.log.Warn("upstream connection failed", "upstream", server, "method", r.Method, "path", r.URL.Path, "err", err)
		jsonerr.Write(w, http.StatusBadGateway, "upstream_unavailable",
			"the connection to ComfyUI failed before it answered (ComfyUI may have restarted); the request was not sent again")
	}
	if reason != "" && p.opts.Observe != nil {
		p.opts.Observe(r, d, reason)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
}

// clientBody remembers the first error reading the client's body returned,
// so that a failed exchange can be blamed on the right side.
type clientBody struct {
	io.ReadCloser
	err error
}

func (b *clientBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err != nil && err != io.EOF && b.err == nil {
		b.err = err
	}
	return n, err
}

// keyID is the key that authenticated r (zero: none).
func keyID(r *http.Request) [32]byte { return reqscope.From(r.Context()).KeyID }

// Close closes the idle connections to ComfyUI.
func (p *Proxy) Close() { p.pool.CloseIdleConnections() }

// CloseStreams ends every proxied WebSocket: each client gets a close frame
// with code 1001 (going away) and both connections are closed. It returns
// when all are closed or ctx is done.
func (p *Proxy) CloseStreams(ctx context.Context) { p.streams.closeAll(ctx, goingAwayFrame, nil) }

// CloseStreamsOf ends the WebSockets opened with any of the keys in ids,
// with close code 1008 (policy violation, "API key revoked"). It returns
// how many it closed.
func (p *Proxy) CloseStreamsOf(ctx context.Context, ids map[[32]byte]bool) int {
	return p.streams.closeAll(ctx, revokedFrame, func(c *streamConn) bool { return ids[c.keyID] })
}

// OpenStreams reports how many upgraded connections are open.
func (p *Proxy) OpenStreams() int { return p.streams.len() }

// StreamBytes reports the bytes WebSockets have carried: in is client to
// ComfyUI, out is ComfyUI to client.
func (p *Proxy) StreamBytes() (in, out int64) { return p.streams.in.Load(), p.streams.out.Load() }

// Copy buffers, pooled as array pointers so that neither Get nor Put
// allocates. Most answers (JSON, thumbnails) and the WebSocket pumps use
// the small size; a large download (a full-size /view) is copied in large
// buffers, which halves the system calls and CPU per byte (8 MiB /view:
// 6.1 → 3.4 ms of CPU, 1.5x the MiB/s; bench/notes.md).
const (
	bufferSize      = 32 << 10
	largeBufferSize = 256 << 10
)

type (
	buffer      = [bufferSize]byte
	largeBuffer = [largeBufferSize]byte
)

var (
	buffers      = sync.Pool{New: func() any { return new(buffer) }}
	largeBuffers = sync.Pool{New: func() any { return new(largeBuffer) }}
)

func getBuffer() *buffer  { return buffers.Get().(*buffer) }
func putBuffer(b *buffer) { buffers.Put(b) }

// Get is the httputil.BufferPool ReverseProxy copies an answer with: a
// large buffer for a body of at least largeBufferSize, else a small one.
func (x *exchange) Get() []byte {
	if x.large {
		return largeBuffers.Get().(*largeBuffer)[:]
	}
	return getBuffer()[:]
}

func (x *exchange) Put(b []byte) {
	switch cap(b) {
	case largeBufferSize:
		largeBuffers.Put((*largeBuffer)(b[:largeBufferSize]))
	case bufferSize:
		putBuffer((*buffer)(b[:bufferSize]))
	}
}

var _ http.Handler = (*Proxy)(nil)
