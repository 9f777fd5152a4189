// Package route names ComfyUI routes by pattern ("/history/{id}") and kind
// ("history"), so that audit lines and metrics can group requests without
// carrying raw paths, file names or ids.
package route

import "strings"

// Of names a path by what it does: the route without its /api prefix and
// without ids or file names, and a kind. It never returns the raw path of
// an unknown route, so its results are safe as log fields and metric labels.
func Of(path string) (route, kind string) {
	p := path
	for i := 0; i < 2 && strings.HasPrefix(p, "/api/"); i++ {
		p = p[len("/api"):]
	}
	first, rest, _ := strings.Cut(strings.TrimPrefix(p, "/"), "/")
	switch first {
	case "prompt":
		return "/prompt", "prompt"
	case "upload":
		if rest == "image" || rest == "mask" {
			return "/upload/" + rest, "upload"
		}
		return "/upload", "upload"
	case "interrupt":
		return "/interrupt", "interrupt"
	case "queue":
		return "/queue", "queue"
	case "history":
		if rest != "" {
			return "/history/{id}", "history"
		}
		return "/history", "history"
	case "free":
		return "/free", "free"
	case "jobs":
		return "/jobs", "jobs"
	case "userdata", "v2":
		return "/userdata", "userdata"
	case "settings":
		return "/settings", "settings"
	case "users":
		return "/users", "users"
	case "internal":
		return "/internal", "internal"
	case "manager", "customnode", "snapshot", "externalmodel", "comfyui_manager":
		return "/" + first, "manager"
	case "assets", "tags":
		return "/assets", "assets"
	case "view", "view_metadata", "object_info", "system_stats", "models", "embeddings",
		"extensions", "features", "ws", "experiment", "i18n", "workflow_templates", "global_subgraphs":
		return "/" + first, first
	}
	if p == "/" {
		return "/", "ui"
	}
	// comfygate's own endpoints (never under /api).
	switch path {
	case "/health", "/health/live", "/health/ready", "/metrics", "/login", "/logout":
		return path, strings.TrimPrefix(path, "/")
	}
	return "other", "other"
}
