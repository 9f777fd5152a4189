package auth

import (
	"errors"
	"net/http"
	"strings"
)

// Scope is what a key may do. Scopes are ordered: submit includes read, and
// admin includes everything.
type Scope int

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

// readPrefixes are routes (without /api) whose GET and HEAD need only read.
// A prefix ending in '/' matches everything below it.
var readRoutes = []string{
	"/prompt", "/queue", "/history", "/history/", "/view", "/view_metadata/",
	"/object_info", "/object_info/", "/system_stats", "/models", "/models/",
	"/embeddings", "/extensions", "/features", "/experiment/models", "/experiment/models/",
	"/workflow_templates", "/workflow_templates/", "/i18n", "/global_subgraphs", "/global_subgraphs/",
	"/node_replacements", "/jobs", "/jobs/", "/ws", "/users", "/settings", "/settings/",
	"/userdata", "/userdata/", "/v2/userdata",
	"/metrics", // comfygate's own, on the main listener
}

// submitRoutes are POST routes (without /api) that need submit.
var submitRoutes = map[string]bool{
	"/prompt": true, "/upload/image": true, "/upload/mask": true,
	"/interrupt": true, "/queue": true, "/history": true, "/jobs/cancel": true,
}

// RequiredScope is the scope a protected request needs. Routes are matched
// in both their plain and /api forms. A path that is not in plain canonical
// form, and any route not in the table, needs admin.
func RequiredScope(method, escapedPath string) Scope {
	// An encoded '/' is how the web UI names files in folders
	// (/userdata/workflows%2Fa.json). Reading it as a separator can only
	// move a path deeper below the same first segments, and every route
	// below a read route is read, so it cannot lower what is needed.
	if strings.Contains(escapedPath, "%2") {
		escapedPath = strings.NewReplacer("%2F", "/", "%2f", "/").Replace(escapedPath)
	}
	p, ok := canonicalPath(escapedPath, true)
	if !ok {
		return ScopeAdmin
	}
	// ComfyUI mirrors every route under /api, and routes that already start
	// with /api under /api/api (API.md section 1).
	for i := 0; i < 2 && strings.HasPrefix(p, "/api/"); i++ {
		p = p[len("/api"):]
	}
	switch method {
	case http.MethodGet, http.MethodHead:
		for _, r := range readRoutes {
			if p == r || (strings.HasSuffix(r, "/") && strings.HasPrefix(p, r) && len(p) > len(r)) {
				return ScopeRead
			}
		}
	case http.MethodPost:
		if submitRoutes[p] || isJobCancel(p) {
			return ScopeSubmit
		}
	}
	return ScopeAdmin
}

// isJobCancel matches /jobs/{id}/cancel.
func isJobCancel(p string) bool {
	rest, ok := strings.CutPrefix(p, "/jobs/")
	if !ok {
		return false
	}
	id, ok := strings.CutSuffix(rest, "/cancel")
	return ok && id != "" && !strings.Contains(id, "/")
}
