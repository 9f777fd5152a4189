// Package upstream holds the ComfyUI servers comfygate forwards to: for each
// one its name, address, connection pool, health and counters, and a Pool
// that picks the server a request goes to.
//
// The package knows servers, not ComfyUI: what a route means, and which
// answer to build from which server, is for the proxy (and later the fleet)
// to decide. A pool of one is single-server mode, and takes the same road.
package upstream

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"time"
)

// Options configure every Upstream of a Pool. The zero value works.
type Options struct {
	// DialTimeout bounds connecting to a ComfyUI server. Default 5s.
	DialTimeout time.Duration
	// ResponseHeaderTimeout bounds the wait for a server's response headers
	// once the request is sent; 0 means no limit. Bodies and WebSockets are
	// never timed out: a download or a generation may take very long.
	ResponseHeaderTimeout time.Duration
	// IdleConnTimeout is how long an idle keep-alive connection to a server
	// is kept. Default 50s: aiohttp, which serves ComfyUI, closes idle
	// connections after 75s, and a connection must be closed here first, so
	// that a request is never sent on one the server is closing.
	IdleConnTimeout time.Duration
	// Transport, if not nil, replaces every server's transport (tests and
	// benchmarks).
	Transport http.RoundTripper
}

// Upstream is one ComfyUI server. It is safe for concurrent use.
type Upstream struct {
	// Name identifies the server in logs, metrics and /health.
	Name string
	// URL is the server's base URL, such as http://127.0.0.1:8189.
	URL *url.URL

	transport http.RoundTripper
	// down is set by a failed check or a failed connection, and cleared by
	// a passing check or a successful exchange.
	down atomic.Bool
	// inFlight counts exchanges under way (headers not yet received).
	inFlight atomic.Int64
	// draining is set for a server leaving the fleet: it takes no new
	// prompts, and leaves when its queue is empty.
	draining atomic.Bool
}

// New returns an Upstream for base, named name (the URL's host when name is
// empty).
func New(name string, base *url.URL, opts Options) *Upstream {
	if name == "" {
		name = base.Host
	}
	u := &Upstream{Name: name, URL: base, transport: opts.Transport}
	if u.transport == nil {
		u.transport = NewTransport(opts)
	}
	return u
}

// NewTransport returns the transport used to reach ComfyUI: a clone of
// http.DefaultTransport with a connection pool sized for a proxy, HTTP/1.1
// only, and without transparent compression, so bodies pass through exactly
// as sent.
//
// http.Transport watches each idle connection: when ComfyUI closes it (on a
// restart, say) the connection leaves the pool at once, not on its next use.
// A request whose connection fails before any byte of the answer arrives is
// sent again on a fresh connection by the Transport itself when that is safe
// (GET and HEAD, or nothing was written); a POST that may have reached
// ComfyUI is never sent twice.
func NewTransport(opts Options) *http.Transport {
	if opts.DialTimeout == 0 {
		opts.DialTimeout = 5 * time.Second
	}
	if opts.IdleConnTimeout == 0 {
		opts.IdleConnTimeout = 50 * time.Second
	}
	t := http.DefaultTransport.(*http.Transport).Clone()
	// ComfyUI is reached directly: HTTP_PROXY and friends are for the
	// gateway's own outbound traffic.
	t.Proxy = nil
	t.DialContext = (&net.Dialer{Timeout: opts.DialTimeout, KeepAlive: 30 * time.Second}).DialContext
	t.MaxIdleConns = 512
	t.MaxIdleConnsPerHost = 256
	t.IdleConnTimeout = opts.IdleConnTimeout
	t.ResponseHeaderTimeout = opts.ResponseHeaderTimeout
	t.DisableCompression = true
	t.ForceAttemptHTTP2 = false // ComfyUI (aiohttp) speaks HTTP/1.1
	t.Protocols = new(http.Protocols)
	t.Protocols.SetHTTP1(true)
	return t
}

// RoundTrip sends req, which must already be addressed to u, and notes the
// outcome in u's health: a server that cannot be connected to is down until
// an exchange or a check succeeds.
func (u *Upstream) RoundTrip(req *http.Request) (*http.Response, error) {
	u.inFlight.Add(1)
	res, err := u.transport.RoundTrip(req)
	u.inFlight.Add(-1)
	switch {
	case err == nil:
		u.down.Store(false)
	case IsDialError(err):
		u.down.Store(true)
	}
	return res, err
}

