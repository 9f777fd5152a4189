// Package route is comfygate's one table of ComfyUI routes. For each path
// pattern and method it says whether a request needs a key, which scope the
// key must have, how metrics and the audit trail name the route, and how a
// fleet of ComfyUI servers will route it.
//
// Classify looks a request up once; requestlog's middleware keeps the
// answer in the request's scope (package reqscope), where authentication,
// the limits, the guard, the audit trail and the metrics read it.
//
// The public/protected decision is made on the path exactly as the client
// sent it, in the strict canonical form every router reads the same way: a
// path with dot segments, doubled or encoded slashes, encoded dots, '%' or
// backslashes, ';' or control characters is never public, so a path trick
// can only make a request need a key, never the reverse. Labels are route
// patterns, never raw paths, so they are safe as metric labels and log
// fields.
package route

import (
	"errors"
	"net/http"
	"strings"
)

// Access is what a request needs to pass the gateway.
type Access uint8

const (
	// Protected requests need a valid key. The zero Access is Protected.
	Protected Access = iota
	// Public requests pass without a key: GET and HEAD of the web UI page
	// and its static files, and of the WebSocket unless protectWS is set.
	Public
	// Preflight is a CORS preflight (OPTIONS with Access-Control-Request-Method).
	// Browsers never attach credentials to it, and ComfyUI answers every
	// OPTIONS with an empty 200 before any handler runs, so it passes.
	Preflight
)

func (a Access) String() string {
	switch a {
	case Public:
		return "public"
	case Preflight:
		return "preflight"
	}
	return "protected"
}

// Scope is what a key may do, and what a route needs of it. Scopes are
// ordered: submit includes read, and admin includes everything.
type Scope uint8

const (
	// ScopeNone is needed by public requests.
	ScopeNone Scope = iota
	// ScopeRead allows looking: GET of the queue, history, outputs (/view),
	// node definitions, system stats, models, settings and user files, and
	// the WebSocket.
	ScopeRead
	// ScopeSubmit adds queueing prompts, uploading inputs, interrupting, and
	// deleting from the queue and history.
	ScopeSubmit
	// ScopeAdmin allows everything else: /free, /internal/*, writes to user
	// data, settings and users, ComfyUI-Manager (which can install code),
	// and every route comfygate does not know.
	ScopeAdmin
)

func (s Scope) String() string {
	switch s {
	case ScopeNone:
		return "none"
	case ScopeRead:
		return "read"
	case ScopeSubmit:
		return "submit"
	}
	return "admin"
}

// ParseScope reads "read", "submit" or "admin".
func ParseScope(s string) (Scope, error) {
	switch s {
	case "read":
		return ScopeRead, nil
	case "submit":
		return ScopeSubmit, nil
	case "admin":
		return ScopeAdmin, nil
	}
	// The text is not echoed: in a key file it may be a mistyped key.
	return 0, errors.New("unknown scope (want read, submit or admin)")
}

// Policy says which ComfyUI server(s) of a fleet a request goes to. Nothing
// reads it yet: with one server every request goes to that server.
type Policy uint8

const (
	// PolicyPrimary sends the request to the primary server: user data,
	// settings, ComfyUI-Manager, and every route comfygate does not know
	// (custom-node routes). The zero Policy is PolicyPrimary.
	PolicyPrimary Policy = iota
	// PolicyOwner sends it to the server that holds what it names: a
	// prompt's history or job, an output file.
	PolicyOwner
	// PolicyAnyHealthy sends it to any healthy server: the web UI and what
	// every server of a uniform fleet answers alike (models, extensions,
	// templates, translations).
	PolicyAnyHealthy
	// PolicyAll sends it to every server: /free, interrupts, queue and
	// history deletions, uploads (so any server may run the prompt that
	// uses them).
	PolicyAll
	// PolicyMerge asks every server and merges the answers into the one a
	// single ComfyUI would give: /queue, /history, /object_info,
	// /system_stats, GET /prompt, the jobs list.
	PolicyMerge
	// PolicyDispatch picks the server that runs a new prompt (POST /prompt).
	PolicyDispatch
	// PolicySocket is the WebSocket, fed by every server.
	PolicySocket
)

func (p Policy) String() string {
	switch p {
	case PolicyOwner:
		return "owner"
	case PolicyAnyHealthy:
		return "any-healthy"
	case PolicyAll:
		return "all"
	case PolicyMerge:
		return "merge"
	case PolicyDispatch:
		return "dispatch"
	case PolicySocket:
		return "socket"
	}
	return "primary"
}

