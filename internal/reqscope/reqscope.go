// Package reqscope carries what comfygate learns about one request from the
// layer that learns it to the layers that need it: the route entry and the
// client address (set by requestlog's middleware, the outermost layer), the
// key (auth), why the gateway refused it (auth, limits), the ComfyUI server
// it went to and whether its client went away (proxy). The request log, the
// audit trail and the metrics read it when the request is done.
package reqscope

import (
	"context"
	"net/netip"

	"github.com/comfygate/comfygate/internal/route"
)

// Scope holds facts about one request. It is not safe for use by several
// goroutines at once; a request's handlers run one after another.
type Scope struct {
	// Route is the request's entry in the route table, classified once.
	Route route.Entry
	// Client is the client's address (behind trusted proxies, the one they
	// report).
	Client netip.Addr
	// KeyName names the API key that authenticated the request ("" if none).
	KeyName string
	// KeyID is the authenticating key's in-process identity (its SHA-256);
	// it is never logged.
	KeyID [32]byte
	// KeyScope is what the authenticating key may do (ScopeNone: no key).
	KeyScope route.Scope
	// AuthFailure says why the gateway refused the request (missing,
	// invalid, scope, locked_out, rate_limited, cross_site), or "".
	AuthFailure string
	// Upstream names the ComfyUI server the request was sent to ("" if
	// none).
	Upstream string
	// Canceled says the client went away before it was answered; nothing
	// was sent to it. The request log records status 499, nginx's
	// convention.
	Canceled bool
}

type key struct{}

// NewContext returns ctx carrying s.
func NewContext(ctx context.Context, s *Scope) context.Context {
	return context.WithValue(ctx, key{}, s)
}

// From returns the request's Scope. Outside requestlog's middleware it
// returns a throwaway Scope, so callers never need a nil check; its zero
// Route is protected (see route.Entry).
func From(ctx context.Context) *Scope {
	if s, ok := ctx.Value(key{}).(*Scope); ok {
		return s
	}
	return &Scope{}
}
