// Package proxy forwards requests to ComfyUI: plain HTTP, streamed bodies and
// WebSocket upgrades, with credentials removed on the way out and a registry
// of upgraded connections so that shutdown can close them cleanly.
package proxy

import (
	"context"
	"errors"
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
	"github.com/comfygate/comfygate/internal/requestlog"
)

// Options configure a Proxy. The zero value works: no body limit, no
// credential stripping, the default timeouts.
type Options struct {
	// StripCredentials removes the Authorization and X-API-Key headers and
	// the api_key and token query parameters from every outbound request.
	// Set it whenever keys are configured.
	StripCredentials bool
	// MaxBodyBytes caps request bodies; larger ones get 413. 0 means no cap.
	MaxBodyBytes int64
	// DialTimeout bounds connecting to ComfyUI. Default 5s.
	DialTimeout time.Duration
	// ResponseHeaderTimeout bounds the wait for ComfyUI's response headers
	// once the request is sent; 0 means no limit. Bodies and WebSockets are
	// never timed out: a download or a generation may take very long.
	ResponseHeaderTimeout time.Duration
	// Transport overrides the way to ComfyUI (tests): every request then
	// goes through it and httputil.ReverseProxy. Nil means comfygate's own
	// connection pool for plain requests to an http:// ComfyUI (forward.go)
	// and a tuned clone of http.DefaultTransport for upgrades and https.
	Transport http.RoundTripper
	// Observe, if set, is told of every exchange with ComfyUI: the time to
	// its response headers, or the error that ended it before them.
	Observe func(r *http.Request, d time.Duration, err error)
	// TrustForwarded reports whether a request came from a trusted proxy,
	// whose X-Forwarded-For, -Proto and -Host are then passed on (with the
	// proxy's address added) instead of replaced. Nil trusts nobody.
	TrustForwarded func(*http.Request) bool
	// Logger receives upstream errors. Nil means slog.Default().
	Logger *slog.Logger
}

// Proxy is an http.Handler that forwards to one ComfyUI server.
type Proxy struct {
	target    *url.URL
	opts      Options
	log       *slog.Logger
	rp        *httputil.ReverseProxy
	transport http.RoundTripper
	streams   streams
	// pool carries plain requests when it is not nil (forward.go); basePath
	// is the target's path, prefixed to every forwarded path.
	pool     *connPool
	basePath string
}

// New returns a Proxy for target, a ComfyUI base URL such as
// http://127.0.0.1:8189.
func New(target *url.URL, opts Options) *Proxy {
	if opts.DialTimeout == 0 {
		opts.DialTimeout = 5 * time.Second
	}
	p := &Proxy{target: target, opts: opts, log: opts.Logger}
	if p.log == nil {
		p.log = slog.Default()
	}
	transport := opts.Transport
	if transport == nil {
		transport = NewTransport(opts.DialTimeout, opts.ResponseHeaderTimeout)
		if target.Scheme == "http" {
			p.pool = newConnPool(hostPort(target), opts.DialTimeout, maxIdlePerHost)
			p.basePath = strings.TrimSuffix(target.EscapedPath(), "/")
		}
	}
	if opts.Observe != nil {
		transport = observed{transport, opts.Observe}
	}
	p.transport = transport
	p.rp = &httputil.ReverseProxy{
		Rewrite:      p.rewrite,
		Transport:    transport,
		BufferPool:   bufferPool{},
		ErrorHandler: p.errorHandler,
		ErrorLog:     slog.NewLogLogger(p.log.Handler(), slog.LevelWarn),
	}
	return p
}

// maxIdlePerHost is how many idle connections to ComfyUI are kept.
const maxIdlePerHost = 256

// hostPort is the dial address of an http:// or https:// URL.
func hostPort(u *url.URL) string {
	if port := u.Port(); port != "" {
		return net.JoinHostPort(u.Hostname(), port)
	}
	if u.Scheme == "https" {
		return net.JoinHostPort(u.Hostname(), "443")
	}
	return net.JoinHostPort(u.Hostname(), "80")
}

// observed reports each round trip to Options.Observe.
type observed struct {
	base    http.RoundTripper
	observe func(*http.Request, time.Duration, error)
}

func (o observed) RoundTrip(r *http.Request) (*http.Response, error) {
	start := time.Now()
	res, err := o.base.RoundTrip(r)
	if err != nil {
		o.observe(r, 0, err)
		return nil, err
	}
	o.observe(r, time.Since(start), nil)
	return res, nil
}

// Close closes the idle connections to ComfyUI.
func (p *Proxy) Close() {
	if p.pool != nil {
		p.pool.closeIdle()
	}
	if t, ok := p.opts.Transport.(interface{ CloseIdleConnections() }); ok {
		t.CloseIdleConnections()
	}
}

