// Package login serves comfygate's browser login: a page where a person
// pastes an API key once, after which their browser holds a session cookie
// (see package session) and the stock ComfyUI web UI works unchanged.
package login

import (
	_ "embed"
	"errors"
	"html/template"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/comfygate/comfygate/internal/auth"
	"github.com/comfygate/comfygate/internal/jsonerr"
	"github.com/comfygate/comfygate/internal/ratelimit"
	"github.com/comfygate/comfygate/internal/reqscope"
	"github.com/comfygate/comfygate/internal/session"
)

// Paths of the login and logout endpoints.
const (
	Path       = "/login"
	LogoutPath = "/logout"
)

//go:embed page.html
var pageHTML string

var page = template.Must(template.New("login").Parse(pageHTML))

// Handler serves /login and /logout.
type Handler struct {
	// Keys are the keys a person may log in with.
	Keys auth.Source
	// Sessions stores the sessions. When it cannot be reached (a shared
	// store that is down), sign-in and sign-out answer 503 and change
	// nothing.
	Sessions session.Store
	// Attempts limits login attempts per client address (nil: no limit;
	// one that cannot be asked allows).
	Attempts ratelimit.Limiter
	// Lockout counts failed logins with every other failed key attempt
	// (nil: none; one that cannot be asked allows).
	Lockout ratelimit.Lockout
	// OnLockout is called when a failed login locks a client out.
	OnLockout func(r *http.Request, client netip.Addr, d time.Duration)
	// Secure reports whether the client reached the gateway over HTTPS,
	// which makes the cookie Secure.
	Secure func(*http.Request) bool
}

type pageData struct {
	Action, Next, Error, TTL string
	LoggedOut                bool
}

// ServeHTTP answers GET and POST on Path and LogoutPath.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.URL.Path == LogoutPath && (r.Method == http.MethodGet || r.Method == http.MethodPost):
		h.logout(w, r)
	case r.URL.Path == Path && (r.Method == http.MethodGet || r.Method == http.MethodHead):
		q := r.URL.Query()
		h.render(w, http.StatusOK, pageData{Next: auth.LocalRedirect(q.Get("next")), LoggedOut: q.Has("logged_out")})
	case r.URL.Path == Path && r.Method == http.MethodPost:
		h.login(w, r)
	default:
		w.Header().Set("Allow", "GET, POST")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
	}
}

func (h *Handler) login(w http.ResponseWriter, r *http.Request) {
	scope := reqscope.From(r.Context())
	r.Body = http.MaxBytesReader(w, r.Body, 16<<10)
	next := auth.LocalRedirect(r.PostFormValue("next"))
	data := pageData{Next: next}

	// A login form posted from another site is refused: it could log a
	// visitor into the attacker's session.
	if !auth.SameOrigin(r) {
		scope.AuthFailure = auth.FailureCrossSite
		data.Error = "This sign-in came from another site and was refused. Open this page directly and try again."
		h.render(w, http.StatusForbidden, data)
		return
	}
	if h.Lockout != nil {
		if left, locked, err := h.Lockout.Locked(r.Context(), scope.Client); err == nil && locked {
			scope.AuthFailure = auth.FailureLocked
			jsonerr.SetRetryAfter(w.Header(), left)
			data.Error = "Too many failed attempts from your address. Try again in " + left.Round(time.Minute).String() + "."
			h.render(w, http.StatusTooManyRequests, data)
			return
		}
	}
	if h.Attempts != nil {
		if ok, wait, err := h.Attempts.Allow(r.Context(), scope.Client.String()); err == nil && !ok {
			scope.AuthFailure = "rate_limited"
			jsonerr.SetRetryAfter(w.Header(), wait)
			data.Error = "Too many sign-in attempts. Wait a minute and try again."
			h.render(w, http.StatusTooManyRequests, data)
			return
		}
	}
	key, ok := h.Keys.KeySet().Lookup(strings.TrimSpace(r.PostFormValue("key")))
	if !ok {
		scope.AuthFailure = auth.FailureInvalid
		if h.Lockout != nil {
			if locked, err := h.Lockout.Fail(r.Context(), scope.Client); err == nil && locked && h.OnLockout != nil {
				h.OnLockout(r, scope.Client, h.Lockout.Window())
			}
		}
		// The same words whatever was wrong: nothing hints at a near miss.
		data.Error = "That key is not valid."
		h.render(w, http.StatusUnauthorized, data)
		return
	}
	id, err := h.Sessions.Create(r.Context(), key.ID(), key.Name)
	if errors.Is(err, session.ErrFull) {
		data.Error = "The server has too many open sessions. Try again later."
		h.render(w, http.StatusServiceUnavailable, data)
		return
	}
	if err != nil {
		scope.AuthFailure = auth.FailureSessionStore
		jsonerr.SetRetryAfter(w.Header(), 5*time.Second)
		data.Error = "Signing in is not possible right now: the gateway cannot reach its session store. Try again shortly; API keys still work."
		h.render(w, http.StatusServiceUnavailable, data)
		return
	}
	scope.KeyName, scope.KeyID = key.Name, key.ID()
	http.SetCookie(w, session.Cookie(id, h.Sessions.TTL(), h.Secure(r)))
	http.Redirect(w, r, next, http.StatusSeeOther)
}

func (h *Handler) logout(w http.ResponseWriter, r *http.Request) {
	// Another site must not be able to sign a visitor out.
	if !auth.SameOrigin(r) {
		http.Redirect(w, r, "/", http.StatusSeeOther)
		return
	}
	if id := session.FromRequest(r); id != "" {
		if sess, ok, _ := h.Sessions.Get(r.Context(), id); ok {
			scope := reqscope.From(r.Context())
			scope.KeyName, scope.KeyID = sess.KeyName, sess.KeyID
		}
		if err := h.Sessions.Delete(r.Context(), id); err != nil {
			// The cookie stays: clearing it would leave a session that
			// only its expiry ends, with no way left to end it sooner.
			reqscope.From(r.Context()).AuthFailure = auth.FailureSessionStore
			jsonerr.SetRetryAfter(w.Header(), 5*time.Second)
			h.render(w, http.StatusServiceUnavailable, pageData{
				Error: "Signing out did not work: the gateway cannot reach its session store, so your session is still open. Try again shortly."})
			return
		}
	}
	http.SetCookie(w, session.ClearCookie(h.Secure(r)))
	http.Redirect(w, r, Path+"?logged_out=1", http.StatusSeeOther)
}

func (h *Handler) render(w http.ResponseWriter, status int, d pageData) {
	d.Action = Path
	d.TTL = humanDuration(h.Sessions.TTL())
	hdr := w.Header()
	hdr.Set("Content-Type", "text/html; charset=utf-8")
	hdr.Set("Cache-Control", "no-store")
	hdr.Set("X-Content-Type-Options", "nosniff")
	hdr.Set("X-Frame-Options", "DENY")
	hdr.Set("Referrer-Policy", "same-origin") // no-referrer would make the form post Origin: null
	hdr.Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
	w.WriteHeader(status)
	page.Execute(w, d)
}

func humanDuration(d time.Duration) string {
	switch {
	case d%time.Hour == 0 && d >= time.Hour:
		n := int(d / time.Hour)
		if n == 1 {
			return "1 hour"
		}
		return strconv.Itoa(n) + " hours"
	case d%time.Minute == 0 && d >= time.Minute:
		return strconv.Itoa(int(d/time.Minute)) + " minutes"
	}
	return d.String()
}
