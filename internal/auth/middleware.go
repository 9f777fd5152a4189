package auth

import (
	"context"
	"net/http"
	"net/netip"
	"time"

	"github.com/comfygate/comfygate/internal/jsonerr"
	"github.com/comfygate/comfygate/internal/ratelimit"
	"github.com/comfygate/comfygate/internal/reqscope"
	"github.com/comfygate/comfygate/internal/route"
	"github.com/comfygate/comfygate/internal/session"
)

// Source hands out the current key set. A Reloader is one; so is Static.
type Source interface {
	KeySet() *KeySet
}

// Static is a Source whose keys never change.
type Static struct{ Set *KeySet }

// KeySet returns the fixed set.
func (s Static) KeySet() *KeySet { return s.Set }

// Options tune the middleware.
type Options struct {
	// Lockout, if not nil, counts invalid credentials per client address and
	// refuses locked-out clients with 429. A lockout that cannot be asked
	// (a shared store that is down) lets the request through: the key
	// check still holds, and an outage of the store must not lock
	// everyone out.
	Lockout ratelimit.Lockout
	// OnLockout, if set, is called when a client has just been locked out.
	OnLockout func(r *http.Request, client netip.Addr, until time.Duration)
	// Sessions, if not nil, turns on browser login: a request without a key
	// may carry a session cookie, checked against cross-site use, and a
	// browser that navigates to a page without one is sent to LoginPath.
	// A session that cannot be looked up (a shared store that is down)
	// fails closed: 503, never access, and never a login page that could
	// not open a session either.
	Sessions  session.Store
	LoginPath string
}

// Reasons a request was refused, as recorded in the request scope.
const (
	FailureMissing = "missing"
	FailureInvalid = "invalid"
	FailureScope   = "scope"
	FailureLocked  = "locked_out"
	// FailureCrossSite: a session cookie came with a request from another site.
	FailureCrossSite = "cross_site"
	// FailureSessionStore: the request's session could not be looked up.
	FailureSessionStore = "session_unavailable"
)

// Middleware returns the authentication layer. With no keys configured it
// passes everything: comfygate is then a pure pass-through.
//
// Whether a request is public or protected, and the scope a protected one
// needs, is its route entry (route.Classify), read from the request's scope
// (reqscope), where requestlog's middleware put it. A protected request
// passes only if it carries at least one credential, every credential it
// carries is a configured key, and the narrowest of those keys' scopes
// covers the route. A public request passes whatever it carries. A client locked out by Lockout gets 429 for
// everything. Stripping the credentials before the request goes upstream is
// the proxy's job (see Strip), so the inbound request is never modified.
func Middleware(keys Source, opts Options) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			ks := keys.KeySet()
			if !ks.Enabled() {
				next.ServeHTTP(w, r)
				return
			}
			scope := reqscope.From(r.Context())
			if opts.Lockout != nil {
				if left, locked, err := opts.Lockout.Locked(r.Context(), scope.Client); err == nil && locked {
					scope.AuthFailure = FailureLocked
					TooManyRequests(w, left, "too many failed attempts from this address; try again later")
					return
				}
			}
			var credBuf [2]Credential
			creds := AppendCredentials(credBuf[:0], r)
			key, failure := check(ks, creds)
			viaCookie, sessionDown := false, false
			if len(creds) == 0 && opts.Sessions != nil {
				k, ok, err := sessionKey(r.Context(), ks, opts.Sessions, r)
				switch {
				case err != nil:
					sessionDown = true
				case ok:
					key, failure, viaCookie = k, "", true
				}
			}
			if failure == FailureInvalid && opts.Lockout != nil {
				// Counted on public routes too: otherwise the answer to a
				// guess on "/" (page or login redirect) would be an oracle
				// the lockout never sees.
				if locked, err := opts.Lockout.Fail(r.Context(), scope.Client); err == nil && locked && opts.OnLockout != nil {
					opts.OnLockout(r, scope.Client, opts.Lockout.Window())
				}
			}
			if scope.Route.Access != route.Protected {
				if failure == "" {
					scope.KeyName, scope.KeyID, scope.KeyScope = key.Name, key.ID(), key.Scope
				} else if opts.Sessions != nil && r.URL.Path == "/" && wantsLogin(r) {
					// The UI page itself is public, but without a session
					// every call it makes would fail: log in first.
					if sessionDown {
						scope.AuthFailure = FailureSessionStore
						SessionStoreDown(w)
						return
					}
					loginRedirect(w, r, opts.LoginPath)
					return
				}
				next.ServeHTTP(w, r)
				return
			}
			if sessionDown {
				scope.AuthFailure = FailureSessionStore
				SessionStoreDown(w)
				return
			}
			if failure != "" {
				scope.AuthFailure = failure
				if failure == FailureMissing && opts.Sessions != nil && wantsLogin(r) {
					loginRedirect(w, r, opts.LoginPath)
					return
				}
				Unauthorized(w, failure)
				return
			}
			if viaCookie && !SameOrigin(r) {
				scope.AuthFailure = FailureCrossSite
				jsonerr.Write(w, http.StatusForbidden, "cross_site",
					"a request from another site cannot use this browser's comfygate session; send an API key instead")
				return
			}
			scope.KeyName, scope.KeyID, scope.KeyScope = key.Name, key.ID(), key.Scope
			need := scope.Route.Scope
			if need == route.ScopeNone {
				// Only an entry nobody classified (no requestlog in front)
				// is protected without a scope: it needs everything.
				need = route.ScopeAdmin
			}
			if viaCookie && need > route.ScopeRead && r.Header.Get("Origin") == "" && r.Header.Get("Sec-Fetch-Site") == "" {
				// A browser too old to send fetch metadata cannot show
				// where a GET came from; only reads may ride its cookie.
				scope.AuthFailure = FailureCrossSite
				jsonerr.Write(w, http.StatusForbidden, "cross_site",
					"this request needs a browser that sends Origin or Sec-Fetch-Site, or an API key")
				return
			}
			if key.Scope < need {
				scope.AuthFailure = FailureScope
				jsonerr.Write(w, http.StatusForbidden, "forbidden",
					"this API key's scope ("+key.Scope.String()+") does not allow this request; it needs "+need.String())
				return
			}
			next.ServeHTTP(w, r)
		})
	}
}

