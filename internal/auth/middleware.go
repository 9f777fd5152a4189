package auth

import (
	"net/http"

	"github.com/comfygate/comfygate/internal/jsonerr"
	"github.com/comfygate/comfygate/internal/requestlog"
)

// Options tune the middleware.
type Options struct {
	// ProtectWS makes /ws need a key like every other route. By default the
	// WebSocket is public, as ComfyUI clients expect.
	ProtectWS bool
}

// Reasons an authentication failed, as recorded in the request scope.
const (
	FailureMissing = "missing"
	FailureInvalid = "invalid"
)

// Middleware returns the authentication layer. With an empty key set it is
// the identity: comfygate is then a pure pass-through.
//
// A protected request passes only if it carries at least one credential and
// every credential it carries is a configured key. A public request passes
// whatever it carries. Stripping the credentials before the request goes
// upstream is the proxy's job (see Strip), so that the inbound request is
// never modified.
func Middleware(keys *KeySet, opts Options) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		if !keys.Enabled() {
			return next
		}
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			creds := Credentials(r)
			name, failure := check(keys, creds)
			access := Classify(r.Method, r.URL.EscapedPath(), r.Header, opts.ProtectWS)
			scope := requestlog.ScopeFrom(r.Context())
			if access != Protected {
				scope.KeyName = name // logged when a valid key came along
				next.ServeHTTP(w, r)
				return
			}
			if failure != "" {
				scope.AuthFailure = failure
				Unauthorized(w, failure)
				return
			}
			scope.KeyName = name
			next.ServeHTTP(w, r)
		})
	}
}

// check validates every credential. It returns the name of the key when all
// are valid, or why they are not.
func check(keys *KeySet, creds []Credential) (name, failure string) {
	if len(creds) == 0 {
		return "", FailureMissing
	}
	for _, c := range creds {
		n, ok := keys.Lookup(c.Value)
		if !ok {
			return "", FailureInvalid
		}
		if name == "" {
			name = n
		}
	}
	return name, ""
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
