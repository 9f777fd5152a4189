package route

import (
	"fmt"
	"net/http"
	"strings"
)

// row is one route of the table: a path pattern, its label and kind, and
// what GET (and HEAD) and POST on it need. Every other method, and a GET or
// POST the row does not list, needs admin and goes to the primary server.
type row struct {
	// pattern is matched against the canonical path with up to two /api
	// prefixes removed (ComfyUI mirrors every route under /api, and routes
	// that already start with /api under /api/api). A segment "{name}"
	// matches any one segment; a last segment "*" matches one or more.
	pattern string
	// label names the route in metrics and the audit trail ("" = pattern).
	label string
	kind  string
	// own marks comfygate's own endpoints, which have no /api form.
	own bool

	get, post method

	segs []string // pattern split at '/', set by init
}

// method is what one method on a row needs.
type method struct {
	// scope is the scope a key needs; ScopeNone means the row does not
	// list the method, which then needs admin.
	scope  Scope
	policy Policy
	// open makes GET and HEAD public (only for get).
	open openness
}

// openness says when GET of a row is public.
type openness uint8

const (
	openNever openness = iota
	openAlways
	openUnlessProtectWS
)

func read(p Policy) method   { return method{scope: ScopeRead, policy: p} }
func submit(p Policy) method { return method{scope: ScopeSubmit, policy: p} }
func admin(p Policy) method  { return method{scope: ScopeAdmin, policy: p} }

// table is every ComfyUI route comfygate knows, and its own endpoints. What
// it does not list is labelled "other", needs admin and goes to the
// primary server. Static files of the web UI are recognised by their shape
// (isStaticAsset), not listed; they keep the label of the row they fall
// under ("/assets", "/extensions") or "other".
//
// Within one first segment the first row that matches wins, so specific
// patterns come before "*".
var table = []row{
	// The web UI page, and the WebSocket.
	{pattern: "/", kind: "ui", get: method{open: openAlways, policy: PolicyAnyHealthy}},
	{pattern: "/ws", kind: "ws", get: method{open: openUnlessProtectWS, scope: ScopeRead, policy: PolicySocket}},

	// The queue and its runs.
	{pattern: "/prompt", kind: "prompt", get: read(PolicyMerge), post: submit(PolicyDispatch)},
	{pattern: "/queue", kind: "queue", get: read(PolicyMerge), post: submit(PolicyAll)},
	{pattern: "/history", kind: "history", get: read(PolicyMerge), post: submit(PolicyAll)},
	{pattern: "/history/*", label: "/history/{id}", kind: "history", get: read(PolicyOwner)},
	{pattern: "/interrupt", kind: "interrupt", post: submit(PolicyAll)},
	{pattern: "/free", kind: "free", post: admin(PolicyAll)},
	{pattern: "/jobs", kind: "jobs", get: read(PolicyMerge)},
	{pattern: "/jobs/cancel", label: "/jobs", kind: "jobs", get: read(PolicyOwner), post: submit(PolicyAll)},
	{pattern: "/jobs/{id}/cancel", label: "/jobs", kind: "jobs", get: read(PolicyOwner), post: submit(PolicyOwner)},
	{pattern: "/jobs/*", label: "/jobs", kind: "jobs", get: read(PolicyOwner)},

	// Files in and out.
	{pattern: "/upload/image", kind: "upload", post: submit(PolicyAll)},
	{pattern: "/upload/mask", kind: "upload", post: submit(PolicyAll)},
	{pattern: "/view", kind: "view", get: read(PolicyOwner)},
	{pattern: "/view_metadata/*", label: "/view_metadata", kind: "view_metadata", get: read(PolicyAnyHealthy)},

	// What a server has: the same on every server of a uniform fleet,
	// except the system stats.
	{pattern: "/object_info", kind: "object_info", get: read(PolicyMerge)},
	{pattern: "/object_info/*", label: "/object_info", kind: "object_info", get: read(PolicyMerge)},
	{pattern: "/system_stats", kind: "system_stats", get: read(PolicyMerge)},
	{pattern: "/models", kind: "models", get: read(PolicyAnyHealthy)},
	{pattern: "/models/*", label: "/models", kind: "models", get: read(PolicyAnyHealthy)},
	{pattern: "/experiment/models", label: "/experiment", kind: "experiment", get: read(PolicyAnyHealthy)},
	{pattern: "/experiment/models/*", label: "/experiment", kind: "experiment", get: read(PolicyAnyHealthy)},
	{pattern: "/embeddings", kind: "embeddings", get: read(PolicyAnyHealthy)},
	{pattern: "/extensions", kind: "extensions", get: read(PolicyAnyHealthy)},
	{pattern: "/extensions/*", label: "/extensions", kind: "extensions", get: admin(PolicyAnyHealthy)},
	{pattern: "/features", kind: "features", get: read(PolicyAnyHealthy)},
	{pattern: "/i18n", kind: "i18n", get: read(PolicyAnyHealthy)},
	{pattern: "/workflow_templates", kind: "workflow_templates", get: read(PolicyAnyHealthy)},
	{pattern: "/workflow_templates/*", label: "/workflow_templates", kind: "workflow_templates", get: read(PolicyAnyHealthy)},
	{pattern: "/global_subgraphs", kind: "global_subgraphs", get: read(PolicyAnyHealthy)},
	{pattern: "/global_subgraphs/*", label: "/global_subgraphs", kind: "global_subgraphs", get: read(PolicyAnyHealthy)},
	{pattern: "/node_replacements", kind: "node_replacements", get: read(PolicyAnyHealthy)},

	// User state: reads for read keys, writes for admin.
	{pattern: "/users", kind: "users", get: read(PolicyPrimary)},
	{pattern: "/settings", kind: "settings", get: read(PolicyPrimary)},
	{pattern: "/settings/*", label: "/settings", kind: "settings", get: read(PolicyPrimary)},
	{pattern: "/userdata", kind: "userdata", get: read(PolicyPrimary)},
	{pattern: "/userdata/*", label: "/userdata", kind: "userdata", get: read(PolicyPrimary)},
	{pattern: "/v2/userdata", label: "/userdata", kind: "userdata", get: read(PolicyPrimary)},

	// Admin only.
	{pattern: "/internal/*", label: "/internal", kind: "internal"},
	{pattern: "/assets", kind: "assets"},
	{pattern: "/assets/*", label: "/assets", kind: "assets"},
	{pattern: "/tags", label: "/assets", kind: "assets"},
	{pattern: "/manager/*", label: "/manager", kind: "manager"},
	{pattern: "/customnode/*", label: "/customnode", kind: "manager"},
	{pattern: "/snapshot/*", label: "/snapshot", kind: "manager"},
	{pattern: "/externalmodel/*", label: "/externalmodel", kind: "manager"},
	{pattern: "/comfyui_manager/*", label: "/comfyui_manager", kind: "manager"},

	// comfygate's own endpoints. The probes, /login and /logout are
	// answered before the key check; this only names them. /metrics is
	// behind the key on the main port (or passed to ComfyUI, with
	// --metrics-listen).
	{pattern: "/metrics", kind: "metrics", get: read(PolicyPrimary)},
	{pattern: "/health", kind: "health", own: true},
	{pattern: "/health/live", kind: "health/live", own: true},
	{pattern: "/health/ready", kind: "health/ready", own: true},
	{pattern: "/login", kind: "login", own: true},
	{pattern: "/logout", kind: "logout", own: true},
}