// sessionKey returns the key behind the request's session cookie. A session
// whose key is no longer configured ends here.
// An error means the session store could not be asked.
func sessionKey(ctx context.Context, ks *KeySet, sessions session.Store, r *http.Request) (Key, bool, error) {
	id := session.FromRequest(r)
	if id == "" {
		return Key{}, false, nil
	}
	sess, ok, err := sessions.Get(ctx, id)
	if err != nil || !ok {
		return Key{}, false, err
	}
	k, ok := ks.ByID(sess.KeyID)
	if !ok {
		// Refused whether or not the store manages to forget it.
		sessions.Delete(ctx, id)
		return Key{}, false, nil
	}
	return k, true, nil
}

// SessionStoreDown answers 503 for a request whose browser session could
// not be looked up: the shared session store (Redis) is unreachable.
func SessionStoreDown(w http.ResponseWriter) {
	jsonerr.SetRetryAfter(w.Header(), 5*time.Second)
	jsonerr.Write(w, http.StatusServiceUnavailable, "session_store_unavailable",
		"browser sessions cannot be checked right now (the gateway's shared session store is unreachable); try again shortly, or send an API key")
}

// check validates every credential. When all are valid it returns the key
// with the narrowest scope among them; otherwise why they are not valid.
func check(keys *KeySet, creds []Credential) (Key, string) {
	if len(creds) == 0 {
		return Key{}, FailureMissing
	}
	var narrowest Key
	for i, c := range creds {
		k, ok := keys.Lookup(c.Value)
		if !ok {
			return Key{}, FailureInvalid
		}
		if i == 0 || k.Scope < narrowest.Scope {
			narrowest = k
		}
	}
	return narrowest, ""
}

// Unauthorized answers 401 with a WWW-Authenticate challenge (RFC 6750) and a
// JSON body. It never echoes what the client sent.
func Unauthorized(w http.ResponseWriter, failure string) {
	challenge := `Bearer realm="comfygate"`
	msg := "an API key is required: send it as Authorization: Bearer <key> or X-API-Key: <key>"
	if failure == FailureInvalid {
		challenge += `, error="invalid_token"`
		msg = "the API key is not valid"
	}
	w.Header().Set("WWW-Authenticate", challenge)
	jsonerr.Write(w, http.StatusUnauthorized, "unauthorized", msg)
}

// TooManyRequests answers 429 with Retry-After in whole seconds (at least 1).
func TooManyRequests(w http.ResponseWriter, retryAfter time.Duration, msg string) {
	jsonerr.SetRetryAfter(w.Header(), retryAfter)
	jsonerr.Write(w, http.StatusTooManyRequests, "too_many_requests", msg)
}