// NewTransport returns the transport used to reach ComfyUI: a clone of
// http.DefaultTransport with a connection pool sized for a proxy, and
// without transparent compression, so bodies pass through exactly as sent.
func NewTransport(dialTimeout, responseHeaderTimeout time.Duration) *http.Transport {
	t := http.DefaultTransport.(*http.Transport).Clone()
	// ComfyUI is reached directly: HTTP_PROXY and friends are for the
	// gateway's own outbound traffic, and the health check ignores them too.
	t.Proxy = nil
	t.DialContext = (&net.Dialer{Timeout: dialTimeout, KeepAlive: 30 * time.Second}).DialContext
	t.MaxIdleConns = 512
	t.MaxIdleConnsPerHost = maxIdlePerHost
	t.IdleConnTimeout = 90 * time.Second
	t.ResponseHeaderTimeout = responseHeaderTimeout
	t.DisableCompression = true
	t.ForceAttemptHTTP2 = false // ComfyUI (aiohttp) speaks HTTP/1.1
	return t
}

// ServeHTTP forwards r to ComfyUI.
func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if max := p.opts.MaxBodyBytes; max > 0 && r.Body != nil && r.Body != http.NoBody {
		if r.ContentLength > max {
			tooLarge(w, max)
			return
		}
		r.Body = http.MaxBytesReader(w, r.Body, max)
	}
	if up := upgradeType(r.Header); up != "" {
		p.serveUpgrade(w, r, up)
		return
	}
	if p.forwardable(r) {
		p.forward(w, r)
		return
	}
	p.rp.ServeHTTP(w, r)
}

// keyID is the key that authenticated r (zero: none).
func (p *Proxy) keyID(r *http.Request) [32]byte { return requestlog.ScopeFrom(r.Context()).KeyID }

// rewrite builds the outbound request. The inbound Host is kept, so ComfyUI's
// own Host/Origin check sees exactly what the browser sent: a browser on
// http://127.0.0.1:8188 keeps passing it, and a foreign page is still refused.
// Rewriting Host to the upstream address would make every same-origin browser
// POST and WebSocket look cross-origin to ComfyUI.
func (p *Proxy) rewrite(pr *httputil.ProxyRequest) {
	pr.SetURL(p.target)
	// The query goes on as sent. ReverseProxy re-encodes queries that Go's
	// parser dislikes and drops pairs with ';' in them, which breaks
	// ComfyUI's /view?preview=webp;90; aiohttp splits only on '&', as
	// auth.Strip does.
	pr.Out.URL.RawQuery = pr.In.URL.RawQuery
	pr.Out.Host = pr.In.Host
	// The inbound Forwarded and X-Forwarded-* headers are already gone
	// (ReverseProxy removes them before Rewrite); set fresh ones.
	if p.opts.TrustForwarded != nil && p.opts.TrustForwarded(pr.In) {
		// A trusted proxy in front: keep the chain it reports and add to it.
		pr.Out.Header["X-Forwarded-For"] = pr.In.Header["X-Forwarded-For"]
		pr.SetXForwarded()
		for _, h := range []string{"X-Forwarded-Proto", "X-Forwarded-Host"} {
			if v := pr.In.Header.Get(h); v != "" {
				pr.Out.Header.Set(h, v)
			}
		}
	} else {
		pr.SetXForwarded()
	}
	delete(pr.Out.Header, "X-Real-Ip")
	if p.opts.StripCredentials {
		auth.Strip(pr.Out)
	}
}

// errorHandler answers when ComfyUI could not be reached or the exchange
// failed before a response began.
func (p *Proxy) errorHandler(w http.ResponseWriter, r *http.Request, err error) {
	var maxErr *http.MaxBytesError
	switch {
	case errors.As(err, &maxErr):
		tooLarge(w, maxErr.Limit)
	case errors.Is(err, context.Canceled) && r.Context().Err() != nil:
		// The client went away; nobody is listening. Record 499 as nginx does.
		w.WriteHeader(499)
	case isTimeout(err):
		p.log.Warn("upstream timeout", "method", r.Method, "path", r.URL.Path, "err", err)
		jsonerr.Write(w, http.StatusGatewayTimeout, "upstream_timeout", "ComfyUI did not answer in time")
	default:
		p.log.Warn("upstream error", "method", r.Method, "path", r.URL.Path, "err", err)
		jsonerr.Write(w, http.StatusBadGateway, "upstream_unavailable", "ComfyUI is not reachable")
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
}

func tooLarge(w http.ResponseWriter, max int64) {
	w.Header().Set("Connection", "close")
	jsonerr.Write(w, http.StatusRequestEntityTooLarge, "request_too_large",
		"the request body is larger than the gateway allows (--max-upload-size)")
}

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

// bufferPool reuses the 32 KiB copy buffers ReverseProxy would otherwise
// allocate for every response. The pool holds array pointers, so that
// neither Get nor Put allocates.
type bufferPool struct{}

const bufferSize = 32 << 10

type buffer = [bufferSize]byte

var buffers = sync.Pool{New: func() any { return new(buffer) }}

func getBuffer() *buffer  { return buffers.Get().(*buffer) }
func putBuffer(b *buffer) { buffers.Put(b) }

func (bufferPool) Get() []byte { return getBuffer()[:] }

func (bufferPool) Put(b []byte) {
	if cap(b) == bufferSize {
		putBuffer((*buffer)(b[:bufferSize]))
	}
}

var _ http.Handler = (*Proxy)(nil)
