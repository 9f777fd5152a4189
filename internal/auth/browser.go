package auth

import (
	"net/http"
	"net/url"
	"strings"
)

// Browser sessions: a request that carries no key may carry the session
// cookie instead. Such requests are checked against cross-site use, because
// a browser attaches cookies to requests that other sites start.

// isUnsafe reports whether r changes state or opens a socket: anything but
// GET, HEAD and OPTIONS, and every WebSocket upgrade.
func isUnsafe(r *http.Request) bool {
	switch r.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions:
		return r.Header.Get("Upgrade") != ""
	}
	return true
}

// SameOrigin reports whether a cookie-authenticated request comes from the
// gateway's own pages. An Origin header, when present, must name this host
// (and https when the gateway serves TLS). Without one, Sec-Fetch-Site must
// be same-origin or none (typed in, bookmarked); a state-changing request
// or WebSocket that carries neither header is refused, since every current
// browser sends one of them.
//
// "Origin: null" is what a page with a no-referrer policy, or a sandboxed
// frame, sends; then only Sec-Fetch-Site, which the browser sets and pages
// cannot forge, can vouch for the request.
func SameOrigin(r *http.Request) bool {
	origin := r.Header.Get("Origin")
	if origin == "null" {
		return r.Header.Get("Sec-Fetch-Site") == "same-origin"
	}
	if origin != "" {
		return originIsHost(origin, r)
	}
	switch r.Header.Get("Sec-Fetch-Site") {
	case "same-origin", "none":
		return true
	case "":
		return !isUnsafe(r)
	}
	return false // same-site or cross-site
}

func originIsHost(origin string, r *http.Request) bool {
	u, err := url.Parse(origin)
	if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
		return false // includes "null"
	}
	if r.TLS != nil && u.Scheme != "https" {
		return false
	}
	return strings.EqualFold(u.Host, r.Host)
}

// wantsLogin reports whether r is a browser navigating to a page, which
// should be sent to the login page rather than given a 401.
func wantsLogin(r *http.Request) bool {
	if r.Method != http.MethodGet || r.Header.Get("Upgrade") != "" {
		return false
	}
	if mode := r.Header.Get("Sec-Fetch-Mode"); mode != "" && mode != "navigate" {
		return false
	}
	return strings.Contains(r.Header.Get("Accept"), "text/html")
}

// LocalRedirect returns next if it is a path on this server, else "/". It
// refuses everything a browser could resolve to another host:
// scheme-relative //host, /\host, absolute URLs, and control characters.
func LocalRedirect(next string) string {
	if next == "" || next[0] != '/' || len(next) > 2048 {
		return "/"
	}
	if len(next) > 1 && (next[1] == '/' || next[1] == '\\') {
		return "/"
	}
	for i := 0; i < len(next); i++ {
		if c := next[i]; c < 0x20 || c == 0x7f || c == '\\' {
			return "/"
		}
	}
	u, err := url.Parse(next)
	if err != nil || u.Scheme != "" || u.Host != "" || u.User != nil {
		return "/"
	}
	return next
}

// loginRedirect sends a browser to the login page, remembering where it
// was going.
func loginRedirect(w http.ResponseWriter, r *http.Request, loginPath string) {
	target := loginPath
	if next := LocalRedirect(r.URL.RequestURI()); next != "/" {
		target += "?next=" + url.QueryEscape(next)
	}
	http.Redirect(w, r, target, http.StatusSeeOther)
}