// Healthy reports whether the server is thought to be up.
func (u *Upstream) Healthy() bool { return !u.down.Load() }

// SetHealthy records the result of an active check.
func (u *Upstream) SetHealthy(ok bool) { u.down.Store(!ok) }

// Draining reports whether the server is leaving the fleet.
func (u *Upstream) Draining() bool { return u.draining.Load() }

// SetDraining marks the server as leaving the fleet (or not).
func (u *Upstream) SetDraining(d bool) { u.draining.Store(d) }

// InFlight reports how many exchanges with the server are under way.
func (u *Upstream) InFlight() int64 { return u.inFlight.Load() }

// CloseIdleConnections closes the server's idle keep-alive connections.
func (u *Upstream) CloseIdleConnections() {
	if t, ok := u.transport.(interface{ CloseIdleConnections() }); ok {
		t.CloseIdleConnections()
	}
}

// String returns the server's name.
func (u *Upstream) String() string { return u.Name }

// IsDialError reports whether err means no connection to the server could
// be made, so nothing of the request was sent: the only failure after which
// any request, a POST included, may be tried again (on this server or on
// another).
func IsDialError(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial"
}

// ErrNoUpstream is returned by Pick when no server can take a request.
var ErrNoUpstream = errors.New("no ComfyUI server is available")

// Pool is the set of ComfyUI servers. Servers may be added and removed
// while it is in use (the fleet's --upstreams-file).
type Pool struct {
	opts Options
	mu   sync.RWMutex
	ups  []*Upstream
}

// Spec names one server for NewPool.
type Spec struct {
	Name string // optional: the URL's host when empty
	URL  *url.URL
}

// NewPool returns a pool of the servers in specs; names must be unique.
func NewPool(specs []Spec, opts Options) (*Pool, error) {
	if len(specs) == 0 {
		return nil, errors.New("no upstream configured")
	}
	p := &Pool{opts: opts}
	seen := make(map[string]bool, len(specs))
	for _, s := range specs {
		u := New(s.Name, s.URL, opts)
		if seen[u.Name] {
			return nil, fmt.Errorf("upstream name %q is used twice", u.Name)
		}
		seen[u.Name] = true
		p.ups = append(p.ups, u)
	}
	return p, nil
}

// Pick returns the server for a request. With one server it is always that
// server, up or down, so that a client gets the server's own error rather
// than the gateway's guess (single-server mode). With several it is the
// first healthy one; ErrNoUpstream when none is.
func (p *Pool) Pick() (*Upstream, error) {
	ups := p.All()
	if len(ups) == 1 {
		return ups[0], nil
	}
	for _, u := range ups {
		if u.Healthy() {
			return u, nil
		}
	}
	return nil, ErrNoUpstream
}

// All returns every server, in configuration order. The slice must not be
// modified.
func (p *Pool) All() []*Upstream {
	p.mu.RLock()
	defer p.mu.RUnlock()
	return p.ups
}

// Get returns the server named name.
func (p *Pool) Get(name string) (*Upstream, bool) {
	for _, u := range p.All() {
		if u.Name == name {
			return u, true
		}
	}
	return nil, false
}

// Add adds a server (or returns the one of that name, no longer draining,
// when its URL is the same). An existing name with another URL is an
// error: drain and remove it first.
func (p *Pool) Add(s Spec) (*Upstream, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	u := New(s.Name, s.URL, p.opts)
	for _, have := range p.ups {
		if have.Name == u.Name {
			if have.URL.String() != u.URL.String() {
				return nil, fmt.Errorf("upstream %q is already %s", u.Name, have.URL.Redacted())
			}
			have.SetDraining(false)
			return have, nil
		}
	}
	// Copy on write: All's callers keep the slice they got.
	p.ups = append(p.ups[:len(p.ups):len(p.ups)], u)
	return u, nil
}

// Remove takes the server named name out of the pool and closes its idle
// connections.
func (p *Pool) Remove(name string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i, u := range p.ups {
		if u.Name == name {
			p.ups = append(p.ups[:i:i], p.ups[i+1:]...)
			u.CloseIdleConnections()
			return
		}
	}
}

// CloseIdleConnections closes every server's idle connections.
func (p *Pool) CloseIdleConnections() {
	for _, u := range p.All() {
		u.CloseIdleConnections()
	}
}

var _ http.RoundTripper = (*Upstream)(nil)