// byFirst indexes the table by the first segment of each pattern.
var byFirst = map[string][]*row{}

func init() {
	for i := range table {
		rw := &table[i]
		if rw.pattern != "/" {
			rw.segs = strings.Split(rw.pattern[1:], "/")
		}
		for j, s := range rw.segs {
			if s == "" || (s == "*" && j != len(rw.segs)-1) || (j == 0 && (s == "*" || s[0] == '{')) {
				panic(fmt.Sprintf("route: bad pattern %q", rw.pattern))
			}
		}
		if rw.label == "" {
			rw.label = rw.pattern
		}
		first := ""
		if len(rw.segs) > 0 {
			first = rw.segs[0]
		}
		byFirst[first] = append(byFirst[first], rw)
	}
}

// lookup finds the row for the canonical path p, and how many /api
// prefixes it took off p to find it.
func lookup(p string) (*row, int) {
	strips := 0
	for strips < 2 && strings.HasPrefix(p, "/api/") {
		p = p[len("/api"):]
		strips++
	}
	first, _, _ := strings.Cut(p[1:], "/")
	for _, rw := range byFirst[first] {
		if rw.own && strips > 0 {
			continue
		}
		if rw.matches(p) {
			return rw, strips
		}
	}
	return nil, strips
}

// matches reports whether the canonical path p fits the row's pattern.
func (rw *row) matches(p string) bool {
	rest := p[1:]
	for _, s := range rw.segs {
		if s == "*" {
			return rest != ""
		}
		if rest == "" {
			return false
		}
		var seg string
		seg, rest, _ = strings.Cut(rest, "/")
		if s[0] != '{' && seg != s {
			return false
		}
	}
	return rest == ""
}

// method returns what m needs on this row.
func (rw *row) method(m string) method {
	switch m {
	case http.MethodGet, http.MethodHead:
		return rw.get
	case http.MethodPost:
		return rw.post
	}
	return method{}
}