// Entry is what the table says about one request.
//
// The zero Entry, which a handler outside requestlog's middleware sees, is
// protected; its ScopeNone is read as admin by package auth.
type Entry struct {
	// Label names the route for metrics and the audit trail: its pattern
	// without the /api prefix, ids or file names ("/history/{id}"), or
	// "other" for a path comfygate does not know. Never a raw path.
	Label string
	// Kind groups routes by what they do ("prompt", "upload", "manager",
	// "ui", "other"): the audit line's "audit" field.
	Kind string
	// Access says whether the request needs a key.
	Access Access
	// Scope is what a key needs for this method on this path; ScopeNone
	// when Access is not Protected.
	Scope Scope
	// Policy is how a fleet will route the request.
	Policy Policy
	// PublicPath reports that GET and HEAD of this path are public (the UI
	// page, a static file, or /ws without protectWS), whatever this
	// request's method. A CORS preflight for such a path goes on to
	// ComfyUI; one for any other path is answered by the gateway.
	PublicPath bool
}

// Classify looks r up in the table. protectWS makes /ws and /api/ws need a
// key (with the read scope) like every other route.
//
// A request is public only if it is a GET or HEAD whose path is in plain
// canonical form and names the UI page, a static asset or the WebSocket.
// Any path ComfyUI might read differently from us (dot segments, empty
// segments, encoded '/', '\\', '.' or '%', backslashes, control characters)
// is protected, so a trick can at most make a public request need a key,
// never the reverse. The scope is decided on the same path, except that an
// encoded '/' is read as a separator and an encoded '%' or non-ASCII byte
// is accepted (see canonicalPath); a path that is not canonical even so
// needs admin.
func Classify(r *http.Request, protectWS bool) Entry {
	return match(r.Method, r.URL.EscapedPath(), isPreflight(r.Method, r.Header), protectWS)
}

// isPreflight reports a CORS preflight: OPTIONS with Access-Control-Request-Method.
func isPreflight(method string, h http.Header) bool {
	return method == http.MethodOptions && h.Get("Access-Control-Request-Method") != ""
}

// slashes reads an encoded '/' as a separator, for the scope and label.
var slashes = strings.NewReplacer("%2F", "/", "%2f", "/")

// match is Classify on its parts: the method, the path as the client sent
// it (r.URL.EscapedPath()), and whether the request is a CORS preflight.
func match(method, escapedPath string, preflight, protectWS bool) Entry {
	strict, strictOK := canonicalPath(escapedPath, false)
	p, ok := strict, strictOK
	if !ok {
		// An encoded '/' is how the web UI names files in folders
		// (/userdata/workflows%2Fa.json). Reading it as a separator can
		// only move a path deeper below the same first segments, and every
		// route below a read route is read, so it cannot lower what is
		// needed. (A strict path has none, so it needs no second look.)
		if strings.Contains(escapedPath, "%2") {
			escapedPath = slashes.Replace(escapedPath)
		}
		p, ok = canonicalPath(escapedPath, true)
	}
	e := Entry{Label: "other", Kind: "other", Scope: ScopeAdmin, Policy: PolicyPrimary}
	var open openness
	static := false
	if ok {
		if rw, strips := lookup(p); rw != nil {
			m := rw.method(method)
			e.Label, e.Kind, e.Policy = rw.label, rw.kind, m.policy
			if m.scope != ScopeNone { // else the row does not list the method: admin
				e.Scope = m.scope
			}
			// Only a path ComfyUI itself serves may be public: /api/api/ws
			// is no WebSocket (only routes that start with /api are doubled).
			if strips <= 1 {
				open = rw.get.open
			}
		}
	}
	if strictOK {
		switch open {
		case openAlways:
			e.PublicPath = true
		case openUnlessProtectWS:
			e.PublicPath = !protectWS
		}
		if !e.PublicPath && isStaticAsset(strict) {
			e.PublicPath, static = true, true
		}
	}
	switch {
	case preflight:
		e.Access, e.Scope, e.Policy = Preflight, ScopeNone, PolicyAnyHealthy
	case e.PublicPath && (method == http.MethodGet || method == http.MethodHead):
		e.Access, e.Scope = Public, ScopeNone
		if static {
			e.Policy = PolicyAnyHealthy // a file of the frontend every server has
		}
	}
	return e
}
